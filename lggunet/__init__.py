"""lggunet: 2D U-Nets for brain tumour (LGG) segmentation on MRI, in JAX/Flax.

import lggunet
model = lggunet.load_model("runs/unet")   # best checkpoint of a training run
masks = lggunet.predict(images, model)    # (N, H, W) uint8 in {0, 1}
"""

__version__ = "0.1.0"


def load_model(path, *, tta: bool = False):
    """See `lggunet.inference.load_model`."""
    from lggunet import inference

    return inference.load_model(path, tta=tta)


def predict(images, model, **kwargs):
    """See `lggunet.inference.predict`."""
    from lggunet import inference

    return inference.predict(images, model, **kwargs)
