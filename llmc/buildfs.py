"""Safe, crash-consistent writing of a build directory.

``llmc build -o DIR`` owns only the files it writes. Everything else in ``DIR`` (``run/``, ``data/``,
``assets/``, ``cache/``, ``outputs/``, files a user put there) is never touched.

API
---
``write_build(out, files, *, protect=(), version=llmc.__version__) -> BuildResult``
    ``files`` maps canonical relative POSIX paths (``"a/b.sh"``; no ``.``/``..``/empty parts, not
    absolute, no NUL, not starting with ``.llmc-``) to ``str`` (written as UTF-8) or ``bytes``.
    ``.sh``/``.sbatch`` files get mode 0o777, others 0o666, less the process umask (as ``git checkout`` and
    ``open(2)`` create files: 0o755 / 0o644 under the usual umask 022, group-writable under 002, private under
    077). Raises ``BuildDirError`` (one-line
    ``message`` and a ``hint``) when:

    * ``out`` exists and is not a directory;
    * ``out`` is non-empty and is not an llmc build (no valid ``MANIFEST``);
    * a path in ``protect`` (e.g. the spec file) is ``out`` itself, or lies inside ``out`` and is not an
      llmc build, or a build would overwrite or remove it;
    * a new artifact would overwrite a file the previous build did not own, or one it owned whose content
      changed since (its sha256 differs from the manifest's: the user edited it);
    * a path in ``files`` leaves ``out`` or crosses a symlink inside ``out`` (``UnsafePathError``);
    * another ``write_build`` holds the directory lock.

``check_inside(base, rel) -> Path``
    ``base/rel`` resolved (symlinks followed); raises ``UnsafePathError`` if ``rel`` is absolute,
    contains ``..`` or NUL, or resolves outside ``base``. For the runtime to refuse lock paths that
    leave the build directory.

``read_manifest(out) -> Manifest | None``
    The committed manifest, ``None`` when ``out`` holds none.

An owned file the new build drops is removed only if it still holds what llmc wrote (sha256 as in the
manifest); an edited one, or one that is no longer a regular file, is kept and no longer owned
(``BuildResult.kept``).

``recover(out) -> None``
    Finish an interrupted, committed build and delete stale staging; readers (``llmc launch``) call it
    before reading a build directory.

Files llmc writes into ``out``
------------------------------
``MANIFEST`` (``.llmc-build.json``), deterministic (no timestamps; meant to be committed)::

    {"files": {"<rel>": "<sha256 hex>", ...}, "format": "llmc-build/1", "llmc_version": "0.1.0"}

Transient: ``.llmc-build.journal``, ``.llmc-build.journal.tmp-<pid>`` and ``.llmc-staging-<pid>/``;
``GITIGNORE`` holds the ``.gitignore`` lines that ignore them (and not the manifest).

Protocol (crash safety for the whole set, not just per file)
------------------------------------------------------------
1. Take an exclusive ``flock`` on the directory ``out`` itself (non-blocking).
2. Recover: if a journal exists, roll it forward (idempotent); then delete every staging directory and
   temporary journal (under the lock none can belong to a live build).
3. Write the changed artifacts and the new manifest into ``out/.llmc-staging-<pid>/``; fsync files and
   directories.
4. Commit point: atomically create the journal (temp file, fsync, ``os.replace``, fsync ``out``) naming
   the staging directory, the files to move in and the files to remove.
5. Apply: ``os.replace`` each staged file into place, unlink the removed ones, move the manifest in last,
   fsync, delete the journal, delete the staging directory. Applying (also when recovering) checks every
   path against the manifest still in place (the old one: it moves last): a file is replaced or unlinked
   only if it is missing or a link, or holds the content that manifest records for it. A journal found in a
   directory llmc did not build (copied, crafted) can therefore neither delete nor overwrite anything.

A build killed before step 4 leaves the old build (its staging directory is deleted by the next build);
killed after it, the next build finishes the new one before starting. All operations inside ``out``
go through directory file descriptors opened with ``O_NOFOLLOW``, so a symlink planted inside ``out``
is refused, never followed (POSIX ``openat``; see ``os`` "dir_fd" in the Python docs).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import llmc

MANIFEST = ".llmc-build.json"
JOURNAL = ".llmc-build.journal"
STAGING_PREFIX = ".llmc-staging-"
MANIFEST_FORMAT = "llmc-build/1"
EXECUTABLE_SUFFIXES = (".sh", ".sbatch")
RESERVED_PREFIX = ".llmc-"
#: top-level folders a run writes into a build directory (checkpoints, prepared data, the tokenizer, torchtitan's
#: dumps, caches): never an artifact, so a manifest naming a path there is not one llmc wrote
RUN_DIRS = frozenset({"run", "data", "assets", "outputs", "cache"})
GITIGNORE = f"/{JOURNAL}*\n/{STAGING_PREFIX}*/\n"  # lines for the build directory's .gitignore

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class BuildDirError(Exception):
    """A build directory llmc refuses to write (one-line message, optional hint)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return self.message + (f" ({self.hint})" if self.hint else "")


class UnsafePathError(BuildDirError):
    """A relative path that would leave its base directory."""


@dataclass(frozen=True)
class Manifest:
    llmc_version: str
    files: dict[str, str]  # relative path -> sha256 hex

    def to_json(self) -> str:
        doc = {"files": dict(sorted(self.files.items())), "format": MANIFEST_FORMAT,
               "llmc_version": self.llmc_version}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            doc = json.loads(text)
            ok = (isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT
                  and isinstance(doc.get("llmc_version"), str) and isinstance(doc.get("files"), dict))
            files = doc["files"] if ok else {}
            for rel, sha in files.items():
                _canonical(rel)
                ok = ok and isinstance(sha, str) and len(sha) == 64
        except (ValueError, UnsafePathError, RecursionError):  # RecursionError: JSON nested thousands deep
            ok = False
        if not ok:
            raise BuildDirError(f"{where}: not a valid llmc build manifest ({MANIFEST_FORMAT})",
                                "remove the directory or build into a new one")
        return cls(llmc_version=doc["llmc_version"], files=dict(files))


@dataclass(frozen=True)
class BuildResult:
    out: Path
    written: tuple[str, ...]  # created or changed
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]  # owned by the previous build, not by this one
    kept: tuple[str, ...] = ()  # dropped by this build but edited since (or no longer a file): left, disowned


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(rel: str) -> tuple[str, ...]:
    """The parts of a canonical relative artifact path, or UnsafePathError."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise UnsafePathError(f"{rel!r}: not a valid relative path")
    if rel.startswith("/"):
        raise UnsafePathError(f"{rel!r}: absolute path", "artifact paths are relative to the build directory")
    parts = tuple(rel.split("/"))
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"{rel!r}: path must not contain empty, '.' or '..' parts")
    if parts[0].startswith(RESERVED_PREFIX):
        raise UnsafePathError(f"{rel!r}: names starting with {RESERVED_PREFIX!r} are reserved for llmc")
    if parts[0] in RUN_DIRS and len(parts) > 1:
        raise UnsafePathError(f"{rel!r}: {parts[0]}/ holds what runs write, never a build artifact")
    return parts


def check_inside(base: Path, rel: str | Path) -> Path:
    """``base/rel`` resolved; refuses absolute paths, ``..``, NUL and symlinks that lead outside ``base``."""
    s = str(rel)
    if not s or "\0" in s:
        raise UnsafePathError(f"{s!r}: not a valid relative path")
    p = Path(s)
    if p.is_absolute():
        raise UnsafePathError(f"{s}: absolute path", f"give a path relative to {base}")
    if ".." in p.parts:
        raise UnsafePathError(f"{s}: '..' is not allowed", f"paths must stay inside {base}")
    root = Path(base).resolve()
    full = (root / p).resolve()
    if full != root and root not in full.parents:
        raise UnsafePathError(f"{s}: resolves to {full}, outside {root}", "a symlink leads out of the directory")
    return full


# ---------------------------------------------------------------- fd helpers (never follow symlinks)


def _open_dir(dfd: int, parts: Iterable[str], rel: str, create: bool) -> int | None:
    """An fd for the directory ``parts`` under ``dfd`` (None if missing and not ``create``)."""
    cur = os.dup(dfd)
    done: list[str] = []
    try:
        for name in parts:
            done.append(name)
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=cur)
            except FileNotFoundError:
                if not create:
                    os.close(cur)
                    return None
                os.mkdir(name, 0o777, dir_fd=cur)  # less the umask, as mkdir(1)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=cur)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"{rel}: {'/'.join(done)} is a symlink or not a directory",
                                          "llmc never writes through links inside a build directory") from None
                raise
            os.close(cur)
            cur = nxt
        return cur
    except BaseException:
        os.close(cur)
        raise


def _lstat(dfd: int, parts: tuple[str, ...], rel: str) -> os.stat_result | None:
    pfd = _open_dir(dfd, parts[:-1], rel, create=False)
    if pfd is None:
        return None
    try:
        return os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(pfd)


def _read(dfd: int, parts: tuple[str, ...], rel: str) -> bytes | None:
    """Contents of a regular file (None if missing, a symlink or not a regular file)."""
    try:
        pfd = _open_dir(dfd, parts[:-1], rel, create=False)
    except UnsafePathError:
        return None
    if pfd is None:
        return None
    try:
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
    except OSError:
        return None
    finally:
        os.close(pfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _write_new(pfd: int, name: str, data: bytes, mode: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (proc(5): ``Umask:`` in
    /proc/self/status); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode(rel: str, umask: int = 0o022) -> int:
    """An artifact's mode: 0o777 for scripts, 0o666 for the rest, less ``umask``. ``os.fchmod`` sets a mode
    as given, so the umask that ``open(2)`` applies to a new file is applied here."""
    return (0o777 if rel.endswith(EXECUTABLE_SUFFIXES) else 0o666) & ~umask


def _atomic_write_top(dfd: int, name: str, data: bytes) -> None:
    tmp = f"{name}.tmp-{os.getpid()}"
    try:
        os.unlink(tmp, dir_fd=dfd)
    except FileNotFoundError:
        pass
    _write_new(dfd, tmp, data, 0o644)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    os.fsync(dfd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------- manifest / journal


def _read_manifest_fd(dfd: int, out: Path) -> Manifest | None:
    data = _read(dfd, (MANIFEST,), MANIFEST)
    if data is None:
        if _lstat(dfd, (MANIFEST,), MANIFEST) is not None:
            raise BuildDirError(f"{out / MANIFEST}: not a regular file", "remove it or build into a new directory")
        return None
    return Manifest.from_json(data.decode("utf-8", "replace"), str(out / MANIFEST))


def read_manifest(out: Path) -> Manifest | None:
    """The committed manifest of the build in ``out`` (None when there is none)."""
    try:
        dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        return _read_manifest_fd(dfd, Path(out))
    finally:
        os.close(dfd)


def _holds_owned(dfd: int, parts: tuple[str, ...], rel: str, owned: Mapping[str, str]) -> bool:
    """Whether llmc may replace or unlink ``rel``: missing, a link (never followed), or a regular file still
    holding the content ``owned`` (the manifest in place) records for it."""
    try:
        st = _lstat(dfd, parts, rel)
    except UnsafePathError:
        return False
    if st is None or stat.S_ISLNK(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode) or rel not in owned:
        return False
    data = _read(dfd, parts, rel)
    return data is not None and _sha(data) == owned[rel]


def _apply(dfd: int, journal: dict) -> None:
    """Roll a committed journal forward; idempotent (safe to rerun after a crash at any point). Touches only
    what the manifest in place (the previous build's until the new one moves in, last) owns unchanged."""
    try:
        in_place = _read_manifest_fd(dfd, Path("."))
    except BuildDirError:
        in_place = None
    owned = in_place.files if in_place else {}
    staging = journal["staging"]
    sfd = _open_dir(dfd, (staging,), staging, create=False)
    try:
        for rel in journal["write"]:
            parts = _canonical(rel)
            if sfd is None:
                break
            spfd = _open_dir(sfd, parts[:-1], rel, create=False)
            if spfd is None:
                continue  # moved already
            try:
                try:
                    os.stat(parts[-1], dir_fd=spfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not _holds_owned(dfd, parts, rel, owned):
                    continue  # not llmc's (or edited): left as it is
                dpfd = _open_dir(dfd, parts[:-1], rel, create=True)
                try:
                    os.replace(parts[-1], parts[-1], src_dir_fd=spfd, dst_dir_fd=dpfd)
                    os.fsync(dpfd)
                finally:
                    os.close(dpfd)
            finally:
                os.close(spfd)
        for rel in journal["remove"]:
            parts = _canonical(rel)
            if not _holds_owned(dfd, parts, rel, owned):
                continue
            try:
                pfd = _open_dir(dfd, parts[:-1], rel, create=False)
            except UnsafePathError:
                continue  # a link now stands where an owned directory was: leave it alone
            if pfd is None:
                continue
            try:
                os.unlink(parts[-1], dir_fd=pfd)
                os.fsync(pfd)
            except FileNotFoundError:
                pass
            finally:
                os.close(pfd)
            for i in range(len(parts) - 1, 0, -1):  # drop directories the removal left empty
                ppfd = _open_dir(dfd, parts[: i - 1], rel, create=False)
                if ppfd is None:
                    break
                try:
                    os.rmdir(parts[i - 1], dir_fd=ppfd)
                except OSError:
                    break
                finally:
                    os.close(ppfd)
        if sfd is not None:
            try:
                os.replace(MANIFEST, MANIFEST, src_dir_fd=sfd, dst_dir_fd=dfd)
            except FileNotFoundError:
                pass
        os.fsync(dfd)
        os.unlink(JOURNAL, dir_fd=dfd)
        os.fsync(dfd)
    finally:
        if sfd is not None:
            os.close(sfd)


def _lock_dir(dfd: int, out: Path, busy: str) -> bool:
    """Take the build directory's exclusive flock for this process (released when ``dfd`` closes). False on a
    filesystem without flock (stale staging is then told by its writer's pid); BuildDirError when another
    process holds it."""
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BuildDirError(f"{out}: {busy}", "wait for it to finish") from None
    except OSError:
        return False
    return True


def _recover(dfd: int, out: Path, locked: bool) -> None:
    data = _read(dfd, (JOURNAL,), JOURNAL)
    if data is not None:
        try:
            journal = json.loads(data)
            ok = (isinstance(journal, dict) and isinstance(journal.get("staging"), str)
                  and journal["staging"].startswith(STAGING_PREFIX) and "/" not in journal["staging"]
                  and all(isinstance(journal.get(k), list) for k in ("write", "remove")))
        except (ValueError, RecursionError):
            ok = False
        if not ok:
            raise BuildDirError(f"{out / JOURNAL}: unreadable build journal",
                                "remove the directory or build into a new one")
        _apply(dfd, journal)
    for name in os.listdir(dfd):
        stale = name.startswith(STAGING_PREFIX) or name.startswith(JOURNAL + ".tmp-")
        if not stale:
            continue
        pid = name.rsplit("-", 1)[-1]
        if not locked and pid.isdigit() and _pid_alive(int(pid)):
            continue
        if name.startswith(STAGING_PREFIX) and os.path.isdir(out / name) and not os.path.islink(out / name):
            shutil.rmtree(out / name)
        else:
            os.unlink(name, dir_fd=dfd)
    os.fsync(dfd)


# ---------------------------------------------------------------- the entry point


def write_build(out: Path, files: Mapping[str, str | bytes], *, protect: Iterable[Path] = (),
                version: str = llmc.__version__) -> BuildResult:
    """Write ``files`` into ``out``, replacing only the artifacts a previous llmc build owned."""
    blobs: dict[str, bytes] = {}
    keys: dict[str, tuple[str, ...]] = {}
    for rel, data in files.items():
        keys[rel] = _canonical(rel)
        blobs[rel] = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    for rel, parts in keys.items():
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in blobs:
                raise UnsafePathError(f"{rel!r}: {'/'.join(parts[:i])!r} is both a file and a directory")

    umask = _umask()
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise BuildDirError(f"{out}: exists and is not a directory", "-o names the directory to write the build into")
    guarded = [Path(p).resolve() for p in protect]
    for p in guarded:
        if p == out:
            raise BuildDirError(f"{out}: is a path llmc must not overwrite", "pick another -o directory")
    out.mkdir(parents=True, exist_ok=True)
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # finish a committed build, drop stale staging
        _recover(dfd, out, _lock_dir(dfd, out, "another llmc build is writing this directory"))
        old = _read_manifest_fd(dfd, out)
        if old is None:
            if os.listdir(dfd):
                raise BuildDirError(f"{out}: directory is not empty and is not an llmc build (no {MANIFEST})",
                                    "build into a new or empty directory; llmc never overwrites files it did not write")
        owned = dict(old.files) if old else {}
        for p in guarded:
            if out not in p.parents:
                continue
            rel = p.relative_to(out).as_posix()
            hit = [k for k in (*blobs, *owned) if k == rel or k.startswith(rel + "/")]
            if hit:
                raise BuildDirError(f"{out}: the build would overwrite or remove {p}",
                                    "keep the spec outside the build directory")
        unchanged, to_write = [], []
        for rel, parts in keys.items():
            st = _lstat(dfd, parts, rel)
            if st is not None and rel not in owned:
                raise BuildDirError(f"{out / rel}: exists and was not written by llmc",
                                    "move it away; llmc never overwrites files it did not write")
            if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise BuildDirError(f"{out / rel}: is not a regular file", "remove it and build again")
            current = _read(dfd, parts, rel) if st is not None and stat.S_ISREG(st.st_mode) else None
            if current is not None and _sha(current) not in (owned[rel], _sha(blobs[rel])):
                raise BuildDirError(f"{out / rel}: changed since llmc wrote it (sha256 differs from {MANIFEST})",
                                    "llmc never overwrites edits: move the file away, or carry the change in the "
                                    "spec or on the command line, and build again")
            if current == blobs[rel] and (st.st_mode & 0o777) == _mode(rel, umask) and owned.get(rel) == _sha(blobs[rel]):
                unchanged.append(rel)
            else:
                to_write.append(rel)
        to_remove, kept = [], []
        for rel in sorted(set(owned) - set(blobs)):
            (to_remove if _holds_owned(dfd, _canonical(rel), rel, owned) else kept).append(rel)
        new = Manifest(llmc_version=version, files={k: _sha(v) for k, v in blobs.items()})
        if not to_write and not to_remove and old == new:
            return BuildResult(out, (), tuple(sorted(unchanged)), (), tuple(kept))

        staging = f"{STAGING_PREFIX}{os.getpid()}"
        os.mkdir(staging, 0o700, dir_fd=dfd)
        sfd = os.open(staging, _DIR_FLAGS, dir_fd=dfd)
        try:
            dirs: dict[tuple[str, ...], int] = {}
            try:
                for rel in to_write:
                    parts = keys[rel]
                    if parts[:-1] not in dirs:
                        dirs[parts[:-1]] = _open_dir(sfd, parts[:-1], rel, create=True)
                    _write_new(dirs[parts[:-1]], parts[-1], blobs[rel], _mode(rel, umask))
                for pfd in dirs.values():
                    os.fsync(pfd)
            finally:
                for pfd in dirs.values():
                    os.close(pfd)
            _write_new(sfd, MANIFEST, new.to_json().encode(), _mode(MANIFEST, umask))
            os.fsync(sfd)
        finally:
            os.close(sfd)
        os.fsync(dfd)
        journal = {"staging": staging, "write": sorted(to_write), "remove": to_remove}
        _atomic_write_top(dfd, JOURNAL, json.dumps(journal, sort_keys=True).encode())  # commit point
        _apply(dfd, journal)
        shutil.rmtree(out / staging)
        os.fsync(dfd)
        return BuildResult(out, tuple(sorted(to_write)), tuple(sorted(unchanged)), tuple(to_remove), tuple(kept))
    finally:
        os.close(dfd)


def recover(out: Path) -> None:
    """Finish a committed-but-interrupted build in ``out`` and drop stale staging (no-op when clean).

    For readers (``llmc launch``) that must not act on a half-applied build; ``write_build`` does this
    itself. Raises ``BuildDirError`` while another build is writing ``out``.
    """
    out = Path(out).resolve()
    if not out.is_dir():
        return
    dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _recover(dfd, out, _lock_dir(dfd, out, "an llmc build is writing this directory"))
    finally:
        os.close(dfd)
