#!/usr/bin/env bash
# Quantization figures on one GPU (benchmarks/RESULTS.md, issue 7), each logged under
# $OUT. Run from the repo root:
#   OUT=/tmp/out bash benchmarks/quant_suite.sh [tests] [throughput] [latency]
# throughput: bf16 vs FP8 weights + FP8 KV, each run twice alternating (the first run
# of a configuration also compiles its kernels); latency: batch-1 decode bf16, W8A16,
# W4A16 g128.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/rtllm_quant}; mkdir -p "$OUT"
parts=${*:-tests throughput latency}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
MODEL="--model benchmarks/configs/llama3-8b --load-format dummy"
bench() {  # name, args...
  local name=$1; shift
  timeout 300 python3 -m rtllm.cli --log-level INFO bench "$@" --no-progress > "$OUT/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -E "output throughput|TTFT|TPOT|memory plan" "$OUT/$name.log" | head -4
}
if [[ $parts == *tests* ]]; then
  timeout 300 python3 -m pytest -q -m gpu tests/kernels tests/quantization > "$OUT/gpu_tests.log" 2>&1
  tail -3 "$OUT/gpu_tests.log"
fi
if [[ $parts == *throughput* ]]; then
  T="throughput $MODEL --input-len 256 --output-len 256 --num-requests 500 --warmup 1 --max-batch-size 512 --cuda-graph-max-batch-size 512"
  for run in 1 2; do
    bench "tput_bf16_$run" $T
    bench "tput_fp8_fp8kv_$run" $T --quant-algo FP8 --kv-cache-quant-algo FP8
  done
fi
if [[ $parts == *latency* ]]; then
  L="latency $MODEL --input-len 128 --output-len 64 --num-requests 2 --warmup 1 --max-batch-size 8 --cuda-graph-max-batch-size 8"
  bench lat_bf16 $L
  bench lat_w8a16 $L --quant-algo W8A16
  bench lat_w4a16 $L --quant-algo W4A16_GPTQ --quant-group-size 128
fi
