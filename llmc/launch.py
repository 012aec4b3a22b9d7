"""``llmc launch``: the exact commands that run a built job, stage by stage.

``launch_commands(build_dir, backend, nproc, stage)`` reads ``build_dir/plan.lock.json`` and returns
the prepare step followed by one command per stage in the lock's stage order (one ``pretrain``
stage when the spec has none). A stage whose ``<run_dir>/<stage>/DONE.json`` exists (the runtime
writes it when a stage finishes) is returned with ``skip_reason`` set, so a re-launch resumes at
the first unfinished stage. Pure: builds argv/env only (the CLI runs them); never imports torch.

Backends:

* prepare        ``python -m llmc.runtime.entry prepare --lock L`` (tokenizer + data under the build dir; with
  ``--stage`` / ``--from`` also ``--stages S1,S2``: the data sources of the stages it runs are checked, not later ones)
* ``native``     ``torchrun --standalone --nproc_per_node N -m llmc.runtime.entry --lock L --stage S --out R/S``
* ``torchtitan`` ``llmc.runtime.titan_launch.torchtitan_command``: ``torchrun ... -m torchtitan.train
  --module llmc_job --config job`` on GPUs; on a machine without a GPU the CPU shim
  ``llmc.runtime.titan_cpu_shim`` replaces ``torchtitan.train`` (never in the emitted GPU scripts).
  torchtitan runs the pre-training stage and each continued-training stage with its own searched ``layout``
  (``torchtitan/llmc_job_stage<i>.py``, started from the Hugging Face export of its ``init_from`` stage, passed as
  ``LLMC_INIT_HF``); each is finished once its ``run/<stage>/hf`` export exists (torchtitan writes no DONE.json);
  the other stages run on the native runtime.
* ``deepspeed``  ``torchrun --standalone --nproc_per_node N -m llmc.runtime.ds_train --lock L --ds-config C ...``
  with ``DS_ACCELERATOR=cpu`` when there is no GPU. torchrun, not the ``deepspeed`` runner, starts the ranks (the
  runner's ``launch.py`` would set the same RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR): after a SIGTERM it lets them
  save for ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` s, the plan's preemption figure, where ``launch.py`` kills them 30 s later
  whatever they are doing (``terminate_process_tree``: ``psutil.wait_procs(children, timeout=30)``, then SIGKILL;
  deepspeed/launcher/launch.py, 0.19.8). Stage kinds the DeepSpeed runner does not train
  (dpo, grpo) run on the native runtime.
* eval           after each stage the lock lists under ``evaluation.tasks.stages``, whatever its backend:
  ``python -m llmc.runtime.evaluate --lock L --stage S --out R/S`` (lm-evaluation-harness on ``R/S/hf``),
  skipped when ``R/S/eval/summary.json`` exists (written last, after any ``eval.every_checkpoints``
  checkpoint scores); the trainers themselves do not evaluate.

Default backend: the one the plan was computed for (the lock's ``backend.name``) when the build has
its artifacts, else ``native``, or ``torchtitan`` when the plan uses pp/cp/ep (which the native trainer
does not run) and the build has a torchtitan job (``llmc.emit.common.launch_backend``, the same rule
the emitted launchers use). Default ``nproc``: the plan's GPUs per node on a GPU machine; for a CPU build
(``hardware.gpu: cpu``) the plan's world size (``hardware.count``) on this one node, as the emitted
launchers do (the runtime refuses any other WORLD_SIZE); 1 for a GPU build on a machine without a GPU.

``check_lock_integrity(build_dir)`` compares ``plan.lock.json`` with the sha256 the build manifest
(``llmc.buildfs``) recorded for it: a lock edited by hand is reported (``llmc launch`` refuses it unless
``--force``), because the launchers and the runtime would run numbers the compiler never produced.
The runtime repeats the check at its start on every backend (``llmc.runtime.entry.check_lock_unedited``: the emitted
launchers run it without ``llmc launch``); the commands for an edited lock (which ``llmc launch`` reaches only with
``--force``) carry ``LLMC_ACCEPT_LOCK_SHA256`` = its sha256, which lets the runtime run that lock and no later edit.
Symbolic links on the run's write path (:func:`linked_write_path`), checked before anything runs, ``--dry-run``
included, and only in the folders a command that runs writes. Where llmc overwrites or deletes files by name -- prepare
in ``assets/`` (the tokenizer files, which it also drops) and, when it writes there, in ``data/`` (a builtin corpus's
``<name>.jsonl``, ``split/``, ``quality*/``) -- a link is refused (LaunchError; prepare refuses the same itself, with
the same function, :func:`llmc.runtime.entry.prepare_link`): through a link to a user's folder it would overwrite and
delete the user's files. ``data/`` may be a link (a dataset mount) when prepare writes nothing there, and a source
folder inside ``data/`` always. In ``run/`` (every stage's folder), ``outputs/`` (a torchtitan stage's checkpoints)
and ``cache/`` (the validation tokens) llmc writes only names of its own (stage folders, ``step-N`` checkpoints,
hash-named files) and deletes only what it wrote (older ``step-N`` folders, its earlier export; ``shutil.rmtree``
never follows a link): a link there, the folder itself or anything in it, that names a directory outside the build
directory is the user's choice of disk (a scratch disk for checkpoints) and is allowed, with a ``note:`` line naming
it (``Cmd.notes`` of the prepare step); one that names a file, nothing, or a place inside the build directory is
refused.
``edited_artifacts(build_dir, cmds)`` does the same for the other artifacts the commands run (a torchtitan job module,
the DeepSpeed config a stage reads): ``llmc launch`` refuses an edited one unless ``--allow-edited``.

A finished stage counts as done only when the current lock trained it: its marker (DONE.json; a torchtitan stage's
``FINGERPRINT.json`` beside its export) records the fingerprint of what decided its result
(``llmc.runtime.job.stage_fingerprint``). A stage finished under another lock (a build directory rebuilt from another
spec), or one that starts from such a stage, is returned with ``stale`` set (what changed and the way out), neither
skipped nor run: ``llmc launch`` refuses it unless ``--no-resume`` sets it aside (the message names ``llmc launch BUILD
--no-resume --from STAGE``: ``from_stage`` runs that stage and every stage after it in the run order, and with
``--no-resume`` each of them is set aside first; ``llmc.runtime.job.stage_staleness`` is the check, which ``llmc
export`` applies too). So is a stage trained from an
``init_hf`` checkpoint (its own or its ``init_from`` chain's) whose files changed since (``llmc.runtime.job.
checkpoint_files``: the weights in that folder are not the ones it was trained from), one whose data sources' files
changed since (its own or its ``init_from`` chain's: ``llmc.runtime.job.data_files``, which names the source and
how; the text a trained tokenizer is trained on counts through the tokenizer), and one whose tokenizer is not the one
prepare holds in ``assets/`` now. A stage that starts, through finished stages, from a stale one is stale too,
finished or not. A marker without a fingerprint
(an older llmc's) is trusted as before, with ``legacy`` set to a warning.

``spec_change_warning(build_dir)`` is the one warning line (L009) ``llmc launch`` prints, ``--dry-run`` too, when the
spec file the lock names (``spec.path``, relative to the build directory) still exists there and its bytes' sha256
differs from the one the build recorded (``spec.file_sha256``): the build is launched as built, and the line gives the
``llmc build`` command (the lock's ``--set`` overrides included) that applies the change. A missing spec file (a build
copied alone to a node) and a lock of an older llmc, which records no file hash, say nothing.

``unfit_warning(build_dir, cmds, backend)`` is the one warning line (L015) ``llmc launch`` prints, ``--dry-run`` too,
when the launch runs pre-training on a backend whose run the compiler found not to fit the GPU (the lock's
``backend_runs``, :func:`llmc.compiler.compile.backend_runs`: a build planned for one backend writes the others'
launchers too); the launch goes on.

The resume outlook (what the launch does with each stage's unfinished run, said before anything runs) is
:mod:`llmc.resume`.

``StderrRelay`` is what a terminal shows of a stage's stderr while the whole of it goes to ``run/<stage>/stderr.log``:
tracebacks, torchrun's failure report (its ``ChildFailedError`` traceback and "=====" banner) and its error log lines
stay in the log; llmc's own located error lines are held back for the one line ``llmc launch`` prints when the stage
fails (they are shown when it does not).
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llmc.compiler.plan import ParallelPlan
from llmc.emit.common import RUNTIME_ENTRY, launch_backend
from llmc.runtime.capabilities import (
    DS_STAGE_KINDS,
    TITAN_PRETRAIN_MODULE,
    TITAN_STAGE_KINDS,
    ds_resume_dir,
    titan_dump_subdir,
    titan_own_job,
    titan_stage_module,
)
from llmc.runtime.evaluate import SUMMARY as EVAL_SUMMARY
from llmc.runtime.evaluate import eval_change, eval_stages
from llmc.runtime.job import (
    LaunchOptions,
    fingerprint_record,
    legacy_message,
    renew_stage_tokenizer,
    rerun_command,
    resume_checkpoint,  # (llmc.cli reads it from here)
    stage_staleness,
    write_titan_record,
)
from llmc.spec.load import STDIN_SPEC
from llmc.spec.schema import POSTTRAIN_KINDS

BACKENDS = ("native", "torchtitan", "deepspeed")
#: Most processes per node ``--nproc`` takes (the spec's own ceiling on hardware.gpus_per_node)
MAX_NPROC = 1024


class LaunchError(Exception):
    """A build directory that cannot be launched (one-line message)."""


@dataclass
class Cmd:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stage: str = ""
    skip_reason: str | None = None
    #: the stage finished under another lock (or starts from one that did): why it is refused
    stale: str | None = None
    #: the stage finished without a record of the lock that trained it (an older llmc): the warning
    legacy: str | None = None
    #: build artifacts the command runs besides the lock (relative paths), verified against the build manifest
    artifacts: tuple[str, ...] = ()
    #: a training command's stage folder: before it runs, the stage keeps a copy of the prepared tokenizer there
    #: (``llmc.runtime.job.renew_stage_tokenizer``) and a torchtitan stage its ``record`` (``FINGERPRINT.json``)
    stage_dir: str | None = None
    record: dict | None = None
    #: a torchtitan stage's dump folder (its DCP checkpoints, which the job resumes from): set aside with the stage
    dump_dir: str | None = None
    #: where the stage's checkpoints are (the folder a rerun resumes from): its trainer's checkpoint folder, a DeepSpeed
    #: stage's ``<checkpoint folder>/deepspeed`` (:func:`llmc.runtime.capabilities.ds_checkpoint_dir`; an earlier
    #: llmc's ``run/<stage>/ds_checkpoints`` while the new one holds none and it does: ``ds_resume_dir``), a torchtitan
    #: stage's dump folder; None for a command that saves none
    checkpoints: str | None = None
    #: ``note:`` lines ``llmc launch`` prints before it runs (the prepare step's: a link it allows on the run's write
    #: path, :func:`linked_write_notes`)
    notes: tuple[str, ...] = ()
    #: a stage's eval step (``llmc.runtime.evaluate``): its failure comes after the stage trained
    evaluates: bool = False


def has_gpu() -> bool:
    """A CUDA device is visible (without importing torch). ``LLMC_FORCE_CPU=1`` says no."""
    if os.environ.get("LLMC_FORCE_CPU") == "1":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def _tool(name: str) -> str:
    """The console script next to the running interpreter (same venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name) or name


def _stages(lock: dict) -> list[dict]:
    out = []
    for s in lock.get("stages") or []:
        if isinstance(s, dict) and s.get("name"):
            out.append({"name": str(s["name"]), "kind": str(s.get("kind") or "pretrain"),
                        "layout": s.get("layout"), "init_from": s.get("init_from"), "init_hf": s.get("init_hf")})
    return out or [{"name": "pretrain", "kind": "pretrain"}]


def _lock_field(lock: dict, path: str):
    """The lock's field at the dotted ``path``; a LaunchError naming it where it (or a level above it) is missing or
    null. (``read_lock`` checked the type of each field these helpers read: a hand-edited lock launched with
    --force gets here.)"""
    d = lock
    for key in path.split("."):
        if not isinstance(d, dict) or d.get(key) is None:
            raise LaunchError(f"plan.lock.json: malformed lockfile: {path} is missing (rebuild it with `llmc build`)")
        d = d[key]
    return d


def _gpus_per_node(lock: dict) -> int:
    """The compiled hardware's GPUs per node (spec override applied), at most the GPU count."""
    count = int(_lock_field(lock, "spec.resolved.hardware.count"))
    return max(1, min(int(_lock_field(lock, "hardware.gpus_per_node")), count))


def _cpu_world(lock: dict) -> int:
    """A CPU build's world size (``hardware.count`` processes, all on this node), else 0."""
    if str(_lock_field(lock, "spec.resolved.hardware.gpu")).lower() != "cpu":
        return 0
    return max(1, int(_lock_field(lock, "spec.resolved.hardware.count")))


def _plan_world(lock: dict) -> int:
    """The processes the plan's layout runs on (dp_replicate x dp_shard x tp x pp x cp; ep lies within them), the
    WORLD_SIZE llmc's pre-training trainers, the DeepSpeed runner and the torchtitan job require; 0 without a plan (a
    pipeline without pre-training: its stages shard over every rank started)."""
    plan = lock.get("plan")
    if not isinstance(plan, dict):
        return 0
    n = 1
    for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp"):
        n *= int(plan.get(k, 1) or 1)
    return n


def nproc_problem(build_dir: str | os.PathLike, cmds: list[Cmd], asked: int | None) -> str | None:
    """Why ``llmc launch --nproc asked`` cannot run ``cmds`` (:func:`launch_commands`' for that count), else None: a
    stage it runs trains the plan's layout (pre-training and continued training on every backend, post-training on
    DeepSpeed or torchtitan), whose trainer refuses any WORLD_SIZE but the plan's (R002, after prepare); only llmc's
    post-training stages (split over every rank started: ``llmc.runtime.posttrain.post_layout``) and a lock without a
    plan (its stages shard over every rank) run on any count. ``llmc launch`` refuses it before anything runs.
    ``asked`` None: the count the launch picked (one node's GPUs), checked the same way: ``llmc launch`` starts one
    node (``torchrun --standalone``), so a plan over several nodes runs from the build's multi-node launchers."""
    try:
        _, lock = load_build(build_dir)
    except LaunchError:
        return None
    started = asked if asked is not None else next(
        (int(c.argv[c.argv.index("--nproc_per_node") + 1]) for c in cmds if "--nproc_per_node" in c.argv), None)
    world = _plan_world(lock)
    if not world or started is None or started == world:
        return None
    if asked is None and not (started == _gpus_per_node(lock) and world > started and _cpu_world(lock) == 0):
        return None  # (the picked count is refused only on a GPU node under a multi-node plan: a machine without a
        # GPU runs the CPU fallback, one process, as --dry-run shows)
    kinds = {st["name"]: st["kind"] for st in _stages(lock)}
    fixed = [c for c in cmds if c.checkpoints and not c.skip_reason
             and not (RUNTIME_ENTRY in c.argv and kinds.get(c.stage) in POSTTRAIN_KINDS)]
    return nproc_message(started, world, fixed[0].stage, lock, asked is not None) if fixed else None


def nproc_message(asked: int, world: int, stage: str, lock: dict, given: bool = True) -> str:
    """The one line refusing ``--nproc asked`` (``given``; else the count the launch picked for this node) for a stage
    that runs the plan's layout on ``world`` processes."""
    plan = lock.get("plan") or {}
    dims = " x ".join(f"{k}={int(plan.get(k, 1) or 1)}" for k in ("dp_replicate", "dp_shard", "tp", "pp", "cp"))
    cpu = _cpu_world(lock) > 0
    what = f"--nproc {asked}" if given else f"{asked} process(es), this node's GPUs"
    if not cpu and world > _gpus_per_node(lock):
        return (f"{what}: stage {stage!r} runs the plan's layout on {world} processes ({dims}) over "
                f"{-(-world // _gpus_per_node(lock))} nodes, and `llmc launch` starts one node (torchrun "
                "--standalone): run launch/torchrun_multi_node.sh on every node, or submit launch/slurm.sbatch")
    rebuild = f"--set hardware.count={asked}" if cpu else f"--set hardware.count={asked} (GPUs)"
    return (f"{what}: stage {stage!r} runs the plan's layout on exactly {world} process(es) ({dims}), and "
            f"its trainer refuses any other WORLD_SIZE; --nproc can only be {world} for this build (only "
            f"post-training stages on the native backend run on any count); for {asked} processes rebuild with "
            f"`llmc build SPEC {rebuild}`")


def _checkpoint_folder(lock: dict) -> str:
    """The native trainers' checkpoint folder in a stage's run folder (``training.checkpoint.folder``)."""
    try:
        folder = lock["spec"]["resolved"]["training"]["checkpoint"]["folder"]
    except (KeyError, TypeError):
        folder = None
    return folder if isinstance(folder, str) and folder else "checkpoints"


def unfinished_checkpoints(run: str | os.PathLike, folders: list[str | None] = ()) -> list[tuple[Path, int]]:
    """``(folder, bytes)`` of every unfinished checkpoint folder (``*.tmp``: a save that did not complete, never
    loaded) in the stages' checkpoint folders under ``run`` and in ``folders``: the space a full disk can get back.
    Only listed, never deleted."""
    bases = {Path(f) for f in folders if f}
    try:
        bases |= {p for p in Path(run).glob("*/*") if p.is_dir() and not p.name.endswith(".tmp")}
    except OSError:
        pass
    out = []
    for base in sorted(bases):
        try:
            tmps = sorted(p for p in base.glob("*.tmp") if p.is_dir() and not p.is_symlink())
        except OSError:
            continue
        out += [(t, _bytes_under([t])) for t in tmps]
    return out


def load_build(build_dir: str | os.PathLike) -> tuple[Path, dict]:
    from llmc.lockfile import read_lock

    if not str(build_dir):
        raise LaunchError("no build directory given (an empty path; name the directory `llmc build -o` wrote)")
    b = Path(build_dir)
    if b.exists() and not b.is_dir():
        raise LaunchError("not a directory: give the build directory `llmc build -o` wrote, not a file in it")
    if not b.is_dir():
        raise LaunchError(f"no such build directory (run `llmc build SPEC -o {shlex.quote(str(b))}` first)")
    lock_path = b / "plan.lock.json"
    if not lock_path.exists():
        raise LaunchError("plan.lock.json not found: not an llmc build directory (run `llmc build` first)")
    try:
        lock = read_lock(lock_path)
    except ValueError as e:
        raise LaunchError(f"plan.lock.json: {e}") from None
    return b.resolve(), lock


def preemption_times(lock: dict, env_shutdown: str | None = None) -> tuple[int, float]:
    """(torchrun's ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, ``llmc launch``'s wait before it kills a stage's process group)
    after a SIGTERM: the lock's ``preemption`` figures, which the plan sized to the build's slowest save of the
    current step (``llmc.compiler.checkpoint_cost.preemption_numbers``; a lock without them: that function's
    floor). ``env_shutdown``: the environment's own ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, which torchrun then uses;
    the wait stays the relay's margin above the longer of the two."""
    from llmc.compiler.checkpoint_cost import PREEMPT_RELAY_S, preemption_numbers

    p = lock.get("preemption") if isinstance(lock.get("preemption"), dict) else {}
    default = preemption_numbers([])

    def whole(key: str, fallback: int) -> int:  # (a hand-edited lock's null or non-number: the floor)
        v = p.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else fallback

    shutdown = whole("shutdown_seconds", default.shutdown_seconds)
    wait = float(whole("signal_lead_seconds", default.signal_lead_seconds))
    try:
        own = float(env_shutdown) if env_shutdown is not None else None
    except ValueError:
        own = None
    if own is not None and own == own:  # (not NaN)
        wait = max(wait, own + PREEMPT_RELAY_S)
    return shutdown, wait


def check_lock_integrity(build_dir: str | os.PathLike) -> str | None:
    """None when ``plan.lock.json`` is the one ``llmc build`` wrote (or the build has no manifest to
    compare with), else a one-line description of the difference (``llmc.runtime.entry.lock_integrity``, the check the
    runtime repeats at its start)."""
    from llmc.runtime.entry import lock_integrity

    found = lock_integrity(build_dir)
    return found[0] if found else None


def edited_artifacts(build_dir: str | os.PathLike, cmds: list[Cmd]) -> list[tuple[str, str]]:
    """``(artifact, what differs)`` for each artifact the commands that run (not skipped) use whose content differs
    from the sha256 the build manifest recorded (empty without a manifest: nothing to compare with)."""
    import hashlib

    from llmc.buildfs import BuildDirError, read_manifest

    b = Path(build_dir)
    try:
        m = read_manifest(b)
    except BuildDirError:
        return []  # (check_lock_integrity reports an unreadable manifest)
    if m is None:
        return []
    out = []
    for rel in dict.fromkeys(a for c in cmds if not c.skip_reason for a in c.artifacts):
        try:
            data = (b / rel).read_bytes() if rel in m.files and (b / rel).is_file() else None
        except OSError as e:
            out.append((rel, f"unreadable: {e.strerror or e}"))
            continue
        if data is None:
            continue
        got = hashlib.sha256(data).hexdigest()
        if got != m.files[rel]:
            out.append((rel, f"sha256 {got[:12]}, the build recorded {m.files[rel][:12]}"))
    return out


def spec_change_warning(build_dir: str | os.PathLike, lock: dict | None = None) -> str | None:
    """``"<build_dir>: warning[L009] the spec <path> changed since this build (...)"``, one line, when the spec file
    the lock names (``spec.path``, resolved from the build directory as ``llmc.runtime.job`` resolves
    ``spec.dir_from_build``) is a file whose bytes' sha256 is not the ``spec.file_sha256`` the build recorded; else
    None: no such file (a build copied alone to a node), a lock without ``file_sha256`` (an older llmc's, whose
    ``spec.sha256`` may include ``--set`` overrides it did not record), a spec read from standard input (``spec.path``
    :data:`~llmc.spec.load.STDIN_SPEC`, or an older llmc's ``<dir>/-``: no file to compare, whatever file is named
    ``-`` there now), or an unreadable file. ``lock``: the build's
    lock as :func:`load_build` returns it (read when not given; a lock that cannot be read says nothing here)."""
    from llmc.emit.common import build_command
    from llmc.fileio import sha256_file

    b = Path(build_dir)
    if lock is None:
        try:
            b_resolved, lock = load_build(build_dir)
        except LaunchError:
            return None
    else:
        b_resolved = b.resolve()
    spec = lock.get("spec") if isinstance(lock, dict) else None
    if not isinstance(spec, dict):
        return None
    recorded, rel, overrides = spec.get("file_sha256"), spec.get("path"), spec.get("overrides")
    if not isinstance(recorded, str) or not recorded or not isinstance(rel, str) or not rel:
        return None
    if rel == STDIN_SPEC or posixpath.basename(rel) == "-":  # read from standard input (an older llmc's: ``../-``)
        return None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        overrides = []
    path = b_resolved / rel  # (in spec.dir_from_build, the folder the runtime resolves the spec's paths against)
    try:
        if not path.is_file():
            return None
        now = sha256_file(path)
    except OSError:
        return None
    if now == recorded:
        return None
    shown = os.path.relpath(path.resolve())  # the spec as this shell names it
    cal = lock.get("calibration") if isinstance(lock.get("calibration"), dict) else {}
    given = (cal.get("file") or {}).get("path") if isinstance(cal.get("file"), dict) and not (
        (spec.get("resolved") or {}).get("calibration") if isinstance(spec.get("resolved"), dict) else None) else None
    cmd = build_command(shown, str(build_dir), overrides, calibration=given if isinstance(given, str) else None,
                        fit_check=lock.get("fit_check") is not False)
    line = (f"{build_dir}: warning[L009] the spec {shown} changed since this build (sha256 {now[:12]}, built from "
            f"{recorded[:12]}): launching the build as built; rebuild (`{cmd}`) to apply it")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)  # one inert line, whatever the paths hold


def software_warning(build_dir: str | os.PathLike, cmds: list[Cmd], backend: str | None = None) -> str | None:
    """``"<build_dir>: warning[L017] built for torch 2.14.1, this environment has 2.13.0: ..."``, one line, when the
    installed torch (its metadata, a local label such as ``+cu130`` left out; torch is not imported), or the launched
    backend's own library (``deepspeed`` / ``torchtitan``, :func:`_launched_backend`), is another release than the
    lock's ``_llmc.target_versions`` names (``llmc.runtime.software.target_mismatch``); the launch goes on. None
    otherwise: the same releases, a library not installed or not targeted, a launch that runs nothing, or a lock too
    malformed to say (``launch_commands`` refused it already)."""
    from llmc.lockfile import LOCK_HEADER_KEY
    from llmc.runtime.software import target_mismatch

    if not any(not c.skip_reason for c in cmds):
        return None
    try:
        b, lock = load_build(build_dir)
        name = _launched_backend(b, lock, backend)
        header = lock.get(LOCK_HEADER_KEY)
        diff = target_mismatch(header.get("target_versions") if isinstance(header, dict) else None, name)
    except (LaunchError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if not diff:
        return None
    built = " and ".join(f"{d} {want}" for d, want, _ in diff)
    have = diff[0][2] if len(diff) == 1 else " and ".join(f"{d} {v}" for d, _, v in diff)
    pins = " ".join(f"{d}=={want}" for d, want, _ in diff)
    line = (f"{build_dir}: warning[L017] built for {built}, this environment has {have}: its kernels and numerics "
            f"(losses need not match a run under the build's versions, bit for bit or at all), its defaults and the "
            f"checkpoints it writes may differ; launching anyway (to reproduce the build's run, install {pins}; "
            f"each stage's start event in metrics.jsonl and its DONE.json record the versions that ran)")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


def _lock_bytes(ck) -> tuple[float, float] | None:
    """(disk_bytes, kept_bytes) of a lock's checkpoint figures (``time.checkpoint`` of pre-training, a stage's
    ``stages[].time.checkpoint``: ``llmc.compiler.checkpoint_cost.on_disk``), else None: absent (a lock of an older
    llmc, a stage whose steps the plan did not know) or not a number (a hand-edited lock)."""
    if not isinstance(ck, dict):
        return None
    out = []
    for key in ("disk_bytes", "kept_bytes"):
        v = ck.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            return None
        out.append(float(v))
    return (out[0], out[1]) if out[0] > 0 else None


def _bytes_under(paths: list[Path]) -> int:
    """The bytes of the files under ``paths`` (links not followed; what cannot be read counts 0)."""
    total = 0
    for top in paths:
        for root, _, files in os.walk(top):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
    return total


def disk_need(build_dir: str | os.PathLike, cmds: list[Cmd], lock: dict | None = None,
              resume: bool = True) -> tuple[int, list[str]]:
    """(bytes, stages): what the stages ``cmds`` run (those not skipped, in run order) still need on the checkpoint
    storage, from the lock's figures (``time.checkpoint`` / ``stages[].time.checkpoint``: ``disk_bytes`` at a stage's
    peak, ``kept_bytes`` once it finished; ``llmc.compiler.checkpoint_cost``, "On disk"), nothing recomputed: the
    largest, over those stages, of what the ones before it keep + its peak, each less what its folders hold already
    (``run/<stage>``, a torchtitan stage's dump folder: a resumed run's checkpoints; not with ``resume`` False,
    ``--no-resume``, whose stages start over while their earlier runs, set aside, stay on the disk). Stages without a
    figure count nothing; (0, []) when none has one."""
    b, lock = load_build(build_dir) if lock is None else (Path(build_dir).resolve(), lock)
    kinds = {s["name"]: s["kind"] for s in _stages(lock)}
    by_name = {s.get("name"): s for s in lock.get("stages") or [] if isinstance(s, dict)}
    folders: dict[str, list[Path]] = {}
    for c in cmds:  # (a torchtitan stage's training and export commands; eval steps write no checkpoints)
        if c.stage in kinds and not c.evaluates and not c.skip_reason:
            folders.setdefault(c.stage, [b / "run" / c.stage])
            if c.dump_dir:
                folders[c.stage].append(Path(c.dump_dir))
    peak = held = 0.0
    counted = []
    for name, paths in folders.items():
        if kinds[name] == "pretrain":
            ck = (lock.get("time") or {}).get("checkpoint") if isinstance(lock.get("time"), dict) else None
        else:
            t = (by_name.get(name) or {}).get("time")
            ck = t.get("checkpoint") if isinstance(t, dict) else None
        fig = _lock_bytes(ck)
        if fig is None:
            continue
        there = _bytes_under([p for p in paths if p.is_dir()]) if resume else 0
        peak = max(peak, held + fig[0] - there)
        held += fig[1] - there
        counted.append(name)
    return max(0, math.ceil(peak)), counted


def disk_warning(build_dir: str | os.PathLike, cmds: list[Cmd], lock: dict | None = None,
                 resume: bool = True) -> str | None:
    """``"<build_dir>: warning[L019] the stages this launch runs need up to ... on the disk holding run/, which has
    ... free; ..."``, one line, when the free space of the filesystem holding the build's ``run/`` (the folder a link
    names; the build directory while there is none; ``shutil.disk_usage``) is below what the stages it runs still
    need (:func:`disk_need`, ``resume`` False for ``--no-resume``); the launch goes on. None otherwise, or where the
    lock has no figure."""
    try:
        b, lock = load_build(build_dir) if lock is None else (Path(build_dir).resolve(), lock)
        # (the need without what the stages hold, an upper bound, first: the common case of room enough reads no
        # folder; a run of many checkpoints is walked only when the disk may be short)
        need, names = disk_need(b, cmds, lock, resume=False)
        if need <= 0:
            return None
        where = b / "run" if (b / "run").exists() else b
        free = shutil.disk_usage(where).free
        if free < need and resume:
            need, names = disk_need(b, cmds, lock, resume)
    except (LaunchError, OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if free >= need:
        return None
    from llmc.compiler.units import gb

    shown = Path(build_dir) / "run" if where != b else Path(build_dir)
    line = (f"{build_dir}: warning[L019] the stage{'s' if len(names) > 1 else ''} this launch runs "
            f"({', '.join(names)}) need{'' if len(names) > 1 else 's'} up to {gb(need)} more on the disk holding "
            f"{shown} (checkpoints and Hugging Face exports at the peak: the plan's figures, less what the stages hold "
            f"already), which has {gb(free)} free; launching anyway (a save or export that finds the disk full stops "
            "the stage: use a bigger volume, a smaller training.checkpoint.keep_latest (rebuild), or run/ linked to a "
            "directory on a scratch disk, which llmc launch allows)")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


#: what a refused link in ``assets/`` / ``data/`` (prepare's folders) ends with
PREPARE_LINK_HINT = "hint: replace the link with a real directory (prepare copies what it needs into it)"
#: what a refused link in ``run/`` / ``outputs/`` / ``cache/`` ends with
RUN_LINK_HINT = ("hint: a link there must name a directory outside the build directory (a scratch disk: create the "
                 "directory, then link it); else replace the link with a real directory")


def _validates(lock: dict) -> bool:
    """Does the lock hold out validation documents (``eval.validation``): its training stages then write the
    validation tokens to ``cache/`` (:func:`llmc.runtime.validation.build_validation_set`)?"""
    spec = (lock.get("spec") or {}).get("resolved") if isinstance(lock.get("spec"), dict) else None
    if not isinstance(spec, dict):
        return True
    return bool((spec.get("eval") or {}).get("validation")) if isinstance(spec.get("eval"), dict) else False


def _run_folders(b: Path, lock: dict, run: Path | None, cmds: list[Cmd] | None) -> list[tuple[Path, str]]:
    """The folders of ``b`` the commands that run (``cmds`` not skipped; None: every one) write with their own file
    names only, each with what goes there: ``outputs/`` (a torchtitan stage's checkpoints), ``run/`` (the stages'
    folders, when the run folder is ``b/run``) and ``cache/`` (the validation tokens, when the lock validates)."""
    runs = None if cmds is None else [c for c in cmds if not c.skip_reason]
    out: list[tuple[Path, str]] = []
    if runs is None or any(c.dump_dir for c in runs):
        out.append((b / "outputs", "torchtitan checkpoints"))
    if (runs is None or runs) and (run is None or run == b / "run"):
        out.append((b / "run", "stage folders and checkpoints"))
    if (runs is None or any(c.checkpoints for c in runs)) and _validates(lock):
        out.append((b / "cache", "validation tokens"))
    return out


def _links_under(top: Path) -> list[Path]:
    """``top`` when it is a symbolic link, else every link under it (``lstat``: links never followed), but inside the
    W&B folder of a stage folder (``top/<stage>/wandb``: :data:`llmc.runtime.observe.WANDB_DIRS`, which W&B fills with
    links of its own that llmc never writes through; the folder itself, if a link, is one; a stage named ``wandb``,
    ``top/wandb``, is looked through as any other)."""
    from llmc.runtime.observe import WANDB_DIRS

    if top.is_symlink():
        return [top]
    if not top.is_dir():
        return []
    # (os.scandir's entries know from the directory listing itself whether they are links or folders, on the file
    # systems that say so (d_type): no lstat per file, which a run/ of many checkpoints' shards would cost per launch)
    # A past run a launch set aside (``<stage>.set-aside-N``, :func:`llmc.fileio.is_set_aside`) is never written again:
    # not looked through (it may hold every checkpoint of that run); a link in its place is still one
    from llmc.fileio import is_set_aside

    out, stack = [], [(top, 0)]
    while stack:
        where, depth = stack.pop()
        try:
            entries = list(os.scandir(where))
        except OSError:
            continue
        for e in entries:
            if e.is_symlink():
                out.append(Path(e.path))
            elif e.is_dir(follow_symlinks=False) and not (depth == 1 and e.name in WANDB_DIRS) \
                    and not (depth == 0 and is_set_aside(e.name)):
                stack.append((Path(e.path), depth + 1))  # (depth 1: a stage folder's entries; its W&B folder is W&B's)
    return sorted(out)


def _outside_dir(link: Path, b: Path) -> Path | None:
    """The directory ``link`` finally names when it is one outside the build directory ``b``, else None."""
    target = Path(os.path.realpath(link))
    inside = target == b.resolve() or target.is_relative_to(b.resolve())
    return target if target.is_dir() and not inside else None


def linked_write_path(b: Path, lock: dict, run: Path | None = None, cmds: list[Cmd] | None = None) -> Path | None:
    """The first symbolic link ``llmc launch`` refuses on a path its run writes inside the build directory ``b``, else
    None. Only the folders a command that runs (``cmds`` not skipped; None: every one) writes are looked at:

    * where prepare writes (prepare, and each training stage's own prepare): ``assets/`` and, when prepare writes
      ``data/``, ``data/`` and the entries it writes there (:func:`llmc.runtime.entry.prepare_link`, the function
      prepare itself refuses with): prepare overwrites and deletes files there by name (tokenizer files, a builtin
      corpus), so a link -- to a user's model folder, say -- is always refused;
    * ``outputs/``, ``run/``, ``cache/`` (:func:`_run_folders`), where llmc writes only its own names (stage folders,
      ``step-N`` checkpoints, hash-named caches) and deletes only what it wrote (older ``step-N`` folders, its own
      earlier export; ``shutil.rmtree`` never follows a link): a link there (the folder or anything in it) is allowed
      when it names a directory outside the build directory (:func:`linked_write_notes` says so), refused when it names
      anything else (a file, nothing, a place inside the build directory).

    Links are found with ``lstat``, nothing read through them; a user's source folder in ``data/`` may be a link."""
    from llmc.runtime.entry import prepare_link

    runs = None if cmds is None else [c for c in cmds if not c.skip_reason]
    if runs is None or runs:
        found = prepare_link(b, lock)
        if found is not None:
            return found
    for top, _what in _run_folders(b, lock, run, cmds):
        for link in _links_under(top):
            if _outside_dir(link, b) is None:
                return link
    return None


def linked_write_notes(b: Path, lock: dict, run: Path | None = None, cmds: list[Cmd] | None = None) -> list[str]:
    """One ``note:`` line for each link :func:`linked_write_path` allows on the run's write path (one that names a
    directory outside the build directory, where the run then writes)."""
    notes = []
    for top, what in _run_folders(b, lock, run, cmds):
        for link in _links_under(top):
            target = _outside_dir(link, b)
            if target is not None:
                line = (f"{link}: note: a link to {target}, outside the build directory: the run writes its {what} "
                        "there")
                notes.append("".join(c if c.isprintable() else ascii(c)[1:-1] for c in line))
    return notes


def link_message(found: Path, b: Path | None = None) -> str:
    """The L001 text for :func:`linked_write_path`'s link (``b``: the build directory)."""
    try:
        target = os.readlink(found)
    except OSError:
        target = "?"
    from llmc.runtime.entry import DATA_LINK_HINT

    data = b is not None and (found == b / "data" or found.is_relative_to(b / "data"))
    if b is None or data or found == b / "assets" or found.is_relative_to(b / "assets"):
        line = (f"{found} is a symbolic link (to {target}) where prepare writes: llmc never writes through links "
                f"there, since prepare overwrites and deletes its files by name "
                f"({DATA_LINK_HINT if data else PREPARE_LINK_HINT})")
    else:
        real = Path(os.path.realpath(found))
        what = ("a place inside the build directory" if real.is_dir() else "not a directory" if real.exists()
                else "missing")
        line = (f"{found} is a symbolic link (to {target}: {what}) on a path the run writes: llmc writes through a "
                f"link there only into a directory outside the build directory ({RUN_LINK_HINT})")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)


def _has_titan_job(b: Path) -> bool:
    """Does the build hold a torchtitan job module: pre-training's ``llmc_job.py`` or a continued-training stage's
    ``llmc_job_stage<i>.py`` (a pipeline that continues a trained model has only those)?"""
    return any((b / "torchtitan").glob(f"{TITAN_PRETRAIN_MODULE}*.py"))


def _launched_backend(b: Path, lock: dict, backend: str | None) -> str:
    """``backend``, or when None the build's default (``llmc.emit.common.launch_backend``)."""
    if backend is not None:
        return backend
    plan = ParallelPlan(**lock["plan"]) if lock.get("plan") else None
    planned = (lock.get("backend") or {}).get("name") if isinstance(lock.get("backend"), dict) else None
    return launch_backend(planned, plan, _has_titan_job(b), (b / "deepspeed" / "ds_config.json").exists())


def unfit_warning(build_dir: str | os.PathLike, cmds: list[Cmd], backend: str | None = None) -> str | None:
    """``"<build_dir>: warning[L015] the <backend> run of this build's pre-training does not fit the GPU: ..."``, one
    line, when the launch runs pre-training (its command not skipped) on a backend whose run the compiler found not to
    fit (the lock's ``backend_runs``: :func:`llmc.compiler.compile.backend_runs`, read, never recomputed); the launch
    goes on (the user may know better). None otherwise, and for a lock of an older llmc (no ``backend_runs``)."""
    from llmc.emit.common import unfit_run_hint, unfit_run_words

    try:
        b, lock = load_build(build_dir)
        name = _launched_backend(b, lock, backend)
        pre = {str(s["name"]) for s in _stages(lock) if s.get("kind") == "pretrain"}
        first = {}
        for c in cmds:
            first.setdefault(c.stage, c)
        if not any(n in first and not first[n].skip_reason for n in pre):
            return None
        run = (lock.get("backend_runs") or {}).get(name)
        if not isinstance(run, dict) or run.get("fits") is not False:
            return None
        words = unfit_run_words(name, str(run["layout"]), int(run["per_gpu_bytes"]), int(run["capacity_bytes"]),
                                int(run["usable_bytes"]), bool(run.get("planned")))
    except (LaunchError, KeyError, TypeError, ValueError, AttributeError):
        return None  # (a lock too malformed to say: launch_commands refused it already)
    return (f"{build_dir}: warning[L015] {words}; launching it anyway "
            f"({unfit_run_hint(name, bool(run.get('planned')))})")


def launch_commands(build_dir: str | os.PathLike, backend: str | None = None, nproc: int | None = None,
                    stage: str | None = None, run_dir: str | os.PathLike | None = None,
                    gpu: bool | None = None, fallback_checkpoint: bool = False,
                    from_stage: str | None = None, options: LaunchOptions | None = None) -> list[Cmd]:
    """Prepare step + one command per stage (skipped ones carry ``skip_reason``); raises LaunchError.

    ``stage``: that stage only; ``from_stage``: that stage and every stage after it in the run order (the lock's
    stage order), not both.

    ``backend`` None: the build's default (``llmc.emit.common.default_backend``). ``fallback_checkpoint``: llmc's
    trainer resumes from the newest checkpoint that verifies, walking back past a damaged newer one
    (``python -m llmc.runtime.entry --fallback-checkpoint``; without it a damaged newest checkpoint stops the
    stage); a stage the launch would run on DeepSpeed or torchtitan, whose checkpointers pick their own, is a
    LaunchError. ``options``: what the commands the skip and refusal lines print carry of this launch
    (:class:`llmc.runtime.job.LaunchOptions`; default: ``backend`` and ``nproc`` as given)."""
    opts = options or LaunchOptions(backend=backend, nproc=nproc)
    if backend is not None and backend not in BACKENDS:
        raise LaunchError(f"unknown backend {backend!r} (one of: {', '.join(BACKENDS)})")
    b, lock = load_build(build_dir)
    try:  # (read_lock checked the lock's shape; a field it leaves optional may still be missing)
        backend = _launched_backend(b, lock, backend)
        on_gpu = has_gpu() if gpu is None else gpu
        if nproc is None:
            nproc = _cpu_world(lock) or (_gpus_per_node(lock) if on_gpu else 1)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LaunchError(f"plan.lock.json: malformed lockfile ({type(e).__name__}: {e}) (rebuild it with "
                          "`llmc build`)") from None
    if not 1 <= nproc <= MAX_NPROC:
        raise LaunchError(f"--nproc must be 1 to {MAX_NPROC} processes per node (got {nproc})")
    run = Path(run_dir).resolve() if run_dir is not None else b / "run"
    folder = _checkpoint_folder(lock)
    lock_path = str(b / "plan.lock.json")
    stages = _stages(lock)
    if stage is not None and from_stage is not None:
        raise LaunchError(f"--stage {stage} and --from {from_stage} together: --stage runs one stage, --from that "
                          "stage and every stage after it; give one of them")
    names = [s["name"] for s in stages]
    for picked in (stage, from_stage):
        if picked is not None and picked not in names:
            raise LaunchError(f"no stage named {picked!r} (stages: {', '.join(names)})")
    if stage is not None:
        stages = [s for s in stages if s["name"] == stage]
    if from_stage is not None:
        stages = stages[names.index(from_stage):]

    py = sys.executable

    ds_config = b / "deepspeed" / "ds_config.json"
    if backend == "deepspeed" and not ds_config.exists():
        raise LaunchError("this build has no deepspeed/ds_config.json (see README.md warnings); "
                          "use --backend native or torchtitan")
    if backend == "torchtitan" and not _has_titan_job(b):
        raise LaunchError("this build has no torchtitan job (torchtitan/llmc_job*.py); use --backend native or "
                          "deepspeed")

    def native(s: dict) -> Cmd:
        # every kind runs on nproc ranks (post-training too: FSDP2 over the ranks, llmc.runtime.posttrain)
        argv = [_tool("torchrun"), "--standalone", "--nproc_per_node", str(nproc)]
        return Cmd(argv=[*argv, "-m", RUNTIME_ENTRY, "--lock", lock_path, "--stage", s["name"],
                         "--out", str(run / s["name"]), *(["--fallback-checkpoint"] if fallback_checkpoint else [])],
                   cwd=str(b), stage=s["name"], checkpoints=str(run / s["name"] / folder))

    evaluated = set(eval_stages(lock))
    position = {st["name"]: i for i, st in enumerate(_stages(lock))}
    memo: dict = {}  # (the digests of a source several finished stages recorded: read once per launch)
    cmds: list[Cmd] = []
    for s in stages:
        # continued training with its own searched layout runs as its own torchtitan job (torchtitan builds)
        own = titan_own_job(s["kind"], s.get("layout"))
        titan = backend == "torchtitan" and (s["kind"] in TITAN_STAGE_KINDS or own)
        # its finished run: DONE.json; a torchtitan stage's, also its export (torchtitan writes no DONE.json); and
        # whether this lock trained it, or (unfinished) what it starts from: the check `llmc export` applies too
        fin, stale = stage_staleness(lock, s["name"], run, b, export=titan, memo=memo, options=opts)
        if backend == "deepspeed" and s["kind"] in DS_STAGE_KINDS:
            env = {} if on_gpu else {"DS_ACCELERATOR": "cpu"}
            c = Cmd(argv=[_tool("torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m",
                          "llmc.runtime.ds_train", "--lock", lock_path, "--ds-config", str(ds_config),
                          "--stage", s["name"], "--out", str(run / s["name"])], env=env, cwd=str(b),
                    stage=s["name"], stage_dir=str(run / s["name"]),
                    # (the folder it resumes from: an earlier llmc's ds_checkpoints when the new one holds none)
                    checkpoints=str(ds_resume_dir(run / s["name"], folder)))
            # (the runner reads deepspeed/ds_config.<stage>.json instead when the build wrote one)
            own_cfg = ds_config.with_name(f"ds_config.{s['name']}.json")
            c.artifacts = (str((own_cfg if own_cfg.is_file() else ds_config).relative_to(b)),)
        elif titan:
            from llmc.runtime.titan_launch import torchtitan_command  # torch-free module

            module = b / "torchtitan" / f"{titan_stage_module(position[s['name']]) if own else TITAN_PRETRAIN_MODULE}.py"
            if not module.exists():
                raise LaunchError(f"this build has no {module.relative_to(b)} for stage {s['name']!r}; rebuild with "
                                  "`llmc build`")
            if os.pathsep in str(module.parent):  # PYTHONPATH is split on it: torchtitan could not import the job
                raise LaunchError(f"the build directory's path {str(b)!r} contains {os.pathsep!r}, which PYTHONPATH "
                                  "cannot carry (torchtitan imports the job from it); move or link the build to a "
                                  "path without it, or use --backend native")
            # the job reads <build>/assets and <build>/data (written by the prepare step) via LLMC_RUN_DIR
            argv, env = torchtitan_command(module, nproc, not on_gpu, run_dir=b, python=py)
            if own and s.get("init_from") and not s.get("init_hf"):
                env["LLMC_INIT_HF"] = str(run / s["init_from"] / "hf")  # the stage before it ends with this export
            # (its record of the lock that trains it, written as it starts: FINGERPRINT.json beside the export)
            c = Cmd(argv=argv, env=env, cwd=str(b), stage=s["name"], artifacts=(str(module.relative_to(b)),),
                    stage_dir=str(run / s["name"]), record=fingerprint_record(lock, s["name"], b, memo=memo) or None,
                    dump_dir=str(b / "outputs" / titan_dump_subdir(s["name"] if own else None)))
            c.checkpoints = c.dump_dir
            # torchtitan writes DCP checkpoints: the stage ends, as every stage does, with a Hugging Face
            # directory run/<stage>/hf (llmc.runtime.hf_io converts the newest checkpoint)
            hf = run / s["name"] / "hf" / "config.json"
            export = Cmd(argv=[py, "-m", "llmc.runtime.hf_io", str(b), "--stage", s["name"], "-o", str(hf.parent)],
                         cwd=str(b), stage=s["name"])
            if hf.exists() and stale is None:
                export.skip_reason = f"stage {s['name']!r} already exported ({hf.parent})"
                # the export runs only after torchtitan finished the stage (a failed or preempted run stops the
                # launch before it): torchtitan writes no DONE.json, its exported model marks the stage done
                c.skip_reason = (f"stage {s['name']!r} already finished and exported ({hf.parent}); "
                                 f"`{rerun_command(b, s['name'], opts)}` sets it and the stages after it aside "
                                 "to run them again")
        else:
            c = native(s)
        if stale is None and fin is not None and fin.change is None and (run / s["name"] / "DONE.json").is_file():
            done = run / s["name"] / "DONE.json"
            c.skip_reason = (f"stage {s['name']!r} already finished ({done}); `{rerun_command(b, s['name'], opts)}` "
                             "sets it and the stages after it aside to run them again")
        c.stale = stale
        if stale is None and fin is not None and fin.legacy:
            c.legacy = legacy_message(s["name"], fin)
        if fallback_checkpoint and not c.skip_reason and RUNTIME_ENTRY not in c.argv:
            raise LaunchError(f"--fallback-checkpoint: stage {s['name']!r} runs on {backend}, whose checkpointer "
                              "picks its own checkpoint; move the damaged one aside instead (or launch that stage "
                              "with --backend native)")
        cmds.append(c)
        if titan:
            cmds.append(export)
        if s["name"] in evaluated:
            ev = Cmd(argv=[py, "-m", "llmc.runtime.evaluate", "--lock", lock_path, "--stage", s["name"],
                           "--out", str(run / s["name"])], cwd=str(b), stage=s["name"], evaluates=True)
            summary = run / s["name"] / EVAL_SUMMARY
            # scored again when what decides its scores changed since (the eval step sets the old ones aside)
            if summary.exists() and eval_change(summary, lock, s["name"]) is None:
                ev.skip_reason = f"stage {s['name']!r} already evaluated ({summary})"
            cmds.append(ev)

    # shared assets (the tokenizer; builtin corpora) under the build directory, idempotent
    # every backend (llmc's trainers, the torchtitan job) streams the sources in place
    # (--stage / --from: it checks the data sources of the stages this launch runs; each stage checks its own when it
    # starts, so a later stage's data need not exist yet)
    only = ["--stages", ",".join(s["name"] for s in stages)] if stage is not None or from_stage is not None else []
    prepare = Cmd(argv=[py, "-m", RUNTIME_ENTRY, "prepare", "--lock", lock_path, *only], cwd=str(b),
                  stage="prepare")
    if cmds and all(c.skip_reason for c in cmds):
        prepare.skip_reason = "every stage is finished"
    # a lock edited after `llmc build` wrote it: the runtime refuses it at its start (error[L001]) unless told it may
    # run that lock, by its sha256; `llmc launch` gets here with one only when --force allowed it (check_lock_integrity)
    from llmc.runtime.entry import ACCEPT_LOCK_ENV, lock_integrity

    edited = lock_integrity(b)
    if edited is not None and edited[1]:
        for c in (prepare, *cmds):
            c.env = {**c.env, ACCEPT_LOCK_ENV: edited[1]}
    # a link inside the build directory where the run writes (assets/ -> a user's model folder): refused before
    # anything runs, as `llmc build` refuses its own (X010); prepare itself refuses its own folders as links too.
    # A link in run/, outputs/, cache/ to a directory outside the build (a scratch disk): allowed, with a note
    linked = linked_write_path(b, lock, run, [prepare, *cmds])
    if linked is not None:
        raise LaunchError(link_message(linked, b))
    prepare.notes = tuple(linked_write_notes(b, lock, run, [prepare, *cmds]))
    return [prepare, *cmds]


def check_eval_tasks(build_dir: str | os.PathLike, cmds: list[Cmd], timeout: float = 900) -> tuple[list[str], list[str]]:
    """The launch's check of ``eval.tasks`` before any training, when an eval step of the launch will run and the
    lock names registered lm-evaluation-harness tasks: ``(errors, warnings)``, one line each. An unknown task name
    (not in lm_eval's own task index, :func:`llmc.runtime.evaluate.check_tasks`, run once in the runtime's
    environment: lm_eval is not imported here) is L016, an error, with the closest known names (difflib); a task
    whose dataset is not in the local Hugging Face cache while the eval step runs offline is L016, a warning (the
    eval would fail with R017 after training). The check itself failing (lm_eval missing, a timeout) is said as a
    warning, and the launch goes on: the eval step reports its own errors."""
    import json
    import subprocess

    evals = [c for c in cmds if c.evaluates and not c.skip_reason]
    if not evals:
        return [], []
    b, lock = load_build(build_dir)  # (the lock as every launch helper reads it: a bounded regular file)
    plan = (lock.get("evaluation") or {}).get("tasks") or {}
    if not [t for t in plan.get("tasks") or [] if not str(t).endswith((".yaml", ".yml"))]:
        return [], []
    c = evals[0]
    argv = [*c.argv[: c.argv.index("--stage")], "--check-tasks"]  # (the eval step's interpreter and lock)
    where = f"{b / 'plan.lock.json'}"
    found, why = None, ""
    try:
        r = subprocess.run(argv, cwd=c.cwd or str(b), env={**os.environ, **c.env}, capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode == 0 and r.stdout.strip():
            found = json.loads(r.stdout.strip().splitlines()[-1])
        else:
            why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
    if not isinstance(found, dict):
        return [], [f"{where}: warning[L016] the eval task names could not be checked before training ({why}); "
                    "launching anyway (the eval step after training reports a task it cannot load)"]
    errors = [f"{where}: error[L016] eval.tasks: {name!r} is not a task lm-evaluation-harness knows (not in its task "
              "index), so the eval step after training would fail; "
              + (f"did you mean {' or '.join(repr(n) for n in close)}?" if close else
                 "`lm_eval ls tasks` lists the registered names")
              + " Fix eval.tasks and rebuild with `llmc build`" for name, close in found.get("unknown") or []]
    warnings = [f"{where}: warning[L016] eval.tasks: the dataset of {name!r} ({dataset}) is not in the local Hugging "
                "Face cache and the eval step runs offline, so it would fail after training (R017); on a machine "
                "with network, download it with `datasets` (datasets.load_dataset) into the cache and copy the cache "
                "(HF_HOME) here, or score a local task file" for name, dataset in found.get("uncached") or []]
    return errors, warnings


def start_stage(c: Cmd, build_dir: str | os.PathLike, options: LaunchOptions | None = None) -> None:
    """What a training command's stage folder gets before it runs: a copy of the prepared tokenizer
    (:func:`llmc.runtime.job.renew_stage_tokenizer`: an earlier attempt's copy is renewed, or refused when the stage
    would resume checkpoints trained with another) and, for a torchtitan stage, its record of the lock that trains
    it (``FINGERPRINT.json``, replacing an unfinished run's; a finished one is refused or skipped before this).
    ``options``: the launch's, which the command its refusal prints carries."""
    if not c.stage_dir:
        return
    d = Path(c.stage_dir)
    # an unfinished torchtitan run resumes from its checkpoints: one started under another lock is not this one's
    from llmc.resume import titan_run_change  # (llmc.resume builds on this module)

    why = titan_run_change(c, build_dir, options)
    if why is not None:
        raise LaunchError(why)
    d.mkdir(parents=True, exist_ok=True)
    # the tokenizer it trains with: prepare's now (an earlier attempt's copy renewed), or refused when it would resume
    # checkpoints trained with another (the rule llmc's trainers apply themselves)
    try:
        renew_stage_tokenizer(Path(build_dir) / "assets", d, resume_checkpoint(c.checkpoints))
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if c.record:
        write_titan_record(d, c.stage, c.record)


# torchrun's own log lines (glog-style "E1206 18:44:35.693000 21592 torch/distributed/elastic/...] failed ..."): the
# error ones report the failure the stage's own line says, with the report below them
_TORCHRUN_ERROR = re.compile(rb"^E\d{4} [\d:.]+ +\d+ \S*torch/distributed/")
_LLMC_ERROR = re.compile(rb"\berror\[[A-Z]+\d*\]")


_RANK_PREFIX = re.compile(rb"^\[rank\d+\]:\s?")


class StderrRelay:
    """The part of a stage's stderr a terminal shows (the log gets all of it). ``feed(chunk)`` returns what to show
    of it now, ``close(failed)`` what is left; lines are judged whole (a partial line waits for its end).

    Left out: every Python traceback ("Traceback (most recent call last):" through its exception line, chained ones
    too), torchrun's failure report after its ``ChildFailedError`` (the "=====" banner through its closing one,
    torch/distributed/elastic/multiprocessing/errors) and torchrun's error log lines. llmc's own located error lines
    (``error[R002]`` ...) are held back: ``close(failed=True)`` shows each other one once (ranks repeat them) and
    drops the last, since the launch's one line of the failure (L002) says it and names the log;
    ``close(failed=False)`` shows them all."""

    def __init__(self) -> None:
        self._part = b""
        self._state = "show"  # show | traceback | banner
        self._bars = 0
        self._held: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        data = self._part + chunk
        lines = data.split(b"\n")
        self._part = lines.pop()
        return b"".join(self._line(ln + b"\n") for ln in lines)

    def close(self, failed: bool) -> bytes:
        tail = self._line(self._part) if self._part else b""
        self._part = b""
        if not failed:
            return b"".join(self._held) + tail
        last = self._held[-1].strip() if self._held else b""
        return b"".join(dict.fromkeys(ln for ln in self._held if ln.strip() != last))

    def _line(self, line: bytes) -> bytes:
        # torch.distributed's excepthook prefixes each line of a rank's traceback with "[rankN]: "
        text = _RANK_PREFIX.sub(b"", line.rstrip(b"\r\n"), count=1)
        if self._state == "traceback":
            if text.startswith((b" ", b"\t")) or not text.strip():
                return b""
            # the exception line that ends the traceback (torchrun's ChildFailedError: its report follows)
            self._state, self._bars = ("banner", 0) if b"ChildFailedError" in text else ("show", 0)
            return b""
        if self._state == "banner":
            if text.startswith(b"====="):
                self._bars += 1
                if self._bars == 2:
                    self._state = "show"
            return b""
        if text.startswith(b"Traceback (most recent call last):"):
            self._state = "traceback"
            return b""
        if text.startswith((b"During handling of the above exception", b"The above exception was the direct cause")):
            return b""
        if _TORCHRUN_ERROR.match(text):
            return b""
        if _LLMC_ERROR.search(text):
            self._held.append(line)
            return b""
        return line
