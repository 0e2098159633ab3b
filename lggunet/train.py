"""Training and evaluation: pure jit-compiled steps and the epoch loop around them."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterable, Sequence
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
from lggunet import (
    config_checks,
    dataset,
    files,
    inference,
    input_pipeline,
    losses,
    metrics,
    models,
    parallel,
    plots,
    summaries,
    workdirs,
)
from lggunet.checkpointing import CheckpointStore
from lggunet.errors import TrainingDiverged
from lggunet.feed import Feed
from lggunet.interrupts import Interrupted, StopRequest
from lggunet.normalization import normalize_images

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
        # Runs saved before this field existed used Keras's 0.99.
        bn_momentum=config.model.get("bn_momentum", 0.99),
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


def preprocess(
    batch: Batch, image_size: int, normalize: str = "scale"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """uint8 batch -> (normalised float32 images, masks in {0, 1} float32, weights).

    `normalize`: one of `normalization.NORMALIZATIONS` (see that module); per-patient
    statistics come with each example. Slices are resized to
    `image_size` (images bilinear, masks bilinear then thresholded at 0.5). The same function
    serves training, evaluation and prediction.
    """
    images = normalize_images(
        batch["image"],
        normalize,
        batch.get("volume_mean"),
        batch.get("volume_std"),
        batch.get("brain_stats"),
    )
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
    """The config's augmentation: a named preset (plus the intensity transforms when
    `augment.intensity` is set), or the Keras-style fields; None if off."""
    if not config.augment.enabled:
        return None
    if config.augment.preset:
        params = augment_lib.PRESETS[config.augment.preset]
        if config.augment.get("intensity", False) and params.intensity is None:
            params = dataclasses.replace(params, intensity=augment_lib.IntensityParams())
        return params
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

    KEYS = ("loss", "dice", "iou", "accuracy")

    def __init__(self, sums: dict[str, float] | None = None, weight: float = 0.0):
        self.sums: dict[str, float] = dict(sums or {})
        self.weight = weight

    def add(self, batch_metrics: dict[str, Any]) -> None:
        w = float(batch_metrics["count"])
        self.weight += w
        for k in self.KEYS:
            self.sums[k] = self.sums.get(k, 0.0) + float(batch_metrics[k]) * w

    def result(self) -> dict[str, float]:
        return {k: v / max(self.weight, 1.0) for k, v in self.sums.items()}

    def to_json(self) -> dict:
        return {"sums": self.sums, "weight": self.weight}


def evaluate(
    eval_fn,
    state: TrainState,
    plan: input_pipeline.EpochPlan,
    batches: Iterable[dict],
    patient_ids: Sequence[str],
) -> dict:
    """Runs `eval_fn` over the batches of the global `plan`; returns notebook metrics
    (batch-weighted means), mean per-slice Dice and per-volume Dice (mean and per patient).
    `patient_ids[i]` is example i's patient; `eval_fn`'s outputs must be replicated."""
    mean = _Mean()
    patient_ids = np.asarray(patient_ids)
    ids, counts = [], {"intersection": [], "true_area": [], "pred_area": []}
    for row, batch in enumerate(batches):
        out = jax.device_get(eval_fn(state, input_pipeline.device_batch(batch)))
        mean.add(out)
        valid = plan.valid[row]
        ids.extend(patient_ids[plan.indices[row][valid]].tolist())
        for k in counts:
            counts[k].append(np.asarray(out[k])[valid])
    counts = {k: np.concatenate(v) for k, v in counts.items()}
    volumes = metrics.per_volume_dice(ids, **counts)
    result = mean.result()
    if not all(np.isfinite(v) for v in result.values()):
        raise TrainingDiverged(f"evaluation gave non-finite metrics {result}")
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


def predict_examples(
    predict_fn, state: TrainState, source, tumour_area: np.ndarray, mesh, count: int = 8
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Predictions on `count` tumour-bearing slices spread over the split (by index order),
    with a title per slice (patient, slice number, Dice)."""
    positive = np.flatnonzero(tumour_area > 0)
    if len(positive) == 0:
        positive = np.arange(len(source))
    chosen = positive[np.linspace(0, len(positive) - 1, min(count, len(positive))).astype(int)]
    plan = input_pipeline.EpochPlan(chosen[None, :], np.ones((1, len(chosen)), bool))
    batch = next(input_pipeline.iterate(source, plan))
    device = parallel.replicate(input_pipeline.device_batch(batch), mesh)
    out = jax.device_get(predict_fn(state, device))
    dice = metrics.per_slice_dice(**jax.device_get(metrics.slice_stats(out["mask"], out["prob"])))
    titles = [
        f"{pid} #{idx}  Dice {d:.2f}"
        for pid, idx, d in zip(batch["patient_id"], batch["slice_index"], dice, strict=True)
    ]
    return out, titles


def _log_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _drop_epochs_after(path: Path, epoch: int) -> None:
    """Keeps metrics.jsonl consistent with the restored checkpoint on resume."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill mid-append: dropped, said
            if line.strip():
                logging.warning("%s: dropping an unreadable line (%r...)", path, line[:60])
            continue
        if isinstance(record, dict) and record.get("epoch", 0) <= epoch:
            kept.append(line)
    files.write_atomic(path, "".join(line + "\n" for line in kept))


def _restore_record(path: Path, meta: dict) -> None:
    """Appends the checkpoint's epoch record to metrics.jsonl if it is missing there."""
    known = set()
    if path.exists():
        known = {json.loads(x)["epoch"] for x in path.read_text().splitlines() if x.strip()}
    if "val_loss" in meta and meta["epoch"] not in known:
        _log_jsonl(path, {k: v for k, v in meta.items() if k not in ("early_stopping",)})


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return (
        f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    )


def _epoch_log_line(record: dict, num_epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{num_epochs}: train loss {record['train_loss']:.4f} dice "
        f"{record['train_dice']:.4f} | val loss {record['val_loss']:.4f} dice "
        f"{record['val_dice']:.4f} iou {record['val_iou']:.4f} acc {record['val_accuracy']:.4f} "
        f"volume-dice {record['val_volume_dice']:.4f} | lr {record['learning_rate']:.2g} | "
        f"{record['images_per_s']:.1f} images/s"
    )


@dataclasses.dataclass
class EarlyStopping:
    """Stops when val_loss has not improved by more than `min_delta` for `patience` epochs
    (patience 0: never). Its state travels in every checkpoint's record."""

    patience: int
    min_delta: float
    best_loss: float = float("inf")
    best_epoch: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Records the epoch's val_loss; True when training should stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch = val_loss, epoch
        return self.should_stop(epoch)

    def should_stop(self, epoch: int) -> bool:
        return self.patience > 0 and epoch - self.best_epoch >= self.patience

    def to_json(self) -> dict:
        best = self.best_loss if np.isfinite(self.best_loss) else None
        return {"best_loss": best, "best_epoch": self.best_epoch}

    def restored(self, saved: dict) -> EarlyStopping:
        best = saved["best_loss"]
        return dataclasses.replace(
            self,
            best_loss=float("inf") if best is None else best,
            best_epoch=saved["best_epoch"],
        )


class _Log:
    """absl INFO lines from process 0 only."""

    def __init__(self):
        self.on = parallel.is_main_process()

    def __call__(self, *args) -> None:
        if self.on:
            logging.info(*args)


def initial_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[TrainState, jax.Array]:
    """(the freshly initialised TrainState, the base PRNG key of the train steps), both
    replicated over `mesh`; a function of `config.seed` only."""

    def init():
        init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
        return create_train_state(config, init_rng), step_rng

    return jax.jit(init, out_shardings=parallel.replicated(mesh))()


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jit-compiled steps of a run over `mesh`: batches sharded, everything else
    replicated. `train(state, batch, rng)` folds the step number into `rng`."""

    train: Any
    eval: Any
    predict: Any
    plateau: Any


def compile_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> CompiledSteps:
    options = StepOptions.from_config(config)
    replicated = parallel.replicated(mesh)

    def train_fn(state, batch, rng):
        return train_step(state, batch, jax.random.fold_in(rng, state.step), options)

    return CompiledSteps(
        train=jax.jit(train_fn, donate_argnums=0, out_shardings=replicated),
        eval=jax.jit(functools.partial(eval_step, options=options), out_shardings=replicated),
        predict=jax.jit(functools.partial(predict_step, options=options), out_shardings=replicated),
        plateau=jax.jit(lambda s, v: step_plateau(s, v, config), out_shardings=replicated),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config` on every device of every process, writing checkpoints,
    metrics.jsonl, TensorBoard events and pictures under `workdir`; resumes from the latest
    checkpoint there (mid-epoch too). Returns the final evaluation of the best checkpoint.

    Raises `Interrupted` after saving a checkpoint when SIGTERM or SIGINT arrives, and
    `TrainingDiverged` on a NaN or infinite loss (the last good checkpoint stays).
    """
    return run_training(config, workdir)[1]


def run_training(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict]:
    """`train_and_evaluate`, also returning the final (last-epoch) TrainState.

    One training per workdir at a time (`lggunet.workdirs.locked`); a rerun must ask for the
    same run as the checkpoints there (`workdirs.check_resumable`), checked before anything
    is written."""
    config_checks.check(config)
    workdir_path = Path(workdir).expanduser()
    if config.data.get("cv_folds", 0) and config.data.cv_fold < 0:
        raise config_checks.ConfigError(
            "data.cv_fold=-1 means every fold: run them with run.py (or "
            "lggunet.cross_validation.run), or set data.cv_fold to one fold"
        )
    if inference.is_cv_workdir(workdir_path):
        raise config_checks.ConfigError(
            f"{workdir_path} holds a cross-validation run (its folds are fold_<k>/): train it "
            "with the same data.cv_folds, or use another workdir"
        )
    if not parallel.is_main_process():
        workdir_path.mkdir(parents=True, exist_ok=True)
        return _run_training(config, workdir_path)
    workdirs.make_writable_dir(workdir_path, "--workdir")
    with workdirs.locked(workdir_path):
        return _run_training(config, workdir_path)


def _run_training(config: ml_collections.ConfigDict, workdir_path: Path):
    log = _Log()
    main = parallel.is_main_process()
    if main:
        workdirs.check_resumable(config, workdir_path, inference.CONFIG_FILE)
    builder = dataset.prepare(config.data)
    if main:
        workdirs.record_or_check_splits(workdir_path, dict(builder.info.metadata))
        inference.save_config(config, workdir_path)  # load_model and --mode=predict read it
    mesh = parallel.data_mesh()
    feed = Feed(config, builder, mesh)
    sources = feed.sources
    log(
        "Data: %s (%s); %s",
        builder.info.metadata["source"],
        builder.data_path,
        ", ".join(f"{split} {len(src)} slices" for split, src in sources.items()),
    )
    log(
        "Devices: %d (%d processes), global batch %d = %d per device; compute dtype %s",
        jax.device_count(),
        jax.process_count(),
        config.batch_size,
        config.batch_size // jax.device_count(),
        config.dtype,
    )

    state, step_rng = initial_state(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    log("U-Net: %d parameters (%.2fM)", num_params, num_params / 1e6)

    store = CheckpointStore(workdir_path / "checkpoints")
    early = EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta)
    start_epoch, start_position, partial, stopped_early = 1, 0, None, None
    if store.latest_step() is not None:
        state, meta = store.restore_latest(state)
        early = early.restored(meta["early_stopping"])
        if meta.get("position"):  # saved on an interrupt, mid-epoch
            start_epoch, start_position, partial = meta["epoch"], meta["position"], meta
            log(
                "Resumed in epoch %d after %d batches (step %d)",
                *(start_epoch, start_position, int(state.step)),
            )
        else:
            start_epoch = meta["epoch"] + 1
            log("Resumed after epoch %d (step %d)", meta["epoch"], int(state.step))
            if early.should_stop(meta["epoch"]):
                stopped_early, start_epoch = meta["epoch"], config.num_epochs + 1
                log("That run had stopped early; evaluating its best checkpoint")
    metrics_path = workdir_path / "metrics.jsonl"
    if main:
        _drop_epochs_after(metrics_path, start_epoch - 1)
        if partial is None and store.latest_step() is not None:
            _restore_record(metrics_path, meta)  # a kill between checkpoint and log
    writer = summaries.SummaryWriter(workdir_path / "tensorboard")

    log("Step options: %s", StepOptions.from_config(config))
    steps = compile_steps(config, mesh)
    p_train, p_eval, p_predict, p_plateau = steps.train, steps.eval, steps.predict, steps.plateau
    steps_per_epoch = len(feed.train_plan(1))
    plan_signature = {"batch_size": config.batch_size, "steps_per_epoch": steps_per_epoch}
    if partial is not None and partial.get("plan", plan_signature) != plan_signature:
        raise config_checks.ConfigError(
            f"the checkpoint was saved mid-epoch with {partial['plan']}, but this config gives "
            f"{plan_signature}: resume with the same batch_size and data settings"
        )
    total_steps = steps_per_epoch * config.num_epochs
    first_step = int(state.step)

    def save_interrupted(epoch: int, position: int, train_mean: _Mean, signum: int):
        step = int(state.step)
        finite = jax.tree.reduce(
            lambda a, b: a and b,
            jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), state.params),
            True,
        )
        if not finite:
            raise TrainingDiverged(
                f"parameters are not finite at step {step}; not saving them. The last good "
                f"checkpoint (step {store.latest_step()}) is in {store.directory}."
            )
        if step not in store.steps():  # else a checkpoint already holds this state
            meta = {
                "epoch": epoch,
                "position": position,
                "step": step,
                "train_mean": train_mean.to_json(),
                "early_stopping": early.to_json(),
                "plan": plan_signature,
            }
            store.save(step, state, meta)
        store.wait()
        store.close()
        writer.close()
        where = f"epoch {epoch}, after {position} of {steps_per_epoch} batches (step {step})"
        log("Stopped on a signal in %s; checkpoint saved. Rerun to continue.", where)
        raise Interrupted(signum, f"stopped on a signal in {where}; rerun to continue")

    t_start = time.perf_counter()
    with StopRequest() as stop:
        for epoch in range(start_epoch, config.num_epochs + 1):
            position = start_position if epoch == start_epoch else 0
            train_mean = _Mean()
            if position:
                train_mean = _Mean(**partial["train_mean"])
            t_epoch = time.perf_counter()
            images_seen = 0
            for batch in feed.batches("train", feed.train_plan(epoch), start=position):
                signum = parallel.max_over_processes(stop.signum or 0)
                if signum:
                    save_interrupted(epoch, position, train_mean, signum)
                step = int(state.step)
                state, out = p_train(state, input_pipeline.device_batch(batch), step_rng)
                # Waiting for each step's metrics checks the loss at every step, and avoids a
                # deadlock seen in XLA's CPU all-reduce with many steps in flight.
                out = jax.device_get(out)
                step += 1
                position += 1
                if not np.isfinite(out["loss"]):
                    raise TrainingDiverged(
                        f"loss is {out['loss']} at step {step} (epoch {epoch}); stopping. The "
                        f"last good checkpoint (step {store.latest_step()}) is in "
                        f"{store.directory}."
                    )
                train_mean.add(out)
                images_seen += int(out["count"])
                if step % config.log_every_steps == 0 or step == total_steps:
                    rate = (step - first_step) / max(time.perf_counter() - t_start, 1e-9)
                    log(
                        "step %d/%d (epoch %d): loss %.4f, %.1f images/s, ETA %s",
                        step,
                        total_steps,
                        epoch,
                        float(out["loss"]),
                        rate * config.batch_size,
                        _fmt_seconds((total_steps - step) / max(rate, 1e-9)),
                    )
                    writer.scalars(
                        step,
                        {
                            "train/loss": out["loss"],
                            "train/dice": out["dice"],
                            "train/learning_rate": learning_rate(state),
                            "train/images_per_s": rate * config.batch_size,
                        },
                    )
            train_seconds = time.perf_counter() - t_epoch
            val = evaluate(
                p_eval, state, *feed.eval_batches("validation"), feed.patient_id["validation"]
            )
            lr_used = learning_rate(state)
            state = p_plateau(state, val["loss"])
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
            stop_now = early.update(epoch, val["loss"])
            store.save(int(state.step), state, {**record, "early_stopping": early.to_json()})
            out, titles = predict_examples(  # a collective: every process runs it
                p_predict,
                state,
                sources["validation"],
                feed.tumour_area["validation"],
                mesh,
                count=config.summary_images,
            )
            if main:
                _log_jsonl(metrics_path, record)
                writer.scalars(
                    int(state.step),
                    {f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")},
                )
                rgb = plots.contour_grid_image(out["image"], out["mask"], out["prob"], titles)
                writer.image(int(state.step), "validation/contours", rgb)
                writer.flush()
            log("%s", _epoch_log_line(record, config.num_epochs))
            if stop_now:
                stopped_early = epoch
                log(
                    "Early stopping after epoch %d: val_loss has not improved by more than %g "
                    "since epoch %d (patience %d)",
                    epoch,
                    early.min_delta,
                    early.best_epoch,
                    early.patience,
                )
                break
            signum = parallel.max_over_processes(stop.signum or 0)
            if signum and epoch < config.num_epochs:
                save_interrupted(epoch + 1, 0, _Mean(), signum)
    store.wait()

    best_state, best_meta = store.restore_best(state)
    final = {"best_epoch": best_meta["epoch"], "stopped_early_after_epoch": stopped_early}
    for split in ("validation", "test"):
        if split in sources:
            final[split] = evaluate(
                p_eval, best_state, *feed.eval_batches(split), feed.patient_id[split]
            )
            log(
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
    shown = "test" if "test" in sources else "validation"
    out, titles = predict_examples(
        p_predict, best_state, sources[shown], feed.tumour_area[shown], mesh
    )
    if main:
        files.write_atomic(workdir_path / "final_metrics.json", json.dumps(final, indent=2) + "\n")
        plots.training_curves(metrics_path, workdir_path / "curves.png")
        grid = workdir_path / f"{shown}_predictions.png"
        plots.contour_grid(out["image"], out["mask"], out["prob"], titles, grid)
        log("Wrote %s and %s", workdir_path / "curves.png", grid)
    writer.close()
    store.close()
    return state, final


__all__ = [
    "CompiledSteps",
    "EarlyStopping",
    "compile_steps",
    "initial_state",
    "run_training",
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
