"""Load a run spec from YAML: line numbers, model resolution, validation, every error at once.

``load_spec(path)`` returns the validated :class:`~llmc.spec.schema.RunSpec` and a map from dotted
paths (``training.optimizer.lr``, ``stages.0.kind``, ``model.n_kv_heads``) to 1-based YAML lines,
which the compiler uses to put lines on its own diagnostics (:func:`line_for` falls back to the
nearest parent for paths the YAML does not spell out, e.g. fields that came from a preset).

Problems are never raised one at a time: the loader collects every one and raises a single
:class:`~llmc.diagnostics.SpecError`. Codes (stable; tests and docs cite them):

======  ====================================================================================
S000    spec file not found / unreadable / not a regular file (a FIFO or device named as the spec)
S001    unknown key (with did-you-mean)
S002    wrong type or value out of range; YAML syntax error
S003    missing required field
S004    unknown model preset (with did-you-mean)
S005    bad ``hf_config``: missing/invalid file, unsupported model_type (with did-you-mean), missing keys,
        ``architectures`` not the causal LM of its model_type, a rope_scaling without the keys transformers requires
S006    duplicate key in a YAML mapping (the later value would silently win)
S008    (warning) ``hf_config`` holds what the trained model leaves out although transformers' class has it: MTP
        layers (num_nextn_predict_layers), training regularisers (attention_dropout, router_jitter_noise, ...)
S009    (info) ``hf_config`` key that llmc ignores because transformers' class for its model_type ignores it too
S010    a plain number YAML 1.1 and YAML 1.2 read differently: octal ``010`` (8 / 10), base-60 ``1:30`` (90 / text)
M001    n_heads not divisible by n_kv_heads
M002    d_model not divisible by n_heads while head_dim is unset
M003    moe.top_k greater than moe.num_experts
M004    moe.dense_layers greater than n_layers
M005    tokenizer vocab_size larger than the model's vocab_size (smaller is fine: an embedding padded past it)
M006    qk_norm with MLA (q/k norms are modelled on GQA models: Qwen3, Qwen3-MoE)
M008    longrope factors: not one per rotary frequency (rotary dims / 2), or on an MLA model
M009    rotary_dim odd, larger than head_dim, or on an MLA model
M010    multipliers (Granite) with q/k/v biases, q/k norms, experts, MLA, partial RoPE or a sliding window
M011    sliding_window on an MLA model (windows are modelled on GQA models)
M012    nope_layers: a layer outside 0..n_layers-1 or listed twice / out of order, or with MLA, experts, q/k/v
        biases, q/k norms, partial RoPE, multipliers or a sliding window (NoPE is modelled on SmolLM3's block)
M013    norm_placement post / qk_norm_scope projection apart from OLMo 2's block (both, with qk_norm, and none of
        experts, q/k/v biases, partial RoPE or multipliers; OLMo 3 is OLMo 2's block with a sliding window) or
        OLMoE's (qk_norm_scope projection in a pre-norm block with experts, with qk_norm, without q/k/v biases,
        partial RoPE or multipliers)
M014    full_attention_layers: without sliding_window, a layer outside 0..n_layers-1 or listed twice / out of order,
        every layer listed, or apart from OLMo 3's, Gemma's and gpt-oss's blocks (where mixed windows are modelled);
        sliding_rope_theta without full_attention_layers
M015    norm_placement sandwich / norm_unit_offset / activation gelu_tanh / embedding_scale / query_pre_attn_scalar /
        attn_logit_softcap / final_logit_softcap apart from Gemma's block (the first four together, with per-head
        qk_norm (Gemma 3) or none (Gemma 2), and none of experts, MLA, q/k/v biases, partial RoPE, multipliers or
        NoPE layers)
M016    head_dim (or MLA's qk_rope_head_dim) odd where RoPE rotates the whole head: RoPE rotates pairs of dims
D004    duplicate data source name (in ``data.sources`` or a stage's)
G001    duplicate stage name (same code as the compiler's stage-graph check)
V004    ``serving.N.stage`` names no stage (same code as the compiler's serving check)
======  ====================================================================================
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmc.diagnostics import Diagnostic, SpecError, line_for
from llmc.fileio import read_regular_file
from llmc.spec.facts import MAX_CONFIG_BYTES
from llmc.spec.hf import (
    HF_KEY_FOR_FIELD,
    SUPPORTED_MODEL_TYPES,
    HFConfigError,
    architecture_from_hf_config,
    hf_config_notices,
)
from llmc.spec.model import Architecture, RopeScaling
from llmc.spec.presets import PRESETS
from llmc.spec.schema import (
    STAGE_KINDS,
    STAGE_TYPES,
    Data,
    Hardware,
    RunSpec,
    Serving,
    Source,
    StageBase,
    Tokenizer,
)

__all__ = ["LoadedSpec", "read_spec", "reads_spec", "load_spec", "loads_spec", "json_schema",
           "MAX_SPEC_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES"]

#: Largest spec file read (a spec is a few KiB; the largest example is under 8 KiB).
MAX_SPEC_BYTES = 2**20
#: A spec read from standard input (``llmc build -``) as a build records it (the lock's ``spec.path``, the build
#: README's and headers' "standard input"): no file, so ``llmc launch`` compares none (L009). Its relative paths
#: resolve against the current directory, which the lock records as ``spec.dir_from_build``.
STDIN_SPEC = "<stdin>"
#: Deepest nesting of YAML collections, counted after alias expansion (a spec needs about 6).
MAX_YAML_DEPTH = 64
#: Most YAML values (scalars and collections), counting every alias expansion: bounds "billion laughs"
#: alias bombs (https://en.wikipedia.org/wiki/Billion_laughs_attack), whose expansion is exponential,
#: and the time PyYAML spends on a huge flat list. The largest example spec has a few hundred.
MAX_YAML_NODES = 20_000
#: Longest integer literal read (Python refuses to convert integers of more than 4300 digits; a spec's are short).
MAX_NUMBER_CHARS = 4000


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class LoadedSpec:
    """Everything the loader learnt from one spec file, read once.

    ``spec_bytes`` are exactly the bytes parsed (hash these: a pipe cannot be read twice).
    ``run`` is the validated spec, None when ``diagnostics`` has errors. ``partial`` is then a
    best-effort spec in which every invalid value was replaced by its default (or the list holding
    it emptied), for compiling the checks that do not depend on the invalid values; None when no such
    spec exists (e.g. a required section is missing). ``invalid_paths`` are the dotted paths that
    were invalid (or dropped); diagnostics under them, computed from ``partial``, are meaningless.
    ``spec_file_sha256`` is the sha256 of the spec file's own bytes (None when none were read) and ``overrides``
    the ``--set`` overrides applied to it, their command-line text in order (:func:`llmc.overrides.
    read_with_overrides`); ``spec_bytes`` then end with the overrides, so their hash differs from the file's.
    Without a ``partial``, ``hardware`` and ``stages`` are those sections as validated on their own (None
    when invalid; ``stages`` only when every stage is valid), so the checks that read one section alone
    (an unknown GPU, an unknown ``init_from``) still run.
    """

    file: str
    spec_bytes: bytes
    lines: dict[str, int]
    diagnostics: list[Diagnostic]
    run: RunSpec | None
    partial: RunSpec | None = None
    invalid_paths: tuple[str, ...] = ()
    base_dir: str = "."
    hardware: Hardware | None = None
    stages: tuple[StageBase, ...] | None = None
    spec_file_sha256: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.run is not None


def read_spec(path: str | Path) -> LoadedSpec:
    """Read (once, at most :data:`MAX_SPEC_BYTES`), parse, resolve and validate a spec; never raises
    for bad input. ``"-"`` reads standard input; pipes such as ``/dev/stdin`` work too."""
    data = read_spec_bytes(path)
    if isinstance(data, LoadedSpec):
        return data
    file = str(path)
    return reads_spec(data, file=file, base_dir=spec_base_dir(path))


def reads_stdin(path: str | Path) -> bool:
    """Whether the spec at ``path`` is read as standard input is, having no folder of its own: ``-``, a path naming a
    process's own file descriptors (``/dev/stdin``, ``/dev/fd/63`` of ``<(command)``, ``/proc/self/fd/0``), or a link
    to a pipe, socket or terminal. Its relative paths then resolve against the current directory and a build records
    it as :data:`STDIN_SPEC`, as for ``-``."""
    import stat

    p = str(path)
    if p == "-" or re.fullmatch(r"/dev/(stdin|fd/\d+)|/proc/(self|\d+)/fd/\d+", p):
        return True
    try:
        mode = os.stat(p).st_mode
        return os.path.islink(p) and (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode))
    except OSError:
        return False


def spec_base_dir(path: str | Path) -> str:
    """The folder a spec's relative paths resolve against (the current one for standard input: :func:`reads_stdin`)."""
    return "." if reads_stdin(path) else str(Path(path).parent)


def read_spec_bytes(path: str | Path) -> bytes | LoadedSpec:
    """The spec file's bytes (``"-"``: standard input), read once and at most :data:`MAX_SPEC_BYTES`; or, when it
    cannot be read, a :class:`LoadedSpec` holding the located error."""
    file = str(path)
    base_dir = spec_base_dir(path)

    def fail(message: str, hint: str = "") -> LoadedSpec:
        return LoadedSpec(file=file, spec_bytes=b"", lines={}, base_dir=base_dir, run=None,
                          diagnostics=[_diag("S000", "", message, file=file, hint=hint)])

    try:
        if file == "-":
            data = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
        else:
            data = _read_spec_file(path)
    except FileNotFoundError:
        return fail(f"spec file not found: {file}", "check the path")
    except IsADirectoryError:
        return fail(f"spec path is a directory: {file}", "pass the YAML file")
    except _EmptyPipe:
        return fail(f"spec is a pipe that gave nothing: {file} (nothing was writing to it when llmc read it, or the "
                    "writer wrote nothing)", "start the writer first (`llmc plan <(cat spec.yaml)` does), or pass the "
                    "YAML file")
    except _NotRegular as e:
        return fail(f"spec is not a regular file ({e}): {file}",
                    "pass the YAML file itself; to pipe a spec in, give `-` (standard input) or `<(command)`")
    except OSError as e:
        return fail(f"cannot read spec: {_one_line(e.strerror or str(e))}", "check the path and its permissions")
    if len(data) > MAX_SPEC_BYTES:
        return fail(f"spec is larger than {MAX_SPEC_BYTES // 2**20} MiB", "a run spec is a few KiB of YAML")
    return data


class _NotRegular(OSError):
    """The spec path names something that is neither a file nor a pipe or terminal given on purpose: what it is."""


class _EmptyPipe(OSError):
    """The spec path led to a pipe that gave nothing: no writer when llmc opened it, or one that wrote nothing."""


def _read_spec_file(path: str | Path) -> bytes:
    """The bytes of the spec at ``path`` (at most :data:`MAX_SPEC_BYTES` + 1), never blocking on a FIFO that has no
    writer. A regular file is read. A FIFO, device or socket named by the path itself (``mkfifo f.yaml; llmc plan
    f.yaml``, ``/dev/zero``) is refused (:class:`_NotRegular`), but a terminal (``/dev/tty``: read to end of input,
    as ``-``). Through a link (``/dev/stdin``, ``/dev/fd/63`` of a process substitution ``<(cat spec.yaml)``, a
    symlink) a pipe is read as standard input is: opened with ``O_NONBLOCK`` (the open of a FIFO with no writer would
    block; https://man7.org/linux/man-pages/man7/fifo.7.html), the flag then cleared, so a writer's pipe is read to
    its end while one without a writer reads as empty at once (``read`` returns end of file: pipe(7)); a device there
    is read only when it is a terminal or the null device."""
    import fcntl
    import stat

    def kind(mode: int) -> str:
        return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"

    named = os.lstat(path).st_mode  # (not opened: opening a FIFO would wake a writer waiting on it)
    if stat.S_ISFIFO(named) or stat.S_ISSOCK(named) or stat.S_ISBLK(named):
        raise _NotRegular(kind(named))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode) and not os.isatty(fd) and (
                stat.S_ISCHR(named) or not (stat.S_ISFIFO(st.st_mode) or os.path.samestat(st, os.stat(os.devnull)))):
            raise _NotRegular(kind(st.st_mode))  # /dev/zero, or a link to a device
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
        if not data and stat.S_ISFIFO(st.st_mode):
            raise _EmptyPipe("a pipe")  # (no writer when it was opened, or one that wrote nothing)
        return data
    finally:
        os.close(fd)


def reads_spec(source: str | bytes, file: str = "<spec>", base_dir: str | Path = ".") -> LoadedSpec:
    """Like :func:`read_spec` for YAML text or bytes; ``base_dir`` resolves relative ``hf_config`` paths."""
    data = source.encode("utf-8", "surrogatepass") if isinstance(source, str) else bytes(source)

    def done(diags: list[Diagnostic], lines: dict[str, int] | None = None, run: RunSpec | None = None,
             partial: RunSpec | None = None, invalid: tuple[str, ...] = (), sections: dict[str, Any] | None = None
             ) -> LoadedSpec:
        return LoadedSpec(file=file, spec_bytes=data, lines=lines or {}, diagnostics=diags, run=run,
                          partial=partial if run is None else run, invalid_paths=invalid, base_dir=str(base_dir),
                          spec_file_sha256=hashlib.sha256(data).hexdigest(), **(sections or {}))

    if len(data) > MAX_SPEC_BYTES:
        return done([_diag("S000", "", f"spec is larger than {MAX_SPEC_BYTES // 2**20} MiB", file=file,
                           hint="a run spec is a few KiB of YAML")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return done([_diag("S000", "", f"spec is not UTF-8 text (byte {e.start})", file=file,
                           hint="save the file as UTF-8")])
    raw, lines, diags = _parse_yaml(text, file)
    if raw is None and diags:
        return done(diags, lines)
    if not isinstance(raw, dict):
        got = ("an empty file" if not text.strip() else "null") if raw is None else _got(raw)
        return done(diags + [_diag("S002", "", f"a spec must be a YAML mapping (got {got})", line=1,
                                   file=file, hint="start with `name: my-run`")], lines)

    ctx = _Ctx(file=file, lines=lines, diags=diags, text=text)
    # An empty section (`serving:` with nothing under it) is YAML null: treat it as absent.
    data_ = {k: v for k, v in raw.items() if not (v is None and k in _OPTIONAL_SECTIONS)}
    ctx.raw = data_
    model_ok = True
    if "model" in data_:
        resolved = _resolve_model(data_["model"], Path(base_dir), ctx)
        if resolved is None:
            model_ok = False
            data_.pop("model")
        else:
            data_["model"] = resolved

    run = None
    invalid: list[str] = []
    try:
        run = RunSpec.model_validate(data_)
    except ValidationError as e:
        for err in e.errors():
            if not model_ok and err["loc"][:1] == ("model",):
                continue  # already reported by the model resolution
            ctx.diags.append(_from_pydantic(err, ctx))
    if not model_ok:
        invalid.append("model")

    ctx.diags.extend(_checks_from_raw(data_, ctx))
    reported = {d.path for d in ctx.diags if d.severity == "error"}
    ctx.diags.extend(d for d in _unusable_text(raw, (), ctx) if d.path not in reported)
    diags = _dedupe(ctx.diags)
    if not any(d.severity == "error" for d in diags):
        assert run is not None
        return done(diags, lines, run)
    partial, dropped = _best_effort(data_, ctx) if model_ok else (None, [])
    invalid += dropped
    invalid += [d.path for d in diags if d.severity == "error" and d.path]
    return done(diags, lines, None, partial, tuple(dict.fromkeys(invalid)),
                None if partial is not None else _sections(data_))


def _sections(data: dict[str, Any]) -> dict[str, Any]:
    """The sections a check reads alone, each validated on its own (:class:`LoadedSpec`'s ``hardware`` /
    ``stages``), for a spec without a best-effort whole."""
    stages = _lenient_stages(data)
    return {"hardware": _lenient(Hardware, data.get("hardware")),
            "stages": tuple(stages) if all(s is not None for s in stages) else None}


def _lenient_stages(data: dict[str, Any]) -> list[StageBase | None]:
    """Each stage of ``data["stages"]`` validated on its own (unknown keys ignored); None where invalid."""
    stages_raw = data.get("stages") if isinstance(data.get("stages"), list) else []
    return [_lenient(t, s) if (t := _stage_type(s)) else None for s in stages_raw]


def load_spec(path: str | Path) -> tuple[RunSpec, dict[str, int]]:
    """Read, resolve and validate a YAML run spec (see :func:`read_spec`).

    Returns ``(spec, lines)`` where ``lines`` maps dotted paths to 1-based YAML lines.
    Raises :class:`SpecError` carrying every diagnostic (never a bare exception or traceback).
    """
    return _unwrap_loaded(read_spec(path))


def loads_spec(text: str | bytes, file: str = "<spec>", base_dir: str | Path = ".") -> tuple[RunSpec, dict[str, int]]:
    """Like :func:`load_spec` for YAML text; ``base_dir`` resolves relative ``hf_config`` paths."""
    return _unwrap_loaded(reads_spec(text, file=file, base_dir=base_dir))


def _unwrap_loaded(loaded: LoadedSpec) -> tuple[RunSpec, dict[str, int]]:
    if loaded.run is None:
        raise SpecError(loaded.diagnostics)
    return loaded.run, loaded.lines


def json_schema() -> dict[str, Any]:
    """JSON Schema of the run spec for editors (``llmc schema``); field docstrings are descriptions.

    ``model`` is widened to what the YAML accepts: a preset name, ``{preset|hf_config, overrides}``
    or an explicit architecture.
    """
    _describe_fields(RunSpec)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **RunSpec.model_json_schema()}
    defs = schema.setdefault("$defs", {})
    arch = defs["Architecture"]
    overrides = {
        "type": "object",
        "title": "ModelRef",
        "description": "A preset or an HF config.json, plus optional Architecture overrides.",
        "properties": {
            "preset": {"type": "string", "enum": sorted(PRESETS),
                       "description": "Name of a built-in preset (`llmc presets`)."},
            "hf_config": {"type": "string",
                          "description": "Path to a Hugging Face config.json, relative to the spec file."},
            **arch.get("properties", {}),
        },
        "additionalProperties": False,
    }
    desc = schema["properties"]["model"].get("description", "")
    schema["properties"]["model"] = {
        "description": desc,
        "anyOf": [
            {"type": "string", "enum": sorted(PRESETS), "description": "A preset name."},
            overrides,
            {"$ref": "#/$defs/Architecture"},
        ],
    }
    return _json_schema_bounds(schema)


#: pydantic writes a bound on an Annotated number (llmc's Int / Float) under its own name; JSON Schema's keywords
#: (https://json-schema.org/draft/2020-12/json-schema-validation#section-6.2) are what editors check
_BOUND_KEYWORDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}


def _json_schema_bounds(node: Any) -> Any:
    """``node`` with every numeric ``gt`` / ``ge`` / ``lt`` / ``le`` renamed to its JSON Schema keyword (which
    applies to numbers only: on a number-or-text field such as ``4M`` tokens a string passes it). A property named
    so holds a schema (a dict), never a number."""
    if isinstance(node, list):
        return [_json_schema_bounds(v) for v in node]
    if not isinstance(node, dict):
        return node
    return {(_BOUND_KEYWORDS[k] if k in _BOUND_KEYWORDS and isinstance(v, int | float) and not isinstance(v, bool)
             else k): _json_schema_bounds(v) for k, v in node.items()}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a spec model's fields: the string literal right after a field's annotated
    assignment, read from the class that annotates the field, cleaned with :func:`inspect.cleandoc` (what
    pydantic's ``use_attribute_docstrings`` puts in ``FieldInfo.description``). Read from the source on
    demand (``llmc schema``, missing-field hints) instead of when the models are built at import."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        own = klass.__dict__.get("__annotations__", {})
        if not own or not issubclass(klass, BaseModel) or klass.__module__.startswith("pydantic"):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (e.g. a frozen build)
            tree = None
        found: dict[str, str] = {}
        body = tree.body[0].body if tree is not None and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                found[node.target.id] = inspect.cleandoc(nxt.value.value)
        for name in own:  # a field annotated again in a subclass takes that class's docstring (or none)
            docs.pop(name, None)
            if name in found:
                docs[name] = found[name]
    return docs


def field_description(cls: type[BaseModel], name: str) -> str:
    """``Field(description=...)`` of a field, else its attribute docstring (:func:`field_docs`), else ""."""
    info = cls.model_fields.get(name)
    if info is not None and info.description:
        return info.description
    return field_docs(cls).get(name, "")


def _spec_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """Every model reachable from ``root``'s field annotations, each after the models its fields hold."""
    out: list[type[BaseModel]] = []
    seen: set[type] = set()

    def visit(tp: Any) -> None:
        for arg in typing.get_args(tp):
            visit(arg)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
            seen.add(tp)
            for info in tp.model_fields.values():
                visit(info.annotation)
            out.append(tp)

    visit(root)
    return out


def _describe_fields(root: type[BaseModel]) -> None:
    """Put the attribute docstrings into the models' field descriptions (where no description is set) and
    rebuild their schemas, so that the JSON Schema carries them."""
    for cls in _spec_models(root):
        docs = field_docs(cls)
        changed = False
        for name, info in cls.__pydantic_fields__.items():
            if info.description is None and name in docs:
                info.description = docs[name]
                changed = True
        if changed:
            cls.model_rebuild(force=True)


# ----------------------------------------------------------------------------- internals


class _Ctx:
    def __init__(self, file: str | None, lines: dict[str, int], diags: list[Diagnostic], raw: Any = None,
                 text: str | None = None):
        self.file = file
        self.lines = lines
        self.diags = diags
        self.raw = raw  # the (model-resolved) input, to tell real keys from pydantic's loc labels
        self.text = text  # the YAML source, for what a value was spelled as (:func:`_bool_hint`)

    def diag(self, code: str, path: str, message: str, hint: str = "", severity: str = "error") -> Diagnostic:
        return Diagnostic(code=code, severity=severity, path=path, message=message, hint=hint,  # type: ignore[arg-type]
                          line=line_for(self.lines, path), file=self.file)


def _diag(code: str, path: str, message: str, *, file: str | None, line: int | None = None,
          hint: str = "") -> Diagnostic:
    return Diagnostic(code=code, severity="error", path=path, message=message, hint=hint, line=line, file=file)


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen: set[tuple] = set()
    out = []
    for d in diags:
        key = (d.code, d.path, d.message, d.line)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: (d.line or 0, d.code, d.path))


_OPTIONAL_SECTIONS = frozenset(k for k, f in RunSpec.model_fields.items() if not f.is_required())

# --- YAML with line numbers

# PyYAML's wording -> what usually causes it.
_YAML_HINTS = [
    ("'\\t'", "YAML does not allow tabs for indentation; use spaces"),
    ("expected <block end>", "a line is indented differently from its siblings"),
    ("mapping values are not allowed here", "a value contains ': ' (quote it) or a key is mis-indented"),
    ("could not find expected ':'", "a key is missing its ':' or a quote is not closed"),
    ("found unexpected end of stream", "a quote or bracket is not closed"),
    ("found undefined alias", "an *alias refers to an &anchor that does not exist"),
]


class _YAMLLimit(Exception):
    """The YAML is well-formed but beyond what a spec needs (too deep, too many nodes, a cycle)."""

    def __init__(self, message: str, node: Any, hint: str):
        super().__init__(message)
        self.message, self.line, self.hint = message, node.start_mark.line + 1, hint


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than :data:`MAX_YAML_DEPTH` and more than :data:`MAX_YAML_NODES` values
    from the event stream, before composing (PyYAML's composer recurses once per level, so a deep
    document would exhaust the stack, and a huge flat list would take seconds per pass)."""
    depth = nodes = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise _YAMLLimit(f"more than {MAX_YAML_NODES:,} values", ev, "a run spec has a few hundred")
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise _YAMLLimit(f"nesting deeper than {MAX_YAML_DEPTH} levels", ev,
                                 "a spec is a few levels deep; flatten the structure")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1


def _measure(node: yaml.Node, depth: int, stack: set[int], memo: dict[int, tuple[int, int]]) -> int:
    """Nodes under ``node`` with every alias expanded (memoised, so shared anchors cost once); raises
    :class:`_YAMLLimit` for a cycle (an alias inside its own anchor), expanded depth beyond
    :data:`MAX_YAML_DEPTH` or more than :data:`MAX_YAML_NODES` nodes."""
    key = id(node)
    if key in stack:
        raise _YAMLLimit("an alias refers to an anchor that contains it (a recursive structure)", node,
                         "a spec must be a tree; copy the values instead of nesting an anchor in itself")
    if key in memo:
        size, height = memo[key]
    else:
        if depth > MAX_YAML_DEPTH:
            raise _YAMLLimit(f"nesting deeper than {MAX_YAML_DEPTH} levels (after expanding aliases)", node,
                             "a spec is a few levels deep")
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
            if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_NUMBER_CHARS:
                raise _YAMLLimit(f"a number {len(node.value)} characters long", node,
                                 "no figure in a spec needs more than a few digits")
        stack.add(key)
        size, height = 1, 1
        for child in children:
            size += _measure(child, depth + 1, stack, memo)
            height = max(height, 1 + memo[id(child)][1])
            if size > MAX_YAML_NODES:
                break
        stack.discard(key)
        memo[key] = (size, height)
    if depth + memo[key][1] - 1 > MAX_YAML_DEPTH:
        raise _YAMLLimit(f"nesting deeper than {MAX_YAML_DEPTH} levels (after expanding aliases)", node,
                         "a spec is a few levels deep")
    if size > MAX_YAML_NODES:
        raise _YAMLLimit(f"more than {MAX_YAML_NODES:,} values after expanding aliases", node,
                         "every alias expands to a copy of its anchor; this looks like an alias bomb")
    return size


def _parse_yaml(text: str, file: str) -> tuple[Any, dict[str, int], list[Diagnostic]]:
    """Compose (for marks) and construct (for values); map every path to its line.

    Bounded: nesting at most :data:`MAX_YAML_DEPTH` deep and at most :data:`MAX_YAML_NODES` values
    after alias expansion, checked before anything walks the expanded tree."""
    loader = None
    try:
        _check_depth(text)
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        diags: list[Diagnostic] = []
        if node is not None:
            _measure(node, 1, set(), {})
            _walk(node, "", lines, diags, file)  # before constructing: that flattens ``<<`` merges in place
        raw = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as e:  # control characters: the reader refuses before parsing
        line = text[: e.position].count("\n") + 1
        return None, {}, [_diag("S002", "", f"YAML error: character {e.character:#x} is not allowed", file=file,
                                line=line, hint="remove control characters from the file")]
    except _YAMLLimit as e:
        return None, {}, [_diag("S002", "", f"YAML too complex: {e.message}", file=file, line=e.line, hint=e.hint)]
    except yaml.MarkedYAMLError as e:
        return None, {}, [_yaml_syntax(e, file)]
    except yaml.YAMLError as e:
        return None, {}, [_diag("S002", "", f"YAML error: {_one_line(str(e))}", file=file)]
    finally:
        if loader is not None:
            loader.dispose()
    return raw, lines, diags


def _yaml_syntax(e: yaml.MarkedYAMLError, file: str) -> Diagnostic:
    mark = e.problem_mark or e.context_mark
    if e.context_mark is not None and "stream" in (e.problem or ""):
        mark = e.context_mark  # unclosed quote/bracket: point at where it was opened, not at EOF
    problem = e.problem or "invalid YAML"
    if e.context:
        problem = f"{problem} ({e.context})"
    problem = _one_line(problem)
    hint = next((h for pat, h in _YAML_HINTS if pat in problem), "check indentation, colons and quotes")
    return _diag("S002", "", f"YAML syntax error: {problem}", file=file, line=mark.line + 1 if mark else None,
                 hint=hint)


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int], diags: list[Diagnostic], file: str,
          merged: bool = False) -> None:
    """Record the line of every path; report duplicate keys. Keys merged in with ``<<`` (YAML merge
    key, https://yaml.org/type/merge.html) keep their anchors' lines and yield to explicit keys."""
    if isinstance(node, yaml.MappingNode):
        explicit = {_key_text(k) for k, _ in node.value if k.value != "<<"}
        seen: set[str] = set()
        for k, v in node.value:
            key = _key_text(k)
            if key == "<<":
                for m in v.value if isinstance(v, yaml.SequenceNode) else [v]:
                    if isinstance(m, yaml.MappingNode):
                        for mk, mv in m.value:
                            mkey = _key_text(mk)
                            if mkey != "<<" and mkey not in explicit:
                                mpath = f"{prefix}.{_seg(mkey)}" if prefix else _seg(mkey)
                                lines.setdefault(mpath, mk.start_mark.line + 1)
                                _walk(mv, mpath, lines, diags, file, merged=True)
                continue
            path = f"{prefix}.{_seg(key)}" if prefix else _seg(key)
            _number_check(v, path, diags, file, merged)
            if key in seen and not merged:
                diags.append(_diag("S006", path, f"duplicate key {key!r}", file=file, line=k.start_mark.line + 1,
                                   hint="the later value would silently replace the earlier one"))
            seen.add(key)
            lines[path] = k.start_mark.line + 1
            _walk(v, path, lines, diags, file, merged)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}" if prefix else str(i)
            lines[path] = item.start_mark.line + 1
            _number_check(item, path, diags, file, merged)
            _walk(item, path, lines, diags, file, merged)


def _number_check(node: yaml.Node, path: str, diags: list[Diagnostic], file: str, merged: bool) -> None:
    """S010 for a plain number that YAML 1.1 (PyYAML, which reads the spec) and YAML 1.2 read differently
    (:func:`yaml11_number_surprise`); a merged-in value is reported at its anchor, once."""
    surprise = yaml11_number_surprise(node) if not merged else None
    if surprise is not None:
        message, hint = surprise
        diags.append(_diag("S010", path, f"{node.value!r} {message}", file=file, line=node.start_mark.line + 1,
                           hint=f"{hint}, or quote it if it is text"))


def yaml11_number_surprise(node: yaml.Node) -> tuple[str, str] | None:
    """Why a plain YAML scalar is not the number its text reads as in YAML 1.2, and the fix; None when it is.

    PyYAML implements YAML 1.1's int / float resolvers (yaml/resolver.py; https://yaml.org/type/int.html,
    https://yaml.org/type/float.html): ``010`` is octal 8 and ``1:30`` is base-60 90, where YAML 1.2's core schema
    (https://yaml.org/spec/1.2.2/#1032-tag-resolution), every other YAML reader a reviewer or tool may use, and a
    person reading the file read 10 and the text ``1:30``. Shared by the spec file (S010) and ``--set`` values."""
    if not isinstance(node, yaml.ScalarNode) or node.style is not None:
        return None
    text, tag = node.value, node.tag.rsplit(":", 1)[-1]
    if tag not in ("int", "float"):
        return None
    if ":" in text:
        return (f"is a base-60 number to YAML 1.1 ({text!r} -> {yaml.safe_load(text)!r}) but the text {text!r} "
                "to YAML 1.2", "write the number itself")
    digits = text.replace("_", "").lstrip("+-")
    if tag == "int" and len(digits) > 1 and digits[0] == "0" and digits.isdigit() and int(digits, 8) != int(digits):
        sign = "-" if text.lstrip().startswith("-") else ""
        return (f"is octal to YAML 1.1 ({text!r} -> {yaml.safe_load(text)!r}) but {sign}{int(digits)} to YAML 1.2",
                "write the number without its leading zero")
    return None


# --- model resolution


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def _norm_model_name(name: str) -> str:
    """``meta-llama/Meta-Llama-3.1-8B`` -> ``llama3.18b``; ``llama3.1-8b`` -> ``llama3.18b``."""
    n = name.lower().rsplit("/", 1)[-1]
    n = re.sub(r"-(hf|v0\.\d|base)$", "", n)
    n = n.removeprefix("meta-")
    return re.sub(r"[^a-z0-9.]", "", n)


def _preset_hint(name: str) -> str:
    """Did-you-mean for a preset: HF repo ids and case/punctuation variants first, then difflib."""
    norm = {_norm_model_name(p): p for p in PRESETS}
    if _norm_model_name(name) in norm:
        return f"did you mean {norm[_norm_model_name(name)]!r}?"
    dym = _did_you_mean(name.lower(), PRESETS)
    return dym or "`llmc presets` lists them"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_model(value: Any, base_dir: Path, ctx: _Ctx) -> dict[str, Any] | None:
    """YAML ``model:`` -> a dict for :class:`Architecture` (None after reporting a diagnostic)."""
    if isinstance(value, str):
        if value not in PRESETS:
            ctx.diags.append(ctx.diag("S004", "model", f"unknown preset {value!r}", _preset_hint(value)))
            return None
        return PRESETS[value].model_dump(exclude_unset=True)
    if isinstance(value, Architecture):
        return value.model_dump()
    if not isinstance(value, dict):
        ctx.diags.append(ctx.diag("S002", "model", f"must be a preset name or a mapping (got {_got(value)})",
                                  "e.g. `model: llama3-8b` or `model: {preset: llama3-8b, n_layers: 16}`"))
        return None
    over = dict(value)
    preset = over.pop("preset", None)
    hf = over.pop("hf_config", None)
    if preset is not None and hf is not None:
        ctx.diags.append(ctx.diag("S002", "model.hf_config", "give either `preset` or `hf_config`, not both"))
        return None
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            ctx.diags.append(ctx.diag("S004", "model.preset", f"unknown preset {preset!r}", _preset_hint(str(preset))))
            return None
        return _deep_merge(PRESETS[preset].model_dump(exclude_unset=True), over)
    if hf is not None:
        base = _load_hf(hf, base_dir, ctx)
        return None if base is None else _deep_merge(base, over)
    return over  # explicit architecture


def _load_hf(hf: Any, base_dir: Path, ctx: _Ctx) -> dict[str, Any] | None:
    path = "model.hf_config"
    if not isinstance(hf, str):
        ctx.diags.append(ctx.diag("S005", path, f"must be a path to a config.json (got {_got(hf)})",
                                  "e.g. `model: {hf_config: Llama-3.1-8B/config.json}`, relative to the spec file"))
        return None
    f = Path(hf) if Path(hf).is_absolute() else base_dir / hf
    if f.is_dir():
        f = f / "config.json"
    try:
        cfg = json.loads(read_regular_file(f, MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        ctx.diags.append(ctx.diag("S005", path, f"HF config not found: {f}", "paths are relative to the spec file"))
        return None
    except RecursionError:
        ctx.diags.append(ctx.diag("S005", path, f"cannot read HF config {f}: JSON nested too deeply",
                                  "a Hugging Face config.json is a flat JSON object of a few levels"))
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        ctx.diags.append(ctx.diag("S005", path, f"cannot read HF config {f}: {_one_line(str(e))}",
                                  "a Hugging Face config.json (a regular file of at most 4 MiB)"))
        return None
    if not isinstance(cfg, dict):
        ctx.diags.append(ctx.diag("S005", path, f"HF config {f} is not a JSON object",
                                  "a Hugging Face config.json is one JSON object: {\"model_type\": ..., ...}"))
        return None
    name = f.parent.name if f.stem == "config" else f.stem
    try:
        arch = architecture_from_hf_config(cfg, name=name or "custom")
    except HFConfigError as e:
        for m, hint in zip(e.problems, e.hints, strict=True):
            if m.key == "model_type" and isinstance(cfg.get("model_type"), str):
                dym = _did_you_mean(cfg["model_type"], SUPPORTED_MODEL_TYPES)
                hint = f"{dym} {hint}" if dym else hint
            ctx.diags.append(ctx.diag("S005", path, _one_line(m), hint))
        return None
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            key = HF_KEY_FOR_FIELD.get(str(err["loc"][0])) if err["loc"] else None
            where = f"{loc} (config.json {key!r})" if key else loc  # ("": a check of the whole model)
            ctx.diags.append(ctx.diag("S005", path, f"{f.name}: {where + ' ' if where else ''}{_human_message(err)}",
                                      f"fix {key!r} in config.json" if key else
                                      "config.json describes a model llmc cannot build; fix the keys named above"))
        return None
    # what the model llmc trains leaves out of the config: S008 (warning: transformers' class would have it),
    # S009 (info: that class ignores it as well)
    line = line_for(ctx.lines, path)
    for severity, m in hf_config_notices(cfg):
        if severity == "warning":
            ctx.diags.append(Diagnostic(code="S008", severity="warning", path=path, message=_one_line(m), hint=m.hint,
                                        line=line, file=ctx.file))
        else:
            ctx.diags.append(Diagnostic(code="S009", severity="info", path=path, message=_one_line(m), hint=m.hint,
                                        line=line, file=ctx.file))
    return arch.model_dump(exclude_unset=True)


# --- pydantic errors -> diagnostics


def _got(v: Any) -> str:
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list | tuple):
        return "a list"
    if v is None:
        return "null"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def _unwrap(tp: Any) -> Any:
    """Strip Optional/Annotated/list to reach a BaseModel class (or return the bare type)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else (args[0] if len(args) == 1 else tp)
            if not models and len(args) != 1:
                return tp
        else:
            return tp


def _model_at(loc: tuple, raw: Any = None) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (RunSpec-relative); a stage's class
    is the one its ``kind`` in ``raw`` selects."""
    cur: Any = RunSpec
    for i, part in enumerate(loc[:-1]):
        if isinstance(part, int):
            origin = typing.get_origin(cur)
            if origin in (list, tuple):
                cur = _unwrap(typing.get_args(cur)[0])
                if loc[:1] == ("stages",) and i == 1:
                    cur = _stage_type(_at(raw, loc[:2]))
                continue
            return None
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _unwrap(cur.model_fields[part].annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _at(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(part, int) and isinstance(raw, list) and 0 <= part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _stage_type(raw_stage: Any) -> type[StageBase] | None:
    """The stage model a raw stage mapping's ``kind`` selects (None: no or an unknown kind)."""
    kind = raw_stage.get("kind") if isinstance(raw_stage, dict) else None
    return STAGE_TYPES.get(kind) if isinstance(kind, str) else None


_OPS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
        "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _human_message(err: dict[str, Any]) -> str:
    t = err["type"]
    ctx = err.get("ctx") or {}
    inp = err.get("input")
    got = _got(inp)
    if t in _OPS:
        key, op = _OPS[t]
        bound = ctx.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound) if abs(bound) < 1e9 else f"{bound:g}"  # 1e+17, not 100000000000000000
        return f"must be {op} {bound} (got {got})"
    if t == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {got})"
    if t in ("int_parsing", "int_type", "int_from_float"):
        return f"must be an integer (got {got})"
    if t == "finite_number":
        return f"must be a finite number (got {got})"
    if t in ("float_parsing", "float_type"):
        return f"must be a number (got {got})"
    if t in ("bool_parsing", "bool_type"):
        return f"must be true or false (got {got})"
    if t == "string_type":
        return f"must be a string (got {got})"
    if t in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (got {got})"
    if t in ("list_type", "tuple_type"):
        return f"must be a list (got {got})"
    if t == "too_short" and isinstance(err.get("input"), str):
        return f"must not be empty (got {got})" if ctx.get("min_length") == 1 else \
            f"must be at least {ctx.get('min_length')} characters long (got {got})"
    if t == "too_short":
        return f"must have at least {ctx.get('min_length')} items (got {ctx.get('actual_length')})"
    if t == "too_long":
        return f"must have at most {ctx.get('max_length')} items (got {ctx.get('actual_length')})"
    if t == "string_pattern_mismatch":
        return f"must be a simple name: letters, digits, '.', '_' or '-', not starting with a symbol (got {got})"
    if t == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg.removeprefix("Value error, ")
    msg = err["msg"]
    return f"{msg[:1].lower()}{msg[1:]} (got {got})"


_INTERNAL = re.compile(r"^[a-z][\w-]*\[.*\]$")  # pydantic's union/validator branch labels


def _clean_loc(loc: tuple, raw: Any) -> tuple:
    """Drop pydantic's internal loc segments (``function-before[...]``), keeping real YAML keys."""
    out: list = []
    cur = raw
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, dict) and part == cur.get("kind") and part in STAGE_TYPES:
            continue  # the discriminated union's tag (``stages.0.sft.dpo_beta``): not a YAML key
        elif isinstance(part, int) and isinstance(cur, list | tuple) and 0 <= part < len(cur):
            cur = cur[part]
        elif isinstance(part, str) and _INTERNAL.match(part):
            continue
        elif part == "[key]" and out:  # pydantic's marker of an error in a mapping's key: the path ends at the key
            continue
        else:
            cur = None
        out.append(part)
    return tuple(out)


def _one_line(text: str) -> str:
    """``text`` with control characters (newlines from a file's content) escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def _key_text(node: yaml.Node) -> str:
    """A mapping key's path segment as the loaded document has it: a plain ``~`` / ``null`` / ``yes`` /
    ``0x10`` key is YAML null / bool / int (so the loaded path says ``null`` / ``True`` / ``16``)."""
    if isinstance(node, yaml.ScalarNode) and node.tag in _CONSTRUCTED_KEY_TAGS:
        try:
            return _seg(yaml.constructor.SafeConstructor().construct_object(node))
        except (yaml.YAMLError, ValueError, OverflowError):
            pass
    return str(node.value)


#: YAML 1.1 scalar tags whose loaded key is not the text (PyYAML's SafeLoader resolvers)
_CONSTRUCTED_KEY_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float"))


def _seg(part: Any) -> str:
    """A path segment, with control characters escaped so a diagnostic stays on one line (a YAML null key
    reads ``null``)."""
    text = "null" if part is None else str(part)
    return text if text.isprintable() else repr(text)[1:-1]


def _from_pydantic(err: dict[str, Any], ctx: _Ctx, prefix: tuple = (), root: type[BaseModel] | None = None
                   ) -> Diagnostic:
    """One pydantic error -> one diagnostic. ``root``/``prefix``: the error came from validating
    ``root`` at ``prefix`` on its own (e.g. a stage's ``rope_scaling`` dict as :class:`RopeScaling`)."""
    loc = _clean_loc(prefix + tuple(err["loc"]), ctx.raw)
    t = err["type"]
    if t == "invalid_key" and loc:  # pydantic's loc holds str(key) ('None') or a bool as 1: the key itself
        loc = (*loc[:-1], err.get("input"))
    rel = loc[len(prefix):]
    path = ".".join(_seg(p) for p in loc)
    if root is None:
        holder = _model_at(loc, ctx.raw) if loc else None
    else:
        holder = root if len(rel) == 1 else None
    if t == "extra_forbidden":
        key = str(loc[-1])
        options = sorted(holder.model_fields) if holder else []
        if holder is Architecture and loc[:1] == ("model",):
            options += ["preset", "hf_config"]
        hint = _did_you_mean(key, options) or (f"valid keys: {', '.join(options)}" if options else "")
        if holder is not None and issubclass(holder, StageBase) and len(loc) == 3:
            kind = _at(ctx.raw, loc[:2])["kind"]
            owners = [k for k, t in STAGE_TYPES.items() if key in t.model_fields]
            if owners:
                hint = f"{key!r} belongs to {' / '.join(owners)} stages"
            return ctx.diag("S001", path, f"unknown key {key!r} for a {kind} stage", hint)
        return ctx.diag("S001", path, f"unknown key {key!r}", hint)
    if t == "union_tag_not_found":
        return ctx.diag("S003", f"{path}.kind", "missing required field 'kind'",
                        f"one of: {', '.join(STAGE_KINDS)}")
    if t == "union_tag_invalid":
        got = (err.get("ctx") or {}).get("tag")
        return ctx.diag("S002", f"{path}.kind", f"must be one of {', '.join(STAGE_KINDS)} (got {got!r})",
                        _did_you_mean(str(got), STAGE_KINDS))
    if t == "missing":
        key = str(loc[-1])
        desc = ""
        if holder and key in holder.model_fields:
            desc = field_description(holder, key).split("\n")[0]
        d = ctx.diag("S003", path, f"missing required field {key!r}", desc.replace("``", "`"))
        return d if d.line is not None else dataclasses.replace(d, line=1)
    hint = "quote the key: YAML reads ~, null, yes / no, on / off and numbers as other types" if t == "invalid_key" else ""
    if t == "literal_error":
        opts = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        hint = _did_you_mean(str(err.get("input")), opts) if opts else ""
        if isinstance(err.get("input"), bool) and root is None:
            word = _source_scalar(ctx.text, loc)
            if word is not None and word in opts:  # an option that YAML 1.1 reads as a boolean unquoted
                hint = _bool_hint(loc, word, err["input"])
    if t == "string_type" and isinstance(err.get("input"), bool) and root is None:
        hint = _bool_hint(loc, _source_scalar(ctx.text, loc) or str(err["input"]).lower(), err["input"])
    message = _human_message(err)
    if err["loc"][-1:] == ("[key]",) and message.startswith("must "):  # the path ends at a key, not at its value
        message = f"the key {message}"
    return ctx.diag("S002", path, message, hint)


def _bool_hint(loc: tuple, word: str, value: bool) -> str:
    """The hint for a YAML 1.1 boolean where a string belongs (the "Norway problem": unquoted ``no``, ``off``,
    ``yes``, ``on`` are booleans in YAML 1.1, which PyYAML implements; https://yaml.org/type/bool.html): quote it."""
    key = loc[-1] if loc else ""
    quoted = f'- "{word}"' if isinstance(key, int) else f'{_seg(key)}: "{word}"'
    return f"YAML 1.1 reads an unquoted {word} as {str(value).lower()}: quote it, {quoted}"


def _source_scalar(text: str | None, loc: tuple) -> str | None:
    """The plain scalar at ``loc`` as the YAML source spells it (``off`` for a loaded False), or None where it cannot
    be told (no source, a path through a merge key or an alias the walk does not follow)."""
    if text is None:
        return None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError, ValueError):
        return None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in reversed(node.value) if _key_text(k) == _seg(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            return None
    return node.value if isinstance(node, yaml.ScalarNode) and node.style is None else None


# --- best-effort spec (for compiling the checks that do not depend on the invalid values)

#: placeholder for an invalid run name in the best-effort spec (the name feeds no number)
_PLACEHOLDER_NAME = "invalid-name"


def _tree_copy(value: Any) -> Any:
    """A copy of the YAML value with no shared parts (aliases), so dropping a key drops it once."""
    if isinstance(value, dict):
        return {k: _tree_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree_copy(v) for v in value]
    return value


def _path_loc(path: str, data: Any) -> tuple:
    """A diagnostic's dotted path as a loc into ``data``: a segment is a list index only inside a list."""
    loc: list = []
    cur = data
    for part in path.split(".") if path else []:
        if isinstance(cur, list) and part.isascii() and part.isdigit():
            loc.append(int(part))
            cur = cur[int(part)] if int(part) < len(cur) else None
        else:
            loc.append(part)
            cur = cur.get(part) if isinstance(cur, dict) else None
    return tuple(loc)


def _drop_target(loc: tuple, missing: bool) -> tuple:
    """What to remove for an error at ``loc``: the value itself (its default then applies), the holder
    of a missing required field, and a whole list rather than one element (indices must not shift)."""
    t = loc[:-1] if missing else loc
    if t and isinstance(t[-1], int):
        t = t[:-1]
    return t


def _drop(data: dict[str, Any], target: tuple) -> bool:
    """Remove ``target`` from ``data``; False when it cannot be removed (a required top-level section)."""
    if target == ("name",):
        data["name"] = _PLACEHOLDER_NAME
        return True
    if not target or target[0] in ("model", "data", "hardware") and len(target) == 1:
        return False
    cur: Any = data
    for part in target[:-1]:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(part, int) and isinstance(cur, list) and 0 <= part < len(cur):
            cur = cur[part]
        else:
            return True  # already gone with a parent
    if isinstance(cur, dict):
        cur.pop(target[-1], None)
    return True


def _best_effort(data: dict[str, Any], ctx: _Ctx) -> tuple[RunSpec | None, list[str]]:
    """A valid RunSpec built from ``data`` with every invalid value removed (its default applies, or the
    list holding it is emptied); None when a required section itself is invalid. Also the dotted paths
    removed. Values the structural checks refused (e.g. n_kv_heads not dividing n_heads) are removed
    too, so that the compiler never sees a spec the loader would refuse."""
    data = _tree_copy(data)
    dropped: list[str] = []

    def drop(target: tuple) -> bool:
        dropped.append(".".join(str(p) for p in target))
        return _drop(data, target)

    for d in ctx.diags:
        # S006: the later value of a duplicate key is a valid value; keep it (its path is still invalid)
        if d.severity == "error" and d.path and d.code != "S006" and not d.path.startswith("model.hf_config"):
            if not drop(_drop_target(_path_loc(d.path, data), missing=d.code == "S003")):
                return None, dropped
    for _ in range(8):
        try:
            return RunSpec.model_validate(data), dropped
        except ValidationError as e:
            for err in e.errors():
                loc = _clean_loc(tuple(err["loc"]), data)
                if not drop(_drop_target(loc, missing=err["type"] in ("missing", "union_tag_not_found"))):
                    return None, dropped
    return None, dropped


# --- structural checks (pure validation, no math)


def _try(cls: type[BaseModel], value: Any) -> Any:
    try:
        return cls.model_validate(value)
    except (ValidationError, TypeError):
        return None


def _known(cls: type[BaseModel], value: Any) -> Any:
    """``value`` without keys ``cls`` does not know (already reported as S001), recursively for models."""
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in cls.model_fields:
            sub = _unwrap(cls.model_fields[k].annotation)
            out[k] = _known(sub, v) if isinstance(sub, type) and issubclass(sub, BaseModel) else v
    return out


def _lenient(cls: type[BaseModel], value: Any) -> Any:
    """Validate ``value`` ignoring unknown keys; None if it is still invalid."""
    return _try(cls, _known(cls, value)) if isinstance(value, dict) else None


def _checks_from_raw(data: dict[str, Any], ctx: _Ctx) -> list[Diagnostic]:
    """Validate each section on its own so checks still run when another section has errors."""
    arch = _lenient(Architecture, data.get("model"))
    dat = _lenient(Data, data.get("data"))
    if dat is None and isinstance(data.get("data"), dict):  # e.g. tokens missing, a bad source: still check the
        # tokenizer and the source names (each source as far as it reads: an invalid one keeps its index)
        raw = data["data"]
        tok = _lenient(Tokenizer, raw.get("tokenizer")) or Tokenizer.model_construct()
        srcs = raw.get("sources") if isinstance(raw.get("sources"), list) else []
        named = [Source.model_construct(name=s.get("name") if isinstance(s, dict) else None) for s in srcs]
        dat = Data.model_construct(tokenizer=tok, sources=named, seq_len=1, tokens=1.0)
    stages_raw = data.get("stages") if isinstance(data.get("stages"), list) else []
    serving_raw = data.get("serving") if isinstance(data.get("serving"), list) else []
    stages = _lenient_stages(data)
    out: list[Diagnostic] = []
    for i, s in enumerate(stages_raw):
        # Stage.rope_scaling is a plain dict in the contract; hold it to the RopeScaling schema here.
        rs = s.get("rope_scaling") if isinstance(s, dict) else None
        if isinstance(rs, dict):
            try:
                RopeScaling.model_validate(rs)
            except ValidationError as e:
                out += [_from_pydantic(err, ctx, ("stages", i, "rope_scaling"), RopeScaling) for err in e.errors()]
    serving = [_lenient(Serving, s) for s in serving_raw]
    return out + _structural(arch, dat, stages, serving, ctx)


def _unusable_text(value: Any, loc: tuple, ctx: _Ctx) -> list[Diagnostic]:
    """S002 for every string value holding a NUL (no file name, argument or environment value can) or a lone
    surrogate (a ``\\udc80`` escape: not Unicode text, so no file can store it as written)."""
    if isinstance(value, dict):
        return [d for k, v in value.items() for d in _unusable_text(v, (*loc, k), ctx)]
    if isinstance(value, list):
        return [d for i, v in enumerate(value) for d in _unusable_text(v, (*loc, i), ctx)]
    if not isinstance(value, str):
        return []
    path = ".".join(_seg(p) for p in loc)
    if "\0" in value:
        return [ctx.diag("S002", path, "holds a NUL character (\\0), which no path, argument or file name can",
                         "remove the \\0 escape")]
    bad = next((c for c in value if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        return [ctx.diag("S002", path, f"holds a lone surrogate ({ascii(bad)[1:-1]}), which is not Unicode text",
                         "write the character itself: the spec is UTF-8")]
    return []


def _switches_on(arch: Architecture, *names: str) -> list[str]:
    """Those of the named architecture switches that are set, in the order given (what M010 / M012 / M013 name as
    not modelled together with the switch they are about)."""
    on = {"mla": arch.mla, "moe": arch.moe, "qkv_bias": arch.qkv_bias, "qk_norm": arch.qk_norm,
          "rotary_dim": arch.partial_rotary, "multipliers": arch.multipliers, "sliding_window": arch.sliding_window}
    return [n for n in names if on[n]]


def _gemma_block(arch: Architecture, ctx: _Ctx) -> list[Diagnostic]:
    """M015: Gemma's block switches are modelled together only (and with none of the other blocks' parts): Gemma 3's
    with per-head q / k norms, Gemma 2's without (and its logit soft-capping)."""
    parts = {"norm_placement": arch.norm_placement == "sandwich", "norm_unit_offset": arch.norm_unit_offset,
             "activation": arch.activation == "gelu_tanh", "embedding_scale": arch.embedding_scale}
    extra = [k for k in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap")
             if getattr(arch, k) is not None]
    if not any(parts.values()) and not extra:
        return []
    if not any(parts.values()):
        return [ctx.diag("M015", f"model.{extra[0]}", f"{extra[0]} is modelled on Gemma's block only (norm_placement: "
                         "sandwich, norm_unit_offset, activation: gelu_tanh, embedding_scale)",
                         f"remove {extra[0]}, or import the model's config.json")]
    where = "model." + next(k for k, on in parts.items() if on)
    if not all(parts.values()) or (arch.qk_norm and arch.qk_norm_scope != "head"):
        return [ctx.diag("M015", where, "norm_placement: sandwich, norm_unit_offset, activation: gelu_tanh and "
                         "embedding_scale are modelled together only (Gemma's block: with per-head qk_norm, Gemma 3; "
                         "without, Gemma 2)", "set them all (or import the model's config.json), or none")]
    other = _switches_on(arch, "moe", "mla", "qkv_bias", "rotary_dim", "multipliers") + (
        ["nope_layers"] if arch.nope_layers else [])
    if other:
        return [ctx.diag("M015", f"model.{other[0]}", f"Gemma's block with {', '.join(other)} is not modelled",
                         f"remove {other[0]}")]
    if arch.qk_norm and arch.attn_logit_softcap is not None:
        return [ctx.diag("M015", "model.attn_logit_softcap", "attention soft-capping with Gemma 3's block (per-head "
                         "qk_norm) is not modelled: transformers' Gemma3ForCausalLM does not apply it",
                         "remove attn_logit_softcap (Gemma 2's block, without qk_norm, has it)")]
    if not arch.qk_norm and arch.full_attention_layers and (arch.rope_scaling or arch.sliding_rope_theta):
        key = "rope_scaling" if arch.rope_scaling else "sliding_rope_theta"
        return [ctx.diag("M015", f"model.{key}", f"Gemma 2's block rotates every layer with one RoPE (transformers' "
                         f"Gemma2ForCausalLM): {key} apart for the windowed layers is not modelled for it",
                         f"remove {key}, or use Gemma 3's block (per-head qk_norm)")]
    return []


def _structural(arch: Architecture | None, data: Data | None, stages: list[StageBase | None],
                serving: list[Serving | None], ctx: _Ctx) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    if arch is not None:
        if arch.n_heads % arch.kv_heads:
            out.append(ctx.diag("M001", "model.n_kv_heads",
                                f"n_heads ({arch.n_heads}) must be divisible by n_kv_heads ({arch.kv_heads})",
                                "each KV head serves an equal group of query heads"))
        if arch.head_dim is None and arch.d_model % arch.n_heads:
            out.append(ctx.diag("M002", "model.n_heads",
                                f"d_model ({arch.d_model}) must be divisible by n_heads ({arch.n_heads})",
                                "or set head_dim explicitly"))
        if arch.moe is not None:
            if arch.moe.top_k > arch.moe.num_experts:
                out.append(ctx.diag("M003", "model.moe.top_k",
                                    f"top_k ({arch.moe.top_k}) exceeds num_experts ({arch.moe.num_experts})"))
            if arch.moe.dense_layers > arch.n_layers:
                out.append(ctx.diag("M004", "model.moe.dense_layers",
                                    f"dense_layers ({arch.moe.dense_layers}) exceeds n_layers ({arch.n_layers})"))
        if arch.qk_norm and arch.mla is not None:
            out.append(ctx.diag("M006", "model.qk_norm",
                                "qk_norm with MLA is not modelled (Qwen3's q/k norms are supported on GQA models, dense "
                                "or MoE)", "set qk_norm: false"))
        rs = arch.rope_scaling
        if rs is not None and rs.type == "longrope":
            if arch.mla is not None:
                out.append(ctx.diag("M008", "model.rope_scaling.type", "longrope is modelled on GQA models only (Phi-3)",
                                    "use type: yarn for MLA"))
            elif len(rs.short_factor) * 2 != (arch.partial_rotary or arch.hd):
                dims = f"rotary_dim {arch.partial_rotary}" if arch.partial_rotary else f"head_dim {arch.hd}"
                out.append(ctx.diag("M008", "model.rope_scaling.short_factor",
                                    f"longrope has {len(rs.short_factor)} factors for {dims}",
                                    f"give one per rotary frequency: {dims.split()[0]} / 2 = "
                                    f"{(arch.partial_rotary or arch.hd) // 2}"))
        if arch.sliding_window is not None and arch.mla is not None:
            out.append(ctx.diag("M011", "model.sliding_window",
                                "sliding-window attention with MLA is not modelled (Mistral's and Phi-3's windows are, "
                                "on GQA models)", "remove sliding_window"))
        r = arch.rotary_dim
        if r is not None and (r % 2 or r > arch.hd or arch.mla is not None):
            why = ("rotary_dim with MLA is not modelled (MLA's rope dims are mla.qk_rope_head_dim)" if arch.mla is not None
                   else f"rotary_dim {r} must be even and at most head_dim {arch.hd}")
            out.append(ctx.diag("M009", "model.rotary_dim", why, "RoPE rotates pairs of the first rotary_dim dims"))
        rope_dims = arch.mla.qk_rope_head_dim if arch.mla is not None else None if arch.partial_rotary else arch.hd
        if rope_dims is not None and rope_dims % 2 and len(arch.nope_layers) < arch.n_layers:
            where = "model.mla.qk_rope_head_dim" if arch.mla is not None else "model.head_dim"
            out.append(ctx.diag("M016", where, f"{where.rsplit('.', 1)[1]} {rope_dims} is odd: RoPE rotates pairs of dims "
                                "(transformers refuses such a model too)", "use an even head dimension"))
        nope = arch.nope_layers
        if nope and (any(b <= a for a, b in zip(nope, nope[1:], strict=False)) or nope[-1] >= arch.n_layers):
            out.append(ctx.diag("M012", "model.nope_layers",
                                f"nope_layers {list(nope)[:12]} must name layers 0..{arch.n_layers - 1}, each once, "
                                "in increasing order", "SmolLM3-3B's are [3, 7, 11, ..., 35]: every 4th of 36"))
        elif nope:
            other = _switches_on(arch, "mla", "moe", "qkv_bias", "qk_norm", "rotary_dim", "multipliers",
                                 "sliding_window")
            if other:
                out.append(ctx.diag("M012", "model.nope_layers",
                                    f"nope_layers with {', '.join(other)} is not modelled (NoPE layers are, on "
                                    "SmolLM3's plain Llama block)", f"remove {other[0]} or nope_layers"))
        olmo2 = (arch.norm_placement == "post", arch.qk_norm_scope == "projection")
        # OLMoE (arXiv:2409.02060): a pre-norm block with OLMo 2's q / k norms over the whole projections and experts
        olmoe = arch.norm_placement == "pre" and arch.qk_norm_scope == "projection" and arch.moe is not None
        if olmoe:
            other = _switches_on(arch, "qkv_bias", "rotary_dim", "multipliers")
            if not arch.qk_norm or other:
                out.append(ctx.diag("M013", "model.qk_norm_scope", "OLMoE's block (pre-norm, experts, q / k norms over "
                                    "the whole projections) needs qk_norm: true"
                                    + (f" and none of {', '.join(other)}" if other else ""),
                                    f"remove {other[0]}" if other else "set qk_norm: true"))
        elif any(olmo2):
            where = "model.norm_placement" if olmo2[0] else "model.qk_norm_scope"
            # (with MLA: M006, with NoPE layers: M012, both about its q/k norms)
            other = _switches_on(arch, "moe", "qkv_bias", "rotary_dim", "multipliers")
            if not all(olmo2) or not arch.qk_norm:
                out.append(ctx.diag("M013", where, "norm_placement: post, qk_norm: true and qk_norm_scope: projection "
                                    "are modelled together only (OLMo 2's block)", "set all three, or none"))
            elif other:
                out.append(ctx.diag("M013", where, f"OLMo 2's block with {', '.join(other)} is not modelled",
                                    f"remove {other[0]}"))
        full = arch.full_attention_layers
        if full:
            if arch.sliding_window is None:
                out.append(ctx.diag("M014", "model.full_attention_layers", "full_attention_layers without "
                                    "sliding_window: the other layers' window is missing",
                                    "set sliding_window (OLMo 3: 4096), or remove full_attention_layers"))
            elif any(b <= a for a, b in zip(full, full[1:], strict=False)) or full[-1] >= arch.n_layers:
                out.append(ctx.diag("M014", "model.full_attention_layers",
                                    f"full_attention_layers {list(full)[:12]} must name layers 0..{arch.n_layers - 1}, "
                                    "each once, in increasing order", "OLMo 3-7B's are [3, 7, 11, ..., 31]: every "
                                    "4th of 32"))
            elif len(full) == arch.n_layers:
                out.append(ctx.diag("M014", "model.full_attention_layers", "every layer is listed in "
                                    "full_attention_layers: no layer keeps the window",
                                    "remove sliding_window and full_attention_layers"))
            elif arch.norm_placement == "pre" and not arch.attn_sinks:  # (gpt-oss's block: pre-norm, mixed windows)
                out.append(ctx.diag("M014", "model.full_attention_layers", "layers with and without the window are "
                                    "modelled on OLMo 3's, Gemma's and gpt-oss's blocks only",
                                    "remove full_attention_layers (one window in every layer), or use OLMo 3's "
                                    "block"))
        elif arch.sliding_rope_theta is not None:
            out.append(ctx.diag("M014", "model.sliding_rope_theta", "sliding_rope_theta without full_attention_layers "
                                "(it is the windowed layers' base where others attend fully)",
                                "set rope_theta instead"))
        out += _gemma_block(arch, ctx)
        if arch.multipliers is not None and not arch.nope_layers and not any(olmo2) and not olmoe:
            other = _switches_on(arch, "qkv_bias", "qk_norm", "moe", "mla", "rotary_dim", "sliding_window")
            if other:
                out.append(ctx.diag("M010", "model.multipliers",
                                    f"multipliers (Granite) with {', '.join(other)} is not modelled",
                                    "Granite 3 is a plain Llama block with multipliers"))
    datas: list[tuple[str, Data | None]] = [("data", data)]
    datas += [(f"stages.{i}.data", s.data) for i, s in enumerate(stages) if s is not None and s.data is not None]
    if arch is not None:
        for prefix, d in datas:
            # a tokenizer smaller than the embedding is fine: its ids all have a row, the rest are never looked up
            # (Qwen2.5-7B: 151,665 tokens, 152,064 rows; Gemma 3: 262,144 and 262,208: both pad the embedding);
            # llmc's model sizes the embedding and the export's vocab_size by the model's vocab_size
            if d is not None and d.tokenizer.vocab_size is not None and d.tokenizer.vocab_size > arch.vocab_size:
                out.append(ctx.diag("M005", f"{prefix}.tokenizer.vocab_size",
                                    f"tokenizer vocab_size ({d.tokenizer.vocab_size}) is larger than the model's "
                                    f"vocab_size ({arch.vocab_size}): token ids past it have no embedding row",
                                    "use at most the model's vocab_size, or a model whose vocab_size covers the "
                                    "tokenizer"))
    for prefix, d in datas:
        seen: dict[str, int] = {}
        for j, src in enumerate(d.sources if d is not None else []):
            if not isinstance(src.name, str):  # (an invalid source: reported by the schema check)
                continue
            if src.name in seen:
                out.append(ctx.diag("D004", f"{prefix}.sources.{j}.name", f"duplicate data source name {src.name!r}",
                                    f"already used by {prefix}.sources.{seen[src.name]}; names key the "
                                    "tokenized shards, so the second source would never be trained on"))
            else:
                seen[src.name] = j
    names: dict[str, int] = {}
    for i, s in enumerate(stages):
        if s is None:
            continue
        if s.name in names:
            out.append(ctx.diag("G001", f"stages.{i}.name", f"duplicate stage name {s.name!r}",
                                f"already used by stages.{names[s.name]}"))
        else:
            names[s.name] = i
    for i, sv in enumerate(serving):
        if sv is not None and sv.stage is not None and sv.stage not in names:
            hint = _did_you_mean(sv.stage, names) or (f"stages: {', '.join(names)}" if names else "no stages defined")
            out.append(ctx.diag("V004", f"serving.{i}.stage", f"unknown stage {sv.stage!r}", hint))
    return out
