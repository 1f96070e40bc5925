"""float32 vs bf16 autocast for the shipped models: segmentation speed and validation accuracy.

Two measurements, side by side in one process (``--threads``, default 2):

* **speed**: frames/s of ``segment_frames`` for each shipped segmenter over the first 32
  images of its data set, fp32 and bf16 alternating for ``--rounds`` rounds (after one warm-up
  each), the load average beside every number;
* **accuracy** on the *validation* split the shipped recipe makes (``make_splits`` seed 0, as
  ``tools/shipped_models.py val``): the metrics of both precisions and the largest per-image
  change (Dice, HC error in mm, classification probabilities). The test split is left to
  ``usfm-core evaluate NAME --precision fp32|bf16``.

    python benchmarks/precision.py [--data work/data] [--rounds 3] [--threads 2]

``--data`` is the folder ``python tools/shipped_models.py prepare`` writes (it is made under
``/tmp`` from ``../shared/data`` when missing). Prints a table, writes
``benchmarks/results/precision.json``. The VMamba-T rows are ``benchmarks/backbone.py
--precisions fp32 bf16``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from usfm_core.outputs import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "precision.json"
MODELS = [  # shipped model, prepared data folder, task
    ("fetal-head", "hc18", "segmentation"),
    ("breast-lesion", "busi", "segmentation"),
    ("sim-lesion", "busi", "segmentation"),
    ("breast-class", "busi", "classification"),
]


def prepared_data(data: Path | None) -> Path:
    """The prepared data folder (made from ``../shared/data`` under /tmp when not given)."""
    if data is not None:
        return data
    sys.path.insert(0, str(REPO / "tools"))
    import shipped_models

    out = Path("/tmp/usfm-precision-data")
    if not (out / "busi" / "manifest.csv").exists():
        shipped_models.prepare(REPO.parent / "shared" / "data", out, n_sim=0)
    return out


def speed(model, frames: list[np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Frames/s of ``segment_frames`` per precision and round (alternating), load beside."""
    from usfm_core.finetune.infer import segment_frames

    for p in ("fp32", "bf16"):  # warm-up: the C kernel, oneDNN's bf16 primitives
        list(segment_frames(model, frames[:4], precision=p))
    out: dict[str, list[float]] = {"fp32": [], "bf16": [], "load": []}
    for _ in range(rounds):
        for p in ("fp32", "bf16"):
            out["load"].append(round(os.getloadavg()[0], 2))
            t0 = time.perf_counter()
            list(segment_frames(model, frames, batch_size=4, precision=p))
            out[p].append(round(len(frames) / (time.perf_counter() - t0), 2))
    return out


def accuracy(model, data, indices: list[int], task: str) -> dict:
    """Validation metrics in both precisions and the largest per-image change."""
    from usfm_core.evaluate.report import _cls_scorer, _seg_scorer

    scorer = _seg_scorer if task == "segmentation" else _cls_scorer
    (a, ra), (b, rb) = (scorer(model, data, indices, None, "cpu", 8, p) for p in ("fp32", "bf16"))
    keys = [k for k in ("dice", "hd95", "hc_error_mm", "accuracy", "macro_f1", "auroc") if k in a]
    out: dict = {"n": len(indices), **{k: [round(a[k], 4), round(b[k], 4)] for k in keys}}
    if task == "segmentation":
        dd = [abs(x["dice"] - y["dice"]) for x, y in zip(ra, rb) if np.isfinite(x["dice"])]
        out["max_abs_ddice"] = round(max(dd), 4)
        out["mean_abs_ddice"] = round(float(np.mean(dd)), 5)
        out["pred_empty_changed"] = sum(x["pred_empty"] != y["pred_empty"] for x, y in zip(ra, rb))
        out["fp_on_empty_changed"] = sum(
            x["fp_on_empty"] != y["fp_on_empty"] for x, y in zip(ra, rb)
        )
        pairs = [(x, y) for x, y in zip(ra, rb) if "hc_error_mm" in x]
        hc = [abs(x["hc_error_mm"] - y["hc_error_mm"]) for x, y in pairs]
        if hc:
            out["max_abs_dhc_mm"] = round(max(hc), 3)
            out["mean_abs_dhc_mm"] = round(float(np.mean(hc)), 3)
    else:
        out["predicted_changed"] = sum(x["predicted"] != y["predicted"] for x, y in zip(ra, rb))
        out["max_abs_dp"] = round(max(abs(x["p_true"] - y["p_true"]) for x, y in zip(ra, rb)), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cv2

    from usfm_core.finetune.data import LabelledSet, make_splits
    from usfm_core.finetune.models import load_finetuned
    from usfm_core.models.precision import cpu_bf16_flags

    root = prepared_data(args.data)
    result: dict = {
        "threads": args.threads, "cpu_bf16_flags": list(cpu_bf16_flags()),
        "torch": torch.__version__, "speed_frames_per_s": {}, "val_accuracy": {},
    }  # fmt: skip
    for name, folder, task in MODELS:
        model, _ = load_finetuned(name)
        data = LabelledSet.from_folder(root / folder, task)
        if task == "segmentation":
            rows = list(csv.DictReader(open(root / folder / "manifest.csv", encoding="utf-8")))
            col = "image" if "image" in rows[0] else "png"
            frames = [
                cv2.imread(str(root / folder / r[col]), cv2.IMREAD_GRAYSCALE) for r in rows[:32]
            ]
            result["speed_frames_per_s"][name] = s = speed(model, frames, args.rounds)
            print(f"{name:>14} frames/s fp32 {s['fp32']}  bf16 {s['bf16']}  load {s['load']}")
        if name == "sim-lesion":  # a simulator model: no validation split of real data
            continue
        val = make_splits(data.labels, data.groups, seed=0)["val"]
        result["val_accuracy"][name] = acc = accuracy(model, data, val, task)
        print(f"{name:>14} validation (fp32, bf16): {acc}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
