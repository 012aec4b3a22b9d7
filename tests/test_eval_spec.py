"""``eval:`` and ``data.quality:`` in the plan: validation cost, banding/FP/FN, dedup cost, E checks."""

from __future__ import annotations

import json
import math

import pytest

from llmc.compiler import quality_math
from llmc.compiler.compile import compile_spec
from llmc.spec.load import loads_spec

TINY = """\
name: t
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources:
    - {name: web, path: data/web, tokens: TOKENS}
  seq_len: 128
  tokens: 2.048M
training: {precision: fp32, global_batch_tokens: 4096}
"""


def _compile(text: str):
    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())


def _tiny(extra: str = "", tokens: str = "100M", data_extra: str = "") -> str:
    return TINY.replace("TOKENS", tokens).replace("  seq_len: 128\n", "  seq_len: 128\n" + data_extra) + extra


def _diag(c, code):
    ds = [d for d in c.diagnostics if d.code == code]
    assert ds, f"{code} not in {[d.render() for d in c.diagnostics]}"
    return ds[0]


def test_validation_cost_is_forward_flops_of_the_heldout_tokens_at_plan_throughput():
    c = _compile(_tiny("eval: {validation: {every_steps: 100, max_batches: 5}}\n"))
    v = c.evaluation.validation
    # independent parameter count: the runtime's own model
    torch = pytest.importorskip("torch")
    from llmc.runtime.model import Transformer

    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(c.spec.model).parameters())
    assert n == c.model.params_active
    steps = round(2_048_000 / 4096)
    assert c.hyper.steps == steps == 500
    assert v.evals == 5  # steps 100, 200, 300, 400, 500
    assert v.tokens_per_eval == 5 * c.plan.micro_batch * c.plan.dp * 128
    # forward FLOPs/token, counted independently: 2 per parameter except the embedding lookup (llmc's
    # convention keeps the tiny norm gains) + attention scores and values 2 * L * s * H * (d_qk + d_v)
    a = c.spec.model
    fwd = 2 * (n - a.vocab_size * a.d_model) + 2 * a.n_layers * 128 * a.n_heads * 2 * a.head_dim
    assert v.flops == pytest.approx(fwd * v.tokens_per_eval * 5)
    # the forward pass is a third of a training step's FLOPs: the eval time is a third of the time the plan
    # needs to train on as many tokens
    assert v.seconds == pytest.approx(v.tokens_per_eval * 5 / c.time.tokens_per_second / 3)
    assert v.fraction_of_training_time == pytest.approx(v.seconds / (c.time.step_seconds * 500))
    assert v.fraction == 0.005 and v.seed == 0 and v.files is None
    # the lock records the split
    lock = c.to_json()["evaluation"]["validation"]
    assert (lock["fraction"], lock["seed"], lock["files"]) == (0.005, 0, None)
    json.dumps(c.to_json())


def test_evals_round_up_to_include_the_final_step():
    c = _compile(_tiny("eval: {validation: {every_steps: 300}}\n"))
    assert c.evaluation.validation.evals == 2  # 300 and the final step 500


@pytest.mark.parametrize("nd,bands_rows", [("{}", (14, 8)), ("{bands: 20, rows: 5, num_perm: 100}", (20, 5)),
                                           ("{bands: null, rows: null, threshold: 0.8, num_perm: 128}", None)])
def test_plan_banding_equals_quality_math_and_the_quality_pipeline(nd, bands_rows):
    c = _compile(_tiny(data_extra=f"  quality: {{near_dup: {nd}}}\n"))
    n = c.evaluation.quality.near_dup
    spec_nd = c.spec.data.quality.near_dup
    if bands_rows is None:
        ref = quality_math.optimal_bands(spec_nd.threshold, spec_nd.num_perm)
        assert n.chosen_by_llmc
        lsh = pytest.importorskip("datasketch.lsh")  # datasketch's own choice (scipy quadrature)
        assert (n.bands, n.rows) == lsh._optimal_param(0.8, 128, 0.5, 0.5)
    else:
        ref = quality_math.banding(spec_nd.threshold, *bands_rows)
    assert (n.bands, n.rows) == (ref.bands, ref.rows)
    assert n.false_positive == ref.false_positive and n.false_negative == ref.false_negative
    # the pipeline's config maps the same keys and computes the same banding
    from llmc.quality import NearDupConfig

    q = NearDupConfig(**spec_nd.model_dump())
    assert q.banding() == ref
    # and the report shows them
    from llmc.report import render_text

    text = render_text(c)
    assert f"{n.bands} bands x {n.rows} rows" in text and f"FP area {ref.false_positive:.4f}" in text


def test_dedup_cost_and_tokens_left_from_declared_tokens():
    c = _compile(_tiny(tokens="1B", data_extra="  quality: {workers: 4, expected_removal_fraction: 0.25}\n"))
    q = c.evaluation.quality
    words = 1e9 * 0.75
    # dedup_cpu_seconds: shingles x (1 / hash rate + num_perm / permutation rate)
    core = words * (1 / quality_math.SHINGLE_HASHES_PER_S + 112 / quality_math.PERM_UPDATES_PER_S)
    assert q.minhash_core_seconds == pytest.approx(core)
    assert q.minhash_wall_seconds == pytest.approx(core / 4)
    assert q.tokens_left == pytest.approx(0.75e9)
    unknown = _compile(_tiny(tokens="1B", data_extra="  quality: {}\n")).evaluation.quality
    assert unknown.tokens_left is None and "tokens left   unknown" in __import__("llmc.report").report.render_text(
        _compile(_tiny(tokens="1B", data_extra="  quality: {}\n")))


def test_validation_file_inside_a_training_source_is_a_located_error():
    c = _compile(_tiny("eval:\n  validation:\n    files: [data/web/val.jsonl]\n"))
    d = _diag(c, "E003")
    assert d.severity == "error" and d.path == "eval.validation.files.0" and d.line == 12
    assert d.render().startswith("spec.yaml:12: error[E003] eval.validation.files.0:")
    ok = _compile(_tiny("eval:\n  validation:\n    files: [heldout/val.jsonl]\n"))
    assert not [d for d in ok.diagnostics if d.code == "E003"]
    assert ok.evaluation.validation.fraction is None and ok.evaluation.validation.files == ["heldout/val.jsonl"]


def test_eval_task_without_decontamination_benchmark_warns():
    extra = "eval: {tasks: [hellaswag, evals/my_mc.yaml]}\n"
    c = _compile(_tiny(extra, data_extra="  quality: {decontaminate: {benchmarks: [bench/hellaswag.jsonl]}}\n"))
    warned = [d for d in c.diagnostics if d.code == "E002"]
    assert [d.path for d in warned] == ["eval.tasks.1"] and "my_mc" in warned[0].message
    assert c.evaluation.tasks.stages == ["pretrain"]  # default: the last stage
    none = _compile(_tiny(extra))
    assert _diag(none, "E006").severity == "info"


def test_unknown_task_stage_and_impossible_banding_are_errors():
    c = _compile(_tiny("eval: {tasks: [hellaswag], task_stages: [sft]}\n",
                       data_extra="  quality: {near_dup: {bands: 20, rows: 10, num_perm: 112}}\n"))
    assert _diag(c, "E004").severity == "error" and "sft" in _diag(c, "E004").message
    assert _diag(c, "E005").severity == "error" and "200 > num_perm 112" in _diag(c, "E005").message


def test_epochs_after_holdout_and_removal_warn_beyond_four():
    # 2.048M tokens over 0.5M unique = 4.1 epochs -> D002 already; 0.55M unique = 3.72 epochs: fine alone,
    # 4.97 epochs after 25% expected removal -> E001 (Muennighoff et al. 2023)
    base = _compile(_tiny(tokens="550K"))
    assert not [d for d in base.diagnostics if d.code in ("D002", "E001") and d.severity != "info"]
    c = _compile(_tiny(tokens="550K", data_extra="  quality: {expected_removal_fraction: 0.25}\n"))
    d = _diag(c, "E001")
    assert d.severity == "warning" and d.path == "data.sources.0.tokens"
    assert f"{2.048e6 / (0.55e6 * 0.75):.1f} epochs" in d.message
    over = _compile(_tiny(tokens="500K", data_extra="  quality: {expected_removal_fraction: 0.25}\n"))
    assert not [d for d in over.diagnostics if d.code == "E001"]  # D002 speaks for it
    assert math.isclose(2.048e6 / 0.5e6, 4.096)
