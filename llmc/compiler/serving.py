"""Serving plans (vLLM / SGLang): KV-cache math, tensor/pipeline parallel size, and the fit check.

For every ``serving:`` target this decides how many GPUs one replica needs and whether the engine
can actually start: the most common vLLM start-up failure is "max_model_len is larger than the
maximum number of tokens that can be stored in KV cache", i.e. weights + KV(max_model_len x
concurrency) + workspace do not fit in ``capacity x gpu_memory_utilization``.

Memory model per GPU of one replica (tp x pp GPUs), all in bytes:

* weights       = (the stage's blocks' params x q + its embedding / LM head x 2) / tp
  q = 2 (bf16), 1 (fp8), 0.5 + 2.5/128 (awq/gptq 4-bit, group 128: fp16 scale + 4-bit zero per
  group). Embedding and LM head stay in 16 bit (vLLM and AutoAWQ/AutoGPTQ do not quantise them).
  Pipeline stages hold the blocks vLLM's ``vllm.distributed.utils.get_pp_indices`` gives them (61 layers over 3
  stages: 20, 21, 20), the first stage the embedding, the last the LM head and final norm (a tied head too: vLLM's
  Llama and Qwen2 models build ``embed_tokens`` on the last rank for it, a ``PPMissingLayer`` on the middle ones).
* KV per token  = params.kv_bytes_per_token(arch, 2 or 1 for an fp8 KV cache)   [2 x L x n_kv x hd x bytes]
  sharded over min(tp, n_kv_heads) (vLLM replicates KV heads when tp > n_kv_heads; an MLA latent
  cache is replicated on every TP rank); a pipeline stage caches its own layers only.
  A model with a sliding window W on vLLM: a sequence holds at most the last W - 1 tokens + one prefill chunk,
  never more than max_model_len, plus one block (vLLM v1 ``SlidingWindowSpec.max_admission_blocks_per_request``:
  cdiv(min(W - 1 + max_in_flight_tokens, max_model_len), block_size) + 1 blocks of 16 tokens); SGLang is counted
  at max_model_len (llmc does not model its sliding-window pool). Layers without the window (OLMo 3's every 4th:
  ``model.full_attention_layers``) hold max_model_len on vLLM too (its hybrid KV-cache manager: one block pool, a
  group of layers of one kind per block table).
* reserve       = 1 GiB (CUDA context, cuBLAS workspace, CUDA graphs, NCCL buffers)
  + prefill activations of one chunk of 8192 tokens (vLLM's default max_num_batched_tokens for
  chunked prefill): 8192 x 2 B x (4 x d_model + 3 x d_ff / tp)  -- an estimate of vLLM's profile run.
* budget        = capacity x gpu_memory_utilization
* kv_budget     = budget - weights - reserve     (what the engine hands to the paged KV cache)

With pipeline stages every stage sizes its own cache and vLLM keeps the smallest block count of all
(``vllm.v1.core.kv_cache_planning.get_kv_cache_configs``): the plan reports the stage that holds the fewest
sequences (the most loaded one), whose weights, KV budget and KV per sequence set what fits.

Choice: the layout with the fewest GPUs that fits, of tp a power of two <= gpus_per_node that shards the
model (:func:`tp_ok`) and pp = 1 .. min(16, n_layers) stages; among as many GPUs, the fewest stages (tensor
parallelism shortens each decode step, pipeline stages do not). A replica takes a divisor of a node (replicas
tile it: 1, 2, 4 or 8 GPUs of an 8-GPU node) or a power of two of its GPUs, or whole nodes (tp x pp a multiple of
gpus_per_node, tp dividing it, so that no tensor parallel group straddles two nodes; vLLM runs those on a Ray
cluster, one node's worth with its own processes). So pipeline stages inside one node come before a
second node: tp 4 x pp 2 on one 8-GPU node halves the KV cache per GPU of a model with 4 KV heads, which tp 8
only replicates (vLLM ``ModelConfig.get_num_kv_heads``: max(1, n_kv_heads // tp)).

Context: V005 refuses a max_model_len past the served export's config.json max_position_embeddings (the engines
refuse it too); V011 warns about one past the longest context the served model was trained at
(:func:`trained_context`: its stages' seq_len, and the released context of a Hugging Face checkpoint it starts
from), which the export may state more of (a preset's max_position_embeddings, RoPE scaling): Llama 3 reached 128K
only through a separate long-context continued pre-training after pre-training at 8K (arXiv:2407.21783, sec. 3.4.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from llmc.compiler import params
from llmc.compiler.hardware import GPU
from llmc.compiler.result import ServingPlan
from llmc.compiler.units import GiB, gib
from llmc.diagnostics import Diagnostic, line_for
from llmc.spec.families import family_of
from llmc.spec.model import Architecture
from llmc.spec.schema import RunSpec, Serving

WORKSPACE_BYTES = 1 * GiB  # CUDA context + cuBLAS workspace + CUDA graphs + NCCL (estimate)
PREFILL_CHUNK_TOKENS = 8192  # vLLM default max_num_batched_tokens with chunked prefill
VLLM_BLOCK_TOKENS = 16  # vLLM's default KV-cache block_size
MAX_PP = 16
_BYTES_PER_PARAM = {"none": 2.0, "fp8": 1.0, "awq": 0.5 + 2.5 / 128, "gptq": 0.5 + 2.5 / 128}


def embedding_params(arch: Architecture) -> int:
    """Token embedding + untied LM head (kept in 16 bit by weight-only quantisation): params.py's count."""
    return params.params_embedding(arch)


def served_stage(run: RunSpec, target: Serving, stages: list | None) -> object | None:
    """The compiled stage (:class:`~llmc.compiler.result.StagePlan`) whose export ``target`` serves: the named one,
    else the last; None without stages."""
    by_name = {s.name: s for s in stages or []}
    name = target.stage or (run.stages[-1].name if run.stages else None)
    return by_name.get(name) if name else None


def _lineage(run: RunSpec, target: Serving, stages: list | None) -> list:
    """The compiled stages the served model comes from: the served stage, then its ``init_from`` ancestry, ending
    at the stage that starts from a Hugging Face checkpoint (``init_hf``) or from random weights. A run without
    ``stages:`` serves its implicit ``pretrain`` stage. Empty without compiled stages."""
    by_name = {s.name: s for s in stages or []}
    st = served_stage(run, target, stages)
    if st is None and not run.stages and target.stage is None:
        st = by_name.get("pretrain")
    out: list = []
    while st is not None and st.name not in {s.name for s in out}:
        out.append(st)
        st = by_name.get(st.init_from) if st.init_from else None
    return out


def serving_max_model_len(run: RunSpec, target: Serving, stages: list | None = None) -> int:
    """max_model_len: explicit, else the longest context a long_context stage trained the served model at (its
    ``init_from`` ancestry, the served stage included), else data.seq_len."""
    if target.max_model_len:
        return int(target.max_model_len)
    seq = int(run.data.seq_len)
    for st in _lineage(run, target, stages):
        if st.kind == "long_context":
            seq = max(seq, int(st.seq_len))
    return seq


def trained_context(run: RunSpec, target: Serving, stages: list | None) -> tuple[int, str] | None:
    """(the longest context the served model was trained at, where that figure comes from), or None without
    compiled stages. The longest ``seq_len`` of the served stage and its ``init_from`` ancestry (:func:`_lineage`:
    pre-training at data.seq_len, a long_context stage's, a GRPO stage's prompt + completion), and where that
    ancestry starts from a Hugging Face checkpoint (``init_hf``), the context that model was released at: its
    config.json's max_position_embeddings, which the spec's ``model.max_seq_len`` states (a preset's is its
    release's: Llama 3.1's 131,072, reached by its own long-context training). A model pre-trained from scratch
    has trained at no more than its stages' seq_len, whatever max_seq_len its preset states: Llama 3's 128K context
    came from a separate long-context continued pre-training after pre-training at 8K (Llama 3 paper, sec. 3.4.2,
    arXiv:2407.21783)."""
    chain = _lineage(run, target, stages)
    if not chain:
        return None
    best, src = 0, ""
    for st in chain:
        if int(st.seq_len) > best:
            best, src = int(st.seq_len), f"the seq_len of stage {st.name!r}"
    root = chain[-1]
    if root.init_hf and int(run.model.max_seq_len) > best:
        best, src = int(run.model.max_seq_len), (f"the context of {root.init_hf}, which stage {root.name!r} starts "
                                                 "from (model.max_seq_len)")
    return best, src


def export_context(run: RunSpec, target: Serving, stages: list | None) -> int:
    """The context the served export states (config.json max_position_embeddings): what vLLM and SGLang refuse to
    serve beyond (vLLM ``ModelConfig`` "max_model_len ... is greater than the derived max_model_len")."""
    st = served_stage(run, target, stages)
    return int(st.max_position_embeddings) if st is not None and st.max_position_embeddings else int(
        run.model.max_seq_len)


def tp_ok(arch: Architecture, tp: int) -> bool:
    """Whether the engines can shard the model ``tp`` ways: heads, KV heads (vLLM's ``QKVParallelLinear``:
    kv_heads % tp == 0 or tp % kv_heads == 0, replicating KV heads past their count), the MLP and the experts'
    widths divide (``ColumnParallelLinear`` / the fused MoE split them evenly)."""
    if arch.n_heads % tp or arch.d_ff % tp:
        return False
    if arch.mla is None and arch.kv_heads % tp and tp % arch.kv_heads:
        return False
    return not (arch.moe is not None and (arch.moe.expert_d_ff or arch.d_ff) % tp)


def prefill_chunk_tokens(concurrency: int) -> int:
    """max_num_batched_tokens the configs pin: vLLM's 8192 chunk, or the concurrency when larger (vLLM refuses a
    max_num_seqs above max_num_batched_tokens, and its own default drops to 2048 on GPUs under 70 GiB)."""
    return max(PREFILL_CHUNK_TOKENS, int(concurrency))


def pp_layer_split(n_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage as vLLM assigns them (``vllm.distributed.utils.get_pp_indices``, without a
    ``VLLM_PP_LAYER_PARTITION`` override): n_layers // pp each, the remainder one more each in the stages before
    the last, from the second-to-last backwards (61 over 3: 20, 21, 20; 63 over 4: 16, 16, 16, 15)."""
    base, rem = divmod(n_layers, pp)
    parts = [base] * pp
    for i in range(2, rem + 2):
        parts[-i] += 1
    return parts


def _pow2_upto(n: int) -> list[int]:
    out, t = [], 1
    while t <= n:
        out.append(t)
        t *= 2
    return out


def kv_tokens_per_sequence(arch: Architecture, engine: str, max_len: int, chunk: int = PREFILL_CHUNK_TOKENS) -> float:
    """KV-cache positions one sequence of max_len tokens holds at most, the mean over the layers (the module
    docstring: a vLLM sliding window bounds it in the windowed layers; the full-attention layers of a model that
    has both hold max_len, in vLLM's hybrid KV-cache manager's groups of one kind each)."""
    w = arch.sliding_window
    if engine != "vllm" or not w:
        return max_len
    windowed = _windowed_positions(w, max_len, chunk)
    n_full = len(arch.full_attention_layers)
    return windowed if not n_full else (n_full * max_len + (arch.n_layers - n_full) * windowed) / arch.n_layers


def _windowed_positions(window: int, max_len: int, chunk: int) -> int:
    """vLLM v1 ``SlidingWindowSpec.max_admission_blocks_per_request`` in tokens (the module docstring)."""
    return (-(-min(window - 1 + chunk, max_len) // VLLM_BLOCK_TOKENS) + 1) * VLLM_BLOCK_TOKENS


def layer_kv_positions(arch: Architecture, engine: str, max_len: int, chunk: int = PREFILL_CHUNK_TOKENS) -> list[int]:
    """KV-cache positions one sequence holds in each layer (0-based): :func:`kv_tokens_per_sequence` layer by
    layer, for pipeline stages that hold different shares of windowed and full-attention layers."""
    w = arch.sliding_window
    if engine != "vllm" or not w:
        return [max_len] * arch.n_layers
    windowed = _windowed_positions(w, max_len, chunk)
    return [max_len if arch.layer_window(i) is None else windowed for i in range(arch.n_layers)]


def stage_weight_bytes(arch: Architecture, pp: int, bytes_per_param: float) -> list[float]:
    """Weight bytes of each pipeline stage (all its tp shards together): its blocks (:func:`pp_layer_split`) at
    ``bytes_per_param``, the embedding on the first stage and the LM head (a tied one as well, when there are
    several stages) on the last at 2 bytes, the final norm on the last. At pp = 1 this is the whole model."""
    emb = arch.vocab_size * arch.d_model
    out, start = [], 0
    for s, n in enumerate(pp_layer_split(arch.n_layers, pp)):
        b = sum(params.layer_params(arch, i) for i in range(start, start + n)) * bytes_per_param
        start += n
        if s == 0:
            b += emb * 2
        if s == pp - 1:
            b += arch.d_model * bytes_per_param  # final norm
            if pp > 1 or not arch.tied_embeddings:
                b += emb * 2
        out.append(b)
    return out


def _evaluate(arch: Architecture, *, tp: int, pp: int, gpn: int, bytes_per_param: float, kv_tok: int,
              kv_pos: list[int], concurrency: int, capacity: int, util: float, chunk: int) -> dict:
    """The memory fit of a tp x pp layout: every stage's, reported by the stage that holds the fewest sequences
    (vLLM sizes every worker's cache to the smallest block count among them, ``get_kv_cache_configs``)."""
    kv_shard = 1 if arch.mla is not None else min(tp, arch.kv_heads)
    d_ff = arch.d_ff
    if arch.moe is not None and arch.moe.expert_d_ff:
        d_ff = max(d_ff, arch.moe.expert_d_ff * arch.moe.top_k)
    act = chunk * 2 * (4 * arch.d_model + 3 * d_ff / tp)
    reserve = WORKSPACE_BYTES + act
    budget = capacity * util
    stages, start = [], 0
    split, weights = pp_layer_split(arch.n_layers, pp), stage_weight_bytes(arch, pp, bytes_per_param)
    for n, w in zip(split, weights, strict=True):
        # bytes per token of the stage's layers: kv_tok is n_layers x (the same bytes in every layer)
        kv_per_seq = kv_tok * sum(kv_pos[start:start + n]) / arch.n_layers / kv_shard
        start += n
        weights_gpu = w / tp
        kv_budget = budget - weights_gpu - reserve
        stages.append({"weights_gpu": weights_gpu, "kv_budget": kv_budget, "kv_per_seq_gpu": kv_per_seq,
                       "room": kv_budget / kv_per_seq if kv_per_seq > 0 else 0.0})
    worst = min(stages, key=lambda st: (st["room"], -st["kv_per_seq_gpu"]))
    kv_budget, kv_per_seq = worst["kv_budget"], worst["kv_per_seq_gpu"]
    need = kv_per_seq * concurrency
    return {
        "tp": tp,
        "pp": pp,
        "nodes": -(-tp * pp // gpn),
        "weights_gpu": worst["weights_gpu"],
        "reserve": reserve,
        "budget": budget,
        "kv_budget": kv_budget,
        "kv_per_seq_gpu": kv_per_seq,
        "kv_need": need,
        "max_seqs": max(0, math.floor(worst["room"])),
        "fits": all(st["kv_budget"] > 0 for st in stages) and need <= kv_budget,
    }


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


class _Target:
    """Diagnostics of one serving target, located at ``serving.N`` (or the key under it)."""

    def __init__(self, i: int, lines: dict | None, diags: list[Diagnostic]):
        self.path, self.lines, self.diags = f"serving.{i}", lines, diags

    def add(self, code: str, sev: str, sub: str, msg: str, hint: str = "") -> None:
        path = f"{self.path}.{sub}" if sub else self.path
        self.diags.append(Diagnostic(code=code, severity=sev, path=path, message=msg,  # type: ignore[arg-type]
                                     hint=hint, line=line_for(self.lines, path)))


def _layouts(arch: Architecture, t: Serving, gpn: int, common: dict, out: _Target) -> tuple[dict | None, list[dict]]:
    """(the chosen layout or None, every layout tried). Pinned ``gpus``: tp within a node, pp across
    nodes; else the first that fits of :func:`candidate_layouts`."""
    tried: list[dict] = []
    if t.gpus:
        tp = min(t.gpus, gpn)
        if t.gpus % tp != 0:
            out.add("V006", "error", "gpus", f"gpus={t.gpus} is not a multiple of the GPUs per node ({gpn})",
                    "use a multiple of gpus_per_node or at most one node")
            return None, tried
        if not tp_ok(arch, tp):
            out.add("V007", "error", "gpus", f"tensor_parallel_size {tp} does not split the model: n_heads "
                    f"{arch.n_heads}, kv heads {arch.kv_heads}, d_ff {arch.d_ff} (each must divide evenly; kv heads "
                    "may also divide tp)", "pick a GPU count whose per-node part divides them")
            return None, tried
        pp = t.gpus // tp
        if pp > min(MAX_PP, arch.n_layers):
            out.add("V006", "error", "gpus", f"gpus={t.gpus} is {pp} pipeline stages of {tp} GPUs: more than "
                    f"{min(MAX_PP, arch.n_layers)} (the model's {arch.n_layers} layers, at most {MAX_PP} stages)",
                    "use fewer GPUs per replica (more replicas serve more requests)")
            return None, tried
        tried.append(_evaluate(arch, tp=tp, pp=pp, gpn=gpn, **common))
        return (tried[-1] if tried[-1]["fits"] else None), tried
    for tp, pp in candidate_layouts(arch, gpn):
        tried.append(_evaluate(arch, tp=tp, pp=pp, gpn=gpn, **common))
        if tried[-1]["fits"]:
            return tried[-1], tried
    return None, tried


def candidate_layouts(arch: Architecture, gpn: int) -> list[tuple[int, int]]:
    """(tp, pp) layouts in the order the search tries them (the module docstring): by GPU count, then by fewer
    pipeline stages; a replica takes a divisor of a node (replicas tile it) or a power of two of its GPUs, or
    whole nodes. At most (log2(gpus_per_node) + 1) x 16 layouts; the last is the largest (the widest tp over the
    most stages), which a target that fits nowhere is reported at."""
    tps = [tp for tp in _pow2_upto(gpn) if tp_ok(arch, tp)] or [1]
    out = [(tp, pp) for tp in tps for pp in range(1, min(MAX_PP, arch.n_layers) + 1)
           if (tp * pp <= gpn and (gpn % (tp * pp) == 0 or pp & (pp - 1) == 0))
           or (tp * pp % gpn == 0 and gpn % tp == 0)]
    return sorted(out, key=lambda lay: (lay[0] * lay[1], lay[1]))


def weights_min_gpus(weight_bytes: float, budget: float) -> int:
    """GPUs whose usable memory (capacity x gpu_memory_utilization each) holds ``weight_bytes``: a floor, the
    weights alone (no workspace, no KV cache)."""
    return max(1, math.ceil(weight_bytes / budget))


def _weights_hint(best: dict, t: Serving, arch: Architecture) -> str:
    """V002's hint: fp8 weights (quantized on load: 1 byte per block parameter, the embedding and LM head kept in
    16 bit) where they fit the layout reported, else the GPUs that the weights alone need (:func:`weights_min_gpus`)."""
    tp, pp, budget, reserve = best["tp"], best["pp"], best["budget"], best["reserve"]
    fp8_gpu = max(stage_weight_bytes(arch, pp, _BYTES_PER_PARAM["fp8"])) / tp
    if t.quantization == "none" and fp8_gpu + reserve < budget:
        return f"quantize the weights on load (quantization: fp8: {gib(fp8_gpu)} per GPU), or use more GPUs"
    total = stage_weight_bytes(arch, 1, _BYTES_PER_PARAM[t.quantization])[0]
    words = "in 16 bit" if t.quantization == "none" else f"with quantization: {t.quantization}"
    fp8 = ""
    if t.quantization == "none":
        fp8_total = stage_weight_bytes(arch, 1, _BYTES_PER_PARAM["fp8"])[0]
        fp8 = (f"; fp8 weights ({gib(fp8_gpu)} per GPU here) do not fit either and need at least "
               f"{weights_min_gpus(fp8_total, budget)}")
    then = "set gpus to at least that, or serve on a larger GPU" if t.gpus else "serve on a larger GPU"
    return (f"the weights alone need at least {weights_min_gpus(total, budget)} GPUs: {gib(total)} {words} over "
            f"{gib(budget)} usable per GPU (gpu_memory_utilization x capacity){fp8}; more with the workspace and KV "
            f"cache: {then}")


def _fit_diagnostic(best: dict, t: Serving, max_len: int, util: float, capacity: int, out: _Target,
                    arch: Architecture) -> None:
    """V002 (the weights alone do not fit) or V001 (the KV cache cannot hold max_model_len x concurrency)."""
    if best["kv_budget"] <= 0:
        out.add("V002", "error", "",
                f"weights do not fit: {gib(best['weights_gpu'])} weights + {gib(best['reserve'])} workspace per GPU "
                f"exceed {gib(best['budget'])} ({util:g} x {gib(capacity)}) at tp={best['tp']} pp={best['pp']}",
                _weights_hint(best, t, arch))
    else:
        out.add("V001", "error", "concurrency",
                f"KV cache cannot hold max_model_len x concurrency ({max_len} x {t.concurrency}): needs "
                f"{gib(best['kv_need'])}, has {gib(best['kv_budget'])} per GPU "
                f"(tp={best['tp']} pp={best['pp']}; {best['max_seqs']} sequences fit)",
                "use kv_cache_dtype: fp8, fewer concurrent sequences, a shorter max_model_len, or more GPUs")


def _check_trained_context(run: RunSpec, t: Serving, stages: list | None, max_len: int, out: _Target) -> None:
    """V011: max_model_len beyond the longest context the served model was trained at (:func:`trained_context`).
    The export may state a longer context (a preset's max_position_embeddings, RoPE scaling), so the engines start,
    but the positions past the trained length were never trained at: Llama 3 reached 128K only through a
    long-context continued pre-training after its 8K pre-training (arXiv:2407.21783, sec. 3.4.2)."""
    trained = trained_context(run, t, stages)
    if trained is None or max_len <= trained[0]:
        return
    n, src = trained
    out.add("V011", "warning", "max_model_len",
            f"max_model_len {max_len} is past the longest context the served model was trained at: trained at "
            f"{n} ({src}), served at {max_len}; its positions past {n} were never trained",
            f"add a long_context stage (with rope_scaling) that trains at {max_len} before the served stage, or "
            f"serve max_model_len <= {n}")


def plan_serving(run: RunSpec, gpu_lookup: Callable[[str], GPU | None] | None = None, lines: dict | None = None,
                 train_gpu: GPU | None = None, stages: list | None = None) -> tuple[list[ServingPlan], list[Diagnostic]]:
    """One :class:`ServingPlan` per ``run.serving`` target, plus V-diagnostics (V001 KV does not fit, ...).

    ``train_gpu``: the training GPU with the spec's hardware overrides (``compile.cluster_gpu``), used
    for targets that name no GPU of their own; others come from ``gpu_lookup`` (the hardware table). ``stages``:
    the compiled stages (the served export's context and its ancestry's trained length; without them, as when a
    caller plans serving alone, V011 is not checked: what each stage trained at is the compiled stages' seq_len).
    """
    if gpu_lookup is None:
        from llmc.compiler.hardware import get_gpu as gpu_lookup  # type: ignore[no-redef]
    if train_gpu is None and gpu_lookup(run.hardware.gpu) is not None:
        from llmc.compiler.compile import cluster_gpu  # noqa: PLC0415 - compile imports this module lazily

        train_gpu = cluster_gpu(run, gpu_lookup(run.hardware.gpu))
    plans: list[ServingPlan] = []
    diags: list[Diagnostic] = []
    for i, t in enumerate(run.serving):
        plan = _plan_target(run, i, t, gpu_lookup, train_gpu, _Target(i, lines, diags), stages)
        if plan is not None:
            plans.append(plan)
    return plans, diags


def _plan_target(run: RunSpec, i: int, t: Serving, gpu_lookup, train_gpu: GPU | None, out: _Target,
                 stages: list | None = None) -> ServingPlan | None:
    arch = run.model
    stage_names = [s.name for s in run.stages]
    gpu_key = t.gpu or run.hardware.gpu
    # the training GPU named again is the training GPU, its hardware.gpu_overrides (and a custom part) included
    gpu = gpu_lookup(t.gpu) if t.gpu and t.gpu != run.hardware.gpu else train_gpu
    if gpu is None:  # a target without its own GPU serves on the training GPU, whose S007 is the error
        if t.gpu:
            out.add("V003", "error", "gpu", f"unknown GPU type {gpu_key!r}", "see `llmc gpus` for the hardware table")
        return None
    if gpu.key == "cpu":
        out.add("V003", "error", "gpu", "serving on the CPU pseudo-device is not planned (vLLM's CPU backend sizes its "
                "KV cache from VLLM_CPU_KVCACHE_SPACE, not from GPU memory)", "name a GPU: serving: [{gpu: h100-sxm}]")
        return None
    if t.quantization in ("awq", "gptq"):
        out.add("V009", "error", "quantization", f"quantization {t.quantization} serves a pre-quantized checkpoint "
                f"(the engines read its quantize config), but the served export is llmc's 16-bit one",
                "use quantization: fp8 (quantized on load), or quantize the export yourself and serve that")
    if t.expert_parallel and (arch.moe is None or t.engine != "vllm"):
        out.add("V010", "error", "expert_parallel",
                "expert_parallel on a dense model: it has no experts to split" if arch.moe is None else
                "expert_parallel with engine sglang: llmc emits vLLM's expert parallelism (--enable-expert-parallel) "
                "only, not SGLang's", "drop expert_parallel" if arch.moe is None else
                "serve with engine: vllm, or drop expert_parallel (the experts are then tensor parallel)")
    if t.stage is not None and t.stage not in stage_names:
        out.add("V004", "error", "stage", f"stage {t.stage!r} does not exist",
                f"one of: {', '.join(stage_names) or '(no stages)'}")
    capacity = int(gpu.hbm_bytes)
    util = float(t.gpu_memory_utilization)
    max_len = serving_max_model_len(run, t, stages)
    context = export_context(run, t, stages)
    kv_tok = params.kv_bytes_per_token(arch, 1 if t.kv_cache_dtype == "fp8" else 2)
    q = _BYTES_PER_PARAM[t.quantization]
    weight_bytes = stage_weight_bytes(arch, 1, q)[0]  # (non-embedding params x q + embedding params x 2)
    if max_len > context:
        out.add("V005", "error", "max_model_len",
                f"max_model_len {max_len} exceeds the served export's context {context} (its config.json "
                "max_position_embeddings): vLLM and SGLang refuse to start beyond it",
                "serve at most that, or extend the context first (a long_context stage, rope_scaling)")
    else:
        _check_trained_context(run, t, stages, max_len, out)
    w = arch.sliding_window
    if t.engine == "sglang" and w and max_len > w and family_of(arch).hf_class in ("MistralForCausalLM",
                                                                                    "Phi3ForCausalLM"):
        # SGLang serves MistralForCausalLM and Phi3ForCausalLM with its Llama model, whose RadixAttention is built
        # without a window (python/sglang/srt/models/llama.py); vLLM applies the config's sliding_window
        out.add("V008", "warning", "engine",
                f"SGLang serves this model without its {w}-token attention window (its Llama model, which runs "
                f"Mistral and Phi-3 checkpoints, attends to every position): past {w} tokens its outputs are not the "
                "trained model's", f"serve it with engine: vllm, or max_model_len <= {w}")
    chunk = prefill_chunk_tokens(t.concurrency)
    common = dict(bytes_per_param=q, kv_tok=kv_tok, kv_pos=layer_kv_positions(arch, t.engine, max_len, chunk),
                  concurrency=t.concurrency, capacity=capacity, util=util, chunk=chunk)
    chosen, tried = _layouts(arch, t, max(1, gpu.gpus_per_node), common, out)
    if not tried:
        return None
    best = chosen or tried[-1]
    if chosen is None:
        _fit_diagnostic(best, t, max_len, util, capacity, out, arch)
    return ServingPlan(
        index=i, engine=t.engine, gpu=gpu_key, stage=t.stage or (stage_names[-1] if stage_names else "pretrain"),
        tensor_parallel_size=best["tp"], pipeline_parallel_size=best["pp"], gpus=best["tp"] * best["pp"],
        nodes=best["nodes"],  # one node's worth or whole nodes (candidate_layouts), tp within one
        max_model_len=max_len, concurrency=t.concurrency, max_num_seqs=t.concurrency, max_num_batched_tokens=chunk,
        max_seqs_that_fit=best["max_seqs"], gpu_memory_utilization=util,
        quantization=None if t.quantization == "none" else t.quantization, kv_cache_dtype=t.kv_cache_dtype,
        prefix_caching=bool(t.prefix_caching), kv_bytes_per_token=kv_tok, weights_gib=_r(weight_bytes / GiB),
        weights_gib_per_gpu=_r(best["weights_gpu"] / GiB), reserve_gib_per_gpu=_r(best["reserve"] / GiB),
        kv_gib_per_seq=_r(best["kv_per_seq_gpu"] / GiB, 4), kv_gib_needed=_r(best["kv_need"] / GiB),
        kv_budget_gib=_r(best["kv_budget"] / GiB), capacity_gib=_r(capacity / GiB), fits=chosen is not None,
        expert_parallel=bool(t.expert_parallel and arch.moe is not None and t.engine == "vllm"),
    )
