"""A ``pretrain`` stage that sets its own data, steps or seq_len is the pre-training run (``defaults.pretrain_inputs``):
the epoch checks (D002 / D005), the budget errors' "fewer tokens" remedy and the RoPE reach check (T109) read and
name its settings, not the top level's; and GPU-hour figures below 10 keep their digits. Figures are checked against
arithmetic on the spec's own numbers."""

from __future__ import annotations

import re

from llmc.compiler.compile import compile_spec
from llmc.compiler.scaling import scaling_diagnostics
from llmc.report import render_text
from llmc.spec.load import loads_spec

HEAD = """\
name: t
model: {model}
hardware: {{gpu: h100-sxm, count: 64, gpus_per_node: 8, usd_per_gpu_hour: 2}}
data:
  sources: [{{name: small, path: /data/small/*.parquet, format: parquet, tokens: 10B}}]
  seq_len: 8192
  tokens: {tokens}
training: {{precision: bf16, global_batch_tokens: 4194304}}
{budget}stages:
  - name: pre
    kind: pretrain
{stage}"""


def _compile(stage: str, model: str = "llama3-8b", tokens: str = "20B", budget: str = ""):
    run, lines = loads_spec(HEAD.format(model=model, tokens=tokens, budget=budget, stage=stage), file="t.yaml")
    return compile_spec(run, "t.yaml", lines)


def _codes(c, code):
    return [d for d in c.diagnostics if d.code == code]


def test_epochs_count_the_stage_s_own_sources():
    """50,000 steps x 4,194,304 = 209.7B tokens of the stage's 1T-token source 'big': 0.21 epochs, no D002; the
    top-level 'small' (10B) is not read. It was reported repeated 21 epochs."""
    c = _compile("    steps: 50000\n    data:\n      sources: [{name: big, path: /data/big/*.parquet, format: parquet, "
                 "tokens: 1T}]\n      seq_len: 8192\n      tokens: 200B\n")
    assert not _codes(c, "D002"), [d.message for d in _codes(c, "D002")]
    (d005,) = _codes(c, "D005")  # 209.7B trained against the stage's data.tokens 200B: 4.9% apart
    assert d005.path == "stages.0.steps" and "stages.0.data.tokens is 200,000,000,000" in d005.message
    assert f"{50_000 * 4_194_304:,}" in d005.message


def test_budget_remedy_scales_the_stage_s_pinned_steps():
    """The stage's 100,000 steps train 419B tokens; the remedy is a step count there, the budget's share of it."""
    c = _compile("    steps: 100000\n", tokens="100B", budget="budget: {max_usd: 20000}\n")
    (b,) = [d for d in c.diagnostics if d.code in ("B002", "B003") and d.path == "budget.max_usd"]
    steps = int(re.search(r"~([0-9,]+) steps \(", b.hint).group(1).replace(",", ""))
    if b.code == "B003":
        share = 20000 / c.budget_floor.usd
    else:
        share = 20000 / c.cost.usd
    assert abs(steps - 100_000 * share) <= 1 and "stages.0.steps" in b.hint


def test_t109_points_at_the_stage_s_seq_len():
    c = _compile("    seq_len: 262144\n", model="llama3.1-8b", tokens="100B")
    (d,) = _codes(c, "T109")
    assert d.path == "stages.0.seq_len"


def test_small_gpu_hours_keep_their_digits():
    c = _compile("    steps: 10\n", tokens="40M", budget="budget: {max_gpu_hours: 0.01}\n")
    text = render_text(c)
    gh = c.cost.gpu_hours
    assert gh < 10 and f"{gh:.3g} of 0.01 GPU-hours" in text
    assert " 0 GPU-hours" not in text and "0 of 0 GPU-hours" not in text


def test_the_data_limit_note_follows_the_direction_of_the_advice():
    """Under-trained (the optimum is a smaller model trained longer) the note warns about training longer on repeats;
    over-trained (the optimum is a larger model) it advises data before growing the model."""
    (under,) = scaling_diagnostics(8e9, 1e11, "data.tokens", 2e10)  # optimum ~6.3B on 126B: 6.3 epochs of 20B
    assert "before training longer" in under.hint and "growing the model" not in under.hint
    (over,) = scaling_diagnostics(8e9, 5e12, "data.tokens", 1e11)  # optimum ~44.7B on 894B: 8.9 epochs of 100B
    assert "before growing the model" in over.hint
