"""Evaluation reports: test metrics, corruption robustness, label efficiency.

:func:`evaluate_model_dir` scores a fine-tuned model on a split of its data set (native image
resolution, HD95 in mm when ``pixel_size_mm`` is known), optionally under the US-JEPA
corruptions at severities 1–3, and writes ``metrics.json``, ``summary.md`` and PNG plots.
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
from usfm_core.outputs import save_figure

MAIN_METRIC = {"segmentation": "dice", "classification": "macro_f1"}


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
) -> dict[str, Any]:
    """Score the model on ``split`` (clean and, optionally, corrupted) and write the report.

    ``baseline`` (e.g. the same recipe trained from scratch) is scored on exactly the same
    items and shown beside the model in ``summary.md``. The split comes from ``splits_file``,
    else from the ``splits.json`` of the model's run folder, else (``split="test"``) from the test
    items the model recorded; ``split="all"`` scores every item; anything else is refused.

    Returns the ``metrics.json`` content: ``{"task", "split", "n", "clean": {...},
    "corrupted": {kind: {severity: {...}}}}`` plus ``"baseline": {"model", "clean",
    "corrupted"}`` when a baseline is given.
    """
    from usfm_core.evaluate.corruptions import CORRUPTIONS, SEVERITIES, corrupt
    from usfm_core.finetune.data import LabelledSet, load_splits
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.progress import progress_bar
    from usfm_core.utils import atomic_write_text

    model_dir, out_dir = Path(model_dir), Path(out_dir)
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

        return scorer(net, data, indices, counted, device, batch_size)

    def score_all(net) -> dict[str, Any]:
        res: dict[str, Any] = {
            "clean": score(net, data, indices, None, device, batch_size),
            "corrupted": {},
        }
        if corruptions:
            for kind in CORRUPTIONS:
                res["corrupted"][kind] = {}
                for sev in SEVERITIES:

                    def tf(img, kind=kind, sev=sev):
                        return corrupt(img, kind, sev, rng=sev)

                    res["corrupted"][kind][str(sev)] = score(
                        net, data, indices, tf, device, batch_size
                    )
        return res

    result: dict[str, Any] = {
        "task": task,
        "split": split,
        "n": len(indices),
        "model": str(model_dir),
        "splits_file": str(splits_path) if splits_path else None,
        **score_all(model),
    }
    if baseline is not None:
        base_model, base_meta = load_finetuned(baseline, device=device)
        if base_meta["task"] != task:
            raise ConfigError(
                f"baseline is a {base_meta['task']} model, the model a {task} one",
                path=baseline,
                hint="compare models of the same task",
            )
        result["baseline"] = {"model": str(baseline), **score_all(base_model)}
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=1))
    atomic_write_text(out_dir / "summary.md", _summary_md(result))
    if corruptions:
        _plot_robustness(result, out_dir / "robustness.png")
    if task == "segmentation":
        _plot_overlays(model, data, indices[:4], out_dir / "overlays.png", device)
    return result


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
    model, data, indices: Sequence[int], *, device: str = "cpu", batch_size: int = 8
) -> dict[str, float]:
    """Clean metrics of a fine-tuned ``model`` on items ``indices`` of a :class:`LabelledSet`.

    Segmentation: mean Dice / IoU / HD95 (+ HC error in mm when the items carry a reference
    circumference); classification: accuracy, macro-F1, precision, recall, AUROC.
    """
    score = _seg_scorer if getattr(model, "task", "") == "segmentation" else _cls_scorer
    return score(model, data, list(indices), None, device, batch_size)


def _seg_scorer(
    model, data, indices, transform: Callable | None, device: str, batch_size: int
) -> dict[str, Any]:
    """Per-class and mean Dice / IoU / HD95 over items, at native resolution.

    A class is scored on the images whose ground truth holds it (MONAI ``ignore_empty``); the
    mean is over classes (:func:`usfm_core.evaluate.metrics.per_class_scores`).
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
    rows, legacy, hc_errors = [], [], []
    for i, pred in zip(
        indices, segment_frames(model, frames(), batch_size=batch_size, device=device)
    ):
        item = data.items[i]
        px = item.pixel_size_mm
        spacing = (px, px) if px else None
        target = read_mask(item)
        rows.append(class_scores(pred, target, n_classes, spacing))
        legacy.append(segmentation_metrics_legacy(pred, target, spacing, n_classes)["dice"])
        if item.circumference_mm is not None and px:
            hc_errors.append(circumference_error_mm(pred, px, item.circumference_mm))
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
    model, data, indices, transform: Callable | None, device: str, batch_size: int
) -> dict[str, float]:
    from usfm_core.finetune.data import SupervisedDataset
    from usfm_core.finetune.train import evaluate_split

    ds = SupervisedDataset(data, indices, "classification", model.input_size, transform=transform)
    return evaluate_split(model, ds, "classification", batch_size, device)


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
    return "\n".join(lines) + "\n"


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


def _plot_overlays(model, data, indices: Sequence[int], path: Path, device: str) -> None:
    """Image with ground-truth (green) and predicted (red) contours for a few items."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usfm_core.finetune.data import read_image, read_mask
    from usfm_core.finetune.infer import segment_frames

    imgs = [read_image(data.items[i]) for i in indices]
    preds = list(segment_frames(model, imgs, device=device))
    fig, axes = plt.subplots(1, len(imgs), figsize=(3 * len(imgs), 3), squeeze=False)
    for ax, i, img, pred in zip(axes[0], indices, imgs, preds):
        ax.imshow(img, cmap="gray")
        ax.contour(read_mask(data.items[i]) > 0, levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred > 0, levels=[0.5], colors="red", linewidths=1)
        ax.set_axis_off()
    fig.suptitle("ground truth (green) vs prediction (red)")
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
