#!/usr/bin/env bash
# One-GPU check of the three backends (native, torchtitan, DeepSpeed): llama3.2-1b, bf16, 30 steps each,
# offline data; writes step time, tokens/s/GPU and peak memory (allocated, reserved) per backend as a
# measurements YAML (benchmarks/README.md schema) to $OUT/gpu_check.yaml (or --out DIR). One build and
# data preparation shared by the three runs; budget about 6-8 minutes
# on one H100/H200.
#
#   scripts/gpu_check.sh [--out DIR] [--backends native,torchtitan,deepspeed] [--steps N] [--keep]
#   scripts/gpu_check.sh --backends deepspeed,deepspeed-offload    # + DeepSpeed with optimizer and parameter
#                                                                   #   offload to CPU (its own build; ~2 min more)
#   scripts/gpu_check.sh --cpu-smoke --out /tmp/gc      # the same pipeline, tiny model, 2 steps, CPU
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
args=("$@")
if [[ -n "${OUT:-}" ]] && [[ " $* " != *" --out "* ]]; then
  args+=(--out "$OUT")
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$py" "$here/gpu_check.py" "${args[@]}"
