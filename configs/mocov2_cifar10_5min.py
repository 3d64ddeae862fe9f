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

import os

from jaxssl.configuration import base_config


def get_config(epochs: str = "120"):
    # configs/mocov2_cifar10.py's recipe; what follows is all that differs.
    config = base_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mocov2_cifar10.py"),
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
