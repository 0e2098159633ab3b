"""Training and evaluation: pure jit-compiled steps and the epoch loop around them."""

from __future__ import annotations

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


def preprocess(batch: Batch, image_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 batch -> (images in [0, 1] float32, masks in {0, 1} float32, weights), resized
    to `image_size` (images bilinear, masks bilinear then thresholded at 0.5)."""
    images = batch["image"].astype(jnp.float32) / 255.0
    masks = batch["mask"].astype(jnp.float32)
    if images.shape[1] != image_size or images.shape[2] != image_size:
        b = images.shape[0]
        images = jax.image.resize(images, (b, image_size, image_size, 3), "linear")
        masks = jax.image.resize(masks, (b, image_size, image_size, 1), "linear")
        masks = (masks >= 0.5).astype(jnp.float32)
    return images, masks, batch["valid"].astype(jnp.float32)


def _batch_metrics(loss, masks, probs, weights) -> dict[str, jax.Array]:
    return {
        "loss": loss,
        "dice": metrics.dice_coef(masks, probs, weights),
        "iou": metrics.iou_coef(masks, probs, weights),
        "accuracy": metrics.pixel_accuracy(masks, probs, weights),
        "count": jnp.sum(weights),
    }


def train_step(
    state: TrainState, batch: Batch, rng: jax.Array, *, loss_name: str, image_size: int
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on one batch; returns the new state and the batch's notebook metrics."""
    images, masks, weights = preprocess(batch, image_size)
    loss_fn = losses.get_loss(loss_name)

    def compute_loss(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        return loss_fn(logits, masks, weights), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
    return state, _batch_metrics(loss, masks, jax.nn.sigmoid(logits), weights)


def eval_step(
    state: TrainState, batch: Batch, *, loss_name: str, image_size: int
) -> dict[str, jax.Array]:
    """Notebook metrics of the batch, plus per-example pixel counts for per-slice and
    per-volume Dice. Padding examples (valid=False) count nowhere."""
    images, masks, weights = preprocess(batch, image_size)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    probs = jax.nn.sigmoid(logits)
    out = _batch_metrics(losses.get_loss(loss_name)(logits, masks, weights), masks, probs, weights)
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
        valid = batch["valid"]
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


def predict_step(state: TrainState, batch: Batch, *, image_size: int) -> dict[str, jax.Array]:
    """Model-resolution images, masks and predicted probabilities of a batch."""
    images, masks, _ = preprocess(batch, image_size)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False
    )
    return {"image": images, "mask": masks, "prob": jax.nn.sigmoid(logits)}


def write_prediction_grid(
    predict_fn, state: TrainState, source, out_png: Path, count: int = 8
) -> Path:
    """Contours on `count` tumour-bearing slices spread over the split (by index order)."""
    positive = [i for i in range(len(source)) if source[i]["mask"].any()]
    if not positive:
        positive = list(range(len(source)))
    chosen = [
        positive[int(i)] for i in np.linspace(0, len(positive) - 1, min(count, len(positive)))
    ]
    examples = [source[i] for i in chosen]
    batch = {
        "image": np.stack([e["image"] for e in examples]),
        "mask": np.stack([e["mask"] for e in examples]),
        "valid": np.ones(len(examples), bool),
    }
    out = jax.device_get(predict_fn(state, batch))
    stats = metrics.slice_stats(out["mask"], out["prob"])
    dice = metrics.per_slice_dice(**jax.device_get(stats))
    titles = [
        f"{input_pipeline.as_text(e['patient_id'])} #{int(e['slice_index'])}  Dice {d:.2f}"
        for e, d in zip(examples, dice, strict=True)
    ]
    images = np.asarray(out["image"]) * 255.0
    return plots.contour_grid(images, out["mask"], out["prob"], titles, out_png)


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, writing checkpoints and metrics.jsonl under `workdir`; resumes
    from the latest checkpoint there. Returns the final evaluation of the best checkpoint."""
    config_checks.check(config)
    workdir_path = Path(workdir).expanduser()
    workdir_path.mkdir(parents=True, exist_ok=True)
    builder = dataset.prepare(config.data)
    sources = builder.as_data_source()
    for split in ("train", "validation"):
        if split not in sources:
            raise config_checks.ConfigError(f"the prepared data has no {split!r} split")
    num_train = len(sources["train"])
    logging.info(
        "Data: %s (%s); train %d, validation %d, test %d slices",
        builder.info.metadata["source"],
        builder.data_path,
        num_train,
        len(sources["validation"]),
        len(sources["test"]) if "test" in sources else 0,
    )

    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
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

    statics = {"loss_name": config.loss, "image_size": config.data.image_size}
    p_train = jax.jit(lambda s, b, r: train_step(s, b, r, **statics), donate_argnums=0)
    p_eval = jax.jit(lambda s, b: eval_step(s, b, **statics))
    read = {"num_threads": config.data.num_threads, "num_workers": config.data.num_workers}
    val_plan = input_pipeline.epoch_plan(
        len(sources["validation"]), config.eval_batch_size, shuffle=False
    )
    steps_per_epoch = len(input_pipeline.epoch_plan(num_train, config.batch_size, shuffle=False))
    total_steps = steps_per_epoch * config.num_epochs
    first_step = int(state.step)

    t_start = time.perf_counter()
    for epoch in range(start_epoch, config.num_epochs + 1):
        plan = input_pipeline.epoch_plan(
            num_train, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch
        )
        train_mean = _Mean()
        t_epoch = time.perf_counter()
        images_seen = 0
        for batch in input_pipeline.iterate(sources["train"], plan, **read):
            step = int(state.step)
            state, out = p_train(
                state, input_pipeline.device_batch(batch), jax.random.fold_in(step_rng, step)
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
                elapsed = time.perf_counter() - t_start
                rate = (step - first_step) / max(elapsed, 1e-9)
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
        val = evaluate(
            p_eval, state, input_pipeline.iterate(sources["validation"], val_plan, **read)
        )
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
        logging.info(
            "epoch %d/%d: train loss %.4f dice %.4f | val loss %.4f dice %.4f iou %.4f acc %.4f "
            "volume-dice %.4f | lr %.2g | %.1f images/s",
            epoch,
            config.num_epochs,
            record["train_loss"],
            record["train_dice"],
            record["val_loss"],
            record["val_dice"],
            record["val_iou"],
            record["val_accuracy"],
            record["val_volume_dice"],
            lr_used,
            record["images_per_s"],
        )
    store.wait()

    best_state, best_meta = store.restore_best(state)
    final = {"best_epoch": best_meta["epoch"]}
    for split in ("validation", "test"):
        if split in sources:
            plan = input_pipeline.epoch_plan(
                len(sources[split]), config.eval_batch_size, shuffle=False
            )
            final[split] = evaluate(
                p_eval, best_state, input_pipeline.iterate(sources[split], plan, **read)
            )
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
    p_predict = jax.jit(lambda s, b: predict_step(s, b, image_size=config.data.image_size))
    write_prediction_grid(
        p_predict, best_state, sources[shown], workdir_path / f"{shown}_predictions.png"
    )
    logging.info("Wrote %s and %s_predictions.png", workdir_path / "curves.png", shown)
    store.close()
    return final


__all__ = [
    "TrainState",
    "create_model",
    "create_train_state",
    "eval_step",
    "evaluate",
    "train_and_evaluate",
    "train_step",
    "predict_step",
]
