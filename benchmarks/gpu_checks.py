"""Correctness checks on whatever accelerator JAX sees (run before timing anything on it).

    python benchmarks/gpu_checks.py [--tiny]

1. info_nce on the accelerator equals a float64 numpy reference (similarities must not be
   rounded to TF32/bfloat16 by the default matmul precision).
2. A bfloat16 SimCLR step of a CIFAR ResNet-18 keeps a finite loss that falls on a fixed batch.
3. Eval-mode backbone features under jit are finite (XLA:CPU in jax 0.11 was seen to return NaN).
Prints one JSON line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxssl import losses, models, optim, parallel, state, steps  # noqa: E402
from reference import nt_xent  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    ok = True
    device = jax.devices()[0].device_kind

    rng = np.random.default_rng(0)
    n, d = (16, 8) if args.tiny else (512, 128)
    z1, z2 = rng.normal(size=(2, n, d)).astype(np.float32)
    loss = float(jax.jit(functools.partial(losses.info_nce, temperature=0.1))(z1, z2))
    ref = float(nt_xent(z1, z2, 0.1)[0])
    good = abs(loss - ref) <= 1e-5 * abs(ref)
    ok &= good
    print(json.dumps({"check": "info_nce_vs_float64", "device": device, "loss": loss, "ref": ref,
                      "ok": good}), flush=True)

    side, width, batch = (16, 8, 16) if args.tiny else (32, 64, 256)
    bn = parallel.BN_MODES["global"]
    mesh = parallel.make_mesh()
    model = models.create_model("resnet18", cifar_stem=True, width=width, head_hidden_dims=(512,),
                                out_dim=128, zero_init_last_bn=True, dtype=jnp.bfloat16,
                                bn_axis_name=bn.model_axis_name)
    params, bs = models.init_variables(model, jax.random.key(0), (1, side, side, 3))
    tx = optim.make_optimizer("lars", 0.3 * batch / 256, weight_decay=1e-6)
    st = jax.device_put(state.create_train_state(params, bs, tx), parallel.replicated(mesh))
    step = parallel.compile_step(functools.partial(
        steps.simclr_step, apply_fn=models.flax_apply_fn(model), tx=tx, temperature=0.2), mesh)
    x1, x2 = rng.normal(size=(2, batch, side, side, 3)).astype(np.float32)
    views = parallel.host_to_global((x1, x2), mesh)
    history = []
    for _ in range(15):
        st, m = step(st, views, jax.random.key(0))
        history.append(float(m["train/loss"]))
    good = bool(np.all(np.isfinite(history)) and history[-1] < history[0])
    ok &= good
    print(json.dumps({"check": "bf16_step_learns", "losses": [round(h, 4) for h in history],
                      "ok": good}), flush=True)

    feats = jax.jit(lambda p, b, x: models.flax_apply_fn(model)(p, b, x, train=False)[0]["features"])(
        st.params, st.batch_stats, x1)
    good = bool(np.all(np.isfinite(np.asarray(feats))))
    ok &= good
    print(json.dumps({"check": "eval_features_finite", "backend": jax.default_backend(),
                      "ok": good}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
