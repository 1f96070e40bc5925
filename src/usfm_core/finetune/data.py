"""Labelled data for fine-tuning: manifests, reproducible grouped splits, label-ratio subsets.

A labelled data set is a folder holding ``manifest.csv`` with the columns

* ``image`` (path relative to the folder), and ``mask`` (segmentation) and/or ``label`` or
  ``class`` (classification);
* optional ``group`` or ``dup_group``: items of a group (a patient, a video, near-duplicates)
  always land in the same split, so nothing leaks from train to test;
* optional ``pixel_size_mm``, and ``head_circumference_mm`` (or ``circumference_mm``): a
  reference circumference that ``usfm-core evaluate`` compares with the predicted mask's
  ellipse-fit circumference (HC18's measure).

The shared BUSI / HC18 folders follow this layout as they are. In-memory arrays (a few annotated
frames from the napari plugin) are wrapped with :meth:`LabelledSet.from_arrays`.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from usfm_core.errors import ConfigError, ScanReadError, USFMError

LABEL_RATIOS: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20, 0.40, 0.60, 1.0)


@dataclass
class Item:
    """One labelled example: an image file or array, its mask or class, and its group."""

    key: str
    image: Path | np.ndarray
    mask: Path | np.ndarray | None = None
    label: int | None = None
    group: str = ""
    pixel_size_mm: float | None = None
    circumference_mm: float | None = None


@dataclass
class LabelledSet:
    """A list of :class:`Item` plus the class names (classification) and the source folder."""

    items: list[Item]
    classes: list[str] = field(default_factory=list)
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        """Class index per item ``(N,)``; for segmentation 1 if the mask is non-empty, else 0."""
        return np.array([it.label if it.label is not None else 0 for it in self.items])

    @property
    def groups(self) -> list[str]:
        """Group id per item (the key when the manifest has no group column)."""
        return [it.group or it.key for it in self.items]

    @classmethod
    def from_folder(cls, root: str | Path, task: str = "segmentation") -> LabelledSet:
        """Read ``root/manifest.csv`` (see the module doc); checks that every file exists."""
        root = Path(root)
        manifest = root / "manifest.csv"
        if not manifest.is_file():
            raise ConfigError(
                "no manifest.csv in the data folder",
                path=root,
                hint="add manifest.csv with columns image,mask (segmentation) or image,label",
            )
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "image" not in rows[0]:
            raise ConfigError("manifest.csv is empty or has no 'image' column", path=manifest)
        label_col = next((c for c in ("label", "class") if c in rows[0]), None)
        group_col = next((c for c in ("group", "dup_group") if c in rows[0]), None)
        if task == "segmentation" and "mask" not in rows[0]:
            raise ConfigError(
                "segmentation needs a 'mask' column",
                path=manifest,
                hint="add the mask path of each image to manifest.csv",
            )
        if task == "classification" and label_col is None:
            raise ConfigError(
                "classification needs a 'label' (or 'class') column",
                path=manifest,
                hint="add the class name of each image",
            )
        classes = sorted({r[label_col] for r in rows}) if label_col else []
        items = []
        for row in rows:
            image = root / row["image"]
            if not image.is_file():
                raise ScanReadError("image listed in manifest.csv not found", path=image)
            mask = root / row["mask"] if row.get("mask") else None
            if task == "segmentation" and (mask is None or not mask.is_file()):
                raise ScanReadError("mask listed in manifest.csv not found", path=mask or image)
            px = row.get("pixel_size_mm")
            hc = row.get("head_circumference_mm") or row.get("circumference_mm")
            items.append(
                Item(
                    key=row["image"],
                    image=image,
                    mask=mask,
                    label=classes.index(row[label_col]) if label_col else None,
                    group=(row.get(group_col) or "") if group_col else "",
                    pixel_size_mm=float(px) if px else None,
                    circumference_mm=float(hc) if hc else None,
                )
            )
        return cls(items=items, classes=classes, root=root)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray | Sequence[np.ndarray],
        masks: np.ndarray | Sequence[np.ndarray] | None = None,
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> LabelledSet:
        """Wrap in-memory frames ``(N, H, W)`` with masks ``(N, H, W)`` or labels ``(N,)``.

        ``groups`` (N,) keeps related frames (e.g. one cine, one patient) in the same split.
        """
        if (masks is None) == (labels is None):
            raise USFMError("give either masks (segmentation) or labels (classification)")
        n = len(images)
        targets = masks if masks is not None else labels
        if len(targets) != n or n == 0:
            raise USFMError(f"got {n} images but {len(targets)} targets; need equal, non-zero")
        items = []
        for i in range(n):
            img = np.asarray(images[i])
            if img.ndim != 2:
                raise USFMError(f"image {i} has shape {img.shape}; expected a 2-D (H, W) frame")
            mask = None
            if masks is not None:
                mask = np.asarray(masks[i])
                if mask.shape != img.shape:
                    raise USFMError(f"mask {i} shape {mask.shape} != image shape {img.shape}")
            label = int(labels[i]) if labels is not None else None
            group = str(groups[i]) if groups is not None else ""
            items.append(Item(key=f"frame{i:05d}", image=img, mask=mask, label=label, group=group))
        if labels is not None and not classes:
            classes = [str(c) for c in range(int(max(labels)) + 1)]
        return cls(items=items, classes=list(classes or []))

    def annotate_foreground(self) -> None:
        """For segmentation sets without classes, label items by mask presence (to stratify)."""
        for it in self.items:
            if it.label is None:
                it.label = int(read_mask(it).any())


def read_image(item: Item) -> np.ndarray:
    """The item's image as ``(H, W) uint8`` (colour converted to gray)."""
    import cv2

    if isinstance(item.image, np.ndarray):
        img = item.image
    else:
        img = cv2.imread(str(item.image), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ScanReadError("cannot decode image", path=item.image)
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    return to_uint8(img)


def read_mask(item: Item) -> np.ndarray:
    """The item's mask as ``(H, W)`` integer labels (binary 0/255 masks become 0/1)."""
    import cv2

    if item.mask is None:
        raise USFMError(f"item {item.key} has no mask")
    if isinstance(item.mask, np.ndarray):
        mask = item.mask
    else:
        mask = cv2.imread(str(item.mask), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ScanReadError("cannot decode mask", path=item.mask)
    mask = np.asarray(mask)
    if mask.dtype == bool or mask.max(initial=0) == 255:
        return (mask > 127).astype(np.int64)  # 0/255 binary mask (PNG convention)
    return mask.astype(np.int64)


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """Bring any 2-D frame to uint8: unchanged if already uint8, else 1–99 % percentile rescale."""
    frame = np.asarray(frame)
    if frame.dtype == np.uint8:
        return frame
    f = frame.astype(np.float32)
    lo, hi = np.percentile(f, (1, 99)) if f.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((f - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------- splits


def make_splits(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Grouped, class-stratified train/val/test split of item indices; reproducible per seed.

    Each group gets the majority class of its items; the groups of each class are shuffled and
    cut by ``fractions``, so duplicates never straddle splits and every split keeps roughly the
    class proportions. Tiny sets (< 5 items) use every item for train, val and test alike.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if len(groups) != n:
        raise ValueError("labels and groups must have the same length")
    if n < 5:
        idx = list(range(n))
        return {"train": idx, "val": idx, "test": idx}
    rng = np.random.default_rng(seed)
    by_group = _group_members(groups)
    group_class = {g: int(np.bincount(labels[m]).argmax()) for g, m in by_group.items()}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for cls in sorted(set(group_class.values())):
        gs = sorted(g for g, c in group_class.items() if c == cls)
        rng.shuffle(gs)
        n_items = sum(len(by_group[g]) for g in gs)
        cut_train, cut_val = fractions[0] * n_items, (fractions[0] + fractions[1]) * n_items
        seen = 0
        for g in gs:
            # Place a group by the position of its midpoint in the class's item ordering.
            mid = seen + len(by_group[g]) / 2
            split = "train" if mid < cut_train else "val" if mid < cut_val else "test"
            out[split].extend(by_group[g])
            seen += len(by_group[g])
    for split in ("val", "test"):
        # Very few groups: move the last training group over rather than leave a split empty.
        train_groups = list(dict.fromkeys(groups[i] for i in out["train"]))
        if not out[split] and len(train_groups) > 1:
            moved = set(by_group[train_groups[-1]])
            out[split] = sorted(moved)
            out["train"] = [i for i in out["train"] if i not in moved]
    return {k: sorted(v) for k, v in out.items()}


def label_subset(
    indices: Sequence[int],
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str],
    ratio: float,
    seed: int = 0,
) -> list[int]:
    """A stratified, grouped ``ratio`` share of ``indices`` (whole groups, ≥ 1 group per class).

    Per class, groups are shuffled with ``seed`` and taken until the class holds
    ``ceil(ratio × n_class)`` items. Nested in ``ratio`` for a fixed seed (10 % ⊂ 20 %).
    """
    if not 0 < ratio <= 1:
        raise ConfigError(
            f"label ratio must be in (0, 1], got {ratio}",
            hint="e.g. --label-ratio 0.1 for 10 % of the training labels",
        )
    indices = list(indices)
    if ratio >= 1:
        return sorted(indices)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    sub_groups = [groups[i] for i in indices]
    by_group = _group_members(sub_groups)
    by_group = {g: [indices[j] for j in m] for g, m in by_group.items()}
    group_class = {g: int(np.bincount(labels[m]).argmax()) for g, m in by_group.items()}
    chosen: list[int] = []
    for cls in sorted(set(group_class.values())):
        gs = sorted(g for g, c in group_class.items() if c == cls)
        rng.shuffle(gs)
        target = math.ceil(ratio * sum(len(by_group[g]) for g in gs))
        taken = 0
        for g in gs:
            if taken >= target:
                break
            chosen.extend(by_group[g])
            taken += len(by_group[g])
    return sorted(chosen)


def save_splits(
    path: str | Path, data: LabelledSet, splits: dict[str, list[int]], **extra: object
) -> None:
    """Write ``splits.json``: the item keys of each split plus ``extra`` (seed, ratio, ...)."""
    from usfm_core.utils import atomic_write_text

    doc = {
        "root": str(data.root) if data.root else None,
        **extra,
        "splits": {k: [data.items[i].key for i in v] for k, v in splits.items()},
    }
    atomic_write_text(path, json.dumps(doc, indent=1))


def load_splits(path: str | Path, data: LabelledSet) -> dict[str, list[int]]:
    """Read ``splits.json`` back as item indices of ``data`` (keys must all be present)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    index = {it.key: i for i, it in enumerate(data.items)}
    try:
        return {k: [index[key] for key in keys] for k, keys in doc["splits"].items()}
    except KeyError as exc:
        raise ConfigError(
            f"splits.json names an item not in the data set: {exc}",
            path=path,
            hint="evaluate with the same --data folder the model was trained on",
        ) from None


def _group_members(groups: Sequence[str]) -> dict[str, list[int]]:
    """Map each group id to the positions of its items, in order."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        out[g].append(i)
    return dict(out)


# ---------------------------------------------------------------------------- torch dataset


def normalize(frames_u8: np.ndarray) -> np.ndarray:
    """uint8 intensities → float32 in [-1, 1] (the one normalisation fine-tuned models use)."""
    return frames_u8.astype(np.float32) / 127.5 - 1.0


class SupervisedDataset:
    """Torch dataset over some items of a :class:`LabelledSet`, resized to ``size × size``.

    Returns ``(image (1, S, S) float32, target)`` with target a ``(S, S)`` int64 mask
    (segmentation) or a class index (classification). ``augment`` adds a horizontal flip, a small
    random affine (±10°, scale 0.9–1.1, shift ±5 %) and intensity jitter (gain, gamma);
    ``transform`` maps the native-resolution uint8 image first (test-time corruptions).
    """

    def __init__(
        self,
        data: LabelledSet,
        indices: Sequence[int],
        task: str,
        size: int,
        augment: bool = False,
        seed: int = 0,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        cache: bool = True,
    ):
        if size % 32:
            raise ConfigError(
                f"input size must be divisible by 32, got {size}", hint="use e.g. 224, 256 or 64"
            )
        self.data, self.indices, self.task = data, list(indices), task
        self.size, self.augment, self.transform = size, augment, transform
        # Resized images are small (S² bytes): keep them instead of decoding every epoch.
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        import torch

        img, mask = self._load(i)
        if self.augment:
            img, mask = self._augment(img, mask)
        x = torch.from_numpy(normalize(img))[None]
        if mask is not None:
            return x, torch.from_numpy(mask.astype(np.int64))
        return x, int(self.data.items[self.indices[i]].label or 0)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Resized ``(S, S)`` uint8 image and mask of item ``i``; cached (decoded once)."""
        import cv2

        if i in self._cache:
            return self._cache[i]
        item = self.data.items[self.indices[i]]
        img = read_image(item)
        if self.transform is not None:  # e.g. a test-time corruption, at native resolution
            img = self.transform(img)
        img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        mask = None
        if self.task == "segmentation":
            mask = cv2.resize(
                read_mask(item).astype(np.uint8),
                (self.size, self.size),
                interpolation=cv2.INTER_NEAREST,
            )
        if self.cache:
            self._cache[i] = (img, mask)
        return img, mask

    def _augment(self, img: np.ndarray, mask: np.ndarray | None):
        """Random flip + affine on image and mask alike, then intensity jitter on the image."""
        import cv2

        rng, s = self.rng, self.size
        if rng.random() < 0.5:
            img = img[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
        m[:, 2] += rng.uniform(-0.05, 0.05, size=2) * s
        img = cv2.warpAffine(
            np.ascontiguousarray(img),
            m,
            (s, s),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
        )
        if mask is not None:
            mask = cv2.warpAffine(
                np.ascontiguousarray(mask),
                m,
                (s, s),
                flags=cv2.INTER_NEAREST,
                borderMode=cv2.BORDER_CONSTANT,
            )
        f = img.astype(np.float32) / 255.0
        f = np.clip(f ** rng.uniform(0.8, 1.25) * rng.uniform(0.9, 1.1), 0, 1)
        return (f * 255).round().astype(np.uint8), mask
