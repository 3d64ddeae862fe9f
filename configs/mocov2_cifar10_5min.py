"""MoCo v2 on CIFAR-10 in 5 minutes on one H200: ResNet-18 (CIFAR stem), batch 512, bfloat16.

    jaxssl train --config configs/mocov2_cifar10_5min.py --workdir runs/mocov2_cifar10_5min \
        --config.data.path=../shared/data/cifar10/cifar10_jpeg.npz

The whole command (start-up, decoding the JPEG npz, compiling, the kNN monitor every 20 epochs
and the training) is meant to end within 5 minutes on one H200; metrics.jsonl and curves.png
hold the kNN curve. `configs/mocov2_cifar10_5min.py:EPOCHS` changes the length.

Data as in configs/simclr_cifar10_5min.py (the JPEG npz, device augmentation, no TensorFlow).
The recipe is configs/mocov2_cifar10.py's (MoCo's CIFAR-10 demo: a queue of 4096, key-encoder
momentum 0.99, temperature 0.1, SGD lr 0.06 with cosine decay, weight decay 5e-4, a linear
128-d head, the symmetric loss, split BatchNorm over 8 groups) in bfloat16, shortened to 120
epochs.

The epoch count is an estimate, pending a GPU measurement: the symmetric loss puts both views
through the query encoder (forward and backward, as SimCLR) and through the key encoder
(forward), about 4/3 of SimCLR's work per image, so about 30,000 images/s where SimCLR's loop
makes 40,000 (from the GPU issue's reference of 46,000 for a plain Flax SimCLR step, not
measured by jaxssl); 120 epochs of 97 steps of 512 are then 199 s, which leaves about 100 s
for start-up, compilation and the 7 kNN evaluations.
Expected: pending (not measured). Published anchors, hours on one GPU: MoCo about 85% kNN
top-1 after 200 epochs, 90% after 800.
"""

from jaxssl.configuration import default_config


def get_config(epochs: str = "120"):
    config = default_config()
    config.method = "moco"
    config.seed = 0
    config.batch_size = 512
    config.num_epochs = int(epochs)
    config.log_every_steps = 97  # once an epoch (97 steps an epoch)
    config.eval_every_steps = 97 * 20  # the kNN curve: every 20 epochs, and at the end
    config.checkpoint_every_steps = 97 * 40
    config.checkpoint.keep = 2

    config.data.source = "cifar10_npz"
    config.data.path = "../shared/data/cifar10/cifar10_jpeg.npz"
    config.data.recipe = "simclr_cifar"  # crops 0.08-1, jitter 0.4/0.4/0.4/0.1, grey 0.2
    config.data.augment = "device"
    config.data.out_size = 32

    config.model.encoder = "resnet18"
    config.model.cifar_stem = True
    config.model.width = 64
    config.model.head_hidden_dims = ()  # linear head
    config.model.out_dim = 128
    config.model.dtype = "bfloat16"
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
    config.eval.batch_size = 1024  # features for the kNN monitor: 59 batches for 60,000 images
    return config
