"""``activation_checkpointing: partial`` in llmc's runtime: the first ``ac_layers`` blocks recomputed whole,
the others not at all (Megatron-LM ``--recompute-granularity full --recompute-method block
--recompute-num-layers K``). Checked against what torch itself does: block calls counted by forward hooks,
gradients against an un-checkpointed model, saved activations through autograd's saved-tensor hooks."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.job import TrainJob, check_ac  # noqa: E402
from llmc.runtime.model import Transformer, build_model  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.model import MoE as MoESpec  # noqa: E402
from llmc.spec.schema import ac_label  # noqa: E402

N_LAYERS = 4
TINY = dict(n_layers=N_LAYERS, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=97, max_seq_len=64)
MODES = [("none", 0), ("partial", 1), ("partial", 2), ("partial", 3), ("partial", 9), ("full", 0)]


def _arch(**kw) -> Architecture:
    return Architecture(**{**TINY, **kw})


def _tokens(b: int = 2, t: int = 32) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (b, t + 1), generator=torch.Generator().manual_seed(0))


def _step(model: Transformer, tok: torch.Tensor) -> None:
    model.train()
    model.loss(tok[:, :-1], tok[:, 1:]).backward()


@pytest.mark.parametrize("mode,k", MODES)
def test_first_k_blocks_run_twice_per_step(mode, k):
    """A recomputed block is called once in the forward and once more in the backward; the others once."""
    model = build_model(_arch(), seed=0)
    model.set_ac(mode, k)
    calls = [0] * N_LAYERS
    for i, blk in enumerate(model.layers.values()):
        blk.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
    _step(model, _tokens())
    n = N_LAYERS if mode == "full" else min(k, N_LAYERS)
    assert calls == [2] * n + [1] * (N_LAYERS - n)
    # eval (no graph to recompute): every block once, whatever the mode
    calls[:] = [0] * N_LAYERS
    with torch.no_grad():
        model.eval()(_tokens()[:, :-1])
    assert calls == [1] * N_LAYERS


def test_partial_does_not_recompute_the_attention_core():
    """Blocks past the first K keep everything: no selective (attention-core) checkpoint on them."""
    model = build_model(_arch(), seed=0)
    model.set_ac("selective")
    model.set_ac("partial", 2)
    assert [blk.attention.checkpoint_core for blk in model.layers.values()] == [False] * N_LAYERS


@pytest.mark.parametrize("kw", [{}, {"moe": MoESpec(num_experts=2, top_k=1, dense_layers=1)}])
@pytest.mark.parametrize("k", [1, 2])
def test_partial_gradients_equal_no_checkpointing(kw, k):
    a = _arch(**kw)
    ref, ac = build_model(a, seed=0), build_model(a, seed=0)
    ac.set_ac("partial", k)
    tok = _tokens()
    for m in (ref, ac):
        _step(m, tok)
    grads = 0
    for (n, p), (_, q) in zip(ref.named_parameters(), ac.named_parameters(), strict=True):
        if p.grad is not None:
            grads += 1
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n
    assert grads > 0


def _saved_bytes(model: Transformer, tok: torch.Tensor, inputs: dict[int, int] | None = None) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one training forward (the
    parameters and RoPE buffer excluded: they exist whatever the mode), through
    ``torch.autograd.graph.saved_tensors_hooks``. Non-reentrant torch.utils.checkpoint saves its region's
    inputs through the same hooks and replaces the pack hook inside the region, so a recomputed block
    shows up as its input only. ``inputs`` collects each block input's storage."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = []
    if inputs is not None:
        for blk in model.layers.values():
            hooks.append(blk.register_forward_pre_hook(
                lambda _m, args: inputs.setdefault(args[0].untyped_storage().data_ptr(), args[0].nbytes) and None))
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(tok[:, :-1], tok[:, 1:])
    for h in hooks:
        h.remove()
    loss.backward()  # the recomputation runs (outside the hooks) and frees what was saved
    if inputs is not None:
        inputs["saved"] = sum(1 for p in inputs if p in saved)
    return sum(saved.values())


def test_saved_activations_fall_linearly_with_k():
    """none > partial(1) > partial(2) > full, and each recomputed block frees one block's worth:
    partial(K) = none - K (none - full) / L, the linear interpolation the compiler's memory model uses
    (every block here has the same shapes, so each one saves the same bytes)."""
    model = build_model(_arch(), seed=0)
    tok = _tokens(2, 64)

    def measure(mode: str, k: int = 0) -> int:
        model.set_ac(mode, k)
        return _saved_bytes(model, tok)

    none, full = measure("none"), measure("full")
    part = {k: measure("partial", k) for k in (1, 2, 3, N_LAYERS, 9)}
    assert none > part[1] > part[2] > part[3] > full
    assert part[N_LAYERS] == part[9] == full  # K >= L: every block, exactly as full
    per_block = (none - full) / N_LAYERS
    for k in (1, 2, 3):
        assert part[k] == pytest.approx(none - k * per_block, abs=0.01 * per_block), k
    # a recomputed block keeps its input only: one (B, T, D) fp32 tensor, far below what it saves without AC
    B, T, D = tok.shape[0], tok.shape[1] - 1, TINY["d_model"]
    assert per_block > 4 * (B * T * D * 4)


def test_full_keeps_each_block_input():
    """Under full AC the storages saved include every block's input (the checkpoint's own copy; Korthikanti
    et al. 2022, sec. 5, full recomputation keeps the layer input): what makes the measurement above count
    what a recomputed block really holds, not zero."""
    model = build_model(_arch(), seed=0)
    model.set_ac("full")
    inputs: dict[int, int] = {}
    _saved_bytes(model, _tokens(), inputs)
    assert inputs.pop("saved") == len(inputs) == N_LAYERS


def test_compiled_blocks_keep_partial_gradients():
    """Per-block torch.compile (eager backend: no C compiler on CI) under partial: the checkpoint wraps the
    compiled block's call in Transformer.forward, so the gradients are those without AC."""
    ref, ac = build_model(_arch(), seed=0), build_model(_arch(), seed=0)
    ac.set_ac("partial", 2)
    ac.compile_blocks(backend="eager")
    tok = _tokens()
    for m in (ref, ac):
        _step(m, tok)
    for (n, p), (_, q) in zip(ref.named_parameters(), ac.named_parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("mode,k,match", [
    ("partial", 0, "needs ac_layers >= 1"), ("partial", -1, "needs ac_layers >= 1"),
    ("full", 2, "'partial' only"), ("none", 1, "'partial' only"), ("selective", 3, "'partial' only"),
    ("partial", True, "must be an integer"), ("partial", "2", "must be an integer"), ("partial", 2.0, "integer"),
    ("block", 2, "must be one of"), (None, 0, "must be one of"),
])
def test_set_ac_refuses_bad_combinations(mode, k, match):
    model = build_model(_arch(), seed=0)
    with pytest.raises(ValueError, match=match):
        model.set_ac(mode, k)
    assert (model.ac_mode, model.ac_layers) == ("none", 0)  # unchanged


def test_ac_label():
    assert [ac_label(m, k) for m, k in MODES[:3]] == ["none", "partial(1)", "partial(2)"]
    assert ac_label("full") == "full"
    check_ac("partial", 9)  # more than the blocks there are: every block


# ---------------------------------------------------------------- the lock


def _spec() -> dict:
    return {"name": "t", "model": {**TINY, "name": "micro"}, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}], "seq_len": 32, "tokens": 2048,
                     "tokenizer": {"train": True, "vocab_size": 512}},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 1e-3},
                         "checkpoint": {"interval_steps": 100}}}


def test_job_reads_ac_layers_from_the_lock():
    from test_build_fakes import lock_for

    lock = lock_for(_spec(), plan={"activation_checkpointing": "partial", "ac_layers": 3})
    job = TrainJob.from_lock(lock)
    assert (job.activation_checkpointing, job.ac_layers) == ("partial", 3)
    lock = lock_for(_spec(), plan={"activation_checkpointing": "full", "ac_layers": 0})
    assert (TrainJob.from_lock(lock).activation_checkpointing, TrainJob.from_lock(lock).ac_layers) == ("full", 0)
    del lock["plan"]["ac_layers"]  # a lock written before the key existed: 0
    assert TrainJob.from_lock(lock).ac_layers == 0


@pytest.mark.parametrize("plan,match", [
    ({"activation_checkpointing": "partial", "ac_layers": 0}, "needs ac_layers >= 1"),
    ({"activation_checkpointing": "partial", "ac_layers": "2"}, "must be an integer, got '2'"),
    ({"activation_checkpointing": "partial", "ac_layers": None}, "must be an integer, got None"),
    ({"activation_checkpointing": "partial", "ac_layers": 1.5}, "must be an integer"),
    ({"activation_checkpointing": "full", "ac_layers": 2}, "'partial' only"),
    ({"activation_checkpointing": "blocks", "ac_layers": 2}, "must be one of"),
])
def test_bad_ac_in_the_lock_is_one_line(plan, match):
    from test_build_fakes import lock_for

    lock = lock_for(_spec(), plan=plan)
    with pytest.raises(ValueError, match=match) as e:
        TrainJob.from_lock(lock)
    msg = str(e.value)
    assert msg.startswith("lock: plan: ") and msg.endswith("(rebuild with `llmc build`)") and "\n" not in msg


def test_bad_ac_layers_fails_cleanly_from_the_command_line(tmp_path, capsys):
    from test_build_fakes import lock_for

    from llmc.runtime.entry import main

    lock = lock_for(_spec(), plan={"activation_checkpointing": "partial", "ac_layers": -2})
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    assert main(["--lock", str(tmp_path / "plan.lock.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert "error[R002]" in err and "ac_layers >= 1, got -2" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
