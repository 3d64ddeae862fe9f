"""`jaxssl train --dry-run`: build what a run builds, compile its step, report, and stop.

`report(config, mesh)` validates the config, loads the sources (their index only: no pass over
the data), builds the model, optimizer and augmentation (`experiment.build`) and lowers and
compiles the run's train step (`experiment.compiled_step`) for the abstract state and batch:
`jax.eval_shape` of `experiment.initial_state` and `pipeline.batch_spec`, with the shardings a
run gives them. No parameter is initialised and no batch is read, so a ResNet-50 at batch 4096
costs only its compilation. The report holds the parameter counts, the schedule, XLA's memory
analysis of the step per device and the device memory it is compared with, and XLA's estimate
of the FLOPs of a step. `format_report` writes it for people. Nothing here touches a workdir.

The step is compiled for the mesh it is given: this machine's devices, or `cpu_devices(n)`, N
CPU devices standing in for a larger machine (the same program, partitioned the same way, so
its shapes, its per-device batch and its parameter and optimizer bytes are exact; its
temporaries are XLA:CPU's, whose fusions and layouts differ from a GPU's or TPU's).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, TextIO

import jax
import ml_collections

from jaxssl import configuration, experiment, parallel
from jaxssl.configuration import ConfigError
from jaxssl.data import pipeline

__all__ = ["cpu_devices", "report", "format_report", "dry_run", "parameter_counts",
           "step_memory", "step_flops"]

# XLA's CompiledMemoryStats fields (bytes per device) -> the report's names.
_MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",  # inputs: the state, this device's rows, the key
    "output": "output_size_in_bytes",  # the new state and the metrics
    "alias": "alias_size_in_bytes",  # outputs written into donated inputs (the state)
    "temp": "temp_size_in_bytes",  # activations kept for the backward pass, gradients, ...
    "generated_code": "generated_code_size_in_bytes",
}


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another jax: take the devices it has
        return True


def cpu_devices(n: int) -> list:
    """n devices to compile for, standing in for a machine with n accelerators.

    Before JAX has started its backends (the command line), JAX is made to start with n CPU
    devices and no accelerator. After (a process that used JAX already), the first n of its
    devices, or ConfigError when it has fewer.
    """
    if n < 1:
        raise ConfigError(f"--dry_run_devices must be at least 1, got {n}")
    if not _backends_started():
        jax.config.update("jax_platforms", "cpu")
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except AttributeError:  # a jax without the option reads the XLA flag when it starts
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={n}").strip()
    devices = jax.devices()
    if len(devices) < n:
        raise ConfigError(
            f"--dry_run_devices {n}: JAX has already started with {len(devices)} "
            f"{devices[0].platform} device(s) in this process; run the dry run in a new process, "
            f"or start it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "JAX_PLATFORMS=cpu")
    return devices[:n]


def parameter_counts(params: Any) -> dict[str, int]:
    """{"backbone", "head", ("predictor"), "total"}: the number of trainable values of each
    part of a ContrastiveModel's params (arrays or ShapeDtypeStructs)."""
    size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    counts = {name: size(part) for name, part in params.items()}
    counts["total"] = size(params)
    return counts


def step_memory(compiled) -> dict[str, int] | None:
    """Bytes per device of a compiled step from XLA's memory analysis: argument, output, alias,
    temp, generated_code, total (what the device holds while the step runs: arguments +
    outputs - aliased outputs + temporaries + code), and xla_peak where XLA gives one (else
    None). None when the backend gives no analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend or version gives one
        stats = None
    if stats is None:
        return None
    out = {name: int(getattr(stats, field, 0) or 0) for name, field in _MEMORY_FIELDS.items()}
    out["total"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                    + out["generated_code"])
    out["xla_peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0) or None
    return out


def step_flops(compiled) -> float | None:
    """XLA's estimate of the FLOPs of one device's program (the shard_map body after
    partitioning), or None. cost_analysis() is a dict on recent jax, a list of dicts (one per
    program) on older ones."""
    try:
        costs = compiled.cost_analysis()
    except Exception:  # not every backend or version gives one
        return None
    if isinstance(costs, dict):
        costs = [costs]
    flops = sum(float(c.get("flops", 0.0)) for c in costs or () if isinstance(c, dict))
    return flops if flops > 0 else None


def _device_memory(devices: list, stand_in: bool) -> tuple[int | None, str]:
    """(bytes one device may use, or None when unknown; what that figure is)."""
    device = devices[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented on every platform
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory limit"
    if stand_in:
        return None, ("the step was compiled for CPU devices standing in for the "
                      "accelerators: compare the total with one accelerator's memory")
    if device.platform == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None, "the host's memory could not be read"
        local = jax.local_device_count()
        return ram // local, (f"the host's {_bytes(ram)} of memory, shared by {local} CPU "
                              "device(s)")
    return None, f"{device.platform} gives no memory limit"


def _abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def report(config: ml_collections.ConfigDict, mesh, *, stand_in: bool = False) -> dict:
    """Everything a run of `config` on `mesh` builds, its step compiled; see the module
    docstring. ConfigError (one line) for what the run would refuse. stand_in: the mesh's
    devices are CPUs standing in for accelerators (their memory is then unknown)."""
    configuration.validate(config)
    exp = experiment.build(config, mesh, with_eval=config.eval.knn)
    d = config.data
    n_dev = mesh.shape[parallel.DATA_AXIS]
    replicated, split = parallel.replicated(mesh), parallel.data_sharded(mesh)
    state = _abstract(jax.eval_shape(lambda: experiment.initial_state(exp)), replicated)
    try:
        spec = pipeline.batch_spec(exp.train_source, global_batch=config.batch_size,
                                   mode=d.augment, out_size=d.out_size,
                                   image_size=d.image_size or None)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    batch = _abstract({f: spec[f] for f in experiment.batch_fields(exp)}, split)
    key = _abstract(jax.eval_shape(lambda: jax.random.key(config.seed)), replicated)
    t0 = time.perf_counter()
    compiled = experiment.compiled_step(exp).lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t0

    memory = step_memory(compiled)
    limit, limit_note = _device_memory(list(mesh.devices.flat), stand_in)
    fits = None if memory is None or limit is None else memory["total"] <= limit
    flops = step_flops(compiled)
    step_total = None if flops is None else flops * n_dev  # each device runs its own rows
    probe = state.probe
    return {
        "method": config.method, "encoder": config.model.encoder, "width": config.model.width,
        "data": exp.train_source.name, "num_examples": exp.train_source.num_examples,
        "devices": n_dev, "platform": mesh.devices.flat[0].platform, "stand_in": stand_in,
        "batch_size": config.batch_size, "per_device_batch": config.batch_size // n_dev,
        "steps": exp.total_steps, "steps_per_epoch": exp.steps_per_epoch,
        "epochs": exp.total_steps / exp.steps_per_epoch,
        "images_seen": exp.total_steps * config.batch_size,
        "params": parameter_counts(state.params),
        "probe_params": None if probe is None else parameter_counts(probe.params)["total"],
        "memory": memory, "device_memory": limit, "device_memory_note": limit_note,
        "fits": fits,
        "flops_per_device": flops, "flops_per_step": step_total,
        "flops_per_image": None if step_total is None else step_total / config.batch_size,
        "compile_seconds": compile_s,
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def format_report(r: dict) -> str:
    """The report as lines for people (no trailing newline)."""
    p = r["params"]
    parts = ", ".join(f"{k} {v:,}" for k, v in p.items() if k != "total")
    probe = f" (and the online probe's {r['probe_params']:,})" if r["probe_params"] else ""
    devices = (f"{r['devices']} CPU devices standing in for the accelerators" if r["stand_in"]
               else f"{r['devices']} {r['platform']} device(s)")
    lines = [
        f"dry run of {configuration.METHODS[r['method']]}, {r['encoder']} (width {r['width']}) "
        f"on {r['data']} ({r['num_examples']:,} images): nothing trained, no workdir touched",
        f"devices: {devices}; batch {r['batch_size']:,} ({r['per_device_batch']:,} per device)",
        f"parameters (trainable): {parts}; total {p['total']:,}{probe}",
        f"schedule: {r['steps']:,} steps of {r['steps_per_epoch']:,} per epoch = "
        f"{r['epochs']:.4g} epochs; {r['images_seen']:,} images seen",
    ]
    m = r["memory"]
    if m is None:
        lines.append("memory per device: XLA gives no memory analysis on this backend")
    else:
        # XLA:CPU's peak leaves out the temporaries: shown for the accelerators only.
        peak = (f"; XLA's peak {_bytes(m['xla_peak'])}"
                if m["xla_peak"] and r["platform"] != "cpu" else "")
        lines.append(
            f"memory per device (XLA): arguments {_bytes(m['argument'])}, outputs "
            f"{_bytes(m['output'])} ({_bytes(m['alias'])} of them in the donated state), "
            f"temporaries {_bytes(m['temp'])}, code {_bytes(m['generated_code'])}: total "
            f"{_bytes(m['total'])}{peak}")
    limit = r["device_memory"]
    if r["fits"] is None:
        lines.append(f"fits: unknown ({r['device_memory_note']})")
    else:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"{verdict}: needs {_bytes(m['total'])} of {_bytes(limit)} per device "
                     f"({m['total'] / limit:.0%}; {r['device_memory_note']})")
    if r["flops_per_step"] is None:
        lines.append("compute: XLA gives no FLOP estimate on this backend")
    else:
        lines.append(f"compute (XLA's estimate): {_flops(r['flops_per_step'])} per step, "
                     f"{_flops(r['flops_per_image'])} per image, "
                     f"{_flops(r['flops_per_device'])} per device per step")
    lines.append(f"step compiled in {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def dry_run(config: ml_collections.ConfigDict, *, devices: int | None = None,
            stream: TextIO | None = None) -> int:
    """`jaxssl train --dry-run`: the report of `config` on this machine's devices (or on
    `devices` CPU devices standing in for a larger machine) printed on `stream` (stdout).
    Returns the exit status: 0, or 1 when the step does not fit the device memory. ConfigError
    (one line) for what the run would refuse."""
    import sys

    stream = stream or sys.stdout
    stand_in = devices is not None
    mesh = parallel.make_mesh(cpu_devices(devices) if stand_in else None)
    stand_in = stand_in and mesh.devices.flat[0].platform == "cpu"
    r = report(config, mesh, stand_in=stand_in)
    if jax.process_index() == 0:
        print(format_report(r), file=stream, flush=True)
    return 1 if r["fits"] is False else 0
