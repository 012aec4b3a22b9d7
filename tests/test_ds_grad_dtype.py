"""DeepSpeed trains the numerics of the other backends: a bf16 ds_config llmc emits makes DeepSpeed 0.19.8 reduce
gradients in fp32 at every ZeRO stage and accumulate them in fp32 at ZeRO-1/2/3 (ZeRO-0 cannot: DeepSpeed refuses it,
and the build says so, X116), read from DeepSpeed's own engine and optimizer attributes after real micro-steps on CPU;
the memory model's DeepSpeed gradient bytes are the buffers DeepSpeed then allocates. On the CPU the DeepSpeed runner
trains a bf16 spec in fp32 as the native trainer does, and says so in its start line; its resumable checkpoints live
under ``training.checkpoint.folder`` and are pruned to ``keep_latest``, and a rerun resumes from them.

DeepSpeed runs in subprocesses (a 1-rank gloo group, DS_ACCELERATOR=cpu), as tests/test_deepspeed.py does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_build_fakes import make_compiled, make_run

from llmc.compiler.plan import ParallelPlan
from llmc.emit import build_diagnostics, render_artifacts
from llmc.emit.deepspeed import deepspeed_config

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ACCUM = 3

# For each config: llmc's tiny model under deepspeed.initialize (ZeRO-3 built under zero.Init, as ds_train does), ACCUM
# micro-steps of backward, then what DeepSpeed says it reduces and accumulates in and the dtypes / bytes of the
# gradient buffers it holds before the boundary's step; a config DeepSpeed refuses records its error.
PROBE = textwrap.dedent("""
    import json, logging, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed
    from deepspeed.utils import logger
    from llmc.runtime.ds_train import init_deepspeed_distributed, build_zero3_model
    from llmc.runtime.model import build_model
    from llmc.spec.model import Architecture
    logger.setLevel(logging.ERROR)
    init_deepspeed_distributed()
    cases = json.load(open(sys.argv[1]))
    out = {}
    for name, case in cases.items():
        cfg, arch = case["cfg"], Architecture(**case["arch"])
        zero = cfg["zero_optimization"]["stage"]
        try:
            model = build_zero3_model(arch, cfg, 0, 0) if zero == 3 else build_model(arch, seed=0)
            n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
            eng, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
            torch.manual_seed(0)
            for _ in range(cfg["gradient_accumulation_steps"]):
                x = torch.randint(0, arch.vocab_size, (cfg["train_micro_batch_size_per_gpu"], 16))
                eng.backward(eng(x).float().pow(2).mean())
                if not eng.is_gradient_accumulation_boundary():
                    eng.step()  # (not the boundary: no optimizer step, the gradients stay accumulated)
            o = eng.optimizer
            bufs = {}
            if hasattr(o, "fp32_groups_gradients_flat"):  # BF16_Optimizer
                bufs["fp32_groups_gradients_flat"] = o.fp32_groups_gradients_flat
            if getattr(o, "grad_partitions_flat_buffer", None) is not None:  # ZeRO-3
                bufs["grad_partitions_flat_buffer"] = [o.grad_partitions_flat_buffer]
            avg = getattr(o, "averaged_gradients", None)
            if isinstance(avg, dict) and avg and not hasattr(o, "grad_partitions_flat_buffer"):  # ZeRO-1/2
                bufs["averaged_gradients"] = [t for v in avg.values() for t in (v if isinstance(v, list) else [v])]
            lp = [p.grad for p in eng.module.parameters() if p.grad is not None]
            out[name] = {"ok": True, "optimizer": type(o).__name__, "n_params": n_params,
                         "communication": str(eng.communication_data_type),
                         "data_types": [str(d) for d in eng.get_data_types()],
                         "buffers": {k: sorted({str(t.dtype) for t in v}) for k, v in bufs.items()},
                         "buffer_bytes": {k: sum(t.numel() * t.element_size() for t in v) for k, v in bufs.items()},
                         "lp_grad_bytes": sum(g.numel() * g.element_size() for g in lp)}
        except Exception as e:
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
    print("RESULT " + json.dumps(out))
""")


def _probe(cases: dict[str, dict], tmp_path: Path) -> dict[str, dict]:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    port = str(29800 + os.getpid() % 150)
    r = subprocess.run([PY, "-c", PROBE, str(tmp_path / "cases.json"), port], env=ENV, capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line[7:])


def _compiled(zero: int, **run_over):
    """A bf16 GPU build pinned to ZeRO ``zero``: 8 data-parallel ranks, ACCUM micro-batches of 2 per step."""
    run = make_run(parallelism={"zero_stage": zero}, **run_over)
    return make_compiled(run, plan=ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=ACCUM, zero_stage=zero),
                         global_batch_seqs=16 * ACCUM)


def _one_rank(cfg: dict) -> dict:
    """The emitted config at world size 1 (as the reviewer's repro: train_batch_size = micro x accum), without
    llmc's header (ds_train drops it too)."""
    cfg = {k: v for k, v in cfg.items() if k != "_llmc"}
    cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    return cfg


def test_bf16_gradients_reduce_and_accumulate_in_fp32(tmp_path):
    from llmc.compiler.backends import get_backend
    from llmc.compiler.memory import backend_state_bytes

    compiled = {z: _compiled(z) for z in (0, 1, 2, 3)}
    arch = compiled[0].spec.model.model_dump(exclude_none=True)
    cases = {f"z{z}": {"cfg": _one_rank(deepspeed_config(c)[0]), "arch": arch} for z, c in compiled.items()}
    # what DeepSpeed does with an fp32 grad_accum_dtype at ZeRO-0 (the emitter leaves it out there)
    cases["z0_accum"] = {"cfg": {**cases["z0"]["cfg"], "data_types": {"grad_accum_dtype": "fp32"}}, "arch": arch}
    assert all(c["cfg"]["bf16"]["enabled"] for c in cases.values())
    res = _probe(cases, tmp_path)

    for z in (0, 1, 2, 3):
        r = res[f"z{z}"]
        assert r["ok"], (z, r)
        assert r["communication"] == "torch.float32", (z, r)  # every stage reduces in fp32
        assert r["data_types"] == ["torch.bfloat16", "torch.float32" if z else "torch.bfloat16"], (z, r)
    # ZeRO-1: BF16_Optimizer, an fp32 gradient of the whole model; ZeRO-2 fp32 partitions; ZeRO-3 an fp32 flat buffer
    assert res["z1"]["optimizer"] == "BF16_Optimizer"
    assert res["z1"]["buffers"] == {"fp32_groups_gradients_flat": ["torch.float32"]}
    assert res["z2"]["buffers"] == {"averaged_gradients": ["torch.float32"]}
    assert res["z3"]["buffers"]["grad_partitions_flat_buffer"] == ["torch.float32"]
    # ZeRO-0 cannot accumulate in fp32: DeepSpeed refuses it, and the build warns (X116) on a GPU
    assert not res["z0_accum"]["ok"] and "unsupported mix" in res["z0_accum"]["error"]
    assert "data_types" not in cases["z0"]["cfg"]
    assert [d.code for d in build_diagnostics(compiled[0]) if d.code == "X116"] == ["X116"]
    assert not [d for z in (1, 2, 3) for d in build_diagnostics(compiled[z]) if d.code == "X116"]

    # the memory model's DeepSpeed gradient bytes (one rank: nothing sharded) are what DeepSpeed holds
    P = res["z1"]["n_params"]
    be = get_backend("deepspeed")
    grads = {z: backend_state_bytes(P, be, zero_stage=z, shard=1)["grads"] for z in (1, 2, 3)}
    z1 = res["z1"]["buffer_bytes"]["fp32_groups_gradients_flat"] + res["z1"]["lp_grad_bytes"]
    assert grads[1] == pytest.approx(z1, rel=0.01)  # fp32 buffer (padded) + the bf16 .grad
    assert grads[2] == pytest.approx(res["z2"]["buffer_bytes"]["averaged_gradients"], rel=0.01)
    assert grads[3] == pytest.approx(res["z3"]["buffer_bytes"]["grad_partitions_flat_buffer"], rel=0.01)


def test_fp32_and_cpu_builds():
    """fp32 runs get no dtype keys (their gradients are fp32 already); a CPU build does not warn X116 (the runner
    trains fp32 there)."""
    cfg, _ = deepspeed_config(_compiled(2, training={"precision": "fp32"}))
    assert "communication_data_type" not in cfg and "data_types" not in cfg
    cpu = _compiled(0, hardware={"gpu": "cpu", "count": 8})
    assert deepspeed_config(cpu)[0]["communication_data_type"] == "fp32"
    assert not [d for d in build_diagnostics(cpu) if d.code == "X116"]


def test_runtime_config_trains_fp32_on_cpu():
    from llmc.runtime.ds_train import runtime_config
    from llmc.runtime.train import precision_note

    cfg = deepspeed_config(_compiled(2))[0]
    cpu = runtime_config(cfg, cpu=True)
    assert cpu["bf16"] == {"enabled": False} and cfg["bf16"] == {"enabled": True}  # a copy, the file unchanged
    assert runtime_config(cfg, cpu=True, cpu_bf16=True) is cfg and runtime_config(cfg, cpu=False) is cfg
    assert precision_note("bf16", "fp32", True).startswith("precision fp32 (the spec's bf16 trains in fp32 on the CPU")
    assert precision_note("bf16", "bf16", False) == "precision bf16"


def _tiny_cpu_build(b: Path) -> Path:
    run = make_run(
        name="tinyck",
        model={"name": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
               "vocab_size": 512, "max_seq_len": 64},
        data={"seq_len": 32, "tokens": 1e5, "sources": [{"name": "python-docs", "format": "builtin"}],
              "tokenizer": {"train": True, "vocab_size": 512}},
        hardware={"gpu": "cpu", "count": 1},
        training={"precision": "bf16", "optimizer": {"lr": 3e-3}, "log_every": 1, "schedule": {"warmup_steps": 1},
                  "checkpoint": {"folder": "myck/sub", "keep_latest": 1, "interval_steps": 2}},
        parallelism={"zero_stage": 1},
    )
    c = make_compiled(run, plan=ParallelPlan(dp_shard=1, micro_batch=2, grad_accum=2, zero_stage=1),
                      global_batch_seqs=4, steps=6, warmup=1)
    files = render_artifacts(c)
    for name in ("plan.lock.json", "deepspeed/ds_config.json"):
        (b / name).parent.mkdir(parents=True, exist_ok=True)
        (b / name).write_text(files[name])
    return b


def _ds_train(b: Path, steps: int) -> subprocess.CompletedProcess:
    port = str(29950 + (os.getpid() + steps) % 40)
    argv = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{port}", "-m", "llmc.runtime.ds_train", "--lock", str(b / "plan.lock.json"),
            "--ds-config", str(b / "deepspeed" / "ds_config.json"), "--out", str(b / "run" / "pretrain"),
            "--assets", str(b), "--steps", str(steps)]
    return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=900, cwd=str(ROOT))


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


@pytest.mark.slow
def test_cpu_run_is_fp32_and_checkpoints_in_the_spec_folder(tmp_path):
    """A bf16 spec on the CPU: the DeepSpeed runner says it trains fp32; its resumable checkpoints (every 2 steps) go
    to <out>/myck/sub/deepspeed, one kept (keep_latest 1); a rerun resumes from there and ends with the final llmc
    checkpoint in myck/sub; nothing in <out>/ds_checkpoints."""
    b = _tiny_cpu_build(tmp_path / "b")
    out = b / "run" / "pretrain"
    r = _ds_train(b, 4)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    start = next(ln for ln in r.stdout.splitlines() if "DeepSpeed ZeRO-1" in ln)
    assert "precision fp32 (the spec's bf16 trains in fp32 on the CPU" in start, start
    ds = out / "myck" / "sub" / "deepspeed"
    assert _steps(ds) == ["step-00000004"] and (ds / "latest").read_text().strip() == "step-00000004"
    assert not (out / "ds_checkpoints").exists()
    r = _ds_train(b, 6)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(rf"resumed from {re.escape(str(ds / 'step-00000004'))}\S* at step 4", r.stdout), r.stdout[-2000:]
    assert _steps(ds) == ["step-00000006"]
    assert _steps(out / "myck" / "sub") == ["deepspeed", "step-00000006"]
    done = json.loads((out / "DONE.json").read_text())
    assert done["status"] == "done" and done["checkpoint"] == "myck/sub/step-00000006"
    assert not (out / "ds_checkpoints").exists()
