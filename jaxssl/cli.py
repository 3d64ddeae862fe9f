"""The command line, also `python -m jaxssl ...`:

    jaxssl train --config configs/demo.py --workdir runs/demo [--config.field=value ...]
    jaxssl train --config configs/simclr_imagenet.py --dry-run [--dry_run_devices 64]
    jaxssl eval knn|linear|finetune [...] --workdir runs/demo [--step N] [--config.field=value ...]
    jaxssl export --workdir runs/demo --format safetensors|msgpack --output FILE [--step N]

A user mistake (a misspelt field, a batch the devices cannot split, a workdir of another model,
a step that was not saved, ...) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

__all__ = ["main"]

_EPILOG = """\
overrides: any config field as --config.FIELD=VALUE (or --config.FIELD VALUE), e.g.
  --config.batch_size=128 --config.num_steps=500 --config.data.augment=host
config: a file (configs/simclr_cifar10.py), a name from configs/ (demo), and an optional
  argument for its get_config after a colon (configs/x.py:arg).
"""


_EVAL_EPILOG = """\
the config is the run's own (WORKDIR/config.json); override any field as --config.FIELD=VALUE,
  e.g. --config.eval.linear_epochs=90 --config.eval.linear_augment_copies=10
  --config.eval.finetune_fraction=0.01 --config.eval.batch_size=256
  --config.eval.linear_lr=0.01,0.03,0.1,0.3,1 (a sweep: one program, the best on held-out
  train images reported)
results: printed, and written to WORKDIR/eval/KIND.json (and KIND_stepN.json); embed writes
  WORKDIR/eval/embed_map.png and embed_retrieval.png. Several kinds (jaxssl eval knn linear
  --workdir ...) run one after the other in one start-up. The features of a checkpoint are
  kept in WORKDIR/eval/features-STEP/ and reused (--config.eval.feature_cache=false: not).
"""


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    overrides, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            parser.error(f"unrecognised argument {arg!r}; config fields are set as "
                         "--config.FIELD=VALUE")
        name, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"{arg} needs a value: {arg}=VALUE")
            value, i = rest[i + 1], i + 1
        overrides.append((name, value))
        i += 1
    return overrides


def _train(args, overrides) -> int:
    from jaxssl import configuration

    config = configuration.load_config(args.config)
    configuration.apply_overrides(config, overrides)
    workdir = args.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0])
    if args.dry_run:  # builds and compiles what a run would, reports, writes nothing
        from jaxssl import dryrun

        if args.dry_run_devices is None:
            _start_distributed(args)
        return dryrun.dry_run(config, devices=args.dry_run_devices)
    _start_distributed(args)
    from jaxssl import train  # imports jax: after the config is known to be good

    result = train.train(config, workdir, allow_config_change=args.allow_config_change)
    return 0 if result.status in ("done", "preempted", "stopped") else 1


def _start_distributed(args) -> None:
    """jax.distributed, when flags or a launcher (SLURM, a TPU pod) ask for it; before anything
    touches a JAX backend."""
    from jaxssl import configuration, distributed

    try:
        how = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                     timeout_s=args.distributed_timeout)
    except ValueError as e:
        error = configuration.ConfigError(str(e))
        error.distributed_start = True  # main() ends the process at once after the line
        raise error from e
    if how:
        import jax

        print(f"process {jax.process_index()} of {jax.process_count()} ({how}): "
              f"{jax.local_device_count()} of {jax.device_count()} devices here",
              file=sys.stderr, flush=True)


def _workdir_config(args, overrides):
    from jaxssl import configuration

    config, ignored = configuration.load_workdir_config(args.workdir)
    if ignored:
        print(f"note: {args.workdir}/config.json has fields this jaxssl does not know, ignored: "
              f"{', '.join(ignored)}", file=sys.stderr)
    config.unlock()
    configuration.apply_overrides(config, overrides)
    config.lock()
    configuration.validate(config)
    return config


def _eval(args, overrides) -> int:
    config = _workdir_config(args, overrides)
    _start_distributed(args)
    from jaxssl import evaluation

    # Several kinds in one command share the start-up (and on a pod the distributed start).
    for kind in dict.fromkeys(args.kinds):
        evaluation.evaluate(kind, config, args.workdir, step=args.step)
    return 0


def _export(args, overrides) -> int:
    config = _workdir_config(args, overrides)
    from jaxssl import evaluation

    evaluation.export(config, args.workdir, args.output, fmt=args.format, step=args.step)
    return 0


def _prepare(args, overrides) -> int:
    from jaxssl.data import records

    records.prepare(args.input, args.output, data_dir=args.data_dir, shard_size=args.shard_size,
                    workers=args.workers, strict=args.strict,
                    labelled=False if args.unlabelled else "auto", max_pixels=args.max_pixels,
                    say=lambda m: print(m, flush=True))
    return 0


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group(
        "multi-process", "jax.distributed starts by itself under SLURM (more than one task) and "
        "on a multi-host Cloud TPU slice; elsewhere give all three flags to every process "
        "(see launch/)")
    m.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0, the same for every process")
    m.add_argument("--num_processes", type=int, default=None, help="how many processes in all")
    m.add_argument("--process_id", type=int, default=None, help="this process, 0 .. N-1")
    m.add_argument("--distributed_timeout", type=int, default=300, metavar="SECONDS",
                   help="give up (with an error) when the processes do not all meet within "
                        "this time (default 300)")


class _OrbaxTaskNoise:
    """A filter on the asyncio logger, for the life of the process: "Task exception was never
    retrieved" for orbax's failed write tasks comes when they are collected, often at exit."""

    def filter(self, record) -> bool:
        if record.levelno < 40 or os.environ.get("JAXSSL_DEBUG"):
            return True
        text = record.getMessage()
        # A task of orbax's code, or a bare future of a tensorstore write to a checkpoint.
        return not ("was never retrieved" in text and ("orbax" in text or "OCDBT" in text))


class _BackgroundNoise:
    """While installed: the tracebacks that orbax's background writer and tensorstore's
    callbacks print when a checkpoint write fails are left out (hundreds of lines: the absl
    ERROR record of the writer thread, and "RuntimeError: Event loop is closed" for each write
    still under way, printed by tensorstore straight to sys.stderr, from many threads at once);
    the trainer reports that failure in one line. Every other line passes unchanged.
    JAXSSL_DEBUG=1 shows them all."""

    DROPPED = ("RuntimeError: Event loop is closed",)

    def __init__(self):
        import threading

        self.active = not os.environ.get("JAXSSL_DEBUG")
        self.lock = threading.Lock()
        # Per writing thread: a traceback held back until its last line, and a partial line.
        self.blocks: dict[int, list[str]] = {}
        self.pending: dict[int, str] = {}

    def filter(self, record) -> bool:  # a logging filter on the absl logger
        return not (record.levelno >= 40 and record.exc_info is not None
                    and f"{os.sep}orbax{os.sep}" in record.pathname)

    # sys.stderr while installed
    def write(self, text: str) -> int:
        import threading

        me = threading.get_ident()
        with self.lock:
            pending = self.pending.pop(me, "")
            if me not in self.blocks and "Traceback" not in text and not pending:
                return self.stream.write(text)
            *lines, pending = (pending + text).split("\n")
            for line in lines:
                self._line(me, line + "\n")
            if me not in self.blocks and pending and not "Traceback".startswith(pending[:9]):
                self.stream.write(pending)  # a partial line outside a traceback
                pending = ""
            if pending:
                self.pending[me] = pending
        return len(text)

    def _line(self, me: int, line: str) -> None:
        block = self.blocks.get(me)
        if block is None:
            if line.startswith("Traceback (most recent call last):"):
                self.blocks[me] = [line]
            else:
                self.stream.write(line)
            return
        block.append(line)
        if not line.startswith((" ", "Traceback", "\n", "During handling",
                                "The above exception")):
            if not line.startswith(self.DROPPED):
                self.stream.write("".join(block))
            del self.blocks[me]

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        if self.active:
            import logging

            logging.getLogger("absl").addFilter(self)
            asyncio_log = logging.getLogger("asyncio")
            if not any(isinstance(f, _OrbaxTaskNoise) for f in asyncio_log.filters):
                asyncio_log.addFilter(_OrbaxTaskNoise())
            self.stream, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            import logging

            logging.getLogger("absl").removeFilter(self)
            with self.lock:  # unfinished blocks and lines: nothing else is lost
                for me in set(self.blocks) | set(self.pending):
                    self.stream.write("".join(self.blocks.get(me, [])) + self.pending.get(me, ""))
                self.blocks.clear()
                self.pending.clear()
            sys.stderr = self.stream


@contextlib.contextmanager
def _own_warnings():
    """jaxssl's own warnings (`jaxssl.JaxsslWarning`: skipped image files, ...) as one line in
    jaxssl's voice on stderr, not Python's "file:line: UserWarning" with a source line; any
    other warning as Python shows it."""
    from jaxssl import JaxsslWarning

    show = warnings.showwarning

    def own(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, JaxsslWarning):
            print(f"jaxssl: warning: {' '.join(str(message).split())}", file=sys.stderr,
                  flush=True)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = own
    try:
        yield
    finally:
        warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    with _own_warnings():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="jaxssl", description=(
        "Self-supervised contrastive pretraining (SimCLR, MoCo v2) in JAX."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train or resume a run", epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo",
                   help="config file or name from configs/ (default: demo)")
    p.add_argument("--workdir", default=None,
                   help="where checkpoints and logs go; the same workdir resumes "
                        "(default: runs/<config name>)")
    p.add_argument("--allow_config_change", action="store_true",
                   help="resume although the config changes what is trained (the model, data, "
                        "recipe, batch, optimizer, seed); recorded in config-<step>.json")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="build the data index, model, optimizer and the compiled step, print "
                        "parameters, schedule, memory per device (and whether it fits) and "
                        "FLOPs, and exit without training or touching the workdir; exit 1 when "
                        "the step does not fit the device memory")
    p.add_argument("--dry_run_devices", type=int, default=None, metavar="N",
                   help="with --dry-run: compile for N CPU devices standing in for a larger "
                        "machine's accelerators (e.g. 64 for a 64-chip slice)")
    _distributed_flags(p)
    p.set_defaults(run=_train)
    e = sub.add_parser("eval",
                       help="evaluate a trained workdir: knn, linear, finetune, fewshot or embed",
                       epilog=_EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("kinds", nargs="+", choices=["knn", "linear", "finetune", "fewshot", "embed"],
                   metavar="KIND",
                   help="one or more of knn (the trainer's kNN monitor), linear (a linear "
                        "classifier on frozen features; eval.linear_lr may be a list, chosen on "
                        "held-out train images), finetune (the whole network on a fraction of "
                        "the labels), fewshot (ridge probes on 1-25 images per class) and embed "
                        "(a 2-D map of the features and a retrieval grid, PNGs in WORKDIR/eval)")
    e.add_argument("--workdir", required=True, help="the workdir of a training run")
    e.add_argument("--step", type=int, default=None,
                   help="the checkpoint to evaluate (default: the latest)")
    _distributed_flags(e)
    e.set_defaults(run=_eval)
    x = sub.add_parser("export", help="write a trained backbone for PyTorch (safetensors, "
                                      "torchvision names) or Flax (msgpack)")
    x.add_argument("--workdir", required=True, help="the workdir of a training run")
    x.add_argument("--format", choices=["safetensors", "msgpack"], default="safetensors")
    x.add_argument("--output", required=True, help="the file to write")
    x.add_argument("--step", type=int, default=None,
                   help="the checkpoint to export (default: the latest)")
    x.set_defaults(run=_export)
    r = sub.add_parser("prepare", help="write an image folder or a TFDS split as record shards "
                                       "(data.source=records), locally or to a bucket")
    r.add_argument("--input", required=True,
                   help="an image folder (labelled by first-level subfolder when every image "
                        "lies in one) or tfds:NAME/SPLIT, e.g. tfds:imagenet2012/train")
    r.add_argument("--output", required=True, help="an empty or new folder, local or gs://; "
                                                   "the same command finishes an interrupted run")
    r.add_argument("--data_dir", default=None, help="tfds: where the dataset is prepared")
    r.add_argument("--workers", type=int, default=0,
                   help="processes writing shards at once (default: the CPU count)")
    r.add_argument("--shard_size", type=int, default=1024, help="images per shard")
    r.add_argument("--strict", action="store_true",
                   help="stop at the first image that cannot be read (default: skip and list it)")
    r.add_argument("--unlabelled", action="store_true",
                   help="store no labels even if the images lie in class subfolders")
    r.add_argument("--max_pixels", type=int, default=None,
                   help="width x height above which an image is refused (default 8192 x 8192)")
    r.set_defaults(run=_prepare)
    args, rest = parser.parse_known_args(argv)
    if args.command == "prepare":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return args.run(args, [])
        except ValueError as e:  # records.RecordsError: what to change, in one line
            print(f"jaxssl: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("jaxssl: prepare stopped; run the same command again to finish it (the shards "
                  "written are kept)", file=sys.stderr)
            return 130
    if args.command == "train" and args.dry_run_devices is not None and not args.dry_run:
        p.error("--dry_run_devices goes with --dry-run")
    sub_parser = {"train": p, "eval": e, "export": x}[args.command]
    overrides = _split_overrides(rest, sub_parser)

    from jaxssl.configuration import ConfigError
    try:
        with _BackgroundNoise() as noise:
            try:
                return args.run(args, overrides)
            except Exception as e:
                from jaxssl.checkpoint import CheckpointWriteError

                if argv is None and noise.active and isinstance(e, CheckpointWriteError):
                    # The program (not a caller of main()): orbax's threads go on failing the
                    # writes under way, and printing each, until the process ends: end it here,
                    # inside the filter (the lock is released, the checkpoints are closed).
                    print(f"jaxssl: {e}", file=sys.stderr)
                    sys.stdout.flush()
                    noise.stream.flush()
                    os._exit(1)
                raise
    except ConfigError as e:
        print(f"jaxssl: error: {e}", file=sys.stderr)
        if argv is None and getattr(e, "distributed_start", False):
            # jax.distributed did not start, or was shut down as the processes disagreed:
            # nothing was written, and JAX's clients and gloo threads were once seen to keep a
            # process from exiting (a CI run under load): end it here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("jaxssl: aborted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as e:
        from jaxssl.checkpoint import CheckpointWriteError
        from jaxssl.evaluate.features import NonFiniteFeaturesError
        from jaxssl.train import TrainingDiverged

        from jaxssl.data.records import RecordsError

        # RecordsError here: records that became unreadable during a run (a shard corrupted
        # or gone); what was saved is kept.
        if isinstance(e, (TrainingDiverged, NonFiniteFeaturesError, CheckpointWriteError,
                          RecordsError)):
            print(f"jaxssl: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
