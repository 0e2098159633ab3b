"""`lggunet.configs.unet`, for `--config=configs/unet.py` (the configs live in the package)."""

from lggunet.configs.unet import get_config

__all__ = ["get_config"]
