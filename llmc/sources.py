"""Data sources read in place: one source reference and one reader of its files (no torch).

Used by the data-quality pipeline (:mod:`llmc.quality`), the runtime's packers and validation split
(:mod:`llmc.runtime.data`) and the streaming loader (:mod:`llmc.runtime.stream`), so that every part of
llmc reads the same documents in the same order: sorted files, file order inside each; ``text``: one
document per file; ``jsonl``: ``text_field`` of each non-blank line; ``parquet``: the ``text_field``
column via pyarrow, nulls skipped.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: file suffixes of each file format
SUFFIXES = {"text": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}


@dataclass(frozen=True)
class SourceRef:
    """One data source, read where it lies. ``format``: text, jsonl, parquet, or hf (a ``datasets``
    ``save_to_disk`` folder, streamed by :mod:`llmc.runtime.stream`)."""

    name: str
    path: str
    format: str = "jsonl"
    text_field: str = "text"
    weight: float = 1.0


def files_of(path: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """A file, a directory (its files with these suffixes, recursively) or a glob -> sorted file list."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"data source {path}: no {'/'.join(suffixes)} files found")
    return sorted(files)


def expand_paths(path: str | Path, fmt: str) -> list[Path]:
    """The files of a ``text`` / ``jsonl`` / ``parquet`` source, sorted."""
    if fmt not in SUFFIXES:
        raise ValueError(f"unsupported source format {fmt!r} (text, jsonl, parquet)")
    return files_of(path, SUFFIXES[fmt])


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


def read_documents(path: str | Path, fmt: str, text_field: str = "text") -> Iterator[str]:
    """Every document of one source, in the fixed order."""
    return (text for _, _, text in iter_documents(path, fmt, text_field))
