#!/usr/bin/env bash
# Creates .venv-newest: the CPU torch 2.13.0, the newest triton on the registry
# (.ci/newest-triton-constraints.txt), the newest numpy, and the test tools: what the second CI
# leg runs the kernel tests with. torch first, alone, as in .ci/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-newest
.venv-newest/bin/python -m pip install -q --upgrade pip
.venv-newest/bin/python -m pip install -q "torch==2.13.0"
.venv-newest/bin/python -m pip install -q -c .ci/newest-triton-constraints.txt -e ".[test]"
.venv-newest/bin/python -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
