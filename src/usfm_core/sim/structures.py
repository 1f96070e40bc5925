"""Two-structure phantoms for multi-class segmentation: dark and bright lesions as two classes.

The simulator's lesions come in three kinds (``cyst``: anechoic, ``solid``: hypoechoic,
``hyper``: echogenic). Here frames hold cysts and echogenic masses only (seeds whose scene has
a solid mass are skipped, deterministically) and each lesion's label becomes its structure
class: 0 = background, 1 = ``cyst``, 2 = ``echogenic``. A model has to tell the two apart by
their echo, which a union (foreground) model cannot.

:func:`write_structures_folder` writes a ready labelled folder, the layout
``usfm-core finetune`` reads (the worked example of ``docs/finetuning.md``)::

    OUT/images/phantom0000.png      8-bit gray B-mode frames
    OUT/masks/phantom0000.png       palette PNG masks holding the class indices 0 / 1 / 2
    OUT/classes.json                {"0": "background", "1": "hypoechoic", "2": "hyperechoic"}
    OUT/manifest.csv                image, mask, group, split (a fixed test split)

Run ``python -m usfm_core.sim.structures OUT --n 60`` to make one (``--small`` for the
small-structure variant, :func:`simulate_small_structures`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.sim.simulate import simulate_frame

STRUCTURES: tuple[str, ...] = ("background", "cyst", "echogenic")
KIND_TO_CLASS = {"cyst": 1, "hyper": 2}
SEED_STRIDE = 1000  # alternative seeds of frame i: seed + k · SEED_STRIDE, k = 0, 1, ...
#: Overrides of the small-structure variant: three to five lesions of mean radius 0.8–2 mm
#: (3–8 px at 160², 4 px/mm), each class a fraction of a percent of the frame.
SMALL_STRUCTURES: dict[str, Any] = {"n_lesions": (3, 5), "lesion_radius_mm": (0.8, 2.0)}


def simulate_structures(
    seed: int, size: int = 96, **overrides: Any
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom frame ``(size, size) uint8`` and its mask ``(size, size) uint8`` in 0/1/2.

    Two or three lesions (radius 4–8 mm; cysts and echogenic masses) in a 40 × 40 mm
    linear-array field of view that fills the frame, 40 dB dynamic range and smoothed speckle;
    ``overrides`` go to :func:`usfm_core.sim.simulate_frame`. The first of the seeds
    ``seed + k · SEED_STRIDE`` whose scene has no solid mass is used.
    """
    settings: dict[str, Any] = dict(
        height=size,
        width=size,
        geometry="linear",
        depth_mm=40.0,
        aperture_mm=40.0,
        n_lesions=(2, 3),
        lesion_kind="mixed",
        lesion_radius_mm=(4.0, 8.0),
        dynamic_range_db=40.0,
        speckle_smoothing=1.0,
    )
    settings.update(overrides)
    for k in range(50):
        frame = simulate_frame(seed=seed + k * SEED_STRIDE, **settings)
        if set(frame.meta["lesion_kinds"]) <= set(KIND_TO_CLASS):
            break
    else:  # pragma: no cover - 50 scenes in a row with a solid mass
        raise RuntimeError(f"no cyst/echogenic-only scene for seed {seed}")
    labels = frame.lesion_mask
    mask = np.zeros(labels.shape, np.uint8)
    for i, kind in enumerate(frame.meta["lesion_kinds"]):
        mask[labels == i + 1] = KIND_TO_CLASS[kind]
    image = frame.image if frame.image.ndim == 2 else frame.image.mean(-1).astype(np.uint8)
    return image, mask


def simulate_small_structures(
    seed: int, size: int = 160, **overrides: Any
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`simulate_structures` with small structures (:data:`SMALL_STRUCTURES`): frame
    ``(size, size) uint8`` and mask ``(size, size) uint8`` in 0/1/2, three to five cysts and
    echogenic masses of mean radius 0.8–2 mm in the 40 mm field of view (a few pixels wide:
    what a decoder working at stride 4 loses)."""
    return simulate_structures(seed, size, **{**SMALL_STRUCTURES, **overrides})


def palette_png(mask: np.ndarray) -> bytes:
    """``(H, W)`` class indices as a palette (mode ``P``) PNG: black, red, green, blue ..."""
    from PIL import Image

    im = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    colours = [0, 0, 0, 230, 60, 60, 60, 200, 60, 60, 90, 230] + [255] * (256 * 3 - 12)
    im.putpalette(colours)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_structures_folder(
    out: str | Path,
    n: int = 60,
    size: int = 96,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.0,
    small: bool = False,
) -> Path:
    """Write ``n`` two-structure phantoms as a labelled folder (see the module doc);
    ``small`` makes them with :func:`simulate_small_structures`.

    The last ``round(test_fraction · n)`` frames are the fixed test split and the ones before
    them (``val_fraction``) the validation split; the rest train (with no validation rows,
    ``usfm-core finetune`` draws validation items from the training rows). Frame ``i`` uses
    seed ``seed + i``. Files are written atomically; returns ``out``.
    """
    from usfm_core.utils import atomic_path, atomic_write_text

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    rows = []
    for i in range(n):
        make = simulate_small_structures if small else simulate_structures
        image, mask = make(seed + i, size)
        name = f"phantom{i:04d}.png"
        _write_png(out / "images" / name, image)
        with atomic_path(out / "masks" / name) as tmp:
            tmp.write_bytes(palette_png(mask))
        split = "test" if i >= n - n_test else "val" if i >= n - n_test - n_val else "train"
        rows.append(
            {"image": f"images/{name}", "mask": f"masks/{name}", "group": f"p{i}", "split": split}
        )
    classes = {str(k): name for k, name in enumerate(STRUCTURES)}
    atomic_write_text(out / "classes.json", json.dumps(classes, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "mask", "group", "split"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    return out


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    from usfm_core.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(cv2.imencode(".png", image)[1].tobytes())


def main(argv: list[str] | None = None) -> int:
    """``python -m usfm_core.sim.structures OUT [--n 60] [--size 96] [--seed 0]``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write")
    p.add_argument("--n", type=int, default=60, help="number of frames")
    p.add_argument("--size", type=int, default=96, help="frame side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the first frame")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share in the test split")
    p.add_argument(
        "--small", action="store_true", help="small structures (radius 0.8-2 mm, 3 to 5)"
    )
    args = p.parse_args(argv)
    write_structures_folder(
        args.out, args.n, args.size, args.seed, args.test_fraction, small=args.small
    )
    print(f"wrote {args.n} phantoms to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
