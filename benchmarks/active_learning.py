"""Measured value of suggested frames (issue #17 item 4): suggest vs random vs evenly spaced.

A simulated user labels ``k`` frames per round for ``rounds`` rounds on three pools and the
model of every round is scored on a fixed, never-selected test set:

* ``busi``: BUSI lesions. Pool = a per-seed random sub-sample of the shipped recipe's train +
  val images (``label_efficiency.task_data``: ``make_splits`` seed 0, grouped by
  ``dup_group``), normal (empty) images included; test = the fixed test split's lesion images
  (an even sub-sample in the quick setting).
* ``hc18``: HC18 fetal heads, the same way (grouped by subject).
* ``sim``: a simulated cine (``usfm_core.sim.simulate_cine``, seed ``100 + seed``); pool = its
  frames, test = the frames of a held-out cine of the same generator (seed 5000).

Strategies, given the labelled frames so far:

* ``suggest``: the product's k-center ranking, :func:`usfm_core.finetune.suggest.score_frames`
  + :func:`~usfm_core.finetune.suggest.select_frames` (``strategy="kcenter"``) with the current
  round's model (first round: the bare backbone, i.e. pure k-center diversity from its
  embeddings; later rounds: the last round's segmenter, uncertainty weight 0.5). It was the
  product's default until the ``val-warmup`` grid chose random frames (2026-12-02);
* ``suggest-typical`` / ``suggest-typical-w0``: the same with ``select_frames``' typical rule
  (TypiClust), with the product's uncertainty weights / with weight 0 in every round;
* ``random``: ``k`` unlabelled frames drawn uniformly (``numpy`` generator seeded by the seed);
* ``even``: evenly spaced indices of the pool (pool in data-set order, a cine in time order):
  with ``m`` frames labelled after the round, the grid ``(j + 0.5) · N / m`` is walked from the
  grid point farthest from any labelled frame, each snapped to the nearest unlabelled index,
  so the labelled sets of successive rounds are nested.

Training (the same for every strategy): round 1 builds a fresh U-Net decoder on the shipped
backbone (``openus-small-fast``), later rounds warm-start from the previous round's model, as
the Annotate widget does (settings with ``retrain``, e.g. ``full-retrain``: every round builds
the fresh decoder on the bare backbone again, the usual active-learning protocol; with warm
starts the model of round r has had r rounds of steps, so "labels to match random" also counts
training steps); every round runs :func:`usfm_core.finetune.propagate.propagate` for
``steps`` AdamW steps on all labelled frames (product learning rates: 1e-3 for the fresh
decoder, 2e-4 for warm starts). ``train_backbone`` False (the quick setting) freezes the
backbone so the 2-core box can run the grid; the full setting trains it as the product does.
Pool frames are resized to the input side (``size``) first; test frames are segmented at their
own size (:func:`usfm_core.finetune.infer.segment_frames`) and scored with the project's Dice
(:func:`usfm_core.evaluate.metrics.segmentation_metrics`: test items whose ground truth is
empty are ignored), averaged over the test items.

Each (setting, dataset, strategy, seed) writes one JSON (its curve, picks, timings and the
machine load) atomically under ``benchmarks/results/active_learning/<setting>/<dataset>/`` as
soon as it ends; a later sitting skips the runs already there whose key (setting, backbone
weights) matches, so the grid can be run in pieces. ``--summarise`` merges them into
``benchmarks/results/active_learning.json`` (``_<setting>.json`` for other settings than
quick), the table ``.md`` beside it and the plot ``docs/images/active_learning.png``.

**labels_to_match_random** (per data set): ``target`` = random's final-round mean Dice, ``N``
= random's final label count. The first round at which suggest's mean Dice is ``>= target`` is
found; the label count there is linearly interpolated between that round and the one before
(the first round's count when it is reached at once; no extrapolation below it); the value is
that count / ``N``. When suggest never reaches it, the value is ``(n_last + k) / N`` (> 1, a
lower bound: at least one more round would be needed) with ``reached: false``.

**Targets** (issue #17): ``labels_to_match_random <= 0.6`` on at least one of BUSI / HC18, and
at every round and data set suggest's mean Dice ``>= random's mean - random's seed std``
(sample std over seeds).

``--timing`` times one product round: ``propagate`` with 3 painted frames, 30 steps, batch 4,
``smooth=2`` over a 100-frame 256x256 simulated cine, at 2 torch threads, from ``sim-lesion``
(warm start) and from the bare shipped backbone (fresh decoder, 128 px input); written to
``benchmarks/results/active_learning_timing.json`` (target: <= 2 min per round).

    python benchmarks/active_learning.py --setting quick --threads 1            # run / resume
    python benchmarks/active_learning.py --setting quick --datasets busi --strategies suggest
    python benchmarks/active_learning.py --setting quick --summarise           # merge + plot
    python benchmarks/active_learning.py --timing --threads 2
    python benchmarks/active_learning.py --setting smoke --results-dir /tmp/al  # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results" / "active_learning"
SUMMARY = HERE / "results" / "active_learning.json"
TIMING = HERE / "results" / "active_learning_timing.json"
PLOT = REPO / "docs" / "images" / "active_learning.png"
STRATEGIES = ("suggest", "suggest-typical", "suggest-typical-w0", "random", "even")
# The benchmark's suggesting strategies: the ``select_frames`` rule and uncertainty weight each
# uses (None: the product default, 0 in round 1 and 0.5 once anything is labelled).
SUGGEST_VARIANTS: dict[str, tuple[str, float | None]] = {
    "suggest": ("kcenter", None),
    "suggest-typical": ("typical", None),
    # TypiClust as its paper runs it at low budgets: typicality alone, no uncertainty, every round.
    "suggest-typical-w0": ("typical", 0.0),
}
DATASETS = ("busi", "hc18", "sim")
TITLES = {"busi": "BUSI lesions", "hc18": "HC18 fetal heads", "sim": "simulated cine"}
SIM_TEST_SEED = 5000

sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Setting:
    """Sizes and budget of one setting.

    ``pool`` / ``test``: pool and test items per data set (0 = the whole train+val / test
    split; the simulated cines always have exactly that many frames). ``size``: model input
    side (pool frames are resized to it). ``k`` frames per round, ``rounds`` rounds, ``steps``
    optimiser steps of ``batch`` frames per round. ``backbone``: a model name / folder, or
    ``tiny`` (a random tiny VMamba, smoke only). ``sim_side``: simulated frame side.
    ``retrain``: every round starts again from the bare backbone (fresh decoder) instead of
    warm-starting from the last round's model, so a round's Dice depends on its labelled set
    and not on how many rounds of training came before (module doc). ``warmup``: the fresh
    decoder's learning-rate warm-up, a fraction of ``steps`` (``propagate(warmup=...)``; the
    product's ``DEFAULT_WARMUP_NEW_DECODER`` is 0.1 since the ``full-retrain`` runs, which used 0).
    ``split``: ``test`` scores BUSI / HC18 on the test split with a train+val pool; ``val``
    scores on the validation split with a train-only pool, for choosing between rules without
    reading the test split. ``retry_unfit``: ``propagate``'s retry of a model that missed its
    own painted frames (the product's default since 2026-12-02; off in the settings run
    before, so they reproduce).
    """

    name: str
    pool: int
    test: int
    size: int
    k: int
    rounds: int
    steps: int
    batch: int
    seeds: tuple[int, ...]
    train_backbone: bool
    backbone: str = "openus-small-fast"
    sim_side: int = 256
    retrain: bool = False
    warmup: float = 0.0
    split: str = "test"
    retry_unfit: bool = False


#: The issue's sizes: whole pools, whole test splits, the product's full fine-tuning. The other
#: full-size settings change only the fields named in them.
FULL = Setting("full", 0, 0, 128, 5, 6, 30, 4, (0, 1, 2), True)


def _full(name: str, **changes: Any) -> Setting:
    """:data:`FULL` renamed, with ``changes`` to its fields."""
    return replace(FULL, name=name, **changes)


SETTINGS = {
    # Fits the loaded 2-core box at one thread (frozen backbone, 64 px).
    "quick": Setting("quick", 120, 40, 64, 3, 4, 20, 4, (0, 1, 2), False, sim_side=128),
    "full": FULL,
    # The product's loop as it is now: warm starts, and round 1's fresh decoder with the
    # product's 10 % warm-up (``full`` predates it); ``val-``: on train (pool) / validation
    # (score) only, for choosing the product's rule.
    "full-warmup": _full("full-warmup", warmup=0.1),
    "val-warmup": _full("val-warmup", warmup=0.1, split="val"),
    # Both again with propagate's retry of unfit models (the product since 2026-12-02).
    "full-warmup-retry": _full("full-warmup-retry", warmup=0.1, retry_unfit=True),
    "val-warmup-retry": _full("val-warmup-retry", warmup=0.1, split="val", retry_unfit=True),
    # The same sizes under the usual active-learning protocol: each round retrains from the
    # backbone for a fixed 120 steps (4x a product round; 16 epochs of the last round's 30 frames).
    "full-retrain": _full("full-retrain", steps=120, retrain=True),
    # The same with the product's fresh-decoder recipe since: a 10 % learning-rate warm-up.
    "full-retrain-warmup": _full("full-retrain-warmup", steps=120, retrain=True, warmup=0.1),
    # The same on train (pool) / validation (score) only: for choosing the product's rule.
    "val-retrain-warmup": _full(
        "val-retrain-warmup", steps=120, retrain=True, warmup=0.1, split="val"
    ),
    "smoke-retrain": Setting(
        "smoke-retrain", 6, 3, 64, 2, 2, 1, 2, (0,), False, "tiny", sim_side=64, retrain=True
    ),
    # Seconds: every code path on tiny pools; its numbers mean nothing.
    "smoke": Setting("smoke", 6, 3, 64, 2, 2, 1, 2, (0,), False, "tiny", sim_side=64),
}
SIM_FULL_FRAMES = (300, 100)  # pool / test frames of the simulated cines when pool/test is 0


# ---------------------------------------------------------------------------- data


@dataclass
class Pool:
    """One data set's pool and test set.

    ``frames`` ``(N, S, S)`` uint8 and ``masks`` ``(N, S, S)`` uint8 0/1 at the input side;
    ``test_frames`` / ``test_masks`` lists of ``(H, W)`` uint8 at their own size; ``ids``
    the pool items' names (data-set index or cine frame).
    """

    frames: np.ndarray
    masks: np.ndarray
    test_frames: list[np.ndarray]
    test_masks: list[np.ndarray]
    ids: list[str]


def _resize(images: Sequence[np.ndarray], side: int, nearest: bool = False) -> np.ndarray:
    """``(H, W)`` arrays → ``(N, side, side)`` uint8 (area for images, nearest for masks)."""
    import cv2

    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack([cv2.resize(np.asarray(a), (side, side), interpolation=interp) for a in images])


def load_real(dataset: str, setting: Setting, seed: int, cache: dict) -> Pool:
    """BUSI / HC18 pool (per-seed sub-sample of train+val, data-set order) and test set
    (lesion-bearing test items, evenly sub-sampled; the same for every seed). With
    ``setting.split == "val"`` the pool is the train split and the score set the validation
    split's items with a structure."""
    from label_efficiency import spread_indices, task_data
    from usfm_core.finetune.data import read_image, read_mask

    if dataset not in cache:
        data, splits = task_data("busi-seg" if dataset == "busi" else "hc18-seg")
        held = splits["val"] if setting.split == "val" else splits["test"]
        pool_items = splits["train"] if setting.split == "val" else splits["train"] + splits["val"]
        test = [i for i in held if (read_mask(data.items[i]) > 0).any()]
        if setting.test:
            test = spread_indices(test, setting.test)
        tf = [read_image(data.items[i]) for i in test]
        tm = [(read_mask(data.items[i]) > 0).astype(np.uint8) for i in test]
        cache[dataset] = (data, sorted(pool_items), tf, tm)
    data, trainval, tf, tm = cache[dataset]
    pool = trainval
    if setting.pool and setting.pool < len(trainval):
        rng = np.random.default_rng(1000 + seed)
        pool = sorted(rng.choice(trainval, setting.pool, replace=False).tolist())
    frames = _resize([read_image(data.items[i]) for i in pool], setting.size)
    masks = _resize(
        [(read_mask(data.items[i]) > 0).astype(np.uint8) for i in pool], setting.size, True
    )
    return Pool(frames, masks, tf, tm, [str(i) for i in pool])


def load_sim(setting: Setting, seed: int, cache: dict) -> Pool:
    """Pool = the frames of simulated cine ``100 + seed``; test = held-out cine 5000."""
    from usfm_core.sim import simulate_cine

    n_pool, n_test = setting.pool or SIM_FULL_FRAMES[0], setting.test or SIM_FULL_FRAMES[1]
    side = {"height": setting.sim_side, "width": setting.sim_side}
    if "sim" not in cache:
        test = simulate_cine(n_test, seed=SIM_TEST_SEED, **side)
        cache["sim"] = (
            [np.asarray(f) for f in test.frames],
            [(m > 0).astype(np.uint8) for m in test.lesion_masks],
        )
    cine = simulate_cine(n_pool, seed=100 + seed, **side)
    frames = _resize(list(cine.frames), setting.size)
    masks = _resize([(m > 0).astype(np.uint8) for m in cine.lesion_masks], setting.size, True)
    tf, tm = cache["sim"]
    return Pool(frames, masks, tf, tm, [str(i) for i in range(n_pool)])


def load_pool(dataset: str, setting: Setting, seed: int, cache: dict) -> Pool:
    """The pool and test set of ``dataset`` for ``seed`` (test items shared through ``cache``)."""
    if dataset == "sim":
        return load_sim(setting, seed, cache)
    return load_real(dataset, setting, seed, cache)


# ---------------------------------------------------------------------------- strategies


def even_pick(n: int, labelled: Sequence[int], k: int) -> list[int]:
    """``k`` new indices of ``0..n-1`` so the labelled set stays evenly spaced (module doc)."""
    chosen = set(int(i) for i in labelled)
    m = min(n, len(chosen) + k)
    grid = [(j + 0.5) * n / m for j in range(m)]
    new: list[int] = []
    while len(new) < k and len(chosen) < n:
        free = np.array([i for i in range(n) if i not in chosen])

        def gap(g: float) -> float:
            return min((abs(g - c) for c in chosen), default=math.inf)

        g = max(grid, key=lambda g: (gap(g), -g))
        pick = int(free[np.argmin(np.abs(free - g))])
        chosen.add(pick)
        new.append(pick)
    return new


def random_pick(n: int, labelled: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """``k`` unlabelled indices drawn uniformly without replacement."""
    free = np.setdiff1d(np.arange(n), np.asarray(labelled, int))
    return [int(i) for i in rng.choice(free, min(k, len(free)), replace=False)]


def suggest_pick(
    model: Any,
    frames: np.ndarray,
    labelled: Sequence[int],
    k: int,
    size: int,
    seed: int,
    rule: str = "kcenter",
    weight: float | None = None,
) -> list[int]:
    """The product's top-``k`` suggestions (``score_frames`` + ``select_frames`` with the
    diversity ``rule`` and uncertainty ``weight``) with ``model`` (a bare backbone in round 1,
    the last round's segmenter later)."""
    from usfm_core.finetune.suggest import score_frames, select_frames

    scores = score_frames(model, frames, input_size=size, batch_size=8, flip=weight != 0)
    picks = select_frames(scores, k, labelled, seed=seed, strategy=rule, uncertainty_weight=weight)
    return [s.frame for s in picks]


# ---------------------------------------------------------------------------- one run


def load_backbone_module(name: str) -> Any:
    """The backbone every run starts from: a model name / folder, or ``tiny`` (random)."""
    import torch

    from usfm_core.finetune.models import build_backbone
    from usfm_core.finetune.suggest import load_model_or_backbone

    if name == "tiny":
        torch.manual_seed(0)
        return build_backbone("tiny").eval()
    module, kind = load_model_or_backbone(name)
    return module if kind == "backbone" else module.backbone


def first_model(backbone: Any, seed: int, train_backbone: bool) -> Any:
    """Round 1's segmenter: a fresh U-Net decoder (seeded) on a copy of ``backbone``; the
    backbone frozen unless ``train_backbone``."""
    from usfm_core.finetune.propagate import start_model

    model, _, _ = start_model(backbone, n_classes=1, seed=seed)
    if not train_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return model


def mean_test_dice(
    model: Any, frames: list[np.ndarray], masks: list[np.ndarray], size: int
) -> float:
    """Mean project Dice of the model's masks on the test frames (segmented at their own
    size): :func:`usfm_core.evaluate.metrics.dice` of the binary masks, test frames whose
    ground truth is empty ignored (``segmentation_metrics``' rule, without its HD95)."""
    from usfm_core.evaluate.metrics import dice
    from usfm_core.finetune.infer import segment_frames

    preds = segment_frames(model, frames, batch_size=8, input_size=size)
    values = [dice(p > 0, t > 0) for p, t in zip(preds, masks) if np.any(t)]
    return float(np.mean(values)) if values else float("nan")


def run_one(
    setting: Setting, dataset: str, strategy: str, seed: int, backbone: Any, cache: dict
) -> dict[str, Any]:
    """Simulate one user: ``rounds`` rounds of picking ``k`` frames, training, testing."""
    from usfm_core.finetune.propagate import DEFAULT_LR, DEFAULT_LR_NEW_DECODER, propagate

    t_start = time.perf_counter()
    pool = load_pool(dataset, setting, seed, cache)
    n = len(pool.frames)
    rng = np.random.default_rng(seed)
    labelled: list[int] = []
    model = None
    curve = []
    for r in range(1, setting.rounds + 1):
        t0 = time.perf_counter()
        if strategy in SUGGEST_VARIANTS:
            ranker = backbone if model is None else model
            rule, weight = SUGGEST_VARIANTS[strategy]
            new = suggest_pick(
                ranker, pool.frames, labelled, setting.k, setting.size, seed, rule, weight
            )
        elif strategy == "random":
            new = random_pick(n, labelled, setting.k, rng)
        elif strategy == "even":
            new = even_pick(n, labelled, setting.k)
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        t1 = time.perf_counter()
        labelled = labelled + new
        fresh = model is None or setting.retrain
        start = first_model(backbone, seed, setting.train_backbone) if fresh else model
        res = propagate(
            start,
            pool.frames[labelled],
            {j: pool.masks[i] for j, i in enumerate(labelled)},
            steps=setting.steps,
            lr=DEFAULT_LR_NEW_DECODER if fresh else DEFAULT_LR,
            warmup=setting.warmup if fresh else 0.0,
            retry_unfit=setting.retry_unfit,
            batch_size=setting.batch,
            input_size=setting.size,
            seed=seed * 100 + r,
        )
        model = res.model
        t2 = time.perf_counter()
        dice = mean_test_dice(model, pool.test_frames, pool.test_masks, setting.size)
        curve.append(
            {
                "round": r,
                "n_labelled": len(labelled),
                "dice": dice,
                "picked": new,
                "picked_ids": [pool.ids[i] for i in new],
                "picked_foreground": [bool(pool.masks[i].any()) for i in new],
                "final_loss": res.losses[-1] if res.losses else None,
                "seconds": {
                    "pick": round(t1 - t0, 2),
                    "train": round(t2 - t1, 2),
                    "test": round(time.perf_counter() - t2, 2),
                },
            }
        )
        print(
            f"  {dataset}/{strategy}/s{seed} round {r}: {len(labelled)} labels, "
            f"Dice {dice:.3f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return {
        "curve": curve,
        "n_pool": n,
        "n_test": len(pool.test_frames),
        "seconds": round(time.perf_counter() - t_start, 1),
    }


# ---------------------------------------------------------------------------- caching


def backbone_key(backbone: Any) -> str:
    """Identity of the starting backbone's weights (cached runs are reused only for it)."""
    from label_efficiency import backbone_id

    return backbone_id(backbone)


def run_key(setting: Setting, dataset: str, strategy: str, seed: int, bb: str) -> dict:
    """What a cached run must match to be reused."""
    fields = asdict(setting) | {"seeds": None}
    if not setting.retrain:  # keys written before the field existed stay valid
        fields.pop("retrain")
    if not setting.warmup:  # likewise
        fields.pop("warmup")
    if not setting.retry_unfit:  # likewise
        fields.pop("retry_unfit")
    if setting.split == "test":
        fields.pop("split")
    return {
        "setting": fields,
        "dataset": dataset,
        "strategy": strategy,
        "seed": seed,
        "backbone_id": bb,
    }


def run_path(results: Path, setting: str, dataset: str, strategy: str, seed: int) -> Path:
    return results / setting / dataset / f"{strategy}-s{seed}.json"


def machine_load() -> dict[str, Any]:
    """``uptime`` and the 1-min load average beside a measurement."""
    from label_efficiency import machine_load as load

    return load()


def read_cached(path: Path, key: dict) -> dict | None:
    """The cached record at ``path`` if its key matches ``key`` (None otherwise)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if doc.get("key") == json.loads(json.dumps(key)) else None


def run_grid(
    setting: Setting,
    results: Path,
    datasets: Sequence[str],
    strategies: Sequence[str],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """Run every missing (dataset, strategy, seed) of the grid, caching each as it ends."""
    from usfm_core.outputs import atomic_write_text

    backbone = load_backbone_module(setting.backbone)
    bb = backbone_key(backbone)
    cache: dict = {}
    records = []
    for dataset in datasets:
        for seed in seeds:
            for strategy in strategies:
                key = run_key(setting, dataset, strategy, seed, bb)
                path = run_path(results, setting.name, dataset, strategy, seed)
                doc = read_cached(path, key)
                if doc is not None:
                    print(f"cached: {path.relative_to(results)}", flush=True)
                    records.append(doc)
                    continue
                load_before = machine_load()
                res = run_one(setting, dataset, strategy, seed, backbone, cache)
                doc = {
                    "key": key,
                    **res,
                    "load_before": load_before,
                    "load_after": machine_load(),
                    "threads": _torch_threads(),
                }
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
                records.append(doc)
    return records


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------- summary


def labels_to_match_random(
    n_labels: Sequence[float], suggest: Sequence[float], random: Sequence[float], k: int
) -> dict[str, Any]:
    """Fraction of random's final label count at which suggest first reaches random's final
    mean Dice (rule in the module doc). ``n_labels`` per round, the same for both curves."""
    target, n_final = float(random[-1]), float(n_labels[-1])
    for i, (n, m) in enumerate(zip(n_labels, suggest)):
        if m >= target:
            if i == 0:
                hit = float(n)
            else:
                n0, m0 = float(n_labels[i - 1]), float(suggest[i - 1])
                hit = n0 + (target - m0) / (m - m0) * (n - n0)
            return {"value": round(hit / n_final, 4), "labels": round(hit, 2), "reached": True}
    return {
        "value": round((n_labels[-1] + k) / n_final, 4),
        "labels": None,
        "reached": False,
        "note": "never reached: a lower bound (one more round)",
    }


def never_worse(suggest: Sequence[dict], random: Sequence[dict]) -> dict[str, Any]:
    """Per round: suggest mean >= random mean - random's seed std (``mean``/``std`` dicts)."""
    margins = [s["mean"] - (r["mean"] - r["std"]) for s, r in zip(suggest, random)]
    return {"met": all(m >= 0 for m in margins), "margins": [round(m, 4) for m in margins]}


def curve_stats(runs: list[dict[str, Any]], seeds: set[int] | None = None) -> list[dict]:
    """Mean ± std (over seeds) test Dice per round of one strategy's runs (only ``seeds``
    when given), for the rounds every run reached."""
    from usfm_core.evaluate.metrics import mean_std

    runs = [d for d in runs if seeds is None or d["key"]["seed"] in seeds]
    if not runs:
        return []
    out = []
    for r in range(min(len(d["curve"]) for d in runs)):
        mean, std = mean_std([d["curve"][r]["dice"] for d in runs])
        out.append(
            {
                "round": r + 1,
                "n_labelled": runs[0]["curve"][r]["n_labelled"],
                "mean": round(mean, 4),
                "std": round(std, 4),
                "per_seed": {str(d["key"]["seed"]): round(d["curve"][r]["dice"], 4) for d in runs},
            }
        )
    return out


def summarise(records: list[dict[str, Any]], setting: Setting) -> dict[str, Any]:
    """Mean ± std Dice per data set, strategy and round, labels_to_match_random, targets."""

    out: dict[str, Any] = {
        "setting": asdict(setting),
        "backbone_ids": sorted({d["key"]["backbone_id"] for d in records}),
        "datasets": {},
    }
    for dataset in DATASETS:
        runs = [d for d in records if d["key"]["dataset"] == dataset]
        if not runs:
            continue
        entry: dict[str, Any] = {"strategies": {}}
        for strategy in STRATEGIES:
            mine = [d for d in runs if d["key"]["strategy"] == strategy]
            if not mine:
                continue
            rounds = curve_stats(mine)
            entry["strategies"][strategy] = {
                "seeds": sorted(d["key"]["seed"] for d in mine),
                "rounds": rounds,
                "seconds_per_run": round(float(np.mean([d["seconds"] for d in mine])), 1),
                "picked_with_foreground": round(
                    float(
                        np.mean(
                            [f for d in mine for c in d["curve"] for f in c["picked_foreground"]]
                        )
                    ),
                    3,
                ),
            }
        st = entry["strategies"]
        for variant in SUGGEST_VARIANTS:
            if variant not in st or "random" not in st:
                continue
            # Compared on the seeds both strategies have (paired), every round both reached.
            common = set(st[variant]["seeds"]) & set(st["random"]["seeds"])
            by = {
                s: curve_stats([d for d in runs if d["key"]["strategy"] == s], common)
                for s in (variant, "random")
            }
            sug, rnd = by[variant], by["random"]
            m = min(len(sug), len(rnd))
            if common and m:
                # "suggest" (k-center, the product default until 2026-12-02) keeps the
                # historical top-level keys.
                sub = entry if variant == "suggest" else entry.setdefault(variant, {})
                sub["compared_seeds"] = sorted(common)
                n_labels = [x["n_labelled"] for x in rnd[:m]]
                rnd_means = [x["mean"] for x in rnd[:m]]
                sub["labels_to_match_random"] = labels_to_match_random(
                    n_labels, [x["mean"] for x in sug[:m]], rnd_means, setting.k
                )
                # Control: where random's own curve first reaches its final mean. On a flat,
                # noisy curve this is early too, and a small labels_to_match_random means
                # nothing unless it is below this.
                sub["random_self_match"] = labels_to_match_random(
                    n_labels, rnd_means, rnd_means, setting.k
                )
                sub["never_worse_than_random"] = never_worse(sug[:m], rnd[:m])
                sub["complete"] = len(common) >= len(setting.seeds) and m == setting.rounds
        out["datasets"][dataset] = entry
    out["targets"] = target_checks(out["datasets"])
    for variant in SUGGEST_VARIANTS:
        if variant == "suggest":
            continue
        sub = {d: e[variant] for d, e in out["datasets"].items() if variant in e}
        if sub:  # "targets_typical" / "targets_typical-w0": the variants' own target lines
            out["targets_" + variant.removeprefix("suggest-")] = target_checks(sub)
    return out


def target_checks(datasets: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's two benchmark targets, met / missed, from the per-data-set summaries."""
    ltm = {
        d: e["labels_to_match_random"]
        for d, e in datasets.items()
        if d in ("busi", "hc18") and "labels_to_match_random" in e
    }
    best = min((v["value"] for v in ltm.values() if v["reached"]), default=None)
    # The same, counted only where random's own curve needs more labels to reach its final
    # mean than suggest does (a gain over random's own plateau, not a flat curve's noise).
    beyond = {
        d: e["labels_to_match_random"]["value"] < e["random_self_match"]["value"]
        for d, e in datasets.items()
        if d in ltm and "random_self_match" in e
    }
    controlled = [ltm[d]["value"] for d, ok in beyond.items() if ok and ltm[d]["reached"]]
    nw = {
        d: e["never_worse_than_random"]["met"]
        for d, e in datasets.items()
        if "never_worse_than_random" in e
    }
    return [
        {
            "target": "labels_to_match_random <= 0.6 on BUSI or HC18",
            "values": {d: v["value"] for d, v in ltm.items()},
            "met": best is not None and best <= 0.6,
        },
        {
            "target": "... and below random's own labels to reach its final mean (control)",
            "values": {
                d: {
                    "suggest": ltm[d]["value"],
                    "random_self": datasets[d]["random_self_match"]["value"],
                }
                for d in beyond
            },
            "met": bool(controlled) and min(controlled) <= 0.6,
        },
        {
            "target": "suggest never below random - 1 seed std (every round, every data set)",
            "values": nw,
            "met": bool(nw) and all(nw.values()),
        },
        {
            "target": "grid complete (every seed and round of suggest and random)",
            "values": {d: e.get("complete", False) for d, e in datasets.items()},
            "met": bool(datasets) and all(e.get("complete", False) for e in datasets.values()),
        },
    ]


def markdown(summary: dict[str, Any]) -> str:
    """The results table (mean ± std test Dice per round) and the target lines."""
    lines = [f"Setting `{summary['setting']['name']}`.", ""]
    for dataset, entry in summary["datasets"].items():
        st = entry["strategies"]
        any_s = next(iter(st.values()))
        lines += [f"**{TITLES[dataset]}**", ""]
        lines.append("| labelled | " + " | ".join(st) + " |")
        lines.append("|---|" + "---|" * len(st))
        for r, row in enumerate(any_s["rounds"]):
            cells = []
            for s in st.values():
                x = s["rounds"][r] if r < len(s["rounds"]) else None
                cells.append(f"{x['mean']:.3f} ± {x['std']:.3f}" if x else "–")
            lines.append(f"| {row['n_labelled']} | " + " | ".join(cells) + " |")
        seeds = ", ".join(f"{s}: {len(v['seeds'])}" for s, v in st.items())
        lines.append("")
        lines.append(f"Seeds per strategy: {seeds}.")
        for variant in SUGGEST_VARIANTS:
            name = variant.capitalize()
            sub = entry if variant == "suggest" else entry.get(variant)
            if not sub or "labels_to_match_random" not in sub:
                continue
            ltm = sub["labels_to_match_random"]
            nw = sub["never_worse_than_random"]
            reached = "" if ltm["reached"] else " (never reached; lower bound)"
            own = sub.get("random_self_match")
            control = f" (random reaches its own final at {own['value']:.2f})" if own else ""
            lines.append(
                f"{name} vs random on seeds {sub['compared_seeds']}"
                f"{'' if sub['complete'] else ' (incomplete grid)'}: "
                f"labels_to_match_random = {ltm['value']:.2f}{reached}{control}; "
                f"never worse than random - 1 std: {'yes' if nw['met'] else 'NO'} "
                f"(margins {nw['margins']})."
            )
        lines.append("")
    for t in summary["targets"]:
        lines.append(f"- {t['target']}: {'met' if t['met'] else 'missed'} ({t['values']})")
    for variant in SUGGEST_VARIANTS:
        rule = variant.removeprefix("suggest-")
        for t in summary.get("targets_" + rule, []) if variant != "suggest" else []:
            lines.append(
                f"- {rule} rule, {t['target']}: {'met' if t['met'] else 'missed'} ({t['values']})"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Test Dice vs labelled frames, one panel per data set, mean ± std bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from usfm_core.outputs import save_figure

    items = list(summary["datasets"].items())
    fig, axes = plt.subplots(1, max(1, len(items)), figsize=(4.2 * max(1, len(items)), 3.4))
    axes = np.atleast_1d(axes)
    colours = {
        "suggest": "tab:red",
        "suggest-typical": "tab:orange",
        "suggest-typical-w0": "tab:green",
        "random": "tab:gray",
        "even": "tab:blue",
    }
    for ax, (dataset, entry) in zip(axes, items):
        for strategy, s in entry["strategies"].items():
            x = [r["n_labelled"] for r in s["rounds"]]
            m = np.array([r["mean"] for r in s["rounds"]])
            sd = np.array([r["std"] for r in s["rounds"]])
            c = colours.get(strategy)
            ax.plot(x, m, "o-", color=c, label=f"{strategy} (n={len(s['seeds'])})")
            ax.fill_between(x, m - sd, m + sd, color=c, alpha=0.18)
        ax.set_title(TITLES[dataset])
        ax.set_xlabel("labelled frames")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    scored = "validation" if summary["setting"].get("split") == "val" else "test"
    axes[0].set_ylabel(f"{scored} Dice (mean ± std over seeds)")
    fig.suptitle(f"Active learning ({summary['setting']['name']} setting)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def load_records(results: Path, setting: str) -> list[dict[str, Any]]:
    """Every cached run of ``setting`` (unreadable files skipped)."""
    out = []
    for p in sorted((results / setting).glob("*/*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            print(f"skipped unreadable {p}")
    return out


def write_summary(results: Path, setting: Setting, out: Path, plot_path: Path | None) -> dict:
    """Merge the cached runs into ``out`` (+ ``.md``) and the plot; none of them may replace a
    run file or land among them."""
    from usfm_core.outputs import atomic_write_text, check_outputs

    runs = results / setting.name
    outputs = [out, out.with_suffix(".md"), *([plot_path] if plot_path is not None else [])]
    check_outputs(outputs, [runs, *(p for p in runs.glob("*") if p.is_dir())])
    summary = summarise(load_records(results, setting.name), setting)
    summary["machine_load_at_summary"] = machine_load()
    if plot_path is not None and summary["datasets"]:
        written = plot(summary, plot_path).resolve()
        summary["plot"] = str(
            written.relative_to(REPO) if written.is_relative_to(REPO) else written
        )
    atomic_write_text(out, json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(summary))
    print(markdown(summary))
    return summary


# ---------------------------------------------------------------------------- timing


def time_round(threads: int, out: Path) -> dict[str, Any]:
    """One product round over a 100-frame 256x256 simulated cine (module doc)."""
    import torch

    from usfm_core.finetune.propagate import propagate
    from usfm_core.outputs import atomic_write_text
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(100, seed=7)
    labels = {i: (cine.lesion_masks[i] > 0).astype(np.uint8) for i in (10, 50, 90)}
    rows = []
    for name, size in (("sim-lesion", None), ("openus-small-fast", 128)):
        before = machine_load()
        t0, c0 = time.perf_counter(), time.process_time()
        res = propagate(
            name, cine.frames, labels, steps=30, batch_size=4, smooth=2, input_size=size,
            threads=threads,
        )  # fmt: skip
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(
            {
                "start": name,
                "input_size": int(res.model.input_size),
                "seconds_total": round(total, 1),
                # CPU seconds of all threads: on an idle machine wall ~ cpu / threads
                "cpu_seconds": round(cpu, 1),
                "seconds": {k: round(v, 1) for k, v in res.seconds.items()},
                "target_s": 120,
                "met": total <= 120,
                "load_before": before,
                "load_after": machine_load(),
            }
        )
        print(f"{name}: {total:.1f} s, {cpu:.0f} CPU-s ({res.seconds})", flush=True)
        doc = {
            "what": "propagate: 3 painted frames, 30 steps, batch 4, smooth 2, 100 frames 256x256",
            "threads": threads,
            "torch_threads_outside": torch.get_num_threads(),
            "cpu_cores": os.cpu_count(),
            "rows": rows,
        }
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")  # after every row
    return doc


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="quick")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--summarise", action="store_true", help="merge cached runs, plot")
    parser.add_argument("--out", type=Path, default=None, help="summary JSON")
    parser.add_argument("--plot", type=Path, default=None, help="plot PNG")
    parser.add_argument("--timing", action="store_true", help="time one product round")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    setting = SETTINGS[args.setting]
    if args.timing:
        time_round(args.threads, args.out or TIMING)
        return 0
    default_out = (
        SUMMARY
        if setting.name == "quick"
        else SUMMARY.with_name(f"active_learning_{setting.name}.json")
    )
    if not args.summarise:
        seeds = args.seeds if args.seeds is not None else list(setting.seeds)
        run_grid(setting, args.results_dir, args.datasets, args.strategies, seeds)
        if args.out is None:
            return 0
    plot_path = args.plot or (PLOT if setting.name == "quick" else None)
    write_summary(args.results_dir, setting, args.out or default_out, plot_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
