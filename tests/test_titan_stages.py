"""Continued-training stages of a torchtitan run as their own torchtitan jobs: the stage's searched layout (TP / PP /
CP like pre-training), its memory and time, the job module the emitter writes for it, and how `llmc launch`, the
launchers and llmc's own trainers treat it. The job itself runs on CPU in tests/test_torchtitan.py (slow)."""

from __future__ import annotations

import subprocess

import pytest
from test_build_fakes import compile_text

from llmc.buildfs import write_build
from llmc.compiler import memory, timing
from llmc.compiler.hardware import get_gpu
from llmc.emit import render_artifacts
from llmc.launch import launch_commands

SPEC = """\
name: lc70
model: llama3-70b
hardware: {gpu: h100-sxm, count: 64}
data:
  sources: [{name: docs, path: docs.jsonl}]
  seq_len: 8192
  tokens: 1T
training: {precision: bf16, global_batch_tokens: 8388608BACKEND}
stages:
  - {name: pre, kind: pretrain}
  - {name: long, kind: long_context, init_from: pre, seq_len: 65536, steps: 100, rope_theta: 4000000}
"""


def _compile(backend: str = ""):
    return compile_text(SPEC.replace("BACKEND", f", backend: {backend}" if backend else ""))


def test_a_long_context_stage_gets_its_own_layout_with_context_parallelism():
    """Llama 3 70B extended to 64K tokens on 64 H100s: on llmc's trainers (data parallel only, a whole sequence per
    GPU) the stage needs ~136 GB per GPU (G005); as its own torchtitan job its searched layout splits each sequence
    over CP ranks and fits. Its memory and time are the memory and time models' for that layout at 64K (computed here
    independently of the stage planner), with the batch identity of pre-training's plans."""
    native = _compile("native")
    long_native = native.stages[1]
    assert long_native.layout is None and not long_native.memory.fits
    assert any(d.code == "G005" for d in native.diagnostics)

    c = _compile()  # auto: torchtitan
    assert c.backend.name == "torchtitan"
    long = c.stages[1]
    lay = long.layout
    assert lay is not None and lay.cp > 1 and lay.world == 64
    assert lay.global_batch_seqs == long.global_batch_seqs == 8388608 // 65536
    assert (long.micro_batch, long.grad_accum) == (lay.micro_batch, lay.grad_accum)
    assert not [d for d in c.diagnostics if d.code in ("G005", "G006")]
    gpu = get_gpu("h100-sxm")
    m = memory.memory_per_gpu(c.spec.model, lay, 65536, "bf16", gpu.hbm_bytes, backend="torchtitan",
                              compile=c.backend.compile)
    assert long.memory.per_gpu_bytes == m.per_gpu_bytes <= gpu.hbm_bytes
    assert long.long_context.cp == lay.cp
    sm = timing.step_model(c.spec.model, 65536, "bf16", gpu, "torchtitan", compile=c.backend.compile)
    step = timing.step_time(sm, lay)[0]
    assert long.time.backend == "torchtitan" and long.time.step_seconds == pytest.approx(step)
    assert long.time.days == pytest.approx((step * 100 + long.time.checkpoint.seconds) / 86400)
    assert long.time.step_seconds < long_native.time.step_seconds  # and faster than the unsplit estimate
    assert any("runs as its own torchtitan job" in n for n in long.notes)
    # the pre-training stage keeps the searched run plan, and the spec's pins do not bind the stage's search
    assert c.stages[0].layout is None


@pytest.mark.parametrize("model", ["qwen2.5-7b", "mixtral-8x7b"])
def test_families_torchtitan_cannot_start_from_weights_stay_on_llmcs_trainers(model):
    """A continued stage starts from the weights before it; torchtitan 0.3.0's state-dict adapters keep every weight
    of llama and DeepSeek-V3 models only (no q/k/v biases, no Mixtral through its qwen3 module), so other families'
    stages run on llmc's trainers, as before."""
    from llmc.emit.torchtitan import _family, _sd_adapter
    from llmc.spec.families import family_of
    from llmc.spec.presets import PRESETS

    c = compile_text(SPEC.replace("llama3-70b", model).replace("BACKEND", ", backend: torchtitan")
                     .replace("seq_len: 65536", "seq_len: 16384"))
    assert c.stages[1].layout is None
    for name in ("llama3-8b", "qwen2.5-7b", "mixtral-8x7b", "deepseek-v3"):
        arch = PRESETS[name]
        assert (_sd_adapter(arch, _family(arch)) is not None) == family_of(arch).torchtitan_hf, name


def test_the_stage_job_is_the_stages_own(tmp_path):
    """The build holds one torchtitan job per such stage, with the stage's layout, sequence length, steps, LR, RoPE
    and batch, its own dump folder, and the pre-training stage's export as its initial weights; `llmc launch` runs it
    with that export's folder, then exports the stage; the launch scripts do the same; llmc's trainers refuse it."""
    from llmc.emit.torchtitan import torchtitan_values
    from llmc.runtime.job import TrainJob

    c = _compile()
    lay = c.stages[1].layout
    pre, long = torchtitan_values(c).ctx, torchtitan_values(c, 1).ctx
    assert long["module_name"] == "llmc_job_stage1" and pre["module_name"] == "llmc_job"
    assert (long["seq_len"], long["steps"], long["adamw"]["lr"]) == (65536, 100, c.stages[1].lr)
    assert (long["tp"], long["pp"], long["cp"], long["dp_shard"], long["dp_replicate"]) == \
        (lay.tp, lay.pp, lay.cp, lay.dp_shard, lay.dp_replicate)
    assert long["global_batch_size"] == 128 and long["rope"]["theta"] == 4_000_000.0
    assert long["rope"]["max_seq_len"] == 65536 and pre["rope"]["max_seq_len"] == 8192
    assert (long["dump_subdir"], pre["dump_subdir"]) == ("torchtitan-long", "torchtitan")
    assert long["init_hf"] == "run/pre/hf" and pre["init_hf"] is None
    assert long["validation"] is None and long["warmup_steps"] == c.stages[1].warmup_steps

    b = tmp_path / "b"
    write_build(b, render_artifacts(c))
    job = (b / "torchtitan" / "llmc_job_stage1.py").read_text()
    assert "os.path.join(RUN_DIR, \"outputs\", 'torchtitan-long')" in job and "seq_len=65536" in job
    assert f"context_parallel_degree={lay.cp}" in job and "initial_load_in_hf=True" in job
    for script in ("run_single_node_stage1.sh", "run_multi_node_stage1.sh", "slurm_stage1.sbatch"):
        text = (b / "torchtitan" / script).read_text()
        assert "llmc_job_stage1" in text or "run_multi_node_stage1.sh" in text, script
    # each job's multi-node scripts default to a rendezvous port of their own: run back to back on the same nodes,
    # the second job's torchrun must not join the first one's c10d store while the head node still tears it down
    import re

    ports = {}
    for sfx in ("", "_stage1"):
        for script in (f"run_multi_node{sfx}.sh", f"slurm{sfx}.sbatch"):
            ports[script] = re.findall(r'MASTER_PORT="\$\{MASTER_PORT:-(\d+)\}"',
                                       (b / "torchtitan" / script).read_text())
    assert all(len(p) == 1 for p in ports.values()), ports
    assert ports["run_multi_node.sh"] == ports["slurm.sbatch"] != ports["run_multi_node_stage1.sh"] \
        == ports["slurm_stage1.sbatch"], ports
    cmds = [x for x in launch_commands(b, backend="torchtitan", gpu=True) if x.stage == "long"]
    train, export = cmds
    assert train.argv[train.argv.index("--module") + 1] == "llmc_job_stage1"
    assert train.env["LLMC_INIT_HF"] == str(b.resolve() / "run" / "pre" / "hf")
    assert export.argv[2:6] == ["llmc.runtime.hf_io", str(b.resolve()), "--stage", "long"]
    for name in ("launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh", "launch/slurm.sbatch"):
        text = (b / name).read_text()
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, name
        branch = text[text.index("  torchtitan)"):]
        assert "--module llmc_job_stage1" in branch and 'LLMC_INIT_HF="$RUN_DIR"/pre/hf' in branch, name
        assert "--stage long -o" in branch or "export_once long" in branch, name
    # llmc's trainers do not run that layout: a one-line refusal instead of an out-of-memory stage
    import json

    lock = json.loads((b / "plan.lock.json").read_text())
    t = TrainJob.from_lock(lock, "long")
    assert (t.tp, t.cp, t.dp_shard) == (lay.tp, lay.cp, lay.dp_shard)
    with pytest.raises(ValueError, match="planned as its own torchtitan job"):
        t.check_runner("native")
    TrainJob.from_lock(lock, "pre").check_runner("native")  # pre-training is not refused


def test_a_pipeline_without_pre_training_builds_and_launches_its_stage_jobs(tmp_path):
    """Continuing a trained model (no pre-training stage): the plan gives the long-context stage its own torchtitan
    layout, so the build holds that stage's job and no pre-training job, and `llmc launch` and the launch scripts
    default to torchtitan for it (before, the build had no torchtitan job and the stage fell to a trainer that refuses
    its layout)."""
    import json

    spec = SPEC.replace("BACKEND", "").replace("  - {name: pre, kind: pretrain}\n", "").replace(
        "init_from: pre, ", "init_hf: /models/llama3-70b, ")
    c = compile_text(spec)
    assert c.plan is None and c.backend.name == "torchtitan" and c.stages[0].layout is not None
    b = tmp_path / "b"
    write_build(b, render_artifacts(c))
    assert sorted(p.name for p in (b / "torchtitan").glob("*.py")) == ["llmc_job_stage0.py"]
    assert "initial_load_in_hf=True" in (b / "torchtitan" / "llmc_job_stage0.py").read_text()
    train, export = launch_commands(b, gpu=True)[1:3]  # after the prepare step; the default backend: the plan's
    assert train.argv[train.argv.index("--module") + 1] == "llmc_job_stage0" and "LLMC_INIT_HF" not in train.env
    assert export.argv[2:6] == ["llmc.runtime.hf_io", str(b.resolve()), "--stage", "long"]
    script = (b / "launch" / "torchrun_single_node.sh").read_text()
    assert 'BACKEND="${BACKEND:-torchtitan}"' in script and "--module llmc_job_stage0" in script
    assert json.loads((b / "plan.lock.json").read_text())["backend"]["name"] == "torchtitan"


def test_tied_embeddings_stay_on_one_pipeline_stage_where_torchtitan_cannot_tie_them():
    """torchtitan refuses weight tying with pipeline parallelism (the emitter's X303), so neither the pre-training
    search nor a stage's own search may pick pp > 1 for a tied model on torchtitan; a pp the user pinned stays (and
    X303 says why the job cannot be emitted)."""
    from llmc.compiler.compile import backend_pins
    from llmc.spec.presets import PRESETS
    from llmc.spec.schema import Parallelism

    tied, untied = PRESETS["llama3.2-1b"], PRESETS["llama3-8b"]
    assert tied.tied_embeddings and not untied.tied_embeddings
    assert backend_pins(Parallelism(), "torchtitan", tied).pp == 1
    assert backend_pins(Parallelism(), "torchtitan", untied).pp is None
    assert backend_pins(Parallelism(pp=2), "torchtitan", tied).pp == 2
    c = compile_text(SPEC.replace("llama3-70b", "llama3.2-1b").replace("BACKEND", ", backend: torchtitan")
                     .replace("count: 64", "count: 1024"))
    assert c.plan.pp == 1 and all(s.layout is None or s.layout.pp == 1 for s in c.stages)
    assert not [d for d in c.diagnostics if d.code == "X303"]
