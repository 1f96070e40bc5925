"""The phantom: tissue fields on a fixed grid in tissue coordinates, plus analytic lesions.

Tissue coordinates are the physical ``(x, y)`` millimetres of the frame at rest (time 0).
Motion maps each displayed point back to tissue coordinates, and every field (scatterers,
echogenicity, reflectors, attenuation) and every lesion outline is read there, so tissue,
speckle and lesion masks move together exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from usfm_core.sim.config import SimConfig
from usfm_core.sim.geometry import ScanGeometry

# Lesion types: (echo amplitude range, attenuation multiplier range).
LESION_TYPES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "cyst": ((0.003, 0.012), (0.02, 0.1)),  # anechoic fluid: posterior enhancement
    "solid": ((0.15, 0.35), (1.0, 2.5)),  # hypoechoic mass, may shadow
    "hyper": ((2.5, 4.0), (1.3, 2.5)),  # echogenic mass, shadows
}
KIND_CHOICES = {
    "hypo": (("cyst", "solid"), (0.5, 0.5)),
    "hyper": (("hyper",), (1.0,)),
    "mixed": (("cyst", "solid", "hyper"), (0.35, 0.35, 0.3)),
}
N_HARMONICS = 6  # radial Fourier terms k = 2 .. 7 of a lesion outline
LESION_EDGE_MM = 0.5  # width of the soft echo transition at a lesion border
DENSE_SCATTERERS = 10.0  # above this many per cell, scatterer counts are not drawn
COARSE = 4  # smooth tissue fields are computed on a grid this many times coarser


@dataclass
class Lesion:
    """A star-shaped blob: ``ρ < R(φ) = radius · (1 + Σ_k c_k cos(k φ + p_k))``.

    ``ρ, φ`` are polar coordinates about ``center`` after rotating by ``angle`` and stretching
    by ``aspect`` (area-preserving), all in tissue coordinates (mm).
    """

    center: tuple[float, float]
    radius: float
    aspect: float
    angle: float
    coeffs: np.ndarray  # (N_HARMONICS,) relative amplitudes c_k
    phases: np.ndarray  # (N_HARMONICS,) p_k
    kind: str
    echo: float  # amplitude multiplier of the scatterers inside
    attenuation: float  # multiplier of the tissue attenuation inside

    @property
    def max_extent(self) -> float:
        """Radius (mm) of a circle about ``center`` that contains the whole lesion."""
        return self.radius * (1 + np.abs(self.coeffs).sum()) * math.sqrt(self.aspect)

    def _polar(self, qx: np.ndarray, qy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = qx - self.center[0], qy - self.center[1]
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / math.sqrt(self.aspect)
        v = (-dx * s + dy * c) * math.sqrt(self.aspect)
        return np.hypot(u, v), np.arctan2(v, u)

    def outline_radius(self, phi: np.ndarray) -> np.ndarray:
        """``R(φ)`` in mm for angles ``phi`` (any shape)."""
        k = np.arange(2, 2 + N_HARMONICS)
        terms = self.coeffs * np.cos(np.multiply.outer(phi, k) + self.phases)
        return self.radius * (1 + terms.sum(axis=-1))

    def signed_depth(self, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
        """``R(φ) − ρ`` (mm): positive inside the lesion, negative outside."""
        rho, phi = self._polar(qx, qy)
        return self.outline_radius(phi) - rho

    def inside(self, qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
        """Bool mask of the tissue points ``(qx, qy)`` inside the lesion."""
        return self.signed_depth(qx, qy) > 0


@dataclass
class Tissue:
    """Tissue fields on a regular grid (``step`` mm, origin ``(x0, y0)``), each ``(ny, nx)``.

    scatter: unit-variance random scatterer amplitudes (band-limited white noise).
    echo: echogenicity (amplitude multiplier) of background tissue and lesions.
    specular: coherent reflector amplitude (skin, fascia), added to the scatterers.
    attenuation: local attenuation, dB/cm/MHz.
    """

    x0: float
    y0: float
    step: float
    scatter: np.ndarray
    echo: np.ndarray
    specular: np.ndarray
    attenuation: np.ndarray
    lesions: list[Lesion]

    def sample(self, qx: np.ndarray, qy: np.ndarray) -> dict[str, np.ndarray]:
        """Bilinear read of every field at tissue points ``(qx, qy)`` (any 2-D shape)."""
        mx = ((qx - self.x0) / self.step).astype(np.float32)
        my = ((qy - self.y0) / self.step).astype(np.float32)
        out = {}
        for name in ("scatter", "echo", "specular", "attenuation"):
            out[name] = cv2.remap(
                getattr(self, name), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
            )
        return out

    def lesion_labels(self, qx: np.ndarray, qy: np.ndarray, region: np.ndarray) -> np.ndarray:
        """``(H, W)`` uint8 label image (lesion ``i`` → ``i + 1``) of points ``(qx, qy)``."""
        labels = np.zeros(qx.shape, dtype=np.uint8)
        for i, lesion in enumerate(self.lesions):
            reach = lesion.max_extent
            near = (
                region
                & (np.abs(qx - lesion.center[0]) < reach)
                & (np.abs(qy - lesion.center[1]) < reach)
            )
            idx = np.nonzero(near)
            if idx[0].size:
                hit = lesion.inside(qx[idx], qy[idx])
                labels[idx[0][hit], idx[1][hit]] = i + 1
        return labels


def smooth_noise(
    shape: tuple[int, int], sigma_px: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Unit-variance Gaussian random field ``shape`` with correlation lengths ``(sy, sx)`` px.

    Drawn on a coarse grid (about 2 coarse pixels per sigma), blurred and resized up: cheap
    even for correlation lengths of tens of pixels.
    """
    fy, fx = max(1.0, sigma_px[0] / 2), max(1.0, sigma_px[1] / 2)
    coarse = (max(4, math.ceil(shape[0] / fy) + 2), max(4, math.ceil(shape[1] / fx) + 2))
    field = rng.standard_normal(coarse).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=sigma_px[1] / fx, sigmaY=sigma_px[0] / fy)
    field = cv2.resize(field, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _scatterers(shape: tuple[int, int], density: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance scatterer amplitudes: Gaussian × √(Poisson count of scatterers per cell).

    A light blur band-limits the field so that resampling it at moving, non-grid positions
    does not modulate the speckle brightness.
    """
    amp = rng.standard_normal(shape, dtype=np.float32)
    if density < DENSE_SCATTERERS:  # many per cell: the count hardly matters (saves time)
        amp *= np.sqrt(rng.poisson(density, size=shape).astype(np.float32) / density)
    amp = cv2.GaussianBlur(amp, (0, 0), sigmaX=0.7)
    return amp / (amp.std() + 1e-6)


def _layer_boundaries(
    lateral: np.ndarray, cfg: SimConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """Depths (mm) of the ``n_layers`` tissue interfaces, wavy along ``lateral`` (mm)."""
    depth = cfg.depth_mm
    bases = np.sort(rng.uniform(0.08, 0.75, size=cfg.n_layers)) * depth
    out = []
    for base in bases:
        wavelength = rng.uniform(20.0, 60.0)
        amplitude = rng.uniform(0.5, max(0.5, 0.04 * depth))
        wave = amplitude * np.sin(2 * np.pi * lateral / wavelength + rng.uniform(0, 2 * np.pi))
        tilt = rng.uniform(-0.08, 0.08) * lateral
        out.append((base + wave + tilt).astype(np.float32))
    return out


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Coarse grid → fine grid ``shape`` (exactly ``COARSE`` times larger), bilinear."""
    return cv2.resize(
        field.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR
    )


def _background(
    depth: np.ndarray,
    coarse: tuple[np.ndarray, np.ndarray],
    step: float,
    cfg: SimConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Echogenicity and specular fields ``(ny, nx)`` of the lesion-free tissue.

    ``depth`` is the depth below the probe face (mm) on the tissue grid; ``coarse`` holds
    ``(depth, lateral)`` (mm) on a grid ``COARSE`` times coarser, where the smooth parts are
    computed. Skin
    line, ``n_layers`` wavy layers with their own brightness and bright interfaces, slow
    brightness variation and horizontal fibrous strands.
    """
    depth_c, lateral_c = coarse
    shape, shape_c = depth.shape, depth_c.shape
    step_c = step * COARSE

    boundaries_c = _layer_boundaries(lateral_c, cfg, rng)
    levels = rng.uniform(0.55, 1.3, size=len(boundaries_c) + 1)
    levels[0] = rng.uniform(0.45, 0.7)  # subcutaneous fat: darker
    echo_c = np.full(shape_c, levels[0], dtype=np.float32)
    for boundary, level in zip(boundaries_c, levels[1:]):
        ramp = 1 / (1 + np.exp(-(depth_c - boundary) / 0.4))  # ≈ 1 mm smooth step
        echo_c += (level - echo_c) * ramp.astype(np.float32)
    echo_c *= np.exp(0.25 * smooth_noise(shape_c, (4.0 / step_c,) * 2, rng))
    echo = _upsample(echo_c, shape)
    echo[depth < 1.5] = 1.6  # skin
    strands = smooth_noise(shape, (0.35 / step, 2.5 / step), rng)
    echo *= np.exp(0.35 * strands)

    # Interfaces reflect coherently along the probe face but randomly along depth, which is
    # what makes them continuous bright lines after beamforming.
    n_depth = math.ceil((float(depth.max()) - float(depth.min())) / step) + 2
    along_depth = rng.standard_normal(n_depth).astype(np.float32)
    depth_idx = np.clip(((depth - depth.min()) / step).astype(np.int64), 0, n_depth - 1)
    specular = np.zeros(shape, dtype=np.float32)
    for boundary_c in [np.full(shape_c, 0.4, dtype=np.float32), *boundaries_c]:
        strength = rng.uniform(1.0, 2.5)
        patches_c = np.clip(0.7 + 0.5 * smooth_noise(shape_c, (8 / step_c,) * 2, rng), 0, 1.2)
        offset = (depth - _upsample(boundary_c, shape)) / np.float32(0.35)
        specular += _upsample(strength * patches_c, shape) * np.exp(-0.5 * offset**2)
    specular *= along_depth[depth_idx]
    specular[depth < 0] = 0
    return echo.astype(np.float32), specular


def _place_lesions(geom: ScanGeometry, cfg: SimConfig, rng: np.random.Generator) -> list[Lesion]:
    """Draw ``n_lesions`` non-overlapping lesions well inside the field of view.

    Lesions that do not fit after repeated tries (shrinking as they go) are left out; the
    scene's meta records how many were placed.
    """
    n_target = int(rng.integers(cfg.n_lesions[0], cfg.n_lesions[1] + 1))
    kinds, probs = KIND_CHOICES[cfg.lesion_kind]
    lesions: list[Lesion] = []
    for _ in range(n_target):
        for attempt in range(60):
            # Lesions that keep failing to fit (small field of view) are drawn smaller.
            lesion = _random_lesion(kinds, probs, cfg, rng, shrink=0.85 ** (attempt // 10))
            x, y = _random_position(geom, lesion.max_extent, rng)
            if x is None:
                continue
            lesion.center = (x, y)
            if all(
                math.dist(lesion.center, o.center) > 1.1 * (lesion.max_extent + o.max_extent)
                for o in lesions
            ):
                lesions.append(lesion)
                break
    return lesions


def _random_lesion(
    kinds: tuple[str, ...],
    probs: tuple[float, ...],
    cfg: SimConfig,
    rng: np.random.Generator,
    shrink: float = 1.0,
) -> Lesion:
    """One lesion shape and type, radius scaled by ``shrink`` (centre filled in later)."""
    kind = str(rng.choice(kinds, p=probs))
    (e_lo, e_hi), (a_lo, a_hi) = LESION_TYPES[kind]
    k = np.arange(2, 2 + N_HARMONICS)
    coeffs = rng.standard_normal(N_HARMONICS) / k**2  # mostly lobulated, a little jagged
    coeffs *= cfg.lesion_irregularity / (np.linalg.norm(coeffs) + 1e-9)
    total = np.abs(coeffs).sum()
    if total > 0.7:  # keep R(φ) > 0: the outline stays star-shaped
        coeffs *= 0.7 / total
    return Lesion(
        center=(0.0, 0.0),
        radius=float(rng.uniform(*cfg.lesion_radius_mm)) * shrink,
        aspect=float(rng.uniform(1.0, 1.8)),
        angle=float(rng.uniform(-0.5, 0.5)),  # mostly wider than tall, as lesions tend to be
        coeffs=coeffs,
        phases=rng.uniform(0, 2 * np.pi, N_HARMONICS),
        kind=kind,
        echo=float(rng.uniform(e_lo, e_hi)),
        attenuation=float(rng.uniform(a_lo, a_hi)),
    )


def _random_position(
    geom: ScanGeometry, reach: float, rng: np.random.Generator
) -> tuple[float, float] | tuple[None, None]:
    """A centre (mm) at which a lesion of radius ``reach`` lies inside the field of view."""
    depth = rng.uniform(0.12, 0.85) * geom.depth_mm
    if depth - reach < 0.08 * geom.depth_mm or depth + reach > 0.95 * geom.depth_mm:
        return None, None
    if geom.kind == "sector":
        r = geom.apex_radius_mm + depth
        theta = rng.uniform(-0.85, 0.85) * geom.half_angle
        if r * math.sin(geom.half_angle - abs(theta)) < 1.1 * reach:
            return None, None
        return r * math.sin(theta), r * math.cos(theta)
    x = rng.uniform(-0.45, 0.45) * geom.aperture_mm
    if abs(x) + 1.1 * reach > geom.aperture_mm / 2:
        return None, None
    return x, depth


def _add_lesions(
    tissue: Tissue, xs: np.ndarray, ys: np.ndarray, alpha0: float, rng: np.random.Generator
) -> None:
    """Paint the lesions' echo and attenuation into the tissue grid (soft 0.5 mm edge)."""
    for lesion in tissue.lesions:
        reach = lesion.max_extent + LESION_EDGE_MM
        cols = np.nonzero(np.abs(xs - lesion.center[0]) < reach)[0]
        rows = np.nonzero(np.abs(ys - lesion.center[1]) < reach)[0]
        if not cols.size or not rows.size:
            continue
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        qx, qy = np.meshgrid(xs[box[1]], ys[box[0]])
        w = np.clip(lesion.signed_depth(qx, qy) / LESION_EDGE_MM + 0.5, 0, 1).astype(np.float32)
        texture = np.exp(0.2 * smooth_noise(w.shape, (1.5 / tissue.step,) * 2, rng))
        tissue.echo[box] += w * (lesion.echo * texture - tissue.echo[box])
        tissue.attenuation[box] += w * alpha0 * (lesion.attenuation - 1.0)
        tissue.specular[box] *= 1 - w  # no tissue interfaces run through a lesion


def build_tissue(
    geom: ScanGeometry, cfg: SimConfig, rng: np.random.Generator, margin_mm: float
) -> Tissue:
    """The phantom covering the field of view plus ``margin_mm`` on every side (for motion)."""
    x_min, x_max, y_min, y_max = geom.bounds_mm()
    step = geom.axial_step_mm
    step_c = COARSE * step
    # Coarse grid first; the fine grid is exactly COARSE times denser and aligned with it the
    # way cv2.resize aligns pixel centres.
    xs_c = np.arange(x_min - margin_mm, x_max + margin_mm + step_c, step_c)
    ys_c = np.arange(y_min - margin_mm, y_max + margin_mm + step_c, step_c)
    shift = (COARSE - 1) / 2 * step
    xs = xs_c[0] - shift + step * np.arange(COARSE * xs_c.size)
    ys = ys_c[0] - shift + step * np.arange(COARSE * ys_c.size)

    x_c, y_c = np.meshgrid(xs_c, ys_c)
    coarse = (geom.probe_depth(x_c, y_c), geom.probe_lateral(x_c, y_c))
    x, y = np.meshgrid(xs.astype(np.float32), ys.astype(np.float32))
    depth = geom.probe_depth(x, y).astype(np.float32)

    echo, specular = _background(depth, coarse, step, cfg, rng)
    tissue = Tissue(
        x0=float(xs[0]),
        y0=float(ys[0]),
        step=step,
        scatter=_scatterers(depth.shape, cfg.scatterer_density, rng),
        echo=echo,
        specular=specular,
        attenuation=np.full(depth.shape, cfg.attenuation_db_cm_mhz, dtype=np.float32),
        lesions=_place_lesions(geom, cfg, rng),
    )
    alpha_for_lesions = cfg.attenuation_db_cm_mhz if cfg.posterior_effects else 0.0
    _add_lesions(tissue, xs, ys, alpha_for_lesions, rng)
    return tissue
