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
    signal ended it, the shell convention), or :data:`EXIT_PREEMPTED` when it passed the child a SIGTERM /
    SIGUSR1 and the child then exited non-zero by itself: the child handled the stop (torchrun exits 1
    once its workers saved their step and exited 75). Call it from the main thread.

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

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
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
        info = {"host": socket.gethostname(), "pid": os.getpid(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
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


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return f"pid {int(info['pid'])} on host {info['host']}"
    except (ValueError, KeyError, TypeError):
        return "another process (holder not recorded yet)"


# ---------------------------------------------------------------- supervision

_GUARD = r"""
import os, signal, sys, time
parent, pgid, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
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
except ProcessLookupError:
    sys.exit(0)
end = time.monotonic() + grace
while time.monotonic() < end and alive():
    time.sleep(0.05)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
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


def supervise(cmd: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, *,
              grace_s: float = 10.0) -> int:
    """Run ``cmd`` in its own process group; it and its group never outlive the caller."""
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
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True, close_fds=True,
                                preexec_fn=_pdeathsig_preexec(signal.SIGTERM, me))
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        raise
    pgid = proc.pid
    group.append(pgid)
    if received:  # a signal arrived while the child was starting: pass it on now
        forward(received[-1], None)
    guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(me), str(pgid), str(grace_s)],
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
        stop = {signal.SIGTERM, signal.SIGUSR1}
        if set(received) & stop and rc not in (0, *(128 + int(sg) for sg in (*stop, signal.SIGKILL))):
            return EXIT_PREEMPTED  # it handled the stop and left (not killed by it, 128 + N)
        return rc
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
