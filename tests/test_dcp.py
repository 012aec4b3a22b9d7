"""Sharded checkpoints (torch.distributed.checkpoint) of the native trainer, 2 gloo processes with FSDP2:

* every rank writes its own shards (no model.pt gathered on rank 0), listed in the manifest;
* stop at step 4 + resume (a new launch) gives the losses of the uninterrupted run, with synchronous saves
  and with ``dcp.async_save`` (``training.checkpoint.async_mode: true``);
* ``llmc export`` (export.export_checkpoint) reads the sharded checkpoint: the Hugging Face model, run by
  ``transformers``, gives the logits of llmc's model loaded from torch's own DCP converter
  (``dcp_to_torch_save``);
* single process: a flipped byte in a shard is refused, and keep_latest prunes sharded step folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_build_fakes import lock_for  # noqa: E402
from test_runtime_train import torchrun_cases  # noqa: E402  (the runtime tests' multi-rank launcher)

from llmc.runtime import corpus  # noqa: E402

ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return d / "docs.jsonl"


def make_lock(tmp: Path, docs: Path, *, steps=8, interval=4, plan=None, async_mode=False) -> Path:
    spec = {"name": "t", "model": ARCH, "hardware": {"gpu": "cpu", "count": 2},
            "data": {"sources": [{"name": "docs", "path": str(docs), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": interval, "keep_latest": 2, "async_mode": async_mode},
                         "log_every": 1, "loss_spike": {"enabled": False}}}
    lock = lock_for(spec, plan=plan or {"dp_shard": 2, "micro_batch": 4}, hyper={"warmup_steps": 2},
                    spec_path=str(tmp / "spec.yaml"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "plan.lock.json").write_text(json.dumps(lock))
    return tmp / "plan.lock.json"


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}


@pytest.mark.slow
def test_fsdp_sharded_save_resume_and_hf_export(tmp_path, docs):
    """The runs, 2 ranks each, in two torchrun launches (each launch's start-up paid once): the uninterrupted
    run (the command line's path, llmc.runtime.entry's main) and the two runs stopped at step 4 (synchronous and
    asynchronous saves), then, in a new launch (new processes), the two resumed from their step-4 checkpoints."""
    ref_lock = make_lock(tmp_path / "ref", docs)
    ref_out = tmp_path / "ref" / "run" / "pretrain"  # the layout `llmc export` expects
    cuts = {f"cut{int(a)}": make_lock(tmp_path / f"cut{int(a)}", docs, async_mode=a) for a in (False, True)}
    for launch in ("stop", "resume"):
        (tmp_path / launch).mkdir()
    first = torchrun_cases(tmp_path / "stop", {**cuts, "ref": ref_lock}, 2, entry_last=True,
                           extra={"ref": {"out": str(ref_out)}, **{c: {"stop_after": 4} for c in cuts}})
    for async_mode in (False, True):
        out = first[f"cut{int(async_mode)}"].check().out
        assert not (out / "DONE.json").exists()
        m4 = json.loads((out / "checkpoints" / "step-00000004" / "manifest.json").read_text())
        assert m4["async"] is async_mode and m4["layout"] == "dcp"
    resumed = torchrun_cases(tmp_path / "resume", cuts, 2, entry_last=True,
                             extra={c: {"keep_out": True} for c in cuts})
    first["ref"].check()
    ref = losses(ref_out)
    assert sorted(ref) == list(range(1, 9)) and ref[8] < ref[1] - 0.5

    final = ref_out / "checkpoints" / "step-00000008"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["layout"] == "dcp" and manifest["world"] == 2 and not manifest["async"]
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rank-0.pt", "rank-1.pt",
            "train.json"} <= set(manifest["files"])
    assert not (final / "model.pt").exists() and not (final / "optimizer.pt").exists()  # nothing gathered
    # FSDP2 shards dim 0 of every matrix: each rank's file holds about half of the model + optimizer
    sizes = [(final / "dcp" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert 0.6 < sizes[0] / sizes[1] < 1.6, sizes

    for async_mode in (False, True):
        p = resumed[f"cut{int(async_mode)}"].check()
        out = p.out
        assert "resumed from" in p.stdout
        got = losses(out)
        assert sorted(got) == list(range(1, 9))
        assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in ref), (async_mode, ref, got)

    # HF export from the sharded checkpoint: transformers' forward == llmc's model from torch's DCP converter
    transformers = pytest.importorskip("transformers")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from llmc.runtime.export import export_checkpoint
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import Transformer

    res = export_checkpoint(tmp_path / "ref", "pretrain", tmp_path / "hf")
    assert res.get("hf") is not None
    dcp_to_torch_save(str(final / "dcp"), str(tmp_path / "full.pt"))
    sd = torch.load(tmp_path / "full.pt", weights_only=False)["model"]
    job = TrainJob.from_lock(json.loads(ref_lock.read_text()))
    model = Transformer(job.arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32)
    exported_dtype = next(iter(_safetensors_dtypes(tmp_path / "hf")))
    model.load_state_dict({k: v.to(exported_dtype).float() for k, v in sd.items()})  # the export's rounding
    tokens = torch.randint(0, job.arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
        got = hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _safetensors_dtypes(hf_dir: Path) -> set:
    from safetensors import safe_open

    out = set()
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out |= {fh.get_tensor(k).dtype for k in fh.keys()}
    return out


def test_single_process_sharded_checkpoint_refuses_corruption_and_prunes(tmp_path):
    from llmc.runtime.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        read_model_state,
        save_checkpoint,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(1, 4):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        save_checkpoint(tmp_path, step, model, opt, {"tokens": step}, keep_latest=2, sharded=True)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]  # keep_latest
    last = latest_checkpoint(tmp_path)
    assert torch.equal(read_model_state(last)["1.weight"], model[1].weight)

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    st = load_checkpoint(last, fresh, fopt)
    assert st["step"] == 3 and st["tokens"] == 3
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg_sq"], fopt.state[b]["exp_avg_sq"])

    shard = last / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch") as e:
        latest_checkpoint(tmp_path)
    assert str(shard) in str(e.value) and "\n" not in str(e.value)
    assert latest_checkpoint(tmp_path, fallback=True, log=lambda *_: None).name == "step-00000002"
