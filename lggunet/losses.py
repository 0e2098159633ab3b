"""Training losses. Each takes logits (B, H, W, 1), masks in {0, 1} and per-example weights
(0 for padding) and returns a scalar to minimise."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lggunet import metrics


def dice_loss(logits: jax.Array, masks: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """The Keras notebook's loss: -dice_coef(masks, sigmoid(logits)), smooth=100, over the
    flattened batch. It runs from -1 (perfect) to about 0."""
    return -metrics.dice_coef(masks, jax.nn.sigmoid(logits), weights)


def bce_dice_loss(logits, masks, weights=None) -> jax.Array:
    """Per-pixel binary cross-entropy plus the notebook's Dice loss."""
    bce = optax.sigmoid_binary_cross_entropy(logits, masks.astype(jnp.float32))
    per_example = jnp.mean(bce.reshape(bce.shape[0], -1), axis=1)
    if weights is None:
        weights = jnp.ones(per_example.shape, jnp.float32)
    w = weights.astype(jnp.float32)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0) + dice_loss(logits, masks, w)


LOSSES: dict[str, Callable[..., jax.Array]] = {"dice": dice_loss, "bce_dice": bce_dice_loss}


def get_loss(name: str) -> Callable[..., jax.Array]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
