"""``llmc export RUN_DIR --stage S`` (``python -m llmc.runtime.hf_io``): find what to export, then convert it.

The command's checks that need no tensors (a lock beside RUN_DIR or in its parent, a stage the lock knows, that
stage's output folder or torchtitan checkpoint folder) run here, before :mod:`llmc.runtime.hf_io` and torch are
imported (seconds of CPU): a mistyped path or stage name is refused at once, as one ``error[R010]`` line. So is a
stage ``llmc launch`` would refuse as stale (:func:`llmc.runtime.job.stage_staleness`, launch's own check: its
DONE.json records another lock's fingerprint, or, unfinished, it starts from a stage that does), unless
``--allow-stale`` (one ``warning[R015]`` line, and the export records it). The conversion itself is
:func:`llmc.runtime.hf_io.export_stage`; the export's ``.llmc-export.json`` records its provenance
(:func:`provenance`): the lock's sha256, the fingerprint the stage's run was trained under (its DONE.json's), the
checkpoint step exported and llmc's version.

``--step N`` exports the checkpoint of step N instead of the stage's final one, into ``run/<stage>/hf-step-N`` (never
the stage's ``hf``): an llmc checkpoint, a DeepSpeed run's resumable one or a torchtitan DCP one
(:func:`kept_checkpoints`, found from folder names here, before torch; read by :func:`llmc.runtime.hf_io.
export_stage`). A step with none is one ``error[R010]`` line naming the steps that are kept. A stage that has not
finished (killed, or still training) exports its kept steps all the same.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmc.runtime.errors import HFError


@dataclass(frozen=True)
class StepCheckpoint:
    """One kept checkpoint of a stage: step ``step`` in ``format`` at ``path``. Formats: ``"llmc"`` (a ``step-N``
    folder with its manifest.json, :mod:`llmc.runtime.checkpoint`), ``"deepspeed"`` (a tag folder
    ``engine.save_checkpoint`` wrote: :func:`llmc.runtime.ds_train.save_ds_checkpoint`), ``"torchtitan"`` (a DCP
    ``step-N`` folder with its ``.metadata``)."""

    step: int
    format: str
    path: Path


@dataclass(frozen=True)
class ExportTarget:
    """What ``llmc export`` converts: stage ``job.stage`` of the lock at ``lock_path``, from its output folder
    ``stage_dir`` (llmc's checkpoints, DONE.json) or torchtitan's checkpoint folder ``titan``."""

    job: Any  # llmc.runtime.job.TrainJob
    lock_path: Path
    stage_dir: Path
    titan: Path
    tokenizer_dir: Path | None
    #: why the stage's run is not this lock's result (the L005 text), None when it is
    stale: str | None = None
    #: the export's provenance (:func:`provenance`)
    record: dict | None = None
    #: the checkpoint ``--step`` names (None: the stage's final checkpoint)
    checkpoint: StepCheckpoint | None = None

    @property
    def search(self) -> tuple[Path, ...]:
        """Where torchtitan's DCP checkpoints of the stage may be besides its folder: the dump folder, for a stage a
        torchtitan job trains (pre-training, or continued training with its own searched layout: the rule of
        ``llmc.launch.launch_commands``); none for a continued stage llmc's trainer runs, whose dump folder would be
        pre-training's."""
        from llmc.runtime.capabilities import TITAN_STAGE_KINDS

        own = bool((self.job.stage_plan or {}).get("layout"))
        return (self.titan,) if self.job.kind in TITAN_STAGE_KINDS or own else ()


def find_lock(run_dir: Path) -> tuple[Path, Path]:
    """(lock path, stage-run root holding <stage>/) from a build dir or its run/ dir."""
    for lock, root in ((run_dir / "plan.lock.json", run_dir / "run"), (run_dir.parent / "plan.lock.json", run_dir)):
        if lock.exists():
            return lock, root
    raise HFError(f"{run_dir}: no plan.lock.json here or in the parent (give the build dir)")


def export_target(run_dir: str | Path, stage: str, step: int | None = None) -> ExportTarget:
    """Stage ``stage`` of the build at ``run_dir`` (the build dir or its ``run/`` folder), checked to have output
    (``step``: a kept checkpoint of that step, :func:`kept_checkpoints`); :class:`HFError` (or the lock's / job's
    ValueError) otherwise. Imports no torch."""
    from llmc.lockfile import read_lock
    from llmc.runtime.capabilities import titan_dump_subdir
    from llmc.runtime.job import FINGERPRINT_FILE, TrainJob, stage_staleness, trained_options

    run_dir = Path(run_dir).resolve()
    lock_path, root = find_lock(run_dir)
    lock = read_lock(lock_path)  # a regular file of bounded size, a current lock (never a FIFO or /dev/zero)
    job = TrainJob.from_lock(lock, stage)
    stage_dir = root / job.stage
    # torchtitan's dump folder (its DCP checkpoints): the pre-training job's, or the stage's own job's
    own = bool((job.stage_plan or {}).get("layout"))
    titan = lock_path.parent / "outputs" / titan_dump_subdir(job.stage if own else None)
    if not stage_dir.is_dir() and not titan.is_dir():
        raise HFError(f"{stage_dir}: stage {stage!r} has no output yet (run `llmc launch` first)")
    tok_dir = lock_path.parent / "assets"
    memo: dict = {}  # (the data digests, read once)
    export = (stage_dir / FINGERPRINT_FILE).is_file()
    fin, stale = stage_staleness(lock, job.stage, root, lock_path.parent, export=export, memo=memo)
    if stale and fin is not None and fin.backend:  # the rerun it prints trains on the backend that trained the stage
        fin, stale = stage_staleness(lock, job.stage, root, lock_path.parent, export=export, memo=memo,
                                     options=trained_options(fin, lock_path.parent, lock))
    t = ExportTarget(job=job, lock_path=lock_path, stage_dir=stage_dir, titan=titan,
                     tokenizer_dir=tok_dir if (tok_dir / "tokenizer.json").exists() else None, stale=stale,
                     record=provenance(lock_path, lock, job.stage, fin, stale))
    if step is None:
        return t
    kept = kept_checkpoints(job, stage_dir, t.search)
    if step not in kept:
        raise HFError(missing_step(job, step, kept))
    return replace(t, checkpoint=kept[step])


#: the most kept steps a missing step's error line lists (the oldest few and the newest ones, with the count)
SHOWN_STEPS = 10


def kept_checkpoints(job: Any, stage_dir: Path, search: tuple[Path, ...] = ()) -> dict[int, StepCheckpoint]:
    """step -> the checkpoint of that step ``llmc export --step`` reads, from folder names alone (no torch, no file
    read): the stage's llmc checkpoints (``<stage_dir>/<training.checkpoint.folder>/step-N`` with its manifest.json;
    a post-training stage's ``checkpoints/step-N``, where :mod:`llmc.runtime.posttrain` writes its final weights),
    then a DeepSpeed run's resumable ones (tags ``step-N`` holding model states in
    :func:`llmc.runtime.capabilities.ds_checkpoint_dir`, then in the folder an older llmc kept them in), then
    torchtitan's DCP checkpoints (``step-N/.metadata`` under ``stage_dir`` or ``search``); a step kept in more than
    one format is read from the first. Steps match by number: ``step-10`` and ``step-00000010`` are step 10."""
    from llmc.runtime.capabilities import DS_LEGACY_CHECKPOINT_SUBDIR, ds_checkpoint_dir
    from llmc.runtime.job import is_dcp, step_folders
    from llmc.spec.schema import LM_KINDS

    folder = stage_dir / (job.checkpoint_folder if job.kind in LM_KINDS else "checkpoints")
    found: dict[int, StepCheckpoint] = {}
    for fmt, where, holds, deep in (
            ("llmc", (folder,), lambda p: (p / "manifest.json").is_file(), False),
            ("deepspeed", (ds_checkpoint_dir(stage_dir, job.checkpoint_folder), stage_dir / DS_LEGACY_CHECKPOINT_SUBDIR),
             lambda p: any(p.glob("*model_states.pt")), False),
            ("torchtitan", (stage_dir, *search), is_dcp, True)):
        for d in where:
            for n, p in step_folders(d, holds, deep=deep).items():
                found.setdefault(n, StepCheckpoint(n, fmt, p))
    return found


def missing_step(job: Any, step: int, kept: dict[int, StepCheckpoint]) -> str:
    """The R010 text of a ``--step`` with no kept checkpoint: the stage, the step, the steps kept (at most
    :data:`SHOWN_STEPS`) and why older ones may be gone."""
    from llmc.spec.schema import LM_KINDS

    have = sorted(kept)
    if len(have) > SHOWN_STEPS:
        head = SHOWN_STEPS // 3
        shown = f"{', '.join(map(str, have[:head]))}, ..., {', '.join(map(str, have[head - SHOWN_STEPS:]))}; " \
                f"{len(have)} in all"
    else:
        shown = ", ".join(map(str, have)) or "none"
    if job.kind not in LM_KINDS:
        why = ("a post-training stage keeps its final weights only: its mid-stage checkpoints "
               "(checkpoints/resume) hold only what it trains")
    else:
        why = f"one is written every {job.checkpoint_interval} steps (training.checkpoint.interval_steps)"
        if job.keep_latest:
            why += f" and training.checkpoint.keep_latest ({job.keep_latest}) prunes older ones"
    if step > int(job.steps):
        why = f"the stage trains {job.steps} steps; {why}"
    return f"stage {job.stage!r} has no checkpoint of step {step} (kept: {shown}; {why})"


def provenance(lock_path: Path, lock: dict, stage: str, fin: Any, stale: str | None) -> dict:
    """What ``.llmc-export.json`` records of where an export's weights come from: the sha256 of the lock
    (``lock_sha256``, the file's bytes, as ``sha256sum plan.lock.json`` prints it), the stage, the fingerprint its
    run was trained under (``fingerprint_sha256``: its marker's, DONE.json; None for a run that has not finished or
    an older llmc's, which records none) and the lock's fingerprint of the stage (``lock_fingerprint_sha256``: the
    same for a run this lock trained), whether it finished, and ``stale``: whether that run is not this lock's
    result (exported with ``--allow-stale``; ``stale_reason`` says why). The step exported and llmc's version are added where the weights
    are read (:func:`llmc.runtime.hf_io.export_stage`)."""
    import json

    from llmc.fileio import sha256_file
    from llmc.runtime.job import FINGERPRINT_SHA, fingerprint_record

    trained = None
    if fin is not None:
        try:
            marker = json.loads(fin.marker.read_text())
        except (OSError, ValueError, RecursionError):
            marker = None
        trained = marker.get(FINGERPRINT_SHA) if isinstance(marker, dict) else None
    now = fingerprint_record(lock, stage).get(FINGERPRINT_SHA)
    return {"lock_sha256": sha256_file(lock_path), "stage": stage,
            "fingerprint_sha256": trained if isinstance(trained, str) else None, "lock_fingerprint_sha256": now,
            "finished": fin is not None, "stale": bool(stale), **({"stale_reason": stale} if stale else {})}


def export_checkpoint(run_dir: str | Path, stage: str, out: str | Path | None = None, *,
                      allow_stale: bool = False, step: int | None = None) -> dict[str, Any]:
    """``llmc export RUN_DIR --stage S``: write ``<RUN_DIR>/run/<S>/hf`` (or ``out``) from stage S's final
    checkpoint (``step``: its checkpoint of that step, into ``run/<S>/hf-step-N``). RUN_DIR is the build dir (with
    plan.lock.json) or its ``run/`` folder. A stale stage is an :class:`HFError` unless ``allow_stale``."""
    t = export_target(run_dir, stage, step)
    if t.stale and not allow_stale:
        raise HFError(stale_refusal(t.stale))
    return convert(t, out)


def stale_refusal(why: str) -> str:
    """The R010 text refusing a stale stage's export: launch's L005 text and the ways out."""
    return (f"{why} (hint: after that `llmc launch`, export again; or pass --allow-stale to export these weights "
            "anyway, recorded as stale in .llmc-export.json)")


def convert(t: ExportTarget, out: str | Path | None) -> dict[str, Any]:
    from llmc.runtime.hf_io import export_stage  # torch

    res = export_stage(t.job, t.stage_dir, out, tokenizer_dir=t.tokenizer_dir, search=t.search, record=t.record,
                       checkpoint=t.checkpoint)
    if res.get("hf") is None and res.get("line") is None:
        raise HFError(f"stage {t.job.stage!r}: {res['why']}")
    return res  # (an architecture without an export: its "line", the plan's X130 warning, says so)


def _line(text: str) -> str:
    """A message on one line: its unprintable characters (a newline, a terminal escape) escaped, as ``llmc``'s own
    error lines have them (a name it quotes with ``repr`` is escaped already, and stays as it is)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _error(run_dir: Path, stage: str, e: BaseException) -> int:
    """One ``error[R010]`` line on stderr: the path and the stage name as given (``llmc.escape.visible``) and the
    message (:func:`_line`), so a newline in any of them cannot split the error in two; returns 1."""
    from llmc.escape import visible

    if isinstance(e, (HFError, ValueError, OSError, KeyError)):
        print(f"{visible(str(run_dir))}: error[R010] export {visible(stage)}: {_line(str(e))}", file=sys.stderr)
    else:  # what the stage's files hold is the user's: a malformed DONE.json or checkpoint is one error line
        why = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        print(f"{visible(str(run_dir))}: error[R010] export {visible(stage)}: unreadable run files "
              f"({type(e).__name__}: {_line(why)}) (check the stage's DONE.json and checkpoints, or rerun the stage)",
              file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.hf_io",
                                 description="Export a finished stage (or a kept checkpoint of a stage: --step) as a "
                                 "Hugging Face model directory.")
    ap.add_argument("run_dir", type=Path, help="build dir (with plan.lock.json) or its run/ folder")
    ap.add_argument("--stage", required=True, help="stage name (pretrain for the main pre-training)")
    ap.add_argument("-o", "--out", type=Path, default=None,
                    help="output dir (default RUN_DIR/run/<stage>/hf, with --step RUN_DIR/run/<stage>/hf-step-N)")
    ap.add_argument("--step", default=None, help="export the stage's kept checkpoint of this step, not its final one")
    ap.add_argument("--allow-stale", action="store_true",
                    help="export a stage `llmc launch` refuses as stale (finished under another lock), recorded so")
    a = ap.parse_args(argv)
    from llmc.escape import visible

    step = None
    if a.step is not None:
        step = int(a.step) if a.step.isascii() and a.step.isdigit() else None
        if step is None:
            return _error(a.run_dir, a.stage, HFError(f"--step must be a step number (a whole number >= 0), got "
                                                      f"{a.step!r}"))
    try:
        target = export_target(a.run_dir, a.stage, step)
    except Exception as e:  # noqa: BLE001 (a lock or stage the user named: one line, never a traceback)
        return _error(a.run_dir, a.stage, e)
    if target.stale and not a.allow_stale:
        return _error(a.run_dir, a.stage, HFError(stale_refusal(target.stale)))
    if target.stale:
        print(f"{visible(str(a.run_dir))}: warning[R015] export {visible(a.stage)}: {_line(target.stale)}; exporting "
              "these weights anyway (--allow-stale; .llmc-export.json records them as stale)", file=sys.stderr)
    from torch.distributed.checkpoint.api import (
        CheckpointException,  # (a BaseException: a bad DCP checkpoint)
    )

    try:
        res = convert(target, a.out)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        return _error(a.run_dir, a.stage, e)
    if res.get("hf") is None:  # the plan said so (X130): the finished run keeps its checkpoints, and is not failed
        print(f"{visible(str(a.run_dir))}: warning[X130] stage {visible(a.stage)}: {_line(res['line'])}",
              file=sys.stderr)
        return 0
    print(f"wrote {res['hf']}" + (f" and {res['adapter']}" if res.get("adapter") else ""))
    if res.get("adapter_note"):  # a LoRA stage whose adapter has no PEFT layout: the merged model only
        print(f"warning: stage {visible(a.stage)}: {res['adapter_note']}")
    return 0
