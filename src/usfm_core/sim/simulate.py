"""Public entry points: :func:`simulate_frame` and :func:`simulate_cine`.

A :class:`_Scene` holds everything fixed for one seed (geometry, phantom, imaging chain,
annotation plan); frames are rendered from it at any time ``t``. Frame 0 of a cine is the
same image as :func:`simulate_frame` with the same seed and settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from usfm_core.sim import bmode
from usfm_core.sim.annotations import Stroke, apply_annotations, plan_annotations
from usfm_core.sim.config import SimConfig
from usfm_core.sim.geometry import ScanGeometry
from usfm_core.sim.motion import Motion
from usfm_core.sim.tissue import Tissue, build_tissue


@dataclass
class SimFrame:
    """One simulated frame and its ground truth.

    image: (H, W) uint8, or (H, W, 3) uint8 RGB when a colour overlay is drawn.
    region_mask: (H, W) bool scan region (fan or rectangle); the image is 0 outside it
        except where annotations are drawn.
    lesion_mask: (H, W) uint8 labels, 0 background, 1..K lesions (``> 0`` for binary).
    text_mask, caliper_mask, overlay_mask: (H, W) bool, exactly the pixels each layer drew.
    annotation_mask: (H, W) bool union of the three.
    clean_image: the frame without annotations, same shape and dtype as ``image``.
    spacing_mm: (dy, dx) pixel size in mm.
    meta: seed, geometry, lesion kinds, annotation texts, caliper points/lengths ...
    """

    image: np.ndarray
    region_mask: np.ndarray
    lesion_mask: np.ndarray
    annotation_mask: np.ndarray
    text_mask: np.ndarray
    caliper_mask: np.ndarray
    overlay_mask: np.ndarray
    clean_image: np.ndarray
    spacing_mm: tuple[float, float]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SimCine:
    """A simulated cine loop and its ground truth.

    frames: (T, H, W) or (T, H, W, 3) uint8.
    region_mask: (H, W) bool (the probe does not change its field of view).
    lesion_masks: (T, H, W) uint8 labels, moving with the tissue.
    annotation_masks: (T, H, W) bool (burned-in annotations stay put on screen).
    clean_frames: frames without annotations, same shape as ``frames``.
    spacing_mm: (dy, dx) in mm; fps: frames per second; meta as for :class:`SimFrame`.
    """

    frames: np.ndarray
    region_mask: np.ndarray
    lesion_masks: np.ndarray
    annotation_masks: np.ndarray
    clean_frames: np.ndarray
    spacing_mm: tuple[float, float]
    fps: float
    meta: dict[str, Any] = field(default_factory=dict)


class _Scene:
    """Everything fixed for one seed; :meth:`render` draws the clean frame at time ``t``."""

    def __init__(self, cfg: SimConfig, seed: int, motion: str = "none") -> None:
        self.cfg = cfg
        self.seed = seed
        # Independent streams, so that e.g. turning text on does not change the tissue.
        tissue_rng, imaging_rng, motion_rng, self._annotation_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
        )
        self.geom = ScanGeometry.from_config(cfg)
        self.motion = Motion.create(motion, cfg.motion_amplitude_mm, cfg.depth_mm, motion_rng)
        # The margin does not depend on the motion, so a still frame and frame 0 of a cine
        # with the same seed show the same tissue.
        margin = 1.5 * cfg.motion_amplitude_mm + 1.5
        self.tissue: Tissue = build_tissue(self.geom, cfg, tissue_rng, margin_mm=margin)
        self.imaging = bmode.make_imaging(self.geom, cfg, imaging_rng)
        self.map_col, self.map_row, self.region = self.geom.pixel_maps()
        self._beam_xy = self.geom.acoustic_xy()
        self._pixel_xy = self.geom.pixel_xy()

    def render(self, index: int, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Clean gray frame (H, W) uint8 and lesion labels (H, W) uint8 at time ``t`` (s)."""
        noise_rng = np.random.default_rng([self.seed, 7, index])
        fields = self.tissue.sample(*self.motion.tissue_coords(*self._beam_xy, t))
        env = bmode.envelope(fields, self.geom, self.imaging, noise_rng)
        level = bmode.log_compress(env, self.imaging, self.cfg)
        frame = bmode.scan_convert(level, self.map_col, self.map_row, self.region)
        qx, qy = self.motion.tissue_coords(*self._pixel_xy, t)
        labels = self.tissue.lesion_labels(qx, qy, self.region)
        return frame, labels

    def plan(self, lesion_mask: np.ndarray) -> tuple[list[Stroke], dict]:
        """Annotation strokes for this scene, placed using the lesions of the first frame."""
        return plan_annotations(self.geom, self.cfg, self.region, lesion_mask, self._annotation_rng)

    def meta(self) -> dict[str, Any]:
        """JSON-friendly description of the scene."""
        return {
            "seed": self.seed,
            "geometry": self.geom.kind,
            "depth_mm": self.cfg.depth_mm,
            "frequency_mhz": self.cfg.frequency_mhz,
            "n_lesions": len(self.tissue.lesions),
            "lesion_kinds": [lesion.kind for lesion in self.tissue.lesions],
            "lesion_centers_mm": [list(lesion.center) for lesion in self.tissue.lesions],
        }


def _resolve(
    config: SimConfig | None, seed: int | None, overrides: dict[str, Any]
) -> tuple[SimConfig, int]:
    """Merge config, overrides and seed; draw a recorded seed when none is given."""
    cfg = (
        (config or SimConfig()).with_overrides(**overrides)
        if overrides
        else (config or SimConfig())
    )
    if seed is None:
        seed = cfg.seed
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    return cfg, int(seed)


def simulate_frame(
    config: SimConfig | None = None, *, seed: int | None = None, **overrides: Any
) -> SimFrame:
    """Simulate one B-mode frame with its ground truth.

    Args:
        config: settings (default :class:`SimConfig`).
        seed: overrides ``config.seed``; same seed and settings → identical frame.
        **overrides: any :class:`SimConfig` field, e.g. ``geometry="linear"``, ``text=True``.
    """
    cfg, seed = _resolve(config, seed, overrides)
    scene = _Scene(cfg, seed)
    clean, labels = scene.render(0, 0.0)
    strokes, ann_meta = scene.plan(labels)
    clean_out, image, masks = apply_annotations(clean, strokes, rgb=cfg.colour_overlay)
    return SimFrame(
        image=image,
        region_mask=scene.region.copy(),
        lesion_mask=labels,
        annotation_mask=masks["text"] | masks["caliper"] | masks["overlay"],
        text_mask=masks["text"],
        caliper_mask=masks["caliper"],
        overlay_mask=masks["overlay"],
        clean_image=clean_out,
        spacing_mm=(scene.geom.pixel_mm, scene.geom.pixel_mm),
        meta={**scene.meta(), **ann_meta},
    )


def simulate_cine(
    n_frames: int = 16,
    config: SimConfig | None = None,
    *,
    seed: int | None = None,
    fps: float = 20.0,
    motion: str = "breathing",
    **overrides: Any,
) -> SimCine:
    """Simulate a cine loop of ``n_frames`` with smooth tissue ``motion``.

    Args:
        n_frames: number of frames T ≥ 1.
        config, seed, overrides: as for :func:`simulate_frame`.
        fps: frame rate; frame ``i`` is at time ``i / fps`` s.
        motion: ``"breathing"`` | ``"probe"`` | ``"none"``
            (see :class:`~usfm_core.sim.motion.Motion`).
    """
    from usfm_core.errors import ConfigError

    if n_frames < 1:
        raise ConfigError(f"n_frames = {n_frames} is invalid", hint="ask for at least 1 frame")
    if fps <= 0:
        raise ConfigError(f"fps = {fps} is invalid", hint="use a frame rate > 0")
    cfg, seed = _resolve(config, seed, overrides)
    scene = _Scene(cfg, seed, motion=motion)
    frames, clean_frames, lesion_masks, ann_masks = [], [], [], []
    strokes: list[Stroke] | None = None
    ann_meta: dict = {}
    for i in range(n_frames):
        clean, labels = scene.render(i, i / fps)
        if strokes is None:
            strokes, ann_meta = scene.plan(labels)
        clean_out, image, masks = apply_annotations(clean, strokes, rgb=cfg.colour_overlay)
        frames.append(image)
        clean_frames.append(clean_out)
        lesion_masks.append(labels)
        ann_masks.append(masks["text"] | masks["caliper"] | masks["overlay"])
    return SimCine(
        frames=np.stack(frames),
        region_mask=scene.region.copy(),
        lesion_masks=np.stack(lesion_masks),
        annotation_masks=np.stack(ann_masks),
        clean_frames=np.stack(clean_frames),
        spacing_mm=(scene.geom.pixel_mm, scene.geom.pixel_mm),
        fps=float(fps),
        meta={**scene.meta(), **ann_meta, "motion": motion, "n_frames": n_frames},
    )
