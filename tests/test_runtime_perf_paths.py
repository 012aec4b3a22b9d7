"""The fast paths of the runtime model and native loop compute the same numbers as the plain ones: real-valued
RoPE vs Meta's complex form, SDPA's grouped-query path vs repeat_interleave, the foreach grad norm and clip
vs torch.nn.utils.clip_grad_norm_, one weight-decay rule (and its torchtitan regex), per-block compile,
and the loop syncing the loss with the host once per log interval."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from llmc.runtime.model import NO_DECAY_PATTERN, apply_rope, build_model, param_groups, rope_tables  # noqa: E402
from llmc.spec.model import MLA, Architecture, MoE, RopeScaling  # noqa: E402

BASE = dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=101, max_seq_len=32)


def rope_complex(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Meta's apply_rotary_emb (llama/model.py): view_as_complex(x) * freqs_cis."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    cis = torch.view_as_complex(rope.contiguous())[None, :, None, :]
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)


@pytest.mark.parametrize("scaling", [None, RopeScaling(type="llama3", factor=8.0, original_max_position=16),
                                     RopeScaling(type="yarn", factor=4.0, original_max_position=16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_equals_complex(scaling, dtype):
    rope = rope_tables(16, 32, 10000.0, scaling)
    x = torch.randn(2, 32, 3, 16).to(dtype)
    torch.testing.assert_close(apply_rope(x, rope), rope_complex(x, rope), atol=1e-6 if dtype == torch.float32
                               else 1e-2, rtol=1e-5)
    # a rotation: pairwise norms are kept (times YaRN's mscale = 0.1 ln(factor) + 1 on cos/sin)
    mscale = 0.1 * math.log(scaling.factor) + 1 if scaling is not None and scaling.type == "yarn" else 1.0
    n0 = x.float().unflatten(-1, (-1, 2)).norm(dim=-1)
    n1 = apply_rope(x.float(), rope).unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(n0 * mscale, n1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa_gqa", [False, True])
def test_gqa_path_equals_repeat_interleave(monkeypatch, sdpa_gqa):
    import llmc.runtime.model as M

    monkeypatch.setattr(M, "_sdpa_gqa_ok", lambda q: sdpa_gqa)  # force either path (CPU: enable_gqa runs as math)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(M.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("enable_gqa", False)) or real(*a, **k))
    arch = Architecture(**BASE)
    model = build_model(arch, seed=0).eval()
    attn = model.layers["0"].attention
    x = torch.randn(2, 10, arch.d_model)
    rope = model.rope[:10]
    B, T = 2, 10
    q = attn.wq(x).view(B, T, -1, arch.hd)
    k = attn.wk(x).view(B, T, -1, arch.hd)
    v = attn.wv(x).view(B, T, -1, arch.hd)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    rep = arch.n_heads // arch.kv_heads
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                         v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True)
    ref = attn.wo(ref.transpose(1, 2).reshape(B, T, -1))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, rope), ref, atol=1e-6, rtol=1e-5)
    assert calls[-1] is sdpa_gqa


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6])
def test_foreach_clip_equals_torch(max_norm):
    from llmc.runtime.train import clip_grad_norm

    arch = Architecture(**BASE, qkv_bias=True)
    a, b = build_model(arch, seed=0), build_model(arch, seed=0)
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    for m in (a, b):
        m(tokens).float().pow(2).mean().backward()
    got = clip_grad_norm(list(a.parameters()), max_norm)
    assert torch.is_tensor(got) and got.dim() == 0
    want = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm if max_norm else float("inf"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-8)
    if max_norm == 0.05:  # clipped to the bound
        total = torch.stack([p.grad.norm() for p in a.parameters()]).norm()
        assert float(total) == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"tied_embeddings": True},
                                {"moe": MoE(num_experts=4, top_k=2, router_bias=True, expert_bias=True,
                                            num_shared_experts=1, dense_layers=1)},
                                {"mla": MLA(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                            v_head_dim=8)}])
def test_one_weight_decay_rule_and_its_regex(kw):
    arch = Architecture(**BASE, **kw)
    model = build_model(arch, device="meta")
    for p in model.parameters():
        p.requires_grad_(True)  # expert_bias is frozen in training; the regex must still name it
    groups = param_groups(model, 0.1)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    pat = re.compile(NO_DECAY_PATTERN)
    for name, p in model.named_parameters():
        assert bool(pat.search(name)) == (id(p) in no_decay) == (p.dim() == 1 or name == "tok_embeddings.weight"), name
    decayed = {n for n, p in model.named_parameters() if id(p) not in no_decay}
    assert "tok_embeddings.weight" not in decayed and "layers.0.attention.wo.weight" in decayed
    assert ("lm_head.weight" in decayed) == (not arch.tied_embeddings)


def test_compile_blocks_keeps_names_and_numbers():
    arch = Architecture(**BASE)
    model = build_model(arch, seed=0).eval()
    names = [n for n, _ in model.named_parameters()]
    tokens = torch.randint(0, arch.vocab_size, (2, 8))
    with torch.no_grad():
        ref = model(tokens)
    model.compile_blocks(backend="eager")
    assert [n for n, _ in model.named_parameters()] == names
    assert all(blk._compiled_call_impl is not None for blk in model.layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref)


def test_wants_compile_reads_the_lock():
    from llmc.runtime.distributed import wants_compile
    from llmc.runtime.job import TrainJob

    job = TrainJob(arch=Architecture(**BASE), sources=[], seq_len=8, steps=1)
    assert wants_compile(job) is False
    assert wants_compile(job.replace(lock={"training": {"compile": True}})) is True


def test_loss_syncs_once_per_step_and_logs_per_interval(tmp_path, monkeypatch):
    """The native loop reads the loss and grad norm back once per step, in one all-reduce of three numbers
    (``train.step_stats``): the verdict "finite on every rank?" must be known before the optimizer step (as
    Megatron-LM's optimizer reads its found-inf flag every step); it logs only on logged steps: log_every 5 over 10
    steps -> steps 1, 5, 10."""
    from test_build_fakes import lock_for

    from llmc.runtime import corpus, train
    from llmc.runtime.entry import run_stage

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    spec = {"name": "t", "model": dict(BASE, vocab_size=512), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "d", "path": str(tmp_path / "docs.jsonl"), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 16, "tokens": 64 * 10},
            "training": {"precision": "fp32", "global_batch_tokens": 64, "log_every": 5,
                         "checkpoint": {"interval_steps": 100}}}
    lock = lock_for(spec, plan={"micro_batch": 4}, spec_path=str(tmp_path / "s.yaml"))
    calls = []
    real = train.step_stats
    monkeypatch.setattr(train, "step_stats", lambda *a: calls.append(1) or real(*a))
    run_stage(lock, None, tmp_path / "o", tmp_path)
    steps = [json.loads(x)["step"] for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x and "event" not in x]
    assert steps == [1, 5, 10] and len(calls) == 10


def test_runtime_does_not_import_the_compiler():
    import subprocess

    code = ("import sys, llmc.runtime.train, llmc.runtime.ds_train, llmc.runtime.hf_io;"
            "print([m for m in sys.modules if m.startswith('llmc.compiler')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "[]"


def _gpu_check():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_reads_torchtitan_and_llmc_logs():
    gc = _gpu_check()
    esc = "\x1b"
    lines = "\n".join(
        f"[titan] INFO - {esc}[31mstep: {s:2}  {esc}[32mloss:  8.19500  {esc}[38;2;180;60;0mgrad_norm:  0.9815  "
        f"{esc}[38;2;54;234;195mmemory: 21.50GiB(15.35%)  {esc}[34mtps: {t:,}  {esc}[36mtflops: 1.00  "
        f"{esc}[35mmfu: 0.10%{esc}[39m" for s, t in ((1, 500), (5, 30000), (10, 31000), (15, 32000)))
    assert gc.throughput_from_titan(lines, warmup=4) == (31000.0, 4)
    # a validation pass's line (its forward-only tps) is not a training step
    val = f"[titan] INFO - {esc}[33mvalidate step: 15  loss:  7.90000  memory: 20.00GiB(14.00%)  tps: 90,000"
    assert gc.throughput_from_titan(lines + "\n" + val, warmup=4) == (31000.0, 4)
    recs = [{"step": 1, "elapsed_s": 1.0, "tokens": 100}, {"step": 10, "elapsed_s": 3.0, "tokens": 1000},
            {"step": 20, "elapsed_s": 5.0, "tokens": 2000}]
    assert gc.throughput_from_metrics(recs, warmup=5) == (500.0, 0.2)  # (2000-1000)/(5-3), 2 s / 10 steps
    assert gc.gpu_key("NVIDIA H100 80GB HBM3") == "h100-sxm" and gc.gpu_key("NVIDIA H200") == "h200"


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """scripts/gpu_check.sh --cpu-smoke: the whole measuring pipeline on the tiny model (native backend)."""
    import subprocess

    import yaml

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--backends", "native",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = yaml.safe_load((tmp_path / "gpu_check.yaml").read_text())
    (row,) = doc["rows"]
    assert row["backend"] == "native" and row["model"] == "tiny" and row["steps"] == 2
    assert row["tokens_per_s_per_gpu"] > 0 and row["host_rss_gib"] > 0 and row["mem_kind"] == "max_rss"
