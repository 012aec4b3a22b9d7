"""Command lines for running an emitted torchtitan job module (used by ``llmc launch --backend torchtitan``).

No torch import here: this only builds argv / env. On GPUs the command is the stock
``torchrun ... -m torchtitan.train --module llmc_job --config job``; on CPU (``cpu=True``) the
entry point is :mod:`llmc.runtime.titan_cpu_shim`, which patches torch for gloo first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def torchtitan_command(
    module_path: str | os.PathLike,
    nproc: int,
    cpu: bool,
    extra_args: Sequence[str] = (),
    *,
    run_dir: str | os.PathLike | None = None,
    config: str = "job",
    nnodes: int = 1,
    rdzv_endpoint: str = "localhost:0",
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment to run ``module_path`` (``<build>/torchtitan/llmc_job.py``).

    ``run_dir`` (default: the module's build directory, i.e. the parent of ``torchtitan/``) is
    exported as ``LLMC_RUN_DIR``: the job reads ``assets/tokenizer.json`` and builtin corpora (``data/``) under
    it and writes ``outputs/torchtitan``. ``python`` defaults to the running interpreter, so the
    command uses the same venv (``python -m torch.distributed.run`` is ``torchrun``).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    path = Path(module_path).resolve()
    if path.suffix != ".py":
        raise ValueError(f"expected a job module file (*.py), got {path}")
    module_dir = str(path.parent)
    module = path.stem
    run = Path(run_dir).resolve() if run_dir is not None else path.parent.parent

    py = python or sys.executable
    argv = [py, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        argv.append(f"--nnodes={nnodes}")
    argv += ["--rdzv_backend", "c10d", f"--rdzv_endpoint={rdzv_endpoint}"]
    if not cpu:
        argv += ["--local-ranks-filter", "0", "--role", "rank", "--tee", "3"]
    argv += ["-m", "llmc.runtime.titan_cpu_shim" if cpu else "torchtitan.train"]
    argv += ["--module", module, "--config", config, *extra_args]

    old_pp = os.environ.get("PYTHONPATH", "")
    env = {
        "PYTHONPATH": module_dir + (os.pathsep + old_pp if old_pp else ""),
        **OFFLINE_ENV,
        "LLMC_RUN_DIR": str(run),
    }
    return argv, env


def dry_run_command(
    module_path: str | os.PathLike,
    world: int,
    extra_args: Sequence[str] = (),
    *,
    run_dir: str | os.PathLike | None = None,
    config: str = "job_without_converters",
    python: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """One process simulating rank 0 of a ``world``-rank job with torchtitan's fake backend on CPU
    (builds the real mesh, applies TP/FSDP/AC, runs one step with fake collectives)."""
    argv, env = torchtitan_command(module_path, 1, True, (), run_dir=run_dir, config=config, python=python)
    py = argv[0]
    i = argv.index("-m", 1 + argv.index("torch.distributed.run"))  # the shim's -m
    # no checkpoint writes, no inductor compile and fp32 parameters in a one-step CPU simulation: it checks the
    # mesh, the sharding and that a step runs, and CPUs without bf16 matrix instructions run bf16 GEMMs through
    # a slow fallback (Llama 3 8B at TP 8, 32 tokens: 200 s of a 240 s simulation on a 2-core x86 host)
    argv = [py, *argv[i:], "--comm.mode", "fake_backend", "--training.steps", "1",
            "--checkpoint.no-enable", "--compile.no-enable", "--training.mixed_precision_param", "float32",
            *extra_args]
    env.update({"NGPU": str(world), "LOCAL_RANK": "0", "RANK": "0"})
    return argv, env
