"""Reading and writing ultrasound scans: DICOM, cine video, TIFF stacks, NIfTI, images.

:func:`load_scan` is the one entry point for reading; it returns a :class:`Scan` whose frames
are decoded lazily. The ``write_*`` functions write the same formats (exports, test fixtures).
"""

from usfm_core.io.checks import decoded_limits, set_decoded_limits
from usfm_core.io.dicom import SUPPORTED_TRANSFER_SYNTAXES
from usfm_core.io.readers import SUPPORTED_EXTENSIONS, load_scan
from usfm_core.io.scan import LazyFrames, Scan
from usfm_core.io.writers import write_dicom, write_image, write_nifti, write_tiff, write_video

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "LazyFrames",
    "Scan",
    "decoded_limits",
    "load_scan",
    "set_decoded_limits",
    "write_dicom",
    "write_image",
    "write_nifti",
    "write_tiff",
    "write_video",
]
