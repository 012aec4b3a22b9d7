"""Size-aware training defaults for every ``None`` in the spec's training section.

Each function returns a value; :func:`resolve_hyper` assembles :class:`Hyper` and lists the fields
llmc chose in ``Hyper.defaults`` so the report can say "(default)". Sources are cited per rule;
the spec itself is never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmc.compiler import params
from llmc.compiler.checkpoint_cost import DCP_BYTES_PER_PARAM
from llmc.compiler.checks import min_batch_seqs
from llmc.compiler.hardware import GPU
from llmc.compiler.result import Hyper
from llmc.lr_schedule import lr_shape
from llmc.spec.schema import PREFERENCE_KINDS, Data, RunSpec, Training

# Pre-training peak LR: 3e-4 at ~1B, 1e-4 at ~70B, log-log interpolated (Llama 2 7B used 3e-4 and 70B
# 1.5e-4, Touvron et al. 2023 arXiv:2307.09288 Table 1; Llama 3 405B 8e-5, arXiv:2407.21783 §3.4.1).
LR_ANCHORS = ((1e9, 3e-4), (70e9, 1e-4))
LR_CLAMP = (6e-5, 6e-4)  # GPT-3's range over 125M..175B (Brown et al. 2020, Table 2.1)
WARMUP_FRACTION = 0.01  # 1 % of steps
WARMUP_CAP = 2000  # Llama 2 warmed up for 2000 steps; a cap keeps multi-million-step runs sane
# Step k (1-based) of an N-step warmup runs at k/N of peak (torchtitan's linear_warmup_stable_decay,
# llmc.lr_schedule), so a 1-step warmup is none: the default warms up at least 2 steps where 2 is at most
# 1/WARMUP_MAX_DIVISOR of the run (T002 calls a longer warmup long), so runs under 20 steps keep 1
MIN_WARMUP = 2
WARMUP_MAX_DIVISOR = 10  # a warmup over 1/10 of the steps is long (T002)
CHECKPOINT_SECONDS = 1800.0  # ~30 min of wall time between checkpoints
CHECKPOINT_CLAMP = (50, 1000)
ASYNC_CHECKPOINT_BYTES = 100e9  # async above 100 GB of state
CHECKPOINT_BYTES_PER_PARAM = DCP_BYTES_PER_PARAM  # fp32 weights + AdamW m and v (what torchtitan's DCP saves)
CPU_BATCH_SEQS = 8  # tiny CPU runs: a handful of sequences per step
STAGE_WARMUP_DIVISOR = WARMUP_MAX_DIVISOR  # continued / post-training stages: warmup at most 1/10 of the stage

# Peak LR anchors (params, lr) for the other stage kinds, log-log interpolated and flat outside.
STAGE_LR_POINTS: dict[str, list[tuple[float, float]]] = {
    # continued pre-training / context extension ~1e-5 for 70B (Llama 3 long-context and annealing
    # stages, arXiv:2407.21783 §3.4.2-3.4.3); a bit higher for small models
    "midtrain": [(1e9, 3e-5), (70e9, 1e-5)],
    "long_context": [(1e9, 3e-5), (70e9, 1e-5)],
    # SFT full fine-tune: 2e-5 for 7-70B (Llama 2-Chat SFT, arXiv:2307.09288 §3.1), 5e-5 at <= 1B,
    # 1e-5 at 400B (Llama 3 405B, arXiv:2407.21783 §4.1.3); the 80B anchor keeps 70.6B models at 2e-5
    "sft": [(1e9, 5e-5), (7e9, 2e-5), (80e9, 2e-5), (400e9, 1e-5)],
    # DPO: 1e-6 small, 5e-7 at 70B (Zephyr, Tunstall et al. 2023 arXiv:2310.16944 §4; Tulu 2 arXiv:2311.10702)
    "dpo": [(7e9, 1e-6), (70e9, 5e-7)],
    # GRPO: 1e-6 (DeepSeekMath, Shao et al. 2024 arXiv:2402.03300 §4.2)
    "grpo": [(1e9, 1e-6), (1e12, 1e-6)],
}
# LoRA adapters: 2e-4 for 7B/13B, 1e-4 for 33B/65B (QLoRA, Dettmers et al. 2023 arXiv:2305.14314 App. B.2)
LORA_LR_POINTS = [(13e9, 2e-4), (33e9, 1e-4)]


def _interp_log(n: float, points: list[tuple[float, float]]) -> float:
    """Piecewise log-log interpolation over model size, flat outside the anchors."""
    if n <= points[0][0]:
        return points[0][1]
    for (n0, v0), (n1, v1) in zip(points, points[1:], strict=False):
        if n <= n1:
            t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    return points[-1][1]


def default_lr(n_params: float, kind: str = "pretrain", lora: bool = False) -> float:
    """Size-aware default peak LR for a stage kind.

    pretrain: log-interpolate 3e-4 at 1B -> 1e-4 at 70B (extrapolated), clamped to [6e-5, 6e-4].
    Other kinds: :data:`STAGE_LR_POINTS`; with LoRA the QLoRA LRs, and for dpo/grpo 10x the full
    fine-tune LR (adapters start at B = 0, so the policy starts equal to the reference).
    """
    if lora:
        if kind in PREFERENCE_KINDS:
            return 10 * _interp_log(n_params, STAGE_LR_POINTS[kind])
        return _interp_log(n_params, LORA_LR_POINTS)
    if kind != "pretrain":
        return _interp_log(n_params, STAGE_LR_POINTS[kind])
    (n0, lr0), (n1, lr1) = LR_ANCHORS
    x = (math.log(max(n_params, 1.0)) - math.log(n0)) / (math.log(n1) - math.log(n0))
    lr = math.exp(math.log(lr0) + x * (math.log(lr1) - math.log(lr0)))
    return min(max(lr, LR_CLAMP[0]), LR_CLAMP[1])


def default_batch_tokens(params_active: float) -> float:
    """Target tokens per optimizer step by model size (2M-16M tokens for LLM pre-training).

    <1B: 0.5M (GPT-3 Small..XL used 0.5M-1M); 1-3B: 2M; 3-10B: 4M (Llama 2 7B, Llama 3 8B);
    10-100B: 8M; >=100B: 16M (Llama 3 405B's final batch).
    """
    if params_active < 1e9:
        return 0.5e6
    if params_active < 3e9:
        return 2e6
    if params_active < 10e9:
        return 4e6
    if params_active < 100e9:
        return 8e6
    return 16e6


def default_batch_seqs(params_active: float, seq_len: int, world: int, is_cpu: bool) -> int:
    """Global batch in sequences: the size target rounded to a power of two times the world's odd factor.

    Rounding that way keeps ``global_batch_seqs % dp == 0`` for the usual power-of-two TP/PP
    degrees, so the batch identity (micro_batch x grad_accum x dp) has integral solutions.
    """
    if is_cpu:
        return max(CPU_BATCH_SEQS, world)
    odd = world
    while odd % 2 == 0:
        odd //= 2
    target = default_batch_tokens(params_active) / seq_len / odd
    pow2 = 2 ** max(0, round(math.log2(max(target, 1.0))))
    return max(pow2 * odd, 1)


def default_steps(data_tokens: float, batch_tokens: int) -> int:
    """Optimizer steps to see ``data_tokens``: tokens / batch, rounded up."""
    return max(1, math.ceil(data_tokens / batch_tokens))


def min_warmup(steps: int) -> int:
    """The fewest warmup steps llmc derives for a ``steps``-step run (or stage): 2 (the least that warms up: a
    1-step warmup runs step 1 at peak) where 2 is at most a tenth of the steps, else 1 (0 for a single step)."""
    if steps <= 1:
        return 0
    return MIN_WARMUP if MIN_WARMUP * WARMUP_MAX_DIVISOR <= steps else 1


def default_warmup(steps: int) -> int:
    """1 % of steps, at most 2000, at least :func:`min_warmup` (2 from 20 steps on, 1 below, 0 for one step)."""
    if steps <= 1:
        return 0
    return max(min_warmup(steps), min(WARMUP_CAP, round(WARMUP_FRACTION * steps)))


def default_checkpoint_interval(step_seconds: float | None, steps: int) -> int:
    """About 30 minutes of predicted wall time, clamped to [50, 1000] steps and to the run length."""
    if step_seconds is None or step_seconds <= 0:
        interval = CHECKPOINT_CLAMP[1]
    else:
        interval = round(CHECKPOINT_SECONDS / step_seconds)
        interval = min(max(interval, CHECKPOINT_CLAMP[0]), CHECKPOINT_CLAMP[1])
    return max(1, min(interval, steps))


def default_async_checkpoint(params_total: float) -> bool:
    return params_total * CHECKPOINT_BYTES_PER_PARAM > ASYNC_CHECKPOINT_BYTES


def resolve_hyper(training, seq_len: int, data_tokens: float, global_batch_seqs: int, batch_is_default: bool,
                  params_active: float, params_total: float, step_seconds: float | None) -> Hyper:
    """Fill every ``None`` of ``training`` (a ``spec.schema.Training``); ``defaults`` names what llmc chose."""
    chosen: list[str] = []
    if batch_is_default:
        chosen.append("global_batch_tokens")
    batch_tokens = global_batch_seqs * seq_len
    if training.steps is not None:
        steps = training.steps
    else:
        steps = default_steps(data_tokens, batch_tokens)
        chosen.append("steps")
    if training.optimizer.lr is not None:
        lr = training.optimizer.lr
    else:
        lr = default_lr(params_active)
        chosen.append("lr")
    sched = training.schedule
    if sched.warmup_steps is not None:
        warmup = sched.warmup_steps
    else:
        warmup = default_warmup(steps)
        chosen.append("warmup_steps")
    if "min_lr_ratio" not in sched.model_fields_set:
        chosen.append("min_lr")
    ck = training.checkpoint
    if ck.interval_steps is not None:
        interval = ck.interval_steps
    else:
        interval = default_checkpoint_interval(step_seconds, steps)
        chosen.append("checkpoint_interval")
    if ck.async_mode is not None:
        is_async = ck.async_mode
    else:
        is_async = default_async_checkpoint(params_total)
        chosen.append("checkpoint_async")
    shape = lr_shape(lr=lr, min_lr=lr * sched.min_lr_ratio, steps=steps, warmup_steps=warmup, schedule=sched.kind,
                     decay_fraction=sched.decay_fraction)
    return Hyper(
        lr=lr, min_lr=lr * sched.min_lr_ratio, warmup_steps=warmup, steps=steps,
        global_batch_tokens=batch_tokens, global_batch_seqs=global_batch_seqs, seq_len=seq_len,
        schedule=sched.kind, checkpoint_interval=interval, checkpoint_async=is_async, defaults=chosen,
        decay_steps=shape.decay_steps, last_lr=shape.last_lr,
    )



@dataclass(frozen=True)
class StageSchedule:
    """The LR schedule a stage runs with."""

    schedule: str
    warmup_steps: int
    min_lr: float
    decay_fraction: float
    decay_steps: int | None  # (llmc.lr_schedule.lr_shape; None: the stage has no steps)
    last_lr: float | None


def stage_schedule(kind: str, lr: float, steps: int | None, hyper: Hyper, schedule) -> StageSchedule:
    """The LR schedule of a stage: the run's schedule kind, min-LR ratio and decay fraction (``schedule``,
    a ``spec.schema.Schedule``); pretrain keeps the run's warmup, other kinds at most 10 % of their steps. A warmup
    llmc derived is at least 2 steps where 2 is within that tenth (:data:`MIN_WARMUP`): the run's, derived from the
    run's steps, would give a long stage after a run of under 20 steps a 1-step warmup, which is none; a pinned
    one is kept."""
    if kind == "pretrain":
        warmup = hyper.warmup_steps
    else:
        warmup = min(hyper.warmup_steps, (steps or 0) // STAGE_WARMUP_DIVISOR)
        if "warmup_steps" in hyper.defaults and warmup < MIN_WARMUP <= (steps or 0) // STAGE_WARMUP_DIVISOR:
            warmup = MIN_WARMUP
    shape = lr_shape(lr=lr, min_lr=lr * schedule.min_lr_ratio, steps=steps, warmup_steps=warmup,
                     schedule=schedule.kind, decay_fraction=schedule.decay_fraction) if steps else None
    return StageSchedule(schedule=schedule.kind, warmup_steps=warmup, min_lr=lr * schedule.min_lr_ratio,
                         decay_fraction=schedule.decay_fraction, decay_steps=shape and shape.decay_steps,
                         last_lr=shape and shape.last_lr)


# ----------------------------------------------------------------------------- the pre-training run


def pretrain_inputs(run: RunSpec) -> tuple[Data, Training]:
    """The data and training settings of the pre-training run: the top level, with a ``pretrain`` stage's
    own data / seq_len / batch / steps / lr in their place when it sets them (so the search, ``hyper`` and
    the stage plan all use one set of numbers)."""
    st = next((s for s in run.stages if s.kind == "pretrain"), None)
    data, training = run.data, run.training
    if st is None:
        return data, training
    if st.data is not None:
        data = st.data
    if st.seq_len is not None:
        data = data.model_copy(update={"seq_len": st.seq_len})
    upd: dict = {}
    if st.steps is not None:
        upd["steps"] = st.steps
    if st.global_batch_tokens is not None:
        upd["global_batch_tokens"] = st.global_batch_tokens
    if st.lr is not None:
        upd["optimizer"] = training.optimizer.model_copy(update={"lr": st.lr})
    return data, training.model_copy(update=upd) if upd else training


def pretrain_paths(run: RunSpec) -> tuple[str, str]:
    """Where the spec sets what :func:`pretrain_inputs` returns, for diagnostics: (the data's path, the steps'),
    ``("data", "training.steps")`` or a ``pretrain`` stage's ``stages.N.data`` / ``stages.N.steps`` where it sets
    its own."""
    i = next((i for i, s in enumerate(run.stages) if s.kind == "pretrain"), None)
    if i is None:
        return "data", "training.steps"
    st = run.stages[i]
    return (f"stages.{i}.data" if st.data is not None else "data",
            f"stages.{i}.steps" if st.steps is not None else "training.steps")


def pretrain_batch_seqs(run: RunSpec, gpu: GPU | None, seq_len: int, training: Training) -> tuple[int, bool]:
    """(global batch in sequences, whether llmc chose it): explicit, or the size-aware default rounded up
    so every data-parallel rank of the widest layout gets a sequence."""
    gbt = training.global_batch_tokens
    if gbt is not None:
        return max(1, round(gbt / seq_len)), False
    world = run.hardware.count
    is_cpu = gpu is not None and gpu.key == "cpu"
    seqs = default_batch_seqs(params.params_active(run.model), seq_len, world, is_cpu)
    if gpu is not None:
        q = min_batch_seqs(run.model, world, gpu.gpus_per_node)
        seqs = -(-seqs // q) * q
    return seqs, True


def pretrain_hyper(run: RunSpec, gpu: GPU | None, step_seconds: float | None = None) -> Hyper:
    """The resolved pre-training hyperparameters (``Compiled.hyper``)."""
    data, training = pretrain_inputs(run)
    seqs, is_default = pretrain_batch_seqs(run, gpu, data.seq_len, training)
    return resolve_hyper(training, data.seq_len, data.tokens, seqs, is_default,
                                  params.params_active(run.model), params.params_total(run.model), step_seconds)
