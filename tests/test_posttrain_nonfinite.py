"""llmc's post-training trainers (sft / dpo / grpo share :func:`llmc.runtime.sft.clip_grads` and
:class:`llmc.runtime.sft.LoopState`) stop at a non-finite step as the pre-training trainer does (error[R014]):
the optimizer step is not taken, no checkpoint of it (or of non-finite weights) is written, and the newest
checkpoint, named in the message, holds finite weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.dpo import encode_pairs, train_dpo  # noqa: E402
from llmc.runtime.errors import NonFiniteStep  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.sft import LoopState, encode_conversations, train_sft  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer, chat_examples, preference_pairs  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402

TOK = ByteTokenizer()
ARCH = Architecture(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                    vocab_size=TOK.vocab_size, max_seq_len=256)


def _poison_after(model, step_index: int):
    """A ``log`` callback that, after step ``step_index`` (0-based) is logged, makes every later forward's logits
    NaN (a forward hook: the weights stay finite, so the step check, not the weights check, must catch it)."""
    armed = {"on": False}

    def hook(_mod, _inp, out):
        return out * float("nan") if armed["on"] else out

    model.norm.register_forward_hook(hook)  # (the final norm: its output is one tensor)

    def log(step, _stats):
        if step == step_index:
            armed["on"] = True
    return log


def _saved_steps(folder):
    return sorted(int(p.name[5:]) for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


def test_sft_stops_at_a_nan_loss_before_its_step_and_its_save(tmp_path):
    torch.manual_seed(0)
    m = build_model(ARCH, seed=0)
    ex = encode_conversations(chat_examples(16, seed=1), TOK)
    state = LoopState(folder=tmp_path / "ck", interval=1)
    with pytest.raises(NonFiniteStep) as e:
        train_sft(m, ex, steps=6, lr=1e-3, batch_size=4, pad_id=TOK.pad_id, state=state, log=_poison_after(m, 1))
    msg = str(e.value)
    # steps 1 and 2 ran and were saved; step 3's loss is NaN: not taken, not saved
    assert "non-finite loss at step 3" in msg and "was not taken" in msg
    assert _saved_steps(tmp_path / "ck") == [1, 2]
    assert str(tmp_path / "ck" / "step-00000002") in msg
    assert all(torch.isfinite(p).all() for p in m.parameters())  # the NaN step changed no weight


def test_a_save_of_non_finite_weights_is_refused(tmp_path):
    m = build_model(ARCH, seed=0)
    ex = encode_conversations(chat_examples(16, seed=1), TOK)
    state = LoopState(folder=tmp_path / "ck", interval=1)

    def log(step, _stats):  # after step 2's update, before its checkpoint: a weight overflows
        if step == 1:
            with torch.no_grad():
                next(m.parameters()).view(-1)[0] = float("inf")

    with pytest.raises(NonFiniteStep, match="non-finite weights after the update at step 2"):
        train_sft(m, ex, steps=6, lr=1e-3, batch_size=4, pad_id=TOK.pad_id, state=state, log=log)
    assert _saved_steps(tmp_path / "ck") == [1]


def test_dpo_stops_at_a_nan_loss(tmp_path):
    torch.manual_seed(0)
    m = build_model(ARCH, seed=0)
    pairs = encode_pairs(preference_pairs(16, seed=1), TOK)
    state = LoopState(folder=tmp_path / "ck", interval=1)
    with pytest.raises(NonFiniteStep, match="non-finite loss at step 2"):
        train_dpo(m, pairs, steps=4, lr=1e-4, batch_size=4, pad_id=TOK.pad_id, state=state, log=_poison_after(m, 0))
    assert _saved_steps(tmp_path / "ck") == [1]
