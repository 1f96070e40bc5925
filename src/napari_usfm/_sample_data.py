"""Offline sample data: a simulated cine with lesions, a simulated calibrated DICOM, and one
real fetal-head image (HC18, CC BY 4.0) shipped with attribution in ``samples/``."""

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


def hc18_image() -> LayerData:
    """A real fetal-head ultrasound (HC18 ``000_HC``, CC BY 4.0) with its head annotation."""
    import cv2

    image = cv2.imread(str(SAMPLES / "hc18_000_HC.png"), cv2.IMREAD_GRAYSCALE)
    mask = cv2.imread(str(SAMPLES / "hc18_000_HC_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    px = 0.144033
    common = {"scale": (px, px), "units": ("mm", "mm"), "axis_labels": ("y", "x")}
    meta = {
        "spacing_mm": (px, px),
        "kind": "image",
        "source": "HC18 000_HC (CC BY 4.0)",
        "attribution": (SAMPLES / "ATTRIBUTION.md").read_text(encoding="utf-8"),
    }
    return [
        (image, {"name": "HC18 fetal head", "metadata": meta, **common}, "image"),
        (
            mask.astype(np.uint8),
            {"name": "HC18 head annotation", "opacity": 0.4, "visible": False, **common},
            "labels",
        ),
    ]
