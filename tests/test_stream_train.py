"""The native trainer streams its sources in place: a local parquet file and a local Hugging Face
``datasets`` dataset (``save_to_disk``), 2 gloo processes (FSDP2), tiny model.

Checked: each rank reads only its own documents (every document any rank read is logged by a wrapper around
the readers; the two ranks' sets are disjoint), nothing is copied before step 1 (no ``data/`` or token
cache, and only a small fraction of the documents is ever read), and a run killed with SIGKILL then resumed
logs the same losses as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pa = pytest.importorskip("pyarrow")
datasets = pytest.importorskip("datasets")

import pyarrow.parquet as pq  # noqa: E402
from test_build_fakes import lock_for  # noqa: E402

from llmc.runtime import corpus  # noqa: E402

pytestmark = pytest.mark.slow  # multi-process runs

ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)
N_DOCS = 800  # per source

RUNNER = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from llmc.runtime import stream
from llmc.runtime.distributed import init_distributed, shutdown
from llmc.runtime.entry import _prepare_collective, _stage_assets
from llmc.runtime.job import TrainJob
from llmc.runtime.train import train

# the lock, then one or more output folders: the runs of one launch, one after another in its process group
lock_path, outs = Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]]
job = TrainJob.from_lock(json.loads(lock_path.read_text()))
assets = _stage_assets(job, _prepare_collective(job, lock_path.parent))
info = init_distributed()
if info.rank == 0:
    dist.barrier()
seen = {}

def logged(reader):
    def wrapped(src, rank, world, start):
        for doc in reader(src, rank, world, start):
            seen["file"].write(json.dumps(doc.split(":", 1)[0]) + "\\n")
            seen["file"].flush()
            yield doc
    return wrapped

for fmt in ("parquet", "hf"):
    stream._READERS[fmt] = logged(stream._READERS[fmt])
for out in outs:
    seen["file"] = open(out.parent / f"seen-{out.name}-rank{info.rank}.txt", "a", encoding="utf-8")
    train(job, out, assets, info=info)
    seen["file"].close()
shutdown()
"""


def _texts(prefix: str) -> list[str]:
    base = [json.loads(x)["text"] for x in corpus_lines()]
    return [f"{prefix}{i}: {base[i % len(base)]}" for i in range(N_DOCS)]


_LINES: list[str] = []


def corpus_lines() -> list[str]:
    if not _LINES:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            corpus.write_corpus(Path(d) / "c.jsonl", max_docs=300)
            _LINES.extend((Path(d) / "c.jsonl").read_text().splitlines())
    return _LINES


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("src")
    pq.write_table(pa.table({"text": _texts("pq")}), d / "web.parquet", row_group_size=50)  # 16 row groups
    datasets.Dataset.from_dict({"text": _texts("hf")}).save_to_disk(str(d / "hfds"))
    return d / "web.parquet", d / "hfds"


def make_lock(tmp: Path, parquet: Path, hfds: Path, steps: int) -> Path:
    spec = {"name": "s", "model": ARCH, "hardware": {"gpu": "cpu", "count": 2},
            "data": {"sources": [{"name": "web", "path": str(parquet), "format": "parquet", "weight": 0.5},
                                 {"name": "hfds", "path": str(hfds), "format": "parquet", "weight": 0.5}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 4, "keep_latest": 2}, "log_every": 1,
                         "loss_spike": {"enabled": False}}}
    lock = lock_for(spec, plan={"dp_shard": 2, "micro_batch": 4}, hyper={"warmup_steps": 2},
                    spec_path=str(tmp / "spec.yaml"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "plan.lock.json").write_text(json.dumps(lock))
    (tmp / "runner.py").write_text(RUNNER)
    return tmp / "plan.lock.json"


def _cmd(lock: Path, *outs: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
            "--rdzv_endpoint=localhost:0", str(lock.parent / "runner.py"), str(lock), *map(str, outs)]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


def seen(tmp: Path, name: str, rank: int) -> list[str]:
    f = tmp / f"seen-{name}-rank{rank}.txt"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


def test_two_ranks_stream_disjoint_documents_and_resume_exactly(tmp_path, sources):
    """Two torchrun launches: the run killed with SIGKILL after its first checkpoint, then one launch (new
    processes) that resumes it and, in the same process group, makes the uninterrupted run."""
    parquet, hfds = sources
    steps = 40
    lock = make_lock(tmp_path, parquet, hfds, steps)

    # SIGKILL after the first checkpoint, then resume: the same losses as the uninterrupted run
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_cmd(lock, cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((cut / "checkpoints").glob("step-*/manifest.json")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    assert not (cut / "DONE.json").exists(), "finished before the kill; test is not testing"
    p = subprocess.run(_cmd(lock, cut, tmp_path / "ref"), capture_output=True, text=True, timeout=600, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout  # (the cut run's: the fresh run's folder holds no checkpoint)
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, steps + 1)) and ref[steps] < ref[1] - 1.0  # it trains

    r0, r1 = seen(tmp_path, "ref", 0), seen(tmp_path, "ref", 1)
    assert r0 and r1 and len(set(r0)) == len(r0) and len(set(r1)) == len(r1)  # one pass, no document twice
    assert not set(r0) & set(r1)  # the ranks read disjoint documents
    for prefix in ("pq", "hf"):  # both sources streamed by both ranks
        assert any(d.startswith(prefix) for d in r0) and any(d.startswith(prefix) for d in r1)
    assert len(r0) + len(r1) < 0.25 * 2 * N_DOCS  # read as needed, never whole
    root = lock.parent  # the assets root: tokenizer only, no data copy, no token cache
    assert (root / "assets" / "tokenizer.json").exists()
    assert not (root / "data").exists() and not (root / "cache").exists()

    got = losses(cut)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in ref), (ref, got)
