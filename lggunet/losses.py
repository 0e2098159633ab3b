"""Training losses. Each takes logits (B, H, W, 1), masks in {0, 1}, per-example weights (0
for padding) and the Dice smooth as keyword `smooth`, and returns a scalar to minimise.
`tversky_beta` (0.5: the notebook's Dice) weighs missed tumour against false alarms in the
overlap term."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lggunet import metrics

DICE_BETA = 0.5  # the Tversky weight at which the overlap term is the notebook's Dice


def tversky_index(
    y_true, y_pred, weights=None, beta: float = DICE_BETA, smooth: float = metrics.SMOOTH
) -> jax.Array:
    """(2TP + s) / (2TP + 2(1-beta)FP + 2beta FN + s) over the flattened batch, on soft
    probabilities (Salehi et al. 2017, scaled so that beta=0.5 is the notebook's Dice with the
    same smooth). beta > 0.5 costs a missed tumour pixel more than a false alarm."""
    t, p = metrics._weighted(y_true.astype(jnp.float32), y_pred.astype(jnp.float32), weights)
    tp = jnp.sum(t * p)
    fp = jnp.sum(p) - tp
    fn = jnp.sum(t) - tp
    return (2 * tp + smooth) / (2 * tp + 2 * (1 - beta) * fp + 2 * beta * fn + smooth)


def dice_loss(
    logits: jax.Array,
    masks: jax.Array,
    weights: jax.Array | None = None,
    tversky_beta: float = DICE_BETA,
    smooth: float = metrics.SMOOTH,
) -> jax.Array:
    """The Keras notebook's loss: -dice_coef(masks, sigmoid(logits)), smooth=100, over the
    flattened batch. It runs from -1 (perfect) to about 0. Another `tversky_beta` makes it the
    (negative) Tversky index."""
    probs = jax.nn.sigmoid(logits)
    if tversky_beta == DICE_BETA:  # the notebook's formula, to the bit
        return -metrics.dice_coef(masks, probs, weights, smooth)
    return -tversky_index(masks, probs, weights, beta=tversky_beta, smooth=smooth)


def bce_dice_loss(
    logits, masks, weights=None, tversky_beta: float = DICE_BETA, smooth: float = metrics.SMOOTH
) -> jax.Array:
    """Per-pixel binary cross-entropy plus the notebook's Dice (or Tversky) loss."""
    bce = optax.sigmoid_binary_cross_entropy(logits, masks.astype(jnp.float32))
    per_example = jnp.mean(bce.reshape(bce.shape[0], -1), axis=1)
    if weights is None:
        weights = jnp.ones(per_example.shape, jnp.float32)
    w = weights.astype(jnp.float32)
    mean_bce = jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)
    return mean_bce + dice_loss(logits, masks, w, tversky_beta, smooth)


TOPK_FRACTION = 0.1  # nnU-Net's TopK10: the hardest 10% of the pixels


def topk_bce_dice_loss(
    logits, masks, weights=None, tversky_beta: float = DICE_BETA, smooth: float = metrics.SMOOTH
) -> jax.Array:
    """Binary cross-entropy over the hardest 10% of the batch's pixels (the largest per-pixel
    values, padding excluded) plus the notebook's Dice: nnU-Net's "Dice + TopK10". A tumour
    pixel confidently missed counts 10x as much as in the mean over all pixels: easy background
    no longer dilutes it. Weights are read as 0 (padding) or not; its values run higher than
    bce_dice's, so validation losses of the two are not comparable."""
    bce = optax.sigmoid_binary_cross_entropy(logits, masks.astype(jnp.float32))
    if weights is None:
        weights = jnp.ones(bce.shape[:1], jnp.float32)
    w = weights.astype(jnp.float32)
    # Padding counts 0, below every real pixel's value (or equal: then it adds the same 0).
    per_pixel = jnp.where(w.reshape(-1, *[1] * (bce.ndim - 1)) > 0, bce, 0.0).reshape(-1)
    pixels_per_example = per_pixel.size // bce.shape[0]
    k_max = max(1, int(TOPK_FRACTION * per_pixel.size + 0.5))
    k = jnp.clip(jnp.round(TOPK_FRACTION * jnp.sum(w > 0) * pixels_per_example), 1, k_max)
    hardest = jax.lax.top_k(per_pixel, k_max)[0]
    taken = jnp.arange(k_max) < k
    mean_bce = jnp.sum(jnp.where(taken, hardest, 0.0)) / k
    return mean_bce + dice_loss(logits, masks, w, tversky_beta, smooth)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    "topk_bce_dice": topk_bce_dice_loss,
}


def downsampled_masks(masks: jax.Array, factor: int, soft: bool = False) -> jax.Array:
    """(B, H, W, 1) masks at 1/`factor` of their size: each factor x factor block's mean,
    thresholded at 0.5 into {0, 1} unless `soft` (the targets of a deep-supervision head)."""
    b, h, w, c = masks.shape
    blocks = masks.astype(jnp.float32).reshape(b, h // factor, factor, w // factor, factor, c)
    mean = blocks.mean(axis=(2, 4))
    return mean if soft else (mean >= 0.5).astype(jnp.float32)


def deep_supervision_loss(
    loss_fn: Callable[..., jax.Array],
    logits: jax.Array,
    coarse: dict[int, jax.Array],
    masks: jax.Array,
    weights: jax.Array | None = None,
    soft: bool = False,
) -> jax.Array:
    """nnU-Net's deep supervision: `loss_fn` on the full-size `logits` and on each head's
    logits `coarse[i]` (at 1/2**i of the size, against the masks downsampled to it), weighted
    by 2**-i and normalised to sum 1 (weights 1, 1/2, 1/4, ... over levels 0, 1, 2, ...).
    The Dice term's smooth (100, in pixels) is scaled by 4**-i at level i, where each pixel
    stands for 4**i: the same share of the batch's pixels at every level."""
    level_weights = {0: 1.0, **{i: 2.0**-i for i in coarse}}
    total = sum(level_weights.values())
    loss = loss_fn(logits, masks, weights) * (level_weights[0] / total)
    for i, head in sorted(coarse.items()):
        target = downsampled_masks(masks, 2**i, soft)
        smooth = metrics.SMOOTH / 4**i
        loss = loss + loss_fn(head, target, weights, smooth=smooth) * (level_weights[i] / total)
    return loss


def get_loss(name: str, tversky_beta: float = DICE_BETA) -> Callable[..., jax.Array]:
    """The loss `name` as fn(logits, masks, weights), its overlap term weighted by
    `tversky_beta` (a loss registered in LOSSES takes that keyword only when it is not 0.5)."""
    try:
        loss = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    if tversky_beta == DICE_BETA:
        return loss
    return functools.partial(loss, tversky_beta=float(tversky_beta))
