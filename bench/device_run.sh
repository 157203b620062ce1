#!/usr/bin/env bash
# The H200 runs behind BENCHMARKS.md, as one command each, so that a session spends its device
# minutes measuring rather than re-deriving the setup.
#
# Here (a machine with the package registries):
#   bash bench/device_run.sh wheels
#     downloads into .whl/ (ignored; carried with the call) what the GPU image lacks or holds in
#     another version: transformers (5.17 there, 5.23 here), bitsandbytes (naive-nf4 baseline), torchao
#     (torch's tinygemm int4, the kernel table's old fast path),
#     gguf (the embedded model's reader), pytest (the suite's version).
# There (the device tool's `run`, carry [".whl"]):
#   bash bench/device_run.sh MODE [MODE ...]
#     kernels  bench/int4_kernels.py on the 7B and 1.8B shapes: bf16 / tinygemm / ours / ours-fused,
#              the per-kernel floor, prefill 512
#     decode   bench/decode_speed.py, the fast path on the three shapes (the 7B twice: the second is
#              the warm-cache load) and the naive nf4 generate() baseline in the same run (~8 min)
#     naive    bench/decode_speed.py, the naive generate() baselines and the streamed fp16 offload
#     offload  bench/h2d_probe.py (host buffer kinds), then the 7B streamed fp16 offload against accelerate's
#     gemv-tests  the GEMV's GPU tests only
#     switch   dropdown switches between the 7B, 1.8B and Qwen in one app process, the fast path
#     store-profile  where a second 7B load's seconds go (from the int4 store), cProfiled
#     tiles-tests  the GEMV tile chooser's and the fast decoder's GPU tests only
#     profile  ncu counters of the 7B's GEMVs, tuned tile against the sweep's best (bench/int4_profile.py)
#     attention  bench/decode_attention.py: the fused decode attention against the plain form, per layer
#     attention-sweep  its tiles;  gpu-tests  the GPU-marked kernel and fast-decoder tests only
#     warmup   the 7B's cold load with and without the int4 precompile, cProfiled
#     decode-short, decode-three, sweep-7b: the same, shorter (the 7B and 1.8B loads, and Qwen; the 7B's shapes)
#     rotation-ab  the 1.8B and 7B, rotation and cache write inside the decode attention or as kernels of their own
#     half2-stages  the half2 sweep with pipelined (cp.async) HALF2 tiles added, then pick_tiles
#     pdl-tests  the kernels' and fast decoder's GPU tests with programmatic dependent launch at level 2 (~4 min)
#     pdl-ab   the 1.8B at PDL levels 0, 1, 2 and the 7B at 0 and 2 (models/kernels/pdl.py) (~7 min)
#     sweep    bench/int4_gemv_sweep.py over every linear shape of a step (165 tiles; up to 8 minutes)
#     half2    the packed-fp16 GEMV tiles (HALF2) against the app's five on every shape, then the five tiles
#              that minimise a step's GEMV time (bench/pick_tiles.py) (~4 minutes)
#     store-stall  a decode-like host loop beside the int4 store's writer thread (the first-load decode dips)
#     prefill-512  the 7B's prompts in chunks of 1,024 tokens (the default) against 512 (the 4k TTFT's margin)
#     persistent-layer  whole decoder layers (attention, norms, SiLU inside) as one persistent kernel
#     persistent  a layer's four GEMVs as one persistent kernel with grid barriers against separate launches
#     mma      the tensor-core GEMV (int4_mma.py): its GPU tests, then against the app's Triton tiles per shape
#     mma-ab   the 7B and 1.8B decoding with and without its tiles;  mma-profile  ncu of its tiles and Triton's
#     cluster  the cluster decode attention against the Triton one: GPU tests, per layer;  cluster-ab  end to end;
#              cluster-tiles  its block shapes;  fused  the q/k/v GEMV + attention as one kernel (a probe), per layer
#     l2-prefetch  a layer's kernels with the weights ahead asked of the L2 by a second stream (a probe, dropped)
#     argmax-tests  the one-kernel argmax's and the fast decoder's GPU tests;  argmax-ab  end to end, against torch's
#     pdl-chain  a layer's kernels with early launches, Triton's GEMV tiles against the tensor-core GEMV's
#     mma-tests  the GPU tests of the GEMVs, their tiles and epilogues, and the fast decoder
#     tests    the GPU tests (tests/test_gpu.py and the fast-path / kernel tests on CUDA)
#   Results land in $OUT (the device tool brings them back); without $OUT, in out/device/.
# Modes run in the order given; one call of the device tool may take 10 minutes, so pair them
# accordingly (kernels ~1.5 min, tests ~4 min; decode ~8 min; naive ~6 min; a fresh machine ~1 min more).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
  platforms=()
  for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl \
    transformers==5.23.0 bitsandbytes==0.50.2 gguf==0.19.0 torchao==0.18.0
  # pytest goes into a target of its own: the image's pytest plugins stay importable beside it.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
    -d .whl/pytest pytest==9.2.0 pluggy iniconfig
  ls -la .whl .whl/pytest
  exit 0
fi

[[ $# -gt 0 ]] || { sed -n 2,22p "$0"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
OUT="${OUT:-out/device}"
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  [[ -d .whl/pytest ]] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-pytest .whl/pytest/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The image's torch has no .pyc files and its folder is not ours to write: without a writable bytecode
# cache every process compiled torch._dynamo & co. from source again (5.9 s of a profiled second 7B
# load in session 26, bench/results/store_profile_h200_s26*), which a user's installed torch never pays.
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-/tmp/pycache}"
unset PYTHONDONTWRITEBYTECODE  # images often set it; the cache above is the point
# The app's caches (compile artifacts, Triton's tuning) in one place for the whole call: a later
# mode finds what an earlier one built, as a user's second load would.
export SMALLCHAT_CACHE="${SMALLCHAT_CACHE:-/tmp/smallchat-cache}"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

status=0
run_mode() {
  case "$1" in
    kernels)
      python3 bench/int4_kernels.py --shapes 7b 1.8b --prefill 512 --out "$OUT/int4_kernels.jsonl" \
        2>&1 | tee "$OUT/int4_kernels.txt" ;;
    decode)
      python3 bench/decode_speed.py --configs 7b:fast-int4 7b:fast-int4 1.8b:fast-int4 qwen7b:fast-int4 7b:naive-nf4 \
        --out "$OUT/decode_speed.jsonl" --md "$OUT/decode_speed.md" 2>&1 | tail -60 ;;
    naive)
      python3 bench/decode_speed.py --configs 7b:naive-nf4 1.8b:naive-nf4 7b:stream-fp16:32 7b:naive-fp16:16 \
        --out "$OUT/decode_naive.jsonl" --md "$OUT/decode_naive.md" 2>&1 | tail -60 ;;
    offload)  # the streamed fp16 offload: host buffer kinds (bench/h2d_probe.py), then the 7B streamed and via accelerate (~5 min)
      python3 bench/h2d_probe.py --out "$OUT/h2d_probe.json" 2>&1 | tee "$OUT/h2d_probe.txt"
      python3 bench/decode_speed.py --configs 7b:stream-fp16:32 7b:stream-fp16-prehook:32 7b:naive-fp16:16 \
        --out "$OUT/decode_offload.jsonl" --md "$OUT/decode_offload.md" 2>&1 | tail -30 ;;
    offload-profile)  # the streamed 7B only, with the host's share (direct generate(), cProfile) (~2 minutes)
      SMALLCHAT_TRACE_OUT="$OUT/offload_trace.json" python3 bench/decode_speed.py --configs 7b:stream-fp16:32 \
        --out "$OUT/decode_offload.jsonl" --md "$OUT/decode_offload.md" 2>&1 | tail -12
      gzip -f "$OUT/offload_trace.json" 2>/dev/null || true
      python3 -c "import json; [print(json.loads(l).get('host_profile', '')) for l in open('$OUT/decode_offload.jsonl')]" ;;
    decode-1.8b)  # one load of the 1.8B, fast path (~1.5 minutes)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4 \
        --out "$OUT/decode_speed.jsonl" --md "$OUT/decode_speed.md" 2>&1 | tail -40 ;;
    prefill-512)  # the 7B with prompt chunks of 1,024 tokens (the default) against 512, TTFT at 512 and 4,000 (~4 minutes)
      python3 bench/decode_speed.py --configs 7b:fast-int4 7b:fast-int4-prefill-512 \
        --out "$OUT/decode_prefill_512.jsonl" --md "$OUT/decode_prefill_512.md" 2>&1 | tail -40 ;;
    decode-7b)  # one load of the 7B (decode, TTFT at 512 and 4,000 tokens, the reused turn) (~2.5 minutes)
      python3 bench/decode_speed.py --configs 7b:fast-int4 --out "$OUT/decode_7b.jsonl" --md "$OUT/decode_7b.md" \
        2>&1 | tail -20 ;;
    decode-short)  # one load each of the 7B and the 1.8B (~4 minutes)
      python3 bench/decode_speed.py --configs 7b:fast-int4 1.8b:fast-int4 \
        --out "$OUT/decode_speed.jsonl" --md "$OUT/decode_speed.md" 2>&1 | tail -40 ;;
    switch)  # dropdown switches in one app process: 7B, 1.8B, 7B, 1.8B, Qwen, 7B (bench/switch_speed.py) (~4 minutes)
      python3 bench/switch_speed.py --sequence 7b 1.8b 7b 1.8b qwen7b 7b \
        --out "$OUT/switch.jsonl" --md "$OUT/switch.md" 2>&1 | tail -12 ;;
    store-profile)  # two 7B loads, the second from the int4 store, each cProfiled (the file ends up the second's) (~3 minutes)
      python3 bench/decode_speed.py --configs 7b:fast-int4 7b:fast-int4 --profile-load \
        --out "$OUT/store_profile.jsonl" --md "$OUT/store_profile.md" 2>&1 | tail -8 ;;
    tiles-tests)  # the tile chooser's and the fast decoder's GPU tests (~1 minute)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_gemv_tiles.py tests/test_fast_decode.py 2>&1 | tee "$OUT/tiles_tests.txt" | tail -15 ;;
    decode-three)  # one load each of the three shapes, fast path only (~6 minutes)
      python3 bench/decode_speed.py --configs 7b:fast-int4 1.8b:fast-int4 qwen7b:fast-int4 \
        --out "$OUT/decode_speed.jsonl" --md "$OUT/decode_speed.md" 2>&1 | tail -40 ;;
    rotation-ab)  # the 1.8B and 7B with rotation + cache write in the attention kernel, and without (~6 minutes)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4-separate-rotation 1.8b:fast-int4 \
        7b:fast-int4-separate-rotation 7b:fast-int4 \
        --out "$OUT/decode_rotation_ab.jsonl" --md "$OUT/decode_rotation_ab.md" 2>&1 | tail -40 ;;
    norms-ab)  # the 1.8B and 7B with the RMSNorms folded into the GEMVs (models/folded_norms.py), and without (~6 minutes)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4-separate-norms 1.8b:fast-int4 \
        7b:fast-int4-separate-norms 7b:fast-int4 \
        --out "$OUT/decode_norms_ab.jsonl" --md "$OUT/decode_norms_ab.md" 2>&1 | tail -40 ;;
    pdl-tests)  # tests/test_pdl.py whole (its compiled-code checks under this image's Triton too), then every GPU
                # test of the kernels and the fast decoder with the kernels launched early (pdl.py level 2)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider tests/test_pdl.py 2>&1 \
        | tee "$OUT/pdl_tests.txt" | tail -15
      SMALLCHAT_PDL=2 PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_int4_kernels.py tests/test_decode_attention.py tests/test_int4_folded_norms.py \
        tests/test_gemv_tiles.py tests/test_fast_decode.py 2>&1 | tee -a "$OUT/pdl_tests.txt" | tail -30 ;;
    pdl-attention-tests)  # the decode attention's and the fast decoder's GPU tests at PDL level 2 (~2 minutes)
      SMALLCHAT_PDL=2 PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_decode_attention.py tests/test_fast_decode.py 2>&1 | tee "$OUT/pdl_attention_tests.txt" | tail -15 ;;
    pdl-ab)  # decode with programmatic dependent launch off (0), early launch (1), + L2 prefetch (2) (~7 minutes)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4 1.8b:fast-int4-pdl1 1.8b:fast-int4-pdl2 \
        7b:fast-int4 7b:fast-int4-pdl2 \
        --out "$OUT/decode_pdl_ab.jsonl" --md "$OUT/decode_pdl_ab.md" 2>&1 | tail -40 ;;
    norms-tests)  # the folded norms' GPU tests, then the fast decoder's (~2 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_int4_folded_norms.py tests/test_int4_kernels.py tests/test_fast_decode.py 2>&1 \
        | tee "$OUT/norms_tests.txt" | tail -30 ;;
    attention)  # bench/decode_attention.py: the fused decode attention against the plain form (~1 minute)
      python3 bench/decode_attention.py --out "$OUT/decode_attention.json" 2>&1 | tee "$OUT/decode_attention.txt" ;;
    attention-sweep)  # the fused decode attention's tiles, windows 512 and 4,096 (~2 minutes)
      python3 bench/decode_attention.py --sweep --windows 512 4096 --out "$OUT/decode_attention_sweep.json" \
        2>&1 | tee "$OUT/decode_attention_sweep.txt" ;;
    attention-tests)  # the decode attention's GPU tests only (~1 minute)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_decode_attention.py 2>&1 | tee "$OUT/attention_tests.txt" | tail -15 ;;
    persistent)  # bench/persistent_probe.py: a layer's GEMVs as one persistent kernel with grid barriers, against
      # separate launches; its GPU test first (a barrier that never ends hangs: both are cut at their limits) (~3 min)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_persistent_probe.py 2>&1 | tee "$OUT/persistent_tests.txt" | tail -15
      timeout 300 python3 bench/persistent_probe.py --out "$OUT/persistent_probe.jsonl" 2>&1 | tee "$OUT/persistent_probe.txt" ;;
    persistent-layer)  # bench/persistent_layer.py: whole layers as one persistent kernel against the app's kernels;
      # its GPU test first (a barrier that never ends hangs: both are cut at their limits) (~4 min)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_persistent_layer.py 2>&1 | tee "$OUT/persistent_layer_tests.txt" | tail -15
      timeout 300 python3 bench/persistent_layer.py --out "$OUT/persistent_layer.jsonl" 2>&1 \
        | tee "$OUT/persistent_layer.txt" ;;
    gpu-tests)  # the GPU-marked tests of the kernels and the fast decoder (~3 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_decode_attention.py tests/test_int4_kernels.py tests/test_gemv_tiles.py tests/test_fast_decode.py tests/test_int4_store.py \
        tests/test_int4_folded_norms.py 2>&1 \
        | tee "$OUT/gpu_tests_fast.txt" | tail -30 ;;
    warmup|warmup-profile)  # the 7B's cold first load with and without the threaded int4 precompile, each
             # from an empty cache (~3 minutes); warmup-profile: each load cProfiled (which slows the eager parts)
      profile=(); [[ "$1" == warmup-profile ]] && profile=(--profile-load)
      for variant in fast-int4-no-precompile fast-int4; do
        SMALLCHAT_CACHE="$(mktemp -d)" python3 bench/decode_speed.py --configs "7b:$variant" "${profile[@]}" \
          --out "$OUT/warmup.jsonl" --md "$OUT/warmup.md" 2>&1 | tail -8
      done ;;
    mma)  # the tensor-core GEMV (models/kernels/int4_mma.py): its GPU tests, then against the app's Triton tiles on
          # every linear shape of a step (bench/int4_mma_gemv.py) (~4 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_int4_mma.py 2>&1 | tee "$OUT/mma_tests.txt" | tail -15
      timeout 400 python3 bench/int4_mma_gemv.py "$OUT/int4_mma_gemv.json" 2>&1 | tee "$OUT/int4_mma_gemv.txt" ;;
    mma-profile)  # ncu on the 7B's GEMVs: the app's Triton tiles against the tensor-core GEMV's (~2 minutes)
      mma=(4,2,16,0 4,2,2,1 4,3,16,0 4,4,8,0)
      python3 bench/int4_profile.py --configs 256,8,2,0,1,1 --mma "${mma[@]}" 2>&1 | tee "$OUT/mma_profile.txt"
      ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 bench/int4_profile.py --ncu-region --configs 256,8,2,0,1,1 --mma "${mma[@]}" \
        > "$OUT/mma_ncu.txt" 2>&1; tail -5 "$OUT/mma_ncu.txt" ;;
    mma-tests)  # the GPU tests of the GEMVs, their tiles and epilogues, and the fast decoder (~3 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_int4_mma.py tests/test_int4_folded_norms.py tests/test_gemv_tiles.py tests/test_int4_kernels.py \
        tests/test_fast_decode.py 2>&1 | tee "$OUT/mma_gpu_tests.txt" | tail -25 ;;
    pdl-chain)  # early launches with the tensor-core GEMV: test_pdl's GPU tests, then a layer's chain of kernels at
                # levels 0-2 with Triton's, int4_mma's or all tiles (bench/pdl_chain.py) (~3 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_pdl.py 2>&1 | tee "$OUT/pdl_chain_tests.txt" | tail -8
      timeout 360 python3 bench/pdl_chain.py --out "$OUT/pdl_chain.jsonl" 2>&1 | tee "$OUT/pdl_chain.txt" ;;
    cluster)  # the cluster decode attention (attention_cluster.py): its GPU tests and the Triton kernel's, then both
              # per layer over the catalog's head layouts and windows (bench/attention_cluster.py) (~3 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_attention_cluster.py tests/test_decode_attention.py tests/test_pdl.py 2>&1 \
        | tee "$OUT/cluster_tests.txt" | tail -12
      timeout 300 python3 bench/attention_cluster.py --out "$OUT/attention_cluster.jsonl" 2>&1 \
        | tee "$OUT/attention_cluster.txt" ;;
    cluster-tiles)  # the cluster attention's block shapes (warps a block x blocks a KV head) on the 1.8B and 7B (~2 min)
      timeout 400 python3 bench/attention_cluster.py --layouts 1.8B 7B Qwen-7B --windows 512 1024 2048 4096 \
        --variants 4,8 16,8 8,4 4,4 16,4 --out "$OUT/attention_cluster_tiles.jsonl" 2>&1 \
        | tee "$OUT/attention_cluster_tiles.txt" | tail -30 ;;
    fused)  # probe: the q/k/v GEMV + attention as one kernel (bench/qkv_attention_kernel.py): its GPU tests and the
            # folded-norm and fast decoder's, then per layer against the two kernels (bench/qkv_attention.py) (~3 min)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_attention_qkv.py tests/test_attention_cluster.py tests/test_int4_folded_norms.py \
        tests/test_fast_decode.py 2>&1 | tee "$OUT/fused_tests.txt" | tail -15
      timeout 240 python3 bench/qkv_attention.py --out "$OUT/qkv_attention.jsonl" 2>&1 | tee "$OUT/qkv_attention.txt" ;;
    l2-prefetch)  # a layer's kernel chain with a second stream asking the L2 for the weights ahead of them, per
                  # budget and way of asking (bench/l2_prefetch.py) (~3 minutes)
      timeout 400 python3 bench/l2_prefetch.py --out "$OUT/l2_prefetch.jsonl" 2>&1 | tee "$OUT/l2_prefetch.txt" ;;
    argmax-tests)  # the one-kernel argmax's GPU test, the fast decoder's, and the precompile's (the cluster
                   # attention's jobs in threads: a failed context, fixed in session 35) (~4 minutes)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_argmax.py tests/test_fast_decode.py \
        "tests/test_decode_attention.py::test_after_the_precompile_the_first_decode_steps_compile_no_attention_kernel" \
        2>&1 | tee "$OUT/argmax_tests.txt" | tail -15 ;;
    argmax-ab)  # the 1.8B decoding with the one-kernel argmax and with torch's (~3 minutes; the 7B's step is 2.3x as
                # long for the same 16 µs, so it gains under 1 %)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4 1.8b:fast-int4-torch-argmax \
        --out "$OUT/decode_argmax_ab.jsonl" --md "$OUT/decode_argmax_ab.md" 2>&1 | tail -30 ;;
    cluster-ab)  # the 1.8B and the 7B decoding with the cluster attention and with the Triton one (~5 minutes)
      python3 bench/decode_speed.py --configs 1.8b:fast-int4 1.8b:fast-int4-triton-attention 7b:fast-int4 \
        7b:fast-int4-triton-attention --out "$OUT/decode_cluster_ab.jsonl" --md "$OUT/decode_cluster_ab.md" 2>&1 \
        | tail -30 ;;
    mma-ab)  # the 7B and the 1.8B with the GEMV tiles chosen among Triton's and int4_mma's, and Triton's only (~8 min)
      python3 bench/decode_speed.py --configs 7b:fast-int4 7b:fast-int4-triton-gemv 1.8b:fast-int4 \
        1.8b:fast-int4-triton-gemv --out "$OUT/decode_mma_ab.jsonl" --md "$OUT/decode_mma_ab.md" 2>&1 | tail -30 ;;
    sweep-7b)  # the 7B's four linear shapes only (~3.5 minutes)
      python3 bench/int4_gemv_sweep.py 200 "$OUT/int4_gemv_sweep_7b.json" 7b 2>&1 | tee "$OUT/int4_gemv_sweep_7b.txt" ;;
    half2)
      python3 bench/int4_gemv_sweep.py 240 "$OUT/int4_gemv_half2.json" app half2 2>&1 | tee "$OUT/int4_gemv_half2.txt"
      python3 bench/pick_tiles.py "$OUT/int4_gemv_half2.json" 2>&1 | tee "$OUT/int4_gemv_half2_pick.md" ;;
    half2-stages)  # the same with the HALF2 tiles pipelined (3-4 stages) as well (~8 minutes: a call of its own)
      python3 bench/int4_gemv_sweep.py 420 "$OUT/int4_gemv_half2_stages.json" app half2 stages 2>&1 \
        | tee "$OUT/int4_gemv_half2_stages.txt"
      python3 bench/pick_tiles.py "$OUT/int4_gemv_half2_stages.json" 2>&1 | tee "$OUT/int4_gemv_half2_stages_pick.md" ;;
    sweep)
      python3 bench/int4_gemv_sweep.py 450 "$OUT/int4_gemv_sweep.json" app 2>&1 | tee "$OUT/int4_gemv_sweep.txt" ;;
    profile)  # ncu on the 7B's GEMVs: the tuned tile, fixed tiles, and (after sweep-7b) its best per shape (~2 minutes)
      tiles=(256,16,4 512,32,2,0 256,8,4,0,3)
      python3 bench/int4_profile.py --best-from "$OUT/int4_gemv_sweep_7b.json" --configs "${tiles[@]}" \
        2>&1 | tee "$OUT/int4_profile.txt"
      ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 bench/int4_profile.py --ncu-region --best-from "$OUT/int4_gemv_sweep_7b.json" --configs "${tiles[@]}" \
        > "$OUT/int4_gemv_ncu.txt" 2>&1; tail -5 "$OUT/int4_gemv_ncu.txt" ;;
    profile-half2)  # ncu on the 7B's GEMVs with the app's tiles, packed-fp16 ones included, and on the q/k/v attention (~4 minutes)
      tiles=(256,32,2,0,1,1 512,16,4,0,1,1 256,8,2,0,1,1 128,64,2)
      python3 bench/int4_profile.py --configs "${tiles[@]}" 2>&1 | tee "$OUT/int4_profile_half2.txt"
      ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
        python3 bench/int4_profile.py --ncu-region --configs "${tiles[@]}" \
        > "$OUT/int4_gemv_ncu_half2.txt" 2>&1; tail -5 "$OUT/int4_gemv_ncu_half2.txt"
      python3 bench/attention_profile.py 2>&1 | tee "$OUT/attention_profile.txt"
      ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats --section SchedulerStats \
        python3 bench/attention_profile.py --ncu-region > "$OUT/attention_ncu.txt" 2>&1; tail -5 "$OUT/attention_ncu.txt" ;;
    store-stall)  # bench/store_write_stall.py: a decode-like host loop beside the int4 store's writer (CPU only, ~30 s)
      python3 bench/store_write_stall.py --gb 4 2>&1 | tee "$OUT/store_write_stall.txt" ;;
    sample)  # the next token from the logits alone, greedy against top-p sampled (bench/sample_speed.py) (~30 s)
      python3 bench/sample_speed.py 2>&1 | tee "$OUT/sample_speed.txt" ;;
    gemv-tests)  # the GEMV's own GPU tests (~1 minute)
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" python3 -m pytest -q -p no:cacheprovider -m gpu \
        tests/test_int4_kernels.py tests/test_gemv_tiles.py 2>&1 | tee "$OUT/gemv_tests.txt" | tail -30 ;;
    tests)  # the whole GPU suite (~6 minutes); TESTS_TIMEOUT (s) cuts it so a call's later modes and files still come back
      PYTHONPATH="/tmp/site-pytest:$PYTHONPATH" timeout "${TESTS_TIMEOUT:-900}" python3 -m pytest -q -p no:cacheprovider --durations=12 \
        tests/test_gpu.py tests/test_int4_kernels.py tests/test_decode_attention.py tests/test_fast_decode.py \
        tests/test_fused_projections.py tests/test_int4_store.py tests/test_gemv_tiles.py \
        tests/test_int4_folded_norms.py tests/test_offload.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -30 ;;
    *) echo "unknown mode: $1"; return 2 ;;
  esac
}
for mode in "$@"; do  # a failing mode is reported, and the next still runs (device minutes are scarce)
  echo "=== $mode ($(date -u +%H:%M:%S))"
  run_mode "$mode" || { echo "=== $mode FAILED"; status=1; }
done
exit "$status"
