#!/usr/bin/env bash
# Everything a GPU session should re-run after a kernel change, in one device call (~9 minutes
# on an H100, cold). Writes logs and result files under $OUT; copy them into perf/results/.
#   bash perf/gpu_session.sh            (set OUT to a folder; default /tmp/mustafar_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mustafar_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "== GPU tests (hypothesis property tests excluded: they compile too many shapes)"
MUSTAFAR_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests -k "not property" \
    > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
echo "== memcheck on the decode and compress paths that index by lengths"
MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck \
    python3 -m pytest -q -p no:cacheprovider tests/test_decode.py tests/test_compress.py \
    -k "ragged or windows or window_only or garbage or malformed or beyond or empty or nan" \
    > "$OUT/sanitizer.log" 2>&1; tail -3 "$OUT/sanitizer.log"
echo "== tuning (writes autotune_cache/; copy it back)"
timeout 150 python3 -m mustafar_triton.tune --quick --report "$OUT/tune.json" > "$OUT/tune.log" 2>&1
cp autotune_cache/*.json "$OUT/"; tail -2 "$OUT/tune.log"
echo "== sweep"
timeout 100 python3 perf/sweep.py --quick --max-seconds 80 --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
tail -12 "$OUT/sweep.log"
