#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: 4f99515cbc9eab5fbb7310281091050068372f1dff795dd68ff597a56547c295
#
# torchrun on one node (1 processes by default).
#   BACKEND=native     llmc.runtime.entry, every stage in order (default)
#   BACKEND=torchtitan torchtitan.train with the job modules in torchtitan/ for pre-training and continued
#                      training with its own layout, llmc.runtime.entry for the others
#   BACKEND=deepspeed  deepspeed/launch.sh (the DeepSpeed launcher)
# Arguments after the script name go to torchtitan.train (BACKEND=torchtitan).
# Env: NPROC, RUN_DIR (default <build>/run), STAGE, BACKEND.
set -euo pipefail
BUILD_DIR="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." >/dev/null && pwd)"
RUN_DIR="${RUN_DIR:-$BUILD_DIR/run}"
NPROC="${NPROC:-1}"
BACKEND="${BACKEND:-native}"
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

TORCHRUN=(torchrun --standalone --nproc_per_node "$NPROC")
case "$BACKEND" in
  native)
    python -m llmc.runtime.entry prepare --lock "$LOCK"
    if want_stage pretrain && ! stage_done pretrain; then
      "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage pretrain --out "$RUN_DIR"/pretrain
    fi
    if want_stage pretrain; then run_evals pretrain; fi
    ;;
  torchtitan)
    titan_path_ok || exit 2
    python -m llmc.runtime.entry prepare --lock "$LOCK"
    # a torchtitan job writes DCP checkpoints and no DONE.json: the stage ends with its Hugging Face export
    # (run/<stage>/hf, what the next stage starts from), and is done once that exists
    if want_stage pretrain && ! titan_done pretrain; then
      LLMC_RUN_DIR="$BUILD_DIR" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
      PYTHONPATH="$BUILD_DIR/torchtitan${PYTHONPATH:+:$PYTHONPATH}" \
        "${TORCHRUN[@]}" --local-ranks-filter 0 --role rank --tee 3 \
        -m torchtitan.train --module llmc_job --config job "$@"
      python -m llmc.runtime.hf_io "$BUILD_DIR" --stage pretrain -o "$RUN_DIR"/pretrain/hf
    fi
    if want_stage pretrain; then run_evals pretrain; fi
    ;;
  deepspeed)
    # the DeepSpeed launcher (deepspeed/launch.sh; HOSTFILE for several nodes)
    exec bash "$BUILD_DIR/deepspeed/launch.sh"
    ;;
  *) echo "unknown BACKEND=$BACKEND (native, torchtitan, deepspeed)" >&2; exit 2 ;;
esac
