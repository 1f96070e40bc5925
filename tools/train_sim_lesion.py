"""Train the shipped demo segmenter ``sim-lesion`` (lesions in simulated B-mode cines).

The model that makes the plugin's Segment button work offline on the built-in sample scans:
a ``tiny`` VMamba + U-Net decoder trained from scratch on frames of the product's own simulator
(exact lesion masks), then copied into ``src/usfm_core/assets/models/sim-lesion`` with its
sha256 recorded in ``index.json``. Not a clinical model: it only knows simulated lesions.

    python tools/train_sim_lesion.py [--cines 12] [--frames 16] [--epochs 30] [--install]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from usfm_core.finetune.data import LabelledSet
from usfm_core.finetune.train import finetune
from usfm_core.models.zoo import BUILTIN_DIR, file_sha256
from usfm_core.sim import simulate_cine


def simulated_set(n_cines: int, n_frames: int, seed: int) -> LabelledSet:
    """Frames ``(256, 256)`` + lesion masks from seeded cines (half sector, half linear, some
    with burned-in annotations), grouped by cine so no cine straddles train and test."""
    images, masks, groups = [], [], []
    for i in range(n_cines):
        cine = simulate_cine(
            n_frames,
            seed=seed + i,
            geometry="sector" if i % 2 else "linear",
            text=i % 3 == 0,
            calipers=i % 4 == 0,
        )
        frames = cine.frames if cine.frames.ndim == 3 else cine.frames.mean(-1)
        images.append(frames.astype(np.uint8))
        masks.append((cine.lesion_masks > 0).astype(np.uint8))
        groups += [f"cine{i}"] * n_frames
    return LabelledSet.from_arrays(np.concatenate(images), np.concatenate(masks), groups=groups)


CHECK_SEED = 5000  # a fixed simulated check set, disjoint from the training seeds


def check_dice(model_dir: str | Path) -> float:
    """Mean Dice of the model on 2 fixed simulated cines × 8 frames (seed ``CHECK_SEED``):
    recorded at install, re-measured by the tests to prove the shipped weights reproduce."""
    from usfm_core.evaluate.metrics import dice
    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import load_finetuned

    model, _ = load_finetuned(model_dir)
    data = simulated_set(2, 8, CHECK_SEED)
    preds = segment_frames(model, [it.image for it in data.items], batch_size=8)
    scores = [dice(p > 0, it.mask > 0) for p, it in zip(preds, data.items)]
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cines", type=int, default=12)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="runs/sim-lesion")
    parser.add_argument(
        "--install", action="store_true", help="copy the model into the package's shipped models"
    )
    args = parser.parse_args()
    data = simulated_set(args.cines, args.frames, args.seed)
    result = finetune(
        "segmentation",
        data,
        args.out,
        backbone_preset="tiny",
        epochs=args.epochs,
        input_size=args.size,
        batch_size=16,
        lr=2e-3,
        patience=args.epochs,
        device="cpu",
        seed=0,
    )
    print(json.dumps(result.to_json(), indent=1, default=str))
    if args.install:
        dest = BUILTIN_DIR / "sim-lesion"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(Path(args.out) / "model", dest)
        index_path = BUILTIN_DIR / "index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        index["sim-lesion"] = {
            "sha256": file_sha256(dest / "model.safetensors"),
            "task": "segmentation",
            "description": "lesions in simulated B-mode (demo; not for clinical use)",
            "recipe": "python tools/train_sim_lesion.py --install "
            f"--cines {args.cines} --frames {args.frames} --epochs {args.epochs} "
            f"--size {args.size} --seed {args.seed}",
            "test_metrics": result.to_json().get("test_metrics"),
            "check_dice": check_dice(dest),
        }
        index_path.write_text(json.dumps(index, indent=1) + "\n")
        print(f"installed {dest}")


if __name__ == "__main__":
    main()
