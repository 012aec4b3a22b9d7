"""The compiler's output types: every derived number, the chosen plan and the diagnostics.

``Compiled`` is frozen and JSON-serialisable (``to_json``); it is what ``llmc plan`` prints,
what ``plan.lock.json`` records and what the renderers and ``llmc launch`` consume. The per-stage
(:class:`StagePlan`) and per-serving-target (:class:`ServingPlan`) parts are frozen dataclasses
whose attribute names are their JSON keys.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic
from llmc.weight_init import InitScheme

if TYPE_CHECKING:
    from llmc.compiler.evaluation import EvaluationPlan
    from llmc.compiler.hardware import GPU
    from llmc.spec.schema import RunSpec


@dataclass(frozen=True)
class ModelNumbers:
    params_total: int
    params_active: int  # == params_total for dense models
    params_embedding: int  # token embedding + (untied) output head
    breakdown: dict[str, int]  # labelled components, e.g. "embed/tok", "layers/attn/wq" (summed over layers)
    kv_bytes_per_token: int  # bf16 KV cache bytes per token, all layers
    # the weights' initialisation from scratch, on every backend (llmc.weight_init; the lock's model.init, read by
    # llmc's runtime and written into the torchtitan job)
    init: InitScheme


@dataclass(frozen=True)
class ComputeNumbers:
    convention: str  # e.g. "6ND (dense matmuls) + 6*L*s*d_attn attention (causal, PaLM appendix B halved)"
    flops_per_token: float  # training FLOPs per token (fwd+bwd), no recompute
    training_flops: float  # flops_per_token * tokens
    # the tokens the run trains (scaling.trained_tokens): training.steps x the global batch when the steps are pinned,
    # data.tokens otherwise
    tokens: float
    tokens_per_param: float  # tokens / params_active: per ACTIVE parameter (an MoE's total is larger)
    chinchilla_tokens: float  # 20 * params_active (Hoffmann et al. 2022 Approaches 1-2; a dense-model rule for MoE)
    optimal_params: float  # compute-optimal N (active) for C = 6 * params_active * tokens (20 tok/param rule)
    optimal_tokens: float  # compute-optimal D
    # the unique tokens the data declares (the sum of data.sources[].tokens when every source declares them), the
    # compute-optimal D in epochs of them, and whether that is past MAX_EPOCHS (Muennighoff et al. 2023: the advice
    # turns to more epochs, not more parameters); None / False when a source's count is unknown
    unique_tokens: float | None = None
    optimal_epochs: float | None = None
    data_limited: bool = False
    # Hoffmann et al. 2022's Approach-3 constants minimised at this compute (LossFit.optimum): tokens per parameter
    approach3_tokens_per_param: float | None = None
    # predicted final loss (nats/token) under ``loss_fit`` (the Besiroglu et al. 2024 refit of L(N, D)) of the run
    # (N active params, D trained tokens) and at the compute-optimal N, D above; on the fit's data (MassiveText, its
    # tokenizer): for comparing N/D trade-offs, not an absolute prediction. Runs from scratch only (else None)
    loss_fit: str | None = None
    predicted_loss: float | None = None
    optimal_loss: float | None = None


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
    # host (CPU) memory per node that the plan's optimizer offload keeps there (memory.offload_host_bytes_per_node);
    # 0 without offload
    host_bytes_per_node: int = 0


@dataclass(frozen=True)
class CheckpointNumbers:
    """The run's checkpoint saves and the training time they stall (:mod:`llmc.compiler.checkpoint_cost`)."""

    saves: int  # every interval-th step before the last, and the last
    interval: int  # steps between saves (Compiled.hyper.checkpoint_interval)
    mode: str  # "sync" | "async": how the backend's trainer saves
    writer: str  # what is saved and who writes it
    bytes_per_param: float  # state bytes per saved parameter in one checkpoint (one copy; LoRA: per trainable one)
    state_bytes: float  # one checkpoint on storage (deduplicated)
    node_bytes: float  # written by the most loaded node per save
    gpu_bytes: float  # held by the most loaded GPU in its state dict (what an async save stages to host memory)
    write_gbps: float  # GB/s per node to the checkpoint storage
    write_source: str  # where write_gbps comes from
    staging_gbps: float  # GB/s per GPU to host memory (PCIe), for an async save's staging
    write_seconds: float  # node_bytes / write bandwidth: one synchronous save
    hash_seconds: float  # llmc's trainer re-reading and hashing a rank's files per save (0 on other backends)
    stall_seconds: float  # training stall of one save but the last (sync: write + hash; async: staging + wait + hash)
    total_seconds: float  # the run's stalls: (saves - 1) x stall + the last save written (and hashed) in full
    # + final_seconds
    # llmc's DeepSpeed runner, after its last engine save: rank 0 writes and hashes model.pt, the module's 16-bit (fp32
    # runs: 32-bit) weights (0 on other backends)
    final_bytes: float = 0.0
    final_seconds: float = 0.0
    # a preemption's save of the current step (checkpoint_cost, "Preemption"): an asynchronous save in flight waited
    # for (at worst its whole write and hashing), then the current step written and hashed in full, synchronously
    # (+ final_seconds: llmc's DeepSpeed runner writes its model.pt on a preemption too)
    preempt_seconds: float = 0.0
    # what the run keeps on the checkpoint storage (checkpoint_cost, "On disk"): at its peak (disk_bytes: keep_latest
    # checkpoints of state_bytes + the larger of one more and final_bytes + the Hugging Face export, export_bytes) and
    # once finished (kept_bytes: keep_latest checkpoints + final_bytes + the export); 0 where keep_latest is not known
    keep_latest: int = 0
    export_bytes: float = 0.0
    disk_bytes: float = 0.0
    kept_bytes: float = 0.0


@dataclass(frozen=True)
class TimeNumbers:
    step_seconds: float  # one optimizer step (training only: no checkpoint stall)
    mfu: float  # per training step, against the dense peak of ``mfu_peak_dtype`` (timing.mfu_peak)
    days: float  # steps x step_seconds + the checkpoint stalls (``checkpoint.total_seconds``)
    steps: int
    tokens_per_second: float  # per training step
    breakdown: dict[str, float] = field(default_factory=dict)  # compute, dp_comm, tp_comm, pp_bubble, ...
    checkpoint: CheckpointNumbers | None = None  # None: no saves counted (one-step figures, layouts not planned)
    interruptions: InterruptionNumbers | None = None  # expected unexpected interruptions (not in days)
    mfu_peak_dtype: str = ""  # the dtype whose dense peak the MFU divides by (bf16 for fp8 / nvfp4 runs); "" = unknown


@dataclass(frozen=True)
class InterruptionNumbers:
    """What unexpected job interruptions are expected to add to the run (:func:`llmc.compiler.checkpoint_cost.
    interruptions`): not in :class:`TimeNumbers`' days nor the cost, which assume none; said beside them."""

    per_gpu_day: float  # unexpected interruptions per GPU-day (the rate assumed, ``source``)
    restart_seconds: float  # per interruption: rescheduling, process start-up, collectives, compile (an estimate)
    load_seconds: float  # per interruption: reading the last checkpoint back (its node bytes at the storage's rate)
    rollback_seconds: float  # per interruption: the training since the last save, half an interval on average
    lost_seconds: float  # per interruption: restart + load + rollback
    between_seconds: float  # mean time between interruptions on the run's GPUs (1 / (per_gpu_day x GPUs))
    # the longest checkpoint interval (steps) at which the run still finishes (each interruption losing less than the
    # time between them); 0: none, a restart and the checkpoint read alone take longer
    max_interval_steps: int
    days: float | None  # the run's days with them (TimeNumbers.days / (1 - the lost share)); None: never finishes
    expected: float | None  # interruptions over those days (None: never finishes)
    extra_fraction: float | None  # days / TimeNumbers.days - 1
    source: str
    published_rate: bool = True  # per_gpu_day is Llama 3's (not the spec's hardware.interruptions_per_gpu_day)
    estimated_restart: bool = True  # restart_seconds is llmc's estimate (not training.checkpoint.restart_minutes)


@dataclass(frozen=True)
class CostNumbers:
    gpu_hours: float
    usd: float
    usd_per_gpu_hour: float
    # True when the spec sets no hardware.usd_per_gpu_hour: the price is the hardware table's rough on-demand reference
    price_is_default: bool = False


@dataclass(frozen=True)
class BudgetFloor:
    """The least time and cost the run's training FLOPs can take (``checks.budget_floor``: the yardstick of B003 and
    of the report's floor line): at ``checks.MAX_PLAUSIBLE_MFU`` of the precision's own dense peak, ``basis`` in
    words; no checkpoint saves."""

    days: float
    usd: float
    basis: str
    gpu_hours: float = 0.0  # days x 24 x the GPUs


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
    # the schedule over the run, as every backend applies it (llmc.lr_schedule.lr_shape): the steps of its decay (wsd:
    # the cooldown; 0 constant) and the last optimizer step's LR (above min_lr, which is reached one step past the last)
    decay_steps: int = 0
    last_lr: float = 0.0


@dataclass(frozen=True)
class Candidate:
    plan: ParallelPlan
    step_seconds: float
    mfu: float
    per_gpu_bytes: int
    fits: bool
    reason: str  # why rejected, or why ranked where it is


@dataclass(frozen=True)
class ModelInMemory:
    role: str  # policy | reference
    trainable: bool
    weights: str  # how the copy is held, e.g. "bf16", "nf4 base + lora", "shared base (adapters disabled)"


@dataclass(frozen=True)
class LoraPlan:
    rank: int
    alpha: float
    scaling: float  # alpha / rank (Hu et al. 2021, arXiv:2106.09685 §4.1)
    dropout: float
    targets: list[str]
    quantize_base: str
    merge_after: bool


@dataclass(frozen=True)
class StageMemoryPlan:
    """Memory of one stage: ``per_gpu_bytes`` (the peak a GPU holds), ``activation_bytes``, ``buffer_bytes`` and
    ``sampling_bytes`` per GPU; ``weights_bytes``, ``reference_bytes`` and ``grads_optimizer_bytes`` the whole model's,
    before sharding over ``shard_degree`` GPUs (``replicated_bytes`` of the weights every GPU holds whole). ``source``
    says which model produced them: the searched parallelism plan (pretrain) or the stage estimate
    (weights/reference/optimizer/activations)."""

    per_gpu_bytes: int
    capacity_bytes: int | None
    fits: bool | None
    shard_degree: int
    cp: int
    activation_checkpointing: str
    source: str
    breakdown: dict[str, int] = field(default_factory=dict)
    weights_bytes: int | None = None
    reference_bytes: int | None = None
    grads_optimizer_bytes: int | None = None
    activation_bytes: int | None = None
    activation_source: str | None = None
    sampling_bytes: int | None = None  # GRPO: the KV cache of one sampling batch (sampling_groups groups)
    sampling_groups: int | None = None  # GRPO: groups sampled in one batch per rank (as many as fit; the runtime's)
    buffer_bytes: int | None = None  # logits and their gradient, gathered FSDP units, CUDA context, NCCL
    # of weights_bytes, what every rank holds whole whatever the sharding: QLoRA's NF4 codes (llmc's trainer keeps them
    # outside the module's parameters, which are all FSDP shards)
    replicated_bytes: int = 0
    # tokens per slice of the loss (llmc's trainers run the head + cross-entropy slice by slice, recomputed in
    # the backward) when the whole micro-step's logits would not fit; 0 = whole
    loss_chunk_tokens: int = 0
    # what ``fits`` compares per_gpu_bytes with: the capacity less the fit margin of the model that produced the figure
    # (a backend profile's 95%, the stage estimate's 92%: ``llmc.compiler.search.usable_bytes``); None: no GPU
    usable_bytes: int | None = None


@dataclass(frozen=True)
class StageCheckpoints:
    """A stage's checkpoint saves and the time they stall it (:func:`llmc.compiler.checkpoint_cost.stage_checkpoints`):
    the saves every ``interval`` steps and, where its trainer ends with a save of another state, that final save."""

    saves: int  # every save of the stage: periodic.saves + final.saves
    seconds: float  # the stage's stalls, all saves together (in its days, GPU-hours and cost)
    periodic: CheckpointNumbers | None  # the saves every interval steps (None: the stage writes only its final save)
    # post-training: the merged weights alone; llmc's DeepSpeed runner: the full 16-bit weights after its last engine
    # save (None: the last save is the last of ``periodic``)
    final: CheckpointNumbers | None = None
    preempt_seconds: float = 0.0  # a preemption's save of the current step (CheckpointNumbers.preempt_seconds)
    # what the stage keeps on the checkpoint storage (checkpoint_cost, "On disk"): at its peak (disk_bytes) and once
    # finished (kept_bytes), of its periodic saves (keep_latest of them), its final save, its Hugging Face export
    # (export_bytes); 0: not known
    disk_bytes: float = 0.0
    kept_bytes: float = 0.0
    export_bytes: float = 0.0
    keep_latest: int = 0


@dataclass(frozen=True)
class PreemptionNumbers:
    """How long a job needs between a preemption / time-limit signal and its exit, and the time the launchers give
    it (:func:`llmc.compiler.checkpoint_cost.preemption_numbers`): the step under way finishes, then the current step
    is saved. The launchers' figures are set for the job (pre-training or a stage) that needs the longest."""

    job: str | None  # the job that needs the longest ("pre-training" or a stage name; None: no saves are known)
    step_seconds: float  # its training step, which finishes before the save
    save_seconds: float  # its save of the current step (CheckpointNumbers.preempt_seconds)
    needed_seconds: float  # step_seconds + save_seconds
    # torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT (every launcher sets it): how long torchrun lets its workers save
    # after passing them a SIGTERM before it kills them
    shutdown_seconds: int
    # the Slurm script's --signal=B:USR1@N and `llmc launch`'s wait before it kills a stage's process group: the
    # shutdown time + the relay's own
    signal_lead_seconds: int


@dataclass(frozen=True)
class StageTimePlan:
    """Predicted wall time and cost of one stage other than pre-training (whose figures are ``Compiled.time`` and
    ``Compiled.cost``): llmc's time model on the stage's own layout (:func:`llmc.compiler.stages.stage_time`)."""

    backend: str  # the trainer the stage runs on (LM stages: llmc's DeepSpeed runner or native; chat: native)
    step_seconds: float  # one optimizer step: its training passes and extra forwards (reference, GRPO's old policy)
    train_pass_seconds: float  # one forward + backward pass over the step's batch
    forward_passes: int  # forwards without backward per step (DPO / GRPO reference, GRPO's old log-probs)
    updates: int  # training passes per step (GRPO's mu; 1 otherwise)
    tokens_per_second: float  # trained tokens (a DPO pair's two sequences) per second, all GPUs
    days: float | None  # steps x step_seconds + the checkpoint stalls (None: the stage's steps are not known)
    gpu_hours: float | None
    usd: float | None  # None without a price per GPU-hour
    sampling_seconds: float  # GRPO: sampling the step's completions (in step_seconds; 0 otherwise)
    source: str
    checkpoint: StageCheckpoints | None = None  # its saves' stalls (in days; None: steps not known)


@dataclass(frozen=True)
class PipelineTime:
    """The whole pipeline's predicted time and cost: pre-training (``Compiled.time`` / ``cost``) plus every other
    stage's :class:`StageTimePlan`, run one after another on the same GPUs (:func:`llmc.compiler.stages.pipeline_time`)."""

    days: float
    gpu_hours: float
    usd: float | None  # None without a price per GPU-hour
    counted: list[str]  # stages whose time is in the sum
    unknown: list[str]  # stages without a time (no plan, or steps not known)
    estimated: list[str] = field(default_factory=list)  # counted stages other than pre-training (stage estimates)
    # the stages' peak on the checkpoint storage, each finished one keeping its own (checkpoint_cost.pipeline_disk),
    # and the stages without a figure (steps not known)
    disk_bytes: float = 0.0
    disk_unknown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RolloutPlan:
    """GRPO cost per step with llmc's sampler (each rank samples its groups in batches of
    ``StageMemoryPlan.sampling_groups``: the G copies of each prompt in one forward that fills a KV cache, then one
    position of every row per new token): forward 2N FLOPs per processed token, training 6N or 4N per token per
    update."""

    prompts_per_step: int
    completions_per_step: int
    generated_tokens_per_step: int  # at most: every completion runs to max_new_tokens
    sampled_tokens_per_step: int  # tokens the sampler's forwards process: each sample's prompt, then its new tokens
    groups_per_rank: int  # the step's prompts split over every GPU
    decode_steps_per_batch: int  # one-position forwards per sampling batch (max_new_tokens at most)
    generation_flops_per_step: float
    train_flops_per_step: float
    reference_flops_per_step: float
    kv_cache_bytes_per_group: int  # bf16 K and V of one group's G sequences (prompt + new tokens)
    kv_bytes_per_token: int


@dataclass(frozen=True)
class LongContextPlan:
    old_seq_len: int
    new_seq_len: int
    extension_factor: float | None
    rope_theta_old: float
    rope_theta: float
    rope_scaling: dict | None
    yarn_factor: float | None
    recommended_cp: int
    cp: int
    activation_bytes_per_gpu: int
    activation_source: str
    kv_cache_bytes_per_sequence: int


@dataclass(frozen=True)
class ContextPlan:
    """The RoPE / context a stage trains with and hands on through ``init_from``."""

    max_context: int
    rope_theta: float
    rope_scaling: dict | None


@dataclass(frozen=True)
class StageLayout:
    """A continued-training stage's own searched layout (the run's backend is torchtitan: the stage runs as its own
    torchtitan job, with TP / PP / CP like pre-training): the plan, its memory and one step's predicted time."""

    plan: ParallelPlan
    memory: MemoryNumbers
    step_seconds: float
    mfu: float
    why: str  # the search's first reason (what was chosen among how many candidates)


@dataclass(frozen=True)
class StageTraining:
    """A stage's resolved training numbers (:func:`llmc.compiler.stages.resolve_stage_training`), the first fields
    of its :class:`StagePlan`."""

    seq_len: int
    global_batch_tokens: int | None
    global_batch_seqs: int | None
    steps: int | None
    tokens: float | None  # tokens the stage trains on (steps x global_batch_tokens when data gives none)
    lr: float
    min_lr: float
    warmup_steps: int
    schedule: str
    decay_fraction: float
    # the steps of its decay and the last step's LR (llmc.lr_schedule.lr_shape); None where the stage has no steps
    decay_steps: int | None
    last_lr: float | None
    micro_batch: int | None
    grad_accum: int | None
    checkpoint_interval: int | None
    hyper: dict[str, Any]  # kind-specific: beta (dpo), group_size/kl_coef/... (grpo), loss_mask, chat_template
    defaults: list[str]  # the settings llmc chose (the spec left them out)


@dataclass(frozen=True)
class StageExamples:
    """What one step of a chat stage (sft / dpo / grpo) reads, in the records users count
    (:func:`llmc.compiler.stages.stage_examples`). llmc's chat trainers do not pack: each record is its own row(s),
    right-padded to the batch's longest and cut at ``row_tokens`` (``llmc.runtime.sft.pad_batch``), so the stage's
    ``tokens`` (steps x global_batch_tokens) counts every row as full: an upper bound on the tokens trained. The
    launch measures the records and says what the steps really read (``llmc.runtime.stage_tokens``, R013)."""

    unit: str  # "conversations" (sft), "pairs" (dpo: a chosen and a rejected response), "prompts" (grpo)
    per_step: int  # records per optimizer step: global_batch_tokens / seq_len (sft, dpo), prompts_per_step (grpo)
    rows_per_record: int  # rows each record runs as: 1 (sft), 2 (dpo: chosen, rejected), group_size (grpo)
    rows_per_step: int  # per_step x rows_per_record
    row_tokens: int  # tokens a row holds at most: seq_len (grpo: max_prompt_tokens + max_new_tokens)
    total: int | None  # steps x per_step: the records the stage's steps read (None: steps not known)
    max_row_tokens: float | None  # steps x rows_per_step x row_tokens: what the rows hold when every one is full


@dataclass(frozen=True)
class StagePlan(StageTraining):
    """One stage's resolved plan: its training numbers (:class:`StageTraining`) and the rest. For the ``pretrain``
    stage the training numbers equal ``Compiled.hyper`` and the batch split equals ``Compiled.plan``; other stages
    resolve theirs in :func:`llmc.compiler.stages.resolve_stage_training`."""

    name: str
    kind: str
    init_from: str | None
    init_hf: str | None  # a Hugging Face checkpoint (directory or Hub id in the local cache) to start from
    order: int
    models_in_memory: list[ModelInMemory]
    n_models: int
    params_total: int
    trainable_params: int
    trainable_fraction: float
    lora: LoraPlan | None
    memory: StageMemoryPlan
    rollout: RolloutPlan | None
    long_context: LongContextPlan | None
    context: ContextPlan
    notes: list[str]
    time: StageTimePlan | None = None  # None for pre-training (Compiled.time) and without a GPU
    # a continued-training stage on a torchtitan run: the layout its own torchtitan job runs (None: the stage runs
    # on llmc's trainers on the stage estimate's layout, data parallel only)
    layout: ParallelPlan | None = None
    # the context the stage's Hugging Face export states (config.json max_position_embeddings): the model's, the
    # stage's seq_len or the context its RoPE was extended to, whichever is largest; what serving may ask for
    max_position_embeddings: int = 0
    # a chat stage (sft / dpo / grpo): what its step reads, in conversations / pairs / prompts; None for the others
    examples: StageExamples | None = None


@dataclass(frozen=True)
class ServingPlan:
    """One serving target: engine settings and the per-GPU memory fit (see :mod:`llmc.compiler.serving`)."""

    index: int
    engine: str
    gpu: str
    stage: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpus: int
    nodes: int
    max_model_len: int
    concurrency: int
    max_num_seqs: int
    max_seqs_that_fit: int
    gpu_memory_utilization: float
    quantization: str | None
    kv_cache_dtype: str
    prefix_caching: bool
    kv_bytes_per_token: int
    weights_gib: float
    weights_gib_per_gpu: float
    reserve_gib_per_gpu: float
    kv_gib_per_seq: float
    kv_gib_needed: float
    kv_budget_gib: float
    capacity_gib: float
    fits: bool
    max_num_batched_tokens: int  # the prefill chunk the configs pin (vLLM's; SGLang's chunked_prefill_size)
    expert_parallel: bool = False  # MoE layers expert parallel over the replica's GPUs (vLLM --enable-expert-parallel)


@dataclass(frozen=True)
class BackendChoice:
    """The backend the time and memory are computed for, why, and whether torch.compile is assumed."""

    name: str  # torchtitan | deepspeed | native
    reason: str
    compile: bool
    fp8: str | None = None  # an fp8 run: the scaling recipe it is timed with, or that the backend runs it in bf16


@dataclass(frozen=True)
class CalibrationStatus:
    """Whether a calibration applies to this run (``calibrated``: any of its factors), its expected error
    (``error_band_pct``: tokens/s mean, the basis in ``bands``), and the ranking band within which layouts count as
    equal (the calibration's leave-one-out error, else the uncalibrated spread)."""

    calibrated: bool
    reason: str
    error_band_pct: float | None
    ranking_band_pct: float
    backend: str | None = None  # what the calibration was fitted for (None: no calibration given)
    gpu: str | None = None
    factors: dict[str, float] | None = None
    provenance: dict[str, Any] | None = None
    file: dict[str, str] | None = None  # {path (as given), sha256} of the calibration file read
    # the expected error per quantity ("tokens_per_s", "memory"): {mean_abs_pct, max_abs_pct, basis[, n, floor_pct]}
    # -- the calibration's leave-one-out band where its factors are applied, else llmc's uncalibrated error (on the
    # calibration's runs, or on published runs: calibration.plan_calibration)
    bands: dict[str, dict[str, Any]] | None = None
    # per quantity: {applied, why} -- a calibration's factors that do not beat llmc uncalibrated are not applied
    applied: dict[str, dict[str, Any]] | None = None
    applied_factors: dict[str, float] | None = None  # the factors the plan used (identity where not applied)


@dataclass(frozen=True)
class UnfitLayout:
    """The closest layout when none fits in memory (P004): its predicted memory and one step's time."""

    plan: ParallelPlan
    memory: MemoryNumbers
    time: TimeNumbers
    note: str


@dataclass(frozen=True)
class BackendRun:
    """How the pre-training run of one backend a build launches would use the GPU (:func:`llmc.compiler.compile.
    backend_runs`): the layout that backend's runner trains (the plan itself; llmc's DeepSpeed runner: every GPU a ZeRO
    data-parallel rank) and llmc's memory model for it, on that backend's profile. The launchers' headers and
    ``llmc launch --backend`` report it; nothing recomputes it."""

    backend: str  # native | torchtitan | deepspeed
    plan: ParallelPlan  # the layout the backend's runner trains
    layout: str  # that layout in words (llmc.compiler.search.describe), with how it differs from the plan
    per_gpu_bytes: int  # llmc's memory model, the backend's profile (MemoryNumbers.per_gpu_bytes)
    capacity_bytes: int
    usable_bytes: int  # what fits compares per_gpu_bytes with: capacity x the profile's headroom (backends.fit_headroom)
    fits: bool  # llmc.compiler.memory.fits: per_gpu_bytes <= usable_bytes
    planned: bool  # the backend the plan was computed for (its figure is Compiled.memory's)


@dataclass(frozen=True)
class Compiled:
    spec_path: str
    spec_sha256: str
    spec: RunSpec
    gpu: GPU | None
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
    stages: list[StagePlan] = field(default_factory=list)  # per-stage plans, in execution order
    serving: list[ServingPlan] = field(default_factory=list)  # per-target serving plans
    search: dict = field(default_factory=dict)  # search statistics: evaluated, fitting, rejected counts by reason
    backend: BackendChoice | None = None
    calibration: CalibrationStatus | None = None
    unfit: UnfitLayout | None = None
    evaluation: EvaluationPlan | None = None  # eval.validation / eval.tasks / data.quality (evaluation.py)
    pipeline: PipelineTime | None = None  # every stage's time and cost together (specs with stages)
    preemption: PreemptionNumbers | None = None  # a preemption's save and the launchers' shutdown time
    budget_floor: BudgetFloor | None = None  # the least time / cost of the training FLOPs (B003's yardstick)
    # config.json model_type of each local init_hf checkpoint, keyed by the spec's path (llmc.spec.facts): what the
    # torchtitan target's state-dict adapters can read
    checkpoint_types: dict[str, str] = field(default_factory=dict)
    # the sha256 of the spec file's own bytes (``spec_sha256`` hashes them followed by the ``--set`` overrides, when
    # there are any); None when the spec was given as a RunSpec without its file's bytes
    spec_file_sha256: str | None = None
    # the ``--set`` overrides applied to the spec file, their command-line text in order (``llmc build SPEC --set ...``
    # with these reproduces the build)
    overrides: list[str] = field(default_factory=list)
    # False when compiled with ``--no-fit-check`` (every layout searched as if it fitted): rebuilding the build needs
    # the option again
    fit_check: bool = True
    # the pre-training run of every backend the build can launch, keyed by backend (``BackendRun``): empty without a
    # plan or a GPU; a backend whose runner cannot train the plan (the native trainer and pp / cp / ep, DeepSpeed and a
    # batch that does not split over every GPU, torchtitan and a model it cannot run) has no entry
    backend_runs: dict[str, BackendRun] = field(default_factory=dict)
    # the folder the spec's relative paths resolve against, relative as ``spec_path`` is, where ``spec_path`` names
    # no file (``llmc.spec.load.STDIN_SPEC``: the current directory ``llmc build -`` ran in); None: ``spec_path``'s
    spec_dir: str | None = None

    def spec_folder(self) -> str:
        """The folder the spec's relative paths resolve against (``spec_dir``, else ``spec_path``'s folder), as a
        POSIX path relative as ``spec_path`` is (the build directory's, in a build): the lock's ``dir_from_build``."""
        if self.spec_dir is not None:
            return self.spec_dir
        return posixpath.dirname(str(self.spec_path).replace(os.sep, "/")) or "."

    def to_json(self) -> dict:
        """JSON view; keys documented in README (model.*, compute.*, plan, memory.*, time.*, cost.*)."""

        def dc(x):
            return None if x is None else asdict(x)

        return {
            "llmc_version": __import__("llmc").__version__,
            "spec": {
                "path": self.spec_path,
                "sha256": self.spec_sha256,  # of the spec file's bytes followed by the overrides (when any)
                "file_sha256": self.spec_file_sha256,  # of the spec file's own bytes
                "overrides": list(self.overrides),  # --set overrides as given, in order
                "name": self.spec.name,
                # the whole resolved spec: the runtime reads data/training/stages from here
                "resolved": self.spec.model_dump(mode="json"),
            },
            "fit_check": self.fit_check,  # false: compiled with --no-fit-check
            "model": {"architecture": self.spec.model.model_dump(mode="json"), **dc(self.model)},
            "hardware": dc(self.gpu) if self.gpu is not None else None,
            # a pipeline without pre-training trains no top-level data: no compute of its own (its stages have theirs)
            "compute": dc(self.compute) if self.spec.pretrains else None,
            "hyper": dc(self.hyper),
            "plan": self.plan.to_json() if self.plan else None,
            "memory": dc(self.memory),
            "time": dc(self.time),
            "cost": dc(self.cost),
            "pipeline": dc(self.pipeline),
            "preemption": dc(self.preemption),
            "budget_floor": dc(self.budget_floor),
            "reasons": list(self.reasons),
            "alternatives": [_cand(c) for c in self.alternatives],
            "rejected": [_cand(c) for c in self.rejected],
            "stages": [asdict(s) for s in self.stages],
            "serving": [asdict(s) for s in self.serving],
            "search": dict(self.search),
            "backend": dc(self.backend),
            # what `llmc launch --backend X` reads to warn about a run that does not fit (no recomputation there)
            "backend_runs": {k: {"layout": r.layout, "per_gpu_bytes": r.per_gpu_bytes,
                                 "capacity_bytes": r.capacity_bytes, "usable_bytes": r.usable_bytes, "fits": r.fits,
                                 "planned": r.planned}
                             for k, r in sorted(self.backend_runs.items())},
            "calibration": dc(self.calibration),
            "unfit": dc(self.unfit),
            "evaluation": self.evaluation.to_json() if self.evaluation is not None else None,
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


__all__ = [
    "ModelNumbers", "ComputeNumbers", "MemoryNumbers", "CheckpointNumbers", "StageCheckpoints", "TimeNumbers",
    "InterruptionNumbers", "CostNumbers", "Hyper", "PreemptionNumbers",
    "Candidate", "ModelInMemory", "LoraPlan", "StageMemoryPlan", "RolloutPlan", "LongContextPlan", "ContextPlan",
    "StageExamples", "StagePlan", "ServingPlan", "BackendChoice", "BackendRun", "CalibrationStatus", "UnfitLayout", "Compiled",
]
