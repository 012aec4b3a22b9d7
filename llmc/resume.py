"""The resume outlook: what ``llmc launch`` does with each stage's unfinished run, before anything runs.

``resumptions(build_dir, cmds)`` is what the launch does with each stage's unfinished run, before anything runs (``llmc
launch`` and ``--dry-run`` say it, ``llmc build`` warns, X017): it resumes from its newest complete checkpoint (a
``note:`` line naming the step), or this build cannot resume it and the launch refuses it now, with the line its trainer
would stop on after prepare, found with the trainer's own checks read from files: a torchtitan run started under
another lock (L005, naming what changed; a steps change that keeps the LR at the checkpoint's step resumes, as on llmc's
trainer), a torchtitan checkpoint saved by another data-parallel size (L018: its DCP metadata's data loader keys, read
without torch), an llmc checkpoint of another LR schedule or global batch (L018: its ``train.json``).

Everything here reads files without torch (``train.json``, ``FINGERPRINT.json``, a DCP ``.metadata`` through an
unpickler that imports and calls nothing): ``llmc launch`` and ``--dry-run`` print it, ``llmc build`` warns (X017),
and :func:`llmc.launch.start_stage` applies :func:`titan_run_change` again as a torchtitan stage starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmc.emit.common import RUNTIME_ENTRY
from llmc.launch import Cmd, LaunchError, _stages, load_build
from llmc.runtime.job import (
    LaunchOptions,
    checkpoint_step,
    export_way,
    rerun_command,
    resume_checkpoint,
    titan_lock_change,
    titan_lock_message,
    titan_world_change,
)
from llmc.spec.schema import LM_KINDS


def _stage_job(lock: dict, stage: str, b: Path, world: int):
    """The ``llmc.runtime.job.TrainJob`` the stage's trainer builds from the lock on ``world`` processes (its
    ``WORLD_SIZE``, which a continued-training stage's data parallelism follows), else None (a lock too malformed to
    say: the trainer reports it)."""
    from llmc.runtime.job import TrainJob

    try:
        return TrainJob.from_lock(lock, stage, b, world=world)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def titan_run_change(c: Cmd, build_dir: str | os.PathLike, options: LaunchOptions | None = None,
                     lock: dict | None = None) -> str | None:
    """Why the unfinished torchtitan run of ``c`` (its stage folder's ``FINGERPRINT.json``, written when it started, and
    checkpoints in its dump folder) is not this build's to resume, in one line naming what changed (``steps 40 -> 60``
    and the LR jump) and the ways out (:func:`llmc.runtime.job.titan_lock_change`, the judgement the emitted launch
    scripts apply too); None when it is, or there is no such run. ``lock``: the build's (read when not given). The one
    check of ``start_stage`` and :func:`resumptions`."""
    if not (c.record and c.dump_dir and c.stage_dir):
        return None
    if lock is None:
        try:
            lock = load_build(build_dir)[1]
        except LaunchError:
            lock = None
    change = titan_lock_change(lock, c.stage, build_dir, c.stage_dir, c.dump_dir, c.record)
    if change is None:
        return None
    return titan_lock_message(c.stage, change, c.dump_dir, build_dir, options)


def native_resume_problem(lock: dict, stage: str, checkpoint: Path, world: int, b: Path,
                          options: LaunchOptions | None = None) -> str | None:
    """Why llmc's trainer, started on ``world`` processes, would refuse to resume ``checkpoint`` (a ``step-N`` folder
    of ``stage``), read without torch from its ``train.json``: the trainer's own checks, in its order
    (``llmc.runtime.train``'s ``restore``): another stage's checkpoint (``TrainJob.foreign_checkpoint``), another
    LR schedule or optimizer, or a steps change that moves the LR at the step (``TrainJob.schedule_change``), and the
    data position (``llmc.runtime.data.StreamLoader.load_state_dict``: the global batch's sequences, seq_len and seed).
    Not the model's tensor shapes (the checkpoint's tensors: the trainer checks them as it loads). None: it resumes
    (or the checkpoint or lock say too little to tell). ``options``: the launch's, which the command it prints
    carries."""
    import json

    try:
        saved = json.loads((checkpoint / "train.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    job = _stage_job(lock, stage, b, world) if isinstance(saved, dict) else None
    if job is None:
        return None
    why = job.foreign_checkpoint(saved, checkpoint)
    if why is not None:
        return why
    at = saved.get("step")
    step = at if isinstance(at, int) and not isinstance(at, bool) else 0
    ways = (f"`{rerun_command(b, stage, options)}` sets the run aside and trains the stage over; or rebuild with the "
            f"old values and finish the run; or {export_way(b, stage, step)}")
    why = job.schedule_change(saved.get("lr_schedule"), checkpoint.name, step, redo=ways)
    if why is not None:
        return why
    data = saved.get("data")
    if isinstance(data, dict) and data.get("kind") == "stream":
        # (torch-free: the check the trainer's loader applies as it loads the position, on this job's numbers)
        from llmc.runtime.data import position_change

        why = position_change(data, job.global_batch_seqs, job.seq_len, job.seed, redo=ways)
        if why is not None:
            return f"checkpoint {checkpoint.name} (step {step}): {why}"
    return None


@dataclass(frozen=True)
class Resumption:
    """A stage of a launch that holds an unfinished run: the newest complete ``checkpoint`` it resumes from and its
    ``step``; ``refusal``: why this build cannot resume it (one line; None: it resumes), ``lock_change`` when that is
    a torchtitan run started under another lock (L005) rather than a checkpoint this build cannot continue (L018);
    ``checked``: whether llmc read the checkpoint's state here (a DeepSpeed one's is checked as DeepSpeed loads it)."""

    stage: str
    checkpoint: Path
    step: int | None
    refusal: str | None = None
    lock_change: bool = False
    checked: bool = True

    def note(self) -> str:
        """The line that says the resume (``--dry-run`` and the launch print it)."""
        at = f"step {self.step}" if self.step is not None else "its newest checkpoint"
        line = f"resumes stage {self.stage!r} from {at} ({os.path.relpath(self.checkpoint)})"
        return line if self.checked else line + " (DeepSpeed checks its state as it loads it)"


def resumptions(build_dir: str | os.PathLike, cmds: list[Cmd], options: LaunchOptions | None = None
                ) -> list[Resumption]:
    """What the launch of ``cmds`` does with each stage's unfinished run, before anything runs: for each training
    command that runs (not skipped, not stale) and finds a complete checkpoint (:func:`llmc.runtime.job.
    resume_checkpoint`), that it resumes from it, or why this build cannot (the refusal the launch or the trainer
    would give after prepare, found with the same checks): a torchtitan run started under another lock
    (:func:`titan_run_change`) or saved by another data-parallel size (:func:`titan_world_change`), a native
    pre-training / continued-training checkpoint the trainer would refuse (:func:`native_resume_problem`). A DeepSpeed
    checkpoint's state is a torch pickle: it is named, unchecked; a post-training stage's mid-stage checkpoints are not
    looked at. ``llmc launch`` (``--dry-run`` too) and ``llmc build`` (X017) say them."""
    b, lock = load_build(build_dir)
    stages = {s["name"]: s for s in _stages(lock)}
    out: list[Resumption] = []
    for c in cmds:
        s = stages.get(c.stage)
        if s is None or c.skip_reason or c.stale or c.evaluates or not c.checkpoints:
            continue
        saved = resume_checkpoint(c.checkpoints)
        step = checkpoint_step(saved)
        if c.dump_dir:  # torchtitan
            why = titan_run_change(c, b, options, lock)
            if why is not None:
                out.append(Resumption(c.stage, saved or Path(c.dump_dir), step, why, lock_change=True))
                continue
            if saved is not None:
                out.append(Resumption(c.stage, saved, step, titan_world_change(b, lock, s, saved, options)))
        elif saved is None:
            continue
        elif RUNTIME_ENTRY in c.argv and s["kind"] in LM_KINDS:
            nproc = int(c.argv[c.argv.index("--nproc_per_node") + 1]) if "--nproc_per_node" in c.argv else 1
            why = native_resume_problem(lock, c.stage, saved, nproc, b, options)
            if why is not None:
                why = (f"stage {c.stage!r}: its unfinished run cannot be resumed by this build from its newest "
                       f"checkpoint: {why}")
            out.append(Resumption(c.stage, saved, step, why))
        elif "llmc.runtime.ds_train" in c.argv:
            out.append(Resumption(c.stage, saved, step, checked=False))
    return out
