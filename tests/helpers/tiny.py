"""The tests' shrunken model: configs/demo.py at 32x32 inputs, base width 4, depth 2."""

from __future__ import annotations


def tiny_config(data_dir: str = ""):
    from lggunet.configs import demo

    config = demo.get_config()
    config.data.data_dir = str(data_dir)
    config.data.image_size = 32
    config.data.num_threads = 2
    config.model.features = 4
    config.model.depth = 2
    config.summary_images = 2
    return config
