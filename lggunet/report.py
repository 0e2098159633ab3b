"""`--mode=evaluate`: the best checkpoint scored on every split, in the notebook's terms and
the literature's, written as report.json, report.md, a per-patient CSV and pictures.

Variants: "plain" (the network, p > 0.5), "tta" (averaged with the horizontally flipped
prediction), "lcc" (largest 3D connected component per patient) and "tta+lcc"; which are
computed follows `config.evaluate`. Everything is scored at the data's 256x256 resolution
(predictions of a smaller model are resized back), which is also what `--mode=predict` writes.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import ml_collections
import numpy as np
from absl import logging

from lggunet import (
    config_checks,
    dataset,
    evaluation,
    files,
    inference,
    input_pipeline,
    kaggle3m,
    metrics,
    plots,
    workdirs,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPLITS = ("train", "validation", "test")
# Patients the run never saw (evaluating on other data than it trained on).
REPORTED = (*SPLITS, workdirs.UNSEEN)
# Which stored prediction each variant starts from (the lcc ones then keep the largest component).
_BASE_VARIANT = {"plain": "plain", "tta": "tta", "lcc": "plain", "tta+lcc": "tta"}


def _notebook_metrics(masks: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The notebook's batch formulas (smooth=100) on one batch."""
    t = masks[..., None].astype(np.float32)
    p = probs[..., None]
    d = float(metrics.dice_coef(t, p))
    return {
        "loss": -d,
        "accuracy": float(metrics.pixel_accuracy(t, p)),
        "dice": d,
        "iou": float(metrics.iou_coef(t, p)),
    }


class _Split:
    """One split's slices: ids, true masks and each variant's predicted masks (bit-packed)."""

    def __init__(self):
        self.patient, self.institution, self.slice_index = [], [], []
        self.true, self.pred = [], {"plain": [], "tta": []}
        self.notebook = {"plain": [], "tta": []}
        self.weights = []
        self.same_pairs: dict[str, set] = {}  # per patient: channel pairs identical so far


def _predict_split(model: inference.Model, source, batch_size: int, tta: bool) -> _Split:
    out = _Split()
    plan = input_pipeline.epoch_plan(len(source), batch_size, shuffle=False)
    for batch in input_pipeline.iterate(source, plan):
        valid = batch["valid"]
        images = batch["image"][valid]
        masks = batch["mask"][valid][..., 0]
        stats = [batch[k][valid] for k in ("volume_mean", "volume_std", "brain_stats")]
        probs = {"plain": model(images, *stats)}
        if tta:
            flipped = model(images[:, :, ::-1], *stats)[:, :, ::-1]
            probs["tta"] = 0.5 * (probs["plain"] + flipped)
        out.weights.append(len(images))
        for name, p in probs.items():
            out.notebook[name].append(_notebook_metrics(masks, p))
            out.pred[name].append(np.packbits(p > 0.5, axis=-1))
        out.true.append(np.packbits(masks > 0, axis=-1))
        out.patient.extend(input_pipeline.as_text(x) for x in batch["patient_id"][valid])
        for pid, image in zip(out.patient[-len(images) :], images, strict=True):
            same = {
                (i, j)
                for i, j in kaggle3m.CHANNEL_PAIRS
                if np.array_equal(image[..., i], image[..., j])
            }
            out.same_pairs[pid] = out.same_pairs.get(pid, same) & same
        out.slice_index.extend(batch["slice_index"][valid].tolist())
    out.true = np.concatenate(out.true)
    out.pred = {k: np.concatenate(v) for k, v in out.pred.items() if v}
    out.notebook = {k: v for k, v in out.notebook.items() if v}
    return out


def _weighted(rows: list[dict], weights: list[int]) -> dict[str, float]:
    w = np.asarray(weights, np.float64)
    return {k: float(np.dot([r[k] for r in rows], w) / w.sum()) for k in rows[0]}


def _score(split: _Split, config: ml_collections.ConfigDict) -> tuple[dict, list[dict], dict]:
    """(the split's report, its per-patient rows, per-slice Dice of the plain variant)."""
    patients = np.asarray(split.patient)
    order = np.lexsort((np.asarray(split.slice_index), patients))
    variants = ["plain"] + (["tta"] if "tta" in split.pred else [])
    if config.evaluate.largest_component:
        variants += [f"{v}+lcc" if v == "tta" else "lcc" for v in list(variants)]
    unpack = lambda packed: np.unpackbits(packed, axis=-1).astype(bool)  # noqa: E731
    slice_true_area = np.zeros(len(patients), np.int64)
    slice_pred_area = {v: np.zeros(len(patients), np.int64) for v in variants}
    slice_dice = {v: np.zeros(len(patients)) for v in variants}
    per_volume = {v: {"dice": [], "precision": [], "recall": [], "hd95": []} for v in variants}
    rows = []
    for pid in sorted(set(split.patient)):
        idx = order[patients[order] == pid]
        truth = unpack(split.true[idx])
        slice_true_area[idx] = truth.sum(axis=(1, 2))
        row = {"patient": pid, "slices": len(idx), "true_area": int(truth.sum())}
        row["copied_channels"] = kaggle3m.channel_copies_label(split.same_pairs.get(pid, ()))
        for v in variants:
            pred = unpack(split.pred[_BASE_VARIANT[v]][idx])
            if v.endswith("lcc"):
                pred = inference.largest_component(pred).astype(bool)
            slice_pred_area[v][idx] = pred.sum(axis=(1, 2))
            slice_dice[v][idx] = [evaluation.dice(t, p) for t, p in zip(truth, pred, strict=True)]
            vd = evaluation.dice(truth, pred)
            prec, rec = evaluation.precision_recall(truth, pred)
            hd = evaluation.hd95(truth, pred)
            for key, value in zip(per_volume[v], (vd, prec, rec, hd), strict=True):
                per_volume[v][key].append(value)
            suffix = "" if v == "plain" else "_" + v.replace("+", "_")
            row[f"dice{suffix}"] = vd
            row[f"pred_area{suffix}"] = int(pred.sum())
            row[f"hd95{suffix}"] = hd
        rows.append(row)
    report = {
        "num_slices": len(patients),
        "num_volumes": len(rows),
        "notebook": {
            name: _weighted(batches, split.weights) for name, batches in split.notebook.items()
        },
        "variants": {},
    }
    k = config.evaluate.detection_min_pixels
    for v in variants:
        report["variants"][v] = {
            "volume_dice": evaluation.summary(per_volume[v]["dice"]),
            "slice_dice_mean": float(np.mean(slice_dice[v])),
            "precision": evaluation.summary(per_volume[v]["precision"]),
            "recall": evaluation.summary(per_volume[v]["recall"]),
            "hd95_pixels": evaluation.summary(per_volume[v]["hd95"]),
            "detection": evaluation.detection(slice_true_area, slice_pred_area[v], k),
        }
    return report, rows, {"dice": slice_dice["plain"], "true_area": slice_true_area}


def _slice_grid(source, split: _Split, scores: dict, name: str, out_png: Path) -> Path | None:
    """Best, median and worst tumour-bearing slices (by per-slice Dice, plain variant)."""
    tumour = np.flatnonzero(scores["true_area"] > 0)
    if len(tumour) == 0:
        return None
    ranked = tumour[np.argsort(scores["dice"][tumour], kind="stable")]
    mid = len(ranked) // 2
    picks = {
        "best": ranked[::-1][:3],
        "median": ranked[max(0, mid - 1) : mid + 2],
        "worst": ranked[:3],
    }
    chosen, titles = [], []
    for label, idx in picks.items():
        for i in idx:
            chosen.append(int(i))
            titles.append(
                f"{label}: {split.patient[i]} #{split.slice_index[i]} Dice {scores['dice'][i]:.2f}"
            )
    # Split order is the data source's order, so example i of the split is source[i].
    images = np.stack([source[i]["image"] for i in chosen])
    masks = np.unpackbits(split.true[chosen], axis=-1)[..., None]
    preds = np.unpackbits(split.pred["plain"][chosen], axis=-1)[..., None]
    return plots.contour_grid(images, masks, preds, titles, out_png, columns=3)


def _box_plot(per_split_rows: dict[str, list[dict]], out_png: Path) -> Path:
    splits = [s for s in REPORTED if per_split_rows.get(s)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(splits), 3.6))
    data = [[r["dice"] for r in per_split_rows[s]] for s in splits]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(
        range(1, len(splits) + 1),
        [f"{s}\n({len(d)} patients)" for s, d in zip(splits, data, strict=True)],
    )
    for i, d in enumerate(data, 1):
        ax.scatter(
            np.full(len(d), i) + np.random.default_rng(i).uniform(-0.08, 0.08, len(d)),
            d,
            s=10,
            alpha=0.6,
        )
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("per-volume Dice")
    ax.set_title("per-volume Dice by split (plain model, p > 0.5)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write_atomic(out_png, lambda p: fig.savefig(p, dpi=100))
    plt.close(fig)
    return out_png


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _markdown(report: dict) -> str:
    ck = report["checkpoint"]
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: step {ck['step']} (epoch {ck['epoch']}, val_loss {_fmt(ck['val_loss'])}) "
        f"of `{ck['workdir']}`. Data: {report['data']['source']}; split "
        f"{report['data']['split']}.",
        "",
    ]
    data = report["data"]
    if data.get("trained_on") and data["trained_on_fingerprint"] != data["fingerprint"]:
        lines += [
            f"The model was trained on other data ({data['trained_on']}): every patient keeps "
            "the split it had in training; patients it never saw are under `unseen`.",
            "",
        ]
    lines += [
        "## The notebook's table",
        "",
        "Batch formulas over the flattened batch of soft predictions, smooth=100 (Loss is the "
        "notebook's -Dice); averaged over batches weighted by their slices. Empty slices inflate "
        "them.",
        "",
        "| split | variant | Loss | Accuracy | Dice | IoU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for split, r in report["splits"].items():
        for v, m in r["notebook"].items():
            lines.append(
                f"| {split} | {v} | {_fmt(m['loss'])} | {100 * m['accuracy']:.2f}% | "
                f"{_fmt(m['dice'])} | {_fmt(m['iou'])} |"
            )
    k = report["settings"]["detection_min_pixels"]
    lines += [
        "",
        "## The literature's table",
        "",
        "Per-volume Dice: each patient's slices as one 3D mask, p > 0.5. HD95 in pixels (unit "
        "voxel grid; undefined when a mask is empty, so averaged over the volumes where it is "
        f"defined). Detection: a slice is called positive with >= {k} predicted pixels.",
        "",
        "| split | variant | volumes | volume Dice mean / median / std | slice Dice | "
        "precision | recall | HD95 mean (volumes) | sensitivity | specificity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for split, r in report["splits"].items():
        for v, m in r["variants"].items():
            vd, hd, det = m["volume_dice"], m["hd95_pixels"], m["detection"]
            lines.append(
                f"| {split} | {v} | {r['num_volumes']} | {_fmt(vd['mean'])} / "
                f"{_fmt(vd['median'])} / {_fmt(vd['std'])} | {_fmt(m['slice_dice_mean'])} | "
                f"{_fmt(m['precision']['mean'])} | {_fmt(m['recall']['mean'])} | "
                f"{_fmt(hd['mean'], 1)} ({hd['count']}) | {_fmt(det['sensitivity'])} | "
                f"{_fmt(det['specificity'])} |"
            )
    lines += [
        "",
        "Files: `report.json`, `report_patients.csv`, `report_volume_dice.png`, "
        "`report_slices_<split>.png`.",
        "",
    ]
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


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


def evaluate_run(
    config: ml_collections.ConfigDict, workdir: str | Path, splits: tuple[str, ...] = SPLITS
) -> dict:
    """Scores the best checkpoint in `workdir` on `splits` (default: every split) and writes
    the report files.

    The data split and model come from the run's saved config.json when there is one (so the
    test patients are the ones held out in training); data paths and `evaluate.*` come from
    `config`.
    """
    config_checks.check(config)
    workdir, checkpoints = inference.find_checkpoints(workdir)
    run_config = inference.saved_config(workdir) or config
    run_config = ml_collections.ConfigDict(run_config.to_dict())
    for key in ("manual_dir", "data_dir"):
        if config.data[key]:
            run_config.data[key] = config.data[key]
    run_config.data.skip_invalid = bool(  # a bad slice in the data to evaluate: skipped if asked
        run_config.data.get("skip_invalid", False) or config.data.get("skip_invalid", False)
    )
    run_config.evaluate = config.evaluate
    run_config.eval_batch_size = config.eval_batch_size
    model = inference.model_from_config(run_config, checkpoints)
    meta = model.record
    record = workdirs.recorded_splits(workdir)
    if record is not None:
        source = kaggle3m.open_source(dataset.locate_source(run_config.data))
        if source.fingerprint() != record["fingerprint"]:
            # Other data: every patient keeps the split it had in training (by_recorded_split
            # below), so the data is prepared whole, without a split of its own that a small
            # folder could not fill.
            run_config.data.cv_folds, run_config.data.cv_fold = 0, -1
            run_config.data.split_mode = "patient"
            run_config.data.split_fractions = (1.0, 0.0, 0.0)
    builder = dataset.prepare(run_config.data)
    sources = by_recorded_split(builder, builder.as_data_source(), record, workdir)
    report = {
        "checkpoint": {
            "workdir": str(workdir),
            "step": meta["checkpoint_step"],
            "epoch": meta.get("epoch"),
            "val_loss": meta.get("val_loss"),
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
            "tta": bool(config.evaluate.tta),
            "largest_component": bool(config.evaluate.largest_component),
            "detection_min_pixels": int(config.evaluate.detection_min_pixels),
            "hd95_units": "pixels (unit voxel grid)",
        },
        "splits": {},
    }
    rows_by_split, pictures = {}, []
    for name in [*splits, workdirs.UNSEEN]:
        if name not in sources:
            continue
        logging.info("Evaluating %s (%d slices)", name, len(sources[name]))
        split = _predict_split(model, sources[name], config.eval_batch_size, config.evaluate.tta)
        report["splits"][name], rows, scores = _score(split, config)
        for r in rows:
            r["split"] = name
            r["institution"] = r["patient"].split("_")[1] if "_" in r["patient"] else ""
        rows_by_split[name] = rows
        png = _slice_grid(sources[name], split, scores, name, workdir / f"report_slices_{name}.png")
        if png:
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
    pictures.append(_box_plot(rows_by_split, workdir / "report_volume_dice.png"))
    report = _json_safe(report)
    fields = ["patient", "institution", "split", "slices", "dice", "true_area", "pred_area"]
    all_rows = [r for rows in rows_by_split.values() for r in rows]
    extra = sorted({k for r in all_rows for k in r} - set(fields))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields + extra)
    writer.writeheader()
    writer.writerows(all_rows)
    # The CSV first and report.json last: a crash in between leaves the old report.json, and
    # cross-validation checks the CSV's patients against it.
    files.write_atomic(workdir / "report_patients.csv", table.getvalue())
    files.write_atomic(workdir / "report.md", _markdown(report))
    files.write_atomic(workdir / "report.json", json.dumps(report, indent=2) + "\n")
    logging.info(
        "Wrote %s, report.md, report_patients.csv and %d pictures",
        workdir / "report.json",
        len(pictures),
    )
    return report
