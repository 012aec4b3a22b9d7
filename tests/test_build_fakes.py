"""Hand-built ``Compiled`` objects for the build / lockfile / launch / DeepSpeed tests.

These do not depend on the compiler's search: every number is written here, so emitter tests stay
independent of the planner. Integration tests use ``compile_example`` (the real ``compile_spec``).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from llmc.compiler.hardware import get_gpu
from llmc.compiler.plan import ParallelPlan
from llmc.compiler.result import (
    Compiled,
    ComputeNumbers,
    ContextPlan,
    CostNumbers,
    Hyper,
    MemoryNumbers,
    ModelInMemory,
    ModelNumbers,
    ServingPlan,
    StageMemoryPlan,
    StagePlan,
    TimeNumbers,
)
from llmc.spec.model import Architecture
from llmc.spec.schema import RunSpec
from llmc.weight_init import init_scheme

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

TINY_ARCH = dict(name="tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
                 max_seq_len=256)


def make_run(**over) -> RunSpec:
    d = {
        "name": "fake",
        "model": TINY_ARCH,
        "data": {"seq_len": 64, "tokens": 1e6, "sources": [{"name": "python-docs", "format": "builtin"}]},
        "hardware": {"gpu": "h100-sxm", "count": 8},
        "training": {"precision": "bf16", "optimizer": {"lr": 1e-3}},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return RunSpec.model_validate(d)


def make_compiled(run: RunSpec | None = None, plan: ParallelPlan | None = None, *, global_batch_seqs: int = 32,
                  steps: int = 100, warmup: int = 10, schedule: str = "cosine", stages: list[dict] | None = None,
                  serving: list[dict] | None = None, mem_bytes: int = 10 * 2**30, step_s: float = 1.0,
                  mfu: float = 0.4) -> Compiled:
    run = run or make_run()
    plan = plan or ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=2)
    gpu = get_gpu(run.hardware.gpu)
    if run.hardware.gpus_per_node:  # as the compiler does: the spec's override is part of the GPU row
        gpu = replace(gpu, gpus_per_node=run.hardware.gpus_per_node)
    sha = hashlib.sha256(run.model_dump_json().encode()).hexdigest()
    lr = run.training.optimizer.lr or 3e-4
    seq = run.data.seq_len
    from llmc.lr_schedule import lr_shape

    shape = lr_shape(lr=lr, min_lr=lr * 0.1, steps=steps, warmup_steps=warmup, schedule=schedule,
                     decay_fraction=run.training.schedule.decay_fraction)
    # every stage entry carries its resolved numbers, as the compiler writes them (here: pre-training's)
    resolved = {"seq_len": seq, "steps": steps, "lr": lr, "min_lr": lr * 0.1, "warmup_steps": warmup,
                "schedule": schedule, "decay_fraction": run.training.schedule.decay_fraction,
                "decay_steps": shape.decay_steps, "last_lr": shape.last_lr, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                "global_batch_seqs": global_batch_seqs, "global_batch_tokens": global_batch_seqs * seq,
                "checkpoint_interval": 50, "hyper": {}, "lora": None, "long_context": None}
    stages = [fake_stage(**{**resolved, **s}, order=i)
              for i, s in enumerate(stages or [{"name": "pretrain", "kind": "pretrain", "init_from": None}])]
    return Compiled(
        spec_path="fake.yaml", spec_sha256=sha, spec=run, gpu=gpu,
        model=ModelNumbers(params_total=200_000, params_active=200_000, params_embedding=65_536,
                           breakdown={"embed/tok": 32_768}, kv_bytes_per_token=1024, init=init_scheme(run.model)),
        compute=ComputeNumbers(convention="6ND", flops_per_token=1.2e6, training_flops=1.2e12, tokens=run.data.tokens,
                               tokens_per_param=5.0, chinchilla_tokens=4e6, optimal_params=1e5, optimal_tokens=2e6),
        hyper=Hyper(lr=lr, min_lr=lr * 0.1, warmup_steps=warmup, steps=steps,
                    global_batch_tokens=global_batch_seqs * seq, global_batch_seqs=global_batch_seqs, seq_len=seq,
                    schedule=schedule, checkpoint_interval=50, checkpoint_async=False,
                    decay_steps=shape.decay_steps, last_lr=shape.last_lr),
        plan=plan,
        memory=MemoryNumbers(per_gpu_bytes=mem_bytes, capacity_bytes=80 * 10**9, breakdown={"weights": mem_bytes}),
        time=TimeNumbers(step_seconds=step_s, mfu=mfu, days=steps * step_s / 86400, steps=steps,
                         tokens_per_second=global_batch_seqs * seq / step_s),
        cost=CostNumbers(gpu_hours=steps * step_s * 8 / 3600, usd=steps * step_s * 8 / 3600 * 2.5,
                         usd_per_gpu_hour=2.5),
        reasons=["fake"], alternatives=[], rejected=[], diagnostics=[],
        stages=stages, serving=[ServingPlan(**d) for d in serving or []],
    )


def fake_stage(**kw) -> StagePlan:
    """A StagePlan with every field the emitters and runtime read; the rest get neutral values."""
    base = dict(init_from=None, init_hf=None, order=0, tokens=None, defaults=[], n_models=1, params_total=200_000,
                trainable_params=200_000, trainable_fraction=1.0, rollout=None, notes=[],
                models_in_memory=[ModelInMemory(role="policy", trainable=True, weights="bf16")],
                memory=StageMemoryPlan(per_gpu_bytes=2**30, capacity_bytes=80 * 10**9, fits=True, shard_degree=8,
                                       cp=1, activation_checkpointing="none", source="fake"),
                context=ContextPlan(max_context=256, rope_theta=10_000.0, rope_scaling=None))
    return StagePlan(**{**base, **kw})


def compile_example(path: Path):
    """Real load + compile of an example spec."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.facts import gather_facts
    from llmc.spec.load import load_spec

    run, lines = load_spec(path)
    return compile_spec(run, spec_path=str(path.relative_to(ROOT)), yaml_lines=lines, spec_bytes=path.read_bytes(),
                        facts=gather_facts(run, path.parent))


def compile_text(text: str, file: str = "s.yaml"):
    """Real load + compile of a spec given as YAML text (diagnostics located in ``file``)."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    run, lines = loads_spec(text, file=file)
    return compile_spec(run, file, lines, spec_bytes=b"")


def lock_for(spec: dict | RunSpec, *, plan: dict | None = None, hyper: dict | None = None,
             stages: list[dict] | None = None, spec_path: str = "spec.yaml") -> dict:
    """The lock ``llmc build`` would write for ``spec`` (the real compiler), with optional overrides: ``plan``
    and ``hyper`` keys (also applied to the pretrain stage entry, which mirrors them) and stage entries
    merged by name, for runtime tests that need numbers no compile would produce."""
    from llmc.compiler.compile import compile_spec
    from llmc.emit.lock import lock_dict

    run = spec if isinstance(spec, RunSpec) else RunSpec.model_validate(spec)
    lock = lock_dict(compile_spec(run, spec_path=spec_path, spec_bytes=run.model_dump_json().encode()))
    pre = [e for e in lock["stages"] if e["kind"] == "pretrain"]
    if plan and lock["plan"] is not None:  # a post-training-only pipeline has no searched layout
        lock["plan"].update(plan)
        for e in pre:
            e.update({k: v for k, v in plan.items() if k in ("micro_batch", "grad_accum")})
    if hyper:
        lock["hyper"].update(hyper)
        for e in pre:
            e.update({k: v for k, v in hyper.items() if k in e})
    by_name = {e["name"]: e for e in lock["stages"]}
    for over in stages or []:
        by_name[over["name"]].update(over)
    return lock


__all__ = ["EXAMPLES", "ROOT", "TINY_ARCH", "Architecture", "compile_example", "fake_stage", "lock_for", "make_compiled", "make_run"]
