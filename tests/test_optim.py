import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import models, optim


def test_decay_mask_selects_exactly_kernels_not_bias_or_bn():
    m = models.create_model("resnet18", cifar_stem=True, width=4, head_hidden_dims=(8,),
                            out_dim=4, output_bn=True)
    params, _ = models.init_variables(m, jax.random.key(0), (1, 8, 8, 3))
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for path, decayed in flat.items():
        is_bn = "bn" in path.split("']['")[-2]  # the module holding the leaf: bn1, downsample_bn, out_bn
        is_bias = path.endswith("['bias']")
        assert decayed == (not (is_bn or is_bias)), path
        assert decayed == path.endswith("['kernel']"), path
    # ResNet-18: stem + 8 blocks x 2 + 3 downsample = 20 convolutions; head: dense0 and out.
    assert sum(flat.values()) == 20 + 2


def _tree():
    return {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.3, -0.1])}


def _grads():
    return {"w": jnp.array([[0.2, 0.1], [-0.4, 0.3]]), "b": jnp.array([0.5, 1.5])}


def test_lars_first_step_by_hand():
    lr, wd, tc = 0.5, 0.01, 0.001
    tx = optim.make_optimizer("lars", lr, weight_decay=wd, momentum=0.9, trust_coefficient=tc)
    p, g = _tree(), _grads()
    updates, state = tx.update(g, tx.init(p), p)
    w, gw = np.asarray(p["w"], np.float64), np.asarray(g["w"], np.float64)
    d = gw + wd * w
    trust = tc * np.linalg.norm(w) / np.linalg.norm(d)
    np.testing.assert_allclose(updates["w"], -lr * trust * d, rtol=1e-6)
    # Bias: no weight decay, no trust ratio: plain (momentum) SGD.
    np.testing.assert_allclose(updates["b"], -lr * np.asarray(g["b"]), rtol=1e-6)
    # Second step: momentum 0.9 on the scaled update.
    updates2, _ = tx.update(g, state, p)
    np.testing.assert_allclose(updates2["b"], -lr * 1.9 * np.asarray(g["b"]), rtol=1e-6)


def test_sgd_weight_decay_skips_bias():
    tx = optim.make_optimizer("sgd", 0.1, weight_decay=0.5, momentum=0.0)
    p, g = _tree(), _grads()
    updates, _ = tx.update(g, tx.init(p), p)
    np.testing.assert_allclose(updates["w"], -0.1 * (g["w"] + 0.5 * p["w"]), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.1 * g["b"], rtol=1e-6)


def test_adamw_decoupled_decay_skips_bias():
    lr, wd = 0.01, 0.1
    tx = optim.make_optimizer("adamw", lr, weight_decay=wd)
    p, g = _tree(), _grads()
    updates, _ = tx.update(g, tx.init(p), p)
    # First Adam step with bias correction: m/sqrt(v) = g/|g| (up to eps).
    adam = lambda x: np.asarray(x) / (np.abs(np.asarray(x)) + 1e-8)  # noqa: E731
    np.testing.assert_allclose(updates["w"], -lr * (adam(g["w"]) + wd * np.asarray(p["w"])), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -lr * adam(g["b"]), rtol=1e-5)


def test_warmup_cosine_values():
    s = optim.warmup_cosine_schedule(2.0, warmup_steps=10, total_steps=110, end_lr=0.0)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(s(5), 1.0, rtol=1e-6)  # halfway through warmup
    np.testing.assert_allclose(s(10), 2.0, rtol=1e-6)  # end of warmup: the peak
    np.testing.assert_allclose(s(60), 1.0, rtol=1e-6)  # middle of the cosine: half the peak
    np.testing.assert_allclose(s(35), 2.0 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), rtol=1e-6)
    np.testing.assert_allclose(s(110), 0.0, atol=1e-7)  # end
    np.testing.assert_allclose(s(500), 0.0, atol=1e-7)
    no_warmup = optim.warmup_cosine_schedule(1.0, 0, 100)
    np.testing.assert_allclose(no_warmup(0), 1.0, rtol=1e-6)
    # A run shorter than its warmup (a few-step smoke run): linear all the way, no error.
    all_warmup = optim.warmup_cosine_schedule(2.0, 12, 12)
    np.testing.assert_allclose([all_warmup(s) for s in (0, 3, 12)], [0.0, 0.5, 2.0], rtol=1e-6)


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps <= total_steps"):
        optim.warmup_cosine_schedule(1.0, 20, 10)


def test_learning_rate_scaling():
    assert optim.scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert optim.scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert optim.scale_learning_rate(0.03, 256, "linear") == pytest.approx(0.03)
    assert optim.scale_learning_rate(0.06, 512, "none") == 0.06
    with pytest.raises(ValueError, match="unknown lr scaling 'log'"):
        optim.scale_learning_rate(0.1, 256, "log")


def test_schedule_drives_optimizer():
    s = optim.warmup_cosine_schedule(1.0, 2, 4)
    tx = optim.make_optimizer("sgd", s, momentum=0.0)
    p, g = _tree(), _grads()
    st = tx.init(p)
    lrs = []
    for _ in range(3):
        u, st = tx.update(g, st, p)
        lrs.append(float(-u["b"][0] / g["b"][0]))
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0], atol=1e-6)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; choose one of"):
        optim.make_optimizer("adam", 0.1)


def test_warmup_constant_schedule_values():
    s = optim.warmup_constant_schedule(0.4, 4)
    np.testing.assert_allclose([float(s(t)) for t in (0, 1, 2, 4, 5, 1000)],
                               [0.0, 0.1, 0.2, 0.4, 0.4, 0.4], rtol=1e-6)
    assert float(optim.warmup_constant_schedule(0.4, 0)(0)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="warmup_steps >= 0"):
        optim.warmup_constant_schedule(0.4, -1)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_a_group_with_its_own_learning_rate(name):
    """SimSiam's predictor: its own (here constant) lr, every other leaf the schedule. Each
    group's updates equal those of the plain optimizer run on that group alone with that lr,
    and with the same lr for both the updates equal one optimizer over everything, bit for
    bit."""
    schedule = optim.warmup_cosine_schedule(0.5, 1, 5)
    params = {"backbone": _tree(), "predictor": jax.tree.map(lambda x: 2 * x, _tree())}
    grads = {"backbone": _grads(), "predictor": jax.tree.map(lambda x: -x, _grads())}
    kw = dict(weight_decay=0.01, momentum=0.9)
    split = optim.make_optimizer(name, schedule, group_learning_rates={"predictor": 0.3}, **kw)
    parts = {"backbone": optim.make_optimizer(name, schedule, **kw),
             "predictor": optim.make_optimizer(name, 0.3, **kw)}
    same = optim.make_optimizer(name, schedule, group_learning_rates={"predictor": schedule},
                                **kw)
    whole = optim.make_optimizer(name, schedule, **kw)
    st_split, st_same, st_whole = split.init(params), same.init(params), whole.init(params)
    st_parts = {k: parts[k].init(params[k]) for k in parts}
    for _ in range(4):
        u_split, st_split = split.update(grads, st_split, params)
        for k in parts:
            u, st_parts[k] = parts[k].update(grads[k], st_parts[k], params[k])
            for a, b in zip(jax.tree.leaves(u_split[k]), jax.tree.leaves(u)):
                np.testing.assert_array_equal(a, b)
        u_same, st_same = same.update(grads, st_same, params)
        u_whole, st_whole = whole.update(grads, st_whole, params)
        for a, b in zip(jax.tree.leaves(u_same), jax.tree.leaves(u_whole)):
            np.testing.assert_array_equal(a, b)
    # The schedule is at 0 in the first step (warmup); the predictor's constant lr is not.
    u0, _ = split.update(grads, split.init(params), params)
    assert float(jnp.abs(u0["backbone"]["b"]).max()) == 0.0
    assert float(jnp.abs(u0["predictor"]["b"]).max()) > 0.0
    with pytest.raises(ValueError, match=r"no parameters under \['predictor'\]"):
        split.init({"backbone": _tree()})
