"""``compile_spec``: the single entry point from a validated RunSpec to a frozen :class:`Compiled`.

Data flow (each arrow one module): spec -> params/flops/scaling (model and compute numbers) ->
defaults (batch) -> search (plan, memory, step time) -> defaults (the rest of the hyperparameters)
-> checks (diagnostics) -> stages / serving plans. Pure: no printing, no reads and no writes; the
caller passes the spec file's bytes (for its sha256) and the facts about files the spec references
(:func:`llmc.spec.facts.gather_facts`).

Diagnostics of its own (the others are ``checks.py``'s, listed in the compiler README):

* T005 (error): fp8 on a custom GPU without fp8 tensor cores.
* P019 (warning): the explicit global batch does not split evenly over ``hardware.count`` (the count's odd factor
  does not divide it, :func:`splits_evenly`), and the largest whole-node count below it that it does split over
  (:func:`smaller_split_count`) finishes in no more days (within the ranking band) for less money; names that count's
  plan, days, MFU and cost against the plan's, and the fixes (that count, or a batch that splits,
  :func:`batch_splitting`).
* T020 (warning): the plan at its fp8 / nvfp4 precision is not faster than the same plan timed at bf16 (the casts,
  above all the weights' once per micro-batch, eat the faster GEMMs); names both steps, the GEMM gain, the casts'
  seconds and the fastest low-precision layout the search found.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import partial

from llmc import hf_export
from llmc.compiler import backends, checks, defaults, flops, params, scaling, timing
from llmc.compiler.calibration import UNCALIBRATED_MEMORY_MAX_ERR_PCT
from llmc.compiler.checks import Sink
from llmc.compiler.defaults import pretrain_batch_seqs, pretrain_hyper, pretrain_inputs, pretrain_paths
from llmc.compiler.hardware import GPU, GPUS, get_gpu, peak_flops, supports, with_overrides
from llmc.compiler.plan import ParallelPlan
from llmc.compiler.result import (
    BackendChoice,
    BackendRun,
    CalibrationStatus,
    Candidate,
    Compiled,
    ComputeNumbers,
    CostNumbers,
    Hyper,
    MemoryNumbers,
    ModelNumbers,
    ServingPlan,
    StagePlan,
    UnfitLayout,
)
from llmc.compiler.units import gib
from llmc.diagnostics import Diagnostic, errors, line_for, sort_diagnostics
from llmc.spec.facts import ExternalFacts
from llmc.spec.families import family_of
from llmc.spec.load import LoadedSpec
from llmc.spec.model import Architecture, RopeScaling
from llmc.spec.schema import CONTINUED_KINDS, NVFP4_BF16_TAIL, Hardware, RunSpec, Training
from llmc.weight_init import init_scheme


def model_numbers(arch: Architecture) -> ModelNumbers:
    """Parameter counts (params.py) in the report's shape, and the initialisation (llmc.weight_init)."""
    return ModelNumbers(
        params_total=params.params_total(arch), params_active=params.params_active(arch),
        params_embedding=params.params_embedding(arch), breakdown=params.param_breakdown(arch),
        kv_bytes_per_token=params.kv_bytes_per_token(arch), init=init_scheme(arch),
    )


def compute_numbers(arch: Architecture, seq_len: int, tokens: float, unique: float | None = None,
                    from_scratch: bool = False) -> ComputeNumbers:
    """Training FLOPs (flops.py convention) and the scaling-law reference points (scaling.py). ``tokens``: the
    tokens the run trains (:func:`scaling.trained_tokens`); ``unique``: the unique tokens the sources declare
    (:func:`scaling.unique_tokens`); ``from_scratch``: the run trains from scratch (the predicted losses are only
    for those)."""
    fpt = flops.train_flops_per_token(arch, seq_len)
    total = fpt * tokens
    n_act = params.params_active(arch)
    # Chinchilla with 20 tokens/param (Hoffmann et al. 2022, arXiv:2203.15556 Table 3): C = 6 N (20 N)
    # => N = sqrt(C / 120), D = 20 N, with C in Chinchilla's own 6ND convention (no attention term).
    n_opt, d_opt = scaling.compute_optimal(6.0 * n_act * float(tokens))
    run_loss = opt_loss = None
    if from_scratch and n_act >= scaling.FIT_MIN_PARAMS:  # (below the fits' smallest model: no figure at all)
        run_loss, opt_loss = scaling.predicted_losses(n_act, tokens)
    return ComputeNumbers(
        convention=flops.convention(arch), flops_per_token=fpt, training_flops=total, tokens=float(tokens),
        tokens_per_param=scaling.tokens_per_param(n_act, tokens), chinchilla_tokens=scaling.chinchilla_tokens(n_act),
        optimal_params=n_opt, optimal_tokens=d_opt, unique_tokens=unique,
        optimal_epochs=d_opt / unique if unique else None, data_limited=scaling.data_limited(d_opt, unique),
        approach3_tokens_per_param=scaling.approach3_tokens_per_param(n_act, tokens),
        loss_fit=scaling.EPOCH.source if from_scratch else None, predicted_loss=run_loss, optimal_loss=opt_loss,
    )


def spec_gpu(run: RunSpec) -> GPU | None:
    """The table's GPU (or a custom one) with ``hardware.gpu_overrides`` applied; None when unknown."""
    return hardware_gpu(run.hardware)


def hardware_gpu(hw: Hardware) -> GPU | None:
    """:func:`spec_gpu` from the ``hardware`` section alone."""
    if hw.gpu_overrides is None:
        return get_gpu(hw.gpu)
    return with_overrides(hw.gpu, hw.gpu_overrides.model_dump())


def cluster_gpu(run: RunSpec, gpu: GPU) -> GPU:
    """The table's GPU with the spec's hardware overrides (node size, network, price) applied: the one
    source of ``gpus_per_node`` (and network and price) for the search, the stages and serving."""
    hw = run.hardware
    changes = {}
    if hw.gpus_per_node is not None:
        changes["gpus_per_node"] = hw.gpus_per_node
        if hw.gpus_per_node != gpu.gpus_per_node:
            changes["host_gib"] = 0.0  # another node than the table's reference one: its host memory is unknown
    if hw.host_memory_gib is not None:
        changes["host_gib"] = hw.host_memory_gib
    if hw.inter_node_gbps is not None:
        changes["net_gbps"] = hw.inter_node_gbps
    if hw.usd_per_gpu_hour is not None:
        changes["usd_per_hour"] = hw.usd_per_gpu_hour
    return dataclasses.replace(gpu, **changes) if changes else gpu


def spec_sha256(run: RunSpec, spec_bytes: bytes | None) -> str:
    """sha256 of the spec file's bytes; of the resolved spec's canonical JSON when no bytes are given."""
    if spec_bytes is None:
        spec_bytes = json.dumps(run.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(spec_bytes).hexdigest()


@dataclasses.dataclass(frozen=True)
class _Searched:
    plan: ParallelPlan | None = None
    memory: MemoryNumbers | None = None
    reasons: tuple[str, ...] = ()
    alternatives: tuple = ()
    rejected: tuple = ()
    info: dict = dataclasses.field(default_factory=dict)
    unfit: UnfitLayout | None = None  # the closest layout when none fits (P004)
    fastest: Candidate | None = None  # the fastest fitting candidate (plan's, unless the simpler-layout rule chose)


def compile_spec(run: RunSpec, spec_path: str, yaml_lines: dict[str, int] | None = None,
                 spec_bytes: bytes | None = None, facts: ExternalFacts | None = None, *, calibration=None,
                 fit_check: bool = True, overrides: tuple[str, ...] | list[str] = (),
                 spec_file_sha256: str | None = None) -> Compiled:
    """Compile a validated ``RunSpec`` into every derived number, the plan and the diagnostics.

    ``spec_bytes``: the spec file's bytes, for ``spec.sha256`` (without them: the resolved spec's hash); with
    ``--set`` overrides, the bytes followed by them (:func:`llmc.overrides.override_bytes`). ``overrides``: their
    command-line text, in order, and ``spec_file_sha256`` the sha256 of the file's own bytes, both recorded in
    ``Compiled`` (without overrides the file's hash is that of ``spec_bytes``; unknown, None, otherwise).
    ``facts``: what the spec's referenced files say (:func:`llmc.spec.facts.gather_facts`); without
    them tokenizer special tokens are inferred from the model name. Deterministic for given inputs.
    Error diagnostics are returned (not raised): the CLI prints them and exits 1; a plan is still
    reported where one could be computed.
    ``calibration``: a :class:`llmc.compiler.calibration.Calibration` (the CLI reads ``spec.calibration``);
    its factors scale time and memory when it matches the run's backend and GPU. ``fit_check=False``
    (``--no-fit-check``) searches as if every layout fitted; a pinned layout that does not fit is then
    reported with its predicted memory and time (``Compiled.unfit`` is filled either way).
    """
    lines = yaml_lines or {}
    sink = Sink(lines, spec_path)
    arch = run.model
    data, training = pretrain_inputs(run)
    model = model_numbers(arch)
    # A pipeline of post-training stages only (no ``pretrain`` stage) starts from a trained base: the
    # top-level data/training sections then describe no run of their own, so there is nothing to search.
    pretrains = run.pretrains
    # the compute-optimal token count (C001 / C002) is a rule for training from scratch, not for continuing a trained
    # model (init_hf, or a pretrain stage initialised from another stage)
    from llmc.compiler.stages import resolved_stages

    pre = next((s for s in resolved_stages(run) if s.kind == "pretrain"), None)
    from_scratch = pre is not None and pre.init_hf is None and pre.init_from is None

    checks.check_plausible_hyper(run, model.params_active, sink)  # T040-T042 (any size, any stage)
    table_gpu = spec_gpu(run)
    if get_gpu(run.hardware.gpu) is not None or table_gpu is None:
        checks.check_gpu(run, GPUS, sink, table_gpu)
    elif training.precision == "fp8" and not supports(table_gpu, "fp8"):
        sink.add("T005", "error", "training.precision", f"fp8 needs FP8 tensor cores; {table_gpu.name} has none",
                 "set hardware.gpu_overrides.fp8_tflops, or use bf16")
    elif training.precision == "nvfp4" and not supports(table_gpu, "nvfp4"):
        checks.check_nvfp4_gpu(run, table_gpu, GPUS, sink)
    else:
        checks.check_mx(run, table_gpu, GPUS, sink)
    gpu = cluster_gpu(run, table_gpu) if table_gpu is not None else None
    cluster_ok = gpu is not None and checks.check_cluster(run, gpu, sink)
    batch_ok = checks.check_batch_tokens(run, sink) if pretrains else True
    seqs, _ = pretrain_batch_seqs(run, gpu, data.seq_len, training)
    hyper = pretrain_hyper(run, gpu)  # steps etc.; the checkpoint interval is refined by the step time below
    # the tokens the run trains (pinned steps x the batch, else data.tokens): the one D of the training FLOPs, the
    # scaling numbers and checks, and D002's epochs. The batch (so these tokens, with pinned steps) depends on the GPU
    # only through the default batch's rounding to the nodes (defaults.pretrain_batch_seqs), hence computed here
    tokens = scaling.trained_tokens(hyper, data.tokens)
    unique = scaling.unique_tokens(data.sources)
    compute = compute_numbers(arch, data.seq_len, tokens, unique, from_scratch)
    data_at, steps_at = pretrain_paths(run)
    path = f"{data_at}.tokens" if "steps" in hyper.defaults else steps_at
    for d in scaling.scaling_diagnostics(model.params_active, tokens, path, unique) if from_scratch else []:
        sink.items.append(dataclasses.replace(d, line=d.line or line_for(lines, d.path), file=spec_path))

    checks.check_tokenizers(run, facts.tokenizers if facts is not None else {}, sink)
    checks.check_source_folders(run, facts.source_folders if facts is not None else {}, sink)
    init_hf = pre.init_hf if pre is not None else None
    types = facts.checkpoint_types if facts is not None else {}
    # a torchtitan run trains its continued-training stages as torchtitan jobs too: their sequences and the
    # checkpoints they start from
    continued = [(i, st) for i, st in enumerate(run.stages) if st.kind in CONTINUED_KINDS]
    # the longest of them: a stage without a seq_len of its own inherits the base data's or an earlier stage's
    titan_seq = max([data.seq_len] + [st.seq_len or st.data.seq_len for _, st in continued if st.seq_len or st.data])
    gaps = backends.torchtitan_model_gaps(run.model, init_hf, hf_model_type=types.get(init_hf) if init_hf else None,
                                          seq_len=titan_seq)
    if pretrains and gpu is not None:  # the pre-training job's sequence length
        gaps += backends.torchtitan_seq_gaps(run.model, data.seq_len, gpu.key != "cpu")
    for i, st in continued:
        if st.init_hf and st.init_hf != init_hf:
            gaps += [g for g in backends.torchtitan_model_gaps(run.model, st.init_hf, f"stages.{i}.init_hf",
                                                               types.get(st.init_hf)) if g.code == "X310"]
        if isinstance(getattr(st, "rope_scaling", None), dict):  # a long-context stage's own RoPE (the stage's torchtitan job runs it)
            try:
                rs = RopeScaling.model_validate(st.rope_scaling)
            except ValueError:  # (reported by the spec checks)
                continue
            gaps += backends.torchtitan_rope_gaps(rs, family_of(run.model), f"stages.{i}.rope_scaling")
    # what a torchtitan build would run: pre-training and continued-training stages (post-training runs on llmc's)
    titan_work = pretrains or bool(continued)
    be_info, cal_info, factors, band = _backend_and_calibration(run, gpu, calibration, sink, gaps, titan_work)
    hf_export.check_hf_export(run, sink, be_info.name)  # X130 (no export, and who reads it) / T030 (a dropped bias)
    model_opts = _ModelOptions(be_info.name, be_info.compile, factors, band, fit_check, training.fp8_recipe,
                               run.parallelism.offload_optimizer, run.parallelism.offload_params,
                               training.nvfp4_bf16_tail, mem_band=_memory_band(cal_info))
    searched = _Searched()
    if pretrains and cluster_ok and supports(gpu, training.precision) and batch_ok:
        searched = _search(run, gpu, data.seq_len, training, seqs, sink, model_opts)
    time = cost = None
    if searched.plan is not None:  # nvfp4: the plan's TP shards and rows (a pinned tp also before: check_nvfp4)
        pl = searched.plan
        checks.check_nvfp4_layout(run, backends.get_backend(be_info.name), pl.tp,
                                  pl.micro_batch * data.seq_len // pl.cp, sink, pinned=run.parallelism.tp is not None)
    if searched.plan is not None:
        sm = _step_model(arch, data.seq_len, training.precision, gpu, model_opts)
        step = timing.step_time(sm, searched.plan)[0]
        hyper = pretrain_hyper(run, gpu, step)  # the checkpoint interval follows the step time
        time = timing.time_numbers(sm, searched.plan, hyper.steps,
                                   _checkpoints(run, sm, searched.plan, gpu, hyper, step, be_info.name))
        if gpu.key != "cpu":  # (a CPU run is not a fleet of GPUs the interruption rate was measured on)
            from llmc.compiler.checkpoint_cost import interruptions

            restart = run.training.checkpoint.restart_minutes
            time = dataclasses.replace(time, interruptions=interruptions(
                time.days, run.hardware.count, time.checkpoint, time.step_seconds,
                per_gpu_day=run.hardware.interruptions_per_gpu_day,
                restart_seconds=None if restart is None else 60.0 * restart))
        time = dataclasses.replace(time, mfu_peak_dtype=timing.mfu_peak_dtype(training.precision))
        checks.check_mfu(run, gpu, time, cal_info, sink)  # P020: a step faster than the GPU's peak
        gh = timing.gpu_hours(time.days, run.hardware.count)
        cost = CostNumbers(gpu_hours=gh, usd=timing.usd(gh, gpu.usd_per_hour), usd_per_gpu_hour=gpu.usd_per_hour,
                           # (a free part, the CPU pseudo-device's $0, is no reference price)
                           price_is_default=run.hardware.usd_per_gpu_hour is None and gpu.usd_per_hour > 0)

        def step_model(precision: str, compile_: bool):  # the plan's step model at another precision / compile
            return _step_model(arch, data.seq_len, precision, gpu, dataclasses.replace(model_opts, compile=compile_))

        # T021 (fp8 timed eager) names the bf16 step as T020 would: one message for the situation
        if not checks.check_fp8_eager(run, backends.get_backend(be_info.name), searched.plan, sm, step_model, sink):
            _check_lowp_gain(run, gpu, data.seq_len, searched, sm, sink, model_opts)
        if not pretrain_batch_seqs(run, gpu, data.seq_len, training)[1]:  # (llmc's own batch splits: defaults.py)
            _check_smaller_cluster(run, gpu, data.seq_len, training, seqs, time, cost, sink, model_opts)

    floor = None
    if pretrains:
        floor = _check_pretraining(run, gpu, hyper, compute, time, cost, sink, backends.get_backend(be_info.name))
        checks.check_host_memory(run, searched.memory, gpu, sink)
    stages, stage_diags = _stages(run, gpu, lines, spec_path, hyper, searched, facts, be_info.name,
                                  _stage_search(run, gpu, model_opts) if cluster_ok else None, fit_check=fit_check)
    if run.training.backend == "torchtitan" and gpu is not None:  # pinned: its continued-training stage jobs too
        _check_titan_stage_seq(run, continued, {sp.name: sp for sp in stages}, gpu, sink)
    from llmc.compiler.stages import pipeline_time

    pipeline = pipeline_time(stages, time.days if time else None, cost.usd if cost else None, run.hardware.count,
                             bool(run.stages), time.checkpoint if time else None)
    if pipeline is not None:
        checks.check_pipeline_budget(run, pipeline, sink)
    serving, serving_diags = _serving(run, gpu, lines, stages)
    evaluation = _evaluation(run, sink, spec_path, stages, hyper, searched.plan, compute, time,
                             facts.eval_tasks if facts is not None else {})
    diags = sink.items + [_located(d, lines, spec_path) for d in stage_diags + serving_diags]
    preemption = _preemption(time, stages)
    runs = backend_runs(run, gpu, hyper, searched.plan, searched.memory, be_info.name, calibration,
                        titan_gaps=bool(gaps))
    sha = spec_sha256(run, spec_bytes)
    return Compiled(
        spec_path=spec_path, spec_sha256=sha, spec=run, gpu=gpu, model=model,
        spec_file_sha256=spec_file_sha256 if spec_file_sha256 is not None else (
            sha if spec_bytes is not None and not overrides else None),
        overrides=list(overrides), fit_check=fit_check,
        compute=compute, hyper=hyper, plan=searched.plan, memory=searched.memory, time=time, cost=cost,
        reasons=list(searched.reasons),
        alternatives=list(searched.alternatives), rejected=list(searched.rejected),
        diagnostics=sort_diagnostics(_dedupe(diags)), stages=stages, serving=serving, search=dict(searched.info),
        backend=be_info, calibration=cal_info, unfit=searched.unfit, evaluation=evaluation, pipeline=pipeline,
        checkpoint_types=dict(facts.checkpoint_types) if facts is not None else {}, preemption=preemption,
        budget_floor=floor, backend_runs=runs,
    )


def backend_runs(run: RunSpec, gpu: GPU | None, hyper: Hyper, plan: ParallelPlan | None,
                 memory: MemoryNumbers | None, planned: str, calibration=None, *,
                 titan_gaps: bool = False) -> dict[str, BackendRun]:
    """The pre-training run of every backend a build launches (``llmc launch --backend``, ``native/launch.sh``,
    ``deepspeed/launch.sh``, the torchtitan scripts), each sized once here by llmc's memory model on that backend's
    profile (:func:`llmc.compiler.memory.memory_per_gpu`; the calibration's factors where it was fitted for that
    backend, as ``llmc plan --set training.backend=<it>`` applies them): the plan's backend (``planned``) is the plan's
    own memory; the others train the plan's layout (the native trainer; torchtitan without llmc's loss slices, which
    its job does not run) or, for llmc's DeepSpeed runner, :func:`backends.deepspeed_run_plan` with the run's ZeRO
    stage (:func:`backends.deepspeed_zero_stage`). A backend whose runner does not train the plan is left out: the
    native trainer with pp / cp / ep (it refuses them, R002), torchtitan on a model it cannot run (``titan_gaps``:
    X3xx) or a pipeline with tied embeddings (X303), DeepSpeed when the batch does not split over every GPU (X104).
    Empty without a plan or a GPU."""
    if plan is None or gpu is None:
        return {}
    from llmc.compiler import calibration as cal_mod
    from llmc.compiler import memory as memory_mod
    from llmc.compiler.search import describe, usable_bytes

    par, seq_len, precision = run.parallelism, int(hyper.seq_len), run.training.precision
    out: dict[str, BackendRun] = {}
    for name in ("native", "torchtitan", "deepspeed"):
        be = backends.get_backend(name)
        got = backend_layout(run, plan, name, planned, int(hyper.global_batch_seqs), titan_gaps=titan_gaps)
        if got is None:
            continue
        layout, note = got
        if name == planned and memory is not None and layout == plan:
            mem = memory
        else:
            factors = cal_mod.plan_calibration(calibration, name, gpu.key)[1] if calibration is not None else None
            mem = memory_mod.memory_per_gpu(run.model, layout, seq_len, precision, gpu.hbm_bytes, backend=be,
                                            compile=backends.compile_on(be, run.training.compile), factors=factors,
                                            offload_optimizer=par.offload_optimizer, offload_params=par.offload_params)
        out[name] = BackendRun(backend=name, plan=layout, layout=describe(layout) + note,
                               per_gpu_bytes=int(mem.per_gpu_bytes), capacity_bytes=int(mem.capacity_bytes),
                               usable_bytes=int(usable_bytes(mem.capacity_bytes, mem.backend)),
                               fits=memory_mod.fits(mem), planned=name == planned)
    return out


def backend_layout(run: RunSpec, plan: ParallelPlan, name: str, planned: str, global_batch_seqs: int, *,
                   titan_gaps: bool = False) -> tuple[ParallelPlan, str] | None:
    """(the layout backend ``name``'s runner trains the plan's pre-training with, how it differs from the plan in
    words, "" when it does not), or None when that runner does not train it (:func:`backend_runs` says which). The
    one rule :func:`backend_runs` sizes each backend's run by and ``llmc calibrate`` / ``llmc report`` predict a run
    of a backend other than the planned one on (llmc.measurements)."""
    be = backends.get_backend(name)
    if name == "deepspeed":
        par = run.parallelism
        stage = backends.deepspeed_zero_stage(par, plan, searched=True, backend=planned)
        layout = backends.deepspeed_run_plan(plan, run.hardware.count, global_batch_seqs, stage)
        if layout is None:
            return None
        note = ""
        if backends.deepspeed_folds(plan):
            note = (f" (the plan's tp={plan.tp} pp={plan.pp} cp={plan.cp} ep={plan.ep} folded into ZeRO-{stage} "
                    f"data parallelism over all {layout.dp_shard} GPUs, whole sequences)")
        return layout, note
    if any(getattr(plan, d) > 1 and d not in be.supports for d in ("tp", "pp", "cp", "ep")):
        return None
    if name == "torchtitan" and (titan_gaps or (plan.pp > 1 and run.model.tied_embeddings and not be.tied_pp)):
        return None
    return (plan if be.slices_loss else dataclasses.replace(plan, loss_chunk_tokens=0)), ""


def _check_titan_stage_seq(run: RunSpec, continued, plans: dict, gpu: GPU, sink: Sink) -> None:
    """What a pinned torchtitan run's continued-training stage jobs cannot run about their sequence length
    (``backends.torchtitan_layout_problem`` at tp = cp = pp = 1; a stage job sizes its RoPE cache to its own
    seq_len: no X305), at the seq_len each stage trains at: its own, its data's, else the one it inherits from the
    stage it starts from (a stage after a 32K long_context one trains at 32K, not at data.seq_len)."""
    for i, st in continued:
        sp = plans.get(st.name)
        seq = sp.seq_len if sp is not None else (st.seq_len or (st.data.seq_len if st.data else None)
                                                           or run.data.seq_len)
        where = (f"stages.{i}.seq_len" if st.seq_len else f"stages.{i}.data.seq_len" if st.data and st.data.seq_len
                 else f"stages.{i}")
        g = backends.torchtitan_layout_problem(run.model, seq, 1, 1, 1, gpu.key != "cpu")
        if g is not None:
            inherited = "" if st.seq_len or (st.data and st.data.seq_len) else f" (seq_len {seq}, inherited)"
            sink.add(g.code, "error", where, f"stage {st.name!r}{inherited}: {g.message}", g.hint)


def _preemption(time, stages):
    """What a preemption needs of the build's jobs (pre-training and each stage with a predicted time and saves)
    and the shutdown time the launchers give it (checkpoint_cost.preemption_numbers)."""
    from llmc.compiler import checkpoint_cost

    jobs = [("pre-training", time.step_seconds, time.checkpoint.preempt_seconds)] if (
        time is not None and time.checkpoint is not None) else []
    jobs += [(s.name, s.time.step_seconds, s.time.checkpoint.preempt_seconds) for s in stages
             if s.time is not None and s.time.checkpoint is not None]
    return checkpoint_cost.preemption_numbers(jobs)


def _checkpoints(run: RunSpec, sm, plan: ParallelPlan, gpu: GPU, hyper: Hyper, step_seconds: float, backend: str):
    """The pre-training run's checkpoint saves and their stalls (checkpoint_cost.py) on the backend that runs it, with
    what it keeps on disk (``keep_latest`` of them and the Hugging Face export, where the model has one)."""
    from llmc.compiler import checkpoint_cost
    from llmc.hf_export import hf_export_supported

    ck = run.training.checkpoint
    return checkpoint_cost.checkpoint_numbers(
        sm, plan, gpu, backend=backend, params_total=params.params_total(run.model),
        precision=run.training.precision, steps=hyper.steps, interval=hyper.checkpoint_interval,
        step_seconds=step_seconds, async_save=checkpoint_cost.saves_async(backend, hyper.checkpoint_async),
        write_gbps=ck.write_gbps, keep_latest=ck.keep_latest, exportable=hf_export_supported(run.model) is None)


def _evaluation(run, sink, spec_path, stages, hyper, plan, compute, time, task_files):
    """``eval`` / ``data.quality``: validation cost at the plan's throughput, banding, checks (evaluation.py)."""
    import posixpath

    from llmc.compiler.evaluation import plan_evaluation

    return plan_evaluation(
        run, sink, spec_dir=posixpath.dirname(spec_path), stage_names=[s.name for s in stages], steps=hyper.steps,
        micro_batch=plan.micro_batch if plan else None, dp=plan.dp if plan else None,
        grad_accum=plan.grad_accum if plan else 1, forward_flops_per_token=flops.forward_flops_per_token(run.model, run.data.seq_len),
        tokens_per_second=time.tokens_per_second if time else None,
        train_flops_per_token=compute.flops_per_token, step_seconds=time.step_seconds if time else None,
        stages=stages, task_files=task_files, trained_tokens=compute.tokens)


@dataclasses.dataclass(frozen=True)
class _ModelOptions:
    """How the time/memory model runs: the backend and its torch.compile, calibration factors, the ranking
    band within which layouts count as equal, and whether layouts must fit."""

    backend: str
    compile: bool
    factors: object | None
    band: float
    fit_check: bool
    fp8_recipe: str | None = None  # training.fp8_recipe (None = the backend's)
    offload_optimizer: bool = False  # parallelism.offload_optimizer (ZeRO-Offload: the update runs on the host)
    offload_params: bool = False  # parallelism.offload_params (ZeRO-Infinity: the parameters on the host too)
    nvfp4_bf16_tail: float = NVFP4_BF16_TAIL  # training.nvfp4_bf16_tail (the final blocks an nvfp4 run keeps in bf16)
    # the memory model's relative error the simpler-layout rule keeps below the usable limit (_memory_band)
    mem_band: float = UNCALIBRATED_MEMORY_MAX_ERR_PCT / 100.0


def _memory_band(cal_info) -> float:
    """The memory model's error as a fraction, for the search's simpler-layout rule: the largest |error| of the memory
    band the plan quotes (``CalibrationStatus.bands["memory"]``: a calibration's leave-one-out band where its memory
    factors apply, else llmc's uncalibrated error), else the published one (benchmarks/RESULTS.md)."""
    band = (cal_info.bands or {}).get("memory") if cal_info is not None else None
    pct = band.get("max_abs_pct") if isinstance(band, dict) else None
    return float(pct if pct is not None else UNCALIBRATED_MEMORY_MAX_ERR_PCT) / 100.0


def _step_model(arch: Architecture, seq_len: int, precision: str, gpu: GPU, o: _ModelOptions):
    return timing.step_model(arch, seq_len, precision, gpu, o.backend, compile=o.compile, factors=o.factors,
                             fp8_recipe=o.fp8_recipe, offload_optimizer=o.offload_optimizer,
                             offload_params=o.offload_params, nvfp4_bf16_tail=o.nvfp4_bf16_tail)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What :func:`compile_loaded` found: ``compiled`` (None when the spec is invalid) and every
    diagnostic, the loader's and the compiler's, sorted (errors first)."""

    compiled: Compiled | None
    diagnostics: list[Diagnostic]

    @property
    def errors(self) -> list[Diagnostic]:
        return errors(self.diagnostics)


#: An invalid value at a path (prefix) makes the compiler's diagnostics under these paths meaningless
#: (they were computed from the default that replaced it); longest prefix wins; the invalid path itself
#: and its parents are always included.
_DEPENDENTS: dict[str, tuple[str, ...]] = {
    "name": (),
    "model": ("model", "data", "hardware", "training", "parallelism", "budget", "stages", "serving"),
    "data": ("data", "hardware", "training", "parallelism", "budget", "stages", "serving"),
    "data.sources": ("data.sources",),
    "data.tokenizer": ("data.tokenizer", "stages"),
    "hardware": ("hardware", "training", "parallelism", "budget", "stages", "serving"),
    "training": (),
    "training.precision": ("training", "hardware", "parallelism", "budget", "stages", "serving"),
    "training.global_batch_tokens": ("training", "data.tokens", "hardware", "parallelism", "budget"),
    "training.steps": ("training", "data.tokens", "budget"),
    "parallelism": ("parallelism", "hardware", "training.global_batch_tokens", "budget"),
    "budget": ("budget",),
    "stages": ("stages", "serving"),
    "serving": ("serving",),
}


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _independent(d: Diagnostic, invalid: tuple[str, ...]) -> bool:
    """True when ``d`` (computed from a best-effort spec) depends on none of the ``invalid`` paths."""
    for bad in invalid:
        if not bad:
            return False
        if _under(d.path, bad) or (d.path and _under(bad, d.path)) or not d.path:
            return False
        key = max((k for k in _DEPENDENTS if _under(bad, k)), key=len, default="")
        if any(_under(d.path, dep) for dep in _DEPENDENTS.get(key, ())):
            return False
    return True


def compile_loaded(loaded: LoadedSpec, facts: ExternalFacts | None = None, **options) -> Outcome:
    """Compile what :func:`llmc.spec.load.read_spec` returned; every error at once, across phases.

    A valid spec compiles as :func:`compile_spec` (``spec_sha256`` of the bytes read). An invalid one
    still compiles its best-effort spec (invalid values replaced by defaults) and reports, besides the
    loader's errors, the compiler's diagnostics that do not depend on an invalid value.
    ``options``: :func:`compile_spec`'s keyword options (``calibration``, ``fit_check``).
    """
    # what the build records of its input: the spec file's own hash and the --set overrides applied to it
    options = {**options, "overrides": loaded.overrides, "spec_file_sha256": loaded.spec_file_sha256}
    if loaded.run is not None:
        c = compile_spec(loaded.run, loaded.file, loaded.lines, loaded.spec_bytes, facts, **options)
        return Outcome(c, sort_diagnostics(_dedupe(list(loaded.diagnostics) + c.diagnostics)))
    extra: list[Diagnostic] = []
    if loaded.partial is not None:
        c = compile_spec(loaded.partial, loaded.file, loaded.lines, loaded.spec_bytes, facts, **options)
        extra = [d for d in c.diagnostics if _independent(d, loaded.invalid_paths)]
    else:  # no best-effort whole (a required section is missing): the checks that read one valid section alone
        sink = Sink(loaded.lines, loaded.file)
        if loaded.hardware is not None:
            checks.check_gpu_names(loaded.hardware, GPUS, sink, hardware_gpu(loaded.hardware))
        if loaded.stages is not None:
            from llmc.compiler.stages import stage_order

            stage_order(list(loaded.stages), sink)
        extra = sink.items
    return Outcome(None, sort_diagnostics(_dedupe(list(loaded.diagnostics) + extra)))


def _search(run: RunSpec, gpu: GPU, seq_len: int, training: Training, seqs: int, sink: Sink,
            o: _ModelOptions) -> _Searched:
    """The parallelism search for the pre-training run (after the pins are checked)."""
    before = len(errors(sink.items))
    checks.check_pins(run, gpu, sink)
    if len(errors(sink.items)) != before:
        return _Searched()
    from llmc.compiler import memory as memory_mod

    arch = run.model
    res, sm, memory_fn = _run_search(run, gpu, seq_len, training, seqs, o, run.hardware.count)
    checks.check_search(run, res, gpu, seqs, sink)
    info = {"memory_evaluations": res.evaluated, "fitting": res.fitting,
            "rejected": dict(sorted(res.rejected_counts.items()))}
    reasons = list(res.reasons)
    if not o.fit_check and res.best is not None and not memory_mod.fits(res.memory):
        reasons.insert(0, f"fit check off: the plan needs {gib(res.memory.per_gpu_bytes)} per GPU, "
                          f"more than the {gib(gpu.hbm_bytes)} the GPU has")
    if res.best is not None and res.best.plan.loss_chunk_tokens:
        sliced = res.best.plan
        whole = dataclasses.replace(sliced, loss_chunk_tokens=0)
        logits = memory_mod.loss_logits_bytes(arch.vocab_size, whole.micro_batch * seq_len / whole.cp, whole,
                                              softcapped=arch.final_logit_softcap is not None)
        slower = 100 * (timing.step_time(sm, sliced)[0] / timing.step_time(sm, whole)[0] - 1)
        reasons.insert(min(2, len(reasons)), (
            f"loss in slices of {sliced.loss_chunk_tokens} tokens: the {o.backend} trainer recomputes each slice's "
            f"output head in the backward (+{slower:.1f}% step time) instead of holding the micro-step's "
            f"{gib(logits)} of logits and their gradient, which do not fit with this layout and recomputation"))
    unfit = None
    if res.best is None and res.closest is not None:
        c = res.closest.plan
        unfit = UnfitLayout(plan=c, memory=memory_fn(c), time=timing.time_numbers(sm, c, 1),
                            note="the closest layout does not fit (P004); predicted memory and one step's time")
    best = res.best
    memory = res.memory if best else None
    if memory is not None and run.parallelism.offload_optimizer:
        memory = dataclasses.replace(memory, host_bytes_per_node=memory_mod.offload_host_bytes_per_node(
            params.params_total(arch), best.plan, gpu.gpus_per_node, run.parallelism.offload_params))
    return _Searched(plan=best.plan if best else None, memory=memory,
                     reasons=tuple(reasons), alternatives=tuple(res.alternatives),
                     rejected=tuple(res.rejected[:20]), info=info, unfit=unfit, fastest=res.fastest)


def _run_search(run: RunSpec, gpu: GPU, seq_len: int, training: Training, seqs: int, o: _ModelOptions, world: int):
    """(search.SearchResult, step model, memory function) of the pre-training search on ``world`` GPUs."""
    from llmc.compiler import memory as memory_mod
    from llmc.compiler import search

    arch = run.model
    sm = _step_model(arch, seq_len, training.precision, gpu, o)
    memory_fn = partial(_memory, memory_mod, arch, seq_len, training.precision, gpu.hbm_bytes,
                        run.parallelism.offload_optimizer, o.backend, o.compile, o.factors,
                        offload_params=run.parallelism.offload_params)
    res = search.search(arch, sm, world=world, gpu=gpu, seq_len=seq_len, global_batch_seqs=seqs,
                        precision=training.precision, pins=backend_pins(run.parallelism, o.backend, arch),
                        memory_fn=memory_fn, peak_fn=partial(memory_fn, per_stage=False),
                        fits_fn=None if o.fit_check else _always_fits, band=o.band, mem_band=o.mem_band,
                        fit_check=o.fit_check, loss_slice=memory_mod.loss_slice_tokens(arch.vocab_size) if _slices_loss(o.backend) else 0)
    return res, sm, memory_fn


def _odd_part(n: int) -> int:
    """``n`` without its factors of two (1 for n <= 0)."""
    return n >> ((n & -n).bit_length() - 1) if n > 0 else 1


def splits_evenly(world: int, seqs: int) -> bool:
    """Whether a global batch of ``seqs`` sequences splits over ``world`` GPUs with power-of-two model parallelism:
    the odd part of ``world`` divides ``seqs`` (then world = dp x 2^k with dp dividing the batch; otherwise the
    leftover odd factor has to go to a pipeline or context dimension, e.g. 12,288 = 3 x 4,096 GPUs with 2,048
    sequences forces pp 3, 6, 12, ...)."""
    return seqs % _odd_part(world) == 0


def smaller_split_count(world: int, seqs: int, gpus_per_node: int) -> int | None:
    """The largest whole-node GPU count below ``world`` over which the batch splits evenly (:func:`splits_evenly`:
    d x 2^k for an odd divisor d of the batch; with a power-of-two batch, the largest power-of-two number of
    nodes); None on one node or less, or when ``world`` itself splits evenly."""
    if world <= gpus_per_node or splits_evenly(world, seqs):
        return None
    from llmc.compiler.search import divisors

    counts = (d << k for d in divisors(_odd_part(seqs)) for k in range(world.bit_length()))
    return max((m for m in counts if gpus_per_node <= m < world and m % gpus_per_node == 0), default=None)


def batch_splitting(world: int, seqs: int) -> int:
    """A global batch (sequences) of at least ``seqs`` that splits evenly over ``world`` GPUs (:func:`splits_evenly`)
    over about as many data-parallel ranks as it has sequences: the smallest multiple of o x 2^a, o the count's odd
    part and 2^a the largest power of two with o x 2^a <= ``seqs`` (at most the count's own power-of-two part), so
    the batch grows by less than that unit. 2,048 sequences on 12,288 = 3 x 4,096 GPUs: 3,072 (2 x 1,536), which
    splits over 3,072 ranks; the smallest multiple of 3 (2,049 = 3 x 683) would split over 3 only."""
    o = _odd_part(world)
    unit = o * min(world & -world, 1 << max(0, (seqs // o).bit_length() - 1))
    return -(-seqs // unit) * unit


def _check_smaller_cluster(run: RunSpec, gpu: GPU, seq_len: int, training: Training, seqs: int, time, cost,
                           sink: Sink, o: _ModelOptions) -> None:
    """P019: the spec's batch does not split evenly over its GPUs (:func:`splits_evenly`) and a smaller part of the
    cluster (:func:`smaller_split_count`) finishes in no more days, within the model's ranking band ``o.band``,
    and for less: that count's pre-training plan, timed and priced exactly as ``llmc plan`` times it run on its
    own. One extra search, run only for such a count; an explicit batch only (llmc's default splits)."""
    world = run.hardware.count
    m = smaller_split_count(world, seqs, gpu.gpus_per_node)
    if m is None:
        return
    res, sm, _ = _run_search(run, gpu, seq_len, training, seqs, o, m)
    if res.best is None:
        return
    plan = res.best.plan
    small = run.model_copy(update={"hardware": run.hardware.model_copy(update={"count": m})})
    step = timing.step_time(sm, plan)[0]
    hyper = pretrain_hyper(small, gpu, step)
    t = timing.time_numbers(sm, plan, hyper.steps, _checkpoints(small, sm, plan, gpu, hyper, step, o.backend))
    usd = timing.usd(timing.gpu_hours(t.days, m), gpu.usd_per_hour)
    max_days = run.budget.max_days if run.budget is not None else None
    if t.days > time.days * (1 + o.band) or usd >= cost.usd or (
            max_days is not None and t.days > max_days >= time.days):
        return
    import math

    from llmc.compiler.search import describe

    odd = _odd_part(world)
    left = odd // math.gcd(odd, seqs)  # the part of the count's odd factor the data-parallel ranks cannot take
    alt = batch_splitting(world, seqs)
    when = "sooner" if t.days <= time.days else f"as fast (within the model's {100 * o.band:.0f}% error band)"
    sink.add("P019", "warning", "hardware.count",
             f"{m:,} of the {world:,} GPUs ({m // gpu.gpus_per_node:,} nodes) would finish {when} and cheaper: "
             f"{t.days:.1f} days at {100 * t.mfu:.1f}% MFU, ${usd:,.0f} ({describe(plan)}), against this plan's "
             f"{time.days:.1f} days at {100 * time.mfu:.1f}% MFU, ${cost.usd:,.0f}: the global batch of {seqs:,} "
             f"sequences does not split evenly over {world:,} = {odd} x {world // odd:,} GPUs, so a factor {left} "
             f"goes to a pipeline or context dimension",
             f"set hardware.count: {m}, or a global batch that splits over all {world:,} GPUs, e.g. "
             f"training.global_batch_tokens: {alt * seq_len} ({alt:,} sequences of {seq_len:,}; a larger batch "
             f"changes the optimisation)")


def _check_lowp_gain(run: RunSpec, gpu: GPU, seq_len: int, searched: _Searched, sm, sink: Sink,
                     o: _ModelOptions) -> None:
    """T020: the plan's step at its low precision (fp8, nvfp4) is not faster than the same plan at bf16 (the same
    layout, micro-batch and recomputation, timed by the same model with ``precision: bf16``): the casts (the
    weights' once per micro-batch, the activations' and gradients' per token; ``timing.cast_seconds``) eat the
    faster GEMMs. Names both steps, what the GEMMs gain and the casts cost (what the other terms add or save), and the
    fastest low-precision layout the search found (it minimises the low-precision step already; within the ranking
    band it prefers the simpler: a faster layout it declined so is named as inside the band, not to be pinned)."""
    precision = run.training.precision
    if precision not in ("fp8", "nvfp4") or not sm.fp8_peak:  # (no converted linears: timed as bf16)
        return
    plan = searched.plan
    low, _, br = timing.step_time(sm, plan)
    sm16 = _step_model(run.model, seq_len, "bf16", gpu, o)
    high, _, br16 = timing.step_time(sm16, plan)
    if low < high:
        return
    from llmc.compiler.search import describe

    weights, acts = timing.cast_seconds(sm, plan)
    gemm = (br16["compute"] + br16["recompute"]) - (br["compute"] + br["recompute"])
    other = (low - high) - (weights + acts - gemm)
    others = list(searched.alternatives)
    if searched.fastest is not None and searched.fastest.plan != plan:  # (the simpler-layout rule's: maybe this layout)
        others.append(searched.fastest)
    fastest = min(others, key=lambda c: c.step_seconds, default=None)
    if fastest is not None and fastest.step_seconds < high:
        layout = (f"the fastest {precision} layout the search found, {describe(fastest.plan)} "
                  f"({fastest.step_seconds:.2f} s per step), beats bf16 here")
        if fastest.step_seconds * (1 + o.band) >= low:  # the simpler-layout rule chose this plan over it
            layout += (f", but it is within the model's {100 * o.band:.0f}% error band of this plan, which the search "
                       "chose over it (its rule within the error band: see the plan's why): a gain not beyond the model's error")
        else:
            layout += "; pin it under parallelism"
    else:
        layout = (f"no {precision} layout the search found is faster than {high:.2f} s (it minimises the "
                  f"{precision} step already)")
    tail = ("" if abs(other) < 0.005 * high else f"; the other terms add {other:.2f} s" if other > 0 else
            f"; the other terms save {-other:.2f} s")
    moe = ", or a larger parallelism.ep: fewer local experts to cast" if sm.fp8_expert_weight_cast else ""
    sink.add("T020", "warning", "training.precision",
             f"{precision} is not faster than bf16 on this plan: {low:.2f} s per step against {high:.2f} s for the "
             f"same layout ({describe(plan)}) in bf16; the {precision} GEMMs save {gemm:.2f} s per step but the "
             f"casts cost {weights + acts:.2f} s: the weights' {weights:.2f} s (each of the "
             f"{plan.grad_accum} micro-batches casts the local weights again) and the activations' and gradients' "
             f"{acts:.2f} s{tail}",
             f"use precision: bf16; in {precision}, only more tokens per cast weight shrink the weight casts' share "
             f"(a larger parallelism.micro_batch where memory allows{moe}); {layout}")


def _check_pretraining(run: RunSpec, gpu: GPU | None, hyper: Hyper, compute: ComputeNumbers, time, cost,
                       sink: Sink, backend=None):
    """Hyperparameter, data and budget diagnostics of the pre-training run (``backend``: the one that runs it);
    returns its :class:`BudgetFloor` (None without a GPU that runs the precision)."""
    n_act = params.params_active(run.model)
    is_cpu = gpu is not None and gpu.key == "cpu"
    checks.check_hyper(run, hyper, n_act, defaults.default_lr(n_act), run.hardware.count, is_cpu, sink, backend)
    checks.check_data(run, hyper, sink)
    if gpu is not None and supports(gpu, run.training.precision):
        top = peak_flops(gpu, run.training.precision)
        floor = checks.budget_floor(run, compute.training_flops, timing.mfu_peak(gpu, run.training.precision), top,
                                    gpu.usd_per_hour)
        fixed = None if "global_batch_tokens" in hyper.defaults else hyper.global_batch_seqs  # (a default follows)
        # (torchtitan cannot pipeline a model with tied embeddings: X303, which the search keeps to)
        pipeline = not (backend is not None and backend.name == "torchtitan" and run.model.tied_embeddings)
        checks.check_budget(run, compute.training_flops, time, cost, floor, top, gpu.usd_per_hour, sink, gpu=gpu,
                            seqs=fixed, seq_len=hyper.seq_len, pipeline=pipeline)
    else:
        floor = None
    checks.check_offload(run, time, sink)
    return floor


def _always_fits(mem) -> bool:
    return True


def backend_pins(par, backend: str, arch: Architecture | None = None):
    """The spec's pins plus what the backend's runner cannot do: a dimension it does not implement is pinned
    to 1 (llmc's DeepSpeed runner is data-parallel only; the native trainer has no PP/CP/EP), and DeepSpeed
    has no replicate dimension; a model with tied embeddings stays on one pipeline stage where the runner cannot tie
    them across stages (torchtitan: X303). A dimension the user pinned is left as pinned (the renderers warn)."""
    from llmc.compiler.backends import get_backend

    be = get_backend(backend)
    sup = be.supports
    upd = {d: 1 for d in ("tp", "pp", "cp", "ep") if d not in sup and getattr(par, d) is None}
    if arch is not None and arch.tied_embeddings and not be.tied_pp and par.pp is None:
        upd["pp"] = 1
    if "hsdp" not in sup and par.dp_replicate is None:
        upd["dp_replicate"] = 1
    if par.offload_params and par.zero_stage is None:
        upd["zero_stage"] = 3  # parameter offload partitions the parameters: ZeRO-3 (on one GPU too)
    return par.model_copy(update=upd) if upd else par


def _backend_and_calibration(run, gpu, calibration, sink, gaps=(), titan_work=True):
    """(backend info, calibration info, factors or None, ranking error band) for the run; ``gaps``: what torchtitan
    cannot run about the model or the checkpoints its stages start from (:func:`backends.torchtitan_model_gaps`),
    which keeps ``auto`` off it; ``titan_work``: whether any stage would run as a torchtitan job."""
    from llmc.compiler import calibration as cal_mod

    par = run.parallelism
    name, why = backends.resolve_backend(run.training.backend, tp=par.tp, pp=par.pp, cp=par.cp, ep=par.ep,
                                         zero_stage=par.zero_stage, offload=par.offload_optimizer or par.offload_params,
                                         cpu=gpu is not None and gpu.key == "cpu",
                                         model_gaps=tuple(g.message for g in gaps), titan_work=titan_work)
    be = backends.get_backend(name)
    comp = backends.compile_on(be, run.training.compile)
    fp8 = None
    if run.training.precision == "fp8":
        recipe = run.training.fp8_recipe
        fp8 = (f"{backends.fp8_recipe_on(be, recipe)} scaling" + ("" if recipe else f" ({name}'s default)")
               if be.fp8_linear_speedup > 1 else f"the {name} backend trains it in bf16 (timed as bf16)")
    elif run.training.precision == "nvfp4" and be.nvfp4_parts:
        n = run.model.n_layers
        conv = backends.nvfp4_converted_layers(n, run.training.nvfp4_bf16_tail)
        fp8 = (f"NVFP4 blocks 0-{conv - 1} of {n}, the last {n - conv} and the output head bf16; their GEMMs timed at "
               f"the FP4 peak with bf16's efficiency, not fitted to a measured {name} NVFP4 run (llmc calibrate yours)")
    be_info = BackendChoice(name=name, reason=f"backend {name}: {why}; torch.compile {'on' if comp else 'off'}",
                            compile=comp, fp8=fp8)
    if name == "torchtitan":  # pinned (auto keeps off a model with gaps): what its job cannot run, at plan time
        for g in gaps:
            sink.add(g.code, "error", g.path, g.message, g.hint)
    checks.check_fp8_recipe(run, be, sink)
    checks.check_nvfp4(run, be, comp, sink, why)
    checks.check_offload_backend(run, be, sink)
    checks.check_backend_options(run, be, sink)
    if run.pretrains:  # the pins describe the pre-training layout
        checks.check_backend_pins(run, be, why, sink, gaps)
        checks.check_zero_pin(run, be, sink)  # P021: ZeRO-1 on FSDP2 runs as ZeRO-2
    gkey = gpu.key if gpu is not None else ""
    # what the plan applies of it (per quantity: only factors that beat llmc uncalibrated) and the bands it quotes
    fields, factors, band = cal_mod.plan_calibration(calibration, name, gkey)
    if calibration is not None:
        fields.update(backend=calibration.backend, gpu=calibration.gpu, factors=dataclasses.asdict(calibration.factors),
                      provenance=dict(calibration.provenance),
                      file=dict(calibration.file) if calibration.file else None)
    return be_info, CalibrationStatus(**fields), factors, band


def _slices_loss(backend: str) -> bool:
    """Can the backend's runner compute the loss in slices (backends.Backend.slices_loss)?"""
    from llmc.compiler.backends import get_backend

    return get_backend(backend).slices_loss


def _memory(memory_mod, arch, seq_len, precision, capacity, offload, backend, compile_, factors, plan, *,
            per_stage: bool = True, offload_params: bool = False):
    return memory_mod.memory_per_gpu(arch, plan, seq_len, precision, capacity, offload_optimizer=offload,
                                     backend=backend, compile=compile_, factors=factors, per_stage=per_stage,
                                     offload_params=offload_params)


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


def _stages(run: RunSpec, gpu: GPU | None, lines: dict, file: str, hyper: Hyper, searched: _Searched,
            facts: ExternalFacts | None, backend: str, stage_search=None, fit_check: bool = True,
            ) -> tuple[list[StagePlan], list[Diagnostic]]:
    from llmc.compiler.stages import plan_stages

    return plan_stages(run, gpu=gpu, lines=lines, file=file, hyper=hyper, plan=searched.plan,
                       searched_memory=searched.memory, facts=facts, backend=backend, stage_search=stage_search,
                       fit_check=fit_check)


def _stage_search(run: RunSpec, gpu: GPU | None, o: _ModelOptions):
    """``(seq_len, global batch seqs) -> StageLayout | None``: the parallelism search for a continued-training stage
    (midtrain, long_context) of a torchtitan run, which runs as its own torchtitan job (the emitter writes one per
    such stage) with every dimension pre-training's job has (TP, PP, CP, FSDP). The same models, backend, calibration
    and error band as the pre-training search, over the whole cluster; the spec's ``parallelism`` pins describe
    pre-training and do not bind it (a long-context stage needs its own CP). None when the run is not torchtitan's."""
    from llmc.spec.families import family_of

    if o.backend != "torchtitan" or gpu is None or not family_of(run.model).torchtitan_hf:
        return None  # (a torchtitan job starts a stage from Hugging Face weights only through the family's adapter)
    from llmc.compiler import memory as memory_mod
    from llmc.compiler import search
    from llmc.compiler.result import StageLayout
    from llmc.spec.schema import Parallelism

    arch, precision = run.model, run.training.precision
    pins = backend_pins(Parallelism(), o.backend, arch)

    def find(seq_len: int, seqs: int) -> StageLayout | None:
        sm = _step_model(arch, seq_len, precision, gpu, o)
        memory_fn = partial(_memory, memory_mod, arch, seq_len, precision, gpu.hbm_bytes, False, o.backend,
                            o.compile, o.factors)
        res = search.search(arch, sm, world=run.hardware.count, gpu=gpu, seq_len=seq_len, global_batch_seqs=seqs,
                            precision=precision, pins=pins, memory_fn=memory_fn,
                            peak_fn=partial(memory_fn, per_stage=False), band=o.band, mem_band=o.mem_band)
        if res.best is None:
            return None
        return StageLayout(plan=res.best.plan, memory=res.memory, step_seconds=res.best.step_seconds,
                           mfu=res.best.mfu, why=res.reasons[0] if res.reasons else "")

    return find


def _serving(run: RunSpec, gpu: GPU | None, lines: dict, stages) -> tuple[list[ServingPlan], list[Diagnostic]]:
    if not run.serving:
        return [], []
    from llmc.compiler.serving import plan_serving

    return plan_serving(run, gpu_lookup=get_gpu, lines=lines, train_gpu=gpu, stages=stages)


__all__ = ["compile_spec", "compile_loaded", "Outcome", "model_numbers", "compute_numbers", "cluster_gpu", "spec_gpu",
           "pretrain_inputs", "pretrain_batch_seqs", "pretrain_hyper", "spec_sha256"]
