"""lm-evaluation-harness on a tiny random Llama and a local 4-question multiple-choice task (offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from llmc.runtime.evaluate import EvalConfig, resolve_tasks, run_eval  # noqa: E402

QUESTIONS = [
    {"question": "What colour is the sky", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs has a cat", "choices": ["two", "four", "six"], "answer": 1},
    {"question": "Which is a fruit", "choices": ["stone", "chair", "apple"], "answer": 2},
    {"question": "What is frozen water", "choices": ["ice", "steam", "sand"], "answer": 0},
]

TASK_YAML = """\
task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def make_model(path):
    words = sorted({w for q in QUESTIONS for w in (q["question"] + " " + " ".join(q["choices"])).lower().split()}
                   | {"question", "answer", ":", "\n"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def independent_acc(model_dir) -> float:
    """Share of QUESTIONS whose gold choice has the highest log-likelihood, computed with transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for q in QUESTIONS:
        ctx = tok(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        scores = []
        for ch in q["choices"]:
            cont = tok(" " + ch, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    return correct / len(QUESTIONS)


@pytest.mark.slow
def test_local_multiple_choice_task(tmp_path):
    make_model(tmp_path / "model")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    task = tmp_path / "tasks" / "tiny_mc.yaml"
    task.parent.mkdir()
    task.write_text(TASK_YAML.format(data=data))
    resolved = resolve_tasks((str(task),))
    assert (resolved.names, resolved.include) == (["tiny_local_mc"], [str(task.parent.resolve())])
    assert not resolved.builtin  # lm_eval indexes only tasks/, not its built-in task files

    summary = run_eval(EvalConfig(model_dir=str(tmp_path / "model"), tasks=(str(task),), batch_size=4),
                       tmp_path / "eval")
    assert summary.results_path.is_file()
    saved = json.loads(summary.results_path.read_text())
    acc = summary.metrics["tiny_local_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 4 == pytest.approx(round(acc * 4))  # a multiple of 1/4
    assert saved["results"]["tiny_local_mc"]["acc,none"] == acc
    assert summary.samples["tiny_local_mc"] == 4
    # independent check: acc = share of questions whose gold choice has the highest log-likelihood
    assert math.isclose(acc, independent_acc(tmp_path / "model"))


def test_relative_data_files_resolve_against_the_task_file(tmp_path):
    """lm_eval would read ``data_files`` relative to the working directory; a copy with absolute paths is used."""
    yaml = pytest.importorskip("yaml")
    tasks = tmp_path / "spec" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(data="mc.jsonl"))
    (tasks / "fn.yaml").write_text("task: fn_task\nprocess_docs: !function utils.process\n")
    resolved = resolve_tasks((str(tasks / "mc.yaml"), str(tasks / "fn.yaml"), "hellaswag"), tmp_path / "copy")
    names, include = resolved.names, resolved.include
    assert names == ["tiny_local_mc", "fn_task", "hellaswag"] and resolved.builtin  # hellaswag is built in
    copy = Path(include[0]) / "mc.yaml"
    assert copy.parent != tasks and copy.is_file()
    doc = yaml.safe_load(copy.read_text())
    assert doc["dataset_kwargs"]["data_files"]["test"] == str((tasks / "mc.jsonl").resolve())
    assert doc["doc_to_text"] == yaml.safe_load((tasks / "mc.yaml").read_text())["doc_to_text"]
    assert include[1] == str(tasks.resolve())  # a !function task file is used where it is
    # absolute paths need no copy
    (tasks / "abs.yaml").write_text(TASK_YAML.format(data=tasks / "mc.jsonl"))
    assert resolve_tasks((str(tasks / "abs.yaml"),), tmp_path / "copy2").include == [str(tasks.resolve())]


def test_task_files_name_their_task_or_group(tmp_path):
    """A task file is evaluated by its ``task:`` name, a group file (``group:`` + a ``task:`` list, lm_eval's task
    guide) by its ``group:`` name; only files that list other tasks (or a built-in name) need lm_eval's index of
    its own tasks. A file with neither name is refused with its path."""
    (tmp_path / "quoted.yaml").write_text("task: 'my_task'  # comment\nprocess_docs: !function utils.process\n")
    (tmp_path / "group.yaml").write_text("group: my_suite\ntask:\n  - tiny_local_mc\n  - hellaswag\n")
    (tmp_path / "none.yaml").write_text("dataset_path: json\n")
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    one = resolve_tasks((str(tmp_path / "quoted.yaml"),))
    assert one.names == ["my_task"] and not one.builtin
    group = resolve_tasks((str(tmp_path / "quoted.yaml"), str(tmp_path / "group.yaml")))
    assert group.names == ["my_task", "my_suite"] and group.builtin and group.include == [str(tmp_path.resolve())]
    for bad in ("none.yaml", "bad.yaml"):
        with pytest.raises(ValueError, match=bad):
            resolve_tasks((str(tmp_path / bad),))


@pytest.mark.slow
def test_local_group_file_is_evaluated_by_its_group_name(tmp_path):
    """A group of local tasks, through lm_eval's full task index (the group file lists tasks by name): its task's
    accuracy is the independent one."""
    make_model(tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "mc.yaml").write_text(TASK_YAML.format(data=tasks / "mc.jsonl"))
    (tasks / "suite.yaml").write_text("group: tiny_suite\ntask:\n  - tiny_local_mc\n")
    summary = run_eval(EvalConfig(model_dir=str(tmp_path / "model"), tasks=(str(tasks / "suite.yaml"),),
                                  batch_size=4), tmp_path / "eval")
    assert summary.samples["tiny_local_mc"] == 4
    assert math.isclose(summary.metrics["tiny_local_mc"]["acc"], independent_acc(tmp_path / "model"))


def _eval_lock(tmp_path, stages=None):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_build_fakes import lock_for

    spec = {"name": "e", "model": dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128,
                                       vocab_size=512, max_seq_len=64),
            "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 512},
            "training": {"precision": "fp32", "global_batch_tokens": 256},
            "eval": {"tasks": ["tasks/tiny_mc.yaml"], "batch_size": 2, **({"task_stages": stages} if stages else {})}}
    if stages:
        spec["stages"] = [{"name": n, "kind": "pretrain"} for n in stages]
    lock = lock_for(spec, spec_path=str(tmp_path / "spec.yaml"))
    path = tmp_path / "plan.lock.json"
    path.write_text(json.dumps(lock))
    return lock, path


def test_eval_step_does_nothing_for_unlisted_or_evaluated_stages(tmp_path, capsys):
    from llmc.runtime.evaluate import SUMMARY, eval_stages, main

    lock, path = _eval_lock(tmp_path, stages=["base", "more"])
    lock["evaluation"]["tasks"]["stages"] = ["more"]
    path.write_text(json.dumps(lock))
    assert eval_stages(lock) == ["more"] and eval_stages({}) == []
    # not listed: nothing to do (no hf/ needed)
    assert main(["--lock", str(path), "--stage", "base", "--out", str(tmp_path / "run" / "base")]) == 0
    assert "no eval.tasks" in capsys.readouterr().out
    # listed and already evaluated under the lock's eval settings (its summary's record): not run again
    from llmc.runtime.evaluate import EVAL_FINGERPRINT, eval_fingerprint

    summary = tmp_path / "run" / "more" / SUMMARY
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({EVAL_FINGERPRINT: eval_fingerprint(lock, "more")}))
    assert main(["--lock", str(path), "--stage", "more", "--out", str(tmp_path / "run" / "more")]) == 0
    assert "already evaluated" in capsys.readouterr().out
    # a summary an older llmc wrote (no record of what scored it) is scored again; here there is no export to score:
    # one located error line, exit 1, and the saved scores stay where they are (nothing is moved that cannot be
    # scored again)
    summary.write_text("{}")
    assert main(["--lock", str(path), "--stage", "more", "--out", str(tmp_path / "run" / "more")]) == 1
    out, err = capsys.readouterr()
    assert "evaluated again" not in out and summary.read_text() == "{}"
    assert not (tmp_path / "run" / "more" / "eval.set-aside-1").exists()
    err = err.strip().splitlines()
    assert len(err) == 1 and "error[R003] eval more:" in err[0] and "no Hugging Face export" in err[0]


def test_the_eval_fingerprint_changes_with_what_decides_the_scores(tmp_path):
    """Each lock entry that decides a stage's scores (and the stage's weights) changes the record; a change names
    what changed; eval settings that score nothing differently (the backend) do not."""
    import copy

    from llmc.runtime.evaluate import EVAL_FINGERPRINT, eval_change, eval_fingerprint

    lock, _ = _eval_lock(tmp_path)
    lock["evaluation"]["tasks"]["task_files"] = {"tasks/tiny_mc.yaml": {
        "path": "eval/tasks/tiny_mc/tiny_mc.yaml", "files": {"eval/tasks/tiny_mc/tiny_mc.yaml": "a" * 64,
                                                             "eval/tasks/tiny_mc/tiny_mc.jsonl": "b" * 64}}}
    base = eval_fingerprint(lock, "pretrain")
    assert eval_fingerprint(lock, "other") is None
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({EVAL_FINGERPRINT: base}))
    assert eval_change(summary, lock, "pretrain") is None

    def changed(edit) -> str | None:
        other = copy.deepcopy(lock)
        edit(other)
        return eval_change(summary, other, "pretrain")

    ev = "evaluation", "tasks"
    assert "eval.limit changed" in changed(lambda lk: lk[ev[0]][ev[1]].update(limit=6))
    assert changed(lambda lk: lk[ev[0]][ev[1]].update(batch_size=4)) is None  # scores no document differently
    # one more checkpoint listed: the export's scores (and every other step's) stand
    assert changed(lambda lk: lk[ev[0]][ev[1]].update(checkpoint_steps={"pretrain": [2, 4]})) is None
    assert "the tasks and the task files' bytes changed" in changed(lambda lk: lk[ev[0]][ev[1]].update(tasks=["hellaswag"], names=["hellaswag"]))
    assert "task files' bytes changed" in changed(
        lambda lk: lk[ev[0]][ev[1]]["task_files"]["tasks/tiny_mc.yaml"]["files"].update(
            {"eval/tasks/tiny_mc/tiny_mc.jsonl": "c" * 64}))
    assert "chat template" in changed(lambda lk: lk[ev[0]][ev[1]].update(apply_chat_template={"pretrain": True}))
    assert "weights" in changed(lambda lk: lk["spec"]["resolved"]["training"].update(seed=7))
    assert changed(lambda lk: lk[ev[0]][ev[1]].update(backend="vllm")) is None


@pytest.mark.slow
def test_eval_step_on_a_stage_export_from_any_backend(tmp_path):
    """A stage that ends with run/<stage>/hf (what ds_train writes and the torchtitan export produces), but
    whose trainer did not evaluate: ``python -m llmc.runtime.evaluate`` scores it once, like the native path."""
    import subprocess
    import sys

    from llmc.runtime.evaluate import RESULTS, SUMMARY

    lock, path = _eval_lock(tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data="tiny_mc.jsonl"))  # relative data
    stage = tmp_path / "run" / "pretrain"
    make_model(stage / "hf")
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "llmc.runtime.evaluate", "--lock", str(path), "--stage", "pretrain", "--out", str(stage)]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    r = subprocess.run(cmd, cwd=tmp_path / "run", env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((stage / RESULTS).read_text())
    summary = json.loads((stage / SUMMARY).read_text())
    acc = results["results"]["tiny_local_mc"]["acc,none"]
    assert summary["tasks"]["tiny_local_mc"]["acc"] == acc and summary["samples"]["tiny_local_mc"] == 4
    assert math.isclose(acc, independent_acc(stage / "hf"))
    assert "eval tiny_local_mc: acc" in r.stdout
    before = (stage / RESULTS).stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "already evaluated" in r.stdout
    assert (stage / RESULTS).stat().st_mtime_ns == before
    # the eval settings changed (eval.limit 2): scored again on 2 documents, the 4-document results set aside
    lock["evaluation"]["tasks"]["limit"] = 2
    path.write_text(json.dumps(lock))
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretrain: evaluated again: eval.limit changed" in r.stdout and "eval.set-aside-1" in r.stdout
    assert json.loads((stage / SUMMARY).read_text())["samples"]["tiny_local_mc"] == 2
    assert json.loads((stage / "eval.set-aside-1" / "summary.json").read_text())["samples"]["tiny_local_mc"] == 4
