"""Plan, hyperparameter, data and budget diagnostics; pure functions -> [Diagnostic].

Codes owned here (stable, cited by tests and docs):

=====  ========  ==========================================================================
S007   error     unknown GPU type (did-you-mean). (S006 is the loader's duplicate-YAML-key code.)
P008   error     hardware.count spans several nodes but is not a multiple of gpus_per_node
P009   error     gpus_per_node other than 1 for the ``cpu`` pseudo-device (one process per node)
P010   error     several GPUs per node on a part with no intra-node link bandwidth (NVLink or PCIe) in the hardware table
P001   error     pinned degrees do not multiply to / divide the world size
P002   error     pinned TP larger than a node, or a TP group that would span nodes
P003   error     n_heads / n_kv_heads not divisible by the pinned TP
P004   error     no plan fits in GPU memory (closest candidate + what would help)
P005   error     global batch cannot be split: not a multiple of seq_len, or of any dp degree
P006   warning   pipeline bubble: fewer than 4 x pp micro-batches (v x m < 4 p for interleaved)
P007   error     pinned EP on a dense model / EP not dividing the experts or the GPU count
P011   info      optimizer offload: the host's share of each step (the CPU rate it assumes, host-dependent)
P012   error     parallelism.ac_layers without activation_checkpointing: partial, or more than the model's layers
P013   warning   ac_layers at least the largest pipeline chunk: every block recomputed, as full
P014   error     parallelism.pp_virtual_stages the pinned schedule cannot run, or pp x chunks > n_layers + 2
P015   error     parallelism.offload_params without offload_optimizer, or with a ZeRO stage other than 3;
                 offload_optimizer with zero_stage 0
P016   error     offload needs more host memory per node than the node has (warning above 80%; info: unknown)
P017   error     optimizer / parameter offload on a backend whose job does not offload (only DeepSpeed does)
P018   error     a pinned parallel dimension (tp, pp or a pipeline schedule, cp, ep, dp_replicate with sharding) the
                 backend that runs the plan does not run
P020   error     predicted model FLOP/s above the dense peak of the precision the plan trains in (an MFU above 100%)
P021   info      zero_stage 1 on an FSDP2 backend (torchtitan, native): it runs, and is planned, as ZeRO-2 (FSDP2
                 has no ZeRO-1)
T001   warning   peak LR outside the pre-training range / far from the size-aware value
T002   warning   no warmup, very long warmup, no decay, or a barely decaying schedule
T003   warning   no gradient clipping
T004   warning   fp32 training (2x memory, slow)
T005   error     fp8 on a GPU without fp8 tensor cores
T006   warning   global batch outside 2M-64M tokens for large pre-training
T007   info      z-loss suggested for large runs
T008   warning   MoE with a zero load-balancing loss
T009   warning   Adam beta2 / weight decay far from LLM pre-training practice
T010   error     fp8_recipe mxfp8 on a GPU without MX block-scaled fp8 tensor cores (before Blackwell)
T011   error     an fp8_recipe the plan's backend does not run
T012   warning   training.fp8_recipe set while training.precision is not fp8 (no effect)
T013   warning   the backend that runs the plan does not apply training.compile, z_loss or loss_spike (timed and run
                 without it)
T014   error     nvfp4 on a GPU without FP4 tensor cores (before Blackwell)
T015   error     nvfp4 on a backend whose runner does not train it (only torchtitan's job does)
T016   error     nvfp4 with training.compile: false (torchtitan's NVFP4 path is run compiled)
T017   error     nvfp4: a converted linear's local GEMM dimension (after TP sharding), or the tokens per micro-batch,
                 not a multiple of 128
T018   error     training.nvfp4_bf16_tail keeps every decoder block in bf16 (nothing to convert)
T019   warning   nvfp4 converts a smaller share of the training FLOPs than fp8 would (routed experts stay bf16)
T021   warning   fp8 with training.compile false on a backend that compiles: torchao's eager float8 casts (each step
                 its own kernel) cost far more than compiled ones; names the step with and without compile and in bf16
T040   warning   a peak LR (training.optimizer.lr, stages[].lr) below 1e-7 or above 0.1, at any model size (where T001 /
                 T101 do not already warn about it)
T041   warning   weight decay above 1
T042   warning   Adam eps above 1e-4, z_loss above 1e-3, grad_clip below 1e-3 or a MoE aux_loss_coef above 9
B001   error     predicted days > budget.max_days
B002   error     predicted cost > budget.max_usd, or GPU-hours > budget.max_gpu_hours
B003   error     budget impossible even at 60 % MFU (with the budget that would be needed)
B004   warning   the whole pipeline (every stage) predicted over budget.max_days / max_usd / max_gpu_hours
B005   warning   within budget.max_days / max_usd, but not with the unexpected interruptions expected at the published
                 rate (restarts, checkpoint reads, work redone: ``checkpoint_cost.interruptions``); or, budget or not,
                 each interruption losing more than the time between them (the run would never finish)
B006   error     budget.max_usd on a GPU without a price per GPU-hour (a custom GPU without a base part)
D001   error     data.tokens smaller than one optimizer step
D002   warning   a source is repeated more than 4 epochs (info above 1 epoch), of the tokens the run trains (training.steps
                 x the global batch when the steps are pinned, else data.tokens)
D003   info      effective mixture shares
D005   warning   training.steps x global batch and data.tokens disagree by more than 1% (the trainer runs the steps, and
                 the plan counts their tokens: training FLOPs, time and cost, the scaling numbers and checks, the epochs)
D006   warning   a tokenizer path that exists but holds no readable tokenizer.json (e.g. only tiktoken.model)
D007   error     a data source folder that holds files but none its format reads (e.g. .parquet files with the default
                 format jsonl): names what it holds and the ``format:`` (or text glob) that reads them
=====  ========  ==========================================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import NamedTuple

from llmc.compiler.units import GiB, gib, hours
from llmc.diagnostics import Diagnostic, line_for
from llmc.spec.schema import NVFP4_BF16_TAIL, RECORD_SOURCE_KINDS

MAX_PLAUSIBLE_MFU = 0.60  # above the best published large-run MFUs (PaLM 46 %, Chowdhery et al. 2022 Table 3)
BIG_PRETRAIN_PARAMS = 1e9  # T006 applies from 1B parameters (active)
LR_CHECK_MIN_PARAMS = 1e8  # T001's range is for LLM pre-training; toy models legitimately go higher
Z_LOSS_PARAMS = 30e9  # T007: suggest z-loss from ~30B (PaLM used it at 540B; OLMo/Chameleon for stability)
#: Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv:2305.16264): up to ~4
#: epochs of repeated data are almost as good as unique data.
MAX_EPOCHS = 4.0


def mixture_shares(sources) -> list[float]:
    """Each source's share of its mixture: its weight over the sum of the weights (spec weights are relative).
    The one place a share is computed: the data checks, the stage mix and the torchtitan job's loader use it."""
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


class Sink:
    """Collects diagnostics with the file and YAML lines filled in."""

    def __init__(self, lines: dict[str, int] | None, file: str | None):
        self.lines, self.file, self.items = lines or {}, file, []

    def add(self, code: str, severity: str, path: str, message: str, hint: str = "") -> None:
        self.items.append(Diagnostic(code, severity, path, message, hint, line_for(self.lines, path), self.file))


# ------------------------------------------------------------------------------------------- hardware


def check_gpu_names(hw, gpus: dict, sink: Sink, gpu=None) -> bool:
    """S007 for an unknown GPU key in the ``hardware`` section ``hw``; False when one was reported.
    ``gpu``: the table's part with the spec's overrides (a custom ``hardware.gpu`` they define is known)."""
    from llmc.compiler.hardware import get_gpu

    ov = hw.gpu_overrides
    for key, path, what in ((ov.base if ov is not None else None, "hardware.gpu_overrides.base", "base GPU type"),
                            (hw.gpu, "hardware.gpu", "GPU type")):
        if key is None or (gpu is not None and path == "hardware.gpu") or get_gpu(key) is not None:
            continue
        close = difflib.get_close_matches(key.lower(), sorted(gpus), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(gpus))}"
        sink.add("S007", "error", path, f"unknown {what} {key!r}", hint)
        return False
    return True


def check_gpu(run, gpus: dict, sink: Sink, gpu=None) -> None:
    """S007 for an unknown GPU key; T005 for fp8 on a part without fp8; T010 for mxfp8 before Blackwell.
    ``gpu``: the table's part with the spec's overrides (None = the table's)."""
    from llmc.compiler.hardware import get_gpu, supports

    if not check_gpu_names(run.hardware, gpus, sink, gpu):
        return
    g = gpu or get_gpu(run.hardware.gpu)
    if g is None:
        return
    if run.training.precision == "fp8" and not supports(g, "fp8"):
        sink.add("T005", "error", "training.precision", f"fp8 needs FP8 tensor cores; {g.name} has none",
                 "use bf16, or Hopper/Ada/Blackwell GPUs (h100-sxm, h200, b200)")
    elif run.training.precision == "nvfp4" and not supports(g, "nvfp4"):
        check_nvfp4_gpu(run, g, gpus, sink)
    else:
        check_mx(run, g, gpus, sink)


def check_nvfp4_gpu(run, g, gpus: dict, sink: Sink) -> None:
    """T014: ``precision: nvfp4`` on a part without FP4 tensor cores (no ``fp4_tflops`` in the hardware data:
    everything before Blackwell, SM 10.x; torchtitan's NVFP4LinearConverter refuses below SM 100)."""
    from llmc.compiler.hardware import supports

    fp4 = sorted(k for k, x in gpus.items() if supports(x, "nvfp4"))
    sink.add("T014", "error", "training.precision",
             f"nvfp4 needs FP4 tensor cores (Blackwell, SM 10.x); {g.name} has none",
             f"use bf16 or fp8, or {' / '.join(fp4)} (or hardware.gpu_overrides.fp4_tflops for a part the table "
             "lacks)")


def check_mx(run, g, gpus: dict, sink: Sink) -> None:
    """T010: ``fp8_recipe: mxfp8`` on a part whose tensor cores have no MX block scaling (hardware data)."""
    if run.training.precision == "fp8" and run.training.fp8_recipe == "mxfp8" and not g.mx_block_scaling:
        mx = sorted(k for k, x in gpus.items() if x.mx_block_scaling)
        sink.add("T010", "error", "training.fp8_recipe",
                 f"mxfp8 needs MX (block-scaled) fp8 tensor cores, Blackwell SM 10.x; {g.name} has none",
                 f"use fp8_recipe tensorwise or rowwise, or {' / '.join(mx)} (or hardware.gpu_overrides."
                 "mx_block_scaling for a part the table lacks)")


def check_offload_backend(run, backend, sink: Sink) -> None:
    """P017: offload asked of a backend whose job keeps every state on the GPU (llmc emits offload for DeepSpeed
    only), which the plan would size as offloaded."""
    par = run.parallelism
    if (par.offload_optimizer or par.offload_params) and "offload" not in backend.supports:
        what = "offload_params" if par.offload_params and not par.offload_optimizer else "offload_optimizer"
        sink.add("P017", "error", f"parallelism.{what}",
                 f"the {backend.name} backend does not offload: its job keeps the optimizer and parameters on the GPU",
                 "use training.backend: deepspeed (or auto, which picks it for offload), or drop the offload")


_DIM_WORDS = {"dp": "data parallelism", "fsdp": "FSDP", "hsdp": "HSDP (replicated shard groups)", "zero": "ZeRO",
              "tp": "tensor parallelism", "pp": "pipeline parallelism", "cp": "context parallelism",
              "ep": "expert parallelism", "offload": "CPU offload"}


#: What a backend's library ships for a dimension that llmc's runner for it does not use (P018 names it, so the
#: message is about llmc's runner, not the library)
_UNUSED = {("deepspeed", "cp"): "; DeepSpeed ships Ulysses sequence parallelism (deepspeed/runtime/sequence_parallel/"
                                "ulysses_sp.py), which llmc's DeepSpeed runner, llmc.runtime.ds_train, does not use"}


def _runs(backend) -> str:
    """What ``backend``'s runner implements, in words (:attr:`~llmc.compiler.backends.Backend.supports`)."""
    return ", ".join(_DIM_WORDS[d] for d in _DIM_WORDS if d in backend.supports)


def unrun_pins(run, backend) -> list[tuple[str, str, str]]:
    """(spec path, the pin as written, the dimension of ``Backend.supports`` it needs) for each parallelism pin the
    ``backend``'s runner does not implement: tp / pp / cp / ep above 1 (a pipeline schedule other than 1F1B or
    more than one chunk per rank needs pp), and dp_replicate above 1 where the data-parallel ranks would also shard
    (HSDP; a backend without it, DeepSpeed, shards ZeRO over every data-parallel rank). The search plans such a pin
    as written (``compile.backend_pins`` keeps it), so no job llmc builds would run that plan."""
    par, sup = run.parallelism, backend.supports
    out = []
    for dim in ("tp", "pp", "cp", "ep"):
        v = getattr(par, dim)
        if v is not None and v > 1 and dim not in sup:
            out.append((f"parallelism.{dim}", f"{dim} {v}", dim))
    if "pp" not in sup and (par.pp is None or par.pp == 1):
        if par.pp_schedule not in (None, "1F1B"):
            out.append(("parallelism.pp_schedule", f"pp_schedule {par.pp_schedule}", "pp"))
        elif par.pp_virtual_stages is not None and par.pp_virtual_stages > 1:
            out.append(("parallelism.pp_virtual_stages", f"pp_virtual_stages {par.pp_virtual_stages}", "pp"))
    rep = par.dp_replicate
    if rep is not None and rep > 1 and "hsdp" not in sup:
        # the shard group the search would give it: the pin, else what the other pins (or 1, where the backend runs
        # no such dimension and the search pins it so) leave of the world
        rest = 1
        for dim in ("tp", "pp", "cp"):
            rest *= getattr(par, dim) or 1
        shard = par.dp_shard if par.dp_shard is not None else run.hardware.count // max(1, rep * rest)
        if shard * (par.cp or 1) > 1:
            out.append(("parallelism.dp_replicate", f"dp_replicate {rep} (with dp_shard {shard})", "hsdp"))
    return out


def check_backend_pins(run, backend, why: str, sink: Sink, gaps=()) -> None:
    """P018: a pinned dimension the backend that runs the plan does not run (:func:`unrun_pins`). The search would
    plan it as pinned, with that backend's numbers, and no job llmc builds runs it (the native trainer's launch
    refuses a plan with PP / CP / EP; DeepSpeed's runner folds every GPU into data parallelism). ``why``: why the
    backend was chosen (``backends.resolve_backend``'s reason); ``gaps``: what keeps torchtitan off the model
    (``backends.torchtitan_model_gaps`` / ``torchtitan_seq_gaps``: :class:`~llmc.compiler.backends.ModelGap` or
    their messages), named in the hint where torchtitan would run the pin."""
    from llmc.compiler.backends import BACKENDS

    for path, pin, dim in unrun_pins(run, backend):
        others = [n for n, be in BACKENDS.items() if be.runnable and dim in be.supports]
        drop = f"drop {path}"
        if run.training.backend != "auto":
            fix = f"set training.backend to {' or '.join(others)}, or {drop}" if others else drop[0].upper() + drop[1:]
        elif "torchtitan" in others and gaps:
            g = gaps[0]
            msg, hint = (g.message, g.hint) if hasattr(g, "message") else (str(g), "")
            fix = (f"{drop}, or let auto pick torchtitan, which runs {_DIM_WORDS[dim]}, by removing what rules it out "
                   f"({hint or msg})")
        elif "torchtitan" in others and (run.parallelism.offload_optimizer or run.parallelism.offload_params):
            fix = f"{drop}, or drop the offload (auto then picks torchtitan, which runs {_DIM_WORDS[dim]})"
        else:
            fix = drop + (f" (only {' / '.join(others)} run {_DIM_WORDS[dim]})" if others else "")
        sink.add("P018", "error", path,
                 f"the pinned {pin} needs {_DIM_WORDS[dim]}, which the {backend.name} backend does not run (llmc's "
                 f"{backend.name} runner runs {_runs(backend)}{_UNUSED.get((backend.name, dim), '')}): no job llmc "
                 "builds would run this plan; "
                 f"backend {backend.name}: {why}", fix)


def check_zero_pin(run, backend, sink: Sink) -> None:
    """P021 (info): ``parallelism.zero_stage: 1`` on a backend that shards with FSDP2 (``Backend.zero12 == "fsdp2"``:
    torchtitan's job, llmc's native trainer), which cannot express ZeRO-1: when it shards at all, fully_shard
    reduce-scatters every gradient to its shard (torchtitan docs/fsdp.md, https://github.com/pytorch/torchtitan/blob/
    main/docs/fsdp.md: 1D mesh + reshard_after_forward=False = FSDP1 SHARD_GRAD_OP = ZeRO-2; PyTorch's
    ShardingStrategy.SHARD_GRAD_OP, https://pytorch.org/docs/stable/fsdp.html: "Gradients and optimizer states are
    sharded during computation"). The job runs, and the plan is sized, timed and named as, ZeRO-2: the search takes
    the pin as stage 2 (:func:`llmc.compiler.search.zero_stages`), so the plan, the lock and the emitted jobs are
    those of ``zero_stage: 2``; llmc's DeepSpeed runner runs the pin as ZeRO-1."""
    if run.parallelism.zero_stage != 1 or backend.zero12 != "fsdp2":
        return
    sink.add("P021", "info", "parallelism.zero_stage",
             f"zero_stage 1 on {backend.name} runs as ZeRO-2, and the plan says so (zero2): FSDP2 shards the gradients "
             "with the optimizer states (fully_shard reduce-scatters every gradient; its reshard_after_forward=False, "
             "what llmc runs for ZeRO-1/2, is FSDP1's SHARD_GRAD_OP, ZeRO-2), so the plan is sized, timed and built as "
             f"ZeRO-2: the same {backend.name} job as zero_stage 2",
             "pin zero_stage 2, what runs (ZeRO-1 itself: training.backend deepspeed)")


def check_backend_options(run, backend, sink: Sink) -> None:
    """T013: a training option the spec sets that the backend which will run the plan does not apply (the plan is
    timed without it: ``backends.compile_on``), said at plan time rather than in a comment of the job."""
    from llmc.compiler.backends import BACKENDS

    def applies(be, key: str) -> bool:
        return be.can_compile if key == "compile" else key in be.applies

    tr = run.training
    if backend.name == "torchtitan":  # X321: a checkpoint setting torchtitan's job would refuse as it loads
        from llmc.compiler.backends import torchtitan_keep_latest_gap

        if (g := torchtitan_keep_latest_gap(tr.checkpoint.keep_latest)) is not None:
            sink.add(g.code, "error", g.path, g.message, g.hint)
    asked = [("compile", "torch.compile", tr.compile is True),
             ("z_loss", "z-loss", tr.z_loss > 0), ("loss_spike", "loss-spike rewind", tr.loss_spike.enabled)]
    for key, what, on in asked:
        if on and not applies(backend, key):
            others = [n for n, be in BACKENDS.items() if n != backend.name and be.runnable and applies(be, key)]
            sink.add("T013", "warning", f"training.{key}",
                     f"the {backend.name} backend, which runs this plan, does not apply {what} (planned and run "
                     "without it)", f"set training.backend to one that does ({' or '.join(others)}), or drop it")


def check_fp8_recipe(run, backend, sink: Sink) -> None:
    """T011: the spec pins an fp8 recipe the backend that will run the plan does not execute (a backend that
    trains fp8 specs in bf16 runs no recipe, and the plan's precision line says so); T012: a recipe on a run
    that is not fp8 at all."""
    recipe = run.training.fp8_recipe
    if recipe and run.training.precision != "fp8":
        sink.add("T012", "warning", "training.fp8_recipe",
                 f"fp8_recipe {recipe} has no effect: training.precision is {run.training.precision}",
                 "set training.precision: fp8 to train the linears in fp8, or drop fp8_recipe")
    if run.training.precision == "fp8" and recipe and backend.fp8_recipes and recipe not in backend.fp8_recipes:
        sink.add("T011", "error", "training.fp8_recipe",
                 f"the {backend.name} backend does not run the {recipe} fp8 recipe "
                 f"(it runs {', '.join(sorted(backend.fp8_recipes))})",
                 f"use fp8_recipe {' or '.join(sorted(backend.fp8_recipes))}, or another training.backend")


def check_fp8_eager(run, backend, plan, sm, step_model, sink: Sink) -> bool:
    """T021: an fp8 run with ``training.compile: false`` on a backend that compiles, whose fp8 casts run eagerly as
    separate kernels (``Backend.fp8_eager_casts``: torchao float8's abs, amax, scale, fp32 upcast, multiply, clamp and
    fp8 conversion, each over the whole tensor, and every tensor cast anew in the backward; backends.EAGER_FLOAT8).
    torchtitan's float8 MoE and MX converters warn alike ("Compile is required for high performance float8 MoE
    training"), and pytorch/ao#685 measures eager float8 slower than 16-bit. Names the plan's step (``sm``, timed
    eager), the same layout's with compile and in bf16 without it (``step_model(precision, compile)`` builds the
    other step models), and the cast bytes per element eager and compiled. Returns True when it applies: the
    caller then skips T020 (this message names the bf16 step too, so one message covers the situation)."""
    from llmc.compiler import timing
    from llmc.compiler.backends import compile_on, lowp_recipe
    from llmc.compiler.search import describe

    tr = run.training
    if tr.precision != "fp8" or not backend.can_compile or compile_on(backend, tr.compile) or not sm.fp8_peak:
        return False
    recipe = lowp_recipe(backend, "fp8", tr.fp8_recipe)
    eager = backend.fp8_eager_casts.get(recipe)
    if eager is None:
        return False
    step = timing.step_time(sm, plan)[0]
    compiled = timing.step_time(step_model("fp8", True), plan)[0]
    bf16 = timing.step_time(step_model("bf16", False), plan)[0]
    fused = backend.fp8_cast_bytes.get(recipe, 0.0)
    weight = backend.fp8_weight_cast_bytes.get(recipe, 0.0)
    act = (f"{eager.input:g} B per input or gradient element" if eager.input == eager.grad_output
           else f"{eager.input:g} B per input element, {eager.grad_output:g} per gradient")
    slower = "; not faster than bf16" if step >= bf16 else ""
    sink.add("T021", "warning", "training.compile",
             f"fp8 without torch.compile: torchao's {recipe} float8 casts run eagerly, {eager.kernels} separate "
             f"kernels per cast, each over the whole tensor ({act}, {eager.weight:g} per weight element and "
             f"micro-batch, against {fused:g} and {weight:g} B compiled): predicted {step:.2f} s per step against "
             f"{compiled:.2f} s with compile on the same layout ({describe(plan)}), {bf16:.2f} s in bf16 without "
             f"compile{slower}",
             "set training.compile: true (torchtitan compiles by default), or train in bf16")
    return True


def check_nvfp4(run, backend, compiled: bool, sink: Sink, why: str = "") -> None:
    """An nvfp4 run the backend that will run the plan cannot train (T015: only llmc's torchtitan job converts
    linears to NVFP4; the native trainer and the DeepSpeed runner would not), or with torch.compile turned off (T016:
    torchtitan's NVFP4 configs compile the model for the quantization kernels' speed, and llmc times it compiled), or
    whose bf16 tail leaves no block to convert (T018: torchtitan's ``nvfp4_bf16_tail_fqns`` raises); T017 for a
    pinned ``parallelism.tp`` that leaves a converted linear's local dimension unaligned (:func:`check_nvfp4_layout`).
    """
    from llmc.compiler.backends import BACKENDS, nvfp4_converted_layers

    tr = run.training
    if tr.precision != "nvfp4":
        return
    if not backend.nvfp4_parts:
        runs = [n for n, be in BACKENDS.items() if be.runnable and be.nvfp4_parts]
        sink.add("T015", "error", "training.backend",
                 f"nvfp4 trains on {' / '.join(runs)} only (torchtitan's NVFP4LinearConverter, torchao's "
                 f"nvfp4_training kernels); the {backend.name} backend, which would run this plan"
                 + (f" ({why})" if why else "") + ", does not",
                 f"set training.backend: {runs[0]} (it needs GPUs and no optimizer offload), or use bf16 / fp8")
        return
    if backend.name == "torchtitan" and not compiled and backend.can_compile:
        sink.add("T016", "error", "training.compile",
                 "nvfp4 on torchtitan runs compiled (its NVFP4 configs enable torch.compile: the NVFP4LinearConverter "
                 "needs model_compile_enabled for competitive speed); training.compile is false",
                 "drop training.compile: false (torchtitan compiles by default), or use bf16 / fp8")
    n = run.model.n_layers
    if nvfp4_converted_layers(n, tr.nvfp4_bf16_tail) <= 0:
        sink.add("T018", "error", "training.nvfp4_bf16_tail",
                 f"nvfp4_bf16_tail {tr.nvfp4_bf16_tail:g} keeps all {n} decoder blocks in bf16 "
                 f"(ceil({n} x {tr.nvfp4_bf16_tail:g}) = {n - nvfp4_converted_layers(n, tr.nvfp4_bf16_tail)}): "
                 "nothing to convert to NVFP4", f"use a smaller nvfp4_bf16_tail (default {NVFP4_BF16_TAIL:g}), or precision bf16")
        return
    _check_nvfp4_share(run, backend, sink)
    if run.parallelism.tp is not None:
        check_nvfp4_layout(run, backend, run.parallelism.tp, None, sink, pinned=True)


def _check_nvfp4_share(run, backend, sink: Sink) -> None:
    """T019: the training FLOPs an nvfp4 run converts (its parts in the blocks before the tail,
    ``flops.linear_share``) against what fp8 converts on the same backend (every block; the routed experts too where
    its grouped-GEMM converter runs them): an MoE whose experts hold most FLOPs converts less in NVFP4 and may train
    slower than in fp8, despite the higher peak."""
    from llmc.compiler.backends import (
        converted_parts,
        fp8_converted_parts,
        fp8_recipe_on,
        nvfp4_converted_layers,
    )
    from llmc.compiler.flops import linear_share

    arch, n, seq = run.model, run.model.n_layers, _pre(run)[0].seq_len
    nv = linear_share(arch, seq, converted_parts(backend, arch, "nvfp4")) * nvfp4_converted_layers(
        n, run.training.nvfp4_bf16_tail) / n
    f8 = linear_share(arch, seq, fp8_converted_parts(backend, arch, fp8_recipe_on(backend, None)))
    if nv < f8 and "experts" not in converted_parts(backend, arch, "nvfp4") and arch.moe is not None:
        sink.add("T019", "warning", "training.precision",
                 f"nvfp4 converts {100 * nv:.0f}% of the training FLOPs (no routed expert: {backend.name} has no "
                 f"NVFP4 converter for their grouped GEMMs), fp8 {100 * f8:.0f}% (the experts included): the fp8 "
                 "plan may be faster", "compare with --set training.precision=fp8")


def check_nvfp4_layout(run, backend, tp: int, tokens: int | None, sink: Sink, *, pinned: bool) -> None:
    """T017: torchao's NVFP4 GEMMs need every local dimension a multiple of 128 (backends.NVFP4_GEMM_ALIGN): each
    converted linear's in / out features after tensor parallelism (column-parallel ones split out_features over tp,
    row-parallel ones in_features; backends.nvfp4_linear_dims) and the GEMM's rows, the micro-batch's ``tokens`` on
    a rank (None: not known yet). ``pinned``: ``tp`` is the spec's (else the plan's)."""
    from llmc.compiler.backends import NVFP4_GEMM_ALIGN, converted_parts, nvfp4_linear_dims, nvfp4_misaligned

    if run.training.precision != "nvfp4" or not backend.nvfp4_parts:
        return
    arch = run.model
    parts = converted_parts(backend, arch, "nvfp4")
    bad = nvfp4_misaligned(arch, parts, tp)
    where = "parallelism.tp" if pinned else "training.precision"
    by = "pinned" if pinned else "the plan's"
    if bad is not None:
        name, k, n, style, dim = bad
        fits = [t for t in (1, 2, 4, 8) if nvfp4_misaligned(arch, parts, t) is None and arch.n_heads % t == 0]
        split = {"colwise": f"out_features / tp = {n} / {tp}", "rowwise": f"in_features / tp = {k} / {tp}"}.get(
            style, "not split")
        sink.add("T017", "error", where,
                 f"nvfp4: {name} ({k} -> {n}, {style}) has a local dimension of {dim:g} at {by} tp {tp} "
                 f"({split}), not a multiple of {NVFP4_GEMM_ALIGN} (torchao's NVFP4 GEMM)",
                 (f"pin parallelism.tp to {' or '.join(map(str, fits))}" if fits else
                  "no tp aligns this model's linears: keep it in bf16 (precision bf16 or fp8)")
                 + f"; the converted linears: {', '.join(x[0] for x in nvfp4_linear_dims(arch, parts))}")
        return
    if tokens is not None and tokens % NVFP4_GEMM_ALIGN:
        sink.add("T017", "error", "data.seq_len",
                 f"nvfp4: {tokens} tokens per micro-batch on a rank (micro_batch x seq_len / cp) is not a multiple of "
                 f"{NVFP4_GEMM_ALIGN} (the rows of torchao's NVFP4 GEMM)",
                 f"use a seq_len that is a multiple of {NVFP4_GEMM_ALIGN} x cp")


def check_cluster(run, gpu, sink: Sink) -> bool:
    """P008/P009 on the cluster shape (``gpu`` with the spec's overrides applied); False on an error.

    Launchers start ``gpus_per_node`` ranks on each of ``count / gpus_per_node`` nodes, so a count
    that spans nodes must fill them exactly or the job would start more ranks than the plan has.
    """
    n, gpn = run.hardware.count, gpu.gpus_per_node
    ok = True
    if gpu.key == "cpu" and gpn != 1:
        sink.add("P009", "error", "hardware.gpus_per_node",
                 f"the cpu pseudo-device is one process per node (got gpus_per_node {gpn})",
                 "remove gpus_per_node; hardware.count is the number of CPU processes")
        return False
    if gpu.nvlink_gbps <= 0 and getattr(gpu, "pcie_gbps", 0.0) <= 0 and min(n, gpn) > 1:
        # the step-time model prices intra-node collectives at NVLink, else PCIe bandwidth (timing.intra_node_gbps)
        sink.add("P010", "error", "hardware.gpus_per_node",
                 f"{gpu.name} has no intra-node link bandwidth (neither NVLink nor PCIe) in the hardware table, "
                 f"so {min(n, gpn)} GPUs per node cannot be timed",
                 "set hardware.gpus_per_node: 1 to plan every GPU as its own node (network-bound)")
        ok = False
    if n > gpn and n % gpn:
        lo, hi = n // gpn * gpn, -(-n // gpn) * gpn
        sink.add("P008", "error", "hardware.count",
                 f"{n} GPUs is not a whole number of {gpn}-GPU nodes",
                 f"use {lo} ({lo // gpn} node{'s' if lo // gpn > 1 else ''}) or {hi} ({hi // gpn} nodes), or set hardware.gpus_per_node")
        ok = False
    return ok


# ------------------------------------------------------------------------------------------- pins


def check_pins(run, gpu, sink: Sink) -> None:
    """P001/P002/P003/P007 on the spec's parallelism pins (before searching)."""
    par, arch = run.parallelism, run.model
    world = run.hardware.count
    gpn = gpu.gpus_per_node
    dims = {k: getattr(par, k) for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp")}
    pinned = {k: v for k, v in dims.items() if v is not None}
    prod = 1
    for v in pinned.values():
        prod *= v
    expr = " x ".join(f"{k} {v}" for k, v in pinned.items())
    if pinned and (len(pinned) == len(dims) or prod > world) and prod != world:
        sink.add("P001", "error", "parallelism", f"{expr} = {prod} != {world} GPUs (hardware.count)",
                 "the product of dp_replicate, dp_shard, cp, tp and pp must equal the world size; "
                 "unpin one degree and llmc derives it")
    elif pinned and world % prod:
        sink.add("P001", "error", "parallelism", f"{expr} = {prod} does not divide {world} GPUs (hardware.count)",
                 "pinned degrees must multiply to a divisor of the world size")
    if par.tp is not None:
        from llmc.compiler.hardware import nvlink_group

        dom = nvlink_group(gpu)  # the node, or an NVL72 rack's 72 GPUs: where a TP group may reach
        where, leave = ((f"{dom} GPUs per NVLink domain", "its NVLink domain") if dom != gpn else
                        (f"{gpn} GPUs per node", "the node"))
        if par.tp > dom:
            sink.add("P002", "error", "parallelism.tp", f"tp {par.tp} > {where}: TP would leave {leave}",
                     f"keep tp <= {dom} (TP needs NVLink); use pp or FSDP across nodes")
        elif dom % par.tp:
            sink.add("P002", "error", "parallelism.tp", f"tp {par.tp} does not divide {where}",
                     f"a TP group would straddle {leave}'s edge; use a divisor of {dom}")
        heads = arch.n_heads
        kv = arch.n_heads if arch.mla is not None else arch.kv_heads
        if heads % par.tp or kv % par.tp:
            bad = f"n_heads {heads}" if heads % par.tp else f"n_kv_heads {kv}"
            sink.add("P003", "error", "parallelism.tp", f"{bad} not divisible by tp {par.tp}",
                     f"choose tp from {[t for t in range(1, dom + 1) if dom % t == 0 and heads % t == 0 and kv % t == 0]}")
    if par.pp is not None and par.pp > arch.n_layers:
        sink.add("P001", "error", "parallelism.pp", f"pp {par.pp} > {arch.n_layers} layers",
                 "each pipeline stage needs at least one block")
    if par.offload_params and not par.offload_optimizer:
        sink.add("P015", "error", "parallelism.offload_params", "offload_params without offload_optimizer",
                 "set offload_optimizer: true too (DeepSpeed ZeRO-Infinity keeps the optimizer on the host with the "
                 "parameters)")
    elif par.offload_params and par.zero_stage not in (None, 3):
        sink.add("P015", "error", "parallelism.offload_params",
                 f"offload_params with zero_stage {par.zero_stage}: only ZeRO-3 partitions the parameters",
                 "pin zero_stage 3 or leave it unset")
    elif par.offload_optimizer and par.zero_stage == 0:  # DeepSpeed offloads the ZeRO optimizer's partitions only
        sink.add("P015", "error", "parallelism.offload_optimizer",
                 "offload_optimizer with zero_stage 0: DeepSpeed offloads the ZeRO optimizer's state, which stage 0 "
                 "does not have (deepspeed/runtime/zero/offload_config.py: ZeRO stages 1-3)",
                 "pin zero_stage 1, 2 or 3, or leave it unset")
    v = par.pp_virtual_stages
    if v is not None:
        need = {"1F1B": 1, "GPipe": 1, "ZBVZeroBubble": 2}.get(par.pp_schedule or "")
        if need is not None and v != need:
            sink.add("P014", "error", "parallelism.pp_virtual_stages",
                     f"pp_virtual_stages {v} with pp_schedule {par.pp_schedule}, which runs {need} chunk(s) per rank",
                     f"use Interleaved1F1B for {v} chunks per rank, or pp_virtual_stages {need}")
        elif par.pp == 1 and v > 1:
            sink.add("P014", "error", "parallelism.pp_virtual_stages", f"pp_virtual_stages {v} without a pipeline (pp 1)",
                     "set pp > 1, or remove pp_virtual_stages")
        elif par.pp is not None and par.pp * v > arch.n_layers + 2:
            sink.add("P014", "error", "parallelism.pp_virtual_stages",
                     f"pp {par.pp} x {v} chunks = {par.pp * v} > {arch.n_layers} layers + 2",
                     "every chunk needs a block, except a first one of only the embedding and a last one of only "
                     f"the norm and head: at most {(arch.n_layers + 2) // par.pp} chunks per rank")
    if par.ac_layers is not None and par.activation_checkpointing != "partial":
        mode = par.activation_checkpointing or "unset (searched)"
        sink.add("P012", "error", "parallelism.ac_layers",
                 f"ac_layers {par.ac_layers} with activation_checkpointing {mode}: only partial recomputation reads it",
                 "set activation_checkpointing: partial, or remove ac_layers")
    elif par.ac_layers is not None and par.ac_layers > arch.n_layers:
        # ac_layers counts blocks per pipeline model chunk (the whole model without pp): no chunk holds more than the
        # model's blocks, so a larger count is no layout's (as pp > n_layers, P001)
        sink.add("P012", "error", "parallelism.ac_layers",
                 f"ac_layers {par.ac_layers} > {arch.n_layers} layers: it counts the blocks recomputed per pipeline "
                 f"model chunk (the whole model without pp), and no chunk has more than the model's {arch.n_layers}",
                 f"use fewer than the largest chunk's blocks (at most {arch.n_layers - 1} without pp), "
                 "or activation_checkpointing: full to recompute every block")
    if par.ep is not None and par.ep > 1:
        if arch.moe is None:
            sink.add("P007", "error", "parallelism.ep", f"ep {par.ep} on a dense model", "remove ep (MoE only)")
        elif arch.moe.num_experts % par.ep:
            sink.add("P007", "error", "parallelism.ep",
                     f"ep {par.ep} does not divide num_experts {arch.moe.num_experts}",
                     "ep must divide the number of routed experts")
        elif world % par.ep:
            # an EP group is ep of the dp_shard x cp x tp ranks (torchtitan 0.3.0's expert mesh: efsdp x ep =
            # dp_shard x cp x tp, parallel_dims.py; plan.ep_domain), which divide the world
            sink.add("P007", "error", "parallelism.ep", f"ep {par.ep} does not divide the {world} GPUs (hardware.count)",
                     "ep must divide dp_shard x cp x tp (torchtitan's expert mesh), a divisor of the GPU count")


def check_search(run, res, gpu, global_batch_seqs: int, sink: Sink) -> None:
    """P004 (nothing fits), P005 (batch identity impossible), P006 (bubble), P013 (partial AC = full) from a search
    result."""
    if res.best is None:
        counts = res.rejected_counts
        if res.batch_blocked or ("batch" in counts and "memory" not in counts):
            _check_batch_split(run, res, gpu, global_batch_seqs, sink)
        elif res.closest is not None:
            c = res.closest
            from llmc.compiler.search import describe, usable_bytes

            usable = usable_bytes(gpu.hbm_bytes, res.backend)  # what the fit check compares against
            hints = _p004_hints(run, res, gpu, global_batch_seqs, usable)
            sink.add("P004", "error", "hardware",
                     f"no parallelism plan fits in {gib(gpu.hbm_bytes)} per GPU"
                     + (f" ({gib(usable)} usable)" if usable < gpu.hbm_bytes else "") + ": the closest, "
                     f"{describe(c.plan)}, needs {gib(c.per_gpu_bytes)}",
                     hints)
        elif (cp_seq := _cp_seq_problem(run, gpu)) is not None:
            sink.add("P004", "error", "data.seq_len", "no valid parallelism plan: " + cp_seq[0], cp_seq[1])
        else:
            reasons = sorted({c.reason for c in res.rejected})[:3]
            # every layout rejected for a sequence torchtitan cannot split (the search's "seq" category:
            # backends.torchtitan_layout_problem)
            seq_only = set(res.rejected_counts) == {"seq"}
            sink.add("P004", "error", "data.seq_len" if seq_only else "parallelism",
                     "no valid parallelism plan: " + "; ".join(reasons),
                     "use a seq_len torchtitan can split (see above), or training.backend native" if seq_only else
                     "relax the parallelism pins")
        return
    p = res.best.plan
    from llmc.compiler.search import BUBBLE_MICROS_PER_STAGE, bubble_fraction, bubble_warning

    if bubble_warning(p):
        bubble = bubble_fraction(p)
        sink.add("P006", "warning", "parallelism.pp",
                 f"{p.grad_accum} micro-batches for {p.pp} pipeline stages ({p.pp_schedule}): "
                 f"bubble ~{100 * bubble:.0f}% of pipeline time (Narayanan et al. 2021: (p-1)/(v*m+p-1))",
                 f"m >= {BUBBLE_MICROS_PER_STAGE} x pp = {BUBBLE_MICROS_PER_STAGE * p.pp} keeps it under ~20%: "
                 "raise the global batch or lower pp")
    if p.activation_checkpointing == "partial":
        from llmc.compiler.memory import max_chunk_layers

        top = max_chunk_layers(run.model.n_layers, p.pp, p.pp_schedule, p.pp_virtual_stages)
        if p.ac_layers >= top:
            where = "block of the model" if p.pp == 1 else f"block of every pipeline chunk (the largest has {top})"
            sink.add("P013", "warning", "parallelism.ac_layers",
                     f"ac_layers {p.ac_layers} recomputes every {where}: the same as activation_checkpointing full",
                     f"use full, or fewer than {top} blocks (unset ac_layers: the fewest that fit)")


#: P004 offers a hint other than more GPUs (which must fit) only where it saves at least this share of what the
#: closest layout needs beyond the usable memory; each hint names the memory it would leave
P004_HINT_SHARE = 0.25


class _Hint(NamedTuple):
    """One of P004's hints: its words (those that quote a need end in ")"), whether the change alone fits (None: not
    evaluated) and the usable memory it is compared with (the backend it moves to may keep another share)."""
    text: str
    fits: bool | None
    usable: float = 0.0


def _hint_list(hints: list[_Hint]) -> list[str]:
    """P004's hints in order: those that fit on their own first, then those not evaluated, then those that help but do
    not fit on their own, each of these saying that it is still over the usable memory."""
    out = [h.text for h in hints if h.fits] + [h.text for h in hints if h.fits is None]
    for h in hints:
        if h.fits is False:  # (inside the parentheses that quote its need)
            note = f"still over the {gib(h.usable)} usable: combine it with another change"
            out.append(f"{h.text[:-1]}, {note})" if h.text.endswith(")") else f"{h.text} ({note})")
    return out


def _p004_hints(run, res, gpu, seqs: int, usable: float) -> str:
    """P004's hint: what would bring the closest layout (``res.closest``) under ``usable``, each change evaluated on
    the memory model (:func:`llmc.compiler.memory.memory_per_gpu`, with the run's settings as the search's memory
    function binds them) and offered only where it helps: more GPUs where a larger shard group fits (how many),
    another value of each pinned degree (the nearest that fits, else the one that saves the most), CPU offload where
    the backend that offloads runs the pinned layout (P018's rule, :func:`unrun_pins`), a shorter seq_len, a GPU of
    the table with the memory; all but more GPUs when they save at least :data:`P004_HINT_SHARE` of the excess.
    Those that fit on their own come first; one that does not says it is still over the usable memory
    (:func:`_hint_list`). A calibration's memory factors (which this check does not see) are carried over as the
    closest's ratio to the uncalibrated model on the same backend."""
    from llmc.compiler import memory

    data, training = _pre(run)
    c = res.closest

    def raw(plan, backend, seq_len, offload) -> float:
        try:
            return memory.memory_per_gpu(run.model, plan, seq_len, training.precision, gpu.hbm_bytes,
                                         offload_optimizer=offload[0], offload_params=offload[1], backend=backend,
                                         compile=run.training.compile, per_stage=False).per_gpu_bytes
        except ValueError:  # a combination the memory model refuses (offload_params without ZeRO-3)
            return math.inf

    par = run.parallelism
    own = (par.offload_optimizer, par.offload_params)
    base = raw(c.plan, res.backend, data.seq_len, own)
    scale = c.per_gpu_bytes / base if 0 < base < math.inf else 1.0  # 1 uncalibrated

    def need(plan, backend=res.backend, seq_len=data.seq_len, offload=own) -> float:
        return raw(plan, backend, seq_len, offload) * (scale if backend == res.backend else 1.0)

    helps = c.per_gpu_bytes - P004_HINT_SHARE * (c.per_gpu_bytes - usable)  # a hint must get below this
    hints: list[_Hint] = []
    if (cp_hint := _cp_unavailable_hint(run, gpu, res.backend)) is not None:
        hints.append(_Hint(cp_hint, True))  # without CP more GPUs never split one sequence (a CP layout that fits)
    elif (more := _more_gpus_hint(run, gpu, c.plan, seqs, need, usable, res.backend)) is not None:
        hints.append(more)
    hints += _pin_hints(run, gpu, c.plan, seqs, need, usable, helps, res.backend)
    if (off := _offload_hint(run, c.plan, seqs, need, helps, gpu.hbm_bytes)) is not None:
        hints.append(off)
    seq = data.seq_len
    if seq > 2048 and seq % 2 == 0:
        from llmc.compiler.defaults import pretrain_batch_seqs

        half = _relayout(run, c.plan, run.hardware.count, pretrain_batch_seqs(run, gpu, seq // 2, training)[0],
                         res.backend)
        n = _least(run, half, lambda q: need(q, seq_len=seq // 2), res.backend) if half is not None else \
            (math.inf, None)
        if n[0] <= helps:
            hints.append(_Hint(f"a shorter seq_len than {seq} ({seq // 2:,}: about {gib(n[0])} per GPU)",
                               n[0] <= usable, usable))
    from llmc.compiler.hardware import GPUS, nvlink_group, supports
    from llmc.compiler.search import usable_bytes

    bigger = sorted((g for g in GPUS.values() if g.key != "cpu" and g.hbm_bytes > gpu.hbm_bytes
                     and usable_bytes(g.hbm_bytes, res.backend) >= c.per_gpu_bytes
                     and supports(g, training.precision) and nvlink_group(g) >= c.plan.tp),
                    key=lambda g: (g.hbm_bytes, g.key))
    if bigger:  # (its usable memory holds the closest layout's)
        hints.append(_Hint(f"a GPU with more memory ({bigger[0].key}: {gib(bigger[0].hbm_bytes)})", True))
    if not hints:
        return ("no single change llmc evaluates (more GPUs, another value of a pinned degree, CPU offload, a shorter "
                "seq_len, a GPU of its table) gets it under the usable memory: a smaller model, or several at once")
    return "try " + "; ".join(_hint_list(hints))


def _batch_split(p, dp: int, seqs: int) -> int | None:
    """Micro-steps of ``p``'s micro-batch when ``seqs`` sequences per step split over ``dp`` data-parallel ranks, as
    the search splits a batch (:func:`llmc.compiler.search.micro_steps`); None where they do not split."""
    from llmc.compiler.search import micro_steps

    per_dp, r = divmod(seqs, dp)
    return None if r else micro_steps(per_dp, p.micro_batch, p.pp, p.pp_schedule)


def _least(run, plan, need, backend: str, offload: bool | None = None) -> tuple[float, object]:
    """(least need, its plan) of ``plan`` over the ZeRO stages the search would try for its shard group on
    ``backend`` (:func:`llmc.compiler.search.zero_stages`, less ZeRO-0 with a shard group, which it rejects);
    ``offload``: whether the optimizer is offloaded, default the spec's; (inf, None) where none applies."""
    from llmc.compiler.search import zero_stages

    par = run.parallelism
    shard = plan.dp_shard * plan.cp
    zs = [z for z in zero_stages(par.zero_stage, shard, bool(par.offload_optimizer if offload is None else offload),
                                 backend) if not (z == 0 and shard > 1)]
    return min(((need(dataclasses.replace(plan, zero_stage=z)), dataclasses.replace(plan, zero_stage=z))
                for z in zs), default=(math.inf, None), key=lambda t: t[0])


def _relayout(run, p, world: int, seqs: int, backend: str, **changes):
    """``p`` with ``changes`` on ``world`` GPUs and a batch of ``seqs`` sequences: the data-parallel ranks
    rebalanced around the pins (all sharding where neither dp_shard nor dp_replicate is pinned: the least memory),
    a pipeline schedule the pins allow, the micro-steps of the batch; None where the batch does not split, the pins
    leave no data-parallel split, or EP does not divide its domain."""
    from llmc.compiler.plan import ep_domain
    from llmc.compiler.search import _schedules

    par = run.parallelism
    q = dataclasses.replace(p, **changes)
    rest = q.tp * q.pp * q.cp
    if world % rest:
        return None
    dp = world // rest
    if "dp_shard" not in changes:
        ds, dr = par.dp_shard, par.dp_replicate
        if ds is None and dr is None:
            ds, dr = dp, 1
        elif ds is None:
            ds = dp // dr
        elif dr is None:
            dr = dp // ds
        q = dataclasses.replace(q, dp_shard=ds, dp_replicate=dr)
    if q.dp_shard * q.dp_replicate != dp or min(q.dp_shard, q.dp_replicate) < 1:
        return None
    if "pp_schedule" not in changes:
        scheds = _schedules(q.pp, run.model.n_layers, par)
        if not scheds:
            return None
        if (q.pp_schedule, q.pp_virtual_stages) not in scheds:
            q = dataclasses.replace(q, pp_schedule=scheds[0][0], pp_virtual_stages=scheds[0][1])
    if q.ep > 1 and ep_domain(q.dp_shard, q.cp, q.tp, backend) % q.ep:
        return None
    m = _batch_split(q, dp, seqs)
    return None if m is None else dataclasses.replace(q, grad_accum=m)


def _more_gpus_hint(run, gpu, p, seqs: int, need, usable: float, backend: str) -> _Hint | None:
    """"more GPUs" where a larger shard group fits: the closest layout ``p`` (and, where pp is not pinned, ``p``
    without its pipeline, whose stages torchtitan keeps unsharded) with its data-parallel ranks doubled until the
    memory model (``need``) fits it (the memory of a larger shard group never rises, so the first fit is the fewest
    GPUs), up to the schema's largest count; with the global batch it takes where the spec's does not split over
    them. None where the shard group is pinned or no count fits (what more data parallelism does not shrink: an
    unsharded pipeline stage, activations, buffers)."""
    from llmc.compiler.defaults import pretrain_batch_seqs
    from llmc.compiler.search import describe
    from llmc.spec.schema import MAX_GPUS

    par, world, gpn = run.parallelism, run.hardware.count, gpu.gpus_per_node
    data, training = _pre(run)
    seq = data.seq_len
    if par.dp_shard is not None:
        # more GPUs keep the pinned shard group: they shrink the memory only through tp / pp / cp grown on them,
        # which this hint does not evaluate (the search does, at the count it is given)
        from llmc.compiler.backends import get_backend

        runs = get_backend(backend).supports  # (the degrees the backend runs: DeepSpeed folds none of them in)
        free = [d for d in ("tp", "pp", "cp") if getattr(par, d) is None and d in runs]
        return _Hint(f"more GPUs (hardware.count {2 * world:,}, ...: with dp_shard pinned at {par.dp_shard}, the "
                     f"search can use them only for {' / '.join(free)}, not evaluated here)", None) if free else None
    dr = par.dp_replicate or 1
    bases = [p]
    if par.pp is None and p.pp > 1 and par.pp_schedule in (None, "1F1B") and par.pp_virtual_stages in (None, 1):
        bases.append(dataclasses.replace(p, pp=1, pp_schedule="1F1B", pp_virtual_stages=1))
    k = 2
    while world * k <= MAX_GPUS:
        w = world * k
        k *= 2
        if w > gpn and w % gpn:
            continue  # P008: whole nodes
        # the batch at that count: the spec's, or llmc's default for it (which grows with the data-parallel ranks)
        at_w = seqs if training.global_batch_tokens is not None else pretrain_batch_seqs(
            run.model_copy(update={"hardware": run.hardware.model_copy(update={"count": w})}), gpu, seq, training)[0]
        for b in bases:
            ds, r = divmod(w, dr * b.tp * b.pp * b.cp)
            if r:
                continue
            q = dataclasses.replace(b, dp_shard=ds, dp_replicate=dr)
            m = _batch_split(q, ds * dr, at_w)
            least = None
            if m is None:  # the fewest sequences that split: pp micro-batches per rank under a pipeline
                least = q.micro_batch * ds * dr * max(1, q.pp)
                least = max(least, -(-at_w // least) * least)
                m = least // (q.micro_batch * ds * dr)
            n, q = _least(run, dataclasses.replace(q, grad_accum=m), need, backend)
            if n <= usable:
                return _Hint(f"more GPUs: hardware.count {w:,} would need about {gib(n)} per GPU as {describe(q)}"
                             + (f", with a global batch of at least {least:,} sequences (training.global_batch_tokens "
                                f"{least * seq:,})" if least is not None else ""), True)
    return None


_DEGREES = ("tp", "pp", "cp", "ep", "dp_shard", "micro_batch")


def _pin_hints(run, gpu, p, seqs: int, need, usable: float, helps: float, backend: str) -> list[_Hint]:
    """For each pinned part of the layout, the value that would fit the closest layout ``p`` (the nearest to the
    pin), else the one that saves the most where it saves at least :data:`P004_HINT_SHARE` of the excess; the
    other pins and the closest's searched values kept, the data-parallel ranks rebalanced (:func:`_relayout`)."""
    from llmc.compiler.backends import get_backend
    from llmc.compiler.hardware import nvlink_group
    from llmc.compiler.search import AC_RANKS, _schedules, cp_degrees, divisors, tp_problem

    par, arch, world = run.parallelism, run.model, run.hardware.count
    sup, be = get_backend(backend).supports, get_backend(backend)
    L, seq = arch.n_layers, _pre(run)[0].seq_len
    options: dict[str, list[dict]] = {}
    if par.tp is not None:
        options["tp"] = [{"tp": t} for t in divisors(nvlink_group(gpu)) if (t == 1 or "tp" in sup)
                         and tp_problem(arch, world, t, gpu) is None]
    if par.pp is not None:
        options["pp"] = [{"pp": x} for x in divisors(world) if x <= L and (x == 1 or (
            "pp" in sup and (be.tied_pp or not arch.tied_embeddings)))]
    if par.cp is not None:
        options["cp"] = [{"cp": x} for x in cp_degrees(seq, p.tp) if x == 1 or "cp" in sup]
    if par.ep is not None and arch.moe is not None:
        options["ep"] = [{"ep": e} for e in divisors(arch.moe.num_experts) if e == 1 or "ep" in sup]
    if (par.dp_shard is not None or par.dp_replicate is not None) and p.dp_replicate > 1:
        options["dp_shard"] = [{"dp_shard": p.dp_shard * p.dp_replicate, "dp_replicate": 1}]
    if par.zero_stage is not None:  # (FSDP2 runs 1 as 2: llmc.compiler.search.zero_stages)
        options["zero_stage"] = [{"zero_stage": z} for z in (1, 2, 3) if not (z == 1 and be.zero12 == "fsdp2")]
    if par.micro_batch is not None:
        options["micro_batch"] = [{"micro_batch": 1 << i} for i in range(p.micro_batch.bit_length())
                                  if 1 << i < p.micro_batch]
    if par.activation_checkpointing is not None:
        options["activation_checkpointing"] = [{"activation_checkpointing": a, "ac_layers": 0}
                                               for a in AC_RANKS[AC_RANKS.index(p.activation_checkpointing) + 1:]
                                               if a != "partial"]
    if (par.pp_schedule is not None or par.pp_virtual_stages is not None) and p.pp > 1:
        free = par.model_copy(update={"pp_schedule": None, "pp_virtual_stages": None})
        options["pp_schedule"] = [{"pp_schedule": s, "pp_virtual_stages": v}
                                  for s, v in _schedules(p.pp, L, free)]
    out = []
    for key, changes in options.items():
        tried = []
        for ch in changes:
            if all(getattr(p, f) == v for f, v in ch.items()):
                continue
            q = _relayout(run, p, world, seqs, backend, **ch)
            if q is None:
                continue
            n = need(q) if key == "zero_stage" else _least(run, q, need, backend)[0]
            tried.append((n, ch))
        fit = [t for t in tried if t[0] <= usable]
        if fit:  # the nearest to the pin (a degree's factor; a mode or stage: the first, the least change)
            n, ch = min(fit, key=lambda t, k=key, v=getattr(p, key): abs(math.log2(t[1][k] / v)) if k in _DEGREES
                        else 0)
        elif tried and min(tried, key=lambda t: t[0])[0] <= helps:
            n, ch = min(tried, key=lambda t: t[0])
        else:
            continue
        shown = [f for f in ch if f != "ac_layers" and not (f == "pp_virtual_stages" and ch[f] == getattr(p, f) == 1)]
        drop = " (and remove ac_layers)" if "ac_layers" in ch and par.ac_layers is not None else ""
        out.append(_Hint(f"parallelism.{', '.join(f'{f} {ch[f]}' for f in shown)}{drop} instead of the pinned "
                         f"{', '.join(f'{f} {_pinned(par, p, f)}' for f in shown)} (about {gib(n)} per GPU"
                         + (", which fits; or unpin it and let the search choose)" if n <= usable else ")"),
                         n <= usable, usable))
    return out


def _pinned(par, p, field: str):
    """The pinned value of ``field`` a hint names: the closest layout ``p``'s, but the spec's ZeRO stage (a ZeRO-1 pin
    the closest runs as ZeRO-2 on FSDP2, :func:`llmc.compiler.search.zero_stages`)."""
    return par.zero_stage if field == "zero_stage" and par.zero_stage is not None else getattr(p, field)


def _offload_hint(run, p, seqs: int, need, helps: float, capacity: float) -> _Hint | None:
    """CPU optimizer offload (or, with it on, parameter offload) where it saves at least :data:`P004_HINT_SHARE` of
    the excess on the backend that offloads, whose runner must run the pinned layout (P018's rule:
    :func:`unrun_pins`; the closest's searched dimensions it does not run folded into data parallelism); whether it
    fits is judged against that backend's usable share of the GPU's ``capacity``."""
    from llmc.compiler.backends import BACKENDS, get_backend, resolve_backend

    par = run.parallelism
    if par.offload_params:
        return None
    what = "offload_params" if par.offload_optimizer else "offload_optimizer"
    if (par.zero_stage == 0) or (what == "offload_params" and par.zero_stage not in (None, 3)):
        return None  # P015: DeepSpeed offloads ZeRO partitions (parameters: ZeRO-3's)
    asked = run.training.backend
    name = asked if asked != "auto" else resolve_backend("auto", offload=True)[0]
    switch = ""
    if "offload" not in get_backend(name).supports:  # P017 on the pinned backend: name one that offloads
        name = next((n for n, b in BACKENDS.items() if b.runnable and "offload" in b.supports), None)
        if name is None:
            return None
        switch = f" with training.backend {name}"
    be = get_backend(name)
    if unrun_pins(run, be):
        return None  # P018: the backend that offloads cannot run the pinned layout
    fold = {d: 1 for d in ("tp", "pp", "cp", "ep") if d not in be.supports}
    q = _relayout(run, dataclasses.replace(p, dp_replicate=1 if "hsdp" not in be.supports else p.dp_replicate),
                  run.hardware.count, seqs, name, **fold,
                  **({"loss_chunk_tokens": 0} if not be.slices_loss else {}))
    if q is None:
        return None
    offload = (True, what == "offload_params")
    if offload[1]:
        n, q = need(dataclasses.replace(q, zero_stage=3), backend=name, offload=offload), dataclasses.replace(
            q, zero_stage=3)
    else:
        n, q = _least(run, q, lambda x: need(x, backend=name, offload=offload), name, offload=True)
    if n > helps:
        return None
    from llmc.compiler.search import describe, usable_bytes

    label = "CPU parameter offload" if offload[1] else "CPU optimizer offload"
    there = usable_bytes(capacity, name)
    return _Hint(f"{label} (parallelism.{what}{switch}: about {gib(n)} per GPU as {describe(q)} on {name})",
                 n <= there, there)


def _cp_seq_problem(run, gpu) -> tuple[str, str] | None:
    """(message, hint) when a pinned cp > 1 cannot split seq_len with any tensor-parallel degree the search may
    take: the torchtitan job's FlexAttention context parallel shards its attention mask in whole 128-token blocks per
    CP rank and sequence parallelism splits each rank's share over the tp ranks
    (:func:`llmc.compiler.backends.titan_seq_multiple`, X306's rule; only torchtitan runs CP). Else None."""
    from llmc.compiler.backends import FLEX_BLOCK_TOKENS, titan_seq_multiple
    from llmc.compiler.search import divisors, tp_problem

    par, seq, world = run.parallelism, _pre(run)[0].seq_len, run.hardware.count
    cp = par.cp
    if not cp or cp == 1 or world % cp:
        return None
    tps = [par.tp] if par.tp else [t for t in divisors(world // cp) if tp_problem(run.model, world, t, gpu) is None]
    if not tps or any(seq % titan_seq_multiple(t, cp) == 0 for t in tps):
        return None
    t = min(tps)
    q = titan_seq_multiple(t, cp)
    lo, hi = seq // q * q, -(-seq // q) * q
    ok = [c for c in (2, 4, 8, 16, 32) if seq % titan_seq_multiple(t, c) == 0 and world % c == 0]
    return (f"seq_len {seq:,} is not divisible by cp x lcm({FLEX_BLOCK_TOKENS}, tp) = {q}"
            + (f" (tp {t})" if t > 1 else " at any tp") + f": the torchtitan job's FlexAttention context parallel "
            f"shards the attention mask in whole {FLEX_BLOCK_TOKENS}-token blocks per CP rank (torch's "
            "_create_cp_block_mask) and sequence parallelism splits each rank's share over the tp ranks",
            f"use a seq_len that is a multiple of {q} (e.g. {lo:,} or {hi:,})"
            + (f", or cp {' / '.join(map(str, ok))}, which divide {seq:,}" if ok else ""))


def _cp_unavailable_hint(run, gpu, backend: str) -> str | None:
    """P004's first hint when nothing fits on ``backend``, a backend without context parallelism, while a layout with
    CP on torchtitan would fit this cluster (llmc.compiler.memory.memory_per_gpu on torchtitan's profile: full AC, one
    sequence per micro-step, ZeRO-3, torchtitan's chunked loss; the first such of the fewest CP ranks): more GPUs
    shard only the model states, since without CP every GPU holds whole sequences. Says why CP is unavailable (the
    pinned backend, or what keeps ``auto`` off torchtitan, e.g. a seq_len past the model's max_seq_len) and the way
    to it. None where the backend runs CP, CP is pinned, the sequence is short or no CP layout would fit either."""
    from llmc.compiler import memory
    from llmc.compiler.backends import get_backend, torchtitan_layout_problem
    from llmc.compiler.plan import ParallelPlan
    from llmc.compiler.search import CP_MIN_SEQ, cp_degrees, describe, divisors, tp_problem, usable_bytes

    be, seq, world, arch = get_backend(backend), _pre(run)[0].seq_len, run.hardware.count, run.model
    if "cp" in be.supports or seq < CP_MIN_SEQ or run.parallelism.cp or (run.parallelism.pp or 1) > 1:
        return None
    titan, usable = get_backend("torchtitan"), usable_bytes(gpu.hbm_bytes, "torchtitan")
    found = None
    tps = [t for t in divisors(world) if tp_problem(arch, world, t, gpu) is None]
    for c in sorted({c for t in tps for c in cp_degrees(seq, t) if c > 1}):
        for t in tps:
            if world % (t * c) or c not in cp_degrees(seq, t) or torchtitan_layout_problem(
                    arch, seq, t, c, 1, gpu.key != "cpu") is not None:
                continue
            plan = ParallelPlan(tp=t, cp=c, dp_shard=world // (t * c), activation_checkpointing="full")
            mem = memory.memory_per_gpu(arch, plan, seq, run.training.precision, gpu.hbm_bytes, backend=titan,
                                        offload_optimizer=run.parallelism.offload_optimizer,
                                        offload_params=run.parallelism.offload_params)
            if mem.per_gpu_bytes <= usable:
                found = (plan, mem)
                break
        if found:
            break
    if found is None:
        return None
    plan, mem = found
    if run.training.backend != "auto":
        why, fix = f"training.backend pins {backend}", "training.backend: torchtitan"
    else:
        gap = _titan_ruled_out(run, gpu)
        if gap is None:
            return None
        why = f"auto picks {backend} since torchtitan cannot run this model: {gap.message}"
        fix = (f"raise model.max_seq_len to {seq:,} with a rope_scaling that reaches it (T109), and auto picks "
               "torchtitan" if gap.code == "X305" else gap.hint)
    return (f"context parallelism, which the {backend} backend does not run ({why}): {describe(plan)} on torchtitan "
            f"would need about {gib(mem.per_gpu_bytes)} per GPU ({fix}); more GPUs would not help here, since without "
            f"CP each GPU holds whole {seq:,}-token sequences")


def _widest(run, gpu, dims, pinned: bool = True) -> tuple[int, int]:
    """(tp, cp) of the layout with the fewest data-parallel ranks on a runner that implements ``dims``
    (``Backend.supports``), the spec's tp / cp pins kept (``pinned``): TP as wide as the node, the heads and the world
    allow; CP as the search tries it (:func:`_cps`). A pipeline does not lower the least batch: each of its dp ranks
    needs pp micro-batches."""
    from llmc.compiler.search import divisors, tp_problem

    arch, world, par = run.model, run.hardware.count, run.parallelism
    cp = par.cp if pinned and par.cp and world % par.cp == 0 else 1  # a pinned CP leaves world / cp for TP
    t = (par.tp if pinned else None) or (max(t for t in divisors(world // cp) if tp_problem(arch, world, t, gpu) is None)
                                         if "tp" in dims else 1)
    return t, max(_cps(run, t, dims, pinned))


def _cps(run, t: int, dims, pinned: bool = True) -> list[int]:
    """The CP degrees the search tries at tp ``t`` on a runner implementing ``dims`` (the spec's cp pin kept:
    ``pinned``)."""
    from llmc.compiler.search import cp_degrees

    if pinned and run.parallelism.cp:
        return [run.parallelism.cp]
    world = run.hardware.count
    return [c for c in cp_degrees(_pre(run)[0].seq_len, t) if c == 1 or ("cp" in dims and world % (t * c) == 0)]


def _titan_ruled_out(run, gpu):
    """The first :class:`~llmc.compiler.backends.ModelGap` that keeps ``auto`` off torchtitan for this run's model and
    pre-training sequence (None: none of these)."""
    from llmc.compiler.backends import torchtitan_model_gaps, torchtitan_seq_gaps

    gaps = torchtitan_model_gaps(run.model, seq_len=_pre(run)[0].seq_len) + torchtitan_seq_gaps(
        run.model, _pre(run)[0].seq_len, gpu.key != "cpu")
    return gaps[0] if gaps else None


def _check_batch_split(run, res, gpu, G: int, sink: Sink) -> None:
    """P005: no layout on the backend that runs the plan (``res.backend``) splits the global batch of ``G``
    sequences. The least batch that backend can split is one sequence per data-parallel rank of its widest layout
    (:func:`_widest`); where ``G`` is a multiple of it, the pins (or the pipeline's micro-batches) are what block the
    split, and the message says so rather than proposing the batch the spec has; where a dimension the backend does
    not run (TP, CP) would split it, the message names it and why that backend runs the plan."""
    from llmc.compiler.backends import BACKENDS, get_backend

    world = run.hardware.count
    be = get_backend(res.backend)
    t, c = _widest(run, gpu, be.supports)
    q = max(1, world // (t * c))  # (pins whose product passes the world are P001's)
    tu, cu = _widest(run, gpu, be.supports, pinned=False)
    par = run.parallelism
    pins = [(k, getattr(par, k)) for k in ("micro_batch", "dp_replicate", "dp_shard", "tp", "pp", "cp")
            if getattr(par, k, None) is not None]
    fewer = "fewer GPUs"
    if G % q == 0 or (pins and G % max(1, world // (tu * cu)) == 0):
        # the batch splits over the widest layout (of the pins, or without them): what blocks it is the pins, or the
        # pipeline's micro-batches
        if pins:
            sink.add("P005", "error", f"parallelism.{pins[0][0]}",
                     f"global batch of {G} sequences cannot be split over {world} GPUs with the "
                     f"pinned {', '.join(f'{k} {v}' for k, v in pins)} (micro_batch x grad_accum x dp must "
                     "equal it, with at least pp micro-batches)",
                     f"pin values whose micro_batch x dp divides {G}, or unpin them")
        else:
            why = sorted({x.reason for x in res.rejected if x.reason})[:1]
            sink.add("P005", "error", "training.global_batch_tokens",
                     f"global batch of {G} sequences cannot be split over {world} GPUs by any layout the {be.name} "
                     "backend runs (micro_batch x grad_accum x dp must equal it, with at least pp micro-batches)"
                     + (f": {why[0]}" if why else ""), f"use a larger global batch, or {fewer}")
        return
    good = _round_up(max(G, q), q)  # (> G: G is not a multiple of q)
    use = f"use a multiple of {q} sequences, e.g. {good} ({good * _pre(run)[0].seq_len:,} tokens), or {fewer}"
    # the widest layout of a runner with every dimension (torchtitan's), for what this backend lacks
    full = BACKENDS["torchtitan"].supports
    tf, _ = _widest(run, gpu, full)
    cf = next((x for x in _cps(run, tf, full) if G % (world // (tf * x)) == 0), None)  # the least that splits it
    lacks = [d for d, v, mine in (("tp", tf, t), ("cp", cf or 1, c)) if v > mine and d not in be.supports]
    if lacks and cf is not None:
        words = " or ".join(_DIM_WORDS[d] for d in lacks)
        wide = " x ".join(f"{d} {v}" for d, v in (("tp", tf), ("cp", cf)) if v > 1)
        if run.training.backend != "auto":
            chosen = f"training.backend pins {be.name}"
            other = "training.backend torchtitan"
        else:
            gap = _titan_ruled_out(run, gpu) if be.name != "torchtitan" else None
            chosen = (f"auto picks it since torchtitan cannot run this model: {gap.message}" if gap is not None else
                      "the plan's backend line says why it was chosen")
            other = f"letting auto pick torchtitan ({gap.hint})" if gap is not None else "training.backend torchtitan"
        sink.add("P005", "error", "training.global_batch_tokens",
                 f"global batch of {G} sequences cannot be split over {world} GPUs on the {be.name} backend: it runs no "
                 f"{words}, so each of its {q} data-parallel ranks needs a sequence of its own; {wide} "
                 f"({world // (tf * cf)} ranks) would split it, but the {be.name} backend runs this plan ({chosen})",
                 f"{use}, or a backend with {words}: {other}")
        return
    sink.add("P005", "error", "training.global_batch_tokens",
             f"global batch of {G} sequences cannot be split over {world} GPUs "
             "(micro_batch x grad_accum x dp must equal it, with at least pp micro-batches)", use)


def min_batch_seqs(arch, world: int, gpus_per_node: int) -> int:
    """Smallest global batch (sequences) any layout can split: one sequence per data-parallel rank
    with the widest valid TP and no pipeline (world / tp_max), the least a cluster can consume."""
    kv = arch.n_heads if arch.mla is not None else arch.kv_heads
    t_max = max(t for t in range(1, gpus_per_node + 1)
                if gpus_per_node % t == 0 and world % t == 0 and arch.n_heads % t == 0 and kv % t == 0)
    return world // t_max


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ------------------------------------------------------------------------------------------- hyper

# Plausibility bounds (T040-T042): values no published LLM recipe comes near, at any model size (T001 / T009 / T101
# judge against practice, and only from 100M parameters): each lies 5x (the lowest LR) to 300x (the grad clip) past
# the most extreme published value.
#: Peak AdamW LR, any stage: the largest published for LLM pre-training is MiniCPM's 0.01 (muP-scaled; Hu et al. 2024,
#: arXiv:2404.06395 sec. 4); standard parametrisation stays below: GPT-3 6e-4 at 125M to 0.6e-4 at 175B
#: (arXiv:2005.14165 Table 2.1), Llama 2 3e-4 / 1.5e-4 (arXiv:2307.09288 Table 1). The smallest published, a DPO
#: fine-tune's: Zephyr 5e-7 (arXiv:2310.16944 sec. 4.1); below 1e-7 the weights barely move.
PLAUSIBLE_LR = (1e-7, 0.1)
#: Decoupled weight decay: published 0.1 (GPT-3 arXiv:2005.14165 App. B, Llama 2 sec. 2.2, DeepSeek-V3). AdamW scales
#: every decayed weight by (1 - lr x wd) each step (Loshchilov & Hutter, arXiv:1711.05101 Algorithm 2; PyTorch AdamW).
PLAUSIBLE_WEIGHT_DECAY = 1.0
#: Adam eps: 1e-8 (GPT-3 App. B) to 1e-5 (Llama 2 sec. 2.2). Adam's step is lr x m / (sqrt(v) + eps) (Kingma & Ba,
#: arXiv:1412.6980 Algorithm 1): an eps above the gradients' RMS shrinks it toward lr x m / eps.
PLAUSIBLE_EPS = 1e-4
#: Output z-loss coefficient: PaLM's 1e-4 (arXiv:2204.02311 sec. 5); OLMo 2 and Chameleon 1e-5.
PLAUSIBLE_Z_LOSS = 1e-3
#: Global grad-norm clip: 1.0 (GPT-3 App. B, Llama 2 sec. 2.2); OPT-175B lowered it to 0.3 mid-run
#: (arXiv:2205.01068 sec. 2.5). A clip far below makes the clipped gradients' elements approach Adam's eps.
PLAUSIBLE_GRAD_CLIP = 1e-3
#: MoE load-balancing coefficient: Switch 0.01 (arXiv:2101.03961 sec. 2.2), Mixtral 0.02 (config.json
#: router_aux_loss_coef), DeepSeek-V2's largest 0.05 (device-level, arXiv:2405.04434 sec. 2.2.3), gpt-oss 0.9
#: (config.json router_aux_loss_coef, which llmc.spec.hf reads as model.moe.aux_loss_coef).
PLAUSIBLE_MOE_AUX = 9.0
#: The stage kinds whose LR T101 already warns about far below PLAUSIBLE_LR[1] (full fine-tunes; DPO with LoRA too)
_T101_KINDS = ("sft", "grpo", "midtrain")


def check_plausible_hyper(run, params_active: float, sink: Sink) -> None:
    """T040 (a peak LR outside :data:`PLAUSIBLE_LR`), T041 (weight decay above 1), T042 (Adam eps, z-loss, grad clip
    or MoE balance coefficient far past every published recipe): warnings, at every model size; where T001 or T101
    already warns about the same LR, only they do."""
    tr, opt = run.training, run.training.optimizer
    lo, hi = PLAUSIBLE_LR
    keep = "only a warning, for a value you mean"
    lrs = [] if opt.lr is None or (run.pretrains and params_active >= LR_CHECK_MIN_PARAMS) else [
        ("training.optimizer.lr", opt.lr, True)]  # (from 100M parameters T001 warns, about a narrower range)
    lrs += [(f"stages.{i}.lr", st.lr, not (st.kind == "dpo" or st.kind in _T101_KINDS and st.lora is None))
            for i, st in enumerate(run.stages) if st.lr is not None]
    for path, lr, high in lrs:
        if lr < lo or (high and lr > hi):
            sink.add("T040", "warning", path,
                     f"peak LR {lr:.3g} is outside {lo:g}..{hi:g}, far past every published LLM recipe (Zephyr "
                     f"DPO's 5e-7 .. MiniCPM's 0.01): {'the weights barely move' if lr < lo else 'training diverges'}",
                     f"AdamW pre-training uses 6e-5..6e-4 (GPT-3 Table 2.1; Llama 2: 3e-4 / 1.5e-4), fine-tunes "
                     f"5e-7..2e-5 (Zephyr DPO, Llama 2 SFT); {keep}")
    wd = opt.weight_decay
    if wd > PLAUSIBLE_WEIGHT_DECAY:
        lr = opt.lr if opt.lr is not None else 3e-4  # (the spec's peak, else an illustrative 3e-4: Llama 2 7B's)
        shrink = lr * wd  # AdamW's decay of each decayed weight per step, before the gradient's update
        if shrink >= 1:
            effect = f"zeroes or flips the sign of every decayed weight each step (lr x wd = {shrink:.3g})"
        else:  # the share an untrained weight loses over 1,000 steps: 1 - (1 - shrink)^1000
            effect = (f"shrinks an untrained weight by {-math.expm1(1000 * math.log1p(-shrink)):.0%} every 1,000 "
                      f"steps (0.1: {-math.expm1(1000 * math.log1p(-lr * 0.1)):.0%})")
        sink.add("T041", "warning", "training.optimizer.weight_decay",
                 f"weight decay {wd:.3g} is above {PLAUSIBLE_WEIGHT_DECAY:g}: AdamW multiplies each decayed weight by "
                 f"(1 - lr x weight_decay) every step, which at lr {lr:.3g} {effect}",
                 f"LLMs use 0.1 (GPT-3, Llama 2); {keep}")
    other = [("training.optimizer.eps", opt.eps, opt.eps > PLAUSIBLE_EPS, f"Adam eps {opt.eps:.3g}",
              "1e-8 .. 1e-5 (GPT-3, Llama 2): above the gradients' RMS eps turns the step into lr x m / eps, "
              "far below the LR"),
             ("training.z_loss", tr.z_loss, tr.z_loss > PLAUSIBLE_Z_LOSS, f"z-loss coefficient {tr.z_loss:.3g}",
              "1e-4 (PaLM) .. 1e-5: a larger one trains the logits' normaliser instead of the language model"),
             ("training.grad_clip", tr.grad_clip, tr.grad_clip is not None and tr.grad_clip < PLAUSIBLE_GRAD_CLIP,
              f"gradient clip {tr.grad_clip or 0:.3g}",
              "1.0 (GPT-3, Llama 2): a far smaller clip shrinks every gradient element toward Adam's eps, and the "
              "steps toward nothing")]
    moe = run.model.moe
    if moe is not None:
        other.append(("model.moe.aux_loss_coef", moe.aux_loss_coef, moe.aux_loss_coef > PLAUSIBLE_MOE_AUX,
                      f"MoE load-balancing coefficient {moe.aux_loss_coef:.3g}",
                      "0.01 (Switch) .. 0.9 (gpt-oss's config): a larger one trains the router's balance instead of "
                      "the language model"))
    for path, _, bad, what, why in other:
        if bad:
            sink.add("T042", "warning", path, f"{what} is far outside every published LLM recipe",
                     f"published: {why}; {keep}")


def check_batch_tokens(run, sink: Sink) -> bool:
    """P005 when an explicit global_batch_tokens is not a whole number of sequences; False then."""
    data, training = _pre(run)
    gbt, s = training.global_batch_tokens, data.seq_len
    if gbt is not None and (gbt % s or gbt < s):
        seqs = max(1, round(gbt / s))
        pow2 = 2 ** max(0, round(math.log2(max(gbt / s, 1))))
        alt = f" or {pow2 * s:,} ({pow2} x {s}, splits evenly over power-of-two dp)" if pow2 != seqs else ""
        sink.add("P005", "error", "training.global_batch_tokens",
                 f"global_batch_tokens {gbt:,.0f} is not a whole number of {s}-token sequences",
                 f"use {seqs * s:,} ({seqs} x {s}){alt}")
        return False
    return True


def check_hyper(run, hyper, params_active: float, default_lr: float, world: int, is_cpu: bool, sink: Sink,
                backend=None) -> None:
    """T001-T004, T006-T009 on the resolved hyperparameters."""
    tr = run.training
    lr = hyper.lr
    # 1e-4..6e-4 (GPT-3 Table 2.1 range), widened to half / twice the size-aware value (405B: 6.3e-5 -> 3.2e-5)
    lo, hi = min(1e-4, default_lr / 2), max(6e-4, 2 * default_lr)
    if tr.optimizer.lr is not None and params_active >= LR_CHECK_MIN_PARAMS:
        if not lo <= lr <= hi:
            sink.add("T001", "warning", "training.optimizer.lr",
                     f"peak LR {lr:.2g} for {params_active / 1e9:.3g}B active params is outside "
                     f"pre-training practice ({lo:.2g}..{hi:.2g}; ~{default_lr:.2g} at this size)",
                     "3e-4 at ~1B down to 1e-4 at ~70B (Llama 2 Table 1); larger models need smaller LR")
    steps = hyper.steps
    sched = tr.schedule
    if steps > 100 and hyper.warmup_steps <= 1:
        # step k (1-based) of an N-step warmup runs at k/N of peak (torchtitan's linear_warmup_stable_decay, which every
        # backend trains: llmc.lr_schedule), so 1 step runs step 1 at peak, as 0 does
        from llmc.compiler.defaults import default_warmup

        why = (" (step k of an N-step warmup runs at k/N of peak, so a 1-step warmup runs step 1 at peak)"
               if hyper.warmup_steps == 1 else "")
        sink.add("T002", "warning", "training.schedule.warmup_steps",
                 f"no LR warmup: warmup_steps {hyper.warmup_steps}{why}",
                 f"warm up over 1-2% of steps (~{default_warmup(steps)}); no warmup risks early divergence")
    elif steps > 1 and hyper.warmup_steps > 0.1 * steps and "warmup_steps" not in hyper.defaults:
        sink.add("T002", "warning", "training.schedule.warmup_steps",
                 f"warmup {hyper.warmup_steps} is {100 * hyper.warmup_steps / steps:.0f}% of {steps} steps",
                 "1-2% is usual; a long warmup wastes the peak-LR phase")
    elif steps > 1 and hyper.warmup_steps > 0.1 * steps:
        # llmc chose the warmup (defaults.default_warmup: 1% of the steps, at least 1, 2 from 20 steps on): the run is
        # so short that one step is over 10% of it. Located where its length is set (the key the user acts on), not on
        # a key the spec does not write
        from llmc.compiler.defaults import MIN_WARMUP, WARMUP_FRACTION, WARMUP_MAX_DIVISOR, pretrain_paths

        data_at, steps_at = pretrain_paths(run)
        at = f"{data_at}.tokens" if "steps" in hyper.defaults else steps_at
        sink.add("T002", "warning", at,
                 f"warmup {hyper.warmup_steps} (derived: llmc's default, {WARMUP_FRACTION:.0%} of the steps and at "
                 f"least 1; 2 from {MIN_WARMUP * WARMUP_MAX_DIVISOR} steps) is {100 * hyper.warmup_steps / steps:.0f}% "
                 f"of the run's {steps} steps",
                 f"1-2% is usual; raise {at} for a longer run, or set training.schedule.warmup_steps: 0 for none")
    if sched.kind == "constant" and steps > 100:
        sink.add("T002", "warning", "training.schedule.kind", "constant LR: no decay",
                 "decay to ~10% of peak (cosine or wsd); without decay the loss does not settle")
    elif sched.kind != "constant" and sched.min_lr_ratio > 0.5:
        sink.add("T002", "warning", "training.schedule.min_lr_ratio",
                 f"LR only decays to {100 * sched.min_lr_ratio:.0f}% of peak", "~10% of peak is usual")
    if tr.grad_clip is None:
        sink.add("T003", "warning", "training.grad_clip", "no gradient clipping",
                 "clip the global grad norm at 1.0 (Llama 2, arXiv:2307.09288 §2.2)")
    if tr.precision == "fp32" and not is_cpu:
        sink.add("T004", "warning", "training.precision",
                 "fp32 training: 2x the weight/activation memory of bf16 and far below tensor-core speed",
                 "use bf16 (no loss scaler needed)")
    if params_active >= BIG_PRETRAIN_PARAMS and not is_cpu:
        bt = hyper.global_batch_tokens
        if not 2e6 <= bt <= 64e6:
            # (a batch llmc chose says so: the spec does not write the key it is located on, its training section)
            derived = (" (derived: llmc's size-aware default, rounded to the layouts; set training.global_batch_tokens "
                       "to choose it)" if "global_batch_tokens" in hyper.defaults else "")
            sink.add("T006", "warning", "training.global_batch_tokens",
                     f"global batch {bt / 1e6:.2f}M tokens is outside 2M-64M for large pre-training{derived}",
                     "2M-64M tokens per step (Llama 2: 4M; Llama 3 405B: up to 16M; DeepSeek-V3: up to 63M, "
                     "15,360 x 4K, arXiv:2412.19437 sec. 4.2)")
    if tr.z_loss == 0 and params_active >= Z_LOSS_PARAMS and not is_cpu:
        hint = "z_loss 1e-4..1e-5 keeps output logits from drifting (PaLM, arXiv:2204.02311 §5)"
        if backend is not None and "z_loss" not in backend.applies:  # (T013 would then say it is dropped)
            hint += f"; the {backend.name} backend this plan runs on has none: training.backend native or deepspeed"
        sink.add("T007", "info", "training.z_loss", "no z-loss on a large run", hint)
    moe = run.model.moe
    # expert_bias balances aux-loss-free (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2: a routing bias moved after each
    # step): llmc's native runner (train.py _update_expert_bias) and torchtitan's job do; DeepSpeed's never moves it
    bias_balanced = moe is not None and moe.expert_bias and getattr(backend, "name", None) != "deepspeed"
    if moe is not None and moe.aux_loss_coef == 0 and not bias_balanced:
        sink.add("T008", "warning", "model.moe.aux_loss_coef", "MoE without a load-balancing loss",
                 "experts can collapse; use ~0.01 (Switch Transformer), or model.moe.expert_bias: true (aux-loss-free "
                 "bias balancing, DeepSeek-V3) on the native or torchtitan backend"
                 if not moe.expert_bias else
                 "the DeepSpeed runner does not move model.moe.expert_bias (no aux-loss-free balancing there): "
                 "set aux_loss_coef ~0.01 (Switch Transformer), or train on the native or torchtitan backend")
    b1, b2 = tr.optimizer.betas
    if not is_cpu and params_active >= LR_CHECK_MIN_PARAMS and b2 > 0.99:
        sink.add("T009", "warning", "training.optimizer.betas", f"Adam beta2 {b2} for LLM pre-training",
                 "beta2 = 0.95 is standard for LLMs (GPT-3, Llama 2); 0.999 reacts slowly to loss spikes")


# ------------------------------------------------------------------------------------------- data


def _pre(run):
    """The pre-training run's (data, training): a ``pretrain`` stage's own seq_len / data / batch / steps where it sets
    them (:func:`llmc.compiler.defaults.pretrain_inputs`, what the search and ``hyper`` use)."""
    from llmc.compiler.defaults import pretrain_inputs

    return pretrain_inputs(run)


def check_data(run, hyper, sink: Sink) -> None:
    """D001 (less data than one step), D005 (pinned steps disagreeing with data.tokens), D002 (repeated epochs, of
    the tokens the run trains: :func:`llmc.compiler.scaling.trained_tokens`), D003 (mixture shares)."""
    from llmc.compiler.defaults import pretrain_inputs, pretrain_paths
    from llmc.compiler.scaling import trained_tokens

    d = pretrain_inputs(run)[0]  # (a pretrain stage's own data where it sets it)
    where, steps_at = pretrain_paths(run)
    if d.tokens < hyper.global_batch_tokens:
        sink.add("D001", "error", f"{where}.tokens",
                 f"{d.tokens:,.0f} tokens is less than one optimizer step ({hyper.global_batch_tokens:,} tokens)",
                 "raise data.tokens or lower training.global_batch_tokens")
    trained = trained_tokens(hyper, d.tokens)
    if "steps" not in hyper.defaults and abs(trained - d.tokens) > 0.01 * d.tokens:
        sink.add("D005", "warning", steps_at,
                 f"{hyper.steps:,} steps x {hyper.global_batch_tokens:,} tokens = {trained:,.0f} tokens, but {where}.tokens "
                 f"is {d.tokens:,.0f}: the trainer runs the steps, and the plan counts their tokens (the training "
                 f"FLOPs, time and cost, the scaling numbers and checks, the epochs); {where}.tokens is not what is "
                 "trained", f"drop {steps_at} (llmc derives the steps from {where}.tokens), or set {where}.tokens to match")
    srcs = d.sources
    if not srcs:
        return
    shares = mixture_shares(srcs)
    for i, (s, share) in enumerate(zip(srcs, shares, strict=True)):
        if s.tokens is None:
            continue
        need = trained * share
        epochs = need / s.tokens
        if epochs > MAX_EPOCHS:
            sink.add("D002", "warning", f"{where}.sources.{i}.tokens",
                     f"source {s.name!r} would be repeated {epochs:.1f} epochs ({need:.3g} of {s.tokens:.3g} tokens)",
                     f"beyond ~{MAX_EPOCHS:.0f} epochs repeated data loses value (Muennighoff et al. 2023); "
                     "lower its weight or add data")
        elif epochs > 1.0:
            sink.add("D002", "info", f"{where}.sources.{i}.tokens",
                     f"source {s.name!r} is seen {epochs:.1f} epochs ({need:.3g} of {s.tokens:.3g} tokens)")
    if len(srcs) > 1:
        mix = ", ".join(f"{s.name} {100 * share:.1f}%" for s, share in zip(srcs, shares, strict=True))
        sink.add("D003", "info", f"{where}.sources", f"mixture: {mix}")


def check_tokenizers(run, tokenizers: dict, sink: Sink) -> None:
    """D006: a tokenizer path that exists but holds no tokenizer.json llmc's trainers can read (``tokenizers``: the
    spec's tokenizer facts, :func:`llmc.spec.facts.read_tokenizer`); a path that is not here is not checked (a spec
    may be planned away from its files)."""
    places = [("data.tokenizer.path", run.data.tokenizer.path)] + [
        (f"stages.{i}.data.tokenizer.path", st.data.tokenizer.path) for i, st in enumerate(run.stages)
        if st.data is not None]
    for where, path in places:
        known = tokenizers.get(path) if path else None
        if known is not None and known.problem:
            sink.add("D006", "warning", where,
                     f"{known.problem}: prepare stops here (llmc's trainers and the torchtitan job read a Hugging Face "
                     "tokenizer.json)", "point it at a tokenizer.json, or a folder holding one")


def check_source_folders(run, folders: dict, sink: Sink) -> None:
    """D007: a data source whose path is a folder holding files, but none its ``format`` reads there (``folders``:
    :attr:`llmc.spec.facts.ExternalFacts.source_folders`, keyed by (path, format)); prepare would stop on it
    (``llmc.sources.files_of``, the same words). Located on the source's ``format`` where the spec sets it, else on
    its ``path`` (the format was jsonl by default)."""
    groups = [("data", run.data.sources)] + [(f"stages.{i}.data", st.data.sources) for i, st in enumerate(run.stages)
                                             if st.data is not None]
    for where, sources in groups:
        for j, src in enumerate(sources):
            found = folders.get((src.path, src.format)) if src.path else None
            if found is None or src.kind in RECORD_SOURCE_KINDS:  # (records are read as JSONL whatever the format)
                continue
            given = "format" in src.model_fields_set
            how = f"format: {src.format}" + ("" if given else " (the default when format is not set)")
            sink.add("D007", "error", f"{where}.sources.{j}.{'format' if given else 'path'}",
                     f"data source {src.name!r}: {src.path} holds no {found.wanted} file, which {how} reads, but "
                     f"{found.holds}: prepare would stop here", found.hint)


# ------------------------------------------------------------------------------------------- budget


def check_offload(run, time, sink: Sink) -> None:
    """P011 (info): with ``parallelism.offload_optimizer`` the optimizer update runs on the hosts' CPUs; say how
    much of the step that is and at which CPU rate, since the rate depends on the host (timing.py)."""
    from llmc.compiler.timing import CPU_ADAM_PARAMS_PER_S

    if not run.parallelism.offload_optimizer or time is None:
        return
    opt = time.breakdown.get("optimizer", 0.0)
    sink.add("P011", "info", "parallelism.offload_optimizer",
             f"the optimizer update runs on the hosts' CPUs: {opt:.2f} s of each {time.step_seconds:.2f} s step "
             f"({opt / time.step_seconds:.0%}), at {CPU_ADAM_PARAMS_PER_S / 1e9:.2f}e9 parameters/s per host "
             "(DeepSpeedCPUAdam on an AVX-512 training host; a smaller host is slower)",
             "measure a few steps and fit the plan to them with `llmc calibrate`")


HOST_MEMORY_WARN = 0.8  # of the node's host memory: the OS, the data loaders and pinned transfer buffers need the rest


def check_host_memory(run, memory, gpu, sink: Sink) -> None:
    """P016: what optimizer (and parameter) offload keeps in each node's host memory
    (``memory.offload_host_bytes_per_node``) against the node's (``hardware.host_memory_gib``, else the table's
    reference node): error above it, warning above :data:`HOST_MEMORY_WARN` of it, info when it is unknown."""
    need = memory.host_bytes_per_node if memory is not None else 0
    if not need or gpu is None:
        return
    what = "optimizer and parameter offload" if run.parallelism.offload_params else "optimizer offload"
    have = gpu.host_gib * GiB
    if not have:
        sink.add("P016", "info", "hardware.host_memory_gib",
                 f"{what} keeps {need / GiB:,.0f} GiB per node in host memory; the node's is not known",
                 "set hardware.host_memory_gib to have the plan check it")
    elif need > have:
        hint = ("more nodes (each holds the optimizer of its own GPUs' shards)" +
                (", or optimizer offload alone" if run.parallelism.offload_params else ""))
        sink.add("P016", "error", "parallelism.offload_optimizer",
                 f"{what} needs {need / GiB:,.0f} GiB of host memory per node, more than the node's "
                 f"{have / GiB:,.0f} GiB (hardware.host_memory_gib or the hardware table's reference node)", hint)
    elif need > HOST_MEMORY_WARN * have:
        sink.add("P016", "warning", "parallelism.offload_optimizer",
                 f"{what} fills {need / have:.0%} of the node's {have / GiB:,.0f} GiB of host memory "
                 f"({need / GiB:,.0f} GiB)", "leave room for the OS, data loaders and pinned buffers: more nodes")


def budget_floor(run, training_flops: float, peak: float, floor_peak: float, price: float):
    """:class:`~llmc.compiler.result.BudgetFloor`: the training FLOPs at :data:`MAX_PLAUSIBLE_MFU` of
    ``floor_peak``, the precision's own dense peak (fp8's, fp4's), which no step exceeds. ``peak``: what MFU is quoted
    against (bf16's for fp8 / nvfp4 runs); measured against it, an fp8 or nvfp4 plan that meets its budget (its
    predicted MFU above 60 % of the bf16 peak) was refused as impossible."""
    from llmc.compiler.result import BudgetFloor
    from llmc.compiler.timing import days_at_mfu, gpu_hours

    days = days_at_mfu(training_flops, run.hardware.count, floor_peak, MAX_PLAUSIBLE_MFU)
    basis = (f"{100 * MAX_PLAUSIBLE_MFU:.0f}% MFU" if floor_peak == peak else
             f"{100 * MAX_PLAUSIBLE_MFU:.0f}% of the {run.training.precision} peak on every FLOP")
    gh = gpu_hours(days, run.hardware.count)
    return BudgetFloor(days=days, usd=gh * price, basis=basis, gpu_hours=gh)


def batch_splits(arch, batch_seqs: int, count: int, gpu, seq_len: int, pipeline: bool = True) -> bool:
    """Can some layout the search enumerates split ``batch_seqs`` sequences over ``count`` GPUs of ``gpu``: a TP
    degree the search allows (``search.tp_problem``: NVLink domain, heads), a pipeline depth up to n_layers (none
    where ``pipeline`` is False: torchtitan with tied embeddings, X303), a CP degree it tries at ``seq_len``
    (``search.cp_degrees``), and dp = count / (tp x pp x cp) with batch_seqs a multiple of dp giving at least pp
    micro-batches (the batch identity, search._enumerate_dp)?"""
    from llmc.compiler.search import cp_degrees, divisors, tp_problem

    for t in divisors(count):
        if tp_problem(arch, count, t, gpu) is not None:
            continue
        rest = count // t
        for p in (divisors(rest) if pipeline else [1]):
            if p > arch.n_layers:
                continue
            for c in cp_degrees(seq_len, t):
                if rest % (p * c):
                    continue
                dp = rest // (p * c)
                if batch_seqs % dp == 0 and batch_seqs // dp >= p:
                    return True
    return False


#: counts :func:`usable_gpu_count` tries above the one asked for before it gives up (a bound on a hint's cost)
USABLE_COUNT_TRIES = 4096


def usable_gpu_count(run, at_least: float, gpu, seqs: int | None = None, seq_len: int | None = None,
                     pipeline: bool = True) -> int | None:
    """The smallest GPU count >= ``at_least`` the plan accepts: a whole number of nodes once it spans several (P008)
    and, where the spec fixes the global batch (``seqs`` sequences, pre-training's: a ``pretrain`` stage's own batch
    and seq_len where it sets them; None: llmc's default batch, which follows the count), one the batch can be split
    over at ``seq_len`` (:func:`batch_splits`, ``pipeline`` as there; else P005). None when there is none within the
    spec's limit of GPUs (``schema.MAX_GPUS``), none the batch splits over (at most tp x pp x cp x dp = an NVLink
    domain x n_layers x 32 x the batch's sequences) or none among :data:`USABLE_COUNT_TRIES` counts from
    ``at_least``."""
    from llmc.compiler.hardware import nvlink_group
    from llmc.spec.schema import MAX_GPUS

    arch, gpus_per_node = run.model, gpu.gpus_per_node
    seq_len = seq_len or _pre(run)[0].seq_len
    limit = MAX_GPUS if seqs is None else min(MAX_GPUS, nvlink_group(gpu) * arch.n_layers * 32 * seqs)
    if not math.isfinite(at_least) or at_least > limit:
        return None
    n = max(1, math.ceil(at_least))
    for _ in range(USABLE_COUNT_TRIES):
        if n > gpus_per_node and n % gpus_per_node:
            n = _round_up(n, gpus_per_node)
        if n > limit:
            return None
        if seqs is None or batch_splits(arch, seqs, n, gpu, seq_len, pipeline):
            return n
        n += gpus_per_node if n >= gpus_per_node else 1
    return None


def _gpus_per_node(run, gpu=None) -> int:
    """The cluster's GPUs per node: ``gpu``'s (the table's part with the spec's overrides), else the spec's
    ``hardware.gpus_per_node`` or the hardware table's for its GPU (1 when neither is known)."""
    if gpu is not None:
        return gpu.gpus_per_node
    from llmc.compiler.compile import hardware_gpu

    known = hardware_gpu(run.hardware)
    return run.hardware.gpus_per_node or (known.gpus_per_node if known is not None else 1)


def check_budget(run, training_flops: float, time, cost, floor, floor_peak: float, price: float,
                 sink: Sink, gpu=None, seqs: int | None = None, seq_len: int | None = None,
                 pipeline: bool = True) -> None:
    """B001/B002 against the predicted plan (its days and cost include the checkpoint saves' stalls,
    ``TimeNumbers.checkpoint``), B003 when even the ``floor`` (:func:`budget_floor`, at ``floor_peak``) could not
    meet the budget (the training FLOPs alone). A GPU count a hint names is one the plan accepts
    (:func:`usable_gpu_count`, ``gpu``: the cluster's part, for its node size); the counts for llmc's own prediction
    scale the planned days linearly with the GPUs, which a larger cluster's communication does not (plan it)."""
    from llmc.compiler.timing import gpus_for_days

    b = run.budget
    n = run.hardware.count
    if gpu is None:
        from llmc.compiler.compile import hardware_gpu

        gpu = hardware_gpu(run.hardware)
    gpn = _gpus_per_node(run, gpu)
    ck = time.checkpoint if time is not None else None
    saves = f", incl. {ck.total_seconds / 3600:.1f} h of checkpoint saves" if ck is not None else ""
    at, best_days, best_usd = floor.basis, floor.days, floor.usd
    if b.max_days is not None:
        # llmc's prediction at more GPUs, were its MFU to hold (the days fall as 1 / GPUs): a count the plan accepts
        linear = usable_gpu_count(run, n * time.days / b.max_days, gpu, seqs, seq_len, pipeline) if (
            time is not None and gpu is not None) else None
        if best_days > b.max_days:
            need = gpus_for_days(training_flops, b.max_days, floor_peak, MAX_PLAUSIBLE_MFU)
            can = usable_gpu_count(run, need, gpu, seqs, seq_len, pipeline) if gpu is not None else None
            if can is None:
                gpus = (f"more GPUs than any count the plan accepts ({need:,.3g} even at {at}: past the spec's limit "
                        "or any count the batch splits over)")
            else:
                rounded = "" if can == need else (f" (the floor's {need:,} rounded up to {'whole nodes and ' if can > gpn else ''}"
                                                  "a count the batch splits over)")
                gpus = f"at least {can:,} GPUs even at {at}{rounded}"
            own = ""
            if linear is not None and can is not None:
                own = (f"; llmc's own prediction ({100 * time.mfu:.1f}% MFU) needs {'more: ' if linear > can else ''}"
                       f"~{linear:,} GPUs if it held at that count (plan it to check)")
            sink.add("B003", "error", "budget.max_days",
                     f"{training_flops:.3g} FLOPs cannot finish in {b.max_days:g} days on {n} GPUs even at "
                     f"{at} ({best_days:.1f} days)",
                     f"needs max_days >= {best_days:.1f}, {_fewer_tokens(run, b.max_days / best_days)}, or "
                     f"{gpus}{own}")
        elif time is not None and time.days > b.max_days:
            sink.add("B001", "error", "budget.max_days",
                     f"predicted {time.days:.1f} days > max_days {b.max_days:g} "
                     f"(at {100 * time.mfu:.1f}% MFU{saves})",
                     f"the planned layout needs ~{time.days / b.max_days:.2f}x the GPUs or time"
                     + (f": ~{linear:,} GPUs if its {100 * time.mfu:.1f}% MFU held there (plan that count to check)"
                        if linear is not None else "")
                     + f"; or {_fewer_tokens(run, b.max_days / time.days, planned=True)}"
                     + f"; {best_days:.1f} days is the floor at {at}")
    b006 = b.max_usd is not None and price <= 0 and (gpu is None or gpu.key != "cpu")
    if b006:
        # a GPU without a price (a custom one defines none): every dollar figure is $0, and max_usd would pass
        sink.add("B006", "error", "budget.max_usd", f"max_usd ${b.max_usd:,.0f} cannot be judged: the GPU has no "
                 "price per GPU-hour (a custom GPU without a base part defines none), so the plan costs $0",
                 "set hardware.usd_per_gpu_hour, or budget in GPU-hours (budget.max_gpu_hours)")
    # per limit: its figure as shown, as the setting's value, the floor's rate, the cheaper remedy, B002's detail
    usd = (lambda v: f"${v:,.0f}", lambda v: f"{v:,.0f}", f" at ${price:g}/GPU-h", "a cheaper GPU-hour",
           f"{hours(cost.gpu_hours)} GPU-hours at ${price:g}, or " if cost is not None else "")
    gpu_h = (lambda v: f"{hours(v)} GPU-hours", hours, "", "a faster GPU", "")
    spends = ([("max_usd", b.max_usd, best_usd, cost.usd if cost is not None else None, usd)]
              if b.max_usd is not None and not b006 else [])
    spends += [("max_gpu_hours", b.max_gpu_hours, floor.gpu_hours,
                cost.gpu_hours if cost is not None else None, gpu_h)] if b.max_gpu_hours is not None else []
    for field, limit, least, predicted, (show, value, rate, cheaper, detail) in spends:
        # B003: the floor (the training FLOPs alone at the floor's MFU) is over the limit; else B002: the plan is
        if least > limit:
            sink.add("B003", "error", f"budget.{field}",
                     f"{training_flops:.3g} FLOPs cost at least {show(least)}{rate} even at {at}",
                     f"needs {field} >= {value(least)}, {cheaper}, or "
                     f"{_fewer_tokens(run, limit / least)}")
        elif predicted is not None and predicted > limit:
            sink.add("B002", "error", f"budget.{field}",
                     f"predicted {show(predicted)} > {field} {show(limit)}{f' ({saves[2:]})' if saves else ''}",
                     f"{detail}{_fewer_tokens(run, limit / predicted, planned=True)}; {show(least)} is the floor "
                     f"at {at}")
    _check_interruptions_budget(run, time, cost, sink)


def _fewer_tokens(run, share: float, planned: bool = False) -> str:
    """B001-B003's "fewer tokens" remedy with its figure: the tokens that fit the limit, ``share`` of the run's (the
    plan's days and cost scale with the steps; ``planned``: at the planned layout's speed, else at the floor's)."""
    from llmc.compiler.defaults import pretrain_paths

    at = f"{100 * share:.2g}% of {{}}" + (", at this plan's speed)" if planned else ", at the floor)")
    data, training = _pre(run)  # (a pretrain stage's own steps / data where it sets them)
    data_at, steps_at = pretrain_paths(run)
    if training.steps is not None:  # the trainer runs the pinned steps (data.tokens does not set them)
        return f"~{int(training.steps * share):,} steps ({at.format(steps_at)}"
    fit = data.tokens * share
    if fit > 0:  # (3 significant digits, rounded down: a figure rounded up would not fit the limit it is quoted for)
        unit = 10.0 ** (math.floor(math.log10(fit)) - 2)
        fit = math.floor(fit / unit) * unit
    return f"~{fit:.3g} tokens ({at.format(data_at + '.tokens')}"


def _rate(it) -> str:
    """Where an InterruptionNumbers' rate comes from, in a few words."""
    return "Llama 3's pre-training rate" if it.published_rate else "hardware.interruptions_per_gpu_day"


def _check_interruptions_budget(run, time, cost, sink: Sink) -> None:
    """B005 (warning): the plan meets budget.max_days / max_usd, but not with the interruptions expected at the
    published rate (``TimeNumbers.interruptions``, ``checkpoint_cost.interruptions``), which its days and cost leave
    out."""

    it = time.interruptions if time is not None else None
    b = run.budget
    if it is None:
        return
    if it.days is None:  # the run would never finish, whatever the budget
        fix = (f"save every {it.max_interval_steps:,} steps or fewer (training.checkpoint.interval_steps)"
               if it.max_interval_steps else "fewer GPUs or a faster restart and checkpoint read: no interval helps")
        sink.add("B005", "warning", "training.checkpoint.interval_steps",
                 f"at {it.per_gpu_day:.2g} unexpected interruptions per GPU-day ({_rate(it)}) one comes "
                 f"every ~{it.between_seconds / 60:.0f} min on {run.hardware.count:,} GPUs, and each loses "
                 f"~{it.lost_seconds / 60:.0f} min (a {it.restart_seconds / 60:g}-minute restart, the "
                 f"checkpoint read and half an interval redone): the run would never finish", fix)
        return
    if b is None:
        return
    what = (f"~{it.expected:,.0f} unexpected interruptions expected at {it.per_gpu_day:.2g} per GPU-day "
            f"({_rate(it)}), each losing ~{it.lost_seconds / 60:.0f} min")
    hint = (f"more frequent checkpoints redo less per interruption (training.checkpoint.interval_steps), a faster "
            f"restart than {it.restart_seconds / 60:g} minutes (training.checkpoint.restart_minutes), your fleet's "
            f"rate (hardware.interruptions_per_gpu_day), or a larger budget")
    if b.max_days is not None and time.days <= b.max_days < it.days:
        sink.add("B005", "warning", "budget.max_days",
                 f"with the {what}, the run takes ~{it.days:.1f} days > max_days {b.max_days:g} (the plan's "
                 f"{time.days:.1f} days assume none)", hint)
    if b.max_usd is not None and cost is not None and cost.usd <= b.max_usd < cost.usd * it.days / time.days:
        sink.add("B005", "warning", "budget.max_usd",
                 f"with the {what}, the run costs ~${cost.usd * it.days / time.days:,.0f} > max_usd "
                 f"${b.max_usd:,.0f} (the plan's ${cost.usd:,.0f} assumes none)", hint)
    if (b.max_gpu_hours is not None and cost is not None
            and cost.gpu_hours <= b.max_gpu_hours < cost.gpu_hours * it.days / time.days):
        sink.add("B005", "warning", "budget.max_gpu_hours",
                 f"with the {what}, the run takes ~{cost.gpu_hours * it.days / time.days:,.0f} GPU-hours > "
                 f"max_gpu_hours {hours(b.max_gpu_hours)} (the plan's {hours(cost.gpu_hours)} assume none)", hint)


def check_pipeline_budget(run, pipeline, sink: Sink) -> None:
    """B004 (warning): the whole pipeline, pre-training plus the other stages, over ``budget.max_days`` /
    ``max_usd``; B001/B002 judge pre-training alone, with its searched layout."""
    b = run.budget
    rest = ", ".join(pipeline.estimated) or "no other stage"
    stages = ", ".join(pipeline.counted)
    for field_, limit, value, what, remedy in (
            ("max_days", b.max_days, pipeline.days, f"take {pipeline.days:.1f} days", "more GPUs"),
            ("max_usd", b.max_usd, pipeline.usd, f"cost ${pipeline.usd or 0:,.0f}", "a cheaper GPU-hour"),
            ("max_gpu_hours", b.max_gpu_hours, pipeline.gpu_hours, f"take {hours(pipeline.gpu_hours)} GPU-hours",
             "a faster layout")):
        if limit is None or value is None or value <= limit:
            continue
        bound = {"max_days": f"{limit:g}", "max_usd": f"${limit:,.0f}"}.get(field_, f"{limit:,.0f}")
        sink.add("B004", "warning", f"budget.{field_}",
                 f"the pipeline is predicted to {what} > {field_} {bound} (stages {stages})",
                 f"stages other than pre-training ({rest}) are uncalibrated estimates; fewer steps or {remedy}")


def check_mfu(run, gpu, time, calibration, sink: Sink) -> None:
    """P020 (error): the plan's predicted model FLOP/s exceed the dense peak of the fastest tensor cores its precision
    runs on (hardware.peak_flops: bf16's for bf16, fp8's for fp8, FP4's for nvfp4) -- a step faster than the GPU can
    compute, which no layout achieves. MFU is quoted against bf16's peak for fp8 and nvfp4 (timing.mfu_peak_dtype),
    where above 100 % is possible (NVFP4 Llama 3.1 405B on GB300, Megatron-Bridge 26.06: 1,440 tokens/s/GPU x ~2.6
    TFLOP per token is ~150 % of bf16's 2.5 PFLOP/s), so the bound is that precision's own peak; for bf16 it is an MFU of
    100 %. ``calibration``: the plan's ``result.CalibrationStatus`` (its applied compute factors are the usual cause:
    a calibration fitted on runs whose tokens/s were per node or per job)."""
    from llmc.compiler.hardware import peak_flops
    from llmc.compiler.timing import mfu_peak, mfu_peak_dtype

    precision = run.training.precision
    try:
        achieved, top = time.mfu * mfu_peak(gpu, precision), peak_flops(gpu, precision)
    except ValueError:  # a precision the part lacks: T005 / T010 / T014 say so
        return
    if not top > 0 or achieved <= top:
        return
    of = mfu_peak_dtype(precision)
    what = (f"the predicted MFU is {100 * time.mfu:.1f}% of the {of} dense peak" if of == precision else
            f"the predicted model FLOP/s are {100 * achieved / top:.1f}% of the {precision} dense peak (MFU "
            f"{100 * time.mfu:.1f}% of {of}'s)")
    applied = (calibration.applied or {}).get("tokens_per_s", {}).get("applied") if calibration is not None else None
    if calibration is not None and calibration.calibrated and applied is not False:
        f = calibration.applied_factors or calibration.factors or {}
        name = (calibration.file or {}).get("path") or "the calibration"
        hint = (f"the calibration {name} (compute_scale={f.get('compute_scale', 1.0):.3f} "
                f"comm_scale={f.get('comm_scale', 1.0):.3f}) makes the step faster than the GPU can compute: its "
                "runs' tokens/s are likely per node or per job rather than per GPU; calibrate again on corrected runs, "
                "or plan without it")
        path = "calibration"
    else:
        hint = "no calibration is applied, so this is an llmc bug: please report it with this spec"
        path = "hardware.gpu"
    sink.add("P020", "error", path, f"{what}: a step faster than the GPU's tensor cores can compute", hint)
