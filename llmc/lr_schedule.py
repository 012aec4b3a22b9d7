"""The learning-rate schedule as a pure function of the optimizer step: the one formula of every backend.

It is torchtitan 0.3.0's ``linear_warmup_stable_decay`` (``LRSchedulersContainer`` in
torchtitan/components/optimizer/lr_scheduler.py of the 0.3.0 release, https://github.com/pytorch/torchtitan), which
the torchtitan job runs with the settings ``llmc.emit.torchtitan`` gives it; llmc's native and DeepSpeed runners and
its post-training loops apply :func:`lr_factor` (``llmc.runtime.job.TrainJob.lr_factor``), and the plan quotes the
last step's LR from it (:func:`lr_shape`). Pure and torch-free, outside ``llmc.compiler`` and ``llmc.runtime`` (as
:mod:`llmc.rope`): the runtime's training loops import no compiler module (tests/test_runtime_perf_paths.py). What it
implies, and the plan says:

- warmup: optimizer step k (1-based) of an N-step warmup runs at k/N of peak, so N = 1 is no warmup (step 1 already
  runs at peak);
- decay: it runs to ``min_lr`` at a virtual step one past the last ("Add a virtual last step to prevent the learning
  rate from dropping to 0", torchtitan), so the last step's LR is above ``min_lr``: min_lr is approached, never used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: the wsd cooldown's shape: 1 - sqrt(progress), which beats a linear cooldown (Hägele et al. 2024, "Scaling Laws and
#: Compute-Optimal Training Beyond Fixed Training Durations", arXiv:2405.18392, sec. 3); torchtitan's ``decay_type:
#: sqrt``, which the torchtitan job is given
WSD_COOLDOWN = "1-sqrt"
WSD_COOLDOWN_SOURCE = "Hägele et al. 2024, arXiv:2405.18392"
SCHEDULES = ("cosine", "wsd", "linear", "constant")  # spec.schema.Schedule.kind


def _spans(steps: int, warmup_steps: int, schedule: str, decay_fraction: float) -> tuple[int, int]:
    """(warmup steps, decay steps) as torchtitan's ``LRSchedulersContainer.Config.build`` clips them: the warmup at
    most the run; the decay the last ``round(steps x decay_fraction)`` steps (wsd), else every step after the warmup,
    and at most the steps after the warmup."""
    warmup = min(warmup_steps, steps)
    decay = steps - warmup
    if schedule == "wsd":
        decay = min(round(steps * decay_fraction), decay)
    return warmup, decay


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str, min_ratio: float,
              decay_fraction: float = 0.2) -> float:
    """LR / peak LR for optimizer step ``step`` (0-based) of a ``steps``-step run; the one schedule of every runtime
    loop and of the plan's numbers.

    Linear warmup over ``warmup_steps`` (step s uses (s+1)/warmup), then a stable phase (1) up to the decay, which
    runs over the decay steps D to a virtual step one past the last, so step s of the decay uses progress
    q = (s + 1 - start) / D with start = steps + 1 - D (torchtitan's warmup + stable steps) and never reaches q = 1:
    cosine: min + (1-min) * (1 + cos(pi q)) / 2 (D = every post-warmup step);  linear: min + (1-min)(1-q);
    wsd: 1 until the last ``decay_fraction`` of steps (Hu et al. 2024, "MiniCPM", arXiv:2404.06395, sec. 4), then
    1-sqrt to min: min + (1-min)(1 - sqrt(q)) (:data:`WSD_COOLDOWN`); constant: 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}")
    warmup, decay = _spans(steps, warmup_steps, schedule, decay_fraction)
    if step < warmup:
        return (step + 1) / warmup
    start = steps + 1 - decay
    if schedule == "constant" or decay <= 0 or step < start:
        return 1.0
    q = min(1.0, (step + 1 - start) / decay)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * q))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - q)
    return min_ratio + (1 - min_ratio) * (1 - math.sqrt(q))  # wsd


@dataclass(frozen=True)
class LRShape:
    """What a schedule does over its run, for the plan to say (:func:`lr_shape`)."""

    warmup_steps: int  # as the schedule applies it (at most the run)
    decay_steps: int  # steps of the decay (wsd: its cooldown); 0 for a constant schedule
    last_lr: float  # the LR of the run's last optimizer step: above min_lr (reached one step after the last)


def lr_shape(*, lr: float, min_lr: float, steps: int, warmup_steps: int, schedule: str,
             decay_fraction: float) -> LRShape:
    """The warmup and decay spans and the last step's LR of a schedule (:func:`lr_factor` at step ``steps - 1``)."""
    warmup, decay = _spans(steps, warmup_steps, schedule, decay_fraction)
    last = lr * lr_factor(max(steps, 1) - 1, steps=steps, warmup_steps=warmup_steps, schedule=schedule,
                          min_ratio=min_lr / lr if lr else 0.0, decay_fraction=decay_fraction)
    return LRShape(warmup_steps=warmup, decay_steps=0 if schedule == "constant" else decay, last_lr=last)
