"""``data.quality`` wired into prepare: planted duplicates and a contaminated document are removed before
tokenization, training reads the cleaned data, and the plan's banding is the pipeline's."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasketch")
pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_build_fakes import lock_for  # noqa: E402
from test_quality import N_EXACT, N_NEAR, N_ORIG, make_corpus  # noqa: E402

from llmc.compiler import quality_math  # noqa: E402
from llmc.compiler.compile import compile_spec  # noqa: E402
from llmc.runtime.entry import run_stage  # noqa: E402
from llmc.spec.schema import RunSpec  # noqa: E402

ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)


def _spec(quality: dict, validation: dict | None = None) -> dict:
    spec = {"name": "q", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "web", "path": "data/web"}, {"name": "books", "path": "data/books"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * 4,
                     "quality": quality},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}, "log_every": 1}}
    if validation:
        spec["eval"] = {"validation": validation}
    return spec


def _norm(t: str) -> str:
    return " ".join(re.findall(r"\w+", t.lower()))


def _kept(root: Path) -> dict[str, list[str]]:
    out = {}
    for name in ("web", "books"):
        out[name] = [json.loads(ln)["text"] for f in sorted((root / "data" / "quality" / name).glob("part-*.jsonl"))
                     for ln in f.read_text().splitlines()]
    return out


def test_prepare_removes_planted_duplicates_and_contamination_before_training(tmp_path):
    c = make_corpus(tmp_path / "data")
    # a benchmark item quoting 13+ words of one original document: that document is contaminated
    victim = c["originals"][3]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "mc.jsonl").write_text(json.dumps({"question": " ".join(victim.split()[20:40])}) + "\n")
    spec = _spec({"exact": True, "near_dup": {}, "decontaminate": {"benchmarks": ["bench/mc.jsonl"]}},
                 {"fraction": 0.1, "seed": 0, "every_steps": 2, "max_batches": 1})
    lock = lock_for(spec, plan={"micro_batch": 8}, hyper={"warmup_steps": 1}, spec_path=str(tmp_path / "spec.yaml"))
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    res = run_stage(lock, None, tmp_path / "run" / "pretrain", tmp_path, steps=2)
    assert res["status"] == "done"

    report = json.loads((tmp_path / "data" / "quality" / "quality_report.json").read_text())
    kept = _kept(tmp_path)
    n_kept = sum(len(v) for v in kept.values())
    removed = {r: sum(s["removed"][r]["documents"] for s in report["sources"].values())
               for r in ("exact_dup", "near_dup", "contaminated")}
    total = N_ORIG + N_EXACT + N_NEAR
    assert n_kept == total - sum(removed.values())
    assert removed["contaminated"] >= 1
    assert _norm(victim) not in {_norm(t) for v in kept.values() for t in v}
    assert removed["exact_dup"] >= N_EXACT - 1  # the victim's exact copy, if any, goes as contaminated
    assert removed["near_dup"] >= 0.9 * N_NEAR
    norms = [_norm(t) for v in kept.values() for t in v]
    assert len(norms) == len(set(norms))  # no exact duplicate left
    assert n_kept <= N_ORIG - 1 + 0.1 * N_NEAR

    # training streams the cleaned documents in place, without the held-out ones (split while reading)
    from llmc.runtime.data import Assets
    from llmc.runtime.stream import documents
    from llmc.runtime.validation import validation_sources

    split = json.loads((tmp_path / "data" / "split" / "validation.json").read_text())
    assert split["sources"] == ["web", "books"] and split["fraction"] == 0.1
    assets = Assets.from_json(json.loads((tmp_path / "assets" / "assets.json").read_text()))
    assert {Path(s.path) for s in assets.sources} == {tmp_path / "data" / "quality" / n for n in ("web", "books")}
    val = {v.name: list(documents(v)) for v in validation_sources(assets)}
    for s in assets.sources:
        assert s.holdout == ("train", 0.1, 0) and val[s.name]
        assert sorted(list(documents(s)) + val[s.name]) == sorted(kept[s.name])

    # the plan shows the same banding and FP/FN areas as quality_math and the pipeline's report
    comp = compile_spec(RunSpec.model_validate(spec), str(tmp_path / "spec.yaml"))
    nd = comp.evaluation.quality.near_dup
    ref = quality_math.banding(0.75, 14, 8)
    assert (nd.bands, nd.rows, nd.false_positive, nd.false_negative) == (14, 8, ref.false_positive,
                                                                         ref.false_negative)
    assert report["banding"]["false_positive"] == pytest.approx(nd.false_positive)
    assert report["banding"]["false_negative"] == pytest.approx(nd.false_negative)

    # preparing again redoes nothing (same counts, no new work)
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob

    logs: list[str] = []
    prepare_assets(TrainJob.from_lock(lock, None), tmp_path, log=logs.append)
    assert _kept(tmp_path) == kept and not any("held out" in ln or "trained" in ln for ln in logs)


def test_quality_config_maps_every_spec_key():
    from llmc.quality import QualityConfig
    from llmc.runtime.quality_prepare import quality_config
    from llmc.spec.schema import Quality

    q = Quality.model_validate({"exact": False, "near_dup": {"threshold": 0.8, "num_perm": 128, "ngram": 3,
                                                             "bands": None, "rows": None, "seed": 7},
                                "decontaminate": {"ngram": 8, "benchmarks": ["a.jsonl"], "text_fields": ["q"]},
                                "workers": 3})
    cfg = quality_config(q, resolve=lambda p: Path("/x") / p)
    assert isinstance(cfg, QualityConfig) and not cfg.exact and cfg.workers == 3
    assert (cfg.near_dup.threshold, cfg.near_dup.num_perm, cfg.near_dup.ngram, cfg.near_dup.seed) == (0.8, 128, 3, 7)
    assert cfg.near_dup.banding() == quality_math.optimal_bands(0.8, 128)
    assert cfg.decontaminate.benchmarks == ("/x/a.jsonl",) and cfg.decontaminate.ngram == 8
    assert cfg.decontaminate.text_fields == ("q",)


def test_prepare_cleans_parquet_text_and_hf_sources_too(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob

    rng = __import__("random").Random(0)
    docs = [" ".join(f"w{rng.randrange(3000)}" for _ in range(40)) for _ in range(12)]
    docs = docs + docs[:4]  # 4 exact duplicates inside each source (and every source repeats the others)
    d = tmp_path / "data"
    (d / "pq").mkdir(parents=True)
    pq.write_table(pa.table({"text": docs}), d / "pq" / "a.parquet")
    (d / "txt").mkdir()
    for i, t in enumerate(docs):
        (d / "txt" / f"{i:03d}.txt").write_text(t)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(d / "hf"))
    # jsonl with a lone surrogate (valid JSON: an emoji cut in half), which used to fail prepare
    (d / "js").mkdir()
    (d / "js" / "a.jsonl").write_text(json.dumps({"text": "cut \ud83d emoji, a document of its own"}) + "\n")
    spec = _spec({"exact": True, "near_dup": None})
    spec["data"]["sources"] = [{"name": "pq", "path": "data/pq", "format": "parquet"},
                               {"name": "txt", "path": "data/txt", "format": "text"},
                               {"name": "hf", "path": "data/hf", "format": "parquet"},  # a save_to_disk folder
                               {"name": "js", "path": "data/js"}]
    lock = lock_for(spec, plan={"micro_batch": 8}, spec_path=str(tmp_path / "spec.yaml"))
    logs: list[str] = []
    assets = prepare_assets(TrainJob.from_lock(lock, None), tmp_path, log=logs.append)
    report = json.loads((tmp_path / "data" / "quality" / "quality_report.json").read_text())
    assert sorted(report["sources"]) == ["hf", "js", "pq", "txt"]
    kept = {n: report["sources"][n]["kept_documents"] for n in report["sources"]}
    assert kept == {"pq": 12, "txt": 0, "hf": 0, "js": 1}  # first occurrence wins, across sources too
    assert {s.name: (s.format, Path(s.path)) for s in assets.sources} == {
        n: ("jsonl", tmp_path / "data" / "quality" / n) for n in ("pq", "txt", "hf", "js")}
    assert any(ln.startswith("prepare: quality hf: kept 0 of 16") for ln in logs)
    cleaned = [json.loads(ln)["text"] for ln in (tmp_path / "data" / "quality" / "js" / "part-00000.jsonl")
               .read_text(encoding="utf-8").splitlines()]
    assert cleaned == ["cut \ufffd emoji, a document of its own"]
