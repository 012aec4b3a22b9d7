"""Benchmark evals after a chat stage go through the export's chat template; a pre-training stage's do not.

The reference is lm-evaluation-harness itself (its logged requests: the prompt each answer is scored after) and
Meta's Llama 3 prompt format (https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/), written out
by hand below; the scored log-likelihoods are recomputed with transformers on that hand-written prompt.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from llmc.compiler.compile import compile_spec
from llmc.spec.load import loads_spec

sys.path.insert(0, str(Path(__file__).parent))

from test_eval_spec import PIPE  # noqa: E402  (pretrain "base" + sft "chat", evaluated after both)

#: Llama 3's layout of one user turn and the assistant's header (Meta's prompt format page), by hand
LLAMA3_USER = "<s><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _compile(text: str, path: str = "spec.yaml"):
    run, lines = loads_spec(text, file=path)
    return compile_spec(run, path, lines, spec_bytes=text.encode())


def _lock(text: str, path: str = "spec.yaml") -> dict:
    from llmc.emit.lock import lock_dict

    return lock_dict(_compile(text, path))


def test_lock_applies_the_chat_template_to_chat_stages_only_unless_the_spec_says():
    """Default: the sft stage (whose export carries its template) yes, the pretrain stage no; ``eval.
    apply_chat_template`` sets every evaluated stage, and ``true`` on a stage with no template of llmc's is E010
    at its line."""
    c = _compile(PIPE)
    assert c.evaluation.tasks.apply_chat_template == {"base": False, "chat": True}
    assert _lock(PIPE)["evaluation"]["tasks"]["apply_chat_template"] == {"base": False, "chat": True}
    assert not [d for d in c.diagnostics if d.code == "E010"]
    off = _compile(PIPE + "  apply_chat_template: false\n")
    assert off.evaluation.tasks.apply_chat_template == {"base": False, "chat": False}
    assert not [d for d in off.diagnostics if d.code == "E010"]
    on = _compile(PIPE + "  apply_chat_template: true\n")
    assert on.evaluation.tasks.apply_chat_template == {"base": True, "chat": True}
    e010 = [d for d in on.diagnostics if d.code == "E010"]
    assert len(e010) == 1 and e010[0].severity == "warning" and "'base'" in e010[0].message
    assert e010[0].line == PIPE.count("\n") + 1  # the apply_chat_template line
    # a run without stages pre-trains: no template
    plain = PIPE.split("stages:")[0] + "eval:\n  tasks: [tasks/mc.yaml]\n"
    assert _compile(plain).evaluation.tasks.apply_chat_template == {"pretrain": False}


def test_emitted_lm_eval_commands_apply_the_template_where_the_eval_step_does():
    """eval/tasks.json's equivalent command lines, read by lm-evaluation-harness's own CLI parser: the chat stage's
    sets apply_chat_template and fewshot_as_multiturn, the pretrain stage's neither."""
    import shlex

    from lm_eval._cli.harness import HarnessCLI

    from llmc.emit.evaluation import EvalTasksEmitter

    doc = json.loads(EvalTasksEmitter().files(_compile(PIPE), {})["eval/tasks.json"])
    parsed = {}
    for st, cmd in doc["lm_eval_commands"].items():
        argv = shlex.split(cmd)
        assert argv[0] == "lm_eval"
        parsed[st] = HarnessCLI()._parser.parse_args(["run", *argv[1:]])
    assert parsed["chat"].apply_chat_template and parsed["chat"].fewshot_as_multiturn
    assert not getattr(parsed["base"], "apply_chat_template", None)  # absent: lm_eval's default, off
    assert not getattr(parsed["base"], "fewshot_as_multiturn", None)


# ------------------------------------------------------------------------------ the eval step, with lm_eval


def _chat_model(path: Path, template: str | None, newlines: bool = False) -> None:
    """The tiny Llama of test_evaluate, its tokenizer knowing Llama 3's turn markers as single special tokens, and
    ``template`` in tokenizer_config.json as an llmc export writes it. ``newlines``: runs of newlines (the "\n\n"
    after the assistant header) are tokens of their own, as in a BPE tokenizer, instead of dropped."""
    import tokenizers
    import torch
    import transformers
    from test_evaluate import QUESTIONS

    words = sorted({w for q in QUESTIONS for w in (q["question"] + " " + " ".join(q["choices"])).lower().split()}
                   | {"question", "answer", ":", "user", "assistant"})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {m: 4 + i for i, m in enumerate(MARKERS)}
    vocab |= {w: len(vocab) + i for i, w in enumerate(words + (["\n", "\n\n"] if newlines else []))}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = tokenizers.normalizers.Lowercase()
    pre = tokenizers.pre_tokenizers
    tok.pre_tokenizer = (pre.Sequence([pre.Split(tokenizers.Regex(r"[ \t]+"), behavior="removed"),
                                       pre.Split(tokenizers.Regex(r"\n+|\w+|[^\w\s]+"), behavior="isolated")])
                         if newlines else pre.Whitespace())
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>",
                                                additional_special_tokens=list(MARKERS))
    fast.save_pretrained(path)
    if template is not None:
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _loglik(model_dir: Path, ctx: str, cont: str) -> float:
    """log p(cont | ctx) with transformers (lm_eval's split: the whole string's tokens after the context's)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    assert whole[: len(c)] == c and tok.unk_token_id not in whole  # the turn markers are tokens of their own
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(c), len(whole)))


@pytest.fixture()
def logged(monkeypatch):
    """lm_eval's own simple_evaluate, asked to log its samples: task -> the requests it scored (per call)."""
    pytest.importorskip("lm_eval")
    import lm_eval

    real, calls = lm_eval.simple_evaluate, []

    def spy(*a, **kw):
        kw["log_samples"] = True
        res = real(*a, **kw)
        calls.append(res.pop("samples"))
        return res

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    return calls


def _setup(tmp_path: Path, template: str | None, stages=("base", "chat")) -> Path:
    from test_evaluate import QUESTIONS, TASK_YAML

    from llmc.spec.chat import CHAT_TEMPLATES

    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data="mc.jsonl"))
    (tmp_path / "spec.yaml").write_text(PIPE)
    lock = _lock(PIPE, str(tmp_path / "spec.yaml"))
    assert lock["stages"][1]["hyper"]["chat_template"] == "llama3"
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    for s in stages:  # both exports carry the template: which stage applies it is the lock's call
        _chat_model(tmp_path / "run" / s / "hf", CHAT_TEMPLATES["llama3"].jinja if template else None)
    return tmp_path / "plan.lock.json"


@pytest.mark.slow
def test_chat_stage_is_scored_through_its_template_and_pretrain_stage_on_raw_prompts(tmp_path, logged):
    from test_evaluate import QUESTIONS, independent_acc

    from llmc.runtime import evaluate

    lock = _setup(tmp_path, template=True)
    out = {s: tmp_path / "run" / s for s in ("base", "chat")}
    for s in ("base", "chat"):
        assert evaluate.main(["--lock", str(lock), "--stage", s, "--out", str(out[s])]) == 0
    base, chat = (logged[0]["tiny_local_mc"], logged[1]["tiny_local_mc"])
    summary = {s: json.loads((out[s] / evaluate.SUMMARY).read_text()) for s in out}

    # chat: each prompt is Llama 3's user turn + assistant header; scores are log p(answer | that prompt)
    assert (summary["chat"]["apply_chat_template"], summary["chat"]["fewshot_as_multiturn"]) == (True, True)
    assert len(chat) == 4
    for sample in chat:
        q = QUESTIONS[sample["doc_id"]]
        want = LLAMA3_USER.format(f"Question: {q['question']}\nAnswer:")
        assert [a[0] for a in sample["arguments"]] == [want] * 3
        assert all(m in want for m in MARKERS)
        for (ctx, cont), resp in zip(sample["arguments"], sample["resps"], strict=True):
            assert cont.strip() in q["choices"]
            assert resp[0][0] == pytest.approx(_loglik(out["chat"] / "hf", ctx, cont), abs=1e-4)
    acc = sum(int(max(range(3), key=lambda i, s=s: s["resps"][i][0][0]) == QUESTIONS[s["doc_id"]]["answer"])
              for s in chat) / 4
    assert math.isclose(summary["chat"]["tasks"]["tiny_local_mc"]["acc"], acc)

    # pretrain: raw prompts, no markers (its tokenizer has a template too), the score test_evaluate checks
    assert (summary["base"]["apply_chat_template"], summary["base"]["fewshot_as_multiturn"]) == (False, False)
    for sample in base:
        q = QUESTIONS[sample["doc_id"]]
        assert [a for a in sample["arguments"]] == [(f"Question: {q['question']}\nAnswer:", " " + c)
                                                   for c in q["choices"]]
    assert math.isclose(summary["base"]["tasks"]["tiny_local_mc"]["acc"], independent_acc(out["base"] / "hf"))


@pytest.mark.slow
def test_chat_stage_checkpoints_are_scored_through_the_template_too(tmp_path, logged, monkeypatch):
    """``eval.every_checkpoints``: a checkpoint's temporary export is scored the way the stage's export is."""
    from llmc.runtime import evaluate, hf_io
    from llmc.runtime.job import TrainJob
    from llmc.spec.chat import CHAT_TEMPLATES

    path = _setup(tmp_path, template=True, stages=("chat",))
    lock = json.loads(path.read_text())
    lock["evaluation"]["tasks"]["checkpoint_steps"] = {"chat": [5]}
    out = tmp_path / "run" / "chat"
    (out / "checkpoints" / "step-00000005").mkdir(parents=True)
    made = []

    def export(job, src, dest, **kw):  # the checkpoint's conversion: a chat export (template included)
        made.append(Path(src).name)
        _chat_model(Path(dest), CHAT_TEMPLATES["llama3"].jinja)
        return {"hf": str(dest)}

    monkeypatch.setattr(hf_io, "export_stage", export)
    job = TrainJob.from_lock(lock, "chat", build_dir=tmp_path)
    done = evaluate.checkpoint_evals(lock, job, out, log=lambda m: None)
    assert made == ["step-00000005"] and done[5]["apply_chat_template"] is True
    assert json.loads((out / "eval" / "step-5" / "summary.json").read_text())["apply_chat_template"] is True
    ctx = logged[0]["tiny_local_mc"][0]["arguments"][0][0]
    assert ctx.startswith("<s><|start_header_id|>user<|end_header_id|>") and ctx.endswith("assistant<|end_header_id|>\n\n")


@pytest.mark.slow
def test_through_the_template_the_answer_alone_is_scored(tmp_path, logged, capsys):
    """The prompt ends with the assistant header and its "\n\n" (a token of its own here): each choice's score is
    log p(answer tokens | prompt tokens, the "\n\n" included), recomputed with transformers, not lm_eval 0.4's
    default split, which moves the "\n\n" into every answer; acc and acc_norm (by each answer's length) follow."""
    import torch
    import transformers
    from test_evaluate import QUESTIONS, TASK_YAML

    from llmc.runtime import evaluate
    from llmc.spec.chat import CHAT_TEMPLATES

    lock = _setup(tmp_path, template=True, stages=("chat",))
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK_YAML.format(data="mc.jsonl").replace(
        "metadata:", "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:"))
    hf = tmp_path / "run" / "chat" / "hf"
    _chat_model(hf, CHAT_TEMPLATES["llama3"].jinja, newlines=True)
    assert evaluate.main(["--lock", str(lock), "--stage", "chat", "--out", str(tmp_path / "run" / "chat")]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    nl = tok.convert_tokens_to_ids("\n\n")

    def loglik(ctx_ids: list[int], ans_ids: list[int]) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx_ids + ans_ids])).logits[0].float(), -1)
        return sum(logp[len(ctx_ids) + i - 1, t].item() for i, t in enumerate(ans_ids))

    acc = acc_norm = 0
    for sample in logged[0]["tiny_local_mc"]:
        q = QUESTIONS[sample["doc_id"]]
        ctx = sample["arguments"][0][0]
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        assert ctx_ids[-1] == nl  # the header's whitespace is a token, ending the prompt
        lls = []
        for (c, cont), resp, choice in zip(sample["arguments"], sample["resps"], q["choices"], strict=True):
            ans_ids = tok(choice, add_special_tokens=False)["input_ids"]
            assert c == ctx and cont == choice and nl not in ans_ids
            want = loglik(ctx_ids, ans_ids)
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            # lm_eval's own split would score "\n\n" + the answer after the prompt without it
            assert abs(loglik(ctx_ids[:-1], [nl, *ans_ids]) - want) > 1e-3
            lls.append(want)
        acc += max(range(3), key=lambda i: lls[i]) == q["answer"]
        acc_norm += max(range(3), key=lambda i: lls[i] / len(q["choices"][i])) == q["answer"]
    summary = json.loads((tmp_path / "run" / "chat" / evaluate.SUMMARY).read_text())
    got = summary["tasks"]["tiny_local_mc"]
    assert got["acc"] == pytest.approx(acc / 4) and got["acc_norm"] == pytest.approx(acc_norm / 4)
    # the score line says how the documents were prompted: 0-shot (the task sets no few-shot), through the template
    assert summary["n_shot"] == {"tiny_local_mc": 0}
    assert "(4 documents, 0-shot, chat template)" in capsys.readouterr().out


def test_template_asked_for_an_export_without_one_is_a_located_error(tmp_path, capsys):
    """The lock says apply, the export has no template: one R003 line, exit 1 (not a raw-prompt score)."""
    pytest.importorskip("lm_eval")
    from llmc.runtime import evaluate

    lock = _setup(tmp_path, template=False, stages=("chat",))
    capsys.readouterr()
    assert evaluate.main(["--lock", str(lock), "--stage", "chat", "--out", str(tmp_path / "run" / "chat")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error[R003] eval chat:" in err[0] and "apply_chat_template: false" in err[0]
    assert not (tmp_path / "run" / "chat" / evaluate.SUMMARY).exists()
