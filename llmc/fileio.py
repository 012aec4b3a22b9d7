"""Reading a file the user names, safely (stdlib only): a regular file of bounded size, never a FIFO or device.

Every reader of a user-named input goes through :func:`read_regular_file`: the spec's HF config and tokenizer
(``llmc.spec``), a lock (``llmc.lockfile``), and ``llmc calibrate``'s runs, logs, tables and calibrations
(``llmc.measurements``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Raises ``OSError`` (``FileNotFoundError``, ``IsADirectoryError``...) or ``ValueError`` with a
    message for a FIFO, device or socket (``/dev/zero`` would never end) or a file that is too large.
    Opened with ``O_NONBLOCK`` so that opening a FIFO with no writer does not block.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file (a device, FIFO or socket)")
        if st.st_size > limit:
            raise ValueError(f"{path} is {st.st_size:,} bytes, more than the {limit:,} llmc reads")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{path} is more than the {limit:,} bytes llmc reads")
        return data
    finally:
        os.close(fd)


def expand_user(path: str | Path) -> Path:
    """``path`` with a leading ``~`` / ``~user`` expanded; as given when there is no such home (``~nosuchuser``:
    the read that follows then says the file is missing, rather than ``expanduser`` raising)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


#: What :func:`set_aside` puts between a folder's name and its number N (``pretrain.set-aside-2``).
SET_ASIDE = ".set-aside-"


def is_set_aside(name: str) -> bool:
    """Whether ``name`` is one :func:`set_aside` gives a folder (``<name>.set-aside-N``, N a whole number): what
    ``llmc launch --no-resume`` leaves in ``run/`` is a past run of a stage, not a stage of its own."""
    base, sep, n = name.rpartition(SET_ASIDE)
    return bool(sep and base and n.isascii() and n.isdigit())


def set_aside_target(path: str | Path) -> Path | None:
    """Where :func:`set_aside` would move ``path``: ``<path>.set-aside-N``, the first free N; None when there is
    nothing to set aside (not a directory, a link, or empty). The one rule, for the rename and for the shell command a
    message prints (``llmc.runtime.job.set_aside_shell``)."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink() or not any(p.iterdir()):
        return None
    n = 1
    while (target := p.with_name(f"{p.name}{SET_ASIDE}{n}")).exists() or target.is_symlink():
        n += 1
    return target


def set_aside(path: str | Path) -> Path | None:
    """Rename a non-empty directory ``path`` to ``<path>.set-aside-N`` (the first free N) so that a run can start over
    without deleting anything; returns the new path (None when there was nothing to set aside)."""
    target = set_aside_target(path)
    if target is not None:
        os.rename(path, target)
    return target


__all__ = ["read_regular_file", "expand_user", "set_aside", "set_aside_target", "is_set_aside", "SET_ASIDE"]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks (a checkpoint shard need not fit in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """``path`` := ``data``, atomically (a new temporary file, then renamed over ``path``): a link at ``path`` is
    replaced, never written through, and the temporary file is created new (``O_EXCL | O_NOFOLLOW``); ``fsync``
    flushes it to the disk before the rename."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
