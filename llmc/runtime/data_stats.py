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
The same pass records the documents' lengths in tokens (:class:`LengthHistogram`: bounded bins, exact counts
when the source is counted, the sample's documents when estimated). A stage that trains at a ``seq_len`` above the
context its model was trained at before it (a long_context stage, or continued training past the stage it starts
from: :func:`previous_context`) gets a ``warning[R012]`` line when fewer than :data:`LONG_DOC_MIN_SHARE` of its
tokens lie in documents longer than half its seq_len (:func:`context_checks`): on torchtitan positions restart at
every document, so a position past the longest document is never trained; llmc's trainer and DeepSpeed pack
unrelated documents into each sequence without a mask. Its figures are the file's ``stages``.
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
#: bins per octave of the document-length histogram (above :data:`EXACT_LENGTHS` tokens): lengths ``n`` in
#: ``(lo, hi]`` with ``lo = 2^k (1 + j / LENGTH_BINS_PER_OCTAVE)``, so "longer than" a power of two or of
#: ``2^k (1 + j / 16)`` (1,024; 1,536; 65,536; ...) is counted exactly, any other length to within one bin
#: (``2^k / 16`` wide for lengths from ``2^k``: at most 6.25% of the length); at most 16 bins per octave, whatever
#: the corpus' size
LENGTH_BINS_PER_OCTAVE = 16
EXACT_LENGTHS = 2 * LENGTH_BINS_PER_OCTAVE  # lengths up to this many tokens have a bin of their own
#: a stage that trains past the context its model was trained at (a long_context stage, or continued training at a
#: longer seq_len) is warned about (R012) when fewer than this share of its tokens lie in documents longer than half
#: its seq_len. A floor set low, a factor 3-6 under what published context extensions train on: Fu et al. 2024
#: ("Data Engineering for Scaling Language Models to 128K Context", arXiv:2402.10171, Fig. 2) start from a mixture
#: (SlimPajama) of which ~30% is longer than the base model's 4K context and upsample long documents per source
#: further (cutting documents at 4K breaks the long-range dependencies the stage is for); ProLong (Gao et al. 2024,
#: "How to Train Long-Context Language Models (Effectively)", arXiv:2410.02660) trains on ~60% long data (books,
#: code repositories) and ~40% short. A heuristic floor, not a measured optimum: below it most of the stage's
#: long sequences are short documents side by side.
LONG_DOC_MIN_SHARE = 0.10


class LengthHistogram:
    """The lengths of a source's documents in tokens (each document's tokens + its EOS, the span it takes in a
    packed sequence; on torchtitan BOS + text, as many positions), in bounded memory: documents and tokens per
    length bin (one bin per length up to :data:`EXACT_LENGTHS`, then :data:`LENGTH_BINS_PER_OCTAVE` per
    octave), and the longest length seen. Weights: an estimate adds a sampled document with the share of it its
    window holds (:func:`_jsonl_window`), as the token estimate counts it."""

    def __init__(self) -> None:
        self.bins: dict[int, list[float]] = {}  # lo -> [hi, documents, tokens]: lengths n with lo < n <= hi
        self.longest = 0

    @staticmethod
    def bin_of(n: int) -> tuple[int, int]:
        """(lo, hi): the bin holding length ``n`` (lo < n <= hi)."""
        if n <= EXACT_LENGTHS:
            return n - 1, n
        m = n - 1
        k = m.bit_length() - 1
        step = (1 << k) // LENGTH_BINS_PER_OCTAVE
        lo = (1 << k) + (m - (1 << k)) // step * step
        return lo, lo + step

    def add(self, n: int, weight: float = 1) -> None:
        if n <= 0 or weight <= 0:
            return
        lo, hi = self.bin_of(n)
        b = self.bins.setdefault(lo, [hi, 0, 0])
        b[1] += weight
        b[2] += weight * n
        self.longest = max(self.longest, n)

    def share_above(self, length: float) -> float:
        """The share of the tokens in documents longer than ``length`` tokens; a bin that ``length`` cuts counts
        for the share of its lengths above it (0 without documents)."""
        total = above = 0.0
        for lo, (hi, _, t) in self.bins.items():
            total += t
            if lo >= length:
                above += t
            elif hi > length:
                above += t * (hi - length) / (hi - lo)
        return above / total if total > 0 else 0.0

    def to_json(self, sampled: bool = False) -> dict:
        return {"longest": self.longest, "sampled": sampled, "bins_per_octave": LENGTH_BINS_PER_OCTAVE,
                "bins": [[lo, hi, d, t] for lo, (hi, d, t) in sorted(self.bins.items())]}

    @classmethod
    def from_json(cls, data: dict | None) -> LengthHistogram | None:
        if not isinstance(data, dict) or not isinstance(data.get("bins"), list):
            return None
        h = cls()
        h.bins = {int(lo): [int(hi), d, t] for lo, hi, d, t in data["bins"]}
        h.longest = int(data.get("longest") or 0)
        return h


@dataclass
class Measurement:
    """What one source holds: ``documents`` / ``tokens`` of its training part (what the run reads; tokens with one
    EOS per document), ``source_documents`` / ``source_tokens`` of the whole source (held-out part included),
    ``exact`` or estimated with relative standard error ``rel_error`` (None: fewer than two windows), the files'
    ``bytes`` and count, the sample's size (``samples`` windows, ``sample_bytes`` read; 0 when exact), and the
    distribution of the documents' lengths in tokens (``lengths``: :class:`LengthHistogram`, of the training part
    when exact, of the sample when estimated)."""

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
    lengths: dict | None = None  # the documents' lengths in tokens: LengthHistogram.to_json()


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
    lengths = LengthHistogram()  # of the training part

    def flush() -> None:
        nonlocal docs, tokens, kept_docs, kept_tokens
        for j, ids in enumerate(tok.encode_batch(buf)):
            n = len(ids) + 1  # + the EOS that separates packed documents
            tokens += n
            if keep is None or keep(docs + j):
                kept_docs, kept_tokens = kept_docs + 1, kept_tokens + n
                lengths.add(n)
        docs += len(buf)
        buf.clear()

    for doc in documents(whole):
        buf.append(doc)
        if len(buf) >= _BATCH:
            flush()
    if buf:
        flush()
    return Measurement(kept_docs, kept_tokens, docs, tokens, True, 0.0, nbytes, nfiles,
                       lengths=lengths.to_json())


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


def _jsonl_window(f: Path, fh, lo: int, hi: int, field: str, tok,
                  lengths: LengthHistogram | None = None) -> tuple[float, float, int]:
    """(tokens, documents, bytes read) of the bytes ``[lo, hi)`` of a JSONL file: each line overlapping them
    counts for the share of its bytes inside (its tokens + 1 EOS; a blank line counts nothing), and is added to
    ``lengths`` (its whole length, with that share as its weight)."""
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
    if lengths is not None:
        for w, c in zip(weights, counts, strict=True):
            lengths.add(c, w)
    return sum(w * c for w, c in zip(weights, counts, strict=True)), sum(weights), read


def _estimate_bytes(src, tok, fmt: str, files: list[Path], nbytes: int) -> Measurement:
    """Tokens per file byte on windows at evenly spaced offsets of the source's bytes (files in order), times
    the bytes. ``text``: a window's text is tokenised as it stands (characters cut at its edges dropped), and
    each file's EOS counts for the share of the file inside; the documents are the files. Lengths: JSONL, the
    sampled lines (:func:`_jsonl_window`); text, every file's bytes times the tokens per byte, + 1 EOS."""
    sizes = [f.stat().st_size for f in files]
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    t, b, d, at, read = [], [], [], [], 0
    lengths = LengthHistogram()
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
                tk, dk, rk = _jsonl_window(files[i], fh, lo, hi, src.text_field, tok, lengths)
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
    if fmt == "text":  # (a file is a document: its length, from its bytes at the measured tokens per byte)
        for size in sizes:
            lengths.add(round(r * size) + 1 if size else 0)
    return Measurement(docs * keep, tokens * keep, docs, tokens, False, rel, nbytes, len(files), len(t), read,
                       lengths=lengths.to_json(sampled=True))


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
    lengths = LengthHistogram()  # of the sampled rows
    for u in sample_points(SAMPLE_CHUNKS):
        if len(t) >= MIN_SAMPLE_CHUNKS and read >= SAMPLE_MAX_BYTES or n == 0:
            break
        first = min(max(0, int(u * n) - CHUNK_ROWS // 2), max(0, n - CHUNK_ROWS))
        texts = [doc_text(v, src.text_field, f"{src.path}: row {first + j + 1}")
                 for j, v in enumerate(rows(first, min(CHUNK_ROWS, n - first)))]
        counts = [len(ids) + 1 for ids in tok.encode_batch(texts)] if texts else []
        for c in counts:
            lengths.add(c)
        t.append(sum(counts))
        b.append(len(texts))
        at.append(u)
        read += sum(len(x.encode("utf-8", "surrogatepass")) for x in texts)
    r, rel = ratio_estimate(t, b, at)
    rel = rel if math.isfinite(rel) else None
    keep = _kept_fraction(src)
    return Measurement(n * keep, r * n * keep, float(n), r * n, False, rel, nbytes, len(files), len(t), read,
                       lengths=lengths.to_json(sampled=True))


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
    lengths = m.get("lengths") or {}
    if lengths.get("longest"):
        parts.append(f"the longest {'sampled ' if lengths.get('sampled') else ''}document {lengths['longest']:,} "
                     f"tokens")
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


def previous_context(entry: dict, by_name: dict[str, dict]) -> int | None:
    """The context the model was trained at before a continued LM stage of the lock: a long_context stage's
    ``long_context.old_seq_len`` (the context it extends, YaRN's ``original_max_position``); another stage's, the
    ``seq_len`` of the stage it starts from (``init_from``), else the context it inherits (``context.max_context``,
    a Hugging Face start's). None for pre-training (no context before it)."""
    from llmc.spec.schema import CONTINUED_KINDS

    if entry.get("kind") not in CONTINUED_KINDS:
        return None
    old = (entry.get("long_context") or {}).get("old_seq_len")
    if old:
        return int(old)
    up = by_name.get(entry.get("init_from") or "")
    if up is not None and up.get("seq_len"):
        return int(up["seq_len"])
    ctx = (entry.get("context") or {}).get("max_context")
    return int(ctx) if ctx else None


def stage_backend(lock: dict, entry: dict) -> str:
    """The backend that runs the stage under the plan's backend (``lock["backend"]["name"]``, what ``llmc launch``
    runs by default; ``--backend`` can pick another): a torchtitan job for the kinds it trains and a stage with its
    own searched ``layout`` (:func:`llmc.launch.launch_commands`), DeepSpeed for its kinds, else llmc's trainer."""
    from llmc.runtime.capabilities import DS_STAGE_KINDS, TITAN_STAGE_KINDS

    planned = (lock.get("backend") or {}).get("name") if isinstance(lock.get("backend"), dict) else None
    if planned == "torchtitan" and (entry.get("kind") in TITAN_STAGE_KINDS or entry.get("layout")):
        return "torchtitan"
    if planned == "deepspeed" and entry.get("kind") in DS_STAGE_KINDS:
        return "deepspeed"
    return "native"


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%" if x < 0.1 else f"{100 * x:.0f}%"


def context_checks(job, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(figures, warnings) for every stage of the lock that trains at a ``seq_len`` above the context its model was
    trained at before it (:func:`previous_context`): from the measured lengths of the stage's sources
    (``rows``: :func:`data_stats`'s, with ``lengths``), each weighted by its share of the stage's mixture
    (:func:`llmc.compiler.checks.mixture_shares`): the longest document, the shares of the stage's tokens in
    documents longer than the previous context and than half the seq_len, and the documents a packed sequence holds
    on average (``seq_len x`` documents per token). A warning where the share above half the seq_len is under
    :data:`LONG_DOC_MIN_SHARE`, saying what that means on the stage's backend (:func:`stage_backend`)."""
    from llmc.compiler.checks import mixture_shares

    spec, lock = job.spec, job.lock or {}
    if spec is None:
        return [], []
    entries = [e for e in lock.get("stages") or [] if isinstance(e, dict)]
    by_name = {e.get("name"): e for e in entries}
    stages = {st.name: st for st in spec.stages}
    measured = {r["name"]: r for r in rows}
    out, warns = [], []
    for e in entries:
        prev, seq_len = previous_context(e, by_name), e.get("seq_len")
        if not prev or not seq_len or int(seq_len) <= prev:
            continue
        seq_len = int(seq_len)
        st = stages.get(e.get("name"))
        sources = (st.data if st is not None and st.data is not None else spec.data).sources
        parts = []  # (share, histogram, documents per token) of the measured sources
        for s, share in zip(sources, mixture_shares(sources), strict=True) if sources else ():
            r = measured.get(s.name)
            h = LengthHistogram.from_json(r.get("lengths")) if r is not None else None
            if h is not None and h.bins and r["tokens"] > 0 and share > 0:
                parts.append((share, h, r["documents"] / r["tokens"], bool(r["lengths"].get("sampled"))))
        if not parts:
            continue
        norm = sum(p[0] for p in parts)
        half = seq_len / 2
        fig = {"name": e["name"], "kind": e.get("kind"), "seq_len": seq_len, "previous_context": prev,
               "backend": stage_backend(lock, e), "sources": [s.name for s in sources if s.name in measured],
               "sampled": any(p[3] for p in parts), "longest": max(p[1].longest for p in parts),
               "share_above_previous": sum(p[0] * p[1].share_above(prev) for p in parts) / norm,
               "share_above_half_seq_len": sum(p[0] * p[1].share_above(half) for p in parts) / norm,
               "documents_per_sequence": seq_len * sum(p[0] * p[2] for p in parts) / norm,
               "min_share": LONG_DOC_MIN_SHARE, "warning": None}
        if fig["share_above_half_seq_len"] < LONG_DOC_MIN_SHARE:
            fig["warning"] = _short_documents(fig)
            warns.append(fig["warning"])
        out.append(fig)
    return out, warns


def _short_documents(f: dict) -> str:
    """The R012 line of a stage's figures (:func:`context_checks`)."""
    seq_len, prev, half, longest = f["seq_len"], f["previous_context"], f["seq_len"] // 2, f["longest"]
    est = "~" if f["sampled"] else ""
    longest_s = f"{'the longest sampled' if f['sampled'] else 'the longest'} holds {longest:,} tokens"
    if f["backend"] == "torchtitan":
        means = ("on torchtitan positions restart at every document (block-causal attention), so "
                 + (f"no position above {longest:,} is ever trained, though its export declares {seq_len:,}"
                    if longest < seq_len else f"positions above {half:,} are trained on {est}"
                    f"{_pct(f['share_above_half_seq_len'])} of its tokens"))
    else:
        means = (f"on {f['backend']} each {seq_len:,}-token sequence is packed from ~{f['documents_per_sequence']:,.0f} "
                 f"unrelated documents, attention unmasked across them, so its long positions attend mostly to "
                 f"other documents")
    return (f"stage {f['name']!r} trains at seq_len {seq_len:,}, past the {prev:,}-token context before it, but its "
            f"documents are much shorter: {longest_s}, {est}{_pct(f['share_above_previous'])} of its tokens lie in "
            f"documents longer than {prev:,} and {est}{_pct(f['share_above_half_seq_len'])} in documents longer "
            f"than {half:,} (half the seq_len; under {_pct(f['min_share'])}); {means} (hint: add genuinely long "
            f"documents (books, code repositories, long papers) and upsample them per source, keeping the domain "
            f"mix (Fu et al. 2024, arXiv:2402.10171), until at least {_pct(f['min_share'])} of the stage's tokens "
            f"lie in documents longer than {half:,})")


def measurement_key(name: str, inputs: str, src) -> str:
    """What a source's measurement depends on: ``inputs`` (prepare's keys of its files, the quality pass and the
    tokenizer), where and how it is read, its held-out split, and this module's settings."""
    settings = (EXACT_MAX_BYTES, SAMPLE_CHUNKS, CHUNK_BYTES, CHUNK_ROWS, SAMPLE_MAX_BYTES, MIN_SAMPLE_CHUNKS,
                LENGTH_BINS_PER_OCTAVE, 2)  # (2: the measurement holds the documents' lengths)
    text = f"{name}|{inputs}|{src.path}|{src.format}|{src.text_field}|{getattr(src, 'holdout', None)}|{settings}"
    return hashlib.sha256(text.encode()).hexdigest()


def data_stats(job, assets, keys: dict[str, str], state: dict, log=print, warn=None, context_warn=None) -> dict:
    """Measure (or reuse) every source of ``assets`` named in ``keys`` (name -> key of its inputs, see
    :func:`measurement_key`), compare with the run (:func:`drawn_tokens`, the spec's declared ``tokens``; R011
    lines through ``warn``) and every stage that trains past its model's context with its documents' lengths
    (:func:`context_checks`, the ``stages`` of the file; R012 lines through ``context_warn``), write
    ``assets/data_stats.json`` and return it. ``state`` (prepare's ``assets/prepare.json``) records each source's
    key under ``data_stats:<name>``. Never raises for a source it cannot read (a warning line instead: the
    trainers report the source's error where they read it), except for a record or table that lacks the source's
    ``text_field`` (:class:`llmc.runtime.stream.SourceFieldError`): the trainers would stop on that same line, so
    prepare stops with it (``error[R002]``) rather than start them."""
    from llmc.runtime.stream import SourceFieldError
    from llmc.runtime.tokenizer import TextTokenizer

    asset_dir = Path(assets.tokenizer_dir)
    out_file = asset_dir / STATS_FILE
    warn = warn or (lambda msg: print(f"{out_file}: warning[R011] {msg}", file=sys.stderr, flush=True))
    context_warn = context_warn or (lambda msg: print(f"{out_file}: warning[R012] {msg}", file=sys.stderr, flush=True))
    try:
        old_report = json.loads(out_file.read_text())
        prev = {s["name"]: s for s in old_report["sources"]}
    except (OSError, ValueError, KeyError, TypeError):
        old_report, prev = {}, {}
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
            except SourceFieldError:  # a record / table without the source's text_field: the trainers stop on the
                raise  # same error (stream.py raises it too), so prepare stops now, with their one line
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
    try:
        stage_figures, context_warns = context_checks(job, rows)
    except Exception as e:  # noqa: BLE001 (a check only informs: the sources' figures are still written)
        stage_figures, context_warns = [], [f"could not set the documents' lengths against the stages: "
                                            f"{type(e).__name__}: {e} (hint: training reads the sources as before)"]
    for w in context_warns:
        context_warn(w)
    report = {"version": 1, "sources": rows, "stages": stage_figures}
    changed = changed or stage_figures != (old_report.get("stages") if isinstance(old_report, dict) else None)
    if changed or len(rows) != len(prev) or not out_file.exists():
        tmp = out_file.with_name(out_file.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out_file)
    else:
        log(f"prepare: data statistics unchanged ({len(rows)} source(s), {out_file})")
    return report


__all__ = ["CHUNK_BYTES", "CHUNK_ROWS", "DECLARED_FACTOR", "ERROR_SIGMAS", "EXACT_LENGTHS", "EXACT_MAX_BYTES",
           "LENGTH_BINS_PER_OCTAVE", "LONG_DOC_MIN_SHARE", "LengthHistogram", "MIN_SAMPLE_CHUNKS", "Measurement",
           "SAMPLE_CHUNKS", "SAMPLE_MAX_BYTES", "STATS_FILE", "context_checks", "data_stats", "drawn_tokens", "judge",
           "measure_source", "measurement_key", "previous_context", "ratio_estimate", "sample_points",
           "stage_backend"]
