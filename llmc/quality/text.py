"""Reading sources and normalising text for hashing (no torch).

Documents are read in the same order as llmc's runtime reader (sorted files, file order inside
each; ``text``: one document per file; ``jsonl``: ``text_field`` of each non-blank line;
``parquet``: the ``text_field`` column via pyarrow, nulls skipped).
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

_SUFFIXES = {"text": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def expand_paths(path: str | Path, fmt: str) -> list[Path]:
    """A file, a directory (its matching files, recursively) or a glob -> sorted file list."""
    if fmt not in _SUFFIXES:
        raise ValueError(f"unsupported source format {fmt!r} (text, jsonl, parquet)")
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES[fmt]]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"data source {path}: no {fmt} files found")
    return sorted(files)


def iter_documents(path: str | Path, fmt: str, text_field: str = "text",
                   shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, str, str]]:
    """(index in source, "file:line" location, text) for documents with index % num_shards == shard."""
    idx = 0
    for f in expand_paths(path, fmt):
        if fmt == "text":
            if idx % num_shards == shard:
                yield idx, f"{f.name}", f.read_text(encoding="utf-8", errors="replace")
            idx += 1
        elif fmt == "jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if idx % num_shards == shard:
                        rec = json.loads(line)
                        if text_field not in rec:
                            raise KeyError(f"{f}:{n}: no field {text_field!r} (set text_field on the source)")
                        yield idx, f"{f.name}:{n}", str(rec[text_field])
                    idx += 1
        else:
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(f).iter_batches(columns=[text_field], batch_size=1024):
                for t in batch.column(0).to_pylist():
                    row += 1
                    if t is None:
                        continue
                    if idx % num_shards == shard:
                        yield idx, f"{f.name}:{row}", str(t)
                    idx += 1


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
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix in (".jsonl", ".json"):
                rec = json.loads(line)
                keys = text_fields if text_fields is not None else tuple(rec)
                pieces: list[str] = []
                for k in keys:
                    v = rec.get(k)
                    if isinstance(v, str):
                        pieces.append(v)
                    elif isinstance(v, list):
                        pieces.extend(x for x in v if isinstance(x, str))
                yield f"{p.name}:{n}", pieces
            else:
                yield f"{p.name}:{n}", [line]
