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
    # max_batches global batches of the run's sequences, whatever the layout
    assert v.tokens_per_eval == 5 * c.hyper.global_batch_seqs * 128 == 5 * c.plan.micro_batch * c.plan.grad_accum * \
        c.plan.dp * 128
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


def test_a_validation_file_that_is_not_json_lines_is_a_located_error(tmp_path):
    """Every trainer reads eval.validation.files as JSON lines with a text field, or .txt / .md files as one document
    each (llmc.runtime.validation.validation_sources, and the torchtitan job given the same formats): a parquet file
    passed the plan, then failed at the first validation with "not valid UTF-8" (its bytes read as text)."""
    c = _compile(_tiny("eval:\n  validation:\n    files: [heldout/val.parquet, heldout/ok.jsonl, heldout/a.txt]\n"))
    (d,) = [x for x in c.diagnostics if x.code == "E011"]
    assert d.severity == "error" and d.path == "eval.validation.files.0" and d.line == 12
    assert "val.parquet" in d.message and "JSON lines" in d.message and d.hint
    from llmc.runtime.data import Assets
    from llmc.runtime.validation import split_assets, validation_sources

    # the two it accepts are what the runtime reads: JSON lines and a text document
    files = [f for f in c.spec.eval.validation.files if not f.endswith(".parquet")]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text('{"text": "a"}\n')
    spec_v = c.spec.eval.validation.model_copy(update={"files": files})
    root = str(tmp_path)
    assets = split_assets(Assets(root, root + "/assets", (), root + "/cache"), spec_v, resolve=lambda p: tmp_path / p,
                          log=lambda *_: None)
    assert [s.format for s in validation_sources(assets)] == ["jsonl", "text"]


def test_eval_task_without_decontamination_benchmark_warns():
    extra = "eval: {tasks: [hellaswag, evals/my_mc.yaml]}\n"
    c = _compile(_tiny(extra, data_extra="  quality: {decontaminate: {benchmarks: [bench/hellaswag.jsonl]}}\n"))
    warned = [d for d in c.diagnostics if d.code == "E002"]
    assert [d.path for d in warned] == ["eval.tasks.1"] and "my_mc" in warned[0].message
    assert c.evaluation.tasks.stages == ["pretrain"]  # default: the last stage
    none = _compile(_tiny(extra))
    assert _diag(none, "E006").severity == "info"
    assert not [d for d in none.diagnostics if d.code == "E007"]
    vllm = _compile(_tiny("eval: {tasks: [hellaswag], backend: vllm}\n"))
    assert _diag(vllm, "E007").severity == "info" and vllm.evaluation.tasks.backend == "vllm"


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


def joined_acc(model_dir) -> float:
    """Share of QUESTIONS whose gold answer has the highest log-likelihood under ``model_dir``, computed with
    transformers; lm-evaluation-harness splits context / continuation tokens of the joined string."""
    import torch
    import transformers
    from test_evaluate import QUESTIONS

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for q in QUESTIONS:
        ctx_s = f"Question: {q['question']}\nAnswer:"
        ctx = tok(ctx_s, add_special_tokens=False)["input_ids"]
        scores = []
        for ch in q["choices"]:
            whole = tok(ctx_s + " " + ch, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    return correct / len(QUESTIONS)


# ------------------------------------------------------------------------------ benchmark evals after a stage


@pytest.mark.slow
def test_launch_runs_a_local_task_on_the_stage_export_and_build_emits_it(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_build_fakes import lock_for
    from test_evaluate import QUESTIONS, TASK_YAML

    from llmc.emit import render_artifacts
    from llmc.runtime import corpus, evaluate
    from llmc.runtime.entry import run_stage
    from llmc.spec.facts import gather_facts
    from llmc.spec.schema import RunSpec

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "tiny_mc.jsonl"))
    spec = {"name": "e", "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                       vocab_size=512, max_seq_len=64),
            "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 512},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}},
            "eval": {"tasks": ["tasks/tiny_mc.yaml"], "batch_size": 2}}
    lock = lock_for(spec, plan={"micro_batch": 8}, hyper={"warmup_steps": 1}, spec_path=str(tmp_path / "spec.yaml"))
    assert lock["evaluation"]["tasks"]["stages"] == ["pretrain"]
    run = RunSpec.model_validate(spec)
    files = render_artifacts(__import__("llmc.compiler.compile", fromlist=["x"]).compile_spec(
        run, str(tmp_path / "spec.yaml"), facts=gather_facts(run, tmp_path)))
    emitted = json.loads(files["eval/tasks.json"])
    assert emitted["tasks"] == ["tasks/tiny_mc.yaml"] and emitted["results"] == {
        "pretrain": "run/pretrain/eval/eval_results.json"}
    # lm_eval knows a task file by its task: name (the results below are keyed by it), not by the file's name
    assert "--tasks tiny_local_mc --batch_size 2" in emitted["lm_eval_commands"]["pretrain"]
    # the build's copy of the task file (tests/test_eval_self_contained.py), relative to the build directory
    assert "--include_path eval/tasks/tiny_mc" in emitted["lm_eval_commands"]["pretrain"]

    out = tmp_path / "run" / "pretrain"
    res = run_stage(lock, None, out, tmp_path)
    assert res["status"] == "done" and "eval" not in res and not (out / "eval").exists()  # the trainer does not
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    argv = ["--lock", str(tmp_path / "plan.lock.json"), "--stage", "pretrain", "--out", str(out)]
    assert evaluate.main(argv) == 0  # the eval step (llmc launch and every launcher run it after the stage)
    saved = json.loads((out / "eval" / "eval_results.json").read_text())
    acc = saved["results"]["tiny_local_mc"]["acc,none"]
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["samples"]["tiny_local_mc"] == 4 and summary["tasks"]["tiny_local_mc"]["acc"] == acc
    # independent check on the exported weights: share of questions whose gold answer has the highest
    # log-likelihood (lm-evaluation-harness splits context / continuation tokens of the joined string)
    assert acc == pytest.approx(joined_acc(out / "hf"))
    # a second launch of the finished stage does not evaluate again
    before = (out / "eval" / "eval_results.json").stat().st_mtime_ns
    assert run_stage(lock, None, out, tmp_path)["status"] == "done" and evaluate.main(argv) == 0
    assert (out / "eval" / "eval_results.json").stat().st_mtime_ns == before


PPL_YAML = """\
task: tiny_bpb
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _saved_checkpoints(steps: int, interval: int, keep: int) -> list[int]:
    """The trainer's checkpoint steps, simulated save by save: every ``interval`` steps before the last, then
    the last; after each save only the newest ``keep`` stay (llmc.runtime.train / checkpoint._publish)."""
    kept: list[int] = []
    for s in range(1, steps + 1):
        if (s % interval == 0 and s < steps) or s == steps:
            kept = (kept + [s])[-keep:]
    return kept


@pytest.mark.parametrize("steps,interval,every,keep", [
    (500, 100, 1, 3), (500, 100, 2, 3), (500, 100, 2, 10), (10, 3, 1, 2), (7, 7, 1, 3), (9, 3, 1, 1)])
def test_checkpoint_eval_steps_are_the_kth_checkpoints_still_kept(steps, interval, every, keep):
    from llmc.compiler.evaluation import checkpoint_eval_steps

    c = checkpoint_eval_steps(steps, interval, every, keep)
    mids = list(range(interval, steps, interval))
    assert c.saved == mids + [steps]
    kept = _saved_checkpoints(steps, interval, keep)
    assert c.scored == [s for i, s in enumerate(mids, 1) if i % every == 0 and s in kept]
    if c.chosen:  # keep_needed is the least keep_latest that scores every chosen checkpoint
        assert set(c.chosen) <= set(_saved_checkpoints(steps, interval, c.keep_needed))
        assert c.keep_needed == 1 or not set(c.chosen) <= set(_saved_checkpoints(steps, interval, c.keep_needed - 1))
    assert checkpoint_eval_steps(steps, interval, every, keep, intermediate=False).saved == [steps]


def test_every_checkpoints_in_lock_plan_and_located_pruning_warning():
    from llmc.emit.lock import lock_dict

    extra = "eval:\n  tasks: [hellaswag]\n  every_checkpoints: EVERY\n"
    base = _tiny("training: {precision: fp32, global_batch_tokens: 4096, checkpoint: {interval_steps: 100}}\n")
    base = base.replace("training: {precision: fp32, global_batch_tokens: 4096}\n", "", 1)
    c = _compile(base + extra.replace("EVERY", "1"))  # 500 steps: checkpoints 100..400 and 500; keep 3
    assert c.hyper.steps == 500
    t = lock_dict(c)["evaluation"]["tasks"]
    assert t["every_checkpoints"] == 1 and t["checkpoint_steps"] == {"pretrain": [300, 400]}
    d = _diag(c, "E008")
    assert d.severity == "warning" and d.line == base.count("\n") + 3 and "100, 200" in d.message
    assert "keep_latest: 5" in d.hint
    c2 = _compile(base + extra.replace("EVERY", "2"))
    assert lock_dict(c2)["evaluation"]["tasks"]["checkpoint_steps"] == {"pretrain": [400]}
    assert "steps 200 are pruned" in _diag(c2, "E008").message
    off = lock_dict(_compile(base + "eval:\n  tasks: [hellaswag]\n"))["evaluation"]["tasks"]
    assert "every_checkpoints" not in off and "checkpoint_steps" not in off  # the lock is unchanged when off
    from llmc.report import render_text

    assert "pretrain: also checkpoints at steps 400 (every_checkpoints 2)" in render_text(c2)
    from llmc.emit import render_artifacts

    emitted = json.loads(render_artifacts(c2)["eval/tasks.json"])
    assert emitted["every_checkpoints"] == 2
    assert emitted["checkpoint_results"] == {"pretrain": {"400": "run/pretrain/eval/step-400/eval_results.json"}}


@pytest.mark.slow
def test_eval_step_scores_every_kth_checkpoint_then_the_export(tmp_path):
    """A native run with checkpoints at steps 1, 2, 3 (and 4, the last) and every_checkpoints 1: the eval
    step scores the kept ones into eval/step-N/ on the same suite (the scored weights checked independently),
    deletes its temporary HF copies, skips scored steps on a re-run, and ``llmc report`` lists them."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_build_fakes import lock_for
    from test_evaluate import QUESTIONS, TASK_YAML

    from llmc.runreport import make_report, read_checkpoint_evals, summary_lines
    from llmc.runtime import corpus, evaluate
    from llmc.runtime.entry import run_stage
    from llmc.runtime.hf_io import export_stage
    from llmc.runtime.job import TrainJob

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data="mc.jsonl"))
    docs = [json.loads(x) for x in (tmp_path / "docs.jsonl").read_text().splitlines()[:3]]
    (tmp_path / "tasks" / "text.jsonl").write_text("".join(json.dumps({"text": d["text"][:300]}) + "\n" for d in docs))
    (tmp_path / "tasks" / "bpb.yaml").write_text(PPL_YAML.format(data="text.jsonl"))
    spec = {"name": "e", "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                       vocab_size=512, max_seq_len=64),
            "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 1024},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 1, "keep_latest": 3}},
            "eval": {"tasks": ["tasks/mc.yaml", "tasks/bpb.yaml"], "batch_size": 2, "every_checkpoints": 1}}
    lock = lock_for(spec, plan={"micro_batch": 8}, hyper={"warmup_steps": 1}, spec_path=str(tmp_path / "spec.yaml"))
    assert lock["evaluation"]["tasks"]["checkpoint_steps"] == {"pretrain": [2, 3]}  # step 1 pruned (E008)
    assert any(d["code"] == "E008" for d in lock["diagnostics"])
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    out = tmp_path / "run" / "pretrain"
    assert run_stage(lock, None, out, tmp_path)["status"] == "done"
    # the compiler's model of the trainer's saving and pruning
    assert sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")) == \
        _saved_checkpoints(4, 1, 3) == [2, 3, 4]
    hf_before = {p.name: p.stat().st_mtime_ns for p in (out / "hf").iterdir()}
    argv = ["--lock", str(tmp_path / "plan.lock.json"), "--stage", "pretrain", "--out", str(out)]
    assert evaluate.main(argv) == 0
    assert sorted(p.name for p in (out / "eval").iterdir() if p.name.startswith(("step-", ".hf"))) == \
        ["step-2", "step-3"]  # one result per chosen step; the temporary HF copies are gone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "hf").iterdir()} == hf_before
    s = {n: json.loads((out / f"eval/step-{n}/summary.json").read_text()) for n in (2, 3)}
    final = json.loads((out / "eval" / "summary.json").read_text())
    for n in (2, 3):
        res = json.loads((out / f"eval/step-{n}/eval_results.json").read_text())["results"]
        assert s[n]["step"] == n and s[n]["tasks"]["tiny_local_mc"]["acc"] == res["tiny_local_mc"]["acc,none"]
        assert set(s[n]["tasks"]) == set(final["tasks"]) == {"tiny_local_mc", "tiny_bpb"}  # the same suite
    bpb = [s[2]["tasks"]["tiny_bpb"]["bits_per_byte"], s[3]["tasks"]["tiny_bpb"]["bits_per_byte"],
           final["tasks"]["tiny_bpb"]["bits_per_byte"]]
    assert len(set(bpb)) == 3 and bpb[2] < bpb[0]  # each checkpoint scored on its own weights; training helps
    # independent check of which weights step 2's score is of: its checkpoint exported here, scored by hand
    job = TrainJob.from_lock(lock, None, build_dir=tmp_path)
    export_stage(job, out / "checkpoints" / "step-00000002", tmp_path / "x2", tokenizer_dir=out / "hf")
    assert s[2]["tasks"]["tiny_local_mc"]["acc"] == pytest.approx(joined_acc(tmp_path / "x2"))
    # re-run after the final summary is lost: the scored steps are skipped, only the export is scored again
    mtimes = {n: (out / f"eval/step-{n}/eval_results.json").stat().st_mtime_ns for n in (2, 3)}
    (out / "eval" / "summary.json").unlink()
    assert evaluate.main(argv) == 0
    assert {n: (out / f"eval/step-{n}/eval_results.json").stat().st_mtime_ns for n in (2, 3)} == mtimes
    assert (out / "eval" / "summary.json").is_file()
    # llmc report: a per-step table and plot of the same suite
    ck = read_checkpoint_evals(tmp_path / "run", lock)
    assert [e.step for e in ck["pretrain"]] == [2, 3]
    lines = summary_lines(tmp_path / "run", lock)
    want = (f"pretrain: eval tiny_bpb bits_per_byte by step: 2 {bpb[0]:.4f}, 3 {bpb[1]:.4f}, "
            f"final (4) {json.loads((out / 'eval' / 'summary.json').read_text())['tasks']['tiny_bpb']['bits_per_byte']:.4f}")
    assert want in lines
    paths = make_report(tmp_path / "run", lock, tmp_path / "report")
    assert (tmp_path / "report" / "pretrain-evals.png") in paths
    page = paths[-1].read_text()
    assert "Benchmark evals by checkpoint: pretrain" in page and "<th>2</th><th>3</th><th>final (4)</th>" in page


def test_cli_reports_eval_errors_on_located_lines_and_exits_1(tmp_path):
    from typer.testing import CliRunner

    from llmc.cli import app

    spec = tmp_path / "bad.yaml"
    spec.write_text(_tiny("eval:\n  validation:\n    files: [data/web/held.jsonl]\n  task_stages: [sft]\n"
                          "  tasks: [hellaswag]\n"))
    r = CliRunner().invoke(app, ["plan", str(spec)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if "error[" in ln]
    assert any(ln.startswith(f"{spec}:12: error[E003] eval.validation.files.0:") for ln in lines), r.output
    assert any(ln.startswith(f"{spec}:13: error[E004] eval.task_stages.0:") for ln in lines), r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------ the eval step on every backend

PIPE = """\
name: p
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources: [{name: python-docs, format: builtin}]
  tokenizer: {train: true, vocab_size: 2048, chat_template: llama3}
  seq_len: 128
  tokens: 300K
training: {precision: fp32, global_batch_tokens: 4096}
stages:
  - {name: base, kind: pretrain}
  - name: chat
    kind: sft
    init_from: base
    steps: 10
    data: {sources: [{name: synthetic-chat, format: builtin, kind: chat}], seq_len: 128, tokens: 20K}
eval:
  tasks: [tasks/mc.yaml]
  task_stages: [base, chat]
"""


@pytest.fixture(scope="module")
def pipe_build(tmp_path_factory):
    from llmc.buildfs import write_build
    from llmc.emit import render_artifacts

    d = tmp_path_factory.mktemp("pipe")
    (d / "spec.yaml").write_text(PIPE)
    run, lines = loads_spec(PIPE, file=str(d / "spec.yaml"))
    c = compile_spec(run, str(d / "spec.yaml"), lines, spec_bytes=PIPE.encode())
    assert c.evaluation.tasks.stages == ["base", "chat"]
    write_build(d / "b", render_artifacts(c))
    return d / "b"


def _is_eval(c) -> bool:
    return "llmc.runtime.evaluate" in c.argv


@pytest.mark.parametrize("backend", ["native", "torchtitan", "deepspeed"])
def test_launch_evaluates_after_each_listed_stage_on_every_backend(pipe_build, backend):
    import shutil

    from llmc.launch import launch_commands

    b = pipe_build
    shutil.rmtree(b / "run", ignore_errors=True)
    cmds = launch_commands(b, backend=backend, nproc=1, gpu=False)
    evals = [i for i, c in enumerate(cmds) if _is_eval(c)]
    assert [cmds[i].stage for i in evals] == ["base", "chat"]
    for i in evals:
        c, prev = cmds[i], cmds[i - 1]
        assert prev.stage == c.stage and not _is_eval(prev)  # right after the stage (or its export)
        assert c.argv[c.argv.index("--out") + 1] == str(b.resolve() / "run" / c.stage)
        assert c.argv[c.argv.index("--lock") + 1] == str(b.resolve() / "plan.lock.json")
        assert c.skip_reason is None
    base = [c for c in cmds if c.stage == "base"]
    if backend == "torchtitan":  # DCP checkpoints -> run/base/hf -> eval
        assert "llmc.runtime.hf_io" in base[1].argv and _is_eval(base[2])
    if backend == "deepspeed":
        assert "llmc.runtime.ds_train" in base[0].argv and _is_eval(base[1])
    # a stage evaluated under the lock's eval settings (its summary's record) is not evaluated again
    from llmc.runtime.evaluate import EVAL_FINGERPRINT, eval_fingerprint

    lock = json.loads((b / "plan.lock.json").read_text())
    (b / "run" / "base" / "eval").mkdir(parents=True)
    (b / "run" / "base" / "eval" / "summary.json").write_text(json.dumps({EVAL_FINGERPRINT: eval_fingerprint(lock,
                                                                                                             "base")}))
    again = [c for c in launch_commands(b, backend=backend, nproc=1, gpu=False) if _is_eval(c)]
    assert again[0].skip_reason and "already evaluated" in again[0].skip_reason and again[1].skip_reason is None
    # one scored under other settings (or by an older llmc, which records none) runs again (its step sets it aside)
    lock["evaluation"]["tasks"]["limit"] = 3
    (b / "run" / "base" / "eval" / "summary.json").write_text(json.dumps({EVAL_FINGERPRINT: eval_fingerprint(lock,
                                                                                                             "base")}))
    assert [c.skip_reason for c in launch_commands(b, backend=backend, nproc=1, gpu=False) if _is_eval(c)] == [None] * 2
    (b / "run" / "base" / "eval" / "summary.json").write_text("{}")
    assert [c.skip_reason for c in launch_commands(b, backend=backend, nproc=1, gpu=False) if _is_eval(c)] == [None] * 2
    shutil.rmtree(b / "run")


def _shims(d, names):
    """Executables that append their name and arguments to d/calls.log (instead of running anything)."""
    import os
    import stat

    d.mkdir(exist_ok=True)
    for n in names:
        p = d / n
        p.write_text(f'#!/bin/sh\necho "{n} $*" >> "{d}/calls.log"\n')
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


def _calls(d) -> list[str]:
    import re

    log = d / "calls.log"
    out = []
    for ln in (log.read_text().splitlines() if log.exists() else []):
        m = re.search(r"llmc\.runtime\.(\w+).*?--stage (\w+)", ln)
        if " titan-start " in ln:  # (the check as a torchtitan stage starts, not a step of the run)
            continue
        if "entry prepare" in ln:
            out.append("prepare")
        elif m:
            out.append(f"{m.group(1)} {m.group(2)}")
        elif "torchtitan.train" in ln:
            out.append("titan base")
    log.unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("script,env,order", [
    ("native/launch.sh", {}, ["prepare", "entry base", "evaluate base", "entry chat", "evaluate chat"]),
    ("launch/torchrun_single_node.sh", {"BACKEND": "native"},
     ["prepare", "entry base", "evaluate base", "entry chat", "evaluate chat"]),
    ("launch/torchrun_single_node.sh", {"BACKEND": "torchtitan"},
     ["prepare", "titan base", "hf_io base", "evaluate base", "entry chat", "evaluate chat"]),
    ("launch/torchrun_single_node.sh", {"BACKEND": "deepspeed"},
     ["prepare", "ds_train base", "evaluate base", "entry chat", "evaluate chat"]),
    ("launch/torchrun_multi_node.sh", {"BACKEND": "torchtitan", "MASTER_ADDR": "h0"},
     ["prepare", "titan base", "hf_io base", "evaluate base", "entry chat", "evaluate chat"]),
    ("launch/slurm.sbatch", {"BACKEND": "native", "SLURM_JOB_NODELIST": "h0", "SLURM_NNODES": "1",
                             "SLURM_JOB_ID": "1"},
     ["prepare", "entry base", "evaluate base", "entry chat", "evaluate chat"]),
])
def test_emitted_launchers_run_the_eval_step_after_each_stage(pipe_build, tmp_path, script, env, order):
    import shutil
    import subprocess

    b = pipe_build
    shutil.rmtree(b / "run", ignore_errors=True)
    sh = tmp_path / "bin"
    penv = {**_shims(sh, ["python", "torchrun", "deepspeed", "srun"]), **env, "SLURM_SUBMIT_DIR": str(b)}
    (sh / "scontrol").write_text("#!/bin/sh\necho h0\n")
    (sh / "scontrol").chmod(0o755)

    def run() -> list[str]:
        r = subprocess.run(["bash", str(b / script)], env=penv, cwd=b, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return _calls(sh)

    assert run() == order
    # the stage finished and was evaluated: its training does not run again, and its eval is the eval step's to
    # skip (it compares the summary's record with the lock: llmc.runtime.evaluate.eval_change); the next stage runs
    for f in ("DONE.json", "eval/summary.json", "hf/config.json"):
        (b / "run" / "base" / f).parent.mkdir(parents=True, exist_ok=True)
        (b / "run" / "base" / f).write_text("{}")
    assert run() == [c for c in order if not c.endswith(" base") or c == "evaluate base"]
    if "multi_node" in script:  # a claim left by a stopped node: taken over once stale, and the eval runs
        (b / "run" / "chat" / "eval.claim").mkdir(parents=True)
        penv.update(CLAIM_STALE_S="1", CLAIM_POLL_S="1")
        assert run() == ["prepare", "evaluate base", "entry chat", "evaluate chat"]
    shutil.rmtree(b / "run")


def _ds_stage(folder, *, zero: int, precision: str, evaluated: bool) -> list[str]:
    """A one-rank DeepSpeed pretrain of the micro model in ``folder`` (its lock, docs, ds.json): ``evaluated``,
    512 tokens scored by the eval step on a local multiple-choice task; else 1024 tokens with checkpoints every
    step (the newest 3 kept) and every checkpoint listed for evaluation. Returns llmc's DeepSpeed runner's
    arguments (output in ``folder/run/pretrain``; not evaluated: without resuming)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_build_fakes import lock_for
    from test_evaluate import QUESTIONS, TASK_YAML

    from llmc.runtime import corpus

    folder.mkdir(parents=True, exist_ok=True)
    corpus.write_corpus(folder / "docs.jsonl", max_docs=100)
    spec = {"name": "e", "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                       vocab_size=512, max_seq_len=64),
            "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 1024},
            "training": {"precision": precision, "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 1, "keep_latest": 3}},
            "eval": {"tasks": ["hellaswag"], "every_checkpoints": 1}}
    if evaluated:
        (folder / "tasks").mkdir()
        (folder / "tasks" / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
        (folder / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data="mc.jsonl"))
        spec["data"]["tokens"] = 512
        spec["training"] = {"precision": precision, "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}}
        spec["eval"] = {"tasks": ["tasks/mc.yaml"], "batch_size": 4}
    lock = lock_for(spec, plan={"micro_batch": 8, "zero_stage": zero}, hyper={"warmup_steps": 1},
                    spec_path=str(folder / "spec.yaml"))
    (folder / "plan.lock.json").write_text(json.dumps(lock))
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 8,
           "zero_optimization": {"stage": zero}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.1, "torch_adam": True}},
           "bf16": {"enabled": precision == "bf16"}}
    (folder / "ds.json").write_text(json.dumps(cfg))
    return ["--lock", str(folder / "plan.lock.json"), "--ds-config", str(folder / "ds.json"), "--out",
            str(folder / "run" / "pretrain"), "--assets", str(folder), *([] if evaluated else ["--no-resume"])]


@pytest.fixture(scope="module")
def ds_stages(request, tmp_path_factory) -> dict:
    """The DeepSpeed stages this session's tests of this module inspect (``-k`` or node ids narrow them), each
    trained by llmc's DeepSpeed runner (``python -m llmc.runtime.ds_train``'s main on its own arguments), all in
    one one-rank torchrun launch (its start-up, seconds of CPU per process, paid once): name -> (its folder, its
    :func:`test_deepspeed.ds_main_cases` run)."""
    pytest.importorskip("deepspeed")
    from test_deepspeed import ds_main_cases

    wanted = {}
    for it in request.session.items:
        if getattr(it, "module", None) is not request.module:
            continue
        name = getattr(it, "originalname", it.name)
        if name == "test_deepspeed_stage_is_evaluated_by_the_eval_step":
            wanted["evaluated"] = dict(zero=1, precision="fp32", evaluated=True)
        elif name == "test_eval_step_scores_a_deepspeed_stages_intermediate_checkpoints":
            p = it.callspec.params
            wanted[f"ckpt-{p['zero']}-{p['precision']}"] = dict(zero=p["zero"], precision=p["precision"],
                                                                evaluated=False)
    root = tmp_path_factory.mktemp("ds_stages")
    cases = {n: (root / n, _ds_stage(root / n, **kw)) for n, kw in wanted.items()}
    runs = ds_main_cases(cases, 1) if cases else {}
    return {n: (root / n, run) for n, run in runs.items()}


def _ds_trained(ds_stages, name: str):
    """Case ``name`` of ``ds_stages``: its folder, after checking that the runner returned 0."""
    from test_deepspeed import ds_main_result

    folder, run = ds_stages[name]
    r = ds_main_result(run, 1)
    assert r["rc"] == [0], r["stdout"][-3000:] + r["stderr"][-3000:]
    return folder


@pytest.mark.slow
def test_deepspeed_stage_is_evaluated_by_the_eval_step(ds_stages, monkeypatch):
    """DeepSpeed's trainer ends with run/<stage>/hf and does not evaluate; the launch's eval step does, on
    the exported weights (checked against an independent log-likelihood computation). The eval step is
    ``python -m llmc.runtime.evaluate``'s main, called here in this process."""
    pytest.importorskip("lm_eval")
    from llmc.runtime import evaluate

    tmp_path = _ds_trained(ds_stages, "evaluated")
    out = tmp_path / "run" / "pretrain"
    assert (out / "DONE.json").is_file() and (out / "hf" / "config.json").is_file()
    assert not (out / "eval").exists()  # the DeepSpeed trainer does not evaluate: the eval step must
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--lock", str(tmp_path / "plan.lock.json"), "--stage", "pretrain", "--out",
                          str(out)]) == 0
    summary = json.loads((out / "eval" / "summary.json").read_text())
    acc = json.loads((out / "eval" / "eval_results.json").read_text())["results"]["tiny_local_mc"]["acc,none"]
    assert summary["tasks"]["tiny_local_mc"]["acc"] == acc and summary["samples"]["tiny_local_mc"] == 4
    assert acc == pytest.approx(joined_acc(out / "hf"))


# a micro model checkpointed every step (torchtitan keeps the last 3), every checkpoint scored: steps 2 and 3 listed
CHECKPOINT_EVAL_SPEC = {
    "name": "e", "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                               vocab_size=512, max_seq_len=64),
    "hardware": {"gpu": "cpu", "count": 1},
    "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}], "seq_len": 32, "tokens": 1024},
    "training": {"precision": "fp32", "global_batch_tokens": 256, "checkpoint": {"interval_steps": 1, "keep_latest": 3}},
    "eval": {"tasks": ["hellaswag"], "every_checkpoints": 1}}


def test_eval_step_scores_a_torchtitan_stages_own_checkpoints(tmp_path, monkeypatch):
    """A stage torchtitan trained leaves no llmc checkpoints, only its DCP ``step-N`` folders under the build's
    ``outputs/torchtitan``: every_checkpoints scores those, each from its own weights (the step's tensors reach
    the temporary Hugging Face export unchanged), and the temporary copies are removed."""
    import sys
    from pathlib import Path

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    import llmc.runtime.evaluate as evaluate
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model

    sys.path.insert(0, str(Path(__file__).parent))
    from test_build_fakes import lock_for

    lock = lock_for(CHECKPOINT_EVAL_SPEC, plan={"micro_batch": 8}, spec_path=str(tmp_path / "spec.yaml"))
    steps = lock["evaluation"]["tasks"]["checkpoint_steps"]["pretrain"]
    assert steps == [2, 3]
    job = TrainJob.from_lock(lock, None, build_dir=tmp_path)
    embed = {}
    for n in (2, 3, 4):  # what torchtitan keeps with interval 1 and keep_latest 3 after 4 steps
        m = build_model(job.arch, seed=n)
        embed[n] = m.tok_embeddings.weight.detach().clone()
        dcp.save({"model": m.state_dict()}, checkpoint_id=str(tmp_path / f"outputs/torchtitan/checkpoint/step-{n}"))
    out = tmp_path / "run" / "pretrain"
    out.mkdir(parents=True)
    seen = {}

    def fake_summarize(model_dir, dest, plan, job, what, log, label="", **extra):
        seen[extra["step"]] = load_file(str(next(Path(model_dir).glob("*.safetensors"))))["model.embed_tokens.weight"]
        return {"step": extra["step"]}

    monkeypatch.setattr(evaluate, "_summarize", fake_summarize)
    assert sorted(evaluate.checkpoint_evals(lock, job, out, log=lambda m: None, build_dir=tmp_path)) == steps
    for n in steps:  # the export is bf16: the step's own weights, rounded, and no other step's
        assert torch.equal(seen[n], embed[n].to(seen[n].dtype)), n
        assert not torch.equal(seen[n], embed[4].to(seen[n].dtype))
    assert not list((out / "eval").glob(".hf-step-*"))
    # without the build directory there is nothing to score (no llmc checkpoints): nothing is made up
    seen.clear()
    assert evaluate.checkpoint_evals(lock, job, out, log=lambda m: None) == {} and not seen
    # a step's saved scores that are not this lock's (an older llmc's summary: no record) whose checkpoint is gone
    # (pruned) stay where they are, said in one line: nothing is set aside that cannot be scored again
    (out / "eval" / "step-2").mkdir(parents=True)
    (out / "eval" / "step-2" / "summary.json").write_text('{"tasks": {"mc": {"acc": 0.5}}, "samples": {"mc": 4}}')
    said: list[str] = []
    assert evaluate.checkpoint_evals(lock, job, out, log=said.append) == {} and not seen
    assert (out / "eval" / "step-2" / "summary.json").is_file() and not list(out.glob("eval/step-2.set-aside-*"))
    assert any("step 2's scores are not this lock's" in s and "kept as they are" in s for s in said), said


def test_eval_step_finds_a_torchtitan_stages_checkpoints_under_llmc_run_dir(tmp_path, monkeypatch):
    """With LLMC_RUN_DIR set (the multi-node launchers export it; the torchtitan job writes its dump folder under
    it), `python -m llmc.runtime.evaluate` scores the job's DCP checkpoints there, not under the build directory,
    which then holds none (it looked only there and scored nothing, saying nothing was checkpointed)."""
    import json

    import torch.distributed.checkpoint as dcp
    from test_build_fakes import lock_for

    import llmc.runtime.evaluate as evaluate
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model

    build, runs = tmp_path / "build", tmp_path / "shared"
    build.mkdir()
    lock = lock_for(CHECKPOINT_EVAL_SPEC, plan={"micro_batch": 8}, spec_path=str(build / "spec.yaml"))
    (build / "plan.lock.json").write_text(json.dumps(lock))
    steps = lock["evaluation"]["tasks"]["checkpoint_steps"]["pretrain"]
    job = TrainJob.from_lock(lock, None, build_dir=build)
    for n in (2, 3, 4):
        dcp.save({"model": build_model(job.arch, seed=n).state_dict()},
                 checkpoint_id=str(runs / f"outputs/torchtitan/checkpoint/step-{n}"))
    out = runs / "run" / "pretrain"
    (out / "hf").mkdir(parents=True)
    (out / "hf" / "config.json").write_text("{}")  # the stage's export (scored last, by the stand-in below)
    scored = []
    monkeypatch.setattr(evaluate, "_summarize", lambda *a, **extra: scored.append(extra.get("step")) or {})
    argv = ["--lock", str(build / "plan.lock.json"), "--stage", "pretrain", "--out", str(out)]
    monkeypatch.delenv("LLMC_RUN_DIR", raising=False)
    assert evaluate.main(argv) == 0 and scored == [None]  # the build directory holds no checkpoints
    scored.clear()
    monkeypatch.setenv("LLMC_RUN_DIR", str(runs))
    assert evaluate.main(argv) == 0 and scored == [*steps, None]


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (0, "bf16")])
def test_eval_step_scores_a_deepspeed_stages_intermediate_checkpoints(ds_stages, monkeypatch, zero, precision):
    """A DeepSpeed stage keeps its intermediate checkpoints in DeepSpeed's format (``checkpoints/deepspeed/step-
    XXXXXXXX``, pruned to keep_latest) and writes an llmc checkpoint only at the end: every_checkpoints scores
    the listed steps from DeepSpeed's checkpoints. The compiler's list is what ds_train keeps; each step's
    export holds that step's fp32 master weights, read here straight from the ZeRO-1/3 optimizer shard (ZeRO-0:
    the saved module); the state read at the last step equals the llmc checkpoint ds_train wrote from
    engine.module (ZeRO-3: DeepSpeed's consolidated state dict)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    import llmc.runtime.evaluate as evaluate
    from llmc.runtime.checkpoint import list_checkpoints, read_model_state
    from llmc.runtime.job import TrainJob

    tmp_path = _ds_trained(ds_stages, f"ckpt-{zero}-{precision}")  # the stage, trained without resuming
    lock = json.loads((tmp_path / "plan.lock.json").read_text())
    steps = lock["evaluation"]["tasks"]["checkpoint_steps"]["pretrain"]
    assert steps == [2, 3]  # 4 steps, saved at 1, 2, 3 and 4; the newest 3 kept; the last is the export
    out = tmp_path / "run" / "pretrain"
    ds_dir = out / "checkpoints" / "deepspeed"
    assert sorted(p.name for p in ds_dir.glob("step-*")) == [f"step-{n:08d}" for n in (2, 3, 4)]
    llmc_ck = list_checkpoints(out / "checkpoints")
    assert [n for n, _ in llmc_ck] == [4]  # the only llmc checkpoint

    def master(n: int) -> dict[str, torch.Tensor]:
        """Step n's weights. ZeRO-1/3: the fp32 master weights in the single rank's optimizer shard, the
        parameters of each group laid end to end in the order of the model states' param_shapes (DeepSpeed's
        flat partition; one rank, so nothing is split or padded). ZeRO-0: the module state the engine saved."""
        d = ds_dir / f"step-{n:08d}"
        states = torch.load(next(d.glob("*model_states.pt")), map_location="cpu", weights_only=False)
        if zero == 0:
            return {k: v for k, v in states["module"].items() if k in final}
        (optim,) = d.glob("*zero_pp_rank_0_*optim_states.pt")
        flat = torch.load(optim, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        res = {}
        key = "fp32_flat_groups" if zero == 3 else "single_partition_of_fp32_groups"
        for group, tensor in zip(states["param_shapes"], flat[key], strict=True):
            off = 0
            for name, shape in group.items():
                res[name] = tensor[off: off + shape.numel()].view(shape)
                off += shape.numel()
        return res

    final = read_model_state(llmc_ck[0][1])
    conv = evaluate.ds_checkpoint_state(ds_dir, "step-00000004")
    assert set(conv) == set(final) and all(torch.equal(conv[k], final[k].float()) for k in final)
    assert torch.equal(master(4)["tok_embeddings.weight"], final["tok_embeddings.weight"].float())

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    seen = {}

    def fake_run_eval(config, out_dir):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sd = load_file(str(next(Path(config.model_dir).glob("*.safetensors"))))
        seen[out_dir.name] = sd["model.embed_tokens.weight"]
        (out_dir / "eval_results.json").write_text(json.dumps({"results": {"hellaswag": {"acc,none": 0.25}}}))
        return evaluate.EvalSummary(out_dir / "eval_results.json", {"hellaswag": {"acc": 0.25}}, {"hellaswag": 4},
                                    "test")

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    job = TrainJob.from_lock(lock, "pretrain", build_dir=tmp_path)
    logs = []
    assert evaluate.stage_eval(lock, job, out, log=logs.append, build_dir=tmp_path)["tasks"] == {"hellaswag": {"acc": 0.25}}
    for n in steps:  # the export is bf16: the step's own master weights, rounded, and no other step's
        emb = master(n)["tok_embeddings.weight"]
        assert torch.equal(seen[f"step-{n}"], emb.to(seen[f"step-{n}"].dtype)), n
        assert not torch.equal(seen[f"step-{n}"], final["tok_embeddings.weight"].to(seen[f"step-{n}"].dtype))
        s = json.loads((out / "eval" / f"step-{n}" / "summary.json").read_text())
        assert s["step"] == n and s["checkpoint"] == f"checkpoints/deepspeed/step-{n:08d}"
        assert (out / "eval" / f"step-{n}" / "eval_results.json").is_file()
    assert not torch.equal(seen["step-2"], seen["step-3"])
    assert (out / "eval" / "summary.json").is_file() and not list((out / "eval").glob(".hf-step-*"))


def test_local_task_files_are_read_for_their_lm_eval_name_and_a_missing_one_is_flagged(tmp_path):
    """eval.tasks' local files: each one's ``task:`` (or ``group:``) name is what lm_eval is given (as llmc's eval
    step resolves it); a missing file, or one naming no task, is E009 at plan time rather than a failure after
    training."""
    from llmc.runtime.evaluate import resolve_tasks
    from llmc.spec.facts import gather_facts

    (tmp_path / "evals").mkdir()
    (tmp_path / "evals/file_name.yaml").write_text("task: real_name\ndataset_path: json\n")
    (tmp_path / "evals/suite.yml").write_text("group: my_suite\ntask: [real_name, hellaswag]\n")
    (tmp_path / "evals/broken.yaml").write_text("dataset_path: json\n")
    text = _tiny("eval: {tasks: [hellaswag, evals/file_name.yaml, evals/suite.yml, evals/missing.yaml, "
                 "evals/broken.yaml]}\n")
    run, lines = loads_spec(text, file=str(tmp_path / "spec.yaml"))
    c = compile_spec(run, str(tmp_path / "spec.yaml"), lines, spec_bytes=text.encode(),
                     facts=gather_facts(run, tmp_path))
    assert c.evaluation.tasks.names == ["hellaswag", "real_name", "my_suite", "missing", "broken"]
    runtime = resolve_tasks(("hellaswag", str(tmp_path / "evals/file_name.yaml"), str(tmp_path / "evals/suite.yml")))
    assert runtime.names == c.evaluation.tasks.names[:3]
    e009 = {d.path: d for d in c.diagnostics if d.code == "E009"}
    assert set(e009) == {"eval.tasks.3", "eval.tasks.4"} and all(d.severity == "error" for d in e009.values())
    assert "does not exist" in e009["eval.tasks.3"].message and "no top-level 'task:'" in e009["eval.tasks.4"].message
    assert e009["eval.tasks.3"].line == 10
