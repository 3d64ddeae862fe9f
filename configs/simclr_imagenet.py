"""SimCLR on ImageNet: ResNet-50, batch 4096, LARS 0.3 x B/256, global BN, for TPU pods.

    jaxssl train --config configs/simclr_imagenet.py --workdir runs/simclr_in1k \
        --config.data.path=/data/imagenet/train --config.data.eval_path=/data/imagenet/val

Evaluate (linear probe; fine-tuning on 1% of the labels):

    jaxssl eval linear --workdir runs/simclr_in1k
    jaxssl eval finetune --workdir runs/simclr_in1k --config.eval.finetune_fraction=0.01

The image folders hold one subfolder per class (the usual ILSVRC-2012 layout); the validation
folder gives the kNN queries. Crops and flips run on the host, colour and blur on the
accelerator (`data.augment="split"`). `configs/simclr_imagenet.py:1000` trains 1000 epochs.
Multi-host pods (jax.distributed, a shared gs:// workdir) come with the scale-out work; today
the workdir is a local path.

The SimCLR paper's recipe: LARS with lr 0.3 x batch/256 (4.8 at 4096), 10 warmup epochs then
cosine, weight decay 1e-6 off biases and BN, temperature 0.1, a 2048-2048-128 head with BN on
its output, BatchNorm statistics over the global batch, 224 px views with colour strength 1.0
and blur. Expected (from the paper, ResNet-50 1x): linear-probe top-1 about 0.64 after 100
epochs and 0.69 after 1000. Not run by jaxssl yet: the figure here is pending.
"""

from jaxssl.configuration import default_config


def get_config(epochs: str = "100"):
    config = default_config()
    config.seed = 0
    config.batch_size = 4096
    config.num_epochs = int(epochs)
    config.log_every_steps = 100
    config.eval_every_steps = 312 * 10  # every 10 epochs (312 steps an epoch)
    config.checkpoint_every_steps = 1000

    config.data.source = "folder"
    config.data.recipe = "simclr"
    config.data.augment = "split"
    config.data.out_size = 224

    config.model.encoder = "resnet50"
    config.model.cifar_stem = False
    config.model.width = 64
    config.model.zero_init_last_bn = False
    config.model.head_hidden_dims = (2048,)
    config.model.out_dim = 128
    config.model.output_bn = True
    config.model.dtype = "bfloat16"
    config.model.bn = "global"

    config.optim.name = "lars"
    config.optim.base_lr = 0.3
    config.optim.lr_scaling = "linear"
    config.optim.warmup_epochs = 10.0
    config.optim.weight_decay = 1e-6
    config.optim.momentum = 0.9

    config.loss.temperature = 0.1
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.eval.batch_size = 1024
    config.eval.linear_epochs = 90  # the paper's linear-evaluation schedule
    config.eval.linear_batch_size = 1024
    return config
