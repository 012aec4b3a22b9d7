"""Partial activation checkpointing (plan ``activation_checkpointing="partial"``, ``ac_layers`` = K) in the emitted
torchtitan job: the job's ``PartialFullAC`` wraps the first K blocks of ``model.layers`` of every model chunk exactly
as torchtitan's ``FullAC`` does and leaves the rest alone (Megatron-LM's ``--recompute-method block
--recompute-num-layers K``). Checked against torchtitan itself: its ``FullAC`` wrapping, its pipeline split
(``_split_module``), its config loader (``ConfigManager``) and its trainer on CPU."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest

from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import SpecError
from llmc.emit.torchtitan import render_torchtitan

sys.path.insert(0, str(Path(__file__).parent))  # the sibling test helpers (also on sys.path under pytest)
from test_torchtitan_render import compiled_for  # noqa: E402

JOB = "torchtitan/llmc_job.py"


def _plan(ac="partial", ac_layers=2, **kw) -> ParallelPlan:
    return ParallelPlan(**{"dp_shard": 8, "micro_batch": 2, "grad_accum": 2, **kw},
                        activation_checkpointing=ac, ac_layers=ac_layers)


# ------------------------------------------------------------------------------------ rendering (no torch)


def test_partial_renders_the_policy_with_k_and_other_modes_do_not():
    import ast

    src = render_torchtitan(compiled_for(plan=_plan(ac_layers=3)), strict=True)[JOB]
    tree = ast.parse(src)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PartialFullAC")
    assert [ast.unparse(b) for b in cls.bases] == ["FullAC"]
    assert "recompute-method block" in ast.get_docstring(cls)
    assert src.count("activation_checkpoint=PartialFullAC.Config(layers=3)") == 1
    assert "SelectiveAC" not in src  # tidy_imports dropped the unused import
    for mode, line in (("full", "activation_checkpoint=FullAC.Config()"),
                       ("selective", "activation_checkpoint=SelectiveAC.Config()"),
                       ("none", "activation_checkpoint=None")):
        other = render_torchtitan(compiled_for(plan=_plan(ac=mode, ac_layers=0)), strict=True)[JOB]
        assert "PartialFullAC" not in other and line in other, mode


@pytest.mark.parametrize("bad", [0, -1, None])
def test_partial_without_a_positive_layer_count_is_x312(bad):
    with pytest.raises(SpecError) as e:
        render_torchtitan(compiled_for(plan=_plan(ac_layers=bad)), strict=True)
    d = e.value.diagnostics[0]
    assert d.code == "X312" and d.path == "parallelism.ac_layers"


# ------------------------------------------------------------------------ the emitted policy on a toy model


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The emitted job module of a partial-AC plan (K = 2), imported."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    import importlib
    import os

    out = tmp_path_factory.mktemp("partial_job")
    (out / "torchtitan").mkdir()
    (out / JOB).write_text(render_torchtitan(compiled_for(plan=_plan(ac_layers=2)), strict=True)[JOB])
    old = os.environ.get("LLMC_RUN_DIR")
    os.environ["LLMC_RUN_DIR"] = str(out / "run")
    sys.path.insert(0, str(out / "torchtitan"))
    sys.modules.pop("llmc_job", None)
    try:
        yield importlib.import_module("llmc_job"), out / JOB
    finally:
        sys.path.remove(str(out / "torchtitan"))
        sys.modules.pop("llmc_job", None)
        if old is None:
            os.environ.pop("LLMC_RUN_DIR", None)
        else:
            os.environ["LLMC_RUN_DIR"] = old


def _toy(n=4, d=8):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
            self.calls = 0  # forward runs: 2 per step when the block is recomputed in backward

        def forward(self, x):
            self.calls += 1
            return x + self.w2(torch.nn.functional.gelu(self.w1(x)))

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({str(i): Block() for i in range(n)})

        def forward(self, x):
            for b in self.layers.values():
                x = b(x)
            return x

    torch.manual_seed(0)
    return Toy()


def _wrapped(model) -> list[str]:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    return [k for k, b in model.layers.items() if isinstance(b, CheckpointWrapper)]


def _inner(block):
    return getattr(block, "_checkpoint_wrapped_module", block)


def test_first_k_blocks_wrapped_recomputed_and_gradients_unchanged(job):
    import torch
    from torchtitan.components.checkpointer.utils import canonical_fqn
    from torchtitan.distributed.activation_checkpoint import FullAC

    mod, _ = job
    cfg = mod.PartialFullAC.Config(layers=2)
    assert isinstance(cfg, FullAC.Config)  # what torchtitan's union and isinstance checks see
    policy = cfg.build(dump_folder="")  # Configurable wires build() to the subclass
    assert type(policy) is mod.PartialFullAC and policy.config.layers == 2

    model = _toy()
    ref = copy.deepcopy(model)
    policy.apply(model)
    assert _wrapped(model) == ["0", "1"]
    assert list(model.layers) == ["0", "1", "2", "3"]  # order and keys kept
    # wrapped exactly as torchtitan's FullAC wraps a block
    full = _toy()
    FullAC.Config().build(dump_folder="").apply(full)
    for k in ("0", "1"):
        a, b = model.layers[k], full.layers[k]
        assert type(a) is type(b) and a.checkpoint_impl == b.checkpoint_impl
        assert a.checkpoint_fn.keywords == b.checkpoint_fn.keywords  # preserve_rng_state, determinism_check, ...
    for k in ("2", "3"):
        assert type(model.layers[k]) is type(ref.layers[k])

    x = torch.randn(3, 5, 8)
    ref(x).pow(2).mean().backward()
    model(x).pow(2).mean().backward()
    # recomputation happened on the wrapped blocks only
    assert [_inner(b).calls for b in model.layers.values()] == [2, 2, 1, 1]
    assert [b.calls for b in ref.layers.values()] == [1, 1, 1, 1]
    got = {canonical_fqn(n): p.grad for n, p in model.named_parameters()}
    want = {n: p.grad for n, p in ref.named_parameters()}
    assert got.keys() == want.keys()  # checkpoint FQNs as without AC
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)


def test_every_pipeline_chunk_wraps_its_own_first_k(job):
    """torchtitan's pipeline split keeps each stage's blocks under their global keys; the policy is applied per
    chunk (pipeline_llm calls parallelize_fn on each), so K counts from each chunk's first block."""
    from torchtitan.distributed.pipeline_parallel import _split_module

    mod, _ = job
    whole = _toy(n=6)
    stages = [["layers.0", "layers.1", "layers.2"], ["layers.3", "layers.4", "layers.5"]]
    chunks = [_split_module(whole, names) for names in stages]
    for c in chunks:
        mod.PartialFullAC.Config(layers=2).build(dump_folder="").apply(c)
    assert [_wrapped(c) for c in chunks] == [["0", "1"], ["3", "4"]]
    # K above a chunk's block count wraps the whole chunk (Megatron: every layer of the stage); the same policy
    # object applied twice counts from zero each time
    policy = mod.PartialFullAC.Config(layers=5).build(dump_folder="")
    small = [_split_module(_toy(n=4), names) for names in (["layers.0", "layers.1"], ["layers.2", "layers.3"])]
    for c in small:
        policy.apply(c)
    assert [_wrapped(c) for c in small] == [["0", "1"], ["2", "3"]]
    with pytest.raises(ValueError, match="at least 1"):
        mod.PartialFullAC.Config(layers=0)


def test_seeded_init_of_the_real_model_is_the_same_as_without_ac(job):
    """torchtitan's init walk (Module.init_states) queues a checkpoint wrapper's block behind the unwrapped
    blocks; the policy keeps the block order, so the job's seeded initial weights are those of the same job without
    activation checkpointing, as they are with torchtitan's FullAC."""
    import torch
    from torchtitan.components.checkpointer.utils import canonical_fqn
    from torchtitan.distributed.activation_checkpoint import FullAC

    mod, _ = job

    def init(policy):
        cfg = mod.job_without_converters().model_spec.model
        with torch.device("meta"):
            model = cfg.build()
        if policy is not None:
            policy.build(dump_folder="").apply(model)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        return model, {canonical_fqn(n): p.detach().clone() for n, p in model.named_parameters()}

    _, ref = init(None)
    assert len([n for n in ref if n.endswith("attention_norm.weight")]) == 4  # the 4-block tiny model
    _, full = init(FullAC.Config())
    for k in (1, 2, 3):
        model, got = init(mod.PartialFullAC.Config(layers=k))
        assert _wrapped(model) == [str(i) for i in range(k)]
        assert got.keys() == ref.keys() == full.keys()
        for n in ref:
            assert torch.equal(got[n], ref[n]) and torch.equal(full[n], ref[n]), (k, n)


def test_torchtitans_config_manager_keeps_the_policy(job, monkeypatch):
    """``--module llmc_job --config job`` through torchtitan's own loader (tyro over the trainer config): the
    partial policy survives as the ``activation-checkpoint:full`` choice, K can be overridden there, and the
    trainer config's own checks pass."""
    from test_torchtitan import load_job
    from torchtitan.distributed.activation_checkpoint import FullAC

    _, module = job
    monkeypatch.setenv("LLMC_RUN_DIR", str(module.parent.parent / "run"))
    for extra, k in (((), 2), (("activation-checkpoint:full", "--activation-checkpoint.layers", "3"), 3)):
        ac = load_job(module, extra=extra).activation_checkpoint
        assert type(ac).__qualname__ == "PartialFullAC.Config" and isinstance(ac, FullAC.Config)
        assert ac.layers == k
        assert type(ac.build(dump_folder="")).__name__ == "PartialFullAC"


# ------------------------------------------------------------------------------- torchtitan's trainer on CPU


@pytest.mark.slow
def test_partial_ac_trains_pipelined_on_two_gloo_ranks_like_no_ac(tmp_path):
    """pp 2 (1F1B, blocks 0-1 | 2-3) with K = 1 on 2 gloo ranks: each stage wraps only its first block (rank 0
    layers.0, rank 1 layers.2), and the losses equal the same job without activation checkpointing
    (recomputation changes no number)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from test_torchtitan import OFFLINE, _tiny_family_build, losses, run_logged, write_build

    from llmc.runtime.titan_launch import torchtitan_command

    pp = {"pp": 2, "pp_schedule": "1F1B", "micro_batch": 2, "grad_accum": 2}
    module, run = _tiny_family_build(tmp_path / "partial", {}, ParallelPlan(
        **pp, activation_checkpointing="partial", ac_layers=1))
    assert "PartialFullAC.Config(layers=1)" in module.read_text()
    # the same job without AC, reading the same tokenizer and data
    data = {"seq_len": 64, "tokens": 1e6, "sources": [
        {"name": "web", "path": str(tmp_path / "partial" / "corpus"), "format": "parquet", "text_field": "body"}]}
    from test_torchtitan_render import TINY

    none = write_build(compiled_for(model=TINY, plan=ParallelPlan(**pp), gpu="cpu", seq=64, steps=8, lr=3e-3,
                                    warmup=1, data=data), tmp_path / "none")
    assert "activation_checkpoint=None" in none.read_text()
    extra = ["--metrics.log_freq", "1", "--checkpoint.no-enable", "--training.steps", "4"]
    got = {}
    for name, m in (("partial", module), ("none", none)):
        argv, env = torchtitan_command(m, 2, True, extra, run_dir=run)
        rc, log, dt = run_logged(argv, {**OFFLINE, **env}, run)
        assert rc == 0, log[-3000:]
        got[name] = losses(log)
        print(f"{name}: {dt:.1f}s, losses {got[name]}")
        said = sorted({ln.split("PartialFullAC: ", 1)[1].strip() for ln in log.splitlines() if "PartialFullAC: " in ln})
        if name == "partial":
            assert said == ["full activation checkpointing of 1 of 2 blocks of this model chunk: ['layers.0']",
                            "full activation checkpointing of 1 of 2 blocks of this model chunk: ['layers.2']"], said
        else:
            assert said == []
    assert sorted(got["partial"]) == [1, 2, 3, 4] and all(math.isfinite(v) for v in got["partial"].values())
    assert got["partial"] == got["none"]
