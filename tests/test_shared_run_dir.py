"""One run directory for a multi-node run (``LLMC_RUN_DIR``), checked to be shared, and a failed prepare that stops
every node: launch/torchrun_multi_node.sh for real, two "nodes" on this machine (CPU, gloo, one process each), each
with its own copy of the build, as pods of one image or nodes that each synced the build to their own disk.

- Each node with its own LLMC_RUN_DIR (storage the nodes do not share): both stop before prepare with the start-up
  check's one line (``python -m llmc.runtime.entry shared-check``), nothing trained.
- One LLMC_RUN_DIR for both: the run finishes, and everything it wrote (prepare's assets/ and data/, the stage's
  checkpoints, metrics and logs) is under LLMC_RUN_DIR; neither copy of the build changed.
- A prepare that fails (a data file missing where it runs): the node that ran it records it, and the node that waited
  for it stops with a line naming that node's output, instead of waiting in the stage's rendezvous.

Cluster manifests: the Kubeflow TrainJob mounts a ReadWriteMany claim as LLMC_RUN_DIR in the runtime's trainer
container (validated by the Kubeflow Trainer API models and the published CRD schema); the SkyPilot task takes llmc
from no package index by default and needs LLMC_RUN_DIR given (validated by SkyPilot's own loader).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_build_fakes import compile_text
from test_cluster_manifests import _sky_python, closed
from test_multinode_stages import _free_ports
from test_multinode_stages import _node as stages_node
from test_safety_e2e import cli

from llmc.buildfs import write_build
from llmc.emit import kubeflow, render_artifacts, skypilot

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 4, 2048
SPEC = f"""\
name: srd
model: tiny
hardware: {{gpu: cpu, count: 2}}
data:
  sources: [{{name: python-docs, format: builtin}}{{extra}}]
  tokenizer: {{train: true, vocab_size: 2048}}
  seq_len: 64
  tokens: {STEPS * BATCH}
training:
  precision: fp32
  global_batch_tokens: {BATCH}
  optimizer: {{lr: 3.0e-3}}
  checkpoint: {{interval_steps: 2}}
  log_every: 1
"""
# the shared-check's line (llmc.runtime.entry.shared_check), written out here
NOT_SHARED = re.compile(r"^error: LLMC_RUN_DIR=(\S+) is not shared by the nodes: .* not see the file .* wrote; "
                        r"put it on storage every node mounts", re.M)
# a stand-in for `python` that holds prepare a few seconds, so that the other node surely waits on its claim
SLOW_PREPARE = """#!/bin/sh
case " $* " in *" llmc.runtime.entry prepare "*) sleep 6 ;; esac
exec {python} "$@"
"""


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``d``: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two copies of a 2-rank CPU build (one per "node"), and two of one whose second source is a file that
    exists when it is built and is gone when it runs."""
    d = tmp_path_factory.mktemp("builds")
    out = {}
    gone = d / "gone" / "web.jsonl"
    gone.parent.mkdir()
    gone.write_text('{"text": "a document"}\n')
    for name, extra in (("ok", ""), ("bad", f", {{name: web, format: jsonl, path: {gone}}}")):
        text = SPEC.replace("{extra}", extra)
        (d / f"{name}.yaml").write_text(text)
        c = compile_text(text, str(d / f"{name}.yaml"))
        assert c.plan.dp_shard * c.plan.dp_replicate * c.plan.tp * c.plan.pp * c.plan.cp == 2
        files = render_artifacts(c)
        out[name] = [d / f"{name}{i}" for i in range(2)]
        for b in out[name]:
            write_build(b, files)
    shutil.rmtree(gone.parent)
    bindir = d / "bin"
    bindir.mkdir()
    (bindir / "python").write_text(SLOW_PREPARE.format(python=sys.executable))
    (bindir / "python").chmod(0o755)
    out["bin"] = bindir
    return out


def _run(builds: list[Path], run_dirs: list[Path], bindir: Path, logs: list[Path], timeout: float,
         **extra: str) -> tuple[list[int], list[str]]:
    """Both nodes' launchers (each its own build copy and LLMC_RUN_DIR; RUN_DIR left to its default); their exit
    statuses and outputs, every process killed by ``timeout`` s (a hang fails the test, it does not stall it)."""
    port = _free_ports(2)  # the stage's rendezvous and the check's
    nodes = [stages_node(builds[i], Path(), port, bindir, logs[i], RUN_DIR="", LLMC_RUN_DIR=str(run_dirs[i]),
                         LOG_NODE=f"n{i}", BACKEND="native", **extra) for i in range(2)]
    deadline = time.monotonic() + timeout
    try:
        rcs = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return rcs, [f.read_text() for f in logs]


@pytest.mark.slow
def test_run_dirs_the_nodes_do_not_share_stop_both_before_prepare(builds, tmp_path):
    runs = [tmp_path / f"run{i}" for i in range(2)]
    before = [_tree(b) for b in builds["ok"]]
    t0 = time.monotonic()
    rcs, texts = _run(builds["ok"], runs, Path(sys.executable).parent, [tmp_path / f"n{i}.log" for i in range(2)], 150)
    assert rcs == [1, 1], [t[-3000:] for t in texts]
    assert time.monotonic() - t0 < 120
    for i, text in enumerate(texts):
        m = NOT_SHARED.search(text)
        assert m and Path(m.group(1)) == runs[i].resolve(), text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    for r in runs:  # neither node prepared nor trained
        assert not (r / "assets").exists() and not (r / "run" / "pretrain").exists(), sorted(r.rglob("*"))
        assert not list(r.glob(".llmc-shared-check*"))  # the check's own file is gone
    assert [_tree(b) for b in builds["ok"]] == before


@pytest.mark.slow
def test_one_shared_run_dir_holds_everything_the_run_writes(builds, tmp_path):
    shared = tmp_path / "shared"
    before = [_tree(b) for b in builds["ok"]]
    rcs, texts = _run(builds["ok"], [shared, shared], Path(sys.executable).parent,
                      [tmp_path / f"n{i}.log" for i in range(2)], 400)
    assert rcs == [0, 0], [t[-3000:] for t in texts]
    # prepare's output, the stage's checkpoints, metrics and logs: under LLMC_RUN_DIR
    assert (shared / "assets" / "tokenizer.json").is_file() and (shared / "data" / "python-docs.jsonl").is_file()
    stage = shared / "run" / "pretrain"
    done = json.loads((stage / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == STEPS  # tokens / global_batch_tokens, as the spec says
    ckpts = [p for p in stage.rglob("*") if p.is_file() and "checkpoint" in str(p.relative_to(stage))]
    assert ckpts, sorted(stage.rglob("*"))
    steps = [json.loads(ln)["step"] for ln in (stage / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in stage.glob("stderr*")) == ["stderr.n0.log", "stderr.n1.log"]
    assert not list(shared.rglob("*.claim")) and not list(shared.glob(".llmc-shared-check*"))
    # the build copies were only read
    assert [_tree(b) for b in builds["ok"]] == before


@pytest.mark.slow
def test_a_failed_prepare_stops_the_node_that_waited_for_it(builds, tmp_path):
    shared = tmp_path / "shared"
    rcs, texts = _run(builds["bad"], [shared, shared], builds["bin"], [tmp_path / f"n{i}.log" for i in range(2)], 150)
    assert all(rc not in (0, None) for rc in rcs), [t[-3000:] for t in texts]
    # one node prepared (and failed: the data file is gone), the other waited for it and stops with its line
    waited = [i for i, t in enumerate(texts) if "(this node waited for it, and stops)" in t]
    assert len(waited) == 1, [t[-3000:] for t in texts]
    w = waited[0]
    line = next(ln for ln in texts[w].splitlines() if ln.endswith("(this node waited for it, and stops)"))
    m = re.match(r"error: prepare failed on \S+ \(exit (\d+)\); its output: (\S+) \(this node", line)
    assert m and int(m.group(1)) == rcs[1 - w] != 0, line
    log = Path(m.group(2))
    assert log == shared / "run" / f"prepare.n{1 - w}.log"
    assert "web.jsonl" in log.read_text(), log.read_text()[-2000:]  # the failed node's own output, naming the file
    assert not (shared / "run" / "pretrain").exists() and not list(shared.rglob("*.claim"))


# --------------------------------------------------------------------------------------------- cluster manifests
@pytest.fixture(scope="module")
def gpu_lock(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("gpu")
    r = cli("build", str(ROOT / "examples/llama3_70b_h100x64.yaml"), "-o", str(d))
    assert r.returncode == 0, r.stderr
    return json.loads((d / "plan.lock.json").read_text())


# the container of the torch-distributed runtime's replicated job "node" (kubeflow/trainer,
# manifests/base/runtimes/torch_distributed.yaml), written out here
RUNTIME_CONTAINER = "node"


def test_trainjob_mounts_a_shared_claim_as_the_run_dir(gpu_lock):
    api = pytest.importorskip("kubeflow_trainer_api.models")
    jsonschema = pytest.importorskip("jsonschema")
    text = kubeflow.files(gpu_lock)["kubeflow/trainjob.yaml"]
    doc = yaml.safe_load(text)
    job = api.TrainerV1alpha1TrainJob.from_dict(doc)
    assert job.to_dict() == doc  # every field is part of the API (the models drop unknown ones)
    jsonschema.validate(doc, closed(json.loads((ROOT / "tests/fixtures/cluster/"
                                                "kubeflow-trainer-2.3.0-trainjob-v1alpha1.json").read_text())
                                    ["openAPIV3Schema"]))
    env = {e.name: e.value for e in job.spec.trainer.env}
    run_dir = env["LLMC_RUN_DIR"]
    pod = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0]
    assert pod.name == "node"
    spec = pod.template.spec.template.spec
    assert spec.termination_grace_period_seconds > 0  # the same patch as before
    [vol] = spec.volumes
    assert vol.persistent_volume_claim.claim_name == f"{job.metadata.name}-run"
    [container] = spec.containers
    assert container.name == RUNTIME_CONTAINER
    [mount] = container.volume_mounts
    assert mount.name == vol.name and mount.mount_path == run_dir and not mount.read_only
    # the image is no name a registry could serve (RFC 2606 reserves .invalid), and the header says what to set
    assert doc["spec"]["trainer"]["image"].split("/")[0].endswith(".invalid")
    head = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    assert "trainer.image" in head and "ReadWriteMany" in head and f"{job.metadata.name}-run" in head


# SkyPilot's own loader, once for each set of --env values the user gives (none: the task as written)
SKY_ENV_LOAD = """
import json, sys, yaml, sky
out = []
for envs in json.loads(sys.argv[2]):
    try:
        task = sky.Task.from_yaml_config(yaml.safe_load(open(sys.argv[1])), env_overrides=list(envs.items()) or None)
    except ValueError as e:
        out.append({"refused": str(e)})
    else:
        out.append({"envs": task.envs, "run": task.run})
print(json.dumps(out))
"""


def test_skypilot_task_takes_no_package_index_default_and_needs_the_run_dir(gpu_lock, tmp_path):
    text = skypilot.files(gpu_lock)["skypilot/task.yaml"]
    doc = yaml.safe_load(text)
    envs = doc["envs"]
    # PyPI's "llmc" is another project: no default a pip install could resolve there; no default run folder either
    assert envs["LLMC_PACKAGE"] is None and envs["LLMC_RUN_DIR"] is None, envs
    assert "import llmc.runtime" in doc["setup"]
    # given empty, setup and run refuse them with one line each (setup before any pip install)
    for script, var in ((doc["setup"], "LLMC_PACKAGE"), (doc["run"], "LLMC_RUN_DIR")):
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), var: ""})
        assert out.returncode != 0 and var in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert not out.stdout, out.stdout
    py = _sky_python()
    if py is None:
        pytest.skip("skypilot is not installed here (scripts/setup.sh puts it in .venv-sky)")
    (tmp_path / "task.yaml").write_text(text)

    def load(*envs: dict) -> list[dict]:
        """The task loaded with each of ``envs`` (one process: SkyPilot is imported once)."""
        out = subprocess.run([py, "-c", SKY_ENV_LOAD, str(tmp_path / "task.yaml"), json.dumps(envs)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    given = {"LLMC_PACKAGE": "git+https://example.invalid/llmc.git", "LLMC_RUN_DIR": "/mnt/run"}
    bare, task = load({}, given)
    assert "LLMC_PACKAGE" in bare.get("refused", "")  # SkyPilot asks for it: --env
    assert {k: task["envs"][k] for k in given} == given and "launch/torchrun_multi_node.sh" in task["run"]
