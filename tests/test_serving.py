"""Serving plans: KV-cache math against independent hand calculations, TP/PP choice, V001."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmc.compiler.serving import GiB, plan_serving
from llmc.spec.model import MLA, Architecture
from llmc.spec.schema import RunSpec

# Published shapes (Meta's config.json files)
LLAMA3_8B = dict(name="llama3-8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336,
                 vocab_size=128256, rope_theta=500000.0)
LLAMA3_70B = dict(name="llama3-70b", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672,
                  vocab_size=128256, rope_theta=500000.0)
LLAMA3_405B = dict(name="llama3-405b", n_layers=126, d_model=16384, n_heads=128, n_kv_heads=8, d_ff=53248,
                   vocab_size=128256, rope_theta=500000.0)
LLAMA2_7B = dict(name="llama2-7b", n_layers=32, d_model=4096, n_heads=32, d_ff=11008, vocab_size=32000)

H100 = SimpleNamespace(key="h100-sxm", hbm_bytes=80 * GiB, gpus_per_node=8)


def gpus(key):
    """A two-entry hardware table with ``hardware.get_gpu``'s contract (None for an unknown key)."""
    return H100 if key in ("h100-sxm", "h100") else None


def run_with(arch: dict, serving: list[dict], seq_len=8192, stages=()):
    return RunSpec.model_validate({
        "name": "t", "model": Architecture(**arch).model_dump(),
        "data": {"seq_len": seq_len, "tokens": 1e9},
        "hardware": {"gpu": "h100-sxm", "count": 8},
        "stages": list(stages),
        "serving": serving,
    })


def test_llama3_8b_kv_bytes_per_token_matches_published():
    # 2 (K,V) x 32 layers x 8 kv heads x 128 head_dim x 2 bytes = 131,072 B/token
    plans, diags = plan_serving(run_with(LLAMA3_8B, [{"concurrency": 64}]), gpus)
    assert plans[0].kv_bytes_per_token == 131_072
    assert plans[0].max_model_len == 8192


def test_llama3_8b_8k_x_64_needs_64_gib_and_fails_on_one_gpu():
    # 131072 B x 8192 tokens x 64 seqs = 2^17 * 2^13 * 2^6 = 2^36 B = 64 GiB on one GPU (tp=1)
    plans, diags = plan_serving(run_with(LLAMA3_8B, [{"concurrency": 64, "gpus": 1}]), gpus)
    p = plans[0]
    assert p.kv_gib_needed == pytest.approx(64.0)
    assert p.kv_gib_per_seq == pytest.approx(1.0)  # 1 GiB per 8K sequence
    assert not p.fits
    v001 = [d for d in diags if d.code == "V001"]
    assert len(v001) == 1 and v001[0].severity == "error"
    assert "needs 64.0 GiB" in v001[0].message
    assert "fp8" in v001[0].hint
    # the budget: 0.9 x 80 GiB - 8.03e9 params x 2 B - workspace; so < 64 GiB
    assert p.kv_budget_gib < 64 and p.max_seqs_that_fit == int(p.kv_budget_gib // 1.0)


def test_llama3_8b_auto_tp_picks_two_gpus():
    plans, diags = plan_serving(run_with(LLAMA3_8B, [{"concurrency": 64}]), gpus)
    p = plans[0]
    assert not [d for d in diags if d.severity == "error"]
    assert p.fits and p.tensor_parallel_size == 2 and p.pipeline_parallel_size == 1
    assert p.kv_gib_needed == pytest.approx(32.0)  # 64 GiB over 2 KV shards
    assert p.max_num_seqs == 64 and p.max_seqs_that_fit >= 64


def test_fp8_kv_halves_the_cache_and_fits_one_gpu():
    plans, diags = plan_serving(run_with(LLAMA3_8B, [{"concurrency": 64, "kv_cache_dtype": "fp8"}]), gpus)
    p = plans[0]
    assert p.kv_bytes_per_token == 65_536
    assert p.tensor_parallel_size == 1 and p.fits
    assert p.kv_gib_needed == pytest.approx(32.0)


def test_llama3_70b_needs_a_full_node():
    # 327,680 B/token; 8192 x 64 = 160 GiB of KV; weights 70.55e9 x 2 B = 131 GiB
    plans, diags = plan_serving(run_with(LLAMA3_70B, [{"concurrency": 64}]), gpus)
    p = plans[0]
    assert p.kv_bytes_per_token == 327_680
    assert p.weights_gib == pytest.approx(70.55e9 * 2 / GiB, rel=0.01)
    assert p.tensor_parallel_size == 8 and p.fits


def test_llama3_405b_pipelines_across_nodes():
    # 405.8e9 x 2 B = 756 GiB of weights alone > 8 x 72 GiB usable: a second node is needed
    plans, diags = plan_serving(run_with(LLAMA3_405B, [{"concurrency": 16}]), gpus)
    p = plans[0]
    assert p.weights_gib > 8 * 0.9 * 80
    assert p.tensor_parallel_size == 8 and p.pipeline_parallel_size >= 2 and p.fits
    assert p.nodes == p.pipeline_parallel_size and p.gpus == 8 * p.nodes


def test_awq_7b_weights_about_4_gb():
    # 7B: 14 GB in bf16 -> ~4 GB at 4 bits (AWQ, Lin et al. 2023, arXiv:2306.00978)
    plans, _ = plan_serving(run_with(LLAMA2_7B, [{"quantization": "awq", "concurrency": 1}], seq_len=4096), gpus)
    gb = plans[0].weights_gib * GiB / 1e9
    assert 3.5 < gb < 4.5
    plans, _ = plan_serving(run_with(LLAMA2_7B, [{"concurrency": 1}], seq_len=4096), gpus)
    assert 13 < plans[0].weights_gib * GiB / 1e9 < 14


def test_llama2_7b_mha_kv_is_512_kib_per_token():
    plans, _ = plan_serving(run_with(LLAMA2_7B, [{"concurrency": 1}], seq_len=4096), gpus)
    assert plans[0].kv_bytes_per_token == 512 * 1024


def _compiled_serving(stages: str, serving: str, model: str = "llama3-8b", gpu: str = "h100-sxm"):
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    text = (f"name: t\nmodel: {model}\nhardware: {{gpu: {gpu}, count: 8}}\n"
            "data: {sources: [{name: web, path: web.jsonl}], seq_len: 8192, tokens: 10B}\n"
            + (f"stages:\n{stages}" if stages else "") + f"serving: {serving}\n")
    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
    return c.serving, {d.code: d for d in c.diagnostics if d.code.startswith("V")}


PRE = "  - {name: base, kind: pretrain}\n"
LONG = "  - {name: long, kind: long_context, init_from: base, rope_theta: 2000000.0, data: {seq_len: 32768, tokens: 1B}}\n"


def test_max_model_len_follows_the_served_stages_ancestry_and_its_exports_context():
    """The default max_model_len is the longest context a long_context stage trained the served model at (its
    init_from chain: a sibling's extension does not count; a seq_len under the stage's data: does); asking beyond
    the served export's context (its config.json max_position_embeddings, which vLLM and SGLang refuse to exceed)
    is V005, an error."""
    plans, v = _compiled_serving(PRE + LONG, "[{concurrency: 4}]")
    assert plans[0].stage == "long" and plans[0].max_model_len == 32768 and "V005" not in v
    sft = "  - {name: chat, kind: sft, init_from: base, data: {sources: [{name: c, path: c.jsonl, kind: chat}], seq_len: 8192, tokens: 10M}}\n"
    plans, v = _compiled_serving(PRE + LONG + sft, "[{concurrency: 4}]")  # chat starts from base, not from long
    assert plans[0].stage == "chat" and plans[0].max_model_len == 8192 and "V005" not in v
    plans, v = _compiled_serving(PRE + LONG, "[{stage: base, max_model_len: 32768, concurrency: 4}]")
    assert v["V005"].severity == "error" and "8192" in v["V005"].message
    plans, v = _compiled_serving(PRE + LONG, "[{max_model_len: 65536, concurrency: 4}]")
    assert "V005" in v and "32768" in v["V005"].message


def test_mla_cache_is_replicated_over_tp():
    arch = dict(LLAMA3_8B, mla=MLA(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                   v_head_dim=128).model_dump())
    plans, _ = plan_serving(run_with(arch, [{"concurrency": 8, "gpus": 2}]), gpus)
    p = plans[0]
    assert p.kv_bytes_per_token == 32 * 576 * 2
    # not divided by tp: per-GPU per-sequence KV is the full latent cache
    assert p.kv_gib_per_seq == pytest.approx(32 * 576 * 2 * 8192 / GiB, abs=1e-4)


def test_unknown_gpu_is_a_diagnostic():
    plans, diags = plan_serving(run_with(LLAMA3_8B, [{"gpu": "tpu-v9"}]), gpus)
    assert plans == [] and diags[0].code == "V003"


def test_v001_points_at_the_yaml_line():
    from llmc.spec.load import loads_spec

    text = ("name: v\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 8192, tokens: 1e9}\n"
            "serving:\n  - engine: vllm\n    gpus: 1\n    concurrency: 64\n")
    run, lines = loads_spec(text)
    _, diags = plan_serving(run, gpus, lines)
    assert [(d.code, d.line) for d in diags] == [("V001", 8)]


def test_a_sliding_window_bounds_vllm_cache_and_sglang_is_warned():
    """Mistral-7B v0.1 (window 4096) at 32K tokens x 16 sequences: vLLM keeps each sequence's last 4095 positions plus
    one 8192-token prefill chunk and a block (12,304 positions, by hand: ceil((4095 + 8192) / 16) + 1 = 769 blocks of
    16), not 32,768; SGLang serves it without the window (V008) and is sized at the full length."""
    mistral = dict(name="mistral-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336,
                   vocab_size=32000, max_seq_len=32768, sliding_window=4096)
    kv_tok = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 kv heads of 128, bf16
    plans, diags = plan_serving(run_with(mistral, [{"engine": "vllm", "max_model_len": 32768, "concurrency": 16},
                                                   {"engine": "sglang", "max_model_len": 32768, "concurrency": 16}]),
                                gpus)
    vllm, sglang = plans
    # per GPU of a replica: the kv heads are split over tensor_parallel_size (<= 8 here)
    assert vllm.kv_gib_per_seq == round(769 * 16 * kv_tok / vllm.tensor_parallel_size / GiB, 4)
    assert sglang.kv_gib_per_seq == round(32768 * kv_tok / sglang.tensor_parallel_size / GiB, 4)
    assert [(d.code, d.severity, d.path) for d in diags] == [("V008", "warning", "serving.1.engine")]
    short, diags = plan_serving(run_with(mistral, [{"engine": "sglang", "max_model_len": 4096}]), gpus)
    assert diags == [] and short[0].kv_gib_per_seq == round(4096 * kv_tok / short[0].tensor_parallel_size / GiB, 4)


def test_tensor_parallel_sizes_the_engines_can_shard():
    """vLLM's QKVParallelLinear needs kv_heads % tp == 0 or tp % kv_heads == 0 (Phi-4: 40 heads, 10 KV heads: tp 4
    divides the heads but not the KV heads); the MLP width must split too (Qwen2.5-7B's 18,944 over 7 GPUs)."""
    from llmc.compiler.serving import tp_ok
    from llmc.spec.presets import PRESETS

    phi4 = PRESETS["phi4"]
    assert (phi4.n_heads, phi4.kv_heads) == (40, 10) and not tp_ok(phi4, 4) and tp_ok(phi4, 2)
    plans, v = _compiled_serving("", "[{concurrency: 256}]", model="phi4")
    assert plans[0].tensor_parallel_size in (1, 2) and "V007" not in v
    plans, v = _compiled_serving("", "[{concurrency: 4, gpus: 4}]", model="phi4")
    assert v["V007"].severity == "error" and "kv heads 10" in v["V007"].message
    assert not tp_ok(PRESETS["qwen2.5-7b"], 7)


@pytest.mark.parametrize("serving, code", [
    ("[{quantization: awq, concurrency: 4}]", "V009"),  # llmc's export is 16-bit: no AWQ checkpoint to serve
    ("[{gpu: cpu, concurrency: 4}]", "V003"),
    ("[{gpus: 1000000000, concurrency: 4}]", "V006"),  # pipeline stages past the layers / 16
])
def test_configs_the_engines_could_not_start_are_errors(serving, code):
    _, v = _compiled_serving("", serving)
    assert v[code].severity == "error", v


def test_the_prefill_chunk_is_pinned_at_least_max_num_seqs():
    """vLLM refuses max_num_seqs above max_num_batched_tokens, whose default drops to 2048 on GPUs under 70 GiB:
    the config pins 8192 (what the sizing assumes), or the concurrency when that is larger."""
    plans, _ = _compiled_serving("", "[{concurrency: 64}]", model="llama3.2-1b", gpu="a100-40g")
    assert plans[0].max_num_batched_tokens == 8192
    plans, _ = _compiled_serving("", "[{concurrency: 20000, max_model_len: 1024}]", model="llama3.2-1b")
    assert plans[0].max_num_batched_tokens == 20000


def test_a_continued_stage_without_a_length_is_an_error_not_a_crash():
    """A long_context stage with a seq_len but neither steps nor data tokens has no length: G009 at plan time (the
    torchtitan emitter crashed on its steps, INTERNAL); its export's context is what serving checks against."""
    lc = "  - {name: long, kind: long_context, init_from: base, rope_theta: 2000000.0, seq_len: 32768}\n"
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    text = ("name: t\nmodel: llama3-8b\nhardware: {gpu: h100-sxm, count: 8}\n"
            "data: {sources: [{name: web, path: web.jsonl}], seq_len: 8192, tokens: 10B}\n"
            f"stages:\n{PRE}{lc}")
    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
    g = [d for d in c.diagnostics if d.code == "G009"]
    assert len(g) == 1 and g[0].severity == "error" and g[0].path == "stages.1"
    long = next(s for s in c.stages if s.name == "long")
    assert long.max_position_embeddings == 32768
