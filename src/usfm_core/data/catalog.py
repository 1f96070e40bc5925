"""Index a folder of ultrasound data sets into single training frames.

Layout understood by :meth:`DatasetCatalog.from_folder`::

    root/                     root/                      root/  (output of usfm-core preprocess)
      busi/  *.png ...          a.png b.dcm c.mp4 ...      manifest.csv frames/ region_masks/
      echo/  clip.dcm ...       (one data set)             (one data set)
      prep/  manifest.csv frames/ region_masks/

Every sub-folder of ``root`` is one data set, unless ``root`` itself holds scans (then it is the
only data set) or is a preprocess output. Inside a data set the search is recursive; folders
named like label folders (``masks``, ``labels`` ...) and files named like masks (``*_mask.png``)
are left out, because they are annotations rather than scans. A cine (multi-frame DICOM, video,
TIFF stack) becomes several items, one per frame chosen by
:func:`usfm_core.preprocess.sample_frame_indices` from the header's frame count and fps, so the
index is built without decoding any pixel data.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import ScanReadError, USFMError

log = logging.getLogger(__name__)

#: Still images read directly with OpenCV (always one frame; indexed without decoding).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: Files that may hold several frames; their header is read through ``usfm_core.io``.
MULTIFRAME_EXTENSIONS: frozenset[str] = frozenset(
    {".dcm", ".dicom", ".tif", ".tiff", ".mp4", ".avi", ".mov", ".mkv", ".nii", ".nii.gz"}
)
#: Folder names holding annotations, not scans (compared lower-case).
LABEL_DIR_NAMES: frozenset[str] = frozenset(
    {
        "masks",
        "mask",
        "labels",
        "label",
        "annotations",
        "annotation",
        "region_masks",
        "segmentations",
        "gt",
        "ground_truth",
        "groundtruth",
    }
)
#: File stems that mark annotation images, e.g. BUSI ``benign (4)_mask_1.png``,
#: HC18 ``000_HC_Annotation.png``.
_LABEL_STEM = re.compile(r"_(mask|annotation|seg|segmentation|label)(_\d+)?$", re.IGNORECASE)
#: Column names a ``usfm-core preprocess`` manifest may use for the frame PNG and its mask.
#: A labelled data set's own manifest (e.g. BUSI's ``image,mask,label``) has none of them.
PREPROCESS_PATH_COLUMNS: tuple[str, ...] = (
    "png_path",
    "frame_path",
    "png",
    "frame_png",
    "out_path",
    "output_path",
    "output",
)
PREPROCESS_REGION_COLUMNS: tuple[str, ...] = (
    "region_mask_path",
    "region_mask",
    "region_path",
    "scan_region_path",
    "scan_region",
)
_MAGIC = {
    ".png": (b"\x89PNG\r\n\x1a\n",),
    ".jpg": (b"\xff\xd8\xff",),
    ".jpeg": (b"\xff\xd8\xff",),
    ".bmp": (b"BM",),
}


@dataclass(frozen=True)
class CatalogItem:
    """One training frame: a file, which frame of it, and an optional scan-region mask PNG."""

    dataset: str
    path: Path
    frame: int = 0
    region_mask_path: Path | None = None


def _suffix(path: Path) -> str:
    """Lower-case extension, treating ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _supported_extensions() -> frozenset[str]:
    """Extensions the catalog indexes: ours plus whatever ``usfm_core.io`` reads."""
    from usfm_core.io import SUPPORTED_EXTENSIONS

    return IMAGE_EXTENSIONS | MULTIFRAME_EXTENSIONS | {e.lower() for e in SUPPORTED_EXTENSIONS}


def _is_dicom_without_extension(path: Path) -> bool:
    """True for a file with no suffix whose bytes 128..131 are the DICOM magic ``DICM``."""
    if path.suffix:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _check_image_header(path: Path) -> str | None:
    """Cheap validity check of a still image (its magic bytes); returns a problem or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot open: {exc.strerror or exc}"
    if not head:
        return "empty file"
    signatures = _MAGIC.get(_suffix(path), ())
    if signatures and not any(head.startswith(sig) for sig in signatures):
        return f"not a valid {_suffix(path)[1:].upper()} file (bad header)"
    return None


def sample_clip_frames(
    n_frames: int, fps: float | None, target_fps: float, max_frames: int | None
) -> list[int]:
    """Frame indices kept from a clip: :func:`usfm_core.preprocess.sample_frame_indices`."""
    from usfm_core.preprocess import sample_frame_indices

    if n_frames <= 1:
        return [0]
    return [int(i) for i in sample_frame_indices(n_frames, fps, target_fps, max_frames)]


def _probe_frames(path: Path) -> tuple[int, float | None]:
    """``(n_frames, fps)`` of a possibly multi-frame file, from its header only.

    :func:`usfm_core.io.load_scan` decodes frames lazily, so this reads no pixel data.
    Raises :class:`ScanReadError` when the file cannot be read.
    """
    from usfm_core.io import load_scan

    scan = load_scan(path)
    try:
        return int(scan.n_frames), (float(scan.fps) if scan.fps else None)
    finally:
        _close(scan)


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file, keyed by lower-cased, stripped column names."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            {k.strip().lower(): v.strip() for k, v in row.items() if isinstance(k, str) and v}
            for row in csv.DictReader(fh)
        ]


def preprocess_manifest_columns(folder: Path) -> tuple[str, str | None] | None:
    """``(png column, region column or None)`` if ``folder/manifest.csv`` is a preprocess one.

    Recognised by its columns, not by its presence: a labelled set's manifest (BUSI's
    ``image,mask,...``) is not a preprocess manifest.
    """
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        return None
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError):
        return None
    png_col = next((c for c in PREPROCESS_PATH_COLUMNS if c in header), None)
    if png_col is None:
        return None
    region_col = next((c for c in PREPROCESS_REGION_COLUMNS if c in header), None)
    return png_col, region_col


def _resolve(folder: Path, value: str, default_dir: str) -> Path | None:
    """A manifest path: absolute, relative to the manifest, or a bare name in ``default_dir``."""
    if not value:
        return None
    path = Path(value)
    candidates = [path] if path.is_absolute() else [folder / path]
    candidates.append(folder / default_dir / path.name)
    return next((c for c in candidates if c.is_file()), None)


class DatasetCatalog:
    """An index of training frames grouped by data set; loads ``(image, region)`` pairs.

    Build it with :meth:`from_folder`. ``catalog[i]`` is a :class:`CatalogItem`;
    ``catalog.load(i)`` returns the frame as ``(H, W) uint8`` gray and its scan region as
    ``(H, W) bool``. Region masks not saved by the preprocessor are computed with
    :func:`usfm_core.preprocess.scan_region_mask` and kept in a bit-packed LRU cache.
    """

    def __init__(
        self,
        items: Iterable[CatalogItem],
        *,
        root: Path | None = None,
        skipped: Iterable[tuple[Path, str]] = (),
        region_cache_size: int = 4096,
        scan_cache_size: int = 4,
    ) -> None:
        self.items: list[CatalogItem] = list(items)
        self.root = root
        self.skipped: list[tuple[Path, str]] = list(skipped)
        self.region_cache_size = region_cache_size
        self.scan_cache_size = scan_cache_size
        self._init_caches()

    def _init_caches(self) -> None:
        self._regions: OrderedDict[int, tuple[tuple[int, int], np.ndarray]] = OrderedDict()
        self._scans: OrderedDict[Path, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        # Caches hold open readers and can be large: never ship them to DataLoader workers.
        state = self.__dict__.copy()
        state.pop("_regions", None)
        state.pop("_scans", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        target_fps: float = 3.0,
        max_frames_per_clip: int | None = 64,
    ) -> DatasetCatalog:
        """Index ``root`` (see the module docstring for the layouts understood).

        Still images are indexed by path only; cines are probed for their frame count and fps.
        Unreadable files are skipped and listed in ``catalog.skipped`` (a warning is logged).
        Raises :class:`USFMError` when the folder is missing or holds nothing usable.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise USFMError(
                "data folder not found",
                path=root,
                hint="pass a folder holding one sub-folder of scans per data set",
            )
        skipped: list[tuple[Path, str]] = []
        items: list[CatalogItem] = []
        for name, folder in _dataset_folders(root):
            items.extend(_index_dataset(name, folder, target_fps, max_frames_per_clip, skipped))
        for path, reason in skipped:
            log.warning("skipped %s: %s", path, reason)
        if not items:
            what = f"none of its {len(skipped)} files could be read" if skipped else "it is empty"
            raise USFMError(
                f"no usable scans found ({what})",
                path=root,
                hint="put images / DICOM / cine files (or a `usfm-core preprocess` output) in "
                "one sub-folder per data set; supported: "
                + ", ".join(sorted(_supported_extensions())),
            )
        return cls(items, root=root, skipped=skipped)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> CatalogItem:
        return self.items[index]

    def __iter__(self) -> Iterator[CatalogItem]:
        return iter(self.items)

    @property
    def datasets(self) -> dict[str, list[int]]:
        """Item indices per data set name, in first-seen order."""
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            groups.setdefault(item.dataset, []).append(i)
        return groups

    def summary(self) -> str:
        """A plain-text table: per data set the number of files, frames and saved region masks."""
        rows = []
        for name, idx in self.datasets.items():
            files = {self.items[i].path for i in idx}
            masks = sum(self.items[i].region_mask_path is not None for i in idx)
            rows.append((name, len(files), len(idx), masks))
        width = max([len("data set"), *(len(r[0]) for r in rows)])
        lines = [f"{'data set':<{width}}  {'files':>7}  {'frames':>7}  {'region masks':>12}"]
        lines.append("-" * len(lines[0]))
        for name, n_files, n_items, n_masks in rows:
            lines.append(f"{name:<{width}}  {n_files:>7}  {n_items:>7}  {n_masks:>12}")
        lines.append("-" * len(lines[0]))
        total_files = sum(r[1] for r in rows)
        lines.append(
            f"{'total':<{width}}  {total_files:>7}  {len(self):>7}  {sum(r[3] for r in rows):>12}"
        )
        if self.skipped:
            lines.append(f"{len(self.skipped)} unreadable file(s) skipped")
        return "\n".join(lines)

    # ------------------------------------------------------------------ loading
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``index`` as ``(image (H, W) uint8 gray, region (H, W) bool)``.

        Raises :class:`ScanReadError` if the file has become unreadable since indexing.
        """
        item = self.items[index]
        image = self.load_image(index)
        region = self._cached_region(index, image.shape)
        if region is None:
            region = self._compute_region(item, image)
            self._store_region(index, region)
        return image, region

    def load_image(self, index: int) -> np.ndarray:
        """Frame ``index`` as an ``(H, W) uint8`` gray image."""
        item = self.items[index]
        if _suffix(item.path) in IMAGE_EXTENSIONS:
            import cv2

            image = cv2.imread(str(item.path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise ScanReadError(
                    "cannot decode image", path=item.path, hint="re-export or remove the file"
                )
            return image
        return to_gray_uint8(self._scan(item.path).frame(item.frame), item.path)

    def _scan(self, path: Path) -> Any:
        """An open scan from a small LRU, so consecutive frames of a cine reuse the reader."""
        if path in self._scans:
            self._scans.move_to_end(path)
            return self._scans[path]
        from usfm_core.io import load_scan

        scan = load_scan(path)
        self._scans[path] = scan
        while len(self._scans) > max(self.scan_cache_size, 1):
            _close(self._scans.popitem(last=False)[1])
        return scan

    def _compute_region(self, item: CatalogItem, image: np.ndarray) -> np.ndarray:
        """Region from the preprocess mask PNG if any, else ``scan_region_mask(image)``."""
        if item.region_mask_path is not None:
            import cv2

            mask = cv2.imread(str(item.region_mask_path), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise ScanReadError(
                    "cannot decode region mask",
                    path=item.region_mask_path,
                    hint="re-run `usfm-core preprocess` for this data set",
                )
            if mask.shape != image.shape:
                mask = cv2.resize(
                    mask, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
                )
            return mask > 0
        return compute_scan_region(image)

    def _cached_region(self, index: int, shape: tuple[int, ...]) -> np.ndarray | None:
        entry = self._regions.get(index)
        if entry is None or entry[0] != shape:
            return None
        self._regions.move_to_end(index)
        packed_shape, bits = entry
        n = packed_shape[0] * packed_shape[1]
        return np.unpackbits(bits, count=n).reshape(packed_shape).astype(bool)

    def _store_region(self, index: int, region: np.ndarray) -> None:
        if self.region_cache_size <= 0:
            return
        # Bit-packed: a 384×384 mask costs 18 kB instead of 147 kB.
        self._regions[index] = (region.shape, np.packbits(region.ravel()))
        while len(self._regions) > self.region_cache_size:
            self._regions.popitem(last=False)


def _close(scan: Any) -> None:
    """Release a scan's file handle, if it has one."""
    close = getattr(scan, "close", None)
    if callable(close):
        close()


def to_gray_uint8(frame: np.ndarray, path: Path | None = None) -> np.ndarray:
    """``(H, W)`` / ``(H, W, 1|3|4)`` frame of any numeric type → ``(H, W) uint8`` gray.

    Colour is treated as RGB(A); non-uint8 data is min-max scaled to 0..255.
    """
    import cv2

    arr = np.asarray(frame)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        if arr.dtype != np.uint8:
            arr = _scale_to_uint8(arr)
        code = cv2.COLOR_RGB2GRAY if arr.shape[-1] == 3 else cv2.COLOR_RGBA2GRAY
        arr = cv2.cvtColor(np.ascontiguousarray(arr), code)
    if arr.ndim != 2:
        raise ScanReadError(f"expected a 2-D frame, got shape {arr.shape}", path=path)
    return arr if arr.dtype == np.uint8 else _scale_to_uint8(arr)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 (constant arrays become zeros)."""
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def compute_scan_region(image: np.ndarray) -> np.ndarray:
    """Scan region ``(H, W) bool`` of a gray frame, by ``preprocess.scan_region_mask``."""
    from usfm_core.preprocess import scan_region_mask

    return np.asarray(scan_region_mask(image), dtype=bool)


# ---------------------------------------------------------------------- folder walking
def _dataset_folders(root: Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` per data set under ``root``."""
    if preprocess_manifest_columns(root) is not None or _holds_scans_directly(root):
        return [(root.resolve().name or "data", root)]
    return [
        (sub.name, sub)
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.name.startswith(".") and sub.name.lower() not in LABEL_DIR_NAMES
    ]


def _holds_scans_directly(folder: Path) -> bool:
    """True when ``folder`` itself contains scan files (not only sub-folders)."""
    exts = _supported_extensions()
    return any(_is_candidate(p, exts) for p in folder.iterdir() if p.is_file())


def _is_candidate(path: Path, exts: frozenset[str]) -> bool:
    """A file that may be a scan: supported suffix (or extension-less DICOM), not a mask."""
    if path.name.startswith("."):
        return False
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
    if _LABEL_STEM.search(stem):
        return False
    return _suffix(path) in exts or _is_dicom_without_extension(path)


def _walk(folder: Path) -> Iterator[Path]:
    """Files and preprocess-output folders under ``folder``, sorted, skipping label folders."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if entry.name.lower() in LABEL_DIR_NAMES:
                continue
            if preprocess_manifest_columns(entry) is not None:
                yield entry
            else:
                yield from _walk(entry)
        elif entry.is_file():
            yield entry


def _index_dataset(
    name: str,
    folder: Path,
    target_fps: float,
    max_frames: int | None,
    skipped: list[tuple[Path, str]],
) -> list[CatalogItem]:
    """Items of one data set folder (a preprocess output or a tree of scan files)."""
    if preprocess_manifest_columns(folder) is not None:
        return _index_preprocess_output(name, folder, skipped)
    exts = _supported_extensions()
    items: list[CatalogItem] = []
    for path in _walk(folder):
        if path.is_dir():
            items.extend(_index_preprocess_output(name, path, skipped))
        elif _is_candidate(path, exts):
            items.extend(_index_file(name, path, target_fps, max_frames, skipped))
    return items


def _index_file(
    name: str,
    path: Path,
    target_fps: float,
    max_frames: int | None,
    skipped: list[tuple[Path, str]],
) -> list[CatalogItem]:
    """One item per kept frame of ``path``; an unreadable file is appended to ``skipped``."""
    if _suffix(path) in IMAGE_EXTENSIONS:
        problem = _check_image_header(path)
        if problem:
            skipped.append((path, problem))
            return []
        return [CatalogItem(name, path, 0, None)]
    try:
        n_frames, fps = _probe_frames(path)
    except USFMError as exc:
        skipped.append((path, str(exc).splitlines()[0]))
        return []
    except Exception as exc:  # a reader bug must not abort indexing of thousands of files
        skipped.append((path, f"{type(exc).__name__}: {exc}"))
        return []
    if n_frames < 1:
        skipped.append((path, "no frames"))
        return []
    frames = sample_clip_frames(n_frames, fps, target_fps, max_frames)
    return [CatalogItem(name, path, int(f), None) for f in frames]


def _index_preprocess_output(
    name: str, folder: Path, skipped: list[tuple[Path, str]]
) -> list[CatalogItem]:
    """Items listed in a ``usfm-core preprocess`` manifest, with their region-mask PNGs."""
    columns = preprocess_manifest_columns(folder)
    assert columns is not None
    png_col, region_col = columns
    try:
        rows = _read_csv_rows(folder / "manifest.csv")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        skipped.append((folder / "manifest.csv", f"unreadable manifest: {exc}"))
        return []
    items = []
    for row in rows:
        path = _resolve(folder, row.get(png_col, ""), "frames")
        if path is None:
            skipped.append((folder / (row.get(png_col) or "?"), "listed in manifest but missing"))
            continue
        region = _resolve(folder, row.get(region_col, ""), "region_masks") if region_col else None
        if region is None and (folder / "region_masks" / path.name).is_file():
            region = folder / "region_masks" / path.name
        items.append(CatalogItem(name, path, 0, region))
    return items
