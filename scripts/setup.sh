#!/usr/bin/env bash
# Create .venv and install llmc with every extra (torch 2.14.1, torchtitan 0.3.0, deepspeed 0.19.8, test tools).
# Idempotent: skips the install when pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.llmc-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # DS_BUILD_OPS=0: DeepSpeed JIT-builds only the ops a run needs (none for llmc's CPU tests but shm_comm).
  DS_BUILD_OPS=0 .venv/bin/pip install --quiet -e '.[all]'
  echo "$want" > "$stamp"
fi
# SkyPilot's own task parser checks the emitted skypilot/task.yaml in tests (tests/test_cluster_manifests.py).
# It gets its own environment: skypilot 0.14.1 needs click < 8.2, while wandb 0.31 and huggingface_hub 1.33
# (in .venv) need click >= 8.2 / 8.4.2.
if [ ! -f .venv-sky/.installed ]; then
  "$PY" -m venv .venv-sky
  .venv-sky/bin/pip install --quiet "skypilot==0.14.1" pyyaml
  touch .venv-sky/.installed
fi
# vLLM's own parsers check the emitted serving/vllm*.yaml and the Hugging Face exports in tests
# (tests/test_vllm_parsers.py). vllm 0.33.0 pins torch 2.14.0 and transformers < 5.21 (.venv has torch 2.14.1,
# transformers 5.24), so it gets its own environment (about 9.4 GB, 3 minutes from a package mirror).
# LLMC_SKIP_VLLM=1 leaves it out; those tests then skip.
if [ "${LLMC_SKIP_VLLM:-0}" != 1 ] && [ ! -f .venv-vllm/.installed ]; then
  "$PY" -m venv .venv-vllm
  .venv-vllm/bin/pip install --quiet "vllm==0.33.0" "torch==2.14.0" "transformers==5.20.2"
  touch .venv-vllm/.installed
fi
