"""The training loop: `train_and_evaluate(config, workdir)`, in named phases (set up,
restore, one epoch, end of epoch, final evaluation) around the pure steps of
`lggunet.steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from lggunet import (
    configuration,
    dataset,
    evaluator,
    files,
    history,
    host_gc,
    input_pipeline,
    parallel,
    profiling,
    summaries,
    workdirs,
)
from lggunet.checkpointing import CheckpointError, CheckpointStore
from lggunet.errors import ConfigError, TrainingDiverged
from lggunet.feed import Feed
from lggunet.history import EarlyStopping
from lggunet.interrupts import Interrupted, StopRequest
from lggunet.steps import (  # the stable API: lggunet.train.train_step, eval_step, ...
    CompiledSteps,
    StepOptions,
    TrainState,
    compile_steps,
    eval_step,
    initial_state,
    learning_rate,
    train_step,
)

evaluate = evaluator.evaluate


def _log(*args) -> None:
    """absl INFO lines from process 0 only."""
    if parallel.is_main_process():
        logging.info(*args)


@dataclasses.dataclass
class _Run:
    """One training run while it goes: its data, steps, checkpoints and where it stands."""

    config: ml_collections.ConfigDict
    workdir: Path
    feed: Feed
    mesh: Any
    steps: CompiledSteps
    store: CheckpointStore
    writer: summaries.SummaryWriter
    state: TrainState
    step_rng: jax.Array
    early: EarlyStopping
    steps_per_epoch: int
    host_step: int = 0  # the state's step, counted on the host (reading it would wait)
    start_epoch: int = 1
    start_position: int = 0
    partial: dict | None = None  # the record of a checkpoint saved mid-epoch
    stopped_early: int | None = None
    clock: history.Clock = dataclasses.field(default_factory=history.Clock)
    gc: host_gc.LoopCollector = dataclasses.field(default_factory=host_gc.LoopCollector)

    def __post_init__(self):
        self.clock.batch_size = self.config.batch_size

    @property
    def main(self) -> bool:
        return parallel.is_main_process()

    @property
    def metrics_path(self) -> Path:
        return self.workdir / "metrics.jsonl"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    @property
    def plan_signature(self) -> dict:
        return {"batch_size": self.config.batch_size, "steps_per_epoch": self.steps_per_epoch}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config` on every device of every process, writing checkpoints,
    metrics.jsonl, TensorBoard events and pictures under `workdir`; resumes from the latest
    checkpoint there (mid-epoch too). Returns the final evaluation of the chosen checkpoint
    (`evaluate.checkpoint`: the best by validation loss unless the config says the last).

    Raises `Interrupted` after saving a checkpoint when SIGTERM or SIGINT arrives, and
    `TrainingDiverged` on a NaN or infinite loss (the last good checkpoint stays).
    """
    return run_training(config, workdir)[1]


def run_training(config: ml_collections.ConfigDict, workdir: str) -> tuple[TrainState, dict]:
    """`train_and_evaluate`, also returning the final (last-epoch) TrainState.

    One training per workdir at a time (`workdirs.locked`); a rerun must ask for the same run
    as the checkpoints there (`workdirs.check_resumable`), checked before any write."""
    parallel.use_host_devices(config)
    configuration.check(config)
    workdir_path = Path(workdir).expanduser()
    workdirs.check_one_run(config, workdir_path)
    if not parallel.is_main_process():
        workdir_path.mkdir(parents=True, exist_ok=True)
        return _train(config, workdir_path)
    workdirs.make_writable_dir(workdir_path, "--workdir")
    with workdirs.locked(workdir_path):
        return _train(config, workdir_path)


def _train(config: ml_collections.ConfigDict, workdir: Path) -> tuple[TrainState, dict]:
    run = _set_up(config, workdir)
    _restore(run)
    if run.main and run.start_epoch <= config.num_epochs:  # trains further (e.g. more epochs):
        # unfinished until its final metrics are written anew, not the earlier finished run.
        (workdir / workdirs.FINAL_METRICS_FILE).unlink(missing_ok=True)
    window = profiling.StepWindow(config.profile, workdir, run.total_steps, run.host_step)
    try:
        with StopRequest() as stop, window, run.gc:
            run.clock.start(run.host_step)  # for images/s and the ETA
            for epoch in range(run.start_epoch, config.num_epochs + 1):
                position = run.start_position if epoch == run.start_epoch else 0
                mean, rate = _train_epoch(run, epoch, position, stop, window)
                if _end_of_epoch(run, epoch, mean, rate):
                    break
                signum = parallel.max_over_processes(stop.signum or 0)
                if signum and epoch < config.num_epochs:
                    _save_interrupted(run, epoch + 1, 0, history.RunningMean(), signum)
    except BaseException:
        with contextlib.suppress(CheckpointError):
            run.store.wait()  # a save in flight is of a good state: let it finish
        raise
    run.store.wait()
    final = _final_evaluation(run)
    run.writer.close()
    run.store.close()
    return run.state, final


def _set_up(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
    """Checks the workdir, prepares the data, builds the state and compiles the steps."""
    main = parallel.is_main_process()
    if main:
        workdirs.check_resumable(config, workdir, configuration.CONFIG_FILE)
    builder = dataset.prepare(config.data)
    if main:
        workdirs.record_or_check_splits(workdir, dict(builder.info.metadata))
        configuration.save_config(config, workdir)  # load_model and --mode=predict read it
    mesh = parallel.data_mesh()
    feed = Feed(config, builder, mesh)
    _log(
        "Data: %s (%s); %s",
        builder.info.metadata["source"],
        builder.data_path,
        ", ".join(f"{split} {len(src)} slices" for split, src in feed.sources.items()),
    )
    _log(
        "Devices: %d (%d processes), global batch %d = %d per device; compute dtype %s",
        jax.device_count(),
        jax.process_count(),
        config.batch_size,
        config.batch_size // jax.device_count(),
        config.dtype,
    )
    state, step_rng = initial_state(config, mesh)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log("U-Net: %d parameters (%.2fM)", num_params, num_params / 1e6)
    _log("%s", configuration.describe(config))
    steps_per_epoch = len(feed.train_plan(1))
    return _Run(
        config=config,
        workdir=workdir,
        feed=feed,
        mesh=mesh,
        steps=compile_steps(config, mesh, steps_per_epoch),
        store=CheckpointStore(workdir / "checkpoints"),
        writer=summaries.SummaryWriter(workdir / "tensorboard"),
        state=state,
        step_rng=step_rng,
        early=EarlyStopping(config.early_stopping.patience, config.early_stopping.min_delta),
        steps_per_epoch=steps_per_epoch,
    )


def _restore(run: _Run) -> None:
    """Continues from the latest checkpoint, if any (after an epoch, or mid-epoch)."""
    meta = None
    if run.store.latest_step() is not None:
        run.state, meta = run.store.restore_latest(run.state)
        run.host_step = int(run.state.step)
        run.early = run.early.restored(meta["early_stopping"])
        if meta.get("position"):  # saved on an interrupt, mid-epoch
            run.start_epoch, run.start_position, run.partial = meta["epoch"], meta["position"], meta
            _log(
                "Resumed in epoch %d after %d batches (step %d)",
                *(run.start_epoch, run.start_position, run.host_step),
            )
        else:
            run.start_epoch = meta["epoch"] + 1
            _log("Resumed after epoch %d (step %d)", meta["epoch"], run.host_step)
            if (done := meta["epoch"]) > (wanted := run.config.num_epochs):
                logging.warning("%d epochs trained, num_epochs=%d: none to train", done, wanted)
            if run.early.should_stop(meta["epoch"]):
                run.stopped_early, run.start_epoch = meta["epoch"], run.config.num_epochs + 1
                _log("That run had stopped early; evaluating its best checkpoint")
    if run.main:
        history.drop_epochs_after(run.metrics_path, run.start_epoch - 1)
        if run.partial is None and meta is not None:
            history.restore_record(run.metrics_path, meta)  # a kill between checkpoint and log
    saved_plan = (run.partial or {}).get("plan", run.plan_signature)
    if saved_plan != run.plan_signature:
        raise ConfigError(
            f"the checkpoint was saved mid-epoch with {saved_plan}, but this config gives "
            f"{run.plan_signature}: resume with the same batch_size and data settings"
        )


def _train_epoch(
    run: _Run, epoch: int, position: int, stop: StopRequest, window: profiling.StepWindow
) -> tuple[history.RunningMean, tuple[int, float, float]]:
    """Trains one epoch from batch `position` on; (the train metrics' mean, (images trained
    in this session, their seconds, the epoch's start)). Each step's metrics are read while
    the next step runs (`history.LateReader`): the host never waits on the step just sent,
    except the session's first, which compiles: its time is left out of every rate."""
    mean = history.RunningMean(**(run.partial["train_mean"] if position else {}))
    started = t_epoch = time.perf_counter()
    images = [0]
    run.clock.new_epoch(run.host_step)

    def account(step: int, out: dict) -> None:
        if not np.isfinite(out["loss"]):
            raise TrainingDiverged(
                f"loss is {out['loss']} at step {step} (epoch {epoch}); stopping. The last "
                f"good checkpoint (step {run.store.latest_step()}) is in {run.store.directory}."
            )
        mean.add(out)
        images[0] += int(out["count"])
        if step % run.config.log_every_steps == 0 or step == run.total_steps:
            _log_step(run, epoch, step, out)

    reader = history.LateReader(account, lag=0 if parallel.steps_must_sync() else 1)
    batches = run.feed.batches("train", run.feed.train_plan(epoch), start=position)
    for batch in window.marked(batches, run.host_step + 1, lambda: run.state):
        signum = stop.agreed(run.host_step)
        if signum:
            reader.flush()
            _save_interrupted(run, epoch, position, mean, signum)
        if not run.clock.compiled:
            _log("Compiling the train step (the first step waits for it) ...")
        run.state, out = run.steps.train(
            run.state, input_pipeline.device_batch(batch), run.step_rng
        )
        run.host_step += 1
        position += 1
        reader.push(run.host_step, out)
        if not run.clock.compiled:  # rates count from here: compiling is not training
            reader.flush()
            run.clock.compiled = True
            _log("Train step compiled and run in %.1f s", time.perf_counter() - t_epoch)
            t_epoch, images[0] = time.perf_counter(), 0
            run.clock.start(run.host_step)
    reader.flush()
    return mean, (images[0], time.perf_counter() - t_epoch, started)


def _log_step(run: _Run, epoch: int, step: int, out: dict) -> None:
    line, images_per_s = run.clock.step_line(step, run.total_steps, epoch, out["loss"])
    _log("%s", line)
    scalars = {"train/loss": out["loss"], "train/dice": out["dice"]}
    scalars["train/learning_rate"] = learning_rate(run.state)
    run.writer.scalars(step, {**scalars, "train/images_per_s": images_per_s})


def _end_of_epoch(
    run: _Run, epoch: int, mean: history.RunningMean, rate: tuple[int, float, float]
) -> bool:
    """Validates (when there is a validation split), steps the plateau schedule, saves, logs
    and draws; True to stop early."""
    feed, val, lr_used, split = run.feed, None, learning_rate(run.state), "validation"
    if split in feed.sources:
        val = evaluate(run.steps.eval, run.state, *feed.eval_batches(split), feed.patient_id[split])
        run.state = run.steps.plateau(run.state, val["loss"])
    record = {
        "epoch": epoch,
        "step": run.host_step,
        "learning_rate": lr_used,
        **{f"train_{k}": v for k, v in mean.result().items()},
        **history.validation_fields(val),
        "images_per_s": rate[0] / max(rate[1], 1e-9),
        "epoch_seconds": time.perf_counter() - rate[2],  # validation included
    }
    record.update(run.gc.epoch_end())  # the host's garbage collector (lggunet.host_gc)
    stop_now = val is not None and run.early.update(epoch, val["loss"])
    run.store.save(run.host_step, run.state, {**record, "early_stopping": run.early.to_json()})
    if epoch % run.config.summary_every_epochs == 0 or stop_now:
        summaries.draw_validation(  # a collective: every process runs it
            run.writer,
            run.steps.predict,
            run.state,
            feed,
            run.mesh,
            run.host_step,
            run.config.summary_images,
        )
    if run.main:
        history.append(run.metrics_path, record)
        run.writer.scalars(
            run.host_step,
            {f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")},
        )
        run.writer.flush()
    _log("%s", history.epoch_line(record, run.config.num_epochs))
    if stop_now:
        run.stopped_early = epoch
        _log(
            "Early stopping after epoch %d: val_loss has not improved by more than %g since "
            "epoch %d (patience %d)",
            *(epoch, run.early.min_delta, run.early.best_epoch, run.early.patience),
        )
    return stop_now


def _save_interrupted(
    run: _Run, epoch: int, position: int, mean: history.RunningMean, signum: int
) -> None:
    """Saves a mid-epoch checkpoint (unless one holds this state) and raises Interrupted."""
    store, step = run.store, run.host_step
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(run.state.params)):
        raise TrainingDiverged(
            f"parameters are not finite at step {step}; not saving them. The last good "
            f"checkpoint (step {store.latest_step()}) is in {store.directory}."
        )
    store.wait()  # an end-of-epoch save in flight may already hold this state
    if step not in store.steps():
        meta = {"epoch": epoch, "position": position, "step": step, "plan": run.plan_signature}
        meta |= {"train_mean": mean.to_json(), "early_stopping": run.early.to_json()}
        store.save(step, run.state, meta)
    store.wait()
    store.close()
    run.writer.close()
    where = f"epoch {epoch}, after {position} of {run.steps_per_epoch} batches (step {step})"
    _log("Stopped on a signal in %s; checkpoint saved. Rerun to continue.", where)
    raise Interrupted(signum, f"stopped on a signal in {where}; rerun to continue")


def _final_evaluation(run: _Run) -> dict:
    """Scores the chosen checkpoint (`evaluate.checkpoint`: the best or the last) on validation
    and test; writes final_metrics.json, the training curves and a picture of its predictions."""
    feed = run.feed
    chosen = run.config.evaluate.checkpoint
    state, meta = run.store.restore_chosen(chosen, run.state)
    final = {"checkpoint": chosen, f"{chosen}_epoch": meta["epoch"]}
    final["stopped_early_after_epoch"] = run.stopped_early
    for split in ("validation", "test"):
        if split in feed.sources:
            final[split] = evaluate(
                run.steps.eval, state, *feed.eval_batches(split), feed.patient_id[split]
            )
            _log("%s", history.final_line(meta["epoch"], split, final[split], chosen))
    if run.main:
        files.write_atomic(
            run.workdir / workdirs.FINAL_METRICS_FILE, json.dumps(final, indent=2) + "\n"
        )
    summaries.draw_final(  # a collective: every process runs it
        run.steps.predict, state, feed, run.mesh, run.workdir, run.config.summary_images
    )
    return final


__all__ = [
    "EarlyStopping",
    "StepOptions",
    "TrainState",
    "eval_step",
    "evaluate",
    "run_training",
    "train_and_evaluate",
    "train_step",
]
