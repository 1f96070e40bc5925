"""Label-efficient fine-tuning: classification (CE) and segmentation (soft Dice + CE).

:func:`finetune` trains a :class:`~usfm_core.finetune.models.Classifier` or
:class:`~usfm_core.finetune.models.Segmenter` on a labelled folder or on in-memory frames,
selects the best model on the validation split (macro-F1 / mean per-class Dice), validating
every epoch or every ``val_every`` steps, stops early (patience, ``max_steps``,
``time_budget_s``), and writes::

    out_dir/model/{config.json, model.safetensors}   best model (atomic writes)
    out_dir/history.csv                              one row per validation
    out_dir/splits.json                              item keys of train (subset) / val / test
    out_dir/result.json                              settings, best epoch, val + test metrics

It is safe to call from a worker thread: ``progress`` receives a dict after every step and
epoch, and ``cancel`` (a callable or ``threading.Event``) stops training at the next step,
keeping the best model so far. The soft Dice is written here in torch (MONAI's ``DiceCELoss``
formulation) instead of adding MONAI as a dependency for one loss.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from usfm_core.errors import ConfigError
from usfm_core.evaluate.metrics import classification_metrics, dice
from usfm_core.finetune.data import (
    LabelledSet,
    SupervisedDataset,
    label_subset,
    read_mask,
    resolve_splits,
    save_splits,
    training_loader,
)
from usfm_core.finetune.models import (
    Classifier,
    Segmenter,
    build_backbone,
    build_like,
    choose_decoder,
    load_backbone,
    save_finetuned,
    trains_backbone_frozen,
)
from usfm_core.optim import adamw, lr_factor

SAVE_INTERVAL_S = 60.0

TASK_ALIASES = {
    "seg": "segmentation",
    "segmentation": "segmentation",
    "cls": "classification",
    "classification": "classification",
}


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced (paths) and how well it did (metrics)."""

    out_dir: Path
    model_dir: Path
    history_path: Path
    splits_path: Path
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] = field(default_factory=dict)
    task: str = "segmentation"
    label_ratio: float = 1.0
    seed: int = 0
    n_train: int = 0
    cancelled: bool = False
    split_rule: str = ""
    steps: int = 0
    best_step: int = 0
    classes: list[str] = field(default_factory=list)
    decoder: str = ""
    decoder_choice: dict[str, Any] | None = None
    backbone_frozen: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5, batch: bool = False
) -> torch.Tensor:
    """1 − soft Dice, averaged over the batch and foreground channels.

    Args:
        logits: ``(B, K, H, W)``; K = 1 is binary (sigmoid), K ≥ 2 softmax with 0 = background
            (left out of the mean, as background Dice is trivially high).
        target: ``(B, H, W)`` int64 labels.
        batch: one Dice per channel over the whole batch (MONAI's ``batch=True``) instead of
            one per image: an image without a class then does not ask for exactly zero
            probability of it everywhere (its per-image Dice is ≈ 0 until the sum is < eps).
    """
    if logits.shape[1] == 1:
        prob = torch.sigmoid(logits)
        onehot = (target > 0).float()[:, None]
    else:
        prob = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    dims = (0, 2, 3) if batch else (2, 3)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ce_weight: torch.Tensor | None = None,
    batch_dice: bool = False,
) -> torch.Tensor:
    """Soft Dice + cross-entropy (BCE for one logit).

    ``logits (B, K, H, W)``, ``target (B, H, W)`` int64; ``ce_weight (K,)``: per-class weights
    of the cross-entropy term (softmax models only, e.g. :func:`median_frequency_weights`);
    ``batch_dice``: :func:`soft_dice_loss`'s ``batch``.
    """
    if logits.shape[1] == 1:
        ce = F.binary_cross_entropy_with_logits(logits[:, 0], (target > 0).float())
    else:
        ce = F.cross_entropy(logits, target, weight=ce_weight)
    return soft_dice_loss(logits, target, batch=batch_dice) + ce


def median_frequency_weights(
    masks: Iterable[np.ndarray], n_classes: int, power: float = 0.5
) -> torch.Tensor:
    """Class weights ``(K,)`` for a softmax segmenter's cross-entropy: ``(median(f) / f_c)^power``
    over the pixel frequencies ``f_c`` of each class in ``masks`` (``(H, W)`` class-index maps).

    ``power`` 1 is median-frequency balancing (Eigen & Fergus 2015); the default square root is
    gentler. Why: with several small structures the unweighted loss let a decoder stay on
    background for one class for a whole short run (2 of 3 seeds on simulator phantoms); the
    square root removed that collapse on a development set without the over-segmentation full
    balancing caused (``docs/benchmarks/small_structures.md``). A class absent from ``masks``
    gets weight 0 (nothing to learn from; the median is over the present classes).
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for mask in masks:
        flat = np.asarray(mask).ravel().astype(np.int64)
        counts += np.bincount(flat[flat < n_classes], minlength=n_classes)[:n_classes]
    present = counts > 0
    if not present.any():
        return torch.ones(n_classes)
    freq = counts / counts.sum()
    weights = np.zeros(n_classes)
    weights[present] = (np.median(freq[present]) / freq[present]) ** power
    return torch.tensor(weights, dtype=torch.float32)


def parameter_groups(
    model: nn.Module, lr: float, backbone_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the trainable backbone parameters at ``lr·backbone_lr_scale``,
    everything else (decoder, head) at ``lr``. One group when the scale is 1 (or nothing of the
    backbone trains), so the default optimiser is exactly the single-group one."""
    backbone = getattr(model, "backbone", None)
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    slow = [p for p in trainable if id(p) in in_backbone]
    if backbone_lr_scale == 1.0 or not slow:
        return [{"params": trainable, "lr": lr}]
    fast = [p for p in trainable if id(p) not in in_backbone]
    return [
        {"params": slow, "lr": lr * backbone_lr_scale, "name": "backbone"},
        {"params": fast, "lr": lr, "name": "decoder"},
    ]


def finetune(
    task: str,
    data: str | Path | LabelledSet | tuple[np.ndarray, np.ndarray],
    out_dir: str | Path,
    *,
    backbone_ckpt: str | Path | None = None,
    backbone_preset: str = "tiny",
    backbone: nn.Module | None = None,
    from_scratch_like: str | Path | None = None,
    n_classes: int | None = None,
    head: str = "linear",
    decoder: str = "unet",
    label_ratio: float = 1.0,
    seed: int = 0,
    split_seed: int = 0,
    epochs: int = 20,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str = "adamw",
    backbone_lr_scale: float = 1.0,
    freeze_backbone: bool | None = None,
    batch_size: int = 16,
    input_size: int = 224,
    device: str = "auto",
    max_steps: int | None = None,
    val_every: int | None = None,
    time_budget_s: float | None = None,
    patience: int = 10,
    augment: bool = True,
    balanced: bool | None = None,
    splits: dict[str, list[int]] | None = None,
    splits_file: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
) -> FinetuneResult:
    """Fine-tune a backbone for ``task`` and save the best model under ``out_dir``.

    Args:
        task: ``"segmentation"`` / ``"seg"`` or ``"classification"`` / ``"cls"``.
        data: a folder with ``manifest.csv``, a :class:`LabelledSet`, or a tuple
            ``(images (N, H, W), masks (N, H, W))`` (segmentation) / ``(images, labels (N,))``.
        backbone_ckpt: pretrained checkpoint folder or model name; None trains from scratch.
        backbone: an already built backbone module (overrides the two options above).
        from_scratch_like: a backbone folder or name whose exact architecture and config are
            rebuilt with random weights (the scratch baseline of that backbone).
        n_classes: segmentation output channels; default from the mask classes (declared or
            found in the masks): one sigmoid for one structure, a softmax over background +
            structures for several; 1 forces a union (binary) model. Classification: number
            of classes (default: from the data).
        label_ratio: share of the training split used, stratified and grouped (0 < r ≤ 1).
        seed: seed of the label subset, augmentations and initialisation.
        split_seed: seed of the train/val/test split (kept fixed across ``seed``s).
        lr, weight_decay: default 1e-4 / 5e-2 (segmentation, OpenUS) and 1e-3 / 1e-4
            (classification, US-JEPA linear probe); SGD uses momentum 0.9.
        backbone_lr_scale: the backbone's learning rate as a fraction of ``lr`` (the decoder /
            head keep ``lr``), e.g. 0.3 to move pretrained features less than the new layers;
            the cosine schedule scales both groups alike. 1.0 = one learning rate for all.
        freeze_backbone: True: only the head / decoder trains, the backbone stays fixed in
            eval mode (a linear probe for a classifier). None (default): frozen when the
            decoder trains over a frozen backbone by design (``unet-hrc``) and the backbone is
            pretrained (not ``from_scratch_like`` nor a random preset); else trained. False:
            always trained. Saved as ``extra.freeze_backbone``.
        decoder: segmentation decoder (``unet``, ``unet-hr``, ``unet-hrc``, ``conv``, ``vss``),
            or ``auto``: ``unet-hrc`` when the training masks' median structure is under 16 px
            wide at ``input_size`` (:func:`~usfm_core.finetune.models.choose_decoder`; the
            choice and its evidence are saved as ``decoder_choice`` in the model's metadata),
            else ``unet``.
        input_size: square model input side, divisible by 32.
        max_steps: stop after this many optimiser steps in total (quick runs, tests).
        val_every: validate (and select, count patience) every N optimiser steps instead of
            at the end of every epoch.
        time_budget_s: stop training after this many seconds (training + validation).
        patience: validations without improvement before stopping.
        balanced: class-weighted cross-entropy. Classification: inverse class frequency in
            the training subset (``n / (K · n_k)``), so the majority class cannot win the
            macro-F1 model selection; default off. Segmentation with a softmax over several
            structures: square-root median-frequency weights of the training masks' pixels
            (:func:`median_frequency_weights`); default (None) on for two or more structures,
            off for one (a sigmoid model has no class weights). The weights are saved as
            ``extra.ce_weights``.
        splits: precomputed ``{"train", "val", "test"}`` item indices; else ``splits_file``
            (a ``splits.json``), else the manifest's ``split`` column, else a grouped,
            stratified 70/15/15 split (:func:`usfm_core.finetune.data.resolve_splits`). The
            rule used is recorded in ``splits.json``, ``result.json`` and the model's metadata.
        progress: called with a dict (``epoch``, ``step``, ``loss``, ... ) during training.
        cancel: callable returning True, or an object with ``is_set()``, to stop early.

    Segmentation selects on the validation mean per-class Dice (classes absent from an image's
    ground truth ignored, as MONAI does), so a failing class cannot hide behind the others.
    """
    from usfm_core.utils import resolve_device

    task = _task_name(task)
    if input_size % 32:
        raise ConfigError(f"input size must be divisible by 32, got {input_size}")
    if optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if not 0 < backbone_lr_scale <= 10:
        raise ConfigError(
            f"backbone_lr_scale must be in (0, 10], got {backbone_lr_scale} "
            "(to keep the backbone fixed, use freeze_backbone / --linear-probe)"
        )
    if val_every is not None and val_every < 1:
        raise ConfigError(f"val_every must be >= 1 step, got {val_every}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ConfigError(f"time budget must be > 0 s, got {time_budget_s}")
    out_dir = Path(out_dir)
    _check_run_folder(out_dir, data, splits_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(resolve_device(device))
    torch.manual_seed(seed)

    dataset = _as_labelled(data, task)
    if task == "segmentation":
        dataset.resolve_mask_classes()  # also labels items by mask presence (stratification)
    splits, split_rule = resolve_splits(dataset, splits, splits_file, split_seed)
    train_idx = label_subset(splits["train"], dataset.labels, dataset.groups, label_ratio, seed)
    run_splits = {"train": train_idx, "val": splits["val"], "test": splits["test"]}
    decoder, decoder_choice = _resolve_decoder(decoder, task, dataset, train_idx, input_size)
    splits_path = out_dir / "splits.json"
    save_splits(
        splits_path,
        dataset,
        run_splits,
        seed=seed,
        split_seed=split_seed,
        split_rule=split_rule,
        label_ratio=label_ratio,
        task=task,
    )

    model, backbone_source = _build_model(
        task,
        dataset,
        backbone,
        backbone_ckpt,
        backbone_preset,
        n_classes,
        head,
        decoder,
        from_scratch_like,
        seed,
    )
    model.input_size = input_size
    model.classes = _model_classes(task, dataset, model.n_classes)
    model.to(dev)
    if freeze_backbone is None:  # auto: a pretrained backbone under a frozen-backbone decoder
        pretrained = backbone is not None or backbone_ckpt is not None
        freeze_backbone = pretrained and from_scratch_like is None and trains_backbone_frozen(model)
    model.set_backbone_trainable(not freeze_backbone)
    lr = lr if lr is not None else (1e-4 if task == "segmentation" else 1e-3)
    wd = weight_decay if weight_decay is not None else (5e-2 if task == "segmentation" else 1e-4)
    params = parameter_groups(model, lr, backbone_lr_scale)
    opt = (
        adamw(params, lr=lr, weight_decay=wd)
        if optimizer == "adamw"
        else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    )

    train_ds = SupervisedDataset(dataset, train_idx, task, input_size, augment=augment, seed=seed)
    val_ds = SupervisedDataset(dataset, splits["val"], task, input_size)
    loader = training_loader(train_ds, batch_size, seed)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total))

    weight = None
    if balanced and task == "classification":
        weight = balanced_class_weights(dataset.labels[train_idx], model.n_classes).to(dev)
    elif task == "segmentation" and balanced is not False:
        # default (None): only with two or more structures (K >= 3); True: any softmax model
        if model.n_classes >= (2 if balanced else 3):
            masks = (train_ds._load(i)[1] for i in range(len(train_ds)))  # cached for training
            weight = median_frequency_weights(masks, model.n_classes).to(dev)

    extra = {
        "split_rule": split_rule,
        "test_items": [dataset.items[i].key for i in splits["test"]],
        "backbone_source": backbone_source,
        "optimizer": {
            "name": optimizer,
            "lr": lr,
            "weight_decay": wd,
            "backbone_lr_scale": backbone_lr_scale,
        },
        "freeze_backbone": bool(freeze_backbone),
    }
    if task == "segmentation":
        extra.update(mask_classes=dataset.mask_classes, mask_values=dataset.mask_values)
    if weight is not None:
        extra["ce_weights"] = [round(float(w), 6) for w in weight]
    if decoder_choice is not None:
        extra["decoder_choice"] = decoder_choice
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_epoch, best_state, best_val = 0, None, {}
    history: list[dict[str, Any]] = []
    step, stale, cancelled, epoch, last_val_step = 0, 0, False, 0, 0
    last_save, saved_at, best_at = time.monotonic(), -1, 0  # steps of the saved / best model
    t_start = time.monotonic()
    losses: list[float] = []
    t0 = time.perf_counter()

    def validate(epoch: int) -> None:
        """Score the validation split, log a history row, keep the best model."""
        nonlocal best, best_epoch, best_state, best_val, stale, last_val_step, losses, t0
        nonlocal last_save, saved_at, best_at
        val = evaluate_split(model, val_ds, task, batch_size, dev)
        row = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(np.mean(losses)),
            **{f"val_{k}": v for k, v in val.items()},
            "lr": sched.get_last_lr()[-1],  # the decoder/head group
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        _write_history(out_dir / "history.csv", history)
        _report(
            progress,
            epoch=epoch,
            epochs=epochs,
            step=step,
            steps=total,
            loss=row["train_loss"],
            val=val,
        )
        score = selection_score(task, val)
        if score > best:
            best, best_epoch, best_val, stale, best_at = score, epoch, val, 0, step
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            # Checkpoint the best model at most once a minute (disk syncs are slow); the
            # final best is always written below.
            if time.monotonic() - last_save > SAVE_INTERVAL_S:
                save_finetuned(
                    model, out_dir / "model", _extra(task, label_ratio, seed, epoch, extra)
                )
                last_save, saved_at = time.monotonic(), step
        else:
            stale += 1
        last_val_step, losses, t0 = step, [], time.perf_counter()
        model.train()
        if freeze_backbone:
            model.backbone.eval()

    stop = False
    for epoch in range(1, epochs + 1):
        epoch_start_step = step
        model.train()
        if freeze_backbone:
            model.backbone.eval()  # linear probe: no dropout / drop-path in the frozen encoder
        for x, y in loader:
            over_time = time_budget_s is not None and time.monotonic() - t_start >= time_budget_s
            if _is_cancelled(cancel) or over_time or (max_steps is not None and step >= max_steps):
                cancelled, stop = _is_cancelled(cancel), True
                break
            x, y = x.to(dev), y.to(dev)
            loss = _loss(task, model(x), y, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            _report(progress, epoch=epoch, epochs=epochs, step=step, steps=total, loss=losses[-1])
            if val_every is not None and step % val_every == 0:
                validate(epoch)
                if stale >= patience:
                    stop = True
                    break
        done = stop or epoch == epochs or (max_steps is not None and step >= max_steps)
        if step > last_val_step and (val_every is None or done):
            validate(epoch)
        if step == epoch_start_step:
            epoch -= 1  # nothing trained in this epoch
        if done or stale >= patience:
            break

    if best_state is None:
        raise ConfigError(
            "training stopped before the first epoch finished; nothing to save",
            hint="raise max_steps/epochs or do not cancel immediately",
        )
    model.load_state_dict(best_state)
    if saved_at != best_at:
        save_finetuned(model, out_dir / "model", _extra(task, label_ratio, seed, best_epoch, extra))
    test_ds = SupervisedDataset(dataset, splits["test"], task, input_size)
    test = evaluate_split(model, test_ds, task, batch_size, dev) if len(test_ds) else {}
    result = FinetuneResult(
        out_dir=out_dir,
        model_dir=out_dir / "model",
        history_path=out_dir / "history.csv",
        splits_path=splits_path,
        best_epoch=best_epoch,
        epochs_run=epoch,
        val_metrics=best_val,
        test_metrics=test,
        task=task,
        label_ratio=label_ratio,
        seed=seed,
        n_train=len(train_idx),
        cancelled=cancelled,
        split_rule=split_rule,
        steps=step,
        best_step=best_at,
        classes=list(model.classes),
        decoder=decoder if task == "segmentation" else "",
        decoder_choice=decoder_choice,
        backbone_frozen=bool(freeze_backbone),
    )
    from usfm_core.utils import atomic_write_text

    atomic_write_text(out_dir / "result.json", json.dumps(result.to_json(), indent=1))
    return result


def selection_score(task: str, val: dict[str, float]) -> tuple[float, float]:
    """Model-selection key (higher is better): validation mean per-class Dice (segmentation)
    or macro-F1 (classification), ties and undefined scores (no structure in the validation
    ground truth: NaN) broken by the lower validation loss."""
    main = val.get("dice" if task == "segmentation" else "macro_f1", float("nan"))
    main = float(main) if main is not None and np.isfinite(main) else -1.0
    return main, -float(val.get("loss", 0.0))


@torch.no_grad()
def evaluate_split(
    model: Classifier | Segmenter,
    ds: SupervisedDataset,
    task: str,
    batch_size: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Loss and metrics of ``model`` on a data set at model resolution.

    Segmentation: ``dice`` / ``iou`` = mean over structures of each structure's mean over the
    images whose ground truth holds it (MONAI ``ignore_empty``), ``dice_<name>`` per structure
    when there are several, ``dice_legacy`` (per-image, empty/empty = 1, classes merged) and
    loss; classification: accuracy, macro precision / recall / F1, AUROC and CE loss.
    """
    from usfm_core.evaluate.metrics import class_scores, per_class_scores
    from usfm_core.evaluate.report import structure_names

    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size)
    losses, preds, targets, scores = [], [], [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        losses.append(float(_loss(task, logits, y)) * len(x))
        if task == "segmentation":
            pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
            preds.extend(pred.cpu().numpy())
            targets.extend(y.cpu().numpy())
        else:
            scores.append(logits.softmax(1).cpu().numpy())
            targets.extend(y.cpu().numpy().tolist())
    n = max(len(ds), 1)
    if task == "segmentation":
        k = model.n_classes
        rows = [class_scores(p, t, k, with_hd95=False) for p, t in zip(preds, targets)]
        agg = per_class_scores(rows, structure_names(model))
        out = {"dice": agg["dice"], "iou": agg["iou"]}
        if len(agg["per_class"]) > 1:
            out.update({f"dice_{c}": m["dice"] for c, m in agg["per_class"].items()})
        legacy = [
            np.mean([dice(p == c, t == c) for c in range(1, k)]) if k > 2 else dice(p, t)
            for p, t in zip(preds, targets)
        ]
        out["dice_legacy"] = float(np.mean(legacy)) if legacy else float("nan")
    else:
        sc = np.concatenate(scores) if scores else np.zeros((0, model.n_classes))
        out = classification_metrics(targets, sc.argmax(1), sc, n_classes=model.n_classes)
    out["loss"] = float(sum(losses) / n)
    return out


def _task_name(task: str) -> str:
    if task not in TASK_ALIASES:
        raise ConfigError(
            f"unknown task {task!r}", hint="use segmentation (seg) or classification (cls)"
        )
    return TASK_ALIASES[task]


def _as_labelled(data: Any, task: str) -> LabelledSet:
    """Folder / LabelledSet / ``(images, targets)`` tuple → :class:`LabelledSet`."""
    if isinstance(data, LabelledSet):
        return data
    if isinstance(data, (str, Path)):
        return LabelledSet.from_folder(data, task)
    if isinstance(data, Sequence) and len(data) == 2:
        images, targets = data
        if task == "segmentation":
            return LabelledSet.from_arrays(images, masks=targets)
        return LabelledSet.from_arrays(images, labels=targets)
    raise ConfigError(
        f"cannot use {type(data).__name__} as training data",
        hint="pass a folder with manifest.csv or (images, masks/labels) arrays",
    )


#: Files a run writes directly in its folder (the model goes to ``model/``).
RUN_FILES = ("splits.json", "history.csv", "result.json")


def _check_run_folder(out_dir: Path, data: Any, splits_file: str | Path | None) -> None:
    """Refuse, before anything is written, a run folder that is the data folder (its
    ``splits.json`` / ``result.json`` would replace the user's) or whose files would replace
    the splits file read as input (:func:`usfm_core.outputs.check_outputs`)."""
    from usfm_core.outputs import check_out_dir, check_outputs

    inputs = [Path(data)] if isinstance(data, (str, Path)) else []
    check_out_dir(out_dir, inputs)
    if splits_file is not None:
        inputs.append(Path(splits_file))
    check_outputs([out_dir / name for name in RUN_FILES], inputs)


def _resolve_decoder(
    decoder: str, task: str, dataset: LabelledSet, train_idx: Sequence[int], input_size: int
) -> tuple[str, dict | None]:
    """``decoder`` itself, or for ``"auto"`` the choice of
    :func:`~usfm_core.finetune.models.choose_decoder` on the training masks (read as stored,
    resized to ``input_size``) and its evidence. Classifiers ignore the decoder."""
    if decoder != "auto":
        return decoder, None
    if task != "segmentation":
        return "unet", None
    # At most ~500 evenly spread training masks: a median needs no more, big sets stay quick.
    sample = list(train_idx)[:: max(1, len(train_idx) // 500)]
    return choose_decoder((read_mask(dataset.items[i]) for i in sample), input_size)


def _build_model(
    task: str,
    dataset: LabelledSet,
    backbone: nn.Module | None,
    ckpt: str | Path | None,
    preset: str,
    n_classes: int | None,
    head: str,
    decoder: str,
    like: str | Path | None = None,
    seed: int = 0,
) -> tuple[Classifier | Segmenter, str]:
    """The task model and a note of where its backbone came from (saved with the model)."""
    if backbone is not None:
        source = f"given module {type(backbone).__name__}"
    elif ckpt is not None:
        backbone, source = load_backbone(ckpt), f"pretrained {ckpt}"
    elif like is not None:
        backbone = build_like(load_backbone(like), seed)
        source = f"random init, architecture of {like}"
    else:
        backbone, source = build_backbone(preset), f"random init, preset {preset}"
    if task == "segmentation":
        if n_classes is None:
            k = len(dataset.mask_classes)
            n_classes = k if k > 2 else 1
        return Segmenter(backbone, n_classes, decoder), source
    k = n_classes or len(dataset.classes) or int(dataset.labels.max()) + 1
    if k < 2:
        raise ConfigError("classification needs at least two classes in the data")
    return Classifier(backbone, k, head), source


def _model_classes(task: str, dataset: LabelledSet, n_out: int) -> list[str]:
    """Class names saved with the model: every output's name for a softmax segmenter,
    ``[background, structure]`` for a one-structure segmenter, the image classes otherwise."""
    names = list(dataset.mask_classes)
    if task != "segmentation" or not names:
        return list(dataset.classes)
    if n_out == 1:
        return names if len(names) == 2 else ["background", "+".join(names[1:])]
    if len(names) == n_out:
        return names
    return ["background", *[f"class{c}" for c in range(1, n_out)]]


def _loss(
    task: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    if task == "segmentation":
        return segmentation_loss(logits, target, weight)
    return F.cross_entropy(logits, target, weight=weight)


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``(K,)``: ``n / (K · n_k)`` (1 for every class when balanced;
    a class absent from ``labels`` gets weight 0)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _report(progress: Callable[[dict[str, Any]], None] | None, **info: Any) -> None:
    if progress is not None:
        progress(info)


def _extra(
    task: str, ratio: float, seed: int, epoch: int, more: dict[str, Any] | None = None
) -> dict[str, Any]:
    # Record the input convention so other tools feed the model the same way, and how the
    # run was made (split rule, test items, mask classes, backbone source).
    return {
        "task": task,
        "label_ratio": ratio,
        "seed": seed,
        "epoch": epoch,
        "normalization": "gray uint8 / 127.5 - 1",
        **(more or {}),
    }


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``history.csv`` with every epoch so far (a log: a plain rename, no fsync)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    from usfm_core.outputs import atomic_path

    with atomic_path(path, fsync=False) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
