"""Rounds of the annotation loop: each correct-and-retrain round saved as a model version.

A *rounds directory* holds one model folder per round::

    DIR/round-001/{config.json, model.safetensors, round.json}
    DIR/round-002/...

``config.json`` + ``model.safetensors`` are a normal fine-tuned segmenter
(:func:`~usfm_core.finetune.models.save_finetuned`), so ``usfm-core segment DIR/round-002 ...``
and ``list_models(DIR)`` work on it. ``round.json`` records the round:

* ``round`` (1, 2, ...), ``labelled`` (every labelled frame index), ``trained_on`` and
  ``held_out`` (the labelled frames used for training / kept back for validation),
* ``val_dice``: the mean per-frame Dice (:func:`~usfm_core.finetune.propagate.frame_dice`) of
  the round's masks on the held-out frames, or ``null`` when too few frames are labelled,
* ``warm_start`` (the previous round's folder, or the model / backbone the first round started
  from), ``steps``, ``created`` (UTC, ISO 8601) and anything passed as ``extra``.

**Validation rule** (:func:`split_validation`): with at least
:data:`MIN_LABELLED_FOR_VALIDATION` (6) labelled frames, every 5th labelled frame in index
order, starting with the 3rd (positions 2, 7, 12, ...), is held back: about one in five, at
least 1 (6 labelled: 1 held out, 10: 2, 14: 3) — spread over the cine, never the first or last
labelled frame, the same frames for the same labels. Those frames are not trained on *in that
round* (the next round, with more labels, holds back others). Below 6 labelled frames nothing
is held back and ``val_dice`` is None: one or two frames would make a Dice too noisy to show.

**Writes**: a round is written into a temporary folder beside it and renamed into place as the
next free number; an existing round is never replaced (if another process took the number
first, the next one is used). Folders without a readable ``round.json`` (and the toolkit's
temporaries) are not rounds.

:func:`run_round` / :func:`iter_round` do one round: warm-start from the latest round (or from
``start`` when the directory has none), :func:`~usfm_core.finetune.propagate.propagate` with
every labelled frame except the held-out ones, score the held-out frames, save the round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError

ROUND_FILE = "round.json"
ROUND_FORMAT = "usfm-round/1"
ROUND_PATTERN = re.compile(r"^round-(\d{3,})$")
MIN_LABELLED_FOR_VALIDATION = 6
VALIDATION_EVERY = 5
NORMALIZATION = "gray uint8 / 127.5 - 1"  # as finetune records it


@dataclass
class RoundInfo:
    """One saved round (the content of its ``round.json`` and where it lives)."""

    number: int
    path: Path
    labelled: list[int]
    trained_on: list[int] = field(default_factory=list)
    held_out: list[int] = field(default_factory=list)
    val_dice: float | None = None
    warm_start: str = ""
    steps: int = 0
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``round.json`` content (the path is not stored: the folder is where it is)."""
        return {
            "format": ROUND_FORMAT,
            "round": self.number,
            "labelled": list(self.labelled),
            "trained_on": list(self.trained_on),
            "held_out": list(self.held_out),
            "val_dice": self.val_dice,
            "warm_start": self.warm_start,
            "steps": self.steps,
            "created": self.created,
            "extra": self.extra,
        }

    @classmethod
    def from_folder(cls, folder: str | Path) -> RoundInfo:
        """Read ``folder/round.json``; :class:`CheckpointError` if absent or malformed."""
        from usfm_core.models.limits import read_json_file

        folder = Path(folder)
        path = folder / ROUND_FILE
        if not path.is_file():
            raise CheckpointError("not a round folder (no round.json)", path=folder)
        doc = read_json_file(path)
        try:
            if not isinstance(doc, dict) or doc.get("format") != ROUND_FORMAT:
                raise ValueError(f"format is not {ROUND_FORMAT}")
            val = doc.get("val_dice")
            return cls(
                number=int(doc["round"]),
                path=folder,
                labelled=[int(i) for i in doc["labelled"]],
                trained_on=[int(i) for i in doc.get("trained_on", [])],
                held_out=[int(i) for i in doc.get("held_out", [])],
                val_dice=None if val is None else float(val),
                warm_start=str(doc.get("warm_start", "")),
                steps=int(doc.get("steps", 0)),
                created=str(doc.get("created", "")),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"unreadable round.json: {exc}", path=path) from None


def split_validation(
    labelled: Iterable[int], min_labelled: int = MIN_LABELLED_FOR_VALIDATION
) -> tuple[list[int], list[int]]:
    """``(trained_on, held_out)`` of the labelled frame indices (rule in the module doc)."""
    ordered = sorted({int(i) for i in labelled})
    if len(ordered) < max(min_labelled, 2):
        return ordered, []
    held = [ordered[p] for p in range(2, len(ordered) - 1, VALIDATION_EVERY)]
    return [i for i in ordered if i not in held], held


def list_rounds(directory: str | Path) -> list[RoundInfo]:
    """Every round in ``directory`` (``round-NNN`` folders with a readable ``round.json``),
    in round order; an absent directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for sub in directory.iterdir():
        match = ROUND_PATTERN.match(sub.name)
        if not match or not sub.is_dir():
            continue
        try:
            info = RoundInfo.from_folder(sub)
        except CheckpointError:
            continue
        info.number = int(match.group(1))  # the folder's name is the truth
        out.append(info)
    return sorted(out, key=lambda r: r.number)


def latest_round(directory: str | Path) -> RoundInfo | None:
    """The highest-numbered round of ``directory``, or None when it has none."""
    rounds = list_rounds(directory)
    return rounds[-1] if rounds else None


def load_round(directory_or_round: str | Path, number: int | None = None):
    """``(segmenter in eval mode, RoundInfo)`` of round ``number`` (default: the latest) of a
    rounds directory, or of a round folder itself."""
    from usfm_core.finetune.models import load_finetuned

    path = Path(directory_or_round)
    if (path / ROUND_FILE).is_file() and number is None:
        info = RoundInfo.from_folder(path)
    else:
        rounds = list_rounds(path)
        pick = [r for r in rounds if number is None or r.number == number]
        if not pick:
            raise CheckpointError(
                "no such round" if rounds else "no rounds in this folder",
                path=path,
                hint=f"rounds here: {[r.number for r in rounds]}" if rounds else None,
            )
        info = pick[-1]
    model, _ = load_finetuned(info.path)
    return model, info


def save_round(
    model: nn.Module,
    directory: str | Path,
    labelled: Iterable[int],
    *,
    trained_on: Iterable[int] | None = None,
    held_out: Iterable[int] = (),
    val_dice: float | None = None,
    warm_start: str = "",
    steps: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> RoundInfo:
    """Save ``model`` as the next round of ``directory`` (created if needed); returns its info.

    Written into a temporary folder and renamed to ``round-NNN`` with ``NNN`` one above the
    highest existing number; never replaces an existing round.
    """
    from usfm_core.finetune.models import save_finetuned
    from usfm_core.outputs import clean_stale_temporaries, tmp_name
    from usfm_core.utils import atomic_write_text

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError("the rounds directory is a file", path=directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(directory)
    labelled = sorted({int(i) for i in labelled})
    held = sorted({int(i) for i in held_out})
    info = RoundInfo(
        number=0,
        path=directory,
        labelled=labelled,
        trained_on=sorted({int(i) for i in trained_on}) if trained_on is not None else labelled,
        held_out=held,
        val_dice=None if val_dice is None or not np.isfinite(val_dice) else float(val_dice),
        warm_start=str(warm_start),
        steps=int(steps),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra=dict(extra or {}),
    )
    tmp = directory / tmp_name("round")
    try:
        for _attempt in range(1000):
            number = _next_number(directory)
            info.number, info.path = number, directory / f"round-{number:03d}"
            save_finetuned(
                model,
                tmp,
                {"task": "segmentation", "round": number, "normalization": NORMALIZATION},
            )
            atomic_write_text(tmp / ROUND_FILE, json.dumps(info.to_json(), indent=1) + "\n")
            if _rename_new(tmp, info.path):
                return info
        raise ConfigError("could not find a free round number", path=directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _next_number(directory: Path) -> int:
    """One above the highest ``round-NNN`` name in ``directory`` (any entry of that name
    counts, round or not, so nothing is ever written over)."""
    numbers = [int(m.group(1)) for p in directory.iterdir() if (m := ROUND_PATTERN.match(p.name))]
    return max(numbers, default=0) + 1


def _rename_new(src: Path, dest: Path) -> bool:
    """Rename the folder ``src`` to ``dest`` only if ``dest`` does not exist; False if it does."""
    if dest.exists() or dest.is_symlink():
        return False
    try:
        os.rename(src, dest)  # fails on an existing non-empty folder (another writer)
    except OSError:
        if dest.exists():
            return False
        raise
    return True


# ---------------------------------------------------------------------------- one round


@dataclass
class RoundResult:
    """A finished (or cancelled) round: its saved info (None when cancelled) and the
    :class:`~usfm_core.finetune.propagate.PropagationResult` (model + masks of every frame)."""

    info: RoundInfo | None
    propagation: Any


def validation_dice(
    masks: np.ndarray, labels: Mapping[int, np.ndarray], held_out: Iterable[int]
) -> float | None:
    """Mean :func:`~usfm_core.finetune.propagate.frame_dice` of ``masks[i]`` against
    ``labels[i]`` over ``held_out`` (None when empty)."""
    from usfm_core.finetune.propagate import frame_dice

    held = list(held_out)
    if not held:
        return None
    return float(np.mean([frame_dice(masks[i], np.asarray(labels[i])) for i in held]))


def iter_round(
    directory: str | Path,
    frames: Any,
    labels: Mapping[int, np.ndarray],
    *,
    start: nn.Module | str | Path | None = None,
    validate: bool = True,
    cancel: Callable[[], bool] | Any | None = None,
    extra: Mapping[str, Any] | None = None,
    **propagate_options: Any,
) -> Generator[dict[str, Any], None, RoundResult]:
    """Generator form of :func:`run_round`: yields the progress dicts of
    :func:`~usfm_core.finetune.propagate.iter_propagate` and returns a :class:`RoundResult`."""
    from usfm_core.finetune.propagate import iter_propagate

    if not labels:
        raise ConfigError("no labelled frames", hint="paint or correct at least one frame")
    latest = latest_round(directory)
    if latest is not None:
        warm: nn.Module | str | Path = latest.path
        warm_desc = str(latest.path)
    elif start is not None:
        warm = start
        warm_desc = str(start) if not isinstance(start, nn.Module) else type(start).__name__
    else:
        raise ConfigError(
            "the rounds directory has no round yet and no starting model was given",
            path=Path(directory),
            hint="pass the model or backbone to start from",
        )
    trained_on, held = split_validation(labels) if validate else (sorted(labels), [])
    result = yield from iter_propagate(
        warm, frames, {i: labels[i] for i in trained_on}, cancel=cancel, **propagate_options
    )
    if result.cancelled:
        return RoundResult(None, result)
    info = save_round(
        result.model,
        directory,
        labels.keys(),
        trained_on=trained_on,
        held_out=held,
        val_dice=validation_dice(result.masks, labels, held),
        warm_start=warm_desc,
        steps=result.steps,
        extra={
            "n_frames": len(result.masks),
            "smooth": result.smooth,
            "track": result.track,
            "fit_dice": result.fit_dice,
            "retried": result.retried,
            **dict(extra or {}),
        },
    )
    return RoundResult(info, result)


def run_round(
    directory: str | Path,
    frames: Any,
    labels: Mapping[int, np.ndarray],
    *,
    start: nn.Module | str | Path | None = None,
    validate: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: Callable[[], bool] | Any | None = None,
    extra: Mapping[str, Any] | None = None,
    **propagate_options: Any,
) -> RoundResult:
    """One correct-and-retrain round, saved as the next model version of ``directory``.

    Warm-starts from the latest round of ``directory`` (``start``, a model / backbone module,
    name or folder, is used only when there is none yet), fine-tunes on every labelled frame
    except the held-out ones (:func:`split_validation` when ``validate``), segments every frame
    and saves the round with its validation Dice. ``propagate_options`` go to
    :func:`~usfm_core.finetune.propagate.propagate` (``steps``, ``smooth``, ``track``, ...).
    A cancelled round is not saved (``RoundResult.info`` is None).
    """
    from usfm_core.progress import drain

    gen = iter_round(
        directory,
        frames,
        labels,
        start=start,
        validate=validate,
        cancel=cancel,
        extra=extra,
        **propagate_options,
    )
    return drain(gen, progress)
