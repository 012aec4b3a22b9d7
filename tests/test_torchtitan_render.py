"""Fast checks of the torchtitan renderer and command builder (no torch, no torchtitan import)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import os
import sys
from pathlib import Path

import pytest

from llmc.compiler.hardware import get_gpu
from llmc.compiler.plan import ParallelPlan
from llmc.compiler.result import Compiled, ComputeNumbers, Hyper, ModelNumbers
from llmc.diagnostics import SpecError
from llmc.emit.torchtitan import (
    _pp_module_fqns,
    render_torchtitan,
    torchtitan_diagnostics,
    torchtitan_values,
)
from llmc.runtime.titan_launch import dry_run_command, torchtitan_command
from llmc.spec.schema import RunSpec
from llmc.weight_init import init_scheme

TINY = dict(name="tiny", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192, vocab_size=512,
            rope_theta=500000.0, max_seq_len=256)


def compiled_for(model=None, plan=None, gpu="h100-sxm", precision="bf16", schedule=None, seq=64, steps=100,
                 grad_clip=1.0, lr=3e-4, warmup=10, training_extra=None, **over) -> Compiled:
    plan = plan or ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=2)
    training = {"precision": precision, "grad_clip": grad_clip, **(training_extra or {})}
    if schedule:
        training["schedule"] = schedule
    run = RunSpec.model_validate({
        "name": "t", "model": model or TINY, "data": {"seq_len": seq, "tokens": 1e6},
        "hardware": {"gpu": gpu, "count": plan.world}, "training": training, **over,
    })
    hyper = Hyper(lr=lr, min_lr=lr / 10, warmup_steps=warmup, steps=steps, global_batch_tokens=plan.global_batch_seqs * seq,
                  global_batch_seqs=plan.global_batch_seqs, seq_len=seq, schedule=run.training.schedule.kind,
                  checkpoint_interval=50, checkpoint_async=False)
    sha = hashlib.sha256(run.model_dump_json().encode()).hexdigest()
    return Compiled("t.yaml", sha, run, get_gpu(gpu), ModelNumbers(0, 0, 0, {}, 0, init_scheme(run.model)),
                    ComputeNumbers("", 0, 0, 0, 0, 0, 0, 0), hyper, plan, None, None, None, [], [], [], [])


def test_render_is_deterministic_valid_python_with_header():
    c = compiled_for()
    a, b = render_torchtitan(c), render_torchtitan(c)
    assert a == b
    assert set(a) == {"torchtitan/llmc_job.py", "torchtitan/run_single_node.sh", "torchtitan/run_multi_node.sh",
                      "torchtitan/slurm.sbatch"}
    src = a["torchtitan/llmc_job.py"]
    tree = ast.parse(src)
    fns = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"job", "job_without_converters", "model_config", "model_spec"} <= fns
    job = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "job")
    assert not job.args.args  # zero-argument config function
    head = src.splitlines()[:6]
    assert any("torchtitan 0.3.0" in h and "torch 2.14.1" in h for h in head)
    assert any(c.spec_sha256 in h for h in head)
    assert "--module llmc_job --config job" in src
    assert "titan_cpu_shim" not in a["torchtitan/run_single_node.sh"] + a["torchtitan/run_multi_node.sh"]
    assert "/tmp" not in src and "/work" not in src  # paths come from the environment at launch


def test_values_follow_the_plan():
    plan = ParallelPlan(dp_replicate=2, dp_shard=4, tp=2, pp=2, pp_schedule="GPipe", micro_batch=2, grad_accum=8,
                        activation_checkpointing="full")
    v = torchtitan_values(compiled_for(plan=plan)).ctx
    assert (v["dp_replicate"], v["dp_shard"], v["tp"], v["pp"], v["cp"], v["ep"]) == (2, 4, 2, 2, 1, 1)
    # PP: local batch = pipeline micro-batches per step; global = local x dp
    assert v["local_batch_size"] == 16 and v["pp_microbatch"] == 2
    assert v["global_batch_size"] == plan.global_batch_seqs == 16 * 8
    assert v["disable_cuda_graphs"] is True  # torchtitan rejects CUDA graphs with PP
    assert v["ac"] == "full" and v["pp_schedule"] == "GPipe"
    v1 = torchtitan_values(compiled_for()).ctx
    assert v1["local_batch_size"] == 2 and v1["global_batch_size"] == 2 * 2 * 8  # grad accumulation 2
    assert v1["disable_cuda_graphs"] is False


@pytest.mark.parametrize("kind,ratio,dtype,factor", [
    ("cosine", None, "cosine", 0.1), ("linear", None, "linear", 0.1), ("wsd", 0.2, "sqrt", 0.1),
    ("constant", None, "linear", 1.0)])
def test_schedule_mapping(kind, ratio, dtype, factor):
    v = torchtitan_values(compiled_for(schedule={"kind": kind})).ctx
    assert (v["decay_ratio"], v["decay_type"]) == (ratio, dtype)
    assert v["min_lr_factor"] == pytest.approx(factor)


def test_fp8_emits_float8_converter_and_no_clip_is_inf():
    src = render_torchtitan(compiled_for(precision="fp8", grad_clip=None))["torchtitan/llmc_job.py"]
    assert "Float8LinearConverter.Config(" in src and "recipe_name='rowwise'" in src
    assert 'max_norm=float("inf")' in src


def _fp8_job(recipe, gpu="b200"):
    return compiled_for(precision="fp8", gpu=gpu, training_extra={"fp8_recipe": recipe})


def test_fp8_recipe_reaches_the_job():
    """training.fp8_recipe: rowwise (and the default) -> Float8LinearConverter(recipe_name="rowwise"); mxfp8 ->
    torchtitan 0.3.0's MXFP8LinearConverter over the attention / MLP / shared-expert linears (not the output
    head, not the router); tensorwise -> X311 (torchtitan 0.3.0's Float8LinearConverter has no tensorwise)."""
    for recipe in (None, "rowwise"):
        src = render_torchtitan(_fp8_job(recipe))["torchtitan/llmc_job.py"]
        assert "recipe_name='rowwise'" in src and "MXFP8LinearConverter" not in src
    src = render_torchtitan(_fp8_job("mxfp8"))["torchtitan/llmc_job.py"]
    ast.parse(src)
    assert "from torchtitan.components.quantization import MXFP8LinearConverter" in src
    assert "MXFP8LinearConverter.Config(" in src and "Float8LinearConverter" not in src
    assert "fqns=['attention', 'feed_forward', 'shared_experts']" in src
    assert "converters()" in src and "MXFP8LinearConverter" not in render_torchtitan(
        compiled_for(gpu="b200"))["torchtitan/llmc_job.py"]  # bf16: no converter at all
    with pytest.raises(SpecError) as e:
        render_torchtitan(_fp8_job("tensorwise"), strict=True)
    d = e.value.diagnostics[0]
    assert d.code == "X311" and d.path == "training.fp8_recipe"


@pytest.mark.slow
def test_mxfp8_job_loads_through_torchtitans_config_manager(tmp_path):
    """The emitted mxfp8 job loads with torchtitan's own ConfigManager (``job_without_converters``: building the
    MX converter needs an SM 10.x GPU, which torchtitan checks) and its ``converters()`` are torchtitan's
    MXFP8LinearConverter.Config with the emitted FQNs."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from torchtitan.components.quantization import MXFP8LinearConverter
    from torchtitan.config import ConfigManager

    c = _fp8_job("mxfp8")
    for rel, text in render_torchtitan(c, strict=True).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    mod_dir = tmp_path / "torchtitan"
    sys.path.insert(0, str(mod_dir))
    sys.modules.pop("llmc_job", None)
    try:
        cfg = ConfigManager().parse_args(["--module", "llmc_job", "--config", "job_without_converters"])
        assert cfg.parallelism.data_parallel_shard_degree == 8
        # the GPU job's chunked loss cuts each sequence into as many chunks as the plan's memory counted
        from torchtitan.components.loss import ChunkedLossWrapper

        from llmc.compiler.backends import get_backend

        assert isinstance(cfg.loss, ChunkedLossWrapper.Config)
        assert cfg.loss.num_chunks == get_backend("torchtitan").loss_chunks == 8
        import llmc_job

        convs = llmc_job.converters()
        assert len(convs) == 1 and isinstance(convs[0], MXFP8LinearConverter.Config)
        assert convs[0].fqns == ["attention", "feed_forward", "shared_experts"]
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("llmc_job", None)


def test_a_sequence_the_chunked_loss_cannot_split_is_a_located_error():
    """X313: torchtitan's ChunkedLossWrapper cuts each rank's sequence (seq_len / cp) into 8 equal chunks and refuses
    a length they do not divide; the CPU job computes the loss whole."""
    assert torchtitan_diagnostics(compiled_for(seq=64)) == []
    d = torchtitan_diagnostics(compiled_for(seq=68))  # 68 tokens in 8 chunks
    assert [x.code for x in d] == ["X313"] and d[0].path == "data.seq_len" and "multiple of 8" in d[0].hint
    cp2 = ParallelPlan(dp_shard=4, cp=2, micro_batch=2, grad_accum=2)
    assert torchtitan_diagnostics(compiled_for(plan=cp2, seq=256)) == []  # 128 tokens per rank, 16 per chunk
    # with CP each rank's share is whole 128-token blocks of the flex mask (X306), which 8 chunks always divide
    d = torchtitan_diagnostics(compiled_for(plan=cp2, seq=72))
    assert [x.code for x in d] == ["X306"] and "multiple of 256" in d[0].hint
    assert torchtitan_diagnostics(compiled_for(seq=60, gpu="cpu", plan=ParallelPlan(dp_shard=2))) == []


def test_unexpressible_architectures_give_diagnostics_not_modules():
    bad = {**TINY, "rope_scaling": {"type": "linear", "factor": 2.0}}
    c = compiled_for(model=bad)
    codes = [d.code for d in torchtitan_diagnostics(c)]
    assert codes == ["X301"]
    files = render_torchtitan(c)
    assert list(files) == ["torchtitan/NOT_EMITTED.txt"] and "X301" in files["torchtitan/NOT_EMITTED.txt"]
    with pytest.raises(SpecError):
        render_torchtitan(c, strict=True)
    longrope = {**TINY, "rope_scaling": {"type": "longrope", "factor": 4.0, "original_max_position": 64,
                                         "short_factor": [1.0] * 16, "long_factor": [2.0] * 16}}
    [d] = torchtitan_diagnostics(compiled_for(model=longrope))
    assert d.code == "X301" and "'longrope'" in d.message
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "rotary_dim": TINY["d_model"] // TINY["n_heads"] // 2}))
    assert (d.code, d.path) == ("X301", "model.rotary_dim")
    # YaRN: torchtitan's rotation is pure, transformers' (and llmc's) cos/sin carry the attention factor (0.1 ln(4) + 1
    # here; DeepSeek's m(mscale) / m(mscale_all_dim)): the job's TemperedRoPE scales its cache by it (test_qwen3 runs
    # it against llmc's model); with the factor 1 (attention_factor 1, or mscale = mscale_all_dim) the plain RoPE
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position": 64}
    for extra, factor in (({}, 0.1 * math.log(4.0) + 1), ({"mscale": 1.0, "mscale_all_dim": 0.7},
                                                          (0.1 * math.log(4.0) + 1) / (0.07 * math.log(4.0) + 1)),
                          ({"attention_factor": 1.0}, None), ({"mscale": 0.7, "mscale_all_dim": 0.7}, None)):
        c = compiled_for(model={**TINY, "rope_scaling": {**yarn, **extra}})
        assert torchtitan_diagnostics(c) == []
        src = render_torchtitan(c)["torchtitan/llmc_job.py"]
        if factor is None:
            assert "TemperedRoPE" not in src and "attention_factor=" not in src
        else:
            assert "return TemperedRoPE.Config(" in src
            assert float(src.split("attention_factor=")[-1].split(",")[0]) == pytest.approx(factor, rel=1e-12)
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "multipliers": {"embedding": 12.0}}))
    assert (d.code, d.path) == ("X314", "model.multipliers")
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "sliding_window": 16}))
    assert (d.code, d.path) == ("X315", "model.sliding_window")
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "nope_layers": [3]}))
    assert (d.code, d.path) == ("X316", "model.nope_layers") and "NoPE" in d.message
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "qk_norm": True, "qk_norm_scope": "projection",
                                                     "norm_placement": "post"}))
    assert (d.code, d.path) == ("X317", "model.norm_placement") and "OLMo 2" in d.message
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "qk_norm": True, "norm_placement": "sandwich",
                                                     "norm_unit_offset": True, "activation": "gelu_tanh",
                                                     "embedding_scale": True}))
    assert (d.code, d.path) == ("X318", "model.norm_placement") and "Gemma block" in d.message
    [d] = torchtitan_diagnostics(compiled_for(model={**TINY, "norm_placement": "sandwich", "norm_unit_offset": True,
                                                     "activation": "gelu_tanh", "embedding_scale": True,
                                                     "attn_logit_softcap": 50.0, "final_logit_softcap": 30.0}))
    assert (d.code, d.path) == ("X318", "model.norm_placement") and "soft-capping" in d.message
    tied_pp = compiled_for(model={**TINY, "tied_embeddings": True},
                           plan=ParallelPlan(pp=2, micro_batch=1, grad_accum=4))
    assert [d.code for d in torchtitan_diagnostics(tied_pp)] == ["X303"]
    long = compiled_for(seq=512)  # > max_seq_len 256
    assert "X305" in [d.code for d in torchtitan_diagnostics(long)]


def test_pp_module_split_covers_every_layer_once():
    for layers, stages in [(126, 32), (61, 16), (8, 4), (5, 4)]:
        parts = _pp_module_fqns(layers, stages)
        assert len(parts) == stages and all(any(m.startswith("layers.") for m in p) for p in parts)
        got = [m for p in parts for m in p if m.startswith("layers.")]
        assert got == [f"layers.{i}" for i in range(layers)]
        assert parts[0][0] == "tok_embeddings" and parts[-1][-2:] == ["norm", "lm_head"]
    plan = ParallelPlan(pp=4, pp_schedule="Interleaved1F1B", pp_virtual_stages=4, micro_batch=1, grad_accum=8)
    v = torchtitan_values(compiled_for(model={**TINY, "n_layers": 32}, plan=plan)).ctx
    assert len(v["pp_module_fqns"]) == 16


def test_pp_split_with_more_stages_than_blocks():
    """Up to 2 stages more than blocks (Megatron-LM's embedding / loss accounting in the pipeline split, as in
    Megatron-Bridge's 405B pp 16 x v 8 recipes): the first stage holds only the embedding, the last only the norm
    and head, and torchtitan builds those chunks from the module lists (its ``_split_module`` keeps an empty
    ``layers``); 3 more is X308."""
    parts = _pp_module_fqns(126, 128)
    assert parts[0] == ["tok_embeddings"] and parts[-1] == ["norm", "lm_head"]
    assert [p for p in parts[1:-1]] == [[f"layers.{i}"] for i in range(126)]
    assert _pp_module_fqns(4, 5)[-1] == ["norm", "lm_head"] and _pp_module_fqns(4, 5)[0][0] == "tok_embeddings"
    plan = ParallelPlan(pp=2, pp_schedule="Interleaved1F1B", pp_virtual_stages=3, micro_batch=1, grad_accum=8)
    assert torchtitan_values(compiled_for(plan=plan)).ctx["pp_module_fqns"][0] == ["tok_embeddings"]
    # that chunk has no weight-decayed parameter: the job's optimizer skips the group there (torchtitan raises)
    assert "optimizer=ChunkOptimizers.Config(" in render_torchtitan(compiled_for(plan=plan), strict=True)["torchtitan/llmc_job.py"]
    two = render_torchtitan(compiled_for(plan=dataclasses.replace(plan, pp_virtual_stages=2)), strict=True)["torchtitan/llmc_job.py"]
    assert "ChunkOptimizers" not in two and "optimizer=OptimizersContainer.Config(" in two
    too_many = dataclasses.replace(plan, pp_virtual_stages=4)  # 8 stages for 4 blocks
    assert [d.code for d in torchtitan_diagnostics(compiled_for(plan=too_many))] == ["X308"]


def test_torchtitan_command_gpu_and_cpu(tmp_path):
    mod = tmp_path / "build" / "torchtitan" / "llmc_job.py"
    mod.parent.mkdir(parents=True)
    mod.write_text("")
    argv, env = torchtitan_command(mod, 8, False, ["--training.steps", "3"])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=8" in argv
    i = argv.index("torchtitan.train")
    assert argv[i - 1] == "-m" and argv[i + 1:] == ["--module", "llmc_job", "--config", "job", "--training.steps", "3"]
    assert "llmc.runtime.titan_cpu_shim" not in argv
    assert env["PYTHONPATH"].split(":")[0] == str(mod.parent.resolve())
    assert env["LLMC_RUN_DIR"] == str((tmp_path / "build").resolve())
    assert {env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")} == {"1"} and env["WANDB_MODE"] == "disabled"
    argv, env = torchtitan_command(mod, 2, True, run_dir=tmp_path / "run")
    assert "llmc.runtime.titan_cpu_shim" in argv and "torchtitan.train" not in argv
    assert env["LLMC_RUN_DIR"] == str((tmp_path / "run").resolve())
    argv, env = dry_run_command(mod, 64)
    assert "torch.distributed.run" not in argv and env["NGPU"] == "64" and env["LOCAL_RANK"] == "0"
    assert argv[argv.index("--comm.mode") + 1] == "fake_backend"
    with pytest.raises(ValueError):
        torchtitan_command(mod, 0, True)


def test_every_family_renders():
    moe = {**TINY, "moe": {"num_experts": 4, "top_k": 2}}
    mla = {**TINY, "n_kv_heads": 4, "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "dense_layers": 1,
                                            "score_func": "sigmoid"},
           "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16}}
    for model, fam in [(TINY, "llama3"), (moe, "qwen3_moe"), (mla, "deepseek_v3")]:
        c = compiled_for(model=model)
        assert torchtitan_values(c).ctx["family"] == fam
        ast.parse(render_torchtitan(c)["torchtitan/llmc_job.py"])
    c = dataclasses.replace(compiled_for(), plan=None)
    assert [d.code for d in torchtitan_diagnostics(c)] == ["X300"]


def test_templates_have_no_arithmetic():
    root = Path(__file__).resolve().parents[1] / "llmc" / "templates" / "torchtitan"
    import re

    for t in root.glob("*.j2"):
        for expr in re.findall(r"{{(.*?)}}", t.read_text()):
            assert not re.search(r"[-+*/%]\s*\d|\d\s*[-+*/%]", expr), (t.name, expr)


def test_launch_scripts_parse_and_use_torchrun(tmp_path):
    import subprocess

    plan = ParallelPlan(dp_shard=64, tp=2, micro_batch=1, grad_accum=2)  # 128 GPUs, 8 per node
    files = render_torchtitan(compiled_for(plan=plan))
    for name in ("run_single_node.sh", "run_multi_node.sh", "slurm.sbatch"):
        p = tmp_path / name
        p.write_text(files[f"torchtitan/{name}"])
        subprocess.run(["bash", "-n", str(p)], check=True)
    multi = files["torchtitan/run_multi_node.sh"]
    assert 'NNODES="${NNODES:-16}"' in multi and 'NPROC_PER_NODE="${NPROC_PER_NODE:-8}"' in multi
    assert "-m torchtitan.train --module llmc_job --config job" in multi
    assert "#SBATCH --nodes=16" in files["torchtitan/slurm.sbatch"]
    assert "--gpus-per-node=8" in files["torchtitan/slurm.sbatch"]


# ------------------------------------------------------------------ weight decay, HF init, routing, q/k/v bias

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"


def with_init_hf(c: Compiled, src: str) -> Compiled:
    spec = c.spec.model_copy(update={"training": c.spec.training.model_copy(update={"init_hf": src})})
    return dataclasses.replace(c, spec=spec)


def test_no_weight_decay_pattern_is_the_runtime_rule():
    pytest.importorskip("torch")
    import re

    from llmc.emit.torchtitan import NO_WD_PATTERN
    from llmc.runtime.model import NO_DECAY_PATTERN

    assert NO_WD_PATTERN == NO_DECAY_PATTERN
    src = render_torchtitan(compiled_for())["torchtitan/llmc_job.py"]
    emitted = re.search(r"ParamGroupConfig\(pattern=(r?'[^']*'|r?\"[^\"]*\")", src).group(1)
    assert ast.literal_eval(emitted) == NO_DECAY_PATTERN


def test_init_hf_emits_an_initial_hf_load(tmp_path):
    c = with_init_hf(compiled_for(), "ckpt/llama")  # spec t.yaml in the cwd: relative to the spec folder
    src = render_torchtitan(c)["torchtitan/llmc_job.py"]
    for field in ("initial_load_path=_init_hf_dir()", "initial_load_in_hf=True", "initial_load_model_only=True"):
        assert field in src
    assert "INIT_HF = 'ckpt/llama'" in src  # the spec sits in the build directory here
    # llmc build records the spec path relative to the build directory; init_hf follows it, so the build
    # tree can move and does not depend on the directory build ran from
    c2 = dataclasses.replace(c, spec_path="../../specs/t.yaml")
    rel = render_torchtitan(c2)["torchtitan/llmc_job.py"]
    assert "INIT_HF = '../../specs/ckpt/llama'" in rel
    absolute = render_torchtitan(with_init_hf(compiled_for(), "/models/llama"))
    assert "INIT_HF = '/models/llama'" in absolute["torchtitan/llmc_job.py"]
    plain = render_torchtitan(compiled_for())["torchtitan/llmc_job.py"]
    assert "initial_load" not in plain and "INIT_HF" not in plain


def test_job_refuses_a_fused_phi3_checkpoint_when_it_starts(tmp_path, monkeypatch):
    """The build cannot see the checkpoint (the compiler reads no files): the job's own ``_init_hf_dir`` reads its
    config.json and stops on a Phi-3 checkpoint (fused qkv_proj / gate_up_proj, which torchtitan's Llama adapter does
    not read) with one line naming the way out; a Llama checkpoint passes."""
    import json
    import os

    src = render_torchtitan(with_init_hf(compiled_for(), "ckpt"))["torchtitan/llmc_job.py"]
    body = ast.parse(src).body
    fn = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == "_init_hf_dir")
    fused = next(n for n in body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "FUSED_HF_MODEL_TYPES")
    ns = {"os": os, "json": json, "BUILD_DIR": str(tmp_path), "INIT_HF": "ckpt", "INIT_HF_SOURCE": "ckpt"}
    exec(compile(ast.Module([fused, fn], []), "llmc_job.py", "exec"), ns)
    assert ns["FUSED_HF_MODEL_TYPES"] == ["phi3"]  # llmc.spec.families.FUSED_HF_MODEL_TYPES, written into the job
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    monkeypatch.delenv("LLMC_INIT_HF", raising=False)
    for model_type, ok in (("llama", True), ("mistral", True), ("phi3", False)):
        (ckpt / "config.json").write_text(json.dumps({"model_type": model_type}))
        if ok:
            assert ns["_init_hf_dir"]() == str(ckpt)
        else:
            with pytest.raises(SystemExit, match="phi3 checkpoint .* native or deepspeed"):
                ns["_init_hf_dir"]()


def test_a_phi3_checkpoint_is_a_located_error_when_the_build_knows_it():
    """With the init_hf checkpoint's model_type gathered before compiling (llmc.spec.facts), a Phi-3 checkpoint
    (fused projections) is X310 at build time, not only when the job starts."""
    c = with_init_hf(compiled_for(), "/models/phi-4")
    assert torchtitan_diagnostics(c) == []
    [d] = torchtitan_diagnostics(dataclasses.replace(c, checkpoint_types={"/models/phi-4": "phi3"}))
    assert (d.code, d.path) == ("X310", "training.init_hf") and "fused" in d.message


def test_init_hf_without_an_adapter_is_a_located_error():
    moe = {**TINY, "moe": {"num_experts": 4, "top_k": 2}}
    c = with_init_hf(compiled_for(model=moe), "/models/mixtral")
    [d] = torchtitan_diagnostics(c)
    assert (d.code, d.severity, d.path) == ("X310", "error", "training.init_hf")
    assert torchtitan_diagnostics(with_init_hf(compiled_for(), "/models/llama")) == []
    assert list(render_torchtitan(c)) == ["torchtitan/NOT_EMITTED.txt"]


def test_qwen3_jobs_start_from_hf_checkpoints_through_the_qwen3_adapter():
    """Qwen3 and Qwen3-MoE jobs build torchtitan's cos/sin RoPE (HF's rotate_half order), so the job names torchtitan's
    Qwen3StateDictAdapter and ``init_hf`` is read through it (its from_hf checks the RoPE class: test_qwen3.py loads
    an export through it); llama3-type RoPE scaling has no cos/sin form (X301). Mixtral on the same torchtitan
    module keeps ComplexRoPE and no adapter (its HF names are not Qwen3's: X310)."""
    for extra in ({}, {"moe": {"num_experts": 4, "top_k": 2, "expert_d_ff": 32}}):
        q3 = {**TINY, "qk_norm": True, **extra}
        c = with_init_hf(compiled_for(model=q3), "/models/qwen3")
        assert torchtitan_diagnostics(c) == []
        src = render_torchtitan(c)["torchtitan/llmc_job.py"]
        assert "state_dict_adapter=Qwen3StateDictAdapter," in src and "initial_load_in_hf=True" in src
        assert "return CosSinRoPE.Config(" in src and "ComplexRoPE" not in src
    scaled = {**TINY, "qk_norm": True, "rope_scaling": {"type": "llama3", "factor": 8.0}}
    assert [d.code for d in torchtitan_diagnostics(compiled_for(model=scaled))] == ["X301"]
    mix = render_torchtitan(compiled_for(model={**TINY, "moe": {"num_experts": 4, "top_k": 2}}))["torchtitan/llmc_job.py"]
    assert "return ComplexRoPE.Config(" in mix and "state_dict_adapter=None," in mix


def test_qwen_qkv_bias_gets_no_bias_dropping_adapter():
    """torchtitan 0.3.0's Llama3/Qwen3 state-dict adapters have no q/k/v bias keys (checked against the library
    in test_torchtitan.py): a Qwen2.5-style model gets no adapter, and init_hf on it is refused."""
    qwen = {**TINY, "qkv_bias": True}
    src = render_torchtitan(compiled_for(model=qwen))["torchtitan/llmc_job.py"]
    assert "state_dict_adapter=None" in src and "Llama3StateDictAdapter" not in src
    assert "attn.qkv_linear.wqkv.bias = True" in src
    [d] = torchtitan_diagnostics(with_init_hf(compiled_for(model=qwen), "/models/qwen2.5"))
    assert d.code == "X310" and "bias" in d.message
    assert "state_dict_adapter=Llama3StateDictAdapter" in render_torchtitan(compiled_for())["torchtitan/llmc_job.py"]


def test_deepseek_v3_routing_is_the_hf_configs():
    import json

    from llmc.spec.presets import PRESETS

    hf = json.loads((FIXTURES / "deepseek-v3.json").read_text())
    arch = PRESETS["deepseek-v3"]
    c = compiled_for(model=arch.model_dump(), seq=4096)
    moe = torchtitan_values(c).ctx["moe"]
    assert (moe["route_scale"], moe["n_expert_groups"], moe["n_limited_groups"]) == (
        hf["routed_scaling_factor"], hf["n_group"], hf["topk_group"])
    src = render_torchtitan(c)["torchtitan/llmc_job.py"]
    assert "router_route_scale=2.5," in src and "router_num_expert_groups=8," in src
    assert "router_num_limited_groups=4," in src and "routed_scaling_factor" not in src
    mix = torchtitan_values(compiled_for(model={**TINY, "moe": {"num_experts": 4, "top_k": 2}})).ctx["moe"]
    assert (mix["route_scale"], mix["n_expert_groups"], mix["n_limited_groups"]) == (1.0, None, None)


def test_init_hf_of_a_pretrain_stage_is_read_and_located_there():
    from test_build_fakes import make_compiled, make_run

    stages = [{"name": "base", "kind": "pretrain", "init_hf": "/models/mixtral", "steps": 3},
              {"name": "mid", "kind": "midtrain", "init_from": "base", "steps": 3}]
    moe = make_run(model={"moe": {"num_experts": 4, "top_k": 2}}, stages=stages)
    c = make_compiled(moe, stages=[{k: v for k, v in s.items() if k != "steps"} for s in stages])
    [d] = torchtitan_diagnostics(c)
    assert (d.code, d.path) == ("X310", "stages.0.init_hf")
    dense = make_compiled(make_run(stages=stages), stages=[{k: v for k, v in s.items() if k != "steps"}
                                                           for s in stages])
    src = render_torchtitan(dense)["torchtitan/llmc_job.py"]
    assert "INIT_HF = '/models/mixtral'" in src and "initial_load_in_hf=True" in src


def test_source_paths_reach_the_job_as_python_literals():
    """Spec strings (source names, paths, text fields, validation files) are emitted escaped: the module
    parses and its DATA_SOURCES / VALIDATION literals hold exactly the strings (relative paths joined with
    the spec's folder as seen from the build directory)."""
    weird = "data/it's \"odd\"\n#{{ x }}\\.parquet"
    data = {"seq_len": 64, "tokens": 1e6, "sources": [
        {"name": "web", "path": weird, "format": "parquet", "text_field": "bo'dy", "weight": 2},
        {"name": "ref", "path": "/abs/corpus/*.jsonl", "format": "jsonl", "weight": 1},
        {"name": "python-docs", "format": "builtin", "weight": 1}]}
    c = compiled_for(data=data, eval={"validation": {"files": ["val's.jsonl"], "every_steps": 5, "max_batches": 2}})
    src = render_torchtitan(c)["torchtitan/llmc_job.py"]
    tree = ast.parse(src)
    lits = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in ("DATA_SOURCES", "VALIDATION")}
    assert lits["DATA_SOURCES"] == [
        {"name": "web", "format": "parquet", "path": weird, "under": "build", "text_field": "bo'dy", "weight": 0.5,
         "val_parts": 500_000},  # (the validation set's shares in millionths: 2 / 4, 1 / 4, 1 / 4)
        {"name": "ref", "format": "jsonl", "path": "/abs/corpus/*.jsonl", "under": "build", "text_field": "text",
         "weight": 0.25, "val_parts": 250_000},
        {"name": "python-docs", "format": "jsonl", "path": "python-docs.jsonl", "under": "data", "text_field": "text",
         "weight": 0.25, "val_parts": 250_000}]
    assert c.plan.grad_accum > 1  # max_batches global batches: grad_accum batches of micro_batch windows each
    assert lits["VALIDATION"] == {"freq": 5, "steps": 2 * c.plan.grad_accum, "micro_batch": c.plan.micro_batch,
                                  "fraction": None, "seed": 0, "files": ["val's.jsonl"], "file_formats": ["jsonl"],
                                  "grad_accum": c.plan.grad_accum}  # (whole global batches: the same windows as llmc's)


def test_home_relative_paths_are_expanded_where_the_job_runs(monkeypatch):
    """``~`` in a source path, validation file or ``init_hf`` stays ``~`` in the job (the home of the machine that
    runs it, as llmc's own runtime reads it), never the home of the machine that built it: two builds from
    different homes are byte-identical, and the job and the native trainer open the same file."""
    from types import SimpleNamespace

    from llmc.runtime.job import TrainJob

    data = {"seq_len": 64, "tokens": 1e6, "sources": [{"name": "web", "path": "~/corpus/web.jsonl"}]}
    jobs = []
    for home in ("/home/alice", "/home/bob"):
        monkeypatch.setenv("HOME", home)
        c = compiled_for(data=data, training_extra={"init_hf": "~/models/base"},
                         eval={"validation": {"files": ["~/val.jsonl"], "every_steps": 5}})
        jobs.append(render_torchtitan(c)["torchtitan/llmc_job.py"])
    assert jobs[0] == jobs[1] and "alice" not in jobs[0]
    tree = ast.parse(jobs[0])
    lits = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in ("DATA_SOURCES", "VALIDATION", "INIT_HF")}
    assert lits["DATA_SOURCES"][0]["path"] == "~/corpus/web.jsonl" and lits["VALIDATION"]["files"] == ["~/val.jsonl"]
    assert lits["INIT_HF"] == "~/models/base"
    # the job's own resolution (its _where function, run here) and the native trainer's agree on this machine
    where = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_where")
    scope = {"os": os, "DATA_DIR": "/run/data", "BUILD_DIR": "/builds/b"}
    exec(compile(ast.Module([where], []), "llmc_job", "exec"), scope)
    native = TrainJob.resolve_path(SimpleNamespace(spec_dir="/specs"), "~/corpus/web.jsonl")
    assert scope["_where"](lits["DATA_SOURCES"][0]) == str(native) == "/home/bob/corpus/web.jsonl"
