"""The native trainer: one readable loop for pretrain / midtrain / long_context stages.

``train(job, out_dir, assets)`` runs on 1 process or under torchrun (DDP / FSDP2 / TP per the plan):

    data (packed, DP-sharded) -> model (seeded init | init_from) -> parallelize -> AdamW + LR schedule
    -> resume from the newest verified checkpoint (refused, one line, when another stage wrote it or it holds
       another model's tensor shapes) -> loop:
         grad_accum x (forward [bf16 autocast on CUDA] -> mean token loss (in the plan's slices) + z-loss + MoE aux
                       -> backward)   [logged: the cross-entropy as loss, the other two as z_loss / aux_loss]
         -> clip -> finite check (every step: loss and grad norm, all ranks agreeing) -> step -> log
         -> loss-spike check (rewind + skip) -> checkpoint (its weights checked finite first)
    -> final checkpoint + DONE.json
    (a non-finite loss or grad norm without loss_spike, or non-finite weights before a save: the step is not taken
     or saved, one error[R014] line, status "failed", exit 1: :func:`nonfinite_line`)
    (SIGTERM / SIGUSR1 on any rank: checkpoint of the current step, status "preempted": llmc.runtime.preempt)

Outputs in ``out_dir``: ``metrics.jsonl``, ``checkpoints/step-N/``, ``hf/`` (Hugging Face export of the
final weights, for the serving configs) and ``DONE.json``.

Not handled here (by design): pp / cp / ep > 1 (refused with a one-line error: use torchtitan),
fp8 (run as bf16), offload_optimizer (ds_train). The plan's zero_stage sets FSDP2's resharding
(``TrainJob.zero_stage``). The whole model is initialised on every rank before sharding unless ``job.meta_init`` (auto above 2B parameters with FSDP2/TP), so small-model layouts start bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from llmc.runtime.capabilities import NATIVE_UNSUPPORTED
from llmc.runtime.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_model_state,
    save_checkpoint,
    wait_for_checkpoint,
)
from llmc.runtime.data import Assets, StreamLoader, build_stream_loader
from llmc.runtime.distributed import DistInfo, dp_coords, init_distributed, parallelize, wants_compile
from llmc.runtime.errors import TrainingError  # noqa: F401  (re-exported: defined without torch)
from llmc.runtime.hf_io import (
    export_stage,
    init_hf_source,
    load_hf_into,
    load_init_from,
    loaded_from,
    start_arch,
    trained_record,
)
from llmc.runtime.job import TrainJob
from llmc.runtime.metrics import IntervalTimer, MetricsLogger, step_record
from llmc.runtime.metrics_io import truncate_after_step
from llmc.runtime.model import Transformer, build_model, loss_terms, param_groups
from llmc.runtime.observe import RunLogger, open_stage_log
from llmc.runtime.preempt import handlers as _preempt_handlers
from llmc.runtime.preempt import stop_now as _stop_now
from llmc.runtime.preempt import world as _world
from llmc.spec.schema import BF16_PRECISIONS, META_INIT_PARAMS, ac_label

# ----------------------------------------------------------------------------- schedule


def build_optimizer(model: torch.nn.Module, job: TrainJob, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the parameters the lock's rule decays (``job.no_decay``, spec
    ``training.optimizer.no_decay``; by default not on norms, biases, the expert bias or the token embeddings:
    :func:`llmc.runtime.model.param_groups`, the rule DeepSpeed, the post-training stages and the torchtitan job use
    too).

    CUDA: the fused kernel; CPU: the foreach (multi-tensor) implementation. Both need all parameters to be
    of one kind (all plain or all DTensor); a mix (TP without FSDP) falls back to the for-loop.
    """
    groups = param_groups(model, job.weight_decay, job.no_decay)
    from torch.distributed.tensor import DTensor

    kinds = {isinstance(p, DTensor) for g in groups for p in g["params"]}
    # foreach needs one tensor kind per call: TP alone leaves embeddings/norms plain next to DTensor weights
    kw = {"foreach": len(kinds) == 1}
    if device.type == "cuda" and len(kinds) == 1:
        kw = {"fused": True}
    return torch.optim.AdamW(groups, lr=job.lr, betas=tuple(job.betas), eps=job.eps, **kw)


# ----------------------------------------------------------------------------- distributed helpers


def step_stats(loss: torch.Tensor, norm: torch.Tensor) -> tuple:
    """(the step's loss averaged over the ranks, this rank's grad norm, whether the loss and the norm are finite on
    every rank): one all-reduce of three numbers and one host sync, so that every rank reaches the same verdict.
    ``loss`` may be 1-d, the loss's terms (:func:`step_terms`: cross-entropy, MoE aux, z-loss): then each is
    averaged, the first element is their list, and every term must be finite.

    The loss is each rank's own (its micro-batches'): their sum is non-finite when any rank's is (NaN + x = NaN,
    inf + finite = inf). The norm is global already (:func:`clip_grad_norm` all-reduces the DTensor shards'; DDP
    all-reduces the gradients), but a count of the ranks whose norm is non-finite is summed too: a rank-local NaN
    stops every rank at this step instead of leaving the others in the next collective."""
    parts = loss.detach().float().reshape(-1)
    n = parts.numel()
    norm = norm.detach().float().reshape(1).to(parts.device)
    local = torch.cat([parts, norm, (~torch.isfinite(norm)).float()])
    total = local.clone()
    if _world() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    out = torch.cat([total[:n] / _world(), local[n:n + 1], total[n + 1:]]).tolist()
    means, own_norm, bad_norms = out[:n], out[n], out[n + 1]
    finite = all(math.isfinite(v) for v in means) and bad_norms == 0
    return (means if loss.dim() else means[0]), own_norm, finite


def step_terms(parts: list[float], z_loss: float, moe_aux: bool) -> dict[str, float]:
    """The objective's terms besides the cross-entropy, as logged (``parts``: step_stats' means of the cross-entropy,
    the MoE aux loss, the z-loss term): ``aux_loss`` on a model with a load-balancing loss, ``z_loss`` when the
    spec's z-loss is on."""
    return {**({"aux_loss": parts[1]} if moe_aux else {}), **({"z_loss": parts[2]} if z_loss > 0 else {})}


def has_aux_loss(arch) -> bool:
    """Whether the model's objective has the MoE load-balancing term (:class:`llmc.runtime.model.MoE`: aux_coef > 0)."""
    return arch.moe is not None and arch.moe.aux_loss_coef > 0


@torch.no_grad()
def weights_finite(params: list[torch.Tensor], device: torch.device | None = None) -> bool:
    """Collective: whether every rank's parameters (its local shards of DTensors) are all finite; one pass over
    the weights (``torch._foreach_norm``: the norm of a tensor with a NaN or an infinity is not finite) and one
    all-reduce (on ``device``: the collectives' device, default the first weight's; offloaded weights sit on the
    CPU). Run before a checkpoint is written, so that none holds a non-finite weight: a finite loss and grad
    norm at a step do not rule out an update that overflows (e.g. AdamW's decoupled decay, w *= 1 - lr x wd, with
    lr x wd > 2 grows |w| every step)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    local = [t for t in local if t.numel()]
    device = device or (local[0].device if local else torch.device("cpu"))
    bad = torch.zeros((), device=device)
    for dev in {t.device for t in local}:  # (foreach kernels take the tensors of one device)
        same = [t for t in local if t.device == dev]
        bad += (~torch.isfinite(torch.stack(torch._foreach_norm(same, 2.0)).float())).sum().float().to(device)
    if _world() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.SUM)
    return float(bad) == 0


PRETRAIN_NONFINITE_HINT = "lower training.optimizer.lr, enable training.loss_spike to rewind past such a step"


def nonfinite_reason(step: int, what: str, loss: float | None, norm: float | None, last_checkpoint: str | None,
                     taken: bool = False, hint: str = PRETRAIN_NONFINITE_HINT) -> str:
    """What an error[R014] line says after ``<stage>:`` (every trainer's: native, DeepSpeed, sft / dpo / grpo).
    ``taken``: the optimizer step was applied (the weights it made are what is not finite), and is not saved."""
    figures = ", ".join(f"{k} {v:.6g}" for k, v in (("loss", loss), ("grad norm", norm)) if v is not None)
    kept = (f"the newest checkpoint, {last_checkpoint}, holds finite weights" if last_checkpoint
            else "no checkpoint was saved before it")
    done = "was not saved" if taken else "was not taken, nothing of it saved"
    return (f"{what} at step {step}{f' ({figures})' if figures else ''}; the run stops (the step {done}); {kept}; "
            f"{hint}, or check the data the run reads at step {step}")


def nonfinite_line(where: str, stage: str, step: int, what: str, loss: float | None, norm: float | None,
                   last_checkpoint: str | None, taken: bool = False) -> str:
    """The one error[R014] line of a pre-training run stopped at a non-finite step (:func:`nonfinite_reason`)."""
    return f"{where}: error[R014] {stage}: " + nonfinite_reason(step, what, loss, norm, last_checkpoint, taken)


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 grad norm over plain tensors and DTensors (FSDP/TP shards), then clip in place.

    Returns the norm as a 0-d fp32 tensor on the grads' device, computed without a host sync: per-tensor
    norms with ``torch._foreach_norm`` (one multi-tensor kernel), DTensor grads reduced with one
    all-reduce per (mesh, sharded dims) group (the local sum of squares summed over the mesh dims where it
    is sharded; replicated dims would double count), and clipping by ``min(1, max_norm / (norm + 1e-6))``
    as ``torch.nn.utils.clip_grad_norm_`` (its ``foreach`` path), which cannot mix DTensor and plain grads.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    plain = [g for g in grads if not isinstance(g, DTensor)]
    groups: dict[tuple, list[torch.Tensor]] = {}
    meshes = {}
    for g in grads:
        if isinstance(g, DTensor):
            dims = tuple(d for d, pl in enumerate(g.placements) if not pl.is_replicate())  # Shard, _StridedShard
            key = (id(g.device_mesh), dims)
            meshes[key] = g.device_mesh
            groups.setdefault(key, []).append(g.to_local())
    locals_ = plain + [t for ts in groups.values() for t in ts]
    device = locals_[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    if plain:
        total += torch.stack(torch._foreach_norm(plain, 2.0)).float().pow(2).sum()
    for key, ts in groups.items():
        sq = torch.stack(torch._foreach_norm(ts, 2.0)).float().pow(2).sum()
        for dim in key[1]:
            dist.all_reduce(sq, group=meshes[key].get_group(dim))
        total += sq
    norm = total.sqrt()
    if max_norm is not None:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(locals_, coef)
    return norm


def _update_expert_bias(model: Transformer) -> None:
    for blk in model.layers.values():
        moe = getattr(blk, "moe", None)
        if moe is not None and moe.expert_bias is not None:
            if _world() > 1:
                dist.all_reduce(moe.tokens_per_expert)
            moe.update_expert_bias()


# ----------------------------------------------------------------------------- the loop


def trains_bf16(job: TrainJob, device: torch.device, cpu_bf16: bool) -> bool:
    """bf16 autocast for precision bf16 (and fp8 / nvfp4, which the native trainer runs as bf16) on CUDA; on CPU
    only when asked (``--cpu-bf16``), else fp32."""
    return job.precision in BF16_PRECISIONS and (device.type == "cuda" or cpu_bf16)


def precision_note(spec_precision: str, runs: str, cpu: bool) -> str:
    """The start line's words for the precision that trains (``runs``), and the spec's where it differs. On the CPU
    both llmc runners train a bf16 spec in fp32 unless ``--cpu-bf16`` (the native trainer's autocast is CUDA-only,
    :func:`trains_bf16`; the DeepSpeed runner turns the config's bf16 off, llmc.runtime.ds_train.runtime_config), so
    that CPU runs of one spec are comparable across backends."""
    if runs == spec_precision:
        return f"precision {runs}"
    if cpu and runs == "fp32":
        return (f"precision fp32 (the spec's {spec_precision} trains in fp32 on the CPU, on the native and DeepSpeed "
                "runners alike; --cpu-bf16 for bf16)")
    return f"precision {runs} (the spec's {spec_precision} trains as {runs} on this runner)"


def _autocast(job: TrainJob, device: torch.device, cpu_bf16: bool):
    """bf16 autocast where :func:`trains_bf16`, else none (fp32)."""
    if trains_bf16(job, device, cpu_bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_layout(job: TrainJob, info: DistInfo) -> None:
    unsupported = {k: getattr(job, k) for k in NATIVE_UNSUPPORTED if getattr(job, k) != 1}
    if unsupported:
        raise TrainingError(f"native trainer runs dp_replicate/dp_shard/tp only; plan has "
                            f"{', '.join(f'{k}={v}' for k, v in unsupported.items())} (use the torchtitan backend)")
    if job.dp_replicate * job.dp_shard * job.tp != info.world:
        raise TrainingError(f"plan needs {job.dp_replicate * job.dp_shard * job.tp} processes "
                            f"(dp_replicate={job.dp_replicate} x dp_shard={job.dp_shard} x tp={job.tp}) "
                            f"but WORLD_SIZE={info.world}")


def make_loader(job: TrainJob, assets: Assets, info: DistInfo) -> StreamLoader:
    """The sources streamed in place, tokenised on the fly, this data-parallel rank's share of every step
    (:class:`llmc.runtime.data.StreamLoader`: one stream per sequence of the global batch)."""
    tok = assets.tokenizer()
    if tok.vocab_size > job.arch.vocab_size:
        raise TrainingError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{job.arch.vocab_size}")
    dp_rank, dp_size = dp_coords(info, job.dp_replicate, job.dp_shard, job.tp)
    return build_stream_loader(list(assets.sources), tok, job.seq_len, job.global_batch_seqs, job.seed,
                               dp_rank, dp_size)


def _export_hf(job: TrainJob, ckpt: Path, out: Path, assets: Assets, say, step: int) -> str | None:
    """Write ``out/hf`` (Hugging Face format, bf16) from the final checkpoint (of step ``step``) for the serving
    configs."""
    sd = read_model_state(ckpt)
    res = export_stage(job, out, out / "hf", tokenizer_dir=assets.tokenizer_dir, model_sd=sd,
                       record=trained_record(job, step))
    if res.get("hf") is None:
        say(f"warning[X130]: {res.get('line') or res['why']}")
        return None
    return "hf"


def _setup_model(job: TrainJob, info: DistInfo, init_checkpoint: str | Path | None, hf_src: str | None, say,
                 adapt=None, build_device: str | torch.device | None = None):
    """(model, parallelized model, parameter count), initialised from ``init_checkpoint`` (an llmc stage
    folder: its llmc checkpoint, else its ``hf/`` export, :func:`llmc.runtime.hf_io.load_init_from`) or
    ``hf_src`` (a Hugging Face checkpoint) if given.

    Meta init (large models): build on meta, shard with FSDP2/TP, materialise only the local shards,
    then init. Otherwise (default for small models): init the full model identically on every rank,
    then shard; every layout then starts from bit-identical weights (DDP == FSDP2 == TP == 1 process).
    ``adapt(model)`` (post-training: LoRA adapters) runs just before sharding, after the weights are loaded
    (whole-model build) or on the meta model (meta init: the weights are loaded into the sharded base then).
    ``build_device`` (whole-model builds only; default the rank's device): where the model is built, loaded and
    adapted before it moves to the rank's device (post-training's QLoRA / bf16 base: the CPU, so the device never
    holds the full-precision weights; host memory does).
    """
    sharded = job.dp_shard > 1 or job.tp > 1
    with torch.device("meta"):
        model = Transformer(job.arch)
    n_params = model.num_params()
    meta = sharded and info.world > 1 and (job.meta_init if job.meta_init is not None else n_params > META_INIT_PARAMS)
    where = torch.device(build_device) if build_device is not None and not meta else info.device
    if not meta:
        model = build_model(job.arch, where, seed=job.seed, init=job.init)
        if init_checkpoint is not None:
            got = load_init_from(model, init_checkpoint, job.arch, checkpoint_arch=start_arch(job))
            say(f"initialised weights from {got}")
        if hf_src:
            say(f"initialised weights from Hugging Face "
                f"{loaded_from(load_hf_into(model, hf_src, job.arch, checkpoint_arch=start_arch(job)))}")
    if adapt is not None:
        adapt(model)
    if where != info.device:
        model.to(info.device)  # parameters, buffers and (llmc.runtime.lora.NF4Linear) NF4 codes
    wrapped = parallelize(model, info, job.dp_replicate, job.dp_shard, job.tp, job.activation_checkpointing,
                          compile=wants_compile(job), ac_layers=job.ac_layers, reshard=job.reshards)
    if meta:
        model.to_empty(device=info.device)
        torch.manual_seed(job.seed)
        model.init_weights(job.init, buffer_device=info.device)  # DTensor-aware random init of the local shards
        if init_checkpoint is not None:  # collective: each rank loads what its shards need
            got = load_init_from(wrapped, init_checkpoint, job.arch, rank=info.rank, world=info.world,
                                 checkpoint_arch=start_arch(job))
            say(f"initialised weights from {got}")
        if hf_src:  # each rank reads only what its shards need, tensor by tensor
            got = load_hf_into(model, hf_src, job.arch, rank=info.rank, world=info.world,
                               checkpoint_arch=start_arch(job))
            say(f"initialised weights from Hugging Face {loaded_from(got)} ({got['bytes_read']:,} bytes read by rank "
                f"0)")
    return model, wrapped, n_params


def _forward_backward(job: TrainJob, wrapped, loader: StreamLoader, info: DistInfo, cpu_bf16: bool,
                      is_ddp: bool) -> torch.Tensor:
    """One optimizer step's micro-batches (gradients accumulated); returns the terms of the objective, each summed
    over the micro-batches: (cross-entropy, MoE aux loss, z-loss term). The backward is of their sum."""
    loss_sum = torch.zeros(3, device=info.device)
    for micro in range(job.grad_accum):
        x, y = loader.next_batch(job.micro_batch)
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        sync = micro == job.grad_accum - 1
        ctx = wrapped.no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
        with ctx:
            with _autocast(job, info.device, cpu_bf16):
                losses, aux = wrapped(x, return_aux=True, targets=y, loss_chunk=job.loss_chunk, lse=job.z_loss > 0)
                ce, z = loss_terms(losses, y, job.z_loss)
                loss = ce + z + aux
            (loss / job.grad_accum).backward()
        loss_sum += torch.stack([ce.detach().float(), aux.detach().float(), z.detach().float()])
    return loss_sum


def is_spike(hist: list[float], loss: float, spike) -> bool:
    """A loss spike: non-finite, or (with at least min(window, 10) losses seen) above the window's
    mean + threshold x std."""
    if not math.isfinite(loss):
        return True
    if len(hist) < min(spike.window, 10):
        return False
    mean = sum(hist) / len(hist)
    std = math.sqrt(sum((v - mean) ** 2 for v in hist) / len(hist))
    return loss > mean + spike.threshold * std


def train(job: TrainJob, out_dir: str | Path, assets: Assets, *, max_steps: int | None = None,
          max_seconds: float | None = None, resume: bool = True, fallback_checkpoint: bool = False,
          init_checkpoint: str | Path | None = None, cpu_bf16: bool = False, info: DistInfo | None = None,
          echo: bool = True) -> dict:
    """Train one stage. Returns {"status": "done"|"stopped"|"preempted"|"failed", "step", "loss", "checkpoint"}.

    "failed": a step's loss or gradient norm was not finite on some rank (without ``training.loss_spike``; with it
    the run rewinds, and gives up with a TrainingError after ``max_rewinds``), or the weights were not before a
    checkpoint: the step is not taken, nothing of it is saved, rank 0 prints one ``error[R014]`` line
    (:func:`nonfinite_line`), metrics.jsonl ends with an ``end`` event of status "failed" and its ``reason``, and
    ``checkpoint`` names the newest checkpoint saved (finite weights), or is None.

    max_steps: stop (with a checkpoint, no DONE.json) after this many optimizer steps in total;
    the LR schedule still spans ``job.steps``. max_seconds: same, on wall time.
    init_checkpoint: weights to start from when there is nothing to resume (the init_from stage).
    SIGTERM / SIGUSR1 (any rank, :mod:`llmc.runtime.preempt`): at the end of the current step, a checkpoint
    of it (complete, also when saved asynchronously) and status "preempted", no DONE.json; rerun to resume.
    """
    with _preempt_handlers():
        return _train(job, out_dir, assets, max_steps=max_steps, max_seconds=max_seconds, resume=resume,
                      fallback_checkpoint=fallback_checkpoint, init_checkpoint=init_checkpoint, cpu_bf16=cpu_bf16,
                      info=info, echo=echo)


def _train(job: TrainJob, out_dir: str | Path, assets: Assets, *, max_steps: int | None, max_seconds: float | None,
           resume: bool, fallback_checkpoint: bool, init_checkpoint: str | Path | None, cpu_bf16: bool,
           info: DistInfo | None, echo: bool) -> dict:
    info = info or init_distributed()
    _check_layout(job, info)
    if getattr(job.stage_spec, "lora", None) is not None:  # a lock from before the plan refused it (G024)
        raise TrainingError(f"{job.kind} stage {job.stage!r} has lora:, which this trainer does not apply (it would "
                            "train every weight and write no adapter); hint: drop lora (a full training of every "
                            "weight), or run the adaptation as an sft stage, and build again")
    out = Path(out_dir)
    ckpt_dir = out / job.checkpoint_folder
    main = info.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=main, echo=echo)
    say = print if (main and echo) else (lambda *a, **k: None)
    t_start = time.time()

    torch.manual_seed(job.seed)
    loader = make_loader(job, assets, info)
    resume_from = None
    if resume:
        try:
            resume_from = latest_checkpoint(ckpt_dir, fallback=fallback_checkpoint, log=say)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
    init_from = init_checkpoint if resume_from is None else None
    hf_src = init_hf_source(job) if (init_checkpoint is None and resume_from is None) else None
    model, wrapped, n_params = _setup_model(job, info, init_from, hf_src, say)
    fpt = job.flops_per_token  # the compiler's (the lock's); None: no FLOP/s, no MFU
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, job, info.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, job.lr_factor)

    spike = job.loss_spike
    window: deque[float] = deque(maxlen=spike.window)
    step, tokens, rewinds = 0, 0, 0
    timer = IntervalTimer()  # step_s: the training time of the steps since the last logged record
    aux_on = has_aux_loss(job.arch)

    def restore(path: Path) -> dict:
        nonlocal step, tokens, window
        saved = json.loads((path / "train.json").read_text()) if (path / "train.json").is_file() else {}
        why = job.foreign_checkpoint(saved, path)
        if why is not None:
            raise TrainingError(why)
        at = saved.get("step") if isinstance(saved, dict) else None
        why = job.schedule_change(saved.get("lr_schedule") if isinstance(saved, dict) else None, path.name,
                                  at if isinstance(at, int) else 0)
        if why is not None:
            raise TrainingError(why)
        st = load_checkpoint(path, wrapped, opt)
        sched.load_state_dict(st["scheduler"])
        loader.load_state_dict(st["data"])
        step, tokens = int(st["step"]), int(st["tokens"])
        window = deque(st.get("loss_window", []), maxlen=spike.window)
        return st

    async_ckpt = job.checkpoint_async  # the plan's choice, as the torchtitan job makes it (lock hyper.checkpoint_async)

    def checkpoint_now() -> Path:
        if not weights_finite(params):  # collective: every rank takes the same branch
            raise _NonFinite("non-finite weights after the update")
        state = {"tokens": tokens, "data": loader.full_state(), "scheduler": sched.state_dict(),
                 "loss_window": list(window), "rewinds": rewinds, "stage": job.stage, "kind": job.kind,
                 "spec_sha256": job.spec_sha256, "seq_len": job.seq_len, "lr_schedule": job.lr_schedule,
                 "layout": {"dp_replicate": job.dp_replicate, "dp_shard": job.dp_shard, "tp": job.tp}}
        return save_checkpoint(ckpt_dir, step, wrapped, opt, state, keep_latest=job.keep_latest, sharded=True,
                               async_save=async_ckpt)

    if resume_from is not None:
        st = restore(resume_from)
        rewinds = int(st.get("rewinds", 0))
        if st.get("spec_sha256") not in (None, job.spec_sha256):
            say(f"note: {resume_from.name} was written under another spec (sha256 {st['spec_sha256'][:12]}, the lock's "
                f"is {str(job.spec_sha256)[:12]}); its model shapes, optimizer and LR schedule match, resuming")
        if main:  # each step once in metrics.jsonl: drop what the interrupted run logged after the checkpoint
            truncate_after_step(out / "metrics.jsonl", step)
    log = open_run_logger(job, out, main, echo, metrics, resumed_step=step if resume_from is not None else None)
    if resume_from is not None:
        say(f"resumed from {resume_from} at step {step}")
        log.event("resume", step=step, checkpoint=str(resume_from))
    elif spike.enabled:
        checkpoint_now()  # step-0 checkpoint so a spike before the first interval can rewind

    runs = precision_note(job.precision, "bf16" if trains_bf16(job, info.device, cpu_bf16) else "fp32",
                          info.device.type == "cpu")
    say(f"{job.name}/{job.stage}: {n_params:,} params, {job.steps} steps x {job.tokens_per_step:,} tokens "
        f"(mb {job.micro_batch} x accum {job.grad_accum} x dp {job.dp}, tp {job.tp}, seq {job.seq_len}"
        f"{job.shard_note}), "
        f"AC {ac_label(job.activation_checkpointing, job.ac_layers)}{job.loss_note}, device {info.device}, "
        f"world {info.world}, {runs}")
    stop_at = min(job.steps, max_steps) if max_steps else job.steps
    last_ckpt_step = step if resume_from is not None else 0 if spike.enabled else -1  # (spike: the step-0 one)
    last_loss = float("nan")
    status = "done"
    is_ddp = hasattr(wrapped, "no_sync")
    wrapped.train()
    from llmc.runtime.validation import Validator

    validator = Validator.for_job(job, assets, job.micro_batch, *dp_coords(info, job.dp_replicate, job.dp_shard,
                                  job.tp), info.device, _autocast(job, info.device, cpu_bf16))

    def failed(what: str, loss: float | None, norm: float | None, taken: bool = False) -> dict:
        """Stop at a non-finite step (every rank, together): nothing of it saved; the R014 line, the end event."""
        wait_for_checkpoint()  # an asynchronous save of an earlier (finite) step completes first
        last = ckpt_dir / f"step-{last_ckpt_step:08d}" if last_ckpt_step >= 0 else None
        if last is not None and not last.is_dir():
            last = None
        line = nonfinite_line(str(out), job.stage, step, what, loss, norm, str(last) if last else None, taken)
        reason = line.split(": error[R014] ", 1)[1].split(": ", 1)[1]
        result = {"status": "failed", "stage": job.stage, "kind": job.kind, "step": step, "steps": job.steps,
                  "loss": last_loss, "tokens": tokens, "reason": reason,
                  "checkpoint": os.path.relpath(last, out) if last else None,
                  "wall_s": round(time.time() - t_start, 2), "params": n_params, "rewinds": rewinds}
        if main:
            print(line, file=sys.stderr, flush=True)
            log.event("end", **{k: v for k, v in result.items() if k != "loss"}, final_loss=result["loss"])
        log.close()
        return result

    while step < stop_at:
        timer.start()
        loss_sum = _forward_backward(job, wrapped, loader, info, cpu_bf16, is_ddp)
        gnorm = clip_grad_norm(params, job.grad_clip)  # 0-d tensor
        lr = opt.param_groups[0]["lr"]
        # every step, before the optimizer step: the loss (all-reduced) and the grad norm, finite on every rank?
        # (one small all-reduce and one host sync per step: the price of never stepping on a NaN)
        parts, norm, finite = step_stats(loss_sum / job.grad_accum, gnorm)
        last_loss, terms = parts[0], step_terms(parts, job.z_loss, aux_on)
        if finite:
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        _update_expert_bias(model)
        step += 1
        tokens += job.tokens_per_step
        log_now = step % job.log_every == 0 or step == 1 or step == stop_at
        timer.stop()  # (validation and checkpoint saves below are not training time)

        if not finite and not spike.enabled:  # a hard stop: the step was not taken and is not saved
            log.log(step_record(step=step, loss=last_loss, lr=lr, grad_norm=norm, tokens=tokens,
                                tokens_per_step=job.tokens_per_step, dt=timer.take(), flops_per_token=fpt,
                                peak_flops=job.peak_flops, world=info.world, device=info.device, terms=terms))
            what = ("non-finite loss" if not math.isfinite(last_loss) else "non-finite gradient norm"
                    if not math.isfinite(norm) else "non-finite gradient norm on another rank")
            return failed(what, last_loss, norm)

        # loss spike: non-finite (loss or grad norm), or above mean + threshold * std of the window
        if spike.enabled:
            if not finite or is_spike(list(window), last_loss, spike):
                rewinds += 1
                if rewinds > spike.max_rewinds:
                    if main:
                        log.event("end", status="failed", step=step, steps=job.steps, final_loss=last_loss,
                                  reason=f"loss spike at step {step} (loss {last_loss:.4f}, grad norm {norm:.4g}); "
                                         f"gave up after {spike.max_rewinds} rewinds")
                    raise TrainingError(f"loss spike at step {step} (loss {last_loss:.4f}); gave up after "
                                        f"{spike.max_rewinds} rewinds")
                data_after = loader.state_dict()
                wait_for_checkpoint()
                back = latest_checkpoint(ckpt_dir, fallback=True, log=say)
                if back is None:
                    raise TrainingError(f"loss spike at step {step} but no checkpoint to rewind to")
                spike_step = step
                restore(back)
                if main:  # each step once in metrics.jsonl: the discarded steps' records go (the event keeps the spike)
                    truncate_after_step(out / "metrics.jsonl", step)
                loader.load_state_dict(data_after)  # drop the batches up to the spike ...
                loader.skip(spike.skip_batches * job.grad_accum, job.micro_batch)  # ... and skip_batches more
                say(f"loss spike at step {spike_step} (loss {last_loss:.4f}): rewound to step {step}, "
                    f"skipping {spike.skip_batches} batch(es) past the spike (rewind {rewinds}/{spike.max_rewinds})")
                log.event("loss_spike", step=spike_step, loss=last_loss, rewound_to=step, rewinds=rewinds)
                timer.reset()  # the discarded steps' time is no step's of the log
                continue
            window.append(last_loss)

        if log_now:
            log.log(step_record(step=step, loss=last_loss, lr=lr, grad_norm=float(gnorm), tokens=tokens,
                                tokens_per_step=job.tokens_per_step, dt=timer.take(), flops_per_token=fpt,
                                peak_flops=job.peak_flops, world=info.world, device=info.device, terms=terms))
        if validator is not None:
            validator.maybe(step, stop_at, wrapped, log)
        if step % job.checkpoint_interval == 0 and step < job.steps:
            try:
                checkpoint_now()
            except _NonFinite as e:
                return failed(e.what, None, None, taken=True)
            last_ckpt_step = step
        # every rank: one all-reduce (time limit and signal together)
        late, preempted = _stop_now(None if max_seconds is None else time.time() - t_start > max_seconds,
                                    step < stop_at, info.device)
        if late or preempted:
            status = "preempted" if preempted else "stopped"
            break

    if step < job.steps and status != "preempted":
        status = "stopped"
    final = None
    if last_ckpt_step != step:
        try:
            final = checkpoint_now()
        except _NonFinite as e:
            return failed(e.what, None, None, taken=True)
    else:
        final = ckpt_dir / f"step-{step:08d}"
    wait_for_checkpoint()  # an asynchronous save completes before the stage reports
    if status == "preempted":
        say(f"preempted: saved step {step} to {final}; rerun to resume")
        log.event("preempted", step=step, checkpoint=os.path.relpath(final, out))
    result = {"status": status, "stage": job.stage, "kind": job.kind, "step": step, "steps": job.steps,
              "loss": last_loss, "tokens": tokens, "checkpoint": os.path.relpath(final, out),
              "wall_s": round(time.time() - t_start, 2), "params": n_params, "rewinds": rewinds}
    if validator is not None and validator.last is not None:
        result.update({f"val_{k}" if k == "step" else k: v for k, v in validator.last.items()})
    if main:
        _finish(job, result, final, out, assets, log, say)
    log.close()
    return result


class _NonFinite(TrainingError):
    """Raised by checkpoint_now where a step would save non-finite weights; turned into status "failed" by the loop
    (every rank raises it together: the check is collective)."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def open_run_logger(job: TrainJob, out: Path, main: bool, echo: bool, metrics: MetricsLogger,
                    resumed_step: int | None = None, backend: str = "native") -> RunLogger:
    """The stage's :class:`llmc.runtime.observe.RunLogger` (:func:`llmc.runtime.observe.open_stage_log`: metrics.jsonl,
    TensorBoard, W&B, the progress/ETA line; rank 0 only; TensorBoard events past ``resumed_step`` purged). Its first
    record of this start is a ``start`` event naming the ``backend`` that trains (as the torchtitan job's):
    ``llmc calibrate`` fits a run to the backend that ran it, which ``llmc launch --backend`` may have chosen over the
    lock's."""
    return open_stage_log(out, run_name=f"{job.name}-{job.stage}", total_steps=job.steps,
                          tokens_per_step=job.tokens_per_step, lock=job.lock, metrics=metrics, main=main, echo=echo,
                          resumed_step=resumed_step, spec_sha256=job.spec_sha256, start={"backend": backend})


def _finish(job: TrainJob, result: dict, final: Path, out: Path, assets: Assets, log: RunLogger, say) -> None:
    """Rank 0 after the loop: export + DONE.json (atomic: a stage is done or it is not) when done. DONE.json records the
    fingerprint of the lock that trained the stage (``llmc.runtime.job.fingerprint_record``): a launch under another
    lock refuses the stage instead of passing it off as its own."""
    if result["status"] == "done":
        from llmc.runtime.job import fingerprint_record

        result["hf"] = _export_hf(job, final, out, assets, say, int(result["step"]))
        tmp = out / "DONE.json.tmp"
        record = fingerprint_record(job.lock, job.stage, stage_dir=out, spec_dir=job.spec_dir)
        tmp.write_text(json.dumps({**result, **record}, indent=2) + "\n")
        os.replace(tmp, out / "DONE.json")
    log.event("end", **{k: v for k, v in result.items() if k != "loss"}, final_loss=result["loss"])
    say(f"{result['status']} at step {result['step']}: loss {result['loss']:.4f}, checkpoint {final}")
