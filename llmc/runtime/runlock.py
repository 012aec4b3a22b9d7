"""One trainer per run directory, and no trainer outliving ``llmc launch``. Never imports torch.

API
---
``RunLock(run_dir)`` (context manager; also ``acquire()``/``release()``)
    Creates ``run_dir`` and holds an exclusive, non-blocking ``fcntl.flock`` on ``run_dir/.lock``
    (``LOCK_NAME``) while the run is active. The lock file holds one JSON object naming the holder,
    ``{"host": ..., "pid": ..., "argv": [...]}``; a second holder gets ``RunLockBusy`` whose message
    names that pid and host. The kernel drops the lock when the holder dies, even on SIGKILL, so a
    stale lock file never blocks a new run. ``flock`` locks are per open file description: the lock
    is not shared with children (``supervise`` starts them with ``close_fds=True``).

``supervise(cmd, env=None, cwd=None, *, grace_s=10.0) -> int``
    Runs ``cmd`` in its own session/process group and returns its exit code (``128 + signal`` when a
    signal ended it, the shell convention), or :data:`EXIT_PREEMPTED` when the stage was preempted. Call it
    from the main thread. "Preempted" is decided, once the child and everything left in its group are gone:

    only from what the ranks reported (:func:`report_exit`): every rank of the job reported
    :data:`EXIT_PREEMPTED`. A launcher's own status says nothing about its ranks after a signal: torchrun exits 1
    on its own SignalException whether its workers saved their step and exited 75 or hung and were SIGKILLed
    ("Unable to shutdown process ... via 15, forcefully exiting via 9", torch/distributed/elastic/multiprocessing/
    api.py ``_close``); the DeepSpeed 0.19.8 launcher exits 1 once it has stopped its ranks, whatever they returned
    (deepspeed/launcher/launch.py, ``sigkill_handler``), and its runner (deepspeed/launcher/runner.py) has no
    SIGTERM handler on one node, so a SIGTERM to the group ends it with 143 while the ranks still save. So a stage
    whose ranks did not all report is never called preempted (a requeue reads 75 as "the state is safe at the
    current step"): its launcher's status stands. llmc's trainers report (``llmc.runtime.entry``,
    ``llmc.runtime.ds_train``, the torchtitan job). :func:`supervise_stage` also returns the signals passed on and
    the reports, for the caller's message.

``report_exit(code)`` / ``reported_status(dir)``
    The ranks' side of that evidence. A launcher puts a fresh directory in the ranks' environment as
    ``LLMC_EXIT_DIR`` (:data:`EXIT_DIR_ENV`; ``supervise`` does, and deepspeed/launch.sh, which reads the
    reports in bash); a trainer rank calls ``report_exit(code)`` just before it exits, which writes
    ``rank-<RANK>.json`` there: one line, ``{"rank": R, "world": W, "exit": N, "pid": P}`` (nothing when the
    variable is unset). ``reported_status`` is the one status every rank 0..W-1 reported, else None.

    * SIGINT, SIGTERM and SIGHUP received by the caller are forwarded to the child's group, and SIGUSR1
      (a batch system's "time is almost up", e.g. ``sbatch --signal=USR1@120``) as SIGTERM, which torchrun
      passes on to its workers (a SIGUSR1 would kill torchrun and orphan them); llmc's trainers answer both
      by saving their current step (:mod:`llmc.runtime.preempt`). The child gets ``grace_s`` seconds, then the
      group is SIGKILLed.
    * The caller dying, even by SIGKILL, takes the child with it: on Linux the child is started with
      ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (prctl(2)); a small guard process (``python -c``) polls its
      own parent pid and, once the caller is gone, sends SIGTERM to the group and SIGKILL after
      ``grace_s``. SIGTERM first, because torchrun runs its workers in their own sessions
      (``start_new_session=True`` in torch.distributed.elastic's ``SubprocessHandler``) and stops them
      only when it is itself allowed to handle the signal.
    * When the child exits, whatever is left in its group is stopped the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Exit status of a stage that saved its state on a signal and wants to be run again. 75 is EX_TEMPFAIL of
# BSD's sysexits.h ("a temporary failure ... the user is invited to retry the operation later"); neither
# Slurm (a job killed by signal N reports 128 + N, e.g. 143 for SIGTERM), torchrun (1 when a worker fails)
# nor Python (1 for an uncaught exception, 2 for a usage error) uses it for anything of its own, so a
# launcher can tell "preempted, resume me" from "failed".
EXIT_PREEMPTED = 75

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# where a launcher asks its trainer ranks to report their exit status (report_exit)
EXIT_DIR_ENV = "LLMC_EXIT_DIR"


class RunLockBusy(Exception):
    """Another process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunLockBusy(f"{self.run_dir}: run directory is in use by {holder} "
                              f"(wait for it to finish or stop it; one trainer per run directory)") from None
        except BaseException:
            os.close(fd)
            raise
        data = (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv}) + "\n").encode()
        try:
            # the record first, then the length: a failed write (a full disk) leaves no half record; a file cut to
            # nothing reads as "holder not recorded yet", and only while a holder has the lock
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.ftruncate(fd, len(data))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # (drops the lock)
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_by(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock (``"pid P on host H"``) when a live process does, else None (no lock file, or
    nobody holds it: the kernel drops a dead holder's lock). Probes with a shared, non-blocking ``flock`` on a file
    description of its own (a holder's exclusive lock conflicts with it, even in this process: flock locks belong
    to the open file description, flock(2)); creates nothing."""
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None  # no lock file (or not one llmc could have written): no run holds it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(os.pread(fd, 4096, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {int(info['pid'])} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process (holder not recorded yet)"


# ---------------------------------------------------------------- the ranks' exit reports


def report_exit(code: int) -> None:
    """Record this trainer rank's exit status where its launcher asked (``$LLMC_EXIT_DIR/rank-<RANK>.json``:
    rank, world size, status, pid), written whole (a temporary file renamed over it); nothing when the variable
    is unset. ``RANK`` / ``WORLD_SIZE`` are what torchrun and the DeepSpeed launcher set (1 process: 0 / 1).
    Never raises: the report is evidence for the launcher, and a rank's own status must not depend on it."""
    d = os.environ.get(EXIT_DIR_ENV)
    if not d:
        return
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        path = Path(d) / f"rank-{rank}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"rank": rank, "world": world, "exit": int(code), "pid": os.getpid()}) + "\n")
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def reported_status(d: str | Path) -> int | None:
    """The exit status every rank of the job reported in ``d`` (:func:`report_exit`): one report from each rank
    0..world-1, all naming the same world size and the same status. None when there is no report, a rank's is
    missing (it died before it could write one: a SIGKILL, a crash) or unreadable, or they disagree."""
    reports = []
    try:
        names = sorted(Path(d).glob("rank-*.json"))
    except OSError:
        return None
    for f in names:
        try:
            r = json.loads(f.read_text())
            reports.append((int(r["rank"]), int(r["world"]), int(r["exit"])))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    worlds, codes = {w for _, w, _ in reports}, {c for _, _, c in reports}
    if len(worlds) != 1 or len(codes) != 1 or sorted(r for r, _, _ in reports) != list(range(next(iter(worlds)))):
        return None
    return codes.pop()


# ---------------------------------------------------------------- supervision

_GUARD = r"""
import os, shutil, signal, sys, time
parent, pgid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
exit_dir = sys.argv[4] if len(sys.argv) > 4 else ""  # the ranks' reports: the caller's to remove, unless it died
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # the caller stops the guard when done
def alive():
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
while os.getppid() == parent:
    if not alive():
        sys.exit(0)
    time.sleep(0.1)
try:
    os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace
    while time.monotonic() < end and alive():
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
if exit_dir:
    shutil.rmtree(exit_dir, ignore_errors=True)
"""


def _pdeathsig_preexec(sig: int, parent: int):
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the caller died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_group(pgid: int, grace_s: float, first: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pgid, first)
    except ProcessLookupError:
        return
    end = time.monotonic() + grace_s
    while time.monotonic() < end and _group_alive(pgid):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rc(code: int) -> int:
    return 128 - code if code < 0 else code


@dataclasses.dataclass(frozen=True)
class StageExit:
    """How a supervised stage ended (:func:`supervise_stage`): ``status``, what ``supervise`` returns (the exit code,
    or :data:`EXIT_PREEMPTED` when every rank reported it); ``rc``, the child's own exit code; ``signals``, the
    signals passed on to it (names, in order); ``reported``, ``{rank: exit status}`` of the ranks that reported;
    ``world``, the world size they named (0: no report)."""

    status: int
    rc: int
    signals: tuple[str, ...] = ()
    reported: dict = dataclasses.field(default_factory=dict)
    world: int = 0


def supervise(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, *,
              grace_s: float = 10.0) -> int:
    """Run ``cmd`` in its own process group; it and its group never outlive the caller. Its ranks may report
    their exit status (:func:`report_exit`) to a directory of this call's, named in their environment."""
    return supervise_stage(cmd, env, cwd, grace_s=grace_s).status


def supervise_stage(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, *,
                    grace_s: float = 10.0) -> StageExit:
    """:func:`supervise`, with what the caller needs to say how the stage ended (:class:`StageExit`)."""
    me = os.getpid()
    received: list[int] = []
    group: list[int] = []  # the child's process group, once started

    def forward(signum, _frame):
        received.append(signum)
        for pg in group:
            try:
                # SIGUSR1 (a time limit) and SIGINT (Ctrl-C) reach the trainers as SIGTERM, on which they save the
                # step in flight and exit as preempted (a SIGINT killed torchrun's workers unsaved)
                os.killpg(pg, signal.SIGTERM if signum in (signal.SIGUSR1, signal.SIGINT) else signum)
            except ProcessLookupError:
                pass

    # handlers first: a signal between starting the child and installing them would otherwise kill the
    # caller with the default action (the child would still die, through PDEATHSIG and the guard)
    main = threading.current_thread() is threading.main_thread()
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    old = {s: signal.signal(s, forward) for s in sigs} if main else {}
    exit_dir = ""
    try:
        exit_dir = tempfile.mkdtemp(prefix="llmc-exit-")
        env = {**(os.environ if env is None else env), EXIT_DIR_ENV: exit_dir}
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, close_fds=True,
                                preexec_fn=_pdeathsig_preexec(signal.SIGTERM, me))
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        if exit_dir:
            shutil.rmtree(exit_dir, ignore_errors=True)
        raise
    pgid = proc.pid
    group.append(pgid)
    if received:  # a signal arrived while the child was starting: pass it on now
        forward(received[-1], None)
    guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(me), str(pgid), str(grace_s), exit_dir],
                             start_new_session=True, close_fds=True, stdin=subprocess.DEVNULL)
    try:
        deadline = None
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if received and deadline is None:
                    deadline = time.monotonic() + grace_s
                if deadline is not None and time.monotonic() > deadline:
                    _stop_group(pgid, 0.0, signal.SIGKILL)
        rc = _rc(code)
        # what is left of its group first: a launcher can end before its ranks (the DeepSpeed runner, killed by the
        # SIGTERM, while they still save), and their reports are only complete once they are gone
        _stop_group(pgid, grace_s)
        reported, world = _reports(exit_dir)
        return StageExit(_stage_status(rc, received, exit_dir), rc, tuple(_signame(x) for x in received), reported,
                         world)
    finally:
        try:
            _stop_group(pgid, grace_s)  # leftovers in the group (or the child, if we got here by an exception)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            guard.terminate()
            guard.wait()
            shutil.rmtree(exit_dir, ignore_errors=True)


def _stage_status(rc: int, received: list[int], exit_dir: str) -> int:
    """A supervised stage's status from its exit code ``rc`` and its ranks' reports (see the module docstring):
    :data:`EXIT_PREEMPTED` only when every rank reported it, else ``rc``. ``received`` (the signals passed on) is
    not evidence: after a SIGTERM torchrun exits 1 whether its workers saved their step or were killed unsaved."""
    if rc == 0:
        return 0
    return EXIT_PREEMPTED if reported_status(exit_dir) == EXIT_PREEMPTED else rc


def _reports(d: str) -> tuple[dict[int, int], int]:
    """``({rank: status}, world)`` of the readable reports in ``d`` (world: the largest named; 0 without one)."""
    out: dict[int, int] = {}
    world = 0
    try:
        names = sorted(Path(d).glob("rank-*.json")) if d else []
    except OSError:
        return {}, 0
    for f in names:
        try:
            r = json.loads(f.read_text())
            out[int(r["rank"])] = int(r["exit"])
            world = max(world, int(r["world"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out, world


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"
