"""Plugin settings (napari Preferences → napari-usfm): model directory, device, threads,
Segment's precision.

Declared under ``contributions.configurations`` in ``napari.yaml``; read through
``napari.settings.get_plugin_settings`` when napari provides it, with environment/default
fallbacks so the widgets also work on older napari and in tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _setting(key: str) -> Any:
    try:
        from napari.settings import get_plugin_settings

        return getattr(get_plugin_settings("napari-usfm").general, key, None)
    except Exception:  # napari without plugin settings, or the plugin not registered
        return None


def model_dir() -> Path:
    """Folder where fine-tuned models are saved and looked for."""
    from usfm_core.models.zoo import user_model_dir

    value = _setting("model_dir")
    return Path(value).expanduser() if value else user_model_dir()


def default_device() -> str:
    """``auto`` / ``cpu`` / ``cuda`` (``USFM_DEVICE`` overrides the setting, e.g. in CI)."""
    value = os.environ.get("USFM_DEVICE") or _setting("device") or "auto"
    return value if value in ("auto", "cpu", "cuda") else "auto"


def precision() -> str:
    """``fp32`` (default) / ``bf16`` / ``auto`` for Segment (``USFM_PRECISION`` overrides the
    setting)."""
    from usfm_core.models.precision import PRECISIONS

    value = os.environ.get("USFM_PRECISION") or _setting("precision") or "fp32"
    return value if value in PRECISIONS else "fp32"


def num_threads() -> int:
    """torch threads for background work: the setting, else all cores but one."""
    value = _setting("threads")
    if value:
        return max(1, int(value))
    return max(1, (os.cpu_count() or 2) - 1)
