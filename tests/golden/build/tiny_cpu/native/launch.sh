#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: 4f99515cbc9eab5fbb7310281091050068372f1dff795dd68ff597a56547c295
#
# Run tiny-cpu with llmc's own runtime (torchrun, one node): prepare the assets, then every stage.
#   bash native/launch.sh                 # all stages, resuming after finished ones
#   NPROC=2 STAGE=pretrain bash native/launch.sh
# Env: NPROC (processes, default 1; CPU run), RUN_DIR (default <build>/run), STAGE.
set -euo pipefail
BUILD_DIR="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." >/dev/null && pwd)"
RUN_DIR="${RUN_DIR:-$BUILD_DIR/run}"
NPROC="${NPROC:-1}"
LOCK="$BUILD_DIR/plan.lock.json"
# Stages run in order; a stage with <run dir>/<stage>/DONE.json is skipped (resume at the first
# unfinished one). STAGE=<name> runs only that stage.
stage_done() { [ -f "$RUN_DIR/$1/DONE.json" ]; }
# a stage a torchtitan job trains is done once its Hugging Face export exists (torchtitan writes no DONE.json)
titan_done() { [ -f "$RUN_DIR/$1/hf/config.json" ]; }
# PYTHONPATH is split on ':': torchtitan cannot import the job from a build path that holds one
titan_path_ok() {
  case "$BUILD_DIR" in
    *:*) echo "error: the build directory's path ($BUILD_DIR) contains ':', which PYTHONPATH cannot carry; move the build or use BACKEND=native" >&2; return 2 ;;
  esac
}
want_stage() { [ -z "${STAGE:-}" ] || [ "$STAGE" = "$1" ]; }
# eval.tasks (lm-evaluation-harness) on run/<stage>/hf after the stages listed in the lock, once:
# skipped when <run dir>/<stage>/eval/summary.json exists.
eval_done() { [ -f "$RUN_DIR/$1/eval/summary.json" ]; }
run_evals() { eval_done "$1" || python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }
srun_evals() { eval_done "$1" || srun --ntasks=1 --nodes=1 python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }
skipped() { echo "stage $1: done ($RUN_DIR/$1/DONE.json), skipped"; }

python -m llmc.runtime.entry prepare --lock "$LOCK"
if want_stage pretrain; then
  if stage_done pretrain; then
    skipped pretrain
  else
    torchrun --standalone --nproc_per_node "$NPROC" -m llmc.runtime.entry --lock "$LOCK" --stage pretrain --out "$RUN_DIR"/pretrain
  fi
fi
if want_stage pretrain; then run_evals pretrain; fi
