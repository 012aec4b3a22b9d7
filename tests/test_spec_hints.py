"""Diagnostics that must say what is wrong and how to fix it: an ``ac_layers`` no layout can have, a YAML 1.1 boolean
where a string belongs, and G005's split of a pre-training plan that does not fit."""

from __future__ import annotations

import re

import pytest

from llmc.compiler.compile import compile_spec
from llmc.spec.load import loads_spec, reads_spec


def _compile(text: str, fit_check: bool = True):
    run, lines = loads_spec(text, file="s.yaml")
    return compile_spec(run, "s.yaml", lines, spec_bytes=b"", fit_check=fit_check)


MIXTRAL = """name: t
model: mixtral-8x7b
hardware: {gpu: h100-sxm, count: 256}
data: {seq_len: 4096, tokens: 1T}
training: {global_batch_tokens: 4194304}
parallelism: PINS
"""


def test_ac_layers_beyond_the_models_layers_is_a_located_error_with_the_others():
    """Mixtral-8x7B has 32 decoder layers (HF config num_hidden_layers 32, mistralai/Mixtral-8x7B-v0.1); ac_layers
    counts blocks per pipeline model chunk, which never hold more: 100 is an error at parallelism.ac_layers naming
    the 32, reported together with an unrelated pin error."""
    c = _compile(MIXTRAL.replace("PINS", "{activation_checkpointing: partial, ac_layers: 100, tp: 3}"))
    errs = [d for d in c.diagnostics if d.severity == "error"]
    ac = [d for d in errs if d.path == "parallelism.ac_layers"]
    assert len(ac) == 1 and ac[0].code == "P012" and ac[0].line == 6
    assert "100" in ac[0].message and "32" in ac[0].message and ac[0].hint
    assert any(d.path == "parallelism.tp" for d in errs)  # every error at once
    assert c.plan is None


@pytest.mark.parametrize("k, errors", [(32, 0), (33, 1)])
def test_ac_layers_up_to_the_models_layers_is_no_error(k, errors):
    """At most the model's 32 blocks is a count some layout has (32 = every block: P013 says it is full)."""
    c = _compile(MIXTRAL.replace("PINS", f"{{activation_checkpointing: partial, ac_layers: {k}}}"))
    assert len([d for d in c.diagnostics if d.path == "parallelism.ac_layers" and d.severity == "error"]) == errors


SPEC = """name: NAME
model: llama3-8b
hardware: {gpu: h100-sxm, count: 8}
data:
  sources:
    - name: SOURCE
      path: /data/web/*.parquet
      format: parquet
      tokens: 1T
  seq_len: 4096
  tokens: 1B
training: {global_batch_tokens: 1048576}
"""


@pytest.mark.parametrize("word, value", [("off", "false"), ("no", "false"), ("yes", "true"), ("On", "true")])
def test_a_yaml_boolean_where_a_string_belongs_says_to_quote_it(word, value):
    """YAML 1.1 (https://yaml.org/type/bool.html; PyYAML's safe loader) reads unquoted yes / no / on / off as
    booleans: the error for a string field says so and shows the quoted value, as the file spells it."""
    loaded = reads_spec(SPEC.replace("NAME", word).replace("SOURCE", word), file="s.yaml")
    by_path = {d.path: d for d in loaded.diagnostics if d.severity == "error"}
    for path, key, line in (("name", "name", 1), ("data.sources.0.name", "name", 6)):
        d = by_path[path]
        assert d.line == line and "must be a string" in d.message
        assert f'{key}: "{word}"' in d.hint and f"unquoted {word} as {value}" in d.hint


def test_a_quoted_value_is_a_string():
    loaded = reads_spec(SPEC.replace("NAME", '"off"').replace("SOURCE", "'no'"), file="s.yaml")
    assert not [d for d in loaded.diagnostics if d.severity == "error"]
    assert loaded.run.name == "off" and loaded.run.data.sources[0].name == "no"


# Llama 3 70B: 70,553,706,496 parameters (the safetensors total of meta-llama/Meta-Llama-3-70B). A replica
# (dp_replicate 16, no sharding) on torchtitan holds fp32 weights (4 B), fp32 grads (4 B) and AdamW's two fp32
# moments (8 B) of every parameter: 16 B/param (Rajbhandari et al., "ZeRO", 2020, sec. 3.1, with fp32 params).
LLAMA3_70B_PARAMS = 70_553_706_496
G005 = """name: t
model: llama3-70b
hardware: {gpu: h100-sxm, count: 16}
data: {seq_len: 8192, tokens: 10B}
training: {global_batch_tokens: 1048576}
parallelism: PINS
"""


def _g005(pins: str):
    c = _compile(G005.replace("PINS", pins), fit_check=False)
    (d,) = [d for d in c.diagnostics if d.code == "G005"]
    total = float(re.search(r"needs ([0-9.]+) GiB per GPU", d.message).group(1)) * 2**30 / 1e9
    part = float(re.match(r"([0-9.]+) GiB of it is", d.hint).group(1)) * 2**30 / 1e9
    return d, total, part


def test_g005_splits_a_pretraining_plan_into_states_and_one_micro_step():
    """llmc plan --no-fit-check on 16 replicas of Llama 3 70B: the model states are 16 B x 70.55B = 1,128.9 GB per
    GPU; with micro_batch 8 and no recomputation the rest (the micro-step) is the bulk and is named as the total
    less the states, with pre-training's own remedies (it runs TP / PP / CP, unlike the post-training stages)."""
    states = 16 * LLAMA3_70B_PARAMS / 1e9
    d, total, step = _g005("{dp_replicate: 16, micro_batch: 8, activation_checkpointing: none}")
    assert "one micro-step" in d.hint and step == pytest.approx(total - states, abs=0.15)
    assert step < total and "stages other than pre-training" not in d.hint
    assert "activation_checkpointing" in d.hint
    d, total, part = _g005("{dp_replicate: 16, micro_batch: 1, activation_checkpointing: full}")
    assert "optimizer states" in d.hint and part == pytest.approx(states, abs=0.1)
    assert "dp_shard" in d.hint


LORA_SPEC = """name: t
model: tiny
hardware: {gpu: cpu, count: 1}
data: {seq_len: 64, tokens: 1M, tokenizer: {path: /t, chat_template: llama3}}
stages:
  - {name: s, kind: sft, init_hf: /m, lora: {targets: TARGETS},
     data: {sources: [{name: c, path: /d.jsonl, kind: chat}], seq_len: 64, tokens: 1M}}
"""


@pytest.mark.parametrize("given, ours", [
    ("[q_proj, v_proj]", ["wq", "wv"]),
    ("[gate_proj, up_proj, down_proj, o_proj, k_proj]", ["w1", "w3", "w2", "wo", "wk"]),
    ("[wq, q_proj]", ["wq"]),
    ("all-linear", ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]),
])
def test_lora_targets_take_peft_names(given, ours):
    """PEFT users name the adapted linears by their Hugging Face modules (LoraConfig(target_modules=["q_proj",
    "v_proj"]), or "all-linear"); transformers' Llama block: q/k/v/o_proj in self_attn, gate/up/down_proj in mlp,
    whose gate is torchtitan's w1, up w3 and down w2 (models/llama3/model/model.py: w2(silu(w1(x)) * w3(x)))."""
    run, _ = loads_spec(LORA_SPEC.replace("TARGETS", given), file="s.yaml")
    assert list(run.stages[0].lora.targets) == ours


def test_an_hf_config_error_of_the_whole_model_reads_as_one_sentence(tmp_path):
    """A check of the whole model (no field to name) is still one message after the file's name, single-spaced."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 300, "n_group": 4, "topk_group": 4,
        "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16, "v_head_dim": 16, "max_position_embeddings": 256}))
    (tmp_path / "s.yaml").write_text("name: t\nmodel: {hf_config: config.json}\nhardware: {gpu: cpu, count: 1}\n"
                                     "data: {seq_len: 64, tokens: 1M}\n")
    from llmc.diagnostics import SpecError
    from llmc.spec.load import load_spec

    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "s.yaml")
    (msg,) = [d.message for d in e.value.diagnostics if "top_k" in d.message]
    assert re.fullmatch(r"config\.json: top_k 300 exceeds \S.*", msg), msg
