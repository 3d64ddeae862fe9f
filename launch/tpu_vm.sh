#!/usr/bin/env bash
# Cloud TPU VMs and pods: create one (on demand, spot, or through a queued resource), install
# jaxssl on every worker, run the same `jaxssl train` on every worker, delete it. jax.distributed
# finds the pod's workers by itself (jaxssl starts it when TPU_WORKER_HOSTNAMES lists several).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh COMMAND [options] [-- TRAIN_ARGS...]

commands:
  create    create the TPU VM (add --spot for a spot VM, --queued to go through a queued
            resource that waits for capacity)
  install   clone this repository's REPO_URL at REF on every worker and pip install '.[tpu]'
  run       run `python -m jaxssl train TRAIN_ARGS...` on every worker at once; after a
            preemption (spot VMs, maintenance) run the same command again: it resumes from the
            last checkpoint in the workdir
  eval      run `python -m jaxssl eval EVAL_ARGS...` on every worker at once (e.g.
            `-- linear --workdir gs://BUCKET/run`)
  status    describe the TPU VM (or the queued resource)
  delete    delete the TPU VM (and the queued resource)

options (or the environment variables in capitals):
  --name NAME          TPU_NAME   (default jaxssl)
  --zone ZONE          TPU_ZONE   (default us-central2-b)
  --type TYPE          TPU_TYPE   accelerator type (default v4-32: a 4-host pod slice)
  --version VERSION    TPU_VERSION runtime (default tpu-ubuntu2204-base)
  --project PROJECT    TPU_PROJECT (default: gcloud's)
  --repo URL           REPO_URL   (default https://github.com/jaxssl/jaxssl)
  --ref REF            REPO_REF   (default main)
  --spot, --queued     for create
  --dry-run            print the gcloud commands instead of running them

The workdir must be one every worker reaches with the same path (best a gs:// bucket, see the
README's "Scaling out"), and the data must be readable on every worker.

example:
  launch/tpu_vm.sh create --type v4-32 --spot
  launch/tpu_vm.sh install
  launch/tpu_vm.sh run -- --config configs/simclr_imagenet.py --workdir gs://BUCKET/simclr \
      --config.data.path=/mnt/imagenet/train --config.data.eval_path=/mnt/imagenet/val
  launch/tpu_vm.sh delete
USAGE
}

command="${1:-}"
[[ -z "$command" ]] && { usage >&2; exit 2; }
shift
[[ "$command" == "-h" || "$command" == "--help" ]] && { usage; exit 0; }
name="${TPU_NAME:-jaxssl}" zone="${TPU_ZONE:-us-central2-b}" type="${TPU_TYPE:-v4-32}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}" project="${TPU_PROJECT:-}"
repo="${REPO_URL:-https://github.com/jaxssl/jaxssl}" ref="${REPO_REF:-main}"
spot=0 queued=0 dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")
gc() { if [[ $dry -eq 1 ]]; then echo "gcloud $*"; else gcloud "$@"; fi; }
on_workers() { gc compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$1"; }

case "$command" in
  create)
    if [[ $queued -eq 1 ]]; then
      extra=(); [[ $spot -eq 1 ]] && extra+=(--spot)
      gc compute tpus queued-resources create "$name" "${common[@]}" --node-id "$name" \
        --accelerator-type "$type" --runtime-version "$version" "${extra[@]}"
    else
      extra=(); [[ $spot -eq 1 ]] && extra+=(--spot)
      gc compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" \
        --version "$version" "${extra[@]}"
    fi ;;
  install)
    on_workers "set -e; [ -d jaxssl ] || git clone $repo jaxssl; cd jaxssl; git fetch -q origin;
      git checkout -q $ref; python3 -m venv .venv; . .venv/bin/activate;
      pip install -q -e '.[tpu]'" ;;
  run)
    [[ $# -eq 0 ]] && { echo "tpu_vm.sh run: give the train arguments after --" >&2; exit 2; }
    on_workers "cd jaxssl && . .venv/bin/activate && python -m jaxssl train $(printf '%q ' "$@")" ;;
  eval)
    [[ $# -eq 0 ]] && { echo "tpu_vm.sh eval: give the eval arguments after --" >&2; exit 2; }
    on_workers "cd jaxssl && . .venv/bin/activate && python -m jaxssl eval $(printf '%q ' "$@")" ;;
  status)
    if [[ $queued -eq 1 ]]; then gc compute tpus queued-resources describe "$name" "${common[@]}"
    else gc compute tpus tpu-vm describe "$name" "${common[@]}"; fi ;;
  delete)
    if [[ $queued -eq 1 ]]; then
      gc compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
    else gc compute tpus tpu-vm delete "$name" "${common[@]}" --quiet; fi ;;
  *) echo "tpu_vm.sh: unknown command $command (see --help)" >&2; exit 2 ;;
esac
