"""The feature cache (`jaxssl.evaluate.cache`) and the pictures of `jaxssl eval embed`
(`jaxssl.evaluate.embed`), as units.

The CLI on a trained workdir (reuse, embed's pictures, the sweep) is in test_evaluation.py,
which shares one trained workdir between its tests.
"""

import json
import os
import sys
import types

import ml_collections
import numpy as np
import pytest

from jaxssl.evaluate import cache as cache_lib, embed


def _source(n=6, labels=None, name="s"):
    labels = np.arange(n) % 3 if labels is None else labels
    return types.SimpleNamespace(name=name, num_examples=n, labels=labels,
                                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _config(**data):
    return ml_collections.ConfigDict({"data": {"source": "builtin", "out_size": 16, **data},
                                      "model": {"encoder": "resnet18", "width": 8}})


_PARAMS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
_STATS = {"mean": np.ones(4, np.float32)}


def _key(config=None, params=_PARAMS, stats=_STATS, sources=None):
    sources = sources or {"train": _source(), "eval": _source(4, name="e")}
    return cache_lib.fingerprint(config or _config(), params, stats, sources)


def test_the_fingerprint_covers_the_checkpoint_and_the_data_only():
    key, what = _key()
    assert key == _key()[0] and what["encoder_sha256"]
    flipped = _PARAMS["w"].copy()
    flipped.view(np.uint32)[1, 2] ^= 1  # one bit of one parameter
    assert _key(params={"w": flipped})[0] != key
    assert _key(stats={"mean": np.full(4, 1.5, np.float32)})[0] != key
    assert _key(sources={"train": _source(labels=np.array([0, 1, 2, 0, 1, 1])),
                         "eval": _source(4, name="e")})[0] != key  # one label
    assert _key(sources={"train": _source(7), "eval": _source(4, name="e")})[0] != key
    assert _key(_config(eval_split="other"))[0] != key
    assert _key(_config(out_size=32))[0] != key


class _Encoder:
    """compute(rows) of features row r = [r, 2r, ...]; counts the rows it was asked for."""

    def __init__(self, dim=5):
        self.dim, self.asked = dim, []

    def __call__(self, rows):
        self.asked.append(np.asarray(rows).copy())
        return (np.asarray(rows, np.float32)[:, None] * np.arange(1, self.dim + 1)).astype(
            np.float32)


def _expected(rows, dim=5):
    return np.asarray(rows, np.float32)[:, None] * np.arange(1, dim + 1, dtype=np.float32)


def _cache(folder, key="k", say=None):
    return cache_lib.FeatureCache(str(folder), key, {"what": key},
                                  say=say if say is not None else (lambda _: None))


def test_rows_are_computed_once_and_merged(tmp_path):
    enc = _Encoder()
    c = _cache(tmp_path)
    got = c.rows("train", [7, 2, 5], enc)
    np.testing.assert_array_equal(got, _expected([7, 2, 5]))
    np.testing.assert_array_equal(enc.asked[0], [2, 5, 7])  # sorted, once each
    got = c.rows("train", [5, 9, 2, 0], enc)  # two new rows
    np.testing.assert_array_equal(got, _expected([5, 9, 2, 0]))
    np.testing.assert_array_equal(enc.asked[1], [0, 9])
    # A new process (another evaluation) reads them and computes nothing.
    enc2 = _Encoder()
    whole = _cache(tmp_path).rows("train", [0, 2, 5, 7, 9], enc2)
    assert enc2.asked == [] and isinstance(whole, np.memmap)  # exactly the cached rows: mapped
    np.testing.assert_array_equal(whole, _expected([0, 2, 5, 7, 9]))
    np.testing.assert_array_equal(_cache(tmp_path).rows("eval", [1], enc2), _expected([1]))
    assert len(enc2.asked) == 1  # the eval split is its own
    # Only the files the manifest names are left.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    named = {n for e in manifest["splits"].values() for n in (e["features"], e["rows"])}
    assert set(os.listdir(tmp_path)) == named | {"manifest.json"}


def test_another_fingerprint_is_recomputed_and_replaced(tmp_path):
    _cache(tmp_path, "old").rows("train", [1, 2], _Encoder())
    said, enc = [], _Encoder()
    got = _cache(tmp_path, "new", say=said.append).rows("train", [1, 2], enc)
    np.testing.assert_array_equal(got, _expected([1, 2]))
    assert len(enc.asked) == 1 and "another checkpoint" in said[0]
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == "new"
    enc = _Encoder()
    _cache(tmp_path, "new").rows("train", [1, 2], enc)
    assert enc.asked == []


def test_a_damaged_cache_is_recomputed(tmp_path):
    _cache(tmp_path).rows("train", [3, 4, 5], _Encoder())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / manifest["splits"]["train"]["features"]).write_bytes(b"\x93NUMPY trunc")
    said, enc = [], _Encoder()
    got = _cache(tmp_path, say=said.append).rows("train", [4], enc)
    np.testing.assert_array_equal(got, _expected([4]))
    assert len(enc.asked) == 1 and "recomputing" in said[0]
    (tmp_path / "manifest.json").write_text("{not json")
    said, enc = [], _Encoder()
    _cache(tmp_path, say=said.append).rows("train", [4], enc)
    assert len(enc.asked) == 1 and "unreadable" in said[0]


def test_a_process_that_does_not_write_leaves_the_folder_alone(tmp_path):
    c = cache_lib.FeatureCache(str(tmp_path / "f"), "k", {}, say=lambda _: None, writer=False)
    np.testing.assert_array_equal(c.rows("train", [1], _Encoder()), _expected([1]))
    assert not (tmp_path / "f").exists()


def test_nearest_is_the_brute_force_cosine_search():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(1000, 16)).astype(np.float32) * rng.uniform(0.1, 9, (1000, 1))
    bank[500] = bank[7] * 3  # the same direction as row 7: a tie, the lower row first
    queries = np.concatenate([rng.normal(size=(5, 16)), bank[7:8] * 0.5]).astype(np.float32)
    idx, sims = embed.nearest(queries, bank, 8, chunk=128)
    b = bank.astype(np.float64) / np.linalg.norm(bank.astype(np.float64), axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1,
                                                    keepdims=True)
    ref = q @ b.T
    order = np.argsort(-ref, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(idx[:5], order[:5])
    assert list(idx[5, :2]) == [7, 500]  # the tie, then the rest as float64 orders them
    np.testing.assert_allclose(sims, np.take_along_axis(ref, idx, axis=1), atol=1e-6)
    with pytest.raises(ValueError, match="k <= 1000"):
        embed.nearest(queries, bank, 1001)


def test_pca_map_is_the_top_two_principal_components():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(200, 10)) * np.linspace(5, 0.1, 10)
    xy, method = embed.project_2d(f, "pca")
    assert method == "pca" and xy.shape == (200, 2)
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    w, v = np.linalg.eigh(x.T @ x)  # covariance eigenvectors, the largest last
    ref = x @ v[:, [-1, -2]]
    for j in range(2):  # each component up to its sign
        assert min(np.abs(xy[:, j] - ref[:, j]).max(), np.abs(xy[:, j] + ref[:, j]).max()) < 1e-5


def test_the_umap_path_is_used_where_umap_learn_is_installed(monkeypatch):
    calls = {}

    class FakeUMAP:
        def __init__(self, **kw):
            calls.update(kw)

        def fit_transform(self, x):
            calls["norms"] = np.linalg.norm(x, axis=1)
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    f = np.random.default_rng(2).normal(size=(30, 6)).astype(np.float32)
    xy, method = embed.project_2d(f, "auto", seed=5)
    assert method == "umap" and calls["random_state"] == 5 and calls["metric"] == "cosine"
    np.testing.assert_allclose(calls["norms"], 1.0, rtol=1e-6)  # fed normalised features
    np.testing.assert_allclose(xy, 2 * f[:, :2] / np.linalg.norm(f, axis=1, keepdims=True),
                               rtol=1e-6)
    assert embed.project_2d(f, "pca")[1] == "pca"  # asked for PCA: PCA
    monkeypatch.setitem(sys.modules, "umap", None)  # not installed
    assert embed.project_2d(f, "auto")[1] == "pca"
    with pytest.raises(ImportError, match=r"pip install -e '\.\[umap\]'"):
        embed.project_2d(f, "umap")


def test_real_umap_where_installed():
    pytest.importorskip("umap")
    f = np.random.default_rng(3).normal(size=(60, 8))
    xy, method = embed.project_2d(f, "umap", seed=0)
    assert method == "umap" and xy.shape == (60, 2) and np.all(np.isfinite(xy))


def test_pictures_have_their_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    path = embed.plot_map(rng.normal(size=(50, 2)), rng.integers(0, 12, 50),
                          [f"class {i}" for i in range(12)], str(tmp_path / "m.png"), title="t")
    assert Image.open(path).size == embed.MAP_SIZE
    images = rng.integers(0, 255, (3, 4, 8, 8, 3), dtype=np.uint8)
    path = embed.plot_retrieval(images[:, 0], [0, 1, 2], images, rng.integers(0, 3, (3, 4)),
                                rng.uniform(size=(3, 4)), None, str(tmp_path / "r.png"),
                                title="t")
    assert Image.open(path).size == embed.retrieval_size(3, 4)
