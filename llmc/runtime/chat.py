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


def _header(a: TokAdapter, tmpl: ChatTemplate, role: str) -> list[int]:
    role = dict(tmpl.roles).get(role, role)  # (Gemma: the assistant's turns are "model" turns)
    ids: list[int] = []
    for part in tmpl.header:
        if part == "{role}":
            ids += a.text(role)
        elif part.startswith("<|") or part in tmpl.specials:  # a special token; "<|{role}|>": the role's own
            ids.append(a.special(part.replace("{role}", role)))  # (Phi-3's <|user|>)
        else:
            ids += a.text(part)
    return ids


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
    ids: list[int] = []
    labels: list[int] = []

    def put(xs: list[int], train: bool) -> None:
        ids.extend(xs)
        labels.extend(xs if train else [IGNORE_INDEX] * len(xs))

    if tmpl.bos:
        put([a.special(tmpl.bos)], mask == "none")
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
        put(_header(a, tmpl, role), mask == "none")
        put(a.text(content) + [a.special(tmpl.end)], train)
        if tmpl.after_end:
            put(a.text(tmpl.after_end), mask == "none")
    if add_generation_prompt:
        put(_header(a, tmpl, "assistant"), False)
    return ids, labels


def encode_prompt_response(prompt: list[dict], response: str, tok: Any, template: str = "llama3"
                           ) -> tuple[list[int], list[int]]:
    """Prompt messages + one assistant response; labels only on the response (+ end token). For DPO."""
    return encode_chat([*prompt, {"role": "assistant", "content": response}], tok, template,
                       mask="last_assistant")


def encode_prompt(prompt: list[dict], tok: Any, template: str = "llama3") -> list[int]:
    """Prompt messages followed by the assistant header, ready for generation."""
    ids, _ = encode_chat(prompt, tok, template, mask="assistant", add_generation_prompt=True)
    return ids
