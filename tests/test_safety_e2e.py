"""Safe builds and launches, end to end through the command line.

* ``llmc build -o DIR`` writes only llmc's own files (the manifest in ``.llmc-build.json``): a foreign
  directory is refused, a rebuild keeps run/, data/, assets/ and the user's files, ``-o`` naming a file
  or the spec's own directory is refused.
* No user string reaches an emitted file unescaped: a spec file whose name holds a newline, Python and
  ``$(...)`` builds into a job module with exactly the statements of a benign build, shell scripts that
  parse (``bash -n``) and run without executing the name; builds are byte-identical from any cwd.
* Relative data paths resolve against the spec's folder wherever the build runs from.
* ``llmc launch``: one launch per build (RunLock), a hand-edited lock is refused (``--force`` overrides),
  a failed stage ends in one line naming the stage, the child's error line and the log.
* ``--set`` overrides reach the lock and errors point at them; ``llmc report`` / ``calibrate`` are wired.
* Fault injection (slow): SIGHUP / SIGKILL of ``llmc launch`` leaves no trainer behind and a relaunch
  resumes to the same losses as an uninterrupted run, each step logged once.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "examples" / "tiny_cpu.yaml").read_text()


def write_tiny(path: Path) -> Path:
    """examples/tiny_cpu.yaml written to ``path`` with its eval task files beside it (tasks/, as in examples/): a
    missing task file is an error (E009)."""
    import shutil

    path.write_text(TINY)
    shutil.copytree(ROOT / "examples" / "tasks", path.parent / "tasks", dirs_exist_ok=True)
    return path
HOSTILE = 'evil\nimport os; os.system("touch pwned_py")\n$(touch pwned_sh)`touch pwned_bt`\'";<!-- -->.yaml'
MICRO = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512, max_seq_len=64)


def cli(*args: str, cwd: Path | str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """``llmc ARGS`` run in this process as the console script runs it (``llmc.cli.main``, from ``cwd``): its exit
    status and what it printed itself (the output of a stage it starts goes to the stage's log and this process's
    stderr; the stage's processes get PYTHONPATH, one thread and LLMC_FORCE_CPU). For the tests that are not about
    llmc's own process (the signals it gets, what a shell sees of it): those run ``python -m llmc.cli``. An
    exception main() lets through (no one-line error) fails the test, as a traceback would. ``timeout``: after that
    many seconds this process gets a SIGINT (a launch passes it to its stages and stops; anywhere else it is a
    KeyboardInterrupt), so a hung stage fails the test instead of stalling the suite."""
    import contextlib
    import io
    import threading

    import pydantic.plugin._loader  # noqa: F401 -- (loaded: main() leaves this process's pydantic as it is)

    from llmc.cli import main

    out, err, rc = io.StringIO(), io.StringIO(), 0
    watchdog = threading.Timer(timeout, os.kill, (os.getpid(), signal.SIGINT))
    watchdog.daemon = True
    watchdog.start()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        mp.setattr(sys, "argv", ["llmc", *args])
        for k, v in {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLMC_FORCE_CPU": "1"}.items():
            mp.setenv(k, v)
        try:
            main()
        except SystemExit as e:
            if isinstance(e.code, str):  # (printed by the interpreter on the way out)
                print(e.code, file=sys.stderr)
            rc = 1 if isinstance(e.code, str) else e.code or 0
        finally:
            watchdog.cancel()
    return subprocess.CompletedProcess(["llmc", *args], rc, out.getvalue(), err.getvalue())


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def micro_spec(d: Path, *, steps: int = 60, interval: int = 4, name: str = "spec.yaml") -> Path:
    """A ~100k-parameter model on a local JSONL corpus, referenced by a path relative to the spec."""
    from llmc.runtime import corpus

    d.mkdir(parents=True, exist_ok=True)
    if not (d / "docs.jsonl").exists():
        corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    spec = {"name": "micro", "model": MICRO, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": interval, "keep_latest": 2}, "log_every": 1}}
    p = d / name
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


# ------------------------------------------------------------------------------ build directories


def test_build_owns_only_its_files(tmp_path):
    spec = tmp_path / "sp" / "tiny.yaml"
    spec.parent.mkdir()
    write_tiny(spec)
    b = tmp_path / "b"
    r = cli("build", str(spec), "-o", str(b))
    assert r.returncode == 0, r.stderr
    assert (b / ".llmc-build.json").exists()
    assert "/.llmc-build.journal*" in (b / ".gitignore").read_text()  # buildfs.GITIGNORE
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 0 and "llmc.runtime.entry" in r.stdout, r.stderr
    mine = {"run/pretrain/keep.txt": b"ckpt", "data/d.jsonl": b"{}\n", "assets/a.json": b"{}", "notes.md": b"mine"}
    for rel, data in mine.items():
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_bytes(data)
    (b / "README.md").write_text("edited")  # an owned artifact edited by hand: the rebuild refuses to overwrite it
    r = cli("build", str(spec), "-o", str(b), "--set", "training.optimizer.lr=0.002")
    assert r.returncode == 1 and r.stderr.startswith(f"{b / 'README.md'}: error[X010] changed since llmc wrote it")
    assert (b / "README.md").read_text() == "edited"
    (b / "README.md").unlink()  # moved away: the rebuild writes it again
    r = cli("build", str(spec), "-o", str(b), "--set", "training.optimizer.lr=0.002")
    assert r.returncode == 0, r.stderr
    for rel, data in mine.items():
        assert (b / rel).read_bytes() == data, rel
    assert (b / "README.md").read_text() != "edited"
    lock = json.loads((b / "plan.lock.json").read_text())
    assert lock["spec"]["resolved"]["training"]["optimizer"]["lr"] == 0.002  # --set reaches the lock


def test_build_refuses_foreign_dirs_and_files(tmp_path):
    spec = tmp_path / "tiny.yaml"
    write_tiny(spec)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    r = cli("build", str(spec), "-o", str(foreign))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[X010]" in lines[0] and "(" in lines[0], r.stderr
    assert lines[0].startswith(f"{foreign}: ") and "Traceback" not in r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    # -o . next to the spec: the directory holds the spec and is no llmc build
    r = cli("build", "tiny.yaml", "-o", ".", cwd=tmp_path)
    assert r.returncode == 1 and "error[X010]" in r.stderr and spec.read_text() == TINY
    # -o naming a file
    r = cli("build", str(spec), "-o", str(foreign / "thesis.tex"))
    assert r.returncode == 1 and "error[X011]" in r.stderr and (foreign / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------ escaping


def _fake_tools(d: Path) -> Path:
    """python / torchrun / deepspeed / srun / scontrol that only record they were called."""
    d.mkdir()
    for tool in ("python", "torchrun", "deepspeed", "srun", "scontrol"):
        (d / tool).write_text("#!/bin/sh\necho \"$0 $*\" >> \"$FAKE_LOG\"\n")
        (d / tool).chmod(0o755)
    return d


def test_hostile_spec_file_name_is_inert(tmp_path):
    sp = tmp_path / "sp"
    sp.mkdir()
    write_tiny(sp / HOSTILE)
    write_tiny(sp / "benign.yaml")
    b, ok = tmp_path / "b", tmp_path / "ok"
    r = cli("build", HOSTILE, "-o", str(b), cwd=sp)
    assert r.returncode == 0, r.stderr
    assert cli("build", "benign.yaml", "-o", str(ok), cwd=sp).returncode == 0
    job, ref = (b / "torchtitan/llmc_job.py").read_text(), (ok / "torchtitan/llmc_job.py").read_text()
    assert HOSTILE.splitlines()[0] in job  # the name is recorded (escaped) ...
    assert ast.dump(ast.parse(job)) == ast.dump(ast.parse(ref))  # ... as a comment: no statement differs
    lock = json.loads((b / "plan.lock.json").read_text())
    assert lock["spec"]["path"] == f"../sp/{HOSTILE}"  # relative to the build directory, exact
    readme = (b / "README.md").read_text()
    assert "$(touch" not in readme and "<!-- -->" not in readme and "\nimport os" not in readme
    fake = _fake_tools(tmp_path / "bin")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
           "MASTER_ADDR": "localhost", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_JOB_ID": "1",
           "SLURM_SUBMIT_DIR": str(b)}
    scripts = sorted(p for p in b.rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 6
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
        r = subprocess.run(["bash", str(s)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (s, r.stderr)
    assert "--lock" in (tmp_path / "calls.log").read_text()  # the scripts really ran (against the fakes)
    assert cli("launch", str(b), "--dry-run", cwd=cwd).returncode == 0
    # run by a relative path with CDPATH exported (where `cd` prints the directory it enters): each script still
    # finds its own build directory
    (tmp_path / "calls.log").unlink()
    for s in scripts:
        if s.suffix == ".sh":
            r = subprocess.run(["bash", str(s.relative_to(b))], cwd=b, env={**env, "CDPATH": f"{tmp_path / 'nowhere'}:{b}"},
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (s, r.stderr)
    locks = re.findall(r"--lock (\S*)", (tmp_path / "calls.log").read_text())
    assert locks and set(locks) == {str(b / "plan.lock.json")}, set(locks)
    assert not [p for p in tmp_path.rglob("pwned*")], "a spec file name was executed"


def test_build_is_identical_from_any_cwd(tmp_path):
    sp = tmp_path / "sp"
    sp.mkdir()
    write_tiny(sp / "tiny.yaml")
    out = tmp_path / "out"
    assert cli("build", "sp/tiny.yaml", "-o", str(out / "a"), cwd=tmp_path).returncode == 0
    assert cli("build", "tiny.yaml", "-o", str(out / "b"), cwd=sp).returncode == 0
    assert cli("build", str(sp / "tiny.yaml"), "-o", "../out/c", cwd=sp).returncode == 0
    a, b, c = tree(out / "a"), tree(out / "b"), tree(out / "c")
    assert a == b == c
    assert str(tmp_path) not in a["plan.lock.json"].decode()  # no absolute path of this machine


def test_escape_filters_cover_warnings_and_notes():
    # every user-controlled string goes through llmc.escape in the templates
    from llmc.emit.common import jinja_env

    env = jinja_env()
    evil = "x\n$(touch y)\"'`"
    sh = env.get_template("deepspeed/launch.sh.j2").render(
        header=[evil], stages=[], ds_native_stages=[{"name": evil, "kind": "sft"}], gpus_per_node=1, nnodes=1,
        rdzv_port=1, zero_stage=3, warnings=[evil], site_env=[])  # (site env values: tests/test_cluster_site.py)
    assert all(ln.startswith("#") or "touch" not in ln for ln in sh.splitlines())
    assert subprocess.run(["bash", "-n"], input=sh, text=True).returncode == 0
    y = env.get_template("serving/engine.yaml.j2").render(header=[evil], notes=[evil], items=[("k", "1")])
    assert yaml.safe_load(y) == {"k": 1}


# ------------------------------------------------------------------------------ relative data paths


def test_relative_data_paths_resolve_against_the_spec(tmp_path, monkeypatch, capsys):
    from llmc.runtime.entry import main

    micro_spec(tmp_path / "specs", steps=4)
    r = cli("build", "specs/spec.yaml", "-o", "out/b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lock = json.loads((tmp_path / "out/b/plan.lock.json").read_text())
    assert lock["spec"]["dir_from_build"] == "../../specs"
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)  # prepare (`python -m llmc.runtime.entry prepare`, here in-process) from another cwd
    assert main(["prepare", "--lock", "../out/b/plan.lock.json"]) == 0, capsys.readouterr().err
    # the trainers stream the source in place: assets.json names the spec's file, found from another cwd
    assets = json.loads((tmp_path / "out/b/assets/assets.json").read_text())
    [src] = [s for s in assets["sources"] if s["name"] == "docs"]
    assert Path(src["path"]).resolve() == (tmp_path / "specs/docs.jsonl").resolve()


def test_runtime_refuses_outputs_leaving_the_build(tmp_path):
    from llmc.runtime.entry import check_outputs
    from llmc.runtime.job import TrainJob

    micro_spec(tmp_path / "s", steps=4)
    assert cli("build", str(tmp_path / "s/spec.yaml"), "-o", str(tmp_path / "b")).returncode == 0
    lock = json.loads((tmp_path / "b/plan.lock.json").read_text())
    job = TrainJob.from_lock(lock, None, build_dir=tmp_path / "b")
    check_outputs(job, tmp_path / "b", None)  # the spec's own paths are fine
    for bad in ("../../escape", "/abs/ckpt"):
        with pytest.raises(ValueError, match="unsafe output path"):
            check_outputs(dataclasses.replace(job, checkpoint_folder=bad), tmp_path / "b", None)
    (tmp_path / "b/run").mkdir()
    os.symlink(tmp_path, tmp_path / "b/run/link")
    with pytest.raises(ValueError, match="outside"):
        check_outputs(dataclasses.replace(job, stage="link"), tmp_path / "b", None)


# ------------------------------------------------------------------------------ launch


def _tiny_build(tmp_path: Path) -> Path:
    spec = tmp_path / "tiny.yaml"
    write_tiny(spec)
    b = tmp_path / "b"
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    return b


def test_hand_edited_lock_is_refused(tmp_path):
    b = _tiny_build(tmp_path)
    lock = json.loads((b / "plan.lock.json").read_text())
    lock["plan"]["micro_batch"] += 1
    (b / "plan.lock.json").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    r = cli("launch", str(b), "--dry-run")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "error[L001]" in r.stderr and "changed after" in r.stderr and "--force" in r.stderr
    assert "a plan or number was edited" in r.stderr
    r = cli("launch", str(b), "--dry-run", "--force")
    assert r.returncode == 0 and "warning[L004]" in r.stderr


def test_second_launch_names_the_holder(tmp_path):
    from llmc.runtime.runlock import RunLock

    b = _tiny_build(tmp_path)
    with RunLock(b / "run"):
        r = cli("launch", str(b))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[L003]" in lines[0], r.stderr
    assert f"pid {os.getpid()}" in lines[0]


def test_failed_stage_is_one_line_with_cause_and_log(tmp_path):
    spec = micro_spec(tmp_path / "s", steps=4)
    b = tmp_path / "b"
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    (tmp_path / "s/docs.jsonl").unlink()  # the data went away after the build
    r = cli("launch", str(b))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "error[L002]" in last and "'prepare'" in last, r.stderr
    assert "docs.jsonl" in last  # the child's own error line, not a traceback frame
    assert "rerun `llmc launch" in last and "stderr.log" in last
    assert "docs.jsonl" in (b / "run/.prepare/stderr.log").read_text()


def test_last_error_line_prefers_the_workers_error():
    from llmc.cli import last_error_line

    torchrun = "\n".join([
        "/x/b/plan.lock.json: error[R002] pretrain: no JSONL data at /x/b/data/docs.jsonl",
        "E0101 elastic ... failed (exitcode: 1) local_rank: 0 (pid: 12) of binary: python",
        "Traceback (most recent call last):",
        '  File "/venv/bin/torchrun", line 8, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "============================================================",
        "  time      : 2026-01-01_00:00:00",
    ])
    assert last_error_line(torchrun).startswith("/x/b/plan.lock.json: error[R002]")
    assert last_error_line("Traceback:\n  File x\nValueError: bad value\n") == "ValueError: bad value"
    assert last_error_line("") == "no error output (see the log)"
    # a worker's exception, then torchrun's wrapper of it: the worker's is the cause
    worker = ("ValueError: Size mismatch between saved torch.Size([2048, 128]) and current: torch.Size([2048, 192])\n"
              "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert last_error_line(worker).startswith("ValueError: Size mismatch")


def test_a_torchrun_stopped_while_its_workers_start_is_named_by_its_signal():
    """A stop passed on while torchrun's workers were still starting: torchrun ends with its own SignalException
    traceback and no worker said anything. The cause is that signal, not the traceback's last quoted source line
    (`raise SignalException(f"Process {os.getpid()} got signal: {sigval}", ...)`, what the launch's L002 line
    showed); an exception line whose frame has no source (code run with -c) still ends the traceback."""
    from llmc.cli import last_error_line

    stopped = "\n".join([  # torch 2.11's torchrun, SIGTERM during the workers' start
        "W1206 14:22:44.590000 1649 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, "
        "shutting down workers",
        "Traceback (most recent call last):",
        '  File "/venv/bin/torchrun", line 6, in <module>',
        "    sys.exit(main())",
        "             ^^^^^^",
        '  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py", line 923, in '
        "_invoke_run",
        "    time.sleep(monitor_interval)",
        '  File "/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in '
        "_terminate_process_handler",
        '    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)',
        "torch.distributed.elastic.multiprocessing.api.SignalException: Process 1649 got signal: 15",
    ])
    assert last_error_line(stopped) == ("torchrun got signal 15 (SIGTERM) and stopped its workers before any "
                                        "reported an error")
    sourceless = 'Traceback (most recent call last):\n  File "<string>", line 7, in find_spec\nImportError\n'
    assert last_error_line(sourceless) == "ImportError"


def test_plan_diff_against_malformed_lock(tmp_path):
    bad = tmp_path / "plan.lock.json"
    bad.write_text('{"llmc_version": "0", "spec": {"sha256": "x"}, "plan": "oops", "schema_version": 2}')
    r = cli("plan", "examples/tiny_cpu.yaml", "--diff", str(bad))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "error[X001]" in r.stderr, r.stderr
    (tmp_path / "x.json").write_text("[")
    r = cli("plan", "examples/tiny_cpu.yaml", "--diff", str(tmp_path / "x.json"))
    assert r.returncode == 1 and "error[X001]" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------ --set, report, calibrate


def test_set_overrides(tmp_path):
    r = cli("plan", "examples/tiny_cpu.yaml", "--set", "training.optimizer.lr=0.001", "--set",
            "data.seq_len=64", "-f", "json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["spec"]["resolved"]["training"]["optimizer"]["lr"] == 0.001
    assert d["spec"]["resolved"]["data"]["seq_len"] == 64 and d["hyper"]["seq_len"] == 64
    plain = json.loads(cli("plan", "examples/tiny_cpu.yaml", "-f", "json").stdout)
    assert plain["spec"]["sha256"] != d["spec"]["sha256"]  # the lock identifies the effective input
    r = cli("plan", "examples/tiny_cpu.yaml", "--set", "training.optimizer.lr=-1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines and all(ln.startswith("--set training.optimizer.lr: error[") for ln in lines)
    r = cli("plan", "examples/tiny_cpu.yaml", "--set", "no-equals-sign")
    assert r.returncode == 1 and "error[S001]" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_overrides_unit():
    from llmc.overrides import apply_overrides, parse_override

    o = [parse_override("a.b=3e-4"), parse_override("l.1=x"), parse_override("n.m=[1, 2]")]
    assert apply_overrides({"a": {"b": 1}, "l": [0, 1]}, o) == {"a": {"b": 3e-4}, "l": [0, "x"], "n": {"m": [1, 2]}}
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides({"l": [0]}, [parse_override("l.3=1")])
    with pytest.raises(ValueError, match="not a mapping"):
        apply_overrides({"a": 1}, [parse_override("a.b=1")])


def test_report_and_calibrate_commands(tmp_path):
    b = _tiny_build(tmp_path)
    m = b / "run" / "pretrain"
    m.mkdir(parents=True)
    recs = [{"step": s, "loss": 5.0 - 0.1 * s, "tokens_per_s": 1000.0, "step_s": 4.0, "peak_mem_bytes": 2**20,
             "mfu": 0.01} for s in range(1, 6)]
    (m / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for target in (b, b / "run"):
        r = cli("report", str(target), "-o", str(tmp_path / "rep"))
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "pretrain-loss.png").exists()
    r = cli("report", str(tmp_path))
    assert r.returncode == 1 and "error[L010]" in r.stderr
    r = cli("calibrate", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "cal.json"))
    assert r.returncode == 1 and "error[" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cal.json").exists()
    r = cli("plan", "examples/tiny_cpu.yaml", "--calibration", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "error[K007]" in r.stderr
    assert cli("plan", "examples/tiny_cpu.yaml", "--no-fit-check").returncode == 0


# ------------------------------------------------------------------------------ emitters


def test_planned_backend_is_the_launcher_default(tmp_path):
    from test_build_fakes import make_compiled

    from llmc.buildfs import write_build
    from llmc.compiler.result import BackendChoice
    from llmc.emit import render_artifacts
    from llmc.launch import launch_commands

    c = dataclasses.replace(make_compiled(), backend=BackendChoice("deepspeed", "pinned", False))
    files = render_artifacts(c)
    write_build(tmp_path / "b", files)
    text = files["launch/torchrun_single_node.sh"]
    assert 'BACKEND="${BACKEND:-deepspeed}"' in text and "deepspeed/launch.sh" in text
    cmds = launch_commands(tmp_path / "b", gpu=False)
    assert "llmc.runtime.ds_train" in cmds[1].argv
    c = dataclasses.replace(make_compiled(), backend=BackendChoice("native", "pinned", False))
    assert 'BACKEND="${BACKEND:-native}"' in render_artifacts(c)["launch/torchrun_single_node.sh"]


def test_cluster_manifests_are_emitted_for_multi_node_gpu_builds():
    from test_build_fakes import compile_example

    from llmc.emit import render_artifacts
    from llmc.emit.skypilot import cluster_shape

    files = render_artifacts(compile_example(ROOT / "examples/llama3_70b_h100x64.yaml"))
    assert "skypilot/task.yaml" in files and "kubeflow/trainjob.yaml" in files
    lock = json.loads(files["plan.lock.json"])
    shape = cluster_shape(lock)
    assert (shape.num_nodes, shape.gpus_per_node, shape.world) == (8, 8, 64)  # 64 H100 = 8 nodes x 8
    task = yaml.safe_load(files["skypilot/task.yaml"])
    assert task["num_nodes"] == 8 and "BACKEND" not in task["envs"]  # the launcher's own default applies
    tiny = render_artifacts(compile_example(ROOT / "examples/tiny_cpu.yaml"))
    assert not any(k.startswith(("skypilot/", "kubeflow/")) for k in tiny)


# ------------------------------------------------------------------------------ fault injection


def _pids_with(marker: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(p.name))
    return out


def _losses(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r and "event" not in r]


@pytest.fixture(scope="module")
def killed_launch_ref(tmp_path_factory) -> tuple[Path, Path]:
    """The spec of the killed-launch tests and its uninterrupted run (built and trained once for the module: every
    case compares its resumed run with the same reference). The reference is only numbers to compare with: its
    prepare and stage run in this process, as `llmc launch` runs them (``python -m llmc.runtime.entry``; one
    process, one thread: a one-rank torchrun job computes the same losses)."""
    import torch

    from llmc.runtime.entry import main

    d = tmp_path_factory.mktemp("killed-launch")
    spec = micro_spec(d / "s", steps=24, interval=4)
    ref = d / "ref"
    assert cli("build", str(spec), "-o", str(ref)).returncode == 0
    lock, threads = str(ref / "plan.lock.json"), torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMC_FORCE_CPU", "1")
        torch.set_num_threads(1)  # (as OMP_NUM_THREADS=1 gives the launched trainers)
        try:
            assert main(["prepare", "--lock", lock]) == 0
            assert main(["--lock", lock, "--stage", "pretrain", "--out", str(ref / "run/pretrain")]) == 0
        finally:
            torch.set_num_threads(threads)
    return spec, ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL], ids=["SIGHUP", "SIGKILL"])
def test_killed_launch_leaves_nothing_and_resumes_exactly(tmp_path, sig, killed_launch_ref):
    spec, ref = killed_launch_ref
    cut = tmp_path / "cut"
    assert cli("build", str(spec), "-o", str(cut)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLMC_FORCE_CPU": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli", "launch", str(cut)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stage = cut / "run" / "pretrain"

    def ahead() -> int:
        """How many steps the metrics are past the newest complete checkpoint (-1: none yet)."""
        ck = [int(m.parent.name[5:]) for m in (stage / "checkpoints").glob("step-*/manifest.json")
              if m.parent.name[5:].isdigit()]
        logged = [s for s, _ in _losses(stage)] if (stage / "metrics.jsonl").exists() else []
        return max(logged) - max(ck) if ck and logged else -1

    deadline = time.time() + 120
    while time.time() < deadline and ahead() < 2:  # kill with records logged after the checkpoint
        time.sleep(0.02)
    assert _pids_with(str(cut / "plan.lock.json")), "no trainer was running"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline and _pids_with(str(cut / "plan.lock.json")):
        time.sleep(0.1)
    assert not _pids_with(str(cut / "plan.lock.json")), "a trainer outlived llmc launch"
    assert not (cut / "run/pretrain/DONE.json").exists(), "finished before the kill; test is not testing"
    events = [json.loads(x).get("event") for x in (stage / "metrics.jsonl").read_text().splitlines()]
    if sig == signal.SIGKILL:
        # llmc dies at once; its trainer gets SIGTERM (PR_SET_PDEATHSIG and the guard process) and, as on any
        # SIGTERM, saves the step it is at before it leaves (llmc.runtime.preempt)
        assert "preempted" in events and ahead() == 0, events
    else:  # SIGHUP is passed on as it is: the trainer dies where it stands, past its last checkpoint
        assert "preempted" not in events
        assert ahead() > 0, "no step was logged after the last checkpoint; test is not testing the truncation"
    r = cli("launch", str(cut))
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = _losses(cut / "run/pretrain"), _losses(ref / "run/pretrain")
    assert [s for s, _ in got] == list(range(1, 25))  # every step once: the records after the checkpoint went
    assert got == want
    assert cli("report", str(cut)).returncode == 0


def test_one_trainer_per_stage_folder(tmp_path, capsys):
    # the runtime holds the stage folder whichever launcher started it (emitted scripts included); the runtime's
    # main (`python -m llmc.runtime.entry`) in this process opens the lock file anew, so the held flock refuses it
    # as it refuses another process
    from llmc.runtime.entry import main
    from llmc.runtime.runlock import RunLock

    micro_spec(tmp_path / "s", steps=4)
    assert cli("build", str(tmp_path / "s/spec.yaml"), "-o", str(tmp_path / "b")).returncode == 0
    capsys.readouterr()
    with RunLock(tmp_path / "b/run/pretrain"):
        rc = main(["--lock", str(tmp_path / "b/plan.lock.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "error[R002]" in err and f"pid {os.getpid()}" in err, err
    assert main(["--lock", str(tmp_path / "b/plan.lock.json"), "--steps", "2"]) == 0  # free again: it runs
    assert (tmp_path / "b/run/pretrain/DONE.json").exists()


def test_multi_node_deepspeed_runs_under_every_nodes_torchrun(tmp_path):
    """The multi-node launcher and the Slurm script run on every node: BACKEND=deepspeed starts llmc's DeepSpeed
    trainer under that torchrun rendezvous (all nodes one world), not the single-node deepspeed launcher per node."""
    b = tmp_path / "b"
    assert cli("build", str(ROOT / "examples/tiny_cpu.yaml"), "-o", str(b)).returncode == 0
    fake = _fake_tools(tmp_path / "bin")
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_LOG": str(log), "BACKEND": "deepspeed",
           "NNODES": "2", "NPROC": "4", "MASTER_ADDR": "head", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(b)}
    for script in ("launch/torchrun_multi_node.sh", "launch/slurm.sbatch"):
        log.unlink(missing_ok=True)
        r = subprocess.run(["bash", str(b / script)], cwd=b, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (script, r.stderr)
        calls = log.read_text()
        assert re.search(r"torchrun --nnodes \S+ --nproc_per_node \S+ .*-m llmc\.runtime\.ds_train --lock", calls), calls
        assert "deepspeed --num_gpus" not in calls, calls


def test_a_changed_lr_is_not_resumed_silently_and_no_resume_sets_the_run_aside(tmp_path, monkeypatch, capsys):
    """An interrupted stage rebuilt with another learning rate: resuming would keep the checkpoint's schedule (the
    scheduler's and optimizer's saved state win), so the launch refuses in one line and names --no-resume, which
    sets the earlier run aside (renamed, every file kept) and starts the stage over."""
    spec = micro_spec(tmp_path / "s", steps=8, interval=4)
    b = tmp_path / "b"
    assert cli("build", str(spec), "-o", str(b)).returncode == 0
    from llmc.runtime.entry import main

    # the interrupted run: prepare and a stage stopped after 4 steps (`python -m llmc.runtime.entry`, in-process)
    monkeypatch.chdir(b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv in (["prepare", "--lock", str(b / "plan.lock.json")],
                 ["--lock", str(b / "plan.lock.json"), "--stage", "pretrain", "--out", str(b / "run/pretrain"),
                  "--stop-after", "4"]):
        assert main(argv) == 0, capsys.readouterr().err[-2000:]
    ckpts = sorted(p.name for p in (b / "run/pretrain/checkpoints").iterdir())
    assert ckpts and not (b / "run/pretrain/DONE.json").exists()
    assert cli("build", str(spec), "-o", str(b), "--set", "training.optimizer.lr=0.0001").returncode == 0
    r = cli("launch", str(b))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "trained with lr 0.003" in last and "--no-resume" in last, r.stderr[-2000:]
    r = cli("launch", str(b), "--no-resume")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = b / "run/pretrain.set-aside-1"
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ckpts  # kept, not pruned or deleted
    assert json.loads((b / "run/pretrain/DONE.json").read_text())["step"] == 8


def test_export_never_overwrites_files_it_did_not_write(tmp_path):
    torch = pytest.importorskip("torch")
    from llmc.runtime.hf_io import EXPORT_MARKER, export_hf
    from llmc.runtime.model import build_model
    from llmc.spec.model import Architecture

    arch = Architecture(**MICRO)
    model = build_model(arch)
    out = tmp_path / "exp"
    out.mkdir()
    (out / "model_finetuned_v2.safetensors").write_text("mine")
    with pytest.raises(ValueError, match="is not an earlier llmc export"):
        export_hf(model.state_dict(), arch, out, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["model_finetuned_v2.safetensors"]
    # a model folder a user saved with transformers' save_pretrained holds the names an export writes: it is theirs
    saved = tmp_path / "mybase"
    saved.mkdir()
    mine = {"config.json": '{"model_type": "llama"}', "model.safetensors": "weights", "tokenizer.json": "{}",
            "generation_config.json": "{}"}
    for name, text in mine.items():
        (saved / name).write_text(text)
    with pytest.raises(ValueError, match="is not an earlier llmc export"):
        export_hf(model.state_dict(), arch, saved, dtype=torch.float32)
    assert {p.name: p.read_text() for p in saved.iterdir()} == mine
    fresh = tmp_path / "fresh"
    export_hf(model.state_dict(), arch, fresh, dtype=torch.float32)
    export_hf(model.state_dict(), arch, fresh, dtype=torch.float32)  # its own earlier export: replaced whole
    assert (fresh / EXPORT_MARKER).is_file() and (fresh / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    (fresh / "NOTES.md").write_text("my notes")  # added to an llmc export: the export is not replaced over it
    with pytest.raises(ValueError, match="files an llmc export did not write"):
        export_hf(model.state_dict(), arch, fresh, dtype=torch.float32)
    assert (fresh / "NOTES.md").read_text() == "my notes"
