"""What the emitted cluster artifacts do on a cluster: torchtitan's collective timeout against the plan's own
synchronous save, the environment a DeepSpeed multi-host launch hands its remote ranks (and what it leaves on disk),
and the Slurm scripts finding their build when submitted from another directory. The scripts run against stand-ins
of deepspeed / srun / scontrol / python, as in test_launch_scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_fakes import ROOT, compile_example
from test_launch_scripts import _exe, _fake_build

# ----------------------------------------------------------------------------- 1. torchtitan's train timeout

# published parameter count (Meta's Llama 3.1 70B model card: 70.6B), not llmc's own count
LLAMA3_70B = 70.6e9
DCP = 12  # bytes per parameter in torchtitan's checkpoint: fp32 weights + AdamW exp_avg + exp_avg_sq
GBPS = 1e9  # the hardware table's checkpoint storage figure, 1 GB/s per node (no write_gbps in the spec)


def _train_timeout(compiled) -> int:
    from llmc.emit.torchtitan import render_torchtitan

    job = render_torchtitan(compiled, strict=True)["torchtitan/llmc_job.py"]
    return int(re.search(r"train_timeout_seconds=(\d+)", job).group(1))


def test_torchtitan_saves_its_last_step_synchronously_whatever_async_mode_says():
    """What the timeout rests on, read in the installed torchtitan: a forced save (``last_step=True``, the job's last
    step and its preemption save) goes to ``_save_last_step``, which calls ``dcp_save`` with ``AsyncMode.DISABLED``."""
    spec = importlib.util.find_spec("torchtitan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchtitan is not installed")
    src = (Path(next(iter(spec.submodule_search_locations))) / "components" / "checkpointer" / "dcp.py").read_text()
    save = src[src.index("def _save(self"):src.index("\n    def ", src.index("def _save(self") + 1)]
    assert re.search(r"if last_step:\s+self\._save_last_step\(curr_step\)", save)
    last = src[src.index("def _save_last_step"):src.index("\n    def ", src.index("def _save_last_step") + 1)]
    assert "async_mode=AsyncMode.DISABLED" in last


def test_an_async_jobs_train_timeout_outlasts_its_planned_preemption_save():
    """Llama 3 70B on 64 H100s checkpoints asynchronously, but its preemption save is synchronous: the save in flight
    is waited for, then the current step written in full, each node writing an eighth of the state. The NCCL
    watchdog (torchtitan's ``comm.train_timeout_seconds``) must outlast that save, with room for the storage to run
    slower than the plan's per-node figure; torchtitan's 100 s default does not."""
    from llmc.compiler.checkpoint_cost import PREEMPT_SAFETY

    c = compile_example(ROOT / "examples" / "llama3_70b_h100x64.yaml")
    assert c.hyper.checkpoint_async
    p = c.preemption
    assert p.job == "pre-training"
    # the plan's figure, checked against the published size: twice a node's share of the state at 1 GB/s
    assert p.save_seconds == pytest.approx(2 * DCP * LLAMA3_70B / 8 / GBPS, rel=0.005)
    assert p.save_seconds > 100
    timeout = _train_timeout(c)
    assert timeout >= PREEMPT_SAFETY * p.save_seconds, (timeout, p.save_seconds)


@pytest.mark.parametrize("example", ["llama3_8b_h100x8", "mixtral_8x7b", "deepseek_v3"])
def test_every_torchtitan_jobs_train_timeout_covers_its_planned_save(example):
    """Synchronous (Llama 3 8B) or asynchronous (the MoE examples), every job's timeout covers its own predicted
    preemption save (the plan's ``time.checkpoint``), and never falls below the old synchronous headroom of 600 s."""
    c = compile_example(ROOT / "examples" / f"{example}.yaml")
    timeout = _train_timeout(c)
    assert timeout >= 1.5 * c.time.checkpoint.preempt_seconds
    assert timeout >= 600


# ----------------------------------------------------------------------------- 2. DeepSpeed's environment file

# a stand-in of the `deepspeed` launcher that reads the environment files as deepspeed/launcher/runner.py does
# (0.19.8, main(): for each of DEEPSPEED_ENVIRONMENT_PATHS, os.path.join(path, DEEPSPEED_ENVIRONMENT_NAME), each
# KEY=VALUE line an export, a later one winning), with the module's own name and paths (DS_ENV_FILE, ~, .), and
# records what the remote ranks would get, the file DS_ENV_FILE names, its mode and its text
FAKE_DEEPSPEED = """\
#!{python}
import json, os, stat, sys
from deepspeed.launcher import runner
exports = {{}}
for path in runner.DEEPSPEED_ENVIRONMENT_PATHS:
    f = os.path.join(path, runner.DEEPSPEED_ENVIRONMENT_NAME)
    if os.path.isfile(f):
        for line in open(f).readlines():
            key, val = line.split("=", maxsplit=1)
            exports[key.strip()] = val.strip()
named = os.environ.get("DS_ENV_FILE")
rec = {{"argv": sys.argv[1:], "exports": exports, "file": named,
        "mode": stat.S_IMODE(os.stat(named).st_mode) if named and os.path.isfile(named) else None,
        "text": open(named).read() if named and os.path.isfile(named) else None}}
with open({log!r}, "a") as out:
    out.write(json.dumps(rec) + "\\n")
"""


def _ds_hostfile_run(tmp_path: Path, files: dict[str, str], **env_over: str) -> tuple[subprocess.CompletedProcess,
                                                                                      list[dict]]:
    """deepspeed/launch.sh of a two-node build with a HOSTFILE, its first stage only, run from the working directory
    <tmp>/work with HOME=<tmp>/home and ``files`` (paths under tmp_path: text) written; (the run, the stand-in's
    records)."""
    b = _fake_build(tmp_path, count=16)
    d, home, work = tmp_path / "bin", tmp_path / "home", tmp_path / "work"
    for p in (d, home, work):
        p.mkdir()
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    log = tmp_path / "deepspeed.jsonl"
    _exe(d / "deepspeed", FAKE_DEEPSPEED.format(python=sys.executable, log=str(log)))
    for name in ("torchrun", "python"):
        _exe(d / name, "#!/bin/bash\nexit 0\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ENV_FILE"}
    env.update(PATH=f"{d}:{os.environ['PATH']}", HOME=str(home), HOSTFILE=str(hostfile), RUN_DIR=str(tmp_path / "run"),
               STAGE="base", HF_TOKEN="hf_secret123", DS_ACCELERATOR="cpu", **env_over)
    r = subprocess.run(["bash", str(b / "deepspeed/launch.sh")], env=env, cwd=work, capture_output=True, text=True,
                       timeout=180, preexec_fn=lambda: os.umask(0o022))  # a common default umask: files 0644
    recs = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return r, recs


def test_deepspeed_hostfile_run_keeps_the_users_environment_files_and_leaves_no_token_file(tmp_path):
    """The user's ~/.deepspeed_env and ./.deepspeed_env (a site's fabric and NCCL settings), which DeepSpeed reads
    when DS_ENV_FILE is not set, still reach the remote ranks beside llmc's variables, in DeepSpeed's order; the
    file holding them (and HF_TOKEN) is readable by its owner only while the launcher runs, and gone when it exits."""
    pytest.importorskip("deepspeed")
    r, recs = _ds_hostfile_run(tmp_path, {
        "home/.deepspeed_env": "FI_PROVIDER=efa\nLD_LIBRARY_PATH=/opt/amazon/efa/lib\nNCCL_DEBUG=WARN\n",
        "work/.deepspeed_env": "NCCL_DEBUG=INFO\nNCCL_SOCKET_IFNAME=ens5",  # no final newline
    })
    assert r.returncode == 0, r.stderr
    (rec,) = [x for x in recs if "shared-check" not in x["argv"]]
    ex = rec["exports"]
    assert ex.get("FI_PROVIDER") == "efa" and ex.get("LD_LIBRARY_PATH") == "/opt/amazon/efa/lib", rec
    assert ex.get("NCCL_SOCKET_IFNAME") == "ens5" and ex.get("NCCL_DEBUG") == "INFO", rec  # ./ after ~, as DeepSpeed
    assert ex.get("HF_TOKEN") == "hf_secret123", rec
    lines = rec["text"].splitlines()
    assert lines.index("FI_PROVIDER=efa") < lines.index("NCCL_SOCKET_IFNAME=ens5") < lines.index("HF_TOKEN=hf_secret123")
    assert rec["mode"] == 0o600, oct(rec["mode"])
    assert not Path(rec["file"]).exists(), rec["file"]
    assert not [p for p in tmp_path.joinpath("run").rglob("*") if p.is_file() and "hf_secret123" in p.read_text()]


def test_deepspeed_hostfile_run_keeps_the_users_own_ds_env_file(tmp_path):
    """A DS_ENV_FILE of the user's is the one file DeepSpeed would have read (~/.deepspeed_env is not): its lines are
    passed on, and the user's file is left as it was."""
    pytest.importorskip("deepspeed")
    site = "FI_PROVIDER=cxi\nNCCL_NET_GDR_LEVEL=PHB\n"
    r, recs = _ds_hostfile_run(tmp_path, {"site_env": site, "home/.deepspeed_env": "FI_PROVIDER=efa\nOTHER=1\n"},
                               DS_ENV_FILE=str(tmp_path / "site_env"))
    assert r.returncode == 0, r.stderr
    (rec,) = [x for x in recs if "shared-check" not in x["argv"]]
    ex = rec["exports"]
    assert ex.get("FI_PROVIDER") == "cxi" and ex.get("NCCL_NET_GDR_LEVEL") == "PHB" and "OTHER" not in ex, rec
    assert ex.get("HF_TOKEN") == "hf_secret123", rec
    assert rec["file"] != str(tmp_path / "site_env") and rec["mode"] == 0o600, rec
    assert not Path(rec["file"]).exists()
    assert (tmp_path / "site_env").read_text() == site


# ----------------------------------------------------------------------------- 3. sbatch from another directory

FAKE_SCONTROL = """\
#!/bin/bash
# `scontrol show job` prints the job's record, one field group a line, Command= the submitted script's path
case "$1 $2" in
  "show hostnames") echo node1 ;;
  "show job") printf 'JobId=%s JobName=x\\n   UserId=u(1000) GroupId=g(1000)\\n   Command=%s\\n   WorkDir=%s\\n' \\
                "$3" "$FAKE_COMMAND" "$SLURM_SUBMIT_DIR" ;;
  *) echo "scontrol $*" >> {log} ;;
esac
"""


def _sbatch_run(tmp_path: Path, script: str, command: str | None, *, lock: bool = True, decoy: bool = False):
    """The build at <tmp>/repo/build/x; ``script`` (its path in the build) run as Slurm runs a batch script: a copy
    in a spool directory, from the submission directory <tmp>/repo (SLURM_SUBMIT_DIR), ``scontrol show job`` naming
    ``command`` (None: no Command= known). srun records its arguments (and LLMC_RUN_DIR) and succeeds."""
    repo = tmp_path / "repo"
    b = _fake_build(repo / "build", count=8)  # repo/build/b
    build = repo / "build" / "x"
    b.rename(build)
    if not lock:
        (build / "plan.lock.json").unlink()
    if decoy:  # the submission directory is another build (its lock)
        (repo / "plan.lock.json").write_text((build / "plan.lock.json").read_text())
    d, log = tmp_path / "bin", tmp_path / "calls.log"
    d.mkdir()
    _exe(d / "scontrol", FAKE_SCONTROL.format(log=str(log)))
    _exe(d / "srun", f'#!/bin/bash\necho "srun LLMC_RUN_DIR=${{LLMC_RUN_DIR:-}} $(printf "%q " "$@")" >> {log}\n')
    _exe(d / "scancel", "#!/bin/bash\nexit 0\n")
    spool = tmp_path / "spool" / "job04242"
    spool.mkdir(parents=True)
    (spool / "slurm_script").write_text((build / script).read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLMC_", "RUN_DIR"))}
    env.update(PATH=f"{d}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(repo),
               SLURM_JOB_NODELIST="node1", SLURM_NNODES="1", STAGE="base", FAKE_COMMAND=command or "")
    r = subprocess.run(["bash", str(spool / "slurm_script")], env=env, cwd=repo, capture_output=True, text=True,
                       timeout=120)
    calls = [shlex.split(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return r, calls, build.resolve(), repo


@pytest.mark.parametrize("command", [
    "build/x/launch/slurm.sbatch",  # `sbatch build/x/launch/slurm.sbatch` from the repository root
    "{repo}/build/x/launch/slurm.sbatch",  # an absolute path
    "{repo}/build/x/launch/slurm.sbatch --extra arg",  # a record that lists the script's arguments too
])
def test_slurm_sbatch_submitted_from_another_directory_finds_its_build(tmp_path, command):
    r, calls, build, repo = _sbatch_run(tmp_path, "launch/slurm.sbatch", command.format(repo=tmp_path / "repo"))
    assert r.returncode == 0, r.stderr
    locks = [c[c.index("--lock") + 1] for c in calls if "--lock" in c]
    assert locks and all(Path(x) == build / "plan.lock.json" for x in locks), calls
    assert not (repo / "run").exists() and (build / "run").is_dir()  # the run directory is the build's too


@pytest.mark.parametrize("script", ["launch/slurm.sbatch", "torchtitan/slurm.sbatch"])
def test_sbatch_runs_the_submitted_scripts_build_not_the_one_it_is_submitted_from(tmp_path, script):
    """`sbatch ../x/launch/slurm.sbatch` from inside another build: the job's record names the script, whose build
    runs (the working directory's lock came first before, running the other build's stages)."""
    r, calls, build, repo = _sbatch_run(tmp_path, script, f"build/x/{script}", decoy=True)
    assert r.returncode == 0, r.stderr
    if script.startswith("launch"):
        locks = [c[c.index("--lock") + 1] for c in calls if "--lock" in c]
        assert locks and all(Path(x) == build / "plan.lock.json" for x in locks), calls
    else:
        (srun,) = [c for c in calls if c[0] == "srun"]
        assert srun[1] == f"LLMC_RUN_DIR={build}", srun
    assert not (repo / "run").exists()


def test_torchtitan_sbatch_submitted_from_another_directory_finds_its_build(tmp_path):
    r, calls, build, _ = _sbatch_run(tmp_path, "torchtitan/slurm.sbatch", "build/x/torchtitan/slurm.sbatch")
    assert r.returncode == 0, r.stderr
    (srun,) = [c for c in calls if c[0] == "srun"]
    assert srun[1] == f"LLMC_RUN_DIR={build}", srun
    assert str(build / "torchtitan/run_multi_node.sh") in srun, srun


@pytest.mark.parametrize("script", ["launch/slurm.sbatch", "torchtitan/slurm.sbatch"])
@pytest.mark.parametrize("command, lock", [(None, True), ("build/x/{script}", False)])
def test_sbatch_without_a_build_to_find_fails_in_one_line_naming_both_places(tmp_path, script, command, lock):
    cmd = command.format(script=script) if command else None
    r, calls, build, repo = _sbatch_run(tmp_path, script, cmd, lock=lock)
    assert r.returncode != 0
    assert not [c for c in calls if c[0] == "srun"], calls  # nothing started
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(repo) in lines[0] and "plan.lock.json" in lines[0], lines
    assert (str(build) in lines[0]) if cmd else ("Command=" in lines[0]), lines
