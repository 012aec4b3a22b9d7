"""launch/torchrun_multi_node.sh across a stage boundary: two "nodes" (two copies of the script, one process each,
CPU, gloo) run a two-stage build (pretrain, then sft from it), and the node that hosts the c10d store is still
shutting its first stage's torchrun down when the other node starts its second stage.

torchrun's elastic agent (torch/distributed/elastic/agent/server/api.py) waits at an exit barrier until every
node's workers have finished, then stops its worker group (``LocalElasticAgent._shutdown``) and closes the
rendezvous (torch/distributed/launcher/api.py ``launch_agent``: ``rdzv_handler.shutdown()``); the store lives in
the first node's agent process until it exits. A node whose own agent returned runs the next stage at once. With
one rendezvous id and port for every stage, its new agent reaches the old store, finds the rendezvous closed and
fails (``RendezvousClosedError``: dynamic_rendezvous.py ``_RendezvousJoinOp``), while the first node then waits
for it in the next stage's rendezvous until the join timeout.

The test makes that window wide instead of racing for it: node 0's torchrun is torch's own ``torchrun`` entry
point (``torch.distributed.run.main``) run in-process by a wrapper that sleeps for a few seconds at the start of
the first stage's ``LocalElasticAgent._shutdown`` (the store stays up for as long as the agent process lives;
a wrapper around the torchrun *process* that delays its exit would not keep it; the last stage's teardown, with
no next stage to race, is not slowed). Node 1 is a second machine as torchrun sees one: its wrapper passes
``--rdzv_conf is_host=false`` (on another host ``_matches_machine_hostname(MASTER_ADDR)`` is false,
c10d_rendezvous_backend.py ``_create_tcp_store``), so it never hosts a store and connects to node 0's. Both
wrappers record when each of their torchruns started and when node 0's teardown began and ended, so the test
checks that node 1's second stage really started inside node 0's first-stage teardown. Expected (torch's
rendezvous semantics): both nodes finish both stages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_fakes import compile_text

from llmc.buildfs import write_build
from llmc.emit import render_artifacts

TEARDOWN_S = 10  # node 0's first-stage agent outlives node 1's by this much (well under c10d's 60 s connect timeout)
SPEC = """\
name: mns
model: tiny
hardware: {gpu: cpu, count: 2}
data:
  sources: [{name: python-docs, format: builtin}]
  tokenizer: {train: true, vocab_size: 2048, chat_template: llama3}
  seq_len: 64
  tokens: 8192
training:
  precision: fp32
  global_batch_tokens: 2048
  optimizer: {lr: 3.0e-3}
  checkpoint: {interval_steps: 4}
  log_every: 1
stages:
  - {name: pretrain, kind: pretrain}
  - name: sft
    kind: sft
    init_from: pretrain
    lr: 2.0e-3
    steps: 2
    global_batch_tokens: 1024
    data:
      sources: [{name: synthetic-chat, format: builtin, kind: chat}]
      seq_len: 64
      tokens: 20K
"""

# torchrun, as its console script runs it, plus the trace and the node's part (see the module docstring)
WRAPPER = """\
#!{python}
import json, os, sys, time
trace = os.environ["TORCHRUN_TRACE"]
stage = sys.argv[sys.argv.index("--stage") + 1] if "--stage" in sys.argv else "?"
def note(event):
    with open(trace, "a") as f:
        f.write(json.dumps({{"event": event, "stage": stage, "t": time.time()}}) + "\\n")
note("start")
if os.environ.get("NOT_HOST") == "1":
    sys.argv[1:1] = ["--rdzv_conf", "is_host=false"]
delay = float(os.environ.get("AGENT_TEARDOWN_S", "0"))
if delay and stage == os.environ.get("AGENT_TEARDOWN_STAGE"):
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    shutdown = LocalElasticAgent._shutdown
    def slow_shutdown(self, *args, **kwargs):
        note("teardown")
        time.sleep(delay)
        note("torn down")
        return shutdown(self, *args, **kwargs)
    LocalElasticAgent._shutdown = slow_shutdown
from torch.distributed.run import main
sys.exit(main())
"""


def _free_ports(n: int) -> int:
    """A port p with p .. p + n - 1 free on 127.0.0.1 (one rendezvous port per stage)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n > 65535:
            continue
        try:
            socks = []
            for q in range(p, p + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _node(build: Path, run: Path, port: int, bindir: Path, log: Path, **extra: str) -> subprocess.Popen:
    """One node: the emitted script in its own session, its torchrun the wrapper in ``bindir``."""
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RUN_DIR": str(run), "BACKEND": "native", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "CLAIM_POLL_S": "1", **extra}
    return subprocess.Popen(["bash", str(build / "launch/torchrun_multi_node.sh")], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _trace(path: Path) -> dict[tuple[str, str], float]:
    return {(r["event"], r["stage"]): r["t"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_a_node_starting_the_next_stage_while_the_store_host_tears_down_the_last_one(tmp_path):
    b = tmp_path / "b"
    (tmp_path / "spec.yaml").write_text(SPEC)
    c = compile_text(SPEC, str(tmp_path / "spec.yaml"))
    assert [s.name for s in c.stages] == ["pretrain", "sft"]
    write_build(b, render_artifacts(c))

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "torchrun").write_text(WRAPPER.format(python=sys.executable))
    (bindir / "torchrun").chmod(0o755)
    run, port = tmp_path / "run", _free_ports(2)
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    traces = [tmp_path / f"node{i}.trace" for i in range(2)]
    nodes = [_node(b, run, port, bindir, logs[0], TORCHRUN_TRACE=str(traces[0]), AGENT_TEARDOWN_S=str(TEARDOWN_S),
                   AGENT_TEARDOWN_STAGE="pretrain"),
             _node(b, run, port, bindir, logs[1], TORCHRUN_TRACE=str(traces[1]), NOT_HOST="1")]
    try:
        rc1 = nodes[1].wait(timeout=400)
        texts = [f.read_text() for f in logs]
        # on a failure node 0 would wait in the second stage's rendezvous until its join timeout (600 s)
        assert rc1 == 0, texts[1][-3000:]
        assert nodes[0].wait(timeout=120) == 0, logs[0].read_text()[-3000:]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    # the window was there: node 1's second stage began while node 0's first-stage agent (the store) was still up
    t0, t1 = _trace(traces[0]), _trace(traces[1])
    assert t0[("teardown", "pretrain")] < t1[("start", "sft")] < t0[("torn down", "pretrain")], (t0, t1)
    for stage in ("pretrain", "sft"):
        done = json.loads((run / stage / "DONE.json").read_text())
        assert done["status"] == "done", done
    assert not list(run.rglob("*.claim"))
