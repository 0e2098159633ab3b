"""A small U-Net that trains in a few minutes on a laptop CPU.

With no --config.data.manual_dir it trains on a synthetic phantom data set made on the fly
(brain-like ellipses with bright lesions: it exercises the code, and says nothing about MRI).
With --config.data.manual_dir=PATH it trains the same small net on the real data.
"""

import ml_collections

from lggunet.configs import unet


def get_config() -> ml_collections.ConfigDict:
    config = unet.get_config()
    config.batch_size = 8
    config.eval_batch_size = 16
    config.num_epochs = 30
    config.learning_rate = 1e-3
    config.log_every_steps = 10
    config.data.phantom = True
    config.data.phantom_patients = 20
    config.data.image_size = 64
    config.model.features = 8
    config.model.depth = 3
    return config
