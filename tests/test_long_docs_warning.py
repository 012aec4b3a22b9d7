"""prepare measures the documents' lengths in tokens (llmc.runtime.data_stats.LengthHistogram, bounded bins) and
warns (R012) when a stage that trains past its model's context (a long_context stage, or continued training at a
longer seq_len) reads documents much shorter than its seq_len: the shares it reports equal a count made here (each
document tokenised, + 1 EOS, as the trainers pack it); a stage with long documents, and a pre-training-only run,
get no warning; what the warning says follows the backend that runs the stage (torchtitan: positions restart at
every document; native / DeepSpeed: sequences packed from unrelated documents)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_quality_prepare_paths import ARCH  # noqa: E402

from llmc.runtime import data_stats  # noqa: E402
from llmc.runtime.data import SourceData  # noqa: E402
from llmc.runtime.data_stats import LengthHistogram  # noqa: E402
from llmc.runtime.tokenizer import TextTokenizer, train_bpe  # noqa: E402


def _share_above(lengths: list[int], cut: float) -> float:
    """The share of the tokens in documents longer than ``cut``, counted one document at a time."""
    return sum(n for n in lengths if n > cut) / sum(lengths)


# ----------------------------------------------------------------------------- the histogram


def test_histogram_counts_longer_than_exactly_at_its_edges_and_stays_bounded():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(4, 1.6)) + 1 for _ in range(20000)] + [1, 2, 33, 1024, 1025, 65537]
    h = LengthHistogram()
    for n in lengths:
        h.add(n)
    assert h.longest == max(lengths)
    assert sum(b[1] for b in h.bins.values()) == len(lengths) and sum(b[2] for b in h.bins.values()) == sum(lengths)
    # powers of two and 2^k (1 + j/16) are bin edges: exact
    for cut in (1, 16, 32, 48, 64, 256, 1024, 1536, 2048, 65536, 98304):
        assert h.share_above(cut) == pytest.approx(_share_above(lengths, cut), abs=1e-12), cut
    # any other length: within the tokens of the one bin it cuts
    for cut in (100, 300, 1000, 3000, 12345):
        lo, hi = LengthHistogram.bin_of(int(cut) + 1)
        in_bin = sum(n for n in lengths if lo < n <= hi) / sum(lengths)
        assert abs(h.share_above(cut) - _share_above(lengths, cut)) <= in_bin + 1e-12, cut
    # bounded: one bin per length up to 32, then at most 16 per octave
    octaves = max(lengths).bit_length()
    assert len(h.bins) <= data_stats.EXACT_LENGTHS + data_stats.LENGTH_BINS_PER_OCTAVE * octaves
    back = LengthHistogram.from_json(json.loads(json.dumps(h.to_json())))
    assert back.longest == h.longest and back.share_above(1024) == h.share_above(1024)


# ----------------------------------------------------------------------------- a source's lengths


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    rng = random.Random(1)
    d = tmp_path_factory.mktemp("tok")
    train_bpe([" ".join(f"w{rng.randrange(3000)}" for _ in range(50)) for _ in range(300)], 400, d)
    return TextTokenizer(d)


def _doc(rng: random.Random, words: int) -> str:
    return " ".join(f"w{rng.randrange(3000)}" for _ in range(words))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_counted_source_records_every_documents_length(tmp_path, tok, fmt):
    rng = random.Random(2)
    docs = [_doc(rng, rng.choice((rng.randrange(1, 30), rng.randrange(100, 400)))) for _ in range(300)]
    if fmt == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=40)
    lengths = [len(tok.encode(d)) + 1 for d in docs]  # the span each document takes in a packed sequence
    m = data_stats.measure_source(SourceData("a", str(path), fmt, "text"), tok)
    h = LengthHistogram.from_json(m.lengths)
    assert m.exact and not m.lengths["sampled"] and h.longest == max(lengths)
    for cut in (32, 64, 128, 256, 512):
        assert h.share_above(cut) == pytest.approx(_share_above(lengths, cut), abs=1e-12)
    # an estimate (a sample of windows) lands near the count
    est = data_stats.measure_source(SourceData("a", str(path), fmt, "text"), tok, exact_max_bytes=0)
    he = LengthHistogram.from_json(est.lengths)
    assert est.lengths["sampled"] and he.longest <= max(lengths)
    assert he.share_above(128) == pytest.approx(_share_above(lengths, 128), abs=0.1)


# ----------------------------------------------------------------------------- which stages, which backend


def _entries(*stages: dict) -> dict[str, dict]:
    return {s["name"]: s for s in stages}


def test_previous_context_and_backend_read_from_the_lock():
    pre = {"name": "pre", "kind": "pretrain", "seq_len": 128, "context": {"max_context": 256}}
    lc = {"name": "lc", "kind": "long_context", "seq_len": 2048, "init_from": "pre",
          "long_context": {"old_seq_len": 256}, "context": {"max_context": 2048}, "layout": {"cp": 1}}
    mid = {"name": "mid", "kind": "midtrain", "seq_len": 512, "init_from": "pre", "context": {"max_context": 256}}
    hf = {"name": "hf", "kind": "midtrain", "seq_len": 8192, "init_hf": "x", "context": {"max_context": 4096}}
    by = _entries(pre, lc, mid, hf)
    assert data_stats.previous_context(pre, by) is None  # nothing trained before pre-training
    assert data_stats.previous_context(lc, by) == 256  # the context it extends
    assert data_stats.previous_context(mid, by) == 128  # the seq_len of the stage it starts from
    assert data_stats.previous_context(hf, by) == 4096  # a Hugging Face start's context
    assert data_stats.stage_backend({"backend": {"name": "torchtitan"}}, lc) == "torchtitan"  # its own job
    assert data_stats.stage_backend({"backend": {"name": "torchtitan"}}, mid) == "native"  # no layout: llmc's
    assert data_stats.stage_backend({"backend": {"name": "deepspeed"}}, mid) == "deepspeed"
    assert data_stats.stage_backend({"backend": {"name": "native"}}, lc) == "native"


# ----------------------------------------------------------------------------- prepare, end to end


def _lock(root: Path, words: tuple[int, int], long_context: bool = True, backend: str | None = None) -> Path:
    """A tiny lock (the real compiler) over corpus/a.jsonl (200 documents of ``words`` words): pre-training at
    32 tokens (the model's context 64) and, with ``long_context``, a stage at 256 (YaRN x4)."""
    from test_build_fakes import lock_for

    rng = random.Random(0)
    (root / "corpus").mkdir(exist_ok=True)
    (root / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": _doc(rng, rng.randrange(*words))}) + "\n"
                                                     for _ in range(200)))
    src = [{"name": "web", "path": "corpus/a.jsonl"}]
    spec = {"name": "q", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": src, "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 1024},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3}}}
    if long_context:
        spec["stages"] = [{"name": "pretrain", "kind": "pretrain"},
                          {"name": "long", "kind": "long_context", "init_from": "pretrain", "seq_len": 256,
                           "steps": 2, "global_batch_tokens": 512,
                           "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position": 64},
                           "data": {"sources": src, "seq_len": 256, "tokens": 1024}}]
    lock = lock_for(spec, plan={"micro_batch": 8}, spec_path=str(root / "spec.yaml"))
    if backend == "torchtitan":  # a torchtitan build runs the stage as its own job (a searched layout)
        lock["backend"]["name"] = backend
        next(e for e in lock["stages"] if e["name"] == "long")["layout"] = {"cp": 1}
    (root / "plan.lock.json").write_text(json.dumps(lock))
    return root / "plan.lock.json"


def _prepare(lock: Path, capsys) -> list[str]:
    from llmc.runtime.entry import main

    assert main(["prepare", "--lock", str(lock)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if "warning[R012]" in ln]


def _lengths(root: Path) -> list[int]:
    tok = TextTokenizer(root / "assets")
    docs = [json.loads(ln)["text"] for ln in (root / "corpus" / "a.jsonl").read_text().splitlines()]
    return [len(tok.encode(d)) + 1 for d in docs]


def test_prepare_warns_once_for_a_long_context_stage_on_short_documents(tmp_path, capsys):
    lock = _lock(tmp_path, (3, 30))
    (warn,) = _prepare(lock, capsys)
    lengths = _lengths(tmp_path)
    assert max(lengths) < 128  # (the corpus: every document shorter than half the stage's seq_len)
    stats = json.loads((tmp_path / "assets" / "data_stats.json").read_text())
    (st,) = stats["stages"]
    assert (st["name"], st["seq_len"], st["previous_context"], st["backend"]) == ("long", 256, 64, "native")
    assert st["longest"] == max(lengths) and st["share_above_half_seq_len"] == 0
    assert st["share_above_previous"] == pytest.approx(_share_above(lengths, 64), abs=1e-12)
    assert st["documents_per_sequence"] == pytest.approx(256 * len(lengths) / sum(lengths))
    assert warn.startswith(f"{tmp_path / 'assets' / 'data_stats.json'}: warning[R012] stage 'long' trains at "
                           "seq_len 256, past the 64-token context before it")
    assert f"the longest holds {max(lengths):,} tokens" in warn and "(hint:" in warn
    assert f"packed from ~{st['documents_per_sequence']:.0f} unrelated documents" in warn
    assert stats["sources"][0]["lengths"]["longest"] == max(lengths)
    # the same again (nothing measured anew): the warning again, once
    assert len(_prepare(lock, capsys)) == 1
    # the stage on torchtitan: what it means there
    (warn,) = _prepare(_lock(tmp_path, (3, 30), backend="torchtitan"), capsys)
    assert f"no position above {max(lengths):,} is ever trained" in warn


def test_no_warning_with_long_documents_or_without_a_longer_stage(tmp_path, capsys):
    assert _prepare(_lock(tmp_path, (150, 300)), capsys) == []
    lengths = _lengths(tmp_path)
    (st,) = json.loads((tmp_path / "assets" / "data_stats.json").read_text())["stages"]
    assert st["warning"] is None
    assert st["share_above_half_seq_len"] == pytest.approx(_share_above(lengths, 128), abs=1e-12)
    assert st["share_above_half_seq_len"] >= data_stats.LONG_DOC_MIN_SHARE
    # pre-training only (short documents): no stage trains past a context before it
    assert _prepare(_lock(tmp_path, (3, 30), long_context=False), capsys) == []
    assert json.loads((tmp_path / "assets" / "data_stats.json").read_text())["stages"] == []
