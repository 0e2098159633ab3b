"""Training and evaluation: pure jit-compiled steps and the epoch loop around them."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from lggunet import augment as augment_lib
from lggunet import config_checks, dataset, input_pipeline, losses, metrics, models, plots
from lggunet.checkpointing import CheckpointStore

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Parameters, optimizer state, BatchNorm statistics and the plateau schedule's state."""

    batch_stats: Any
    plateau: optax.contrib.ReduceLROnPlateauState


def create_model(config: ml_collections.ConfigDict) -> models.UNet:
    return models.UNet(
        features=config.model.features,
        depth=config.model.depth,
        batch_norm=config.model.batch_norm,
        dropout=config.model.dropout,
        dtype=jnp.dtype(config.dtype),
    )


def plateau_schedule(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Keras ReduceLROnPlateau as an optax transformation, stepped once per epoch with the
    validation loss (improvement: val_loss < best - min_delta; after `patience` epochs
    without one the rate is multiplied by `factor`)."""
    return optax.contrib.reduce_on_plateau(
        factor=config.plateau.factor,
        patience=config.plateau.patience,
        rtol=0.0,
        atol=config.plateau.min_delta,
        cooldown=config.plateau.cooldown,
        accumulation_size=1,
    )


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    model = create_model(config)
    size = config.data.image_size
    variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
    params = variables["params"]
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        plateau=plateau_schedule(config).init(params),
    )


def learning_rate(state: TrainState) -> float:
    return float(state.opt_state.hyperparams["learning_rate"])


def step_plateau(
    state: TrainState, val_loss: float, config: ml_collections.ConfigDict
) -> TrainState:
    """Feeds one epoch's validation loss to the plateau schedule and sets Adam's rate."""
    _, plateau = plateau_schedule(config).update(
        updates={}, state=state.plateau, value=jnp.asarray(val_loss, jnp.float32)
    )
    hyperparams = dict(state.opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(
        config.learning_rate * plateau.scale, hyperparams["learning_rate"].dtype
    )
    return state.replace(
        plateau=plateau, opt_state=state.opt_state._replace(hyperparams=hyperparams)
    )


NORMALIZATIONS = ("scale", "zscore_volume")


def preprocess(
    batch: Batch, image_size: int, normalize: str = "scale"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 batch -> (normalised float32 images, masks in {0, 1} float32, weights).

    `normalize`: "scale" is the notebook's x / 255; "zscore_volume" subtracts the patient's
    per-channel volume mean and divides by its std (Buda et al.). Slices are resized to
    `image_size` (images bilinear, masks bilinear then thresholded at 0.5). The same function
    serves training, evaluation and prediction.
    """
    images = batch["image"].astype(jnp.float32)
    if normalize == "zscore_volume":
        mean = batch["volume_mean"][:, None, None, :].astype(jnp.float32)
        std = jnp.maximum(batch["volume_std"][:, None, None, :].astype(jnp.float32), 1e-6)
        images = (images - mean) / std
    elif normalize == "scale":
        images = images / 255.0
    else:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
    masks = batch["mask"].astype(jnp.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        b = images.shape[0]
        images = jax.image.resize(images, (b, image_size, image_size, 3), "linear")
        masks = jax.image.resize(masks, (b, image_size, image_size, 1), "linear")
        masks = (masks >= 0.5).astype(jnp.float32)
    return images, masks, batch["valid"].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the jitted steps need from the config (hashable: a static jit argument)."""

    loss: str = "dice"
    image_size: int = 256
    normalize: str = "scale"
    augment: augment_lib.AugmentParams | None = None  # None: no augmentation

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepOptions:
        return cls(
            loss=config.loss,
            image_size=config.data.image_size,
            normalize=config.data.normalize,
            augment=augment_params(config),
        )


def augment_params(config: ml_collections.ConfigDict) -> augment_lib.AugmentParams | None:
    """The config's augmentation: a named preset, or the Keras-style fields; None if off."""
    if not config.augment.enabled:
        return None
    if config.augment.preset:
        return augment_lib.PRESETS[config.augment.preset]
    return augment_lib.AugmentParams.from_config(config.augment)


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
    metrics. `rng` drives augmentation and dropout."""
    images, masks, weights = preprocess(batch, options.image_size, options.normalize)
    augment_rng, dropout_rng = jax.random.split(rng)
    if options.augment is not None:
        images, masks = augment_lib.augment_batch(augment_rng, images, masks, options.augment)
    loss_fn = losses.get_loss(options.loss)

    def compute_loss(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        return loss_fn(logits, masks, weights), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return state, _batch_metrics(loss, masks, jax.nn.sigmoid(logits), weights)


def eval_step(state: TrainState, batch: Batch, options: StepOptions) -> dict[str, jax.Array]:
    """Notebook metrics of the batch, plus per-example pixel counts for per-slice and
    per-volume Dice. Padding examples (valid=False) count nowhere."""
    images, masks, weights = preprocess(batch, options.image_size, options.normalize)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    probs = jax.nn.sigmoid(logits)
    out = _batch_metrics(
        losses.get_loss(options.loss)(logits, masks, weights), masks, probs, weights
    )
    out.update(metrics.slice_stats(masks, probs))
    return out


class _Mean:
    """Averages batch metrics weighted by each batch's number of real examples."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, batch_metrics: dict[str, Any]) -> None:
        w = float(batch_metrics["count"])
        self.weight += w
        for k in ("loss", "dice", "iou", "accuracy"):
            self.sums[k] = self.sums.get(k, 0.0) + float(batch_metrics[k]) * w

    def result(self) -> dict[str, float]:
        return {k: v / max(self.weight, 1.0) for k, v in self.sums.items()}


def evaluate(eval_fn, state: TrainState, batches: Iterable[dict[str, np.ndarray]]) -> dict:
    """Runs `eval_fn` over every batch; returns notebook metrics (batch-weighted means),
    mean per-slice Dice and per-volume Dice (mean and per patient)."""
    mean = _Mean()
    ids, counts = [], {"intersection": [], "true_area": [], "pred_area": []}
    for batch in batches:
        out = jax.device_get(eval_fn(state, input_pipeline.device_batch(batch)))
        mean.add(out)
        valid = np.asarray(batch["valid"])
        ids.extend(batch["patient_id"][valid].tolist())
        for k in counts:
            counts[k].append(np.asarray(out[k])[valid])
    counts = {k: np.concatenate(v) for k, v in counts.items()}
    volumes = metrics.per_volume_dice(ids, **counts)
    result = mean.result()
    result["slice_dice"] = float(np.mean(metrics.per_slice_dice(**counts)))
    result["volume_dice"] = float(np.mean(list(volumes.values())))
    result["num_slices"] = len(ids)
    result["per_volume_dice"] = volumes
    return result


def predict_step(state: TrainState, batch: Batch, options: StepOptions) -> dict[str, jax.Array]:
    """Predicted probabilities at model resolution, with the masks and (for display) the
    uint8-range images resized the same way."""
    images, masks, _ = preprocess(batch, options.image_size, options.normalize)
    display, _, _ = preprocess(batch, options.image_size, "scale")
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    return {"image": display * 255.0, "mask": masks, "prob": jax.nn.sigmoid(logits)}


def write_prediction_grid(
    predict_fn, state: TrainState, source, tumour_area: np.ndarray, out_png: Path, count: int = 8
) -> Path:
    """Contours on `count` tumour-bearing slices spread over the split (by index order)."""
    positive = np.flatnonzero(tumour_area > 0)
    if len(positive) == 0:
        positive = np.arange(len(source))
    chosen = positive[np.linspace(0, len(positive) - 1, min(count, len(positive))).astype(int)]
    plan = input_pipeline.EpochPlan(chosen[None, :], np.ones((1, len(chosen)), bool))
    batch = next(input_pipeline.iterate(source, plan))
    out = jax.device_get(predict_fn(state, input_pipeline.device_batch(batch)))
    dice = metrics.per_slice_dice(**jax.device_get(metrics.slice_stats(out["mask"], out["prob"])))
    titles = [
        f"{pid} #{idx}  Dice {d:.2f}"
        for pid, idx, d in zip(batch["patient_id"], batch["slice_index"], dice, strict=True)
    ]
    return plots.contour_grid(out["image"], out["mask"], out["prob"], titles, out_png)


def _log_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _drop_epochs_after(path: Path, epoch: int) -> None:
    """Keeps metrics.jsonl consistent with the restored checkpoint on resume."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epoch]
    path.write_text("".join(line + "\n" for line in kept))


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return (
        f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    )


class _Feed:
    """Where training and evaluation batches come from: grain (prefetched to the device) or
    a device-resident cache. Training batches are this process's shard of the global batch."""

    def __init__(self, config: ml_collections.ConfigDict, builder):
        self.config = config
        self.builder = builder
        self.sources = builder.as_data_source()
        for split in ("train", "validation"):
            if split not in self.sources:
                raise config_checks.ConfigError(f"the prepared data has no {split!r} split")
        self.read = {"num_threads": config.data.num_threads, "num_workers": config.data.num_workers}
        self.local_batch = config.batch_size // jax.process_count()
        self.tumour_area = {
            split: input_pipeline.read_field(
                functools.partial(builder.as_data_source, split), "tumour_area"
            )
            for split in self.sources
        }
        self.cache = {}
        if config.data.device_cache:
            for split in ("train", "validation"):
                self.cache[split] = input_pipeline.DeviceCache(self.sources[split])
            logging.info("Device cache: train and validation splits held on the device as uint8")
        factor = config.data.oversample_tumour
        if factor != 1.0:
            areas = self.tumour_area["train"]
            logging.info(
                "Oversampling tumour slices x%.2f: %d of %d training slices carry tumour; an "
                "epoch has about %d examples instead of %d",
                factor,
                int((areas > 0).sum()),
                len(areas),
                int(len(areas) + (factor - 1) * (areas > 0).sum()),
                len(areas),
            )

    def train_plan(self, epoch: int) -> input_pipeline.EpochPlan:
        config = self.config
        repeats = None
        if config.data.oversample_tumour != 1.0:
            repeats = input_pipeline.oversampling_repeats(
                self.tumour_area["train"], config.data.oversample_tumour, config.seed, epoch
            )
        return input_pipeline.epoch_plan(
            len(self.sources["train"]),
            self.local_batch,
            shuffle=True,
            seed=config.seed,
            epoch=epoch,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            repeats=repeats,
        )

    def batches(self, split: str, plan: input_pipeline.EpochPlan):
        if split in self.cache:
            return self.cache[split].iterate(plan)
        return input_pipeline.prefetch_to_device(
            input_pipeline.iterate(self.sources[split], plan, **self.read)
        )

    def eval_batches(self, split: str):
        """Every example of the split once (each process evaluates the whole split)."""
        plan = input_pipeline.epoch_plan(
            len(self.sources[split]), self.config.eval_batch_size, shuffle=False
        )
        return self.batches(split, plan)


def _epoch_log_line(record: dict, num_epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{num_epochs}: train loss {record['train_loss']:.4f} dice "
        f"{record['train_dice']:.4f} | val loss {record['val_loss']:.4f} dice "
        f"{record['val_dice']:.4f} iou {record['val_iou']:.4f} acc {record['val_accuracy']:.4f} "
        f"volume-dice {record['val_volume_dice']:.4f} | lr {record['learning_rate']:.2g} | "
        f"{record['images_per_s']:.1f} images/s"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, writing checkpoints and metrics.jsonl under `workdir`; resumes
    from the latest checkpoint there. Returns the final evaluation of the best checkpoint."""
    config_checks.check(config)
    workdir_path = Path(workdir).expanduser()
    workdir_path.mkdir(parents=True, exist_ok=True)
    builder = dataset.prepare(config.data)
    feed = _Feed(config, builder)
    sources = feed.sources
    logging.info(
        "Data: %s (%s); %s",
        builder.info.metadata["source"],
        builder.data_path,
        ", ".join(f"{split} {len(src)} slices" for split, src in sources.items()),
    )

    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    state = create_train_state(config, init_rng)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("U-Net: %d parameters (%.2fM)", num_params, num_params / 1e6)

    store = CheckpointStore(workdir_path / "checkpoints")
    start_epoch = 1
    if store.latest_epoch() is not None:
        state, meta = store.restore_latest(state)
        start_epoch = meta["epoch"] + 1
        logging.info("Resumed from epoch %d (step %d)", meta["epoch"], int(state.step))
    metrics_path = workdir_path / "metrics.jsonl"
    _drop_epochs_after(metrics_path, start_epoch - 1)

    options = StepOptions.from_config(config)
    logging.info("Step options: %s", options)
    p_train = jax.jit(train_step, static_argnames="options", donate_argnums=0)
    p_eval = jax.jit(functools.partial(eval_step, options=options))
    steps_per_epoch = len(feed.train_plan(1))
    total_steps = steps_per_epoch * config.num_epochs
    first_step = int(state.step)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.num_epochs + 1):
        train_mean = _Mean()
        t_epoch = time.perf_counter()
        images_seen = 0
        for batch in feed.batches("train", feed.train_plan(epoch)):
            step = int(state.step)
            state, out = p_train(
                state,
                input_pipeline.device_batch(batch),
                jax.random.fold_in(step_rng, step),
                options=options,
            )
            out = jax.device_get(out)
            if not np.isfinite(out["loss"]):
                raise FloatingPointError(
                    f"loss is {out['loss']} at step {step + 1} (epoch {epoch}); stopping. "
                    f"The last good checkpoint is in {store.directory}."
                )
            train_mean.add(out)
            images_seen += int(out["count"])
            step += 1
            if step % config.log_every_steps == 0 or step == total_steps:
                rate = (step - first_step) / max(time.perf_counter() - t_start, 1e-9)
                logging.info(
                    "step %d/%d (epoch %d): loss %.4f, %.1f images/s, ETA %s",
                    step,
                    total_steps,
                    epoch,
                    float(out["loss"]),
                    rate * config.batch_size,
                    _fmt_seconds((total_steps - step) / max(rate, 1e-9)),
                )
        train_seconds = time.perf_counter() - t_epoch
        val = evaluate(p_eval, state, feed.eval_batches("validation"))
        lr_used = learning_rate(state)
        state = step_plateau(state, val["loss"], config)
        record = {
            "epoch": epoch,
            "step": int(state.step),
            "learning_rate": lr_used,
            **{f"train_{k}": v for k, v in train_mean.result().items()},
            **{f"val_{k}": val[k] for k in ("loss", "dice", "iou", "accuracy")},
            "val_slice_dice": val["slice_dice"],
            "val_volume_dice": val["volume_dice"],
            "images_per_s": images_seen / max(train_seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t_epoch,
        }
        _log_jsonl(metrics_path, record)
        store.save(epoch, state, record)
        logging.info("%s", _epoch_log_line(record, config.num_epochs))
    store.wait()

    best_state, best_meta = store.restore_best(state)
    final = {"best_epoch": best_meta["epoch"]}
    for split in ("validation", "test"):
        if split in sources:
            final[split] = evaluate(p_eval, best_state, feed.eval_batches(split))
            logging.info(
                "best checkpoint (epoch %d) on %s: loss %.4f dice %.4f iou %.4f acc %.4f | "
                "per-volume Dice %.4f over %d patients, per-slice Dice %.4f",
                best_meta["epoch"],
                split,
                final[split]["loss"],
                final[split]["dice"],
                final[split]["iou"],
                final[split]["accuracy"],
                final[split]["volume_dice"],
                len(final[split]["per_volume_dice"]),
                final[split]["slice_dice"],
            )
    (workdir_path / "final_metrics.json").write_text(json.dumps(final, indent=2) + "\n")
    plots.training_curves(metrics_path, workdir_path / "curves.png")
    shown = "test" if "test" in sources else "validation"
    p_predict = jax.jit(functools.partial(predict_step, options=options))
    grid = workdir_path / f"{shown}_predictions.png"
    write_prediction_grid(p_predict, best_state, sources[shown], feed.tumour_area[shown], grid)
    logging.info("Wrote %s and %s", workdir_path / "curves.png", grid)
    store.close()
    return final


__all__ = [
    "StepOptions",
    "TrainState",
    "create_model",
    "create_train_state",
    "eval_step",
    "evaluate",
    "predict_step",
    "preprocess",
    "train_and_evaluate",
    "train_step",
]
