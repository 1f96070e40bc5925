"""Label efficiency on BUSI segmentation, and segmentation inference speed / memory on a cine.

Part 1 (``label``): pre-train a ``tiny`` OpenUS model once on unlabelled images (HC18 plus the
BUSI *train and validation* images only, so the test images are never seen), then fine-tune the
pretrained backbone and a from-scratch backbone of the same architecture on BUSI lesion
segmentation with 20 / 40 / 100 % of the training labels. Splits are grouped by ``dup_group``
and fixed (``split_seed`` 0); both arms use the same recipe, seeds and optimiser-step budget.
Reports test Dice / IoU as mean ± std over seeds.

Part 2 (``inference``): write a 1000-frame 512×512 cine to a TIFF (a few distinct simulated
frames repeated), then stream it lazily (``load_scan(...).iter_frames()``) through
``segment_frames`` with ``tiny``, ``small-cpu`` and ``small-fast`` segmenters, at the
fine-tuning size and at 256×256. Each measurement runs in a fresh subprocess, so its peak
RSS is not polluted by the training above. Targets (issue 6): ≥ 20 frames/s at 256×256
and ≤ 2 GB peak memory for the 1000-frame cine.

    python benchmarks/label_efficiency.py --quick     # minutes on a 2-core CPU
    python benchmarks/label_efficiency.py             # the full setting (~3-5 h on 2 cores)
    python benchmarks/label_efficiency.py --quick --parts inference

Prints the tables and writes ``benchmarks/results/label_efficiency.json`` (``--out``), updated
after every fine-tuning run, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "label_efficiency.json"
REPO = Path(__file__).resolve().parents[1]
# The real data beside the checkout (as CI has it), or $USFM_SHARED_DATA.
DATA = Path(os.environ.get("USFM_SHARED_DATA") or REPO.parent / "shared" / "data")


@dataclass
class Setting:
    """Sizes and budgets of one benchmark setting (``quick`` or ``full``)."""

    name: str
    pretrain_steps: int
    pretrain_batch: int
    pretrain_global: int  # global view side (px); local views are 32 px
    ft_size: int  # fine-tuning input side, divisible by 32
    ft_steps: int  # optimiser steps per fine-tuning run, whatever the label ratio
    ft_batch: int
    lr: float
    seeds: list[int]
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 1.0])
    cine_frames: int = 1000
    cine_side: int = 512
    # Wall-clock cap per inference measurement (s); 0 = stream the whole cine.
    infer_max_s: float = 0.0
    # Backbone of both arms: "tiny" (pre-trained here with the settings above) or a preset
    # whose pre-training preset of the same name runs unchanged (or is reused, --pretrained).
    preset: str = "tiny"


SETTINGS = {
    "quick": Setting(
        name="quick",
        pretrain_steps=100,
        pretrain_batch=4,
        pretrain_global=64,
        ft_size=64,
        ft_steps=150,
        ft_batch=16,
        lr=1e-3,
        seeds=[0, 1],
        infer_max_s=30.0,
    ),
    "full": Setting(
        name="full",
        pretrain_steps=2000,
        pretrain_batch=8,
        pretrain_global=64,
        ft_size=96,
        ft_steps=600,
        ft_batch=16,
        lr=1e-3,
        seeds=[0, 1, 2],
    ),
    # The shipped models' backbone: VMamba small-fast pre-trained by `usfm-core pretrain
    # --config small-fast` (2000 steps; reuse the shipped run with --pretrained).
    "shipped": Setting(
        name="shipped",
        pretrain_steps=2000,
        pretrain_batch=16,
        pretrain_global=128,
        ft_size=128,
        ft_steps=200,
        ft_batch=16,
        lr=5e-4,
        seeds=[0],
        preset="small-fast",
    ),
    # Seconds-long check that every code path runs (tests); its numbers mean nothing.
    "smoke": Setting(
        name="smoke",
        pretrain_steps=2,
        pretrain_batch=2,
        pretrain_global=64,
        ft_size=64,
        ft_steps=2,
        ft_batch=8,
        lr=5e-4,
        seeds=[0],
        ratios=[0.2],
        cine_frames=24,
        cine_side=128,
        infer_max_s=5.0,
    ),
}


# Segmenters timed on the long cine: the test size, the earlier CPU preset, the shipped one.
INFER_PRESETS = ("tiny", "small-cpu", "small-fast")


# ------------------------------------------------------------------------------ part 1: labels
def pretrain_folder(busi: Any, keep: list[int], hc18: Path, root: Path) -> Path:
    """A data root for pre-training: ``busi/`` (links to the ``keep`` images) and ``hc18/``.

    ``busi`` is a :class:`~usfm_core.finetune.data.LabelledSet`; its test images are left out
    so self-supervised pre-training never sees them.
    """
    folder = root / "pretrain_data"
    (folder / "busi").mkdir(parents=True, exist_ok=True)
    for i in keep:
        image = Path(busi.items[i].image)
        link = folder / "busi" / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    hc18_link = folder / "hc18"
    if not hc18_link.exists():
        hc18_link.symlink_to(hc18.resolve(), target_is_directory=True)
    return folder


def run_pretraining(setting: Setting, data_root: Path, out_dir: Path) -> tuple[Path, float]:
    """Pre-train ``tiny`` OpenUS for ``setting.pretrain_steps``; ``(run dir, seconds)``.

    The schedules (teacher temperature, learning rate, EMA) span exactly the steps run.
    """
    from usfm_core.pretrain import load_config, pretrain

    if setting.preset != "tiny":
        cfg = load_config(setting.preset, ["device=cpu"])
        t0 = time.perf_counter()
        run = pretrain(cfg, data_root, out_dir)
        return Path(run), time.perf_counter() - t0
    cfg = load_config(
        "tiny",
        [
            "epochs=1",
            f"steps_per_epoch={setting.pretrain_steps}",
            f"batch_size={setting.pretrain_batch}",
            f"views.global_size={setting.pretrain_global}",
            "views.local_size=32",
            "device=cpu",
            f"log_every={max(setting.pretrain_steps // 10, 1)}",
            f"save_every={setting.pretrain_steps}",
        ],
    )
    t0 = time.perf_counter()
    run = pretrain(cfg, data_root, out_dir, max_steps=setting.pretrain_steps)
    return Path(run), time.perf_counter() - t0


def finetune_one(
    setting: Setting,
    busi: Any,
    splits: dict[str, list[int]],
    ckpt: Path | None,
    ratio: float,
    seed: int,
    out_dir: Path,
) -> dict[str, Any]:
    """One fine-tuning run (pretrained when ``ckpt`` is given, else scratch); its record.

    Every run takes ``setting.ft_steps`` optimiser steps (epochs are made long enough and
    early stopping is off), so a smaller label ratio means more passes over fewer images,
    not less training.
    """
    from usfm_core.finetune.train import finetune

    n_train = max(1, round(len(splits["train"]) * ratio))
    steps_per_epoch = max(1, math.ceil(n_train / setting.ft_batch))
    epochs = math.ceil(setting.ft_steps / steps_per_epoch) + 1
    t0 = time.perf_counter()
    res = finetune(
        "segmentation",
        busi,
        out_dir,
        backbone_ckpt=ckpt,
        backbone_preset=setting.preset,
        label_ratio=ratio,
        seed=seed,
        split_seed=0,
        splits=splits,
        epochs=epochs,
        max_steps=setting.ft_steps,
        patience=epochs,
        lr=setting.lr,
        batch_size=setting.ft_batch,
        input_size=setting.ft_size,
        device="cpu",
    )
    return {
        "init": "pretrained" if ckpt is not None else "scratch",
        "label_ratio": ratio,
        "seed": seed,
        "n_train": res.n_train,
        "best_epoch": res.best_epoch,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_dice": res.val_metrics.get("dice"),
        "test_dice": res.test_metrics.get("dice"),
        "test_iou": res.test_metrics.get("iou"),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of test Dice / IoU per (init, label ratio)."""
    from usfm_core.evaluate.metrics import aggregate_runs

    rows = []
    for init in ("pretrained", "scratch"):
        for ratio in sorted({r["label_ratio"] for r in runs}):
            group = [r for r in runs if r["init"] == init and r["label_ratio"] == ratio]
            if not group:
                continue
            agg = aggregate_runs([{"dice": r["test_dice"], "iou": r["test_iou"]} for r in group])
            rows.append(
                {
                    "init": init,
                    "label_ratio": ratio,
                    "n_train": group[0]["n_train"],
                    "seeds": len(group),
                    "dice_mean": agg["dice"]["mean"],
                    "dice_std": agg["dice"]["std"],
                    "iou_mean": agg["iou"]["mean"],
                    "iou_std": agg["iou"]["std"],
                }
            )
    return rows


def label_part(
    setting: Setting, work: Path, report: dict[str, Any], save, pretrained: Path | None = None
) -> None:
    """Pre-train once (or reuse ``pretrained``, a pretrain run folder), then the
    pretrained-vs-scratch × ratio × seed grid (fills ``report``)."""
    from usfm_core.finetune.data import LabelledSet, make_splits

    busi = LabelledSet.from_folder(DATA / "busi", "segmentation")
    splits = make_splits(busi.labels, busi.groups, seed=0)
    if pretrained is not None:
        run_dir, seconds = pretrained, None
        print(f"reusing the pre-trained run {run_dir}", flush=True)
    else:
        data_root = pretrain_folder(busi, splits["train"] + splits["val"], DATA / "hc18", work)
        print(f"pre-training {setting.preset} OpenUS ...", flush=True)
        run_dir, seconds = run_pretraining(setting, data_root, work / "pretrain")
    local = "2x32²" if setting.preset == "tiny" else f"4x{setting.pretrain_global // 2}²"
    report["pretrain"] = {
        "run": str(run_dir),
        "steps": setting.pretrain_steps,
        "batch": setting.pretrain_batch,
        "views": f"2x{setting.pretrain_global}² + {local}",
        "backbone": setting.preset,
        "images": f"BUSI train+val ({len(splits['train']) + len(splits['val'])}) + HC18",
        "seconds": round(seconds, 1) if seconds is not None else None,
    }
    report["splits"] = {k: len(v) for k, v in splits.items()}
    # Runs of the ratios re-run now are replaced; those of other ratios (--ratios) are kept.
    report["runs"] = [r for r in report.get("runs", []) if r["label_ratio"] not in setting.ratios]
    save()
    for ratio in setting.ratios:
        for seed in setting.seeds:
            for ckpt in (run_dir / "backbone", None):
                name = f"{'pre' if ckpt else 'scratch'}_r{ratio:g}_s{seed}"
                rec = finetune_one(setting, busi, splits, ckpt, ratio, seed, work / "ft" / name)
                print(
                    f"  {rec['init']:<10} {100 * ratio:>4.0f} %  seed {seed}: "
                    f"test Dice {rec['test_dice']:.3f}  ({rec['seconds']:.0f} s)",
                    flush=True,
                )
                report["runs"].append(rec)
                report["table"] = summarise(report["runs"])
                save()


# --------------------------------------------------------------------------- part 2: inference
def write_cine(path: Path, n_frames: int, side: int, n_distinct: int = 20) -> Path:
    """A ``(n_frames, side, side)`` uint8 TIFF: ``n_distinct`` simulated frames, repeated."""
    import numpy as np

    from usfm_core.io.writers import write_tiff
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_distinct, seed=0, height=side, width=side)
    reps = math.ceil(n_frames / n_distinct)
    frames = np.tile(cine.frames, (reps,) + (1,) * (cine.frames.ndim - 1))[:n_frames]
    return write_tiff(path, frames, spacing_mm=cine.spacing_mm, fps=cine.fps)


def measure_inference(
    cine: Path,
    preset: str,
    input_size: int,
    max_seconds: float,
    batch_size: int = 4,
    threads: int | None = None,
) -> dict[str, Any]:
    """Frames/s and peak RSS of ``segment_frames`` over ``cine``, in a fresh subprocess.

    ``threads``: torch CPU threads in the worker (None: torch's default, one per core).
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(
            {
                "cine": str(cine),
                "preset": preset,
                "input_size": input_size,
                "max_seconds": max_seconds,
                "batch_size": batch_size,
                "threads": threads,
            }
        ),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"inference worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there because the kernel carries the parent's
    RSS at fork over into the child's ``ru_maxrss`` across ``exec``, so a child spawned by a
    big parent would report the parent's size. Elsewhere ``ru_maxrss`` (KiB on Linux/BSD).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Stream the cine through a randomly initialised segmenter; speed and memory.

    Frames are read lazily one by one (the whole cine is never in memory). Weights do not
    change speed or memory, so an untrained model stands in for a fine-tuned one.
    """
    import os

    import torch

    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import Segmenter, build_backbone
    from usfm_core.io import load_scan

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = Segmenter(build_backbone(spec["preset"]), 1).eval()
    model.input_size = spec["input_size"]
    n_params = sum(p.numel() for p in model.parameters())
    rss_start = _peak_rss_mb()
    done, fg = 0, 0.0
    with load_scan(spec["cine"]) as scan:
        n_total = scan.n_frames
        frame_shape = list(scan.frame_shape)
        # Warm-up batch (first-call allocations), not timed: a long cine amortises it.
        warm = [scan.frame(i) for i in range(min(spec["batch_size"], n_total))]
        for _ in segment_frames(model, warm, batch_size=spec["batch_size"]):
            pass
        t0 = time.perf_counter()
        for mask in segment_frames(model, scan.iter_frames(), batch_size=spec["batch_size"]):
            done += 1
            fg += float(mask.mean())
            if spec["max_seconds"] and time.perf_counter() - t0 > spec["max_seconds"]:
                if done % spec["batch_size"] == 0:
                    break
        seconds = time.perf_counter() - t0
    return {
        "preset": spec["preset"],
        "params_M": round(n_params / 1e6, 2),
        "input_size": spec["input_size"],
        "frame_shape": frame_shape,
        "frames": done,
        "frames_total": n_total,
        "complete": done == n_total,
        "seconds": round(seconds, 2),
        "fps": round(done / seconds, 2),
        "rss_after_load_mb": round(rss_start, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        # 1-min load average at the end: > cores means other jobs competed for the CPU.
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "mean_foreground": round(fg / max(done, 1), 4),
    }


def inference_part(
    setting: Setting,
    work: Path,
    report: dict[str, Any],
    save,
    threads: list[int | None] | None = None,
    presets: tuple[str, ...] = INFER_PRESETS,
) -> None:
    """Write the cine, then one subprocess per (threads, preset, input size) (fills ``report``)."""
    cine_path = work / "cine.tif"
    t0 = time.perf_counter()
    write_cine(cine_path, setting.cine_frames, setting.cine_side)
    report["cine"] = {
        "frames": setting.cine_frames,
        "side": setting.cine_side,
        "file_mb": round(cine_path.stat().st_size / 2**20, 1),
        "write_s": round(time.perf_counter() - t0, 1),
    }
    report["inference"] = []
    for n_threads in threads or [None]:
        for preset in presets:
            for size in sorted({setting.ft_size, 256}):
                # The first measurement always streams the whole cine: it is the memory check.
                first = preset == "tiny" and size == min(setting.ft_size, 256)
                cap = 0.0 if first else setting.infer_max_s
                rec = measure_inference(cine_path, preset, size, cap, threads=n_threads)
                print(
                    f"  {preset:<9} @{size:>3}, {rec['threads']} threads: {rec['fps']:6.1f} "
                    f"frames/s over {rec['frames']} frames, peak RSS {rec['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
                report["inference"].append(rec)
                save()


# ------------------------------------------------------------------------------------ output
def format_tables(report: dict[str, Any]) -> str:
    """Markdown tables of the label-efficiency summary and the inference measurements."""
    lines = []
    if report.get("table"):
        lines += [
            "| init | labels | train images | seeds | test Dice | test IoU |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["table"]:
            lines.append(
                f"| {r['init']} | {100 * r['label_ratio']:.0f} % | {r['n_train']} | {r['seeds']} "
                f"| {r['dice_mean']:.3f} ± {r['dice_std']:.3f} "
                f"| {r['iou_mean']:.3f} ± {r['iou_std']:.3f} |"
            )
        lines.append("")
    if report.get("inference"):
        lines += [
            "| segmenter | params | input | threads | frames | frames/s | peak RSS (MiB) | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["inference"]:
            frames = f"{r['frames']}/{r['frames_total']}"
            lines.append(
                f"| {r['preset']} | {r['params_M']:.2f} M | {r['input_size']}² | {r['threads']} "
                f"| {frames} | {r['fps']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {r.get('load_avg_1min', float('nan')):.1f} |"
            )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "shared 2-core CPU box; other jobs were running at the same time",
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes-long setting")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), default=None, help="overrides --quick"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("label", "inference"),
        default=["label", "inference"],
        help="which parts to run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs here (else temp)")
    parser.add_argument(
        "--pretrained", type=Path, default=None, help="reuse this pretrain run folder"
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=None, help="label ratios (default 0.2 0.4 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--infer-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch threads of the inference measurements, e.g. 2 1 (default: torch's)",
    )
    parser.add_argument(
        "--infer-presets",
        nargs="+",
        default=list(INFER_PRESETS),
        help=f"VMamba presets of the timed segmenters (default: {' '.join(INFER_PRESETS)})",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(inference_worker(json.loads(args.worker))))
        return 0
    if "label" in args.parts and not (DATA / "busi" / "manifest.csv").is_file():
        print(f"error: BUSI not found under {DATA}; the label part needs it", file=sys.stderr)
        return 2

    setting = SETTINGS[args.setting or ("quick" if args.quick else "full")]
    if args.ratios:
        if not all(0 < r <= 1 for r in args.ratios):
            parser.error("--ratios must lie in (0, 1]")
        setting = replace(setting, ratios=sorted(args.ratios))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"setting": asdict(setting), "meta": machine_info()}
    if args.out.is_file():  # keep the parts not re-run now from an earlier run of this setting
        old = json.loads(args.out.read_text(encoding="utf-8"))
        if old.get("setting", {}).get("name") == setting.name:
            report = {**old, **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        from usfm_core.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="usfm-le-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "inference" in args.parts:
            inference_part(
                setting, work, report, save, args.infer_threads, tuple(args.infer_presets)
            )
        if "label" in args.parts:
            label_part(setting, work, report, save, args.pretrained)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(format_tables(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
