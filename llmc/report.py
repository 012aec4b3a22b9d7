"""The ``llmc plan`` text report (rich tables), deterministic so golden files are stable.

``render_text(compiled)`` returns the report as plain text at a fixed width (what the golden tests
compare); ``print_report(compiled)`` prints it to the terminal (colours when it is a TTY). Every
number comes from :class:`~llmc.compiler.result.Compiled`; nothing is computed here beyond
unit conversion and percentages.
"""

from __future__ import annotations

import io
import sys

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llmc.compiler.plan import EP_SPANS_TP, expert_shards
from llmc.compiler.units import gb, gib, hours
from llmc.diagnostics import sort_diagnostics

WIDTH = 120
BAR = 60  # characters of the memory / step-time bars
_MEM_PARTS = (("weights", "W"), ("grads", "G"), ("optimizer", "O"), ("activations", "A"), ("buffers", "B"))
_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


# ----------------------------------------------------------------------------------------- formatting


def human(x: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (3 significant digits; K, M, B, T; 999,885,952 -> '1B', not '1e+03M')."""
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if float(f"{abs(x):.3g}") >= div:
            return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def usd(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:,.2f}"


def _kv_table(title: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_header=False, pad_edge=False,
              title_style="bold")
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value")
    return t


def _dflt(name: str, defaults: list[str]) -> str:
    return " (default)" if name in defaults else ""


# ----------------------------------------------------------------------------------------- sections


def _header(c) -> Text:
    s = c.spec
    g = c.gpu
    gpu = f"{s.hardware.count} x {g.name}" if g is not None else f"{s.hardware.count} x {s.hardware.gpu} (unknown)"
    t = Text()
    t.append(f"llmc plan: {s.name}\n", style="bold")
    n = len(c.overrides)
    sha = (f"sha256 {c.spec_sha256[:12]}" if not n else  # with --set: the file's own hash, and the overrides counted
           f"file sha256 {(c.spec_file_sha256 or 'unknown')[:12]} + {n} --set override{'s' if n > 1 else ''}")
    t.append(f"spec {c.spec_path} ({sha}), {gpu}")
    if g is not None and s.hardware.count > g.gpus_per_node:
        t.append(f", {g.gpus_per_node} per node")
    return t


def _model(c) -> Table:
    a, m = c.spec.model, c.model
    t = _kv_table("Model")
    shape = (f"{a.name}: {a.n_layers} layers, d_model {a.d_model}, {a.n_heads} heads / {a.kv_heads} kv "
             f"(head_dim {a.hd}), d_ff {a.d_ff}, vocab {a.vocab_size}")
    if a.mla is not None:
        shape += f", MLA kv_lora {a.mla.kv_lora_rank}"
    if a.qk_norm:
        shape += ", q/k norms" + (" over the whole projections" if a.qk_norm_scope == "projection" else "")
    if a.norm_placement == "post":
        shape += ", norms on the attention / MLP outputs (OLMo 2)"
    if a.norm_placement == "sandwich":
        shape += (", norms before and after attention and MLP (Gemma: 1 + weight), GeGLU, embeddings x sqrt(d_model)"
                  + (f", softmax scale {a.query_pre_attn_scalar}^-0.5" if a.query_pre_attn_scalar else ""))
    if a.attn_logit_softcap is not None:
        shape += (f", attention scores soft-capped at {a.attn_logit_softcap:g} (no fused kernel: every score is kept "
                  "for the backward)")
    if a.final_logit_softcap is not None:
        shape += f", logits soft-capped at {a.final_logit_softcap:g}"
    if a.sliding_window:
        shape += f", sliding-window attention ({a.sliding_window} tokens"
        if a.full_attention_layers:
            shape += (f"; full attention in {len(a.full_attention_layers)} of {a.n_layers} layers: "
                      f"{_layer_list(a.full_attention_layers)}")
        shape += ")"
    if a.moe is not None:
        mo = a.moe
        shape += (f", MoE {mo.num_experts} experts top-{mo.top_k}"
                  + (f" + {mo.num_shared_experts} shared" if mo.num_shared_experts else "")
                  + (f", first {mo.dense_layers} dense" if mo.dense_layers else ""))
    if a.multipliers is not None:
        mu = a.multipliers
        shape += (f", muP multipliers: embedding x{mu.embedding:g}, residual x{mu.residual:g}, softmax scale "
                  f"{mu.softmax_scale(a.hd):.4g}, logits /{mu.logits:g}")
    t.add_row("architecture", shape)
    t.add_row("RoPE", _rope_text(a))
    params = f"{m.params_total:,} total ({human(m.params_total)})"
    if m.params_active != m.params_total:
        params += f", {m.params_active:,} active ({human(m.params_active)})"
    params += f", embedding {human(m.params_embedding)}"
    t.add_row("parameters", params)
    top = sorted(m.breakdown.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{k} {100 * v / m.params_total:.1f}%" for k, v in top[:6])
    t.add_row("breakdown", shown + (f", {len(top) - 6} more" if len(top) > 6 else ""))
    t.add_row("KV cache", f"{m.kv_bytes_per_token:,} B/token (bf16, all layers)")
    return t


def _rope_text(a) -> str:
    """RoPE as the model runs it: base, the dims it rotates, the context-extension rule."""
    dims = a.mla.qk_rope_head_dim if a.mla is not None else a.partial_rotary
    out = f"theta {a.rope_theta:g}" + (f", on {dims} of {a.hd} dims per head" if dims else "")
    rs = a.rope_scaling
    if rs is not None:
        rule = {"llama3": "Llama 3.1 bands", "yarn": "YaRN", "linear": "linear interpolation",
                "longrope": "LongRoPE (long factors past it)"}[rs.type]
        out += f", {rule} x{rs.factor:g} from {rs.original_max_position:,} tokens"
    if a.window_rope_apart and (rs is not None or a.sliding_rope_theta is not None):
        out += (f"{' (full-attention layers)' if rs is not None else ''}; windowed layers theta "
                f"{a.window_rope_theta:g}{', unscaled' if rs is not None else ''}")
    if a.nope_layers:
        out += f"; none in {len(a.nope_layers)} of {a.n_layers} layers (NoPE: {_layer_list(a.nope_layers)})"
    return out + f"; max_seq_len {a.max_seq_len:,}"


def _layer_list(layers: tuple[int, ...]) -> str:
    return ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")


def _compute(c) -> Table:
    from llmc.compiler.scaling import FIT_MIN_PARAMS, TOKENS_PER_PARAM, data_limit_note, per_param_text

    x = c.compute
    h = c.hyper
    t = _kv_table("Compute")
    trained = ("" if h is None or "steps" in h.defaults else
               f" ({h.steps:,} pinned steps x the {h.global_batch_tokens:,}-token batch, not data.tokens)")
    t.add_row("training FLOPs", f"{x.training_flops:.3e} = {x.flops_per_token:.3e} FLOPs/token x {human(x.tokens)} "
              f"tokens{trained}")
    t.add_row("convention", x.convention)
    ratio = x.tokens_per_param / TOKENS_PER_PARAM
    moe = c.spec.model.moe is not None
    t.add_row("tokens/param", f"{per_param_text(x.tokens_per_param)} per active parameter ({ratio:.2g}x the "
              f"compute-optimal {TOKENS_PER_PARAM:.0f}; Chinchilla tokens {human(x.chinchilla_tokens)})"
              + ("; 20/param is a dense-model rule, applied to the MoE's active parameters as a heuristic (no MoE "
                 "scaling law)" if moe else ""))
    a3 = (f"; Approach 3's published constants would give {per_param_text(x.approach3_tokens_per_param)}/param"
          if x.approach3_tokens_per_param is not None else "")
    opt = (f"N {human(x.optimal_params)} active params on D {human(x.optimal_tokens)} tokens for the same compute "
           f"C = 6ND ({TOKENS_PER_PARAM:.0f} tokens/param: Hoffmann et al. 2022 Approaches 1-2, Table 3{a3})")
    note = data_limit_note(x.optimal_tokens, x.unique_tokens, larger_model=x.optimal_params > c.model.params_active)
    t.add_row("compute-optimal", opt + (f"; {note}" if note else ""))
    if x.predicted_loss is not None and x.optimal_loss is not None:
        t.add_row("predicted loss", f"{x.predicted_loss:.3f} nats/token at this N, D; {x.optimal_loss:.3f} at the "
                  "compute-optimal N, D (Besiroglu et al. 2024 refit of Hoffmann et al. 2022's L(N, D), on its data: "
                  "MassiveText and its tokenizer; for comparing N/D trade-offs, not a prediction for this data"
                  + ("; a dense fit at the active N: an MoE reaches lower loss" if moe else "")
                  + (f"; the fit counts every token as new, and this run repeats its {human(x.unique_tokens)} unique "
                     f"tokens {x.tokens / x.unique_tokens:.1f} times" if x.unique_tokens and x.tokens > x.unique_tokens
                     else "") + ")")
    elif x.loss_fit is not None:  # from scratch, but smaller than any model the fits saw
        t.add_row("predicted loss", f"none: {human(c.model.params_active)} active params is below the "
                  f"{human(FIT_MIN_PARAMS)} of the smallest model the Besiroglu et al. 2024 / Hoffmann et al. 2022 fits "
                  "were made from")
    return t


def _lr_text(c) -> str:
    """The schedule as every backend trains it (torchtitan's: ``llmc.lr_schedule``): the decay approaches
    min_lr and reaches it one step after the last, so the last step's LR is said as a number; wsd names its cooldown
    shape; a constant schedule has no min."""
    from llmc.lr_schedule import WSD_COOLDOWN, WSD_COOLDOWN_SOURCE

    h, d = c.hyper, c.hyper.defaults
    frac = c.spec.training.schedule.decay_fraction
    kind = h.schedule
    if kind == "wsd":
        kind = (f"wsd ({WSD_COOLDOWN} cooldown over the last {100 * frac:g}%, {h.decay_steps:,} steps: "
                f"{WSD_COOLDOWN_SOURCE})")
    text = f"peak {h.lr:.3g}{_dflt('lr', d)}, "
    if h.schedule == "constant":
        text += "constant (no decay)"
    else:
        text += (f"{kind} toward min {h.min_lr:.3g}{_dflt('min_lr', d)} (reached one step past the last, as in "
                 f"torchtitan's schedule; last step {h.last_lr:.4g})")
    return text + f"; warmup {h.warmup_steps:,} steps{_dflt('warmup_steps', d)}"


def _hyper(c) -> Table:
    h = c.hyper
    d = h.defaults
    t = _kv_table("Training")
    t.add_row("batch", f"{h.global_batch_tokens:,} tokens = {h.global_batch_seqs} x {h.seq_len}"
              + _dflt("global_batch_tokens", d))
    t.add_row("steps", f"{h.steps:,}{_dflt('steps', d)}")
    t.add_row("learning rate", _lr_text(c))
    t.add_row("checkpoints", f"every {h.checkpoint_interval:,} steps{_dflt('checkpoint_interval', d)}, "
              f"{'async' if h.checkpoint_async else 'sync'}{_dflt('checkpoint_async', d)}")
    tr = c.spec.training
    o = tr.optimizer
    clip = f"grad clip {tr.grad_clip:g}" if tr.grad_clip is not None else "no grad clip"
    left_out = {"embeddings_and_1d": "not on token embeddings, norms, biases",  # training.optimizer.no_decay
                "1d": "not on norms, biases; embeddings decayed", "none": "on every parameter"}[o.no_decay]
    wd = f"{o.weight_decay:g} ({left_out}: no_decay {o.no_decay})" if o.weight_decay else "0"
    t.add_row("optimizer", f"AdamW betas ({o.betas[0]:g}, {o.betas[1]:g}), eps {o.eps:g}, weight decay {wd}, {clip}"
              + (f", z-loss {tr.z_loss:g}" if tr.z_loss else ""))
    t.add_row("precision", tr.precision + (f", {c.backend.fp8}" if c.backend is not None and c.backend.fp8 else ""))
    return t


def _plan(c) -> Table:
    p = c.plan
    t = _kv_table("Parallelism plan")
    deg = (f"dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x cp {p.cp} x tp {p.tp} x pp {p.pp}"
           f" = {p.world} GPU{'s' if p.world > 1 else ''}")
    if p.ep > 1:
        be = c.backend.name if c.backend is not None else None
        if be in EP_SPANS_TP:
            efsdp = expert_shards(p.dp_shard, p.cp, p.tp, p.ep, be)[1]
            deg += f"; experts on ep {p.ep} x efsdp {efsdp} = dp_shard x cp x tp (torchtitan's expert mesh)"
        else:
            deg += f"; ep {p.ep} (carved out of dp_shard x cp)"
    t.add_row("degrees", deg)
    zero = {0: "DDP (no sharding)", 1: "ZeRO-1 (optimizer sharded)", 2: "ZeRO-2 (optimizer + grads sharded)",
            3: "ZeRO-3 / FSDP (weights, grads, optimizer sharded)"}[p.zero_stage]
    par = c.spec.parallelism
    off = ("; optimizer and parameters offloaded to the host (ZeRO-Infinity)" if par.offload_params else
           "; optimizer offloaded to the host (ZeRO-Offload)" if par.offload_optimizer else "")
    ranks = p.dp_shard * p.cp
    dp_text = f"{zero} over {ranks} ranks" if ranks > 1 else zero
    if p.zero_stage in (1, 2) and ranks > 1 and c.backend is not None:
        from llmc.compiler.backends import get_backend

        if get_backend(c.backend.name).zero12 == "fsdp2":  # how the backend's job runs ZeRO-1/2 (Backend.zero12)
            # FSDP2 reshard_after_forward=False; under PP torch.distributed.pipelining holds the reshard (and the
            # gradient sync) until the step's last micro-batch (backends._FSDP2_ZERO12)
            held = ("through the step (the pipeline reshards after its last micro-batch)" if p.pp > 1 else
                    "from each micro-batch's forward to its backward")
            dp_text = (f"FSDP2 over {ranks} ranks with the parameters kept gathered (reshard_after_forward=False: "
                       f"{c.backend.name}'s ZeRO-{p.zero_stage}): fp32 weights, grads and optimizer sharded, the bf16 "
                       f"parameters all-gathered and held {held}")
    elif p.zero_stage == 3 and p.pp > 1 and ranks > 1 and c.backend is not None and c.backend.name == "torchtitan":
        # torchtitan's "default" reshard policy does not reshard after forward under PP (distributed/fsdp.py
        # get_fsdp_reshard_after_forward_policy; emit.torchtitan): the plan's memory and time hold it (= ZeRO-1's)
        dp_text = (f"FSDP2 over {ranks} ranks, torchtitan's default reshard policy: under pipeline parallelism it "
                   "keeps each stage's bf16 parameters gathered through the step (as ZeRO-1; fp32 weights, grads and "
                   "optimizer sharded), so ZeRO-3 here holds and costs what ZeRO-1 does")
    t.add_row("data parallel", dp_text + off)
    if p.pp > 1:
        sched = p.pp_schedule + (f", {p.pp_virtual_stages} virtual stages per rank"
                                 if p.pp_schedule == "Interleaved1F1B" else "")
        t.add_row("pipeline", sched)
    t.add_row("batch split", f"micro_batch {p.micro_batch} x grad_accum {p.grad_accum} x dp {p.dp} = "
              f"{p.global_batch_seqs} sequences")
    ac_text = f"activation checkpointing {p.ac_label}"
    if p.activation_checkpointing == "partial":
        where = "of every pipeline chunk" if p.pp > 1 else "of the model"
        ac_text += f": the first {p.ac_layers} blocks {where} recomputed whole, the others keep their activations"
    if p.loss_chunk_tokens:
        ac_text += f"; the output head and loss in slices of {p.loss_chunk_tokens} tokens, each recomputed in the backward"
    t.add_row("recompute", ac_text)
    _model_rows(t, c)
    for i, r in enumerate(c.reasons):
        t.add_row("why" if i == 0 else "", r)
    return t


def _model_rows(t: Table, c) -> None:
    """Which backend the numbers are for, and whether they are calibrated (with the expected error)."""
    if c.backend:
        t.add_row("backend", c.backend.reason)
    if c.calibration:
        t.add_row("calibration", c.calibration.reason)


def _bar(parts: list[tuple[str, float]], total: float, width: int = BAR) -> str:
    """Stacked text bar: one letter per part, '.' for what is left of ``total``."""
    out = []
    used = 0
    for letter, v in parts:
        n = int(round(width * v / total)) if total else 0
        n = min(n, width - used)
        out.append(letter * n)
        used += n
    return "[" + "".join(out) + "." * (width - used) + "]"


def _memory(c) -> Table:
    m = c.memory
    t = _kv_table("Memory per GPU (peak pipeline stage)")
    br = m.breakdown
    cap = m.capacity_bytes
    scale = max(cap, m.per_gpu_bytes)
    t.add_row("bar", _bar([(letter, br.get(k, 0)) for k, letter in _MEM_PARTS], scale)
              + f" {gib(m.per_gpu_bytes)} / {gib(cap)} ({100 * m.per_gpu_bytes / cap:.0f}%)")
    t.add_row("", "  ".join(f"{letter}={k} {gib(br.get(k, 0))}" for k, letter in _MEM_PARTS))
    if m.reserved_bytes:
        t.add_row("allocator", f"{gib(m.allocated_bytes)} allocated, {gib(m.reserved_bytes)} reserved, "
                  f"+{gib(m.outside_allocator_bytes)} outside the allocator (CUDA context, NCCL); {m.backend} backend")
    band = ((c.calibration.bands or {}).get("memory") if c.calibration else None)
    if band:  # the expected error of the figure above: the calibration's leave-one-out, else llmc's measured error
        t.add_row("error", f"expected +-{band['mean_abs_pct']:.1f}% mean, {band['max_abs_pct']:.1f}% max "
                  f"({band['basis']})")
    if len(m.per_stage_bytes) > 1:
        t.add_row("stages", f"{len(m.per_stage_bytes)} stages, {gib(min(m.per_stage_bytes))} .. "
                  f"{gib(max(m.per_stage_bytes))}")
    if m.host_bytes_per_node:
        params = ", and the 16-bit parameters" if c.spec.parallelism.offload_params else ""
        t.add_row("host", f"{gib(m.host_bytes_per_node)} of CPU memory per node (optimizer offload: fp32 master "
                  f"weights, AdamW moments and gradients of its GPUs' shares{params})")
    return t


def _unfit(c) -> Table:
    """The closest layout when none fits: its predicted memory and step time, so the user sees by how much."""
    u = c.unfit
    t = _kv_table("Closest layout (does not fit)")
    p, m = u.plan, u.memory
    t.add_row("degrees", f"dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x cp {p.cp} x tp {p.tp} x "
              f"pp {p.pp}, micro_batch {p.micro_batch}, AC {p.ac_label}")
    t.add_row("memory", f"{gib(m.per_gpu_bytes)} per GPU of {gib(m.capacity_bytes)} "
              f"({100 * m.per_gpu_bytes / m.capacity_bytes:.0f}%)")
    t.add_row("step", f"{duration(u.time.step_seconds)} per step, MFU {100 * u.time.mfu:.1f}%")
    _model_rows(t, c)
    return t


def _time(c) -> Table:
    tm, co, s = c.time, c.cost, c.spec
    t = _kv_table("Time and cost")
    of = f" of the {tm.mfu_peak_dtype} dense peak" if tm.mfu_peak_dtype else ""
    t.add_row("step", f"{duration(tm.step_seconds)} per step, MFU {100 * tm.mfu:.1f}%{of}, "
              f"{human(tm.tokens_per_second)} tokens/s")
    n = s.hardware.count
    ck = tm.checkpoint
    saves = f" + {ck.saves:,} checkpoint save{'s' if ck.saves > 1 else ''}" if ck is not None else ""
    t.add_row("run", f"{tm.steps:,} steps{saves} = {duration(tm.days * 86400)} on {n} GPU{'s' if n > 1 else ''}")
    if ck is not None:
        t.add_row("checkpoints", _checkpoints(ck, tm.days * 86400))
    gh = hours(co.gpu_hours)
    price = (" (default: the hardware table's rough on-demand reference; set hardware.usd_per_gpu_hour)"
             if co.price_is_default else " (no price for this GPU: set hardware.usd_per_gpu_hour)"
             if co.usd_per_gpu_hour <= 0 and c.gpu is not None and c.gpu.key != "cpu" else "")
    t.add_row("cost", f"{gh} GPU-hours x ${co.usd_per_gpu_hour:g}/GPU-hour{price} = {usd(co.usd)}")
    if tm.interruptions is not None and (tm.interruptions.expected is None or tm.interruptions.expected >= 0.5):
        t.add_row("interruptions", _interruptions(tm.interruptions, tm.days, co.usd))
    br = {k: v for k, v in tm.breakdown.items() if v > 0}
    total = sum(br.values()) or 1.0
    top = sorted(br.items(), key=lambda kv: -kv[1])
    t.add_row("step breakdown", ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in top))
    return t


def _interruptions(it, days: float, cost: float) -> str:
    """The expected unexpected interruptions (``InterruptionNumbers``): not in the run's days and cost above."""
    rate = "Llama 3's pre-training, arXiv:2407.21783" if it.published_rate else "hardware.interruptions_per_gpu_day"
    each = (f"each losing ~{duration(it.lost_seconds)} (a {duration(it.restart_seconds)} restart"
            f"{' (an estimate)' if it.estimated_restart else ''} + "
            f"reading the checkpoint {duration(it.load_seconds)} + half an interval redone "
            f"{duration(it.rollback_seconds)})")
    if it.days is None:
        fix = (f"save every {it.max_interval_steps:,} steps or fewer" if it.max_interval_steps else
               "no checkpoint interval helps: a restart and the checkpoint read alone take longer")
        return (f"one every ~{duration(it.between_seconds)} at {it.per_gpu_day:.2g} per GPU-day ({rate}), {each}: more "
                f"than the time between them, so the run would never finish; {fix}")
    return (f"~{it.expected:,.1f} expected at {it.per_gpu_day:.2g} per GPU-day ({rate}), "
            f"{each}: {duration(it.days * 86400)} and ~{usd(cost * it.days / days)} "
            f"(+{100 * it.extra_fraction:.1f}%); the run and cost above assume none")


def _on_disk(disk: float, kept: float, parts: list[tuple[str, float]], more: str) -> str:
    """What a run keeps on the checkpoint storage (``checkpoint_cost.on_disk``): at its peak and once finished, what
    it keeps (``parts``: (what, bytes), those of 0 bytes left out), and ``more``: what it holds while it runs."""
    kept_parts = " + ".join(f"{what} {gb(b)}" for what, b in parts if b)
    return f"on disk: {gb(disk)} at the peak, {gb(kept)} kept at the end ({kept_parts}; {more})"


def _checkpoints(ck, run_seconds: float, disk: bool = True) -> str:
    """The checkpoint saves' stall (``CheckpointNumbers``) and the assumptions it rests on; ``disk``: and what the run
    keeps on disk (``disk_bytes``, where known)."""
    share = 100 * ck.total_seconds / run_seconds if run_seconds > 0 else 0.0
    pct = f"{share:.1f}%" if share >= 0.1 or share == 0 else f"{share:.2g}%"
    if ck.mode == "async":
        each = (f"{ck.saves - 1:,} x {duration(ck.stall_seconds)} async (staging {gb(ck.gpu_bytes)} per GPU over PCIe "
                f"at {ck.staging_gbps:.3g} GB/s) + the last written in full ({duration(ck.write_seconds)})"
                if ck.saves > 1 else f"1 x {duration(ck.write_seconds)} (the last, written in full)")
    else:
        each = f"{ck.saves:,} save{'s' if ck.saves > 1 else ''} x {duration(ck.stall_seconds)} sync"
    hashed = (f", each save then hashed by llmc's trainer ({duration(ck.hash_seconds)}: sha256 of a rank's files)"
              if ck.hash_seconds else "")
    final = (f" + rank 0's closing model.pt of the weights ({gb(ck.final_bytes)}, "
             f"{duration(ck.final_seconds)} written and hashed)" if ck.final_seconds else "")
    on_disk = ("; " + _on_disk(ck.disk_bytes, ck.kept_bytes,
                               [(f"keep_latest {ck.keep_latest} checkpoints of", ck.state_bytes),
                                ("model.pt", ck.final_bytes), ("the Hugging Face export", ck.export_bytes)],
                               "a save being written is one checkpoint more") if disk and ck.disk_bytes else "")
    return (f"{each}{final} = {duration(ck.total_seconds)}, {pct} of the run; {gb(ck.state_bytes)} per checkpoint "
            f"({ck.writer}), {gb(ck.node_bytes)} per node at {ck.write_gbps:g} GB/s ({ck.write_source}){hashed}, "
            f"every {ck.interval:,} steps{on_disk}")


def _stage_checkpoints(ck, run_seconds: float) -> str:
    """A stage's checkpoint saves (``StageCheckpoints``): its periodic saves as pre-training's, then its final save
    when that holds another state."""
    p, f = ck.periodic, ck.final
    parts = [_checkpoints(p, run_seconds, disk=f is None)] if p is not None else []
    if f is not None:
        parts.append(f"{'then ' if parts else ''}the final save {duration(f.total_seconds)}: {gb(f.state_bytes)} "
                     f"({f.writer}) at {f.write_gbps:g} GB/s"
                     + (f", hashed in {duration(f.hash_seconds)}" if f.hash_seconds else ""))
        if ck.disk_bytes:  # post-training: its resume saves (while it runs), its final save and its export
            parts.append(_on_disk(ck.disk_bytes, ck.kept_bytes,
                                  [("the final save", f.state_bytes), ("the Hugging Face export", ck.export_bytes)],
                                  f"while it runs, keep_latest {ck.keep_latest} resume checkpoints of "
                                  f"{gb(p.state_bytes)} + one being written, removed at the end" if p is not None
                                  else "no other save"))
    return f"checkpoints: {ck.saves:,} save{'s' if ck.saves > 1 else ''} = {duration(ck.seconds)}; " + "; ".join(parts)


def _budget(c) -> Table | None:
    b = c.spec.budget
    if b.max_days is None and b.max_usd is None and b.max_gpu_hours is None:
        return None
    t = _kv_table("Budget")
    rows = (("max_days", b.max_days, c.time.days if c.time else None, lambda x: f"{x:g}", lambda x: f"{x:.1f}", " days"),
            ("max_usd", b.max_usd, c.cost.usd if c.cost else None, usd, usd, ""),
            ("max_gpu_hours", b.max_gpu_hours, c.cost.gpu_hours if c.cost else None, hours, hours, " GPU-hours"))
    for key, limit, value, shown_limit, shown_value, unit in rows:
        if limit is None:
            continue
        if value is None:
            t.add_row(key, f"{shown_limit(limit)} (no plan)")
        else:
            t.add_row(key, f"{shown_value(value)} of {shown_limit(limit)}{unit} "
                      f"({'ok' if value <= limit else 'EXCEEDED'}, {100 * value / limit:.0f}%)")
    if c.time is not None and c.budget_floor is not None:  # B003's yardstick (checks.budget_floor)
        f = c.budget_floor
        t.add_row("floor", f"{f.days:.1f} days, {hours(f.gpu_hours)} GPU-hours, {usd(f.usd)} at {f.basis}")
    return t


def _alternatives(c) -> Table | None:
    if not c.alternatives:
        return None
    from llmc.compiler.search import describe

    t = Table(title="Alternatives (best plan of other tp/pp/cp/ep layouts)", title_justify="left",
              box=box.SIMPLE_HEAD, title_style="bold", pad_edge=False)
    for col, just in (("plan", "left"), ("step", "right"), ("MFU", "right"), ("memory", "right"),
                      ("vs chosen", "right")):
        t.add_column(col, justify=just, no_wrap=col != "plan")
    for a in c.alternatives:
        t.add_row(describe(a.plan), duration(a.step_seconds), f"{100 * a.mfu:.1f}%", gib(a.per_gpu_bytes), a.reason)
    return t


def _rejected(c) -> Table | None:
    counts = (c.search or {}).get("rejected", {})
    if not counts and not c.rejected:
        return None
    from llmc.compiler.search import describe

    t = _kv_table("Rejected candidates")
    labels = {"memory": "do not fit in memory", "batch": "batch identity impossible",
              "tp": "TP would leave NVLink", "heads": "heads not divisible by tp", "pp": "more stages than layers",
              "cp": "seq_len not divisible for CP", "ep": "EP does not divide the experts", "pins": "conflict with pins",
              "pruned": "pruned (step-time bound cannot beat the chosen plan)"}
    if counts:
        t.add_row("counts", ", ".join(f"{n} {labels.get(k, k)}" for k, n in sorted(counts.items())))
    seen, mem_rej = set(), []
    for r in c.rejected:  # the closest memory misses, one per (tp, pp, cp, ep) layout
        key = (r.plan.tp, r.plan.pp, r.plan.cp, r.plan.ep)
        if r.per_gpu_bytes and key not in seen:
            seen.add(key)
            mem_rej.append(r)
    shown = mem_rej[:3] + [r for r in c.rejected if not r.per_gpu_bytes][:3]
    for i, r in enumerate(shown):
        t.add_row("closest" if i == 0 else "", f"{describe(r.plan)}: {r.reason}")
    return t


def _stages(c) -> Table | None:
    rows = list(c.stages)
    if len(rows) <= 1 and not c.spec.stages:
        return None
    pipe = c.pipeline
    caption = None
    if pipe is not None:
        head = "pre-training from the searched plan, the other stages" if c.time is not None else "each stage"
        caption = f"time: {head} from llmc's time model on their own layout (uncalibrated)"
    t = Table(title="Stages", title_justify="left", box=box.SIMPLE_HEAD, title_style="bold", pad_edge=False,
              caption=caption, caption_justify="left", show_footer=pipe is not None)
    cols = ("stage", "kind", "init from", "steps", "lr", "trainable", "memory/GPU", "time", "cost")
    foot = {}
    if pipe is not None:
        foot = {"stage": "pipeline", "time": duration(pipe.days * 86400) if pipe.counted else "-",
                "cost": usd(pipe.usd) if pipe.usd is not None and pipe.counted else "-"}
        if pipe.unknown:
            foot["init from"] = f"(without {', '.join(pipe.unknown)})"
    for col in cols:
        t.add_column(col, footer=foot.get(col, ""), justify="left" if col in ("stage", "kind", "init from") else "right")
    for s in rows:
        days, cost = (c.time.days, c.cost.usd if c.cost else None) if s.kind == "pretrain" and c.time else (
            (s.time.days, s.time.usd) if s.time is not None else (None, None))
        t.add_row(s.name, s.kind, s.init_from or "-", f"{s.steps:,}" if s.steps is not None else "-",
                  f"{s.lr:.3g}", human(s.trainable_params), gib(s.memory.per_gpu_bytes),
                  duration(days * 86400) if days is not None else "-",
                  usd(cost) if cost is not None else "-")
    return t


def _stage_notes(c) -> Text | None:
    """Why each stage's plan looks as it does (``stages[].notes``: layout, models held, loss slices, sampling), what
    its checkpoint saves stall it and keep on disk (``stages[].time.checkpoint``), and the pipeline's disk figure."""
    rows = [(s.name, n) for s in c.stages
            for n in [*s.notes, *([_stage_checkpoints(s.time.checkpoint, s.time.days * 86400)]
                                  if s.time is not None and s.time.checkpoint is not None and s.time.days else [])]]
    pipe = c.pipeline
    if pipe is not None and pipe.disk_bytes:  # (PipelineTime.disk_bytes, checkpoint_cost.pipeline_disk)
        rows.append(("pipeline", f"on disk: {gb(pipe.disk_bytes)} at the peak, the stages run one after another, each "
                                 "finished one keeping its checkpoints and Hugging Face export"
                                 + (f"; without {', '.join(pipe.disk_unknown)} (steps not known)"
                                    if pipe.disk_unknown else "")))
    if not rows or (len(c.stages) <= 1 and not c.spec.stages):
        return None
    width = max(len(name) for name, _ in rows)
    import textwrap

    out = Text("Stage notes\n\n", style="bold")  # (laid out as the tables are: title, blank line, rows, blank line)
    pad = " " * (width + 4)  # (a note's lines wrapped under its first, as the tables' cells wrap)
    out.append("\n".join(textwrap.fill(note, WIDTH - 1, initial_indent=f" {name:<{width}}   ", subsequent_indent=pad,
                                        break_on_hyphens=False) for name, note in rows) + "\n")
    return out


def _preemption(c) -> Text | None:
    """What a preemption / time-limit signal needs of the build's slowest job and the shutdown time the launchers
    give it (``Compiled.preemption``, :func:`llmc.compiler.checkpoint_cost.preemption_numbers`)."""
    from llmc.compiler.checkpoint_cost import PREEMPT_FLOOR_S, PREEMPT_SAFETY

    p = getattr(c, "preemption", None)
    if p is None or p.job is None:
        return None
    import textwrap

    text = (f"On a SIGTERM / SIGUSR1 a job finishes its step and saves it; the longest is {p.job}'s: a step of "
            f"{duration(p.step_seconds)} + a save of {duration(p.save_seconds)} = {duration(p.needed_seconds)}. "
            f"The launchers give torchrun's workers {p.shutdown_seconds} s after the signal "
            f"(TORCH_ELASTIC_SHUTDOWN_TIMEOUT: {PREEMPT_SAFETY:g} x that, at least {PREEMPT_FLOOR_S} s); the Slurm "
            f"script asks for its signal {p.signal_lead_seconds} s before the time limit (--signal=B:USR1@"
            f"{p.signal_lead_seconds}). A platform that kills on its own clock must give at least "
            f"{p.signal_lead_seconds} s (Kubernetes: the pods' terminationGracePeriodSeconds, 30 s by default).")
    out = Text("Preemption\n\n", style="bold")
    out.append("\n".join(textwrap.wrap(text, WIDTH - 1, initial_indent=" ", subsequent_indent=" ",
                                        break_on_hyphens=False)) + "\n")
    return out


def _serving(c) -> Table | None:
    if not c.serving:
        return None
    t = Table(title="Serving", title_justify="left", box=box.SIMPLE_HEAD, title_style="bold", pad_edge=False)
    for col in ("engine", "gpu", "tp x pp", "max_model_len", "concurrency", "fits"):
        t.add_column(col)
    for s in c.serving:
        t.add_row(s.engine, s.gpu, f"{s.tensor_parallel_size} x {s.pipeline_parallel_size}"
                  + (" (experts: ep)" if s.expert_parallel else ""),
                  str(s.max_model_len), str(s.concurrency), "yes" if s.fits else "NO")
    return t


def _evaluation(c) -> Table | None:
    """Validation split and cost, benchmark evals, data-quality banding and cost (compiler/evaluation.py)."""
    e = getattr(c, "evaluation", None)
    if e is None:
        return None
    t = _kv_table("Evaluation and data quality")
    v = e.validation
    if v is not None:
        split = (f"files {', '.join(v.files)}" if v.files else
                 f"{100 * v.fraction:.3g}% of each source's documents held out (seed {v.seed})")
        t.add_row("validation", f"{split}; every {v.every_steps:,} steps, {v.max_batches} batches")
        if v.flops is not None:
            when = f" = {duration(v.seconds)}" if v.seconds is not None else ""
            share = (f" ({100 * v.fraction_of_training_time:.1f}% of training time)"
                     if v.fraction_of_training_time is not None else "")
            t.add_row("", f"{v.evals} evals x {human(v.tokens_per_eval)} tokens forward = {v.flops:.3g} FLOPs{when}{share}")
    if e.tasks is not None:
        lim = f", limit {e.tasks.limit}" if e.tasks.limit else ""
        t.add_row("eval tasks", f"{', '.join(e.tasks.tasks)} after {', '.join(e.tasks.stages)} "
                                f"(lm-evaluation-harness, {e.tasks.backend}, batch {e.tasks.batch_size}{lim})")
        chat = [st for st in e.tasks.stages if e.tasks.apply_chat_template.get(st)]
        if chat:
            t.add_row("", f"through the chat template: {', '.join(chat)} (eval.apply_chat_template)")
        if e.tasks.every_checkpoints is not None:
            from llmc.compiler.evaluation import format_steps

            k = e.tasks.every_checkpoints
            for st, steps in (e.tasks.checkpoint_steps or {}).items():
                t.add_row("", f"{st}: also checkpoints at steps {format_steps(steps) or '(none kept)'} "
                              f"(every_checkpoints {k})")
    q = e.quality
    if q is not None:
        t.add_row("dedup", f"exact {'on' if q.exact else 'off'}, workers {q.workers}")
        n = q.near_dup
        if n is not None:
            how = " (chosen by llmc)" if n.chosen_by_llmc else ""
            t.add_row("near-dup", f"MinHash {n.num_perm} perms, word {n.ngram}-grams, {n.bands} bands x {n.rows} rows"
                                  f"{how}; at Jaccard {n.threshold:g}: FP area {n.false_positive:.4f}, FN area "
                                  f"{n.false_negative:.4f}; P(candidate) = 1/2 at {n.s_half:.3f}")
        if q.minhash_core_seconds is not None:
            t.add_row("dedup cost", f"{human(q.shingles)} shingles: {duration(q.minhash_core_seconds)} CPU, "
                                    f"{duration(q.minhash_wall_seconds)} on {q.workers} worker(s)")
        else:
            t.add_row("dedup cost", "unknown (declare sources[].tokens)")
        if q.decontaminate_ngram is not None:
            t.add_row("decontam", f"{q.decontaminate_ngram}-grams against {len(q.benchmarks)} benchmark file(s)")
        left = (f"{human(q.tokens_left)} of {human(q.declared_tokens)} declared "
                f"({100 * q.expected_removal_fraction:.3g}% expected removed)" if q.tokens_left is not None
                else "unknown (set data.quality.expected_removal_fraction and sources[].tokens)")
        t.add_row("tokens left", left)
    return t


def _diagnostics(c) -> list[Text]:
    diags = sort_diagnostics(list(c.diagnostics))
    lines = [Text("Diagnostics", style="bold")]
    if not diags:
        lines.append(Text("  none"))
    for d in diags:
        # one line per diagnostic, never wrapped (the same line the CLI prints for errors)
        lines.append(Text("  " + d.render(), style=_STYLE.get(d.severity, "")))
    n_err = sum(d.severity == "error" for d in diags)
    n_warn = sum(d.severity == "warning" for d in diags)
    lines.append(Text(f"  {n_err} error(s), {n_warn} warning(s), {len(diags) - n_err - n_warn} info"))
    return lines


def report_renderables(c) -> list:
    """Every section in order (skipping those without data)."""
    parts = [_header(c), _model(c)]
    if not c.spec.pretrains:
        parts.append(Text("No pre-training stage: the pipeline starts from the base model (stage plans below)."))
    elif c.plan is not None:
        parts += [_compute(c), _hyper(c), _plan(c), _memory(c), _time(c)]
    else:
        parts += [_compute(c), _hyper(c), Text("No parallelism plan (see the errors below).", style="bold red")]
        if c.unfit:
            parts.append(_unfit(c))
    parts += [_budget(c), _alternatives(c), _rejected(c), _stages(c), _stage_notes(c), _preemption(c), _serving(c),
              _evaluation(c),
              *_diagnostics(c)]
    return [p for p in parts if p is not None]


def _console(file=None, terminal: bool | None = None) -> Console:
    if terminal is None:
        terminal = sys.stdout.isatty() if file is None else False
    if terminal:
        return Console(file=file)
    return Console(file=file, width=WIDTH, force_terminal=False, color_system=None, highlight=False,
                   emoji=False, soft_wrap=False)


def render_text(c) -> str:
    """The report as plain text at width 120 (deterministic; what the golden files hold)."""
    buf = io.StringIO()
    con = _console(buf, terminal=False)
    for r in report_renderables(c):
        con.print(r, soft_wrap=isinstance(r, Text))  # plain lines (header, diagnostics) never wrap
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def print_report(c, console: Console | None = None) -> None:
    """Print the report to stdout (colours on a TTY, fixed 120-column plain text otherwise)."""
    if console is None and not sys.stdout.isatty():
        sys.stdout.write(render_text(c))
        return
    con = console or _console()
    for r in report_renderables(c):
        con.print(r, soft_wrap=isinstance(r, Text))
