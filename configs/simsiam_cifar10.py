"""SimSiam on CIFAR-10: ResNet-18 with the CIFAR stem, solo-learn's tuned CIFAR recipe.

    jaxssl train --config configs/simsiam_cifar10.py --workdir runs/simsiam_cifar10

Evaluate as for the other CIFAR-10 configs. Data as in configs/simclr_cifar10.py.
`configs/simsiam_cifar10.py:200` trains 200 epochs.

The recipe of solo-learn's scripts/pretrain/cifar/simsiam.yaml: a 3-layer 2048-2048-2048
projector with BN on its output, a 512-wide predictor (2048-512-2048), SGD (momentum 0.9)
with lr 0.5 at batch 256 (linear scaling), weight decay 1e-5, cosine after 10 warmup epochs
except for the predictor, whose learning rate stays at its peak (solo-learn's static_lr, the
paper's fix_pred_lr),
crops of 0.2-1 with the MoCo v2 colour jitter (solo-learn's symmetric_weak), global BN.
One difference: SimSiam's output BN has no affine parameters; jaxssl's output BN learns a scale.
Expected: solo-learn reports 90.5% linear top-1 after 1000 epochs; jaxssl's own figure is
pending (not measured yet).
"""

from jaxssl.configuration import base_config


def get_config(epochs: str = "1000"):
    config = base_config("simclr_cifar10", epochs)
    config.method = "simsiam"
    config.data.recipe = "mocov2"
    config.model.head_hidden_dims = (2048, 2048)
    config.model.out_dim = 2048
    config.model.output_bn = True
    config.model.predictor_hidden_dims = (512,)
    config.optim.name = "sgd"
    config.optim.base_lr = 0.5
    config.optim.weight_decay = 1e-5
    config.optim.momentum = 0.9
    config.optim.fixed_predictor_lr = True
    return config
