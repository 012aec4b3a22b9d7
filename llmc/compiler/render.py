"""``llmc build``: render every artifact of a compiled run as ``{relative path: text}``.

Pure: reads templates, writes nothing (the CLI writes the tree atomically). Deterministic: no
timestamps, JSON with sorted keys and a trailing newline, every file opens with a header naming
llmc's version, the target library versions and the spec sha256.

Layout::

    plan.lock.json                  the whole Compiled.to_json() (+ a "_llmc" header key)
    README.md                       how to run this build
    native/launch.sh                llmc's own runtime, torchrun single node, every stage in order
    launch/torchrun_single_node.sh  torchrun --standalone (BACKEND=native|torchtitan)
    launch/torchrun_multi_node.sh   NNODES / NODE_RANK / MASTER_ADDR, rendezvous c10d
    launch/slurm.sbatch             srun torchrun, rendezvous on the first host
    deepspeed/ds_config.json        DeepSpeed 0.19.8 config (DP / ZeRO)
    deepspeed/launch.sh             the ``deepspeed`` launcher running llmc.runtime.ds_train
    torchtitan/...                  from llmc.compiler.render_torchtitan (the torchtitan job module)
    serving/vllm.yaml               ``vllm serve --config serving/vllm.yaml``
    serving/sglang.yaml             ``python -m sglang.launch_server --config serving/sglang.yaml``

DeepSpeed policy (documented choice): llmc's DeepSpeed runner (``llmc.runtime.ds_train``) is
data-parallel + ZeRO only. When the plan uses tp/pp/cp/ep > 1 the DeepSpeed artifacts are still
emitted with every GPU as a data-parallel rank (ZeRO-3 unless a stage is pinned) and a warning
X103 says so; if the global batch cannot be split over that many ranks, the DeepSpeed artifacts
are left out with warning X104. A pinned ``zero_stage: 3`` with pipeline parallelism is an error
(X102): DeepSpeed's pipeline engine does not support ZeRO-3. Warnings are listed in README.md.

Build diagnostics (raised as SpecError before anything is written, or listed in README.md):
    X100 error    no plan and no stages: nothing to build
    X101 error    DeepSpeed batch identity broken (micro x accum x dp != global batch)
    X102 error    zero_stage 3 pinned together with pipeline parallelism
    X103 warning  plan uses tp/pp/cp/ep; the DeepSpeed runner folds every GPU into data parallelism
    X104 warning  global batch not divisible by the DeepSpeed data-parallel size: deepspeed/ omitted
    X105 error    ds_config top-level key outside the allow-list (an llmc bug, never a user error)
    X106 warning  fp8 training: the DeepSpeed runner trains in bf16
    X108 error    offload_optimizer with ZeRO stage 0
    V001 error    a serving target does not fit (normally reported by the compiler already)
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from llmc.compiler.plan import ParallelPlan
from llmc.diagnostics import Diagnostic, SpecError, errors, sort_diagnostics

# --------------------------------------------------------------------------------------- DeepSpeed

# Top-level ds_config keys llmc may emit. DeepSpeed silently ignores unknown top-level keys (a typo
# such as "gradient_clipin" is accepted), so the emitter checks its own output against this list.
# Every entry except the header key is a key deepspeed/runtime/constants.py defines (tested).
DS_HEADER_KEY = "_llmc"
DS_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "steps_per_print",
    "wall_clock_breakdown",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
    "zero_optimization",
    "zero_allow_untested_optimizer",
})
_ALLOWED = DS_TOP_LEVEL_KEYS | {DS_HEADER_KEY}

# What `llmc launch` / the runtime write into a build directory (prepare_assets: assets/, data/,
# cache/; stage outputs: run/; torchtitan dumps: outputs/); the build itself is meant to be committed.
BUILD_GITIGNORE = (
    "# llmc build: generated inputs and run outputs (the build files themselves are meant to be committed)\n"
    "/assets/\n/cache/\n/data/\n/outputs/\n/run/\n"
)

# ZeRO bucket sizes: the Hugging Face Trainer's DeepSpeed integration fills "auto" with
# reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2,
# stage3_param_persistence_threshold = 10 hidden (transformers/integrations/deepspeed.py).
ALLGATHER_BUCKET = 500_000_000  # DeepSpeed's default allgather_bucket_size (5e8 elements)
STAGE3_MAX_LIVE = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters / max_reuse_distance

# Stage kinds the DeepSpeed runner trains (next-token loss); the others run on llmc's native runtime.
DS_STAGE_KINDS = ("pretrain", "midtrain", "long_context")

GEN_NOTE = "generated file, do not edit: change the spec and run `llmc build` again"


def _diag(code: str, severity: str, path: str, message: str, hint: str = "") -> Diagnostic:
    return Diagnostic(code=code, severity=severity, path=path, message=message, hint=hint)  # type: ignore[arg-type]


def _world(compiled) -> int:
    return int(compiled.spec.hardware.count)


def _gpus_per_node(compiled) -> int:
    hw = compiled.spec.hardware
    gpn = hw.gpus_per_node or getattr(compiled.gpu, "gpus_per_node", None) or 8
    return max(1, min(int(gpn), int(hw.count)))


def _nnodes(compiled) -> int:
    gpn = _gpus_per_node(compiled)
    return max(1, -(-_world(compiled) // gpn))


def _is_cpu(compiled) -> bool:
    return str(compiled.spec.hardware.gpu).lower() == "cpu"


def _ds_plan(compiled) -> ParallelPlan | None:
    """The plan DeepSpeed runs: the compiled plan, or -- for a pipeline without a pre-training plan
    (stages from a base model) -- every GPU a ZeRO data-parallel rank with micro-batch 1."""
    if compiled.plan is not None:
        return compiled.plan
    world, gbs = _world(compiled), int(compiled.hyper.global_batch_seqs)
    if gbs % world:
        return None
    return ParallelPlan(dp_shard=world, micro_batch=1, grad_accum=gbs // world)


def zero_stage_for(compiled) -> int:
    """Pinned ``parallelism.zero_stage``, else 3 when the plan shards (dp_shard > 1 or the DS runner
    folds tp/pp into data parallelism), else 0 (pure replicas)."""
    pinned = compiled.spec.parallelism.zero_stage
    if pinned is not None:
        return int(pinned)
    p = _ds_plan(compiled)
    if p is None:
        return 3
    if p.dp_shard > 1 or p.tp > 1 or p.pp > 1 or p.cp > 1:
        return 3
    return 0


def deepspeed_config(compiled) -> tuple[dict | None, list[Diagnostic]]:
    """The ds_config for DeepSpeed 0.19.8 and the build diagnostics about it (X1xx).

    Returns (None, diags) when no DeepSpeed artifacts can be emitted for this plan.
    """
    spec, plan, hyper = compiled.spec, _ds_plan(compiled), compiled.hyper
    diags: list[Diagnostic] = []
    par = spec.parallelism
    world = _world(compiled)
    if plan is None:
        diags.append(_diag("X104", "warning", "training.global_batch_tokens",
                           f"global batch of {hyper.global_batch_seqs} sequences cannot be split over {world} "
                           "data-parallel ranks; deepspeed/ artifacts are not emitted",
                           "use the native backend, or a global batch divisible by the GPU count"))
        return None, diags
    folded = plan.tp > 1 or plan.pp > 1 or plan.cp > 1 or plan.ep > 1
    stage = zero_stage_for(compiled)

    if par.zero_stage == 3 and ((par.pp or 1) > 1 or plan.pp > 1):
        diags.append(_diag("X102", "error", "parallelism.zero_stage",
                           f"zero_stage 3 with pipeline parallelism (pp={max(par.pp or 1, plan.pp)}) is not supported: "
                           "DeepSpeed's pipeline engine only works with ZeRO stage 0 or 1",
                           "pin zero_stage 1, or pp: 1"))
    if par.offload_optimizer and stage == 0:
        diags.append(_diag("X108", "error", "parallelism.offload_optimizer",
                           "offload_optimizer needs ZeRO stage >= 1 (zero_stage is 0)",
                           "pin zero_stage 1, 2 or 3, or drop offload_optimizer"))

    # batch identity: train_batch_size = micro x accum x dp
    gbs = int(hyper.global_batch_seqs)
    if not folded:
        dp = plan.dp
        micro, accum = plan.micro_batch, plan.grad_accum
        if micro * accum * dp != gbs:
            diags.append(_diag("X101", "error", "training.global_batch_tokens",
                               f"batch identity broken: micro_batch {micro} x grad_accum {accum} x dp {dp} = "
                               f"{micro * accum * dp} != global batch {gbs} sequences",
                               "pin parallelism.micro_batch to a divisor of the global batch per rank"))
            return None, diags
    else:
        dp = world
        diags.append(_diag("X103", "warning", "parallelism",
                           f"the plan uses tp={plan.tp} pp={plan.pp} cp={plan.cp} ep={plan.ep}; llmc's DeepSpeed "
                           f"runner is data-parallel/ZeRO only, so deepspeed/ runs all {world} GPUs as ZeRO-{stage} "
                           "data-parallel ranks (memory and speed differ from the plan)",
                           "use the torchtitan backend for this layout"))
        if gbs % dp != 0:
            diags.append(_diag("X104", "warning", "training.global_batch_tokens",
                               f"global batch of {gbs} sequences cannot be split over {dp} data-parallel ranks; "
                               "deepspeed/ artifacts are not emitted",
                               "use the torchtitan or native backend, or a global batch divisible by the GPU count"))
            return None, diags
        per_rank = gbs // dp
        micro = max(m for m in range(1, min(plan.micro_batch, per_rank) + 1) if per_rank % m == 0)
        accum = per_rank // micro

    if spec.training.precision == "fp8":
        diags.append(_diag("X106", "warning", "training.precision",
                           "the DeepSpeed runner trains in bf16 (fp8 matmuls are torchtitan-only)"))

    d = spec.model.d_model
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=d * d)
    if stage in (1, 2):
        zero.update(allgather_partitions=True, allgather_bucket_size=ALLGATHER_BUCKET, reduce_scatter=True)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=(9 * d * d) // 10, stage3_param_persistence_threshold=10 * d,
                    stage3_max_live_parameters=STAGE3_MAX_LIVE, stage3_max_reuse_distance=STAGE3_MAX_LIVE,
                    stage3_gather_16bit_weights_on_model_save=True)
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}

    opt = spec.training.optimizer
    opt_params: dict[str, Any] = {"lr": hyper.lr, "betas": list(opt.betas), "eps": opt.eps,
                                  "weight_decay": opt.weight_decay}
    if not par.offload_optimizer:
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam: no JIT build. With optimizer offload we
        # keep DeepSpeedCPUAdam (the point of ZeRO-Offload; it JIT-builds cpu_adam once).
        opt_params["torch_adam"] = True

    sched = _ds_scheduler(compiled)
    cfg: dict[str, Any] = {
        DS_HEADER_KEY: _json_header(compiled),
        "train_batch_size": micro * accum * dp,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(spec.training.grad_clip or 0.0),
        "bf16": {"enabled": spec.training.precision in ("bf16", "fp8")},
        "optimizer": {"type": "AdamW", "params": opt_params},
        "zero_optimization": zero,
        "steps_per_print": int(spec.training.log_every),
        "wall_clock_breakdown": False,
    }
    if sched is not None:
        cfg["scheduler"] = sched
    unknown = sorted(set(cfg) - _ALLOWED)
    if unknown:  # an llmc bug, not a user error; still reported as a diagnostic
        diags.append(_diag("X105", "error", "", f"ds_config has keys DeepSpeed does not read: {unknown}"))
    if cfg["train_batch_size"] != gbs:
        diags.append(_diag("X101", "error", "training.global_batch_tokens",
                           f"ds_config train_batch_size {cfg['train_batch_size']} != global batch {gbs} sequences"))
    return cfg, diags


def _ds_scheduler(compiled) -> dict | None:
    """DeepSpeed scheduler matching llmc's schedule, or None (ds_train then uses llmc's own LambdaLR).

    cosine -> WarmupCosineLR (linear warmup from 0, cosine to min_lr_ratio: exact);
    constant -> WarmupLR; linear -> WarmupDecayLR only when min_lr_ratio == 0 (it decays to 0);
    wsd and linear-to-a-floor have no DeepSpeed equivalent -> client scheduler in ds_train.
    """
    h = compiled.hyper
    sch = compiled.spec.training.schedule
    warm = max(1, int(h.warmup_steps))  # DeepSpeed requires a positive integer
    total = max(int(h.steps), warm)
    if h.schedule == "cosine":
        return {"type": "WarmupCosineLR", "params": {"total_num_steps": total, "warmup_num_steps": warm,
                                                     "warmup_min_ratio": 0.0, "cos_min_ratio": sch.min_lr_ratio,
                                                     "warmup_type": "linear"}}
    if h.schedule == "constant":
        return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": h.lr,
                                               "warmup_num_steps": warm, "warmup_type": "linear"}}
    if h.schedule == "linear" and sch.min_lr_ratio == 0:
        return {"type": "WarmupDecayLR", "params": {"total_num_steps": total, "warmup_min_lr": 0.0,
                                                    "warmup_max_lr": h.lr, "warmup_num_steps": warm,
                                                    "warmup_type": "linear"}}
    return None


# ------------------------------------------------------------------------------------------ headers


def header_fields(compiled) -> dict[str, Any]:
    import llmc

    return {"generated_by": f"llmc {llmc.__version__}", "llmc_version": llmc.__version__,
            "target_versions": dict(sorted(llmc.TARGET_VERSIONS.items())), "spec_sha256": compiled.spec_sha256,
            "note": GEN_NOTE}


def _json_header(compiled) -> dict[str, Any]:
    return header_fields(compiled)


def header_lines(compiled) -> list[str]:
    h = header_fields(compiled)
    targets = ", ".join(f"{k} {v}" for k, v in h["target_versions"].items())
    return [f"{h['generated_by']}: {GEN_NOTE}", f"targets: {targets}", f"spec sha256: {h['spec_sha256']}"]


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------- templates


def _env():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(loader=PackageLoader("llmc", "templates"), undefined=StrictUndefined, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)


def stage_list(compiled) -> list[dict]:
    """Stages in execution order (Compiled.stages order); one ``pretrain`` stage when there are none."""
    out = []
    for s in compiled.stages or [{"name": "pretrain", "kind": "pretrain", "init_from": None}]:
        kind = str(s.get("kind", "pretrain"))
        out.append({"name": str(s["name"]), "kind": kind, "init_from": s.get("init_from"),
                    "ds": kind in DS_STAGE_KINDS})
    return out


def _serving_files(compiled, env, ctx) -> dict[str, str]:
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    for p in compiled.serving:
        eng = p["engine"]
        counts[eng] = counts.get(eng, 0) + 1
        name = f"serving/{eng}.yaml" if counts[eng] == 1 else f"serving/{eng}-{counts[eng]}.yaml"
        model_dir = f"run/{p['stage']}/hf"
        served = f"{compiled.spec.name}-{p['stage']}"
        items: list[tuple[str, str]] = []
        if eng == "vllm":
            items += [("model", json.dumps(model_dir)), ("served-model-name", json.dumps(served)),
                      ("dtype", "bfloat16"),
                      ("tensor-parallel-size", str(p["tensor_parallel_size"])),
                      ("pipeline-parallel-size", str(p["pipeline_parallel_size"])),
                      ("max-model-len", str(p["max_model_len"])),
                      ("max-num-seqs", str(p["max_num_seqs"])),
                      ("gpu-memory-utilization", repr(float(p["gpu_memory_utilization"]))),
                      ("kv-cache-dtype", p["kv_cache_dtype"])]
            if p["quantization"]:
                items.append(("quantization", p["quantization"]))
            # vLLM's --enable-prefix-caching is a BooleanOptionalAction; a YAML `true` becomes the flag
            items.append(("enable-prefix-caching" if p["prefix_caching"] else "no-enable-prefix-caching", "true"))
            if p.get("nodes", 1) > 1:  # pipeline stages on several nodes: vLLM runs them on a Ray cluster
                items.append(("distributed-executor-backend", "ray"))
            items += [("host", json.dumps("0.0.0.0")), ("port", "8000")]
            cmd = f"vllm serve --config {name}"
            if p.get("nodes", 1) > 1:
                cmd = f"`ray start` on all {p['nodes']} nodes, then on the head node: {cmd}"
        else:
            # SGLang's mem_fraction_static covers weights + KV pool only (activations live outside it),
            # so it is vLLM's utilisation minus llmc's workspace/activation reserve.
            mem_frac = round(float(p["gpu_memory_utilization"]) - p["reserve_gib_per_gpu"] / p["capacity_gib"], 3)
            kv = "fp8_e4m3" if p["kv_cache_dtype"] == "fp8" else "auto"
            items += [("model-path", json.dumps(model_dir)), ("served-model-name", json.dumps(served)),
                      ("dtype", "bfloat16"),
                      ("tp-size", str(p["tensor_parallel_size"])),
                      ("pp-size", str(p["pipeline_parallel_size"])),
                      ("context-length", str(p["max_model_len"])),
                      ("max-running-requests", str(p["max_num_seqs"])),
                      ("mem-fraction-static", repr(mem_frac)),
                      ("kv-cache-dtype", kv)]
            if p["quantization"]:
                items.append(("quantization", p["quantization"]))
            if not p["prefix_caching"]:
                items.append(("disable-radix-cache", "true"))
            if p.get("nodes", 1) > 1:
                items.append(("nnodes", str(p["nodes"])))
            items += [("host", json.dumps("0.0.0.0")), ("port", "30000")]
            cmd = f"python -m sglang.launch_server --config {name}"
            if p.get("nodes", 1) > 1:
                cmd += (f" --node-rank <0..{p['nodes'] - 1}> --dist-init-addr <first node>:50000"
                        f" (on each of the {p['nodes']} nodes)")
        notes = [
            f"target serving[{p['index']}]: {p['gpus']} x {p['gpu']} (tp {p['tensor_parallel_size']}, "
            f"pp {p['pipeline_parallel_size']}), stage {p['stage']!r}",
            f"weights {p['weights_gib']} GiB total, {p['weights_gib_per_gpu']} GiB per GPU; "
            f"workspace reserve {p['reserve_gib_per_gpu']} GiB per GPU",
            f"KV cache: {p['kv_bytes_per_token']} B/token, {p['kv_gib_per_seq']} GiB per sequence per GPU at "
            f"{p['max_model_len']} tokens; needs {p['kv_gib_needed']} GiB for {p['concurrency']} sequences, "
            f"budget {p['kv_budget_gib']} GiB per GPU ({p['max_seqs_that_fit']} sequences fit)",
            f"model: export the {p['stage']!r} checkpoint to Hugging Face format in {model_dir} first",
            f"run from the build directory: {cmd}",
        ]
        files[name] = env.get_template("serving/engine.yaml.j2").render(**ctx, notes=notes, items=items)
    return files


def build_diagnostics(compiled) -> tuple[dict | None, list[Diagnostic]]:
    """All build-time checks; returns the ds_config (or None) and the diagnostics."""
    diags: list[Diagnostic] = []
    ds_cfg = None
    if compiled.plan is None and not compiled.stages:
        return None, [_diag("X100", "error", "", "no feasible parallelism plan: nothing to build",
                            "run `llmc plan` to see why every candidate was rejected")]
    # (a pipeline of stages from a base model has no pre-training plan; its stages carry their own)
    if any(s["kind"] in DS_STAGE_KINDS for s in stage_list(compiled)):
        ds_cfg, ds_diags = deepspeed_config(compiled)
        diags += ds_diags
    for p in compiled.serving:
        if not p.get("fits", True):
            diags.append(_diag("V001", "error", f"serving[{p.get('index', 0)}]",
                               f"serving target {p.get('engine')} does not fit (see `llmc plan`)"))
    return ds_cfg, diags


def build_warnings(compiled) -> list[Diagnostic]:
    """The non-error build diagnostics (also listed in README.md), for the CLI to print."""
    _, diags = build_diagnostics(compiled)
    return sort_diagnostics([d if d.file else replace(d, file=compiled.spec_path)
                             for d in diags if d.severity != "error"])


def render_artifacts(compiled) -> dict[str, str]:
    """Every build artifact as {relative path: text}; raises SpecError on build errors."""
    from llmc.compiler.lockfile import lock_text

    if not compiled.serving and compiled.spec.serving:
        # a Compiled without serving plans (built by hand / an older compiler): plan them here
        from llmc.compiler.serving import plan_serving

        plans, sdiags = plan_serving(compiled.spec)
        if errors(sdiags):
            raise SpecError(sort_diagnostics(sdiags))
        compiled = replace(compiled, serving=plans)

    ds_cfg, diags = build_diagnostics(compiled)
    diags = [d if d.file else replace(d, file=compiled.spec_path) for d in diags]
    errs = errors(diags)
    if errs:
        raise SpecError(sort_diagnostics(errs))
    warnings = sort_diagnostics([d for d in diags if d.severity != "error"])

    env = _env()
    spec, plan = compiled.spec, compiled.plan
    gpn = _gpus_per_node(compiled)
    nnodes = _nnodes(compiled)
    stages = stage_list(compiled)
    files: dict[str, str] = {}

    titan: dict[str, str] = {}
    try:
        from llmc.compiler.render_torchtitan import render_torchtitan
    except ImportError:  # the torchtitan renderer has not landed yet
        render_torchtitan = None
    if render_torchtitan is not None and plan is not None:
        titan = render_torchtitan(compiled)
    titan_modules = sorted(k for k in titan if k.startswith("torchtitan/") and k.endswith(".py"))
    titan_module = titan_modules[0].rsplit("/", 1)[1][:-3] if titan_modules else ""

    ds_stages = [s for s in stages if s["kind"] in DS_STAGE_KINDS]
    ctx: dict[str, Any] = {
        "header": header_lines(compiled),
        "name": spec.name,
        "spec_path": compiled.spec_path,
        "spec_sha256": compiled.spec_sha256,
        "gpu": spec.hardware.gpu,
        "world": _world(compiled),
        "gpus_per_node": gpn,
        "nnodes": nnodes,
        "last_node_rank": nnodes - 1,
        "multi_node": nnodes > 1,
        "is_cpu": _is_cpu(compiled),
        "stages": stages,
        "stage_names": " ".join(s["name"] for s in stages),
        "titan_module": titan_module,
        "titan_config": "job",
        "has_titan": bool(titan_module),
        "has_ds": ds_cfg is not None,
        "ds_stages": ds_stages,
        "ds_native_stages": [s for s in stages if s["kind"] not in DS_STAGE_KINDS],
        "zero_stage": (ds_cfg or {}).get("zero_optimization", {}).get("stage", 0),

        "warnings": [d.render() for d in warnings],
        "job_name": spec.name,
        "rdzv_port": 29500,
        "serving": [],
    }
    files["plan.lock.json"] = lock_text(compiled)
    files["native/launch.sh"] = env.get_template("launch/native_launch.sh.j2").render(**ctx)
    files["launch/torchrun_single_node.sh"] = env.get_template("launch/torchrun_single_node.sh.j2").render(**ctx)
    files["launch/torchrun_multi_node.sh"] = env.get_template("launch/torchrun_multi_node.sh.j2").render(**ctx)
    files["launch/slurm.sbatch"] = env.get_template("slurm/slurm.sbatch.j2").render(**ctx)
    if ds_cfg is not None:
        files["deepspeed/ds_config.json"] = dump_json(ds_cfg)
        files["deepspeed/launch.sh"] = env.get_template("deepspeed/launch.sh.j2").render(**ctx)
    serving = _serving_files(compiled, env, ctx)
    files.update(serving)
    files.update(titan)
    ctx["serving"] = [{"file": k, "engine": k.split("/")[1].split(".")[0].split("-")[0]} for k in sorted(serving)]
    # `llmc launch` writes its inputs and outputs next to the committed files; keep them out of git.
    files[".gitignore"] = "".join(f"# {ln}\n" for ln in header_lines(compiled)) + BUILD_GITIGNORE
    ctx["files"] = sorted([*files, "README.md"])
    ctx["numbers"] = _readme_numbers(compiled)
    files["README.md"] = env.get_template("launch/README.md.j2").render(**ctx)
    return dict(sorted(files.items()))


def _readme_numbers(compiled) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    m, h = compiled.model, compiled.hyper
    out.append(("parameters", f"{m.params_total:,} ({m.params_active:,} active)"))
    out.append(("tokens", f"{compiled.compute.tokens:.4g}"))
    p = compiled.plan
    if p is None:
        out.append(("plan", "no pre-training plan: the stages start from the base model (per-stage plans in plan.lock.json)"))
        return out
    out.append(("global batch", f"{h.global_batch_seqs} sequences x {h.seq_len} tokens, {h.steps} steps"))
    out.append(("plan", f"dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x tp {p.tp} x pp {p.pp} x cp {p.cp}"
                        f" (ep {p.ep}), micro-batch {p.micro_batch}, grad-accum {p.grad_accum}, "
                        f"AC {p.activation_checkpointing}"))
    if compiled.memory is not None:
        out.append(("memory per GPU", f"{compiled.memory.per_gpu_bytes / 2**30:.2f} GiB of "
                                      f"{compiled.memory.capacity_bytes / 2**30:.2f} GiB"))
    if compiled.time is not None:
        t = compiled.time
        out.append(("time", f"{t.step_seconds:.3g} s/step, MFU {t.mfu:.1%}, {t.days:.3g} days"))
    if compiled.cost is not None:
        out.append(("cost", f"{compiled.cost.gpu_hours:,.0f} GPU-hours, ${compiled.cost.usd:,.0f}"))
    return out
