"""De-identification of scans: DICOM tags, burned-in text, file names (``usfm-core deidentify``).

For every scan under the input (a file, or a folder searched recursively)::

    OUT/<pseudonym>.<ext>     the scan, same format, burned-in text removed from the pixels,
                              DICOM tags scrubbed (basic profile, see ``dicom_deid``)
    OUT/manifest.csv          one row per output: format, kind, frames, spacing, fps, scrubbed px
    MAPPING (private, 0600)   pseudonym → relative source path, outside OUT by default
    KEY     (private, 0600)   the secret key of the pseudonyms and UID hashes, beside MAPPING

Pseudonyms are ``scan-`` + the first 16 hex digits of HMAC-SHA256(key, relative path), so the
same file gets the same name in every run with the same key (or ``--salt``), and the name
reveals nothing without the key. Files that cannot be read are *not* copied.

Pixels: burned-in text is found with Tesseract OCR (word boxes on the brightest channel and on
its binarised bright strokes, of up to ``OCR_SAMPLE_FRAMES`` frames of a cine and their temporal
median) united with the glyph heuristic of
:mod:`usfm_core.preprocess.annotations` inside the scan region and its permissive variant
outside it, then inpainted. Without Tesseract the run refuses unless ``allow_no_ocr``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from usfm_core.errors import USFMError
from usfm_core.outputs import atomic_path, clean_stale_temporaries

log = logging.getLogger(__name__)

KEY_BYTES = 32
PSEUDONYM_PREFIX = "scan-"
PSEUDONYM_HEX_DIGITS = 16
OCR_SAMPLE_FRAMES = 8  # frames of a cine OCR'd (plus the temporal median); text is static
# Second OCR view: near-white (>= level), contrasted (top-hat >= contrast) strokes, binarised
# black on white and upscaled. Words count when read with confidence >= OCR_CONFIDENT (0-100) or
# when they look like identifiers (>= OCR_MIN_TOKEN_CHARS letters/digits, or 2 digits) at any
# confidence, so an MRN crossing bright tissue counts while speckle read as 'oe' does not.
OCR_BINARY_LEVEL = 200
OCR_BINARY_CONTRAST = 60
OCR_CONFIDENT = 60.0
OCR_MIN_TOKEN_CHARS = 4
OCR_UPSCALE = 2
OCR_VERIFY_PASSES = 1  # extra OCR passes on the cleaned frames catching what inpainting left
MAPPING_COLUMNS: tuple[str, ...] = ("pseudonym", "source", "output")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "file",
    "format",
    "kind",
    "n_frames",
    "spacing_dy_mm",
    "spacing_dx_mm",
    "slice_spacing_mm",
    "fps",
    "n_scrubbed_px",
    "ocr",
)
# Files that are certainly not scans are not tried (and never copied).
SKIP_SUFFIXES = frozenset({".csv", ".txt", ".json", ".md", ".yaml", ".yml", ".xml", ".log", ".py"})
NO_OCR_HINT = (
    "install Tesseract (apt-get install tesseract-ocr, or conda install -c conda-forge "
    "tesseract), or pass --allow-no-ocr to accept the glyph heuristic alone (it misses text)"
)


# --------------------------------------------------------------------------- pseudonyms, keys


class Pseudonymizer:
    """Stable, keyed pseudonyms for relative file paths (HMAC-SHA256)."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("the pseudonym key must have at least 16 bytes")
        self.key = key

    @classmethod
    def from_salt(cls, salt: str) -> Pseudonymizer:
        """Key derived from a user-given secret text (``--salt``)."""
        if not salt:
            raise USFMError("the salt is empty", hint="pass a non-empty --salt, or omit it")
        return cls(hashlib.sha256(b"usfm-core deidentify salt\0" + salt.encode()).digest())

    @classmethod
    def from_key_file(cls, path: str | Path) -> Pseudonymizer:
        """Key read from ``path`` (64 hex digits), created there (mode 0600) if missing."""
        path = Path(path)
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            try:
                key = bytes.fromhex(text)
            except ValueError:
                key = b""
            if len(key) != KEY_BYTES:
                raise USFMError(
                    f"not a pseudonym key ({2 * KEY_BYTES} hex digits expected)",
                    path=path,
                    hint="point --key at the key file written by an earlier run, or at a new path",
                )
            return cls(key)
        key = secrets.token_bytes(KEY_BYTES)
        write_private_text(path, key.hex() + "\n")
        log.info("new pseudonym key written to %s (keep it private)", path)
        return cls(key)

    def name(self, rel: str | Path) -> str:
        """``scan-<16 hex>`` for a relative path (POSIX form, so it is the same on every OS)."""
        text = Path(rel).as_posix()
        digest = hmac.new(self.key, text.encode("utf-8"), hashlib.sha256).hexdigest()
        return PSEUDONYM_PREFIX + digest[:PSEUDONYM_HEX_DIGITS]


def write_private_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically to ``path`` readable by the owner only (mode 0600)."""
    with atomic_path(path, mode=0o600) as tmp:  # the mode is set before the rename
        tmp.write_text(text, encoding="utf-8")


def default_mapping_path(out_dir: str | Path) -> Path:
    """``<OUT>.mapping.csv`` beside the output folder (outside it)."""
    out = Path(out_dir).resolve()
    return out.parent / f"{out.name}.mapping.csv"


def default_key_path(mapping: str | Path) -> Path:
    """The key file beside the mapping: ``<mapping without .csv>.key``."""
    mapping = Path(mapping)
    stem = mapping.name[: -len(".csv")] if mapping.name.endswith(".csv") else mapping.name
    return mapping.with_name(f"{stem}.key")


def write_mapping(path: str | Path, rows: list[dict[str, str]]) -> None:
    """Write the pseudonym → source mapping (``MAPPING_COLUMNS``) as a private CSV.

    Rows of earlier runs with other sources are kept (the mapping of a project grows); a row
    with an empty ``output`` is a source planned (or not written) by the current run.
    """
    path = Path(path)
    merged: dict[str, dict[str, str]] = {}
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("pseudonym"):
                    merged[row["pseudonym"]] = {k: row.get(k, "") for k in MAPPING_COLUMNS}
    for row in rows:
        known = merged.get(row["pseudonym"], {})
        # An empty output (planned, or failed this time) keeps what an earlier run wrote.
        merged[row["pseudonym"]] = {**row, "output": row["output"] or known.get("output", "")}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MAPPING_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(merged.values(), key=lambda r: r["source"]))
    write_private_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- OCR requirement


def require_ocr(allow_no_ocr: bool) -> bool:
    """True when Tesseract is usable; without it raise unless ``allow_no_ocr`` (then False)."""
    from usfm_core.preprocess.annotations import tesseract_available

    if tesseract_available():
        return True
    if allow_no_ocr:
        log.warning(
            "tesseract not found: burned-in text is removed by the glyph heuristic only and "
            "may survive (--allow-no-ocr)"
        )
        return False
    raise USFMError(
        "de-identification needs Tesseract OCR to find burned-in text (names, MRNs), and the "
        "tesseract executable is not installed",
        hint=NO_OCR_HINT,
    )


# --------------------------------------------------------------------------- pixels


def _uint8_view(frames: np.ndarray) -> np.ndarray:
    """(T, H, W[, 3]) frames of any dtype → uint8, one 0.5–99.5 % window over the stack."""
    if frames.dtype == np.uint8:
        return frames
    stack = frames.astype(np.float32)
    finite = stack[np.isfinite(stack)]
    if finite.size == 0:
        return np.zeros(frames.shape, np.uint8)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    scaled = np.zeros_like(stack) if hi <= lo else (stack - lo) / (hi - lo)
    return (np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def brightness(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) uint8 brightest channel of (T, H, W[, 3]) uint8 frames: text in any light
    colour (yellow, green, cyan labels) is as bright here as white text, unlike in grey."""
    return frames.max(axis=-1) if frames.ndim == 4 else frames


def _sample(n: int, k: int) -> list[int]:
    """Up to ``k`` evenly spaced indices of ``range(n)``, first and last included."""
    return sorted({round(float(i)) for i in np.linspace(0, n - 1, min(n, k))})


def _bright_binary(gray: np.ndarray) -> np.ndarray:
    """(H, W) uint8 black-on-white image of the near-white, contrasted strokes of ``gray``.

    Tesseract reads text drawn over speckle far better from this than from the grey frame.
    """
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (15, 15))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    strokes = (gray >= OCR_BINARY_LEVEL) & (tophat >= OCR_BINARY_CONTRAST)
    return np.where(strokes, 0, 255).astype(np.uint8)


def _identifier_like(word: str, conf: float) -> bool:
    """Whether an OCR word counts as text: a confident read, or an identifier-like token (at
    least ``OCR_MIN_TOKEN_CHARS`` letters/digits, or two digits) read with any confidence.

    Speckle and bright tissue are read as short low-confidence words ('oe', 'Se'); a name or an
    MRN crossing a bright interface is read as a long one with low confidence ('MERN12345678').
    """
    if conf < 0:  # Tesseract's layout rows, not words
        return False
    alnum = [c for c in word if c.isalnum()]
    digits = sum(c.isdigit() for c in alnum)
    return bool(alnum) and (
        conf >= OCR_CONFIDENT or len(alnum) >= OCR_MIN_TOKEN_CHARS or digits >= 2
    )


def _tesseract_boxes(image: np.ndarray, upscale: int) -> np.ndarray:
    """(H, W) bool filled word boxes Tesseract reads in ``image`` (upscaled ``upscale``×)."""
    import cv2
    import pytesseract

    from usfm_core.preprocess.annotations import OCR_CONFIG

    big = cv2.resize(image, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_NEAREST)
    data = pytesseract.image_to_data(big, config=OCR_CONFIG, output_type=pytesseract.Output.DICT)
    h, w = image.shape
    mask = np.zeros((h, w), np.uint8)
    lines = zip(data["page_num"], data["block_num"], data["par_num"], data["line_num"])
    words = list(
        zip(
            data["text"], data["conf"], data["left"], data["top"], data["width"],
            data["height"], lines,
        )
    )  # fmt: skip
    # A line with one identifier-like word is a line of text: its other words go too. The
    # label beside an MRN is short and often misread at confidence 0 ('MRN' as '—MEN' on an
    # AVX-512 machine, where Tesseract's arithmetic differs), too little to count on its own.
    text_lines = {key for text, conf, *_, key in words if _identifier_like(str(text), float(conf))}
    for text, conf, x, y, bw, bh, key in words:
        if float(conf) < 0 or not any(c.isalnum() for c in str(text)):
            continue
        if key not in text_lines:
            continue
        x0, y0 = x // upscale, y // upscale
        x1, y1 = (x + bw) // upscale + 1, (y + bh) // upscale + 1
        if y1 - y0 > h / 6:  # speckle read as a giant glyph
            continue
        cv2.rectangle(mask, (x0 - 1, y0 - 1), (x1, y1), 1, thickness=-1)
    return mask.astype(bool)


def _ocr_boxes(gray: np.ndarray) -> np.ndarray:
    """(H, W) bool text boxes of a (H, W) uint8 frame: Tesseract on the grey frame (the
    annotation module's filter) united with Tesseract on its binarised bright strokes."""
    import pytesseract

    from usfm_core.preprocess.annotations import ocr_text_mask

    os.environ["OMP_THREAD_LIMIT"] = "1"
    try:
        return ocr_text_mask(gray) | _tesseract_boxes(_bright_binary(gray), OCR_UPSCALE)
    except pytesseract.TesseractError as exc:  # one unreadable frame must not stop the run
        log.warning("tesseract failed on a frame: %s", exc)
        return np.zeros(gray.shape, bool)


def clip_ocr_mask(gray: np.ndarray) -> np.ndarray:
    """(H, W) bool union of OCR word boxes on sampled frames and the median of a (T, H, W) stack.

    Burned-in text does not move, so the temporal median keeps it sharp while speckle fades.
    """
    views = [gray[t] for t in _sample(gray.shape[0], OCR_SAMPLE_FRAMES)]
    if gray.shape[0] > 2:
        views.append(np.median(gray, axis=0).astype(np.uint8))
    mask = np.zeros(gray.shape[1:], bool)
    seen: set[bytes] = set()
    for view in views:
        digest = hashlib.sha1(view.tobytes()).digest()
        if digest not in seen:  # repeated (frozen) frames are read once
            seen.add(digest)
            mask |= _ocr_boxes(view)
    return mask


def _frame_text_mask(gray: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(H, W) bool glyph-heuristic text: glyph-like strokes inside the region, any word outside."""
    from usfm_core.preprocess.annotations import glyph_text_mask

    return glyph_text_mask(gray, region) | (glyph_text_mask(gray, None) & ~region)


def _grow(mask: np.ndarray) -> np.ndarray:
    """Close 5×5 then dilate 3×3 a (H, W) bool mask (covers anti-aliased stroke edges)."""
    import cv2

    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    return cv2.dilate(m, np.ones((3, 3), np.uint8)).astype(bool)


def _inpaint(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Navier–Stokes inpainting of ``mask`` (H, W) in a frame of any dtype, same dtype back."""
    import cv2

    m = mask.astype(np.uint8)
    if frame.dtype == np.uint8 or (frame.ndim == 2 and frame.dtype in (np.uint16, np.float32)):
        return cv2.inpaint(np.ascontiguousarray(frame), m, 3, cv2.INPAINT_NS)
    channels = frame[..., None] if frame.ndim == 2 else frame
    out = np.stack(
        [
            cv2.inpaint(np.ascontiguousarray(c, dtype=np.float32), m, 3, cv2.INPAINT_NS)
            for c in np.moveaxis(channels, -1, 0)
        ],
        axis=-1,
    )
    out = out[..., 0] if frame.ndim == 2 else out
    if np.issubdtype(frame.dtype, np.integer):
        info = np.iinfo(frame.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(frame.dtype)


def scrub_frames(frames: np.ndarray, *, use_ocr: bool) -> tuple[np.ndarray, int]:
    """Remove burned-in text from ``frames`` (T, H, W[, 3]) of any dtype.

    Returns ``(clean frames of the same shape and dtype, number of inpainted pixels summed over
    frames)``. The scan region comes from the temporal statistics of the frames; text is found
    with OCR (``use_ocr``, see :func:`clip_ocr_mask`) and the glyph heuristic per frame.
    """
    from usfm_core.preprocess.region import scan_region_mask, to_gray

    frames = np.asarray(frames)
    view = _uint8_view(frames)
    gray = np.stack([to_gray(f) for f in view])
    step = max(1, len(view) // 16)
    region = scan_region_mask(view[0] if len(view) == 1 else view[::step])
    static = clip_ocr_mask(brightness(view)) if use_ocr else np.zeros(gray.shape[1:], bool)
    out = np.empty_like(frames)
    masks = []
    for t in range(len(frames)):
        mask = _grow(static | _frame_text_mask(gray[t], region))
        out[t] = _inpaint(frames[t], mask) if mask.any() else frames[t]
        masks.append(mask)
    # OCR the cleaned frames: what inpainting left readable is removed again (only where OCR
    # read text at all: what it could not read before inpainting it cannot read after).
    for _ in range(OCR_VERIFY_PASSES if use_ocr and static.any() else 0):
        left = clip_ocr_mask(brightness(_uint8_view(out)))
        if not left.any():
            break
        left = _grow(left)
        for t in range(len(out)):
            out[t] = _inpaint(out[t], left)
            masks[t] |= left
    return out, int(sum(int(m.sum()) for m in masks))


# --------------------------------------------------------------------------- writing one scan


def output_suffix(fmt: str, source: Path) -> str:
    """Extension of the de-identified file: same format as the source (DICOM → ``.dcm``)."""
    from usfm_core.io.writers import VIDEO_CODECS

    suffix = source.suffix.lower()
    if fmt == "dicom":
        return ".dcm"
    if fmt == "video":
        return suffix if suffix in VIDEO_CODECS else ".avi"
    if fmt == "tiff":
        return ".tif"
    if fmt == "nifti":
        return ".nii.gz"
    return suffix if suffix in (".png", ".jpg", ".jpeg", ".bmp") else ".png"


def _write_dicom(
    source: Path, target: Path, frames: np.ndarray, key: bytes, *, ocr: bool, rel: str
) -> None:
    """Scrubbed header (basic profile) + the clean frames, uncompressed explicit VR LE."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from usfm_core.io.writers import US_IMAGE_STORAGE
    from usfm_core.preprocess.dicom_deid import deidentify_dataset, hashed_uid

    ds = pydicom.dcmread(str(source), stop_before_pixels=True)
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = US_IMAGE_STORAGE
    if "SOPInstanceUID" not in ds:
        ds.SOPInstanceUID = hashed_uid(key, "file:" + rel)
    deidentify_dataset(ds, key, pixels_scrubbed_with_ocr=ocr)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        # Stored inverted from now on: windows and padding given in MONOCHROME1 values lie.
        for name in ("WindowCenter", "WindowWidth", "VOILUTSequence", "PixelPaddingValue"):
            if name in ds:
                del ds[name]
    for name in (
        "PixelData",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "PlanarConfiguration",
    ):
        if name in ds:
            del ds[name]
    n, height, width = frames.shape[:3]
    rgb = frames.ndim == 4
    bits = 8 * frames.dtype.itemsize
    stored = int(ds.get("BitsStored", bits) or bits)
    ds.Rows, ds.Columns = height, width
    if n > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = n
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = stored if 0 < stored <= bits and not rgb else bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(frames.dtype, np.signedinteger) else 0
    ds.PixelData = np.ascontiguousarray(frames).astype(frames.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    with atomic_path(target) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def _write_other(scan: Any, target: Path, frames: np.ndarray) -> None:
    """Write non-DICOM clean frames in the source's format with its spacing / timing."""
    from usfm_core.io import write_image, write_nifti, write_tiff, write_video

    if scan.format == "video":
        write_video(target, _uint8_view(frames), scan.fps or 25.0)
    elif scan.format == "tiff":
        arr = frames if frames.dtype in (np.uint8, np.uint16) else frames.astype(np.float32)
        write_tiff(
            target,
            arr,
            spacing_mm=scan.spacing_mm,
            fps=scan.fps if scan.kind == "cine" else None,
            slice_spacing_mm=scan.slice_spacing_mm if scan.kind == "volume" else None,
        )
    elif scan.format == "nifti":
        dy, dx = scan.spacing_mm or (1.0, 1.0)
        write_nifti(target, frames, (scan.slice_spacing_mm or 1.0, dy, dx))
    else:
        if len(frames) != 1:
            raise USFMError(f"expected one image, got {len(frames)} frames", path=scan.path)
        write_image(target, frames[0])


@dataclass
class DeidentifySummary:
    """What a run did: outputs, failures ``(relative source, reason)``, the private files."""

    out_dir: Path
    mapping: Path
    key: Path | None
    n_sources: int = 0
    n_written: int = 0
    n_scrubbed_px: int = 0
    ocr: bool = True
    failures: list[tuple[str, str]] = field(default_factory=list)


def deidentify_file(
    source: Path, rel: str, out_dir: Path, pseudo: Pseudonymizer, *, ocr: bool
) -> dict[str, Any]:
    """De-identify one scan into ``out_dir``; returns its manifest row (``MANIFEST_COLUMNS``)."""
    from usfm_core.io import load_scan

    with load_scan(source) as scan:
        frames = np.asarray(scan.frames)
        clean, n_px = scrub_frames(frames, use_ocr=ocr)
        name = pseudo.name(rel) + output_suffix(scan.format, source)
        target = out_dir / name
        if scan.format == "dicom":
            _write_dicom(source, target, clean, pseudo.key, ocr=ocr, rel=rel)
        else:
            _write_other(scan, target, clean)
        spacing = scan.spacing_mm or ("", "")
        return {
            "file": name,
            "format": scan.format,
            "kind": scan.kind,
            "n_frames": scan.n_frames,
            "spacing_dy_mm": spacing[0],
            "spacing_dx_mm": spacing[1],
            "slice_spacing_mm": scan.slice_spacing_mm or "",
            "fps": scan.fps or "",
            "n_scrubbed_px": n_px,
            "ocr": "yes" if ocr else "no",
        }


# --------------------------------------------------------------------------- preprocess hook


@dataclass
class PreprocessDeidentifier:
    """What ``preprocess --deidentify`` needs (picklable, so worker processes get it too).

    Attributes:
        pseudo: the keyed pseudonymizer of relative source paths.
        mapping: private mapping CSV written at the end of the run.
        key: the key file (None when derived from a salt).
        ocr: whether Tesseract is used (False only with ``allow_no_ocr``).
    """

    pseudo: Pseudonymizer
    mapping: Path
    key: Path | None
    ocr: bool

    @classmethod
    def setup(
        cls,
        in_dir: str | Path,
        out_dir: str | Path,
        *,
        mapping: str | Path | None = None,
        key: str | Path | None = None,
        salt: str | None = None,
        allow_no_ocr: bool = False,
    ) -> PreprocessDeidentifier:
        """Check paths and OCR (refuses without Tesseract unless ``allow_no_ocr``), load or
        create the key. Same defaults as :func:`run_deidentify`."""
        in_dir, out_dir = Path(in_dir).expanduser(), Path(out_dir).expanduser()
        mapping_path = Path(mapping).expanduser() if mapping else default_mapping_path(out_dir)
        key_path = None if salt else Path(key or default_key_path(mapping_path)).expanduser()
        check_paths(in_dir, out_dir, mapping_path, key_path)
        ocr = require_ocr(allow_no_ocr)
        pseudo = Pseudonymizer.from_salt(salt) if salt else Pseudonymizer.from_key_file(key_path)
        return cls(pseudo=pseudo, mapping=mapping_path, key=key_path, ocr=ocr)

    def stem(self, rel: str | Path) -> str:
        """Output stem (frames, masks, markers, manifest ``source``) of a relative source."""
        return self.pseudo.name(rel)

    def redact(self, text: str, source: Path, rel: Path) -> str:
        """``text`` (an error message) with the source's path, relative path, name and stem
        replaced by its pseudonym, so failures can be written inside the output folder."""
        pseudonym = self.stem(rel)
        names = {str(source), str(source.resolve()), Path(rel).as_posix(), source.name}
        names |= {source.stem} if len(source.stem) >= 3 else set()
        for name in sorted(names, key=len, reverse=True):
            text = text.replace(name, pseudonym)
        return text

    def write_mapping(self, rels: list[Path]) -> None:
        """Write the private mapping of the given relative sources (pseudonym → source)."""
        rows = [
            {"pseudonym": self.stem(rel), "source": Path(rel).as_posix(), "output": self.stem(rel)}
            for rel in rels
        ]
        if rows:
            write_mapping(self.mapping, rows)


def preprocess_text_mask(
    frames: list[np.ndarray], found: np.ndarray | None, use_ocr: bool | str
) -> np.ndarray | None:
    """Text mask of a source for ``preprocess --deidentify``: ``found`` (the pipeline's own
    OCR mask, or None) united with :func:`clip_ocr_mask` of its uint8 frames (grown), when
    ``use_ocr`` is not False; else ``found`` unchanged. Shape (H, W) bool."""
    if use_ocr is False or not frames:
        return found
    mask = _grow(clip_ocr_mask(brightness(np.stack(frames))))
    return mask if found is None else mask | found


# --------------------------------------------------------------------------- whole run


def find_scan_files(in_path: Path) -> list[tuple[Path, str]]:
    """``(file, relative POSIX path)`` of candidate scans: the file itself, or every visible
    regular file under a folder (sorted), notes and tables (``SKIP_SUFFIXES``) left out."""
    if in_path.is_file():
        return [(in_path, in_path.name)]
    found = []
    for path in sorted(in_path.rglob("*")):
        rel = path.relative_to(in_path)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in SKIP_SUFFIXES:
            continue
        found.append((path, rel.as_posix()))
    return found


def _inside(path: Path, folder: Path) -> bool:
    """True when resolved ``path`` is ``folder`` or lies under it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_paths(in_path: Path, out_dir: Path, mapping: Path, key: Path | None) -> None:
    """Refuse runs that could write over or into the input, or lose the private files."""
    from usfm_core.outputs import check_out_dir

    if not in_path.exists():
        raise USFMError("no such file or folder", path=in_path, hint="check the path")
    check_out_dir(out_dir, [in_path])
    folder = in_path if in_path.is_dir() else in_path.parent
    if in_path.is_dir() and _inside(out_dir, in_path):
        raise USFMError(
            "the output folder lies inside the input folder (outputs would mix with inputs)",
            path=out_dir,
            hint="choose an output folder outside the input folder",
        )
    if in_path.is_file() and out_dir.resolve() == folder.resolve():
        raise USFMError(
            "the output folder is the input file's folder",
            path=out_dir,
            hint="choose a separate output folder",
        )
    for private in (mapping, key):
        if private is None:
            continue
        if (in_path.is_dir() and _inside(private, in_path)) or (
            in_path.is_file() and private.resolve() == in_path.resolve()
        ):
            raise USFMError(
                "the mapping / key file would be written into the input",
                path=private,
                hint="choose --mapping / --key paths outside the input",
            )
        if private.exists() and private.is_dir():
            raise USFMError("expected a file, found a folder", path=private)


def run_deidentify(
    in_path: str | Path,
    out_dir: str | Path,
    *,
    mapping: str | Path | None = None,
    key: str | Path | None = None,
    salt: str | None = None,
    allow_no_ocr: bool = False,
) -> DeidentifySummary:
    """De-identify a scan file or a folder of scans into ``out_dir``; see the module docstring.

    Args:
        in_path: a scan file or a folder (searched recursively).
        out_dir: output folder (created); must not be or lie inside the input folder.
        mapping: the private pseudonym → source CSV (default: ``<OUT>.mapping.csv`` beside OUT).
        key: the secret key file (default: beside the mapping; created when missing).
        salt: a user secret used instead of a key file.
        allow_no_ocr: run without Tesseract (text found by the glyph heuristic only).
    """
    in_path, out_dir = Path(in_path).expanduser(), Path(out_dir).expanduser()
    mapping_path = Path(mapping).expanduser() if mapping else default_mapping_path(out_dir)
    key_path = None if salt else (Path(key).expanduser() if key else default_key_path(mapping_path))
    check_paths(in_path, out_dir, mapping_path, key_path)
    ocr = require_ocr(allow_no_ocr)
    sources = find_scan_files(in_path)
    if not sources:
        raise USFMError("no scan files found", path=in_path, hint="point it at scans")
    pseudo = Pseudonymizer.from_salt(salt) if salt else Pseudonymizer.from_key_file(key_path)
    names = {rel: pseudo.name(rel) for _, rel in sources}
    if len(set(names.values())) != len(names):  # pragma: no cover - 64-bit collision
        raise USFMError("two sources got the same pseudonym", hint="use another --key or --salt")
    # The mapping first (outputs still unknown): a killed run's outputs can always be traced.
    write_mapping(
        mapping_path, [{"pseudonym": n, "source": r, "output": ""} for r, n in names.items()]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out_dir)  # only the toolkit's own, of runs that were killed
    summary = DeidentifySummary(out_dir, mapping_path, key_path, n_sources=len(sources), ocr=ocr)
    rows, mapping_rows = [], []
    for source, rel in sources:
        try:
            row = deidentify_file(source, rel, out_dir, pseudo, ocr=ocr)
        except USFMError as exc:
            summary.failures.append((rel, str(exc)))
            continue
        except Exception as exc:  # one odd file must not stop a batch, nor be copied
            log.exception("unexpected error on %s", rel)
            summary.failures.append((rel, f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(row)
        mapping_rows.append({"pseudonym": names[rel], "source": rel, "output": row["file"]})
        summary.n_written += 1
        summary.n_scrubbed_px += int(row["n_scrubbed_px"])
        log.info("%s -> %s", rel, row["file"])
    if mapping_rows:
        write_mapping(mapping_path, mapping_rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["file"]))
    with atomic_path(out_dir / "manifest.csv") as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return summary
