#!/usr/bin/env bash
# Tensor/pipeline parallelism on a 2-GPU machine: GPU tests, Llama-3-8B batch-1 latency
# and offline throughput at TP=1/TP=2/PP=2, and a 70B-shaped model served with TP=2.
# Run from the repo root with the wheels of .whl installed into /tmp/site:
#   OUT=/tmp/out bash benchmarks/parallel_suite.sh [tests] [latency] [throughput] [serve70b]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site${PYTHONPATH:+:$PYTHONPATH} NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/rtllm_parallel}; mkdir -p "$OUT"
parts=${*:-tests latency throughput serve70b}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
M8=benchmarks/configs/llama3-8b

bench() {  # name, args...
  local name=$1; shift
  timeout 400 python3 -m rtllm.cli --log-level INFO bench "$@" --no-progress --report-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -E "throughput|TTFT|TPOT|memory plan|captured|Error" "$OUT/$name.log" | head -8
}
if [[ $parts == *tests* ]]; then
  timeout 300 python3 -m pytest -q -x tests/distributed/test_parallel_gpu.py > "$OUT/gpu_parallel_tests.log" 2>&1
  tail -5 "$OUT/gpu_parallel_tests.log"
fi
if [[ $parts == *latency* ]]; then
  lat="--model $M8 --load-format dummy --input-len 128 --output-len 128 --num-requests 3 --warmup 1"
  bench llama8b_bs1_tp1 latency $lat
  bench llama8b_bs1_tp2 latency $lat --tp 2
  RTLLM_ALL_REDUCE=nccl bench llama8b_bs1_tp2_nccl latency $lat --tp 2
fi
if [[ $parts == *throughput* ]]; then
  common="--model $M8 --load-format dummy --input-len 256 --output-len 256 --num-requests 512 --warmup 2 --max-batch-size 256 --cuda-graph-max-batch-size 256"
  bench llama8b_tput_tp1 throughput $common
  bench llama8b_tput_tp2 throughput $common --tp 2
  bench llama8b_tput_pp2 throughput $common --pp 2
fi
if [[ $parts == *serve70b* ]]; then
  printf 'skip_tokenizer_init: true\n' > /tmp/skip_tok.yaml
  python3 -m rtllm.cli --log-level INFO serve benchmarks/configs/llama3-70b --load-format dummy --tp-size 2 \
    --served-model-name llama3-70b --port 8123 --max-batch-size 8 --max-seq-len 4096 --config /tmp/skip_tok.yaml > "$OUT/serve70b.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 400); do
    curl -sf localhost:8123/health > /dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server exited"; tail -5 "$OUT/serve70b.log"; break; }
    sleep 1
  done
  curl -s localhost:8123/health; echo
  start=$(date +%s%N)
  curl -s localhost:8123/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "llama3-70b", "prompt": [128000, 791, 6864, 315, 9822, 374], "max_tokens": 64, "ignore_eos": true, "temperature": 0}' \
    | python3 -c "import json,sys; r=json.load(sys.stdin); print('usage', r.get('usage'), 'error', r.get('error'))"
  echo "64 tokens in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  curl -s localhost:8123/metrics | grep -E "^rtllm:(engine_steps|kv_cache_blocks_total|generation_tokens_total)" | head
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader
  kill $pid; wait $pid 2>/dev/null
  grep -E "memory plan|captured|ERROR" "$OUT/serve70b.log" | head -6
fi
