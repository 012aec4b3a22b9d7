#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: fast tests on both cores, then the
# multi-process / real-library ("slow") tests one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled DS_ACCELERATOR=cpu
.venv/bin/ruff check llmc tests scripts
.venv/bin/python -m pytest -q -m "not slow" -n 2 -p no:cacheprovider "$@"
.venv/bin/python -m pytest -q -m "slow" -p no:cacheprovider "$@"
