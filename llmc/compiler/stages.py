"""Post-training / continued-training stages: the stage graph and a plan per stage.

Pure functions (no torch, no file reads). ``plan_stages`` checks the graph that ``init_from`` edges
form (cycles, unknown names, incompatible bases), orders the stages topologically and returns one
:class:`~llmc.compiler.result.StagePlan` per stage: its resolved training numbers
(:func:`resolve_stage_training`; the ``pretrain`` stage's are ``Compiled.hyper``'s), the models it
keeps in memory, its trainable parameters (full or LoRA), its per-GPU memory, the GRPO rollout cost
and the long-context changes, plus diagnostics for known pitfalls.

Sources:
  * LoRA: r * (d_in + d_out) trainable parameters per adapted matrix (Hu et al. 2021, arXiv:2106.09685 §4)
  * QLoRA: NF4 4 bits + double-quantised absmax (Dettmers et al. 2023, arXiv:2305.14314 §3)
  * DPO keeps policy + frozen reference (Rafailov et al. 2023, arXiv:2305.18290 §4); PPO-style RLHF
    holds four models (Ouyang et al. 2022, arXiv:2203.02155 §3.5)
  * GRPO: G = 8 completions per prompt (TRL ``num_generations`` default,
    https://huggingface.co/docs/trl/grpo_trainer), KL beta 0.04, batch 1024 (DeepSeekMath, Shao et al.
    2024, arXiv:2402.03300 §4.2); no value model
  * SFT loss on assistant tokens only (Llama 2, Touvron et al. 2023, arXiv:2307.09288 §3.1)
  * mixing 10-20 % general data against forgetting in continued pre-training (Ibrahim et al. 2024,
    "Simple and Scalable Strategies to Continually Pre-train LLMs", arXiv:2403.08763 §5)
"""

from __future__ import annotations

import difflib
import graphlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import PurePath
from typing import Any

from llmc import TARGET_VERSIONS
from llmc.compiler import checkpoint_cost, flops, memory, params, timing
from llmc.compiler import defaults as defaults_mod
from llmc.compiler.backends import deepspeed_zero_stage
from llmc.compiler.checks import HOST_MEMORY_WARN, Sink, mixture_shares
from llmc.compiler.hardware import GPU
from llmc.compiler.plan import ParallelPlan
from llmc.compiler.result import (
    ContextPlan,
    Hyper,
    LongContextPlan,
    LoraPlan,
    MemoryNumbers,
    ModelInMemory,
    PipelineTime,
    RolloutPlan,
    StageCheckpoints,
    StageExamples,
    StageLayout,
    StageMemoryPlan,
    StagePlan,
    StageTimePlan,
    StageTraining,
)
from llmc.compiler.search import USABLE_FRACTION, describe, divisors, usable_bytes
from llmc.compiler.units import GiB, gib
from llmc.diagnostics import Diagnostic
from llmc.hf_export import hf_export_supported
from llmc.rope import rope_factor_for, rope_inv_freq, rope_reach
from llmc.spec.chat import CHAT_TEMPLATES, OWN_TEMPLATE
from llmc.spec.facts import CheckpointFacts, ExternalFacts, hub_id
from llmc.spec.families import FAMILIES, family_by_name, family_of
from llmc.spec.hf import (
    CAUSAL_LM_CLASS,
    architecture_from_hf_config,
    architectures_problem,
    checkpoint_differences,
    mtp_layers,
    mtp_prefixes,
)
from llmc.spec.model import RopeScaling
from llmc.spec.presets import PRESETS
from llmc.spec.schema import (
    BF16_PRECISIONS,
    CHAT_KINDS,
    CONTINUED_KINDS,
    LM_KINDS,
    LORA_HF_NAMES,
    META_INIT_PARAMS,
    NF4_BLOCK,
    NF4_DQ_BLOCK,
    PREFERENCE_KINDS,
    PretrainStage,
    RunSpec,
    StageBase,
)

# ----------------------------------------------------------------------------- constants (data)

#: special tokens each chat template needs from the tokenizer (llmc.spec.chat, with the templates' sources)
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {name: t.specials for name, t in CHAT_TEMPLATES.items()}
#: special tokens of the tokenizer llmc trains locally (llmc.runtime.tokenizer)
LLMC_TOKENIZER_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)
#: NF4: 4-bit codes + blockwise absmax (block 64). Double quantisation stores the absmax in 8 bits
#: with one fp32 constant per 256 blocks: 8/64 + 32/(64*256) = 0.127 bit/param (QLoRA paper §3).
NF4_BITS_PER_PARAM = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
BYTES_PER_TRAINABLE_PARAM = 16  # bf16 weight + bf16 grad + fp32 master + Adam m, v (ZeRO paper §3.1: 2+2+12)
DEFAULT_MAX_NEW_TOKENS = 256
# T107: a rotary frequency counts as changed by a stage's rope_scaling when it moves by more than this share of the
# base model's (llmc heuristic: bf16 RoPE tables round at ~0.4%)
ROPE_CHANGE_TOL = 0.01
DEFAULT_PROMPT_TOKENS = 512
DEFAULT_DPO_BETA = 0.1  # Rafailov et al. 2023 §6 / TRL DPOConfig default
DEFAULT_GRPO_GROUP = 8
DEFAULT_GRPO_KL = 0.04
DEFAULT_GRPO_ITERATIONS = 1  # policy updates per sampled batch (mu): DeepSeekMath-RL sec. 4.2, TRL num_iterations
GRPO_COMPLETIONS_PER_STEP = 1024  # DeepSeekMath GRPO batch size
CHAT_BATCH_SEQS = 64  # SFT / DPO sequences per optimizer step when unset
CP_TOKENS_PER_RANK = 16384  # target tokens per rank when recommending context parallelism
LORA_RANK_RANGE = (4, 64)  # ranks studied in Hu et al. 2021 Table 6 / QLoRA
DEFAULT_CAPACITY = 80 * 10**9  # memory estimate without a GPU: an 80 GB part
#: GRPO samples as many groups at once as keep the stage within this share of a GPU (the rest: allocator headroom)
SAMPLING_MEMORY_SHARE = 0.9
ACTIVATION_SOURCE = "llmc.compiler.memory.memory_per_gpu"


# ----------------------------------------------------------------------------- LoRA shapes


def linear_shapes(arch: Any) -> list[tuple[str, int, int, int, bool]]:
    """(LoRA target name, d_in, d_out, count over layers, stacked) of every matrix of llmc's runtime model
    (llmc.runtime.model) that ``llmc.runtime.lora.apply_lora`` can adapt: the ``nn.Linear`` children named like a
    target (stacked False) and the routed experts' stacked ``w1``/``w2``/``w3`` (stacked True, one adapter per expert,
    so ``count`` is layers x experts). The same list says what QLoRA quantises: the nn.Linear ones only.

    GQA attention (every layer): wq d->H*hd, wk/wv d->KV*hd, wo H*hd->d.
    MLA attention (DeepSeek-V2/V3, ``MLAttention``): wo H*v_head_dim->d in every layer, and wq d->H*(nope+rope) when
    the query is full rank (``q_lora_rank`` None: DeepSeek-V2-Lite); the low-rank wq_a, wq_b, wkv_a, wkv_b have no
    target name, so they are left as they are.
    Dense SwiGLU (a dense model, or an MoE model's first ``dense_layers``): w1/w3 d->d_ff, w2 d_ff->d.
    MoE layers: each routed expert's w1/w3 d->h, w2 h->d (h = expert_d_ff), and the S shared experts as the runtime
    builds them, one SwiGLU S*h wide (DeepSeek-V3 / torchtitan: ``MoE.shared_experts``): one adapter of
    r*(d + S*h) per matrix, not S of r*(d + h). The router (``gate``) and the output head are never adapted.
    """
    d, hd, h, kv = arch.d_model, arch.hd, arch.n_heads, arch.kv_heads
    L = arch.n_layers
    out: list[tuple[str, int, int, int, bool]] = []
    mla = arch.mla
    if mla is None:
        out += [("wq", d, h * hd, L, False), ("wk", d, kv * hd, L, False), ("wv", d, kv * hd, L, False),
                ("wo", h * hd, d, L, False)]
    else:
        if mla.q_lora_rank is None:
            out.append(("wq", d, h * (mla.qk_nope_head_dim + mla.qk_rope_head_dim), L, False))
        out.append(("wo", h * mla.v_head_dim, d, L, False))
    m = arch.moe
    dense = L if m is None else min(m.dense_layers, L)
    if dense:
        out += [("w1", d, arch.d_ff, dense, False), ("w3", d, arch.d_ff, dense, False),
                ("w2", arch.d_ff, d, dense, False)]
    if m is not None and L > dense:
        moe_layers, eff = L - dense, params.expert_d_ff(arch)
        n = moe_layers * m.num_experts
        out += [("w1", d, eff, n, True), ("w3", d, eff, n, True), ("w2", eff, d, n, True)]
        if m.num_shared_experts:
            sh = eff * m.num_shared_experts
            out += [("w1", d, sh, moe_layers, False), ("w3", d, sh, moe_layers, False),
                    ("w2", sh, d, moe_layers, False)]
    return out


def lora_trainable_params(arch: Any, rank: int, targets: list[str] | tuple[str, ...]) -> int:
    """LoRA trainable params: sum over adapted matrices of r*(d_in+d_out) (A is r x d_in, B is d_out x r)."""
    return sum(rank * (di + do) * n for name, di, do, n, _ in linear_shapes(arch) if name in targets)


#: llmc's name -> the Hugging Face module name of the linears of DeepSeek-V2/V3's MLA attention (DeepseekV3Attention;
#: llmc.runtime.hf_io's table); only wq (a full-rank query) and wo take a LoRA adapter in llmc's trainer
MLA_HF_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
                "wkv_b": "kv_b_proj", "wo": "o_proj"}
_HF_NAME = {ours: hf for hf, ours in LORA_HF_NAMES.items()}


def model_linears(arch: Any) -> tuple[list[str], list[str]]:
    """(the LoRA targets that name linears of the model, the linears of its attention no target name reaches), each
    as ``llmc (HF)``: a GQA model's wq, wk, wv, wo, w1, w2, w3; an MLA model's wo (and wq with a full-rank query)
    and the feed-forward's, with wq_a, wq_b, wkv_a, wkv_b left out (:func:`linear_shapes`)."""
    mla = arch.mla is not None
    names = list(dict.fromkeys(n for n, *_ in linear_shapes(arch)))
    shown = [f"{n} ({(MLA_HF_NAMES if mla and n in ('wq', 'wo') else _HF_NAME)[n]})" for n in names]
    left = [] if not mla else [f"{n} ({MLA_HF_NAMES[n]})" for n in
                               (("wq_a", "wq_b") if arch.mla.q_lora_rank is not None else ()) + ("wkv_a", "wkv_b")]
    return shown, left


def peft_layout_gap(arch: Any, targets: list[str] | tuple[str, ...]) -> str | None:
    """Why a LoRA stage's adapter has no PEFT layout that llmc's export writes for this model (the merged model is
    exported all the same), as ``llmc.runtime.hf_io.peft_state_dict`` refuses it: Phi-3's fused q/k/v and gate/up
    projections; adapters on stacked MoE experts; on an MLA model any adapter outside the attention (PEFT maps a
    DeepSeek-V3's gate/up/down_proj targets onto its fused routed experts). None: the adapter is written."""
    adapted = {(n, stacked) for n, _, _, c, stacked in linear_shapes(arch) if n in targets and c}
    if not adapted:
        return None
    if family_of(arch).name == "phi3":
        return "Phi-3's q/k/v and gate/up projections are fused (qkv_proj, gate_up_proj), which PEFT adapts whole"
    if any(stacked for _, stacked in adapted):
        return "adapters on stacked MoE experts have no PEFT names (transformers fuses the experts)"
    if arch.mla is not None and any(n in ("w1", "w2", "w3") for n, _ in adapted):
        return ("PEFT maps a DeepSeek-V3's gate/up/down_proj targets onto its fused routed experts, not the dense and "
                "shared feed-forwards llmc adapts")
    return None


# ----------------------------------------------------------------------------- init_hf checkpoints


def check_start(run: RunSpec, where: str, src: str, ck: CheckpointFacts, sink: Sink) -> None:
    """G021: an ``init_hf`` (``src`` at ``where``) that the launch would refuse when the stage loads it, from what
    the plan read of it (:func:`llmc.spec.facts.read_checkpoint`); the launch checks it again (files change)."""
    if ck.problem is not None:
        if ck.near or "no folder" in ck.problem:
            near = f"did you mean {' or '.join(str(PurePath(src).parent / n) for n in ck.near)}? " if ck.near else ""
            how = ("huggingface_hub would read it as a Hub id (namespace/name), but its namespace is a folder here "
                   "and the Hub id is not in this machine's Hugging Face cache" if hub_id(src) else
                   "it cannot be a Hub id either (huggingface_hub's repo_id is namespace/name: letters, digits, -, "
                   "_, .; no ./, ../, leading /, or second /)")
            sink.add("G021", "error", where, f"init_hf {ck.problem} (relative paths are read from the spec's "
                     f"folder); {how}", f"{near}give the folder with the checkpoint's config.json and *.safetensors, "
                     "or a Hub id as namespace/name that is in the Hugging Face cache (`hf download "
                     "namespace/name`)")
        else:
            sink.add("G021", "error", where, f"init_hf {ck.problem}: the stage would stop when it loads it",
                     "give a folder transformers' save_pretrained wrote (config.json and *.safetensors)")
        return
    if ck.missing:
        sink.add("G021", "error", where, f"init_hf {src}: {len(ck.missing)} weight file(s) its "
                 f"model.safetensors.index.json names are missing ({', '.join(ck.missing[:3])}"
                 f"{', ...' if len(ck.missing) > 3 else ''}): a partial download or copy",
                 "copy or download the missing shards (`hf download` resumes a partial one)")
    if ck.config is None:
        return
    wrong_class = architectures_problem(ck.config)
    if wrong_class is not None:  # (llmc.runtime.hf_io refuses it when the stage loads it)
        sink.add("G021", "error", where, f"init_hf {src}: {wrong_class}", wrong_class.hint)
        return
    try:
        theirs = architecture_from_hf_config(ck.config)
    except Exception:  # noqa: BLE001 (a config.json llmc cannot read: the model_type checks report it)
        return
    bad = checkpoint_differences(run.model, theirs)
    if bad:
        shapes = checkpoint_differences(run.model, theirs, shapes_only=True)
        listed = f"{'; '.join(bad[:4])}{f' (and {len(bad) - 4} more)' if len(bad) > 4 else ''}"
        why = ("its weights would not load into the spec's model" if shapes else
               "its weights have the spec's model's shapes, but that model computes another function with them: "
               "started from it, the stage would train a different model from the checkpoint's, so the launch "
               "refuses it")
        sink.add("G021", "error", where, f"init_hf {src} is not the spec's model: {listed}: {why}",
                 f"describe the model by the checkpoint: `model: {{hf_config: {src}/config.json}}`, or start from "
                 "a checkpoint of the spec's model")
    n_mtp = mtp_layers(ck.config)
    if n_mtp:
        mtp = ck.mtp_tensors or ()
        size = sum(math.prod(shape) for _, shape in mtp)
        held = (f"holds the weights of its {n_mtp} multi-token-prediction (MTP) layer{'s' if n_mtp > 1 else ''} "
                f"({len(mtp)} tensors, {size:,} parameters: {mtp_prefixes(ck.config)[0]}*)" if mtp else
                f"says it has {n_mtp} multi-token-prediction (MTP) layer{'s' if n_mtp > 1 else ''} "
                "(num_nextn_predict_layers)")
        cls = CAUSAL_LM_CLASS.get(ck.config.get("model_type"), "transformers' class")
        sink.add("G025", "warning", where, f"init_hf {src} {held}, which no stage loads: the stage trains and "
                 f"exports the main model only, as transformers' {cls} loads it, so the export has no MTP module "
                 "(num_nextn_predict_layers 0)",
                 "its decoding is unchanged; speculative decoding with the MTP head, vLLM's deepseek_mtp or SGLang's "
                 "NEXTN, needs MTP weights that match the trained model: serve the export without it, or with a "
                 "separate draft model")


def check_tokenizer_sizes(run: RunSpec, facts: ExternalFacts | None, sink: Sink) -> None:
    """G022: a tokenizer with more tokens than the model's vocab_size (its ids past the embedding would index
    nothing: llmc's trainers refuse it when a stage starts, ``llmc.runtime.train.make_loader``)."""
    if facts is None:
        return
    seen = set()
    for i, st in enumerate(resolved_stages(run)):
        tok = tokenizer_for(run, st)
        own = st.data is not None and (st.data.tokenizer.path or st.data.tokenizer.train)
        known = facts.tokenizers.get(tok.path) if tok.path else None
        if known is None or known.size is None or tok.path in seen:
            continue
        seen.add(tok.path)
        if known.size > run.model.vocab_size:
            sink.add("G022", "error", f"stages.{i}.data.tokenizer.path" if own and run.stages else
                     "data.tokenizer.path", f"tokenizer {tok.path} has {known.size:,} tokens but the model's vocab_size "
                     f"is {run.model.vocab_size:,}: token ids past it have no embedding row",
                     "use the model's own tokenizer, or a model (hf_config) whose vocab_size covers this tokenizer "
                     "(its embedding resized: transformers' resize_token_embeddings, then save_pretrained)")


# ----------------------------------------------------------------------------- graph


def resolved_stages(run: RunSpec) -> list[StageBase]:
    """The spec's stages, or one implicit ``pretrain`` stage when it has none."""
    return list(run.stages) if run.stages else [PretrainStage(name="pretrain", kind="pretrain",
                                                              init_hf=run.training.init_hf)]


def stage_order(stages: list[StageBase], sink: Sink) -> tuple[dict[str, int], list[str]]:
    """(name -> YAML index, execution order): G001 duplicate names, G003 unknown / G002 self or cyclic
    ``init_from``. Topological order with ties broken by YAML position; YAML order when cyclic."""
    from llmc.fileio import is_set_aside

    idx: dict[str, int] = {}
    for i, st in enumerate(stages):
        if st.name in idx:
            sink.add("G001", "error", f"stages.{i}.name", f"duplicate stage name {st.name!r}",
                     f"first defined as stages.{idx[st.name]}")
        else:
            idx[st.name] = i
        if is_set_aside(st.name):  # (llmc.fileio.set_aside's names: run/<stage>.set-aside-N)
            sink.add("G019", "error", f"stages.{i}.name",
                     f"stage name {st.name!r} is the name `llmc launch --no-resume` gives a past run it sets aside "
                     "(<stage>.set-aside-N in run/), which the launch and `llmc report` pass over",
                     "rename the stage (any name not ending in .set-aside-<number>)")
    parent: dict[str, str] = {}
    for i, st in enumerate(stages):
        if st.init_from is None or idx.get(st.name) != i:
            continue
        if st.init_from not in idx:
            close = difflib.get_close_matches(st.init_from, list(idx), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"stages are: {', '.join(idx)}"
            sink.add("G003", "error", f"stages.{i}.init_from", f"unknown stage {st.init_from!r}", hint)
        elif st.init_from == st.name:
            sink.add("G002", "error", f"stages.{i}.init_from", f"stage {st.name!r} initialises from itself",
                     "init_from must name an earlier stage")
        else:
            parent[st.name] = st.init_from
    cycles = _cycles(parent)
    for cyc in cycles:
        loop = " -> ".join([*cyc, cyc[0]])
        sink.add("G002", "error", f"stages.{idx[cyc[0]]}.init_from", f"stage graph has a cycle: {loop}",
                 "init_from edges must form a DAG")
    if cycles:
        return idx, list(idx)
    ts = graphlib.TopologicalSorter({n: [parent[n]] if n in parent else [] for n in idx})
    ts.prepare()
    order: list[str] = []
    ready: list[str] = []
    while ts.is_active():
        ready = sorted([*ready, *ts.get_ready()], key=idx.__getitem__)
        first = ready.pop(0)  # one at a time, lowest YAML index first (a stable lexicographic order)
        order.append(first)
        ts.done(first)
    return idx, order


def _cycles(parent: dict[str, str]) -> list[list[str]]:
    """Cycles of a graph where every node has at most one parent, each listed once, in edge direction."""
    seen: set[str] = set()
    out: list[list[str]] = []
    for start in parent:
        path: list[str] = []
        n: str | None = start
        while n is not None and n not in seen and n not in path:
            path.append(n)
            n = parent.get(n)
        if n is not None and n in path:
            out.append(list(reversed(path[path.index(n):])))
        seen.update(path)
    return out


# ----------------------------------------------------------------------------- training numbers


#: post-training (SFT / DPO / GRPO) decays no weights: transformers' / TRL's default (TrainingArguments.weight_decay)
POSTTRAIN_WEIGHT_DECAY = 0.0


def default_chat_template(specials: set[str] | None, own: bool = False) -> tuple[str, str]:
    """The chat template of a stage whose spec names none, and why: the first whose special tokens the tokenizer has
    (llama3, then phi4 before chatml, whose tokens phi4's include, then phi3, gemma), else the tokenizer's own when
    it has one (``own``: gpt-oss's harmony, Mistral's, DeepSeek's formats), else llama3 (llmc's own tokenizer's
    format)."""
    for name in ("llama3", "phi4", "chatml", "phi3", "gemma") if specials else ():
        if set(TEMPLATE_TOKENS[name]) <= specials:
            return name, "the first whose special tokens the tokenizer has" + (", before its own template" if own
                                                                                else "")
    if own:
        return OWN_TEMPLATE, f"the tokenizer's special tokens fit none of {', '.join(TEMPLATE_TOKENS)}"
    return "llama3", ("llmc's default: the tokenizer's special tokens fit no template" if specials else
                      "llmc's default: the tokenizer's special tokens are not known here")


def kind_hyper(run: RunSpec, st: StageBase, specials: set[str] | None = None, own_template: bool = False
               ) -> tuple[dict[str, Any], list[str]]:
    """Kind-specific settings with their defaults filled, and the names llmc chose; ``specials``: the stage
    tokenizer's special tokens where known (:func:`tokenizer_specials`), which pick the default chat template
    (``own_template``: the tokenizer carries a template of its own, :func:`tokenizer_has_template`)."""
    h: dict[str, Any] = {}
    chosen: list[str] = []

    def pick(key: str, spec_name: str, value: Any, default: Any) -> Any:
        if value is None:
            chosen.append(spec_name)
            value = default
        h[key] = value
        return value

    if st.kind == "dpo":
        pick("beta", "dpo_beta", st.dpo_beta, DEFAULT_DPO_BETA)
    if st.kind == "grpo":
        G = pick("group_size", "grpo_group_size", st.grpo_group_size, DEFAULT_GRPO_GROUP)
        pick("kl_coef", "grpo_kl_coef", st.grpo_kl_coef, DEFAULT_GRPO_KL)
        h["clip"] = st.grpo_clip
        pick("iterations", "grpo_iterations", st.grpo_iterations, DEFAULT_GRPO_ITERATIONS)
        pick("max_new_tokens", "max_new_tokens", st.max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        pick("max_prompt_tokens", "max_prompt_tokens", st.max_prompt_tokens, DEFAULT_PROMPT_TOKENS)
        pick("prompts_per_step", "prompts_per_step", st.prompts_per_step,
             max(1, GRPO_COMPLETIONS_PER_STEP // max(G, 1)))
        pick("reward", "reward", st.reward, "arithmetic")
    if st.kind == "sft":
        pick("loss_mask", "loss_mask", st.loss_mask, "assistant")
    if st.kind in CHAT_KINDS:
        pick("chat_template", "chat_template", tokenizer_for(run, st).chat_template,
             default_chat_template(specials, own_template)[0])
        # AdamW as the runtime builds it: the spec's betas and eps; no weight decay (TRL's default, weight_decay 0.0 in
        # transformers' TrainingArguments, https://huggingface.co/docs/transformers/main_classes/trainer)
        o = run.training.optimizer
        h["optimizer"] = {"betas": list(o.betas), "eps": o.eps, "weight_decay": POSTTRAIN_WEIGHT_DECAY}
    return h, chosen


def resolve_stage_training(run: RunSpec, st: StageBase, hyper: Hyper, plan: ParallelPlan | None,
                           inherited_seq_len: int, specials: set[str] | None = None, own_template: bool = False
                           ) -> StageTraining:
    """Every training number of one stage, in one place.

    ``pretrain``: ``hyper`` (the run's resolved hyperparameters) and the searched ``plan``'s batch split.
    Other kinds: the stage's own settings, else defaults: LR by kind and size (:func:`defaults.default_lr`),
    batch 64 sequences (sft/dpo), prompts x G completions (grpo) or the run's batch (continued training),
    steps = tokens / batch, the run's LR schedule (:func:`defaults.stage_schedule`).
    """
    kh, chosen = kind_hyper(run, st, specials, own_template)
    if st.kind == "pretrain":
        return _pretrain_training(run, hyper, plan, kh)
    # GRPO: a prompt of up to max_prompt_tokens and its completion, whatever seq_len says (llmc.runtime.grpo reads no
    # seq_len; G015 says so)
    seq_len = (kh["max_prompt_tokens"] + kh["max_new_tokens"] if st.kind == "grpo" else None) or st.seq_len \
        or (st.data.seq_len if st.data else None) or inherited_seq_len
    lr = st.lr
    if lr is None:
        lr = float(f"{defaults_mod.default_lr(params.params_total(run.model), st.kind, st.lora is not None):.3g}")
        chosen.append("lr")
    gbt = st.global_batch_tokens
    if gbt is None:
        if st.kind == "grpo":
            gbt = kh["prompts_per_step"] * kh["group_size"] * seq_len
        elif st.kind in CHAT_KINDS:
            gbt = CHAT_BATCH_SEQS * seq_len
        else:
            gbt = hyper.global_batch_tokens
        if st.kind in CHAT_KINDS or "global_batch_tokens" in hyper.defaults:
            chosen.append("global_batch_tokens")
    gbt = int(gbt)
    seqs = max(1, round(gbt / seq_len))
    steps, tokens = st.steps, None
    if steps is not None:
        tokens = float(steps * gbt)
    else:
        data_tokens = st.data.tokens if st.data else (run.data.tokens if st.kind == "midtrain" else None)
        if data_tokens:
            steps, tokens = defaults_mod.default_steps(data_tokens, gbt), float(data_tokens)
        chosen.append("steps")
    micro, accum = _batch_split(seqs, st.kind, plan, run.hardware.count, seq_len, hyper.seq_len,
                                kh["group_size"] if st.kind == "grpo" else None)
    sched = defaults_mod.stage_schedule(st.kind, lr, steps, hyper, run.training.schedule)
    return StageTraining(
        seq_len=seq_len, global_batch_tokens=gbt, global_batch_seqs=seqs, steps=steps, tokens=tokens, lr=lr,
        min_lr=sched.min_lr, warmup_steps=sched.warmup_steps, schedule=sched.schedule,
        decay_fraction=sched.decay_fraction, decay_steps=sched.decay_steps, last_lr=sched.last_lr,
        micro_batch=micro, grad_accum=accum, checkpoint_interval=min(hyper.checkpoint_interval, steps) if steps else hyper.checkpoint_interval,
        hyper=kh, defaults=sorted(set(chosen)),
    )


def _pretrain_training(run: RunSpec, hyper: Hyper, plan: ParallelPlan | None, kh: dict) -> StageTraining:
    data, _ = defaults_mod.pretrain_inputs(run)
    # steps derived from the data: the data's tokens; pinned steps: what those steps consume
    tokens = float(data.tokens) if "steps" in hyper.defaults else float(hyper.steps * hyper.global_batch_tokens)
    sched = defaults_mod.stage_schedule("pretrain", hyper.lr, hyper.steps, hyper, run.training.schedule)
    # without a searched plan the runtime runs the whole batch as one micro-step on one process
    micro, accum = (plan.micro_batch, plan.grad_accum) if plan else (hyper.global_batch_seqs, 1)
    return StageTraining(
        seq_len=hyper.seq_len, global_batch_tokens=hyper.global_batch_tokens,
        global_batch_seqs=hyper.global_batch_seqs, steps=hyper.steps, tokens=tokens, lr=hyper.lr,
        min_lr=hyper.min_lr, warmup_steps=hyper.warmup_steps, schedule=hyper.schedule,
        decay_fraction=sched.decay_fraction, decay_steps=hyper.decay_steps, last_lr=hyper.last_lr,
        micro_batch=micro, grad_accum=accum,
        checkpoint_interval=hyper.checkpoint_interval, hyper=kh, defaults=sorted(hyper.defaults),
    )


#: Largest stage micro-batch llmc picks, in sequences (bounds the divisor search; far above what fits a GPU).
MAX_STAGE_MICRO = 1024


def _batch_split(seqs: int, kind: str, plan: ParallelPlan | None, world: int, seq_len: int,
                 plan_seq_len: int, group: int | None = None) -> tuple[int, int]:
    """(micro_batch, grad_accum) a non-pretrain stage runs with, per data-parallel rank.

    Data parallel over every GPU: llmc's runtimes run a stage other than pre-training on its own layout, without
    TP, PP or CP (:func:`stage_layout`: the native trainer as FSDP2 or DDP over all ranks, ``TrainJob.from_lock``;
    DeepSpeed as ZeRO over all ranks; chat post-training sharded over all ranks,
    ``llmc.runtime.posttrain.post_layout``, uneven shares topped up with weight-0 examples). The micro-batch holds
    at most the tokens of the searched plan's micro-step, in sequences, or pairs for DPO (a chosen and a rejected
    sequence per pair); one without a searched plan. GRPO (``group`` = G completions per prompt): a divisor of G, the
    prompts split over the ranks. Continued training keeps micro x accum x dp = the batch."""
    dp = world
    item = seq_len * (2 if kind == "dpo" else 1)
    most = max(1, plan.micro_batch * plan_seq_len // item) if plan else 1
    if kind in LM_KINDS:
        if seqs < dp or seqs % dp:
            return 1, max(1, math.ceil(seqs / dp))
        per_rank = seqs // dp
        micro = next(d for d in range(min(most, per_rank, MAX_STAGE_MICRO), 0, -1) if per_rank % d == 0)
        return micro, per_rank // micro
    if group:  # GRPO: each group's completions are scored together; its update runs in equal parts of a group
        micro = max(d for d in divisors(group) if d <= most)  # group <= MAX_GRPO_GROUP (spec)
        share = math.ceil(seqs / group / dp) * group
        return micro, share // micro
    share = math.ceil(seqs / dp)
    micro = min(most, share)
    return micro, math.ceil(share / micro)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_for(run: RunSpec, stage: StageBase) -> Any:
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


def tokenizer_has_template(tok: Any, facts: ExternalFacts | None) -> bool | None:
    """Whether the tokenizer carries a chat template of its own: read from its folder (``facts``); llmc's trained
    tokenizer has none; None where unknown (a path not read here)."""
    if tok.train and not tok.path:
        return False
    known = facts.tokenizers.get(tok.path) if facts is not None and tok.path else None
    return known.chat_template if known is not None else None


def tokenizer_specials(run: RunSpec, tok: Any, facts: ExternalFacts | None) -> tuple[set[str] | None, str]:
    """The tokenizer's special tokens when known, and how we know: llmc's own tokenizer, the file
    (``facts``), or a guess from the model's family (:func:`llmc.spec.families.family_by_name`; a
    128256-token vocabulary is Llama 3's)."""
    if tok.train and not tok.path:
        return set(LLMC_TOKENIZER_SPECIALS), "llmc-trained tokenizer"
    known = facts.tokenizers.get(tok.path) if facts is not None and tok.path else None
    if known is not None and known.specials is not None:
        return set(known.specials), known.source
    fam = family_by_name(run.model.name)
    if fam is None and run.model.vocab_size in (128256, 128000):  # the Llama 3 tokenizer's vocabulary
        fam = FAMILIES["llama"]
    if fam is not None and fam.tokenizer_specials:
        return set(fam.tokenizer_specials), f"inferred from model {run.model.name!r}"
    return None, "unknown"


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class _Env:
    """What every stage plan of one run shares."""

    run: RunSpec
    hyper: Hyper
    plan: ParallelPlan | None
    searched_memory: MemoryNumbers | None
    facts: ExternalFacts | None
    capacity: int | None
    n_total: int
    n_active: int
    n_emb: int
    kv_bytes: int
    n_stages: int
    gpu: GPU | None = None  # the cluster's GPU (stage time and cost)
    backend: str | None = None  # the run's training backend (LM stages run on DeepSpeed when it is deepspeed)
    # (seq_len, global batch seqs) -> StageLayout | None: a continued-training stage's own layout search (torchtitan
    # runs: the stage runs as its own torchtitan job; compile._stage_search); None: llmc's trainers run every stage
    stage_search: Callable[[int, int], StageLayout | None] | None = None
    # compile's fit check (``--no-fit-check`` turns it off): a stage that does not fit the GPU is then a G005 warning
    # with its numbers, as pre-training's plan is then reported with its predicted memory instead of P004
    fit_check: bool = True

    @property
    def world(self) -> int:
        return self.run.hardware.count

    @property
    def precision(self) -> str:
        return self.run.training.precision


def _acts_buffers(env: _Env, plan: ParallelPlan, seq_len: int) -> tuple[int, int, int]:
    """(activations, buffers, the buffers' logits) per GPU of one micro-step of ``plan`` on llmc's runtime (its
    "selective" recomputes the attention core, backends.py). Buffers: the fp32 logits and their gradient (the
    runtime's losses upcast the logits of the micro-step, or of one slice with ``plan.loss_chunk_tokens``:
    llmc.runtime.model.token_losses; an eager loss, no chunking: the native profile's), the FSDP units gathered, CUDA
    context and NCCL."""
    arch = env.run.model
    mem = memory.memory_per_gpu(arch, plan, seq_len, env.precision, env.capacity or DEFAULT_CAPACITY,
                                backend="native")
    logits = memory.loss_logits_bytes(arch.vocab_size, plan.micro_batch * seq_len / plan.cp, plan,
                                      softcapped=arch.final_logit_softcap is not None)
    return int(mem.breakdown["activations"]), int(mem.breakdown["buffers"]), int(logits)


def recommended_cp(seq_len: int, world: int) -> int:
    """Context-parallel degree for ``seq_len``: about 16K tokens per rank from 32K tokens up."""
    if seq_len < 32768:
        return 1
    return min(2 ** math.ceil(math.log2(seq_len / CP_TOKENS_PER_RANK)), max(world, 1))


def _searched_stage_memory(env: _Env) -> StageMemoryPlan:
    """The pretrain stage reports the searched layout's memory (the figure the search fit-checked)."""
    mem, plan = env.searched_memory, env.plan
    assert mem is not None and plan is not None
    return StageMemoryPlan(
        per_gpu_bytes=mem.per_gpu_bytes, capacity_bytes=mem.capacity_bytes,
        fits=memory.fits(mem), usable_bytes=int(usable_bytes(mem.capacity_bytes, mem.backend)),
        shard_degree=plan.dp_shard, cp=plan.cp,
        activation_checkpointing=plan.activation_checkpointing, source="the searched parallelism plan",
        breakdown=dict(mem.breakdown),
    )


def _micro_seqs(kind: str, tr: StageTraining) -> int:
    """Sequences in one micro-step: the stage plan's micro-batch, a DPO pair being two (chosen, rejected)."""
    return (tr.micro_batch or 1) * (2 if kind == "dpo" else 1)


def stage_layout(world: int, shard: int, cp: int, ac: str, micro: int, grad_accum: int = 1,
                 loss_chunk: int = 0) -> ParallelPlan:
    """The layout a stage estimate sizes and times: data parallel over every GPU (per ``cp``), the states sharded
    (FSDP / ZeRO-3) when ``shard`` > 1, else replicated; no TP or PP; the loss in slices of ``loss_chunk`` tokens
    (0: whole)."""
    dp = max(1, world // cp)
    return ParallelPlan(dp_shard=dp if shard > 1 else 1, dp_replicate=1 if shard > 1 else dp, cp=cp,
                        activation_checkpointing=ac, micro_batch=micro, grad_accum=grad_accum,
                        loss_chunk_tokens=loss_chunk)


def stage_backend(env: _Env, kind: str) -> str:
    """The trainer that runs a stage other than pre-training: LM stages run on llmc's DeepSpeed runner when the run's
    backend is DeepSpeed, every other stage on llmc's native trainer (torchtitan runs pre-training only)."""
    return "deepspeed" if kind in LM_KINDS and env.backend == "deepspeed" else "native"


def recompute_options(env: _Env, st: StageBase, tr: StageTraining) -> list[tuple[str, int]]:
    """The (AC mode, loss slice tokens) a stage can run with, least recomputation first: none, selective (llmc's
    runtimes recompute the attention core), full; each with the whole logits, then (when a micro-step has more tokens
    than a slice) with the loss in slices (memory.loss_slice_tokens; llmc's native trainer and DeepSpeed runner both
    compute it so: llmc.runtime.model.token_losses)."""
    chunk = memory.loss_slice_tokens(env.run.model.vocab_size)
    sliced = chunk < _micro_seqs(st.kind, tr) * tr.seq_len
    return [(ac, c) for ac in ("none", "selective", "full") for c in ((0, chunk) if sliced else (0,))]


def stage_memory(env: _Env, st: StageBase, tr: StageTraining, trainable: int, needs_ref: bool,
                 notes: list[str], ac: str, loss_chunk: int = 0) -> StageMemoryPlan:
    """Per-GPU bytes for one stage recomputing ``ac`` with the loss in slices of ``loss_chunk`` tokens (0: whole):
    weights, reference, grads+optimizer (trainable only), activations, logits, GRPO's sampling KV cache. Replicated
    when the states fit in 60 % of a GPU, else sharded over all GPUs."""
    lora, seq_len = st.lora, tr.seq_len
    qlora = lora is not None and lora.quantize_base == "nf4"
    arch = env.run.model
    bf16_ok = autocasts(env)
    if lora is not None:
        weights, replicated, bf16 = frozen_base_bytes(arch, env.n_total, lora.targets, qlora, bf16_ok)
        fp32 = env.n_total - bf16 - (nf4_params(arch, lora.targets) if qlora else 0)
        head = (f"QLoRA: the adapted linear layers' weights in NF4 ({NF4_BITS_PER_PARAM:.3f} bit/param with double "
                f"quantisation, block {NF4_BLOCK}; {gib(replicated)}, whole on every GPU); " if qlora else "LoRA: ")
        if bf16_ok:
            notes.append(head + f"the frozen base's other weights {gib(2 * bf16)} in bf16 (those only matmuls read, "
                         f"under bf16 autocast), {gib(4 * fp32)} in fp32 (embeddings, norms, biases)")
        else:
            notes.append(head + f"the frozen base{' otherwise' if qlora else ''} in fp32, {gib(4 * fp32)} (no bf16 "
                         "autocast here: llmc's trainer keeps the weights as it loads them)")
    else:
        weights, replicated = env.n_total * (4 if env.precision == "fp32" else 2), 0
    ref = 0 if (lora or not needs_ref) else reference_bytes(arch, env.n_total, bf16_ok)
    if needs_ref and lora:
        notes.append("reference = base with adapters disabled: no extra weight copy")
    optim = trainable * BYTES_PER_TRAINABLE_PARAM
    if lora is None:
        optim -= trainable * 2  # the bf16 weight is already counted in `weights`
    cap = env.capacity or DEFAULT_CAPACITY
    # the layout comes from the states' size before any offload (the DeepSpeed stage, hence the sharding, does not
    # change with offload in llmc's ds_config)
    shard = 1 if weights + ref + optim < 0.6 * cap else env.world
    par = env.run.parallelism
    if par.offload_optimizer and st.kind in LM_KINDS:
        # LM stages run on llmc's DeepSpeed runner with the run's ds_config: ZeRO-Offload keeps the optimizer states
        # and fp32 gradients on the host, ZeRO-Infinity the parameters too (memory.backend_state_bytes)
        optim = 0
        if par.offload_params:
            weights = 0
        notes.append("optimizer states" + (" and parameters" if par.offload_params else "") +
                     " offloaded to the host (DeepSpeed, the run's ds_config)")
    # (chat stages: no offload, llmc's native trainer keeps every state on the GPU; G013 says so)
    # llmc's runtimes train a stage other than pre-training without context parallelism (ring attention runs in the
    # torchtitan pre-training job only): every GPU holds whole sequences, whatever the spec pins for pre-training
    cp = 1
    if shard > 1:
        notes.append(f"weights/optimizer sharded over {shard} GPUs (FSDP / ZeRO-3)")
    micro = _micro_seqs(st.kind, tr)
    layout = stage_layout(env.world, shard, cp, ac, micro, loss_chunk=loss_chunk)
    act, buffers, logits = _acts_buffers(env, layout, seq_len)
    states = state_bytes_per_gpu(weights, ref, optim, replicated, shard)
    per_gpu = states + act + buffers  # a training micro-step
    sampling, groups = 0, None
    if st.kind == "grpo":
        # llmc's sampler (llmc.runtime.grpo.sample_groups) runs between training passes: the micro-step's activations
        # and logits are freed by then, the states, gathered FSDP units and workspace stay. It samples as many of the
        # rank's groups at once as keep that phase within SAMPLING_MEMORY_SHARE of the GPU, at least one; the stage's
        # peak is the larger phase.
        G = tr.hyper["group_size"]
        idle = states + buffers - logits
        per_group = G * sampling_row_bytes(env, tr.hyper["max_prompt_tokens"], seq_len)
        room = int(SAMPLING_MEMORY_SHARE * cap) - idle
        groups = max(1, min(sampling_groups_per_rank(tr, env.world), room // per_group if per_group else 1))
        sampling = groups * per_group
        phase = "sampling" if idle + sampling > per_gpu else "training"
        per_gpu = max(per_gpu, idle + sampling)
        notes.append(f"GRPO: {groups} group(s) sampled at once ({groups * G} sequences x {seq_len} tokens: "
                     f"{gib(sampling)} of KV cache and prefill tensors) while the training micro-step's "
                     f"{gib(act + logits)} of activations and logits are freed; the {phase} phase is the peak")
    return StageMemoryPlan(
        # the stage estimate counts tensors and buffers, not the allocator's reserve: the generic profile's margin,
        # the one its recomputation choice keeps (stage_recompute)
        per_gpu_bytes=per_gpu, capacity_bytes=env.capacity,
        fits=(per_gpu <= usable_bytes(env.capacity, None)) if env.capacity else None,
        usable_bytes=int(usable_bytes(env.capacity, None)) if env.capacity else None,
        shard_degree=shard, cp=cp, activation_checkpointing=ac, source="stage estimate",
        loss_chunk_tokens=layout.loss_chunk_tokens,
        weights_bytes=weights, reference_bytes=ref, grads_optimizer_bytes=optim, activation_bytes=act,
        activation_source=ACTIVATION_SOURCE, sampling_bytes=sampling, sampling_groups=groups, buffer_bytes=buffers,
        replicated_bytes=replicated,
    )


def autocasts(env: _Env) -> bool:
    """Whether llmc's trainer runs the stage's forwards under bf16 autocast (``llmc.runtime.posttrain.autocasts``: a
    bf16, fp8 or nvfp4 run on a GPU), where it keeps the frozen weights only matmuls read in bf16."""
    return env.precision in BF16_PRECISIONS and env.gpu is not None and env.gpu.key != "cpu"


def matmul_weight_params(arch: Any) -> tuple[int, int]:
    """(the parameters only a matmul reads, of them the routed experts' stacked matrices), as llmc's trainer lists
    them (``llmc.runtime.lora.matmul_only_weights``): every nn.Linear weight (the adaptable linears, MLA's low-rank
    projections, the router's gate, an untied output head) and the experts' w1 / w2 / w3; not embeddings (a tied head
    reads them), norms, biases, sinks."""
    shapes = linear_shapes(arch)
    bd = params.param_breakdown(arch)
    other = sum(bd.get(k, 0) for k in ("mla/wq_a", "mla/wq_b", "mla/wkv_a", "mla/wkv_b", "head/output"))
    router = arch.d_model * arch.moe.num_experts * params.n_moe_layers(arch) if arch.moe is not None else 0
    linear = sum(di * do * n for _, di, do, n, stacked in shapes if not stacked)
    return linear + other + router, sum(di * do * n for _, di, do, n, stacked in shapes if stacked)


def nf4_params(arch: Any, targets) -> int:
    """The weights QLoRA stores in NF4: the targeted nn.Linear layers (``apply_lora`` quantises no stacked experts)."""
    return sum(di * do * n for name, di, do, n, stacked in linear_shapes(arch) if name in targets and not stacked)


def frozen_base_bytes(arch: Any, total: int, targets, quantize: bool, bf16_ok: bool) -> tuple[int, int, int]:
    """(bytes, of them the NF4 codes every rank holds whole, parameters kept in bf16) of a LoRA / QLoRA stage's frozen
    base as llmc's trainer holds it (``llmc.runtime.posttrain.build_policy``): the parameters it loaded, fp32 (4 B),
    but under bf16 autocast the weights only matmuls read in bf16 (2 B: bit-identical, autocast rounds them the same),
    adapted expert matrices too (``LoRAExperts`` adds its product to theirs, unmerged); QLoRA's targeted linears in NF4 (:data:`NF4_BITS_PER_PARAM`; its codes are no
    parameters, so FSDP2 shards none of them). ``total``: the model's parameters (``params.params_total``)."""
    mm, experts = matmul_weight_params(arch)
    nf4 = nf4_params(arch, targets) if quantize else 0
    bf16 = (mm + experts - nf4) if bf16_ok else 0
    replicated = int(nf4 * NF4_BITS_PER_PARAM / 8)
    return replicated + 2 * bf16 + 4 * (total - nf4 - bf16), replicated, bf16


def reference_bytes(arch: Any, total: int, bf16_ok: bool) -> int:
    """A full stage's frozen DPO / GRPO reference copy (``llmc.runtime.dpo.frozen_copy``): fp32 as loaded, its matmul
    weights (experts included) in bf16 under bf16 autocast."""
    bf16 = sum(matmul_weight_params(arch)) if bf16_ok else 0
    return 2 * bf16 + 4 * (total - bf16)


def host_build_bytes(env: _Env, st: StageBase) -> int:
    """Host memory per node while llmc's trainer builds a LoRA / QLoRA stage's model on the host
    (``llmc.runtime.posttrain.build_policy``: a whole build that quantises or casts its base, loads and adapts it
    there, then moves it to the GPU, so the GPU never holds the fp32 model): the fp32 model, 4 B per parameter, for
    each rank of the node. 0 when the trainer builds on the GPU or sharded on the meta device (several ranks and more
    than :data:`META_INIT_PARAMS` parameters; QLoRA is refused there, G016)."""
    lora = st.lora
    if lora is None or env.gpu is None or env.gpu.key == "cpu":
        return 0
    if lora.quantize_base != "nf4" and not autocasts(env):
        return 0
    if env.world > 1 and env.n_total > META_INIT_PARAMS:
        return 0
    return min(env.gpu.gpus_per_node, env.world) * 4 * env.n_total


def check_host_build(env: _Env, st: StageBase, p: str, sink: Sink) -> None:
    """G017: a LoRA / QLoRA stage's host build (:func:`host_build_bytes`) against the node's host memory
    (``hardware.host_memory_gib``, else the table's reference node): an error above it, a warning above
    :data:`llmc.compiler.checks.HOST_MEMORY_WARN` of it, info when the node's is not known (as P016)."""
    need = host_build_bytes(env, st)
    if not need:
        return
    have = env.gpu.host_gib * GiB
    ranks = min(env.gpu.gpus_per_node, env.world)
    what = (f"{st.kind} stage {st.name!r}: llmc's trainer builds the model in fp32 on the host before it "
            f"{'quantises' if st.lora.quantize_base == 'nf4' else 'casts'} the base and moves it to the GPU: "
            f"{need / GiB:,.0f} GiB per node ({ranks} rank(s) x 4 B x {env.n_total / 1e9:.1f}B parameters)")
    if not have:
        sink.add("G017", "info", f"{p}.lora", f"{what}; the node's host memory is not known",
                 "set hardware.host_memory_gib to have the plan check it")
    elif need > HOST_MEMORY_WARN * have:
        sink.add("G017", "error" if need > have else "warning", f"{p}.lora",
                 what + (f", more than the node's {have / GiB:,.0f} GiB" if need > have else
                         f", {need / have:.0%} of the node's {have / GiB:,.0f} GiB")
                 + " (hardware.host_memory_gib or the hardware table's reference node)",
                 "a node with more host memory, or fewer GPUs per node for the stage")


def state_bytes_per_gpu(weights: int, ref: int, optim: int, replicated: int, shard: int) -> int:
    """A stage's weights, reference and gradients + optimizer states on one GPU: sharded over ``shard`` GPUs (FSDP2
    / ZeRO-3 over every GPU, or 1), but for the ``replicated`` bytes of the weights every rank holds whole."""
    return int(replicated + (weights - replicated + ref + optim) // max(shard, 1))


def sampling_row_bytes(env: _Env, prompt: int, seq_len: int) -> int:
    """Peak bytes one sampled sequence adds while its batch is sampled (llmc.runtime.grpo.sample_groups): its KV cache
    at the end of the decoding (``seq_len`` positions, params.kv_bytes_per_token), or, when larger, the prefill's: the
    prompt's KV cache plus one block's tensors for the prompt's positions (no gradient: at most what the block keeps
    for a backward, memory.layer_activation_bytes_per_token without recomputation, of the dense or the MoE block);
    plus the last position's logits (bf16 and their fp32 copy, 6 B per vocab entry)."""
    arch = env.run.model
    elem = 4 if env.precision == "fp32" else 2
    block = max(memory.layer_activation_bytes_per_token(arch, i, "none", seq_len=prompt, bytes_per_elem=elem)
                for i in {0, arch.n_layers - 1})
    return int(max(seq_len * env.kv_bytes, prompt * (env.kv_bytes + block)) + arch.vocab_size * 6)


def sampling_groups_per_rank(tr: StageTraining, world: int) -> int:
    """GRPO groups one rank samples per step: the step's prompts split over every GPU (llmc.runtime.grpo)."""
    return math.ceil(tr.hyper["prompts_per_step"] / world)


# ----------------------------------------------------------------------------- time


#: Share of a training pass (forward + backward) that is the forward: 2N of 6N FLOPs per token (Kaplan et al.
#: 2020, arXiv:2001.08361 sec. 2.1); a frozen reference's forward, or GRPO's old-policy log-probs, cost this much.
FORWARD_SHARE = 1.0 / 3.0
#: LoRA / QLoRA: the frozen base computes no weight gradients, so its linears cost 4N instead of 6N per token
#: (the backward still propagates activation gradients through them; Hu et al. 2021, arXiv:2106.09685 sec. 4.2).
LORA_LINEAR_COST = 4.0 / 6.0
#: T108 when GRPO's sampling is more than this share of its predicted step
SAMPLING_WARN_SHARE = 0.5


def _sampling_seconds(env: _Env, tr: StageTraining, mem: StageMemoryPlan, rollout: RolloutPlan,
                      token_forward_s: float) -> float:
    """GRPO sampling per step on one rank, with llmc's sampler: its share of the step's groups (the prompts split over
    every rank) in batches of ``mem.sampling_groups``, each a prefill of the batch's G x prompt tokens at
    ``token_forward_s`` (a training forward's time per token) and max_new_tokens one-position forwards of all its
    rows. A one-position forward reads every weight: it takes the longest of its compute (one token per row),
    streaming the bf16 weights from HBM and, when the weights are sharded, gathering them (FSDP2 all-gathers each
    block per forward, over NVLink within a node, the NIC across nodes); the KV cache read is left out."""
    h, gpu = tr.hyper, env.gpu
    G, new = h["group_size"], h["max_new_tokens"]
    groups, per = rollout.groups_per_rank, mem.sampling_groups or 1
    weights = 2.0 * env.n_total
    read = weights / (gpu.hbm_gbps * 1e9)
    gather = 0.0
    if mem.shard_degree > 1:
        dp = mem.shard_degree
        from llmc.compiler.hardware import nvlink_group

        within = env.world <= nvlink_group(gpu)
        bw = (timing.group_bandwidth(getattr(gpu, "nvlink_topology", "switch") if gpu.nvlink_gbps > 0 else "switch",
                                     timing.intra_node_gbps(gpu)[0], float(getattr(gpu, "pcie_gbps", 0.0) or 0.0),
                                     gpu.gpus_per_node, dp) if within else gpu.net_gbps / 8.0) * 1e9
        gather = weights * (dp - 1) / dp / bw if bw > 0 else 0.0
    full, rest = divmod(groups, per)  # full batches, then the groups of a last, shorter one

    def batch(n: int) -> float:  # one decoding forward of a batch of n groups
        return max(n * G * token_forward_s, read, gather) if n else 0.0

    decode = full * batch(per) + batch(rest)
    return groups * G * h["max_prompt_tokens"] * token_forward_s + new * decode


def stage_time(env: _Env, st: StageBase, tr: StageTraining, mem: StageMemoryPlan, lora: bool,
               needs_ref: bool, rollout: RolloutPlan | None) -> StageTimePlan | None:
    """Wall time and cost of a stage other than pre-training, with llmc's time model (:mod:`timing`) on the layout
    its memory was sized for (:func:`stage_layout`), on the trainer that runs it: chat stages on llmc's native
    runtime (eager, bf16: it runs fp8 as bf16), LM stages on llmc's DeepSpeed runner when the run's backend is
    DeepSpeed, else native (torchtitan runs pre-training only). One step = ``updates`` training passes (GRPO's mu)
    over the step's batch (a DPO pair = 2 sequences), with LoRA's cheaper backward on the linears, plus
    ``forward_passes`` forwards (the frozen reference; GRPO's old-policy log-probs), each
    :data:`FORWARD_SHARE` of a pass's compute, plus GRPO's sampling (:func:`_sampling_seconds`; an upper bound:
    every completion runs to max_new_tokens). Its days, GPU-hours and cost are its steps plus the stalls of its
    checkpoint saves (:func:`stage_checkpoints`); the step and tokens/s stay those of a training step."""
    gpu = env.gpu
    if gpu is None or st.kind == "pretrain" or not tr.global_batch_seqs:
        return None
    par = env.run.parallelism
    lm = st.kind in LM_KINDS
    backend = stage_backend(env, st.kind)
    precision = "bf16" if env.precision in BF16_PRECISIONS else env.precision
    micro = _micro_seqs(st.kind, tr)
    seqs = tr.global_batch_seqs * (2 if st.kind == "dpo" else 1)
    dp = max(1, env.world // mem.cp)
    layout = stage_layout(env.world, mem.shard_degree, mem.cp, mem.activation_checkpointing, micro,
                          max(1, math.ceil(seqs / (micro * dp))), mem.loss_chunk_tokens)
    offload = backend == "deepspeed" and par.offload_optimizer
    sm = timing.step_model(env.run.model, tr.seq_len, precision, gpu, backend,
                           compile=env.run.training.compile if lm else False, offload_optimizer=offload,
                           offload_params=offload and par.offload_params)
    step, _, br = timing.step_time(sm, layout)
    gemm = br["compute"]
    if lora:
        linear = 1.0 - flops.attention_share(env.run.model, tr.seq_len)
        step -= gemm * linear * (1.0 - LORA_LINEAR_COST)
    updates = int(tr.hyper.get("iterations", 1)) if st.kind == "grpo" else 1
    forwards = int(needs_ref) + (1 if st.kind == "grpo" else 0)
    forward = FORWARD_SHARE * (gemm + br["elementwise"])  # one forward over the step's batch
    sampling = 0.0
    if st.kind == "grpo" and rollout is not None:
        sampling = _sampling_seconds(env, tr, mem, rollout, forward / (seqs * tr.seq_len / layout.dp))
    total = updates * step + forwards * forward + sampling
    ck = stage_checkpoints(env, st, tr, layout, sm, backend, total)
    days = (total * tr.steps + ck.seconds) / 86400.0 if tr.steps and ck is not None else None
    gh = timing.gpu_hours(days, env.world) if days is not None else None
    price = gpu.usd_per_hour
    return StageTimePlan(
        backend=backend, step_seconds=total, train_pass_seconds=step, forward_passes=forwards, updates=updates,
        sampling_seconds=sampling, checkpoint=ck,
        tokens_per_second=seqs * tr.seq_len / total, days=days, gpu_hours=gh,
        usd=timing.usd(gh, price) if gh is not None and price else None,
        source=f"llmc.compiler.timing on the stage layout ({layout.dp} x data parallel, "
               f"{'sharded' if mem.shard_degree > 1 else 'replicated'}, AC {mem.activation_checkpointing}, "
               f"micro-batch {micro} x {layout.grad_accum} sequences"
               f"{f', loss in slices of {mem.loss_chunk_tokens} tokens' if mem.loss_chunk_tokens else ''}) on the "
               f"{backend} trainer, uncalibrated",
    )


def stage_checkpoint_interval(env: _Env, st: StageBase, tr: StageTraining, step_seconds: float) -> int:
    """A stage's steps between saves: the spec's ``training.checkpoint.interval_steps``, else about 30 minutes of the
    stage's own predicted step (:func:`llmc.compiler.defaults.default_checkpoint_interval`), not pre-training's
    interval (a stage's step can be many times longer or shorter; without pre-training that interval is the clamp's
    1,000 steps: 17 hours between saves of a 63 s step)."""
    if st.kind == "pretrain" or env.run.training.checkpoint.interval_steps is not None or not tr.steps:
        return tr.checkpoint_interval
    return defaults_mod.default_checkpoint_interval(step_seconds, tr.steps)


def stage_checkpoints(env: _Env, st: StageBase, tr: StageTraining, plan: ParallelPlan, sm: timing.StepModel,
                      backend: str, step_seconds: float) -> StageCheckpoints | None:
    """The checkpoint saves of a stage other than pre-training on its layout ``plan`` and the time they stall it
    (:func:`llmc.compiler.checkpoint_cost.stage_checkpoints`, whose docstring says what each trainer writes): sft /
    dpo / grpo on llmc's post-training loop (the trainable parameters -- LoRA's adapters -- with their AdamW state
    every ``checkpoint_interval`` steps, synchronously, then the final weights); continued training as pre-training
    on its ``backend`` (llmc's DeepSpeed runner with the run's ZeRO stage, ``backends.deepspeed_zero_stage``: without a
    pre-training plan the runner's, every GPU a data-parallel rank), asynchronous where
    that trainer's setting says so: the torchtitan job the run's resolved ``Hyper.checkpoint_async``, llmc's trainers
    the spec's ``training.checkpoint.async_mode`` (None: off). None when the stage's steps are not known."""
    if not tr.steps or env.gpu is None:
        return None
    ck = env.run.training.checkpoint
    posttrain = st.kind in CHAT_KINDS
    lora = posttrain and st.lora is not None
    if backend == "deepspeed":
        ds_plan = env.plan if env.plan is not None else ParallelPlan(dp_shard=env.world)
        plan = replace(plan, zero_stage=deepspeed_zero_stage(env.run.parallelism, ds_plan, searched=env.plan is not None,
                                                             backend=backend))
    hyper_async = env.hyper.checkpoint_async if backend == "torchtitan" else bool(ck.async_mode)
    return checkpoint_cost.stage_checkpoints(
        sm, plan, env.gpu, backend=backend, posttrain=posttrain, lora=lora, params_total=env.n_total,
        trainable_params=lora_trainable_params(env.run.model, st.lora.rank, st.lora.targets) if lora else env.n_total,
        precision=env.precision, steps=tr.steps, interval=stage_checkpoint_interval(env, st, tr, step_seconds),
        step_seconds=step_seconds,
        async_save=not posttrain and checkpoint_cost.saves_async(backend, hyper_async), write_gbps=ck.write_gbps,
        keep_latest=ck.keep_latest, exportable=hf_export_supported(env.run.model) is None)


def pipeline_time(stages: list[StagePlan], pretrain_days: float | None, pretrain_usd: float | None,
                  world: int, spec_has_stages: bool, pretrain_checkpoint=None) -> PipelineTime | None:
    """Pre-training plus every other stage, one after another on the run's ``world`` GPUs, and their checkpoints' peak
    on disk (:func:`llmc.compiler.checkpoint_cost.pipeline_disk`; ``pretrain_checkpoint``: pre-training's
    ``CheckpointNumbers``); None for a spec without stages (its time is the pre-training time)."""
    from llmc.compiler.checkpoint_cost import pipeline_disk

    if not spec_has_stages:
        return None
    days, usd, priced = 0.0, 0.0, True
    counted, unknown, estimated = [], [], []
    for s in stages:
        if s.kind == "pretrain":
            d, u = pretrain_days, pretrain_usd
        else:
            d = s.time.days if s.time is not None else None
            u = s.time.usd if s.time is not None else None
        if d is None:
            unknown.append(s.name)
            continue
        counted.append(s.name)
        if s.kind != "pretrain":
            estimated.append(s.name)
        days += d
        priced = priced and u is not None
        usd += u or 0.0
    disk, disk_unknown = pipeline_disk(pretrain_checkpoint, stages)
    return PipelineTime(days=days, gpu_hours=timing.gpu_hours(days, world), usd=usd if priced else None,
                        counted=counted, unknown=unknown, estimated=estimated, disk_bytes=disk,
                        disk_unknown=disk_unknown)


# ----------------------------------------------------------------------------- rollout / long context


def rollout_plan(env: _Env, tr: StageTraining, lora: bool, needs_ref: bool, mem: StageMemoryPlan) -> RolloutPlan:
    """GRPO cost per step with llmc's sampler (``llmc.runtime.grpo.sample_groups``): each rank samples its groups in
    batches of as many as its memory holds (``mem.sampling_groups``); per batch, one forward over the G copies of each
    prompt fills a KV cache, then one one-position forward of every row per new token (an upper bound: every
    completion runs to max_new_tokens); 2N FLOPs per processed token. Training 6N per token (full) or 4N with a
    frozen base (no weight grads), once per policy update (``iterations``, mu); reference forward 2N per token
    (Kaplan et al. 2020, arXiv:2001.08361 §2.1). Attention FLOPs are left out of these counts."""
    h, n = tr.hyper, env.n_active
    G, P = h["group_size"], h["prompts_per_step"]
    prompt, gen_len = h["max_prompt_tokens"], h["max_new_tokens"]
    train_tok = sampled = P * G * (prompt + gen_len)  # the sampler's forwards process what training does
    return RolloutPlan(
        prompts_per_step=P, completions_per_step=P * G, generated_tokens_per_step=P * G * gen_len,
        sampled_tokens_per_step=sampled, groups_per_rank=sampling_groups_per_rank(tr, env.world),
        decode_steps_per_batch=gen_len,
        generation_flops_per_step=2.0 * n * sampled,
        train_flops_per_step=(4.0 if lora else 6.0) * n * train_tok * h["iterations"],
        reference_flops_per_step=2.0 * n * train_tok if needs_ref else 0.0,
        kv_cache_bytes_per_group=G * (prompt + gen_len) * env.kv_bytes, kv_bytes_per_token=env.kv_bytes,
    )


def long_context_plan(env: _Env, st: StageBase, seq_len: int, inherited: dict, notes: list[str],
                      layout: StageLayout | None = None) -> LongContextPlan:
    """What a context extension changes: RoPE base / scaling, the CP degree and activation / KV sizes."""
    old = inherited["max_context"]
    scaling = stage_rope_scaling(st, inherited)
    factor = (scaling or {}).get("factor") or (seq_len / old if old else None)
    cp_rec = recommended_cp(seq_len, env.world)
    if layout is not None:  # its own torchtitan job: the searched layout's CP and activations
        return LongContextPlan(
            old_seq_len=old, new_seq_len=seq_len, extension_factor=seq_len / old if old else None,
            rope_theta_old=inherited["rope_theta"], rope_theta=st.rope_theta or inherited["rope_theta"],
            rope_scaling=scaling, yarn_factor=factor if (scaling or {}).get("type") == "yarn" else None,
            recommended_cp=cp_rec, cp=layout.plan.cp,
            activation_bytes_per_gpu=int(layout.memory.breakdown.get("activations", 0)),
            activation_source="the stage's searched parallelism plan (llmc.compiler.memory)",
            kv_cache_bytes_per_sequence=seq_len * env.kv_bytes,
        )
    cp = 1  # what runs: llmc's runtimes train this stage without context parallelism (stage_memory)
    act_plan = ParallelPlan(dp_shard=env.world, cp=cp, activation_checkpointing="full")
    if cp_rec > 1:
        notes.append(f"seq_len {seq_len} >= 32k: ring attention over cp={cp_rec} GPUs would split each sequence's "
                     "activations, but llmc's runtimes train stages other than pre-training without context "
                     "parallelism: every GPU holds whole sequences (memory above)")
    return LongContextPlan(
        old_seq_len=old, new_seq_len=seq_len, extension_factor=seq_len / old if old else None,
        rope_theta_old=inherited["rope_theta"], rope_theta=st.rope_theta or inherited["rope_theta"],
        rope_scaling=scaling, yarn_factor=factor if (scaling or {}).get("type") == "yarn" else None,
        recommended_cp=cp_rec, cp=cp, activation_bytes_per_gpu=_acts_buffers(env, act_plan, seq_len)[0],
        activation_source=ACTIVATION_SOURCE, kv_cache_bytes_per_sequence=seq_len * env.kv_bytes,
    )


def stage_rope_scaling(st: StageBase, inherited: dict) -> dict | None:
    """A long_context stage's ``rope_scaling`` as it runs: without ``original_max_position`` the context it extends
    is the one its base model was trained at (the inherited ``max_context``), not RopeScaling's 8192 default, which
    would place YaRN's / llama3's interpolation bands for another model (arXiv:2309.00071 sec. 3)."""
    scaling = getattr(st, "rope_scaling", None)
    if not scaling or "original_max_position" in scaling:
        return scaling
    return {**scaling, "original_max_position": int(inherited["max_context"])}


def _rope_model(scaling: dict | None) -> RopeScaling | None:
    """A context's ``rope_scaling`` dict as the spec's RopeScaling (None: none, or one the spec checks refuse)."""
    if not scaling:
        return None
    try:
        return RopeScaling.model_validate(scaling)
    except ValueError:  # (pydantic's ValidationError; compile reports the stage's rope_scaling itself)
        return None


def _rope_words(rs: RopeScaling) -> str:
    return f"{rs.type} x{rs.factor:g} from {rs.original_max_position:,} tokens"


def _rope_dim(arch) -> int:
    """The dims RoPE rotates per head: MLA's rope head dim, a partial rotary_dim, else the head."""
    return arch.mla.qk_rope_head_dim if arch.mla is not None else arch.partial_rotary or arch.hd


def _model_rope_reach(arch) -> float | None:
    """How far the model's own RoPE reaches (:func:`llmc.rope.rope_reach`), and at least the positions its preset
    was released with where the spec keeps the preset's RoPE (a preset's max_seq_len is its config.json's
    max_position_embeddings, e.g. Llama 3.1's 131,072); None without a scaling."""
    reach = rope_reach(arch.rope_scaling)
    preset = PRESETS.get(arch.name)
    if reach is not None and preset is not None and (preset.rope_scaling, preset.rope_theta) == (
            arch.rope_scaling, arch.rope_theta):
        reach = max(reach, preset.max_seq_len)
    return reach


def check_rope_change(env: _Env, st: StageBase, p: str, seq_len: int, inherited: dict, sink: Sink) -> None:
    """T107: a long_context stage's ``rope_scaling`` that replaces a different scaling its base already has. The
    stage's rule is applied to the unscaled theta frequencies (llmc's trainers: llmc.runtime.model.rope_inv_freq;
    the stage's torchtitan job: its RoPE config), not on top of the base's, so where it interpolates less than the
    base did, frequencies the model was trained with rise: the positions it learned map to other angles. Compared
    with llmc's own RoPE code (:func:`llmc.rope.rope_inv_freq`); warned when any frequency rises by more than 1%."""
    old, new = _rope_model(inherited.get("rope_scaling")), _rope_model(stage_rope_scaling(st, inherited))
    if old is None or new is None or old == new:
        return
    dim = _rope_dim(env.run.model)
    theta_old = inherited["rope_theta"]
    f_old = rope_inv_freq(dim, theta_old, old)
    f_new = rope_inv_freq(dim, st.rope_theta or theta_old, new)
    ratio = [n / o for n, o in zip(f_new, f_old, strict=True)]
    changed = sum(abs(r - 1) > ROPE_CHANGE_TOL for r in ratio)
    higher = [r for r in ratio if r > 1 + ROPE_CHANGE_TOL]
    if not higher:
        return
    orig = old.original_max_position
    fy = rope_factor_for("yarn", seq_len, orig)
    keep = ""
    if old.type in ("llama3", "linear"):
        keep = (f", or keep its rule with a larger factor: {{type: {old.type}, factor: "
                f"{rope_factor_for(old.type, seq_len, orig)}, original_max_position: {orig}}}")
    sink.add("T107", "warning", f"{p}.rope_scaling",
             f"long_context stage {st.name!r}: rope_scaling {_rope_words(new)} replaces its base model's "
             f"{_rope_words(old)} rather than adding to it (the rule is applied to the unscaled theta frequencies): "
             f"{changed} of {len(ratio)} rotary frequencies change by more than 1%"
             + (", " if changed == len(higher) else f", {len(higher)} of them ") + f"rising "
             f"{min(higher):.1f}-{max(higher):.1f}x above the base's (the lowest frequency {ratio[-1]:.1f}x): less "
             "interpolation than the model was trained with (llmc.rope.rope_inv_freq)",
             f"extend from the model's original context with the whole factor: {{type: yarn, factor: {fy}, "
             f"original_max_position: {orig}}} ({seq_len:,} / {orig:,}){keep}"
             + (f" (torchtitan {TARGET_VERSIONS['torchtitan']}'s RoPE runs both: scaling 'llama' and 'yarn')"
                if keep and old.type == "llama3" else ""))


def check_rope_reach(env: _Env, st: StageBase, p: str, seq_len: int, inherited: dict, sink: Sink) -> None:
    """T109: a stage that trains past what its RoPE scaling reaches (:func:`llmc.rope.rope_reach`): a long_context
    stage's own ``rope_scaling``, or pre-training's, the model's (at least its preset's released positions). From
    weights (init_hf / init_from) a warning: the positions past the reach are extrapolated angles; from scratch an
    info: the model learns every position it trains at, so only weights trained with that scaling are at stake."""
    arch = env.run.model
    if st.kind == "long_context" and st.rope_scaling is not None:
        rs, where = _rope_model(stage_rope_scaling(st, inherited)), f"{p}.rope_scaling"
        reach = rope_reach(rs)
        who, from_weights = f"long_context stage {st.name!r}", True
    elif st.kind == "pretrain" and arch.rope_scaling is not None:
        rs, reach = arch.rope_scaling, _model_rope_reach(arch)
        where = ("data.seq_len" if not env.run.stages else f"{p}.seq_len" if st.seq_len is not None
                 else f"{p}.data.seq_len" if st.data is not None else "data.seq_len")
        from_weights = bool(st.init_hf or st.init_from or env.run.training.init_hf)
        who = "pre-training" if not env.run.stages else f"stage {st.name!r}"
    else:
        return
    if rs is None or reach is None or seq_len <= reach:
        return
    orig = rs.original_max_position
    per = f"2 x {rs.factor:g} x {orig:,}, Meta's Llama 3.1 pairing" if rs.type == "llama3" else (
        f"{rs.factor:g} x {orig:,}")
    alt = [f"{{type: {t}, factor: {rope_factor_for(t, seq_len, orig)}, original_max_position: {orig}}}"
           for t in dict.fromkeys((rs.type, "yarn")) if t in ("llama3", "yarn", "linear")]
    sink.add("T109", "warning" if from_weights else "info", where,
             f"{who} trains at seq_len {seq_len:,}, past what its RoPE scaling ({_rope_words(rs)}) reaches: "
             f"{reach:,.0f} tokens ({per}" + (f"; the model's released {reach:,.0f} positions" if reach > rope_reach(rs)
                                          else "") + ")"
             + ("" if from_weights else ": from scratch the model learns every position it trains at, so this "
                "matters for weights trained with that scaling (an init_hf)"),
             f"scale from the original {orig:,} tokens to {seq_len:,}: rope_scaling " + " or ".join(alt)
             + ("" if st.kind == "long_context" else " (model.rope_scaling, or a long_context stage)"))


def _context_out(env: _Env, st: StageBase, p: str, seq_len: int, inherited: dict, sink: Sink) -> dict:
    """The context the stage hands on (RoPE changes of a long_context stage), with T107 / T109 / G004."""
    out = dict(inherited, seq_len=seq_len)
    check_rope_reach(env, st, p, seq_len, inherited, sink)
    if st.kind == "long_context":
        check_rope_change(env, st, p, seq_len, inherited, sink)
        if st.rope_theta is None and st.rope_scaling is None:
            sink.add("T107", "warning", f"{p}.kind",
                     f"long_context stage {st.name!r} extends to {seq_len} tokens without changing RoPE",
                     "set rope_theta (e.g. 500000 -> 8x larger) or rope_scaling {type: yarn, factor: "
                     f"{max(1, round(seq_len / max(inherited['max_context'], 1)))}}}; longer training alone "
                     "does not extend context")
        else:
            out.update(max_context=seq_len, rope_theta=st.rope_theta or inherited["rope_theta"],
                       rope_scaling=stage_rope_scaling(st, inherited))
    elif seq_len > inherited["max_context"]:
        # RoPE scaling (llama3, yarn, ...) stretches the positions a model was trained on up to its context, no further
        ctx, scaled = inherited["max_context"], inherited.get("rope_scaling")
        where = (f"{p}.seq_len" if st.seq_len else f"{p}.max_new_tokens" if st.kind == "grpo"
                 else f"{p}.data.seq_len" if st.data is not None else p)
        sink.add("G004", "warning", where,
                 f"stage {st.name!r} trains at seq_len {seq_len:,} beyond its base model's context {ctx:,} "
                 + (f"(with its {scaled.get('type') or 'RoPE'} scaling)" if scaled else "without RoPE scaling")
                 + f": the positions past {ctx:,} are extrapolated, never trained at",
                 "add a long_context stage (rope_theta / yarn) before it, or train within the context")
    tok = tokenizer_for(env.run, st)
    if tok.vocab_size is not None and tok.vocab_size > inherited["vocab_size"]:
        # (a smaller tokenizer is a padded embedding, as Qwen2.5's 151,665 tokens in 152,064 rows: rows left unused)
        sink.add("G004", "error", f"{p}.data.tokenizer.vocab_size",
                 f"stage {st.name!r} uses vocab_size {tok.vocab_size}, larger than its base model's "
                 f"{inherited['vocab_size']} (tokens without an embedding row)", "a stage cannot grow the "
                 "vocabulary; resize embeddings in a separate step (new rows = mean of related embeddings)")
    own = st.data.tokenizer if st.data is not None else None
    if own is not None and st.init_from and own.train:
        # a tokenizer trained afresh for a stage that continues another stage's model: its ids are not the ones the
        # model learned, whatever their count (prepare trains a new BPE for the stage: llmc.runtime.job)
        sink.add("G004", "error", f"{p}.data.tokenizer.train",
                 f"stage {st.name!r} trains a tokenizer of its own, but continues stage {st.init_from!r}'s model, "
                 "which was trained with another: the new tokenizer's ids are not the ones the model learned",
                 "drop the stage's tokenizer (it then uses the run's), or start from scratch")
    elif (own is not None and st.init_from and own.vocab_size is not None and not own.path
          and own.vocab_size != (env.run.data.tokenizer.vocab_size or inherited["vocab_size"])):
        base = env.run.data.tokenizer.vocab_size or inherited["vocab_size"]
        sink.add("G004", "error", f"{p}.data.tokenizer.vocab_size",
                 f"stage {st.name!r} declares vocab_size {own.vocab_size}, but the tokenizer its base model was "
                 f"trained with has {base}", "drop the stage's vocab_size (it then uses the run's tokenizer)")
    if st.data is not None and tok.path and inherited.get("tokenizer") and tok.path != inherited["tokenizer"]:
        sink.add("G004", "error", f"{p}.data.tokenizer.path",
                 f"stage {st.name!r} uses tokenizer {tok.path!r}, its base model was trained with "
                 f"{inherited['tokenizer']!r}", "fine-tune with the base model's tokenizer")
    out["tokenizer"] = tok.path or inherited.get("tokenizer")
    return out


# ----------------------------------------------------------------------------- pitfall checks


def _general_fraction(stage: StageBase) -> tuple[float | None, bool]:
    """(share of general data, is this a domain stage): the stage's own sources' mixture where it has them (what the
    runners train on: they mix by source weights and add nothing), else its declared general_data_fraction."""
    srcs = stage.data.sources if stage.data is not None else []
    domain = any(s.kind in ("domain", "code", "math", "multilingual") for s in srcs)
    if not srcs:
        return stage.general_data_fraction, stage.general_data_fraction is not None
    return _source_general_share(srcs), domain or stage.general_data_fraction is not None


def _source_general_share(srcs, kinds: tuple[str, ...] = ("general", "chat")) -> float:
    return sum(share for s, share in zip(srcs, mixture_shares(srcs), strict=True) if s.kind in kinds)


def check_lr(env: _Env, st: StageBase, p: str, lr: float, sink: Sink) -> None:
    """T101: a fine-tuning LR far above published recipes (info only below 100M params)."""
    sev = "warning" if env.n_total >= 1e8 else "info"
    lora = st.lora is not None
    if st.kind == "sft" and not lora and lr > 1e-4:
        sink.add("T101", sev, f"{p}.lr", f"SFT lr {lr:g} is high for a full fine-tune",
                 "use 1e-5..5e-5 (fine-tune LR must be below the pre-training LR)")
    if st.kind == "dpo" and lr > (5e-5 if lora else 5e-6):
        sink.add("T101", sev, f"{p}.lr", f"DPO lr {lr:g} is high", "DPO uses ~5e-7..1e-6 (full weights)")
    if st.kind == "grpo" and not lora and lr > 1e-5:
        sink.add("T101", sev, f"{p}.lr", f"GRPO lr {lr:g} is high", "DeepSeekMath GRPO uses 1e-6")
    if st.kind == "midtrain" and not lora and lr > 1e-4:
        sink.add("T101", sev, f"{p}.lr", f"continued pre-training lr {lr:g} risks forgetting", "use ~1e-5..3e-5")


def check_chat_template(env: _Env, st: StageBase, p: str, tmpl: str, sink: Sink) -> None:
    """T103: the chat template's special tokens must exist in the tokenizer."""
    tok = tokenizer_for(env.run, st)
    need = TEMPLATE_TOKENS.get(tmpl)
    have, how = tokenizer_specials(env.run, tok, env.facts)
    tpath = (f"{p}.data.tokenizer.chat_template" if st.data is not None and st.data.tokenizer.chat_template
             else "data.tokenizer.chat_template" if tok.chat_template else p)
    if tmpl == OWN_TEMPLATE:
        if tokenizer_has_template(tok, env.facts) is False:
            sink.add("T103", "error", tpath, f"chat_template: {OWN_TEMPLATE} asks for the tokenizer's own chat "
                     f"template, which the tokenizer ({how}) does not have (no chat_template.jinja, no chat_template "
                     "in tokenizer_config.json)", f"name one of {', '.join(TEMPLATE_TOKENS)}, or use a tokenizer "
                     "folder that ships its template")
    elif need is None:
        sink.add("T103", "error", tpath, f"unknown chat template {tmpl!r}",
                 f"use one of {', '.join(TEMPLATE_TOKENS)}, or {OWN_TEMPLATE} (the tokenizer's own)")
    elif have is not None:
        missing = [t for t in need if t not in have]
        if missing:
            sink.add("T103", "warning" if how.startswith("inferred") else "error", tpath,
                     f"chat template {tmpl!r} needs {', '.join(missing)} which the tokenizer ({how}) lacks",
                     "pick the template that matches the base model's tokenizer (llama3 for Llama-3, chatml for "
                     f"Qwen, phi3 for Phi-3 / Phi-3.5, phi4 for Phi-4), or {OWN_TEMPLATE} (the tokenizer's own)")


#: the records each chat stage trains on: the source kind llmc.runtime.posttrain.load_stage_data reads for it
#: (``KIND_FOR_STAGE``; a ``general`` source, the default kind, is read as such records too, other kinds skipped),
#: and what one jsonl record holds
STAGE_RECORDS: dict[str, tuple[str, str]] = {
    "sft": ("chat", '{"messages": [{"role", "content"}, ...]}'),
    "dpo": ("preference", '{"prompt", "chosen", "rejected"}'),
    "grpo": ("prompts", '{"prompt", "answer" or "expression"}'),
}


#: the builtin record data llmc generates for each record kind (``format: builtin`` with that ``kind``, whatever the
#: source's name: llmc.runtime.synthetic, read by llmc.runtime.posttrain.load_stage_records): (the name the examples
#: give it, what it holds)
BUILTIN_RECORDS: dict[str, tuple[str, str]] = {
    "chat": ("synthetic-chat", "short instruction conversations: arithmetic, copy, upper-casing"),
    "preference": ("synthetic-preferences", "arithmetic preference pairs: the right sum chosen, a wrong one rejected"),
    "prompts": ("arithmetic", "'a+b=' prompts with their answers, for the arithmetic verifier"),
}


def _reads(s, want: str) -> bool:
    """Whether llmc's post-training trainer reads source ``s`` as the stage's ``want`` records: a source of that kind,
    or a ``general`` one from a file (a ``general`` builtin is llmc's pre-training text corpus: refused)."""
    return s.kind == want or (s.kind == "general" and s.format != "builtin")


def check_stage_data(st: StageBase, p: str, tr: StageTraining, sink: Sink) -> None:
    """G014: a chat stage's sources against what llmc's trainer reads for its kind (llmc.runtime.posttrain.
    load_stage_data): a source of another record or text kind is skipped (an error when no source is left: the stage
    stops with "no ... data" after the stages before it ran), a builtin pre-training corpus (``python-docs``: text,
    no records) is refused, a file source must be jsonl records. G015: a GRPO
    stage's seq_len, which its trainer never reads (llmc.runtime.grpo.train_grpo samples a prompt of up to
    max_prompt_tokens and a completion of up to max_new_tokens: the length the plan sizes). G026: a chat stage
    without data, which llmc's trainer trains on its builtin synthetic records (``load_stage_records``)."""
    srcs = st.data.sources if st.data is not None else []
    if st.kind in STAGE_RECORDS and not srcs:
        want, form = STAGE_RECORDS[st.kind]
        example, holds = BUILTIN_RECORDS[want]
        sink.add("G026", "warning", p,
                 f"{st.kind} stage {st.name!r} has no data of its own (it reads its own data.sources, never the top-level "
                 "data's): "
                 f"llmc's trainer would train it on its builtin synthetic {want} records ({holds}), not on yours",
                 f"give the stage `data: {{sources: [...], seq_len: N, tokens: N}}`, its sources of kind: {want} "
                 f"(jsonl records {form}); to train on the builtin records on purpose, name them as its source: "
                 f"{{name: {example}, format: builtin, kind: {want}}}")
    if st.kind in STAGE_RECORDS and srcs:
        want, form = STAGE_RECORDS[st.kind]
        read = [s for s in srcs if _reads(s, want)]
        example, holds = BUILTIN_RECORDS[want]
        for j, s in enumerate(srcs):
            if s.kind == "general" and s.format == "builtin":
                # (the runtime refuses it too: llmc.runtime.posttrain.load_stage_records)
                sink.add("G014", "error", f"{p}.data.sources.{j}.format",
                         f"{st.kind} stage {st.name!r} trains on {want} records, but source {s.name!r} is llmc's "
                         f"builtin pre-training text corpus (format: builtin, kind: general), which holds no {want} "
                         "records: llmc's trainer would stop at it",
                         f"llmc's builtin {want} data is format: builtin with kind: {want} (any name, e.g. "
                         f"{{name: {example}, format: builtin, kind: {want}}}: {holds}); or your own jsonl records "
                         f"{form}")
            elif s.kind not in (want, "general"):
                sink.add("G014", "warning" if read else "error", f"{p}.data.sources.{j}.kind",
                         f"{st.kind} stage {st.name!r} trains on {want} records, but source {s.name!r} is kind: "
                         f"{s.kind}, which llmc's trainer skips for it" + (
                             "" if read else f"; the stage has no other source and would stop with 'no {want} data'"),
                         f"a {st.kind} stage needs a source of kind: {want} (jsonl records {form})"
                         + (", or drop this one" if read else ""))
            elif s.path is not None and s.format not in ("jsonl", "builtin"):
                sink.add("G014", "error", f"{p}.data.sources.{j}.format",
                         f"{st.kind} stage {st.name!r}: source {s.name!r} is format: {s.format}, but llmc's trainer "
                         f"reads {want} data as jsonl records only", f"write it as jsonl records {form}")
    if st.kind == "grpo":
        prompt, new = tr.hyper["max_prompt_tokens"], tr.hyper["max_new_tokens"]
        given = ((f"{p}.seq_len", st.seq_len) if st.seq_len else
                 (f"{p}.data.seq_len", st.data.seq_len) if st.data is not None else (None, None))
        # (data.seq_len is a required field: warned only where GRPO's sequences run longer than it)
        if given[0] is not None and (given[1] < prompt + new or (st.seq_len and st.seq_len != prompt + new)):
            sink.add("G015", "warning", given[0],
                     f"GRPO stage {st.name!r} has seq_len {given[1]:,}, which llmc's GRPO trainer does not read: its "
                     f"sequences are a prompt of up to max_prompt_tokens ({prompt:,}) and a completion of up to "
                     f"max_new_tokens ({new:,}), {prompt + new:,} tokens, the length this plan sizes the stage for",
                     "bound GRPO's sequences with max_prompt_tokens and max_new_tokens"
                     + (f"; data.seq_len {prompt + new:,} says the same" if not st.seq_len else
                        "; drop the stage's seq_len"))


def _states_remedies(env: _Env, st: StageBase, mem: StageMemoryPlan, per_step: int, seq_len: int) -> str:
    """What is left to try (G005's hint) when a stage's weights, gradients and optimizer states are the bulk of its
    memory, for the way it trains. A full fine-tune: LoRA / QLoRA, more GPUs. LoRA: QLoRA, then for LoRA and QLoRA a
    lower rank where the adapters' share can close the gap (their weights, gradients and AdamW states grow linearly with
    the rank: r x (d_in + d_out) per adapted matrix, Hu et al. 2021, arXiv:2106.09685 sec. 4) or fewer targets, and a
    shorter seq_len where one micro-step alone is as large as the excess. More GPUs split what FSDP shards (a bf16
    base, adapters, optimizer states) but not a QLoRA base: llmc's trainer keeps its NF4 codes outside the module's
    parameters (llmc.runtime.lora.NF4Linear), whole on every rank."""
    over = mem.per_gpu_bytes - (mem.usable_bytes or env.capacity or DEFAULT_CAPACITY)  # (what fits compares with)
    shard = max(mem.shard_degree, 1)
    lora = st.lora
    qlora = lora is not None and lora.quantize_base == "nf4"
    gpus = (f"more GPUs (the states are split over every GPU, {shard} now)" if shard > 1
            else "more GPUs to shard the states over")
    short = [f"a shorter seq_len ({gib(per_step)} is one micro-step at seq_len {seq_len})"] \
        if per_step >= over else []
    if lora is None:
        return "; ".join(["LoRA or QLoRA (lora:, lora.quantize_base: nf4: only the adapters train)", gpus, *short])
    base = state_bytes_per_gpu(mem.weights_bytes or 0, 0, 0, mem.replicated_bytes, shard)
    adapters = (mem.grads_optimizer_bytes or 0) // shard
    what = (f"{gib(base)} the frozen base" + (f" ({gib(mem.replicated_bytes)} of it NF4)" if qlora
                                                         else "")
            + f", {gib(adapters)} the adapters with their gradients and AdamW states")
    # QLoRA stores the adapted linears (most of the base) in NF4: at most this much less per GPU
    tries = [] if qlora or base * (1 - NF4_BITS_PER_PARAM / 16) < over else [
        "QLoRA (lora.quantize_base: nf4: the frozen base in ~4.1 bits a weight instead of 16)"]
    rank = lora.rank * (adapters - over) // adapters if adapters else 0
    if rank >= 1:
        tries.append(f"lora.rank about {rank} or lower (now {lora.rank}), or fewer lora.targets")
    tries += short
    tries.append("a GPU with more memory" if qlora else gpus)
    if qlora and env.n_total <= META_INIT_PARAMS:  # (over it, QLoRA runs on one GPU only: G016)
        tries.append(f"more GPUs split the rest of the states but not the NF4 codes, which every rank holds whole "
                     f"({gib(mem.replicated_bytes)})")
    return f"{what}; " + "; ".join(tries)


def check_stage(env: _Env, st: StageBase, p: str, tr: StageTraining, mem: StageMemoryPlan, sink: Sink) -> None:
    """Known pitfalls: LR, forgetting, loss mask, chat template, GRPO group / KL, LoRA rank, memory, base."""
    check_lr(env, st, p, tr.lr, sink)
    if st.kind in CONTINUED_KINDS and tr.steps is None:
        sink.add("G009", "error", p, f"{st.kind} stage {st.name!r} has no length: neither steps nor a data.tokens to "
                 "derive them from", f"set {p}.steps, or give the stage data: with tokens")
    if st.kind in CONTINUED_KINDS and st.data is None and env.run.pretrains:
        # every runner opens the stage's data afresh (its own stream, from document 0): pre-training's first tokens
        sink.add("G012", "warning", p, f"{st.kind} stage {st.name!r} has no data of its own: it reads the top-level "
                 "data again from its first document, the tokens pre-training trained on first (repeated; the part "
                 "of the corpus pre-training did not reach stays unread)",
                 f"give the stage its own data: (e.g. a higher-quality {st.kind} mix, or the corpus files "
                 "pre-training did not reach)")
    srcs = st.data.sources if st.data is not None else []
    general = _source_general_share(srcs, ("general",)) if srcs else None
    if st.general_data_fraction is not None and general is not None and abs(general - st.general_data_fraction) > 0.05:
        sink.add("G010", "warning", f"{p}.general_data_fraction",
                 f"general_data_fraction {st.general_data_fraction:g} is declared, but the stage's sources give "
                 f"{general:.0%} general data: llmc's runners mix the sources by their weights and add nothing",
                 "add a general source to the stage's data with that weight (or drop the declaration)")
    if st.kind in ("midtrain", "sft"):
        frac, domain = _general_fraction(st)
        if domain and frac is not None and frac < 0.1:
            path = f"{p}.general_data_fraction" if st.general_data_fraction is not None else f"{p}.data"
            sink.add("D101", "warning", path,
                     f"only {frac:.0%} general data in domain stage {st.name!r}: catastrophic forgetting risk",
                     "mix 10-20% general data and monitor general benchmarks")
    if st.kind in CONTINUED_KINDS and tr.global_batch_seqs and tr.micro_batch and tr.grad_accum \
            and mem.source != _LAYOUT_SOURCE and tr.micro_batch * tr.grad_accum * env.world != tr.global_batch_seqs:
        # the native trainer runs continued training data parallel over every rank and needs the exact split
        # (TrainJob.from_lock refuses the stage at launch, after the stages before it ran; DeepSpeed: X104 at build)
        unit = env.world * tr.seq_len
        sink.add("G006", "error", f"{p}.global_batch_tokens" if st.global_batch_tokens else p,
                 f"stage {st.name!r} has {tr.global_batch_seqs:,} sequences per step, which do not split evenly over "
                 f"the {env.world:,} GPUs it runs on (data parallel over every GPU, without TP, PP or CP)",
                 f"set the stage's global_batch_tokens to a multiple of {env.world:,} x {tr.seq_len:,} = {unit:,} "
                 f"tokens (e.g. {max(1, round(tr.global_batch_seqs / env.world)) * unit:,})")
    if st.kind == "sft" and st.loss_mask == "none":
        sink.add("T102", "warning", f"{p}.loss_mask", "SFT without a loss mask trains on user/system tokens",
                 "use loss_mask: assistant (labels -100 on non-assistant tokens)")
    if st.kind in CHAT_KINDS:
        check_chat_template(env, st, p, tr.hyper["chat_template"], sink)
    if st.kind == "grpo":
        if tr.hyper["group_size"] < 2:
            sink.add("T104", "error", f"{p}.grpo_group_size",
                     f"GRPO needs G >= 2 completions per prompt (got {tr.hyper['group_size']})",
                     "with one sample the group-normalised advantage is always 0; use 8")
        if tr.hyper["kl_coef"] == 0:
            sink.add("T105", "warning", f"{p}.grpo_kl_coef", "GRPO without a KL penalty invites reward hacking",
                     "use ~0.04 (DeepSeekMath) and watch the response-length distribution")
        if tr.hyper["reward"] == "none":  # llmc.runtime.posttrain refuses it, after the stages before it ran
            sink.add("G011", "error", f"{p}.reward", f"GRPO stage {st.name!r} has reward: none, but GRPO scores its "
                     "completions with a verifier", "use reward: arithmetic, the exact answer check with sympy: "
                     "llmc's one verifier, and the default when reward is left out")
    if st.lora is not None:
        check_lora_rank(env.run.model, st, p, sink)
    check_stage_data(st, p, tr, sink)
    if st.lora is not None and st.lora.quantize_base == "nf4" and env.world > 1 and env.n_total > META_INIT_PARAMS:
        sink.add("G016", "error", f"{p}.lora.quantize_base",
                 f"QLoRA stage {st.name!r} of a {env.n_total / 1e9:.1f}B-parameter model on {env.world} GPUs: llmc's "
                 f"trainer builds a model over {META_INIT_PARAMS / 1e9:g}B parameters sharded on the meta device when "
                 "it runs on several GPUs, and quantises a base to NF4 from whole weights only (its codes are no "
                 "FSDP shards: every rank would hold them whole anyway); the stage would stop at its start",
                 "QLoRA runs such a model on one GPU (hardware.count: 1); on several, LoRA without quantize_base "
                 "(its base shards over the GPUs)")
    check_host_build(env, st, p, sink)
    par = env.run.parallelism
    if par.offload_optimizer and st.kind in CHAT_KINDS:
        what = "offload_optimizer" + (" and offload_params" if par.offload_params else "")
        sink.add("G013", "warning", p, f"parallelism.{what} does nothing for {st.kind} stage {st.name!r}: chat stages "
                 "(sft, dpo, grpo) run on llmc's native trainer, which keeps the weights, gradients and optimizer "
                 "states on the GPU (DeepSpeed's offload serves pre-training, midtrain and long_context only); the "
                 "stage is planned without it",
                 "to make it fit: LoRA or QLoRA (lora:), more GPUs (the stage shards its states over them), or a "
                 "shorter seq_len")
    # pre-training without a plan (its P error says why: P004 nothing fits, P005 a batch no layout splits, ...) has
    # only the data-parallel stand-in memory of _recompute_choice, one micro-step of the whole batch: no finding
    if mem.fits is False and not (st.kind == "pretrain" and env.plan is None):
        laid_out = mem.weights_bytes is None  # a searched parallelism plan's memory (pre-training's, a stage's
        # torchtitan layout): its per-GPU breakdown, the model states already split by its TP / PP / FSDP
        if laid_out:
            states = sum(mem.breakdown.get(k, 0) for k in ("weights", "grads", "optimizer"))
        else:
            states = state_bytes_per_gpu(mem.weights_bytes or 0, mem.reference_bytes or 0,
                                         mem.grads_optimizer_bytes or 0, mem.replicated_bytes, mem.shard_degree)
        per_step = mem.per_gpu_bytes - states  # activations, logits, buffers (and GRPO's sampling KV cache)
        step_text = (f"{gib(per_step)} of it is one micro-step at seq_len {tr.seq_len} (activations with "
                     f"{mem.activation_checkpointing} recomputation, logits, buffers)")
        if laid_out and per_step > states:
            hint = (f"{step_text}: recompute more (activation_checkpointing selective or full), a smaller "
                    "micro_batch, or tp / cp to split the sequence")
        elif laid_out:
            hint = (f"{gib(states)} of it is weights, gradients and optimizer states: shard them (dp_shard, "
                    "tp, pp) or more GPUs")
        elif per_step > states:
            hint = (f"{step_text}, which more GPUs do not split: stages other than pre-training run data parallel, "
                    "without TP, PP or CP; a shorter seq_len")
        else:
            hint = (f"{gib(states)} of it is weights, gradients and optimizer states: "
                    + _states_remedies(env, st, mem, per_step, tr.seq_len))
        # a stage that does not fit would stop at its first step, after the stages before it ran: an error, as
        # pre-training's P004; pre-training's own stage stays a warning (P004 reports it), and so does every stage
        # with the fit check off (planned anyway, with its predicted memory)
        refuse = env.fit_check and st.kind != "pretrain"
        usable = mem.usable_bytes or env.capacity or 0
        sink.add("G005", "error" if refuse else "warning", p,
                 f"stage {st.name!r} needs {gib(mem.per_gpu_bytes)} per GPU, more than the {gib(usable)} usable "
                 f"({100 * usable / (env.capacity or usable or 1):.0f}% of {gib(env.capacity or 0)})"
                 + ("" if refuse or st.kind == "pretrain" else " (fit check off: planned with this memory)"), hint)
    if st.kind != "pretrain" and st.init_from is None and st.init_hf is None:
        # llmc's trainers and the stage's torchtitan job then start from a fresh init (llmc.runtime.posttrain)
        sink.add("G008", "warning", p, f"{st.kind} stage {st.name!r} starts from randomly initialised weights: it has "
                 "neither init_from nor init_hf", "set init_hf to the base model's Hugging Face checkpoint (a folder or "
                 "hub id), or init_from to the stage before it")
    elif st.kind in PREFERENCE_KINDS and st.init_from is None and env.n_stages > 1:
        sink.add("G004", "info", p, f"{st.kind} stage {st.name!r} starts from the base model, not an SFT stage",
                 "preference/RL stages usually start from (and use as reference) the SFT model")


# ----------------------------------------------------------------------------- the planner


def _models(st: StageBase, kl_coef: float | None, precision: str, notes: list[str]) -> list[ModelInMemory]:
    """The models a stage holds: the policy, plus a frozen reference for DPO and for GRPO with KL > 0."""
    lora = st.lora
    qlora = lora is not None and lora.quantize_base == "nf4"
    out = [ModelInMemory("policy", True, "nf4 base + lora" if qlora else ("bf16 base + lora" if lora else precision))]
    if st.kind == "dpo" or (st.kind == "grpo" and (kl_coef or 0) > 0):
        out.append(ModelInMemory("reference", False, "shared base (adapters disabled)" if lora else "bf16 frozen copy"))
    if st.kind == "dpo":
        notes.append("DPO keeps 2 models (policy + frozen reference = the init_from model); "
                     "PPO-style RLHF would hold 4 (policy, reference, reward model, critic)")
    if st.kind == "grpo":
        notes.append("GRPO: policy + reference (only when KL > 0), no critic/value model "
                     "(PPO would need 4: policy, reference, reward, critic); the reward is a verifier")
    return out


def lora_notes(arch: Any, st: StageBase, p: str, trainable: int, notes: list[str], sink: Sink) -> None:
    """G023 for a LoRA stage whose targets name no linear of the model (its trainer would have nothing to train:
    "optimizer got an empty parameter list"); notes for an MLA model's attention, whose low-rank projections no
    target reaches (PEFT's ``all-linear`` would adapt them), and for an adapter the export writes no PEFT layout for
    (:func:`peft_layout_gap`)."""
    shown, left = model_linears(arch)
    if trainable == 0:
        sink.add("G023", "error", f"{p}.lora.targets", f"LoRA stage {st.name!r}: its targets "
                 f"{', '.join(st.lora.targets)} name no linear of this model, so nothing would train",
                 f"target the model's linears: {', '.join(shown)}"
                 + (f" ({', '.join(left)} take no adapter in llmc's trainer)" if left else ""))
        return
    if left:
        attn = [n for n in ("wq", "wo") if n in st.lora.targets and any(x.startswith(n + " ") for x in shown)]
        notes.append(f"LoRA on MLA attention adapts {', '.join(attn) or 'none of it'} only: {', '.join(left)} take "
                     "no adapter in llmc's trainer (PEFT's all-linear would adapt them too)")
    gap = peft_layout_gap(arch, st.lora.targets)
    if gap is not None:
        notes.append(f"LoRA: no PEFT adapter is exported for this model ({gap}); the merged model is exported")


def full_rank_matrix(arch: Any, rank: int, targets) -> tuple[str, int, int] | None:
    """(target, d_in, d_out) of the adapted matrix with the smallest min(d_in, d_out) when ``rank`` reaches it: a
    rank-r product B A (B d_out x r, A r x d_in) can express any update of a d_in x d_out matrix once r >=
    min(d_in, d_out), so the adapter is no low-rank update there (Hu et al. 2021, arXiv:2106.09685 sec. 4.1: r is
    chosen << min(d_in, d_out)), and it costs r (d_in + d_out) >= d_in d_out / 2 parameters, as much as training the
    matrix itself. None: the rank is below min(d_in, d_out) of every adapted matrix."""
    shapes = [(n, di, do) for n, di, do, c, _ in linear_shapes(arch) if n in targets and c]
    if not shapes:
        return None
    name, di, do = min(shapes, key=lambda x: min(x[1], x[2]))
    return (name, di, do) if rank >= min(di, do) else None


def check_lora_rank(arch: Any, st: StageBase, p: str, sink: Sink) -> None:
    """T106: a LoRA rank at or above min(d_in, d_out) of an adapted matrix (:func:`full_rank_matrix`) is an error
    that names the matrix and its shape; a rank outside :data:`LORA_RANK_RANGE` otherwise a warning."""
    r = st.lora.rank
    full = full_rank_matrix(arch, r, st.lora.targets)
    if full is not None:
        name, di, do = full
        hf = (MLA_HF_NAMES if arch.mla is not None and name in ("wq", "wo") else _HF_NAME)[name]
        k = min(di, do)
        sink.add("T106", "error", f"{p}.lora.rank",
                 f"LoRA rank {r:,} is not low-rank for {name} ({hf}: {di:,} -> {do:,}, a {do:,} x {di:,} weight): "
                 f"at rank {k:,} = min(d_in, d_out) its adapter B A can already express any update of the matrix, "
                 f"and it adds r x (d_in + d_out) = {r * (di + do):,} trainable parameters per matrix against its "
                 f"{di * do:,}",
                 f"r=16 is a common default; a rank below {k:,} (the smallest adapted matrix's min(d_in, d_out)), or "
                 "full fine-tuning (drop lora), which is cheaper than adapters of this rank")
    elif not (LORA_RANK_RANGE[0] <= r <= LORA_RANK_RANGE[1]):
        sink.add("T106", "warning", f"{p}.lora.rank", f"LoRA rank {r} outside the usual 4-64",
                 "r=16 is a common default")


def refuse_lm_lora(st: StageBase, p: str, sink: Sink) -> None:
    """G024: ``lora:`` on a stage trained with the next-token loss on packed text (pretrain, midtrain, long_context).
    None of llmc's trainers of those kinds applies LoRA: the native trainer (llmc.runtime.train builds the model
    without adapters), the DeepSpeed runner (llmc.runtime.ds_train) and the torchtitan job (its converters are the
    low-precision ones only) train every weight, and write no adapter; LoRA runs in llmc's post-training trainer
    (sft / dpo / grpo: llmc.runtime.posttrain.build_policy)."""
    what = "pre-training" if st.kind == "pretrain" else "continued-pretraining"
    hint = ("drop lora: pre-training trains every weight (LoRA adapts a trained model in an sft, dpo or grpo stage)"
            if st.kind == "pretrain" else
            "drop lora for a full continued pre-training (planned with every weight trainable and the full "
            "fine-tune's learning rate), or run the adaptation as an sft stage (LoRA on chat records)")
    sink.add("G024", "error", f"{p}.lora",
             f"{st.kind} stage {st.name!r} has lora:, but LoRA is not run by llmc's {what} trainers (native, "
             "DeepSpeed or torchtitan): they would train every weight of the model, and write no adapter (this "
             "plan counts that full training)", hint)


def _lora_plan(st: StageBase) -> LoraPlan | None:
    lo = st.lora
    if lo is None:
        return None
    return LoraPlan(rank=lo.rank, alpha=lo.alpha, scaling=lo.alpha / lo.rank, dropout=lo.dropout,
                    targets=list(lo.targets), quantize_base=lo.quantize_base, merge_after=True)


def _template_note(name: str, chosen: bool, specials: set[str] | None, own: bool) -> str:
    """The stage note saying which chat template a chat stage trains on, and why (:func:`default_chat_template`)."""
    what = "the tokenizer's own" if name == OWN_TEMPLATE else name
    why = default_chat_template(specials, own)[1] if chosen else "named in the spec"
    return f"chat template: {what} ({why})"


#: what a chat stage's record is called, and the rows it runs as (llmc.runtime.sft / dpo / grpo: one padded row per
#: conversation; a pair's chosen and rejected responses, each after its prompt; a prompt's group of completions)
EXAMPLE_UNITS = {"sft": "conversations", "dpo": "pairs", "grpo": "prompts"}


def stage_examples(kind: str, tr: StageTraining) -> StageExamples | None:
    """What a step of a chat stage reads (:class:`StageExamples`), as its trainer draws it: SFT and DPO take the
    plan's ``global_batch_seqs`` = global_batch_tokens / seq_len records per step (``llmc.runtime.posttrain.run_stage``
    passes it as the loops' batch_size), one row each for SFT, two for DPO (chosen and rejected,
    ``llmc.runtime.dpo.train_dpo``); GRPO takes ``prompts_per_step`` prompts, each sampled ``group_size`` times
    (``llmc.runtime.grpo.train_grpo``). None for the other kinds (their documents are packed into full rows)."""
    unit = EXAMPLE_UNITS.get(kind)
    if unit is None or not tr.global_batch_seqs:
        return None
    if kind == "grpo":
        per_step, rows = int(tr.hyper["prompts_per_step"]), int(tr.hyper["group_size"])
    else:
        per_step, rows = int(tr.global_batch_seqs), 2 if kind == "dpo" else 1
    return StageExamples(unit=unit, per_step=per_step, rows_per_record=rows, rows_per_step=per_step * rows,
                         row_tokens=tr.seq_len, total=tr.steps * per_step if tr.steps else None,
                         max_row_tokens=float(tr.steps * per_step * rows * tr.seq_len) if tr.steps else None)


def examples_note(kind: str, tr: StageTraining, ex: StageExamples) -> str:
    """The stage note saying what a chat stage's step reads and what its ``tokens`` means (:func:`stage_examples`)."""
    if kind == "grpo":
        h = tr.hyper
        step = (f"a step: {ex.per_step:,} prompts x {ex.rows_per_record} completions = {ex.rows_per_step:,} rows of up "
                f"to {ex.row_tokens:,} tokens (max_prompt_tokens {h['max_prompt_tokens']:,} + max_new_tokens "
                f"{h['max_new_tokens']:,})")
        read = ("steps x global_batch_tokens: an upper bound on the tokens trained (prompts are shorter and completions "
                "stop at their end token; the launch says the epochs of the prompts, R013)")
    elif kind == "dpo":
        step = (f"a step: {ex.per_step:,} pairs (global_batch_tokens {tr.global_batch_tokens:,} / seq_len "
                f"{tr.seq_len:,}; each 2 rows, chosen and rejected, padded, not packed)")
        read = ("pairs x seq_len, a pair counted as one full row: per row, an upper bound on the tokens trained "
                "(shorter pairs train fewer; the launch measures them, R013)")
    else:
        step = (f"a step: {ex.per_step:,} conversations (global_batch_tokens {tr.global_batch_tokens:,} / seq_len "
                f"{tr.seq_len:,}; one per row, padded, not packed)")
        read = ("rows x seq_len: an upper bound on the tokens trained (shorter conversations train fewer; the launch "
                "measures them, R013)")
    if ex.total is None:
        return step
    return (f"{step}; {tr.steps:,} steps read {ex.total:,} {ex.unit}; tokens "
            f"{tr.tokens or tr.steps * tr.global_batch_tokens:,.0f} is read as {read}")


def plan_stage(env: _Env, st: StageBase, i: int, order: int, inherited: dict, sink: Sink) -> tuple[StagePlan, dict]:
    """One stage's plan and the context it hands on to stages that ``init_from`` it."""
    p = f"stages.{i}"
    notes: list[str] = []
    if st.lora is not None and st.kind in LM_KINDS:
        refuse_lm_lora(st, p, sink)
        st = st.model_copy(update={"lora": None})  # planned as what its trainer runs: every weight trained
    tok = tokenizer_for(env.run, st)
    specials = tokenizer_specials(env.run, tok, env.facts)[0] if st.kind in CHAT_KINDS else None
    own = st.kind in CHAT_KINDS and bool(tokenizer_has_template(tok, env.facts))
    tr = resolve_stage_training(env.run, st, env.hyper, env.plan, inherited["seq_len"], specials, own)
    if st.kind in CHAT_KINDS:
        notes.append(_template_note(tr.hyper["chat_template"], "chat_template" in tr.defaults, specials, own))
        if env.run.training.optimizer.weight_decay != POSTTRAIN_WEIGHT_DECAY:
            notes.append(f"AdamW without weight decay (TRL's default), not training.optimizer.weight_decay "
                         f"{env.run.training.optimizer.weight_decay:g}, which pre-training and continued training use")
    examples = stage_examples(st.kind, tr)
    if examples is not None:
        notes.append(examples_note(st.kind, tr, examples))
    arch = env.run.model
    trainable = lora_trainable_params(arch, st.lora.rank, st.lora.targets) if st.lora else env.n_total
    if st.lora is not None:
        lora_notes(arch, st, p, trainable, notes, sink)
    models = _models(st, tr.hyper.get("kl_coef"), env.precision, notes)
    needs_ref = len(models) > 1
    layout = None
    if st.kind in CONTINUED_KINDS and env.stage_search is not None and tr.global_batch_seqs:
        layout = env.stage_search(tr.seq_len, tr.global_batch_seqs)
    if st.kind == "pretrain" and env.searched_memory is not None and env.plan is not None:
        mem = _searched_stage_memory(env)
        rollout, stime = None, stage_time(env, st, tr, mem, st.lora is not None, needs_ref, None)
    elif layout is not None:
        tr = replace(tr, micro_batch=layout.plan.micro_batch, grad_accum=layout.plan.grad_accum)
        mem, rollout, stime = _layout_memory(layout), None, _layout_time(env, st, tr, layout)
        notes.append(f"runs as its own torchtitan job on its searched layout: {layout.why}")
    else:
        mem, rollout, stime = _recompute_choice(env, st, tr, trainable, needs_ref, notes)
    if stime is not None:  # the interval its checkpoint saves were timed at (stage_checkpoints)
        tr = replace(tr, checkpoint_interval=stage_checkpoint_interval(env, st, tr, stime.step_seconds))
    if stime is not None and stime.sampling_seconds > SAMPLING_WARN_SHARE * stime.step_seconds:
        sink.add("T108", "warning", f"{p}.max_new_tokens",
                 f"GRPO sampling is {stime.sampling_seconds / stime.step_seconds:.0%} of the predicted step of stage "
                 f"{st.name!r} ({stime.sampling_seconds:,.0f} of {stime.step_seconds:,.0f} s): each new token is a "
                 "forward of one position that reads (and, sharded, gathers) every weight",
                 "fewer max_new_tokens; more prompts_per_step per GPU (a rank's groups share each decoding forward "
                 "as far as their KV caches fit); or a policy that is not sharded, LoRA or states that fit one GPU: "
                 "then no decoding forward gathers weights")
    lc = long_context_plan(env, st, tr.seq_len, inherited, notes, layout) if st.kind == "long_context" else None
    out_ctx = _context_out(env, st, p, tr.seq_len, inherited, sink)
    check_stage(env, st, p, tr, mem, sink)
    plan = StagePlan(
        **{f.name: getattr(tr, f.name) for f in fields(StageTraining)},
        name=st.name, kind=st.kind, init_from=st.init_from, init_hf=st.init_hf, order=order,
        models_in_memory=models, n_models=len(models), params_total=env.n_total, trainable_params=trainable,
        trainable_fraction=trainable / env.n_total if env.n_total else 0.0, lora=_lora_plan(st), memory=mem,
        rollout=rollout, long_context=lc,
        context=ContextPlan(max_context=out_ctx["max_context"], rope_theta=out_ctx["rope_theta"],
                            rope_scaling=out_ctx["rope_scaling"]),
        notes=notes, time=stime, layout=layout.plan if layout is not None else None,
        max_position_embeddings=max(env.run.model.max_seq_len, tr.seq_len, out_ctx["max_context"]),
        examples=examples,
    )
    return plan, out_ctx


_LAYOUT_SOURCE = "the stage's searched parallelism plan (its torchtitan job)"


def _layout_memory(layout: StageLayout) -> StageMemoryPlan:
    """A stage's memory from its searched layout (the figure its search fit-checked, as pre-training's)."""
    mem, plan = layout.memory, layout.plan
    return StageMemoryPlan(
        per_gpu_bytes=mem.per_gpu_bytes, capacity_bytes=mem.capacity_bytes,
        fits=memory.fits(mem), usable_bytes=int(usable_bytes(mem.capacity_bytes, mem.backend)),
        shard_degree=plan.dp_shard, cp=plan.cp,
        activation_checkpointing=plan.activation_checkpointing, source=_LAYOUT_SOURCE,
        breakdown=dict(mem.breakdown),
    )


def _layout_time(env: _Env, st: StageBase, tr: StageTraining, layout: StageLayout) -> StageTimePlan | None:
    """A stage's time from its searched layout's step (llmc's time model for the torchtitan job), with its checkpoint
    saves (:func:`stage_checkpoints`)."""
    gpu = env.gpu
    if gpu is None:
        return None
    step = layout.step_seconds
    sm = timing.step_model(env.run.model, tr.seq_len, env.precision, gpu, "torchtitan")
    ck = stage_checkpoints(env, st, tr, layout.plan, sm, "torchtitan", step)
    days = (step * tr.steps + ck.seconds) / 86400.0 if tr.steps and ck is not None else None
    gh = timing.gpu_hours(days, env.world) if days is not None else None
    price = gpu.usd_per_hour
    return StageTimePlan(
        backend="torchtitan", step_seconds=step, train_pass_seconds=step, forward_passes=0, updates=1,
        tokens_per_second=tr.global_batch_seqs * tr.seq_len / step, days=days, gpu_hours=gh,
        usd=timing.usd(gh, price) if gh is not None and price else None, sampling_seconds=0.0, checkpoint=ck,
        source=f"llmc.compiler.timing on the stage's searched layout ({describe(layout.plan)}) on torchtitan",
    )


def _recompute_choice(env: _Env, st: StageBase, tr: StageTraining, trainable: int, needs_ref: bool,
                      notes: list[str]) -> tuple[StageMemoryPlan, RolloutPlan | None, StageTimePlan | None]:
    """(memory, GRPO rollout, time) of the stage's recomputation option (:func:`recompute_options`) with the shortest
    predicted step among those that fit the GPU with the search's fragmentation margin (``USABLE_FRACTION``; without
    a time model: the least recomputation that fits); none fits: the one with the least memory (G005 says by how
    much when that does not fit the whole GPU either). Its notes are added to ``notes``."""
    usable = USABLE_FRACTION * (env.capacity or DEFAULT_CAPACITY)
    lora = st.lora is not None
    tried = []
    for ac, chunk in recompute_options(env, st, tr):
        own: list[str] = []
        mem = stage_memory(env, st, tr, trainable, needs_ref, own, ac, chunk)
        rollout = rollout_plan(env, tr, lora, needs_ref, mem) if st.kind == "grpo" else None
        tried.append((mem, rollout, stage_time(env, st, tr, mem, lora, needs_ref, rollout), own))
    fit = [t for t in tried if t[0].per_gpu_bytes <= usable]
    timed = bool(fit) and all(t[2] is not None for t in fit)
    if not fit:
        mem, rollout, stime, own = min(tried, key=lambda t: t[0].per_gpu_bytes)
    else:  # the first of equals: less recomputed
        mem, rollout, stime, own = min(fit, key=lambda t: t[2].step_seconds) if timed else fit[0]
    if mem.loss_chunk_tokens:
        # the trainer computes the loss in slices (llmc.runtime.model.token_losses): against the same AC with the
        # whole logits (an option tried above), one slice's logits are alive instead of the micro-step's
        whole = next((t[0] for t in tried if t[0].activation_checkpointing == mem.activation_checkpointing
                      and not t[0].loss_chunk_tokens), None)
        saved = f": {gib(whole.buffer_bytes - mem.buffer_bytes)} of logits less per GPU" if whole else ""
        own.append(f"loss in slices of {mem.loss_chunk_tokens} tokens, the output head run again in the backward{saved}")
    if timed and len(tried) > 1:
        own.append(f"recomputation: AC {mem.activation_checkpointing}"
                   f"{', loss in slices' if mem.loss_chunk_tokens else ''}, the fastest predicted of the "
                   f"{len(fit)} of {len(tried)} options that fit in {USABLE_FRACTION:.0%} of the GPU")
    notes.extend(own)
    return mem, rollout, stime


def _base_context(run: RunSpec, seq_len: int) -> dict:
    arch = run.model
    return {"seq_len": seq_len,
            "max_context": max(arch.max_seq_len, seq_len) if arch.rope_scaling else arch.max_seq_len,
            "rope_theta": arch.rope_theta,
            "rope_scaling": arch.rope_scaling.model_dump(mode="json") if arch.rope_scaling else None,
            "vocab_size": arch.vocab_size, "tokenizer": run.data.tokenizer.path}


def plan_stages(run: RunSpec, gpu: GPU | None = None, lines: dict | None = None, file: str | None = None,
                hyper: Hyper | None = None, plan: ParallelPlan | None = None,
                searched_memory: MemoryNumbers | None = None, facts: ExternalFacts | None = None,
                backend: str | None = None, stage_search: Callable[[int, int], StageLayout | None] | None = None,
                fit_check: bool = True) -> tuple[list[StagePlan], list[Diagnostic]]:
    """Check the stage graph and plan every stage; returns (plans in topological order, diagnostics).

    hyper / plan / searched_memory: the pre-training run's resolved hyperparameters, searched layout and
    its memory (``compile_spec`` passes them; ``hyper`` is resolved here without a step time otherwise).
    The ``pretrain`` stage takes its numbers from them. facts: tokenizer contents (``gather_facts``).
    fit_check: a stage other than pre-training that does not fit the GPU is an error (G005), as pre-training's P004;
    False (``--no-fit-check``): a warning, the stage planned with its predicted memory.
    """
    sink = Sink(lines, file)
    stages = resolved_stages(run)
    idx, order = stage_order(stages, sink)
    if run.stages and run.training.init_hf is not None:
        sink.add("G007", "error", "training.init_hf", "training.init_hf is read only by a run without `stages:`; "
                 "with stages each starts from its own init_hf or init_from, so this checkpoint would not be loaded",
                 "move it to the stage that starts from it: stages[i].init_hf")
    quantized = facts.checkpoint_quantization if facts is not None else {}
    starts = [(f"stages.{i}.init_hf", s.init_hf) for i, s in enumerate(run.stages)] if run.stages else [
        ("training.init_hf", run.training.init_hf)]
    checkpoints = facts.checkpoints if facts is not None else {}
    for where, src in starts:
        if src is not None and src in checkpoints:
            check_start(run, where, src, checkpoints[src], sink)
        if src is not None and src in quantized:  # llmc.runtime.hf_io.load_hf_into refuses them, as torchtitan's
            # state-dict adapters do: they map plain `weight` tensors only
            sink.add("G018", "error", where, f"{src} holds quantized weights ({quantized[src]}, its config.json's "
                     "quantization_config), which no llmc trainer reads: the run would stop when it loads them",
                     "start from the model's bf16 / fp32 release; for QLoRA, lora.quantize_base: nf4 quantizes that "
                     "base itself")
    check_tokenizer_sizes(run, facts, sink)
    arch = run.model
    env = _Env(run=run, hyper=hyper or defaults_mod.pretrain_hyper(run, gpu), plan=plan, searched_memory=searched_memory,
               facts=facts, capacity=gpu.hbm_bytes if gpu is not None else None,
               n_total=params.params_total(arch), n_active=params.params_active(arch),
               n_emb=params.params_embedding(arch), kv_bytes=params.kv_bytes_per_token(arch), n_stages=len(stages),
               gpu=gpu, backend=backend, stage_search=stage_search, fit_check=fit_check)
    base = _base_context(run, run.data.seq_len)
    ctx: dict[str, dict] = {}
    plans: list[StagePlan] = []
    for order_i, name in enumerate(order):
        st = stages[idx[name]]
        inherited = dict(ctx.get(st.init_from) or base) if st.init_from else dict(base)
        sp, ctx[name] = plan_stage(env, st, idx[name], order_i, inherited, sink)
        plans.append(sp)
    return plans, sink.items


__all__ = ["plan_stages", "plan_stage", "check_start", "check_tokenizer_sizes", "lora_notes",
           "model_linears", "peft_layout_gap", "MLA_HF_NAMES", "resolve_stage_training", "stage_order", "resolved_stages",
           "lora_trainable_params", "linear_shapes", "tokenizer_for", "tokenizer_specials", "tokenizer_has_template",
           "StageTraining",
           "TEMPLATE_TOKENS", "NF4_BITS_PER_PARAM"]
