"""The demo: SimCLR on the built-in shapes dataset, about three minutes on a 2-core laptop CPU.

    jaxssl train --config configs/demo.py --workdir runs/demo
    jaxssl train --config configs/demo.py:byol --workdir runs/demo_byol   # any other method

Needs no download. A ResNet-18 at width 16 with the ImageNet stem (the 32 px shapes are
downsampled 4x before the residual stages, which makes a step ~3x cheaper on a CPU than the
CIFAR stem at width 8 and learns more in the same time) trains on views augmented by JAX
(`data.augment="device"`: no TensorFlow in the loop) with AdamW. The crops keep at least 20% of
the image (the "mocov2" recipe; otherwise the same colour jitter as "simclr_cifar"): a shape
that fills a 32 px image vanishes from SimCLR's 8% crops.

Expected: weighted kNN top-1 (k = 200) on the 1000 test images rises from about 0.25 at random
initialisation to about 0.55 (the measured pair is in the README).
"""

from jaxssl.configuration import default_config


# What each method changes in the demo (`configs/demo.py:byol`, ...): the settings of its
# CIFAR recipe that matter in a run of a few hundred steps.
_METHOD_SETTINGS = {
    "simclr": {},
    "moco": {},
    # The target's momentum of solo-learn's CIFAR recipe: 0.996 leaves the target near its
    # random start for most of 585 steps.
    "byol": {"byol.momentum": 0.99},
    # SimSiam's projector ends in BatchNorm, and its predictor is a bottleneck (1/4 wide); its
    # recipe's SGD with weight decay and a predictor learning rate that does not decay. With
    # the demo's AdamW the features collapsed in part on CIFAR-10 (RankMe 3 of 128).
    "simsiam": {"model.output_bn": True, "model.predictor_hidden_dims": (16,),
                "optim.name": "sgd", "optim.base_lr": 0.1, "optim.weight_decay": 5e-4,
                "optim.momentum": 0.9, "optim.fixed_predictor_lr": True},
    # lambda about 1/D: the paper's 0.0051 is for D = 8192; at D = 64 the off-diagonal term
    # would barely count.
    "barlow_twins": {"barlow_twins.lambd": 1 / 64},
    "vicreg": {},
    "mocov3": {},
}


def get_config(method: str = "simclr"):
    """The demo with `method` (a key of jaxssl.methods.METHODS): `--config configs/demo.py:byol`."""
    config = default_config()
    if method not in _METHOD_SETTINGS:
        raise ValueError(f"unknown method {method!r} for the demo; choose one of "
                         f"{', '.join(_METHOD_SETTINGS)}")
    config.method = method
    config.seed = 0
    config.batch_size = 128
    config.num_epochs = 15  # 39 steps an epoch: 585 steps
    config.log_every_steps = 39
    config.eval_every_steps = 195
    config.checkpoint_every_steps = 195

    config.data.source = "builtin"
    config.data.recipe = "mocov2"
    config.data.augment = "device"
    config.data.out_size = 32

    config.model.encoder = "resnet18"
    config.model.cifar_stem = False
    config.model.width = 16
    config.model.head_hidden_dims = (256,)
    config.model.out_dim = 64
    config.model.predictor_hidden_dims = (256,)  # BYOL, SimSiam, MoCo v3 (--config.method=...)

    config.optim.name = "adamw"
    config.optim.base_lr = 5e-3
    config.optim.lr_scaling = "none"
    config.optim.warmup_epochs = 1.0
    config.optim.weight_decay = 1e-4

    config.loss.temperature = 0.2
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.checkpoint.keep = 2
    for field, value in _METHOD_SETTINGS[method].items():
        group, name = field.split(".")
        config[group][name] = value
    return config
