"""Post-training draws its examples epoch by epoch: every example once per epoch, in a fresh order each epoch, and
a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime import sft  # noqa: E402
from llmc.runtime.sft import EpochOrder, train_sft  # noqa: E402


def test_every_example_is_drawn_once_per_epoch_in_a_new_order():
    order = EpochOrder(10, seed=3)
    epochs = [[order(k) for k in range(e * 10, (e + 1) * 10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # the k-th draw depends on k alone: a fresh order (a resumed run) draws the same from any point on
    assert [EpochOrder(10, seed=3)(k) for k in range(25, 30)] == [x for e in epochs for x in e][25:]
    assert EpochOrder(10, seed=4).draws(0, 10) != epochs[0]


def test_sft_trains_each_conversation_once_per_epoch(monkeypatch):
    """24 distinct examples, 8 per step: the 3 steps of the first epoch train each exactly once (draws with
    replacement would repeat some and skip about a third: (1 - 1/24)^24 = 36%)."""
    from test_posttrain import _model

    seen: list[int] = []
    real = sft.pad_batch

    def spy(batch, pad_id, max_len=None):
        seen.extend(ids[0] for ids, _ in batch)
        return real(batch, pad_id, max_len)

    monkeypatch.setattr(sft, "pad_batch", spy)
    examples = [([i, 7, 8, 9], [-100, 7, 8, 9]) for i in range(24)]
    train_sft(_model(), examples, steps=3, lr=1e-3, batch_size=8, pad_id=0)
    assert sorted(seen) == list(range(24))
