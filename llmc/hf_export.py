"""The Hugging Face export, as the plan sees it: which architectures map onto a transformers class, whether the routing
bias torchtitan's job balances the experts with has a place in that class, and the plan's diagnostics about both.

Every stage ends with a Hugging Face directory (``run/<stage>/hf``: :func:`llmc.runtime.hf_io.export_stage`) when the
architecture maps onto one of the classes :func:`llmc.runtime.hf_io.hf_config` writes; :func:`hf_export_supported`
(pure, no torch) is that rule, the one the export itself obeys (``llmc.runtime.hf_io`` imports it from here).

What reads the export (:func:`hf_readers`): the serving targets (vLLM / SGLang load ``run/<stage>/hf``), the benchmark
evals (``llmc.runtime.evaluate.stage_eval`` scores ``run/<stage>/hf``, and every_checkpoints exports each scored
checkpoint the same way), and a stage whose ``init_from`` names a stage torchtitan trains (a torchtitan job writes
DCP checkpoints and no llmc checkpoint: ``llmc.runtime.hf_io.init_from_source`` then starts the next stage from the
export, as the torchtitan continued-training job does through ``LLMC_INIT_HF``). A stage the native or DeepSpeed
runner trains leaves an llmc checkpoint, which the next stage reads instead.

Diagnostics (:func:`check_hf_export`):

* X130 (error / warning): the model has no Hugging Face export (:func:`hf_export_supported` says why). An error where
  the spec asks for something that reads it (:func:`hf_readers`), else a warning: the run ends without an HF
  directory (the runner then skips the export with the same one line).
* T030 (warning): the torchtitan job balances the experts with a routing bias (aux-loss-free balancing: torchtitan
  0.3.0 ``MoE.expert_bias_E``, added to the router scores for the top-k choice only, torchtitan/models/common/moe.py
  ``TokenChoiceTopKRouter.forward``; the job sets it for ``expert_bias`` or, in place of the auxiliary loss it does
  not have, for ``aux_loss_coef`` > 0: :func:`titan_balances_with_bias`) that the model's Hugging Face class cannot
  hold (:func:`hf_holds_routing_bias`): the export picks its top-k experts without it, not as the model trained.
  torchtitan's own Qwen3-MoE recipe does the same (its ``make_moe_config`` default ``load_balance_coeff=1e-3``,
  torchtitan/models/common/config_utils.py) and its ``Qwen3StateDictAdapter.to_hf`` drops the buffer without a word
  (``layers.{}.moe.expert_bias_E`` is not in its ``from_hf_map``: ``if abstract_key not in to_hf_map: continue``,
  torchtitan/models/qwen3/state_dict_adapter.py); only ``DeepSeekV3StateDictAdapter`` maps it
  (``model.layers.{}.mlp.gate.e_score_correction_bias``).
"""

from __future__ import annotations

from llmc.spec.families import family_of
from llmc.spec.schema import CONTINUED_KINDS, RunSpec

#: The families whose Hugging Face class adds a per-expert bias to the scores that choose the top-k experts
#: (transformers ``DeepseekV3TopkRouter`` / ``Glm4MoeTopkRouter``: ``e_score_correction_bias``); the export writes
#: torchtitan's routing bias there (``llmc.runtime.hf_io.hf_zero_extras``: the state dict's, zeros without one)
ROUTING_BIAS_FAMILIES = frozenset({"deepseek_v3", "glm4_moe"})

#: The stage kinds torchtitan's job trains when the plan runs on torchtitan (post-training runs on llmc's runner)
TITAN_KINDS = ("pretrain", *CONTINUED_KINDS)


def _gpt_oss_supported(arch) -> str | None:
    """None when a gpt-oss block maps onto ``GptOssForCausalLM`` (every layer's experts intermediate_size wide), else
    the reason."""
    m = arch.moe
    if m.expert_d_ff not in (None, arch.d_ff):
        return ("GptOssForCausalLM's experts are intermediate_size wide and it has no dense MLP (moe.expert_d_ff "
                "must be unset)")
    return None


def _deepseek_supported(arch) -> str | None:
    """None when an MLA architecture maps onto ``DeepseekV3ForCausalLM`` (sigmoid-routed experts, groups scored by
    their two best, or dense) or ``DeepseekV2ForCausalLM`` (softmax-routed: unnormalised, unbiased, ungrouped or
    groups scored by their best expert: ``topk_method: group_limited_greedy``), else the reason."""
    if arch.qkv_bias:
        return "MLA with q/k/v biases has no DeepseekV3ForCausalLM equivalent (attention_bias adds o_proj bias too)"
    m = arch.moe
    if m is None:
        return None
    if m.score_func == "softmax":  # DeepseekV2TopkRouter (transformers modeling_deepseek_v2.py)
        if m.route_norm or m.expert_bias or m.router_bias:
            return ("DeepseekV2ForCausalLM routes softmax top-k unnormalised, without biases (route_norm: false; no "
                    "expert_bias, router_bias)")
        if m.n_expert_groups and m.group_score != "max":
            return ("DeepseekV2ForCausalLM's group_limited_greedy scores a group by its best expert (group_score: "
                    "max), not by its two best")
        if not m.num_shared_experts:
            return "DeepseekV2ForCausalLM always has shared experts (num_shared_experts >= 1)"
        return None
    if m.score_func != "sigmoid":
        return "DeepseekV3ForCausalLM routes with sigmoid scores only (score_func: sigmoid)"
    if m.router_bias:
        return "DeepseekV3ForCausalLM's router has no bias (router_bias: false)"
    if m.n_expert_groups and m.group_score != "top2_sum":
        return "DeepseekV3ForCausalLM scores a group by the sum of its 2 best experts (group_score: top2_sum)"
    if not m.num_shared_experts:
        return "DeepseekV3ForCausalLM always has shared experts (num_shared_experts >= 1)"
    if m.num_experts < 2 * (m.n_expert_groups or 1):
        return "DeepseekV3ForCausalLM scores each expert group by its 2 best experts (>= 2 experts per group)"
    return None


def _glm4_moe_supported(arch) -> str | None:
    """None when a GQA model with sigmoid-routed experts maps onto ``Glm4MoeForCausalLM`` (transformers
    modeling_glm4_moe.py: a pre-norm SwiGLU block with per-head q/k norms or none, the first layers dense, shared
    experts, groups scored by their two best experts, one RoPE in every layer), else the reason."""
    m = arch.moe
    if m.router_bias:
        return "Glm4MoeForCausalLM's router has no bias (router_bias: false)"
    if m.n_expert_groups and m.group_score != "top2_sum":
        return "Glm4MoeForCausalLM scores a group by the sum of its 2 best experts (group_score: top2_sum)"
    if m.num_experts < 2 * (m.n_expert_groups or 1):
        return "Glm4MoeForCausalLM scores each expert group by its 2 best experts (>= 2 experts per group)"
    if not m.num_shared_experts:
        return "Glm4MoeForCausalLM always has shared experts (num_shared_experts >= 1)"
    if (arch.norm_placement != "pre" or arch.sliding_window is not None or arch.nope_layers
            or arch.multipliers is not None or arch.activation != "silu"):
        return ("Glm4MoeForCausalLM is a pre-norm SwiGLU block with RoPE in every layer and no window or "
                "multipliers")
    return None


def hf_export_supported(arch) -> str | None:
    """None when the architecture maps onto an HF class here (:func:`llmc.runtime.hf_io.hf_config` lists them), else
    the reason."""
    if arch.mla is not None:
        return _deepseek_supported(arch)
    if family_of(arch).name == "glm4_moe":
        return _glm4_moe_supported(arch)
    if family_of(arch).name == "gpt_oss":
        return _gpt_oss_supported(arch)
    if arch.partial_rotary and (arch.qkv_bias or arch.qk_norm or arch.moe):
        return "partial RoPE is exported as Phi3ForCausalLM, which has no q/k/v biases, q/k norms or experts"
    if arch.qkv_bias and arch.qk_norm and arch.moe is None:
        return ("q/k/v biases with q/k norms have no Hugging Face class: Qwen3ForCausalLM's attention_bias biases "
                "o_proj too")
    m = arch.moe
    if m is None:
        return None
    # MixtralForCausalLM, with per-head q/k norms Qwen3MoeForCausalLM, with q/k norms over the projections
    # OlmoeForCausalLM: all route softmax top-k (Mixtral renormalised, the others either way)
    fam = family_of(arch).name
    cls = {"qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE"}.get(fam, "Mixtral")
    if m.num_shared_experts or m.score_func != "softmax" or m.router_bias or m.expert_bias:
        return f"only {cls}-style MoE (softmax top-k, no shared experts, no router or expert bias) is exported"
    if m.route_scale != 1.0 or m.n_expert_groups:
        return f"DeepSeek-V3 routing (route_scale / expert groups) has no {cls} equivalent"
    if fam != "qwen3_moe" and (m.dense_layers or (m.expert_d_ff or arch.d_ff) != arch.d_ff):
        return (f"{cls} has no dense layers and its experts are d_ff wide (Qwen3-MoE, the class with per-head q/k "
                "norms, has both)")
    if fam == "mixtral" and not m.route_norm:
        return "Mixtral always renormalises the top-k weights (route_norm: true; Qwen3-MoE, with q/k norms, has both)"
    if arch.qkv_bias:
        return "MoE with q/k/v biases has no Hugging Face model class here"
    return None


def no_export_line(why: str) -> str:
    """The one line that says a run ends without a Hugging Face export: the plan's X130 and the runner's skip."""
    return f"the run ends without a Hugging Face export (run/<stage>/hf): {why}"


def titan_balances_with_bias(moe) -> bool:
    """torchtitan's job balances the experts with a routing bias (``load_balance_coeff`` set): for ``expert_bias``
    (DeepSeek-V3's own aux-loss-free balancing), and in place of the auxiliary loss torchtitan 0.3.0 does not have
    (its MoE has none) when ``aux_loss_coef`` > 0; ``aux_loss_coef`` 0 without ``expert_bias``: no balancing."""
    return moe is not None and (bool(moe.expert_bias) or moe.aux_loss_coef > 0)


def hf_holds_routing_bias(arch) -> bool:
    """The model's Hugging Face class adds a per-expert bias to the scores that choose the top-k experts
    (:data:`ROUTING_BIAS_FAMILIES`): the export then routes as torchtitan's job trained."""
    return family_of(arch).name in ROUTING_BIAS_FAMILIES


def titan_drops_routing_bias(arch) -> bool:
    """torchtitan's job would train ``arch`` with a routing bias its (supported) Hugging Face export cannot hold."""
    return (arch.moe is not None and titan_balances_with_bias(arch.moe) and not hf_holds_routing_bias(arch)
            and hf_export_supported(arch) is None)


def _titan_stages(run: RunSpec, backend: str | None) -> set[str]:
    """The stages torchtitan's job trains when the plan runs on ``backend``."""
    from llmc.compiler.stages import resolved_stages

    if backend != "torchtitan":
        return set()
    return {st.name for st in resolved_stages(run) if st.kind in TITAN_KINDS}


def hf_readers(run: RunSpec, backend: str | None = None) -> list[tuple[str, str]]:
    """(spec path, what) for each part of the spec that reads a stage's Hugging Face export: serving targets, the
    benchmark evals, and stages that start from a stage torchtitan trains (``backend``: the plan's)."""
    from llmc.compiler.stages import resolved_stages

    stages = resolved_stages(run)
    last = stages[-1].name if stages else "pretrain"
    out = [(f"serving.{i}", f"serving target {i} ({t.engine}) loads stage {t.stage or last!r}'s export")
           for i, t in enumerate(run.serving)]
    ev = run.eval
    if ev is not None and ev.tasks:
        names = ", ".join(repr(s) for s in (ev.task_stages or [last]))
        out.append(("eval.tasks", f"the benchmark evals score the export of {names}"))
    titan = _titan_stages(run, backend)
    for i, st in enumerate(run.stages):
        if st.init_from is not None and st.init_from in titan:
            out.append((f"stages.{i}.init_from", f"stage {st.name!r} starts from the export of {st.init_from!r} "
                                                 "(torchtitan leaves no llmc checkpoint)"))
    return out


def check_hf_export(run: RunSpec, sink, backend: str | None = None) -> None:
    """X130 and T030 (module docstring) into ``sink`` (:class:`llmc.compiler.checks.Sink`); ``backend``: the name
    of the backend the plan runs on (``Compiled.backend.name``)."""
    arch = run.model
    why = hf_export_supported(arch)
    if why is not None:
        readers = hf_readers(run, backend)
        for path, what in readers:
            sink.add("X130", "error", path, f"{what}, but {arch.name} has no Hugging Face export: {why}",
                     "drop what reads the export, or use an architecture llmc.runtime.hf_io.hf_config writes")
        if not readers:
            sink.add("X130", "warning", "model", no_export_line(why),
                     "nothing in the spec reads the export; the checkpoints are kept (for a servable model, use an "
                     "architecture llmc.runtime.hf_io.hf_config writes)")
        return
    # (an exportable model whose class holds no routing bias has no expert_bias either: hf_export_supported refuses
    # one, so the bias here stands in for the auxiliary loss)
    if not _titan_stages(run, backend) or not titan_drops_routing_bias(arch):
        return
    m = arch.moe
    cls = family_of(arch).hf_class
    sink.add("T030", "warning", "model.moe.aux_loss_coef",
             f"torchtitan balances the experts with a routing bias in place of the auxiliary loss it lacks "
             f"(aux_loss_coef {m.aux_loss_coef:g}: its value is not used), which {cls} cannot hold: the Hugging "
             f"Face export picks its top-{m.top_k} experts without it, differently from training",
             "training.backend: native or deepspeed train with the auxiliary loss, which leaves nothing for the export "
             "to lose; or model.moe.aux_loss_coef: 0 trains without balancing (an exact export; experts may "
             "collapse)")


__all__ = ["ROUTING_BIAS_FAMILIES", "TITAN_KINDS", "check_hf_export", "hf_export_supported", "hf_holds_routing_bias",
           "hf_readers", "no_export_line", "titan_balances_with_bias", "titan_drops_routing_bias"]
