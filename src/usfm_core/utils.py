"""Small shared helpers: atomic file writes (from :mod:`usfm_core.outputs`), device choice."""

from __future__ import annotations

from usfm_core.outputs import (  # noqa: F401  (the atomic writers live with the safety rules)
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
)


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
