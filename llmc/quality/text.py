"""Reading sources and normalising text for hashing (no torch).

Documents are read by :func:`llmc.sources.iter_documents`, in the same order as llmc's runtime reader
(sorted files, file order inside each; ``text``: one document per file; ``jsonl``: ``text_field`` of
each non-blank line; ``parquet`` / ``hf``: the ``text_field`` column, a null being the empty document).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from llmc.sources import clean_text, jsonl_record, open_jsonl

_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def normalize_exact(text: str) -> str:
    """NFKC, lowercased, whitespace runs collapsed to one space, stripped (the exact-dedup key's input)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_key(text: str) -> str:
    """sha256 hex of :func:`normalize_exact`."""
    return hashlib.sha256(normalize_exact(text).encode("utf-8")).hexdigest()


def words(text: str) -> list[str]:
    """Lowercased ``\\w+`` runs of the NFKC text (whitespace and punctuation ignored)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(text: str, n: int) -> list[bytes]:
    """Distinct word n-grams (UTF-8), the MinHash set; a document shorter than n words is one shingle."""
    w = words(text)
    if len(w) < n:
        return [" ".join(w).encode("utf-8")] if w else []
    return list({" ".join(w[i:i + n]).encode("utf-8") for i in range(len(w) - n + 1)})


def ngram_hash(gram: list[str] | tuple[str, ...]) -> int:
    """Stable 64-bit hash of a word n-gram (blake2b; Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "little")


def string_leaves(value: object) -> Iterator[str]:
    """Every string inside a JSON value, depth first in document order (object values, array items; keys and
    numbers are not text). Iterative: any depth ``json`` parses is walked without recursion."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            stack.extend(reversed(list(v.values())))
        elif isinstance(v, list):
            stack.extend(reversed(v))


def select_field(rec: dict, field: str) -> list[object]:
    """The values ``field`` names in one record: a top-level key, else a dotted path into nested objects
    (``question.stem``; an array on the way is mapped over: ``choices.text``); [] when absent."""
    if field in rec:
        return [rec[field]]
    values: list[object] = [rec]
    for key in field.split("."):
        nxt: list[object] = []
        for v in values:
            for item in v if isinstance(v, list) else [v]:
                if isinstance(item, dict) and key in item:
                    nxt.append(item[key])
        values = nxt
    return values


def _label(value: object) -> str | None:
    """A choice label or answer key as text ("C", "3"; JSON may hold either as a number), else None."""
    return str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def gold_choice(rec: dict) -> list[str] | None:
    """[question, gold answer] of a multiple-choice record that says which choice is gold, else None.

    Two conventions are read: an ``answerKey`` equal to one choice's ``label`` (ARC, OpenBookQA and
    CommonsenseQA, both as AI2's jsonl ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``
    and as the Hugging Face rows ``{"question" | "question_stem", "choices": {"text": [...], "label": [...]},
    "answerKey"}``), and an integer ``answer`` indexing a ``choices`` list of strings (MMLU's rows,
    ``cais/mmlu``). Layouts that name the gold choice otherwise (PIQA's ``label`` over ``sol1`` / ``sol2``,
    HellaSwag's over ``endings``) are not read: those items are matched through their fields joined."""
    question = rec.get("question", rec.get("question_stem"))
    choices = rec.get("choices")
    if isinstance(question, dict):
        question, choices = question.get("stem"), question.get("choices", choices)
    if not isinstance(question, str):
        return None
    answer, key = rec.get("answer"), _label(rec.get("answerKey"))
    if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            return [question, choices[answer]]
        return None
    if key is None:
        return None
    if isinstance(choices, list):
        pairs = [(c.get("label"), c.get("text")) for c in choices if isinstance(c, dict)]
    elif (isinstance(choices, dict) and isinstance(choices.get("label"), list)
          and isinstance(choices.get("text"), list) and len(choices["label"]) == len(choices["text"])):
        pairs = list(zip(choices["label"], choices["text"], strict=True))
    else:
        return None
    gold = [text for label, text in pairs if _label(label) == key and isinstance(text, str)]
    return [question, gold[0]] if len(gold) == 1 else None


def benchmark_items(path: str | Path, text_fields: tuple[str, ...] | None) -> Iterator[tuple[str, list[str]]]:
    """(item id "file:line", the texts it is matched by) of one benchmark file (.jsonl records or text lines).

    The first text is the item joined: its pieces in order, one space between them. A record's pieces are
    every string leaf (:func:`string_leaves`) of the fields ``text_fields`` names, in that order
    (:func:`select_field`), or of the whole record in document order when ``text_fields`` is None, so nested
    layouts count: AI2's ARC jsonl (``{"id", "question": {"stem", "choices": [{"text", "label"}]},
    "answerKey"}``), the Hugging Face ARC rows (``"choices": {"text": [...], "label": [...]}``), lists of
    answers. A test item leaks into a training document as its question followed by its answer (a quiz or
    flash-card page), so an n-gram may span two pieces; the join keeps each piece's words contiguous, so every
    n-gram of a single piece is an n-gram of the join too. Ids, labels and answer keys ("Mercury_7175875",
    "A") stay in the join: they break the n-grams that cross them, and an n-gram holding one is still made of
    the item's own words in the item's order. With ``text_fields`` None, a multiple-choice record that names
    its gold choice (:func:`gold_choice`) has a second text, the question joined with the gold answer: how the
    item reads in a document that answers it, which the join (all choices in order, labels among them) holds
    for the first choice only. A text line is one piece.
    """
    p = Path(path)
    with open_jsonl(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix in (".jsonl", ".json"):
                rec = jsonl_record(line, f"{p}:{n}")
                values = [rec] if text_fields is None else [v for k in text_fields
                                                            for v in select_field(rec, k)]
                texts = [" ".join(clean_text(s) for v in values for s in string_leaves(v))]
                gold = gold_choice(rec) if text_fields is None else None
                if gold is not None:
                    texts.append(" ".join(clean_text(s) for s in gold))
                yield f"{p.name}:{n}", texts
            else:
                yield f"{p.name}:{n}", [clean_text(line)]
