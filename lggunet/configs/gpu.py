"""The Keras notebook's configuration made fast on a GPU or TPU: configs/unet.py (256x256,
batch 32, U-Net base 64 / depth 4, 100 epochs, Adam 1e-4, Dice loss, the notebook's
augmentation) computed in bfloat16 (parameters, optimizer and loss stay float32), with the
train and validation splits held on the device (no host input pipeline in the loop),
asynchronous checkpoints (always on), pictures every 10 epochs instead of every epoch, and
jax's persistent compilation cache (a rerun skips compiling).

    python run.py --config=configs/gpu.py --config.data.manual_dir=PATH --workdir=runs/gpu

configs/unet.py stays float32, for fidelity to the notebook. Measured (BENCHMARKS.md): on one
H200, 1,231 images/s over 20 epochs of a phantom of the notebook's size, i.e. ~7 minutes for
100 epochs with set-up and data preparation (extrapolated from the 20); step times of both
dtypes on an H100 too.
"""

import ml_collections

from lggunet.configs import unet


def get_config() -> ml_collections.ConfigDict:
    config = unet.get_config()
    config.dtype = "bfloat16"
    config.data.device_cache = True
    config.log_every_steps = 100
    config.summary_every_epochs = 10
    config.compilation_cache_dir = "~/.cache/lggunet/xla"
    return config
