#!/usr/bin/env bash
# One prepared run for the GPU machine: correctness checks, step throughput of jaxssl and
# PyTorch, then InfoNCE's peak memory, plain against blockwise. Results go to $OUT (default
# /tmp/jaxssl_gpu_suite). On a CPU: TINY=1 for a smoke run.
#
#   bash benchmarks/gpu_suite.sh           # on the GPU machine
#   TINY=1 bash benchmarks/gpu_suite.sh    # CPU smoke test of the same script
#
# Steps: the checks; the whole training loop against the pure step (train_loop_throughput.py);
# the 5-minute SimCLR quality run on CIFAR-10 (configs/simclr_cifar10_5min.py; its workdir
# outside $OUT, its metrics.jsonl, curves.png and config.json copied to $OUT/quality_simclr/);
# then step throughput (jaxssl and PyTorch) and InfoNCE memory in what is left of the budget.
# PARTS picks steps (default "checks loop quality throughput infonce"; "quality_moco" is the
# MoCo v2 5-minute run; QUALITY_EPOCHS=N changes the quality runs' length). Every step has a
# timeout, and the suite keeps within SUITE_BUDGET_S seconds (default 540, for one 10-minute
# command; TINY: 7200): a step starts only with >= 45 s left, and its timeout ends by then. On
# an H200 the default reaches about the quality run (checks, loop and quality take ~8 min, an
# estimate); PARTS="checks throughput" or "checks infonce" fit other sessions.
# The CIFAR-10 JPEG npz is read from $CIFAR10_NPZ, .data/cifar10_jpeg.npz (git-ignored: copy it
# there and carry .data to the GPU machine) or ../shared/data/cifar10/; a GPU machine without
# ml_collections finds a copy in .data/pylib/ (cp -r .venv/lib/python3.*/site-packages/ml_collections .data/pylib/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxssl_gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
tiny=(); [ "${TINY:-0}" = 1 ] && tiny=(--tiny)
[ -d .data/pylib ] && export PYTHONPATH="$PYTHONPATH:$PWD/.data/pylib"  # after site-packages' own
PARTS=" ${PARTS:-checks loop quality throughput infonce} "
BUDGET=${SUITE_BUDGET_S:-$([ "${TINY:-0}" = 1 ] && echo 7200 || echo 540)}
want() { [[ "$PARTS" == *" $1 "* ]]; }
# limit PART CAP CMD...: CMD under a timeout of CAP seconds or what is left of the budget,
# whichever is less; nothing when PART is not in PARTS or less than 45 s are left.
limit() {
  local part=$1 cap=$2 left; shift 2
  want "$part" || return 0
  left=$(( BUDGET - SECONDS ))
  if [ "$left" -lt 45 ]; then
    echo "skipped ($part): ${left} s left of the suite's ${BUDGET} s budget" | tee -a "$OUT/skipped.txt" >&2
    return 0
  fi
  timeout -k 20 "$(( cap < left ? cap : left ))" "$@"
}
NPZ=${CIFAR10_NPZ:-}
for p in .data/cifar10_jpeg.npz ../shared/data/cifar10/cifar10_jpeg.npz; do
  [ -z "$NPZ" ] && [ -f "$p" ] && NPZ=$PWD/$p
done
{
  date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  "$PY" -c "import importlib.util as u; print(*(f'{m}:{bool(u.find_spec(m))}' for m in ('ml_collections', 'orbax', 'PIL', 'matplotlib', 'tensorboard', 'tensorflow', 'torch')))"
  echo "CIFAR-10 npz: ${NPZ:-absent}; PARTS:$PARTS; budget ${BUDGET} s"
} 2>&1 | tee "$OUT/env.txt"
echo "== checks"
limit checks 300 "$PY" benchmarks/gpu_checks.py "${tiny[@]}" 2>&1 | tee "$OUT/checks.txt"
# The XLA:CPU eval-mode check as well, on this machine's jax version.
JAX_PLATFORMS=cpu limit checks 200 "$PY" benchmarks/gpu_checks.py --tiny 2>&1 | tee "$OUT/checks_cpu.txt"
echo "== whole training loop vs the pure step (jaxssl train, CIFAR-10 npz, device augmentation)"
limit loop "${LOOP_TIMEOUT:-240}" "$PY" benchmarks/train_loop_throughput.py ${NPZ:+--data "$NPZ"} "${tiny[@]}" \
  2> "$OUT/train_loop.err" | tee -a "$OUT/train_loop.jsonl"
tail -3 "$OUT/train_loop.err"
# quality PART NAME CONFIG: one 5-minute run into $OUT/NAME/ and a line of quality.jsonl (with
# the command's wall clock and exit status: 124 when the timeout stopped it).
quality() {
  local part=$1 name=$2 config=$3 dir=${QUALITY_WORKDIR:-/tmp/jaxssl_quality}/$2 t0 rc wall extra=()
  want "$part" || return 0
  echo "== $name: $config, 5 minutes"
  if [ -z "$NPZ" ]; then echo "skipped ($part): no CIFAR-10 npz (see the top of this file)"; return 0; fi
  [ "${TINY:-0}" = 1 ] && extra=(--config.num_steps=3 --config.batch_size=16 --config.log_every_steps=1
    --config.eval_every_steps=2 --config.checkpoint_every_steps=3 --config.model.width=4
    --config.model.head_hidden_dims="(16,)" --config.model.out_dim=8 --config.eval.bank_examples=400
    --config.eval.query_examples=160 --config.eval.knn_k=20)
  rm -rf "$dir"; mkdir -p "$OUT/$name"; t0=$SECONDS
  limit "$part" "${QUALITY_TIMEOUT_S:-330}" "$PY" -m jaxssl train --config "$config${QUALITY_EPOCHS:+:$QUALITY_EPOCHS}" \
    --workdir "$dir" --config.data.path="$NPZ" "${extra[@]}" > "$OUT/$name/train.log" 2>&1
  rc=$? wall=$(( SECONDS - t0 ))
  tail -4 "$OUT/$name/train.log"
  for f in metrics.jsonl config.json curves.png augment_preview.png; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$OUT/$name/"
  done
  [ -f "$dir/metrics.jsonl" ] && "$PY" benchmarks/run_summary.py "$dir" --name "$name" --rc "$rc" --wall-s "$wall" \
    | tee -a "$OUT/quality.jsonl"
}
quality quality quality_simclr configs/simclr_cifar10_5min.py
quality quality_moco quality_mocov2 configs/mocov2_cifar10_5min.py
echo "== throughput"
frameworks=${FRAMEWORKS:-"jax torch"}
for model in resnet18_cifar resnet50; do
  for fw in $frameworks; do
    limit throughput "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py --framework "$fw" --model "$model" "${tiny[@]}" \
      2> "$OUT/${fw}_${model}.err" | tee -a "$OUT/throughput.jsonl"
    tail -3 "$OUT/${fw}_${model}.err"
  done
  # The same jaxssl step with the augmentation on the device (uint8 in): what a real run costs.
  limit throughput "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/step_throughput.py --framework jax --model "$model" \
    --device-augment "${tiny[@]}" 2> "$OUT/jax_aug_${model}.err" | tee -a "$OUT/throughput.jsonl"
  tail -3 "$OUT/jax_aug_${model}.err"
done
echo "== InfoNCE memory (plain vs blockwise, 8k-128k views; one process per measurement)"
limit infonce "${INFONCE_TIMEOUT:-1500}" "$PY" benchmarks/infonce_memory.py --timeout "${BENCH_TIMEOUT:-240}" \
  "${tiny[@]}" 2> "$OUT/infonce_memory.err" | tee "$OUT/infonce_memory.jsonl"
tail -3 "$OUT/infonce_memory.err"
