"""Small shared helpers: atomic file writes, seeding, device choice."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` atomically.

    A crash (or exception) inside the block leaves ``path`` untouched and removes the temporary,
    so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def resolve_device(device: str = "auto") -> str:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` to a torch device string.

    ``auto`` picks CUDA when available, else CPU. Asking for CUDA without one raises a
    :class:`~usfm_core.errors.USFMError` rather than failing deep inside torch.
    """
    import torch

    from usfm_core.errors import USFMError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise USFMError(
            f"device {device!r} requested but torch sees no CUDA GPU",
            hint="use --device cpu (or auto), or install a CUDA build of torch",
        )
    return device
