"""The resume state of a streamed source (llmc.runtime.stream): constant size whatever the documents' length (it
names the document the unconsumed tokens come from instead of holding them), an exact continuation in every case
the buffer can be in (a long document, many short ones, one short document read over and over, an epoch seam, a
pooled source, every format, a held-out split), a changed file refused by name, and version-1 states (the tokens
themselves) still resumed as before."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
torch = pytest.importorskip("torch")

from test_stream import hf_cache, make_source, with_holdout  # noqa: E402, F401  (hf_cache: a fixture)
from test_stream import tokenize as numbered  # noqa: E402  (doc s:i -> its id, 1 + i % 5 times)

from llmc.runtime.stream import SourceRef, StreamingMixture, documents  # noqa: E402

EOS = 0


def chars(text: str) -> list[int]:
    """A tokenizer: a token per UTF-8 byte (never 0, the EOS, for these texts), so any change of text changes tokens."""
    return list(text.encode())


def text_source(root: Path, name: str, texts: list[str]) -> SourceRef:
    d = root / name
    d.mkdir(parents=True)
    for i, t in enumerate(texts):
        (d / f"{i:05d}.txt").write_text(t)
    return SourceRef(name, str(d), "text")


def jsonl_source(root: Path, name: str, texts: list[str]) -> SourceRef:
    d = root / name
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return SourceRef(name, str(d), "jsonl")


def mixture(srcs, seq_len, rank=0, world=1, tokenize=chars, seed=3) -> StreamingMixture:
    return StreamingMixture(srcs, tokenize, EOS, seq_len, rank=rank, world=world, seed=seed)


def windows(m: StreamingMixture, n: int) -> list[list[int]]:
    return [m.next_window().tolist() for _ in range(n)]


def assert_resumes(srcs, seq_len, cuts, after, rank=0, world=1, tokenize=chars) -> None:
    """For each cut: the state after ``cut`` windows, through JSON, restored in a new mixture, gives the next
    ``after`` windows of an independent uninterrupted run; the state names the held tokens, never lists them."""
    ref = windows(mixture(srcs, seq_len, rank, world, tokenize), max(cuts) + after)
    for cut in cuts:
        a = mixture(srcs, seq_len, rank, world, tokenize)
        assert windows(a, cut) == ref[:cut]
        state = json.loads(json.dumps(a.state_dict()))
        assert state["version"] == 2
        for st in state["sources"]:
            assert "buffer" not in st, (cut, st["name"])
        b = mixture(srcs, seq_len, rank, world, tokenize)
        b.load_state_dict(state)
        assert windows(b, after) == ref[cut:cut + after], cut
        # the restored stream's own state (before and after its replay) resumes the same way
        c = mixture(srcs, seq_len, rank, world, tokenize)
        c.load_state_dict(state)
        d = mixture(srcs, seq_len, rank, world, tokenize)
        d.load_state_dict(json.loads(json.dumps(c.state_dict())))
        assert windows(d, 3) == ref[cut:cut + 3], cut


def test_one_long_document_resumes_anywhere_in_it_and_across_its_epochs(tmp_path):
    text = "".join(f"w{i} " for i in range(900))  # ~4.5k tokens: the buffer is ~100 windows long after the first
    seq = 32
    per_epoch = (len(chars(text)) + 1) // seq
    src = text_source(tmp_path, "book", [text])
    assert_resumes([src], seq, [1, 2, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch + 3],
                   after=per_epoch + 5)


def test_many_short_documents_resume_at_every_window(tmp_path):
    texts = [f"d{i}" + "x" * (i % 7) for i in range(40)]  # 2..9 tokens + EOS: windows span several documents
    src = jsonl_source(tmp_path, "short", texts)
    assert_resumes([src], 16, list(range(1, 40)), after=30)


def test_a_single_short_document_read_over_and_over(tmp_path):
    src = text_source(tmp_path, "one", ["ab"])  # 3 tokens with EOS: a window holds several epochs of it
    assert_resumes([src], 7, list(range(1, 15)), after=12)


@pytest.mark.usefixtures("hf_cache")
@pytest.mark.parametrize("kind", ["jsonl", "text", "parquet", "hf_disk"])
def test_every_format_resumes_across_epoch_seams(kind, tmp_path):
    src = make_source(kind, tmp_path, 1, 11)  # 11 documents over 2 ranks: an epoch every few windows
    assert_resumes([src], 5, list(range(1, 25)), after=15, rank=1, world=2, tokenize=numbered)


@pytest.mark.parametrize("rank", [3, 6])
def test_a_pooled_source_resumes_in_its_rotated_order(rank, tmp_path):
    srcs = [jsonl_source(tmp_path, "few", ["alpha", "b", "a much longer third document " * 3])]
    assert_resumes(srcs, 6, list(range(1, 30)), after=20, rank=rank, world=8)


@pytest.mark.usefixtures("hf_cache")
@pytest.mark.parametrize("part", ["train", "val"])
@pytest.mark.parametrize("kind", ["jsonl", "hf_disk"])
def test_a_held_out_split_resumes(kind, part, tmp_path):
    src = with_holdout(make_source(kind, tmp_path, 2, 60), part, fraction=0.2)
    assert_resumes([src], 6, [1, 4, 9, 17, 31], after=25, rank=1 if part == "train" else 0,
                   world=2 if part == "train" else 1, tokenize=numbered)


def test_a_weighted_mixture_resumes(tmp_path):
    srcs = [text_source(tmp_path, "book", ["".join(f"w{i} " for i in range(300))]),
            jsonl_source(tmp_path, "notes", [f"note {i}" for i in range(9)])]
    srcs = [srcs[0], SourceRef("notes", srcs[1].path, "jsonl", weight=0.5)]
    assert_resumes(srcs, 8, [1, 3, 10, 40, 77], after=60)


def test_state_size_does_not_grow_with_the_document(tmp_path):
    """A 1M-token document: the state names the held tokens (old states listed ~1M of them: megabytes of JSON in
    every checkpoint of every rank). Restoring re-reads that one document and continues exactly."""
    text = "0123456789abcdef" * (1 << 16)  # 1,048,576 tokens
    src = text_source(tmp_path, "big", [text])
    want = chars(text) + [EOS]
    a = mixture([src], 128)
    for k in range(3):
        assert a.next_window().tolist() == want[k * 128:(k + 1) * 128 + 1]
    t0 = time.perf_counter()
    blob = json.dumps(a.state_dict())
    t_state = time.perf_counter() - t0
    assert len(blob) < 2048, len(blob)
    b = mixture([src], 128)
    t0 = time.perf_counter()
    b.load_state_dict(json.loads(blob))
    got = b.next_window().tolist()
    t_restore = time.perf_counter() - t0
    assert got == want[3 * 128:4 * 128 + 1] and b.next_window().tolist() == a.next_window().tolist()
    print(f"state {len(blob)} bytes in {t_state * 1e3:.1f} ms; restore + first window {t_restore * 1e3:.1f} ms")


@pytest.mark.parametrize("change", ["held_text", "held_gone"])
def test_a_held_document_changed_since_the_checkpoint_is_refused_by_name(change, tmp_path):
    texts = [f"document {i} " * (3 + i) for i in range(6)]
    src = jsonl_source(tmp_path, "corpus", texts)
    a = mixture([src], 8)
    windows(a, 9)
    state = json.loads(json.dumps(a.state_dict()))
    held = state["sources"][0]["docs"] - 1  # the document the unconsumed tokens come from
    assert state["sources"][0]["held"]["tokens"] >= 3  # its last two characters (+ EOS) not yet in a window
    if change == "held_text":  # as many documents, the held one's text edited where the held tokens are
        texts[held] = texts[held][:-2] + "XY"
    else:
        texts = texts[:held]
    (Path(src.path) / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    b = mixture([src], 8)
    with pytest.raises(ValueError, match="'corpus'.*files changed since the checkpoint") as e:
        # a file of another size is refused as the state is loaded (its files' sizes: the checkpoint keeps them);
        # an edit that keeps the size, when the held document is read again
        b.load_state_dict(state)
        b.next_window()
    assert "\n" not in str(e.value) and "--no-resume" in str(e.value)


def test_a_version_1_state_with_the_tokens_resumes_as_before(tmp_path):
    """A version-1 state stored the buffer itself: built here from the packed token stream (documents + EOS,
    epoch after epoch) and the stream's position, it resumes to the uninterrupted run's windows; the resumed run's
    own states name the held document again. A buffer its document no longer ends with is still used as it is."""
    texts = [f"doc {i} " * (1 + 2 * i) for i in range(5)]
    src = jsonl_source(tmp_path, "old", texts)
    seq, cut = 10, 13
    ref = windows(mixture([src], seq), cut + 40)
    a = mixture([src], seq)
    windows(a, cut)
    new = a.state_dict()
    st = new["sources"][0]
    lengths = [len(chars(t)) + 1 for t in texts]
    read = st["epoch"] * sum(lengths) + sum(lengths[:st["docs"]])  # tokens of the documents read so far
    flat = [t for _ in range(st["epoch"] + 2) for x in texts for t in chars(x) + [EOS]]
    old_src = {k: v for k, v in st.items() if k != "held"} | {"buffer": flat[cut * seq:read]}
    old = json.loads(json.dumps(new | {"version": 1, "sources": [old_src]}))
    b = mixture([src], seq)
    b.load_state_dict(old)
    assert windows(b, 1) == ref[cut:cut + 1]
    again = json.loads(json.dumps(b.state_dict()))
    assert "buffer" not in again["sources"][0] and again["sources"][0]["held"]["tokens"] > 0
    assert windows(b, 39) == ref[cut + 1:]
    c = mixture([src], seq)
    c.load_state_dict(again)
    assert windows(c, 39) == ref[cut + 1:]
    # a buffer that is not its document's end any more (the file edited): used as stored, and stored on while held
    odd = json.loads(json.dumps(old))
    n = len(old_src["buffer"])
    odd["sources"][0]["buffer"] = [7] * n
    d = mixture([src], seq)
    d.load_state_dict(odd)
    assert d.next_window().tolist() == ([7] * n + flat[read:])[:seq + 1]
    assert ("buffer" in d.state_dict()["sources"][0]) == (n > seq)


def test_a_state_from_a_newer_llmc_is_refused(tmp_path):
    src = text_source(tmp_path, "t", ["abc"])
    a = mixture([src], 4)
    windows(a, 2)
    with pytest.raises(ValueError, match="version 3"):
        mixture([src], 4).load_state_dict(a.state_dict() | {"version": 3})


def test_documents_helper_sees_the_same_document_the_state_names(tmp_path):
    """``docs - 1`` is the document the held tokens end: checked against the reader directly."""
    texts = [f"t{i}" * (2 + i) for i in range(7)]
    src = jsonl_source(tmp_path, "pos", texts)
    a = mixture([src], 5)
    for _ in range(12):
        a.next_window()
        st = a.state_dict()["sources"][0]
        doc = list(documents(src, 0, 1, st["docs"] - 1))[0]
        toks = chars(doc) + [EOS]
        assert st["held"]["skip"] + st["held"]["tokens"] == len(toks)
        assert a.streams[0].buffer == toks[st["held"]["skip"]:]


def test_changed_mixture_weights_are_refused_on_resume(tmp_path):
    """The steps before a checkpoint drew the mixture of its weights: resuming under other weights trained a mixture
    no record named (a reviewer's 0.5 / 0.3 / 0.2 -> 0.2 / 0.3 / 0.5 resumed with only a spec-hash note). The state
    keeps the weights and a changed one is refused by name, as a changed source is; the same weights resume."""
    book = text_source(tmp_path, "book", ["".join(f"w{i} " for i in range(300))])
    notes = jsonl_source(tmp_path, "notes", [f"note {i}" for i in range(9)])
    before = mixture([book, SourceRef("notes", notes.path, "jsonl", weight=0.5)], 8)
    windows(before, 5)
    state = json.loads(json.dumps(before.state_dict()))
    assert state["weights"] == [1.0, 0.5]
    after = mixture([book, SourceRef("notes", notes.path, "jsonl", weight=0.2)], 8)
    with pytest.raises(ValueError, match=r"mixture weights changed since the checkpoint \(notes 0.5 -> 0.2\)"):
        after.load_state_dict(state)
    same = mixture([book, SourceRef("notes", notes.path, "jsonl", weight=0.5)], 8)
    same.load_state_dict(state)
    assert windows(same, 3) == windows(before, 3)
    legacy = {k: v for k, v in state.items() if k != "weights"}  # a checkpoint written before llmc kept them
    mixture([book, SourceRef("notes", notes.path, "jsonl", weight=0.2)], 8).load_state_dict(legacy)


def test_a_source_whose_files_grew_is_refused_on_resume(tmp_path):
    """A reviewer appended 300 documents to a source mid-run and resumed with exit 0 (its held-out split and
    validation loss changed with it): the checkpoint keeps each source's files (count, bytes, a digest of names and
    sizes) and a change is refused by name; a file copied elsewhere with the same name and size is the same."""
    texts = [f"document {i} " * 3 for i in range(20)]
    src = jsonl_source(tmp_path, "corpus", texts)
    a = mixture([src], 8)
    windows(a, 4)
    state = json.loads(json.dumps(a.state_dict()))
    f = Path(src.path) / "a.jsonl"
    assert state["sources"][0]["files"]["n"] == 1 and state["sources"][0]["files"]["bytes"] == f.stat().st_size
    with f.open("a") as out:
        out.write(json.dumps({"text": "a new document " * 4}) + "\n")
    with pytest.raises(ValueError, match=r"'corpus': its files changed since the checkpoint \(1 files, [0-9,]+ bytes "
                                         r"-> 1 files"):
        mixture([src], 8).load_state_dict(state)
    moved = jsonl_source(tmp_path / "copy", "corpus", texts)  # the same file elsewhere (a fresh clone's path)
    b = mixture([moved], 8)
    b.load_state_dict(state)
    assert windows(b, 2) == windows(a, 2)


def test_a_changed_batch_or_seq_len_is_refused_naming_the_settings(tmp_path):
    """The data position of a global batch (a stream per sequence slot) continues only in a loader of the same slots,
    seq_len and seed; another is refused naming the spec settings that changed, old -> new (a seq_len change at the
    same global_batch_tokens is a seq_len change, not a slot change), and the ways out."""
    from llmc.runtime.data import StreamLoader

    src = text_source(tmp_path, "corpus", [f"document {i} " * 30 for i in range(8)])

    def loader(seq_len: int, slots: int, seed: int = 0) -> StreamLoader:
        return StreamLoader([src], chars, EOS, seq_len, slots, seed)

    a = loader(16, 4)  # 4 sequences of 16 tokens: 64 tokens per step
    a.next_batch(4)
    state = json.loads(json.dumps(a.state_dict()))
    b = loader(16, 4)
    b.load_state_dict(state)  # the same settings: it continues
    assert [t.tolist() for t in b.next_batch(4)] == [t.tolist() for t in a.next_batch(4)]
    redo = ("the data position would not match: `llmc launch --no-resume` starts the stage over (the earlier run set "
            "aside), or rebuild with the old values")
    cases = {  # (seq_len, slots, seed) -> what the refusal names
        (8, 8, 0): "seq_len 16 -> 8 (so the global batch, global_batch_tokens / seq_len, 4 -> 8 sequences, each a "
                   "data stream of its own)",
        (16, 8, 0): "global_batch_tokens 64 -> 128 (so the global batch, global_batch_tokens / seq_len, 4 -> 8 "
                    "sequences, each a data stream of its own)",
        (8, 4, 0): "seq_len 16 -> 8, global_batch_tokens 64 -> 32",
        (32, 4, 1): "seq_len 16 -> 32, global_batch_tokens 64 -> 128, training.seed 0 -> 1",
    }
    for (seq_len, slots, seed), named in cases.items():
        with pytest.raises(ValueError) as e:
            loader(seq_len, slots, seed).load_state_dict(state)
        assert str(e.value) == f"settings changed since the checkpoint: {named}; {redo}"
