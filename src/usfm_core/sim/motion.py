"""Smooth tissue motion for cines, as a backward map: displayed point → tissue point.

Reading every field and lesion outline through the same map is what keeps speckle, anatomy
and ground-truth masks moving together exactly. Displacements are small against the depth,
so the map stays invertible and areas change by a few per cent only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usfm_core.errors import ConfigError

MOTIONS = ("breathing", "probe", "none")


@dataclass(frozen=True)
class Motion:
    """One motion pattern; ``displacement(x, y, t)`` is zero at ``t = 0``.

    breathing: organs rise and fall (more with depth; the skin is held by the probe) with a
        gentle non-rigid wobble, period ``period_s``.
    probe: the probe slides sideways and presses in slightly.
    none: a still probe on still tissue (only the electronic noise changes).
    """

    kind: str
    amplitude_mm: float
    depth_mm: float
    period_s: float
    wobble_wavelength_mm: float
    wobble_phase: float

    @classmethod
    def create(
        cls, kind: str, amplitude_mm: float, depth_mm: float, rng: np.random.Generator
    ) -> Motion:
        """A motion of ``kind`` with randomised period and wobble."""
        if kind not in MOTIONS:
            raise ConfigError(f"unknown motion {kind!r}", hint=f"use one of {MOTIONS}")
        return cls(
            kind=kind,
            amplitude_mm=float(amplitude_mm),
            depth_mm=float(depth_mm),
            period_s=float(rng.uniform(2.5, 4.0)),
            wobble_wavelength_mm=float(rng.uniform(30.0, 60.0)),
            wobble_phase=float(rng.uniform(0, 2 * np.pi)),
        )

    def displacement(self, x: np.ndarray, y: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Tissue displacement ``(ux, uy)`` (mm) at displayed points ``(x, y)`` (mm), time t (s)."""
        a = self.amplitude_mm
        if self.kind == "none" or a == 0:
            return np.zeros_like(x), np.zeros_like(y)
        rel_depth = np.clip(y / self.depth_mm, 0, 1.2)
        phase = 2 * math.pi * t / self.period_s
        k = 2 * math.pi / self.wobble_wavelength_mm
        if self.kind == "breathing":
            s = math.sin(phase)
            wobble = 1 + 0.25 * np.sin(k * x + self.wobble_phase)
            uy = -a * s * (0.2 + 0.8 * rel_depth) * wobble
            ux = 0.3 * a * s * rel_depth * np.sin(k * y + self.wobble_phase)
            return ux, uy
        # probe: a lateral sweep plus a little compression under the probe.
        ux = np.full_like(x, 1.5 * a * math.sin(phase))
        uy = -0.3 * a * (1 - math.cos(2 * phase)) / 2 * rel_depth
        return ux, uy

    def tissue_coords(
        self, x: np.ndarray, y: np.ndarray, t: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tissue coordinates ``(qx, qy)`` of what is displayed at ``(x, y)`` at time ``t``."""
        ux, uy = self.displacement(x, y, t)
        return x - ux, y - uy
