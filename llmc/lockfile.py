"""The lockfile's schema: its name, version and the one reader (stdlib only).

``llmc launch``, the runtime and ``llmc plan --diff`` read locks through :func:`read_lock`, which refuses
a lock of another schema version with a one-line reason; ``llmc.emit.lock`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmc.fileio import read_regular_file

#: Largest lock llmc reads: the lock of a many-stage pipeline is a few hundred KB; a larger file, or one that
#: is not a regular file (``/dev/zero``, a FIFO), is not a lock and is refused rather than read without end.
MAX_LOCK_BYTES = 64 * 2**20

LOCK_FILE = "plan.lock.json"
LOCK_HEADER_KEY = "_llmc"
# Version of the lock's layout. Bump it when a reader (``llmc launch``, the runtime) would misread
# an older lock; ``read_lock`` accepts exactly this version.
SCHEMA_VERSION = 2
_REQUIRED = ("llmc_version", "spec", "plan")


def check_lock(d: Any) -> dict:
    """Validate a parsed lock; ValueError with a one-line reason if it is not a current llmc lock."""
    if not isinstance(d, dict):
        raise ValueError("not an llmc lockfile: the top level is not a JSON object")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"not an llmc lockfile: missing {', '.join(missing)} (write one with `llmc build`)")
    if not isinstance(d.get("spec"), dict) or "sha256" not in d["spec"]:
        raise ValueError("not an llmc lockfile: spec.sha256 missing")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        found = "no schema_version" if version is None else f"schema_version {version!r}"
        raise ValueError(f"lock schema mismatch: {found}, this llmc reads schema_version {SCHEMA_VERSION} "
                         "(rebuild with `llmc build`)")
    return d


def load_lock_json(path: str | Path) -> Any:
    """The parsed JSON of a lock file (any schema version): a regular file of at most MAX_LOCK_BYTES; ValueError
    with a one-line reason if it cannot be read or parsed."""
    p = Path(path)
    try:
        text = read_regular_file(p, MAX_LOCK_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"no such file: {p}") from None
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"not an llmc lockfile: {p} is not UTF-8 text") from None
    except ValueError as e:
        raise ValueError(f"cannot read {p}: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not an llmc lockfile: invalid JSON at line {e.lineno} ({e.msg})") from None
    except RecursionError:
        raise ValueError("not an llmc lockfile: JSON nested too deeply") from None
    return d


def read_lock(path: str | Path) -> dict:
    """Load a plan.lock.json; ValueError with a one-line reason if it is not a current llmc lock."""
    return check_lock(load_lock_json(path))
