"""Backbones and their (de)serialisation.

- :class:`VMamba` / :class:`VMambaConfig`: the OpenUS backbone (SS2D, VSS blocks, mask token,
  scan-attention importance).
- :class:`ViT` / :class:`ViTConfig`: a plain ViT for USF-MAE and US-JEPA.
- :func:`scan_attention_map`, :func:`model_attention`: OpenUS Eq. 4–5 attention maps.
- :func:`save_model`, :func:`load_model`, :func:`build_model`, :func:`register_model`:
  safetensors + JSON checkpoints.
- :func:`selective_scan` (from :mod:`usfm_core.models.scan`, imported on first use).
"""

from __future__ import annotations

from typing import Any

from usfm_core.models.attention import model_attention, scan_attention_map
from usfm_core.models.serialization import (
    build_model,
    load_model,
    model_types,
    register_model,
    save_model,
)
from usfm_core.models.vit import ViT, ViTConfig, patchify, unpatchify
from usfm_core.models.vmamba import SS2D, BackboneOutput, VMamba, VMambaConfig, VSSBlock

__all__ = [
    "SS2D",
    "BackboneOutput",
    "VMamba",
    "VMambaConfig",
    "VSSBlock",
    "ViT",
    "ViTConfig",
    "build_model",
    "load_model",
    "model_attention",
    "model_types",
    "patchify",
    "register_model",
    "save_model",
    "scan_attention_map",
    "selective_scan",
    "unpatchify",
]


def __getattr__(name: str) -> Any:
    # selective_scan lives in scan.py (written separately); import it lazily.
    if name == "selective_scan":
        from usfm_core.models.scan import selective_scan

        return selective_scan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
