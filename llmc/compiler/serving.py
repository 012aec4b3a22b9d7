"""Serving plans (vLLM / SGLang): KV-cache math, tensor/pipeline parallel size, and the fit check.

For every ``serving:`` target this decides how many GPUs one replica needs and whether the engine
can actually start: the most common vLLM start-up failure is "max_model_len is larger than the
maximum number of tokens that can be stored in KV cache", i.e. weights + KV(max_model_len x
concurrency) + workspace do not fit in ``capacity x gpu_memory_utilization``.

Memory model per GPU of one replica (tp x pp GPUs), all in bytes:

* weights       = (non-embedding params x q + embedding params x 2) / (tp x pp)
  q = 2 (bf16), 1 (fp8), 0.5 + 2.5/128 (awq/gptq 4-bit, group 128: fp16 scale + 4-bit zero per
  group). Embedding and LM head stay in 16 bit (vLLM and AutoAWQ/AutoGPTQ do not quantise them).
* KV per token  = kv_bytes_per_token(arch, 2 or 1 for an fp8 KV cache)   [2 x L x n_kv x hd x bytes]
  sharded over min(tp, n_kv_heads) (vLLM replicates KV heads when tp > n_kv_heads; an MLA latent
  cache is replicated on every TP rank) and over pp (layers are split).
* reserve       = 1 GiB (CUDA context, cuBLAS workspace, CUDA graphs, NCCL buffers)
  + prefill activations of one chunk of 8192 tokens (vLLM's default max_num_batched_tokens for
  chunked prefill): 8192 x 2 B x (4 x d_model + 3 x d_ff / tp)  -- an estimate of vLLM's profile run.
* budget        = capacity x gpu_memory_utilization
* kv_budget     = budget - weights - reserve     (what the engine hands to the paged KV cache)

Choice: the smallest power-of-two tp <= gpus_per_node that divides n_heads and fits; if a whole
node is not enough, pipeline stages across nodes (pp = 2, 3, ... up to 16 and n_layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from llmc.diagnostics import Diagnostic

GiB = 2**30
WORKSPACE_BYTES = 1 * GiB  # CUDA context + cuBLAS workspace + CUDA graphs + NCCL (estimate)
PREFILL_CHUNK_TOKENS = 8192  # vLLM default max_num_batched_tokens with chunked prefill
MAX_PP = 16
_BYTES_PER_PARAM = {"none": 2.0, "fp8": 1.0, "awq": 0.5 + 2.5 / 128, "gptq": 0.5 + 2.5 / 128}


def _lookup_line(lines: Any, path: str) -> int | None:
    """YAML line of a dotted path (``serving[0].gpus``), or of its nearest parent; None without a line map."""
    if not lines:
        return None
    from llmc.diagnostics import line_for

    return line_for(lines, path)


def _kv_bytes_per_token(arch: Any, bytes_per_elem: int) -> int:
    """KV-cache bytes per token over all layers (the math engineer's formula when available)."""
    try:  # pragma: no cover - depends on the teammate's module
        from llmc.compiler.memory import kv_bytes_per_token

        return int(kv_bytes_per_token(arch, bytes_per_elem))
    except ImportError:
        pass
    try:  # pragma: no cover
        from llmc.compiler.params import kv_bytes_per_token

        return int(kv_bytes_per_token(arch, bytes_per_elem))
    except ImportError:
        pass
    # E5 (seed-facts-a 1.2): 2 * L * n_kv * hd * bytes; MLA: (kv_lora_rank + qk_rope_head_dim) per layer
    if getattr(arch, "mla", None) is not None:
        return arch.n_layers * (arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim) * bytes_per_elem
    return 2 * arch.n_layers * arch.kv_heads * arch.hd * bytes_per_elem


def _params_total(arch: Any) -> int:
    try:  # pragma: no cover - teammate's module
        from llmc.compiler.params import params_total

        return int(params_total(arch))
    except ImportError:
        pass
    # Llama-style dense count (seed-facts-a E1), used only until params.py lands
    d, L, H, KV, hd = arch.d_model, arch.n_layers, arch.n_heads, arch.kv_heads, arch.hd
    per_layer = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * arch.d_ff + 2 * d
    if arch.qkv_bias:
        per_layer += H * hd + 2 * KV * hd
    return arch.vocab_size * d * (1 if arch.tied_embeddings else 2) + L * per_layer + d


def embedding_params(arch: Any) -> int:
    """Token embedding + untied LM head (kept in 16 bit by weight-only quantisation)."""
    return arch.vocab_size * arch.d_model * (1 if arch.tied_embeddings else 2)


def serving_max_model_len(run: Any, target: Any) -> int:
    """max_model_len: explicit, else the long-context stage's seq_len (up to the served stage), else data.seq_len."""
    if target.max_model_len:
        return int(target.max_model_len)
    seq = int(run.data.seq_len)
    for st in run.stages:
        if st.kind == "long_context" and st.seq_len:
            seq = int(st.seq_len)
        if target.stage and st.name == target.stage:
            break
    return seq


def _pow2_upto(n: int) -> list[int]:
    out, t = [], 1
    while t <= n:
        out.append(t)
        t *= 2
    return out


def _evaluate(arch, *, tp: int, pp: int, weight_bytes: float, kv_tok: int, max_len: int,
              concurrency: int, capacity: int, util: float) -> dict:
    kv_shard = 1 if getattr(arch, "mla", None) is not None else min(tp, arch.kv_heads)
    kv_tok_gpu = kv_tok / kv_shard / pp
    d_ff = arch.d_ff
    if getattr(arch, "moe", None) is not None and arch.moe.expert_d_ff:
        d_ff = max(d_ff, arch.moe.expert_d_ff * arch.moe.top_k)
    act = PREFILL_CHUNK_TOKENS * 2 * (4 * arch.d_model + 3 * d_ff / tp)
    reserve = WORKSPACE_BYTES + act
    weights_gpu = weight_bytes / (tp * pp)
    budget = capacity * util
    kv_budget = budget - weights_gpu - reserve
    kv_per_seq = kv_tok_gpu * max_len
    need = kv_per_seq * concurrency
    max_seqs = max(0, math.floor(kv_budget / kv_per_seq)) if kv_per_seq > 0 else 0
    return {
        "tp": tp,
        "pp": pp,
        "weights_gpu": weights_gpu,
        "reserve": reserve,
        "budget": budget,
        "kv_budget": kv_budget,
        "kv_per_seq_gpu": kv_per_seq,
        "kv_need": need,
        "max_seqs": max_seqs,
        "fits": kv_budget > 0 and need <= kv_budget,
    }


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def plan_serving(run: Any, gpu_lookup: Callable[[str], Any] | None = None,
                 lines: Any = None) -> tuple[list[dict], list[Diagnostic]]:
    """One plan dict per ``run.serving`` target, plus V-diagnostics (V001 KV does not fit, ...)."""
    if gpu_lookup is None:
        from llmc.compiler.hardware import get_gpu as gpu_lookup  # type: ignore[no-redef]

    arch = run.model
    plans: list[dict] = []
    diags: list[Diagnostic] = []
    stage_names = [s.name for s in run.stages]
    for i, t in enumerate(run.serving):
        path = f"serving[{i}]"
        ln = _lookup_line(lines, path)

        def diag(code, sev, sub, msg, hint="", _ln=ln, _path=path):
            return Diagnostic(code=code, severity=sev, path=f"{_path}.{sub}" if sub else _path, message=msg,
                              hint=hint, line=_lookup_line(lines, f"{_path}.{sub}") or _ln)

        gpu_key = t.gpu or run.hardware.gpu
        try:
            gpu = gpu_lookup(gpu_key)
        except Exception as e:  # unknown GPU: the spec checker reports S-codes too; say it here for serving
            diags.append(diag("V003", "error", "gpu", f"unknown GPU type {gpu_key!r} ({e})",
                              "see `llmc gpus` for the hardware table"))
            continue
        if t.stage is not None and t.stage not in stage_names:
            diags.append(diag("V004", "error", "stage", f"stage {t.stage!r} does not exist",
                              f"one of: {', '.join(stage_names) or '(no stages)'}"))
        capacity = int(gpu.hbm_bytes)
        gpn = run.hardware.gpus_per_node if (t.gpu is None and run.hardware.gpus_per_node) else gpu.gpus_per_node
        gpn = max(1, int(gpn or 1))
        util = float(t.gpu_memory_utilization)
        max_len = serving_max_model_len(run, t)
        kv_elem = 1 if t.kv_cache_dtype == "fp8" else 2
        kv_tok = _kv_bytes_per_token(arch, kv_elem)
        p_total = _params_total(arch)
        p_emb = min(embedding_params(arch), p_total)
        q = _BYTES_PER_PARAM[t.quantization]
        weight_bytes = (p_total - p_emb) * q + p_emb * 2
        common = dict(weight_bytes=weight_bytes, kv_tok=kv_tok, max_len=max_len, concurrency=t.concurrency,
                      capacity=capacity, util=util)

        if max_len > arch.max_seq_len and not arch.rope_scaling and not any(
                s.kind == "long_context" for s in run.stages):
            diags.append(diag("V005", "warning", "max_model_len",
                              f"max_model_len {max_len} exceeds the model's max_seq_len {arch.max_seq_len}",
                              "add a long_context stage or rope_scaling, or serve a shorter context"))

        chosen = None
        tried: list[dict] = []
        if t.gpus:
            tp = min(t.gpus, gpn)
            if t.gpus % tp != 0:
                diags.append(diag("V006", "error", "gpus",
                                  f"gpus={t.gpus} is not a multiple of the GPUs per node ({gpn})",
                                  "use a multiple of gpus_per_node or at most one node"))
                continue
            pp = t.gpus // tp
            if arch.n_heads % tp != 0:
                diags.append(diag("V007", "error", "gpus",
                                  f"tensor_parallel_size {tp} does not divide n_heads={arch.n_heads}",
                                  "pick a GPU count whose per-node part divides the head count"))
                continue
            ev = _evaluate(arch, tp=tp, pp=pp, **common)
            tried.append(ev)
            if ev["fits"]:
                chosen = ev
        else:
            tps = [tp for tp in _pow2_upto(gpn) if arch.n_heads % tp == 0] or [1]
            for tp in tps:
                ev = _evaluate(arch, tp=tp, pp=1, **common)
                tried.append(ev)
                if ev["fits"]:
                    chosen = ev
                    break
            if chosen is None:
                tp = tps[-1]
                for pp in range(2, min(MAX_PP, arch.n_layers) + 1):
                    ev = _evaluate(arch, tp=tp, pp=pp, **common)
                    tried.append(ev)
                    if ev["fits"]:
                        chosen = ev
                        break
        best = chosen or tried[-1]
        fits = chosen is not None
        kv_gib_per_seq = best["kv_per_seq_gpu"] / GiB
        if not fits:
            if best["kv_budget"] <= 0:
                diags.append(diag(
                    "V002", "error", "",
                    f"weights do not fit: {best['weights_gpu'] / GiB:.1f} GiB weights + "
                    f"{best['reserve'] / GiB:.1f} GiB workspace per GPU exceed "
                    f"{best['budget'] / GiB:.1f} GiB ({util:g} x {capacity / GiB:.0f} GiB) at tp={best['tp']} pp={best['pp']}",
                    "quantize the weights (fp8/awq), or use more GPUs"))
            else:
                diags.append(diag(
                    "V001", "error", "concurrency",
                    f"KV cache cannot hold max_model_len x concurrency ({max_len} x {t.concurrency}): needs "
                    f"{best['kv_need'] / GiB:.1f} GiB, has {best['kv_budget'] / GiB:.1f} GiB per GPU "
                    f"(tp={best['tp']} pp={best['pp']}; {best['max_seqs']} sequences fit)",
                    "use kv_cache_dtype: fp8, fewer concurrent sequences, a shorter max_model_len, or more GPUs"))
        vllm_quant = None if t.quantization == "none" else t.quantization
        plans.append({
            "index": i,
            "engine": t.engine,
            "gpu": gpu_key,
            "stage": t.stage or (stage_names[-1] if stage_names else "pretrain"),
            "tensor_parallel_size": best["tp"],
            "pipeline_parallel_size": best["pp"],
            "gpus": best["tp"] * best["pp"],
            "nodes": best["pp"] if best["pp"] > 1 else 1,  # pipeline stages go across nodes, tp within one
            "max_model_len": max_len,
            "concurrency": t.concurrency,
            "max_num_seqs": t.concurrency,
            "max_seqs_that_fit": best["max_seqs"],
            "gpu_memory_utilization": util,
            "quantization": vllm_quant,
            "kv_cache_dtype": t.kv_cache_dtype,
            "prefix_caching": bool(t.prefix_caching),
            "kv_bytes_per_token": kv_tok,
            "weights_gib": _r(weight_bytes / GiB),
            "weights_gib_per_gpu": _r(best["weights_gpu"] / GiB),
            "reserve_gib_per_gpu": _r(best["reserve"] / GiB),
            "kv_gib_per_seq": _r(kv_gib_per_seq, 4),
            "kv_gib_needed": _r(best["kv_need"] / GiB),
            "kv_budget_gib": _r(best["kv_budget"] / GiB),
            "capacity_gib": _r(capacity / GiB),
            "fits": fits,
        })
    return plans, diags
