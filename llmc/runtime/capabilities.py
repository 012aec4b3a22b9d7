"""What each training backend llmc launches can run (no torch import: the emitters read it too).

The native runtime (``llmc.runtime.train``) shards with DDP, FSDP2, HSDP and tensor parallelism; it has
no pipeline, context or expert parallelism, so a plan using any of those runs on torchtitan. llmc's
DeepSpeed runner (``llmc.runtime.ds_train``) and the torchtitan job train the next-token LM stages;
chat post-training stages (SFT, DPO, GRPO) run on the native runtime.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmc.spec.schema import LM_KINDS

#: Parallel degrees the native trainer refuses (a plan using any of them runs on torchtitan).
NATIVE_UNSUPPORTED: tuple[str, ...] = ("pp", "cp", "ep")
#: Stage kinds llmc's DeepSpeed runner trains; the others run on the native runtime.
DS_STAGE_KINDS: tuple[str, ...] = LM_KINDS
#: Stage kinds the emitted torchtitan job runs; the others run on the native runtime.
TITAN_STAGE_KINDS: tuple[str, ...] = ("pretrain",)


#: The pre-training job module llmc emits (``torchtitan/llmc_job.py``).
TITAN_PRETRAIN_MODULE = "llmc_job"


def titan_dump_subdir(stage: str | None = None) -> str:
    """torchtitan's dump folder (its DCP checkpoints, TensorBoard logs) under ``<run dir>/outputs/``: the pre-training
    job's (``stage`` None), or the own job of continued-training stage ``stage`` (a stage with a ``layout`` in the
    lock). Stage names are plain path components (``llmc.spec.schema.NAME_PATTERN``)."""
    return "torchtitan" if stage is None else f"torchtitan-{stage}"


def titan_own_job(kind: str, layout: object) -> bool:
    """Whether a stage of ``kind`` with the lock's ``layout`` entry runs as a torchtitan job of its own (continued
    training with its own searched layout: ``torchtitan/llmc_job_stageN.py``, dump folder ``torchtitan-<stage>``)
    when the build trains on torchtitan, rather than as pre-training's job (``TITAN_STAGE_KINDS``) or on llmc's
    trainer."""
    return bool(layout) and kind not in TITAN_STAGE_KINDS


def titan_stage_module(index: int) -> str:
    """The torchtitan job module (``torchtitan/<name>.py``) of the stage at position ``index`` of the lock's stages
    (continued-training stages with their own ``layout``; the pre-training job is ``llmc_job``)."""
    return f"llmc_job_stage{index}"


#: The folder llmc's DeepSpeed runner keeps its resumable checkpoints in (``engine.save_checkpoint`` tags
#: ``step-N``, ZeRO shards included, and DeepSpeed's ``latest``), inside the stage's checkpoint folder
#: (``training.checkpoint.folder``, where its final llmc checkpoint goes too): a folder of its own, since the two
#: formats share the ``step-N`` names, and so each is pruned to ``keep_latest`` apart.
DS_CHECKPOINT_SUBDIR = "deepspeed"


def ds_checkpoint_dir(stage_dir: str | os.PathLike, checkpoint_folder: str) -> Path:
    """Where the DeepSpeed runner's resumable checkpoints of the stage whose run folder is ``stage_dir`` are:
    ``<stage_dir>/<training.checkpoint.folder>/deepspeed``."""
    return Path(stage_dir) / checkpoint_folder / DS_CHECKPOINT_SUBDIR


#: Where llmc's DeepSpeed runner kept its resumable checkpoints before they moved under the checkpoint folder:
#: ``<stage_dir>/ds_checkpoints`` (what an interrupted run of an older llmc left there).
DS_LEGACY_CHECKPOINT_SUBDIR = "ds_checkpoints"


def ds_resume_dir(stage_dir: str | os.PathLike, checkpoint_folder: str) -> Path:
    """The folder a DeepSpeed rerun of the stage resumes from: :func:`ds_checkpoint_dir`, unless that holds no
    checkpoint (no ``latest``) and the one an earlier llmc kept them in (``<stage_dir>/ds_checkpoints``) does: an
    interrupted run of that llmc resumes from there (its new checkpoints go to :func:`ds_checkpoint_dir`), so an
    upgrade never starts a run over."""
    new = ds_checkpoint_dir(stage_dir, checkpoint_folder)
    old = Path(stage_dir) / DS_LEGACY_CHECKPOINT_SUBDIR
    return old if not (new / "latest").is_file() and (old / "latest").is_file() else new
