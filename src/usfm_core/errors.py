"""The project's exception types.

Every error caused by bad user input (a file, a folder, a config, a checkpoint) is a
:class:`USFMError` whose message names the offending path or value *and* what to do about it,
so the CLI and the napari plugin can show it as is, without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class USFMError(Exception):
    """Bad input the user can fix: the message says which file/value and how to fix it."""

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.path = Path(path) if path is not None else None
        self.hint = hint
        shown = str(path)
        if not shown.isprintable():  # newlines / control characters in a file name
            shown = repr(shown)[1:-1]
        text = f"{shown}: {message}" if path is not None else message
        if hint:
            text = f"{text}\n  fix: {hint}"
        super().__init__(text)


class ScanReadError(USFMError):
    """A scan (DICOM, video, TIFF, image, NIfTI, folder) could not be read."""


class DecodedSizeError(ScanReadError):
    """A scan would decode to more memory than the configured limit (checked from its header,
    before any pixel is allocated); see :mod:`usfm_core.io.checks`."""


class ScanWarning(UserWarning):
    """A scan was read, but something in it was ignored or repaired (bad calibration dropped,
    NaN/inf pixels replaced); the message names the file and what was done."""


class ConfigError(USFMError):
    """A configuration (file or values) is invalid."""


class CheckpointError(USFMError):
    """A checkpoint is missing, corrupt, or belongs to another model."""
