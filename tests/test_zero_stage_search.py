"""The ZeRO stages the search offers, the stage a plan names, and P004 hints that do not fit on their own.

1. DeepSpeed runs ZeRO-1 (BF16_Optimizer: a replicated fp32 gradient, reduced once per step) and ZeRO-2 (fp32
   gradient partitions, reduced every micro-batch) as different stages: the search tries 1, 2 and 3 there, and a
   searched ZeRO-2 is what deepspeed/ds_config.json runs (Llama 3 8B on 16 H100s: ZeRO-2 fits and beats ZeRO-3, which
   the search chose when it never tried 2).
2. FSDP2 (torchtitan, native) has no ZeRO-1: a ``zero_stage: 1`` pin runs as ZeRO-2 (P021), and the plan names the
   stage that runs: the plan, the lock and the emitted jobs are those of ``zero_stage: 2``.
3. P004's hints that fit on their own come first; one that helps but does not fit on its own says it is still over
   the usable memory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler import timing
from llmc.compiler.checks import _Hint, _hint_list
from llmc.compiler.compile import compile_spec
from llmc.compiler.search import usable_bytes, zero_stages
from llmc.compiler.units import gib
from llmc.emit.deepspeed import deepspeed_config, zero_stage_for
from llmc.overrides import load_with_overrides, parse_override
from llmc.runtime.job import TrainJob

ROOT = Path(__file__).resolve().parent.parent
EX8 = ROOT / "examples" / "llama3_8b_h100x8.yaml"
EX70 = ROOT / "examples" / "llama3_70b_h100x64.yaml"
DS16 = ("training.backend=deepspeed", "hardware.count=16")
# Llama 3 8B's parameters (meta-llama/Meta-Llama-3-8B safetensors: 8,030,261,248)
P8B = 8_030_261_248


def _compile(path: Path, *sets: str):
    run, lines, raw = load_with_overrides(path, [parse_override(s) for s in sets])
    return compile_spec(run, str(path), lines, spec_bytes=raw)


def _errors(c) -> set[str]:
    return {d.code for d in c.diagnostics if d.severity == "error"}


def _p004_hints(c) -> list[str]:
    """P004's hints ("try a; b; c", split at the semicolons outside parentheses: test_p004_hints._split)."""
    from test_p004_hints import _split

    (d,) = [d for d in c.diagnostics if d.code == "P004"]
    return _split(d.hint)


# ------------------------------------------------------------------------------------------- 1. DeepSpeed ZeRO-2


def test_deepspeed_searches_zero2_and_its_config_runs_it():
    assert zero_stages(None, 16, False, "deepspeed") == (1, 2, 3)
    c = _compile(EX8, *DS16)
    p = c.plan
    assert p is not None and p.zero_stage == 2 and p.dp_shard == 16, p
    # the same plan as pinning 2; faster than ZeRO-3 (the stage the search chose without 2); ZeRO-1 does not fit
    z2 = _compile(EX8, *DS16, "parallelism.zero_stage=2")
    z3 = _compile(EX8, *DS16, "parallelism.zero_stage=3")
    z1 = _compile(EX8, *DS16, "parallelism.zero_stage=1")
    assert z2.plan == p and z2.time.step_seconds == c.time.step_seconds
    assert z3.plan is not None and c.time.step_seconds < z3.time.step_seconds
    assert z1.plan is None and "P004" in _errors(z1)
    (line,) = [r for r in c.reasons if r.startswith("ZeRO stage ")]
    assert line.startswith("ZeRO stage 2;") and "1: does not fit" in line and "3: +" in line, line
    # what each stage holds of the gradients, from DeepSpeed 0.19.8's own buffers: ZeRO-2 the fp32 gradient partition
    # (stage_1_and_2.py averaged_gradients, 4 B per parameter over the 16 ranks); ZeRO-1 BF16_Optimizer's replicated
    # bf16 .grad and fp32 fp32_groups_gradients_flat (2 + 4 B per parameter on every rank)
    assert c.memory.breakdown["grads"] == pytest.approx(4 * P8B / 16, rel=1e-9)
    assert z1.unfit.memory.breakdown["grads"] == pytest.approx(6 * P8B, rel=1e-9)
    # ... and the time model tells them apart too (ZeRO-2 reduces every micro-batch), unlike FSDP2's 1 and 2
    sm = timing.step_model(c.spec.model, c.spec.data.seq_len, c.spec.training.precision, c.gpu, "deepspeed",
                           compile=c.backend.compile)
    assert timing.step_time(sm, dataclasses.replace(p, zero_stage=1))[0] != timing.step_time(sm, p)[0]
    # the DeepSpeed config runs the searched stage: ZeRO-2's keys, none of ZeRO-3's
    assert zero_stage_for(c) == 2
    cfg, diags = deepspeed_config(c)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_scatter"] is True and not [k for k in zero if k.startswith("stage3")]
    assert not [d for d in diags if d.severity == "error"]
    run = c.backend_runs["deepspeed"]
    assert run.plan == p and run.per_gpu_bytes == c.memory.per_gpu_bytes


# ------------------------------------------------------------------------------------------- 2. ZeRO-1 on FSDP2


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _build(runner: CliRunner, out: Path, *sets: str) -> dict:
    args = ["build", str(EX8), "-o", str(out)]
    for s in sets:
        args += ["--set", s]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads((out / "plan.lock.json").read_text())


def _job_files(out: Path) -> dict[str, list[str]]:
    """The files that run the plan's pre-training on torchtitan and the native trainer, less the lines that name the
    spec's overrides and hash."""
    return {str(f.relative_to(out)): [ln for ln in f.read_text().splitlines()
                                      if "sha256" not in ln and "overrides" not in ln]
            for d in ("native", "torchtitan", "launch") for f in sorted((out / d).rglob("*")) if f.is_file()}


@pytest.mark.parametrize("backend", ["native", "torchtitan"])
def test_a_zero1_pin_on_fsdp2_plans_and_builds_the_zero2_job(runner, tmp_path, backend):
    base = (f"training.backend={backend}", "hardware.count=16")
    one = _build(runner, tmp_path / "z1", *base, "parallelism.zero_stage=1")
    two = _build(runner, tmp_path / "z2", *base, "parallelism.zero_stage=2")
    assert one["plan"]["zero_stage"] == 2 and one["plan"] == two["plan"]
    for key in ("memory", "time", "alternatives"):
        assert one[key] == two[key], key
    assert one["backend_runs"][backend] == two["backend_runs"][backend]
    assert _job_files(tmp_path / "z1") == _job_files(tmp_path / "z2")
    # the native trainer's job, read from each lock as llmc.runtime does: the same but for the spec it came from
    jobs = [dataclasses.asdict(TrainJob.from_lock(lk, build_dir=tmp_path / d)) for lk, d in ((one, "z1"), (two, "z2"))]
    assert jobs[0]["zero_stage"] == 2
    assert {k: v for k, v in jobs[0].items() if k not in ("spec", "lock")} == \
        {k: v for k, v in jobs[1].items() if k not in ("spec", "lock")}
    # P021 says the pin runs, and is planned, as ZeRO-2; llmc's DeepSpeed runner still runs ZeRO-1 itself
    (info,) = [d for d in one["diagnostics"] if d["code"] == "P021"]
    assert "runs as ZeRO-2, and the plan says so (zero2)" in info["message"]
    assert not [d for d in two["diagnostics"] if d["code"] == "P021"]
    ds = [json.loads((tmp_path / d / "deepspeed" / "ds_config.json").read_text()) for d in ("z1", "z2")]
    assert [c["zero_optimization"]["stage"] for c in ds] == [1, 2]
    # the plan's words name the stage that runs
    r = runner.invoke(app, ["plan", str(EX8), *[a for s in (*base, "parallelism.zero_stage=1") for a in ("--set", s)]])
    assert r.exit_code == 0, r.output
    plan_part = " ".join(r.output.split("Diagnostics")[0].split())
    assert f"{backend}'s ZeRO-2" in plan_part and "ZeRO-1" not in plan_part and " zero1 " not in plan_part
    assert "zero_stage=1 (runs as 2)" in plan_part  # (the pins line: the spec's pin, and what runs)


def test_a_zero1_pin_on_fsdp2_is_named_as_pinned_in_p004():
    """Llama 3 70B on 64 H100s, native, pinned ZeRO-1 (run as 2): the hint names the pinned 1, and never offers 2
    (what already runs)."""
    c = _compile(EX70, "training.backend=native", "parallelism.zero_stage=1")
    assert c.plan is None and c.unfit.plan.zero_stage == 2
    hints = _p004_hints(c)
    assert not [h for h in hints if h.startswith("parallelism.zero_stage 2")], hints
    assert [h for h in hints if h.startswith("parallelism.zero_stage 3 instead of the pinned zero_stage 1")], hints


# ------------------------------------------------------------------------------------------- 3. P004's hints


def test_a_hint_that_does_not_fit_alone_says_so_after_those_that_fit():
    """The review's case: DeepSpeed pinned to ZeRO-1 on 16 H100s offered "a shorter seq_len than 8192 (4,096: about
    75.9 GiB per GPU)" against 75.2 GiB usable as if it were a way out, and seq_len 4096 still does not plan. The
    hints that fit alone (zero_stage 2, more GPUs, offload, a larger GPU) come first and each plans; the seq_len one
    comes last and says it is still over the usable memory."""
    sets = (*DS16, "parallelism.zero_stage=1")
    c = _compile(EX8, *sets)
    usable = usable_bytes(c.gpu.hbm_bytes, "deepspeed")
    hints = _p004_hints(c)
    *fitting, last = hints
    assert last == (f"a shorter seq_len than 8192 (4,096: about 75.9 GiB per GPU, still over the {gib(usable)} usable: "
                    "combine it with another change)"), hints
    short = _compile(EX8, *sets, "data.seq_len=4096")  # applied alone: still no plan, over the usable memory
    assert short.plan is None and "P004" in _errors(short)
    assert short.unfit.memory.per_gpu_bytes > usable
    applied = {"parallelism.zero_stage 2": ("parallelism.zero_stage=2",),
               "more GPUs: hardware.count 32": ("hardware.count=32",),
               "CPU optimizer offload": ("parallelism.offload_optimizer=true",),
               "a GPU with more memory (h100-hbm2e-96g": ("hardware.gpu=h100-hbm2e-96g",)}
    assert len(fitting) == len(applied), hints
    for h in fitting:  # each, applied alone, plans
        assert "still over" not in h
        (extra,) = [v for k, v in applied.items() if h.startswith(k)]
        again = _compile(EX8, *sets, *extra)
        assert again.plan is not None and "P004" not in _errors(again), h


def test_hints_that_do_not_fit_alone_say_so_where_none_fits():
    """Llama 3 70B on 8 B300s, DeepSpeed pinned to ZeRO-1 and dp_shard 8: ZeRO-3, full recomputation and CPU offload
    each help but none fits alone; each says it is still over the usable memory. More GPUs are no hint: the pinned
    shard group stays, and DeepSpeed runs no tp / pp / cp to use them for."""
    sets = ("hardware.gpu=b300", "hardware.count=8", "parallelism.dp_shard=8", "training.backend=deepspeed",
            "parallelism.zero_stage=1")
    c = _compile(EX70, *sets)
    usable = usable_bytes(c.gpu.hbm_bytes, "deepspeed")
    hints = _p004_hints(c)
    assert not [h for h in hints if h.startswith("more GPUs")], hints
    over = hints
    assert over and all(f"still over the {gib(usable)} usable: combine it with another change)" in h for h in over)
    for h in over:  # each quotes a need above the usable memory
        need = float(h.split("about ")[1].split(" GiB")[0])
        assert need > float(gib(usable).split()[0]), h
    z3 = _compile(EX70, *sets[:-1], "parallelism.zero_stage=3")  # one of them applied: still no plan
    assert z3.plan is None and "P004" in _errors(z3)


def test_hint_order_fits_first():
    hints = [_Hint("c (about 9 GiB per GPU)", False, 8.0 * 2**30), _Hint("a", True), _Hint("b (not evaluated)", None),
             _Hint("d", True)]
    assert _hint_list(hints) == ["a", "d", "b (not evaluated)",
                                 "c (about 9 GiB per GPU, still over the 8.0 GiB usable: combine it with another change)"]
    assert _hint_list(hints[:1] + hints[2:3]) == [
        "b (not evaluated)", "c (about 9 GiB per GPU, still over the 8.0 GiB usable: combine it with another change)"]
