"""The emitted launch scripts, run against stand-ins of srun / scancel / scontrol / torchrun / deepspeed / python:
what a Slurm cancel does (scancel(1): job state CANCELLED, never requeued), the one line a failed stage ends with,
the torchtitan scripts' prepare step, and where a DeepSpeed hostfile run's other stages run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_build_fakes import ROOT, compile_example, make_compiled, make_run
from test_launch_status import torchrun_sigkill  # noqa: F401, F811  (a fixture: a SIGKILLed worker's report)

from llmc.buildfs import write_build
from llmc.compiler.plan import ParallelPlan
from llmc.emit import render_artifacts
from llmc.runtime.runlock import EXIT_PREEMPTED

STAGES = [{"name": "base", "kind": "pretrain", "init_from": None},
          {"name": "chat", "kind": "sft", "init_from": "base"},
          {"name": "align", "kind": "dpo", "init_from": "chat"}]


def _fake_build(tmp_path: Path, count: int = 8) -> Path:
    run = make_run(stages=[{k: v for k, v in s.items() if v is not None} for s in STAGES],
                   hardware={"gpu": "h100-sxm", "count": count})
    c = make_compiled(run, ParallelPlan(dp_shard=count, micro_batch=32 // count, grad_accum=1), global_batch_seqs=32,
                      stages=STAGES)
    out = tmp_path / "b"
    write_build(out, render_artifacts(c))
    return out


def _exe(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o755)


# ----------------------------------------------------------------------------- 1. a Slurm cancel is not a preemption

def _slurm_fakes(tmp_path: Path) -> tuple[dict, Path]:
    """srun / scancel / scontrol as in test_preemption (srun turns a SIGTERM into a SIGKILL of its task, scancel
    --signal signals the steps' tasks only), and a training task that saves a checkpoint on SIGTERM and exits 75."""
    fake, tasks, log = tmp_path / "bin", tmp_path / "tasks", tmp_path / "log"
    fake.mkdir()
    tasks.mkdir()
    _exe(fake / "scontrol", f'#!/bin/bash\n[ "$1" = show ] && {{ echo node1; exit 0; }}\necho "scontrol $*" >> {log}\n')
    _exe(fake / "srun", f"""\
        #!/bin/bash
        while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
        echo $$ > {tmp_path}/srun.pid
        "$@" &
        t=$!
        touch {tasks}/$t
        trap 'echo "srun: forcing job termination" >> {log}; kill -KILL $t' TERM HUP QUIT
        trap 'kill -USR1 $t' USR1
        while kill -0 $t 2>/dev/null; do wait $t; rc=$?; done
        rm -f {tasks}/$t
        exit $rc
        """)
    _exe(fake / "scancel", f"""\
        #!/bin/bash
        echo "scancel $*" >> {log}
        case " $* " in *" --batch "*|*" -b "*) exit 0 ;; esac
        sig="${{1#--signal=}}"
        for t in {tasks}/*; do [ -e "$t" ] && kill -"$sig" "${{t##*/}}"; done
        exit 0
        """)
    _exe(fake / "torchrun", f"""\
        #!/bin/bash
        case " $* " in *" prepare "*|*llmc.runtime.evaluate*) exit 0 ;; esac
        echo "step $*" >> {log}
        echo $$ > {tmp_path}/task.pid
        trap 'sleep 0.5; echo "checkpoint saved" >> {log}; exit {EXIT_PREEMPTED}' TERM
        echo running > {tmp_path}/running
        while :; do sleep 0.05; done
        """)
    _exe(fake / "python", "#!/bin/bash\nexit 0\n")
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", BACKEND="native", RUN_DIR=str(tmp_path / "run"))
    return env, log


@pytest.mark.parametrize("first_usr1", [False, True])
def test_sbatch_cancel_saves_but_never_requeues(tmp_path, first_usr1):
    """`scancel <job>` ends a job for good (state CANCELLED; https://slurm.schedmd.com/scancel.html): Slurm sends
    SIGTERM to every process of the job, the batch shell and srun included, then SIGKILL after KillWait. The
    script must neither requeue it (a requeued cancel would run again) nor start the next stage; a preemption
    that is to requeue is Slurm's to requeue (slurm.conf PreemptMode=REQUEUE). A cancel that arrives while the
    time-limit save (USR1) is under way still wins."""
    b = _fake_build(tmp_path)
    env, log = _slurm_fakes(tmp_path)
    env["SLURM_SUBMIT_DIR"] = str(b)
    proc = subprocess.Popen(["bash", str(b / "launch/slurm.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "running").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    if first_usr1:  # the time-limit warning first: the task starts saving its checkpoint
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.1)
    # scancel <job>: SIGTERM to the batch shell and the task (srun is left out: a SIGTERM to it SIGKILLs the task,
    # which would only shorten this test; the script must not requeue in either case)
    proc.send_signal(signal.SIGTERM)
    os.kill(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    lines = log.read_text().splitlines()
    assert not any(ln.startswith("scontrol requeue") for ln in lines), (lines, out)
    assert [ln for ln in lines if ln.startswith("step ")] == [lines[0]] and "--stage base" in lines[0]  # no chat
    assert "checkpoint saved" in lines  # the running stage saved the step it was at
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "not requeued" in out.strip().splitlines()[-1], out


def test_torchtitan_sbatch_saves_before_the_time_limit(tmp_path):
    """torchtitan/slurm.sbatch at the time limit: Slurm sends USR1 to the batch shell (--signal=B:USR1@N, N the plan's
    preemption figure) and the job must get a SIGTERM, save the step it is at, and end the script with llmc's
    preempted status. Stand-ins as Slurm behaves: srun's task runs in a process group of its own (the step), scancel
    --signal signals every process of the step, and once the task's process ends srun kills what is left of the step
    (slurmstepd ends a step with its tasks), so a task shell that died on the SIGTERM would take torchrun's save
    with it."""
    b = _fake_build(tmp_path)
    fake, log = tmp_path / "bin", tmp_path / "log"
    fake.mkdir()
    _exe(fake / "scontrol", '#!/bin/bash\n[ "$1" = show ] && { echo node1; exit 0; }\n')
    _exe(fake / "srun", f"""\
        #!/bin/bash
        while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
        setsid "$@" &
        t=$!
        echo $t > {tmp_path}/step.pgid
        while kill -0 $t 2>/dev/null; do wait $t; rc=$?; done
        kill -KILL -- -$t 2>/dev/null
        exit $rc
        """)
    _exe(fake / "scancel", f"""\
        #!/bin/bash
        echo "scancel $*" >> {log}
        sig="${{1#--signal=}}"
        kill -"$sig" -- -"$(cat {tmp_path}/step.pgid)"
        """)
    # in Python, as torchrun: it sets its own SIGTERM handler (torch.distributed.elastic's PContext.start), whatever
    # the disposition it started with (a shell cannot trap a signal ignored when it started)
    _exe(fake / "torchrun", f"""\
        #!{sys.executable}
        import signal, sys, time
        def stop(signum, frame):
            time.sleep(0.5)
            with open({str(log)!r}, "a") as f:
                f.write("checkpoint saved\\n")
            sys.exit({EXIT_PREEMPTED})
        signal.signal(signal.SIGTERM, stop)
        open({str(tmp_path / "running")!r}, "w").write("running")
        time.sleep(60)
        """)
    _exe(fake / "python", "#!/bin/bash\nexit 0\n")
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(b),
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", RUN_DIR=str(tmp_path / "run"))
    script = (b / "torchtitan/slurm.sbatch").read_text()
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", script).group(1))
    shutdown = int(re.search(r'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)', (b / "torchtitan/run_multi_node.sh").read_text())
                   .group(1))
    assert lead > shutdown  # the signal comes early enough for torchrun's whole shutdown time
    proc = subprocess.Popen(["bash", str(b / "torchtitan/slurm.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "running").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # Slurm, N s before the time limit
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if (tmp_path / "step.pgid").exists():
            subprocess.run(["kill", "-KILL", "--", f"-{(tmp_path / 'step.pgid').read_text().strip()}"],
                           capture_output=True)
    assert "checkpoint saved" in log.read_text().splitlines(), out
    assert proc.returncode == EXIT_PREEMPTED, out
    assert "stopped by a signal after saving its current step" in out.strip().splitlines()[-1], out


# ----------------------------------------------------------------------------- 2. one last line of llmc's

FAIL_PY = 'raise RuntimeError("boom in worker")\n'


@pytest.fixture(scope="module")
def torchrun_failure(tmp_path_factory) -> str:
    """What torch's own torchrun prints when its worker raises (the worker's traceback, then the agent's
    ChildFailedError traceback and report): recorded from the installed torchrun."""
    d = tmp_path_factory.mktemp("tr")
    (d / "fail.py").write_text(FAIL_PY)
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun next to the interpreter")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "1", str(d / "fail.py")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ChildFailedError" in r.stderr, r.stderr
    return r.stderr


def _replaying_tools(d: Path, stderr_text: str, rc: int) -> dict:
    """torchrun / deepspeed that print ``stderr_text`` and exit ``rc``; python that does nothing."""
    d.mkdir(exist_ok=True)
    (d / "stderr.txt").write_text(stderr_text)
    for name in ("torchrun", "deepspeed"):
        _exe(d / name, f'#!/bin/bash\necho "{name} $*" >> "{d}/calls.log"\ncat "{d}/stderr.txt" >&2\nexit {rc}\n')
    _exe(d / "python", f'#!/bin/bash\necho "python $*" >> "{d}/calls.log"\n')
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """examples/pipeline_tiny.yaml built (CPU; native, torchtitan and DeepSpeed launchers)."""
    out = tmp_path_factory.mktemp("pt") / "b"
    write_build(out, render_artifacts(compile_example(ROOT / "examples" / "pipeline_tiny.yaml")))
    assert (out / "torchtitan" / "run_single_node.sh").exists() and (out / "deepspeed" / "launch.sh").exists()
    return out


SCRIPTS = [("native/launch.sh", {}), ("launch/torchrun_single_node.sh", {"BACKEND": "native"}),
           ("launch/torchrun_single_node.sh", {"BACKEND": "torchtitan"}),
           ("launch/torchrun_multi_node.sh", {"BACKEND": "native", "MASTER_ADDR": "h0"}),
           ("deepspeed/launch.sh", {}), ("torchtitan/run_single_node.sh", {}),
           ("torchtitan/run_multi_node.sh", {"MASTER_ADDR": "h0"})]


@pytest.mark.parametrize("script,env", SCRIPTS)
def test_a_failed_stage_ends_the_script_with_one_line_naming_its_cause(tiny_build, torchrun_failure, tmp_path,
                                                                        script, env):
    """torchrun's ChildFailedError report follows the worker's own traceback; the script must not end with it:
    its last line names the stage, the exit status and the worker's error, while everything torchrun printed is
    still shown above it and kept in run/<stage>/stderr.log."""
    run = tmp_path / "run"
    penv = {**_replaying_tools(tmp_path / "bin", torchrun_failure, 1), **env, "RUN_DIR": str(run)}
    r = subprocess.run(["bash", str(tiny_build / script)], env=penv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage pretrain failed (exit 1): RuntimeError: boom in worker"), last
    assert str(run / "pretrain" / "stderr.log") in last
    assert "ChildFailedError" in r.stderr  # nothing hidden
    assert "ChildFailedError" in (run / "pretrain" / "stderr.log").read_text()


@pytest.mark.parametrize("script,env", SCRIPTS[:2], ids=[s for s, _ in SCRIPTS[:2]])
def test_a_killed_worker_is_named_by_its_signal_not_by_the_report_banner(tiny_build, torchrun_sigkill, tmp_path,  # noqa: F811
                                                                         script, env):
    """A worker killed by SIGKILL (the OOM killer, a user) prints nothing; torchrun's failure report ends with a
    "=====" banner, which the script's last line must not offer as the cause: the report's root-cause signal line."""
    text, pid = torchrun_sigkill
    run = tmp_path / "run"
    penv = {**_replaying_tools(tmp_path / "bin", text, 1), **env, "RUN_DIR": str(run)}
    r = subprocess.run(["bash", str(tiny_build / script)], env=penv, capture_output=True, text=True, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and f"(exit 1): Signal 9 (SIGKILL) received by PID {pid}" in last, last


def test_a_preempted_stage_ends_the_script_with_the_resume_line(tiny_build, tmp_path):
    run = tmp_path / "run"
    penv = {**_replaying_tools(tmp_path / "bin", "saving step 7\n", EXIT_PREEMPTED), "RUN_DIR": str(run)}
    r = subprocess.run(["bash", str(tiny_build / "native/launch.sh")], env=penv, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == EXIT_PREEMPTED
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stage pretrain: stopped by a signal after saving its current step"), last
    assert "resume" in last


MULTI = {"BACKEND": "native", "MASTER_ADDR": "h0", "NNODES": "2"}


def _multi_node(build: Path, env: dict) -> tuple[int, str]:
    r = subprocess.run(["bash", str(build / "launch/torchrun_multi_node.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    return r.returncode, r.stderr.strip().splitlines()[-1]


def test_each_node_of_a_multi_node_run_logs_to_its_own_file(tiny_build, torchrun_failure, tmp_path):
    """Every node runs launch/torchrun_multi_node.sh on the same run dir, and appends from several hosts to one file
    of a shared filesystem can lose lines (open(2), O_APPEND: "may lead to corrupted files on NFS filesystems if
    more than one process appends data to a file at once"): with NNODES > 1 each node appends to its own
    run/<stage>/stderr.<LOG_NODE>.log, holding only its own torchrun's output, and its failure line names that
    file. A second attempt is appended to the same file; where the script has no private copy of this attempt's
    output (no usable TMPDIR) the cause is read from that log past the earlier attempt's bytes."""
    run = tmp_path / "run"
    for node in ("a", "b"):
        penv = {**_replaying_tools(tmp_path / f"bin-{node}", f"worker of node {node}\n{torchrun_failure}", 1),
                **MULTI, "RUN_DIR": str(run), "LOG_NODE": f"n{node}"}
        rc, last = _multi_node(tiny_build, penv)
        log = run / "pretrain" / f"stderr.n{node}.log"
        assert rc == 1, last
        assert last.startswith("error: stage pretrain failed (exit 1): RuntimeError: boom in worker"), last
        assert last.endswith(f"full log: {log})"), last
    for node, other in (("a", "b"), ("b", "a")):
        text = (run / "pretrain" / f"stderr.n{node}.log").read_text()
        assert f"worker of node {node}" in text and f"worker of node {other}" not in text, text
        assert text.count("ChildFailedError") == torchrun_failure.count("ChildFailedError")
    assert not (run / "pretrain" / "stderr.log").exists()

    # node a again, failing otherwise, with no private copy of its output: the cause is this attempt's
    penv = {**_replaying_tools(tmp_path / "bin-a2", "ValueError: second attempt\n", 1), **MULTI,
            "RUN_DIR": str(run), "LOG_NODE": "na", "TMPDIR": str(tmp_path / "missing")}
    rc, last = _multi_node(tiny_build, penv)
    log = run / "pretrain" / "stderr.na.log"
    assert rc == 1 and last.startswith("error: stage pretrain failed (exit 1): ValueError: second attempt"), last
    assert last.endswith(f"full log: {log})"), last
    assert log.read_text().endswith(f"worker of node a\n{torchrun_failure}ValueError: second attempt\n")


@pytest.mark.parametrize("hostname,env,name", [
    ("[ \"$1\" = -s ] && echo 'gpu 7(a)'", {}, "stderr.gpu_7_a_.log"),  # hostname -s, made of [A-Za-z0-9._-]
    ("exit 1", {"HOSTNAME": "box-3.cluster.example"}, "stderr.box-3.log"),  # no hostname: bash's HOSTNAME
    ("exit 1", {"LOG_NODE": "rack1/n.2"}, "stderr.rack1_n.2.log"),  # LOG_NODE first, made of the same
    ("echo x", {"NNODES": "1", "LOG_NODE": "n0"}, "stderr.log"),  # one node: the file `llmc launch` keeps
])
def test_a_multi_node_runs_log_is_named_after_its_node(tiny_build, tmp_path, hostname, env, name):
    d = tmp_path / "bin"
    penv = {**_replaying_tools(d, "RuntimeError: boom\n", 1), **MULTI, "RUN_DIR": str(tmp_path / "run"), **env}
    _exe(d / "hostname", f"#!/bin/bash\n{hostname}\n")
    rc, last = _multi_node(tiny_build, penv)
    assert rc == 1 and last.endswith(f"full log: {tmp_path / 'run' / 'pretrain' / name})"), last
    assert [p.name for p in (tmp_path / "run" / "pretrain").iterdir()] == [name]
    assert (tmp_path / "run" / "pretrain" / name).read_text() == "RuntimeError: boom\n"

@pytest.mark.parametrize("port,says", [("29x", "is not a port number"), ("65536", "leaves no port for the last")])
def test_a_master_port_with_no_room_for_the_stages_is_one_line(tiny_build, tmp_path, port, says):
    """Each stage's rendezvous takes MASTER_PORT + its position: a port that is not a number, or leaves the last
    stage past 65535, stops the script at once with one line (exit 2), before anything runs."""
    env = {**_replaying_tools(tmp_path / "bin", "", 0), **MULTI, "RUN_DIR": str(tmp_path / "run"),
           "MASTER_PORT": port}
    rc, last = _multi_node(tiny_build, env)
    assert rc == 2 and says in last and last.startswith("error: MASTER_PORT="), last
    assert not (tmp_path / "bin" / "calls.log").exists()  # (nothing ran: no prepare, no torchrun)


def test_torchtitan_multi_node_script_logs_per_node_too(tiny_build, tmp_path):
    """torchtitan/run_multi_node.sh runs on every node as well (directly or through torchtitan/slurm.sbatch's srun):
    with NNODES > 1 its log is the node's own, named in its failure line."""
    env = {**_replaying_tools(tmp_path / "bin", "RuntimeError: boom\n", 1), "MASTER_ADDR": "h0", "NNODES": "2",
           "LOG_NODE": "tA", "RUN_DIR": str(tmp_path / "run"), "PREPARE": "0"}
    r = subprocess.run(["bash", str(tiny_build / "torchtitan/run_multi_node.sh")], env=env, capture_output=True,
                       text=True, timeout=60)
    (stage,) = list((tmp_path / "run").iterdir())
    assert r.returncode == 1 and [p.name for p in stage.iterdir()] == ["stderr.tA.log"], r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].endswith(f"full log: {stage / 'stderr.tA.log'})")
    assert (stage / "stderr.tA.log").read_text() == "RuntimeError: boom\n"


# ----------------------------------------------------------------------------- 3. the torchtitan scripts prepare

def test_torchtitan_single_node_script_prepares_the_jobs_inputs_first(tiny_build, tmp_path):
    """The torchtitan job reads <LLMC_RUN_DIR>/assets/tokenizer.json (llmc_job.py: ASSETS_DIR), which only llmc's
    prepare step writes: run with the real prepare and a torchrun that looks for the file when it starts."""
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_build, b)
    d = tmp_path / "bin"
    d.mkdir()
    _exe(d / "torchrun", f"""\
        #!/bin/bash
        if [ -f "$LLMC_RUN_DIR/assets/tokenizer.json" ]; then echo found > {d}/seen; else echo missing > {d}/seen; fi
        """)
    _exe(d / "python", f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    env = {**os.environ, "PATH": f"{d}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(b / "torchtitan/run_single_node.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d / "seen").read_text().strip() == "found"


def test_torchtitan_multi_node_scripts_prepare_once(tiny_build, tmp_path):
    """Every node runs run_multi_node.sh (directly, or through torchtitan/slurm.sbatch's srun): one node prepares,
    the others wait for it before the rendezvous (prepare rewrites assets/ in place)."""
    d = tmp_path / "bin"
    d.mkdir()
    log = d / "calls.log"
    # (the nodes' check that LLMC_RUN_DIR is shared, `python -m torch.distributed.run ... shared-check`: passes)
    _exe(d / "python", f'#!/bin/bash\ncase "$*" in *shared-check*) exit 0 ;; esac\n'
         f'echo "prepare start" >> {log}\nsleep 1.5\necho "prepare end" >> {log}\n')
    _exe(d / "torchrun", f'#!/bin/bash\necho "torchrun $*" >> {log}\n')
    # srun of two nodes: the batch script's command once per node, at the same time
    _exe(d / "srun", '#!/bin/bash\nwhile [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done\n'
         '"$@" & "$@" & wait\n')
    _exe(d / "scontrol", "#!/bin/bash\necho node1\necho node2\n")
    env = {**os.environ, "PATH": f"{d}:{os.environ['PATH']}", "MASTER_ADDR": "h0", "RUN_DIR": str(tmp_path / "run"),
           "CLAIM_POLL_S": "1", "SLURM_SUBMIT_DIR": str(tiny_build), "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "9"}
    nodes = [subprocess.Popen(["bash", str(tiny_build / "torchtitan/run_multi_node.sh")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    for runner in (["bash", str(tiny_build / "torchtitan/slurm.sbatch")],):
        r = subprocess.run(runner, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text().splitlines()
    # per launch: one prepare, finished before either node's torchrun starts; two launches
    assert calls.count("prepare start") == 2 and calls.count("prepare end") == 2, calls
    first, second = calls[:4], calls[4:]
    for part in (first, second):
        assert part[:2] == ["prepare start", "prepare end"] and all("torchtitan.train" in c for c in part[2:]), calls


# ----------------------------------------------------------------------------- 4. DeepSpeed hostfile: every stage on every host

def test_deepspeed_stages_on_one_node_get_the_planned_shutdown_time(tmp_path):
    """On one node deepspeed/launch.sh starts the DeepSpeed runner's ranks with torchrun, which lets them save for
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT s after a SIGTERM (the plan's preemption figure); the DeepSpeed launcher's
    launch.py would SIGKILL them 30 s after it (terminate_process_tree, deepspeed 0.19.8)."""
    import shlex

    b = _fake_build(tmp_path, count=8)
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("deepspeed", "torchrun", "python"):
        _exe(d / name, f'#!/bin/bash\necho "{name} ${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}} $(printf "%q " "$@")" '
                       f'>> {d}/calls.log\n')
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
    env.update(PATH=f"{d}:{os.environ['PATH']}", RUN_DIR=str(tmp_path / "run"))
    r = subprocess.run(["bash", str(b / "deepspeed/launch.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [shlex.split(ln) for ln in (d / "calls.log").read_text().splitlines()]
    (base,) = [c for c in calls if "--stage" in c and c[c.index("--stage") + 1] == "base"]
    assert base[0] == "torchrun" and base[2:6] == ["--standalone", "--nproc_per_node", "8", "-m"], base
    assert base[6] == "llmc.runtime.ds_train"
    lead = re.search(r'TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)', (b / "deepspeed/launch.sh").read_text()).group(1)
    assert base[1] == lead and int(lead) > 30
    assert not [c for c in calls if c[0] == "deepspeed"]


def test_deepspeed_hostfile_runs_the_other_stages_on_the_same_hosts(tmp_path):
    """With a HOSTFILE the DeepSpeed stages run on its hosts; the stages the DeepSpeed runner does not train (sft,
    dpo) must too, not on this node alone: through the DeepSpeed launcher's own multi-node start, checked with
    DeepSpeed's own argument parser (deepspeed.launcher.runner.parse_args)."""
    pytest.importorskip("deepspeed")
    import shlex

    from deepspeed.launcher.runner import parse_args

    b = _fake_build(tmp_path, count=16)
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("deepspeed", "torchrun", "python"):
        _exe(d / name, f'#!/bin/bash\necho "{name} $(printf "%q " "$@")" >> {d}/calls.log\n')
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    env = {**os.environ, "PATH": f"{d}:{os.environ['PATH']}", "HOSTFILE": str(hostfile),
           "RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run(["bash", str(b / "deepspeed/launch.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [shlex.split(ln) for ln in (d / "calls.log").read_text().splitlines()]
    stages = {}
    for argv in calls:
        if "--stage" in argv:
            stages[argv[argv.index("--stage") + 1]] = argv
    assert set(stages) == {"base", "chat", "align"}, calls
    for name, argv in stages.items():
        assert argv[0] == "deepspeed", (name, argv)  # not torchrun --standalone on this node
        args = parse_args(argv[1:])
        assert args.hostfile == str(hostfile) and args.num_nodes == 2 and args.master_addr == "node1"
        assert args.module
        if name == "base":
            assert args.user_script == "llmc.runtime.ds_train"
        else:
            assert args.user_script == "llmc.runtime.entry" and args.no_local_rank, argv
            assert args.user_args[args.user_args.index("--stage") + 1] == name


# ----------------------------------------------------------------------------- 6. the eval step decides a re-score

@pytest.mark.parametrize("script,env", [("native/launch.sh", {}),
                                        ("launch/torchrun_single_node.sh", {"BACKEND": "native"}),
                                        ("launch/torchrun_multi_node.sh", {"BACKEND": "native", "MASTER_ADDR": "h0"})])
def test_the_scripts_leave_an_existing_eval_summary_to_the_eval_step(tmp_path, script, env):
    """A finished stage with an eval/summary.json: the script still runs the eval step, which skips it when the
    summary records this lock's eval settings and weights and scores it again when they changed
    (llmc.runtime.evaluate.eval_change); a script that skipped on the file alone kept an old eval set's score."""
    b = tmp_path / "b"
    write_build(b, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    done = b / "run" / "pretrain"
    (done / "eval").mkdir(parents=True)
    (done / "DONE.json").write_text('{"status": "done", "stage": "pretrain"}')
    (done / "eval" / "summary.json").write_text('{"tasks": {}, "samples": {}}')
    tools = _replaying_tools(tmp_path / "bin", "", 0)
    r = subprocess.run(["bash", str(b / script)], env={**tools, **env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    calls = (tmp_path / "bin" / "calls.log").read_text()
    assert "-m llmc.runtime.evaluate --lock" in calls and "--stage pretrain" in calls, calls
