"""``compile_spec``: the single entry point from a validated RunSpec to a frozen :class:`Compiled`.

Data flow (each arrow one module): spec -> params/flops/scaling (model and compute numbers) ->
defaults (batch) -> search (plan, memory, step time) -> defaults (the rest of the hyperparameters)
-> checks (diagnostics) -> stages / serving plans. Pure: no printing and no writes; the only I/O is
reading the spec file's bytes for its sha256 when the caller does not pass them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from functools import partial
from pathlib import Path

from llmc.compiler import checks, defaults, flops, params, scaling, timing
from llmc.compiler.checks import Sink
from llmc.compiler.compiled import Compiled, ComputeNumbers, CostNumbers, ModelNumbers
from llmc.compiler.hardware import GPUS, get_gpu, supports, with_overrides
from llmc.diagnostics import Diagnostic, errors, line_for, sort_diagnostics


def model_numbers(arch) -> ModelNumbers:
    """Parameter counts (params.py) in the report's shape."""
    return ModelNumbers(
        params_total=params.params_total(arch), params_active=params.params_active(arch),
        params_embedding=params.params_embedding(arch), breakdown=params.param_breakdown(arch),
        kv_bytes_per_token=params.kv_bytes_per_token(arch),
    )


def compute_numbers(arch, seq_len: int, tokens: float) -> ComputeNumbers:
    """Training FLOPs (flops.py convention) and the scaling-law reference points (scaling.py)."""
    fpt = flops.train_flops_per_token(arch, seq_len)
    total = fpt * tokens
    n_act = params.params_active(arch)
    # Chinchilla with 20 tokens/param (seed-facts E10): C = 6 N (20 N)  =>  N = sqrt(C / 120), D = 20 N,
    # with C in Chinchilla's own 6ND convention (no attention term), as the C001 hint uses too.
    n_opt, d_opt = scaling.compute_optimal(6.0 * n_act * float(tokens))
    return ComputeNumbers(
        convention=flops.CONVENTION, flops_per_token=fpt, training_flops=total, tokens=float(tokens),
        tokens_per_param=scaling.tokens_per_param(n_act, tokens), chinchilla_tokens=scaling.chinchilla_tokens(n_act),
        optimal_params=n_opt, optimal_tokens=d_opt,
    )


def spec_gpu(run):
    """The table's GPU (or a custom one) with ``hardware.gpu_overrides`` applied; None when unknown."""
    ov = run.hardware.gpu_overrides
    if ov is None:
        return get_gpu(run.hardware.gpu)
    return with_overrides(run.hardware.gpu, ov.model_dump())


def cluster_gpu(run, gpu):
    """The table's GPU with the spec's hardware overrides (node size, network, price) applied."""
    hw = run.hardware
    changes = {}
    if hw.gpus_per_node is not None:
        changes["gpus_per_node"] = hw.gpus_per_node
    if hw.inter_node_gbps is not None:
        changes["net_gbps"] = hw.inter_node_gbps
    if hw.usd_per_gpu_hour is not None:
        changes["usd_per_hour"] = hw.usd_per_gpu_hour
    return dataclasses.replace(gpu, **changes) if changes else gpu


def _hash(spec_path: str, spec_bytes: bytes | None) -> str:
    if spec_bytes is None:
        p = Path(spec_path)
        spec_bytes = p.read_bytes() if p.is_file() else b""
    return hashlib.sha256(spec_bytes).hexdigest()


def compile_spec(run, spec_path: str, yaml_lines: dict[str, int] | None = None,
                 spec_bytes: bytes | None = None, *, calibration=None, fit_check: bool = True) -> Compiled:
    """Compile a validated ``RunSpec`` into every derived number, the plan and the diagnostics.

    Deterministic for a given spec. Error diagnostics are returned (not raised): the CLI prints
    them and exits 1; a plan is still reported where one could be computed.
    ``calibration``: a :class:`calibration.Calibration` (the CLI reads ``spec.calibration``); its factors
    scale time and memory when it matches the run's backend and GPU. ``fit_check=False``
    (``--no-fit-check``) searches as if every layout fitted; a pinned layout that does not fit is then
    reported with its predicted memory and time (``Compiled.unfit`` is filled either way).
    """
    lines = yaml_lines or {}
    sink = Sink(lines, spec_path)
    arch = run.model
    seq_len = run.data.seq_len
    world = run.hardware.count

    model = model_numbers(arch)
    compute = compute_numbers(arch, seq_len, run.data.tokens)
    n_act, n_tot = model.params_active, model.params_total
    # A pipeline of post-training stages only (no ``pretrain`` stage) starts from a trained base: the
    # top-level data/training sections then describe no run of their own, so there is nothing to search.
    pretrains = has_pretraining(run)
    for d in scaling.scaling_diagnostics(n_act, run.data.tokens, "data.tokens") if pretrains else []:
        sink.items.append(dataclasses.replace(d, line=d.line or line_for(lines, d.path), file=spec_path))

    table_gpu = spec_gpu(run)
    if get_gpu(run.hardware.gpu) is not None or table_gpu is None:
        checks.check_gpu(run, GPUS, sink)
    elif run.training.precision == "fp8" and not supports(table_gpu, "fp8"):
        sink.add("T005", "error", "training.precision", f"fp8 needs FP8 tensor cores; {table_gpu.name} has none",
                 "set hardware.gpu_overrides.fp8_tflops, or use bf16")
    gpu = cluster_gpu(run, table_gpu) if table_gpu is not None else None
    is_cpu = gpu is not None and gpu.key == "cpu"

    # --- batch: explicit (must be whole sequences) or size-aware default
    batch_ok = checks.check_batch_tokens(run, sink) if pretrains else True
    gbt = run.training.global_batch_tokens
    batch_is_default = gbt is None
    if batch_is_default:
        seqs = defaults.default_batch_seqs(n_act, seq_len, world, is_cpu)
        if gpu is not None:  # a big cluster needs at least one sequence per data-parallel rank
            q = checks.min_batch_seqs(arch, world, gpu.gpus_per_node)
            seqs = -(-seqs // q) * q
    else:
        seqs = max(1, round(gbt / seq_len))

    plan = mem = time = cost = None
    reasons: list[str] = []
    alternatives: list = []
    rejected: list = []
    search_info: dict = {}
    unfit = None
    be_info, cal_info, factors, band = _backend_and_calibration(run, gpu, calibration)
    can_plan = pretrains and gpu is not None and supports(gpu, run.training.precision) and batch_ok
    if can_plan:
        before = len(errors(sink.items))
        checks.check_pins(run, gpu, sink)
        can_plan = len(errors(sink.items)) == before
    if can_plan:
        from llmc.compiler import memory as memory_mod
        from llmc.compiler import search

        sm = timing.step_model(arch, seq_len, run.training.precision, gpu, be_info["name"],
                               compile=be_info["compile"], factors=factors)
        memory_fn = partial(_memory, memory_mod, arch, seq_len, run.training.precision, gpu.hbm_bytes,
                            run.parallelism.offload_optimizer, be_info["name"], be_info["compile"], factors)
        res = search.search(arch, sm, world=world, gpu=gpu, seq_len=seq_len, global_batch_seqs=seqs,
                            precision=run.training.precision, pins=backend_pins(run.parallelism, be_info["name"]),
                            memory_fn=memory_fn,
                            fits_fn=None if fit_check else _always_fits, band=band)
        checks.check_search(run, res, gpu, seqs, sink)
        reasons, alternatives = [be_info["reason"], cal_info["reason"]] + res.reasons, res.alternatives
        if not fit_check and res.best is not None and not memory_mod.fits(res.memory):
            reasons.insert(0, f"fit check off: the plan needs {res.memory.per_gpu_bytes / 2**30:.1f} GiB per GPU, "
                              f"more than the {gpu.hbm_bytes / 2**30:.1f} GiB the GPU has")
        if res.best is None and res.closest is not None:
            c = res.closest.plan
            unfit = {"plan": c.to_json(), "memory": dataclasses.asdict(memory_fn(c)),
                     "time": dataclasses.asdict(timing.time_numbers(sm, c, 1)),
                     "note": "the closest layout does not fit (P004); predicted memory and one step's time"}
        rejected = res.rejected[:20]
        search_info = {"memory_evaluations": res.evaluated, "fitting": res.fitting,
                       "rejected": dict(sorted(res.rejected_counts.items()))}
        if res.best is not None:
            plan, mem = res.best.plan, res.memory
    steps = run.training.steps or defaults.default_steps(run.data.tokens, seqs * seq_len)
    if plan is not None:
        time = timing.time_numbers(sm, plan, steps)
        gh = timing.gpu_hours(time.days, world)
        cost = CostNumbers(gpu_hours=gh, usd=timing.usd(gh, gpu.usd_per_hour), usd_per_gpu_hour=gpu.usd_per_hour)

    hyper = defaults.resolve_hyper(run.training, seq_len, run.data.tokens, seqs, batch_is_default, n_act, n_tot,
                                   time.step_seconds if time else None)
    if pretrains:
        checks.check_hyper(run, hyper, n_act, defaults.default_lr(n_act), world, is_cpu, sink)
        checks.check_data(run, hyper, sink)
    if pretrains and gpu is not None and supports(gpu, run.training.precision):
        peak = timing.mfu_peak(gpu, run.training.precision)
        checks.check_budget(run, compute.training_flops, time, cost, peak, gpu.usd_per_hour, sink)

    stages, stage_diags = _stages(run, gpu, lines, spec_path, _searched_memory(plan, mem))
    serving, serving_diags = _serving(run, lines)
    diags = sink.items + [_located(d, lines, spec_path) for d in stage_diags + serving_diags]
    return Compiled(
        spec_path=spec_path, spec_sha256=_hash(spec_path, spec_bytes), spec=run, gpu=gpu, model=model,
        compute=compute, hyper=hyper, plan=plan, memory=mem, time=time, cost=cost, reasons=reasons,
        alternatives=alternatives, rejected=rejected, diagnostics=sort_diagnostics(_dedupe(diags)),
        stages=stages, serving=serving, search=search_info, backend=be_info, calibration=cal_info, unfit=unfit,
    )


def _always_fits(mem) -> bool:
    return True


def backend_pins(par, backend: str):
    """The spec's pins plus what the backend's runner cannot do: a dimension it does not implement is pinned
    to 1 (llmc's DeepSpeed runner is data-parallel only; the native trainer has no PP/CP/EP), and DeepSpeed
    has no replicate dimension. A dimension the user pinned is left as pinned (the renderers warn)."""
    from llmc.compiler.backends import get_backend

    sup = get_backend(backend).supports
    upd = {d: 1 for d in ("tp", "pp", "cp", "ep") if d not in sup and getattr(par, d) is None}
    if "hsdp" not in sup and par.dp_replicate is None:
        upd["dp_replicate"] = 1
    return par.model_copy(update=upd) if upd else par


def _backend_and_calibration(run, gpu, calibration):
    """(backend info, calibration info, factors or None, ranking error band) for the run."""
    from llmc.compiler import backends
    from llmc.compiler import calibration as cal_mod

    par = run.parallelism
    name, why = backends.resolve_backend(run.training.backend, tp=par.tp, pp=par.pp, cp=par.cp, ep=par.ep,
                                         zero_stage=par.zero_stage, offload_optimizer=par.offload_optimizer,
                                         cpu=gpu is not None and gpu.key == "cpu")
    be = backends.get_backend(name)
    comp = backends.compile_on(be, run.training.compile)
    be_info = {"name": name, "reason": f"backend {name}: {why}; torch.compile {'on' if comp else 'off'}",
               "compile": comp}
    gkey = gpu.key if gpu is not None else ""
    if calibration is None:
        band = cal_mod.RANKING_BAND_UNCALIBRATED
        return be_info, {"calibrated": False, "error_band_pct": None, "ranking_band_pct": 100 * band,
                         "reason": f"uncalibrated (llmc calibrate fits factors from measured runs); layouts within "
                                   f"{100 * band:.0f}% of the fastest count as equal"}, None, band
    ok = calibration.backend == name and calibration.gpu.split(" ")[0] == gkey
    eb = calibration.error_band_pct()
    band = (eb / 100.0) if (ok and eb is not None) else cal_mod.RANKING_BAND_UNCALIBRATED
    info = {"calibrated": ok, "backend": calibration.backend, "gpu": calibration.gpu,
            "factors": dataclasses.asdict(calibration.factors), "error_band_pct": eb if ok else None,
            "ranking_band_pct": 100 * band, "provenance": dict(calibration.provenance)}
    if ok:
        info["reason"] = (f"calibrated for {name}/{gkey}: {calibration.factors.describe()}; expected tokens/s error "
                          f"+-{eb if eb is not None else float('nan'):.1f}% (leave-one-out)")
        return be_info, info, calibration.factors, band
    info["reason"] = (f"calibration for {calibration.backend}/{calibration.gpu} not applied: this run is "
                      f"{name}/{gkey}")
    return be_info, info, None, band


def _searched_memory(plan, mem) -> dict | None:
    """The searched layout's memory in the stage-plan shape (the pretrain stage reports this figure)."""
    if plan is None or mem is None:
        return None
    return {
        "per_gpu_bytes": mem.per_gpu_bytes, "capacity_bytes": mem.capacity_bytes,
        "fits": mem.per_gpu_bytes <= mem.capacity_bytes, "breakdown": dict(mem.breakdown),
        "activation_checkpointing": plan.activation_checkpointing, "cp": plan.cp,
        "shard_degree": plan.dp_shard, "source": "the searched parallelism plan",
    }


def has_pretraining(run) -> bool:
    """True when the run pre-trains on the top-level data: no stages, or a ``pretrain`` stage."""
    return not run.stages or any(st.kind == "pretrain" for st in run.stages)


def _memory(memory_mod, arch, seq_len, precision, capacity, offload, backend, compile_, factors, plan):
    return memory_mod.memory_per_gpu(arch, plan, seq_len, precision, capacity, offload_optimizer=offload,
                                     backend=backend, compile=compile_, factors=factors)


def _located(d: Diagnostic, lines: dict, file: str) -> Diagnostic:
    return dataclasses.replace(d, line=d.line or line_for(lines, d.path), file=d.file or file)


def _dedupe(diags: list[Diagnostic]) -> list[Diagnostic]:
    seen, out = set(), []
    for d in diags:
        k = (d.code, d.path, d.message)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


def _stages(run, gpu, lines, file, searched_memory) -> tuple[list[dict], list[Diagnostic]]:
    from llmc.compiler.stages import plan_stages

    return plan_stages(run, gpu=gpu, lines=lines, file=file, searched_memory=searched_memory)


def _serving(run, lines) -> tuple[list[dict], list[Diagnostic]]:
    if not run.serving:
        return [], []
    from llmc.compiler.serving import plan_serving

    return plan_serving(run, gpu_lookup=get_gpu, lines=lines)


__all__ = ["compile_spec", "model_numbers", "compute_numbers", "cluster_gpu", "spec_gpu", "has_pretraining"]
