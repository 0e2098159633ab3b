"""`lggunet.configs.gpu`, for `--config=configs/gpu.py` (the configs live in the package)."""

from lggunet.configs.gpu import get_config

__all__ = ["get_config"]
