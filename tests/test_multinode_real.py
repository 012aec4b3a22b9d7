"""launch/torchrun_multi_node.sh for real: two "nodes" (two copies of the script, one process each) rendezvous
through torchrun's c10d backend on one machine (CPU, gloo) and train one stage of world size 2.

The reference is the same build run on one node with two processes (``NNODES=1 NPROC=2``): torchrun hands the
two-node job the same RANK / WORLD_SIZE, so every step's loss, gradient norm and learning rate must be the same
numbers. One node is then stopped as a cluster stops a node (SIGTERM to its process group: the script, torchrun and
its worker); llmc's trainers agree on the stop at a step boundary (``llmc.runtime.preempt``), so the other node's
worker too saves the step and exits 75, which torchrun reports as a failure of its own (exit 1, with the worker's
status in its ChildFailedError report). Relaunching both nodes resumes from that checkpoint and ends with the
reference's numbers: no step lost or repeated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_build_fakes import compile_text

from llmc.buildfs import write_build
from llmc.emit import render_artifacts
from llmc.runtime.runlock import EXIT_PREEMPTED

STEPS = 8
SPEC = f"""\
name: mn
model: tiny
hardware: {{gpu: cpu, count: 2}}
data:
  sources: [{{name: python-docs, format: builtin}}]
  tokenizer: {{train: true, vocab_size: 2048}}
  seq_len: 64
  tokens: {STEPS * 2048}
training:
  precision: fp32
  global_batch_tokens: 2048
  optimizer: {{lr: 3.0e-3}}
  checkpoint: {{interval_steps: 4}}
  log_every: 1
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(build: Path, run: Path, nnodes: int, nproc: int, port: int, log: Path, name: str = "") -> subprocess.Popen:
    """One node: the emitted script in its own session (so its process group can be signalled as a node's is);
    ``name``, its LOG_NODE (the "nodes" share this machine's host name)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NNODES": str(nnodes), "NPROC": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RUN_DIR": str(run), "BACKEND": "native", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "CLAIM_POLL_S": "1",
           "LOG_NODE": name}
    return subprocess.Popen(["bash", str(build / "launch/torchrun_multi_node.sh")], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _steps(metrics: Path) -> dict[int, tuple]:
    """step -> (loss, grad_norm, lr) of each training step record, and the number of records per step."""
    out: dict[int, tuple] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            assert r["step"] not in out, f"step {r['step']} recorded twice"
            out[r["step"]] = (r["loss"], r["grad_norm"], r["lr"])
    return out


def _last_step(metrics: Path) -> int:
    try:
        return max((json.loads(ln).get("step") or 0 for ln in metrics.read_text().splitlines()), default=0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_two_nodes_match_one_node_and_resume_after_a_node_is_stopped(tmp_path):
    b = tmp_path / "b"
    (tmp_path / "spec.yaml").write_text(SPEC)
    c = compile_text(SPEC, str(tmp_path / "spec.yaml"))
    assert c.plan.dp_shard * c.plan.dp_replicate * c.plan.tp * c.plan.pp * c.plan.cp == 2
    write_build(b, render_artifacts(c))

    # the reference: one node, two processes
    ref = _node(b, tmp_path / "ref", 1, 2, _free_port(), tmp_path / "ref.log")
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    want = _steps(tmp_path / "ref" / "pretrain" / "metrics.jsonl")
    assert sorted(want) == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (tmp_path / "ref" / "pretrain").glob("stderr*")) == ["stderr.log"]  # one node

    # two nodes; node 0 is stopped (its whole process group) once a few steps are done
    run, port = tmp_path / "run", _free_port()
    metrics = run / "pretrain" / "metrics.jsonl"
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [_node(b, run, 2, 1, port, logs[i], f"n{i}") for i in range(2)]
    deadline = time.monotonic() + 180
    while _last_step(metrics) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), \
            [f.read_text()[-2000:] for f in logs]
        time.sleep(0.1)
    os.killpg(nodes[0].pid, signal.SIGTERM)
    rcs = [p.wait(timeout=120) for p in nodes]
    texts = [f.read_text() for f in logs]
    assert rcs[0] == -signal.SIGTERM, texts[0][-3000:]  # the script itself died of the signal
    # the other node's worker saved the step and left as preempted: the script says so (and how to resume), not
    # that the stage failed
    assert rcs[1] == EXIT_PREEMPTED, texts[1][-3000:]
    last = texts[1].strip().splitlines()[-1]
    assert last.startswith("stage pretrain: stopped by a signal after saving its current step"), last
    # each node appended its stage output to its own log (the shared file of a shared filesystem can lose lines),
    # the one its last line names: every line of it is one this node showed, and only node 1's holds the failure
    # report of its own torchrun (torch/distributed/elastic/multiprocessing/errors/__init__.py), whose worker left
    # with the preempted status; node 0's torchrun was stopped by the signal, and reports no worker's exit
    stage_logs = [run / "pretrain" / f"stderr.n{i}.log" for i in range(2)]
    assert sorted(p.name for p in (run / "pretrain").glob("stderr*")) == [p.name for p in stage_logs]
    assert last.endswith(f"full log: {stage_logs[1]})"), last
    own = [p.read_text().splitlines() for p in stage_logs]
    for i in range(2):
        shown = set(texts[i].splitlines())
        assert own[i] and all(ln in shown for ln in own[i]), (i, [ln for ln in own[i] if ln not in shown][:5])
    # torchrun's own log lines carry its process id ("W1205 22:44:30.093000 <pid> <file>:<line>] ..."): a
    # node's processes only in its own log
    pids = [{m.group(1) for ln in lines if (m := re.match(r"[DIWEF]\d{4} [\d:.]+ (\d+) ", ln))} for lines in own]
    assert pids[0] and pids[1] and not pids[0] & pids[1], pids
    report = [ln.split(":", 1)[1].split()[0] for ln in own[1] if ln.strip().startswith("exitcode")]
    assert report and set(report) == {str(EXIT_PREEMPTED)}, own[1][-20:]
    assert not any(ln.strip().startswith("exitcode") for ln in own[0]), own[0][-20:]
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["status"] == "preempted" and 3 <= end["step"] < STEPS, end
    assert not (run / "pretrain" / "DONE.json").exists()

    # both nodes again: the stage resumes from the saved step and ends as the one-node run did
    nodes = [_node(b, run, 2, 1, port, logs[i], f"n{i}") for i in range(2)]
    rcs = [p.wait(timeout=240) for p in nodes]
    assert rcs == [0, 0], [f.read_text()[-3000:] for f in logs]
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == end["step"], resumes
    got: dict[int, tuple] = {}
    for r in records:
        if r.get("event") == "resume":
            got = {k: v for k, v in got.items() if k <= r["step"]}
        elif "loss" in r and "step" in r:
            got[r["step"]] = (r["loss"], r["grad_norm"], r["lr"])
    assert got == want
    done = json.loads((run / "pretrain" / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == STEPS and done["loss"] == pytest.approx(want[STEPS][0])
    assert not list(run.rglob("*.claim")) and not list(run.rglob("*.tmp*"))
