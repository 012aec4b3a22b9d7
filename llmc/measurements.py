"""Measured training runs, read from files, as typed rows; and the body of ``llmc calibrate``.

No torch. Three input kinds (one :class:`Measurement` per run):

* an llmc run folder (or its ``metrics.jsonl``) next to the ``plan.lock.json`` it was built from, from any
  backend: the lock gives the model, GPU, layout and backend; ``metrics.jsonl`` gives the throughput
  (``tokens_per_s`` is the whole job's: divided by the world size) and ``peak_mem_bytes``
  (``torch.cuda.max_memory_allocated``), of the records since a relaunch under the lock where the run trained
  steps under another spec before it (:func:`llmc.runtime.metrics_io.since_relaunch`, as ``llmc report``). A build
  directory (or its ``run/``), as ``llmc report`` takes, stands for
  the run of the stage its plan describes (:func:`run_metrics_file`);
* a torchtitan log (``step: 10  loss: 7.1  memory: 58.31GiB(61.37%)  tps: 7,413  tflops: 429.32
  mfu: 43.41%``; torchtitan ``train.py`` prints the *reserved* peak and tokens/s per GPU) together with
  the ``plan.lock.json`` of the job (``llmc calibrate run.log --lock build/plan.lock.json``);
* a table of measured layouts, YAML (``benchmarks/data`` schema: file keys ``backend``, ``gpu_key``,
  ``rows``) or CSV (one row per run, same column names plus ``backend`` and ``gpu_key``).

A table also says how each run differs from what llmc's own job for the backend would do, as data: ``compile_loss``
(whether that release's torch.compile covered the loss), ``quantization`` (its fp8 recipe), ``loss_chunks``, and the
exact part measured (``gpu_part``, or ``gpu_key_exact: false`` where llmc has no entry for it). :func:`read_table`
is the one reader of those fields: ``llmc calibrate`` and ``scripts/bench_fidelity.py`` both predict a table's
runs from the :class:`Measurement` it returns, so the two agree on every row.

Steady-state figures: the median over logged steps after the first :data:`WARMUP_STEPS` (compilation,
allocator warm-up and the first data-loader fill make the early steps unrepresentative).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmc.compiler.plan import ParallelPlan
from llmc.compiler.units import GiB
from llmc.fileio import read_regular_file
from llmc.spec.schema import NVFP4_BF16_TAIL

#: Largest measurement input llmc reads (a lock, metrics.jsonl, torchtitan log, table or calibration): the
#: metrics or log of a month-long run are tens of MB; anything larger, or not a regular file (``/dev/zero``,
#: a FIFO), is refused rather than read without end.
MAX_INPUT_BYTES = 256 * 2**20

WARMUP_STEPS = 10

_TITAN = re.compile(
    r"step:\s*(?P<step>\d+).*?loss:\s*(?P<loss>[-+0-9.eE]+|nan|inf)"
    r"(?:.*?memory:\s*(?P<mem>[0-9.]+)\s*GiB\((?P<mem_pct>[0-9.]+)%\))?"
    r"(?:.*?tps:\s*(?P<tps>[0-9,]+(?:\.[0-9]+)?))?"
    r"(?:.*?tflops:\s*(?P<tflops>[0-9,.]+))?"
    r"(?:.*?mfu:\s*(?P<mfu>[0-9.]+)%)?"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class MeasurementError(ValueError):
    """A measurement file cannot be read; ``line`` is 1-based (0 = the whole file)."""

    def __init__(self, file: str, line: int, code: str, path: str, message: str, hint: str = ""):
        super().__init__(message)
        self.file, self.line, self.code, self.path, self.message, self.hint = file, line, code, path, message, hint

    def located(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return f"{loc}: error[{self.code}] {self.path}: {self.message}" + (f" ({self.hint})" if self.hint else "")


#: Most errors :class:`MeasurementErrors` lists (a table of thousands of bad rows: the first ones, then a count).
MAX_ERRORS = 50


class MeasurementErrors(MeasurementError):
    """Several inputs or table rows that cannot be read, reported at once (as ``llmc plan`` reports every spec
    error): the first one's fields, and :meth:`located` one line per error (at most :data:`MAX_ERRORS`, then a
    line counting the rest)."""

    def __init__(self, errors: list[MeasurementError]):
        flat = [x for e in errors for x in (e.errors if isinstance(e, MeasurementErrors) else [e])]
        first = flat[0]
        super().__init__(first.file, first.line, first.code, first.path, first.message, first.hint)
        self.errors = flat

    def located(self) -> str:
        lines = [e.located() for e in self.errors[:MAX_ERRORS]]
        if len(self.errors) > MAX_ERRORS:
            lines.append(f"{self.errors[MAX_ERRORS].file}: error[{self.code}] rows: {len(self.errors) - MAX_ERRORS} "
                         "more errors not shown (fix the ones above and run again)")
        return "\n".join(lines)


def raise_all(errors: list[MeasurementError]) -> None:
    """Raise the one error of ``errors``, or all of them (:class:`MeasurementErrors`); nothing when it is empty."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise MeasurementErrors(errors)


def _read_text(path: Path, code: str, what: str, hint: str = "") -> str:
    """The text of the regular file ``path`` (at most :data:`MAX_INPUT_BYTES`; undecodable bytes replaced),
    or the MeasurementError that locates why it cannot be read."""
    return _read_bytes(path, code, what, hint).decode("utf-8", "replace")


def _read_bytes(path: Path, code: str, what: str, hint: str = "") -> bytes:
    """:func:`_read_text`'s bytes."""
    try:
        return read_regular_file(path, MAX_INPUT_BYTES)
    except OSError as e:
        raise MeasurementError(str(path), 0, code, what, f"cannot read: {e.strerror or e}", hint) from None
    except ValueError as e:
        raise MeasurementError(str(path), 0, code, what, f"cannot read: {e}", hint) from None


@dataclass(frozen=True)
class TitanStep:
    """One torchtitan metrics line."""

    step: int
    loss: float
    memory_gib: float | None
    memory_pct: float | None
    tps: float | None
    tflops: float | None
    mfu_pct: float | None


@dataclass(frozen=True)
class Measurement:
    """One measured run, with everything llmc needs to predict it."""

    label: str
    source: str  # file it came from
    backend: str
    gpu: str  # llmc GPU key
    model: object  # llmc.spec.model.Architecture
    seq_len: int
    precision: str
    plan: ParallelPlan
    gpus_per_node: int | None = None
    compile: bool | None = None
    async_tp: bool = False
    fp8_recipe: str | None = None
    nvfp4_bf16_tail: float = NVFP4_BF16_TAIL  # an nvfp4 run's final blocks kept in bf16 (training.nvfp4_bf16_tail)
    offload_optimizer: bool = False  # ZeRO-Offload (AdamW on the host): changes both time and memory
    offload_params: bool = False  # ZeRO-Infinity to CPU (the parameters on the host too): time and memory
    loss_chunks: int | None = None  # slices of the backend's chunked loss (None: what llmc's job for it uses)
    # how the run's context parallelism exchanged K/V (llmc.compiler.memory.CP_ATTENTIONS; None: the backend's way,
    # llmc's job's): "ring" for torchtitan's 2024 SDPA CP, which keeps no whole-sequence K/V for the backward
    cp_attention: str | None = None
    compile_loss: bool | None = None  # torch.compile also covered the loss (None: what llmc's job for it does)
    gpu_exact: bool = True  # ``gpu`` is the part the run was measured on (False: only llmc's closest entry)
    system: str | None = None  # the hardware as the source names it (a table's ``system``)
    tokens_per_s_per_gpu: float | None = None
    reserved_bytes: float | None = None  # torch.cuda.max_memory_reserved
    allocated_bytes: float | None = None  # torch.cuda.max_memory_allocated
    line: int = 0  # the table row's line in ``source`` (0: the whole file), where an error about it points
    notes: list[str] = field(default_factory=list)
    lock: str | None = None  # the plan.lock.json the run's prediction comes from (llmc metrics, a torchtitan log)
    hardware: object = None  # llmc.compiler.hardware.GPU the run's plan was computed on (a lock's spec, with its
    # hardware.gpu_overrides and node settings applied); None: the table entry ``gpu``


# ----------------------------------------------------------------------------------------- parsers


def parse_torchtitan_log(text: str) -> list[TitanStep]:
    """Every training metrics line of a torchtitan log (other lines are ignored; colour codes are stripped).

    torchtitan 0.3.0 (``components/metrics.py``, ``MetricsProcessor.log``) prints a training step as
    ``step: N  loss: ...  grad_norm: ...  memory: ...  tps: ...``, and a validation pass (``log_validation``) as
    ``validate step: N  loss: ...  memory: ...  tps: ...``: the evaluation's tokens/s (a forward only) and its memory
    peak, which are not the training step's. A line whose ``step:`` follows a word (``validate step:``) is such a
    line, not a training step."""
    out = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        if "step:" not in line or "loss:" not in line:
            continue
        m = _TITAN.search(line)
        if m is None or line[: m.start()].rstrip()[-1:].isalpha():  # "validate step:", not a training step
            continue

        def num(k: str, m=m) -> float | None:
            v = m.group(k)
            try:
                return None if v is None else float(v.replace(",", ""))
            except ValueError:  # text the pattern admits that is no number ("1.2.3", "-")
                return None

        step, loss = m.group("step"), num("loss")
        if loss is None or len(step) > 18:  # not a metrics line: no loss, or a step no run reaches (int() refuses
            # thousands of digits)
            continue
        out.append(TitanStep(step=int(step), loss=loss, memory_gib=num("mem"), memory_pct=num("mem_pct"),
                             tps=num("tps"), tflops=num("tflops"), mfu_pct=num("mfu")))
    return out


def steady_values(values: list[tuple[int, float]], warmup: int = WARMUP_STEPS) -> list[float]:
    """The values of (step, value) after the warm-up steps (all of them when none is past it): the steady state
    ``llmc calibrate`` and ``llmc report`` both take."""
    return [v for s, v in values if s > warmup] or [v for _, v in values]


def steady(values: list[tuple[int, float]], warmup: int = WARMUP_STEPS) -> float | None:
    """Median of :func:`steady_values`."""
    vals = steady_values(values, warmup)
    return statistics.median(vals) if vals else None


def _lock(path: Path) -> dict:
    from llmc.lockfile import check_lock_shape, load_lock_json

    try:  # any schema version: a run's lock may be older than this llmc, its plan is all calibration needs
        d = load_lock_json(path)
    except ValueError as e:
        raise MeasurementError(str(path), 0, "K002", "plan.lock.json", str(e),
                               "pass the plan.lock.json written by llmc build") from None
    if not isinstance(d, dict) or "spec" not in d or "plan" not in d:
        raise MeasurementError(str(path), 0, "K002", "plan.lock.json", "not an llmc plan.lock.json",
                               "pass the plan.lock.json written by llmc build")
    try:
        check_lock_shape(d)
    except ValueError as e:  # its message ends in a hint of its own
        raise MeasurementError(str(path), 0, "K002", "plan.lock.json", str(e)) from None
    if d.get("plan") is None:
        raise MeasurementError(str(path), 0, "K002", "plan", "the lock has no parallelism plan")
    return d


def _from_lock(lock: dict, lock_path: str, label: str, source: str, backend: str | None = None) -> Measurement:
    """The run a lock plans, as a Measurement to predict (no measured figures yet). ``backend``: the backend that
    trained it when not the lock's (``llmc launch --backend``; the run's ``start`` event names it): then the layout
    that backend's runner trains (:func:`llmc.compiler.compile.backend_layout`, the rule the lock's ``backend_runs``
    are sized by) and its torch.compile setting (the spec's ``training.compile`` on that backend)."""
    from llmc.spec.schema import RunSpec

    # a hand-edited lock can hold a spec llmc no longer validates or a plan it cannot lay out: one K002 line
    try:
        spec = RunSpec.model_validate(lock["spec"]["resolved"])
        plan = ParallelPlan(**lock["plan"])
    except (KeyError, TypeError, ValueError) as e:
        errs = e.errors() if hasattr(e, "errors") else None  # pydantic: the first problem, on one line
        why = (f"spec.resolved.{'.'.join(map(str, errs[0]['loc']))}: {errs[0]['msg']}" if errs
               else "no spec.resolved" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}")
        raise MeasurementError(lock_path, 0, "K002", "plan.lock.json", f"malformed lock ({why})",
                               "pass the plan.lock.json written by llmc build, unedited") from None
    if plan.world < 1:
        raise MeasurementError(lock_path, 0, "K002", "plan", f"the plan's world size is {plan.world}",
                               "pass the plan.lock.json written by llmc build, unedited")
    be = (lock.get("backend") or {}).get("name") or "native"
    comp = (lock.get("backend") or {}).get("compile")
    if backend is not None and backend != be:
        from llmc.compiler import backends
        from llmc.compiler.compile import backend_layout

        gbs = (lock.get("hyper") or {}).get("global_batch_seqs")
        got = backend_layout(spec, plan, backend, be, gbs if isinstance(gbs, int) else plan.global_batch_seqs)
        if got is not None:  # (a runner llmc would not have run it with: the plan's layout, as it ran)
            plan = got[0]
        # torch.compile as that backend's job runs it: the spec's choice or the backend's default, never on a CPU
        # (the emitted torchtitan job compiles only on GPUs: llmc.emit.torchtitan, compile_enable)
        be, comp = backend, (backends.compile_on(backends.get_backend(backend), spec.training.compile)
                             and spec.hardware.gpu != "cpu")
    gpu = lock_gpu(spec, lock_path)
    return Measurement(label=label, source=source, backend=be, gpu=gpu.key, hardware=gpu,
                       model=spec.model, seq_len=spec.data.seq_len, precision=spec.training.precision, plan=plan,
                       gpus_per_node=spec.hardware.gpus_per_node, compile=comp, fp8_recipe=spec.training.fp8_recipe,
                       nvfp4_bf16_tail=spec.training.nvfp4_bf16_tail,
                       offload_optimizer=spec.parallelism.offload_optimizer,
                       offload_params=spec.parallelism.offload_params, lock=lock_path)


def lock_gpu(spec, lock_path: str):
    """The GPU a lock's plan was computed on: its spec's table entry (or custom part) with ``hardware.gpu_overrides``
    applied, then the node settings (``gpus_per_node``, ``inter_node_gbps``, ...), exactly as ``llmc plan`` builds it
    (``compile.spec_gpu`` and ``compile.cluster_gpu``). Predicting the run on the plain table entry instead would
    make the fitted factors absorb the overrides (a peak overridden 2x fits a compute_scale of ~2 on a run measured
    at the plan's own prediction, which the plan then applies on top of the override). Its ``key`` is the name
    ``llmc plan`` looks a calibration up by: the table's canonical key (never an alias), or a custom GPU's own name."""
    from llmc.compiler.compile import cluster_gpu, spec_gpu

    try:
        gpu = spec_gpu(spec)
    except (KeyError, TypeError, ValueError) as e:  # overrides llmc cannot apply (a hand-edited lock)
        raise MeasurementError(lock_path, 0, "K005", "hardware", f"cannot apply the spec's hardware.gpu_overrides "
                               f"({type(e).__name__}: {e})", "pass the plan.lock.json written by llmc build, "
                               "unedited") from None
    if gpu is None:
        raise MeasurementError(lock_path, 0, "K005", "hardware.gpu", f"unknown llmc GPU key {spec.hardware.gpu!r} "
                               "(no table entry, and no gpu_overrides that define it)", "llmc gpus lists them")
    return cluster_gpu(spec, gpu)


def _planned_stage(lock: dict) -> str:
    """The stage the lock's top-level plan and time describe, whose run a calibration can be fitted to: the first
    pre-training stage in the lock's stage order (``llmc.runreport``'s main stage; "pretrain", the stage
    ``llmc launch`` runs, for a lock that lists none)."""
    stages = lock.get("stages") if isinstance(lock.get("stages"), list) else []
    named = sorted((s for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)),
                   key=lambda s: s.get("order", 0) if isinstance(s.get("order"), int) else 0)
    return next((s["name"] for s in named if s.get("kind") == "pretrain"), "pretrain")


def run_metrics_file(path: str | Path) -> Path:
    """The ``metrics.jsonl`` an input names: the file itself; in a run folder, its ``metrics.jsonl``; in a build
    directory (``plan.lock.json`` in it) or its ``run/``, ``run/<stage>/metrics.jsonl`` of the stage the build's plan
    describes (:func:`_planned_stage`). Only that stage: ``read_llmc_run`` predicts a run from the lock's
    top-level plan, and the other stages run other layouts, batches and kinds (their own ``stages[i]`` plans)."""
    p = Path(path)
    if not p.is_dir() or (p / "metrics.jsonl").exists():
        return p / "metrics.jsonl" if p.is_dir() else p
    build = p if (p / "plan.lock.json").is_file() else (
        p.parent if p.name == "run" and (p.parent / "plan.lock.json").is_file() else None)
    if build is None:
        raise MeasurementError(str(p), 0, "K001", "input", "no metrics.jsonl in this folder",
                               "pass a run folder (<build>/run/<stage>), its metrics.jsonl, or the build directory")
    stage = _planned_stage(_lock(build / "plan.lock.json"))
    f = build / "run" / stage / "metrics.jsonl"
    if not f.exists():
        raise MeasurementError(str(p), 0, "K001", "input", f"no run of stage {stage!r}, the one the build's plan "
                               f"describes ({f} does not exist)", "run it with llmc launch first, or pass another "
                               "run folder or metrics.jsonl")
    return f


def read_llmc_run(path: str | Path, lock_path: str | Path | None = None) -> Measurement:
    """An llmc run: ``metrics.jsonl`` (or the folder holding it) and the ``plan.lock.json`` it was built from
    (default: next to it, one folder up, or two: ``llmc launch`` writes ``<build>/run/<stage>/metrics.jsonl``)."""
    metrics = run_metrics_file(path)
    if lock_path is None:
        cands = [metrics.parent / "plan.lock.json", metrics.parent.parent / "plan.lock.json",
                 metrics.parent.parent.parent / "plan.lock.json"]
        lock_path = next((c for c in cands if c.is_file()), None)
        if lock_path is None:
            raise MeasurementError(str(metrics), 0, "K003", "plan.lock.json", "no plan.lock.json next to the run",
                                   "pass --lock PATH")
    lock = _lock(Path(lock_path))
    from llmc.compiler.backends import BACKENDS
    from llmc.runtime import metrics_io  # (torch-free: the one reader of metrics.jsonl, llmc report's too)

    # (line, key, step, figure, peak_mem_device) of each step record's tokens_per_s and peak_mem_bytes, checked once
    # the whole file parses (a damaged line is named before a figure of the wrong type); streamed, no record kept
    figures: list[tuple] = []
    events: list[tuple[int, dict]] = []
    try:  # (a torn last line, from a writer killed mid-line, is dropped as llmc report drops it)
        for i, r in metrics_io.iter_records(metrics, _read_bytes(metrics, "K001", "metrics.jsonl")):
            if "event" in r:
                events.append((i, r))
            for key in ("tokens_per_s", "peak_mem_bytes"):
                if "step" in r and r.get(key):
                    figures.append((i, key, r["step"], r[key], r.get("peak_mem_device")))
        ran = metrics_io.ran_backend(events, metrics, BACKENDS)
    except metrics_io.MetricsError as e:
        key = "backend" if isinstance(e, metrics_io.UnknownBackend) else "metrics.jsonl"
        raise MeasurementError(str(metrics), e.line, "K001", key, e.problem, _RECORD_HINT) from None
    tps, mem = [], []  # (line, step, figure, peak_mem_device)
    for i, key, s, v, dev in figures:
        (tps if key == "tokens_per_s" else mem).append(
            (i, _record_number(s, "step", str(metrics), i), _record_number(v, key, str(metrics), i), dev))
    del figures
    if not tps:
        raise MeasurementError(str(metrics), 0, "K001", "metrics.jsonl", "no step records with tokens_per_s",
                               "train for more than log_every steps")
    # a run relaunched under this lock after steps under another spec (a rebuild with other hardware): only the
    # records since the relaunch were trained as the lock plans them (llmc report compares the same ones)
    relaunch = metrics_io.since_relaunch(events, (lock.get("spec") or {}).get("sha256"))
    notes = []
    if relaunch is not None:
        if relaunch.line is None:
            raise MeasurementError(str(metrics), relaunch.other_line, "K001", "metrics.jsonl",
                                   relaunch.note(None, max(s for _, s, _, _ in tps)),
                                   "relaunch the run with this build, or pass --lock with the plan.lock.json it "
                                   "ran under")
        tps = [t for t in tps if relaunch.measured(t[0])]
        mem = [t for t in mem if relaunch.measured(t[0])]
        notes.append(relaunch.note(max((s for _, s, _, _ in tps), default=None)))
        if not tps:
            raise MeasurementError(str(metrics), relaunch.line, "K001", "metrics.jsonl", "no step records with "
                                   f"tokens_per_s since the relaunch under this lock ({notes[0]})",
                                   "train for more than log_every steps after it")
    # the run is predicted for the backend that trained it (its start event's), on that backend's layout: the
    # prediction ``llmc report`` shows too (llmc.runreport.predictions)
    m = _from_lock(lock, str(lock_path), label=metrics.parent.name or str(metrics), source=str(metrics), backend=ran)
    world = m.plan.world
    # device memory only: on a CPU the trainers log the process's peak RSS (interpreter, libraries, data
    # workers), which is not the per-GPU memory llmc's model predicts (records before peak_mem_device: the lock's
    # hardware says where the run was)
    device_mem = [v for _, _, v, dev in mem if dev == "cuda" or (dev is None and m.gpu != "cpu")]
    return replace(m, tokens_per_s_per_gpu=steady([(s, v) for _, s, v, _ in tps]) / world,
                   allocated_bytes=max(device_mem) if device_mem else None, notes=notes)


_RECORD_HINT = "llmc's trainers write one JSON object of numbers per line: restore or delete that line"


def _shown(v, limit: int = 60) -> str:
    """``repr(v)`` for an error line, cut to ``limit`` characters (a cell can hold hundreds of digits)."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _record_number(v, key: str, file: str, line: int) -> float:
    """A metrics.jsonl record's ``step`` (a whole number >= 0) or measured figure (a positive finite number) ``v``,
    as llmc's trainers write them; else the MeasurementError naming the line (a string, a bool or a number too
    large for a float is an edited or foreign record, not a measurement)."""
    f = None
    if isinstance(v, int | float) and not isinstance(v, bool):
        try:
            f = float(v)
        except OverflowError:
            f = None
    whole = key == "step"
    if f is None or not math.isfinite(f) or (f < 0 or not f.is_integer() if whole else f <= 0):
        want = "a whole number >= 0" if whole else "a positive number"
        raise MeasurementError(file, line, "K001", key, f"{key} must be {want}, got {_shown(v)}", _RECORD_HINT)
    return int(f) if whole else f


def read_torchtitan_log(path: str | Path, lock_path: str | Path) -> Measurement:
    """A torchtitan log of a job llmc built, with that build's ``plan.lock.json``."""
    p = Path(path)
    steps = parse_torchtitan_log(_read_text(p, "K001", "log"))
    if not steps:
        raise MeasurementError(str(p), 0, "K001", "log", "no torchtitan metrics lines (step: .. loss: .. tps: ..)",
                               "pass the rank-0 training log")
    lock = _lock(Path(lock_path))
    m = _from_lock(lock, str(lock_path), label=p.stem, source=str(p))
    tps = steady([(s.step, s.tps) for s in steps if s.tps])
    mem = [s.memory_gib for s in steps if s.memory_gib is not None]
    return replace(m, backend="torchtitan", tokens_per_s_per_gpu=tps,
                   reserved_bytes=max(mem) * GiB if mem else None)


_TABLE_REQUIRED = ("model", "gpus", "seq_len", "dp_shard", "micro_batch", "global_batch")
#: Every column :func:`table_row` reads (benchmarks/README.md, Schema), on a row or as a file-level key.
TABLE_COLUMNS = frozenset((
    "id", "model", "gpus", "seq_len", "dp_replicate", "dp_shard", "tp", "pp", "pp_schedule", "vp", "cp", "ep",
    "micro_batch", "global_batch", "ac", "ac_layers", "zero_stage", "precision", "quantization", "compile",
    "compile_loss", "async_tp", "offload_optimizer", "offload_params", "loss_chunks", "cp_attention", "gpus_per_node",
    "backend",
    "gpu_key", "gpu_key_exact", "gpu_part", "system", "kind", "tokens_per_s_per_gpu", "mem_gib", "mem_kind",
    "nvfp4_bf16_tail"))
#: Informational columns: documented in benchmarks/README.md (the source, its table and sweep, figures the source
#: derives from the measured ones) or common notes; read by nobody, so allowed. Any other column of one's own is
#: allowed when its name starts with :data:`TABLE_EXTRA_PREFIX`.
TABLE_INFO_COLUMNS = frozenset((
    "source", "use", "table", "sweep", "derived", "local_batch", "tflops_per_gpu", "mfu", "date", "url", "notes",
    "note", "comment",
    # the Megatron-Bridge rows' printed columns (benchmarks/README.md): read by scripts/bench_fidelity.py, not by
    # table_row (such a row lacks the layout columns dp_shard, micro_batch, global_batch, and is refused for that)
    "release", "page_line", "model_label", "gbs", "mbs", "fsdp", "dp", "ga"))
TABLE_EXTRA_PREFIX = "x_"
# the spec's and other tools' names of a table column: named in the error when the column is unknown
_COLUMN_SYNONYMS = {"activation_checkpointing": "ac", "pp_virtual_stages": "vp", "zero": "zero_stage",
                    "schedule": "pp_schedule", "gpu": "gpu_key", "world_size": "gpus", "num_gpus": "gpus",
                    "sequence_length": "seq_len", "tps": "tokens_per_s_per_gpu", "memory": "mem_gib",
                    "mem": "mem_gib", "fp8_recipe": "quantization"}


def check_columns(keys, source: str, line: int, where: str = "column") -> None:
    """K004 for the first key of a table row (or file) that is neither a column :func:`table_row` reads nor an
    informational one: a misspelled column would otherwise be read as absent (``activation_checkpointing`` for
    ``ac``: every row without recomputation). The error names the closest known column."""
    import difflib

    known = sorted(TABLE_COLUMNS | TABLE_INFO_COLUMNS)
    for k in keys:
        name = str(k)
        if name in TABLE_COLUMNS or name in TABLE_INFO_COLUMNS or name.startswith(TABLE_EXTRA_PREFIX):
            continue
        low = name.strip().lower()
        close = (low if low in TABLE_COLUMNS or low in TABLE_INFO_COLUMNS else _COLUMN_SYNONYMS.get(low)
                 or next(iter(difflib.get_close_matches(low, known, n=1, cutoff=0.6)), None))
        hint = (f"did you mean {close!r}? " if close else "") + (
            f"see benchmarks/README.md, Schema; a column of your own: name it {TABLE_EXTRA_PREFIX}{name.strip()}")
        shown = _shown(name) if name.strip() else "(unnamed)"
        raise MeasurementError(source, line, "K004", name.strip()[:60] or "(unnamed)", f"unknown {where} {shown}", hint)


def table_cell(r: dict, file_keys: dict, k: str, default=None):
    """A table row's value of column ``k``: the row's own, else (absent, null or empty: the source gives none for
    this row) the file-level key's, else ``default``."""
    v = r.get(k)
    if v in (None, ""):
        v = file_keys.get(k)
    return default if v in (None, "") else v


def table_gpu(r: dict, file_keys: dict) -> tuple[str | None, bool]:
    """(llmc GPU key, exact) a table row's run is predicted and calibrated on: ``gpu_part`` -- llmc's entry for the
    exact part measured, where ``gpu_key`` names only the closest one the file was transcribed with -- when given
    (exact); else ``gpu_key`` with ``gpu_key_exact`` (default true; false: the run's part has no llmc entry). A row's
    own ``gpu_part`` or ``gpu_key`` wins over the file's (the row names the GPU its run had)."""
    if r.get("gpu_part") is None and r.get("gpu_key") is not None:  # the row's own GPU, over the file's part
        key, exact = r["gpu_key"], r.get("gpu_key_exact", True)  # (the file's gpu_key_exact is about its key)
        return str(key), str(exact).strip().lower() not in ("false", "no", "off", "0")
    part = table_cell(r, file_keys, "gpu_part")
    if part is not None:
        return str(part), True
    key = table_cell(r, file_keys, "gpu_key")
    exact = str(table_cell(r, file_keys, "gpu_key_exact", True)).strip().lower()
    return (None if key is None else str(key)), exact not in ("false", "no", "off", "0")


def _cp_attention(v, source: str, line: int) -> str:
    """A table's ``cp_attention`` cell: one of :data:`llmc.compiler.memory.CP_ATTENTIONS`."""
    from llmc.compiler.memory import CP_ATTENTIONS

    if v not in CP_ATTENTIONS:
        raise MeasurementError(source, line, "K004", "cp_attention", f"cp_attention must be one of "
                               f"{', '.join(CP_ATTENTIONS)}, got {_shown(v)}", "see benchmarks/README.md, Schema")
    return str(v)


def table_row(r: dict, file_keys: dict, source: str, line: int) -> Measurement:
    """One row of a measured-layout table (its file-level keys in ``file_keys``) as a :class:`Measurement`, or the
    MeasurementError that locates its first bad cell."""
    from llmc.spec.presets import PRESETS

    def get(k, default=None):
        return table_cell(r, file_keys, k, default)

    check_columns(r.keys(), source, line)
    for k in _TABLE_REQUIRED:
        if get(k) is None:
            raise MeasurementError(source, line, "K004", k, f"missing {k!r}", "see benchmarks/README.md, Schema")
    if isinstance(get("id"), list | dict):  # the run's label: one name, not a YAML list or mapping
        raise MeasurementError(source, line, "K004", "id", f"id must be a name, got {_shown(get('id'))}",
                               "see benchmarks/README.md, Schema")
    name = str(get("model"))
    if name not in PRESETS:
        raise MeasurementError(source, line, "K004", "model", f"unknown preset {name!r}", "llmc presets lists them")
    backend, (gpu, gpu_exact) = get("backend"), table_gpu(r, file_keys)
    if not backend or not gpu:
        raise MeasurementError(source, line, "K004", "backend" if not backend else "gpu_key",
                               "every row needs a backend and an llmc gpu_key")
    part = _table_part(gpu, source, line, "gpu_part" if get("gpu_part") is not None else "gpu_key")
    gpu = part.key  # the canonical key (h100-sxm5 -> h100-sxm): the one `llmc plan` looks a calibration up by
    def bad(k: str, want: str):
        return MeasurementError(source, line, "K004", k, f"{k} must be {want}, got {_shown(get(k))}",
                                "see benchmarks/README.md, Schema")

    def whole(k: str, default=None) -> int:  # a positive whole number (YAML int, or a CSV cell such as "8")
        v = get(k, default)
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: a YAML integer beyond a float's range
            raise bad(k, "a positive whole number") from None
        if isinstance(v, bool) or not f.is_integer() or f < (0 if k == "zero_stage" else 1):
            raise bad(k, "a positive whole number")
        return int(f)

    def positive(k: str) -> float | None:  # a positive finite number, or absent
        v = get(k)
        if v is None:
            return None
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            raise bad(k, "a positive number") from None
        if isinstance(v, bool) or not (0 < f < float("inf")):
            raise bad(k, "a positive number")
        return f

    def flag(k: str, default=None) -> bool | None:  # YAML booleans, or CSV cells true/false/yes/no/1/0
        v = get(k, default)
        if v is None or isinstance(v, bool):
            return v
        word = str(v).strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
        raise bad(k, "true or false")

    def choice(k: str, options, default=None) -> str | None:
        v = get(k, default)
        if v is not None and str(v) not in options:
            raise MeasurementError(source, line, "K004", k, f"unknown {k} {v!r} (one of {', '.join(options)})")
        return None if v is None else str(v)

    from llmc.compiler.backends import BACKENDS
    from llmc.compiler.timing import FP8_RECIPES
    from llmc.spec.schema import AC_MODES

    choice("backend", tuple(BACKENDS))
    sched = choice("pp_schedule", _literals("Parallelism", "pp_schedule"), "1F1B")
    ac = choice("ac", AC_MODES, "none")
    ac_layers = 0
    if ac == "partial":
        if get("ac_layers") is None:
            raise bad("ac_layers", "the blocks per model chunk recomputed whole (ac partial needs it)")
        ac_layers = whole("ac_layers")
    elif get("ac_layers") not in (None, ""):
        raise bad("ac_layers", "nothing: it is only read with ac partial")
    recipe = choice("quantization", FP8_RECIPES)
    zero = whole("zero_stage", 3)
    if zero > 3:
        raise bad("zero_stage", "0, 1, 2 or 3")
    prec = str(get("precision", "bf16")).lower()
    prec = "fp8" if "fp8" in prec else prec
    if prec not in _literals("Training", "precision"):
        raise bad("precision", f"one of {', '.join(_literals('Training', 'precision'))} (an fp8 label counts as fp8)")
    dr, ds = whole("dp_replicate", 1), whole("dp_shard")
    tp, pp, cp, ep = (whole(k, 1) for k in ("tp", "pp", "cp", "ep"))
    mb, gb = whole("micro_batch"), whole("global_batch")
    vp = whole("vp", 2 if sched == "Interleaved1F1B" else 1)
    if dr * ds * tp * pp * cp != whole("gpus"):
        raise MeasurementError(source, line, "K004", "gpus", "dp_replicate x dp_shard x tp x pp x cp != gpus")
    if gb % (mb * dr * ds):  # (it was rounded down to whole accumulation steps, or up to one: another layout)
        raise MeasurementError(source, line, "K004", "global_batch",
                               f"global_batch {_shown(gb)} is not a whole number of steps of micro_batch {_shown(mb)} "
                               f"on {_shown(dr * ds)} data-parallel ranks",
                               "global_batch = micro_batch x dp_replicate x dp_shard x gradient accumulation")
    try:
        plan = ParallelPlan(dp_replicate=dr, dp_shard=ds, tp=tp, pp=pp, pp_schedule=sched, pp_virtual_stages=vp,
                            cp=cp, ep=ep, micro_batch=mb, grad_accum=gb // (mb * dr * ds),
                            activation_checkpointing=ac, ac_layers=ac_layers, zero_stage=zero)
    except ValueError as e:
        raise MeasurementError(source, line, "K004", "layout", str(e), "see benchmarks/README.md, Schema") from None
    gpn = None if get("gpus_per_node") is None else whole("gpus_per_node")
    _check_layout(plan, PRESETS[name], whole("gpus"), replace(part, gpus_per_node=gpn) if gpn else part,
                  bool(flag("offload_optimizer", False)), bool(flag("offload_params", False)), source, line)
    tps, mem = positive("tokens_per_s_per_gpu"), positive("mem_gib")
    if mem is not None:
        _check_memory(mem, part, source, line)
    tail = get("nvfp4_bf16_tail", NVFP4_BF16_TAIL)
    try:
        tail = float(tail)
    except (TypeError, ValueError, OverflowError):
        raise bad("nvfp4_bf16_tail", "a fraction in [0, 1)") from None
    if isinstance(get("nvfp4_bf16_tail"), bool) or not 0 <= tail < 1:
        raise bad("nvfp4_bf16_tail", "a fraction in [0, 1)")
    kind = str(get("mem_kind", "reserved"))
    if flag("offload_params", False) and not (flag("offload_optimizer", False) and zero == 3):
        raise MeasurementError(source, line, "K004", "offload_params", "offload_params needs offload_optimizer and "
                               "zero_stage 3 (DeepSpeed ZeRO-Infinity)", "see benchmarks/README.md, Schema")
    return Measurement(
        label=str(get("id", f"{Path(source).name}:{line}")), source=source, backend=str(backend), gpu=str(gpu),
        model=PRESETS[name], seq_len=whole("seq_len"), precision=prec, plan=plan,
        gpus_per_node=gpn, compile=flag("compile"),
        nvfp4_bf16_tail=tail,
        async_tp=bool(flag("async_tp", False)), fp8_recipe=recipe if prec == "fp8" else None,  # (a file-level
        # recipe names the fp8 rows' one: a bf16 row has none)
        offload_optimizer=bool(flag("offload_optimizer", False)),
        offload_params=bool(flag("offload_params", False)),
        loss_chunks=None if get("loss_chunks") is None else whole("loss_chunks"),
        cp_attention=None if get("cp_attention") is None else _cp_attention(get("cp_attention"), source, line),
        compile_loss=flag("compile_loss"), gpu_exact=gpu_exact,
        system=None if get("system") is None else str(get("system")),
        tokens_per_s_per_gpu=tps, line=line,
        reserved_bytes=mem * GiB if mem is not None and "alloc" not in kind else None,
        allocated_bytes=mem * GiB if mem is not None and "alloc" in kind else None)


def _table_part(key: str, source: str, line: int, column: str):
    """The llmc GPU a table row names (any key ``llmc gpus`` accepts, aliases included), or the K005 located on the
    row: checked per row, before the runs are grouped by (backend, GPU), so a mistyped key is named where it is."""
    import difflib

    from llmc.compiler.hardware import _ALIASES, GPUS, get_gpu

    part = get_gpu(str(key))
    if part is None:
        close = difflib.get_close_matches(str(key).strip().lower(), sorted({*GPUS, *_ALIASES}), n=1, cutoff=0.6)
        raise MeasurementError(source, line, "K005", column, f"unknown llmc GPU key {_shown(key)}",
                               f"did you mean {close[0]!r}?" if close else "llmc gpus lists them")
    return part


#: A measured peak above the GPU's memory by more than this is no measurement of that GPU: vendors quote HBM in GB
#: (1e9 bytes) where some parts carry as many GiB (the H100's "80 GB" is 80 GiB of HBM3: 79.1 GiB visible to
#: ``torch.cuda.mem_get_info``, 1.06x llmc's 80e9 bytes), so the slack is 1.25x.
MEM_MAX_OVER_HBM = 1.25
#: The smallest non-zero reserved peak PyTorch's CUDA caching allocator can report: one 2 MiB block of its small-object
#: pool (``kSmallBuffer``, c10/cuda/CUDACachingAllocator.cpp). Anything less is not a GiB figure.
MEM_MIN_GIB = 2 / 1024


def _check_memory(mem_gib: float, part, source: str, line: int) -> None:
    """K004 for a table's measured memory (``mem_gib``) that no run on ``part`` can have: above the GPU's memory
    (x :data:`MEM_MAX_OVER_HBM`) or below :data:`MEM_MIN_GIB`. Bytes, MB or MiB written as GiB land there; GB
    written as GiB (7 % apart) cannot be told from a real figure and are the table's to convert."""
    hbm_gib = part.hbm_bytes / GiB
    if MEM_MIN_GIB <= mem_gib <= MEM_MAX_OVER_HBM * hbm_gib:
        return
    units = next((f"; {mem_gib:g} / {div} = {mem_gib / div:.4g} GiB: was it {unit}?"
                  for div, unit in ((GiB, "bytes"), (1024.0, "MiB"), (1000.0, "MB"), (2**20, "KiB"))
                  if MEM_MIN_GIB <= mem_gib / div <= MEM_MAX_OVER_HBM * hbm_gib), "")
    where = (f"above the {hbm_gib:.1f} GiB of {part.key}" if mem_gib > hbm_gib else "below any GPU run's peak")
    raise MeasurementError(source, line, "K004", "mem_gib", f"mem_gib {mem_gib:g} is {where}",
                           f"mem_gib is the peak per GPU in GiB (2^30 bytes){units}")


def _check_layout(plan: ParallelPlan, arch, gpus: int, part, offload_optimizer: bool, offload_params: bool,
                  source: str, line: int) -> None:
    """The checks ``llmc plan`` runs on a pinned layout (``checks.check_pins``: P002 a TP group beyond the node or
    NVLink domain, P003 heads not divisible by TP, P001 more stages than layers, P007 EP, P012 / P014 / P015), on a
    table row's layout: a run llmc would refuse to plan is a mistyped row, and fitting it would bend the factors. The
    first error is one K004 line on the row with the plan's own message."""
    from types import SimpleNamespace

    from llmc.compiler.checks import Sink, check_pins
    from llmc.spec.schema import Parallelism

    par = Parallelism.model_construct(
        dp_replicate=plan.dp_replicate, dp_shard=plan.dp_shard, tp=plan.tp, pp=plan.pp, cp=plan.cp, ep=plan.ep,
        pp_schedule=plan.pp_schedule, pp_virtual_stages=plan.pp_virtual_stages, micro_batch=plan.micro_batch,
        activation_checkpointing=plan.activation_checkpointing,
        ac_layers=plan.ac_layers if plan.activation_checkpointing == "partial" else None, zero_stage=plan.zero_stage,
        offload_optimizer=offload_optimizer, offload_params=offload_params)
    sink = Sink(None, source)
    check_pins(SimpleNamespace(parallelism=par, model=arch, hardware=SimpleNamespace(count=gpus)), part, sink)
    err = next((d for d in sink.items if d.severity == "error"), None)
    if err is not None:
        column = {"tp": "tp", "pp": "pp", "ep": "ep", "pp_virtual_stages": "vp", "ac_layers": "ac_layers",
                  "offload_params": "offload_params"}.get(err.path.rpartition(".")[2], "layout")
        raise MeasurementError(source, line, "K004", column, f"llmc plan refuses this layout ({err.code}): "
                               f"{err.message}", err.hint)


def _literals(model: str, name: str) -> tuple[str, ...]:
    """The values a spec field of ``llmc.spec.schema.<model>`` allows (its ``Literal``), for table cells."""
    from typing import get_args

    from llmc.spec import schema

    out: list[str] = []
    todo = [getattr(schema, model).model_fields[name].annotation]
    while todo:
        t = todo.pop(0)
        args = get_args(t)
        out += [a for a in args if isinstance(a, str)]
        todo += [a for a in args if not isinstance(a, str)]
    return tuple(out)


def read_table(path: str | Path) -> list[Measurement]:
    """Measured layouts from a YAML (benchmarks/ schema) or CSV file; every column checked (:func:`check_columns`),
    and a row repeated whole or an ``id`` given twice refused (:func:`_repeats`): every bad row at once, one
    located line each (:class:`MeasurementErrors`)."""
    p = Path(path)
    text = _table_text(p)
    errors: list[MeasurementError] = []  # every bad row, reported at once (:class:`MeasurementErrors`)
    if p.suffix.lower() == ".csv":
        rows = _csv_rows(text, str(p), errors)
        return _table_rows(rows, {}, str(p), errors)
    import yaml

    loader = yaml.SafeLoader(text)  # what yaml.safe_load does, keeping the node tree for the rows' lines
    try:
        node = loader.get_single_node()
        doc = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise MeasurementError(str(p), (mark.line + 1) if mark else 0, "K001", "table", "invalid YAML") from e
    except RecursionError:
        raise MeasurementError(str(p), 0, "K001", "table", "YAML nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise MeasurementError(str(p), 0, "K001", "table", f"invalid YAML: {e}") from None
    finally:
        loader.dispose()
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise MeasurementError(str(p), 0, "K004", "rows", "expected a mapping with a 'rows' list")
    file_keys = {k: v for k, v in doc.items() if k != "rows"}
    key_lines = _key_lines(node)
    for k in file_keys:
        check_columns([k], str(p), key_lines.get(str(k), 0), "file-level key")
    lines = _row_lines(node)
    rows = []
    for i, r in enumerate(doc["rows"]):
        line = lines[i] if i < len(lines) else 0
        if not isinstance(r, dict):
            errors.append(MeasurementError(str(p), line, "K004", "rows", f"a row must be a mapping of column: value, "
                                           f"got {_shown(r)}", "see benchmarks/README.md, Schema"))
        elif r.get("kind", file_keys.get("kind", "throughput")) == "throughput":
            rows.append((r, line))
    return _table_rows(rows, file_keys, str(p), errors)


def _table_rows(rows: list[tuple[dict, int]], file_keys: dict, source: str,
                errors: list[MeasurementError]) -> list[Measurement]:
    """The measurements of a table's rows; every row that cannot be read (and ``errors``, those found before)
    raised at once, in line order (:func:`raise_all`)."""
    errors = errors + _repeats(rows, file_keys, source)
    out = []
    for r, line in rows:
        try:
            out.append(table_row(r, file_keys, source, line))
        except MeasurementError as e:
            errors.append(e)
    raise_all(sorted(errors, key=lambda e: e.line))
    return out


def _repeats(rows: list[tuple[dict, int]], file_keys: dict, source: str) -> list[MeasurementError]:
    """K004 on the second of two rows that are the same row: every cell equal, or the same ``id``. A copy-pasted row
    counts one run twice, which narrows the leave-one-out band as a file given twice would (``llmc calibrate``
    refuses that too); two runs of one layout are legitimate repeats (noise samples of it) and differ in their
    measured cells or carry their own ids."""
    seen_rows: dict[str, int] = {}
    seen_ids: dict[str, int] = {}
    errors = []
    for r, line in rows:
        whole = json.dumps({str(k): v for k, v in r.items()}, sort_keys=True, default=str)
        if whole in seen_rows:
            errors.append(MeasurementError(source, line, "K004", "rows", f"the same row as line {seen_rows[whole]} "
                                           "(every cell equal)", "delete the copy; two runs of one layout: give each "
                                           "its id"))
            continue
        seen_rows[whole] = line
        rid = table_cell(r, file_keys, "id")
        if rid is not None and not isinstance(rid, list | dict):
            if str(rid) in seen_ids:
                errors.append(MeasurementError(source, line, "K004", "id", f"id {_shown(rid)} is also the id of line "
                                               f"{seen_ids[str(rid)]}", "give each run its own id"))
                continue
            seen_ids[str(rid)] = line
    return errors


def _table_text(p: Path) -> str:
    """A table file's text as a spreadsheet may export it: UTF-8, with or without a byte-order mark (Excel's "CSV
    UTF-8" writes one), or UTF-16 with its byte-order mark (Excel's "Unicode text"); else the K001 that says how to
    save it. (Undecodable bytes are not replaced: a replaced cell would be read as another value.)"""
    try:
        raw = read_regular_file(p, MAX_INPUT_BYTES)
    except OSError as e:
        raise MeasurementError(str(p), 0, "K001", "table", f"cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise MeasurementError(str(p), 0, "K001", "table", f"cannot read: {e}") from None
    hint = "save the table as UTF-8 text (a spreadsheet's 'CSV UTF-8')"
    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff"))
    if not utf16 and b"\x00" in raw:
        raise MeasurementError(str(p), 0, "K001", "table", "not a text table (NUL bytes: UTF-16 without a "
                               "byte-order mark, or a binary spreadsheet file)", hint)
    try:
        return raw.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        line = 0 if utf16 else raw[: e.start].count(b"\n") + 1
        raise MeasurementError(str(p), line, "K001", "table", f"not {'UTF-16' if utf16 else 'UTF-8'} text "
                               f"({e.reason} at byte {e.start})", hint) from None


_DECIMAL_COMMA = re.compile(r"^\s*([-+]?\d+),(\d+)\s*$")


def _csv_rows(text: str, source: str, errors: list[MeasurementError] | None = None) -> list[tuple[dict, int]]:
    """(cells by column, line) of each non-empty row of a CSV table. The separator is the header's: a comma, or a
    semicolon or tab where the header has more of those (spreadsheets in locales with a decimal comma export
    ``;``); line ends may be LF, CRLF or CR alone. A row with more or fewer cells than the header is refused (its
    cells would be read under other columns), as are empty, repeated or unknown column names. In a ``;`` or tab
    separated table a number written with a decimal comma (``3210,5``: those locales' spreadsheets) is read as
    ``3210.5``; a comma cannot be a thousands separator there without being ambiguous, so only one comma followed
    by digits is read that way."""
    first = re.split(r"\r\n|\r|\n", text.lstrip("\r\n"), maxsplit=1)[0]
    delim = max((",", ";", "\t"), key=first.count)  # (a header holds no separator inside a name; ties: comma)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    rows: list[tuple[dict, int]] = []
    header: list[str] | None = None
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):  # a blank line, or a spreadsheet's empty row (",,,,")
                continue
            if header is None:
                header = [c.strip() for c in cells]
                _check_header(header, source, reader.line_num)
                continue
            if len(cells) != len(header):
                bad = MeasurementError(source, reader.line_num, "K004", "row", f"{len(cells)} cells, the header has "
                                       f"{len(header)} columns", "one cell per column (quote a cell that holds a "
                                       f"{'comma' if delim == ',' else repr(delim)})")
                if errors is None:
                    raise bad
                errors.append(bad)  # (the row is left out: the caller reports it with the others)
                continue
            if delim != ",":
                cells = [_DECIMAL_COMMA.sub(r"\1.\2", c) for c in cells]
            rows.append(({k: v for k, v in zip(header, cells, strict=True) if k or v.strip()}, reader.line_num))
    except csv.Error as e:
        raise MeasurementError(source, reader.line_num, "K001", "table", f"not a CSV table: {e}",
                               "save it as CSV (comma, semicolon or tab separated)") from None
    return rows


def _check_header(header: list[str], source: str, line: int) -> None:
    """A CSV header's column names: none repeated, every one known (:func:`check_columns`); a single name holding
    spaces or another separator is a header llmc did not split."""
    for i, name in enumerate(header):
        if name and name in header[:i]:
            raise MeasurementError(source, line, "K004", _shown(name), f"column {_shown(name)} appears twice",
                                   "one column per name")
    if len(header) == 1 and re.search(r"[\s|:]", header[0]):
        raise MeasurementError(source, line, "K004", "header", f"one column named {_shown(header[0])}",
                               "separate the columns with commas, semicolons or tabs")
    check_columns([n for n in header if n], source, line)


def _key_lines(root) -> dict[str, int]:
    """The 1-based line of each top-level key of a YAML document (its node tree)."""
    import yaml

    if not isinstance(root, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in root.value if isinstance(k, yaml.ScalarNode)}


def _row_lines(root) -> list[int]:
    """The 1-based line of each item of the document's top-level ``rows:`` list (its YAML node tree), in order;
    [] when there is none."""
    import yaml

    lines: list[int] = []
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:  # the last ``rows:`` wins, as in the constructed mapping
            if isinstance(key, yaml.ScalarNode) and key.value == "rows" and isinstance(value, yaml.SequenceNode):
                lines = [item.start_mark.line + 1 for item in value.value]
    return lines


def read_any(path: str | Path, lock: str | Path | None = None) -> list[Measurement]:
    """Dispatch on the file: a table (.yaml/.yml/.csv), metrics.jsonl / a run folder, or a torchtitan log."""
    p = Path(path)
    if not p.exists():  # else it would be taken for a torchtitan log and asked for a --lock
        raise MeasurementError(str(p), 0, "K001", "input", "no such file or directory",
                               "pass metrics.jsonl files or run folders, torchtitan logs, or .yaml/.csv tables")
    if p.is_dir() or p.name.endswith(".jsonl"):
        return [read_llmc_run(p, lock)]
    if p.suffix.lower() in (".yaml", ".yml", ".csv"):
        return read_table(p)
    if lock is None:
        raise MeasurementError(str(p), 0, "K003", "--lock", "a torchtitan log needs the job's plan.lock.json",
                               "llmc calibrate LOG --lock BUILD/plan.lock.json")
    return [read_torchtitan_log(p, lock)]


# ----------------------------------------------------------------------------------- predictions


def predicted(m: Measurement, factors=None):
    """llmc's (TimeNumbers, MemoryNumbers) for a measured run's layout and settings."""
    from llmc.compiler import memory, timing
    from llmc.compiler.hardware import get_gpu

    gpu = m.hardware if m.hardware is not None else get_gpu(m.gpu)  # a lock's run: its spec's GPU, overrides
    # and node settings applied (lock_gpu)
    if gpu is None:
        raise MeasurementError(m.source, m.line, "K005", "gpu", f"unknown llmc GPU key {m.gpu!r}",
                               "llmc gpus lists them")
    if m.gpus_per_node and m.hardware is None:
        gpu = replace(gpu, gpus_per_node=int(m.gpus_per_node))
    # the time and memory models refuse a layout they cannot lay out (ValueError: more pipeline chunks than the
    # model has blocks, ...) and overflow on absurd sizes (a 300-digit seq_len); a table row is checked for its
    # cells only, so either is the row's error
    try:
        sm = timing.step_model(m.model, m.seq_len, m.precision, gpu, m.backend, compile=m.compile,
                               async_tp=m.async_tp, fp8_recipe=m.fp8_recipe, factors=factors,
                               offload_optimizer=m.offload_optimizer, offload_params=m.offload_params,
                               nvfp4_bf16_tail=m.nvfp4_bf16_tail)
        t = timing.time_numbers(sm, m.plan, 1)
        mem = memory.memory_per_gpu(m.model, m.plan, m.seq_len, m.precision, gpu.hbm_bytes, backend=m.backend,
                                    compile=m.compile, factors=factors, offload_optimizer=m.offload_optimizer,
                                    offload_params=m.offload_params, loss_chunks=m.loss_chunks,
                                    compile_loss=m.compile_loss, cp_attention=m.cp_attention)
    except (ValueError, ArithmeticError) as e:
        hint = ("check the row's parallel degrees and sizes against the model; see benchmarks/README.md, Schema"
                if m.line else "pass the plan.lock.json written by llmc build, unedited")
        why = (f"llmc cannot model this layout: {e}" if isinstance(e, ValueError)
               else f"llmc cannot model this run: a size is out of range ({type(e).__name__}: {e})")
        raise MeasurementError(m.source, m.line, "K004", "layout", why, hint) from None
    return t, mem


def run_prediction(lock: dict, backend: str | None = None, factors=None):
    """:func:`predicted` for the pre-training run a lock plans, trained by ``backend`` (None: the lock's): what
    ``llmc calibrate`` fits such a run against (:func:`read_llmc_run`) and ``llmc report`` shows for it
    (llmc.runreport.predictions). A lock llmc cannot read raises MeasurementError."""
    return predicted(_from_lock(lock, "plan.lock.json", label="run", source="plan.lock.json", backend=backend), factors)


def fit_points(ms: list[Measurement]):
    """calibration.TimePoint / MemPoint for measured runs (llmc's uncalibrated prediction + the measurement)."""
    from llmc.compiler.calibration import MemPoint, TimePoint, split_breakdown

    tps, mps = [], []
    errors = []  # every run llmc cannot model, reported at once
    for m in ms:
        try:
            t, mem = predicted(m)
        except MeasurementError as e:
            errors.append(e)
            continue
        if m.tokens_per_s_per_gpu:
            c, comm, f = split_breakdown(t.breakdown)
            pred_tps = t.tokens_per_second / m.plan.world
            tps.append(TimePoint(m.label, c, comm, f, t.step_seconds * pred_tps / m.tokens_per_s_per_gpu,
                                 d_model=float(m.model.d_model)))
        if m.reserved_bytes:
            mps.append(MemPoint(m.label, float(mem.reserved_bytes), m.reserved_bytes))
        elif m.allocated_bytes:  # only the allocated peak measured (llmc's metrics): compare like with like;
            # reserved = allocated x the backend's ratio, so the fitted scale carries over
            mps.append(MemPoint(m.label, float(mem.allocated_bytes), m.allocated_bytes))
    raise_all(errors)
    return tps, mps


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file; of a run folder or build directory, that of the metrics.jsonl it stands for."""
    from llmc import fileio

    p = Path(path)
    return fileio.sha256_file(run_metrics_file(p) if p.is_dir() else p)


def calibrate_measurements(ms: list[Measurement], inputs: list[str], digests: dict[str, str] | None = None):
    """Fit one :class:`calibration.Calibration` for runs that share one (backend, GPU)."""
    import llmc
    from llmc.compiler.calibration import calibrate

    keys = sorted({(m.backend, m.gpu) for m in ms})
    if len(keys) != 1:
        raise MeasurementError(inputs[0], 0, "K006", "backend/gpu",
                               f"the runs span {len(keys)} (backend, GPU) pairs: "
                               + ", ".join(f"{b}/{g}" for b, g in keys),
                               "calibrate each backend and GPU separately (--backend, --gpu)")
    tps, mps = fit_points(ms)
    if not tps and not mps:
        raise MeasurementError(inputs[0], 0, "K001", "measurements", "no throughput or memory figures to fit")
    timed = [m for m in ms if m.tokens_per_s_per_gpu]  # the runs of ``tps``, in order (fit_points)
    labels = [m.label for m in ms]  # two runs' stage folders are both "pretrain": a run is named with its source
    locks = sorted({m.lock for m in ms if m.lock})
    prov = {"llmc_version": llmc.__version__,
            "inputs": [{"path": str(p), "sha256": (digests or {}).get(p) or sha256_file(p)} for p in inputs],
            # the locks the predictions come from (model, layout, backend, GPU): the inputs alone do not reproduce it
            "locks": [{"path": p, "sha256": sha256_file(p)} for p in locks],
            "runs": [m.label if labels.count(m.label) == 1 else f"{m.label} ({m.source})" for m in ms]}
    try:  # and what `llmc plan --calibration` will accept: never write a file it would refuse
        cal = calibrate(keys[0][0], keys[0][1], tps, mps, provenance=prov)
        type(cal).from_json(cal.to_json())
    except ValueError as e:
        _locate_impossible(timed, tps)
        raise MeasurementError(inputs[0], 0, "K008", "fit", f"the fit is not usable ({e})",
                               "the runs disagree with llmc's model by orders of magnitude: check their units "
                               "(tokens/s per GPU, GiB)") from None
    _check_gross_miss(cal, timed, [m for m in ms if m.reserved_bytes or m.allocated_bytes])
    _check_pinned(cal, bool(tps), bool(mps), inputs[0])
    bad = calibration_problem(cal)
    if bad is not None:
        raise MeasurementError(inputs[0], 0, "K008", bad[0], f"the fit is not usable: {bad[1]}",
                               "the runs disagree with llmc's model by far more than a calibration corrects: check "
                               "their units (tokens/s per GPU, GiB)")
    return cal


def _locate_impossible(timed: list[Measurement], points) -> None:
    """When no compute scale fits: the K008 on the first run whose measured step is shorter than llmc's predicted
    communication and optimizer time alone (no compute speed explains it; in the one-factor fit its residual
    pulls the compute scale negative), naming how many runs are so. Returns when no single run is (the fit failed
    for the runs together)."""
    bad = [(m, p) for m, p in zip(timed, points, strict=True) if p.measured_s <= p.comm_s + p.fixed_s]
    if not bad:
        return
    m, p = bad[0]
    others = f" ({len(bad)} of the {len(points)} runs are)" if len(bad) > 1 else (
        " (the other run is not)" if len(points) == 2 else
        f" (the other {len(points) - 1} runs are not)" if len(points) > 2 else "")
    raise MeasurementError(m.source, m.line, "K008", "tokens_per_s_per_gpu",
                           f"{m.label}: {m.tokens_per_s_per_gpu:g} tokens/s per GPU is a step of {p.measured_s:.3g} s, "
                           f"shorter than llmc's predicted communication and optimizer time alone "
                           f"({p.comm_s + p.fixed_s:.3g} s), which no compute speed explains{others}",
                           "check its tokens/s for a typing or units error (per GPU, not the whole job's)")


def _check_gross_miss(cal, timed: list[Measurement], memed: list[Measurement]) -> None:
    """K008 located on the run that the factors fitted on the other runs predict more than
    ``calibration.GROSS_MISS_RATIO`` times off while they predict the others within it (``calibration.gross_misses``):
    a row given per node or for the whole job, or in other units, which fitted bends every factor (one row per node
    in six: every prediction ~5.8x too fast). ``timed`` / ``memed``: the runs of the time / memory residuals, in
    order (:func:`fit_points`)."""
    from llmc.compiler import calibration as c

    found = c.gross_misses(cal.residuals)
    if not found:
        return
    g = found[0]
    time = g["quantity"] != "reserved_bytes"
    m = (timed if time else memed)[g["index"]]
    r = g["ratio"]
    more = f"{r:.1f}x" if r >= 1 else f"1/{1 / r:.1f} of"
    if time:
        gpn = m.gpus_per_node or getattr(m.hardware, "gpus_per_node", None) or 8
        world = m.plan.world
        guess = ("per node rather than per GPU?" if r > 1 and abs(r / gpn - 1) < 0.25 else
                 "the whole job's rather than per GPU?" if r > 1 and world > 1 and abs(r / world - 1) < 0.25 else
                 "a units or typing error?" if r > 1 else
                 "a throttled or failing run, another layout than the row's, or a typing error?")
        what, field_ = f"its tokens/s ({m.tokens_per_s_per_gpu:g} per GPU) is {more} what", "tokens_per_s_per_gpu"
    else:
        guess = "another unit (GB, MB), another quantity (allocated vs reserved), or another layout than the row's?"
        what, field_ = "its memory is " + more + " what", "mem_gib"
    worst = c.UNCALIBRATED_TOKENS_MAX_ERR_PCT if time else c.UNCALIBRATED_MEMORY_MAX_ERR_PCT
    others = (f" ({len(found)} runs are: the one furthest from llmc's uncalibrated prediction is named)"
              if len(found) > 1 else "")
    raise MeasurementError(m.source, m.line, "K008", field_,
                           f"{m.label}: {what} the other runs predict for its layout, beyond the {c.GROSS_MISS_RATIO:g}x "
                           f"no model error explains (llmc's worst miss on published runs is {worst:g}%): "
                           f"{guess}{others}",
                           "fix the row, or drop it and calibrate on the others")


def _check_pinned(cal, timed: bool, memory: bool, source: str) -> None:
    """K008 naming a fitted factor pinned at its bound (``calibration.FACTOR_BOUNDS``): the least-squares optimum
    lies beyond it, so the written factor does not fit the runs, the calibrated predictions keep the rest of the
    error, and a miss that large is a units error (bytes as GiB, a whole job's tokens/s as per GPU) far more often
    than llmc's model being off by 5x in compute or 2x in memory. An error, not a warning: a written calibration is
    applied to every later plan without its residuals being read again."""
    from llmc.compiler.calibration import FACTOR_BOUNDS

    f = cal.factors
    for name, value, fitted, what in (("compute_scale", f.compute_scale, timed, "tokens/s"),
                                      ("mem_scale", f.mem_scale, memory, "memory")):
        lo, hi = FACTOR_BOUNDS[name]
        if fitted and (math.isclose(value, lo, rel_tol=1e-9) or math.isclose(value, hi, rel_tol=1e-9)):
            raise MeasurementError(source, 0, "K008", name, f"the fit is not usable: {name} is pinned at its bound "
                                   f"{value:g} (allowed {lo:g} to {hi:g}): the measured {what} is further from "
                                   "llmc's prediction than a calibration corrects",
                                   "check the runs' units: tokens/s per GPU (not the whole job's), memory in GiB")


def calibration_problem(cal) -> tuple[str, str] | None:
    """(field, why) for the first value of a calibration outside what ``llmc calibrate`` can fit: a factor beyond
    ``calibration.FACTOR_BOUNDS``, a size exponent beyond ``SIZE_EXPONENT_GRID``, a memory overhead larger than the
    GPU's memory either way, a negative error band; None when every value is in range. A hand-edited file with such
    a value would reach the plan (compute_scale 125: an MFU of 2900 %)."""
    from llmc.compiler.calibration import FACTOR_BOUNDS, SIZE_EXPONENT_GRID
    from llmc.compiler.hardware import GPUS, get_gpu

    f = cal.factors
    ranges = dict(FACTOR_BOUNDS)
    ranges["compute_size_exponent"] = (min(SIZE_EXPONENT_GRID), max(SIZE_EXPONENT_GRID))
    part = get_gpu(cal.gpu.split(" ")[0])  # a custom GPU (not in the table): the largest memory llmc knows
    hbm = part.hbm_bytes if part is not None else max(g.hbm_bytes for g in GPUS.values())
    ranges["mem_overhead_bytes"] = (-float(hbm), float(hbm))
    for name, (lo, hi) in ranges.items():
        v = getattr(f, name)
        if not lo <= v <= hi:
            return f"factors.{name}", f"factors.{name} {v:g} is outside {lo:g} to {hi:g}, the range llmc calibrate fits"
    for band in ("time_band", "memory_band"):
        b = getattr(cal, band) or {}
        for q in ("mean_abs_pct", "max_abs_pct", "rms_pct"):
            v = b.get(q)
            if isinstance(v, int | float) and not isinstance(v, bool) and not v >= 0:
                return f"{band}.{q}", f"{band}.{q} {v:g} is negative: an error band is a mean of absolute errors"
    return None


def calibrate_main(inputs: list[str], out: str, *, lock: str | None = None, backend: str | None = None,
                   gpu: str | None = None) -> int:
    """``llmc calibrate INPUT... -o OUT [--lock LOCK] [--backend B] [--gpu G]``: read measured runs, fit the
    factors, write the calibration JSON; print a summary. Bad input: one located line on stderr, exit 1."""
    try:
        ms: list[Measurement] = []
        seen: dict[str, str] = {}
        errors: list[MeasurementError] = []  # every input (and table row) that cannot be read, reported at once
        for p in inputs:
            try:
                f = run_metrics_file(p)
                digest = sha256_file(f) if f.is_file() else None  # (a FIFO or a missing file: read_any says so)
                if digest is not None and digest in seen:  # a run counted twice narrows the leave-one-out band
                    raise MeasurementError(p, 0, "K001", "inputs", f"the same measurements as {seen[digest]} (given "
                                           "twice)", "name each measured run once")
                if digest is not None:
                    seen[digest] = p  # (read once: the provenance reuses it)
                ms.extend(read_any(p, lock))
            except MeasurementError as e:
                errors.append(e)
        raise_all(errors)
        held = sorted({f"{m.backend}/{m.gpu}" for m in ms})
        if backend:
            ms = [m for m in ms if m.backend == backend]
        if gpu:  # any name llmc plan accepts for it: an alias selects its canonical key's runs
            from llmc.compiler.hardware import get_gpu

            want = get_gpu(gpu).key if get_gpu(gpu) is not None else gpu.strip().lower()
            ms = [m for m in ms if m.gpu == want]
        if not ms:
            raise MeasurementError(inputs[0] if inputs else "-", 0, "K001", "inputs", "no measured runs selected",
                                   f"the inputs hold {', '.join(held)} runs" if held else "")
        cal = calibrate_measurements(ms, inputs, {p: d for d, p in seen.items()})
    except MeasurementError as e:
        print(e.located(), file=sys.stderr)
        return 1
    Path(out).write_text(json.dumps(cal.to_json(), indent=2, sort_keys=True) + "\n")
    for m in ms:  # what was measured of a run, where not all of its records (a relaunch under another spec's lock)
        for note in m.notes:
            print(f"{m.source}: note: {note}")
    for warning in (inexact_gpu_warning(ms), no_better_warning(cal), zero_stage_warning(ms),
                    *outlier_warnings(cal)):
        if warning:
            print(warning, file=sys.stderr)
    print(f"calibration {cal.backend}/{cal.gpu} from {len(ms)} run(s): {cal.factors.describe()}")
    for (q, (applied, why)), what in zip(cal.applied().items(), ("tokens/s", "memory"), strict=True):
        band = cal.band(q)
        if not applied:
            print(f"{what}: not applied by llmc plan ({why})")
        elif band:
            raw = (cal.time_band if q == "tokens_per_s" else cal.memory_band) or {}
            floor = (f" (leave-one-out {raw.get('mean_abs_pct', 0.0):.1f}%, raised to the {band['floor_pct']}% "
                     "measurement noise floor of benchmarks/RESULTS.md)" if "floor_pct" in band else "")
            print(f"expected {what} error (leave-one-out): mean {band['mean_abs_pct']:.1f}%, "
                  f"max {band['max_abs_pct']:.1f}%{floor}")
    print(f"wrote {out}")
    return 0


#: A run is named as a likely outlier when the factors fitted on the other runs predict it worse than both of these:
#: OUTLIER_RATIO times the median error of those other runs under the same factors
#: (``calibration.loo_others_spread``: a deleted residual against a robust scale of the fit without the run), and
#: OUTLIER_MIN_PCT (below it, a run is within what llmc's uncalibrated model is off by anyway:
#: benchmarks/RESULTS.md).
OUTLIER_RATIO = 3.0
OUTLIER_MIN_PCT = 20.0
OUTLIER_MIN_RUNS = 4


def outlier_warnings(cal) -> list[str]:
    """One warning line per measured run that the factors fitted on the other runs predict far worse than they
    predict each other (a typo in one row, a run on other hardware or software, a throttled node): the fit still
    stands, but that run bends it; check it, or leave it out."""
    out = []
    for quantity, what in (("tokens_per_s (relative)", "tokens/s"), ("reserved_bytes", "memory")):
        runs = [(r["label"], r["loo_err_pct"], r.get("others_err_pct")) for r in cal.residuals
                if r.get("quantity") == quantity and isinstance(r.get("loo_err_pct"), int | float)
                and isinstance(r.get("others_err_pct"), int | float)]
        if len(runs) < OUTLIER_MIN_RUNS:
            continue
        for label, e, median in runs:
            if abs(e) > max(OUTLIER_MIN_PCT, OUTLIER_RATIO * median):
                out.append(f"warning: run {label}: the factors fitted on the other runs predict its {what} "
                           f"{e:+.1f}% off (the others: median {median:.1f}%); check its row (units, layout, "
                           f"GPU) or measure it again")
    return out


#: zero_stage_warning: a run's memory off by more than this (%) at its zero_stage ...
ZERO_MISMATCH_MIN_PCT = 10.0
#: ... and within this (%) at another stage (and 3x closer) reads as a zero_stage the row does not say.
ZERO_MATCH_PCT = 3.0


def zero_stage_warning(ms: list[Measurement]) -> str | None:
    """One warning line when some runs' measured memory is far from llmc's prediction at their ``zero_stage`` and
    close to it at another stage: a table row without the column is ZeRO-3 (benchmarks/README.md: torchtitan's
    FSDP resharding after forward), while ``llmc plan`` may choose zero_stage 1 (reshard_after_forward=False) for the
    same layout, so transcribing a plan without that column puts every memory residual off by 20-35 %. None when no
    run is so."""
    hits = []
    for m in ms:
        meas = m.reserved_bytes or m.allocated_bytes
        if not meas:
            continue
        try:
            _, mem = predicted(m)
        except MeasurementError:
            continue
        kind = "reserved_bytes" if m.reserved_bytes else "allocated_bytes"
        err = 100.0 * (getattr(mem, kind) - meas) / meas
        if abs(err) <= ZERO_MISMATCH_MIN_PCT:
            continue
        best = None
        for z in (0, 1, 2, 3):
            if z == m.plan.zero_stage:
                continue
            try:
                alt = replace(m, plan=replace(m.plan, zero_stage=z))
                got = getattr(predicted(alt)[1], kind)
            except (MeasurementError, ValueError):
                continue
            e = 100.0 * (got - meas) / meas
            if abs(e) <= ZERO_MATCH_PCT and abs(e) * 3 <= abs(err) and (best is None or abs(e) < abs(best[1])):
                best = (z, e)
        if best is not None:
            hits.append((m, err, best))
    if not hits:
        return None
    labels = ", ".join(m.label for m, _, _ in hits[:6]) + (", ..." if len(hits) > 6 else "")
    stages = sorted({z for _, _, (z, _) in hits})
    given = sorted({m.plan.zero_stage for m, _, _ in hits})
    lo, hi = min(e for _, e, _ in hits), max(e for _, e, _ in hits)
    off = f"{lo:+.0f}%" if round(lo) == round(hi) else f"{lo:+.0f}% to {hi:+.0f}%"
    return (f"warning: {len(hits)} run(s) ({labels}) match llmc's memory at zero_stage "
            f"{'/'.join(map(str, stages))} (within {ZERO_MATCH_PCT:g}%), not at their zero_stage "
            f"{'/'.join(map(str, given))} ({off}): a table row without a zero_stage column is "
            "zero_stage 3 (FSDP resharding after forward), while llmc plan may choose 1 for the same layout; give the "
            "column as the runs ran (benchmarks/README.md, Schema)")


def inexact_gpu_warning(ms: list[Measurement]) -> str | None:
    """One warning line when some runs were measured on another part than the llmc GPU they are fitted for (a
    table's ``gpu_key_exact: false`` with no ``gpu_part``): the factors then absorb the difference between the two
    parts (memory size, clocks, power cap), and apply to neither exactly. None when every run is on its part."""
    off = [m for m in ms if not m.gpu_exact]
    if not off:
        return None
    systems = sorted({m.system or "another part" for m in off})
    return (f"warning: {len(off)} of {len(ms)} run(s) were measured on {', '.join(systems)}, not on llmc's "
            f"{off[0].gpu} (its closest entry): the factors fitted for {off[0].gpu} include the difference "
            f"(name the part's own llmc key as the table's gpu_part where llmc gpus lists it)")


def no_better_warning(cal) -> str | None:
    """One warning line when the fit predicts the measured runs no better than llmc does uncalibrated, for tokens/s
    or memory: the calibrated error is the leave-one-out one (each run predicted by factors fitted on the others;
    Hastie, Tibshirani, Friedman, "The Elements of Statistical Learning", 2nd ed., sec. 7.10), in-sample when there
    is one run of that quantity; the uncalibrated error is the mean |error| of llmc's own predictions of the same
    runs (nothing fitted, so already an out-of-sample figure). Factors that do not beat it make the plans no
    better, or worse: ``llmc plan`` does not apply them (``Calibration.applied``, the same comparison), and this
    line says so for each quantity concerned; the calibration is still written, recording them and why. None when it
    is better for every quantity measured, or when both errors are below ``calibration.NEGLIGIBLE_ERR_PCT`` (llmc already
    predicts those runs: there is nothing for a fit to improve)."""
    worse = []  # the decision is Calibration.applied's, so this line and the plan never disagree
    for (q, (applied, _)), band, what in zip(cal.applied().items(), (cal.time_band, cal.memory_band),
                                             ("tokens/s", "memory"), strict=True):
        res = cal.uncalibrated_errors(q)
        if applied or not res or not band:
            continue
        worse.append(f"{what} mean error {band['mean_abs_pct']:.1f}% calibrated (leave-one-out, {len(res)} run(s)) "
                     f"vs {statistics.fmean(res):.1f}% uncalibrated")
    if not worse:
        return None
    which = " and ".join(w.split(" mean error")[0] for w in worse)
    return ("warning: the calibration predicts the measured runs no better than llmc does without it: "
            + "; ".join(worse) + f"; not applied: llmc plan keeps {which} uncalibrated with this file (measure more "
            "runs, and longer ones, on the hardware you will plan for, and calibrate again)")


def load_calibration(path: str | Path, spec_file: str | None = None, record_as: str | None = None):
    """Read a calibration JSON (``RunSpec.calibration``, relative to the spec file) into a Calibration. ``record_as``:
    the name its ``file`` records, with the SHA-256 of the bytes read (one read: a file replaced meanwhile cannot
    pair one file's factors with another's hash)."""
    import dataclasses
    import hashlib

    from llmc.compiler.calibration import Calibration

    p = Path(path)
    if not p.is_absolute() and spec_file:
        p = Path(spec_file).parent / p
    raw = _read_bytes(p, "K007", "calibration", "write it with llmc calibrate")
    text = raw.decode("utf-8", "replace")
    try:
        cal = Calibration.from_json(json.loads(text))
    except RecursionError:
        raise MeasurementError(str(p), 0, "K007", "calibration", "cannot read the calibration: JSON nested too deeply",
                               "write it with llmc calibrate") from None
    except (OSError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise MeasurementError(str(p), 0, "K007", "calibration", f"cannot read the calibration: {e}",
                               "write it with llmc calibrate") from e
    bad = calibration_problem(cal)
    if bad is not None:
        raise MeasurementError(str(p), 0, "K007", bad[0], bad[1], "write it with llmc calibrate, unedited")
    warning = version_warning(cal, str(p))
    if warning:
        print(warning, file=sys.stderr)
    if record_as is not None:
        cal = dataclasses.replace(cal, file={"path": record_as, "sha256": hashlib.sha256(raw).hexdigest()})
    return cal


def version_warning(cal, path: str) -> str | None:
    """One warning line when a calibration was fitted by another llmc version than this one; None otherwise. Not an
    error: the factors scale named terms of the time and memory model (compute, communication, reserved bytes),
    which keep their meaning across patch releases; a release that changes the model itself shifts what the
    factors correct, so the line says to calibrate again with this version."""
    import llmc

    made = (cal.provenance or {}).get("llmc_version")
    if not isinstance(made, str) or made == llmc.__version__:
        return None
    return (f"warning: {path} was fitted by llmc {made}, this is llmc {llmc.__version__}: its factors are applied "
            "(they scale named terms of the model, which keep their meaning across patch releases); calibrate "
            "again with this version if its time or memory model changed")


__all__ = ["Measurement", "MeasurementError", "MeasurementErrors", "raise_all", "TitanStep", "parse_torchtitan_log", "read_llmc_run",
           "read_torchtitan_log", "read_table", "read_any", "predicted", "fit_points", "calibrate_measurements",
           "calibrate_main", "load_calibration", "steady", "table_row", "table_cell", "table_gpu",
           "inexact_gpu_warning", "no_better_warning", "zero_stage_warning", "outlier_warnings", "run_metrics_file", "check_columns", "calibration_problem",
           "version_warning", "lock_gpu"]
