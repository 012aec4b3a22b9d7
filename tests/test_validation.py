"""Held-out split and validation loss: deterministic disjoint split, logged val_loss on the native trainer,
DeepSpeed and torchtitan, falling over a short run; the same loss for the same weights and tokens on native
and DeepSpeed; on torchtitan, the loss of its model on the held-out documents in its own training format
(packed by hand here, scored by llmc's own model)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_build_fakes import lock_for  # noqa: E402

from llmc.runtime import corpus  # noqa: E402
from llmc.runtime.data import Assets, SourceData, read_documents  # noqa: E402
from llmc.runtime.entry import run_stage  # noqa: E402
from llmc.runtime.validation import (  # noqa: E402
    ValidationSet,
    evaluate,
    is_heldout,
    split_assets,
    validation_sources,
)
from llmc.spec.schema import Validation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return d / "docs.jsonl"


def test_heldout_is_deterministic_and_near_the_fraction():
    n, f = 20_000, 0.05
    a = [is_heldout("web", i, 0, f) for i in range(n)]
    assert a == [is_heldout("web", i, 0, f) for i in range(n)]
    # binomial: mean n f, sd sqrt(n f (1 - f)) ~ 30.8; 5 sd
    assert abs(sum(a) - n * f) < 5 * math.sqrt(n * f * (1 - f))
    # another seed or source gives another (nearly independent) subset
    b = [is_heldout("web", i, 1, f) for i in range(n)]
    assert sum(x and y for x, y in zip(a, b, strict=True)) < 3 * n * f * f + 50


def test_split_partitions_each_source_while_streaming_without_copies(tmp_path, docs):
    from llmc.runtime.stream import documents

    root = tmp_path / "run"
    (root / "data").mkdir(parents=True)
    assets = Assets(str(root), str(root / "assets"), (SourceData("docs", str(docs)),), str(root / "cache"))
    v = Validation(fraction=0.1, seed=3)
    logs: list[str] = []
    out = split_assets(assets, v, log=logs.append)
    assert out.sources[0].path == str(docs) and out.sources[0].holdout == ("train", 0.1, 3)  # read in place
    train = list(documents(out.sources[0]))
    (val_src,) = validation_sources(out)
    val = list(documents(val_src))
    allofit = list(read_documents(docs, "jsonl"))
    assert len(train) + len(val) == len(allofit) == 300
    assert 10 <= len(val) <= 50
    expect_val = [d for i, d in enumerate(allofit) if is_heldout("docs", i, 3, 0.1)]
    assert val == expect_val and sorted(train + val) == sorted(allofit)
    rec = json.loads((root / "data" / "split" / "validation.json").read_text())
    assert rec == {"fraction": 0.1, "seed": 3, "files": None, "sources": ["docs"]}
    assert [p.name for p in (root / "data" / "split").iterdir()] == ["validation.json"]  # no copies
    assert split_assets(assets, v, log=logs.append) == out and len(logs) == 1  # nothing redone
    # the assets round-trip through assets.json with their split
    assert Assets.from_json(json.loads(json.dumps(out.to_json()))) == out


def test_validation_tokens_stop_once_the_windows_are_full(tmp_path, docs):
    """The validation set reads only the held-out documents it needs: the first n tokens of the full
    held-out token stream (computed here from the whole file), and no more documents than that."""
    from llmc.runtime import stream
    from llmc.runtime.tokenizer import TextTokenizer, train_bpe
    from llmc.runtime.validation import validation_tokens

    tok = TextTokenizer(train_bpe(read_documents(docs, "jsonl"), 400, tmp_path / "tok"))
    src = SourceData("docs", str(docs), "jsonl", "text", 1.0, ("val", 0.3, 0))
    full, needed = [], 0  # the held-out token stream; documents it takes to reach 500 tokens
    for i, d in enumerate(read_documents(docs, "jsonl")):
        if is_heldout("docs", i, 0, 0.3):
            full += tok.encode(d) + [tok.eos_id]
            needed += len(full) - len(tok.encode(d)) - 1 < 500
    assert len(full) > 2000 and needed < 40
    read = []
    real = stream.documents

    def counting(*a, **k):
        for d in real(*a, **k):
            read.append(d)
            yield d

    stream.documents = counting
    try:
        got = validation_tokens([src], tok, 500)
    finally:
        stream.documents = real
    assert got.tolist() == full[:500]
    assert needed <= len(read) < needed + 16  # stopped within one tokenizer batch of the last needed document


def _lock(tmp: Path, docs: Path, steps: int, validation: dict, plan=None) -> Path:
    spec = {"name": "t", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": str(docs), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 100}, "log_every": 1},
            "eval": {"validation": validation}}
    lock = lock_for(spec, plan=plan or {"micro_batch": 8}, hyper={"warmup_steps": 2},
                    spec_path=str(tmp / "spec.yaml"))
    assert lock["evaluation"]["validation"]["fraction"] == validation.get("fraction", 0.005)
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / "plan.lock.json"
    p.write_text(json.dumps(lock))
    return p


def _val_records(out: Path) -> dict[int, dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "val_loss" in r}


def test_native_run_logs_falling_validation_loss(tmp_path, docs):
    lock = _lock(tmp_path / "b", docs, 30, {"fraction": 0.1, "every_steps": 10, "max_batches": 2})
    out = tmp_path / "b" / "run" / "pretrain"
    res = run_stage(json.loads(lock.read_text()), None, out, lock.parent)
    vals = _val_records(out)
    assert sorted(vals) == [10, 20, 30]
    assert all(v["val_tokens"] == 2 * 8 * 32 for v in vals.values())
    assert vals[30]["val_loss"] < vals[10]["val_loss"] < math.log(512) + 0.5
    assert vals[30]["val_ppl"] == pytest.approx(math.exp(vals[30]["val_loss"]))
    done = json.loads((out / "DONE.json").read_text())
    assert done["val_loss"] == res["val_loss"] == vals[30]["val_loss"] and done["val_step"] == 30
    # the model trained on the training part only, read in place: no copy of the source anywhere
    assets = json.loads((tmp_path / "b" / "assets" / "assets.json").read_text())
    assert assets["sources"][0]["path"] == str(docs) and assets["sources"][0]["holdout"] == ["train", 0.1, 0]
    files = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".jsonl" and p.name != "metrics.jsonl"], files
    assert max(p.stat().st_size for p in files if "data" in p.parts) < 4096  # data/: validation.json only


def test_validation_set_deals_windows_to_ranks_like_one_process():
    stream = torch.arange(1000).numpy()
    one = ValidationSet.from_streams([stream], seq_len=10, micro_batch=4, max_batches=3)
    r0 = ValidationSet.from_streams([stream], seq_len=10, micro_batch=2, max_batches=3, dp_rank=0, dp_size=2)
    r1 = ValidationSet.from_streams([stream], seq_len=10, micro_batch=2, max_batches=3, dp_rank=1, dp_size=2)
    assert one.total_windows == r0.total_windows == 12
    import numpy as np

    both = np.concatenate([np.concatenate([r0.windows[2 * b:2 * b + 2], r1.windows[2 * b:2 * b + 2]])
                           for b in range(3)])
    assert (both == one.windows).all()
    assert (one.windows[:, 0] == np.arange(12) * 10).all()  # in order, stride seq_len


@pytest.mark.parametrize("micro,dp,accum", [(32, 1, 1), (16, 2, 1), (8, 2, 2), (4, 2, 4), (4, 1, 8)])
def test_a_small_held_out_set_is_cut_to_whole_global_batches_on_every_layout(micro, dp, accum):
    """100 held-out windows, max_batches 4 global batches of 32 sequences: 3 whole global batches (96 windows, the
    first 96 in order) on every layout of those 32 (micro x dp x grad_accum), not 100 where the micro-batch is small."""
    import numpy as np

    seq = 10
    stream = np.arange(100 * seq + 1)
    ranks = [ValidationSet.from_streams([stream], seq_len=seq, micro_batch=micro, max_batches=4 * accum, dp_rank=r,
                                        dp_size=dp, grad_accum=accum) for r in range(dp)]
    starts = sorted(int(w[0]) for v in ranks for w in v.windows)
    assert starts == [i * seq for i in range(3 * 32)]
    assert all(v.total_windows == 96 and v.batches == 3 * accum for v in ranks)
    # a set with fewer windows than one global batch (31) is read in whole micro x dp batches, as many as it holds
    # (a small eval.validation.files on a large batch still validates); under one of those it is refused
    if micro * dp <= 31:  # (the layouts that accumulate)
        small = [ValidationSet.from_streams([stream[: 31 * seq + 1]], seq_len=seq, micro_batch=micro,
                                            max_batches=4 * accum, dp_rank=r, dp_size=dp, grad_accum=accum)
                 for r in range(dp)]
        assert all(v.total_windows == 31 // (micro * dp) * micro * dp for v in small)
        assert sorted(int(w[0]) for v in small for w in v.windows) == [i * seq for i in range(small[0].total_windows)]
    with pytest.raises(ValueError, match=f"fewer than one batch of {micro * dp}"):
        ValidationSet.from_streams([stream[: (micro * dp - 1) * seq + 1]], seq_len=seq, micro_batch=micro,
                                   max_batches=4 * accum, dp_size=dp, grad_accum=accum)


def test_evaluate_equals_a_direct_cross_entropy():
    from llmc.runtime.model import build_model
    from llmc.spec.model import Architecture

    arch = Architecture(**ARCH)
    model = build_model(arch, "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 512, (2000,), generator=g).numpy()
    vs = ValidationSet.from_streams([stream], seq_len=32, micro_batch=4, max_batches=3)
    got = evaluate(model, vs, torch.device("cpu"))
    with torch.no_grad():
        w = torch.from_numpy(vs.windows).long()
        logits = model(w[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512).double(), w[:, 1:].reshape(-1)).item()
    assert got["val_loss"] == pytest.approx(ref, rel=1e-5) and got["val_tokens"] == 12 * 32
    assert model.training  # restored
    # a stage whose plan slices the loss validates in the same slices (its whole logits would not fit either)
    sliced = evaluate(model, vs, torch.device("cpu"), loss_chunk=20)
    assert sliced["val_loss"] == pytest.approx(ref, rel=1e-5) and sliced["val_tokens"] == 12 * 32


_DS_EQUAL = r"""
import json, os, sys, torch
import deepspeed
from llmc.runtime.model import build_model
from llmc.runtime.validation import ValidationSet, evaluate
from llmc.spec.model import Architecture
arch = Architecture(**json.loads(sys.argv[1]))
g = torch.Generator().manual_seed(0)
stream = torch.randint(0, 512, (4000,), generator=g).numpy()
vs = ValidationSet.from_streams([stream], seq_len=32, micro_batch=4, max_batches=3)
native = evaluate(build_model(arch, "cpu", seed=0), vs, torch.device("cpu"))
from llmc.runtime.ds_train import init_deepspeed_distributed  # gloo, without DeepSpeed's CPU shm op
init_deepspeed_distributed()
out = {"native": native}
for zero in (0, 3):
    model = build_model(arch, "cpu", seed=0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": zero},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    out[f"zero{zero}"] = evaluate(engine, vs, torch.device("cpu"))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_and_native_validation_loss_agree_for_the_same_weights(tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29700 + os.getpid() % 200), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _DS_EQUAL, json.dumps(ARCH)], env=env, capture_output=True, text=True,
                       timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    for k in ("zero0", "zero3"):
        assert res[k]["val_tokens"] == res["native"]["val_tokens"] == 3 * 4 * 32
        assert res[k]["val_loss"] == pytest.approx(res["native"]["val_loss"], rel=1e-5), res


@pytest.mark.slow
def test_deepspeed_trainer_logs_validation_loss(tmp_path, docs):
    pytest.importorskip("deepspeed")
    from llmc.runtime.job import TrainJob  # noqa: F401  (the lock must parse for the runtime)

    lock = _lock(tmp_path / "d", docs, 6, {"fraction": 0.1, "every_steps": 3, "max_batches": 2},
                 plan={"micro_batch": 8, "zero_stage": 1})
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 8,
           "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                     "weight_decay": 0.1, "torch_adam": True}}}
    (tmp_path / "d" / "ds.json").write_text(json.dumps(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(ROOT)}
    port = str(29500 + os.getpid() % 200)
    out = tmp_path / "d" / "run" / "pretrain"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{port}", "-m", "llmc.runtime.ds_train", "--lock", str(lock),
            "--ds-config", str(tmp_path / "d" / "ds.json"), "--out", str(out), "--assets", str(tmp_path / "d")]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=str(ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    vals = _val_records(out)
    assert sorted(vals) == [3, 6] and vals[6]["val_tokens"] == 2 * 8 * 32
    assert json.loads((out / "DONE.json").read_text())["val_loss"] == vals[6]["val_loss"]


# ------------------------------------------------------------------------------ torchtitan's validator


def _llmc_loss_on_documents(model, x, pos, y, document_mask: bool) -> float:
    """Mean cross-entropy of llmc's own model (llmc.runtime.model: its attention, RoPE tables and head, not
    torchtitan's) on windows in torchtitan's format: inputs ``x``, per-document ``pos``, labels ``y``. llmc's
    forward takes no positions, so the windows run as torchtitan runs them: with ``document_mask``
    (FlexAttention's block-causal mask, which torchtitan builds from where the positions restart) each
    document of a window (a run of positions 0, 1, ...) on its own from position 0, right-padded into batches
    (causal attention: the padding after a document changes none of its logits); without (torchtitan's
    mask-less SDPA, as the CPU shim runs it) the whole window causally, every block's rotary table taken at
    the window's positions (llmc's apply_rope takes one table per row)."""
    f = torch.nn.functional
    T = x.shape[1]
    with torch.no_grad():
        if document_mask:
            docs = sorted(((b, s, e) for b in range(len(x))
                           for s, e in itertools.pairwise([*(pos[b] == 0).nonzero().flatten().tolist(), T])),
                          key=lambda d: d[1] - d[2])  # longest first: each batch padded to its first
            total = 0.0
            for i in range(0, len(docs), len(x)):
                part = docs[i:i + len(x)]
                n = part[0][2] - part[0][1]
                xs = torch.zeros(len(part), n, dtype=x.dtype)
                ys = torch.full((len(part), n), -100, dtype=y.dtype)
                for k, (b, s, e) in enumerate(part):
                    assert torch.equal(pos[b, s:e], torch.arange(e - s))
                    xs[k, :e - s], ys[k, :e - s] = x[b, s:e], y[b, s:e]
                logits = model(xs).float()
                total += f.cross_entropy(logits.flatten(0, 1), ys.flatten(), ignore_index=-100,
                                         reduction="sum").item()
        else:
            rope = model.rope[pos]  # (B, T, rope_dim / 2, 2)
            hooks = [blk.register_forward_pre_hook(lambda _m, a: (a[0], rope, *a[2:]))
                     for blk in model.layers.values()]
            try:
                logits = model(x).float()
            finally:
                for h in hooks:
                    h.remove()
            total = f.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / y.numel()


@pytest.mark.slow
def test_torchtitan_job_logs_the_loss_of_its_checkpoint_on_its_format(tmp_path, monkeypatch):
    """The job's validator runs inside torchtitan's trainer (CPU shim) every 4 steps; the loss it logs at
    step 8 is the loss of the step-8 DCP checkpoint, read into llmc's own model, on the held-out documents
    packed by hand in torchtitan's training format (BOS + document + EOS, positions restarting per document,
    no label across documents; attention causal over the window, the shim's mask-less SDPA). The same windows
    at positions 0..seq_len-1, and llmc's EOS-joined windows, give other losses: the check can fail."""
    import re

    from test_torchtitan import losses, run_logged
    from test_validation_format import _by_hand

    from llmc.runtime.hf_io import _model_state
    from llmc.runtime.model import build_model
    from llmc.runtime.titan_launch import torchtitan_command
    from llmc.runtime.validation import build_validation_set

    c, cfg, assets = _titan_validation(tmp_path, monkeypatch, lr=0.03)
    seq_len, mb = c.hyper.seq_len, c.plan.micro_batch
    v = cfg.validator
    assert v.enable and v.freq == 4 and v.steps == 2
    # the validator reads the held-out documents of the source, training the rest, both from the source itself
    assert type(v.dataloader).__qualname__ == "LlmcValidationLoader.Config" and v.dataloader.micro_batch == 32
    assert cfg.dataloader.dataset == "llmc_train_0"
    run_dir = Path(assets.root)
    assert cfg.dataloader.dataset_path == str(run_dir / "data" / "python-docs.jsonl")
    assert cfg.training.local_batch_size == mb  # a validation batch = one micro-batch per rank

    module = tmp_path / "b" / "torchtitan" / "llmc_job.py"
    argv, env = torchtitan_command(module, 1, True, ["--training.steps", "8", "--metrics.log_freq", "1",
                                                     "--checkpoint.interval", "8"], run_dir=run_dir)
    rc, log, _ = run_logged(argv, env, run_dir)
    assert rc == 0, log[-3000:]
    train_log = "\n".join(ln for ln in log.splitlines() if "validate step" not in ln)
    assert sorted(losses(train_log)) == list(range(1, 9))
    val = {int(s): float(x) for s, x in re.findall(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+)", log)}
    # every every_steps and at the last step, as the lock counts them (not also at step 1, torchtitan's own rule)
    assert sorted(val) == [4, 8] and all(math.isfinite(x) for x in val.values()), log[-2000:]
    assert val[8] < val[4]

    # metrics.jsonl holds the same figures unrounded, in this job's format
    metrics = (run_dir / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, metrics) if "val_loss" in r]
    assert all(r["val_format"] == "torchtitan-documents" for r in recs), recs
    full = {r["step"]: r["val_loss"] for r in recs}
    assert sorted(full) == [4, 8] and all(abs(full[k] - val[k]) <= 5e-5 + 1e-9 for k in full), (full, val)

    ckpt = run_dir / "outputs" / "torchtitan" / "checkpoints"
    assert (ckpt / "step-8" / ".metadata").exists()
    model = build_model(c.spec.model, "cpu", seed=1)
    model.load_state_dict(_model_state(ckpt)[0], strict=True)
    model.eval()
    x, pos, y, _ = _by_hand(run_dir, "python-docs", 0.2, 5, seq_len, 2 * mb)
    ours = _llmc_loss_on_documents(model, x, pos, y, document_mask=False)
    assert ours == pytest.approx(full[8], abs=1e-5), (ours, full)
    # controls: positions over the whole window (~1e-4 away after 8 steps); llmc's own validation windows
    # (no BOS, labels across documents; ~7e-3)
    window_pos = _llmc_loss_on_documents(model, x, torch.arange(seq_len).expand_as(x), y, document_mask=False)
    vset = build_validation_set(assets, assets.tokenizer(), seq_len, mb, 2)
    llmc_format = evaluate(model, vset, torch.device("cpu"))["val_loss"]
    assert min(abs(window_pos - full[8]), abs(llmc_format - full[8])) > 5e-5, (window_pos, llmc_format, full)
    print(f"torchtitan val_loss at step 8: {full[8]:.6f}, llmc's model on its format {ours:.6f}, at window "
          f"positions {window_pos:.6f}, on llmc's windows {llmc_format:.6f}")


def test_the_validation_set_is_the_specs_whatever_the_micro_batch(tmp_path, docs):
    """max_batches counts global batches: a layout of 4 accumulated micro-batches of 2 sequences validates on the same
    2 x 8 windows as one micro-batch of 8 (it read 2 x 2 before), so val_loss compares across plans and hardware."""
    val = {"fraction": 0.1, "every_steps": 2, "max_batches": 2}
    runs = {}
    for name, plan in (("whole", {"micro_batch": 8}), ("accum", {"micro_batch": 2, "grad_accum": 4})):
        lock = _lock(tmp_path / name, docs, 2, val, plan=plan)
        assert json.loads(lock.read_text())["evaluation"]["validation"]["tokens_per_eval"] == 2 * 8 * 32
        run_stage(json.loads(lock.read_text()), None, tmp_path / name / "o", lock.parent)
        runs[name] = _val_records(tmp_path / name / "o")[2]
    assert runs["whole"]["val_tokens"] == runs["accum"]["val_tokens"] == 2 * 8 * 32
    assert runs["accum"]["val_loss"] == pytest.approx(runs["whole"]["val_loss"], abs=2e-4)


@pytest.mark.slow
def test_fsdp_two_processes_measure_the_single_process_validation_loss(tmp_path, docs):
    single = _lock(tmp_path / "one", docs, 4, {"fraction": 0.1, "every_steps": 2, "max_batches": 2})
    run_stage(json.loads(single.read_text()), None, tmp_path / "one" / "o", single.parent)
    lock = _lock(tmp_path / "two", docs, 4, {"fraction": 0.1, "every_steps": 2, "max_batches": 2},
                 plan={"dp_shard": 2, "micro_batch": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "-m", "llmc.runtime.entry", "--lock", str(lock), "--out",
           str(tmp_path / "two" / "o")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ref, got = _val_records(tmp_path / "one" / "o"), _val_records(tmp_path / "two" / "o")
    assert sorted(ref) == sorted(got) == [2, 4]
    for s in (2, 4):  # 2 ranks x 4 sequences see the windows one process reads 8 at a time
        assert got[s]["val_tokens"] == ref[s]["val_tokens"] == 2 * 8 * 32
        assert got[s]["val_loss"] == pytest.approx(ref[s]["val_loss"], abs=2e-4)


# ---------------------------------------------------- torchtitan's validator measures its own training format


def _titan_validation(tmp_path, monkeypatch, max_batches=2, lr=None):
    """The tiny example with validation, built; its run dir holding a tokenizer and one JSONL source; the
    job's config as torchtitan parses it; llmc's assets for the same run dir, split like prepare does. ``lr``: a
    peak LR reached at step 1 (so that 8 steps from llmc's N(0, 0.02) initialisation learn a model whose loss
    depends on the positions and the packing the check tells apart)."""
    pytest.importorskip("torchtitan")
    from test_torchtitan import OFFLINE, load_job, make_assets, write_build

    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    text = (ROOT / "examples" / "tiny_cpu.yaml").read_text()
    if lr is not None:
        text = text.replace("  optimizer:\n    lr: 3.0e-3\n", f"  optimizer:\n    lr: {lr}\n  schedule:\n    warmup_steps: 1\n")
        assert f"lr: {lr}" in text
    text = text.split("\neval:")[0] + (f"\neval:\n  validation: {{every_steps: 4, max_batches: {max_batches}, "
                                       "fraction: 0.2, seed: 5}\n")
    run, lines = loads_spec(text, file=str(tmp_path / "tiny.yaml"))
    c = compile_spec(run, str(tmp_path / "tiny.yaml"), lines)
    module = write_build(c, tmp_path / "b")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "b" / "run"
    monkeypatch.setenv("LLMC_RUN_DIR", str(run_dir))
    make_assets(run_dir, c.spec.model.vocab_size, n_docs=1500, names=["python-docs"])  # ~20k held-out tokens
    cfg = load_job(module)
    src = SourceData("python-docs", str(run_dir / "data" / "python-docs.jsonl"), "jsonl", "text")
    assets = split_assets(Assets(str(run_dir), str(run_dir / "assets"), (src,), str(run_dir / "cache")),
                          c.spec.eval.validation, log=lambda *_: None)
    return c, cfg, assets


def _titan_windows(cfg, tok, seq_len, dp_rank=0, dp_size=1, batch=None):
    """Every (input, positions, labels) batch the job's validation loader gives one data-parallel rank."""
    loader = cfg.validator.dataloader.build(dp_world_size=dp_size, dp_rank=dp_rank, tokenizer=tok, seq_len=seq_len,
                                            local_batch_size=batch or cfg.training.local_batch_size)
    return [(x["input"], x["positions"], y) for x, y in loader]


@pytest.mark.slow
def test_torchtitan_validation_loader_deals_its_format_like_llmc(tmp_path, monkeypatch):
    """The job's validation loader yields exactly the held-out documents packed by hand in torchtitan's
    training format (inputs, per-document positions, labels), dealt to data-parallel ranks as llmc deals its
    windows (batch b of rank r: windows (b * dp + r) * micro_batch ...), on 1 and 2 ranks; batches of llmc's
    micro-batch whatever local batch size the validator passes. llmc's own windows of the same documents (EOS
    joined, no BOS) differ from them: the comparison can fail."""
    from test_validation_format import _by_hand
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from llmc.runtime.validation import build_validation_set

    c, cfg, assets = _titan_validation(tmp_path, monkeypatch)
    seq_len, mb = c.hyper.seq_len, c.plan.micro_batch
    assert cfg.validator.enable and cfg.validator.steps == 2 and cfg.training.local_batch_size == mb
    tok = HuggingFaceTokenizer(tokenizer_path=assets.tokenizer_dir)
    x, pos, y, bos = _by_hand(Path(assets.root), "python-docs", 0.2, 5, seq_len, 2 * mb * 2)
    assert bos == tok.bos_id
    for dp in (1, 2):
        for r in range(dp):
            got = _titan_windows(cfg, tok, seq_len, r, dp)
            assert len(got) == 2, (dp, r)
            for b, batch in enumerate(got):
                w = slice((b * dp + r) * mb, (b * dp + r + 1) * mb)
                for name, have, want in zip(("input", "positions", "labels"), batch, (x[w], pos[w], y[w]),
                                            strict=True):
                    assert torch.equal(have, want), (dp, r, b, name)
    # batches of llmc's micro-batch whatever local batch size the validator passes (a command-line override)
    other = _titan_windows(cfg, tok, seq_len, batch=mb // 2)
    assert [tuple(t.shape) for t, _, _ in other] == [(mb, seq_len)] * 2
    assert torch.equal(torch.cat([t for t, _, _ in other]), x[:2 * mb])
    # llmc's windows of the same documents (its native / DeepSpeed format) are not these
    ref = build_validation_set(assets, assets.tokenizer(), seq_len, mb, 2)
    wx, wy = ref.batch(0)
    assert not torch.equal(wx, x[:mb]) and not torch.equal(wy, y[:mb]) and bos not in ref.windows


class _Metrics:
    """torchtitan's MetricsProcessor as its Validator uses it."""

    def __init__(self):
        self.ntokens_since_last_log, self.logged = 0, []

    def log_validation(self, loss, step):
        self.logged.append((step, float(loss)))


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["flex", "sdpa"])
def test_torchtitan_validator_loss_equals_llmcs_model_on_its_format(attention, tmp_path, monkeypatch):
    """torchtitan's own Validator, built from the job's config (its loader, its loss), on llmc's model loaded
    through the job's Hugging Face state-dict adapter, logs the loss of llmc's own model (llmc.runtime.model)
    on the held-out documents packed by hand in torchtitan's format: FlexAttention masks each document (llmc's
    model runs each document of a window on its own), SDPA attends over the whole window (llmc's model at the
    per-document positions). The windows shifted by one token, and the other attention, give other losses:
    the check can fail."""
    import contextlib

    import torchtitan.tools.utils as tt_utils
    from safetensors.torch import load_file
    from test_validation_format import _by_hand
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from llmc.runtime.hf_io import export_hf
    from llmc.runtime.model import build_model
    from llmc.runtime.titan_cpu_shim import swap_flex_for_sdpa

    c, cfg, assets = _titan_validation(tmp_path, monkeypatch)
    arch, seq_len, mb = c.spec.model, c.hyper.seq_len, c.plan.micro_batch
    flex = attention == "flex"
    if not flex:
        assert swap_flex_for_sdpa(cfg) > 0
    ref = build_model(arch, "cpu", seed=0).eval()
    hf = tmp_path / "hf"
    export_hf(ref.state_dict(), arch, hf, dtype=torch.float32)
    m = cfg.model_spec.model
    model = m.build()
    model.init_states(buffer_device=torch.device("cpu"))
    hf_sd = {}
    for f in sorted(hf.glob("*.safetensors")):
        hf_sd.update(load_file(f))
    model.load_state_dict(cfg.model_spec.state_dict_adapter(m, str(hf)).from_hf(hf_sd), strict=True)

    monkeypatch.setattr(tt_utils, "device_type", "cpu")
    dims = type("Dims", (), {"pp_enabled": False, "dp_enabled": False, "cp_enabled": False,
                             "dp_cp_enabled": False})()
    metrics = _Metrics()
    validator = cfg.validator.build(
        parallelism=cfg.parallelism, dp_world_size=1, dp_rank=0,
        tokenizer=HuggingFaceTokenizer(tokenizer_path=assets.tokenizer_dir), parallel_dims=dims,
        loss_fn=cfg.loss.build(compile_config=cfg.compile), validation_context=contextlib.nullcontext,
        metrics_processor=metrics, seq_len=seq_len, local_batch_size=cfg.training.local_batch_size)
    validator.validate([model], step=4)
    ((step, titan_loss),) = metrics.logged
    assert step == 4 and metrics.ntokens_since_last_log == 2 * mb * seq_len

    run_dir = Path(assets.root)
    x, pos, y, _ = _by_hand(run_dir, "python-docs", 0.2, 5, seq_len, 2 * mb)
    ours = _llmc_loss_on_documents(ref, x, pos, y, document_mask=flex)
    assert titan_loss == pytest.approx(ours, rel=0, abs=1e-5), (titan_loss, ours)
    # controls (a random model: each ~1e-2 away; asked: 10x the tolerance)
    sx, spos, sy, _ = _by_hand(run_dir, "python-docs", 0.2, 5, seq_len, 2 * mb, shift=1)  # one token later
    assert torch.equal(sx.flatten()[:-1], x.flatten()[1:]) and torch.equal(sy.flatten()[:-1], y.flatten()[1:])
    controls = {"shifted": _llmc_loss_on_documents(ref, sx, spos, sy, document_mask=flex),
                "other attention": _llmc_loss_on_documents(ref, x, pos, y, document_mask=not flex)}
    for k, off in controls.items():
        assert abs(off - titan_loss) > 1e-4, (k, off, titan_loss)
    print(f"{attention}: torchtitan {titan_loss:.6f}, llmc's model {ours:.6f}, controls {controls}")


@pytest.mark.slow
def test_torchtitan_two_ranks_log_the_loss_of_their_checkpoint_on_its_format(tmp_path, monkeypatch):
    """FSDP on 2 gloo ranks: each rank validates its share of the held-out documents in torchtitan's format
    (dealt like llmc's ranks) and the loss torchtitan all-reduces and logs at step 8 is the single-process
    loss of the step-8 checkpoint, read into llmc's own model, on the same windows packed by hand (2 ranks x
    micro_batch per batch = one process's 2 x micro_batch; attention over the window, as the CPU shim runs
    it). The loss on rank 0's windows alone, and on llmc's EOS-joined windows, differ: the check can fail."""
    pytest.importorskip("torchtitan")
    import re

    from test_torchtitan import OFFLINE, losses, make_assets, run_logged, write_build, write_parquet_source
    from test_torchtitan_render import TINY, compiled_for
    from test_validation_format import _pack_by_hand

    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.hf_io import _model_state
    from llmc.runtime.model import build_model
    from llmc.runtime.titan_launch import torchtitan_command
    from llmc.runtime.validation import build_validation_set

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "corpus"
    data = {"seq_len": 64, "tokens": 1e6,
            "sources": [{"name": "web", "path": str(src), "format": "parquet", "text_field": "body"}]}
    c = compiled_for(model=TINY, plan=ParallelPlan(dp_shard=2, micro_batch=4), gpu="cpu", precision="fp32", seq=64,
                     steps=8, lr=1e-2, warmup=1, data=data,
                     eval={"validation": {"fraction": 0.2, "seed": 1, "every_steps": 4, "max_batches": 3}})
    module = write_build(c, tmp_path)
    run_dir = tmp_path / "run"
    docs = make_assets(run_dir, c.spec.model.vocab_size, names=())
    write_parquet_source(src, docs)
    argv, env = torchtitan_command(module, 2, True, ["--metrics.log_freq", "1", "--checkpoint.interval", "8"],
                                   run_dir=run_dir)
    rc, log, _ = run_logged(argv, env, run_dir)
    assert rc == 0, log[-3000:]
    assert "dp_shard=2" in log and sorted(losses("\n".join(
        ln for ln in log.splitlines() if "validate step" not in ln))) == list(range(1, 9))
    val = {}
    for s, x in re.findall(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+)", log):
        val.setdefault(int(s), set()).add(float(x))
    assert sorted(val) == [4, 8] and all(len(x) == 1 for x in val.values()), val  # both ranks log it
    (logged,) = val[8]

    ck, _ = _model_state(run_dir / "outputs" / "torchtitan" / "checkpoints")
    model = build_model(c.spec.model, "cpu", seed=1)
    model.load_state_dict(ck, strict=True)
    model.eval()
    held = [d for i, d in enumerate(docs) if is_heldout("web", i, 1, 0.2)]  # the parquet rows in order
    x, pos, y, _ = _pack_by_hand(held, run_dir / "assets", 64, 3 * 2 * 4)
    ours = _llmc_loss_on_documents(model, x, pos, y, document_mask=False)
    assert ours == pytest.approx(logged, abs=1.5e-4), (ours, val)  # logged with 4 decimals
    # controls: rank 0's windows only (batch b: windows 8b ... 8b + 3); llmc's windows of the same documents
    mine = torch.cat([torch.arange(8 * b, 8 * b + 4) for b in range(3)])
    rank0 = _llmc_loss_on_documents(model, x[mine], pos[mine], y[mine], document_mask=False)
    assets = split_assets(Assets(str(run_dir), str(run_dir / "assets"),
                                 (SourceData("web", str(src), "parquet", "body"),), str(run_dir / "cache")),
                          c.spec.eval.validation, log=lambda *_: None)
    llmc_format = evaluate(model, build_validation_set(assets, assets.tokenizer(), 64, 2 * 4, 3),
                           torch.device("cpu"))["val_loss"]
    assert min(abs(rank0 - logged), abs(llmc_format - logged)) > 1e-3, (rank0, llmc_format, logged)
    print(f"2 ranks: logged {logged:.4f}, llmc's model {ours:.5f}, rank 0's windows {rank0:.5f}, "
          f"llmc's windows {llmc_format:.5f}")
