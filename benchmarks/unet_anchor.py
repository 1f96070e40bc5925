"""A plain U-Net anchor for the shipped segmenters ``breast-lesion`` and ``fetal-head`` (#14).

Trains MONAI's ``BasicUNet`` (2-D, 1 → 1 channel, features 32-32-64-128-256-32, 1.98 M
parameters; the optional ``bench`` extra installs MONAI) or, when MONAI is not installed, the
same network written out here (:class:`PlainUNet`), with the shipped recipe of each model
(``tools/train_shipped_models.sh``): the same train / val / test split (grouped, stratified,
``split_seed`` 0; the test items are checked against the ones the shipped model records), input
size (192² for both models since the 2026-11-30 re-training), optimiser-step budget (epochs ×
batches of 16), AdamW lr 5e-4 with weight decay 5e-2 and a cosine schedule, soft Dice + BCE,
the fine-tuning augmentation (flip, small affine, intensity jitter), best epoch by validation
Dice. Each seed's best model and the shipped model are then scored side by side on the test
split by ``usfm-core evaluate``'s scorer (native resolution, per-class Dice with empty ground
truth ignored, HD95, HC error in mm, failure counts, p10 / median / p90). ``--budget cpu``
trains for the shipped model's fine-tuning CPU time instead of its step count.

    python benchmarks/unet_anchor.py --smoke                  # < 40 s: tiny subsets, 2 steps
    python benchmarks/unet_anchor.py --max-steps 5            # time 5 steps, estimate the full run
    python benchmarks/unet_anchor.py --threads 1              # full: 2 models × 3 seeds
    python benchmarks/unet_anchor.py --budget cpu --seeds 0   # same CPU time as the shipped model

The full run writes ``benchmarks/results/unet_anchor.json`` after every seed (a re-run skips the
seeds already there; ``--fresh`` starts over) and the table ``docs/benchmarks/unet_anchor.md``
(``--doc-only`` rewrites it from the saved JSON).
A run capped by ``--max-steps`` writes ``unet_anchor_timing.json`` and an estimate of the full
run's CPU time; ``--smoke`` writes ``unet_anchor_smoke.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks" / "unet_anchor.md"
FEATURES = (32, 32, 64, 128, 256, 32)  # BasicUNet's default

# The shipped recipe (tools/train_shipped_models.sh finetune) of each model; weight decay,
# patience and augmentation are usfm-core finetune's defaults for segmentation.
RECIPES: dict[str, dict[str, Any]] = {
    "breast-lesion": {"data": "busi", "input_size": 192, "epochs": 16},
    "fetal-head": {"data": "hc18", "input_size": 192, "epochs": 16},
}
# CPU-seconds the shipped model's fine-tuning took (one thread, validation every epoch included;
# the progress bars of the 2026-11-30 re-training: 544 steps in 20 min 43 s, 688 in 23 min 45 s).
# ``--budget cpu`` gives the U-Net this many CPU-seconds of training steps (its validation passes
# come on top, so the anchor gets slightly more than the shipped model had).
SHIPPED_TRAIN_CPU_S: dict[str, float] = {"breast-lesion": 1243.0, "fetal-head": 1425.0}
CALIBRATION_STEPS = 3
COMMON = {"batch_size": 16, "lr": 5e-4, "weight_decay": 5e-2, "patience": 10, "split_seed": 0}
SMOKE = {"n_train": 8, "n_val": 4, "n_test": 4, "input_size": 64, "batch_size": 4, "steps": 2}


# ------------------------------------------------------------------------------- networks
class TwoConv(nn.Sequential):
    """(conv 3×3 → instance norm → LeakyReLU 0.1) × 2: ``(B, C_in, H, W) → (B, C_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int):
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers += [
                nn.Conv2d(c, c_out, 3, padding=1),
                nn.InstanceNorm2d(c_out, affine=True),
                nn.LeakyReLU(0.1, inplace=True),
            ]
        super().__init__(*layers)


class UpCat(nn.Module):
    """Transposed-conv upsampling ×2, concatenation with the skip, :class:`TwoConv`:
    ``(B, C_in, H, W), (B, C_skip, 2H, 2W) → (B, C_out, 2H, 2W)``."""

    def __init__(self, c_in: int, c_skip: int, c_out: int, halves: bool = True):
        super().__init__()
        c_up = c_in // 2 if halves else c_in
        self.up = nn.ConvTranspose2d(c_in, c_up, 2, stride=2)
        self.conv = TwoConv(c_skip + c_up, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class PlainUNet(nn.Module):
    """MONAI ``BasicUNet``'s 2-D architecture (default features, instance norm, LeakyReLU,
    transposed-conv upsampling) without MONAI: ``(B, 1, H, W) → (B, out, H, W)`` logits,
    ``H, W`` divisible by 16."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, features=FEATURES):
        super().__init__()
        f = features
        self.conv_0 = TwoConv(in_channels, f[0])
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), TwoConv(a, b))
            for a, b in ((f[0], f[1]), (f[1], f[2]), (f[2], f[3]), (f[3], f[4]))
        )
        self.ups = nn.ModuleList(
            [
                UpCat(f[4], f[3], f[3]),
                UpCat(f[3], f[2], f[2]),
                UpCat(f[2], f[1], f[1]),
                UpCat(f[1], f[0], f[5], halves=False),
            ]
        )
        self.final_conv = nn.Conv2d(f[5], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.conv_0(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.final_conv(y)


class AnchorSegmenter(nn.Module):
    """A U-Net with the attributes the toolkit's scorers read (``task``, ``n_classes``,
    ``input_size``, ``classes``): ``(B, 1, S, S)`` normalised frames → ``(B, 1, S, S)``
    logits."""

    task = "segmentation"
    n_classes = 1

    def __init__(self, net: nn.Module, input_size: int):
        super().__init__()
        self.net, self.input_size, self.classes = net, input_size, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def monai_version() -> str | None:
    """MONAI's version when it is installed (the ``bench`` extra), else None."""
    if importlib.util.find_spec("monai") is None:
        return None
    import monai

    return str(monai.__version__)


def build_unet(arch: str, input_size: int) -> tuple[AnchorSegmenter, str]:
    """The anchor network: ``"monai"`` (``BasicUNet``), ``"plain"`` (:class:`PlainUNet`) or
    ``"auto"`` (MONAI when installed); returns the model and a description."""
    if arch == "auto":
        arch = "monai" if monai_version() else "plain"
    if arch == "monai":
        if monai_version() is None:
            raise SystemExit("MONAI is not installed: pip install 'napari-usfm[bench]'")
        from monai.networks.nets import BasicUNet

        net: nn.Module = BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=FEATURES)
        what = f"MONAI {monai_version()} BasicUNet"
    elif arch == "plain":
        net, what = PlainUNet(), "PlainUNet (BasicUNet's architecture, no MONAI)"
    else:
        raise SystemExit(f"unknown --arch {arch!r}: auto, monai or plain")
    return AnchorSegmenter(net, input_size), f"{what}, features {'-'.join(map(str, FEATURES))}"


# ---------------------------------------------------------------------------------- data
def _shipped_tool():
    """``tools/shipped_models.py`` (how the shipped models' data folders are prepared)."""
    spec = importlib.util.spec_from_file_location(
        "shipped_models", ROOT / "tools" / "shipped_models.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_task(name: str, shared: Path, work: Path):
    """The shipped model's labelled set and its train / val / test indices.

    HC18 gets the per-subject ``group`` column the shipped recipe adds
    (``tools/shipped_models.py prepare``, links under ``work``). The split is
    ``usfm-core finetune``'s (grouped, stratified, ``split_seed`` 0); its test items must be
    the ones the shipped model recorded (``config.json`` ``extra.test_items``).
    """
    from usfm_core.finetune.data import LabelledSet, resolve_splits
    from usfm_core.models.zoo import find_model

    src = shared / RECIPES[name]["data"]
    folder = _shipped_tool().prepare_hc18(src, work / "hc18") if src.name == "hc18" else src
    data = LabelledSet.from_folder(folder, "segmentation")
    data.resolve_mask_classes()
    splits, _ = resolve_splits(data, split_seed=COMMON["split_seed"])
    recorded = (find_model(name).config.get("extra") or {}).get("test_items")
    test_keys = [data.items[i].key for i in splits["test"]]
    if recorded is not None and sorted(recorded) != sorted(test_keys):
        raise SystemExit(f"{name}: the split differs from the shipped model's test items")
    return data, splits


# ------------------------------------------------------------------------------ training
def train_anchor(
    model: AnchorSegmenter,
    data,
    splits: dict[str, list[int]],
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    max_steps: int | None = None,
    cpu_budget_s: float | None = None,
) -> dict[str, Any]:
    """``usfm-core finetune``'s segmentation loop for ``model``: AdamW, cosine schedule over
    ``epochs × batches`` steps, soft Dice + BCE, augmentation, validation every epoch, the
    best epoch by validation Dice (then lower loss), early stop after ``patience`` epochs.

    With ``cpu_budget_s`` the step budget is instead what fits in that many CPU-seconds of
    training: the first :data:`CALIBRATION_STEPS` steps are timed (process CPU time, batch
    loading included) and the cosine schedule is planned over ``budget / CPU-s per step`` steps
    (at least the calibration steps), for as many epochs as that takes.

    Returns ``{"steps", "steps_planned", "best_epoch", "val", "cpu_s", "wall_s",
    "s_per_step", "cpu_s_per_step"}`` (wall and CPU seconds per training step, batch
    loading included); ``model`` ends with the best epoch's weights.
    """
    from usfm_core.finetune.data import SupervisedDataset, training_loader
    from usfm_core.finetune.train import evaluate_split, segmentation_loss, selection_score

    torch.manual_seed(seed)
    size = model.input_size
    train_ds = SupervisedDataset(
        data, splits["train"], "segmentation", size, augment=True, seed=seed
    )
    val_ds = SupervisedDataset(data, splits["val"], "segmentation", size)
    loader = training_loader(train_ds, batch_size, seed)
    # With a CPU budget this first plan is provisional: it only shapes the calibration steps'
    # lr (the schedule reads ``planned`` when called, so re-planning re-shapes the rest).
    planned = epochs * len(loader)
    total = planned if max_steps is None else min(max_steps, planned)
    opt = torch.optim.AdamW(
        model.parameters(), lr=COMMON["lr"], weight_decay=COMMON["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, planned) / max(planned, 1)))
    )
    best, best_state, best_epoch, best_val, stale, step = (-math.inf,), None, 0, {}, 0, 0
    cpu0, wall0, train_wall, train_cpu = time.process_time(), time.perf_counter(), 0.0, 0.0
    # A CPU budget ends the run by its step count, however many epochs that takes.
    epoch_numbers = range(1, epochs + 1) if cpu_budget_s is None else itertools.count(1)
    for epoch in epoch_numbers:
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        for x, y in loader:
            if step >= total:
                break
            loss = segmentation_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if cpu_budget_s is not None and step == CALIBRATION_STEPS:
                per_step = (time.process_time() - cpu0) / step
                planned = max(step, int(cpu_budget_s / per_step))
                total = planned if max_steps is None else min(max_steps, planned)
                print(f"  {per_step:.2f} CPU-s / step: {planned} steps fit", flush=True)
        train_wall += time.perf_counter() - t0
        train_cpu += time.process_time() - c0
        val = evaluate_split(model, val_ds, "segmentation", batch_size, "cpu")
        score = selection_score("segmentation", val)
        if score > best:
            best, best_epoch, best_val, stale = score, epoch, val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        print(f"  epoch {epoch}: step {step}/{total}, val Dice {val['dice']:.3f}", flush=True)
        if step >= total or stale >= COMMON["patience"]:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    return {
        "steps": step,
        "steps_planned": planned,
        "cpu_budget_s": cpu_budget_s,
        "best_epoch": best_epoch,
        "val": best_val,
        "cpu_s": round(time.process_time() - cpu0, 1),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "s_per_step": round(train_wall / max(step, 1), 3),
        "cpu_s_per_step": round(train_cpu / max(step, 1), 3),
    }


def score(model: nn.Module, data, indices: list[int]) -> dict[str, Any]:
    """``usfm-core evaluate``'s clean metrics of ``model`` on ``indices`` (native resolution)."""
    from usfm_core.evaluate.report import score_items

    return score_items(model, data, indices, batch_size=8)


# ------------------------------------------------------------------------------- reports
def machine() -> dict[str, Any]:
    """Where and under which load it ran: ``uptime``, load average, threads, versions."""
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    except OSError:
        up = ""
    return {
        "uptime": up.strip(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "monai": monai_version(),
    }


def summarise(seeds: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean ± std over seeds of every numeric test metric (``{key: {mean, std, n}}``)."""
    from usfm_core.evaluate.metrics import aggregate_runs

    return aggregate_runs([s["test"] for s in seeds.values()])


KEYS = [
    ("dice", "Dice", True),
    ("dice_p10", "Dice p10", True),
    ("n_dice_below_0.5", "Dice<0.5", False),
    ("n_fp_on_empty_gt", "FP on empty GT", False),
    ("hd95_p90", "HD95 p90", False),
    ("hc_error_mm", "HC err (mm)", False),
    ("n_hc_error_over_10mm", "HC err>10 mm", False),
]


def table(results: dict[str, Any], steps: bool = False) -> list[str]:
    """Markdown rows: per model, the shipped model and the anchor (mean ± std over seeds);
    ``steps`` adds the anchor's optimiser steps (mean over seeds)."""
    extra = " train steps |" if steps else ""
    lines = [
        "| model | arm | seeds | n test | "
        + " | ".join(k[1] for k in KEYS)
        + " | train CPU-s |"
        + extra,
        "|---" * (len(KEYS) + 5 + int(steps)) + "|",
    ]
    for name, res in results["models"].items():
        shipped, seeds = res.get("shipped") or {}, res.get("anchor") or {}
        n = res.get("n_test", "–")

        def cell(m: dict[str, Any], key: str, pct: bool) -> str:
            v = m.get(key)
            if v is None or (isinstance(v, float) and not np.isfinite(v)):
                return "–"
            return f"{100 * v:.1f}" if pct else (f"{v:.1f}" if isinstance(v, float) else str(v))

        row = [cell(shipped, k, pct) for k, _, pct in KEYS]
        lines.append(
            f"| {name} | shipped | – | {n} | "
            + " | ".join(row)
            + " | – |"
            + (" – |" if steps else "")
        )
        if seeds:
            agg = summarise(seeds)
            cells = []
            for k, _, pct in KEYS:
                if k not in agg:
                    cells.append("–")
                    continue
                m, s, f = agg[k]["mean"], agg[k]["std"], 100 if pct else 1
                cells.append(f"{f * m:.1f} ± {f * s:.1f}")
            cpu = np.mean([s["train"]["cpu_s"] for s in seeds.values()])
            n_steps = np.mean([s["train"]["steps"] for s in seeds.values()])
            lines.append(
                f"| {name} | U-Net | {len(seeds)} | {n} | "
                + " | ".join(cells)
                + f" | {cpu:.0f} |"
                + (f" {n_steps:.0f} |" if steps else "")
            )
    return lines


def write_doc(
    results: dict[str, Any],
    timing: dict[str, Any] | None,
    path: Path,
    cpu: dict[str, Any] | None = None,
) -> None:
    """``docs/benchmarks/unet_anchor.md``: method, commands, the table (same steps), the table
    at the same CPU budget (``cpu``: the ``--budget cpu`` results), the timing estimate."""
    import re

    from usfm_core.utils import atomic_write_text

    text = re.sub(r":class:`(\w+)`", r"`\1`", (__doc__ or "").replace("``", "`"))
    head = text.split("\n\n")
    lines = [
        "# Plain U-Net anchor vs the shipped segmenters",
        "",
        " ".join(head[1].split()),
        "",
        "```",
        *[ln.strip() for ln in head[2].strip().splitlines()],
        "```",
        "",
    ]
    full = results.get("mode") == "full"
    if full and any(r.get("anchor") for r in results.get("models", {}).values()):
        m = results["machine"]
        lines += [
            f"Test split, clean; Dice in %, HD95 in mm (HC18) or px (BUSI); {results['arch']}, "
            f"{results['params']:,} parameters; torch threads {m['torch_threads']}; "
            f"`uptime` at the start: {m['uptime']}.",
            "",
            *table(results),
            "",
        ]
    else:
        lines += ["The full multi-seed run has not been made yet (see the estimate below).", ""]
    if cpu and any(r.get("anchor") for r in cpu.get("models", {}).values()):
        m = cpu["machine"]
        budget = ", ".join(f"{k} {v / 60:.1f} min" for k, v in SHIPPED_TRAIN_CPU_S.items())
        lines += [
            "## At the same CPU budget (`--budget cpu`)",
            "",
            "The U-Net gets the CPU-seconds of training steps that the shipped model's whole "
            f"fine-tuning took on one thread ({budget}; the cosine schedule is planned over the "
            "steps that fit, measured on the first steps; its validation passes come on top). "
            f"{cpu['arch']}; torch threads {m['torch_threads']}; `uptime` at the start: "
            f"{m['uptime']}.",
            "",
            *table(cpu, steps=True),
            "",
        ]
    if timing:
        lines += ["## Timing of a short run and estimate of the full run", "", *timing_md(timing)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def timing_md(timing: dict[str, Any]) -> list[str]:
    """Lines describing the measured seconds per step and the full run's estimate."""
    lines = [
        f"Measured with `--max-steps {timing['max_steps']}` ({timing['arch']}; "
        f"`uptime`: {timing['machine']['uptime']}):",
        "",
        "| model | input | CPU-s / step | wall-s / step | steps planned | val + test (CPU-s) "
        "| est. per seed (CPU-min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in timing["models"].items():
        lines.append(
            f"| {name} | {t['input_size']}² | {t['s_per_step']:.2f} | {t['wall_s_per_step']:.2f} "
            f"| {t['steps_planned']} | "
            f"{t['eval_s']:.0f} | {t['est_per_seed_s'] / 60:.0f} |"
        )
    lines += [
        "",
        f"Estimated full run ({timing['n_seeds']} seeds × {len(timing['models'])} models): "
        f"{timing['est_total_s'] / 3600:.1f} CPU-hours of one thread (a dedicated core; the "
        "machine was shared and loaded, so wall time was longer, see the wall-s column).",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------- main
def run_model(name: str, args: argparse.Namespace, results: dict[str, Any], save) -> dict[str, Any]:
    """Train and score the anchor for each seed of ``name`` (skipping seeds already in
    ``results``) and score the shipped model on the same test items."""
    from usfm_core.finetune.models import load_finetuned

    recipe = {**RECIPES[name], **COMMON}
    data, splits = load_task(name, args.shared, args.work)
    if args.smoke:
        splits = {k: splits[k][: SMOKE[f"n_{k}"]] for k in ("train", "val", "test")}
        recipe.update(input_size=SMOKE["input_size"], batch_size=SMOKE["batch_size"], epochs=1)
    res = results["models"].setdefault(name, {})
    res.update(
        recipe=recipe,
        n_train=len(splits["train"]),
        n_val=len(splits["val"]),
        n_test=len(splits["test"]),
    )
    if "shipped" not in res:
        t0 = time.perf_counter()
        res["shipped"] = score(load_finetuned(name)[0], data, splits["test"])
        res["shipped_eval_s"] = round(time.perf_counter() - t0, 1)
        save()
    seeds = res.setdefault("anchor", {})
    for seed in args.seeds:
        if str(seed) in seeds:
            print(f"{name} seed {seed}: done before, kept")
            continue
        print(f"{name} seed {seed}: training {results['arch']}", flush=True)
        model, _ = build_unet(args.arch, recipe["input_size"])
        train = train_anchor(
            model,
            data,
            splits,
            seed=seed,
            epochs=recipe["epochs"],
            batch_size=recipe["batch_size"],
            max_steps=SMOKE["steps"] if args.smoke else args.max_steps,
            cpu_budget_s=SHIPPED_TRAIN_CPU_S[name] if args.budget == "cpu" else None,
        )
        t0, c0 = time.perf_counter(), time.process_time()
        test = score(model, data, splits["test"])
        train["test_eval_s"] = round(time.perf_counter() - t0, 1)
        train["test_eval_cpu_s"] = round(time.process_time() - c0, 1)
        seeds[str(seed)] = {"train": train, "test": test}
        print(f"{name} seed {seed}: test Dice {test['dice']:.3f} ({train['cpu_s']} CPU-s)")
        save()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arch", default="auto", help="auto (MONAI when installed) | monai | plain")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "unet_anchor")
    ap.add_argument("--out", type=Path, help="results JSON (default: by mode, see above)")
    ap.add_argument("--doc", type=Path, help="markdown table (default: the full run's doc)")
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, 2 steps, 64² input")
    ap.add_argument("--max-steps", type=int, help="cap the steps of each seed (timing run)")
    ap.add_argument(
        "--budget",
        choices=["steps", "cpu"],
        default="steps",
        help="steps: the shipped recipe's optimiser steps (default); cpu: the CPU-seconds the "
        "shipped model's training took (SHIPPED_TRAIN_CPU_S), results in unet_anchor_cpu.json",
    )
    ap.add_argument("--fresh", action="store_true", help="ignore seeds already in --out")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--doc-only",
        action="store_true",
        help="rewrite the doc from the saved results (full run and timing JSON), no training",
    )
    args = ap.parse_args(argv)
    if args.doc_only:
        return rewrite_doc(args.doc or DOC)
    torch.set_num_threads(args.threads)
    mode = "smoke" if args.smoke else ("timing" if args.max_steps else "full")
    if mode == "full" and args.budget == "cpu":
        mode = "cpu"
    n_seeds_full = len(args.seeds)
    if mode in ("smoke", "timing"):
        args.seeds = args.seeds[:1]  # a smoke or timing run trains one seed per model
    out = (
        args.out
        or RESULTS_DIR
        / {
            "full": "unet_anchor.json",
            "cpu": "unet_anchor_cpu.json",
            "smoke": "unet_anchor_smoke.json",
            "timing": "unet_anchor_timing.json",
        }[mode]
    )
    from usfm_core.utils import atomic_write_text

    model, arch = build_unet(args.arch, 64)
    results: dict[str, Any] = {}
    if mode in ("full", "cpu") and out.is_file() and not args.fresh:
        results = json.loads(out.read_text())
        if results.get("arch") != arch:
            raise SystemExit(f"{out} was made with {results.get('arch')}; pass --fresh")
    results.update(
        benchmark="unet_anchor",
        mode=mode,
        arch=arch,
        params=sum(p.numel() for p in model.parameters()),
        machine=results.get("machine") or machine(),
        machine_last=machine(),
    )
    results.setdefault("models", {})
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["machine_last"] = machine()
        atomic_write_text(out, json.dumps(results, indent=1))

    for name in args.models:
        run_model(name, args, results, save)
    save()
    timing = estimate(results, n_seeds_full) if mode == "timing" else None
    if timing:
        results["estimate"] = timing
        save()
    print("\n".join(table(results)))
    if timing:
        print("\n".join(timing_md(timing)))
    if args.doc is not None:
        write_doc(results, timing, args.doc)
        print(f"wrote {args.doc}")
    elif mode in ("full", "cpu", "timing"):
        rewrite_doc(DOC)  # the full run's table (if any) and the latest estimate
    print(f"wrote {out}")
    return 0


def rewrite_doc(doc: Path) -> int:
    """The doc from ``unet_anchor.json`` (when the full run exists), ``unet_anchor_cpu.json``
    (the equal-CPU run) and the timing run's estimate (``unet_anchor_timing.json``)."""
    full, timing = RESULTS_DIR / "unet_anchor.json", RESULTS_DIR / "unet_anchor_timing.json"
    results = json.loads(full.read_text()) if full.is_file() else {}
    est = json.loads(timing.read_text()).get("estimate") if timing.is_file() else None
    cpu_file = RESULTS_DIR / "unet_anchor_cpu.json"
    cpu = json.loads(cpu_file.read_text()) if cpu_file.is_file() else None
    write_doc(results, est, doc, cpu)
    print(f"wrote {doc}")
    return 0


def estimate(results: dict[str, Any], n_seeds: int) -> dict[str, Any]:
    """Full-run time from a ``--max-steps`` run, in CPU-seconds of this process (what one
    dedicated core would take; wall time on a loaded machine is longer): per model, planned
    steps × measured CPU-s / step + the validation passes (one per epoch, each timed as the
    short run's CPU time minus its training) + the test scoring, times ``n_seeds``."""
    models = {}
    for name, res in results["models"].items():
        seed = next(iter(res["anchor"].values()))["train"]
        epochs = res["recipe"]["epochs"]
        train_cpu = seed["cpu_s_per_step"] * seed["steps"]
        val_s = max(seed["cpu_s"] - train_cpu, 0.0)  # the one validation pass of the short run
        eval_s = val_s * epochs + seed["test_eval_cpu_s"]
        models[name] = {
            "input_size": res["recipe"]["input_size"],
            "s_per_step": seed["cpu_s_per_step"],
            "wall_s_per_step": seed["s_per_step"],
            "steps_planned": seed["steps_planned"],
            "eval_s": eval_s,
            "est_per_seed_s": seed["cpu_s_per_step"] * seed["steps_planned"] + eval_s,
        }
    return {
        "max_steps": max(
            next(iter(r["anchor"].values()))["train"]["steps"] for r in results["models"].values()
        ),
        "arch": results["arch"],
        "machine": results["machine"],
        "n_seeds": n_seeds,
        "models": models,
        "est_total_s": n_seeds * sum(m["est_per_seed_s"] for m in models.values()),
    }


if __name__ == "__main__":
    sys.exit(main())
