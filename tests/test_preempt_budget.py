"""A preemption's time: after a SIGTERM / SIGUSR1 a job finishes its step and saves it before torchrun's
TORCH_ELASTIC_SHUTDOWN_TIMEOUT runs out. The plan predicts that save (``checkpoint_cost``, "Preemption") and every
launch script gives torchrun the time it sized from it."""

from __future__ import annotations

import json
import re

import pytest
from test_build_fakes import ROOT, compile_example
from typer.testing import CliRunner

from llmc.cli import app

# published parameter counts (Meta's Llama 3 / 3.1 model cards: 8.03B, 70.6B), not llmc's own count
LLAMA3_8B, LLAMA3_70B = 8.03e9, 70.6e9
DCP = 12  # bytes per parameter in torchtitan's / llmc's checkpoint: fp32 weights + AdamW exp_avg + exp_avg_sq
GBPS = 1e9  # the hardware table's checkpoint storage figure, 1 GB/s per node (no write_gbps in these specs)


@pytest.mark.parametrize("example, save", [
    # one node of 8 GPUs, synchronous saves (torchtitan): the whole state written by that node
    ("llama3_8b_h100x8", DCP * LLAMA3_8B / GBPS),
    # 8 nodes, asynchronous saves: the save still writing is waited for, then the current step is written in full;
    # each node writes an eighth of the state
    ("llama3_70b_h100x64", 2 * DCP * LLAMA3_70B / 8 / GBPS),
])
def test_a_preemption_save_is_the_state_a_node_writes_over_its_storage_bandwidth(example, save):
    c = compile_example(ROOT / "examples" / f"{example}.yaml")
    p = c.preemption
    assert p.job == "pre-training"
    assert p.save_seconds == pytest.approx(save, rel=0.005)
    assert p.needed_seconds == pytest.approx(p.step_seconds + p.save_seconds)
    assert p.step_seconds == pytest.approx(c.time.step_seconds)
    # torchrun's time covers the step and the save with a margin, and the Slurm signal comes earlier still
    assert p.shutdown_seconds >= 1.5 * p.needed_seconds > 100
    assert p.signal_lead_seconds > p.shutdown_seconds


def test_a_post_training_stage_without_periodic_saves_still_saves_on_a_signal(tmp_path):
    """DPO / GRPO on llmc's loop save what a periodic save holds (the trainable parameters and their AdamW state)
    when a signal stops them, also where their steps leave no periodic save (an interval longer than every stage,
    pinned here); on one node of 8 ranks the node writes the whole state and each rank hashes its eighth (llmc's
    trainer re-reads and hashes what it wrote, at 1 GB/s)."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    text = (ROOT / "examples" / "pipeline_llama3_8b.yaml").read_text()  # (its paths are absolute)
    pinned = text.replace("training:\n", "training:\n  checkpoint: {interval_steps: 100000}\n", 1)
    assert pinned != text
    run, lines = loads_spec(pinned, file="pipeline.yaml")
    c = compile_spec(run, "pipeline.yaml", lines)
    for kind in ("dpo", "grpo"):
        ck = next(s for s in c.stages if s.kind == kind).time.checkpoint
        assert ck.periodic is None
        assert ck.preempt_seconds == pytest.approx(DCP * LLAMA3_8B / GBPS * (1 + 1 / 8), rel=0.005)
    jobs = [s for s in c.stages if s.time is not None and s.time.checkpoint is not None]
    slowest = max(jobs, key=lambda s: s.time.step_seconds + s.time.checkpoint.preempt_seconds)
    assert c.preemption.job == slowest.name


def test_a_lora_stage_signalled_in_its_last_step_has_time_for_its_final_save():
    """A post-training stage takes no signal in its last step: it ends with its final save, the merged weights
    (4 B per parameter of Llama 3 70B: 282 GB), far larger than a QLoRA stage's adapters; the launchers' time covers
    the step and that save."""
    c = compile_example(ROOT / "examples" / "pipeline_llama3_70b_qlora.yaml")
    p = c.preemption
    for s in c.stages:
        ck = s.time.checkpoint
        assert ck.final is not None and ck.final.state_bytes == pytest.approx(4 * LLAMA3_70B, rel=0.005)
        assert ck.preempt_seconds >= ck.final.total_seconds
        assert p.shutdown_seconds >= 1.5 * (s.time.step_seconds + ck.final.total_seconds)


def test_a_hand_edited_lock_without_the_figures_launches_with_the_floor(tmp_path):
    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["build", str(ROOT / "examples" / "llama3_8b_h100x8.yaml"), "-o", str(out)]
                              ).exit_code == 0
    lock = json.loads((out / "plan.lock.json").read_text())
    lock["preemption"].update(shutdown_seconds=None, signal_lead_seconds=None)
    (out / "plan.lock.json").write_text(json.dumps(lock))
    r = CliRunner().invoke(app, ["launch", str(out), "--dry-run", "--force"])
    assert r.exit_code == 0 and "INTERNAL" not in r.output, r.output


def test_every_launch_script_gives_torchrun_the_planned_shutdown_time(tmp_path):
    """The build's scripts that start torchrun (llmc's runtime, torchtitan's jobs, DeepSpeed, Slurm) all export the
    plan's TORCH_ELASTIC_SHUTDOWN_TIMEOUT (torchrun's own default is 30 s), unless the environment sets one; the
    Slurm script asks for its signal the plan's lead before the time limit."""
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(ROOT / "examples" / "pipeline_llama3_8b.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    p = json.loads((out / "plan.lock.json").read_text())["preemption"]
    assert p["shutdown_seconds"] > 100  # the launchers' fixed figure before the plan sized it
    # every script that runs torchrun itself (torchtitan's sbatch scripts run its run_multi_node scripts under srun)
    scripts = [f for f in sorted(out.rglob("*")) if f.suffix in (".sh", ".sbatch")
               and re.search(r"^[^#]*\btorchrun\b", f.read_text(), re.M) and not f.name.startswith("slurm")
               or f == out / "launch" / "slurm.sbatch"]
    names = {str(f.relative_to(out)) for f in scripts}
    assert {"native/launch.sh", "launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh",
            "launch/slurm.sbatch"} <= names and any(n.startswith("torchtitan/run_") for n in names), names
    export = f'export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{p["shutdown_seconds"]}}}"'
    for f in scripts:
        assert export in f.read_text(), f
    assert f"#SBATCH --signal=B:USR1@{p['signal_lead_seconds']}\n" in (out / "launch" / "slurm.sbatch").read_text()


def test_the_report_says_what_a_preemption_needs():
    from llmc.report import render_text

    c = compile_example(ROOT / "examples" / "llama3_8b_h100x8.yaml")
    text = render_text(c)
    p = c.preemption
    assert f"{p.shutdown_seconds} s after the signal" in " ".join(text.split())
    assert f"--signal=B:USR1@{p.signal_lead_seconds}" in text.replace("\n ", " ")
