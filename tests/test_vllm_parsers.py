"""vLLM 0.33's own parsers accept what llmc emits: every ``serving/vllm*.yaml`` goes through ``vllm serve``'s
argument parser (``FlexibleArgumentParser`` with ``--config``, built by ``ServeSubcommand`` as in
``vllm/entrypoints/cli/main.py``) and ``AsyncEngineArgs.from_cli_args``, and lands on the values of the lock's
serving plan; every Hugging Face export (Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE, gpt-oss, DeepSeek-V3) goes through
``vllm.transformers_utils.config.get_config`` and ``vllm.config.ModelConfig`` (architecture resolution through
vLLM's model registry, which inspects the model class in a subprocess) and reads back as the exported
architecture (SmolLM3 with its NoPE layers and OLMo 2: vLLM serves both through its Transformers backend), with vLLM's KV-cache
bytes per token equal to llmc's serving plan; the dense exports also load
into vLLM's own model classes (every parameter set from the checkpoint, the same values).

vLLM 0.33.0 pins torch 2.14.0 and transformers < 5.21, so it runs in its own environment, ``.venv-vllm``
(``scripts/setup.sh``); these tests skip where it is absent. ``VLLM_TARGET_DEVICE=cpu`` selects vLLM's CPU
platform: without a GPU, vLLM cannot infer a device otherwise (vllm/platforms/__init__.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmc.spec.model import Multipliers, RopeScaling

# Phi-3.5 / Phi-4-mini's LongRoPE on a tiny head (3 rotary frequencies), switching at 16 tokens
# Granite 3's muP scalars (embedding 12, residual 0.22, softmax scale 1/128-style, logits / 8)
GRANITE = Multipliers(embedding=12.0, residual=0.22, attention=0.125, logits=8.0)
OLMO3_YARN = RopeScaling(type="yarn", factor=2.0, original_max_position=16)
# Gemma 3's block: norms before and after attention and MLP (1 + weight), per-head q / k norms, GeGLU, scaled embeddings
GEMMA3_BLOCK = dict(qk_norm=True, norm_placement="sandwich", norm_unit_offset=True, activation="gelu_tanh",
                    embedding_scale=True)
GEMMA2_BLOCK = dict(norm_placement="sandwich", norm_unit_offset=True, activation="gelu_tanh", embedding_scale=True,
                    attn_logit_softcap=50.0, final_logit_softcap=30.0)
PHI3_LONGROPE = RopeScaling(type="longrope", factor=2.0, original_max_position=16, short_factor=[1.0, 1.5, 2.0],
                            long_factor=[1.2, 3.0, 8.0])

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm/bin/python"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (ROOT / ".venv-vllm/.installed").exists(),  # scripts/setup.sh marks it complete
                                 reason="vLLM is not installed here (scripts/setup.sh puts it in .venv-vllm)")]

# `vllm serve --config FILE`: the parser the CLI builds, its validation, then the engine arguments it starts from.
SERVE_PARSE = """
import json, os, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.engine.arg_utils import AsyncEngineArgs
out = {}
for path in sys.argv[1:]:
    os.chdir(os.path.dirname(os.path.dirname(path)))  # `vllm serve` runs from the build directory
    parser = FlexibleArgumentParser(description="vLLM CLI")
    cmd = ServeSubcommand()
    cmd.subparser_init(parser.add_subparsers(required=False, dest="subparser"))
    try:
        args = parser.parse_args(["serve", "--config", path])
        cmd.validate(args)
    except SystemExit as e:  # argparse's way of refusing an argument
        out[path] = {"refused": e.code}
        continue
    if args.model_tag is not None:  # ServeSubcommand.cmd does the same
        args.model = args.model_tag
    ea = AsyncEngineArgs.from_cli_args(args)
    keys = ("model", "served_model_name", "dtype", "tensor_parallel_size", "pipeline_parallel_size",
            "max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "kv_cache_dtype", "quantization",
            "enable_prefix_caching", "distributed_executor_backend", "enable_expert_parallel")
    out[path] = {**{k: getattr(ea, k) for k in keys}, "host": args.host, "port": args.port}
print(json.dumps(out, default=str))
"""

# vLLM's model config from an exported directory. KV bytes per token as vLLM's KV-cache specs size a page
# (vllm/v1/kv_cache_interface.py: FullAttentionSpec keeps K and V, MLAAttentionSpec one latent vector per token,
# both of head_size elements for each of get_num_kv_heads() heads), summed over the layers.
MODEL_PARSE = """
import json, sys
from vllm.transformers_utils.config import get_config
from vllm.config import ModelConfig, ParallelConfig
out = {}
for path in sys.argv[1:]:
    hf = get_config(path, trust_remote_code=False)
    mc = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype="auto")
    layers = mc.get_num_layers(ParallelConfig())
    kv_heads = mc.get_num_kv_heads(ParallelConfig())
    per_layer = (1 if mc.use_mla else 2) * kv_heads * mc.get_head_size() * mc.dtype.itemsize
    out[path] = {"model_type": hf.model_type, "architectures": mc.architectures, "hidden": mc.get_hidden_size(),
                 "layers": layers, "heads": mc.get_num_attention_heads(ParallelConfig()),
                 "kv_heads": mc.get_total_num_kv_heads(), "head_size": mc.get_head_size(),
                 "vocab": mc.get_vocab_size(), "dtype": str(mc.dtype), "max_model_len": mc.max_model_len,
                 "use_mla": mc.use_mla, "is_moe": mc.is_moe, "kv_bytes_per_token": layers * per_layer,
                 "sliding_window": mc.get_sliding_window(), "no_rope_layers": getattr(hf, "no_rope_layers", None),
                 "layer_types": getattr(hf, "layer_types", None)}
    if mc.get_sliding_window():  # KV positions one sequence holds (8192-token chunks, 16-token blocks), per max_model_len
        from vllm.v1.kv_cache_interface import SlidingWindowSpec
        sw = SlidingWindowSpec(block_size=16, num_kv_heads=kv_heads, head_size=mc.get_head_size(), dtype=mc.dtype,
                               sliding_window=mc.get_sliding_window())
        out[path]["window_tokens"] = {n: 16 * sw.max_admission_blocks_per_request(8192, n) for n in (32, 10000, 131072)}
print(json.dumps(out, default=str))
"""


# vLLM's own view of fp8 on 16-bit weights (online quantization) and of the emitted quantization, name and host
FP8_CHECK = """
import json, os, sys
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm.model_executor.layers.quantization.fp8 import Fp8Config
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.engine.arg_utils import AsyncEngineArgs
out = {"methods": QUANTIZATION_METHODS}
try:
    Fp8Config(is_checkpoint_fp8_serialized=False)
    out["online_fp8"] = "accepted"
except ValueError as e:
    out["online_fp8"] = str(e)
for path in sys.argv[1:]:
    os.chdir(os.path.dirname(os.path.dirname(path)))
    parser = FlexibleArgumentParser(description="vLLM CLI")
    cmd = ServeSubcommand()
    cmd.subparser_init(parser.add_subparsers(required=False, dest="subparser"))
    args = parser.parse_args(["serve", "--config", path])
    cmd.validate(args)
    ea = AsyncEngineArgs.from_cli_args(args)
    out[path] = {"quantization": ea.quantization, "served_model_name": ea.served_model_name, "host": args.host}
print(json.dumps(out, default=str))
"""


# The checks share one vLLM process (starting vLLM costs tens of seconds of CPU on a small machine): each script
# runs in it as it would alone (its own sys.argv and globals; what it prints last is its result), and a script
# that raises fails only the test that reads its result. vLLM's model registry inspects each architecture's class
# in a fresh interpreter only so that importing the model module cannot initialise CUDA in the parent
# (vllm/model_executor/models/registry.py, `_run_in_subprocess`); on the CPU platform there is no CUDA to keep
# uninitialised, so the driver runs that same inspection in its own process instead of starting one vLLM
# interpreter per architecture (about 12 s of CPU each).
DRIVER = """
import contextlib, io, json, sys, traceback
import vllm.model_executor.models.registry as registry
registry._run_in_subprocess = lambda fn: fn()
res = {}
for name, script, argv in json.loads(sys.argv[1]):
    sys.argv = ["-c", *argv]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(script, name, "exec"), {"__name__": "__main__"})
        res[name] = {"ok": json.loads(buf.getvalue().strip().splitlines()[-1])}
    except BaseException:
        res[name] = {"error": traceback.format_exc()[-4000:]}
print(json.dumps(res, default=str))
"""


def run_vllm(jobs: dict[str, tuple[str, list]], cache: Path) -> dict:
    """{name: what script printed} for jobs {name: (script, argv)}, all in one vLLM process, offline, with a fresh
    vLLM cache (the model registry inspects each architecture anew, once, instead of reading ~/.cache)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CACHE_ROOT=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_LOGGING_LEVEL="WARNING")
    arg = json.dumps([[name, script, [str(a) for a in argv]] for name, (script, argv) in jobs.items()])
    out = subprocess.run([str(VLLM_PY), "-c", DRIVER, arg], capture_output=True, text=True, timeout=1800, env=env,
                         cwd=cache)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def vllm(served, model_exports, load_exports, fp8_served, tmp_path_factory) -> dict:
    """What each check's script printed (or the traceback it raised), from one vLLM process."""
    cache = tmp_path_factory.mktemp("vllm-cache")
    port = _free_port()
    return run_vllm({"serve": (SERVE_PARSE, [f for f, _ in served] + [misspelled(served, tmp_path_factory)]),
                     "model": (MODEL_PARSE, list(model_exports[1].values())),
                     "load": (LOAD, [port, *load_exports[1].values()]),
                     "fp8": (FP8_CHECK, fp8_served)}, cache)


def result(vllm: dict, name: str) -> dict:
    r = vllm[name]
    assert "error" not in r, r.get("error")
    return r["ok"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- serving/vllm.yaml

EXAMPLES = ["llama3_8b_h100x8", "pipeline_llama3_8b", "qwen2.5_7b_a100x16"]
# Targets that reach the emitter's other branches: fp8 weights and KV cache, prefix caching off, AWQ, and a
# replica that pipelines over two nodes (Ray executor).
VARIANTS = {
    "llama3_8b_h100x8": [
        {"engine": "vllm", "concurrency": 8, "quantization": "fp8", "kv_cache_dtype": "fp8", "prefix_caching": False,
         "gpu_memory_utilization": 0.85},
        {"engine": "vllm", "concurrency": 4, "max_model_len": 4096},
    ],
    "llama3_405b_h100x16384": [{"engine": "vllm", "concurrency": 16}],
    "mixtral_8x7b": [{"engine": "vllm", "concurrency": 8, "expert_parallel": True}],  # MoE layers expert parallel
}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> list[tuple[Path, dict]]:
    """(vllm*.yaml, its lock serving entry) for every vLLM target of the examples and the variants."""
    specs = {ex: ROOT / f"examples/{ex}.yaml" for ex in EXAMPLES}
    for ex, targets in VARIANTS.items():
        doc = yaml.safe_load((ROOT / f"examples/{ex}.yaml").read_text())
        doc["serving"] = targets
        p = tmp_path_factory.mktemp("specs") / f"{ex}-variant.yaml"
        p.write_text(yaml.safe_dump(doc, sort_keys=False))
        specs[f"{ex}-variant"] = p
    pairs = []
    for name, spec in specs.items():
        d = tmp_path_factory.mktemp(name)
        subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(spec), "-o", str(d)], check=True, cwd=ROOT,
                       capture_output=True)
        plans = [p for p in json.loads((d / "plan.lock.json").read_text())["serving"] if p["engine"] == "vllm"]
        for i, plan in enumerate(plans):
            # where the stage's export goes: offline, vLLM takes `model` as a local path only if it exists
            (d / f"run/{plan['stage']}/hf").mkdir(parents=True, exist_ok=True)
            pairs.append((d / ("serving/vllm.yaml" if i == 0 else f"serving/vllm-{i + 1}.yaml"), plan))
    return pairs


def misspelled(served, tmp_path_factory) -> Path:
    """A vllm.yaml with a key vLLM does not have (the same parser must refuse it)."""
    bad = tmp_path_factory.mktemp("bad") / "serving/misspelled.yaml"
    bad.parent.mkdir()
    bad.write_text(served[0][0].read_text() + "tensor-paralel-size: 2\n")
    return bad


def test_every_vllm_yaml_passes_vllm_serve_parser(served, vllm):
    got = result(vllm, "serve")
    bad = [k for k in got if k.endswith("misspelled.yaml")]
    assert len(bad) == 1 and got[bad[0]] == {"refused": 2}
    assert any(p["nodes"] > 1 for _, p in served) and any(p["quantization"] == "fp8" for _, p in served)
    assert any(not p["prefix_caching"] for _, p in served) and any(p["kv_cache_dtype"] == "fp8" for _, p in served)
    for f, plan in served:
        args = got[str(f)]
        assert "refused" not in args, f
        assert args["model"] == f"run/{plan['stage']}/hf"
        assert args["dtype"] == "bfloat16" and args["port"] == 8000 and args["host"] is None
        assert args["tensor_parallel_size"] == plan["tensor_parallel_size"]
        assert args["pipeline_parallel_size"] == plan["pipeline_parallel_size"]
        assert args["tensor_parallel_size"] * args["pipeline_parallel_size"] == plan["gpus"]
        assert args["max_model_len"] == plan["max_model_len"] and args["max_num_seqs"] == plan["max_num_seqs"]
        # pinned: vLLM's own default drops to 2048 on GPUs under 70 GiB and must not fall below max_num_seqs
        assert args["max_num_batched_tokens"] == plan["max_num_batched_tokens"] >= plan["max_num_seqs"]
        assert args["gpu_memory_utilization"] == pytest.approx(plan["gpu_memory_utilization"])
        assert args["kv_cache_dtype"] == plan["kv_cache_dtype"]
        assert args["quantization"] == {"fp8": "fp8_per_tensor"}.get(plan["quantization"], plan["quantization"])
        assert args["enable_prefix_caching"] is plan["prefix_caching"]
        assert args["distributed_executor_backend"] == ("ray" if plan["nodes"] > 1 else None)
        assert args["enable_expert_parallel"] is plan["expert_parallel"]
    assert any(p["expert_parallel"] for _, p in served)


# ----------------------------------------------------------------------------- Hugging Face exports


@pytest.fixture(scope="module")
def model_exports(tmp_path_factory) -> tuple[dict, dict]:
    """({architecture class: Architecture}, {class: its bf16 Hugging Face export})."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from llmc.runtime.hf_io import export_hf
    from llmc.runtime.model import build_model
    from llmc.spec.model import MLA, Architecture, MoE

    tmp_path = tmp_path_factory.mktemp("exports")
    base = dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=101, max_seq_len=32,
                rope_theta=5000.0)
    archs = {
        "LlamaForCausalLM": Architecture(name="llama", **base),
        "Qwen2ForCausalLM": Architecture(name="qwen2", **base, qkv_bias=True),
        "Qwen3ForCausalLM": Architecture(name="qwen3", **{**base, "head_dim": 16}, qk_norm=True),
        "Phi3ForCausalLM": Architecture(name="phi3", **base, rotary_dim=6, rope_scaling=PHI3_LONGROPE),
        "GraniteForCausalLM": Architecture(name="granite", **base, multipliers=GRANITE),
        "MistralForCausalLM": Architecture(name="mistral", **base, sliding_window=8),
        "SmolLM3ForCausalLM": Architecture(name="smollm3", **base, tied_embeddings=True, nope_layers=(1,)),
        "Olmo2ForCausalLM": Architecture(name="olmo2", **base, qk_norm=True, qk_norm_scope="projection",
                                         norm_placement="post"),
        # OLMo 3: a window in layers 0 and 2, full attention in layer 1, YaRN there only
        "Olmo3ForCausalLM": Architecture(name="olmo3", **{**base, "n_layers": 3}, qk_norm=True,
                                         qk_norm_scope="projection", norm_placement="post", sliding_window=8,
                                         full_attention_layers=(1,), rope_scaling=OLMO3_YARN),
        "Gemma3ForCausalLM": Architecture(name="gemma3", **{**base, "n_layers": 3, "head_dim": 16}, **GEMMA3_BLOCK,
                                          tied_embeddings=True, sliding_window=8, full_attention_layers=(1,),
                                          sliding_rope_theta=100.0),
        "Gemma2ForCausalLM": Architecture(name="gemma2", **{**base, "n_layers": 3, "head_dim": 16}, **GEMMA2_BLOCK,
                                          tied_embeddings=True, sliding_window=8, full_attention_layers=(1,)),
        "MixtralForCausalLM": Architecture(name="mixtral", **base, moe=MoE(num_experts=3, top_k=2)),
        # gpt-oss: sinks, q/k/v and o_proj biases, a window in layer 0, YaRN (untruncated) in both, biased clamped experts
        "GptOssForCausalLM": Architecture(
            name="gpt-oss", **{**base, "d_ff": 24}, qkv_bias=True, attn_out_bias=True, attn_sinks=True,
            activation="swiglu_clamped", sliding_window=8, full_attention_layers=(1,),
            rope_scaling=RopeScaling(type="yarn", factor=2.0, original_max_position=16, truncate=False),
            moe=MoE(num_experts=4, top_k=2, router_bias=True, expert_proj_bias=True, score_func="softmax")),
        "Qwen3MoeForCausalLM": Architecture(name="qwen3moe", **{**base, "n_layers": 3, "head_dim": 16}, qk_norm=True,
                                            moe=MoE(num_experts=4, top_k=2, expert_d_ff=24, dense_layers=1)),
        # DeepSeek-V2(-Lite): softmax-routed experts, unnormalised, full-rank q, DeepSeek's YaRN
        "DeepseekV2ForCausalLM": Architecture(
            name="deepseek2", n_layers=3, d_model=24, n_heads=3, d_ff=40, vocab_size=77, max_seq_len=64,
            rope_theta=10000.0, norm_eps=1e-6,
            rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position=16, mscale=0.707,
                                     mscale_all_dim=0.707),
            mla=MLA(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
            moe=MoE(num_experts=4, top_k=2, num_shared_experts=2, expert_d_ff=20, dense_layers=1,
                    route_norm=False)),
        "DeepseekV3ForCausalLM": Architecture(
            name="deepseek", n_layers=3, d_model=24, n_heads=3, d_ff=40, vocab_size=77, max_seq_len=64,
            rope_theta=10000.0, norm_eps=1e-6,
            mla=MLA(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
            moe=MoE(num_experts=4, top_k=2, num_shared_experts=2, expert_d_ff=20, dense_layers=1,
                    score_func="sigmoid", route_scale=1.5)),
    }
    dirs = {cls: export_hf(build_model(a, seed=0).state_dict(), a, tmp_path / cls, dtype=torch.bfloat16)
            for cls, a in archs.items()}
    return archs, dirs


def test_hf_exports_pass_vllm_model_config(model_exports, vllm):
    from types import SimpleNamespace

    from llmc.compiler.serving import GiB, kv_tokens_per_sequence, plan_serving
    from llmc.spec.schema import RunSpec

    archs, dirs = model_exports
    got = result(vllm, "model")

    h100 = SimpleNamespace(key="h100-sxm", hbm_bytes=80 * GiB, gpus_per_node=8)
    for cls, a in archs.items():
        m = got[str(dirs[cls])]
        assert m["architectures"] == [cls]
        assert m["hidden"] == a.d_model and m["layers"] == a.n_layers and m["vocab"] == a.vocab_size
        # without --max-model-len, vLLM serves a LongRoPE model at its original context (vllm/config/model.py, "to
        # avoid performance degradation for shorter sequences"); llmc's vllm.yaml always sets max-model-len
        longrope = a.rope_scaling is not None and a.rope_scaling.type == "longrope"
        assert m["max_model_len"] == (a.rope_scaling.original_max_position if longrope else a.max_seq_len)
        assert m["heads"] == a.n_heads and m["dtype"] == "torch.bfloat16"
        assert m["is_moe"] is (a.moe is not None) and m["use_mla"] is (a.mla is not None)
        if a.mla is None:
            assert m["kv_heads"] == a.n_kv_heads and m["head_size"] == a.hd
        else:  # vLLM caches the compressed latent plus the shared rope key (DeepSeek-V2, arXiv:2405.04434, 2.1)
            assert m["head_size"] == a.mla.kv_lora_rank + a.mla.qk_rope_head_dim
        spec = RunSpec.model_validate({"name": "t", "model": a.model_dump(), "data": {"seq_len": a.max_seq_len,
                                       "tokens": 1e6}, "hardware": {"gpu": "h100-sxm", "count": 1},
                                       "serving": [{"concurrency": 1, "gpus": 1}]})
        plans, _ = plan_serving(spec, lambda key: h100 if key == "h100-sxm" else None)
        assert m["kv_bytes_per_token"] == plans[0].kv_bytes_per_token, cls
        assert m["sliding_window"] == a.sliding_window, cls
        if a.nope_layers:  # SmolLM3Config's per-layer RoPE flags, as vLLM reads the export
            assert m["no_rope_layers"] == [int(i not in a.nope_layers) for i in range(a.n_layers)] == [1, 0]
        if a.sliding_window:  # vLLM keeps a windowed sequence's last W - 1 positions + one chunk, not max_model_len
            full = a.full_attention_layers  # (OLMo 3: max_model_len in the layers vLLM builds without a window)
            assert m["layer_types"] is None or [i for i, k in enumerate(m["layer_types"]) if k == "full_attention"] \
                == list(full), cls
            assert {int(n): (len(full) * int(n) + (a.n_layers - len(full)) * t) / a.n_layers
                    for n, t in m["window_tokens"].items()} == {
                n: kv_tokens_per_sequence(a, "vllm", n) for n in (32, 10000, 131072)}


# vLLM builds its model class for the export on its CPU platform and loads the safetensors with its default
# loader, which refuses a checkpoint that leaves any parameter unset (DefaultModelLoader.load_weights, strict for
# unquantized models). Only dense models: this vLLM wheel has no CPU kernel for the fused MoE layer
# (select_unquantized_moe_backend raises NotImplementedError without a GPU), so MoE exports stop at ModelConfig.
LOAD = """
import json, sys
from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.model_executor.model_loader import get_model
out = {}
for i, path in enumerate(sys.argv[2:]):
    mc = ModelConfig(model=path, tokenizer=path, skip_tokenizer_init=True, dtype="float32", enforce_eager=True)
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig("cpu"))
    with set_current_vllm_config(vc):
        if i == 0:
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
            initialize_model_parallel(1, 1)
        model = get_model(vllm_config=vc)
    ps = dict(model.named_parameters())
    out[path] = {"class": type(model).__name__, "numel": sum(p.numel() for p in ps.values()),
                 "abs_sum": sum(p.double().abs().sum().item() for p in ps.values()),
                 "use_rope": [int(m.use_rope) for _, m in model.named_modules() if hasattr(m, "use_rope")]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def load_exports(tmp_path_factory) -> tuple[dict, dict, dict]:
    """({name: Architecture}, {name: its float32 export, norms and biases perturbed}, {name: (parameters, sum of
    |values| of the export)})."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from llmc.runtime.hf_io import export_hf
    from llmc.runtime.model import build_model
    from llmc.spec.model import Architecture

    tmp_path = tmp_path_factory.mktemp("dense")
    base = dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=101, max_seq_len=32,
                rope_theta=5000.0)
    archs = {"llama": Architecture(name="llama", **base),
             "llama-tied": Architecture(name="llama-tied", **base, tied_embeddings=True),
             "qwen2": Architecture(name="qwen2", **base, qkv_bias=True),
             "qwen3": Architecture(name="qwen3", **{**base, "head_dim": 16}, qk_norm=True),
             # Phi-4-mini's shape of RoPE: 6 of 8 dims per head, LongRoPE, tied embeddings (fused qkv / gate_up)
             "phi3": Architecture(name="phi3", **base, rotary_dim=6, tied_embeddings=True,
                                  rope_scaling=PHI3_LONGROPE),
             "granite": Architecture(name="granite", **base, tied_embeddings=True, multipliers=GRANITE),
             "mistral": Architecture(name="mistral", **base, sliding_window=8),
             # NoPE in layer 1 (SmolLM3): vLLM builds transformers' SmolLM3 model in its Transformers backend
             "smollm3": Architecture(name="smollm3", **base, tied_embeddings=True, nope_layers=(1,)),
             # OLMo 2: norms on the branches' outputs, q / k norms over the whole projections
             "olmo2": Architecture(name="olmo2", **base, qk_norm=True, qk_norm_scope="projection",
                                   norm_placement="post"),
             "olmo3": Architecture(name="olmo3", **base, qk_norm=True, qk_norm_scope="projection",
                                   norm_placement="post", sliding_window=8, full_attention_layers=(1,),
                                   rope_scaling=OLMO3_YARN),
             # Gemma 3: vLLM's own Gemma3ForCausalLM (GemmaRMSNorm adds the 1 to the stored weight itself)
             "gemma3": Architecture(name="gemma3", **{**base, "head_dim": 16}, **GEMMA3_BLOCK, tied_embeddings=True,
                                    sliding_window=8, full_attention_layers=(1,), query_pre_attn_scalar=12),
             # Gemma 2: vLLM's own Gemma2ForCausalLM (no q / k norms, soft-capped scores and logits)
             "gemma2": Architecture(name="gemma2", **{**base, "head_dim": 16}, **GEMMA2_BLOCK, tied_embeddings=True,
                                    sliding_window=8, full_attention_layers=(1,), query_pre_attn_scalar=12)}
    dirs, want = {}, {}
    for name, a in archs.items():
        model = build_model(a, seed=0)
        with torch.no_grad():  # non-trivial norms and biases: a tensor left at its initial value changes the sum
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or n.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.3)
        dirs[name] = export_hf(model.state_dict(), a, tmp_path / name, dtype=torch.float32)
        sd = load_file(str(dirs[name] / "model.safetensors"))
        want[name] = (model.num_params(), sum(t.double().abs().sum().item() for t in sd.values()))
    return archs, dirs, want


def test_dense_hf_exports_load_into_vllm_models(load_exports, vllm):
    archs, dirs, want = load_exports
    got = result(vllm, "load")
    for name, a in archs.items():
        m = got[str(dirs[name])]
        assert m["class"] == ("Qwen2ForCausalLM" if a.qkv_bias
                              else ("Gemma3ForCausalLM" if a.qk_norm else "Gemma2ForCausalLM")
                              if a.norm_placement == "sandwich"
                              # vLLM 0.33's registry runs SmolLM3 and OLMo 2 in its Transformers backend
                              else "TransformersForCausalLM" if a.nope_layers or a.norm_placement == "post"
                              else "Qwen3ForCausalLM" if a.qk_norm
                              else "Phi3ForCausalLM" if a.rotary_dim else "GraniteForCausalLM" if a.multipliers
                              else "MistralForCausalLM" if a.sliding_window else "LlamaForCausalLM")
        # VocabParallelEmbedding pads the vocabulary to a multiple of 64 rows (DEFAULT_VOCAB_PADDING_SIZE in
        # vllm/model_executor/layers/vocab_parallel_embedding.py), in the embedding and in an untied LM head
        pad_rows = -a.vocab_size % 64 * (1 if a.tied_embeddings else 2)
        assert m["numel"] == want[name][0] + pad_rows * a.d_model
        # vLLM fuses q/k/v and gate/up into single parameters; the values are the export's, rounded to float32 sums
        assert m["abs_sum"] == pytest.approx(want[name][1], rel=1e-9)
        if a.nope_layers:  # the attention modules vLLM built: RoPE in layer 0, none in layer 1
            assert m["use_rope"] == [1, 0]


# ----------------------------------------------------------------------------- fp8, host, served name


@pytest.fixture(scope="module")
def fp8_served(tmp_path_factory) -> list[str]:
    """An online-fp8 target and one with a host and a served name, emitted for llama3-8b."""
    from test_serving_review import _build

    d = tmp_path_factory.mktemp("fp8")
    _build("serving:\n  - {engine: vllm, quantization: fp8, concurrency: 8}\n"
           "  - {engine: vllm, concurrency: 8, host: 10.1.2.3, served_model_name: org/m-1}\n", d)
    (d / "run/pretrain/hf").mkdir(parents=True)  # where the export goes: vLLM takes a local path only if it exists
    return [str(d / "serving/vllm.yaml"), str(d / "serving/vllm-2.yaml")]


def test_vllm_033_takes_the_emitted_online_fp8_host_and_name(fp8_served, vllm):
    """vLLM 0.33.0 itself: `fp8` on 16-bit weights is refused (Fp8Config names fp8_per_tensor instead), the name llmc
    emits is one of its quantization methods, and its `vllm serve` parser reads the emitted config's quantization,
    served name and host (None without one: vLLM binds every interface)."""
    got = result(vllm, "fp8")
    assert "fp8_per_tensor" in got["online_fp8"] and "no longer supports online" in got["online_fp8"]
    assert "fp8_per_tensor" in got["methods"]
    assert got[fp8_served[0]] == {"quantization": "fp8_per_tensor", "served_model_name": ["rv-pretrain"], "host": None}
    assert got[fp8_served[1]] == {"quantization": None, "served_model_name": ["org/m-1"], "host": "10.1.2.3"}
