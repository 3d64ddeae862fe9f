"""Backbone export: torchvision's state dict checked by an independent float64 forward pass, and
(where torch is installed) by torchvision itself; the msgpack and state-dict round trips."""

import functools
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxssl import export, models

BN_EPS = 1e-5  # torchvision's BatchNorm2d default


def random_variables(model, image: int, seed: int = 0):
    """(params, batch_stats) of `model` with every leaf random, without running its init.

    jax.eval_shape gives the shapes in a fraction of the time a real (compiled) init of a
    full-width ResNet-50 takes on a CPU. BatchNorm gets scales and biases, means and variances
    of different distributions (variances positive, means of both signs), so a swapped
    weight/bias or mean/var changes the features.
    """
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, image, image, 3), np.float32))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "kernel":  # He fan-out for convolutions, as the model's own init
            fan_out = np.prod(s.shape[:-2], dtype=int) * s.shape[-1]
            return rng.normal(0, np.sqrt(2 / fan_out), s.shape).astype(np.float32)
        low_high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}
        if name in low_high:
            return rng.uniform(*low_high[name], s.shape).astype(np.float32)
        return rng.normal(0, 0.2, s.shape).astype(np.float32)  # bias, mean

    return tuple(jax.tree_util.tree_map_with_path(leaf, shapes[k])
                 for k in ("params", "batch_stats"))


def jax_features(model, params, batch_stats, images):
    """jaxssl's eval-mode backbone features [N, F] float32 for images [N, H, W, 3]."""
    apply = jax.jit(lambda p, s, x: models.flax_apply_fn(model)(p, s, x, train=False)[0])
    return np.asarray(apply(params, batch_stats, images)["features"])


# -- an independent torchvision-layout ResNet in numpy float64 (NCHW, OIHW) ---------------------

def conv(x, w, stride, pad, fill=0.0):
    """x: [N, C, H, W], w: [O, C, kh, kw] -> [N, O, H', W'] as torch.nn.Conv2d (no bias)."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win[:, :, ::stride, ::stride], w)


def max_pool_3x3_s2(x):
    x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(
        axis=(-2, -1))


class Reference:
    """torchvision's ResNet forward (eval mode, fc removed) reading a state dict by name."""

    def __init__(self, state_dict):
        self.sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
        self.used = set()

    def get(self, key):
        self.used.add(key)
        return self.sd[key]

    def conv(self, x, name, stride):
        w = self.get(f"{name}.weight")
        return conv(x, w, stride, w.shape[-1] // 2)

    def bn(self, x, name):
        g = lambda k: self.get(f"{name}.{k}")[None, :, None, None]
        x = (x - g("running_mean")) / np.sqrt(g("running_var") + BN_EPS)
        return x * g("weight") + g("bias")

    def block(self, x, name, stride):
        relu = lambda y: np.maximum(y, 0)
        if f"{name}.conv3.weight" in self.sd:  # Bottleneck: stride on the 3x3 (ResNet v1.5)
            y = relu(self.bn(self.conv(x, f"{name}.conv1", 1), f"{name}.bn1"))
            y = relu(self.bn(self.conv(y, f"{name}.conv2", stride), f"{name}.bn2"))
            y = self.bn(self.conv(y, f"{name}.conv3", 1), f"{name}.bn3")
        else:
            y = relu(self.bn(self.conv(x, f"{name}.conv1", stride), f"{name}.bn1"))
            y = self.bn(self.conv(y, f"{name}.conv2", 1), f"{name}.bn2")
        if f"{name}.downsample.0.weight" in self.sd:
            x = self.bn(self.conv(x, f"{name}.downsample.0", stride), f"{name}.downsample.1")
        return relu(x + y)

    def __call__(self, images_nchw):
        imagenet_stem = self.sd["conv1.weight"].shape[-1] == 7  # else the 3x3 stride-1 stem
        x = self.conv(np.asarray(images_nchw, np.float64), "conv1", 2 if imagenet_stem else 1)
        x = np.maximum(self.bn(x, "bn1"), 0)
        if imagenet_stem:
            x = max_pool_3x3_s2(x)
        for i in range(1, 5):
            j = 0
            while f"layer{i}.{j}.conv1.weight" in self.sd:
                x = self.block(x, f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1)
                j += 1
        unused = {k for k in set(self.sd) - self.used if not k.endswith("num_batches_tracked")}
        assert not unused, unused
        return x.mean(axis=(2, 3))


def assert_features_close(got, want, rtol=1e-4):
    # float32 rounding grows with the features' magnitude, which random (unmatched) BatchNorm
    # statistics push to tens; so the bound is 1e-4 absolute for features up to 1, relative above.
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want).max(), rtol * scale)


def tiny_model(encoder, cifar_stem, width):
    return models.create_model(encoder, cifar_stem=cifar_stem, width=width,
                               head_hidden_dims=(16,), out_dim=8)


TINY = [("resnet18", True, 4, 16), ("resnet18", False, 4, 32), ("resnet50", False, 4, 32),
        ("resnet50", True, 4, 16)]


@pytest.mark.parametrize("encoder,cifar_stem,width,image", TINY)
def test_safetensors_matches_numpy_reference(tmp_path, encoder, cifar_stem, width, image):
    model = tiny_model(encoder, cifar_stem, width)
    params, batch_stats = random_variables(model, image)
    path = tmp_path / "backbone.safetensors"
    meta = {"encoder": encoder, "width": str(width), "cifar_stem": str(cifar_stem)}
    export.export_backbone(path, params, batch_stats, format="safetensors", metadata=meta)
    state_dict = safetensors.numpy.load_file(path)
    bn = [k.removesuffix(".running_mean") for k in state_dict if k.endswith(".running_mean")]
    assert {str(state_dict[f"{b}.num_batches_tracked"].dtype) for b in bn} == {"int64"}
    assert all(state_dict[f"{b}.num_batches_tracked"].shape == () for b in bn)
    assert {str(v.dtype) for k, v in state_dict.items() if "num_batches" not in k} == {"float32"}
    assert not any(k.startswith("fc.") for k in state_dict)

    images = np.random.default_rng(1).normal(size=(2, image, image, 3)).astype(np.float32)
    want = Reference(state_dict)(images.transpose(0, 3, 1, 2))
    assert_features_close(jax_features(model, params, batch_stats, images), want)
    assert export.load_safetensors(path)[2] == {**meta, "format": "torchvision"}


def bitwise_equal(a, b):
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape
                    == np.asarray(y).shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
def test_state_dict_round_trip(tmp_path, encoder):
    params, batch_stats = random_variables(tiny_model(encoder, False, 4), 32)
    state_dict = export.torchvision_state_dict(params["backbone"], batch_stats["backbone"])
    assert all(v.flags.c_contiguous for v in state_dict.values())
    assert bitwise_equal(export.from_torchvision_state_dict(state_dict),
                         (params["backbone"], batch_stats["backbone"]))
    path = tmp_path / "b.safetensors"
    export.export_backbone(path, params, batch_stats, format="safetensors", metadata={})
    assert bitwise_equal(export.load_safetensors(path)[:2],
                         (params["backbone"], batch_stats["backbone"]))


def test_msgpack_round_trip(tmp_path):
    params, batch_stats = random_variables(tiny_model("resnet50", True, 4), 16)
    path = tmp_path / "b.msgpack"
    meta = {"encoder": "resnet50", "step": "7", "mean": "0.4914,0.4822,0.4465"}
    export.export_backbone(path, params, batch_stats, format="msgpack", metadata=meta)
    p, s, m = export.load_msgpack(path)
    assert bitwise_equal((p, s), (params["backbone"], batch_stats["backbone"]))
    assert m == {**meta, "format": "flax"}
    assert os.listdir(tmp_path) == ["b.msgpack"]  # no temporary file left behind


def one_line_error(exc_type, fn, match):
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)


def test_errors(tmp_path, monkeypatch):
    params, batch_stats = random_variables(tiny_model("resnet18", True, 4), 16)
    write = lambda path, fmt="safetensors", meta={}, p=params: export.export_backbone(
        path, p, batch_stats, format=fmt, metadata=meta)
    one_line_error(ValueError, lambda: write(tmp_path / "b.pt", "pickle"),
                   r"'pickle'.*\['msgpack', 'safetensors'\]")
    one_line_error(OSError, lambda: write(tmp_path / "no" / "b.safetensors"), "cannot write")
    one_line_error(OSError, lambda: write(tmp_path), "cannot write")
    one_line_error(TypeError, lambda: write(tmp_path / "b", meta={"step": 3}), "str to str")
    one_line_error(ValueError, lambda: write(tmp_path / "b", p=params["backbone"]), "backbone")
    assert os.listdir(tmp_path) == []

    # A write that fails midway leaves the previous file whole and no temporary file.
    path = tmp_path / "b.safetensors"
    path.write_bytes(b"previous")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    one_line_error(OSError, lambda: write(path), "No space left")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["b.safetensors"]


# -- torchvision itself, where it is installed (not in CI) --------------------------------------

# PyTorch runs in a subprocess: importing torch into a process that has loaded TensorFlow (other
# tests in the same pytest worker do) can crash it (a segfault in torch's triton import was seen).
_TORCH_SIDE = """
import sys, numpy as np, torch, torchvision, safetensors.torch
path, encoder, cifar_stem, images, out = sys.argv[1:]
net = getattr(torchvision.models, encoder)()
if cifar_stem == "1":
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
result = net.load_state_dict(safetensors.torch.load_file(path), strict=False)
state = {k: v.numpy() for k, v in net.state_dict().items()}
net.fc = torch.nn.Identity()
net.eval()
x = np.load(images)
with torch.no_grad():
    features = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
np.savez(out, features=features, missing=np.array(sorted(result.missing_keys)),
         unexpected=np.array(sorted(result.unexpected_keys), dtype=str),
         **{"state/" + k: v for k, v in state.items()})
"""


@pytest.mark.parametrize("encoder,cifar_stem,image", [("resnet18", False, 64),
                                                      ("resnet50", False, 32),
                                                      ("resnet18", True, 32)])
def test_torchvision_loads_export(tmp_path, encoder, cifar_stem, image):
    import importlib.util
    import subprocess
    import sys

    if not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")):
        pytest.skip("torch and torchvision are not installed")
    model = tiny_model(encoder, cifar_stem, 64)
    params, batch_stats = random_variables(model, image)
    path = tmp_path / "backbone.safetensors"
    export.export_backbone(path, params, batch_stats, format="safetensors",
                           metadata={"encoder": encoder})
    images = np.random.default_rng(1).normal(size=(2, image, image, 3)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    out = tmp_path / "torch_side.npz"
    subprocess.run([sys.executable, "-c", _TORCH_SIDE, str(path), encoder,
                    "1" if cifar_stem else "0", str(tmp_path / "images.npy"), str(out)],
                   check=True, timeout=300)
    got = np.load(out)
    assert set(got["missing"].tolist()) == {"fc.weight", "fc.bias"}
    assert got["unexpected"].tolist() == []
    # Importing: torchvision's own state dict (with fc.* and num_batches_tracked) reads back.
    state = {k[len("state/"):]: got[k] for k in got.files if k.startswith("state/")}
    assert bitwise_equal(export.from_torchvision_state_dict(state),
                         (params["backbone"], batch_stats["backbone"]))
    assert_features_close(jax_features(model, params, batch_stats, images), got["features"])