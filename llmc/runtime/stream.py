"""Streamed, rank-sharded, packed token windows over a weighted mixture of local sources, read in place.

Nothing is pre-tokenised or copied: documents are read from the source files as training asks for them,
tokenised on the fly by a callable, joined as ``doc EOS doc EOS ...`` and cut into windows of
``seq_len + 1`` tokens (stride ``seq_len``: inputs = w[:-1], labels = w[1:], so concatenating the
inputs of consecutive windows of one source gives back its token stream exactly).

Public API::

    SourceRef(name, path, format="jsonl", text_field="text", weight=1.0)
    m = StreamingMixture(sources, tokenize, eos_id, seq_len, rank=0, world=1, seed=0)
    for window in m: ...                      # torch.LongTensor (seq_len + 1,), endless
    inputs, labels = m.next_batch(mb)         # (mb, seq_len) int64 each
    state = m.state_dict(); m2.load_state_dict(state)   # exact continuation (JSON-serialisable)
    m.epochs()                                # {source name: completed passes over this rank's shard}

Formats and how rank ``r`` of ``w`` gets a disjoint share of each source:

* ``parquet``: a file, directory or glob of ``.parquet`` files. The unit is the row group (sorted
  files, row groups in file order), dealt so every rank holds about as many rows (:func:`deal_row_groups`:
  largest first, each to the rank with the fewest rows so far, ties to the lowest rank; a rank reads its row
  groups in source order); a state saved before this dealing (no ``dealing`` key) keeps ``i % w``. With fewer row groups than ranks
  it falls back to rows (global row ``j`` -> rank ``j % w``; only the rank's rows are converted to Python).
  Read with ``pyarrow.parquet.ParquetFile.iter_batches`` (only the text column, a few hundred rows at a time);
  resume skips whole row groups using the footer's row counts (each file's footer read once per process).
* ``jsonl``: by line: the ``k``-th non-blank line over the sorted files goes to rank ``k % w``. Every rank
  reads every line, but other ranks' lines that start with ``{`` cost no Python work each: the files are read in
  1 MiB pieces whose line ends numpy finds, a line that starts with ``{`` is not blank, so a rank's lines in a run
  of them are every ``w``-th, and only its own lines are decoded and parsed (:func:`_jsonl_own_lines`); other
  lines (blank, or with leading whitespace) are decoded and stripped one by one.
* ``text``: one document per file; file ``i`` goes to rank ``i % w``.
* ``hf``: a local Hugging Face ``datasets`` dataset: a ``save_to_disk`` directory (opened memory-mapped
  with ``datasets.load_from_disk``; a rank reads the rows that ``datasets.distributed.split_dataset_by_node``,
  the library's maintained tool for this (https://huggingface.co/docs/datasets/en/use_with_pytorch#distributed),
  deals it from ``Dataset.to_iterable_dataset(num_shards=w)``: the ``r``-th of ``w`` contiguous blocks, or row
  ``r`` when there are fewer rows than ranks (:func:`_hf_rows`), read as Arrow slices of the text column, so
  resume skips rows without reading them; with a held-out split, row ``i`` is document ``i`` and the kept rows
  are dealt to ranks in turn), or a folder of parquet / jsonl files, read as those formats.

Held-out validation split: a source with ``holdout = (part, fraction, seed)`` (``SourceData`` of
:mod:`llmc.runtime.data`) yields only the documents of that part: document ``i`` of the source (its
index in the order above: sorted files, row groups / lines / rows in order, before any rank split) is
validation iff ``llmc.runtime.validation.is_heldout(name, i, seed, fraction)``. ``part="train"`` skips
those documents, ``part="val"`` reads only them; nothing is copied. Resume positions count the part's
documents; skipping them hashes indices only (parquet row groups and jsonl lines are not parsed).

Mixture: each window's source is drawn with probability ``weight_i / sum(weights)`` by a
``numpy.random.Generator`` (PCG64) seeded with ``(seed, rank)``, so every rank's sequence is
deterministic and ranks differ. A source that reaches the end of this rank's shard starts over
(``epoch`` += 1), carrying its partial window across the boundary, so no token is dropped. A rank whose shard of
a source is empty (fewer documents ``n`` than ranks: a few books, a small curated file) reads the whole source,
from document ``rank mod n`` on, so the ranks that share it start at different documents.

State (``state_dict()``, plain JSON, ``version`` 2): ``{"version", "seed", "seq_len", "rank", "world",
"samples", "rng": <PCG64 state>, "sources": [{"name", "epoch", "docs", "dealing"[, "held"][, "pooled"]}]}`` where
``docs`` is the number of this rank's documents of the current epoch already tokenised. The tokens read but not yet
in a window (the buffer) are not stored: a window takes ``seq_len + 1`` tokens and drops ``seq_len``, and a document
is read only while the buffer holds fewer than ``seq_len + 1`` tokens, so what a window leaves is always a suffix (at
least one token) of the last document read, the one at position ``docs - 1``. ``held = {"skip", "tokens", "crc32"}``
names it: that document's tokens + EOS without the first ``skip``, ``tokens`` of them, with the CRC-32 of their
little-endian int64 bytes (:func:`_token_crc`). Its size does not depend on the document's length (the token list
it replaces was a whole book's tokens in every checkpoint of every rank). Resuming re-opens each source at document
``docs - 1`` (cheap skips as above), tokenises that one document again and checks length and checksum (a mismatch:
the source's files changed since the checkpoint, a ValueError naming it), then continues, so the continuation is
exactly what the uninterrupted run would have produced; the document is re-read at the first window after
``load_state_dict``, as the readers are re-opened. A version-1 state stored the buffer itself (``"buffer"``: its
tokens) and resumes from it as before. The world size and seq_len must match the checkpoint (changing them would
change the shards).

With llmc's tokenizer the packing matches :mod:`llmc.runtime.data` (no BOS, EOS after each document)::

    tok = TextTokenizer(tokenizer_dir)
    m = StreamingMixture(list(assets.sources),   # data.SourceData is a SourceRef (+ an optional held-out split)
                         tok.encode, tok.eos_id, seq_len, rank=dp_rank, world=dp_size, seed=seed)

There is deliberately no progress bar here (streaming is lazy; progress bars belong to prepare steps).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmc.sources import (
    SUFFIXES,
    SourceRef,
    check_text_column,
    doc_text,
    expand_paths,
    files_of,
    hf_saved,
    jsonl_text,
    read_text_file,
)

if TYPE_CHECKING:  # torch is imported where tensors are made: prepare (no tensors) starts without it
    import torch

FORMATS = ("parquet", "jsonl", "text", "hf")



# -- per-format document readers: this rank's documents, starting at shard position `start` ----------


def _keeper(src: SourceRef) -> Callable[[int], bool] | None:
    """Whether document ``i`` (its index in the source's own order) belongs to the part ``src`` reads, when
    ``src`` carries a held-out split (``holdout = (part, fraction, seed)``, see :mod:`llmc.runtime.validation`);
    None: every document."""
    h = getattr(src, "holdout", None)
    if not h:
        return None
    from llmc.runtime.validation import is_heldout

    part, fraction, seed = h
    want = part == "val"
    return lambda i: is_heldout(src.name, i, seed, fraction) == want


def _first_kept(keep, first_index: int, n: int, start: int) -> tuple[int, int]:
    """(rows to skip, kept documents they hold) to pass ``start`` kept documents in rows
    ``first_index .. first_index + n - 1`` (only hashes indices; reads nothing)."""
    if keep is None:
        return min(start, n), min(start, n)
    kept = 0
    for j in range(n):
        if kept == start:
            return j, kept
        kept += keep(first_index + j)
    return n, kept


def deal_row_groups(rows: list[int], world: int) -> list[list[int]]:
    """Row-group indices per rank, balanced by row count: longest-processing-time-first (Graham 1969,
    "Bounds on multiprocessing timing anomalies"): largest group first, each to the rank holding the fewest rows
    (ties: lowest rank), so ranks differ by at most one group's rows. Dealing ``i % w`` put every file's short last
    group on the same ranks when files have as many groups as a multiple of w: those ranks' shards were a fraction
    of the others' and, read at the same rate, wrapped epochs several times while other documents were never read."""
    heap = [(0, r) for r in range(world)]
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(rows)), key=lambda i: (-rows[i], i)):
        load, r = heapq.heappop(heap)
        out[r].append(i)
        heapq.heappush(heap, (load + rows[i], r))
    return [sorted(x) for x in out]


@functools.lru_cache(maxsize=4096)
def _parquet_row_groups(path: str, stat: tuple[int, ...], field: str) -> tuple[int, ...]:
    """Rows of each row group of one parquet file, from its footer, the text column checked
    (:func:`llmc.sources.check_text_column`). Read once per process while the file's ``stat`` (inode, size,
    mtime, ctime) stays the same: every sequence slot of a rank lists the same files, at every epoch and resume."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    check_text_column(pf.schema_arrow, field, Path(path))
    md = pf.metadata
    return tuple(md.row_group(g).num_rows for g in range(md.num_row_groups))


def _parquet_docs(src: SourceRef, rank: int, world: int, start: int, balanced: bool = True) -> Iterator[str]:
    import pyarrow.parquet as pq

    keep = _keeper(src)
    units = []  # (file, row_group, num_rows, index of its first row in the source)
    first = 0
    for f in files_of(src.path, SUFFIXES["parquet"]):
        st = f.stat()
        stat = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        for g, n in enumerate(_parquet_row_groups(str(f), stat, src.text_field)):
            units.append((f, g, n, first))
            first += n
    opened: dict[Path, pq.ParquetFile] = {}  # the file being read (units come file by file)

    def batches(f: Path, g: int) -> Iterator:
        if f not in opened:
            opened.clear()
            opened[f] = pq.ParquetFile(f)
        return opened[f].iter_batches(batch_size=256, row_groups=[g], columns=[src.text_field])

    def column(f: Path, g: int, first_row: int = 0) -> Iterator[tuple[int, str]]:
        """(row in the group, text) of the rows from ``first_row`` on; skipped batches are not converted."""
        seen = 0
        for batch in batches(f, g):
            m = batch.num_rows
            if seen + m > first_row:
                skip = max(0, first_row - seen)
                for j, v in enumerate(batch.column(0).slice(skip).to_pylist(), start=seen + skip):
                    yield j, doc_text(v, src.text_field, f)
            seen += m

    def picked(f: Path, g: int, rows: list[int]) -> Iterator[str]:
        """The texts of ``rows`` (ascending rows of the group): only those are converted to Python."""
        seen = k = 0
        for batch in batches(f, g):
            m = batch.num_rows
            take = []
            while k < len(rows) and rows[k] < seen + m:
                take.append(rows[k] - seen)
                k += 1
            if take:
                for v in batch.column(0).take(take).to_pylist():
                    yield doc_text(v, src.text_field, f)
            seen += m
            if k == len(rows):
                return

    if len(units) >= world:  # whole row groups per rank; skip by footer row counts
        mine = [units[i] for i in deal_row_groups([u[2] for u in units], world)[rank]] if balanced \
            else units[rank::world]
        for f, g, n, first in mine:
            skip, kept = _first_kept(keep, first, n, start)
            start -= kept
            if skip >= n:
                continue
            for j, text in column(f, g, skip):
                if keep is None or keep(first + j):
                    yield text
            start = 0
    else:  # fewer row groups than ranks: deal rows by their index in the source (row i -> rank i % world);
        # only this rank's rows are converted, and resume skips by row counts
        for f, g, n, first in units:
            rows = [i - first for i in range(first + (rank - first) % world, first + n, world)
                    if keep is None or keep(i)]
            if start >= len(rows):
                start -= len(rows)
                continue
            yield from picked(f, g, rows[start:])
            start = 0


#: bytes read from a JSONL file at a time (:func:`_jsonl_reads`); a line longer than this is read whole
JSONL_CHUNK = 1 << 20
_BOM = b"\xef\xbb\xbf"


class _Scratch(threading.local):
    """The per-thread buffer the jsonl reader reuses for the file's bytes (``read``). A fresh buffer per read
    cost more than the scan itself (the allocator maps and faults in new pages), and one per open reader would be held by every suspended reader (one per sequence slot)."""

    read: bytearray | None = None


_SCRATCH = _Scratch()


def _jsonl_reads(path: Path, chunk: int) -> Iterator[list[bytes | bytearray | memoryview]]:
    """A JSONL file's bytes, one read of ``chunk`` bytes at a time, as pieces of whole lines (a line longer
    than a read is read whole), as :func:`llmc.sources.open_jsonl` reads the file in text mode: a UTF-8 BOM at
    its start dropped, and universal newlines (``\\r\\n`` and a lone ``\\r`` end a line like ``\\n``,
    https://docs.python.org/3/library/io.html#io.TextIOWrapper) written as ``\\n``. A piece ends after a
    ``\\n``, or after a ``\\r`` known not to be followed by one; the file's last piece may lack a line end.
    A read's lines are views of this thread's read buffer (the line begun in the read before: a piece of its
    own), valid until the next read of any jsonl reader of the thread: a caller takes what it needs from a
    read's pieces before handing anything out."""
    size = max(chunk, len(_BOM))  # so the first read holds a whole BOM (readinto fills it unless at EOF)
    with open(path, "rb") as fh:
        carry: list[bytes] = []  # an unfinished line's bytes so far
        at_start = True
        while True:
            buf = _SCRATCH.read
            if buf is None or len(buf) != size:
                buf = _SCRATCH.read = bytearray(size)
            n = fh.readinto(buf)
            lo = 0
            if at_start:
                at_start = False
                # (a file of a BOM's first bytes only reads as empty too: utf-8-sig waits for the rest of it)
                if buf.startswith(_BOM, 0, n) or _BOM.startswith(buf[:n]):
                    lo = min(n, len(_BOM))
            if n == 0:
                break
            if lo == n:
                continue
            cut = buf.rfind(b"\n", lo, n) + 1 or buf.rfind(b"\r", lo, n - 1) + 1  # no \n: a lone \r ends one
            if not cut:
                carry.append(bytes(buf[lo:n]))
                continue
            pieces = []
            if carry:  # the unfinished line ends in this read
                end = buf.find(b"\n", lo, cut) + 1 or cut
                carry.append(bytes(buf[lo:end]))
                pieces.append(_universal_newlines(b"".join(carry)))
                lo = end
            if lo < cut:
                pieces.append(_universal_newlines(buf, lo, cut))
            carry = [bytes(buf[cut:n])] if cut < n else []
            yield pieces
        if carry:
            yield [_universal_newlines(b"".join(carry))]


def _universal_newlines(buf: bytes | bytearray, lo: int = 0, hi: int | None = None
                        ) -> bytes | bytearray | memoryview:
    """``buf[lo:hi]`` as a piece whose lines end at its ``\\n`` bytes, as text mode splits them: a view when every
    ``\\r`` in it is one of a ``\\r\\n`` (LF and CRLF files: a CRLF line keeps its ``\\r`` until it is decoded, and
    only a rank's own lines are, :func:`_line_text`), else a copy with ``\\r\\n`` and lone ``\\r`` written as ``\\n``
    (old Mac line ends). Rewriting every read of a CRLF file made each rank copy the whole corpus."""
    hi = len(buf) if hi is None else hi
    if buf.find(b"\r", lo, hi) < 0:  # (memchr)
        return memoryview(buf)[lo:hi]
    a = np.frombuffer(buf, np.uint8, hi - lo, lo)
    cr = np.flatnonzero(a == 13)
    if cr[-1] + 1 < len(a) and (a[cr + 1] == 10).all():  # (a piece that ends with a \r ends with a lone one)
        return memoryview(buf)[lo:hi]
    return buf[lo:hi].replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _line_text(piece: bytes | bytearray | memoryview, lo: int, hi: int) -> str:
    """Line ``piece[lo:hi]`` (its line end included) as text mode reads it: UTF-8 with undecodable bytes kept as
    surrogates, a ``\\r\\n`` end written as ``\\n``."""
    line = str(piece[lo:hi], "utf-8", "surrogateescape")
    return line.replace("\r\n", "\n") if "\r" in line else line


def _jsonl_own_lines(piece: bytes | bytearray | memoryview, rank: int, world: int, k: int, keep, skip: int
                     ) -> tuple[list[tuple[int, str]], int, int, int]:
    """This rank's lines of a piece of whole lines (:func:`_jsonl_reads`) whose first non-blank line is
    document ``k``: ``(own, k after the piece, lines in the piece, skipped)``. ``own``: ``(line in the piece,
    text as the text mode reads it, line end included)`` of the rank's lines that ``keep`` keeps, less the
    first ``skip`` of them (``skipped`` of them were skipped, not decoded). A line is blank iff
    ``line.strip()`` is empty, and one that starts with ``{`` (every JSON object line) is not: numpy finds the
    line ends and the lines that start with another byte; the rank's lines of a run of
    ``{`` lines are every ``world``-th, taken by index, and only the other lines are decoded and stripped one
    by one. So there is no Python work per line of the other ranks."""
    a = np.frombuffer(piece, np.uint8)
    ends = np.flatnonzero(a == 10)  # line i is piece[starts[i]:ends[i] + 1], its "\n" included
    if a[-1] != 10:
        ends = np.append(ends, len(a))  # the file's last line, without a line end
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    n_lines = len(ends)
    odd = np.flatnonzero(a[starts] != 0x7B).tolist()  # lines that do not start with "{": maybe blank
    own: list[tuple[int, str]] = []
    skipped = 0
    lo = 0  # first line of the run of "{" lines before the next odd one
    for o in [*odd, n_lines]:
        first = lo + (rank - k) % world  # the rank's first of lines lo .. o-1 (line j: document k + j - lo)
        if first < o:
            js = range(first, o, world)
            if keep is None and skipped + len(js) <= skip:
                skipped += len(js)
            else:
                bounds = zip(starts[first:o:world].tolist(), ends[first:o:world].tolist(), strict=True)
                for j, (s, e) in zip(js, bounds, strict=True):
                    if keep is None or keep(k + j - lo):
                        if skipped < skip:
                            skipped += 1
                        else:
                            own.append((j, _line_text(piece, s, e + 1)))
        k += o - lo
        if o < n_lines:
            line = _line_text(piece, starts[o], ends[o] + 1)
            if line.strip():
                if k % world == rank and (keep is None or keep(k)):
                    if skipped < skip:
                        skipped += 1
                    else:
                        own.append((o, line))
                k += 1
        lo = o + 1
    return own, k, n_lines, skipped


def _jsonl_docs(src: SourceRef, rank: int, world: int, start: int) -> Iterator[str]:
    """The ``k``-th non-blank line over the sorted files is document ``k``, rank ``k % world``'s. Every rank
    reads the whole corpus, :data:`JSONL_CHUNK` bytes at a time (:func:`_jsonl_reads`), and keeps and decodes
    only its own lines (:func:`_jsonl_own_lines`), which are then parsed (:func:`llmc.sources.jsonl_text`,
    located ``file:line``, 1-based, blank lines counted). Resume skips the first ``start`` undecoded."""
    keep = _keeper(src)
    k = 0  # index of the non-blank line over all files (the document's index in the source)
    for f in files_of(src.path, SUFFIXES["jsonl"]):
        lines_before = 0  # lines of the file before this read
        for pieces in _jsonl_reads(f, JSONL_CHUNK):
            own = []  # (line number, text), taken from the read before any document is handed out
            for piece in pieces:
                got, k, n_lines, skipped = _jsonl_own_lines(piece, rank, world, k, keep, start)
                start -= skipped
                own += [(lines_before + j + 1, line) for j, line in got]
                lines_before += n_lines
            # views of the read buffer, which the next read (of any reader) overwrites, or copies (a CRLF read, a
            # line longer than a read): emptied, not just dropped, as _jsonl_reads holds the same list while paused
            pieces.clear()
            piece = None
            for n, line in own:
                yield jsonl_text(line, src.text_field, f"{f}:{n}")


def _text_docs(src: SourceRef, rank: int, world: int, start: int) -> Iterator[str]:
    keep = _keeper(src)
    files = [f for i, f in enumerate(files_of(src.path, SUFFIXES["text"]))
             if i % world == rank and (keep is None or keep(i))]
    for f in files[start:]:
        yield read_text_file(f)


def _hf_saved(p: Path, field: str):
    """The ``save_to_disk`` dataset, its ``field`` checked to be a string column."""
    ds = hf_saved(p)
    check_text_column(ds.data.schema, field, p)
    return ds


def _hf_rows(n: int, rank: int, world: int) -> range:
    """The rows of an ``n``-row dataset that ``split_dataset_by_node(ds.to_iterable_dataset(num_shards), rank,
    world)`` yields, in order, with ``num_shards = world`` when ``n >= world`` (else 1), computed instead of built
    (building the ``world`` shards in every one of a rank's sequence slots cost O(world^2) ``Dataset.shard`` calls
    per rank, at every epoch and resume). ``Dataset.to_iterable_dataset`` makes shard ``i`` of ``world`` the
    contiguous block ``Dataset.shard(world, i, contiguous=True)`` (``div * i + min(i, mod)`` onwards, ``div + (i <
    mod)`` rows, ``div, mod = divmod(n, world)``); ``split_dataset_by_node`` gives a rank the shards ``rank::world``
    when they divide evenly (here: shard ``rank``), else every ``world``-th example from ``rank``
    (huggingface/datasets, ``arrow_dataset.py`` ``Dataset.shard`` and ``iterable_dataset.py``
    ``_split_by_node_iterable_dataset``)."""
    if n >= world:
        div, mod = divmod(n, world)
        lo = div * rank + min(rank, mod)
        return range(lo, lo + div + (rank < mod))
    return range(rank, n, world)


def _hf_split_docs(src: SourceRef, keep, rank: int, world: int, start: int, chunk: int = 256) -> Iterator[str]:
    """A ``save_to_disk`` dataset with a held-out split: row ``i`` is document ``i``; the kept rows are dealt
    to ranks in turn (as ``split_dataset_by_node`` deals examples when shards do not divide), read in
    ``chunk``-row Arrow slices of the text column, converting only this rank's rows to Python."""
    col = _hf_saved(Path(src.path), src.text_field).select_columns([src.text_field]).with_format("arrow")
    k = mine = 0  # kept rows so far; this rank's documents so far
    for first in range(0, len(col), chunk):
        n = min(chunk, len(col) - first)
        picks = []
        for j in range(n):
            if not keep(first + j):
                continue
            take = k % world == rank
            k += 1
            if take:
                mine += 1
                if mine > start:
                    picks.append(j)
        if picks:
            arr = col[first:first + n].column(0)
            for j in picks:
                yield doc_text(arr[j].as_py(), src.text_field, f"{src.path}:{first + j + 1}")


def _hf_docs(src: SourceRef, rank: int, world: int, start: int) -> Iterator[str]:
    p = Path(src.path)
    if not ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
        # a folder of parquet / jsonl files: read like those formats (same document order and indices)
        files = files_of(p, SUFFIXES["parquet"] + SUFFIXES["jsonl"])
        kinds = {f.suffix for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{p}: mixes {sorted(kinds)} files; use one format per source")
        fmt = "parquet" if files[0].suffix == ".parquet" else "jsonl"
        yield from _READERS[fmt](replace(src, format=fmt), rank, world, start)
        return
    keep = _keeper(src)
    if keep is not None:
        yield from _hf_split_docs(src, keep, rank, world, start)
        return
    # this rank's rows (as split_dataset_by_node deals them: _hf_rows) from `start` on, read in Arrow slices of the
    # text column: resume converts no skipped row
    col = _hf_saved(p, src.text_field).select_columns([src.text_field]).with_format("arrow")
    rows = _hf_rows(len(col), rank, world)[start:]
    for a in range(0, len(rows), 256):
        part = rows[a:a + 256]
        vals = col[part.start:part[-1] + 1].column(0).to_pylist()[::part.step]
        for v in vals:
            yield doc_text(v, src.text_field, src.path)


_READERS = {"parquet": _parquet_docs, "jsonl": _jsonl_docs, "text": _text_docs, "hf": _hf_docs}


class SourceFieldError(KeyError):
    """A record or table without the source's ``text_field`` (``llmc.sources`` raises it as a KeyError, which this
    still is), printed as written: ``str()`` of a KeyError is the repr of its argument, so the one located line a
    trainer prints (``error[R002] ...: {e}``) showed the message in quotes, its characters escaped."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def _plain_field_errors(docs: Iterator[str]) -> Iterator[str]:
    try:
        yield from docs
    except KeyError as e:
        if isinstance(e, SourceFieldError) or not (len(e.args) == 1 and "text_field" in str(e.args[0])):
            raise
        raise SourceFieldError(e.args[0]) from e


def documents(src: SourceRef, rank: int = 0, world: int = 1, start: int = 0, balanced: bool = True
              ) -> Iterator[str]:
    """This rank's documents of ``src`` in shard order, from position ``start`` (one epoch). ``balanced``: parquet
    row groups dealt by :func:`deal_row_groups` (False: ``i % world``, how a state without ``dealing`` was read).
    A missing text field or column is a :class:`SourceFieldError` naming the file (and line)."""
    if src.format not in _READERS:
        raise ValueError(f"data source {src.name!r}: format {src.format!r} is not streamable ({', '.join(FORMATS)})")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if src.format == "parquet" and not balanced:
        return _plain_field_errors(_parquet_docs(src, rank, world, start, balanced=False))
    return _plain_field_errors(_READERS[src.format](src, rank, world, start))


class _SourceStream:
    """One source's token stream for one rank: documents -> tokens + EOS -> windows, across epochs.

    A source with fewer documents than ranks (a few books as text files, a small curated JSONL, against a global
    batch of many sequences) leaves some ranks' shards empty: such a rank reads the whole source instead ("pooled"),
    from document ``rank mod n`` on and round again (``n``: the source's documents, counted then: fewer than the
    ranks), so the ranks that share it start at different documents; a rank whose shard has documents reads it as
    before (a stream that reads its shard costs no count)."""

    def __init__(self, src: SourceRef, tokenize: Callable[[str], list[int]], eos_id: int, seq_len: int,
                 rank: int, world: int):
        self.src, self.tokenize, self.eos_id, self.seq_len = src, tokenize, eos_id, seq_len
        self.rank, self.world = rank, world
        self.epoch, self.docs = 0, 0
        self.buffer: list[int] = []
        self._it: Iterator[str] | None = None
        self.balanced = True  # parquet row groups by deal_row_groups (False: restored from a state without it)
        self.pooled: int | None = None  # the whole source, from this document on (None: this rank's shard)
        self._last: int | None = None  # tokens + EOS of document `docs - 1` (None: not known, nothing read yet)
        self._held: dict | None = None  # a restored state's `held`, replayed at the next window
        self._adopt = False  # a version-1 buffer restored: find its document at the next window

    def _open(self) -> None:
        if self.pooled is None:
            self._it = documents(self.src, self.rank, self.world, self.docs, self.balanced)
            return
        # the whole source rotated to start at document `pooled`, from position `docs` of that order
        off, n = self.pooled, self._count
        order = itertools.chain(documents(self.src, 0, 1, off), itertools.islice(documents(self.src, 0, 1), off))
        self._it = itertools.islice(order, self.docs, n)

    @functools.cached_property
    def _count(self) -> int:
        """The source's documents (read only by a rank whose shard is empty: fewer than the ranks)."""
        return sum(1 for _ in documents(self.src, 0, 1))

    def _pool(self) -> None:
        """This rank's shard is empty: read the whole source from document rank mod n, or say it has none."""
        n = self._count
        if n == 0:
            raise ValueError(f"data source {self.src.name!r} ({self.src.path}) has no documents: nothing to train on")
        self.pooled, self._it = self.rank % n, None

    def _reread_last(self) -> list[int] | None:
        """Document ``docs - 1`` of the current epoch tokenised again, + EOS, read through a reader opened there
        (the same construction as :meth:`_open`, pooled rotation included), which then stands at ``docs`` as the
        uninterrupted run's did; None when the source no longer has that document."""
        self.docs -= 1
        try:
            self._open()
            doc = next(self._it, None)
        finally:
            self.docs += 1
        if doc is None:
            self._it = None
            return None
        return [*self.tokenize(doc), self.eos_id]

    def _changed(self, what: str) -> ValueError:
        return ValueError(
            f"data source {self.src.name!r} ({self.src.path}): its files changed since the checkpoint ({what}), so "
            "the run cannot continue where it stopped; restore the files as they were, or start the stage afresh "
            "(`llmc launch BUILD --no-resume` sets the earlier run aside)")

    def _replay(self) -> None:
        """Rebuild the buffer a version-2 state names (``held``: the module docstring's State) and check it."""
        skip, n, crc = (int(self._held[k]) for k in ("skip", "tokens", "crc32"))
        where = f"document {self.docs - 1} of the share that slot {self.rank} of {self.world} reads, epoch {self.epoch}"
        toks = self._reread_last()
        if toks is None:
            raise self._changed(f"{where}, is gone")
        if len(toks) != skip + n or _token_crc(toks[skip:]) != crc:
            raise self._changed(f"{where}, no longer gives the {n} tokens after its first {skip} that the checkpoint "
                                "held")
        self.buffer, self._last, self._held = toks[skip:], len(toks), None

    def _adopt_buffer(self) -> None:
        """A version-1 state's buffer (its tokens, used as they are): find it again as the suffix of document
        ``docs - 1``, so this run's states name it (``held``) instead of storing it; if that document no longer
        ends with it, the buffer goes on being stored as tokens until the next document is read."""
        self._adopt = False
        toks = self._reread_last()
        if toks is not None and len(toks) >= len(self.buffer) and toks[len(toks) - len(self.buffer):] == self.buffer:
            self._last = len(toks)

    def next_window(self) -> list[int]:
        if self._held is not None:
            self._replay()
        elif self._adopt:
            self._adopt_buffer()
        need = self.seq_len + 1
        fresh_epoch = self.docs == 0
        while len(self.buffer) < need:
            if self._it is None:
                self._open()
            doc = next(self._it, None)
            if doc is None:
                if fresh_epoch and self.docs == 0:
                    if self.pooled is not None:  # (the source emptied since it was counted)
                        raise ValueError(f"data source {self.src.name!r} ({self.src.path}) has no documents")
                    self._pool()
                    continue
                self.epoch, self.docs, self._it = self.epoch + 1, 0, None
                fresh_epoch = True
                continue
            toks = self.tokenize(doc)
            self.buffer.extend(toks)
            self.buffer.append(self.eos_id)  # EOS separates packed documents
            self.docs += 1
            self._last = len(toks) + 1
        window = self.buffer[:need]
        # stride seq_len: the last label is the next window's first input. A document was read only while the buffer
        # held <= seq_len tokens, so the tokens kept (>= 1) are a suffix of the last one: what `held` names
        del self.buffer[:self.seq_len]
        return window

    def state(self) -> dict:
        st = {"name": self.src.name, "epoch": self.epoch, "docs": self.docs,
              "dealing": "balanced" if self.balanced else "strided"}
        if self._held is not None:  # restored, not replayed yet: the same buffer
            st["held"] = dict(self._held)
        elif self.buffer and self._last is not None and len(self.buffer) <= self._last and self.docs > 0:
            st["held"] = {"skip": self._last - len(self.buffer), "tokens": len(self.buffer),
                          "crc32": _token_crc(self.buffer)}
        elif self.buffer:  # a version-1 buffer not found again in its document: kept as tokens
            st["buffer"] = list(self.buffer)
        if self.pooled is not None:
            st["pooled"] = self.pooled
        if files := dict(_files_when_first_read(str(self.src.path), self.src.format)):
            st["files"] = files
        return st

    def restore(self, st: dict) -> None:
        old = st.get("files")
        if isinstance(old, dict) and old.get("digest"):
            now = source_files(self.src)
            if now and now.get("digest") != old["digest"]:
                raise ValueError(
                    f"data source {self.src.name!r}: its files changed since the checkpoint ({old.get('n')} files, "
                    f"{old.get('bytes'):,} bytes -> {now['n']} files, {now['bytes']:,} bytes): the steps so far read "
                    "the old files, and the held-out split and the data position follow them; restore the files, or "
                    "start the stage over (llmc launch --no-resume)")
        self.epoch, self.docs = int(st["epoch"]), int(st["docs"])
        self.balanced = st.get("dealing", "strided") == "balanced"  # the shard `docs` counts in
        self.pooled = int(st["pooled"]) if st.get("pooled") is not None else None
        self._it = None  # re-opened lazily at `docs` (at `docs - 1` to replay a held document)
        self._last, self._held, self._adopt = None, None, False
        if "buffer" in st:  # version 1 (or a version-1 buffer carried on): the tokens themselves
            self.buffer = [int(t) for t in st["buffer"]]
            self._adopt = bool(self.buffer) and self.docs > 0
        else:
            self.buffer = []
            held = st.get("held")
            if held and int(held["tokens"]) > 0:
                if self.docs < 1:
                    raise ValueError(f"data source {self.src.name!r}: the checkpoint's data position is malformed "
                                     "(tokens held but no document read)")
                self._held = {k: int(held[k]) for k in ("skip", "tokens", "crc32")}


@functools.lru_cache(maxsize=1024)
def _files_when_first_read(path: str, fmt: str) -> tuple:
    """:func:`source_files` once per process (a checkpoint's state lists every source of every slot: a directory of
    thousands of shards is listed once, when the run first saves), as sorted items."""
    return tuple(sorted(source_files(SourceRef("", path, fmt)).items()))


def source_files(src: SourceRef) -> dict:
    """What a source's files are, for a checkpoint to hold (:meth:`SourceStream.state`): their count, total bytes
    and a digest of their names (relative to the source's path) and sizes, so a resume finds a file added, removed,
    grown or shrunk since (the data a run trained on then differs from what it would go on with). {} where the
    files cannot be listed (the stream's own reading then says why)."""
    import hashlib

    try:
        files = expand_paths(src.path, src.format)
        base = Path(src.path)
        root = base if base.is_dir() else base.parent
        sized = []
        for f in files:
            try:
                rel = f.relative_to(root).as_posix()
            except ValueError:
                rel = f.as_posix()
            sized.append((rel, f.stat().st_size))
    except (OSError, ValueError):
        return {}
    digest = hashlib.sha256("\n".join(f"{r}\t{s}" for r, s in sized).encode()).hexdigest()[:16]
    return {"n": len(sized), "bytes": sum(s for _, s in sized), "digest": digest}


def _token_crc(tokens: list[int]) -> int:
    """CRC-32 (zlib) of the tokens as little-endian int64 bytes: the check that a replayed document gives the
    tokens a checkpoint held."""
    return zlib.crc32(np.asarray(tokens, dtype="<i8").tobytes())


class StreamingMixture:
    """Endless iterable of ``seq_len + 1`` token windows for one rank; see the module docstring."""

    def __init__(self, sources: list[SourceRef], tokenize: Callable[[str], list[int]], eos_id: int, seq_len: int,
                 rank: int = 0, world: int = 1, seed: int = 0):
        if not sources:
            raise ValueError("need at least one data source")
        if len({s.name for s in sources}) != len(sources):
            raise ValueError("data source names must be unique")
        w = np.asarray([s.weight for s in sources], dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("source weights must be >= 0 and not all zero")
        if seq_len < 1 or not 0 <= rank < world:
            raise ValueError(f"bad seq_len={seq_len} or rank={rank} of world={world}")
        self.sources, self.seq_len, self.rank, self.world, self.seed = sources, seq_len, rank, world, seed
        self.probs = w / w.sum()
        self.streams = [_SourceStream(s, tokenize, eos_id, seq_len, rank, world) for s in sources]
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.samples = 0
        self.last_source: int | None = None

    def next_window(self) -> torch.Tensor:
        import torch

        i = int(self.rng.choice(len(self.streams), p=self.probs))
        window = self.streams[i].next_window()
        self.samples += 1
        self.last_source = i
        return torch.tensor(window, dtype=torch.int64)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_window()

    def next_batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, labels), each (micro_batch, seq_len) int64."""
        import torch

        arr = torch.stack([self.next_window() for _ in range(micro_batch)])
        return arr[:, :-1].contiguous(), arr[:, 1:].contiguous()

    def epochs(self) -> dict[str, int]:
        """Completed passes over this rank's shard, per source."""
        return {s.src.name: s.epoch for s in self.streams}

    def state_dict(self) -> dict:
        return {"version": 2, "seed": self.seed, "seq_len": self.seq_len, "rank": self.rank, "world": self.world,
                "samples": self.samples, "rng": self.rng.bit_generator.state,
                "sources": [s.state() for s in self.streams],
                # the mixture the draws so far followed (a checkpoint without it: written before llmc kept it)
                "weights": [float(s.weight) for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (version 1: buffers as tokens; version 2: as ``held`` references)."""
        if state.get("version", 1) not in (1, 2):
            raise ValueError(f"the checkpoint's data position has version {state.get('version')!r}, newer than this "
                             "llmc reads (1, 2); resume with the llmc version that wrote it")
        for key in ("seq_len", "world", "rank", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"{key} changed since the checkpoint ({state[key]} -> {getattr(self, key)}); "
                                 "the data position would not match")
        names = [s["name"] for s in state["sources"]]
        if names != [s.name for s in self.sources]:
            raise ValueError(f"data sources changed since the checkpoint: {names}")
        old = state.get("weights")
        if old is not None and [float(w) for w in old] != [float(s.weight) for s in self.sources]:
            # the steps so far drew the old mixture: continuing would train a mixture no record names
            changed = ", ".join(f"{s.name} {float(w):g} -> {float(s.weight):g}" for s, w in zip(self.sources, old,
                                                                                               strict=True)
                                if float(w) != float(s.weight))
            raise ValueError(f"mixture weights changed since the checkpoint ({changed}): the steps so far drew the "
                             "old mixture; start the stage over (llmc launch --no-resume), or keep the old weights "
                             "and train the new mixture as a stage of its own (init_from)")
        for stream, st in zip(self.streams, state["sources"], strict=True):
            stream.restore(st)
        self.rng.bit_generator.state = state["rng"]
        self.samples = int(state["samples"])
