"""Process group, device mesh and parallelisation (DDP, FSDP2, TP) for the native trainer.

Order (as torchtitan): TP -> activation checkpointing -> torch.compile per block (opt-in) -> FSDP2 / DDP.

* mesh: ``init_device_mesh(device, (dp_replicate, dp_shard, tp), ("dp_replicate", "dp_shard", "tp"))``
  on cpu+gloo or cuda+nccl.
* TP (``tp > 1``): DTensor ``parallelize_module`` per block: ColwiseParallel wq/wk/wv/w1/w3,
  RowwiseParallel wo/w2, so each rank holds H/tp query and K/tp kv heads (K % tp == 0 required).
  Embedding, norms, output head and MoE experts stay replicated; Qwen3's q/k norms take each rank's heads
  (Replicate weight, gradient summed over TP). MLA (DeepSeek-V2/V3): the per-head up-projections (wq or wq_b, wkv_b)
  column-parallel and wo row-parallel, so each rank holds H/tp heads; the low-rank down-projections (wq_a, wkv_a)
  and their norms stay replicated, as torchtitan's deepseek_v3 parallelize does (NoParallel); the shared rope key
  from wkv_a feeds every rank's heads, so its gradient is summed over TP (:func:`_sum_rope_key_grad`).
* FSDP2 (``dp_shard > 1``): ``fully_shard`` on every block, then on the root; with
  ``dp_replicate > 1`` too it is HSDP over the 2-D ("dp_replicate", "dp_shard") mesh.
  Gradient reduction uses FSDP2's default (AVG over the data-parallel ranks), never
  ``set_gradient_divide_factor``, so gloo never sees ``ReduceOp.PREMUL_SUM`` (NCCL-only: torch.distributed docs, ReduceOp);
  on gloo we also call ``set_force_sum_reduction_for_comms(True)`` when available, harmless at default.
* DDP (``dp_replicate > 1``, ``dp_shard == 1``): ``DistributedDataParallel`` over the dp_replicate group
  (with TP, the replicate dimension goes through ``fully_shard`` on the 2-D mesh instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed() -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (nccl on CUDA, gloo on CPU); else single."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local, device)


def shutdown(together: bool = True) -> None:
    """Destroy the process group. ``together`` (a rank that finished normally): a barrier first, so no rank
    tears its gloo/NCCL connections down while another still has collectives in flight (PyTorch's
    ``destroy_process_group`` notes); a rank leaving on an error skips it, so it never waits on peers that
    are still inside a different collective."""
    if dist.is_available() and dist.is_initialized():
        try:
            if together:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def build_mesh(device: torch.device, dp_replicate: int, dp_shard: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dp_replicate, dp_shard, tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))


def dp_coords(info: DistInfo, dp_replicate: int, dp_shard: int, tp: int) -> tuple[int, int]:
    """(dp_rank, dp_size) of this process: ranks are laid out as [dp_replicate][dp_shard][tp]."""
    dp_size = dp_replicate * dp_shard
    return info.rank // tp, dp_size


def apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    arch = model.arch
    tp = tp_mesh.size()
    mla = arch.mla
    if arch.n_heads % tp or (mla is None and arch.kv_heads % tp):
        raise ValueError(f"tp={tp} must divide n_heads={arch.n_heads}"
                         + ("" if mla is not None else f" and n_kv_heads={arch.kv_heads}"))
    for blk in model.layers.values():
        if mla is None:
            plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                    "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        else:  # rows / columns are grouped by head, so contiguous shards are whole heads
            plan = {"attention.wq" if mla.q_lora_rank is None else "attention.wq_b": ColwiseParallel(),
                    "attention.wkv_b": ColwiseParallel(), "attention.wo": RowwiseParallel()}
            _sum_rope_key_grad(blk.attention.wkv_a, mla.kv_lora_rank, tp_mesh)
        if not blk.is_moe:
            if arch.d_ff % tp:
                raise ValueError(f"tp={tp} must divide d_ff={arch.d_ff}")
            plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                         "feed_forward.w2": RowwiseParallel()})
        parallelize_module(blk, tp_mesh, plan)
        if arch.attn_sinks:
            _heads_sharded_sinks(blk.attention, tp_mesh)
        if arch.qk_norm:
            for norm in (blk.attention.q_norm, blk.attention.k_norm):
                (_heads_sharded_norm if arch.qk_norm_scope == "head" else _projection_sharded_norm)(norm, tp_mesh)


class _RopeKeyGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the last ``rope`` features (MLA's shared rope key) over the TP
    group (Megatron-LM's copy-to-tensor-parallel-region, on those features only). The latent features' gradient
    is complete already: wkv_b's column-parallel input sums it."""

    @staticmethod
    def forward(ctx, x, kv_lora: int, group):
        ctx.kv_lora, ctx.group = kv_lora, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        key = grad[..., ctx.kv_lora:].contiguous()
        dist.all_reduce(key, group=ctx.group)
        grad[..., ctx.kv_lora:] = key
        return grad, None, None


def _sum_rope_key_grad(wkv_a: nn.Module, kv_lora: int, tp_mesh) -> None:
    """MLA under TP: wkv_a (replicated) outputs the kv latent and one rope key shared by all heads; each rank's heads
    use the key, so each rank's gradient of it is partial: a forward hook routes the output through
    :class:`_RopeKeyGrad`."""
    group = tp_mesh.get_group()
    wkv_a.register_forward_hook(lambda _mod, _inp, out: _RopeKeyGrad.apply(out, kv_lora, group))


def _heads_sharded_sinks(attn: nn.Module, tp_mesh) -> None:
    """gpt-oss's attention sinks (one logit per query head) under TP: each rank keeps its own heads' (Shard(0): the
    contiguous block of heads the column-parallel wq gives it), as torchtitan's gpt_oss sharding does; the attention
    reads the local shard (``llmc.runtime.model._local``), and its gradient stays on that rank's heads."""
    from torch.distributed.tensor import Shard, distribute_tensor

    attn.sinks = nn.Parameter(distribute_tensor(attn.sinks.data, tp_mesh, [Shard(0)]))


def _heads_sharded_norm(norm: nn.Module, tp_mesh) -> None:
    """Qwen3's q/k norm under TP: each rank normalises its own heads (input Shard(2), the heads dim) with the
    whole weight (Replicate), as torchtitan's qwen3 sharding does. Each rank's weight gradient covers only its
    heads (DTensor: Partial(sum)). DTensor's optimizer ops would reduce it themselves, but the global gradient norm
    (train.clip_grad_norm) would add each rank's squares of a partial gradient instead of squaring their sum: a
    hook sums it over the TP group before it accumulates, so the gradient is Replicate like the weight."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def params(_name, mod, mesh):
        for n, p in list(mod.named_parameters(recurse=False)):
            d = nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]))
            d.register_hook(lambda g: g.redistribute(placements=[Replicate()]))
            mod.register_parameter(n, d)

    distribute_module(norm, tp_mesh, params,
                      input_fn=lambda mod, inputs, mesh: (DTensor.from_local(inputs[0], mesh, [Shard(2)],
                                                                               run_check=False),),
                      output_fn=lambda mod, out, mesh: out.to_local())


def _projection_sharded_norm(norm: nn.Module, tp_mesh) -> None:
    """OLMo 2's q / k norm under TP: one RMSNorm over the whole projection, whose columns the ranks hold in blocks
    (ColwiseParallel wq / wk: Shard on the last dim). The weight is sharded alike (Shard(0)), and the input is a
    DTensor sharded on the normalised dim, so the mean of squares is a sum over the TP group (DTensor reduces the
    partial means before the rsqrt) and each rank normalises its block with the whole projection's statistics,
    as Megatron-LM's and transformers' OLMo 2 (which gathers q / k first) do. Each rank's weight gradient is its
    own block: no partial sums. (torch's fused rms_norm adds eps in place, which DTensor refuses on the partial
    mean: this norm computes the same formula out of place, in fp32.)"""
    from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

    def params(_name, mod, mesh):
        for n, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(n, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))

    def forward(x):  # x: (B, T, columns) sharded on the columns
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
        return (y * norm.weight.float()).to(x.dtype)

    norm.forward = forward
    distribute_module(norm, tp_mesh, params,
                      input_fn=lambda mod, inputs, mesh: (DTensor.from_local(inputs[0], mesh, [Shard(-1)],
                                                                               run_check=False),),
                      output_fn=lambda mod, out, mesh: out.to_local())


def apply_fsdp(model: nn.Module, dp_mesh, mixed_bf16: bool = False, reshard: bool = True) -> None:
    """FSDP2 per block, then the root (embedding, final norm, head). ``reshard``: each block's parameters are
    resharded after its forward and gathered again for its backward (ZeRO-3); False keeps them gathered from the
    forward to the backward (ZeRO-1/2: fully_shard's reshard_after_forward=False; the root never reshards after
    forward, fully_shard's own rule)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 \
        else MixedPrecisionPolicy()
    gloo = dist.get_backend() == "gloo"
    blocks = list(model.layers.values())
    for i, blk in enumerate(blocks):
        # the last block's params are needed right away in backward: don't reshard it after forward
        fully_shard(blk, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    if gloo:
        for m in [*blocks, model]:
            if hasattr(m, "set_force_sum_reduction_for_comms"):
                m.set_force_sum_reduction_for_comms(True)


def wants_compile(job) -> bool:
    """``training.compile`` of the run (lock["spec"]["resolved"]["training"]["compile"], or the lock's
    ``training.compile``); absent = False."""
    lock = getattr(job, "lock", None) or {}
    tr = (lock.get("training") or {}) if isinstance(lock, dict) else {}
    if "compile" in tr:
        return bool(tr["compile"])
    spec_tr = getattr(getattr(job, "spec", None), "training", None)
    return bool(getattr(spec_tr, "compile", False))


def parallelize(model: nn.Module, info: DistInfo, dp_replicate: int, dp_shard: int, tp: int,
                ac_mode: str = "none", mixed_bf16: bool = False, compile: bool = False, *,
                ac_layers: int = 0, reshard: bool = True) -> nn.Module:
    """Apply TP, activation checkpointing (``model.set_ac(ac_mode, ac_layers)``; ``ac_layers`` for
    ``partial`` only), per-block torch.compile (opt-in) and FSDP2/DDP as the plan says; returns the module to
    call. The checkpoint wraps each block's call in ``Transformer.forward``, outside the compiled block, so
    compile_blocks compiles the same block forward under every mode. ``reshard``: see :func:`apply_fsdp`."""
    model.set_ac(ac_mode, ac_layers)
    if info.world == 1:
        if compile:
            model.compile_blocks()
        return model
    if dp_replicate * dp_shard * tp != info.world:
        raise ValueError(f"plan dp_replicate*dp_shard*tp = {dp_replicate}*{dp_shard}*{tp} "
                         f"!= WORLD_SIZE {info.world}")
    mesh = build_mesh(info.device, dp_replicate, dp_shard, tp)
    if tp > 1:
        apply_tp(model, mesh["tp"])
    if compile:
        model.compile_blocks()
    if dp_shard > 1 or (dp_replicate > 1 and tp > 1):
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dp_replicate > 1 else mesh["dp_shard"]
        apply_fsdp(model, dp_mesh, mixed_bf16, reshard)
        return model
    if dp_replicate > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids, process_group=mesh["dp_replicate"].get_group(),
                   find_unused_parameters=model.arch.moe is not None)
    return model
