"""MoE routing balance and the Hugging Face export: what the plan promises is what the export holds.

* torchtitan 0.3.0 has no auxiliary balancing loss: llmc's job balances with a routing bias instead (``expert_bias_E``,
  added to the router scores for the top-k choice only), which Mixtral / Qwen3-MoE / DeepSeek-V2 cannot hold. The plan
  says so (T030), the job's notes say so, and the export says so with the bias's size when it leaves a non-zero one out.
* A model with no Hugging Face export (the ``tiny-moe`` preset's shared experts) is reported at plan time (X130): an
  error where something reads the export, else a warning.
* T008 (no load-balancing loss) stays quiet for a model balanced aux-loss-free; DeepSeek-V3's config.json import and
  preset agree on aux_loss_coef.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from llmc.compiler.checks import Sink  # noqa: E402
from llmc.spec.schema import RunSpec  # noqa: E402

TINY_MIX = dict(name="tiny-mix", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
                max_seq_len=128, moe={"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.02})


def _spec(model, backend="torchtitan", **more) -> dict:
    return {"name": "moe-review", "model": model, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 64, "tokens": 81920},
            "training": {"backend": backend, "precision": "fp32", "global_batch_tokens": 4096,
                         "optimizer": {"lr": 3e-3}, "checkpoint": {"interval_steps": 20}}, **more}


def _checked(spec: dict, backend: str | None = None) -> list:
    """X130 / T030 of ``spec`` (llmc.hf_export.check_hf_export), with the backend the real compiler picks."""
    from llmc.compiler.compile import compile_spec
    from llmc.hf_export import check_hf_export

    run = RunSpec.model_validate(spec)
    sink = Sink({}, "s.yaml")
    check_hf_export(run, sink, backend or compile_spec(run, "s.yaml").backend.name)
    return sink.items


# ----------------------------------------------------------------------------- T030: the torchtitan routing bias


def test_plan_warns_when_torchtitan_balances_with_a_bias_mixtral_cannot_hold():
    """aux_loss_coef > 0 on torchtitan: the job balances with a routing bias (load_balance_coeff set) and Mixtral's
    config has no field for it: T030, naming the fixes; none for the native backend (it adds the auxiliary loss,
    llmc.runtime.model.MoE.forward), for aux_loss_coef 0 (no bias: an exact export), or for DeepSeek-V3's block (its
    export writes the bias as e_score_correction_bias)."""
    from llmc.hf_export import titan_balances_with_bias

    got = [d for d in _checked(_spec(TINY_MIX)) if d.code == "T030"]
    assert len(got) == 1 and got[0].severity == "warning" and got[0].path == "model.moe.aux_loss_coef"
    assert "MixtralForCausalLM" in got[0].message and "top-2" in got[0].message
    assert "training.backend: native or deepspeed" in got[0].hint and "aux_loss_coef: 0" in got[0].hint
    assert not _checked(_spec(TINY_MIX, backend="native"))
    off = {**TINY_MIX, "moe": {**TINY_MIX["moe"], "aux_loss_coef": 0.0}}
    assert not titan_balances_with_bias(RunSpec.model_validate(_spec(off)).model.moe)
    assert not [d for d in _checked(_spec(off)) if d.code == "T030"]
    dsv3 = dict(name="tiny-dsv3", n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=512, max_seq_len=128,
                mla={"q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                     "v_head_dim": 16},
                moe={"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_d_ff": 32, "dense_layers": 1,
                     "aux_loss_coef": 0.001, "score_func": "sigmoid", "expert_bias": True})
    assert not _checked(_spec(dsv3), backend="torchtitan")


def test_the_torchtitan_job_notes_the_bias_the_export_cannot_hold():
    """The job's header says the coefficient's value is not used and that the export routes without the bias; the job
    sets load_balance_coeff exactly when llmc.hf_export.titan_balances_with_bias says so."""
    from llmc.emit.torchtitan import LOAD_BALANCE_COEFF, _moe

    arch = RunSpec.model_validate(_spec(TINY_MIX)).model
    notes: list[str] = []
    moe = _moe(arch, notes, [])
    assert moe["load_balance_coeff"] == LOAD_BALANCE_COEFF
    assert len(notes) == 1 and "value is not used" in notes[0] and "MixtralForCausalLM" in notes[0]
    assert "T030" in notes[0]
    off = arch.model_copy(update={"moe": arch.moe.model_copy(update={"aux_loss_coef": 0.0})})
    notes = []
    assert _moe(off, notes, [])["load_balance_coeff"] is None and not notes


def test_routing_with_and_without_the_bias_differs():
    """Why T030 matters, on tensors: torchtitan's own router (TokenChoiceTopKRouter, softmax, renormalised top-2)
    with the bias the reviewer's 20-step run ended with, against the same router without it (what MixtralForCausalLM
    computes from the exported gate: softmax, top-2): a share of the tokens pick other experts."""
    torch = pytest.importorskip("torch")
    from torchtitan.models.common.config_utils import make_router_config

    torch.manual_seed(0)
    router = make_router_config(dim=64, num_experts=4, gate_param_init={}, top_k=2, score_func="softmax",
                                route_norm=True).build()
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.02)
    x = torch.randn(1, 2048, 64)
    bias = torch.tensor([0.0095, 0.0095, -0.0145, -0.0045])
    _, trained, _ = router(x, bias)
    _, exported, _ = router(x, None)
    differ = (trained.sort(-1).values != exported.sort(-1).values).any(-1).float().mean().item()
    assert differ > 0.05  # (the reviewer measured 22.8% and 19.7% of 2,048 tokens on the trained layers)
    # HF Mixtral's routing is the unbiased one (transformers: softmax over the gate logits, top-k)
    logits = x[0] @ router.gate.weight.T
    hf = torch.topk(torch.softmax(logits, -1), 2, dim=-1).indices
    assert torch.equal(hf.sort(-1).values, exported[0].sort(-1).values)


def test_export_of_a_torchtitan_checkpoint_says_it_drops_the_routing_bias(tmp_path, capsys):
    """`llmc export` of a torchtitan stage (DCP checkpoint with the job's ``layers.N.moe.expert_bias_E``): the Mixtral
    export is written, without the bias (config.json has no field for it, no tensor holds it), and one warning line
    gives its size; the export's record keeps the note."""
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from test_build_fakes import lock_for

    from llmc.runtime.export import main as export_main
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import build_model

    lock = lock_for(_spec(TINY_MIX), spec_path=str(tmp_path / "spec.yaml"))
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    job = TrainJob.from_lock(lock, None, build_dir=tmp_path)
    sd = build_model(job.arch, seed=0).state_dict()
    biases = {0: torch.tensor([0.0095, 0.0095, -0.0145, -0.0045]), 1: torch.tensor([0.002, -0.001, 0.0, -0.001])}
    for i, b in biases.items():
        sd[f"layers.{i}.moe.expert_bias_E"] = b
    dcp.save({"model": sd}, checkpoint_id=str(tmp_path / "outputs/torchtitan/checkpoint/step-20"))
    assert export_main([str(tmp_path), "--stage", "pretrain"]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "warning[T030]" in ln]
    assert len(lines) == 1, err
    assert "0.0145" in lines[0] and "2 of 2 MoE layers" in lines[0] and "MixtralForCausalLM" in lines[0]
    assert "0.024" in lines[0]  # the largest spread: 0.0095 - (-0.0145)
    hf = tmp_path / "run" / "pretrain" / "hf"
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and not any("bias" in k for k in cfg)
    tensors = load_file(str(next(hf.glob("*.safetensors"))))
    assert not any("bias" in k for k in tensors)
    assert "routing bias" in json.loads((hf / ".llmc-export.json").read_text())["bias_note"]


def test_a_bias_that_never_moved_is_no_news():
    """All-zero biases (a run that never stepped, or aux_loss_coef 0 with no buffer) route as none: no warning."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.hf_io import dropped_bias_note

    arch = RunSpec.model_validate(_spec(TINY_MIX)).model
    sd = {"layers.0.moe.expert_bias": torch.zeros(4), "layers.0.moe.router.gate.weight": torch.ones(4, 64)}
    assert dropped_bias_note(sd, {"layers.0.moe.router.gate.weight"}, arch) is None
    sd["layers.0.moe.expert_bias"] = torch.tensor([0.0, 0.001, 0.0, -0.001])
    assert "0.001" in dropped_bias_note(sd, {"layers.0.moe.router.gate.weight"}, arch)
    assert dropped_bias_note(sd, set(sd), arch) is None  # kept (DeepSeek-V3: e_score_correction_bias)


# ----------------------------------------------------------------------------- X130: no Hugging Face export


def test_the_export_rule_is_one_pure_module():
    """One rule: the runtime's export obeys llmc.hf_export.hf_export_supported (pure, no torch), which the plan's
    X130 reads too."""
    pytest.importorskip("torch")
    from llmc import hf_export
    from llmc.runtime import hf_io

    assert hf_io.hf_export_supported is hf_export.hf_export_supported


def test_tiny_moe_without_an_export_is_reported_at_plan_time():
    """The tiny-moe preset (shared experts) has no Hugging Face class: a warning when nothing reads the export, an
    error at each thing that does (a serving target, the benchmark evals, a stage starting from a torchtitan stage's
    export); a stage starting from a native stage reads its llmc checkpoint instead (a warning only)."""
    from llmc.spec.presets import PRESETS

    spec = _spec(PRESETS["tiny-moe"].model_dump())
    got = _checked(spec)
    assert [(d.code, d.severity, d.path) for d in got] == [("X130", "warning", "model")]
    assert "shared experts" in got[0].message and "without a Hugging Face export" in got[0].message
    served = _checked({**spec, "serving": [{"engine": "vllm", "gpu": "h100-sxm"}]})
    assert [(d.code, d.severity, d.path) for d in served] == [("X130", "error", "serving.0")]
    evaluated = _checked({**spec, "eval": {"tasks": ["hellaswag"]}})
    assert [(d.code, d.severity, d.path) for d in evaluated] == [("X130", "error", "eval.tasks")]
    stages = {"stages": [{"name": "base", "kind": "pretrain"},
                         {"name": "chat", "kind": "sft", "init_from": "base",
                          "data": {"sources": [{"name": "chat", "path": "/data/sft/*.jsonl", "kind": "chat"}],
                                   "seq_len": 64, "tokens": 8192}}]}
    run_stages = {**spec, **stages}
    assert [(d.severity, d.path) for d in _checked(run_stages, "torchtitan")] == [("error", "stages.1.init_from")]
    assert [(d.severity, d.path) for d in _checked(run_stages, "native")] == [("warning", "model")]


def test_an_exportable_model_has_no_x130():
    got = _checked(_spec({**TINY_MIX, "moe": {**TINY_MIX["moe"], "aux_loss_coef": 0.0}}))
    assert not got


# ----------------------------------------------------------------------------- T008 and DeepSeek-V3's aux loss


def _t008(model: dict, backend: str) -> list:
    from llmc.compiler import backends
    from llmc.compiler.checks import check_hyper
    from llmc.compiler.compile import compile_spec

    run = RunSpec.model_validate(_spec(model, backend=backend))
    c = compile_spec(run, "s.yaml")
    sink = Sink({}, "s.yaml")
    check_hyper(run, c.hyper, 1e6, 3e-4, 1, True, sink, backends.get_backend(backend))
    return [d for d in sink.items if d.code == "T008"]


def test_t008_is_quiet_for_aux_loss_free_balancing():
    """expert_bias with aux_loss_coef 0 (GLM-4.5, DeepSeek-V3's config.json import) balances aux-loss-free on the
    native runner (train.py moves the bias) and torchtitan's job: no T008. DeepSpeed's runner never moves the bias:
    T008 there. No balancing at all: T008 everywhere."""
    biased = dict(name="tiny-glm", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
                  max_seq_len=128, moe={"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "aux_loss_coef": 0.0,
                                        "score_func": "sigmoid", "expert_bias": True})
    assert not _t008(biased, "native") and not _t008(biased, "torchtitan")
    assert len(_t008(biased, "deepspeed")) == 1
    plain = {**TINY_MIX, "moe": {**TINY_MIX["moe"], "aux_loss_coef": 0.0}}
    assert len(_t008(plain, "native")) == 1 and len(_t008(plain, "torchtitan")) == 1


DSV3_CONFIG = {  # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json, without its auto_map
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def test_deepseek_v3_import_and_preset_agree_on_the_aux_loss():
    """DeepSeek-V3's config.json says aux_loss_alpha 0.001 (seq_aux true): its import and the preset agree on it. A
    config saved by transformers' DeepseekV3Config has no such key (the class has no auxiliary loss): no loss, and,
    balanced aux-loss-free by its routing bias, no T008 on the native or torchtitan backend."""
    from llmc.spec.hf import architecture_from_hf_config
    from llmc.spec.presets import PRESETS

    preset = PRESETS["deepseek-v3"].moe
    full = architecture_from_hf_config(DSV3_CONFIG, name="dsv3").moe
    assert full.aux_loss_coef == preset.aux_loss_coef == DSV3_CONFIG["aux_loss_alpha"]
    assert full.expert_bias and preset.expert_bias
    resaved = architecture_from_hf_config({k: v for k, v in DSV3_CONFIG.items()
                                           if k not in ("aux_loss_alpha", "seq_aux")}, name="dsv3")
    assert resaved.moe.aux_loss_coef == 0.0 and resaved.moe.expert_bias
    small = resaved.model_copy(update={"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "d_ff": 128,
                                       "vocab_size": 512, "max_seq_len": 128})
    assert not _t008(small.model_dump(), "native") and not _t008(small.model_dump(), "torchtitan")
    try:
        from transformers import DeepseekV3Config
    except ImportError:
        return
    assert "aux_loss_alpha" not in DeepseekV3Config().to_dict()  # why a re-saved config lacks it
