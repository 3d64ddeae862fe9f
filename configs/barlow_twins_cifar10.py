"""Barlow Twins on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's tuned CIFAR recipe.

    jaxssl train --config configs/barlow_twins_cifar10.py --workdir runs/barlow_twins_cifar10

Evaluate as for the other CIFAR-10 configs. Data as in configs/simclr_cifar10.py.
`configs/barlow_twins_cifar10.py:200` trains 200 epochs.

The recipe of solo-learn's scripts/pretrain/cifar/barlow.yaml: a 3-layer 2048-2048-2048
projector (BN and ReLU between layers), lambda 0.0051, the loss scaled by 0.1, LARS with lr 0.3
at batch 256 (linear scaling), weight decay 1e-4 off biases and BN, 10 warmup epochs, the
asymmetric BYOL augmentation, global BN (the loss standardises over the global batch).
One difference: solo-learn's LARS uses eta 0.02 with its adaptive lr clipped at 1; jaxssl's LARS
keeps the trust coefficient 0.001 unclipped.
Expected: solo-learn reports 92.1% linear top-1 after 1000 epochs; jaxssl's own figure is
pending (not measured yet).
"""

from jaxssl.configuration import base_config


def get_config(epochs: str = "1000"):
    config = base_config("simclr_cifar10", epochs)
    config.method = "barlow_twins"
    config.data.recipe = "byol"
    config.model.head_hidden_dims = (2048, 2048)
    config.model.out_dim = 2048
    config.model.output_bn = False
    config.barlow_twins.lambd = 0.0051
    config.barlow_twins.scale_loss = 0.1
    config.optim.name = "lars"
    config.optim.base_lr = 0.3
    config.optim.weight_decay = 1e-4
    return config
