#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: 4f99515cbc9eab5fbb7310281091050068372f1dff795dd68ff597a56547c295
#
# DeepSpeed 0.19.8 (data parallel + ZeRO-0), config in deepspeed/ds_config.json; a stage whose
# batch / lr / steps differ runs deepspeed/ds_config.<stage>.json (llmc.runtime.ds_train picks it for --stage).
#   bash deepspeed/launch.sh                       # one node, NPROC=1 processes
#   HOSTFILE=hostfile LLMC_RUN_DIR=<shared dir> bash deepspeed/launch.sh   # 1 node(s), from the first host
# HOSTFILE: MPI-style ("host slots=N"), one line per host. On a machine without a GPU set DS_ACCELERATOR=cpu (gloo).
# Env: NPROC, HOSTFILE, MASTER_ADDR, MASTER_PORT, LLMC_RUN_DIR, RUN_DIR, STAGE.
# Storage: everything the run writes goes under LLMC_RUN_DIR (default: this build directory; another folder leaves the
# build directory only read): prepare's assets/ and data/ (prepare runs on this node), the stages' run/<stage>
# (RUN_DIR, default $LLMC_RUN_DIR/run: checkpoints, which ZeRO writes from every rank, metrics, logs,
# exports). With a HOSTFILE of more than one host every host's ranks read and write the same files there, so
# LLMC_RUN_DIR (and RUN_DIR) must be one storage every host mounts at the same path (NFS, Lustre; the build may be each
# host's own copy); before prepare, the DeepSpeed launcher runs `python -m llmc.runtime.entry shared-check` on each
# host (one process per host: gloo, no GPU), and a folder the hosts do not share stops this script with one line.
set -euo pipefail
BUILD_DIR="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." >/dev/null && pwd)"
LLMC_RUN_DIR="${LLMC_RUN_DIR:-$BUILD_DIR}"
mkdir -p -- "$LLMC_RUN_DIR" && LLMC_RUN_DIR="$(CDPATH= cd -- "$LLMC_RUN_DIR" >/dev/null && pwd)" || {
  echo "error: LLMC_RUN_DIR=$LLMC_RUN_DIR: cannot create or enter it; give a folder this node can write" >&2
  exit 2
}
export LLMC_RUN_DIR
RUN_DIR="${RUN_DIR:-$LLMC_RUN_DIR/run}"
NNODES=1  # the hosts the stages run on (with a HOSTFILE: below)
NPROC="${NPROC:-1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LOCK="$BUILD_DIR/plan.lock.json"
DS_CONFIG="$BUILD_DIR/deepspeed/ds_config.json"
# Stages run in order; a stage with <run dir>/<stage>/DONE.json is skipped (resume at the first
# unfinished one) when it is this build's result: DONE.json records the fingerprint of what decided the stage's result
# (llmc.runtime.job.stage_fingerprint) and what its data files and tokenizer held, prepare writes this lock's
# fingerprints to assets/stage-fingerprints.txt, and the runtime's check (`python -m llmc.runtime.entry check`, the
# one `llmc launch` applies) compares them; a stage finished under another lock (the build directory rebuilt from
# another spec), from other data or with another tokenizer stops the script, neither skipped nor trained over.
# STAGE=<name> runs only that stage.
trained_by() { sed -n 's/^ *"fingerprint_sha256": *"\([0-9a-f]*\)".*/\1/p' "$1" 2>/dev/null || true; }
lock_fingerprint() { awk -v s="$1" '$1 == s { print $2; exit }' "$LLMC_RUN_DIR/assets/stage-fingerprints.txt" 2>/dev/null || true; }
# rerun_hint STAGE: how to train STAGE and the stages after it again, as a command that does so when run as printed:
# `llmc launch` when this script writes the build's own run/ and assets/ (the only ones it trains in), else this
# script run again after moving them aside
rerun_hint() {
  if [ "$RUN_DIR" -ef "$BUILD_DIR/run" ] && [ "$LLMC_RUN_DIR" -ef "$BUILD_DIR" ]; then
    echo "\`llmc launch $(printf '%q' "$BUILD_DIR") --backend deepspeed --no-resume --from $1\` sets it and the stages after it aside and trains them again"
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
    echo "$RUN_DIR/$1: warning[R005] stage $1: no fingerprints of this lock ($LLMC_RUN_DIR/assets/stage-fingerprints.txt, written by prepare): counted as finished, unchecked" >&2
    return 0
  fi
  # the runtime's check, also when the fingerprints match (the data, the tokenizer or the init_hf weights may have
  # changed since): it names what changed (exit 3 after its error line)
  python -m llmc.runtime.entry check --lock "$LOCK" --assets "$LLMC_RUN_DIR" --backend "deepspeed" --stage "$1" --out "$RUN_DIR/$1" ${3:+--export} || rc=$?
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
  [ -f "$LLMC_RUN_DIR/assets/tokenizer.json" ] && [ ! -e "$d" ] || return 0
  mkdir -p "$RUN_DIR/$1" && mkdir "$d" 2>/dev/null || return 0
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    if [ -f "$LLMC_RUN_DIR/assets/$f" ]; then cp "$LLMC_RUN_DIR/assets/$f" "$d/$f"; fi
  done
}
stage_done() {
  if [ -f "$RUN_DIR/$1/DONE.json" ]; then trained_here "$1" "$RUN_DIR/$1/DONE.json"; return; fi
  keep_tokenizer "$1"
  return 1
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
# job's step + save (pre-training: a step of 0.347 s + a save of 0.0315 s), at least 100 s (`llmc plan`: "preemption")
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
# eval.tasks (lm-evaluation-harness) on run/<stage>/hf after the stages listed in the lock: the eval step itself
# skips a stage whose eval/summary.json records this lock's eval settings and weights, and scores it again (the old
# results set aside) when they changed.
eval_done() { [ -f "$RUN_DIR/$1/eval/summary.json" ]; }
run_evals() { python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }
srun_evals() { srun --ntasks=1 --nodes=1 python -m llmc.runtime.evaluate --lock "$LOCK" --stage "$1" --out "$RUN_DIR/$1"; }

# On this node torchrun starts the ranks of every stage (DS, then the module: llmc's DeepSpeed runner; NATIVE: a stage
# the DeepSpeed runner does not train, llmc.runtime.entry): after a SIGTERM it lets them save for
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT s (the plan's figure, exported above), where the DeepSpeed launcher's launch.py kills them
# 30 s later whatever they are doing (terminate_process_tree: psutil.wait_procs(children, timeout=30), then SIGKILL;
# deepspeed/launcher/launch.py, 0.19.8). With a HOSTFILE the DeepSpeed launcher starts the ranks on every host and
# sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun does
# (https://github.com/deepspeedai/DeepSpeed/blob/master/deepspeed/launcher/launch.py), with that 30 s limit;
# --no_local_rank: the entry point takes no --local_rank argument
DS=(torchrun --standalone --nproc_per_node "$NPROC" -m)
NATIVE=("${DS[@]}")
if [ -n "${HOSTFILE:-}" ]; then
  # --master_addr: the first host of the hostfile (DeepSpeed would otherwise take the first address `hostname -I`
  # prints there, which may be one the other nodes cannot reach); MASTER_ADDR overrides it
  MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ { print $1; exit }' "$HOSTFILE")}"
  # the remote ranks (started over pdsh/ssh) get only a few variables of this environment (NCCL*, PYTHON*, ...)
  # plus the KEY=VALUE lines of DeepSpeed's environment file (https://www.deepspeed.ai/getting-started/
  # #multi-node-environment-variables). deepspeed/launcher/runner.py (0.19.8) reads the file named DS_ENV_FILE,
  # else .deepspeed_env, in ~ and then in the current directory (os.path.join(path, name) for path in ["~", "."]:
  # an absolute DS_ENV_FILE is that one file), a later line winning. llmc's runs read more variables than those
  # (HF_*, WANDB_*, LLMC_*, GLOO_*: gloo's interface in the storage check and CPU runs, ...), so DeepSpeed is pointed
  # at a file of this script's: the lines of the file(s) DeepSpeed would have read (the site's FI_PROVIDER,
  # LD_LIBRARY_PATH, NCCL settings), then llmc's. It holds tokens (HF_TOKEN, WANDB_API_KEY): created readable by its
  # owner only (0600) and removed when this script exits.
  mkdir -p "$RUN_DIR"
  DS_ENV_OUT="$(umask 077 && mktemp "$RUN_DIR/deepspeed_env.XXXXXX")"
  trap 'rm -f -- "$DS_ENV_OUT"' EXIT
  DS_ENV_NAME="${DS_ENV_FILE:-.deepspeed_env}"
  case "$DS_ENV_NAME" in
    /*) DS_ENV_USER=("$DS_ENV_NAME") ;;
    *) DS_ENV_USER=(~/"$DS_ENV_NAME" "./$DS_ENV_NAME") ;;
  esac
  for f in "${DS_ENV_USER[@]}"; do
    if [ -f "$f" ]; then awk 1 "$f" >> "$DS_ENV_OUT"; fi  # its lines as they are, each ending in a newline
  done
  export DS_ENV_FILE="$DS_ENV_OUT"
  for v in $(compgen -e); do
    case "$v" in HF_*|WANDB_*|LLMC_*|GLOO_*|DS_ACCELERATOR|OMP_NUM_THREADS|TORCH_*|TRANSFORMERS_*|CUDA_VISIBLE_DEVICES) ;; *) continue ;; esac
    case "${!v}" in
      *[!A-Za-z0-9_@%+=:,./-]*) echo "deepspeed/launch.sh: $v is not passed to the other nodes (a character DeepSpeed would not quote safely)" >&2 ;;
      *) printf '%s=%s\n' "$v" "${!v}" >> "$DS_ENV_FILE" ;;
    esac
  done
  MULTI=(deepspeed --hostfile "$HOSTFILE" --num_nodes 1 --num_gpus "$NPROC" --master_addr "$MASTER_ADDR"
         --master_port "$MASTER_PORT")
  DS=("${MULTI[@]}" --module)
  NATIVE=("${MULTI[@]}" --no_local_rank --module)
  # the hosts the stages run on (--num_nodes 1): the HOSTFILE's, 1 at most
  NNODES="$(awk 'NF && $1 !~ /^#/ { n++ } END { print n + 0 }' "$HOSTFILE")"
  [ "$NNODES" -le 1 ] || NNODES=1
fi
# shared_check PORT: with NNODES > 1, the DeepSpeed launcher starts `llmc.runtime.entry shared-check` on the first
# NNODES hosts of HOSTFILE, one process each (--num_gpus 1: gloo, no GPU; RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
# set by deepspeed/launcher/launch.py as for the stages; --no_local_rank: the check takes no --local_rank), to see
# that LLMC_RUN_DIR is one storage; on failure its one line (pdsh puts "<host>: " before each line a host prints:
# taken off), else the file it names, <run dir>/shared-check.log, keeps the launcher's output.
shared_check() {
  case "$NNODES" in 1|1:1) return 0 ;; esac
  local out rc=0 line log
  echo "checking that LLMC_RUN_DIR=$LLMC_RUN_DIR is one storage on the $NNODES nodes (waiting for them all)"
  out="$(deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus 1 --master_addr "$MASTER_ADDR" \
    --master_port "$1" --no_local_rank --module llmc.runtime.entry shared-check --dir "$LLMC_RUN_DIR" 2>&1)" || rc=$?
  [ "$rc" != 0 ] || return 0
  line="$(printf '%s\n' "$out" | grep -m1 -E '^([^ :]+: )?error: LLMC_RUN_DIR=' || true)"
  [ -z "$line" ] || line="error: LLMC_RUN_DIR=${line#*error: LLMC_RUN_DIR=}"
  if [ -n "$line" ]; then
    echo "$line" >&2
  else
    log="$RUN_DIR/shared-check.log"
    mkdir -p "$RUN_DIR" && printf '%s\n' "$out" > "$log" || log="(not saved)"
    echo "error: the check that LLMC_RUN_DIR=$LLMC_RUN_DIR is shared by the nodes did not finish (deepspeed exit $rc); its output: $log" >&2
  fi
  exit 1
}
# A SIGTERM to this script's process group (a preemption, `timeout`, a service manager's stop) reaches the stage in
# flight, whose trainers save their current step and exit PREEMPTED. This shell outlives it: a non-interactive bash
# runs a trap once the foreground command has exited (bash(1), SIGNALS), so it waits for the stage, ends with the
# stage's status, and starts no stage after it.
STOP=
on_term() { STOP=TERM; }
trap on_term TERM
stop_here() {  # stop_here STAGE: after STAGE, end the script if a SIGTERM came while it ran
  if [ -n "$STOP" ]; then
    echo "stage $1 finished, then SIG$STOP stopped the script (exit ${PREEMPTED:-143}); run the same command again to go on with the next stage" >&2
    exit "${PREEMPTED:-143}"
  fi
}
# A DeepSpeed stage's status after a SIGTERM comes from its ranks: its launcher's own says little about them
# (torchrun exits 1 whatever they returned; the DeepSpeed launcher's runner has no SIGTERM handler on one node and
# dies of it, 143, while the ranks still save, and launch.py, once it has stopped them, exits 1 whatever they
# returned: deepspeed/launcher/runner.py, launch.py sigkill_handler, 0.19.8). So the launcher runs with SIGTERM
# ignored (torchrun and launch.py install their own handlers, pass the signal on to the ranks and wait for them; the
# runner waits for launch.py), and each rank writes its exit status
# to LLMC_EXIT_DIR (llmc.runtime.runlock.report_exit: {"rank": R, "world": W, "exit": N, ...}); a stage whose
# ranks 0..W-1 all reported PREEMPTED is preempted. With a HOSTFILE the other hosts' ranks report nothing here (the
# directory is this node's), so the launcher's status stands.
ranks_preempted() {  # ranks_preempted DIR: one report from each rank 0..W-1 in DIR, every one PREEMPTED
  local f r w c n=0 world=
  [ -n "${PREEMPTED:-}" ] || return 1
  for f in "$1"/rank-*.json; do
    [ -f "$f" ] || return 1
    r="$(sed -nE 's/.*"rank": *([0-9]+)[,}].*/\1/p' "$f")"
    w="$(sed -nE 's/.*"world": *([0-9]+)[,}].*/\1/p' "$f")"
    c="$(sed -nE 's/.*"exit": *(-?[0-9]+)[,}].*/\1/p' "$f")"
    [ -n "$r" ] && [ -n "$w" ] && [ "$c" = "$PREEMPTED" ] && [ "$f" = "$1/rank-$r.json" ] && [ "$r" -lt "$w" ] \
      || return 1
    [ -z "$world" ] || [ "$w" = "$world" ] || return 1
    world=$w
    n=$((n + 1))
  done
  [ -n "$world" ] && [ "$n" = "$world" ]
}
ds_stage() {  # ds_stage ARGS...: "${DS[@]}" ARGS (run_logged runs it in a subshell of its pipeline); its status
  local dir rc=0
  trap '' TERM
  dir="$(mktemp -d "${TMPDIR:-/tmp}/llmc-exit.XXXXXX")" || dir=
  LLMC_EXIT_DIR="$dir" "${DS[@]}" "$@" || rc=$?
  if [ "$rc" != 0 ] && [ -n "$dir" ] && ranks_preempted "$dir"; then rc=$PREEMPTED; fi
  [ -z "$dir" ] || rm -rf "$dir"
  trap on_term TERM
  return "$rc"
}
# before prepare writes there: with a HOSTFILE of more than one host, do they all see LLMC_RUN_DIR? (MASTER_PORT: no
# stage runs yet)
shared_check "$MASTER_PORT"
python -m llmc.runtime.entry prepare --lock "$LOCK" --assets "$LLMC_RUN_DIR"
if want_stage pretrain && ! stage_done pretrain; then
  run_logged pretrain ds_stage llmc.runtime.ds_train --lock "$LOCK" --assets "$LLMC_RUN_DIR" --ds-config "$DS_CONFIG" --stage pretrain --out "$RUN_DIR"/pretrain
  stop_here pretrain
fi
if want_stage pretrain; then run_evals pretrain; fi
