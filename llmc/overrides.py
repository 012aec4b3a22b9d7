"""``--set key.path=value``: dotted overrides applied to a spec's YAML mapping before validation.

API
---
``parse_override(text) -> Override``
    ``"training.optimizer.lr=3e-4"`` -> ``Override(path="training.optimizer.lr", value=0.0003)``. The value
    is read as one YAML scalar or flow collection (``yaml.safe_load``: ``true``, ``8``, ``[1, 2]``,
    ``"quoted text"``; ``3e-4`` is a float, as in YAML 1.2 section 10.2.1.4, though PyYAML's YAML 1.1
    resolver reads it as a string); ``OverrideError`` (a ValueError: where, why) for a malformed override.
    A path part that is a non-negative integer indexes a list (``stages.0.steps=10``). A value whose YAML reading
    is not what its text says is an ``OverrideError`` too (quote it): one holding a comment that YAML drops
    (``path=/x/tok #2`` would set ``/x/tok``), or a number only YAML 1.1 reads so (``010`` octal, ``1:30`` base 60);
    so is one past the spec loader's YAML limits, the key path's levels counted (``llmc.spec.load.MAX_YAML_DEPTH``,
    ``MAX_YAML_NODES``, an alias inside its own anchor): its error names the override, not a line.
``apply_overrides(mapping, overrides) -> dict``
    A deep copy of ``mapping`` with every override applied in order; missing mappings on the way are
    created (a missing list is not: ``stages.0.name`` on a spec without ``stages`` is refused).
    ``OverrideError`` (a ValueError) when a path runs through a scalar, past the end of a list or into a missing one.
``read_with_overrides(path, overrides) -> LoadedSpec``
    Reads the spec file, applies the overrides to its YAML mapping and loads the result as
    ``llmc.spec.load.reads_spec`` does (an invalid result keeps its best-effort spec, so the compiler's
    independent checks still run). Diagnostics keep the spec file's own line numbers (a path the file
    does not spell has none); a diagnostic about an overridden path names the override instead of a
    line: ``--set training.optimizer.lr: error[S...] ...`` (``locate``, which the caller applies to the
    compiler's diagnostics too); one of no path about the text the overrides make (a YAML limit they pass only
    together) names every override. The result carries the overrides as given (``LoadedSpec.overrides``: their
    command-line text, in order) and the sha256 of the file's own bytes (``LoadedSpec.spec_file_sha256``), which
    the build records beside the hash of the spec plus overrides. ``load_with_overrides`` returns ``(RunSpec, lines, spec bytes)`` of it, or
    raises SpecError.
``override_bytes(overrides) -> bytes``
    The overrides as text, appended to the spec bytes for ``spec.sha256`` (the lock then identifies the
    effective input, not only the file; it records the file's own sha256 and the overrides beside it).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.([A-Za-z_][A-Za-z0-9_-]*|[0-9]+))*$")


class OverrideError(ValueError):
    """A ``--set`` that cannot be read or applied: ``where`` is the option as given (``--set 'a: b'``), ``why`` the
    reason, ``hint`` what to do where the reason does not say it, ``code`` the diagnostic code (S001; S010 for a
    number YAML 1.1 and 1.2 read differently, as in a spec file)."""

    def __init__(self, where: str, why: str, hint: str = "", code: str = "S001"):
        super().__init__(f"{where}: {why}")
        self.where, self.why, self.hint, self.code = where, why, hint, code


@dataclass(frozen=True)
class Override:
    path: str
    value: Any
    text: str  # as given on the command line

    @property
    def parts(self) -> list[str | int]:
        return [int(p) if p.isdigit() else p for p in self.path.split(".")]


def parse_override(text: str) -> Override:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep:
        raise OverrideError(f"--set {text!r}", "expected key.path=value (e.g. training.optimizer.lr=3e-4)")
    if not _PATH.match(key):
        raise OverrideError(f"--set {text!r}", f"{key!r} is not a dotted path of names and list indices")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise OverrideError(f"--set {key}", f"value {raw!r} is not a YAML scalar ({first})") from None
    except RecursionError:
        raise OverrideError(f"--set {key}", "the value is nested too deeply to read") from None
    except ValueError:  # an integer beyond Python's 4300-digit conversion limit
        raise OverrideError(f"--set {key}", f"value of {len(raw)} characters is not a number a spec takes") from None
    _bound(key, raw)
    try:
        surprise = _surprise(raw)
    except RecursionError:
        raise OverrideError(f"--set {key}", "the value is nested too deeply to read") from None
    if surprise is not None:
        why, fix, code = surprise
        if isinstance(value, list | dict) and code == "S010":
            # a number inside a list / mapping: quoting the whole value would make it one string
            raise OverrideError(f"--set {key}", f"value {raw!r} {why} ({fix}, or quote that item inside the value)",
                                code=code)
        quoted = shlex.quote(f"{key}={json.dumps(raw.strip())}")  # a JSON string is a YAML double-quoted scalar
        raise OverrideError(f"--set {key}", f"value {raw!r} {why} (quote the value to keep the text as typed, "
                                            f"--set {quoted}, or {fix})", code=code)
    if isinstance(value, str) and _FLOAT.match(raw.strip()):
        value = float(raw)  # YAML 1.2 reads 3e-4 as a number; PyYAML (YAML 1.1) needs a dot
    return Override(path=key, value=value, text=text)


def _bound(key: str, raw: str) -> None:
    """Refuse an override whose result no spec file could hold, by the spec loader's own limits (``llmc.spec.load``:
    :data:`~llmc.spec.load.MAX_YAML_DEPTH` levels counting the key path's, :data:`~llmc.spec.load.MAX_YAML_NODES`
    values counting alias expansions, no alias inside its own anchor): checked here, on the override, so the error
    names it (the spec is re-read from the text the overrides make, whose lines are not the file's) and before
    anything walks the value (an alias bomb's expansion is exponential; a key path of thousands of parts would
    overflow the YAML writer's recursion)."""
    from llmc.spec.load import MAX_YAML_DEPTH, _check_depth, _measure, _YAMLLimit

    parts = key.count(".") + 1
    if parts >= MAX_YAML_DEPTH:  # (the value sits one level below its key)
        raise OverrideError(f"--set {_short_key(key)}", f"the key path is {parts} levels deep, which with its value "
                            f"makes {parts + 1}, more than the {MAX_YAML_DEPTH} a spec may nest (a spec's keys are a "
                            "few levels deep: check the path against `llmc schema`)")
    try:
        _check_depth(raw)  # (the value's own text: its values and depth before composing)
        node = yaml.compose(raw, Loader=yaml.SafeLoader) if raw.strip() else None
        if node is not None:
            _measure(node, parts + 1, set(), {})  # (the spec's top mapping is level 1, each key path part one more)
    except _YAMLLimit as e:
        below = f", counting the key path's {parts} level{'s' if parts > 1 else ''}" if "nesting" in e.message else ""
        raise OverrideError(f"--set {key}", f"the value is too complex for a spec: {e.message}{below} ({e.hint})"
                            ) from None


def _short_key(key: str, limit: int = 100) -> str:
    """``key`` cut to ``limit`` characters for an error line (a key path of thousands of parts)."""
    return key if len(key) <= limit else f"{key[: limit - 3]}..."


def _surprise(raw: str) -> tuple[str, str, str] | None:
    """Why the YAML reading of a ``--set`` value that parses is not what its text says, the other fix than
    quoting it and the diagnostic code (S001; S010, the spec file's code, for a number); None when it is:

    - a comment: `` #`` (a ``#`` after a space or at the start) outside every token of the value starts a comment,
      which YAML drops (YAML 1.2 section 6.6, https://yaml.org/spec/1.2.2/#66-comments): ``path=/x/tok #2`` would set
      ``/x/tok``. Found as the text no token of PyYAML's scanner covers.
    - a YAML 1.1-only number: PyYAML's int / float resolvers (yaml/resolver.py, YAML 1.1 https://yaml.org/type/int.html,
      https://yaml.org/type/float.html) read ``010`` as octal 8 and ``1:30`` as base-60 90, where YAML 1.2's core schema
      (https://yaml.org/spec/1.2.2/#1032-tag-resolution) reads 10 and the text ``1:30``: a reader of the command
      cannot tell which was meant.
    (A YAML 1.1 boolean such as ``yes`` where a string belongs is refused by the spec's own validation: S002.)"""
    spans = sorted((t.start_mark.index, t.end_mark.index) for t in yaml.scan(raw)
                   if t.end_mark.index > t.start_mark.index)  # the text each token of the value covers
    starts = [a for a, _ in spans]

    def covered(i: int) -> bool:
        k = bisect.bisect_right(starts, i) - 1
        return k >= 0 and i < spans[k][1]

    at = next((i for i, c in enumerate(raw) if c == "#" and not covered(i)), None)
    if at is not None:
        dropped = raw[at:].split("\n")[0]
        return (f"holds the YAML comment {dropped!r}, which the value would silently lose (it reads as "
                f"{yaml.safe_load(raw)!r})", "leave the comment out", "S001")
    from llmc.spec.load import yaml11_number_surprise

    for node in _scalars(yaml.compose(raw, Loader=yaml.SafeLoader)):
        surprise = yaml11_number_surprise(node)
        if surprise is not None:
            return (*surprise, "S010")
    return None


def _scalars(node) -> list:
    """Every scalar node of a composed value (a flow collection's items, nested)."""
    if isinstance(node, yaml.ScalarNode):
        return [node]
    if isinstance(node, yaml.SequenceNode):
        return [s for item in node.value for s in _scalars(item)]
    if isinstance(node, yaml.MappingNode):
        return [s for k, v in node.value for s in _scalars(k) + _scalars(v)]
    return []


def apply_overrides(mapping: dict, overrides: list[Override]) -> dict:
    out = copy.deepcopy(mapping)
    for o in overrides:
        cur: Any = out
        parts = o.parts
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(str(p) for p in parts[: i + 1])
            if isinstance(cur, list):
                if not isinstance(part, int) or part >= len(cur):
                    raise OverrideError(f"--set {o.path}", f"{where} is not an index of the list "
                                        f"(it has {len(cur)} items)")
            elif isinstance(cur, dict):
                part = str(part)
            else:
                raise OverrideError(f"--set {o.path}", f"{'.'.join(str(p) for p in parts[:i])} is not a mapping")
            if last:
                cur[part] = copy.deepcopy(o.value)
            else:
                if isinstance(cur, dict) and (part not in cur or cur[part] is None):
                    if isinstance(parts[i + 1], int):  # an index into a list the spec does not have: no list to make
                        raise OverrideError(
                            f"--set {o.path}", f"{where} is not in the spec, so it has no item {parts[i + 1]}",
                            hint=f"write the list {where} in the spec file, or give it whole: --set "
                                 f"{shlex.quote(f'{where}=[...]')}")
                    cur[part] = {}
                cur = cur[part]
    return out


def override_bytes(overrides: list[Override]) -> bytes:
    return "".join(f"\n# --set {o.path}={yaml.safe_dump(o.value, default_flow_style=True).strip()}"
                   for o in overrides).encode()


def _covers(override_path: str, diag_path: str) -> bool:
    d = re.sub(r"\[(\d+)\]", r".\1", diag_path).lstrip(".")
    return d == override_path or d.startswith(override_path + ".") or override_path.startswith(d + ".") and bool(d)


def locate(diag, overrides: list[Override], lines: dict[str, int]):
    """The diagnostic with its line taken from the spec file, or pointing at the override it concerns."""
    from llmc.diagnostics import line_for

    for o in reversed(overrides):
        if diag.path and _covers(o.path, diag.path):
            return dataclasses.replace(diag, file=f"--set {o.path}", line=None)
    return dataclasses.replace(diag, line=line_for(lines, diag.path) if diag.path else diag.line)


def file_lines(text: str) -> dict[str, int]:
    """Dotted path -> 1-based line of every mapping key and list item in the YAML text (the loader's own
    walk: merge keys and null / bool / number keys as it locates them)."""
    from llmc.spec.load import _walk

    lines: dict[str, int] = {}
    try:
        _walk(yaml.compose(text, Loader=yaml.SafeLoader), "", lines, [], "")
    except yaml.YAMLError:
        return {}
    return lines


def read_with_overrides(path: str | Path, overrides: list[Override]):
    """The :class:`llmc.spec.load.LoadedSpec` of the spec file (``-``: standard input; read once) with the
    overrides applied: the file's own lines, its bytes followed by :func:`override_bytes`, every diagnostic
    located (:func:`locate`), the overrides' text and the sha256 of the file's own bytes; an invalid result
    keeps its best-effort spec, as ``read_spec``'s."""
    from llmc.diagnostics import Diagnostic, errors
    from llmc.spec.load import LoadedSpec, _parse_yaml, read_spec_bytes, reads_spec, spec_base_dir

    given = tuple(o.text for o in overrides)
    data = read_spec_bytes(path)
    if isinstance(data, LoadedSpec):
        return dataclasses.replace(data, overrides=given)
    base = spec_base_dir(path)
    file_sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    raw, _, diags = _parse_yaml(text, str(path)) if text is not None else (None, {}, [])
    if not isinstance(raw, dict) or errors(diags):  # the loader's own located errors for a malformed file
        # (its spec_bytes, spec.sha256's input, take the overrides as every other path's do)
        return dataclasses.replace(reads_spec(data, file=str(path), base_dir=base), overrides=given,
                                   spec_bytes=data + override_bytes(overrides))
    try:
        changed = apply_overrides(raw, overrides)
    except ValueError as e:
        return LoadedSpec(file=str(path), spec_bytes=data + override_bytes(overrides), lines={}, run=None,
                          diagnostics=[Diagnostic(
            code="S001", severity="error", path="", message=str(e),
            hint=getattr(e, "hint", "") or "check the key path against `llmc schema`", file=str(path))],
                          base_dir=base, spec_file_sha256=file_sha, overrides=given)
    lines = file_lines(text)
    loaded = reads_spec(yaml.safe_dump(changed, sort_keys=False), file=str(path), base_dir=base)
    # a diagnostic of no path about the text the overrides made (the file alone read cleanly: a YAML limit the
    # overrides together pass) has that text's line, not the file's: it names the overrides instead
    together = "--set " + ", --set ".join(_short_key(o.path) for o in overrides)
    return dataclasses.replace(loaded, spec_bytes=data + override_bytes(overrides), lines=lines,
                               diagnostics=[locate(d, overrides, lines) if d.path or not overrides else
                                            dataclasses.replace(d, file=together, line=None)
                                            for d in loaded.diagnostics],
                               spec_file_sha256=file_sha, overrides=given)


def load_with_overrides(path: str | Path, overrides: list[Override]):
    """``(RunSpec, lines, spec bytes with the overrides)`` of :func:`read_with_overrides`; SpecError on any error."""
    from llmc.diagnostics import SpecError

    loaded = read_with_overrides(path, overrides)
    if loaded.run is None:
        raise SpecError(loaded.diagnostics)
    return loaded.run, loaded.lines, loaded.spec_bytes
