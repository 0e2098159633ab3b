"""Pure step code: the train state, preprocessing, the forward pass, and the jit-compiled
train / eval / predict steps over a device mesh.

Everything here is a function of its arguments (state, batch, rng); the loop that calls these
steps is `lggunet.train`. Evaluation works at the slices' own resolution (256x256 for the
Kaggle data): the network sees the images resized to `data.image_size`, and its probabilities
are resized back before anything is scored, as `--mode=predict` writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.training import train_state

from lggunet import augment as augment_lib
from lggunet import context as context_lib
from lggunet import losses, metrics, models, parallel

Batch = dict[str, jax.Array]
_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before a loss takes their logit
SAME_CHANNEL_PAIRS = ((0, 1), (0, 2), (1, 2))  # eval_step's `same_channels` columns


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, BatchNorm statistics and the plateau schedule's state."""

    batch_stats: Any
    plateau: optax.contrib.ReduceLROnPlateauState


@struct.dataclass
class Weights:
    """What evaluation and prediction need of a trained model: `apply_fn`, `params` and
    `batch_stats` (a TrainState has the same three, so steps take either)."""

    params: Any
    batch_stats: Any
    apply_fn: Any = struct.field(pytree_node=False)


def plateau_schedule(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Keras ReduceLROnPlateau as an optax transformation, stepped once per epoch with the
    validation loss (`patience` epochs without val_loss < best - min_delta: rate x `factor`)."""
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor,
        patience=config.plateau.patience,
        rtol=0.0,
        atol=config.plateau.min_delta,
        cooldown=config.plateau.cooldown,
        accumulation_size=1,
    )


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    model = models.create(config)
    size = config.data.image_size
    channels = context_lib.input_channels(config.data.context_slices)
    variables = model.init(rng, jnp.zeros((1, size, size, channels), jnp.float32), train=False)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        plateau=plateau_schedule(config).init(variables["params"]),
    )
    # A strong int32 as a restored one (a weak-typed 0 recompiles the steps after a restore).
    return state.replace(step=jnp.zeros((), jnp.int32))


def learning_rate(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["learning_rate"])


def step_plateau(
    state: TrainState, val_loss: float, config: ml_collections.ConfigDict
) -> TrainState:
    """Feeds one epoch's validation loss to the plateau schedule and sets Adam's rate (with
    `lr_schedule="cosine"`, the state unchanged: the train step sets the rate)."""
    if config.lr_schedule != "plateau":
        return state
    _, plateau = plateau_schedule(config).update(
        updates={}, state=state.plateau, value=jnp.asarray(val_loss, jnp.float32)
    )
    return with_learning_rate(state.replace(plateau=plateau), config.learning_rate * plateau.scale)


def with_learning_rate(state: TrainState, rate: jax.Array) -> TrainState:
    """`state` with Adam's rate set to `rate` (the rate of its next update)."""
    hyperparams = dict(state.opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(rate, hyperparams["learning_rate"].dtype)
    return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def normalized(batch: Batch, normalize: str) -> jax.Array:
    """The batch's uint8 images, normalised per `normalize` with each example's statistics
    (see `lggunet.normalization`), at their own size; with its neighbours' images stacked
    as further channels when the batch carries `context` (`lggunet.context`)."""
    return context_lib.normalize_stacked(
        batch["image"],
        batch.get("context"),
        normalize,
        batch.get("volume_mean"),
        batch.get("volume_std"),
        batch.get("brain_stats"),
    )


def preprocess(
    batch: Batch, image_size: int, normalize: str = "scale", soft: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 batch -> (normalised float32 images, masks float32, weights), resized to
    `image_size` (images bilinear, masks bilinear, then thresholded at 0.5 into {0, 1}
    unless `soft`): what the network trains on."""
    images = normalized(batch, normalize)
    masks = batch["mask"].astype(jnp.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        b = images.shape[0]
        images = jax.image.resize(images, (b, image_size, image_size, images.shape[-1]), "linear")
        masks = jax.image.resize(masks, (b, image_size, image_size, 1), "linear")
        if not soft:
            masks = (masks >= 0.5).astype(jnp.float32)
    return images, masks, batch["valid"].astype(jnp.float32)


def probabilities(
    model: Weights | TrainState | tuple[Weights, ...],
    images: jax.Array,
    image_size: int,
    tta: bool = False,
) -> jax.Array:
    """p(tumour) (B, H, W, 1) float32 at the size of `images` (normalised, (B, H, W, C)):
    the network sees them resized to `image_size` (bilinear) and its probabilities are
    resized back. With `tta`, averaged with the prediction on the horizontally flipped
    slices; for a tuple of models (an ensemble of one architecture), their mean. The one
    forward pass of evaluation, prediction and `lggunet.predict`."""
    if isinstance(model, tuple):
        members = [probabilities(m, images, image_size, tta) for m in model]
        return sum(members) / len(members)
    b, h, w, _ = images.shape
    x = images
    if (h, w) != (image_size, image_size):
        x = jax.image.resize(images, (b, image_size, image_size, images.shape[-1]), "linear")
    variables = {"params": model.params, "batch_stats": model.batch_stats}
    probs = jax.nn.sigmoid(model.apply_fn(variables, x, train=False))
    if tta:
        flipped = jax.nn.sigmoid(model.apply_fn(variables, x[:, :, ::-1], train=False))
        probs = 0.5 * (probs + flipped[:, :, ::-1])
    if (h, w) != (image_size, image_size):
        probs = jax.image.resize(probs, (b, h, w, 1), "linear")
    return probs


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the jitted steps need from the config (hashable: a static jit argument)."""

    loss: str = "dice"
    image_size: int = 256
    normalize: str = "scale"
    augment: augment_lib.AugmentParams | None = None  # None: no augmentation
    tta: bool = False  # evaluation: average with the horizontally flipped prediction
    cosine: CosineSchedule | None = None  # training: the rate per step (None: plateau's)
    soft_targets: bool = False  # masks resized / warped without thresholding at 0.5
    tversky_beta: float = 0.5  # the loss's overlap term: 0.5 Dice, more weighs missed tumour
    deep_supervision: int = 0  # training: coarse decoder heads in the loss (model.deep_supervision)
    mirror_input: bool = False  # training: the mirror pair made before augmentation (models.UNet)

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, tta: bool = False, steps_per_epoch: int = 0
    ) -> StepOptions:
        """`steps_per_epoch` sizes the cosine schedule (needed only to train with one)."""
        cosine = None
        if config.lr_schedule == "cosine" and steps_per_epoch:
            cosine = CosineSchedule(
                peak=config.learning_rate,
                warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                total_steps=config.num_epochs * steps_per_epoch,
            )
        return cls(
            loss=config.loss,
            image_size=config.data.image_size,
            normalize=config.data.normalize,
            augment=augment_params(config),
            tta=tta,
            cosine=cosine,
            soft_targets=bool(config.soft_targets),
            tversky_beta=float(config.tversky_beta),
            deep_supervision=int(config.model.deep_supervision),
            mirror_input=bool(config.model.mirror_input),
        )


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at
    `total_steps`: rate(step) for the update that step `step` (0-based) makes."""

    peak: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.maximum(self.warmup_steps, 1)
        decay = jnp.maximum(self.total_steps - self.warmup_steps, 1)
        progress = jnp.clip((step - self.warmup_steps) / decay, 0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < self.warmup_steps, self.peak * (step + 1) / warmup, cosine)


# The intensity transforms whose probabilities `augment.intensity_p_scale` multiplies.
INTENSITY_P_SCALED = ("noise_p", "blur_p", "brightness_p", "scale_p", "contrast_p", "gamma_p")


def augment_params(config: ml_collections.ConfigDict) -> augment_lib.AugmentParams | None:
    """The config's augmentation: a named preset (plus the intensity transforms when
    `augment.intensity` is set), or the Keras-style fields; None if off. Intensity transforms
    take their channel-copy probabilities from `augment.channel_copy_p`, the fainter tumour's
    from `augment.tumour_contrast_p`, the others' times `augment.intensity_p_scale` (<= 1)."""
    if not config.augment.enabled:
        return None
    if config.augment.preset:
        params = augment_lib.PRESETS[config.augment.preset]
        if config.augment.intensity and params.intensity is None:
            params = dataclasses.replace(params, intensity=augment_lib.IntensityParams())
    else:
        params = augment_lib.AugmentParams.from_config(config.augment)
    if params.intensity is None:
        return params
    p = float(config.augment.channel_copy_p)
    scale, base = float(config.augment.intensity_p_scale), params.intensity
    scaled = {f: min(1.0, scale * getattr(base, f)) for f in INTENSITY_P_SCALED}
    scaled["tumour_contrast_p"] = float(config.augment.tumour_contrast_p)  # not scaled
    intensity = dataclasses.replace(base, channel_replace_p=p, single_channel_p=p, **scaled)
    return dataclasses.replace(params, intensity=intensity)


def _batch_metrics(loss, masks, probs, weights) -> dict[str, jax.Array]:
    return {
        "loss": loss,
        "dice": metrics.dice_coef(masks, probs, weights),
        "iou": metrics.iou_coef(masks, probs, weights),
        "accuracy": metrics.pixel_accuracy(masks, probs, weights),
        "count": jnp.sum(weights),
    }


def train_step(
    state: TrainState, batch: Batch, rng: jax.Array, options: StepOptions
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on one (augmented) batch; returns the new state and the batch's notebook
    metrics (at the network's resolution). `rng` drives augmentation and dropout."""
    images, masks, weights = preprocess(
        batch, options.image_size, options.normalize, options.soft_targets
    )
    augment_rng, dropout_rng = jax.random.split(rng)
    images = models.with_mirror(images) if options.mirror_input else images  # warped alike
    if options.augment is not None:
        images, masks = augment_lib.augment_batch(
            augment_rng, images, masks, options.augment, soft=options.soft_targets
        )
    loss_fn = losses.get_loss(options.loss, options.tversky_beta)
    levels = range(1, options.deep_supervision + 1)

    def compute_loss(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mirrored=options.mirror_input,
            mutable=["batch_stats", "intermediates"] if levels else ["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        coarse = {i: updates["intermediates"][f"deep_supervision_{i}"][0] for i in levels}
        loss = losses.deep_supervision_loss(  # without levels: loss_fn's alone
            loss_fn, logits, coarse, masks, weights, options.soft_targets
        )
        return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    if options.cosine is not None:
        state = with_learning_rate(state, options.cosine(state.step))
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return state, _batch_metrics(loss, masks, jax.nn.sigmoid(logits), weights)


def eval_step(
    state: Weights | TrainState | tuple[Weights, ...],
    batch: Batch,
    options: StepOptions,
    keep_predictions: bool = False,
) -> dict[str, jax.Array]:
    """The batch scored at its own resolution: the config's loss and the notebook metrics
    (batch formulas on the probabilities), per-example pixel counts of p > 0.5 for per-slice
    and per-volume Dice, and which channel pairs hold the same image (`same_channels` (B, 3):
    pre/FLAIR, pre/post, FLAIR/post). Padding examples (valid=False) count nowhere. With
    `keep_predictions`, also `prediction` (p > 0.5) and `truth` (the mask), (B, H, W) bool."""
    probs = probabilities(
        state, normalized(batch, options.normalize), options.image_size, options.tta
    )
    masks = batch["mask"].astype(jnp.float32)
    weights = batch["valid"].astype(jnp.float32)
    p = jnp.clip(probs, _EPS, 1 - _EPS)
    loss = losses.get_loss(options.loss, options.tversky_beta)(
        jnp.log(p) - jnp.log1p(-p), masks, weights
    )
    out = _batch_metrics(loss, masks, probs, weights)
    out.update(metrics.slice_stats(masks, probs))
    image = batch["image"]
    out["same_channels"] = jnp.stack(
        [jnp.all(image[..., i] == image[..., j], axis=(1, 2)) for i, j in SAME_CHANNEL_PAIRS],
        axis=-1,
    )
    if keep_predictions:
        out["prediction"] = probs[..., 0] > 0.5
        out["truth"] = masks[..., 0] > 0.5
    return out


def predict_step(state: TrainState, batch: Batch, options: StepOptions) -> dict[str, jax.Array]:
    """Probabilities at the slices' own size, with the masks and (for display) the images on
    the 0..255 scale."""
    probs = probabilities(
        state, normalized(batch, options.normalize), options.image_size, options.tta
    )
    return {
        "image": batch["image"].astype(jnp.float32),
        "mask": batch["mask"].astype(jnp.float32),
        "prob": probs,
    }


def initial_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[TrainState, jax.Array]:
    """(fresh TrainState, the train steps' base PRNG key), replicated over `mesh`; a function of
    `config.seed` alone. Compiled unoptimised: it runs once (XLA CPU: 2-5 s, not 14-17 s)."""

    def init():
        init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
        return create_train_state(config, init_rng), step_rng

    lowered = jax.jit(init, out_shardings=parallel.replicated(mesh)).lower()
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})()


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """A run's jit-compiled steps over `mesh` (batches sharded, all else replicated);
    `train(state, batch, rng)` folds the step number into `rng`."""

    train: Any
    eval: Any
    predict: Any
    plateau: Any


def compile_steps(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int = 0
) -> CompiledSteps:
    """The run's steps, jit-compiled over `mesh` (on first use); with
    `config.compilation_cache_dir` set, jax keeps the compiled code there for the next run.
    Training with `lr_schedule="cosine"` needs `steps_per_epoch`."""
    if config.lr_schedule == "cosine" and steps_per_epoch <= 0:
        raise ValueError("lr_schedule='cosine' needs the run's steps_per_epoch")
    if config.compilation_cache_dir:
        cache = os.path.expanduser(config.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", cache)
    options = StepOptions.from_config(config, steps_per_epoch=steps_per_epoch)
    replicated = parallel.replicated(mesh)

    def train_fn(state, batch, rng):
        return train_step(state, batch, jax.random.fold_in(rng, state.step), options)

    return CompiledSteps(
        train=jax.jit(train_fn, donate_argnums=0, out_shardings=replicated),
        eval=compile_eval(options, mesh),
        predict=jax.jit(functools.partial(predict_step, options=options), out_shardings=replicated),
        plateau=jax.jit(lambda s, v: step_plateau(s, v, config), out_shardings=replicated),
    )


def compile_eval(options: StepOptions, mesh: jax.sharding.Mesh, keep_predictions: bool = False):
    """`eval_step` jit-compiled over `mesh` (outputs replicated, predictions sharded)."""
    fn = functools.partial(eval_step, options=options, keep_predictions=keep_predictions)
    shardings = parallel.replicated(mesh)
    if keep_predictions:
        shardings = None  # let XLA keep the (B, H, W) predictions where they were computed
    return jax.jit(fn, out_shardings=shardings)
