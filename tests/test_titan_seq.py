"""What torchtitan's job cannot run on a layout (a sequence its chunked loss or sequence parallelism cannot split, a
length past the model's RoPE cache, tied embeddings with pipeline stages) keeps `auto` and the search off a
torchtitan plan, and a plan computed for torchtitan whose job cannot be emitted stops the build: the plan's numbers
are always those of the job that runs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llmc.cli import app

SPEC = """\
name: seq
model: {model}
hardware: {{gpu: h100-sxm, count: {count}}}
data: {{sources: [{{name: w, path: /d/*.jsonl}}], seq_len: {seq}, tokens: 100B}}
training: {{precision: bf16, global_batch_tokens: {batch}{backend}}}
{extra}"""


def _spec(tmp_path, model="llama3-8b", count=8, seq=2500, batch=1_280_000, backend="", extra=""):
    p = tmp_path / "s.yaml"
    p.write_text(SPEC.format(model=model, count=count, seq=seq, batch=batch,
                             backend=f", backend: {backend}" if backend else "", extra=extra))
    return p


def _plan_json(spec):
    r = CliRunner().invoke(app, ["plan", str(spec), "--format", "json"])
    return r, (json.loads(r.stdout) if r.exit_code == 0 else None)


def test_auto_plans_a_sequence_torchtitans_loss_cannot_split_on_the_trainer_that_runs_it(tmp_path):
    """2,500 tokens is no multiple of the torchtitan job's 8 loss chunks: `auto` plans llmc's native trainer (and its
    numbers), and the build's launchers run that; a length the chunks divide stays on torchtitan."""
    r, d = _plan_json(_spec(tmp_path))
    assert r.exit_code == 0, r.output
    assert d["backend"]["name"] == "native"
    assert "not a multiple of 8" in d["backend"]["reason"]
    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["build", str(tmp_path / "s.yaml"), "-o", str(out)]).exit_code == 0
    assert json.loads((out / "plan.lock.json").read_text())["backend"]["name"] == "native"
    assert 'BACKEND="${BACKEND:-native}"' in (out / "launch" / "slurm.sbatch").read_text()
    r, d = _plan_json(_spec(tmp_path, seq=2504, batch=1_282_048))
    assert r.exit_code == 0 and d["backend"]["name"] == "torchtitan", r.output


def test_pinned_torchtitan_reports_the_sequence_at_plan_time(tmp_path):
    r = CliRunner().invoke(app, ["plan", str(_spec(tmp_path, backend="torchtitan"))])
    assert r.exit_code == 1
    assert "error[X313] data.seq_len" in r.output and "error[P004] data.seq_len" in r.output
    assert "Traceback" not in r.output


def test_a_sequence_past_the_models_context_keeps_auto_off_torchtitan(tmp_path):
    """Llama 3 70B's max_seq_len is 8,192 (its RoPE cache in torchtitan's job): 8,200-token sequences plan on llmc's
    trainer under `auto` (which runs no pipeline stages: the plan has none), and are an error when torchtitan is
    pinned."""
    kw = dict(model="llama3-70b", count=64, seq=8200, batch=4_198_400)
    r, d = _plan_json(_spec(tmp_path, **kw))
    assert r.exit_code == 0, r.output
    assert d["backend"]["name"] == "native" and d["plan"]["pp"] == 1
    r = CliRunner().invoke(app, ["plan", str(_spec(tmp_path, backend="torchtitan", **kw))])
    assert r.exit_code == 1 and "error[X305] data.seq_len" in r.output


def test_tied_embeddings_get_no_pipeline_stages_on_torchtitan(tmp_path):
    """Llama 3.2 1B ties its embeddings, which torchtitan 0.3.0 refuses with pipeline parallelism: pinning pp is a
    plan error (it was a plan whose job the build silently left out)."""
    r = CliRunner().invoke(app, ["plan", str(_spec(tmp_path, model="llama3.2-1b", seq=4096, batch=2_097_152,
                                                   extra="parallelism: {pp: 2}\n"))])
    assert r.exit_code == 1 and "X303" in r.output and "error[P004]" in r.output


def test_pinned_torchtitan_checks_its_continued_training_stage_jobs_too(tmp_path):
    """A long-context stage runs as its own torchtitan job: 32,764 tokens do not split into the chunked loss's 8
    slices, an error at the stage's seq_len (it used to plan the stage on llmc's trainer without a word)."""
    from test_build_fakes import ROOT

    text = (ROOT / "examples" / "pipeline_llama3_8b.yaml").read_text()
    assert "    seq_len: 32768\n" in text
    spec = tmp_path / "p.yaml"
    spec.write_text(text.replace("    seq_len: 32768\n", "    seq_len: 32764\n").replace(
        "training:\n  precision: bf16\n", "training:\n  backend: torchtitan\n  precision: bf16\n"))
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1 and "error[X313] stages.1.seq_len: stage 'long_context'" in r.output, r.output[-2000:]


def test_fp8_experts_split_over_tp_keep_the_grouped_gemms_alignment(tmp_path):
    """Without EP torchtitan shards each routed expert's width over the TP ranks: 1,440 / 8 = 180 columns, which
    torchao's fp8 grouped GEMM refuses (it needs multiples of 16); tp 2 (720) is fine, and EP keeps whole experts."""
    base = """\
name: g
model: {preset: deepseek-v2-lite, moe: {expert_d_ff: 1440}}
hardware: {gpu: h100-sxm, count: 64}
data: {sources: [{name: w, path: /d/*.jsonl}], seq_len: 4096, tokens: 10B}
training: {precision: fp8, global_batch_tokens: 4_194_304, backend: torchtitan}
"""
    p = tmp_path / "g.yaml"
    for par, ok in (("{tp: 8, ep: 1}", False), ("{tp: 2, ep: 1}", True), ("{tp: 8, ep: 8}", True)):
        p.write_text(base + f"parallelism: {par}\n")
        r = CliRunner().invoke(app, ["plan", str(p)])
        assert (r.exit_code == 0) == ok, (par, r.output[-1500:])
        if not ok:
            assert "180 columns per rank" in r.output and "(X311)" in r.output


@pytest.mark.slow
def test_torchtitans_chunked_loss_refuses_the_lengths_the_plan_refuses():
    """The rule comes from torchtitan's own ChunkedLossWrapper (its default 8 chunks, what llmc's job uses): it refuses
    a 2,500-token sequence and takes a 2,504-token one."""
    import torch
    from torchtitan.components.loss import ChunkedLossWrapper

    from llmc.compiler.backends import get_backend

    cfg = ChunkedLossWrapper.Config()
    assert cfg.num_chunks == get_backend("torchtitan").loss_chunks
    loss = ChunkedLossWrapper(cfg)
    loss.set_lm_head(torch.nn.Linear(8, 16, bias=False))

    def run(seq):
        h = torch.randn(1, seq, 8, requires_grad=True)
        return loss(h, torch.randint(0, 16, (1, seq)))

    run(2504)
    with pytest.raises(Exception, match="divisible by num_chunks"):
        run(2500)


def test_a_stage_inheriting_a_longer_seq_len_is_checked_at_it(tmp_path):
    """A midtrain stage after a 32,764-token long_context stage, with no seq_len of its own, trains at 32,764 (the
    context it starts from): its torchtitan job cannot split that either, an error located on the stage (it was
    checked at data.seq_len, 8,192, and passed)."""
    from test_build_fakes import ROOT

    text = (ROOT / "examples" / "pipeline_llama3_8b.yaml").read_text()
    spec = tmp_path / "p.yaml"
    spec.write_text(text.replace("    seq_len: 32768\n", "    seq_len: 32764\n").replace(
        "training:\n  precision: bf16\n", "training:\n  backend: torchtitan\n  precision: bf16\n").replace(
        "  - name: sft\n", "  - name: anneal\n    kind: midtrain\n    init_from: long_context\n    steps: 100\n\n"
        "  - name: sft\n", 1))
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1 and "error[X313] stages.2: stage 'anneal' (seq_len 32764, inherited)" in r.output, (
        r.output[-2000:])
