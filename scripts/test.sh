#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on both cores: two pytest workers, each taking whole test
# modules (pytest-xdist's order: most tests first; tests/conftest.py says why not longest first). Every torch
# process computes on one thread (OMP_NUM_THREADS=1, as torchrun sets for its workers): two workers, some
# running two-rank jobs, already fill a 2-core machine, and more threads only spin against each other.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
.venv/bin/ruff check llmc tests scripts
.venv/bin/python -m pytest -q -n 2 --dist loadfile -p no:cacheprovider "$@"
