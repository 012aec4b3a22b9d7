"""DeepSpeed 0.19.8 target: ``deepspeed/ds_config.json`` and ``deepspeed/launch.sh``.

Policy (documented choice): llmc's DeepSpeed runner (``llmc.runtime.ds_train``) is data-parallel +
ZeRO only. When the plan uses tp/pp/cp/ep > 1 the DeepSpeed artifacts are still emitted with every
GPU as a data-parallel rank (ZeRO-3 unless a stage is pinned) and a warning X103 says so; if the
global batch cannot be split over that many ranks, the DeepSpeed artifacts are left out with warning
X104 alone (which then says why the run would be data-parallel; X103 describes only artifacts that are written). A pinned pipeline (``parallelism.pp``) is folded too, with any pinned ZeRO stage: llmc never runs DeepSpeed's
pipeline engine (whose ZeRO-3 limit was the retired error X102), so ``zero_stage: 3`` with ``pp: 2`` is a ZeRO-3
data-parallel run over every GPU with warning X103. The folded run's layout and its memory are the compiler's
(``llmc.compiler.backends.deepspeed_run_plan``, sized once in ``Compiled.backend_runs``): X103 quotes that figure when
it does not fit, as ``llmc launch --backend deepspeed`` does (L015). An artifact that cannot be emitted never stops the build of the
planned backend: every error below is one the planned backend's own build has too (X108 / X110: offload, which only
the DeepSpeed backend plans, P017; X101 / X105: an inconsistent plan or an llmc bug).

Diagnostics:
    X101 error    DeepSpeed batch identity broken (micro x accum x dp != global batch)
    X103 warning  plan uses tp/pp/cp/ep; the DeepSpeed runner folds every GPU into data parallelism (deepspeed/ written)
    X104 warning  global batch not divisible by the DeepSpeed data-parallel size: deepspeed/ omitted (with the fold's
                  reason where the plan uses tp/pp/cp/ep; no X103 then)
    X105 error    ds_config top-level key outside the allow-list (an llmc bug, never a user error)
    X106 warning  fp8 training: the DeepSpeed runner trains in bf16
    X108 error    offload_optimizer with ZeRO stage 0
    X109 warning  a stage's global batch cannot be split over the DeepSpeed data-parallel ranks
    X110 error    offload_params with a ZeRO stage other than 3
    X115 warning  the run deepspeed/ starts (the plan's own layout, not folded) does not fit the GPU: the compiler's
                  figure (Compiled.backend_runs["deepspeed"]); a folded run's figure is in X103
    X116 warning  bf16 under ZeRO-0 on a GPU build with gradient accumulation or data parallelism: DeepSpeed sums
                  the micro-batch gradients in bf16 and keeps the fp32 all-reduce's result in bf16 (it refuses an
                  fp32 grad_accum_dtype without ZeRO; see GRAD_DTYPE_NOTE)

Per-stage configs: ``llmc.runtime.ds_train`` runs ``deepspeed/ds_config.<stage>.json`` for ``--stage S``
when it exists, else ``ds_config.json``, and refuses a config whose batch / lr / steps / precision are not
the stage's (``ds_train.check_config``). The build therefore writes ``ds_config.<stage>.json`` for every
DeepSpeed-trained stage whose config differs from ``ds_config.json`` (numbers from the stage's
``StagePlan``), so the committed file is exactly what runs.

``deepspeed/launch.sh`` runs the stages the DeepSpeed runner does not train (``DS_STAGE_KINDS``) on llmc's native
runtime on the same processes: ``torchrun --standalone`` on one node, and with a ``HOSTFILE`` the DeepSpeed
launcher's own multi-node start (``deepspeed --hostfile H --no_local_rank --module llmc.runtime.entry``: it sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT on every host as torchrun does,
deepspeed/launcher/launch.py), so no stage of a hostfile run is left on the launching node alone. Its storage is
launch/torchrun_multi_node.sh's: everything the run writes goes under ``LLMC_RUN_DIR`` (default: the build directory;
prepare's assets with ``--assets``), ``RUN_DIR`` defaults to ``$LLMC_RUN_DIR/run``, and with a HOSTFILE of more than
one host the DeepSpeed launcher first starts ``llmc.runtime.entry shared-check`` on each host (one process per host,
``launch/_shared_run.sh.j2``), so that ZeRO's per-rank checkpoint shards never spread over the hosts' local disks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmc.compiler.backends import (
    deepspeed_folds,
    deepspeed_run_plan,
    deepspeed_split,
    deepspeed_zero_stage,
    ds_fp32_grad_accum,
    ds_prefetch_bucket_elems,
    ds_reduce_bucket_elems,
)
from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic
from llmc.emit.base import Emitter
from llmc.emit.common import (
    RDZV_PORT,
    diag,
    dump_json,
    gpus_per_node,
    header_fields,
    header_lines,
    is_cpu,
    jinja_env,
    launcher_context,
    nnodes,
    stage_list,
    unfit_run_diagnostic,
    world,
)
from llmc.runtime.capabilities import DS_STAGE_KINDS
from llmc.runtime.runlock import EXIT_PREEMPTED  # torch-free
from llmc.spec.schema import BF16_PRECISIONS

# Top-level ds_config keys llmc may emit. DeepSpeed silently ignores unknown top-level keys (a typo
# such as "gradient_clipin" is accepted), so the emitter checks its own output against this list.
# Every entry except the header key is a key deepspeed/runtime/constants.py defines (tested).
DS_HEADER_KEY = "_llmc"
DS_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "steps_per_print",
    "wall_clock_breakdown",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
    "zero_optimization",
    "zero_allow_untested_optimizer",
    "communication_data_type",
    "data_types",
})
_ALLOWED = DS_TOP_LEVEL_KEYS | {DS_HEADER_KEY}

# ZeRO bucket sizes: the Hugging Face Trainer's DeepSpeed integration fills "auto" with
# reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2,
# stage3_param_persistence_threshold = 10 hidden (transformers/integrations/deepspeed.py).
ALLGATHER_BUCKET = 500_000_000  # DeepSpeed's default allgather_bucket_size (5e8 elements)
STAGE3_MAX_LIVE = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters / max_reuse_distance

CONFIG_PATH = "deepspeed/ds_config.json"
STAGE_CONFIG_PATH = "deepspeed/ds_config.{stage}.json"  # llmc.runtime.ds_train.stage_config_path


@dataclass(frozen=True)
class DsNumbers:
    """The training numbers one DeepSpeed config carries: the main run's (``Compiled.hyper``) or a stage's
    (``StagePlan``)."""

    lr: float
    min_lr_ratio: float
    steps: int
    warmup_steps: int
    schedule: str
    global_batch_seqs: int
    micro_batch: int  # upper bound for the micro-batch when tp/pp/cp/ep are folded into data parallelism


def _main_numbers(compiled, plan: ParallelPlan) -> DsNumbers:
    h = compiled.hyper
    return DsNumbers(lr=float(h.lr), min_lr_ratio=float(compiled.spec.training.schedule.min_lr_ratio),
                     steps=int(h.steps), warmup_steps=int(h.warmup_steps), schedule=str(h.schedule),
                     global_batch_seqs=int(h.global_batch_seqs), micro_batch=int(plan.micro_batch))


def _stage_numbers(compiled, plan: ParallelPlan, st) -> DsNumbers:
    """A stage's numbers; what the stage leaves unresolved (None) is the main run's."""
    main = _main_numbers(compiled, plan)
    gbs = int(st.global_batch_seqs) if st.global_batch_seqs else main.global_batch_seqs
    lr = float(st.lr)
    ratio = float(st.min_lr) / lr if lr else 0.0
    if math.isclose(ratio, main.min_lr_ratio, rel_tol=1e-9, abs_tol=1e-12):
        ratio = main.min_lr_ratio  # the same floor, written as the spec gives it
    return DsNumbers(lr=lr, min_lr_ratio=ratio,
                     steps=int(st.steps) if st.steps else main.steps, warmup_steps=int(st.warmup_steps),
                     schedule=str(st.schedule), global_batch_seqs=gbs,
                     micro_batch=int(st.micro_batch) if st.micro_batch else main.micro_batch)


def _ds_plan(compiled) -> ParallelPlan | None:
    """The plan DeepSpeed runs: the compiled plan, or -- for a pipeline without a pre-training plan
    (stages from a base model) -- every GPU a ZeRO data-parallel rank with micro-batch 1."""
    if compiled.plan is not None:
        return compiled.plan
    n, gbs = world(compiled), int(compiled.hyper.global_batch_seqs)
    if gbs % n:
        return None
    return ParallelPlan(dp_shard=n, micro_batch=1, grad_accum=gbs // n)


def zero_stage_for(compiled) -> int:
    """Pinned ``parallelism.zero_stage``; else the plan's when it was searched for DeepSpeed and runs as planned
    (data parallel only: its stage is the one sized and timed, e.g. ZeRO-3 for parameter offload on one GPU);
    else 3 when the plan shards (dp_shard > 1 or the DS runner folds tp/pp into data parallelism) or offloads the
    parameters, 2 for optimizer offload on replicas (ZeRO-Offload), 0 otherwise (pure replicas)."""
    return deepspeed_zero_stage(compiled.spec.parallelism, _ds_plan(compiled), searched=compiled.plan is not None,
                                backend=getattr(compiled.backend, "name", None))


def _x104(gbs: int, n: int, hint: str, why: str = "") -> Diagnostic:
    """X104; ``why``: what makes the DeepSpeed run data-parallel over every GPU (a plan with tp / pp / cp / ep, which
    X103 says when the artifacts are emitted: it is not, when they are not, so as not to describe a run there is
    none of)."""
    return diag("X104", "warning", "training.global_batch_tokens",
                f"{why}global batch of {gbs} sequences cannot be split over {n} data-parallel ranks; "
                "deepspeed/ artifacts are not emitted", hint)


def _pinning_checks(compiled, stage: int) -> list[Diagnostic]:
    par = compiled.spec.parallelism
    out: list[Diagnostic] = []
    if par.offload_optimizer and stage == 0:
        out.append(diag("X108", "error", "parallelism.offload_optimizer",
                        "offload_optimizer needs ZeRO stage >= 1 (zero_stage is 0)",
                        "pin zero_stage 1, 2 or 3, or drop offload_optimizer"))
    if par.offload_params and stage != 3:
        out.append(diag("X110", "error", "parallelism.offload_params",
                        f"offload_params needs ZeRO stage 3 (zero_stage is {stage}): only ZeRO-3 partitions the "
                        "parameters DeepSpeed's offload_param moves to the host",
                        "pin zero_stage 3, or drop offload_params"))
    return out


_split = deepspeed_split  # (micro, accum) of a batch over dp ranks: the compiler's, which sizes the run too


def _batch(compiled, plan: ParallelPlan, stage: int, diags: list[Diagnostic]) -> tuple[int, int, int] | None:
    """(micro, accum, dp) of the DeepSpeed run, or None (diagnostic appended) when there is none."""
    gbs = int(compiled.hyper.global_batch_seqs)
    if not deepspeed_folds(plan):
        micro, accum, dp = plan.micro_batch, plan.grad_accum, plan.dp
        if micro * accum * dp != gbs:
            diags.append(diag("X101", "error", "training.global_batch_tokens",
                              f"batch identity broken: micro_batch {micro} x grad_accum {accum} x dp {dp} = "
                              f"{micro * accum * dp} != global batch {gbs} sequences",
                              "pin parallelism.micro_batch to a divisor of the global batch per rank"))
            return None
        return micro, accum, dp
    dp = world(compiled)
    layout = (f"the plan uses tp={plan.tp} pp={plan.pp} cp={plan.cp} ep={plan.ep}; llmc's DeepSpeed runner is "
              "data-parallel/ZeRO only")
    if gbs % dp:  # no DeepSpeed run at all: X104 alone says why (X103 would describe artifacts that are not written)
        diags.append(_x104(gbs, dp, "use the torchtitan or native backend, or a global batch divisible by the GPU "
                           "count", why=f"{layout}, and the "))
        return None
    folded = deepspeed_run_plan(plan, dp, gbs, stage)  # (the compiler's: the run it sized, Compiled.backend_runs)
    split = (folded.micro_batch, folded.grad_accum)
    over = _fallback_memory(compiled, plan)
    diags.append(diag("X103", "warning", "parallelism",
                      f"{layout}, so deepspeed/ runs all {dp} GPUs as ZeRO-{stage} "
                      "data-parallel ranks (memory and speed differ from the plan)" + (over or ""),
                      "use the torchtitan backend for this layout"))
    return (*split, dp)


def _fallback_memory(compiled, plan: ParallelPlan) -> str | None:
    """X103's words when the data-parallel run deepspeed/ falls back to does not fit the GPU: its memory as the
    compiler sized it (``Compiled.backend_runs["deepspeed"]``, :func:`llmc.compiler.compile.backend_runs`: llmc's
    memory model, the DeepSpeed profile, for what llmc.runtime.ds_train runs: ZeRO over every GPU, the compiler's
    micro-batch, the plan's AC and loss slices, whole sequences: no TP / CP); None when it fits or there is no GPU to
    fit."""
    from llmc.compiler.units import gib

    run = compiled.backend_runs.get("deepspeed")
    if run is None or run.fits:
        return None
    return (f"; that run does not fit: it needs {gib(run.per_gpu_bytes)} per GPU, "
            f"{run.per_gpu_bytes / run.capacity_bytes:.1f}x the {gib(run.capacity_bytes)} GPU (llmc's memory model: "
            f"{run.plan.micro_batch} whole {int(compiled.hyper.seq_len):,}-token sequence(s) per micro-step, AC "
            f"{plan.ac_label}), so only the torchtitan job is runnable (`llmc plan --set training.backend=deepspeed` "
            "searches DeepSpeed's own layouts)")


def _stage_batch(st, nums: DsNumbers, dp: int) -> tuple[int, int] | None:
    """(micro, accum) of a stage on the main config's ``dp`` ranks: the stage's own split when it holds there,
    else the largest micro-batch <= the stage's dividing its batch per rank; None when dp does not divide it."""
    gbs = nums.global_batch_seqs
    if st.micro_batch and st.grad_accum and int(st.micro_batch) * int(st.grad_accum) * dp == gbs:
        return int(st.micro_batch), int(st.grad_accum)
    if gbs % dp:
        return None
    return _split(gbs, dp, nums.micro_batch)


def _zero_section(compiled, stage: int) -> dict[str, Any]:
    d = compiled.spec.model.d_model
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=ds_reduce_bucket_elems(d))
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ALLGATHER_BUCKET, reduce_scatter=True)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds_prefetch_bucket_elems(d), stage3_param_persistence_threshold=10 * d,
                    stage3_max_live_parameters=STAGE3_MAX_LIVE, stage3_max_reuse_distance=STAGE3_MAX_LIVE,
                    stage3_gather_16bit_weights_on_model_save=True)
    if compiled.spec.parallelism.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if compiled.spec.parallelism.offload_params and stage == 3:
        # ZeRO-Infinity on CPU: the parameter partitions live in pinned host memory (zero.Init allocates them there)
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


# why ds_config's optimizer has "torch_adam": true, said in the file itself (its "_llmc" header, which DeepSpeed never
# sees: llmc.runtime.ds_train drops it). torch_adam: "Use torch's implementation of adam instead of our fused adam
# implementation" (https://www.deepspeed.ai/docs/config-json/#optimizer-parameters); FusedAdam is a JIT-built op
# (deepspeed/ops/op_builder/fused_adam.py) unless DeepSpeed was installed with DS_BUILD_FUSED_ADAM=1
TORCH_ADAM_NOTE = ("optimizer.params.torch_adam: torch.optim.AdamW, not DeepSpeed's FusedAdam, which DeepSpeed "
                   "JIT-builds (ninja + the CUDA compiler) on every node the first time a run uses it")


# Gradient dtypes (DeepSpeed 0.19.8, https://github.com/deepspeedai/DeepSpeed/tree/v0.19.8/deepspeed/runtime). Without
# these keys a bf16 run reduces and accumulates gradients in bf16: engine.communication_data_type falls back to the
# model dtype when the config sets none (engine.py), and engine.get_data_types() makes grad_accum_dtype the model dtype
# unless data_types.grad_accum_dtype is set. llmc's other backends reduce in fp32 (FSDP2 reduce_dtype=float32,
# torchtitan mixed_precision_reduce="float32"), so for bf16 the config sets
#   communication_data_type "fp32": every stage casts what it reduces to fp32 first (engine.allreduce_bucket for ZeRO-0
#     and the engine's fallback all-reduce, stage_1_and_2.py gradient_reduction_w_predivide / allreduce_bucket for
#     ZeRO-1/2, stage3.py's reduce buckets, allocated in that dtype);
#   data_types.grad_accum_dtype "fp32" (ZeRO >= 1): ZeRO-1 then runs BF16_Optimizer (engine._do_optimizer_sanity_check:
#     bf16 + fp32 accumulation + stage 1 without offload), which sums each micro-batch's bf16 gradient into an fp32
#     buffer of the whole model (bf16_optimizer.py fp32_groups_gradients_flat) and all-reduces that; ZeRO-1 with
#     optimizer offload and ZeRO-2 accumulate into fp32 gradient partitions (stage_1_and_2.py
#     gradient_accumulation_dtype: grad_accum / averaged_gradients), ZeRO-3 into its fp32 grad_partitions_flat_buffer
#     (stage3.py).
# ZeRO-0 cannot: with bf16 and grad_accum_dtype fp32 and no ZeRO, engine._do_optimizer_sanity_check raises
# NotImplementedError("unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32"); its
# optimizer (FP16_UnfusedOptimizer, bf16) sums the micro-batches into the bf16 parameters' .grad and the fp32 all-reduce
# copies its result back into them. The build says so (X116) where that differs from one bf16 micro-batch gradient.
GRAD_DTYPE = "fp32"
GRAD_DTYPE_NOTE = ("ZeRO-0 keeps gradients in the bf16 parameters' .grad: DeepSpeed 0.19.8 refuses "
                   "data_types.grad_accum_dtype fp32 without ZeRO (engine._do_optimizer_sanity_check)")


def grad_dtype_keys(bf16: bool, zero: int) -> dict[str, Any]:
    """The ds_config keys that make DeepSpeed reduce (every stage) and accumulate (ZeRO >= 1) bf16 runs' gradients in
    fp32 (see above); none for fp32 runs, whose gradients are fp32 already."""
    if not bf16:
        return {}
    keys: dict[str, Any] = {"communication_data_type": GRAD_DTYPE}
    if ds_fp32_grad_accum(zero):
        keys["data_types"] = {"grad_accum_dtype": GRAD_DTYPE}
    return keys


def _optimizer_section(compiled, lr: float) -> dict[str, Any]:
    opt = compiled.spec.training.optimizer
    params: dict[str, Any] = {"lr": lr, "betas": list(opt.betas), "eps": opt.eps,
                              "weight_decay": opt.weight_decay}
    if not compiled.spec.parallelism.offload_optimizer:
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam: no JIT build. With optimizer offload we
        # keep DeepSpeedCPUAdam (the point of ZeRO-Offload; it JIT-builds cpu_adam once).
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _config(compiled, nums: DsNumbers, micro: int, accum: int, dp: int, zero: int) -> dict[str, Any]:
    spec = compiled.spec
    optimizer = _optimizer_section(compiled, nums.lr)
    head = header_fields(compiled)
    if optimizer["params"].get("torch_adam"):
        head["torch_adam"] = TORCH_ADAM_NOTE
    bf16 = spec.training.precision in BF16_PRECISIONS
    if bf16 and zero == 0:
        head["grad_dtype"] = GRAD_DTYPE_NOTE
    cfg: dict[str, Any] = {
        DS_HEADER_KEY: head,
        "train_batch_size": micro * accum * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(spec.training.grad_clip or 0.0),
        "bf16": {"enabled": bf16},
        **grad_dtype_keys(bf16, zero),
        "optimizer": optimizer,
        "zero_optimization": _zero_section(compiled, zero),
        "steps_per_print": int(spec.training.log_every),
        "wall_clock_breakdown": False,
    }
    # no "scheduler": DeepSpeed's WarmupLR / WarmupCosineLR start from LR 0 and step after the first update, two
    # steps behind llmc's warmup ((s + 1) / warmup at step s); ds_train runs llmc's own schedule (TrainJob.lr_factor,
    # the lock's numbers) as a client LambdaLR, the one schedule every backend trains
    return cfg


def deepspeed_config(compiled) -> tuple[dict | None, list[Diagnostic]]:
    """The ds_config for DeepSpeed 0.19.8 and the build diagnostics about it (X1xx).

    Returns (None, diags) when no DeepSpeed artifacts can be emitted for this plan.
    """
    spec, plan = compiled.spec, _ds_plan(compiled)
    if plan is None:
        return None, [_x104(compiled.hyper.global_batch_seqs, world(compiled),
                            "use the native backend, or a global batch divisible by the GPU count")]
    stage = zero_stage_for(compiled)
    diags = _pinning_checks(compiled, stage)
    batch = _batch(compiled, plan, stage, diags)
    if batch is None:
        return None, diags
    micro, accum, dp = batch
    if spec.training.precision == "fp8":
        diags.append(diag("X106", "warning", "training.precision",
                          "the DeepSpeed runner trains in bf16 (fp8 matmuls are torchtitan-only)"))
    if (spec.training.precision in BF16_PRECISIONS and stage == 0 and (accum > 1 or dp > 1)
            and not is_cpu(compiled)):  # (on the CPU the runner trains in fp32: llmc.runtime.ds_train)
        what = " and ".join(w for w in (f"sums the {accum} micro-batch gradients of a step in bf16" if accum > 1
                                         else "", "keeps the fp32 all-reduce's result in bf16" if dp > 1 else "") if w)
        diags.append(diag("X116", "warning", "parallelism.zero_stage",
                          f"ZeRO-0 with bf16: DeepSpeed {what}, where the "
                          "native and torchtitan backends reduce and accumulate gradients in fp32 (DeepSpeed 0.19.8 "
                          "refuses an fp32 grad_accum_dtype without ZeRO)",
                          "pin parallelism.zero_stage: 1 (DeepSpeed's BF16_Optimizer then accumulates and all-reduces "
                          "an fp32 gradient), or use the native backend"))
    cfg = _config(compiled, _main_numbers(compiled, plan), micro, accum, dp, stage)
    unknown = sorted(set(cfg) - _ALLOWED)
    if unknown:  # an llmc bug, not a user error; still reported as a diagnostic
        diags.append(diag("X105", "error", "", f"ds_config has keys DeepSpeed does not read: {unknown}"))
    gbs = int(compiled.hyper.global_batch_seqs)
    if cfg["train_batch_size"] != gbs:
        diags.append(diag("X101", "error", "training.global_batch_tokens",
                          f"ds_config train_batch_size {cfg['train_batch_size']} != global batch {gbs} sequences"))
    return cfg, diags


def stage_configs(compiled) -> tuple[dict[str, dict], list[Diagnostic]]:
    """``{stage name: ds_config}`` for every DeepSpeed-trained stage whose config differs from
    ``ds_config.json`` (lr, steps, warmup, schedule or batch of its ``StagePlan``), and the X109 warnings of
    stages whose batch cannot be split over the DeepSpeed ranks. Empty when there is no main config."""
    main, _ = deepspeed_config(compiled)
    if main is None:
        return {}, []
    plan = _ds_plan(compiled)
    dp = main["train_batch_size"] // (main["train_micro_batch_size_per_gpu"] * main["gradient_accumulation_steps"])
    zero = main["zero_optimization"]["stage"]
    names = {s.name: i for i, s in enumerate(compiled.spec.stages)}
    out: dict[str, dict] = {}
    diags: list[Diagnostic] = []
    for st in compiled.stages:
        if st.kind not in DS_STAGE_KINDS:
            continue
        nums = _stage_numbers(compiled, plan, st)
        split = _stage_batch(st, nums, dp)
        if split is None:
            where = f"stages[{names[st.name]}]" if st.name in names else "training.global_batch_tokens"
            diags.append(diag("X109", "warning", where,
                              f"stage {st.name!r}: global batch of {nums.global_batch_seqs} sequences cannot be split "
                              f"over {dp} DeepSpeed data-parallel ranks; the DeepSpeed runner refuses this stage",
                              "use the native backend for it, or a batch divisible by the GPU count"))
            continue
        cfg = _config(compiled, nums, *split, dp, zero)
        if cfg != main:
            cfg[DS_HEADER_KEY] = {**cfg[DS_HEADER_KEY], "stage": st.name}
            out[st.name] = cfg
    return out, diags


class DeepSpeedEmitter(Emitter):
    name = "deepspeed"

    def applies(self, compiled) -> bool:
        return any(s["ds"] for s in stage_list(compiled))

    def diagnostics(self, compiled) -> list[Diagnostic]:
        own = [s.name for s in compiled.stages if getattr(s, "layout", None) is not None]
        # the scripts run the stages in order under `set -e`: the first refused stage stops them (the stages after
        # it start from its output, so skipping it would not help)
        jobs = [diag("X113", "warning", "stages", f"stage(s) {', '.join(own)} are planned as their own torchtitan jobs "
                     "(their layouts): llmc's DeepSpeed and native runners refuse them at launch (error[R002]), so "
                     "deepspeed/launch.sh and native/launch.sh stop with that error at the first of them, and the "
                     "stages after it do not run", "launch with the torchtitan backend (the default of this "
                     "build's launchers)")] if own else []
        cfg, diags = deepspeed_config(compiled)
        # X115: the run deepspeed/ starts does not fit the GPU (the compiler's figure, Compiled.backend_runs); a folded
        # plan's X103 says it already
        unfit = unfit_run_diagnostic(compiled, "deepspeed")
        fit = [unfit] if unfit is not None and cfg is not None and not deepspeed_folds(compiled.plan) else []
        return diags + stage_configs(compiled)[1] + jobs + fit

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        cfg, _ = deepspeed_config(compiled)
        if cfg is None:
            return {}
        from llmc.emit import build_warnings
        from llmc.emit.evaluation import eval_stages

        stages = stage_list(compiled)
        # the header's warnings: those about what this script runs (this emitter's: X103, X106, X109, X113, X115); the
        # other artifacts' (X111 SkyPilot, X114 Kubeflow, the native run's X115, ...) are in README.md with every build
        # warning
        own = {(d.code, d.message) for d in self.diagnostics(compiled)}
        ctx = {"header": header_lines(compiled), "stages": stages,
               "ds_native_stages": [s for s in stages if not s["ds"]],
               # on CPU: the plan's world on one node (llmc.emit.launchers.procs_per_node)
               "gpus_per_node": world(compiled) if is_cpu(compiled) else gpus_per_node(compiled),
               "nnodes": 1 if is_cpu(compiled) else nnodes(compiled), "rdzv_port": RDZV_PORT,
               "zero_stage": cfg["zero_optimization"]["stage"],
               "warnings": [d.render() for d in build_warnings(compiled) if (d.code, d.message) in own],
               "eval_stages": eval_stages(compiled),
               "preempted_exit": EXIT_PREEMPTED, **launcher_context(compiled)}
        per_stage = {STAGE_CONFIG_PATH.format(stage=name): dump_json(c) for name, c in stage_configs(compiled)[0].items()}
        return {CONFIG_PATH: dump_json(cfg), **per_stage,
                "deepspeed/launch.sh": jinja_env().get_template("deepspeed/launch.sh.j2").render(**ctx)}
