"""DeepSpeed 0.19.8 trainer for llmc's runtime model: data parallel + ZeRO-0/1/2/3 (no TP/PP).

    deepspeed --num_gpus N --module llmc.runtime.ds_train --lock plan.lock.json \
        --ds-config deepspeed/ds_config.json [--stage NAME] [--out DIR] [--steps N]
    (torchrun -m llmc.runtime.ds_train ... works too; on a machine without a GPU set DS_ACCELERATOR=cpu)

Builds the same model (``llmc.runtime.model.build_model``) and the same packed data
(``prepare_assets`` + ``PackedLoader``, global samples dealt to the data-parallel ranks in order) as
the native trainer, hands the model to ``deepspeed.initialize(model, config=ds_config)`` and trains
with ``engine.backward`` / ``engine.step`` (DeepSpeed scales the loss by 1/gradient_accumulation_steps
and applies ``gradient_clipping``). Metrics go to ``<out>/metrics.jsonl`` in the native trainer's
format. Resumable DeepSpeed checkpoints (``engine.save_checkpoint`` / ``load_checkpoint``, ZeRO
shards included) go to ``<out>/ds_checkpoints``; at the end the full weights are also written as an
llmc checkpoint (``<out>/checkpoints/step-N``) and ``DONE.json`` names it, so a following stage
(native or DeepSpeed) can ``init_from`` this one.

Run-time adaptation (logged): the ds_config is written for the plan's data-parallel size; the global
batch (in sequences) is kept and split over the actual world size, so a 2-process CPU test of an
8-GPU config trains on the same samples. A stage other than the main pre-training gets its own lr,
steps, warmup and batch from the lock. Without a ``scheduler`` block (wsd, linear to a floor) the
LR follows llmc's own schedule (``TrainJob.lr_factor``) as a client LambdaLR.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

from llmc.lockfile import read_lock
from llmc.runtime.capabilities import DS_STAGE_KINDS


def _say(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


def _split_batch(global_seqs: int, world: int, micro_pref: int) -> tuple[int, int]:
    """(micro, accum) with micro x accum x world == global_seqs, micro <= micro_pref and largest."""
    if global_seqs % world:
        raise ValueError(f"global batch of {global_seqs} sequences cannot be split over {world} ranks")
    per_rank = global_seqs // world
    micro = max(m for m in range(1, min(micro_pref, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def adapt_config(cfg: dict, job, world: int) -> tuple[dict, list[str]]:
    """The ds_config for this stage and this world size (batch split, lr, schedule); notes of changes."""
    cfg = copy.deepcopy(cfg)
    cfg.pop("_llmc", None)
    notes: list[str] = []
    gbs = int(job.global_batch_seqs)
    micro, accum = _split_batch(gbs, world, int(cfg.get("train_micro_batch_size_per_gpu", job.micro_batch)))
    new = {"train_batch_size": gbs, "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum}
    for k, v in new.items():
        if cfg.get(k) != v:
            notes.append(f"{k}: {cfg.get(k)} -> {v} (world {world})")
        cfg[k] = v
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt["params"].get("lr") != job.lr:
        notes.append(f"optimizer.params.lr: {opt['params'].get('lr')} -> {job.lr} (stage {job.stage})")
        opt["params"]["lr"] = job.lr
    sch = cfg.get("scheduler")
    if sch is not None:
        p = sch["params"]
        warm = max(1, int(job.warmup_steps))
        upd = {"warmup_num_steps": warm}
        if "total_num_steps" in p:
            upd["total_num_steps"] = max(int(job.steps), warm)
        if "warmup_max_lr" in p:
            upd["warmup_max_lr"] = job.lr
        if "cos_min_ratio" in p and job.lr:
            upd["cos_min_ratio"] = job.min_lr / job.lr
        for k, v in upd.items():
            if p.get(k) != v:
                notes.append(f"scheduler.params.{k}: {p.get(k)} -> {v}")
                p[k] = v
    if job.precision == "fp32" and cfg.get("bf16", {}).get("enabled"):
        notes.append("bf16 disabled: the stage trains in fp32")
        cfg["bf16"] = {"enabled": False}
    return cfg, notes


def _prune(folder: Path, keep: int) -> None:
    tags = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in tags[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


def _data_loader(job, assets_root: Path, rank: int, world: int):
    """The stage's packed loader: rank 0 prepares the assets and the token cache (idempotent), the
    other ranks read what it wrote."""
    import torch.distributed as dist

    from llmc.runtime.data import Assets, build_loader
    from llmc.runtime.entry import prepare_assets

    main = rank == 0
    if main:
        assets = prepare_assets(job, assets_root)
    dist.barrier()
    if not main:
        assets = Assets.from_json(json.loads((assets_root / "assets" / "assets.json").read_text()))
    names = {s.name for s in job.sources}
    assets = Assets(assets.root, assets.tokenizer_dir, tuple(s for s in assets.sources if s.name in names),
                    assets.cache_dir)
    tok = assets.tokenizer()
    if tok.vocab_size > job.arch.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {job.arch.vocab_size}")
    if main:
        build_loader(list(assets.sources), tok, job.seq_len, assets.cache_dir, job.seed)
    dist.barrier()
    return build_loader(list(assets.sources), tok, job.seq_len, assets.cache_dir, job.seed, rank, world)


def train(lock: dict, ds_config: dict, stage: str | None, out: Path, assets_root: Path, *,
          max_steps: int | None = None, resume: bool = True) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from llmc.runtime.checkpoint import load_model_weights, save_checkpoint
    from llmc.runtime.job import TrainJob
    from llmc.runtime.metrics import MetricsLogger, active_params, flops_per_token, step_record
    from llmc.runtime.model import build_model, lm_loss

    job = TrainJob.from_lock(lock, stage)
    if job.kind not in DS_STAGE_KINDS:
        raise ValueError(f"stage {job.stage!r} is {job.kind}: the DeepSpeed runner trains "
                         f"{', '.join(DS_STAGE_KINDS)}; run it with `llmc launch --backend native`")
    done = out / "DONE.json"
    if resume and done.exists():
        _say(f"{job.stage}: already done ({done}); nothing to do")
        return json.loads(done.read_text())

    accel = get_accelerator()
    cpu = accel.device_name() == "cpu"
    deepspeed.init_distributed(dist_backend="gloo" if cpu else accel.communication_backend_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    device = torch.device("cpu") if cpu else torch.device(accel.device_name(), int(os.environ.get("LOCAL_RANK", 0)))
    if not cpu:
        accel.set_device(device.index)

    loader = _data_loader(job, assets_root, rank, world)

    cfg, notes = adapt_config(ds_config, job, world)
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    tokens_per_step = cfg["train_batch_size"] * job.seq_len

    torch.manual_seed(job.seed)
    model = build_model(job.arch, device, seed=job.seed)
    n_params = model.num_params()
    fpt = job.flops_per_token or flops_per_token(job.arch, active_params(model), job.seq_len)
    ds_dir, ckpt_dir = out / "ds_checkpoints", out / job.checkpoint_folder
    can_resume = resume and (ds_dir / "latest").exists()
    if not can_resume and job.init_from:
        init_dir = out.parent / job.init_from
        if not (init_dir / "DONE.json").exists():
            raise ValueError(f"stage {job.stage!r} starts from stage {job.init_from!r}, which has not finished "
                             f"({init_dir / 'DONE.json'} missing)")
        step0 = load_model_weights(model, init_dir)
        _say(f"initialised weights from {init_dir} (step {step0})")

    client_sched = None
    if "scheduler" not in cfg:
        def client_sched(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, job.lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad],
                                           config=cfg, lr_scheduler=client_sched)
    step, tokens = 0, 0
    if can_resume:
        path, client = engine.load_checkpoint(str(ds_dir))
        if path is None:
            raise ValueError(f"cannot load the DeepSpeed checkpoint in {ds_dir}")
        step, tokens = int(client["step"]), int(client["tokens"])
        loader.load_state_dict(client["data"])
        _say(f"resumed from {path} at step {step}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = MetricsLogger(out / "metrics.jsonl", enabled=main)
    for n in notes:
        _say(f"ds_config adapted: {n}")
    zero = cfg.get("zero_optimization", {}).get("stage", 0)
    _say(f"{job.name}/{job.stage} (DeepSpeed ZeRO-{zero}): {n_params:,} params, {job.steps} steps x "
         f"{tokens_per_step:,} tokens (mb {micro} x accum {accum} x dp {world}), seq {job.seq_len}, device {device}")
    if can_resume:
        log.event("resume", step=step)

    def save_ds() -> None:
        tag = f"step-{step:08d}"
        engine.save_checkpoint(str(ds_dir), tag=tag,
                               client_state={"step": step, "tokens": tokens, "data": loader.state_dict()})
        dist.barrier()
        if main:
            _prune(ds_dir, job.keep_latest)

    stop_at = min(job.steps, max_steps) if max_steps else job.steps
    last_loss, t_start = float("nan"), time.time()
    from llmc.runtime.data import Assets
    from llmc.runtime.validation import Validator

    assets = Assets.from_json(json.loads((assets_root / "assets" / "assets.json").read_text()))
    validator = Validator.for_job(job, assets, micro, rank, world, device)
    engine.train()
    while step < stop_at:
        t0 = time.time()
        loss_sum = torch.zeros((), device=device)
        lr = engine.get_lr()[0]
        for _ in range(accum):
            x, y = loader.next_batch(micro)
            x, y = x.to(device), y.to(device)
            logits, aux = engine(x, return_aux=True)
            loss = lm_loss(logits.float(), y, job.z_loss)
            loss = loss + (aux.float() if torch.is_tensor(aux) else aux)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
        step += 1
        tokens += tokens_per_step
        mean = loss_sum / accum
        dist.all_reduce(mean)
        last_loss = float(mean) / world
        gnorm = engine.get_global_grad_norm()
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        dt = time.time() - t0
        if step % job.log_every == 0 or step == 1 or step == stop_at:
            log.log(step_record(step=step, loss=last_loss, lr=lr, grad_norm=gnorm, tokens=tokens,
                                tokens_per_step=tokens_per_step, dt=dt, flops_per_token=fpt,
                                peak_flops=job.peak_flops, world=world, device=device))
        if validator is not None:
            validator.maybe(step, stop_at, engine, log)
        if step % job.checkpoint_interval == 0 and step < stop_at:
            save_ds()
    save_ds()

    # full weights as an llmc checkpoint, so any following stage can init_from this one
    params = list(engine.module.parameters())
    if zero == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            final = save_checkpoint(ckpt_dir, step, engine.module, None, {"tokens": tokens, "stage": job.stage},
                                    keep_latest=job.keep_latest)
    else:
        final = save_checkpoint(ckpt_dir, step, engine.module, None, {"tokens": tokens, "stage": job.stage},
                                keep_latest=job.keep_latest)
    status = "done" if step >= job.steps else "stopped"
    result = {"status": status, "stage": job.stage, "kind": job.kind, "backend": "deepspeed", "zero_stage": zero,
              "step": step, "steps": job.steps, "loss": last_loss, "tokens": tokens,
              "checkpoint": os.path.relpath(final, out), "wall_s": round(time.time() - t_start, 2),
              "params": n_params, "world": world}
    if validator is not None and validator.last is not None:
        result.update({f"val_{k}" if k == "step" else k: v for k, v in validator.last.items()})
    if main:
        if status == "done":  # atomically: a reader never sees a half-written marker
            tmp = out / f"DONE.json.tmp{os.getpid()}"
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, done)
        log.event("end", **{k: v for k, v in result.items() if k != "loss"}, final_loss=last_loss)
        _say(f"{status} at step {step}: loss {last_loss:.4f}, checkpoint {final}")
    dist.barrier()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmc.runtime.ds_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", required=True, type=Path, help="plan.lock.json written by `llmc build`")
    ap.add_argument("--ds-config", required=True, type=Path, help="deepspeed/ds_config.json")
    ap.add_argument("--stage", default=None, help="stage name (default: the main pre-training)")
    ap.add_argument("--out", type=Path, default=None, help="stage output dir (default <assets>/run/<stage>)")
    ap.add_argument("--assets", type=Path, default=None, help="where assets/, data/, cache/ are (default: lock's dir)")
    ap.add_argument("--steps", type=int, default=None, help="stop after N optimizer steps (schedule unchanged)")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    a = ap.parse_args(argv)
    if a.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    try:
        lock = read_lock(a.lock)
        ds_config = json.loads(a.ds_config.read_text())
    except (OSError, ValueError) as e:
        print(f"error[R001] cannot read the lock or the DeepSpeed config ({e})", file=sys.stderr)
        return 1
    root = (a.assets or a.lock.resolve().parent).resolve()
    stage_name = a.stage or "pretrain"
    out = (a.out or root / "run" / stage_name).resolve()
    try:
        res = train(lock, ds_config, a.stage, out, root, max_steps=a.steps, resume=not a.no_resume)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{a.lock}: error[R002] {stage_name}: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0 if res.get("status") in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
