"""Evaluation reports: test metrics, corruption robustness, label efficiency.

:func:`evaluate_model_dir` scores a fine-tuned model on a split of its data set (native image
resolution, HD95 in mm when ``pixel_size_mm`` is known), optionally under the US-JEPA
corruptions at severities 1–3, and writes ``metrics.json`` (means, failure counts, p10 /
median / p90 tails, the worst images by name), ``per_image.csv``, ``summary.md`` and PNG plots
(the overlays show the worst images).
:func:`label_efficiency_report` gathers several fine-tuning runs and plots metric vs label ratio
(mean ± std over seeds), like OpenUS Fig. 5–8.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import ConfigError
from usfm_core.outputs import check_out_dir, check_outputs, save_figure

MAIN_METRIC = {"segmentation": "dice", "classification": "macro_f1"}


#: Files :func:`evaluate_model_dir` writes into its report folder.
REPORT_FILES = (
    "metrics.json", "summary.md", "per_image.csv", "per_image_baseline.csv", "robustness.png",
    "overlays.png",
)  # fmt: skip
#: Files :func:`label_efficiency_report` writes into its report folder.
LABEL_EFFICIENCY_FILES = ("label_efficiency.json", "label_efficiency.md", "label_efficiency.png")


def check_report_folder(out_dir: Path, names: Sequence[str], inputs: Sequence[Path]) -> None:
    """Refuse, before anything is written, a report folder that is one of ``inputs`` or whose
    files ``names`` would land in an input folder or replace an input (a data folder's own
    ``summary.md``, say): :func:`usfm_core.outputs.check_out_dir` and
    :func:`usfm_core.outputs.check_outputs`."""
    check_out_dir(out_dir, inputs)
    check_outputs([out_dir / name for name in names], inputs)


def find_splits(model_dir: Path) -> Path | None:
    """``splits.json`` of the run a model folder belongs to (the folder or its parent)."""
    for cand in (model_dir / "splits.json", model_dir.parent / "splits.json"):
        if cand.is_file():
            return cand
    return None


def evaluate_model_dir(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str = "test",
    corruptions: bool = False,
    device: str = "cpu",
    batch_size: int = 8,
    max_items: int | None = None,
    baseline: str | Path | None = None,
    splits_file: str | Path | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Score the model on ``split`` (clean and, optionally, corrupted) and write the report.

    ``baseline`` (e.g. the same recipe trained from scratch) is scored on exactly the same
    items and shown beside the model in ``summary.md``. ``precision``: ``"fp32"`` (default: the
    numbers of the model cards), ``"bf16"`` or ``"auto"`` (:mod:`usfm_core.models.precision`);
    the one used is recorded as ``"precision"``. The split comes from ``splits_file``,
    else from the ``splits.json`` of the model's run folder, else (``split="test"``) from the test
    items the model recorded; ``split="all"`` scores every item; anything else is refused.

    Returns the ``metrics.json`` content: ``{"task", "split", "n", "clean": {...},
    "corrupted": {kind: {severity: {...}}}}`` plus ``"baseline": {"model", "clean",
    "corrupted"}`` when a baseline is given. Each metrics dict holds the means, the failure
    counts, tails and worst images of :func:`seg_tails` (segmentation) or ``n_wrong`` /
    ``worst`` (classification); ``per_image.csv`` (``per_image_baseline.csv``) has one clean
    row per scored image.
    """
    from usfm_core.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
    from usfm_core.finetune.data import LabelledSet, load_splits
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.precision import resolve_precision
    from usfm_core.models.zoo import resolve_model_dir
    from usfm_core.progress import progress_bar
    from usfm_core.utils import atomic_write_text

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    precision = resolve_precision(precision, device)
    model, meta = load_finetuned(model_dir, device=device)
    task = meta["task"]
    data = LabelledSet.from_folder(data_dir, task)
    if task == "segmentation":
        declare_mask_classes(data, meta)
    splits_path = Path(splits_file) if splits_file else find_splits(model_dir)
    if splits_path is not None and not splits_path.is_file():
        raise ConfigError(
            "splits file not found",
            path=splits_path,
            hint="pass the splits.json written by `usfm-core finetune` into its run folder",
        )
    inputs = [Path(data_dir), resolve_model_dir(model_dir)]
    inputs += [Path(baseline)] if baseline is not None else []
    check_report_folder(out_dir, REPORT_FILES, inputs + ([splits_path] if splits_path else []))
    if split == "all":
        indices = list(range(len(data)))
    elif splits_path is not None:
        indices = load_splits(splits_path, data).get(split)
        if indices is None:
            raise ConfigError(
                f"split {split!r} not in splits.json",
                path=splits_path,
                hint="use --split train, val, test or all",
            )
    else:
        indices = _split_without_file(data, meta, split, model_dir)
    indices = indices[:max_items] if max_items else indices
    if not indices:
        raise ConfigError(f"split {split!r} is empty", path=splits_path)
    scorer = _seg_scorer if task == "segmentation" else _cls_scorer
    # One image read = one tick: a bar with rate and ETA on a terminal, a line every 30 s in
    # logs (an HC18 test run used to print nothing for minutes).
    passes = (1 + (len(CORRUPTIONS) * len(SEVERITIES) if corruptions else 0)) * (
        2 if baseline is not None else 1
    )
    bar = progress_bar(total=len(indices) * passes, desc="evaluate", unit="image")

    def score(net, data, indices, tf, device, batch_size):
        def counted(img, tf=tf):
            bar.update(1)
            return tf(img) if tf is not None else img

        return scorer(net, data, indices, counted, device, batch_size, precision)

    per_image: dict[str, list[dict[str, Any]]] = {}

    def score_all(net, arm: str) -> dict[str, Any]:
        clean, per_image[arm] = score(net, data, indices, None, device, batch_size)
        res: dict[str, Any] = {"clean": clean, "corrupted": {}}
        if corruptions:
            for kind in CORRUPTIONS:
                res["corrupted"][kind] = {}
                for sev in SEVERITIES:

                    def tf(img, kind=kind, sev=sev):
                        return corrupt(img, kind, sev, rng=sev)

                    res["corrupted"][kind][str(sev)] = score(
                        net, data, indices, tf, device, batch_size
                    )[0]
        return res

    result: dict[str, Any] = {
        "task": task,
        "split": split,
        "n": len(indices),
        "model": str(model_dir),
        "splits_file": str(splits_path) if splits_path else None,
        "precision": precision,
        **score_all(model, "model"),
    }
    if baseline is not None:
        base_model, base_meta = load_finetuned(baseline, device=device)
        if base_meta["task"] != task:
            raise ConfigError(
                f"baseline is a {base_meta['task']} model, the model a {task} one",
                path=baseline,
                hint="compare models of the same task",
            )
        result["baseline"] = {"model": str(baseline), **score_all(base_model, "baseline")}
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
    atomic_write_text(out_dir / "summary.md", _summary_md(result))
    for arm, rows in per_image.items():
        name = "per_image.csv" if arm == "model" else f"per_image_{arm}.csv"
        atomic_write_text(out_dir / name, _rows_csv(rows))
    if corruptions:
        _plot_robustness(result, out_dir / "robustness.png")
    if task == "segmentation":
        index = {item.key: i for i, item in enumerate(data.items)}
        worst = [index[w["image"]] for w in result["clean"]["worst"][:4]] or indices[:4]
        _plot_overlays(model, data, worst, out_dir / "overlays.png", device, precision)
    return result


def _rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Per-image rows as CSV text (columns in first-seen order; empty cell for NaN / absent)."""
    import csv
    import io

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _cell(r.get(k)) for k in cols})
    return buf.getvalue()


def _cell(v: Any) -> Any:
    """A CSV cell: ``""`` for None / NaN, 6 significant digits for floats."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return int(v)
    return f"{v:.6g}" if isinstance(v, float) else v


def _split_without_file(data, meta: dict[str, Any], split: str, model_dir: Path) -> list[int]:
    """Item indices of ``split`` when no splits.json is at hand: every item for ``"all"``, the
    test items the model recorded at fine-tuning for ``"test"``; anything else is refused
    (scoring every item and calling it "test" would mix training images into the score)."""
    if split == "all":
        return list(range(len(data)))
    recorded = (meta.get("extra") or {}).get("test_items") if split == "test" else None
    if not recorded:
        raise ConfigError(
            f"cannot tell which items are the {split!r} split of this model (no splits.json "
            "beside it, no test items recorded in its config.json)",
            path=model_dir,
            hint="pass --splits FILE (the splits.json of its fine-tuning run), or --split all "
            "to score every item of the data folder",
        )
    index = {item.key: i for i, item in enumerate(data.items)}
    missing = [key for key in recorded if key not in index]
    if missing:
        raise ConfigError(
            f"{len(missing)} of the model's {len(recorded)} recorded test items are not in this "
            f"data folder (e.g. {missing[0]!r})",
            path=model_dir,
            hint="evaluate on the data folder the model was fine-tuned on, or pass --splits FILE",
        )
    return [index[key] for key in recorded]


def declare_mask_classes(data, meta: dict[str, Any]) -> None:
    """Read ``data``'s masks the way the model was trained: when the data folder declares no
    classes, use the stored mask values the model recorded (``extra.mask_values``)."""
    extra = meta.get("extra") or {}
    if not data.mask_classes and extra.get("mask_values"):
        data.set_mask_classes(extra["mask_values"], extra.get("mask_classes"), "model metadata")


def score_items(
    model,
    data,
    indices: Sequence[int],
    *,
    device: str = "cpu",
    batch_size: int = 8,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Clean metrics of a fine-tuned ``model`` on items ``indices`` of a :class:`LabelledSet`.

    Segmentation: mean Dice / IoU / HD95 (+ HC error in mm when the items carry a reference
    circumference), failure counts, tails and worst images (:func:`seg_tails`);
    classification: accuracy, macro-F1, precision, recall, AUROC, misclassified items.
    """
    score = _seg_scorer if getattr(model, "task", "") == "segmentation" else _cls_scorer
    return score(model, data, list(indices), None, device, batch_size, precision)[0]


# Failure thresholds of the report (issue #14): Dice below these, |HC error| above 10 mm.
DICE_FAIL = (0.5, 0.1)
HC_FAIL_MM = 10.0
N_WORST = 10


def _seg_scorer(
    model,
    data,
    indices,
    transform: Callable | None,
    device: str,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-class and mean Dice / IoU / HD95 over items, at native resolution, plus one row
    per image (``image``, ``gt_empty``, ``pred_empty``, ``dice``, ``iou``, ``hd95`` and
    ``hc_error_mm`` when the item has a reference circumference).

    A class is scored on the images whose ground truth holds it (MONAI ``ignore_empty``); the
    mean is over classes (:func:`usfm_core.evaluate.metrics.per_class_scores`). An image's own
    Dice is the mean over the classes its ground truth holds (NaN for an empty ground truth).
    ``dice_legacy`` is the earlier mean of per-image Dice (empty/empty = 1, classes merged).
    """
    from usfm_core.evaluate.metrics import (
        class_scores,
        per_class_scores,
        segmentation_metrics_legacy,
    )
    from usfm_core.finetune.data import read_image, read_mask
    from usfm_core.finetune.infer import segment_frames

    def frames():
        for i in indices:
            img = read_image(data.items[i])
            yield transform(img) if transform else img

    n_classes = max(model.n_classes, 1)
    rows, legacy, hc_errors, images = [], [], [], []
    for i, pred in zip(
        indices,
        segment_frames(model, frames(), batch_size=batch_size, device=device, precision=precision),
    ):
        item = data.items[i]
        px = item.pixel_size_mm
        spacing = (px, px) if px else None
        target = read_mask(item)
        row = class_scores(pred, target, n_classes, spacing)
        rows.append(row)
        legacy.append(segmentation_metrics_legacy(pred, target, spacing, n_classes)["dice"])
        image = {
            "image": item.key,
            "gt_empty": not np.isfinite(row["dice"]).any(),
            # A class of the ground truth with no predicted pixel at all (a miss).
            "pred_empty": bool(_missed_class(pred, target, n_classes)),
            "fp_on_empty": bool(not (target > 0).any() and (pred > 0).any()),
            **{k: _nanmean(row[k]) for k in ("dice", "iou", "hd95")},
        }
        if item.circumference_mm is not None and px:
            err = circumference_error_mm(pred, px, item.circumference_mm)
            hc_errors.append(err)
            image["hc_error_mm"] = err
        images.append(image)
    out = per_class_scores(rows, structure_names(model))
    out["dice_legacy"] = float(np.mean(legacy)) if legacy else float("nan")
    if hc_errors:
        err = np.abs(hc_errors)
        out.update(
            hc_error_mm=float(err.mean()),
            hc_error_mm_std=float(err.std()),
            hc_error_mm_median=float(np.median(err)),
            hc_bias_mm=float(np.mean(hc_errors)),
        )
    out.update(seg_tails(images))
    return out, images


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries of ``values`` ``(C,)``; NaN when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _missed_class(pred: np.ndarray, target: np.ndarray, n_classes: int) -> bool:
    """True when some class of ``target`` ``(H, W)`` has no pixel at all in ``pred``."""
    if n_classes <= 2:
        return bool((target > 0).any() and not (pred > 0).any())
    return any((target == c).any() and not (pred == c).any() for c in range(1, n_classes))


def seg_tails(images: Sequence[dict[str, Any]], n_worst: int = N_WORST) -> dict[str, Any]:
    """Failure counts, tails and worst images from the per-image rows of :func:`_seg_scorer`.

    Counts are over the images whose ground truth is not empty (``n_scored``): Dice below
    0.5 and 0.1, empty predictions (``n_empty_pred``), |HC error| above 10 mm; and over the
    empty-ground-truth images (``n_empty_gt``, e.g. BUSI's normal scans): predictions with
    any foreground (``n_fp_on_empty_gt``). Tails: p10 / median / p90 of image Dice, HD95 (images
    where both masks are non-empty) and |HC error|. ``worst``: the ``n_worst`` lowest-Dice
    images (``worst_hc``: largest |HC error|), each ``{"image", "dice", "hd95"[,
    "hc_error_mm"]}``.
    """
    from usfm_core.evaluate.metrics import count_where, percentiles

    scored = [r for r in images if not r["gt_empty"]]
    dice = [r["dice"] for r in scored]
    out: dict[str, Any] = {
        "n_scored": len(scored),
        "n_empty_gt": len(images) - len(scored),
        **{f"n_dice_below_{t:g}": count_where(dice, below=t) for t in DICE_FAIL},
        "n_empty_pred": sum(r["pred_empty"] for r in scored),
        "n_fp_on_empty_gt": sum(r["fp_on_empty"] for r in images if r["gt_empty"]),
        **percentiles(dice, "dice"),
        **percentiles([r["hd95"] for r in scored], "hd95"),
    }
    keep = ("image", "dice", "hd95", "hc_error_mm")
    ranked = sorted(scored, key=lambda r: (r["dice"], -np.nan_to_num(r["hd95"], nan=np.inf)))
    out["worst"] = [{k: r[k] for k in keep if k in r} for r in ranked[:n_worst]]
    with_hc = [r for r in images if "hc_error_mm" in r]
    if with_hc:
        hc = [abs(r["hc_error_mm"]) for r in with_hc]
        tails = percentiles(hc, "hc_error_mm")
        del tails["hc_error_mm_median"]  # already reported (median |HC error|)
        out.update(tails, n_hc_error_over_10mm=count_where(hc, above=HC_FAIL_MM))
        ranked = sorted(with_hc, key=lambda r: -abs(r["hc_error_mm"]))
        out["worst_hc"] = [{k: r[k] for k in keep if k in r} for r in ranked[:n_worst]]
    return out


def structure_names(model) -> list[str]:
    """Names of the scored (foreground) classes of a segmenter, in class order
    (:func:`usfm_core.finetune.infer.label_names`)."""
    from usfm_core.finetune.infer import label_names

    names = label_names(model)
    return [names[c] for c in sorted(names) if c != 255]


def circumference_error_mm(pred: np.ndarray, pixel_size_mm: float, reference_mm: float) -> float:
    """Signed error (mm) of the ellipse-fit circumference of the largest predicted object.

    ``pred`` is a label map ``(H, W)``; an empty prediction counts as circumference 0 (the
    whole reference is missed) rather than being skipped, so misses cannot flatter the mean.
    """
    from usfm_core.finetune.infer import measure_mask

    objects = measure_mask(pred, (pixel_size_mm, pixel_size_mm))["objects"]
    predicted = objects[0]["circumference"] if objects else 0.0
    return float(predicted - reference_mm)


def _cls_scorer(
    model,
    data,
    indices,
    transform: Callable | None,
    device: str,
    batch_size: int,
    precision: str = "fp32",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy, macro precision / recall / F1, AUROC and CE loss at model resolution (as in
    fine-tuning's validation), the number of misclassified items and the worst ones (lowest
    probability of the true class), plus one row per item (``image``, ``label``,
    ``predicted``, ``p_true``)."""
    import torch

    from usfm_core.evaluate.metrics import classification_metrics
    from usfm_core.finetune.data import SupervisedDataset
    from usfm_core.models.precision import autocast

    ds = SupervisedDataset(data, indices, "classification", model.input_size, transform=transform)
    model = model.to(device).eval()
    probs, targets, loss = [], [], 0.0
    with torch.no_grad(), autocast(precision, device):
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size):
            logits = model(x.to(device)).float().cpu()
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            probs.append(logits.softmax(1).numpy())
            targets.extend(y.tolist())
    p = np.concatenate(probs) if probs else np.zeros((0, model.n_classes))
    out: dict[str, Any] = classification_metrics(targets, p.argmax(1), p, n_classes=model.n_classes)
    out["loss"] = loss / max(len(ds), 1)
    names = list(getattr(model, "classes", None) or [])
    if len(names) != model.n_classes:
        names = [str(c) for c in range(model.n_classes)]
    rows = [
        {
            "image": data.items[i].key,
            "label": names[t],
            "predicted": names[int(pi.argmax())],
            "p_true": float(pi[t]),
        }
        for i, t, pi in zip(indices, targets, p)
    ]
    out["n_wrong"] = sum(r["label"] != r["predicted"] for r in rows)
    out["worst"] = sorted(rows, key=lambda r: r["p_true"])[:N_WORST]
    return out, rows


# Metrics shown in millimetres (or pixels) rather than percent.
_ABSOLUTE = {"hd95", "hc_error_mm", "hc_error_mm_median"}


def _fmt(v: float | None, pct: bool) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _summary_md(result: dict[str, Any]) -> str:
    """A markdown table: rows = (model,) condition, columns = metrics (percent, as in the
    papers); with a baseline, each condition has a row for the model and one for the baseline."""
    if result["task"] == "segmentation":
        keys = ["dice", "iou", "hd95"]
        keys += [k for k in ("hc_error_mm", "hc_error_mm_median") if k in result["clean"]]
    else:
        keys = ["accuracy", "macro_f1", "precision", "recall", "auroc"]
    arms = [(Path(result["model"]).name, result)]
    if "baseline" in result:
        arms.append((Path(result["baseline"]["model"]).name, result["baseline"]))
    lead = "| model | condition | " if len(arms) > 1 else "| condition | "
    lines = [
        f"# Evaluation ({result['task']}, split `{result['split']}`, n = {result['n']})",
        "",
        "Scores in %; HD95 and head-circumference (HC) absolute error in mm when the pixel "
        "size is known (else px).",
        "",
        lead + " | ".join(keys) + " |",
        "|---" * (len(keys) + len(lead.split("|")) - 2) + "|",
    ]
    conds = ["clean"] + [f"{kind} ε={sev}" for kind, d in result["corrupted"].items() for sev in d]
    for cond in conds:
        for name, arm in arms:
            if cond == "clean":
                m = arm["clean"]
            else:
                kind, sev = cond.split(" ε=")
                m = arm["corrupted"][kind][sev]
            cells = " | ".join(_fmt(m.get(k), k not in _ABSOLUTE) for k in keys)
            lines.append((f"| {name} " if len(arms) > 1 else "") + f"| {cond} | {cells} |")
    if result["task"] == "segmentation":
        lines += _per_class_md(arms)
    lines += _tails_md(result["task"], arms)
    return "\n".join(lines) + "\n"


def _tails_md(task: str, arms: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Clean failure counts and tails per model, then each model's worst images by name."""
    if task == "segmentation":
        cols = [
            ("n_scored", "scored"),
            ("n_dice_below_0.5", "Dice<0.5"),
            ("n_dice_below_0.1", "Dice<0.1"),
            ("n_empty_pred", "empty pred."),
            ("n_empty_gt", "empty GT"),
            ("n_fp_on_empty_gt", "FP on empty GT"),
            ("dice_p10", "Dice p10"),
            ("dice_median", "Dice median"),
            ("dice_p90", "Dice p90"),
            ("hd95_p10", "HD95 p10"),
            ("hd95_median", "HD95 median"),
            ("hd95_p90", "HD95 p90"),
            ("hc_error_mm_p10", "HC err p10"),
            ("hc_error_mm_median", "HC err median"),
            ("hc_error_mm_p90", "HC err p90"),
            ("n_hc_error_over_10mm", "HC err>10 mm"),
        ]
        note = (
            "Failures and tails (clean; counts of images; Dice in %, HD95 and |HC error| in mm "
            "when the pixel size is known; Dice, HD95, empty predictions and HC over the images "
            "whose ground truth is not empty, FP = any predicted foreground on an empty ground "
            "truth):"
        )
    else:
        cols = [("n_wrong", "misclassified")]
        note = "Failures (clean): misclassified items."
    cols = [(k, label) for k, label in cols if any(k in a["clean"] for _, a in arms)]
    lines = ["", note, "", "| model | " + " | ".join(c for _, c in cols) + " |"]
    lines.append("|---" * (len(cols) + 1) + "|")
    for name, arm in arms:
        m = arm["clean"]
        cells = [
            str(m.get(k, "–")) if k.startswith("n_") else _fmt(m.get(k), k.startswith("dice"))
            for k, _ in cols
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, arm in arms:
        for key, what in (("worst", "lowest Dice"), ("worst_hc", "largest |HC error|")):
            rows = arm["clean"].get(key)
            if not rows:
                continue
            if task == "classification":
                what = "lowest probability of the true class"
            lines += ["", f"Worst {len(rows)} images of {name} ({what}):", ""]
            fields = [k for k in rows[0] if k != "image"]
            lines += ["| image | " + " | ".join(fields) + " |", "|---" * (len(fields) + 1) + "|"]
            for r in rows:
                cells = [
                    _fmt(r[k], k == "dice") if isinstance(r[k], float) else str(r[k])
                    for k in fields
                ]
                lines.append(f"| {r['image']} | " + " | ".join(cells) + " |")
    return lines


def _per_class_md(arms: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Clean per-class Dice / IoU / HD95 table (classes absent from an image's ground truth
    are ignored there), plus a note on the earlier merged Dice."""
    lines = [
        "",
        "Per class (clean; each class over the images whose ground truth holds it, n = images; "
        "the mean above is over classes):",
        "",
        "| model | class | n | dice | iou | hd95 |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in arms:
        for cls, m in arm["clean"].get("per_class", {}).items():
            cells = " | ".join(_fmt(m.get(k), k not in _ABSOLUTE) for k in ("dice", "iou", "hd95"))
            lines.append(f"| {name} | {cls} | {m.get('n', 0)} | {cells} |")
    legacy = [f"{n} {_fmt(a['clean'].get('dice_legacy'), True)}" for n, a in arms]
    lines += [
        "",
        "Earlier definition (per-image Dice, empty prediction on empty mask = 100, classes "
        "merged), `dice_legacy`: " + ", ".join(legacy) + ".",
    ]
    return lines


def _plot_robustness(result: dict[str, Any], path: Path) -> None:
    """Main metric vs severity (0 = clean) per corruption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = MAIN_METRIC[result["task"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, d in result["corrupted"].items():
        sev = [0] + [int(s) for s in d]
        vals = [result["clean"][key]] + [m[key] for m in d.values()]
        ax.plot(sev, [100 * v for v in vals], marker="o", label=kind)
    ax.set(
        xlabel="severity ε",
        ylabel=f"{key} (%)",
        xticks=[0, 1, 2, 3],
        title="robustness to corruptions",
    )
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _plot_overlays(
    model, data, indices: Sequence[int], path: Path, device: str, precision: str = "fp32"
) -> None:
    """Image with ground-truth (green) and predicted (red) contours for a few items (the
    report passes the worst by Dice, segmented in the report's precision), each titled with its
    file name and Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usfm_core.evaluate.metrics import dice
    from usfm_core.finetune.data import read_image, read_mask
    from usfm_core.finetune.infer import segment_frames

    imgs = [read_image(data.items[i]) for i in indices]
    preds = list(segment_frames(model, imgs, device=device, precision=precision))
    fig, axes = plt.subplots(1, len(imgs), figsize=(3 * len(imgs), 3.3), squeeze=False)
    for ax, i, img, pred in zip(axes[0], indices, imgs, preds):
        target = read_mask(data.items[i]) > 0
        ax.imshow(img, cmap="gray")
        if target.any():
            ax.contour(target, levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred > 0, levels=[0.5], colors="red", linewidths=1)
        name = Path(data.items[i].key).name
        ax.set_title(f"{name}\nDice {dice(pred > 0, target):.2f}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle("worst images by Dice: ground truth (green) vs prediction (red)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def label_efficiency_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, metric: str | None = None
) -> dict[str, Any]:
    """Metric vs label ratio, mean ± std over seeds, from ``result.json`` of each run.

    Uses test metrics when a run has them, else validation. Writes ``label_efficiency.json``,
    ``label_efficiency.md`` and ``label_efficiency.png`` into ``out_dir``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usfm_core.evaluate.metrics import mean_std
    from usfm_core.utils import atomic_write_text

    by_ratio: dict[float, list[float]] = defaultdict(list)
    task = None
    for run in run_dirs:
        res_path = Path(run) / "result.json"
        if not res_path.is_file():
            raise ConfigError(
                "no result.json: not a finished fine-tuning run",
                path=run,
                hint="pass the run folders written by `usfm-core finetune`",
            )
        res = json.loads(res_path.read_text(encoding="utf-8"))
        task = task or res["task"]
        key = metric or MAIN_METRIC[res["task"]]
        scores = res.get("test_metrics") or res["val_metrics"]
        by_ratio[float(res["label_ratio"])].append(float(scores[key]))
    key = metric or MAIN_METRIC[task or "segmentation"]
    ratios = sorted(by_ratio)
    stats = {
        f"{r:g}": dict(zip(("mean", "std"), mean_std(by_ratio[r])), n=len(by_ratio[r]))
        for r in ratios
    }
    out_dir = Path(out_dir)
    # After the runs are read: "not a finished run" says more than "would write into it".
    check_report_folder(out_dir, LABEL_EFFICIENCY_FILES, [Path(r) for r in run_dirs])
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"metric": key, "task": task, "ratios": stats}
    atomic_write_text(out_dir / "label_efficiency.json", json.dumps(doc, indent=1))
    md = [
        f"# Label efficiency ({key}, %)",
        "",
        "| label ratio | mean ± std | seeds |",
        "|---|---|---|",
    ]
    md += [
        f"| {100 * float(r):g} % | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} | {s['n']} |"
        for r, s in stats.items()
    ]
    atomic_write_text(out_dir / "label_efficiency.md", "\n".join(md) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    means = np.array([stats[f"{r:g}"]["mean"] for r in ratios]) * 100
    stds = np.array([stats[f"{r:g}"]["std"] for r in ratios]) * 100
    ax.errorbar([100 * r for r in ratios], means, yerr=stds, marker="o", capsize=3)
    ax.set(xlabel="label ratio (%)", ylabel=f"{key} (%)", title="label efficiency")
    fig.tight_layout()
    save_figure(fig, out_dir / "label_efficiency.png", dpi=120)
    plt.close(fig)
    return doc
