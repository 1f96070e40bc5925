"""B-mode image formation on the acoustic grid ``(n_axial, n_lines)`` and scan conversion.

Scatterers × echogenicity (+ coherent reflectors) → convolution with a separable PSF
(Gaussian-modulated complex carrier along the beam, Gaussian across it, wider away from the
focus) → round-trip attenuation integrated along each beam (so lesions shadow or enhance what
lies behind them) → electronic noise → TGC → envelope → log compression → scan conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from usfm_core.sim.config import SimConfig
from usfm_core.sim.geometry import ScanGeometry

SPEED_OF_SOUND_MM_US = 1.54
MID_GRAY = 0.5  # display level (fraction of 255) of the reference echo
LATERAL_LEVEL_RATIO = 1.4  # ratio between precomputed lateral blur widths
MAX_GAIN_MARGIN_DB = 15.0  # TGC stops where noise would come within this of the echo level


@dataclass
class Imaging:
    """The per-scene imaging chain: PSF kernels, beam widths and the TGC curve."""

    axial_cos: np.ndarray  # (K,) real part of the axial PSF
    axial_sin: np.ndarray  # (K,) imaginary part
    lateral_sigma: np.ndarray  # (n_axial,) beam sigma in lines at each depth
    tgc_db: np.ndarray  # (n_axial,) receive gain
    noise_amp: float  # electronic noise std (unit = RMS speckle of echo 1)
    frequency_mhz: float
    axial_sigma: float  # pulse envelope sigma in depth samples
    speckle_smoothing: float  # fraction of the PSF over which intensity is averaged
    reference: float | None = None  # envelope shown at MID_GRAY (set from the first frame)


def make_imaging(geom: ScanGeometry, cfg: SimConfig, rng: np.random.Generator) -> Imaging:
    """Build the PSF, beam-width profile and TGC curve for ``geom`` and ``cfg``."""
    dz = geom.axial_step_mm
    depth = geom.depth_axis()

    # Axial: Gaussian envelope × complex carrier. The carrier is limited to the grid's Nyquist
    # rate; envelope (speckle) statistics do not depend on its exact frequency.
    sigma = cfg.psf_axial_mm / dz
    half = max(1, math.ceil(3.5 * sigma))
    z = np.arange(-half, half + 1, dtype=np.float64)
    period = max(SPEED_OF_SOUND_MM_US / cfg.frequency_mhz / 2 / dz, 2.5)
    envelope = np.exp(-0.5 * (z / max(sigma, 0.3)) ** 2)
    kernel = envelope * np.exp(2j * np.pi * z / period)
    kernel /= np.sqrt((np.abs(kernel) ** 2).sum())

    # Lateral: beam sigma in mm grows away from the focus (Gaussian beam, Rayleigh range
    # ~ half the depth) and, for a sector, with depth; divided by the local line spacing.
    rayleigh = 0.5 * cfg.depth_mm
    sigma_mm = cfg.psf_lateral_mm * np.sqrt(1 + ((depth - cfg.focus_mm) / rayleigh) ** 2)
    if geom.kind == "sector":
        sigma_mm = sigma_mm * (1 + cfg.lateral_widening * depth / cfg.depth_mm)
    lateral_sigma = sigma_mm / geom.line_spacing_mm()

    # TGC: gives back a fraction of the mean round-trip attenuation, plus slider ripple.
    mean_loss_db = 2 * cfg.attenuation_db_cm_mhz * cfg.frequency_mhz * depth / 10
    sliders = rng.uniform(-1, 1, size=8) * cfg.tgc_jitter_db
    ripple = np.interp(depth, np.linspace(0, cfg.depth_mm, 8), sliders)
    # Receive gain is limited, as on a scanner: beyond the penetration depth only (dim) noise
    # is left instead of amplified noise.
    tgc_db = np.minimum(
        cfg.tgc_compensation * mean_loss_db + ripple, -cfg.noise_db - MAX_GAIN_MARGIN_DB
    )

    return Imaging(
        axial_cos=kernel.real.astype(np.float32),
        axial_sin=kernel.imag.astype(np.float32),
        lateral_sigma=lateral_sigma.astype(np.float32),
        tgc_db=tgc_db.astype(np.float32),
        noise_amp=10 ** (cfg.noise_db / 20),
        frequency_mhz=cfg.frequency_mhz,
        axial_sigma=float(sigma),
        speckle_smoothing=cfg.speckle_smoothing,
    )


def _blur_lines(rows: np.ndarray, sigma: float) -> np.ndarray:
    """Unit-sum Gaussian blur of ``rows`` (n, n_lines) float32 along axis 1 (OpenCV, fast)."""
    ksize = 2 * math.ceil(4 * sigma) + 1
    return cv2.GaussianBlur(
        rows, (ksize, 1), sigmaX=sigma, sigmaY=0.1, borderType=cv2.BORDER_REFLECT
    )


def lateral_blur(rf: np.ndarray, sigma: np.ndarray, keep_energy: bool = True) -> np.ndarray:
    """Gaussian blur of ``rf`` (n_axial, n_lines) across lines with per-row ``sigma`` (n_axial,).

    Rows are blended between a ladder of fixed widths. With ``keep_energy`` each row is
    rescaled so unit-variance white input keeps unit variance (a beam's energy, not its sum,
    is normalised); otherwise the kernels sum to one (plain smoothing).
    """
    sigma = np.maximum(sigma, 0.3)
    lo, hi = float(sigma.min()), float(sigma.max())
    n_levels = max(2, math.ceil(math.log(hi / lo) / math.log(LATERAL_LEVEL_RATIO)) + 1)
    levels = np.geomspace(lo, hi * 1.0001, n_levels)
    pos = np.interp(np.log(sigma), np.log(levels), np.arange(n_levels))
    out = np.zeros_like(rf)
    for i, level in enumerate(levels):
        weight = np.clip(1 - np.abs(pos - i), 0, 1)
        rows = np.nonzero(weight > 0)[0]
        if rows.size:
            band = slice(rows[0], rows[-1] + 1)
            out[band] += weight[band, None] * _blur_lines(rf[band], float(level))
    if not keep_energy:
        return out
    gain = np.sqrt(2 * np.sqrt(np.pi) * sigma)  # 1 / ||gaussian||₂ for a unit-sum kernel
    return out * gain[:, None].astype(rf.dtype)


def envelope(
    fields: dict[str, np.ndarray],
    geom: ScanGeometry,
    imaging: Imaging,
    rng: np.random.Generator,
) -> np.ndarray:
    """Echo envelope ``(n_axial, n_lines)`` from tissue fields sampled on the acoustic grid."""
    rf = fields["scatter"] * fields["echo"] + fields["specular"]
    # filter2D correlates: flip the kernels to convolve.
    re = cv2.filter2D(rf, -1, imaging.axial_cos[::-1, None], borderType=cv2.BORDER_REFLECT)
    im = cv2.filter2D(rf, -1, imaging.axial_sin[::-1, None], borderType=cv2.BORDER_REFLECT)
    re = lateral_blur(re, imaging.lateral_sigma)
    im = lateral_blur(im, imaging.lateral_sigma)

    # Round trip: dB = 2 · ∫ α f dz (z in cm), accumulated along each beam.
    alpha = np.clip(fields["attenuation"], 0, None)
    loss_db = 2 * np.cumsum(alpha, axis=0) * (geom.axial_step_mm / 10) * imaging.frequency_mhz
    amp = 10 ** (-loss_db / 20)
    noise = rng.standard_normal((2, *re.shape)).astype(np.float32) * (
        imaging.noise_amp / math.sqrt(2)
    )
    gain = (10 ** (imaging.tgc_db / 20))[:, None]
    intensity = (re * amp + noise[0]) ** 2 + (im * amp + noise[1]) ** 2
    return np.sqrt(smooth_intensity(intensity, imaging)) * gain


def smooth_intensity(intensity: np.ndarray, imaging: Imaging) -> np.ndarray:
    """Average the echo intensity over a fraction of the PSF, as compounding and persistence do.

    Keeps the speckle grain but fills the deep nulls of raw Rayleigh speckle that make
    simulated images look like a net of dark lines. ``intensity`` is (n_axial, n_lines).
    """
    f = imaging.speckle_smoothing
    if f <= 0:
        return intensity
    out = cv2.GaussianBlur(intensity, (1, 0), sigmaX=0.1, sigmaY=max(0.3, f * imaging.axial_sigma))
    return lateral_blur(out, f * imaging.lateral_sigma, keep_energy=False)


def log_compress(env: np.ndarray, imaging: Imaging, cfg: SimConfig) -> np.ndarray:
    """Envelope → display level in [0, 255] (float32) over ``cfg.dynamic_range_db``.

    The first call fixes the reference (the median envelope of the upper third, i.e. typical
    tissue), so later cine frames keep the same brightness mapping.
    """
    if imaging.reference is None:
        top = env[: max(1, env.shape[0] // 3)]
        imaging.reference = float(np.median(top[::2, ::2])) + 1e-12
    db = 20 * np.log10(env / imaging.reference + 1e-6) + cfg.gain_db
    return (255 * np.clip(MID_GRAY + db / cfg.dynamic_range_db, 0, 1)).astype(np.float32)


def scan_convert(
    level: np.ndarray, map_col: np.ndarray, map_row: np.ndarray, region: np.ndarray
) -> np.ndarray:
    """Acoustic-grid image ``(n_axial, n_lines)`` → displayed ``(H, W)`` uint8, black outside.

    A light blur along the beam first, since the grid is sampled finer than the display.
    """
    level = cv2.GaussianBlur(level, (1, 0), sigmaX=0.1, sigmaY=0.6)
    out = cv2.remap(level, map_col, map_row, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[~region] = 0
    return out
