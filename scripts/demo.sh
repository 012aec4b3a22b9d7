#!/usr/bin/env bash
# The embedded default: plan, build and train the tiny example on this CPU (no network needed), then
# summarise the run: validation loss / perplexity first -> last and the eval task's score.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMC_SKIP_VLLM=1 scripts/setup.sh  # the demo needs no vLLM environment (scripts/test.sh makes it)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
SPEC=${1:-examples/tiny_cpu.yaml}
NAME=$(basename "$SPEC" .yaml)
.venv/bin/llmc plan "$SPEC"
.venv/bin/llmc build "$SPEC" -o "build/$NAME"
.venv/bin/llmc launch "build/$NAME"
echo
echo "== summary (llmc report build/$NAME: plots and report.html in build/$NAME/run/report) =="
.venv/bin/llmc report "build/$NAME"
