#!/usr/bin/env bash
# Create .venv and install llmc with every extra (torch 2.14.1, torchtitan 0.3.0, deepspeed 0.19.8, test tools).
# Idempotent: skips the install when pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Free space, in GiB, on the disk that holds the repository.
free_gib() { df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }'; }
# side_env DIR GIB PACKAGE...: a side environment that only some tests need. DIR/.installed marks it complete (the
# tests that use it look for that file and skip without it). Left out, with a warning, where the disk has under GIB GiB
# free or pip fails (a full disk, a registry that is down): the rest of the suite still runs.
side_env() {
  local dir=$1 need=$2; shift 2
  [ -f "$dir/.installed" ] && return 0
  rm -rf "$dir"  # an install cut short
  local free; free=$(free_gib)
  if [ "$free" -lt "$need" ]; then
    echo "setup.sh: warning: $dir left out: $free GiB free on this disk, it needs about $need GiB;" \
         "the tests that use it skip" >&2
    return 0
  fi
  if "$PY" -m venv "$dir" && "$dir/bin/pip" install --quiet "$@"; then
    touch "$dir/.installed"
  else
    rm -rf "$dir"
    echo "setup.sh: warning: $dir left out: pip could not install $* ($(free_gib) GiB free now);" \
         "the tests that use it skip" >&2
  fi
}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.llmc-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # DS_BUILD_OPS=0: DeepSpeed JIT-builds only the ops a run needs (none for llmc's CPU tests but shm_comm).
  DS_BUILD_OPS=0 .venv/bin/pip install --quiet -e '.[all]' || {
    echo "setup.sh: pip could not install llmc into .venv ($(free_gib) GiB free on this disk; it needs about 7 GiB)" >&2
    exit 1; }
  echo "$want" > "$stamp"
fi
# SkyPilot's own task parser checks the emitted skypilot/task.yaml in tests (tests/test_cluster_manifests.py).
# It gets its own environment: skypilot 0.14.1 needs click < 8.2, while wandb 0.31 and huggingface_hub 1.33
# (in .venv) need click >= 8.2 / 8.4.2.
side_env .venv-sky 2 "skypilot==0.14.1" pyyaml
# vLLM's own parsers check the emitted serving/vllm*.yaml and the Hugging Face exports in tests
# (tests/test_vllm_parsers.py). vllm 0.33.0 pins torch 2.14.0 and transformers < 5.21 (.venv has torch 2.14.1,
# transformers 5.24), so it gets its own environment (about 9.4 GB, 3 minutes from a package mirror; pip's download
# needs room beside it). LLMC_SKIP_VLLM=1 leaves it out; those tests then skip.
if [ "${LLMC_SKIP_VLLM:-0}" != 1 ]; then
  side_env .venv-vllm 14 "vllm==0.33.0" "torch==2.14.0" "transformers==5.20.2"
fi
