"""The 2D U-Net (Ronneberger et al. 2015) as used by the Keras notebook and Buda et al."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lggunet import context
from lggunet.errors import ConfigError


class PixelLinear(nn.Module):
    """The 1x1 convolution `nn.Conv(features, (1, 1))` (same parameters and result) as a
    matrix product over channels. cuDNN spent 0.65 ms of a 25 ms H200 step (forward and
    gradients) on the U-Net's 0.3-GFLOP output layer with its single output channel; as a
    product, XLA takes ~0.08 ms (bench/profile_gpu.py)."""

    features: int
    dtype: Any = jnp.float32
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0]) + bias


NORMS = ("batch", "instance")  # model.norm


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by a normalisation (optional) and ReLU: `norm`
    "batch" (BatchNorm, the notebook's) or "instance" (each example's feature maps by their
    own mean and variance over the image, as nnU-Net: no running statistics, the same
    computation at training and inference)."""

    features: int
    batch_norm: bool = True
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype)(x)
            if self.batch_norm and self.norm == "instance":
                # PyTorch's (and so nnU-Net's) epsilon, with a learnt scale and offset.
                x = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype)(x)
            elif self.batch_norm:
                # Keras's epsilon 1e-3 and (by default) momentum 0.99, as in the notebook.
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=1e-3,
                    dtype=self.dtype,
                )(x)
            x = nn.relu(x)
        return x


class Upsample2x(nn.Module):
    """A 2x2, stride-2 transposed convolution (`nn.ConvTranspose(features, (2, 2), (2, 2))`,
    same parameters and result), computed as one matrix product plus a depth-to-space
    rearrangement: the strides do not overlap, so each input pixel fills its own 2x2 patch.
    XLA on CPU runs the lhs-dilated convolution that ConvTranspose lowers to about 8x slower
    (bench/conv_layers.py)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (2, 2, cin, self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        b, h, w, _ = x.shape
        # flax's ConvTranspose applies the kernel spatially flipped: patch cell (p, q) takes
        # kernel[1 - p, 1 - q].
        y = jnp.einsum("bhwc,pqco->bhpwqo", x, kernel[::-1, ::-1])
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2, stride-2 max pooling of (B, H, W, C) with even H and W (`nn.max_pool(x, (2, 2),
    strides=(2, 2))`, same forward result) as a reshape and a max. Its gradient is a
    broadcast compare, where `nn.max_pool`'s is XLA's select-and-scatter, about 1.7x slower on
    CPU (bench/conv_layers.py). The one difference: a tie inside a window shares the gradient
    equally instead of giving it all to the first maximum; after a ReLU, ties are zeros, whose
    ReLU gradient is 0 either way."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def with_mirror(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, 2C): each image beside its left-right mirror, so that every
    pixel also sees the same place in the other hemisphere (the scans are centred within a
    few pixels; a tumour shows as an asymmetry)."""
    return jnp.concatenate([x, x[:, :, ::-1]], axis=-1)


class UNet(nn.Module):
    """U-Net returning per-pixel logits (B, H, W, 1) in float32; apply a sigmoid for p(tumour).

    Widths are features * 2**level for level 0..depth (the bottleneck is level `depth`);
    H and W must be divisible by 2**depth. Parameters stay float32; `dtype` sets the compute
    precision. Dropout (rate `dropout`) is applied to the bottleneck when training.
    `bn_momentum` is the weight of the old value in BatchNorm's running statistics (Keras:
    0.99, a memory of ~100 steps; flax's default 0.9 follows the weights more closely).
    `output_bias` is the initial bias of the output logit: 0 (p = 0.5 everywhere at the start,
    as Keras) or a prior such as -4 (p ~ 0.018, near the share of tumour pixels), which spares
    the first steps of unlearning p = 0.5 on the background (Lin et al. 2017, RetinaNet).
    `norm` is the normalisation of every convolution ("batch" or "instance"; `batch_norm`
    False: none).
    `deep_supervision` k > 0 adds a 1x1 output head to decoder levels 1..k (level i at
    1/2**i of the input size: the k levels just below full size; nnU-Net's deep supervision). When
    training, their logits are sown into the "intermediates" collection as
    `deep_supervision_<i>` for the loss (`lggunet.losses.deep_supervision_loss`); the model's
    output is the full-size logits either way, and inference never runs the heads.
    `mirror_input` feeds the network each image beside its left-right mirror (`with_mirror`);
    training passes `mirrored=True` with the pair already made and augmented together, so
    that a rotation moves both alike.
    `accelerator` picks the layer forms a GPU runs faster (`PixelLinear` for the output
    layer): same parameters, the same result up to float rounding. `create` sets it from
    `model.gpu_layers` ("auto": where JAX's default backend is not the CPU, so CPU runs stay
    bit-identical to earlier versions).
    """

    features: int = 64
    depth: int = 4
    batch_norm: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_momentum: float = 0.99
    output_bias: float = 0.0
    accelerator: bool = False
    norm: str = "batch"
    deep_supervision: int = 0
    mirror_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mirrored: bool = False) -> jax.Array:
        if not 0 <= self.deep_supervision < self.depth:
            raise ValueError(
                f"deep_supervision={self.deep_supervision}: use 0..{self.depth - 1} (depth - 1)"
            )
        if x.shape[1] % 2**self.depth or x.shape[2] % 2**self.depth:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by 2**{self.depth}")
        if mirrored and not self.mirror_input:
            raise ValueError("mirrored=True given to a U-Net without mirror_input")
        if self.mirror_input and not mirrored:
            x = with_mirror(x)
        x = x.astype(self.dtype)

        def block(width: int) -> ConvBlock:
            if self.norm not in NORMS:
                raise ValueError(f"norm={self.norm!r}: use one of {list(NORMS)}")
            return ConvBlock(width, self.batch_norm, self.dtype, self.bn_momentum, self.norm)

        skips = []
        for level in range(self.depth):
            x = block(self.features * 2**level)(x, train)
            skips.append(x)
            x = max_pool_2x2(x)
        x = block(self.features * 2**self.depth)(x, train)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for level in reversed(range(self.depth)):
            width = self.features * 2**level
            up = Upsample2x(width, self.dtype, name=f"ConvTranspose_{self.depth - 1 - level}")
            x = up(x)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = block(width)(x, train)
            if 0 < level <= self.deep_supervision:
                head = self._output_head(f"DeepSupervision_{level}")
                if train or self.is_initializing():  # inference skips the heads
                    self.sow("intermediates", f"deep_supervision_{level}", head(x))
        return self._output_head("Conv_0")(x)

    def _output_head(self, name: str):
        """The 1x1 convolution to one logit (float32 out), in the form for the device."""
        bias_init = nn.initializers.constant(self.output_bias)
        if self.accelerator:
            layer = PixelLinear(1, self.dtype, bias_init, name=name)
        else:
            layer = nn.Conv(1, (1, 1), dtype=self.dtype, bias_init=bias_init, name=name)
        return lambda x: layer(x).astype(jnp.float32)


def create(config: ml_collections.ConfigDict, *, inference: bool = False) -> UNet:
    """The U-Net a config describes (`model.*` fields, compute `dtype`); with `inference`,
    without its deep-supervision heads (training-only weights that prediction never reads)."""
    return UNet(
        features=config.model.features,
        depth=config.model.depth,
        batch_norm=config.model.batch_norm,
        dropout=config.model.dropout,
        bn_momentum=config.model.bn_momentum,
        output_bias=float(config.model.output_bias),
        dtype=jnp.dtype(config.dtype),
        accelerator=gpu_layers(config),
        norm=config.model.norm,
        deep_supervision=0 if inference else config.model.deep_supervision,
        mirror_input=bool(config.model.get("mirror_input", False)),
    )


def gpu_layers(config: ml_collections.ConfigDict) -> bool:
    """Whether the U-Net uses its GPU layer forms: `model.gpu_layers` "on", or "auto" (the
    default) where JAX's default backend is not the CPU."""
    choice = config.model.get("gpu_layers", "auto")
    if choice not in ("auto", "on", "off"):
        raise ConfigError(f'model.gpu_layers={choice!r}: use one of ["auto", "on", "off"]')
    return choice == "on" or (choice == "auto" and jax.default_backend() != "cpu")


def abstract_variables(config: ml_collections.ConfigDict) -> dict:
    """The shapes and dtypes of the inference model's `params` and `batch_stats` (no
    computation; no deep-supervision heads: a checkpoint is read without them)."""
    module = create(config, inference=True)
    size = config.data.image_size
    channels = context.input_channels(config.data.context_slices)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False)
    )
    return {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}
