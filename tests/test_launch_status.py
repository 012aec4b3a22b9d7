"""What a launch says about a stage that did not finish: a DeepSpeed stage stopped by a SIGTERM whose ranks saved
their step is preempted (exit 75, resumable), on `llmc launch` and on deepspeed/launch.sh; the one cause line of a
failed stage is the signal torchrun reports, not its report's banner; `llmc calibrate` takes a build directory and
says when its fit is no better than no calibration; a missing text field reads as one plain located line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmc.runtime.runlock import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
VENV_BIN = Path(sys.executable).parent

# A 140k-parameter model, 300 steps of 512 tokens (a few seconds on one CPU process): the SIGTERM lands after step 3,
# long before the end; no interval checkpoint, so the only saved step is the one the signal asked for.
STEPS = 300
SPEC = textwrap.dedent(f"""\
    name: dsterm
    model: {{name: tiny, n_layers: 2, d_model: 64, n_heads: 4, n_kv_heads: 2, d_ff: 128, vocab_size: 512,
             max_seq_len: 64}}
    hardware: {{gpu: cpu, count: 1}}
    data:
      sources: [{{name: python-docs, format: builtin}}]
      tokenizer: {{train: true, vocab_size: 512}}
      seq_len: 64
      tokens: {STEPS * 512}
    training:
      precision: fp32
      global_batch_tokens: 512
      optimizer: {{lr: 3.0e-3}}
      checkpoint: {{interval_steps: 1000}}
      log_every: 1
    """)


def _llmc(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmc.cli", *args]


@pytest.fixture(scope="module")
def ds_build(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dsterm")
    (d / "spec.yaml").write_text(SPEC)
    r = subprocess.run(_llmc("build", str(d / "spec.yaml"), "-o", str(d / "b")), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return d / "b"


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")] if path.exists() else []


# ----------------------------------------------------------------------------- 1. DeepSpeed preemption


@pytest.mark.skipif(not (VENV_BIN / "deepspeed").exists(), reason="no deepspeed launcher next to the interpreter")
def test_llmc_launch_of_a_deepspeed_stage_stopped_by_sigterm_is_preempted_and_resumes(ds_build):
    """SIGTERM to `llmc launch --backend deepspeed` mid-run: the trainer saves the step it is at; the DeepSpeed
    launcher then exits 143 (its runner has no SIGTERM handler) whatever its rank returned. llmc must report the
    stage preempted and exit 75, as for the other backends, and the same command resumes from the saved step."""
    env = dict(ENV)
    metrics = ds_build / "run" / "pretrain" / "metrics.jsonl"
    proc = subprocess.Popen(_llmc("launch", str(ds_build), "--backend", "deepspeed"), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(r.get("step", 0) >= 3 and "event" not in r for r in _records(metrics)):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    end = [r for r in _records(metrics) if r.get("event") == "end"]
    assert end and end[-1]["status"] == "preempted", err[-3000:]  # else the stage finished: nothing tested
    saved = end[-1]["step"]
    assert 3 <= saved < STEPS
    # what the trainer saved: DeepSpeed's resumable checkpoint of that step
    assert (ds_build / "run" / "pretrain" / "checkpoints" / "deepspeed" / "latest").read_text().strip() == f"step-{saved:08d}"
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stage 'pretrain' preempted" in err and "error[L002]" not in err, err[-3000:]
    assert not (ds_build / "run" / "pretrain" / "DONE.json").exists()

    n_before = len(_records(metrics))
    r = subprocess.run(_llmc("launch", str(ds_build), "--backend", "deepspeed"), env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _records(metrics)[n_before:]
    assert [x["step"] for x in after if x.get("event") == "resume"] == [saved]
    steps = [x["step"] for x in after if "event" not in x and "loss" in x]
    assert steps == list(range(saved + 1, STEPS + 1))  # continues from the saved step, each step once
    done = json.loads((ds_build / "run" / "pretrain" / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == STEPS


FAKE_RANK = textwrap.dedent("""\
    # a DeepSpeed rank as llmc's trainer behaves on SIGTERM: finish, save (a second), report, exit PREEMPTED
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda *a: got.append(1))
    open(os.environ["FAKE_READY"], "w").write(str(os.getpid()))
    while not got:
        time.sleep(0.05)
    time.sleep(1.0)
    from llmc.runtime.preempt import EXIT_PREEMPTED
    try:
        from llmc.runtime.runlock import report_exit
    except ImportError:  # an llmc whose trainers report nothing: the rank still saves and exits PREEMPTED
        def report_exit(code):
            pass
    print("saved the current step", file=sys.stderr, flush=True)
    report_exit(EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)
    """)


@pytest.mark.skipif(not (VENV_BIN / "torchrun").exists(), reason="no torchrun next to the interpreter")
def test_deepspeed_launch_sh_stopped_by_sigterm_ends_preempted(ds_build, tmp_path):
    """deepspeed/launch.sh under a SIGTERM to its process group (a preemption, `timeout`, a service stop), through
    the real torchrun that starts the DeepSpeed runner's ranks on one node, with a rank that saves and exits 75: the
    script must outlive the signal, wait for the rank and end with the preempted status and its resume line (it died
    of the SIGTERM, 143, with the rank still saving)."""
    d = tmp_path / "bin"
    d.mkdir()
    (tmp_path / "llmc_fake_rank.py").write_text(FAKE_RANK)
    tr_real = VENV_BIN / "torchrun"
    # the stage's own command, with llmc's DeepSpeed runner swapped for the fake rank
    (d / "torchrun").write_text(f'#!/bin/bash\ncase " $* " in *" -m llmc.runtime.ds_train "*) ;; '
                                f'*) echo "unexpected: $*" >&2; exit 9 ;; esac\n'
                                f'exec {tr_real} --standalone --nproc_per_node 1 -m llmc_fake_rank\n')
    (d / "python").write_text(f'#!/bin/bash\nif [ "$2" = llmc.runtime.entry ]; then exit 0; fi\n'
                              f'exec {sys.executable} "$@"\n')  # prepare: nothing to do here
    for f in d.iterdir():
        f.chmod(0o755)
    ready = tmp_path / "ready"
    env = {**ENV, "PATH": f"{d}:{VENV_BIN}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run"),
           "FAKE_READY": str(ready), "MASTER_PORT": str(29500 + os.getpid() % 190),
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}", "STAGE": "pretrain"}
    proc = subprocess.Popen(["bash", str(ds_build / "deepspeed" / "launch.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not (ready.exists() and ready.read_text()):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "saved the current step" in err, err[-3000:]
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stage pretrain: stopped by a signal after saving its current step (exit 75)"), last


def _ranks_preempted(script: Path, folder: Path) -> bool:
    """deepspeed/launch.sh's own reader of the ranks' reports, run on ``folder``."""
    code = (f'PREEMPTED={EXIT_PREEMPTED}\nsource <(sed -n "/^ranks_preempted() {{/,/^}}/p" {script})\n'
            f'ranks_preempted {folder}')
    return subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30).returncode == 0


@pytest.mark.parametrize("reports,preempted", [
    ({0: 75, 1: 75}, True),
    ({0: 75}, False),  # rank 1 died before it could report (SIGKILL)
    ({0: 75, 1: 1}, False),  # rank 1 failed
    ({}, False),
])
def test_a_stage_is_preempted_only_when_every_rank_reported_it(ds_build, tmp_path, monkeypatch, reports, preempted):
    """The ranks' reports, written by the trainers' own call (report_exit), read by `llmc launch` (supervise) and by
    deepspeed/launch.sh: preempted only with a PREEMPTED report from each of ranks 0..world-1; else the launcher's
    status stands (here 143, the DeepSpeed runner killed by the SIGTERM)."""
    from llmc.runtime import runlock

    monkeypatch.setenv(runlock.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, code in reports.items():
        monkeypatch.setenv("RANK", str(rank))
        runlock.report_exit(code)
    assert runlock._stage_status(143, [signal.SIGTERM], str(tmp_path)) == (EXIT_PREEMPTED if preempted else 143)
    assert _ranks_preempted(ds_build / "deepspeed" / "launch.sh", tmp_path) == preempted


# ----------------------------------------------------------------------------- 2. the cause of a failed stage

KILLED_PY = ("import os, signal, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n")


@pytest.fixture(scope="module")
def torchrun_sigkill(tmp_path_factory) -> tuple[str, int]:
    """What the installed torchrun prints when its worker is killed by SIGKILL (the OOM killer, a user): the agent's
    ChildFailedError traceback and its failure report, banners included; and the worker's pid."""
    d = tmp_path_factory.mktemp("k9")
    (d / "killed.py").write_text(KILLED_PY)
    torchrun = VENV_BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun next to the interpreter")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "1", str(d / "killed.py"), str(d / "pid")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ChildFailedError" in r.stderr, r.stderr
    return r.stderr, int((d / "pid").read_text())


def test_the_cause_of_a_killed_worker_is_the_signal_not_the_report_banner(torchrun_sigkill):
    from llmc.cli import last_error_line

    text, pid = torchrun_sigkill
    assert text.rstrip().splitlines()[-1].strip().strip("=") == ""  # the report ends with its banner
    assert last_error_line(text) == f"Signal 9 (SIGKILL) received by PID {pid} (rank 0)"


# ----------------------------------------------------------------------------- 3. llmc calibrate

def _run_with(build: Path, tokens_per_s: float, steps: int = 30) -> Path:
    run = build / "run" / "pretrain"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0, "tokens_per_s": tokens_per_s})
                                               + "\n" for s in range(1, steps + 1)))
    return run / "metrics.jsonl"


def test_calibrate_takes_a_build_directory(ds_build, tmp_path, capsys):
    """`llmc report BUILD` works; `llmc calibrate BUILD` failed with 'BUILD/metrics.jsonl: cannot read'. A build
    directory (or its run/) stands for the run of the stage its plan describes, run/pretrain here."""
    import hashlib
    import shutil

    from llmc import measurements as ms

    b = tmp_path / "b"
    shutil.copytree(ds_build, b, ignore=shutil.ignore_patterns("run"))
    f = _run_with(b, 20000.0)
    for given in (b, b / "run"):
        out = tmp_path / f"cal-{given.name}.json"
        assert ms.calibrate_main([str(given)], str(out)) == 0, capsys.readouterr().err
        cal = json.loads(out.read_text())
        assert cal["provenance"]["inputs"] == [{"path": str(given),
                                                "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}]
        assert cal["residuals"][0]["label"] == "pretrain"
    # a folder that is neither a run nor a build: one line that says what to pass
    (tmp_path / "empty").mkdir()
    assert ms.calibrate_main([str(tmp_path / "empty")], str(tmp_path / "c.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error[K001]" in err[0] and "build directory" in err[0], err


def test_a_fit_no_better_than_no_calibration_is_said(tmp_path):
    """One factor, two runs of one model (compute only: no communication, no optimizer time). Run 1 is measured as
    llmc predicts, run 2 twice as slow: uncalibrated errors 0 % and +100 % (the tokens/s error, predicted / measured
    tokens/s - 1 = measured step / predicted step - 1), mean 50 %. Leave-one-out, each run is predicted by the
    factor fitted exactly on the other: run 1 with run 2's (step x 2): -50 %; run 2 with run 1's (x 1): +100 %;
    mean |error| 75 %, worse than none: warned."""
    from llmc.compiler.calibration import TimePoint, calibrate
    from llmc.measurements import no_better_warning

    worse = calibrate("native", "cpu", [TimePoint("a", 1.0, 0.0, 0.0, 1.0, 64.0),
                                        TimePoint("b", 1.0, 0.0, 0.0, 2.0, 64.0)], [])
    line = no_better_warning(worse)
    assert line is not None and line.startswith("warning: ")
    assert "tokens/s mean error 75.0% calibrated (leave-one-out, 2 run(s)) vs 50.0% uncalibrated" in line, line
    assert "more runs" in line and "hardware" in line
    # two runs both 2x slower than predicted: the factor fitted on either predicts the other exactly (0 % vs 100 %)
    better = calibrate("native", "cpu", [TimePoint("a", 1.0, 0.0, 0.0, 2.0, 64.0),
                                         TimePoint("b", 1.1, 0.0, 0.0, 2.2, 64.0)], [])
    assert no_better_warning(better) is None


def test_calibrate_cli_warns_when_the_fit_is_no_better(ds_build, tmp_path):
    """Two builds of one spec, one run measured at llmc's own prediction and one at half its tokens/s: uncalibrated
    mean |error| (0 % + 100 %) / 2 = 50 %; the leave-one-out fit is worse (each run predicted from the other's
    factor), and `llmc calibrate` says so in one line, still writing the file."""
    import shutil

    from llmc import measurements as ms

    builds = []
    for name in ("one", "two"):
        b = tmp_path / name
        shutil.copytree(ds_build, b, ignore=shutil.ignore_patterns("run"))
        builds.append(b)
    _run_with(builds[0], 1.0)
    m = ms.read_llmc_run(builds[0] / "run" / "pretrain")
    t, _ = ms.predicted(m)
    predicted = t.tokens_per_second  # the whole job's tokens/s (one process), as metrics.jsonl logs it
    _run_with(builds[0], predicted)
    _run_with(builds[1], predicted / 2)
    out = tmp_path / "cal.json"
    r = subprocess.run(_llmc("calibrate", str(builds[0]), str(builds[1]), "-o", str(out)), env=ENV, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.exists(), r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: the calibration predicts")]
    assert len(warn) == 1, r.stderr
    assert "vs 50.0% uncalibrated" in warn[0], warn


# ----------------------------------------------------------------------------- 4. data


def test_a_missing_text_field_is_one_plain_located_line(tmp_path):
    """KeyError's str() is the repr of its message: the R002 line the trainers print read "...: \\"f.jsonl:2: no
    field 'body' ...\\"". The stream's error still is a KeyError, printed as written."""
    from llmc.runtime.stream import SourceRef, documents

    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "first"}\n{"text": "no body here"}\n')
    with pytest.raises(KeyError) as e:
        list(documents(SourceRef("d", str(f), "jsonl", "body")))
    assert f"{e.value}" == f"{f}:2: no field 'body' (set text_field on the source)"
