"""The builtin corpus (the stdlib's docstrings) is parsed once and then copied from llmc's cache folder: a copy
is byte-identical to parsing the stdlib here, a damaged cache file is never used, a cache that cannot be written
falls back to parsing, and the cache key moves when the stdlib files do."""

from __future__ import annotations

import json
import os

import pytest

from llmc.runtime import corpus


def _parsed(n: int | None = None) -> bytes:
    """The corpus straight from the stdlib, serialized here (not by write_corpus)."""
    out = []
    for i, rec in enumerate(corpus.iter_docstrings()):
        if n is not None and i >= n:
            break
        out.append(json.dumps(rec, ensure_ascii=False) + "\n")
    return "".join(out).encode()


@pytest.fixture(scope="module")
def parsed() -> bytes:
    return _parsed()


def test_a_cached_copy_is_the_parsed_corpus_and_a_damaged_one_is_not_used(tmp_path, monkeypatch, parsed):
    monkeypatch.setenv("LLMC_CACHE_DIR", str(tmp_path / "cache"))
    first = corpus.write_corpus(tmp_path / "a.jsonl")
    cached = first["cached"]
    assert cached and os.path.dirname(cached) == str(tmp_path / "cache" / "corpora")
    assert (tmp_path / "a.jsonl").read_bytes() == parsed
    second = corpus.write_corpus(tmp_path / "b.jsonl")  # from the cache
    assert second["cached"] == cached and (tmp_path / "b.jsonl").read_bytes() == parsed
    assert (second["docs"], second["chars"]) == (parsed.count(b"\n"), sum(
        len(json.loads(line)["text"]) for line in parsed.decode().splitlines()))
    part = corpus.write_corpus(tmp_path / "c.jsonl", max_docs=50)
    assert (tmp_path / "c.jsonl").read_bytes() == _parsed(50) and part["docs"] == 50

    # a cache file whose bytes no longer hash to the recorded SHA-256 (a half-written or edited copy) is rewritten
    with open(cached, "r+b") as f:
        f.seek(100)
        f.write(b"#")
    corpus.write_corpus(tmp_path / "d.jsonl")
    assert (tmp_path / "d.jsonl").read_bytes() == parsed and open(cached, "rb").read() == parsed


def test_a_cache_that_cannot_be_written_is_not_used(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be\n")
    monkeypatch.setenv("LLMC_CACHE_DIR", str(blocker))
    info = corpus.write_corpus(tmp_path / "a.jsonl", max_docs=40)
    assert info["cached"] is None and (tmp_path / "a.jsonl").read_bytes() == _parsed(40)
    assert blocker.read_text() == "a file where the cache folder would be\n"


def test_the_cache_key_moves_when_a_stdlib_file_changes(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text('"""A module docstring long enough to be kept by the corpus."""\n')
    (root / "test").mkdir()  # a skipped folder: its files are not part of the key
    (root / "test" / "t.py").write_text("x = 1\n")
    key = corpus.fingerprint(root)
    assert corpus.fingerprint(root) == key
    (root / "test" / "t.py").write_text("x = 2  # another size\n")
    assert corpus.fingerprint(root) == key
    (root / "pkg" / "mod.py").write_text('"""Another module docstring, long enough to be kept by the corpus."""\n')
    assert corpus.fingerprint(root) != key
