"""Experiment configs: each module has `get_config()` returning an ml_collections.ConfigDict.

unet (the Keras notebook's settings), cpu (the cross-validated real-data recipe for 2 CPU
cores), demo (the synthetic phantom, minutes on a laptop), gpu (unet made fast on an
accelerator). `lggunet.configs.cpu.get_config()` works from any folder.
"""

from lggunet.configs import cpu, demo, gpu, unet

__all__ = ["cpu", "demo", "gpu", "unet"]
