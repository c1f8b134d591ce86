#!/bin/bash
# The GPU measurements still owed (one H100, one command of < 10 min; results under $OUT):
#   1. CUDA tests of the paths changed without a GPU: the pool's per-row-length decode, SDPA on masked GQA,
#      the export's FlexAttention / compiled static decode (issues #31, #36);
#   2. consa serve under load, 8K prompts (issue #36): light load, saturation, fixed batch, transformers;
#   3. the natively hybrid run (issue #35 item 4): gpt-oss- and Gemma-3-shaped search, export, reload, decode;
#   4. the head-wise export without consa at 32K, dynamic and static cache (issue #31 item 3).
# Needs starlette + uvicorn wheels in .whl_serve/ (see docs/SERVE.md; the device image has the rest).
# Usage on the device: bash tools/gpu-pending.sh   (PYTHONPATH is set here; nothing is installed but the wheels)
set -u
if ls .whl_serve/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_serve/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-pending}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
PYTHONPATH=$PYTHONPATH:$PWD/tests timeout 90 python3 -m pytest -q -p no:cacheprovider -n 6 tests/test_static_cache.py \
  tests/test_scheduler.py tests/test_kernels.py tests/test_softcap_sinks.py tests/test_spans.py tests/test_export_reference_attention.py \
  -k "per_row or cuda or gpu or masked_gqa or continuous or write_kernel or ring_decode or mixed_spans" 2>&1 \
  | grep -v DEBUG | grep -E "passed|failed|FAILED|Error" | tail -12 | tee "$OUT/tests.txt"
timeout 170 python3 benchmarks/serve_load.py --shape 0.6b --prompt-len 8192 --new-tokens 256 --requests 32 --rates 4,inf \
  --light 4 --allocs 25:512,full --hf-requests 0 --budget-s 140 --out "$OUT/serve_load.json" 2>&1 | grep -v DEBUG > "$OUT/serve_load.log"
tail -14 "$OUT/serve_load.log"
timeout 130 python3 benchmarks/native_hybrid.py --budget-s 110 --out "$OUT/native_hybrid.json" 2>&1 | grep -v DEBUG > "$OUT/native.log"
tail -8 "$OUT/native.log"
timeout 100 python3 benchmarks/serving.py --phases 3 --shapes 0.6b --export-shapes 0.6b --contexts 32768 --export-max-context 32768 \
  --export-modes dynamic,static --export-batches 1 --hf '' --budget-s 90 --out "$OUT/export32k.json" 2>&1 | grep -v DEBUG > "$OUT/export.log"
tail -8 "$OUT/export.log"
