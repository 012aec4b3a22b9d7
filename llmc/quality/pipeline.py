"""The data-quality pipeline: signatures (parallel) -> decisions (one pass, global) -> cleaned sources.

1. **signatures** (``workers`` processes, one task per (source, shard)): for each document its
   exact key (:func:`llmc.quality.text.exact_key`), its MinHash (datasketch, word n-gram shingles)
   and the first benchmark match it contains (:func:`build_benchmark_index`: an n-gram of an item's
   fields joined or of its question + gold answer, or a whole item of ``min_words`` to ``ngram - 1``
   words), streamed: one document is held at a time, and a shard's task keeps only these records (about
   0.5 KB a document with 112 permutations). Written as ``<shard>.json`` + ``<shard>.npy`` and then a
   ``.done`` marker, each by write-to-temp + ``os.replace``.
2. **decisions** (this process): documents are visited in source order, then index order. A
   document is removed as ``contaminated`` if it holds a benchmark match, else as ``exact_dup`` if
   an earlier kept document has its exact key, else as ``near_dup`` if ``MinHashLSH`` returns an
   earlier kept document as candidate whose signature agreement (the unbiased Jaccard estimate) is at
   least ``threshold``; otherwise it is kept and indexed. The first occurrence wins. Banding only
   proposes candidate pairs; each is then checked by the fraction of signature components that agree
   (Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", 3rd ed., section 3.4.3, steps 6-7), so
   ``threshold`` decides, not only the S-curve (pairs at Jaccard 0.5-0.6 were removed 5-19 % of the
   time by 14x8 bands alone). A document without shingles (no ``\\w`` word: emoji, punctuation) is
   never a near duplicate: every empty set has the same signature, so they would all collide.
3. **write** (one task per source, sources in parallel): the kept documents of a source, in source
   order, go to ``<out>/<source>/part-00000.jsonl``, ``part-00001.jsonl``, ... (``PART_DOCS`` documents
   each; records ``{"id": "<source>/<index>", "text": ...}``), then a ``.done`` marker.

The output (cleaned files, byte for byte, and the report) does not depend on ``workers`` or ``shards``:
every decision is taken in the global order of phase 2 and the cleaned documents keep the order of
their source, so the document indices that the held-out validation split hashes
(:mod:`llmc.runtime.validation`) are the same however the work was split.

Resumable: all work lives under ``<out>/.work/<key>/`` where key hashes the config, the sources
(paths, sizes, mtimes) and the benchmark files; re-running skips every shard whose marker exists,
so an interrupted run redoes only unfinished shards and a changed input starts afresh.
``<out>/quality_report.json`` holds per source and per reason the documents/characters removed and
up to ``max_examples`` examples (document id + the duplicate kept / the benchmark item matched and the
words matched, ``ngram``); its ``benchmarks`` entry counts the items, those matched whole (``short_items``)
and those too short to match at all (``skipped_short``).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.fileio import write_atomic
from llmc.quality.config import DecontamConfig, NearDupConfig, QualityConfig, QualitySource
from llmc.quality.text import benchmark_items, exact_key, ngram_hash, shingles, words
from llmc.sources import expand_paths, iter_documents

REASONS = ("contaminated", "exact_dup", "near_dup")
SCHEME = "affine32"  # datasketch >= 2.0 default permutation scheme
#: hashed into the work key: bump when the decisions or the output layout for the same inputs change (2:
#: candidates checked against the threshold, empty shingle sets never near duplicates; 3: one output per
#: source in source order, parts of PART_DOCS documents; 4: benchmark n-grams of an item's joined text and of
#: its question + gold answer, whole items shorter than the n-gram matched)
VERSION = 4
#: kept documents per output part (``part-<k>.jsonl``)
PART_DOCS = 100_000


@dataclass
class Removal:
    """Documents of one source removed for one reason."""

    documents: int = 0
    characters: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SourceReport:
    documents: int = 0
    characters: int = 0
    kept_documents: int = 0
    kept_characters: int = 0
    removed: dict[str, Removal] = field(default_factory=lambda: {r: Removal() for r in REASONS})


@dataclass
class WorkCount:
    """Signature shards / decisions / written sources computed vs skipped (already done), for this call."""

    signatures_computed: int = 0
    signatures_skipped: int = 0
    decisions_computed: int = 0
    writes_computed: int = 0
    writes_skipped: int = 0


@dataclass
class QualityResult:
    """What :func:`run_quality` did. ``outputs[name]`` is the cleaned source directory (jsonl, field ``text``)."""

    report_path: Path
    outputs: dict[str, Path]
    sources: dict[str, SourceReport]
    work: WorkCount
    banding: dict[str, Any] | None = None
    benchmarks: dict[str, Any] | None = None


# -- benchmark n-grams -------------------------------------------------------------------------

@dataclass
class BenchmarkIndex:
    """What a document is matched against: every ``ngram``-word n-gram of the items' texts
    (:func:`benchmark_items`), and, for a text of ``min_words`` to ``ngram - 1`` words, its whole word
    sequence (``whole[k]``: the hashes of the k-word texts). ``heads`` holds each such text's first word and
    ``prefix`` the hash of its first ``min_words`` words: a document hashes a ``min_words``-word window only
    where a head word starts it, and its k-word windows only where that prefix matches, so the whole texts add
    a set lookup per word and little hashing."""

    ngram: int
    grams: dict[int, int]  # n-gram hash -> item number
    items: list[str]  # item ids
    skipped_short: int  # items without a text of min_words words or more: never matched
    min_words: int = 0
    whole: dict[int, dict[int, int]] = field(default_factory=dict)  # words -> hash of the whole text -> item
    prefix: set[int] = field(default_factory=set)
    heads: set[str] = field(default_factory=set)
    short_items: int = 0  # items matched through a whole text (shorter than ngram)


def build_benchmark_index(cfg: DecontamConfig) -> BenchmarkIndex:
    """Index the n-grams of every text of every item, and the whole word sequence of each text shorter than
    ``ngram`` but of ``min_words`` words or more (GPT-3's "overlap with the whole example when it is shorter
    than 13-grams", arXiv:2005.14165 section 4); items with no text that long are counted in
    ``skipped_short``."""
    if cfg.ngram < 1 or cfg.min_words < 1:
        raise ValueError(f"decontaminate.ngram and decontaminate.min_words must be >= 1, got {cfg.ngram} and "
                         f"{cfg.min_words}; hint: the defaults are 13 and 8 (GPT-3, arXiv:2005.14165 App. C)")
    grams: dict[int, int] = {}
    whole: dict[int, dict[int, int]] = {}
    prefix: set[int] = set()
    heads: set[str] = set()
    items: list[str] = []
    skipped = short = 0
    for path in cfg.benchmarks:
        for item_id, texts in benchmark_items(path, cfg.text_fields):
            num = len(items)
            items.append(item_id)
            added = as_whole = False
            for text in texts:
                w = words(text)
                if len(w) >= cfg.ngram:
                    for i in range(len(w) - cfg.ngram + 1):
                        grams.setdefault(ngram_hash(w[i:i + cfg.ngram]), num)
                    added = True
                elif len(w) >= cfg.min_words:
                    whole.setdefault(len(w), {}).setdefault(ngram_hash(w), num)
                    prefix.add(ngram_hash(w[:cfg.min_words]))
                    heads.add(w[0])
                    added = as_whole = True
            skipped += not added
            short += as_whole
    whole = dict(sorted(whole.items()))  # shortest first: the loop over lengths can stop at a document's end
    return BenchmarkIndex(cfg.ngram, grams, items, skipped, cfg.min_words, whole, prefix, heads, short)


def _first_benchmark_hit(text: str, bench: BenchmarkIndex) -> tuple[int, str] | None:
    """(item number, the words matched) of the first benchmark n-gram or whole short item in ``text``, by
    position (an n-gram first at a tie); None when there is none."""
    w = words(text)
    n = bench.ngram
    m = bench.min_words if bench.whole else 0
    for i in range(len(w)):
        if i + n <= len(w):
            item = bench.grams.get(ngram_hash(w[i:i + n]))
            if item is not None:
                return item, " ".join(w[i:i + n])
        if m and w[i] in bench.heads and i + m <= len(w) and ngram_hash(w[i:i + m]) in bench.prefix:
            for k, table in bench.whole.items():
                if i + k > len(w):
                    break
                item = table.get(ngram_hash(w[i:i + k]))
                if item is not None:
                    return item, " ".join(w[i:i + k])
    return None


# -- phase 1: signatures -------------------------------------------------------------------------

_BENCH: BenchmarkIndex | None = None


def _init_worker(bench: BenchmarkIndex | None) -> None:
    global _BENCH
    _BENCH = bench


def _atomic_write(path: Path, data: bytes) -> None:
    write_atomic(path, data, fsync=True)  # (never through a link at path: prepare's rule for data/)


def _signature_task(args: tuple[QualitySource, int, int, QualityConfig, str]) -> None:
    """Signatures of one shard, streamed: each document is read, hashed and dropped, so the task holds the
    per-document records (a ``num_perm`` uint32 signature, an exact key, a location) and one document at a
    time, not the shard's texts and shingle sets. Each signature is what ``MinHash.generator`` / ``MinHash.bulk``
    give (datasketch/minhash.py: one initialised MinHash, ``copy()`` + ``update_batch(shingles)`` per set)."""
    src, shard, n, cfg, stem = args
    nd = cfg.near_dup
    meta: dict[str, list] = {"idx": [], "loc": [], "chars": [], "key": [], "hit": []}
    sigs: list[np.ndarray] = []
    proto = None
    if nd is not None:
        from datasketch import MinHash

        proto = MinHash(num_perm=nd.num_perm, seed=nd.seed)  # the permutations, made once per task
    for idx, loc, text in iter_documents(src.path, src.format, src.text_field, shard, n):
        if proto is not None:
            mh = proto.copy()
            mh.update_batch(shingles(text, nd.ngram))
            sigs.append(mh.hashvalues)
        meta["idx"].append(idx)
        meta["loc"].append(loc)
        meta["chars"].append(len(text))
        meta["key"].append(exact_key(text) if cfg.exact else "")
        hit = _first_benchmark_hit(text, _BENCH) if _BENCH is not None else None
        meta["hit"].append(list(hit) if hit else None)
    arr = np.stack(sigs) if sigs else np.zeros((0, nd.num_perm if nd else 0), dtype=np.uint32)

    buf = io.BytesIO()
    np.save(buf, arr)
    _atomic_write(Path(stem + ".npy"), buf.getvalue())
    _atomic_write(Path(stem + ".json"), json.dumps(meta).encode())
    _atomic_write(Path(stem + ".done"), b"")


# -- phase 3: writing -----------------------------------------------------------------------------

def _part(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}.jsonl"


def _write_task(args: tuple[QualitySource, list[int], str, int, str]) -> None:
    """The kept documents of one source, in source order, into ``part-00000.jsonl``, ``part-00001.jsonl``, ...
    of ``part_docs`` documents each (each part written to a temporary name, then renamed); parts left from
    an earlier, longer output are removed; the marker records the number of parts."""
    src, keep, out_dir, part_docs, marker = args
    keep_set = set(keep)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = 0
    fh, tmp, in_part = None, None, 0

    def close() -> None:
        nonlocal fh, parts
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(tmp, _part(out, parts))
            parts += 1
            fh = None

    for idx, _, text in iter_documents(src.path, src.format, src.text_field):
        if idx not in keep_set:
            continue
        if fh is None:
            tmp = _part(out, parts).with_name(f"{_part(out, parts).name}.tmp{os.getpid()}")
            fh, in_part = open(tmp, "w", encoding="utf-8"), 0
        fh.write(json.dumps({"id": f"{src.name}/{idx}", "text": text}, ensure_ascii=False) + "\n")
        in_part += 1
        if in_part >= part_docs:
            close()
    close()
    if parts == 0:  # nothing kept: one empty part, so the output is a readable (empty) source
        _atomic_write(_part(out, 0), b"")
        parts = 1
    for stale in out.glob("part-*.jsonl"):
        if int(stale.stem.split("-")[1]) >= parts:
            stale.unlink()
    _atomic_write(Path(marker), json.dumps({"parts": parts}).encode())


# -- driver ---------------------------------------------------------------------------------------

def _settings(cfg: QualityConfig) -> dict[str, Any]:
    """What decides the output: the config without ``workers`` / ``shards``, which only say how the work is
    split (the report's ``config`` and the work key; so a changed ``workers`` reuses finished work)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("workers", "shards")}


def _work_key(sources: Sequence[QualitySource], cfg: QualityConfig) -> str:
    h = hashlib.sha256(json.dumps(_settings(cfg), sort_keys=True, default=str).encode())
    h.update(f"shards={cfg.num_shards()}\n".encode())  # the layout of the signature records
    h.update(f"v{VERSION}\n".encode())
    for s in sources:
        h.update(f"{s.name}|{s.format}|{s.text_field}\n".encode())
        for f in expand_paths(s.path, s.format):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    if cfg.decontaminate is not None:
        for b in cfg.decontaminate.benchmarks:
            h.update(Path(b).read_bytes())
    return h.hexdigest()[:16]


def _run_tasks(fn, tasks: list, workers: int, bench: BenchmarkIndex | None) -> None:
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        _init_worker(bench)
        for t in tasks:
            fn(t)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(bench,)) as pool:
        for _ in pool.imap_unordered(fn, tasks):
            pass


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_quality(sources: Sequence[QualitySource], config: QualityConfig, out_dir: str | Path) -> QualityResult:
    """Run exact dedup, MinHash near-dedup and decontamination over ``sources`` into ``out_dir``."""
    names = [s.name for s in sources]
    if len(set(map(_safe, names))) != len(names):
        raise ValueError(f"source names must be distinct: {names}")
    out = Path(out_dir)
    n = config.num_shards()
    band = config.near_dup.banding() if config.near_dup is not None else None
    work = out / ".work" / _work_key(sources, config)
    work.mkdir(parents=True, exist_ok=True)
    count = WorkCount()
    bench = build_benchmark_index(config.decontaminate) if config.decontaminate is not None else None

    # phase 1
    tasks = []
    for s in sources:
        for i in range(n):
            stem = work / f"sig-{_safe(s.name)}-{i:05d}"
            if Path(str(stem) + ".done").exists():
                count.signatures_skipped += 1
            else:
                tasks.append((s, i, n, config, str(stem)))
    count.signatures_computed = len(tasks)
    _run_tasks(_signature_task, tasks, config.workers, bench)

    # phase 2
    decisions_path = work / "decisions.json"
    if decisions_path.exists():
        decided = json.loads(decisions_path.read_text())
    else:
        decided = _decide(sources, config, n, work, bench)
        _atomic_write(decisions_path, json.dumps(decided).encode())
        count.decisions_computed = 1

    # phase 3: one task per source, in source order (not per shard: the output must not depend on the shards)
    tasks = []
    outputs: dict[str, Path] = {}
    for s in sources:
        outputs[s.name] = out / _safe(s.name)
        marker = work / f"write-{_safe(s.name)}.done"
        if marker.exists() and all(_part(outputs[s.name], k).exists()
                                   for k in range(json.loads(marker.read_text())["parts"])):
            count.writes_skipped += 1
        else:
            keep = sorted(i for shard in decided["keep"][s.name] for i in shard)
            tasks.append((s, keep, str(outputs[s.name]), PART_DOCS, str(marker)))
    count.writes_computed = len(tasks)
    _run_tasks(_write_task, tasks, config.workers, None)

    reports = {name: _report_from_json(r) for name, r in decided["sources"].items()}
    result = QualityResult(out / "quality_report.json", outputs, reports, count,
                           asdict(band) | {"s_half": band.s_half} if band is not None else None,
                           {"items": len(bench.items), "skipped_short": bench.skipped_short,
                            "ngrams": len(bench.grams), "ngram": bench.ngram, "min_words": bench.min_words,
                            "short_items": bench.short_items} if bench is not None else None)
    report = {"config": _settings(config), "banding": result.banding, "benchmarks": result.benchmarks,
              "sources": {k: asdict(v) for k, v in reports.items()},
              "totals": _totals(reports)}
    _atomic_write(result.report_path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return result


def _report_from_json(d: dict) -> SourceReport:
    rep = SourceReport(d["documents"], d["characters"], d["kept_documents"], d["kept_characters"])
    rep.removed = {r: Removal(**v) for r, v in d["removed"].items()}
    return rep


def _totals(reports: dict[str, SourceReport]) -> dict[str, Any]:
    t: dict[str, Any] = {"documents": 0, "characters": 0, "kept_documents": 0, "kept_characters": 0}
    for r in reports.values():
        for k in list(t):
            t[k] += getattr(r, k)
    for reason in REASONS:
        t[reason] = {"documents": sum(r.removed[reason].documents for r in reports.values()),
                     "characters": sum(r.removed[reason].characters for r in reports.values())}
    return t


def _decide(sources: Sequence[QualitySource], cfg: QualityConfig, n: int, work: Path,
            bench: BenchmarkIndex | None) -> dict[str, Any]:
    nd: NearDupConfig | None = cfg.near_dup
    lsh = None
    if nd is not None:
        from datasketch import LeanMinHash, MinHashLSH

        band = nd.banding()
        lsh = MinHashLSH(num_perm=nd.num_perm, params=(band.bands, band.rows))
    names_order = {s.name: k for k, s in enumerate(sources)}

    def global_order(doc_id: str) -> tuple[int, int]:
        name, idx = doc_id.rsplit("/", 1)
        return names_order[name], int(idx)

    seen: dict[str, str] = {}
    sigs_by_id: dict[str, Any] = {}
    keep: dict[str, list[list[int]]] = {}
    reports: dict[str, SourceReport] = {}
    for s in sources:
        rep = SourceReport()
        keep[s.name] = [[] for _ in range(n)]
        metas, arrays = [], []
        for i in range(n):
            stem = work / f"sig-{_safe(s.name)}-{i:05d}"
            metas.append(json.loads(Path(str(stem) + ".json").read_text()))
            arrays.append(np.load(str(stem) + ".npy"))
        order = sorted((idx, i, j) for i, m in enumerate(metas) for j, idx in enumerate(m["idx"]))
        for idx, i, j in order:
            m = metas[i]
            doc_id, chars = f"{s.name}/{idx}", m["chars"][j]
            rep.documents += 1
            rep.characters += chars
            reason, example = None, {"id": doc_id, "location": m["loc"][j]}
            hit = m["hit"][j]
            if hit is not None and bench is not None:
                reason = "contaminated"
                example |= {"benchmark_item": bench.items[hit[0]], "ngram": hit[1]}
            elif cfg.exact and m["key"][j] in seen:
                reason = "exact_dup"
                example["duplicate_of"] = seen[m["key"][j]]
            elif lsh is not None and nd is not None:
                mh = LeanMinHash(seed=nd.seed, hashvalues=arrays[i][j], scheme=SCHEME)
                if not mh.is_empty():  # an empty shingle set: never a near duplicate, never indexed
                    sims = {c: mh.jaccard(sigs_by_id[c]) for c in lsh.query(mh)}
                    near = [c for c, sim in sims.items() if sim >= nd.threshold]
                    if near:
                        first = min(near, key=global_order)
                        reason = "near_dup"
                        example |= {"duplicate_of": first, "estimated_jaccard": round(sims[first], 4)}
                    else:
                        lsh.insert(doc_id, mh)
                        sigs_by_id[doc_id] = mh
            if reason is None:
                if cfg.exact:
                    seen.setdefault(m["key"][j], doc_id)
                keep[s.name][i].append(idx)
                rep.kept_documents += 1
                rep.kept_characters += chars
            else:
                r = rep.removed[reason]
                r.documents += 1
                r.characters += chars
                if len(r.examples) < cfg.max_examples:
                    r.examples.append(example)
        reports[s.name] = rep
    return {"keep": keep, "sources": {k: asdict(v) for k, v in reports.items()}}
