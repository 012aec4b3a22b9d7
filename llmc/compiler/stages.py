"""Post-training / continued-training stages: the stage graph and a plan per stage.

Pure functions (no torch). ``plan_stages(run, gpu, lines)`` checks the graph that
``init_from`` edges form (cycles, unknown names, incompatible bases), orders the stages
topologically and returns one JSON-serialisable dict per stage with its resolved
hyper-parameters (and which were defaults), the models it keeps in memory, its trainable
parameters (full or LoRA), its per-GPU memory, the GRPO rollout cost and the long-context
changes, plus diagnostics for known pitfalls.

Sources for the defaults and checks (see /work/shared/reference/seed-facts-{a,b}.md):
  * continued pre-training LR ~1e-5 (S003 §14.2); mix 10-20% general data (S004 Ch13)
  * SFT: full fine-tune LR ~1e-5..2e-5 [EXT], response-only loss (S004 Ch8, F17)
  * DPO: beta 0.1 (TRL default, 002 Phase 5 code); LR ~5e-7..5e-6 [EXT]
  * GRPO: G = 8 (TRL num_generations, 002 Phase 5), KL beta 0.04, LR 1e-6 (DeepSeekMath)
  * LoRA: r*(d_in+d_out) per adapted matrix (seed-facts-a App. A #14); QLoRA paper LR 2e-4
    (7B/13B) and 1e-4 (33B/65B); NF4 4 bits + double-quantised absmax (~0.127 bit/param)
  * PPO needs 4 models, DPO 2, GRPO policy + reference when KL > 0 (S004 Ch8, Ch13)
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import networkx as nx

from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic

# ----------------------------------------------------------------------------- constants (data)

CHAT_KINDS = ("sft", "dpo", "grpo")
#: special tokens each chat template needs from the tokenizer
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
#: special tokens of the tokenizer llmc trains locally (llmc.runtime.tokenizer)
LLMC_TOKENIZER_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)
#: NF4: 4-bit codes + blockwise absmax (block 64). Double quantisation stores the absmax in 8 bits
#: with one fp32 constant per 256 blocks: 8/64 + 32/(64*256) = 0.127 bit/param (QLoRA paper §3).
NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)
NF4_BLOCK = 64
BYTES_PER_TRAINABLE_PARAM = 16  # bf16 weight + bf16 grad + fp32 master + Adam m, v (ZeRO paper, 2+2+12)
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_PROMPT_TOKENS = 512
GRPO_COMPLETIONS_PER_STEP = 1024  # DeepSeekMath GRPO batch size [EXT]
CP_TOKENS_PER_RANK = 16384  # target tokens per rank when recommending context parallelism
LORA_RANK_RANGE = (4, 64)  # S004 Ch8


# ----------------------------------------------------------------------------- helpers


def _interp_log(n: float, points: list[tuple[float, float]]) -> float:
    """Piecewise log-log interpolation of an LR over model size, clamped at both ends."""
    if n <= points[0][0]:
        return points[0][1]
    for (n0, v0), (n1, v1) in zip(points, points[1:], strict=False):
        if n <= n1:
            t = (math.log(n) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    return points[-1][1]


# size -> LR anchors per kind (params, lr)
_LR_POINTS: dict[str, list[tuple[float, float]]] = {
    # pre-training: 3e-4 at 1B -> 1e-4 at 70B, log-interpolated (S004 Ch6 table, seed-facts-a §10 item 2)
    "pretrain": [(1e9, 3e-4), (70e9, 1e-4)],
    # continued pre-training / long-context extension ~1e-5 (S003 §14.2); a bit higher for small models
    "midtrain": [(1e9, 3e-5), (70e9, 1e-5)],
    "long_context": [(1e9, 3e-5), (70e9, 1e-5)],
    # SFT full fine-tune: 2e-5 for 7-70B [EXT] (anchor at 80B so 70.6B models get it), 5e-5 for <= 1B, 1e-5 at 400B
    "sft": [(1e9, 5e-5), (7e9, 2e-5), (80e9, 2e-5), (400e9, 1e-5)],
    # DPO: 1e-6 for small, 5e-7 for 70B [EXT]
    "dpo": [(7e9, 1e-6), (70e9, 5e-7)],
    # GRPO: 1e-6 (DeepSeekMath)
    "grpo": [(1e9, 1e-6), (1e12, 1e-6)],
}
# LoRA: QLoRA paper 2e-4 for 7B/13B, 1e-4 for 33B/65B
_LORA_LR_POINTS = [(13e9, 2e-4), (33e9, 1e-4)]


def default_lr(kind: str, n_params: float, lora: bool) -> float:
    """Size-aware default peak LR for a stage kind (see module docstring for sources)."""
    if lora:
        base = _interp_log(n_params, _LORA_LR_POINTS)
        if kind in ("dpo", "grpo"):
            # preference/RL stages with adapters: 10x the full fine-tune LR (adapters start at B=0) [heuristic]
            return 10 * _interp_log(n_params, _LR_POINTS[kind])
        return base
    return _interp_log(n_params, _LR_POINTS[kind])


def _line(lines: dict | None, path: str) -> int | None:
    """Line of ``path`` in the YAML, falling back to its parents (``stages.2.lr`` -> ``stages.2``)."""
    if not lines:
        return None
    p = path
    while p:
        if p in lines:
            return lines[p]
        if "." not in p:
            break
        p = p.rsplit(".", 1)[0]
    return None


def _gpu_capacity(gpu: Any) -> int | None:
    if gpu is None:
        return None
    for attr in ("memory_bytes", "capacity_bytes", "hbm_bytes", "mem_bytes"):
        v = getattr(gpu, attr, None)
        if v:
            return int(v)
    for attr, scale in (("memory_gib", 2**30), ("hbm_gib", 2**30), ("memory_gb", 1e9), ("hbm_gb", 1e9)):
        v = getattr(gpu, attr, None)
        if v:
            return int(v * scale)
    return None


def _gpus_per_node(run: Any, gpu: Any) -> int:
    if run.hardware.gpus_per_node:
        return run.hardware.gpus_per_node
    return int(getattr(gpu, "gpus_per_node", None) or 8)


# ----------------------------------------------------------------------------- parameter counts


def linear_shapes(arch: Any) -> list[tuple[str, int, int, int]]:
    """(torchtitan target name, d_in, d_out, count over layers/experts) of every adaptable linear.

    Dense GQA attention: wq d->H*hd, wk/wv d->KV*hd, wo H*hd->d. SwiGLU: w1/w3 d->d_ff, w2 d_ff->d.
    MoE layers count every routed + shared expert's w1/w2/w3 (router not adapted).
    MLA attention projections are not counted (they have other names).
    """
    d, hd, h, kv = arch.d_model, arch.hd, arch.n_heads, arch.kv_heads
    L = arch.n_layers
    out: list[tuple[str, int, int, int]] = []
    if arch.mla is None:
        out += [("wq", d, h * hd, L), ("wk", d, kv * hd, L), ("wv", d, kv * hd, L), ("wo", h * hd, d, L)]
    if arch.moe is None:
        out += [("w1", d, arch.d_ff, L), ("w3", d, arch.d_ff, L), ("w2", arch.d_ff, d, L)]
    else:
        m = arch.moe
        dense = min(m.dense_layers, L)
        moe_layers = L - dense
        eff = m.expert_d_ff or arch.d_ff
        n_exp = m.num_experts + m.num_shared_experts
        if dense:
            out += [("w1", d, arch.d_ff, dense), ("w3", d, arch.d_ff, dense), ("w2", arch.d_ff, d, dense)]
        out += [("w1", d, eff, moe_layers * n_exp), ("w3", d, eff, moe_layers * n_exp),
                ("w2", eff, d, moe_layers * n_exp)]
    return out


def lora_trainable_params(arch: Any, rank: int, targets: list[str] | tuple[str, ...]) -> int:
    """LoRA trainable params: sum over adapted matrices of r*(d_in+d_out) (A is r x d_in, B is d_out x r)."""
    return sum(rank * (di + do) * n for name, di, do, n in linear_shapes(arch) if name in targets)


def _count_params(arch: Any) -> tuple[int, int, int]:
    """(total, active, embedding) params: the math engineer's function when present, else a local count."""
    try:
        from llmc.compiler.params import params_total  # noqa: PLC0415

        total = int(params_total(arch))
        try:
            from llmc.compiler.params import params_embedding  # noqa: PLC0415

            emb = int(params_embedding(arch))
        except Exception:  # noqa: BLE001
            emb = arch.vocab_size * arch.d_model * (1 if arch.tied_embeddings else 2)
        active = total
        try:
            from llmc.compiler.params import params_active  # noqa: PLC0415

            active = int(params_active(arch))
        except Exception:  # noqa: BLE001
            pass
        return total, active, emb
    except Exception:  # noqa: BLE001 - module not there yet or not this signature: local count
        pass
    lin = sum(di * do * n for _, di, do, n in linear_shapes(arch))
    emb = arch.vocab_size * arch.d_model * (1 if arch.tied_embeddings else 2)
    norms = arch.n_layers * 2 * arch.d_model + arch.d_model
    router = 0
    active = lin
    if arch.moe is not None:
        m = arch.moe
        moe_layers = arch.n_layers - min(m.dense_layers, arch.n_layers)
        router = moe_layers * arch.d_model * m.num_experts
        eff = m.expert_d_ff or arch.d_ff
        idle = moe_layers * (m.num_experts - m.top_k) * 3 * arch.d_model * eff
        active = lin - idle
    total = lin + emb + norms + router
    return total, active + emb + norms + router, emb


def _kv_bytes_per_token(arch: Any) -> int:
    try:
        from llmc.compiler.params import kv_bytes_per_token  # noqa: PLC0415

        return int(kv_bytes_per_token(arch))
    except Exception:  # noqa: BLE001
        # bf16 K and V for every layer: 2 * L * KV * hd * 2 bytes
        if arch.mla is not None:
            return arch.n_layers * (arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim) * 2
        return 2 * arch.n_layers * arch.kv_heads * arch.hd * 2


# ----------------------------------------------------------------------------- activations


def _activation_bytes(arch: Any, plan: ParallelPlan, seq_len: int, precision: str, capacity: int | None) -> tuple[int, str]:
    """Activation bytes per GPU: the math engineer's model when available, else a Korthikanti estimate."""
    try:
        from llmc.compiler.memory import memory_per_gpu  # noqa: PLC0415

        res = memory_per_gpu(arch, plan, seq_len, precision, capacity or 80 * 10**9)
        bd = res.get("breakdown", res) if isinstance(res, dict) else getattr(res, "breakdown", None)
        if isinstance(bd, dict) and "activations" in bd:
            return int(bd["activations"]), "llmc.compiler.memory.memory_per_gpu"
    except Exception:  # noqa: BLE001 - not landed yet / other signature
        pass
    # Korthikanti et al. 2022 with FlashAttention (no 5*a*s/h score term): 34*s*b*d bytes per layer,
    # divided by tp and cp; full recomputation keeps 2*s*b*d per layer plus one layer's working set.
    s = seq_len / max(plan.cp, 1)
    b = plan.micro_batch
    per_layer = 34 * s * b * arch.d_model / max(plan.tp, 1)
    if plan.activation_checkpointing == "full":
        act = arch.n_layers * 2 * s * b * arch.d_model + per_layer
    else:  # selective recomputation only drops the 5as/h score term, which flash attention never stores
        act = arch.n_layers * per_layer
    act += 4 * s * b * arch.vocab_size / max(plan.tp, 1)  # fp32 logits for the loss
    return int(act), "local estimate (Korthikanti 2022, flash attention)"


# ----------------------------------------------------------------------------- the planner


def _resolved_stages(run: Any) -> list[Any]:
    if run.stages:
        return list(run.stages)
    from llmc.spec.run import Stage  # noqa: PLC0415 - spec is pure pydantic

    return [Stage(name="pretrain", kind="pretrain")]


def _tokenizer_for(run: Any, stage: Any) -> Any:
    """The stage's tokenizer: its own when it names one (path/train), else the run's, with the stage's
    chat_template taking precedence (the runtime's TrainJob resolves it the same way)."""
    top = run.data.tokenizer
    if stage.data is None:
        return top
    own = stage.data.tokenizer
    if own.path or own.train:
        return own
    return top.model_copy(update={"chat_template": own.chat_template or top.chat_template,
                                  "vocab_size": own.vocab_size or top.vocab_size})


def _tokenizer_specials(run: Any, tok: Any, spec_file: str | None = None) -> tuple[set[str] | None, str]:
    """The tokenizer's special tokens when known, and how we know (relative paths: against the spec's folder)."""
    if tok.train and not tok.path:
        return set(LLMC_TOKENIZER_SPECIALS), "llmc-trained tokenizer"
    if tok.path:
        import json  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        p = Path(tok.path)
        if not p.is_absolute() and spec_file:
            p = Path(spec_file).parent / p
        f = p / "tokenizer.json" if p.is_dir() else p
        try:
            js = json.loads(f.read_text())
            return {t["content"] for t in js.get("added_tokens", [])}, str(f)
        except Exception:  # noqa: BLE001 - unreadable: fall through to the model-name guess
            pass
    name = (run.model.name or "").lower().replace("-", "").replace("_", "")
    if name.startswith("llama3") or run.model.vocab_size in (128256, 128000):
        return set(LLMC_TOKENIZER_SPECIALS) | {"<|end_of_text|>"}, f"inferred from model {run.model.name!r}"
    if name.startswith("qwen"):
        return {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}, f"inferred from model {run.model.name!r}"
    return None, "unknown"


def _general_fraction(stage: Any) -> tuple[float | None, bool]:
    """(share of general data, is this a domain stage)."""
    srcs = stage.data.sources if stage.data is not None else []
    domain = any(s.kind in ("domain", "code", "math", "multilingual") for s in srcs)
    if stage.general_data_fraction is not None:
        return stage.general_data_fraction, True
    if not srcs:
        return None, False
    tot = sum(s.weight for s in srcs)
    gen = sum(s.weight for s in srcs if s.kind in ("general", "chat"))
    return gen / tot, domain


def plan_stages(run: Any, gpu: Any = None, lines: dict | None = None, file: str | None = None,
                searched_memory: dict | None = None) -> tuple[list[dict], list[Diagnostic]]:
    """Check the stage graph and plan every stage; returns (plans in topological order, diagnostics).

    searched_memory: the memory of the layout the parallelism search chose for the pre-training run;
    the ``pretrain`` stage reports (and is fit-checked against) it instead of the simple stage estimate.
    """
    diags: list[Diagnostic] = []

    def diag(code: str, sev: str, path: str, msg: str, hint: str = "") -> None:
        diags.append(Diagnostic(code, sev, path, msg, hint, _line(lines, path), file))  # type: ignore[arg-type]

    stages = _resolved_stages(run)
    idx = {}
    for i, st in enumerate(stages):
        if st.name in idx:
            diag("G001", "error", f"stages.{i}.name", f"duplicate stage name {st.name!r}",
                 f"first defined as stages.{idx[st.name]}")
        else:
            idx[st.name] = i

    # --- graph
    g = nx.DiGraph()
    g.add_nodes_from(idx)
    for i, st in enumerate(stages):
        if st.init_from is None:
            continue
        if st.init_from not in idx:
            close = difflib.get_close_matches(st.init_from, list(idx), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"stages are: {', '.join(idx)}"
            diag("G003", "error", f"stages.{i}.init_from", f"unknown stage {st.init_from!r}", hint)
            continue
        if st.init_from == st.name:
            diag("G002", "error", f"stages.{i}.init_from", f"stage {st.name!r} initialises from itself",
                 "init_from must name an earlier stage")
            continue
        g.add_edge(st.init_from, st.name)
    cyc_nodes: set[str] = set()
    for cyc in nx.simple_cycles(g):
        cyc_nodes |= set(cyc)
        i = idx[cyc[0]]
        loop = " -> ".join([*cyc, cyc[0]])
        diag("G002", "error", f"stages.{i}.init_from", f"stage graph has a cycle: {loop}",
             "init_from edges must form a DAG")
    if cyc_nodes:
        order = list(idx)
    else:
        # topological order, ties broken by position in the YAML (stable)
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: idx[n]))

    # --- per-stage plans
    arch = run.model
    n_total, n_active, n_emb = _count_params(arch)
    capacity = _gpu_capacity(gpu)
    world = run.hardware.count
    gpn = _gpus_per_node(run, gpu)
    kvb = _kv_bytes_per_token(arch)
    precision = run.training.precision
    ctx: dict[str, dict] = {}  # name -> context the stage's output has (seq_len, rope_theta, rope_scaling)
    plans: list[dict] = []
    base_ctx = {"seq_len": run.data.seq_len, "max_context": max(arch.max_seq_len, run.data.seq_len)
                if arch.rope_scaling else arch.max_seq_len, "rope_theta": arch.rope_theta,
                "rope_scaling": arch.rope_scaling.model_dump(mode="json") if arch.rope_scaling else None,
                "vocab_size": arch.vocab_size, "tokenizer": run.data.tokenizer.path}

    for order_i, name in enumerate(order):
        i = idx[name]
        st = stages[i]
        p = f"stages.{i}"
        parent = ctx.get(st.init_from) if st.init_from else None
        inherited = dict(parent or base_ctx)
        defaults: list[str] = []
        notes: list[str] = []
        lora = st.lora

        # sequence length
        if st.kind == "grpo":
            prompt_tokens = st.max_prompt_tokens or DEFAULT_PROMPT_TOKENS
            gen_tokens = st.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            if st.max_prompt_tokens is None:
                defaults.append("max_prompt_tokens")
            if st.max_new_tokens is None:
                defaults.append("max_new_tokens")
            seq_len = st.seq_len or prompt_tokens + gen_tokens
        else:
            seq_len = st.seq_len or (st.data.seq_len if st.data else None) or inherited["seq_len"]

        # LR
        lr = st.lr
        if lr is None:
            if st.kind == "pretrain" and run.training.optimizer.lr:
                lr = run.training.optimizer.lr
            else:
                lr = float(f"{default_lr(st.kind, n_total, lora is not None):.3g}")
                defaults.append("lr")

        # kind-specific hyper-parameters
        hyper: dict[str, Any] = {}
        if st.kind == "dpo":
            hyper["beta"] = st.dpo_beta if st.dpo_beta is not None else 0.1
            if st.dpo_beta is None:
                defaults.append("dpo_beta")
        if st.kind == "grpo":
            G = st.grpo_group_size if st.grpo_group_size is not None else 8
            kl = st.grpo_kl_coef if st.grpo_kl_coef is not None else 0.04
            if st.grpo_group_size is None:
                defaults.append("grpo_group_size")
            if st.grpo_kl_coef is None:
                defaults.append("grpo_kl_coef")
            prompts = st.prompts_per_step or max(1, GRPO_COMPLETIONS_PER_STEP // max(G, 1))
            if st.prompts_per_step is None:
                defaults.append("prompts_per_step")
            reward = st.reward or "arithmetic"
            if st.reward is None:
                defaults.append("reward")
            hyper.update(group_size=G, kl_coef=kl, clip=st.grpo_clip, max_new_tokens=gen_tokens,
                         max_prompt_tokens=prompt_tokens, prompts_per_step=prompts, reward=reward)
        if st.kind == "sft":
            hyper["loss_mask"] = st.loss_mask or "assistant"
            if st.loss_mask is None:
                defaults.append("loss_mask")
        if st.kind in CHAT_KINDS:
            tmpl = _tokenizer_for(run, st).chat_template
            if tmpl is None:
                tmpl = "llama3"
                defaults.append("chat_template")
            hyper["chat_template"] = tmpl

        # steps
        steps = st.steps
        gbt = st.global_batch_tokens
        if gbt is None:
            # SFT/DPO: 64 sequences per step [heuristic]; (continued) pre-training: the run's batch
            # (4M tokens when unset, Llama-3 pre-training); GRPO: every completion of the step
            gbt = {"sft": 64, "dpo": 64, "grpo": 0}.get(st.kind, 0) * seq_len or None
            if st.kind in ("pretrain", "midtrain", "long_context"):
                gbt = run.training.global_batch_tokens or 4 * 2**20
            if st.kind == "grpo":
                gbt = hyper["prompts_per_step"] * hyper["group_size"] * seq_len
            if not (st.kind in ("pretrain", "midtrain", "long_context") and run.training.global_batch_tokens):
                defaults.append("global_batch_tokens")
        if steps is None and st.kind == "pretrain" and run.training.steps:
            steps = run.training.steps
        if steps is None:
            data_tokens = st.data.tokens if st.data else (run.data.tokens if st.kind in ("pretrain", "midtrain")
                                                           else None)
            steps = max(1, math.ceil(data_tokens / gbt)) if data_tokens and gbt else None
            defaults.append("steps")

        # trainable params and models held
        if lora is not None:
            trainable = lora_trainable_params(arch, lora.rank, lora.targets)
        else:
            trainable = n_total
        qlora = lora is not None and lora.quantize_base == "nf4"
        models = [{"role": "policy", "trainable": True,
                   "weights": "nf4 base + lora" if qlora else ("bf16 base + lora" if lora else precision)}]
        needs_ref = st.kind == "dpo" or (st.kind == "grpo" and hyper["kl_coef"] > 0)
        if needs_ref:
            models.append({"role": "reference", "trainable": False,
                           "weights": "shared base (adapters disabled)" if lora else "bf16 frozen copy"})
        if st.kind == "dpo":
            notes.append("DPO keeps 2 models (policy + frozen reference = the init_from model); "
                         "PPO-style RLHF would hold 4 (policy, reference, reward model, critic)")
        if st.kind == "grpo":
            notes.append("GRPO: policy + reference (only when KL > 0), no critic/value model "
                         "(PPO would need 4: policy, reference, reward, critic); the reward is a verifier")

        # memory per GPU
        if st.kind == "pretrain" and searched_memory is not None:
            mem = {**searched_memory, "notes": []}
        else:
            mem = _stage_memory(arch, st, lora, qlora, needs_ref, n_total, n_emb, trainable, seq_len,
                                precision, capacity, world, gpn, run)
        notes += mem.pop("notes")

        plan: dict[str, Any] = {
            "name": st.name, "kind": st.kind, "init_from": st.init_from, "order": order_i,
            "seq_len": seq_len, "steps": steps, "global_batch_tokens": int(gbt) if gbt else None,
            "lr": lr, "hyper": hyper, "defaults": sorted(set(defaults)),
            "models_in_memory": models, "n_models": len(models),
            "params_total": n_total, "trainable_params": trainable,
            "trainable_fraction": trainable / n_total if n_total else 0.0,
            "lora": ({"rank": lora.rank, "alpha": lora.alpha, "scaling": lora.alpha / lora.rank,
                      "dropout": lora.dropout, "targets": list(lora.targets),
                      "quantize_base": lora.quantize_base, "merge_after": True} if lora else None),
            "memory": mem, "rollout": None, "long_context": None, "context": None, "notes": notes,
        }

        # GRPO rollout cost
        if st.kind == "grpo":
            G, P = hyper["group_size"], hyper["prompts_per_step"]
            gen = P * G * gen_tokens
            prefill = P * prompt_tokens  # prompt shared by the group (prefix caching)
            seqs_tokens = G * (prompt_tokens + gen_tokens)
            train_tok = P * G * (prompt_tokens + gen_tokens)
            # 2N FLOPs per generated/prefilled token (forward only); training 6N per token (full) or
            # 4N with a frozen base (no weight grads); reference forward 2N per token
            plan["rollout"] = {
                "prompts_per_step": P, "completions_per_step": P * G, "generated_tokens_per_step": gen,
                "generation_flops_per_step": 2.0 * n_active * (gen + prefill),
                "train_flops_per_step": (4.0 if lora else 6.0) * n_active * train_tok,
                "reference_flops_per_step": 2.0 * n_active * train_tok if needs_ref else 0.0,
                "kv_cache_bytes_per_group": seqs_tokens * kvb,
                "kv_cache_bytes_per_step": P * seqs_tokens * kvb,
                "kv_bytes_per_token": kvb,
            }

        # long-context changes
        out_ctx = dict(inherited, seq_len=seq_len, vocab_size=inherited["vocab_size"])
        if st.kind == "long_context":
            old = inherited["max_context"]
            theta = st.rope_theta or inherited["rope_theta"]
            scaling = st.rope_scaling if st.rope_scaling is not None else None
            factor = (scaling or {}).get("factor") or (seq_len / old if old else None)
            pinned_cp = run.parallelism.cp
            cp_rec = 1
            if seq_len >= 32768:
                cp_rec = min(2 ** math.ceil(math.log2(seq_len / CP_TOKENS_PER_RANK)), max(world, 1))
            cp = pinned_cp or cp_rec
            act_plan = ParallelPlan(dp_shard=max(1, world // cp), cp=cp, activation_checkpointing="full")
            act, src = _activation_bytes(arch, act_plan, seq_len, precision, capacity)
            plan["long_context"] = {
                "old_seq_len": old, "new_seq_len": seq_len, "extension_factor": seq_len / old if old else None,
                "rope_theta_old": inherited["rope_theta"], "rope_theta": theta,
                "rope_scaling": scaling, "yarn_factor": factor if (scaling or {}).get("type") == "yarn" else None,
                "recommended_cp": cp_rec, "cp": cp, "activation_bytes_per_gpu": act,
                "activation_source": src,
                "kv_cache_bytes_per_sequence": seq_len * kvb,
            }
            if seq_len >= 131072:
                notes.append(f"seq_len {seq_len} >= 128k: context parallelism (ring attention) recommended, "
                             f"cp={cp_rec}")
            elif seq_len >= 32768:
                notes.append(f"seq_len {seq_len} >= 32k: consider context parallelism cp={cp_rec}")
            if st.rope_theta is None and st.rope_scaling is None:
                diag("T107", "warning", f"{p}.kind",
                     f"long_context stage {st.name!r} extends to {seq_len} tokens without changing RoPE",
                     "set rope_theta (e.g. 500000 -> 8x larger) or rope_scaling {type: yarn, factor: "
                     f"{max(1, round(seq_len / max(old, 1)))}}}; longer training alone does not extend context")
            else:
                out_ctx.update(max_context=seq_len, rope_theta=theta, rope_scaling=scaling)
        elif seq_len > inherited["max_context"] and not inherited.get("rope_scaling"):
            diag("G004", "warning", f"{p}.seq_len" if st.seq_len else p,
                 f"stage {st.name!r} trains at seq_len {seq_len} beyond its base model's context "
                 f"{inherited['max_context']} without RoPE scaling",
                 "add a long_context stage (rope_theta / yarn) before it")

        # tokenizer / vocabulary compatibility with the base
        tok = _tokenizer_for(run, st)
        if tok.vocab_size is not None and tok.vocab_size != inherited["vocab_size"]:
            diag("G004", "error", f"{p}.data.tokenizer.vocab_size",
                 f"stage {st.name!r} uses vocab_size {tok.vocab_size} but its base model has "
                 f"{inherited['vocab_size']}", "a stage cannot change the vocabulary; resize embeddings in a "
                 "separate step (new rows = mean of related embeddings)")
        if st.data is not None and tok.path and inherited.get("tokenizer") and tok.path != inherited["tokenizer"]:
            diag("G004", "error", f"{p}.data.tokenizer.path",
                 f"stage {st.name!r} uses tokenizer {tok.path!r}, its base model was trained with "
                 f"{inherited['tokenizer']!r}", "fine-tune with the base model's tokenizer")
        out_ctx["tokenizer"] = tok.path or inherited.get("tokenizer")
        if lora is not None and st.init_from and parent is not None:
            pass  # a LoRA parent is merged at the end of its stage, so children see plain weights
        ctx[name] = out_ctx
        # the RoPE / context the stage trains with and hands on (inherited through init_from from the
        # nearest long_context stage): the runtime builds the model from this
        plan["context"] = {"max_context": out_ctx["max_context"], "rope_theta": out_ctx["rope_theta"],
                           "rope_scaling": out_ctx["rope_scaling"]}

        # --- pitfall checks (LR thresholds are for real LLMs: below 100M params they are only info)
        t101 = "warning" if n_total >= 1e8 else "info"
        if st.kind in ("sft",) and lora is None and lr > 1e-4:
            diag("T101", t101, f"{p}.lr", f"SFT lr {lr:g} is high for a full fine-tune",
                 "use 1e-5..5e-5 (fine-tune LR must be below the pre-training LR)")
        if st.kind == "dpo" and lr > (5e-5 if lora else 5e-6):
            diag("T101", t101, f"{p}.lr", f"DPO lr {lr:g} is high", "DPO uses ~5e-7..1e-6 (full weights)")
        if st.kind == "grpo" and lora is None and lr > 1e-5:
            diag("T101", t101, f"{p}.lr", f"GRPO lr {lr:g} is high", "DeepSeekMath GRPO uses 1e-6")
        if st.kind == "midtrain" and lora is None and lr > 1e-4:
            diag("T101", t101, f"{p}.lr", f"continued pre-training lr {lr:g} risks forgetting",
                 "use ~1e-5..3e-5")
        if st.kind in ("midtrain", "sft"):
            frac, domain = _general_fraction(st)
            if domain and frac is not None and frac < 0.1:
                path = f"{p}.general_data_fraction" if st.general_data_fraction is not None else f"{p}.data"
                diag("D101", "warning", path,
                     f"only {frac:.0%} general data in domain stage {st.name!r}: catastrophic forgetting risk",
                     "mix 10-20% general data and monitor general benchmarks")
        if st.kind == "sft" and st.loss_mask == "none":
            diag("T102", "warning", f"{p}.loss_mask", "SFT without a loss mask trains on user/system tokens",
                 "use loss_mask: assistant (labels -100 on non-assistant tokens)")
        if st.kind in CHAT_KINDS:
            tmpl = hyper["chat_template"]
            need = TEMPLATE_TOKENS.get(tmpl)
            have, how = _tokenizer_specials(run, tok, file)
            tpath = (f"{p}.data.tokenizer.chat_template" if st.data is not None and tok.chat_template
                     else "data.tokenizer.chat_template" if tok.chat_template else p)
            if need is None:
                diag("T103", "error", tpath, f"unknown chat template {tmpl!r}", "use llama3 or chatml")
            elif have is not None:
                missing = [t for t in need if t not in have]
                if missing:
                    sev = "warning" if how.startswith("inferred") else "error"
                    diag("T103", sev, tpath,  # type: ignore[arg-type]
                         f"chat template {tmpl!r} needs {', '.join(missing)} which the tokenizer ({how}) lacks",
                         "pick the template that matches the base model's tokenizer (llama3 for Llama-3)")
        if st.kind == "grpo":
            if hyper["group_size"] < 2:
                diag("T104", "error", f"{p}.grpo_group_size",
                     f"GRPO needs G >= 2 completions per prompt (got {hyper['group_size']})",
                     "with one sample the group-normalised advantage is always 0; use 8")
            if hyper["kl_coef"] == 0:
                diag("T105", "warning", f"{p}.grpo_kl_coef", "GRPO without a KL penalty invites reward hacking",
                     "use ~0.04 (DeepSeekMath) and watch the response-length distribution")
        if lora is not None and not (LORA_RANK_RANGE[0] <= lora.rank <= LORA_RANK_RANGE[1]):
            diag("T106", "warning", f"{p}.lora.rank", f"LoRA rank {lora.rank} outside the usual 4-64",
                 "r=16 is a common default")
        if mem["fits"] is False:
            diag("G005", "warning", p,
                 f"stage {st.name!r} needs {mem['per_gpu_bytes'] / 1e9:.1f} GB per GPU, "
                 f"more than {capacity / 1e9:.0f} GB", "use LoRA/QLoRA, more GPUs or activation checkpointing")
        if st.kind in ("dpo", "grpo") and st.init_from is None and len(stages) > 1:
            diag("G004", "info", p, f"{st.kind} stage {st.name!r} starts from the base model, not an SFT stage",
                 "preference/RL stages usually start from (and use as reference) the SFT model")
        plans.append(plan)

    return plans, diags


def _stage_memory(arch, st, lora, qlora, needs_ref, n_total, n_emb, trainable, seq_len, precision,
                  capacity, world, gpn, run) -> dict:
    """Per-GPU bytes for one stage: weights, reference, grads+optimizer (trainable only), activations."""
    notes: list[str] = []
    if qlora:
        lin = n_total - n_emb
        # QLoRA quantises the linear layers; embeddings/output/norms stay bf16
        weights = int(lin * NF4_BITS_PER_PARAM / 8 + n_emb * 2)
        notes.append(f"QLoRA: linear weights in NF4 ({NF4_BITS_PER_PARAM:.3f} bit/param with double "
                     f"quantisation, block {NF4_BLOCK}), embeddings bf16")
    else:
        weights = n_total * (4 if precision == "fp32" else 2)
    ref = 0 if (lora or not needs_ref) else n_total * 2
    if needs_ref and lora:
        notes.append("reference = base with adapters disabled: no extra weight copy")
    optim = trainable * BYTES_PER_TRAINABLE_PARAM if lora is None else trainable * 16
    if lora is None:
        optim -= trainable * 2  # the bf16 weight is already counted in `weights`
    # layout: replicate when everything fits one GPU, else shard weights/grads/optimizer over all GPUs
    static = weights + ref + optim
    cap = capacity or 80 * 10**9
    shard = 1 if static < 0.6 * cap else world
    tp = 1
    cp = run.parallelism.cp or 1
    if st.kind == "long_context" and seq_len >= 32768 and not run.parallelism.cp:
        cp = min(2 ** math.ceil(math.log2(seq_len / CP_TOKENS_PER_RANK)), max(world, 1))
    if shard > 1:
        notes.append(f"weights/optimizer sharded over {shard} GPUs (FSDP / ZeRO-3)")
    # LoRA/QLoRA recipes always use gradient checkpointing (QLoRA paper); long sequences and sharded runs too
    ac = "full" if lora is not None or seq_len >= 8192 or shard > 1 else "selective"
    plan = ParallelPlan(dp_shard=max(1, world // cp) if shard > 1 else 1, dp_replicate=1 if shard > 1 else
                        max(1, world // cp), cp=cp, tp=tp, activation_checkpointing=ac)
    act, src = _activation_bytes(arch, plan, seq_len, precision, capacity)
    rollout_kv = 0
    if st.kind == "grpo":
        # KV cache of one group of G sequences (prompt + generation) while sampling on the same GPUs
        G = st.grpo_group_size or 8
        rollout_kv = G * seq_len * _kv_bytes_per_token(arch)
        notes.append(f"GRPO: rollout KV cache for one group of {G} sequences x {seq_len} tokens counted")
    per_gpu = (weights + ref + optim) // shard + act + rollout_kv
    return {
        "weights_bytes": weights, "reference_bytes": ref, "grads_optimizer_bytes": optim,
        "activation_bytes": act, "activation_source": src, "rollout_kv_bytes": rollout_kv, "shard_degree": shard, "cp": cp,
        "activation_checkpointing": ac, "per_gpu_bytes": int(per_gpu), "capacity_bytes": capacity,
        "fits": (per_gpu <= cap) if capacity else None, "notes": notes,
    }
