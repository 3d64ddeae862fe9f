"""BYOL on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's tuned CIFAR recipe.

    jaxssl train --config configs/byol_cifar10.py --workdir runs/byol_cifar10

Evaluate as for the other CIFAR-10 configs (`jaxssl eval linear --workdir runs/byol_cifar10`).
Data as in configs/simclr_cifar10.py (TFDS cifar10, or --config.data.source=cifar10_npz
--config.data.path=FILE.npz). `configs/byol_cifar10.py:200` trains 200 epochs.

The recipe of solo-learn's scripts/pretrain/cifar/byol.yaml: a 4096-256 projector and a
4096-256 predictor, the target's EMA momentum from 0.99 to 1 on a cosine, LARS with lr 1.0 at
batch 256 (linear scaling), weight decay 1e-5 off biases and BN, 10 warmup epochs, the
asymmetric BYOL augmentation (blur is off at 32 px; solarize 0 / 0.2), global BN, 1000 epochs.
One difference: solo-learn's LARS uses eta 0.02 with its adaptive lr clipped at 1; jaxssl's LARS
keeps the paper's trust coefficient 0.001 unclipped.
Expected: solo-learn reports 92.6% linear top-1 after 1000 epochs; jaxssl's own figure is
pending (not measured yet).
"""

from jaxssl.configuration import base_config


def get_config(epochs: str = "1000"):
    config = base_config("simclr_cifar10", epochs)
    config.method = "byol"
    config.data.recipe = "byol"
    config.model.head_hidden_dims = (4096,)
    config.model.out_dim = 256
    config.model.output_bn = False
    config.model.predictor_hidden_dims = (4096,)
    config.byol.momentum = 0.99
    config.byol.momentum_schedule = "cosine"
    config.optim.name = "lars"
    config.optim.base_lr = 1.0
    config.optim.weight_decay = 1e-5
    return config
