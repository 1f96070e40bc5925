"""Is self-distillation alive? Short OpenUS runs of distillation variants on real images.

Each variant trains the same small config (VMamba ``small-fast`` at 2×128² + 2×64² views, or
``--backbone tiny`` at 2×64² + 2×32²) for ``--steps`` steps on BUSI + HC18 *train/val* images
(the split ``usfm-core finetune`` makes; test images are never used) and reports, averaged over
the last ``--tail`` logged steps: the teacher's entropy ratio (mean entropy / ln K, class and
patch heads), the teacher's mutual information (nats) and the class distillation loss vs ln K.

    OMP_NUM_THREADS=1 python benchmarks/distillation_variants.py --steps 60 --jobs 2

Writes ``benchmarks/results/distillation_variants.json`` and prints a Markdown table
(docs/pretraining.md, "Choosing the distillation recipe").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distillation_variants.json"

#: name → (description, --set overrides on top of the common config).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "old": (
        "τ_s 0.07, τ_t 0.04→0.07 (paper Tab. 7; the previous default)",
        ["loss.student_temp=0.07", "loss.force_temperatures=true"],
    ),
    "dino_temps": ("τ_s 0.1, τ_t 0.04→0.07 (DINO/iBOT)", []),
    "low_teacher": ("τ_s 0.1, τ_t 0.04→0.04", ["loss.teacher_temp=0.04"]),
    "sinkhorn": ("τ_s 0.1, τ_t 0.04→0.07, Sinkhorn–Knopp centring", ["loss.centering=sinkhorn"]),
    "head_bn": (
        "τ_s 0.1, τ_t 0.04→0.07, per-batch standardisation in the head",
        ["heads.batch_norm=true"],
    ),
    "head_bn_low_teacher": (
        "per-batch standardisation in the head, τ_s 0.1, τ_t 0.04→0.04",
        ["heads.batch_norm=true", "loss.teacher_temp=0.04"],
    ),
    "head_bn_sinkhorn": (
        "head standardisation + Sinkhorn–Knopp",
        ["heads.batch_norm=true", "loss.centering=sinkhorn"],
    ),
}


def common_overrides(backbone: str, steps: int, batch: int) -> list[str]:
    """The shared small config: schedules squeezed into ``steps`` (10 steps per epoch)."""
    epochs = max(1, math.ceil(steps / 10))
    views = (
        ["views.global_size=128", "views.local_size=64"]
        if backbone == "small-fast"
        else ["views.global_size=64", "views.local_size=32"]
    )
    return [
        f"backbone.preset={backbone}",
        *views,
        "views.n_local=2",
        f"batch_size={batch}",
        "steps_per_epoch=10",
        f"epochs={epochs}",
        "loss.warmup_teacher_temp_epochs=2",
        "optim.warmup_epochs=1",
        "optim.freeze_last_layer_epochs=0",
        "masking.cell=16",
        "workers=0",
        "log_every=5",
        "save_every=100000",
        "device=cpu",
    ]


def prepare_data(shared: Path, out: Path, per_set: int) -> Path:
    """``out/{busi,hc18}`` with links to ``per_set`` train/val images of each set."""
    sys.path.insert(0, str(ROOT / "tools"))
    from shipped_models import prepare_hc18, train_val_images

    labelled = out / "labelled"
    labelled.mkdir(parents=True, exist_ok=True)
    if not (labelled / "busi").exists():
        (labelled / "busi").symlink_to(shared / "busi")
    prepare_hc18(shared / "hc18", labelled / "hc18")
    data = out / "pretrain"
    for name in ("busi", "hc18"):
        folder = data / name
        folder.mkdir(parents=True, exist_ok=True)
        images = train_val_images(labelled / name)
        step = max(1, len(images) // per_set)
        for image in images[::step][:per_set]:
            link = folder / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return data


def summarise(run: Path, tail: int, out_dim: int) -> dict[str, float]:
    """Means over the last ``tail`` log rows of the diagnostics and losses."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    last = rows[-tail:]

    def mean(key: str) -> float:
        return sum(r[key] for r in last) / len(last)

    return {
        "steps": rows[-1]["step"],
        "entropy_ratio_cls": mean("teacher_entropy_ratio_cls"),
        "entropy_ratio_patch": mean("teacher_entropy_ratio_patch"),
        "mi_cls": mean("teacher_mi_cls"),
        "mi_patch": mean("teacher_mi_patch"),
        "cls_loss": mean("cls"),
        "patch_loss": mean("patch"),
        "ln_k": math.log(out_dim),
        "rec_global": mean("rec_global"),
    }


def run_variant(name: str, args, data: Path, work: Path) -> subprocess.Popen:
    """Start one variant as a ``usfm-core pretrain`` subprocess (1 thread)."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "usfm_core.cli",
        "pretrain",
        "--config",
        "small-fast",
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        str(args.steps),
    ]
    for item in common_overrides(args.backbone, args.steps, args.batch) + VARIANTS[name][1]:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(work / f"{name}.stderr", "w")  # closed when this process exits
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tail", type=int, default=3, help="log rows averaged (5 steps each)")
    parser.add_argument("--per-set", type=int, default=200, help="images per data set")
    parser.add_argument("--backbone", default="small-fast", choices=("small-fast", "tiny"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--work", default=None, help="keep runs here (default: a temp dir)")
    parser.add_argument("--results", default=str(RESULTS), help="JSON written here")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="distill_"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(Path(args.shared), work / "data", args.per_set)
    pending, running, results = list(args.variants), {}, {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            running[name] = (run_variant(name, args, data, work), time.time())
        time.sleep(2)
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                print(f"{name} failed; see {work / (name + '.stderr')}", file=sys.stderr)
                continue
            res = summarise(work / name, args.tail, 2048)
            res["seconds_per_step"] = (time.time() - start) / args.steps
            results[name] = {"description": VARIANTS[name][0], **res}
            print(f"{name}: {res}", flush=True)
    print(
        f"\n{len(results)} variants in {time.time() - t0:.0f} s; backbone {args.backbone}, "
        f"batch {args.batch}, {args.steps} steps, mean of the last {args.tail} log rows\n"
    )
    print(
        "| variant | teacher H/ln K (cls / patch) | teacher MI nats (cls / patch) | "
        "cls loss (ln K = 7.62) | patch loss |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name}: {r['description']} | {r['entropy_ratio_cls']:.2f} / "
            f"{r['entropy_ratio_patch']:.2f} | {r['mi_cls']:.2f} / {r['mi_patch']:.2f} | "
            f"{r['cls_loss']:.2f} | {r['patch_loss']:.2f} |"
        )
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "backbone": args.backbone,
        "batch": args.batch,
        "steps": args.steps,
        "tail_rows": args.tail,
        "variants": results,
    }
    results_path.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
