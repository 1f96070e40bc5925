"""Scan geometry: where the beams go and how the beam grid maps onto the displayed frame.

Physical coordinates are millimetres: ``x`` lateral (0 on the probe axis), ``y`` depth downwards.
A sector (curvilinear or phased) probe has its apex at ``(0, 0)`` and its face on the arc
``r = apex_radius``; a linear probe has its face on ``y = 0``. The *acoustic grid* holds one
column per beam line and one row per depth sample, ``(n_axial, n_lines)``; the displayed frame
``(H, W)`` samples it by scan conversion (polar → Cartesian for a sector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usfm_core.sim.config import SimConfig

# Fractions of the frame left free around the scan region (for labels, ticks, colour bar).
SECTOR_MARGINS = {"top": 0.04, "bottom": 0.1, "side": 0.03}
LINEAR_MARGINS = {"top": 0.07, "bottom": 0.12, "side": 0.1}
# Depth samples per output pixel: the echo is formed on a finer grid than it is displayed.
AXIAL_OVERSAMPLING = 2.0


@dataclass(frozen=True)
class ScanGeometry:
    """Layout of one simulated probe on an ``(H, W)`` frame with isotropic pixels."""

    kind: str
    height: int
    width: int
    depth_mm: float
    pixel_mm: float  # isotropic pixel size of the displayed frame
    x_left_mm: float  # physical x of pixel column 0
    y_top_mm: float  # physical y of pixel row 0
    apex_radius_mm: float
    half_angle: float  # radians, sector only
    aperture_mm: float  # linear only
    n_axial: int
    n_lines: int

    @classmethod
    def from_config(cls, cfg: SimConfig) -> ScanGeometry:
        """Fit the probe's field of view into the frame, leaving margins for annotations."""
        half = math.radians(cfg.sector_angle_deg) / 2
        r0 = cfg.apex_radius_mm if cfg.geometry == "sector" else 0.0
        if cfg.geometry == "sector":
            margins = SECTOR_MARGINS
            x_half = (r0 + cfg.depth_mm) * math.sin(min(half, math.pi / 2))
            y_max = r0 + cfg.depth_mm
            y_min = min(r0 * math.cos(half), y_max * math.cos(half))
        else:
            margins = LINEAR_MARGINS
            x_half, y_min, y_max = cfg.aperture_mm / 2, 0.0, cfg.depth_mm
        usable_h = cfg.height * (1 - margins["top"] - margins["bottom"])
        usable_w = cfg.width * (1 - 2 * margins["side"])
        pixel = max((y_max - y_min) / usable_h, 2 * x_half / usable_w)
        # Beams: one depth sample per 1/AXIAL_OVERSAMPLING pixel; lines about one pixel apart
        # at the deepest point (a sector's lines fan out with depth).
        n_axial = math.ceil(cfg.depth_mm / pixel * AXIAL_OVERSAMPLING) + 1
        width_deep = 2 * half * (r0 + cfg.depth_mm) if cfg.geometry == "sector" else 2 * x_half
        n_lines = max(16, math.ceil(width_deep / pixel) + 1)
        return cls(
            kind=cfg.geometry,
            height=cfg.height,
            width=cfg.width,
            depth_mm=cfg.depth_mm,
            pixel_mm=pixel,
            x_left_mm=-(cfg.width - 1) / 2 * pixel,
            y_top_mm=y_min - margins["top"] * cfg.height * pixel,
            apex_radius_mm=r0,
            half_angle=half,
            aperture_mm=cfg.aperture_mm,
            n_axial=n_axial,
            n_lines=n_lines,
        )

    @property
    def axial_step_mm(self) -> float:
        """Distance between depth samples along a beam."""
        return self.depth_mm / (self.n_axial - 1)

    def depth_axis(self) -> np.ndarray:
        """``(n_axial,)`` depth of each sample below the probe face, mm."""
        return np.linspace(0.0, self.depth_mm, self.n_axial)

    def line_axis(self) -> np.ndarray:
        """``(n_lines,)`` beam positions: angle in radians (sector) or x in mm (linear)."""
        if self.kind == "sector":
            return np.linspace(-self.half_angle, self.half_angle, self.n_lines)
        return np.linspace(-self.aperture_mm / 2, self.aperture_mm / 2, self.n_lines)

    def line_spacing_mm(self) -> np.ndarray:
        """``(n_axial,)`` distance between neighbouring beams at each depth, mm."""
        step = self.line_axis()[1] - self.line_axis()[0]
        if self.kind == "sector":
            return np.maximum((self.apex_radius_mm + self.depth_axis()) * step, 1e-3)
        return np.full(self.n_axial, step)

    def acoustic_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Physical ``(x, y)`` of every beam sample, each ``(n_axial, n_lines)`` float32."""
        depth = self.depth_axis().astype(np.float32)[:, None]
        line = self.line_axis().astype(np.float32)[None, :]
        shape = (self.n_axial, self.n_lines)
        if self.kind == "sector":
            r = self.apex_radius_mm + depth
            return r * np.sin(line), r * np.cos(line)
        return np.broadcast_to(line, shape).copy(), np.broadcast_to(depth, shape).copy()

    def pixel_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Physical ``(x, y)`` of every displayed pixel centre, each ``(H, W)`` float32."""
        xs = self.x_left_mm + np.arange(self.width, dtype=np.float64) * self.pixel_mm
        ys = self.y_top_mm + np.arange(self.height, dtype=np.float64) * self.pixel_mm
        x, y = np.meshgrid(xs, ys)
        return x.astype(np.float32), y.astype(np.float32)

    def xy_to_acoustic(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional ``(row, column)`` on the acoustic grid of physical points ``(x, y)``.

        Points outside the field of view get indices outside ``[0, n - 1]``.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "sector":
            depth = np.hypot(x, y) - self.apex_radius_mm
            line = np.arctan2(x, y)
            col = (line + self.half_angle) / (2 * self.half_angle) * (self.n_lines - 1)
        else:
            depth = y
            col = (x + self.aperture_mm / 2) / self.aperture_mm * (self.n_lines - 1)
        row = depth / self.axial_step_mm
        return row.astype(np.float32), col.astype(np.float32)

    def pixel_maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scan-conversion maps for ``cv2.remap``: ``(map_col, map_row, region)``, each (H, W).

        ``region`` is the bool scan region: pixels whose beam sample exists.
        """
        row, col = self.xy_to_acoustic(*self.pixel_xy())
        region = (row >= 0) & (row <= self.n_axial - 1) & (col >= 0) & (col <= self.n_lines - 1)
        return col, row, region

    def probe_depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Depth below the probe face (mm) of physical points; layers of tissue follow it."""
        if self.kind == "sector":
            return np.hypot(x, y) - self.apex_radius_mm
        return np.asarray(y)

    def probe_lateral(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Lateral position (mm along the probe face direction) of physical points."""
        if self.kind == "sector":
            return np.arctan2(x, y) * (self.apex_radius_mm + self.depth_mm / 2)
        return np.asarray(x)

    def bounds_mm(self) -> tuple[float, float, float, float]:
        """``(x_min, x_max, y_min, y_max)`` of the field of view."""
        if self.kind == "sector":
            r1 = self.apex_radius_mm + self.depth_mm
            x_half = r1 * math.sin(min(self.half_angle, math.pi / 2))
            y_min = min(
                self.apex_radius_mm * math.cos(self.half_angle), r1 * math.cos(self.half_angle)
            )
            return -x_half, x_half, y_min, r1
        return -self.aperture_mm / 2, self.aperture_mm / 2, 0.0, self.depth_mm
