"""The ``prepare`` step's data-quality pass: ``data.quality`` -> :func:`llmc.quality.run_quality` before tokenization.

For every ``Data`` section of the run that sets ``quality`` (the top-level data and any stage's own
data), its text sources -- every format: ``text``, ``jsonl``, ``parquet`` and ``datasets`` ``save_to_disk``
folders, read where they lie by :func:`llmc.sources.iter_documents`, and ``builtin`` corpora as written by
``prepare`` -- are cleaned together (exact dedup, MinHash near-dedup, n-gram decontamination against the
benchmark files, which resolve against the spec's folder) into ``data/quality/<name>/part-*.jsonl``;
training, the tokenizer and the validation split then read the cleaned copies (jsonl, field ``text``). The pipeline's report (per source and reason:
documents and characters removed, examples) is ``data/quality/quality_report.json``. Re-running is
cheap: :func:`llmc.quality.run_quality` skips every shard whose inputs and config are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmc.runtime.data import SourceData
from llmc.spec.schema import RECORD_SOURCE_KINDS

QUALITY_DIR = "quality"


def quality_config(q, resolve=lambda p: Path(p)):
    """The spec's ``data.quality`` as :class:`llmc.quality.QualityConfig` (benchmark paths resolved)."""
    from llmc.quality import DecontamConfig, NearDupConfig, QualityConfig

    nd = NearDupConfig(**q.near_dup.model_dump()) if q.near_dup is not None else None
    dc = None
    if q.decontaminate is not None:
        d = q.decontaminate
        dc = DecontamConfig(benchmarks=tuple(str(resolve(b)) for b in d.benchmarks), ngram=d.ngram,
                            text_fields=tuple(d.text_fields) if d.text_fields is not None else None,
                            min_words=d.min_words)
    return QualityConfig(exact=q.exact, near_dup=nd, decontaminate=dc, workers=q.workers)


def _groups(job) -> list[tuple[object, set[str]]]:
    """(quality spec, source names) for each data section of the run with ``quality`` set."""
    spec = job.spec
    if spec is None:
        return []
    datas = [spec.data] + [st.data for st in spec.stages if st.data is not None]
    out: list[tuple[object, set[str]]] = []
    for d in datas:
        if d.quality is None:
            continue
        names = {s.name for s in d.sources if s.kind not in RECORD_SOURCE_KINDS}
        for q, have in out:
            if q == d.quality:
                have |= names
                break
        else:
            out.append((d.quality, names))
    return out


def apply_quality(job, produced: list[SourceData], root: Path, log=print) -> tuple[list[SourceData], str]:
    """Clean the sources of every ``quality`` section; returns the sources to train on and a key of what was
    done ("" when nothing), for the caller's cache keys."""
    from llmc.quality import QualitySource, run_quality

    groups = _groups(job)
    if not groups:
        return produced, ""
    data_dir = root / "data"
    replaced: dict[str, SourceData] = {}
    keys = []
    for k, (q, names) in enumerate(groups):
        srcs = [s for s in produced if s.name in names]  # spec order: first one wins
        if not srcs:
            continue
        cfg = quality_config(q, job.resolve_path)
        out = data_dir / (QUALITY_DIR if k == 0 else f"{QUALITY_DIR}-{k}")
        res = run_quality([QualitySource(s.name, s.path, s.format, s.text_field) for s in srcs], cfg, out)
        for s in srcs:
            rep = res.sources[s.name]
            removed = {r: v.documents for r, v in rep.removed.items() if v.documents}
            log(f"prepare: quality {s.name}: kept {rep.kept_documents} of {rep.documents} documents"
                + (f" (removed {', '.join(f'{n} {r}' for r, n in removed.items())})" if removed else "")
                + f"; report {res.report_path}")
            replaced[s.name] = SourceData(s.name, str(res.outputs[s.name]), "jsonl", "text", s.weight)
        keys.append(hashlib.sha256(res.report_path.read_bytes()).hexdigest()[:16])
    return [replaced.get(s.name, s) for s in produced], "quality:" + ",".join(keys) if keys else ""


def quality_report(root: Path) -> dict | None:
    """The report of the first quality group, or None."""
    p = Path(root) / "data" / QUALITY_DIR / "quality_report.json"
    return json.loads(p.read_text()) if p.exists() else None


__all__ = ["apply_quality", "quality_config", "quality_report", "QUALITY_DIR"]
