#!/usr/bin/env bash
# N jaxssl processes on this machine's CPU, joined by jax.distributed: the test bed of multi-host
# training (each process gets its own fake CPU devices, collectives go over gloo on localhost).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES] [-p PORT] [-l LOGDIR] [--]
                                   [train|eval] ARGS...

Starts PROCESSES (default 2) copies of `python -m jaxssl train ARGS...` (or `eval ARGS...`) on
this machine, each with DEVICES (default 4) fake CPU devices, coordinated at localhost:PORT
(default 12355).
Process 0 prints progress and writes the logs; what the others print goes to
LOGDIR/jaxssl_process_<i>.log (LOGDIR default /tmp). Ctrl-C or SIGTERM is passed to every process: all of them save
the same step and exit; running the same command again resumes.

example:
  launch/local_multiprocess.sh -n 2 -d 4 -- --config configs/demo.py --workdir runs/mp \
      --config.num_steps=50
  launch/local_multiprocess.sh -n 2 -d 4 -- eval linear --workdir runs/mp
USAGE
}

processes=2 devices=4 port=12355 logdir=/tmp
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n) processes="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    -l) logdir="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
command=train
if [[ "$1" == train || "$1" == eval ]]; then command="$1"; shift; fi
python="${PYTHON:-python3}"

# The caller's other XLA flags are kept; its device count is replaced by -d's.
xla_flags="--xla_force_host_platform_device_count=${devices}"
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || xla_flags+=" $flag"
done

pids=()
forward() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap forward INT TERM
for ((i = 0; i < processes; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" \
    "$python" -m jaxssl "$command" --coordinator "localhost:${port}" --num_processes "$processes" \
    --process_id "$i" "$@" \
    > >(if [[ $i -eq 0 ]]; then cat; else cat > "${logdir}/jaxssl_process_${i}.log"; fi) 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$((status ? status : $?))
done
exit "$status"
