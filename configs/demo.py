"""`lggunet.configs.demo`, for `--config=configs/demo.py` (the configs live in the package)."""

from lggunet.configs.demo import get_config

__all__ = ["get_config"]
