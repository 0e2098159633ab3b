"""The files `--mode=evaluate` writes (report.md, report_patients.csv and the pictures:
per-volume Dice by split, best / median / worst slices) and the cross-validation report's
(cv_report.md, cv_volume_dice.png)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from lggunet import evaluator, files, plots, splits

ORDER = ("train", "validation", "test", "unseen")  # the report's splits, in this order


def slice_grid(source, split, scores: dict, out_png: Path) -> Path | None:
    """Best, median and worst tumour-bearing slices (by per-slice Dice) of `split`, the plain
    variant's `evaluator.SplitScores`."""
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
    patients, numbers = split.labels["patient_id"], split.labels["slice_index"]
    for label, idx in picks.items():
        for i in idx:
            chosen.append(int(i))
            titles.append(f"{label}: {patients[i]} #{numbers[i]} Dice {scores['dice'][i]:.2f}")
    # Split order is the data source's order, so example i of the split is source[i].
    images = np.stack([source[i]["image"] for i in chosen])
    masks = evaluator.unpack(split.truth[chosen], split.width)[..., None]
    preds = evaluator.unpack(split.prediction[chosen], split.width)[..., None]
    return plots.contour_grid(images, masks, preds, titles, out_png, columns=3)


def box_plot(per_split_rows: dict[str, list[dict]], out_png: Path) -> Path:
    splits = [s for s in ORDER if per_split_rows.get(s)]
    fig = plots.figure(figsize=(1.8 + 1.6 * len(splits), 3.6))
    ax = fig.subplots()
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
    return out_png


def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    ck = report["checkpoint"]
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: the {ck.get('chosen', 'best')}, step {ck['step']} (epoch {ck['epoch']}, "
        f"val_loss {fmt(ck['val_loss'])}) "
        f"of `{ck['workdir']}`. Data: {report['data']['source']}; split "
        f"{report['data']['split']}.",
        "",
    ]
    if ck.get("run_finished") is False:
        lines += [
            "**Training has not finished** (no final_metrics.json: still training, or "
            "stopped): this is a checkpoint of an unfinished run.",
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
        "Batch formulas over the flattened batch of soft predictions, smooth=100, at the slices' "
        "own size; Loss is the run's training loss (the notebook's is -Dice) on the same batches; "
        "averaged over batches weighted by their slices. Empty slices inflate them.",
        "",
        "| split | variant | Loss | Accuracy | Dice | IoU |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for split, r in report["splits"].items():
        for v, m in r["notebook"].items():
            lines.append(
                f"| {split} | {v} | {fmt(m['loss'])} | {100 * m['accuracy']:.2f}% | "
                f"{fmt(m['dice'])} | {fmt(m['iou'])} |"
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
                f"| {split} | {v} | {r['num_volumes']} | {fmt(vd['mean'])} / "
                f"{fmt(vd['median'])} / {fmt(vd['std'])} | {fmt(m['slice_dice_mean'])} | "
                f"{fmt(m['precision']['mean'])} | {fmt(m['recall']['mean'])} | "
                f"{fmt(hd['mean'], 1)} ({hd['count']}) | {fmt(det['sensitivity'])} | "
                f"{fmt(det['specificity'])} |"
            )
    lines += [
        "",
        "Files: `report.json`, `report_patients.csv`, `report_volume_dice.png`, "
        "`report_slices_<split>.png`.",
        "",
    ]
    return "\n".join(lines)


def json_safe(x):
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def write(workdir: Path, report: dict, rows_by_split: dict[str, list[dict]]) -> None:
    """report_patients.csv, report.md and report.json (in that order: a crash in between
    leaves the old report.json, and cross-validation checks the CSV's patients against it)."""
    fields = ["patient", "institution", "split", "slices", "dice", "true_area", "pred_area"]
    all_rows = [r for rows in rows_by_split.values() for r in rows]
    extra = sorted({k for r in all_rows for k in r} - set(fields))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields + extra)
    writer.writeheader()
    writer.writerows(all_rows)
    files.write_atomic(workdir / "report_patients.csv", table.getvalue())
    files.write_atomic(workdir / "report.md", markdown(report))
    files.write_atomic(workdir / "report.json", json.dumps(report, indent=2) + "\n")


def cv_markdown(result: dict) -> str:
    """The report as Markdown: overall, per institution, "A" series, per fold, notebook."""
    lines = [
        "# Cross-validation report",
        "",
        f"{result['folds']}-fold patient-level cross-validation of `{result['workdir']}`: "
        f"{result['patients']} patients ({result['slices']} slices), each scored once by the "
        "fold model that never saw it, at 256x256. Per-volume Dice: each patient's slices as "
        "one 3D mask, p > 0.5. 95% CI: bootstrap over patients. Missed: Dice < "
        f"{result['miss_threshold']}.",
        "",
        "| variant | patients | mean | median | 95% CI | missed | per fold |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, e in result["variants"].items():
        lines.append(
            f"| {v} | {e['patients']} | {fmt(e['mean'])} | {fmt(e['median'])} | "
            f"{fmt(e['ci95'][0])}-{fmt(e['ci95'][1])} | {e['missed']} | "
            + ", ".join(fmt(x, 3) for x in e["per_fold"])
            + " |"
        )
    lines += ["", f"Best variant by mean: **{result['best_variant']}**.", ""]
    lines += [
        "## By institution and series (plain)",
        "",
        "| group | patients | mean | median | missed |",
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    plain = result["variants"]["plain"]
    groups = {f"institution {k}": e for k, e in plain["institutions"].items()}
    groups['"A" series'] = plain["a_series"]
    if plain.get("copied_all_channels", {}).get("patients"):
        groups["one image in all three channels"] = plain["copied_all_channels"]
    for name, e in groups.items():
        lines.append(
            f"| {name} | {e['patients']} | {fmt(e['mean'])} | {fmt(e['median'])} | {e['missed']} |"
        )
    lines += _weak_lines(result)
    lines += [
        "",
        "## The notebook's table (test folds, weighted by slices)",
        "",
        "Batch formulas over the flattened batch of soft predictions, smooth=100; empty slices "
        "inflate them.",
        "",
        "| variant | Loss | Accuracy | Dice | IoU |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v, m in result["notebook"].items():
        lines.append(
            f"| {v} | {fmt(m['loss'])} | {100 * m['accuracy']:.2f}% | {fmt(m['dice'])} | "
            f"{fmt(m['iou'])} |"
        )
    lines += ["", "Files: `cv_report.json`, `cv_patients.csv`, `cv_volume_dice.png`.", ""]
    return "\n".join(lines)


def _weak_lines(result: dict) -> list[str]:
    """The weak patients of each variant: how many, and how many under-segmented."""
    entries = {v: e["weak"] for v, e in result["variants"].items() if e.get("weak")}
    if not entries:
        return []
    below = next(iter(entries.values()))["below"]
    lines = [
        "",
        f"## How the weak patients fail (Dice < {below})",
        "",
        "Under-segmented: recall below precision (tumour left out; what is marked is mostly "
        "tumour), or nothing marked. Over-segmented: the other way round.",
        "",
        "| variant | weak | under-segmented | over-segmented | mean precision | mean recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for v, w in entries.items():
        under = len(w["under_segmented"])
        lines.append(
            f"| {v} | {w['patients']} | {under} | {w['patients'] - under} | "
            f"{fmt(w['mean_precision'])} | {fmt(w['mean_recall'])} |"
        )
    return lines


def cv_plot(rows: list[dict], out_png: Path, miss: float) -> None:
    """Per-volume Dice of every patient by institution (plain variant)."""
    by_inst: dict[str, list[float]] = {}
    for r in rows:
        by_inst.setdefault(splits.institution_of(r["patient"]), []).append(float(r["dice"]))
    names = sorted(by_inst)
    fig = plots.figure(figsize=(1.8 + 1.2 * len(names), 3.6))
    ax = fig.subplots()
    ax.boxplot([by_inst[n] for n in names], showmeans=True)
    for i, n in enumerate(names, 1):
        jitter = np.random.default_rng(i).uniform(-0.08, 0.08, len(by_inst[n]))
        ax.scatter(np.full(len(by_inst[n]), i) + jitter, by_inst[n], s=12, alpha=0.6)
    ax.set_xticks(range(1, len(names) + 1), [f"{n}\n({len(by_inst[n])})" for n in names])
    ax.axhline(miss, color="red", lw=0.8, ls="--")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("per-volume Dice (test fold)")
    ax.set_title("cross-validation: every patient scored by the model that never saw it")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.write_atomic(out_png, lambda p: fig.savefig(p, dpi=100))
