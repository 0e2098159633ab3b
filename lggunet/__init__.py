"""lggunet: 2D U-Nets for brain tumour (LGG) segmentation on MRI, in JAX/Flax."""

__version__ = "0.1.0"
