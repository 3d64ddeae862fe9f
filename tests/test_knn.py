import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import parallel
from jaxssl.evaluate import knn


def _reference_scores(bank, labels, queries, num_classes, k, t):
    """Brute force in float64: cosine to every bank row, stable top-k, exp(sim / t) votes."""
    b = np.asarray(bank, np.float64)
    q = np.asarray(queries, np.float64)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    sim = q @ b.T
    scores = np.zeros((len(q), num_classes))
    for i in range(len(q)):
        top = np.argsort(-sim[i], kind="stable")[:k]
        for j in top:
            scores[i, labels[j]] += np.exp(sim[i, j] / t)
    return scores


def _data(n=203, q=37, d=16, c=5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    labels = rng.integers(0, c, n)
    bank = centres[labels] + 1.5 * rng.normal(size=(n, d))
    qlabels = rng.integers(0, c, q)
    queries = centres[qlabels] + 1.5 * rng.normal(size=(q, d))
    return bank.astype(np.float32), labels, queries.astype(np.float32), qlabels


@pytest.mark.parametrize("k,chunk", [(1, 8), (20, 10), (200, 256)])
def test_scores_match_numpy_reference(k, chunk):
    bank, labels, queries, _ = _data()
    got = knn.knn_scores(bank, labels, queries, num_classes=5, k=k, temperature=0.1, chunk_size=chunk)
    ref = _reference_scores(bank, labels, queries, 5, k, 0.1)
    np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_hand_computed_vote():
    bank = np.array([[1, 0], [0, 1], [1, 0.1]], np.float32)
    labels = np.array([0, 1, 2])
    scores = knn.knn_scores(bank, labels, np.array([[1, 0]], np.float32), num_classes=3, k=2,
                            temperature=0.5)
    # Neighbours: bank 0 (sim 1) and bank 2 (sim 1/sqrt(1.01)); bank 1 (sim 0) is not among k=2.
    expected = [np.exp(1 / 0.5), 0.0, np.exp(1 / np.sqrt(1.01) / 0.5)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


@pytest.mark.parametrize("bank_chunk", [65536, 9])
def test_sharded_bank_on_8_devices_equals_one_device(bank_chunk):
    bank, labels, queries, qlabels = _data(n=203)  # 203: not a multiple of 8, exercises padding
    mesh = parallel.make_mesh()
    kw = dict(num_classes=5, k=30, bank_chunk_size=bank_chunk)
    one = knn.knn_scores(bank, labels, queries, chunk_size=16, **kw)
    eight = knn.knn_scores(bank, labels, queries, chunk_size=16, mesh=mesh, **kw)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    np.testing.assert_array_equal(eight.argmax(1), one.argmax(1))
    # k larger than a device's shard (203 / 8 < 30) still finds the global top-k.
    acc = knn.knn_top1(bank, labels, queries, qlabels, mesh=mesh, **kw)
    ref = _reference_scores(bank, labels, queries, 5, 30, 0.1).argmax(1)
    assert acc == pytest.approx(np.mean(ref == qlabels))
    assert acc > 0.5  # clustered data: far above chance (0.2)


# N = 203 is a multiple of neither the bank chunk nor the 8 devices (26 rows each, 5 of padding
# in all); k = 30 exceeds a bank chunk of 7 and a device's 26 rows; k = 250 exceeds N.
@pytest.mark.parametrize("k,bank_chunk", [(30, 7), (5, 16), (250, 64)])
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "8_devices"])
def test_bank_chunks_equal_unchunked_and_reference(k, bank_chunk, sharded):
    bank, labels, queries, _ = _data(n=203, q=37)
    mesh = parallel.make_mesh() if sharded else None
    kw = dict(num_classes=5, k=k, temperature=0.1, chunk_size=16, mesh=mesh)
    chunked = knn.knn_scores(bank, labels, queries, bank_chunk_size=bank_chunk, **kw)
    whole = knn.knn_scores(bank, labels, queries, bank_chunk_size=10**6, **kw)
    ref = _reference_scores(bank, labels, queries, 5, k, 0.1)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    np.testing.assert_allclose(chunked, ref, rtol=2e-4)
    np.testing.assert_array_equal(chunked.argmax(1), ref.argmax(1))


def test_vote_in_blocks_equals_reference(monkeypatch):
    # ImageNet-sized votes are counted a few neighbours at a time; here blocks of 7 of k = 30
    # (the last block padded with zero-weight neighbours).
    bank, labels, queries, _ = _data(n=203, q=37)
    monkeypatch.setattr(knn, "_VOTE_BLOCK_ELEMENTS", 16 * 5 * 7)
    knn._program.cache_clear()  # programs are cached by their arguments, not this constant
    try:
        got = knn.knn_scores(bank, labels, queries, num_classes=5, k=30, chunk_size=16)
    finally:
        knn._program.cache_clear()
    np.testing.assert_allclose(got, _reference_scores(bank, labels, queries, 5, 30, 0.1), rtol=2e-4)


def _assert_row_split(placed, n_rows, d, dtype, mesh):
    assert placed.shape == (n_rows, d) and placed.dtype == dtype
    assert placed.sharding.is_equivalent_to(parallel.data_sharded(mesh), 2)
    shards = placed.addressable_shards
    assert len({s.device for s in shards}) == 8
    assert all(s.data.shape == (n_rows // 8, d) for s in shards)  # an eighth each, never all


@pytest.mark.parametrize("source", ["numpy", "replicated", "one_device", "sharded"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bank_is_split_over_the_devices(source, dtype):
    mesh = parallel.make_mesh()
    n = 208 if source == "sharded" else 203  # a P(data) jax.Array needs a multiple of 8 rows
    bank = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    given = {"numpy": lambda: bank,
             "replicated": lambda: jax.device_put(bank, parallel.replicated(mesh)),
             "one_device": lambda: jax.device_put(bank, jax.devices()[3]),
             "sharded": lambda: jax.device_put(bank, parallel.data_sharded(mesh))}[source]()
    placed = knn._place_bank(given, mesh, jnp.dtype(dtype))
    _assert_row_split(placed, 208, 16, dtype, mesh)
    np.testing.assert_array_equal(np.asarray(placed[:n]), bank.astype(dtype))
    np.testing.assert_array_equal(np.asarray(placed[n:]), 0)
    if source == "sharded" and dtype == jnp.float32:
        assert placed is given  # already as needed: used as it is, no copy


# bfloat16: XLA:CPU widens the whole bank to float32 outside the loop unless told not to
# (_rows_f32).
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_program_gathers_only_candidates_and_memory_does_not_grow_with_the_bank(dtype):
    mesh = parallel.make_mesh()
    k, chunk, bank_chunk, d = 30, 16, 256, 64
    queries = jax.device_put(np.ones((40, d), np.float32), parallel.replicated(mesh))
    temps = {}
    for n in (8 * 2048, 8 * 16384):
        bank = jax.ShapeDtypeStruct((n, d), dtype, sharding=parallel.data_sharded(mesh))
        labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=parallel.data_sharded(mesh))
        program = knn._program(mesh, n_valid=n, k=k, num_classes=5, temperature=0.1,
                               chunk=chunk, bank_chunk=bank_chunk)
        compiled = program.lower(queries, bank, labels).compile()
        # The only cross-device traffic: each device's k candidates per query of a chunk.
        gathered = set(re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather", compiled.as_text()))
        assert gathered == {("f32", f"{chunk},{8 * k}"), ("s32", f"{chunk},{8 * k}")}
        temps[n] = compiled.memory_analysis().temp_size_in_bytes
    # 8x the bank (up to 4 MiB a device) needs no more working memory: no copy of the bank,
    # no [N]-wide similarity row.
    assert temps[8 * 16384] <= temps[8 * 2048] + 4096


def test_bfloat16_bank_keeps_top1_on_separated_clusters():
    rng = np.random.default_rng(1)
    c, d = 10, 32
    centres = 4.0 * rng.normal(size=(c, d))
    labels, qlabels = rng.integers(0, c, 500), rng.integers(0, c, 64)
    bank = (centres[labels] + rng.normal(size=(500, d))).astype(np.float32)
    queries = (centres[qlabels] + rng.normal(size=(64, d))).astype(np.float32)
    mesh = parallel.make_mesh()
    kw = dict(num_classes=c, k=20, chunk_size=16, bank_chunk_size=24, mesh=mesh)
    f32 = knn.knn_scores(bank, labels, queries, **kw)
    bf16 = knn.knn_scores(bank, labels, queries, bank_dtype=jnp.bfloat16, **kw)
    np.testing.assert_array_equal(bf16.argmax(1), f32.argmax(1))
    assert np.mean(f32.argmax(1) == qlabels) > 0.9
    np.testing.assert_allclose(bf16, f32, rtol=0.1, atol=1e-3 * f32.max())
    # A bank handed over in a low-precision dtype (numpy float16, jax bfloat16) is accepted too.
    half = knn.knn_scores(bank.astype(np.float16), labels, queries, **kw)
    np.testing.assert_array_equal(half.argmax(1), f32.argmax(1))
    bf16_in = knn.knn_scores(jnp.asarray(bank, jnp.bfloat16), labels, queries, **kw)
    np.testing.assert_allclose(bf16_in, bf16, rtol=1e-6)


def test_bad_arguments():
    bank, labels, queries, _ = _data()
    with pytest.raises(ValueError, match="16-d but queries are 3-d"):
        knn.knn_scores(bank, labels, queries[:, :3], num_classes=5)
    with pytest.raises(ValueError, match="k >= 1 and temperature > 0"):
        knn.knn_scores(bank, labels, queries, num_classes=5, k=0)
    with pytest.raises(ValueError, match="chunk sizes >= 1"):
        knn.knn_scores(bank, labels, queries, num_classes=5, bank_chunk_size=0)
    with pytest.raises(ValueError, match="bank_dtype must be a float dtype"):
        knn.knn_scores(bank, labels, queries, num_classes=5, bank_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        knn.knn_scores(bank, labels, queries, num_classes=4)
    with pytest.raises(ValueError, match="one label per row"):
        knn.knn_scores(bank, labels[:-1], queries, num_classes=5)


def test_padded_bank_with_bank_rows_equals_the_exact_bank():
    """A bank padded with zero rows (FeatureExtractor(padded=True)) and bank_rows: the padding
    never votes, and a bank already split over the devices is used as it is."""
    bank, labels, queries, _ = _data(n=203)
    mesh = parallel.make_mesh()
    padded = jax.device_put(np.pad(bank, ((0, 5), (0, 0))), parallel.data_sharded(mesh))
    kw = dict(num_classes=5, k=30, chunk_size=16, mesh=mesh)
    np.testing.assert_allclose(knn.knn_scores(padded, labels, queries, bank_rows=203, **kw),
                               knn.knn_scores(bank, labels, queries, **kw), rtol=1e-6)
    with pytest.raises(ValueError, match="one label per row"):
        knn.knn_scores(padded, labels, queries, bank_rows=204, **kw)
