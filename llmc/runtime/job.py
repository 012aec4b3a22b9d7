"""``TrainJob``: everything a trainer needs for one stage, read from ``plan.lock.json`` or built by hand.

``TrainJob.from_lock(lock, stage)`` reads ``lock["spec"]["resolved"]`` (the full RunSpec dump),
``lock["hyper"]`` (lr, min_lr, warmup_steps, steps, global_batch_*, seq_len, schedule,
checkpoint_interval), ``lock["plan"]`` (dp_replicate, dp_shard, tp, pp, cp, ep, micro_batch,
grad_accum, activation_checkpointing) and, for a named stage, its entry in ``lock["stages"]``
(seq_len, steps, global_batch_tokens, lr, hyper, long_context). Tests construct ``TrainJob(...)``
directly. Users of this API: ``llmc.runtime.train`` (native trainer), ``posttrain`` (sft/dpo/grpo:
``job.stage_plan`` holds the stage's compiler entry, ``job.stage_spec`` the Stage), and ``ds_train``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmc.spec.model import Architecture, RopeScaling
from llmc.spec.run import LossSpike, RunSpec, Source, Stage
from llmc.spec.run import Tokenizer as TokenizerSpec

NATIVE_KINDS = ("pretrain", "midtrain", "long_context")
POSTTRAIN_KINDS = ("sft", "dpo", "grpo")


@dataclass
class TrainJob:
    """One stage's resolved training job. Field defaults suit a tiny CPU run."""

    arch: Architecture
    sources: list[Source]
    seq_len: int
    steps: int
    name: str = "run"
    stage: str = "pretrain"
    kind: str = "pretrain"
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    # optimisation
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | wsd | linear | constant
    decay_fraction: float = 0.2  # wsd only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    z_loss: float = 0.0
    precision: str = "fp32"  # bf16 | fp8 | fp32 ; bf16 autocast on CUDA only unless cpu_bf16
    seed: int = 0
    log_every: int = 10
    # batch and layout
    micro_batch: int = 1
    grad_accum: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    activation_checkpointing: str = "none"
    meta_init: bool | None = None  # build on meta, shard, then init (FSDP/TP only); None = auto (> 2B params)
    # checkpoints and robustness
    checkpoint_interval: int = 100
    keep_latest: int = 3
    checkpoint_folder: str = "checkpoints"
    loss_spike: LossSpike = field(default_factory=LossSpike)
    # stage graph
    init_from: str | None = None  # stage whose final checkpoint initialises this one
    stage_spec: Stage | None = None
    stage_plan: dict | None = None  # the compiler's lock["stages"] entry (hyper, lora, ...)
    # provenance / extras
    spec_dir: str = "."  # relative source paths resolve against this (the spec file's folder)
    flops_per_token: float | None = None  # compiler's training FLOPs/token (fwd+bwd); None = 6N
    peak_flops: float | None = None  # accelerator peak FLOP/s for MFU; None = unknown (CPU)
    spec: RunSpec | None = None
    lock: dict | None = None

    # ------------------------------------------------------------------ derived
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def global_batch_seqs(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.seq_len

    def replace(self, **kw: Any) -> TrainJob:
        return replace(self, **kw)

    def resolve_path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else Path(self.spec_dir) / q

    # ------------------------------------------------------------------ from the lockfile
    @classmethod
    def from_lock(cls, lock: dict, stage: str | None = None) -> TrainJob:
        """Build the job for ``stage`` (None / "pretrain" without such a stage = the main pre-training)."""
        spec = RunSpec.model_validate(lock["spec"]["resolved"])
        hyper = lock.get("hyper") or {}
        plan = lock.get("plan") or {}
        t = spec.training
        spec_path = lock["spec"].get("path")
        spec_dir = str(Path(spec_path).resolve().parent) if spec_path else "."
        compute = lock.get("compute") or {}
        hw = lock.get("hardware") or {}
        job = cls(
            arch=spec.model, sources=list(spec.data.sources), seq_len=int(hyper.get("seq_len", spec.data.seq_len)),
            steps=int(hyper.get("steps") or t.steps or 1), name=spec.name, stage="pretrain", kind="pretrain",
            tokenizer=spec.data.tokenizer,
            lr=float(hyper.get("lr") or t.optimizer.lr or 3e-4),
            min_lr=float(hyper.get("min_lr", (hyper.get("lr") or t.optimizer.lr or 3e-4) * t.schedule.min_lr_ratio)),
            warmup_steps=int(hyper.get("warmup_steps", t.schedule.warmup_steps or 0)),
            schedule=str(hyper.get("schedule", t.schedule.kind)), decay_fraction=t.schedule.decay_fraction,
            betas=tuple(t.optimizer.betas), eps=t.optimizer.eps, weight_decay=t.optimizer.weight_decay,
            grad_clip=t.grad_clip, z_loss=t.z_loss, precision=t.precision, seed=t.seed, log_every=t.log_every,
            # no plan (the search found none): one process, the whole global batch per micro-step
            micro_batch=int(plan.get("micro_batch", hyper.get("global_batch_seqs") or 1)),
            grad_accum=int(plan.get("grad_accum", 1)),
            dp_replicate=int(plan.get("dp_replicate", 1)), dp_shard=int(plan.get("dp_shard", 1)),
            tp=int(plan.get("tp", 1)), pp=int(plan.get("pp", 1)), cp=int(plan.get("cp", 1)), ep=int(plan.get("ep", 1)),
            activation_checkpointing=str(plan.get("activation_checkpointing", "none")),
            checkpoint_interval=int(hyper.get("checkpoint_interval") or t.checkpoint.interval_steps or 100),
            keep_latest=t.checkpoint.keep_latest, checkpoint_folder=t.checkpoint.folder,
            loss_spike=t.loss_spike, spec_dir=spec_dir,
            flops_per_token=compute.get("flops_per_token"), peak_flops=_peak_flops(hw, t.precision),
            spec=spec, lock=lock,
        )
        if hyper.get("global_batch_seqs") and plan and job.global_batch_seqs != int(hyper["global_batch_seqs"]):
            raise ValueError(f"lock: plan micro_batch*grad_accum*dp = {job.global_batch_seqs} != "
                             f"hyper.global_batch_seqs {hyper['global_batch_seqs']}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not plan and world > 1:
            # No searched layout in the lock (e.g. a pipeline of post-training stages only): shard over
            # every rank that was started (FSDP), one sequence per rank per micro-step.
            gbs = int(hyper.get("global_batch_seqs") or world)
            job = replace(job, dp_shard=world, micro_batch=1, grad_accum=max(1, math.ceil(gbs / world)))
        if stage is None or (stage == "pretrain" and not any(s.name == "pretrain" for s in spec.stages)):
            return job
        return job._for_stage(spec, lock, stage)

    def _for_stage(self, spec: RunSpec, lock: dict, stage: str) -> TrainJob:
        st = next((s for s in spec.stages if s.name == stage), None)
        if st is None:
            names = ", ".join(["pretrain"] + [s.name for s in spec.stages])
            raise ValueError(f"no stage named {stage!r} in the lock (stages: {names})")
        entry = next((e for e in lock.get("stages") or [] if e.get("name") == stage), {}) or {}
        seq_len = int(entry.get("seq_len") or st.seq_len or (st.data.seq_len if st.data else self.seq_len))
        gbt = entry.get("global_batch_tokens") or st.global_batch_tokens
        lr = float(entry.get("lr") or st.lr or self.lr)
        data = st.data
        arch = self.arch
        lc = entry.get("long_context") or {}
        theta = lc.get("rope_theta") or st.rope_theta
        scaling = lc.get("rope_scaling") or st.rope_scaling
        if st.kind == "long_context" or theta or scaling:
            arch = arch.model_copy(update={
                "rope_theta": float(theta or arch.rope_theta),
                "rope_scaling": RopeScaling.model_validate(scaling) if scaling else arch.rope_scaling,
                "max_seq_len": max(arch.max_seq_len, seq_len)})
        micro, accum = self.micro_batch, self.grad_accum
        if gbt:  # keep the plan's layout; choose grad_accum to hit the stage's batch
            seqs = max(1, round(float(gbt) / seq_len))
            micro = max(1, min(self.micro_batch, seqs // self.dp)) if seqs >= self.dp else 1
            accum = max(1, math.ceil(seqs / (micro * self.dp)))
        steps = int(entry.get("steps") or st.steps or 0)
        if not steps:
            tokens = data.tokens if data else None
            steps = max(1, math.ceil(tokens / (micro * accum * self.dp * seq_len))) if tokens else self.steps
        ratio = self.min_lr / self.lr if self.lr else 0.1
        return replace(
            self, arch=arch, stage=st.name, kind=st.kind, seq_len=seq_len, lr=lr, min_lr=lr * ratio,
            warmup_steps=min(self.warmup_steps, max(steps // 10, 0)) if st.kind != "pretrain" else self.warmup_steps,
            steps=steps, micro_batch=micro, grad_accum=accum,
            sources=list(data.sources) if data else list(self.sources),
            tokenizer=(data.tokenizer if data and (data.tokenizer.path or data.tokenizer.train) else self.tokenizer),
            init_from=st.init_from, stage_spec=st, stage_plan=entry or None,
        )


def _peak_flops(hw: dict, precision: str) -> float | None:
    """Best-effort peak FLOP/s from lock["hardware"] (the compiler's GPU table row)."""
    if not hw:
        return None
    for key in (f"{precision}_flops", f"peak_{precision}_flops", "bf16_flops", "peak_flops", "flops"):
        v = hw.get(key)
        if isinstance(v, int | float) and v > 0:
            return float(v)
    for key in (f"{precision}_tflops", "bf16_tflops", "tflops_bf16", "peak_tflops"):
        v = hw.get(key)
        if isinstance(v, int | float) and v > 0:
            return float(v) * 1e12
    return None


def minimal_lock(spec: dict | RunSpec, *, hyper: dict | None = None, plan: dict | None = None,
                 stages: list[dict] | None = None, spec_path: str | None = None) -> dict:
    """A lock dict with just what ``TrainJob.from_lock`` reads, for tests and local runs without the compiler.

    hyper defaults: steps = data.tokens / (global_batch_tokens or 8 seqs), warmup 0, cosine, interval 50.
    """
    rs = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(spec)
    t = rs.training
    seq = rs.data.seq_len
    gbt = int(t.global_batch_tokens or 8 * seq)
    lr = t.optimizer.lr or 3e-4
    h = {"lr": lr, "min_lr": lr * t.schedule.min_lr_ratio, "warmup_steps": t.schedule.warmup_steps or 0,
         "steps": t.steps or max(1, math.ceil(rs.data.tokens / gbt)), "global_batch_tokens": gbt,
         "global_batch_seqs": max(1, gbt // seq), "seq_len": seq, "schedule": t.schedule.kind,
         "checkpoint_interval": t.checkpoint.interval_steps or 50, "checkpoint_async": False}
    h.update(hyper or {})
    p = {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 1, "ep": 1,
         "micro_batch": h["global_batch_seqs"], "grad_accum": 1, "activation_checkpointing": "none"}
    p.update(plan or {})
    return {"spec": {"path": spec_path, "name": rs.name, "resolved": rs.model_dump(mode="json")},
            "hyper": h, "plan": p, "stages": stages or [], "compute": {}, "hardware": None}
