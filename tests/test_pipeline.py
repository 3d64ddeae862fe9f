"""Determinism, process sharding and restore of the input pipeline."""

import itertools

import numpy as np
import pytest

from jaxssl.data import pipeline, recipes, sources

N, SIDE = 60, 12


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, SIDE, SIDE, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(N)  # pixel (0, 0, R) tells which example a row is
    return sources.from_arrays(images, np.arange(N) % 5)


def _take(it, n):
    return list(itertools.islice(it, n))


def _ids(batch):
    return batch["images"][:, 0, 0, 0].astype(int).tolist()


def test_plan_covers_each_epoch_once_across_two_processes():
    plans = [pipeline.BatchPlan(N, 12, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    assert plans[0].local_batch == 6 and plans[0].steps_per_epoch == 5
    for epoch in range(2):
        seen = []
        for step in range(epoch * 5, (epoch + 1) * 5):
            a, b = (p.indices(step) for p in plans)
            assert not set(a) & set(b)
            seen += list(a) + list(b)
        assert sorted(seen) == list(range(N)), "one epoch = every example exactly once"
    # A different order each epoch, and each seed.
    assert list(plans[0].indices(0)) != list(plans[0].indices(5))
    other = pipeline.BatchPlan(N, 12, seed=4, process_index=0, process_count=2)
    assert list(other.indices(0)) != list(plans[0].indices(0))


def test_example_seeds_are_unique_per_step_and_position():
    plans = [pipeline.BatchPlan(N, 12, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    seeds = {tuple(s) for p in plans for step in range(7) for s in p.example_seeds(step)}
    assert len(seeds) == 2 * 6 * 7


def test_device_mode_is_deterministic_and_restorable(source):
    run = lambda **kw: _take(pipeline.make_pipeline(source, global_batch=12, seed=1, **kw), 8)  # noqa: E731
    a, b = run(), run()
    assert [_ids(x) for x in a] == [_ids(x) for x in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
        np.testing.assert_array_equal(x["labels"], np.asarray(_ids(x)) % 5)
    resumed = _take(pipeline.make_pipeline(source, global_batch=12, seed=1, start_step=3), 5)
    assert [_ids(x) for x in resumed] == [_ids(x) for x in a[3:]]


def test_two_simulated_processes_split_each_batch(source):
    one = _take(pipeline.make_pipeline(source, global_batch=12, seed=1), 5)
    parts = [_take(pipeline.make_pipeline(source, global_batch=12, seed=1, process_index=p,
                                          process_count=2), 5) for p in (0, 1)]
    for whole, p0, p1 in zip(one, *parts):
        assert _ids(p0) + _ids(p1) == _ids(whole)


def test_host_mode_deterministic_and_restorable(source):
    kw = dict(global_batch=12, seed=1, mode="host", recipe=recipes.get_recipe("simclr_cifar"),
              out_size=10, threads=2)
    a = _take(pipeline.make_pipeline(source, **kw), 4)
    b = _take(pipeline.make_pipeline(source, **kw), 4)
    c = _take(pipeline.make_pipeline(source, start_step=2, **kw), 2)
    for x, y in zip(a, b):
        for u, v in zip(x["views"], y["views"]):
            assert u.shape == (12, 10, 10, 3) and u.dtype == np.float32
            np.testing.assert_array_equal(u, v)
    for x, y in zip(a[2:], c):
        np.testing.assert_array_equal(x["views"][0], y["views"][0])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[0]["views"][0], a[0]["views"][1])


def test_split_mode_gives_uint8_views(source):
    batch = next(pipeline.make_pipeline(source, global_batch=12, seed=1, mode="split",
                                        recipe=recipes.get_recipe("simclr"), out_size=8))
    v1, v2 = batch["views"]
    assert v1.dtype == np.uint8 and v1.shape == (12, 8, 8, 3) and v2.shape == v1.shape


def test_bad_arguments(source):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.BatchPlan(N, 64, seed=0)
    with pytest.raises(ValueError, match=r"multiple of the number of processes \(2\)"):
        pipeline.BatchPlan(N, 13, seed=0, process_count=2)
    with pytest.raises(ValueError, match="unknown augmentation mode 'gpu'"):
        pipeline.make_pipeline(source, global_batch=12, seed=0, mode="gpu")
    with pytest.raises(ValueError, match="pass recipe and out_size"):
        pipeline.make_pipeline(source, global_batch=12, seed=0, mode="host")


def test_errors_in_the_producer_reach_the_consumer():
    def broken():
        yield 1
        raise RuntimeError("disk gone")

    it = pipeline._prefetch(broken(), 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="disk gone"):
        next(it)


def test_closing_the_pipeline_ends_its_thread_and_closes_the_producer():
    """Before: after close() the prefetch thread stayed blocked on the full queue, holding its
    batches, for the life of the process: a leak for a library user calling train() in a loop."""
    import threading
    import time

    closed = []

    def endless():
        try:
            yield from itertools.count()
        finally:
            closed.append(True)

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "jaxssl-prefetch"]

    before = len(prefetchers())
    for _ in range(3):
        it = pipeline._prefetch(endless(), 2)
        assert _take(it, 3) == [0, 1, 2]
        time.sleep(0.2)  # the producer fills the queue and waits on it
        it.close()
    assert len(prefetchers()) == before and closed == [True] * 3
    # The whole pipeline too, on the device path.
    batches = pipeline.make_pipeline(sources.from_arrays(
        np.zeros((32, SIDE, SIDE, 3), np.uint8), None), global_batch=8, seed=0, mode="device",
        recipe=recipes.get_recipe("simclr"), out_size=8, prefetch=2)
    next(batches)
    time.sleep(0.2)
    batches.close()
    assert len(prefetchers()) == before
