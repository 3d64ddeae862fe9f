#!/usr/bin/env bash
# One prepared run for the GPU machine: correctness checks, step throughput of jaxssl and
# PyTorch (with a profile of jaxssl's step), the whole training loop, the 5-minute quality runs,
# the kNN monitor at ImageNet scale and InfoNCE's peak memory.
#
#   bash benchmarks/gpu_suite.sh           # on the GPU machine
#   TINY=1 bash benchmarks/gpu_suite.sh    # CPU smoke test of the same script
#
# PARTS picks steps, in this order (default "checks throughput loop quality knn infonce"):
#   checks      benchmarks/gpu_checks.py on the accelerator, and on the CPU (XLA:CPU NaN check);
#   throughput  benchmarks/step_throughput.py for ResNet-18 CIFAR (32 px, batch 512) and ResNet-50
#               (224 px, batch 256): jaxssl (plain and with the augmentation on the device),
#               PyTorch torch.compile and eager. The four processes of a model compile at once and
#               then time one after another (--turn-dir), so compilation costs the longest of them,
#               not their sum; the checks run during the first compilations. jaxssl's plain steps
#               also write a jax.profiler trace, summed by benchmarks/trace_summary.py;
#   loop        benchmarks/train_loop_throughput.py (the pure step taken from the throughput line);
#   quality     the 5-minute SimCLR run (configs/simclr_cifar10_5min.py); quality_moco: MoCo v2's;
#   knn         benchmarks/knn_scale.py, 1.28M x 2048 bank, float32 and bfloat16;
#   infonce     benchmarks/infonce_memory.py, plain against blockwise, 8k-128k views.
# MODELS="resnet18_cifar resnet50" and FRAMEWORKS="jax jax_aug torch torch_eager" narrow the
# throughput step; QUALITY_EPOCHS=N changes the quality runs' length. QUALITY_WHILE_WAITING=1 (for a
# short lease): the throughput processes of every model compile first, the quality runs go while
# they wait (JAX then allocates memory as needed, not 75% up front), and they are timed after.
#
# Every step has a timeout, and the suite keeps within SUITE_BUDGET_S seconds (default 540, for one
# 10-minute command; TINY: 7200): a step starts only with >= 45 s left, and its timeout ends by then.
# Results are written under $RES (default /tmp/jaxssl_suite) and packed after every step into
# $OUT/suite.tgz (the device tool returns at most 8 files), so a run stopped by its timeout still
# returns what finished; the JSON lines are also printed at the end.
# The CIFAR-10 JPEG npz is read from $CIFAR10_NPZ, .data/cifar10_jpeg.npz (git-ignored: copy it
# there and carry .data to the GPU machine) or ../shared/data/cifar10/; a GPU machine without
# ml_collections finds a copy in .data/pylib/ (cp -r .venv/lib/python3.*/site-packages/ml_collections .data/pylib/).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jaxssl_gpu_suite}
RES=${RES:-/tmp/jaxssl_suite}
rm -rf "$RES"
mkdir -p "$OUT" "$RES"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TINY=${TINY:-0}
tiny=(); [ "$TINY" = 1 ] && tiny=(--tiny)
[ -d .data/pylib ] && export PYTHONPATH="$PYTHONPATH:$PWD/.data/pylib"  # after site-packages' own
PARTS=" ${PARTS:-checks throughput loop quality knn infonce} "
MODELS=${MODELS:-"resnet18_cifar resnet50"}
FRAMEWORKS=" ${FRAMEWORKS:-jax jax_aug torch torch_eager} "
BUDGET=${SUITE_BUDGET_S:-$([ "$TINY" = 1 ] && echo 7200 || echo 540)}
want() { [[ "$PARTS" == *" $1 "* ]]; }
# left: seconds left of the budget.
left() { echo $(( BUDGET - SECONDS )); }
# cap CAP: CAP or what is left of the budget, whichever is less.
cap() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }
skip() { echo "skipped ($1): $(left) s left of the suite's ${BUDGET} s budget" | tee -a "$RES/skipped.txt" >&2; }
# limit PART CAP CMD...: CMD under a timeout of CAP seconds or what is left of the budget,
# whichever is less; nothing when PART is not in PARTS or less than 45 s are left.
limit() {
  local part=$1 c=$2; shift 2
  want "$part" || return 0
  if [ "$(left)" -lt 45 ]; then skip "$part"; return 0; fi
  timeout -k 20 "$(cap "$c")" "$@"
}
pack() {
  tar czf "$OUT/suite.tgz.tmp" -C "$RES" . 2>/dev/null && mv "$OUT/suite.tgz.tmp" "$OUT/suite.tgz"
}
NPZ=${CIFAR10_NPZ:-}
for p in .data/cifar10_jpeg.npz ../shared/data/cifar10/cifar10_jpeg.npz; do
  [ -z "$NPZ" ] && [ -f "$p" ] && NPZ=$PWD/$p
done
{
  date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null || true
  git status --short 2>/dev/null | grep -v '^??' | head -20
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  "$PY" -c "import importlib.util as u; print(*(f'{m}:{bool(u.find_spec(m))}' for m in ('ml_collections', 'orbax', 'PIL', 'matplotlib', 'tensorboard', 'tensorflow', 'torch')))"
  echo "CIFAR-10 npz: ${NPZ:-absent}; PARTS:$PARTS; budget ${BUDGET} s; nproc $(nproc)"
} 2>&1 | tee "$RES/env.txt"
pack

# The checks: on the accelerator, then XLA:CPU's eval-mode check on this machine's jax version.
checks() {
  limit checks 300 "$PY" benchmarks/gpu_checks.py "${tiny[@]}" > "$RES/checks.txt" 2>&1
  echo "checks exit $?" >> "$RES/checks.txt"
  JAX_PLATFORMS=cpu limit checks 200 "$PY" benchmarks/gpu_checks.py --tiny > "$RES/checks_cpu.txt" 2>&1
  echo "checks (XLA:CPU) exit $?" >> "$RES/checks_cpu.txt"
}

# wave_start MODEL: start the throughput measurements of one model; they compile at once, then
# each waits for its turn (wave_time) before timing. Returns once each is ready (compiled and
# warm) or gone, or after WAVE_READY_S seconds (default 240).
WAVE_NAMES=(); WAVE_PIDS=(); WAVE_TURNS=()
wave_start() {
  local model=$1 turns="$RES/turns_$1" name fw args i t0=$SECONDS c
  mkdir -p "$turns"
  c=$(cap "${BENCH_TIMEOUT:-420}")
  for fw in jax torch torch_eager jax_aug; do
    [[ "$FRAMEWORKS" == *" $fw "* ]] || continue
    name=${fw}_$model
    case $fw in
      jax) args=(--framework jax --profile "$RES/profile") ;;
      jax_aug) args=(--framework jax --device-augment) ;;
      torch) args=(--framework torch --torch-mode compile) ;;
      torch_eager) args=(--framework torch --torch-mode eager) ;;
    esac
    # Several processes share the accelerator: JAX takes memory as it needs it, not 75% at once.
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$c" "$PY" benchmarks/step_throughput.py \
      --model "$model" --name "$name" --turn-dir "$turns" "${args[@]}" "${tiny[@]}" \
      > "$RES/$name.json" 2> "$RES/$name.err" &
    WAVE_NAMES+=("$name"); WAVE_PIDS+=($!); WAVE_TURNS+=("$turns")
  done
  while [ $(( SECONDS - t0 )) -lt "${WAVE_READY_S:-240}" ]; do
    local waiting=0
    for i in "${!WAVE_NAMES[@]}"; do
      [ -f "${WAVE_TURNS[$i]}/${WAVE_NAMES[$i]}.ready" ] && continue
      kill -0 "${WAVE_PIDS[$i]}" 2>/dev/null && waiting=1
    done
    [ "$waiting" = 0 ] && break
    sleep 1
  done
}

# wave_time: every started measurement in turn, alone on the accelerator (a process still
# compiling is waited for until it is ready, gone, or its timeout ends it).
wave_time() {
  local i name t0
  [ -n "${CHECKS_PID:-}" ] && { wait "$CHECKS_PID"; CHECKS_PID=; }  # nothing else on the GPU
  for i in "${!WAVE_NAMES[@]}"; do
    name=${WAVE_NAMES[$i]}
    t0=$SECONDS
    while [ ! -f "${WAVE_TURNS[$i]}/$name.ready" ] && kill -0 "${WAVE_PIDS[$i]}" 2>/dev/null; do
      sleep 1
    done
    [ -f "${WAVE_TURNS[$i]}/$name.ready" ] && touch "${WAVE_TURNS[$i]}/$name.go"
    wait "${WAVE_PIDS[$i]}"
    echo "$name exit $? (compiled alongside the others, timed alone; waited $(( SECONDS - t0 )) s for it)" >> "$RES/$name.err"
    grep -h '^{' "$RES/$name.json" >> "$RES/throughput.jsonl"
    tail -2 "$RES/$name.err" >&2
  done
  WAVE_NAMES=(); WAVE_PIDS=(); WAVE_TURNS=()
  for f in "$RES"/profile/*.trace.json.gz; do
    [ -f "$f" ] && "$PY" benchmarks/trace_summary.py "$f" --top 30 --tracks 3 > "${f%.trace.json.gz}.summary.txt" 2>&1
  done
  pack
}

echo "== checks and throughput"
# QUALITY_WHILE_WAITING=1 (a short lease): every model's measurements compile first, then the
# quality runs go while they wait, then they are timed; otherwise one model after another.
if want throughput && [ "$(left)" -ge 45 ]; then
  checks & CHECKS_PID=$!
  for model in $MODELS; do
    if [ "$(left)" -lt 45 ]; then skip "throughput $model"; continue; fi
    wave_start "$model"
    [ "${QUALITY_WHILE_WAITING:-0}" = 1 ] || wave_time
  done
else
  checks
fi
[ -n "${CHECKS_PID:-}" ] && { wait "$CHECKS_PID"; CHECKS_PID=; }
cat "$RES/checks.txt" "$RES/checks_cpu.txt" 2>/dev/null | grep -E '^\{|exit'
pack

echo "== whole training loop vs the pure step (jaxssl train, CIFAR-10 npz, device augmentation)"
step_json=()
grep -q '"device_augment": true' "$RES/throughput.jsonl" 2>/dev/null \
  && grep '"model": "resnet18_cifar"' "$RES/throughput.jsonl" | grep -q '"device_augment": true' \
  && step_json=(--step-json "$RES/throughput.jsonl")
[ "$TINY" = 1 ] && step_json=()  # the tiny throughput line is not the loop's width and batch
limit loop "${LOOP_TIMEOUT:-240}" "$PY" benchmarks/train_loop_throughput.py ${NPZ:+--data "$NPZ"} \
  "${step_json[@]}" "${tiny[@]}" 2> "$RES/train_loop.err" | tee -a "$RES/train_loop.jsonl"
tail -3 "$RES/train_loop.err"
pack

# quality PART NAME CONFIG: one 5-minute run into $RES/NAME/ and a line of quality.jsonl (with
# the command's wall clock and exit status: 124 when the timeout stopped it).
quality() {
  local part=$1 name=$2 config=$3 dir=${QUALITY_WORKDIR:-/tmp/jaxssl_quality}/$2 t0 rc wall extra=()
  want "$part" || return 0
  echo "== $name: $config, 5 minutes"
  if [ -z "$NPZ" ]; then echo "skipped ($part): no CIFAR-10 npz (see the top of this file)"; return 0; fi
  [ "$TINY" = 1 ] && extra=(--config.num_steps=3 --config.batch_size=16 --config.log_every_steps=1
    --config.eval_every_steps=2 --config.checkpoint_every_steps=3 --config.model.width=4
    --config.model.head_hidden_dims="(16,)" --config.model.out_dim=8 --config.eval.bank_examples=400
    --config.eval.query_examples=160 --config.eval.knn_k=20)
  rm -rf "$dir"; mkdir -p "$RES/$name"; t0=$SECONDS
  # Measurements waiting for their turn hold accelerator memory: take it as needed then.
  [ "${#WAVE_NAMES[@]}" -gt 0 ] && export XLA_PYTHON_CLIENT_PREALLOCATE=false
  limit "$part" "${QUALITY_TIMEOUT_S:-330}" "$PY" -m jaxssl train --config "$config${QUALITY_EPOCHS:+:$QUALITY_EPOCHS}" \
    --workdir "$dir" --config.data.path="$NPZ" "${extra[@]}" > "$RES/$name/train.log" 2>&1
  rc=$? wall=$(( SECONDS - t0 ))
  tail -4 "$RES/$name/train.log"
  for f in metrics.jsonl config.json curves.png augment_preview.png; do
    [ -f "$dir/$f" ] && cp "$dir/$f" "$RES/$name/"
  done
  [ -f "$dir/metrics.jsonl" ] && "$PY" benchmarks/run_summary.py "$dir" --name "$name" --rc "$rc" --wall-s "$wall" \
    | tee -a "$RES/quality.jsonl"
  pack
}
quality quality quality_simclr configs/simclr_cifar10_5min.py
quality quality_moco quality_mocov2 configs/mocov2_cifar10_5min.py
[ "${#WAVE_NAMES[@]}" -gt 0 ] && { echo "== throughput (compiled before the quality runs)"; wave_time; }

echo "== kNN monitor at ImageNet scale"
knn_args=(); [ "$TINY" = 1 ] && knn_args=(--bank 20000 --dim 64 --queries 100)
for dtype in float32 bfloat16; do
  limit knn "${KNN_TIMEOUT:-150}" "$PY" benchmarks/knn_scale.py --bank-dtype "$dtype" "${knn_args[@]}" \
    2> "$RES/knn_$dtype.err" | tee -a "$RES/knn_scale.jsonl"
  want knn && tail -2 "$RES/knn_$dtype.err"
done
pack

echo "== InfoNCE memory (plain vs blockwise, 8k-128k views; one process per measurement)"
limit infonce "${INFONCE_TIMEOUT:-1500}" "$PY" benchmarks/infonce_memory.py --timeout "${BENCH_TIMEOUT:-240}" \
  "${tiny[@]}" 2> "$RES/infonce_memory.err" | tee "$RES/infonce_memory.jsonl"
want infonce && tail -3 "$RES/infonce_memory.err"
pack

echo "== results"
cat "$RES"/skipped.txt 2>/dev/null
for f in throughput train_loop quality knn_scale; do
  [ -f "$RES/$f.jsonl" ] && cat "$RES/$f.jsonl"
done
for f in "$RES"/profile/*.summary.txt; do
  [ -f "$f" ] && { echo "-- $f"; head -40 "$f"; }
done
echo "suite done in ${SECONDS} s"
