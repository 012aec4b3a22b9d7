#!/usr/bin/env bash
# llmc 0.1.0: generated file, do not edit: change the spec and run `llmc build` again
# targets: deepspeed 0.19.8, sglang 0.5, torch 2.14.1, torchtitan 0.3.0, vllm 0.33.0
# spec sha256: 4f99515cbc9eab5fbb7310281091050068372f1dff795dd68ff597a56547c295
#
# torchrun across 1 node(s) x 1 GPUs; run this on EVERY node.
#   NNODES=1 MASTER_ADDR=<first host> bash launch/torchrun_multi_node.sh
# Rendezvous: c10d on MASTER_ADDR (the first node hosts its store) assigns the node ranks, so no NODE_RANK is
# needed. Each stage has its own: id "$RUN_ID-<stage>", port MASTER_PORT (default 29500) + the stage's position,
# and the start-up check of LLMC_RUN_DIR (below) its own after them, so the first node must accept connections on
# each of these ports:
#   pretrain: MASTER_PORT + 0
#   the check that LLMC_RUN_DIR is shared: MASTER_PORT + 1
# A node waits RDZV_JOIN_TIMEOUT s (default 1800; torchrun's own is 600) in each rendezvous for the others to join
# (torchrun's --rdzv-conf join_timeout, passed as PET_RDZV_CONF, which torchrun reads as that option, so that a
# --rdzv-conf of a torchrun wrapper still wins): pods pulling a large image can start many minutes apart.
# A node goes on to the next stage as soon as its own torchrun returns, maybe while the first node's torchrun (the
# store of the finished stage) is still shutting down: on the same port and id it would join that rendezvous, which
# torchrun closes when it ends (RendezvousClosedError: the stage fails on that node, the others wait for it). On its
# own port it reaches only the next stage's store, a c10d client retrying its connection until that is up
# (torch/distributed/elastic/rendezvous/c10d_rendezvous_backend.py; torch/distributed/launcher/api.py launch_agent).
# BACKEND=native|torchtitan|deepspeed as in torchrun_single_node.sh (default native).
# Storage: everything the run writes goes under LLMC_RUN_DIR (default: this build directory, which is then only
# read): prepare's assets/ and data/, the stages' run/<stage> (RUN_DIR, default $LLMC_RUN_DIR/run: checkpoints,
# metrics, logs, exports), torchtitan's outputs/ (its checkpoints), the claims. Every node reads and writes the
# same files there, so with NNODES > 1 LLMC_RUN_DIR (and RUN_DIR) must be one storage every node mounts (NFS,
# Lustre, a ReadWriteMany volume); each node may hold its own copy of the build. Before prepare, the nodes check
# that it is (`python -m llmc.runtime.entry shared-check`, one process per node: gloo, no GPU) and stop with one
# line if not. A node whose prepare fails records it (<run dir>/prepare.claim.failed) and the nodes that waited for
# it stop with that line, which names its output (<run dir>/prepare[.<node>].log).
# Logs: with NNODES > 1 each node appends its stage output to its own <run dir>/<stage>/stderr.<node>.log (several
# hosts appending to one file of a shared filesystem can lose lines), <node> being the host's short name
# (hostname -s); nodes that share a host name (containers) must each set their own LOG_NODE, e.g. LOG_NODE=n0 on
# one and LOG_NODE=n1 on the other. With NNODES=1 it is <run dir>/<stage>/stderr.log, as the single-node scripts'.
# Env: NNODES, MASTER_ADDR, MASTER_PORT, NPROC, LLMC_RUN_DIR, RUN_DIR, RUN_ID, STAGE, BACKEND, CLAIM_STALE_S,
# LOG_NODE, RDZV_JOIN_TIMEOUT.
set -euo pipefail
BUILD_DIR="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." >/dev/null && pwd)"
LLMC_RUN_DIR="${LLMC_RUN_DIR:-$BUILD_DIR}"
mkdir -p -- "$LLMC_RUN_DIR" && LLMC_RUN_DIR="$(CDPATH= cd -- "$LLMC_RUN_DIR" >/dev/null && pwd)" || {
  echo "error: LLMC_RUN_DIR=$LLMC_RUN_DIR: cannot create or enter it; give a folder this node can write" >&2
  exit 2
}
export LLMC_RUN_DIR
RUN_DIR="${RUN_DIR:-$LLMC_RUN_DIR/run}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
MASTER_PORT="${MASTER_PORT:-29500}"
case "$MASTER_PORT" in
  ''|*[!0-9]*) echo "error: MASTER_PORT=$MASTER_PORT is not a port number" >&2; exit 2 ;;
esac
if [ "$((MASTER_PORT + 1))" -gt 65535 ]; then  # (one port per stage and the check's: the header)
  echo "error: MASTER_PORT=$MASTER_PORT leaves no port for the last of the 1 stages' rendezvous and the LLMC_RUN_DIR check after them (MASTER_PORT + 1, at most 65535); use a lower one" >&2
  exit 2
fi
RDZV_JOIN_TIMEOUT="${RDZV_JOIN_TIMEOUT:-1800}"
case "$RDZV_JOIN_TIMEOUT" in
  ''|*[!0-9]*|0) echo "error: RDZV_JOIN_TIMEOUT=$RDZV_JOIN_TIMEOUT is not a number of seconds (> 0)" >&2; exit 2 ;;
esac
# (a join_timeout already in PET_RDZV_CONF comes later, and wins)
export PET_RDZV_CONF="join_timeout=$RDZV_JOIN_TIMEOUT${PET_RDZV_CONF:+,$PET_RDZV_CONF}"
NPROC="${NPROC:-1}"
RUN_ID="${RUN_ID:-}"
[ -n "$RUN_ID" ] || RUN_ID=tiny-cpu
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
lock_fingerprint() { awk -v s="$1" '$1 == s { print $2; exit }' "$LLMC_RUN_DIR/assets/stage-fingerprints.txt" 2>/dev/null || true; }
# rerun_hint STAGE: how to train STAGE and the stages after it again, as a command that does so when run as printed:
# `llmc launch` when this script writes the build's own run/ and assets/ (the only ones it trains in), else this
# script run again after moving them aside
rerun_hint() {
  if [ "$RUN_DIR" -ef "$BUILD_DIR/run" ] && [ "$LLMC_RUN_DIR" -ef "$BUILD_DIR" ]; then
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
    echo "$RUN_DIR/$1: warning[R005] stage $1: no fingerprints of this lock ($LLMC_RUN_DIR/assets/stage-fingerprints.txt, written by prepare): counted as finished, unchecked" >&2
    return 0
  fi
  # the runtime's check, also when the fingerprints match (the data, the tokenizer or the init_hf weights may have
  # changed since): it names what changed (exit 3 after its error line)
  python -m llmc.runtime.entry check --lock "$LOCK" --assets "$LLMC_RUN_DIR" --backend "$BACKEND" --stage "$1" --out "$RUN_DIR/$1" ${3:+--export} || rc=$?
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
# a stage a torchtitan job trains is done once its Hugging Face export exists (torchtitan writes no DONE.json); its
# record of the lock that trains it is run/<stage>/FINGERPRINT.json, written by the runtime before it runs, which
# first refuses (R004) an unfinished run started under another lock whose checkpoints the job would resume, unless
# only its steps changed and the LR at its checkpoint's step stays: the check `llmc launch` applies
titan_done() {
  local f="$RUN_DIR/$1/FINGERPRINT.json"
  if [ -f "$RUN_DIR/$1/hf/config.json" ]; then trained_here "$1" "$f" export; return; fi
  keep_tokenizer "$1"
  python -m llmc.runtime.entry titan-start --lock "$LOCK" --assets "$LLMC_RUN_DIR" --backend "$BACKEND" --stage "$1" --out "$RUN_DIR/$1" || exit 2
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
# read from this node's own output of this attempt (its log keeps the earlier attempts' output too).
# On several nodes (NNODES > 1) each node appends to its own log, <run dir>/<stage>/stderr.<node>.log: appending to
# one file from several hosts of a shared filesystem can lose lines (open(2), O_APPEND: "may lead to corrupted
# files on NFS filesystems if more than one process appends data to a file at once"). <node> is LOG_NODE, else the
# host's short name (hostname -s, else bash's HOSTNAME up to its first '.'), every character but A-Z a-z 0-9 . _ -
# made '_'; a node with neither is node-<this shell's pid>. The failure line names this node's log.
STAGE_LOG=stderr.log
case "$NNODES" in
  1|1:1) ;;
  *)
    LOG_NODE="${LOG_NODE:-$(hostname -s 2>/dev/null || true)}"
    [ -n "$LOG_NODE" ] || { LOG_NODE="${HOSTNAME:-}"; LOG_NODE="${LOG_NODE%%.*}"; }
    LOG_NODE="${LOG_NODE//[!A-Za-z0-9._-]/_}"
    STAGE_LOG="stderr.${LOG_NODE:-node-$$}.log"
    ;;
esac
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
  log="$RUN_DIR/$name/$STAGE_LOG"
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
# Work done by one node for all (prepare, a torchtitan stage's export, an eval): every node runs this script on
# the same shared run dir, so the first node to create a claim directory (mkdir is atomic, NFS included) does
# the work and the others wait for it. A claim is left behind when its node dies or is killed (node loss, time
# limit, scancel), and a relaunch must not wait for it forever: the holder writes its host and PID into
# <claim>/owner and touches that file every CLAIM_BEAT_S s while this script runs; a waiting node that sees the
# owner file unchanged for CLAIM_STALE_S s (default 300: a node's clock or a cached NFS mtime is never compared,
# only watched for change) takes the claim over. One node wins the takeover of a given stale claim: it must
# create <claim>.takeover.<mtime> first (mkdir again); it then rewrites the owner, which the others see change.
# A holder whose work failed records it in <claim>.failed before releasing the claim (claim_fail: one line naming its
# host, exit status and where its output is); a node that waited finds that record (claim_failed) and stops with it
# instead of going on as if the work were done. Taking a claim clears an earlier attempt's record.
CLAIM_BEAT_S="${CLAIM_BEAT_S:-10}"
CLAIM_STALE_S="${CLAIM_STALE_S:-300}"
CLAIM_POLL_S="${CLAIM_POLL_S:-5}"
CLAIM_BEAT_PID=
claim_hold() {
  echo "$(hostname) $$" > "$1/owner"
  ( while kill -0 $$ 2>/dev/null && [ -d "$1" ]; do touch -c "$1/owner"; sleep "$CLAIM_BEAT_S"; done ) </dev/null >/dev/null 2>&1 &
  CLAIM_BEAT_PID=$!
}
claim_release() {
  kill "$CLAIM_BEAT_PID" 2>/dev/null || true
  rm -rf "$1" "$1".takeover.*
}
# claim_wait CLAIM: 0 when this node holds CLAIM (do the work, then claim_release CLAIM); 1 once the node that
# held it released it (check its result)
claim_wait() {
  local c=$1 last= m idle=0
  if mkdir "$c" 2>/dev/null; then rm -f "$c.failed"; claim_hold "$c"; return 0; fi
  echo "$c: held by $(cat "$c/owner" 2>/dev/null || echo 'another node'); waiting for it"
  while m="$(stat -c %Y "$c/owner" 2>/dev/null || stat -c %Y "$c" 2>/dev/null)"; do
    if [ "$m" != "$last" ]; then
      last=$m idle=0
    elif [ "$idle" -ge "$CLAIM_STALE_S" ] && mkdir "$c.takeover.$m" 2>/dev/null; then
      echo "$c: no sign of life from its holder for ${CLAIM_STALE_S} s (its node stopped); taking it over" >&2
      rm -f "$c.failed"
      claim_hold "$c"
      return 0
    fi
    sleep "$CLAIM_POLL_S"
    idle=$((idle + CLAIM_POLL_S))
  done
  return 1
}
# claim_fail CLAIM LINE: record (atomically: a temporary file renamed) that the work under CLAIM failed; call it
# before claim_release CLAIM
claim_fail() {
  local t="$1.failed.tmp.${HOSTNAME:-host}.$$"
  printf '%s\n' "$2" > "$t" && mv -f "$t" "$1.failed"
}
# claim_failed CLAIM: after claim_wait CLAIM returned 1, succeeds (printing the holder's line) when its work failed
claim_failed() { [ -f "$1.failed" ] && cat "$1.failed"; }
# shared_check PORT ID: with NNODES > 1, every node runs `llmc.runtime.entry shared-check` under torchrun (one process
# per node, rendezvous ID-llmc-shared-check on MASTER_ADDR:PORT) to see that LLMC_RUN_DIR is one storage; on failure
# its one line (the file it names, <run dir>/shared-check[.<node>].log, keeps torchrun's output when the check itself
# could not finish). torchrun as `python -m torch.distributed.run` (what the torchrun command runs): the python that
# runs prepare.
shared_check() {
  case "$NNODES" in 1|1:1) return 0 ;; esac
  local out rc=0 line log
  echo "checking that LLMC_RUN_DIR=$LLMC_RUN_DIR is one storage on the $NNODES nodes (waiting for them all)"
  out="$(python -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node 1 --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$1" --rdzv_id "$2-llmc-shared-check" \
    -m llmc.runtime.entry shared-check --dir "$LLMC_RUN_DIR" 2>&1)" || rc=$?
  [ "$rc" != 0 ] || return 0
  line="$(printf '%s\n' "$out" | grep -m1 '^error: LLMC_RUN_DIR=' || true)"
  if [ -n "$line" ]; then
    echo "$line" >&2
  else
    log="$RUN_DIR/shared-check.${STAGE_LOG#stderr.}"
    mkdir -p "$RUN_DIR" && printf '%s\n' "$out" > "$log" || log="(not saved)"
    echo "error: the check that LLMC_RUN_DIR=$LLMC_RUN_DIR is shared by the nodes did not finish (torchrun exit $rc); its output: $log" >&2
  fi
  exit 1
}
# prepare_claimed LOCK [HOOK]: one node at a time runs prepare (llmc.runtime.entry prepare writes assets/ and data/
# under LLMC_RUN_DIR; HOOK first, on that node), its output also in PREPARE_LOG; a node that waited does not run it
# again (it skips unchanged inputs anyway) and returns 1 when it failed on the node that ran it, whose claim records
# it, naming that node's output
PREPARE_LOG="$RUN_DIR/prepare.${STAGE_LOG#stderr.}"  # this node's prepare output: prepare.log, prepare.<node>.log
prepare_claimed() {
  local c="$RUN_DIR/prepare.claim" rc=0 line
  mkdir -p "$RUN_DIR"
  if claim_wait "$c"; then
    [ -z "${2:-}" ] || "$2"
    python -m llmc.runtime.entry prepare --lock "$1" --assets "$LLMC_RUN_DIR" 2>&1 | tee -a "$PREPARE_LOG" || rc=$?
    if [ "$rc" != 0 ]; then
      claim_fail "$c" "error: prepare failed on $(hostname) (exit $rc); its output: $PREPARE_LOG"
      echo "error: prepare failed (exit $rc); its output: $PREPARE_LOG" >&2
    fi
    claim_release "$c"
    return $rc
  fi
  if line="$(claim_failed "$c")"; then
    echo "$line (this node waited for it, and stops)" >&2
    return 1
  fi
}
# prepare: after the storage check, one node prepares, the others wait for it; the stages' rendezvous waits for every
# node
prepare_once() {
  shared_check "$((MASTER_PORT + 1))" "$RUN_ID"
  prepare_claimed "$LOCK" keep_lock
}
# the Hugging Face export of a torchtitan stage (llmc.runtime.hf_io) reads the run's outputs beside the lock it is
# given: with LLMC_RUN_DIR outside the build directory, the node that prepares keeps a copy of the lock there
# (LLMC_RUN_DIR/plan.lock.json, the lock this run was prepared with)
keep_lock() {
  [ ! "$LLMC_RUN_DIR" -ef "$BUILD_DIR" ] || return 0
  cp "$LOCK" "$LLMC_RUN_DIR/plan.lock.json.tmp.${HOSTNAME:-host}.$$"
  mv -f "$LLMC_RUN_DIR/plan.lock.json.tmp.${HOSTNAME:-host}.$$" "$LLMC_RUN_DIR/plan.lock.json"
}
# the eval of a stage: one node runs it, the others wait for eval/summary.json (so the next stage's rendezvous
# does not start without them, and a relaunch never skips an eval a stopped node left unfinished)
run_evals_once() {
  local c="$RUN_DIR/$1/eval.claim" rc=0
  mkdir -p "$RUN_DIR/$1"
  if claim_wait "$c"; then
    run_evals "$1" || rc=$?
    claim_release "$c"
    return $rc
  fi
  eval_done "$1" || { echo "stage $1: its eval on another node stopped without finishing" >&2; return 1; }
}
# a stage a torchtitan job trained: one node exports it (run/<stage>/hf), the others wait for the export (the
# next stage starts from it); done is checked again under the claim (another node may have just finished)
export_once() {
  local c="$RUN_DIR/$1/hf.claim" rc=0
  titan_done "$1" && return 0
  mkdir -p "$RUN_DIR/$1"
  if claim_wait "$c"; then
    titan_done "$1" || python -m llmc.runtime.hf_io "$LLMC_RUN_DIR" --stage "$1" -o "$RUN_DIR/$1/hf" || rc=$?
    claim_release "$c"
    return $rc
  fi
  titan_done "$1" || { echo "stage $1: its export on another node stopped without finishing" >&2; return 1; }
}

TORCHRUN=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d)
# rdzv INDEX STAGE: RDZV, the options of the rendezvous of STAGE at position INDEX (the header)
rdzv() { RDZV=(--rdzv_endpoint "$MASTER_ADDR:$((MASTER_PORT + $1))" --rdzv_id "$RUN_ID-$2"); }
case "$BACKEND" in
  native)
    prepare_once
    if want_stage pretrain && ! stage_done pretrain; then
      rdzv 0 pretrain
      run_logged pretrain "${TORCHRUN[@]}" "${RDZV[@]}" -m llmc.runtime.entry --lock "$LOCK" --assets "$LLMC_RUN_DIR" --stage pretrain --out "$RUN_DIR"/pretrain
    fi
    if want_stage pretrain; then run_evals_once pretrain; fi
    ;;
  torchtitan)
    titan_path_ok || exit 2
    prepare_once
    # a torchtitan job writes DCP checkpoints and no DONE.json: the stage ends with its Hugging Face export
    # (run/<stage>/hf, what the next stage starts from; one node writes it, the others wait for it)
    if want_stage pretrain && ! titan_done pretrain; then
      rdzv 0 pretrain
      LLMC_RUN_DIR="$LLMC_RUN_DIR" LLMC_STAGE_DIR="$RUN_DIR"/pretrain \
      HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled \
      PYTHONPATH="$BUILD_DIR/torchtitan${PYTHONPATH:+:$PYTHONPATH}" \
        run_logged pretrain "${TORCHRUN[@]}" "${RDZV[@]}" --local-ranks-filter 0 --role rank --tee 3 \
        -m torchtitan.train --module llmc_job --config job "$@"
      export_once pretrain
    fi
    if want_stage pretrain; then run_evals_once pretrain; fi
    ;;
  deepspeed)
    # every node runs this script: llmc's DeepSpeed trainer under torchrun, as the other backends (deepspeed reads
    # torchrun's RANK / WORLD_SIZE / LOCAL_RANK); deepspeed/launch.sh is the single-launcher alternative (HOSTFILE)
    prepare_once
    if want_stage pretrain && ! stage_done pretrain; then
      rdzv 0 pretrain
      run_logged pretrain "${TORCHRUN[@]}" "${RDZV[@]}" -m llmc.runtime.ds_train --lock "$LOCK" --assets "$LLMC_RUN_DIR" --ds-config "$BUILD_DIR/deepspeed/ds_config.json" --stage pretrain --out "$RUN_DIR"/pretrain
    fi
    if want_stage pretrain; then run_evals_once pretrain; fi
    ;;
  *) echo "unknown BACKEND=$BACKEND" >&2; exit 2 ;;
esac
