"""``chat_template: tokenizer``: post-training on the tokenizer's own Jinja chat template.

The references are transformers itself (``apply_chat_template`` on the same folder gives the ids; a copy of the
template with ``{% generation %}`` blocks around each assistant answer gives, through
``return_assistant_tokens_mask``, the tokens a completion-only loss trains), and the published templates' own
comments (gpt-oss: "<|return|> ... we include it as the final token when training, so the model learns to emit it";
"CoT is dropped during all previous turns"). The templates are excerpts of the published ones, kept as data with
their source URLs in tests/fixtures/chat_templates/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

from llmc.runtime.chat import (  # noqa: E402
    IGNORE_INDEX,
    TemplateError,
    encode_chat,
    encode_prompt,
    encode_prompt_response,
    end_token_id,
    load_tokenizer_template,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
HARMONY = ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|endoftext|>"]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", "thinking": "add them"}, {"role": "user", "content": "and 3 + 3?"},
        {"role": "assistant", "content": "6, of course", "thinking": "easy sum"}]


R1 = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def tokenizer_folder(d: Path, specials: list[str], eos: str, template: str | None, in_config: bool = False,
                     bos: str | None = None) -> Tokenizer:
    """A character-level byte-level BPE with the template's special tokens, saved as a Hugging Face folder."""
    chars = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]  # ByteLevel's space and newline symbols
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    d.mkdir(parents=True)
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": "<|endoftext|>",
           **({"bos_token": bos} if bos else {})}
    if template is not None and in_config:
        cfg["chat_template"] = template
    elif template is not None:
        (d / "chat_template.jinja").write_text(template)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def trained_text(tok: Tokenizer, labels: list[int]) -> str:
    return tok.decode([x for x in labels if x != IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("in_config", [False, True])
def test_ids_and_trained_tokens_equal_transformers_on_qwen25s_template(tmp_path, in_config):
    """Qwen2.5's template from chat_template.jinja or from tokenizer_config.json: the ids are transformers'
    apply_chat_template's; the trained tokens are exactly those transformers' assistant mask gives for the same
    template with a {% generation %} block around each answer and its <|im_end|> (TRL's completion-only layout),
    not the newline after it; with the generation prompt, the prompt ids are transformers' too."""
    src = (TEMPLATES / "qwen2.5.jinja").read_text()
    tok = tokenizer_folder(tmp_path / "tok", QWEN, "<|im_end|>", src, in_config)
    t = load_tokenizer_template(tmp_path / "tok")
    ids, labels = encode_chat(CONV, tok, t)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert ids == hf.apply_chat_template(CONV, tokenize=True, return_dict=False)

    turn = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    assert turn in src
    marked = src.replace(turn, "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
                               "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
                               + turn + "{%- endif %}")
    out = hf.apply_chat_template(CONV, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=marked)
    assert out["input_ids"] == ids
    assert [x != IGNORE_INDEX for x in labels] == [bool(m) for m in out["assistant_masks"]]
    assert trained_text(tok, labels) == "4<|im_end|>6, of course<|im_end|>" and t.untrained_turns == 0
    opens = [{"role": "assistant", "content": "Hi, ask me."}, {"role": "user", "content": "2 + 2?"},
             {"role": "assistant", "content": "4"}]  # (transformers refuses to render the first turn's empty prefix)
    assert trained_text(tok, encode_chat(opens, tok, t)[1]) == "Hi, ask me.<|im_end|>4<|im_end|>"
    _, last = encode_chat(CONV, tok, t, mask="last_assistant")
    assert trained_text(tok, last) == "6, of course<|im_end|>"
    _, every = encode_chat(CONV, tok, t, mask="none")
    assert every == ids
    assert encode_prompt(CONV[:2], tok, t) == hf.apply_chat_template(CONV[:2], tokenize=True, return_dict=False,
                                                                      add_generation_prompt=True)


def test_gpt_oss_harmony_trains_the_last_turn_through_return_and_counts_the_earlier_one(tmp_path):
    """gpt-oss renders the conversation's last assistant turn with its analysis channel and <|return|> (the
    template's comments: only in training, so the model learns to emit it) and earlier ones with <|end|> and no
    analysis: the earlier turn's own prefix render is not part of the conversation's, so it is counted, not trained;
    the last turn is trained from its analysis channel through <|return|>. DPO trains the response the same way;
    GRPO's prompt ends with the generation prompt and sampling stops on <|return|>."""
    tok = tokenizer_folder(tmp_path / "tok", HARMONY, "<|return|>", (TEMPLATES / "gpt-oss.jinja").read_text())
    t = load_tokenizer_template(tmp_path / "tok")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    ids, labels = encode_chat(CONV, tok, t)
    assert ids == hf.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert trained_text(tok, labels) == ("<|channel|>analysis<|message|>easy sum<|end|>"
                                         "<|start|>assistant<|channel|>final<|message|>6, of course<|return|>")
    assert (t.conversations, t.untrained_turns, t.examples) == (
        1, 1, ["conversation 0 (counting from 0 in the stage's data)"])
    assert "<|channel|>final<|message|>4<|end|>" in tok.decode(ids, skip_special_tokens=False)

    pid, plab = encode_prompt_response(CONV[:2], "4", tok, t)
    assert trained_text(tok, plab) == "<|channel|>final<|message|>4<|return|>"
    prompt = encode_prompt(CONV[:2], tok, t)
    assert prompt == hf.apply_chat_template(CONV[:2], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert tok.decode(prompt, skip_special_tokens=False).endswith("<|start|>assistant")
    assert end_token_id(tok, t) == tok.token_to_id("<|return|>")
    bad = [CONV[1], {"role": "assistant", "content": "4", "thinking": "x<|channel|>final<|message|>y"}]
    with pytest.raises(TemplateError) as e:
        encode_chat(bad, tok, t)  # (the template's own raise_exception, after three conversations were encoded)
    assert "cannot render conversation 3 (counting from 0" in str(e.value)
    assert "<|channel|> tags in the thinking field" in str(e.value)


def test_a_generation_prompt_the_answer_does_not_repeat_is_not_the_turns(tmp_path):
    """DeepSeek-R1's generation prompt opens the reasoning (``<｜Assistant｜><think>\n``) that its rendered answers
    drop (content after ``</think>``): the turn starts where the prompt and the answer's render part, so every turn is
    trained, as transformers' assistant mask gives it on the same template with {% generation %} around the answer
    and its end of sentence (before: nothing was trained, the stage ran to the end on zero trained tokens)."""
    src = (TEMPLATES / "deepseek-r1.jinja").read_text()
    tok = tokenizer_folder(tmp_path / "tok", R1, "<｜end▁of▁sentence｜>", src, bos=R1[0])
    t = load_tokenizer_template(tmp_path / "tok")
    conv = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "<think>add</think>4"},
            {"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "<think>easy</think>6"}]
    ids, labels = encode_chat(conv, tok, t)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    turn = "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    assert turn in src
    marked = src.replace(turn, "{{'<｜Assistant｜>'}}{% generation %}{{content + '<｜end▁of▁sentence｜>'}}"
                               "{% endgeneration %}")
    out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 chat_template=marked)
    assert out["input_ids"] == ids
    assert [x != IGNORE_INDEX for x in labels] == [bool(m) for m in out["assistant_masks"]]
    assert trained_text(tok, labels) == "4<｜end▁of▁sentence｜>6<｜end▁of▁sentence｜>" and t.untrained_turns == 0


def test_the_turn_ends_with_the_token_the_template_writes_after_an_answer(tmp_path):
    """Qwen2.5's base tokenizer: eos <|endoftext|>, but its template closes turns with <|im_end|>. The turn is trained
    through <|im_end|> (not the newline after it), an <|endoftext|> quoted inside the answer does not cut the turn
    short, and GRPO's sampling stops on <|im_end|> (before: all three went by the eos)."""
    tok = tokenizer_folder(tmp_path / "tok", QWEN, "<|endoftext|>", (TEMPLATES / "qwen2.5.jinja").read_text())
    t = load_tokenizer_template(tmp_path / "tok")
    conv = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "one <|endoftext|> two"}]
    _, labels = encode_chat(conv, tok, t)
    assert trained_text(tok, labels) == "one <|endoftext|> two<|im_end|>"
    assert end_token_id(tok, t) == tok.token_to_id("<|im_end|>")


def test_renders_that_differ_between_calls_are_tried_again(tmp_path):
    """A template that writes the date (gpt-oss: strftime_now) renders a conversation's prefixes differently when
    midnight falls between the renders; the conversation is rendered once more before a turn counts as untrained."""
    from llmc.runtime.chat import TokenizerTemplate

    tok = tokenizer_folder(tmp_path / "tok", QWEN, "<|im_end|>", (TEMPLATES / "qwen2.5.jinja").read_text())
    base = load_tokenizer_template(tmp_path / "tok")
    calls = []

    def render(messages, gen):  # the first render says "day 1", every later one "day 2"
        calls.append(1)
        return ("day 1 " if len(calls) == 1 else "day 2 ") + base.render(messages, gen)

    t = TokenizerTemplate(render, base.end, "dated")
    _, labels = encode_chat(CONV[1:3], tok, t)
    assert trained_text(tok, labels) == "4<|im_end|>" and t.untrained_turns == 0


def test_errors_name_the_record_a_dpo_pair_came_from(tmp_path):
    """DPO encodes each record twice (chosen, rejected): the template's own error names the preference record and
    which response, not the count of encodings."""
    from llmc.runtime.dpo import encode_pairs

    tok = tokenizer_folder(tmp_path / "tok", HARMONY, "<|return|>", (TEMPLATES / "gpt-oss.jinja").read_text())
    t = load_tokenizer_template(tmp_path / "tok")
    pairs = [{"prompt": [{"role": "user", "content": f"{i}?"}], "chosen": "yes", "rejected": "no"} for i in range(3)]
    pairs[2]["prompt"] = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                              "thinking": "<|channel|>final<|message|>"},
                          {"role": "user", "content": "q2"}]
    with pytest.raises(TemplateError) as e:
        encode_pairs(pairs, tok, t)
    assert "cannot render preference record 2 (chosen)" in str(e.value)


def test_a_tokenizer_without_a_template_is_one_clear_error(tmp_path):
    tokenizer_folder(tmp_path / "tok", QWEN, "<|im_end|>", None)
    with pytest.raises(TemplateError, match="no chat template of its own"):
        load_tokenizer_template(tmp_path / "tok")


SPEC = """\
name: own
model: {{name: micro, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128, vocab_size: {vocab},
        max_seq_len: 512}}
hardware: {{gpu: cpu, count: 1}}
data:
  sources: [{{name: python-docs, format: builtin}}]
  tokenizer: {tokenizer}
  seq_len: 64
  tokens: 4096
training: {{precision: fp32, global_batch_tokens: 256}}
stages:
  - {{name: sft, kind: sft, steps: 2, lr: 1.0e-3, seq_len: 512,
      data: {{sources: [{{name: chat, path: chat.jsonl, kind: chat}}], seq_len: 512, tokens: 20000}}}}
"""


def _compile(tmp_path: Path, tokenizer: str, vocab: int = 102):
    from llmc.compiler.compile import compile_spec
    from llmc.spec.facts import gather_facts
    from llmc.spec.load import loads_spec

    text = SPEC.format(tokenizer=tokenizer, vocab=vocab)
    (tmp_path / "spec.yaml").write_text(text)
    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, str(tmp_path / "spec.yaml"), lines, spec_bytes=text.encode(),
                        facts=gather_facts(run, tmp_path))


def _template_errors(c) -> list:
    return [d for d in c.diagnostics if d.code == "T103"]


def test_plan_picks_the_tokenizers_own_template_where_no_named_one_fits(tmp_path):
    """A harmony tokenizer with its own template: the plan picks ``tokenizer`` (before: llama3, and T103 for the
    special tokens it lacks); a tokenizer whose special tokens fit a named template keeps it; asking for the
    tokenizer's own template of a folder without one, or of llmc's trained tokenizer, is T103, located."""
    tokenizer_folder(tmp_path / "harmony", HARMONY, "<|return|>", (TEMPLATES / "gpt-oss.jinja").read_text())
    tokenizer_folder(tmp_path / "qwen", QWEN, "<|im_end|>", (TEMPLATES / "qwen2.5.jinja").read_text())
    tokenizer_folder(tmp_path / "bare", HARMONY, "<|return|>", None)
    c = _compile(tmp_path, "{path: harmony}")
    assert c.stages[-1].hyper["chat_template"] == "tokenizer" and not _template_errors(c)
    assert "chat template: the tokenizer's own (the tokenizer's special tokens fit none of llama3, chatml, phi3, " \
        "phi4, gemma)" in c.stages[-1].notes  # (the plan says which layout the stage trains on, and why)
    c = _compile(tmp_path, "{path: qwen}", vocab=99)
    assert c.stages[-1].hyper["chat_template"] == "chatml" and not _template_errors(c)
    assert "chat template: chatml (the first whose special tokens the tokenizer has, before its own template)" \
        in c.stages[-1].notes
    c = _compile(tmp_path, "{path: bare}")
    assert c.stages[-1].hyper["chat_template"] == "llama3" and _template_errors(c)  # (as before: nothing fits)
    c = _compile(tmp_path, "{path: bare, chat_template: tokenizer}")
    (d,) = _template_errors(c)
    assert d.severity == "error" and d.path == "data.tokenizer.chat_template" and "does not have" in d.message
    c = _compile(tmp_path, "{train: true, vocab_size: 512, chat_template: tokenizer}", vocab=512)
    (d,) = _template_errors(c)
    assert d.severity == "error" and "llmc-trained tokenizer" in d.message


def test_sft_on_the_tokenizers_template_runs_reports_and_exports_it(tmp_path, capsys):
    """End to end on CPU: prepare copies chat_template.jinja with the tokenizer; the SFT stage trains on the
    harmony layout (two-turn conversations: the first turn reported untrained, once); its export keeps the
    tokenizer's template, which transformers reads back (before, prepare and the export dropped the file and the
    export had no chat template at all). The same build switched to llmc's trained tokenizer leaves no copied
    template behind in its assets (its exports would carry gpt-oss's template beside llmc's tokenizer)."""
    from llmc.emit.lock import lock_dict
    from llmc.runtime.entry import prepare_assets, run_stage
    from llmc.runtime.job import TrainJob

    src = (TEMPLATES / "gpt-oss.jinja").read_text()
    tokenizer_folder(tmp_path / "harmony", HARMONY, "<|return|>", src)
    rows = [{"messages": [{"role": "user", "content": f"{i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i), "thinking": "sum"},
                          {"role": "user", "content": "again?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(12)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lock = lock_dict(_compile(tmp_path, "{path: harmony}"))
    res = run_stage(lock, "sft", tmp_path / "run" / "sft", tmp_path)
    assert res["status"] == "done" and res["chat_template"] == "tokenizer"
    assert res["untrained_assistant_turns"] == 12 and res["examples"] == 12
    assert res["conversations_without_trained_tokens"] == 0
    out = capsys.readouterr().out
    assert out.count("12 assistant turn(s) of 12 encoded conversation(s) are not trained (first: conversation 0, "
                     "conversation 1, conversation 2)") == 1
    assert (tmp_path / "assets" / "chat_template.jinja").read_text() == src
    hf_dir = tmp_path / "run" / "sft" / "hf"
    assert (hf_dir / "chat_template.jinja").read_text() == src
    assert transformers.AutoTokenizer.from_pretrained(str(hf_dir)).chat_template == src

    trained = lock_dict(_compile(tmp_path, "{train: true, vocab_size: 512, chat_template: llama3}", vocab=512))
    prepare_assets(TrainJob.from_lock(trained), tmp_path)
    assert (tmp_path / "assets" / "tokenizer.json").exists()
    assert not (tmp_path / "assets" / "chat_template.jinja").exists()


def test_export_keeps_the_tokenizers_template_unless_a_named_one_was_trained(tmp_path):
    """The export's tokenizer files: a stage without a chat template (pre-training) or on the tokenizer's own keeps
    chat_template.jinja; a stage trained on a named template writes that one into tokenizer_config.json and leaves
    the tokenizer's file out (transformers would read the file first)."""
    from llmc.runtime.hf_io import _write_tokenizer
    from llmc.spec.chat import CHAT_TEMPLATES

    src = (TEMPLATES / "qwen2.5.jinja").read_text()
    tokenizer_folder(tmp_path / "tok", QWEN, "<|im_end|>", src)
    for name, want in ((None, src), ("tokenizer", src), ("chatml", CHAT_TEMPLATES["chatml"].jinja)):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        _write_tokenizer(tmp_path / "tok", out, name)
        assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == want, name
