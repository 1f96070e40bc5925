"""Ultrasound-specific test-time corruptions (US-JEPA, App. E.2), severities ε ∈ {1, 2, 3}.

* ``blur``: ``I * G_σ`` with ``σ = ε`` and a ``2⌊2ε⌋+1`` square kernel;
* ``contrast``: ``μ_med + α(ε)(I − μ_med)`` with ``α = 0.7 / 0.5 / 0.3`` and ``μ_med`` the
  median over the scan region;
* ``speckle``: ``I · (1 + η_corr)`` with ``η ~ N(0, (0.35ε)²)`` per pixel, correlated by a
  normalised box kernel whose size ``2ε+1`` grows with ε (larger grains at higher severity).

All three are *region-aware*: pixels outside the scan region (the black frame around a sector)
are left untouched, as the paper conditions on the US-content mask.
"""

from __future__ import annotations

import math

import numpy as np

CORRUPTIONS: tuple[str, ...] = ("blur", "contrast", "speckle")
SEVERITIES: tuple[int, ...] = (1, 2, 3)
CONTRAST_ALPHA: dict[int, float] = {1: 0.7, 2: 0.5, 3: 0.3}
SPECKLE_SIGMA_PER_EPS = 0.35


def blur_kernel_size(eps: float) -> int:
    """Odd Gaussian kernel size ``2⌊2ε⌋ + 1`` used for severity ``eps``."""
    return 2 * math.floor(2 * eps) + 1


def speckle_kernel_size(eps: int) -> int:
    """Side of the box kernel that correlates the speckle noise: ``2ε + 1``."""
    return 2 * int(eps) + 1


def scan_region(image: np.ndarray, min_size: int = 64) -> np.ndarray:
    """Rough scan-region mask ``(H, W) bool``: non-black pixels, opened, largest blob, filled.

    A light version of UltraBench's recipe (threshold → erosion/dilation → remove small objects
    and holes); returns the whole image when nothing sensible is found.
    """
    from scipy import ndimage

    img = _gray(image)
    fg = img > 0
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3)), iterations=2)
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.ones(img.shape, bool)
    sizes = ndimage.sum(fg, labels, index=range(1, n + 1))
    best = int(np.argmax(sizes)) + 1
    if sizes[best - 1] < min_size:
        return np.ones(img.shape, bool)
    return ndimage.binary_fill_holes(labels == best)


def gaussian_blur(image: np.ndarray, eps: float, region: np.ndarray | None = None) -> np.ndarray:
    """Blur ``(H, W)`` with σ = ε and kernel ``2⌊2ε⌋+1``; same dtype, outside region unchanged."""
    import cv2

    img = _gray(image).astype(np.float32)
    k = blur_kernel_size(eps)
    out = cv2.GaussianBlur(
        img, (k, k), sigmaX=float(eps), sigmaY=float(eps), borderType=cv2.BORDER_REFLECT_101
    )
    return _finish(image, img, out, region)


def contrast_depletion(image: np.ndarray, eps: int, region: np.ndarray | None = None) -> np.ndarray:
    """Shrink intensities towards the in-region median by ``α(ε)`` (0.7, 0.5, 0.3)."""
    if int(eps) not in CONTRAST_ALPHA:
        raise ValueError(f"contrast severity must be one of {sorted(CONTRAST_ALPHA)}, got {eps}")
    img = _gray(image).astype(np.float32)
    reg = _region(img, region)
    med = float(np.median(img[reg]))
    out = med + CONTRAST_ALPHA[int(eps)] * (img - med)
    return _finish(image, img, out, region)


def correlated_speckle(
    image: np.ndarray,
    eps: int,
    region: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Multiply by ``1 + η_corr``: Gaussian noise σ = 0.35ε smoothed by a ``(2ε+1)²`` box."""
    import cv2

    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    img = _gray(image).astype(np.float32)
    eta = gen.normal(0.0, SPECKLE_SIGMA_PER_EPS * eps, size=img.shape).astype(np.float32)
    k = speckle_kernel_size(eps)
    eta_corr = cv2.blur(eta, (k, k), borderType=cv2.BORDER_REFLECT_101)
    return _finish(image, img, img * (1.0 + eta_corr), region)


def corrupt(
    image: np.ndarray,
    kind: str,
    severity: int,
    region: np.ndarray | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Apply corruption ``kind`` (``blur`` | ``contrast`` | ``speckle``) at ``severity`` 0–3.

    Severity 0 returns a copy. ``region=None`` estimates the scan region with
    :func:`scan_region`.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    if severity == 0:
        return np.array(image, copy=True)
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 0..3, got {severity}")
    if region is None:
        region = scan_region(image)
    if kind == "blur":
        return gaussian_blur(image, severity, region)
    if kind == "contrast":
        return contrast_depletion(image, severity, region)
    return correlated_speckle(image, severity, region, rng)


def _gray(image: np.ndarray) -> np.ndarray:
    """A 2-D view of the image (ValueError for anything else)."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"corruptions expect a 2-D (H, W) image, got shape {img.shape}")
    return img


def _region(img: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    """Boolean region mask of the image's shape (the whole image when None or empty)."""
    if region is None:
        return np.ones(img.shape, bool)
    reg = np.asarray(region, bool)
    if reg.shape != img.shape:
        raise ValueError(f"region shape {reg.shape} != image shape {img.shape}")
    return reg if reg.any() else np.ones(img.shape, bool)


def _finish(
    original: np.ndarray, img: np.ndarray, out: np.ndarray, region: np.ndarray | None
) -> np.ndarray:
    """Keep pixels outside the region, clip integer images to their range, restore the dtype."""
    reg = _region(img, region)
    result = np.where(reg, out, img)
    dtype = np.asarray(original).dtype
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        result = np.clip(np.rint(result), info.min, info.max)
    return result.astype(dtype)
