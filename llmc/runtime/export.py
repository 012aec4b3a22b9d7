"""``llmc export RUN_DIR --stage S`` (``python -m llmc.runtime.hf_io``): find what to export, then convert it.

The command's checks that need no tensors (a lock beside RUN_DIR or in its parent, a stage the lock knows, that
stage's output folder or torchtitan checkpoint folder) run here, before :mod:`llmc.runtime.hf_io` and torch are
imported (seconds of CPU): a mistyped path or stage name is refused at once, as one ``error[R010]`` line. The
conversion itself is :func:`llmc.runtime.hf_io.export_stage`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.runtime.errors import HFError


@dataclass(frozen=True)
class ExportTarget:
    """What ``llmc export`` converts: stage ``job.stage`` of the lock at ``lock_path``, from its output folder
    ``stage_dir`` (llmc's checkpoints, DONE.json) or torchtitan's checkpoint folder ``titan``."""

    job: Any  # llmc.runtime.job.TrainJob
    lock_path: Path
    stage_dir: Path
    titan: Path
    tokenizer_dir: Path | None


def find_lock(run_dir: Path) -> tuple[Path, Path]:
    """(lock path, stage-run root holding <stage>/) from a build dir or its run/ dir."""
    for lock, root in ((run_dir / "plan.lock.json", run_dir / "run"), (run_dir.parent / "plan.lock.json", run_dir)):
        if lock.exists():
            return lock, root
    raise HFError(f"{run_dir}: no plan.lock.json here or in the parent (give the build dir)")


def export_target(run_dir: str | Path, stage: str) -> ExportTarget:
    """Stage ``stage`` of the build at ``run_dir`` (the build dir or its ``run/`` folder), checked to have output;
    :class:`HFError` (or the lock's / job's ValueError) otherwise. Imports no torch."""
    from llmc.lockfile import read_lock
    from llmc.runtime.capabilities import titan_dump_subdir
    from llmc.runtime.job import TrainJob

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
    return ExportTarget(job=job, lock_path=lock_path, stage_dir=stage_dir, titan=titan,
                        tokenizer_dir=tok_dir if (tok_dir / "tokenizer.json").exists() else None)


def export_checkpoint(run_dir: str | Path, stage: str, out: str | Path | None = None) -> dict[str, Any]:
    """``llmc export RUN_DIR --stage S``: write ``<RUN_DIR>/run/<S>/hf`` (or ``out``) from stage S's final
    checkpoint. RUN_DIR is the build dir (with plan.lock.json) or its ``run/`` folder."""
    t = export_target(run_dir, stage)
    return convert(t, out)


def convert(t: ExportTarget, out: str | Path | None) -> dict[str, Any]:
    from llmc.runtime.hf_io import export_stage  # torch

    pre = t.job.kind in ("pretrain", "midtrain", "long_context")
    res = export_stage(t.job, t.stage_dir, out, tokenizer_dir=t.tokenizer_dir, search=(t.titan,) if pre else ())
    if res.get("hf") is None and res.get("line") is None:
        raise HFError(f"stage {t.job.stage!r}: {res['why']}")
    return res  # (an architecture without an export: its "line", the plan's X130 warning, says so)


def _error(run_dir: Path, stage: str, e: BaseException) -> int:
    if isinstance(e, (HFError, ValueError, OSError, KeyError)):
        print(f"{run_dir}: error[R010] export {stage}: {e}", file=sys.stderr)
    else:  # what the stage's files hold is the user's: a malformed DONE.json or checkpoint is one error line
        why = str(e).strip().splitlines()[-1][:300] if str(e).strip() else ""
        print(f"{run_dir}: error[R010] export {stage}: unreadable run files ({type(e).__name__}: {why}) (check "
              f"the stage's DONE.json and checkpoints, or rerun the stage)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.hf_io",
                                 description="Export a finished stage as a Hugging Face model directory.")
    ap.add_argument("run_dir", type=Path, help="build dir (with plan.lock.json) or its run/ folder")
    ap.add_argument("--stage", required=True, help="stage name (pretrain for the main pre-training)")
    ap.add_argument("-o", "--out", type=Path, default=None, help="output dir (default RUN_DIR/run/<stage>/hf)")
    a = ap.parse_args(argv)
    try:
        target = export_target(a.run_dir, a.stage)
    except Exception as e:  # noqa: BLE001 (a lock or stage the user named: one line, never a traceback)
        return _error(a.run_dir, a.stage, e)
    from torch.distributed.checkpoint.api import (
        CheckpointException,  # (a BaseException: a bad DCP checkpoint)
    )

    try:
        res = convert(target, a.out)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        return _error(a.run_dir, a.stage, e)
    if res.get("hf") is None:  # the plan said so (X130): the finished run keeps its checkpoints, and is not failed
        print(f"{a.run_dir}: warning[X130] stage {a.stage}: {res['line']}", file=sys.stderr)
        return 0
    print(f"wrote {res['hf']}" + (f" and {res['adapter']}" if res.get("adapter") else ""))
    if res.get("adapter_note"):  # a LoRA stage whose adapter has no PEFT layout: the merged model only
        print(f"warning: stage {a.stage}: {res['adapter_note']}")
    return 0
