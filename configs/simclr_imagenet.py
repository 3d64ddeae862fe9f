"""SimCLR on ImageNet: ResNet-50, batch 4096, LARS 0.3 x B/256, global BN, for TPU pods.

Prepare the data once (local or in a bucket; parallel, resumable, each image checked):

    jaxssl prepare --input /data/imagenet/train --output gs://BUCKET/imagenet/train
    jaxssl prepare --input /data/imagenet/val --output gs://BUCKET/imagenet/val

then train (on a multi-host slice: `launch/tpu_vm.sh run -- ...` with the same flags):

    jaxssl train --config configs/simclr_imagenet.py --workdir gs://BUCKET/runs/simclr_in1k \
        --config.data.path=gs://BUCKET/imagenet/train \
        --config.data.eval_path=gs://BUCKET/imagenet/val

Evaluate (linear probe; fine-tuning on 1% of the labels):

    jaxssl eval linear --workdir gs://BUCKET/runs/simclr_in1k
    jaxssl eval finetune --workdir gs://BUCKET/runs/simclr_in1k --config.eval.finetune_fraction=0.01

The input folders hold one subfolder per class (the usual ILSVRC-2012 layout; `jaxssl prepare
--input tfds:imagenet2012/train` reads a prepared TFDS copy instead); the validation records
give the kNN queries. Start-up reads the records' index only; each process reads its own rows
of every batch. A TFDS imagenet2012 prepared in the array_record format is read directly with
`--config.data.source=tfds --config.data.name=imagenet2012 --config.data.eval_split=validation`.
The host decodes only the part of each JPEG that a crop keeps, crops and flips; the
accelerator does colour and blur (`data.augment="split"`). `configs/simclr_imagenet.py:1000`
trains 1000 epochs.

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

    config.data.source = "records"  # data.path, data.eval_path: set on the command line
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
