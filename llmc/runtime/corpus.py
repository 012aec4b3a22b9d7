"""An offline, deterministic text corpus: the Python standard library's own docstrings.

No network, no downloads: ``ast``-parse the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` in
sorted order and keep every module / class / function docstring (``ast.get_docstring``, cleaned).
Test suites, ``site-packages``, ``idlelib``/``turtledemo``/``lib2to3`` fixtures are skipped. The same Python
build gives byte-identical output. Used by ``format: builtin`` sources named ``python-docs``.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

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


def write_corpus(path: str | Path, name: str = "python-docs", max_docs: int | None = None,
                 max_chars: int | None = None) -> dict:
    """Write the corpus as JSONL (atomically); returns {"path", "docs", "chars"}. Idempotent."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r} (known: {', '.join(BUILTIN_CORPORA)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    docs = chars = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in iter_docstrings():
            if (max_docs is not None and docs >= max_docs) or (max_chars is not None and chars >= max_chars):
                break
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            docs += 1
            chars += len(rec["text"])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"path": str(path), "docs": docs, "chars": chars}
