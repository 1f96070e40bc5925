"""A small registry of pre-training methods, so MAE / JEPA can be added beside OpenUS.

A method is a name → ``"module:attribute"`` of a factory ``build(config, *, total_steps,
steps_per_epoch, rank) -> nn.Module`` whose result has ``training_step(batch, step)``,
``after_step(step)`` (teacher EMA etc.), ``export_backbone()`` and ``param_groups()``.
Modules are imported lazily so reading a config never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_METHODS: dict[str, str] = {
    "openus": "usfm_core.pretrain.openus:build_openus",
    # iBOT ablation: same model, no reconstruction, random block masks on global views.
    "ibot": "usfm_core.pretrain.openus:build_ibot",
    "mae": "usfm_core.pretrain.mae:build_mae",  # USF-MAE baseline
    "jepa": "usfm_core.pretrain.jepa:build_jepa",  # US-JEPA / SALT baseline
}


def register_method(name: str, target: str) -> None:
    """Register ``name`` → ``"package.module:factory"`` (overwrites an existing entry)."""
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:factory', got {target!r}")
    _METHODS[name] = target


def available_methods() -> list[str]:
    """Names accepted by ``PretrainConfig.method``."""
    return sorted(_METHODS)


def get_method(name: str) -> Callable[..., Any]:
    """Import and return the factory registered under ``name``."""
    from usfm_core.errors import ConfigError

    if name not in _METHODS:
        raise ConfigError(
            f"unknown pretraining method {name!r}", hint=f"use one of {available_methods()}"
        )
    module_name, attr = _METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
