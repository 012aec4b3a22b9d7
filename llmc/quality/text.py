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


def benchmark_items(path: str | Path, text_fields: tuple[str, ...] | None) -> Iterator[tuple[str, list[str]]]:
    """(item id "file:line", its text pieces) of one benchmark file (.jsonl records or text lines).

    A record's pieces are every string leaf (:func:`string_leaves`) of the fields ``text_fields`` names
    (:func:`select_field`; None: the whole record), so nested layouts count: AI2's ARC jsonl
    (``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``), the Hugging Face ARC rows
    (``"choices": {"text": [...], "label": [...]}``), lists of answers. Ids, labels and answer keys are
    pieces too; each piece is matched on its own (no n-gram spans two pieces), so one shorter than the
    n-gram contributes nothing and cannot cause a false match.
    """
    p = Path(path)
    with open_jsonl(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix in (".jsonl", ".json"):
                rec = jsonl_record(line, f"{p}:{n}")
                values = [rec] if text_fields is None else [v for k in text_fields for v in select_field(rec, k)]
                yield f"{p.name}:{n}", [clean_text(s) for v in values for s in string_leaves(v)]
            else:
                yield f"{p.name}:{n}", [clean_text(line)]
