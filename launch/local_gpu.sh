#!/usr/bin/env bash
# jaxssl on the GPUs of this machine: one process sees them all (a mesh over every local GPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local_gpu.sh [--gpus LIST] [--] TRAIN_ARGS...

Runs `python -m jaxssl train TRAIN_ARGS...` in one process over the local GPUs (all of them, or
the comma-separated LIST, e.g. --gpus 0,1). Needs jax with CUDA: pip install -e '.[cuda12]'.
TensorFlow (the host data path) is kept off the GPUs by jaxssl itself; JAX takes 90% of each
GPU's memory at start unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.

example:
  launch/local_gpu.sh --gpus 0 -- --config configs/simclr_cifar10.py --workdir runs/cifar
USAGE
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpus) export CUDA_VISIBLE_DEVICES="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec "${PYTHON:-python3}" -m jaxssl train "$@"
