"""llmc.runtime.runlock (one trainer per run dir; children die with llmc) and llmc.runtime.metrics_io."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmc.runtime.metrics_io import read_metrics, truncate_after_step
from llmc.runtime.runlock import RunLock, RunLockBusy, supervise

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped (it runs no more code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (reaped between the open and the read: ESRCH)
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_dead(pids, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(dead(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("inf")


def wait_file(path: Path, n_lines: int, timeout: float = 20.0) -> list[str]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n_lines:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} not written")


# ---------------------------------------------------------------- RunLock

def test_second_runlock_in_same_process_is_busy(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockBusy) as e:
            RunLock(tmp_path / "run").acquire()
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(e.value)
    with RunLock(tmp_path / "run"):  # released on exit
        pass


def test_runlock_held_by_other_process_and_freed_when_it_is_killed(tmp_path):
    run = tmp_path / "run"
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, pathlib
        from llmc.runtime.runlock import RunLock
        with RunLock({str(run)!r}):
            pathlib.Path({str(ready)!r}).write_text("1\\n")
            time.sleep(60)
        """)], env=ENV)
    try:
        wait_file(ready, 1)
        with pytest.raises(RunLockBusy, match=f"pid {holder.pid} on host"):
            RunLock(run).acquire()
        holder.kill()
        holder.wait()
        with RunLock(run) as lk:  # the kernel dropped the dead holder's lock; a stale file does not block
            assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- supervise

# A child that writes its pid and a grandchild's pid (same process group), then loops.
CHILD = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    g = subprocess.Popen(["sleep", "60"])
    with open(sys.argv[1], "w") as f:
        f.write(f"{os.getpid()}\\n{g.pid}\\n")
    while True:
        time.sleep(0.1)
""")


def start_parent(tmp_path: Path, mode: str = "normal", grace: float = 1.0):
    pids = tmp_path / f"pids-{mode}"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from llmc.runtime.runlock import supervise
        sys.exit(supervise([sys.executable, "-c", {CHILD!r}, {str(pids)!r}, {mode!r}], grace_s={grace}))
        """)], env=ENV)
    child, grandchild = (int(x) for x in wait_file(pids, 2))
    return parent, child, grandchild


@pytest.mark.parametrize("mode", ["normal", "ignore-term"])
def test_children_die_when_supervisor_is_sigkilled(tmp_path, mode):
    parent, child, grandchild = start_parent(tmp_path, mode, grace=1.0)
    try:
        assert os.getpgid(child) == child and os.getpgid(grandchild) == child
        time.sleep(0.3)
        assert not dead(child) and not dead(grandchild)
        parent.kill()
        parent.wait()
        # SIGTERM at once; SIGKILL after grace_s=1 for a child that ignores SIGTERM
        assert wait_dead([child, grandchild], 2.0 if mode == "normal" else 3.5) < float("inf")
    finally:
        for p in (child, grandchild):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("sent, passed_on", [(signal.SIGHUP, signal.SIGHUP), (signal.SIGINT, signal.SIGTERM)])
def test_signals_are_forwarded_and_children_die(tmp_path, sent, passed_on):
    """SIGHUP is passed on as is; a SIGINT (Ctrl-C on `llmc launch`) as SIGTERM, the signal llmc's trainers save their
    current step on (a SIGINT made torchrun kill its workers unsaved); the supervisor exits as its child did."""
    parent, child, grandchild = start_parent(tmp_path, "normal")
    try:
        parent.send_signal(sent)
        assert wait_dead([child, grandchild], 2.0) < float("inf")
        assert parent.wait(timeout=10) == 128 + passed_on
    finally:
        parent.kill()
        for p in (child, grandchild):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_exit_code_and_leftovers_of_normal_exit(tmp_path):
    out = tmp_path / "bg"
    rc = supervise(["sh", "-c", f"sleep 60 & echo $! > {out}; exit 3"], grace_s=1.0)
    assert rc == 3
    assert wait_dead([int(out.read_text())], 2.0) < float("inf")
    assert supervise([sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"]) == 128 + 15


# ---------------------------------------------------------------- metrics_io

def _rec(step, loss, **kw):
    return json.dumps({"step": step, "loss": loss, **kw}) + "\n"


def test_resume_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = {s: 10.0 - s for s in range(1, 8)}
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "world": 1}) + "\n")
        for s, loss in first.items():
            f.write(_rec(s, loss))
            if s == 4:
                f.write(json.dumps({"event": "checkpoint", "step": 4}) + "\n")
            if s == 6:
                f.write(json.dumps({"event": "eval", "step": 6, "val_loss": 3.0}) + "\n")
        f.write('{"step": 8, "lo')  # killed mid-write
    mode = 0o640
    os.chmod(path, mode)
    # killed run resumed from the checkpoint at step 4: steps 5..7 (and the step-6 eval) go
    assert truncate_after_step(path, 4) == 4  # steps 5, 6, 7 and the step-6 eval
    assert (path.stat().st_mode & 0o777) == mode
    log = read_metrics(path)
    assert [r["step"] for r in log.steps] == [1, 2, 3, 4]
    assert [e["event"] for e in log.events] == ["start", "checkpoint"]
    second = {s: 20.0 - s for s in range(5, 10)}
    with open(path, "a") as f:
        for s, loss in second.items():
            f.write(_rec(s, loss))
    log = read_metrics(path)
    assert [r["step"] for r in log.steps] == list(range(1, 10))
    assert {r["step"]: r["loss"] for r in log.steps} == {**{s: first[s] for s in range(1, 5)}, **second}
    assert path.read_text().count('"step": 5,') == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp file left
    assert truncate_after_step(path, 100) == 0
    assert truncate_after_step(tmp_path / "missing.jsonl", 3) == 0 and not (tmp_path / "missing.jsonl").exists()


def test_read_metrics_last_write_wins_and_tolerates_partial_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(_rec(1, 5.0) + _rec(2, 4.0) + _rec(3, 3.5) + _rec(2, 4.5) + _rec(3, 3.2) + '{"step": 4,')
    log = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in log.steps] == [(1, 5.0), (2, 4.5), (3, 3.2)]
    path.write_text(_rec(1, 5.0) + _rec(2, 4.0))  # ends without the torn line: the last record counts
    path.write_text(path.read_text().rstrip("\n"))
    assert [r["step"] for r in read_metrics(path).steps] == [1, 2]
    path.write_text(_rec(1, 5.0) + "garbage\n" + _rec(2, 4.0))
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        read_metrics(path)
    # a step's validation record joins its training record instead of replacing it
    path.write_text(_rec(1, 5.0) + _rec(2, 4.0) + json.dumps({"step": 2, "val_loss": 4.4}) + "\n")
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(path).steps] == [
        (1, 5.0, None), (2, 4.0, 4.4)]
