"""Data sources read in place: one source reference and one reader of its files (no torch).

Used by the data-quality pipeline (:mod:`llmc.quality`), the runtime's packers and validation split
(:mod:`llmc.runtime.data`) and the streaming loader (:mod:`llmc.runtime.stream`), so that every part of
llmc reads the same documents in the same order: sorted files, file order inside each; ``text``: one
document per file; ``jsonl``: ``text_field`` of each non-blank line (a UTF-8 BOM is accepted); ``parquet``:
the ``text_field`` column via pyarrow; ``hf``: the ``text_field`` column of a ``datasets`` ``save_to_disk``
folder, row order.

One rule for every reader (:func:`doc_text`): a null text is the empty document ``""`` (so document
indices, which the held-out split hashes, agree everywhere); a number, list or object is an error naming
the file and line; lone UTF-16 surrogates (valid JSON, e.g. an emoji cut in half: ``"\\ud83d"``) become
U+FFFD, so every document is valid Unicode (:func:`clean_text`). Bad input is one ``ValueError`` /
``KeyError`` naming the file and line, never a traceback from deep inside.

:func:`mixture_parts`: each source's integer share of a validation set, computed here once for every reader of it
(llmc's validation and, through the emitter, the torchtitan job), so every backend takes the same documents.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: file suffixes of each file format
SUFFIXES = {"text": (".txt", ".md", ".text"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_KIND = {dict: "an object", list: "an array", int: "a number", float: "a number", bool: "a boolean",
              str: "a string"}


def json_kind(value: object) -> str:
    """What a JSON value is, in words ("an object", "an array", "null", ...), for error lines about records."""
    return "null" if value is None else _JSON_KIND.get(type(value), type(value).__name__)


def clean_text(text: str) -> str:
    """``text`` as valid Unicode: lone UTF-16 surrogates -> U+FFFD, valid surrogate pairs joined (UTF-16
    round trip with ``surrogatepass`` / ``replace``; the Python ``codecs`` error handlers). ``json.loads``
    accepts a lone ``\\ud83d`` escape, which no UTF-8 encoder (tokenizer, writer) accepts."""
    if text.isascii() or not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def doc_text(value: object, field: str, where: object) -> str:
    """The document of one record's ``field`` value: a string (cleaned), None -> "" (an empty document keeps
    the document indices), anything else a ``ValueError`` naming ``where`` (file:line)."""
    if isinstance(value, str):
        return clean_text(value)
    if value is None:
        return ""
    raise ValueError(f"{where}: field {field!r} is {_JSON_KIND.get(type(value), type(value).__name__)}, "
                     f"not a string; hint: point text_field at a string field")


def jsonl_record(line: str, where: object, field: str = "text") -> dict:
    """One JSONL line as a JSON object (read with :func:`open_jsonl`, so bytes that are not UTF-8 show up here
    as lone surrogates and are reported with their line); ``field`` only names the example in the hint."""
    bad = _SURROGATE.search(line)
    if bad:  # a JSON \\ud83d escape is six ASCII characters: a surrogate here is an undecodable byte
        raise ValueError(f"{where}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column "
                         f"{bad.start() + 1}); hint: re-encode the file as UTF-8")
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno}); "
                         f"hint: each line must be one JSON object") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: {_JSON_KIND.get(type(rec), 'null')}, not a JSON object; "
                         f"hint: each line must be one JSON object such as {{{json.dumps(field)}: \"...\"}}")
    return rec


def jsonl_text(line: str, field: str, where: object) -> str:
    """The document of one JSONL line (:func:`jsonl_record`, then :func:`doc_text` of its ``field``)."""
    rec = jsonl_record(line, where, field)
    if field not in rec:
        raise KeyError(f"{where}: no field {field!r} (set text_field on the source)")
    return doc_text(rec[field], field, where)


def open_jsonl(path: str | Path):
    """A JSONL file for :func:`jsonl_text`: text mode, a leading UTF-8 BOM dropped (the ``json`` docs suggest
    tolerating it), undecodable bytes kept as surrogates for a located error."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def read_text_file(path: str | Path) -> str:
    """One ``text`` document: UTF-8 (a leading BOM dropped, undecodable bytes -> U+FFFD)."""
    return clean_text(Path(path).read_text(encoding="utf-8-sig", errors="replace"))


def check_text_column(schema, field: str, where: object) -> None:
    """A pyarrow schema's ``field`` exists and holds strings (or only nulls), else a located error."""
    import pyarrow as pa

    if field not in schema.names:
        raise KeyError(f"{where}: no column {field!r} (set text_field on the source)")
    t = schema.field(field).type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
            or getattr(pa.types, "is_string_view", lambda _: False)(t)):
        raise ValueError(f"{where}: column {field!r} holds {t}, not strings; hint: point text_field at a "
                         f"string column")


def hf_saved(path: str | Path):
    """The ``datasets`` ``Dataset`` of a ``save_to_disk`` folder (memory-mapped; a DatasetDict's ``train``)."""
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow files, read in place
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split ({sorted(ds)})")
        ds = ds["train"]
    return ds


def is_hf_saved(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


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
    """A file, a directory (its files with these suffixes, recursively) or a glob -> sorted file list. A folder
    with none of them is a FileNotFoundError that says what the folder holds and what reads it
    (:func:`folder_mismatch`)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes]
    else:
        files = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
    if not files:
        wanted = "/".join(suffixes)
        fmt = next((k for k, v in SUFFIXES.items() if v == tuple(suffixes)), None)
        found = folder_mismatch(p, fmt) if p.is_dir() else None
        more = f" (the folder holds {found[0]}); hint: {found[1]}" if found else ""
        raise FileNotFoundError(f"data source {path}: no {wanted} files found{more}")
    return sorted(files)


#: at most this many files of a source's folder are looked at to say what it holds (a scratch folder can hold millions)
MAX_FOLDER_SCAN = 10_000


def folder_mismatch(folder: str | Path, fmt: str | None, whole: bool = False,
                    shown: str | None = None) -> tuple[str, str] | None:
    """For a source folder that holds no file a ``fmt`` source reads (``fmt``: a key of :data:`SUFFIXES`; None: a
    source read by the suffixes of several formats): (what it holds, in words; a hint naming the ``format:`` that
    reads those files, or for files no format reads in a folder, the glob that reads them as ``text``, one
    document per file: :func:`files_of` reads every file a glob matches, whatever its suffix). None when the
    folder holds no file, holds one ``fmt`` reads after all, or cannot be listed. Looks at the first
    :data:`MAX_FOLDER_SCAN` files; ``whole``: None too when the folder holds more (the plan, which has not
    listed the folder, cannot tell that none of the others is ``fmt``'s). ``shown``: the folder as the hint's glob
    names it (default: ``folder``)."""
    import itertools

    root = Path(folder)
    counts: dict[str, int] = {}
    nested = False
    wanted = SUFFIXES.get(fmt, ()) if fmt is not None else SUFFIXES["parquet"] + SUFFIXES["jsonl"]
    try:
        for f in itertools.islice((f for f in root.rglob("*") if f.is_file()), MAX_FOLDER_SCAN + 1):
            if f.suffix in wanted:
                return None
            counts[f.suffix] = counts.get(f.suffix, 0) + 1
            nested = nested or f.parent != root
    except OSError:
        return None
    if not counts or (whole and sum(counts.values()) > MAX_FOLDER_SCAN):
        return None
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    holds = ", ".join(f"{n} {suffix or 'extension-less'} file{'s' if n > 1 else ''}" for suffix, n in ranked[:3])
    holds += ", ..." if len(ranked) > 3 else ""
    holds += f" among the first {MAX_FOLDER_SCAN:,} looked at" if sum(counts.values()) > MAX_FOLDER_SCAN else ""
    readers = [k for k, sufs in SUFFIXES.items() if k != fmt and any(s in counts for s in sufs)]
    if readers:
        read = {k: "/".join(s for s in SUFFIXES[k] if s in counts) for k in readers}
        if len(readers) == 1:
            return holds, f"set format: {readers[0]} on the source, which reads {read[readers[0]]} files"
        return holds, ("one format per source: set " + " or ".join(f"format: {k} for its {v} files"
                                                                   for k, v in read.items())
                       + f", with a glob such as '{str(shown or root).rstrip('/')}/*.parquet' to pick that kind")
    top = next((s for s, _ in ranked if s), "")
    pattern = f"{str(shown or root).rstrip('/')}/{'**/' if nested else ''}*{top}"
    lead = (f"format: text reads a folder's {'/'.join(SUFFIXES['text'])} files only; " if fmt == "text" else "")
    return holds, (f"{lead}a glob reads files of any extension: path: '{pattern}' with format: text reads each "
                   "as one document")


def expand_paths(path: str | Path, fmt: str) -> list[Path]:
    """The files of a ``text`` / ``jsonl`` / ``parquet`` / ``hf`` source, sorted (``hf``: every file of a
    ``save_to_disk`` folder, else its parquet / jsonl files)."""
    if fmt == "hf":
        if is_hf_saved(path):
            return sorted(f for f in Path(path).rglob("*") if f.is_file())
        return files_of(path, SUFFIXES["parquet"] + SUFFIXES["jsonl"])
    if fmt not in SUFFIXES:
        raise ValueError(f"unsupported source format {fmt!r} (text, jsonl, parquet, hf)")
    return files_of(path, SUFFIXES[fmt])


def iter_documents(path: str | Path, fmt: str, text_field: str = "text",
                   shard: int = 0, num_shards: int = 1) -> Iterator[tuple[int, str, str]]:
    """(index in source, "file:line" location, text) for documents with index % num_shards == shard."""
    if fmt == "hf" and not is_hf_saved(path):  # a folder of parquet / jsonl files: read as that format
        kinds = {f.suffix for f in expand_paths(path, fmt)}
        if len(kinds) > 1:
            raise ValueError(f"{path}: mixes {sorted(kinds)} files; use one format per source")
        fmt = "parquet" if kinds == {".parquet"} else "jsonl"
    if fmt == "hf":
        ds = hf_saved(path)
        check_text_column(ds.data.schema, text_field, path)
        col = ds.select_columns([text_field]).with_format("arrow")
        for first in range(0, len(col), 1024):
            vals = col[first:first + 1024].column(0).to_pylist()
            for j, t in enumerate(vals):
                idx = first + j
                if idx % num_shards == shard:
                    yield idx, f"{Path(path).name}:{idx + 1}", doc_text(t, text_field, f"{path}:{idx + 1}")
        return
    idx = 0
    for f in expand_paths(path, fmt):
        if fmt == "text":
            if idx % num_shards == shard:
                yield idx, f"{f.name}", read_text_file(f)
            idx += 1
        elif fmt == "jsonl":
            with open_jsonl(f) as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if idx % num_shards == shard:
                        yield idx, f"{f.name}:{n}", jsonl_text(line, text_field, f"{f}:{n}")
                    idx += 1
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            check_text_column(pf.schema_arrow, text_field, f)
            row = 0
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                for t in batch.column(0).to_pylist():
                    row += 1
                    if idx % num_shards == shard:
                        yield idx, f"{f.name}:{row}", doc_text(t, text_field, f"{f}: row {row}")
                    idx += 1


#: the formats of ``eval.validation.files`` by suffix: a text file is one document, a JSON lines file one per line
#: (its ``text`` field); the compiler refuses any other suffix (E011)
VALIDATION_FILE_FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl"}


def validation_file_format(path: str | Path) -> str | None:
    """How every backend reads validation file ``path`` (:data:`VALIDATION_FILE_FORMATS`), None for a suffix none
    reads."""
    return VALIDATION_FILE_FORMATS.get(Path(path).suffix)


#: resolution of the mixture shares (:func:`mixture_parts`)
MIX_PARTS = 10**6


def mixture_parts(weights: list[float]) -> list[int]:
    """Each source's share of the validation tokens in millionths, ``round(MIX_PARTS * w / sum(w))`` of the spec's
    (relative) weights: integers, so the interleaving (``llmc.runtime.validation.interleave``) compares exact
    rationals, and one computation for every backend (the torchtitan job gets these integers, not the weights)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("source weights must not all be zero")
    return [round(MIX_PARTS * float(w) / total) for w in weights]


def read_documents(path: str | Path, fmt: str, text_field: str = "text") -> Iterator[str]:
    """Every document of one source, in the fixed order."""
    return (text for _, _, text in iter_documents(path, fmt, text_field))
