"""Torch dataset and loader for multi-crop pretraining.

Views depend only on ``(seed, epoch, index)``: each item gets its own
``numpy.random.Generator`` seeded with those three numbers, so the views do not depend on
worker count, batch order or where a resumed run restarts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from usfm_core.data.catalog import DatasetCatalog
from usfm_core.data.sampler import BalancedSampler
from usfm_core.data.views import MultiCropConfig, MultiCropTransform

#: Keys of a view dict that are tensors stacked along a new batch axis by the collate.
_STACKED_KEYS = (
    "global_views",
    "local_views",
    "global_regions",
    "local_regions",
    "global_boxes",
    "local_boxes",
)


class PretrainDataset(Dataset):
    """``dataset[i]`` → the views of catalog item ``i`` plus ``index`` and ``dataset`` name.

    ``index`` is the catalog index (OpenUS keeps a per-image loss EMA keyed by it).
    """

    def __init__(
        self,
        catalog: DatasetCatalog,
        transform: MultiCropTransform,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.catalog = catalog
        self.transform = transform
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the random views of ``epoch`` (call before the loader's workers start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.catalog)

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, region = self.catalog.load(index)
        sample = self.transform(image, region, self.rng_for(index))
        sample["index"] = int(index)
        sample["dataset"] = self.catalog[index].dataset
        return sample


def collate_multicrop(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-item view dicts into a batch.

    ``global_views`` → ``(B, G, C, S, S)``, ``local_views`` → ``(B, Lc, C, s, s)``,
    ``*_regions`` → ``(B, G|Lc, S|s, S|s)`` bool, ``*_boxes`` → ``(B, G|Lc, 5)``,
    ``index`` → ``(B,)`` int64, ``dataset`` → list of ``B`` names.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {
        key: torch.stack([item[key] for item in batch]) for key in _STACKED_KEYS if key in batch[0]
    }
    out["index"] = torch.tensor([item["index"] for item in batch], dtype=torch.int64)
    out["dataset"] = [item["dataset"] for item in batch]
    return out


def make_pretrain_loader(
    catalog: DatasetCatalog,
    cfg: MultiCropConfig,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_index: int = 0,
    *,
    cap: int | None = 50_000,
    drop_last: bool = False,
) -> DataLoader:
    """A loader for one epoch of balanced multi-crop batches for this rank.

    ``start_index`` is the number of samples this rank already consumed in ``epoch`` (e.g.
    ``batches_done * batch_size``): the loader continues with exactly the remaining order and
    the same views. Build a new loader per epoch. The sampler is ``loader.sampler``.
    """
    # No cv2.setNumThreads() in a worker_init_fn: after fork, resizing OpenCV's inherited
    # thread pool deadlocks when the parent process has already used it.
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = PretrainDataset(catalog, MultiCropTransform(cfg), seed=seed, epoch=epoch)
    sampler = BalancedSampler(
        catalog.datasets, cap=cap, seed=seed, rank=rank, world_size=world_size, shuffle=True
    )
    sampler.set_epoch(epoch)
    sampler.set_start_index(start_index)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_multicrop,
        drop_last=drop_last,
        persistent_workers=False,
    )
