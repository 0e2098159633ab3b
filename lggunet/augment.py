"""On-device random affine augmentation with Keras ImageDataGenerator semantics.

The config fields mean what the Keras notebook's dict means:

* `rotation_range`: degrees; angle ~ U(-r, r).
* `width_shift_range`, `height_shift_range`: fractions of the width / height; shift ~ U(-f, f).
* `shear_range`: degrees; shear angle ~ U(-s, s).
* `zoom_range`: z gives factors ~ U(1-z, 1+z), drawn independently for x and y (a factor above
  1 samples a larger area, so the content shrinks, as in Keras).
* `horizontal_flip`: mirror left-right with probability 0.5.
* fill mode 'nearest': points outside the image take the nearest edge pixel.

One 3x3 matrix per example (Keras's order: rotation @ shift @ shear @ zoom, about the image
centre) maps output pixel coordinates to input coordinates. Images are sampled bilinearly; masks
bilinearly and then thresholded at 0.5 (what the notebook does), so they stay in {0, 1} and
aligned with their image. With `intensity` set, `lggunet.intensity`'s transforms follow on the
image (not the mask). Everything is jit-able and vmapped over the batch; the same key gives
the same output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from lggunet import context as context_lib
from lggunet import intensity as intensity_lib
from lggunet.errors import InputError
from lggunet.intensity import IntensityParams


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges in Keras ImageDataGenerator units (see the module docstring)."""

    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    shear_range: float = 0.0
    zoom_range: float = 0.0
    horizontal_flip: bool = False
    intensity: IntensityParams | None = None  # nnU-Net-style intensity transforms, or none

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> AugmentParams:
        spatial = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name != "intensity"}
        intensity = IntensityParams() if config.get("intensity", False) else None
        return cls(**spatial, intensity=intensity)


# The notebook's dict, and what Buda et al. (2019) used on this data (rotation +-15 degrees,
# scale +-5%, horizontal flip); the latter with nnU-Net's intensity transforms added.
PRESETS: dict[str, AugmentParams] = {
    "notebook": AugmentParams(0.2, 0.05, 0.05, 0.05, 0.05, True),
    "buda2019": AugmentParams(15.0, 0.0, 0.0, 0.0, 0.05, True),
    "buda2019_intensity": AugmentParams(15.0, 0.0, 0.0, 0.0, 0.05, True, IntensityParams()),
    "none": AugmentParams(),
}


def random_transform(key: jax.Array, params: AugmentParams) -> dict[str, jax.Array]:
    """Draws one example's transform parameters, in Keras's units (angles in degrees)."""
    k = jax.random.split(key, 6)
    u = jax.random.uniform
    return {
        "theta": u(k[0], (), minval=-params.rotation_range, maxval=params.rotation_range),
        "tx": u(k[1], (), minval=-params.height_shift_range, maxval=params.height_shift_range),
        "ty": u(k[2], (), minval=-params.width_shift_range, maxval=params.width_shift_range),
        "shear": u(k[3], (), minval=-params.shear_range, maxval=params.shear_range),
        "zx": u(k[4], (), minval=1 - params.zoom_range, maxval=1 + params.zoom_range),
        "zy": u(k[5], (), minval=1 - params.zoom_range, maxval=1 + params.zoom_range),
        "flip": (jax.random.uniform(jax.random.fold_in(key, 7)) < 0.5) & params.horizontal_flip,
    }


def transform_matrix(t: dict[str, jax.Array], height: int, width: int) -> jax.Array:
    """Keras's `apply_affine_transform` matrix: output (row, col, 1) -> input (row, col, 1).

    tx shifts rows by tx * height, ty shifts columns by ty * width; zx scales rows, zy columns.
    """
    theta, shear = jnp.deg2rad(t["theta"]), jnp.deg2rad(t["shear"])
    one, zero = jnp.ones(()), jnp.zeros(())
    rotation = jnp.array(
        [
            [jnp.cos(theta), -jnp.sin(theta), zero],
            [jnp.sin(theta), jnp.cos(theta), zero],
            [zero, zero, one],
        ]
    )
    shift = jnp.array(
        [[one, zero, t["tx"] * height], [zero, one, t["ty"] * width], [zero, zero, one]]
    )
    shear_m = jnp.array(
        [[one, -jnp.sin(shear), zero], [zero, jnp.cos(shear), zero], [zero, zero, one]]
    )
    zoom = jnp.array([[t["zx"], zero, zero], [zero, t["zy"], zero], [zero, zero, one]])
    matrix = rotation @ shift @ shear_m @ zoom
    o_r, o_c = height / 2 - 0.5, width / 2 - 0.5
    offset = jnp.array([[1.0, 0.0, o_r], [0.0, 1.0, o_c], [0.0, 0.0, 1.0]])
    reset = jnp.array([[1.0, 0.0, -o_r], [0.0, 1.0, -o_c], [0.0, 0.0, 1.0]])
    return offset @ matrix @ reset


def warp(image: jax.Array, matrix: jax.Array, order: int = 1) -> jax.Array:
    """Samples an (H, W, C) image at matrix @ (row, col, 1), 'nearest' fill outside."""
    h, w = image.shape[:2]
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    coords = jnp.stack([rows.ravel(), cols.ravel(), jnp.ones(h * w)])
    src = (matrix @ coords)[:2]

    def one_channel(channel):
        out = jax.scipy.ndimage.map_coordinates(
            channel, [src[0], src[1]], order=order, mode="nearest"
        )
        return out.reshape(h, w)

    return jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image)


def augment_example(
    key: jax.Array, image: jax.Array, mask: jax.Array, params: AugmentParams, soft: bool = False
) -> tuple[jax.Array, jax.Array]:
    """One (H, W, C) image and its (H, W, 1) mask under one random transform; the warped
    mask is thresholded at 0.5 unless `soft` (then float32, bilinear at the edges)."""
    t = random_transform(key, params)
    matrix = transform_matrix(t, image.shape[0], image.shape[1])
    image = warp(image, matrix)
    warped = warp(mask.astype(jnp.float32), matrix)
    mask = warped if soft else (warped > 0.5).astype(mask.dtype)
    image = jnp.where(t["flip"], image[:, ::-1], image)
    mask = jnp.where(t["flip"], mask[:, ::-1], mask)
    if params.intensity is not None:
        channels = min(image.shape[-1], context_lib.CHANNELS)
        intensity = intensity_lib.draw(jax.random.fold_in(key, 11), params.intensity, channels)
        if image.shape[-1] > channels:  # a 2.5D stack of slices, or the mirror pair
            image = _per_slice(image, intensity, mask)
        else:
            image = intensity_lib.apply(image, intensity, mask)
    return image, mask


def _per_slice(image: jax.Array, t: dict[str, jax.Array], mask: jax.Array) -> jax.Array:
    """A 2.5D input or a mirror pair (`model.mirror_input`; channels 3g .. 3g + 2: image g of
    the stack) under the same intensity transforms on every image, each with its own noise (a
    fainter tumour: the centre slice's mask on every image)."""
    h, w, c = image.shape
    stack = image.reshape(h, w, c // context_lib.CHANNELS, context_lib.CHANNELS)

    def one(g, x):
        return intensity_lib.apply(
            x, {**t, "noise_key": jax.random.fold_in(t["noise_key"], g)}, mask
        )

    out = jax.vmap(one, in_axes=(0, 2), out_axes=2)(jnp.arange(stack.shape[2]), stack)
    return out.reshape(h, w, c)


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    masks: jax.Array,
    params: AugmentParams,
    soft: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """vmapped `augment_example`: one independent transform per example, keyed by `key`.
    images (B, H, W, C); masks (B, H, W, 1), or (B, H, W) as `lggunet.read_patient` gives
    them (returned in the shape given)."""
    squeeze = masks.ndim == 3
    masks = masks[..., None] if squeeze else masks
    if images.ndim != 4 or masks.shape != (*images.shape[:3], 1):
        raise InputError(
            f"images {images.shape} and masks {masks.shape[:3] if squeeze else masks.shape}: "
            "expected (B, H, W, C) images and (B, H, W) or (B, H, W, 1) masks"
        )
    keys = jax.random.split(key, images.shape[0])
    one = functools.partial(augment_example, params=params, soft=soft)
    images, masks = jax.vmap(one)(keys, images, masks)
    return images, masks[..., 0] if squeeze else masks
