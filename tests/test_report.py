"""The plan report: golden text for a few examples (``pytest --update-golden`` rewrites them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import check_golden

from llmc.compiler.compile import compile_spec
from llmc.report import WIDTH, render_text

GOLDEN = Path(__file__).parent / "golden" / "plan"



def _compiled(path: str):
    from test_build_fakes import ROOT, compile_example

    return compile_example(ROOT / path)


# The text report of a CPU pre-training run, a multi-node dense plan and a post-training pipeline
# (the JSON form is the lock, whose goldens are in tests/golden/build).
REPORT_GOLDENS = ("tiny_cpu", "llama3_70b_h100x64", "pipeline_llama3_8b")


@pytest.mark.parametrize("stem", REPORT_GOLDENS)
def test_golden_plan_report(stem, update_golden):
    c = _compiled(f"examples/{stem}.yaml")
    check_golden(GOLDEN / f"{stem}.txt", render_text(c), update_golden)


def test_report_is_deterministic_and_fixed_width():
    a = render_text(_compiled("examples/llama3_8b_h100x8.yaml"))
    b = render_text(_compiled("examples/llama3_8b_h100x8.yaml"))
    assert a == b
    lines = a.splitlines()
    # tables stay inside the fixed width; only unwrapped diagnostic lines may run longer
    assert all(len(line) <= WIDTH for line in lines if "error[" not in line and "warning[" not in line
               and "info[" not in line)


def test_report_sections_and_numbers():
    c = _compiled("examples/llama3_405b_h100x16384.yaml")
    text = render_text(c)
    for section in ("Model", "Compute", "Training", "Parallelism plan", "Memory per GPU", "Time and cost",
                    "Budget", "Alternatives", "Rejected candidates", "Diagnostics"):
        assert section in text
    assert f"MFU {100 * c.time.mfu:.1f}%" in text
    assert f"{c.time.days:.1f} days" in text
    assert f"${c.cost.usd:,.0f}" in text
    assert "405,853,388,800" in text  # exact parameter count (Llama 3 paper, arXiv:2407.21783, table 3: 405B)
    # (the fastest, pp 8 at 68.6 GiB, is within the memory model's error of the usable 75.2 GiB: the plan is pp 16)
    assert c.reasons[0].startswith("chosen within the error band over the fastest") and " of 95 fitting" in text
    assert "step time:" in text


def test_json_has_the_documented_keys():
    j = _compiled("examples/llama3_8b_h100x8.yaml").to_json()
    assert {"params_total", "params_active"} <= set(j["model"])
    assert {"training_flops", "tokens_per_param"} <= set(j["compute"])
    assert {"dp_replicate", "dp_shard", "tp", "pp", "pp_schedule", "cp", "ep", "micro_batch", "grad_accum",
            "activation_checkpointing"} <= set(j["plan"])
    assert {"per_gpu_bytes", "capacity_bytes"} <= set(j["memory"])
    assert {"step_seconds", "mfu", "days"} <= set(j["time"])
    assert {"gpu_hours", "usd"} <= set(j["cost"])
    for d in j["diagnostics"]:
        assert set(d) == {"code", "severity", "path", "line", "message", "hint"}
    json.dumps(j)  # serialisable


def test_report_renders_without_a_plan():
    from llmc.spec.load import loads_spec

    text = "name: x\nmodel: llama3.1-405b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 8192, tokens: 1T}\n"
    run, lines = loads_spec(text, file="x.yaml")
    c = compile_spec(run, "x.yaml", lines, spec_bytes=text.encode())
    out = render_text(c)
    assert "No parallelism plan" in out and "error[P004]" in out and "Compute" in out


def test_time_section_reports_the_checkpoint_saves():
    # llama3-8b on one 8-GPU node, torchtitan, sync saves (96.4 GB < the 100 GB async threshold): each save is
    # 12 B x 8,030,261,248 params = 96.36 GB written by the one node at the table's 1 GB/s
    c = _compiled("examples/llama3_8b_h100x8.yaml")
    ck = c.time.checkpoint
    saves = -(-39_340 // ck.interval)
    stall = 12 * 8_030_261_248 / 1e9
    text = " ".join(render_text(c).split())
    assert f"{saves:,} saves x {stall:.2f} s sync = {saves * stall / 3600:.1f} h" in text
    assert f"{100 * saves * stall / (c.time.days * 86400):.1f}% of the run" in text
    assert "96.4 GB per checkpoint" in text and "96.4 GB per node at 1 GB/s" in text
    assert f"39,340 steps + {saves:,} checkpoint saves" in text
    j = c.to_json()["time"]["checkpoint"]
    assert j["saves"] == saves and j["mode"] == "sync" and j["stall_seconds"] == pytest.approx(stall)
    # the floor stays the training FLOPs at 60 % MFU (no saves), as B003 counts them
    train_days = c.time.steps * c.time.step_seconds / 86400
    assert f"floor      {train_days * c.time.mfu / 0.6:.1f} days" in render_text(c)
