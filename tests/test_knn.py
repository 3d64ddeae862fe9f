import numpy as np
import pytest

from jaxssl import parallel
from jaxssl.evaluate import knn


def _reference_scores(bank, labels, queries, num_classes, k, t):
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ b.T.astype(np.float64)
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


def test_sharded_bank_on_8_devices_equals_one_device():
    bank, labels, queries, qlabels = _data(n=203)  # 203: not a multiple of 8, exercises padding
    mesh = parallel.make_mesh()
    one = knn.knn_scores(bank, labels, queries, num_classes=5, k=30, chunk_size=16)
    eight = knn.knn_scores(bank, labels, queries, num_classes=5, k=30, chunk_size=16, mesh=mesh)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    # k larger than a device's shard (203 / 8 < 30) still finds the global top-k.
    acc = knn.knn_top1(bank, labels, queries, qlabels, num_classes=5, k=30, mesh=mesh)
    ref = _reference_scores(bank, labels, queries, 5, 30, 0.1).argmax(1)
    assert acc == pytest.approx(np.mean(ref == qlabels))
    assert acc > 0.5  # clustered data: far above chance (0.2)


def test_bad_arguments():
    bank, labels, queries, _ = _data()
    with pytest.raises(ValueError, match="16-d but queries are 3-d"):
        knn.knn_scores(bank, labels, queries[:, :3], num_classes=5)
    with pytest.raises(ValueError, match="k >= 1 and temperature > 0"):
        knn.knn_scores(bank, labels, queries, num_classes=5, k=0)
