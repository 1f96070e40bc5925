"""Offline sample data: a simulated cine with lesions, a simulated calibrated DICOM, and two
real images (HC18 fetal head and BUSI breast lesion, CC BY 4.0) shipped with attribution in
``samples/``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = Path(__file__).parent / "samples"
LayerData = list[tuple[Any, dict[str, Any], str]]


def _cine_layers(
    name: str,
    frames: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float],
    fps: float,
    source: str,
) -> LayerData:
    scale = (1.0, float(spacing[0]), float(spacing[1]))
    meta = {"fps": fps, "spacing_mm": spacing, "kind": "cine", "source": source}
    common = {"scale": scale, "units": ("s", "mm", "mm"), "axis_labels": ("t", "y", "x")}
    return [
        (frames, {"name": name, "metadata": meta, **common}, "image"),
        (
            labels.astype(np.uint8),
            {"name": f"{name} ground truth", "opacity": 0.4, "visible": False, **common},
            "labels",
        ),
    ]


def simulated_cine() -> LayerData:
    """A 24-frame simulated sector cine with moving lesions and their exact masks."""
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_frames=24, seed=7)
    return _cine_layers(
        "simulated cine",
        cine.frames,
        cine.lesion_masks > 0,
        cine.spacing_mm,
        cine.fps,
        "usfm_core.sim.simulate_cine(seed=7)",
    )


def simulated_dicom() -> LayerData:
    """A simulated, calibrated multi-frame DICOM, written to a temp file and read back through
    the plugin's own reader (so spacing comes from its Sequence of Ultrasound Regions)."""
    from napari_usfm._reader import get_reader
    from usfm_core.io.writers import write_dicom
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_frames=12, seed=11, text=True, calipers=True)
    frames = cine.frames if cine.frames.ndim == 3 else cine.frames.mean(-1).astype(np.uint8)
    path = Path(tempfile.mkdtemp(prefix="usfm-sample-")) / "simulated_cine.dcm"
    write_dicom(path, frames, spacing_mm=cine.spacing_mm, fps=cine.fps)
    reader = get_reader(str(path))
    if reader is None:  # pragma: no cover - the reader handles every DICOM we write
        raise RuntimeError(f"napari-usfm reader refused its own sample {path}")
    return reader(str(path))


def _real_image(name: str, stem: str, px: float | None, source: str) -> LayerData:
    """A shipped real image and its annotation (hidden) as two layers, calibrated if ``px``."""
    import cv2

    from napari_usfm._layers import reference_colormap

    image = cv2.imread(str(SAMPLES / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(SAMPLES / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    common: dict[str, Any] = {"axis_labels": ("y", "x")}
    meta: dict[str, Any] = {
        "kind": "image",
        "source": source,
        "attribution": (SAMPLES / "ATTRIBUTION.md").read_text(encoding="utf-8"),
    }
    if px is not None:
        common.update(scale=(px, px), units=("mm", "mm"))
        meta["spacing_mm"] = (px, px)
    return [
        (image, {"name": name, "metadata": meta, **common}, "image"),
        (
            mask.astype(np.uint8),
            {
                "name": f"{name} annotation",
                "opacity": 0.9,
                "visible": False,
                # Yellow, never the cyan of a prediction; the main job draws it as an outline.
                "colormap": reference_colormap(),
                "metadata": {"role": "reference"},
                **common,
            },
            "labels",
        ),
    ]


def hc18_image() -> LayerData:
    """A real fetal-head ultrasound (HC18 ``301_HC``, CC BY 4.0, 0.306 mm pixels, HC 169.7 mm)
    with its head annotation; the median-Dice test image of the shipped ``fetal-head`` model."""
    return _real_image("HC18 fetal head", "hc18_301_HC", 0.306337, "HC18 301_HC (CC BY 4.0)")


def busi_image() -> LayerData:
    """A real breast ultrasound with a malignant lesion (BUSI ``malignant 170``, CC BY 4.0)
    and its lesion mask; the median-Dice lesion test image of the shipped ``breast-lesion``
    model (no pixel size is known for BUSI)."""
    return _real_image(
        "BUSI breast lesion", "busi_malignant_170", None, "BUSI malignant 170 (CC BY 4.0)"
    )
