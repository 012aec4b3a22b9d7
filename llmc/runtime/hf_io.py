"""Hugging Face checkpoints in and out: start a stage from a pretrained model, end it with a servable one.

In: :func:`load_hf_into` reads a local directory (``config.json`` + ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``) or a Hub id already in the local
Hugging Face cache (:func:`resolve_hf_source`, never the network), checks every name and shape against
the model built from the spec, and copies the tensors in one at a time through ``safetensors.safe_open``
(peak extra memory: the largest single tensor, never the whole model):

* plain module: ``param.copy_``;
* FSDP2 / TP (DTensor parameters): each rank keeps only its shard, cut from the full tensor locally with
  ``distribute_tensor(..., src_data_rank=None)`` (no communication);
* DeepSpeed ZeRO-3 (parameters partitioned by ``deepspeed.zero.Init``): per parameter,
  ``deepspeed.zero.GatheredParameters([p], modifier_rank=0)``; rank 0 reads the file and DeepSpeed
  re-partitions its value to every rank on exit.

Out: :func:`export_hf` writes config.json, generation_config.json (a model that started from a Hugging Face
checkpoint keeps that checkpoint's, and its end-of-sequence ids), sharded safetensors
(``huggingface_hub.split_torch_state_dict_into_shards``, plus the index when sharded) and the tokenizer
files (with a Jinja ``chat_template`` for chat stages); :func:`export_peft_adapter` writes LoRA adapters
in PEFT's format; :func:`export_checkpoint` does both from any finished stage; ``python -m
llmc.runtime.hf_io RUN_DIR --stage S`` is its command line (:func:`main`; both live in :mod:`llmc.runtime.export`, which
checks the lock, the stage and its output before torch is imported).

Name mapping (llmc/torchtitan <-> HF Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE), as HF
``convert_llama_weights_to_hf.py``::

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.N.attention_norm.weight         model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight               model.layers.N.post_attention_layernorm.weight
                                           (OLMo 2: attention_norm <-> post_attention_layernorm, ffn_norm <->
                                           post_feedforward_layernorm, the norms of the branches' outputs)
    layers.N.attention.{wq,wk,wv,wo}.*     model.layers.N.self_attn.{q,k,v,o}_proj.*   (wq, wk rows permuted)
    layers.N.feed_forward.{w1,w3,w2}.weight  model.layers.N.mlp.{gate,up,down}_proj.weight
    layers.N.moe.router.gate.weight        model.layers.N.block_sparse_moe.gate.weight
    layers.N.moe.experts.wK  [E, ...]      model.layers.N.block_sparse_moe.experts.{e}.wK.weight
    norm.weight, lm_head.weight            model.norm.weight, lm_head.weight
    layers.N.attention.{q_norm,k_norm}.weight  model.layers.N.self_attn.{q_norm,k_norm}.weight  (Qwen3, Qwen3-MoE)
    layers.N.moe.router.gate.weight        model.layers.N.mlp.gate.weight                      (Qwen3-MoE)
    layers.N.moe.experts.{w1,w3,w2} [E,..] model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight  (Qwen3-MoE)

Phi-3 / Phi-4 checkpoints (``model_type: phi3``, ``Phi3ForCausalLM``: a Llama block whose checkpoint fuses the
projections, transformers ``modeling_phi3.py``) are read by row ranges of the fused tensors::

    layers.N.attention.{wq,wk,wv}.weight   model.layers.N.self_attn.qkv_proj.weight rows [0, H hd), [H hd, (H+K) hd),
                                           [(H+K) hd, (H+2K) hd)                        (wq, wk rows permuted)
    layers.N.feed_forward.{w1,w3}.weight   model.layers.N.mlp.gate_up_proj.weight rows [0, F), [F, 2F) (gate, up)

and exported as ``LlamaForCausalLM`` (the same computation), except a model with partial RoPE (Phi-4-mini: the first
``rotary_dim`` rows of each q/k head are permuted, the rest never rotate), which Llama cannot express: it is written
back as ``Phi3ForCausalLM`` with the fused tensors. Granite (``GraniteForCausalLM``) has Llama's names.

RoPE: llmc rotates adjacent pairs (Meta layout); HF rotates halves (``rotate_half``). The export permutes
the q/k rows per head as HF's ``permute`` (pairs -> halves); the import applies the inverse.

GLM-4.5 / GLM-4.5-Air / GLM-4.6 (``Glm4MoeForCausalLM``, transformers ``modeling_glm4_moe.py``) have Llama's attention
names with q/k/v biases and (``use_qk_norm``) Qwen3's ``q_norm`` / ``k_norm``; only the first
int(head_dim x partial_rotary_factor) rows of each q/k head (and of the q/k norm weights) are permuted, the rest never
rotate. Their MoE layers have DeepSeek-V3's names (``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``,
``mlp.experts.{e}.*``, ``mlp.shared_experts.*``); the MTP layers after the last layer (``num_nextn_predict_layers``)
are left out, as for DeepSeek-V3, and the export writes none.

gpt-oss (``GptOssForCausalLM``, transformers ``modeling_gpt_oss.py``; gpt-oss-20b / 120b in bf16) has Llama's attention
names with biases on q/k/v (rows permuted as the weights') and o_proj, plus ``self_attn.sinks``; its experts are stored
stacked and transposed (``x @ W``), gate and up interleaved along the columns of one tensor::

    layers.N.attention.sinks               model.layers.N.self_attn.sinks
    layers.N.moe.router.gate.{weight,bias} model.layers.N.mlp.router.{weight,bias}
    layers.N.moe.experts.w1 / w3 [E,F,D]   model.layers.N.mlp.experts.gate_up_proj [E,D,2F]: columns 0::2 / 1::2,
                                           transposed
    layers.N.moe.experts.b1 / b3 [E,F]     model.layers.N.mlp.experts.gate_up_proj_bias [E,2F]: columns 0::2 / 1::2
    layers.N.moe.experts.w2 [E,D,F]        model.layers.N.mlp.experts.down_proj [E,F,D], transposed
    layers.N.moe.experts.b2 [E,D]          model.layers.N.mlp.experts.down_proj_bias

The released checkpoints store the experts in MXFP4 (``quantization_config.quant_method: mxfp4``,
``gate_up_proj_blocks`` / ``_scales``): refused with one line (dequantize them to bf16 with transformers first).

DeepSeek-V3 (MLA + DeepSeekMoE) <-> transformers ``DeepseekV3ForCausalLM`` (``modeling_deepseek_v3.py``;
the checkpoint layout of https://huggingface.co/deepseek-ai/DeepSeek-V3, experts stored one by one)::

    layers.N.attention.wq_a / q_norm / wq_b  model.layers.N.self_attn.q_a_proj / q_a_layernorm / q_b_proj
    layers.N.attention.wq   (q_lora_rank None)  model.layers.N.self_attn.q_proj
    layers.N.attention.wkv_a / kv_norm / wkv_b  model.layers.N.self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj
    layers.N.attention.wo                  model.layers.N.self_attn.o_proj
    layers.N.feed_forward.{w1,w3,w2}       model.layers.N.mlp.{gate,up,down}_proj        (N < first_k_dense_replace)
    layers.N.moe.router.gate.weight        model.layers.N.mlp.gate.weight
    layers.N.moe.expert_bias               model.layers.N.mlp.gate.e_score_correction_bias  (zeros when absent)
    layers.N.moe.experts.{w1,w3,w2} [E,..] model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight
    layers.N.moe.shared_experts.{w1,w3,w2} model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight

No row permutation: the config says ``rope_interleave: true`` (HF's default, DeepSeek's own layout), so HF
rotates the rope dims as adjacent pairs like llmc; a checkpoint with ``rope_interleave: false`` has its rope
rows (per head of q, the shared key of kv_a) in rotate_half order and is read through the inverse permutation. YaRN
is read and written with DeepSeek's ``mscale`` / ``mscale_all_dim`` (``RopeScaling``): the softmax scale times
m(mscale_all_dim)^2 and cos/sin times m(mscale) / m(mscale_all_dim), as transformers, llmc's model and torchtitan's
deepseek_v3 compute them (without them, cos/sin times 0.1 ln(factor) + 1: the torchtitan job's TemperedRoPE).
transformers' router (``DeepseekV3TopkRouter``) masks the experts of unselected groups with -inf, llmc's (like the
reference ``MoEGate``) with 0: the picks differ only when fewer than top_k experts of the selected groups
have a positive biased score (sigmoid + e_score_correction_bias). DeepSeek-V2 / V2.5 (softmax-routed experts) are
``DeepseekV2ForCausalLM`` with the same names and no e_score_correction_bias; their ``topk_method:
group_limited_greedy`` (a group scored by its best expert, the others' scores set to 0, as llmc's ``group_score:
max``) is read and written with n_group / topk_group, ``greedy`` without groups. transformers' (and DeepSeek's reference)
q_a_layernorm / kv_a_layernorm use eps 1e-6 whatever ``rms_norm_eps`` says; llmc's q_norm / kv_norm use the
spec's ``norm_eps``: the logits are equal when norm_eps is 1e-6 (DeepSeek-V3's value), close otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmc.fileio import expand_user
from llmc.hf_export import hf_export_supported, no_export_line
from llmc.runtime.errors import HFError
from llmc.runtime.export import main  # ``python -m llmc.runtime.hf_io``
from llmc.spec.chat import CHAT_TEMPLATES
from llmc.spec.families import FUSED_HF_MODEL_TYPES, family_of
from llmc.spec.hf import HF_ACTIVATIONS, quantization_method
from llmc.spec.schema import LORA_HF_NAMES
from llmc.weight_init import init_scheme

HF_TARGETS = {ours: hf for hf, ours in LORA_HF_NAMES.items()}  # llmc's LoRA target -> its HF module name
_IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved

# ----------------------------------------------------------------------------- names


@dataclass(frozen=True)
class HFParam:
    """Where one llmc parameter lives in an HF checkpoint: one name, or E per-expert names stacked on dim 0;
    ``heads`` = number of heads whose rows are RoPE-permuted (q/k weights and biases), else None; ``rope`` =
    (blocks, r): only the last r rows of each of the equal row blocks are (MLA with ``rope_interleave: false``)."""

    hf: tuple[str, ...]
    heads: int | None = None
    stacked: bool = False
    rope: tuple[int, int] | None = None
    # (start, stop, rows): rows [start, stop) of a fused HF tensor of that many rows (Phi-3's qkv_proj, gate_up_proj)
    rows: tuple[int, int, int] | None = None
    rotary: int | None = None  # with ``heads``: only the first this many rows of each head are RoPE-permuted
    # gpt-oss's stacked experts: "gate" / "up" (the even / odd columns of gate_up_proj [E, D, 2F], transposed; of its
    # bias [E, 2F]), "down" (down_proj [E, F, D] transposed)
    experts: str | None = None


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved-pair RoPE rows -> HF rotate_half rows (HF ``convert_llama_weights_to_hf`` ``permute``):
    per head, rows [x0, x1, x2, x3, ...] become [x0, x2, ..., x1, x3, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`_hf_permute` (HF rotate_half rows -> Meta interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _heads_permuted(w: torch.Tensor, n_heads: int, rotary: int | None,
                    fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``fn`` (:func:`_hf_permute` / :func:`_hf_unpermute`) on each of ``n_heads`` row blocks, or with partial RoPE
    (``rotary`` rows of a head rotate: Phi-4-mini) on the first ``rotary`` rows of each (the rest never rotate)."""
    if not n_heads:
        return w
    if rotary is None or rotary * n_heads == w.shape[0]:
        return fn(w, n_heads)
    b = w.reshape(n_heads, -1, *w.shape[1:])
    rot = fn(b[:, :rotary].reshape(n_heads * rotary, *w.shape[1:]), n_heads).reshape(n_heads, rotary, *w.shape[1:])
    return torch.cat([rot, b[:, rotary:]], dim=1).reshape(w.shape)


def _gpt_oss_experts(t: torch.Tensor, kind: str) -> torch.Tensor:
    """One llmc expert tensor from a gpt-oss checkpoint tensor (:attr:`HFParam.experts`): gate / up take the even /
    odd last-dim entries (``GptOssExperts._apply_gate``: gate_up[..., ::2], gate_up[..., 1::2]); the 3-D weights are
    stored transposed (``x @ W``)."""
    if kind in ("gate", "up"):
        t = t[..., 0::2] if kind == "gate" else t[..., 1::2]
    return t.transpose(1, 2) if t.dim() == 3 else t


def _gpt_oss_experts_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The shape :func:`_gpt_oss_experts` gives a checkpoint tensor of ``shape``."""
    if kind in ("gate", "up"):
        shape = (*shape[:-1], shape[-1] // 2)
    return (shape[0], shape[2], shape[1]) if len(shape) == 3 else tuple(shape)


def _rope_tail(w: torch.Tensor, blocks: int, r: int, fn: Callable[[torch.Tensor, int], torch.Tensor]
               ) -> torch.Tensor:
    """Apply ``fn`` (:func:`_hf_permute` / :func:`_hf_unpermute`) to the last ``r`` rows of each of ``blocks``
    equal row blocks (MLA: the rope dims of every head of q, the shared rope key of kv_a)."""
    rest = w.shape[1:]
    b = w.reshape(blocks, -1, *rest)
    tail = fn(b[:, -r:].reshape(blocks * r, *rest), blocks).reshape(blocks, r, *rest)
    return torch.cat([b[:, :-r], tail], dim=1).reshape(w.shape)


def hf_names(arch, rope_interleave: bool = True, fused: bool = False) -> dict[str, HFParam]:
    """llmc parameter name -> :class:`HFParam`, for every parameter of ``Transformer(arch)``;
    ``rope_interleave`` (MLA): the checkpoint's config says so (false: rope rows in rotate_half order); ``fused``:
    a Phi-3 checkpoint (:data:`llmc.spec.families.FUSED_HF_MODEL_TYPES`), whose q/k/v and gate/up projections are row ranges of one tensor
    (always for the phi3 family, which is exported as Phi3ForCausalLM)."""
    why = hf_export_supported(arch)
    if why:
        raise HFError(f"{arch.name}: no Hugging Face mapping ({why})")
    if arch.mla is not None:
        return _deepseek_names(arch, rope_interleave)
    fused = fused or family_of(arch).hf_model_types[0] in FUSED_HF_MODEL_TYPES
    rot = arch.partial_rotary
    H, K = arch.n_heads, arch.kv_heads
    out = {"tok_embeddings.weight": HFParam(("model.embed_tokens.weight",)),
           "norm.weight": HFParam(("model.norm.weight",))}
    if not arch.tied_embeddings:
        out["lm_head.weight"] = HFParam(("lm_head.weight",))
    kinds = ("weight", "bias") if arch.qkv_bias else ("weight",)
    for i in range(arch.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        if arch.norm_placement == "post":  # OLMo 2 (Olmo2DecoderLayer): the norms of the branches' outputs
            out[s + "attention_norm.weight"] = HFParam((d + "post_attention_layernorm.weight",))
            out[s + "ffn_norm.weight"] = HFParam((d + "post_feedforward_layernorm.weight",))
        elif arch.norm_placement == "sandwich":  # Gemma 2 / 3 (Gemma3DecoderLayer): norms before and after both branches
            for ours, theirs in (("attention_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                                 ("ffn_norm", "pre_feedforward_layernorm"),
                                 ("post_ffn_norm", "post_feedforward_layernorm")):
                out[f"{s}{ours}.weight"] = HFParam((f"{d}{theirs}.weight",))
        else:
            out[s + "attention_norm.weight"] = HFParam((d + "input_layernorm.weight",))
            out[s + "ffn_norm.weight"] = HFParam((d + "post_attention_layernorm.weight",))
        for ours, heads in (("wq", H), ("wk", K), ("wv", None)):
            for kind in kinds:
                out[f"{s}attention.{ours}.{kind}"] = HFParam((f"{d}self_attn.{HF_TARGETS[ours]}.{kind}",), heads,
                                                             rotary=rot if heads else None)
        out[s + "attention.wo.weight"] = HFParam((d + "self_attn.o_proj.weight",))
        if arch.attn_out_bias:  # gpt-oss
            out[s + "attention.wo.bias"] = HFParam((d + "self_attn.o_proj.bias",))
        if arch.attn_sinks:
            out[s + "attention.sinks"] = HFParam((d + "self_attn.sinks",))
        if fused:
            out.update(_fused_names(arch, s, d))
            continue
        if arch.qk_norm:  # the norm weight runs along a head's dims (Qwen3) or every head's (OLMo 2: the whole
            # projection), so it takes the q/k rows' RoPE order
            whole = arch.qk_norm_scope == "projection"
            for n, heads in (("q_norm", H if whole else 1), ("k_norm", K if whole else 1)):
                out[f"{s}attention.{n}.weight"] = HFParam((f"{d}self_attn.{n}.weight",), heads, rotary=rot)
        out.update(_ffn_names(arch, i, s, d))
        if family_of(arch).name == "glm4_moe" and i >= arch.moe.dense_layers:  # DeepSeek-V3's extras
            out.update(_moe_extras(arch, s, d))
    return out


def _moe_extras(arch, s: str, d: str) -> dict[str, HFParam]:
    """A DeepSeek-V3 / GLM-4.5 MoE layer's parameters beyond the router and routed experts: the selection bias
    (``mlp.gate.e_score_correction_bias``, with ``expert_bias``) and the shared experts (one SwiGLU)."""
    out = {}
    if arch.moe.expert_bias:
        out[s + "moe.expert_bias"] = HFParam((d + "mlp.gate.e_score_correction_bias",))
    for ours in ("w1", "w3", "w2"):
        out[f"{s}moe.shared_experts.{ours}.weight"] = HFParam((f"{d}mlp.shared_experts.{HF_TARGETS[ours]}.weight",))
    return out


def _fused_names(arch, s: str, d: str) -> dict[str, HFParam]:
    """A Phi-3 layer's fused projections (``Phi3Attention``: q, k, v = qkv_proj rows in that order; ``Phi3MLP``:
    gate, up = gate_up_proj.chunk(2)); the other names are Llama's."""
    if arch.qkv_bias or arch.qk_norm or arch.moe is not None:
        raise HFError(f"{arch.name}: Phi3ForCausalLM checkpoints have no q/k/v biases, q/k norms or experts")
    H, K, hd, F = arch.n_heads, arch.kv_heads, arch.hd, arch.d_ff
    rot = arch.partial_rotary
    qkv, gate_up, n = f"{d}self_attn.qkv_proj.weight", f"{d}mlp.gate_up_proj.weight", (H + 2 * K) * hd
    return {f"{s}attention.wq.weight": HFParam((qkv,), H, rows=(0, H * hd, n), rotary=rot),
            f"{s}attention.wk.weight": HFParam((qkv,), K, rows=(H * hd, (H + K) * hd, n), rotary=rot),
            f"{s}attention.wv.weight": HFParam((qkv,), rows=((H + K) * hd, n, n)),
            f"{s}feed_forward.w1.weight": HFParam((gate_up,), rows=(0, F, 2 * F)),
            f"{s}feed_forward.w3.weight": HFParam((gate_up,), rows=(F, 2 * F, 2 * F)),
            f"{s}feed_forward.w2.weight": HFParam((f"{d}mlp.down_proj.weight",))}


def _ffn_names(arch, i: int, s: str, d: str) -> dict[str, HFParam]:
    """Layer ``i``'s FFN (llmc prefix ``s``, HF prefix ``d``): a dense SwiGLU (``mlp.{gate,up,down}_proj``), or the
    router and the stacked routed experts: Mixtral's ``block_sparse_moe.experts.{e}.w1/w3/w2``, the other classes'
    (Qwen3-MoE, DeepSeek-V3) ``mlp.experts.{e}.{gate,up,down}_proj``. DeepSeek-V3's extras: :func:`_deepseek_names`."""
    m = arch.moe
    if m is None or i < m.dense_layers:
        return {f"{s}feed_forward.{w}.weight": HFParam((f"{d}mlp.{HF_TARGETS[w]}.weight",)) for w in ("w1", "w3", "w2")}
    if family_of(arch).name == "gpt_oss":  # GptOssMLP: mlp.router, mlp.experts' stacked interleaved tensors
        e = f"{d}mlp.experts."
        return {s + "moe.router.gate.weight": HFParam((d + "mlp.router.weight",)),
                s + "moe.router.gate.bias": HFParam((d + "mlp.router.bias",)),
                s + "moe.experts.w1": HFParam((e + "gate_up_proj",), experts="gate"),
                s + "moe.experts.w3": HFParam((e + "gate_up_proj",), experts="up"),
                s + "moe.experts.w2": HFParam((e + "down_proj",), experts="down"),
                s + "moe.experts.b1": HFParam((e + "gate_up_proj_bias",), experts="gate"),
                s + "moe.experts.b3": HFParam((e + "gate_up_proj_bias",), experts="up"),
                s + "moe.experts.b2": HFParam((e + "down_proj_bias",))}
    mixtral = family_of(arch).name == "mixtral"
    block = f"{d}block_sparse_moe." if mixtral else f"{d}mlp."
    out = {s + "moe.router.gate.weight": HFParam((block + "gate.weight",))}
    for w in ("w1", "w3", "w2"):
        hf = w if mixtral else HF_TARGETS[w]
        out[f"{s}moe.experts.{w}"] = HFParam(tuple(f"{block}experts.{e}.{hf}.weight" for e in range(m.num_experts)),
                                            stacked=True)
    return out


_MLA_TARGETS = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
                "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


def _deepseek_names(arch, rope_interleave: bool = True) -> dict[str, HFParam]:
    """:func:`hf_names` for MLA architectures (``DeepseekV3ForCausalLM``; table in the module docstring)."""
    out = {"tok_embeddings.weight": HFParam(("model.embed_tokens.weight",)),
           "norm.weight": HFParam(("model.norm.weight",))}
    if not arch.tied_embeddings:
        out["lm_head.weight"] = HFParam(("lm_head.weight",))
    attn = ("wq",) if arch.mla.q_lora_rank is None else ("wq_a", "q_norm", "wq_b")
    m = arch.moe
    for i in range(arch.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        out[s + "attention_norm.weight"] = HFParam((d + "input_layernorm.weight",))
        out[s + "ffn_norm.weight"] = HFParam((d + "post_attention_layernorm.weight",))
        for ours in (*attn, "wkv_a", "kv_norm", "wkv_b", "wo"):
            blocks = {"wq": arch.n_heads, "wq_b": arch.n_heads, "wkv_a": 1}.get(ours)
            rope = (blocks, arch.mla.qk_rope_head_dim) if blocks and not rope_interleave else None
            out[f"{s}attention.{ours}.weight"] = HFParam((f"{d}self_attn.{_MLA_TARGETS[ours]}.weight",), rope=rope)
        out.update(_ffn_names(arch, i, s, d))
        if m is not None and i >= m.dense_layers:
            out.update(_moe_extras(arch, s, d))
    return out


def hf_zero_extras(arch) -> dict[str, tuple[str, int]]:
    """HF tensors with no llmc parameter: DeepSeek-V3's (and GLM-4.5's) ``e_score_correction_bias`` when the spec has no
    ``expert_bias`` (transformers always adds it to the selection scores). HF name -> (the llmc name a
    torchtitan checkpoint may still carry it under, length). Loading requires zeros; the export writes zeros
    unless the state dict has the tensor (torchtitan balances with a bias whenever aux_loss_coef > 0)."""
    m = arch.moe
    if m is None or m.expert_bias or family_of(arch).name not in ("deepseek_v3", "glm4_moe"):
        return {}
    return {f"model.layers.{i}.mlp.gate.e_score_correction_bias": (f"layers.{i}.moe.expert_bias", m.num_experts)
            for i in range(m.dense_layers, arch.n_layers)}


def to_hf_state_dict(model_sd: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """llmc state dict -> HF state dict (names, q/k row permutation, experts unstacked)."""
    sd: dict[str, torch.Tensor] = {n: model_sd[ours] if ours in model_sd else torch.zeros(e)
                                   for n, (ours, e) in hf_zero_extras(arch).items()}
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    interleaved: dict[str, dict[str, torch.Tensor]] = {}  # gpt-oss's gate_up tensors: "gate" / "up" halves
    for name, m in hf_names(arch).items():
        t = model_sd[name]
        if m.experts == "down":
            sd[m.hf[0]] = t.transpose(1, 2) if t.dim() == 3 else t
            continue
        if m.experts:
            interleaved.setdefault(m.hf[0], {})[m.experts] = t.transpose(1, 2) if t.dim() == 3 else t
            continue
        if m.stacked:
            sd.update({hf: t[e] for e, hf in enumerate(m.hf)})
            continue
        t = _heads_permuted(t, m.heads, m.rotary, _hf_permute) if m.heads else \
            _rope_tail(t, *m.rope, _hf_permute) if m.rope else t
        if m.rows:  # one row range of a fused tensor (Phi-3): concatenated in row order below
            fused.setdefault(m.hf[0], []).append((m.rows[0], t))
        else:
            sd[m.hf[0]] = t
    for hf, parts in fused.items():
        sd[hf] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    for hf, halves in interleaved.items():  # gate, up, gate, up, ... along the last dim
        g = halves["gate"]
        sd[hf] = torch.stack([g, halves["up"]], dim=-1).reshape(*g.shape[:-1], 2 * g.shape[-1])
    return sd


def from_hf_tensor(m: HFParam, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The llmc tensor for one parameter, built from the HF tensors ``get(name)`` returns."""
    if m.stacked:
        return torch.stack([get(n) for n in m.hf])
    t = get(m.hf[0])
    if m.experts:
        return _gpt_oss_experts(t, m.experts)
    if m.rows:
        t = t[m.rows[0]:m.rows[1]]
    if m.rope:
        return _rope_tail(t, *m.rope, _hf_unpermute)
    return _heads_permuted(t, m.heads, m.rotary, _hf_unpermute) if m.heads else t


# ----------------------------------------------------------------------------- reading checkpoints


def resolve_hf_source(src: str | Path) -> Path:
    """A local directory with config.json, or a Hub id (``org/name[@revision]``) in the local HF cache."""
    p = expand_user(src)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise HFError(f"{p}: no config.json (expected a Hugging Face model directory)")
        return p
    from llmc.spec.facts import hub_id

    repo, _, rev = str(src).partition("@")
    if p.exists() or not hub_id(str(src)):  # (the plan's rule for a Hub id: G021)
        raise HFError(f"{src}: not a directory with config.json, nor a Hub id like org/name")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends: one line, with the fix
        raise HFError(f"{src}: not in the local Hugging Face cache ({type(e).__name__}); download it first "
                      f"with `hf download {repo}` or give a local directory") from None


class SafetensorsDir:
    """Lazy reader over one model directory's safetensors files (sharded or not)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
            if not files:
                raise HFError(f"{self.path}: no *.safetensors files (PyTorch .bin checkpoints are not read; "
                              f"convert them with transformers' save_pretrained(safe_serialization=True))")
        self._handles = {f: safe_open(str(self.path / f), framework="pt", device="cpu") for f in files}
        self.where = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.shapes = {k: tuple(self._handles[f].get_slice(k).get_shape()) for k, f in self.where.items()}
        self.stored: dict[str, str] = {}  # exposed name -> the name in the file (see expose)

    def expose(self, prefix: str, as_prefix: str) -> int:
        """Read every tensor named ``prefix`` + rest as ``as_prefix`` + rest instead (an image-text checkpoint's
        language model under a text-only model's names); returns how many."""
        names = [k for k in self.where if k.startswith(prefix)]
        for k in names:
            new = as_prefix + k[len(prefix):]
            self.where[new], self.shapes[new] = self.where.pop(k), self.shapes.pop(k)
            self.stored[new] = self.stored.pop(k, k)
        return len(names)

    def drop(self, prefixes: tuple[str, ...]) -> int:
        """Forget the tensors whose names start with one of ``prefixes`` (parts that are not llmc's model)."""
        names = [k for k in self.where if k.startswith(prefixes)]
        for k in names:
            del self.where[k], self.shapes[k]
        return len(names)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(self.stored.get(name, name))

    def get_block(self, name: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """Only the block [offset, offset + shape) of a tensor (read from the file, nothing else materialised)."""
        sl = self._handles[self.where[name]].get_slice(self.stored.get(name, name))
        return sl[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def read_hf_config(path: str | Path) -> dict:
    """config.json with transformers >= 5's ``rope_parameters`` folded back into ``rope_theta`` /
    ``rope_scaling`` (the keys llmc.spec.hf reads)."""
    from llmc.spec.hf import fold_rope_parameters

    return fold_rope_parameters(json.loads((Path(path) / "config.json").read_text()))


def _check_config(cfg: dict, arch, where: Path) -> None:
    from llmc.spec.hf import architecture_from_hf_config, checkpoint_differences

    try:
        theirs = architecture_from_hf_config(cfg)
    except Exception as e:
        raise HFError(f"{where}/config.json: {e}") from None
    if cfg.get("model_type") in ("deepseek_v3", "kimi_k2", "deepseek_v2") and (problems := _deepseek_config_problems(cfg)):
        raise HFError(f"{where}/config.json: cannot load this DeepSeek-V3 checkpoint: {'; '.join(problems)}")
    bad = checkpoint_differences(arch, theirs)
    if bad:
        raise HFError(f"{where}: the checkpoint is not the spec's model: {'; '.join(bad[:4])} "
                      f"(use `model: {{hf_config: {where}/config.json}}` in the spec)")


def _deepseek_config_problems(cfg: dict) -> list[str]:
    """What in a DeepSeek-V3 / V2 config.json llmc's model does not compute the way transformers' class does."""
    bad = []
    if cfg.get("model_type") in ("deepseek_v3", "kimi_k2") and cfg.get("scoring_func", "sigmoid") != "sigmoid":
        bad.append(f"scoring_func {cfg['scoring_func']!r}: DeepseekV3ForCausalLM routes with sigmoid")
    return bad


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    return model


def _read_local_block(files: SafetensorsDir, m: HFParam, p) -> torch.Tensor | None:
    """This rank's block of a DTensor parameter read straight from the file, when its placements are plain
    ``Shard``/``Replicate`` and (for RoPE-permuted q/k rows) the block holds whole heads; else None."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if m.stacked or m.rope or m.experts or not all(type(pl) in (Shard, Replicate) for pl in p.placements):
        return None
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if m.heads:
        hd = p.shape[0] // m.heads
        if offset[0] % hd or shape[0] % hd:
            return None
    start = (offset[0] + m.rows[0], *offset[1:]) if m.rows else tuple(offset)
    t = files.get_block(m.hf[0], start, tuple(shape))
    return _heads_permuted(t, shape[0] // (p.shape[0] // m.heads), m.rotary, _hf_unpermute) if m.heads and shape[0] else t


def _model_shape(p: torch.Tensor) -> tuple[int, ...]:
    if hasattr(p, "ds_shape"):  # DeepSpeed ZeRO-3 partitioned parameter
        return tuple(p.ds_shape)
    return tuple(p.shape)  # DTensor: the global shape


def load_hf_into(model: nn.Module, path: str | Path, arch, *, rank: int = 0, world: int = 1,
                 check_config: bool = True, checkpoint_arch=None) -> dict[str, Any]:
    """Copy an HF checkpoint's weights into ``model`` (built from ``arch``); returns a summary dict.

    Every parameter of the model must be in the checkpoint with the same shape and every checkpoint tensor
    must be used (a tied checkpoint's ``lm_head.weight`` excepted); otherwise :class:`HFError` lists the
    first mismatches. ``rank``/``world`` identify the process (ZeRO-3: only rank 0 reads the files).
    ``checkpoint_arch``: the model the checkpoint's config.json must describe, where it is not ``arch`` (a
    long_context stage's model extends its checkpoint's RoPE: :func:`start_arch`).
    """
    src = resolve_hf_source(path)
    cfg = read_hf_config(src)
    if cfg.get("model_type") == "kimi_k25":  # (its names and int4 weights: not what this loader reads)
        raise HFError(f"{src}: a Kimi K2.5 image-text checkpoint (model_type kimi_k25): llmc imports its language "
                      "model's shape but reads weights from a text-only bf16 Kimi K2 / DeepSeek-V3 checkpoint only")
    quant = quantization_method(cfg)  # (the plan refuses a local one: G018)
    if cfg.get("model_type") == "gpt_oss" and quant:
        raise HFError(f"{src}: its experts are {quant} (quantization_config), which llmc does not read: give a bf16 / "
                      "fp32 checkpoint (transformers dequantizes one: from_pretrained(..., "
                      "quantization_config=Mxfp4Config(dequantize=True)), then save_pretrained)")
    if quant:  # GPTQ / AWQ / bitsandbytes / FP8 tensors (qweight, scales, absmax, weight_scale_inv, ...)
        raise HFError(f"{src}: quantized weights ({quant}) are not read (its config.json's quantization_config): give "
                      "the model's bf16 / fp32 release (for QLoRA, lora.quantize_base: nf4 quantizes it itself)")
    if check_config:
        _check_config(cfg, checkpoint_arch if checkpoint_arch is not None else arch, src)
    files = SafetensorsDir(src)
    skipped = _language_model_only(cfg, files)
    mapping = hf_names(arch, rope_interleave=cfg.get("rope_interleave", True) is not False,
                       fused=cfg.get("model_type") in FUSED_HF_MODEL_TYPES)
    # DeepSeek-V3's multi-token-prediction layers follow the last layer (model.layers.61 of the 61-layer
    # model; transformers ignores them too, _keys_to_ignore_on_load_unexpected): not part of llmc's model
    mtp = tuple(f"model.layers.{arch.n_layers + j}." for j in range(int(cfg.get("num_nextn_predict_layers") or 0)))
    # a model already carrying LoRA adapters (built on meta, sharded): its base weights, by their plain names
    params = {k.replace(".base.", "."): p for k, p in _unwrap(model).named_parameters() if "lora_" not in k}
    missing, mismatched = [], []
    used: set[str] = set()
    for name, p in params.items():
        m = mapping.get(name)
        if m is None:
            mismatched.append(f"{name} (no Hugging Face name)")
            continue
        absent = [n for n in m.hf if n not in files.shapes]
        if absent:
            missing.append(absent[0])
            continue
        used.update(m.hf)
        shape = (len(m.hf), *files.shapes[m.hf[0]]) if m.stacked else files.shapes[m.hf[0]]
        if m.experts:  # gpt-oss's interleaved / transposed experts
            shape = _gpt_oss_experts_shape(tuple(shape), m.experts)
        if m.rows:  # a row range of a fused tensor of m.rows[2] rows
            if shape[0] != m.rows[2]:
                mismatched.append(f"{m.hf[0]} {list(shape)} vs {name} {list(_model_shape(p))} (fused: "
                                  f"{m.rows[2]} rows expected)")
                continue
            shape = (m.rows[1] - m.rows[0], *shape[1:])
        if tuple(shape) != _model_shape(p):
            mismatched.append(f"{m.hf[0]} {list(shape)} vs {name} {list(_model_shape(p))}")
    zeros = {n: (e,) for n, (_, e) in hf_zero_extras(arch).items() if n in files.shapes}
    for n, shape in zeros.items():
        if tuple(files.shapes[n]) != shape:
            mismatched.append(f"{n} {list(files.shapes[n])} vs {list(shape)}")
        elif files.get(n).any():
            mismatched.append(f"{n} is not zero (set moe.expert_bias: true in the spec to load it)")
    extra = sorted(n for n in files.shapes if n not in used and n not in zeros and not n.endswith(_IGNORED_HF)
                   and not (arch.tied_embeddings and n == "lm_head.weight") and not (mtp and n.startswith(mtp)))
    if missing or mismatched or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:3])}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {', '.join(mismatched[:3])}")
        if extra:
            parts.append(f"unused {len(extra)}: {', '.join(extra[:3])}")
        raise HFError(f"{src}: checkpoint does not match the model: {'; '.join(parts)}")

    nbytes = 0
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    with torch.no_grad():
        for name, p in params.items():
            m = mapping[name]
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank == 0:
                        t = from_hf_tensor(m, files.get)
                        p.data.copy_(t)
                        nbytes += t.numel() * t.element_size()
                continue
            from torch.distributed.tensor import DTensor, distribute_tensor

            if isinstance(p, DTensor):  # FSDP2 / TP: only this rank's block, when it is one
                local = _read_local_block(files, m, p)
                if local is None:  # strided / expert-stacked / mid-head blocks: cut from the full tensor
                    t = from_hf_tensor(m, files.get)
                    local = distribute_tensor(t.to(p.to_local().device), p.device_mesh, p.placements,
                                              src_data_rank=None).to_local()
                nbytes += local.numel() * local.element_size()
                p.to_local().copy_(local)
            else:
                t = from_hf_tensor(m, files.get)
                nbytes += t.numel() * t.element_size()
                p.copy_(t)
    return {"source": str(src), "tensors": len(used), "params": len(params), "bytes_read": nbytes,
            "skipped": skipped}


#: image-text model_type -> (its language model's name prefixes in the checkpoint -> a text-only model's, the prefixes
#: of the parts llmc's model does not have). Gemma 3-4B / 12B / 27B (Gemma3ForConditionalGeneration): the Hub's files
#: name the language model language_model.model.* / language_model.lm_head.*, what transformers >= 5 also saves (its
#: in-memory model.language_model.* in older saves); the SigLIP image encoder and its projector are not llmc's
_IMAGE_TEXT_CHECKPOINTS: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "gemma3": ((("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                ("model.language_model.", "model.")),
               ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")),
}


def loaded_from(got: dict[str, Any]) -> str:
    """What :func:`load_hf_into` read, for the run's log: its source, and what of an image-text model it left out."""
    return got["source"] + (f" (its language model; {got['skipped']} image-encoder tensors left out)"
                            if got.get("skipped") else "")


def _language_model_only(cfg: dict, files: SafetensorsDir) -> int:
    """An image-text checkpoint read as its language model alone (:data:`_IMAGE_TEXT_CHECKPOINTS`); returns how many
    of its tensors (the image encoder's) are left out. 0 for a text-only checkpoint."""
    kind = _IMAGE_TEXT_CHECKPOINTS.get(cfg.get("model_type"))
    if kind is None:
        return 0
    renames, image = kind
    skipped = files.drop(image)
    for prefix, as_prefix in renames:
        files.expose(prefix, as_prefix)
    return skipped


def init_hf_source(job) -> str | None:
    """The ``init_hf`` of the job's stage (its lock entry, ``lock["stages"][i]["init_hf"]``). Relative
    paths resolve against the spec's folder; Hub ids stay as they are."""
    entry = getattr(job, "stage_plan", None) or {}
    lock = getattr(job, "lock", None) or {}
    if not entry and lock:
        entry = next((e for e in lock.get("stages") or [] if e.get("name") == job.stage), {}) or {}
    return _init_hf_path(entry.get("init_hf"), job)


def _init_hf_path(src: str | None, job) -> str | None:
    """An ``init_hf`` as the job reads it: a relative path against the spec's folder, a Hub id as it is."""
    if not src:
        return None
    p = expand_user(src)
    if not p.is_absolute():
        q = Path(getattr(job, "spec_dir", ".")) / p
        if q.exists():
            return str(q)
    return str(p) if p.exists() else str(src)


def origin_checkpoint(job) -> str | None:
    """The Hugging Face checkpoint the stage's model descends from: its ``init_hf``, or that of the first stage of
    its ``init_from`` chain (lock entries); None for a model trained from scratch."""
    from llmc.runtime.job import start_checkpoint

    entry = getattr(job, "stage_plan", None) or _stage_entry(job, job.stage)
    src = entry.get("init_hf")
    first = None if src else entry.get("init_from") or getattr(job, "init_from", None)  # (a job without an entry)
    lock = getattr(job, "lock", None) or {}
    if first and lock.get("stages"):
        src = start_checkpoint(lock, first)  # that stage's init_hf, or its own init_from chain's
    return _init_hf_path(src, job)


def _stage_entry(job, name: str | None) -> dict:
    """Stage ``name``'s entry in the job's lock (``lock["stages"]``); {} without one."""
    lock = getattr(job, "lock", None) or {}
    return next((e for e in lock.get("stages") or [] if e.get("name") == name), {}) or {}


def start_arch(job, arch=None):
    """The model the checkpoint a stage starts from holds: ``arch`` (default the job's) with the RoPE of before the
    stage. A long_context stage runs with its own RoPE extension (its lock entry's ``context``); the checkpoint it
    extends has the RoPE its ``init_from`` stage handed on (that stage's ``context``), or, from ``init_hf``, the spec
    model's, and is checked against that (:func:`load_hf_into`). Without a lock: ``arch``."""
    from llmc.spec.model import RopeScaling
    from llmc.spec.schema import RunSpec

    arch = job.arch if arch is None else arch
    lock = getattr(job, "lock", None) or {}
    resolved = (lock.get("spec") or {}).get("resolved")
    if not resolved:
        return arch
    ctx = _stage_entry(job, job.init_from).get("context") if job.init_from else None
    if ctx:
        scaling = ctx.get("rope_scaling")
        theta, scaling = float(ctx["rope_theta"]), RopeScaling.model_validate(scaling) if scaling else None
    else:
        model = RunSpec.model_validate(resolved).model
        theta, scaling = model.rope_theta, model.rope_scaling
    if (theta, scaling) == (arch.rope_theta, arch.rope_scaling):
        return arch
    return arch.model_copy(update={"rope_theta": theta, "rope_scaling": scaling})


def init_from_source(stage_dir: str | Path) -> tuple[str, Path]:
    """What a finished stage left for the next stage to start from (its ``init_from``): ``("llmc", step-N)``
    when it wrote an llmc checkpoint (native, DeepSpeed and post-training stages), else ``("hf", <dir>/hf)``
    when it has a Hugging Face export (a torchtitan stage: ``python -m llmc.runtime.hf_io`` writes it after
    the run; no llmc checkpoint, no DONE.json). Raises :class:`HFError` naming both when neither is there."""
    from llmc.runtime.checkpoint import CheckpointError, resolve_checkpoint

    d = Path(stage_dir)
    try:
        ck = resolve_checkpoint(d)
        if (ck / "manifest.json").exists():
            return "llmc", ck
    except CheckpointError:
        pass
    if (d / "hf" / "config.json").exists():
        return "hf", d / "hf"
    raise HFError(f"{d}: the stage left neither an llmc checkpoint (DONE.json / checkpoints/step-N) nor a "
                  f"Hugging Face export (hf/config.json); run it first")


def load_init_from(model: nn.Module, stage_dir: str | Path, arch, *, rank: int = 0, world: int = 1,
                   load_llmc: Callable[[nn.Module, Path], int] | None = None, checkpoint_arch=None) -> str:
    """Load the weights :func:`init_from_source` finds into ``model`` (plain, FSDP2/TP-sharded or DeepSpeed
    ZeRO-3; collective when sharded); returns what was loaded, for the log. ``load_llmc(model, step_dir)``
    replaces :func:`llmc.runtime.checkpoint.load_model_weights` for the llmc checkpoint (DeepSpeed's ZeRO-aware
    loader). ``checkpoint_arch``: what a Hugging Face export is checked against (:func:`load_hf_into`)."""
    kind, path = init_from_source(stage_dir)
    if kind == "llmc":
        if load_llmc is None:
            from llmc.runtime.checkpoint import load_model_weights as load_llmc
        return f"{path} (step {load_llmc(model, path)})"
    got = load_hf_into(model, path, arch, rank=rank, world=world, checkpoint_arch=checkpoint_arch)
    return f"Hugging Face export {got['source']} ({got['bytes_read']:,} bytes read by rank {rank})"


# ----------------------------------------------------------------------------- writing checkpoints


def hf_config(arch, dtype: torch.dtype = torch.bfloat16, bos_id: int | None = 0, eos_id: int | list | None = 1
              ) -> dict[str, Any]:
    """config.json for LlamaForCausalLM (dense), Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (q/k norms),
    Phi3ForCausalLM (partial RoPE), GraniteForCausalLM (muP multipliers), SmolLM3ForCausalLM (NoPE layers),
    Olmo2ForCausalLM (post-norm blocks), Olmo3ForCausalLM (post-norm blocks with a sliding window),
    Gemma3ForCausalLM / Gemma2ForCausalLM (sandwich-norm blocks, with / without q/k norms),
    MistralForCausalLM (a sliding window), MixtralForCausalLM, Qwen3MoeForCausalLM (MoE + q/k norms),
    Glm4MoeForCausalLM (sigmoid-routed experts on a GQA block), GptOssForCausalLM (gpt-oss's block),
    OlmoeForCausalLM (MoE + q/k norms over the projections) or DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (MLA;
    sigmoid- / softmax-routed experts)."""
    fam = family_of(arch)  # the one table of families: HF class and model_type
    cls, mtype = fam.hf_class, fam.hf_model_types[0]
    w = arch.sliding_window
    if arch.mla is not None:
        return _deepseek_config(arch, cls, mtype, dtype, bos_id, eos_id)
    cfg = {"architectures": [cls], "model_type": mtype, "hidden_size": arch.d_model,
           "intermediate_size": arch.d_ff, "num_hidden_layers": arch.n_layers, "num_attention_heads": arch.n_heads,
           "num_key_value_heads": arch.kv_heads, "head_dim": arch.hd, "vocab_size": arch.vocab_size,
           "rms_norm_eps": arch.norm_eps, "rope_theta": arch.rope_theta, "max_position_embeddings": arch.max_seq_len,
           "tie_word_embeddings": arch.tied_embeddings, "torch_dtype": str(dtype).split(".")[-1],
           "bos_token_id": bos_id, "eos_token_id": eos_id, "attention_dropout": 0.0,
           # the std of llmc's initialisation (llmc.weight_init), what transformers draws new weights from
           "initializer_range": init_scheme(arch).std, "use_cache": True}
    if mtype in ("llama", "granite"):
        cfg.update(attention_bias=False, mlp_bias=False)
    if mtype == "mistral":  # MistralConfig (transformers configuration_mistral.py): the window in every layer
        cfg.update(sliding_window=w)
    if mtype == "granite":  # GraniteConfig (transformers configuration_granite.py): the muP multipliers
        m = arch.multipliers
        cfg.update(embedding_multiplier=m.embedding, residual_multiplier=m.residual, logits_scaling=m.logits,
                   attention_multiplier=m.softmax_scale(arch.hd))
    if mtype == "phi3":  # Phi3Config (transformers configuration_phi3.py); partial RoPE: int(head_dim x factor) dims
        rs = arch.rope_scaling
        cfg.update(attention_bias=False, partial_rotary_factor=(arch.partial_rotary or arch.hd) / arch.hd,
                   original_max_position_embeddings=rs.original_max_position if rs is not None and
                   rs.type == "longrope" else arch.max_seq_len, sliding_window=w, pad_token_id=None,
                   resid_pdrop=0.0, embd_pdrop=0.0)
    if mtype in ("olmo2", "olmo3"):  # Olmo2Config / Olmo3Config (transformers configuration_olmo2/3.py): the block
        # is implied by the type (their default pad id 1 would make token 1's embedding row nn.Embedding's
        # padding_idx: no gradient there)
        cfg.update(attention_bias=False, pad_token_id=None)
    # the MLP's activation, under the key its config class reads (Gemma3TextConfig: hidden_activation)
    # (gpt-oss's clamped SwiGLU is implied by its type: GptOssConfig's hidden_act silu, never read)
    act = next((k for k, v in HF_ACTIVATIONS.items() if v == arch.activation), "silu")
    cfg["hidden_activation" if mtype in ("gemma3_text", "gemma2") else "hidden_act"] = act
    if mtype in ("gemma3_text", "gemma2"):  # Gemma3TextConfig / Gemma2Config (transformers configuration_gemma3/2.py):
        # the block implied by the type; an absent soft-cap would be Gemma2Config's default (on), so both are written
        cfg.update(query_pre_attn_scalar=arch.query_pre_attn_scalar or arch.hd, attention_bias=False,
                   attn_logit_softcapping=arch.attn_logit_softcap, final_logit_softcapping=arch.final_logit_softcap,
                   use_bidirectional_attention=False,
                   pad_token_id=None)  # (its default pad id 0: a padding_idx row of the embedding, no gradient)
    if mtype == "gemma3_text":
        cfg.update(rope_local_base_freq=arch.window_rope_theta)
    if mtype == "gemma2":  # one RoPE for every layer (the spec refuses another for the windowed ones: M015)
        cfg.update(sliding_window=w, layer_types=["sliding_attention" if arch.layer_window(i) else "full_attention"
                                                  for i in range(arch.n_layers)])
    if mtype == "smollm3":  # SmolLM3Config (transformers configuration_smollm3.py): one RoPE flag per layer, 0 = NoPE
        cfg.update(no_rope_layers=[int(i not in arch.nope_layers) for i in range(arch.n_layers)],
                   use_sliding_window=False, sliding_window=None, attention_bias=False, mlp_bias=False,
                   pad_token_id=None)  # (its default 128004: a padding_idx row, or past a smaller vocabulary)
    if mtype in ("qwen3", "qwen3_moe"):
        cfg.update(attention_bias=False)  # (o_proj too: q/k/v biases with q/k norms are not exported)
    if mtype == "glm4_moe":  # Glm4MoeConfig (transformers configuration_glm4_moe.py): q/k/v biases (o_proj has none),
        # per-head q/k norms, RoPE on the first partial_rotary_factor of each head (its default 0.5, so always written),
        # DeepSeek-V3's routing; no MTP layers (num_nextn_predict_layers 0: llmc's model has none)
        m = arch.moe
        cfg.update(attention_bias=arch.qkv_bias, use_qk_norm=arch.qk_norm,
                   partial_rotary_factor=(arch.partial_rotary or arch.hd) / arch.hd,
                   n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   n_shared_experts=m.num_shared_experts, moe_intermediate_size=m.expert_d_ff or arch.d_ff,
                   first_k_dense_replace=m.dense_layers, routed_scaling_factor=m.route_scale,
                   n_group=m.n_expert_groups or 1, topk_group=m.n_limited_groups or 1, norm_topk_prob=m.route_norm,
                   num_nextn_predict_layers=0, output_router_logits=False, pad_token_id=None)
    if mtype in ("qwen2", "qwen3", "qwen3_moe"):  # their configs window the layers from max_window_layers on: all
        cfg.update(use_sliding_window=bool(w), sliding_window=w, max_window_layers=0 if w else arch.n_layers)
    if mtype == "olmoe":  # OlmoeConfig (transformers configuration_olmoe.py): every layer sparse, experts of
        # intermediate_size; its default pad id 1 would make token 1's embedding row a padding_idx (no gradient)
        m = arch.moe
        cfg.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, norm_topk_prob=m.route_norm,
                   router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False, clip_qkv=None,
                   attention_bias=False, pad_token_id=None)
    elif mtype == "qwen3_moe":  # Qwen3MoeConfig (transformers configuration_qwen3_moe.py): the first layers dense
        m = arch.moe
        cfg.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_d_ff or arch.d_ff,
                   norm_topk_prob=m.route_norm, decoder_sparse_step=1, mlp_only_layers=list(range(m.dense_layers)),
                   router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False)
    elif arch.moe is not None and mtype not in ("glm4_moe", "gpt_oss"):
        cfg.update(num_local_experts=arch.moe.num_experts, num_experts_per_tok=arch.moe.top_k,
                   router_aux_loss_coef=arch.moe.aux_loss_coef, output_router_logits=False, sliding_window=w,
                   # DeepSeek-V3 config.json names (routed_scaling_factor 2.5, n_group 8, topk_group 4);
                   # 1 / 1 / 1 = plain top-k (llmc.spec.hf reads them back into route_scale / expert groups)
                   routed_scaling_factor=arch.moe.route_scale, n_group=arch.moe.n_expert_groups or 1,
                   topk_group=arch.moe.n_limited_groups or 1)
    scaling = _rope_scaling_config(arch)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if mtype == "gpt_oss":  # GptOssConfig (transformers configuration_gpt_oss.py): q/k/v and o_proj biases, sinks, the
        # experts intermediate_size wide in every layer; one RoPE for every layer, written as rope_parameters (an absent
        # one would be its YaRN default); its default pad id is None
        m = arch.moe
        cfg.pop("rope_scaling", None)
        cfg.update(attention_bias=True, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                   router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False, swiglu_alpha=arch.swiglu_alpha,
                   swiglu_limit=arch.swiglu_limit, sliding_window=w, pad_token_id=None,
                   layer_types=["sliding_attention" if arch.layer_window(i) else "full_attention"
                                for i in range(arch.n_layers)],
                   rope_parameters={**(scaling or {"rope_type": "default"}), "rope_theta": arch.rope_theta})
    if mtype in ("olmo3", "gemma3_text"):  # one attention kind per layer, rope_scaling in the full-attention ones
        # only; transformers >= 5's per-kind RoPE (else OLMo 3's windowed layers take its default base 500000)
        cfg.update(sliding_window=w, layer_types=["sliding_attention" if arch.layer_window(i) else "full_attention"
                                                  for i in range(arch.n_layers)])
        cfg["rope_parameters"] = {
            "full_attention": {**(scaling or {"rope_type": "default"}), "rope_theta": arch.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": arch.window_rope_theta}}
    return cfg


def _rope_scaling_config(arch) -> dict[str, Any] | None:
    rs = arch.rope_scaling
    if rs is None:
        return None
    scaling = {"rope_type": rs.type, "factor": rs.factor}
    if rs.type == "llama3":
        scaling.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                       original_max_position_embeddings=rs.original_max_position)
    elif rs.type == "yarn":
        scaling.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                       original_max_position_embeddings=rs.original_max_position)
        if not rs.truncate:  # (gpt-oss; absent = true)
            scaling["truncate"] = False
    elif rs.type == "longrope":  # transformers' _compute_longrope_parameters; vLLM's LongRoPE reads the same keys
        scaling.update(short_factor=list(rs.short_factor), long_factor=list(rs.long_factor),
                       original_max_position_embeddings=rs.original_max_position)
    if rs.attention_factor is not None:  # longrope, yarn
        scaling["attention_factor"] = rs.attention_factor
    for key in ("mscale", "mscale_all_dim"):  # DeepSeek's YaRN
        if getattr(rs, key) is not None:
            scaling[key] = getattr(rs, key)
    return scaling


def _deepseek_config(arch, cls: str, mtype: str, dtype, bos_id, eos_id) -> dict[str, Any]:
    """``DeepseekV3Config`` / ``DeepseekV2Config`` keys (transformers ``configuration_deepseek_v3/2.py``; DeepSeek's
    config.json names).

    A dense MLA model is written with ``first_k_dense_replace`` = all layers and ``n_routed_experts`` 0.
    ``head_dim`` is the rope head dim, as DeepseekV3Config sets it (its rotary embedding reads it);
    ``num_key_value_heads`` = heads (MLA expands K and V to every head). YaRN with the spec's mscale / mscale_all_dim
    (DeepSeek's: the softmax scale times m(mscale_all_dim)^2; transformers' ``yarn_apply_mscale``), as llmc's model
    and torchtitan's deepseek_v3 compute it."""
    m, a = arch.mla, arch.moe
    cfg = {"architectures": [cls], "model_type": mtype, "hidden_size": arch.d_model,
           "intermediate_size": arch.d_ff, "num_hidden_layers": arch.n_layers, "num_attention_heads": arch.n_heads,
           "num_key_value_heads": arch.n_heads, "head_dim": m.qk_rope_head_dim, "vocab_size": arch.vocab_size,
           "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
           "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "rope_interleave": True,
           "rms_norm_eps": arch.norm_eps, "rope_theta": arch.rope_theta, "max_position_embeddings": arch.max_seq_len,
           "tie_word_embeddings": arch.tied_embeddings, "hidden_act": "silu", "torch_dtype": str(dtype).split(".")[-1],
           "bos_token_id": bos_id, "eos_token_id": eos_id, "attention_bias": False, "attention_dropout": 0.0,
           "initializer_range": init_scheme(arch).std, "use_cache": True, "num_nextn_predict_layers": 0}
    if a is None:
        cfg.update(first_k_dense_replace=arch.n_layers, n_routed_experts=0, n_shared_experts=0,
                   moe_intermediate_size=arch.d_ff, num_experts_per_tok=None, n_group=1, topk_group=1,
                   routed_scaling_factor=1.0, norm_topk_prob=True)
    else:
        cfg.update(first_k_dense_replace=a.dense_layers, n_routed_experts=a.num_experts,
                   n_shared_experts=a.num_shared_experts, moe_intermediate_size=a.expert_d_ff or arch.d_ff,
                   num_experts_per_tok=a.top_k, routed_scaling_factor=a.route_scale,
                   n_group=a.n_expert_groups or 1, topk_group=a.n_limited_groups or 1, norm_topk_prob=a.route_norm,
                   aux_loss_alpha=a.aux_loss_coef)
        if mtype == "deepseek_v3":  # sigmoid scores with the selection bias
            cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")
        else:  # DeepseekV2Config: softmax, top-k of all experts or of the groups with the best experts (DeepSeek-V2's
            # device-limited routing), every layer after the dense ones sparse
            cfg.update(scoring_func="softmax", moe_layer_freq=1,
                       topk_method="group_limited_greedy" if a.n_expert_groups else "greedy")
    scaling = _rope_scaling_config(arch)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _write_tokenizer(tokenizer_dir: str | Path | None, out: Path, chat_template: str | None) -> None:
    """The tokenizer's files (:data:`llmc.runtime.tokenizer.TOKENIZER_FILES`) into ``out``. A chat stage trained with
    one of llmc's templates (or a Jinja string) writes it into tokenizer_config.json, without the tokenizer's own
    chat_template.jinja (which transformers would read first); ``tokenizer`` (the tokenizer's own template) and no
    template keep the tokenizer's files as they are."""
    from llmc.runtime.chat import OWN_TEMPLATE
    from llmc.runtime.tokenizer import TOKENIZER_FILES

    if tokenizer_dir is None:
        return
    ours = chat_template is not None and chat_template != OWN_TEMPLATE
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists() and not (ours and name == "chat_template.jinja"):
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    if ours and (out / "tokenizer_config.json").exists():
        tc = json.loads((out / "tokenizer_config.json").read_text())
        known = CHAT_TEMPLATES.get(chat_template)
        tc["chat_template"] = known.jinja if known is not None else chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")


def export_hf(model_sd: dict[str, torch.Tensor], arch, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype = torch.bfloat16, bos_id: int | None = 0, eos_id: int | list | None = 1,
              chat_template: str | None = None, max_shard_size: int | str = "5GB",
              origin: str | Path | None = None, record: dict | None = None) -> Path:
    """Write an HF model directory that transformers / vLLM / SGLang load (``from_pretrained(out_dir)``).

    Weights in ``dtype``, split into shards of at most ``max_shard_size`` (HF's naming and index file);
    ``chat_template`` (a name of :data:`llmc.spec.chat.CHAT_TEMPLATES` or a Jinja string) goes into
    tokenizer_config.json, and its turn-end token joins the end-of-sequence ids. ``origin``: the Hugging Face
    checkpoint the model started from, whose token ids and generation defaults the export keeps
    (:func:`_origin_tokens`); without one, ``bos_id`` / ``eos_id``. ``record``: what the export's
    ``.llmc-export.json`` records besides ``written_by``, ``arch`` and ``llmc_version`` (its provenance:
    :func:`export_stage`). Written into a temporary folder beside ``out_dir`` and swapped in whole; a failure (a full
    disk) removes that folder and leaves ``out_dir`` as it was.
    """
    why = hf_export_supported(arch)
    if why:
        raise ValueError(f"cannot export {arch.name} to Hugging Face format: {why}")
    final = Path(out_dir)
    foreign = _foreign_files(final)
    if foreign:
        names = f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
        what = (f"holds files an llmc export did not write ({names})" if (final / EXPORT_MARKER).is_file() else
                f"is not an earlier llmc export (it holds {names} and no {EXPORT_MARKER})")
        raise ValueError(f"{final}: {what}; export into a new or empty folder (llmc never overwrites them)")
    # written beside it and swapped in whole: a crash leaves the previous export or the new one, never a mix
    out = final.with_name(f".{final.name}.llmc-tmp-{os.getpid()}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        _write_export(model_sd, arch, out, tokenizer_dir, dtype, bos_id, eos_id, chat_template, max_shard_size, origin,
                      record)
    except BaseException:  # (a full disk, an interrupt): llmc's own temporary folder never outlives the export
        shutil.rmtree(out, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.llmc-old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(out, final)
    if old.exists():
        shutil.rmtree(old)  # the previous llmc export of this folder (checked above: nothing else in it)
    return final


def _write_export(model_sd: dict[str, torch.Tensor], arch, out: Path, tokenizer_dir, dtype: torch.dtype, bos_id,
                  eos_id, chat_template: str | None, max_shard_size: int | str, origin, record: dict | None) -> None:
    """:func:`export_hf`'s files, written into the (temporary) folder ``out``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from llmc import __version__

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf_state_dict(model_sd, arch).items()}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: sd[n] for n in names}, str(out / fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    theirs, generation = _origin_tokens(origin)
    bos_id = theirs.get("bos_token_id", bos_id)
    eos_id = theirs.get("eos_token_id", eos_id)
    end = _chat_end_id(tokenizer_dir, chat_template)
    cfg = hf_config(arch, dtype, bos_id, _with_id(eos_id, end))
    if theirs.get("pad_token_id") is not None:
        cfg["pad_token_id"] = theirs["pad_token_id"]
    generation = dict(generation or {"bos_token_id": bos_id, "eos_token_id": eos_id,
                                     **{k: v for k, v in theirs.items() if k == "pad_token_id"}})
    generation["eos_token_id"] = _with_id(generation.get("eos_token_id", eos_id), end)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer(tokenizer_dir, out, chat_template)
    marker = {"written_by": "llmc", "arch": arch.name, "llmc_version": __version__, **(record or {})}
    (out / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")


#: What an llmc export writes: the marker file, and the names a Hugging Face directory of it holds; ``adapter/`` is the
#: LoRA stages' PEFT adapter
EXPORT_MARKER = ".llmc-export.json"
_EXPORT_NAMES = re.compile(r"(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                           r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.jinja|adapter|"
                           + re.escape(EXPORT_MARKER) + ")")


def _foreign_files(out: Path) -> list[str]:
    """Entries of ``out`` an llmc export did not write: none when it is missing or empty; in a folder with the marker,
    those an export never writes (files someone added to it); in any other folder, all of them. The names alone prove
    nothing: transformers' ``save_pretrained`` writes the same ones (config.json, model.safetensors, tokenizer files),
    and a model folder a user saved so must never be taken for an earlier export and replaced."""
    if not out.exists():
        return []
    if not out.is_dir() or out.is_symlink():
        return [out.name]
    if (out / EXPORT_MARKER).is_file():
        return sorted(p.name for p in out.iterdir() if not _EXPORT_NAMES.fullmatch(p.name))
    return sorted(p.name for p in out.iterdir())


def _origin_tokens(origin: str | Path | None) -> tuple[dict, dict | None]:
    """({bos,eos,pad}_token_id its config.json sets, its generation_config.json or None) of the checkpoint a model
    started from. What transformers' ``generate`` and vLLM read to stop and sample (GenerationConfig; vLLM's
    ``ModelConfig.get_diff_sampling_param``): an instruct model's several end ids (Llama 3.1 Instruct:
    [128001, 128008, 128009]) and its sampling defaults, which the tokenizer alone does not say. ({}, None) for no
    origin, or one no longer found."""
    if origin is None:
        return {}, None
    try:
        src = resolve_hf_source(origin)
        cfg = json.loads((src / "config.json").read_text())
        gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").is_file() \
            else None
    except (HFError, OSError, ValueError):
        return {}, None
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}, gen if isinstance(gen, dict) else None


def _chat_end_id(tokenizer_dir, template: str | None) -> int | None:
    """The id of the turn-end token (<|eot_id|> / <|im_end|> / <|end|>) of one of llmc's chat templates: a model
    trained on it stops there; None for another template, or a tokenizer without it."""
    if template not in CHAT_TEMPLATES or tokenizer_dir is None:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).token_to_id(CHAT_TEMPLATES[template].end)
    except Exception:
        return None


def _with_id(eos_id, end: int | None):
    """``eos_id`` (an id, a list of them or None) with ``end`` added: a list when there are several."""
    if end is None:
        return eos_id
    ids = list(eos_id) if isinstance(eos_id, list) else ([] if eos_id is None else [eos_id])
    return ids + [end] if end not in ids else (ids if len(ids) > 1 else ids[0])


def peft_state_dict(lora_sd: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """llmc LoRA tensors (``layers.N.attention.wq.lora_A`` [r, in], ``...lora_B`` [out, r]) -> PEFT names
    (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``). q/k ``lora_B`` rows get the same
    RoPE permutation as the base weight (W' = P W, so B' = P B). Stacked-expert adapters are refused, and for
    MLA (DeepSeek-V3) models every adapter outside the attention."""
    out: dict[str, torch.Tensor] = {}
    if family_of(arch).name == "phi3":
        raise HFError("LoRA on a Phi3ForCausalLM export has no PEFT layout here (its q/k/v and gate/up projections are "
                      "fused); the merged model is exported")
    for k, v in lora_sd.items():
        parts = k.split(".")
        if "experts" in parts:
            raise HFError("LoRA on stacked MoE experts has no PEFT layout here (the merged model is exported)")
        if parts[-1] not in ("lora_A", "lora_B") or len(parts) < 5:
            raise HFError(f"unexpected LoRA tensor {k}")
        i, block, target = parts[1], parts[2], parts[-2]
        table = _MLA_TARGETS if arch.mla is not None and block == "attention" else HF_TARGETS
        sub = {("attention",): "self_attn", ("feed_forward",): "mlp",
               ("moe", "shared_experts"): "mlp.shared_experts"}.get(tuple(parts[2:-2]))
        if sub is None or target not in table:
            raise HFError(f"LoRA tensor {k} has no PEFT name here")
        if arch.mla is not None and sub != "self_attn":
            # peft's transformers-v5 conversion (peft/utils/transformers_weight_conversion.py) reads every
            # gate/up/down_proj target of a deepseek_v3 model as the fused routed experts and drops the rest
            raise HFError("LoRA on a DeepSeek-V3 feed-forward has no PEFT layout transformers loads (PEFT maps "
                          "gate/up/down_proj onto the fused routed experts); the merged model is exported")
        if arch.mla is None and target in ("wq", "wk") and parts[-1] == "lora_B":
            v = _hf_permute(v, arch.n_heads if target == "wq" else arch.kv_heads)
        out[f"base_model.model.model.layers.{i}.{sub}.{table[target]}.{parts[-1]}.weight"] = v
    return out


def export_peft_adapter(lora_sd: dict[str, torch.Tensor], arch, out_dir: str | Path, *, rank: int, alpha: float,
                        dropout: float = 0.0, base_model: str | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
    """adapter_config.json + adapter_model.safetensors loadable by ``peft.PeftModel.from_pretrained``."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in peft_state_dict(lora_sd, arch).items()}
    targets = sorted({k.split(".")[-3] for k in sd})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
           "lora_dropout": dropout, "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
           "inference_mode": True, "base_model_name_or_path": base_model, "modules_to_save": None,
           "use_rslora": False, "use_dora": False, "init_lora_weights": True}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- stage export


def _stage_arch(job):
    if job.kind in ("sft", "dpo", "grpo"):
        from llmc.runtime.posttrain import stage_arch

        return stage_arch(job)
    return job.arch


# torchtitan 0.3.0 FQNs that differ from llmc's: its Llama attention keeps q/k/v in a ``qkv_linear`` container;
# its MoE (models/common/moe.py) stacks experts as ``routed_experts.inner_experts.w{1,3}_EFD / w2_EDF`` (the
# same [E, F, D] / [E, D, F] layout as llmc's) and keeps the DeepSeek-V3 bias as the ``expert_bias_E`` buffer
_TITAN_RENAMES = ((".attention.qkv_linear.", ".attention."),
                  (".moe.routed_experts.inner_experts.w1_EFD", ".moe.experts.w1"),
                  (".moe.routed_experts.inner_experts.w2_EDF", ".moe.experts.w2"),
                  (".moe.routed_experts.inner_experts.w3_EFD", ".moe.experts.w3"),
                  (".moe.expert_bias_E", ".moe.expert_bias"))


# The top-level entries of a torchtitan 0.3.0 checkpoint besides the model's (flattened into the top level:
# torchtitan/components/checkpointer/dcp.py, CheckpointManager._flattened_model_states_sd): OPTIMIZER,
# LR_SCHEDULER, DATALOADER, TRAIN_STATE (torchtitan/components/checkpoint.py)
TITAN_AUX_STATES = frozenset({"optimizer", "lr_scheduler", "dataloader", "train_state"})


def _model_state(stage_dir: Path, *more: Path, dtype: torch.dtype | None = None
                 ) -> tuple[dict[str, torch.Tensor], str]:
    """(full llmc state dict, "llmc" | "torchtitan") of a stage (:func:`_model_state_at`, without the step)."""
    return _model_state_at(stage_dir, *more, dtype=dtype)[:2]


def _model_state_at(stage_dir: Path, *more: Path, dtype: torch.dtype | None = None, at=None
                    ) -> tuple[dict[str, torch.Tensor], str, int | None]:
    """(full llmc state dict, "llmc" | "torchtitan", the checkpoint's step) of a stage: its llmc checkpoint (native, DeepSpeed,
    post-training) or, failing that, the newest torchtitan DCP checkpoint (``step-N/.metadata``) under
    ``stage_dir`` or ``more`` (its model entries only, torchtitan FQNs mapped to llmc's). ``dtype``: floating-point
    tensors are read into it (``checkpoint.read_dcp_tensors``). ``at``: the one checkpoint to read instead
    (:class:`llmc.runtime.export.StepCheckpoint`, ``llmc export --step``: :func:`_step_state`)."""
    from llmc.runtime.checkpoint import (
        CheckpointError,
        read_model_state,
        resolve_checkpoint,
        verify_checkpoint,
    )

    if at is not None:
        return _step_state(at, dtype)
    ck = None
    if stage_dir.is_dir():
        try:
            ck = resolve_checkpoint(stage_dir)
        except CheckpointError:
            pass
    if ck is not None:  # an llmc checkpoint is exported only as its manifest's sha256s say it was written
        try:
            manifest = verify_checkpoint(ck)
        except CheckpointError as e:
            raise HFError(str(e)) from None
        return read_model_state(ck, dtype), "llmc", int(manifest["step"])  # model.pt or the sharded (DCP) checkpoint
    from llmc.runtime.job import checkpoint_step, is_dcp, step_folders

    if is_dcp(stage_dir):  # one torchtitan DCP checkpoint, named exactly
        return _titan_state(stage_dir, dtype), "torchtitan", checkpoint_step(stage_dir)
    dcp: dict[int, Path] = {}
    for d in (stage_dir, *more):  # (a step in two of them: the later folder's)
        dcp.update(step_folders(d, is_dcp, deep=True))
    if not dcp:
        raise HFError(f"{stage_dir}: no llmc checkpoint and no torchtitan DCP checkpoint")
    step = max(dcp)
    return _titan_state(dcp[step], dtype), "torchtitan", step



def _titan_state(dcp_dir: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The model entries of torchtitan DCP checkpoint ``dcp_dir`` (:data:`TITAN_AUX_STATES` left unread), under
    llmc's names (:data:`_TITAN_RENAMES`)."""
    import logging

    from llmc.runtime.checkpoint import read_dcp_tensors

    # DCP's loader logs each failed metadata read with its traceback on the root logger; the CheckpointException
    # it raises says the same, in the one error line the export prints
    logging.disable(logging.ERROR)
    try:
        sd = read_dcp_tensors(dcp_dir, lambda key: key.split(".", 1)[0] not in TITAN_AUX_STATES, dtype)
    finally:
        logging.disable(logging.NOTSET)
    if sd and all(k.startswith("model.") for k in sd):  # a checkpoint of {"model": state dict} (flattened by DCP)
        sd = {k[len("model."):]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if torch.is_tensor(v):
            for a, b in _TITAN_RENAMES:
                k = k.replace(a, b)
            out[k] = v
    return out


def _step_state(at, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], str, int]:
    """(full state dict, "llmc" | "torchtitan", step) of one kept checkpoint ``at`` (``llmc export --step``:
    :class:`llmc.runtime.export.StepCheckpoint`). An llmc checkpoint is verified against its manifest, whose step
    must be the folder's; a DeepSpeed tag is read as the eval step reads one
    (:func:`llmc.runtime.evaluate.ds_checkpoint_state`: DeepSpeed's own ``zero_to_fp32`` converter for ZeRO 1-3, the
    saved module state for ZeRO-0), its weights in ``dtype``; a torchtitan DCP checkpoint as :func:`_titan_state`."""
    from llmc.runtime.checkpoint import CheckpointError, _as_dtype, read_model_state, verify_checkpoint

    if at.format == "llmc":
        try:
            manifest = verify_checkpoint(at.path)
        except CheckpointError as e:
            raise HFError(str(e)) from None
        if int(manifest["step"]) != at.step:
            raise HFError(f"checkpoint {at.path}: its manifest.json says step {manifest['step']}, not {at.step} "
                          f"(a renamed folder?); refusing to export it as step {at.step}")
        return read_model_state(at.path, dtype), "llmc", at.step
    if at.format == "deepspeed":
        import contextlib
        import io

        from llmc.runtime.evaluate import ds_checkpoint_state

        # DeepSpeed's chatter (its accelerator line as it is imported, the converter's progress bar): the export
        # prints its own one line; an error is still raised, and said as one line
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = ds_checkpoint_state(at.path.parent, at.path.name)
        except CheckpointError as e:
            raise HFError(str(e)) from None
        return {k: _as_dtype(v, dtype) for k, v in sd.items()}, "llmc", at.step
    return _titan_state(at.path, dtype), "torchtitan", at.step


_ROUTING_BIAS = re.compile(r"layers\.(\d+)\.moe\.expert_bias")


def dropped_bias_note(sd: dict[str, torch.Tensor], keep: set[str], arch) -> str | None:
    """The one line saying that a non-zero routing bias in the stage's state dict (torchtitan's aux-loss-free
    balancing buffer ``layers.N.moe.expert_bias_E``, read as ``layers.N.moe.expert_bias``) is left out of the export,
    whose class (Mixtral, Qwen3-MoE, DeepSeek-V2: no ``e_score_correction_bias``) picks its top-k experts without it,
    with the bias's size; None when there is none or it is kept (``keep``: the names the export writes) or all
    zeros (a bias that never moved routes as none)."""
    dropped = {int(m.group(1)): t for k, t in sd.items() if (m := _ROUTING_BIAS.fullmatch(k)) and k not in keep}
    moved = {i: t.detach().float() for i, t in dropped.items() if torch.count_nonzero(t)}
    if not moved or arch.moe is None:
        return None
    peak = max(float(t.abs().max()) for t in moved.values())
    spread = max(float(t.max() - t.min()) for t in moved.values())
    return (f"the routing bias torchtitan balanced the experts with (moe.expert_bias_E: largest |bias| {peak:.3g}, "
            f"largest spread across experts {spread:.3g}, in {len(moved)} of {len(dropped)} MoE layers) has no place "
            f"in {family_of(arch).hf_class} and is left out: the export picks its top-{arch.moe.top_k} experts "
            "without it, not as the model trained (plan warning T030)")


def titan_state_to_llmc(sd: dict[str, torch.Tensor], arch) -> dict[str, torch.Tensor]:
    """A torchtitan job's model state (names already llmc's, ``_TITAN_RENAMES``) in llmc's layout: for the families whose
    job uses torchtitan's cos/sin RoPE (``Family.torchtitan_rope``: Qwen3, Qwen3-MoE) the q/k rows and q/k norm weights
    are in HF's rotate_half order, as in an HF checkpoint, and are permuted back per head (:func:`_hf_unpermute`, the
    import's own step); other families' jobs use llmc's pair order already."""
    if family_of(arch).torchtitan_rope != "cossin":
        return sd
    out = dict(sd)
    for name, m in hf_names(arch).items():
        if m.heads and name in out:
            out[name] = _hf_unpermute(out[name], m.heads)
    return out


def titan_checkpoints(build_dir: str | Path, stage: str | None = None) -> dict[int, Path]:
    """step -> torchtitan DCP checkpoint (``step-N/.metadata``) under the build's torchtitan dump folder: the
    pre-training job's, or continued-training stage ``stage``'s own job's."""
    from llmc.runtime.capabilities import titan_dump_subdir
    from llmc.runtime.job import is_dcp, step_folders

    return step_folders(Path(build_dir) / "outputs" / titan_dump_subdir(stage), is_dcp, deep=True)


def export_stage(job, stage_dir: str | Path, out: str | Path | None = None, *, tokenizer_dir=None,
                 model_sd: dict | None = None, lora_sd: dict | None = None,
                 search: tuple[Path, ...] = (), record: dict | None = None, checkpoint=None) -> dict[str, Any]:
    """Export one stage's final weights to ``out`` (default ``<stage_dir>/hf``); returns what was written.
    ``checkpoint``: one kept checkpoint of the stage to export instead (``llmc export --step N``:
    :class:`llmc.runtime.export.StepCheckpoint`), by default to ``<stage_dir>/hf-step-N``.

    Chat stages (sft / dpo / grpo) get the chat template; LoRA stages also get ``<out>/adapter`` (PEFT, naming
    :func:`adapter_base`) when the adapter tensors are given or saved as ``lora_adapters.pt``, else
    ``res["adapter_note"]`` says why not (also in the export's ``.llmc-export.json``). The token ids and generation
    defaults are those of the checkpoint the model descends from (:func:`origin_checkpoint`), where there is one.
    ``record``: the export's provenance, kept in its ``.llmc-export.json`` (the lock's sha256, the fingerprint of the
    run exported, ``step``: given with ``model_sd``, else the step of the checkpoint read)."""
    stage_dir = Path(stage_dir)
    out = Path(out) if out is not None else stage_dir / ("hf" if checkpoint is None else f"hf-step-{checkpoint.step}")
    arch = _stage_arch(job)
    why = hf_export_supported(arch)
    if why:  # the plan said so (X130): a warning where nothing reads the export, else an error
        return {"hf": None, "why": why, "line": no_export_line(why)}
    # the weights as trained: an fp32 run's export keeps fp32 (bf16 would round every weight it trained, unsaid);
    # bf16 / fp8 runs keep fp32 master weights too, but serve and publish in bf16, as the serving configs load them
    dtype = torch.float32 if getattr(job, "precision", "bf16") == "fp32" else torch.bfloat16
    # a checkpoint is read straight into that dtype: half the host memory of its fp32 weights
    sd, source, step = (model_sd, "llmc", None) if model_sd is not None else _model_state_at(stage_dir, *search,
                                                                                           dtype=dtype, at=checkpoint)
    record = {**({"step": step} if step is not None else {}), **(record or {})}
    if source == "torchtitan":
        sd = titan_state_to_llmc(sd, arch)
    params = hf_names(arch)
    missing = sorted(set(params) - set(sd))
    if missing:
        raise HFError(f"{stage_dir}: checkpoint lacks {len(missing)} of the model's tensors: {', '.join(missing[:3])}")
    keep = set(params) | {ours for ours, _ in hf_zero_extras(arch).values()}
    bias_note = dropped_bias_note(sd, keep, arch)
    if bias_note:  # one line where it is done, and in the export's record
        print(f"warning[T030]: stage {getattr(job, 'stage', None) or 'pretrain'}: {bias_note}", file=sys.stderr)
    sd = {k: v for k, v in sd.items() if k in keep}
    template = None
    bos, eos = 0, 1
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").exists():
        from llmc.runtime.tokenizer import TextTokenizer

        tok = TextTokenizer(tokenizer_dir)
        bos, eos = tok.bos_id, tok.eos_id
    if job.kind in ("sft", "dpo", "grpo"):
        hyper = (job.stage_plan or {}).get("hyper") or {}
        template = hyper.get("chat_template") or job.tokenizer.chat_template or "llama3"
    export_hf(sd, arch, out, tokenizer_dir, dtype=dtype, bos_id=bos, eos_id=eos, chat_template=template,
              origin=origin_checkpoint(job), record=record)
    res: dict[str, Any] = {"hf": str(out), "chat_template": template, "dtype": str(dtype).split(".")[-1]}
    if bias_note:
        res["bias_note"] = bias_note
        marker = json.loads((out / EXPORT_MARKER).read_text())
        (out / EXPORT_MARKER).write_text(json.dumps({**marker, "bias_note": bias_note}) + "\n")
    lora = getattr(job.stage_spec, "lora", None) if job.stage_spec is not None else None
    # (the adapters the stage saved at its end: those of its final checkpoint, not of an earlier step's)
    final = checkpoint is None or checkpoint.step == int(job.steps)
    if lora_sd is None and lora is not None and final and (stage_dir / "lora_adapters.pt").exists():
        lora_sd = torch.load(stage_dir / "lora_adapters.pt", map_location="cpu", weights_only=True)
    if lora is not None and lora_sd:
        try:
            export_peft_adapter(lora_sd, arch, out / "adapter", rank=lora.rank, alpha=lora.alpha,
                                dropout=lora.dropout, base_model=adapter_base(job, stage_dir))
            res["adapter"] = str(out / "adapter")
        except HFError as e:  # the merged model is exported all the same; the export's record says why no adapter
            res["adapter_note"] = f"no PEFT adapter written: {e}"
            marker = json.loads((out / EXPORT_MARKER).read_text())
            (out / EXPORT_MARKER).write_text(json.dumps({**marker, "adapter_note": res["adapter_note"]}) + "\n")
    return res


def trained_record(job, step: int) -> dict[str, Any]:
    """The provenance a trainer's own export of a stage it just finished records (:func:`export_stage` ``record``): the
    stage, the fingerprint of the lock that trained it (what its DONE.json records: ``llmc.runtime.job.
    fingerprint_record``), ``finished`` and the step exported. (``llmc export`` adds the lock file's sha256:
    ``llmc.runtime.export.provenance``.)"""
    from llmc.runtime.job import FINGERPRINT_SHA, fingerprint_record

    fp = fingerprint_record(job.lock, job.stage).get(FINGERPRINT_SHA) if getattr(job, "lock", None) else None
    return {"stage": job.stage, "fingerprint_sha256": fp, "finished": True, "step": int(step)}


def adapter_base(job, stage_dir: str | Path) -> str | None:
    """What a LoRA stage's PEFT adapter names as its base (``base_model_name_or_path``, which
    ``peft.AutoPeftModelForCausalLM`` loads): the model the stage started from, not the merged model beside it, which
    already holds the adapter. Its ``init_hf`` as the spec gave it (a Hub id; a local folder as an absolute path, so
    that a copied export still names it), or the ``init_from`` stage's ``hf/`` export; None when neither is there."""
    if job.init_from:
        start = Path(stage_dir).parent / job.init_from / "hf"
        return str(start.resolve()) if start.is_dir() else None
    src = init_hf_source(job)
    if src is None:
        return None
    p = Path(src)
    return str(p.resolve()) if p.is_dir() else src


if __name__ == "__main__":
    sys.exit(main())
