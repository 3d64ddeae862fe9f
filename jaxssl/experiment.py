"""What a config builds: the data sources, the model, the optimizer, the step and the state.

Shared by the trainer (`jaxssl.train`) and the evaluations and export of a trained workdir
(`jaxssl.evaluation`), so that both rebuild the same model and the same state layout from the
same config, and a checkpoint written by one is read by the other. Every user mistake becomes a
one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxssl import files, methods, models, optim, parallel, probe as probe_lib
from jaxssl import state as state_lib
from jaxssl.checkpoint import Checkpointer, IncompatibleCheckpointError
from jaxssl.configuration import ConfigError, _one_line
from jaxssl.data import augment_jax, pipeline, recipes, sources

__all__ = ["Experiment", "build", "build_model", "load_data", "subset", "compiled_step",
           "batch_fields", "initial_state", "restore_encoder", "DTYPES"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# data.source -> how a split of it is loaded from the config's data fields.
_LOADERS = {
    "builtin": lambda d, split, train: sources.load_builtin(split),
    "cifar10_npz": lambda d, split, train: sources.load_cifar10_npz(d.path, split),
    "tfds": lambda d, split, train: sources.load_tfds(
        d.name, split, data_dir=d.data_dir or None, image_size=d.image_size or None),
    "folder": lambda d, split, train: (
        sources.load_folder(d.path, max_pixels=d.max_pixels or None) if train else
        sources.load_folder(d.eval_path, labelled=True, max_pixels=d.max_pixels or None)
        if d.eval_path else None),
    "records": lambda d, split, train: (
        sources.load_records(d.path) if train else
        sources.load_records(d.eval_path) if d.eval_path else None),
}


def load_data(d: ml_collections.ConfigDict, with_eval: bool, training: bool = True):
    """(train source, eval source or None) of the config's data group."""
    try:
        train_source = _LOADERS[d.source](d, d.train_split, True)
        eval_source = _LOADERS[d.source](d, d.eval_split, False) if with_eval else None
    except (ValueError, FileNotFoundError) as e:  # loaders say what is wrong in one line
        raise ConfigError(str(e).splitlines()[0]) from e
    if training and d.augment == "device" and train_source.reader is not None:
        if not d.image_size:
            raise ConfigError("data.augment='device' from records decodes every image to one "
                              "size on the host: set data.image_size (e.g. 256 for "
                              "out_size 224), or use --config.data.augment=split")
    elif training and d.augment == "device" and train_source.images is None:
        raise ConfigError(f"data.augment='device' needs images in memory; {train_source.name} is "
                          "read from files: use --config.data.augment=host (or split)")
    return train_source, eval_source


def subset(n: int, limit: int, seed: int) -> np.ndarray:
    """The first `limit` of a fixed permutation of range(n) (all of it when limit is 0), sorted."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


@dataclasses.dataclass
class Experiment:
    """Everything a config builds, before any state exists. `build` makes one."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    train_source: Any
    eval_source: Any  # None when not asked for or not available
    plan: pipeline.BatchPlan | None  # None when not built for training
    total_steps: int
    model: Any
    apply_fn: Callable
    dtype: Any
    schedule: Callable | None
    tx: optax.GradientTransformation | None
    recipe: recipes.Recipe
    augment_fn: Callable | None
    num_classes: int | None  # of the train source's labels; None when unlabelled
    probe_tx: optax.GradientTransformation | None  # the online probe's optimizer, when on

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch


def build_model(config: ml_collections.ConfigDict):
    """(the config's ContrastiveModel, with a predictor for the methods that have one; its
    compute dtype)."""
    m = config.model
    dtype = DTYPES[m.dtype]
    predictor = methods.get(config.method).predictor
    model = models.create_model(
        m.encoder, cifar_stem=m.cifar_stem, width=m.width, zero_init_last_bn=m.zero_init_last_bn,
        head_hidden_dims=tuple(m.head_hidden_dims), out_dim=m.out_dim, output_bn=m.output_bn,
        bn_axis_name=parallel.BN_MODES[m.bn].model_axis_name, dtype=dtype,
        predictor_hidden_dims=tuple(m.predictor_hidden_dims) if predictor else None)
    return model, dtype


def build(config: ml_collections.ConfigDict, mesh: Mesh, *, with_eval: bool,
          training: bool = True) -> Experiment:
    """Load the data and build the model, optimizer and augmentation of `config` on `mesh`.

    training=False (evaluation of a trained encoder): only the data, the model and the classes;
    the batch size, optimizer and augmentation of pretraining are neither checked nor built
    (plan, schedule, tx, augment_fn and probe_tx are None, total_steps 0).
    """
    n_dev = mesh.shape[parallel.DATA_AXIS]
    if training and config.batch_size % n_dev:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {n_dev} "
                          f"devices; use a multiple of {n_dev}, e.g. "
                          f"--config.batch_size={max(n_dev, config.batch_size // n_dev * n_dev)}")
    d, o = config.data, config.optim
    train_source, eval_source = load_data(d, with_eval, training=training)
    model, dtype = build_model(config)
    recipe = recipes.get_recipe(d.recipe)
    num_classes = None
    if train_source.labels is not None:
        num_classes = max(len(train_source.class_names or ()), int(train_source.labels.max()) + 1)
    if not training:
        return Experiment(config, mesh, train_source, eval_source, None, 0, model,
                          models.flax_apply_fn(model), dtype, None, None, recipe, None,
                          num_classes, None)
    try:
        plan = pipeline.BatchPlan(train_source.num_examples, config.batch_size, config.seed,
                                  jax.process_index(), jax.process_count())
    except ValueError as e:
        raise ConfigError(str(e)) from e
    total_steps = config.num_steps or int(config.num_epochs * plan.steps_per_epoch)
    warmup_steps = min(total_steps, round(o.warmup_epochs * plan.steps_per_epoch))
    peak_lr = optim.scale_learning_rate(o.base_lr, config.batch_size, o.lr_scaling)
    schedule = optim.warmup_cosine_schedule(peak_lr, warmup_steps, total_steps, o.end_lr)
    groups = None
    if o.fixed_predictor_lr:
        groups = {"predictor": optim.warmup_constant_schedule(peak_lr, warmup_steps)}
    tx = optim.make_optimizer(o.name, schedule, weight_decay=o.weight_decay, momentum=o.momentum,
                              nesterov=o.nesterov, trust_coefficient=o.trust_coefficient,
                              b1=o.b1, b2=o.b2, group_learning_rates=groups)
    augment_fn = None if d.augment == "host" else augment_jax.make_device_augment(
        recipe, d.out_size, train_source.mean, train_source.std, mode=d.augment, dtype=dtype)
    probe_tx = None
    if config.eval.online_probe and num_classes is not None and num_classes > 1:
        # Plain SGD with Nesterov momentum, cosine to zero, no weight decay (solo-learn's
        # online classifier); the lr is not scaled with the batch.
        probe_tx = optim.make_optimizer(
            "sgd", optim.warmup_cosine_schedule(config.eval.online_probe_lr, 0, total_steps),
            momentum=0.9, nesterov=True)
    return Experiment(config, mesh, train_source, eval_source, plan, total_steps, model,
                      models.flax_apply_fn(model), dtype, schedule, tx, recipe, augment_fn,
                      num_classes, probe_tx)


def compiled_step(exp: Experiment) -> Callable:
    """The config's train step, jit(shard_map) over the mesh: (state, batch, key) -> (state,
    metrics). The batch is the pipeline's dict ("images" or "views", and "labels")."""
    step_fn = methods.get(exp.config.method).bind(exp)
    return parallel.compile_step(step_fn, exp.mesh)


def batch_fields(exp: Experiment) -> tuple[str, ...]:
    """The fields of the pipeline's batches that the step is given: "images" (device
    augmentation) or "views", and "labels" when the online probe is on."""
    return ("images" if exp.config.data.augment == "device" else "views",) + (
        ("labels",) if exp.probe_tx is not None else ())


def initial_state(exp: Experiment) -> state_lib.TrainState:
    """The state at step 0 (not yet placed on the mesh): initialised encoder, head (and
    predictor), optimizer state, the method's own state (`Method.init_state`: MoCo's key
    encoder and queue, BYOL's target, ...) and the online probe where the config has one."""
    config, d = exp.config, exp.config.data
    # Initialised with the "rbg" generator: XLA compiles its random bits in a third of the time
    # of threefry's for a ResNet (3 s instead of 8 s on a CPU); the values are as random.
    init_key = jax.random.key(config.seed, impl="rbg")
    shape = (1, d.out_size, d.out_size, 3)
    params, batch_stats = models.init_variables(exp.model, init_key, shape, jit=True)
    method = methods.get(config.method)
    method_state = None if method.init_state is None else method.init_state(
        exp, params, batch_stats)
    probe = None
    if exp.probe_tx is not None:
        out = jax.eval_shape(lambda: exp.apply_fn(params, batch_stats, jnp.zeros(shape),
                                                  train=False)[0])
        probe = probe_lib.init_probe(out["features"].shape[-1], exp.num_classes, exp.probe_tx)
    return state_lib.create_train_state(params, batch_stats, exp.tx, probe=probe,
                                        method_state=method_state)


def restore_encoder(model, mesh: Mesh, workdir: str, step: int | None = None, *,
                    image_size: int):
    """(params, batch_stats, step) of the checkpoint at `step` (default: the latest) of a
    training workdir, replicated over the mesh: the encoder and head only, whatever the
    optimizer, queue or probe were (image_size: the side of the images it was built for). ConfigError (one line) for a workdir without checkpoints, a
    step that was not saved, or a checkpoint of another model."""
    ckpt_dir = files.join(workdir, "checkpoints")
    if not files.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {workdir}: pass the --workdir of a training run "
                          "(jaxssl train --workdir DIR)")
    params, batch_stats = jax.eval_shape(lambda: models.init_variables(
        model, jax.random.key(0, impl="rbg"), (1, image_size, image_size, 3)))
    sharding = parallel.replicated(mesh)
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            {"params": params, "batch_stats": batch_stats})
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        available = ckpt.all_steps()
        if not available:
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}: train first, or wait for "
                              "the first save")
        step = available[-1] if step is None else step
        if step not in available:
            raise ConfigError(f"no checkpoint at step {step} in {ckpt_dir}; saved steps: "
                              f"{', '.join(map(str, available))}")
        try:
            tree = ckpt.restore_subtrees(template, step)
        except IncompatibleCheckpointError as e:
            raise ConfigError(str(e)) from e
        except Exception as e:  # metadata read above matched: the data files are at fault
            raise ConfigError(
                f"the checkpoint at step {step} in {ckpt_dir} is damaged "
                f"({_one_line(e)}); pass --step with an earlier one "
                f"({', '.join(map(str, available[:-1])) or 'none saved'})") from e
    finally:
        ckpt.close()
    return tree["params"], tree["batch_stats"], step
