"""The input pipeline: which examples make each step's batch, and how they become two views.

Stateless by construction: the examples of step s are a pure function of (seed, s) — epoch
e = s // steps_per_epoch is a permutation of the dataset drawn from (seed, e), and step s takes
its slice of it — and every random number of an example's augmentation comes from a seed made
of (seed, s, its global position). So the pipeline restarts at any step with no iterator state
to checkpoint, and a resumed run sees exactly the data an uninterrupted one would.

Each process takes a disjoint, contiguous part of every global batch (global_batch //
process_count rows), so the processes together see each example once per epoch. The remainder
of an epoch (num_examples % global_batch examples, different each epoch) is dropped.

Modes: "host" (all augmentation in tf.data), "split" (crop and flip in tf.data, colour and blur
on the device), "device" (uint8 images straight from memory, all augmentation on the device;
no TensorFlow needed). From records (encoded JPEG/PNG bytes read by index), tf.data decodes
only the part of each image its crops need, and "device" mode gets the images decoded and
resized to a fixed size on the host.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import queue
import threading
from typing import Any, Iterator

import numpy as np

from jaxssl.data.recipes import HOST_OPS, Recipe

__all__ = ["BatchPlan", "batch_spec", "epoch_permutation", "make_pipeline", "MODES"]

MODES = ("host", "split", "device")
# Steps whose records are read ahead of the one tf.data is decoding.
READ_AHEAD = 2


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the dataset in one epoch: int64 [num_examples]."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Which examples each process reads at each step."""

    num_examples: int
    global_batch: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.process_count < 1 or not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count})")
        if self.global_batch <= 0 or self.global_batch % self.process_count:
            raise ValueError(
                f"the global batch size ({self.global_batch}) must be a positive multiple of the "
                f"number of processes ({self.process_count})")
        if self.num_examples < self.global_batch:
            raise ValueError(
                f"the dataset has {self.num_examples} examples, fewer than one global batch "
                f"({self.global_batch}); lower batch_size")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_positions(self) -> np.ndarray:
        """Positions of this process's rows within a global batch: int64 [local_batch]."""
        return self.process_index * self.local_batch + np.arange(self.local_batch)

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows at `step`: int64 [local_batch]."""
        epoch, j = divmod(int(step), self.steps_per_epoch)
        order = epoch_permutation(self.seed, epoch, self.num_examples)
        return order[j * self.global_batch + self.global_positions()]

    def example_seeds(self, step: int) -> np.ndarray:
        """One stateless seed per row: int64 [local_batch, 2] = (seed, step * G + position)."""
        ids = int(step) * self.global_batch + self.global_positions()
        return np.stack([np.full_like(ids, self.seed), ids], axis=1).astype(np.int64)


def _prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a background thread, `depth` items ahead. Closing the returned
    generator (or dropping it) ends the thread, also when it waits on a full queue, and closes
    `iterator`: a library user who calls train() again and again leaks no threads or batches."""
    if depth <= 0:
        yield from iterator
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            put(e)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=worker, daemon=True, name="jaxssl-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while True:  # what is queued is dropped now, not when the thread ends
            try:
                q.get_nowait()
            except queue.Empty:
                break
        thread.join(timeout=10)


def _steps(start_step: int, num_steps: int | None):
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield step
        step += 1


def _device_batches(source, plan: BatchPlan, start_step: int, num_steps: int | None,
                    image_size: int | None, threads: int | None):
    if source.images is None:
        if source.reader is None or not image_size:
            raise ValueError(
                f"augment='device' needs the images in memory as one array, or records and an "
                f"image_size; source {source.name!r} is read from files: use augment='host' or "
                f"'split'")
        yield from _decoded_batches(source, plan, start_step, num_steps, image_size, threads)
        return
    for step in _steps(start_step, num_steps):
        idx = plan.indices(step)
        batch = {"images": source.images[idx]}
        if source.labels is not None:
            batch["labels"] = source.labels[idx]
        yield batch


def _bytes_dataset(T, source, plan: BatchPlan, start_step: int, num_steps: int | None,
                   failed: list):
    """(encoded image, seed [2], label) per row of this process, in step order: one Python
    call per step reads the batch's records; tf.data unbatches them in C++. A read that fails
    (a damaged shard: records.RecordsError) ends the dataset and is appended to `failed`, for
    the consumer to raise as it is after the last whole batch: raised inside tf.data it would
    come out wrapped, with TensorFlow's logs of a Python traceback."""
    labelled = source.labels is not None

    def read(step):
        idx = plan.indices(step)
        labels = source.labels[idx] if labelled else np.zeros(len(idx), np.int32)
        data = np.array(source.reader.read_bytes(idx), dtype=object)
        return data, plan.example_seeds(step), labels.astype(np.int32)

    def batches():
        # The next READ_AHEAD steps' records are read on a thread while tf.data decodes this
        # one: from a bucket a step's reads take a round trip or more (tens of ms).
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxssl-read") as pool:
            ahead = collections.deque()
            steps = iter(_steps(start_step, num_steps))
            for step in itertools.islice(steps, READ_AHEAD):
                ahead.append(pool.submit(read, step))
            while ahead:
                try:
                    batch = ahead.popleft().result()
                except Exception as e:
                    failed.append(e)
                    return
                for step in itertools.islice(steps, 1):
                    ahead.append(pool.submit(read, step))
                yield batch

    return T.data.Dataset.from_generator(batches, output_signature=(
        T.TensorSpec((None,), T.string),
        T.TensorSpec((None, 2), T.int64),
        T.TensorSpec((None,), T.int32),
    )).unbatch()


def _options(T, threads: int | None):
    options = T.data.Options()
    options.deterministic = True  # parallel map, but outputs in order: batches are reproducible
    if threads:
        options.threading.private_threadpool_size = threads
    return options


def _decoded_batches(source, plan: BatchPlan, start_step: int, num_steps: int | None,
                     image_size: int, threads: int | None):
    """Device mode from records: each image decoded and resized to uint8 [image_size,
    image_size, 3] (shorter side, centre crop) on the host; the device augments."""
    from jaxssl.data import augment_tf
    from jaxssl.data.tf_import import tf

    T = tf()
    failed = []
    ds = _bytes_dataset(T, source, plan, start_step, num_steps, failed)
    ds = ds.with_options(_options(T, threads))
    ds = ds.map(lambda data, seed, label: (augment_tf.decode_resized(data, image_size), label),
                num_parallel_calls=threads or T.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(plan.local_batch, drop_remainder=True).prefetch(T.data.AUTOTUNE)
    for images, labels in ds.as_numpy_iterator():
        batch = {"images": images}
        if source.labels is not None:
            batch["labels"] = labels
        yield batch
    if failed:
        raise failed[0]


def _host_dataset(source, plan: BatchPlan, *, recipe: Recipe, out_size: int, mode: str,
                  start_step: int, num_steps: int | None, threads: int | None):
    from jaxssl.data import augment_tf
    from jaxssl.data.tf_import import tf

    T = tf()
    labelled = source.labels is not None
    failed = []

    def steps():
        # This process's rows, step by step in order, with their stateless seeds.
        for step in _steps(start_step, num_steps):
            idx = plan.indices(step)
            labels = source.labels[idx] if labelled else np.zeros(len(idx), np.int32)
            yield idx, plan.example_seeds(step), labels.astype(np.int32)

    if source.images is not None:
        # In memory: one Python call per step yields the whole batch; tf.data unbatches it in
        # C++, so the per-example work is all TensorFlow ops.
        def batches():
            for idx, seeds, labels in steps():
                yield source.images[idx], seeds, labels

        ds = T.data.Dataset.from_generator(batches, output_signature=(
            T.TensorSpec((None,) + source.images.shape[1:], T.uint8),
            T.TensorSpec((None, 2), T.int64),
            T.TensorSpec((None,), T.int32),
        )).unbatch()
    elif source.reader is not None:
        # Records: encoded bytes into tf.data, where each is decoded only as far as its two
        # crops need (augment_tf.two_views_encoded).
        ds = _bytes_dataset(T, source, plan, start_step, num_steps, failed)
    else:
        # Files: decoded here by source.read (a thread pool, Pillow), one image per element
        # because sizes differ.
        def rows():
            for idx, seeds, labels in steps():
                yield from zip(source.read(idx), seeds, labels)

        ds = T.data.Dataset.from_generator(rows, output_signature=(
            T.TensorSpec((None, None, 3), T.uint8),
            T.TensorSpec((2,), T.int64),
            T.TensorSpec((), T.int32),
        ))

    views = augment_tf.two_views_encoded if source.reader is not None else augment_tf.two_views

    def augment(image, seed, label):
        v1, v2 = views(image, seed, recipe, out_size, mode, source.mean, source.std)
        return (v1, v2), label

    ds = ds.with_options(_options(T, threads))
    ds = ds.map(augment, num_parallel_calls=threads or T.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(plan.local_batch, drop_remainder=True).prefetch(T.data.AUTOTUNE)
    for (v1, v2), labels in ds.as_numpy_iterator():
        batch = {"views": (v1, v2)}
        if labelled:
            batch["labels"] = labels
        yield batch
    if failed:
        raise failed[0]


def make_pipeline(
    source: Any,
    *,
    global_batch: int,
    seed: int,
    mode: str = "device",
    recipe: Recipe | None = None,
    out_size: int | None = None,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    threads: int | None = None,
    image_size: int | None = None,
) -> Iterator[dict]:
    """Batches for steps start_step, start_step + 1, ... (num_steps of them, or forever).

    Each batch is a dict of numpy arrays holding this process's rows ([local_batch, ...]):
      mode "device": "images" uint8 [b, H, W, 3] (the step augments them);
      mode "host":   "views" (v1, v2), float32 [b, S, S, 3], normalised;
      mode "split":  "views" (v1, v2), uint8 [b, S, S, 3], cropped and flipped;
    plus "labels" int32 [b] when the source has labels. S = out_size.
    A source read from records (`source.reader`) gives "device" mode images decoded and resized
    to image_size x image_size on the host (needs image_size). A streamed source (a reader with
    `stream_batches`, `data/tfds_stream.py`) gives the same batches, its rows in the order its
    stream draws from (seed, epoch) instead of the plan's permutation.
    """
    if mode not in MODES:
        raise ValueError(f"unknown augmentation mode {mode!r}; choose one of {list(MODES)}")
    plan = BatchPlan(source.num_examples, global_batch, seed, process_index, process_count)
    if mode != "device" and (recipe is None or out_size is None):
        raise ValueError(f"mode {mode!r} augments on the host: pass recipe and out_size")
    if getattr(source.reader, "stream_batches", None) is not None:
        # No random access (a streamed TFDS split): the reader streams this process's rows in
        # an order of (seed, epoch) and gives them the plan's per-position seeds.
        batches = source.reader.stream_batches(
            plan, mode=mode, recipe=recipe, out_size=out_size, mean=source.mean, std=source.std,
            labelled=source.labels is not None, start_step=start_step, num_steps=num_steps,
            threads=threads, image_size=image_size)
    elif mode == "device":
        batches = _device_batches(source, plan, start_step, num_steps, image_size, threads)
    else:
        assert HOST_OPS[mode]
        batches = _host_dataset(source, plan, recipe=recipe, out_size=out_size, mode=mode,
                                start_step=start_step, num_steps=num_steps, threads=threads)
    return _prefetch(batches, prefetch)


def batch_spec(source: Any, *, global_batch: int, mode: str, out_size: int,
               image_size: int | None = None) -> dict:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`, no sharding) of the global batch that
    `make_pipeline`'s batches make on the mesh, without reading any data: what a step is
    compiled for. The same fields as make_pipeline's; [B, ...] with B = global_batch."""
    import jax

    if mode not in MODES:
        raise ValueError(f"unknown augmentation mode {mode!r}; choose one of {list(MODES)}")
    if mode == "device":
        if source.images is not None:
            shape = source.images.shape[1:]
        elif image_size:  # records or a stream: decoded and resized on the host
            shape = (image_size, image_size, 3)
        else:
            raise ValueError(f"augment='device' needs the images in memory, or records and an "
                             f"image_size; source {source.name!r} is read from files")
        batch = {"images": jax.ShapeDtypeStruct((global_batch, *shape), np.uint8)}
    else:
        view = jax.ShapeDtypeStruct((global_batch, out_size, out_size, 3),
                                    np.float32 if mode == "host" else np.uint8)
        batch = {"views": (view, view)}
    if source.labels is not None:
        batch["labels"] = jax.ShapeDtypeStruct((global_batch,), np.int32)
    return batch
