"""Pinning what `llmc plan` printed reproduces it; a pin no job would run, a batch split, a budget hint and the
memory "usable" figure say what is true of the backend that runs the plan."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.compiler.compile import compile_loaded
from llmc.diagnostics import errors
from llmc.overrides import parse_override, read_with_overrides
from llmc.spec.facts import gather_facts

runner = CliRunner()
EXAMPLES = sorted(glob.glob("examples/*.yaml"))
# every dimension of the plan a spec's parallelism section can pin, as the plan (and its JSON) reports it
DIMS = ("tp", "pp", "cp", "ep", "dp_shard", "dp_replicate", "zero_stage", "pp_schedule", "pp_virtual_stages",
        "micro_batch", "activation_checkpointing")
H100_BF16 = 989.4e12  # NVIDIA H100 SXM5 datasheet: 989.4 dense bf16 TFLOPS
# Llama 3.1 8B (max_seq_len 131,072) on 2048 H100s, 16M-token batches: at seq_len 1M torchtitan cannot run it (X305)
L8B = """name: llama31-8b
model: llama3.1-8b
hardware: {gpu: h100-sxm, count: 2048, gpus_per_node: 8, usd_per_gpu_hour: 2.0}
data:
  sources: [{name: web, tokens: 16T}]
  tokenizer: {vocab_size: 128256}
  seq_len: 8192
  tokens: 15T
training: {precision: bf16, global_batch_tokens: 16_777_216}
"""
LONG = ["data.seq_len=1048576", "hardware.count=1024"]


def _compile(path, sets=()):
    loaded = read_with_overrides(Path(path), [parse_override(s) for s in sets])
    base = loaded.run or loaded.partial
    return compile_loaded(loaded, facts=gather_facts(base, loaded.base_dir))


def _plan_errors(path, *sets) -> list[str]:
    """The error lines of `llmc plan` (through the CLI, --set overrides), after checking it printed no traceback."""
    r = runner.invoke(app, ["plan", str(path)] + [x for s in sets for x in ("--set", s)])
    assert "Traceback" not in r.output
    return [ln for ln in r.stderr.splitlines() if ": error[" in ln]  # (standard output: the report, when one)


def _gpu_examples():
    out = []
    for ex in EXAMPLES:
        c = _compile(ex).compiled
        if c is not None and c.plan is not None and c.gpu.key != "cpu":
            out.append(ex)
    return out


# ------------------------------------------------------------------------------------------- pins reproduce


@pytest.mark.parametrize("path", _gpu_examples(), ids=lambda p: Path(p).stem)
def test_pinning_each_printed_dimension_reproduces_the_plan(path):
    """The README: ``parallelism:`` pins any part of the layout the search would otherwise choose. Pinning any one
    dimension of the printed plan, or all of them, gives the same backend, plan, step time and memory, and no
    error (a pinned ZeRO-1 once moved the 405B and DeepSeek-V3 plans to DeepSpeed: P005 / P004)."""
    c = _compile(path).compiled
    p = c.plan
    for dim in DIMS + ("all",):
        sets = [f"parallelism.{k}={getattr(p, k)}" for k in (DIMS if dim == "all" else (dim,))]
        if dim == "all" and p.activation_checkpointing == "partial":
            sets.append(f"parallelism.ac_layers={p.ac_layers}")
        out = _compile(path, sets)
        assert not errors(out.diagnostics), (dim, [d.render() for d in errors(out.diagnostics)])
        c2 = out.compiled
        assert c2.backend.name == c.backend.name, (dim, c2.backend.reason)
        assert c2.plan == p, dim
        assert c2.time.step_seconds == c.time.step_seconds and c2.memory.per_gpu_bytes == c.memory.per_gpu_bytes, dim


def test_auto_runs_a_pinned_zero12_on_an_fsdp2_backend():
    """ZeRO-1/2 pinned with ``auto``: the backend the search would have chosen, which runs it as FSDP2 keeping the
    gathered parameters (``zero12 == "fsdp2"``); DeepSpeed only for offload, a DeepSpeed-only feature."""
    from llmc.compiler.backends import get_backend, resolve_backend

    for z in (1, 2):
        name, why = resolve_backend("auto", zero_stage=z)
        assert name == "torchtitan" and f"ZeRO-{z}" in why and get_backend(name).zero12 == "fsdp2"
        gap = "seq_len 1048576 exceeds the model's max_seq_len 131072"
        name, why = resolve_backend("auto", zero_stage=z, model_gaps=(gap,))
        assert name == "native" and gap in why and get_backend(name).zero12 == "fsdp2"
        assert resolve_backend("auto", zero_stage=z, offload=True)[0] == "deepspeed"
    assert resolve_backend("auto", zero_stage=3)[0] == "torchtitan"


def test_data_parallel_line_says_how_the_backend_runs_zero1():
    """On torchtitan ZeRO-1 is FSDP2 with reshard_after_forward=False (llmc's torchtitan job: fsdp_reshard_after_forward
    "never"); DeepSpeed's ZeRO-1 keeps its own words."""
    r = runner.invoke(app, ["plan", "examples/llama3_405b_h100x16384.yaml"])
    assert r.exit_code == 0, r.output
    line = " ".join(r.output.split("data parallel", 1)[1].split("pipeline", 1)[0].split())
    assert "FSDP2 over 128 ranks" in line and "reshard_after_forward=False" in line and "ZeRO-1 (optimizer" not in line
    spec = Path("examples/llama3_8b_h100x8.yaml")
    # (a 1B model: DeepSpeed's ZeRO-1 under bf16 keeps a replicated fp32 gradient, BF16_Optimizer, which 8B at 8192
    # tokens does not fit beside on 80 GB)
    r = runner.invoke(app, ["plan", str(spec), "--set", "model=llama3.2-1b", "--set", "training.backend=deepspeed",
                            "--set", "parallelism.zero_stage=1",
                            "--set", "parallelism.activation_checkpointing=full", "--set", "budget.max_days=365"])
    assert "ZeRO-1 (optimizer sharded) over 8 ranks" in r.output and "reshard_after_forward" not in r.output, r.output


# ------------------------------------------------------------------------------------------- P005


def test_p005_never_proposes_the_batch_the_spec_has():
    """DeepSpeed's runner is data-parallel only: 2048 sequences cannot be split over 16384 GPUs on it; TP 8 would
    (16384 / 8 = 2048 ranks). The hint proposes a multiple of 16384 (one sequence per GPU), not the spec's 2048."""
    errs = [e for e in _plan_errors("examples/llama3_405b_h100x16384.yaml", "training.backend=deepspeed")
            if "error[P005]" in e]
    assert len(errs) == 1, errs
    e = errs[0]
    assert "e.g. 2048 " not in e and "e.g. 16384 (134,217,728 tokens)" in e
    assert "tensor parallelism" in e and "tp 8 (2048 ranks)" in e and "training.backend pins deepspeed" in e


def test_p005_names_the_context_parallelism_the_backend_lacks(tmp_path):
    """16 sequences of 1M tokens on 1024 H100s: the native trainer (auto: torchtitan cannot run seq_len beyond the
    model's max_seq_len) has TP up to the node's 8 but no CP, so it needs 1024 / 8 = 128 sequences; tp 8 x cp 8
    leaves 1024 / 64 = 16 data-parallel ranks, one sequence each."""
    spec = tmp_path / "l8b.yaml"
    spec.write_text(L8B)
    errs = [e for e in _plan_errors(spec, *LONG) if "error[P005]" in e]
    assert len(errs) == 1, errs
    e = errs[0]
    assert "on the native backend: it runs no context parallelism" in e and "128 data-parallel ranks" in e
    assert "tp 8 x cp 8 (16 ranks) would split it" in e and "max_seq_len 131072" in e
    assert "e.g. 128 (134,217,728 tokens)" in e and "raise model.max_seq_len" in e


# ------------------------------------------------------------------------------------------- P018


def _run(text: str):
    from llmc.spec.load import loads_spec

    return loads_spec(text, file="s.yaml")[0]


def _p018(run, backend: str, why: str, gaps=()):
    from llmc.compiler.backends import get_backend
    from llmc.compiler.checks import Sink, check_backend_pins

    sink = Sink({}, "s.yaml")
    check_backend_pins(run, get_backend(backend), why, sink, gaps)
    return [d for d in sink.items if d.code == "P018"]


def test_p018_a_pinned_dimension_the_backend_does_not_run():
    """The native trainer has no CP (backends: supports dp, fsdp, hsdp, tp) and DeepSpeed's runner neither TP nor a
    replicate dimension beside its ZeRO shards; torchtitan runs every one of them."""
    from llmc.compiler.backends import torchtitan_seq_gaps

    text = L8B.replace("count: 2048", "count: 1024").replace("seq_len: 8192", "seq_len: 1048576")
    run = _run(text + "parallelism: {tp: 8, cp: 8}\n")
    gaps = torchtitan_seq_gaps(run.model, 1048576, True)
    assert gaps and gaps[0].code == "X305"
    why = f"auto: llmc's native trainer (DDP / FSDP2 / TP), since torchtitan cannot run this model: {gaps[0].message}"
    (d,) = _p018(run, "native", why, gaps)
    assert d.severity == "error" and d.path == "parallelism.cp" and "native backend does not run" in d.message
    assert "max_seq_len 131072" in d.message and "drop parallelism.cp" in d.hint and "raise model.max_seq_len" in d.hint
    assert not _p018(run, "torchtitan", "training.backend pins torchtitan")
    ds = _run(L8B.replace("precision: bf16,", "precision: bf16, backend: deepspeed,")
              + "parallelism: {tp: 8, dp_replicate: 2}\n")
    got = {d.path: d for d in _p018(ds, "deepspeed", "training.backend pins deepspeed")}
    assert set(got) == {"parallelism.tp", "parallelism.dp_replicate"}
    assert "dp_shard 128" in got["parallelism.dp_replicate"].message  # 2048 / (2 x 8)
    assert "set training.backend to torchtitan or native" in got["parallelism.tp"].hint
    # replicas without shards are DeepSpeed's plain data parallelism (ZeRO-0): nothing to report
    ddp = _run(L8B + "parallelism: {dp_replicate: 2048}\n")
    assert not _p018(ddp, "deepspeed", "training.backend pins deepspeed")


def test_p018_end_to_end(tmp_path):
    """`llmc plan` of a CP pin on the native trainer (auto, torchtitan ruled out) exits 1 with P018 on the pin."""
    spec = tmp_path / "l8b.yaml"
    spec.write_text(L8B)
    errs = _plan_errors(spec, *LONG, "parallelism.cp=8", "parallelism.tp=8")
    p018 = [e for e in errs if "error[P018]" in e]
    assert len(p018) == 1 and "parallelism.cp" in p018[0] and "native backend does not run" in p018[0], errs


# ------------------------------------------------------------------------------------------- usable memory


def test_usable_memory_is_what_the_fit_check_compares_against():
    """``search.usable_bytes`` is the edge of ``memory.fits`` for every profile: the largest peak that fits."""
    from llmc.compiler.backends import BACKENDS
    from llmc.compiler.memory import fits
    from llmc.compiler.result import MemoryNumbers
    from llmc.compiler.search import usable_bytes

    cap = 80e9
    for name in BACKENDS:
        edge = int(usable_bytes(cap, name))
        at, above = (MemoryNumbers(per_gpu_bytes=b, capacity_bytes=cap, breakdown={}, backend=name)
                     for b in (edge, edge + 1))
        assert fits(at) and not fits(above), name


def test_messages_quote_the_usable_memory_the_plan_was_fitted_to():
    """DeepSeek-V3's plan fills 73.6 GiB of an H100's 74.5: a rejection that quotes less as usable contradicts it."""
    c = _compile("examples/deepseek_v3.yaml").compiled
    plan_gib = c.memory.per_gpu_bytes / 2**30
    quoted = [(float(a), float(b)) for r in c.rejected
              for a, b in re.findall(r"memory ([\d.]+) GiB > ([\d.]+) GiB usable", r.reason)]
    assert quoted, [r.reason for r in c.rejected]
    assert all(need > usable >= plan_gib - 0.05 for need, usable in quoted), (plan_gib, quoted)


# ------------------------------------------------------------------------------------------- budget hints


def _count(text: str, pattern: str) -> int:
    m = re.search(pattern, text)
    assert m, text
    return int(m.group(1).replace(",", ""))


def test_budget_hints_name_a_gpu_count_the_plan_accepts():
    """Llama 3 70B, 2T tokens in 10 days: 9.63e23 FLOPs / (10 d x 989.4 TFLOPS x 60 %) = 1,878 GPUs, not a whole number
    of 8-GPU nodes; the hint names the first count >= it that is and over which the 1,024-sequence batch splits, and
    planning that count gives no P005 / P008 (and at 60 % MFU it would meet the budget)."""
    ex = "examples/llama3_70b_h100x64.yaml"
    c = _compile(ex, ["hardware.count=1024", "budget.max_days=10"]).compiled
    floor_gpus = c.compute.training_flops / (10 * 86400 * H100_BF16 * 0.60)
    assert 1877 < floor_gpus <= 1878
    (b3,) = [d for d in c.diagnostics if d.code == "B003"]
    n = _count(b3.hint, r"at least ([\d,]+) GPUs even at 60% MFU")
    assert n >= floor_gpus and n % 8 == 0
    assert c.compute.training_flops / (n * H100_BF16 * 0.60) / 86400 <= 10
    assert "39.5% MFU" in b3.hint  # llmc's own prediction, and that it needs more GPUs
    pred = _count(b3.hint, r"needs more: ~([\d,]+) GPUs")
    assert pred > n and pred % 8 == 0
    for count in (n, pred):
        codes = {e.split("error[")[1][:4] for e in _plan_errors(ex, f"hardware.count={count}", "budget.max_days=10")}
        assert not codes & {"P005", "P008"}, (count, codes)
    # B001 (the floor fits the budget, the prediction does not): its linear count is also one the plan accepts
    c = _compile(ex, ["hardware.count=2048", "budget.max_days=10"]).compiled
    (b1,) = [d for d in c.diagnostics if d.code == "B001"]
    m = _count(b1.hint, r"~([\d,]+) GPUs if its")
    assert m >= 2048 * c.time.days / 10 and m % 8 == 0
    codes = {e.split("error[")[1][:4] for e in _plan_errors(ex, f"hardware.count={m}", "budget.max_days=10")}
    assert not codes & {"P005", "P008"}, (m, codes)


def test_budget_hints_split_the_pretraining_stages_own_batch(tmp_path):
    """A `pretrain` stage with its own batch and seq_len (32 sequences of 2,048 tokens): every GPU count a hint names
    is one that batch splits over. Here none can meet the budget: 32 sequences split over at most 256 H100s (tp 8 x
    dp x pp with dp x pp <= 32 and at least pp micro-batches per rank; no CP below 32K tokens), fewer than the 377
    the floor needs, and B003 says so instead of naming a count (it named 3,200 when it split the spec's training
    batch at data.seq_len)."""
    spec = tmp_path / "s.yaml"
    spec.write_text("""\
name: stage-batch
model: llama3-8b
hardware: {gpu: h100-sxm, count: 64}
data: {sources: [{name: w, path: /d/*.jsonl}], seq_len: 8192, tokens: 20B}
training: {precision: bf16}
budget: {max_days: 0.05}
stages:
  - {name: pre, kind: pretrain, seq_len: 2048, global_batch_tokens: 65536}
""")
    r = runner.invoke(app, ["plan", str(spec)])
    assert "Traceback" not in r.output
    hints = [ln for ln in r.output.splitlines() if "error[B00" in ln]
    assert hints, r.output
    assert any("more GPUs than any count the plan accepts" in ln for ln in hints), hints
    counts = [int(x.replace(",", "")) for ln in hints for x in re.findall(r"(?:at least|~)([\d,]+) GPUs", ln)]
    for n in counts:  # every count named splits 32 sequences: planning it gives no P005
        body = spec.read_text().replace("count: 64", f"count: {n}")
        other = tmp_path / f"n{n}.yaml"
        other.write_text(body)
        errs = [ln for ln in runner.invoke(app, ["plan", str(other)]).output.splitlines() if "error[P005]" in ln]
        assert not errs, (n, errs)


# ------------------------------------------------------------------------------------- the ZeRO stage's trade

TT8 = """name: tt-llama31-8b
model: llama3.1-8b
hardware: {gpu: h100-sxm, count: 8, gpus_per_node: 8}
data:
  sources: [{name: c4, tokens: 100B}]
  tokenizer: {vocab_size: 128256}
  seq_len: 8192
  tokens: 65_536_000
training: {backend: torchtitan, precision: bf16, compile: false, global_batch_tokens: 65536}
parallelism: {dp_shard: 8, tp: 1, pp: 1, cp: 1, micro_batch: 1, activation_checkpointing: selective}
"""


def test_zero_stage_reason_gives_each_other_stage_its_memory(tmp_path):
    """torchtitan's 8B on one node: ZeRO-2 (what FSDP2 runs for ZeRO-1 and 2) is chosen for a step a fraction of a
    percent faster than ZeRO-3's, which holds far less memory; the reason line names each other stage's memory per
    GPU, equal to what planning with that stage pinned reports (an independent plan of the same spec)."""
    spec = tmp_path / "s.yaml"
    spec.write_text(TT8)
    c = _compile(spec).compiled
    (line,) = [r for r in c.reasons if r.startswith("ZeRO stage ")]
    others = dict(re.findall(r"(\d): [+-]?[\d.]+%(?: at ([\d.]+ GiB))?", line.split("others", 1)[1]))
    assert others, line
    from llmc.compiler.units import gib
    for z, mem in others.items():
        pinned = _compile(spec, [f"parallelism.zero_stage={z}"]).compiled
        assert mem == gib(pinned.memory.per_gpu_bytes), (z, line)
    # the trade the reviewer met: the chosen stage's memory is in the first reason line, the others' here
    assert c.plan.zero_stage in (2, 3)


def test_plan_refuses_optimizer_offload_without_a_zero_stage_as_the_build_does(tmp_path):
    """DeepSpeed offloads only the ZeRO optimizer's partitions (its offload_optimizer config is "valid with stage 1,
    2, and 3"): a plan pinning zero_stage 0 with offload_optimizer was accepted and its build failed (X108)."""
    sets = ["training.backend=deepspeed", "parallelism.offload_optimizer=true", "parallelism.zero_stage=0",
            "parallelism.dp_shard=1", "parallelism.dp_replicate=8", "budget.max_days=100", "budget.max_usd=100000"]
    errs = _plan_errors("examples/llama3_8b_h100x8.yaml", *sets)
    assert len(errs) == 1 and "error[P015] parallelism.offload_optimizer" in errs[0], errs
    r = runner.invoke(app, ["build", "examples/llama3_8b_h100x8.yaml", "-o", str(tmp_path / "b")]
                      + [x for s in sets for x in ("--set", s)])
    assert r.exit_code == 1 and "X108" not in r.output and not (tmp_path / "b").exists()
    # with a ZeRO stage that has optimizer partitions, plan and build both go through
    ok = [s.replace("zero_stage=0", "zero_stage=1") for s in sets]
    assert _plan_errors("examples/llama3_8b_h100x8.yaml", *ok) == []


def test_keep_latest_one_is_refused_where_torchtitan_runs_and_left_out_elsewhere(tmp_path):
    """torchtitan 0.3.0's own checkpoint config refuses keep_latest_k 1 (checked here with its class): a torchtitan
    plan says so (X321); a native plan builds, its torchtitan job left out with the reason."""
    from torchtitan.components.checkpoint import CheckpointManager

    with pytest.raises(ValueError, match="at least 2"):
        CheckpointManager.Config(keep_latest_k=1)
    CheckpointManager.Config(keep_latest_k=2)
    errs = _plan_errors("examples/tiny_cpu.yaml", "training.backend=torchtitan", "training.checkpoint.keep_latest=1")
    assert len(errs) == 1 and "error[X321] training.checkpoint.keep_latest" in errs[0], errs
    out = tmp_path / "b"
    r = runner.invoke(app, ["build", "examples/tiny_cpu.yaml", "-o", str(out), "--set", "training.backend=native",
                            "--set", "training.checkpoint.keep_latest=1"])
    assert r.exit_code == 0, r.output
    assert "X321" in (out / "torchtitan" / "NOT_EMITTED.txt").read_text()
