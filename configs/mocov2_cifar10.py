"""MoCo v2 on CIFAR-10: MoCo's own CIFAR-10 demo recipe, ResNet-18 with the CIFAR stem.

    jaxssl train --config configs/mocov2_cifar10.py --workdir runs/mocov2_cifar10

Evaluate (linear probe; fine-tuning on 1% of the labels):

    jaxssl eval linear --workdir runs/mocov2_cifar10
    jaxssl eval finetune --workdir runs/mocov2_cifar10 --config.eval.finetune_fraction=0.01

Data as in configs/simclr_cifar10.py (TFDS cifar10, or --config.data.source=cifar10_npz
--config.data.path=FILE.npz). `configs/mocov2_cifar10.py:800` trains 800 epochs.

The recipe of MoCo's CIFAR-10 demo: batch 512, a queue of K = 4096 keys, key-encoder momentum
0.99, temperature 0.1, SGD (momentum 0.9) with lr 0.06 and a cosine schedule, weight decay 5e-4,
a linear 128-d head, the symmetric loss, and split BatchNorm over 8 groups of the batch (on one
device: 8 groups; on 8 devices: one each, with the key batch shuffled across them).
Expected: weighted kNN top-1 (k 200, t 0.1) of 82.6-85.3% after 200 epochs, as the demo reports;
jaxssl's own figure is pending (not measured yet).
"""

from jaxssl.configuration import default_config


def get_config(epochs: str = "200"):
    config = default_config()
    config.method = "moco"
    config.seed = 0
    config.batch_size = 512
    config.num_epochs = int(epochs)
    config.log_every_steps = 50
    config.eval_every_steps = 97 * 10  # every 10 epochs (97 steps an epoch)
    config.checkpoint_every_steps = 97 * 10

    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.recipe = "simclr_cifar"  # crops 0.08-1, jitter 0.4/0.4/0.4/0.1, grey 0.2
    config.data.augment = "device"
    config.data.out_size = 32

    config.model.encoder = "resnet18"
    config.model.cifar_stem = True
    config.model.width = 64
    config.model.head_hidden_dims = ()  # linear head
    config.model.out_dim = 128
    config.model.bn = "local"

    config.moco.queue_size = 4096
    config.moco.momentum = 0.99
    config.moco.momentum_schedule = "constant"
    config.moco.symmetric = True
    config.moco.shuffle_bn = True
    config.moco.bn_groups = 8

    config.optim.name = "sgd"
    config.optim.base_lr = 0.06
    config.optim.lr_scaling = "none"
    config.optim.warmup_epochs = 0.0
    config.optim.weight_decay = 5e-4
    config.optim.momentum = 0.9

    config.loss.temperature = 0.1
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    return config
