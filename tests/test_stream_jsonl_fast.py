"""The jsonl stream reader (llmc.runtime.stream) skips other ranks' lines without Python work per line, and
deals exactly the documents of the per-line rule: the k-th non-blank line (``line.strip()`` of the line as
text mode reads it) over the sorted files is document k of rank k % world, located ``file:line`` (1-based,
blank lines counted). Small reads (``JSONL_CHUNK``) cut lines and line ends across reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from llmc.runtime import stream  # noqa: E402
from llmc.runtime.data import SourceData  # noqa: E402
from llmc.runtime.validation import is_heldout  # noqa: E402
from llmc.sources import jsonl_text  # noqa: E402

HOLDOUT = 0.3, 11  # fraction, seed


def reference(path: Path, rank: int, world: int, start: int, part: str | None, field: str = "text"
              ) -> tuple[list[str], str | None]:
    """(documents, error) by the per-line rule, read as every reader of llmc did: text mode with the
    encoding of ``llmc.sources.open_jsonl`` (a BOM dropped, universal newlines, undecodable bytes kept as
    surrogates), a line is blank iff ``line.strip()`` is empty, line k goes to rank k % world; the held-out
    split hashes k."""
    docs: list[str] = []
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".jsonl", ".json"))
    k = mine = 0
    try:
        for f in files:
            with open(f, encoding="utf-8-sig", errors="surrogateescape") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    take = k % world == rank
                    if take and part is not None:
                        take = is_heldout("src", k, HOLDOUT[1], HOLDOUT[0]) == (part == "val")
                    k += 1
                    if take:
                        mine += 1
                        if mine > start:
                            docs.append(jsonl_text(line, field, f"{f}:{n}"))
    except (ValueError, KeyError) as e:
        return docs, f"{type(e).__name__}: {e}"
    return docs, None


def streamed(path: Path, rank: int, world: int, start: int, part: str | None, fmt: str = "jsonl"
             ) -> tuple[list[str], str | None]:
    """(documents, error) of the stream reader, through the public ``documents``."""
    src = SourceData("src", str(path), fmt, "text", 1.0, (part, *HOLDOUT) if part else None)
    docs: list[str] = []
    try:
        for d in stream.documents(src, rank, world, start):
            docs.append(d)
    except (ValueError, KeyError) as e:
        return docs, f"{type(e).__name__}: {e}"
    return docs, None


def rec(i: int, pad: int = 0) -> bytes:
    return json.dumps({"text": f"doc {i} " + "x" * pad}).encode()


def write_corpus(d: Path, long_line: int = 200) -> tuple[Path, list[str]]:
    """Three files and an empty one, written byte for byte with everything the text mode reads its own way;
    and the documents written, in order."""
    d.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []

    def doc(pad: int = 0, lead: bytes = b"") -> bytes:
        texts.append(f"doc {len(texts)} " + "x" * pad)
        return lead + json.dumps({"text": texts[-1]}).encode()

    a = [b"\xef\xbb\xbf" + doc() + b"\n"]  # a BOM at the start of the file
    for j in range(60):
        a.append(doc(pad=j % 7) + b"\n")
        if j % 9 == 0:
            a.append(b"\n")  # an empty line
        if j % 13 == 5:
            a.append(b"   \t \n")  # spaces and a tab
        if j % 17 == 3:  # U+3000 ideographic space, form feed, \x1c, U+0085: whitespace to str.strip
            a.append("\u3000 \x0c\x1c\x85\n".encode())
        if j % 19 == 7:
            a.append(doc(lead=b"  \t") + b"\n")  # leading JSON whitespace: a document
    a.append(doc(pad=long_line) + b"\n")  # longer than a small read
    a.append(doc())  # the last line without a line end
    (d / "a.jsonl").write_bytes(b"".join(a))
    b = []
    for j in range(50):
        end = (b"\r\n", b"\r", b"\n")[j % 3]  # CRLF, a lone CR (a line end in text mode), LF
        b.append(doc(pad=j % 5) + end)
        if j % 8 == 2:
            b.append(b"\r\n" if j % 16 == 2 else b" \r")  # blank lines ended by CRLF / a lone CR
    b.append(b"\r")  # ends with a lone CR: one more blank line
    (d / "b.jsonl").write_bytes(b"".join(b))
    (d / "c.jsonl").write_bytes(b"")  # an empty file
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "d.json").write_bytes(b"\n".join(doc() for _ in range(40)) + b"\n\n\n")
    return d, texts


CHUNKS = (1, 7, 64, 1 << 20)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("world", [1, 2, 3, 7, 64])
def test_same_documents_as_the_per_line_rule(world, chunk, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "JSONL_CHUNK", chunk, raising=False)
    d, _ = write_corpus(tmp_path / "c")
    ranks = range(world) if world < 64 else (0, 1, 30, 63)
    for rank in ranks:
        for start in (0, 1, 4):
            for part in (None, "train", "val"):
                want = reference(d, rank, world, start, part)
                assert streamed(d, rank, world, start, part) == want, (rank, start, part)
    # the documents of all ranks are the corpus's non-blank lines, each once
    every = [x for r in range(world) for x in streamed(d, r, world, 0, None)[0]]
    assert sorted(every) == sorted(reference(d, 0, 1, 0, None)[0])


def test_the_reference_reads_the_documents_written(tmp_path):
    """The reference is right about the corpus: every record written, in order, no blank line a document."""
    d, texts = write_corpus(tmp_path / "c")
    assert reference(d, 0, 1, 0, None) == (texts, None)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_undecodable_bytes_fail_on_their_rank_only_at_the_same_line(world, chunk, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "JSONL_CHUNK", chunk, raising=False)
    d = tmp_path / "c"
    d.mkdir()
    lines = [rec(i) for i in range(30)]
    lines[11] = b'{"text": "caf\xe9 \xe2\x82"}'  # Latin-1 e-acute and a cut euro sign
    lines[20] = b'\xff{"text": "x"}'  # a line starting with an undecodable byte
    lines[25] = b'\xef\xbb\xbf{"text": "y"}'  # a BOM inside the file is kept: not JSON
    (d / "a.jsonl").write_bytes(b"\n".join(lines[:15]) + b"\n\n" + b"\n".join(lines[15:]) + b"\n")
    failed = set()
    for rank in range(world):
        for start in (0, 2):
            for part in (None, "train", "val"):
                want = reference(d, rank, world, start, part)
                assert streamed(d, rank, world, start, part) == want, (rank, start, part)
                if want[1] is not None:
                    assert "not valid UTF-8" in want[1] or "Unexpected UTF-8 BOM" in want[1]
                    failed.add(rank)
    # the bad lines are documents 11, 20 and 25 (a blank line follows line 15): only their ranks ever fail
    assert failed == {11 % world, 20 % world, 25 % world}


def test_a_folder_of_jsonl_as_an_hf_source_reads_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "JSONL_CHUNK", 7, raising=False)
    d, _ = write_corpus(tmp_path / "c")
    (d / "sub" / "d.json").unlink()  # one suffix: a folder source mixing them is refused
    for rank in range(3):
        assert streamed(d, rank, 3, 1, "train", fmt="hf") == reference(d, rank, 3, 1, "train")


def _python_lines_run(fn) -> int:
    """Python line events run in ``llmc.runtime.stream``'s own code while ``fn()`` runs (``sys.settrace``)."""
    events = 0
    code_file = stream.__file__

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != code_file:
            return None
        return local

    def local(frame, event, arg):
        nonlocal events
        if event == "line":
            events += 1
        return local

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(old)
    return events


@pytest.mark.parametrize("part", [None, "train"])
def test_other_ranks_lines_cost_no_python_line_each(part, tmp_path):
    """The speed property, counted instead of timed: with 64 ranks a rank's reading runs a few Python lines
    per document of its own and per read, not per line of the corpus (the per-line reader ran about 6 for each
    of the 64 x 40 lines)."""
    d = tmp_path / "c"
    d.mkdir()
    world, per_rank = 64, 40
    n = world * per_rank
    (d / "a.jsonl").write_bytes(b"".join(rec(i, pad=i % 50) + b"\n" for i in range(n)))
    src = SourceData("src", str(d), "jsonl", "text", 1.0, ("train", *HOLDOUT) if part else None)
    got: list[str] = []
    events = _python_lines_run(lambda: got.extend(stream.documents(src, 5, world)))
    assert (got, None) == reference(d, 5, world, 0, part)
    assert 0 < len(got) <= per_rank
    assert events < n / 4, f"{events} Python lines run for {n} corpus lines, {len(got)} own documents"


def _held_by_suspended_readers(src, ranks, world) -> tuple[list[str], int]:
    """The first document of each rank of ``ranks`` and the bytes their readers, suspended after it, hold."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        readers = [stream.documents(src, r, world) for r in ranks]
        firsts = [next(r) for r in readers]
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return firsts, held


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_suspended_readers_hold_no_read_buffer(tmp_path, eol):
    """Every sequence slot keeps a reader open between documents: a suspended one holds its own lines of the
    current read, not the read (64 readers holding their 1 MiB reads would hold 64 MiB), CRLF files too (a read
    with a \\r is not rewritten whole)."""
    d = tmp_path / "c"
    d.mkdir()
    world = 64
    (d / "a.jsonl").write_bytes(b"".join(rec(i, pad=2000) + eol for i in range(world * 40)))  # ~5 MiB
    src = SourceData("src", str(d), "jsonl", "text", 1.0, None)
    firsts, held = _held_by_suspended_readers(src, range(world), world)
    assert firsts == [f"doc {r} " + "x" * 2000 for r in range(world)]
    assert held < 8 << 20, f"{held / 2**20:.1f} MiB held by {world} suspended readers"


def test_suspended_readers_do_not_hold_another_ranks_long_line(tmp_path):
    """A line longer than a read is read whole; the ranks it does not belong to do not keep it once they pass it."""
    d = tmp_path / "c"
    d.mkdir()
    world = 16
    (d / "a.jsonl").write_bytes(rec(0, pad=8 << 20) + b"\n" + b"".join(rec(i) + b"\n" for i in range(1, 4 * world)))
    src = SourceData("src", str(d), "jsonl", "text", 1.0, None)
    firsts, held = _held_by_suspended_readers(src, range(1, world), world)
    assert firsts == [f"doc {r} " for r in range(1, world)]
    assert held < 4 << 20, f"{held / 2**20:.1f} MiB held by {world - 1} suspended readers"
