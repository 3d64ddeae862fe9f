import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import models


def _param_shapes(module, image_shape):
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros(image_shape), train=False))
    return variables


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name,expected",
    # torchvision's resnet18/34/50 parameter counts minus the 1000-way classifier.
    [("resnet18", 11_176_512), ("resnet34", 21_284_672), ("resnet50", 23_508_032)],
)
def test_parameter_counts_match_torchvision(name, expected):
    variables = _param_shapes(models.ENCODERS[name](), (1, 224, 224, 3))
    assert _count(variables["params"]) == expected


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048)])
def test_feature_shapes(name, dim):
    assert models.FEATURE_DIMS[name] == dim
    out = jax.eval_shape(
        lambda: models.ENCODERS[name]().init_with_output(
            jax.random.key(0), jnp.zeros((2, 64, 64, 3)), train=False)[0])
    assert out.shape == (2, dim) and out.dtype == jnp.float32


def test_torchvision_layer_names():
    params = _param_shapes(models.ResNet50(), (1, 64, 64, 3))["params"]
    assert set(params) == {"conv1", "bn1"} | {f"layer{i}_{j}" for i, n in
                                              zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)}
    assert set(params["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                       "downsample_conv", "downsample_bn"}
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    # Stride on the 3x3 convolution (v1.5): layer2_0's conv1 is 1x1 from 256 to 128.
    assert params["layer2_0"]["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)


def test_cifar_stem_keeps_resolution_until_layer2():
    m = models.ResNet18(cifar_stem=True, width=8)
    variables = m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 8)
    _, inter = m.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False,
                       capture_intermediates=True)
    assert inter["intermediates"]["layer1_1"]["__call__"][0].shape == (1, 32, 32, 8)
    assert inter["intermediates"]["layer4_1"]["__call__"][0].shape == (1, 4, 4, 64)
    imagenet = models.ResNet18(width=8)
    v = imagenet.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    _, inter = imagenet.apply(v, jnp.zeros((1, 32, 32, 3)), train=False, capture_intermediates=True)
    assert inter["intermediates"]["layer1_1"]["__call__"][0].shape == (1, 8, 8, 8)


def test_zero_init_last_bn():
    on = models.ResNet50(width=8, zero_init_last_bn=True).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    off = models.ResNet50(width=8).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    assert np.all(on["layer1_0"]["bn3"]["scale"] == 0)
    assert np.all(off["layer1_0"]["bn3"]["scale"] == 1)
    assert np.all(on["layer1_0"]["bn2"]["scale"] == 1)  # only the last BN of each block
    assert np.all(on["layer1_0"]["downsample_bn"]["scale"] == 1)
    on18 = models.ResNet18(width=8, zero_init_last_bn=True).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
    assert np.all(on18["layer3_1"]["bn2"]["scale"] == 0)
    # A zero-initialised block is the identity map on its (non-negative) input.
    m = models.ResNet18(width=8, zero_init_last_bn=True, cifar_stem=True)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    v = m.init(jax.random.key(0), x, train=False)
    _, inter = m.apply(v, x, train=False, capture_intermediates=True)
    a = inter["intermediates"]["layer1_0"]["__call__"][0]
    b = inter["intermediates"]["layer1_1"]["__call__"][0]
    np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_float32_params():
    m32 = models.create_model("resnet18", cifar_stem=True, width=8, head_hidden_dims=(32,), out_dim=16)
    m16 = models.create_model("resnet18", cifar_stem=True, width=8, head_hidden_dims=(32,), out_dim=16,
                              dtype=jnp.bfloat16)
    params, batch_stats = models.init_variables(m16, jax.random.key(0), (1, 16, 16, 3))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    out16, bs16 = models.flax_apply_fn(m16)(params, batch_stats, x, train=True)
    out32, _ = models.flax_apply_fn(m32)(params, batch_stats, x, train=True)
    assert out16["projection"].dtype == jnp.float32 and out16["features"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(bs16)} == {jnp.dtype(jnp.float32)}
    # Really computed in bfloat16 (8 mantissa bits): close to float32 but not equal.
    diff = np.abs(out16["features"] - out32["features"]).max() / np.abs(out32["features"]).max()
    assert 1e-4 < diff < 5e-2
    jaxpr = str(jax.make_jaxpr(lambda p: models.flax_apply_fn(m16)(p, batch_stats, x, train=False))(params))
    assert "conv_general_dilated" in jaxpr and "bf16[4,16,16,8]" in jaxpr


@pytest.mark.parametrize("hidden,output_bn,n_dense", [((), False, 1), ((64,), False, 2), ((64, 64), True, 3)])
def test_projection_head_depth(hidden, output_bn, n_dense):
    head = models.ProjectionHead(hidden_dims=hidden, out_dim=8, output_bn=output_bn)
    v = head.init(jax.random.key(0), jnp.zeros((2, 32)), train=False)
    dense = [k for k in v["params"] if k.startswith("dense") or k == "out"]
    assert len(dense) == n_dense
    assert ("out_bn" in v["params"]) == output_bn
    assert ("bias" in v["params"]["out"]) == (not output_bn)
    # Hidden layers: Dense without bias, then BN (scale and shift).
    for i in range(len(hidden)):
        assert set(v["params"][f"dense{i}"]) == {"kernel"}
        assert set(v["params"][f"bn{i}"]) == {"scale", "bias"}
    out = head.apply(v, jnp.ones((2, 32)), train=False)
    assert out.shape == (2, 8) and out.dtype == jnp.float32


def test_flax_apply_fn_batch_stats_update_in_train_mode_only():
    m = models.create_model("resnet18", cifar_stem=True, width=4, head_hidden_dims=(8,), out_dim=4)
    params, bs = models.init_variables(m, jax.random.key(0), (1, 8, 8, 3))
    apply_fn = models.flax_apply_fn(m)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3)) + 3.0
    _, same = apply_fn(params, bs, x, train=False)
    assert same is bs
    _, new = apply_fn(params, bs, x, train=True)
    # Running mean of the stem BN: 0.9 * 0 + 0.1 * batch mean of the conv output.
    conv_out = jax.lax.conv_general_dilated(
        x, params["backbone"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(new["backbone"]["bn1"]["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown encoder 'resnet19'"):
        models.create_model("resnet19")
