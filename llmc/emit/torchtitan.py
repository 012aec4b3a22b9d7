"""The torchtitan 0.3.0 target: a Python job module plus torchrun / Slurm launch scripts.

torchtitan 0.3.0 has no TOML config any more: a job is a zero-argument Python function returning
``torchtitan.trainer.Trainer.Config``, selected with ``--module <module> --config <function>``
(torchtitan/config/manager.py ``ConfigManager._load_config``). We emit ``torchtitan/llmc_job.py``
defining ``job()``; every number in it is computed here (pure Python, no torch) and handed to the
Jinja2 template as a Python literal (``repr``), so the template has no arithmetic.

Model families (checked against the installed torchtitan 0.3.0 source):

- dense GQA decoder -> ``torchtitan.models.llama3`` (``Llama3Model`` + ``Llama3TransformerBlock``,
  layer configs from the public ``make_gqa_config`` / ``make_ffn_config`` helpers, so any
  ``head_dim`` / ``d_ff`` works, not only the registry flavors);
- GQA + MoE -> ``torchtitan.models.qwen3`` (``Qwen3Model`` is the only 0.3.0 decoder whose block takes GQA
  attention *and* an MoE): Qwen3-MoE with its q/k norms (torchtitan's own 30B-A3B / 235B-A22B flavors),
  Mixtral-style without them;
- MLA (+ MoE) (DeepSeek-V2/V3-style) -> ``torchtitan.models.deepseek_v3``
  (``build_mla_moe_layers``).

The scripts (``run_single_node.sh``, ``run_multi_node.sh`` on every node, ``slurm.sbatch`` through it) first run
llmc's prepare step (``python -m llmc.runtime.entry prepare --assets $LLMC_RUN_DIR``: the tokenizer and data the job
reads), as every llmc launcher does; on several nodes one prepares under the claim ``launch/_claim.sh.j2`` describes
and the others wait for it. ``PREPARE=0`` skips it.

torchtitan 0.3.0 has no llama4 package. What a model family cannot express is reported as an
error diagnostic (X3xx) instead of emitting a wrong module.

Starting from a Hugging Face checkpoint (``init_hf``): ``CheckpointManager.Config(initial_load_path=<dir>,
initial_load_in_hf=True, initial_load_model_only=True)`` (torchtitan/components/checkpointer/base.py), read
through the family's state-dict adapter. torchtitan 0.3.0's ``Llama3StateDictAdapter`` and
``Qwen3StateDictAdapter`` map no q/k/v bias (``to_hf`` skips unmapped keys, so the biases would silently
stay at their zero init); a q/k/v-bias model (Qwen2/2.5) therefore gets no adapter and ``init_hf`` on it,
or on a family without an adapter (Mixtral), is an error (X310). Qwen3 and Qwen3-MoE jobs use torchtitan's
``CosSinRoPE`` (HF's rotate_half order, as its own qwen3 flavours; ``Qwen3StateDictAdapter.from_hf`` checks it),
so their q/k rows and q/k norm weights are in HF's order in the job and its checkpoints (llmc's export of such a
checkpoint permutes them back into llmc's pair order: ``llmc.runtime.hf_io.titan_state_to_llmc``).

Diagnostics (errors unless noted):
    X300 no plan             X301 RoPE scaling        X302 MLA with qkv bias     X303 tying with PP
    X304 tp | heads          X305 seq_len > RoPE      X306 seq_len % (tp*2cp)    X307 batch identity
    X308 PP stages/schedule  X309 router bias         X310 init_hf without an adapter that keeps every weight
    X311 fp8 recipe          X312 partial activation checkpointing without ac_layers >= 1
    X313 seq_len / cp not divisible by the chunked loss's chunks
    X314 muP multipliers (Granite)  X315 sliding-window attention (Mistral v0.1, Phi-3)
    X316 layers without RoPE (SmolLM3's NoPE layers)  X317 OLMo 2's block (post-norms, projection q/k norms)
    X318 Gemma's block (sandwich norms with 1 + weight, GeGLU, scaled embeddings; Gemma 2's soft-capping)
    X319 expert groups scored by their best expert (DeepSeek-V2's group_limited_greedy)
    X320 gpt-oss's block (attention sinks, o_proj and expert biases, clamped SwiGLU): torchtitan's gpt_oss not emitted

Run records: the job's ``LlmcMetricsProcessor`` writes llmc's ``metrics.jsonl`` (the records of llmc's own trainers,
from torchtitan's logged figures; MFU against the plan's peak, ``_mfu_peak``) and TensorBoard into the stage's run
folder, ``<run dir>/run/<stage>``, where ``llmc report`` and ``llmc calibrate`` read them; its ``LlmcValidator``
validates when llmc's trainers do (every ``every_steps`` and the last step, what the plan counts; torchtitan's own
rule adds step 1); its ``LlmcCheckpointManager`` keeps ``keep_latest`` checkpoints after the last-step and preemption
saves too (torchtitan 0.3.0 purges only after an interval save).

Activation checkpointing: the plan's ``selective`` / ``full`` / ``none`` are torchtitan's ``SelectiveAC`` /
``FullAC`` / ``None``. ``partial`` (``ac_layers`` = K) has no torchtitan 0.3.0 policy (``FullAC`` wraps every block,
torchtitan/distributed/activation_checkpoint.py): the job defines ``PartialFullAC``, a ``FullAC`` whose ``apply``
wraps only the first K blocks of ``model.layers`` of each model chunk (torchtitan applies the policy per pipeline
chunk, distributed/pipeline_parallel.py ``pipeline_llm``), Megatron-LM's ``--recompute-method block
--recompute-num-layers K``. Its Config subclasses ``FullAC.Config``, so torchtitan's tyro parsing keeps it (as the
``activation-checkpoint:full`` choice) and the trainer's checks take it as full AC.
"""

from __future__ import annotations

import ast
import math
import os
import posixpath
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llmc import TARGET_VERSIONS
from llmc.compiler.backends import (
    compile_on,
    converted_parts,
    fp8_converted_parts,
    fp8_expert_align,
    fp8_recipe_on,
    get_backend,
    nvfp4_converted_layers,
    torchtitan_keep_latest_gap,
    torchtitan_layout_problem,
    torchtitan_model_gaps,
    torchtitan_reads_hf,
    torchtitan_seq_gaps,
)
from llmc.compiler.checkpoint_cost import PREEMPT_SAFETY
from llmc.compiler.checks import mixture_shares
from llmc.compiler.memory import SINGLE_STAGE_SCHEDULES, even_parts, pipeline_chunks
from llmc.compiler.result import Hyper
from llmc.compiler.timing import mfu_peak
from llmc.diagnostics import Diagnostic, SpecError
from llmc.emit.base import Emitter
from llmc.emit.common import (
    RDZV_PORT,
    diag,
    gpus_per_node,
    jinja_env,
    launcher_context,
    nvlink_hint,
    spec_named,
)
from llmc.escape import visible
from llmc.rope import rope_attention_factor
from llmc.runtime.capabilities import (
    TITAN_PRETRAIN_MODULE,
    TITAN_STAGE_KINDS,
    titan_dump_subdir,
    titan_stage_module,
)
from llmc.runtime.runlock import EXIT_PREEMPTED  # torch-free: the exit status of a preempted stage
from llmc.runtime.software import RECORDED
from llmc.sources import mixture_parts, validation_file_format
from llmc.spec.families import FUSED_HF_MODEL_TYPES, family_of
from llmc.spec.model import RopeScaling
from llmc.spec.schema import TEXT_SOURCE_KINDS
from llmc.weight_init import DEPTH_SCALINGS

TORCHTITAN_VERSION = TARGET_VERSIONS["torchtitan"]
TORCH_VERSION = TARGET_VERSIONS["torch"]
MODULE_NAME = TITAN_PRETRAIN_MODULE
CONFIG_FN = "job"
OUT_DIR = "torchtitan"

# torchtitan default for aux-loss-free MoE load balancing (bias update speed gamma, DeepSeek-V3
# paper sec. 2.1.2 uses 0.001; torchtitan MoE.Config.load_balance_coeff default 1e-3).
LOAD_BALANCE_COEFF = 1e-3

# llmc heuristic (not a published figure): torchtitan's CommConfig defaults (300 s init, 100 s
# train) are tuned for single/few-node jobs; NCCL communicator set-up and the first step of a
# job spanning many nodes take longer, so the init timeout grows with the node count.
COMM_INIT_TIMEOUT_S = 300
COMM_INIT_TIMEOUT_LARGE_S = 1800
COMM_LARGE_WORLD = 1024
# The train timeout (NCCL's watchdog after the first step) must outlast the longest synchronous checkpoint save:
# ranks that finish writing their share early wait in the save's closing collective for the slowest. Every job has
# one, asynchronous or not: torchtitan 0.3.0 writes its last-step save with ``AsyncMode.DISABLED``
# (components/checkpointer/dcp.py ``_save_last_step``, reached for ``last_step=True``), and the job's preemption save
# is such a forced last-step save, after waiting for an asynchronous save in flight (``maybe_wait_for_saving``). So
# the timeout is the larger of COMM_TRAIN_TIMEOUT_CKPT_S (llmc's fixed headroom for synchronous saves; torchtitan's
# default is 100 s) and COMM_TRAIN_TIMEOUT_SAVE_MARGIN x the job's predicted preemption save (the plan's
# ``CheckpointNumbers.preempt_seconds``: an in-flight save waited for + the current step written), rounded up to 10 s.
COMM_TRAIN_TIMEOUT_CKPT_S = 600
# the storage figure behind the predicted save is a per-node average that contention (other jobs, every node writing
# at once) can halve: the margin of the launchers' shutdown time (checkpoint_cost.PREEMPT_SAFETY), not fitted
COMM_TRAIN_TIMEOUT_SAVE_MARGIN = PREEMPT_SAFETY


# Parameters AdamW does not decay under each rule of the spec's ``training.optimizer.no_decay``, matched with re.search
# on torchtitan's FQNs (ParamGroupConfig, first match wins, before the ``.*`` group that decays the rest): RMSNorm gains
# (attention_norm, ffn_norm, norm, MLA q_norm / kv_norm), biases, the MoE expert bias and, under the default rule, the
# token embeddings; "none": no such group (torchtitan 0.3.0's ``default_adamw``, one ``.*`` group). The same rules as
# llmc.runtime.model.NO_DECAY_PATTERNS / param_groups (tested equal, on torchtitan's own grouping), kept here as
# literals so the emitter does not import torch.
NO_WD_PATTERNS: dict[str, str | None] = {
    "embeddings_and_1d": r"(norm\.weight|\.bias|expert_bias|tok_embeddings\.weight)$",
    "1d": r"(norm\.weight|\.bias|expert_bias)$",
    "none": None,
}
# the default rule's pattern (the name earlier llmc used)
NO_WD_PATTERN = NO_WD_PATTERNS["embeddings_and_1d"]
# what the job's comment says of each rule, with its source (the spec field's docstring, llmc/spec/schema.py)
NO_WD_RULES = {
    "embeddings_and_1d": ("no weight decay on norm gains, biases, the MoE expert bias and the token embeddings "
                          "(llmc's default; OLMo 2, arXiv:2501.00656)"),
    "1d": ("no weight decay on norm gains, biases and the MoE expert bias; the token embeddings decayed "
           "(Megatron-LM's default no_weight_decay_cond, nanoGPT)"),
    "none": "every parameter decayed, one group (torchtitan's default_adamw)",
}

# Families whose torchtitan 0.3.0 state-dict adapter converts every weight of the model llmc emits.
HF_ADAPTERS = {"llama3": "Llama3StateDictAdapter", "deepseek_v3": "DeepSeekV3StateDictAdapter",
               "qwen3": "Qwen3StateDictAdapter", "qwen3_moe": "Qwen3StateDictAdapter"}


@dataclass
class TitanValues:
    """Every value the template needs, already computed (no arithmetic in the template)."""

    ctx: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # deviations recorded in the header



def _spec_hash_text(compiled) -> str:
    """The spec's hash as the job's headers give it: the spec file's own sha256, and with ``--set`` overrides how many
    the build added (their text is in plan.lock.json ``spec.overrides`` and the build README, not in a comment here)
    and the hash of the file plus them (the lock's ``spec.sha256``)."""
    if not compiled.overrides:
        return compiled.spec_sha256
    n = len(compiled.overrides)
    return (f"{compiled.spec_file_sha256 or 'unknown'} (the file) + {n} --set override{'s' if n > 1 else ''} "
            f"(plan.lock.json spec.overrides) = {compiled.spec_sha256}")

def _family(arch) -> str:
    """The torchtitan model the job builds (``llmc.spec.families``: its ``torchtitan_module``); the MoE
    build of torchtitan's qwen3 module is the template's ``qwen3_moe`` branch, the dense one (Qwen3's q/k norms)
    its ``qwen3`` branch."""
    module = family_of(arch).torchtitan_module
    return "qwen3_moe" if module == "qwen3" and arch.moe is not None else module


def _rope(arch) -> dict[str, Any]:
    """The job's RoPE settings (what it cannot express is a model gap: llmc.compiler.backends.torchtitan_model_gaps)."""
    rs = arch.rope_scaling
    rope_dim = arch.mla.qk_rope_head_dim if arch.mla is not None else arch.hd
    out: dict[str, Any] = {
        "dim": rope_dim,
        "max_seq_len": arch.max_seq_len,
        "theta": float(arch.rope_theta),
        "scaling": "none",
    }
    if rs is None:
        return out
    if rs.type == "llama3":
        out.update(
            scaling="llama",
            scaling_factor=float(rs.factor),
            low_freq_factor=float(rs.low_freq_factor),
            high_freq_factor=float(rs.high_freq_factor),
            original_max_position_embeddings=int(rs.original_max_position),
        )
    elif rs.type == "yarn":
        out.update(
            scaling="yarn",
            rope_factor=float(rs.factor),
            beta_fast=float(rs.beta_fast),
            beta_slow=float(rs.beta_slow),
            original_seq_len=int(rs.original_max_position),
        )
        factor = rope_attention_factor(rs)
        if rs.factor > 1 and factor != 1.0:  # torchtitan's rotation is pure: the job's TemperedRoPE scales its cache
            out["attention_factor"] = float(factor)
    return out


def _from_build(compiled, path: str | None) -> str | None:
    """A spec path as the job reads it: absolute or ``~`` (kept: the job expands it on the machine it runs on, as
    llmc's runtime does, never with the home of the machine that built it), else relative to the spec's folder,
    which ``llmc build`` records relative to the build directory (the job joins it with its build directory)."""
    if path is None:
        return None
    if path.startswith("~") or os.path.isabs(path):
        return path
    return posixpath.normpath(posixpath.join(compiled.spec_folder(), path))


def _data_sources(compiled) -> list[dict[str, Any]]:
    """The pre-training text sources as the job streams them, in spec order: where they lie (``under``
    "build"), or for ``builtin`` corpora and ``data.quality``'s cleaned parts, what ``prepare`` writes under
    the data dir (``under`` "data"); weights normalised (torchtitan's interleaved loader's token ratios) and
    ``val_parts``, each source's integer share of the validation set (llmc.sources.mixture_parts of the spec's
    weights: the numbers llmc's validation computes, so both take the same documents)."""
    spec = compiled.spec
    srcs = [s for s in spec.data.sources if s.kind in TEXT_SOURCE_KINDS]
    out = []
    parts = mixture_parts([s.weight for s in srcs]) if srcs else []
    for s, share, part in zip(srcs, mixture_shares(srcs), parts, strict=True):
        if spec.data.quality is not None:  # llmc.runtime.quality_prepare: data/quality/<name>/part-*.jsonl
            fmt, path, under, field = "jsonl", f"quality/{s.name}", "data", "text"
        elif s.format == "builtin":  # llmc.runtime.corpus, written by prepare
            fmt, path, under, field = "jsonl", f"{s.name}.jsonl", "data", "text"
        else:
            fmt, path, under, field = s.format, _from_build(compiled, s.path), "build", s.text_field
        out.append({"name": s.name, "format": fmt, "path": path, "under": under, "text_field": field,
                    "weight": share, "val_parts": part})
    return out


def _validation(compiled) -> dict | None:
    """torchtitan 0.3.0 ``Validator.Config`` values (torchtitan/components/validate.py): every
    ``every_steps`` steps, ``max_batches`` global batches (``max_batches x grad_accum`` batches of ``micro_batch``
    windows per rank: the same windows on every layout), over the held-out
    documents of every text source (``fraction``, ``seed``: llmc.runtime.validation's split) or the spec's
    own validation files (``files``, read like the sources). The job's validation loader takes the documents
    llmc.runtime.validation's set takes, in its mixture order, and packs them as the job trains (torchtitan's
    HuggingFaceTextDataset: BOS + document + EOS, positions per document), the same number of windows dealt to
    ranks as llmc deals its own: torchtitan's validation loss is its model's on its own format (``val_format``
    "torchtitan-documents"), comparable across torchtitan runs, not with llmc's ``llmc-packed`` loss."""
    spec = compiled.spec
    v = spec.eval.validation if spec.eval is not None else None
    if v is None:
        return None
    files = [_from_build(compiled, f) for f in v.files] if v.files else None
    return {"freq": v.every_steps, "steps": v.max_batches * compiled.plan.grad_accum,
            "micro_batch": compiled.plan.micro_batch, "grad_accum": compiled.plan.grad_accum,
            "fraction": None if files else v.fraction, "seed": v.seed, "files": files,
            "file_formats": [validation_file_format(f) or "jsonl" for f in files] if files else None}


def _pp_module_fqns(n_layers: int, n_stages: int) -> list[list[str]]:
    """Explicit stage split, the memory model's (``memory.even_parts``): layers spread evenly, remainder to
    the middle stages first; the first stage also holds the embedding and the last the final norm + output
    head, alone when there are more stages than layers."""
    counts = even_parts(n_layers, n_stages)
    parts, layer = [], 0
    for s, c in enumerate(counts):
        mods = ["tok_embeddings"] if s == 0 else []
        mods += [f"layers.{layer + i}" for i in range(c)]
        layer += c
        if s == n_stages - 1:
            mods += ["norm", "lm_head"]
        parts.append(mods)
    return parts


def _arch_checks(compiled, family: str, errs: list[Diagnostic], notes: list[str]) -> None:
    """What torchtitan 0.3.0 cannot express about this architecture and plan (errors) or drops (notes)."""
    arch, plan, seq_len = compiled.spec.model, compiled.plan, compiled.hyper.seq_len
    if arch.mla is not None and arch.moe is None:
        notes.append("MLA without MoE: deepseek_v3 layers with every layer dense")
    if plan.tp > 1 and arch.mla is None and (arch.n_heads % plan.tp or arch.kv_heads % plan.tp):
        errs.append(diag(
            "X304", "error", "parallelism.tp",
            f"tensor_parallel_degree {plan.tp} must divide n_heads {arch.n_heads} and n_kv_heads {arch.kv_heads} "
            "(torchtitan Decoder.Config.update_from_config)",
        ))
    # X305 (seq_len past max_seq_len), X306 / X313 (a sequence the layout's tp x cp and the chunked loss cannot
    # split): the compiler's rules, which keep `auto` and the search off such plans
    gpu = compiled.spec.hardware.gpu != "cpu"
    for g in torchtitan_seq_gaps(arch, seq_len, gpu):
        if g.code == "X305":
            errs.append(diag(g.code, "error", g.path, g.message, g.hint))
    align = fp8_expert_align(get_backend("torchtitan"), arch, compiled.spec.training.precision,
                             compiled.spec.training.fp8_recipe)
    problem = torchtitan_layout_problem(arch, seq_len, plan.tp, plan.cp, plan.pp, gpu, ep=plan.ep,
                                        expert_align=align)
    if problem is not None:  # X303 (tying with PP), X306, X313
        errs.append(diag(problem.code, "error", problem.path, problem.message, problem.hint))


def cp_load_balancer(seq_len: int, cp: int) -> str | None:
    """torchtitan's ``context_parallel_load_balancer`` for the job, whose attention is FlexAttention with block-causal
    document masks (``attn_backend`` 'flex'; torchtitan/config/configs.py: "headtail" is the SDPA balancer, "ptrr"
    the FlexAttention one). "ptrr" (torch's ``_PTRRLoadBalancer``) sorts the mask's 128-token query blocks by the key
    blocks each attends to and deals them round-robin to the CP ranks, so a rank's attention work follows the
    documents actually packed; "headtail" assumes one causal sequence (rank i takes chunks i and 2cp-1-i), which
    packed documents unbalance. torchtitan 0.3.0's ``prepare_context_parallel_input`` builds PTRR from the job's one
    BlockMask (shape (B, 1, S, S): per-sequence indices, ``_context_parallel_buffers`` gathers them per batch row).
    PTRR needs whole blocks dealt evenly: seq_len a multiple of 128 x cp, which torch's sharding of the mask needs
    under either balancer (``_create_cp_block_mask``), so the plan refuses other lengths (X306,
    :func:`llmc.compiler.backends.titan_seq_multiple`). None without CP: the job leaves the unused setting at
    torchtitan's default."""
    return "ptrr" if cp > 1 else None


def _parallelism(compiled, errs: list[Diagnostic]) -> dict[str, Any]:
    """Batch split, pipeline stages and parallel degrees."""
    arch, plan, hyper = compiled.spec.model, compiled.plan, compiled.hyper
    # torchtitan's local_batch_size is per data-parallel rank per accumulation step; with PP it is
    # split into pipeline micro-batches of pipeline_parallel_microbatch_size.
    if plan.pp > 1:
        local_batch, pp_microbatch = plan.micro_batch * plan.grad_accum, plan.micro_batch
    else:
        local_batch, pp_microbatch = plan.micro_batch, 1
    global_batch = plan.global_batch_seqs  # micro_batch * grad_accum * dp (ParallelPlan)
    if plan.activation_checkpointing == "partial" and not (
            isinstance(plan.ac_layers, int) and not isinstance(plan.ac_layers, bool) and plan.ac_layers >= 1):
        errs.append(diag("X312", "error", "parallelism.ac_layers",
                         f"activation_checkpointing 'partial' needs ac_layers >= 1 (blocks recomputed per model "
                         f"chunk), got {plan.ac_layers!r}"))
    if global_batch != hyper.global_batch_seqs:
        errs.append(diag("X307", "error", "training.global_batch_tokens",
                         f"plan batch {global_batch} sequences != resolved batch {hyper.global_batch_seqs}"))
    pp_fqns = None
    if plan.pp > 1:
        single = plan.pp_schedule in SINGLE_STAGE_SCHEDULES
        default_v = 1 if single else 2
        v = plan.pp_virtual_stages
        if single and v != 1:
            errs.append(diag("X308", "error", "parallelism.pp_schedule",
                             f"schedule {plan.pp_schedule} runs one stage per rank, plan has {v}"))
        elif v != default_v:
            n_stages = plan.pp * v
            if n_stages > arch.n_layers + 2:
                errs.append(diag("X308", "error", "parallelism.pp",
                                 f"{n_stages} pipeline stages for {arch.n_layers} layers (at most layers + 2: "
                                 "one of only the embedding, one of only the norm and head)"))
            else:
                pp_fqns = _pp_module_fqns(arch.n_layers, n_stages)
    embedding_only = False
    if plan.pp > 1:
        try:
            embedding_only = not pipeline_chunks(arch.n_layers, plan.pp, plan.pp_schedule, plan.pp_virtual_stages)[0]
        except ValueError as e:  # more chunks than blocks + 2 (with the schedule's own chunk count too)
            if not any(d.code == "X308" for d in errs):
                errs.append(diag("X308", "error", "parallelism.pp", str(e)))
    cpu = compiled.spec.hardware.gpu == "cpu"
    # FSDP2 always shards parameters at rest; the plan's ZeRO stage maps to when they are resharded:
    # ZeRO-3 -> torchtitan's "default" policy: after every forward, except under PP (distributed/fsdp.py
    # get_fsdp_reshard_after_forward_policy: "do not reshard after forward to avoid per-microbatch all-gathers";
    # pipelining keeps the stage gathered from its first backward anyway), which is what llmc's memory and time
    # models hold and count for ZeRO-3 + PP (one all-gather per step);
    # ZeRO-1/2 -> keep the gathered parameters from forward to backward ("never"), which needs no
    # more memory than llmc's ZeRO-1/2 model (unsharded weights, sharded optimizer state).
    reshard = "default" if plan.zero_stage >= 3 else "never"
    return {
        "local_batch_size": local_batch,
        "global_batch_size": global_batch,
        "disable_cuda_graphs": cpu or plan.pp > 1 or (arch.moe is not None and plan.ep > 1),
        "dp_replicate": plan.dp_replicate,
        "dp_shard": plan.dp_shard,
        "fsdp_reshard_after_forward": reshard,
        "tp": plan.tp,
        "pp": plan.pp,
        "pp_schedule": plan.pp_schedule,
        "pp_microbatch": pp_microbatch,
        "pp_module_fqns": pp_fqns,
        # a first chunk of only the embedding: the job's ChunkOptimizers skips the parameter groups it has none of
        "pp_embedding_only_chunk": embedding_only,
        "cp": plan.cp,
        "cp_load_balancer": cp_load_balancer(hyper.seq_len, plan.cp),
        "ep": plan.ep,
        "ac": plan.activation_checkpointing,
        # "partial": the job's PartialFullAC wraps the first ac_layers blocks of every model chunk (0 otherwise)
        "ac_layers": plan.ac_layers,
    }


def _optimizer_schedule(compiled, notes: list[str]) -> dict[str, Any]:
    """AdamW, the LR schedule and the loss options."""
    tr, hyper = compiled.spec.training, compiled.hyper
    cpu = compiled.spec.hardware.gpu == "cpu"
    # torchtitan LRSchedulersContainer: warmup, then decay_type over the last decay_ratio of steps;
    # decay_ratio None = decay right after warmup
    kind = tr.schedule.kind
    if kind == "cosine":
        decay_ratio, decay_type = None, "cosine"
    elif kind == "wsd":
        # WSD cooldown shape: 1-sqrt (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
        # Training Beyond Fixed Training Durations", arXiv:2405.18392, sec. 3: 1-sqrt beats linear cooldown;
        # llmc.lr_schedule.WSD_COOLDOWN, which the native runtime applies and the plan names).
        decay_ratio, decay_type = float(tr.schedule.decay_fraction), "sqrt"
    else:  # linear; constant: min_lr_factor 1 keeps the factor at 1 after warmup
        decay_ratio, decay_type = None, "linear"
    min_lr_factor = 1.0 if kind == "constant" else (hyper.min_lr / hyper.lr if hyper.lr else 0.0)
    opt = tr.optimizer
    adamw = {
        "lr": float(hyper.lr),
        "betas": (float(opt.betas[0]), float(opt.betas[1])),
        "eps": float(opt.eps),
        "weight_decay": float(opt.weight_decay),
    }
    if tr.z_loss > 0:
        notes.append(f"training.z_loss={tr.z_loss} is not applied: torchtitan {TORCHTITAN_VERSION} has no z-loss")
    if tr.loss_spike.enabled:
        notes.append("training.loss_spike is not applied: torchtitan has no rewind-and-skip")
    return {
        # torchtitan's own 8B/70B/405B recipes use ChunkedLossWrapper; the plan's memory counts its chunks
        # (Backend.loss_chunks, memory.loss_logits_bytes)
        "loss_kind": "ce" if cpu else "chunked",
        "loss_chunks": get_backend("torchtitan").loss_chunks,
        "adamw": adamw,
        "adamw_no_wd": {**adamw, "weight_decay": 0.0},
        # one pattern so every pipeline stage's part matches it (each has norms; a first chunk of only the embedding:
        # ChunkOptimizers); None: no group without decay
        "no_wd_pattern": NO_WD_PATTERNS[opt.no_decay],
        "no_wd_comment": textwrap.wrap(f"training.optimizer.no_decay {opt.no_decay}: {NO_WD_RULES[opt.no_decay]}",
                                       100, break_on_hyphens=False),
        "optimizer_impl": "foreach" if cpu else "fused",
        "warmup_steps": int(hyper.warmup_steps),
        "decay_ratio": decay_ratio,
        "decay_type": decay_type,
        "min_lr_factor": float(min_lr_factor),
        "max_norm": float(tr.grad_clip) if tr.grad_clip is not None else None,
        "steps": int(hyper.steps),
    }


def _moe(arch, notes: list[str], errs: list[Diagnostic]) -> dict[str, Any]:
    moe = arch.moe
    if moe is None:
        if arch.mla is not None:
            # build_mla_moe_layers needs MoE numbers even when every layer is dense
            return {"num_experts": 1, "top_k": 1, "moe_hidden_dim": arch.d_ff, "num_shared_experts": 0,
                    "shared_hidden_dim": 0, "n_dense_layers": arch.n_layers, "score_func": "softmax",
                    "route_norm": False, "router_bias": False, "load_balance_coeff": LOAD_BALANCE_COEFF,
                    "route_scale": 1.0, "n_expert_groups": None, "n_limited_groups": None}
        return {}
    from llmc.hf_export import titan_balances_with_bias, titan_drops_routing_bias

    moe_hidden = moe.expert_d_ff or arch.d_ff
    if moe.aux_loss_coef > 0 and moe.expert_bias:
        notes.append(
            f"model.moe.aux_loss_coef={moe.aux_loss_coef}: torchtitan {TORCHTITAN_VERSION} has no auxiliary "
            f"balancing loss; the model's own routing bias (model.moe.expert_bias, "
            f"load_balance_coeff={LOAD_BALANCE_COEFF}) balances the experts alone"
        )
    elif moe.aux_loss_coef > 0:
        # the bias moves by load_balance_coeff per step whatever the loss's coefficient was (0.02 and 0.001 alike)
        notes.append(
            f"model.moe.aux_loss_coef={moe.aux_loss_coef}: torchtitan {TORCHTITAN_VERSION} has no auxiliary "
            f"balancing loss; experts are balanced aux-loss-free instead (routing-bias buffer, "
            f"load_balance_coeff={LOAD_BALANCE_COEFF}; the coefficient's value is not used)"
            + (f"; the Hugging Face export ({family_of(arch).hf_class}) has no place for that bias and routes "
               "without it (plan warning T030)" if titan_drops_routing_bias(arch) else "")
        )
    return {
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "moe_hidden_dim": moe_hidden,
        "num_shared_experts": moe.num_shared_experts,
        "shared_hidden_dim": moe_hidden * moe.num_shared_experts,
        "n_dense_layers": moe.dense_layers,
        "score_func": moe.score_func,
        # renormalise the top-k weights (HF norm_topk_prob: Mixtral, Qwen3-MoE, DeepSeek-V3) or not
        "route_norm": bool(moe.route_norm),
        "router_bias": bool(moe.router_bias),
        # torchtitan 0.3.0 MoE has no auxiliary balancing loss, only aux-loss-free balancing
        # (per-expert routing bias buffer updated before each optimizer step, arXiv:2408.15664).
        # expert_bias -> that mechanism; aux_loss_coef > 0 -> the same mechanism as substitute
        # (llmc.hf_export.titan_balances_with_bias, which the plan's T030 reads too).
        "load_balance_coeff": LOAD_BALANCE_COEFF if titan_balances_with_bias(moe) else None,
        # TokenChoiceTopKRouter.Config route_scale / num_expert_groups / num_limited_groups
        # (torchtitan/models/common/moe.py); DeepSeek-V3: routed_scaling_factor 2.5, n_group 8, topk_group 4
        "route_scale": float(moe.route_scale),
        "n_expert_groups": moe.n_expert_groups,
        "n_limited_groups": moe.n_limited_groups,
    }


def _mla(arch, notes: list[str]) -> dict[str, Any]:
    if arch.mla is None:
        return {}
    m = arch.mla
    return {
        "q_lora_rank": m.q_lora_rank or 0,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        # DeepSeek's YaRN temperature: torchtitan multiplies the softmax scale by (0.1 mscale ln(factor) + 1)^2 under
        # yarn, transformers and llmc's model by m(mscale_all_dim)^2 (0: none); the cos/sin factor is TemperedRoPE's
        "mscale": float(arch.rope_scaling.mscale_all_dim or 0.0) if arch.rope_scaling is not None else 1.0,
    }


def _init(compiled) -> dict[str, Any]:
    """The job's initialisation: the lock's ``model.init`` (``Compiled.model.init``, llmc.weight_init), which llmc's
    runtime draws too. Its depth rule is the one torchtitan's ``depth_scaled_std`` computes (std / sqrt(2 (layer_id +
    1))), which the job calls; a tied head is the embeddings (torchtitan initialises the shared matrix through
    lm_head, so the head takes the embeddings' numbers)."""
    init = compiled.model.init
    if init.depth_scaling not in DEPTH_SCALINGS:  # (the compiler writes only these)
        raise ValueError(f"model.init.depth_scaling {init.depth_scaling!r}: torchtitan's depth_scaled_std computes "
                         f"{', '.join(DEPTH_SCALINGS)} only")
    return {"std": init.std, "truncation": init.truncation, "embedding_std": init.embedding_std,
            "embedding_truncation": init.embedding_truncation, "output_std": init.head_std,
            "output_truncation": init.head_truncation}


def _sd_adapter(arch, family: str) -> str | None:
    """The torchtitan state-dict adapter class the job names, or None where it cannot read every weight
    (:func:`llmc.compiler.backends.torchtitan_reads_hf`)."""
    return HF_ADAPTERS.get(family) if torchtitan_reads_hf(arch) else None


def _init_hf(compiled) -> tuple[str | None, str]:
    """(the Hugging Face checkpoint the torchtitan job starts from, its spec path): the pre-training stage's
    ``init_hf`` (``stages[i].init_hf``), else ``training.init_hf``."""
    spec = compiled.spec
    for i, st in enumerate(spec.stages):
        if st.kind in TITAN_STAGE_KINDS:
            return st.init_hf, f"stages.{i}.init_hf"
    plan = next((st for st in compiled.stages if st.kind in TITAN_STAGE_KINDS), None)
    if plan is not None and plan.init_hf:
        return plan.init_hf, "training.init_hf"
    return spec.training.init_hf, "training.init_hf"


def init_hf_location(compiled) -> str | None:
    """Where the job reads ``init_hf`` from, as written into the job module (joined with the build directory at
    run time, so an absolute path stays as given). A relative ``init_hf`` is relative to the spec's folder;
    ``llmc build`` records the spec path relative to the build directory, so the result is too (the
    artifacts move with the tree and do not depend on the directory ``llmc build`` ran from)."""
    src, _ = _init_hf(compiled)
    return _from_build(compiled, src) if src else None


def _hf_notes(compiled, family: str, notes: list[str]) -> None:
    """What the job's start from ``init_hf`` needs to know (what it cannot read is a model gap: X310)."""
    if _init_hf(compiled)[0] and family == "deepseek_v3":
        notes.append("init_hf: an FP8-quantized checkpoint (DeepSeek-V3's own release) needs "
                     "--checkpoint.initial_load_in_hf_quantized (DeepSeekV3StateDictAdapter dequantizes it)")


def _titan_compile(compiled) -> bool:
    """torch.compile as the plan's time and memory assumed it (the torchtitan backend's choice)."""
    if compiled.backend is not None and compiled.backend.name == "torchtitan":
        return compiled.backend.compile
    return compile_on(get_backend("torchtitan"), compiled.spec.training.compile)


# torchtitan 0.3.0's quantization converters (components/quantization): Float8LinearConverter.Config.recipe_name is
# Literal["rowwise", "rowwise_with_gw_hp"] (no tensorwise); MXFP8LinearConverter.Config converts the Linear configs
# whose FQN contains one of ``fqns`` (empty = every Linear): the attention, dense MLP and shared-expert linears,
# i.e. not the output head and not the MoE router (the float8 converter's skip list)
MXFP8_FQNS = ["attention", "feed_forward", "shared_experts"]
# The routed experts (GroupedExperts: 3-D parameters, no Linear) need their own converter,
# Float8GroupedExpertsConverter (torchao float8 rowwise grouped GEMMs, token groups padded to 16) or
# MXFP8GroupedExpertsConverter, as torchtitan's own deepseek_v3_671b_float8 / deepseek_v3_debugmodel_mxfp8
# configs pair them (models/deepseek_v3/config_registry.py); the job emits it where
# backends.fp8_converted_parts has "experts", the parts the plan timed in fp8. MXFP8 pads each expert's token
# group to 128: "required by the CuTeDSL quantization kernel on sm_100" (the same configs;
# MXFP8GroupedExpertsConverter.Config.pad_multiple's doc), and MXFP8 runs only on SM 10.x
MXFP8_EXPERTS_PAD_MULTIPLE = 128
# torchtitan 0.3.0's NVFP4LinearConverter (components/quantization/nvfp4.py) swaps each Linear.Config whose FQN
# contains one of ``fqns`` for NVFP4Linear (an empty list would convert every Linear, the output head included).
# Its own llama3 configs keep the last blocks in bf16 with nvfp4_bf16_tail_fqns(n_layers, fraction) =
# ["layers.0.", "layers.1.", ...] (the trailing dot: "layers.1." does not match "layers.10."), which converts every
# Linear of those blocks; llmc's job emits exactly that list for a dense model, and for an MoE model one FQN per
# converted part of each block (attention, feed_forward, moe.shared_experts: backends.converted_parts) so that the
# router gate, also a Linear, stays bf16 as the plan timed it.
NVFP4_PART_FQNS = {"attention": ("attention.",), "mlp": ("feed_forward.", "moe.shared_experts.")}


def nvfp4_fqns(arch, bf16_tail: float) -> list[str]:
    """The job's NVFP4LinearConverter fqns: the blocks before the bf16 tail (backends.nvfp4_converted_layers, the
    count torchtitan's nvfp4_bf16_tail_fqns takes), whole for a dense model, by converted part for an MoE one."""
    n = nvfp4_converted_layers(arch.n_layers, bf16_tail)
    if arch.moe is None:
        return [f"layers.{i}." for i in range(n)]
    parts = sorted(converted_parts(get_backend("torchtitan"), arch, "nvfp4"))
    return [f"layers.{i}.{sub}" for i in range(n) for part in parts for sub in NVFP4_PART_FQNS[part]]


def _fp8_recipe(compiled, errs: list[Diagnostic]) -> str:
    """The fp8 recipe of the job: ``training.fp8_recipe`` or the torchtitan backend's default; X311 when
    torchtitan 0.3.0 has no converter for it."""
    titan = get_backend("torchtitan")
    recipe = fp8_recipe_on(titan, compiled.spec.training.fp8_recipe)
    if recipe not in titan.fp8_recipes:  # the plan refuses it first (T011)
        errs.append(diag("X311", "error", "training.fp8_recipe",
                         f"torchtitan {TORCHTITAN_VERSION} has no {recipe} float8 recipe (Float8LinearConverter: "
                         "rowwise, rowwise_with_gw_hp; MXFP8LinearConverter: mxfp8)",
                         "use fp8_recipe rowwise (or mxfp8 on Blackwell)"))
    return recipe


def _model_args(compiled, family: str, errs: list[Diagnostic], notes: list[str]) -> dict[str, Any]:
    """Model family, shapes, init, RoPE, MoE / MLA and precision."""
    spec = compiled.spec
    arch = spec.model
    precision = spec.training.precision
    converters_filter = ["lm_head"] + (["router.gate"] if arch.moe is not None else [])
    recipe = _fp8_recipe(compiled, errs) if precision == "fp8" else None
    titan = get_backend("torchtitan")
    fp8_experts = recipe is not None and "experts" in fp8_converted_parts(titan, arch, recipe)
    return {
        "family": family,
        "flavor": f"llmc-{arch.name}",
        "dim": arch.d_model,
        "n_layers": arch.n_layers,
        "n_heads": arch.n_heads,
        "n_kv_heads": arch.kv_heads,
        "head_dim": arch.hd,
        "ffn_hidden_dim": arch.d_ff,
        "vocab_size": arch.vocab_size,
        "norm_eps": float(arch.norm_eps),
        "tied": bool(arch.tied_embeddings),
        # fused wqkv Linear gets a bias (colwise TP shards it S(0): models/common/decoder_sharding.py)
        "qkv_bias": bool(arch.qkv_bias),
        "qk_norm": bool(arch.qk_norm),
        "sd_adapter": _sd_adapter(arch, family),
        "init": _init(compiled),
        "rope": _rope(arch),
        "rope_cls": "CosSinRoPE" if family_of(arch).torchtitan_rope == "cossin" else "ComplexRoPE",
        "moe": _moe(arch, notes, errs),
        "mla": _mla(arch, notes),
        "attn_backend": "flex",
        "float8": precision == "fp8" and recipe != "mxfp8",
        "float8_recipe": recipe,
        "float8_filter_fqns": converters_filter,
        "mxfp8": precision == "fp8" and recipe == "mxfp8",
        "mxfp8_fqns": MXFP8_FQNS,
        "float8_experts": fp8_experts and recipe != "mxfp8",
        "mxfp8_experts": fp8_experts and recipe == "mxfp8",
        "mxfp8_experts_pad": MXFP8_EXPERTS_PAD_MULTIPLE,
        "nvfp4": precision == "nvfp4",
        "nvfp4_fqns": nvfp4_fqns(arch, spec.training.nvfp4_bf16_tail) if precision == "nvfp4" else [],
        "compile_enable": spec.hardware.gpu != "cpu" and _titan_compile(compiled),
        "compile_components": ["model", "loss"],
        "training_dtype": "float32",
        "mixed_precision_param": "float32" if precision == "fp32" else "bfloat16",
    }


def _mfu_peak(compiled) -> dict[str, Any]:
    """The peak FLOP/s per device the job's metrics.jsonl quotes MFU against: the one llmc's plan quotes its
    predicted MFU against (``llmc.compiler.timing.mfu_peak``: the precision's dense peak, bf16's for fp8 and
    nvfp4), so
    `llmc report` compares like with like; 0 (no MFU) for a part the hardware table does not know."""
    precision = compiled.spec.training.precision
    try:
        peak = float(mfu_peak(compiled.gpu, precision)) if compiled.gpu is not None else 0.0
    except ValueError:  # a part without a peak for the precision
        peak = 0.0
    label = "bf16" if precision in ("fp8", "nvfp4") else precision
    source = f"{compiled.gpu.name}: dense {label}, llmc's hardware table (the plan's MFU)" if peak else "unknown: no MFU"
    return {"peak_flops": peak, "peak_flops_source": source}


def _sync_save_seconds(compiled, stage: int | None) -> float:
    """The longest synchronous save the plan predicts for the job (pre-training, or the continued-training stage at
    ``stage``): its preemption save (``preempt_seconds``: an asynchronous save in flight waited for, then the
    current step written in full), which is at least its last-step save. A job whose figure is unknown (a plan
    without predicted saves) takes the build's preemption save (``Compiled.preemption``), else 0."""
    if stage is None:
        ck = compiled.time.checkpoint if compiled.time is not None else None
        own = ck.preempt_seconds if ck is not None else None
    else:
        t = compiled.stages[stage].time
        own = t.checkpoint.preempt_seconds if t is not None and t.checkpoint is not None else None
    if own is not None:
        return float(own)
    return float(compiled.preemption.save_seconds) if compiled.preemption is not None else 0.0


def comm_train_timeout(save_seconds: float) -> int:
    """torchtitan's ``comm.train_timeout_seconds`` for a job whose longest synchronous save takes ``save_seconds``
    (the comment at COMM_TRAIN_TIMEOUT_CKPT_S)."""
    return max(COMM_TRAIN_TIMEOUT_CKPT_S, 10 * math.ceil(COMM_TRAIN_TIMEOUT_SAVE_MARGIN * save_seconds / 10))


def comm_train_timeout_comment(save_seconds: float) -> list[str]:
    """The job's comment lines on ``comm.train_timeout_seconds`` (:func:`comm_train_timeout`): why not torchtitan's
    100 s, and which term set it."""
    scaled = 10 * math.ceil(COMM_TRAIN_TIMEOUT_SAVE_MARGIN * save_seconds / 10)
    if scaled > COMM_TRAIN_TIMEOUT_CKPT_S:
        why = (f"{COMM_TRAIN_TIMEOUT_SAVE_MARGIN:g} x the plan's predicted preemption save ({save_seconds:.0f} s), "
               f"rounded up to 10 s, above llmc's floor of {COMM_TRAIN_TIMEOUT_CKPT_S} s")
    elif save_seconds > 0:
        why = (f"llmc's floor for synchronous checkpoint saves, {COMM_TRAIN_TIMEOUT_CKPT_S} s (a fixed headroom, not "
               f"fitted), above {COMM_TRAIN_TIMEOUT_SAVE_MARGIN:g} x the plan's predicted preemption save "
               f"({save_seconds:.0f} s)")
    else:
        why = (f"llmc's floor for synchronous checkpoint saves, {COMM_TRAIN_TIMEOUT_CKPT_S} s (a fixed headroom, not "
               "fitted; this plan predicts no save time)")
    return textwrap.wrap(
        "train_timeout_seconds (NCCL's watchdog after the first step; torchtitan's default is 100 s) must outlast the "
        "longest synchronous checkpoint save: ranks that finish writing wait in its closing collective for the "
        f"slowest, and torchtitan writes its last-step and preemption saves synchronously. Here: {why} (llmc/emit/"
        "torchtitan.py comm_train_timeout: COMM_TRAIN_TIMEOUT_CKPT_S, COMM_TRAIN_TIMEOUT_SAVE_MARGIN).", 108,
        break_on_hyphens=False)


def _checkpoint_comm(compiled, save_seconds: float = 0.0) -> dict[str, Any]:
    """Checkpointing, logging, collective timeouts and the process layout; ``save_seconds``: the job's longest
    synchronous save (:func:`_sync_save_seconds`), which the train timeout covers."""
    spec, hyper = compiled.spec, compiled.hyper
    tr, ck = spec.training, spec.training.checkpoint
    cpu = spec.hardware.gpu == "cpu"
    world = compiled.plan.world
    nproc = world if cpu else gpus_per_node(compiled)
    return {
        "ckpt_enable": True,
        "ckpt_folder": ck.folder,
        "ckpt_interval": int(hyper.checkpoint_interval),
        "ckpt_async_mode": "async" if hyper.checkpoint_async else "disabled",
        "ckpt_keep_latest_k": int(ck.keep_latest),
        "preempted_exit": EXIT_PREEMPTED,
        "software_dists": RECORDED,  # what the start event records (llmc.runtime.software.runtime_versions, inlined)
        **launcher_context(compiled),  # torchrun's shutdown time (the run scripts)
        "log_freq": int(tr.log_every),
        # into the stage's run folder beside metrics.jsonl, as llmc's trainers write it (torch's SummaryWriter)
        "enable_tensorboard": True,
        **_mfu_peak(compiled),
        "seed": int(tr.seed),
        "comm_init_timeout": COMM_INIT_TIMEOUT_LARGE_S if world >= COMM_LARGE_WORLD else COMM_INIT_TIMEOUT_S,
        "comm_train_timeout": comm_train_timeout(save_seconds),
        "comm_init_timeout_comment": (f"init_timeout_seconds: torchtitan's default {COMM_INIT_TIMEOUT_S} s, "
                                      f"{COMM_INIT_TIMEOUT_LARGE_S} s from {COMM_LARGE_WORLD} ranks (llmc heuristic, "
                                      "COMM_INIT_TIMEOUT_*)"),
        "comm_train_timeout_comment": comm_train_timeout_comment(save_seconds),
        "world": world,
        "nproc_per_node": nproc,
        "nnodes": max(1, math.ceil(world / nproc)),
        "cpu": cpu,
    }


def titan_stages(compiled) -> list[tuple[int, Any]]:
    """(position in ``compiled.stages``, StagePlan) of every continued-training stage that runs as its own torchtitan
    job: the compiler searched a layout for it (``StagePlan.layout``; torchtitan runs only)."""
    return [(i, sp) for i, sp in enumerate(compiled.stages) if sp.layout is not None]


def titan_jobs(compiled) -> list[int | None]:
    """The torchtitan jobs of the run: ``None`` for pre-training (when the run has a pre-training plan), then the
    position of every continued-training stage with its own job. A pipeline that continues a trained model (no
    pre-training stage) has its stage jobs only."""
    stages = [i for i, _ in titan_stages(compiled)]
    return [None, *stages] if compiled.plan is not None or not stages else stages


def _stage_view(compiled, sp):
    """The run as the stage's own job sees it: the stage's layout, training numbers (``Hyper``), data, sequence
    length and RoPE (the context the stage trains with: a long-context stage's new base or scaling, with the
    model's max_seq_len raised to the stage's, as llmc's trainers do), no validation and no stages. Every value the
    pre-training job's functions compute from it is then the stage's."""
    spec = compiled.spec
    st = next(s for s in spec.stages if s.name == sp.name)
    ctx = sp.context
    arch = spec.model.model_copy(update={
        "rope_theta": float(ctx.rope_theta),
        "rope_scaling": RopeScaling.model_validate(ctx.rope_scaling) if ctx.rope_scaling else None,
        "max_seq_len": sp.max_position_embeddings or max(spec.model.max_seq_len, sp.seq_len)})
    data = (st.data or spec.data).model_copy(update={"seq_len": sp.seq_len})
    view_spec = spec.model_copy(update={"model": arch, "data": data, "stages": [], "eval": None,
                                        "training": spec.training.model_copy(update={"init_hf": None})})
    hyper = Hyper(lr=sp.lr, min_lr=sp.min_lr, warmup_steps=sp.warmup_steps, steps=sp.steps,
                  global_batch_tokens=sp.global_batch_tokens, global_batch_seqs=sp.global_batch_seqs,
                  seq_len=sp.seq_len, schedule=sp.schedule, checkpoint_interval=sp.checkpoint_interval,
                  checkpoint_async=compiled.hyper.checkpoint_async, decay_steps=sp.decay_steps or 0,
                  last_lr=sp.last_lr or 0.0)
    return replace(compiled, spec=view_spec, plan=sp.layout, hyper=hyper, stages=[]), st


def torchtitan_values(compiled, stage: int | None = None) -> TitanValues:
    """Compute every number of the torchtitan job from the compiled plan; raise SpecError when the
    architecture or plan cannot be expressed in torchtitan 0.3.0. ``stage``: the job of the continued-training stage
    at that position of ``compiled.stages`` (its own layout; it starts from the weights of its ``init_from`` stage's
    Hugging Face export, or its own ``init_hf``)."""
    if compiled.plan is None and stage is None:
        raise SpecError([diag("X300", "error", "parallelism",
                              "no feasible parallelism plan; nothing to render for torchtitan")])
    errs: list[Diagnostic] = []
    notes: list[str] = []
    view, st = (compiled, None) if stage is None else _stage_view(compiled, compiled.stages[stage])
    family = _family(view.spec.model)
    si = None if st is None else next(i for i, s in enumerate(compiled.spec.stages) if s is st)  # its spec position
    # the Hugging Face checkpoint the job starts from: pre-training's, or a continued-training stage's own init_hf
    src, src_path = _init_hf(view) if st is None else (st.init_hf, f"stages.{si}.init_hf")
    errs += [diag(g.code, "error", g.path, g.message, g.hint) for g in torchtitan_model_gaps(
        view.spec.model, src, src_path, view.checkpoint_types.get(src) if src else None, view.hyper.seq_len)]
    _arch_checks(view, family, errs, notes)
    _hf_notes(view, family, notes)
    optim = _optimizer_schedule(view, notes)
    model = _model_args(view, family, errs, notes)
    par = _parallelism(view, errs)
    if (g := torchtitan_keep_latest_gap(view.spec.training.checkpoint.keep_latest)) is not None:
        errs.append(diag(g.code, "error", g.path, g.message, g.hint))
    init_hf, init_source = init_hf_location(view), src
    if st is not None:
        # the weights it starts from: its own init_hf, else its init_from stage's Hugging Face export (written when
        # that stage finished; `llmc launch` and the launchers pass its folder as LLMC_INIT_HF), else none (a fresh
        # init, as llmc's trainers)
        sp = compiled.stages[stage]
        init_source = sp.init_hf or (posixpath.join("run", st.init_from, "hf") if st.init_from else None)
        init_hf = _from_build(compiled, sp.init_hf) if sp.init_hf else init_source
        if init_hf and not sp.init_hf and _sd_adapter(view.spec.model, family) is None:  # (own init_hf: above)
            errs.append(diag("X310", "error", f"stages.{si}",
                             f"stage {st.name!r}: the torchtitan job cannot start from its base model's weights (no "
                             f"state-dict adapter for this model in torchtitan {TORCHTITAN_VERSION})",
                             "build with training.backend native or deepspeed"))
    if errs:
        raise SpecError(errs)
    ctx = {
        "run_name": compiled.spec.name,
        "stage_name": None if st is None else st.name,
        **model,
        **optim,
        **par,
        **_checkpoint_comm(view, _sync_save_seconds(compiled, stage)),
        "seq_len": view.hyper.seq_len,
        "data_sources": _data_sources(view),
        "init_hf": init_hf,
        "init_hf_source": init_source,
        "fused_hf_model_types": list(FUSED_HF_MODEL_TYPES),
        "validation": _validation(view),
        "dump_subdir": titan_dump_subdir(None if st is None else st.name),
        "module_name": MODULE_NAME if stage is None else titan_stage_module(stage),
        "script_suffix": "" if stage is None else f"_stage{stage}",
        # each job's scripts default to their own rendezvous port: run back to back on the same nodes, a node that
        # starts the next job while the head node still tears the last one's store down must not join that store
        "rdzv_port": RDZV_PORT + (stage or 0),
    }
    return TitanValues(ctx=ctx, notes=notes)


def launch_lines(ctx: dict[str, Any]) -> dict[str, str]:
    """The human-readable launch commands recorded in the header (exact scripts are emitted too)."""
    mod = f"--module {ctx['module_name']} --config {CONFIG_FN}"
    return {
        "single": f"PYTHONPATH=torchtitan torchrun --nproc_per_node={ctx['nproc_per_node']} "
        f"--rdzv_backend c10d --rdzv_endpoint=localhost:0 --local-ranks-filter 0 --role rank --tee 3 "
        f"-m torchtitan.train {mod}",
        "multi": f"NNODES={ctx['nnodes']} MASTER_ADDR=<head> bash torchtitan/run_multi_node{ctx['script_suffix']}.sh"
        "   (on every node)",
        "dry_run": f"NGPU={ctx['world']} LOCAL_RANK=0 PYTHONPATH=torchtitan python -m torchtitan.train "
        f"--module {ctx['module_name']} --config job_without_converters --comm.mode fake_backend --training.steps 1",
    }


def torchtitan_diagnostics(compiled) -> list[Diagnostic]:
    """Why the torchtitan target cannot be emitted for this run (empty when it can)."""
    out: list[Diagnostic] = []
    for stage in titan_jobs(compiled):
        try:
            torchtitan_values(compiled, stage)
        except SpecError as e:
            out += list(e.diagnostics)
    return out


def render_torchtitan(compiled, strict: bool = False) -> dict[str, str]:
    """Files of the torchtitan target, relative to the build directory.

    When the run cannot be expressed in torchtitan 0.3.0 (see ``torchtitan_diagnostics``): with
    ``strict`` raise ``SpecError``; otherwise emit only ``torchtitan/NOT_EMITTED.txt`` listing the
    diagnostics, so the other backends still build and no wrong job module is written.
    """
    import llmc

    try:
        jobs = [torchtitan_values(compiled, stage) for stage in titan_jobs(compiled)]
    except SpecError as e:
        if strict:
            raise
        lines = [
            f"# llmc {llmc.__version__}: no torchtitan {TORCHTITAN_VERSION} job for this spec "
            f"(sha256 {_spec_hash_text(compiled)})",
            *[visible(d.render()) for d in e.diagnostics],
        ]
        return {f"{OUT_DIR}/NOT_EMITTED.txt": "\n".join(lines) + "\n"}
    env = jinja_env()
    files = {}
    for vals in jobs:
        ctx = dict(vals.ctx)
        ctx.update(
            llmc_version=llmc.__version__,
            torchtitan_version=TORCHTITAN_VERSION,
            torch_version=TORCH_VERSION,
            spec_path=spec_named(compiled),
            spec_sha256=_spec_hash_text(compiled),
            notes=vals.notes,
            config_fn=CONFIG_FN,
            launch=launch_lines(vals.ctx),
            # the stage the scripts log under (<run dir>/<stage>/stderr.log, as the launch/ scripts do)
            stage_label=vals.ctx["stage_name"] or next((s.name for s in compiled.stages if s.kind == "pretrain"),
                                                       "pretrain"),
        )
        sfx, module = ctx["script_suffix"], ctx["module_name"]
        ctx.update(nvlink_hint(compiled, ctx["tp"], ctx["nnodes"]))
        files.update({
            f"{OUT_DIR}/{module}.py": tidy_imports(env.get_template("torchtitan/llmc_job.py.j2").render(**ctx)),
            f"{OUT_DIR}/run_single_node{sfx}.sh": env.get_template("torchtitan/run_single_node.sh.j2").render(**ctx),
            f"{OUT_DIR}/run_multi_node{sfx}.sh": env.get_template("torchtitan/run_multi_node.sh.j2").render(**ctx),
            f"{OUT_DIR}/slurm{sfx}.sbatch": env.get_template("torchtitan/slurm.sbatch.j2").render(**ctx),
        })
    return files


def tidy_imports(src: str) -> str:
    """Rewrite the module's leading import block: drop unused names, group stdlib / third-party, sort.

    The template imports everything any model family might need; the committed job should still be
    lint-clean (no unused imports, isort order) for whoever reviews it. Pure ``ast`` on our own output.
    """
    tree = ast.parse(src)
    body = tree.body
    start = 1 if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) else 0
    end = start
    while end < len(body) and isinstance(body[end], ast.Import | ast.ImportFrom):
        end += 1
    imports = body[start:end]
    if not imports:
        return src
    used = {n.id for n in ast.walk(ast.Module(body=body[end:], type_ignores=[])) if isinstance(n, ast.Name)}
    plain: dict[str, set[str]] = {}
    froms: dict[str, set[str]] = {}
    for node in imports:
        if isinstance(node, ast.Import):
            for a in node.names:
                if (a.asname or a.name.split(".")[0]) in used:
                    plain.setdefault(a.name, set()).add(a.asname or "")
        else:
            for a in node.names:
                if (a.asname or a.name) in used:
                    froms.setdefault(node.module or "", set()).add(a.name if not a.asname else f"{a.name} as {a.asname}")

    def is_std(mod: str) -> bool:
        return mod.split(".")[0] in sys.stdlib_module_names

    def block(std: bool) -> list[str]:
        out = [f"import {m}" + (f" as {al}" if al else "") for m in sorted(plain) if is_std(m) == std
               for al in sorted(plain[m])]
        for m in sorted(froms):
            if is_std(m) != std:
                continue
            names = sorted(froms[m], key=lambda x: (not x.isupper(), not x[:1].isupper(), x.lower()))
            line = f"from {m} import {', '.join(names)}"
            out.append(line if len(line) <= 110 else f"from {m} import (\n" + "".join(f"    {n},\n" for n in names) + ")")
        return out

    groups = [g for g in (block(True), block(False)) if g]
    new_block = "\n\n".join("\n".join(g) for g in groups) + "\n"
    lines = src.splitlines(keepends=True)
    first, last = imports[0].lineno - 1, imports[-1].end_lineno
    return "".join(lines[:first]) + new_block + "".join(lines[last:])


class TorchtitanEmitter(Emitter):
    """torchtitan/ (job module + scripts), or torchtitan/NOT_EMITTED.txt saying why not; a run
    torchtitan cannot express does not stop the build (the other backends still run it)."""

    name = "torchtitan"

    def applies(self, compiled) -> bool:
        return compiled.plan is not None or bool(titan_stages(compiled))

    def diagnostics(self, compiled) -> list[Diagnostic]:
        """A plan computed for torchtitan whose job cannot be emitted is a build error (X3xx): its numbers would
        describe a job that does not exist and the launchers would fall back to another backend's trainer, on a
        layout planned for torchtitan. For a plan on another backend the reasons stay in NOT_EMITTED.txt."""
        if compiled.backend is None or compiled.backend.name != "torchtitan":
            return []
        return torchtitan_diagnostics(compiled)

    def files(self, compiled, earlier: Mapping[str, str]) -> dict[str, str]:
        return render_torchtitan(compiled)
