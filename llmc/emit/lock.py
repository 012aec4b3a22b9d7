"""``plan.lock.json``: write, read, and explain the difference between a lock and a new compile.

The lock is ``Compiled.to_json()`` plus a ``_llmc`` header (llmc version, target library versions,
spec sha256) and ``schema_version``, JSON with sorted keys and a trailing newline, so it diffs well
in git. ``read_lock`` is the one reader (the CLI, ``llmc launch`` and the runtime use it); it refuses
a lock of another schema version with a one-line reason. ``diff_lock`` says WHAT changed (spec hash,
parameters, plan degrees, memory, step time, MFU, days, cost, diagnostics) and WHY (the
resolved-spec fields that changed, as dotted paths old -> new).
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from typing import Any

from llmc.emit.base import Emitter
from llmc.emit.common import dump_json, gpus_per_node, header_fields, nnodes, world
from llmc.lockfile import LOCK_FILE, LOCK_HEADER_KEY, SCHEMA_VERSION


def lock_dict(compiled) -> dict[str, Any]:
    """The lock as a dict: ``Compiled.to_json()``, whose ``spec`` records the input of the build: ``path``
    (relative to the build directory), ``file_sha256`` (the spec file's own bytes), ``overrides`` (the ``--set``
    overrides as given, in order; ``[]`` when none) and ``sha256`` (the file's bytes followed by the overrides: the
    file's own hash when there are none). A lock of an older llmc has neither ``file_sha256`` nor ``overrides``:
    its ``sha256`` may then include overrides nobody recorded (``llmc launch`` compares nothing with it). Besides:
    ``spec.dir_from_build``, the spec's folder relative to the build directory, against which the runtime
    resolves relative data and tokenizer paths wherever the build is launched from (a spec read from standard input:
    ``path`` is ``"<stdin>"``, ``llmc.spec.load.STDIN_SPEC``, and its folder the directory ``llmc build -`` ran in); and ``cluster`` (``nnodes``, ``gpus_per_node``, ``world``), the one place launchers and cluster
    manifests read the node layout from."""
    d = compiled.to_json()
    d["spec"]["dir_from_build"] = compiled.spec_folder()
    d["cluster"] = {"nnodes": nnodes(compiled), "gpus_per_node": gpus_per_node(compiled),
                    "world": world(compiled)}
    d[LOCK_HEADER_KEY] = header_fields(compiled)
    d["schema_version"] = SCHEMA_VERSION
    return d


def lock_text(compiled) -> str:
    return dump_json(lock_dict(compiled))


class LockEmitter(Emitter):
    name = "lock"

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        return {LOCK_FILE: lock_text(compiled)}


# ----------------------------------------------------------------------------------------- diffing


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of every leaf; lists of scalars stay one leaf, lists of dicts are indexed."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = {}
        for k in sorted(obj):
            out.update(_flatten(obj[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and any(isinstance(x, dict | list) for x in obj):
        if not obj and prefix:
            out[prefix] = []
        for i, x in enumerate(obj):
            out.update(_flatten(x, f"{prefix}[{i}]"))
    else:
        out[prefix] = obj
    return out


def spec_changes(old_spec: dict, new_spec: dict) -> list[tuple[str, Any, Any]]:
    """(dotted path, old, new) for every resolved-spec leaf that differs ("<absent>" when missing; a field a newer
    llmc adds is no change against a lock that lacks it when the new value is the field's default: null, or e.g.
    ``training.optimizer.no_decay``'s rule, which the older llmc applied without naming it)."""
    a, b = _flatten(old_spec or {}), _flatten(new_spec or {})
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va == vb or va is None and vb == "<absent>" or va == "<absent>" and vb is None:
            continue
        if "<absent>" in (va, vb) and _is_default(k, vb if va == "<absent>" else va):
            continue
        out.append((k, va, vb))
    return out


def _is_default(path: str, value: Any) -> bool:
    """Whether ``value`` is the RunSpec field's default at the dotted ``path`` (plain field names only: a path
    through a list element is never taken for a default)."""
    from pydantic import BaseModel

    from llmc.spec.schema import RunSpec

    model: Any = RunSpec
    *heads, leaf = path.split(".")
    for name in heads:
        field = model.model_fields.get(name) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return False
        model = field.annotation
    field = model.model_fields.get(leaf) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if field is None or field.default_factory is not None:
        return False
    default = field.default
    return value == (default.model_dump(mode="json") if isinstance(default, BaseModel) else default)


def _get(d: dict | None, path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# (label, dotted path in the lock JSON, kind) -- kind picks the formatting
_METRICS = [
    ("parameters", "model.params_total", "int"),
    ("active parameters", "model.params_active", "int"),
    ("tokens", "compute.tokens", "num"),
    ("training FLOPs", "compute.training_flops", "num"),
    ("global batch (seqs)", "hyper.global_batch_seqs", "int"),
    ("steps", "hyper.steps", "int"),
    ("learning rate", "hyper.lr", "num"),
    ("memory per GPU", "memory.per_gpu_bytes", "gib"),
    ("step time (s)", "time.step_seconds", "num"),
    ("MFU", "time.mfu", "pct"),
    ("days", "time.days", "num"),
    ("GPU-hours", "cost.gpu_hours", "num"),
    ("cost (USD)", "cost.usd", "num"),
]
_STAGE_FIELDS = [("steps", "steps"), ("lr", "lr"), ("seq_len", "seq_len"), ("trainable params", "trainable_params"),
                 ("memory per GPU", "memory.per_gpu_bytes"), ("fits", "memory.fits")]
_PLAN_KEYS = ("dp_replicate", "dp_shard", "tp", "pp", "pp_schedule", "cp", "ep", "micro_batch", "grad_accum",
              "activation_checkpointing", "ac_layers", "zero_stage")


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a JSON number (not a bool) that is finite as one; else None (an earlier lock is
    the user's file: ``read_lock`` refuses an integer beyond a float's range, but NaN, an infinity or a string where a
    figure belongs is shown as it is, not computed with)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    f = _number(v)
    if f is None and kind != "num":  # not a finite number where one belongs: as written
        return _short(v)
    if kind == "int":
        return f"{int(v):,}" if isinstance(v, int) else f"{int(f):,}"
    if kind == "gib":
        return f"{f / 2**30:.2f} GiB"
    if kind == "pct":
        return f"{f:.1%}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _diag_keys(diags: list[dict] | None) -> dict[str, dict]:
    out = {}
    for d in diags if isinstance(diags, list) else []:
        if isinstance(d, dict):  # (an earlier lock is the user's file: anything else is no diagnostic)
            out[f"{d.get('severity')}[{d.get('code')}] {d.get('path')}: {d.get('message')}"] = d
    return out


def diff_data(old: dict, new: dict) -> dict[str, Any]:
    """Structured diff between two lock dicts (the JSON form of ``diff_lock``)."""
    metrics = []
    for label, path, _kind in _METRICS:
        a, b = _get(old, path), _get(new, path)
        if a != b:
            entry = {"metric": label, "path": path, "old": a, "new": b}
            fa, fb = _number(a), _number(b)
            if fa and fb is not None:
                entry["ratio"] = fb / fa
            metrics.append(entry)
    plan = []
    po, pn = old.get("plan") or {}, new.get("plan") or {}
    for k in _PLAN_KEYS:
        if po.get(k) != pn.get(k):
            plan.append({"field": k, "old": po.get(k), "new": pn.get(k)})
    do, dn = _diag_keys(old.get("diagnostics")), _diag_keys(new.get("diagnostics"))
    serving = []
    so, sn = ([x if isinstance(x, dict) else {} for x in d.get("serving")] if isinstance(d.get("serving"), list)
              else [] for d in (old, new))
    for i in range(max(len(so), len(sn))):
        a = so[i] if i < len(so) else {}
        b = sn[i] if i < len(sn) else {}
        for k in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "kv_budget_gib", "fits"):
            if a.get(k) != b.get(k):
                serving.append({"target": i, "field": k, "old": a.get(k), "new": b.get(k)})
    stages = []
    so_, sn_ = ({st.get("name"): st for st in (d.get("stages") or []) if isinstance(st, dict)} for d in (old, new))
    for name in [*so_, *[n for n in sn_ if n not in so_]]:
        a, b = so_.get(name), sn_.get(name)
        if a is None or b is None:
            stages.append({"stage": name, "field": "stage", "old": None if a is None else "present",
                           "new": None if b is None else "present"})
            continue
        for label, path in _STAGE_FIELDS:
            va, vb = _get(a, path), _get(b, path)
            if va != vb:
                stages.append({"stage": name, "field": label, "old": va, "new": vb})
    old_spec = _get(old, "spec.resolved") or {}
    new_spec = _get(new, "spec.resolved") or {}
    return {
        "spec_sha256": {"old": _get(old, "spec.sha256"), "new": _get(new, "spec.sha256")},
        "llmc_version": {"old": old.get("llmc_version"), "new": new.get("llmc_version")},
        "changed": _get(old, "spec.sha256") != _get(new, "spec.sha256"),
        # the --set overrides each was built with (None: a lock of an older llmc, which did not record them)
        "overrides": {"old": _get(old, "spec.overrides"), "new": _get(new, "spec.overrides")},
        "why": [{"path": p, "old": a, "new": b} for p, a, b in spec_changes(old_spec, new_spec)],
        "metrics": metrics,
        "plan": plan,
        "serving": serving,
        "stages": stages,
        "diagnostics": {"added": sorted(set(dn) - set(do)), "removed": sorted(set(do) - set(dn))},
    }


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def _overrides_text(overrides: list) -> str:
    return shlex.join(str(o) for o in overrides) if overrides else "(none)"


def diff_lock(old: dict, compiled, fmt: str = "text") -> str:
    """Explain the difference between an earlier lock and a new compile (``llmc plan --diff``)."""
    new = lock_dict(compiled) if not isinstance(compiled, dict) else compiled
    data = diff_data(old, new)
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True, default=str)
    lines: list[str] = []
    sh = data["spec_sha256"]
    if not data["changed"] and not data["why"]:
        lines.append(f"spec unchanged (sha256 {str(sh['new'])[:12]})")
        if data["metrics"] or data["plan"] or data["stages"] or data["serving"]:
            lines.append("why: the spec is the same, so the differences below come from llmc itself "
                         "(its version, formulas or hardware table)")
    else:
        lines.append(f"spec sha256 {str(sh['old'])[:12]} -> {str(sh['new'])[:12]}")
    ov = data["overrides"]
    if isinstance(ov["old"], list) and isinstance(ov["new"], list) and ov["old"] != ov["new"]:
        lines.append(f"--set overrides {_overrides_text(ov['old'])} -> {_overrides_text(ov['new'])}")
    paths = (_get(old, "spec.path"), _get(new, "spec.path"))
    if paths[0] != paths[1]:
        lines.append(f"spec file {paths[0]} -> {paths[1]}")
    if data["llmc_version"]["old"] != data["llmc_version"]["new"]:
        lines.append(f"llmc {data['llmc_version']['old']} -> {data['llmc_version']['new']}")
    if data["why"]:
        lines.append("")
        lines.append("why (spec fields that changed):")
        for w in data["why"]:
            lines.append(f"  {w['path']}: {_short(w['old'])} -> {_short(w['new'])}")
    if data["plan"]:
        lines.append("")
        lines.append("plan:")
        for p in data["plan"]:
            lines.append(f"  {p['field']}: {p['old']} -> {p['new']}")
    if data["metrics"]:
        lines.append("")
        lines.append("numbers:")
        kinds = {label: kind for label, _, kind in _METRICS}
        for m in data["metrics"]:
            ratio = f"  (x{m['ratio']:.3g})" if "ratio" in m else ""
            k = kinds[m["metric"]]
            lines.append(f"  {m['metric']}: {_fmt(m['old'], k)} -> {_fmt(m['new'], k)}{ratio}")
    if data["serving"]:
        lines.append("")
        lines.append("serving:")
        for s in data["serving"]:
            lines.append(f"  serving[{s['target']}].{s['field']}: {s['old']} -> {s['new']}")
    if data["stages"]:
        lines.append("")
        lines.append("stages:")
        for st in data["stages"]:
            kind = "gib" if st["field"] == "memory per GPU" else ("int" if st["field"] in ("steps", "trainable params")
                                                                  else "num")
            lines.append(f"  {st['stage']}.{st['field']}: {_fmt(st['old'], kind)} -> {_fmt(st['new'], kind)}")
    dg = data["diagnostics"]
    if dg["added"] or dg["removed"]:
        lines.append("")
        lines.append("diagnostics:")
        lines += [f"  + {x}" for x in dg["added"]]
        lines += [f"  - {x}" for x in dg["removed"]]
    if len(lines) == 1 and not data["changed"]:
        lines.append("no differences in plan, numbers or diagnostics")
    return "\n".join(lines)
