"""A Hugging Face import says what the trained model leaves out, refuses what transformers refuses, and checks an
``init_hf`` checkpoint's head at plan time.

* DeepSeek-V3's multi-token-prediction (MTP) layers: transformers' DeepseekV3ForCausalLM builds none, nor does llmc;
  a config counting them is a warning (S008), and an ``init_hf`` checkpoint holding their weights another (G025) with
  their size as the safetensors library counts it.
* rope_scaling: exactly the keys transformers' config validation requires per rope_type are required (S005).
* a key llmc ignores because transformers' class ignores it too: an info line (S009), held against transformers'
  logits with and without the key; a training-time regulariser transformers applies in train(): a warning (S008).
* ``architectures`` not the causal LM of its model_type (a sequence-classification head, another model's class): an
  S005 error for ``hf_config``, a G021 error for an ``init_hf`` checkpoint (which the launch's loader refuses too).
* messages: every S005 carries a hint; a missing model_type is said so; a typo gets a did-you-mean; G021 on a RoPE
  difference alone says the weights load into another model and prints the rope type's own fields; Qwen2 with
  use_sliding_window and max_window_layers >= num_hidden_layers windows no layer, as transformers' Qwen2Config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.spec.hf import CAUSAL_LM_CLASS, HFConfigError, architecture_from_hf_config
from llmc.spec.load import reads_spec

runner = CliRunner()

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
         "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
DSV3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 64,
        "intermediate_size": 160, "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "vocab_size": 128, "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 1}


def load(tmp: Path, cfg: dict) -> list:
    """The loader's diagnostics for a spec whose model is ``hf_config`` ``cfg``."""
    (tmp / "m").mkdir(exist_ok=True)
    (tmp / "m" / "config.json").write_text(json.dumps(cfg))
    text = ("name: t\nmodel: {hf_config: m/config.json}\nhardware: {gpu: h100-sxm, count: 8}\n"
            "data: {sources: [{name: web, tokens: 1T}], seq_len: 256, tokens: 1B}\n"
            "training: {precision: bf16, global_batch_tokens: 64K}\n")
    return reads_spec(text, file=str(tmp / "run.yaml"), base_dir=tmp).diagnostics


def of(diags: list, code: str) -> list:
    return [d for d in diags if d.code == code]


# ----------------------------------------------------------------------------- 1. MTP layers


def test_mtp_layers_in_the_config_are_a_warning_and_transformers_builds_none(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{
        k: v for k, v in DSV3.items() if k not in ("architectures", "model_type")}))
    assert len(model.model.layers) == DSV3["num_hidden_layers"]  # no MTP layer in transformers' model either
    (w,) = of(load(tmp_path, DSV3), "S008")
    assert w.severity == "warning" and "'num_nextn_predict_layers' 1" in w.message
    assert "model.layers.3" in w.message and "neither trained nor exported" in w.message
    assert "speculative decoding" in w.hint
    assert not of(load(tmp_path, {**DSV3, "num_nextn_predict_layers": 0}), "S008")


def _write_dsv3_checkpoint(d: Path, cfg: dict) -> int:
    """A DeepSeek-V3 checkpoint folder with MTP tensors (model.layers.3.*) besides a few main ones; returns the MTP
    tensors' element count as numpy counts it."""
    np = pytest.importorskip("numpy")
    st = pytest.importorskip("safetensors.numpy")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    mtp = {"model.layers.3.enorm.weight": np.ones(h, np.float32), "model.layers.3.hnorm.weight": np.ones(h, np.float32),
           "model.layers.3.eh_proj.weight": np.zeros((h, 2 * h), np.float32),
           "model.layers.3.shared_head.norm.weight": np.ones(h, np.float32),
           "model.layers.3.shared_head.head.weight": np.zeros((v, h), np.float32),
           "model.layers.3.mlp.experts.0.up_proj.weight": np.zeros((32, h), np.float32)}
    main = {"model.embed_tokens.weight": np.zeros((v, h), np.float32), "lm_head.weight": np.zeros((v, h), np.float32)}
    st.save_file(main, str(d / "model-00001-of-00002.safetensors"))
    st.save_file(mtp, str(d / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in main},
                            **{k: "model-00002-of-00002.safetensors" for k in mtp}}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return sum(int(a.size) for a in mtp.values())


def _stage_spec(tmp: Path, model_cfg: str, init_hf: str) -> Path:
    (tmp / "text.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    p = tmp / "run.yaml"
    p.write_text(f"""name: notices
model: {{hf_config: {model_cfg}}}
hardware: {{gpu: cpu, count: 1}}
data:
  sources: [{{name: txt, path: text.jsonl, format: jsonl}}]
  seq_len: 32
  tokens: 2K
training: {{precision: fp32, global_batch_tokens: 64, backend: native}}
stages:
  - {{name: cpt, kind: midtrain, init_hf: {init_hf}, lr: 1.0e-5, steps: 1}}
""")
    return p


def plan_json(p: Path) -> tuple[int, list[dict]]:
    r = runner.invoke(app, ["plan", str(p), "--format", "json"])
    return r.exit_code, json.loads(r.stdout)["diagnostics"]


def test_mtp_weights_of_an_init_hf_checkpoint_are_a_warning_with_their_size(tmp_path):
    size = _write_dsv3_checkpoint(tmp_path / "ck", DSV3)
    rc, diags = plan_json(_stage_spec(tmp_path, "ck/config.json", "ck"))
    (g,) = [d for d in diags if d["code"] == "G025"]
    assert g["severity"] == "warning" and g["path"] == "stages.0.init_hf"
    assert f"{size:,} parameters" in g["message"] and "model.layers.3." in g["message"]
    assert "no MTP module" in g["message"] and "speculative decoding" in g["hint"]
    assert not [d for d in diags if d["code"] == "G021"]


# ----------------------------------------------------------------------------- 2. rope_scaling's required keys

#: one complete rope_scaling per type llmc reads (a release's)
ROPES = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
             "beta_slow": 1.0},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "factor": 4.0,
                 "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("kind, key", [(k, key) for k, rs in ROPES.items() for key in rs if key != "rope_type"])
def test_rope_keys_required_exactly_where_transformers_requires_them(kind, key):
    """Each key of a complete rope_scaling left out in turn: llmc refuses the config (naming the key) exactly when
    transformers' LlamaConfig does (modeling_rope_utils.py's required keys); otherwise it takes transformers' default
    (the model then equals transformers', which tests/test_spec_hf.py's RoPE tests hold)."""
    transformers = pytest.importorskip("transformers")
    rs = {k: v for k, v in ROPES[kind].items() if k != key}
    cfg = {**LLAMA, "head_dim": 16, "rope_scaling": rs}
    try:
        transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        refused = False
    except KeyError as e:
        refused = True
        assert key in str(e)
    if refused:
        with pytest.raises(HFConfigError) as e:
            architecture_from_hf_config(cfg)
        assert f"'{key}'" in str(e.value) and "transformers refuses" in str(e.value)
        assert e.value.hints[0].startswith("give ")
    else:
        architecture_from_hf_config(cfg)


def test_incomplete_llama3_rope_is_s005_naming_both_keys(tmp_path):
    (d,) = of(load(tmp_path, {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}), "S005")
    assert "'low_freq_factor', 'high_freq_factor'" in d.message and "low_freq_factor 1.0" in d.hint


# ----------------------------------------------------------------------------- 3, 4. ignored keys, regularisers


def _logits(transformers, cfg: dict, train: bool = False):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**{
        k: v for k, v in cfg.items() if k != "architectures"}))
    model.train(train)
    torch.manual_seed(1)
    return model(torch.arange(16).view(1, 16)).logits


@pytest.mark.parametrize("key, value", [("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                                        ("query_pre_attn_scalar", 144), ("sliding_window", 4)])
def test_key_transformers_llama_ignores_is_an_info_line(tmp_path, key, value):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    assert torch.equal(_logits(transformers, LLAMA), _logits(transformers, {**LLAMA, key: value}))
    diags = load(tmp_path, {**LLAMA, key: value})
    (i,) = of(diags, "S009")
    assert i.severity == "info" and f"'{key}'" in i.message
    assert "transformers' LlamaForCausalLM ignores it as well" in i.message and i.hint
    assert not [d for d in diags if d.severity == "error"]
    assert not of(load(tmp_path, LLAMA), "S009")


@pytest.mark.parametrize("cfg, key", [
    ({**LLAMA, "attention_dropout": 0.1}, "attention_dropout"),
    ({**LLAMA, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
      "num_experts_per_tok": 2, "router_jitter_noise": 0.1}, "router_jitter_noise"),
])
def test_regulariser_transformers_applies_in_training_is_a_warning(tmp_path, cfg, key):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    # transformers applies it in train() (the outputs change), not in eval()
    off = {**cfg, key: 0.0}
    assert not torch.equal(_logits(transformers, cfg, train=True), _logits(transformers, off, train=True))
    assert torch.equal(_logits(transformers, cfg), _logits(transformers, off))
    (w,) = of(load(tmp_path, cfg), "S008")
    assert w.severity == "warning" and f"'{key}' 0.1" in w.message and "llmc trains without it" in w.message
    assert f"set {key} to 0" in w.hint
    assert not of(load(tmp_path, off), "S008")


# ----------------------------------------------------------------------------- 5. architectures


def test_causal_lm_class_table_is_transformers_auto_mapping():
    pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    known = {t: c for t, c in CAUSAL_LM_CLASS.items() if t in M}
    assert known == {t: M[t] for t in known} and len(known) >= 19


@pytest.mark.parametrize("classes", [["LlamaForSequenceClassification"], ["MambaForCausalLM"], "LlamaForCausalLM"])
def test_architectures_other_than_the_causal_lm_is_s005(tmp_path, classes):
    (d,) = of(load(tmp_path, {**LLAMA, "architectures": classes}), "S005")
    assert "'architectures'" in d.message and "LlamaForCausalLM" in d.hint


def test_sequence_classification_checkpoint_as_init_hf_is_g021(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type")},
                                   num_labels=2)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA))
    rc, diags = plan_json(_stage_spec(tmp_path, "m/config.json", "cls"))
    (g,) = [d for d in diags if d["code"] == "G021"]
    assert rc == 1 and g["severity"] == "error" and "'architectures'" in g["message"] and g["hint"]


# ----------------------------------------------------------------------------- 6. messages


BAD = [{**LLAMA, "hidden_size": "64"}, {**LLAMA, "rope_scaling": "llama3"}, {**LLAMA, "hidden_act": "relu2"},
       {**LLAMA, "attention_bias": True}, {k: v for k, v in LLAMA.items() if k != "vocab_size"},
       {**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, {**LLAMA, "rope_theta": -1},
       {**LLAMA, "model_type": "falcon"}]


@pytest.mark.parametrize("cfg", BAD)
def test_every_s005_has_a_hint(tmp_path, cfg):
    diags = of(load(tmp_path, cfg), "S005")
    assert diags and all(d.hint for d in diags), [(d.message, d.hint) for d in diags]


def test_model_type_missing_and_misspelt(tmp_path):
    (d,) = of(load(tmp_path, {k: v for k, v in LLAMA.items() if k != "model_type"}), "S005")
    assert "has no 'model_type'" in d.message and "None" not in d.message and "llama" in d.hint
    (d,) = of(load(tmp_path, {**LLAMA, "model_type": "llamaa"}), "S005")
    assert "'llamaa'" in d.message and d.hint.startswith("did you mean 'llama'?")


def test_g021_on_a_rope_difference_says_the_weights_load_into_another_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    ck = {**LLAMA, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    cfg = transformers.LlamaConfig(**{k: v for k, v in ck.items() if k not in ("architectures", "model_type")})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lin")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA))
    rc, diags = plan_json(_stage_spec(tmp_path, "m/config.json", "lin"))
    (g,) = [d for d in diags if d["code"] == "G021"]
    assert rc == 1 and "would not load" not in g["message"] and "another function" in g["message"]
    assert "linear(factor=2.0)" in g["message"] and "low_freq_factor" not in g["message"]


@pytest.mark.parametrize("first", [2, 5])
def test_qwen2_window_from_past_the_last_layer_is_full_attention_as_transformers(first):
    transformers = pytest.importorskip("transformers")
    cfg = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
           "sliding_window": 16, "max_window_layers": first}
    theirs = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    assert set(theirs.layer_types) == {"full_attention"}
    assert architecture_from_hf_config(cfg).sliding_window is None
    mixed = {**cfg, "max_window_layers": 1}
    assert set(transformers.Qwen2Config(**{k: v for k, v in mixed.items() if k not in (
        "architectures", "model_type")}).layer_types) == {"full_attention", "sliding_attention"}
    with pytest.raises(HFConfigError, match="max_window_layers"):
        architecture_from_hf_config(mixed)
