"""Linear evaluation (SimCLR / MoCo protocol): a softmax classifier on frozen features.

The backbone's features of the labelled train split are computed once (evaluate/features.py);
a linear classifier is trained on them on the devices with SGD (momentum 0.9, Nesterov) or LARS,
a cosine-decayed learning rate and no weight decay, and scored top-1 / top-5 on the test split.

standardize=True (the default) shifts and scales each feature dimension by the train split's
mean and std, computed once on the devices: an affine-free BatchNorm in eval mode in front of
the classifier (MAE's linear probe has an affine-free BatchNorm there). Feature scales differ by
orders of magnitude between backbones and plain SGD's usable learning rate goes like
1 / |feature|^2; standardised, one learning rate (about 0.1 to 1 for SGD) fits any backbone.
standardize=False is the raw protocol (mean 0, std 1).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxssl.evaluate.topk import label_rank
from jaxssl.optim import make_optimizer, warmup_cosine_schedule
from jaxssl.parallel import DATA_AXIS, put_global

__all__ = ["LinearClassifier", "train_linear_classifier", "evaluate_linear_classifier",
           "predict_logits"]

OPTIMIZERS = ("sgd", "lars")


class LinearClassifier(NamedTuple):
    """logits = ((x - mean) / std) @ weights + bias. A pytree of float32 arrays.

    weights: [F, C], bias: [C], mean: [F], std: [F] (zeros and ones when not standardised).
    """

    weights: jax.Array
    bias: jax.Array
    mean: jax.Array
    std: jax.Array


def _classify(c: LinearClassifier, x):
    x = (x.astype(jnp.float32) - c.mean) / c.std
    return jnp.dot(x, c.weights, precision=jax.lax.Precision.HIGHEST) + c.bias


@jax.jit
def predict_logits(classifier: LinearClassifier, features) -> jax.Array:
    """Logits of features [n, F] (any float dtype): float32 [n, C], where the classifier is."""
    return _classify(classifier, features)


def _check(features, labels, num_classes: int):
    """One-line ValueErrors for arrays of the wrong shape or labels out of [0, num_classes)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    if len(features.shape) != 2 or len(labels.shape) != 1:
        raise ValueError(f"need features [N, F] and labels [N]; got shapes {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
        raise ValueError(f"need as many labels as feature rows (and at least one); got "
                         f"{labels.shape[0]} labels for {features.shape[0]} rows")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}")
    lo, hi = (int(v) for v in jax.device_get((jnp.min(labels), jnp.max(labels))))
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}); got values in [{lo}, {hi}]")


def _placement(mesh: Mesh | None):
    """(rows split over DATA_AXIS, replicated); both the first device when there is no mesh."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return one, one
    return NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())


def _rows_on_devices(x, rows: int, sharding, dtype):
    """x [n, ...] as dtype, zero-padded to `rows` rows, placed with `sharding`."""
    if (isinstance(x, jax.Array) and x.shape[0] == rows and x.dtype == dtype
            and x.sharding.is_equivalent_to(sharding, x.ndim)):
        return x  # already in place: no second copy of a large feature matrix
    if not isinstance(x, jax.Array):  # host values (labels): the same on every process
        x = np.asarray(x).astype(dtype)
        return put_global(np.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)),
                          sharding)
    pad = lambda a: jnp.pad(a.astype(dtype), [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
    return jax.jit(pad, out_shardings=sharding)(x)


def _sharded(fn, mesh, in_specs, out_specs):
    """fn(..., axis_name=None) jitted, or shard_map'd over DATA_AXIS when a mesh is given."""
    if mesh is None:
        return jax.jit(functools.partial(fn, axis_name=None))
    return jax.jit(jax.shard_map(functools.partial(fn, axis_name=DATA_AXIS), mesh=mesh,
                                 in_specs=in_specs, out_specs=out_specs))


def _statistics(features, *, n):
    """Mean and std [F] over the first n rows (the rest is zero padding), two-pass; a constant
    dimension gets std 1. Also whether every feature is finite."""
    valid = (jnp.arange(features.shape[0]) < n)[:, None]
    mean = jnp.sum(features, axis=0) / n
    var = jnp.sum(jnp.where(valid, jnp.square(features - mean), 0.0), axis=0) / n
    std = jnp.sqrt(var)
    return mean, jnp.where(std > 0, std, 1.0), jnp.all(jnp.isfinite(features))


def _epoch(params, opt_state, lrs, root_key, epoch, features, labels, mean, std, *, make_tx, n,
           batch, steps, axis_name, static_lr=None):
    """One epoch: `steps` optimizer steps over a fresh permutation of the n real rows, for K
    classifiers at once (one per learning rate, each its own optimizer; the batches are the
    same for all).

    features: [n_local, F] float32, this device's rows of the zero-padded train features;
    labels: int32 [n_local]; params {"kernel": [K, F, C], "bias": [K, C]}, opt_state (K
    leading) and lrs [K] replicated; make_tx(lr) -> the optimizer at peak learning rate lr.
    static_lr: K is 1 and this is its learning rate, a Python float (no vmap, a constant).
    Returns (params, opt_state, [K, 2] float32: summed cross-entropy and top-1 hits of the epoch).
    """
    n_local = features.shape[0]
    n_dev = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    perm = jax.random.permutation(jax.random.fold_in(root_key, epoch), n)
    # [steps, slots] global row indices, -1 for an empty slot: the rest of the last partial
    # batch (which is masked, not dropped) and the padding that lets a batch split evenly.
    slots = -(-batch // n_dev) * n_dev
    idx = jnp.pad(perm, (0, steps * batch - n), constant_values=-1).reshape(steps, batch)
    idx = jnp.pad(idx, ((0, 0), (0, slots - batch)), constant_values=-1)

    def step(carry, idx):
        params, opt_state = carry
        local = idx - offset
        mine = (idx >= 0) & (local >= 0) & (local < n_local)
        safe = jnp.clip(local, 0, n_local - 1)
        x = jnp.where(mine[:, None], features[safe], 0.0)
        y = jnp.where(mine, labels[safe], 0)
        w = mine.astype(jnp.float32)
        if axis_name is not None:
            # Every row of the batch lives on exactly one device, which put it in its slot; the
            # others put zeros there. The sum is therefore the batch, exactly, and the scatter
            # leaves slots [d * slots / n_dev, (d + 1) * slots / n_dev) on device d.
            x, y, w = (jax.lax.psum_scatter(a, axis_name, tiled=True) for a in (x, y, w))
        count = jnp.sum(idx >= 0)  # real examples in the batch, the same on every device

        def loss_fn(p):
            logits = _classify(LinearClassifier(p["kernel"], p["bias"], mean, std), x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(w * ce) / count, (ce, logits)

        def update(p, o, lr):  # one classifier
            # Under shard_map, the gradient of the replicated params is summed over the devices
            # by the transpose of their implicit broadcast: it is the whole batch's gradient.
            (_, (ce, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
            updates, o = make_tx(lr).update(grads, o, p)
            sums = jnp.stack([jnp.sum(w * ce), jnp.sum(w * (label_rank(logits, y) < 1))])
            return optax.apply_updates(p, updates), o, sums

        if static_lr is not None:  # one classifier: its program as it was before sweeps
            one = jax.tree.map(lambda a: a[0], (params, opt_state))
            params, opt_state, sums = jax.tree.map(lambda a: a[None],
                                                   update(*one, static_lr))
        else:  # vmap's batched products round differently from one classifier's (~1e-7)
            params, opt_state, sums = jax.vmap(update)(params, opt_state, lrs)
        return (params, opt_state), sums

    (params, opt_state), sums = jax.lax.scan(step, (params, opt_state), idx)
    sums = jnp.sum(sums, axis=0)  # [K, 2]
    return params, opt_state, sums if axis_name is None else jax.lax.psum(sums, axis_name)


def train_linear_classifier(
    features, labels, *, num_classes: int, epochs: int, batch_size: int,
    learning_rate: float | Sequence[float], optimizer: str = "sgd", momentum: float = 0.9,
    nesterov: bool = True, standardize: bool = True, seed: int = 0, mesh: Mesh | None = None,
    callback: Callable[[int, dict], None] | None = None,
    num_rows: int | None = None,
) -> LinearClassifier | list[LinearClassifier]:
    """A linear classifier trained on frozen features, on the devices of `mesh`.

    features: [N, F] float (numpy, or a jax.Array, e.g. split over DATA_AXIS); labels: int [N]
    in [0, num_classes). With a mesh the rows are split over DATA_AXIS (zero-padded to a multiple
    of the devices; padding rows are never sampled) and the classifier is replicated; the result
    equals the single-device one (mesh=None) up to float rounding.

    learning_rate: the peak of a cosine decay to 0 over all steps, no warmup, not scaled by the
    batch (the caller decides). A sequence of K learning rates (a sweep) trains K classifiers in
    one program (vmapped over the learning rate: the batches, the features and the passes over
    them are shared) and returns a list of K classifiers; classifier k is the one
    learning_rate[k] alone gives. optimizer: "sgd" (momentum, Nesterov when nesterov) or "lars"
    (SimCLR's: the classifier excluded from layer adaptation, which leaves momentum SGD, never
    Nesterov); no weight decay. Every classifier starts at zero.
    batch_size: clamped to N. Each epoch visits every row once, in the order of
    jax.random.permutation(fold_in(key(seed), epoch), N), in ceil(N / batch) steps; the last
    partial batch is kept, its loss the mean over its real rows.
    standardize: see the module docstring. callback(epoch, {"loss", "top1"}): called after every
    epoch with the mean cross-entropy and top-1 of the epoch's batches, each measured before its
    step's update (floats; lists of K floats for a sweep; this pulls them to the host per epoch).
    num_rows: only the first num_rows rows of features are real (labels has num_rows entries)
    and the rest are zeros, e.g. the padded, device-split output of
    `FeatureExtractor(..., padded=True)`, which is then used without a copy. Default: all rows.
    """
    sweep = isinstance(learning_rate, (tuple, list, np.ndarray))
    lrs = [float(v) for v in (learning_rate if sweep else [learning_rate])]
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
    if epochs < 1 or batch_size < 1 or not lrs or not all(lr >= 0 for lr in lrs):
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and every learning_rate >= 0; got "
                         f"epochs={epochs}, batch_size={batch_size}, learning_rate={learning_rate}")
    if num_rows is not None:
        if not 0 < num_rows <= features.shape[0]:
            raise ValueError(f"num_rows must lie in [1, {features.shape[0]}] (the feature rows); "
                             f"got {num_rows}")
        _check(features[:1], labels[:1], num_classes)  # shapes and dtypes
        _check(np.zeros((len(labels), 1)), labels, num_classes)  # labels
        if len(labels) != num_rows:
            raise ValueError(f"need one label per real row; got {len(labels)} labels for "
                             f"num_rows={num_rows}")
    else:
        _check(features, labels, num_classes)
    n, dim = (num_rows or features.shape[0]), features.shape[1]
    batch = min(batch_size, n)
    steps = math.ceil(n / batch)
    n_dev = 1 if mesh is None else mesh.shape[DATA_AXIS]
    rows = math.ceil(max(n, features.shape[0]) / n_dev) * n_dev
    split, replicated = _placement(mesh)
    x = _rows_on_devices(features, rows, split, jnp.float32)
    y = _rows_on_devices(labels, rows, split, jnp.int32)
    mean, std, finite = jax.jit(functools.partial(_statistics, n=n), out_shardings=replicated)(x)
    if not bool(finite):
        raise ValueError("the features contain NaN or infinite values")
    if not standardize:
        mean, std = put_global((np.zeros(dim, np.float32), np.ones(dim, np.float32)), replicated)

    decay = optax.cosine_decay_schedule(1.0, epochs * steps)

    def make_tx(lr):
        # warmup_cosine_schedule(lr, 0, total) is lr x decay(count), the same values; optax's
        # schedules refuse a traced peak, and vmap over the learning rates traces it.
        schedule = (warmup_cosine_schedule(lr, 0, epochs * steps) if isinstance(lr, float)
                    else lambda count: lr * decay(count))
        if optimizer == "lars":
            # As SimCLR's linear evaluation: LARS with the classifier excluded from layer
            # adaptation (and from weight decay). A trust ratio on a zero-initialised head would
            # scale every update by 1e-3 x its tiny norm and all but freeze it; without one, LARS
            # is momentum SGD (never Nesterov).
            return optax.lars(schedule, weight_decay=0.0, momentum=momentum, nesterov=False,
                              trust_ratio_mask=lambda p: jax.tree.map(lambda _: False, p))
        return make_optimizer("sgd", schedule, weight_decay=0.0, momentum=momentum,
                              nesterov=nesterov)

    k = len(lrs)
    # Made by a program without inputs: its outputs may live on devices of other processes.
    params, root_key, lr_array = jax.jit(lambda: (
        {"kernel": jnp.zeros((k, dim, num_classes), jnp.float32),
         "bias": jnp.zeros((k, num_classes), jnp.float32)}, jax.random.key(seed),
        jnp.asarray(lrs, jnp.float32)), out_shardings=replicated)()
    opt_state = jax.jit(jax.vmap(lambda p, lr: make_tx(lr).init(p)),
                        out_shardings=replicated)(params, lr_array)
    epoch_fn = _sharded(
        functools.partial(_epoch, make_tx=make_tx, n=n, batch=batch, steps=steps,
                          static_lr=None if sweep else lrs[0]), mesh,
        in_specs=(P(), P(), P(), P(), P(), P(DATA_AXIS), P(DATA_AXIS), P(), P()),
        out_specs=(P(), P(), P()))
    for epoch in range(epochs):
        params, opt_state, sums = epoch_fn(params, opt_state, lr_array, root_key,
                                           jnp.int32(epoch), x, y, mean, std)
        if callback is not None:
            loss, hits = (np.asarray(sums, np.float64) / n).T
            callback(epoch, {"loss": [float(v) for v in loss], "top1": [float(v) for v in hits]}
                     if sweep else {"loss": float(loss[0]), "top1": float(hits[0])})
    classifiers = [LinearClassifier(weights=params["kernel"][i], bias=params["bias"][i],
                                    mean=mean, std=std) for i in range(k)]
    return classifiers if sweep else classifiers[0]


def _eval_sums(classifier, features, labels, *, n, chunk, ks, axis_name):
    """[1 + len(ks)] float32: summed cross-entropy and top-k hits of this device's real rows."""
    n_local = features.shape[0]
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * n_local
    valid = (offset + jnp.arange(n_local) < n).astype(jnp.float32)

    def one_chunk(args):
        x, y, v = args
        logits = _classify(classifier, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        rank = label_rank(logits, y)
        return jnp.stack([jnp.sum(v * ce)] + [jnp.sum(v * (rank < k)) for k in ks])

    split = lambda a: a.reshape((n_local // chunk, chunk) + a.shape[1:])
    sums = jnp.sum(jax.lax.map(one_chunk, (split(features), split(labels), split(valid))), axis=0)
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def evaluate_linear_classifier(
    classifier: LinearClassifier, features, labels, *, topk: Sequence[int] = (1, 5),
    mesh: Mesh | None = None, chunk_size: int = 4096,
) -> dict[str, float]:
    """{"loss": mean cross-entropy, "top1": fraction, "top5": ...} over features [M, F] float,
    labels int [M] in [0, C).

    A label is in the top k when fewer than k classes score strictly higher (so k >= C gives
    1.0). With a mesh the rows are split over DATA_AXIS; each device scores its rows in chunks of
    at most chunk_size, so the [chunk, C] logits are all that is ever materialised.
    """
    num_classes = classifier.weights.shape[1]
    _check(features, labels, num_classes)
    if features.shape[1] != classifier.weights.shape[0]:
        raise ValueError(f"the classifier takes {classifier.weights.shape[0]}-d features; got "
                         f"{features.shape[1]}-d")
    ks = tuple(int(k) for k in topk)
    if any(k < 1 for k in ks) or chunk_size < 1:
        raise ValueError(f"need every k >= 1 and chunk_size >= 1; got topk={topk}, "
                         f"chunk_size={chunk_size}")
    m = features.shape[0]
    n_dev = 1 if mesh is None else mesh.shape[DATA_AXIS]
    per_device = math.ceil(m / n_dev)
    chunks = math.ceil(per_device / chunk_size)
    chunk = math.ceil(per_device / chunks)  # as even as possible: little padding
    rows = chunks * chunk * n_dev
    split, replicated = _placement(mesh)
    x = _rows_on_devices(features, rows, split, jnp.float32)
    y = _rows_on_devices(labels, rows, split, jnp.int32)
    classifier = put_global(LinearClassifier(*classifier), replicated)
    fn = _sharded(functools.partial(_eval_sums, n=m, chunk=chunk, ks=ks), mesh,
                  in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)), out_specs=P())
    sums = np.asarray(fn(classifier, x, y), np.float64) / m
    return {"loss": float(sums[0]), **{f"top{k}": float(s) for k, s in zip(ks, sums[1:])}}
