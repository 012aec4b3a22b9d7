"""Every backend a build can launch is checked against its memory, and ZeRO pins FSDP2 cannot express are said.

1. A build planned for one backend also writes the launchers of the others. The compiler sizes each backend's run
   of pre-training once (``Compiled.backend_runs``, the lock's ``backend_runs``): ``native/launch.sh`` and the build
   warn (X115) when the native run does not fit the GPU, and ``llmc launch --backend X`` warns (L015, not refuses)
   when X's run does not fit. The figure is checked against an independent path: ``llmc plan`` for the native
   backend with the build's layout pinned (the memory model the native plan itself uses).
2. ``zero_stage: 1`` on torchtitan: FSDP2 shards gradients with the optimizer states whenever it shards
   (torchtitan docs/fsdp.md: reshard_after_forward=False is SHARD_GRAD_OP, ZeRO-2), so the pin runs as ZeRO-2: an
   info (P021) says so, and the plan's memory is the stage-2 pin's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "llama3_70b_h100x64.yaml"
TINY = ROOT / "examples" / "tiny_cpu.yaml"  # fits on every backend
GIB = 2**30


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _build(runner: CliRunner, out: Path, backend: str, spec: Path = SPEC) -> tuple[str, dict]:
    r = runner.invoke(app, ["build", str(spec), "-o", str(out), "--set", f"training.backend={backend}"])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((out / "plan.lock.json").read_text())


def _plan_json(runner: CliRunner, *sets: str, fit_check: bool = True, spec: Path = SPEC) -> dict:
    args = ["plan", str(spec), "--format", "json"]
    for s in sets:
        args += ["--set", s]
    if not fit_check:
        args.append("--no-fit-check")
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _native_plan_bytes(runner: CliRunner, plan: dict, spec: Path = SPEC) -> tuple[int, int]:
    """(per-GPU bytes, capacity) of `llmc plan --set training.backend=native` with the build's layout pinned."""
    d = _plan_json(runner, "training.backend=native", f"parallelism.tp={plan['tp']}",
                   f"parallelism.dp_shard={plan['dp_shard']}", f"parallelism.dp_replicate={plan['dp_replicate']}",
                   f"parallelism.micro_batch={plan['micro_batch']}", f"parallelism.zero_stage={plan['zero_stage']}",
                   f"parallelism.activation_checkpointing={plan['activation_checkpointing']}", fit_check=False,
                   spec=spec)
    got = d["plan"]
    for k in ("tp", "dp_shard", "dp_replicate", "micro_batch", "grad_accum", "zero_stage", "activation_checkpointing",
              "loss_chunk_tokens"):
        assert got[k] == plan[k], (k, got[k], plan[k])  # the very layout the build's native launcher runs
    return int(d["memory"]["per_gpu_bytes"]), int(d["memory"]["capacity_bytes"])


def test_torchtitan_build_warns_that_its_native_run_does_not_fit(runner, tmp_path):
    out = tmp_path / "b"
    output, lock = _build(runner, out, "torchtitan")
    plan = lock["plan"]
    assert (plan["tp"], plan["dp_shard"], plan["micro_batch"]) == (4, 16, 2)
    need, cap = _native_plan_bytes(runner, plan)
    assert need > 0.95 * cap  # llmc's own native plan of this layout does not fit an H100
    figure = f"{need / GIB:.1f} GiB"  # llmc.compiler.units.gib
    # the compiler's figure, recorded once in the lock, is the native plan's
    run = lock["backend_runs"]["native"]
    assert run["per_gpu_bytes"] == need and run["capacity_bytes"] == cap and run["fits"] is False
    assert run["usable_bytes"] == int(0.95 * cap)  # backends.PROFILE_HEADROOM, what the plan calls "usable"
    # the build says it, and so does native/launch.sh's header
    x115 = [ln for ln in output.splitlines() if "warning[X115]" in ln]
    assert len(x115) == 1 and "the native run" in x115[0] and figure in x115[0], output
    header = (out / "native" / "launch.sh").read_text().split("set -euo pipefail")[0]
    assert "warning[X115]" in header and figure in header
    # ... and not the DeepSpeed launcher's (X103 says its own run's figure there)
    assert "X115" not in (out / "deepspeed" / "launch.sh").read_text()
    # `llmc launch --backend native` warns before it starts (and still starts: exit 0, the commands printed)
    r = runner.invoke(app, ["launch", str(out), "--backend", "native", "--dry-run"])
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.output.splitlines() if "warning[L015]" in ln]
    assert len(warn) == 1 and "native" in warn[0] and figure in warn[0], r.output
    assert "llmc.runtime.entry --lock" in r.output
    # the planned backend's run fits: no warning
    r = runner.invoke(app, ["launch", str(out), "--backend", "torchtitan", "--dry-run"])
    assert r.exit_code == 0 and "L015" not in r.output, r.output


def test_launching_deepspeed_says_the_x103_figure(runner, tmp_path):
    """The DeepSpeed run's figure is the one X103 quotes (one computation, the lock's backend_runs)."""
    out = tmp_path / "b"
    output, lock = _build(runner, out, "torchtitan")
    ds = lock["backend_runs"]["deepspeed"]
    figure = f"{ds['per_gpu_bytes'] / GIB:.1f} GiB"
    assert ds["fits"] is False and f"it needs {figure} per GPU" in output
    r = runner.invoke(app, ["launch", str(out), "--backend", "deepspeed", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "warning[L015]" in r.output and figure in r.output


def test_a_fitting_build_gets_no_native_warning(runner, tmp_path):
    out = tmp_path / "b"
    output, lock = _build(runner, out, "torchtitan", spec=TINY)
    run = lock["backend_runs"]["native"]
    need, cap = _native_plan_bytes(runner, lock["plan"], spec=TINY)
    assert run["planned"] is False and run["fits"] is True and need <= 0.95 * cap
    assert run["per_gpu_bytes"] == need
    # the planned backend's run is the plan's own memory
    assert lock["backend_runs"]["torchtitan"]["per_gpu_bytes"] == lock["memory"]["per_gpu_bytes"]
    assert "X115" not in output and "X115" not in (out / "native" / "launch.sh").read_text()
    for backend in ("native", "torchtitan", "deepspeed"):
        r = runner.invoke(app, ["launch", str(out), "--backend", backend, "--dry-run"])
        assert r.exit_code == 0 and "L015" not in r.output, r.output


def test_zero1_on_torchtitan_runs_and_is_sized_as_zero2(runner):
    z1 = _plan_json(runner, "training.backend=torchtitan", "parallelism.zero_stage=1")
    z2 = _plan_json(runner, "training.backend=torchtitan", "parallelism.zero_stage=2")
    (info,) = [d for d in z1["diagnostics"] if d["code"] == "P021"]
    assert info["severity"] == "info" and info["path"] == "parallelism.zero_stage"
    assert "runs as ZeRO-2" in info["message"] and "torchtitan" in info["message"]
    assert not [d for d in z2["diagnostics"] if d["code"] == "P021"]
    # the same layout, the same memory as the stage-2 pin
    strip = ("zero_stage",)
    assert {k: v for k, v in z1["plan"].items() if k not in strip} == {k: v for k, v in z2["plan"].items()
                                                                       if k not in strip}
    assert z1["memory"] == z2["memory"]
    # what runs is ZeRO-2: the fp32 gradients sharded as the AdamW moments are (4 B vs 8 B per parameter, over the
    # same FSDP group), not replicated as ZeRO-1 would keep them
    b = z1["memory"]["breakdown"]
    assert b["grads"] == pytest.approx(b["optimizer"] / 2, rel=1e-9)
    assert z1["time"]["step_seconds"] == z2["time"]["step_seconds"]
    # llmc's DeepSpeed runner runs ZeRO-1 itself: nothing to say there
    ds = _plan_json(runner, "training.backend=deepspeed", "parallelism.zero_stage=1", fit_check=False)
    assert ds["plan"]["zero_stage"] == 1 and not [x for x in ds["diagnostics"] if x["code"] == "P021"]

