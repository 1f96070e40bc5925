"""Intensity and geometry normalisation of single frames.

US-JEPA §4.3 maps the 2nd and 98th percentiles of the intensities *inside the scan region*
to the full range, so that gain settings of different machines do not dominate; USF-MAE §2.2
then normalises with the ImageNet mean/std. Arrays are channel-last: (H, W) or (H, W, C).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# ImageNet statistics used by USF-MAE for every (grey, replicated) frame.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def percentile_rescale(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    low: float = 2.0,
    high: float = 98.0,
) -> np.ndarray:
    """Map the ``low``/``high`` percentiles (taken inside ``mask``) to 0 and 1, clipping outside.

    Args:
        image: (H, W) or (H, W, C) array of any numeric dtype.
        mask: optional (H, W) bool scan-region mask; percentiles use only its pixels (all
            channels). ``None`` or an empty mask uses the whole image.
        low, high: percentiles with ``0 <= low < high <= 100``.

    Returns:
        float32 array of the input's shape with values in [0, 1]. A constant region (the two
        percentiles equal) gives all zeros rather than a division by zero.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    img = np.asarray(image, dtype=np.float32)
    values = img
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != img.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match image {img.shape[:2]}")
        if mask.any():
            values = img[mask]
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    out = (img - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] (any shape) to uint8 in [0, 255], rounding and clipping."""
    img = np.asarray(image, dtype=np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def keep_aspect_scale(shape: Sequence[int], size: int) -> float:
    """Scale factor ``size / max(H, W)`` that :func:`resize_keep_aspect` applies to (H, W, ...)."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return float(size) / float(max(shape[0], shape[1]))


def resize_keep_aspect(
    image: np.ndarray, size: int, pad: bool = True, pad_value: float = 0
) -> np.ndarray:
    """Resize so the longer side is ``size`` pixels, keeping the aspect ratio.

    Args:
        image: (H, W) or (H, W, C) array (uint8 or float).
        size: target length of the longer side.
        pad: if True, centre the result on a (size, size[, C]) canvas filled with ``pad_value``
            (letterbox); otherwise return the (round(H·s), round(W·s)[, C]) resized image.

    Returns:
        The resized image, same dtype. The scale factor is :func:`keep_aspect_scale`.
    """
    img = np.asarray(image)
    scale = keep_aspect_scale(img.shape, size)
    h = max(1, round(img.shape[0] * scale))
    w = max(1, round(img.shape[1] * scale))
    # INTER_AREA avoids aliasing speckle when shrinking; linear is smoother when enlarging.
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(img, (w, h), interpolation=interp)
    if img.ndim == 3 and resized.ndim == 2:  # cv2 drops a single channel axis
        resized = resized[:, :, None]
    if not pad:
        return resized
    canvas = np.full((size, size, *img.shape[2:]), pad_value, dtype=img.dtype)
    y0 = (size - h) // 2
    x0 = (size - w) // 2
    canvas[y0 : y0 + h, x0 : x0 + w] = resized
    return canvas


def normalize(
    image: np.ndarray,
    mean: float | Sequence[float] = IMAGENET_MEAN,
    std: float | Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Standardise a [0, 1] float image channel-wise: ``(image - mean) / std``.

    Args:
        image: (H, W) or (H, W, C) float array in [0, 1] (uint8 is divided by 255 first).
        mean, std: a scalar or one value per channel. A grey (H, W) image with C > 1 values is
            replicated to (H, W, C) first, as USF-MAE feeds grey scans to an RGB ViT.

    Returns:
        float32 (H, W) for scalar statistics, else (H, W, C).
    """
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    mean_arr = np.atleast_1d(np.asarray(mean, dtype=np.float32))
    std_arr = np.atleast_1d(np.asarray(std, dtype=np.float32))
    if mean_arr.shape != std_arr.shape:
        raise ValueError(f"mean {mean_arr.shape} and std {std_arr.shape} must have one shape")
    if np.any(std_arr <= 0):
        raise ValueError("std must be positive")
    n = mean_arr.size
    if n == 1:
        return ((img - mean_arr[0]) / std_arr[0]).astype(np.float32)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], n, axis=2)
    if img.shape[-1] != n:
        raise ValueError(f"image has {img.shape[-1]} channels but {n} mean/std values")
    return ((img - mean_arr) / std_arr).astype(np.float32)
