"""``llmc build``: artifact layout, headers, determinism, atomic writes, build diagnostics, golden files."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import check_golden
from test_build_fakes import EXAMPLES, ROOT, compile_example, make_compiled, make_run
from typer.testing import CliRunner

import llmc
from llmc.buildfs import write_build
from llmc.cli import app
from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import SpecError
from llmc.emit import render_artifacts
from llmc.emit.deepspeed import DS_TOP_LEVEL_KEYS, deepspeed_config
from llmc.lockfile import SCHEMA_VERSION, check_lock

GOLDEN = ROOT / "tests" / "golden" / "build"

VLLM_KEYS = {"model", "served-model-name", "dtype", "tensor-parallel-size", "pipeline-parallel-size",
             "max-model-len", "max-num-seqs", "max-num-batched-tokens", "gpu-memory-utilization", "kv-cache-dtype",
             "quantization",
             "enable-prefix-caching", "no-enable-prefix-caching", "distributed-executor-backend", "host", "port"}
SGLANG_KEYS = {"model-path", "served-model-name", "dtype", "tp-size", "pp-size", "context-length",
               "max-running-requests", "chunked-prefill-size", "mem-fraction-static", "kv-cache-dtype", "quantization",
               "disable-radix-cache", "nnodes", "host", "port"}

SERVING = [{"index": 0, "engine": "vllm", "gpu": "h100-sxm", "stage": "pretrain", "tensor_parallel_size": 2,
            "pipeline_parallel_size": 1, "gpus": 2, "max_model_len": 8192, "concurrency": 64, "max_num_seqs": 64, "max_num_batched_tokens": 8192,
            "max_seqs_that_fit": 70, "gpu_memory_utilization": 0.9, "quantization": None, "kv_cache_dtype": "auto",
            "prefix_caching": True, "kv_bytes_per_token": 131072, "weights_gib": 15.0, "weights_gib_per_gpu": 7.5,
            "reserve_gib_per_gpu": 2.0, "kv_gib_per_seq": 0.5, "kv_gib_needed": 32.0, "kv_budget_gib": 35.0,
            "capacity_gib": 74.506, "fits": True, "nodes": 1}]


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_layout_and_headers():
    c = make_compiled(serving=SERVING + [dict(SERVING[0], index=1, engine="sglang", prefix_caching=False,
                                              kv_cache_dtype="fp8", quantization="fp8")])
    files = render_artifacts(c)
    for name in ["plan.lock.json", "README.md", "native/launch.sh", "launch/torchrun_single_node.sh",
                 "launch/torchrun_multi_node.sh", "launch/slurm.sbatch", "deepspeed/ds_config.json",
                 "deepspeed/launch.sh", "serving/vllm.yaml", "serving/sglang.yaml", ".gitignore"]:
        assert name in files, name
    for name, text in files.items():
        assert text.endswith("\n"), name
        head = "\n".join(text.splitlines()[:8])
        if name.endswith(".json"):
            d = json.loads(text)
            assert d["_llmc"]["spec_sha256"] == c.spec_sha256
            assert d["_llmc"]["target_versions"] == llmc.TARGET_VERSIONS
            assert text == json.dumps(d, indent=2, sort_keys=True) + "\n"  # sorted keys, trailing newline
        elif not name.startswith("torchtitan/"):  # the torchtitan files carry their own header
            assert c.spec_sha256 in head and f"llmc {llmc.__version__}" in head, name
            assert "deepspeed 0.19.8" in head and "torchtitan 0.3.0" in head, name
        assert not re.search(r"20\d\d-\d\d-\d\d[ T]\d\d:\d\d", text), f"timestamp in {name}"


def test_shell_scripts_parse():
    files = render_artifacts(make_compiled())
    for name, text in files.items():
        if name.endswith((".sh", ".sbatch")):
            assert text.startswith("#!/usr/bin/env bash\n"), name
            r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
            assert r.returncode == 0, (name, r.stderr)


def test_serving_configs_use_real_option_names():
    c = make_compiled(serving=SERVING + [dict(SERVING[0], index=1, engine="sglang", prefix_caching=False,
                                              kv_cache_dtype="fp8", quantization="awq")])
    files = render_artifacts(c)
    v = yaml.safe_load(files["serving/vllm.yaml"])
    assert set(v) <= VLLM_KEYS
    assert v["tensor-parallel-size"] == 2 and v["max-model-len"] == 8192 and v["max-num-seqs"] == 64
    assert v["gpu-memory-utilization"] == 0.9 and v["enable-prefix-caching"] is True
    s = yaml.safe_load(files["serving/sglang.yaml"])
    assert set(s) <= SGLANG_KEYS
    assert s["tp-size"] == 2 and s["context-length"] == 8192 and s["max-running-requests"] == 64
    assert s["kv-cache-dtype"] == "fp8_e4m3" and s["disable-radix-cache"] is True and s["quantization"] == "awq"
    multi = render_artifacts(make_compiled(serving=[dict(SERVING[0], pipeline_parallel_size=2, gpus=4, nodes=2),
                                                    dict(SERVING[0], index=1, engine="sglang", nodes=2)]))
    assert yaml.safe_load(multi["serving/vllm.yaml"])["distributed-executor-backend"] == "ray"
    assert yaml.safe_load(multi["serving/sglang.yaml"])["nnodes"] == 2
    # SGLang's static fraction excludes the activation/workspace reserve: 0.9 - 2.0/74.506
    assert s["mem-fraction-static"] == pytest.approx(0.9 - 2.0 / 74.506, abs=1e-3)


def test_ds_config_batch_identity_and_keys():
    c = make_compiled()
    cfg, diags = deepspeed_config(c)
    assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8
    assert cfg["train_batch_size"] == c.hyper.global_batch_seqs
    assert set(cfg) - {"_llmc"} <= DS_TOP_LEVEL_KEYS
    assert cfg["zero_optimization"]["stage"] == 3  # dp_shard 8 > 1
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert "scheduler" not in cfg  # llmc's own schedule (ds_train's client LambdaLR)
    assert not diags


def test_ds_zero_stage_from_plan_and_pins():
    c = make_compiled(plan=ParallelPlan(dp_replicate=8, dp_shard=1, micro_batch=4, grad_accum=1, zero_stage=0))
    assert deepspeed_config(c)[0]["zero_optimization"] == {"stage": 0}
    run = make_run(parallelism={"zero_stage": 2, "offload_optimizer": True})
    cfg, _ = deepspeed_config(make_compiled(run))
    z = cfg["zero_optimization"]
    assert z["stage"] == 2 and z["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "torch_adam" not in cfg["optimizer"]["params"]  # DeepSpeedCPUAdam with offload


def test_ds_schedulers():
    """No DeepSpeed scheduler for any schedule: DeepSpeed's WarmupLR family starts from LR 0 and steps after the
    first update (two steps behind llmc's warmup), so ds_train runs llmc's own schedule, every backend's."""
    for kind in ("cosine", "constant", "wsd", "linear"):
        assert "scheduler" not in deepspeed_config(make_compiled(schedule=kind))[0]
    run = make_run(training={"schedule": {"kind": "linear", "min_lr_ratio": 0.0}})
    assert "scheduler" not in deepspeed_config(make_compiled(run, schedule="linear"))[0]


def test_zero3_with_pipeline_builds_as_folded_zero3(tmp_path):
    """The reviewer's layout: Llama-3-8B on 8 H100 planned for torchtitan with pp 2 x dp_shard 4 and a pinned
    zero_stage 3. `llmc plan` accepts it, and so does `llmc build` (once error X102, about DeepSpeed's pipeline
    engine, which llmc never runs): the DeepSpeed artifacts fold pp into data parallelism (X103), a ZeRO-3 run over
    all 8 GPUs whose batch is the spec's (global_batch_tokens / seq_len sequences)."""
    spec = ROOT / "examples" / "llama3_8b_h100x8.yaml"
    sets = ["--set", "parallelism.pp=2", "--set", "parallelism.dp_shard=4", "--set",
            "training.global_batch_tokens=131072", "--set", "parallelism.zero_stage=3"]
    plan = CliRunner().invoke(app, ["plan", str(spec), *sets])
    assert plan.exit_code == 0, plan.output[-3000:]
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), *sets])
    assert r.exit_code == 0 and "X102" not in r.output and "Traceback" not in r.output, r.output[-3000:]
    assert "warning[X103]" in r.output and "pp=2" in r.output
    gpus = yaml.safe_load(spec.read_text())["hardware"]["count"]
    seqs = 131072 // yaml.safe_load(spec.read_text())["data"]["seq_len"]
    cfg = json.loads((out / "deepspeed" / "ds_config.json").read_text())
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["train_batch_size"] == seqs
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * gpus == seqs
    assert "X103" in (out / "deepspeed" / "launch.sh").read_text()


def test_broken_batch_identity_is_an_error():
    c = make_compiled(plan=ParallelPlan(dp_shard=8, micro_batch=3, grad_accum=2), global_batch_seqs=32)
    with pytest.raises(SpecError) as e:
        render_artifacts(c)
    assert e.value.diagnostics[0].code == "X101" and "48 != global batch 32" in e.value.diagnostics[0].message


def test_offload_with_stage_0_is_an_error():
    run = make_run(parallelism={"zero_stage": 0, "offload_optimizer": True})
    with pytest.raises(SpecError) as e:
        render_artifacts(make_compiled(run))
    assert e.value.diagnostics[0].code == "X108"


def test_tp_plan_folds_into_data_parallel_with_a_warning():
    c = make_compiled(plan=ParallelPlan(dp_shard=4, tp=2, micro_batch=2, grad_accum=4), global_batch_seqs=32)
    cfg, diags = deepspeed_config(c)
    assert [d.code for d in diags] == ["X103"] and diags[0].severity == "warning"
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] * cfg[
        "gradient_accumulation_steps"] == 4  # 32 seqs over 8 DP ranks
    files = render_artifacts(c)
    assert "X103" in files["README.md"] and "X103" in files["deepspeed/launch.sh"]


def test_unsplittable_batch_omits_deepspeed():
    c = make_compiled(plan=ParallelPlan(dp_shard=1, tp=8, micro_batch=4, grad_accum=1), global_batch_seqs=4)
    files = render_artifacts(c)
    assert "deepspeed/ds_config.json" not in files and "X104" in files["README.md"]


def test_unfit_serving_target_is_an_error():
    with pytest.raises(SpecError) as e:
        render_artifacts(make_compiled(serving=[dict(SERVING[0], fits=False)]))
    assert e.value.diagnostics[0].code == "V001"


def test_render_is_deterministic_and_pure():
    c = make_compiled(serving=SERVING)
    assert render_artifacts(c) == render_artifacts(make_compiled(serving=SERVING))


# ---------------------------------------------------------------------------------- CLI, atomicity


def _fake_compile(monkeypatch, compiled):
    import llmc.cli as cli

    monkeypatch.setattr(cli, "_compile", lambda spec, *a, **k: compiled)


def test_cli_build_twice_is_byte_identical(tmp_path, monkeypatch):
    _fake_compile(monkeypatch, make_compiled(serving=SERVING))
    r1 = CliRunner().invoke(app, ["build", "x.yaml", "-o", str(tmp_path / "a")])
    r2 = CliRunner().invoke(app, ["build", "x.yaml", "-o", str(tmp_path / "b")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert ta == tb and "deepspeed/ds_config.json" in ta
    # build warnings are printed (and listed in README.md)
    _fake_compile(monkeypatch, make_compiled(plan=ParallelPlan(dp_shard=4, tp=2, micro_batch=2, grad_accum=4)))
    r3 = CliRunner().invoke(app, ["build", "x.yaml", "-o", str(tmp_path / "c")])
    assert r3.exit_code == 0 and "fake.yaml: warning[X103]" in r3.output
    assert (tmp_path / "a" / "native" / "launch.sh").stat().st_mode & 0o111


def test_failing_build_leaves_no_output(tmp_path, monkeypatch):
    # optimizer offload with ZeRO stage 0 (X108): DeepSpeed offloads only the partitions ZeRO >= 1 makes
    run = make_run(parallelism={"zero_stage": 0, "offload_optimizer": True})
    _fake_compile(monkeypatch, make_compiled(run))
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["build", "x.yaml", "-o", str(out)])
    assert r.exit_code == 1 and "error[X108]" in r.output and "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_write_error_mid_tree_leaves_previous_build(tmp_path):
    from llmc.buildfs import UnsafePathError

    out = tmp_path / "out"
    write_build(out, {"a.txt": "old\n"})
    with pytest.raises(UnsafePathError):
        write_build(out, {"a.txt": "new\n", "a.txt/b": "x"})  # a file where a dir must go
    assert (out / "a.txt").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------- golden files


# One golden per target and model family: the whole build tree of a pre-training run and of a
# post-training pipeline; the torchtitan job of a dense GQA, a MoE and an MLA model; one ds_config;
# one pair of serving configs. The other files of those builds are covered by the unit tests above.
GOLDEN_FILES: dict[str, tuple[str, ...] | None] = {
    "tiny_cpu": None,  # None = every file of the build
    "pipeline_tiny": None,
    "llama3_8b_h100x8": ("torchtitan/llmc_job.py", "deepspeed/ds_config.json", "serving/vllm.yaml",
                         "serving/sglang.yaml"),
    "mixtral_8x7b": ("torchtitan/llmc_job.py",),
    "deepseek_v3": ("torchtitan/llmc_job.py",),
}


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_builds(example):
    files = render_artifacts(compile_example(example))
    lock = check_lock(json.loads(files["plan.lock.json"]))
    assert lock["schema_version"] == SCHEMA_VERSION and lock["spec"]["sha256"]
    assert [s["name"] for s in lock["stages"]]  # always at least the pre-training stage
    for name in ("README.md", "native/launch.sh", "launch/slurm.sbatch", ".gitignore"):
        assert name in files


@pytest.mark.parametrize("stem", sorted(GOLDEN_FILES))
def test_golden_build(stem, update_golden):
    compiled = compile_example(ROOT / "examples" / f"{stem}.yaml")
    try:
        files = render_artifacts(compiled)
    except SpecError as e:
        pytest.fail(f"{stem}.yaml does not build:\n{e}")
    gdir = GOLDEN / stem
    names = GOLDEN_FILES[stem]
    if names is None:
        names = tuple(sorted(files))
        if update_golden:
            shutil.rmtree(gdir, ignore_errors=True)
        else:
            on_disk = sorted(str(p.relative_to(gdir)) for p in gdir.rglob("*") if p.is_file())
            assert on_disk == list(names), f"{stem}: build files differ from tests/golden/build/{stem}"
    for name in names:
        assert name in files, f"{stem}: {name} is no longer emitted"
        check_golden(gdir / name, files[name], update_golden)


def test_real_example_builds_twice_identically(tmp_path):
    ex = ROOT / "examples" / "pipeline_tiny.yaml"
    a, b = render_artifacts(compile_example(ex)), render_artifacts(compile_example(ex))
    assert a == b
    write_build(tmp_path / "a", a)
    write_build(tmp_path / "b", b)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_x113_says_what_the_deepspeed_and_native_scripts_do():
    """X113 (a continued-training stage planned as its own torchtitan job): deepspeed/launch.sh and native/launch.sh
    run the stages in order under `set -e`, so the refused stage stops them (the later stages start from its output);
    the warning must say so, not that they "run the other stages only"."""
    from test_build_fakes import make_compiled, make_run

    from llmc.compiler.plan import ParallelPlan
    from llmc.emit import render_artifacts
    from llmc.emit.deepspeed import DeepSpeedEmitter

    stages = [{"name": "base", "kind": "pretrain", "init_from": None},
              {"name": "mid", "kind": "midtrain", "init_from": "base",
               "layout": ParallelPlan(dp_shard=4, tp=2, micro_batch=2, grad_accum=2)}]
    run = make_run(stages=[{k: v for k, v in s.items() if k != "layout" and v is not None} for s in stages],
                   training={"backend": "deepspeed"})
    c = make_compiled(run, stages=stages)
    x113 = [d for d in DeepSpeedEmitter().diagnostics(c) if d.code == "X113"]
    assert len(x113) == 1
    msg = x113[0].message
    assert "other stages only" not in msg and "stop" in msg and "first of them" in msg, msg
    native = render_artifacts(c)["native/launch.sh"]
    assert "set -euo pipefail" in native and "--stage mid" in native  # it is started, refused, and stops the script
