"""Post-training data as the stage runner reads it: located errors, tool calls and list content, truncation reports,
metrics precision.

References: transformers' ``apply_chat_template`` on a local tokenizer folder (the render and its tokens, and, with a
``{% generation %}`` block, the tokens a completion-only loss trains), the published templates' tool-call layout
(Qwen2.5-Instruct's, excerpted below with its source), the stage's own schedule for the learning rate, and counts made
here from transformers' render by character offsets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

from test_chat_own_template import tokenizer_folder as _tokenizer_folder  # noqa: E402
from test_chat_own_template import trained_text  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from llmc.runtime.chat import IGNORE_INDEX, TemplateError, encode_chat, load_tokenizer_template  # noqa: E402
from llmc.spec.chat import CHAT_TEMPLATES  # noqa: E402

LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|endoftext|>"]
QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]

#: Qwen2.5-Instruct's chat template without its ``tools`` system block, the assistant tool-call and tool-response
#: branches as published (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/tokenizer_config.json,
#: "chat_template"; Apache-2.0)
QWEN_TOOLS = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
TOOL_CONV = [{"role": "user", "content": "add 2 3"}, CALL, {"role": "tool", "content": "5"},
             {"role": "assistant", "content": "5"}]


def tokenizer_folder(d: Path, specials: list[str], eos: str, template: str | None = None) -> Tokenizer:
    """test_chat_own_template's character-level tokenizer folder, with Llama 3's BOS when its specials start with it."""
    return _tokenizer_folder(d, specials, eos, template,
                             bos=specials[0] if specials[0] == "<|begin_of_text|>" else None)


# ----------------------------------------------------------------------------- tool calls and list content


def test_named_template_refuses_a_tool_call_turn_and_the_tokenizer_template_trains_it(tmp_path):
    """llmc's llama3 / chatml have no tool-call layout: an assistant turn with tool_calls (content null) is refused
    with a line naming the message and the way out, instead of an empty trained turn. ``chat_template: tokenizer``
    with Qwen2.5's template renders it as transformers does, and trains the <tool_call> block through <|im_end|>,
    exactly the tokens transformers' assistant mask gives with a {% generation %} block around the assistant output."""
    tok = tokenizer_folder(tmp_path / "llama", LLAMA3, "<|eot_id|>")
    for name in ("llama3", "chatml"):
        qtok = tok if name == "llama3" else tokenizer_folder(tmp_path / "qwen0", QWEN, "<|im_end|>")
        with pytest.raises(TemplateError) as e:
            encode_chat(TOOL_CONV, qtok, name, where="conversation 4")
        msg = str(e.value)
        assert msg.startswith("conversation 4: message 1 (assistant) has tool_calls") and "\n" not in msg
        assert "chat_template: tokenizer" in msg

    qtok = tokenizer_folder(tmp_path / "qwen", QWEN, "<|im_end|>", QWEN_TOOLS)
    t = load_tokenizer_template(tmp_path / "qwen")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "qwen"))
    ids, labels = encode_chat(TOOL_CONV, qtok, t)
    assert ids == hf.apply_chat_template(TOOL_CONV, tokenize=True, return_dict=False)
    marked = QWEN_TOOLS.replace(
        "{{- '<|im_start|>' + message.role }}\n        {%- if message.content %}",
        "{{- '<|im_start|>' + message.role }}{% generation %}\n        {%- if message.content %}").replace(
        "{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
        "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n    {%- elif message.role == \"tool\" %}").replace(
        "(message.role == \"assistant\" and not message.tool_calls) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        "(message.role == \"assistant\" and not message.tool_calls) %}\n"
        "        {%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
        "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}")
    assert marked.count("{% generation %}") == 2
    out = hf.apply_chat_template(TOOL_CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=marked)
    assert out["input_ids"] == ids
    ref = [bool(m) for m in out["assistant_masks"]]
    # transformers' mask starts the tool-call turn at its "\n" (the header's newline is inside the generation
    # block there); llmc's starts after the generation prompt "<|im_start|>assistant\n", which ends with it
    mine = [x != IGNORE_INDEX for x in labels]
    nl = [i for i, (a, b) in enumerate(zip(ref, mine, strict=True)) if a != b]
    assert len(nl) == 1 and qtok.decode([ids[nl[0]]]) == "\n" and ref[nl[0]]
    assert trained_text(qtok, labels) == ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
                                          "<|im_end|>5<|im_end|>")


def test_list_content_of_text_parts_is_joined_as_llama_31s_template_does(tmp_path):
    """OpenAI-style content parts: the text parts are written one after another, as Llama 3.1's template does for a
    list (``for content in message['content']: if content['type'] == 'text': content['text']``, without its trim
    here, as llmc's llama3 does not trim); another part type is refused with a line naming the part."""
    tok = tokenizer_folder(tmp_path / "llama", LLAMA3, "<|eot_id|>")
    loop = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
            "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")
    jinja = CHAT_TEMPLATES["llama3"].jinja.replace("{{ message['content'] }}", loop)
    (tmp_path / "llama" / "chat_template.jinja").write_text(jinja)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "llama"))
    conv = [{"role": "user", "content": [{"type": "text", "text": "2 + 2"}, {"type": "text", "text": " = ?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]
    ids, labels = encode_chat(conv, tok, "llama3")
    assert ids == hf.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert trained_text(tok, labels) == "4<|eot_id|>"
    conv[0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    with pytest.raises(TemplateError, match=r"^c 7: message 0 \(user\): content part 2 is type 'image_url'"):
        encode_chat(conv, tok, "llama3", where="c 7")


# ----------------------------------------------------------------------------- through the runtime entry

SPEC = """\
name: pdata
model: {{name: micro, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128, vocab_size: 128,
        max_seq_len: 256}}
hardware: {{gpu: cpu, count: 1}}
data:
  sources: [{{name: python-docs, format: builtin}}]
  tokenizer: {{path: tok, chat_template: llama3}}
  seq_len: 64
  tokens: 4096
training: {{precision: fp32, global_batch_tokens: 256}}
stages:
  - {{name: {kind}, kind: {kind}, steps: {steps}, lr: {lr}, seq_len: 64, {extra}
      data: {{sources: [{{name: d, path: {path}, kind: {skind}}}], seq_len: 64, tokens: 20000}}}}
"""
SKIND = {"sft": "chat", "dpo": "preference", "grpo": "prompts"}
GRPO = "grpo_group_size: 2, prompts_per_step: 2, max_new_tokens: 3, reward: arithmetic,"


def _lock(tmp_path: Path, kind: str, path: str, steps: int = 2, lr: str = "1.0e-3", extra: str = "") -> Path:
    from llmc.compiler.compile import compile_spec
    from llmc.emit.lock import lock_dict
    from llmc.spec.facts import gather_facts
    from llmc.spec.load import loads_spec

    if not (tmp_path / "tok").exists():
        tokenizer_folder(tmp_path / "tok", LLAMA3, "<|eot_id|>")
    text = SPEC.format(kind=kind, skind=SKIND[kind], path=path, steps=steps, lr=lr,
                       extra=(GRPO if kind == "grpo" else "") + extra)
    (tmp_path / "spec.yaml").write_text(text)
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, str(tmp_path / "spec.yaml"), lines, spec_bytes=text.encode(),
                     facts=gather_facts(run, tmp_path))
    lock = tmp_path / "plan.lock.json"
    lock.write_text(json.dumps(lock_dict(c)))
    return lock


def _entry(lock: Path, stage: str, capsys) -> tuple[int, str, str]:
    from llmc.runtime.entry import main

    rc = main(["--lock", str(lock), "--stage", stage])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _lines(*recs) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
BAD = {  # case: (stage kind, file text, the located line's text: {p} is the file's path)
    "malformed": ("sft", _lines(CHAT, CHAT, CHAT, CHAT, CHAT, '{"messages": [{"role": "user", "content": }]}'),
                  "{p}:6: invalid JSON: Expecting value (column"),
    "no_messages": ("sft", _lines(CHAT, {"conversation": CHAT["messages"]}),
                    "{p}:2: no 'messages' field; hint: a chat record is {{\"messages\""),
    "no_content": ("sft", _lines({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}),
                   "{p}:1: message 1 (assistant) has no content; hint"),
    "bad_role": ("sft", _lines(CHAT, CHAT, {"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "bot", "content": "yo"}]}),
                 "{p}:3: conversation 2: message 1: unknown role 'bot'"),
    "non_utf8": ("sft", None, "{p}:2: not valid UTF-8 (byte 0xe9 at column"),
    "tool_calls": ("sft", _lines(CHAT, {"messages": TOOL_CONV}),
                   "{p}:2: conversation 1: message 1 (assistant) has tool_calls, which llmc's llama3 template"),
    "image_part": ("sft", _lines({"messages": [{"role": "user", "content": [{"type": "image", "url": "a.png"}]},
                                               {"role": "assistant", "content": "yo"}]}),
                   "{p}:1: conversation 0: message 0 (user): content part 0 is type 'image'"),
    "no_assistant": ("sft", _lines(CHAT, {"messages": [{"role": "user", "content": "hi"}]}, CHAT),
                     "{p}:2: a conversation with no assistant turn (1 of 3 have none)"),
    "not_object": ("sft", _lines(CHAT, "[1, 2]"), "{p}:2: an array, not a JSON object"),
    "dpo_no_rejected": ("dpo", _lines({"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                                      {"prompt": "1+2=", "chosen": "3"}),
                        "{p}:2: no 'rejected' field; hint: a preference record is"),
    "dpo_list_chosen": ("dpo", _lines({"prompt": "1+1=", "chosen": [{"role": "assistant", "content": "2"}],
                                       "rejected": "3"}),
                        "{p}:1: preference record 0: 'chosen' is a list, not a string"),
    "grpo_no_prompt": ("grpo", _lines({"question": "1+1=", "answer": "2"}), "{p}:1: no 'prompt' field"),
    "grpo_no_answer": ("grpo", _lines({"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "solution": "4"}),
                       "{p}:2: no 'answer' or 'expression' (1 of 2 prompts have no verifiable answer)"),
    "grpo_bad_answer": ("grpo", _lines({"prompt": "1+1=", "answer": "two"}),
                        "{p}:1: answer 'two' is not a number the verifier reads"),
    # the verifier takes any answer that is there as the truth (llmc.runtime.reward.arithmetic_reward), an empty one
    # too, whatever the expression: every completion would score 0
    "grpo_empty_answer": ("grpo", _lines({"prompt": "1+1=", "answer": "", "expression": "1+1"}),
                          "{p}:1: answer '' is not a number the verifier reads"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_stop_the_stage_with_one_located_line(tmp_path, capsys, case):
    """Each bad record stops the stage before training with one line naming the file and line, what is wrong and
    (where it helps) what a record holds; no traceback (before: json's "Expecting value: line 1 column 15", a bare
    KeyError "'content'", "unknown role 'bot'" without a record, a codec error, or training on with no signal)."""
    kind, text, want = BAD[case]
    p = tmp_path / "d.jsonl"
    if text is None:  # a Latin-1 byte on line 2
        p.write_bytes(_lines(CHAT).encode() + b'{"messages": [{"role": "user", "content": "caf'
                      + b"\xe9" + b'"}, {"role": "assistant", "content": "yo"}]}\n')
    else:
        p.write_text(text)
    rc, out, err = _entry(_lock(tmp_path, kind, "d.jsonl"), kind, capsys)
    assert rc == 1
    assert "Traceback" not in out + err
    (line,) = [x for x in err.splitlines() if "error[" in x]
    assert want.format(p=p) in line, line
    assert not (tmp_path / "run" / kind / "DONE.json").exists()


def test_a_save_to_disk_folder_is_read_with_datasets(tmp_path, capsys):
    """A ``datasets`` save_to_disk folder given as an SFT source is read with datasets.load_from_disk (before: its
    JSON side files were parsed as jsonl records), and its rows' errors name the folder and row."""
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    rc, out, err = _entry(_lock(tmp_path, "sft", "ds"), "sft", capsys)
    assert rc == 0, err
    done = json.loads((tmp_path / "run" / "sft" / "DONE.json").read_text())
    assert done["examples"] == 6 and done["truncation"]["records"] == 6
    rows[4]["messages"][1]["role"] = "bot"
    other = tmp_path / "other"
    other.mkdir()
    datasets.Dataset.from_list(rows).save_to_disk(str(other / "ds"))
    rc, out, err = _entry(_lock(other, "sft", "ds"), "sft", capsys)
    assert rc == 1 and "Traceback" not in out + err
    assert f"{other / 'ds'} row 4: conversation 4: message 1: unknown role 'bot'" in err


# ----------------------------------------------------------------------------- truncation and metrics


def _independent_trained(hf, conv: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, positions of trained tokens) from transformers' render of llmc's llama3 Jinja: a token is trained when
    it starts inside an assistant message's content or the <|eot_id|> after it (character offsets)."""
    text = hf.apply_chat_template(conv, tokenize=False, chat_template=CHAT_TEMPLATES["llama3"].jinja)
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in conv:
        head = f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        k = text.index(head, pos) + len(head)
        pos = k + len(m["content"])
        if m["role"] == "assistant":
            spans.append((k, pos + len("<|eot_id|>")))
    trained = [i for i, (a, _) in enumerate(enc["offset_mapping"]) if any(s <= a < e for s, e in spans)]
    return enc["input_ids"], trained


def test_grpo_prompt_truncation_is_an_event_and_kept_in_done_json(tmp_path, capsys):
    """GRPO prompts longer than max_prompt_tokens keep their last tokens (TRL's left truncation): how many were cut
    and the tokens they lose, counted from transformers' render of the same template, are logged as a
    ``truncation`` event and kept in DONE.json, as SFT's and DPO's are (it was only a printed line)."""
    prompts = [{"prompt": "please work out " * k + f"{k}+1=", "answer": str(k + 1)} for k in range(6)]
    (tmp_path / "p.jsonl").write_text(_lines(*prompts))
    lock = _lock(tmp_path, "grpo", "p.jsonl", steps=1, extra=" max_prompt_tokens: 40,")
    rc, out, err = _entry(lock, "grpo", capsys)
    assert rc == 0, err
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    lens = []
    for p in prompts:
        text = hf.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                      add_generation_prompt=True, chat_template=CHAT_TEMPLATES["llama3"].jinja)
        lens.append(len(hf(text, add_special_tokens=False)["input_ids"]))
    cut, lost = sum(n > 40 for n in lens), sum(max(0, n - 40) for n in lens)
    assert 0 < cut < 6, lens  # (the data exercise the report)
    want = {"records": 6, "limit": 40, "truncated": cut, "prompt_tokens_cut": lost}
    assert json.loads((tmp_path / "run" / "grpo" / "DONE.json").read_text())["truncation"] == want
    recs = [json.loads(x) for x in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in recs if r.get("event") == "truncation"]
    assert {k: ev[k] for k in want} == want and ev["unit"].startswith("prompts")
    assert out.count(f"GRPO: {cut} of 6 prompts longer than 40 tokens keep their last 40") == 1, out


def test_sft_truncation_is_reported_and_metrics_keep_full_precision(tmp_path, capsys):
    """SFT at seq_len 64: the conversations longer than it, the trained tokens past it (labels 1..63 are the loss's
    targets) and the final answers cut are counted as transformers' render counts them, said once (a warning),
    logged as an event after a ``start`` event and kept in DONE.json. Each step's record holds the learning rate the
    schedule gives, unrounded (before: 6 decimals, so 1.9e-6 read 2e-06), and the step's trained tokens."""
    from llmc.runtime.job import TrainJob
    from llmc.runtime.sft import EpochOrder

    convs = []
    for i in range(12):
        ask = "add these numbers " * (i % 4) + f"{i}+{i}?"  # 0-3 repeats: the longer ones run past 64 tokens
        m = [{"role": "user", "content": ask}, {"role": "assistant", "content": f"it is {2 * i}"}]
        if i % 3 == 0:
            m += [{"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes"}]
        convs.append({"messages": m})
    (tmp_path / "chat.jsonl").write_text(_lines(*convs))
    lock = _lock(tmp_path, "sft", "chat.jsonl", steps=4, lr="2.0e-6")
    rc, out, err = _entry(lock, "sft", capsys)
    assert rc == 0, err

    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    S, cut, total, lost, final, per = 64, 0, 0, 0, 0, []
    for c in convs:
        ids, trained = _independent_trained(hf, c["messages"])
        trained = [k for k in trained if k >= 1]  # (position 0 is never a target)
        total += len(trained)
        per.append(sum(k < S for k in trained))
        if len(ids) > S:
            cut += 1
            lost += sum(k >= S for k in trained)
            final += trained[-1] >= S
    assert 0 < cut < 12 and lost > 0 and final > 0  # (the data exercise the report)
    want = (f"warning: stage sft: {cut} of 12 conversations exceed seq_len 64; {lost} of {total} trained tokens "
            f"({100 * lost / total:.0f}%) are cut, the final answer of {final}")
    assert out.count(want) == 1, out
    done = json.loads((tmp_path / "run" / "sft" / "DONE.json").read_text())
    assert done["truncation"] == {"records": 12, "seq_len": 64, "truncated": cut, "trained_tokens": total,
                                  "trained_tokens_cut": lost, "last_turn_cut": final,
                                  "left_untrained": done["truncation"]["left_untrained"]}

    recs = [json.loads(x) for x in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "start" and recs[0]["backend"] == "native" and recs[0]["stage"] == "sft" \
        and recs[0]["kind"] == "sft"
    assert recs[0]["spec_sha256"] == json.loads(Path(lock).read_text())["spec"]["sha256"]  # the spec trained under
    from llmc.runtime.software import runtime_versions

    assert recs[0]["software"] == done["software"] == runtime_versions()  # and the software that ran it
    (ev,) = [r for r in recs if r.get("event") == "truncation"]
    assert ev["truncated"] == cut and ev["trained_tokens_cut"] == lost
    steps = [r for r in recs if "event" not in r]
    job = TrainJob.from_lock(json.loads(lock.read_text()), "sft", build_dir=tmp_path)
    assert [r["lr"] for r in steps] == [2e-6 * job.lr_factor(s) for s in range(4)]
    assert any(round(r["lr"], 6) != r["lr"] for r in steps)  # (what the rounding lost)
    order, batch = EpochOrder(12, job.seed), done["batch_seqs"]
    assert [r["trained_tokens"] for r in steps] == [sum(per[j] for j in order.draws(s, batch)) for s in range(4)]
