"""Long-context plans: RoPE scaling checks (T107 replacement, T109 reach), P004's causes when CP is out of reach or
cannot split the sequence, the memory torchtitan's FlexAttention CP allocates, its load balancer, and what the
DeepSpeed fallback would need.

Figures are checked against independent sources: torchtitan 0.3.0's own RoPE code (the frequencies its job rotates
with), torch's context-parallel load balancers and custom ops, arithmetic written out here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from llmc.compiler.compile import compile_spec
from llmc.spec.load import loads_spec
from llmc.spec.model import RopeScaling

# Meta-Llama-3.1-8B's config.json (the fields llmc reads)
HF31 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}

STAGE = """\
name: lc
model: {model}
hardware: {{gpu: h100-sxm, count: {gpus}, gpus_per_node: 8}}
data:
  sources: [{{name: web, path: /data/web/*.jsonl}}]
  tokenizer: {{path: /models/llama3-tokenizer}}
  seq_len: 8192
  tokens: 15T
training: {{precision: bf16, global_batch_tokens: 4194304}}
stages:
  - name: long_context
    kind: long_context
    init_hf: /models/base
    seq_len: {seq}
    {rope}
    global_batch_tokens: 4194304
    data:
      sources: [{{name: long, path: /data/long/*.jsonl}}]
      seq_len: {seq}
      tokens: 1B
"""

PRE = """\
name: lc8b
model: {model}
hardware: {{gpu: h100-sxm, count: {gpus}, gpus_per_node: 8}}
data:
  sources: [{{name: long, path: /data/long/*.jsonl}}]
  tokenizer: {{path: /models/llama3-tokenizer}}
  seq_len: {seq}
  tokens: 2B
training: {{precision: bf16, global_batch_tokens: {gbt}{extra}}}
{par}"""


def _compile(text: str, tmp_path: Path | None = None, **options):
    file = str(tmp_path / "spec.yaml") if tmp_path is not None else "spec.yaml"
    if tmp_path is not None:
        Path(file).write_text(text)
    run, lines = loads_spec(text, file=file)
    return compile_spec(run, file, lines, spec_bytes=text.encode(), **options)


def _diags(c, code):
    return [d for d in c.diagnostics if d.code == code]


def _hf31(tmp_path: Path) -> str:
    d = tmp_path / "hf31"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(HF31))
    return str(d / "config.json")


def _titan_freqs(scaling: RopeScaling | None, dim: int = 128, theta: float = 500000.0) -> list[float]:
    """The inverse frequencies torchtitan 0.3.0's ComplexRoPE rotates with (its cache's angle at position 1)."""
    import torch
    from torchtitan.models.common import ComplexRoPE

    kw = {}
    if scaling is not None and scaling.type == "llama3":
        kw = dict(scaling="llama", scaling_factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
                  high_freq_factor=scaling.high_freq_factor,
                  original_max_position_embeddings=scaling.original_max_position)
    elif scaling is not None:
        kw = dict(scaling="yarn", rope_factor=scaling.factor, beta_fast=scaling.beta_fast, beta_slow=scaling.beta_slow,
                  original_seq_len=scaling.original_max_position)
    cache = ComplexRoPE(ComplexRoPE.Config(dim=dim, max_seq_len=2, theta=theta, **kw)).cache
    return torch.angle(cache[1]).double().tolist()


LLAMA31 = RopeScaling(type="llama3", factor=8, original_max_position=8192)


# ---------------------------------------------------------------------------------------------- RoPE (1, 2)


@pytest.mark.parametrize("scaling", [None, LLAMA31, RopeScaling(type="yarn", factor=4, original_max_position=131072),
                                     RopeScaling(type="yarn", factor=64, original_max_position=8192)])
def test_rope_inv_freq_is_torchtitans(scaling):
    from llmc.rope import rope_inv_freq

    mine, titan = rope_inv_freq(128, 500000.0, scaling), _titan_freqs(scaling)
    assert all(abs(a - b) <= 1e-5 * a for a, b in zip(mine, titan, strict=True))


def test_stage_rope_scaling_replacing_llama31_is_flagged(tmp_path):
    cfg = _hf31(tmp_path)
    rope = "rope_scaling: {type: yarn, factor: 4, original_max_position: 131072}"
    c = _compile(STAGE.format(model=f"{{hf_config: {cfg}}}", gpus=64, seq=524288, rope=rope), tmp_path)
    (d,) = _diags(c, "T107")
    assert d.severity == "warning" and d.path == "stages.0.rope_scaling"
    old, new = _titan_freqs(LLAMA31), _titan_freqs(RopeScaling(type="yarn", factor=4, original_max_position=131072))
    ratio = [n / o for n, o in zip(new, old, strict=True)]
    changed = sum(abs(r - 1) > 0.01 for r in ratio)
    assert changed == 35 and f"{changed} of 64" in d.message and f"{ratio[-1]:.1f}x" in d.message
    assert f"{max(ratio):.1f}x" in d.message
    # the hint's YaRN from the original 8,192 tokens with the whole factor (524,288 / 8,192 = 64), or llama3's rule
    # reaching 2 x 32 x 8,192
    assert "{type: yarn, factor: 64, original_max_position: 8192}" in d.hint
    assert "{type: llama3, factor: 32, original_max_position: 8192}" in d.hint
    # torchtitan's RoPE config takes both scalings
    from torchtitan.models.common.rope import RoPE

    assert {"llama", "yarn"} <= set(RoPE.Config.__annotations__["scaling"].__args__)
    for fix in ("{type: yarn, factor: 64, original_max_position: 8192}",
                "{type: llama3, factor: 32, original_max_position: 8192}"):
        c = _compile(STAGE.format(model=f"{{hf_config: {cfg}}}", gpus=64, seq=524288, rope=f"rope_scaling: {fix}"),
                     tmp_path)
        assert not _diags(c, "T107") and not _diags(c, "T109"), fix


def test_stage_scaling_short_of_its_length(tmp_path):
    rope = "rope_scaling: {type: yarn, factor: 4, original_max_position: 8192}"
    c = _compile(STAGE.format(model="llama3-8b", gpus=8, seq=131072, rope=rope))
    (d,) = _diags(c, "T109")
    assert d.severity == "warning" and "32,768" in d.message  # 4 x 8,192
    assert "factor: 16" in d.hint  # 131,072 / 8,192: what T107 recommends without a RoPE change
    ok = "rope_scaling: {type: yarn, factor: 16, original_max_position: 8192}"
    assert not _diags(_compile(STAGE.format(model="llama3-8b", gpus=8, seq=131072, rope=ok)), "T109")


@pytest.mark.parametrize("init", [False, True])
def test_pretraining_past_llama31_positions(init):
    extra = ", init_hf: /models/Meta-Llama-3.1-8B" if init else ""
    spec = PRE.format(model="{preset: llama3.1-8b, max_seq_len: 1048576}", gpus=64, seq=1048576, gbt=4194304,
                      extra=extra, par="")
    (d,) = _diags(_compile(spec, fit_check=False), "T109")
    # Llama 3.1's scaling (x8 from 8,192) was released for 131,072 positions (its config.json)
    assert "131,072" in d.message and d.path == "data.seq_len"
    assert d.severity == ("warning" if init else "info")
    assert "factor: 128, original_max_position: 8192" in d.hint  # YaRN: 1,048,576 / 8,192
    within = PRE.format(model="llama3.1-8b", gpus=8, seq=131072, gbt=4194304, extra=extra, par="")
    assert not _diags(_compile(within), "T109")


# ---------------------------------------------------------------------------------------------- P004 (3, 4)


@pytest.mark.parametrize("gpus", [8, 128])
def test_p004_names_cp_when_only_cp_would_fit(gpus):
    spec = PRE.format(model="llama3.1-8b", gpus=gpus, seq=262144, gbt=4194304 * (gpus // 8), extra="", par="")
    (d,) = _diags(_compile(spec), "P004")
    assert "context parallelism" in d.hint and "max_seq_len" in d.hint and "about 1." not in d.hint
    # the layout it names fits the GPU on torchtitan's memory model: parse it back
    import re

    from llmc.compiler import memory
    from llmc.compiler.hardware import get_gpu
    from llmc.compiler.plan import ParallelPlan
    from llmc.compiler.search import usable_bytes
    from llmc.spec.presets import PRESETS

    m = re.search(r"tp(\d+) cp(\d+) dp_shard(\d+)", d.hint)
    t, c, ds = map(int, m.groups())
    assert t * c * ds == gpus and c > 1
    gpu = get_gpu("h100-sxm")
    mem = memory.memory_per_gpu(PRESETS["llama3.1-8b"], ParallelPlan(tp=t, cp=c, dp_shard=ds,
                                activation_checkpointing="full"), 262144, "bf16", gpu.hbm_bytes, backend="torchtitan")
    assert mem.per_gpu_bytes <= usable_bytes(gpu.hbm_bytes, "torchtitan")


def test_p004_cp_seq_divisibility_is_the_cause():
    from torch.distributed.tensor.experimental._context_parallel._attention import _create_cp_block_mask
    from torchtitan.models.common.attention import get_causal_mask_mod

    spec = PRE.format(model="{preset: llama3.1-8b, max_seq_len: 1048576}", gpus=64, seq=131000, gbt=4192000,
                      extra="", par="parallelism: {cp: 8}")
    (d,) = _diags(_compile(spec), "P004")
    assert d.path == "data.seq_len" and "lcm(128, tp) = 1024" in d.message and "does not divide" not in d.message

    class _Mesh:
        def __init__(self, n):
            self.n = n

        def size(self):
            return self.n

    # torch shards the job's flex mask over 8 CP ranks in 128-token blocks: 131,000 is refused, 131,072 is not cut
    # short by that rule (it goes on to build the mask)
    with pytest.raises(NotImplementedError, match="not divisible"):
        _create_cp_block_mask(get_causal_mask_mod(), 1, 1, 131000, 131000, _Mesh(8))
    assert 131072 % (8 * 128) == 0 and 131000 % (8 * 128)
    # the hint's nearby lengths and CP degrees: multiples of cp x 128 (tp 1)
    assert "130,048" in d.hint and "131,072" in d.hint and "cp" not in d.hint.split("131,072")[1]


# ---------------------------------------------------------------------------------------------- CP memory (5)


def test_flex_cp_allgather_saves_nothing_and_flex_attention_saves_gathered_kv():
    """torch's own code: the all-gather's autograd keeps no tensor; flex_attention saves its key and value inputs
    (the gathered ones), which is why a block whose activations are kept holds the whole sequence's K/V."""
    import importlib
    import inspect

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.experimental._context_parallel._cp_custom_ops import flex_cp_allgather

    fa = importlib.import_module("torch._higher_order_ops.flex_attention")
    src = inspect.getsource(fa.FlexAttentionAutogradOp.forward)
    assert "save_values_for_backward" in src and "key,\n                value," in src
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    pg = dist._get_process_group_name(dist.group.WORLD)
    k, v = torch.randn(1, 2, 8, 4, requires_grad=True), torch.randn(1, 2, 8, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gk, gv = flex_cp_allgather(k, v, 2, pg)
    assert saved == []
    (gk.sum() + gv.sum()).backward()  # its backward reduce-scatters the gathered tensors' gradients
    assert k.grad.shape == k.shape


def test_cp_memory_adds_gathered_kv():
    from llmc.compiler import memory
    from llmc.compiler.plan import ParallelPlan
    from llmc.spec.presets import PRESETS

    arch = PRESETS["llama3.1-8b"]
    kv_layer = 2 * 8 * 128 * 2  # K and V, 8 kv heads x 128, bf16, per token
    for cp, ac in ((8, "none"), (4, "full"), (2, "selective")):
        seq = 32768 * cp
        plan = ParallelPlan(cp=cp, dp_shard=64 // cp, activation_checkpointing=ac)
        flex = memory.memory_per_gpu(arch, plan, seq, "bf16", 80e9, backend="torchtitan")
        ring = memory.memory_per_gpu(arch, plan, seq, "bf16", 80e9, backend="torchtitan", cp_attention="ring")
        whole = seq * kv_layer  # one layer's K + V over the whole sequence
        kept = 32 * whole * (1 - 1 / cp) if ac == "none" else 0  # no AC: every block keeps its gathered K/V
        work = whole * (1 if ac == "none" else 2)  # their gradients (+ the re-gathered K/V when recomputed)
        got = flex.breakdown["activations"] - ring.breakdown["activations"]
        assert got == pytest.approx(kept + work, abs=2), (cp, ac)
    # no CP, or a backend without CP's all-gather: nothing added
    plan = ParallelPlan(cp=1, dp_shard=64, activation_checkpointing="none")
    assert (memory.memory_per_gpu(arch, plan, 32768, "bf16", 80e9, backend="torchtitan").breakdown ==
            memory.memory_per_gpu(arch, plan, 32768, "bf16", 80e9, backend="torchtitan",
                                  cp_attention="ring").breakdown)


def test_cp_load_balancer_ptrr_with_document_masks():
    """torch's PTRR balancer splits the job's block-causal document mask (torchtitan's mask mods) when the sequence
    is whole 128-token blocks a multiple of cp, and refuses otherwise: the rule the emitter keys 'ptrr' on."""
    import torch
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _PTRRLoadBalancer
    from torch.nn.attention.flex_attention import and_masks, create_block_mask
    from torchtitan.models.common.attention import (
        get_causal_mask_mod,
        get_efficient_causal_mask_mod_for_packed_document,
    )

    from llmc.emit.torchtitan import cp_load_balancer

    seq = 1024
    positions = torch.cat([torch.arange(300), torch.arange(500), torch.arange(224)]).repeat(2, 1)  # 3 documents
    mask = create_block_mask(and_masks(get_causal_mask_mod(), get_efficient_causal_mask_mod_for_packed_document(
        positions)), 2, None, seq, seq, device="cpu")
    for cp in (2, 4, 8):
        idx = _PTRRLoadBalancer(mask, cp)._generate_indices()
        assert idx.shape == (2, seq) and torch.equal(idx.sort(dim=1).values[0], torch.arange(seq))
        assert cp_load_balancer(seq, cp) == "ptrr"
    with pytest.raises(NotImplementedError):  # 8 blocks over 16 ranks
        _PTRRLoadBalancer(mask, 16)._generate_indices()
    # torch shards a CP flex mask in whole blocks whatever the balancer (a "headtail" fallback crashed at the first
    # step): the plan refuses such a length (X306) and the job always says "ptrr"
    from torch.distributed.tensor.experimental._context_parallel._attention import _create_cp_block_mask

    from llmc.compiler.backends import torchtitan_layout_problem
    from llmc.spec.presets import PRESETS

    class _Mesh:  # (the one thing _create_cp_block_mask asks of the mesh before refusing)
        def size(self):
            return 2

    with pytest.raises(NotImplementedError, match="not divisible"):
        _create_cp_block_mask(get_causal_mask_mod(), 1, 1, 40000, 40000, _Mesh())
    arch = PRESETS["llama3.1-8b"]
    assert torchtitan_layout_problem(arch, 40000, 1, 2, 1, True).code == "X306"
    assert torchtitan_layout_problem(arch, 40192, 1, 2, 1, True) is None  # 157 blocks of 128 x 2 ranks
    assert torchtitan_layout_problem(arch, 131072, 2, 8, 1, True) is None
    assert cp_load_balancer(seq, 16) == "ptrr" and cp_load_balancer(seq, 1) is None


def test_emitted_cp_job_sets_ptrr(tmp_path):
    from llmc.buildfs import write_build
    from llmc.emit import render_artifacts

    spec = PRE.format(model="llama3.1-8b", gpus=8, seq=131072, gbt=4194304, extra="", par="")
    c = _compile(spec)
    assert c.plan.cp > 1
    write_build(tmp_path / "b", render_artifacts(c))
    module = tmp_path / "b" / "torchtitan" / "llmc_job.py"
    assert "context_parallel_load_balancer='ptrr'" in module.read_text()
    from torchtitan.config import ConfigManager

    sys.path.insert(0, str(module.parent))
    sys.modules.pop(module.stem, None)
    try:
        cfg = ConfigManager().parse_args(["--module", module.stem, "--config", "job"])
    finally:
        sys.path.remove(str(module.parent))
        sys.modules.pop(module.stem, None)
    assert cfg.parallelism.context_parallel_load_balancer == "ptrr"


# ---------------------------------------------------------------------------------------------- DeepSpeed (6)


def test_x103_says_the_deepspeed_fallback_does_not_fit():
    from llmc.emit.deepspeed import deepspeed_config

    spec = PRE.format(model="llama3.1-8b", gpus=8, seq=131072, gbt=4194304, extra="", par="")
    c = _compile(spec)
    assert c.plan.cp > 1
    _, diags = deepspeed_config(c)
    (d,) = [d for d in diags if d.code == "X103"]
    # one whole 131,072-token sequence's fp32 logits (128,256 entries) and their gradient alone exceed the 80 GB GPU
    # (the folded run keeps the plan's loss, not in slices)
    assert c.plan.loss_chunk_tokens == 0 and 131072 * 128256 * (4 + 4) > 80e9
    assert "does not fit" in d.message and "131,072-token" in d.message


def test_p018_names_llmcs_runner_not_deepspeed():
    import deepspeed

    assert (Path(deepspeed.__file__).parent / "runtime" / "sequence_parallel" / "ulysses_sp.py").exists()
    spec = PRE.format(model="llama3.1-8b", gpus=8, seq=131072, gbt=4194304, extra=", backend: deepspeed",
                      par="parallelism: {cp: 4}")
    (d,) = [d for d in _diags(_compile(spec), "P018") if d.path == "parallelism.cp"]
    assert "llmc's deepspeed runner runs data parallelism" in d.message
    assert "Ulysses" in d.message and "which llmc's DeepSpeed runner, llmc.runtime.ds_train, does not use" in d.message


def test_rope_reach_rule():
    from llmc.rope import rope_factor_for, rope_reach

    assert rope_reach(LLAMA31) == 131072  # Meta-Llama-3.1-8B: max_position_embeddings
    assert rope_reach(RopeScaling(type="yarn", factor=40, original_max_position=4096)) == 163840  # DeepSeek-V3
    assert rope_factor_for("yarn", 524288, 8192) == 64 and rope_factor_for("llama3", 524288, 8192) == 32
    assert math.isclose(rope_factor_for("yarn", 131073, 8192), 17)
