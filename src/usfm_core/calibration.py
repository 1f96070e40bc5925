"""Pixel size (mm) of an input for measurements: the scan's own calibration, a manifest, or the
user's ``--pixel-size``.

Order (first found wins):

1. the scan's calibration (:attr:`usfm_core.io.Scan.spacing_mm`: DICOM ultrasound regions or
   PixelSpacing, TIFF / NIfTI spacing) — the machine measured it;
2. a ``manifest.csv`` in the image's folder or up to two folders above it that lists the image
   (``image`` column with ``pixel_size_mm``, the labelled-folder layout of
   :mod:`usfm_core.finetune.data`; or ``png`` with ``spacing_dy_mm`` / ``spacing_dx_mm``, what
   ``usfm-core preprocess`` writes);
3. the user's pixel size (``--pixel-size MM`` or ``DY,DX``).

When the user's pixel size disagrees (by more than 0.1 %) with 1. or 2., the file's value is
kept and :meth:`Calibrator.lookup` returns a warning saying so.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from usfm_core.errors import USFMError

MANIFEST_NAME = "manifest.csv"
MANIFEST_LEVELS = 3  # the image's folder and two above it (data/images/x.png -> data/manifest)
REL_TOLERANCE = 1e-3  # user vs file pixel size: equal within 0.1 %
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

Spacing = tuple[float, float]


def parse_pixel_size(text: str) -> Spacing:
    """``"0.15"`` → ``(0.15, 0.15)``; ``"0.2,0.3"`` → ``(dy, dx) = (0.2, 0.3)`` (mm per pixel).

    Raises :class:`ValueError` with a readable message for anything else (argparse shows it).
    """
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 2):
        raise ValueError(f"expected MM or DY,DX (mm per pixel), got {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected MM or DY,DX (mm per pixel), got {text!r}") from None
    if not all(0 < v < 1e3 for v in values):  # also refuses nan / inf
        raise ValueError(f"pixel size must be > 0 and < 1000 mm, got {text!r}")
    return (values[0], values[-1])


def _positive(cell: str | None) -> float | None:
    """A manifest cell as a positive finite float, else None (empty, text, 0, nan)."""
    try:
        value = float(cell) if cell not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < 1e3 else None


def read_manifest_spacings(manifest: Path) -> dict[str, Spacing]:
    """``{normalised absolute image path: (dy, dx) mm}`` from one manifest (rows without a
    usable pixel size are left out; a manifest without the columns gives ``{}``)."""
    root = manifest.parent
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return {}
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    out: dict[str, Spacing] = {}
    for row in rows:
        rel = row.get("image") or row.get("png")
        if not rel:
            continue
        iso = _positive(row.get("pixel_size_mm"))
        dy, dx = _positive(row.get("spacing_dy_mm")), _positive(row.get("spacing_dx_mm"))
        spacing = (iso, iso) if iso else (dy, dx) if dy and dx else None
        if spacing:
            out[_key(root / rel)] = spacing
    return out


def manifest_images(folder: Path) -> list[Path] | None:
    """Images listed by ``folder/manifest.csv`` (``image`` or ``png`` column, manifest order),
    or None when the folder has no such manifest."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            column = next((c for c in ("image", "png") if c in (reader.fieldnames or [])), None)
            if column is None:
                return None
            return [folder / row[column] for row in reader if row.get(column)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise USFMError(f"cannot read the manifest: {exc}", path=manifest) from exc


def _key(path: Path) -> str:
    """Comparable form of a path (absolute, ``..`` resolved, case as the OS compares)."""
    return os.path.normcase(os.path.abspath(path))


@dataclass
class Calibration:
    """The pixel size chosen for one input and where it came from.

    ``spacing``: ``(dy, dx)`` mm per pixel or None (pixel units); ``source``: ``"file"``,
    ``"manifest"``, ``"--pixel-size"`` or ``"none"``; ``warning``: a message when the user's
    pixel size was overruled, else ``""``.
    """

    spacing: Spacing | None
    source: str
    warning: str = ""


class Calibrator:
    """Chooses each input's pixel size (see the module docstring); caches manifests."""

    def __init__(self, user_spacing: Spacing | None = None, user_label: str = "--pixel-size"):
        self.user_spacing, self.user_label = user_spacing, user_label
        self._manifests: dict[Path, dict[str, Spacing]] = {}

    def from_manifest(self, image: Path) -> tuple[Spacing, Path] | None:
        """``(spacing, manifest path)`` for an image listed with a pixel size, else None."""
        key = _key(image)
        folder = Path(os.path.abspath(image)).parent
        for _ in range(MANIFEST_LEVELS):
            manifest = folder / MANIFEST_NAME
            if manifest not in self._manifests:
                self._manifests[manifest] = (
                    read_manifest_spacings(manifest) if manifest.is_file() else {}
                )
            if key in self._manifests[manifest]:
                return self._manifests[manifest][key], manifest
            if folder.parent == folder:
                break
            folder = folder.parent
        return None

    def lookup(self, image: Path, scan_spacing: Spacing | None) -> Calibration:
        """The calibration of ``image`` whose reader found ``scan_spacing`` (None: none)."""
        if scan_spacing:
            found, source, where = tuple(map(float, scan_spacing)), "file", "the file's"
        else:
            hit = self.from_manifest(image)
            if hit is None:
                if self.user_spacing:
                    return Calibration(self.user_spacing, self.user_label)
                return Calibration(None, "none")
            found, source, where = hit[0], "manifest", f"{hit[1]}'s"
        warning = ""
        user = self.user_spacing
        if user and any(abs(u - f) > REL_TOLERANCE * f for u, f in zip(user, found)):
            warning = (
                f"{image}: {self.user_label} {_fmt(user)} mm disagrees with {where} pixel size "
                f"{_fmt(found)} mm; using {_fmt(found)} mm"
            )
        return Calibration(found, source, warning)  # type: ignore[arg-type]


def _fmt(spacing: Spacing) -> str:
    dy, dx = spacing
    return f"{dy:.6g}" if dy == dx else f"{dy:.6g},{dx:.6g}"
