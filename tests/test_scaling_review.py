"""The plan's scaling numbers count the tokens the trainer trains, predict a loss, and say what they assume.

Figures are checked against independent computations: the plain L(N, D) formula with the published constants of
Besiroglu et al. 2024 (arXiv 2404.10102) and Hoffmann et al. 2022 (arXiv 2203.15556), closed forms written out
here, a brute-force minimisation, and the hardware table's datasheet peak.
"""

from __future__ import annotations

import math

import pytest

from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu, peak_flops
from llmc.report import render_text
from llmc.spec.load import loads_spec

BASE8B = """\
name: b8
model: {model}
hardware: {{gpu: h100-sxm, count: 64{hw}}}
data:
  sources: {sources}
  tokens: {tokens}
  seq_len: 8192
training:
  global_batch_tokens: 4194304
{training}"""

STEPS, BATCH = 200_000, 4_194_304
# Besiroglu et al. 2024 refit of Hoffmann et al. 2022's Approach 3 (arXiv 2404.10102)
REFIT = dict(E=1.8172, A=482.01, B=2085.43, a=0.3478, b=0.3658)
APPROACH3 = dict(E=1.69, A=406.4, B=410.7, a=0.34, b=0.28)  # Hoffmann et al. 2022 eq. 10


def _spec(model="llama3-8b", sources="[{name: web, tokens: 2T}]", tokens="160B", training="", hw=""):
    return BASE8B.format(model=model, sources=sources, tokens=tokens, training=training, hw=hw)


def _compile(text: str):
    run, lines = loads_spec(text, file="base8b.yaml")
    return compile_spec(run, "base8b.yaml", lines, spec_bytes=text.encode())


def _loss(n, d, E, A, B, a, b):
    return E + A / n**a + B / d**b


def _diags(c, code):
    return [d for d in c.diagnostics if d.code == code]


def _row(text: str, key: str) -> str:
    """A report row with its wrapped continuation lines joined."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(key))
    out = [lines[i].strip()]
    for ln in lines[i + 1:]:
        if not ln.startswith(" " * 10) or not ln.strip():
            break
        out.append(ln.strip())
    return " ".join(out)


# ------------------------------------------------------------------------------------ 1. trained tokens


def test_pinned_steps_count_the_steps_tokens_everywhere():
    c = _compile(_spec(sources="[{name: web, tokens: 100B}]", training=f"  steps: {STEPS}\n"))
    trained = STEPS * BATCH  # 838,860,800,000
    n = c.model.params_active
    assert n == 8_030_261_248  # Llama 3 8B (dense: active = total)
    x = c.compute
    assert x.tokens == trained
    assert x.training_flops == pytest.approx(x.flops_per_token * trained, rel=1e-12)
    assert x.training_flops == pytest.approx(4.86e22, rel=0.01)  # ~4.9e22, not 9.27e21
    assert x.tokens_per_param == pytest.approx(trained / n, rel=1e-12) and 104 < x.tokens_per_param < 105
    n_opt = math.sqrt(6 * n * trained / (6 * 20))  # C = 6 N (20 N)
    assert x.optimal_params == pytest.approx(n_opt, rel=1e-9) and x.optimal_tokens == pytest.approx(20 * n_opt)
    # the time counts the same steps: FLOPs / (GPU-seconds x peak) is the MFU the plan reports
    peak = peak_flops(get_gpu("h100-sxm"), "bf16")
    assert c.time.steps == STEPS
    assert x.flops_per_token * c.time.tokens_per_second / (64 * peak) == pytest.approx(c.time.mfu, rel=1e-6)
    # no C001 (104 tok/param is not under-trained); D002 counts 8.4 epochs of the 100B
    assert not _diags(c, "C001")
    (d002,) = _diags(c, "D002")
    assert d002.severity == "warning" and f"{trained / 100e9:.1f} epochs" in d002.message
    assert "8.4 epochs" in d002.message
    (d005,) = _diags(c, "D005")
    assert "the plan counts their tokens" in d005.message
    assert "count data.tokens" not in d005.message
    # the budget floor (B003's yardstick) is the same FLOPs at 60 % MFU
    if c.budget_floor is not None:
        assert c.budget_floor.days == pytest.approx(x.training_flops / (64 * peak * 0.6) / 86400, rel=1e-6)


def test_pinned_steps_with_the_default_batch_count_the_resolved_batch():
    text = _spec(training="  steps: 1000\n").replace("  global_batch_tokens: 4194304\n", "")
    c = _compile(text)
    assert "global_batch_tokens" in c.hyper.defaults
    assert c.compute.tokens == 1000 * c.hyper.global_batch_tokens


def test_unpinned_steps_keep_data_tokens_bit_identical():
    c = _compile(_spec())
    x = c.compute
    assert x.tokens == 160e9
    assert x.training_flops == x.flops_per_token * 160e9  # exactly the data.tokens product, as before
    assert x.tokens_per_param == 160e9 / c.model.params_active


def test_pinned_steps_under_trained_points_c001_at_the_steps():
    c = _compile(_spec(tokens="1T", training="  steps: 10000\n"))  # 41.9B tokens: 5.2 tok/param
    (c001,) = _diags(c, "C001")
    assert c001.severity == "warning" and c001.path == "training.steps"
    assert f"{10000 * BATCH / c.model.params_active:.3g} tokens per active parameter" in c001.message


# ------------------------------------------------------------------------------------ 2. predicted loss


def test_predicted_loss_is_the_refit_at_the_runs_n_and_d():
    c = _compile(_spec(tokens="1T"))
    n, d = c.model.params_active, 1e12
    x = c.compute
    assert x.predicted_loss == pytest.approx(_loss(n, d, **REFIT), rel=1e-12)
    n_opt = math.sqrt(6 * n * d / 120)
    assert x.optimal_loss == pytest.approx(_loss(n_opt, 20 * n_opt, **REFIT), rel=1e-12)
    # the 20 tok/param point is (within 1e-3 nats) the refit's own minimum along the IsoFLOP curve
    C = 6 * n * d
    brute = min(_loss(m, C / (6 * m), **REFIT) for m in (n_opt * 1.001**k for k in range(-700, 701)))
    assert brute <= x.optimal_loss < brute + 1e-3
    assert x.optimal_loss < x.predicted_loss  # over-trained 6x: a larger model would do better on unique data
    assert "2404.10102" in x.loss_fit
    text = render_text(c)
    row = _row(text, "predicted loss")
    assert f"{x.predicted_loss:.3f} nats/token" in row and f"{x.optimal_loss:.3f}" in row
    assert "MassiveText" in row and "not a prediction for this data" in row


def test_predicted_loss_only_from_scratch():
    c = _compile(_spec(training="  init_hf: /models/llama\n"))
    assert c.compute.predicted_loss is None and c.compute.optimal_loss is None
    assert "predicted loss" not in render_text(c)


def test_approach3_tokens_per_param_is_computed_from_the_published_constants():
    c = _compile(_spec())
    n, d = c.model.params_active, 160e9
    a, b = APPROACH3["a"], APPROACH3["b"]
    G = (a * APPROACH3["A"] / (b * APPROACH3["B"])) ** (1 / (a + b))  # Hoffmann et al. 2022 eq. 4
    n3 = G * (6 * n * d / 6) ** (b / (a + b))
    r3 = (6 * n * d / (6 * n3)) / n3
    assert c.compute.approach3_tokens_per_param == pytest.approx(r3, rel=1e-9)
    assert r3 > 40  # far above 20
    row = _row(render_text(c), "compute-optimal")
    assert "Approaches 1-2" in row and "Table 3" in row and f"{r3:.3g}/param" in row


# ------------------------------------------------------------------------------------ 3. data limits


def test_data_limited_compute_optimal_advice():
    c = _compile(_spec(sources="[{name: web, tokens: 100B}]", tokens="2T"))
    n = c.model.params_active
    d_opt = 20 * math.sqrt(6 * n * 2e12 / 120)  # 567B
    epochs = d_opt / 100e9
    assert 5.6 < epochs < 5.8
    x = c.compute
    assert x.unique_tokens == 100e9 and x.optimal_epochs == pytest.approx(epochs) and x.data_limited
    row = _row(render_text(c), "compute-optimal")
    assert f"{epochs:.1f} epochs of the 100B unique tokens" in row and "Muennighoff" in row
    (c002,) = _diags(c, "C002")
    assert "a larger model would reach lower loss" not in c002.hint
    assert "Muennighoff" in c002.hint and f"{epochs:.1f} epochs" in c002.hint and "more epochs" in c002.hint
    # the predicted loss says the fit counts every token as new
    assert "repeats its 100B unique tokens 20.0 times" in _row(render_text(c), "predicted loss")


def test_no_data_limit_without_every_sources_count_or_within_4_epochs():
    two = "[{name: web, tokens: 100B}, {name: code, path: /nonexistent/code.jsonl}]"
    c = _compile(_spec(sources=two, tokens="2T"))
    assert c.compute.unique_tokens is None and not c.compute.data_limited
    assert "a larger model would reach lower loss" in _diags(c, "C002")[0].hint
    c = _compile(_spec(sources="[{name: web, tokens: 200B}]", tokens="2T"))  # 567B = 2.8 epochs of 200B
    assert not c.compute.data_limited and "Muennighoff" not in _row(render_text(c), "compute-optimal")


# ------------------------------------------------------------------------------------ 4. MoE labels


def test_moe_lines_say_active_params_and_dense_heuristic():
    c = _compile(_spec(model="mixtral-8x7b", tokens="500B"))
    assert c.model.params_active < c.model.params_total
    assert c.compute.tokens_per_param == pytest.approx(500e9 / c.model.params_active)
    text = render_text(c)
    assert "per active parameter" in _row(text, "tokens/param") and "dense-model" in _row(text, "tokens/param")
    assert "active params" in _row(text, "compute-optimal")
    dense = render_text(_compile(_spec()))
    assert "dense-model" not in _row(dense, "tokens/param")


# ------------------------------------------------------------------------------------ 5. C001 tolerance


def test_c001_tolerance_and_significant_figures():
    c = _compile(_spec())  # 19.9 tok/param: 1x the optimum
    assert not [d for d in _diags(c, "C001") if d.severity == "warning"]
    c = _compile(_spec(tokens="100B"))  # 12.5 tok/param: between 0.5x and 1x: info
    assert [d.severity for d in _diags(c, "C001")] == ["info"]
    c = _compile(_spec(tokens="64B"))  # 7.97 tok/param: under 0.5x: warning
    assert [d.severity for d in _diags(c, "C001")] == ["warning"]
    c = _compile(_spec(tokens="250M"))  # 0.0311 tok/param
    r = 250e6 / c.model.params_active
    assert f"{r:.3g}" == "0.0311"
    assert "0.0311 tokens per active parameter" in _diags(c, "C001")[0].message
    assert _row(render_text(c), "tokens/param").startswith("tokens/param      0.0311 per active parameter")


# ------------------------------------------------------------------------------------ 6. report labels


def test_cost_price_default_is_tagged():
    c = _compile(_spec())
    row = _row(render_text(c), "cost")
    assert c.cost.price_is_default and "(default" in row and "hardware.usd_per_gpu_hour" in row
    c = _compile(_spec(hw=", usd_per_gpu_hour: 1.9"))
    assert not c.cost.price_is_default and "(default" not in _row(render_text(c), "cost")
    assert "$1.9/GPU-hour" in _row(render_text(c), "cost")


def test_mfu_names_its_peak():
    c = _compile(_spec(training="  precision: fp8\n"))
    bf16 = peak_flops(get_gpu("h100-sxm"), "bf16")
    # MFU = FLOPs/s per GPU over the bf16 dense peak (the fp8 peak is twice it)
    assert c.time.mfu == pytest.approx(c.compute.flops_per_token * c.time.tokens_per_second / (64 * bf16), rel=1e-6)
    assert f"MFU {100 * c.time.mfu:.1f}% of the bf16 dense peak" in render_text(c)


def test_no_loss_figure_below_the_fits_smallest_model():
    """The fits were made from models of 70M parameters and more (Hoffmann et al. 2022's abstract): a 0.4M-parameter
    model got "15.653 nats/token", above the uniform loss ln(vocab) of its own 4,096-token vocabulary."""
    c = _compile(_spec(model="tiny", tokens="2M", sources="[{name: web, tokens: 1B}]",
                       hw=", gpu_overrides: {hbm_gib: 80}").replace("h100-sxm", "cpu").replace("count: 64", "count: 1")
                 .replace("8192", "128").replace("4194304", "4096"))
    assert c.model.params_active < 70e6
    assert c.compute.predicted_loss is None and c.compute.optimal_loss is None and c.compute.loss_fit
    assert _row(render_text(c), "predicted loss").split(None, 2)[2].startswith("none: 1.31M active params")
