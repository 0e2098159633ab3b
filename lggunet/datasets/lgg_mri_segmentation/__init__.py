"""The `lgg_mri_segmentation` tfds data set."""

from lggunet.datasets.lgg_mri_segmentation.lgg_mri_segmentation import (
    LggConfig,
    LggMriSegmentation,
    make_config,
)

__all__ = ["LggConfig", "LggMriSegmentation", "make_config"]
