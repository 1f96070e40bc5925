"""Labelled data for fine-tuning: manifests, reproducible grouped splits, label-ratio subsets.

A labelled data set is a folder holding ``manifest.csv`` with the columns

* ``image`` (path relative to the folder), and ``mask`` (segmentation) and/or ``label`` or
  ``class`` (classification);
* optional ``group`` or ``dup_group``: items of a group (a patient, a video, near-duplicates)
  always land in the same split, so nothing leaks from train to test;
* optional ``split`` (``train`` / ``val`` / ``test``): a fixed split, honoured as it is (an
  official test set stays the test set); without ``val`` rows the validation items are drawn
  from the training rows (grouped, stratified);
* optional ``classes`` (segmentation): the mask classes as ``value=name`` pairs separated by
  ``;`` (e.g. ``1=cyst;2=solid``; any row may hold them, they are merged);
* optional ``pixel_size_mm``, and ``head_circumference_mm`` (or ``circumference_mm``): a
  reference circumference that ``usfm-core evaluate`` compares with the predicted mask's
  ellipse-fit circumference (HC18's measure).

Masks are read as stored (:func:`read_mask`): palette PNG indices, 8/16-bit class values,
0/255 binary. The segmentation classes come from ``classes.json`` beside the manifest
(``{"1": "cyst", "2": "solid"}`` or a list of names, index = mask value, 0 = background), else
the manifest's ``classes`` column, else the values found in the masks
(:meth:`LabelledSet.resolve_mask_classes`).

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
MAX_FOUND_CLASSES = 32  # more distinct mask values than this are gray levels, not classes


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
    split: str = ""  # fixed split from the manifest ("train" / "val" / "test"), else ""
    # Stored mask value of each class index (0 = background), e.g. (0, 1, 2) or (0, 128, 255);
    # None: legacy reading (0/255 → 0/1, other values as they are).
    mask_values: tuple[int, ...] | None = None


SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class LabelledSet:
    """A list of :class:`Item` plus the class names (classification) and the source folder.

    ``mask_classes`` (segmentation) names the mask classes, index = class index, 0 =
    background; ``mask_values`` holds the stored mask value of each (see :func:`read_mask`).
    Both are empty until declared (``classes.json``, the manifest) or found in the masks.
    """

    items: list[Item]
    classes: list[str] = field(default_factory=list)
    root: Path | None = None
    mask_classes: list[str] = field(default_factory=list)
    mask_values: list[int] = field(default_factory=list)
    classes_source: str = ""

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

    def fixed_splits(self) -> dict[str, list[int]] | None:
        """Item indices per split from the manifest's ``split`` column, or None without one."""
        if not any(it.split for it in self.items):
            return None
        out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for i, it in enumerate(self.items):
            out[it.split].append(i)
        return out

    def set_mask_classes(
        self, values: Sequence[int], names: Sequence[str] | None = None, source: str = ""
    ) -> None:
        """Declare the stored mask value of each class (0 first) and their names."""
        values = [int(v) for v in values]
        if not values or values[0] != 0:
            values = [0, *[v for v in values if v != 0]]
        names = list(names) if names else ["background", *[f"class{v}" for v in values[1:]]]
        if len(names) != len(values):
            raise ConfigError(f"{len(names)} class names for {len(values)} mask values")
        self.mask_values, self.mask_classes = values, names
        self.classes_source = source or self.classes_source
        for it in self.items:
            it.mask_values = tuple(values)

    def resolve_mask_classes(self) -> list[str]:
        """Mask class names (0 = background), from the declaration or else the mask values.

        Without a declaration every mask is read once: a set whose masks only hold 0 and one
        other value (1 or 255) is binary (``["background", "foreground"]``); several values
        become classes in increasing value order. Also labels each item by mask presence
        (for stratified splits) on the way.
        """
        if self.mask_classes:
            for it in self.items:
                if it.label is None:
                    it.label = int(read_mask(it).any())
            return self.mask_classes
        found: set[int] = set()
        for it in self.items:
            m = read_mask(it, raw=True)
            vals = set(np.unique(m).tolist())
            found |= vals
            if it.label is None:
                it.label = int(bool(vals - {0}))
        fg = sorted(found - {0})
        if len(fg) > MAX_FOUND_CLASSES:
            raise ConfigError(
                f"the masks hold {len(fg)} distinct non-zero values ({fg[:6]} ...): gray levels "
                "(e.g. JPEG or resized masks), not class values",
                path=self.root,
                hint="store lossless masks with one value per class (PNG, 0 = background), "
                "or declare the classes in classes.json",
            )
        if len(fg) <= 1:  # binary: 0/1, 0/255 or 0/any one value
            values = [0, *(fg or [1])]
            self.set_mask_classes(values, ["background", "foreground"], f"mask values {values}")
        else:
            self.set_mask_classes([0, *fg], None, f"mask values {[0, *fg]}")
        return self.mask_classes

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
        for n_row, row in enumerate(rows, start=2):
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
                    split=_split_name(row, manifest, n_row),
                )
            )
        if any(it.split for it in items) and not all(it.split for it in items):
            raise ConfigError(
                "the 'split' column is empty for some rows",
                path=manifest,
                hint="give every row train, val or test (or drop the column)",
            )
        out = cls(items=items, classes=classes, root=root)
        if task == "segmentation":
            declared = _declared_mask_classes(root, rows)
            if declared is not None:
                out.set_mask_classes(*declared)
        return out

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


def read_mask(item: Item, raw: bool = False) -> np.ndarray:
    """The item's mask as ``(H, W)`` int64 class indices, read as it is stored.

    Palette PNGs (mode ``P``) give their palette indices, 8/16-bit gray PNG/TIFF their values,
    RGB masks with equal channels their gray value (colour masks are refused). With
    ``item.mask_values`` declared, stored value ``mask_values[k]`` becomes class ``k`` (a 0/255
    mask counts as 0/1 for a binary declaration) and any other value raises a
    :class:`USFMError` naming the file, the values found and the declared classes. Without a
    declaration a 0/255 mask becomes 0/1 and other values are kept. ``raw`` skips the mapping.
    """
    if item.mask is None:
        raise USFMError(f"item {item.key} has no mask")
    if isinstance(item.mask, np.ndarray):
        mask = np.asarray(item.mask)
        if mask.dtype == bool:
            mask = mask.astype(np.uint8)
    else:
        mask = _decode_mask_file(Path(item.mask))
    if raw:
        return mask.astype(np.int64)
    return map_mask_values(mask, item.mask_values, item.mask if item.mask is not None else "")


def map_mask_values(
    mask: np.ndarray, values: Sequence[int] | None, source: object = ""
) -> np.ndarray:
    """Stored mask values ``(H, W)`` → class indices (see :func:`read_mask`); int64."""
    mask = np.asarray(mask)
    if values is None:
        if mask.max(initial=0) == 255:
            return (mask > 127).astype(np.int64)  # 0/255 binary mask (PNG convention)
        return mask.astype(np.int64)
    values = list(values)
    found = np.unique(mask)
    if len(values) == 2 and set(found.tolist()) <= {0, 255} and 255 not in values:
        values = [values[0], 255]  # a 0/255 mask under a 0/1 declaration
    lut = {int(v): k for k, v in enumerate(values)}
    unknown = [int(v) for v in found if int(v) not in lut]
    if unknown:
        raise USFMError(
            f"mask values {found.tolist()} do not match the declared classes "
            f"(values {values}); unexpected {unknown[:10]}",
            path=source if isinstance(source, (str, Path)) and str(source) else None,
            hint="fix classes.json / the manifest's classes column, or the mask (a palette or "
            "greyscale PNG holding one class value per pixel)",
        )
    if values == list(range(len(values))):
        return mask.astype(np.int64)
    table = np.zeros(int(found.max(initial=0)) + 1, np.int64)
    for v, k in lut.items():
        if v < len(table):
            table[v] = k
    return table[mask.astype(np.int64)]


def _decode_mask_file(path: Path) -> np.ndarray:
    """Stored values of a mask file ``(H, W)``: palette indices, gray values (8/16 bit)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "P":
                return np.asarray(im)  # palette indices, not the colours
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError):
        arr = _decode_with_cv2(path)
    if arr.ndim == 3:
        chans = arr[..., :3]
        if not (
            np.array_equal(chans[..., 0], chans[..., 1])
            and np.array_equal(chans[..., 0], chans[..., 2])
        ):
            raise ScanReadError(
                "colour mask: cannot tell classes from RGB colours",
                path=path,
                hint="store class indices as a palette (mode P) or greyscale PNG",
            )
        arr = chans[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ScanReadError(
            f"mask must be a 2-D integer image, got {arr.dtype} {arr.shape}", path=path
        )
    return arr


def _decode_with_cv2(path: Path) -> np.ndarray:
    """Fallback decoder (formats PIL does not read), keeping the stored bit depth."""
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ScanReadError("cannot decode mask", path=path)
    return arr[..., ::-1] if arr.ndim == 3 else arr


def _split_name(row: dict[str, str], manifest: Path, n_row: int) -> str:
    """Normalised ``split`` cell of a manifest row (``""`` when absent)."""
    raw = (row.get("split") or "").strip().lower()
    if not raw:
        return ""
    if raw not in SPLIT_NAMES:
        raise ConfigError(
            f"row {n_row}: split {row.get('split')!r} is not train, val or test",
            path=manifest,
            hint="use train, val (or validation) or test in the split column",
        )
    return SPLIT_NAMES[raw]


def _declared_mask_classes(
    root: Path, rows: list[dict[str, str]]
) -> tuple[list[int], list[str], str] | None:
    """``(values, names, source)`` from ``classes.json`` or the manifest's ``classes`` column."""
    path = root / "classes.json"
    pairs: dict[int, str] = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, list):
                pairs = {i: str(n) for i, n in enumerate(doc)}
            else:
                pairs = {int(k): str(v) for k, v in dict(doc).items()}
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"unreadable classes.json: {exc}",
                path=path,
                hint='write {"1": "name", "2": "name"} (mask value: class name) or a list',
            ) from None
        source = "classes.json"
    elif rows and "classes" in rows[0]:
        for row in rows:
            for part in filter(None, (p.strip() for p in (row.get("classes") or "").split(";"))):
                value, sep, name = part.partition("=")
                try:
                    pairs[int(value)] = name.strip() if sep else f"class{int(value)}"
                except ValueError:
                    raise ConfigError(
                        f"classes cell {part!r} is not value=name",
                        path=root / "manifest.csv",
                        hint="e.g. 1=cyst;2=solid",
                    ) from None
        source = "manifest classes column"
    if not pairs:
        return None
    pairs.setdefault(0, "background")
    values = sorted(pairs)
    return values, [pairs[v] for v in values], source


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
    """Read ``splits.json`` back as item indices of ``data`` (keys must all be present).

    Accepts a run's file (``{"splits": {"train": [keys], ...}, ...}``) or a bare
    ``{"train": [keys], "val": [...], "test": [...]}``; keys are the manifest's ``image`` paths.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the splits file: {exc}",
            path=path,
            hint='a JSON file {"train": [image paths], "val": [...], "test": [...]}',
        ) from None
    doc = doc.get("splits", doc) if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or not set(doc) & {"train", "val", "test"}:
        raise ConfigError(
            "splits file has no train / val / test lists",
            path=path,
            hint='write {"train": [image paths], "val": [...], "test": [...]}',
        )
    index = {it.key: i for i, it in enumerate(data.items)}
    try:
        return {
            SPLIT_NAMES.get(k, k): [index[key] for key in keys]
            for k, keys in doc.items()
            if isinstance(keys, list)
        }
    except KeyError as exc:
        raise ConfigError(
            f"splits.json names an item not in the data set: {exc}",
            path=path,
            hint="evaluate with the same --data folder the model was trained on",
        ) from None


def resolve_splits(
    data: LabelledSet,
    splits: dict[str, list[int]] | None = None,
    splits_file: str | Path | None = None,
    split_seed: int = 0,
) -> tuple[dict[str, list[int]], str]:
    """The train / val / test item indices of a run and the rule that made them.

    Precedence: ``splits`` (given), ``splits_file``, the manifest's ``split`` column, else a
    grouped, class-stratified 70/15/15 split (:func:`make_splits`). A fixed split without
    validation items gets them from its training items (grouped, stratified, ~15 %); test
    items are never touched. Items listed in no split are left out. Raises
    :class:`ConfigError` when splits overlap or no training item remains.
    """
    if splits is not None:
        rule = "given splits"
    elif splits_file is not None:
        splits, rule = load_splits(splits_file, data), f"splits file {splits_file}"
    elif (fixed := data.fixed_splits()) is not None:
        splits, rule = fixed, "manifest split column"
    else:
        s = make_splits(data.labels, data.groups, seed=split_seed)
        return s, f"random grouped stratified 70/15/15 (split_seed {split_seed})"
    out = {k: sorted(splits.get(k, [])) for k in ("train", "val", "test")}
    where = Path(splits_file) if splits_file is not None else data.root
    if not out["train"]:
        raise ConfigError(
            "the fixed split has no training items", path=where, hint="mark some rows train"
        )
    if set(out["train"]) & set(out["test"]) or set(out["val"]) & set(out["test"]):
        raise ConfigError(
            "an item is in the test split and in train/val",
            path=where,
            hint="each item belongs to one split",
        )
    if not out["val"]:
        train = out["train"]
        sub = make_splits(
            data.labels[train], [data.groups[i] for i in train], (0.85, 0.15, 0.0), split_seed
        )
        val = sorted(train[j] for j in sub["val"] + sub["test"])
        if val and len(val) < len(train):
            out["val"] = val
            out["train"] = sorted(set(train) - set(val))
        else:  # too few items to hold any back: validate on the training items
            out["val"] = list(train)
        rule += f" (val drawn from train, split_seed {split_seed})"
    return out, rule


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


def training_loader(ds: SupervisedDataset, batch_size: int, seed: int):
    """The fine-tuning loader over ``ds``: shuffled by a generator seeded with ``seed`` (the
    same order for the same seed), batches ``(B, 1, S, S)``, the last partial batch dropped
    unless the dataset fits in one batch."""
    import torch

    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(ds) > batch_size,
    )
