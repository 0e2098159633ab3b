"""`lggunet.configs.cpu`, for `--config=configs/cpu.py` (the configs live in the package)."""

from lggunet.configs.cpu import get_config

__all__ = ["get_config"]
