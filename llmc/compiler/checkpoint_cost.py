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
    fp32 runs keep no master copy: 4 + 8 = 12 B.

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

Not counted: the DeepSpeed runner's final full-weights ``model.pt`` (once per run), storage contention between
nodes beyond the per-node figure, the filesystem's metadata / fsync latency, and DCP's default async stager
copying into pageable (not pinned) host memory, which may stage slower than the PCIe figure used.

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

from llmc.compiler.result import CheckpointNumbers

DCP_BYTES_PER_PARAM = 12  # fp32 parameters + AdamW exp_avg + exp_avg_sq (torchtitan, llmc's trainer)
DS_OPTIMIZER_BYTES_PER_PARAM = 12  # a ZeRO partition: fp32 master + AdamW exp_avg + exp_avg_sq (DeepSpeed)
DS_FP32_MASTER_BYTES = 4  # ZeRO-0 bf16 (FP16_Optimizer): the fp32 master copy in rank 0's model-states file
ADAM_MOMENT_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
# sha256 over a file read back, GB/s on one core (Python hashlib / OpenSSL): 1.2 GB/s measured on a 2-core x86
# development machine; OpenSSL's SHA-NI kernels reach about 2 GB/s. A conservative round figure, not fitted.
HASH_GBPS = 1.0


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


def checkpoint_numbers(sm, plan, gpu, *, backend: str, params_total: float, precision: str, steps: int,
                       interval: int, step_seconds: float, async_save: bool,
                       write_gbps: float | None = None) -> CheckpointNumbers:
    """:class:`CheckpointNumbers` of ``plan`` (a ``ParallelPlan``) on ``gpu`` (the cluster's ``hardware.GPU``) with
    the time model ``sm`` (``timing.StepModel``): ``steps`` steps, a save every ``interval``, each training step
    ``step_seconds``; ``async_save`` from :func:`saves_async`; ``write_gbps``: the spec's
    ``training.checkpoint.write_gbps`` (None: the table's ``storage_write_gbps``)."""
    from llmc.compiler import timing
    from llmc.compiler.hardware import STORAGE_WRITE_GBPS

    world = plan.world
    ranks_per_node = max(1, min(gpu.gpus_per_node, world))
    if backend == "deepspeed":
        w = 4 if precision == "fp32" else 2  # the module's dtype (fp8 trains as bf16 on DeepSpeed)
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
        lt = timing.layout_timer(sm, plan)
        per_param = DCP_BYTES_PER_PARAM
        gpu_bytes = DCP_BYTES_PER_PARAM * lt.owned
        copies = plan.dp_replicate if plan.zero_stage >= 1 else plan.dp_shard * plan.dp_replicate * plan.cp
        if world <= ranks_per_node:  # one node writes the whole state, once
            node = DCP_BYTES_PER_PARAM * params_total
        else:  # the node of the heaviest stage: its ranks at that stage's share, any other stage's at the average
            same = min(ranks_per_node, world // plan.pp)
            node = same * gpu_bytes / copies + (ranks_per_node - same) * DCP_BYTES_PER_PARAM * params_total / world
        who = "torchtitan" if backend == "torchtitan" else "llmc's trainer" if backend == "native" else backend
        writer = (f"{who} DCP: fp32 params + AdamW m, v = {DCP_BYTES_PER_PARAM} B/param"
                  + (f", each shard's writing shared by its {copies} replicas" if copies > 1 else ""))
    state = per_param * params_total
    if write_gbps is not None:
        bw, source = float(write_gbps), "training.checkpoint.write_gbps"
    else:
        bw = float(gpu.storage_write_gbps)
        source = ("the table's conservative default; training.checkpoint.write_gbps sets it"
                  if bw == STORAGE_WRITE_GBPS else f"the table's {gpu.key} storage_write_gbps")
    write = node / (bw * 1e9)
    # llmc's trainer hashes each rank's files before the checkpoint counts (checkpoint._finalize)
    hashing = node / ranks_per_node / (HASH_GBPS * 1e9) if backend == "native" else 0.0
    staging_bps = sm.host_Bps  # the GPU's PCIe link to the host x COMM_EFFICIENCY (timing.step_model)
    if async_save:
        stall = gpu_bytes / staging_bps + max(0.0, write - interval * step_seconds) + hashing
    else:
        stall = write + hashing
    saves = save_count(steps, interval)
    return CheckpointNumbers(
        saves=saves, interval=interval, mode="async" if async_save else "sync", writer=writer,
        bytes_per_param=per_param, state_bytes=state, node_bytes=node, gpu_bytes=gpu_bytes, write_gbps=bw,
        write_source=source, staging_gbps=staging_bps / 1e9, write_seconds=write, hash_seconds=hashing,
        stall_seconds=stall, total_seconds=(saves - 1) * stall + write + hashing,
    )


__all__ = ["checkpoint_numbers", "saves_async", "save_count", "DCP_BYTES_PER_PARAM", "DS_OPTIMIZER_BYTES_PER_PARAM"]
