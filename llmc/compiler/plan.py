"""The parallelism plan: degrees, batch split and recomputation, with its invariants in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from llmc.spec.schema import ACMode, ac_label

PPSchedule = Literal["1F1B", "Interleaved1F1B", "GPipe", "ZBVZeroBubble"]


@dataclass(frozen=True)
class ParallelPlan:
    """One candidate layout. world = dp_replicate * dp_shard * cp * tp * pp.

    EP borrows from dp_shard * cp (torchtitan's convention: the expert mesh is carved out of the
    data-parallel ranks), so it is not a factor of the world size.
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
