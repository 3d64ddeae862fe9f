"""TFRecord TFDS splits streamed per process, for splits too large for memory (see
`tfds_input` for the choice and the index every TFDS reader shares).

Process p of P reads its contiguous num_examples // P examples (as TFDS's `split_for_jax_process`
with drop_remainder: only the files that hold them), its files in an order drawn from
(seed, epoch, p), `INTERLEAVE` at once, through a shuffle buffer of `SHUFFLE_BUFFER` records
seeded from the same; epoch e takes the first steps_per_epoch x local_batch records of that
order, so every process gives the trainer's steps_per_epoch steps and, across processes, each
example is seen at most once an epoch (exactly once when the global batch divides the split).
A view's random numbers come from (seed, step, position), as in make_pipeline. The order is a
function of (seed, epoch), so a resumed run is exact: it reads (without parsing or decoding)
the records its epoch already used, up to one epoch of reading. Each epoch starts a new tf.data
pipeline, which first fills its shuffle buffer.

Not random access: `read` serves only the first SCAN_LIMIT examples (the augmentation preview).
The kNN monitor's bank and evaluation read examples by index and need an array_record or
`jaxssl prepare` copy. Batches carry labels, so the online probe works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxssl.data.tfds_input import (_CHUNK, _MAGIC, Instructions, TfdsInputError,
                                    _encoding_error, _one_line, _progress, _source, _stats,
                                    _stats_sample, _tf, dataset_index, slice_instructions,
                                    split_instructions)

__all__ = ["TfdsStream", "load_streamed", "SHUFFLE_BUFFER", "INTERLEAVE", "SCAN_LIMIT"]

# Records in each process's shuffle buffer: ~1 GB of ImageNet JPEGs (110 KB each).
SHUFFLE_BUFFER = 8192
# Files read at once: TFDS's own default cycle length.
INTERLEAVE = 16
# `read` serves indices below this (the augmentation preview reads the first 8).
SCAN_LIMIT = 1024
# Named streams of the per-epoch generator: the file order, the shuffle buffer's seed.
_FILE_ORDER, _SHUFFLE_SEED = 0, 1


class TfdsStream:
    """A TFRecord split streamed per process (see the module docstring). As a `Source.reader`
    it has `stream_batches`, which make_pipeline uses instead of reading by index, and
    `read_bytes`/`read` for the first SCAN_LIMIT examples only. Holds no TensorFlow object, so
    it pickles."""

    random_access = False

    def __init__(self, instructions: Instructions, image_key: str, desc: str,
                 shuffle_buffer: int = SHUFFLE_BUFFER, interleave: int = INTERLEAVE):
        self.instructions, self.image_key, self.name = list(instructions), image_key, desc
        self.num_examples = sum(t for _, _, t in self.instructions)
        self.shuffle_buffer, self.interleave = shuffle_buffer, interleave

    def __len__(self) -> int:
        return self.num_examples

    def _records(self, instructions: Instructions, order=None, cycle: int = 1):
        """tf.data of the serialized examples of `instructions` (in `order`), `cycle` files at
        once (1: in order)."""
        T = _tf()
        ordered = [instructions[i] for i in (range(len(instructions)) if order is None else order)]
        files = T.data.Dataset.from_tensor_slices((
            np.array([p.encode() for p, _, _ in ordered], dtype=object),
            np.array([s for _, s, _ in ordered], np.int64),
            np.array([t for _, _, t in ordered], np.int64)))
        cycle = max(1, min(cycle, len(instructions)))
        read = lambda p, s, t: T.data.TFRecordDataset(p).skip(s).take(t)  # noqa: E731
        if cycle == 1:
            return files.flat_map(read)
        return files.interleave(read, cycle_length=cycle, block_length=1,
                                num_parallel_calls=cycle, deterministic=True)

    def _parse(self, record):
        """(encoded image, label int32, -1 when none) of a serialized tf.train.Example."""
        T = _tf()
        spec = {self.image_key: T.io.FixedLenFeature([], T.string),
                "label": T.io.FixedLenFeature([], T.int64, default_value=-1)}
        ex = T.io.parse_single_example(record, spec)
        return ex[self.image_key], T.cast(ex["label"], T.int32)

    def _damaged(self, e: BaseException) -> TfdsInputError:
        return TfdsInputError(
            f"{self.name}: its TFRecord files cannot be read ({_one_line(e)}): a file is damaged "
            f"or missing; restore it, or prepare the dataset again")

    def _iterate(self, ds):
        T = _tf()
        try:
            yield from ds.as_numpy_iterator()
        except (T.errors.DataLossError, T.errors.NotFoundError, T.errors.InvalidArgumentError,
                T.errors.OutOfRangeError) as e:
            raise self._damaged(e) from None

    def read_bytes(self, indices: Sequence[int]) -> list[bytes]:
        """The encoded images at `indices`, all below SCAN_LIMIT (read from the start of the
        split in order); a one-line TfdsInputError for others: this split has no random access."""
        indices = [int(i) for i in indices]
        if not indices:
            return []
        if max(indices) >= min(SCAN_LIMIT, self.num_examples) or min(indices) < 0:
            raise TfdsInputError(
                f"{self.name} is streamed from TFRecord files, which have no random access: "
                f"reading example {max(indices)} by index (a kNN bank or an evaluation) needs an "
                f"array_record copy (`tfds build ... --file_format=array_record`) or records "
                f"(`jaxssl prepare --input {self.name}`); or turn the kNN monitor off "
                f"(eval.knn=False)")
        head = slice_instructions(self.instructions, 0, max(indices) + 1)
        ds = self._records(head).map(self._parse)
        images = [data for data, _ in self._iterate(ds)]
        return [images[i] for i in indices]

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """The images at `indices` (below SCAN_LIMIT), decoded to uint8 [H, W, 3] RGB each."""
        from jaxssl.data.records import decode_record

        return [decode_record(b) for b in self.read_bytes(indices)]

    def process_instructions(self, process_index: int, process_count: int) -> Instructions:
        """This process's contiguous num_examples // process_count examples (as TFDS's
        split_for_jax_process with drop_remainder=True)."""
        per = self.num_examples // process_count
        return slice_instructions(self.instructions, process_index * per,
                                  (process_index + 1) * per)

    def epoch_records(self, plan, epoch: int, first: int, stop: int):
        """tf.data of serialized examples [first, stop) of this process's order in `epoch`, a
        function of (plan.seed, epoch, plan.process_index). Rows before `first` are read and
        dropped, not parsed or decoded."""
        files = self.process_instructions(plan.process_index, plan.process_count)
        key = [plan.seed, epoch, plan.process_index]
        order = np.random.default_rng(key + [_FILE_ORDER]).permutation(len(files))
        shuffle_seed = int(np.random.default_rng(key + [_SHUFFLE_SEED]).integers(2**62))
        ds = self._records(files, order, self.interleave)
        ds = ds.shuffle(max(1, min(self.shuffle_buffer, sum(t for _, _, t in files))),
                        seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds.take(stop).skip(first)

    def rows(self, plan, start_step: int, num_steps: int | None):
        """Per epoch touched: (epoch, first step, end step, tf.data of (record, seed [2])) for
        this process's rows of steps [first, end), in order."""
        T = _tf()
        spe, lb = plan.steps_per_epoch, plan.local_batch
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            epoch, j = divmod(step, spe)
            end = (epoch + 1) * spe
            if num_steps is not None:
                end = min(end, start_step + num_steps)
            records = self.epoch_records(plan, epoch, j * lb, (end - epoch * spe) * lb)
            seeds = np.concatenate([plan.example_seeds(s) for s in range(step, end)])
            yield epoch, step, end, T.data.Dataset.zip(
                (records, T.data.Dataset.from_tensor_slices(seeds)))
            step = end

    def stream_batches(self, plan, *, mode: str, recipe=None, out_size: int | None = None,
                       mean=None, std=None, labelled: bool = True, start_step: int = 0,
                       num_steps: int | None = None, threads: int | None = None,
                       image_size: int | None = None):
        """make_pipeline's batches (same keys, shapes and dtypes for `mode`) from the stream."""
        from jaxssl.data import augment_tf

        T = _tf()
        if mode == "device" and not image_size:
            raise TfdsInputError(
                f"augment='device' from {self.name} (streamed) decodes every image to one size "
                f"on the host: pass image_size, or use 'host' or 'split'")
        options = T.data.Options()
        options.deterministic = True
        if threads:
            options.threading.private_threadpool_size = threads

        def example(record, seed):
            data, label = self._parse(record)
            if mode == "device":
                return augment_tf.decode_resized(data, image_size), label
            v1, v2 = augment_tf.two_views_encoded(data, seed, recipe, out_size, mode, mean, std)
            return (v1, v2), label  # a tuple: tf.data would stack a list into one tensor

        for _, first, end, ds in self.rows(plan, start_step, num_steps):
            ds = ds.with_options(options).map(
                example, num_parallel_calls=threads or T.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(plan.local_batch, drop_remainder=True).prefetch(T.data.AUTOTUNE)
            count = 0
            for x, labels in self._iterate(ds):
                batch = {"images": x} if mode == "device" else {"views": tuple(x)}
                if labelled:
                    batch["labels"] = labels
                count += 1
                yield batch
            if count != end - first:  # the files hold fewer records than their info says
                raise self._damaged(EOFError(f"{count} of {end - first} batches"))


def _stream_pass(stream: TfdsStream, say) -> dict:
    """Labels of every record (files read INTERLEAVE at once), encodings checked, and the bytes
    of the stats sample kept."""
    T = _tf()
    n = stream.num_examples
    offsets = np.cumsum([0] + [t for _, _, t in stream.instructions])[:-1]
    wanted = np.zeros(n, bool)
    wanted[_stats_sample(n)] = True
    wanted_t = T.constant(wanted)
    jpeg, png = (T.constant(m) for m in _MAGIC)

    spec = {stream.image_key: T.io.FixedLenFeature([], T.string),
            "label": T.io.FixedLenFeature([], T.int64, default_value=-1)}

    def parse(k, records, offset):
        ex = T.io.parse_example(records, spec)
        image = ex[stream.image_key]
        index = offset + k * _CHUNK + T.range(T.shape(records, out_type=T.int64)[0])
        head = T.strings.substr(image, 0, 8)
        ok = T.equal(T.strings.substr(image, 0, 3), jpeg) | T.equal(head, png)
        return index, ex["label"], ok, T.where(T.gather(wanted_t, index), image, ""), head

    def one_file(path, skip, take, offset):
        ds = T.data.TFRecordDataset(path).skip(skip).take(take).batch(_CHUNK).enumerate()
        return ds.map(lambda k, records: parse(k, records, offset))

    paths = np.array([p.encode() for p, _, _ in stream.instructions], dtype=object)
    files = T.data.Dataset.from_tensor_slices((
        paths, np.array([s for _, s, _ in stream.instructions], np.int64),
        np.array([t for _, _, t in stream.instructions], np.int64), offsets.astype(np.int64)))
    cycle = max(1, min(INTERLEAVE, len(paths)))
    ds = files.interleave(one_file, cycle_length=cycle, num_parallel_calls=cycle,
                          deterministic=False).prefetch(2)
    labels, seen = np.full(n, -1, np.int64), np.zeros(n, bool)
    sampled, report, done = {}, _progress(say, stream.name, n), 0
    for index, label, ok, keep, head in stream._iterate(ds):
        if not ok.all():
            bad = int(np.argmin(ok))
            raise _encoding_error(stream.name, int(index[bad]), bytes(head[bad]))
        labels[index], seen[index] = label, True
        mask = wanted[index]
        sampled.update((int(i), bytes(b)) for i, b in zip(index[mask], keep[mask]))
        done += len(index)
        report(done)
    if not seen.all():
        raise stream._damaged(EOFError(f"{int(seen.sum())} of {n} records read"))
    mean, std = _stats([sampled[i] for i in sorted(sampled)])
    return {"labels": labels, "mean": np.array(mean), "std": np.array(std)}


def load_streamed(builder, name: str, split: str, image_key: str, label_names,
                  say: Callable[[str], None] = print) -> Any:
    """A TFRecord split as a streamed Source (`TfdsStream`); label_names as load_indexed."""
    desc = f"tfds:{name}/{split}"
    stream = TfdsStream(split_instructions(builder, name, split), image_key, desc)
    if not len(stream):
        raise TfdsInputError(f"{desc} holds no examples; pick another split")
    index = dataset_index(builder, split, desc, stream.instructions,
                          lambda: _stream_pass(stream, say), say)
    return _source(desc, stream, index, label_names)
