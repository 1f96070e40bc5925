"""Multi-crop augmentation for OpenUS pretraining (OpenUS §3.2 and supplementary Tab. 7).

From one gray frame and its scan-region mask, :class:`MultiCropTransform` makes ``G`` global
views (224², scale 0.14–1) for teacher and student and ``L`` local views (96², scale
0.05–0.4) for the student, as in iBOT/DINO. The augmentations are those the paper lists:
horizontal flip, brightness/contrast ("colour") jitter, Gaussian blur (p = 1.0 for the first
global view, 0.1 for the second, 0.5 for locals, as in DINO) and exposure (gamma) jitter, plus
optional multiplicative speckle noise.

Ultrasound frames hold a lot of black background around the fan; a crop of mostly background
teaches nothing, so a crop is kept only if at least ``min_region_fraction`` of its pixels lie
inside the scan region (up to ``max_tries`` random crops, then crops centred on region pixels,
then the region's bounding box). Only numpy, OpenCV and torch are used; every random number
comes from the ``numpy.random.Generator`` passed in, so the views are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from usfm_core.errors import ConfigError

#: Reference output size at which the blur sigmas are specified (DINO: 0.1–2.0 px at 224²).
_BLUR_REFERENCE_SIZE = 224


@dataclass
class MultiCropConfig:
    """Views and augmentations; sizes must be multiples of 32 (the backbone's stride)."""

    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.14, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: Keep crops whose pixels are at least this fraction inside the scan region.
    min_region_fraction: float = 0.5
    max_tries: int = 10
    hflip_p: float = 0.5
    #: Vertical flip and rotation by an angle uniform in ``rotate_degrees`` (applied with
    #: ``rotate_p``; the corners the rotation uncovers are black, outside the scan region).
    #: Off for OpenUS; USF-MAE uses flips and 0–90° rotations, US-JEPA H/V flips.
    vflip_p: float = 0.0
    rotate_p: float = 0.0
    rotate_degrees: tuple[float, float] = (0.0, 90.0)
    #: Brightness / contrast jitter: factors drawn from [1 - x, 1 + x], applied with jitter_p.
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    #: Blur probability for global view 1, 2, ... (the last value repeats) and for locals.
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    #: Exposure jitter as a gamma curve I**g, log g uniform in log(gamma), applied with gamma_p.
    gamma: tuple[float, float] = (0.7, 1.4)
    gamma_p: float = 0.5
    #: Optional multiplicative speckle I * (1 + s * n), n ~ N(0, 1); off by default.
    speckle_p: float = 0.0
    speckle_sigma: float = 0.15
    in_chans: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    def __post_init__(self) -> None:
        # Configs loaded from JSON/YAML give lists: keep tuples so configs compare and hash.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if size < 32 or size % 32:
                raise ConfigError(
                    f"{name}={size} is not a positive multiple of 32",
                    hint="use e.g. 224/96 (paper) or 64/32 (tiny)",
                )
        if self.n_global < 1 or self.n_local < 0:
            raise ConfigError(
                f"need n_global >= 1 and n_local >= 0, got {self.n_global}, {self.n_local}",
                hint="the paper uses 2 global and 8 local views",
            )
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}", hint="use 1 or 3")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ConfigError(
                    f"{name}={(lo, hi)} must satisfy 0 < lo <= hi <= 1",
                    hint="fractions of the image area, e.g. (0.14, 1.0) global, (0.05, 0.4) local",
                )
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.in_chans):
                raise ConfigError(
                    f"{name} needs 1 or in_chans={self.in_chans} values",
                    hint="give one value per channel, or a single value for all",
                )
        for name in ("hflip_p", "vflip_p", "rotate_p", "jitter_p", "gamma_p", "speckle_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not a probability in [0, 1]",
                    hint="0 disables the augmentation, 1 always applies it",
                )
        if not 0.0 <= self.min_region_fraction <= 1.0:
            raise ConfigError(
                f"min_region_fraction={self.min_region_fraction} is not in [0, 1]",
                hint="0.5 keeps crops that are at least half scan region; 0 disables the check",
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}", hint="e.g. (0.25,)")

    @classmethod
    def tiny(cls, **overrides: Any) -> MultiCropConfig:
        """Small views for tests and CPU demos: global 64², local 32², 2 + 4 views."""
        settings: dict[str, Any] = {"global_size": 64, "local_size": 32, "n_local": 4}
        settings.update(overrides)
        return cls(**settings)


class _RegionIntegral:
    """Summed-area table of a region mask: O(1) region fraction of any box."""

    def __init__(self, region: np.ndarray) -> None:
        self.table = np.pad(region.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def fraction(self, x0: int, y0: int, w: int, h: int) -> float:
        """Fraction of the ``w × h`` box at ``(x0, y0)`` inside the region."""
        t = self.table
        inside = t[y0 + h, x0 + w] - t[y0, x0 + w] - t[y0 + h, x0] + t[y0, x0]
        return float(inside) / float(w * h)


def _random_box_size(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int]:
    """``(w, h)`` of a crop covering ``scale`` of the image area with aspect in ``ratio``."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return w, h
    # Rare for very elongated images: a square-ish crop clipped to the image.
    side = max(1, round(math.sqrt(area * rng.uniform(*scale))))
    return min(side, width), min(side, height)


def sample_crop_box(
    region: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    min_fraction: float,
    max_tries: int,
    rng: np.random.Generator,
    integral: _RegionIntegral | None = None,
) -> tuple[int, int, int, int]:
    """A crop ``(x0, y0, w, h)`` of a ``(H, W)`` region mask, mostly inside the region.

    Tries ``max_tries`` random-resized-crop boxes, then as many boxes of the last size centred
    on random region pixels, then falls back to the region's bounding box. An empty region
    puts no constraint on the crop.
    """
    height, width = region.shape
    integral = integral or _RegionIntegral(region)
    has_region = bool(integral.table[-1, -1])
    w, h = 1, 1
    for _ in range(max_tries):
        w, h = _random_box_size(height, width, scale, ratio, rng)
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        if not has_region or integral.fraction(x0, y0, w, h) >= min_fraction:
            return x0, y0, w, h
    ys, xs = np.nonzero(region)
    for _ in range(max_tries):
        k = int(rng.integers(0, len(xs)))
        x0 = int(np.clip(xs[k] - w // 2, 0, width - w))
        y0 = int(np.clip(ys[k] - h // 2, 0, height - h))
        if integral.fraction(x0, y0, w, h) >= min_fraction:
            return x0, y0, w, h
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    return x0, y0, x1 - x0, y1 - y0


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a float32 ``(S, S)`` image with a Gaussian of ``sigma`` px (kernel ±3σ)."""
    import cv2

    ksize = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)


class MultiCropTransform:
    """``(image (H, W) uint8, region (H, W) bool, rng) -> dict`` of global and local views.

    Output (``G = n_global``, ``Lc = n_local``, ``C = in_chans``, ``S``/``s`` the view sizes):
    ``global_views`` float32 ``(G, C, S, S)``, ``local_views`` ``(Lc, C, s, s)``,
    ``global_regions`` bool ``(G, S, S)``, ``local_regions`` ``(Lc, s, s)`` (the scan region
    cropped, flipped and rotated like each view), ``global_boxes`` / ``local_boxes`` int64
    ``(N, 5)``: ``x0, y0, w, h, flipped`` (horizontal) in source pixels.
    """

    def __init__(self, cfg: MultiCropConfig | None = None) -> None:
        self.cfg = cfg or MultiCropConfig()
        c = self.cfg.in_chans
        self._mean = np.resize(np.asarray(self.cfg.mean, np.float32), c).reshape(c, 1, 1)
        self._std = np.resize(np.asarray(self.cfg.std, np.float32), c).reshape(c, 1, 1)

    def __call__(
        self, image: np.ndarray, region: np.ndarray, rng: np.random.Generator
    ) -> dict[str, Any]:
        import torch

        image, region = _check_inputs(image, region)
        integral = _RegionIntegral(region)
        cfg = self.cfg
        out: dict[str, Any] = {}
        for kind, n, size, scale in (
            ("global", cfg.n_global, cfg.global_size, cfg.global_scale),
            ("local", cfg.n_local, cfg.local_size, cfg.local_scale),
        ):
            views = np.zeros((n, cfg.in_chans, size, size), np.float32)
            regions = np.zeros((n, size, size), bool)
            boxes = np.zeros((n, 5), np.int64)
            for v in range(n):
                blur_p = (
                    cfg.global_blur_p[min(v, len(cfg.global_blur_p) - 1)]
                    if kind == "global"
                    else cfg.local_blur_p
                )
                views[v], regions[v], boxes[v] = self._one_view(
                    image, region, integral, size, scale, blur_p, rng
                )
            out[f"{kind}_views"] = torch.from_numpy(views)
            out[f"{kind}_regions"] = torch.from_numpy(regions)
            out[f"{kind}_boxes"] = torch.from_numpy(boxes)
        return out

    def _one_view(
        self,
        image: np.ndarray,
        region: np.ndarray,
        integral: _RegionIntegral,
        size: int,
        scale: tuple[float, float],
        blur_p: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One view: ``(C, S, S)`` float32 normalised, ``(S, S)`` bool region, ``(5,)`` box."""
        import cv2

        cfg = self.cfg
        x0, y0, w, h = sample_crop_box(
            region, scale, cfg.aspect_ratio, cfg.min_region_fraction, cfg.max_tries, rng, integral
        )
        crop = image[y0 : y0 + h, x0 : x0 + w]
        # INTER_AREA anti-aliases when shrinking; INTER_LINEAR when enlarging.
        interp = cv2.INTER_AREA if w > size and h > size else cv2.INTER_LINEAR
        view = cv2.resize(crop, (size, size), interpolation=interp).astype(np.float32) / 255.0
        reg = cv2.resize(
            region[y0 : y0 + h, x0 : x0 + w].astype(np.uint8),
            (size, size),
            interpolation=cv2.INTER_NEAREST,
        ).astype(bool)
        flipped = rng.random() < cfg.hflip_p
        if flipped:
            view, reg = view[:, ::-1].copy(), reg[:, ::-1].copy()
        # Draws only when enabled, so OpenUS views keep their random streams.
        if cfg.vflip_p > 0 and rng.random() < cfg.vflip_p:
            view, reg = view[::-1].copy(), reg[::-1].copy()
        if cfg.rotate_p > 0 and rng.random() < cfg.rotate_p:
            view, reg = _rotate(view, reg, rng.uniform(*cfg.rotate_degrees))
        view = self._photometric(view, reg, blur_p, rng)
        chans = np.broadcast_to(view, (cfg.in_chans, size, size))
        normalised = (chans - self._mean) / self._std
        return normalised.astype(np.float32), reg, np.array([x0, y0, w, h, int(flipped)])

    def _photometric(
        self, view: np.ndarray, reg: np.ndarray, blur_p: float, rng: np.random.Generator
    ) -> np.ndarray:
        """Brightness/contrast, gamma, blur and speckle on a ``(S, S)`` float image in [0, 1]."""
        cfg = self.cfg
        if rng.random() < cfg.jitter_p:
            view = view * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
            # Contrast about the mean *inside the scan region*: the black border would bias it.
            ref = float(view[reg].mean()) if reg.any() else float(view.mean())
            view = ref + rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) * (view - ref)
            view = np.clip(view, 0.0, 1.0)
        if rng.random() < cfg.gamma_p:
            lo, hi = np.log(cfg.gamma)
            view = np.power(view, math.exp(rng.uniform(lo, hi)))
        if rng.random() < blur_p:
            # DINO's sigmas are for 224² global views (the same for locals); scale with the
            # global size so a tiny setting blurs as much, relative to the image.
            sigma = rng.uniform(*cfg.blur_sigma) * cfg.global_size / _BLUR_REFERENCE_SIZE
            view = _gaussian_blur(view.astype(np.float32), max(sigma, 1e-3))
        if cfg.speckle_p > 0 and rng.random() < cfg.speckle_p:
            noise = rng.standard_normal(view.shape).astype(np.float32)
            view = np.clip(view * (1 + cfg.speckle_sigma * noise), 0.0, 1.0)
        return view.astype(np.float32)


def _rotate(view: np.ndarray, reg: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a ``(S, S)`` view (bilinear) and its region (nearest) about the centre."""
    import cv2

    size = view.shape[1], view.shape[0]
    rot = cv2.getRotationMatrix2D(((size[0] - 1) / 2, (size[1] - 1) / 2), degrees, 1.0)
    border = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
    view = cv2.warpAffine(view, rot, size, flags=cv2.INTER_LINEAR, **border)
    reg8 = cv2.warpAffine(reg.astype(np.uint8), rot, size, flags=cv2.INTER_NEAREST, **border)
    return view, reg8.astype(bool)


def _check_inputs(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``image`` (H, W) uint8 and ``region`` (H, W); returns contiguous copies."""
    image = np.asarray(image)
    region = np.asarray(region)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a (H, W) uint8 gray frame, got {image.dtype} {image.shape}; "
            "convert with usfm_core.data.catalog.to_gray_uint8"
        )
    if region.shape != image.shape:
        raise ValueError(f"region shape {region.shape} differs from image shape {image.shape}")
    return np.ascontiguousarray(image), np.ascontiguousarray(region.astype(bool))
