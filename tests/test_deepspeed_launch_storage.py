"""deepspeed/launch.sh keeps the multi-node storage contract of launch/torchrun_multi_node.sh: everything the run
writes goes under LLMC_RUN_DIR (default: the build directory), RUN_DIR defaults to $LLMC_RUN_DIR/run, and with a
HOSTFILE of more than one host the hosts check, before prepare, that LLMC_RUN_DIR is one storage
(``python -m llmc.runtime.entry shared-check``, started on every host by the DeepSpeed launcher).

The hosts are fakes on this machine: a stand-in ``deepspeed`` that resolves the hosts and slots with DeepSpeed's own
code (deepspeed.launcher.runner: parse_args, fetch_hostfile, apply_num_nodes_and_gpus), and starts the real check
once per slot with the environment deepspeed/launcher/launch.py gives a rank (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), each host's output behind "<host>: " and the highest exit status, as pdsh -S. A host with
storage of its own (FAKE_NODE_LOCAL=1) sees the run dir's path on its own disk: the second host's check reads
"<dir>.<host>". The stages themselves only record their command lines.

Also here: the build warning X114 (Kubernetes /dev/shm) only for a spec that targets Kubernetes, and the reason for
ds_config's ``torch_adam`` in the file itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_fakes import compile_text, make_compiled, make_run
from test_launch_scripts import _exe, _fake_build
from test_multinode_stages import _free_ports

from llmc.emit import build_warnings, render_artifacts
from llmc.emit.deepspeed import DS_HEADER_KEY, deepspeed_config

# the stand-in for the DeepSpeed launcher (see the module docstring); it records every call in FAKE_LOG
FAKE_DEEPSPEED = """\
#!{python}
import json, os, subprocess, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["deepspeed", *sys.argv[1:]]) + "\\n")
if os.environ.get("FAKE_DS_EXIT"):  # a launcher that fails without the check's line
    print("pdsh@node1: node2: ssh exited with exit code 255", file=sys.stderr)
    sys.exit(int(os.environ["FAKE_DS_EXIT"]))
if "shared-check" not in sys.argv:
    sys.exit(0)  # a stage: recorded only (test_launch_scripts checks its command with DeepSpeed's parser)
from deepspeed.launcher import runner
args = runner.parse_args(sys.argv[1:])
assert args.module and args.user_script == "llmc.runtime.entry" and args.user_args[:1] == ["shared-check"], args
pool = runner.parse_inclusion_exclusion(runner.fetch_hostfile(args.hostfile), "", "")
active = runner.apply_num_nodes_and_gpus(pool, args.num_nodes, args.num_gpus)
world = sum(len(s) for s in active.values())
procs, rank = [], 0
for i, (host, slots) in enumerate(active.items()):
    for local in range(len(slots)):
        user = list(args.user_args)
        if i > 0 and os.environ.get("FAKE_NODE_LOCAL") and "--dir" in user:
            k = user.index("--dir") + 1
            user[k] = user[k] + "." + host  # the same path, another disk
            os.makedirs(user[k], exist_ok=True)
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port))
        cmd = [sys.executable, "-u", "-m", args.user_script, *user]
        if not args.no_local_rank:
            cmd.append(f"--local_rank={{local}}")
        procs.append((host, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True)))
        rank += 1
rc = 0
for host, p in procs:
    out, _ = p.communicate(timeout=150)
    for line in out.splitlines():
        print(f"{{host}}: {{line}}")
    rc = max(rc, p.returncode)
sys.exit(rc)
"""
# the check's line (llmc.runtime.entry.shared_check), written out here
NOT_SHARED = re.compile(r"^error: LLMC_RUN_DIR=(\S+) is not shared by the nodes: .* not see the file .* wrote; "
                        r"put it on storage every node mounts", re.M)


def _tree(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A 2-node build (16 GPUs, 8 per node; stages base, chat, align) with its fakes in <tmp>/bin."""
    tmp = tmp_path_factory.mktemp("dsl")
    b = _fake_build(tmp, count=16)
    d = tmp / "bin"
    d.mkdir()
    _exe(d / "deepspeed", FAKE_DEEPSPEED.format(python=sys.executable))
    for name in ("python", "torchrun"):  # prepare, the lock checks, one node's stages: recorded only
        _exe(d / name, f'#!{sys.executable}\nimport json, os, sys\n'
                       f'open(os.environ["FAKE_LOG"], "a").write(json.dumps(["{name}", *sys.argv[1:]]) + "\\n")\n')
    return b


def _launch(build: Path, tmp_path: Path, hosts: int | None, **env_over: str):
    """deepspeed/launch.sh of ``build`` with a HOSTFILE of ``hosts`` hosts (None: none); (the run, its calls)."""
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_DIR", "LLMC_RUN_DIR", "DS_ENV_FILE", "HOSTFILE")}
    env.update(PATH=f"{build.parent / 'bin'}:{os.environ['PATH']}", FAKE_LOG=str(log), HOME=str(tmp_path),
               DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_ports(1)),
               LLMC_SHARED_CHECK_S="60", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"), **env_over)
    if hosts is not None:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"node{i + 1} slots=8\n" for i in range(hosts)))
        env["HOSTFILE"] = str(hostfile)
    r = subprocess.run(["bash", str(build / "deepspeed/launch.sh")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    calls = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def _check_calls(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[0] == "deepspeed" and "shared-check" in c]


def _stage_calls(calls: list[list[str]]) -> dict[str, list[str]]:
    return {c[c.index("--stage") + 1]: c for c in calls if "--stage" in c}


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.slow
def test_a_run_dir_the_hosts_do_not_share_stops_before_prepare(build, tmp_path):
    """Two hosts, each with its own disk at LLMC_RUN_DIR's path: the real check (one process per host, started by
    the DeepSpeed launcher as DeepSpeed's own parser reads the command) fails, and the script stops with its one
    line before prepare and before any stage."""
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import parse_args

    shared = tmp_path / "shared"
    before = _tree(build)
    r, calls = _launch(build, tmp_path, 2, LLMC_RUN_DIR=str(shared), FAKE_NODE_LOCAL="1")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    m = NOT_SHARED.search(r.stderr)
    assert m and Path(m.group(1)) == shared.resolve(), r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith(m.group(0))  # the script's last line
    assert "Traceback" not in r.stderr
    (check,) = _check_calls(calls)
    a = parse_args(check[1:])
    assert a.hostfile == str(tmp_path / "hostfile") and a.num_nodes == 2 and a.num_gpus == 1
    assert a.module and a.no_local_rank and a.user_script == "llmc.runtime.entry"
    assert a.user_args == ["shared-check", "--dir", str(shared.resolve())]
    assert calls == [check]  # no prepare, no stage
    assert not list(shared.glob(".llmc-shared-check*"))  # the check's own file is gone
    assert _tree(build) == before


@pytest.mark.slow
def test_a_shared_run_dir_holds_prepare_and_every_stage(build, tmp_path):
    """The reviewer's run: HOSTFILE of two hosts and LLMC_RUN_DIR, RUN_DIR unset. The check passes (one storage), then
    prepare writes its assets there and every stage's output goes to $LLMC_RUN_DIR/run/<stage>; the build directory
    is only read."""
    pytest.importorskip("deepspeed")
    shared = tmp_path / "shared"
    before = _tree(build)
    r, calls = _launch(build, tmp_path, 2, LLMC_RUN_DIR=str(shared))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = shared.resolve() / "run"
    assert run.is_dir()
    (check,) = _check_calls(calls)
    prepare = [c for c in calls if c[:4] == ["python", "-m", "llmc.runtime.entry", "prepare"]]
    assert len(prepare) == 1 and _opt(prepare[0], "--assets") == str(shared.resolve())
    assert calls.index(check) < calls.index(prepare[0]) < min(calls.index(c) for c in _stage_calls(calls).values())
    stages = _stage_calls(calls)
    assert set(stages) == {"base", "chat", "align"}, calls
    for name, argv in stages.items():
        assert argv[0] == "deepspeed", argv
        assert _opt(argv, "--out") == str(run / name) and _opt(argv, "--assets") == str(shared.resolve())
    assert not list(shared.glob(".llmc-shared-check*"))
    assert _tree(build) == before  # (stage logs would be files under build/run)


def test_one_host_runs_no_check_and_defaults_to_the_build_directory(build, tmp_path):
    """Without LLMC_RUN_DIR the run dir is the build directory's run/ (as before); a HOSTFILE of one host (or none)
    needs no check."""
    for hosts in (None, 1):
        log = tmp_path / "calls.jsonl"
        log.unlink(missing_ok=True)
        r, calls = _launch(build, tmp_path, hosts)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not _check_calls(calls), calls
        (prepare,) = [c for c in calls if "prepare" in c]
        assert _opt(prepare, "--assets") == str(build.resolve())
        for name, argv in _stage_calls(calls).items():
            assert _opt(argv, "--out") == str(build.resolve() / "run" / name), argv


def test_a_check_that_cannot_finish_names_its_saved_output(build, tmp_path):
    """A launcher that fails without the check's line (a host unreachable over ssh): one line naming the exit
    status and the file that keeps the launcher's output, under RUN_DIR."""
    shared = tmp_path / "shared"
    r, calls = _launch(build, tmp_path, 2, LLMC_RUN_DIR=str(shared), FAKE_DS_EXIT="255")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    log = shared.resolve() / "run" / "shared-check.log"
    assert last == (f"error: the check that LLMC_RUN_DIR={shared.resolve()} is shared by the nodes did not finish "
                    f"(deepspeed exit 255); its output: {log}"), r.stderr
    assert "ssh exited with exit code 255" in log.read_text()
    assert [c[0] for c in calls] == ["deepspeed"]  # no prepare, no stage


def test_header_usage_names_every_variable_the_script_reads(build):
    """The header's Env list is every variable the script reads with a default (${VAR:-...}) or requires, bar the
    internal ones."""
    text = (build / "deepspeed/launch.sh").read_text()
    env_line = re.search(r"^# Env: (.*)$", text, re.M).group(1)
    listed = set(re.findall(r"[A-Z_]+", env_line))
    read = set(re.findall(r'\$\{([A-Z_]+):-', text))
    internal = {"PYTHONPATH", "TMPDIR", "PREEMPTED", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "DS_ENV_FILE", "HOSTNAME",
                "CLAIM_STALE_S"}
    assert {"LLMC_RUN_DIR", "RUN_DIR", "HOSTFILE"} <= listed
    assert read - internal <= listed, sorted(read - internal - listed)


# ------------------------------------------------------------------------------------------- X114, torch_adam

MULTI_NODE = """\
name: mn
model: llama3-8b
hardware: {{gpu: h100-sxm, count: 16}}
data: {{seq_len: 4096, tokens: 10B}}
{cluster}"""


@pytest.mark.parametrize("cluster,warns", [
    ("", False),  # no cluster section: the manifest is written with defaults, no build warning
    ("cluster: {env: {NCCL_DEBUG: WARN}}\n", False),  # a site, but not Kubernetes
    ("cluster: {kubernetes: {namespace: ml}}\n", True),  # Kubernetes without shm_gib
    ("cluster: {kubernetes: {namespace: ml, shm_gib: 16}}\n", False),
])
def test_x114_only_for_a_spec_that_targets_kubernetes(cluster, warns):
    c = compile_text(MULTI_NODE.format(cluster=cluster))
    codes = [d.code for d in build_warnings(c)]
    assert ("X114" in codes) == warns, codes
    files = render_artifacts(c)
    assert "X114" not in files["deepspeed/launch.sh"]  # a Kubernetes pod setting: not this launcher's
    if "shm_gib" not in cluster:  # the manifest itself says /dev/shm is the container's
        assert "# /dev/shm is the container's own (64 MiB" in files["kubeflow/trainjob.yaml"]


def test_ds_config_says_why_torch_adam():
    """ds_config.json carries the reason for "torch_adam": true in its "_llmc" header (a key ds_train drops before
    DeepSpeed reads the config, so no X105); with optimizer offload DeepSpeedCPUAdam runs and there is no note."""
    cfg, diags = deepspeed_config(make_compiled())
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    note = cfg[DS_HEADER_KEY]["torch_adam"]
    assert "FusedAdam" in note and "torch.optim.AdamW" in note
    assert "X105" not in {d.code for d in diags}
    off, _ = deepspeed_config(make_compiled(make_run(parallelism={"zero_stage": 2, "offload_optimizer": True})))
    assert "torch_adam" not in off["optimizer"]["params"] and "torch_adam" not in off[DS_HEADER_KEY]
