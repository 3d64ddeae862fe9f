"""The linear evaluation classifier against float64 numpy, on 1 and on 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from jaxssl import parallel
from jaxssl.evaluate import linear


def _clusters(n, c=10, f=32, spread=1.0, seed=0):
    """Gaussian classes around well separated centres, with an arbitrary scale and offset."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.random.default_rng(99).normal(size=(c, f))
    y = rng.integers(0, c, n)
    x = centres[y] + spread * rng.normal(size=(n, f))
    return (30.0 * x + 5.0).astype(np.float32), y


def _softmax_grads(w, b, x, y):
    """Gradients of the mean softmax cross-entropy (float64) with respect to w [F, C] and b [C]."""
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return x.T @ p / len(y), p.mean(axis=0)


def _reference_sgd(x, y, c, *, epochs, batch, lr, momentum, standardize, seed):
    """The documented protocol in float64: permutation per epoch, masked last batch, cosine
    lr without warmup, (Nesterov) momentum as optax's trace, standardisation by mean/std."""
    x = np.asarray(x, np.float64)
    if standardize:
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    n = len(y)
    steps = -(-n // batch)
    params = [np.zeros((x.shape[1], c)), np.zeros(c)]
    trace = [np.zeros_like(p) for p in params]
    t = 0
    for epoch in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), n))
        for s in range(steps):
            rows = perm[s * batch:(s + 1) * batch]
            grads = _softmax_grads(*params, x[rows], y[rows])
            rate = lr * 0.5 * (1 + np.cos(np.pi * t / (epochs * steps)))
            for i, g in enumerate(grads):
                trace[i] = g + momentum * trace[i]
                params[i] = params[i] - rate * (g + momentum * trace[i] if momentum else g)
            t += 1
    return params


@pytest.mark.parametrize("optimizer,standardize,lr", [("sgd", True, 0.5), ("sgd", False, 1e-4),
                                                      ("lars", True, 1.0)])
def test_separable_classes_are_learned(optimizer, standardize, lr):
    x, y = _clusters(2000)
    xt, yt = _clusters(1000, seed=1)
    history = []
    clf = linear.train_linear_classifier(
        x, y, num_classes=10, epochs=4, batch_size=128, learning_rate=lr, optimizer=optimizer,
        standardize=standardize, callback=lambda e, m: history.append((e, m)))
    result = linear.evaluate_linear_classifier(clf, xt, yt)
    assert result["top1"] >= 0.99 and result["top5"] == 1.0
    assert result["loss"] < 0.1
    assert [e for e, _ in history] == [0, 1, 2, 3]
    assert history[-1][1]["top1"] >= 0.99 and history[-1][1]["loss"] < history[0][1]["loss"]


def test_random_labels_give_chance_on_the_test_split():
    rng = np.random.default_rng(0)
    c, f = 10, 32
    x, y = rng.normal(size=(1000, f)).astype(np.float32), rng.integers(0, c, 1000)
    xt, yt = rng.normal(size=(4000, f)).astype(np.float32), rng.integers(0, c, 4000)
    history = []
    clf = linear.train_linear_classifier(x, y, num_classes=c, epochs=20, batch_size=100,
                                         learning_rate=1.0, callback=lambda e, m: history.append(m))
    result = linear.evaluate_linear_classifier(clf, xt, yt)
    se1, se5 = np.sqrt(0.1 * 0.9 / 4000), np.sqrt(0.5 * 0.5 / 4000)
    assert abs(result["top1"] - 0.1) < 4 * se1
    assert abs(result["top5"] - 0.5) < 4 * se5
    # The classifier fits noise in the train split (330 parameters, 1000 rows).
    assert history[-1]["top1"] > 0.1 + 10 * se1
    assert linear.evaluate_linear_classifier(clf, x, y)["top1"] > 0.1 + 10 * se1


@pytest.mark.parametrize("batch_size", [37, 1000])  # 1000 > N: clamped to a full batch
def test_full_batch_sgd_equals_numpy(batch_size):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(37, 5)).astype(np.float32), rng.integers(0, 4, 37)
    # Two steps: the second starts from non-zero weights (a real softmax) at half the lr (cosine).
    clf = linear.train_linear_classifier(x, y, num_classes=4, epochs=2, batch_size=batch_size,
                                         learning_rate=0.3, momentum=0.0, standardize=False)
    w, b = _reference_sgd(x, y, 4, epochs=2, batch=37, lr=0.3, momentum=0.0, standardize=False,
                          seed=0)
    np.testing.assert_allclose(clf.weights, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(clf.bias, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(clf.mean, 0.0)
    np.testing.assert_array_equal(clf.std, 1.0)


def test_minibatch_nesterov_standardised_equals_numpy():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(23, 6)) * [1, 10, 100, 0.1, 3, 7] + 50).astype(np.float32)
    y = rng.integers(0, 3, 23)
    # 23 rows in batches of 8: 8, 8 and a masked partial batch of 7 per epoch.
    clf = linear.train_linear_classifier(x, y, num_classes=3, epochs=3, batch_size=8,
                                         learning_rate=0.2, momentum=0.9, seed=5)
    w, b = _reference_sgd(x, y, 3, epochs=3, batch=8, lr=0.2, momentum=0.9, standardize=True,
                          seed=5)
    np.testing.assert_allclose(clf.mean, x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(clf.std, x.astype(np.float64).std(0), rtol=1e-4)
    np.testing.assert_allclose(clf.weights, w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(clf.bias, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n,optimizer,presharded", [(203, "sgd", False), (200, "lars", True)])
def test_sharded_on_8_devices_equals_one_device(n, optimizer, presharded):
    mesh = parallel.make_mesh()
    x, y = _clusters(n, c=5, f=16, spread=4.0)
    xt, yt = _clusters(61, c=5, f=16, spread=4.0, seed=1)
    kwargs = dict(num_classes=5, epochs=3, batch_size=32, learning_rate=0.5,
                  optimizer=optimizer, seed=3)  # 203 = 6 batches of 32 and one of 11
    runs = {}
    for name, m in [("none", None), ("one", parallel.make_mesh(jax.devices()[:1])), ("eight", mesh)]:
        xs, ys = x, y
        if presharded and m is not None:
            xs, ys = jax.device_put((x, y), parallel.data_sharded(m))
        history = []
        clf = linear.train_linear_classifier(xs, ys, mesh=m, callback=lambda e, r: history.append(r),
                                             **kwargs)
        runs[name] = (clf, history, linear.evaluate_linear_classifier(clf, xt, yt, mesh=m,
                                                                     chunk_size=4))
    ref_clf, ref_history, ref_eval = runs["none"]
    assert 0.3 < ref_eval["top1"] < 1.0  # overlapping classes: the comparison is not trivial
    for name in ("one", "eight"):
        clf, history, result = runs[name]
        for got, want in zip(clf, ref_clf):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
        for got, want in zip(history, ref_history):
            assert got["top1"] == want["top1"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert result["top1"] == ref_eval["top1"] and result["top5"] == ref_eval["top5"]
        assert result["loss"] == pytest.approx(ref_eval["loss"], rel=1e-5)
    eight = runs["eight"][0]
    assert eight.weights.sharding.is_fully_replicated
    # A classifier trained on the mesh scores (and predicts) on one device too.
    assert linear.evaluate_linear_classifier(eight, xt, yt)["top1"] == ref_eval["top1"]
    np.testing.assert_allclose(linear.predict_logits(eight, xt), linear.predict_logits(ref_clf, xt),
                               rtol=1e-4, atol=1e-4)


def _numpy_eval(clf, x, y, ks):
    z = ((x - clf.mean) / clf.std).astype(np.float64) @ np.asarray(clf.weights, np.float64)
    z += np.asarray(clf.bias, np.float64)
    lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
    order = np.argsort(-z, axis=1)
    out = {"loss": np.mean(lse - z[np.arange(len(y)), y])}
    for k in ks:
        out[f"top{k}"] = np.mean([y[i] in order[i, :k] for i in range(len(y))])
    return out


@pytest.mark.parametrize("use_mesh", [False, True])
def test_evaluate_matches_numpy_on_random_logits(use_mesh):
    rng = np.random.default_rng(3)
    c, f, m = 7, 9, 101  # 101 rows in chunks of at most 16: several chunks and padding
    clf = linear.LinearClassifier(*(np.asarray(a, np.float32) for a in (
        rng.normal(size=(f, c)), rng.normal(size=c), rng.normal(size=f), rng.uniform(0.5, 2, f))))
    x, y = rng.normal(size=(m, f)).astype(np.float32), rng.integers(0, c, m)
    ks = (1, 2, 5, 7, 10)
    got = linear.evaluate_linear_classifier(clf, x, y, topk=ks, chunk_size=16,
                                            mesh=parallel.make_mesh() if use_mesh else None)
    want = _numpy_eval(clf, x, y, ks)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert got["top7"] == got["top10"] == 1.0 and got["top1"] < got["top2"] < got["top5"] < 1.0
    np.testing.assert_allclose(linear.predict_logits(clf, x),
                               ((x - clf.mean) / clf.std) @ clf.weights + clf.bias, rtol=1e-5, atol=1e-5)


def test_evaluate_hand_example():
    eye = linear.LinearClassifier(np.eye(3, dtype=np.float32), np.zeros(3, np.float32),
                                  np.zeros(3, np.float32), np.ones(3, np.float32))
    x = np.array([[3, 1, 2], [0, 5, 1]], np.float32)
    # Row 0: label 2 is second (rank 1); row 1: label 0 is third (rank 2).
    got = linear.evaluate_linear_classifier(eye, x, np.array([2, 0]), topk=(1, 2, 3))
    assert (got["top1"], got["top2"], got["top3"]) == (0.0, 0.5, 1.0)
    lse = np.log(np.exp(x.astype(np.float64)).sum(1))
    assert got["loss"] == pytest.approx(np.mean(lse - [2, 0]), rel=1e-6)


def test_same_seed_same_weights_other_seed_differs():
    x, y = _clusters(150, c=4, f=8, spread=3.0)
    kwargs = dict(num_classes=4, epochs=2, batch_size=16, learning_rate=0.5)
    a = linear.train_linear_classifier(x, y, seed=7, **kwargs)
    b = linear.train_linear_classifier(x, y, seed=7, **kwargs)
    c = linear.train_linear_classifier(x, y, seed=8, **kwargs)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert not np.allclose(a.weights, c.weights, rtol=1e-3)


_X, _Y = _clusters(20, c=3, f=4)
_TRAIN = dict(num_classes=3, epochs=1, batch_size=4, learning_rate=0.1)


@pytest.mark.parametrize("args,kwargs,match", [
    ((_X, _Y + 1), {}, r"labels must lie in \[0, 3\); got values in \[1, 3\]"),
    ((_X, _Y - 1), {}, r"in \[-1, 1\]"),
    ((_X, _Y[:-1]), {}, "19 labels for 20 rows"),
    ((_X[:0], _Y[:0]), {}, "at least one"),
    ((_X[None], _Y), {}, r"need features \[N, F\]"),
    ((_X, _Y.astype(np.float32)), {}, "labels must be integers"),
    ((_X, _Y), {"epochs": 0}, "epochs >= 1"),
    ((_X, _Y), {"batch_size": 0}, "batch_size >= 1"),
    ((_X, _Y), {"learning_rate": -1.0}, "learning_rate >= 0"),
    ((_X, _Y), {"num_classes": 1}, "num_classes must be >= 2"),
    ((_X, _Y), {"optimizer": "adam"}, "unknown optimizer 'adam'"),
    ((np.where(np.arange(20)[:, None] == 3, np.nan, _X), _Y), {}, "NaN or infinite"),
])
def test_bad_training_inputs_raise_one_line(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        linear.train_linear_classifier(*args, **{**_TRAIN, **kwargs})
    assert "\n" not in str(info.value)


def test_bad_evaluation_inputs_raise_one_line():
    clf = linear.train_linear_classifier(_X, _Y, **_TRAIN)
    for args, kwargs, match in [((_X[:, :3], _Y), {}, "takes 4-d features; got 3-d"),
                                ((_X, _Y + 3), {}, r"labels must lie in \[0, 3\)"),
                                ((_X, _Y), {"topk": (0,)}, "every k >= 1"),
                                ((_X, _Y), {"chunk_size": 0}, "chunk_size >= 1")]:
        with pytest.raises(ValueError, match=match) as info:
            linear.evaluate_linear_classifier(clf, *args, **kwargs)
        assert "\n" not in str(info.value)


def test_zero_padded_rows_with_num_rows_equal_the_exact_features():
    """Features padded with zero rows (FeatureExtractor(padded=True)) and num_rows: the padding
    is never sampled and does not enter the standardisation statistics."""
    mesh = parallel.make_mesh()
    x, y = _clusters(203, c=5, f=16, spread=4.0)
    padded = jax.device_put(np.pad(x, ((0, 13), (0, 0))), parallel.data_sharded(mesh))
    kwargs = dict(num_classes=5, epochs=2, batch_size=32, learning_rate=0.5, seed=3, mesh=mesh)
    exact = linear.train_linear_classifier(x, y, **kwargs)
    got = linear.train_linear_classifier(padded, y, num_rows=203, **kwargs)
    for a, b in zip(got, exact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one label per real row"):
        linear.train_linear_classifier(padded, y[:200], num_rows=203, **kwargs)


def test_lars_is_simclrs_head_without_layer_adaptation():
    """SimCLR excludes the supervised head from LARS's trust ratio: at a usual lr it learns as
    well as momentum SGD (a trust ratio on the zero-initialised head would all but freeze it:
    0.52 against 0.63 top-1 was measured with one)."""
    x, y = _clusters(2000, c=10, f=32, spread=12.0)
    xt, yt = _clusters(1000, c=10, f=32, spread=12.0, seed=1)
    kwargs = dict(num_classes=10, epochs=5, batch_size=256, learning_rate=0.1, seed=1)
    lars = linear.train_linear_classifier(x, y, optimizer="lars", **kwargs)
    sgd = linear.train_linear_classifier(x, y, optimizer="sgd", nesterov=False, **kwargs)
    top1 = [linear.evaluate_linear_classifier(c, xt, yt)["top1"] for c in (lars, sgd)]
    assert 0.3 < top1[1] < 0.98, top1  # overlapping classes: not trivially separable
    assert abs(top1[0] - top1[1]) < 0.03, top1


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
@pytest.mark.parametrize("devices", [None, 8])
def test_a_sweep_trains_each_learning_rate_as_a_single_run_would(optimizer, devices):
    """Classifier k of a vmapped sweep is the one learning_rate[k] alone gives, to float32
    rounding (vmap's batched products round differently: ~1e-7 of these weights, measured)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0)
    mesh = None if devices is None else parallel.make_mesh(jax.devices()[:devices])
    kw = dict(num_classes=4, epochs=2, batch_size=64, optimizer=optimizer, mesh=mesh, seed=3)
    lrs = [0.01, 0.3, 2.0]
    seen = []
    sweep = linear.train_linear_classifier(x, y, learning_rate=lrs,
                                           callback=lambda e, m: seen.append(m), **kw)
    assert len(sweep) == 3 and len(seen[-1]["loss"]) == 3
    for lr, c in zip(lrs, sweep):
        alone = linear.train_linear_classifier(x, y, learning_rate=lr, **kw)
        np.testing.assert_allclose(np.asarray(c.weights), np.asarray(alone.weights), atol=1e-6,
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(c.bias), np.asarray(alone.bias), atol=1e-6)
        np.testing.assert_array_equal(
            np.argmax(np.asarray(linear.predict_logits(c, x)), 1),
            np.argmax(np.asarray(linear.predict_logits(alone, x)), 1))
