"""The lockfile's schema: its name, version and the one reader (stdlib only).

``llmc launch``, the runtime and ``llmc plan --diff`` read locks through :func:`read_lock`, which refuses
a lock of another schema version, or one whose fields have the wrong JSON types (:func:`check_lock_shape`), with a
one-line reason; ``llmc.emit.lock`` writes them.
"""

from __future__ import annotations

import json
import sys
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
# present and not null; ``x[]`` is each element of the list ``x``. A parent comes before its fields (it is checked
# first). ``spec.resolved`` is the RunSpec the build compiled (``RunSpec.model_dump``): the sections launch and
# prepare read from it.
_SHAPE = {
    "spec": "object", "spec.resolved": "object", "plan": "object", "backend": "object", "backend.name": "string",
    "hardware": "object", "hardware.key": "string", "hardware.gpus_per_node": "integer", "cluster": "object",
    "time": "object", "time.checkpoint": "object", "memory": "object", "hyper": "object", "model": "object",
    "model.init": "object",
    LOCK_HEADER_KEY: "object",
    "stages": "list", "stages[]": "object", "stages[].name": "string", "stages[].kind": "string",
    "stages[].order": "integer", "stages[].steps": "integer", "stages[].memory": "object",
    "stages[].time": "object", "stages[].time.checkpoint": "object",
    "preemption": "object", "preemption.shutdown_seconds": "integer", "preemption.signal_lead_seconds": "integer",
    "spec.resolved.name": "string", "spec.resolved.hardware": "object",
    "spec.resolved.hardware.gpu": "string", "spec.resolved.hardware.count": "integer",
    "spec.resolved.hardware.gpus_per_node": "integer", "spec.resolved.budget": "object",
    "spec.resolved.training": "object", "spec.resolved.training.checkpoint": "object",
    "spec.resolved.parallelism": "object", "spec.resolved.eval": "object", "spec.resolved.cluster": "object",
    "spec.resolved.serving": "list",
    "spec.resolved.data": "object", "spec.resolved.data.sources": "list", "spec.resolved.data.sources[]": "object",
    "spec.resolved.stages": "list", "spec.resolved.stages[]": "object", "spec.resolved.stages[].name": "string",
    "spec.resolved.stages[].data": "object", "spec.resolved.stages[].data.sources": "list",
    "spec.resolved.stages[].data.sources[]": "object",
}
# fields every RunSpec has (no default): null is no more a lock's than a string is (``llmc launch`` reads them)
_NOT_NULL = ("spec.resolved.hardware", "spec.resolved.hardware.gpu", "spec.resolved.hardware.count")
_TYPES = {"object": dict, "list": list, "string": str, "integer": int}
# ``plan``'s fields (llmc.compiler.plan.ParallelPlan, which is not imported here: this module is stdlib only): the
# names, then the whole numbers; tests/test_lockfile.py checks the two lists against the dataclass
_PLAN_NAMES = ("pp_schedule", "activation_checkpointing")
_PLAN_NUMBERS = ("dp_replicate", "dp_shard", "tp", "pp", "pp_virtual_stages", "cp", "ep", "micro_batch", "grad_accum",
                 "ac_layers", "zero_stage", "loss_chunk_tokens")
#: Largest magnitude of a number in a lock: a float's (``sys.float_info.max``). JSON reads an integer of any size;
#: one beyond this is no figure llmc wrote, and every reader that divides or formats it would overflow.
MAX_LOCK_NUMBER = sys.float_info.max


def _json_type(v: Any) -> str:
    """How JSON names the type of a parsed value ("a string", "an object", ...)."""
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(v), type(v).__name__)


def _malformed(where: str, want: str, v: Any) -> ValueError:
    return ValueError(f"malformed lockfile: {where} must be {want}, got {_json_type(v)} (rebuild it with `llmc build`)")


def _found(d: dict, path: str) -> list[tuple[str, Any]]:
    """(where, value) of each occurrence of the :data:`_SHAPE` path ``path`` in ``d`` ("stages[].name": each stage's
    name, where "stages[2].name"); a level that is missing, or not an object or list, yields nothing."""
    at: list[tuple[str, Any]] = [("", d)]
    for part in path.split("."):
        each = part.endswith("[]")
        key = part[:-2] if each else part
        nxt = []
        for where, parent in at:
            if isinstance(parent, dict) and key in parent:
                here = f"{where}.{key}" if where else key
                if not each:
                    nxt.append((here, parent[key]))
                elif isinstance(parent[key], list):
                    nxt += [(f"{here}[{i}]", x) for i, x in enumerate(parent[key])]
        at = nxt
    return at


def _out_of_range(d: Any) -> tuple[str, int] | None:
    """(where, value) of the first integer in ``d`` beyond :data:`MAX_LOCK_NUMBER` (depth first, without recursion:
    a lock is as deep as JSON parsing allowed), else None."""
    todo: list[tuple[str, Any]] = [("", d)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, dict):
            todo += [(f"{where}.{k}" if where else str(k), x) for k, x in reversed(v.items())]
        elif isinstance(v, list):
            todo += [(f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v)))]
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_LOCK_NUMBER:
            return where, v
    return None


def check_lock_shape(d: dict) -> dict:
    """``d`` when each field llmc reads from a lock has the JSON type llmc writes (:data:`_SHAPE`; an absent or
    null field is left to the readers, which take it as missing, but for :data:`_NOT_NULL`'s), ``plan`` holds only
    the plan's fields, each a whole number or a name as ``ParallelPlan`` has it, and no number lies beyond a float's
    range (:data:`MAX_LOCK_NUMBER`); else ValueError with a one-line reason naming the field. A hand-edited lock
    (``stages: "abc"``, ``plan: [1]``, ``spec.resolved.hardware: "x"``, ``cost.gpu_hours: 1e400`` written as an
    integer) is then one error line in every command, not an AttributeError or OverflowError deep inside one of
    them. Any schema version (``llmc calibrate`` reads older locks through it too)."""
    for path, want in _SHAPE.items():
        for where, v in _found(d, path):
            if v is None and path not in _NOT_NULL:
                continue
            if isinstance(v, bool) or not isinstance(v, _TYPES[want]):
                raise _malformed(where, ("an " if want[0] in "aeiou" else "a ") + want, v)
    for key, v in (d.get("plan") or {}).items():
        if key not in _PLAN_NAMES + _PLAN_NUMBERS:
            raise ValueError(f"malformed lockfile: plan.{key} is not a field of a parallelism plan (rebuild it with "
                             "`llmc build`)")
        if key in _PLAN_NAMES and not isinstance(v, str):
            raise _malformed(f"plan.{key}", "a string", v)
        if key in _PLAN_NUMBERS and (isinstance(v, bool) or not isinstance(v, int)):
            raise _malformed(f"plan.{key}", "an integer", v)
    big = _out_of_range(d)
    if big is not None:
        raise ValueError(f"malformed lockfile: {big[0]} is an integer of {len(str(abs(big[1])))} digits, beyond a "
                         "float's range: no figure llmc writes (rebuild it with `llmc build`)")
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
