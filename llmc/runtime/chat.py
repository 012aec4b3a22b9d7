"""Chat templates and loss masks for SFT / DPO / GRPO.

The templates (llama3, chatml, phi3, phi4, gemma) are declared in :mod:`llmc.spec.chat`; special tokens are looked up as
single ids, never split by the BPE. Labels are -100 (PyTorch cross-entropy ignore_index) everywhere except
assistant content and the turn's closing token (<|eot_id|> / <|im_end|> / <|end|> / <end_of_turn>), so the model learns to answer
*and to stop* (a model never trained on the end token does not learn to stop).
``mask="last_assistant"`` trains only the final assistant turn;
``mask="none"`` trains every token (warned by the compiler, T102).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmc.spec.chat import CHAT_TEMPLATES, ChatTemplate

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


def check_template(tok: Any, template: str) -> None:
    """Raise TemplateError when the tokenizer lacks a special token the template needs (T103 at runtime)."""
    if template not in TEMPLATES:
        raise TemplateError(f"unknown chat template {template!r} ({', '.join(TEMPLATES)})")
    a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
    missing = [s for s in TEMPLATES[template].specials if not a.has_special(s)]
    if missing:
        raise TemplateError(f"chat template {template!r} needs {missing}, missing from the tokenizer")


def end_token_id(tok: Any, template: str) -> int:
    a = tok if isinstance(tok, TokAdapter) else TokAdapter(tok)
    return a.special(TEMPLATES[template].end)


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


def _encode_segments(segs: list[tuple[str, bool, bool]], a: TokAdapter) -> tuple[list[int], list[int]]:
    """(ids, labels) of (text, is special, trained) segments.

    As transformers' ``apply_chat_template`` and vLLM do, the rendered conversation is tokenised in one call (a
    segment encoded on its own may split differently: a BPE merge across two text parts, a SentencePiece ``▁``
    before each part), and a token is trained when it starts inside a trained segment (character offsets). That
    needs a ``tokenizers.Tokenizer`` that reads each special token of the text as its one id; any other tokenizer
    encodes segment by segment, special tokens by id."""
    tk = _whole_string_encoder(a.tok)
    if tk is not None:
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
        starts = {st: i for i, (st, _) in enumerate(enc.offsets) if i == 0 or enc.offsets[i - 1][0] != st}
        if all(not sp or (st in starts and enc.ids[starts[st]] == a.special(text[st:en]))
               for st, en, sp, _ in spans):  # every special token read as its own id
            trained = [(st, en) for st, en, _, train in spans if train]
            labels = [i if any(st <= o[0] < en for st, en in trained) else IGNORE_INDEX
                      for i, o in zip(enc.ids, enc.offsets, strict=True)]
            return list(enc.ids), labels
    ids: list[int] = []
    labels: list[int] = []
    for s, special, train in segs:
        xs = [a.special(s)] if special else a.text(s)
        ids.extend(xs)
        labels.extend(xs if train else [IGNORE_INDEX] * len(xs))
    return ids, labels


def encode_chat(messages: list[dict], tok: Any, template: str = "llama3", mask: str = "assistant",
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Tokenise a conversation; returns (ids, labels) of equal length, labels -100 off the trained tokens.

    Labels are aligned with ids (not shifted): the loss compares logits[t] with labels[t+1].
    """
    if mask not in ("assistant", "last_assistant", "none"):
        raise ValueError(f"mask must be assistant/last_assistant/none, got {mask!r}")
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
    prefix = ""
    if tmpl.system == "first_user" and messages and messages[0]["role"] == "system":  # (Gemma: no system turn)
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    last_asst = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"].strip() if tmpl.trim else m["content"]
        if i == 0:
            content = prefix + content
        if role not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {role!r}")
        train = mask == "none" or (role == "assistant" and (mask == "assistant" or i == last_asst))
        put(_header(tmpl, role), mask == "none")
        put([(content, False), (tmpl.end, True)], train)
        if tmpl.after_end:
            put([(tmpl.after_end, False)], mask == "none")
    if add_generation_prompt:
        put(_header(tmpl, "assistant"), False)
    return _encode_segments(segs, a)


def encode_prompt_response(prompt: list[dict], response: str, tok: Any, template: str = "llama3"
                           ) -> tuple[list[int], list[int]]:
    """Prompt messages + one assistant response; labels only on the response (+ end token). For DPO."""
    return encode_chat([*prompt, {"role": "assistant", "content": response}], tok, template,
                       mask="last_assistant")


def encode_prompt(prompt: list[dict], tok: Any, template: str = "llama3") -> list[int]:
    """Prompt messages followed by the assistant header, ready for generation."""
    ids, _ = encode_chat(prompt, tok, template, mask="assistant", add_generation_prompt=True)
    return ids
