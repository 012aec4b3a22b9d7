"""Chat templates and loss masks for SFT / DPO / GRPO.

The templates (llama3, chatml, phi3, phi4, gemma) are declared in :mod:`llmc.spec.chat`; special tokens are looked up as
single ids, never split by the BPE. Labels are -100 (PyTorch cross-entropy ignore_index) everywhere except
assistant content and the turn's closing token (<|eot_id|> / <|im_end|> / <|end|> / <end_of_turn>), so the model learns to answer
*and to stop* (a model never trained on the end token does not learn to stop).
``mask="last_assistant"`` trains only the final assistant turn;
``mask="none"`` trains every token (warned by the compiler, T102).
A message's content is a string or a list of text parts (joined); an assistant message with ``tool_calls``, another
part type or an unknown role is refused with one line naming the message (:func:`_named_content`): the named
templates have no layout for them, and ``chat_template: tokenizer`` renders what the tokenizer's own template does.

``chat_template: tokenizer`` lays conversations out with the tokenizer's own Jinja template (``chat_template.jinja``,
else ``chat_template`` in tokenizer_config.json: the files transformers reads, in its order), rendered by
transformers' ``apply_chat_template``: gpt-oss's harmony format, Mistral's, DeepSeek's, anything a model ships
(:class:`TokenizerTemplate`). Which tokens an assistant turn owns is found as TRL's ``DataCollatorForCompletionOnlyLM``
and axolotl's turn masking find it, from renders of the conversation's prefixes: turn *i* is the text between the
render of messages[:i] with the generation prompt and the render of messages[:i+1] part, through the token the
template writes after an answer (found by rendering a probe conversation; what generation stops on; text after it,
such as ChatML's newline, is layout). A template that renders an earlier turn differently once later messages follow
(gpt-oss ends the last turn with ``<|return|>`` and earlier ones with ``<|end|>``, and drops their analysis channel;
Qwen3 drops earlier turns' thinking) has no such prefix for that turn: only the turns whose text the whole
conversation's render holds are trained, and the rest are counted (:attr:`TokenizerTemplate.untrained_turns`),
which the trainer reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.sources import json_kind
from llmc.spec.chat import CHAT_TEMPLATES, OWN_TEMPLATE, ChatTemplate

IGNORE_INDEX = -100
TEMPLATES = CHAT_TEMPLATES  # name -> ChatTemplate


class TemplateError(ValueError):
    pass


@dataclass
class TokAdapter:
    """Uniform view over tokenizers: ``text(s) -> ids`` without specials, ``special(tok) -> id``.

    Accepts a ``tokenizers.Tokenizer``, llmc's runtime tokenizer, or anything with
    ``encode(str)`` (returning ids or an Encoding) and ``token_to_id(str)``.
    """

    tok: Any

    def text(self, s: str) -> list[int]:
        if not s:
            return []
        t = self.tok
        for meth in ("encode_plain", "encode_ordinary"):
            if hasattr(t, meth):
                return list(getattr(t, meth)(s))
        try:
            enc = t.encode(s, add_special_tokens=False)
        except TypeError:
            enc = t.encode(s)
        ids = getattr(enc, "ids", enc)
        return list(ids)

    def special(self, s: str) -> int:
        t = self.tok
        tid = None
        for meth in ("token_to_id", "token_id", "special_id"):
            if hasattr(t, meth):
                tid = getattr(t, meth)(s)
                break
        for inner in ("tok", "tokenizer"):
            if tid is None and hasattr(getattr(t, inner, None), "token_to_id"):
                tid = getattr(t, inner).token_to_id(s)
        if tid is None:
            raise TemplateError(f"tokenizer has no special token {s!r}")
        return int(tid)

    def has_special(self, s: str) -> bool:
        try:
            self.special(s)
            return True
        except (TemplateError, KeyError):
            return False

    def decode(self, ids: list[int]) -> str:
        t = self.tok
        try:
            return t.decode(list(ids), skip_special_tokens=True)
        except TypeError:
            return t.decode(list(ids))


@dataclass
class TokenizerTemplate:
    """A tokenizer's own Jinja chat template (:func:`load_tokenizer_template`); ``render(messages,
    add_generation_prompt)`` is transformers' ``apply_chat_template(..., tokenize=False)``; ``end`` is the special
    token the template writes after an answer (:func:`_turn_end`, else the tokenizer's eos): what an assistant turn
    is trained through, and generation stops on."""

    render: Any
    end: str
    source: str
    name: str = OWN_TEMPLATE
    conversations: int = 0
    """Conversations encoded so far."""
    untrained_turns: int = 0
    """Assistant turns the mask asked for but left untrained: the full render does not hold their text as their own
    prefix renders give it (module docstring)."""
    empty: int = 0
    """Conversations left with no trained token at all (every turn asked for was untrained)."""
    examples: list[str] = field(default_factory=list)
    """Which conversations (as :func:`encode_chat`'s ``where`` names them) were the first few with such turns."""


def load_tokenizer_template(tokenizer_dir: str | Path) -> TokenizerTemplate:
    """The chat template of the Hugging Face tokenizer folder ``tokenizer_dir``, read and rendered by transformers
    (``PreTrainedTokenizerFast.from_pretrained``: chat_template.jinja first, then tokenizer_config.json, as
    transformers' tokenization_utils_base does); TemplateError when it has none or transformers is missing."""
    d = Path(tokenizer_dir)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        raise TemplateError("chat_template: tokenizer renders the tokenizer's own template with transformers, which "
                            "is not installed (pip install 'llmc[hf]')") from None
    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds on an unreadable folder)
        raise TemplateError(f"{d}: transformers cannot read the tokenizer ({type(e).__name__}: {e})") from None
    tmpl = hf.chat_template
    if isinstance(tmpl, dict):
        tmpl = tmpl.get("default")
    if not tmpl:
        raise TemplateError(f"{d}: the tokenizer has no chat template of its own (no chat_template.jinja, no "
                            "chat_template in tokenizer_config.json); name one of "
                            f"{', '.join(TEMPLATES)} as data.tokenizer.chat_template")
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    added = [str(t.content) for t in hf.added_tokens_decoder.values()]  # (tokenizer.json's added tokens)
    end = _turn_end(render, added + [str(t) for t in hf.all_special_tokens]) or hf.eos_token
    if not end:
        raise TemplateError(f"{d}: no token closes the chat template's assistant turn (none follows a rendered "
                            "answer, and tokenizer_config.json names no eos_token)")
    src = "chat_template.jinja" if (d / "chat_template.jinja").is_file() else "tokenizer_config.json"
    return TokenizerTemplate(render, str(end), str(d / src))


_PROBE = "Four."


def _turn_end(render, specials: list[str]) -> str | None:
    """The special token the template writes right after an assistant answer (ChatML's <|im_end|>, Llama 3's
    <|eot_id|>, gpt-oss's <|return|> on a last turn, DeepSeek's end of sentence): what a turn is trained through and
    generation stops on. The tokenizer's eos need not be it (Qwen2.5's base tokenizer: eos <|endoftext|>, turns end
    with <|im_end|>). None when the probe conversation does not render or no special token follows the answer."""
    try:
        text = render([{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": _PROBE}], False)
    except Exception:  # noqa: BLE001 (a template with requirements of its own)
        return None
    k = text.rfind(_PROBE)
    after = text[k + len(_PROBE):] if k >= 0 else ""
    hits = [s for s in specials if s and after.startswith(s)]
    return max(hits, key=len) if hits else None


def template_name(template: str | TokenizerTemplate) -> str:
    return template.name if isinstance(template, TokenizerTemplate) else template


def check_template(tok: Any, template: str | TokenizerTemplate) -> None:
    """Raise TemplateError when the tokenizer lacks a special token the template needs (T103 at runtime)."""
    if isinstance(template, TokenizerTemplate):
        a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
        _rendered_text_encoder(a)
        a.special(template.end)
        return
    if template not in TEMPLATES:
        raise TemplateError(f"unknown chat template {template!r} ({', '.join(TEMPLATES)})")
    a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
    missing = [s for s in TEMPLATES[template].specials if not a.has_special(s)]
    if missing:
        raise TemplateError(f"chat template {template!r} needs {missing}, missing from the tokenizer")


def end_token_id(tok: Any, template: str | TokenizerTemplate) -> int:
    a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
    return a.special(template.end if isinstance(template, TokenizerTemplate) else TEMPLATES[template].end)


def _header(tmpl: ChatTemplate, role: str) -> list[tuple[str, bool]]:
    """A turn's header as (text, is a special token) parts."""
    role = dict(tmpl.roles).get(role, role)  # (Gemma: the assistant's turns are "model" turns)
    out: list[tuple[str, bool]] = []
    for part in tmpl.header:
        if part == "{role}":
            out.append((role, False))
        elif part.startswith("<|") or part in tmpl.specials:  # a special token; "<|{role}|>": the role's own
            out.append((part.replace("{role}", role), True))  # (Phi-3's <|user|>)
        else:
            out.append((part, False))
    return out


def _whole_string_encoder(tok: Any):
    """The ``tokenizers.Tokenizer`` behind ``tok`` (itself, or llmc's TextTokenizer's), else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        return None
    for t in (tok, getattr(tok, "tok", None), getattr(tok, "tokenizer", None)):
        if isinstance(t, Tokenizer):
            return t
    return None


def _rendered_text_encoder(a: TokAdapter) -> Any:
    """The ``tokenizers.Tokenizer`` a rendered template's text is tokenised with (it reads each special token in the
    text as its id); TemplateError for any other tokenizer."""
    tk = _whole_string_encoder(a.tok)
    if tk is None:
        raise TemplateError("the tokenizer's own chat template needs a Hugging Face tokenizer.json")
    return tk


def _encode_whole(tk: Any, segs: list[tuple[str, bool, bool]], a: TokAdapter | None = None
                  ) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of the segments' text tokenised in one call by the ``tokenizers.Tokenizer`` ``tk``, a token
    trained when it starts inside a trained segment; None when a segment marked special (checked through ``a``) was
    not read as its one id."""
    text = "".join(s for s, _, _ in segs)
    plain = tk.encode_special_tokens  # (llmc's TextTokenizer reads document text with special tokens as text)
    tk.encode_special_tokens = False  # a rendered template's special tokens are its own, as HF reads them
    try:
        enc = tk.encode(text, add_special_tokens=False)
    finally:
        tk.encode_special_tokens = plain
    spans, pos = [], 0
    for s, special, train in segs:
        spans.append((pos, pos + len(s), special, train))
        pos += len(s)
    ids, offsets = list(enc.ids), enc.offsets  # (each read of Encoding.offsets builds the whole list anew)
    starts = {st: i for i, (st, _) in enumerate(offsets) if i == 0 or offsets[i - 1][0] != st}
    if not all(not sp or (a is not None and st in starts and ids[starts[st]] == a.special(text[st:en]))
               for st, en, sp, _ in spans):  # every special token read as its own id
        return None
    trained = [(st, en) for st, en, _, train in spans if train]
    labels = [i if any(st <= o[0] < en for st, en in trained) else IGNORE_INDEX
              for i, o in zip(ids, offsets, strict=True)]
    return ids, labels


def _encode_segments(segs: list[tuple[str, bool, bool]], a: TokAdapter) -> tuple[list[int], list[int]]:
    """(ids, labels) of (text, is special, trained) segments.

    As transformers' ``apply_chat_template`` and vLLM do, the rendered conversation is tokenised in one call (a
    segment encoded on its own may split differently: a BPE merge across two text parts, a SentencePiece ``▁``
    before each part), and a token is trained when it starts inside a trained segment (character offsets). That
    needs a ``tokenizers.Tokenizer`` that reads each special token of the text as its one id; any other tokenizer
    encodes segment by segment, special tokens by id."""
    tk = _whole_string_encoder(a.tok)
    if tk is not None:
        got = _encode_whole(tk, segs, a)
        if got is not None:
            return got
    ids: list[int] = []
    labels: list[int] = []
    for s, special, train in segs:
        xs = [a.special(s)] if special else a.text(s)
        ids.extend(xs)
        labels.extend(xs if train else [IGNORE_INDEX] * len(xs))
    return ids, labels


def _turn_spans(messages: list[dict], tmpl: TokenizerTemplate, full: str, turns: list[int], render
                ) -> tuple[list[tuple[int, int]], int]:
    """(character spans of ``full`` that assistant turns ``turns`` own, turns left untrained): turn ``i`` starts
    where the render of messages[:i] with the generation prompt and that of messages[:i+1] part (their common
    prefix: a generation prompt the answer's render does not repeat, as DeepSeek-R1's ``<think>\n``, is not the
    turn's) and ends through the template's turn-end token after the answer's content; it counts only when the whole
    conversation's render holds messages[:i+1]'s."""
    spans: list[tuple[int, int]] = []
    lost = 0
    for i in turns:
        content = messages[i].get("content")
        try:
            upto = render(messages[: i + 1], False)
        except TemplateError:
            lost += 1
            continue
        try:
            start = len(os.path.commonprefix([render(messages[:i], True), upto]))
        except TemplateError:  # an empty prefix (a conversation that opens with the assistant), which transformers
            # refuses to render: the turn starts at its content, as llmc's named templates train it
            start = upto.rfind(content) if isinstance(content, str) and content else -1
            if start < 0:
                lost += 1
                continue
        if not (full.startswith(upto) and len(upto) > start):
            lost += 1
            continue
        stop = len(upto)
        at = upto.rfind(content, start) if isinstance(content, str) and content else -1
        end = upto.find(tmpl.end, at + len(content)) if at >= 0 else upto.rfind(tmpl.end, start)
        if end >= 0:  # through the end token; what follows it (a newline between turns) is layout
            stop = end + len(tmpl.end)
        if not spans or start >= spans[-1][1]:
            spans.append((start, stop))
    return spans, lost


def _rendered_segments(messages: list[dict], tmpl: TokenizerTemplate, mask: str, add_generation_prompt: bool,
                       where: str | None = None) -> list[tuple[str, bool, bool]]:
    """The tokenizer template's render of ``messages`` as (text, False, trained) segments (module docstring);
    ``where`` names the conversation in errors and reports (default: its position among those encoded)."""
    where = where or f"conversation {tmpl.conversations} (counting from 0 in the stage's data)"

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return tmpl.render(msgs, gen)
        except Exception as e:  # noqa: BLE001 (a Jinja error, or the template's own raise_exception)
            raise TemplateError(f"the tokenizer's chat template ({tmpl.source}) cannot render {where}: "
                                f"{type(e).__name__}: {e}") from None

    full = render(messages, add_generation_prompt)
    tmpl.conversations += 1
    if mask == "none":
        return [(full, False, True)]
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if mask == "last_assistant":
        turns = turns[-1:]
    spans, lost = _turn_spans(messages, tmpl, full, turns, render)
    if lost:  # once more: a template that writes the date (gpt-oss's strftime_now) may have crossed midnight
        again = render(messages, add_generation_prompt)
        spans2, lost2 = _turn_spans(messages, tmpl, again, turns, render)
        if lost2 < lost:
            full, spans, lost = again, spans2, lost2
    if lost:
        if len(tmpl.examples) < 3:
            tmpl.examples.append(where)
        tmpl.untrained_turns += lost
        tmpl.empty += not spans
    segs: list[tuple[str, bool, bool]] = []
    pos = 0
    for start, stop in spans:
        segs += [(full[pos:start], False, False), (full[start:stop], False, True)]
        pos = stop
    segs.append((full[pos:], False, False))
    return [s for s in segs if s[0]]


NAMED_ROLES = ("system", "user", "assistant", "tool")




def _named_content(m: Any, j: int, tmpl: ChatTemplate, where: str | None) -> str:
    """Message ``j``'s text as llmc's named template ``tmpl`` lays it out; TemplateError (one line naming ``where``,
    the message and its role, with a hint) for what the template cannot lay out without losing it:

    * a role other than system / user / assistant / tool;
    * ``tool_calls`` (OpenAI's assistant tool-call message, usually with ``content: null``): the named templates have
      no tool-call layout, and writing the content alone would train an empty answer followed by the end token,
      i.e. to stop right after the request. The model families' own templates each lay them out their own way
      (Llama 3.1's as a JSON object ``{"name": ..., "parameters": ...}``, Qwen2.5's as ``<tool_call>`` ...
      ``</tool_call>``), which ``chat_template: tokenizer`` renders with transformers, tool_calls passed through;
    * content that is neither a string nor a list of text parts. A list of ``{"type": "text", "text": ...}`` parts
      (OpenAI's content parts) is joined with no separator, as the published templates that accept lists do (Llama
      3.1 / 3.2's and Qwen2-VL's write each text part in turn)."""
    at = f"{where}: " if where else ""
    if not isinstance(m, dict):
        raise TemplateError(f"{at}message {j} is {json_kind(m)}, not an object with role and content")
    role = m.get("role")
    if role not in NAMED_ROLES:
        raise TemplateError(f"{at}message {j}: unknown role {role!r} (llmc's {tmpl.name} template lays out "
                            f"{', '.join(NAMED_ROLES)}); hint: rename the role, or set data.tokenizer.chat_template: "
                            "tokenizer to render the tokenizer's own template")
    if m.get("tool_calls"):
        raise TemplateError(f"{at}message {j} ({role}) has tool_calls, which llmc's {tmpl.name} template does not lay "
                            "out (it would train an empty answer); hint: set data.tokenizer.chat_template: tokenizer "
                            "to render them with the tokenizer's own template (one with a tool-call format, as Llama "
                            "3.1's and Qwen2.5's), or drop such records")
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        out = []
        for k, part in enumerate(c):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                what = f"type {part.get('type')!r}" if isinstance(part, dict) else json_kind(part)
                raise TemplateError(f"{at}message {j} ({role}): content part {k} is {what}, which llmc's {tmpl.name} "
                                    "template cannot lay out (text parts only: {\"type\": \"text\", \"text\": ...}); "
                                    "hint: drop the part, or the record")
            out.append(part["text"])
        return "".join(out)
    raise TemplateError(f"{at}message {j} ({role}) has {'no content' if c is None else json_kind(c) + ' as content'}; "
                        "hint: content is a string or a list of {\"type\": \"text\", \"text\": ...} parts")


def encode_chat(messages: list[dict], tok: Any, template: str | TokenizerTemplate = "llama3", mask: str = "assistant",
                add_generation_prompt: bool = False, where: str | None = None) -> tuple[list[int], list[int]]:
    """Tokenise a conversation; returns (ids, labels) of equal length, labels -100 off the trained tokens.

    Labels are aligned with ids (not shifted): the loss compares logits[t] with labels[t+1]. ``where`` names the
    conversation in the tokenizer template's errors and reports (e.g. "preference record 3 (chosen)").
    """
    if mask not in ("assistant", "last_assistant", "none"):
        raise ValueError(f"mask must be assistant/last_assistant/none, got {mask!r}")
    if isinstance(template, TokenizerTemplate):
        a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
        tk = _rendered_text_encoder(a)
        got = _encode_whole(tk, _rendered_segments(messages, template, mask, add_generation_prompt, where))
        assert got is not None  # (no segment is marked special)
        return got
    tmpl = TEMPLATES.get(template)
    if tmpl is None:
        raise TemplateError(f"unknown chat template {template!r}")
    a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
    segs: list[tuple[str, bool, bool]] = []  # (text, is a special token, trained)

    def put(parts: list[tuple[str, bool]], train: bool) -> None:
        segs.extend((s, special, train) for s, special in parts if s)

    for s in tmpl.specials:  # every special token the template needs, before anything is encoded (TemplateError)
        if s != "<|{role}|>":
            a.special(s)
    if tmpl.bos:
        put([(tmpl.bos, True)], mask == "none")
    texts = [_named_content(m, j, tmpl, where) for j, m in enumerate(messages)]  # (TemplateError before encoding)
    prefix = ""
    if tmpl.system == "first_user" and messages and messages[0]["role"] == "system":  # (Gemma: no system turn)
        prefix, messages, texts = texts[0] + "\n\n", messages[1:], texts[1:]
    last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        role, content = m["role"], texts[i].strip() if tmpl.trim else texts[i]
        if i == 0:
            content = prefix + content
        train = mask == "none" or (role == "assistant" and (mask == "assistant" or i == last_asst))
        put(_header(tmpl, role), mask == "none")
        put([(content, False), (tmpl.end, True)], train)
        if tmpl.after_end:
            put([(tmpl.after_end, False)], mask == "none")
    if add_generation_prompt:
        put(_header(tmpl, "assistant"), False)
    return _encode_segments(segs, a)


def encode_prompt_response(prompt: list[dict], response: str, tok: Any, template: str | TokenizerTemplate = "llama3",
                           where: str | None = None) -> tuple[list[int], list[int]]:
    """Prompt messages + one assistant response; labels only on the response (+ end token). For DPO."""
    return encode_chat([*prompt, {"role": "assistant", "content": response}], tok, template,
                       mask="last_assistant", where=where)


def encode_prompt(prompt: list[dict], tok: Any, template: str | TokenizerTemplate = "llama3") -> list[int]:
    """Prompt messages followed by the assistant header, ready for generation."""
    ids, _ = encode_chat(prompt, tok, template, mask="assistant", add_generation_prompt=True)
    return ids
