"""VICReg on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's tuned CIFAR recipe.

    jaxssl train --config configs/vicreg_cifar10.py --workdir runs/vicreg_cifar10

Evaluate as for the other CIFAR-10 configs. Data as in configs/simclr_cifar10.py.
`configs/vicreg_cifar10.py:200` trains 200 epochs.

The recipe of solo-learn's scripts/pretrain/cifar/vicreg.yaml: a 3-layer 2048-2048-2048
expander, coefficients 25 / 25 / 1, LARS with lr 0.3 at batch 256 (linear scaling), weight
decay 1e-4 off biases and BN, 10 warmup epochs, crops of 0.2-1 with jitter 0.4/0.4/0.2/0.1,
grey 0.2 and solarize 0.1 on both views (the nearest jaxssl recipe is "byol", whose views
solarize 0 / 0.2), global BN.
One difference: solo-learn's LARS uses eta 0.02 with its adaptive lr clipped at 1; jaxssl's LARS
keeps the trust coefficient 0.001 unclipped.
Expected: solo-learn reports 92.1% linear top-1 after 1000 epochs; jaxssl's own figure is
pending (not measured yet).
"""

from jaxssl.configuration import base_config


def get_config(epochs: str = "1000"):
    config = base_config("simclr_cifar10", epochs)
    config.method = "vicreg"
    config.data.recipe = "byol"
    config.model.head_hidden_dims = (2048, 2048)
    config.model.out_dim = 2048
    config.model.output_bn = False
    config.vicreg.sim_coeff = 25.0
    config.vicreg.std_coeff = 25.0
    config.vicreg.cov_coeff = 1.0
    config.optim.name = "lars"
    config.optim.base_lr = 0.3
    config.optim.weight_decay = 1e-4
    return config
