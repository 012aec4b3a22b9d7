"""DeepSpeed 0.19.8 trainer for llmc's runtime model: data parallel + ZeRO-0/1/2/3 (no TP/PP).

    deepspeed --num_gpus N --module llmc.runtime.ds_train --lock plan.lock.json \
        --ds-config deepspeed/ds_config.json [--stage NAME] [--out DIR] [--steps N]
    (torchrun -m llmc.runtime.ds_train ... works too; on a machine without a GPU set DS_ACCELERATOR=cpu)

Builds the same model (``llmc.runtime.model.build_model``) and the same packed data
(``prepare_assets`` + ``StreamLoader``: the sources streamed in place, one stream per sequence slot) as
the native trainer, hands the model to ``deepspeed.initialize(model, config=ds_config)`` and trains
with ``engine.backward`` / ``engine.step`` (DeepSpeed scales the loss by 1/gradient_accumulation_steps
and applies ``gradient_clipping``). Metrics go to ``<out>/metrics.jsonl`` in the native trainer's
format, with TensorBoard / W&B / progress through ``llmc.runtime.observe.RunLogger``. Resumable DeepSpeed checkpoints
(``engine.save_checkpoint`` / ``load_checkpoint``, ZeRO shards included) go to the spec's checkpoint folder, in a
folder of their own: ``<out>/<training.checkpoint.folder>/deepspeed`` (:func:`llmc.runtime.capabilities.
ds_checkpoint_dir`), each written under a temporary tag and published by a rename and an atomic ``latest``
(:func:`save_ds_checkpoint`: a save killed midway never becomes the one resumed, and pruning to
``training.checkpoint.keep_latest`` never deletes the new one or a good older one); a rerun resumes from the
``latest`` there, or, while that folder holds none, from the one an older llmc kept them in, ``<out>/ds_checkpoints``
(:func:`llmc.runtime.capabilities.ds_resume_dir`, said in one line; its new checkpoints go to the new folder). The
stage's copy of its tokenizer (``<out>/tokenizer``, what DONE.json records) is renewed or refused by the rule of every
runner (:func:`llmc.runtime.job.renew_stage_tokenizer`). Before DeepSpeed loads one, the stage that wrote it, its
whole tensor shapes and its layout (ZeRO stage, processes: DeepSpeed resumes the optimizer state only in the layout
that wrote it, :func:`ds_layout_change`) are checked against this stage's model and engine (:func:`check_ds_checkpoint`,
one line naming what changed and the ways out); at the end the full weights are also written as an llmc
checkpoint (``<out>/<training.checkpoint.folder>/step-N``, kept to ``keep_latest`` there as well) and ``DONE.json``
names it, so a following stage (native or DeepSpeed) can ``init_from`` this one.

Precision: the config's ``bf16`` trains bf16 on a GPU. On the CPU the runner trains in fp32 (``bf16.enabled`` turned
off in what DeepSpeed gets), as llmc's native trainer does there (its bf16 autocast is CUDA-only unless
``--cpu-bf16``), so that CPU runs of one spec train the same numbers on either backend; ``--cpu-bf16`` keeps bf16 on
the CPU too. The start line names the precision that runs (:func:`llmc.runtime.train.precision_note`).

The committed config is what runs: for ``--stage S`` the runner reads ``ds_config.S.json`` next to
``--ds-config`` when the build wrote one (stages whose lr / steps / batch differ), else the given file,
and changes nothing in it but ``bf16.enabled`` on the CPU (above). It refuses, with one line, a config whose batch identity
(train_batch_size = micro x accum x processes) does not hold for the processes it runs on, or whose
lr / steps / global batch / precision are not the stage's (:func:`check_config`). The build writes no
``scheduler`` block: the LR follows llmc's own schedule (``TrainJob.lr_factor``, every backend's) as a client
LambdaLR (a hand-added block is still checked against the stage and used).

Model: ZeRO-3 builds it under ``deepspeed.zero.Init`` (every parameter is partitioned as its module is
created, so no rank ever holds the whole model) and initialises it one part at a time
(``GatheredParameters(part, modifier_rank=0)``, the same random numbers as an unsharded build); weights
from ``init_from`` / ``init_hf`` are loaded per parameter the same way. Activation checkpointing follows
the plan (``model.set_ac(mode, ac_layers)``; logged and recorded in DONE.json as e.g. ``partial(2)``);
AdamW groups follow :func:`llmc.runtime.model.param_groups` under the lock's ``training.optimizer.no_decay`` (by
default no decay on 1-D parameters and token embeddings), as the native trainer and the torchtitan job.

A non-finite step stops the run, as in the native trainer (:func:`llmc.runtime.train.nonfinite_line`: one
``error[R014]`` line, status "failed", exit 1, nothing of the step saved). DeepSpeed 0.19.8 has its own answer to a
non-finite gradient norm, which is not a stop: with bf16 (``BF16_Optimizer.step``, deepspeed/runtime/
bf16_optimizer.py; ZeRO-1/2's ``DeepSpeedZeroOptimizer.step``, deepspeed/runtime/zero/stage_1_and_2.py, under
``bf16.check_grad_overflow``, default true, deepspeed/runtime/precision_config.py) and fp32 under ZeRO-1/2 it skips
the step and reports the norm as inf (``DeepSpeedEngine._take_model_step`` counts ``skipped_steps`` and does not step
the LR scheduler); fp16 does the same and halves its dynamic loss scale (an overflow is routine there); fp32 without
ZeRO applies it (``clip_fp32_gradients``: torch's clip_grad_norm_, NaN coefficients). A run whose loss stays NaN
would skip every step to the end and finish "done". So here, every step: the loss (all ranks, before the boundary's
``engine.step``: the step is not taken), the gradient norm (ZeRO-0: before the step; else DeepSpeed's, after it,
where a non-finite one means DeepSpeed skipped the step, bar fp32 ZeRO-0 and bf16 with ``check_grad_overflow`` off;
not a stop under fp16's dynamic loss scaling) and, before every save, the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

from llmc.lockfile import read_lock
from llmc.runtime.capabilities import DS_STAGE_KINDS, ds_checkpoint_dir, ds_resume_dir
from llmc.spec.schema import BF16_PRECISIONS


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def stage_config_path(ds_config: Path, stage: str | None) -> Path:
    """``ds_config.<stage>.json`` beside ``ds_config`` when it exists, else ``ds_config`` itself."""
    if stage:
        per_stage = ds_config.parent / f"ds_config.{stage}.json"
        if per_stage.exists():
            return per_stage
    return ds_config


def check_config(cfg: dict, job, world: int, where: str = "ds_config") -> dict:
    """The config DeepSpeed gets (``cfg`` without llmc's ``_llmc`` header, otherwise unchanged), after checking
    that it is this stage's and this world's; raises ValueError (one line) when it is not."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("_llmc", None)
    tbs = int(cfg.get("train_batch_size", 0))
    micro = int(cfg.get("train_micro_batch_size_per_gpu", 0))
    accum = int(cfg.get("gradient_accumulation_steps", 1))
    if micro <= 0 or micro * accum * world != tbs:
        made_for = tbs // (micro * accum) if micro > 0 and tbs % (micro * accum) == 0 else "?"
        raise ValueError(f"{where}: train_batch_size {tbs} = micro {micro} x accum {accum} x {made_for} processes, "
                         f"but {world} are running (launch {made_for} processes, or rebuild for {world} GPUs)")
    bad = []
    if tbs != int(job.global_batch_seqs):
        bad.append(f"train_batch_size {tbs} != {job.global_batch_seqs} sequences")
    lr = (cfg.get("optimizer") or {}).get("params", {}).get("lr")
    if lr is None or not math.isclose(float(lr), float(job.lr), rel_tol=1e-9):
        bad.append(f"lr {lr} != {job.lr}")
    p = (cfg.get("scheduler") or {}).get("params") or {}
    if "total_num_steps" in p and int(p["total_num_steps"]) != max(int(job.steps), 1, int(job.warmup_steps)):
        bad.append(f"scheduler total_num_steps {p['total_num_steps']} != {job.steps}")
    if "warmup_max_lr" in p and not math.isclose(float(p["warmup_max_lr"]), float(job.lr), rel_tol=1e-9):
        bad.append(f"scheduler warmup_max_lr {p['warmup_max_lr']} != {job.lr}")
    bf16 = bool((cfg.get("bf16") or {}).get("enabled"))
    if bf16 != (job.precision in BF16_PRECISIONS):
        bad.append(f"bf16 {'on' if bf16 else 'off'} but the stage trains in {job.precision}")
    if bad:
        raise ValueError(f"{where} is not stage {job.stage!r}'s config: {'; '.join(bad[:3])} "
                         f"(the build writes deepspeed/ds_config.{job.stage}.json when a stage differs; rebuild)")
    return cfg


def runtime_config(cfg: dict, cpu: bool, cpu_bf16: bool = False) -> dict:
    """What DeepSpeed gets on this device: ``cfg`` itself, or on the CPU (without ``--cpu-bf16``) a copy with
    ``bf16.enabled`` off, so that the CPU trains in fp32 as the native trainer does there (llmc.runtime.train
    ``_autocast``). The other keys stay: fp32 reduction and accumulation (``communication_data_type``,
    ``data_types.grad_accum_dtype``) are what an fp32 model does anyway (engine.get_data_types)."""
    if not cpu or cpu_bf16 or not (cfg.get("bf16") or {}).get("enabled"):
        return cfg
    return {**cfg, "bf16": {**cfg["bf16"], "enabled": False}}


def init_deepspeed_distributed() -> bool:
    """``deepspeed.init_distributed`` for llmc's trainer; returns whether it runs on the CPU (gloo).

    On the CPU, DeepSpeed's shared-memory collectives (its ``ShareMemCommBuilder`` op, built just in time by
    ``deepspeed/comm/torch.py`` ``build_shm_op`` whenever the op is listed as compatible) are turned off before the
    process group starts: they serve ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism), which this
    trainer never calls (its collectives are gloo's), and the op costs a C++ compile of about a minute in the first
    process of a machine, and sometimes aborts at start-up ("terminate called without an active exception") before
    any of the trainer's code runs. DeepSpeed keeps ``deepspeed.ops.__compatible_ops__`` as one module-level dict
    so that edits to it persist (deepspeed/ops/__init__.py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    cpu = accel.device_name() == "cpu"
    if cpu:
        shm = accel.create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            deepspeed.ops.__compatible_ops__[shm.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else accel.communication_backend_name())
    return cpu


def _grad_norm(model):
    """Global L2 norm of the local gradients as a 0-d tensor (ZeRO-0: every rank holds the reduced grads)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads, 2.0)).float().norm()


def _local_numel(model) -> int:
    """Parameter elements this rank holds (its ZeRO-3 partitions, else the full tensors)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def _placement(engine, zero: int) -> dict:
    """What DeepSpeed really runs of what the config offloads, recorded in DONE.json: the optimizer that updates
    the partitions (``DeepSpeedCPUAdam`` under ``offload_optimizer``) and, under ZeRO-3, the flags DeepSpeed's
    stage-3 optimizer set from the config (``DeepSpeedZeroOptimizer_Stage3._configure_offloading``)."""
    zopt = engine.optimizer
    out = {"optimizer": type(getattr(zopt, "optimizer", zopt)).__name__}
    if zero == 3:
        out["offload"] = {"optimizer": bool(getattr(zopt, "offload_optimizer", False)),
                          "params": bool(getattr(zopt, "offload_param", False))}
    return out


def build_zero3_model(arch, cfg: dict, seed: int, rank: int, init=None):
    """The model built under ``deepspeed.zero.Init`` (parameters partitioned as each module is created) and
    initialised part by part (embeddings, each block, norm, head) on rank 0 inside ``GatheredParameters``,
    in :meth:`Transformer.init_weights`' order under ``init`` (the job's ``TrainJob.init``; None: the
    architecture's scheme): the same weights as ``build_model(arch, seed=seed, init=init)``."""
    import deepspeed
    import torch

    from llmc.runtime.model import Transformer

    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = Transformer(arch)
    _register_external_params(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for part, run in model.init_parts(init):
            with deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=0):
                if rank == 0:
                    run()
    return model


def _register_external_params(model) -> None:
    """ZeRO-3 gathers a parameter around its own module's forward; tell it about the ones used elsewhere:
    a tied head (the embedding matrix in Transformer.forward) and stacked experts (``experts.expert`` is a
    method called from MoE.forward)."""
    from deepspeed.runtime.zero import register_external_parameter

    if model.arch.tied_embeddings:
        register_external_parameter(model, model.tok_embeddings.weight)
    for blk in model.layers.values():
        moe = getattr(blk, "moe", None)
        if moe is not None:
            ex = moe.experts
            for w in (ex.w1, ex.w2, ex.w3, *(b for b in (getattr(ex, n, None) for n in ("b1", "b2", "b3"))
                                              if b is not None)):
                register_external_parameter(moe, w)  # (gpt-oss: the experts' biases b1 / b3 / b2 too)


def load_weights_zero_aware(model, path: Path, rank: int) -> int:
    """An llmc checkpoint's weights into ``model``; ZeRO-3 parameters one at a time through
    ``GatheredParameters(modifier_rank=0)`` from a memory-mapped model.pt (no rank materialises the model)."""
    import deepspeed
    import torch

    from llmc.runtime.checkpoint import (
        INIT_HINT,
        check_shapes,
        load_model_weights,
        read_model_state,
        resolve_checkpoint,
        verify_checkpoint,
    )

    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return load_model_weights(model, path)
    ck = resolve_checkpoint(path)
    step = int(verify_checkpoint(ck)["step"])
    sd = (torch.load(ck / "model.pt", map_location="cpu", weights_only=True, mmap=True) if (ck / "model.pt").exists()
          else read_model_state(ck))  # a native stage's sharded (DCP) checkpoint
    params = dict(model.named_parameters())
    # names and whole shapes (ZeRO-3's ds_shape) before any copy: one line, not a failed copy_ inside a gather
    check_shapes(ck, {n: tuple(p.ds_shape) for n, p in params.items()}, hint=INIT_HINT,
                 have={k: tuple(v.shape) for k, v in sd.items()})
    with torch.no_grad():
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(sd[name])
    return step


def save_ds_checkpoint(engine, ds_dir: Path, step: int, client_state: dict, keep_latest: int | None,
                       rank: int, barrier) -> Path:
    """Collective: ``engine.save_checkpoint`` made atomic, as llmc's own checkpoints are
    (:mod:`llmc.runtime.checkpoint`). DeepSpeed writes a tag's files straight into ``<ds_dir>/<tag>/`` and then the
    ``latest`` file (``DeepSpeedEngine.save_checkpoint``, deepspeed/runtime/engine.py), so a save killed midway
    leaves a partial ``step-N/`` beside the good ones, and a second save of a step rewrites its only copy in place.
    Here every rank writes tag ``step-N.tmp`` (``save_latest=False``); once all have, rank 0 renames it to
    ``step-N`` (an older ``step-N`` goes only after that), replaces ``latest`` atomically (a temporary file and
    ``os.replace``) and only then prunes: the ``keep_latest`` newest of the steps up to this one stay, so neither
    the new checkpoint nor a good older one is ever deleted in favour of a partial or foreign later one. A kill at
    any point leaves ``latest`` naming a complete checkpoint (or no ``latest`` before the first)."""
    from llmc.runtime.checkpoint import prune_older

    tag = f"step-{step:08d}"
    tmp, final = ds_dir / f"{tag}.tmp", ds_dir / tag
    if rank == 0:
        ds_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted save of this step left
    barrier()
    engine.save_checkpoint(str(ds_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    barrier()
    if rank == 0:
        replaced = None
        if final.exists():
            replaced = ds_dir / f"{tag}.replaced"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        latest = ds_dir / f"latest.tmp{os.getpid()}"
        with open(latest, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(latest, ds_dir / "latest")
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        if keep_latest:
            prune_older(ds_dir, step, keep_latest)
    barrier()
    return final


def ds_resume_point(ds_dir: Path) -> Path | None:
    """The tag folder ``<ds_dir>/latest`` names (None: no ``latest``, nothing saved yet); CheckpointError (one
    line) when it names a folder that is not there or holds no model states."""
    from llmc.runtime.checkpoint import CheckpointError

    latest = ds_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    path = ds_dir / tag
    if not tag or not any(path.glob("*model_states.pt")):
        raise CheckpointError(f"{latest}: names {tag!r}, which holds no DeepSpeed checkpoint "
                              f"(*model_states.pt); refusing to resume: point it at a complete step-N folder "
                              f"or move {ds_dir} aside to start over")
    return path


class DsLayout(NamedTuple):
    """The layout a DeepSpeed engine runs (or a checkpoint was written in) as far as resuming it goes."""

    zero: int  # ZeRO stage
    world: int  # data-parallel processes
    low_precision: bool  # bf16 or fp16 enabled (their optimizer wrappers differ from fp32's)
    whole: bool = False  # (a checkpoint) its optimizer state whole in the model-states file, not per rank


def _low_precision(cfg: dict) -> bool:
    return bool((cfg.get("bf16") or {}).get("enabled") or (cfg.get("fp16") or {}).get("enabled"))


def ds_checkpoint_layout(ck: dict, path: Path) -> DsLayout | None:
    """The layout of the DeepSpeed checkpoint at ``path`` (a tag folder) whose model-states file holds ``ck``;
    None when it does not say. DeepSpeed records there the config it ran (``ds_config``: the ZeRO stage is its
    ``zero_optimization.stage``, 0 without one) and ``dp_world_size`` (``DeepSpeedEngine._common_checkpoint_state``,
    deepspeed/runtime/engine.py 0.19.8); the optimizer state is whole when it is in that file (``optimizer``: an
    optimizer without ZeRO's partitions or BF16_Optimizer's) and no ``*optim_states.pt`` (one partition per
    data-parallel rank) is beside it."""
    cfg, world = ck.get("ds_config"), ck.get("dp_world_size")
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0) if isinstance(cfg, dict) else None
    if not isinstance(stage, int) or not isinstance(world, int) or isinstance(world, bool):
        return None
    return DsLayout(int(stage), world, _low_precision(cfg),
                    ck.get("optimizer") is not None and not any(path.glob("*optim_states.pt")))


def ds_layout_change(saved: DsLayout, now: DsLayout) -> str | None:
    """What changed between the layout of a DeepSpeed checkpoint (``saved``) and this run's (``now``) that DeepSpeed
    0.19.8 cannot resume across, e.g. "ZeRO stage 0 -> 3, processes 1 -> 2"; None when it resumes it.
    ``engine.load_checkpoint`` restores each rank's own partition of the optimizer state from that rank's files
    (``_load_zero_checkpoint`` refuses another data-parallel world size; ZeRO-3 partitions the weights too), so what
    resumes is the same layout; ZeRO-1 and ZeRO-2 on the same processes in fp32 (one optimizer,
    ``DeepSpeedZeroOptimizer``, the same per-rank files; in bf16 ZeRO-1 runs ``BF16_Optimizer`` instead:
    ``DeepSpeedEngine._do_optimizer_sanity_check``); and ZeRO-0 on both sides when the checkpoint's optimizer state
    is whole, on any number of processes. Another layout needs DeepSpeed's universal checkpoint
    (``deepspeed/checkpoint/ds_to_universal.py``, config ``checkpoint.load_universal``), which converts only
    ZeRO-1/2/3 optimizer partitions (not ZeRO-0's state) and loads only into a ZeRO-1/2/3 or bf16 optimizer: llmc
    does not convert."""
    if saved.zero == now.zero and saved.world == now.world:
        return None
    if saved.world == now.world and {saved.zero, now.zero} <= {1, 2} and not (saved.low_precision or
                                                                                now.low_precision):
        return None
    if saved.zero == now.zero == 0 and saved.whole:
        return None
    changed = [f"ZeRO stage {saved.zero} -> {now.zero}" if saved.zero != now.zero else "",
               f"processes {saved.world} -> {now.world}" if saved.world != now.world else ""]
    return ", ".join(x for x in changed if x)


def check_ds_checkpoint(path: Path, model, job, now: DsLayout | None = None, build_dir: Path | None = None) -> None:
    """Before DeepSpeed loads the checkpoint at ``path`` (a tag folder): the stage that wrote it (the client state
    DeepSpeed keeps in the model-states file) must be this one, its tensors must have this model's names and
    whole shapes, and its layout must be one DeepSpeed resumes in this run's (``now``; :func:`ds_layout_change`);
    else CheckpointError, one line (DeepSpeed's own load fails deep inside with torch's size mismatch, or with its
    ZeRORuntimeException on another world size).
    The shapes are the ``param_shapes`` DeepSpeed records with a ZeRO optimizer (names from
    ``module.named_parameters()``, ZeRO-3's whole ``ds_shape``), else the ``module`` state dict it saves
    (``DeepSpeedEngine._save_checkpoint``, deepspeed/runtime/engine.py: ``mp_rank_00_model_states.pt``; ZeRO-3
    ``zero_pp_rank_0_mp_rank_00_model_states.pt``), each compared with this model's whole shapes: a ZeRO-3 model's
    parameters are empty placeholders (``ds_shape`` is the shape). A layout change is refused naming what changed
    and the ways out that keep the progress: the old layout (``hardware.count`` / ``parallelism.zero_stage``), or
    the step's weights exported (``llmc export --step``) for a new run's ``init_hf``."""
    import torch

    from llmc.runtime.checkpoint import (
        CheckpointError,
        check_deepspeed_files,
        check_shapes,
        deepspeed_globals,
        safe_load,
    )

    # DeepSpeed's load_checkpoint reads these files with weights_only=False: every one must read without it first
    check_deepspeed_files(path)
    f = sorted(path.glob("*model_states.pt"))[0]
    ck = safe_load(f, legacy=deepspeed_globals(), mmap=True)
    why = job.foreign_checkpoint(ck, path)
    if why is not None:
        raise CheckpointError(why)
    full = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters(remove_duplicate=False)}
    groups = ck.get("param_shapes")
    if groups:
        have = {k: tuple(v) for g in (groups if isinstance(groups, list) else [groups]) for k, v in g.items()}
        want = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    else:
        have = {k: tuple(v.shape) for k, v in (ck.get("module") or {}).items() if torch.is_tensor(v)}
        want = {k: full.get(k, tuple(v.shape)) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    check_shapes(f, want, have=have)
    saved = ds_checkpoint_layout(ck, path) if now is not None else None
    changed = ds_layout_change(saved, now) if saved is not None else None
    if changed is None:
        return
    step = ck.get("step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else "N"
    old = [f"hardware.count: {saved.world}" if saved.world != now.world else "",
           f"parallelism.zero_stage: {saved.zero}" if saved.zero != now.zero else ""]
    # (ZeRO-0's whole optimizer state resumes on any count: this run's processes with ZeRO-0 pinned)
    zero0 = (" (or zero_stage 0 alone: ZeRO-0's whole optimizer state resumes on any count)"
             if saved.zero == 0 and saved.whole and now.zero != 0 and saved.world != now.world else "")
    from llmc.runtime.job import export_command, rerun_command

    build = build_dir if build_dir is not None else Path("BUILD_DIR")  # (a trainer run without a lock's folder)
    raise CheckpointError(
        f"checkpoint {path.name}: {changed} since it was written, and a DeepSpeed checkpoint resumes only in its own "
        f"layout: rebuild with {' and '.join(x for x in old if x)}{zero0} to resume it, or start a new run from its "
        f"weights (`{export_command(build, job.stage, step)}`, then "
        f"`init_hf`: a fresh optimizer, LR schedule and data position), or `{rerun_command(build, job.stage)}` to "
        "start the stage over (the earlier run set aside)")


def _data_loader(job, assets_root: Path, rank: int, world: int, out: Path | None = None,
                 resumes: Path | None = None):
    """(the stage's streamed loader, its assets): rank 0 prepares the assets (the tokenizer; idempotent; the data
    sources of this stage checked) and keeps the tokenizer the stage trains with in ``out/tokenizer``
    (:func:`llmc.runtime.job.renew_stage_tokenizer`, ``resumes``: the checkpoint it resumes, None: it starts over),
    the other ranks read what it wrote; every rank then streams its share of the sources in place."""
    import torch.distributed as dist

    from llmc.runtime.data import Assets, build_stream_loader
    from llmc.runtime.entry import prepare_assets

    main = rank == 0
    if main:
        # (the launch's prepare step measured the data and checked the stages it runs; this stage checks its own)
        assets = prepare_assets(job, assets_root, measure=False, stages=(job.stage,))
        if out is not None:
            from llmc.runtime.job import renew_stage_tokenizer

            renew_stage_tokenizer(assets.tokenizer_dir, out, resumes)
    dist.barrier()
    if not main:
        assets = Assets.from_json(json.loads((assets_root / "assets" / "assets.json").read_text()))
    names = {s.name for s in job.sources}
    assets = Assets(assets.root, assets.tokenizer_dir, tuple(s for s in assets.sources if s.name in names),
                    assets.cache_dir)
    tok = assets.tokenizer()
    if tok.vocab_size > job.arch.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {job.arch.vocab_size}")
    return build_stream_loader(list(assets.sources), tok, job.seq_len, job.global_batch_seqs, job.seed, rank,
                               world), assets


def train(lock: dict, ds_config: dict, stage: str | None, out: Path, assets_root: Path, *,
          max_steps: int | None = None, resume: bool = True, config_name: str = "ds_config",
          build_dir: Path | None = None, cpu_bf16: bool = False) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from llmc.runtime import preempt
    from llmc.runtime.checkpoint import save_checkpoint
    from llmc.runtime.hf_io import (
        export_stage,
        init_hf_source,
        load_hf_into,
        loaded_from,
        start_arch,
        trained_record,
    )
    from llmc.runtime.job import TrainJob
    from llmc.runtime.metrics import IntervalTimer, MetricsLogger, step_record
    from llmc.runtime.model import Transformer, build_model, loss_terms, param_groups
    from llmc.runtime.train import (
        has_aux_loss,
        nonfinite_line,
        precision_note,
        step_stats,
        step_terms,
        weights_finite,
    )
    from llmc.spec.schema import ac_label

    job = TrainJob.from_lock(lock, stage, build_dir=build_dir)
    job.check_runner("DeepSpeed")
    if job.kind not in DS_STAGE_KINDS:
        raise ValueError(f"stage {job.stage!r} is {job.kind}: the DeepSpeed runner trains "
                         f"{', '.join(DS_STAGE_KINDS)}; run it with `llmc launch --backend native`")
    done = out / "DONE.json"
    if resume and done.exists():
        from llmc.runtime.entry import check_finished

        res = job.finished_result(done)
        if int(os.environ.get("RANK", "0")) == 0:  # (rank 0 decides: the digests are read once, not on every rank)
            check_finished(lock, job.stage, out, build_dir or out.parent.parent)  # (another lock's: refused)
        _say(f"{job.stage}: already done ({done}); nothing to do")
        return res

    accel = get_accelerator()
    cpu = init_deepspeed_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    device = torch.device("cpu") if cpu else torch.device(accel.device_name(), int(os.environ.get("LOCAL_RANK", 0)))
    if not cpu:
        accel.set_device(device.index)

    # where its DeepSpeed checkpoints go, and the folder a rerun resumes from: the same, but for an interrupted run of
    # an older llmc, which kept them in <out>/ds_checkpoints (resumed from there once; new ones go to ds_dir)
    ds_dir, ckpt_dir = ds_checkpoint_dir(out, job.checkpoint_folder), out / job.checkpoint_folder
    load_dir = ds_resume_dir(out, job.checkpoint_folder) if resume else ds_dir
    resume_from = ds_resume_point(load_dir) if resume else None
    loader, assets = _data_loader(job, assets_root, rank, world, out, resume_from)

    cfg = runtime_config(check_config(ds_config, job, world, config_name), cpu, cpu_bf16)
    precision = precision_note(job.precision, "bf16" if (cfg.get("bf16") or {}).get("enabled") else
                               "fp16" if (cfg.get("fp16") or {}).get("enabled") else "fp32", cpu)
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    tokens_per_step = cfg["train_batch_size"] * job.seq_len
    zero = cfg.get("zero_optimization", {}).get("stage", 0)

    with torch.device("meta"):  # counts and FLOPs without allocating anything
        shape_model = Transformer(job.arch)
    n_params = shape_model.num_params()
    fpt = job.flops_per_token  # the compiler's (the lock's); None: no FLOP/s, no MFU
    del shape_model
    torch.manual_seed(job.seed)
    if zero == 3:
        model = build_zero3_model(job.arch, cfg, job.seed, rank, init=job.init)
    else:
        model = build_model(job.arch, device, seed=job.seed, init=job.init)
    model.set_ac(job.activation_checkpointing, job.ac_layers)
    ac = ac_label(job.activation_checkpointing, job.ac_layers)
    local_numel = _local_numel(model)
    can_resume = resume_from is not None
    if can_resume and load_dir != ds_dir:
        _say(f"{job.stage}: resuming from {resume_from}, in the folder an earlier llmc kept DeepSpeed checkpoints in "
             f"({load_dir}); new checkpoints go to {ds_dir}")
    if can_resume:  # before DeepSpeed reads it: a checkpoint of another stage or model is one line
        check_ds_checkpoint(resume_from, model, job, DsLayout(zero, world, _low_precision(cfg)), build_dir)
    hf_src = init_hf_source(job)
    if not can_resume and job.init_from:
        from llmc.runtime.hf_io import load_init_from  # its llmc checkpoint, else its hf/ export

        got = load_init_from(model, out.parent / job.init_from, job.arch, rank=rank, world=world,
                             load_llmc=lambda m, p: load_weights_zero_aware(m, p, rank),
                             checkpoint_arch=start_arch(job))
        _say(f"initialised weights from {got}")
    elif not can_resume and hf_src:
        info = load_hf_into(model, hf_src, job.arch, rank=rank, world=world, checkpoint_arch=start_arch(job))
        _say(f"initialised weights from Hugging Face {loaded_from(info)}")

    client_sched = None
    if "scheduler" not in cfg:
        def client_sched(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, job.lr_factor)
    wd = float((cfg.get("optimizer") or {}).get("params", {}).get("weight_decay", job.weight_decay))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd, job.no_decay),
                                           config=cfg, lr_scheduler=client_sched)
    step, tokens = 0, 0
    if can_resume:
        path, client = engine.load_checkpoint(str(load_dir))
        if path is None:
            raise ValueError(f"cannot load the DeepSpeed checkpoint in {load_dir}")
        why = job.schedule_change(client.get("lr_schedule"), Path(path).parent.name, int(client["step"]))
        if why is not None:
            raise ValueError(why)
        step, tokens = int(client["step"]), int(client["tokens"])
        loader.load_state_dict(client["data"])
        _say(f"resumed from {path} at step {step}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
    if main and can_resume:  # each step once in metrics.jsonl: drop what the interrupted run logged after it
        from llmc.runtime.metrics_io import truncate_after_step

        truncate_after_step(out / "metrics.jsonl", step)
    from llmc.runtime.train import open_run_logger

    log = open_run_logger(job, out, main, True, MetricsLogger(out / "metrics.jsonl", enabled=main),
                          resumed_step=step if can_resume else None, backend="deepspeed")
    _say(f"{job.name}/{job.stage} (DeepSpeed ZeRO-{zero}, {config_name}): {n_params:,} params "
         f"({local_numel:,} held by rank 0), {job.steps} steps x {tokens_per_step:,} tokens "
         f"(mb {micro} x accum {accum} x dp {world}), seq {job.seq_len}, AC {ac}{job.loss_note}, "
         f"device {device}, {precision}")
    if can_resume:
        log.event("resume", step=step)

    # the step the newest complete checkpoint in ds_dir holds (one resumed from an older llmc's folder: none there yet)
    saved_at = step if can_resume and load_dir == ds_dir else None

    def save_ds() -> None:
        nonlocal saved_at
        if saved_at == step:  # already saved (an interval save, then a stop at that step): not rewritten
            return
        save_ds_checkpoint(engine, ds_dir, step, {"step": step, "tokens": tokens, "data": loader.full_state(),
                                                  "lr_schedule": job.lr_schedule, "stage": job.stage,
                                                  "kind": job.kind, "spec_sha256": job.spec_sha256},
                           job.keep_latest, rank, dist.barrier)
        saved_at = step

    stop_at = min(job.steps, max_steps) if max_steps else job.steps
    last_loss, t_start = float("nan"), time.time()
    # fp16 (a hand-written config: llmc writes bf16 or fp32) with a dynamic loss scale (loss_scale 0, DeepSpeed's
    # default): an overflowing gradient is DeepSpeed's to handle (step skipped, scale halved), not a stop
    fp16 = cfg.get("fp16") or {}
    fp16_scaling = bool(fp16.get("enabled")) and float(fp16.get("loss_scale", 0) or 0) == 0

    def held(module) -> list:
        """The weights this rank holds: its ZeRO-3 partitions (``ds_tensor``), else the parameters."""
        return [getattr(p, "ds_tensor", p) for p in module.parameters()]

    def failed(what: str, loss: float | None, norm: float | None, taken: bool = False) -> dict:
        """Stop at a non-finite step (every rank together): nothing of it saved; the R014 line and the end event."""
        last = ds_dir / f"step-{saved_at:08d}" if saved_at is not None and (ds_dir / f"step-{saved_at:08d}").is_dir() \
            else resume_from if saved_at is None else None
        line = nonfinite_line(str(out), job.stage, step, what, loss, norm, str(last) if last else None, taken)
        result = {"status": "failed", "stage": job.stage, "kind": job.kind, "backend": "deepspeed",
                  "zero_stage": zero, "step": step, "steps": job.steps, "tokens": tokens,
                  "reason": line.split(": error[R014] ", 1)[1].split(": ", 1)[1],
                  "checkpoint": os.path.relpath(last, out) if last else None,
                  "wall_s": round(time.time() - t_start, 2), "params": n_params, "world": world}
        if main:
            print(line, file=sys.stderr, flush=True)
            log.event("end", **result, final_loss=loss)
        log.close()
        dist.barrier()
        return {**result, "loss": loss}
    from llmc.runtime.data import Assets
    from llmc.runtime.validation import Validator

    assets = Assets.from_json(json.loads((assets_root / "assets" / "assets.json").read_text()))
    validator = Validator.for_job(job, assets, micro, rank, world, device, grad_accum=accum)
    engine.train()
    preempted = False
    timer = IntervalTimer()  # step_s: the training time of the steps since the last logged record
    aux_on, terms = has_aux_loss(job.arch), {}
    while step < stop_at:
        timer.start()
        loss_sum = torch.zeros(3, device=device)  # cross-entropy, MoE aux, z-loss term (their sum is optimized)
        lr = engine.get_lr()[0]
        log_now = (step + 1) % job.log_every == 0 or step == 0 or step + 1 == stop_at
        own_norm, bad = None, None
        for i in range(accum):
            x, y = loader.next_batch(micro)
            x, y = x.to(device), y.to(device)
            # the loss in the plan's slices (0: whole), inside the forward (ZeRO-3 gathers the head there)
            losses, aux = engine(x, return_aux=True, targets=y, loss_chunk=job.loss_chunk, lse=job.z_loss > 0)
            ce, z = loss_terms(losses, y, job.z_loss)
            aux = aux.float() if torch.is_tensor(aux) else torch.tensor(float(aux), device=device)
            loss = ce + z + aux
            engine.backward(loss)
            loss_sum += torch.stack([ce.detach().float(), aux.detach().float(), z.detach().float()])
            if i == accum - 1:  # before the boundary's optimizer step: the loss (and ZeRO-0's norm) finite everywhere?
                if zero == 0 and not fp16_scaling:  # ZeRO-0 may not report a norm (and would step on a NaN one):
                    # take it before the step; under fp16's dynamic loss scaling an overflowed (scaled) gradient is
                    # routine, and DeepSpeed skips that step and lowers the scale itself: the loss alone is checked
                    own_norm = _grad_norm(engine.module)
                parts, pre_norm, finite = step_stats(
                    loss_sum / accum, own_norm if own_norm is not None else torch.zeros((), device=device))
                last_loss, terms = parts[0], step_terms(parts, job.z_loss, aux_on)
                pre_norm = pre_norm if own_norm is not None else None
                if not finite:
                    bad = ("non-finite loss" if not math.isfinite(last_loss) else "non-finite gradient norm"
                           if pre_norm is not None and not math.isfinite(pre_norm)
                           else "non-finite gradient norm on another rank")
                    break
            engine.step()
        step += 1
        tokens += tokens_per_step
        timer.stop()  # (validation and checkpoint saves below are not training time)
        # valid after the optimizer step at the accumulation boundary; ZeRO-0 may return None, then the norm taken
        # before the step (DeepSpeed scales by 1/accum in backward, so it is the same norm)
        gnorm = pre_norm if bad else engine.get_global_grad_norm()
        if gnorm is None:
            gnorm = pre_norm
        gnorm = None if gnorm is None else float(gnorm)
        if bad is None and gnorm is not None and not math.isfinite(gnorm) and not fp16_scaling:
            bad = "non-finite gradient norm"  # DeepSpeed's, the same on every rank (its norm is all-reduced)
        if log_now or bad:
            log.log(step_record(step=step, loss=last_loss, lr=lr, grad_norm=gnorm, tokens=tokens,
                                tokens_per_step=tokens_per_step, dt=timer.take(), flops_per_token=fpt,
                                peak_flops=job.peak_flops, world=world, device=device, terms=terms))
        if bad:
            return failed(bad, last_loss, gnorm, taken=engine.was_step_applied() and finite)
        if validator is not None:
            validator.maybe(step, stop_at, engine, log)
        if step % job.checkpoint_interval == 0 and step < stop_at:
            if not weights_finite(held(engine.module), device):
                return failed("non-finite weights after the update", None, None, taken=True)
            save_ds()
        if step < stop_at and preempt.requested(device):  # SIGTERM / SIGUSR1 on any rank: save this step, stop
            preempted = True
            break
    if saved_at != step and not weights_finite(held(engine.module), device):
        return failed("non-finite weights after the update", None, None, taken=True)
    save_ds()

    # full weights as an llmc checkpoint, so any following stage can init_from this one. ZeRO-3: gathered one
    # module at a time onto rank 0's CPU (DeepSpeed's consolidated state dict), never the whole model on a GPU
    full_sd = (engine._zero3_consolidated_16bit_state_dict() or {}) if zero == 3 else None
    final = save_checkpoint(ckpt_dir, step, engine.module, None, {"tokens": tokens, "stage": job.stage},
                            keep_latest=job.keep_latest, model_sd=full_sd)
    del full_sd
    status = "done" if step >= job.steps else "preempted" if preempted else "stopped"
    result = {"status": status, "stage": job.stage, "kind": job.kind, "backend": "deepspeed", "zero_stage": zero,
              "step": step, "steps": job.steps, "loss": last_loss, "tokens": tokens,
              "checkpoint": os.path.relpath(final, out), "wall_s": round(time.time() - t_start, 2),
              "params": n_params, "world": world, "rank0_param_numel": local_numel,
              "activation_checkpointing": ac, **_placement(engine, zero)}
    if validator is not None and validator.last is not None:
        result.update({f"val_{k}" if k == "step" else k: v for k, v in validator.last.items()})
    if main:
        if status == "done":  # servable model in <out>/hf, then the done marker
            tok_dir = Path(assets.tokenizer_dir)
            sd = torch.load(final / "model.pt", map_location="cpu", weights_only=True, mmap=True)
            hf = export_stage(job, out, out / "hf", tokenizer_dir=tok_dir, model_sd=sd, record=trained_record(job, step))
            result["hf"] = "hf" if hf.get("hf") else None
        if status == "done":  # atomically: a reader never sees a half-written marker; it records what trained it
            from llmc.runtime.job import fingerprint_record

            tmp = out / f"DONE.json.tmp{os.getpid()}"
            record = fingerprint_record(job.lock, job.stage, stage_dir=out, spec_dir=job.spec_dir)
            tmp.write_text(json.dumps({**result, **record}, indent=2) + "\n")
            os.replace(tmp, done)
        log.event("end", **{k: v for k, v in result.items() if k != "loss"}, final_loss=last_loss)
        _say(f"{status} at step {step}: loss {last_loss:.4f}, checkpoint {final}")
    log.close()
    dist.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the stage; the exit status (0 done, :data:`llmc.runtime.preempt.EXIT_PREEMPTED` saved on a signal, 1 an
    error) is also reported to the launcher (:func:`llmc.runtime.runlock.report_exit`). The DeepSpeed launcher
    loses it after a signal: launch.py exits 1 once it has stopped the ranks, whatever they returned, and the
    runner dies of the SIGTERM (143) on one node (deepspeed/launcher/launch.py, runner.py, 0.19.8), so a stage
    whose ranks all saved their step would read as failed without the ranks' own word."""
    from llmc.runtime.runlock import report_exit

    code = _run(argv)
    report_exit(code)
    return code


def _run(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.ds_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", required=True, type=Path, help="plan.lock.json written by `llmc build`")
    ap.add_argument("--ds-config", required=True, type=Path, help="deepspeed/ds_config.json")
    ap.add_argument("--stage", default=None, help="stage name (default: the main pre-training)")
    ap.add_argument("--out", type=Path, default=None, help="stage output dir (default <assets>/run/<stage>)")
    ap.add_argument("--assets", type=Path, default=None, help="where assets/, data/, cache/ are (default: lock's dir)")
    ap.add_argument("--steps", type=int, default=None, help="stop after N optimizer steps (schedule unchanged)")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    ap.add_argument("--cpu-bf16", action="store_true", help="bf16 on CPU too (default fp32 on CPU, as the native "
                    "trainer)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = ap.parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    cfg_path = stage_config_path(a.ds_config, a.stage)
    from llmc.runtime.entry import check_lock_unedited, one_line_error

    edited = check_lock_unedited(a.lock)  # a lock edited after `llmc build` wrote it: error[L001], as llmc launch says
    if edited:
        if os.environ.get("RANK", "0") == "0":
            print(edited, file=sys.stderr)
        return 1
    try:
        lock = read_lock(a.lock)
        ds_config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        print(f"error[R001] cannot read the lock or the DeepSpeed config ({e})", file=sys.stderr)
        return 1
    root = (a.assets or a.lock.resolve().parent).resolve()
    stage_name = a.stage or "pretrain"
    out = (a.out or root / "run" / stage_name).resolve()
    from llmc.runtime import preempt
    from llmc.runtime.checkpoint import CheckpointError
    from llmc.runtime.distributed import shutdown

    finished = False
    try:
        with preempt.handlers():  # SIGTERM / SIGUSR1: the loop saves the step it is at and stops (status preempted)
            res = train(lock, ds_config, a.stage, out, root, max_steps=a.steps, resume=not a.no_resume,
                        config_name=str(cfg_path), build_dir=a.lock.resolve().parent, cpu_bf16=a.cpu_bf16)
        finished = True
    except (ValueError, FileNotFoundError, KeyError, CheckpointError) as e:
        print(f"{a.lock}: error[R002] {stage_name}: {one_line_error(e)}", file=sys.stderr)
        return 1
    finally:
        shutdown(together=finished)  # a failing rank leaves at once (the launcher then stops the others)
    from llmc.runtime.entry import exit_code

    return exit_code(res.get("status", "done"))


if __name__ == "__main__":
    sys.exit(main())
