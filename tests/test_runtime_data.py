"""Offline corpus, BPE tokenizer (HF/torchtitan-loadable), token cache and the packed loader:
formats, EOS packing, exact mixture, DP sharding, exact resume."""

from __future__ import annotations

import json

import pytest

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

from llmc.runtime import corpus  # noqa: E402
from llmc.runtime.data import SourceData, load_tokens, read_documents, tokenize_source  # noqa: E402
from llmc.runtime.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe  # noqa: E402


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    docs = [r["text"] for r, _ in zip(corpus.iter_docstrings(), range(400), strict=False)]
    return train_bpe(docs, 512, d / "assets")


def test_corpus_is_deterministic_and_offline(tmp_path):
    a = corpus.write_corpus(tmp_path / "a.jsonl", max_docs=60)
    corpus.write_corpus(tmp_path / "b.jsonl", max_docs=60)
    assert a["docs"] == 60
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    recs = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert all(len(r["text"]) >= 40 and r["source"] for r in recs)


def test_tokenizer_specials_roundtrip_and_config(tok_dir):
    tk = TextTokenizer(tok_dir)
    assert [tk.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tk.bos_id, tk.eos_id, tk.pad_id) == (0, 1, 2)
    assert 300 < tk.vocab_size <= 512
    text = "Return the absolute value of x; ünïcode ✓ too."
    ids = tk.encode(text, bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1
    assert tk.decode(ids[1:-1]) == text  # byte-level: lossless
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|begin_of_text|>" and cfg["eos_token"] == "<|end_of_text|>"


def test_tokenizer_loads_in_torchtitan(tok_dir):
    tt = pytest.importorskip("torchtitan.components.tokenizer")
    t = tt.HuggingFaceTokenizer(tokenizer_path=str(tok_dir))
    assert (t.bos_id, t.eos_id) == (0, 1)
    assert t.encode("hello world", add_bos=True, add_eos=True)[1:-1] == TextTokenizer(tok_dir).encode("hello world")


def test_read_documents_text_jsonl_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "b.txt").write_text("second")
    (tmp_path / "t" / "a.txt").write_text("first")
    (tmp_path / "d.jsonl").write_text('{"body": "x1"}\n\n{"body": "x2"}\n')
    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "d.parquet")
    assert list(read_documents(tmp_path / "t", "text")) == ["first", "second"]
    assert list(read_documents(tmp_path / "d.jsonl", "jsonl", "body")) == ["x1", "x2"]
    assert list(read_documents(tmp_path / "d.parquet", "parquet", "content")) == ["p1", "", "p2"]  # null: empty
    with pytest.raises(KeyError, match="no field 'text'"):
        list(read_documents(tmp_path / "d.jsonl", "jsonl"))


def test_token_cache_eos_packing_and_reuse(tmp_path, tok_dir):
    tk = TextTokenizer(tok_dir)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["alpha beta", "gamma"]))
    src = SourceData("s", str(tmp_path / "d.jsonl"))
    b1 = tokenize_source(src, tk, tmp_path / "cache")
    mtime = b1.stat().st_mtime_ns
    toks = np.fromfile(b1, dtype=np.uint16).tolist()
    assert toks == tk.encode("alpha beta") + [tk.eos_id] + tk.encode("gamma") + [tk.eos_id]
    assert tokenize_source(src, tk, tmp_path / "cache") == b1 and b1.stat().st_mtime_ns == mtime  # cached


def test_tokenize_source_one_eos_per_document(tmp_path, tok_dir):
    tk = TextTokenizer(tok_dir)
    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    tokens = load_tokens(tokenize_source(SourceData("docs", str(tmp_path / "docs.jsonl")), tk, tmp_path / "cache"))
    assert int(tokens.max()) < tk.vocab_size
    assert (tokens == tk.eos_id).sum() == 100  # documents joined as doc EOS doc EOS ...


# ----------------------------------------------------------------------------- streamed loader


def _stream_src(tmp_path):
    lines = [json.dumps({"text": f"doc{i} " + "word " * (3 + i % 17)}) for i in range(120)]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    return [SourceData("s", str(tmp_path / "s.jsonl"), "jsonl")]


def _words(text: str) -> list[int]:  # a tokenizer independent of llmc's: one id per word
    return [len(w) for w in text.split()]


def test_stream_loader_global_batch_does_not_depend_on_the_layout(tmp_path):
    """One process with micro_batch 8 and 2 data-parallel ranks with micro_batch 2 x accum 2 train on the
    same sequences at every step; the full state (merged over ranks) resumes either layout exactly."""
    from llmc.runtime.data import StreamLoader

    srcs = _stream_src(tmp_path)
    one = StreamLoader(srcs, _words, 0, 6, slots=8)
    ranks = [StreamLoader(srcs, _words, 0, 6, slots=8, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):  # steps
        x1, y1 = one.next_batch(8)
        rows = torch.cat([torch.cat([r.next_batch(2)[0] for _ in range(2)]) for r in ranks])
        assert torch.equal(rows, x1) and torch.equal(x1[:, 1:], y1[:, :-1])
    full = StreamLoader.merge_states([r.state_dict() for r in ranks])
    assert json.loads(json.dumps(full)) == full  # plain JSON in train.json
    resumed = StreamLoader(srcs, _words, 0, 6, slots=8)  # the other layout, from the 2-rank state
    resumed.load_state_dict(full)
    assert torch.equal(resumed.next_batch(8)[0], one.next_batch(8)[0])
    with pytest.raises(ValueError, match=r"global_batch_tokens 48 -> 24 \(so the global batch, global_batch_tokens / "
                                         r"seq_len, 8 -> 4 sequences"):  # (a slot is one sequence of 6 tokens)
        StreamLoader(srcs, _words, 0, 6, slots=4).load_state_dict(full)


def test_stream_loader_ranks_read_disjoint_documents(tmp_path):
    from llmc.runtime.data import StreamLoader

    srcs = _stream_src(tmp_path)
    seen: dict[int, list[str]] = {0: [], 1: []}
    for r in (0, 1):
        loader = StreamLoader(srcs, lambda t, r=r: seen[r].append(t.split()[0]) or _words(t), 0, 6, slots=4,
                              dp_rank=r, dp_size=2)
        for _ in range(10):
            loader.next_batch(2)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) < 120  # read as needed
