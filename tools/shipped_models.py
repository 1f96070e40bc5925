"""Data preparation and installation for the shipped models (``breast-lesion``, ``fetal-head``,
``breast-class``); the training itself is ``usfm-core`` commands, listed in
``tools/train_shipped_models.sh`` and in each model card.

    python tools/shipped_models.py prepare --shared ../shared/data --out work/data
    python tools/shipped_models.py install NAME... [--runs work/runs]   # copy, float16, sha256
    python tools/shipped_models.py record NAME... [--runs work/runs]    # metrics into index.json
    python tools/shipped_models.py card NAME... [--runs work/runs]      # evaluate table -> card
    python tools/shipped_models.py val MODEL --data work/data/busi --task segmentation  # val split
    python tools/shipped_models.py postprocess work/runs/breast-lesion-pretrained/model \
        --data work/data/busi [--tta auto|on|off] [--apply]   # TTA + post-processing, val
    python tools/shipped_models.py infer-size work/runs/fetal-head-pretrained/model \
        --data work/data/hc18 --sizes 224 256 [--apply]       # inference input side, val

``prepare`` writes three labelled folders and one unlabelled pre-training folder:

* ``busi/``: BUSI as in ``shared/data`` (groups = ``dup_group``), used for lesion segmentation
  and benign / malignant / normal classification; both tasks get the same split.
* ``hc18/``: HC18 with a ``group`` column = the subject number of the file name
  (``010_HC`` and ``010_2HC`` are the same fetus), so no fetus straddles the split.
* ``pretrain/``: links to the BUSI and HC18 images of the *train and validation* splits only
  (the split ``usfm-core finetune`` makes with its default ``split_seed`` 0; pre-training
  never sees a test image) plus simulated B-mode frames from the product's simulator.

``install`` copies a fine-tuned model into ``src/usfm_core/assets/models/NAME`` (weights in
float16) and records its files' sha256; ``usfm-core evaluate NAME`` then scores exactly the
shipped weights; ``record`` stores those test metrics (and the from-scratch baseline's) and a
fixed check subset whose metrics the tests re-measure; ``card`` puts the evaluate table into
``docs/models/NAME.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np

from usfm_core.finetune.data import LabelledSet, make_splits

SPLIT_SEED = 0  # usfm-core finetune's default
N_SIM_FRAMES = 300


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def prepare_hc18(src: Path, out: Path) -> Path:
    """``out/`` with links to HC18's images/masks and a manifest with a per-subject group."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("images", "masks"):
        _link(src / sub, out / sub)
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["group"] = re.match(r"\D*(\d+)", Path(row["image"]).name).group(1)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def train_val_images(folder: Path) -> list[Path]:
    """Images of the train + val splits ``usfm-core finetune`` makes for ``folder``."""
    data = LabelledSet.from_folder(folder, task="segmentation")
    splits = make_splits(data.labels, data.groups, seed=SPLIT_SEED)
    return [Path(data.items[i].image) for i in splits["train"] + splits["val"]]


def write_sim_frames(out: Path, n: int, seed: int = 10_000) -> None:
    """``n`` simulated frames (sector and linear, some with burned-in text) as PNG."""
    import cv2

    from usfm_core.sim import simulate_frame

    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = out / f"sim_{i:04d}.png"
        if path.exists():
            continue
        frame = simulate_frame(
            seed=seed + i, geometry="sector" if i % 2 else "linear", text=i % 5 == 0
        )
        img = frame.image if frame.image.ndim == 2 else frame.image.mean(-1)
        cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))


def prepare(shared: Path, out: Path, n_sim: int = N_SIM_FRAMES) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _link(shared / "busi", out / "busi")
    prepare_hc18(shared / "hc18", out / "hc18")
    pre = out / "pretrain"
    for name in ("busi", "hc18"):
        folder = pre / name
        folder.mkdir(parents=True, exist_ok=True)
        images = train_val_images(out / name)
        for image in images:
            _link(image, folder / image.name)
        print(f"pretrain/{name}: {len(images)} train+val images (test images left out)")
    write_sim_frames(pre / "sim", n_sim)
    print(f"pretrain/sim: {n_sim} simulated frames")


# What each shipped model is, where its data come from, and how the recipe names its runs.
MODELS: dict[str, dict[str, str]] = {
    "breast-lesion": {
        "data": "busi",
        "task": "segmentation",
        "description": "breast lesions in B-mode (BUSI); research use, not for clinical use",
    },
    "fetal-head": {
        "data": "hc18",
        "task": "segmentation",
        "description": "fetal head + circumference in mm (HC18); research use, not clinical",
    },
    "breast-class": {
        "data": "busi",
        "task": "classification",
        "description": "benign / malignant / normal breast B-mode (BUSI); research use only",
    },
}
N_CHECK = 48  # test items the unit tests re-score (tests/test_shipped_models.py)
RECIPE = "bash tools/train_shipped_models.sh prepare|pretrain|finetune|install|evaluate|record"


def spread(keys: list[str], n: int) -> list[str]:
    """``n`` keys evenly spaced through ``keys`` (every class of a sorted BUSI list)."""
    if len(keys) <= n:
        return keys
    return [keys[round(i * (len(keys) - 1) / (n - 1))] for i in range(n)]


def check_subset(name: str, data_root: Path, keys: list[str]) -> dict:
    """Score the shipped ``name`` on a fixed list of item keys of ``data_root/<data>``.

    Returns ``{"data", "keys", "metrics"}``; the tests call it with the recorded keys and
    compare the metrics with the recorded ones.
    """
    from usfm_core.evaluate.report import score_items
    from usfm_core.finetune.models import load_finetuned

    info = MODELS[name]
    data = LabelledSet.from_folder(data_root / info["data"], info["task"])
    index = {it.key: i for i, it in enumerate(data.items)}
    model, _ = load_finetuned(name)
    metrics = score_items(model, data, [index[k] for k in keys])
    return {"data": info["data"], "keys": keys, "metrics": metrics}


def val_metrics(model_ref: str, data_root: Path, task: str, tta: bool | None = None) -> dict:
    """Score a model (name or folder) on the validation split the recipe makes for
    ``data_root`` (``split_seed`` 0): how a re-trained model is compared with the shipped one
    without touching the test split. ``tta``: force flip test-time augmentation on / off
    (default: the model's own ``extra.tta``)."""
    from usfm_core.evaluate.report import score_items
    from usfm_core.finetune.models import load_finetuned

    data = LabelledSet.from_folder(data_root, task)
    splits = make_splits(data.labels, data.groups, seed=SPLIT_SEED)
    model, _ = load_finetuned(model_ref)
    if tta is not None:
        model.tta = tta
    return {
        "model": model_ref,
        "tta": bool(getattr(model, "tta", False)),
        "n_val": len(splits["val"]),
        **score_items(model, data, splits["val"]),
    }


def choose_on_val(
    model_dir: Path, data_root: Path, tta: str, apply: bool, gates: list[float] | None = None
) -> dict:
    """Choose a segmenter's flip TTA and post-processing on the recipe's validation split of
    ``data_root``: :func:`usfm_core.finetune.postprocess.choose_postprocess` on the logits
    without and/or with TTA (``tta``: ``off``, ``on`` or ``auto`` = both, the better score wins,
    off on a tie since it costs half the time). ``apply``: write ``extra.postprocess`` and
    ``extra.tta`` into ``model_dir/config.json`` (a run folder's model, never the package's
    copy: re-``install`` it afterwards). ``gates``: presence-gate thresholds to try (default
    :data:`usfm_core.finetune.postprocess.GATE_GRID`; ``[0]``: no gate)."""
    from usfm_core.finetune.data import read_image, read_mask
    from usfm_core.finetune.infer import frame_logits
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.finetune.postprocess import candidate_grid, choose_postprocess

    model_dir = Path(model_dir)
    if apply:
        _refuse_packaged(model_dir)
    data = LabelledSet.from_folder(data_root, "segmentation")
    val = make_splits(data.labels, data.groups, seed=SPLIT_SEED)["val"]
    model, _ = load_finetuned(model_dir)
    targets = [read_mask(data.items[i]) for i in val]
    frames = [read_image(data.items[i]) for i in val]  # read once for both TTA settings
    grid = [c for c in candidate_grid() if gates is None or c.min_confidence in gates]
    options = {"off": [False], "on": [True], "auto": [False, True]}[tta]
    results = []
    for flip in options:
        logits = list(frame_logits(model, frames, batch_size=8, tta=flip))
        best, table = choose_postprocess(logits, targets, grid)
        score = max(r["score"] for r in table if r["eligible"])  # the chosen one's
        results.append({"tta": flip, "chosen": best.to_dict(), "score": score, "table": table})
        print(f"TTA {'on' if flip else 'off'}:")
        for row in table:
            print(
                f"  gate {row['min_confidence']:<5g} largest {row['keep_largest']!s:<5} "
                f"fill {row['fill_holes']!s:<5} score {row['score']:.4f} "
                f"dice_fg {row['dice_fg']:.4f} fp_on_empty {row['fp_on_empty']} "
                f"emptied {row['emptied']} lost {row['lost']}"
                f"{'' if row['eligible'] else ' (not eligible)'}"
            )
        print(f"  best: {best.describe()} (score {score:.4f})")
    pick = max(range(len(results)), key=lambda i: (results[i]["score"], -i))
    chosen = results[pick]
    print(
        f"chosen on {len(val)} validation items: TTA {'on' if chosen['tta'] else 'off'}, "
        f"post-processing {chosen['chosen']}"
    )
    if apply:
        path = _write_extra(model_dir, {"postprocess": chosen["chosen"], "tta": chosen["tta"]})
        print(f"wrote extra.postprocess and extra.tta to {path}")
    return {"model": str(model_dir), "n_val": len(val), "chosen": chosen, "runs": results}


def choose_infer_size(model_dir: Path, data_root: Path, sizes: list[int], apply: bool) -> dict:
    """Choose a segmenter's inference input side among ``sizes`` on the recipe's validation
    split of ``data_root`` (with the model's saved TTA and post-processing): by the mean
    |HC error| when the items carry a reference circumference (the fetal-head measure), else by
    Dice; ties go to the smaller size (less time). ``apply`` writes ``extra.infer_size`` into
    ``model_dir/config.json`` (removed when the training size wins)."""
    from usfm_core.evaluate.report import score_items
    from usfm_core.finetune.models import load_finetuned

    model_dir = Path(model_dir)
    if apply:
        _refuse_packaged(model_dir)
    bad = [s for s in sizes if s <= 0 or s % 32]
    if bad:
        raise SystemExit(f"--sizes must be positive multiples of 32, got {bad}")
    data = LabelledSet.from_folder(data_root, "segmentation")
    val = make_splits(data.labels, data.groups, seed=SPLIT_SEED)["val"]
    model, _ = load_finetuned(model_dir)
    rows = []
    for size in sorted(set(sizes)):
        model.infer_size = size
        m = score_items(model, data, val)
        hc = m.get("hc_error_mm")
        rows.append({"size": size, "dice": m["dice"], "hc_error_mm": hc, **_tails(m)})
        hc_txt = ""
        if hc is not None:
            hc_txt = f", mean |HC error| {hc:.2f} mm (median {m['hc_error_mm_median']:.2f})"
        print(f"input {size}²: Dice {m['dice'] * 100:.2f}{hc_txt}", flush=True)
    by_hc = all(r["hc_error_mm"] is not None for r in rows)
    best = min(rows, key=lambda r: (r["hc_error_mm"] if by_hc else -r["dice"], r["size"]))
    rule = "HC error" if by_hc else "Dice"
    print(f"chosen on {len(val)} validation items: input {best['size']}² (by {rule})")
    if apply:
        trained = int(model.input_size)  # the training size wins: no extra.infer_size
        path = _write_extra(
            model_dir, {"infer_size": None if best["size"] == trained else best["size"]}
        )
        print(f"wrote extra.infer_size to {path}")
    return {"model": str(model_dir), "n_val": len(val), "chosen": best["size"], "rows": rows}


def _refuse_packaged(model_dir: Path) -> None:
    """A choice is written into a run folder's model, never into the package's copy."""
    from usfm_core.models.zoo import BUILTIN_DIR

    if BUILTIN_DIR.resolve() in Path(model_dir).resolve().parents:
        raise SystemExit(f"{model_dir}: a packaged model; apply to the run folder, then install")


def _write_extra(model_dir: Path, values: dict) -> Path:
    """Set ``values`` in ``model_dir/config.json``'s ``extra`` (a None value removes the key),
    written atomically; returns the path."""
    from usfm_core.utils import atomic_write_text

    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    extra = config.setdefault("extra", {})
    for key, value in values.items():
        if value is None:
            extra.pop(key, None)
        else:
            extra[key] = value
    atomic_write_text(path, json.dumps(config, indent=1) + "\n")
    return path


def _tails(metrics: dict) -> dict:
    """The failure counts of a score_items result worth keeping in a selection table."""
    keys = ("hc_error_mm_median", "n_hc_error_over_10mm", "n_dice_below_0.5")
    return {k: metrics[k] for k in keys if k in metrics}


def install(name: str, runs: Path) -> None:
    """Copy ``runs/<name>-pretrained/model`` into the package, store its weights in float16
    (half the size; the float32 model is rebuilt on load) and record both sha256s."""
    from usfm_core.models.serialization import store_weights_as
    from usfm_core.models.zoo import BUILTIN_DIR, file_sha256

    info = MODELS[name]
    model_dir = runs / f"{name}-pretrained" / "model"
    dest = BUILTIN_DIR / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        shutil.copy2(model_dir / f, dest / f)
    store_weights_as(dest, "float16")
    index_path = BUILTIN_DIR / "index.json"
    index = json.loads(index_path.read_text())
    previous = index.get(name, {})
    index[name] = {
        "sha256": file_sha256(dest / "model.safetensors"),
        "config_sha256": file_sha256(dest / "config.json"),
        "task": info["task"],
        "description": info["description"],
        "card": f"docs/models/{name}.md",
        "recipe": RECIPE,
    }
    # The from-scratch baseline does not depend on the shipped weights: kept until ``record``
    # brings a re-measured one (the scratch arm is re-run only when its recipe changes).
    for key in ("baseline_test_metrics", "baseline_source"):
        if previous.get(key) is not None:
            index[name][key] = previous[key]
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    size = (dest / "model.safetensors").stat().st_size / 2**20
    print(f"installed {name} -> {dest} ({size:.1f} MiB)")


def record(name: str, runs: Path, shared: Path) -> None:
    """Store in ``index.json`` the test metrics of ``usfm-core evaluate`` on the shipped
    weights (``runs/report-<name>/metrics.json``, with the from-scratch baseline) and the
    metrics of the check subset the tests re-measure."""
    from usfm_core.models.zoo import BUILTIN_DIR

    report = json.loads((runs / f"report-{name}" / "metrics.json").read_text())
    splits = json.loads((runs / f"{name}-pretrained" / "splits.json").read_text())["splits"]
    index_path = BUILTIN_DIR / "index.json"
    index = json.loads(index_path.read_text())
    entry = index[name]
    entry.update(
        n_test=report["n"],
        test_metrics=report["clean"],
        check=check_subset(name, shared, spread(sorted(splits["test"]), N_CHECK)),
    )
    baseline = report.get("baseline", {}).get("clean")
    if baseline is not None:  # re-measured beside the shipped weights, same items
        entry.update(baseline_test_metrics=baseline, baseline_source=f"{runs}/{name}-scratch")
    elif entry.get("baseline_test_metrics") is not None:  # no scratch run here: kept as recorded
        entry.setdefault("baseline_source", "recorded earlier (scratch arm not re-run)")
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    print(f"recorded {name}: test {report['clean']}, check {entry['check']['metrics']}")


def fill_card(name: str, runs: Path, docs: Path) -> None:
    """Put ``usfm-core evaluate``'s table (``summary.md``) and overlay figure into the card."""
    card = docs / "models" / f"{name}.md"
    text = card.read_text()
    begin, end = "<!-- evaluate:begin -->", "<!-- evaluate:end -->"
    report = runs / f"report-{name}"
    table = (report / "summary.md").read_text().split("\n", 1)[1].strip()
    text = text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end) :]
    card.write_text(text)
    if (report / "overlays.png").is_file():
        (docs / "images").mkdir(exist_ok=True)
        shutil.copy2(report / "overlays.png", docs / "images" / f"model_{name}_overlays.png")
    print(f"filled {card}")


LABELS = {"dice": "Dice", "macro_f1": "macro-F1", "accuracy": "accuracy"}


def fill_readme(readme: Path) -> None:
    """The README's table of shipped models, from ``index.json`` (i.e. from evaluate)."""
    from usfm_core.models.zoo import BUILTIN_DIR

    index = json.loads((BUILTIN_DIR / "index.json").read_text())
    rows = [
        "| model | task | size | test split (n) | shipped | from scratch | card |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, info in index.items():
        if "test_metrics" not in info:
            continue
        main, base = info["test_metrics"], info.get("baseline_test_metrics") or {}
        keys = [k for k in ("dice", "hc_error_mm", "macro_f1", "accuracy") if k in main]

        def fmt(m: dict, keys: list[str] = keys) -> str:
            if m.get("n_empty_gt") and "dice_legacy" in m:  # Dice leaves the empty masks out
                return (
                    f"Dice {m['dice']:.3f} on the {m['n_scored']} images with a foreground "
                    f"(legacy definition {m['dice_legacy']:.3f})"
                )
            if "dice" not in m and "dice_legacy" in m:  # recorded before the Dice change
                return f"legacy Dice {m['dice_legacy']:.3f} (earlier definition)"
            return ", ".join(
                f"HC error {m[k]:.1f} mm" if k == "hc_error_mm" else f"{LABELS[k]} {m[k]:.3f}"
                for k in keys
                if k in m
            )

        size = (BUILTIN_DIR / name / "model.safetensors").stat().st_size / 2**20
        card = info.get("card", f"docs/models/{name}.md")
        kept = str(info.get("baseline_source", "")).startswith("recorded earlier")
        base_text = (fmt(base) or "–") + ("; earlier run, not re-run" if base and kept else "")
        rows.append(
            f"| `{name}` | {info['task']} | {size:.1f} MiB | {info.get('n_test', '–')} | "
            f"{fmt(main)} | {base_text} | [{Path(card).name}]({card}) |"
        )
    text = readme.read_text()
    begin, end = "<!-- shipped-models:begin -->", "<!-- shipped-models:end -->"
    table = "\n".join(rows)
    text = text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end) :]
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("work/data"))
    p.add_argument("--sim-frames", type=int, default=N_SIM_FRAMES)
    for cmd in ("install", "record", "card"):
        i = sub.add_parser(cmd)
        i.add_argument("names", nargs="+", choices=sorted(MODELS))
        i.add_argument("--runs", type=Path, default=Path("work/runs"))
        i.add_argument("--shared", type=Path, default=Path("../shared/data"))
        i.add_argument("--docs", type=Path, default=Path("docs"))
    v = sub.add_parser("val", help="metrics of a model on the recipe's validation split")
    v.add_argument("model", help="model name or folder")
    v.add_argument("--data", type=Path, required=True, help="e.g. work/data/busi")
    v.add_argument("--task", choices=("segmentation", "classification"), required=True)
    v.add_argument("--out", type=Path, help="write the metrics here as JSON (a new file)")
    v.add_argument(
        "--tta", choices=("on", "off"), help="force flip test-time augmentation (default: model's)"
    )
    pp = sub.add_parser("postprocess", help="choose post-processing on the validation split")
    pp.add_argument("model_dir", type=Path, help="a fine-tuned model folder (a run's model/)")
    pp.add_argument("--data", type=Path, required=True, help="e.g. work/data/busi")
    pp.add_argument("--tta", choices=("auto", "on", "off"), default="auto", help="flip TTA")
    pp.add_argument("--apply", action="store_true", help="write the choice into config.json")
    pp.add_argument(
        "--gates", type=float, nargs="+", help="presence-gate thresholds to try (0: none)"
    )
    pp.add_argument("--out", type=Path, help="write the table here as JSON (a new file)")
    sz = sub.add_parser("infer-size", help="choose the inference input side on validation")
    sz.add_argument("model_dir", type=Path, help="a fine-tuned model folder (a run's model/)")
    sz.add_argument("--data", type=Path, required=True, help="e.g. work/data/hc18")
    sz.add_argument("--sizes", type=int, nargs="+", required=True, help="e.g. 224 256")
    sz.add_argument("--apply", action="store_true", help="write the choice into config.json")
    sz.add_argument("--out", type=Path, help="write the table here as JSON (a new file)")
    args = ap.parse_args()
    out = getattr(args, "out", None) if args.cmd in ("infer-size", "postprocess", "val") else None
    if out is not None and out.exists():  # never replace a file this call did not make
        ap.error(f"--out {out} exists; pass a new file name")
    text = None
    if args.cmd == "infer-size":
        res = choose_infer_size(args.model_dir, args.data, args.sizes, args.apply)
        text = json.dumps(res, indent=1)
    if args.cmd == "postprocess":
        res = choose_on_val(args.model_dir, args.data, args.tta, args.apply, args.gates)
        text = json.dumps(res, indent=1)
    if args.cmd == "val":
        tta = None if args.tta is None else args.tta == "on"
        text = json.dumps(val_metrics(args.model, args.data, args.task, tta), indent=1, default=str)
        print(text)
    if out is not None and text is not None:
        from usfm_core.utils import atomic_write_text

        atomic_write_text(out, text + "\n")
    if args.cmd == "prepare":
        prepare(args.shared, args.out, args.sim_frames)
    for name in getattr(args, "names", []):
        if args.cmd == "install":
            install(name, args.runs)
        elif args.cmd == "record":
            record(name, args.runs, args.shared)
        else:
            fill_card(name, args.runs, args.docs)
    if args.cmd == "card":
        fill_readme(args.docs.resolve().parent / "README.md")


if __name__ == "__main__":
    main()
