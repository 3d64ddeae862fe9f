"""MoCo v3 (ResNet) on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's tuned CIFAR recipe.

    jaxssl train --config configs/mocov3_cifar10.py --workdir runs/mocov3_cifar10

Evaluate as for the other CIFAR-10 configs. Data as in configs/simclr_cifar10.py.
`configs/mocov3_cifar10.py:200` trains 200 epochs. The ViT variant comes with the ViT issue.

The recipe of solo-learn's scripts/pretrain/cifar/mocov3.yaml: a 4096-256 projector with BN
on its output, a 4096-256 predictor, temperature 0.2, the momentum encoder's EMA from 0.99 to 1
on a cosine, LARS with lr 0.3 at batch 256 (linear scaling), weight decay 1e-6 off biases and
BN, 10 warmup epochs, the asymmetric BYOL augmentation, global BN.
One difference: solo-learn's LARS uses eta 0.02 with its adaptive lr clipped at 1; jaxssl's LARS
keeps the trust coefficient 0.001 unclipped.
Expected: solo-learn reports 93.1% linear top-1 after 1000 epochs; jaxssl's own figure is
pending (not measured yet).
"""

from jaxssl.configuration import base_config


def get_config(epochs: str = "1000"):
    config = base_config("simclr_cifar10", epochs)
    config.method = "mocov3"
    config.data.recipe = "byol"
    config.model.head_hidden_dims = (4096,)
    config.model.out_dim = 256
    config.model.output_bn = True
    config.model.predictor_hidden_dims = (4096,)
    config.mocov3.temperature = 0.2
    config.mocov3.momentum = 0.99
    config.mocov3.momentum_schedule = "cosine"
    config.optim.name = "lars"
    config.optim.base_lr = 0.3
    config.optim.weight_decay = 1e-6
    return config
