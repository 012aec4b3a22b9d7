"""``TrainJob``: everything a trainer needs for one stage, read from ``plan.lock.json`` or built by hand.

``TrainJob.from_lock(lock, stage)`` reads the stage's ``lock["stages"]`` entry, where the compiler
wrote every resolved number once (seq_len, steps, lr, min_lr, warmup_steps, schedule,
decay_fraction, micro_batch, grad_accum, global_batch_seqs, checkpoint_interval, hyper, lora,
long_context), the parallel layout from ``lock["plan"]`` (pre-training; continued training runs its own stage
layout, ``llmc.spec.schema.CONTINUED_KINDS``), the model and data from
``lock["spec"]["resolved"]``, the weights' initialisation from ``lock["model"]["init"]`` and the device peak from
``lock["hardware"]``. Nothing is recomputed.
Tests construct ``TrainJob(...)`` directly or read a compiled lock. Users: ``llmc.runtime.train``
(native trainer), ``posttrain`` (sft/dpo/grpo: ``job.stage_plan`` is the stage's lock entry,
``job.stage_spec`` the Stage) and ``ds_train``. ``lr_factor`` is the one LR schedule of every loop
(``llmc.lr_schedule``'s: torchtitan's formula, which the plan quotes).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmc.lr_schedule import lr_factor  # the one LR schedule (torchtitan's), shared with the plan
from llmc.spec.model import Architecture, RopeScaling
from llmc.spec.schema import (
    AC_MODES,
    CONTINUED_KINDS,
    LM_KINDS,
    POSTTRAIN_KINDS,
    RECORD_SOURCE_KINDS,
    LossSpike,
    Optimizer,
    RunSpec,
    Source,
    Stage,
)
from llmc.spec.schema import Tokenizer as TokenizerSpec
from llmc.weight_init import InitScheme, init_scheme

# Stage kinds the native trainer runs (packed next-token loss); the post-training loops run POSTTRAIN_KINDS.
NATIVE_KINDS = LM_KINDS


#: the ways out of a resume refused for a changed setting (:meth:`TrainJob.schedule_change`,
#: :func:`llmc.runtime.data.position_change`)
REDO_HINT = "`llmc launch --no-resume` starts the stage over (the earlier run set aside), or rebuild with the old values"


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
    # which parameters weight_decay leaves out (spec training.optimizer.no_decay; llmc.runtime.model.param_groups)
    no_decay: str = "embeddings_and_1d"
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
    activation_checkpointing: str = "none"  # none | selective | full | partial (see check_ac)
    ac_layers: int = 0  # partial only: blocks recomputed whole, counted from the first; 0 otherwise
    # FSDP2 (dp_shard > 1): 3 reshards the parameters after each block's forward; 1 / 2 keep them gathered from the
    # forward to the backward (the plan's memory and time model ZeRO-1/2 so: backends.py _FSDP2_STATES)
    zero_stage: int = 3
    loss_chunk: int = 0  # tokens per slice of the loss (model.token_losses); 0 = the whole micro-batch at once
    sampling_groups: int | None = None  # GRPO: groups sampled in one batch (grpo.sample_groups); None = all at once
    meta_init: bool | None = None  # build on meta, shard, then init (FSDP/TP only); None = auto (> 2B params)
    # the initialisation of weights trained from scratch (the lock's model.init); None: llmc.weight_init's scheme of
    # arch (a job built by hand)
    init: InitScheme | None = None
    # checkpoints and robustness
    checkpoint_interval: int = 100
    checkpoint_async: bool = False  # the plan's choice (lock hyper.checkpoint_async: spec async_mode, None = by size)
    keep_latest: int = 3
    checkpoint_folder: str = "checkpoints"
    loss_spike: LossSpike = field(default_factory=LossSpike)
    # stage graph
    init_from: str | None = None  # stage whose final checkpoint initialises this one
    stage_spec: Stage | None = None
    stage_plan: dict | None = None  # the compiler's lock["stages"] entry (hyper, lora, ...)
    # provenance / extras
    spec_dir: str = "."  # relative source paths resolve against this (the spec file's folder)
    flops_per_token: float | None = None  # compiler's training FLOPs/token (fwd+bwd); None: no FLOP/s, no MFU logged
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

    def foreign_checkpoint(self, saved: Any, path: Path) -> str | None:
        """Why the checkpoint at ``path`` (the stage / kind it recorded: ``saved``, its ``train.json`` or DeepSpeed
        client state) cannot continue this stage: another stage (or stage kind) wrote it, e.g. a run pointed at
        another stage's output folder. None when it can. A checkpoint of the same stage under an edited spec is not
        refused for that alone (a spec hash changes with any edit, a comment or a hardware count, and a layout change
        is meant to resume): what must match is checked where it matters, the model's tensor shapes
        (:func:`llmc.runtime.checkpoint.check_shapes`) and the optimizer / LR schedule (:meth:`schedule_change`)."""
        if not isinstance(saved, dict):
            return None
        theirs = (saved.get("stage"), saved.get("kind", self.kind))
        if theirs[0] is not None and theirs != (self.stage, self.kind):
            return (f"checkpoint {path}: written by stage {theirs[0]!r} (kind {theirs[1]}), not by this stage "
                    f"{self.stage!r} (kind {self.kind}); refusing to resume from it: give this stage its own output "
                    f"folder, or move {path.parent} aside to start it over")
        return None

    def finished_result(self, done: Path) -> dict:
        """The result a finished run of this stage left in ``done`` (its ``DONE.json``); ValueError (one line) when
        another stage finished in that folder: its result is not this stage's."""
        import json

        res = json.loads(done.read_text())
        if isinstance(res, dict) and res.get("stage") not in (None, self.stage):
            raise ValueError(f"{done}: stage {res['stage']!r} finished in this folder, not stage {self.stage!r}; "
                             f"give this stage its own output folder (--out)")
        return res

    @property
    def spec_sha256(self) -> str | None:
        """The sha256 of the spec the lock was built from (``lock["spec"]["sha256"]``), recorded in checkpoints."""
        return ((self.lock or {}).get("spec") or {}).get("sha256")

    @property
    def loss_note(self) -> str:
        """``, loss in slices of N tokens`` for the trainers' start-up line when the loss is sliced; else empty."""
        return f", loss in slices of {self.loss_chunk} tokens" if self.loss_chunk else ""

    @property
    def reshards(self) -> bool:
        """FSDP2 reshards the parameters after each block's forward: every plan but ZeRO-1/2 (a compiled plan with a
        shard group is ZeRO-1, 2 or 3)."""
        return self.zero_stage not in (1, 2)

    @property
    def shard_note(self) -> str:
        """How FSDP2 holds the parameters, for the start-up line (empty without sharding)."""
        if self.dp_shard <= 1:
            return ""
        if self.reshards:
            return ", FSDP2 resharding after forward (ZeRO-3)"
        return f", FSDP2 keeping parameters gathered from forward to backward (ZeRO-{self.zero_stage})"

    @property
    def global_batch_seqs(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.seq_len

    def check_runner(self, runner: str) -> None:
        """Refuse, on llmc's ``runner`` (native / DeepSpeed), a continued-training stage planned as its own torchtitan
        job: the plan sized and timed it on a layout (TP / PP / CP) only that job runs."""
        layout = (self.stage_plan or {}).get("layout") if self.kind in CONTINUED_KINDS else None
        if layout:
            degrees = " ".join(f"{k}={layout[k]}" for k in ("tp", "pp", "cp", "dp_shard", "dp_replicate")
                               if layout.get(k, 1) != 1) or "data parallel"
            raise ValueError(f"stage {self.stage!r} was planned as its own torchtitan job ({degrees}); the {runner} "
                             "trainer does not run that layout: launch with `llmc launch --backend torchtitan`, or "
                             "build with training.backend native or deepspeed to plan it for llmc's trainers")

    def replace(self, **kw: Any) -> TrainJob:
        return replace(self, **kw)

    def resolve_path(self, p: str) -> Path:
        """A spec path on this machine: ``~`` is this machine's home (as the torchtitan job expands it); relative
        is relative to the spec's folder."""
        from llmc.fileio import expand_user

        q = expand_user(p)
        return q if q.is_absolute() else Path(self.spec_dir) / q

    @property
    def lr_schedule(self) -> dict:
        """What a checkpoint records of the LR schedule and optimizer it was trained with: a resume under a lock
        that changed one would carry on with the checkpoint's (the scheduler's and optimizer's saved state win),
        so :meth:`schedule_change` refuses it. A changed ``steps`` resumes when the LR at the resumed step stays
        (a longer constant or wsd run in its stable phase)."""
        return {"lr": self.lr, "min_lr": self.min_lr, "warmup_steps": self.warmup_steps, "schedule": self.schedule,
                "decay_fraction": self.decay_fraction, "weight_decay": self.weight_decay, "betas": list(self.betas),
                "eps": self.eps, "steps": self.steps, "no_decay": self.no_decay}

    def schedule_change(self, saved: dict | None, checkpoint: str, step: int, redo: str | None = None) -> str | None:
        """Why the checkpoint named ``checkpoint`` (optimizer step ``step``), trained with the ``saved``
        :attr:`lr_schedule`, cannot be resumed under this job's; None when it can (nothing recorded, or the same
        schedule and optimizer; keys an older llmc did not record are not compared, but ``no_decay``, of which it had
        only the default rule). ``redo``: the ways out it ends with (``llmc launch``'s own, with its build directory
        and options; default: the trainer's)."""
        saved = saved if isinstance(saved, dict) else {}
        if saved and "no_decay" not in saved:  # an llmc before the key had only today's default rule
            saved = {**saved, "no_decay": Optimizer.model_fields["no_decay"].default}
        now = self.lr_schedule
        changed = [k for k, v in saved.items() if k in now and k != "steps" and v != now[k]]
        redo = redo or REDO_HINT
        if changed:
            def show(d: dict) -> str:
                return ", ".join(f"{k} {d[k]:g}" if isinstance(d[k], float) else f"{k} {d[k]}" for k in changed)

            return f"checkpoint {checkpoint} was trained with {show(saved)}, the lock says {show(now)}: {redo}"
        old_steps = saved.get("steps")
        if isinstance(old_steps, int) and not isinstance(old_steps, bool) and old_steps > 0 and old_steps != self.steps:
            jump = self.steps_change(old_steps, step)
            if jump is not None:
                return (f"checkpoint {checkpoint} (step {step}) was trained for {old_steps} steps, the lock says "
                        f"{self.steps}: {jump}; {redo}")
        return None

    def steps_change(self, old_steps: int, step: int) -> str | None:
        """Why a run planned for ``old_steps`` steps cannot go on from optimizer step ``step`` under this job's
        ``steps`` (the rest of its schedule the same): ``"the cosine schedule's LR at step 22 would jump from 0.5128
        to 0.7608 x peak"``; None when the LR at ``step`` stays (a constant schedule, WSD before its decay, ...). Every
        resuming trainer restores the step and recomputes the LR from this job's schedule (llmc's and torchtitan's
        LambdaLR alike: torchtitan 0.3.0's ``LRSchedulersContainer.load_state_dict`` restores only ``last_epoch``)."""
        was, now_f = replace(self, steps=old_steps).lr_factor(step), self.lr_factor(step)
        if abs(was - now_f) > 1e-9 * max(1.0, abs(was)):
            return (f"the {self.schedule} schedule's LR at step {step} would jump from {was:.4g} to {now_f:.4g} "
                    "x peak")
        return None

    def lr_factor(self, step: int) -> float:
        """LR / peak LR of optimizer step ``step`` under this job's schedule (see ``lr_factor``)."""
        return lr_factor(step, steps=self.steps, warmup_steps=self.warmup_steps, schedule=self.schedule,
                         min_ratio=self.min_lr / self.lr if self.lr else 0.0, decay_fraction=self.decay_fraction)

    # ------------------------------------------------------------------ from the lockfile
    @classmethod
    def from_lock(cls, lock: dict, stage: str | None = None, build_dir: str | Path | None = None,
                  world: int | None = None) -> TrainJob:
        """The job of ``stage`` (None: the pre-training stage, else the first stage), read from its
        ``lock["stages"]`` entry; raises ValueError naming a missing key or stage. ``build_dir`` (the
        lock's folder) anchors relative data/tokenizer paths: they resolve against
        ``build_dir / lock["spec"]["dir_from_build"]``, the spec's folder, wherever the job runs from. ``world``: the
        processes it runs on (a continued-training stage's data parallelism follows them; None: ``WORLD_SIZE``, the
        trainer's own)."""
        spec = RunSpec.model_validate(lock["spec"]["resolved"])
        entry = stage_entry(lock, stage)
        t = spec.training
        spec_path = lock["spec"].get("path")
        plan = lock.get("plan") or {}
        num = _Numbers(entry)
        ac_mode, ac_layers = plan.get("activation_checkpointing", "none"), plan.get("ac_layers", 0)
        try:
            check_ac(ac_mode, ac_layers)
        except ValueError as e:
            raise ValueError(f"lock: plan: {e} (rebuild with `llmc build`)") from None
        job = cls(
            arch=spec.model, sources=list(spec.data.sources), seq_len=int(num["seq_len"]), steps=int(num["steps"]),
            name=spec.name, stage=str(entry["name"]), kind=str(entry["kind"]), tokenizer=spec.data.tokenizer,
            lr=float(num["lr"]), min_lr=float(num["min_lr"]), warmup_steps=int(num["warmup_steps"]),
            schedule=str(num["schedule"]), decay_fraction=float(num["decay_fraction"]),
            betas=tuple(t.optimizer.betas), eps=t.optimizer.eps, weight_decay=t.optimizer.weight_decay,
            no_decay=t.optimizer.no_decay, grad_clip=t.grad_clip, z_loss=t.z_loss, precision=t.precision, seed=t.seed,
            log_every=t.log_every,
            micro_batch=int(num["micro_batch"]), grad_accum=int(num["grad_accum"]),
            dp_replicate=int(plan.get("dp_replicate", 1)), dp_shard=int(plan.get("dp_shard", 1)),
            tp=int(plan.get("tp", 1)), pp=int(plan.get("pp", 1)), cp=int(plan.get("cp", 1)), ep=int(plan.get("ep", 1)),
            activation_checkpointing=ac_mode, ac_layers=ac_layers, zero_stage=int(plan.get("zero_stage", 3)),
            loss_chunk=int(plan.get("loss_chunk_tokens") or 0),
            checkpoint_interval=int(num["checkpoint_interval"]),
            checkpoint_async=bool(entry.get("checkpoint_async", t.checkpoint.async_mode)),
            keep_latest=t.checkpoint.keep_latest, checkpoint_folder=t.checkpoint.folder, loss_spike=t.loss_spike,
            spec_dir=_spec_dir(lock["spec"], spec_path, build_dir),
            flops_per_token=(lock.get("compute") or {}).get("flops_per_token"),
            peak_flops=peak_flops(lock.get("hardware"), t.precision), spec=spec, lock=lock,
            init=lock_init(lock, spec.model),
        )
        gbs = int(num["global_batch_seqs"])
        world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else int(world)
        layout = entry.get("layout") if job.kind in CONTINUED_KINDS else None
        continued = job.kind in CONTINUED_KINDS and bool(entry.get("memory")) and not layout
        if layout:
            # its own torchtitan job runs it (llmc.emit.torchtitan): the job records that layout (export and eval read
            # the stage's lock entry); llmc's trainers refuse it (check_runner)
            job = replace(job, **{k: int(layout[k]) for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep")})
        elif continued:
            # continued training runs the layout its stage plan sized and timed (llmc.compiler.stages.stage_layout):
            # data parallel over every rank, FSDP2 when the stage memory is sharded, else replicated; no TP, PP or CP,
            # whatever the pre-training plan searched (its PP / CP / EP run in the torchtitan pre-training job only)
            shard = int(entry["memory"].get("shard_degree") or 1) > 1
            job = replace(job, dp_shard=world if shard else 1, dp_replicate=1 if shard else world, tp=1, pp=1, cp=1,
                          ep=1)
        if not plan and (job.global_batch_seqs != gbs if continued else world > 1):
            # No searched layout in the lock (a pipeline without pre-training), started on another number of ranks
            # than its split: shard over every rank that was started (FSDP), one sequence per rank per micro-step.
            job = replace(job, dp_shard=world, dp_replicate=1, micro_batch=1, grad_accum=max(1, math.ceil(gbs / world)))
        elif plan and job.kind not in POSTTRAIN_KINDS and job.global_batch_seqs != gbs and not layout:
            # (post-training splits the stage's batch over every rank it is started on, whatever the plan's dp:
            # llmc.runtime.posttrain; its micro_batch is per forward, its grad_accum the planned count of them)
            dp = job.dp_replicate * job.dp_shard
            where = (f"{world} process(es) are running: launch {gbs // (job.micro_batch * job.grad_accum)}, or "
                     f"rebuild for {world} GPUs" if continued else "rebuild with `llmc build`")
            raise ValueError(f"lock: stage {job.stage!r}: micro_batch {job.micro_batch} x grad_accum {job.grad_accum} "
                             f"x dp {dp} = {job.global_batch_seqs} != its batch of {gbs} sequences ({where})")
        return job._with_stage_spec(spec, entry)

    def _with_stage_spec(self, spec: RunSpec, entry: dict) -> TrainJob:
        """Attach the spec's Stage (data, tokenizer, init_from) and the long-context RoPE change."""
        st = next((s for s in spec.stages if s.name == self.stage), None)
        if st is None:
            return replace(self, init_from=entry.get("init_from"), stage_plan=entry)
        data, arch = st.data, self.arch
        ctx = entry.get("context")  # the RoPE the compiler resolved for this stage (inherited via init_from)
        if ctx:
            scaling = ctx.get("rope_scaling")
            arch = arch.model_copy(update={
                "rope_theta": float(ctx["rope_theta"]),
                "rope_scaling": RopeScaling.model_validate(scaling) if scaling else None,
                # the context the compiler states for the stage's export (older locks: the model's or the stage's)
                "max_seq_len": int(entry.get("max_position_embeddings") or max(arch.max_seq_len, self.seq_len))})
        # a stage other than pre-training recomputes what its own plan sized its memory with (the lock's stage
        # ``memory.activation_checkpointing``); the searched plan's mode is the pre-training run's
        ac, ac_layers = self.activation_checkpointing, self.ac_layers
        stage_ac = (entry.get("memory") or {}).get("activation_checkpointing")
        layout = entry.get("layout") if st.kind in CONTINUED_KINDS else None
        if layout:  # its own torchtitan job's recomputation
            ac, ac_layers = str(layout.get("activation_checkpointing", "none")), int(layout.get("ac_layers", 0))
        elif st.kind != "pretrain" and stage_ac:
            try:
                check_ac(stage_ac, 0)
            except ValueError as e:
                raise ValueError(f"lock: stage {self.stage!r} memory: {e} (rebuild with `llmc build`)") from None
            ac, ac_layers = stage_ac, 0
        # ... computes its loss in the slices its plan sized the logits for (0: whole), and GRPO samples as many groups
        # at once as its plan sized the KV cache memory for (``memory.sampling_groups``)
        mem = entry.get("memory") or {}
        chunk = int(mem.get("loss_chunk_tokens") or 0) if st.kind != "pretrain" else self.loss_chunk
        groups = int(mem["sampling_groups"]) if mem.get("sampling_groups") else None
        return replace(
            self, arch=arch, sources=list(data.sources) if data else list(self.sources),
            tokenizer=(data.tokenizer if data and (data.tokenizer.path or data.tokenizer.train) else self.tokenizer),
            init_from=st.init_from, stage_spec=st, stage_plan=entry, activation_checkpointing=ac, ac_layers=ac_layers,
            loss_chunk=chunk, sampling_groups=groups,
            # a stage's own layout shards like ZeRO-3 when it shards at all (llmc.compiler.stages.stage_layout)
            zero_stage=self.zero_stage if st.kind == "pretrain" else 3,
        )


# Resolved numbers every stage entry of the lock carries (the compiler computes them once).
STAGE_KEYS = ("seq_len", "steps", "lr", "min_lr", "warmup_steps", "schedule", "decay_fraction", "micro_batch",
              "grad_accum", "global_batch_seqs", "checkpoint_interval")


# Activation-checkpointing modes (llmc.spec.schema.AC_MODES; Transformer.set_ac applies them).
# "partial" recomputes the first ac_layers blocks whole and no others: Megatron-LM's --recompute-granularity
# full --recompute-method block --recompute-num-layers K (megatron/core/transformer/transformer_block.py,
# TransformerBlock._checkpointed_forward, recompute_method == "block").


def check_ac(mode: object, layers: object = 0) -> None:
    """Refuse (one-line ValueError) a mode the runtime does not know, or an ``ac_layers`` that does not
    go with it: ``partial`` needs an integer >= 1, every other mode 0."""
    if not isinstance(mode, str) or mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing must be one of {'/'.join(AC_MODES)}, got {mode!r}")
    if isinstance(layers, bool) or not isinstance(layers, int):
        raise ValueError(f"ac_layers must be an integer, got {layers!r}")
    if mode == "partial" and layers < 1:
        raise ValueError(f"activation_checkpointing 'partial' needs ac_layers >= 1, got {layers}")
    if mode != "partial" and layers != 0:
        raise ValueError(f"ac_layers is for activation_checkpointing 'partial' only; {mode!r} needs 0, got {layers}")


class _Numbers:
    """A stage entry's resolved numbers; a missing one is a one-line ValueError."""

    def __init__(self, entry: dict):
        self.entry = entry

    def __getitem__(self, key: str) -> Any:
        v = self.entry.get(key)
        if v is None:
            raise ValueError(f"lock: stage {self.entry.get('name')!r} has no {key!r} (rebuild with `llmc build`)")
        return v


def lock_init(lock: dict, arch: Architecture) -> InitScheme:
    """The initialisation the lock records (``model.init``, written by the compiler: llmc.weight_init) for its model
    ``arch``; ValueError with a one-line reason naming the field when it is malformed. A lock written before llmc
    recorded it (no ``model.init``) takes ``arch``'s scheme (:func:`llmc.weight_init.init_scheme`): the numbers llmc's
    runtime drew then, as an older lock without ``training.optimizer.no_decay`` takes the rule it trained with."""
    init = (lock.get("model") or {}).get("init")
    return init_scheme(arch) if init is None else InitScheme.from_json(init)


def stage_entry(lock: dict, stage: str | None) -> dict:
    """The ``lock["stages"]`` entry named ``stage`` (None: the ``pretrain`` stage, else the first one).

    The pre-training entry's numbers equal ``lock["hyper"]`` and the batch split of ``lock["plan"]``,
    so those fill any key the entry leaves out.
    """
    entries = [e for e in lock.get("stages") or [] if isinstance(e, dict)]
    if not entries:
        raise ValueError("lock: no stages (rebuild with `llmc build`)")
    if stage is None:
        entry = next((e for e in entries if e.get("name") == "pretrain"), entries[0])
    else:
        entry = next((e for e in entries if e.get("name") == stage), None)
        if entry is None:
            names = ", ".join(str(e.get("name")) for e in entries)
            raise ValueError(f"no stage named {stage!r} in the lock (stages: {names})")
    if entry.get("kind") == "pretrain":
        plan = lock.get("plan") or {}
        batch = {k: plan[k] for k in ("micro_batch", "grad_accum") if k in plan}
        entry = {**(lock.get("hyper") or {}), **batch, **{k: v for k, v in entry.items() if v is not None}}
        entry.setdefault("decay_fraction", lock["spec"]["resolved"]["training"]["schedule"]["decay_fraction"])
    return entry


# Which lock["hardware"] field (dataclasses.asdict of llmc.compiler.hardware.GPU, TFLOP/s) MFU is
# quoted against: the dense BF16 peak for bf16 and fp8 runs (fp8 only runs the linears in fp8), the
# FP32 peak for fp32 runs; the same convention as the compiler's timing model (timing.mfu_peak).
PEAK_FIELD = {"bf16": "bf16_tflops", "fp8": "bf16_tflops", "nvfp4": "bf16_tflops", "fp32": "fp32_tflops"}


def peak_flops(hardware: dict | None, precision: str) -> float | None:
    """Peak FLOP/s per device for MFU, from ``lock["hardware"]``; None when the lock has no hardware row."""
    if not hardware:
        return None
    tf = hardware.get(PEAK_FIELD[precision])
    return float(tf) * 1e12 if tf else None


def _spec_dir(spec: dict, spec_path: str | None, build_dir: str | Path | None) -> str:
    """The spec's folder: ``build_dir / spec.dir_from_build`` (the current directory standing in for an
    unknown build_dir; ``llmc launch`` runs every command there), else the folder of ``spec.path``."""
    rel = spec.get("dir_from_build")
    if rel is not None:
        return str((Path(build_dir) if build_dir is not None else Path.cwd()).joinpath(rel).resolve())
    return str(Path(spec_path).resolve().parent) if spec_path else "."


# ------------------------------------------------------------------ what trained a finished stage
#
# A finished stage's marker (its DONE.json; a torchtitan stage, which writes none, FINGERPRINT_FILE beside its
# Hugging Face export) records a fingerprint of the lock's content that decided the stage's result. A launch compares
# it with the current lock's, so a build directory rebuilt from another spec never passes off the earlier spec's
# finished stages as its own (the way a checkpoint records its LR schedule and data slots, which a resume compares:
# ``TrainJob.schedule_change``, ``llmc.runtime.stream``). It covers the model, the stage's data and tokenizer, the
# stage's training numbers and settings, and what the stage started from (the fingerprint of its ``init_from`` stage,
# or its ``init_hf``); not the layout (micro-batch, parallelism, hardware, checkpoint interval: a relaunch on other
# GPUs trains the same stage), not later stages, serving or eval-only settings, so editing a later stage of a
# pipeline leaves the finished earlier ones valid.

#: the torchtitan stage's record, written when the stage starts (beside ``hf/``, which marks it finished)
FINGERPRINT_FILE = "FINGERPRINT.json"
#: the record's keys: the fingerprint itself (its parts, the numbers shown when they differ) and its sha256 on a line
#: of its own, which the emitted launch scripts read with ``sed``
FINGERPRINT_KEY, FINGERPRINT_SHA = "fingerprint", "fingerprint_sha256"
#: prepare writes the lock's fingerprint of every stage here (``<stage> <sha256>`` lines) for the launch scripts
FINGERPRINTS_TXT = "stage-fingerprints.txt"
#: a copy of the tokenizer a stage trains with, in its folder: set aside or moved with the run, it stays with it
STAGE_TOKENIZER = "tokenizer"

# the lock stage entry's resolved numbers and settings that decide what a stage trains
_SHOWN = ("steps", "seq_len", "global_batch_seqs", "lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")
_RESULT_KEYS = ("kind", "hyper", "lora", "long_context")
# training settings of the spec that decide the result (optimizer lr: the entry's resolved lr)
_TRAINING_KEYS = ("precision", "grad_clip", "z_loss", "seed", "loss_spike", "fp8_recipe")
# the parts besides the numbers (named when they differ)
_PART_NAMES = {"model": "the model", "data": "the data", "tokenizer": "the tokenizer",
               "training": "the training settings", "init": "the run it starts from"}


class StaleStageError(ValueError):
    """A finished stage that was trained under another lock than the current one (one-line message)."""


def _digest(value: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def stage_fingerprint(lock: dict, stage: str | None, _seen: tuple[str, ...] = ()) -> dict | None:
    """The fingerprint of what decides ``stage``'s result under ``lock``: ``{"sha256", "parts": {part: sha256},
    "numbers": {...}}``; None for a lock too malformed to say (a hand-edited one, launched with ``--force``)."""
    try:
        return _fingerprint(lock, stage, _seen)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _is_text(s: dict) -> bool:
    """A text source (chat / preference / prompt records: no held-out split, no tokenizer training)."""
    return s.get("kind") not in RECORD_SOURCE_KINDS


def _stage_data(resolved: dict, name: str) -> dict:
    """The resolved spec's data section that stage ``name`` reads: its own, else the run's."""
    specs = [s for s in resolved.get("stages") or [] if isinstance(s, dict)]
    st = next((s for s in specs if s.get("name") == name), None)
    return (st or {}).get("data") or resolved["data"]


def _stage_tokenizer_spec(resolved: dict, data: dict) -> dict:
    """The tokenizer settings a stage reading ``data`` trains with: its data's, else the run's."""
    tok = data.get("tokenizer") or {}
    return tok if (tok.get("path") or tok.get("train")) else resolved["data"].get("tokenizer") or {}


def _tokenizer_text(resolved: dict) -> list[dict]:
    """The text sources prepare trains a ``tokenizer.train`` tokenizer on: every text source of the run, whichever
    stage reads it (``llmc.runtime.entry.prepare_assets``)."""
    specs = [s for s in resolved.get("stages") or [] if isinstance(s, dict)]
    every = [*(resolved["data"].get("sources") or []),
             *(s for sp in specs for s in ((sp.get("data") or {}).get("sources") or []))]
    return [s for s in every if isinstance(s, dict) and _is_text(s)]


def _fingerprint(lock: dict, stage: str | None, seen: tuple[str, ...]) -> dict | None:
    entry = stage_entry(lock, stage)
    name = str(entry["name"])
    if name in seen:  # (the compiler refuses init_from cycles; a hand-edited lock may hold one)
        raise ValueError(f"init_from cycle through {name!r}")
    resolved = lock["spec"]["resolved"]
    top = resolved["data"]
    data = _stage_data(resolved, name)

    def source(s: dict) -> dict:  # (tokens: a planning hint only)
        return {k: v for k, v in s.items() if k != "tokens"}

    def quality(q: dict | None) -> dict | None:  # (workers, the expected removal: no effect on the cleaned output)
        return {k: v for k, v in q.items() if k not in ("workers", "expected_removal_fraction")} if q else None

    sources = data.get("sources") or []
    val = (resolved.get("eval") or {}).get("validation") if any(map(_is_text, sources)) else None
    parts: dict[str, Any] = {
        "model": {"model": resolved["model"], "context": entry.get("context"),
                  "max_position_embeddings": entry.get("max_position_embeddings")},
        # the held-out validation documents are not trained on
        "data": {"sources": [source(s) for s in sources], "quality": quality(data.get("quality")),
                 "validation": {k: val.get(k) for k in ("fraction", "seed", "files")} if val else None},
    }
    tok = _stage_tokenizer_spec(resolved, data)
    trained_on = None
    if tok.get("train"):  # prepare trains it on every text source of the run, whichever stage reads it
        trained_on = sorted({(s["name"], s.get("path"), s.get("format"), s.get("text_field"))
                             for s in _tokenizer_text(resolved)}, key=str)
        trained_on = {"sources": trained_on, "quality": quality(top.get("quality"))}
    parts["tokenizer"] = {"tokenizer": tok, "trained_on": trained_on}
    t = resolved.get("training") or {}
    # (no_decay at its default left out: the fingerprint of a lock written before llmc had the key, which trained so)
    opt = {k: v for k, v in (t.get("optimizer") or {}).items()
           if k != "lr" and not (k == "no_decay" and v == Optimizer.model_fields["no_decay"].default)}
    numbers = {k: entry.get(k) for k in _SHOWN}  # (kept in the record as they are, to be named when they differ)
    parts["numbers"] = numbers
    parts["training"] = {**{k: entry.get(k) for k in _RESULT_KEYS}, "optimizer": opt,
                         **{k: t.get(k) for k in _TRAINING_KEYS}}
    upstream = entry.get("init_from")
    init = _fingerprint(lock, str(upstream), (*seen, name)) if upstream else None
    if upstream and init is None:
        raise ValueError(f"no fingerprint for {upstream!r}")
    parts["init"] = {"from": upstream, "fingerprint": init["sha256"] if init else None, "hf": entry.get("init_hf")}
    hashed = {k: _digest(v) for k, v in parts.items()}
    return {"sha256": _digest(hashed), "parts": hashed, "numbers": numbers}


def fingerprint_record(lock: dict | None, stage: str | None, build_dir: str | Path | None = None, *,
                       stage_dir: str | Path | None = None, spec_dir: str | Path | None = None,
                       memo: dict | None = None) -> dict:
    """What a stage's marker records of the lock it was trained under (empty without a lock), of the files of
    the ``init_hf`` checkpoint its run started from (:func:`start_checkpoint_files`; ``build_dir``: the lock's
    folder, None: the current directory, where ``llmc launch`` runs every command), of the data it read
    (:data:`DATA_KEY`, :func:`data_files`; ``spec_dir``: the spec's folder, which relative source paths resolve
    against, by default found from ``build_dir``) and of the tokenizer it trained with (:data:`TOKENIZER_KEY`: the
    files of its copy in ``stage_dir``/tokenizer, :func:`tokenizer_files`; none without ``stage_dir`` or a copy).
    With ``stage_dir`` (the record a trainer writes into its finished stage's DONE.json) it also records the software
    that ran it (``llmc.runtime.software.SOFTWARE_KEY``: Python, torch, tokenizers, ... and llmc versions), which no
    staleness check compares: another version does not make a finished stage stale.
    ``memo``: one launch's digests (:func:`source_files_digest`)."""
    fp = stage_fingerprint(lock, stage) if lock else None
    if not fp:
        return {}
    start = start_checkpoint_files(lock, stage, build_dir)
    data = data_files(lock, stage, _record_spec_dir(lock, build_dir, spec_dir), memo)
    tok = tokenizer_files(Path(stage_dir) / STAGE_TOKENIZER) if stage_dir is not None else None
    if stage_dir is not None:
        from llmc.runtime.software import SOFTWARE_KEY, runtime_versions

        ran = {SOFTWARE_KEY: runtime_versions()}
    else:
        ran = {}
    return {FINGERPRINT_KEY: fp, FINGERPRINT_SHA: fp["sha256"], **({START_KEY: start} if start else {}),
            **({DATA_KEY: data} if data is not None else {}), **({TOKENIZER_KEY: tok} if tok else {}), **ran}


def _record_spec_dir(lock: dict, build_dir: str | Path | None, spec_dir: str | Path | None) -> str | None:
    if spec_dir is not None:
        return str(spec_dir)
    try:
        return _spec_dir(lock["spec"], lock["spec"].get("path"), build_dir)
    except (KeyError, TypeError, AttributeError, OSError):
        return None


#: the record's key for the files of the ``init_hf`` checkpoint a stage's run started from
START_KEY = "init_hf_files"
#: the record's key for what the stage's data sources held (:func:`data_files`), and for its tokenizer's files
#: (:func:`tokenizer_files`); a record written before llmc had them is not compared on them (as :data:`START_KEY`)
DATA_KEY, TOKENIZER_KEY = "data_files", "tokenizer_files"


def start_checkpoint(lock: dict, stage: str | None) -> str | None:
    """The ``init_hf`` that ``stage``'s weights come from: its own, else that of the stage it starts from
    (``init_from``, followed back); None when the chain starts from no Hugging Face checkpoint."""
    seen: set[str] = set()
    try:
        entry = stage_entry(lock, stage)
        while entry.get("init_hf") is None and entry.get("init_from") and entry["init_from"] not in seen:
            seen.add(str(entry["init_from"]))
            entry = stage_entry(lock, str(entry["init_from"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    src = entry.get("init_hf")
    return src if isinstance(src, str) and src else None


#: a weight file's sample (:func:`weight_sample`): this many chunks of this many bytes, evenly spread over the file
SAMPLE_CHUNKS, SAMPLE_BYTES = 16, 64 * 1024


def weight_sample(path: Path, size: int) -> str:
    """The sha256 of a weight file's size and :data:`SAMPLE_CHUNKS` chunks of :data:`SAMPLE_BYTES` at evenly spaced
    offsets (first and last included; the whole file when it is smaller): 1 MiB read per file, whatever its size. A
    file rewritten with other weights of the same shapes differs in every chunk; a copy (``cp`` without ``-p``, a
    restore, node-local staging) does not, whatever its modification time."""
    import hashlib

    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_CHUNKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_CHUNKS - 1)
            for i in range(SAMPLE_CHUNKS):
                f.seek(round(i * step))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def checkpoint_files(folder: str | Path) -> dict | None:
    """What identifies a Hugging Face checkpoint folder's contents, cheaply: the sha256 of its config.json and
    model.safetensors.index.json (a few KiB) and of a sample of each weight file (:func:`weight_sample`: the weights
    are tens to hundreds of GB, hashing them whole at every launch would take minutes; a modification time would
    take a plain copy for a change). In a Hugging Face cache snapshot the weight files are links to blobs named by
    their content's sha256 (huggingface_hub's cache layout): that name is recorded instead. None: no folder with a
    config.json here."""
    import hashlib

    d = Path(folder)
    try:
        if not (d / "config.json").is_file():
            return None
        out: dict[str, Any] = {name: hashlib.sha256((d / name).read_bytes()).hexdigest()
                               for name in ("config.json", "model.safetensors.index.json") if (d / name).is_file()}
        weights = {}
        for f in sorted(d.glob("*.safetensors")):
            blob = f.resolve() if f.is_symlink() else None
            if blob is not None and blob.parent.name == "blobs":
                weights[f.name] = blob.name  # a cache blob: its name is its content's sha256
            else:
                size = f.stat().st_size
                weights[f.name] = [size, weight_sample(f, size)]
        out["weights"] = weights
        return out
    except OSError:
        return None


def start_checkpoint_files(lock: dict | None, stage: str | None, build_dir: str | Path | None = None) -> dict | None:
    """``{"init_hf": <as the lock writes it>, "files": checkpoint_files(...)}`` of the checkpoint ``stage``'s weights
    come from (:func:`start_checkpoint`), resolved as the loader resolves it (relative to the spec's folder, else a
    Hub id in this machine's Hugging Face cache); None when there is none or it is not here."""
    src = start_checkpoint(lock, stage) if lock else None
    if src is None:
        return None
    from llmc.fileio import expand_user

    try:
        q = expand_user(src)
        if not q.is_absolute():
            q = Path(_spec_dir(lock["spec"], lock["spec"].get("path"), build_dir)) / q
        if not q.is_dir():
            from llmc.spec.facts import hub_id

            q = None
            if hub_id(src):
                from huggingface_hub import try_to_load_from_cache

                repo, _, rev = src.partition("@")
                got = try_to_load_from_cache(repo, "config.json", revision=rev or None)
                q = Path(got).parent if isinstance(got, str) else None
    except Exception:  # noqa: BLE001 (a malformed lock, no huggingface_hub: nothing recorded, nothing compared)
        return None
    files = checkpoint_files(q) if q is not None else None
    return {"init_hf": src, "files": files} if files else None


def start_change(was: dict, now: dict) -> str | None:
    """What changed in the files of the ``init_hf`` checkpoint between a marker's record (``was``) and now."""
    if was.get("init_hf") != now.get("init_hf") or not isinstance(was.get("files"), dict):
        return None  # (another init_hf is a lock change: the fingerprint says so)
    a, b = was["files"], now["files"]
    if a == b:
        return None
    changed = [k for k in ("config.json", "model.safetensors.index.json") if a.get(k) != b.get(k)]
    wa, wb = a.get("weights") or {}, b.get("weights") or {}
    changed += sorted(f for f in set(wa) | set(wb) if wa.get(f) != wb.get(f))
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"the init_hf checkpoint {now['init_hf']} it was trained from changed since ({shown})"


# ------------------------------------------------------------------ what the data and tokenizer held
#
# The lock names a stage's sources (name, path, format); what the files there hold is not in it, so a finished stage
# also records a digest of its sources' files (DATA_KEY) and of the tokenizer it trained with (TOKENIZER_KEY), and a
# launch compares them with the files now. Pre-training corpora can be terabytes, read again at every launch they
# would cost minutes: a record reads at most CONTENT_DIGEST_MAX_BYTES of its sources' files in all, so a source that
# fits in what is left of that budget (sources taken by name) is identified by its content (sha256 of each file's
# bytes, so a copy or a `touch` that changes only modification times is no change, and a rewrite at the same size and
# time is one), any other by its files' names, sizes and modification times (ns), what make and rsync's default
# "quick check" compare (rsync(1): "files that have changed in size or in last-modified time"; GNU make manual
# 4.3, "Types of Prerequisites": a target is remade when a prerequisite is newer), which costs one stat per file.
# The budget is per record, not per source: a mixture of forty sources just under it would otherwise be read whole
# (forty times the budget) at every launch, build and export, and in every stage's process.

#: the bytes of a stage's sources a record reads in all (:func:`data_files`): sources taken in name order, each that
#: fits in what is left is identified by its content's sha256 (post-training jsonl, a small corpus: a few hundred MiB
#: hash in about a second), the others by name, size and mtime_ns per file
CONTENT_DIGEST_MAX_BYTES = 256 * 2**20


def source_files_digest(path: Path, fmt: str, memo: dict | None = None, budget: int | None = None) -> dict | None:
    """What a source's files hold: ``{"files", "bytes", "listing", "content"}``: their count and total size, the sha256
    of each file's name (relative to the source's folder), size and mtime_ns, and, when they hold at most ``budget``
    bytes (default :data:`CONTENT_DIGEST_MAX_BYTES`; :func:`data_files` gives what is left of a record's), the sha256
    of their names and bytes (None above it: not read). The files are
    those the stage reads (:func:`llmc.sources.expand_paths`; every file of a ``save_to_disk`` folder). None when
    there are none to read now (not compared: prepare says what is missing). ``memo`` (one launch's): content
    digests by listing, so a source several finished stages record is read once."""
    import glob as globmod
    import hashlib

    from llmc.fileio import sha256_file
    from llmc.sources import expand_paths, is_hf_saved

    try:
        hf = is_hf_saved(path)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if hf else expand_paths(path, fmt)
        stats = [(f, f.stat()) for f in files]
    except (OSError, ValueError):
        return None
    if not stats:
        return None
    base = path if path.is_dir() else path.parent if path.is_file() else Path(
        next((str(q) for q in [path, *path.parents] if not globmod.has_magic(str(q))), "/"))

    def rel(f: Path) -> str:
        try:
            return f.relative_to(base).as_posix()
        except ValueError:
            return str(f)

    listing = hashlib.sha256()
    for f, st in stats:
        listing.update(f"{rel(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    total = sum(st.st_size for _, st in stats)
    out: dict[str, Any] = {"files": len(stats), "bytes": total, "listing": listing.hexdigest(), "content": None}
    if total <= (CONTENT_DIGEST_MAX_BYTES if budget is None else budget):
        key = (str(path), out["listing"])
        if memo is not None and key in memo:
            out["content"] = memo[key]
        else:
            h = hashlib.sha256()
            try:
                for f, _ in stats:
                    h.update(f"{rel(f)}\0{sha256_file(f)}\n".encode())
            except OSError:
                return None
            out["content"] = h.hexdigest()
            if memo is not None:
                memo[key] = out["content"]
    return out


def stage_data_sources(lock: dict, stage: str | None) -> dict[str, tuple[dict, str]]:
    """The sources whose files decided ``stage``'s result, by name: (the resolved spec's source, why: "" for the
    stage's own, else the stage of its ``init_from`` chain that read it). A stage that starts from another carries
    what that one read: a change there makes both stale. Not the text a ``tokenizer.train`` tokenizer is trained on
    (every text source of the run, later stages' too, of which prepare reads only the first
    ``llmc.runtime.entry.MAX_TOKENIZER_TRAIN_CHARS``): what that text decides is the tokenizer, which the record
    holds whole (:data:`TOKENIZER_KEY`), so an edit of a later stage's corpus that leaves the tokenizer as it was
    leaves the finished stages valid."""
    resolved = lock["spec"]["resolved"]
    out: dict[str, tuple[dict, str]] = {}
    entry, seen = stage_entry(lock, stage), set()
    own = str(entry["name"])
    while str(entry["name"]) not in seen:
        name = str(entry["name"])
        seen.add(name)
        for s in _stage_data(resolved, name).get("sources") or []:
            if isinstance(s, dict) and s.get("name"):
                out.setdefault(str(s["name"]), (s, "" if name == own else f"read by stage {name!r}, which it starts "
                                                                            "from"))
        if not entry.get("init_from"):
            break
        entry = stage_entry(lock, str(entry["init_from"]))
    return out


def data_files(lock: dict | None, stage: str | None, spec_dir: str | None, memo: dict | None = None) -> dict | None:
    """``{source name: digest}`` of the sources :func:`stage_data_sources` names, as they are now: a file source's
    :func:`source_files_digest`, its content read only while the record's budget lasts (:data:`CONTENT_DIGEST_MAX_BYTES`
    of the sources' bytes in all, spent in name order: whatever their number, one record reads no more); a builtin
    corpus's ``{"builtin": name, "content": sha256}``, the sha256 llmc's corpus
    cache records beside the corpus prepare copies (:func:`llmc.runtime.corpus.corpus_sha256`: not read again).
    Generated records (a builtin record source) and sources with nothing to read now are left out. None for a lock
    too malformed to say."""
    if not lock:
        return None
    try:
        sources = stage_data_sources(lock, stage)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    from llmc.fileio import expand_user

    out: dict[str, dict] = {}
    left = CONTENT_DIGEST_MAX_BYTES  # (what the record may still read: a source that does not fit is stat'ed only)
    for name, (s, _) in sorted(sources.items()):
        fmt = str(s.get("format") or "jsonl")
        if fmt == "builtin":
            if s.get("kind") in RECORD_SOURCE_KINDS:
                continue  # (records generated from the lock's numbers: llmc.runtime.synthetic)
            from llmc.runtime.corpus import corpus_sha256

            key = ("builtin", name)
            if memo is not None and key in memo:
                sha = memo[key]
            else:
                sha = corpus_sha256(name)
                if memo is not None:
                    memo[key] = sha
            if sha:
                out[name] = {"builtin": name, "content": sha}
            continue
        if not s.get("path") or spec_dir is None:
            continue
        p = expand_user(str(s["path"]))
        p = p if p.is_absolute() else Path(spec_dir) / p
        got = source_files_digest(p, fmt, memo, left)
        if got is not None:
            out[name] = {"path": str(p), **got}
            if got["content"] is not None:
                left -= got["bytes"]
    return out


def data_change(was: dict, now: dict, why: dict[str, tuple[dict, str]]) -> str | None:
    """What changed in the files of the sources a marker recorded (``was``: its :data:`DATA_KEY`) and now
    (:func:`data_files`): the first source that changed, and how (file count, size, content, modification time);
    None when none did. A source recorded but not readable now, or not in the lock now (a lock change: the
    fingerprint names it), is not compared."""
    said = []
    for name in sorted(was):
        a, b = was[name], now.get(name)
        if not isinstance(a, dict) or not isinstance(b, dict) or a == b:
            continue
        if "builtin" in a or "builtin" in b:
            if a.get("content") == b.get("content"):
                continue
            how = "the builtin corpus prepare writes holds other documents (another Python's standard library)"
        else:
            how = _files_change(a, b)
            if how is None:
                continue
        role = why.get(name, ({}, ""))[1]
        where = "; ".join(x for x in (b.get("path"), role) if x)
        said.append(f"data source {name!r}{f' ({where})' if where else ''} changed since it finished: {how}")
    if not said:
        return None
    return said[0] + (f" (and {len(said) - 1} more source(s))" if len(said) > 1 else "")


def _files_change(a: dict, b: dict) -> str | None:
    parts = []
    if a.get("files") != b.get("files"):
        parts.append(f"{a.get('files')} -> {b.get('files')} files")
    if a.get("bytes") != b.get("bytes"):
        parts.append(f"size {a.get('bytes'):,} -> {b.get('bytes'):,} bytes")
    ca, cb = a.get("content"), b.get("content")
    if ca is not None and cb is not None:  # (both read: the content decides, not the modification times)
        if ca != cb and not parts:
            parts.append(f"its content (sha256 {ca[:12]} -> {cb[:12]}), at the same size")
        elif ca != cb:
            parts.append(f"content sha256 {ca[:12]} -> {cb[:12]}")
        return "; ".join(parts) or None
    if not parts and a.get("listing") != b.get("listing"):
        parts.append(f"modification time (or file names) of its files, at the same size (past the "
                     f"{CONTENT_DIGEST_MAX_BYTES // 2**20} MiB a stage's record reads of its sources in all, a source "
                     "is compared by its files' names, sizes and modification times, not read)")
    return "; ".join(parts) or None


def tokenizer_files(folder: str | Path) -> dict | None:
    """``{file: sha256}`` of the tokenizer files (``llmc.runtime.tokenizer.TOKENIZER_FILES``) in ``folder``: prepare's
    ``assets/``, or a stage's copy of the tokenizer it trains with; None without a tokenizer.json there."""
    from llmc.fileio import sha256_file
    from llmc.runtime.tokenizer import TOKENIZER_FILES

    d = Path(folder)
    try:
        if not (d / "tokenizer.json").is_file():
            return None
        return {name: sha256_file(d / name) for name in TOKENIZER_FILES if (d / name).is_file()}
    except OSError:
        return None


def tokenizer_change(was: dict, now: dict, asset_dir: Path) -> str | None:
    """What differs between the tokenizer a stage trained with (``was``: its record's :data:`TOKENIZER_KEY`) and
    prepare's now in ``asset_dir`` (``now``); None when they are the same files."""
    if was == now:
        return None
    changed = sorted(n for n in set(was) | set(now) if was.get(n) != now.get(n))
    return (f"the tokenizer prepare holds now ({asset_dir}: {', '.join(changed)} differ) is not the one it trained "
            "with (prepare trained or copied another: its training text or data.tokenizer.path changed)")


def _fp_part(fp: dict, key: str) -> dict:
    """A fingerprint's ``parts`` / ``numbers`` (a record read from a file: {} where it is not a mapping, so a damaged
    record reads as one of the sha256 alone)."""
    v = fp.get(key)
    return v if isinstance(v, dict) else {}


def fingerprint_change(was: dict, now: dict, chosen: Collection[str] = (), pins: Collection[str] = ()) -> str | None:
    """What differs between the fingerprint ``was`` (a marker's) and ``now`` (the lock's): the numbers by name and
    value (``steps 30 -> 20``), the other parts by name; None when they are the same. ``chosen``: the numbers llmc
    chose for the stage (:func:`chosen_numbers`); ``pins`` (:func:`default_pins`): when given, llmc's defaults are
    all that differs, and each of them is said to be llmc's default that changed."""
    if was.get("sha256") == now.get("sha256"):
        return None
    if not _fp_part(was, "parts"):  # (a record of the sha256 alone: an older llmc's launch scripts wrote one)
        return f"its fingerprint {str(was.get('sha256'))[:12]} is not this lock's {str(now.get('sha256'))[:12]}"

    def show(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    def said(k: str) -> str:  # (a default that differs beside a spec change may follow from it: not said)
        text = f"{k} {show(a.get(k))} -> {show(b.get(k))}"
        return text + " (llmc's default changed: the spec does not set it)" if pins and _DEFAULT_NAME.get(k, k) in chosen \
            else text

    a, b = _fp_part(was, "numbers"), _fp_part(now, "numbers")
    numbers = [said(k) for k in _SHOWN if k in a and a.get(k) != b.get(k)]
    pa, pb = _fp_part(was, "parts"), _fp_part(now, "parts")
    named = [_PART_NAMES[k] for k in _PART_NAMES if pa.get(k) != pb.get(k)]
    if numbers and "the training settings" in named:
        named[named.index("the training settings")] = "other training settings"
    text = ", ".join(numbers)
    if named:
        text += ("; " if text else "") + (" and ".join([", ".join(named[:-1]), named[-1]]) if len(named) > 1
                                          else named[0]) + " changed"
    return text or "its fingerprint differs from the lock's"


def steps_only_change(was: dict, now: dict) -> int | None:
    """The ``steps`` of the fingerprint ``was`` (an unfinished run's record) when that is all that differs from ``now``
    (the lock's): the same stage run longer or shorter, which a resume may carry on where the LR at its step stays
    (:meth:`TrainJob.steps_change`); None when anything else differs, or a record of the sha256 alone."""
    pa, pb = _fp_part(was, "parts"), _fp_part(now, "parts")
    if not pa or any(pa.get(k) != pb.get(k) for k in set(pa) | set(pb) if k != "numbers"):
        return None
    a, b = _fp_part(was, "numbers"), _fp_part(now, "numbers")
    if [k for k in _SHOWN if a.get(k) != b.get(k)] != ["steps"] or set(a) != set(b):
        return None
    old = a.get("steps")
    return old if isinstance(old, int) and not isinstance(old, bool) and old > 0 else None


@dataclass(frozen=True)
class TitanLockChange:
    """An unfinished torchtitan run of a stage, started under another lock, whose checkpoints this build's job would
    resume although it cannot: ``what`` changed (:func:`fingerprint_change`, with the LR jump of a steps change),
    the run's ``record`` (its ``FINGERPRINT.json``), its newest complete ``checkpoint`` and that checkpoint's ``step``."""

    what: str
    record: Path
    checkpoint: Path | None
    step: int | None
    #: False: the record cannot be read (``what`` says why), so which lock started the run is unknown
    readable: bool = True


def titan_lock_change(lock: dict | None, stage: str, build_dir: str | Path, stage_dir: str | Path,
                      dump_dir: str | Path, now: dict) -> TitanLockChange | None:
    """Whether the unfinished torchtitan run in ``stage_dir`` (its ``FINGERPRINT.json``, written as it started) with
    checkpoints in ``dump_dir`` is not this lock's to resume (``now``: this lock's :func:`fingerprint_record` of the
    stage). None when it is, or there is no such run. A run whose fingerprint differs only in ``steps`` resumes where
    the LR at its checkpoint's step stays (:meth:`TrainJob.steps_change`, the rule llmc's own trainers apply:
    torchtitan, like them, restores the step and recomputes the LR from the new schedule); one whose LR would jump is
    not. The one judgement of ``llmc launch`` (:func:`llmc.resume.titan_run_change`) and of the emitted launch
    scripts (``python -m llmc.runtime.entry titan-start``)."""
    import json

    f = Path(stage_dir) / FINGERPRINT_FILE
    if not f.is_file():
        return None  # (no record: a run of an llmc before records, or none started)
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError, RecursionError) as e:
        rec, bad = None, type(e).__name__
    else:
        bad = "no fingerprint_sha256 in it"
    was_sha = rec.get(FINGERPRINT_SHA) if isinstance(rec, dict) else None
    if was_sha is not None and was_sha == now.get(FINGERPRINT_SHA):
        return None
    if not any(Path(dump_dir).glob("checkpoint*/step-*")):
        return None  # (nothing to resume: the job starts the stage over, and the record is replaced)
    saved = resume_checkpoint(dump_dir)
    if not isinstance(was_sha, str) or not was_sha:  # a damaged record: which lock started the run is unknown
        return TitanLockChange(f"the record of the lock its unfinished run was started under cannot be read ({bad})",
                               f, saved, checkpoint_step(saved), readable=False)
    was = rec.get(FINGERPRINT_KEY) if isinstance(rec.get(FINGERPRINT_KEY), dict) else {"sha256": was_sha}
    cur = now.get(FINGERPRINT_KEY) if isinstance(now.get(FINGERPRINT_KEY), dict) else \
        {"sha256": now.get(FINGERPRINT_SHA)}
    what = fingerprint_change(was, cur) or "its fingerprint differs from the lock's"
    old_steps = steps_only_change(was, cur)
    step = checkpoint_step(saved)
    if old_steps is not None and step is not None:
        try:
            job = TrainJob.from_lock(lock, stage, Path(build_dir), world=1) if lock is not None else None
        except (KeyError, TypeError, ValueError, AttributeError):
            job = None
        jump = job.steps_change(old_steps, step) if job is not None else "its schedule could not be read"
        if jump is None:
            return None  # a longer (or shorter) run whose LR at the resumed step is the same: it resumes
        what += (f"; {jump}, and a run resumes under another steps only where the LR at its step stays, on every "
                 "backend: a constant schedule, WSD before its decay")
    return TitanLockChange(what, f, saved, step)


def titan_lock_message(stage: str, change: TitanLockChange, dump_dir: str | Path, build: str | Path,
                       options: LaunchOptions | None = None, lock: dict | None = None,
                       assets_root: str | Path | None = None) -> str:
    """The one line that refuses ``change`` (:func:`titan_lock_change`): what changed and the ways out that keep the
    progress (the old values rebuilt; the checkpoint exported, :func:`export_command`) or start over
    (:func:`rerun_way`, with ``options``: the launch's, or a launch script's run directory)."""
    way = rerun_way(build, stage, options, lock, assets_root, aside_too=", with their torchtitan checkpoints")
    keep = f"; or {export_way(build, stage, change.step)}" if change.step is not None else ""
    if not change.readable:
        return (f"stage {stage!r}: {change.what} ({change.record}), and its unfinished run's torchtitan checkpoints "
                f"({dump_dir}) may be another lock's, which this build would resume: {way}{keep}")
    return (f"stage {stage!r} was started under another lock than this build's ({change.what}; {change.record}), "
            f"and torchtitan would resume its checkpoints ({dump_dir}): {way}; "
            f"or rebuild with the values it was started with and finish it{keep}")


def _titan_dp(lock: dict, stage: dict) -> tuple[int, str] | None:
    """The data-parallel size (dp_replicate x dp_shard: torchtitan's "batch" mesh, over which its data loader is
    split) of the torchtitan job that trains ``stage`` (its lock entry), with its degrees in words: a stage's
    own searched layout, else the plan's; None without one."""
    from llmc.runtime.capabilities import titan_own_job

    own = stage.get("layout")
    lay = own if titan_own_job(stage.get("kind"), own) and isinstance(own, dict) else lock.get("plan")
    if not isinstance(lay, dict):
        return None
    try:
        rep, shard = int(lay.get("dp_replicate", 1) or 1), int(lay.get("dp_shard", 1) or 1)
    except (TypeError, ValueError):
        return None
    return rep * shard, f"dp_replicate {rep} x dp_shard {shard}"


def titan_world_change(b: Path, lock: dict, stage: dict, checkpoint: Path, options: LaunchOptions | None = None,
                       assets_root: str | Path | None = None) -> str | None:
    """Why this build's torchtitan job cannot resume ``checkpoint`` (a torchtitan DCP step folder of ``stage``): it was
    saved by another number of data-parallel ranks than this build's layout runs (:func:`llmc.runtime.job.
    titan_data_world`, from its metadata), which torchtitan 0.3.0 cannot load (its data loader's position is one state
    per dp rank, without resharding); one line with the change and the ways out (``options``: the launch's, or a
    launch script's run directory with its ``assets_root``: :func:`rerun_way`), else None. ``llmc launch``
    (:func:`llmc.resume.resumptions`) and the launch scripts (``python -m llmc.runtime.entry titan-start``) ask it."""
    from llmc import TARGET_VERSIONS

    saved = titan_data_world(checkpoint)
    want = _titan_dp(lock, stage)
    if saved is None or want is None or saved == want[0]:
        return None
    step = checkpoint_step(checkpoint)
    name = stage["name"]
    return (f"stage {name!r}: its unfinished torchtitan run's checkpoint {checkpoint} (step {step}) was saved by "
            f"{saved} data-parallel rank(s), and this build runs dp {want[0]} ({want[1]}): dp {saved} -> {want[0]}; "
            f"torchtitan {TARGET_VERSIONS.get('torchtitan', '')} resumes a checkpoint only on the data-parallel size "
            "that saved it (its data loader keeps one position per dp rank and does not reshard them: the load would "
            "fail with \"Missing key in checkpoint state_dict: dataloader.dp_rank_N\"); to keep the progress, rebuild "
            f"for the hardware it was saved on (a layout of dp {saved}, e.g. the earlier hardware.count) and finish the "
            f"stage there, or {export_way(b, name, step)}; or {rerun_way(b, name, options, lock, assets_root)}")


def write_titan_record(stage_dir: str | Path, stage: str, record: dict) -> None:
    """A torchtitan stage's ``FINGERPRINT.json`` as it starts (torchtitan writes no DONE.json): ``record`` (the
    :func:`fingerprint_record` of the lock that trains it) with the files of the tokenizer it trains with (its copy
    in ``stage_dir/tokenizer``, as llmc's trainers record theirs), written atomically; ``llmc launch`` and the
    launch scripts (``python -m llmc.runtime.entry titan-start``) both write it here."""
    import json

    d = Path(stage_dir)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_files(d / STAGE_TOKENIZER)
    tmp = d / f"{FINGERPRINT_FILE}.tmp.{os.uname().nodename}.{os.getpid()}"
    tmp.write_text(json.dumps({"stage": stage, **record, **({TOKENIZER_KEY: tok} if tok else {})}, indent=2) + "\n")
    os.replace(tmp, d / FINGERPRINT_FILE)


#: a number of the fingerprint by the name the lock's ``defaults`` give it (``llmc.compiler.defaults.resolve_hyper``)
_DEFAULT_NAME = {"global_batch_seqs": "global_batch_tokens"}


def chosen_numbers(lock: dict, stage: str | None) -> set[str]:
    """The numbers of ``stage`` that llmc chose, the spec leaving them unset: its lock entry's ``defaults``, and the
    run's schedule defaults (``hyper.defaults``: ``warmup_steps``, ``min_lr``), which every stage's schedule derives
    from (``llmc.compiler.defaults.stage_schedule``). Empty for a lock too malformed to say."""
    try:
        own = set(stage_entry(lock, stage).get("defaults") or [])
        run = set((lock.get("hyper") or {}).get("defaults") or [])
    except (KeyError, TypeError, ValueError, AttributeError):
        return set()
    return own | (run & {"warmup_steps", "min_lr"})


def default_pins(was: dict, now: dict, lock: dict, stage: str | None) -> tuple[str, ...]:
    """When all that differs between the fingerprint ``was`` (a marker's) and ``now`` (the lock's) is numbers llmc
    chose (:func:`chosen_numbers`: a rebuild of an unchanged spec by an llmc whose defaults changed), the spec
    settings, ``path: value``, that pin them to the values the finished run trained with, so that a rebuild keeps
    it valid; () otherwise (something the spec sets changed, or a number no one setting pins)."""
    a, b = was.get("numbers") or {}, now.get("numbers") or {}
    pa, pb = was.get("parts") or {}, now.get("parts") or {}
    if not pa or any(pa.get(k) != pb.get(k) for k in set(pa) | set(pb) if k != "numbers"):
        return ()
    differ = [k for k in _SHOWN if a.get(k) != b.get(k)]
    chosen = chosen_numbers(lock, stage)
    if not differ or any(_DEFAULT_NAME.get(k, k) not in chosen for k in differ):
        return ()
    try:
        entry = stage_entry(lock, stage)
        specs = [st for st in lock["spec"]["resolved"].get("stages") or [] if isinstance(st, dict)]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ()
    # the pre-training run's numbers are the top level's (llmc.compiler.defaults.pretrain_inputs); another stage's
    # its own entry under stages: (llmc.spec.schema.StageBase)
    pre = entry.get("kind") == "pretrain"
    i = next((i for i, st in enumerate(specs) if st.get("name") == entry.get("name")), None)
    if not pre and i is None:
        return ()
    where = {"steps": "training.steps" if pre else f"stages.{i}.steps",
             "lr": "training.optimizer.lr" if pre else f"stages.{i}.lr",
             "global_batch_seqs": "training.global_batch_tokens" if pre else f"stages.{i}.global_batch_tokens"}

    def num(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    pins = []
    for k in differ:
        if k in where:
            v = a[k] * a["seq_len"] if k == "global_batch_seqs" and isinstance(a.get("seq_len"), int) else a[k]
            pins.append(f"{where[k]}: {num(v)}")
        elif k == "warmup_steps" and pre:  # (another stage's warmup derives from the run's: no one setting pins it)
            pins.append(f"training.schedule.warmup_steps: {num(a[k])}")
        elif k == "min_lr" and isinstance(a.get("lr"), (int, float)) and a["lr"] and isinstance(a[k], (int, float)):
            ratio = a[k] / a["lr"]
            if "lr" in differ and b.get("lr") and math.isclose(ratio, (b.get("min_lr") or 0) / b["lr"]):
                continue  # (the lr's pin gives the min_lr back: the ratio is the same)
            pins.append(f"training.schedule.min_lr_ratio: {num(ratio)}")
        else:
            return ()
    return tuple(pins)


@dataclass(frozen=True)
class Finished:
    """A finished stage's folder: ``marker`` (its DONE.json, or a torchtitan stage's FINGERPRINT_FILE, which may be
    missing), ``change`` (what differs from the current lock; None when it was trained under it) and ``legacy``
    (its marker records no fingerprint: written by an older llmc, trusted as before)."""

    marker: Path
    change: str | None
    legacy: bool
    weights: bool = False
    """``change`` is a change of the ``init_hf`` checkpoint's files, not of the lock."""
    cause: str = "lock"
    """What ``change`` is a change of: ``lock``, ``weights`` (the init_hf checkpoint's files), ``data`` (its data
    sources' files, :data:`DATA_KEY`) or ``tokenizer`` (prepare's tokenizer, :data:`TOKENIZER_KEY`)."""
    pins: tuple[str, ...] = ()
    """A lock change that is only llmc's defaults: the spec settings that keep the run valid (:func:`default_pins`)."""
    backend: str | None = None
    """The backend that trained it, where its marker says: ``deepspeed`` (its DONE.json's ``backend``),
    ``torchtitan`` (a :data:`FINGERPRINT_FILE` record); None: llmc's native trainer, or not said."""


#: how a stale stage finished, by :attr:`Finished.cause`, for the lines that refuse it
FINISHED_HOW = {"lock": "under another lock than this build's",
                "weights": "from other weights than its init_hf holds now",
                "data": "from other data than its sources hold now",
                "tokenizer": "with another tokenizer than prepare holds now"}


def finished_stage(lock: dict, stage: str, stage_dir: str | Path, *, export: bool = False,
                   build_dir: str | Path | None = None, asset_dir: str | Path | None = None,
                   memo: dict | None = None) -> Finished | None:
    """Whether the folder ``stage_dir`` holds a finished run of ``stage`` and whether ``lock`` trained it; None when
    it holds none. Finished: a DONE.json, or with ``export`` (a stage a torchtitan job trains, which counts as done
    once exported) ``hf/config.json``, whose record is ``FINGERPRINT_FILE`` beside it. A run trained from an
    ``init_hf`` checkpoint whose files changed since (its record's :data:`START_KEY`, compared with the files now;
    ``build_dir`` anchors a relative path as in :func:`fingerprint_record`) was not trained from these weights: its
    ``change`` says so, as for a lock change (a record without it, or a checkpoint not here now: not compared). So is
    a run whose data sources' files changed since (its record's :data:`DATA_KEY`, compared with :func:`data_files`
    now: its own sources and its ``init_from`` chain's), or whose tokenizer is not the
    one prepare holds now in ``asset_dir`` (default ``build_dir/assets``; its record's :data:`TOKENIZER_KEY`); a
    record without them, an older llmc's, is not compared on them. ``memo``: one launch's digests, shared by its
    calls."""
    import json

    d = Path(stage_dir)
    if (d / "DONE.json").is_file():
        marker = d / "DONE.json"
    elif export and (d / "hf" / "config.json").is_file():
        marker = d / FINGERPRINT_FILE
    else:
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError, RecursionError):
        record = {}
    record = record if isinstance(record, dict) else {}
    was = record.get(FINGERPRINT_KEY)
    if not isinstance(was, dict) and isinstance(record.get(FINGERPRINT_SHA), str):
        was = {"sha256": record[FINGERPRINT_SHA]}
    now = stage_fingerprint(lock, stage)
    if not isinstance(was, dict) or now is None:
        return Finished(marker, None, legacy=now is not None)
    pins = default_pins(was, now, lock, stage)
    change = fingerprint_change(was, now, chosen_numbers(lock, stage), pins)
    by = record.get("backend") if isinstance(record.get("backend"), str) else \
        "torchtitan" if marker.name == FINGERPRINT_FILE else None
    if change is not None:
        return Finished(marker, change, legacy=False, pins=pins, backend=by)
    start = record.get(START_KEY)
    if isinstance(start, dict):
        files = start_checkpoint_files(lock, stage, build_dir)
        change = start_change(start, files) if files else None
        if change is not None:
            return Finished(marker, change, legacy=False, weights=True, cause="weights", backend=by)
    if isinstance(record.get(DATA_KEY), dict):
        try:
            why = stage_data_sources(lock, stage)
        except (KeyError, TypeError, ValueError, AttributeError):
            why = None
        now_files = data_files(lock, stage, _record_spec_dir(lock, build_dir, None), memo) if why is not None else None
        change = data_change(record[DATA_KEY], now_files, why) if now_files is not None else None
        if change is not None:
            return Finished(marker, change, legacy=False, cause="data", backend=by)
    if isinstance(record.get(TOKENIZER_KEY), dict):
        assets = Path(asset_dir) if asset_dir is not None else Path(build_dir if build_dir is not None else ".") / "assets"
        held = tokenizer_files(assets)
        change = tokenizer_change(record[TOKENIZER_KEY], held, assets) if held else None
        if change is not None:
            return Finished(marker, change, legacy=False, cause="tokenizer", backend=by)
    return Finished(marker, None, legacy=False, backend=by)


@dataclass(frozen=True)
class LaunchOptions:
    """What a command that a launch prints (to rerun a stage, to start stages over) carries of that launch, so that it
    runs as the launch ran: ``llmc launch``'s ``--backend``, ``--nproc``, ``--force`` and ``--allow-edited`` as given
    (None / False: not given, the build's default), and ``run_dir``: a launch script's run directory when it is not
    the build's ``run/`` (LLMC_RUN_DIR / RUN_DIR elsewhere), where ``llmc launch`` cannot train (it always writes the
    build's own ``run/`` and ``assets/``): the way out is then the script's, not ``llmc launch``'s."""

    backend: str | None = None
    nproc: int | None = None
    force: bool = False
    allow_edited: bool = False
    run_dir: str | None = None


def trained_options(fin: Finished | None, build: str | Path, lock: dict) -> LaunchOptions:
    """The options of the rerun command printed where no launch is running (``llmc build``'s X013, ``llmc export``'s
    refusal of a stale stage): the backend that trained the stage (its marker's), when it is not the backend ``llmc
    launch`` runs ``build`` on by default (``llmc.launch._launched_backend``; a lock it cannot read: unknown, and the
    marker's is kept), so that the rerun trains it where it was trained. A running launch's own refusals carry that
    launch's options instead (:func:`stage_staleness`'s ``options``)."""
    by = fin.backend if fin is not None else None
    if by is None:
        return LaunchOptions()
    from llmc.launch import LaunchError, _launched_backend

    try:
        default = _launched_backend(Path(build), lock, None)
    except (LaunchError, KeyError, TypeError, ValueError, AttributeError):
        default = None
    return LaunchOptions(backend=by if by != default else None)


def launch_command(build: str | Path, options: LaunchOptions | None = None, *, no_resume: bool = False,
                   stage: str | None = None, from_stage: str | None = None,
                   fallback_checkpoint: bool = False) -> str:
    """The ``llmc launch`` command line with these options, quoted for a shell: the one way every message builds the
    command it tells the user to run (a rerun after a failure, a stale stage's retraining), carrying the launch's own
    ``options`` (:class:`LaunchOptions`), so it runs on the same backend and process count."""
    import shlex

    o = options or LaunchOptions()
    argv = ["llmc", "launch", str(build), *(["--no-resume"] if no_resume else [])]
    for flag, value in (("--stage", stage), ("--from", from_stage), ("--backend", o.backend),
                        ("--nproc", None if o.nproc is None else str(o.nproc))):
        if value is not None:
            argv += [flag, value]
    argv += [flag for flag, on in (("--force", o.force),
                                   ("--allow-edited", o.allow_edited),
                                   ("--fallback-checkpoint", fallback_checkpoint)) if on]
    return shlex.join(argv)


def export_command(build: str | Path, stage: str, step: int | str | None = None) -> str:
    """The ``llmc export BUILD --stage S [--step N]`` command line, quoted for a shell: the way every message tells
    the user to keep a run's progress as a model (its checkpoint of step N) to start a new run from."""
    import shlex

    return shlex.join(["llmc", "export", str(build), "--stage", str(stage),
                       *(["--step", str(step)] if step is not None else [])])


def export_way(build: str | Path, stage: str, step: int | None) -> str:
    """The way out that keeps an unresumable run's progress as a model: its checkpoint exported
    (:func:`export_command`), a new run started from it."""
    return (f"`{export_command(build, stage, step)}` writes that checkpoint as a model to start a new build from "
            "(training.init_hf / stages[].init_hf: its weights, with a fresh optimizer and LR schedule)")


def rerun_command(build: str | Path, stage: str, options: LaunchOptions | None = None) -> str:
    """The command that sets ``stage`` and every stage after it in the run order aside (``run/<stage>.set-aside-N``,
    never deleted) and trains them again: ``llmc launch BUILD --no-resume --from STAGE`` with the launch's own
    ``options`` (:func:`launch_command`)."""
    return launch_command(build, options, no_resume=True, from_stage=str(stage))


def set_aside_shell(run: str | Path, names: list[str], assets_root: str | Path | None = None) -> str | None:
    """A shell command that sets the folders ``run/<name>`` that hold something aside as
    :func:`llmc.fileio.set_aside` would (renamed to ``<folder>.set-aside-N``, the first free N; never deleted), with
    the torchtitan checkpoints of those stages under ``assets_root/outputs`` (``torchtitan`` of pre-training,
    ``torchtitan-<stage>`` of a stage's own job: :func:`llmc.runtime.capabilities.titan_dump_subdir`), which a
    torchtitan job would otherwise resume from; None when there is nothing to move."""
    import shlex

    from llmc.fileio import set_aside_target
    from llmc.runtime.capabilities import titan_dump_subdir

    folders = [Path(run) / n for n in names]
    if assets_root is not None:
        dumps = [Path(assets_root) / "outputs" / titan_dump_subdir(None),
                 *(Path(assets_root) / "outputs" / titan_dump_subdir(n) for n in names)]
        folders += [d for d in dumps if d not in folders]
    moves = []
    for p in folders:
        try:
            target = set_aside_target(p)
        except OSError:
            continue
        if target is None:
            continue
        moves.append(f"mv -- {shlex.quote(str(p))} {shlex.quote(str(target))}")
    return " && ".join(moves) or None


def _stages_from(lock: dict | None, stage: str) -> list[str]:
    """``stage`` and every stage after it in the lock's run order (what ``--from STAGE`` runs)."""
    names = [str(e["name"]) for e in (lock or {}).get("stages") or [] if isinstance(e, dict) and e.get("name")]
    return names[names.index(stage):] if stage in names else [stage]


def rerun_way(build: str | Path, stage: str, options: LaunchOptions | None = None, lock: dict | None = None,
              assets_root: str | Path | None = None, aside_too: str = "") -> str:
    """How the refusal of stale ``stage`` says to train it and the stages after it again, as a command that does so
    when run as printed: ``llmc launch`` with the launch's options (:func:`rerun_command`); for a launch script whose
    run directory is not the build's (``options.run_dir``), where ``llmc launch`` would train fresh in the build's own
    ``run/``, the command that sets them aside there (:func:`set_aside_shell`) and the script run again.
    ``aside_too``: what else goes aside with them, said after "aside" (", with their torchtitan checkpoints")."""
    o = options or LaunchOptions()
    if o.run_dir is None:
        return (f"`{rerun_command(build, stage, o)}` sets it and the stages after it aside{aside_too} "
                "(run/<stage>.set-aside-N) and trains them again")
    move = set_aside_shell(o.run_dir, _stages_from(lock, stage), assets_root)
    aside = f"`{move}` sets it and the stages after it aside{aside_too}" if move else \
        f"set {Path(o.run_dir) / stage} and the stages after it aside{aside_too}"
    other_assets = assets_root is not None and Path(assets_root).resolve() != Path(build).resolve()
    here = f"{o.run_dir}" + (f" with {Path(assets_root) / 'assets'}" if other_assets else "")
    return (f"{aside}, then run the same launch script again (same LLMC_RUN_DIR / RUN_DIR), which trains them again "
            f"(`llmc launch` trains only in the build's own run/ with its own assets/, not in {here})")


def stale_message(stage: str, f: Finished, build: str, options: LaunchOptions | None = None,
                  lock: dict | None = None, assets_root: str | Path | None = None) -> str:
    """The one line that refuses a stage finished under another lock: what changed and the ways out (``options``:
    the launch's, which the command it prints carries: :func:`rerun_way`)."""
    what = FINISHED_HOW.get(f.cause, FINISHED_HOW["lock"])
    pins = (f"; or, if the spec is unchanged, pin {' and '.join(f'`{p}`' for p in f.pins)} in the spec and rebuild: "
            "the finished run stays valid") if f.pins else ""
    return (f"stage {stage!r} finished {what} ({f.marker}): {f.change}; "
            f"it is not this build's result, so it is neither skipped nor trained over: "
            f"{rerun_way(build, stage, options, lock, assets_root)}, or build into a fresh directory{pins}")


def stage_staleness(lock: dict, stage: str, run: str | Path, build_dir: str | Path, *,
                    export: bool = False, memo: dict | None = None, options: LaunchOptions | None = None,
                    asset_dir: str | Path | None = None) -> tuple[Finished | None, str | None]:
    """``(finished, why)`` for ``stage``'s folder ``run/<stage>``: its finished run (:func:`finished_stage`; a DONE.json,
    or with ``export`` a torchtitan stage's ``hf/`` export and its record; None: not finished) and why that run, or
    what it would start from, is not this lock's result (None: nothing is stale): the run finished under another
    lock, from other data, weights or tokenizer (:func:`stale_message`), or a stage of its ``init_from`` chain,
    followed through finished stages, did: a finished stage downstream of a stale one is stale too, whatever its own
    record says (one of an older llmc records no data), and an unfinished one would carry the stale run on as this
    build's. The one check ``llmc launch`` (``llmc.launch.launch_commands``), ``llmc export``
    (``llmc.runtime.export``) and the launch scripts (``python -m llmc.runtime.entry check``) apply; ``memo``: one
    launch's data digests (:func:`finished_stage`); ``options``: the launch's, which the command the refusal prints
    carries (:func:`rerun_way`); ``asset_dir``: where prepare wrote the tokenizer (default ``build_dir/assets``)."""
    run = Path(run)
    d = run / stage
    root = Path(asset_dir).parent if asset_dir is not None else None
    fin = (finished_stage(lock, stage, d, export=True, build_dir=build_dir, asset_dir=asset_dir, memo=memo)
           if export or (d / "DONE.json").is_file() else None)
    if fin is not None and fin.change is not None:
        return fin, stale_message(stage, fin, str(build_dir), options, lock, root)

    def init_from(name: str) -> str | None:
        try:
            up = stage_entry(lock, name).get("init_from")
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        return str(up) if up else None

    seen: set[str] = set()
    up = init_from(stage)
    while up and up not in seen:  # (the compiler refuses init_from cycles; a hand-edited lock may hold one)
        seen.add(up)
        f = finished_stage(lock, up, run / up, export=True, build_dir=build_dir, asset_dir=asset_dir, memo=memo)
        if f is None:
            break  # an unfinished stage stops the stages that start from it anyway
        if f.change is not None:
            return fin, f"stage {stage!r} starts from {stale_message(up, f, str(build_dir), options, lock, root)}"
        up = init_from(up)
    return fin, None


def legacy_message(stage: str, f: Finished) -> str:
    """The warning for a finished stage whose marker records no fingerprint (an older llmc wrote it)."""
    return (f"stage {stage!r} finished without a record of the lock it was trained under ({f.marker}, written by an "
            "older llmc): counted as finished, unchecked (`llmc launch BUILD --no-resume` sets it aside to train it "
            "under this lock)")


def set_stage_aside(stage_dir: str | Path, asset_dir: str | Path) -> Path | None:
    """Set the stage folder aside (:func:`llmc.fileio.set_aside`, ``<stage>.set-aside-N``) with the tokenizer it trained
    with: its own copy (``tokenizer/``), else its export's, else (a run of an older llmc, which kept none) the one
    prepare holds in ``asset_dir`` now, before a new prepare replaces it. Returns the new folder (None when there was
    nothing to set aside)."""
    from llmc.fileio import set_aside

    moved = set_aside(stage_dir)
    if moved is not None and not (moved / STAGE_TOKENIZER).exists() and not (moved / "hf" / "tokenizer.json").is_file():
        keep_tokenizer(asset_dir, moved)
    return moved


def keep_tokenizer(asset_dir: str | Path, stage_dir: str | Path) -> Path | None:
    """Copy the tokenizer files in ``asset_dir`` (prepare's ``assets/``) into ``stage_dir/tokenizer`` unless that
    copy exists: the run keeps the tokenizer it trained with when prepare later writes another (a rebuilt spec) or
    the run is set aside. Returns the copy's folder (None when ``asset_dir`` holds no tokenizer)."""
    import shutil

    from llmc.runtime.tokenizer import TOKENIZER_FILES

    src, dst = Path(asset_dir), Path(stage_dir) / STAGE_TOKENIZER
    if dst.exists() or not (src / "tokenizer.json").is_file():
        return dst if dst.exists() else None
    tmp = dst.with_name(f".{STAGE_TOKENIZER}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, tmp / name)
    try:
        os.rename(tmp, dst)  # (another rank or node made it first: theirs stays)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def renew_stage_tokenizer(asset_dir: str | Path, stage_dir: str | Path, resumes: str | Path | None) -> Path | None:
    """The one rule of every runner (llmc's native and DeepSpeed trainers, and ``llmc launch`` before the torchtitan
    job) for the stage's copy of its tokenizer, ``stage_dir/tokenizer``, before the stage trains: it holds the
    tokenizer prepare holds now in ``asset_dir``, the one the trainer reads, so that what the finished stage records
    (:data:`TOKENIZER_KEY`: the copy's files) is what it trained with. A copy that differs is an earlier attempt's:
    replaced when the run starts over (``resumes`` None: no checkpoint it would resume; or only the files beside
    ``tokenizer.json`` differ, the token ids the checkpoint was trained on are the same), refused (ValueError, one
    line) when the checkpoint ``resumes`` was trained on other token ids. Returns the copy's folder (None when
    ``asset_dir`` holds no tokenizer); a new copy is made as :func:`keep_tokenizer` makes it."""
    import filecmp
    import shutil

    out, src = Path(stage_dir), Path(asset_dir)
    kept = out / STAGE_TOKENIZER
    now = tokenizer_files(src)
    if now is not None and kept.is_dir() and not kept.is_symlink() and tokenizer_files(kept) != now:
        new = src / "tokenizer.json"
        same_ids = (kept / "tokenizer.json").is_file() and filecmp.cmp(kept / "tokenizer.json", new, shallow=False)
        if resumes is not None and not same_ids:
            raise ValueError(f"{out}: its checkpoint {resumes} was trained with the tokenizer in {kept}, and prepare "
                             f"now holds another ({new}): resuming would read the data with the wrong tokens; "
                             "`llmc launch BUILD --no-resume` sets the earlier run aside (with its tokenizer)")
        shutil.rmtree(kept)
    return keep_tokenizer(src, out)


#: a checkpoint step folder's name (llmc's ``step-00000005``, torchtitan's ``step-5``, DeepSpeed's tag ``step-00000005``),
#: matched whole (``fullmatch``: ``step-5.tmp`` is no checkpoint)
STEP_DIR = re.compile(r"step-(\d+)")


def resume_checkpoint(folder: str | os.PathLike | None) -> Path | None:
    """The newest complete checkpoint in a stage's checkpoint folder (``llmc.launch.Cmd.checkpoints``), the one a rerun
    resumes from, without reading it (torch-free): llmc's ``step-N`` with its ``manifest.json`` (written last;
    ``llmc.runtime.checkpoint``), DeepSpeed's tag named by ``latest``, torchtitan's DCP ``checkpoint/step-N`` with
    its ``.metadata`` (written last by torch.distributed.checkpoint's ``finish``). None when there is none."""
    if not folder:
        return None
    d = Path(folder)
    try:
        latest = d / "latest"
        if latest.is_file():  # DeepSpeed (deepspeed/runtime/engine.py save_checkpoint writes the tag last)
            tag = latest.read_text().strip()
            return d / tag if tag and (d / tag).is_dir() else None
        found = [(n, p) for base in (d, *sorted(d.glob("checkpoint*")))
                 for n, p in step_folders(base, lambda p: (p / "manifest.json").is_file() or is_dcp(p)).items()]
    except OSError:
        return None
    return max(found)[1] if found else None


def step_folders(folder: str | os.PathLike, holds: Callable[[Path], bool], *, deep: bool = False) -> dict[int, Path]:
    """step -> the ``step-N`` folder (:data:`STEP_DIR`, matched whole: ``step-5.tmp`` is none) directly in ``folder``
    (``deep``: at any depth, as torchtitan's ``checkpoint/step-N``) for which ``holds(folder)`` says it is complete
    (a manifest.json, DCP's ``.metadata``, DeepSpeed's model states); read from names and ``holds`` alone, no torch. A
    folder that is not there or not readable holds none. Of two folders of one step (``step-10``, ``step-00000010``)
    the first in name order is kept."""
    found: dict[int, Path] = {}
    try:
        for p in sorted(Path(folder).glob("**/step-*") if deep else Path(folder).iterdir()):
            if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir() and holds(p):
                found.setdefault(int(m.group(1)), p)
    except OSError:
        return {}
    return found


def is_dcp(folder: Path) -> bool:
    """Whether ``folder`` is a torch.distributed.checkpoint (DCP) checkpoint, as torchtitan writes: its ``.metadata``
    is there (written last, by ``FileSystemWriter.finish``)."""
    return (folder / ".metadata").is_file()


def checkpoint_step(path: str | os.PathLike | None) -> int | None:
    """The optimizer step a checkpoint folder's name says (``step-N``: :data:`STEP_DIR`); None for another name."""
    m = STEP_DIR.fullmatch(Path(path).name) if path is not None else None
    return int(m.group(1)) if m else None


#: the most bytes of a DCP checkpoint's ``.metadata`` :func:`dcp_state_keys` reads (a 405B model's lists each chunk
#: of every tensor: megabytes, not gigabytes)
DCP_METADATA_MAX_BYTES = 256 * 2**20


def dcp_state_keys(checkpoint: str | os.PathLike) -> set[str] | None:
    """The state-dict keys (``model.layers.0.attention.wq.weight``, ``dataloader.dp_rank_0``, ...) a
    torch.distributed.checkpoint (DCP) checkpoint folder holds, read from its ``.metadata`` without torch and
    without running anything it names: the file is a pickle of DCP's ``Metadata`` (torch/distributed/checkpoint/
    filesystem.py ``FileSystemWriter.finish``: ``pickle.dump``), whose ``state_dict_metadata`` maps each key to its
    storage; every class the pickle names is replaced by an inert stand-in (nothing imported, no code called), so
    only its plain values (the keys) are read. None when there is no such file or it is not DCP's."""
    import io
    import pickle

    class _Inert:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.args = args

        def __setstate__(self, state: Any) -> None:
            self.state = state

    names: dict[tuple[str, str], type] = {}

    class _Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:  # never imports: a stand-in per name
            return names.setdefault((module, name), type(name, (_Inert,), {}))

        def persistent_load(self, pid: Any) -> None:
            return None

    path = Path(checkpoint) / ".metadata"
    try:
        if not path.is_file() or path.stat().st_size > DCP_METADATA_MAX_BYTES:
            return None
        meta = _Reader(io.BytesIO(path.read_bytes())).load()
    except Exception:  # (any malformed pickle: not a checkpoint this reads)
        return None
    state = getattr(meta, "state", None)
    if isinstance(state, tuple) and len(state) == 2:  # (a slotted class's state: (its __dict__ or None, its slots))
        parts = [p for p in state if p is not None]
        state = {k: v for p in parts if isinstance(p, dict) for k, v in p.items()} if all(
            isinstance(p, dict) for p in parts) else None
    keys = state.get("state_dict_metadata") if isinstance(state, dict) else None
    return {k for k in keys if isinstance(k, str)} if isinstance(keys, dict) else None


#: the key of each data-parallel rank's data loader position in a torchtitan checkpoint (torchtitan 0.3.0
#: components/dataloader.py ``ParallelAwareDataloader.state_dict``: ``{"dp_rank_<r>": ..., "world_size": ...}`` under
#: the checkpoint's ``dataloader``)
TITAN_LOADER_KEY = re.compile(r"dataloader\.dp_rank_(\d+)")


def titan_data_world(checkpoint: str | os.PathLike) -> int | None:
    """How many data-parallel ranks saved the data loader positions of the torchtitan checkpoint folder
    ``checkpoint`` (its ``dataloader.dp_rank_<r>`` keys, :func:`dcp_state_keys`); None when it says none (not
    DCP, no data loader state). torchtitan 0.3.0 resumes it only on that many: a rank with no key of its own fails
    the load ("Missing key in checkpoint state_dict: dataloader.dp_rank_1"), and one whose ``world_size`` differs
    fails ``ParallelAwareDataloader.load_state_dict``'s assertion ("dataloader resharding is not supported yet")."""
    keys = dcp_state_keys(checkpoint)
    ranks = {int(m.group(1)) for k in keys or () if (m := TITAN_LOADER_KEY.fullmatch(k))}
    return len(ranks) or None
