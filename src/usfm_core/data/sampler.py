"""Data-set balanced, distributed, resumable sampling (US-JEPA §4.3, Eq. 6).

Each epoch draws ``min(|D_i|, cap)`` items from every data set ``D_i``, so a data set is picked
with probability ``P(D_i) = min(|D_i|, N_t) / Σ_j min(|D_j|, N_t)`` (``N_t = cap``): small sets
contribute all their images, huge ones at most ``cap``, drawn without replacement. A data set
larger than ``cap`` is walked through one random order over several epochs, so all its images
are seen before any repeats. The epoch's list is shuffled, padded to a multiple of
``world_size`` and split between ranks like :class:`torch.utils.data.DistributedSampler`.
Everything is a function of ``(seed, epoch)``; ``start_index`` resumes in the middle of an
epoch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from usfm_core.errors import ConfigError


def _dataset_key(name: str) -> int:
    """A stable (process-independent) integer for a data set name."""
    return zlib.crc32(name.encode("utf-8"))


def _epoch_draw(
    indices: np.ndarray, count: int, epoch: int, seed: int, key: int, shuffle: bool
) -> np.ndarray:
    """``count`` distinct items of one data set for ``epoch``, ``(count,)``, ``count <= n``.

    Epochs are grouped in passes of ``ceil(n / count)``; a pass uses one order of the data set
    (a permutation seeded by ``(seed, key, pass)``, or the original order without shuffling)
    and each epoch of the pass takes the next ``count`` items, so every item is seen once per
    pass. The last epoch of a pass tops up from the start of the same order (no repeats).
    """
    n = len(indices)
    epochs_per_pass = -(-n // count)
    pass_no, slot = divmod(epoch, epochs_per_pass)
    if shuffle:
        order = indices[np.random.default_rng([seed, key, pass_no]).permutation(n)]
    else:
        order = indices
    start = slot * count
    taken = order[start : start + count]
    if len(taken) < count:
        taken = np.concatenate([taken, order[: count - len(taken)]])
    return taken


class BalancedSampler(Sampler[int]):
    """Per-epoch balanced draw over several data sets, split across ranks, resumable.

    ``dataset_indices`` maps a data set name to the global item indices of that set (e.g.
    :attr:`DatasetCatalog.datasets`). ``len(sampler)`` is the number of indices this rank yields
    in the current pass (the full per-rank count ``num_samples`` unless resuming).
    """

    def __init__(
        self,
        dataset_indices: Mapping[str, Sequence[int]],
        cap: int | None = 50_000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank {rank} is not valid for world_size {world_size}",
                hint="use 0 <= rank < world_size (torchrun sets RANK and WORLD_SIZE)",
            )
        if cap is not None and cap < 1:
            raise ConfigError(f"cap must be >= 1 or None, got {cap}", hint="e.g. cap=50000")
        self.groups = {
            name: np.asarray(list(idx), dtype=np.int64)
            for name, idx in sorted(dataset_indices.items())
            if len(idx) > 0
        }
        if not self.groups:
            raise ConfigError(
                "no data to sample: every data set is empty",
                hint="check the data folder (DatasetCatalog.summary() lists what was found)",
            )
        self.cap = cap
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start_index = 0
        self._position = 0

    # ------------------------------------------------------------------ sizes
    def per_dataset_count(self) -> dict[str, int]:
        """Items drawn per data set each epoch: ``min(|D_i|, cap)``."""
        return {
            name: len(idx) if self.cap is None else min(len(idx), self.cap)
            for name, idx in self.groups.items()
        }

    @property
    def total_size(self) -> int:
        """Epoch length over all ranks, after padding to a multiple of ``world_size``."""
        n = sum(self.per_dataset_count().values())
        return -(-n // self.world_size) * self.world_size

    @property
    def num_samples(self) -> int:
        """Indices each rank gets per full epoch."""
        return self.total_size // self.world_size

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    # ------------------------------------------------------------------ order
    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """The whole epoch's order for all ranks (padded), ``(total_size,)`` as a list."""
        epoch = self.epoch if epoch is None else epoch
        counts = self.per_dataset_count()
        parts = [
            _epoch_draw(idx, counts[name], epoch, self.seed, _dataset_key(name), self.shuffle)
            for name, idx in self.groups.items()
        ]
        order = np.concatenate(parts)
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        pad = self.total_size - len(order)
        if pad:  # repeat from the start, like DistributedSampler
            order = np.concatenate([order, np.resize(order, pad)])
        return order.tolist()

    def rank_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full-epoch share, ``(num_samples,)``."""
        return self.epoch_indices(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()
        self._position = self.start_index
        for i in indices[self.start_index :]:
            self._position += 1
            yield i
        # A finished pass starts the next one from the beginning.
        self.start_index = 0
        self._position = 0

    # ------------------------------------------------------------------ state
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the draw and the order); a new epoch starts at index 0."""
        if epoch != self.epoch:
            self.start_index = 0
            self._position = 0
        self.epoch = int(epoch)

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` indices of this rank's epoch (resume mid-epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ConfigError(
                f"start_index {start_index} outside 0..{self.num_samples}",
                hint="start_index counts samples this rank already consumed in the epoch",
            )
        self.start_index = int(start_index)
        self._position = self.start_index

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Everything needed to continue the same order later.

        ``consumed`` = samples this rank has really used in the current epoch. Pass it from the
        training loop when a DataLoader prefetches; otherwise the count of indices yielded so
        far is used.
        """
        return {
            "epoch": self.epoch,
            "start_index": self._position if consumed is None else int(consumed),
            "seed": self.seed,
            "cap": self.cap,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "sizes": {name: len(idx) for name, idx in self.groups.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises :class:`ConfigError` if the data or setup changed."""
        for key in ("seed", "cap", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"sampler state has {key}={state[key]!r}, this run has {getattr(self, key)!r}",
                    hint="resume with the same seed, cap, shuffle and number of processes",
                )
        sizes = {name: len(idx) for name, idx in self.groups.items()}
        if "sizes" in state and dict(state["sizes"]) != sizes:
            raise ConfigError(
                "the data sets changed since the checkpoint (different sizes)",
                hint="resume on the same data folder, or start a new run",
            )
        self.epoch = int(state["epoch"])
        self.set_start_index(int(state.get("start_index", 0)))
