#!/usr/bin/env python
"""Score llmc's planner against published training measurements (benchmarks/data/*.yaml).

For every row: build a RunSpec for the row's model, GPU, pinned layout, sequence length and global
batch; validate it with llmc's ``compile_spec``; evaluate the pinned plan with llmc's time and memory
model for the row's backend profile (torchtitan, or the Megatron reference profile), torch.compile,
async-TP and fp8 recipe; compare the predicted tokens/s/GPU and peak reserved memory per GPU with the
measured ones. Prints a summary per row set (the `use: fit` rows llmc's torchtitan levels were fitted on:
in-sample; the `use: check` rows; of those, the ones scored on a profile set with them in view, and the held-out
rest) with a table of which factors were set with which rows in view, per-row errors, per-group mean/max |error|,
Spearman rank correlation within
each sweep (rows of one table that vary one knob), the within-sweep error spread, and the leave-one-out
calibrated error within each (backend, GPU) group, fitted with ``llmc.compiler.calibration``
(the same fit ``llmc calibrate`` runs on a user's own measured runs).

    python scripts/bench_fidelity.py                      # markdown to stdout
    python scripts/bench_fidelity.py --format json
    python scripts/bench_fidelity.py --out benchmarks/RESULTS.md
    python scripts/bench_fidelity.py --ids tt24-t1-fsdp,tt24-t3-fsdp

Every call into llmc lives in :func:`llmc_predict` and :func:`llmc_model_states` (the adapter), so an API
change is fixed in one place. A row llmc cannot express is listed as skipped with the reason.

What a table says about how its runs differ from llmc's own job (the exact GPU part, whether torch.compile covered
the loss, the fp8 recipe, the loss slices) is data in the table, read for every row in llmc's table schema (the
torchtitan files) by ``llmc.measurements.table_row`` -- the reader ``llmc calibrate`` uses -- so such a table
calibrates on the numbers this script scores. The Megatron-Bridge rows are the page's printed columns, which
``llmc calibrate`` refuses (K004: no ``dp_shard``); :func:`request_for` maps them to the ``megatron`` reference
profile, which scores published Megatron runs (llmc emits no Megatron job; no spec can select it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import re
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "benchmarks" / "data"
GIB = 2**30

# Precision labels on the source pages -> llmc's training.precision (None: llmc cannot express it).
# Blackwell Ultra parts: their datasheets give the dense FP8 / BF16 rates of GB200 / B200 (hardware.py), while the
# Megatron-Bridge tables measure GB300 5-31 % faster than GB200 on the same model and release (19-21 % on the one
# Llama 3 8B layout both ran); the summary also reports the rows without them
BLACKWELL_ULTRA = frozenset({"gb300", "b300"})
# backends whose rows are in llmc's measured-layout table schema (benchmarks/README.md, "Throughput rows,
# torchtitan"), the one `llmc calibrate` reads: they are read with llmc.measurements.table_row
TABLE_SCHEMA_BACKENDS = frozenset({"torchtitan"})
# backend of the source -> llmc backend profile (llmc/compiler/backends.py; megatron is a reference profile)
BACKEND_PROFILE = {"torchtitan": "torchtitan", "megatron": "megatron", "deepspeed": "deepspeed"}

PRECISIONS = {"bf16": "bf16", "BF16": "bf16", "fp8": "fp8", "FP8": "fp8", "FP8-CS": "fp8", "FP8-MX": "fp8",
              "MXFP8": "fp8", "NVFP4": "nvfp4"}


# ------------------------------------------------------------------------------ fitted vs checked

# Profiles whose levels were set with their `use: check` rows in view (llmc/compiler/backends.py, the megatron
# profile's `sources`: base_efficiency "set with the Megatron-Bridge performance summary in view ... those rows are
# therefore not an independent check", fp8_linear_speedup likewise, selective_ac chosen by its error on the
# benchmark). A `use: check` row scored on such a profile is reported apart from the held-out ones.
PROFILES_SET_WITH_CHECK_ROWS_IN_VIEW = frozenset({"megatron"})


def provenance() -> list[tuple[str, str, str, str]]:
    """(what, value, how it was set, with which rows of this benchmark in view) for every named factor of llmc that
    was set with rows of this benchmark in view: llmc/compiler/backends.py's profiles (their ``sources``) and
    llmc/compiler/calibration.py's / backends.py's constants (their comments). Values are read from llmc, so the
    statement follows the code; tests/test_bench_quotes.py checks that every profile field whose source says it was
    fitted or set with rows in view is listed here."""
    from llmc.compiler import calibration as cal
    from llmc.compiler.backends import PROFILE_HEADROOM, get_backend

    tt, mg = get_backend("torchtitan"), get_backend("megatron")
    fit = "every `use: fit` row (torchtitan Dec 2024 H100, `tt24-*`)"
    return [
        ("torchtitan `base_efficiency`", f"{tt.base_efficiency:g}", "fitted", fit),
        ("torchtitan `fp8_linear_speedup`", f"{tt.fp8_linear_speedup:g}",
         "fitted (the optimum is its cap, the fp8 / bf16 peak ratio)",
         "`tt24-t1-fsdp-compile` vs `tt24-t1-fsdp-compile-fp8`, `tt24-t3-fsdp-compile` vs `tt24-t3-fsdp-compile-fp8`"),
        ("torchtitan `attn_relative_efficiency`", f"{tt.attn_relative_efficiency:g}", "fitted",
         "`tt24-t2-*` (the sequence-length sweep)"),
        ("torchtitan `eager_elementwise`", f"{tt.eager_elementwise:g}", "fitted",
         "`tt24-t1-fsdp` vs `tt24-t1-fsdp-compile`, `tt24-t3-fsdp` vs `tt24-t3-fsdp-compile`"),
        ("torchtitan `async_tp_overlap`", f"{tt.async_tp_overlap:g}", "set from a measured pair",
         "`tt24-t4-2d` vs `tt24-t4-2d-asynctp` (its source quotes their 829 -> 876 tok/s)"),
        ("torchtitan `reserved_over_allocated`", f"{tt.reserved_over_allocated:g}", "fitted",
         "the measured peaks of the `use: fit` rows (18 of the 20 memory rows)"),
        ("torchtitan `compile_act_saving`", f"{tt.compile_act_saving:g}", "fitted",
         "the memory of `tt24-t1-fsdp` vs `tt24-t1-fsdp-compile`, `tt24-t3-fsdp` vs `tt24-t3-fsdp-compile`"),
        ("torchtitan `fp8_rowwise_speedup`", f"{tt.fp8_rowwise_speedup:g}", "fitted",
         "no row of this benchmark (torchtitan commit 7a04053's Llama 3 8B rowwise / bf16 figures)"),
        ("megatron `base_efficiency`", f"{mg.base_efficiency:g}", "set with rows in view",
         "the Megatron-Bridge rows (`mb*`, `use: check`: not an independent check)"),
        ("megatron `fp8_linear_speedup`", f"{mg.fp8_linear_speedup:g}", "set with rows in view",
         "the Megatron-Bridge rows (`mb*`: not an independent check)"),
        ("megatron `selective_ac`", mg.selective_ac, "chosen by its benchmark error",
         "every Megatron-Bridge row (with `attention_core` llmc picks full AC for them and their uncalibrated "
         "error rises)"),
        ("`backends.PROFILE_HEADROOM`", f"{PROFILE_HEADROOM:g}", "derived from the memory error (not fitted to a row)",
         "the 20 memory rows (18 `use: fit`); it enters every Megatron-Bridge row through llmc's AC choice "
         "(the fastest mode that fits)"),
        ("`calibration.COMM_PRIOR_WEIGHT`, `SIZE_PRIOR_WEIGHT`", f"{cal.COMM_PRIOR_WEIGHT:g}, {cal.SIZE_PRIOR_WEIGHT:g}",
         "chosen from {0.03, 0.1, 0.3}",
         "the LOO tokens/s error over every scored row: no LOO-calibrated figure is held out from them"),
        ("`calibration.COMM_PRIOR_RELEASE`", f"{cal.COMM_PRIOR_RELEASE:g}", "chosen",
         "the LOO error of every (backend, GPU) group (0.5 keeps their fits at the prior)"),
        ("`calibration.RANKING_BAND_UNCALIBRATED`", f"{cal.RANKING_BAND_UNCALIBRATED:g}",
         "derived (`llmc plan`'s tie rule; no figure here depends on it)",
         "every sweep (the within-sweep error spread)"),
    ]


@dataclass(frozen=True)
class RowSet:
    """A named set of scored rows for the summary: what they are to llmc's defaults (fitted on, or only checked)."""

    key: str
    label: str  # "{backends}": the backends of the set's rows
    test: Any  # dict -> bool


def row_sets() -> dict[str, list[RowSet]]:
    """The summary's row sets per quantity (``tps``: tokens/s/GPU; ``mem``: peak reserved memory per GPU).
    ``fit``: in-sample (llmc's torchtitan levels were fitted on them); ``check``: every `use: check` row; of
    those, the rows of a profile set with them in view (:data:`PROFILES_SET_WITH_CHECK_ROWS_IN_VIEW`) and the
    held-out rest (no factor of :func:`provenance` was set with them in view)."""
    in_view = PROFILES_SET_WITH_CHECK_ROWS_IN_VIEW

    def check(x):
        return x["use"] == "check"

    def ultra(x):
        return x["gpu_key"] in BLACKWELL_ULTRA

    return {
        "tps": [
            RowSet("all", "all rows", lambda x: True),
            RowSet("all_pre_ultra", "all rows without GB300 / B300", lambda x: not ultra(x)),
            RowSet("ultra", "GB300 / B300 rows", ultra),
            RowSet("fit", "fit rows (in-sample)", lambda x: x["use"] == "fit"),
            RowSet("check", "check rows", check),
            RowSet("check_pre_ultra", "check rows without GB300 / B300", lambda x: check(x) and not ultra(x)),
            RowSet("check_in_view", "check rows, {backends} (profile set with them in view)",
                   lambda x: check(x) and x["backend"] in in_view),
            RowSet("check_held_out", "check rows, {backends} (held out)",
                   lambda x: check(x) and x["backend"] not in in_view),
        ],
        "mem": [
            RowSet("all", "all rows", lambda x: True),
            RowSet("fit", "fit rows (in-sample)", lambda x: x["use"] == "fit"),
            RowSet("check_held_out", "check rows, {backends} (held out)",
                   lambda x: check(x) and x["backend"] not in in_view),
        ],
    }


def _row_set_summary(results: list[dict], quantity: str, rs: RowSet) -> dict[str, Any]:
    """Uncalibrated and LOO-calibrated |error| of one row set (throughput rows only)."""
    key, loo_key = {"tps": ("err_tps", "err_tps_calibrated"), "mem": ("err_mem", "err_mem_calibrated")}[quantity]
    xs = [x for x in results if x["kind"] == "throughput" and x.get(key) is not None and rs.test(x)]
    loo = [x[loo_key] for x in xs if x.get(loo_key) is not None]
    label = rs.label.format(backends=", ".join(sorted({x["backend"] for x in xs})) or "none")
    return {"key": rs.key, "label": label, "uncalibrated": _summary([x[key] for x in xs]) if xs else None,
            "loo": _summary(loo) if loo else None}


# ------------------------------------------------------------------------------------------------ rows

@dataclass
class Row:
    """One measurement, with its file's source fields merged in."""

    id: str
    file: str
    backend: str
    use: str  # "fit" | "check"
    kind: str  # "throughput" | "model_states"
    source_url: str
    system: str
    gpu_key: str | None  # the data file's key
    gpu_key_exact: bool
    fields: dict[str, Any]
    gpu: str | None = None  # the llmc GPU the row is predicted on (llmc.measurements.table_gpu: gpu_part or gpu_key)
    measurement: Any = None  # llmc.measurements.Measurement of a table-schema row, or the MeasurementError reading it

    def get(self, key: str, default=None):
        v = self.fields.get(key)
        return default if v is None else v

    @property
    def group(self) -> str:
        return f"{self.file} / {self.system or '-'} / {self.backend}"

    @property
    def sweep(self) -> str | None:
        return self.fields.get("sweep")


def load_rows(data_dir: Path = DATA_DIR) -> list[Row]:
    """Every row of every ``*.yaml`` under ``data_dir`` (file-level keys apply to all its rows)."""
    from llmc.measurements import MeasurementError, table_gpu, table_row

    rows: list[Row] = []
    for path in sorted(Path(data_dir).glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        file_keys = {k: v for k, v in doc.items() if k != "rows"}
        for r in doc.get("rows", []):
            row = Row(
                id=r["id"], file=path.stem, backend=doc["backend"], use=r.get("use", doc.get("use", "check")),
                kind=r.get("kind", doc.get("kind", "throughput")), source_url=doc["source"]["url"],
                system=r.get("system", doc.get("system", "")),
                gpu_key=r["gpu_key"] if "gpu_key" in r else doc.get("gpu_key"),
                gpu_key_exact=bool(r.get("gpu_key_exact", doc.get("gpu_key_exact", True))),
                fields={**{k: v for k, v in doc.items() if k in ("gpus_per_node", "loss_chunks", "cp_attention")},
                        **r},
                gpu=table_gpu(r, file_keys)[0],
            )
            if row.kind == "throughput" and row.backend in TABLE_SCHEMA_BACKENDS:
                try:
                    row.measurement = table_row(r, file_keys, str(path), 0)
                except MeasurementError as e:
                    row.measurement = e
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------- the request

class Skip(Exception):
    """The row cannot be expressed in llmc (the message says why)."""


@dataclass(frozen=True)
class PlanRequest:
    """A row as llmc sees it: model, cluster, pinned layout, batch. None = left to llmc's search."""

    id: str
    model: str
    gpu: str
    gpus: int
    gpus_per_node: int | None
    seq_len: int
    global_batch_seqs: int
    precision: str
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    cp: int
    ep: int
    pp_schedule: str | None
    virtual_stages: int | None
    micro_batch: int
    activation_checkpointing: str | None
    zero_stage: int
    backend: str = "torchtitan"
    ac_layers: int = 0  # blocks per model chunk recomputed whole (activation_checkpointing "partial")
    compile: bool | None = None
    async_tp: bool = False
    fp8_recipe: str | None = None
    gpu_note: str | None = None
    compile_loss: bool | None = None
    loss_chunks: int | None = None  # None: the backend's (llmc.compiler.backends.Backend.loss_chunks)
    cp_attention: str | None = None  # None: the backend's (llmc.compiler.memory.cp_kv_gathered)


@dataclass
class Prediction:
    tokens_per_s_per_gpu: float
    mem_gib: float
    mfu: float
    plan: str
    llmc_fits: bool
    path: str  # "compile_spec" or "pinned plan" (evaluated directly: llmc's search rejected or could not pin it)
    notes: list[str] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)
    flops_per_token: float = 0.0  # llmc's training model FLOPs per token (no recomputation)
    step_seconds: float = 0.0
    allocated_gib: float = 0.0  # peak allocated (mem_gib is the allocator's reserved peak)
    d_model: float = 0.0  # the model's hidden size (the calibration's size term)


def request_for(row: Row) -> PlanRequest:
    """Translate a throughput row into llmc's terms, or raise :class:`Skip`."""
    f = row.fields
    gpu_key, gpu_note = row.gpu, None
    if gpu_key is None:
        raise Skip(f"no llmc GPU entry for {row.system}")
    if gpu_key != row.gpu_key:  # the data file's gpu_part: the exact part, which llmc has an entry for
        gpu_note = f"llmc GPU {gpu_key} (data file: {row.gpu_key})"
    prec = PRECISIONS.get(str(f.get("precision")))
    if f.get("precision") is None or prec is None:
        raise Skip(f"precision {f.get('precision')!r} not expressible in llmc (bf16, fp8, nvfp4, fp32)")
    ac_layers = 0
    if row.backend in TABLE_SCHEMA_BACKENDS:
        # the row as llmc calibrate reads it (llmc.measurements.table_row): layout, batch, compile, compiled
        # loss, fp8 recipe and loss slices, the file's keys filling the row's gaps
        m = row.measurement
        if not hasattr(m, "plan"):
            raise Skip(f"table row not readable: {m.message}" + (f" ({m.hint})" if m.hint else ""))
        pl = m.plan
        dp_rep, dp_shard, tp, pp, cp, ep = pl.dp_replicate, pl.dp_shard, pl.tp, pl.pp, pl.cp, pl.ep
        sched = pl.pp_schedule if pp > 1 else None
        vp = pl.pp_virtual_stages if pp > 1 else None
        mb, gbs, zero = pl.micro_batch, pl.micro_batch * pl.dp * pl.grad_accum, pl.zero_stage
        ac, ac_layers = pl.activation_checkpointing, pl.ac_layers
        compile_, async_tp, recipe = m.compile, m.async_tp, m.fp8_recipe
        compile_loss, loss_chunks = m.compile_loss, m.loss_chunks
        cp_attention = m.cp_attention
        gpu_key, prec = m.gpu, m.precision
    elif row.backend == "megatron":
        tp, pp, cp = f["tp"], f["pp"], f["cp"]
        ep = row.get("ep", 1)
        dp = f["gpus"] // (tp * pp * cp)
        dp_rep, dp_shard = 1, dp
        # FSDP > 0: Megatron FSDP over the data-parallel ranks; 0 (or no FSDP column): DDP with the
        # distributed optimizer, i.e. optimizer states sharded over dp (ZeRO-1).
        zero = 3 if (f.get("fsdp") or 0) > 0 else 1
        vp = f.get("vp") if pp > 1 else None
        sched = ("Interleaved1F1B" if (vp or 1) > 1 else "1F1B") if pp > 1 else None
        mb, gbs, ac = f["mbs"], f["gbs"], None
        compile_, async_tp = False, True  # TE kernels; TP comm overlap
        # the row's recipe (the data file maps the page's FP8 / FP8-CS to tensorwise, FP8-MX / MXFP8 to mxfp8)
        recipe = f.get("quantization") or "tensorwise"
        compile_loss, loss_chunks, cp_attention = False, None, None
        if "w/ MTP" in str(f.get("model_label", "")):
            raise Skip("multi-token prediction (MTP) module: not in llmc's deepseek-v3 preset")
    else:
        raise Skip(f"backend {row.backend} has no throughput mapping")
    return PlanRequest(
        id=row.id, model=f["model"], gpu=gpu_key, gpus=f["gpus"], gpus_per_node=f.get("gpus_per_node"),
        seq_len=f["seq_len"], global_batch_seqs=gbs, precision=prec, dp_replicate=dp_rep, dp_shard=dp_shard,
        tp=tp, pp=pp, cp=cp, ep=ep, pp_schedule=sched, virtual_stages=vp, micro_batch=mb,
        activation_checkpointing=ac, zero_stage=zero, backend=BACKEND_PROFILE[row.backend], compile=compile_,
        async_tp=async_tp, fp8_recipe=recipe, gpu_note=gpu_note, compile_loss=compile_loss, loss_chunks=loss_chunks,
        ac_layers=ac_layers, cp_attention=cp_attention,
    )


# -------------------------------------------------------------------------- the llmc adapter (only here)

def spec_yaml(req: PlanRequest) -> str:
    """The RunSpec YAML for a request (tokens only set the run length; tokens/s does not depend on them)."""
    par = {"dp_replicate": req.dp_replicate, "dp_shard": req.dp_shard, "tp": req.tp, "pp": req.pp, "cp": req.cp,
           "ep": req.ep, "micro_batch": req.micro_batch, "zero_stage": req.zero_stage}
    if req.pp_schedule is not None:
        par["pp_schedule"] = req.pp_schedule
    if req.virtual_stages is not None:
        par["pp_virtual_stages"] = req.virtual_stages
    if req.activation_checkpointing is not None:
        par["activation_checkpointing"] = req.activation_checkpointing
    if req.activation_checkpointing == "partial":
        par["ac_layers"] = req.ac_layers
    hw = {"gpu": req.gpu, "count": req.gpus}
    if req.gpus_per_node:
        hw["gpus_per_node"] = req.gpus_per_node
    from llmc.spec.presets import PRESETS

    model: str | dict = req.model
    preset = PRESETS.get(req.model)
    if preset is not None and req.seq_len > preset.max_seq_len:
        # a measured run longer than the preset's context: the torchtitan of that run sized its RoPE cache to the
        # training seq_len (TransformerModelArgs.update_from_config, torchtitan 9dec370), which llmc's spec says as
        # model.max_seq_len (torchtitan 0.3.0 refuses a longer sequence: X305)
        model = {"preset": req.model, "max_seq_len": req.seq_len}
    spec = {
        "name": "bench-" + re.sub(r"[^A-Za-z0-9._-]", "-", req.id),
        "model": model,
        "data": {"seq_len": req.seq_len, "tokens": "1T"},
        "hardware": hw,
        "training": {"precision": req.precision, "global_batch_tokens": req.global_batch_seqs * req.seq_len},
        "parallelism": par,
    }
    return yaml.safe_dump(spec, sort_keys=False)


def llmc_predict(req: PlanRequest) -> Prediction:
    """Validate the request with ``compile_spec``, then evaluate the row's pinned plan with llmc's time and
    memory functions for the row's backend profile, torch.compile, async-TP and fp8 recipe settings.

    Every row pins its layout, so the pinned plan is what is scored; ``compile_spec`` supplies the
    diagnostics (P004: llmc predicts the layout does not fit; it did run, so its speed is still
    compared and the row is flagged) and, where the source gives no activation checkpointing mode,
    llmc's own choice (the fastest mode that fits).
    """
    from llmc.compiler import memory as memory_mod
    from llmc.compiler import timing
    from llmc.compiler.backends import fp8_recipe_on, get_backend
    from llmc.compiler.compile import cluster_gpu, compile_spec
    from llmc.compiler.hardware import get_gpu
    from llmc.compiler.plan import ParallelPlan
    from llmc.diagnostics import SpecError
    from llmc.spec.load import loads_spec

    try:
        run, lines = loads_spec(spec_yaml(req), file=f"<bench:{req.id}>")
    except SpecError as e:
        raise Skip("spec rejected: " + "; ".join(f"{d.code} {d.path}: {d.message}" for d in e.diagnostics)) from e
    compiled = compile_spec(run, f"<bench:{req.id}>", lines, spec_bytes=b"")
    errs = [d for d in compiled.diagnostics if d.severity == "error"]
    notes: list[str] = []
    if compiled.plan is None:
        if not errs or any(d.code != "P004" for d in errs):
            raise Skip("llmc: " + "; ".join(f"{d.code} {d.path}: {d.message}" for d in errs[:2]))
        notes.append("P004 (llmc: does not fit)")
    if req.gpu_note:
        notes.append(req.gpu_note)
    if req.precision == "nvfp4" and req.backend == "megatron":
        # the Megatron-Bridge NVFP4 recipe's bf16 layers are not on the page: llmc's default tail
        notes.append(f"bf16 layers unpublished: llmc's default tail {run.training.nvfp4_bf16_tail:g}")
    be = get_backend(req.backend)
    gpu = cluster_gpu(run, get_gpu(run.hardware.gpu))
    sm = timing.step_model(run.model, req.seq_len, req.precision, gpu, be, compile=req.compile,
                           async_tp=req.async_tp, fp8_recipe=req.fp8_recipe,
                           nvfp4_bf16_tail=run.training.nvfp4_bf16_tail)

    def memory_of(p):
        return memory_mod.memory_per_gpu(run.model, p, req.seq_len, req.precision, gpu.hbm_bytes, backend=be,
                                         compile=req.compile, compile_loss=req.compile_loss,
                                         loss_chunks=req.loss_chunks, cp_attention=req.cp_attention)

    dp = req.dp_replicate * req.dp_shard
    plan = ParallelPlan(
        dp_replicate=req.dp_replicate, dp_shard=req.dp_shard, tp=req.tp, pp=req.pp,
        pp_schedule=req.pp_schedule or "1F1B",
        pp_virtual_stages=req.virtual_stages or (2 if req.pp_schedule == "Interleaved1F1B" else 1),
        cp=req.cp, ep=req.ep, micro_batch=req.micro_batch,
        grad_accum=max(1, req.global_batch_seqs // (req.micro_batch * dp)),
        activation_checkpointing=req.activation_checkpointing or "none", ac_layers=req.ac_layers,
        zero_stage=req.zero_stage)
    if req.activation_checkpointing is None:
        # AC not published: llmc's own choice rule, the fastest mode that fits (partial: any block count per
        # chunk short of every block), else full
        top = memory_mod.max_chunk_layers(run.model.n_layers, plan.pp, plan.pp_schedule, plan.pp_virtual_stages)
        options = [dataclasses.replace(plan, activation_checkpointing=a) for a in ("none", "selective")]
        options += [dataclasses.replace(plan, activation_checkpointing="partial", ac_layers=k) for k in range(1, top)]
        options.append(dataclasses.replace(plan, activation_checkpointing="full"))
        fitting = [p for p in options if memory_mod.fits(memory_of(p))]
        plan = min(fitting, key=lambda p: timing.step_time(sm, p)[0]) if fitting else options[-1]
        notes.append(f"ac unpublished: llmc chose {plan.ac_label}")
    t = timing.time_numbers(sm, plan, 1)
    mem = memory_of(plan)
    desc = (f"dr{plan.dp_replicate} ds{plan.dp_shard} tp{plan.tp} pp{plan.pp}"
            + (f"({plan.pp_schedule} v{plan.pp_virtual_stages})" if plan.pp > 1 else "")
            + f" cp{plan.cp}" + (f" ep{plan.ep}" if plan.ep > 1 else "")
            + f" mb{plan.micro_batch}x{plan.grad_accum} ac={plan.ac_label} z{plan.zero_stage}"
            + f" [{be.name}{' compile' if sm.compiled else ''}{' asyncTP' if req.async_tp and sm.compiled else ''}"
            + (f" fp8-{fp8_recipe_on(be, req.fp8_recipe)}" if req.precision == 'fp8' else "")
            + (" nvfp4" if req.precision == "nvfp4" else "") + "]")
    return Prediction(
        tokens_per_s_per_gpu=t.tokens_per_second / req.gpus, mem_gib=mem.reserved_bytes / GIB, mfu=t.mfu,
        plan=desc, llmc_fits=memory_mod.fits(mem), path="pinned plan", notes=notes,
        breakdown={k: float(v) for k, v in t.breakdown.items()},
        flops_per_token=float(compiled.compute.flops_per_token),
        step_seconds=t.step_seconds, allocated_gib=mem.allocated_bytes / GIB, d_model=float(run.model.d_model),
    )


def llmc_model_states(n_params: float, zero_stage: int, shard: int, offload_optimizer: bool,
                      largest_layer_params: float = 0.0, offload_params: bool = False) -> float:
    """llmc's model-state bytes per GPU (weights + grads + optimizer) under the DeepSpeed profile, plus for
    ZeRO-3 the gathered largest layer (what DeepSpeed's estimator adds as 4 B x its parameters)."""
    from llmc.compiler.backends import get_backend
    from llmc.compiler.memory import backend_state_bytes

    b = sum(backend_state_bytes(n_params, get_backend("deepspeed"), zero_stage=zero_stage, shard=shard,
                                offload_optimizer=offload_optimizer, offload_params=offload_params).values())
    return b + (4.0 * largest_layer_params if zero_stage == 3 else 0.0)


# ------------------------------------------------------------------------------------ calibration

def _points(results: list[dict]):
    """calibration.TimePoint / MemPoint per scored row (llmc's uncalibrated split and the measurement)."""
    from llmc.compiler.calibration import MemPoint, TimePoint, split_breakdown

    tp, mp = {}, {}
    for x in results:
        if x.get("pred_tps") and x.get("meas_tps") and x.get("step_seconds"):
            c, m, f = split_breakdown(x["breakdown"])
            # same tokens per step: T_measured = T_predicted x predicted tok/s / measured tok/s
            tp[x["id"]] = TimePoint(x["id"], c, m, f, x["step_seconds"] * x["pred_tps"] / x["meas_tps"],
                                    d_model=x.get("d_model") or 0.0)
        if x.get("meas_mem_gib") and x.get("kind") == "throughput":
            mp[x["id"]] = MemPoint(x["id"], x["pred_mem_gib"] * GIB, x["meas_mem_gib"] * GIB)
    return tp, mp


def calibration_key(x: dict) -> tuple[str, str]:
    """(backend, GPU): the rows one calibration (``llmc calibrate``) would be fitted on for that backend and part,
    every source and software release of the pair together."""
    return x["backend"], x["gpu_key"] or ""


def loo_calibrated(results: list[dict]) -> None:
    """Leave-one-out calibrated errors within each (backend, GPU): each row is predicted with factors that
    ``llmc.compiler.calibration`` fits on the other rows of its group (the same fit ``llmc calibrate``
    runs). Adds ``err_tps_calibrated`` / ``err_mem_calibrated`` to the rows."""
    from llmc.compiler.calibration import loo_memory_errors, loo_time_errors

    tp, mp = _points(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for x in results:
        if x.get("kind") == "throughput":
            groups[calibration_key(x)].append(x)
    for xs in groups.values():
        tps = [tp[x["id"]] for x in xs if x["id"] in tp]
        if len(tps) >= 2:
            for p, e in zip(tps, loo_time_errors(tps), strict=True):
                next(x for x in xs if x["id"] == p.label)["err_tps_calibrated"] = e
        mps = [mp[x["id"]] for x in xs if x["id"] in mp]
        if len(mps) >= 2:
            for p, e in zip(mps, loo_memory_errors(mps), strict=True):
                next(x for x in xs if x["id"] == p.label)["err_mem_calibrated"] = e


def group_factors(results: list[dict]) -> dict[str, dict]:
    """The factors fitted on every row of each (backend, GPU) group, with the group's LOO band."""
    from llmc.compiler.calibration import calibrate

    tp, mp = _points(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for x in results:
        if x.get("kind") == "throughput":
            groups[calibration_key(x)].append(x)
    out = {}
    for (b, g), xs in sorted(groups.items()):
        cal = calibrate(b, g, [tp[x["id"]] for x in xs if x["id"] in tp], [mp[x["id"]] for x in xs if x["id"] in mp])
        out[f"{b}/{g}"] = {"factors": cal.factors, "time_band": cal.time_band, "memory_band": cal.memory_band,
                          "d_models": sorted({int(x["d_model"]) for x in xs if x.get("d_model")}),
                          "n_time": sum(x["id"] in tp for x in xs), "n_mem": sum(x["id"] in mp for x in xs)}
    return out


# Calibration variants scored side by side (leave-one-out within (backend, GPU)): fit_time's priors.
def _variants():
    from llmc.compiler.calibration import COMM_PRIOR_WEIGHT, SIZE_PRIOR_WEIGHT

    return [("compute_scale + comm_scale (no priors, no size term)", {"comm_prior": 0.0, "size_prior": None}),
            (f"+ comm_scale prior (weight {COMM_PRIOR_WEIGHT:g})", {"comm_prior": COMM_PRIOR_WEIGHT, "size_prior": None}),
            (f"+ size term, gamma prior {SIZE_PRIOR_WEIGHT:g} (no comm prior)",
             {"comm_prior": 0.0, "size_prior": SIZE_PRIOR_WEIGHT}),
            ("both (the default fit)", {})]


def _time_groups(results: list[dict]):
    tp, _ = _points(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for x in results:
        if x.get("kind") == "throughput" and x["id"] in tp:
            groups[calibration_key(x)].append(x)
    return tp, groups


def calibration_ablation(results: list[dict]) -> list[dict]:
    """LOO tokens/s error over every scored row for each calibration variant, and leave-one-release-out
    (every row of the held-out row's software release / source file left out of the fit) for the default."""
    tp, groups = _time_groups(results)
    out = []
    for label, priors in _variants():
        errs = []
        for xs in groups.values():
            if len(xs) >= 2:
                errs += loo_errors([tp[x["id"]] for x in xs], None, priors)
        if errs:
            out.append({"variant": label, "scheme": "leave one row out", **_summary(errs)})
    for label, priors in _variants():
        errs, n_groups = [], 0
        for xs in groups.values():
            rel = [x["release"] for x in xs]
            if len(set(rel)) >= 2:
                n_groups += 1
                errs += [e for e in loo_errors([tp[x["id"]] for x in xs], rel, priors) if not math.isnan(e)]
        if errs:
            out.append({"variant": label, "scheme": f"leave one release out ({n_groups} (backend, GPU) groups "
                        "with >= 2 releases or source files)", **_summary(errs)})
    return out


def loo_errors(points, groups, priors):
    from llmc.compiler.calibration import loo_time_errors

    return loo_time_errors(points, groups, **priors)


# Source precision labels naming the same recipe: the Megatron-Bridge archive's header says
# "FP8-MX / MXFP8 = microscaling". Whether 26.x's plain "FP8" is 25.11's "FP8-CS" (current scaling) is not
# stated there; the loose key assumes it.
RECIPE_SAME = {"FP8-MX": "MXFP8"}
RECIPE_SAME_LOOSE = {"FP8-MX": "MXFP8", "FP8-CS": "FP8"}


def twin_key(x: dict, same: dict[str, str] = RECIPE_SAME) -> tuple:
    """What a layout-deterministic predictor sees: backend, GPU, model, sequence length, GPUs, llmc's plan
    (layout, batch, AC, ZeRO, compile / async-TP / fp8 recipe) and the source's precision recipe."""
    lab = x["precision_label"].upper()
    return (x["backend"], x["gpu_key"], x["model"], x["seq_len"], x["gpus"], x["plan"], same.get(lab, lab))


def noise_floor(results: list[dict], same: dict[str, str] = RECIPE_SAME) -> dict:
    """Rows measuring the same layout in different sources / releases ("twins"). Any predictor that is a
    function of the layout gives twins one number, so its error on them is at least each group's best
    constant (``floor``, the minimum over c of mean |c / m_i - 1|, attained at one of the m_i: the objective
    is piecewise linear and convex in c); ``twin_loo`` predicts each row by the mean of its twins."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    rows = [x for x in results if x.get("kind") == "throughput" and x.get("meas_tps")]
    for x in rows:
        by[twin_key(x, same)].append(x)
    groups = []
    for xs in by.values():
        if len(xs) < 2 or len({x["release"] for x in xs}) < 2:
            continue
        m = [x["meas_tps"] for x in xs]
        floor = min(sum(abs(c / v - 1) for v in m) for c in m) * 100 / len(m)
        loo = [pct(sum(m[:i] + m[i + 1:]) / (len(m) - 1), v) for i, v in enumerate(m)]
        groups.append({"ids": [x["id"] for x in xs], "releases": [x["release"] for x in xs], "measured": m,
                       "spread_pct": 100 * (max(m) - min(m)) / (sum(m) / len(m)), "floor_pct": floor,
                       "twin_loo": loo, "err_tps": [x["err_tps"] for x in xs],
                       "err_cal": [x.get("err_tps_calibrated") for x in xs]})
    n_twin = sum(len(g["ids"]) for g in groups)
    floor_sum = sum(g["floor_pct"] * len(g["ids"]) for g in groups)

    def mean_abs(key):
        v = [abs(e) for g in groups for e in g[key] if e is not None]
        return sum(v) / len(v) if v else None

    return {"groups": groups, "n_rows": len(rows), "n_twin_rows": n_twin,
            "floor_twin_rows": floor_sum / n_twin if n_twin else None,
            "floor_all_rows": floor_sum / len(rows) if rows else None,
            "twin_loo": mean_abs("twin_loo"), "uncal_twin_rows": mean_abs("err_tps"),
            "cal_twin_rows": mean_abs("err_cal")}


def recipe_pairs(results: list[dict]) -> list[dict]:
    """Rows of one release and layout that differ only in the source's fp8 recipe (e.g. FP8-CS vs FP8-MX): the
    measured ratio against the ratio llmc predicts from its per-recipe cast model (``fp8-<recipe>`` in the plan)."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for x in results:
        if x.get("kind") == "throughput" and x.get("meas_tps") and "FP8" in x["precision_label"].upper():
            k = twin_key(x)
            by[k[:5] + (re.sub(r" fp8-[a-z0-9]+", "", k[5]), x["release"])].append(x)
    out = []
    for xs in by.values():
        labels = [twin_key(x)[-1] for x in xs]
        if len(xs) == 2 and len(set(labels)) == 2:
            a, b = sorted(xs, key=lambda x: twin_key(x)[-1])
            out.append({"ids": [a["id"], b["id"]], "recipes": [twin_key(a)[-1], twin_key(b)[-1]],
                        "measured": [a["meas_tps"], b["meas_tps"]], "ratio_pct": pct(b["meas_tps"], a["meas_tps"]),
                        "pred_ratio_pct": pct(b["pred_tps"], a["pred_tps"]),
                        "err_tps": [a["err_tps"], b["err_tps"]]})
    return out


# ---------------------------------------------------------------------------------------- statistics

def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks; None when undefined."""
    if len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _summary(errs: list[float]) -> dict[str, float]:
    a = [abs(e) for e in errs]
    return {"n": len(a), "mean_abs": sum(a) / len(a), "max_abs": max(a), "mean_signed": sum(errs) / len(errs)}


# --------------------------------------------------------------------------------------------- runner

def evaluate(rows: list[Row]) -> dict[str, Any]:
    results, skipped = [], []
    for r in rows:
        try:
            if r.kind == "model_states":
                results.append(_model_states_result(r))
                continue
            req = request_for(r)
            p = llmc_predict(req)
        except Skip as e:
            skipped.append({"id": r.id, "group": r.group, "reason": str(e)})
            continue
        except Exception as e:  # noqa: BLE001 -- an llmc failure on one row is reported, never fatal
            skipped.append({"id": r.id, "group": r.group, "reason": f"llmc raised {type(e).__name__}: {e}"})
            continue
        meas_t, meas_m = r.get("tokens_per_s_per_gpu"), r.get("mem_gib")
        results.append({
            "id": r.id, "group": r.group, "use": r.use, "sweep": r.sweep, "kind": r.kind,
            "model": req.model, "d_model": p.d_model, "seq_len": req.seq_len, "gpus": req.gpus,
            "precision_label": str(r.get("precision")), "release": str(r.get("release") or r.file),
            "backend": req.backend, "gpu_key": req.gpu, "gpu_key_exact": r.gpu_key_exact or req.gpu_note is not None,
            "pred_tps": p.tokens_per_s_per_gpu, "meas_tps": meas_t,
            "err_tps": pct(p.tokens_per_s_per_gpu, meas_t) if meas_t else None,
            "pred_mem_gib": p.mem_gib, "pred_alloc_gib": p.allocated_gib, "meas_mem_gib": meas_m,
            "mem_kind": r.get("mem_kind"), "err_mem": pct(p.mem_gib, meas_m) if meas_m else None,
            "pred_mfu": p.mfu, "meas_tflops": r.get("tflops_per_gpu"), "plan": p.plan, "path": p.path,
            "llmc_fits": p.llmc_fits, "notes": p.notes, "breakdown": p.breakdown, "step_seconds": p.step_seconds,
            # the source's model FLOPs per token (TFLOP/s / tokens/s) over llmc's: a FLOP-convention check
            "flops_ratio": (r.fields["tflops_per_gpu"] * 1e12 / meas_t / p.flops_per_token)
            if r.get("tflops_per_gpu") and meas_t else None,
        })
    loo_calibrated(results)
    return {"results": results, "skipped": skipped, "groups": _groups(results), "sweeps": _sweeps(results),
            "calibration": group_factors(results), "summary": _overall(results),
            "ablation": calibration_ablation(results), "noise_floor": noise_floor(results),
            "noise_floor_loose": noise_floor(results, RECIPE_SAME_LOOSE), "recipe_pairs": recipe_pairs(results)}


def _overall(results: list[dict]) -> dict:
    """Headline numbers: uncalibrated and LOO-calibrated |error| over every scored row, and per row set
    (:func:`row_sets`: what was fitted on, what was only checked)."""
    def pick(key, kind="throughput"):
        return [x[key] for x in results if x.get(key) is not None and x["kind"] == kind]

    out = {}
    for label, key in (("tps", "err_tps"), ("tps_loo", "err_tps_calibrated"), ("mem", "err_mem"),
                       ("mem_loo", "err_mem_calibrated")):
        v = pick(key)
        out[label] = _summary(v) if v else None
    # the same, without the Blackwell Ultra rows (llmc's GB300 / B300 entries carry GB200 / B200's datasheet rates)
    for label, key in (("tps_pre_ultra", "err_tps"), ("tps_loo_pre_ultra", "err_tps_calibrated")):
        v = [x[key] for x in results if x.get(key) is not None and x["kind"] == "throughput"
             and x["gpu_key"] not in BLACKWELL_ULTRA]
        out[label] = _summary(v) if v else None
    ms = pick("err_mem", "model_states")
    out["model_states"] = _summary(ms) if ms else None
    out["row_sets"] = {q: [_row_set_summary(results, q, rs) for rs in sets] for q, sets in row_sets().items()}
    rhos = [s["rho_tps"] for s in _sweeps(results) if s["rho_tps"] is not None]
    out["min_sweep_rho"] = min(rhos) if rhos else None
    out["within_sweep_spread"] = within_sweep_spread(results)
    return out


def within_sweep_spread(results: list[dict]) -> float | None:
    """Pooled standard deviation (%) of the tokens/s errors around their sweep's mean: how far two layouts of
    the same model and cluster can be mis-ranked, the error a layout comparison is exposed to (the source of
    ``llmc.compiler.calibration.RANKING_BAND_UNCALIBRATED``)."""
    by: dict[str, list[float]] = defaultdict(list)
    for x in results:
        if x["sweep"] and x["err_tps"] is not None:
            by[x["sweep"]].append(x["err_tps"])
    ss, dof = 0.0, 0
    for errs in by.values():
        if len(errs) >= 2:
            m = sum(errs) / len(errs)
            ss += sum((e - m) ** 2 for e in errs)
            dof += len(errs) - 1
    return math.sqrt(ss / dof) if dof else None


def _model_states_result(r: Row) -> dict[str, Any]:
    f = r.fields
    pred = llmc_model_states(f["params_total"], f["zero_stage"], f["gpus"], bool(f.get("offload_optimizer")),
                             f.get("largest_layer_params") or 0.0, bool(f.get("offload_param"))) / GIB
    return {"id": r.id, "group": r.group, "use": r.use, "sweep": None, "kind": r.kind, "gpu_key": None,
            "backend": "deepspeed", "pred_alloc_gib": pred, "step_seconds": None,
            "gpu_key_exact": True, "pred_tps": None, "meas_tps": None, "err_tps": None,
            "pred_mem_gib": pred, "meas_mem_gib": f["per_gpu_gib"], "mem_kind": "model states (DeepSpeed estimator)",
            "err_mem": pct(pred, f["per_gpu_gib"]), "pred_mfu": None, "meas_tflops": None,
            "plan": f"zero{f['zero_stage']} over {f['gpus']}" + (" offload_optimizer" if f.get("offload_optimizer") else "")
            + (" offload_params" if f.get("offload_param") else ""),
            "path": "model_state_bytes", "llmc_fits": True, "notes": [], "breakdown": {},
            "flops_ratio": None}


def _groups(results: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for x in results:
        by[x["group"]].append(x)
    out = []
    for g, xs in sorted(by.items()):
        d: dict[str, Any] = {"group": g}
        t = [x["err_tps"] for x in xs if x["err_tps"] is not None]
        m = [x["err_mem"] for x in xs if x["err_mem"] is not None]
        c = [x["err_tps_calibrated"] for x in xs if x.get("err_tps_calibrated") is not None]
        if t:
            d["tps"] = _summary(t)
            pairs = [(x["pred_tps"], x["meas_tps"]) for x in xs if x["err_tps"] is not None]
            d["tps_spearman"] = spearman([a for a, _ in pairs], [b for _, b in pairs])
        if c:
            d["tps_calibrated"] = _summary(c)
        if m:
            d["mem"] = _summary(m)
        out.append(d)
    return out


def _sweeps(results: list[dict]) -> list[dict]:
    by: dict[str, list[dict]] = defaultdict(list)
    for x in results:
        if x["sweep"] and x["err_tps"] is not None:
            by[x["sweep"]].append(x)
    out = []
    for s, xs in sorted(by.items()):
        pt, mt = [x["pred_tps"] for x in xs], [x["meas_tps"] for x in xs]
        d = {"sweep": s, "n": len(xs), "rho_tps": spearman(pt, mt)}
        mem = [(x["pred_mem_gib"], x["meas_mem_gib"]) for x in xs if x["meas_mem_gib"]]
        d["rho_mem"] = spearman([a for a, _ in mem], [b for _, b in mem]) if len(mem) == len(xs) else None
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------- output

def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


#: what the figures depend on: a RESULTS.md made from a tree that differs from its commit here says so
_SCORED_PATHS = ("llmc", "scripts/bench_fidelity.py", "benchmarks/data")


def _git_commit() -> tuple[str, bool]:
    """(short commit, whether llmc/, this script or the data differ from it)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *_SCORED_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(dirty)


def to_markdown(rep: dict[str, Any]) -> str:
    sm = rep["summary"]

    L = ["# llmc fidelity benchmark", "",
         f"Generated {rep['date']} by `scripts/bench_fidelity.py` at llmc commit `{rep['commit']}`"
         + (" with uncommitted changes to llmc/, the script or benchmarks/data/" if rep.get("dirty") else "") + ". "
         f"Rows: {len(rep['results'])} scored, {len(rep['skipped'])} skipped. Error = (predicted - measured) / measured. "
         "Memory is the allocator's reserved peak (torchtitan logs `max_memory_reserved`); LOO-cal = leave-one-out "
         "calibrated within the row's (backend, GPU) group with `llmc.compiler.calibration`.",
         "", "## Summary", ""]
    L += _summary_md(rep)
    L += [f"Lowest Spearman rho (tokens/s) within a sweep: {_f(sm['min_sweep_rho'], '{:+.2f}')}. "
          f"Within-sweep error spread (pooled std of tokens/s errors around each sweep's mean, the error a "
          f"layout comparison is exposed to): {_f(sm['within_sweep_spread'])}%.",
          ""]
    L += _provenance_md()
    L += _noise_floor_md(rep) + _ablation_md(rep)
    L += ["## Throughput (tokens/s/GPU) and peak memory per row", "",
         "| row | use | predicted tok/s | measured tok/s | err % | LOO-cal err % | pred GiB (alloc) | meas GiB | mem err % | LOO-cal mem % | src/llmc FLOPs per token | llmc plan | notes |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for x in rep["results"]:
        notes = list(x["notes"])
        if not x["llmc_fits"]:
            notes.append("llmc: does not fit")
        if x["gpu_key"] and not x["gpu_key_exact"]:
            notes.append(f"approx GPU {x['gpu_key']}")
        L.append(f"| {x['id']} | {x['use']} | {_f(x['pred_tps'], '{:,.0f}')} | {_f(x['meas_tps'], '{:,.0f}')} | "
                 f"{_f(x['err_tps'], '{:+.1f}')} | {_f(x.get('err_tps_calibrated'), '{:+.1f}')} | "
                 f"{_f(x['pred_mem_gib'])} ({_f(x.get('pred_alloc_gib'))}) | {_f(x['meas_mem_gib'])} | "
                 f"{_f(x['err_mem'], '{:+.1f}')} | {_f(x.get('err_mem_calibrated'), '{:+.1f}')} | "
                 f"{_f(x['flops_ratio'], '{:.3f}')} | "
                 f"{x['plan']} | {'; '.join(notes)} |")
    L += ["", "## Per group (source file / system / backend)", "",
          "| group | n | tok/s mean abs err % | max abs % | mean signed % | Spearman rho | LOO-cal mean abs % | LOO-cal max abs % | mem n | mem mean abs % | mem max abs % |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in rep["groups"]:
        t, m, c = g.get("tps"), g.get("mem"), g.get("tps_calibrated")
        L.append(f"| {g['group']} | {t['n'] if t else 0} | {_f(t and t['mean_abs'])} | {_f(t and t['max_abs'])} | "
                 f"{_f(t and t['mean_signed'], '{:+.1f}')} | {_f(g.get('tps_spearman'), '{:+.2f}')} | "
                 f"{_f(c and c['mean_abs'])} | {_f(c and c['max_abs'])} | {m['n'] if m else 0} | "
                 f"{_f(m and m['mean_abs'])} | {_f(m and m['max_abs'])} |")
    L += ["", "## Sweeps (rows of one table varying one knob): Spearman rank correlation, predicted vs measured", "",
          "| sweep | n | rho tok/s | rho memory |", "|---|---:|---:|---:|"]
    for s in rep["sweeps"]:
        L.append(f"| {s['sweep']} | {s['n']} | {_f(s['rho_tps'], '{:+.2f}')} | {_f(s['rho_mem'], '{:+.2f}')} |")
    L += ["", "## Calibration factors per (backend, GPU), fitted on all rows of the group", "",
          "Named factors of `llmc.compiler.calibration` (the fit `llmc calibrate` runs on a user's own runs); the band "
          "is the leave-one-out error within the group.", "",
          "| backend/GPU | runs (time, mem) | hidden sizes | compute_scale | compute_size_exponent | comm_scale | mem_scale | mem_overhead GiB | LOO tok/s mean/max % | LOO mem mean/max % |",
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, c in rep["calibration"].items():
        f, tb, mb = c["factors"], c["time_band"], c["memory_band"]
        L.append(f"| {k} | {c['n_time']}, {c['n_mem']} | {', '.join(map(str, c['d_models']))} | "
                 f"{f.compute_scale:.3f} | {f.compute_size_exponent:+.2f} | {f.comm_scale:.3f} | "
                 f"{f.mem_scale:.3f} | {f.mem_overhead_bytes / GIB:+.2f} | "
                 f"{_f(tb and tb['mean_abs_pct'])} / {_f(tb and tb['max_abs_pct'])} | "
                 f"{_f(mb and mb['mean_abs_pct'])} / {_f(mb and mb['max_abs_pct'])} |")
    L += ["", "## Skipped rows", "", "| row | group | reason |", "|---|---|---|"]
    for s in rep["skipped"]:
        L.append(f"| {s['id']} | {s['group']} | {s['reason']} |")
    return "\n".join(L) + "\n"


#: first header cell of the summary's two tables (tests/test_bench_quotes.py finds a quoted row by it and its label)
SUMMARY_TABLES = {"tps": "tokens/s/GPU rows", "mem": "peak reserved memory rows"}


def _summary_md(rep: dict[str, Any]) -> list[str]:
    sm = rep["summary"]

    def cells(x, signed=True):
        if not x:
            return ["-", "-", "-"]
        return [f"{x['mean_abs']:.1f}", f"{x['max_abs']:.1f}", f"{x['mean_signed']:+.1f}" if signed else "-"]

    def table(q):
        out = [f"| {SUMMARY_TABLES[q]} | n | mean abs err % | max abs err % | mean signed % | LOO-cal mean abs % | "
               "LOO-cal max abs % | LOO-cal mean signed % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sm["row_sets"][q]:
            n = r["uncalibrated"]["n"] if r["uncalibrated"] else 0
            out.append("| " + " | ".join([r["label"], str(n), *cells(r["uncalibrated"]), *cells(r["loo"])]) + " |")
        return out

    L = ["Fit rows are in-sample: llmc's torchtitan levels were fitted on them. Check rows were not fitted on, but "
         "the megatron profile's levels were set with its (Megatron-Bridge) check rows in view, so only the held-out "
         "check rows' uncalibrated errors are independent of every named factor (the calibration's prior weights "
         "were chosen on every row's LOO error; see *What was set with which rows in view* below). "
         "LOO-cal: each row predicted with `llmc calibrate`'s factors fitted on the other rows of its (backend, GPU) "
         "group.", ""]
    L += table("tps") + [""] + table("mem")
    ms = sm["model_states"]
    L.append("| DeepSpeed model states vs its estimator docs (check; not a measurement) | "
             f"{ms['n'] if ms else 0} | " + " | ".join(cells(ms) + ["-", "-", "-"]) + " |")
    return L + [""]


def _provenance_md() -> list[str]:
    L = ["### What was set with which rows in view", "",
         "Every named factor of llmc that was fitted on, or set with, rows of this benchmark in view "
         "(`llmc/compiler/backends.py` profiles' `sources`, `llmc/compiler/calibration.py` and `backends.py` "
         "comments); values as llmc has them now:", "",
         "| factor | value | set how | rows in view |", "|---|---|---|---|"]
    for what, value, how, rows in provenance():
        L.append(f"| {what} | {value} | {how} | {rows} |")
    return L + ["",
                "Everything else in the two profiles cites documentation or code (`sources` in "
                "`llmc/compiler/backends.py`; the overlap shares are estimates). Not fitted to any row: the "
                "`h100-hbm2e-96g` entry (the torchtitan page's part, its 500 W cap through "
                "`hardware.DVFS_EXPONENT`), the GPUs' datasheet rates. The time and memory models' structure (which "
                "costs they count) was developed with this benchmark's per-row errors visible, so no row is "
                "independent of that.", ""]


def _noise_floor_md(rep: dict[str, Any]) -> list[str]:
    nf, lo = rep["noise_floor"], rep["noise_floor_loose"]
    L = ["## Noise floor: the same layout measured in different sources / releases", "",
         "Twins: rows with the same backend, GPU, model, sequence length, GPU count, llmc plan (layout, batch, AC, "
         "ZeRO, compile / async-TP / fp8 recipe) and source precision recipe, from different releases or source "
         "files. A layout-deterministic predictor (llmc, calibrated or not) gives twins one number, so on them it "
         "cannot beat each group's best constant (floor); twin-LOO predicts each row by the mean of its twins.", "",
         "| twins | releases | measured tok/s/GPU | spread % | floor mean abs % | twin-LOO err % | llmc err % | LOO-cal err % |",
         "|---|---|---|---:|---:|---|---|---|"]

    def lst(v, fmt="{:+.1f}"):
        return ", ".join(_f(e, fmt) for e in v)

    for g in nf["groups"]:
        L.append(f"| {', '.join(g['ids'])} | {', '.join(g['releases'])} | {lst(g['measured'], '{:,.0f}')} | "
                 f"{g['spread_pct']:.1f} | {g['floor_pct']:.1f} | {lst(g['twin_loo'])} | {lst(g['err_tps'])} | "
                 f"{lst(g['err_cal'])} |")

    def summ(x, label):
        return (f"{label}: {x['n_twin_rows']} of {x['n_rows']} scored rows have twins. Floor on the twin rows "
                f"{_f(x['floor_twin_rows'])}% mean abs (over all {x['n_rows']} rows: {_f(x['floor_all_rows'], '{:.2f}')}%); "
                f"twin-LOO {_f(x['twin_loo'])}%; llmc on the same rows: uncalibrated {_f(x['uncal_twin_rows'])}%, "
                f"LOO-calibrated {_f(x['cal_twin_rows'])}%.")

    L += ["", summ(nf, "Strict recipe match"), "",
          summ(lo, "If the 26.x tables' \"FP8\" is the 25.11 tables' \"FP8-CS\" (not stated by the source)"), ""]
    if rep["recipe_pairs"]:
        L += ["Same release and layout, different fp8 recipe (llmc times each with its own recipe: cast traffic per "
              "recipe in `llmc/compiler/backends.py`; what the cast model does not explain is in its error, "
              "calibrated or not):", "",
              "| rows | recipes | measured tok/s/GPU | second vs first %, measured | second vs first %, llmc | "
              "llmc err % |", "|---|---|---|---:|---:|---|"]
        for g in rep["recipe_pairs"]:
            L.append(f"| {', '.join(g['ids'])} | {', '.join(g['recipes'])} | {lst(g['measured'], '{:,.0f}')} | "
                     f"{g['ratio_pct']:+.1f} | {g['pred_ratio_pct']:+.1f} | {lst(g['err_tps'])} |")
        L.append("")
    return L


def _ablation_md(rep: dict[str, Any]) -> list[str]:
    L = ["## Calibration variants (tokens/s/GPU, every scored row, fitted within (backend, GPU))", "",
         "Uncalibrated numbers do not depend on these: every factor defaults to identity.", "",
         "| fit | scheme | n | mean abs err % | max abs err % | mean signed % |", "|---|---|---:|---:|---:|---:|"]
    for a in rep["ablation"]:
        L.append(f"| {a['variant']} | {a['scheme']} | {a['n']} | {a['mean_abs']:.1f} | {a['max_abs']:.1f} | "
                 f"{a['mean_signed']:+.1f} |")
    return L + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder of benchmark YAML files")
    ap.add_argument("--ids", default=None, help="comma-separated row ids (default: all rows)")
    ap.add_argument("--format", choices=("md", "json"), default="md")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown summary here")
    a = ap.parse_args(argv)
    rows = load_rows(a.data)
    if a.ids:
        want = set(a.ids.split(","))
        unknown = want - {r.id for r in rows}
        if unknown:
            print(f"error: unknown row ids: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 1
        rows = [r for r in rows if r.id in want]
    rep = evaluate(rows)
    rep["date"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rep["commit"], rep["dirty"] = _git_commit()
    md = to_markdown(rep)
    if a.out:
        a.out.write_text(md)
    print(json.dumps(rep, indent=1, default=str) if a.format == "json" else md, end="" if a.format == "md" else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
