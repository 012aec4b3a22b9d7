"""``budget.max_gpu_hours`` (an allocation grant in GPU-hours) is judged like ``max_usd``: B002 over the plan's
GPU-hours, B003 when even the 60%-MFU floor needs more, B004 / B005 for the pipeline and the interruptions; the
budget errors' "fewer tokens" remedy gives the tokens (or pinned steps) that fit, and planning them fits.

The floor is checked against an independent computation: training FLOPs / (0.6 x the bf16 dense datasheet peak)
GPU-seconds, whatever the GPU count."""

from __future__ import annotations

import re

from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu, peak_flops
from llmc.report import render_text
from llmc.spec.load import loads_spec

SPEC = """\
name: bud
model: llama3-70b
hardware: {{gpu: h100-sxm, count: 64}}
data:
  sources: [{{name: web, tokens: 2T}}]
  tokens: {tokens}
  seq_len: 8192
training:
  global_batch_tokens: 4194304
{steps}budget: {{{budget}}}
"""


def _compile(budget: str, tokens: str = "2T", steps: str = ""):
    run, lines = loads_spec(SPEC.format(budget=budget, tokens=tokens, steps=steps), file="bud.yaml")
    return compile_spec(run, "bud.yaml", lines)


def _diag(c, code: str, path: str):
    found = [d for d in c.diagnostics if d.code == code and d.path == path]
    assert len(found) == 1, [(d.code, d.path, d.message) for d in c.diagnostics]
    return found[0]


def test_the_plans_gpu_hours_against_max_gpu_hours():
    base = _compile("max_usd: 1e12")
    gh = base.cost.gpu_hours
    assert gh == base.time.days * 24 * 64
    over = _compile(f"max_gpu_hours: {gh * 0.9:.0f}")
    d = _diag(over, "B002", "budget.max_gpu_hours")
    assert d.severity == "error" and f"{gh:,.0f} GPU-hours" in d.message
    assert not [x for x in _compile(f"max_gpu_hours: {gh * 1.01:.0f}").diagnostics if x.code in ("B002", "B003")]
    assert "max_gpu_hours" in render_text(over) and "EXCEEDED" in render_text(over)
    # the remedy's token count, planned, fits the grant (the days scale with the steps at this layout)
    tokens = float(re.search(r"~([0-9.e+]+) tokens \(", d.hint).group(1))
    assert 0.85e12 * 2 < tokens < 0.95e12 * 2
    fewer = _compile(f"max_gpu_hours: {gh * 0.9:.0f}", tokens=f"{tokens:.6g}")
    assert fewer.plan == base.plan
    assert not [x for x in fewer.diagnostics if x.code in ("B002", "B003")], fewer.cost.gpu_hours


def test_the_floor_in_gpu_hours_is_the_flops_at_60_percent_of_the_peak():
    c = _compile("max_gpu_hours: 1000")
    d = _diag(c, "B003", "budget.max_gpu_hours")
    floor = c.compute.training_flops / (0.6 * peak_flops(get_gpu("h100-sxm"), "bf16")) / 3600
    assert f"at least {floor:,.0f} GPU-hours" in d.message
    assert c.budget_floor.gpu_hours == floor or abs(c.budget_floor.gpu_hours / floor - 1) < 1e-12
    assert "tokens (" in d.hint


def test_pinned_steps_get_a_step_count_that_fits():
    base = _compile("max_usd: 1e12", steps="  steps: 100000\n")
    gh = base.cost.gpu_hours
    d = _diag(_compile(f"max_gpu_hours: {gh * 0.8:.0f}", steps="  steps: 100000\n"), "B002", "budget.max_gpu_hours")
    steps = int(re.search(r"~([0-9,]+) steps \(", d.hint).group(1).replace(",", ""))
    assert 79_000 < steps <= 80_000 and "training.steps" in d.hint


def test_a_gpu_without_a_price_cannot_pass_a_dollar_budget():
    """A custom GPU without a base part has no price: the plan costs $0 and max_usd passed at "0%"; B006 says it
    cannot be judged, and the cost line says there is no price. A GPU-hour budget is judged as ever."""
    text = SPEC.format(budget="max_usd: 1000, max_gpu_hours: 1e9", tokens="2T", steps="").replace(
        "{gpu: h100-sxm, count: 64}", "{gpu: mygpu, count: 64, gpu_overrides: {bf16_tflops: 500, hbm_gib: 640, "
        "hbm_tbps: 2, nvlink_gbps: 200}}")
    run, lines = loads_spec(text, file="bud.yaml")
    c = compile_spec(run, "bud.yaml", lines)
    assert c.cost.usd == 0 and c.cost.gpu_hours > 0
    d = _diag(c, "B006", "budget.max_usd")
    assert d.severity == "error" and "usd_per_gpu_hour" in d.hint
    assert "no price for this GPU" in render_text(c)
    assert not [x for x in c.diagnostics if x.path == "budget.max_gpu_hours"]
