"""SimCLR on CIFAR-10 in 5 minutes on one H200: ResNet-18 (CIFAR stem), batch 512, bfloat16.

    jaxssl train --config configs/simclr_cifar10_5min.py --workdir runs/simclr_cifar10_5min \
        --config.data.path=../shared/data/cifar10/cifar10_jpeg.npz

The whole command (start-up, decoding the JPEG npz, compiling, the kNN monitor every 20 epochs
and the training) is meant to end within 5 minutes on one H200; metrics.jsonl and curves.png
hold the kNN curve. `configs/simclr_cifar10_5min.py:EPOCHS` changes the length.

Data: CIFAR-10 from the JPEG-bytes npz (quality 75; ../shared/data/cifar10/README.md), decoded
with Pillow into memory, augmented on the accelerator: no TensorFlow anywhere. The recipe is
configs/simclr_cifar10.py's (LARS, lr 0.4 x batch/256, 10 warmup epochs then cosine, weight
decay 1e-5, temperature 0.2, 2048-128 head with BN on its output, global BatchNorm) in
bfloat16, shortened to 160 epochs.

The epoch count is an estimate, pending a GPU measurement: a plain Flax SimCLR step of this
model and batch ran at about 46,000 images/s on an H200 (the GPU issue's reference figure, not
measured by jaxssl); at 40,000 images/s for the whole loop, 160 epochs of 97 steps of 512 are
199 s, which leaves about 100 s for start-up, compilation and the 9 kNN evaluations.
Expected: pending (not measured). Published anchors, hours on one GPU: SimCLR about 83% kNN
top-1 after 200 epochs, 89% after 800.
"""

import os

from jaxssl.configuration import base_config


def get_config(epochs: str = "160"):
    # configs/simclr_cifar10.py's recipe; what follows is all that differs.
    config = base_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "simclr_cifar10.py"),
                         epochs)
    config.log_every_steps = 97  # once an epoch (97 steps an epoch)
    config.eval_every_steps = 97 * 20  # the kNN curve: every 20 epochs, and at the end
    config.checkpoint_every_steps = 97 * 40
    config.checkpoint.keep = 2
    config.data.source = "cifar10_npz"  # decoded by Pillow: no TensorFlow on the GPU path
    config.data.path = "../shared/data/cifar10/cifar10_jpeg.npz"
    config.data.augment = "device"
    config.model.dtype = "bfloat16"
    config.eval.batch_size = 1024  # features for the kNN monitor: 59 batches for 60,000 images
    return config
