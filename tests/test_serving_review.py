"""Serving review findings: V011 (serving past the context the model was trained at), vLLM 0.33's name for online fp8,
``serving[].host`` / ``served_model_name``, M005 for a tokenizer smaller than a padded embedding, and V002's hint.

Figures come from the published model shapes and the spec's own numbers, not from llmc's output; vLLM 0.33.0's own
reading of the fp8, host and name targets is in tests/test_vllm_parsers.py (one vLLM process for every vLLM check)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llmc.compiler.compile import compile_spec
from llmc.compiler.serving import plan_serving
from llmc.diagnostics import SpecError
from llmc.spec.load import loads_spec
from llmc.spec.model import Architecture
from llmc.spec.schema import RunSpec

GiB = 2**30
CHAT = "{sources: [{name: c, path: c.jsonl, kind: chat}], seq_len: 4096, tokens: 10M}"


def _compile(body: str, model: str = "llama3.1-8b", seq_len: int = 8192, count: int = 8):
    text = (f"name: rv\nmodel: {model}\nhardware: {{gpu: h100-sxm, count: {count}}}\n"
            f"data: {{sources: [{{name: web, path: web.jsonl}}], seq_len: {seq_len}, tokens: 1B}}\n" + body)
    run, lines = loads_spec(text, file="s.yaml")
    return compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())


def _v(c, code: str) -> list:
    return [d for d in c.diagnostics if d.code == code]


# ----------------------------------------------------------------------------- V011: trained context


def test_v011_a_preset_pretrained_at_8k_served_at_128k():
    """Llama 3.1 8B's config states 131,072 positions (so V005 lets it through), but a run that pre-trains that shape
    from scratch at 8,192 has trained at 8,192: Llama 3's 128K came from a separate long-context continued
    pre-training after 8K (arXiv:2407.21783, sec. 3.4.2). Every target past 8,192 is warned, at its own line."""
    c = _compile("serving:\n  - {engine: vllm, max_model_len: 131072, concurrency: 8}\n"
                 "  - {engine: sglang, max_model_len: 131072, concurrency: 8}\n"
                 "  - {engine: vllm, max_model_len: 8192, concurrency: 8}\n")
    v = _v(c, "V011")
    assert [(d.severity, d.path, d.line) for d in v] == [("warning", "serving.0.max_model_len", 6),
                                                        ("warning", "serving.1.max_model_len", 7)]
    assert "trained at 8192" in v[0].message and "served at 131072" in v[0].message
    assert "long_context" in v[0].hint and "max_model_len <= 8192" in v[0].hint
    assert not _v(c, "V005") and all(p.fits for p in c.serving)


def test_v011_tiny_model_trained_at_128_served_at_1024():
    """/tmp/rev10/rope.yaml's shape: a tiny model whose max_seq_len (and llama3 RoPE scaling) state 1,024 positions,
    trained at 128; the target without max_model_len serves the trained 128 and is not warned."""
    text = ("name: rope\nmodel: {preset: tiny, max_seq_len: 1024, rope_scaling: {type: llama3, factor: 8, "
            "original_max_position: 128}}\nhardware: {gpu: cpu, count: 1}\n"
            "data: {sources: [{name: python-docs, format: builtin}], tokenizer: {train: true, vocab_size: 2048}, "
            "seq_len: 128, tokens: 8192}\ntraining: {precision: fp32, global_batch_tokens: 4096}\n"
            "serving:\n  - {engine: vllm, gpu: l40s, max_model_len: 1024}\n  - {engine: sglang, gpu: l40s}\n")
    run, lines = loads_spec(text, file="rope.yaml")
    c = compile_spec(run, "rope.yaml", lines, spec_bytes=text.encode())
    v = _v(c, "V011")
    assert [d.path for d in v] == ["serving.0.max_model_len"]
    assert "trained at 128" in v[0].message and "served at 1024" in v[0].message
    assert [p.max_model_len for p in c.serving] == [1024, 128]


def test_v011_counts_the_long_context_stage_of_the_served_chain_only():
    pre = "  - {name: base, kind: pretrain}\n"
    long = ("  - {name: long, kind: long_context, init_from: base, rope_scaling: {type: yarn, factor: 4}, "
            "data: {seq_len: 32768, tokens: 1B}}\n")
    sft = f"  - {{name: chat, kind: sft, init_from: long, data: {CHAT}}}\n"
    sibling = f"  - {{name: chat2, kind: sft, init_from: base, data: {CHAT}}}\n"
    c = _compile("stages:\n" + pre + long + sft + sibling + "serving:\n"
                 "  - {stage: chat, max_model_len: 32768, concurrency: 4}\n"
                 "  - {stage: chat, max_model_len: 65536, concurrency: 4}\n"
                 "  - {stage: chat2, max_model_len: 32768, concurrency: 4}\n")
    v = _v(c, "V011")
    # chat descends from the 32K extension (its own 4K SFT does not lower that); chat2 from the 8K base only
    assert [d.path for d in v] == ["serving.1.max_model_len", "serving.2.max_model_len"]
    assert "trained at 32768" in v[0].message and "'long'" in v[0].message
    assert "trained at 8192" in v[1].message and "'base'" in v[1].message


def test_v011_a_released_checkpoint_brings_its_own_context():
    """Fine-tuning Llama 3.1 8B from its release (init_hf) at 4K: the base was trained to 131,072 (its config's
    max_position_embeddings, the preset's max_seq_len), so serving 131,072 is not warned; the same shape trained
    from scratch at 4K is."""
    c = _compile("stages:\n  - {name: chat, kind: sft, init_hf: meta-llama/Llama-3.1-8B, data: "
                 f"{CHAT}}}\nserving:\n  - {{max_model_len: 131072, concurrency: 4}}\n")
    assert not _v(c, "V011") and not _v(c, "V005")
    c = _compile(f"stages:\n  - {{name: chat, kind: sft, data: {CHAT}}}\n"
                 "serving:\n  - {max_model_len: 131072, concurrency: 4}\n")
    assert [d.path for d in _v(c, "V011")] == ["serving.0.max_model_len"]
    assert "trained at 4096" in _v(c, "V011")[0].message
    # a run without stages that continues pre-training a release (training.init_hf)
    c = _compile("training: {init_hf: meta-llama/Llama-3.1-8B}\nserving:\n  - {max_model_len: 131072, "
                 "concurrency: 4}\n")
    assert not _v(c, "V011")


def test_v011_not_on_top_of_v005():
    """Past the export's own context the engines refuse to start (V005, an error): one diagnostic, not two."""
    c = _compile("serving:\n  - {max_model_len: 16384, concurrency: 4}\n", model="llama3-8b")  # Llama 3: 8,192
    assert [d.code for d in c.diagnostics if d.code.startswith("V")] == ["V005"]


# ----------------------------------------------------------------------------- vLLM online fp8, host, served name


def _build(body: str, tmp_path: Path, model: str = "llama3-8b") -> tuple[dict[str, str], dict]:
    from llmc.emit import render_artifacts

    c = _compile(body, model=model)
    assert not [d for d in c.diagnostics if d.severity == "error"], [d.render() for d in c.diagnostics]
    files = {k: v for k, v in render_artifacts(c).items() if k.startswith("serving/")}
    for k, v in files.items():
        (tmp_path / k).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / k).write_text(v)
    return files, {k: yaml.safe_load(v) for k, v in files.items()}


def test_fp8_is_vllm_online_per_tensor_and_sglang_fp8(tmp_path):
    files, cfg = _build("serving:\n  - {engine: vllm, quantization: fp8, concurrency: 8}\n"
                        "  - {engine: sglang, quantization: fp8, concurrency: 8}\n", tmp_path)
    assert cfg["serving/vllm.yaml"]["quantization"] == "fp8_per_tensor"
    assert cfg["serving/sglang.yaml"]["quantization"] == "fp8"


def test_host_defaults_to_each_engines_own_and_names_pass_through(tmp_path):
    _, cfg = _build("serving:\n  - {engine: vllm, concurrency: 8}\n  - {engine: sglang, concurrency: 8}\n", tmp_path)
    for f in ("serving/vllm.yaml", "serving/sglang.yaml"):
        assert "host" not in cfg[f] and cfg[f]["served-model-name"] == "rv-pretrain"
    _, cfg = _build("serving:\n  - {engine: vllm, concurrency: 8, host: 127.0.0.1, served_model_name: org/chat-1}\n"
                    "  - {engine: sglang, concurrency: 8, host: '::', served_model_name: a.b_c}\n", tmp_path)
    assert (cfg["serving/vllm.yaml"]["host"], cfg["serving/vllm.yaml"]["served-model-name"]) == ("127.0.0.1",
                                                                                                 "org/chat-1")
    assert (cfg["serving/sglang.yaml"]["host"], cfg["serving/sglang.yaml"]["served-model-name"]) == ("::", "a.b_c")


_HOST = "name: t\nmodel: llama3-8b\nhardware: {{gpu: h100-sxm, count: 8}}\ndata: {{seq_len: 8192, tokens: 1B}}\n" \
    "serving:\n  - {{host: {}}}\n"


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1", "fe80::1%eth0", "localhost", "node-1.example.org",
                                  "gpu01"])
def test_host_accepts_ip_literals_and_host_names(host):
    run, _ = loads_spec(_HOST.format(json.dumps(host)), file="s.yaml")
    assert run.serving[0].host == host


@pytest.mark.parametrize("host", ["0.0.0.0; rm -rf /", "a b", "-lead", "trail-.org", "010.0.0.1", "1.2.3", "",
                                  "host\n# x", "127.0.0.1\n", "fe80::1%a b", "fe80::1%\n#x", 'x"y', "a" * 64 + ".org", "ex..org", "256.1.1.1"])
def test_host_refuses_what_is_neither(host):
    with pytest.raises(SpecError) as e:
        loads_spec(_HOST.format(json.dumps(host)), file="s.yaml")
    assert "serving.0.host: must be an IP address" in str(e.value)


@pytest.mark.parametrize("name", ["a b", "../x", "x/", "/x", "a//b", "a\nb", "ab\n", 'q"', "-x", "x" * 129])
def test_served_model_name_is_restricted(name):
    text = f"name: t\nmodel: llama3-8b\nhardware: {{gpu: h100-sxm, count: 8}}\ndata: {{seq_len: 8192, tokens: 1B}}\n" \
           f"serving:\n  - {{served_model_name: {json.dumps(name)}}}\n"
    with pytest.raises(SpecError) as e:
        loads_spec(text, file="s.yaml")
    assert "serving.0.served_model_name: must be simple names" in str(e.value)


# ----------------------------------------------------------------------------- M005: a padded embedding


QWEN = ("name: qv\nmodel: qwen2.5-7b\nhardware: {{gpu: h100-sxm, count: 8}}\n"
        "data: {{sources: [{{name: web, path: web.jsonl}}], tokenizer: {{vocab_size: {v}}}, seq_len: 8192, "
        "tokens: 1B}}\nserving:\n  - {{engine: vllm, max_model_len: 8192}}\n")


def test_m005_a_tokenizer_smaller_than_the_embedding_is_valid():
    """Qwen2.5-7B's tokenizer has 151,665 tokens and its embedding 152,064 rows (config.json vocab_size), Gemma 3's
    262,144 and 262,208: both pad the embedding, whose extra rows no token id reaches."""
    run, _ = loads_spec(QWEN.format(v=151665), file="qv.yaml")
    assert run.model.vocab_size == 152064 and run.data.tokenizer.vocab_size == 151665
    run, _ = loads_spec(QWEN.format(v=152064), file="qv.yaml")
    with pytest.raises(SpecError) as e:  # one token id past the embedding
        loads_spec(QWEN.format(v=152065), file="qv.yaml")
    d = [x for x in e.value.diagnostics if x.code == "M005"]
    assert len(d) == 1 and d[0].path == "data.tokenizer.vocab_size" and "152065" in d[0].message


def test_a_padded_embedding_compiles_and_exports_the_models_vocab():
    """The whole pipeline: no error; the export's config.json keeps the model's 152,064 rows, and llmc's model sizes
    its embedding and head by the model's vocab_size, so every id of a smaller tokenizer has a row (a tiny model:
    2,048 rows, ids of a 2,000-token tokenizer)."""
    import torch

    from llmc.runtime.hf_io import hf_config
    from llmc.runtime.model import Transformer
    from llmc.spec.presets import PRESETS

    run, lines = loads_spec(QWEN.format(v=151665), file="qv.yaml")
    c = compile_spec(run, "qv.yaml", lines)
    assert not [d.render() for d in c.diagnostics if d.severity == "error"]
    assert hf_config(run.model)["vocab_size"] == 152064
    tiny = PRESETS["tiny"]
    torch.manual_seed(0)
    m = Transformer(tiny)
    assert m.tok_embeddings.num_embeddings == tiny.vocab_size == 2048
    logits = m(torch.randint(0, 2000, (1, 16)))
    assert logits.shape == (1, 16, 2048) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- V002's hint


def _llama(n_layers, d, heads, kv, d_ff, vocab=128256) -> dict:
    return dict(name="x", n_layers=n_layers, d_model=d, n_heads=heads, n_kv_heads=kv, d_ff=d_ff, vocab_size=vocab,
                rope_theta=500000.0)


def _params(n_layers, d, heads, kv, d_ff, vocab=128256) -> tuple[int, int]:
    """(block parameters incl. the final norm, untied embedding + LM head) of a Llama block, by hand."""
    hd = d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * d_ff + 2 * d
    return n_layers * per_layer + d, 2 * vocab * d


def _plan_on(arch: dict, gib: float, gpus: int | None):
    gpu = SimpleNamespace(key="g", hbm_bytes=int(gib * GiB), gpus_per_node=8)
    run = RunSpec.model_validate({"name": "t", "model": Architecture(**arch).model_dump(),
                                  "data": {"seq_len": 8192, "tokens": 1e9}, "hardware": {"gpu": "g", "count": 8},
                                  "serving": [{"gpus": gpus, "concurrency": 1, "max_model_len": 4096}]})
    return plan_serving(run, lambda k: gpu if k == "g" else None)


def test_v002_offers_fp8_only_where_fp8_weights_fit():
    """Llama 3 70B (70,553,706,496 parameters: Meta's config) on one 24 GiB GPU: 16-bit weights 131.4 GiB, fp8
    67.7 GiB (embedding and head kept in 16 bit), against 0.9 x 24 = 21.6 GiB usable: fp8 does not help, the weights
    alone need ceil(131.4 / 21.6) = 7 GPUs (4 at fp8). Llama 3 8B on one 16 GiB GPU: 15.0 GiB 16-bit weights do not
    fit 14.4 GiB; 8.5 GiB of fp8 weights do, so fp8 is the hint."""
    shape70 = (80, 8192, 64, 8, 28672)
    blocks, emb = _params(*shape70)
    assert blocks + emb == 70_553_706_496
    usable = 0.9 * 24 * GiB
    n16, n8 = math.ceil((blocks + emb) * 2 / usable), math.ceil((blocks + emb * 2) / usable)
    assert (n16, n8) == (7, 4)
    _, diags = _plan_on(_llama(*shape70), 24, 1)
    d = [x for x in diags if x.code == "V002"]
    assert len(d) == 1 and "quantization: fp8:" not in d[0].hint
    assert f"at least {n16} GPUs" in d[0].hint and f"at least {n8}" in d[0].hint and "weights alone" in d[0].hint
    # already fp8: the count at fp8
    run = RunSpec.model_validate({"name": "t", "model": Architecture(**_llama(*shape70)).model_dump(),
                                  "data": {"seq_len": 8192, "tokens": 1e9}, "hardware": {"gpu": "g", "count": 8},
                                  "serving": [{"gpus": 1, "concurrency": 1, "quantization": "fp8"}]})
    gpu = SimpleNamespace(key="g", hbm_bytes=24 * GiB, gpus_per_node=8)
    d = [x for x in plan_serving(run, lambda k: gpu)[1] if x.code == "V002"]
    assert len(d) == 1 and f"at least {n8} GPUs" in d[0].hint and "with quantization: fp8" in d[0].hint
    shape8 = (32, 4096, 32, 8, 14336)
    blocks, emb = _params(*shape8)
    assert (blocks + emb) * 2 > 0.9 * 16 * GiB > blocks + emb * 2  # 16-bit does not fit, fp8 does (before workspace)
    _, diags = _plan_on(_llama(*shape8), 16, 1)
    d = [x for x in diags if x.code == "V002"]
    assert len(d) == 1 and "quantization: fp8" in d[0].hint and "weights alone" not in d[0].hint
