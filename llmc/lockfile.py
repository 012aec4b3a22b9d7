"""The lockfile's schema: its name, version and the one reader (stdlib only).

``llmc launch``, the runtime and ``llmc plan --diff`` read locks through :func:`read_lock`, which refuses
a lock of another schema version, or one whose fields have the wrong JSON types (:func:`check_lock_shape`), with a
one-line reason; ``llmc.emit.lock`` writes them.
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
    return check_lock_shape(d)


# The JSON type of each lock field llmc's readers index (launch, report, calibrate, the runtime), where it is
# present and not null; ``stages[]`` is each stage.
_SHAPE = {
    "spec": "object", "spec.resolved": "object", "plan": "object", "backend": "object", "backend.name": "string",
    "hardware": "object", "hardware.key": "string", "hardware.gpus_per_node": "integer", "cluster": "object",
    "time": "object", "memory": "object", "hyper": "object", "model": "object", "model.init": "object",
    LOCK_HEADER_KEY: "object",
    "stages": "list", "stages[]": "object", "stages[].name": "string", "stages[].kind": "string",
    "stages[].order": "integer", "stages[].steps": "integer", "stages[].memory": "object",
    "preemption": "object", "preemption.shutdown_seconds": "integer", "preemption.signal_lead_seconds": "integer",
}
_TYPES = {"object": dict, "list": list, "string": str, "integer": int}
# ``plan``'s fields (llmc.compiler.plan.ParallelPlan, which is not imported here: this module is stdlib only): the
# names, then the whole numbers; tests/test_lockfile.py checks the two lists against the dataclass
_PLAN_NAMES = ("pp_schedule", "activation_checkpointing")
_PLAN_NUMBERS = ("dp_replicate", "dp_shard", "tp", "pp", "pp_virtual_stages", "cp", "ep", "micro_batch", "grad_accum",
                 "ac_layers", "zero_stage", "loss_chunk_tokens")


def _json_type(v: Any) -> str:
    """How JSON names the type of a parsed value ("a string", "an object", ...)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)


def _malformed(where: str, want: str, v: Any) -> ValueError:
    return ValueError(f"malformed lockfile: {where} must be {want}, got {_json_type(v)} (rebuild it with `llmc build`)")


def check_lock_shape(d: dict) -> dict:
    """``d`` when each field llmc reads from a lock has the JSON type llmc writes (:data:`_SHAPE`; an absent or
    null field is left to the readers, which take it as missing) and ``plan`` holds only the plan's fields, each
    a whole number or a name as ``ParallelPlan`` has it; else ValueError with a one-line reason naming the field. A hand-edited lock (``stages: "abc"``,
    ``plan: [1]``) is then one error line in every command, not an AttributeError deep inside one of them. Any
    schema version (``llmc calibrate`` reads older locks through it too)."""

    def check(path: str, v: Any, where: str) -> None:
        want = _SHAPE[path]
        if v is not None and (isinstance(v, bool) or not isinstance(v, _TYPES[want])):
            raise _malformed(where, ("an " if want[0] in "aeiou" else "a ") + want, v)

    for path in _SHAPE:
        head, _, key = path.rpartition(".")
        parent = d.get(head) if head else d
        if "[]" not in path and isinstance(parent, dict) and key in parent:
            check(path, parent[key], path)
    for i, stage in enumerate(d.get("stages") or []):
        check("stages[]", stage, f"stages[{i}]")
        for key in ("name", "kind", "order", "steps", "memory"):
            if isinstance(stage, dict) and key in stage:
                check(f"stages[].{key}", stage[key], f"stages[{i}].{key}")
    for key, v in (d.get("plan") or {}).items():
        if key not in _PLAN_NAMES + _PLAN_NUMBERS:
            raise ValueError(f"malformed lockfile: plan.{key} is not a field of a parallelism plan (rebuild it with "
                             "`llmc build`)")
        if key in _PLAN_NAMES and not isinstance(v, str):
            raise _malformed(f"plan.{key}", "a string", v)
        if key in _PLAN_NUMBERS and (isinstance(v, bool) or not isinstance(v, int)):
            raise _malformed(f"plan.{key}", "an integer", v)
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
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ValueError(f"not an llmc lockfile: {e}") from None
    return d


def read_lock(path: str | Path) -> dict:
    """Load a plan.lock.json; ValueError with a one-line reason if it is not a current llmc lock."""
    return check_lock(load_lock_json(path))
