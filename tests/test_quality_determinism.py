"""The quality pipeline's output does not depend on how the work is split (``workers`` / ``shards``), the
cleaned documents keep their source order, and the MinHash signature phase streams its shard (signatures
equal to datasketch's own, computed here from scratch)."""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasketch")

sys.path.insert(0, str(Path(__file__).parent))
from test_quality import N_EXACT, N_NEAR, N_ORIG, make_corpus  # noqa: E402

from llmc.quality import NearDupConfig, QualityConfig, QualitySource, pipeline, run_quality  # noqa: E402


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and ".work" not in p.parts}


def test_output_does_not_depend_on_workers_or_shards(tmp_path, monkeypatch):
    c = make_corpus(tmp_path / "data")
    monkeypatch.setattr(pipeline, "PART_DOCS", 70, raising=False)  # several parts per source
    sources = [QualitySource("web", str(c["dirs"][0])), QualitySource("books", str(c["dirs"][1]))]
    outs = {}
    for workers, shards in ((1, None), (2, None), (3, None), (2, 5)):
        out = tmp_path / f"out-{workers}-{shards}"
        run_quality(sources, QualityConfig(workers=workers, shards=shards), out)
        outs[(workers, shards)] = _files(out)
    ref = outs[(1, None)]
    for key, files in outs.items():
        assert files == ref, key  # same file names, same bytes (the report too)
    assert "quality_report.json" in ref and "web/part-00001.jsonl" in ref

    # the kept documents are in source order: ids ascend through the parts, and the texts are the source's
    for name, d, fname in (("web", c["dirs"][0], "part0.jsonl"), ("books", c["dirs"][1], "b.jsonl")):
        src = [json.loads(line)["text"] for line in (d / fname).read_text().splitlines()]
        parts = sorted(k for k in ref if k.startswith(f"{name}/part-"))
        recs = [json.loads(line) for k in parts for line in ref[k].decode().splitlines()]
        assert all(len(ref[k].decode().splitlines()) == 70 for k in parts[:-1])
        idx = [int(r["id"].split("/")[1]) for r in recs]
        assert idx == sorted(idx) and [r["text"] for r in recs] == [src[i] for i in idx]
    report = json.loads(ref["quality_report.json"])
    assert report["totals"]["documents"] == N_ORIG + N_EXACT + N_NEAR
    assert "workers" not in report["config"] and "shards" not in report["config"]


def _reference_shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams as documented (NFKC, lowercased \\w+ runs), written here independently of llmc."""
    w = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    if len(w) < n:
        return {" ".join(w).encode()} if w else set()
    return {" ".join(w[i:i + n]).encode() for i in range(len(w) - n + 1)}


def test_signature_phase_streams_and_matches_datasketch(tmp_path, monkeypatch):
    from datasketch import MinHash

    c = make_corpus(tmp_path / "data")
    path = c["dirs"][0] / "part0.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    texts_of_shard = texts[1::2]
    nd = NearDupConfig()
    # streaming: a document is hashed before the next one is read (the phase used to read the whole shard,
    # then hash it: ~15-20x the shard in memory)
    seen = {"read": 0, "hashed": 0, "lag": 0}
    real_iter, real_shingles = pipeline.iter_documents, pipeline.shingles

    def counting_iter(*a, **k):
        for doc in real_iter(*a, **k):
            seen["lag"] = max(seen["lag"], seen["read"] - seen["hashed"])
            seen["read"] += 1
            yield doc

    def counting_shingles(*a, **k):
        seen["hashed"] += 1
        return real_shingles(*a, **k)

    monkeypatch.setattr(pipeline, "iter_documents", counting_iter)
    monkeypatch.setattr(pipeline, "shingles", counting_shingles)
    pipeline._init_worker(None)
    stem = str(tmp_path / "sig")
    pipeline._signature_task((QualitySource("web", str(path)), 1, 2, QualityConfig(near_dup=nd), stem))
    assert seen["read"] == seen["hashed"] == len(texts_of_shard) and seen["lag"] == 0

    sigs = np.load(stem + ".npy")
    meta = json.loads(Path(stem + ".json").read_text())
    assert meta["idx"] == list(range(1, len(texts), 2)) and sigs.shape == (len(texts_of_shard), nd.num_perm)
    # datasketch, one MinHash per document from scratch, and MinHash.bulk over the whole shard (what the
    # phase computed before streaming): the same signatures, bit for bit
    one_by_one = []
    for t in texts_of_shard:
        m = MinHash(num_perm=nd.num_perm, seed=nd.seed)
        m.update_batch(sorted(_reference_shingles(t, nd.ngram)))
        one_by_one.append(m.hashvalues)
    bulk = MinHash.bulk([list(_reference_shingles(t, nd.ngram)) for t in texts_of_shard], num_perm=nd.num_perm,
                        seed=nd.seed)
    assert np.array_equal(sigs, np.stack(one_by_one))
    assert np.array_equal(sigs, np.stack([m.hashvalues for m in bulk]))
    assert sigs.dtype == np.uint32
