"""Hugging Face export: the written safetensors + config.json, run through an independent transcription of
HF's Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE forward (rotate_half RoPE, HF weight names), give our model's
logits."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from llmc.runtime.hf_io import export_hf, hf_export_supported  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.model import MLA, Architecture, MoE  # noqa: E402

BASE = dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=101, max_seq_len=32,
            rope_theta=5000.0)


def hf_forward(sd: dict, cfg: dict, tokens: torch.Tensor) -> torch.Tensor:
    """HF modeling_llama / qwen2 / qwen3 / mixtral / qwen3_moe, written out (no transformers needed)."""
    H, K, hd, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    B, T = tokens.shape
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, dim=-1)  # (T, hd)
    cos, sin = emb.cos(), emb.sin()

    def rot(x):
        return torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        y = x @ sd[name + ".weight"].t()
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def moe(x, p, n_experts, names, renorm):  # softmax over all experts, top-k, optionally renormalised
        w, idx = lin(x, p + "gate").softmax(-1).topk(cfg["num_experts_per_tok"], -1)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(n_experts):
            ex = f"{p}experts.{e}."
            gate, up, down = (ex + n for n in names)
            out = out + lin(F.silu(lin(x, gate)) * lin(x, up), down) * (w * (idx == e)).sum(-1, keepdim=True)
        return out

    h = sd["model.embed_tokens.weight"][tokens]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = lin(x, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(x, p + "self_attn.k_proj").view(B, T, K, hd).transpose(1, 2)
        v = lin(x, p + "self_attn.v_proj").view(B, T, K, hd).transpose(1, 2)
        if cfg["model_type"] in ("qwen3", "qwen3_moe"):  # Qwen3Attention: q_norm / k_norm over each head's dims, before RoPE
            q, k = rms(q, sd[p + "self_attn.q_norm.weight"]), rms(k, sd[p + "self_attn.k_norm.weight"])
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1)
        s = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(mask, float("-inf"))
        h = h + lin((s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        if cfg["model_type"] == "mixtral":  # MixtralSparseMoeBlock: experts' w1 / w3 / w2, always renormalised
            h = h + moe(x, p + "block_sparse_moe.", cfg["num_local_experts"], ("w1", "w3", "w2"), True)
        elif cfg["model_type"] == "qwen3_moe" and i not in cfg["mlp_only_layers"]:  # Qwen3MoeSparseMoeBlock
            h = h + moe(x, p + "mlp.", cfg["num_experts"], ("gate_proj", "up_proj", "down_proj"), cfg["norm_topk_prob"])
        else:
            h = h + lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    h = rms(h, sd["model.norm.weight"])
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    return h @ head.t()


@pytest.mark.parametrize("kw,cls", [
    ({}, "LlamaForCausalLM"),
    ({"tied_embeddings": True}, "LlamaForCausalLM"),
    ({"qkv_bias": True}, "Qwen2ForCausalLM"),
    ({"qk_norm": True}, "Qwen3ForCausalLM"),
    ({"moe": MoE(num_experts=3, top_k=2)}, "MixtralForCausalLM"),
    # the first layer dense (d_ff 80), the others with 3 experts of width 24
    ({"qk_norm": True, "n_layers": 3, "moe": MoE(num_experts=3, top_k=2, expert_d_ff=24, dense_layers=1)},
     "Qwen3MoeForCausalLM"),
    # the picked experts' scores as they are (norm_topk_prob false: Qwen1.5 / 2-MoE, OLMoE, transformers' default)
    ({"qk_norm": True, "n_layers": 3, "moe": MoE(num_experts=3, top_k=2, expert_d_ff=24, route_norm=False)},
     "Qwen3MoeForCausalLM"),
])
def test_export_matches_independent_hf_forward(tmp_path, kw, cls):
    arch = Architecture(**{**BASE, **kw})
    model = build_model(arch, seed=0)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    out = export_hf(model.state_dict(), arch, tmp_path / "hf", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls]
    sd = load_file(str(out / "model.safetensors"))
    assert sum(v.numel() for v in sd.values()) == model.num_params()
    tokens = torch.randint(0, arch.vocab_size, (2, 13))
    torch.testing.assert_close(hf_forward(sd, cfg, tokens), model(tokens), rtol=1e-4, atol=1e-4)


def test_export_refuses_unsupported():
    mla = MLA(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
    assert hf_export_supported(Architecture(**BASE, mla=mla)) is None  # DeepseekV3ForCausalLM (test_hf_deepseek)
    arch = Architecture(**BASE, mla=mla, moe=MoE(num_experts=4, top_k=2, num_shared_experts=1))  # softmax router,
    assert "DeepseekV2ForCausalLM routes softmax top-k unnormalised" in hf_export_supported(arch)  # renormalised
    assert hf_export_supported(arch.model_copy(update={"moe": arch.moe.model_copy(update={"route_norm": False})})) \
        is None  # DeepSeek-V2's
    with pytest.raises(ValueError, match="cannot export"):
        export_hf({}, arch, "/nonexistent")
    ds_moe = Architecture(**BASE, moe=MoE(num_experts=4, top_k=2, num_shared_experts=1, score_func="sigmoid"))
    assert hf_export_supported(ds_moe) is None  # sigmoid routing without MLA: Glm4MoeForCausalLM (test_glm4_moe)
    no_shared = ds_moe.model_copy(update={"moe": ds_moe.moe.model_copy(update={"num_shared_experts": 0})})
    assert "always has shared experts" in hf_export_supported(no_shared)
    q3 = Architecture(**BASE, qk_norm=True, moe=MoE(num_experts=4, top_k=2, num_shared_experts=1))
    assert "only Qwen3-MoE-style" in hf_export_supported(q3)  # Qwen3MoeForCausalLM has no shared experts
    unnormalised = Architecture(**BASE, moe=MoE(num_experts=3, top_k=2, route_norm=False))
    assert "Mixtral always renormalises" in hf_export_supported(unnormalised)


def test_export_of_damaged_run_files_is_one_error_line(tmp_path):
    """`llmc export` on what a crash or a hand edit leaves: a DCP checkpoint whose metadata is not a pickle (torch's
    CheckpointException is a BaseException, and its loader logs tracebacks on the root logger), a DONE.json of the
    wrong shape, a FIFO where the lock should be, a stage name starting with '-': exit 1, one line, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}

    def llmc(*args):
        return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=tmp_path)

    b = tmp_path / "b"
    assert llmc("build", str(root / "examples/tiny_cpu.yaml"), "-o", str(b)).returncode == 0
    (b / "run/pretrain/step-1").mkdir(parents=True)
    (b / "run/pretrain/step-1/.metadata").write_text("x")
    cases = [("pretrain", None)]
    for done in ("[]", '{"checkpoint": 5}'):
        cases.append(("pretrain", done))
    for stage, done in cases + [("-x", None)]:
        if done is not None:
            import shutil

            shutil.rmtree(b / "run/pretrain/step-1", ignore_errors=True)
            (b / "run/pretrain/DONE.json").write_text(done)
        r = llmc("export", str(b), f"--stage={stage}")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "error[R010]" in lines[0], r.stderr[-1500:]
        assert "Traceback" not in r.stderr and "INTERNAL" not in r.stderr
    fifo = tmp_path / "f"
    fifo.mkdir()
    os.mkfifo(fifo / "plan.lock.json")
    r = llmc("export", str(fifo), "--stage", "pretrain")  # (would block forever reading it)
    assert r.returncode == 1 and "not a regular file" in r.stderr, r.stderr


def test_export_refuses_a_checkpoint_that_fails_its_manifest(tmp_path):
    """`llmc export` reads a stage's final checkpoint only as its manifest's sha256s say it was written (as a resume or
    a next stage's init_from does): flipped bytes in model.pt are one R010 line, not a silently different export."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llmc.runtime.checkpoint import save_checkpoint
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}

    def llmc(*args):
        return subprocess.run([sys.executable, "-m", "llmc.cli", *args], capture_output=True, text=True, timeout=300,
                              env=env, cwd=tmp_path)

    b = tmp_path / "b"
    assert llmc("build", str(root / "examples/tiny_cpu.yaml"), "-o", str(b)).returncode == 0
    job = TrainJob.from_lock(json.loads((b / "plan.lock.json").read_text()), "pretrain")
    stage = b / "run/pretrain"
    ck = save_checkpoint(stage / "checkpoints", 3, build_model(job.arch, torch.device("cpu"), seed=0), None,
                         {"tokens": 0, "stage": "pretrain"})
    (stage / "DONE.json").write_text(json.dumps({"status": "done", "step": 3, "checkpoint": str(ck)}))
    r = llmc("export", str(b), "--stage", "pretrain", "-o", str(tmp_path / "good"))
    assert r.returncode == 0 and (tmp_path / "good/config.json").exists(), r.stderr[-1500:]
    data = bytearray((ck / "model.pt").read_bytes())
    data[-4096:-4000] = bytes(96)  # inside the last tensor's storage
    (ck / "model.pt").write_bytes(bytes(data))
    r = llmc("export", str(b), "--stage", "pretrain", "-o", str(tmp_path / "bad"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "error[R010]" in lines[0] and "sha256" in lines[0], r.stderr[-1500:]
    assert not (tmp_path / "bad").exists()


def test_export_reads_only_the_model_of_a_torchtitan_checkpoint_and_in_the_export_dtype(tmp_path, monkeypatch):
    """A torchtitan checkpoint holds the model (fp32, flattened into the top level) and the optimizer's two fp32
    moments per parameter, the LR schedule, data loader and train state: 12 B per parameter, 4.9 TB for a 405B
    model. Exporting it must read the model's tensors only, straight into the export's dtype, with no temporary
    copy of the whole checkpoint (as torch's dcp_to_torch_save makes): the bytes read are checked against the DCP
    reader's own plan, the values against the model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from llmc.runtime import hf_io

    arch = Architecture(name="t", **BASE)
    torch.manual_seed(0)
    model_sd = {k: v.detach().clone() for k, v in build_model(arch).state_dict().items()}
    titan = {k.replace(".attention.", ".attention.qkv_linear.") if ".attention.w" in k and
             any(f".w{x}." in k for x in "qkv") else k: v for k, v in model_sd.items()}
    optim = {f"optimizer.state.{k}.{m}": torch.randn_like(v) for k, v in model_sd.items() for m in ("exp_avg",
                                                                                                    "exp_avg_sq")}
    ck = tmp_path / "outputs/checkpoint/step-10"
    dcp.save({**titan, **optim, "train_state": {"step": torch.tensor(10)},
              "lr_scheduler": {"last_epoch": torch.tensor(10)}}, checkpoint_id=str(ck), no_dist=True)
    read: list[str] = []
    real_read = FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.dest_index.fqn for item in plan.items)
        return real_read(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no-tmp"))  # (missing: a temporary file would fail)
    sd, source = hf_io._model_state(ck, dtype=torch.bfloat16)
    assert source == "torchtitan"
    assert read and not [k for k in read if k.split(".", 1)[0] in ("optimizer", "train_state", "lr_scheduler")]
    assert set(sd) == set(model_sd)
    for k, v in model_sd.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], v.to(torch.bfloat16)), k
