"""MoCo v2 on ImageNet: ResNet-50, K = 65536, momentum 0.999, 200 epochs.

    jaxssl train --config configs/mocov2_imagenet.py --workdir gs://BUCKET/runs/mocov2_in1k \
        --config.data.path=gs://BUCKET/imagenet/train \
        --config.data.eval_path=gs://BUCKET/imagenet/val

Evaluate (linear probe; fine-tuning on 1% of the labels):

    jaxssl eval linear --workdir gs://BUCKET/runs/mocov2_in1k
    jaxssl eval finetune --workdir gs://BUCKET/runs/mocov2_in1k --config.eval.finetune_fraction=0.01

Records made by `jaxssl prepare` (or TFDS array_record) as in configs/simclr_imagenet.py. `configs/mocov2_imagenet.py:800` trains 800 epochs.

The MoCo v2 paper's recipe: batch 256, SGD (momentum 0.9) with lr 0.03 x batch/256 and a
cosine schedule, weight decay 1e-4, temperature 0.2, a 2048-d MLP head to 128, the "mocov2"
augmentation (crops 0.2-1, jitter 0.4/0.4/0.4/0.1, grey 0.2, blur), per-device BatchNorm with
the key batch shuffled across devices. Expected (paper): linear-probe top-1 67.5% after 200
epochs, 71.1% after 800; jaxssl's own figure is pending (not measured yet).
"""

from jaxssl.configuration import default_config


def get_config(epochs: str = "200"):
    config = default_config()
    config.method = "moco"
    config.seed = 0
    config.batch_size = 256
    config.num_epochs = int(epochs)
    config.log_every_steps = 100
    config.eval_every_steps = 5004 * 10  # every 10 epochs (5004 steps an epoch)
    config.checkpoint_every_steps = 2500

    config.data.source = "records"  # data.path, data.eval_path: set on the command line
    config.data.recipe = "mocov2"
    config.data.augment = "split"
    config.data.out_size = 224

    config.model.encoder = "resnet50"
    config.model.cifar_stem = False
    config.model.width = 64
    config.model.head_hidden_dims = (2048,)
    config.model.out_dim = 128
    config.model.dtype = "bfloat16"
    config.model.bn = "local"

    config.moco.queue_size = 65536
    config.moco.momentum = 0.999
    config.moco.momentum_schedule = "constant"
    config.moco.symmetric = False
    config.moco.shuffle_bn = True
    config.moco.bn_groups = 0

    config.optim.name = "sgd"
    config.optim.base_lr = 0.03
    config.optim.lr_scaling = "linear"
    config.optim.warmup_epochs = 0.0
    config.optim.weight_decay = 1e-4
    config.optim.momentum = 0.9

    config.loss.temperature = 0.2
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.eval.batch_size = 1024
    config.eval.linear_epochs = 100  # the paper's linear-evaluation schedule
    config.eval.linear_batch_size = 1024
    return config
