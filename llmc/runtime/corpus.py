"""An offline, deterministic text corpus: the Python standard library's own docstrings.

No network, no downloads: ``ast``-parse the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` in
sorted order and keep every module / class / function docstring (``ast.get_docstring``, cleaned).
Test suites, ``site-packages``, ``idlelib``/``turtledemo``/``lib2to3`` fixtures are skipped. The same Python
build gives byte-identical output. Used by ``format: builtin`` sources named ``python-docs``.

Parsing the ~800 files takes seconds of CPU, so the whole corpus is kept once in llmc's cache folder
(``$LLMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmc``, else ``~/.cache/llmc``) under its :func:`fingerprint`
(the Python build, every stdlib file's path, size and mtime, and this code), with its SHA-256 beside it: a
cached copy is used only when its bytes still hash to that, and a cache that cannot be written is not used.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from llmc import sources
from llmc.fileio import sha256_file
from llmc.sources import clean_text
from llmc.spec.schema import BUILTIN_CORPORA

_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "turtledemo", "lib2to3", "__pycache__",
              "dist-packages", "ensurepip", "tkinter", "venv"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def iter_docstrings(root: Path | None = None, min_chars: int = 40) -> Iterator[dict]:
    """Yield {"text", "source"} for each docstring of at least ``min_chars`` characters, in a fixed order."""
    root = root or stdlib_root()
    for path in _source_files(root):
        rel = path.relative_to(root).with_suffix("").as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = rel.replace("/", ".").removesuffix(".__init__")
        stack: list[tuple[ast.AST, str]] = [(tree, module)]
        while stack:  # depth-first in source order
            node, qual = stack.pop(0)
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= min_chars:
                yield {"text": clean_text(doc), "source": qual}  # a "\\ud800" escape would not encode
            children = [c for c in ast.iter_child_nodes(node)
                        if isinstance(c, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
            stack[0:0] = [(c, f"{qual}.{c.name}") for c in children]


def cache_root() -> Path | None:
    """llmc's cache folder: ``$LLMC_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmc``, else ``~/.cache/llmc``; None
    when there is no home to put it in."""
    if os.environ.get("LLMC_CACHE_DIR"):
        return Path(os.environ["LLMC_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "llmc"
    try:
        return Path.home() / ".cache" / "llmc"
    except RuntimeError:  # no HOME and no passwd entry
        return None


def fingerprint(root: Path | None = None) -> str:
    """What the corpus is a function of: the Python build, each stdlib source file's path, size and mtime
    (listing them costs milliseconds; parsing them, seconds) and the code that extracts the docstrings."""
    root = root or stdlib_root()
    h = hashlib.sha256(f"{sys.version}\0{root}\0".encode())
    for code in (Path(__file__), Path(sources.__file__)):
        h.update(hashlib.sha256(code.read_bytes()).digest())
    for p in _source_files(root):
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _write_records(path: Path, records, max_docs: int | None = None, max_chars: int | None = None) -> dict:
    """Write ``records`` as JSONL atomically (a temporary file, fsynced, then renamed); {"docs", "chars"}."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    docs = chars = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                if (max_docs is not None and docs >= max_docs) or (max_chars is not None and chars >= max_chars):
                    break
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                docs += 1
                chars += len(rec["text"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"docs": docs, "chars": chars}


def cached_corpus(name: str = "python-docs") -> Path | None:
    """The whole corpus in llmc's cache, written there first if it is not (or its bytes no longer match the
    SHA-256 recorded beside it); None when the cache folder cannot be made or written."""
    root = cache_root()
    if root is None:
        return None
    target = root / "corpora" / f"{name}-{fingerprint()}.jsonl"
    digest = target.with_name(target.name + ".sha256")
    try:
        if target.is_file() and digest.is_file() and digest.read_text().strip() == sha256_file(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_records(target, iter_docstrings())
        tmp = digest.with_name(f"{digest.name}.tmp{os.getpid()}")
        tmp.write_text(sha256_file(target) + "\n")
        os.replace(tmp, digest)
    except OSError:
        return None
    return target


def corpus_sha256(name: str = "python-docs") -> str | None:
    """The SHA-256 of the whole corpus as prepare writes it (``data/<name>.jsonl``, a copy of the cached one, byte for
    byte): the one recorded beside the cached corpus (:func:`cached_corpus`, which writes it first if it is not
    there), so what a finished stage read is known without reading it again. None for a corpus llmc does not know or
    a cache that cannot be written."""
    if name not in BUILTIN_CORPORA:
        return None
    target = cached_corpus(name)
    if target is None:
        return None
    try:
        return target.with_name(target.name + ".sha256").read_text().strip() or None
    except OSError:
        return None


def _read_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_corpus(path: str | Path, name: str = "python-docs", max_docs: int | None = None,
                 max_chars: int | None = None) -> dict:
    """Write the corpus (its first ``max_docs`` documents / about ``max_chars`` characters) as JSONL,
    atomically; returns {"path", "docs", "chars", "cached"} (``cached``: the cache file it was read from, or
    None when the stdlib was parsed here). Idempotent: the same bytes whether cached or not."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r} (known: {', '.join(BUILTIN_CORPORA)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cached = cached_corpus(name)
    records = _read_records(cached) if cached is not None else iter_docstrings()
    info = _write_records(path, records, max_docs, max_chars)
    return {"path": str(path), **info, "cached": None if cached is None else str(cached)}
