"""Launch and build safety (an SRE's black-box review): a stage stopped by a signal is "preempted" (exit 75, "the state
is safe at the current step") only on its ranks' own word; a full disk names the file `llmc launch` was writing, the
stage and the unfinished checkpoint folders holding space; `llmc build` refuses a build a launch is running; `--nproc`
is refused before prepare when the plan's layout cannot run on that count."""

from __future__ import annotations

import errno
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
from test_build_fakes import ROOT, compile_example
from typer.testing import CliRunner

from llmc.buildfs import write_build
from llmc.cli import app
from llmc.emit import render_artifacts
from llmc.runtime.runlock import EXIT_PREEMPTED, RunLock

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
VENV_BIN = Path(sys.executable).parent


def _tiny_build(tmp_path: Path) -> Path:
    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    return out


def _fake_stages(monkeypatch, script: str) -> None:
    """`llmc launch` runs ``bash -c script`` for the training stage (prepare: ``true``), through the real supervision,
    log tee and messages."""
    import llmc.launch as launch_mod

    real = launch_mod.launch_commands

    def fake(*a, **kw):
        cmds = real(*a, **kw)
        for c in cmds:
            train = c.stage == "pretrain" and "llmc.runtime.evaluate" not in c.argv
            c.skip_reason = None if c.stage == "prepare" or train else "not this test's"
            c.argv = ["bash", "-c", script if train else "true"]
        return cmds

    monkeypatch.setattr(launch_mod, "launch_commands", fake)


# ----------------------------------------------------------------------------- 1. "preempted" only on the ranks' word


def test_a_signalled_stage_no_rank_reported_on_is_not_preempted(tmp_path):
    """torchrun exits 1 on its own SignalException whether its workers saved and exited 75 or hung and were SIGKILLed:
    a stop passed on plus a non-zero status is no evidence of a save. Only every rank's report is."""
    from llmc.runtime import runlock

    empty = tmp_path / "reports"
    empty.mkdir()
    assert runlock._stage_status(1, [signal.SIGTERM], str(empty)) == 1
    assert runlock._stage_status(1, [signal.SIGUSR1], str(empty)) == 1
    env = {runlock.EXIT_DIR_ENV: str(empty), "WORLD_SIZE": "2"}
    for rank in ("0", "1"):
        subprocess.run([sys.executable, "-c", "from llmc.runtime.runlock import report_exit; report_exit(75)"],
                       env={**ENV, **env, "RANK": rank}, check=True, timeout=60)
    assert runlock._stage_status(1, [signal.SIGTERM], str(empty)) == EXIT_PREEMPTED


def test_a_torchrun_like_stage_that_exits_1_after_a_sigterm_is_not_preempted(tmp_path):
    """Through the supervision `llmc launch` uses: the stage got the SIGTERM (passed on) and exited 1 with no rank
    report; its status stays 1 and the signal is on record for the launch's message."""
    code = textwrap.dedent("""
        import os, sys, threading, time, signal
        from llmc.runtime.runlock import supervise_stage
        threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        r = supervise_stage(["bash", "-c", "trap 'exit 1' TERM; while true; do sleep 0.1; done"], grace_s=10.0)
        print(r.status, r.rc, ",".join(r.signals), len(r.reported))
        """)
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["1", "1", "SIGTERM", "0"], r.stdout + r.stderr


SPEC = textwrap.dedent("""\
    name: sigterm2
    model: {name: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128, vocab_size: 512,
             max_seq_len: 64}
    hardware: {gpu: cpu, count: 2}
    data:
      sources: [{name: python-docs, format: builtin}]
      tokenizer: {train: true, vocab_size: 512}
      seq_len: 64
      tokens: %d
    training:
      precision: fp32
      global_batch_tokens: 1024
      optimizer: {lr: 3.0e-3}
      checkpoint: {interval_steps: %d}
      log_every: 1
    """)


def _records(path: Path) -> list[dict]:
    out = []
    for x in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(x))
        except ValueError:
            pass
    return out


def _llmc(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmc.cli", *args]


def _ranks(launch_pid: int) -> dict[int, int]:
    """{RANK: pid} of the trainer processes under ``launch_pid`` (read from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = dict(x.split(b"=", 1) for x in (d / "environ").read_bytes().split(b"\0") if b"=" in x)
        except OSError:
            continue
        if b"llmc.runtime.entry" in argv and b"--stage" in argv and b"RANK" in env and b"LOCAL_RANK" in env:
            out[int(env[b"RANK"])] = int(d.name)
    return out


def _launch_until_step(build: Path, step: int, env: dict) -> subprocess.Popen:
    metrics = build / "run" / "pretrain" / "metrics.jsonl"
    proc = subprocess.Popen(_llmc("launch", str(build)), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= step and "event" not in r for r in _records(metrics)):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the stage never logged step {step}: {proc.communicate()[1][-3000:]}")


def _build_spec(tmp_path: Path, steps: int, interval: int) -> Path:
    (tmp_path / "spec.yaml").write_text(SPEC % (steps * 1024, interval))
    r = subprocess.run(_llmc("build", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "b")), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp_path / "b"


@pytest.mark.skipif(not (VENV_BIN / "torchrun").exists(), reason="no torchrun next to the interpreter")
def test_native_two_process_sigterm_is_preempted_with_a_checkpoint_of_the_current_step(tmp_path):
    """The native trainer (2 CPU processes) saves the step it is on when `llmc launch` gets a SIGTERM; its ranks say
    so (report_exit), so the launch exits 75 although torchrun itself exits 1; the saved step is the current one."""
    steps = 400
    b = _build_spec(tmp_path, steps, 1000)  # no interval checkpoint: the only save is the one the signal asks for
    proc = _launch_until_step(b, 3, ENV)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    recs = _records(b / "run" / "pretrain" / "metrics.jsonl")
    pre = [r for r in recs if r.get("event") == "preempted"]
    assert pre, err[-3000:]
    saved = pre[-1]["step"]
    last = max(r["step"] for r in recs if "event" not in r and "loss" in r)
    assert 3 <= saved < steps and saved == last  # the step it was on when it stopped
    ck = b / "run" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [f"step-{saved:08d}"]
    assert (ck / f"step-{saved:08d}" / "manifest.json").is_file()
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stage 'pretrain' preempted" in err and f"step-{saved:08d}" in err, err[-3000:]


@pytest.mark.skipif(not (VENV_BIN / "torchrun").exists(), reason="no torchrun next to the interpreter")
def test_a_hung_rank_stopped_by_sigterm_is_not_preempted_and_the_line_names_the_resume_checkpoint(tmp_path):
    """The review's repro: one rank SIGSTOPped (hung), then SIGTERM to `llmc launch`. The other rank cannot finish the
    collective to save its step, torchrun SIGKILLs both after its shutdown time and exits 1: nothing of the current
    step is saved. Not 75 (a requeue would take it for a safe state); the line names the checkpoint a rerun resumes
    from, the newest complete one, and the log."""
    b = _build_spec(tmp_path, 400, 3)
    env = {**ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "5"}  # (torchrun's wait before its SIGKILL; `llmc launch` waits longer)
    proc = _launch_until_step(b, 5, env)  # step 3's checkpoint is complete by then
    ranks = {}
    try:
        deadline = time.time() + 30
        while len(ranks) < 2 and time.time() < deadline:
            ranks = _ranks(proc.pid)
            time.sleep(0.1)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, EXIT_PREEMPTED), err[-3000:]
    assert "preempted:" not in err, err[-3000:]
    ck = b / "run" / "pretrain" / "checkpoints"
    done = sorted(p.name for p in ck.iterdir() if (p / "manifest.json").is_file())
    assert done, list(ck.iterdir())
    line = [ln for ln in err.splitlines() if "error[L002]" in ln]
    assert len(line) == 1, err[-3000:]
    assert "not counted as preempted" in line[0] and "no rank reported" in line[0], line[0]
    assert f"resume from {os.path.relpath(ck / done[-1], ROOT)}" in line[0], line[0]
    assert "full log: " in line[0]


# ----------------------------------------------------------------------------- 2. a full disk


def test_a_log_that_cannot_be_written_does_not_stop_or_block_the_stage(tmp_path):
    """/dev/full answers every write with ENOSPC (null(4)). The stage prints 256 KiB to stderr (four times a pipe's
    64 KiB): the tee must keep draining it (a stalled pipe would block the stage forever), and the cause line still
    comes from what it printed."""
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from llmc.cli import _run_logged
        r = _run_logged(["bash", "-c", "head -c 262144 /dev/zero | tr '\\\\0' x >&2; echo >&2; "
                         "echo 'error[R002] pretrain: boom' >&2; exit 3"], None, None, Path("/dev/full"), 5.0)
        print(r[0], "|", r[1], "|", r.log_error.errno, file=sys.stdout)
        """)
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"3 | error[R002] pretrain: boom | {errno.ENOSPC}", r.stdout + r.stderr[-2000:]


def test_launch_names_the_log_it_cannot_write_the_stage_and_the_unfinished_checkpoints(tmp_path, monkeypatch):
    """The review's full disk: `llmc launch` died with `error[IO] No space left on device` (no path, stage or log).
    Now: one L014 line naming the log, the stage, and the unfinished checkpoint folder holding space (with its size),
    which it does not delete."""
    b = _tiny_build(tmp_path)
    tmp = b / "run" / "pretrain" / "checkpoints" / "step-00000015.tmp"
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(b"\0" * 3 * 1024 * 1024)
    log = b / "run" / "pretrain" / "stderr.log"
    log.symlink_to("/dev/full")  # every write: ENOSPC
    # (a link where the run writes is refused before anything runs, error[L001]: here it only stands in for a full
    # disk, so that refusal is set aside)
    import llmc.launch as launch_mod

    monkeypatch.setattr(launch_mod, "linked_write_path", lambda *a, **k: None)
    _fake_stages(monkeypatch, "echo training >&2; exit 0")
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native"])
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if "error[" in ln]
    assert len(lines) == 1 and "error[IO]" not in lines[0], r.output
    line = lines[0]
    assert line.startswith(f"{log}: error[L014] stage 'pretrain': "), line
    assert os.strerror(errno.ENOSPC) in line and "step-00000015.tmp (3.0 MiB)" in line, line
    assert tmp.is_dir()  # listed, never deleted


def test_enospc_in_a_rank_is_an_l002_line_with_the_space_hint_and_the_log(tmp_path, monkeypatch):
    """A rank's own save failing on a full disk reads like the read-only case: L002, the cause, the unfinished
    checkpoint folder that holds the space, and the log."""
    b = _tiny_build(tmp_path)
    tmp = b / "run" / "pretrain" / "checkpoints" / "step-00000015.tmp"
    tmp.mkdir(parents=True)
    (tmp / "x.distcp").write_bytes(b"\0" * 2048)
    _fake_stages(monkeypatch, "echo 'OSError: [Errno 28] No space left on device' >&2; exit 1")
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native"])
    assert r.exit_code == 1, r.output
    line = [ln for ln in r.output.splitlines() if "error[" in ln][-1]
    assert "error[L002] stage 'pretrain' failed (exit 1): OSError: [Errno 28] No space left on device" in line, line
    assert "step-00000015.tmp (2.0 KiB)" in line and "full log: " in line, line


def test_a_lock_record_that_cannot_be_written_names_the_lock_and_leaves_no_half_record(tmp_path, monkeypatch):
    """RunLock's holder record failing (ENOSPC from write(2) carries no file name): the error names run/.lock, the lock
    is not held, the file holds no half record, and the next acquire works (an empty lock file blocks nobody)."""
    from llmc.runtime import runlock

    run = tmp_path / "run"
    real = os.pwrite

    def full(fd, data, off):
        real(fd, data[:7], off)  # a short write, as a nearly full disk gives
        return 7

    monkeypatch.setattr(runlock.os, "pwrite", full)
    with pytest.raises(OSError) as e:
        RunLock(run).acquire()
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(run / ".lock")
    assert (run / ".lock").read_bytes() == b""
    monkeypatch.setattr(runlock.os, "pwrite", real)
    assert runlock.held_by(run) is None
    with RunLock(run) as lk:
        assert json.loads(lk.path.read_text())["pid"] == os.getpid()


def test_launch_says_which_file_when_the_run_lock_cannot_be_written(tmp_path, monkeypatch):
    from llmc.runtime import runlock

    b = _tiny_build(tmp_path)

    def full(fd, data, off):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runlock.os, "pwrite", full)
    _fake_stages(monkeypatch, "exit 0")
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native"])
    assert r.exit_code == 1, r.output
    line = [ln for ln in r.output.splitlines() if "error[" in ln][-1]
    assert line.startswith(f"{b.resolve() / 'run' / '.lock'}: error[L014] `llmc launch` cannot write the run lock"), line


# ----------------------------------------------------------------------------- 3. build over a live run


def test_build_refuses_a_directory_whose_run_lock_a_live_launch_holds(tmp_path):
    """The same process holds the lock through its own RunLock: flock(2) locks belong to the open file description,
    so `llmc build`'s own open of run/.lock conflicts with it as another process's would."""
    spec = ROOT / "examples" / "tiny_cpu.yaml"
    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["build", str(spec), "-o", str(out)]).exit_code == 0
    lock = out / "plan.lock.json"
    before = lock.read_bytes()
    with RunLock(out / "run"):
        r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "--set", "training.optimizer.lr=0.001"])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(err) == 1, r.output
    assert err[0].startswith(f"{out / 'run' / '.lock'}: error[X015] an `llmc launch` of this build is running "
                             f"(pid {os.getpid()} on host {socket.gethostname()})"), err[0]
    assert "build into another directory" in err[0]
    assert lock.read_bytes() == before  # nothing rewritten
    # once the launch is gone (the kernel drops a dead holder's lock too), the build goes ahead
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "--set", "training.optimizer.lr=0.001"])
    assert r.exit_code == 0, r.output
    assert lock.read_bytes() != before


def test_build_refuses_a_directory_whose_stage_lock_a_trainer_holds(tmp_path):
    spec = ROOT / "examples" / "tiny_cpu.yaml"
    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["build", str(spec), "-o", str(out)]).exit_code == 0
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from llmc.runtime.runlock import RunLock
        with RunLock({str(out / 'run' / 'pretrain')!r}):
            open({str(ready)!r}, "w").close()
            time.sleep(120)
        """)], env=ENV)
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "--set", "training.optimizer.lr=0.001"])
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code == 1, r.output
    assert f"error[X015] a trainer of stage 'pretrain' is running (pid {holder.pid} on host" in r.output, r.output


# ----------------------------------------------------------------------------- 4. --nproc


def test_nproc_other_than_the_plans_world_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """tiny_cpu's plan runs on 1 process (dp_replicate x dp_shard x tp = 1): the native trainer refuses WORLD_SIZE=2
    (R002, after prepare). `--nproc 2` is refused up front, with what it can be; the plan's own count goes through."""
    b = _tiny_build(tmp_path)
    ran = []
    import llmc.cli as cli

    monkeypatch.setattr(cli, "_run_logged", lambda argv, env, cwd, log, grace_s: (ran.append(argv) or 0, ""))
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--nproc", "2", "--dry-run"])
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()
    assert len(line) == 1 and "error[L001] --nproc 2: stage 'pretrain'" in line[0], r.output
    assert "--nproc can only be 1" in line[0] and "hardware.count=2" in line[0], line[0]
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--nproc", "2"])
    assert r.exit_code == 1 and ran == [], r.output  # not even prepare
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--nproc", "1", "--dry-run"])
    assert r.exit_code == 0, r.output
