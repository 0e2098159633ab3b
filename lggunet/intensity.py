"""On-device random intensity augmentation, nnU-Net style, for scans from many scanners.

Applied to the normalised network input (z-scored brain: mean 0, std 1), after the spatial
augmentation, per example, each transform with its own probability (nnU-Net's defaults,
Isensee et al. 2021):

* a tumour made fainter (off by default; `tumour_contrast_p`): per channel, the pixels under
  the mask moved towards the mean of the tissue in a ring around them by a factor
  ~ U(0.3, 1) (not nnU-Net's; for faint, infiltrative tumours, whose contrast a global
  transform cannot lower once the scan is normalised). Only this transform reads the mask;
* a channel replaced by another (p 0.1), or every channel by one (p 0.1): scans whose missing
  modalities were filled with copies (4 of the 49 shared patients carry FLAIR, or one
  sequence, in all three channels);
* Gaussian noise (p 0.1): std ~ U(0, 0.1) (batchgenerators draws its "noise_variance" and
  uses it as the std);
* Gaussian blur (p 0.2): sigma ~ U(0.5, 1) pixels, per channel, 'nearest' edges;
* brightness (p 0.15): each channel times ~ U(0.75, 1.25);
* whole-scan scaling (p 0.15): all channels times one factor ~ U(0.7, 1.3);
* contrast (p 0.15): per channel (x - mean) * f + mean, f ~ U(0.75, 1.25), clipped to the
  channel's former range;
* gamma (p 0.3): per channel, rescaled to [0, 1], raised to g, mapped back and given its
  former mean and std (nnU-Net's retain_stats); g ~ U(0.7, 1) or U(1, 1.5) with equal odds
  (batchgenerators' `augment_gamma`).

Each transform is a pure function of the image and its drawn parameters (tested against NumPy
and SciPy); `augment_intensity` draws the parameters from a key and applies them. The mask
itself never changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BLUR_RADIUS = 4  # the kernel's half width: 4 sigma at the largest sigma, 1.0
RING_FRACTION = 0.05  # the ring around a tumour: this share of the image height (6 px at 128)


@dataclasses.dataclass(frozen=True)
class IntensityParams:
    """Probabilities and ranges of the intensity transforms (see the module docstring)."""

    channel_replace_p: float = 0.1
    single_channel_p: float = 0.1
    noise_p: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_p: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    scale_p: float = 0.15
    scale_range: tuple[float, float] = (0.7, 1.3)
    contrast_p: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    tumour_contrast_p: float = 0.0
    tumour_contrast_range: tuple[float, float] = (0.3, 1.0)


def replace_channel(image: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
    """Channel `target` of an (H, W, C) image becomes a copy of channel `source`."""
    channels = jnp.arange(image.shape[-1])
    return jnp.where(channels == target, image[..., source][..., None], image)


def single_channel(image: jax.Array, source: jax.Array) -> jax.Array:
    """Every channel of an (H, W, C) image becomes a copy of channel `source`."""
    return jnp.broadcast_to(image[..., source][..., None], image.shape)


def gaussian_kernel(sigma: jax.Array) -> jax.Array:
    """Normalised 1D Gaussian weights at offsets -BLUR_RADIUS..BLUR_RADIUS."""
    x = jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * (x / sigma) ** 2)
    return w / jnp.sum(w)


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur of each channel of an (H, W, C) image; sigma per channel (C,).
    Edges repeat the nearest pixel (scipy.ndimage's mode 'nearest')."""

    def blur_axis(x, kernel, axis):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (BLUR_RADIUS, BLUR_RADIUS)
        padded = jnp.pad(x, pad, mode="edge")
        n = x.shape[axis]
        taps = [
            jax.lax.slice_in_dim(padded, i, i + n, axis=axis) * kernel[i]
            for i in range(2 * BLUR_RADIUS + 1)
        ]
        return sum(taps)

    def one_channel(channel, s):
        kernel = gaussian_kernel(s)
        return blur_axis(blur_axis(channel, kernel, 0), kernel, 1)

    return jax.vmap(one_channel, in_axes=(-1, 0), out_axes=-1)(image, sigma)


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """Per channel: (x - mean) * factor + mean, clipped to the channel's [min, max]."""
    mean = jnp.mean(image, axis=(0, 1))
    lo, hi = jnp.min(image, axis=(0, 1)), jnp.max(image, axis=(0, 1))
    return jnp.clip((image - mean) * factor + mean, lo, hi)


def gamma(image: jax.Array, g: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Per channel: rescaled to [0, 1], raised to g, mapped back; mean and std restored."""
    mean, std = jnp.mean(image, axis=(0, 1)), jnp.std(image, axis=(0, 1))
    lo, hi = jnp.min(image, axis=(0, 1)), jnp.max(image, axis=(0, 1))
    span = hi - lo + eps
    out = ((image - lo) / span) ** g * span + lo
    out_mean, out_std = jnp.mean(out, axis=(0, 1)), jnp.std(out, axis=(0, 1))
    return (out - out_mean) / (out_std + 1e-8) * std + mean


def ring_radius(height: int) -> int:
    """Half width, in pixels, of the square neighbourhood that makes a tumour's ring."""
    return max(1, round(RING_FRACTION * height))


def tumour_contrast(image: jax.Array, mask: jax.Array, factor: jax.Array) -> jax.Array:
    """An (H, W, C) image whose tumour (mask (H, W, 1) > 0.5) is made fainter, per channel c:
    x + (1 - factor_c) * (ring_mean_c - x) on tumour pixels, where the ring is the tissue
    within `ring_radius(H)` pixels (a square neighbourhood) of the tumour but not in it, and
    tissue is every pixel where some channel lies above its minimum over the image (the
    normalised background sits at that minimum). Factor 1 leaves the tumour as it is; 0 makes
    it the ring's mean. Unchanged without a tumour or a ring."""
    tumour = mask[..., 0] > 0.5
    r = ring_radius(image.shape[0])
    near = jax.lax.reduce_window(
        tumour.astype(jnp.float32), 0.0, jax.lax.max, (2 * r + 1, 2 * r + 1), (1, 1), "SAME"
    )
    tissue = jnp.any(image > jnp.min(image, axis=(0, 1)), axis=-1)
    ring = (near > 0) & ~tumour & tissue
    count = jnp.sum(ring)
    ring_mean = jnp.sum(jnp.where(ring[..., None], image, 0.0), axis=(0, 1)) / jnp.maximum(count, 1)
    faded = image + (1 - factor) * (ring_mean - image)
    return jnp.where(tumour[..., None] & (count > 0), faded, image)


def draw(key: jax.Array, params: IntensityParams, channels: int = 3) -> dict[str, jax.Array]:
    """One example's random choices: an on/off flag and the parameters of each transform."""
    k = jax.random.split(key, 19)
    u = jax.random.uniform

    def on(i, p):
        return u(k[i], ()) < p

    def rng(i, bounds, shape=()):
        return u(k[i], shape, minval=bounds[0], maxval=bounds[1])

    extra = {}
    if params.tumour_contrast_p > 0:  # drawn from keys of their own: the others stay as before
        extra = {
            "tumour": u(jax.random.fold_in(key, 100), ()) < params.tumour_contrast_p,
            "tumour_factor": u(
                jax.random.fold_in(key, 101),
                (channels,),
                minval=params.tumour_contrast_range[0],
                maxval=params.tumour_contrast_range[1],
            ),
        }
    source = jax.random.randint(k[2], (), 0, channels)
    target = (source + jax.random.randint(k[3], (), 1, channels)) % channels  # never source
    return {
        "replace": on(0, params.channel_replace_p),
        "source": source,
        "target": target,
        "single": on(17, params.single_channel_p),
        "single_source": jax.random.randint(k[18], (), 0, channels),
        "noise": on(1, params.noise_p),
        "noise_std": rng(4, params.noise_std),
        "blur": on(5, params.blur_p),
        "sigma": rng(6, params.blur_sigma, (channels,)),
        "brightness": on(7, params.brightness_p),
        "brightness_factor": rng(8, params.brightness_range, (channels,)),
        "scale": on(9, params.scale_p),
        "scale_factor": rng(10, params.scale_range),
        "contrast": on(11, params.contrast_p),
        "contrast_factor": rng(12, params.contrast_range, (channels,)),
        "gamma": on(13, params.gamma_p),
        "gamma_value": _gamma_values(k[14], k[16], params.gamma_range, channels),
        "noise_key": k[15],
        **extra,
    }


def _gamma_values(key, side_key, bounds: tuple[float, float], channels: int) -> jax.Array:
    """Per channel g: below 1 or above 1 with equal odds, uniform within that side (when the
    range spans 1), as batchgenerators' augment_gamma."""
    lo, hi = bounds
    below = jax.random.uniform(side_key, (channels,)) < 0.5
    u = jax.random.uniform(key, (channels,))
    if not lo < 1 < hi:
        return lo + u * (hi - lo)
    return jnp.where(below, lo + u * (1 - lo), 1 + u * (hi - 1))


def apply(image: jax.Array, t: dict[str, jax.Array], mask: jax.Array | None = None) -> jax.Array:
    """The transforms of `draw`'s result `t`, in nnU-Net's order, on one (H, W, C) image; the
    fainter tumour first, when drawn (it needs the (H, W, 1) `mask`)."""
    x = image
    if "tumour" in t:
        if mask is None:
            raise ValueError("tumour_contrast_p > 0 needs the mask")
        x = jnp.where(t["tumour"], tumour_contrast(x, mask, t["tumour_factor"]), x)
    x = jnp.where(t["replace"], replace_channel(x, t["source"], t["target"]), x)
    x = jnp.where(t["single"], single_channel(x, t["single_source"]), x)
    noise = jax.random.normal(t["noise_key"], x.shape) * t["noise_std"]
    x = jnp.where(t["noise"], x + noise, x)
    x = jnp.where(t["blur"], gaussian_blur(x, t["sigma"]), x)
    x = jnp.where(t["brightness"], x * t["brightness_factor"], x)
    x = jnp.where(t["scale"], x * t["scale_factor"], x)
    x = jnp.where(t["contrast"], contrast(x, t["contrast_factor"]), x)
    return jnp.where(t["gamma"], gamma(x, t["gamma_value"]), x)


def augment_intensity(
    key: jax.Array, images: jax.Array, params: IntensityParams, masks: jax.Array | None = None
) -> jax.Array:
    """(B, H, W, C) float images, each under its own random intensity transforms; `masks`
    (B, H, W, 1) are needed only with `tumour_contrast_p` > 0."""
    keys = jax.random.split(key, images.shape[0])
    channels = images.shape[-1]
    if masks is None:
        return jax.vmap(lambda k, x: apply(x, draw(k, params, channels)))(keys, images)
    return jax.vmap(lambda k, x, m: apply(x, draw(k, params, channels), m))(keys, images, masks)
