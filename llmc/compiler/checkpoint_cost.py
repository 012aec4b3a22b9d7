"""Checkpoint save stalls: the bytes each backend writes per save, where, and how long training waits for them.

A run that checkpoints every ``interval`` steps spends, besides its training steps, the time its saves stall the
training loop. The plan's days, GPU-hours and cost include them (``timing.time_numbers``); the step time and MFU
stay those of a training step. The model, per save:

* **What is saved** (one copy on storage, :attr:`CheckpointNumbers.state_bytes`):

  - torchtitan and llmc's native trainer save a ``torch.distributed.checkpoint`` (DCP) of the model and the AdamW
    state. The model's parameters are fp32 (FSDP2's ``MixedPrecisionPolicy`` casts to bf16 for compute only; the
    native trainer autocasts), and AdamW keeps ``exp_avg`` and ``exp_avg_sq`` in fp32: 4 + 4 + 4 =
    :data:`DCP_BYTES_PER_PARAM` = 12 B per parameter (torchtitan ``components/checkpointer/dcp.py``: model,
    optimizer, lr_scheduler, dataloader, train_state; llmc ``runtime/checkpoint.py``: ``get_state_dict``).
  - DeepSpeed (``DeepSpeedEngine.save_checkpoint``, deepspeed/runtime/engine.py, 0.19.8): the data-parallel rank 0
    writes ``mp_rank_00_model_states.pt`` with the module's weights (bf16 for bf16 and fp8 runs, which the runner
    trains as bf16: 2 B; fp32: 4 B). Under ZeRO-1/2/3 every rank writes ``zero_pp_rank_R_mp_rank_00_optim_states.pt``
    with its partition of the fp32 master weights and AdamW's two moments (``single_partition_of_fp32_groups`` /
    ``fp32_partitioned_groups_flat`` + the base optimizer's state: :data:`DS_OPTIMIZER_BYTES_PER_PARAM` = 12 B per
    parameter / dp); ZeRO-3's module file holds the partitioned parameters' empty placeholders only. Without ZeRO
    (stage 0) the optimizer state goes into rank 0's model-states file (``optimizer.state_dict()``, not partitioned):
    bf16 runs' ``FP16_Optimizer`` adds its fp32 master copy (``fp32_groups_flat``): 2 + 4 + 8 = 14 B per parameter;
    fp32 runs keep no master copy: 4 + 8 = 12 B. After its last engine save, llmc's DeepSpeed runner writes the
    module's weights once more as ``model.pt`` (``llmc.runtime.ds_train``: rank 0, the whole file, then hashed; 2 B
    per parameter, fp32: 4), counted once per run (``CheckpointNumbers.final_seconds``).

* **Who writes it**: DCP's default save planner deduplicates tensors that several ranks hold
  (``DefaultSavePlanner(dedup_save_to_lowest_rank=False)``, torch/distributed/checkpoint/_dedup_save_plans.py):
  each replicated item goes to the replica whose plan is smallest so far, so the replicas of a shard share its
  writing evenly (greedy balancing), not rank 0 of the replica group. A GPU's shard of the state
  (:attr:`LayoutTimer.owned` parameters: FSDP / ZeRO shard over dp_shard x cp, TP, PP, EP as the timing model
  holds them; DDP, ZeRO-0, holds the whole TP/PP shard) is therefore written 1 / copies by each of its ``copies``
  holders (dp_replicate under FSDP / HSDP; dp_shard x dp_replicate x cp under DDP). A node writes what its
  ``min(gpus_per_node, world)`` ranks write: one node the whole state; across nodes the node of the heaviest
  pipeline stage is the slowest (torchtitan's mesh puts pp outermost, so a node's ranks share a stage; where a stage
  has fewer ranks than a node, the node's other ranks count at the average share). DeepSpeed's writer is fixed
  (rank 0's module file and, with ZeRO, every rank's partition): node 0 is the slowest.

* **Synchronous save** (``dcp.save``, torchtitan ``async_mode = "disabled"``, llmc's DeepSpeed runner always): the
  training loop waits for the whole write, ``write = node bytes / storage_write_gbps`` (per node; the hardware
  table's conservative 1 GB/s, ``hardware.STORAGE_WRITE_GBPS`` and its source, or ``training.checkpoint.write_gbps``).

* **Asynchronous save** (``dcp.async_save``; torchtitan ``async_mode = "async"`` and llmc's trainer when the
  resolved ``Hyper.checkpoint_async`` is on): "This code first de-stages the state_dict on to the staging storage
  (defaults to CPU memory), and then calls the save in a separate thread"
  (https://pytorch.org/docs/stable/distributed.checkpoint.html, ``async_save``; torchtitan docs/checkpoint.md,
  https://github.com/pytorch/torchtitan/blob/main/docs/checkpoint.md). The loop stalls for the copy of the GPU's
  whole local state dict (every tensor it holds, replicated ones too: staging precedes the planner's dedup) over
  its PCIe link to host memory: ``staging = GPU bytes / (pcie_gbps x COMM_EFFICIENCY)`` (the table's
  ``pcie_gbps``, else 32 GB/s per direction, the link the offload model uses: ``timing.OFFLOAD_PCIE_GBPS``), plus,
  when the background write of the previous save outlasts the interval, the rest of it (torchtitan's
  ``CheckpointManager.save`` and llmc's ``save_checkpoint`` wait for the previous save first).

* **Saves**: every ``interval``-th step before the last, and the last step: ``ceil(steps / interval)`` (torchtitan
  ``CheckpointManager._should_save``; llmc's trainers). The last is written in full before the job ends (torchtitan
  saves the last step synchronously, ``_save_last_step``; llmc's trainer waits for it), so the run's stall is
  ``(saves - 1) x stall + write`` (+ the hashing below, on llmc's trainer).

* **llmc's trainer verifies what it wrote**: before a checkpoint counts, every rank re-reads its own files and
  hashes them (sha256 into the manifest, ``llmc.runtime.checkpoint._finalize``), in the training loop: right after a
  synchronous save, and for an asynchronous one at the start of the next save (``wait_for_checkpoint``). That stall
  is a rank's written bytes (the node's / its ranks) at :data:`HASH_GBPS`. torchtitan and DeepSpeed write no hashes.

* **Stages other than pre-training** (:func:`stage_checkpoints`; in each stage's days, ``stages.stage_time``):

  - post-training (sft, dpo, grpo on llmc's loop, ``llmc.runtime.sft.LoopState.end_step``): every ``interval``-th
    step before the last, a synchronous ``save_checkpoint(..., trainable_only=True)`` of the trainable parameters
    and the optimizer. The native trainer keeps fp32 parameters (bf16 autocast computes,
    ``llmc.runtime.posttrain.bf16_forwards``) and AdamW's fp32 moments: :data:`DCP_BYTES_PER_PARAM` = 12 B per
    trainable parameter. A LoRA / QLoRA stage saves its adapters alone (the frozen base is left out,
    ``StateDictOptions(ignore_frozen_params=True)``; QLoRA's NF4 codes are neither parameters nor buffers,
    ``llmc.runtime.lora.NF4Linear``); a DPO / GRPO frozen reference is a module of its own and is not saved. The
    last step is not one of these saves (``step < steps``): the stage ends with one save of the whole model's fp32
    weights, adapters merged, without optimizer state (:data:`WEIGHTS_BYTES_PER_PARAM` = 4 B per parameter,
    ``llmc.runtime.posttrain.run_stage``). So ``save_count - 1`` periodic saves and the final one. On more than
    one rank each is a DCP of every rank's share (``sharded=world > 1``; the runtime shards the stage with FSDP2
    over every rank, ``posttrain.post_layout``, and DCP's dedup spreads a replicated layout's writing the same
    way), each rank hashing its own files; on one GPU rank 0 writes and hashes whole files (``model.pt``,
    ``optimizer.pt``).
  - continued training on llmc's native trainer (``llmc.runtime.train``): pre-training's DCP of the model and the
    AdamW state (:func:`checkpoint_numbers`), asynchronous only when the spec's ``training.checkpoint.async_mode``
    is on (a stage's job reads the spec's setting, ``TrainJob.from_lock``; None: synchronous). On llmc's DeepSpeed
    runner (``llmc.runtime.ds_train``): its engine checkpoints (synchronous) with the ZeRO stage of the run's
    ds_config, then ``save_checkpoint`` of the full 16-bit weights as ``model.pt`` (rank 0 writes and hashes it).
    As its own torchtitan job (a torchtitan run's searched stage layout): torchtitan's saves, asynchronous as the
    run's pre-training job.

* **Preemption** (:func:`preemption_numbers`; llmc's trainers and the torchtitan job's ``PreemptibleTrainer`` on a
  SIGTERM / SIGUSR1, ``llmc.runtime.preempt``): the step under way finishes, then the current step is saved in full
  before the job exits. An asynchronous save still writing is waited for first (torchtitan ``CheckpointManager.save``
  calls ``maybe_wait_for_saving``; llmc's trainer ``wait_for_checkpoint``), at worst its whole write and hashing;
  the current step is then written synchronously (torchtitan ``_save_last_step``: ``AsyncMode.DISABLED``) and, on
  llmc's trainer, hashed; llmc's DeepSpeed runner also writes its closing ``model.pt``. So
  ``preempt = (write + hash if async) + write + hash (+ model.pt)`` (:attr:`CheckpointNumbers.preempt_seconds`);
  a post-training stage's is one of its periodic saves, or its final save where that is larger (its last step
  takes no signal and ends with that save: a LoRA stage's merged weights). torchrun kills its workers
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds after passing them the SIGTERM (30 s by default,
  torch/distributed/elastic/agent/server/api.py), a time every launcher sets: :data:`PREEMPT_SAFETY` times the
  longest job's step + save, at least :data:`PREEMPT_FLOOR_S`; the Slurm script asks for its signal
  (``--signal=B:USR1@N``) and ``llmc launch`` waits before it kills a stage :data:`PREEMPT_RELAY_S` longer.

* **On disk** (:func:`with_disk`; :attr:`CheckpointNumbers.disk_bytes` / ``kept_bytes``, a stage's
  :attr:`StageCheckpoints.disk_bytes` / ``kept_bytes``, the pipeline's :attr:`PipelineTime.disk_bytes`): what a
  stage keeps on the checkpoint storage, in tensor bytes, all nodes together (one copy: ``state_bytes``). In the
  order the trainers write it:

  - every periodic save is written in full before the oldest is deleted, so ``keep_latest + 1`` checkpoints of
    ``state_bytes`` are on disk at each save: llmc's trainers (``runtime/checkpoint.py``: ``_publish`` renames the
    complete ``step-N.tmp`` into place, then ``prune_older`` keeps ``keep_latest`` of the steps up to it; an
    asynchronous save in flight is completed and pruned by the next save's ``wait_for_checkpoint`` before that one
    starts), llmc's DeepSpeed runner (``ds_train.save_ds_checkpoint``: rename, ``latest``, then ``prune_older``) and
    torchtitan 0.3.0 (``CheckpointManager.save``, components/checkpointer/dcp.py: ``dcp_save``, then
    ``_purge_stale_checkpoints``, which keeps the newest ``keep_latest_k`` ``step-N`` folders, the new one
    included; the previous asynchronous save is waited for first, ``maybe_wait_for_saving``; llmc's job purges after
    its last-step save too). The last save is pruned the same way: ``keep_latest`` stay.
  - then the closing save, once (``final``): llmc's DeepSpeed runner's ``model.pt`` (:attr:`CheckpointNumbers.
    final_bytes`, an llmc checkpoint beside its engine checkpoints); a post-training stage's final save of the
    weights, written while its ``keep_latest`` periodic saves (resume checkpoints, ``checkpoints/resume``) are
    still there: they are removed once its DONE.json is written (``llmc.runtime.posttrain._finish``).
  - then the stage's Hugging Face export ``run/<stage>/hf`` (``export``, :func:`export_bytes`;
    ``llmc.runtime.hf_io.export_stage``: every parameter in bf16, 2 B, an fp32 run's in fp32, 4 B; none for a model
    without one, X130).

  So a stage's peak is ``disk = keep_latest x state + max(state, final + export)`` and a finished stage keeps
  ``kept = keep_latest x state + final + export`` (post-training: ``final + export``). The eval step's temporary
  export of a checkpoint it scores (one at a time, deleted once scored; pre-training and continued training, whose
  export is at most a third of a checkpoint) fits in the room of the one extra checkpoint. A pipeline's stages run one
  after another and a finished one keeps its own (``init_from`` reads them): its peak is the largest, over its stages,
  of the stages before it kept + that stage's peak (:func:`pipeline_disk`); ``llmc launch`` compares the same sum over
  the stages it runs, less what they hold already, with the free space (L019). Not counted: what the files hold
  besides their tensors (DCP writes each tensor as its own ``torch.save`` record, ~1.5 kB apiece; its ``.metadata``,
  the manifest, ``train.json``, each rank's RNG states, the export's config and tokenizer files: ~0.2 MB for a
  2-layer model, 1.2% of its 1.4M-parameter checkpoint, measured by tests/test_checkpoint_disk.py, and a share that
  shrinks as the tensors grow), logs, metrics and TensorBoard events, ``llmc export --step N``'s ``hf-step-N``, a
  LoRA stage's adapters saved again (``lora_adapters.pt``, ``hf/adapter``). torchtitan's checkpoints go to the
  build's ``outputs/`` folder, its export to ``run/<stage>/hf``: the same storage unless one of them is linked
  elsewhere.

Not counted in the save stalls: the DeepSpeed runner's gathering of ZeRO-3 partitions for its ``model.pt``,
post-training's ``lora_adapters.pt`` (the adapters once more, by rank 0) and every stage's ``hf/`` export, storage
contention between nodes beyond the per-node figure, the filesystem's metadata / fsync
latency, and DCP's default async stager copying into pageable (not pinned) host memory, which may stage slower
than the PCIe figure used.

The parallelism search does not evaluate this per candidate (``llmc plan`` stays as fast; it is computed once, for
the chosen layout): with DCP's balanced dedup every layout of a run writes the same state spread over the same
nodes, so the sync stall per save differs between layouts only by the pipeline stages' imbalance; an async save's
staging (a GPU's shard over PCIe: ~0.5 s for Llama 3 8B on 8 GPUs) is a small fraction of an interval of ~30
minutes. Layouts with different shard counts (DDP vs FSDP, DeepSpeed ZeRO-0 vs ZeRO-1/3 across nodes) do stage or
write different amounts, but that difference amortised over an interval stays far inside the search's ranking band
(layouts within it count as equal), so it could not change the ranking outside that band.
"""

from __future__ import annotations

import math
from dataclasses import replace

from llmc.compiler.result import CheckpointNumbers, InterruptionNumbers, PreemptionNumbers, StageCheckpoints

DCP_BYTES_PER_PARAM = 12  # fp32 parameters + AdamW exp_avg + exp_avg_sq (torchtitan, llmc's trainer)
DS_OPTIMIZER_BYTES_PER_PARAM = 12  # a ZeRO partition: fp32 master + AdamW exp_avg + exp_avg_sq (DeepSpeed)
DS_FP32_MASTER_BYTES = 4  # ZeRO-0 bf16 (FP16_Optimizer): the fp32 master copy in rank 0's model-states file
ADAM_MOMENT_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
WEIGHTS_BYTES_PER_PARAM = 4  # llmc's native trainer keeps fp32 parameters: a weights-only save (post-training's last)
# sha256 over a file read back, GB/s on one core (Python hashlib / OpenSSL): 1.2 GB/s measured on a 2-core x86
# development machine; OpenSSL's SHA-NI kernels reach about 2 GB/s. A conservative round figure, not fitted.
HASH_GBPS = 1.0
#: the launchers' shutdown time is this many times a preemption's predicted step + save: the storage figure is a
#: per-node average that contention (other jobs, every node writing at once) can halve. A safety factor, not fitted.
PREEMPT_SAFETY = 1.5
#: the least shutdown time the launchers set (torchrun's own default is 30 s): 100 s, llmc's fixed figure before the
#: plan sized it, kept for plans whose predicted save is short
PREEMPT_FLOOR_S = 100
#: what the Slurm script's signal relay (USR1 to the batch shell, then ``scancel --signal=TERM`` of the job's
#: steps) and ``llmc launch``'s stop of a stage's process group keep beyond torchrun's shutdown time
PREEMPT_RELAY_S = 20
#: Unexpected job interruptions per GPU-day: Llama 3 405B's pre-training had 419 unexpected interruptions in a 54-day
#: snapshot on 16,384 H100 GPUs (Llama Team, "The Llama 3 Herd of Models", arXiv:2407.21783, sec. 3.3.4 and table 5:
#: 78% of them confirmed or suspected hardware), one every 3.1 hours at that scale. One published rate, taken as
#: proportional to the GPU count (failures of independent parts); a fleet's own rate differs.
INTERRUPTIONS_PER_GPU_DAY = 419 / (54 * 16384)
#: What a restart costs besides reading the checkpoint back and redoing the steps since it: rescheduling the job,
#: containers and processes starting, the collectives' initialisation, compilation (the parts of a resumable
#: training's start-up time, https://www.hiascend.com/document/detail/en/mindcluster/730/clustersched/schedulingug/
#: dl_resume_005.html). An estimate, not a measurement: 10 minutes.
RESTART_SECONDS = 600.0


def export_bytes(params_total: float, precision: str, exportable: bool = True) -> float:
    """Bytes of a stage's Hugging Face export (``run/<stage>/hf``, ``llmc.runtime.hf_io.export_stage``): every
    parameter in bf16 (2 B; fp32 runs keep fp32, 4 B; fp8 and nvfp4 runs export bf16); 0 for a model without an export
    (``exportable`` False: ``llmc.hf_export.hf_export_supported``)."""
    return float(params_total) * (4 if precision == "fp32" else 2) if exportable else 0.0


def on_disk(keep_latest: int, state: float, final: float, export: float, resumes: bool = False) -> tuple[float, float]:
    """(peak, kept): what a stage with ``keep_latest`` periodic checkpoints of ``state`` bytes, a closing save of
    ``final`` bytes and an export of ``export`` bytes keeps on disk at its peak and once finished (the module
    docstring, "On disk"): ``keep x state + max(state, final + export)``, and ``keep x state + final + export``, or
    ``final + export`` where the periodic saves are ``resumes`` (post-training's, removed at the end)."""
    keep = max(int(keep_latest), 1)
    return float(keep * state + max(state, final + export)), float((0.0 if resumes else keep * state) + final + export)


def with_disk(ck: CheckpointNumbers, keep_latest: int, export: float) -> CheckpointNumbers:
    """``ck`` (the saves of pre-training or continued training) with what its run keeps on disk (:func:`on_disk`):
    ``keep_latest`` checkpoints of ``state_bytes``, the closing save ``final_bytes`` (llmc's DeepSpeed runner's
    model.pt) and ``export`` (:func:`export_bytes`)."""
    disk, kept = on_disk(keep_latest, ck.state_bytes, ck.final_bytes, export)
    return replace(ck, keep_latest=max(int(keep_latest), 1), export_bytes=float(export), disk_bytes=disk,
                   kept_bytes=kept)


def pipeline_disk(pretrain: CheckpointNumbers | None, stages) -> tuple[float, list[str]]:
    """(bytes, stages without a figure): the peak on disk of a pipeline's stages (``StagePlan``, in run order), run one
    after another, each finished one keeping its own: the largest, over the stages, of what those before it keep
    (``kept_bytes``) + its peak (``disk_bytes``); pre-training's from ``pretrain``, every other stage's from its
    ``time.checkpoint`` (the module docstring, "On disk")."""
    peak = held = 0.0
    unknown = []
    for s in stages:
        ck = pretrain if s.kind == "pretrain" else (s.time.checkpoint if s.time is not None else None)
        if ck is None or not ck.disk_bytes:
            unknown.append(s.name)
            continue
        peak = max(peak, held + ck.disk_bytes)
        held += ck.kept_bytes
    return peak, unknown


def saves_async(backend: str, hyper_async: bool) -> bool:
    """Whether the backend's trainer saves asynchronously: torchtitan (``async_mode = "async"`` in the emitted job)
    and llmc's trainer (``dcp.async_save``) when the resolved ``Hyper.checkpoint_async`` is on (the spec's
    ``training.checkpoint.async_mode``; None: by the state's size); llmc's DeepSpeed runner always saves
    synchronously."""
    if backend == "deepspeed":
        return False
    return bool(hyper_async)


def save_count(steps: int, interval: int) -> int:
    """Saves of a run: every ``interval``-th step before the last, and the last."""
    return math.ceil(max(steps, 1) / max(interval, 1))


def ds_module_bytes(precision: str) -> int:
    """Bytes per parameter of the DeepSpeed module's weights: fp32 runs 4, bf16 (and fp8, which the runner trains
    as bf16) 2."""
    return 4 if precision == "fp32" else 2


def _bandwidth(gpu, write_gbps: float | None) -> tuple[float, str]:
    """(GB/s per node to the checkpoint storage, where the figure comes from)."""
    from llmc.compiler.hardware import STORAGE_WRITE_GBPS

    if write_gbps is not None:
        return float(write_gbps), "training.checkpoint.write_gbps"
    bw = float(gpu.storage_write_gbps)
    return bw, ("the table's conservative default; training.checkpoint.write_gbps sets it"
                if bw == STORAGE_WRITE_GBPS else f"the table's {gpu.key} storage_write_gbps")


def _ranks_per_node(gpu, plan) -> int:
    return max(1, min(gpu.gpus_per_node, plan.world))


def _dcp_bytes(sm, plan, gpu, per_param: float, params_total: float,
               saved: float | None = None) -> tuple[float, float, int]:
    """(bytes the most loaded node writes, bytes the most loaded GPU holds, copies of each shard) of a DCP save of
    ``per_param`` bytes for each of ``saved`` parameters (None: all ``params_total``; fewer, e.g. LoRA adapters,
    spread over the GPUs as the model is) with DCP's balanced dedup (the module docstring, "Who writes it")."""
    from llmc.compiler import timing

    saved = params_total if saved is None else saved
    world, rpn = plan.world, _ranks_per_node(gpu, plan)
    lt = timing.layout_timer(sm, plan)
    gpu_bytes = per_param * lt.owned * (saved / params_total if params_total else 1.0)
    copies = plan.dp_replicate if plan.zero_stage >= 1 else plan.dp_shard * plan.dp_replicate * plan.cp
    if world <= rpn:  # one node writes the whole state, once
        node = per_param * saved
    else:  # the node of the heaviest stage: its ranks at that stage's share, any other stage's at the average
        same = min(rpn, world // plan.pp)
        node = same * gpu_bytes / copies + (rpn - same) * per_param * saved / world
    return node, gpu_bytes, copies


def _numbers(sm, gpu, *, saves: int, interval: int, async_save: bool, writer: str, per_param: float, state: float,
             node: float, gpu_bytes: float, hash_bytes: float, step_seconds: float,
             write_gbps: float | None) -> CheckpointNumbers:
    """:class:`CheckpointNumbers` of ``saves`` saves of ``state`` bytes (``node`` of them by the most loaded node,
    ``gpu_bytes`` held by the most loaded GPU, ``hash_bytes`` re-read and hashed by one rank): the write, staging,
    stall and total formulas of the module docstring, in one place."""
    bw, source = _bandwidth(gpu, write_gbps)
    write = node / (bw * 1e9)
    hashing = hash_bytes / (HASH_GBPS * 1e9)
    staging_bps = sm.host_Bps  # the GPU's PCIe link to the host x COMM_EFFICIENCY (timing.step_model)
    if async_save:
        stall = gpu_bytes / staging_bps + max(0.0, write - interval * step_seconds) + hashing
    else:
        stall = write + hashing
    # a preemption: the save in flight (async: at worst all of it) is waited for, then the current step is written
    # synchronously and hashed (the module docstring, "Preemption")
    preempt = (write + hashing if async_save else 0.0) + write + hashing
    return CheckpointNumbers(
        saves=saves, interval=interval, mode="async" if async_save else "sync", writer=writer,
        bytes_per_param=per_param, state_bytes=state, node_bytes=node, gpu_bytes=gpu_bytes, write_gbps=bw,
        write_source=source, staging_gbps=staging_bps / 1e9, write_seconds=write, hash_seconds=hashing,
        stall_seconds=stall, total_seconds=(saves - 1) * stall + write + hashing, preempt_seconds=preempt,
    )


def checkpoint_numbers(sm, plan, gpu, *, backend: str, params_total: float, precision: str, steps: int,
                       interval: int, step_seconds: float, async_save: bool,
                       write_gbps: float | None = None, keep_latest: int | None = None,
                       exportable: bool = True) -> CheckpointNumbers:
    """:class:`CheckpointNumbers` of ``plan`` (a ``ParallelPlan``) on ``gpu`` (the cluster's ``hardware.GPU``) with
    the time model ``sm`` (``timing.StepModel``): ``steps`` steps, a save every ``interval``, each training step
    ``step_seconds``; ``async_save`` from :func:`saves_async`; ``write_gbps``: the spec's
    ``training.checkpoint.write_gbps`` (None: the table's ``storage_write_gbps``). ``keep_latest``: the spec's
    ``training.checkpoint.keep_latest``, for the figure on disk (:func:`with_disk`, with the export of the model,
    ``exportable``: it has one); None: not counted."""
    ranks_per_node = _ranks_per_node(gpu, plan)
    if backend == "deepspeed":
        w = ds_module_bytes(precision)
        if plan.zero_stage == 0:
            per_param = w + (DS_FP32_MASTER_BYTES if w == 2 else 0) + ADAM_MOMENT_BYTES
            node = gpu_bytes = per_param * params_total
            writer = (f"DeepSpeed ZeRO-0: rank 0 writes the {'bf16' if w == 2 else 'fp32'} module"
                      f"{' + fp32 master' if w == 2 else ''} + AdamW m, v ({per_param:g} B/param)")
        else:
            part = DS_OPTIMIZER_BYTES_PER_PARAM * params_total / plan.dp
            module = w * params_total if plan.zero_stage < 3 else 0.0
            per_param = module / params_total + DS_OPTIMIZER_BYTES_PER_PARAM
            node = module + ranks_per_node * part
            gpu_bytes = module + part
            writer = (f"DeepSpeed ZeRO-{plan.zero_stage}: every rank its fp32 master + AdamW m, v partition "
                      f"({DS_OPTIMIZER_BYTES_PER_PARAM} B/param / {plan.dp})"
                      + (f", rank 0 the {'bf16' if w == 2 else 'fp32'} module ({w} B/param)" if module else ""))
    else:
        per_param = DCP_BYTES_PER_PARAM
        node, gpu_bytes, copies = _dcp_bytes(sm, plan, gpu, per_param, params_total)
        who = "torchtitan" if backend == "torchtitan" else "llmc's trainer" if backend == "native" else backend
        writer = (f"{who} DCP: fp32 params + AdamW m, v = {DCP_BYTES_PER_PARAM} B/param"
                  + (f", each shard's writing shared by its {copies} replicas" if copies > 1 else ""))
    out = _numbers(
        sm, gpu, saves=save_count(steps, interval), interval=interval, async_save=async_save, writer=writer,
        per_param=per_param, state=per_param * params_total, node=node, gpu_bytes=gpu_bytes,
        # llmc's trainer hashes each rank's files before the checkpoint counts (checkpoint._finalize)
        hash_bytes=node / ranks_per_node if backend == "native" else 0.0, step_seconds=step_seconds,
        write_gbps=write_gbps)
    export = export_bytes(params_total, precision, exportable)
    if backend != "deepspeed":
        return out if keep_latest is None else with_disk(out, keep_latest, export)
    # llmc's DeepSpeed runner ends with save_checkpoint of the module's weights as model.pt (llmc.runtime.ds_train):
    # rank 0 writes the whole file and hashes it
    w = ds_module_bytes(precision)
    final = llmc_save_numbers(sm, plan, gpu, sharded=False, params_total=params_total, saved_params=params_total,
                              bytes_per_param=w, saves=1, interval=interval, write_gbps=write_gbps,
                              what=f"model.pt of the {'fp32' if w == 4 else 'bf16'} weights: {w} B/param")
    out = replace(out, final_bytes=final.state_bytes, final_seconds=final.total_seconds,
                  total_seconds=out.total_seconds + final.total_seconds,
                  preempt_seconds=out.preempt_seconds + final.total_seconds)
    return out if keep_latest is None else with_disk(out, keep_latest, export)


def llmc_save_numbers(sm, plan, gpu, *, sharded: bool, params_total: float, saved_params: float,
                      bytes_per_param: float, saves: int, interval: int, what: str,
                      write_gbps: float | None = None) -> CheckpointNumbers:
    """:class:`CheckpointNumbers` of ``saves`` synchronous saves of llmc's ``save_checkpoint`` holding
    ``bytes_per_param`` bytes for each of ``saved_params`` parameters (``what`` says which): ``sharded``, a DCP
    save of every rank's share (written as :func:`checkpoint_numbers` has it, each rank hashing its own files);
    else whole files (``model.pt``, ``optimizer.pt``) gathered to and written by rank 0, which then hashes them
    all (``llmc.runtime.checkpoint.save_checkpoint``, full layout)."""
    state = bytes_per_param * saved_params
    if sharded:
        node, gpu_bytes, _ = _dcp_bytes(sm, plan, gpu, bytes_per_param, params_total, saved_params)
        hashed, how = node / _ranks_per_node(gpu, plan), "DCP shards, every rank its share"
    else:
        node = gpu_bytes = hashed = state
        how = "whole files written by rank 0"
    return _numbers(sm, gpu, saves=saves, interval=interval, async_save=False, writer=f"{what}; {how}",
                    per_param=bytes_per_param, state=state, node=node, gpu_bytes=gpu_bytes, hash_bytes=hashed,
                    step_seconds=0.0, write_gbps=write_gbps)


def stage_checkpoints(sm, plan, gpu, *, backend: str, posttrain: bool, lora: bool, params_total: float,
                      trainable_params: float, precision: str, steps: int, interval: int, step_seconds: float,
                      async_save: bool, write_gbps: float | None = None, keep_latest: int | None = None,
                      exportable: bool = True) -> StageCheckpoints:
    """:class:`StageCheckpoints` of a stage other than pre-training on ``plan`` (its layout), by the trainer that
    runs it (the module docstring, "Stages"): ``posttrain`` (sft / dpo / grpo on llmc's post-training loop, which
    always saves synchronously): ``save_count - 1`` periodic saves of the trainable parameters (``lora``: the
    adapters, ``trainable_params`` of them) with their AdamW state, then the final save of the fp32 weights alone;
    else (continued training) the saves of ``backend`` as pre-training's (:func:`checkpoint_numbers`, with llmc's
    DeepSpeed runner's closing ``model.pt``). ``async_save``: the stage trainer's (from :func:`saves_async`).
    ``keep_latest`` / ``exportable``: for the stage's figure on disk (the module docstring, "On disk"): its periodic
    saves' ``keep_latest + 1``, its final save, its export (:func:`export_bytes`); None: not counted."""
    sharded = plan.world > 1
    final = None
    if posttrain:
        periodic_saves = save_count(steps, interval) - 1
        # a preemption saves what a periodic save does (llmc.runtime.sft.LoopState), also where the stage has none
        each = llmc_save_numbers(
            sm, plan, gpu, sharded=sharded, params_total=params_total, saved_params=trainable_params,
            bytes_per_param=DCP_BYTES_PER_PARAM, saves=max(periodic_saves, 1), interval=interval,
            write_gbps=write_gbps,
            what=f"the trainable parameters{' (LoRA adapters)' if lora else ''} in fp32 + AdamW m, v: "
                 f"{DCP_BYTES_PER_PARAM} B each")
        periodic = each if periodic_saves > 0 else None
        preempt = each.preempt_seconds  # (final, below: a signal during the last step waits for the final save)
        final = llmc_save_numbers(
            sm, plan, gpu, sharded=sharded, params_total=params_total, saved_params=params_total,
            bytes_per_param=WEIGHTS_BYTES_PER_PARAM, saves=1, interval=interval, write_gbps=write_gbps,
            what=f"the fp32 weights{', adapters merged' if lora else ''}, no optimizer: "
                 f"{WEIGHTS_BYTES_PER_PARAM} B/param")
    else:
        periodic = checkpoint_numbers(sm, plan, gpu, backend=backend, params_total=params_total, precision=precision,
                                      steps=steps, interval=interval, step_seconds=step_seconds,
                                      async_save=async_save, write_gbps=write_gbps, keep_latest=keep_latest,
                                      exportable=exportable)
        preempt = periodic.preempt_seconds
    if final is not None:  # the last step takes no signal: it ends with the final save, which may be the larger one
        preempt = max(preempt, final.total_seconds)  # (a LoRA stage's merged weights vs its adapters' state)
    disk = kept = export = 0.0
    if keep_latest is not None and final is not None:  # post-training: its resume saves, the final save, the export
        export = export_bytes(params_total, precision, exportable)
        disk, kept = on_disk(keep_latest, periodic.state_bytes if periodic is not None else 0.0, final.state_bytes,
                             export, resumes=True)
    elif keep_latest is not None:  # continued training: pre-training's figures (checkpoint_numbers)
        disk, kept, export = periodic.disk_bytes, periodic.kept_bytes, periodic.export_bytes
    parts = [c for c in (periodic, final) if c is not None]
    return StageCheckpoints(saves=sum(c.saves for c in parts), seconds=sum(c.total_seconds for c in parts),
                            periodic=periodic, final=final, preempt_seconds=preempt, disk_bytes=disk,
                            kept_bytes=kept, export_bytes=export,
                            keep_latest=max(int(keep_latest), 1) if keep_latest is not None else 0)


def interruptions(days: float, n_gpus: int, checkpoint: CheckpointNumbers | None, step_seconds: float, *,
                  per_gpu_day: float | None = None, restart_seconds: float | None = None) -> InterruptionNumbers | None:
    """The expected unexpected interruptions of a run of ``days`` (its steps and checkpoint stalls) on ``n_gpus``
    and what they add: each costs a restart (:data:`RESTART_SECONDS`), reading the last checkpoint back (the most
    loaded node's bytes at the storage's rate, ``checkpoint.write_gbps``, reads taken as fast as writes) and, on
    average, half an interval of steps redone (the work since the last save; the expected loss of a failure uniform
    in time). At :data:`INTERRUPTIONS_PER_GPU_DAY` x n_gpus interruptions a day, each losing L seconds, a share
    r n L / 86400 of wall time is lost, so the run takes days / (1 - that share); at a share of 1 or more (each
    interruption loses more than the time between them) it never finishes: ``days`` None, and
    ``max_interval_steps`` the longest interval that would (0: none would). None when there are no saves to resume
    from (``checkpoint`` None) or none are expected (``per_gpu_day`` 0). ``per_gpu_day`` / ``restart_seconds``: the
    spec's fleet figures (``hardware.interruptions_per_gpu_day``, ``training.checkpoint.restart_minutes``), else the
    published rate and the estimate."""
    rate = INTERRUPTIONS_PER_GPU_DAY if per_gpu_day is None else per_gpu_day
    restart = RESTART_SECONDS if restart_seconds is None else restart_seconds
    if checkpoint is None or days <= 0 or n_gpus <= 0 or step_seconds <= 0 or rate <= 0:
        return None
    load = checkpoint.node_bytes / (checkpoint.write_gbps * 1e9) if checkpoint.write_gbps > 0 else 0.0
    rollback = checkpoint.interval * step_seconds / 2
    lost = restart + load + rollback
    per_day = rate * n_gpus
    between = 86400.0 / per_day
    share = lost / between
    # the run finishes while interval x step / 2 < between - restart - load
    limit = 2.0 * (between - restart - load) / step_seconds
    max_interval = max(0, math.ceil(limit) - 1)
    with_them = days / (1.0 - share) if share < 1.0 else None
    return InterruptionNumbers(
        per_gpu_day=rate, restart_seconds=restart, load_seconds=load, published_rate=per_gpu_day is None,
        estimated_restart=restart_seconds is None,
        rollback_seconds=rollback, lost_seconds=lost, between_seconds=between, max_interval_steps=max_interval,
        days=with_them, expected=per_day * with_them if with_them is not None else None,
        extra_fraction=with_them / days - 1.0 if with_them is not None else None,
        source=(("hardware.interruptions_per_gpu_day" if per_gpu_day is not None else
                 "Llama 3 pre-training: 419 unexpected interruptions in 54 days on 16,384 H100 (arXiv:2407.21783, "
                 "sec. 3.3.4), per GPU")
                + f"; a {restart / 60:g}-minute restart ("
                + ("training.checkpoint.restart_minutes" if restart_seconds is not None else "an estimate")
                + ") + reading the checkpoint + half an interval"))


def preemption_numbers(jobs: list[tuple[str, float, float]]) -> PreemptionNumbers:
    """:class:`PreemptionNumbers` of the jobs a build runs, each ``(name, step seconds, preemption save seconds)``
    (:attr:`CheckpointNumbers.preempt_seconds`): the launchers' shutdown time is :data:`PREEMPT_SAFETY` x the
    longest job's step + save, rounded up to 10 s, at least :data:`PREEMPT_FLOOR_S`; the signal lead (Slurm) and
    ``llmc launch``'s wait are :data:`PREEMPT_RELAY_S` more (the module docstring, "Preemption"). No jobs (no
    saves known): the floor."""
    name, step, save = max(jobs, key=lambda j: j[1] + j[2]) if jobs else (None, 0.0, 0.0)
    needed = step + save
    shutdown = max(PREEMPT_FLOOR_S, 10 * math.ceil(PREEMPT_SAFETY * needed / 10))
    return PreemptionNumbers(job=name, step_seconds=step, save_seconds=save, needed_seconds=needed,
                             shutdown_seconds=shutdown, signal_lead_seconds=shutdown + PREEMPT_RELAY_S)


__all__ = ["checkpoint_numbers", "llmc_save_numbers", "stage_checkpoints", "saves_async", "save_count",
           "export_bytes", "on_disk", "with_disk", "pipeline_disk",
           "preemption_numbers", "PREEMPT_SAFETY", "PREEMPT_FLOOR_S", "PREEMPT_RELAY_S",
           "DCP_BYTES_PER_PARAM", "DS_OPTIMIZER_BYTES_PER_PARAM", "WEIGHTS_BYTES_PER_PARAM"]
