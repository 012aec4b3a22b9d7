"""How many tokens each training text source holds, and how many times the run reads it (run by ``prepare``).

A spec declares the tokens to train on (``data.tokens``) and, optionally, each source's unique tokens
(``data.sources[].tokens``); the plan's epoch checks (D002, E001) trust those declarations, and the trainers
loop over a source that ends (:mod:`llmc.runtime.stream`: ``epoch += 1``) without a word. Here prepare measures
what the sources hold, after the quality pass and the held-out split, with the prepared tokenizer and the
packing the trainers use (each document's tokens, no BOS, plus one EOS: ``_SourceStream.next_window``):

* a source of at most :data:`EXACT_MAX_BYTES` of files is counted exactly: every document, read with
  :func:`llmc.runtime.stream.documents` in the source's own order, its held-out documents (the same
  :func:`llmc.runtime.validation.is_heldout` test the streams apply) counted apart from the training part;
* a larger one is estimated from a bounded sample spread over the whole source (corpora are often sorted, by
  length, date or domain, so its first documents would say little): :data:`SAMPLE_CHUNKS` windows at evenly
  spaced offsets (the midpoints of equal strata of the source's bytes, JSONL / text; of its rows, parquet and
  ``datasets`` folders), visited in bit-reversed order so that a sample cut short by :data:`SAMPLE_MAX_BYTES`
  is still spread over the whole source. Text: tokens per file byte in each window (a JSONL line or a file that
  overlaps a window counts for the share of its bytes inside it) times the total bytes; rows: tokens per row
  times the rows the footers / the dataset count. Error: the ratio estimator's standard error from the
  windows' residuals, by successive differences in source order (a systematic sample: :func:`ratio_estimate`),
  normal by the central limit theorem over the windows. The held-out part is a
  hash-chosen fraction ``f`` of the documents, independent of their text: the training part is expected to
  hold ``1 - f`` of the tokens.

The run draws ``tokens x weight / sum(weights)`` from each source of each LM stage's mixture
(:func:`drawn_tokens`; the stage's tokens as the lock records them, ``data.tokens`` for pre-training; the shares
as :func:`llmc.compiler.checks.mixture_shares` and the streams'): epochs = drawn / measured training tokens.
One line per source says what was measured and the epochs; a ``warning[R011]`` line (standard error, never a
failure) says when a source is read more than :data:`llmc.compiler.checks.MAX_EPOCHS` times, or when its declared
``tokens`` is off by more than :data:`DECLARED_FACTOR` beyond ``ERROR_SIGMAS`` standard errors of the measurement.
Figures go to ``assets/data_stats.json``; a source whose inputs (its files' key, the quality pass, the tokenizer,
the split, this module's settings) are unchanged is not measured again. No torch is imported.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from llmc.sources import SUFFIXES, expand_paths, is_hf_saved, jsonl_text

#: a source whose files hold at most this many bytes is counted exactly (every document tokenised)
EXACT_MAX_BYTES = 64 * 2**20
#: windows of a larger source's sample, and the bytes of each (JSONL / text) or rows (parquet / datasets)
SAMPLE_CHUNKS = 64
CHUNK_BYTES = 64 * 2**10
CHUNK_ROWS = 64
#: the sample stops after this many bytes read (at least MIN_SAMPLE_CHUNKS windows): a bound on prepare's time
SAMPLE_MAX_BYTES = 16 * 2**20
MIN_SAMPLE_CHUNKS = 8
#: a declared ``tokens`` this many times above or below the measurement (beyond its error) is warned about
DECLARED_FACTOR = 1.5
#: standard errors of an estimate allowed before the declared figure is compared (~95% two-sided, normal)
ERROR_SIGMAS = 2.0
STATS_FILE = "data_stats.json"
_BATCH = 256  # documents per encode_batch call


@dataclass
class Measurement:
    """What one source holds: ``documents`` / ``tokens`` of its training part (what the run reads; tokens with one
    EOS per document), ``source_documents`` / ``source_tokens`` of the whole source (held-out part included),
    ``exact`` or estimated with relative standard error ``rel_error`` (None: fewer than two windows), the files'
    ``bytes`` and count, and the sample's size (``samples`` windows, ``sample_bytes`` read; 0 when exact)."""

    documents: float
    tokens: float
    source_documents: float
    source_tokens: float
    exact: bool
    rel_error: float | None
    bytes: int
    files: int
    samples: int = 0
    sample_bytes: int = 0


def _format_of(src) -> str:
    """The format the source's files are read as (a folder of parquet / jsonl files given as ``hf``: that one)."""
    if src.format == "hf" and not is_hf_saved(src.path):
        kinds = {f.suffix for f in expand_paths(src.path, "hf")}
        return "parquet" if kinds <= set(SUFFIXES["parquet"]) else "jsonl"
    return src.format


def _kept_fraction(src) -> float:
    h = getattr(src, "holdout", None)
    if not h:
        return 1.0
    part, fraction, _ = h
    return fraction if part == "val" else 1.0 - fraction


def measure_source(src, tok, exact_max_bytes: int | None = None) -> Measurement:
    """Count (small) or estimate (large) the documents and tokens of ``src`` (a :class:`llmc.runtime.data.
    SourceData`, optionally with a held-out split) with ``tok`` (:class:`llmc.runtime.tokenizer.TextTokenizer`)."""
    files = expand_paths(src.path, src.format)
    nbytes = sum(f.stat().st_size for f in files)
    limit = EXACT_MAX_BYTES if exact_max_bytes is None else exact_max_bytes
    if nbytes <= limit:
        return _count_exact(src, tok, nbytes, len(files))
    fmt = _format_of(src)
    if fmt in ("jsonl", "text"):
        return _estimate_bytes(src, tok, fmt, files, nbytes)
    return _estimate_rows(src, tok, fmt, files, nbytes)


def _count_exact(src, tok, nbytes: int, nfiles: int) -> Measurement:
    """Every document of the source (rank 0 of 1: the whole source, in its own order, the index the held-out
    split hashes), tokenised in batches; the training part is the documents the run's streams keep."""
    from llmc.runtime.stream import documents

    h = getattr(src, "holdout", None)
    whole = replace(src, holdout=None) if h else src
    keep = None
    if h:
        from llmc.runtime.validation import is_heldout

        part, fraction, seed = h
        keep = lambda i: is_heldout(src.name, i, seed, fraction) == (part == "val")  # noqa: E731
    docs = tokens = kept_docs = kept_tokens = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal docs, tokens, kept_docs, kept_tokens
        for j, ids in enumerate(tok.encode_batch(buf)):
            n = len(ids) + 1  # + the EOS that separates packed documents
            tokens += n
            if keep is None or keep(docs + j):
                kept_docs, kept_tokens = kept_docs + 1, kept_tokens + n
        docs += len(buf)
        buf.clear()

    for doc in documents(whole):
        buf.append(doc)
        if len(buf) >= _BATCH:
            flush()
    if buf:
        flush()
    return Measurement(kept_docs, kept_tokens, docs, tokens, True, 0.0, nbytes, nfiles)


def sample_points(k: int) -> list[float]:
    """``k`` fractions of a source, the midpoints ``(j + 0.5) / k`` of ``k`` equal strata, in bit-reversed
    (van der Corput) order of ``j``: every prefix of the list is spread over the whole source."""
    bits = max(1, (k - 1).bit_length())
    order = sorted(range(2**bits), key=lambda j: int(f"{j:0{bits}b}"[::-1], 2))
    return [(j + 0.5) / k for j in order if j < k]


def ratio_estimate(t: list[float], b: list[float], at: list[float] | None = None) -> tuple[float, float]:
    """(R, relative standard error of R) for the ratio estimator ``R = sum(t) / sum(b)`` of ``k`` windows at
    positions ``at`` (fractions of the source; None: in the given order). The residuals ``d_i = t_i - R b_i``
    in source order give ``se(R)^2 = sum((d_(i+1) - d_i)^2) / (2 k (k - 1) mean(b)^2)``: the ratio estimator's
    variance (Cochran 1977, *Sampling Techniques*, ch. 6; no finite-population correction) with the
    successive-difference estimator of a systematic sample (Wolter 2007, *Introduction to Variance Estimation*,
    ch. 8), which leaves out a smooth trend along the source (a corpus sorted by length) that the random-sample
    formula would count as noise; normal by the central limit theorem over the windows. ``inf`` below 2 windows."""
    k, bt = len(t), sum(b)
    if k == 0 or bt <= 0:
        return 0.0, math.inf
    r = sum(t) / bt
    if k < 2 or r <= 0:
        return r, math.inf
    order = sorted(range(k), key=lambda i: at[i]) if at is not None else range(k)
    d = [t[i] - r * b[i] for i in order]
    v = sum((d[i + 1] - d[i]) ** 2 for i in range(k - 1)) / (2 * k * (k - 1))
    return r, math.sqrt(v) / (bt / k) / r


def _line_start(fh, pos: int) -> int:
    """The offset of the line holding byte ``pos`` (scanning back for the previous newline)."""
    start = pos
    while start > 0:
        step = min(start, 1 << 16)
        fh.seek(start - step)
        j = fh.read(step).rfind(b"\n")
        if j >= 0:
            return start - step + j + 1
        start -= step
    return 0


def _jsonl_window(f: Path, fh, lo: int, hi: int, field: str, tok) -> tuple[float, float, int]:
    """(tokens, documents, bytes read) of the bytes ``[lo, hi)`` of a JSONL file: each line overlapping them
    counts for the share of its bytes inside (its tokens + 1 EOS; a blank line counts nothing)."""
    pos = _line_start(fh, lo)
    fh.seek(pos)
    texts, weights, read = [], [], 0
    while pos < hi:
        raw = fh.readline()
        if not raw:
            break
        w = (min(pos + len(raw), hi) - max(pos, lo)) / len(raw)
        line = raw[3:] if pos == 0 and raw.startswith(b"\xef\xbb\xbf") else raw
        text = line.decode("utf-8", "surrogateescape")
        if text.strip():
            texts.append(jsonl_text(text, field, f"{f}: byte {pos}"))
            weights.append(w)
        pos += len(raw)
        read += len(raw)
    counts = [len(ids) + 1 for ids in tok.encode_batch(texts)] if texts else []
    return sum(w * c for w, c in zip(weights, counts, strict=True)), sum(weights), read


def _estimate_bytes(src, tok, fmt: str, files: list[Path], nbytes: int) -> Measurement:
    """Tokens per file byte on windows at evenly spaced offsets of the source's bytes (files in order), times
    the bytes. ``text``: a window's text is tokenised as it stands (characters cut at its edges dropped), and
    each file's EOS counts for the share of the file inside; the documents are the files."""
    sizes = [f.stat().st_size for f in files]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    t, b, d, at, read = [], [], [], [], 0
    for u in sample_points(SAMPLE_CHUNKS):
        if len(t) >= MIN_SAMPLE_CHUNKS and read >= SAMPLE_MAX_BYTES:
            break
        g = u * nbytes
        i = bisect.bisect_right(starts, g) - 1
        while sizes[i] == 0:  # (an empty file holds no offset: the one before it ends at g)
            i -= 1
        size = sizes[i]
        lo = min(max(0, int(g - starts[i]) - CHUNK_BYTES // 2), max(0, size - CHUNK_BYTES))
        hi = min(size, lo + CHUNK_BYTES)
        with open(files[i], "rb") as fh:
            if fmt == "jsonl":
                tk, dk, rk = _jsonl_window(files[i], fh, lo, hi, src.text_field, tok)
            else:
                fh.seek(lo)
                raw = fh.read(hi - lo)
                if lo == 0 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                dk = (hi - lo) / size
                tk, rk = len(tok.encode(raw.decode("utf-8", "ignore"))) + dk, hi - lo
        t.append(tk)
        b.append(hi - lo)
        d.append(dk)
        at.append(u)
        read += rk
    r, rel = ratio_estimate(t, b, at)
    rel = rel if math.isfinite(rel) else None
    keep = _kept_fraction(src)
    docs = float(len(files)) if fmt == "text" else sum(d) / sum(b) * nbytes
    tokens = r * nbytes
    return Measurement(docs * keep, tokens * keep, docs, tokens, False, rel, nbytes, len(files), len(t), read)


def _estimate_rows(src, tok, fmt: str, files: list[Path], nbytes: int) -> Measurement:
    """Tokens per row on blocks of :data:`CHUNK_ROWS` rows at evenly spaced rows of the source (parquet: the
    footers' row counts, files in order; a ``datasets`` folder: its rows), times the rows."""
    from llmc.sources import doc_text

    if fmt == "parquet":
        import pyarrow.parquet as pq

        groups, firsts = [], []  # (file, row group, its first row in the source), of the row groups with rows
        n = 0
        for f in files:
            md = pq.ParquetFile(f).metadata
            for g in range(md.num_row_groups):
                if md.row_group(g).num_rows:
                    groups.append((f, g, n))
                    firsts.append(n)
                    n += md.row_group(g).num_rows

        def rows(first: int, count: int) -> list:
            f, g, s = groups[bisect.bisect_right(firsts, first) - 1]
            local, out, seen = first - s, [], 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK_ROWS, row_groups=[g],
                                                        columns=[src.text_field]):
                if seen + batch.num_rows > local:
                    out += batch.column(0).slice(max(0, local - seen)).to_pylist()
                    if len(out) >= count:
                        break
                seen += batch.num_rows
            return out[:count]
    else:
        from llmc.sources import hf_saved

        col = hf_saved(src.path).select_columns([src.text_field]).with_format("arrow")
        n = len(col)

        def rows(first: int, count: int) -> list:
            return col[first:first + count].column(0).to_pylist()

    t, b, at, read = [], [], [], 0
    for u in sample_points(SAMPLE_CHUNKS):
        if len(t) >= MIN_SAMPLE_CHUNKS and read >= SAMPLE_MAX_BYTES or n == 0:
            break
        first = min(max(0, int(u * n) - CHUNK_ROWS // 2), max(0, n - CHUNK_ROWS))
        texts = [doc_text(v, src.text_field, f"{src.path}: row {first + j + 1}")
                 for j, v in enumerate(rows(first, min(CHUNK_ROWS, n - first)))]
        t.append(sum(len(ids) + 1 for ids in tok.encode_batch(texts)) if texts else 0)
        b.append(len(texts))
        at.append(u)
        read += sum(len(x.encode("utf-8", "surrogatepass")) for x in texts)
    r, rel = ratio_estimate(t, b, at)
    rel = rel if math.isfinite(rel) else None
    keep = _kept_fraction(src)
    return Measurement(n * keep, r * n * keep, float(n), r * n, False, rel, nbytes, len(files), len(t), read)


# ----------------------------------------------------------------------------- the run's draw, and the report


def drawn_tokens(job) -> dict[str, float]:
    """Tokens the run draws from each source: for every LM stage of the lock (pre-training, midtraining, long
    context), the stage's tokens (the lock's stage ``tokens``: ``data.tokens`` for pre-training, or what pinned
    steps consume) times the source's share of the stage's mixture (its ``data``, else the top-level one),
    ``weight / sum(weights)`` (:func:`llmc.compiler.checks.mixture_shares`, the plan's and the streams' share);
    summed over the stages. A job without a lock: ``data.tokens`` of the top-level mixture."""
    from llmc.compiler.checks import mixture_shares
    from llmc.spec.schema import LM_KINDS

    spec = job.spec
    if spec is None:
        return {}
    stages = {st.name: st for st in spec.stages}
    mixes = []
    entries = [e for e in (job.lock or {}).get("stages") or [] if isinstance(e, dict) and e.get("kind") in LM_KINDS]
    for e in entries:
        st = stages.get(e.get("name"))
        data = st.data if st is not None and st.data is not None else spec.data
        if e.get("tokens"):
            mixes.append((data.sources, float(e["tokens"])))
    if job.lock is None:
        mixes.append((spec.data.sources, float(spec.data.tokens)))
    out: dict[str, float] = {}
    for sources, tokens in mixes:
        if sources:
            for s, share in zip(sources, mixture_shares(sources), strict=True):
                out[s.name] = out.get(s.name, 0.0) + tokens * share
    return out


def _num(x: float) -> str:
    """1234567 -> '1.23M' (3 significant digits; K, M, B, T)."""
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if float(f"{abs(x):.3g}") >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _bytes(n: float) -> str:
    for suffix, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n:.0f} B"


def judge(name: str, m: dict, declared: float | None, drawn: float | None) -> tuple[str, list[str]]:
    """(the source's line, its warnings) for measurement ``m`` (:class:`Measurement` as a dict): epochs over
    :data:`llmc.compiler.checks.MAX_EPOCHS` (the plan's E001 / D002 threshold); a declared ``tokens`` outside
    ``[measured (1 - z e) / DECLARED_FACTOR, measured (1 + z e) x DECLARED_FACTOR]`` (``e``: the relative error,
    ``z``: :data:`ERROR_SIGMAS`), compared with the whole source (the declaration counts the held-out part too)."""
    from llmc.compiler.checks import MAX_EPOCHS

    if m["exact"]:
        what = f"{_num(m['tokens'])} tokens in {m['documents']:,.0f} documents (counted)"
    else:
        err = "unknown" if m["rel_error"] is None else f"{100 * m['rel_error']:.2g}%"
        what = (f"~{_num(m['tokens'])} tokens +- {err} in ~{_num(m['documents'])} documents (estimated from "
                f"{m['samples']} windows, {_bytes(m['sample_bytes'])} read)")
    parts = [f"prepare: data {name}: {what}, {_bytes(m['bytes'])} in {m['files']} file(s)"]
    if m["source_tokens"] != m["tokens"]:
        parts.append(f"the training part of {_num(m['source_tokens'])} (the rest is for validation)")
    warns = []
    if declared is not None:
        parts.append(f"declared {_num(declared)}")
        z = None if m["rel_error"] is None else ERROR_SIGMAS * m["rel_error"]
        whole = m["source_tokens"]
        if z is not None and whole > 0 and (declared > whole * (1 + z) * DECLARED_FACTOR
                                               or declared < whole * (1 - z) / DECLARED_FACTOR):
            warns.append(f"data source {name!r} declares {_num(declared)} tokens, but holds "
                         f"{'' if m['exact'] else '~'}{_num(whole)} ({declared / whole:.2g}x the measurement) "
                         f"(hint: set data.sources[].tokens to the measured figure, so the plan's epoch checks "
                         f"count what the source holds)")
    if drawn is not None and m["tokens"] > 0:
        epochs = drawn / m["tokens"]
        parts.append(f"the run draws {_num(drawn)} = {epochs:.2f} epochs")
        if epochs > MAX_EPOCHS:
            warns.append(f"data source {name!r}: the run reads it {epochs:.1f} times ({_num(drawn)} tokens drawn of "
                         f"{'' if m['exact'] else '~'}{_num(m['tokens'])} measured) (hint: beyond ~{MAX_EPOCHS:.0f} "
                         f"epochs repeated data loses value (Muennighoff et al. 2023, arXiv:2305.16264); add data, "
                         f"lower its weight or train on fewer tokens)")
    elif drawn is not None:
        warns.append(f"data source {name!r} holds no tokens, but the run draws {_num(drawn)} from it (hint: check "
                     f"its path, text_field and what the quality pass removed)")
    return "; ".join(parts), warns


def measurement_key(name: str, inputs: str, src) -> str:
    """What a source's measurement depends on: ``inputs`` (prepare's keys of its files, the quality pass and the
    tokenizer), where and how it is read, its held-out split, and this module's settings."""
    settings = (EXACT_MAX_BYTES, SAMPLE_CHUNKS, CHUNK_BYTES, CHUNK_ROWS, SAMPLE_MAX_BYTES, MIN_SAMPLE_CHUNKS, 1)
    text = f"{name}|{inputs}|{src.path}|{src.format}|{src.text_field}|{getattr(src, 'holdout', None)}|{settings}"
    return hashlib.sha256(text.encode()).hexdigest()


def data_stats(job, assets, keys: dict[str, str], state: dict, log=print, warn=None) -> dict:
    """Measure (or reuse) every source of ``assets`` named in ``keys`` (name -> key of its inputs, see
    :func:`measurement_key`), compare with the run (:func:`drawn_tokens`, the spec's declared ``tokens``), write
    ``assets/data_stats.json`` and return it. ``state`` (prepare's ``assets/prepare.json``) records each source's
    key under ``data_stats:<name>``. Never raises for a source it cannot read: a warning line instead (the
    trainers report the source's error where they read it)."""
    from llmc.runtime.tokenizer import TextTokenizer

    asset_dir = Path(assets.tokenizer_dir)
    out_file = asset_dir / STATS_FILE
    warn = warn or (lambda msg: print(f"{out_file}: warning[R011] {msg}", file=sys.stderr, flush=True))
    try:
        prev = {s["name"]: s for s in json.loads(out_file.read_text())["sources"]}
    except (OSError, ValueError, KeyError, TypeError):
        prev = {}
    declared: dict[str, float] = {}
    spec_sources = list(job.sources) + (list(job.spec.data.sources) if job.spec is not None else [])
    for st in job.spec.stages if job.spec is not None else []:
        spec_sources += list(st.data.sources) if st.data is not None else []
    for s in spec_sources:
        if s.tokens is not None:
            declared.setdefault(s.name, float(s.tokens))
    drawn = drawn_tokens(job)
    tok = None
    rows, changed = [], False
    for src in assets.sources:
        if src.name not in keys:
            continue
        key = measurement_key(src.name, keys[src.name], src)
        old = prev.get(src.name)
        if state.get(f"data_stats:{src.name}") == key and old is not None and old.get("key") == key:
            m = {k: old[k] for k in Measurement.__dataclass_fields__}
        else:
            try:
                tok = tok or TextTokenizer(asset_dir)
                m = asdict(measure_source(src, tok))
            except Exception as e:  # noqa: BLE001 (a measurement never fails the launch)
                warn(f"data source {src.name!r}: could not measure it: {type(e).__name__}: {e} (hint: the trainers "
                     f"read it the same way and will stop on the same error)")
                state.pop(f"data_stats:{src.name}", None)
                continue
            state[f"data_stats:{src.name}"] = key
        d = drawn.get(src.name)
        row = {"name": src.name, "path": src.path, "format": src.format, **m, "declared": declared.get(src.name),
               "drawn": d, "epochs": d / m["tokens"] if d is not None and m["tokens"] > 0 else None, "key": key}
        line, warns = judge(src.name, m, declared.get(src.name), d)
        row["warnings"] = warns
        if row != old:
            changed = True
            log(line)
        for w in warns:
            warn(w)
        rows.append(row)
    report = {"version": 1, "sources": rows}
    if changed or len(rows) != len(prev) or not out_file.exists():
        tmp = out_file.with_name(out_file.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out_file)
    else:
        log(f"prepare: data statistics unchanged ({len(rows)} source(s), {out_file})")
    return report


__all__ = ["CHUNK_BYTES", "CHUNK_ROWS", "DECLARED_FACTOR", "ERROR_SIGMAS", "EXACT_MAX_BYTES",
           "MIN_SAMPLE_CHUNKS", "Measurement", "SAMPLE_CHUNKS", "SAMPLE_MAX_BYTES", "STATS_FILE", "data_stats",
           "drawn_tokens", "judge", "measure_source", "measurement_key", "ratio_estimate", "sample_points"]
