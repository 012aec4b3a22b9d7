"""The parallelism plan: degrees, batch split and recomputation, with its invariants in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from llmc.spec.schema import ACMode, ac_label

PPSchedule = Literal["1F1B", "Interleaved1F1B", "GPipe", "ZBVZeroBubble"]


@dataclass(frozen=True)
class ParallelPlan:
    """One candidate layout. world = dp_replicate * dp_shard * cp * tp * pp.

    EP is not a factor of the world size: it borrows ranks from the others. On torchtitan the routed experts live
    on their own (efsdp, ep) mesh over the dp_shard x cp x tp ranks (:func:`ep_domain`, :func:`expert_shards`).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: PPSchedule = "1F1B"
    pp_virtual_stages: int = 1  # stages per rank; > 1 only for interleaved schedules
    cp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (pp micro-batches when pp > 1)
    activation_checkpointing: ACMode = "none"
    # "partial": the first ac_layers blocks of every pipeline model chunk (the whole model without PP) are
    # recomputed whole (as "full"), the others keep every activation (Megatron-LM's recompute_method="block"
    # with recompute_num_layers); 0 for every other mode
    ac_layers: int = 0
    zero_stage: int = 3  # 0 = DDP-style replicas only; 1/2/3 = ZeRO/FSDP flavour over dp_shard
    # tokens per slice of the output head + cross-entropy (llmc's native and DeepSpeed trainers: each recomputed in the
    # backward, so one slice's logits exist at a time); 0 = the whole micro-batch's logits at once
    loss_chunk_tokens: int = 0

    @property
    def ac_label(self) -> str:
        """The AC mode as printed: ``partial(K)`` with its block count, else the mode."""
        return ac_label(self.activation_checkpointing, self.ac_layers)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        """Ranks that see different data (batch is split over these)."""
        return self.dp_replicate * self.dp_shard

    @property
    def global_batch_seqs(self) -> int:
        """Batch identity: micro_batch x grad_accum x dp."""
        return self.micro_batch * self.grad_accum * self.dp

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- the routed experts' mesh

#: backends whose expert mesh spans the TP ranks. torchtitan 0.3.0 builds the routed experts' mesh
#: ("pp", "dp_replicate", "efsdp", "ep") over the same ranks as the dense ("pp", "dp_replicate", "dp_shard", "cp",
#: "tp"), so efsdp x ep = dp_shard x cp x tp ("EP borrows ranks from FSDP and TP"): torchtitan/distributed/
#: parallel_dims.py build_mesh (efsdp = dp_shard * cp * tp // ep) and config/configs.py expert_parallel_degree,
#: https://github.com/pytorch/torchtitan/blob/v0.3.0/torchtitan/distributed/parallel_dims.py. Its routed experts are
#: not TP-sharded with EP ("EP always shards on dim 0", models/common/moe_sharding.py
#: expert_param_placement_sparse: no expert tensor parallelism in 0.3.0) and TP-sharded without it (EP disabled,
#: TP > 1: expert_param_placement_dense, Shard(1) / Shard(2) on the TP axis); either way FSDP shards what is left.
#: The other profiles keep llmc's earlier convention (EP carved out of dp_shard x cp, the experts whole on each TP
#: rank). Megatron-Core folds its expert mesh differently: ETP x EP x EDP over the same ranks, with its own expert
#: tensor-parallel size ("--expert-tensor-parallel-size ... Default is same to --tensor-model-parallel-size",
#: "MoE Parallel Folding" in https://github.com/NVIDIA/Megatron-LM/blob/main/megatron/core/transformer/moe/README.md),
#: which llmc's megatron profile does not model (it keeps the convention above).
EP_SPANS_TP = frozenset({"torchtitan"})


def ep_domain(dp_shard: int, cp: int, tp: int, backend: str | None) -> int:
    """The ranks an EP group is carved out of, which ``ep`` must divide: dp_shard x cp x tp on a backend in
    :data:`EP_SPANS_TP` (torchtitan: efsdp x ep = dp_shard x cp x tp), dp_shard x cp on the others."""
    return dp_shard * cp * (tp if backend in EP_SPANS_TP else 1)


def expert_shards(dp_shard: int, cp: int, tp: int, ep: int, backend: str | None) -> tuple[int, int]:
    """(model-parallel divisor, data-parallel shard group) of the routed experts' parameters: each rank holds
    1 / divisor of them before FSDP / ZeRO, which shards that over the group.

    torchtitan (:data:`EP_SPANS_TP`): with EP, (ep, efsdp = dp_shard x cp x tp / ep); without, (tp, dp_shard x cp);
    the experts are sharded dp_shard x cp x tp ways in every layout. The other profiles: (ep, dp_shard x cp / ep)."""
    ep = max(1, ep)
    if backend in EP_SPANS_TP:
        if ep > 1:
            return ep, max(1, dp_shard * cp * tp // ep)
        return tp, dp_shard * cp
    return ep, max(1, dp_shard * cp // ep)


def ep_rank_span(tp: int, cp: int, ep: int, backend: str | None) -> int:
    """Consecutive ranks one EP group's members lie within (which nodes its all-to-all crosses). torchtitan: ep is
    the innermost axis of its (pp, dp_replicate, efsdp, ep) mesh, so a group is ``ep`` consecutive ranks (the TP
    ranks, innermost of the dense mesh, inside it when ep >= tp); the other profiles: ep x cp x tp (EP strided over
    the cp x tp ranks of dp_shard)."""
    return ep if backend in EP_SPANS_TP else ep * cp * tp
