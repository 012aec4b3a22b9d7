"""Serving plans: KV-cache math against independent hand calculations, TP/PP choice, V001."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
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


# ------------------------------------------------------------------------------------- layouts and pipeline stages

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm/bin/python"  # vLLM 0.33.0 in its own environment (scripts/setup.sh)
PP_PAIRS = [(61, 3), (48, 2), (63, 4), (126, 5), (80, 16), (27, 6), (7, 4), (32, 1)]


def _qwen3_moe_layer_params() -> int:
    """Qwen3-30B-A3B's block by hand from its config.json (hidden 2048, 32 heads and 4 KV heads of 128, q/k RMSNorm
    of 128, 128 experts of moe_intermediate_size 768, no bias): attention + router + experts + two RMSNorms."""
    d, hd = 2048, 128
    attn = d * 32 * hd + 2 * d * 4 * hd + 32 * hd * d + 2 * hd
    return attn + d * 128 + 128 * 3 * d * 768 + 2 * d


def test_pipeline_stages_inside_one_node_before_a_second_node():
    """Qwen3-30B-A3B (4 KV heads) at 40,960 tokens x 72 on H100 SXM (79.1 GiB): tp 8 replicates the KV heads (vLLM's
    ModelConfig.get_num_kv_heads: max(1, 4 // tp) = 1 per rank at tp 4 and at tp 8), so 8 GPUs fit only as tp 4 x pp 2
    (24 layers per rank): 8 GPUs on one node, not tp 8 x pp 2 on two nodes (16 GPUs, a Ray cluster)."""
    from llmc.compiler.hardware import get_gpu
    from llmc.spec.presets import PRESETS

    arch = PRESETS["qwen3-30b-a3b"]
    run = run_with(arch.model_dump(), [{"max_model_len": 40960, "concurrency": 72}])
    plans, diags = plan_serving(run, get_gpu)
    p = plans[0]
    assert not [d for d in diags if d.severity == "error"]
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.gpus, p.nodes, p.fits) == (4, 2, 8, 1, True)

    # by hand: 0.9 x the device-reported total; the per-token KV of one rank is K and V x its layers x 1 KV head x
    # 128 x 2 bytes
    budget, layer = 0.9 * get_gpu("h100-sxm").hbm_bytes, _qwen3_moe_layer_params()
    emb = 151936 * 2048
    assert 48 * layer + 2 * emb + 2048 == pytest.approx(30.5e9, rel=0.002)  # the model card's 30.5B
    reserve = lambda tp: GiB + 8192 * 2 * (4 * 2048 + 3 * 6144 / tp)  # noqa: E731 - the module's workspace estimate
    need_tp8 = 72 * 40960 * (2 * 48 * 1 * 128 * 2)  # tp 8 x pp 1: all 48 layers, 1 KV head per rank
    assert need_tp8 > budget - (48 * layer + 2 * emb + 2048) * 2 / 8 - reserve(8)  # 8 GPUs without stages: no fit
    kv_seq = 40960 * (2 * 24 * 1 * 128 * 2)  # 12,288 B/token/GPU
    assert p.kv_gib_per_seq == round(kv_seq / GiB, 4) and p.kv_gib_needed == round(72 * kv_seq / GiB, 3)
    # the last stage holds the LM head and the final norm besides its 24 layers (the first: the embedding)
    weights = (24 * layer + emb + 2048) * 2 / 4
    assert p.weights_gib_per_gpu == round(weights / GiB, 3)
    assert p.max_seqs_that_fit == int((budget - weights - reserve(4)) // kv_seq) == 134


def test_pipeline_stages_hold_the_layers_vllm_gives_them():
    """vLLM's get_pp_indices: n // pp layers per stage, the remainder one each in the stages before the last from
    the second-to-last backwards (its docstring: the last stage holds the norm and head)."""
    from llmc.compiler.serving import pp_layer_split

    for (n, pp), want in zip(PP_PAIRS, [[20, 21, 20], [24, 24], [16, 16, 16, 15], [25, 25, 25, 26, 25], [5] * 16,
                                        [4, 4, 5, 5, 5, 4], [2, 2, 2, 1], [32]], strict=True):
        assert pp_layer_split(n, pp) == want and sum(want) == n


@pytest.mark.skipif(not (ROOT / ".venv-vllm/.installed").exists(),
                    reason="vLLM is not installed here (scripts/setup.sh puts it in .venv-vllm)")
def test_pp_layer_split_equals_vllms_get_pp_indices(tmp_path):
    from llmc.compiler.serving import pp_layer_split

    script = ("import json, sys\nfrom vllm.distributed.utils import get_pp_indices\n"
              "pairs = json.loads(sys.argv[1])\n"
              "print(json.dumps([[e - s for s, e in (get_pp_indices(n, r, pp) for r in range(pp))] for n, pp in pairs]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_PP_LAYER_PARTITION")}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CACHE_ROOT=str(tmp_path), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               VLLM_LOGGING_LEVEL="WARNING")
    out = subprocess.run([str(VLLM_PY), "-c", script, json.dumps(PP_PAIRS)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == [pp_layer_split(n, pp) for n, pp in PP_PAIRS]


def test_the_kv_cache_is_sized_by_the_most_loaded_stage():
    """DeepSeek-V3 (61 layers: 3 dense, 58 MoE; MLA latent cache of 512 + 64 per layer, replicated over tp) at tp 8 x
    pp 3 on H200: vLLM gives the stages 20, 21, 20 layers and keeps every worker at the smallest block count
    (get_kv_cache_configs), so the middle stage sets what fits: 21 layers of cache and 21 MoE layers of weights, not
    the mean 61 / 3 of either."""
    from llmc.compiler.hardware import get_gpu
    from llmc.spec.presets import PRESETS

    arch = PRESETS["deepseek-v3"]
    run = run_with(arch.model_dump(), [{"max_model_len": 32768, "concurrency": 64, "gpus": 24, "gpu": "h200"}])
    p = plan_serving(run, get_gpu)[0][0]
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.nodes) == (8, 3, 3)
    kv_seq = 21 * (512 + 64) * 2 * 32768  # bf16 latent + rope key, 21 layers
    assert p.kv_gib_per_seq == round(kv_seq / GiB, 4) == 0.7383  # the mean stage: 0.7148
    # one MoE block by hand from config.json: MLA (q_lora 1536, 128 heads of 128 + 64 rope, v 128, kv_lora 512)
    # + 256 routed and 1 shared expert of 2048 + router and its correction bias + two RMSNorms
    d, h = 7168, 128
    mla = d * 1536 + 1536 + 1536 * h * 192 + d * 576 + 512 + 512 * h * 256 + h * 128 * d
    moe = 257 * 3 * d * 2048 + 256 * d + 256
    weights = 21 * (mla + moe + 2 * d) * 2 / 8
    assert p.weights_gib_per_gpu == round(weights / GiB, 3)
    budget = 0.9 * get_gpu("h200").hbm_bytes - weights - (GiB + 8192 * 2 * (4 * d + 3 * 18432 / 8))
    assert p.max_seqs_that_fit == int(budget // kv_seq) == 92


def test_one_node_of_pipeline_stages_is_served_without_ray():
    """The emitted vLLM config of a tp 4 x pp 2 replica on one node: vLLM's own processes (its default executor
    when the world fits the node), no Ray cluster; the notes say the figures are the most loaded stage's."""
    from llmc.compiler.compile import compile_spec
    from llmc.emit.serving import ServingEmitter
    from llmc.spec.load import loads_spec

    text = ("name: t\nmodel: qwen3-30b-a3b\nhardware: {gpu: h100-sxm, count: 8}\n"
            "data: {sources: [{name: web, path: web.jsonl}], seq_len: 4096, tokens: 10B}\n"
            "serving: [{engine: vllm, max_model_len: 40960, concurrency: 72}]\n")
    run, lines = loads_spec(text, file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=text.encode())
    cfg = ServingEmitter().files(c, {})["serving/vllm.yaml"]
    assert "tensor-parallel-size: 4\n" in cfg and "pipeline-parallel-size: 2\n" in cfg
    assert "distributed-executor-backend" not in cfg and "ray start" not in cfg
    assert "# 2 pipeline stages on 1 node; the per-GPU figures below are the most loaded stage's" in cfg


def test_the_build_readme_runs_a_multi_node_replica_as_its_config_says():
    """Llama 3.1 405B in bf16 (~756 GiB of weights) is served as tp 8 x pp 2 over two 8-GPU nodes: vLLM on a Ray
    cluster, SGLang started on each node with its rank. The build's README.md said `vllm serve --config ...` and
    `python -m sglang.launch_server --config ...` alone, which on one node waits for nodes never started; its Serve
    lines are the configs' own "run from the build directory" commands."""
    from llmc.compiler.compile import compile_spec
    from llmc.emit import render_artifacts
    from llmc.spec.load import loads_spec

    text = ("name: t\nmodel: llama3.1-405b\nhardware: {gpu: h100-sxm, count: 16}\n"
            "data: {sources: [{name: web, path: web.jsonl}], seq_len: 4096, tokens: 10B}\n"
            "serving: [{engine: vllm, concurrency: 8}, {engine: sglang, concurrency: 8}]\n")
    run, lines = loads_spec(text, file="s.yaml")
    files = render_artifacts(compile_spec(run, "s.yaml", lines, spec_bytes=text.encode()))
    readme = files["README.md"]
    for name, want in (("serving/vllm.yaml", "`ray start` on all 2 nodes, then on the head node: "
                                             "`vllm serve --config serving/vllm.yaml`"),
                       ("serving/sglang.yaml", "`python -m sglang.launch_server --config serving/sglang.yaml "
                                               "--node-rank <0..1> --dist-init-addr <first node>:50000` (on each of "
                                               "the 2 nodes)")):
        cfg = files[name]
        assert "tensor-parallel-size: 8\n" in cfg or "tp-size: 8\n" in cfg
        assert "pipeline-parallel-size: 2\n" in cfg or "pp-size: 2\n" in cfg
        assert f"- `{name}`: {want}\n" in readme, readme
        # the config's header says the same, without the markdown around the command
        header = want.replace("`vllm", "vllm").replace(".yaml`", ".yaml").replace("`python", "python")
        header = header.replace(":50000`", ":50000")
        assert f"# run from the build directory: {header}\n" in cfg, cfg[:2000]


def test_expert_parallel_is_vllms_and_only_for_experts():
    """``expert_parallel`` reaches vLLM's --enable-expert-parallel for an MoE model (its parser test reads it back);
    a dense model has no experts to split and SGLang's expert parallelism is not emitted: V010 for both."""
    plans, diags = _compiled_serving("", "[{engine: vllm, expert_parallel: true}]", model="mixtral-8x7b")
    assert plans[0].expert_parallel is True and "V010" not in diags
    plans, diags = _compiled_serving("", "[{engine: vllm, expert_parallel: true}]")
    assert diags["V010"].severity == "error" and "dense" in diags["V010"].message
    assert plans[0].expert_parallel is False
    _, diags = _compiled_serving("", "[{engine: sglang, expert_parallel: true}]", model="mixtral-8x7b")
    assert "sglang" in diags["V010"].message
    plans, diags = _compiled_serving("", "[{engine: vllm}]", model="mixtral-8x7b")
    assert plans[0].expert_parallel is False and "V010" not in diags


def test_naming_the_training_gpu_keeps_its_overrides():
    """``serving.gpu`` None is "the training GPU": naming that same GPU means the same, overrides included (a 200 GiB
    H100 served on 2 GPUs at the table's 80 GB once named)."""
    over = "h100-sxm, gpu_overrides: {hbm_gib: 200}"
    plans, _ = _compiled_serving("", "[{engine: vllm}, {engine: vllm, gpu: h100-sxm}]", gpu=over)
    assert plans[0].capacity_gib == plans[1].capacity_gib == 200.0
    assert plans[0].gpus == plans[1].gpus
