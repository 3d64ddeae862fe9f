"""Training configs: the fields the trainer reads, loading a config file, command-line overrides.

A config file (configs/*.py) defines `get_config(arg=None) -> ml_collections.ConfigDict`,
usually by changing the fields of `default_config()`. `load_config("configs/x.py:arg")` calls
it and locks the result, so a misspelt field, in the file or in an override such as
`--config.batch_size=64`, is an error naming the nearest valid field instead of a new field
that nothing reads.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict

__all__ = ["ConfigError", "default_config", "load_config", "apply_overrides", "CONFIG_DIR",
           "flat_fields", "validate",
           "load_workdir_config"]

# The configs/ folder of a source checkout: `--config demo` means configs/demo.py there.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _methods():
    from jaxssl import methods

    return methods.METHODS


def __getattr__(name: str):
    # METHODS: method -> its name in messages, from the registry `jaxssl.methods.METHODS`
    # (read on use, so that importing this module does not import JAX).
    if name == "METHODS":
        return {key: m.title for key, m in _methods().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A config that cannot run; the message is one line saying what to change."""


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults (a small SimCLR run on the built-in data)."""
    c = ml_collections.ConfigDict()
    c.method = "simclr"  # a key of jaxssl.methods.METHODS: simclr, moco (MoCo v2), byol,
    # simsiam, barlow_twins, vicreg, mocov3; each method's own fields are in its group below
    c.seed = 0
    c.batch_size = 256  # global, over all devices and processes
    c.num_epochs = 100
    c.num_steps = config_dict.placeholder(int)  # when set, wins over num_epochs
    c.log_every_steps = 50
    c.eval_every_steps = 1000  # kNN also runs before the first step and after the last
    c.checkpoint_every_steps = 1000  # and at the end, and on SIGTERM

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"  # a key of jaxssl.data.sources.SOURCES
    c.data.name = ""  # tfds: the dataset name, e.g. "cifar10"
    c.data.path = ""  # cifar10_npz: the .npz file; folder: the image folder; records: the
    # directory `jaxssl prepare` wrote (local or gs://)
    c.data.eval_path = ""  # folder/records: labelled kNN queries, same kind as path ("" = none)
    c.data.data_dir = ""  # tfds: the prepared data directory ("" = TFDS's default)
    c.data.image_size = 0  # tfds: resize to this square size when loading (0 = as stored);
    # records with augment="device": the square size the host decodes each image to
    # folder: an image of more pixels (width x height, from its header) is a bad file, never
    # decoded, so a small file claiming a huge size cannot exhaust memory (0 = 8192 x 8192)
    c.data.max_pixels = 0
    c.data.train_split = "train"
    c.data.eval_split = "test"  # the kNN queries; the bank is train_split without augmentation
    c.data.augment = "device"  # "device" (JAX, on the accelerator), "host" (tf.data) or "split"
    c.data.recipe = "simclr_cifar"  # a key of jaxssl.data.recipes.RECIPES
    c.data.out_size = 32  # side of the augmented views and of the kNN inputs
    c.data.prefetch = 2  # batches prepared ahead by a background thread
    c.data.threads = 0  # tf.data threads (0 = autotune)

    c.model = ml_collections.ConfigDict()
    c.model.encoder = "resnet18"  # a key of jaxssl.models.ENCODERS
    c.model.cifar_stem = True
    c.model.width = 64
    c.model.zero_init_last_bn = False
    c.model.head_hidden_dims = (2048,)
    c.model.out_dim = 128
    c.model.output_bn = False
    c.model.dtype = "float32"  # or "bfloat16" (BatchNorm statistics stay float32)
    c.model.bn = "global"  # a key of jaxssl.parallel.BN_MODES
    # The predictor MLP's hidden widths, for the methods with one (BYOL, SimSiam, MoCo v3):
    # out_dim -> hidden (BN, ReLU) -> out_dim.
    c.model.predictor_hidden_dims = (4096,)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "lars"  # a key of jaxssl.optim.OPTIMIZERS
    c.optim.base_lr = 0.3
    c.optim.lr_scaling = "linear"  # peak lr = base_lr x batch/256; "sqrt" or "none"
    c.optim.warmup_epochs = 10.0
    c.optim.end_lr = 0.0
    c.optim.weight_decay = 1e-6
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.trust_coefficient = 0.001
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    # True: the predictor's learning rate stays at its peak after the warmup instead of
    # decaying with the rest (SimSiam's recipe; solo-learn's static_lr). Methods with a predictor.
    c.optim.fixed_predictor_lr = False

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1
    # SimCLR: 0 computes the [2N, 2N] logits at once; > 0 in tiles of this side
    # (losses.info_nce_blockwise: the same loss, memory bounded for very large batches).
    c.loss.block_size = 0

    # Each method's own fields, a group named after it (jaxssl/methods/<name>.py).
    for name, method in _methods().items():
        if method.config_group is not None:
            c[name] = method.config_group()

    c.eval = ml_collections.ConfigDict()
    c.eval.knn = True
    c.eval.knn_k = 200
    c.eval.knn_temperature = 0.1
    c.eval.bank_examples = 0  # train examples in the kNN bank (0 = all)
    c.eval.query_examples = 0  # eval-split examples queried (0 = all)
    c.eval.batch_size = 512  # images per forward pass when computing features
    # `jaxssl eval` keeps the eval-mode features of a checkpoint in WORKDIR/eval/features-<step>/
    # and reuses them in later evaluations of that checkpoint (knn, linear, fewshot, embed).
    c.eval.feature_cache = True
    # The online probe: a linear classifier trained during pretraining on stop-gradient
    # features (metric train/online_top1), where the train split has labels.
    c.eval.online_probe = True
    c.eval.online_probe_lr = 0.1  # SGD, Nesterov momentum 0.9, cosine to 0, not batch-scaled
    # `jaxssl eval linear`: a linear classifier on frozen eval-mode features of the train split.
    c.eval.linear_epochs = 100
    c.eval.linear_batch_size = 256
    # At batch 256; scaled linearly with linear_batch_size. A list (--config.eval.linear_lr=
    # 0.01,0.1,1) trains one classifier per learning rate at once, scores each on
    # linear_val_fraction of the train split held out, and reports the best one on the eval split.
    c.eval.linear_lr = config_dict.FieldReference(0.1, field_type=object)
    c.eval.linear_val_fraction = 0.1
    c.eval.linear_optimizer = "sgd"  # "sgd" (Nesterov momentum 0.9) or "lars"; no weight decay
    c.eval.linear_standardize = True  # features standardised with the train split's statistics
    # 0: train features of centre crops. K > 0: of K random-resized-crop + flip views of every
    # train image (eval.finetune_crop_scale), computed once; the classifier then trains
    # linear_epochs / K epochs over the K views, the same number of steps.
    c.eval.linear_augment_copies = 0
    # `jaxssl eval finetune`: the whole network on a class-balanced fraction of the labels.
    c.eval.finetune_fraction = 0.1  # 0.01 and 0.1 are SimCLR's semi-supervised settings
    c.eval.finetune_epochs = 30  # SimCLR: 60 for 1%, 30 for 10%
    c.eval.finetune_batch_size = 256
    c.eval.finetune_lr = 0.05  # at batch 256, scaled linearly; Nesterov SGD, cosine, no decay
    c.eval.finetune_weight_decay = 0.0
    c.eval.finetune_crop_scale = (0.08, 1.0)  # random resized crop + flip, nothing else
    # `jaxssl eval fewshot`: ridge probes on this many train images per class, each over
    # fewshot_draws seeded draws; the regulariser chosen on fewshot_val_per_class other train
    # images per class of the same draw.
    c.eval.fewshot_shots = (1, 5, 10, 25)
    c.eval.fewshot_draws = 5
    c.eval.fewshot_val_per_class = 10
    # `jaxssl eval embed`: a 2-D map of embed_points eval images (UMAP where umap-learn is
    # installed, else PCA; embed_method forces one) and a grid of embed_queries eval images,
    # each with its embed_neighbours nearest train images by cosine similarity.
    c.eval.embed_points = 5000
    c.eval.embed_method = "auto"  # "auto", "umap" or "pca"
    c.eval.embed_queries = 8
    c.eval.embed_neighbours = 8

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # the last few; the best by eval/knn_top1 is kept too
    c.checkpoint.async_save = True

    # Where the logged values go besides metrics.jsonl and TensorBoard (process 0 only).
    c.log = ml_collections.ConfigDict()
    # A Weights & Biases project: every metrics.jsonl record, the config and the PNGs go to a
    # wandb run, continued on resume ("" = no wandb; needs `pip install -e '.[wandb]'`).
    # WANDB_MODE=offline keeps it in WORKDIR/wandb/ for a later `wandb sync`.
    c.log.wandb_project = ""
    c.log.wandb_entity = ""  # the team or user ("" = wandb's default for the API key)
    c.log.wandb_name = ""  # the run's display name ("" = wandb's choice)
    c.lock()  # config files change fields; a misspelt one fails where it is written
    return c


def flat_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field: ["seed", "data.source", ...]."""
    names = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            names += flat_fields(value, f"{prefix}{key}.")
        else:
            names.append(prefix + key)
    return names


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    def ratio(a, b):
        return difflib.SequenceMatcher(None, a, b).ratio()

    scored = sorted(((ratio(name, c), c) for c in choices), reverse=True)
    if not scored or scored[0][0] < 0.5:  # compare the last part alone: "lr" -> "optim.base_lr"
        tail = name.rsplit(".", 1)[-1]
        scored = sorted(((ratio(tail, c.rsplit(".", 1)[-1]), c) for c in choices), reverse=True)
    if not scored or scored[0][0] < 0.5:
        return ""
    # The best match, and a second one when it is about as close ("lr": base_lr or end_lr).
    near = [c for r, c in scored[:2] if r >= scored[0][0] - 0.05]
    return "; did you mean " + " or ".join(f"'{n}'" for n in near) + "?"


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(
        "jaxssl_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve_config_path(name: str) -> str:
    """A config file path from a path or a bare name of configs/ ("demo")."""
    if os.path.isfile(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".py") else name + ".py")
    if os.sep not in name and os.path.isfile(candidate):
        return candidate
    known = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")) \
        if os.path.isdir(CONFIG_DIR) else []
    hint = f" (configs here: {', '.join(known)})" if known else ""
    raise ConfigError(f"config file {name!r} not found{hint}")


def base_config(name: str, *args) -> ml_collections.ConfigDict:
    """get_config(*args) of another config file (a path, or a name from configs/), unlocked:
    the base that a variant config edits, so the variant states only what it changes."""
    return _load_module(resolve_config_path(name)).get_config(*args)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load "path/to/config.py[:arg]" (or a bare name from configs/) and lock it."""
    name, _, arg = spec.partition(":")
    path = resolve_config_path(name)
    try:
        module = _load_module(path)
    except AttributeError as e:  # a misspelt field inside the file: one line, nearest name
        raise ConfigError(f"{path}: {_one_line(e)}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except (AttributeError, ValueError) as e:  # a misspelt field; an argument it refuses
        raise ConfigError(f"{path}: {_one_line(e)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    known, fields = flat_fields(default_config()), flat_fields(config)
    extra = [f for f in fields if f not in known]
    if extra:
        raise ConfigError(f"{path} sets the unknown field '{extra[0]}'{_did_you_mean(extra[0], known)}")
    missing = sorted(set(known) - set(fields))
    if missing:
        raise ConfigError(f"{path} lacks the fields {', '.join(missing)}: build it on "
                          "jaxssl.configuration.default_config()")
    config.lock()
    return config


def load_workdir_config(workdir: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The config a training run wrote to workdir/config.json, on today's defaults, locked.

    Fields added to jaxssl since the run take their defaults; fields the file has that jaxssl no
    longer knows are returned by name (second element) and otherwise ignored. ConfigError when
    the workdir or its config.json is missing or unreadable.
    """
    import json

    from jaxssl import files

    workdir = files.resolve(workdir)
    path = files.join(workdir, "config.json")
    if not files.isdir(workdir):
        raise ConfigError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
    if not files.isfile(path):
        raise ConfigError(f"{workdir} has no config.json: it is not the workdir of a training run "
                          "(jaxssl train --workdir DIR writes one)")
    try:
        saved = json.loads(files.read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {_one_line(e)}") from e
    config, ignored = default_config(), []

    def assign(node, tree, prefix):
        for key, value in tree.items():
            if key not in node:
                ignored.append(prefix + key)
            elif isinstance(node[key], ml_collections.ConfigDict):
                if isinstance(value, dict):
                    assign(node[key], value, f"{prefix}{key}.")
                else:
                    ignored.append(prefix + key)
            else:
                kind = node.get_type(key)
                value = tuple(value) if kind is tuple and isinstance(value, list) else value
                value = float(value) if kind is float and isinstance(value, int) else value
                try:
                    node[key] = value
                except TypeError as e:
                    raise ConfigError(f"{path}: field {prefix}{key} = {value!r} does not fit "
                                      f"({_one_line(e)})") from e

    assign(config, saved, "")
    return config, ignored


def _one_line(e: BaseException) -> str:
    text = str(e).strip("'\" ")
    lines = [line for line in text.splitlines() if line.strip()]
    hint = next((line for line in lines if line.startswith("Did you mean")), "")
    return (lines[0][:160] if lines else type(e).__name__) + (f" ({hint})" if hint else "")


def _parse_value(raw: str, kind: type, field: str):
    """A command-line string as a value of the field's type."""
    if kind is str:
        return raw
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config field {field} wants true or false; got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if kind is tuple:
        if isinstance(value, (int, float)):
            value = (value,)
        elif raw.strip() in ("", "()"):
            value = ()
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"config field {field} wants a tuple such as '(512, 512)'; got {raw!r}")
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and raw.strip().lower() == "none":
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config field {field} wants {kind.__name__}; got {raw!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]]) -> None:
    """Set dotted fields from strings, in place: [("batch_size", "64"), ("data.augment", "host")]."""
    fields = flat_fields(config)
    for name, raw in overrides:
        if name not in fields:
            groups = {f.split(".")[0] for f in fields if "." in f}
            what = "config group, not a field" if name in groups else "config field"
            raise ConfigError(f"unknown {what} '{name}'{_did_you_mean(name, fields)}")
        *parents, leaf = name.split(".")
        node = config
        for p in parents:
            node = node[p]
        value = _parse_value(raw, node.get_type(leaf), name)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"config field {name} cannot take {raw!r}: {_one_line(e)}") from e


def linear_learning_rates(value) -> tuple[float, ...] | None:
    """eval.linear_lr as a tuple of learning rates when it is a list (a sweep), None when it is
    one number; ConfigError when it is neither, or holds one that is not positive."""
    many = isinstance(value, (tuple, list))
    lrs = tuple(value) if many else (value,)
    ok = len(lrs) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                              for v in lrs)
    _check(ok, f"eval.linear_lr must be a positive number or a list of them, e.g. 0.1 or "
               f"0.01,0.1,1; got {value!r}")
    if many and len(set(lrs)) != len(lrs):
        raise ConfigError(f"eval.linear_lr lists a learning rate twice: {value!r}")
    return tuple(float(v) for v in lrs) if many else None


def _choice(field: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"unknown {field} {value!r}{_did_you_mean(value, choices)} "
                          f"(valid: {', '.join(choices)})")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError (one line) for a value the trainer cannot use, before anything runs."""
    from jaxssl import models, optim, parallel
    from jaxssl.data import pipeline, recipes, sources

    _choice("method", config.method, _methods())
    method = _methods()[config.method]
    if method.validate is not None:
        method.validate(config)
    _choice("data.source", config.data.source, sources.SOURCES)
    _choice("data.augment", config.data.augment, pipeline.MODES)
    _choice("data.recipe", config.data.recipe, recipes.RECIPES)
    _choice("model.encoder", config.model.encoder, models.ENCODERS)
    _choice("model.dtype", config.model.dtype, ("float32", "bfloat16"))
    _choice("model.bn", config.model.bn, parallel.BN_MODES)
    _choice("optim.name", config.optim.name, optim.OPTIMIZERS)
    _choice("optim.lr_scaling", config.optim.lr_scaling, optim.LR_SCALING)
    _check(config.batch_size > 0, f"batch_size must be positive; got {config.batch_size}")
    if config.num_steps is None:
        _check(config.num_epochs > 0, f"num_epochs must be positive (or set num_steps); got "
                                      f"{config.num_epochs}")
    else:
        _check(config.num_steps > 0, f"num_steps must be positive; got {config.num_steps}")
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        _check(config[field] > 0, f"{field} must be positive; got {config[field]}")
    _check(config.loss.temperature > 0, f"loss.temperature must be positive; got "
                                        f"{config.loss.temperature}")
    _check(config.loss.block_size >= 0, f"loss.block_size must be >= 0 (0 = the plain loss, "
                                        f"e.g. 4096 for tiles); got {config.loss.block_size}")
    _check(config.data.out_size >= 8, f"data.out_size must be at least 8; got {config.data.out_size}")
    _check(config.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    _check(not config.optim.fixed_predictor_lr or method.predictor,
           f"optim.fixed_predictor_lr is for a method with a predictor "
           f"({', '.join(n for n, m in _methods().items() if m.predictor)}); "
           f"{config.method} has none")
    _check(config.eval.knn_k >= 1, f"eval.knn_k must be >= 1; got {config.eval.knn_k}")
    _check(config.eval.knn_temperature > 0, "eval.knn_temperature must be positive")
    _check(config.eval.batch_size > 0, "eval.batch_size must be positive")
    e = config.eval
    _check(e.online_probe_lr > 0, f"eval.online_probe_lr must be positive; got {e.online_probe_lr}")
    for field in ("linear_epochs", "linear_batch_size", "finetune_epochs",
                  "finetune_batch_size", "finetune_lr", "embed_points", "embed_queries",
                  "embed_neighbours"):
        _check(e[field] > 0, f"eval.{field} must be positive; got {e[field]}")
    linear_learning_rates(e.linear_lr)  # a ConfigError when it is neither a number nor a list
    _check(0 < e.linear_val_fraction < 1, f"eval.linear_val_fraction must lie in (0, 1), e.g. "
                                          f"0.1; got {e.linear_val_fraction}")
    _choice("eval.embed_method", e.embed_method, ("auto", "umap", "pca"))
    _choice("eval.linear_optimizer", e.linear_optimizer, ("sgd", "lars"))
    shots = tuple(e.fewshot_shots)
    _check(len(shots) > 0 and all(isinstance(k, int) and k > 0 for k in shots),
           f"eval.fewshot_shots must be positive whole numbers, e.g. (1, 5, 10, 25); got {shots}")
    _check(e.fewshot_draws >= 1, f"eval.fewshot_draws must be >= 1; got {e.fewshot_draws}")
    _check(e.fewshot_val_per_class >= 1,
           f"eval.fewshot_val_per_class must be >= 1; got {e.fewshot_val_per_class}")
    _check(e.linear_augment_copies >= 0, f"eval.linear_augment_copies must be >= 0; got "
                                         f"{e.linear_augment_copies}")
    _check(0 < e.finetune_fraction <= 1, f"eval.finetune_fraction must lie in (0, 1], e.g. 0.01 "
                                         f"or 0.1; got {e.finetune_fraction}")
    _check(e.finetune_weight_decay >= 0, "eval.finetune_weight_decay must be >= 0")
    scale = tuple(e.finetune_crop_scale)
    _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
           f"eval.finetune_crop_scale must be (low, high) with 0 < low <= high <= 1; got {scale}")
    _check(bool(config.log.wandb_project) or not (config.log.wandb_entity
                                                   or config.log.wandb_name),
           "log.wandb_entity and log.wandb_name need log.wandb_project (the project of the "
           "wandb run)")
    _check(config.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1; got {config.checkpoint.keep}")
    if config.data.source == "tfds":
        _check(bool(config.data.name), "data.source 'tfds' needs data.name, e.g. "
                                       "--config.data.name=cifar10")
    if config.data.source in ("folder", "cifar10_npz", "records"):
        _check(bool(config.data.path), f"data.source {config.data.source!r} needs data.path")
