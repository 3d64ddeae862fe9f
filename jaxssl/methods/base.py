"""What every method shares: the `Method` record, the batch contract, the update scaffolding.

A method's step is `(state, batch, key, **bound) -> (state, metrics)`. Every step here runs the
same sequence, written once:

    views_and_labels  ->  the method's forward and loss, value_and_grad  ->  apply_gradients
    (BatchNorm statistics averaged where per-device, the optimizer, step + 1)  ->  the
    method's own state (EMA, queue)  ->  finish (online probe, gradient norm, metrics)

`jaxssl.evaluate.finetune.finetune_step` uses apply_gradients too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxssl import ema
from jaxssl.losses import _global_rows, l2_normalize
from jaxssl.probe import probe_update

__all__ = ["Method", "example_keys", "unpack", "views_and_labels", "forward_views",
           "apply_gradients", "average_stats", "finish", "global_norm", "momentum_fn",
           "alignment_uniformity", "UNIFORMITY_ROWS", "embedding_std", "two_view_step",
           "momentum_update"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registry entry of `jaxssl.methods.METHODS`.

    name: the registry key, `config.method`.
    title: the method's name in messages ("MoCo v2").
    step: the pure step function, `(state, batch, key, **bound) -> (state, metrics)`.
    bind: `bind(exp) -> step` with every keyword bound from the config (`jaxssl.experiment`'s
      Experiment: exp.config, exp.apply_fn, exp.tx, exp.augment_fn, exp.probe_tx, ...);
      ConfigError for a config it cannot run.
    init_state: `init_state(exp, params, batch_stats) -> method_state` at step 0, or None.
    config_group: `() -> ConfigDict` of the fields under `config.<name>`, or None.
    validate: `validate(config)`: ConfigError (one line) for a value of the method's fields, or
      None.
    predictor: the model gets a predictor MLP (`model.predictor_hidden_dims`).
    contrastive: the step logs alignment and uniformity (`alignment_uniformity`).
    """

    name: str
    title: str
    step: Callable
    bind: Callable
    init_state: Callable | None = None
    config_group: Callable | None = None
    validate: Callable | None = None
    predictor: bool = False
    contrastive: bool = False


# --- the batch contract -------------------------------------------------------------------

def example_keys(key: jax.Array, step: jax.Array, batch_size: int,
                 axis_name: str | None = None) -> jax.Array:
    """One key per local example: fold_in(fold_in(key, step), global example position).

    batch_size is the local batch; under shard_map the global position of local row i is
    axis_index * batch_size + i, so the keys, and hence the augmentations, depend only on the
    root key, the step and the example's place in the global batch, not on how many devices
    share it. Nothing random lives on the host between steps, so a resumed run draws the same
    numbers. Returns [batch_size] keys.
    """
    step_key = jax.random.fold_in(key, step)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
    positions = offset + jnp.arange(batch_size, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, positions)


def unpack(batch):
    """(views or images, labels or None) of a step's batch: the bare views/images, or a dict
    with "views" or "images" and optionally "labels" (int32 [b]), as the pipeline yields."""
    if isinstance(batch, Mapping):
        return (batch["views"] if "views" in batch else batch["images"]), batch.get("labels")
    return batch, None


def views_and_labels(batch, key, step, augment_fn, axis_name):
    """(x1, x2, labels or None) of a step's batch: the two views as given, or augment_fn's
    `(x1, x2)` of the images with one key per local example (`example_keys`)."""
    views, labels = unpack(batch)
    if augment_fn is not None:
        b = jax.tree.leaves(views)[0].shape[0]
        views = augment_fn(views, example_keys(key, step, b, axis_name))
    x1, x2 = views
    if x1.shape != x2.shape:
        raise ValueError(f"the two views must have the same shape; got {x1.shape} and {x2.shape}")
    return x1, x2, labels


def forward_views(apply_fn, params, batch_stats, views, *, train: bool = True):
    """(outputs of each view, the BatchNorm statistics after the last): the views go through
    the network one after the other, each normalised by its own batch statistics, as BYOL,
    SimSiam, Barlow Twins, VICReg and MoCo v3 do (SimCLR encodes both views as one batch)."""
    outputs = []
    for x in views:
        out, batch_stats = apply_fn(params, batch_stats, x, train=train)
        outputs.append(out)
    return outputs, batch_stats


# --- the update -----------------------------------------------------------------------------

def average_stats(batch_stats, axis_name, average_batch_stats: bool):
    """The running BatchNorm statistics averaged over axis_name when BN is per device
    (average_batch_stats), so the state stays identical on every device; else as they are."""
    if axis_name is not None and average_batch_stats:
        return jax.lax.pmean(batch_stats, axis_name)
    return batch_stats


def apply_gradients(state, grads, batch_stats, *, tx: optax.GradientTransformation,
                    axis_name: str | None = None, average_batch_stats: bool = False):
    """The state after one optimizer step: BatchNorm statistics averaged where per-device,
    params updated by tx with the (already global) gradient, step + 1."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=average_stats(batch_stats, axis_name, average_batch_stats),
                         opt_state=opt_state)


def global_norm(tree) -> jax.Array:
    """L2 norm of all leaves together, float32 []."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def finish(state, metrics: dict, grads, *, features=None, labels=None, probe_tx=None,
           axis_name: str | None = None):
    """(state with the online probe stepped, metrics + "train/grad_norm" + the probe's).

    features: the online encoder's backbone features of the rows `labels` belong to (both
    views: labels repeated), or None. Nothing is done for the probe when probe_tx is None.
    """
    metrics = dict(metrics, **{"train/grad_norm": global_norm(grads)})
    if probe_tx is None:
        return state, metrics
    if labels is None or state.probe is None or features is None:
        raise ValueError("the online probe (probe_tx) needs a state with a probe "
                         "(jaxssl.probe.init_probe), batches with \"labels\" and a model "
                         "whose outputs have \"features\"")
    probe, probe_metrics = probe_update(state.probe, features, labels, tx=probe_tx,
                                        axis_name=axis_name)
    return state.replace(probe=probe), {**metrics, **probe_metrics}


def momentum_fn(momentum: float, schedule: str, total_steps: int) -> Callable:
    """step -> EMA momentum from a config group's momentum and momentum_schedule."""
    if schedule == "cosine":
        return ema.cosine_momentum(momentum, total_steps)
    return ema.constant_momentum(momentum)


# --- diagnostics a step logs -----------------------------------------------------------------

UNIFORMITY_ROWS = 8192  # the global rows each row is paired with, at most


def alignment_uniformity(a: jax.Array, b: jax.Array, *, axis_name: str | None = None,
                         t: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """(alignment, uniformity) of Wang & Isola over the global batch, float32 scalars equal
    on every device and equal to one device's on the whole batch.

    a, b: [b, D] the embeddings of the two views that the loss pulls together (row i of each
    is one image). alignment = mean_i ||n(a_i) - n(b_i)||^2; uniformity = log of the mean of
    exp(-t ||n(a_i) - n(a_j)||^2) over pairs i != j of the global batch (`jaxssl.evaluate.
    diagnostics` has the plain versions). Each row is paired with the first UNIFORMITY_ROWS
    rows of the global batch, so the memory stays [b, 8192] for any batch. No gradient.
    """
    a, b = jax.lax.stop_gradient((a, b))
    na, nb = l2_normalize(a), l2_normalize(b)
    align = jnp.mean(jnp.sum(jnp.square(na - nb), axis=1))
    rows, own = _global_rows(na, axis_name)
    rows = rows[:UNIFORMITY_ROWS]
    sq = jnp.maximum(2.0 - 2.0 * jnp.dot(na, rows.T, precision=jax.lax.Precision.HIGHEST), 0.0)
    pair = jnp.arange(rows.shape[0])[None, :] != own[:, None]
    total = jnp.sum(jnp.where(pair, jnp.exp(-t * sq), 0.0))
    count = jnp.sum(pair).astype(total.dtype)
    if axis_name is not None:
        align = jax.lax.pmean(align, axis_name)
        total, count = jax.lax.psum((total, count), axis_name)
    return align.astype(jnp.float32), jnp.log(total / count).astype(jnp.float32)


def embedding_std(z: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The mean over dimensions of the standard deviation over the global batch of the
    L2-normalised embeddings z [b, D]: about 1/sqrt(D) when they spread over the sphere, 0 when
    every image maps to one vector (SimSiam's collapse indicator). float32 [], no gradient."""
    n = l2_normalize(jax.lax.stop_gradient(z))
    mean = jnp.mean(n, axis=0)
    if axis_name is not None:
        mean = jax.lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(n - mean), axis=0)
    if axis_name is not None:
        var = jax.lax.pmean(var, axis_name)
    return jnp.mean(jnp.sqrt(var)).astype(jnp.float32)


# --- the step of the two-view methods ---------------------------------------------------------

def momentum_update(method_state: dict, params, batch_stats, m, axis_name=None,
                    average_batch_stats: bool = False) -> dict:
    """method_state with its EMA encoder moved towards `params` by momentum m and its BatchNorm
    statistics replaced by `batch_stats` (the momentum encoder's own, from its forward pass)."""
    return {**method_state,
            "momentum_params": ema.ema_update(method_state["momentum_params"], params, m),
            "momentum_batch_stats": average_stats(batch_stats, axis_name, average_batch_stats)}


def two_view_step(state, batch, key, *, loss_fn: Callable, apply_fn: Callable,
                  tx: optax.GradientTransformation, momentum_fn: Callable | None = None,
                  axis_name: str | None = None, average_batch_stats: bool = False,
                  augment_fn: Callable | None = None,
                  probe_tx: optax.GradientTransformation | None = None):
    """One update of a method that encodes two views separately (BYOL, SimSiam, Barlow
    Twins, VICReg, MoCo v3).

    loss_fn(online, target) -> (loss, metrics): online is the pair of the trained network's
    outputs for (x1, x2) ("features", "projection", "prediction" where the model has a
    predictor); target the momentum encoder's pair (no gradient) with momentum_fn, else None.
    Every batch statistic in it must be global (the losses' axis_name). With momentum_fn the
    state's method_state holds the EMA encoder ("momentum_params", "momentum_batch_stats"),
    which encodes both views before the update and moves towards the new parameters after it
    with m = momentum_fn(step) (BYOL's order). The online probe sees the features of both views.
    Returns (state, metrics + "train/loss", "train/embedding_std" (`embedding_std` of the
    first view's projections), "train/grad_norm", "train/ema_momentum" with momentum_fn, and
    the probe's).
    """
    x1, x2, labels = views_and_labels(batch, key, state.step, augment_fn, axis_name)
    ms = state.method_state
    target = target_stats = None
    if momentum_fn is not None:
        target, target_stats = forward_views(apply_fn, ms["momentum_params"],
                                             ms["momentum_batch_stats"], (x1, x2))
        target = jax.lax.stop_gradient(target)

    def objective(params):
        online, stats = forward_views(apply_fn, params, state.batch_stats, (x1, x2))
        loss, metrics = loss_fn(online, target)
        features = None
        if "features" in online[0]:
            features = jnp.concatenate([online[0]["features"], online[1]["features"]])
        return loss, (metrics, stats, features, online[0]["projection"])

    (loss, (metrics, stats, features, z1)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    new_state = apply_gradients(state, grads, stats, tx=tx, axis_name=axis_name,
                                average_batch_stats=average_batch_stats)
    metrics = {"train/loss": loss, "train/embedding_std": embedding_std(z1, axis_name), **metrics}
    if momentum_fn is not None:
        m = momentum_fn(state.step)
        new_state = new_state.replace(method_state=momentum_update(
            ms, new_state.params, target_stats, m, axis_name, average_batch_stats))
        metrics["train/ema_momentum"] = jnp.asarray(m, jnp.float32)
    return finish(new_state, metrics, grads, features=features,
                  labels=None if labels is None else jnp.concatenate([labels, labels]),
                  probe_tx=probe_tx, axis_name=axis_name)


def init_momentum_encoder(exp, params, batch_stats) -> dict:
    """`Method.init_state` of a method whose only state is an EMA encoder (BYOL, MoCo v3)."""
    from jaxssl import state as state_lib

    return state_lib.momentum_encoder(params, batch_stats)


def bound(step: Callable, exp, **kwargs) -> Callable:
    """step with the keywords every method takes bound from the Experiment, and kwargs."""
    import functools

    from jaxssl import parallel

    return functools.partial(
        step, apply_fn=exp.apply_fn, tx=exp.tx,
        average_batch_stats=parallel.BN_MODES[exp.config.model.bn].average_batch_stats,
        augment_fn=exp.augment_fn, probe_tx=exp.probe_tx, **kwargs)


def check_momentum_group(group, name: str) -> None:
    """ConfigError for a group's momentum outside [0, 1] or an unknown momentum_schedule."""
    from jaxssl.configuration import _check, _choice

    _choice(f"{name}.momentum_schedule", group.momentum_schedule, ema.MOMENTUM_SCHEDULES)
    _check(0.0 <= group.momentum <= 1.0,
           f"{name}.momentum must lie in [0, 1]; got {group.momentum}")
