"""Self-supervised pre-training: OpenUS (and the iBOT ablation), trainer and schedules.

``from usfm_core.pretrain import PretrainConfig, load_config, pretrain``. Importing this
package does not import torch; :func:`pretrain` and :class:`OpenUS` load it on first use.
"""

from usfm_core.pretrain.config import PretrainConfig, load_config, preset
from usfm_core.pretrain.methods import available_methods, register_method

__all__ = [
    "OpenUS",
    "PretrainConfig",
    "available_methods",
    "load_config",
    "preset",
    "pretrain",
    "register_method",
]


def __getattr__(name: str):
    """Lazy access to the torch-dependent names."""
    if name == "pretrain":
        from usfm_core.pretrain.trainer import pretrain

        return pretrain
    if name == "OpenUS":
        from usfm_core.pretrain.openus import OpenUS

        return OpenUS
    raise AttributeError(f"module 'usfm_core.pretrain' has no attribute {name!r}")
