"""Post-training stages resume exactly from their mid-stage checkpoints (tiny model, CPU, fp32).

Each stage runs N steps uninterrupted, and again stopped after k < N steps (``stop_after``: a mid-stage
checkpoint, no DONE.json) then rerun: the rerun loads the checkpoint (trainable weights, optimizer, RNGs,
the batch sampler's position, GRPO's sampling generator) and must log the same per-step values and end
with the same weights as the uninterrupted run -- bit for bit (``==``) on CPU, where both runs execute the
same kernels on the same inputs in the same order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.checkpoint import (  # noqa: E402
    CheckpointError,
    list_checkpoints,
    read_model_state,
    resolve_checkpoint,
    save_checkpoint,
)
from llmc.runtime.job import TrainJob  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.runtime.posttrain import KIND_FOR_STAGE, RESUME_FOLDER, run_stage  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.schema import make_stage as Stage  # noqa: E402

torch.set_num_threads(1)
TOK = ByteTokenizer()
ARCH = dict(name="t", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=TOK.vocab_size,
            max_seq_len=96)
def builtin(kind: str, seq_len: int = 96, tokens: float = 1e5) -> dict:
    """Stage data: llmc's synthetic records of a ``kind`` stage (``format: builtin`` with the stage's record kind,
    llmc.runtime.synthetic; a builtin pre-training corpus is refused by the stage's trainer, G014)."""
    return {"sources": [{"name": "synthetic", "format": "builtin", "kind": KIND_FOR_STAGE[kind]}],
            "seq_len": seq_len, "tokens": tokens}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["wq", "wv", "w2"]}  # dropout: the torch RNG matters

# name: (stage fields, lr, global batch)
STAGES = {
    "sft": ({"kind": "sft"}, 2e-3, 3),
    "sft_lora": ({"kind": "sft", "lora": LORA}, 3e-3, 3),
    "sft_qlora": ({"kind": "sft", "lora": {**LORA, "quantize_base": "nf4"}}, 3e-3, 3),
    "dpo": ({"kind": "dpo", "dpo_beta": 0.1}, 1e-3, 2),
    "grpo": ({"kind": "grpo", "grpo_group_size": 3, "max_new_tokens": 4, "prompts_per_step": 2,
             "grpo_iterations": 2}, 1e-3, 1),
}
STEPS = 4
KEYS = {"sft": ("loss", "lr"), "sft_lora": ("loss", "lr"), "sft_qlora": ("loss", "lr"),
        "dpo": ("loss", "margin", "accuracy", "chosen_reward", "lr"),
        "grpo": ("loss", "kl", "clip_frac", "reward_mean", "reward_std", "lr")}


def job_of(name: str, steps: int = STEPS, interval: int = 2, keep_latest: int = 3, stage: str | None = None
           ) -> TrainJob:
    fields, lr, batch = STAGES[name]
    st = Stage(name=stage or name, init_from="base", data=builtin(fields["kind"]), **fields)
    return TrainJob(arch=Architecture(**ARCH), sources=[], seq_len=96, steps=steps, name="p", stage=stage or name,
                    kind=st.kind, lr=lr, micro_batch=batch, init_from="base", stage_spec=st, log_every=1000,
                    checkpoint_interval=interval, keep_latest=keep_latest)


def _base(run: Path) -> None:
    save_checkpoint(run / "base" / "checkpoints", 0, build_model(Architecture(**ARCH), seed=11), None, {})


def _records(d: Path) -> tuple[list[dict], list[dict]]:
    """(step records, events other than the stage's start and truncation report, which every run logs)."""
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "event" not in r], [r for r in recs if r.get("event") not in (None, "start", "truncation")]


def _same_run(a: Path, b: Path, name: str) -> None:
    """b (interrupted + resumed) logged each step once, with a's values, and ended with a's weights."""
    ra, rb = _records(a)[0], _records(b)[0]
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert all(r["loss"] != 0 for r in ra), ra  # the steps train (no batch truncated to zero trained tokens)
    for x, y in zip(ra, rb, strict=True):
        for k in KEYS[name]:
            assert y[k] == x[k], (name, k, x, y)
    wa, wb = read_model_state(resolve_checkpoint(a)), read_model_state(resolve_checkpoint(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (name, k)
    da, db = (json.loads((d / "DONE.json").read_text()) for d in (a, b))
    for k in ("loss_first", "loss_last", "reward_first", "reward_last", "margin_last"):
        assert db.get(k) == da.get(k), k  # the history behind the summary came back with the checkpoint


@pytest.fixture(scope="module", autouse=True)
def parity_reward():
    """GRPO's verifier replaced by one a random tiny model earns half the time (completions of odd length), so
    advantages are not all zero and the GRPO steps change the weights (the arithmetic verifier would score
    every sample 0 here and no step would train)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("llmc.runtime.reward.arithmetic_reward", lambda text, expr=None, answer=None: float(len(text) % 2))
        yield


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Every stage run uninterrupted (module-wide: the reference of several tests)."""
    root = tmp_path_factory.mktemp("whole")
    _base(root)
    for n in STAGES:
        run_stage(job_of(n), root / n, tokenizer=TOK)
    return root


@pytest.mark.parametrize("name", list(STAGES))
def test_stop_then_resume_equals_uninterrupted(whole, tmp_path, name):
    _base(tmp_path)
    out = tmp_path / name
    res = run_stage(job_of(name), out, tokenizer=TOK, stop_after=3)  # mid-stage checkpoints at 2 and 3
    assert res["status"] == "stopped" and res["step"] == 3 and not (out / "DONE.json").exists()
    folder = out / "checkpoints" / RESUME_FOLDER
    assert [s for s, _ in list_checkpoints(folder)] == [2, 3]
    assert list_checkpoints(out / "checkpoints") == []  # nothing there a later stage / export could take
    with pytest.raises(CheckpointError):
        resolve_checkpoint(out)
    meta = json.loads((folder / "step-00000003" / "train.json").read_text())
    assert meta["mid_stage"] is True and meta["stage"] == name and meta["kind"] == STAGES[name][0]["kind"]
    sd = torch.load(folder / "step-00000003" / "model.pt", weights_only=True)
    if "lora" in name:  # the adapters only, unmerged; the frozen base comes from init_from again
        assert meta["adapters"] == "unmerged" and sd and all("lora_" in k for k in sd)
    else:
        assert meta["adapters"] is None and sd.keys() == read_model_state(resolve_checkpoint(whole / name)).keys()
    # the step-3 checkpoint is lost (as if the run died after logging step 3 but before saving it): the rerun
    # resumes from step 2 and logs step 3 again, once
    shutil.rmtree(folder / "step-00000003")
    res = run_stage(job_of(name), out, tokenizer=TOK)
    assert res["status"] == "done"
    _same_run(whole / name, out, name)
    ev = _records(out)[1]
    assert [(e["event"], e["step"]) for e in ev] == [("resume", 2)]
    assert not folder.exists()  # done: the mid-stage states are gone, checkpoints/ holds the final one only
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [STEPS]
    if "lora" in name:
        wa = torch.load(whole / name / "lora_adapters.pt", weights_only=True)
        wb = torch.load(out / "lora_adapters.pt", weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_keep_latest_prunes_mid_stage_checkpoints(tmp_path):
    _base(tmp_path)
    out = tmp_path / "sft"
    run_stage(job_of("sft", interval=1, keep_latest=2), out, tokenizer=TOK, stop_after=3)
    assert [s for s, _ in list_checkpoints(out / "checkpoints" / RESUME_FOLDER)] == [2, 3]


def test_max_seconds_stops_with_a_checkpoint(tmp_path):
    _base(tmp_path)
    out = tmp_path / "sft"
    res = run_stage(job_of("sft"), out, tokenizer=TOK, max_seconds=0)  # out of time after the first step
    assert res["status"] == "stopped" and res["step"] == 1 and not (out / "DONE.json").exists()
    assert [s for s, _ in list_checkpoints(out / "checkpoints" / RESUME_FOLDER)] == [1]


def test_other_stage_checkpoint_is_not_resumed(whole, tmp_path):
    _base(tmp_path)
    run_stage(job_of("dpo"), tmp_path / "dpo", tokenizer=TOK, stop_after=2)
    out = tmp_path / "sft"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "dpo" / "checkpoints" / RESUME_FOLDER, out / "checkpoints" / RESUME_FOLDER)
    with pytest.raises(CheckpointError, match="not by this stage 'sft'"):
        run_stage(job_of("sft"), out, tokenizer=TOK)
    # same stage name, different kind: refused too
    run_stage(job_of("dpo", stage="sft"), tmp_path / "sft_named_dpo", tokenizer=TOK, stop_after=2)
    with pytest.raises(CheckpointError, match="kind 'dpo'"):
        run_stage(job_of("sft"), tmp_path / "sft_named_dpo", tokenizer=TOK)
    # without resume the foreign states are set aside (kept, renamed) and the stage runs from its start
    assert run_stage(job_of("sft"), out, tokenizer=TOK, resume=False)["status"] == "done"
    aside = list((out / "checkpoints").glob(f"{RESUME_FOLDER}.set-aside-*"))
    assert len(aside) == 1 and [s for s, _ in list_checkpoints(aside[0])] == [2]
    _same_run(whole / "sft", out, "sft")


def test_corrupt_newest_checkpoint_refused_or_skipped(whole, tmp_path):
    _base(tmp_path)
    out = tmp_path / "sft"
    run_stage(job_of("sft"), out, tokenizer=TOK, stop_after=3)
    folder = out / "checkpoints" / RESUME_FOLDER
    with open(folder / "step-00000003" / "optimizer.pt", "r+b") as f:  # flip one byte
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(CheckpointError, match="sha256 mismatch.*--fallback-checkpoint"):
        run_stage(job_of("sft"), out, tokenizer=TOK)
    res = run_stage(job_of("sft"), out, tokenizer=TOK, fallback=True)  # back to step 2, the bad one set aside
    assert res["status"] == "done"
    assert not folder.exists()
    _same_run(whole / "sft", out, "sft")


RUNNER = r'''
import json, sys
import torch
torch.set_num_threads(1)
from llmc.runtime.distributed import init_distributed, shutdown
from llmc.runtime.posttrain import run_stage
sys.path.insert(0, sys.argv[2])
from test_posttrain_resume import job_of, TOK
info = init_distributed()
root = sys.argv[1]
try:
    for name in ("sft", "sft_lora"):
        run_stage(job_of(name), f"{root}/whole_{name}", tokenizer=TOK, info=info)
        res = run_stage(job_of(name), f"{root}/cut_{name}", tokenizer=TOK, info=info, stop_after=3)
        assert res["status"] == "stopped", res
        if info.rank == 0:
            import pathlib
            with open(f"{root}/stopped_{name}.json", "w") as f:
                json.dump(json.loads((pathlib.Path(root) / f"cut_{name}/checkpoints/resume/step-00000003/"
                                      "manifest.json").read_text()), f)
        torch.distributed.barrier()
        run_stage(job_of(name), f"{root}/cut_{name}", tokenizer=TOK, info=info)
finally:
    shutdown()
'''


@pytest.mark.slow
def test_two_ranks_stop_and_resume_sharded(tmp_path):
    """2 ranks (torchrun, gloo, FSDP2): SFT and LoRA SFT stopped at step 3 (DCP shards from both ranks) and
    resumed equal the uninterrupted 2-rank runs."""
    _base(tmp_path)  # both stages start from tmp_path/base (init_from)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(script), str(tmp_path), str(Path(__file__).parent)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    assert p.stdout.count("resumed from") == 2
    for name in ("sft", "sft_lora"):
        stopped = json.loads((tmp_path / f"stopped_{name}.json").read_text())
        assert stopped["layout"] == "dcp" and stopped["world"] == 2
        assert any(f.startswith("dcp/__1_") for f in stopped["files"]) and "rank-1.pt" in stopped["files"]
        _same_run(tmp_path / f"whole_{name}", tmp_path / f"cut_{name}", name)


@pytest.mark.slow
def test_entry_stop_after_then_resume_a_post_training_stage(tmp_path):
    """examples/pipeline_tiny.yaml's LoRA sft stage through ``python -m llmc.runtime.entry``: ``--stop-after 1``
    exits 0 with a mid-stage checkpoint and no DONE.json; the rerun resumes and finishes; a third run finds
    DONE.json and does nothing."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    b = tmp_path / "build"

    def run(*args):
        p = subprocess.run([sys.executable, "-m", *args], cwd=b if b.exists() else root, env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout

    run("llmc.cli", "build", str(root / "examples" / "pipeline_tiny.yaml"), "-o", str(b))
    lock = json.loads((b / "plan.lock.json").read_text())
    pre = TrainJob.from_lock(lock, "pretrain")
    save_checkpoint(b / "run" / "pretrain" / "checkpoints", 1, build_model(pre.arch, seed=3), None, {})
    (b / "run" / "pretrain" / "DONE.json").write_text(json.dumps({"status": "done"}))
    train = ("llmc.runtime.entry", "--lock", str(b / "plan.lock.json"), "--stage", "sft", "--steps", "2")
    out = b / "run" / "sft"
    run(*train, "--stop-after", "1")
    assert not (out / "DONE.json").exists()
    assert [s for s, _ in list_checkpoints(out / "checkpoints" / RESUME_FOLDER)] == [1]
    assert "resumed from" in run(*train)
    done = json.loads((out / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == 2 and done["merged"]
    steps, events = _records(out)
    assert [r["step"] for r in steps] == [1, 2] and [e["event"] for e in events] == ["resume"]
    assert "nothing to do" in run(*train)
