"""Data-quality pipeline on a synthetic corpus with planted exact / near duplicates and a contaminated document."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datasketch")

from llmc.quality import DecontamConfig, NearDupConfig, QualityConfig, QualitySource, run_quality  # noqa: E402
from llmc.quality.text import words  # noqa: E402

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "ze")
         for b in ("bar", "dun", "fel", "gom", "hix", "jat", "kor", "lup", "mev", "nox",
                   "pim", "quo", "rud", "sav", "tok", "ulm", "vex", "wyn", "xal", "yor")]
N_ORIG, N_EXACT, N_NEAR, DOC_WORDS = 400, 50, 60, 100


def _shingle_set(text: str, n: int = 5) -> set[str]:
    w = words(text)
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingle_set(a), _shingle_set(b)
    return len(x & y) / len(x | y)


def make_corpus(root: Path, seed: int = 0) -> dict:
    """400 random documents + 50 exact copies (whitespace/case changed) + 60 near copies.

    A near copy replaces one run of 5 consecutive words (5 % of the document), the template-style
    edit that word-5-gram MinHash is designed for (exact Jaccard ~0.83; see the assertion below).
    """
    rng = random.Random(seed)
    vocab = sorted(set(VOCAB))
    originals = [" ".join(rng.choice(vocab) for _ in range(DOC_WORDS)) for _ in range(N_ORIG)]
    docs: list[tuple[str, str]] = [(t, "orig") for t in originals]
    for k in rng.sample(range(N_ORIG), N_EXACT):
        docs.append(("  " + originals[k].upper().replace(" ", "  \n") + " ", f"exact:{k}"))
    near_pairs = []
    for k in rng.sample(range(N_ORIG), N_NEAR):
        w = originals[k].split()
        p = rng.randrange(DOC_WORDS - 5)
        w[p:p + 5] = [rng.choice(vocab) for _ in range(5)]
        docs.append((" ".join(w), f"near:{k}"))
        near_pairs.append((k, " ".join(w)))
    rng.shuffle(docs)
    # originals must come before their copies for "first occurrence wins" to name the copy
    order = sorted(range(len(docs)), key=lambda i: (docs[i][1] != "orig", i))
    docs = [docs[i] for i in order]
    a, b = root / "web", root / "books"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    half = len(docs) // 2
    for path, chunk in ((a / "part0.jsonl", docs[:half]), (b / "b.jsonl", docs[half:])):
        with open(path, "w") as fh:
            for text, tag in chunk:
                fh.write(json.dumps({"text": text, "tag": tag}) + "\n")
    return {"docs": docs, "originals": originals, "near_pairs": near_pairs, "dirs": (a, b)}


def test_planted_duplicates_removed(tmp_path):
    c = make_corpus(tmp_path / "data")
    # the planted near copies are near duplicates at the default threshold by exact 5-gram Jaccard
    js = [_jaccard(c["originals"][k], t) for k, t in c["near_pairs"]]
    assert min(js) > 0.75 and max(js) < 0.95
    sources = [QualitySource("web", str(c["dirs"][0])), QualitySource("books", str(c["dirs"][1]))]
    res = run_quality(sources, QualityConfig(workers=1, shards=3), tmp_path / "out")

    tag_of = {}
    for name, d in zip(("web", "books"), c["dirs"], strict=True):
        for i, line in enumerate((d / ("part0.jsonl" if name == "web" else "b.jsonl")).read_text().splitlines()):
            tag_of[f"{name}/{i}"] = json.loads(line)["tag"]
    report = json.loads(res.report_path.read_text())
    removed = {}
    for rep in res.sources.values():
        assert rep.documents == rep.kept_documents + sum(r.documents for r in rep.removed.values())
        for reason, r in rep.removed.items():
            removed[reason] = removed.get(reason, 0) + r.documents
    assert removed["exact_dup"] == N_EXACT  # every exact copy, nothing else, is an exact dup
    # near-dup recall / precision against the planted truth, from the kept ids
    kept_ids = set()
    for d in res.outputs.values():
        for f in d.glob("part-*.jsonl"):
            kept_ids |= {json.loads(line)["id"] for line in f.read_text().splitlines()}
    near_ids = [i for i, t in tag_of.items() if t.startswith("near:")]
    recall = sum(i not in kept_ids for i in near_ids) / len(near_ids)
    removed_ids = set(tag_of) - kept_ids
    precision = sum(tag_of[i] != "orig" for i in removed_ids) / len(removed_ids)
    assert recall >= 0.9, recall
    assert precision >= 0.95, precision
    assert all(tag_of[i] == "orig" for i in kept_ids if not tag_of[i].startswith("near:"))
    # examples name the kept original
    ex = report["sources"]["books"]["removed"]["exact_dup"]["examples"][0]
    k = int(tag_of[ex["id"]].split(":")[1])
    assert tag_of[ex["duplicate_of"]] == "orig"
    dup_src, dup_idx = ex["duplicate_of"].split("/")
    dup_file = c["dirs"][0] / "part0.jsonl" if dup_src == "web" else c["dirs"][1] / "b.jsonl"
    assert json.loads(dup_file.read_text().splitlines()[int(dup_idx)])["text"] == c["originals"][k]
    assert report["totals"]["documents"] == N_ORIG + N_EXACT + N_NEAR
    assert report["banding"]["bands"] == 14 and report["banding"]["rows"] == 8


def test_decontamination_and_resume(tmp_path):
    rng = random.Random(1)
    vocab = sorted(set(VOCAB))
    docs = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(40)]
    question = "Which planet in our solar system is known as the red planet because of iron oxide dust?"
    # doc 7 quotes 13 words of the question, with different case, punctuation and line breaks
    docs[7] = docs[7] + " ... WHICH planet in our solar\nsystem is known, as the red planet because of " + docs[0][:20]
    # doc 9 shares only 12 consecutive words: kept
    docs[9] = docs[9] + " which planet in our solar system is known as the red planet"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "short item?", "answer": "Mars"}) + "\n"
                     + json.dumps({"question": question, "choices": ["Mars", "Venus"]}) + "\n")
    cfg = QualityConfig(exact=True, near_dup=NearDupConfig(), decontaminate=DecontamConfig(benchmarks=(str(bench),)),
                        workers=2, shards=4)
    src = [QualitySource("d", str(data))]
    res = run_quality(src, cfg, tmp_path / "out")
    cont = res.sources["d"].removed["contaminated"]
    assert cont.documents == 1 and cont.characters == len(docs[7])
    assert cont.examples[0]["id"] == "d/7" and cont.examples[0]["benchmark_item"] == "bench.jsonl:2"
    assert res.benchmarks["skipped_short"] == 1
    assert res.work.signatures_computed == 4 and res.work.writes_computed == 1  # one write per source
    first = {p.name: p.read_text() for p in res.outputs["d"].glob("part-*.jsonl")}
    assert list(first) == ["part-00000.jsonl"]
    kept = [json.loads(line) for line in first["part-00000.jsonl"].splitlines()]
    assert [r["text"] for r in kept] == [t for i, t in enumerate(docs) if i != 7]  # source order

    # resume: nothing left to do
    again = run_quality(src, cfg, tmp_path / "out")
    assert (again.work.signatures_computed, again.work.decisions_computed, again.work.writes_computed) == (0, 0, 0)
    assert (again.work.signatures_skipped, again.work.writes_skipped) == (4, 1)
    # an interrupted write (no marker, partial output) and signature shard are redone alone, same result
    work = next((tmp_path / "out" / ".work").iterdir())
    (work / "write-d.done").unlink()
    (res.outputs["d"] / "part-00000.jsonl").write_text("partial")
    (work / "sig-d-00001.done").unlink()
    third = run_quality(src, cfg, tmp_path / "out")
    assert third.work.signatures_computed == 1 and third.work.writes_computed == 1
    assert {p.name: p.read_text() for p in res.outputs["d"].glob("part-*.jsonl")} == first

    # a changed input is new work
    data.write_text(data.read_text() + json.dumps({"text": "one more document"}) + "\n")
    fourth = run_quality(src, cfg, tmp_path / "out")
    assert fourth.work.signatures_computed == 4


def test_bad_config():
    with pytest.raises(ValueError, match="bands x rows"):
        NearDupConfig(num_perm=64, bands=14, rows=8).banding()
    band = NearDupConfig(threshold=0.9, num_perm=128, bands=None, rows=None).banding()
    assert (band.bands, band.rows) == (5, 25)  # datasketch MinHashLSH docstring example


def test_text_and_parquet_sources_exact_only(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = random.Random(2)
    vocab = sorted(set(VOCAB))
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(6)]
    tdir = tmp_path / "txt"
    tdir.mkdir()
    for i, t in enumerate(texts[:4]):
        (tdir / f"{i}.txt").write_text(t)
    (tdir / "9.txt").write_text(texts[1] + "\n")  # same text after whitespace normalisation
    table = pa.table({"body": [texts[2], None, texts[4], texts[5], texts[4]]})
    pq.write_table(table, tmp_path / "p.parquet")
    res = run_quality([QualitySource("t", str(tdir), format="text"),
                       QualitySource("p", str(tmp_path / "p.parquet"), format="parquet", text_field="body")],
                      QualityConfig(exact=True, near_dup=None, workers=1, shards=2), tmp_path / "out")
    t, p = res.sources["t"], res.sources["p"]
    assert (t.documents, t.removed["exact_dup"].documents) == (5, 1)
    assert t.removed["exact_dup"].examples[0] == {"id": "t/4", "location": "9.txt", "duplicate_of": "t/1"}
    # parquet: a null is the empty document p/1 (as in the training stream, so indices agree); texts[2]
    # duplicates t/2 across sources; the second texts[4] duplicates p/2
    assert (p.documents, p.removed["exact_dup"].documents, p.kept_documents) == (5, 2, 3)
    assert {e["duplicate_of"] for e in p.removed["exact_dup"].examples} == {"t/2", "p/2"}
    kept = [json.loads(line)["text"] for f in sorted(res.outputs["p"].glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sorted(kept) == sorted(["", texts[4], texts[5]])
    assert res.banding is None


def test_documents_without_words_are_never_near_duplicates(tmp_path):
    # no \w word -> no shingle; every empty set has the same MinHash, so all of them used to collide in LSH
    texts = ["🙂🎉🚀 🙂🎉🚀", "-----", "→ ← ↑ ↓", "+++ !!! ???", "📈📉", "", "A real document with several words."]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + ["-----"]))  # one exact copy
    assert all(not words(t) for t in texts[:6])
    res = run_quality([QualitySource("d", str(data))], QualityConfig(exact=True, near_dup=NearDupConfig()),
                      tmp_path / "out")
    rep = res.sources["d"]
    assert rep.removed["near_dup"].documents == 0
    assert rep.removed["exact_dup"].documents == 1  # exact dedup still applies to them
    assert rep.removed["exact_dup"].examples[0] == {"id": "d/7", "location": "d.jsonl:8", "duplicate_of": "d/1"}
    assert rep.kept_documents == len(texts)


def _edit(w: list[str], k: int, rng: random.Random, vocab: list[str]) -> str:
    """``w`` with ``k`` words replaced, 10 apart: each changes 5 of the 96 word 5-grams, J = (96-5k)/(96+5k)."""
    w = list(w)
    for p in range(5, 5 + 10 * k, 10):
        w[p] = rng.choice([v for v in vocab if v not in w])
    return " ".join(w)


def test_near_dup_candidates_are_checked_against_the_threshold(tmp_path):
    # 112 bands of 1 row make nearly every pair that shares a shingle a candidate: without the check against
    # the threshold the J~0.59 copies go too; with it only the J~0.90 copies do (MinHash sd at 0.59 is 0.046)
    rng = random.Random(3)
    vocab = sorted(set(VOCAB))
    originals = [rng.sample(vocab, DOC_WORDS) for _ in range(20)]
    far = [_edit(w, 5, rng, vocab) for w in originals]
    close = [_edit(w, 1, rng, vocab) for w in originals]
    js_far = [_jaccard(" ".join(o), t) for o, t in zip(originals, far, strict=True)]
    js_close = [_jaccard(" ".join(o), t) for o, t in zip(originals, close, strict=True)]
    assert 0.55 < min(js_far) and max(js_far) < 0.62 and 0.88 < min(js_close) and max(js_close) < 0.92
    docs = [" ".join(w) for w in originals] + far + close
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    cfg = QualityConfig(exact=True, near_dup=NearDupConfig(threshold=0.75, bands=112, rows=1))
    res = run_quality([QualitySource("d", str(data))], cfg, tmp_path / "out")
    kept = {json.loads(line)["id"] for f in res.outputs["d"].glob("*.jsonl") for line in f.read_text().splitlines()}
    assert kept == {f"d/{i}" for i in range(40)}  # originals and the J~0.59 copies stay
    nd = res.sources["d"].removed["near_dup"]
    assert nd.documents == 20 and all(e["estimated_jaccard"] >= 0.75 for e in nd.examples)
    # the first document of a cluster is the one kept
    assert all(e["duplicate_of"] == f"d/{int(e['id'].split('/')[1]) - 40}" for e in nd.examples)
