"""``llmc launch``: dry-run commands per backend, DONE.json stage skipping, one-line errors."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from test_build_fakes import make_compiled, make_run
from test_eval_spec import PIPE as EVAL_PIPE
from typer.testing import CliRunner

from llmc.buildfs import write_build
from llmc.cli import app
from llmc.emit import render_artifacts
from llmc.launch import LaunchError, launch_commands

STAGES = [{"name": "base", "kind": "pretrain", "init_from": None},
          {"name": "chat", "kind": "sft", "init_from": "base"},
          {"name": "align", "kind": "dpo", "init_from": "chat"}]


def _build(tmp_path: Path, **kw) -> Path:
    run = kw.pop("run", None) or make_run(stages=[{k: v for k, v in s.items() if v is not None} for s in STAGES])
    c = make_compiled(run, stages=STAGES, **kw)
    out = tmp_path / "b"
    write_build(out, render_artifacts(c))
    return out


def test_native_dry_run_commands(tmp_path):
    b = _build(tmp_path)
    cmds = launch_commands(b, backend="native", gpu=False)
    assert [c.stage for c in cmds] == ["prepare", "base", "chat", "align"]
    assert cmds[0].argv[1:4] == ["-m", "llmc.runtime.entry", "prepare"]
    assert cmds[0].argv[cmds[0].argv.index("--lock") + 1] == str(b.resolve() / "plan.lock.json")
    for c, s in zip(cmds[1:], ["base", "chat", "align"], strict=True):
        assert Path(c.argv[0]).name == "torchrun"
        assert c.argv[1:4] == ["--standalone", "--nproc_per_node", "1"]  # CPU default: 1 process
        i = c.argv.index("-m")
        assert c.argv[i + 1] == "llmc.runtime.entry"
        assert c.argv[c.argv.index("--lock") + 1] == str(b.resolve() / "plan.lock.json")
        assert c.argv[c.argv.index("--stage") + 1] == s
        assert c.argv[c.argv.index("--out") + 1] == str(b.resolve() / "run" / s)  # the stage's output dir
        assert c.skip_reason is None


def test_default_backend_accepts_the_plan(tmp_path):
    from llmc.compiler.plan import ParallelPlan

    # dp/tp only: llmc's runtime runs it
    b = _build(tmp_path / "dp")
    assert "llmc.runtime.entry" in launch_commands(b, gpu=True)[1].argv
    for name in ("launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh", "launch/slurm.sbatch"):
        assert 'BACKEND="${BACKEND:-native}"' in (b / name).read_text(), name
    # pipeline parallel: the native trainer refuses pp > 1, so every launcher defaults to torchtitan
    b = _build(tmp_path / "pp", plan=ParallelPlan(dp_shard=4, pp=2, micro_batch=2, grad_accum=4))
    all_cmds = launch_commands(b, gpu=True)
    cmds = {}
    for c in all_cmds:
        cmds.setdefault(c.stage, c)
    assert "torchtitan.train" in cmds["base"].argv
    # then the torchtitan checkpoint becomes the stage's Hugging Face directory, as every stage ends
    assert [c.argv[2:4] for c in all_cmds if c.stage == "base"][1] == ["llmc.runtime.hf_io", str(b)]
    assert "llmc.runtime.entry" in cmds["chat"].argv  # post-training stages stay on llmc's runtime
    for name in ("launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh", "launch/slurm.sbatch"):
        text = (b / name).read_text()
        assert 'BACKEND="${BACKEND:-torchtitan}"' in text, name
        # the torchtitan branch runs every stage and hands the script's arguments to torchtitan.train
        branch = text[text.index("  torchtitan)"):]
        assert '--config job "$@"' in branch and "--stage chat" in branch and "--stage align" in branch, name
    multi = (b / "launch/torchrun_multi_node.sh").read_text()
    assert "NODE_RANK=" not in multi and "--node_rank" not in multi  # c10d rendezvous assigns node ranks
    assert "rdzv_backend c10d" in multi


def test_default_nproc_on_gpu_is_gpus_per_node(tmp_path):
    b = _build(tmp_path)
    cmds = launch_commands(b, backend="native", gpu=True)
    assert cmds[1].argv[cmds[1].argv.index("--nproc_per_node") + 1] == "8"
    cmds = launch_commands(b, backend="native", nproc=3, gpu=True)
    assert cmds[1].argv[cmds[1].argv.index("--nproc_per_node") + 1] == "3"


def test_post_training_stages_get_every_process(tmp_path):
    # sft/dpo shard over the ranks (FSDP2) like pre-training: the same process count for every stage
    b = _build(tmp_path)
    cmds = {c.stage: c for c in launch_commands(b, backend="native", nproc=4, gpu=True)}
    nproc = {s: cmds[s].argv[cmds[s].argv.index("--nproc_per_node") + 1] for s in ("base", "chat", "align")}
    assert nproc == {"base": "4", "chat": "4", "align": "4"}


def test_deepspeed_dry_run(tmp_path):
    b = _build(tmp_path)
    cmds = launch_commands(b, backend="deepspeed", nproc=2, gpu=False)
    ds = [c for c in cmds if "llmc.runtime.ds_train" in c.argv]
    assert [c.stage for c in ds] == ["base"]  # sft/dpo (masked / pairwise losses) run on the native runtime
    c = ds[0]
    assert c.env == {"DS_ACCELERATOR": "cpu"}
    # torchrun starts the ranks (TORCH_ELASTIC_SHUTDOWN_TIMEOUT lets them save after a SIGTERM; the DeepSpeed
    # launcher's launch.py would kill them 30 s later)
    assert Path(c.argv[0]).name == "torchrun" and c.argv[1:4] == ["--standalone", "--nproc_per_node", "2"]
    assert c.argv[c.argv.index("-m") + 1] == "llmc.runtime.ds_train"
    assert c.argv[c.argv.index("--ds-config") + 1] == str(b.resolve() / "deepspeed" / "ds_config.json")
    for c in cmds[2:]:
        assert "llmc.runtime.entry" in c.argv and Path(c.argv[0]).name == "torchrun"
    # on a GPU machine no CPU accelerator override
    assert launch_commands(b, backend="deepspeed", gpu=True)[1].env == {}


def test_deepspeed_launcher_accepts_the_flags():
    """The flags we pass exist in deepspeed 0.19.8's launcher parser."""
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import parse_args

    args = parse_args(["--num_gpus", "2", "--master_port", "29500", "--module", "llmc.runtime.ds_train",
                       "--lock", "x", "--ds-config", "y"])
    assert args.num_gpus == 2 and args.module and args.user_script == "llmc.runtime.ds_train"
    assert args.user_args == ["--lock", "x", "--ds-config", "y"]


def test_torchtitan_dry_run_uses_cpu_shim_only_without_gpu(tmp_path):
    b = _build(tmp_path)
    assert (b / "torchtitan" / "llmc_job.py").exists(), "the torchtitan job module was not emitted"
    cpu = launch_commands(b, backend="torchtitan", nproc=2, gpu=False)
    gpu = launch_commands(b, backend="torchtitan", nproc=8, gpu=True)
    base_cpu = next(c for c in cpu if c.stage == "base")
    base_gpu = next(c for c in gpu if c.stage == "base")
    assert "llmc.runtime.titan_cpu_shim" in base_cpu.argv and "torchtitan.train" not in base_cpu.argv
    assert "torchtitan.train" in base_gpu.argv and "llmc.runtime.titan_cpu_shim" not in base_gpu.argv
    for c in (base_cpu, base_gpu):
        assert c.argv[c.argv.index("--module") + 1] == "llmc_job"
        assert c.argv[c.argv.index("--config") + 1] == "job"
        assert str(b.resolve() / "torchtitan") in c.env["PYTHONPATH"]
        assert c.env["LLMC_RUN_DIR"] == str(b.resolve())  # where prepare wrote assets/ and data/
    # the post-training stages run on llmc's runtime
    assert "llmc.runtime.entry" in next(c for c in cpu if c.stage == "chat").argv
    # torchtitan writes no DONE.json: once the stage's model is exported (which runs only after torchtitan finished
    # it), a relaunch skips the stage instead of starting torchtitan again
    assert all(c.skip_reason is None for c in cpu if c.stage == "base")
    (b / "run" / "base" / "hf").mkdir(parents=True)
    (b / "run" / "base" / "hf" / "config.json").write_text("{}")
    again = [c for c in launch_commands(b, backend="torchtitan", nproc=2, gpu=False) if c.stage == "base"]
    assert len(again) == 2 and all(c.skip_reason for c in again)  # training and export
    assert "already finished and exported" in again[0].skip_reason
    # the way to run it again sets it aside (llmc never deletes a run): the flags `llmc launch` takes, with this
    # launch's own backend and process count (run as printed, it trains on torchtitan again)
    assert ("--no-resume --from base --backend torchtitan --nproc 2` sets it and the stages after it aside"
            in again[0].skip_reason and "delete" not in again[0].skip_reason)


def test_stage_skipping_resumes_at_first_unfinished(tmp_path):
    b = _build(tmp_path)
    (b / "run" / "base").mkdir(parents=True)
    (b / "run" / "base" / "DONE.json").write_text(json.dumps({"stage": "base"}))
    cmds = launch_commands(b, gpu=False)
    skipped = {c.stage: c.skip_reason for c in cmds}
    assert skipped["base"] and "DONE.json" in skipped["base"]
    assert skipped["prepare"] is None and skipped["chat"] is None and skipped["align"] is None
    for s in ("chat", "align"):
        (b / "run" / s).mkdir(parents=True)
        (b / "run" / s / "DONE.json").write_text("{}")
    cmds = launch_commands(b, gpu=False)
    assert all(c.skip_reason for c in cmds)


def test_single_stage_and_unknown_stage(tmp_path):
    b = _build(tmp_path)
    cmds = launch_commands(b, stage="chat", gpu=False)
    assert [c.stage for c in cmds] == ["prepare", "chat"]
    with pytest.raises(LaunchError, match="no stage named 'nope'"):
        launch_commands(b, stage="nope", gpu=False)


def test_no_stages_means_one_pretrain_stage(tmp_path):
    c = make_compiled()
    out = tmp_path / "b"
    write_build(out, render_artifacts(c))
    assert [c.stage for c in launch_commands(out, gpu=False)] == ["prepare", "pretrain"]


def test_errors(tmp_path):
    with pytest.raises(LaunchError, match="no such build directory"):
        launch_commands(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaunchError, match="plan.lock.json not found"):
        launch_commands(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.lock.json").write_text("{not json")
    with pytest.raises(LaunchError, match="invalid JSON"):
        launch_commands(tmp_path / "bad")
    b = _build(tmp_path)
    with pytest.raises(LaunchError, match="unknown backend"):
        launch_commands(b, backend="megatron")


def test_cli_missing_lock_is_one_line_exit_1(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["launch", str(tmp_path / "empty"), "--dry-run"])
    assert r.exit_code == 1
    out = r.output.strip().splitlines()
    assert len(out) == 1 and "error[L001]" in out[0] and "plan.lock.json not found" in out[0]
    assert "Traceback" not in r.output


def test_cli_dry_run_prints_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_FORCE_CPU", "1")
    b = _build(tmp_path)
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "deepspeed", "--dry-run"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("+ ")]
    assert len(lines) == 4
    assert lines[1].startswith("+ DS_ACCELERATOR=cpu ") and "-m llmc.runtime.ds_train" in lines[1]


def test_fallback_checkpoint_reaches_llmcs_trainer_and_is_refused_for_other_checkpointers(tmp_path, monkeypatch,
                                                                                          capsys):
    """`llmc launch --fallback-checkpoint`: every native stage command asks the runtime to walk back past a damaged
    newest checkpoint (an option `python -m llmc.runtime.entry` has); a stage that would run on DeepSpeed, whose
    checkpointer picks its own (`latest`), is one L001 line instead of a flag it would ignore."""
    monkeypatch.setenv("LLMC_FORCE_CPU", "1")
    b = _build(tmp_path)
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--dry-run", "--fallback-checkpoint"])
    assert r.exit_code == 0, r.output
    stages = [ln for ln in r.output.splitlines() if ln.startswith("+ ") and " --stage " in ln]
    assert len(stages) == 3 and all(ln.endswith(" --fallback-checkpoint") for ln in stages), stages
    from llmc.runtime.entry import main  # `python -m llmc.runtime.entry --help`, in-process

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    helptext = capsys.readouterr().out
    assert "--fallback-checkpoint" in helptext
    plain = CliRunner().invoke(app, ["launch", str(b), "--backend", "native", "--dry-run"])
    assert "--fallback-checkpoint" not in plain.output
    r = CliRunner().invoke(app, ["launch", str(b), "--backend", "deepspeed", "--dry-run", "--fallback-checkpoint"])
    out = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(out) == 1 and "error[L001]" in out[0] and "stage 'base' runs on deepspeed" in out[0]


@pytest.mark.slow
def test_native_commands_run_for_real(tmp_path, monkeypatch):
    """The prepare + native stage commands launch_commands returns run llmc's runtime (3 steps, 1 CPU process).
    torchrun's command runs as it is; a ``python -m llmc.runtime.<module> ARGS`` command (prepare, the eval step)
    runs that module's main with ARGS in this process (what ``python -m`` runs, with the command's cwd and env)."""
    import importlib
    import os
    import shutil
    import subprocess
    import sys

    from test_build_fakes import ROOT, compile_example

    example = ROOT / "examples" / "tiny_cpu.yaml"
    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_example(example)))
    # the lock records the spec path as compiled (examples/tiny_cpu.yaml, relative to the build): its local
    # eval task file must be there
    shutil.copytree(ROOT / "examples" / "tasks", out / "examples" / "tasks")
    cmds = launch_commands(out, backend="native", gpu=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for c in cmds:
        train = c.stage != "prepare" and "llmc.runtime.evaluate" not in c.argv  # the eval step takes no --steps
        argv = c.argv + (["--steps", "3"] if train else [])
        if Path(argv[0]).resolve() == Path(sys.executable).resolve() and argv[1] == "-m" \
                and argv[2].startswith("llmc.runtime."):
            with monkeypatch.context() as mp:
                mp.chdir(c.cwd)
                for k, v in c.env.items():
                    mp.setenv(k, v)
                rc = importlib.import_module(argv[2]).main(argv[3:])
            assert rc == 0, (c.stage, argv)
            continue
        r = subprocess.run(argv, env={**env, **c.env}, cwd=c.cwd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (c.stage, r.stdout[-2000:], r.stderr[-2000:])
    assert (out / "assets" / "tokenizer.json").exists()
    metrics = (out / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(m).get("step") == 3 for m in metrics)
    assert [c.stage for c in cmds if "llmc.runtime.evaluate" in c.argv] == ["pretrain"]
    summary = json.loads((out / "run" / "pretrain" / "eval" / "summary.json").read_text())
    assert summary["samples"]["pydoc_mc"] == 24 and 0 <= summary["tasks"]["pydoc_mc"]["acc"] <= 1


def test_interrupted_launch_stops_the_whole_process_group(tmp_path):
    # `llmc launch` runs torchrun/deepspeed in their own process group; SIGTERM to llmc must not leave
    # workers behind (a real annoyance on shared machines).
    import os
    import signal
    import subprocess
    import sys
    import time

    pidfile = tmp_path / "child.pid"
    code = (
        "from llmc.cli import _run_logged; import os, sys; from pathlib import Path\n"
        f"sys.exit(_run_logged(['bash', '-c', 'sleep 120 & echo $! > {pidfile}; wait'], dict(os.environ), None, "
        f"Path({str(tmp_path / 'stderr.log')!r}), 120.0)[0])\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.1)
    grandchild = int(pidfile.read_text())
    # supervise() installs its signal forwarding right after starting the child and its guard process
    # (whose argv carries our pid): wait for the guard so the signal meets the handler, not the default
    def guard_up() -> bool:
        for d in Path("/proc").iterdir():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-c" in argv and str(p.pid).encode() in argv and d.name != str(p.pid):
                return True
        return False

    for _ in range(100):
        if guard_up():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the launched job's worker survived llmc's SIGTERM")


def _run_logged_signalled(tmp_path, child: str, sig) -> int:
    """``cli._run_logged`` of ``bash -c child`` in a fresh Python process, sent ``sig`` (None: nothing) once the
    child has touched ``tmp_path/ready``; that process's exit status."""
    import subprocess
    import sys
    import time

    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    code = ("from llmc.cli import _run_logged; import os, sys; from pathlib import Path\n"
            f"sys.exit(_run_logged(['bash', '-c', {child!r}], dict(os.environ), None, "
            f"Path({str(tmp_path / 'e.log')!r}), 120.0)[0])\n")
    p = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    time.sleep(0.5)  # the forwarding handlers are installed before the child starts; let bash set its trap
    if sig is not None:
        p.send_signal(sig)
    return p.wait(timeout=30)


def test_usr1_reaches_a_launched_stage_as_sigterm(tmp_path):
    """A batch system's "time is almost up" (sbatch --signal=USR1@N) reaches the launched stage as the SIGTERM that
    torchrun forwards and llmc's runtime answers by saving its step (a SIGUSR1 would kill torchrun outright); the
    stage's exit status comes back unchanged, here the preempted one."""
    import signal

    from llmc.runtime.runlock import EXIT_PREEMPTED

    got = tmp_path / "got"
    child = (f"trap 'echo TERM > {got}; exit {EXIT_PREEMPTED}' TERM; touch {tmp_path / 'ready'}; "
             "while true; do sleep 0.1; done")
    assert _run_logged_signalled(tmp_path, child, signal.SIGUSR1) == EXIT_PREEMPTED
    assert got.read_text().strip() == "TERM"


def test_launch_reports_a_preempted_stage_and_exits_with_its_status(tmp_path, monkeypatch):
    """`llmc launch` tells a preempted stage (saved, rerun to resume) from a failed one, and passes its status on."""
    from test_build_fakes import ROOT, compile_example

    import llmc.cli as cli
    from llmc.runtime.runlock import EXIT_PREEMPTED

    out = tmp_path / "b"
    write_build(out, render_artifacts(compile_example(ROOT / "examples" / "tiny_cpu.yaml")))
    ran = []
    monkeypatch.setattr(cli, "_run_logged", lambda argv, env, cwd, log, grace_s: (ran.append(argv) or
                        (0 if "prepare" in argv else EXIT_PREEMPTED), ""))
    r = CliRunner().invoke(app, ["launch", str(out), "--backend", "native"])
    assert r.exit_code == EXIT_PREEMPTED, r.output
    assert len(ran) == 2 and "prepare" in ran[0]  # prepare, then the stage; nothing after it
    assert "stage 'pretrain' preempted" in r.output and "rerun `llmc launch" in r.output and "error" not in r.output


def test_a_stage_that_fails_after_a_sigterm_keeps_its_status_without_rank_reports(tmp_path):
    """torchrun, itself signalled, exits 1 whether its workers saved and exited 75 or hung and were SIGKILLed: without
    every rank's report the stage keeps its status (75 only on the ranks' word: test_launch_safety_review)."""
    import signal

    torchrun_like = f"trap 'exit 1' TERM; touch {tmp_path / 'ready'}; while true; do sleep 0.1; done"
    assert _run_logged_signalled(tmp_path, torchrun_like, signal.SIGTERM) == 1
    assert _run_logged_signalled(tmp_path, torchrun_like, signal.SIGUSR1) == 1
    assert _run_logged_signalled(tmp_path, f"touch {tmp_path / 'ready'}; sleep 0.7; exit 3", None) == 3


def test_launch_gives_torchrun_the_shutdown_time_the_slurm_script_does(tmp_path, monkeypatch):
    """torchrun kills its workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) after passing a SIGTERM on:
    `llmc launch` sets it to the plan's figure (the Slurm script's) unless the environment has its own, and waits
    longer than that itself before it kills the stage. Llama 3 8B on one node of 8 GPUs: its save of the current
    step (12 B per parameter: fp32 weights + AdamW m, v, at the table's 1 GB/s per node) takes over 90 s on its
    own, so the figure is well above the floor (the launchers' fixed 100 s before the plan sized it)."""
    from test_build_fakes import ROOT

    import llmc.cli as cli

    out = tmp_path / "b"
    assert CliRunner().invoke(app, ["build", str(ROOT / "examples" / "llama3_8b_h100x8.yaml"), "-o", str(out)]
                              ).exit_code == 0
    lock = json.loads((out / "plan.lock.json").read_text())
    p, state = lock["preemption"], 12 * lock["model"]["params_total"]
    assert p["save_seconds"] >= state / 1e9 and p["shutdown_seconds"] >= 1.5 * p["needed_seconds"] > 150
    seen = []
    monkeypatch.setattr(cli, "_run_logged", lambda argv, env, cwd, log, grace_s: (seen.append((env, grace_s)) or 0, ""))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert CliRunner().invoke(app, ["launch", str(out), "--backend", "native"]).exit_code == 0
    assert seen and all(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(p["shutdown_seconds"]) for e, _ in seen)
    assert all(g > p["shutdown_seconds"] for _, g in seen)
    text = (out / "launch" / "slurm.sbatch").read_text()
    assert f'TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-{p["shutdown_seconds"]}}}"' in text
    assert f"#SBATCH --signal=B:USR1@{p['signal_lead_seconds']}\n" in text
    seen.clear()
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")
    assert CliRunner().invoke(app, ["launch", str(out), "--backend", "native"]).exit_code == 0
    assert seen and all(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "900" and g > 900 for e, g in seen)


# ----------------------------------------------------------------------------- emitted scripts, run on fakes

CPU2_PIPE = EVAL_PIPE.replace("count: 1}", "count: 2}")  # test_eval_spec's pipeline on 2 CPUs


@pytest.fixture(scope="module")
def cpu2_build(tmp_path_factory) -> Path:
    """A CPU pipeline on hardware.count 2 (plan world 2), with evals after both stages and a torchtitan job."""
    from test_build_fakes import compile_text

    d = tmp_path_factory.mktemp("cpu2")
    (d / "spec.yaml").write_text(CPU2_PIPE)
    c = compile_text(CPU2_PIPE, str(d / "spec.yaml"))
    assert c.plan.dp_shard * c.plan.dp_replicate * c.plan.tp * c.plan.pp * c.plan.cp == 2
    write_build(d / "b", render_artifacts(c))
    return d / "b"


def test_cpu_build_defaults_to_the_plans_world_on_one_node(cpu2_build):
    """A CPU build of hardware.count 2 runs 2 processes on one node by default (the runtime refuses any other
    WORLD_SIZE): `llmc launch`, native/launch.sh, the torchrun scripts, deepspeed/launch.sh; its Slurm script asks
    for one node and no GPU."""
    b = cpu2_build
    for c in launch_commands(b, backend="native", gpu=False)[1:]:
        if "--nproc_per_node" in c.argv:
            assert c.argv[c.argv.index("--nproc_per_node") + 1] == "2", c.argv
    ds = [c for c in launch_commands(b, backend="deepspeed", gpu=False) if "llmc.runtime.ds_train" in c.argv]
    assert ds and all(c.argv[c.argv.index("--nproc_per_node") + 1] == "2" for c in ds)
    assert launch_commands(b, backend="native", nproc=1, gpu=False)[1].argv[3] == "1"  # --nproc still wins
    for name in ("native/launch.sh", "launch/torchrun_single_node.sh", "launch/torchrun_multi_node.sh",
                 "deepspeed/launch.sh"):
        assert 'NPROC="${NPROC:-2}"' in (b / name).read_text(), name
    sbatch = (b / "launch/slurm.sbatch").read_text()
    assert "--gpus-per-node" not in sbatch and "#SBATCH --nodes=1\n" in sbatch
    assert "--nproc_per_node 2" in sbatch
    assert 'NNODES="${NNODES:-1}"' in (b / "launch/torchrun_multi_node.sh").read_text()


def test_no_emitted_script_reads_scontrol_with_head(cpu2_build, tmp_path):
    """`scontrol show hostnames | head -n 1` under pipefail fails the job when scontrol is still writing after head
    exits (SIGPIPE, a large allocation): every script reads the whole list. Checked by running the Slurm script
    against an scontrol that keeps writing after its first line."""
    import subprocess

    b = cpu2_build
    for p in b.rglob("*"):
        if p.is_file() and p.suffix in (".sh", ".sbatch"):
            assert "| head" not in p.read_text(), p
    sh = tmp_path / "bin"
    sh.mkdir()
    # the first host, a pause (head has exited by then), then more hosts: the next write gets SIGPIPE
    (sh / "scontrol").write_text("#!/bin/bash\necho node0001\nsleep 0.3\nfor i in $(seq 2000); do echo node$i; done\n")
    (sh / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> "{tmp_path}/calls.log"\n')
    for f in sh.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{sh}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(b), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node[0001-2001]", "SLURM_NNODES": "2001", "BACKEND": "native",
           "RUN_DIR": str(tmp_path / "run")}
    r = subprocess.run(["bash", str(b / "launch/slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--rdzv_endpoint node0001:29500" in (tmp_path / "calls.log").read_text()


def _node_shims(d: Path, slow: float = 0.0) -> dict[str, str]:
    """python / torchrun stand-ins that log their call to d/calls.log; `python -m llmc.runtime.hf_io` and
    `... evaluate` write the file that marks their work done, after `slow` seconds (prepare too sleeps)."""
    d.mkdir(exist_ok=True)
    log = d / "calls.log"
    (d / "torchrun").write_text(f'#!/bin/bash\necho "torchrun $*" >> "{log}"\n')
    (d / "python").write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "python $*" >> "{log}"
        case "$2" in
          llmc.runtime.entry) sleep {slow} ;;
          llmc.runtime.hf_io) sleep {slow}; out="${{@: -1}}"; mkdir -p "$out"; echo {{}} > "$out/config.json" ;;
          llmc.runtime.evaluate) sleep {slow}; out="${{@: -1}}"; mkdir -p "$out/eval"; echo {{}} > "$out/eval/summary.json" ;;
        esac
        """))
    for f in d.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}", "BACKEND": "torchtitan", "MASTER_ADDR": "h0",
            "CLAIM_STALE_S": "2", "CLAIM_POLL_S": "1", "CLAIM_BEAT_S": "1"}


def _node_calls(d: Path) -> list[str]:
    import re

    out = []
    for ln in (d / "calls.log").read_text().splitlines():
        if " titan-start " in ln:  # (the check as a torchtitan stage starts, not a step of the run)
            continue
        m = re.search(r"llmc\.runtime\.(\w+).*?--stage (\w+)", ln)
        out.append("prepare" if " prepare " in ln else f"{m.group(1)} {m.group(2)}" if m else
                   "titan base" if "torchtitan.train" in ln else ln)
    return out


def test_multi_node_relaunch_takes_over_stale_claims(cpu2_build, tmp_path):
    """A node killed while exporting or evaluating leaves its claim directory; on relaunch the multi-node script
    takes a claim over once nothing keeps it alive (no heartbeat), instead of waiting forever for the export or
    skipping the eval on every later run."""
    import subprocess

    b = cpu2_build
    run = tmp_path / "run"
    for claim in ("prepare.claim", "base/hf.claim", "chat/eval.claim"):
        (run / claim).mkdir(parents=True)
    (run / "base" / "hf.claim" / "owner").write_text("deadnode 4242\n")
    env = {**_node_shims(tmp_path / "bin"), "RUN_DIR": str(run)}
    r = subprocess.run(["bash", str(b / "launch/torchrun_multi_node.sh")], env=env, capture_output=True, text=True,
                       timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _node_calls(tmp_path / "bin") == ["prepare", "titan base", "hf_io base", "evaluate base", "entry chat",
                                             "evaluate chat"]
    assert "taking it over" in r.stderr and "deadnode 4242" in r.stdout
    assert not any(p.name.endswith(".claim") or ".takeover." in p.name for p in run.rglob("*"))


def test_multi_node_nodes_share_prepare_export_and_eval(cpu2_build, tmp_path):
    """Two nodes at once on one run dir: one prepares, exports and evaluates while the other waits for it (prepare
    rewrites assets/ in place; the next stage starts from the export); both train every stage."""
    import subprocess

    b = cpu2_build
    run = tmp_path / "run"
    env = {**_node_shims(tmp_path / "bin", slow=1.5), "RUN_DIR": str(run)}
    nodes = [subprocess.Popen(["bash", str(b / "launch/torchrun_multi_node.sh")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=90)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    calls = _node_calls(tmp_path / "bin")
    counts = {c: calls.count(c) for c in set(calls)}
    assert counts == {"prepare": 1, "titan base": 2, "hf_io base": 1, "evaluate base": 1, "entry chat": 2,
                      "evaluate chat": 1}, calls
    assert "waiting for it" in "".join(outs)
