#!/usr/bin/env bash
# One device session: GPU tests, model equivalence on CUDA, rtllm benchmarks and
# the transformers reference, each logged under $OUT. Run from the repo root:
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh [kernels] [tests] [bench] [profile] [hf]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/rtllm_gpu}; mkdir -p "$OUT"
parts=${*:-kernels tests bench hf}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git rev-parse --short HEAD 2>/dev/null || true

if [[ $parts == *kernels* ]]; then
  timeout 150 python3 -m pytest -q -m gpu tests/kernels tests/layers > "$OUT/gpu_tests.log" 2>&1; tail -3 "$OUT/gpu_tests.log"
fi
if [[ $parts == *tests* ]]; then
  timeout 240 python3 -m pytest -q -x tests/models/test_hf_equivalence.py tests/engine/test_overlap.py > "$OUT/equivalence.log" 2>&1; tail -15 "$OUT/equivalence.log"
fi
bench() {  # name, args...
  local name=$1; shift
  timeout 400 python3 -m rtllm.cli --log-level INFO bench "$@" --no-progress --report-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -E "throughput|TTFT|TPOT|peak|memory plan|captured" "$OUT/$name.log" | head -12
}
if [[ $parts == *bench* ]]; then
  bench qwen_bs1 latency --model benchmarks/configs/qwen3-0.6b --load-format dummy --input-len 128 --output-len 256 --num-requests 3 --warmup 1
  bench llama8b_bs1 latency --model benchmarks/configs/llama3-8b --load-format dummy --input-len 128 --output-len 256 --num-requests 3 --warmup 1
  bench llama8b_tput throughput --model benchmarks/configs/llama3-8b --load-format dummy --input-len 256 --output-len 256 --num-requests 1000 --warmup 2 --max-batch-size 512 --cuda-graph-max-batch-size 512
fi
if [[ $parts == *profile* ]]; then
  timeout 120 python3 benchmarks/profile_decode.py benchmarks/configs/llama3-8b 1 64 > "$OUT/profile_llama8b_bs1.log" 2>&1; head -40 "$OUT/profile_llama8b_bs1.log"
fi
if [[ $parts == *hf* ]]; then
  timeout 240 python3 benchmarks/hf_reference.py .perf/hf_baseline.py bw 8b small > "$OUT/hf_reference.log" 2>&1; cat "$OUT/hf_reference.log"
fi
