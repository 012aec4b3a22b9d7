#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: c13bb38ca35f8b652f9b4515d8651a8431abe5121f8287c867193bc9cc450f82
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
# unfinished one) when it is this build's result: DONE.json records the fingerprint of what decided the stage's result
# (llmc.runtime.job.stage_fingerprint) and what its data files and tokenizer held, prepare writes this lock's
# fingerprints to assets/stage-fingerprints.txt, and the runtime's check (`python -m llmc.runtime.entry check`, the
# one `llmc launch` applies) compares them; a stage finished under another lock (the build directory rebuilt from
# another spec), from other data or with another tokenizer stops the script, neither skipped nor trained over.
# STAGE=<name> runs only that stage.
trained_by() { sed -n 's/^ *"fingerprint_sha256": *"\([0-9a-f]*\)".*/\1/p' "$1" 2>/dev/null || true; }
lock_fingerprint() { awk -v s="$1" '$1 == s { print $2; exit }' "$BUILD_DIR/assets/stage-fingerprints.txt" 2>/dev/null || true; }
# rerun_hint STAGE: how to train STAGE and the stages after it again, as a command that does so when run as printed:
# `llmc launch` when this script writes the build's own run/ and assets/ (the only ones it trains in), else this
# script run again after moving them aside
rerun_hint() {
  if [ "$RUN_DIR" -ef "$BUILD_DIR/run" ]; then
    echo "\`llmc launch $(printf '%q' "$BUILD_DIR") --backend $BACKEND --no-resume --from $1\` sets it and the stages after it aside and trains them again"
  else
    echo "move $RUN_DIR/$1 and the folders of the stages after it aside (mv each to <folder>.set-aside-N) and run this script again with the same LLMC_RUN_DIR / RUN_DIR (\`llmc launch\` trains in the build's own run/, not in $RUN_DIR)"
  fi
}
# trained_here STAGE RECORD [export]: the finished STAGE, whose RECORD names the lock that trained it, is this
# build's result: the runtime's check says so (a record without a fingerprint, an older llmc's, is trusted with a
# warning); one that is not ends the script
trained_here() {
  local was now rc=0
  was="$(trained_by "$2")"
  now="$(lock_fingerprint "$1")"
  if [ -z "$was" ]; then
    echo "$RUN_DIR/$1: warning[R005] stage $1 finished without a record of the lock it was trained under (an older llmc): counted as finished, unchecked" >&2
    return 0
  fi
  if [ -z "$now" ]; then
    echo "$RUN_DIR/$1: warning[R005] stage $1: no fingerprints of this lock ($BUILD_DIR/assets/stage-fingerprints.txt, written by prepare): counted as finished, unchecked" >&2
    return 0
  fi
  # the runtime's check, also when the fingerprints match (the data, the tokenizer or the init_hf weights may have
  # changed since): it names what changed (exit 3 after its error line)
  python -m llmc.runtime.entry check --lock "$LOCK" --assets "$BUILD_DIR" --backend "$BACKEND" --stage "$1" --out "$RUN_DIR/$1" ${3:+--export} || rc=$?
  case "$rc" in
    0|1) return "$rc" ;;
    3) ;;
    *) if [ "$was" = "$now" ]; then
         echo "$RUN_DIR/$1: error[R004] stage $1: the check of its finished run failed (exit $rc, its output above): neither skipped nor trained over" >&2
       else
         echo "$RUN_DIR/$1: error[R004] stage $1 finished under another lock (fingerprint ${was:0:12}, this lock's ${now:0:12}): $(rerun_hint "$1"), or build into a fresh directory" >&2
       fi ;;
  esac
  exit 2
}
# before a stage runs, its folder keeps a copy of the prepared tokenizer (the run keeps the tokenizer it trained with
# when prepare later writes another, or when it is set aside); mkdir claims it (one node copies)
keep_tokenizer() {
  local d="$RUN_DIR/$1/tokenizer" f
  [ -f "$BUILD_DIR/assets/tokenizer.json" ] && [ ! -e "$d" ] || return 0
  mkdir -p "$RUN_DIR/$1" && mkdir "$d" 2>/dev/null || return 0
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    if [ -f "$BUILD_DIR/assets/$f" ]; then cp "$BUILD_DIR/assets/$f" "$d/$f"; fi
  done
}
stage_done() {
  if [ -f "$RUN_DIR/$1/DONE.json" ]; then trained_here "$1" "$RUN_DIR/$1/DONE.json"; return; fi
  keep_tokenizer "$1"
  return 1
}
# a stage a torchtitan job trains is done once its Hugging Face export exists (torchtitan writes no DONE.json); its
# record of the lock that trains it is run/<stage>/FINGERPRINT.json, written by the runtime before it runs, which
# first refuses (R004) an unfinished run started under another lock whose checkpoints the job would resume, unless
# only its steps changed and the LR at its checkpoint's step stays: the check `llmc launch` applies
titan_done() {
  local f="$RUN_DIR/$1/FINGERPRINT.json"
  if [ -f "$RUN_DIR/$1/hf/config.json" ]; then trained_here "$1" "$f" export; return; fi
  keep_tokenizer "$1"
  python -m llmc.runtime.entry titan-start --lock "$LOCK" --assets "$BUILD_DIR" --backend "$BACKEND" --stage "$1" --out "$RUN_DIR/$1" || exit 2
  return 1
}
# PYTHONPATH is split on ':': torchtitan cannot import the job from a build path that holds one
titan_path_ok() {
  case "$BUILD_DIR" in
    *:*) echo "error: the build directory's path ($BUILD_DIR) contains ':', which PYTHONPATH cannot carry; move the build or use BACKEND=native" >&2; return 2 ;;
  esac
}
want_stage() { [ -z "${STAGE:-}" ] || [ "$STAGE" = "$1" ]; }
# A stage's stderr is shown as it runs and appended to <run dir>/<stage>/stderr.log (the file `llmc launch` keeps).
# A stage that does not finish ends the script with one line of llmc's: the stage, its exit status, the cause and
# the log. The cause is llmc's own error line, else the last Python exception line, never the ChildFailedError
# report torchrun (torch.distributed.elastic) prints after its worker's own traceback; nothing is hidden, the whole
# output stays above that line and in the log.
# torchrun exits 1 whenever a worker fails, whatever the worker's status; a stage whose workers on this node all
# left with llmc's preempted status counts as preempted (its status and last line). On several nodes that is how a
# stop shows on the nodes the signal did not reach: the trainers agree on it at a step boundary
# (llmc.runtime.preempt), so every rank saves the same step and exits PREEMPTED. The workers' statuses are the
# "exitcode  : N" lines of torchrun's failure report (torch/distributed/elastic/multiprocessing/errors/__init__.py),
# read from this node's own output (every node appends to the same stderr.log).
PREEMPTED=75  # llmc's trainers' exit status when a signal stopped them after a checkpoint
# torchrun kills its workers this many seconds after passing them a SIGTERM (its default: 30 s), so a preempted
# stage must finish its step and save it within it: the plan's figure, 100 s, is 1.5 x the slowest
# job's step + save (grpo: a step of 1.15 s + a save of 0.0315 s), at least 100 s (`llmc plan`: "preemption")
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"
stage_cause() {  # stage_cause LOG START: the cause line of LOG after its first START bytes: llmc's own error line,
  # else the signal torchrun's failure report names as the root cause ("Signal 9 (SIGKILL) received by PID N": the
  # worker printed nothing), else the last exception line, else the last line that says something (not a banner)
  local text line pat
  text="$(tail -c +"$(($2 + 1))" "$1" 2>/dev/null | grep -v 'torch\.distributed\.elastic' || true)"
  line="$(printf '%s\n' "$text" | grep -E 'error\[[A-Z]+[0-9]*\]' | tail -n 1 || true)"
  [ -n "$line" ] || line="$(printf '%s\n' "$text" | sed -nE 's/^[[:space:]]*traceback[[:space:]]*:[[:space:]]*(Signal [0-9]+ \([A-Z0-9]+\) received by PID [0-9]+).*/\1/p' | tail -n 1)"
  for pat in '^[[:space:]]*[A-Za-z0-9_.]*(Error|Exception|Interrupt)\b.*:' \
             '^[[:space:]]*[A-Za-z0-9_.]*(Error|Exception)\b' '[[:alnum:]]'; do
    [ -z "$line" ] || break
    line="$(printf '%s\n' "$text" | grep -E "$pat" | tail -n 1 || true)"
  done
  if [ -n "$line" ]; then
    line="${line#"${line%%[![:space:]]*}"}"
    echo "${line:0:400}"
    return
  fi
  echo "no error output"
}
stage_end() {  # stage_end STAGE STATUS LOG START [OWN]: the last line of a script whose stage did not finish;
  # the cause comes from OWN (this node's own output) when given, else from LOG after its first START bytes
  if [ "$2" = "${PREEMPTED:-}" ]; then
    echo "stage $1: stopped by a signal after saving its current step (exit $2); run the same command again to resume from it (full log: $3)" >&2
  elif [ -n "${5:-}" ]; then
    echo "error: stage $1 failed (exit $2): $(stage_cause "$5" 0) (fix it and run the same command again; full log: $3)" >&2
  else
    echo "error: stage $1 failed (exit $2): $(stage_cause "$3" "$4") (fix it and run the same command again; full log: $3)" >&2
  fi
}
workers_preempted() {  # workers_preempted OUT: torchrun's failure report in OUT lists only PREEMPTED exits
  local codes
  [ -n "${PREEMPTED:-}" ] || return 1
  codes="$(sed -nE 's/^[[:space:]]*exitcode[[:space:]]*:[[:space:]]*(-?[0-9]+).*/\1/p' "$1" 2>/dev/null | sort -u)"
  [ "$codes" = "$PREEMPTED" ]
}
# run_logged STAGE CMD...: CMD in the foreground (Ctrl-C reaches it), its stderr shown and logged; its status
# This node's own copy of the output is a temporary file; where /proc/self/fd exists (Linux) it is unlinked at once
# and used through descriptor 9 (/dev/fd/9 opens the file anew), so that a killed script leaves nothing behind.
run_logged() {
  local name=$1 log tmp own= rc=0
  shift
  mkdir -p "$RUN_DIR/$name"
  log="$RUN_DIR/$name/stderr.log"
  LOG_START="$(stat -c %s "$log" 2>/dev/null || echo 0)"
  if tmp="$(mktemp "${TMPDIR:-/tmp}/llmc-stage.XXXXXX" 2>/dev/null)"; then
    if [ -d /proc/self/fd ] && exec 9<>"$tmp"; then rm -f "$tmp"; own=/dev/fd/9; else own=$tmp; fi
  fi
  { "$@" 9>&- 2>&1 1>&3 3>&- | (trap '' INT TERM; exec tee -a "$log" ${own:+"$own"} >&2 3>&-); } 3>&1 || rc=$?
  if [ "$rc" != 0 ] && [ -n "$own" ] && workers_preempted "$own"; then rc=$PREEMPTED; fi
  [ "$rc" = 0 ] || stage_end "$name" "$rc" "$log" "$LOG_START" "$own"
  if [ "$own" = /dev/fd/9 ]; then exec 9>&-; elif [ -n "$own" ]; then rm -f "$own"; fi
  return "$rc"
}

TORCHRUN=(torchrun --standalone --nproc_per_node "$NPROC")
case "$BACKEND" in
  native)
    python -m llmc.runtime.entry prepare --lock "$LOCK"
    if want_stage pretrain && ! stage_done pretrain; then
      run_logged pretrain "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage pretrain --out "$RUN_DIR"/pretrain
    fi
    if want_stage sft && ! stage_done sft; then
      run_logged sft "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage sft --out "$RUN_DIR"/sft
    fi
    if want_stage dpo && ! stage_done dpo; then
      run_logged dpo "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage dpo --out "$RUN_DIR"/dpo
    fi
    if want_stage grpo && ! stage_done grpo; then
      run_logged grpo "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage grpo --out "$RUN_DIR"/grpo
    fi
    ;;
  torchtitan)
    titan_path_ok || exit 2
    python -m llmc.runtime.entry prepare --lock "$LOCK"
    # a torchtitan job writes DCP checkpoints and no DONE.json: the stage ends with its Hugging Face export
    # (run/<stage>/hf, what the next stage starts from), and is done once that exists
    if want_stage pretrain && ! titan_done pretrain; then
      LLMC_RUN_DIR="$BUILD_DIR" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
      PYTHONPATH="$BUILD_DIR/torchtitan${PYTHONPATH:+:$PYTHONPATH}" \
        run_logged pretrain "${TORCHRUN[@]}" --local-ranks-filter 0 --role rank --tee 3 \
        -m torchtitan.train --module llmc_job --config job "$@"
      python -m llmc.runtime.hf_io "$BUILD_DIR" --stage pretrain -o "$RUN_DIR"/pretrain/hf
    fi
    if want_stage sft && ! stage_done sft; then
      run_logged sft "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage sft --out "$RUN_DIR"/sft
    fi
    if want_stage dpo && ! stage_done dpo; then
      run_logged dpo "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage dpo --out "$RUN_DIR"/dpo
    fi
    if want_stage grpo && ! stage_done grpo; then
      run_logged grpo "${TORCHRUN[@]}" -m llmc.runtime.entry --lock "$LOCK" --stage grpo --out "$RUN_DIR"/grpo
    fi
    ;;
  deepspeed)
    # the DeepSpeed launcher (deepspeed/launch.sh; HOSTFILE for several nodes)
    exec bash "$BUILD_DIR/deepspeed/launch.sh"
    ;;
  *) echo "unknown BACKEND=$BACKEND (native, torchtitan, deepspeed)" >&2; exit 2 ;;
esac
