"""A fresh decoder's recipe in ``propagate`` (warm-up, backbone rate), chosen on validation.

In the retrain protocol of ``benchmarks/active_learning.py`` a few fresh-decoder runs (120 steps,
lr 1e-3, no warm-up, backbone at the decoder's rate) ended near the empty mask (BUSI test Dice
0.04-0.10 where other runs of the same round reached 0.4-0.5), whichever frames were picked.
This benchmark compares recipes for that training on data no benchmark reports on: the
labelled frames are random draws from the fixed **train** split, the score is the Dice on the
**validation** split's images with a structure (the test split is never read), and every
recipe trains on the same frames with the same seed (paired).

A recipe is ``LABEL=WARMUP:BACKBONE_LR_SCALE``: ``WARMUP`` the fraction of the steps over which
the rate ramps up linearly, ``BACKBONE_LR_SCALE`` the backbone's rate over the decoder's.

    python benchmarks/propagate_recipe.py --datasets busi hc18 --seeds 0 1 2 3 --threads 1
    python benchmarks/propagate_recipe.py --summarise

Every run is written atomically to
``benchmarks/results/propagate_recipe/<data>/<recipe>-n<N>-s<S>-t<steps>.json`` as soon as it
ends (resumable); ``--summarise`` writes ``benchmarks/results/propagate_recipe.json``
and prints a table: mean ± std, the worst run, runs that collapsed (Dice below half the median
of every run of that data set and label count) and the paired difference to the first recipe.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from usfm_core.outputs import atomic_write_text, check_outputs

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RECIPES = ["base=0:1", "warmup=0.1:1", "warm20=0.2:1", "bb=0:0.1", "both=0.1:0.1"]
SIZE, BATCH, LR = 128, 4, 1e-3  # the retrain protocol's input side, batch and fresh-decoder rate


def parse_recipe(text: str) -> tuple[str, float, float]:
    """``LABEL=WARMUP:SCALE`` → ``(label, warmup, scale)`` (errors name the bad recipe)."""
    try:
        label, spec = text.split("=", 1)
        warm, scale = (float(v) for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"recipe {text!r}: expected LABEL=WARMUP:BACKBONE_LR_SCALE") from None
    return label, warm, scale


def load_split_data(dataset: str, cache: dict) -> Any:
    """Train-split frames / masks at the model side (``frames``, ``masks``) and validation
    images with a structure (``test_frames``, ``test_masks``): ``active_learning``'s pool with
    ``split="val"``, read once per data set."""
    from dataclasses import replace

    from active_learning import SETTINGS, load_real

    if dataset not in cache:
        whole = replace(SETTINGS["val-retrain-warmup"], size=SIZE, pool=0, test=0)
        cache[dataset] = load_real(dataset, whole, 0, {})
    return cache[dataset]


def run_one(
    dataset: str, recipe: tuple[str, float, float], n: int, seed: int, steps: int,
    backbone: Any, cache: dict,
) -> dict[str, Any]:  # fmt: skip
    """Train a fresh decoder on ``n`` random train frames (seeded) with ``recipe``; val Dice."""
    from active_learning import first_model, mean_test_dice
    from usfm_core.finetune.propagate import propagate

    d = load_split_data(dataset, cache)
    rng = np.random.default_rng(seed * 1000 + n)
    picked = sorted(rng.choice(len(d.frames), n, replace=False).tolist())
    _, warm, scale = recipe
    t0 = time.perf_counter()
    res = propagate(
        first_model(backbone, seed, True),
        d.frames[picked],
        {j: d.masks[i] for j, i in enumerate(picked)},
        steps=steps, lr=LR, warmup=warm, backbone_lr_scale=scale, batch_size=BATCH,
        input_size=SIZE, seed=seed * 100 + n,
        retry_unfit=False,  # the recipes as measured (before propagate's retry existed)
    )  # fmt: skip
    t1 = time.perf_counter()
    dice = mean_test_dice(res.model, d.test_frames, d.test_masks, SIZE)
    return {
        "dice": dice,
        "picked": picked,
        "picked_foreground": [bool(d.masks[i].any()) for i in picked],
        "loss_first10": float(np.mean(res.losses[:10])),
        "loss_last10": float(np.mean(res.losses[-10:])),
        "n_val": len(d.test_frames),
        "seconds": {"train": round(t1 - t0, 1), "val": round(time.perf_counter() - t1, 1)},
    }


def run_path(results: Path, dataset: str, label: str, n: int, seed: int, steps: int) -> Path:
    return results / dataset / f"{label}-n{n}-s{seed}-t{steps}.json"


def run_grid(args: argparse.Namespace) -> None:
    """Every (data set, seed, label count, recipe) not yet on disk with the same key."""
    import torch

    from active_learning import backbone_key, load_backbone_module, machine_load

    torch.set_num_threads(args.threads)
    backbone = load_backbone_module(args.backbone)
    bb = backbone_key(backbone)
    recipes = [parse_recipe(r) for r in args.recipes]
    cache: dict = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            for n in args.labels:
                for recipe in recipes:
                    path = run_path(args.results_dir, dataset, recipe[0], n, seed, args.steps)
                    key = {"recipe": list(recipe), "backbone_id": bb, "steps": args.steps,
                           "size": SIZE, "batch": BATCH, "lr": LR}  # fmt: skip
                    if path.exists() and json.loads(path.read_text()).get("key") == key:
                        continue
                    load = machine_load()
                    rec = run_one(dataset, recipe, n, seed, args.steps, backbone, cache)
                    rec.update(key=key, dataset=dataset, n=n, seed=seed, load_before=load)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(path, json.dumps(rec, indent=1))
                    print(f"{dataset} n{n} s{seed} {recipe[0]:>8}: val Dice {rec['dice']:.3f} "
                          f"({rec['seconds']['train']:.0f} s)", flush=True)  # fmt: skip


def summarise(results: Path, recipes: list[str], steps: int) -> dict[str, Any]:
    """Per data set and label count: every recipe's mean ± std, worst, collapses, paired Δ."""
    labels = [parse_recipe(r)[0] for r in recipes]
    out: dict[str, Any] = {"steps": steps, "recipes": recipes, "cells": []}
    for ds_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        runs = [json.loads(p.read_text()) for p in ds_dir.glob(f"*-t{steps}.json")]
        for n in sorted({r["n"] for r in runs}):
            cell = [r for r in runs if r["n"] == n]
            median = statistics.median(r["dice"] for r in cell)
            by = {lab: {r["seed"]: r["dice"] for r in cell if r["key"]["recipe"][0] == lab}
                  for lab in labels}  # fmt: skip
            base = by[labels[0]]
            for lab in labels:
                vals = by[lab]
                if not vals:
                    continue
                seeds = sorted(set(vals) & set(base))
                diffs = [vals[s] - base[s] for s in seeds]
                out["cells"].append({
                    "dataset": ds_dir.name, "n": n, "recipe": lab, "seeds": sorted(vals),
                    "mean": statistics.mean(vals.values()),
                    "std": statistics.stdev(vals.values()) if len(vals) > 1 else 0.0,
                    "worst": min(vals.values()),
                    "collapsed": sum(v < 0.5 * median for v in vals.values()),
                    "paired_diff": statistics.mean(diffs) if diffs else None,
                })  # fmt: skip
    return out


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'data':<6} {'n':>3} {'recipe':>8} {'seeds':>5} {'mean':>6} {'std':>6} "
          f"{'worst':>6} {'coll.':>5} {'Δ vs 1st':>8}")  # fmt: skip
    for c in summary["cells"]:
        d = "" if c["paired_diff"] is None else f"{c['paired_diff']:+.3f}"
        print(
            f"{c['dataset']:<6} {c['n']:>3} {c['recipe']:>8} {len(c['seeds']):>5} "
            f"{c['mean']:.3f} {c['std']:.3f} {c['worst']:.3f} {c['collapsed']:>5} {d:>8}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["busi", "hc18"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--labels", nargs="+", type=int, default=[5, 15, 30])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--backbone", default="openus-small-fast")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS / "propagate_recipe")
    parser.add_argument("--out", type=Path, default=RESULTS / "propagate_recipe.json")
    parser.add_argument("--summarise", action="store_true")
    args = parser.parse_args(argv)
    # The summary never replaces a run file it is made from (nor lands among them).
    runs = args.results_dir
    check_outputs([args.out], [runs, *(p for p in runs.glob("*") if p.is_dir())])
    if not args.summarise:
        run_grid(args)
    summary = summarise(args.results_dir, args.recipes, args.steps)
    print_table(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
