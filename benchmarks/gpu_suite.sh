#!/usr/bin/env bash
# One prepared run for the GPU machine: correctness checks, step throughput of jaxssl and
# PyTorch, then InfoNCE's peak memory, plain against blockwise. Results go to $OUT (default
# /tmp/jaxssl_gpu_suite). On a CPU: TINY=1 for a smoke run.
#
#   bash benchmarks/gpu_suite.sh           # on the GPU machine
#   TINY=1 bash benchmarks/gpu_suite.sh    # CPU smoke test of the same script
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxssl_gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
tiny=(); [ "${TINY:-0}" = 1 ] && tiny=(--tiny)
{
  date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
echo "== checks"
timeout 300 "$PY" benchmarks/gpu_checks.py "${tiny[@]}" 2>&1 | tee "$OUT/checks.txt"
# The XLA:CPU eval-mode check as well, on this machine's jax version.
JAX_PLATFORMS=cpu timeout 200 "$PY" benchmarks/gpu_checks.py --tiny 2>&1 | tee "$OUT/checks_cpu.txt"
echo "== throughput"
frameworks=${FRAMEWORKS:-"jax torch"}
for model in resnet18_cifar resnet50; do
  for fw in $frameworks; do
    timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py --framework "$fw" --model "$model" "${tiny[@]}" \
      2> "$OUT/${fw}_${model}.err" | tee -a "$OUT/throughput.jsonl"
    tail -3 "$OUT/${fw}_${model}.err"
  done
  # The same jaxssl step with the augmentation on the device (uint8 in): what a real run costs.
  timeout "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py --framework jax --model "$model" \
    --device-augment "${tiny[@]}" 2> "$OUT/jax_aug_${model}.err" | tee -a "$OUT/throughput.jsonl"
  tail -3 "$OUT/jax_aug_${model}.err"
done
echo "== InfoNCE memory (plain vs blockwise, 8k-128k views; one process per measurement)"
timeout "${INFONCE_TIMEOUT:-1500}" "$PY" benchmarks/infonce_memory.py --timeout "${BENCH_TIMEOUT:-240}" \
  "${tiny[@]}" 2> "$OUT/infonce_memory.err" | tee "$OUT/infonce_memory.jsonl"
tail -3 "$OUT/infonce_memory.err"
