"""Run observability: TensorBoard event files, Weights & Biases (offline by default) and a progress line
with ETA, beside the ``metrics.jsonl`` that :class:`llmc.runtime.metrics.MetricsLogger` writes.

API (rank 0 constructs it with ``enabled=True``; other ranks with ``enabled=False``, which makes every
call a no-op)::

    log = RunLogger(out_dir, total_steps=500, tokens_per_step=4096, run_name="tiny-cpu",
                    config={"spec": ...}, tensorboard=True, wandb="auto", project="llmc")
    log.log({"step": 10, "loss": 3.2, "lr": 1e-3, "tokens_per_s": 5e4, "mfu": 0.31, ...})
    log.event("checkpoint", step=10, path="...")
    log.close()

``log(rec)`` takes the same record as ``MetricsLogger.log`` (so a trainer can call both, or hand its
``MetricsLogger`` in as ``metrics=`` and let this write ``metrics.jsonl`` through it). Every numeric field
except ``step`` becomes a scalar at global step ``rec["step"]`` (None, booleans and strings are skipped), tagged
by :func:`scalar_tag`: a validation record's ``val_<x>`` as ``val/<x>`` (``val/loss``, ``val/ppl``, ``val/tokens``),
every other field ``<f>`` as ``train/<f>`` (``train/loss``, ``train/tokens_per_s``, ...), in:

* TensorBoard: ``<out_dir>/tensorboard/events.out.tfevents.*`` via ``torch.utils.tensorboard.
  SummaryWriter`` (needs the ``tensorboard`` package; https://pytorch.org/docs/stable/tensorboard.html).
* W&B: ``wandb.init(project, name, dir=out_dir, config, mode=...)`` then ``run.log(scalars, step=step)``.
  ``wandb="auto"`` uses W&B when the package is importable and skips it cleanly otherwise; the mode is
  ``$WANDB_MODE`` when set, else ``wandb_mode`` (default ``"offline"``: files under ``<out_dir>/wandb``,
  upload later with ``wandb sync``). ``wandb=False`` or ``WANDB_MODE=disabled`` turns it off.

Progress: :meth:`RunLogger.progress` returns a :class:`Progress` (steps done/total, tokens/s, the moving
average step time over the last ``window`` logged intervals, ETA = remaining steps x that average) and
``log`` prints it as one line (``echo=True``). The step time of an interval is the wall-clock time
between two ``log`` calls divided by the steps between them (so it includes data loading, logging and
checkpointing, which is what the ETA must cover); ``rec["step_s"]`` is not used for the ETA.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG_PREFIX = "train/"
VAL_PREFIX = "val/"


def scalar_tag(key: str) -> str:
    """The TensorBoard / W&B tag of a metrics record's field: ``val_<x>`` -> ``val/<x>``, else ``train/<key>`` (the
    torchtitan job's records writer tags llmc's scalars the same way)."""
    return VAL_PREFIX + key[len("val_"):] if key.startswith("val_") else TAG_PREFIX + key


def format_duration(seconds: float | None) -> str:
    """``3725.2`` -> ``"1:02:05"``; days shown as ``"2d 03:04:05"``; unknown -> ``"?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}"


def start_wandb(lib: Any, mode: str, **kwargs: Any) -> Any:
    """``wandb.init(mode=mode, **kwargs)``, quiet (``wandb.Settings(quiet=True)``: W&B's banner, its hints and the
    run's summary table off the console; its files as they were), or None: a W&B that cannot start (online without an
    API key, an unreachable server after W&B's own ``init_timeout``, a bad setting) is one ``warning[R018]`` line on
    stderr and training goes on, logged offline where the failure was online, else without W&B: a logging backend
    never stops a run."""
    import sys

    def first_line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__

    try:
        return lib.init(mode=mode, settings=lib.Settings(quiet=True), **kwargs)
    except Exception as e:  # noqa: BLE001 (W&B's own errors: UsageError, CommError, ...)
        why = first_line(e)
    if mode != "offline":
        try:
            run = lib.init(mode="offline", settings=lib.Settings(quiet=True), **kwargs)
        except Exception as e:  # noqa: BLE001
            why += f"; offline too: {first_line(e)}"
        else:
            print(f"warning[R018] W&B did not start in {mode} mode ({why}): logging offline instead, under "
                  f"{kwargs.get('dir')}/wandb (`wandb sync` uploads it later)", file=sys.stderr, flush=True)
            return run
    print(f"warning[R018] W&B did not start ({why}): training goes on without it (metrics.jsonl and TensorBoard "
          "still log; WANDB_MODE=disabled turns W&B off without this line)", file=sys.stderr, flush=True)
    return None


#: The folders W&B writes its run files in, under the ``dir`` given to ``wandb.init`` (the stage's output folder):
#: W&B's own, with its own symbolic links (``latest-run`` to the newest ``offline-run-*`` / ``run-*`` folder,
#: ``debug.log`` / ``debug-internal.log`` to that run's logs), which llmc never writes through
#: (wandb/sdk/wandb_settings.py ``wandb_dir``: ``<dir>/wandb``, or ``<dir>/.wandb`` where that exists;
#: wandb/sdk/wandb_init.py ``_safe_symlink``).
WANDB_DIRS = ("wandb", ".wandb")


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    tokens_per_s: float | None  # tokens_per_step / avg_step_s when tokens_per_step is known, else the record's
    avg_step_s: float | None  # moving average over the last `window` intervals; None before two log calls
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def line(self) -> str:
        tps = f"  {self.tokens_per_s:,.0f} tok/s" if self.tokens_per_s else ""
        st = f"  {self.avg_step_s:.3f} s/step" if self.avg_step_s else ""
        return (f"[{self.step}/{self.total_steps} {self.fraction * 100:5.1f}%]{tps}{st}  "
                f"ETA {format_duration(self.eta_s)}")


def scalars_of(rec: Mapping[str, Any]) -> dict[str, float]:
    """The loggable scalars of a metrics record: its int/float fields as floats, except ``step`` and bools."""
    out = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[k] = float(v)
    return out


def _wait_for_a_later_event_file_name(tb_dir: Path) -> None:
    """TensorBoard reads a run's event files in file-name order, and purge_step only drops events
    written before the purging file. The name is ``events.out.tfevents.<unix second>.<host>.<pid>.<n>``,
    so two files opened in the same second (an in-process restart, a quick retry) sort by pid and
    counter as strings ("10" < "9"), which can put the resumed file first. Wait out the second of
    the newest existing file (at most about one second) so the new name sorts after it."""
    newest = -1
    for f in tb_dir.glob("events.out.tfevents.*"):
        part = f.name.split(".")[3] if f.name.count(".") >= 4 else ""
        if part.isdigit():
            newest = max(newest, int(part))
    while newest >= int(time.time()):
        time.sleep(max(0.01, newest + 1 - time.time()))


class RunLogger:
    """TensorBoard + W&B + progress/ETA for one stage; see the module docstring."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, tokens_per_step: int | None = None,
                 run_name: str | None = None, config: Mapping[str, Any] | None = None,
                 tensorboard: bool = True, wandb: bool | str = "auto", project: str = "llmc",
                 wandb_mode: str = "offline", metrics=None, enabled: bool = True, echo: bool = True,
                 window: int = 20, clock: Callable[[], float] = time.monotonic, purge_step: int | None = None):
        self.enabled, self.echo = enabled, echo
        self.out_dir = Path(out_dir)
        self.total_steps, self.tokens_per_step = int(total_steps), tokens_per_step
        self.metrics = metrics  # an llmc.runtime.metrics.MetricsLogger, or None
        self.clock = clock
        self._intervals: deque[float] = deque(maxlen=max(1, window))
        self._last: tuple[int, float] | None = None
        self._last_tps: float | None = None
        self.tb = None
        self.wandb_run = None
        self.wandb_skipped: str | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # raises if `tensorboard` is not installed

            # purge_step: a resumed run drops the events a killed run wrote at steps >= purge_step
            # (https://pytorch.org/docs/stable/tensorboard.html#torch.utils.tensorboard.writer.SummaryWriter)
            _wait_for_a_later_event_file_name(self.out_dir / "tensorboard")
            self.tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge_step)
            if config:
                self.tb.add_text("config", "```\n" + _pretty(config) + "\n```", 0)
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if wandb is False or mode == "disabled":
            self.wandb_skipped = "disabled"
        else:
            try:
                import wandb as wandb_lib
            except ImportError:
                if wandb is True:
                    raise
                self.wandb_skipped = "wandb is not installed"
            else:
                self.wandb_run = start_wandb(wandb_lib, mode, project=project, name=run_name, dir=str(self.out_dir),
                                             config=dict(config or {}))

    # -- progress ---------------------------------------------------------------------------------
    def _tick(self, step: int, rec: Mapping[str, Any]) -> None:
        now = self.clock()
        if self._last is not None and step > self._last[0]:
            self._intervals.append((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)
        if isinstance(rec.get("tokens_per_s"), int | float):
            self._last_tps = float(rec["tokens_per_s"])

    def progress(self) -> Progress:
        step = self._last[0] if self._last else 0
        avg = sum(self._intervals) / len(self._intervals) if self._intervals else None
        eta = (self.total_steps - step) * avg if avg is not None else None
        tps = self.tokens_per_step / avg if (avg and self.tokens_per_step) else self._last_tps
        return Progress(step, self.total_steps, tps, avg, eta)

    # -- logging ----------------------------------------------------------------------------------
    def log(self, rec: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self.metrics is not None:
            self.metrics.log(dict(rec))
        if "event" in rec or "step" not in rec:
            if self.echo and self.metrics is None:
                print({k: v for k, v in rec.items()}, flush=True)
            return
        step = int(rec["step"])
        self._tick(step, rec)
        scalars = scalars_of(rec)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(scalar_tag(k), v, global_step=step)
        if self.wandb_run is not None:
            # commit=False: a step's records (its training figures, then its validation) accumulate until a later
            # step's arrive (or finish); committing each record would move W&B past the step, and it ignores data
            # logged to an earlier step ("Tried to log to step N that is less than the current step N+1")
            self.wandb_run.log({scalar_tag(k): v for k, v in scalars.items()}, step=step, commit=False)
        if self.echo:
            loss = f"  loss {rec['loss']:.4f}" if isinstance(rec.get("loss"), int | float) else ""
            print(self.progress().line() + loss, flush=True)

    def event(self, event_name: str, /, **kw: Any) -> None:
        self.log({"event": event_name, **kw})

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stage_log(out_dir: str | Path, *, run_name: str, total_steps: int, metrics: Any, main: bool, echo: bool,
                   start: Mapping[str, Any], resumed_step: int | None = None, spec_sha256: str | None = None,
                   lock: Mapping[str, Any] | None = None, tokens_per_step: int | None = None) -> RunLogger:
    """A stage's :class:`RunLogger`, the one every llmc trainer opens (pre-training and continued training on the
    native and DeepSpeed trainers: ``llmc.runtime.train.open_run_logger``; the sft / dpo / grpo stages:
    ``llmc.runtime.posttrain.run_stage``): metrics.jsonl through ``metrics`` (a
    :class:`llmc.runtime.metrics.MetricsLogger`) + TensorBoard under ``<out_dir>/tensorboard`` (when the package is
    installed) + W&B (when installed and ``WANDB_MODE`` is not ``disabled``; offline by default) as run
    ``run_name``, with the lock's resolved spec as the run's config; rank 0 only (``main``). After a resume from
    ``resumed_step``, TensorBoard drops the events at later steps, as the trainer cuts metrics.jsonl back to that step
    (``llmc.runtime.metrics_io.truncate_after_step``): each step once in both. Its first record of this start is a
    ``start`` event: ``start``'s fields (the ``backend`` that trains, ...), then ``resumed_from``, the spec the steps
    from here train under (``spec_sha256``: a resume under another spec's lock then shows in the log itself) and the
    software that runs them (``llmc.runtime.software.runtime_versions``)."""
    import importlib.util

    config = (lock or {}).get("spec", {}).get("resolved") if lock else None
    log = RunLogger(out_dir, total_steps=total_steps, tokens_per_step=tokens_per_step, run_name=run_name,
                    config=config, tensorboard=importlib.util.find_spec("tensorboard") is not None, wandb="auto",
                    metrics=metrics, enabled=main, echo=echo,
                    purge_step=None if resumed_step is None else resumed_step + 1)
    if log.enabled:
        from llmc.runtime.software import runtime_versions

        log.event("start", **start, resumed_from=resumed_step, spec_sha256=spec_sha256, software=runtime_versions())
    return log


def _pretty(config: Mapping[str, Any]) -> str:
    import json

    return json.dumps(config, indent=2, sort_keys=True, default=str)
