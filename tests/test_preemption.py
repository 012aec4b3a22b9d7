"""Preemption (SIGTERM / SIGUSR1, llmc.runtime.preempt): the run saves the step it is at, exits with the
preempted status, and a rerun resumes from that step and ends exactly where an uninterrupted run ends.

Bitwise comparisons (``==`` / ``torch.equal``): every run here is fp32 on CPU with one thread per process
(OMP_NUM_THREADS=1), so the interrupted + resumed run executes the same kernels on the same inputs in the
same order as the uninterrupted one; the resume restores weights, optimizer, RNGs and the data position
exactly, so any difference at all is a resume bug, not rounding."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_build_fakes import make_compiled, make_run  # noqa: E402
from test_runtime_train import make_lock as runtime_lock  # noqa: E402
from test_runtime_train import run as run_in_process  # noqa: E402
from test_runtime_train import torchrun_cases  # noqa: E402  (the runtime tests' multi-rank launcher)

from llmc.buildfs import write_build  # noqa: E402
from llmc.emit import render_artifacts  # noqa: E402
from llmc.runtime import corpus  # noqa: E402
from llmc.runtime.checkpoint import list_checkpoints, read_model_state  # noqa: E402
from llmc.runtime.preempt import EXIT_PREEMPTED  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
STEPS, INTERVAL = 40, 25  # the signal lands within the first steps: before any interval checkpoint


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return d / "docs.jsonl"


def make_lock(tmp: Path, docs: Path, plan: dict | None = None) -> Path:
    """The tiny fp32 pre-training lock of test_runtime_train, with this file's steps and checkpoint interval."""
    return runtime_lock(tmp, docs, steps=STEPS, interval=INTERVAL, plan=plan)


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r and "event" not in r}


def entry_cmd(lock: Path, out: Path, nproc: int = 1) -> list[str]:
    pre = [sys.executable]
    if nproc > 1:
        pre += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
                "--rdzv_endpoint=localhost:0"]
    return [*pre, "-m", "llmc.runtime.entry", "--lock", str(lock), "--out", str(out)]


def preempt_after(cmd: list[str], out: Path, logged: int = 3, timeout: float = 180) -> tuple[int, str]:
    """Start ``cmd``, SIGTERM it once metrics.jsonl holds step ``logged``; (exit status, output)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    m = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if m.exists() and any(json.loads(x).get("step", 0) >= logged for x in m.read_text().splitlines()
                              if x.endswith("}")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=timeout)
    return proc.returncode, text


def final_weights(out: Path) -> dict:
    return read_model_state(out / "checkpoints" / f"step-{STEPS:08d}")


def one_thread(fn):
    """``fn()`` on one intra-op thread, as the subprocesses here run (OMP_NUM_THREADS=1): a reference run made in
    this process then executes the same kernels as they do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def check_preempted_then_resumed(ref: Path, cut: Path, rerun, rc: int, text: str,
                                 want_rc: int | None = EXIT_PREEMPTED) -> int:
    """The preempted run saved one step (not an interval one), the rerun (``rerun()``: its exit status, its
    output and the end of its error output; it may make the reference run too) resumed there and matches
    ``ref``."""
    if want_rc is not None:
        assert rc == want_rc, text[-3000:]
    assert not (cut / "DONE.json").exists(), "the stage finished before the signal; the test tests nothing"
    saved = [s for s, _ in list_checkpoints(cut / "checkpoints")]
    assert len(saved) == 1 and 0 < saved[0] < STEPS and saved[0] % INTERVAL != 0, saved  # the signal's own
    step = saved[0]
    ev = [r for r in records(cut) if r.get("event") == "preempted"]
    assert [e["step"] for e in ev] == [step]
    end = [r for r in records(cut) if r.get("event") == "end"]
    assert end[-1]["status"] == "preempted" and end[-1]["step"] == step
    returncode, out, err = rerun()
    assert returncode == 0, out[-2000:] + err
    assert f"at step {step}" in out and "resumed from" in out
    assert json.loads((cut / "DONE.json").read_text())["status"] == "done"
    ra, rb = losses(ref), losses(cut)
    assert sorted(rb) == list(range(1, STEPS + 1))  # each step logged once
    assert rb == ra
    wa, wb = final_weights(ref), final_weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return step


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resumes_exactly(tmp_path, docs, capsys):
    """The preempted run a ``python -m llmc.runtime.entry`` process (the signal is a process's); the reference
    run and the rerun in this process (one thread), the rerun through the command line's main."""
    from llmc.runtime.entry import main as entry_main

    lock = make_lock(tmp_path, docs)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert one_thread(lambda: run_in_process(lock, ref))["status"] == "done"
    rc, text = preempt_after(entry_cmd(lock, cut), cut)

    def rerun() -> tuple[int, str, str]:
        capsys.readouterr()
        code = one_thread(lambda: entry_main(entry_cmd(lock, cut)[3:]))
        out, err = capsys.readouterr()
        return code, out, err[-2000:]

    check_preempted_then_resumed(ref, cut, rerun, rc, text)


@pytest.mark.slow
def test_sigterm_to_torchrun_two_ranks(tmp_path, docs):
    """torchrun forwards the SIGTERM to both workers; they agree on the step (all-reduce) and save it
    together. torchrun itself then exits 1 (it re-raises the signal as an exception), which is why the
    Slurm script decides to requeue on the signal it trapped, not only on the exit status. The rerun and
    the uninterrupted reference run (its own copy of the lock) are one 2-rank launch: the reference run, then
    the rerun through llmc.runtime.entry's main."""
    plan = {"dp_replicate": 2, "micro_batch": 4}
    lock = make_lock(tmp_path / "cut-lock", docs, plan=plan)
    ref_lock = make_lock(tmp_path / "ref-lock", docs, plan=plan)
    cut = tmp_path / "cut"
    rc, text = preempt_after(entry_cmd(lock, cut, 2), cut)
    assert rc != 0 and "preempted: saved step" in text, text[-3000:]
    assert "SIGKILL" not in text, text[-3000:]  # both workers left within torchrun's grace period

    def rerun() -> tuple[int, str, str]:
        (tmp_path / "launch").mkdir()
        runs = torchrun_cases(tmp_path / "launch", {"ref": ref_lock, "rerun": lock}, 2, entry_last=True,
                              extra={"rerun": {"out": str(cut), "keep_out": True}})
        for r in runs.values():
            r.check()
        return 0, runs["rerun"].stdout, ""  # (a failed case failed the test in check)

    check_preempted_then_resumed(ref_lock.parent / "o", cut, rerun, rc, text, want_rc=None)


REQUESTED_WORKER = textwrap.dedent("""
    import json, os, signal, sys

    import torch.distributed as dist

    from llmc.runtime import preempt

    rank, store, signalled = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with preempt.handlers():
            before = preempt.requested()
            if rank == signalled:
                os.kill(os.getpid(), signal.SIGTERM)
            print(json.dumps([rank, before, preempt.requested(), preempt.received()]), flush=True)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    finally:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_requested_is_true_on_every_rank_when_one_rank_is_signalled(tmp_path):
    """The handler only records; requested() all-reduces, so the rank that got no signal stops too. Two
    processes of a small script (torch.distributed and llmc.runtime.preempt only), one process group."""
    script = tmp_path / "worker.py"
    script.write_text(REQUESTED_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), "1"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err[-2000:]
    got = sorted(tuple(json.loads(out.strip().splitlines()[-1])) for out, _ in outs)
    assert got == [(0, False, True, None), (1, False, True, "SIGTERM")]


# ----------------------------------------------------------------------------- post-training

SFT_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path

    import torch

    from llmc.runtime import sft
    from llmc.runtime.entry import exit_code
    from llmc.runtime.job import TrainJob
    from llmc.runtime.posttrain import run_stage
    from llmc.runtime.synthetic import ByteTokenizer
    from llmc.spec.model import Architecture
    from llmc.spec.schema import make_stage


    def run_sft(out, signal_at):
        tok = ByteTokenizer()
        arch = Architecture(name="t", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64,
                            vocab_size=tok.vocab_size, max_seq_len=96)
        data = {"sources": [{"name": "synthetic-chat", "format": "builtin", "kind": "chat"}], "seq_len": 96, "tokens": 1e5}
        st = make_stage(name="sft", kind="sft", init_from="base", data=data)
        job = TrainJob(arch=arch, sources=[], seq_len=96, steps=8, name="p", stage="sft", kind="sft", lr=2e-3,
                       micro_batch=3, init_from="base", stage_spec=st, log_every=1000, checkpoint_interval=3,
                       keep_latest=3)
        if signal_at:  # a real SIGTERM to this process, delivered while step `signal_at` ends
            end_step = sft.LoopState.end_step

            def signalling(self, step, *a, **k):
                if step + 1 == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return end_step(self, step, *a, **k)

            sft.LoopState.end_step = signalling
        return run_stage(job, out, tokenizer=tok)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        res = run_sft(Path(sys.argv[1]), int(sys.argv[2]))
        print(json.dumps({"status": res["status"], "step": res["step"]}))
        sys.exit(exit_code(res["status"]))
""")


@pytest.mark.slow
def test_sft_sigterm_saves_current_step_and_resumes_exactly(tmp_path, capsys):
    """SFT (llmc.runtime.posttrain): a SIGTERM at step 4 saves step 4 and exits with the preempted status; the
    rerun resumes there and logs and ends as the uninterrupted reference run (the preempted run a driver
    process; the reference run and the rerun the driver's run_sft in this process, one thread)."""
    from llmc.runtime.checkpoint import save_checkpoint
    from llmc.runtime.model import build_model
    from llmc.runtime.posttrain import RESUME_FOLDER
    from llmc.runtime.synthetic import ByteTokenizer
    from llmc.spec.model import Architecture

    arch = Architecture(name="t", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64,
                        vocab_size=ByteTokenizer().vocab_size, max_seq_len=96)
    base = build_model(arch, seed=11)
    for run in ("ref", "cut"):
        save_checkpoint(tmp_path / run / "base" / "checkpoints", 0, base, None, {})
    driver = tmp_path / "driver.py"
    driver.write_text(SFT_DRIVER)

    def go(run: str, signal_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(driver), str(tmp_path / run / "sft"), str(signal_at)], env=ENV,
                              capture_output=True, text=True, timeout=300)

    driver_code: dict = {"__name__": "sft_driver"}  # the reference run: the driver's run_sft, in this process
    exec(compile(SFT_DRIVER, str(driver), "exec"), driver_code)
    assert one_thread(lambda: driver_code["run_sft"](tmp_path / "ref" / "sft", 0))["status"] == "done"
    cut = tmp_path / "cut" / "sft"
    p = go("cut", 4)  # interval checkpoints at 3 and 6: step 4 is the signal's
    assert p.returncode == EXIT_PREEMPTED, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1]) == {"status": "preempted", "step": 4}
    assert not (cut / "DONE.json").exists()
    assert [s for s, _ in list_checkpoints(cut / "checkpoints" / RESUME_FOLDER)] == [3, 4]
    assert [(r["event"], r["step"]) for r in records(cut) if r.get("event") not in (None, "start", "truncation")] \
        == [("preempted", 4)]
    capsys.readouterr()
    assert one_thread(lambda: driver_code["run_sft"](cut, 0))["status"] == "done"
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 4" in out
    ref = tmp_path / "ref" / "sft"
    ra = [{k: v for k, v in r.items() if k not in ("step_s", "elapsed_s")} for r in records(ref) if "event" not in r]  # minus wall time
    rb = [{k: v for k, v in r.items() if k not in ("step_s", "elapsed_s")} for r in records(cut) if "event" not in r]
    assert [r["step"] for r in rb] == list(range(1, 9)) and rb == ra
    wa = read_model_state(ref / "checkpoints" / "step-00000008")
    wb = read_model_state(cut / "checkpoints" / "step-00000008")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------------- the Slurm script


def _sbatch(tmp_path: Path) -> Path:
    stages = [{"name": "base", "kind": "pretrain"}, {"name": "chat", "kind": "sft", "init_from": "base"}]
    run = make_run(stages=stages)
    out = tmp_path / "b"
    write_build(out, render_artifacts(make_compiled(run, stages=[{**s, "init_from": s.get("init_from")}
                                                                 for s in stages])))
    return out / "launch" / "slurm.sbatch"


def test_sbatch_traps_the_signal_and_requeues(tmp_path):
    """The rendered script asks for the warning signal and requeueing, is valid bash, and, run against an srun
    that handles signals as Slurm's does (a SIGTERM to srun SIGKILLs its tasks: srun.c _srun_signal_mgr, "forcing
    job termination") and an scancel that signals the job steps' tasks, turns a USR1 into a SIGTERM that reaches
    the running step's task (which saves its checkpoint and exits 75), then requeues the job."""
    script = _sbatch(tmp_path)
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "trap on_usr1 USR1",
                 'scancel --signal=TERM "$SLURM_JOB_ID"', 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text
    assert "--batch" not in text.split("scancel --signal=TERM")[1].splitlines()[0]  # the steps, not the batch shell
    assert re.search(r"^PREEMPTED=(\d+)", text, re.M).group(1) == str(EXIT_PREEMPTED)
    assert "\n      srun \"${TORCHRUN[@]}\" -m llmc.runtime.entry" not in text  # every stage through run_step
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0

    fake = tmp_path / "bin"
    fake.mkdir()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    log = tmp_path / "log"
    (fake / "scontrol").write_text(f'#!/bin/bash\n[ "$1" = show ] && {{ echo node1; exit 0; }}\n'
                                   f'echo "scontrol $*" >> {log}\n')
    # srun: runs its command as the step's task; TERM/HUP/QUIT -> SIGKILL of the task, other signals forwarded
    (fake / "srun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
        "$@" &
        t=$!
        touch {tasks}/$t
        trap 'echo "srun: forcing job termination" >> {log}; kill -KILL $t' TERM HUP QUIT
        trap 'kill -USR1 $t' USR1
        while kill -0 $t 2>/dev/null; do wait $t; rc=$?; done
        rm -f {tasks}/$t
        exit $rc
        """))
    # scancel --signal=SIG JOB (no --batch / --full): the signal goes to the tasks of the job's steps only
    (fake / "scancel").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "scancel $*" >> {log}
        case " $* " in *" --batch "*|*" -b "*) exit 0 ;; esac
        sig="${{1#--signal=}}"
        for t in {tasks}/*; do [ -e "$t" ] && kill -"$sig" "${{t##*/}}"; done
        exit 0
        """))
    # the training task (torchrun and its workers): saves its checkpoint on SIGTERM (takes a while) and exits 75
    (fake / "torchrun").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        case " $* " in *" prepare "*|*llmc.runtime.evaluate*) exit 0 ;; esac
        echo "step $*" >> {log}
        trap 'sleep 0.5; echo "checkpoint saved" >> {log}; exit {EXIT_PREEMPTED}' TERM
        echo running > {tmp_path}/running
        while :; do sleep 0.05; done
        """))
    (fake / "python").write_text("#!/bin/bash\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(script.parent.parent),
               BACKEND="native")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        # the task runs and srun has recorded it as the step's task (scancel signals the recorded ones: on a loaded
        # machine a USR1 sent between the two reached no task, and the job waited for it for ever)
        while not ((tmp_path / "running").exists() and any(tasks.iterdir())) and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:  # a hang leaves no job script, fake srun or task behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, out
    lines = log.read_text().splitlines()
    assert len([ln for ln in lines if ln.startswith("step ")]) == 1  # the first stage only, then the signal
    assert "--stage base" in lines[0] and lines[1:] == ["scancel --signal=TERM 4242", "checkpoint saved",
                                                         "scontrol requeue 4242"], lines
    assert "exit 75" in out  # the requeue reports srun's own status (the task's)
