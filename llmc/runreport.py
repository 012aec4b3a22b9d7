"""Run report: measured training metrics vs the build's predictions, as PNG plots and one HTML page.

Body of ``llmc report RUN_DIR``::

    from llmc.runreport import make_report
    paths = make_report(run_dir, lock, out_dir)   # lock: the plan.lock.json dict; returns the files written

Inputs:

* ``run_dir``: a run directory holding one sub-directory per stage with a ``metrics.jsonl`` (the layout
  the launchers write: ``<build>/run/<stage>/metrics.jsonl``), or a single stage's directory with
  ``metrics.jsonl`` directly in it. The lock's stages are reported in its stage order, then other stage folders by
  name (a stage the lock no longer has); a run set aside (``<stage>.set-aside-N``, :func:`llmc.fileio.is_set_aside`:
  what ``llmc launch --no-resume`` leaves) is not a stage. Records are those of :class:`llmc.runtime.metrics.MetricsLogger`
  (``step, loss, lr, grad_norm, tokens, tokens_per_s, flops_per_s, mfu, peak_mem_bytes, step_s``; step_s the mean
  training time per step since the previous record) or of the
  post-training loops (``stage, step, loss, ...``); event records (``"event"`` key) and a truncated last
  line are skipped.
* ``lock``: predictions are read from it, never recomputed: ``time.step_seconds``,
  ``time.tokens_per_second`` and ``time.mfu`` (the searched plan, i.e. the pre-training stage), every other
  stage's own ``stages[i].time.step_seconds`` and ``tokens_per_second`` (its plans give no MFU); memory: the
  pre-training's ``memory.allocated_bytes`` (what ``peak_mem_bytes``, the allocator's allocated peak, measures:
  the must-fit ``per_gpu_bytes`` adds the allocator's reserve and the CUDA context), other stages'
  ``stages[i].memory.per_gpu_bytes`` (the only figure their plans give: the row says "must-fit"). A CPU run's
  ``peak_mem_bytes`` is the process's peak RSS (``peak_mem_device: "cpu"``; records without that field: the lock's
  hardware is the CPU): shown as such, not compared with the per-GPU prediction. A pre-training run on a backend
  other than the plan's (its ``start`` event's ``backend``: ``llmc launch --backend``) is predicted for that backend
  by :func:`llmc.measurements.run_prediction`, as ``llmc calibrate`` predicts it, and its rows name the backend; a
  ``backend`` llmc does not know (:data:`llmc.compiler.backends.BACKENDS`) is a MetricsError naming the line
  (``llmc report``'s L012; ``llmc calibrate`` refuses it too, K001).

Outputs in ``out_dir`` (created): per stage ``<stage>-loss.png``, ``<stage>-throughput.png``,
``<stage>-memory.png``, ``<stage>-mfu.png`` (a plot is skipped when no record has that metric), with the
prediction drawn as a dashed horizontal line beside the measurement, and ``report.html``: a
self-contained page (PNGs embedded as base64 data URIs) with a table of predicted vs measured values per
stage. "Measured" is, of a run relaunched under the lock after steps under another spec (a rebuild with other
hardware), the records since that relaunch (:func:`llmc.runtime.metrics_io.since_relaunch`, ``llmc calibrate``'s
rule; one line says so: :meth:`StageMetrics.note`), of any other run all of them: the median over the steady-state
records (those after
:data:`llmc.measurements.WARMUP_STEPS` steps, which carry start-up costs such as allocator warm-up and
compilation; all of them in a shorter run), as ``llmc calibrate`` takes it, for step time, tokens/s and MFU,
and the maximum for peak memory; the ratio column is measured / predicted.

Validation and benchmark evals: the validation records (``val_loss``, ``val_ppl``: every
``eval.validation.every_steps`` steps, merged into the step records) are drawn on the loss plot and
tabulated (first and last); the lm-evaluation-harness results of a stage (``<stage>/eval/summary.json``,
written by :mod:`llmc.runtime.evaluate`) are a table of task, metric and value. :func:`summary_lines`
gives the same numbers as text (``llmc report`` prints them)::

    pretrain: validation loss 7.62 -> 4.31 (ppl 2043.5 -> 74.4), steps 100 -> 500
    pretrain: eval pydoc_mc: acc 0.7917 ± 0.0847, acc_norm 0.7500 ± 0.0903 (24 documents, 0-shot)
    pretrain: eval pydoc_mc acc by step: 200 0.5417, 400 0.6250, final (500) 0.7917

A summary that cannot be read or is not of that shape (``tasks`` or ``samples`` not an object) is left out of the
report, and :func:`summary_lines` says so in one ``warning[L013]`` line naming the file (after its lines, or in the
list its caller passes as ``skipped``). A figure that is not a finite number within ±:data:`LIMIT` (NaN, an
infinity, an integer too large for a float) is left out like a missing one.

Checkpoints compared on the same suite (``eval.every_checkpoints``): each scored checkpoint's
``<stage>/eval/step-N/summary.json`` (:func:`read_checkpoint_evals`) becomes a column of a per-stage table
(task, metric; one column per step, then the final export at the stage's last step from the lock) and a
plot ``<stage>-evals.png`` of every metric against the step.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by the Agg canvas), so no
display and no global backend switch is needed: https://matplotlib.org/stable/users/explain/figure/backends.html
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmc.fileio import is_set_aside
from llmc.measurements import WARMUP_STEPS
from llmc.runtime.metrics_io import Relaunch, is_score, score_line  # (torch-free, as this module)


@dataclass(frozen=True)
class StageMetrics:
    """One stage's step records, as columns (None where a record lacks the field)."""

    name: str
    path: Path
    steps: list[int]
    columns: dict[str, list[float | None]] = field(default_factory=dict)
    mem_device: str | None = None  # the records' peak_mem_device ("cuda", "cpu"); None: records before the field
    # the validation records' val_format: the token format the loss is measured in ("llmc-packed": native / DeepSpeed,
    # "torchtitan-documents": torchtitan's job); None: records before the field
    val_format: str | None = None
    backend: str | None = None  # the backend that trained it (its last start / resume event's); None: not logged
    # a run relaunched under the lock after steps under another spec (llmc.runtime.metrics_io.since_relaunch): the
    # steps measured against the lock are those of ``current`` (True where the step's record is the relaunch's);
    # None: all of them
    relaunch: Relaunch | None = None
    current: tuple[bool, ...] | None = None

    def host_memory(self, lock: dict) -> bool:
        """Whether peak_mem_bytes is the process's peak RSS of a CPU run, not device memory (so not what the plan
        predicts): the records say so, or, for records without peak_mem_device, the lock's hardware is the CPU."""
        return self.mem_device == "cpu" or (self.mem_device is None and _get(lock, "hardware", "key") == "cpu")

    def series(self, key: str, measured: bool = False) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` where logged; ``measured``: only the steps compared with the lock's prediction
        (after a relaunch under it, :attr:`relaunch`)."""
        col = self.columns.get(key, [])
        keep = self.current if measured and self.current is not None else None
        pts = [(s, v) for j, (s, v) in enumerate(zip(self.steps, col, strict=False))
               if v is not None and (keep is None or keep[j])]
        return [s for s, _ in pts], [v for _, v in pts]

    def steady(self, key: str) -> list[float]:
        """Measured values (:meth:`series` ``measured``) after the warm-up steps
        (:data:`llmc.measurements.WARMUP_STEPS`, as ``llmc calibrate``); all of them if that leaves none."""
        from llmc.measurements import steady_values

        return steady_values(list(zip(*self.series(key, measured=True), strict=True)))

    def note(self) -> str | None:
        """What was measured of a relaunched run (:meth:`llmc.runtime.metrics_io.Relaunch.note`, ``llmc
        calibrate``'s line too); None: every step."""
        if self.relaunch is None:
            return None
        kept = [s for s, c in zip(self.steps, self.current or (), strict=False) if c]
        return self.relaunch.note(kept[-1] if kept else None, self.steps[-1] if self.steps else None)


@dataclass(frozen=True)
class Prediction:
    step_seconds: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    per_gpu_bytes: float | None = None
    allocated_bytes: float | None = None  # the allocator's allocated peak (pre-training); None: not planned
    # the backend predicted when it is not the plan's (the run's own: llmc launch --backend); None: the plan's
    backend: str | None = None

    @property
    def memory_bytes(self) -> float | None:
        """What a measured allocated peak compares with: the allocated prediction, else the must-fit figure."""
        return self.allocated_bytes or self.per_gpu_bytes


@dataclass(frozen=True)
class Row:
    """One line of the predicted-vs-measured table."""

    stage: str
    quantity: str
    unit: str
    predicted: float | None
    measured: float | None

    @property
    def ratio(self) -> float | None:
        if self.predicted and self.measured is not None:
            return self.measured / self.predicted
        return None


#: Largest magnitude of a figure the report reads (a metric, an eval score, a prediction, a step): no measurement
#: comes near it, and matplotlib cannot lay out an axis much wider (numpy overflows computing its margins and
#: ticks, with a RuntimeWarning, then an error), so a value beyond it is skipped like a missing one.
LIMIT = 1e150


def _number(v: Any) -> float | None:
    """``v`` as a float when it is a JSON number (not a bool), finite and within ±:data:`LIMIT`; else None."""
    if type(v) is float:  # (most figures: one comparison, False for NaN and the infinities)
        return v if -LIMIT <= v <= LIMIT else None
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return f if math.isfinite(f) and abs(f) <= LIMIT else None


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, None where a level is missing or not an object."""
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _lock_stages(lock: dict) -> list[dict]:
    """The lock's stages that have a name, in their ``order``."""
    stages = lock.get("stages")
    named = [s for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)] \
        if isinstance(stages, list) else []
    return sorted(named, key=lambda s: s["order"] if isinstance(s.get("order"), int) else 0)


NUMERIC = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_bytes", "step_s", "val_loss", "val_ppl")


@dataclass(frozen=True)
class StageEval:
    """A stage's lm-evaluation-harness summary (``<stage>/eval/summary.json``)."""

    stage: str
    tasks: dict[str, dict[str, float]]  # task -> metric -> value
    samples: dict[str, int]
    step: int | None = None  # the checkpoint's step (None: the stage's final export)
    n_shot: dict[str, int] = field(default_factory=dict)  # task -> few-shot examples per prompt (lm_eval's n-shot)
    chat: bool = False  # whether the prompts went through the model's chat template


def _read_summary(path: Path, stage: str, step: int | None = None,
                  skipped: list[str] | None = None) -> StageEval | None:
    """The summary at ``path``; None when it cannot be read or is not of a summary's shape (a JSON object whose
    ``tasks`` and ``samples`` are objects), with a warning line saying why appended to ``skipped``. A task that is
    not an object and a value that is not a number (:func:`_number`) are left out: lm_eval writes "N/A" for some
    standard errors."""
    import json

    try:
        d = json.loads(path.read_text())
    except OSError as e:
        why = f"it cannot be read ({e.strerror or e})"
    except (ValueError, RecursionError):  # UnicodeDecodeError and an over-long integer are ValueErrors too
        why = "it is not valid JSON"
    else:
        bad = [k for k in ("tasks", "samples") if isinstance(d, dict) and not isinstance(d.get(k) or {}, dict)]
        why = ("it is not a JSON object" if not isinstance(d, dict)
               else f"its {bad[0]!r} is not an object (task -> {'metrics' if bad[0] == 'tasks' else 'documents'})"
               if bad else None)
    if why is not None:
        if skipped is not None:
            skipped.append(f"{path}: warning[L013] eval summary left out of the report: {why} (restore it, or "
                           "delete it and rerun the eval)")
        return None
    tasks = {t: {k: f for k, v in m.items() if (f := _number(v)) is not None}
             for t, m in (d.get("tasks") or {}).items() if isinstance(m, dict)}
    samples = {t: n for t, n in (d.get("samples") or {}).items()
               if isinstance(n, int) and not isinstance(n, bool) and _number(n) is not None}
    n_shot = {t: n for t, n in (d.get("n_shot") or {}).items()
              if isinstance(n, int) and not isinstance(n, bool)} if isinstance(d.get("n_shot"), dict) else {}
    return StageEval(stage, tasks, samples, step, n_shot, d.get("apply_chat_template") is True)


def _stage_order(found: list[str], lock: dict) -> list[str]:
    """The stage folders of ``found`` (names under ``run/``) to report, in order: the lock's stages in its stage order,
    then the others by name (a stage the lock no longer has), leaving out a past run set aside
    (``<stage>.set-aside-N``, what ``llmc launch --no-resume`` leaves: :func:`llmc.fileio.is_set_aside`)."""
    order = [s["name"] for s in _lock_stages(lock)]
    return [n for n in order if n in found] + sorted(n for n in found if n not in order and not is_set_aside(n))


def _stage_dirs(run_dir: Path, lock: dict, marker: str) -> list[tuple[str, Path]]:
    """(stage, dir) holding ``marker`` (a glob under the stage dir): ``run_dir`` itself, else its children
    in :func:`_stage_order`."""
    if any(run_dir.glob(marker)):
        return [(run_dir.name, run_dir)]
    found = {p.name: p for p in run_dir.iterdir() if p.is_dir()} if run_dir.is_dir() else {}
    names = _stage_order(list(found), lock)
    return [(n, found[n]) for n in names if any(found[n].glob(marker))]


def read_checkpoint_evals(run_dir: str | Path, lock: dict,
                          skipped: list[str] | None = None) -> dict[str, list[StageEval]]:
    """stage -> its scored checkpoints (``<stage>/eval/step-N/summary.json``), by step; a malformed summary is
    left out, with a line in ``skipped`` (:func:`_read_summary`)."""
    out: dict[str, list[StageEval]] = {}
    for name, d in _stage_dirs(Path(run_dir), lock, "eval/step-*/summary.json"):
        evs = []
        for p in d.glob("eval/step-*/summary.json"):
            step = p.parent.name.split("-", 1)[1]
            ok = step.isdigit() and _number(int(step)) is not None
            ev = _read_summary(p, name, int(step), skipped) if ok else None
            if ev is not None:
                evs.append(ev)
        if evs:
            out[name] = sorted(evs, key=lambda e: e.step)
    return out


def _final_step(lock: dict, stage: str) -> int | None:
    v = next((s.get("steps") for s in _lock_stages(lock) if s["name"] == stage), None)
    return v if isinstance(v, int) and not isinstance(v, bool) and _number(v) is not None else None


def _by_step(steps: list[StageEval], final: StageEval | None, lock: dict
             ) -> tuple[list[str], dict[tuple[str, str], list[float | None]], list[int | None]]:
    """Column labels, (task, metric) -> values per column, and the x position of each column."""
    cols = list(steps) + ([final] if final is not None else [])
    fs = _final_step(lock, cols[0].stage) if cols else None
    labels = [str(e.step) if e.step is not None else (f"final ({fs})" if fs is not None else "final") for e in cols]
    xs = [e.step if e.step is not None else fs for e in cols]
    keys = sorted({(t, k) for e in cols for t, m in e.tasks.items() for k in m if is_score(k)})
    return labels, {key: [e.tasks.get(key[0], {}).get(key[1]) for e in cols] for key in keys}, xs


def read_evals(run_dir: str | Path, lock: dict, skipped: list[str] | None = None) -> list[StageEval]:
    """Every stage's eval summary under ``run_dir`` (:func:`_stage_order`), leaving out unreadable or malformed
    files, with a line for each in ``skipped`` (:func:`_read_summary`)."""

    run_dir = Path(run_dir)
    if (run_dir / "eval" / "summary.json").is_file():
        found = {run_dir.name: run_dir / "eval" / "summary.json"}
    else:
        found = {p.parent.parent.name: p for p in run_dir.glob("*/eval/summary.json")}
    out = []
    for name in _stage_order(list(found), lock):
        ev = _read_summary(found[name], name, skipped=skipped)
        if ev is not None:
            out.append(ev)
    return out


def read_stages(run_dir: str | Path, lock: dict) -> list[StageMetrics]:
    """Every stage's metrics under ``run_dir`` (:func:`find_stages`, :func:`read_metrics` against the lock's spec):
    read once, for :func:`make_report` and :func:`summary_lines` alike."""
    return [read_metrics(p, name, _get(lock, "spec", "sha256")) for name, p in find_stages(run_dir, lock)]


def summary_lines(run_dir: str | Path, lock: dict, skipped: list[str] | None = None,
                  stages: list[StageMetrics] | None = None) -> list[str]:
    """Per stage: validation loss/perplexity first -> last, then each eval task's metrics, then each
    metric by checkpoint step (``eval.every_checkpoints``). A ``warning[L013]`` line per eval summary left out
    (:func:`_read_summary`) goes to ``skipped`` when given (for stderr), else after those lines. ``stages``: the
    metrics already read (:func:`read_stages`; None: read here)."""
    lines: list[str] = []
    left_out: list[str] = [] if skipped is None else skipped
    formats: dict[str, str] = {}
    for sm in read_stages(run_dir, lock) if stages is None else stages:
        name = sm.name
        if note := sm.note():  # (a relaunch under this lock after steps under another spec)
            lines.append(f"{name}: {note}")
        steps, vals = sm.series("val_loss")
        if vals:
            _, ppl = sm.series("val_ppl")
            pp = f" (ppl {ppl[0]:.1f} -> {ppl[-1]:.1f})" if ppl else ""
            fmt = f" [{sm.val_format}]" if sm.val_format else ""
            lines.append(f"{name}: validation loss {vals[0]:.4f} -> {vals[-1]:.4f}{pp}, steps {steps[0]} -> {steps[-1]}"
                         f"{fmt}")
            if sm.val_format:
                formats[name] = sm.val_format
    if len(set(formats.values())) > 1:
        lines.append(f"note: the stages' validation losses are measured in different formats ({format_note(formats)}): "
                     "each compares within its format, not across them")
    evals = read_evals(run_dir, lock, left_out)
    for ev in evals:
        for task, metrics in ev.tasks.items():
            if not any(is_score(k) for k in metrics):  # no score that is a number
                continue
            lines.append(f"{ev.stage}: eval {task}: "
                         f"{score_line(metrics, ev.samples.get(task), ev.n_shot.get(task), ev.chat)}")
    finals = {ev.stage: ev for ev in evals}
    for stage, steps in read_checkpoint_evals(run_dir, lock, left_out).items():
        labels, rows, _ = _by_step(steps, finals.get(stage), lock)
        for (task, metric), vals in rows.items():
            lines.append(f"{stage}: eval {task} {metric} by step: " + ", ".join(
                f"{lab} {v:.4f}" for lab, v in zip(labels, vals, strict=True) if v is not None))
    return lines if skipped is not None else lines + left_out


def read_metrics(path: str | Path, name: str | None = None, spec_sha256: str | None = None) -> StageMetrics:
    """Step records of one ``metrics.jsonl`` through :func:`llmc.runtime.metrics_io.read_metrics` (each step
    once, its training and validation records merged; events and a torn last line skipped; only the fields the
    report reads kept). ``spec_sha256``: the lock's ``spec.sha256``, whose relaunch after steps under another spec
    (:func:`llmc.runtime.metrics_io.since_relaunch`, ``llmc calibrate``'s rule) marks the steps measured."""
    from llmc.runtime.metrics_io import read_metrics as read_log  # no torch import

    path = Path(path)
    log = read_log(path, keys=(*NUMERIC, "peak_mem_device", "val_format"))
    relaunch = log.relaunch(spec_sha256)
    # (log.steps: one merged record per step, in step order; a step past LIMIT is left out like a missing one)
    ok = [(r, line) for r, line in zip(log.steps, log.step_lines, strict=True) if _number(r["step"]) is not None]
    recs, lines = [r for r, _ in ok], [line for _, line in ok]
    del ok
    steps = [r["step"] for r in recs]
    cols: dict[str, list[float | None]] = {}
    for key in NUMERIC:
        vals = [_number(r.get(key)) for r in recs]
        if any(v is not None for v in vals):
            cols[key] = vals
    current = tuple(relaunch.measured(line) for line in lines) if relaunch is not None else None
    devices = [d for j, r in enumerate(recs) if (current is None or current[j])
               and isinstance(d := r.get("peak_mem_device"), str)]
    formats = [f for r in recs if isinstance(f := r.get("val_format"), str)]
    from llmc.compiler.backends import BACKENDS
    from llmc.runtime.metrics_io import ran_backend

    ran = ran_backend(log.numbered_events(), path, BACKENDS)  # (a MetricsError, llmc report's L012 line, for a backend llmc does not know)
    return StageMetrics(name or path.parent.name, path, steps, cols, devices[-1] if devices else None,
                        formats[-1] if formats else None, ran, relaunch, current)


def find_stages(run_dir: str | Path, lock: dict) -> list[tuple[str, Path]]:
    """(stage name, metrics.jsonl) in :func:`_stage_order` (the lock's stages, then other stage dirs by name; no
    set-aside run)."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").is_file():
        return [(run_dir.name, run_dir / "metrics.jsonl")]
    found = {p.parent.name: p for p in run_dir.glob("*/metrics.jsonl")}
    return [(n, found[n]) for n in _stage_order(list(found), lock)]


def _main_stage(lock: dict) -> str | None:
    """The stage the lock's ``time`` block describes: the first pre-training stage."""
    for s in _lock_stages(lock):
        if s.get("kind") == "pretrain":
            return s["name"]
    return None


def planned_backend(lock: dict) -> str:
    """The backend the lock's plan was computed for (its ``backend.name``; "native" for a lock without one)."""
    name = _get(lock, "backend", "name")
    return name if isinstance(name, str) else "native"


def predictions(lock: dict, stage: str, backend: str | None = None) -> Prediction:
    """The lock's numbers for ``stage`` (None where the lock has none, or no usable number: :func:`_number`).

    ``backend``: the backend that trained the stage (its metrics' start event). A pre-training run on a backend
    other than the plan's is predicted for that backend, as ``llmc calibrate`` predicts it: llmc's model on that
    backend's layout (:func:`llmc.measurements.predicted` of :func:`llmc.measurements.run_prediction`, the one
    place both compute it; uncalibrated), with ``Prediction.backend`` naming it. The plan's own backend: the lock's
    figures, which are that same model's (calibrated where the build was)."""
    main = _main_stage(lock)
    if backend is not None and backend != planned_backend(lock) and (stage == main or main is None):
        from llmc.measurements import MeasurementError, run_prediction

        try:
            t, mem = run_prediction(lock, backend)
        except MeasurementError:
            return Prediction(backend=backend)  # a lock llmc cannot predict from: no figures, not the plan's
        # the per-GPU peak: the compiler's figure for that backend's run where the lock has it (backend_runs: what
        # `llmc plan` and L015 say of it, calibrated where the build was), else the model's
        fig = _number(_get(lock, "backend_runs", backend, "per_gpu_bytes"))
        return Prediction(t.step_seconds, t.tokens_per_second, t.mfu,
                          fig if fig is not None else float(mem.per_gpu_bytes), float(mem.allocated_bytes),
                          backend=backend)
    st = next((s for s in _lock_stages(lock) if s["name"] == stage), None)
    mem = _number(_get(st, "memory", "per_gpu_bytes"))
    if mem is None and (st is None or stage == main):
        mem = _number(_get(lock, "memory", "per_gpu_bytes"))
    if stage == main or (main is None and st is None):
        return Prediction(*(_number(_get(lock, "time", k)) for k in ("step_seconds", "tokens_per_second", "mfu")),
                          mem, _number(_get(lock, "memory", "allocated_bytes")))
    # every other stage's plan times its own step (stages[i].time: its layout, batch and kind; no MFU figure)
    return Prediction(*(_number(_get(st, "time", k)) for k in ("step_seconds", "tokens_per_second", "mfu")),
                      per_gpu_bytes=mem)


def table(stages: list[StageMetrics], lock: dict) -> list[Row]:
    rows = []
    for sm in stages:
        p = predictions(lock, sm.name, sm.backend)
        med = {k: (statistics.median(v) if (v := sm.steady(k)) else None) for k in ("step_s", "tokens_per_s", "mfu")}
        mem = max(sm.series("peak_mem_bytes", measured=True)[1], default=None)
        if mem is not None and sm.host_memory(lock):  # a CPU run's RSS: shown, not compared with the per-GPU prediction
            mem_row = Row(sm.name, "peak process RSS (CPU run, not GPU memory)", "GiB", None,
                          mem / 2**30 if mem is not None else None)
        else:
            mem_row = Row(sm.name, "peak memory per GPU" + (", allocated" if p.allocated_bytes else ", must-fit"),
                          "GiB", p.memory_bytes / 2**30 if p.memory_bytes else None,
                          mem / 2**30 if mem is not None else None)
        if p.backend:  # predicted for the backend that ran, not the plan's: the rows say which
            mem_row = Row(mem_row.stage, f"{mem_row.quantity} [{p.backend}]", mem_row.unit, mem_row.predicted,
                          mem_row.measured)
        on = f" [{p.backend}]" if p.backend else ""
        rows += [Row(sm.name, "step time" + on, "s", p.step_seconds, med["step_s"]),
                 Row(sm.name, "throughput" + on, "tokens/s", p.tokens_per_s, med["tokens_per_s"]),
                 Row(sm.name, "MFU" + on, "%", p.mfu * 100 if p.mfu is not None else None,
                     med["mfu"] * 100 if med["mfu"] is not None else None),
                 mem_row]
    return rows


# (file suffix, metric key, title, y label, scale, prediction attribute)
PLOTS = (
    ("loss", "loss", "training loss", "loss", 1.0, None),
    ("throughput", "tokens_per_s", "throughput", "tokens/s", 1.0, "tokens_per_s"),
    ("memory", "peak_mem_bytes", "peak memory per GPU", "GiB", 1 / 2**30, "memory_bytes"),
    ("mfu", "mfu", "model FLOPs utilisation", "MFU (%)", 100.0, "mfu"),
)


def _plot(sm: StageMetrics, key: str, title: str, ylabel: str, scale: float, pred: float | None,
          path: Path) -> bool:
    from matplotlib.figure import Figure

    steps, vals = sm.series(key)
    if not vals:
        return False
    fig = Figure(figsize=(7.0, 3.6), dpi=110)
    ax = fig.add_subplot()
    ax.plot(steps, [v * scale for v in vals], marker="." if len(vals) < 60 else None, lw=1.4, color="C0",
            label="training" if key == "loss" else "measured")
    if key == "loss":
        vs, vv = sm.series("val_loss")
        if vv:
            ax.plot(vs, vv, marker="o", lw=1.4, color="C1", label="validation")
            title = "training and validation loss"
            vals = vals + vv
    if pred is not None:
        ax.axhline(pred * scale, color="C3", ls="--", lw=1.4, label=f"predicted ({_num(pred * scale)})")
    if key != "loss" and sm.relaunch is not None and sm.relaunch.line is not None and sm.relaunch.step:
        # measured: the steps after it (a resume under this lock of a run begun under another spec)
        ax.axvline(sm.relaunch.step, color="C2", ls=":", lw=1.4, label="relaunch under this lock")
    if key == "loss" and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
    ax.set_title(f"{sm.name}: {title}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _plot_evals(stage: str, labels: list[str], rows: dict, xs: list[int | None], path: Path) -> bool:
    """Every shown metric of every task against the checkpoint step (the final export at the stage's last step)."""
    from matplotlib.figure import Figure

    if not rows or any(x is None for x in xs):
        return False
    fig = Figure(figsize=(7.0, 3.6), dpi=110)
    ax = fig.add_subplot()
    for (task, metric), vals in rows.items():
        pts = [(x, v) for x, v in zip(xs, vals, strict=True) if v is not None]
        ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", lw=1.4, label=f"{task} {metric}")
    ax.set_title(f"{stage}: benchmark evals by checkpoint")
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    return True


def _checkpoint_html(ck: dict[str, list[StageEval]], evals: list[StageEval], lock: dict) -> str:
    """One table per stage: task, metric, then a column per scored checkpoint and the final export."""
    finals = {ev.stage: ev for ev in evals}
    out = []
    for stage, steps in ck.items():
        labels, rows, _ = _by_step(steps, finals.get(stage), lock)
        head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
        trs = "\n".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(m)}</td>"
                        + "".join(f"<td>{_fmt(v)}</td>" for v in vals) + "</tr>" for (t, m), vals in rows.items())
        out.append(f"<h2>Benchmark evals by checkpoint: {html.escape(stage)}</h2>\n<table><tr><th>task</th>"
                   f"<th>metric</th>{head}</tr>\n{trs}\n</table>")
    return "\n".join(out)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"


def format_note(formats: dict[str, str]) -> str:
    """"stage a, b: llmc-packed; c: torchtitan-documents" from {stage: val_format}."""
    by: dict[str, list[str]] = {}
    for stage, f in formats.items():
        by.setdefault(f, []).append(stage)
    return "; ".join(f"{', '.join(stages)}: {f}" for f, stages in by.items())


def _eval_html(stages: list[StageMetrics], evals: list[StageEval]) -> str:
    """Validation loss/perplexity (first, last) and eval task results as HTML tables ("" when none)."""
    out = []
    vrows = []
    for sm in stages:
        steps, vals = sm.series("val_loss")
        if vals:
            _, ppl = sm.series("val_ppl")
            vrows.append(f"<tr><td>{html.escape(sm.name)}</td><td>{steps[0]} &rarr; {steps[-1]}</td>"
                         f"<td>{vals[0]:.4f} &rarr; {vals[-1]:.4f}</td>"
                         f"<td>{(f'{ppl[0]:.2f} &rarr; {ppl[-1]:.2f}') if ppl else '&ndash;'}</td>"
                         f"<td>{html.escape(sm.val_format or '')}</td></tr>")
    if vrows:
        formats = {sm.name: sm.val_format for sm in stages if sm.val_format and sm.series("val_loss")[1]}
        note = (f"<p>The stages' validation losses are measured in different formats ({html.escape(format_note(formats))}"
                "): each compares within its format, not across them.</p>\n" if len(set(formats.values())) > 1 else "")
        out.append("<h2>Validation</h2>\n" + note + "<table><tr><th>stage</th><th>steps</th><th>loss</th>"
                   "<th>perplexity</th><th>format</th></tr>\n" + "\n".join(vrows) + "\n</table>")
    erows = [f"<tr><td>{html.escape(ev.stage)}</td><td>{html.escape(task)}</td><td>{html.escape(k)}</td>"
             f"<td>{v:.4f}</td><td>{ev.samples.get(task, '')}</td></tr>"
             for ev in evals for task, m in ev.tasks.items() for k, v in sorted(m.items()) if is_score(k)]
    if erows:
        out.append("<h2>Benchmark evals (lm-evaluation-harness)</h2>\n<table><tr><th>stage</th><th>task</th>"
                   "<th>metric</th><th>value</th><th>documents</th></tr>\n" + "\n".join(erows) + "\n</table>")
    return "\n".join(out)


def backend_note(stages: list[StageMetrics], lock: dict) -> str:
    """The sentence naming the backend each prediction is for ("" when every stage ran on the plan's)."""
    planned = planned_backend(lock)
    other = [(sm.name, p.backend) for sm in stages if (p := predictions(lock, sm.name, sm.backend)).backend]
    if not other:
        return ""
    runs = ", ".join(f"{name} ran on {be}" for name, be in other)
    return (f"The plan was computed for {planned}; {runs}: its predictions are llmc's (uncalibrated) model of that "
            f"backend's run, the figures llmc calibrate compares it with, not the plan's.")


def _html(title: str, rows: list[Row], images: list[Path], extra: str = "", note: str = "", measured: str = "") -> str:
    trs = "\n".join(
        f"<tr><td>{html.escape(r.stage)}</td><td>{html.escape(r.quantity)}</td><td>{html.escape(r.unit)}</td>"
        f"<td>{_fmt(r.predicted)}</td><td>{_fmt(r.measured)}</td>"
        f"<td>{'&ndash;' if r.ratio is None else f'{r.ratio:.2f}&times;'}</td></tr>" for r in rows)
    imgs = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in images)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:nth-child(-n+3),th:nth-child(-n+3){{text-align:left}}
figure{{display:inline-block;margin:8px}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Predicted: from plan.lock.json{(" " + html.escape(note)) if note else "."} Measured: median of the records of the
steps after step {WARMUP_STEPS} (all of them in a shorter run; the rule llmc calibrate takes; peak memory: maximum);
step time is each record's mean training time per step since the previous record. Ratio: measured / predicted.</p>
{measured}<table><tr><th>stage</th><th>quantity</th><th>unit</th><th>predicted</th><th>measured</th><th>ratio</th></tr>
{trs}
</table>
{extra}
{imgs}
</body></html>
"""


def make_report(run_dir: str | Path, lock: dict, out_dir: str | Path,
                stages: list[StageMetrics] | None = None) -> list[Path]:
    """Write the PNGs and ``report.html`` for every stage found under ``run_dir``; return their paths
    (PNGs in stage then plot order, the HTML last). Raises FileNotFoundError when no metrics exist. ``stages``: the
    metrics already read (:func:`read_stages`; None: read here)."""
    stages = read_stages(run_dir, lock) if stages is None else stages
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (run a stage first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    for sm in stages:
        p = predictions(lock, sm.name, sm.backend)
        for suffix, key, title, ylabel, scale, attr in PLOTS:
            path = out / f"{sm.name}-{suffix}.png"
            if key == "peak_mem_bytes" and sm.host_memory(lock):
                title, attr = "peak process RSS (CPU run, not GPU memory)", None
            if _plot(sm, key, title, ylabel, scale, getattr(p, attr) if attr else None, path):
                pngs.append(path)
    evals = read_evals(run_dir, lock)
    ck = read_checkpoint_evals(run_dir, lock)
    finals = {ev.stage: ev for ev in evals}
    for stage, steps in ck.items():
        path = out / f"{stage}-evals.png"
        if _plot_evals(stage, *_by_step(steps, finals.get(stage), lock), path):
            pngs.append(path)
    name = _get(lock, "spec", "name")
    name = name if isinstance(name, str) and name else Path(run_dir).name
    page = out / "report.html"
    extra = _eval_html(stages, evals) + "\n" + _checkpoint_html(ck, evals, lock)
    notes = "".join(f"<p>{html.escape(sm.name)}: {html.escape(n)}.</p>\n" for sm in stages if (n := sm.note()))
    page.write_text(_html(f"llmc run report: {name}", table(stages, lock), pngs, extra, backend_note(stages, lock),
                          notes), encoding="utf-8")
    return [*pngs, page]
