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


def benchmark_items(path: str | Path, text_fields: tuple[str, ...] | None) -> Iterator[tuple[str, list[str]]]:
    """(item id "file:line", its text pieces) of one benchmark file (.jsonl records or text lines)."""
    p = Path(path)
    with open_jsonl(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix in (".jsonl", ".json"):
                rec = jsonl_record(line, f"{p}:{n}")
                keys = text_fields if text_fields is not None else tuple(rec)
                pieces: list[str] = []
                for k in keys:
                    v = rec.get(k)
                    if isinstance(v, str):
                        pieces.append(clean_text(v))
                    elif isinstance(v, list):
                        pieces.extend(clean_text(x) for x in v if isinstance(x, str))
                yield f"{p.name}:{n}", pieces
            else:
                yield f"{p.name}:{n}", [clean_text(line)]
