"""prepare measures each training text source (llmc.runtime.data_stats): the exact count of a small source equals
a count made here (every document tokenised, + 1 EOS each, as the trainers pack), the held-out part aside; the
estimate of a large one, from windows spread over it, lands within its stated error of the exact count on a corpus
sorted short to long, where a sample of its head would not; a source the run reads more than the plan's epoch limit,
or whose declared tokens are 10x what it holds, gets a warning line (never a failure); unchanged inputs are not
measured again."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_quality_prepare_paths import ARCH  # noqa: E402

from llmc.runtime import data_stats  # noqa: E402
from llmc.runtime.data import SourceData  # noqa: E402
from llmc.runtime.tokenizer import TextTokenizer, train_bpe  # noqa: E402
from llmc.runtime.validation import is_heldout  # noqa: E402

WORDS = "the of and to in is was for on that with as by at from his her they which this".split()


def _short(rng: random.Random) -> str:  # rare character soup: many tokens per byte
    return " ".join("".join(rng.choice("qxzjkvwy0123456789") for _ in range(rng.randrange(2, 6)))
                    for _ in range(rng.randrange(2, 8)))


def _long(rng: random.Random) -> str:  # common words: few tokens per byte
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(300, 700)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("tok")
    train_bpe([_short(rng) for _ in range(300)] + [_long(rng) for _ in range(100)], 400, d)
    return TextTokenizer(d)


def _count(tok: TextTokenizer, docs: list[str], keep=lambda i: True) -> tuple[int, int]:
    """(documents, tokens + 1 EOS each) of the kept documents, counted one by one."""
    kept = [d for i, d in enumerate(docs) if keep(i)]
    return len(kept), sum(len(tok.encode(d)) + 1 for d in kept)


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_short(rng) if rng.random() < 0.5 else _long(rng)[: rng.randrange(10, 400)] for _ in range(n)] + [""]


def _write(tmp: Path, fmt: str, docs: list[str]) -> Path:
    """The documents as a jsonl folder (two files), text files (one per document) or a parquet file."""
    if fmt == "jsonl":
        (tmp / "j").mkdir()
        half = len(docs) // 2
        for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
            (tmp / "j" / name).write_text("".join(json.dumps({"text": d}) + "\n\n" for d in part))
        return tmp / "j"
    if fmt == "text":
        (tmp / "t").mkdir()
        for i, d in enumerate(docs):
            (tmp / "t" / f"{i:04d}.txt").write_text(d)
        return tmp / "t"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), tmp / "p.parquet", row_group_size=17)
    return tmp / "p.parquet"


@pytest.mark.parametrize("fmt", ["jsonl", "text", "parquet"])
def test_exact_count_is_every_document_tokenised_plus_one_eos(tmp_path, tok, fmt):
    docs = _docs(120, seed=2)
    src = SourceData("s", str(_write(tmp_path, fmt, docs)), fmt, "text")
    m = data_stats.measure_source(src, tok)
    assert m.exact and m.rel_error == 0
    assert (m.documents, m.tokens) == (m.source_documents, m.source_tokens) == _count(tok, docs)
    # with a held-out split the run reads the training part: every document the hash does not hold out
    held = data_stats.measure_source(replace(src, holdout=("train", 0.3, 5)), tok)
    assert (held.documents, held.tokens) == _count(tok, docs, lambda i: not is_heldout("s", i, 5, 0.3))
    assert (held.source_documents, held.source_tokens) == _count(tok, docs)
    assert 0 < held.tokens < m.tokens


def _sorted_corpus(n_short: int, n_long: int) -> list[str]:
    rng = random.Random(3)
    return sorted([_short(rng) for _ in range(n_short)] + [_long(rng) for _ in range(n_long)], key=len)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_estimate_is_within_its_error_and_spread_over_a_sorted_corpus(tmp_path, tok, fmt, monkeypatch):
    docs = _sorted_corpus(3000, 250)  # short documents first (~8% of the bytes), long ones last
    path = tmp_path / "c.jsonl"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=200)
    chunks = 32 if fmt == "jsonl" else 64  # ~10% of the bytes, ~16% of the rows
    monkeypatch.setattr(data_stats, "SAMPLE_CHUNKS", chunks)
    monkeypatch.setattr(data_stats, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(data_stats, "CHUNK_ROWS", 8)
    src = SourceData("c", str(path), fmt, "text")
    exact = data_stats.measure_source(src, tok)
    est = data_stats.measure_source(src, tok, exact_max_bytes=0)
    n_docs, n_tokens = _count(tok, docs)
    assert exact.exact and (exact.documents, exact.tokens) == (n_docs, n_tokens)
    assert not est.exact and est.samples == chunks and 0 < est.rel_error < 0.25
    bound = data_stats.ERROR_SIGMAS * est.rel_error * n_tokens
    assert abs(est.tokens - n_tokens) <= bound, (est.tokens, n_tokens, est.rel_error)
    assert abs(est.documents - n_docs) <= 0.25 * n_docs
    # the same amount of data taken from the head only (the first documents): far outside that error
    if fmt == "jsonl":
        head, size, total = [], 0, path.stat().st_size
        for d in docs:
            if size >= est.sample_bytes:
                break
            head.append(d)
            size += len((json.dumps({"text": d}) + "\n").encode())
        head_estimate = _count(tok, head)[1] / size * total
    else:
        head = docs[: chunks * 8]
        head_estimate = _count(tok, head)[1] / len(head) * len(docs)
    assert abs(head_estimate - n_tokens) > 3 * bound, (head_estimate, n_tokens, bound)
    # and a held-out split keeps the expected share of the estimate
    held = data_stats.measure_source(replace(src, holdout=("train", 0.2, 0)), tok, exact_max_bytes=0)
    assert held.tokens == pytest.approx(0.8 * est.tokens) and held.source_tokens == est.tokens


def test_sample_points_are_spread_in_every_prefix():
    pts = data_stats.sample_points(64)
    assert sorted(pts) == [(j + 0.5) / 64 for j in range(64)]
    for k in (2, 4, 8, 16):  # the first k points: one in each k-th of the source
        assert sorted(int(p * k) for p in pts[:k]) == list(range(k))


# ----------------------------------------------------------------------------- prepare: the run's epochs, warnings


def _lock(root: Path, tokens: float, declared: float | None, weight2: float | None = None) -> Path:
    """A tiny lock (as tests/test_quality_prepare_paths.py `_build`) over corpus/a.jsonl (source 'web', 10% held
    out), optionally with a second source and a declared token count."""
    from test_build_fakes import lock_for

    web = {"name": "web", "path": "corpus/a.jsonl"} | ({"tokens": declared} if declared is not None else {})
    sources = [web] + ([{"name": "more", "path": "corpus/b.jsonl", "weight": weight2}] if weight2 else [])
    spec = {"name": "q", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": sources, "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32,
                     "tokens": tokens},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}},
            "eval": {"validation": {"fraction": 0.1, "seed": 0, "every_steps": 2, "max_batches": 1}}}
    lock = lock_for(spec, plan={"micro_batch": 8}, spec_path=str(root / "spec.yaml"))
    (root / "plan.lock.json").write_text(json.dumps(lock))
    return root / "plan.lock.json"


def _corpus(root: Path) -> dict[str, list[str]]:
    rng = random.Random(0)
    out = {}
    for name, n in (("a", 80), ("b", 40)):
        docs = [" ".join(f"w{rng.randrange(3000)}" for _ in range(40)) for _ in range(n)]
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        out[name] = docs
    return out


def _prepare(lock: Path, capsys) -> tuple[str, list[str]]:
    from llmc.runtime.entry import main

    assert main(["prepare", "--lock", str(lock)]) == 0
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return cap.out, [ln for ln in cap.err.splitlines() if "warning[" in ln]


def test_prepare_warns_about_repeated_epochs_and_a_wrong_declaration(tmp_path, capsys):
    docs = _corpus(tmp_path)["a"]
    _prepare(_lock(tmp_path, 1024, None), capsys)  # trains the tokenizer
    tok = TextTokenizer(tmp_path / "assets")
    train_docs, train_tokens = _count(tok, docs, lambda i: not is_heldout("web", i, 0, 0.1))
    whole = _count(tok, docs)[1]

    # the run reads 'web' 8 times, and its declaration is 10x what it holds
    lock = _lock(tmp_path, 8 * train_tokens, 10 * whole)
    out, warns = _prepare(lock, capsys)
    assert len(warns) == 2, warns
    assert all(w.startswith(f"{tmp_path / 'assets' / 'data_stats.json'}: warning[R011] data source 'web'")
               for w in warns)
    assert "reads it 8.0 times" in warns[1] and "(hint:" in warns[1]
    assert "declares" in warns[0] and "10x" in warns[0]
    line = next(ln for ln in out.splitlines() if ln.startswith("prepare: data web:"))
    assert f"{train_docs:,} documents (counted)" in line and "8.00 epochs" in line
    stats = json.loads((tmp_path / "assets" / "data_stats.json").read_text())
    (web,) = stats["sources"]
    assert (web["documents"], web["tokens"], web["source_tokens"]) == (train_docs, train_tokens, whole)
    assert web["drawn"] == 8 * train_tokens and web["epochs"] == pytest.approx(8.0)
    assert web["declared"] == 10 * whole and web["exact"] is True

    # a stage's own prepare (after the launch's prepare step said it) measures nothing and warns nothing
    from llmc.runtime.entry import _prepare_collective
    from llmc.runtime.job import TrainJob

    before = (tmp_path / "assets" / "data_stats.json").read_bytes()
    _prepare_collective(TrainJob.from_lock(json.loads(lock.read_text()), None, build_dir=tmp_path), tmp_path)
    cap = capsys.readouterr()
    assert "warning[R011]" not in cap.err and "prepare: data" not in cap.out
    assert (tmp_path / "assets" / "data_stats.json").read_bytes() == before

    # a correct declaration and 2 epochs: no warning
    out, warns = _prepare(_lock(tmp_path, 2 * train_tokens, whole), capsys)
    assert warns == [] and "2.00 epochs" in out


def test_prepare_shares_the_draw_by_weight_and_does_not_measure_twice(tmp_path, capsys, monkeypatch):
    corpus = _corpus(tmp_path)
    lock = _lock(tmp_path, 3000, None, weight2=3.0)  # web draws 1/4 of 3000 tokens, more 3/4
    out, warns = _prepare(lock, capsys)
    assert warns == [] and "prepare: data web:" in out and "prepare: data more:" in out
    tok = TextTokenizer(tmp_path / "assets")
    stats = {s["name"]: s for s in json.loads((tmp_path / "assets" / "data_stats.json").read_text())["sources"]}
    for name, f, share in (("web", "a", 0.25), ("more", "b", 0.75)):
        tokens = _count(tok, corpus[f], lambda i, n=name: not is_heldout(n, i, 0, 0.1))[1]
        assert stats[name]["tokens"] == tokens and stats[name]["drawn"] == pytest.approx(3000 * share)
        assert stats[name]["epochs"] == pytest.approx(3000 * share / tokens)

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(data_stats, "measure_source", refuse)
    out, warns = _prepare(lock, capsys)  # nothing changed: nothing measured
    assert warns == [] and "prepare: data statistics unchanged" in out and "prepare: data web:" not in out
    # a changed source is measured again (both here: the tokenizer, trained on both, changes with it); a
    # measurement that fails is a warning, and prepare still succeeds
    with open(tmp_path / "corpus" / "a.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    out, warns = _prepare(lock, capsys)
    assert [w.split("warning[R011] ")[1].split(": could not measure it:")[0] for w in warns] == [
        "data source 'web'", "data source 'more'"], warns
