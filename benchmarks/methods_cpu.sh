#!/usr/bin/env bash
# Every method of jaxssl.methods on a CPU: the demo (configs/demo.py:METHOD, built-in data, 15
# epochs) and 10 epochs of the same demo model and method on CIFAR-10 (the JPEG npz of
# ../shared/data/cifar10), kNN against the random initialisation. One line per run in
# $OUT/methods.jsonl (benchmarks/run_summary.py), and each run's metrics.jsonl, output and
# command next to it.
#
#   OUT=benchmarks/results/<date>-cpu-methods bash benchmarks/methods_cpu.sh demo|cifar [METHODS...]
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-demo}; shift || true
methods=${*:-byol simsiam barlow_twins vicreg mocov3}
OUT=${OUT:-benchmarks/results/cpu-methods}
NPZ=${NPZ:-../shared/data/cifar10/cifar10_jpeg.npz}
mkdir -p "$OUT"
for m in $methods; do
  work=$(mktemp -d)/$m
  args=(--config "configs/demo.py:$m")
  if [ "$what" = cifar ]; then
    args+=(--config.data.source=cifar10_npz --config.data.path="$NPZ" --config.num_epochs=10
           --config.log_every_steps=390 --config.eval_every_steps=1950
           --config.checkpoint_every_steps=1950)
  fi
  echo "jaxssl train --workdir W ${args[*]}" > "$OUT/$what-$m.command"
  start=$(date +%s)
  jaxssl train --workdir "$work" "${args[@]}" > "$OUT/$what-$m.out" 2>&1
  status=$?
  end=$(date +%s)
  cp "$work/metrics.jsonl" "$OUT/$what-$m.metrics.jsonl" 2>/dev/null
  python benchmarks/run_summary.py "$work" --name "$what-$m" --rc "$status" \
    --wall-s $((end - start)) >> "$OUT/methods.jsonl" || true
  rm -rf "$work"
done
