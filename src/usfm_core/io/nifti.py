"""NIfTI (.nii, .nii.gz) volume reader through nibabel's lazy array proxy.

NIfTI stores data as (i, j, k) = (x, y, z); a frame of the scan is the slice ``k``, transposed
to image order (H, W) = (y, x). No reorientation is applied: the raw voxel axes are kept, and
the affine's axis codes are reported in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from usfm_core.errors import ScanReadError
from usfm_core.io.checks import check_decoded_size
from usfm_core.io.scan import Scan

NIFTI_EXTENSIONS = (".nii", ".nii.gz")

_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}


class NiftiFrames:
    """Frame source slicing nibabel's ``dataobj`` proxy (reads only the requested slice)."""

    def __init__(self, path: Path, dataobj: object):
        self.path = path
        self.dataobj = dataobj

    def read(self, index: int) -> np.ndarray:
        """Slice ``index`` along z as (H, W) = (y, x)."""
        try:
            data = np.asarray(self.dataobj[:, :, index])
        except Exception as exc:
            raise ScanReadError(
                f"cannot read NIfTI slice {index}: {exc}",
                path=self.path,
                hint="the file is truncated or corrupt; re-export it",
            ) from exc
        return data.T

    def close(self) -> None:
        """nibabel opens the file per access."""


def _raw_zooms(path: Path, img: object, ndim: int) -> tuple[float, ...]:
    """pixdim[1:ndim+1] as stored in the file.

    nibabel's header check turns a 0 voxel size into 1 and negative ones positive, which would
    invent a calibration; the raw values are kept so :class:`Scan` drops implausible ones (with
    a warning).
    """
    from nibabel.openers import ImageOpener

    header_class = type(img.header)  # type: ignore[attr-defined]
    with ImageOpener(str(path)) as fh:
        raw = header_class.from_fileobj(fh, check=False)
    return tuple(float(z) for z in raw["pixdim"][1 : 1 + ndim])


def _decoded_itemsize(img: object) -> int:
    """Bytes per voxel after nibabel applies ``scl_slope`` / ``scl_inter`` (float64 if so)."""
    proxy = img.dataobj  # type: ignore[attr-defined]
    itemsize = np.dtype(img.get_data_dtype()).itemsize  # type: ignore[attr-defined]
    slope = getattr(proxy, "slope", 1.0)
    inter = getattr(proxy, "inter", 0.0)
    return max(itemsize, 8) if (slope, inter) != (1.0, 0.0) else itemsize


def _orientation(img: object) -> tuple[str, list[list[float]] | None]:
    """Axis codes (e.g. ``"RAS"``) and the affine as lists; ``("unknown", None)`` if broken."""
    import nibabel as nib

    try:
        affine = np.asarray(img.affine, dtype=float)  # type: ignore[attr-defined]
        if not np.isfinite(affine).all():
            return "unknown", None
        return "".join(nib.aff2axcodes(affine)), affine.tolist()
    except Exception:  # a degenerate affine only loses the orientation report
        return "unknown", None


def read_nifti(path: Path) -> Scan:
    """Open a NIfTI volume as a lazy ``kind="volume"`` :class:`Scan`."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = _raw_zooms(path, img, len(shape))
        space_unit = img.header.get_xyzt_units()[0]
        itemsize = _decoded_itemsize(img)
    except Exception as exc:
        raise ScanReadError(
            f"cannot read NIfTI header: {exc}", path=path, hint="the file is corrupt; re-export it"
        ) from exc
    axcodes, affine = _orientation(img)
    if len(shape) >= 2:
        n_slices = int(np.prod(shape[2:], dtype=object)) if len(shape) > 2 else 1
        check_decoded_size(path, n_slices, (shape[1], shape[0]), itemsize)
    dataobj = img.dataobj
    if len(shape) == 4 and shape[3] == 1:
        dataobj, shape = dataobj[..., 0], shape[:3]
    if len(shape) == 2:
        shape, zooms = (*shape, 1), (*zooms[:2], 1.0)
        dataobj = np.asarray(dataobj)[:, :, None]  # a single 2-D slice is small: read it
    if len(shape) != 3:
        raise ScanReadError(
            f"NIfTI data has shape {shape}; only 3-D volumes are supported",
            path=path,
            hint="split the time series into 3-D volumes (e.g. fslsplit) and open one",
        )
    if 0 in shape:
        raise ScanReadError("NIfTI volume has zero slices", path=path)
    source = NiftiFrames(path, dataobj)
    first = source.read(0)  # also tells the dtype after nibabel's scaling (scl_slope)
    if first.dtype.kind not in "biuf":
        raise ScanReadError(
            f"NIfTI voxels are {first.dtype} (RGB or complex); only scalar volumes are supported",
            path=path,
            hint="convert it to a gray-scale (integer or float) volume",
        )
    scale = _UNIT_TO_MM.get(space_unit, 1.0)
    dx, dy, dz = (z * scale for z in zooms[:3])
    return Scan(
        path=path,
        kind="volume",
        format="nifti",
        shape=(shape[2], shape[1], shape[0]),
        dtype=first.dtype,
        is_rgb=False,
        source=source,
        spacing_mm=(dy, dx),  # implausible voxel sizes are dropped (with a warning) by Scan
        slice_spacing_mm=dz,
        metadata={"axcodes": axcodes, "space_unit": space_unit, "affine": affine},
    )
