"""`--mode=evaluate`: the best checkpoint scored on every split, in the notebook's terms and
the literature's, written as report.json, report.md, a per-patient CSV and pictures.

Variants: "plain" (the network, p > 0.5), "tta" (averaged with the horizontally flipped
prediction), "lcc" (largest 3D connected component per patient) and "tta+lcc"; which are
computed follows `config.evaluate`. Scores come from `lggunet.evaluator`, the evaluator
training uses, at the slices' own resolution (256x256; predictions of a smaller model are
resized back), which is also what `--mode=predict` writes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from lggunet import (
    configuration,
    dataset,
    evaluator,
    inference,
    input_pipeline,
    kaggle3m,
    parallel,
    postprocessing,
    report_files,
    steps,
    volume_metrics,
    workdirs,
)

SPLITS = ("train", "validation", "test")
# Patients the run never saw (evaluating on other data than it trained on).
REPORTED = (*SPLITS, workdirs.UNSEEN)
# Which stored prediction each variant starts from (the lcc ones then keep the largest component).
_BASE_VARIANT = {"plain": "plain", "tta": "tta", "lcc": "plain", "tta+lcc": "tta"}


# One compiled eval step per (options, mesh): every split, variant and fold model reuses it.
_compiled_eval = functools.lru_cache(maxsize=8)(steps.compile_eval)


def score_source(
    weights: steps.Weights | tuple[steps.Weights, ...],
    source: Sequence[dict],
    config: ml_collections.ConfigDict,
    tta: bool,
) -> dict[str, evaluator.SplitScores]:
    """Every example of `source` through the one evaluator, keeping the predictions: the
    plain variant, and the flip-TTA one when `tta`. `config` gives the model's input size,
    normalisation and loss, and the batch size; one process."""
    mesh = parallel.data_mesh()
    weights = jax.device_put(weights, parallel.replicated(mesh))  # on every device of the mesh
    options = dataclasses.replace(steps.StepOptions.from_config(config), augment=None)
    source = input_pipeline.with_context(source, config.data.context_slices)
    plan = input_pipeline.epoch_plan(len(source), config.eval_batch_size, shuffle=False)
    out = {}
    for name, flip in (("plain", False), ("tta", True)):
        if flip and not tta:
            continue
        fn = _compiled_eval(dataclasses.replace(options, tta=flip), mesh, True)
        batches = input_pipeline.prefetch_to_device(input_pipeline.iterate(source, plan), mesh=mesh)
        out[name] = evaluator.run(
            fn, weights, plan, batches, {}, batch_keys=("patient_id", "slice_index")
        )
    return out


def _copied_channels(plain: evaluator.SplitScores, patients: np.ndarray) -> dict[str, str]:
    """Per patient, kaggle3m's label of the channel pairs identical on every slice."""
    out = {}
    for pid in sorted(set(patients.tolist())):
        same = plain.same_channels[patients == pid].all(axis=0)
        out[pid] = kaggle3m.channel_copies_label(
            {pair for pair, s in zip(steps.SAME_CHANNEL_PAIRS, same, strict=True) if s}
        )
    return out


def _patient_row(pid, truth, preds: dict[str, np.ndarray], copied: str) -> tuple[dict, dict]:
    """(the CSV row of one patient, its per-variant (dice, precision, recall, hd95, per-slice
    predicted areas and Dice))."""
    row = {"patient": pid, "slices": len(truth), "true_area": int(truth.sum())}
    row["copied_channels"] = copied
    scores = {}
    for v, pred in preds.items():
        vd = volume_metrics.dice(truth, pred)
        prec, rec = volume_metrics.precision_recall(truth, pred)
        hd = volume_metrics.hd95(truth, pred)
        slice_dice = [volume_metrics.dice(t, p) for t, p in zip(truth, pred, strict=True)]
        scores[v] = (vd, prec, rec, hd, pred.sum(axis=(1, 2)), slice_dice)
        suffix = "" if v == "plain" else "_" + v.replace("+", "_")
        row[f"dice{suffix}"] = vd
        row[f"pred_area{suffix}"] = int(pred.sum())
        row[f"precision{suffix}"], row[f"recall{suffix}"] = prec, rec
        row[f"hd95{suffix}"] = hd
    return row, scores


def score_split(
    scores: dict[str, evaluator.SplitScores], config: ml_collections.ConfigDict
) -> tuple[dict, list[dict], dict]:
    """(the split's report, its per-patient rows, per-slice Dice of the plain variant)."""
    plain = scores["plain"]
    patients = plain.labels["patient_id"].astype(str)
    order = np.lexsort((plain.labels["slice_index"], patients))
    variants = list(scores)
    if config.evaluate.largest_component:
        variants += [f"{v}+lcc" if v == "tta" else "lcc" for v in list(scores)]
    n = len(patients)
    slice_true_area = np.zeros(n, np.int64)
    slice_pred_area = {v: np.zeros(n, np.int64) for v in variants}
    slice_dice = {v: np.zeros(n) for v in variants}
    per_volume = {v: {"dice": [], "precision": [], "recall": [], "hd95": []} for v in variants}
    copied = _copied_channels(plain, patients)
    rows = []
    for pid in sorted(set(patients.tolist())):
        idx = order[patients[order] == pid]
        truth = evaluator.unpack(plain.truth[idx], plain.width)
        slice_true_area[idx] = truth.sum(axis=(1, 2))
        preds = {}
        for v in variants:
            base = scores[_BASE_VARIANT[v]]
            preds[v] = evaluator.unpack(base.prediction[idx], base.width)
            if v.endswith("lcc"):
                preds[v] = postprocessing.largest_component(preds[v]).astype(bool)
        row, patient_scores = _patient_row(pid, truth, preds, copied[pid])
        for v, (vd, prec, rec, hd, areas, sd) in patient_scores.items():
            slice_pred_area[v][idx], slice_dice[v][idx] = areas, sd
            for key, value in zip(per_volume[v], (vd, prec, rec, hd), strict=True):
                per_volume[v][key].append(value)
        rows.append(row)
    report = {
        "num_slices": n,
        "num_volumes": len(rows),
        "notebook": {name: s.notebook for name, s in scores.items()},
        "variants": {},
    }
    k = config.evaluate.detection_min_pixels
    for v in variants:
        report["variants"][v] = {
            "volume_dice": volume_metrics.summary(per_volume[v]["dice"]),
            "slice_dice_mean": float(np.mean(slice_dice[v])),
            "precision": volume_metrics.summary(per_volume[v]["precision"]),
            "recall": volume_metrics.summary(per_volume[v]["recall"]),
            "hd95_pixels": volume_metrics.summary(per_volume[v]["hd95"]),
            "detection": volume_metrics.detection(slice_true_area, slice_pred_area[v], k),
        }
    return report, rows, {"dice": slice_dice["plain"], "true_area": slice_true_area}


class _Picked(Sequence):
    """Examples taken from several data sources, in the given order."""

    def __init__(self, parts: list[tuple[Sequence, int]]):
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int) -> dict:
        source, index = self.parts[i]
        return source[index]


def by_recorded_split(builder, sources: dict, record: dict | None, workdir: Path) -> dict:
    """The prepared examples regrouped by the split each patient (or slice, for a slice-level
    split) had when the run trained (`splits.json`); patients it never saw go to "unseen".
    On the run's own data this is the prepared split itself."""
    if record is None:
        logging.warning(
            "%s has no %s (trained before lggunet recorded its split): the split is recomputed "
            "from the saved config, which is right only on the data it was trained on",
            workdir,
            workdirs.SPLITS_FILE,
        )
        return dict(sources)
    by_slice = record.get("slices") if record.get("split_mode") == "slice" else None
    if by_slice:
        labels = {key: split for split, keys in by_slice.items() for key in keys}
    else:
        labels = workdirs.label_patients(record)
    picked: dict[str, list] = {name: [] for name in REPORTED}
    for name, source in sources.items():
        factory = functools.partial(builder.as_data_source, name)
        patients = [
            input_pipeline.as_text(p) for p in input_pipeline.read_field(factory, "patient_id")
        ]
        keys = patients
        if by_slice:
            indices = input_pipeline.read_field(factory, "slice_index")
            keys = [f"{p}#{i}" for p, i in zip(patients, indices, strict=True)]
        for i, key in enumerate(keys):
            picked[labels.get(key, workdirs.UNSEEN)].append((source, i))
    same = all(
        len(picked[name]) == len(source)
        and all(s is source and i == k for k, (s, i) in enumerate(picked[name]))
        for name, source in sources.items()
    )
    if same and not picked[workdirs.UNSEEN]:
        return dict(sources)
    counts = ", ".join(f"{name} {len(p)}" for name, p in picked.items() if p)
    logging.warning(
        "The data (%s) is not the data this run trained on (%s): slices are labelled by the "
        "split their patient had in training (%s); %s slices of patients it never saw are "
        "reported as '%s'",
        builder.info.metadata["source"],
        record["source"],
        counts,
        len(picked[workdirs.UNSEEN]),
        workdirs.UNSEEN,
    )
    return {name: _Picked(parts) for name, parts in picked.items() if parts}


def _prepare_for(run_config: ml_collections.ConfigDict, record: dict | None):
    """The prepared data to score: the run's split on its own data; on other data the whole
    folder as one split (each patient then keeps the split it had in training)."""
    if record is not None:
        source = kaggle3m.open_source(dataset.locate_source(run_config.data))
        if source.fingerprint() != record["fingerprint"]:
            # A small folder of new patients could not fill a split of its own.
            run_config.data.cv_folds, run_config.data.cv_fold = 0, -1
            run_config.data.split_mode = "patient"
            run_config.data.split_fractions = (1.0, 0.0, 0.0)
    return dataset.prepare(run_config.data)


def _header(workdir, meta, builder, run_config, record, config) -> dict:
    return {
        "checkpoint": {
            "workdir": str(workdir),
            "step": meta["checkpoint_step"],
            "epoch": meta.get("epoch"),
            "val_loss": meta.get("val_loss"),
            "chosen": run_config.evaluate.checkpoint,
            "run_finished": workdirs.finished(workdir),
        },
        "data": {
            "source": builder.info.metadata["source"],
            "split": f"{run_config.data.split_mode}, seed {run_config.data.split_seed}, "
            f"fractions {tuple(run_config.data.split_fractions)}",
            "fingerprint": builder.info.metadata["fingerprint"],
            "trained_on": None if record is None else record["source"],
            "trained_on_fingerprint": None if record is None else record["fingerprint"],
        },
        "settings": {
            "image_size": run_config.data.image_size,
            "resolution": "the slices' own (256x256 for the Kaggle data)",
            "tta": bool(config.evaluate.tta),
            "largest_component": bool(config.evaluate.largest_component),
            "detection_min_pixels": int(config.evaluate.detection_min_pixels),
            "hd95_units": "pixels (unit voxel grid)",
        },
        "splits": {},
    }


def evaluate_run(
    config: ml_collections.ConfigDict, workdir: str | Path, splits: tuple[str, ...] = SPLITS
) -> dict:
    """Scores the best checkpoint in `workdir` on `splits` (default: every split) and writes
    the report files.

    The data split and model come from the run's saved config.json when there is one (so the
    test patients are the ones held out in training); data paths and `evaluate.*` come from
    `config` (`configuration.for_evaluation`).
    """
    configuration.check(config)
    workdir, checkpoints = workdirs.find_checkpoints(workdir)
    run_config = configuration.for_evaluation(configuration.saved_config(workdir), config)
    model = inference.warn_if_unfinished(
        workdir,
        inference.model_from_config(
            run_config, checkpoints, checkpoint=run_config.evaluate.checkpoint
        ),
    )
    record = workdirs.recorded_splits(workdir)
    builder = _prepare_for(run_config, record)
    sources = by_recorded_split(builder, builder.as_data_source(), record, workdir)
    report = _header(workdir, model.record, builder, run_config, record, config)
    rows_by_split, pictures = {}, []
    for name in [*splits, workdirs.UNSEEN]:
        if name not in sources:
            continue
        logging.info("Evaluating %s (%d slices)", name, len(sources[name]))
        scores = score_source(model.weights, sources[name], run_config, config.evaluate.tta)
        report["splits"][name], rows, per_slice = score_split(scores, config)
        for r in rows:
            r["split"] = name
            r["institution"] = r["patient"].split("_")[1] if "_" in r["patient"] else ""
        rows_by_split[name] = rows
        png = workdir / f"report_slices_{name}.png"
        if report_files.slice_grid(sources[name], scores["plain"], per_slice, png):
            pictures.append(png)
        plain = report["splits"][name]["variants"]["plain"]
        logging.info(
            "%s: per-volume Dice %.4f (median %.4f) over %d patients; notebook Dice %.4f",
            name,
            plain["volume_dice"]["mean"],
            plain["volume_dice"]["median"],
            len(rows),
            report["splits"][name]["notebook"]["plain"]["dice"],
        )
    pictures.append(report_files.box_plot(rows_by_split, workdir / "report_volume_dice.png"))
    for old in set(workdir.glob("report_slices_*.png")) - set(pictures):  # an earlier report's
        old.unlink(missing_ok=True)
    report = report_files.json_safe(report)
    report_files.write(workdir, report, rows_by_split)
    logging.info(
        "Wrote %s, report.md, report_patients.csv and %d pictures",
        workdir / "report.json",
        len(pictures),
    )
    return report
