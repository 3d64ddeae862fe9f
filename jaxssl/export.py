"""Export a trained backbone: torchvision's state dict in safetensors, or Flax's layout in msgpack.

jaxssl's ResNets use torchvision's topology and names (see `jaxssl.models.resnet`), so a
backbone maps one to one onto a `torchvision.models.resnet*` state dict: `layer1_0/conv1` is
`layer1.0.conv1`, `downsample_conv`/`downsample_bn` are `downsample.0`/`downsample.1`, HWIO
kernels become OIHW, BatchNorm's scale/bias/mean/var become weight/bias/running_mean/running_var.
Nothing is pickled: safetensors and msgpack hold only arrays and strings.

Loading the safetensors file in PyTorch (the projection head is not exported, so the only
missing keys are exactly the classifier's, `fc.weight` and `fc.bias`):

    import safetensors.torch, torch.nn as nn, torchvision
    model = torchvision.models.resnet50()
    # cifar_stem=True only: a 3x3 stride-1 first convolution and no max-pool.
    # model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = nn.Identity()
    missing, unexpected = model.load_state_dict(safetensors.torch.load_file(f), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    model.fc = nn.Identity()  # model.eval()(images) -> the features jaxssl computes

Inputs are NCHW there (NHWC in jaxssl), normalised with the mean/std stored in the file's
metadata by whoever exported it. A width other than 64 does not fit torchvision's constructors
(the file still holds the right shapes, for a ResNet built to match).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import flax.serialization
import numpy as np
import safetensors.numpy

from jaxssl import files

__all__ = ["FORMATS", "export_backbone", "from_torchvision_state_dict", "load_msgpack",
           "load_safetensors", "torchvision_state_dict"]

# Flax module name -> torchvision module path, for the names that differ (others map as is).
_LAYER = re.compile(r"layer(\d+)_(\d+)")
_TO_TORCH = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
# BatchNorm: Flax variable -> torchvision buffer or parameter.
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_FROM_TORCH_BN = {v: k for k, v in (_BN_PARAMS | _BN_STATS).items()}


def _torch_module(flax_name: str) -> str:
    match = _LAYER.fullmatch(flax_name)
    if match:
        return f"layer{match[1]}.{match[2]}"
    return _TO_TORCH.get(flax_name, flax_name)


def _modules(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    """Yields (path of Flax module names, {variable: leaf}) for every module with leaves."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield prefix, leaves
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _modules(v, prefix + (k,))


def torchvision_state_dict(backbone_params: Mapping[str, Any],
                           backbone_batch_stats: Mapping[str, Any], *,
                           num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """A jaxssl ResNet's variables as torchvision's `ResNet.state_dict()`, less `fc.*`.

    backbone_params: the ResNet's params ({"conv1": {"kernel": [kh, kw, I, O]}, "bn1": {"scale":
      [C], "bias": [C]}, "layer1_0": {...}, ...}); backbone_batch_stats: its {"mean", "var"}.
    Returns C-contiguous numpy arrays: `*.weight` of convolutions [O, I, kh, kw] float32;
    BatchNorm `weight`, `bias`, `running_mean`, `running_var` [C] float32 and
    `num_batches_tracked` [] int64 (torchvision has that buffer; strict loading wants it).
    """
    out: dict[str, np.ndarray] = {}
    stats = dict(_modules(backbone_batch_stats))
    for path, leaves in _modules(backbone_params):
        name = ".".join(_torch_module(p) for p in path)
        if set(leaves) == {"kernel"}:
            kernel = np.asarray(leaves["kernel"], np.float32)
            if kernel.ndim != 4:
                raise ValueError(f"{'/'.join(path)}: expected a conv kernel [kh, kw, I, O]; "
                                 f"got shape {kernel.shape} (pass the backbone's params only)")
            out[f"{name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        elif set(leaves) == set(_BN_PARAMS) and set(stats.get(path, ())) == set(_BN_STATS):
            for src, dst in _BN_PARAMS.items():
                out[f"{name}.{dst}"] = np.ascontiguousarray(leaves[src], np.float32)
            for src, dst in _BN_STATS.items():
                out[f"{name}.{dst}"] = np.ascontiguousarray(stats[path][src], np.float32)
            out[f"{name}.num_batches_tracked"] = np.array(num_batches_tracked, np.int64)
        else:
            raise ValueError(f"{'/'.join(path)}: neither a bias-free conv nor a BatchNorm with "
                             f"statistics (variables {sorted(leaves)}); not a jaxssl ResNet")
    return out


def from_torchvision_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict, dict]:
    """The inverse of `torchvision_state_dict`: (backbone_params, backbone_batch_stats).

    state_dict: torchvision names to arrays (numpy, or anything `np.asarray` takes, e.g. CPU
    torch tensors). `fc.*` (the classifier) and `num_batches_tracked` are dropped. Returns
    nested dicts of numpy arrays in jaxssl's layout: conv kernels [kh, kw, I, O], BatchNorm
    scale/bias and mean/var [C], dtypes as given.
    """
    params: dict = {}
    batch_stats: dict = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if module.split(".")[0] == "fc" or leaf == "num_batches_tracked":
            continue
        path = [_FROM_TORCH.get(t, t.replace(".", "_"))
                for t in re.findall(r"layer\d+\.\d+|downsample\.\d|[^.]+", module)]
        value = np.asarray(value)
        # Convolutions have no bias in a ResNet, so a [C] weight or bias is BatchNorm's.
        if leaf == "weight" and value.ndim == 4:
            tree, name, value = params, "kernel", value.transpose(2, 3, 1, 0)
        elif leaf in ("weight", "bias") and value.ndim == 1:
            tree, name = params, _FROM_TORCH_BN[leaf]
        elif leaf in _BN_STATS.values() and value.ndim == 1:
            tree, name = batch_stats, _FROM_TORCH_BN[leaf]
        else:
            raise ValueError(f"{key!r} (shape {value.shape}) is not part of a torchvision ResNet "
                             f"backbone")
        for p in path:
            tree = tree.setdefault(p, {})
        tree[name] = np.ascontiguousarray(value)
    return params, batch_stats


def _safetensors_bytes(params, batch_stats, metadata: dict[str, str]) -> bytes:
    return safetensors.numpy.save(torchvision_state_dict(params, batch_stats),
                                  metadata={**metadata, "format": "torchvision"})


def _msgpack_bytes(params, batch_stats, metadata: dict[str, str]) -> bytes:
    to_numpy = lambda tree: {k: to_numpy(v) if isinstance(v, Mapping) else np.asarray(v)
                             for k, v in tree.items()}
    return flax.serialization.msgpack_serialize(
        {"params": to_numpy(params), "batch_stats": to_numpy(batch_stats),
         "metadata": {**metadata, "format": "flax"}})


# Format name -> (backbone params, backbone batch_stats, metadata) -> the file's bytes.
FORMATS: dict[str, Callable[[Mapping, Mapping, dict[str, str]], bytes]] = {
    "safetensors": _safetensors_bytes,
    "msgpack": _msgpack_bytes,
}


def export_backbone(path: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any], *,
                    format: str, metadata: dict[str, str]) -> None:
    """Writes the "backbone" subtree of a ContrastiveModel's variables to `path`, atomically.

    params, batch_stats: the full model's trees (their "head" is left out).
    format: "safetensors" (torchvision's state dict, see `torchvision_state_dict`; loads into
      `torchvision.models.resnet*` as the module docstring shows) or "msgpack" (Flax's layout:
      {"params", "batch_stats", "metadata"}, read back by `load_msgpack`).
    metadata: strings stored in the file (e.g. encoder, width, cifar_stem, step, normalisation
      mean/std); "format" is set to "torchvision" or "flax".
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {sorted(FORMATS)}")
    bad = {k: type(v).__name__ for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"export metadata must map str to str; not so for {bad}")
    if "backbone" not in params or "backbone" not in batch_stats:
        raise ValueError(f"params and batch_stats need a 'backbone' subtree (the full model's "
                         f"variables); params has {sorted(params)}")
    data = FORMATS[format](params["backbone"], batch_stats["backbone"], dict(metadata))
    files.write_bytes(os.fspath(path), data)  # atomic; local or remote (gs://)


def load_msgpack(path: str) -> tuple[dict, dict, dict[str, str]]:
    """Reads a "msgpack" export: (backbone params, backbone batch_stats, metadata), numpy leaves."""
    tree = flax.serialization.msgpack_restore(files.read_bytes(os.fspath(path)))
    return tree["params"], tree["batch_stats"], tree["metadata"]


def load_safetensors(path: str) -> tuple[dict, dict, dict[str, str]]:
    """Reads a "safetensors" export into jaxssl's layout: (params, batch_stats, metadata)."""
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = f.metadata() or {}
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
    return (*from_torchvision_state_dict(state_dict), metadata)
