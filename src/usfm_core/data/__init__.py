"""Pretraining data: folder catalog, balanced sampler, multi-crop views, torch loader.

Importing this package is cheap; torch is imported by the sampler and dataset modules only.
"""

from usfm_core.data.catalog import CatalogItem, DatasetCatalog
from usfm_core.data.views import MultiCropConfig, MultiCropTransform

__all__ = [
    "BalancedSampler",
    "CatalogItem",
    "DatasetCatalog",
    "MultiCropConfig",
    "MultiCropTransform",
    "PretrainDataset",
    "collate_multicrop",
    "make_pretrain_loader",
]


def __getattr__(name: str):
    """Lazy access to the torch-dependent names (keeps ``import usfm_core.data`` light)."""
    if name == "BalancedSampler":
        from usfm_core.data.sampler import BalancedSampler

        return BalancedSampler
    if name in ("PretrainDataset", "collate_multicrop", "make_pretrain_loader"):
        from usfm_core.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'usfm_core.data' has no attribute {name!r}")
