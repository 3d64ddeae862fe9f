"""Throughput of one compiled SimCLR training step, jaxssl against the same step in PyTorch.

Both frameworks get the same model topology (torchvision ResNet, MLP head 2048 -> 128 with BN),
batch, loss (NT-Xent over 2B views, temperature 0.2), optimizer (SGD, momentum 0.9) and
precision (bfloat16 compute, float32 parameters), on random data already on the device. One
framework per process, so neither holds the other's memory. PyTorch runs channels-last with
cudnn.benchmark on, under torch.compile (default) or eager (--torch-mode eager).

    python benchmarks/step_throughput.py --framework jax --model resnet50
    python benchmarks/step_throughput.py --framework torch --model resnet18_cifar [--torch-mode eager]
    python benchmarks/step_throughput.py --framework jax --model resnet50 --profile runs/prof
    python benchmarks/step_throughput.py --framework jax --model resnet18_cifar --tiny  # CPU smoke

After compiling and warming up, --repeats windows of --steps steps are timed; the median window
counts. With --turn-dir the process waits for its turn before timing, so that several can
compile at once and time alone (benchmarks/gpu_suite.sh). --profile writes a jax.profiler trace
of a few steps after the timing (read it with benchmarks/trace_summary.py).

Prints one JSON line: images/s (an image = its two views, forward and backward), step time of
each window, compile time, peak device memory, and the model-FLOPs utilisation against the
accelerator's bfloat16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODELS = {
    # name: (encoder, cifar_stem, image side, batch)
    "resnet50": ("resnet50", False, 224, 256),
    "resnet18_cifar": ("resnet18", True, 32, 512),
}
# Forward GFLOP per view (multiply-add = 2 FLOPs); training counts 3x (forward + backward).
FORWARD_GFLOP = {"resnet50": 8.2, "resnet18_cifar": 1.11}
# Dense bfloat16 peak, TFLOP/s, by device kind substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
TEMPERATURE = 0.2
LR = 0.1


def bench_jax(args, side, batch, encoder, cifar_stem):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxssl import models, optim, parallel, state, steps

    mesh = parallel.make_mesh()
    bn = parallel.BN_MODES["global"]
    model = models.create_model(
        encoder, cifar_stem=cifar_stem, width=args.width, head_hidden_dims=(2048,), out_dim=128,
        bn_axis_name=bn.model_axis_name, dtype=jnp.bfloat16)
    params, batch_stats = models.init_variables(model, jax.random.key(0), (1, side, side, 3))
    tx = optim.make_optimizer("sgd", LR, momentum=0.9, weight_decay=1e-6)
    st = jax.device_put(state.create_train_state(params, batch_stats, tx), parallel.replicated(mesh))
    augment_fn = None
    rng = np.random.default_rng(0)
    if args.device_augment:
        from jaxssl.data import augment_jax, recipes

        # uint8 images (a little larger than the crop, as stored) augmented inside the step.
        recipe = recipes.get_recipe("simclr_cifar" if cifar_stem else "simclr")
        augment_fn = augment_jax.make_device_augment(recipe, side, (0.5,) * 3, (0.25,) * 3,
                                                     dtype=jnp.bfloat16)
        stored = side if cifar_stem else side * 8 // 7  # 256 px stored for 224 px crops
        views = parallel.host_to_global(
            rng.integers(0, 256, size=(batch, stored, stored, 3), dtype=np.uint8), mesh)
    else:
        views = parallel.host_to_global(
            tuple(rng.normal(size=(2, batch, side, side, 3)).astype(np.float32)), mesh)
    step = parallel.compile_step(functools.partial(
        steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx, temperature=TEMPERATURE,
        average_batch_stats=bn.average_batch_stats, augment_fn=augment_fn), mesh)
    key = jax.random.key(0)
    holder = {"st": st}

    def run(n):
        for _ in range(n):
            holder["st"], m = step(holder["st"], views, key)
        return m

    def sync(m):
        jax.block_until_ready(m)
        return float(m["train/loss"])

    result = timed(args, run, sync)
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_bytes"] = stats.get("peak_bytes_in_use")
    if args.profile:
        result["profile"] = profile_jax(args, run, sync)
    return result, jax.devices()[0].device_kind, jax.__version__


def profile_jax(args, run, sync) -> str:
    """A jax.profiler trace of a few steps (Perfetto JSON, which benchmarks/trace_summary.py
    reads) copied to --profile as <name>.trace.json.gz; returns that path."""
    import glob
    import shutil
    import tempfile

    import jax

    logdir = tempfile.mkdtemp(prefix="jaxssl_trace_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        sync(run(args.profile_steps))
    found = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        return "no perfetto trace written"
    os.makedirs(args.profile, exist_ok=True)
    target = os.path.join(args.profile, f"{args.name or 'jax'}.trace.json.gz")
    shutil.copyfile(found[-1], target)
    shutil.rmtree(logdir, ignore_errors=True)
    return target


def wait_turn(args) -> None:
    """With --turn-dir: say this process is compiled and warm (NAME.ready), then wait for NAME.go
    before timing, so that several processes compile at once and time one after another."""
    if not args.turn_dir:
        return
    ready = os.path.join(args.turn_dir, f"{args.name}.ready")
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(ready + ".tmp", ready)
    go = os.path.join(args.turn_dir, f"{args.name}.go")
    deadline = time.monotonic() + args.turn_timeout
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit(f"no turn ({go}) within {args.turn_timeout} s")
        time.sleep(0.05)


def timed(args, run, sync) -> dict:
    """Compile (the first step), warm up, wait for the turn, warm up again, then time
    args.repeats windows of args.steps steps each; the median window gives images/s."""
    t0 = time.perf_counter()
    sync(run(1))
    compile_s = time.perf_counter() - t0
    sync(run(args.warmup))
    wait_turn(args)
    sync(run(args.warmup))
    windows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = sync(run(args.steps))
        windows.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "windows_s": windows, "final_loss": loss}


def bench_torch(args, side, batch, encoder, cifar_stem):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = getattr(torchvision.models, encoder)(width_per_group=64)
    if args.width != 64:
        raise SystemExit("--width applies to jax only; torchvision ResNets have width 64")
    if cifar_stem:
        backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    features = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(features, 2048, bias=False), nn.BatchNorm1d(2048),
                         nn.ReLU(inplace=True), nn.Linear(2048, 128))
    net = nn.Sequential(backbone, head).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=1e-6)
    # What a PyTorch user tuning for speed sets: cuDNN picks its fastest convolution algorithms.
    torch.backends.cudnn.benchmark = True
    compile_it = args.torch_mode == "compile" if device == "cuda" else args.torch_compile_cpu
    compiled = torch.compile(net) if compile_it else net
    labels = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(device)

    def step(x1, x2):
        with torch.autocast(device, dtype=torch.bfloat16):
            z = compiled(torch.cat([x1, x2]))
        z = F.normalize(z.float(), dim=1)
        sim = z @ z.T / TEMPERATURE
        sim.fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(sim, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    x = torch.randn(2, batch, 3, side, side, device=device)
    x1 = x[0].contiguous(memory_format=torch.channels_last)
    x2 = x[1].contiguous(memory_format=torch.channels_last)

    def run(n):
        loss = None
        for _ in range(n):
            loss = step(x1, x2)
        return loss

    def sync(loss):
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    result = timed(args, run, sync)
    if device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return result, kind, torch.__version__


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--framework", choices=["jax", "torch"], required=True)
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (the median counts)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, help="global batch (default: 256 for ResNet-50, 512 CIFAR)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 steps, small images and width")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--torch-mode", choices=["compile", "eager"], default="compile",
                   help="torch on a GPU: torch.compile (default) or eager")
    p.add_argument("--torch-compile-cpu", action="store_true")
    p.add_argument("--device-augment", action="store_true",
                   help="jax only: uint8 images in, the recipe's augmentation inside the step")
    p.add_argument("--name", default=None, help="this measurement's name (turns, profile files)")
    p.add_argument("--turn-dir", default=None,
                   help="compile and warm up, write TURN_DIR/NAME.ready, wait for TURN_DIR/NAME.go, "
                        "then time (benchmarks/gpu_suite.sh compiles several at once this way)")
    p.add_argument("--turn-timeout", type=float, default=1800.0)
    p.add_argument("--profile", default=None,
                   help="jax only: after timing, write a jax.profiler trace of --profile-steps "
                        "steps to PROFILE/NAME.trace.json.gz (read it with trace_summary.py)")
    p.add_argument("--profile-steps", type=int, default=5)
    args = p.parse_args()
    encoder, cifar_stem, side, batch = MODELS[args.model]
    batch = args.batch or batch
    if args.tiny:
        side, batch, args.steps, args.warmup, args.repeats = 32, 8, 2, 1, 2
        if args.framework == "jax":
            args.width = 8
    if args.turn_dir and not args.name:
        p.error("--turn-dir needs --name")
    bench = bench_jax if args.framework == "jax" else bench_torch
    timing, kind, version = bench(args, side, batch, encoder, cifar_stem)
    windows = sorted(timing["windows_s"])
    step_s = windows[len(windows) // 2] / args.steps
    result = {
        "framework": args.framework, "version": version, "model": args.model, "device": kind,
        "device_augment": bool(args.device_augment),
        "torch_mode": args.torch_mode if args.framework == "torch" else None,
        "batch": batch, "image": side, "steps": args.steps, "repeats": args.repeats,
        "step_ms": round(1000 * step_s, 3),
        "step_ms_windows": [round(1000 * w / args.steps, 3) for w in timing["windows_s"]],
        "images_per_s": round(batch / step_s, 1), "compile_s": round(timing["compile_s"], 1),
        "final_loss": round(timing["final_loss"], 4), "peak_bytes": timing.get("peak_bytes"),
    }
    if args.name:
        result["name"] = args.name
    if timing.get("profile"):
        result["profile"] = timing["profile"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if peak and not args.tiny:
        flops = 3 * FORWARD_GFLOP[args.model] * 1e9 * 2 * batch  # 2 views per image
        result["mfu"] = round(flops / step_s / (peak * 1e12), 4)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
