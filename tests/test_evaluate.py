"""lm-evaluation-harness on a tiny random Llama and a local 4-question multiple-choice task (offline)."""

from __future__ import annotations

import json
import math

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


@pytest.mark.slow
def test_local_multiple_choice_task(tmp_path):
    make_model(tmp_path / "model")
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    task = tmp_path / "tasks" / "tiny_mc.yaml"
    task.parent.mkdir()
    task.write_text(TASK_YAML.format(data=data))
    assert resolve_tasks((str(task),)) == (["tiny_local_mc"], [str(task.parent.resolve())])

    summary = run_eval(EvalConfig(model_dir=str(tmp_path / "model"), tasks=(str(task),), batch_size=4),
                       tmp_path / "eval")
    assert summary.results_path.is_file()
    saved = json.loads(summary.results_path.read_text())
    acc = summary.metrics["tiny_local_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and acc * 4 == pytest.approx(round(acc * 4))  # a multiple of 1/4
    assert saved["results"]["tiny_local_mc"]["acc,none"] == acc
    assert summary.samples["tiny_local_mc"] == 4
    # independent check: acc = share of questions whose gold choice has the highest log-likelihood
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
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
    assert math.isclose(acc, correct / len(QUESTIONS))
