"""Streamed sharded data (llmc.runtime.stream): parquet / jsonl / text / local HF datasets read in place,
ranks disjoint, every document once per epoch, EOS packing across epochs, mixture weights, exact resume,
bounded memory and no copies on disk."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
torch = pytest.importorskip("torch")

from llmc.runtime.stream import SourceRef, StreamingMixture, documents  # noqa: E402

EOS = 0


def doc_text(src: int, i: int) -> str:
    return f"{src}:{i} " + "lorem ipsum " * (i % 5)


def tokenize(text: str) -> list[int]:
    """Doc ``s:i`` -> its id ``1000*s + i + 1`` repeated 1 + i%5 times (so packing is visible)."""
    head = text.split(" ", 1)[0]
    s, i = (int(x) for x in head.split(":"))
    return [1000 * s + i + 1] * (1 + i % 5)


def write_parquet(d: Path, src: int, n: int, files: int = 2, row_group: int = 7) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    per = math.ceil(n / files)
    for f in range(files):
        ids = range(f * per, min(n, (f + 1) * per))
        table = pa.table({"id": list(ids), "text": [doc_text(src, i) for i in ids]})
        pq.write_table(table, d / f"part-{f:03d}.parquet", row_group_size=row_group)
    return d


def write_jsonl(d: Path, src: int, n: int, files: int = 2, blank: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    per = math.ceil(n / files)
    for f in range(files):
        with open(d / f"part-{f}.jsonl", "w") as fh:
            for i in range(f * per, min(n, (f + 1) * per)):
                fh.write(json.dumps({"content": doc_text(src, i)}) + "\n")
                if blank and i % 11 == 0:
                    fh.write("\n")  # blank lines are not documents
    return d


def write_hf_disk(d: Path, src: int, n: int) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [doc_text(src, i) for i in range(n)]})
    ds.save_to_disk(str(d), num_shards=3)
    return d


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Any cache the datasets library writes goes under tmp (checked for size by the tests)."""
    datasets = pytest.importorskip("datasets")
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def make_source(kind: str, root: Path, src: int, n: int, weight: float = 1.0) -> SourceRef:
    name = f"{kind}{src}"
    if kind == "parquet":
        return SourceRef(name, str(write_parquet(root / name, src, n)), "parquet", "text", weight)
    if kind == "jsonl":
        return SourceRef(name, str(write_jsonl(root / name, src, n)), "jsonl", "content", weight)
    if kind == "hf_disk":
        return SourceRef(name, str(write_hf_disk(root / name, src, n)), "hf", "text", weight)
    if kind == "hf_files":
        return SourceRef(name, str(write_parquet(root / name, src, n, files=4)), "hf", "text", weight)
    if kind == "hf_jsonl":
        return SourceRef(name, str(write_jsonl(root / name, src, n, blank=False)), "hf", "content", weight)
    if kind == "text":
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i:05d}.txt").write_text(doc_text(src, i))
        return SourceRef(name, str(d), "text", "text", weight)
    raise AssertionError(kind)


KINDS = ["parquet", "jsonl", "text", "hf_disk", "hf_files", "hf_jsonl"]


def doc_ids(docs) -> list[int]:
    return [int(d.split(" ", 1)[0].split(":")[1]) for d in docs]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_disjoint_and_cover_every_document_once(kind, tmp_path, hf_cache):
    n = 101
    src = make_source(kind, tmp_path, 1, n)
    per_rank = [doc_ids(documents(src, r, 2)) for r in range(2)]
    for ids in per_rank:
        assert len(ids) == len(set(ids)), "a document repeated within one epoch"
    assert not set(per_rank[0]) & set(per_rank[1]), "ranks overlap"
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))
    assert min(len(x) for x in per_rank) > 0
    # resuming the document reader at position k gives the tail of the same order
    assert doc_ids(documents(src, 1, 2, start=17)) == per_rank[1][17:]


def with_holdout(src: SourceRef, part: str, fraction: float = 0.2, seed: int = 7):
    from llmc.runtime.data import SourceData

    return SourceData(src.name, src.path, src.format, src.text_field, src.weight, (part, fraction, seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_heldout_split_while_streaming_partitions_by_document_index(kind, world, tmp_path, hf_cache):
    """Document i of the source (its index in the unsplit order, computed here independently: doc_text
    numbers the documents) is validation iff is_heldout(name, i); training ranks read exactly the rest."""
    from llmc.runtime.validation import is_heldout

    n = 101
    src = make_source(kind, tmp_path, 1, n)
    train, val = with_holdout(src, "train"), with_holdout(src, "val")
    want_val = [i for i in range(n) if is_heldout(src.name, i, 7, 0.2)]
    assert 5 <= len(want_val) <= 40
    assert doc_ids(documents(val)) == want_val  # in source order
    per_rank = [doc_ids(documents(train, r, world)) for r in range(world)]
    flat = [i for ids in per_rank for i in ids]
    assert len(flat) == len(set(flat)) and sorted(flat) == sorted(set(range(n)) - set(want_val))
    # resume counts this part's documents: position k gives the tail of the same order
    assert doc_ids(documents(train, world - 1, world, start=9)) == per_rank[-1][9:]
    assert doc_ids(documents(val, 0, 1, start=3)) == want_val[3:]


def test_heldout_training_stream_never_yields_a_validation_token(tmp_path):
    from llmc.runtime.validation import is_heldout

    srcs = [with_holdout(make_source(k, tmp_path, s + 1, 60), "train") for s, k in enumerate(("parquet", "jsonl"))]
    m = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=0, world=1, seed=1)
    seen = {int(t) for _ in range(200) for t in m.next_window() if int(t) != EOS}
    held = {1000 * (s + 1) + i + 1 for s, src in enumerate(srcs) for i in range(60) if is_heldout(src.name, i, 7, 0.2)}
    assert held and not seen & held
    assert min(m.epochs().values()) >= 1  # the whole training part was read


def test_parquet_with_fewer_row_groups_than_ranks_deals_rows(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    pq.write_table(pa.table({"text": [doc_text(1, i) for i in range(20)]}), d / "a.parquet")  # 1 row group
    src = SourceRef("one", str(d), "parquet")
    ranks = [doc_ids(documents(src, r, 3)) for r in range(3)]
    assert ranks == [list(range(r, 20, 3)) for r in range(3)]
    assert doc_ids(documents(src, 2, 3, start=2)) == ranks[2][2:]


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "hf_disk"])
def test_windows_are_the_eos_packed_stream_across_epochs(kind, tmp_path, hf_cache):
    """Concatenated window inputs == tokenize(doc) + EOS over this rank's docs, epoch after epoch."""
    seq_len = 9
    src = make_source(kind, tmp_path, 2, 40)
    for rank in range(2):
        expected: list[int] = []
        docs = list(documents(src, rank, 2))
        for _ in range(3):
            for d in docs:
                expected += tokenize(d) + [EOS]
        m = StreamingMixture([src], tokenize, EOS, seq_len, rank=rank, world=2, seed=3)
        got: list[int] = []
        prev = None
        while len(got) + seq_len + 1 <= 2 * len(expected) // 3:
            w = m.next_window()
            assert w.shape == (seq_len + 1,) and w.dtype == torch.int64
            if prev is not None:
                assert int(prev[-1]) == int(w[0])  # stride seq_len: last label = next first input
            got += w[:-1].tolist()
            prev = w
        assert got == expected[:len(got)]
        assert m.epochs()[src.name] == 1  # crossed into the second pass; nothing dropped at the seam


def test_mixture_weights_within_three_sigma(tmp_path):
    weights = [0.5, 0.3, 0.2]
    srcs = [make_source("jsonl", tmp_path, s + 1, 60, w) for s, w in enumerate(weights)]
    m = StreamingMixture(srcs, tokenize, EOS, seq_len=4, rank=1, world=2, seed=11)
    n = 3000
    counts = [0, 0, 0]
    for _ in range(n):
        w = m.next_window()
        counts[m.last_source] += 1
        owner = {int(t) // 1000 for t in w.tolist() if t != EOS}
        assert owner == {m.last_source + 1}, "a window mixes tokens from another source"
    for c, p in zip(counts, weights, strict=True):
        assert abs(c - n * p) <= 3 * math.sqrt(n * p * (1 - p)), (counts, weights)


def test_parquet_row_groups_are_dealt_so_ranks_hold_about_as_many_rows(tmp_path):
    """20 files of 157 rows in row groups of 50, 50, 50 and 7 over 16 ranks: dealt i % 16, every 4th group is a 7-row
    tail and all of them land on ranks 3, 7, 11, 15 (35 rows there, 250 elsewhere: those shards wrap about 7 times
    while others are read once). Balanced, ranks differ by at most one group (50 rows); every row is still read
    exactly once over the ranks, each rank's groups in source order; a saved state without the dealing key (written
    before it) resumes the shard it counted in."""
    from llmc.runtime.stream import deal_row_groups

    d = tmp_path / "pq"
    write_parquet(d, 1, 20 * 157, files=20, row_group=50)
    src = SourceRef("pq", str(d), "parquet")
    world = 16
    ranks = [doc_ids(documents(src, r, world)) for r in range(world)]
    sizes = [len(x) for x in ranks]
    assert max(sizes) - min(sizes) <= 50 and sum(sizes) == 20 * 157, sizes
    assert sorted(i for x in ranks for i in x) == list(range(20 * 157))
    assert all(x == sorted(x) for x in ranks)
    strided = [len(doc_ids(documents(src, r, world, balanced=False))) for r in range(world)]
    assert sorted(set(strided)) == [35, 250]  # what i % w gave
    # the dealing itself against a brute-force check: no move of one group from the fullest rank helps (LPT bound)
    rows = [50, 50, 50, 7] * 20
    dealt = deal_row_groups(rows, world)
    loads = [sum(rows[i] for i in x) for x in dealt]
    assert max(loads) - min(loads) <= max(rows) and sorted(i for x in dealt for i in x) == list(range(80))
    # an old state (no "dealing") resumes in i % w order, a new one in the balanced order
    srcs = [src]
    m = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=3, world=world, seed=5)
    for _ in range(5):
        m.next_window()
    state = json.loads(json.dumps(m.state_dict()))
    assert state["sources"][0]["dealing"] == "balanced"
    old = dict(state, sources=[{k: v for k, v in state["sources"][0].items() if k != "dealing"}])
    r = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=3, world=world, seed=5)
    r.load_state_dict(old)
    assert r.streams[0].balanced is False and not r.state_dict()["sources"][0]["dealing"] == "balanced"


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kinds", [("parquet", "jsonl"), ("hf_disk", "text")])
def test_resume_from_state_dict_is_the_exact_continuation(kinds, split, tmp_path, hf_cache):
    srcs = [make_source(k, tmp_path, s + 1, 53, w) for s, (k, w) in enumerate(zip(kinds, (0.6, 0.4), strict=True))]
    if split:  # training part of a held-out split: positions count its documents
        srcs = [with_holdout(s, "train") for s in srcs]
    ref = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=1, world=2, seed=5)
    head = [ref.next_window() for _ in range(61)]  # > one epoch of each rank's shard
    state = json.loads(json.dumps(ref.state_dict()))  # it must survive a JSON checkpoint
    tail = [ref.next_window() for _ in range(45)]
    assert min(ref.epochs().values()) >= 1

    resumed = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=1, world=2, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(tail, (resumed.next_window() for _ in tail), strict=True))

    fresh = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=1, world=2, seed=5)  # deterministic
    assert all(torch.equal(a, fresh.next_window()) for a in head)
    other = StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=0, world=2, seed=5)
    assert not all(torch.equal(a, other.next_window()) for a in head)
    with pytest.raises(ValueError, match="world"):
        StreamingMixture(srcs, tokenize, EOS, seq_len=7, rank=1, world=4, seed=5).load_state_dict(state)


def test_next_batch_shapes(tmp_path):
    src = make_source("parquet", tmp_path, 1, 30)
    x, y = StreamingMixture([src], tokenize, EOS, seq_len=6).next_batch(3)
    assert x.shape == y.shape == (3, 6)
    assert torch.equal(x[:, 1:], y[:, :-1])


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kind", ["parquet", "hf_disk", "hf_files"])
def test_streams_in_place_with_bounded_memory(kind, split, tmp_path, hf_cache):
    """~24 MB of text streamed through one epoch (alone, or as the training part of a held-out split):
    Python peak stays a small fraction, nothing copied."""
    n, size = 6000, 4000
    datasets = pytest.importorskip("datasets") if kind.startswith("hf") else None
    d = tmp_path / kind
    texts = (f"1:{i} " + "x" * size for i in range(n))
    if kind == "hf_disk":
        datasets.Dataset.from_dict({"text": list(texts)}).save_to_disk(str(d), num_shards=4)
    else:
        d.mkdir()
        rows = list(texts)
        for f in range(4):
            pq.write_table(pa.table({"text": rows[f::4]}), d / f"p{f}.parquet", row_group_size=250)
        del rows
    data_bytes = n * size
    src = SourceRef("big", str(d), "hf" if kind.startswith("hf") else "parquet", "text")
    if split:
        src = with_holdout(src, "train", fraction=0.05)
    before_disk = _tree_bytes(tmp_path)
    pool_base = pool_peak = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        m = StreamingMixture([src], lambda s: [len(s) % 997 + 1], EOS, seq_len=32, rank=0, world=2)
        windows = 0
        while m.epochs()["big"] == 0:
            m.next_window()
            windows += 1
            pool_peak = max(pool_peak, pa.total_allocated_bytes())
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    docs = n // 2 * (0.95 if split else 1)  # half the docs (less the held-out ones), 2 tokens each, 32 per window
    assert windows >= docs * 0.95 * 2 // 32 - 1
    assert py_peak < data_bytes / 8, f"python peak {py_peak / 2**20:.1f} MiB for {data_bytes / 2**20:.0f} MiB data"
    # the datasets parquet builder holds about one file's batch; a whole copy would be >= data_bytes
    assert pool_peak - pool_base < data_bytes / 2, f"arrow pool peak {(pool_peak - pool_base) / 2**20:.1f} MiB"
    grown = _tree_bytes(tmp_path) - before_disk
    assert grown < 1 << 20, f"{grown} bytes written to disk while streaming"


@pytest.mark.parametrize("kind", ["jsonl", "text", "parquet", "hf_disk"])
def test_a_source_with_fewer_documents_than_ranks_is_read_whole_by_every_rank(kind, tmp_path, hf_cache):
    """3 documents dealt over 8 ranks (a global batch's sequence slots) left 5 ranks without documents and the run
    stopped ("rank 5 of 8 has no documents"): such a rank now reads the whole source, from document rank mod 3 on,
    round again, packed with EOS as ever -- the stream built here by hand from the documents -- and resumes exactly;
    ranks 0-2 read their own document (document r), as before."""
    src = make_source(kind, tmp_path, 1, 3)
    docs = [tokenize(d) for d in documents(src)]
    assert len(docs) == 3
    seq, n_win = 4, 6
    for rank in range(8):
        stream = []
        for k in range(n_win * seq + 1):  # enough documents (each at least one token + EOS)
            stream += docs[rank if rank < 3 else (rank + k) % 3] + [EOS]
        want = [stream[i * seq: i * seq + seq + 1] for i in range(n_win)]
        m = StreamingMixture([src], tokenize, EOS, seq, rank=rank, world=8)
        got = [m.next_window().tolist() for _ in range(n_win)]
        assert got == want, rank
    # resume mid-epoch: the continuation is the uninterrupted run's
    a = StreamingMixture([src], tokenize, EOS, seq, rank=5, world=8)
    for _ in range(2):
        a.next_window()
    state = json.loads(json.dumps(a.state_dict()))
    b = StreamingMixture([src], tokenize, EOS, seq, rank=5, world=8)
    b.load_state_dict(state)
    assert [b.next_window().tolist() for _ in range(5)] == [a.next_window().tolist() for _ in range(5)]
    # as many documents as ranks: sharded as before (rank r reads its own document only)
    m = StreamingMixture([src], tokenize, EOS, seq, rank=2, world=3)
    assert set(sum((m.next_window().tolist() for _ in range(4)), [])) <= set(docs[2]) | {EOS}


def test_bad_inputs_are_clear(tmp_path):
    src = make_source("parquet", tmp_path, 1, 3)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no documents: nothing to train on") as e:
        StreamingMixture([SourceRef("t", str(empty), "jsonl")], tokenize, EOS, 4, rank=1, world=2).next_window()
    assert str(empty) in str(e.value)
    with pytest.raises(ValueError, match="not streamable"):
        list(documents(SourceRef("x", src.path, "csv")))
    with pytest.raises(KeyError, match="no column"):
        list(documents(SourceRef("x", src.path, "parquet", "body")))


def test_with_llmc_bpe_tokenizer_windows_decode_to_the_documents(tmp_path):
    pytest.importorskip("tokenizers")
    from llmc.runtime.data import SourceData
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe

    texts = [f"document number {i}: " + "the quick brown fox " * (1 + i % 3) for i in range(30)]
    tok = TextTokenizer(train_bpe(texts, 300, tmp_path / "tok"))
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    src = SourceData("docs", str(d), "jsonl", "text", 1.0)  # a SourceRef (with an optional held-out split)
    m = StreamingMixture([src], tok.encode, tok.eos_id, seq_len=16, rank=0, world=1)
    ids: list[int] = []
    while m.epochs()["docs"] == 0:
        ids += m.next_window()[:-1].tolist()
    n_eos = ids.count(tok.eos_id)
    assert n_eos >= 29
    decoded = tok.decode(ids).split("<|end_of_text|>")
    assert decoded[:29] == texts[:29]


def _both_readers(path: Path, fmt: str, field: str = "text") -> dict[str, list[str]]:
    """The documents of one source by the quality pass's reader and by the training stream's."""
    from llmc.sources import iter_documents

    return {"sources": [t for _, _, t in iter_documents(path, fmt, field)],
            "stream": list(documents(SourceRef("s", str(path), fmt, field)))}


def test_readers_hand_out_valid_unicode_and_null_is_an_empty_document(tmp_path, hf_cache):
    datasets = pytest.importorskip("datasets")
    # written byte for byte: a BOM, a lone surrogate escape (an emoji cut in half), a valid pair, a null
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "cut \\ud83d emoji"}\n'
                                       b'{"text": "pair \\ud83d\\ude00 ok"}\n{"text": null}\n\n{"text": "last"}\n')
    want = ["first", "cut \ufffd emoji", "pair \U0001F600 ok", "", "last"]
    for label, docs in _both_readers(tmp_path / "a.jsonl", "jsonl").items():
        assert docs == want, label
        for d in docs:
            d.encode("utf-8")  # what every tokenizer / writer does; a lone surrogate raises here
    # parquet and HF: a null row is the empty document too, so document indices agree in every reader
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"text": ["a", None, "c"]}).save_to_disk(str(tmp_path / "hf"))
    for path, fmt in ((tmp_path / "p.parquet", "parquet"), (tmp_path / "hf", "hf")):
        assert _both_readers(path, fmt) == {"sources": ["a", "", "c"], "stream": ["a", "", "c"]}, fmt
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfplain text")
    assert _both_readers(tmp_path / "t.txt", "text") == {"sources": ["plain text"], "stream": ["plain text"]}


@pytest.mark.parametrize("case", ["number", "array", "bad_json", "not_utf8", "not_object"])
def test_reader_errors_name_the_file_and_line(case, tmp_path):
    good = '{"text": "fine"}\n\n'  # a blank line: the bad record is on file line 3
    bad = {"number": '{"text": 42}', "array": '{"text": ["x", "y"]}', "bad_json": '{"text": "b",}',
           "not_utf8": '{"text": "caf\udce9"}', "not_object": '"just a string"'}[case]
    f = tmp_path / "a.jsonl"
    f.write_bytes((good + bad + "\n").encode("utf-8", "surrogateescape"))
    hint = {"number": "is a number, not a string", "array": "is an array, not a string",
            "bad_json": "invalid JSON", "not_utf8": "not valid UTF-8", "not_object": "a string, not a JSON object"}[case]
    from llmc.sources import iter_documents

    for read in (lambda: list(iter_documents(f, "jsonl")), lambda: list(documents(SourceRef("s", str(f), "jsonl")))):
        with pytest.raises(ValueError) as e:  # entry.py reports ValueError as one line (R002)
            read()
        msg = str(e.value)
        assert msg.startswith(f"{f}:3: ") and hint in msg and "\n" not in msg, msg


@pytest.mark.parametrize("field,err,hint", [("text", KeyError, "no column 'text'"),
                                             ("n", ValueError, "holds int64, not strings")])
def test_parquet_column_errors_are_located_in_every_reader(field, err, hint, tmp_path):
    from llmc.sources import iter_documents

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": ["a"], "n": [1]}), f)
    for read in (lambda: list(iter_documents(f, "parquet", field)),
                 lambda: list(documents(SourceRef("s", str(f), "parquet", field)))):
        with pytest.raises(err, match=hint) as e:
            read()
        assert str(f) in str(e.value)
