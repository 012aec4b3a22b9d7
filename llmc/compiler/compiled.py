"""The compiler's output: every derived number, the chosen plan and the diagnostics.

``Compiled`` is frozen and JSON-serialisable (``to_json``); it is what ``llmc plan`` prints,
what ``plan.lock.json`` records and what the renderers and ``llmc launch`` consume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic


@dataclass(frozen=True)
class ModelNumbers:
    params_total: int
    params_active: int  # == params_total for dense models
    params_embedding: int  # token embedding + (untied) output head
    breakdown: dict[str, int]  # labelled components, e.g. "embed/tok", "layers/attn/wq" (summed over layers)
    kv_bytes_per_token: int  # bf16 KV cache bytes per token, all layers


@dataclass(frozen=True)
class ComputeNumbers:
    convention: str  # e.g. "6ND (dense matmuls) + 6*L*s*d_attn attention (causal, PaLM appendix B halved)"
    flops_per_token: float  # training FLOPs per token (fwd+bwd), no recompute
    training_flops: float  # flops_per_token * tokens
    tokens: float
    tokens_per_param: float  # tokens / params_active
    chinchilla_tokens: float  # 20 * params_active
    optimal_params: float  # compute-optimal N for training_flops (20 tok/param rule)
    optimal_tokens: float  # compute-optimal D


@dataclass(frozen=True)
class MemoryNumbers:
    per_gpu_bytes: int  # peak over pipeline stages
    capacity_bytes: int
    breakdown: dict[str, int]  # weights, grads, optimizer, activations, buffers (peak stage)
    per_stage_bytes: list[int] = field(default_factory=list)  # per_gpu_bytes of every pipeline stage
    # peak stage: tensors (torch.cuda.max_memory_allocated), the caching allocator's reservation
    # (max_memory_reserved, what torchtitan logs as "memory:"), and CUDA context + NCCL outside it;
    # per_gpu_bytes = reserved_bytes + outside_allocator_bytes
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    outside_allocator_bytes: int = 0
    backend: str = "generic"


@dataclass(frozen=True)
class TimeNumbers:
    step_seconds: float
    mfu: float
    days: float
    steps: int
    tokens_per_second: float
    breakdown: dict[str, float] = field(default_factory=dict)  # compute, dp_comm, tp_comm, pp_bubble, ...


@dataclass(frozen=True)
class CostNumbers:
    gpu_hours: float
    usd: float
    usd_per_gpu_hour: float


@dataclass(frozen=True)
class Hyper:
    """Resolved training hyperparameters; ``defaults`` names the ones llmc chose."""

    lr: float
    min_lr: float
    warmup_steps: int
    steps: int
    global_batch_tokens: int
    global_batch_seqs: int
    seq_len: int
    schedule: str
    checkpoint_interval: int
    checkpoint_async: bool
    defaults: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    plan: ParallelPlan
    step_seconds: float
    mfu: float
    per_gpu_bytes: int
    fits: bool
    reason: str  # why rejected, or why ranked where it is


@dataclass(frozen=True)
class Compiled:
    spec_path: str
    spec_sha256: str
    spec: Any  # llmc.spec.run.RunSpec
    gpu: Any  # llmc.compiler.hardware.GPU
    model: ModelNumbers
    compute: ComputeNumbers
    hyper: Hyper
    plan: ParallelPlan | None
    memory: MemoryNumbers | None
    time: TimeNumbers | None
    cost: CostNumbers | None
    reasons: list[str]
    alternatives: list[Candidate]
    rejected: list[Candidate]
    diagnostics: list[Diagnostic]
    stages: list[dict] = field(default_factory=list)  # per-stage plans (issue 5)
    serving: list[dict] = field(default_factory=list)  # per-target serving plans (issue 3)
    search: dict = field(default_factory=dict)  # search statistics: evaluated, fitting, rejected counts by reason
    backend: dict = field(default_factory=dict)  # name, reason (why this backend), compile (torch.compile on)
    calibration: dict = field(default_factory=dict)  # calibrated, factors, error_band_pct, ranking_band_pct, reason
    unfit: dict | None = None  # closest non-fitting layout (P004): plan, memory, time of one step

    def to_json(self) -> dict:
        """JSON view; keys documented in README (model.*, compute.*, plan, memory.*, time.*, cost.*)."""

        def dc(x):
            return None if x is None else asdict(x)

        return {
            "llmc_version": __import__("llmc").__version__,
            "spec": {
                "path": self.spec_path,
                "sha256": self.spec_sha256,
                "name": self.spec.name,
                # the whole resolved spec: the runtime reads data/training/stages from here
                "resolved": self.spec.model_dump(mode="json"),
            },
            "model": {"architecture": self.spec.model.model_dump(mode="json"), **dc(self.model)},
            "hardware": dc(self.gpu) if self.gpu is not None else None,
            "compute": dc(self.compute),
            "hyper": dc(self.hyper),
            "plan": self.plan.to_json() if self.plan else None,
            "memory": dc(self.memory),
            "time": dc(self.time),
            "cost": dc(self.cost),
            "reasons": list(self.reasons),
            "alternatives": [_cand(c) for c in self.alternatives],
            "rejected": [_cand(c) for c in self.rejected],
            "stages": list(self.stages),
            "serving": list(self.serving),
            "search": dict(self.search),
            "backend": dict(self.backend),
            "calibration": dict(self.calibration),
            "unfit": self.unfit,
            "diagnostics": [d.to_json() for d in self.diagnostics],
        }


def _cand(c: Candidate) -> dict:
    return {
        "plan": c.plan.to_json(),
        "step_seconds": c.step_seconds,
        "mfu": c.mfu,
        "per_gpu_bytes": c.per_gpu_bytes,
        "fits": c.fits,
        "reason": c.reason,
    }
