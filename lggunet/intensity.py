"""On-device random intensity augmentation, nnU-Net style, for scans from many scanners.

Applied to the normalised network input (z-scored brain: mean 0, std 1), after the spatial
augmentation, per example, each transform with its own probability (nnU-Net's defaults,
Isensee et al. 2021):

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
never changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

BLUR_RADIUS = 4  # the kernel's half width: 4 sigma at the largest sigma, 1.0


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


def draw(key: jax.Array, params: IntensityParams, channels: int = 3) -> dict[str, jax.Array]:
    """One example's random choices: an on/off flag and the parameters of each transform."""
    k = jax.random.split(key, 19)
    u = jax.random.uniform

    def on(i, p):
        return u(k[i], ()) < p

    def rng(i, bounds, shape=()):
        return u(k[i], shape, minval=bounds[0], maxval=bounds[1])

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


def apply(image: jax.Array, t: dict[str, jax.Array]) -> jax.Array:
    """The transforms of `draw`'s result `t`, in nnU-Net's order, on one (H, W, C) image."""
    x = jnp.where(t["replace"], replace_channel(image, t["source"], t["target"]), image)
    x = jnp.where(t["single"], single_channel(x, t["single_source"]), x)
    noise = jax.random.normal(t["noise_key"], x.shape) * t["noise_std"]
    x = jnp.where(t["noise"], x + noise, x)
    x = jnp.where(t["blur"], gaussian_blur(x, t["sigma"]), x)
    x = jnp.where(t["brightness"], x * t["brightness_factor"], x)
    x = jnp.where(t["scale"], x * t["scale_factor"], x)
    x = jnp.where(t["contrast"], contrast(x, t["contrast_factor"]), x)
    return jnp.where(t["gamma"], gamma(x, t["gamma_value"]), x)


def augment_intensity(key: jax.Array, images: jax.Array, params: IntensityParams) -> jax.Array:
    """(B, H, W, C) float images, each under its own random intensity transforms."""
    keys = jax.random.split(key, images.shape[0])
    channels = images.shape[-1]
    return jax.vmap(lambda k, x: apply(x, draw(k, params, channels)))(keys, images)
