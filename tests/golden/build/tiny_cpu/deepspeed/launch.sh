#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: 4f99515cbc9eab5fbb7310281091050068372f1dff795dd68ff597a56547c295
#
# DeepSpeed 0.19.8 (data parallel + ZeRO-0), config in deepspeed/ds_config.json; a stage whose
# batch / lr / steps differ runs deepspeed/ds_config.<stage>.json (llmc.runtime.ds_train picks it for --stage).
#   bash deepspeed/launch.sh                       # one node, NPROC=1 processes
#   HOSTFILE=hostfile bash deepspeed/launch.sh     # 1 node(s): MPI-style hostfile ("host slots=N")
# On a machine without a GPU set DS_ACCELERATOR=cpu (gloo). Env: NPROC, HOSTFILE, MASTER_ADDR, MASTER_PORT, RUN_DIR, STAGE.
set -euo pipefail
BUILD_DIR="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." >/dev/null && pwd)"
RUN_DIR="${RUN_DIR:-$BUILD_DIR/run}"
NPROC="${NPROC:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LOCK="$BUILD_DIR/plan.lock.json"
DS_CONFIG="$BUILD_DIR/deepspeed/ds_config.json"
# Stages run in order; a stage with <run dir>/<stage>/DONE.json is skipped (resume at the first
# unfinished one). STAGE=<name> runs only that stage.
stage_done() { [ -f "$RUN_DIR/$1/DONE.json" ]; }
want_stage() { [ -z "${STAGE:-}" ] || [ "$STAGE" = "$1" ]; }
# eval.tasks (lm-evaluation-harness) on run/<stage>/hf after the stages listed in the lock, once:
# skipped when <run dir>/<stage>/eval/summary.json exists.
eval_done() { [ -f "$RUN_DIR/$1/eval/summary.json" ]; }
run_evals() { eval_done "$1" || python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }
srun_evals() { eval_done "$1" || srun --ntasks=1 --nodes=1 python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }

DS=(deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  # --master_addr: the first host of the hostfile (DeepSpeed would otherwise take the first address `hostname -I`
  # prints there, which may be one the other nodes cannot reach); MASTER_ADDR overrides it
  MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ { print $1; exit }' "$HOSTFILE")}"
  # the remote ranks (started over pdsh/ssh) get only a few variables of this environment (NCCL*, PYTHON*, ...)
  # plus the KEY=VALUE lines of DeepSpeed's environment file (.deepspeed_env,
  # https://www.deepspeed.ai/getting-started/#multi-node-environment-variables; DS_ENV_FILE names another one:
  # https://github.com/deepspeedai/DeepSpeed/blob/master/deepspeed/launcher/runner.py): write the ones llmc's runs read
  mkdir -p "$RUN_DIR"
  export DS_ENV_FILE="$RUN_DIR/deepspeed_env"
  : > "$DS_ENV_FILE"
  for v in $(compgen -e); do
    case "$v" in HF_*|WANDB_*|LLMC_*|DS_ACCELERATOR|OMP_NUM_THREADS|TORCH_*|TRANSFORMERS_*|CUDA_VISIBLE_DEVICES) ;; *) continue ;; esac
    case "${!v}" in
      *[!A-Za-z0-9_@%+=:,./-]*) echo "deepspeed/launch.sh: $v is not passed to the other nodes (a character DeepSpeed would not quote safely)" >&2 ;;
      *) printf '%s=%s\n' "$v" "${!v}" >> "$DS_ENV_FILE" ;;
    esac
  done
  DS=(deepspeed --hostfile "$HOSTFILE" --num_nodes 1 --num_gpus "$NPROC" --master_addr "$MASTER_ADDR"
      --master_port "$MASTER_PORT")
fi
python -m llmc.runtime.entry prepare --lock "$LOCK"
if want_stage pretrain && ! stage_done pretrain; then
  "${DS[@]}" --module llmc.runtime.ds_train --lock "$LOCK" --ds-config "$DS_CONFIG" --stage pretrain --out "$RUN_DIR"/pretrain
fi
if want_stage pretrain; then run_evals pretrain; fi
