"""Label efficiency on BUSI segmentation, and segmentation inference speed / memory on a cine.

Part 1 (``label``): pre-train a ``tiny`` OpenUS model once on unlabelled images (HC18 plus the
BUSI *train and validation* images only, so the test images are never seen), then fine-tune the
pretrained backbone and a from-scratch backbone of the same architecture on BUSI lesion
segmentation with 20 / 40 / 100 % of the training labels. Splits are grouped by ``dup_group``
and fixed (``split_seed`` 0); both arms use the same recipe, seeds and optimiser-step budget.
Reports test Dice / IoU as mean ± std over seeds.

Part 2 (``inference``): write a 1000-frame 512×512 cine to a TIFF (a few distinct simulated
frames repeated), then stream it lazily (``load_scan(...).iter_frames()``) through
``segment_frames`` with ``tiny``, ``small-cpu`` and ``small-fast`` segmenters, at the
fine-tuning size and at 256×256. Each measurement runs in a fresh subprocess, so its peak
RSS is not polluted by the training above. Targets (issue 6): ≥ 20 frames/s at 256×256
and ≤ 2 GB peak memory for the 1000-frame cine.

Part 3 (``proof``, issue 12 item 5; run only when named): the multi-seed proof. Tasks
``busi-seg`` (lesions), ``hc18-seg`` (fetal heads) and ``busi-cls`` (benign / malignant /
normal by a logistic-regression probe on frozen pooled features), fixed test splits (the
shipped recipe's, whose train + val images are the only ones pre-training saw), label ratios
10 / 20 / 100 % drawn per seed from the training split (grouped, stratified). Arms: ``openus``
(``--backbone openus=RUN_OR_NAME``), ``scratch`` (its architecture, random init), and
``mae`` / ``jepa`` at 20 % when given; one recipe and step budget for all. Each (task, arm,
ratio, seed) writes one JSON under ``benchmarks/results/label_efficiency/<setting>/<task>/``
as soon as it ends; a later sitting skips the runs already there, so the grid can be run in
pieces (``--only``) and merged with ``--summarise`` (mean ± std per cell, paired differences
per seed, the issue's targets).

    python benchmarks/label_efficiency.py --quick     # minutes on a 2-core CPU
    python benchmarks/label_efficiency.py             # the full setting (~3-5 h on 2 cores)
    python benchmarks/label_efficiency.py --quick --parts inference
    python benchmarks/label_efficiency.py --parts proof --backbone openus=RUN --threads 1 --plan
    python benchmarks/label_efficiency.py --parts proof --backbone openus=RUN --threads 1 \
        --only busi-seg 'hc18-seg/*/0.1'              # one sitting; re-run to resume
    python benchmarks/label_efficiency.py --summarise # merge every cached run of the setting

Parts 1-2 print the tables and write ``benchmarks/results/label_efficiency.json`` (``--out``),
updated after every fine-tuning run, so an interrupted run keeps what it measured. Part 3
writes its summary to ``benchmarks/results/label_efficiency_<setting>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "label_efficiency.json"
# The proof's cached runs (one JSON each) and its merged summary (``_<setting>.json`` / ``.md``).
PROOF_RESULTS = RESULTS.with_suffix("")
SUMMARY = RESULTS.with_name("label_efficiency_full.json")
REPO = Path(__file__).resolve().parents[1]
# The real data beside the checkout (as CI has it), or $USFM_SHARED_DATA.
DATA = Path(os.environ.get("USFM_SHARED_DATA") or REPO.parent / "shared" / "data")


@dataclass(frozen=True)
class TaskRecipe:
    """How every arm of one proof task is trained: the same for all arms and ratios.

    Segmentation: ``steps`` AdamW optimiser steps of ``batch`` images at ``size``², lr
    ``lr`` (cosine), validated ``n_val`` times at evenly spaced steps (best on val Dice).
    Classification: a linear probe on frozen features at ``size``² (``batch`` = feature
    batch; ``steps``, ``lr``, ``n_val`` unused). ``est_s``: seconds per run at one thread
    with the ``small-fast`` backbone on the 2-core box (the plan's estimate only).
    """

    size: int
    steps: int = 0
    batch: int = 16
    lr: float = 5e-4
    n_val: int = 6
    est_s: float = 60.0
    # Backbone lr = lr × this (decoder keeps lr); 1 = one rate (the recorded grid's recipe).
    backbone_lr_scale: float = 1.0


@dataclass
class Proof:
    """The multi-seed proof grid of a setting (issue 12 item 5).

    ``ratios`` for the openus and scratch arms, ``optional_ratios`` for mae / jepa; ``max_items``
    (smoke only) keeps that many items of each split.
    """

    tasks: dict[str, TaskRecipe]
    ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    optional_ratios: list[float] = field(default_factory=lambda: [0.2])
    max_items: dict[str, int] | None = None


@dataclass
class Setting:
    """Sizes and budgets of one benchmark setting (``quick`` or ``full``)."""

    name: str
    pretrain_steps: int
    pretrain_batch: int
    pretrain_global: int  # global view side (px); local views are 32 px
    ft_size: int  # fine-tuning input side, divisible by 32
    ft_steps: int  # optimiser steps per fine-tuning run, whatever the label ratio
    ft_batch: int
    lr: float
    seeds: list[int]
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.4, 1.0])
    cine_frames: int = 1000
    cine_side: int = 512
    # Wall-clock cap per inference measurement (s); 0 = stream the whole cine.
    infer_max_s: float = 0.0
    # Backbone of both arms: "tiny" (pre-trained here with the settings above) or a preset
    # whose pre-training preset of the same name runs unchanged (or is reused, --pretrained).
    preset: str = "tiny"
    # The multi-seed proof (``--parts proof``); its backbones come from --backbone.
    proof: Proof | None = None


def _seg_cls(
    size: int, steps: int, n_val: int, seg_s: float, cls_s: float, cls_size: int | None = None
) -> dict[str, TaskRecipe]:
    """The three proof tasks: two segmentations with one recipe, the BUSI linear probe."""
    seg = TaskRecipe(size=size, steps=steps, batch=16, lr=5e-4, n_val=n_val, est_s=seg_s)
    return {
        "busi-seg": seg,
        "hc18-seg": seg,
        "busi-cls": TaskRecipe(size=cls_size or size, batch=32, est_s=cls_s),
    }


SETTINGS = {
    "quick": Setting(
        name="quick",
        pretrain_steps=100,
        pretrain_batch=4,
        pretrain_global=64,
        ft_size=64,
        ft_steps=150,
        ft_batch=16,
        lr=1e-3,
        seeds=[0, 1],
        infer_max_s=30.0,
        proof=Proof(tasks=_seg_cls(64, 100, 4, 60.0, 30.0), seeds=[0, 1]),
    ),
    "full": Setting(
        name="full",
        pretrain_steps=2000,
        pretrain_batch=8,
        pretrain_global=64,
        ft_size=96,
        ft_steps=600,
        ft_batch=16,
        lr=1e-3,
        seeds=[0, 1, 2],
        # The proof on the final backbone (whatever --backbone openus= names): 128², 300 steps.
        # Estimates (small-fast, one free core): a busi-seg run took ≈ 1.2 CPU-s per step with
        # its validations (320 CPU-s for 264 steps, 35 min wall at load 12 on the shared box);
        # a busi-cls probe 14-18 CPU-s (features of all 780 images, then the probe).
        proof=Proof(tasks=_seg_cls(128, 300, 6, 360.0, 30.0)),
    ),
    # The shipped models' backbone: VMamba small-fast pre-trained by `usfm-core pretrain
    # --config small-fast` (2000 steps; reuse the shipped run with --pretrained).
    "shipped": Setting(
        name="shipped",
        pretrain_steps=2000,
        pretrain_batch=16,
        pretrain_global=128,
        ft_size=128,
        ft_steps=200,
        ft_batch=16,
        lr=5e-4,
        seeds=[0],
        preset="small-fast",
    ),
    # Seconds-long check that every code path runs (tests); its numbers mean nothing.
    "smoke": Setting(
        name="smoke",
        pretrain_steps=2,
        pretrain_batch=2,
        pretrain_global=64,
        ft_size=64,
        ft_steps=2,
        ft_batch=8,
        lr=5e-4,
        seeds=[0],
        ratios=[0.2],
        cine_frames=24,
        cine_side=128,
        infer_max_s=5.0,
        proof=Proof(
            tasks=_seg_cls(64, 2, 1, 2.0, 2.0),
            ratios=[0.2],
            seeds=[0],
            max_items={"train": 12, "val": 4, "test": 4},
        ),
    ),
}


# Segmenters timed on the long cine: the test size, the earlier CPU preset, the shipped one.
INFER_PRESETS = ("tiny", "small-cpu", "small-fast")


# ------------------------------------------------------------------------------ part 1: labels
def pretrain_folder(busi: Any, keep: list[int], hc18: Path, root: Path) -> Path:
    """A data root for pre-training: ``busi/`` (links to the ``keep`` images) and ``hc18/``.

    ``busi`` is a :class:`~usfm_core.finetune.data.LabelledSet`; its test images are left out
    so self-supervised pre-training never sees them.
    """
    folder = root / "pretrain_data"
    (folder / "busi").mkdir(parents=True, exist_ok=True)
    for i in keep:
        image = Path(busi.items[i].image)
        link = folder / "busi" / image.name
        if not link.exists():
            link.symlink_to(image.resolve())
    hc18_link = folder / "hc18"
    if not hc18_link.exists():
        hc18_link.symlink_to(hc18.resolve(), target_is_directory=True)
    return folder


def run_pretraining(setting: Setting, data_root: Path, out_dir: Path) -> tuple[Path, float]:
    """Pre-train ``tiny`` OpenUS for ``setting.pretrain_steps``; ``(run dir, seconds)``.

    The schedules (teacher temperature, learning rate, EMA) span exactly the steps run.
    """
    from usfm_core.pretrain import load_config, pretrain

    if setting.preset != "tiny":
        cfg = load_config(setting.preset, ["device=cpu"])
        t0 = time.perf_counter()
        run = pretrain(cfg, data_root, out_dir)
        return Path(run), time.perf_counter() - t0
    cfg = load_config(
        "tiny",
        [
            "epochs=1",
            f"steps_per_epoch={setting.pretrain_steps}",
            f"batch_size={setting.pretrain_batch}",
            f"views.global_size={setting.pretrain_global}",
            "views.local_size=32",
            "device=cpu",
            f"log_every={max(setting.pretrain_steps // 10, 1)}",
            f"save_every={setting.pretrain_steps}",
        ],
    )
    t0 = time.perf_counter()
    run = pretrain(cfg, data_root, out_dir, max_steps=setting.pretrain_steps)
    return Path(run), time.perf_counter() - t0


def epochs_for(n_train: int, batch: int, steps: int) -> int:
    """Epochs enough for ``steps`` optimiser steps over ``n_train`` images: ``finetune`` drops
    the last partial batch when ``n_train > batch`` (``n_train // batch`` steps per epoch),
    so counting it (``ceil``) would stop short of the budget."""
    per_epoch = n_train // batch if n_train > batch else 1
    return math.ceil(steps / per_epoch) + 1


def finetune_one(
    setting: Setting,
    busi: Any,
    splits: dict[str, list[int]],
    ckpt: Path | None,
    ratio: float,
    seed: int,
    out_dir: Path,
) -> dict[str, Any]:
    """One fine-tuning run (pretrained when ``ckpt`` is given, else scratch); its record.

    Every run takes ``setting.ft_steps`` optimiser steps (epochs are made long enough and
    early stopping is off), so a smaller label ratio means more passes over fewer images,
    not less training.
    """
    from usfm_core.finetune.train import finetune

    n_train = max(1, round(len(splits["train"]) * ratio))
    epochs = epochs_for(n_train, setting.ft_batch, setting.ft_steps)
    t0 = time.perf_counter()
    res = finetune(
        "segmentation",
        busi,
        out_dir,
        backbone_ckpt=ckpt,
        backbone_preset=setting.preset,
        label_ratio=ratio,
        seed=seed,
        split_seed=0,
        splits=splits,
        epochs=epochs,
        max_steps=setting.ft_steps,
        patience=epochs,
        lr=setting.lr,
        batch_size=setting.ft_batch,
        input_size=setting.ft_size,
        device="cpu",
    )
    return {
        "init": "pretrained" if ckpt is not None else "scratch",
        "label_ratio": ratio,
        "seed": seed,
        "n_train": res.n_train,
        "best_epoch": res.best_epoch,
        "seconds": round(time.perf_counter() - t0, 1),
        "val_dice": res.val_metrics.get("dice"),
        "test_dice": res.test_metrics.get("dice"),
        "test_iou": res.test_metrics.get("iou"),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of test Dice / IoU per (init, label ratio)."""
    from usfm_core.evaluate.metrics import aggregate_runs

    rows = []
    for init in ("pretrained", "scratch"):
        for ratio in sorted({r["label_ratio"] for r in runs}):
            group = [r for r in runs if r["init"] == init and r["label_ratio"] == ratio]
            if not group:
                continue
            agg = aggregate_runs([{"dice": r["test_dice"], "iou": r["test_iou"]} for r in group])
            rows.append(
                {
                    "init": init,
                    "label_ratio": ratio,
                    "n_train": group[0]["n_train"],
                    "seeds": len(group),
                    "dice_mean": agg["dice"]["mean"],
                    "dice_std": agg["dice"]["std"],
                    "iou_mean": agg["iou"]["mean"],
                    "iou_std": agg["iou"]["std"],
                }
            )
    return rows


def label_part(
    setting: Setting, work: Path, report: dict[str, Any], save, pretrained: Path | None = None
) -> None:
    """Pre-train once (or reuse ``pretrained``, a pretrain run folder), then the
    pretrained-vs-scratch × ratio × seed grid (fills ``report``)."""
    from usfm_core.finetune.data import LabelledSet, make_splits

    busi = LabelledSet.from_folder(DATA / "busi", "segmentation")
    splits = make_splits(busi.labels, busi.groups, seed=0)
    if pretrained is not None:
        run_dir, seconds = pretrained, None
        print(f"reusing the pre-trained run {run_dir}", flush=True)
    else:
        data_root = pretrain_folder(busi, splits["train"] + splits["val"], DATA / "hc18", work)
        print(f"pre-training {setting.preset} OpenUS ...", flush=True)
        run_dir, seconds = run_pretraining(setting, data_root, work / "pretrain")
    local = "2x32²" if setting.preset == "tiny" else f"4x{setting.pretrain_global // 2}²"
    report["pretrain"] = {
        "run": str(run_dir),
        "steps": setting.pretrain_steps,
        "batch": setting.pretrain_batch,
        "views": f"2x{setting.pretrain_global}² + {local}",
        "backbone": setting.preset,
        "images": f"BUSI train+val ({len(splits['train']) + len(splits['val'])}) + HC18",
        "seconds": round(seconds, 1) if seconds is not None else None,
    }
    report["splits"] = {k: len(v) for k, v in splits.items()}
    # Runs of the ratios re-run now are replaced; those of other ratios (--ratios) are kept.
    report["runs"] = [r for r in report.get("runs", []) if r["label_ratio"] not in setting.ratios]
    save()
    for ratio in setting.ratios:
        for seed in setting.seeds:
            for ckpt in (run_dir / "backbone", None):
                name = f"{'pre' if ckpt else 'scratch'}_r{ratio:g}_s{seed}"
                rec = finetune_one(setting, busi, splits, ckpt, ratio, seed, work / "ft" / name)
                print(
                    f"  {rec['init']:<10} {100 * ratio:>4.0f} %  seed {seed}: "
                    f"test Dice {rec['test_dice']:.3f}  ({rec['seconds']:.0f} s)",
                    flush=True,
                )
                report["runs"].append(rec)
                report["table"] = summarise(report["runs"])
                save()


# -------------------------------------------------------------------- part 3: multi-seed proof
# Tasks of the proof (issue 12 item 5) and their primary / secondary test metrics.
TASK_DATA = {"busi-seg": "busi", "hc18-seg": "hc18", "busi-cls": "busi"}
TASK_METRICS = {
    "busi-seg": ("dice", "iou"),
    "hc18-seg": ("dice", "iou"),
    "busi-cls": ("macro_f1", "accuracy"),
}
ARMS = ("openus", "scratch", "mae", "jepa")
OPTIONAL_ARMS = ("mae", "jepa")
PROBE_C = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths of the linear probe, picked on val
ARM_RE = re.compile(r"^(?P<arm>[a-z]+)=(?P<spec>.+)$")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the proof grid: a (task, arm, label ratio, seed) fine-tuning or probe run."""

    task: str
    arm: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        """File stem of the cached result, e.g. ``openus-r0.2-s1``."""
        return f"{self.arm}-r{self.ratio:g}-s{self.seed}"

    def path(self, results: Path, setting: str) -> Path:
        """``results/<setting>/<task>/<arm>-r<ratio>-s<seed>.json``."""
        return results / setting / self.task / f"{self.name}.json"


def parse_backbones(specs: list[str]) -> dict[str, str]:
    """``["openus=RUN", "mae=RUN"]`` → ``{"openus": "RUN", ...}`` (arms: openus, mae, jepa)."""
    from usfm_core.errors import ConfigError

    out: dict[str, str] = {}
    for spec in specs:
        m = ARM_RE.match(spec.strip())
        if m is None or m["arm"] not in ARMS or m["arm"] == "scratch":
            raise ConfigError(
                f"bad --backbone {spec!r}",
                hint="write ARM=PATH_OR_NAME with ARM one of openus, mae, jepa "
                "(scratch is built from the openus backbone's architecture)",
            )
        out[m["arm"]] = m["spec"]
    return out


def only_filter(patterns: list[str] | None):
    """A predicate on :class:`RunSpec` from ``--only`` patterns ``task[/arm[/ratio]]``.

    Each part may be ``*``; a run is kept when any pattern matches it. A task, arm or ratio
    that cannot match anything raises :class:`ConfigError` (a typo must not run nothing).
    """
    from usfm_core.errors import ConfigError

    if not patterns:
        return lambda spec: True
    parsed = []
    for pat in patterns:
        parts = [*pat.strip("/").split("/"), "*", "*", "*"][:3]
        try:
            ratio = None if parts[2] == "*" else float(parts[2])
        except ValueError:
            ratio = -1.0
        if (
            parts[0] not in ("*", *TASK_METRICS)
            or parts[1] not in ("*", *ARMS)
            or (ratio is not None and not 0 < ratio <= 1)
        ):
            raise ConfigError(
                f"--only {pat!r} matches no run",
                hint=f"write TASK[/ARM[/RATIO]]: TASK one of {', '.join(TASK_METRICS)}, ARM one "
                f"of {', '.join(ARMS)}, RATIO a fraction such as 0.2; any part may be *",
            )
        parsed.append((parts[0], parts[1], ratio))

    def keep(spec: RunSpec) -> bool:
        return any(
            t in ("*", spec.task)
            and a in ("*", spec.arm)
            and (r is None or math.isclose(r, spec.ratio))
            for t, a, r in parsed
        )

    return keep


def plan_runs(
    proof: Proof, tasks: list[str], arms: list[str], seeds: list[int], keep=None
) -> list[RunSpec]:
    """Every run of the grid, task → arm → seed → ratio (the probe reuses features across
    ratios): required arms at every ratio, optional arms (mae, jepa) at ``optional_ratios``."""
    keep = keep or (lambda spec: True)
    out = []
    for task in tasks:
        for arm in arms:
            ratios = proof.optional_ratios if arm in OPTIONAL_ARMS else proof.ratios
            for seed in seeds:
                for ratio in ratios:
                    spec = RunSpec(task, arm, float(ratio), int(seed))
                    if keep(spec):
                        out.append(spec)
    return out


def hc18_set() -> Any:
    """HC18 as a :class:`LabelledSet` grouped by subject, as ``tools/shipped_models.py`` groups
    it (``010_HC`` and ``010_2HC`` are one fetus)."""
    from usfm_core.finetune.data import LabelledSet

    data = LabelledSet.from_folder(DATA / "hc18", "segmentation")
    for it in data.items:
        it.group = re.match(r"\D*(\d+)", Path(it.key).name).group(1)
    return data


def spread_indices(indices: list[int], n: int) -> list[int]:
    """``n`` of ``indices`` evenly spaced through the list (every class of a sorted set)."""
    if len(indices) <= n:
        return list(indices)
    return sorted({indices[round(i * (len(indices) - 1) / max(n - 1, 1))] for i in range(n)})


def task_data(task: str, max_items: dict[str, int] | None = None) -> tuple[Any, dict]:
    """``(LabelledSet, splits)`` of a task with the fixed split the shipped recipe uses.

    Splits are :func:`make_splits` with ``split_seed`` 0 on the labels read from the manifest
    (BUSI: class, grouped by ``dup_group``; HC18: one class, grouped by subject), exactly the
    split whose train + val images ``tools/shipped_models.py prepare`` gives pre-training, so
    no test image was pre-trained on. ``max_items`` (smoke) keeps that many items of each
    split, evenly spaced, in a smaller set.
    """
    from usfm_core.finetune.data import LabelledSet, make_splits

    if TASK_DATA[task] == "hc18":
        data = hc18_set()
    else:
        data = LabelledSet.from_folder(
            DATA / "busi", "classification" if task == "busi-cls" else "segmentation"
        )
    splits = make_splits(data.labels, data.groups, seed=0)
    if not max_items:
        return data, splits
    picked = {k: spread_indices(v, max_items[k]) for k, v in splits.items()}
    keep = sorted(i for v in picked.values() for i in v)
    where = {old: new for new, old in enumerate(keep)}
    small = LabelledSet(
        items=[data.items[i] for i in keep], classes=list(data.classes), root=data.root
    )
    return small, {k: [where[i] for i in v] for k, v in picked.items()}


def backbone_id(backbone: Any) -> str:
    """sha256 (first 16 hex) of a backbone's type, config and weights: a cached run is reused
    only for the very backbone it was made with."""
    import hashlib

    h = hashlib.sha256()
    h.update(type(backbone).__name__.encode())
    h.update(json.dumps(backbone.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def same_finetune_regularisation(backbone: Any, reference: Any) -> Any:
    """``backbone`` rebuilt with ``reference``'s drop-path rate, its weights unchanged.

    Stochastic depth is a fine-tuning regulariser, not part of the pretrained weights, yet it
    travels in the backbone's config: a ``usfm-core pretrain`` run's backbone keeps its preset's
    0.1 while the shipped ``openus-small-fast`` export carries 0.0, so without this the MAE /
    JEPA arms were fine-tuned with stochastic depth and OpenUS / scratch without (found
    2026-12-02; the lr 5e-4 grid's MAE / JEPA rows were made that way). Every arm of the proof
    now gets ``reference``'s rate. ``backbone`` is returned
    as it is when the rates agree or when the configs differ in anything else too.
    """
    ref_cfg, cfg = reference.config, backbone.config
    rate = getattr(ref_cfg, "drop_path_rate", None)
    if rate is None or getattr(cfg, "drop_path_rate", rate) == rate:
        return backbone
    aligned = replace(cfg, drop_path_rate=rate)
    if aligned.to_dict() != ref_cfg.to_dict():
        return backbone
    rebuilt = type(backbone)(aligned)
    rebuilt.load_state_dict(backbone.state_dict())
    return rebuilt


def architecture_id(backbone: Any) -> str:
    """sha256 (first 16 hex) of a backbone's type and config: the identity of a scratch arm."""
    import hashlib

    doc = [type(backbone).__name__, backbone.config.to_dict()]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(spec: RunSpec, recipe: TaskRecipe, arm_id: str, proof: Proof) -> dict[str, Any]:
    """What a cached result must match to be reused: the cell, the recipe and the backbone."""
    recipe_doc = {k: v for k, v in asdict(recipe).items() if k != "est_s"}
    if recipe.backbone_lr_scale == 1.0:  # keys of runs cached before the option existed
        del recipe_doc["backbone_lr_scale"]
    return {
        **asdict(spec),
        "recipe": recipe_doc,
        "backbone_id": arm_id,
        "max_items": proof.max_items,
    }


def machine_load() -> dict[str, Any]:
    """The load next to a measurement: ``uptime`` output and the 1-min load average."""
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
    except OSError:
        up = ""
    return {"uptime": up.strip(), "load_avg_1min": round(os.getloadavg()[0], 2)}


def seg_run(
    spec: RunSpec,
    recipe: TaskRecipe,
    data: Any,
    splits: dict,
    backbone: Any,
    out_dir: Path,
    bar_enabled: bool = True,
) -> dict[str, Any]:
    """One segmentation fine-tuning run of ``backbone`` (trained in place: pass a fresh
    module); test / val metrics of the best-on-val model.

    Every arm takes ``recipe.steps`` optimiser steps (no early stopping) and is validated
    ``recipe.n_val`` times at the same steps. The backbone is built before ``finetune`` seeds
    torch, so the decoder's initialisation depends on the seed only: the arms of one seed
    share it (and the label subset and data order), and differ only in the backbone.
    """
    from usfm_core.finetune.data import label_subset
    from usfm_core.finetune.train import finetune
    from usfm_core.progress import progress_bar

    n_train = len(label_subset(splits["train"], data.labels, data.groups, spec.ratio, spec.seed))
    epochs = epochs_for(n_train, recipe.batch, recipe.steps)
    bar = progress_bar(
        recipe.steps, desc=f"  {spec.task} {spec.name}", unit="step", enabled=bar_enabled
    )

    def progress(info: dict[str, Any]) -> None:
        if "step" in info and info["step"] > bar.n:
            bar.update(info["step"] - bar.n)

    with bar:
        res = finetune(
            "segmentation",
            data,
            out_dir,
            backbone=backbone,
            label_ratio=spec.ratio,
            seed=spec.seed,
            split_seed=0,
            splits=splits,
            epochs=epochs,
            max_steps=recipe.steps,
            val_every=max(1, recipe.steps // recipe.n_val),
            patience=10**6,
            lr=recipe.lr,
            backbone_lr_scale=recipe.backbone_lr_scale,
            batch_size=recipe.batch,
            input_size=recipe.size,
            device="cpu",
            progress=progress,
        )
    return {
        "n_train": res.n_train,
        "steps": res.steps,
        "best_step": res.best_step,
        "test": res.test_metrics,
        "val": res.val_metrics,
    }


def probe_features(backbone: Any, data: Any, indices: list[int], size: int, batch: int):
    """Pooled features ``(N, D)`` float64 of items ``indices`` through a frozen ``backbone``
    (its global token: what :class:`Classifier` puts its linear head on); labels ``(N,)``."""
    import numpy as np
    import torch

    from usfm_core.finetune.data import SupervisedDataset
    from usfm_core.finetune.models import Classifier

    wrap = Classifier(backbone, 2).eval()  # only for its channel handling: the head is unused
    ds = SupervisedDataset(data, indices, "classification", size)
    feats, labels = [], []
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(ds, batch_size=batch):
            feats.append(wrap._features(x).global_token.double().numpy())
            labels.append(np.asarray(y))
    return np.concatenate(feats), np.concatenate(labels)


def fit_probe(
    feats: dict[str, Any], labels: dict[str, Any], train: Any, n_classes: int
) -> dict[str, Any]:
    """Logistic-regression probe: standardise on the training subset, fit one multinomial,
    class-balanced model per ``C`` in :data:`PROBE_C`, keep the best on validation macro-F1
    (ties: the stronger regularisation), score it on test.

    ``feats[split]`` ``(N, D)``, ``labels[split]`` ``(N,)``; ``train`` indexes rows of
    ``feats["train"]`` (the label subset).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x_tr, y_tr = feats["train"][train], labels["train"][train]
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6

    def scaled(x):
        return (x - mu) / sd

    best = None
    for c in PROBE_C:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(scaled(x_tr), y_tr)
        val = _probe_metrics(clf, scaled(feats["val"]), labels["val"], n_classes)
        if best is None or val["macro_f1"] > best[1]["macro_f1"]:
            best = (clf, val, c)
    clf, val, c = best
    test = _probe_metrics(clf, scaled(feats["test"]), labels["test"], n_classes)
    return {"val": val, "test": test, "probe_C": c}


def _probe_metrics(clf: Any, x: Any, y: Any, n_classes: int) -> dict[str, float]:
    """Classification metrics of a fitted probe on ``x (N, D)``, ``y (N,)`` (all K classes)."""
    import numpy as np

    from usfm_core.evaluate.metrics import classification_metrics

    proba = np.zeros((len(x), n_classes))
    proba[:, clf.classes_] = clf.predict_proba(x)  # a class absent from the subset scores 0
    return classification_metrics(y, proba.argmax(1), proba, n_classes)


def probe_run(
    spec: RunSpec,
    recipe: TaskRecipe,
    data: Any,
    splits: dict,
    make_backbone,
    cache: dict,
) -> dict[str, Any]:
    """One linear-probe run (BUSI benign / malignant / normal).

    Features of the train / val / test splits are computed once per backbone and kept in
    ``cache`` (a pretrained arm's do not depend on the seed; scratch's random backbone does),
    so the ratios of one seed share them; the probe then trains on the seed's label subset.
    """
    from usfm_core.finetune.data import label_subset

    key = (spec.task, spec.arm, spec.seed if spec.arm == "scratch" else None)
    if key not in cache:
        backbone = make_backbone(spec)
        cache[key] = {
            split: probe_features(backbone, data, splits[split], recipe.size, recipe.batch)
            for split in ("train", "val", "test")
        }
    feats = {k: v[0] for k, v in cache[key].items()}
    labels = {k: v[1] for k, v in cache[key].items()}
    subset = label_subset(splits["train"], data.labels, data.groups, spec.ratio, spec.seed)
    row = {item: j for j, item in enumerate(splits["train"])}
    res = fit_probe(feats, labels, [row[i] for i in subset], len(data.classes))
    return {"n_train": len(subset), "steps": 0, **res}


def check_cache(
    runs: list[RunSpec], keys: dict[RunSpec, dict], results: Path, setting: str, redo: bool
) -> tuple[list[RunSpec], list[RunSpec]]:
    """``(to run, cached)``: a result file whose key matches is reused; one made with another
    backbone or recipe stops the sitting (ConfigError) unless ``redo`` re-runs it."""
    from usfm_core.errors import ConfigError

    todo, done, stale = [], [], []
    for spec in runs:
        path = spec.path(results, setting)
        if not path.is_file():
            todo.append(spec)
            continue
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("key")
        except ValueError:
            old = None
        if old == keys[spec]:
            done.append(spec)
        else:
            (todo if redo else stale).append(spec)
    if stale:
        raise ConfigError(
            f"{len(stale)} cached result(s) were made with another backbone, recipe or data "
            f"subset, e.g. {stale[0].path(results, setting)}",
            hint="pass --redo to re-run them, or --results-dir NEW to keep both",
        )
    return todo, done


def proof_part(
    setting: Setting,
    backbone_specs: list[str],
    results: Path,
    work: Path,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    only: list[str] | None = None,
    redo: bool = False,
    plan_only: bool = False,
    summary_out: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the multi-seed proof grid of ``setting``; returns the plan and summary.

    One JSON per (task, arm, ratio, seed) under ``results/<setting>/<task>/``, written
    atomically as soon as the run ends; runs whose JSON exists with the same key are skipped.
    Prints the plan (runs, estimated minutes) first, then one line per run, then the summary
    (also written to ``summary_out`` and beside it as ``.md``).
    """
    import torch

    from usfm_core.errors import ConfigError
    from usfm_core.finetune.models import build_like, load_backbone
    from usfm_core.progress import format_seconds, progress_bar
    from usfm_core.utils import atomic_write_text

    proof = setting.proof
    if proof is None:
        raise ConfigError(
            f"setting {setting.name!r} has no proof recipe",
            hint=f"use one of {', '.join(k for k, v in SETTINGS.items() if v.proof)}",
        )
    backbones = parse_backbones(backbone_specs)
    keep = only_filter(only)  # bad patterns fail before any backbone is loaded
    if "openus" not in backbones:
        raise ConfigError(
            "the proof needs the OpenUS backbone (scratch rebuilds its architecture)",
            hint="pass --backbone openus=PRETRAIN_RUN_OR_MODEL_NAME",
        )
    tasks = tasks or list(proof.tasks)
    seeds = seeds if seeds is not None else list(proof.seeds)
    arms = ["openus", "scratch"] + [a for a in OPTIONAL_ARMS if a in backbones]
    loaded = {arm: load_backbone(spec) for arm, spec in backbones.items()}
    for arm in OPTIONAL_ARMS:  # same stochastic depth in fine-tuning for every arm
        if arm in loaded:
            loaded[arm] = same_finetune_regularisation(loaded[arm], loaded["openus"])
    ids = {arm: backbone_id(m) for arm, m in loaded.items()}
    ids["scratch"] = "scratch-" + architecture_id(loaded["openus"])
    for arm in OPTIONAL_ARMS:
        if arm in loaded and architecture_id(loaded[arm]) != architecture_id(loaded["openus"]):
            print(f"warning: the {arm} backbone's architecture differs from openus's", flush=True)
    runs = plan_runs(proof, tasks, arms, seeds, keep)
    keys = {s: run_key(s, proof.tasks[s.task], ids[s.arm], proof) for s in runs}
    todo, done = check_cache(runs, keys, results, setting.name, redo)
    est = sum(proof.tasks[s.task].est_s for s in todo)
    print(
        f"label-efficiency proof, setting {setting.name}: {len(runs)} runs "
        f"({len(done)} cached, {len(todo)} to run), estimated {est / 60:.0f} min "
        f"(≈ per run at 1 thread: "
        + ", ".join(f"{t} {proof.tasks[t].est_s / 60:.1f} min" for t in tasks)
        + ")",
        flush=True,
    )
    for task in tasks:
        n = sum(s.task == task for s in todo)
        if n:
            print(f"  {task}: {n} to run -> {results / setting.name / task}", flush=True)
    plan = {"runs": len(runs), "cached": len(done), "todo": len(todo), "est_s": est}
    if plan_only:
        return {"plan": plan}

    data_cache: dict[str, tuple[Any, dict]] = {}
    feature_cache: dict = {}

    def make_backbone(spec: RunSpec):
        """A fresh backbone of the arm: the loaded weights (the ones ``ids`` hashed, even if
        the folder changes during the sitting), or for scratch the openus architecture with
        random weights seeded by the run's seed (``build_like``, as ``from_scratch_like``)."""
        if spec.arm == "scratch":
            return build_like(loaded["openus"], spec.seed)
        return copy.deepcopy(loaded[spec.arm])

    with progress_bar(len(todo), desc="proof runs", unit="run") as overall:
        for spec in todo:
            recipe = proof.tasks[spec.task]
            if spec.task not in data_cache:
                data_cache[spec.task] = task_data(spec.task, proof.max_items)
            data, splits = data_cache[spec.task]
            t0, c0 = time.perf_counter(), time.process_time()
            if spec.task.endswith("-cls"):
                res = probe_run(spec, recipe, data, splits, make_backbone, feature_cache)
            else:
                out_dir = work / "proof" / spec.task / spec.name
                res = seg_run(spec, recipe, data, splits, make_backbone(spec), out_dir)
                shutil.rmtree(out_dir, ignore_errors=True)  # models are not kept
            record = {
                "key": keys[spec],
                **asdict(spec),
                "setting": setting.name,
                "backbone": backbones["openus"] if spec.arm == "scratch" else backbones[spec.arm],
                "n_split": {k: len(v) for k, v in splits.items()},
                **res,
                "seconds": round(time.perf_counter() - t0, 1),
                # CPU seconds of this process: on a shared box, closer to a free core's time
                "cpu_s": round(time.process_time() - c0, 1),
                "threads": torch.get_num_threads(),
                **machine_load(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            path = spec.path(results, setting.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=1, default=float) + "\n")
            metric = TASK_METRICS[spec.task][0]
            overall.update(1)
            print(
                f"  {spec.task:<8} {spec.arm:<7} {100 * spec.ratio:>3.0f} %  seed {spec.seed}: "
                f"test {metric} {res['test'].get(metric, float('nan')):.3f}  "
                f"({format_seconds(record['seconds'])}, load {record['load_avg_1min']})",
                flush=True,
            )
    summary = write_summary(results, setting.name, summary_out)
    return {"plan": plan, "summary": summary}


# ------------------------------------------------------------------------------ proof summary
def load_results(results: Path, setting: str) -> list[dict[str, Any]]:
    """Every cached run record of ``setting`` under ``results`` (sorted by path)."""
    out = []
    for path in sorted((results / setting).glob("*/*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("task") in TASK_METRICS:
            out.append(rec)
    return out


def _mean_std(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` with the sample std (``ddof=1``; None below two values)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(arr.std(ddof=1)) if arr.size > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n": int(arr.size)}


def _by_cell(records: list[dict[str, Any]]) -> dict[tuple, dict[int, dict]]:
    """``{(task, arm, ratio): {seed: record}}``."""
    cells: dict[tuple, dict[int, dict]] = {}
    for r in records:
        cells.setdefault((r["task"], r["arm"], float(r["ratio"])), {})[int(r["seed"])] = r
    return cells


def paired(
    cells: dict[tuple, dict[int, dict]], task: str, arm: str, base: str, ratio: float, metric: str
) -> dict[str, Any] | None:
    """Paired difference ``arm − base`` of a test metric over the seeds both ran:
    ``{"per_seed": {seed: d}, "mean", "std", "n"}``; None when no seed is shared."""
    a, b = cells.get((task, arm, ratio), {}), cells.get((task, base, ratio), {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = {s: float(a[s]["test"][metric]) - float(b[s]["test"][metric]) for s in seeds}
    return {"per_seed": d, **_mean_std(list(d.values()))}


def summarise_proof(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std per (task, arm, ratio), paired differences to scratch, target checks."""
    cells = _by_cell(records)
    order = sorted(cells, key=lambda k: (list(TASK_METRICS).index(k[0]), k[2], ARMS.index(k[1])))
    table = []
    for task, arm, ratio in order:
        runs = cells[(task, arm, ratio)]
        row: dict[str, Any] = {
            "task": task,
            "arm": arm,
            "ratio": ratio,
            "seeds": sorted(runs),
            "n_train": sorted({r["n_train"] for r in runs.values()}),
        }
        for metric in TASK_METRICS[task]:
            values = [float(runs[s]["test"][metric]) for s in sorted(runs)]
            row[metric] = {"values": values, **_mean_std(values)}
            if arm != "scratch":
                row[f"delta_{metric}"] = paired(cells, task, arm, "scratch", ratio, metric)
        table.append(row)
    return {"table": table, "targets": target_checks(cells)}


def _cell_mean(cells: dict, task: str, arm: str, ratio: float, metric: str) -> float | None:
    runs = cells.get((task, arm, ratio))
    return _mean_std([float(r["test"][metric]) for r in runs.values()])["mean"] if runs else None


def target_checks(cells: dict[tuple, dict[int, dict]]) -> list[dict[str, Any]]:
    """Issue 12's targets, each ``met`` / ``missed`` / ``not run`` with its value.

    Differences between arms are paired means over the seeds both ran.
    """
    out = []

    def add(name: str, value: float | None, need: float, seeds: int) -> None:
        status = "not run" if value is None else ("met" if value >= need - 1e-12 else "missed")
        out.append(
            {"target": name, "value": value, "needed": need, "seeds": seeds, "status": status}
        )

    d = paired(cells, "busi-seg", "openus", "scratch", 0.2, "dice")
    add(
        "BUSI lesions: openus@20% − scratch@20% ≥ 0.05 Dice",
        d and d["mean"],
        0.05,
        d["n"] if d else 0,
    )
    o20 = _cell_mean(cells, "busi-seg", "openus", 0.2, "dice")
    s100 = _cell_mean(cells, "busi-seg", "scratch", 1.0, "dice")
    add(
        "BUSI lesions: openus@20% / scratch@100% ≥ 0.95 (Dice)",
        o20 / s100 if o20 is not None and s100 else None,
        0.95,
        len(cells.get(("busi-seg", "openus", 0.2), {})),
    )
    d = paired(cells, "hc18-seg", "openus", "scratch", 0.1, "dice")
    add("HC18 heads: openus@10% − scratch@10% ≥ 0 Dice", d and d["mean"], 0.0, d["n"] if d else 0)
    for task in TASK_METRICS:
        metric = TASK_METRICS[task][0]
        for a, b in (
            ("openus", "mae"),
            ("openus", "jepa"),
            ("mae", "scratch"),
            ("jepa", "scratch"),
        ):
            d = paired(cells, task, a, b, 0.2, metric)
            add(f"{task} @20%: {a} ≥ {b} ({metric})", d and d["mean"], 0.0, d["n"] if d else 0)
    return out


def _fmt(stat: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.512 ± 0.031`` (``0.512`` for one seed; ``–`` for nothing)."""
    if not stat or stat.get("mean") is None:
        return "–"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return mean if stat.get("std") is None else f"{mean} ± {stat['std']:.3f}"


def proof_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: the per-cell table, then the targets."""
    lines = [
        "| task | labels | arm | seeds | train images | test metric | mean ± std "
        "| 2nd metric | Δ vs scratch (paired) | Δ per seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["table"]:
        m1, m2 = TASK_METRICS[r["task"]]
        delta = r.get(f"delta_{m1}")
        per_seed = (
            " ".join(f"s{s}: {d:+.3f}" for s, d in delta["per_seed"].items()) if delta else "–"
        )
        lines.append(
            f"| {r['task']} | {100 * r['ratio']:.0f} % | {r['arm']} | {len(r['seeds'])} "
            f"| {'/'.join(map(str, r['n_train']))} | {m1} | {_fmt(r[m1])} "
            f"| {m2} {_fmt(r[m2])} | {_fmt(delta, signed=True) if delta else '–'} | {per_seed} |"
        )
    lines += ["", "| target | value | needed | seeds | status |", "|---|---|---|---|---|"]
    for t in summary["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(
            f"| {t['target']} | {value} | {t['needed']:g} | {t['seeds']} | {t['status']} |"
        )
    return "\n".join(lines)


def write_summary(results: Path, setting: str, out: Path | None = None) -> dict[str, Any]:
    """Merge every cached run of ``setting`` into ``out`` (JSON) and ``out.md``; print it."""
    from usfm_core.utils import atomic_write_text

    out = out or SUMMARY.with_name(f"label_efficiency_{setting}.json")
    records = load_results(results, setting)
    summary = {
        "setting": setting,
        "results_dir": str(results / setting),
        "n_runs": len(records),
        **summarise_proof(records),
        "runs": [
            {
                k: r.get(k)
                for k in (
                    "task",
                    "arm",
                    "ratio",
                    "seed",
                    "n_train",
                    "test",
                    "seconds",
                    "threads",
                    "load_avg_1min",
                    "uptime",
                    "finished",
                )
            }
            for r in records
        ],
        "summarised": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **machine_load(),
    }
    text = proof_markdown(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(summary, indent=1, default=float) + "\n")
    atomic_write_text(out.with_suffix(".md"), text + "\n")
    print(text, flush=True)
    return summary


# --------------------------------------------------------------------------- part 2: inference
def write_cine(path: Path, n_frames: int, side: int, n_distinct: int = 20) -> Path:
    """A ``(n_frames, side, side)`` uint8 TIFF: ``n_distinct`` simulated frames, repeated."""
    import numpy as np

    from usfm_core.io.writers import write_tiff
    from usfm_core.sim import simulate_cine

    cine = simulate_cine(n_distinct, seed=0, height=side, width=side)
    reps = math.ceil(n_frames / n_distinct)
    frames = np.tile(cine.frames, (reps,) + (1,) * (cine.frames.ndim - 1))[:n_frames]
    return write_tiff(path, frames, spacing_mm=cine.spacing_mm, fps=cine.fps)


def measure_inference(
    cine: Path,
    preset: str,
    input_size: int,
    max_seconds: float,
    batch_size: int = 4,
    threads: int | None = None,
) -> dict[str, Any]:
    """Frames/s and peak RSS of ``segment_frames`` over ``cine``, in a fresh subprocess.

    ``threads``: torch CPU threads in the worker (None: torch's default, one per core).
    """
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        json.dumps(
            {
                "cine": str(cine),
                "preset": preset,
                "input_size": input_size,
                "max_seconds": max_seconds,
                "batch_size": batch_size,
                "threads": threads,
            }
        ),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"inference worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own
    address space. ``ru_maxrss`` is not used there because the kernel carries the parent's
    RSS at fork over into the child's ``ru_maxrss`` across ``exec``, so a child spawned by a
    big parent would report the parent's size. Elsewhere ``ru_maxrss`` (KiB on Linux/BSD).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inference_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Stream the cine through a randomly initialised segmenter; speed and memory.

    Frames are read lazily one by one (the whole cine is never in memory). Weights do not
    change speed or memory, so an untrained model stands in for a fine-tuned one.
    """
    import os

    import torch

    from usfm_core.finetune.infer import segment_frames
    from usfm_core.finetune.models import Segmenter, build_backbone
    from usfm_core.io import load_scan

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    model = Segmenter(build_backbone(spec["preset"]), 1).eval()
    model.input_size = spec["input_size"]
    n_params = sum(p.numel() for p in model.parameters())
    rss_start = _peak_rss_mb()
    done, fg = 0, 0.0
    with load_scan(spec["cine"]) as scan:
        n_total = scan.n_frames
        frame_shape = list(scan.frame_shape)
        # Warm-up batch (first-call allocations), not timed: a long cine amortises it.
        warm = [scan.frame(i) for i in range(min(spec["batch_size"], n_total))]
        for _ in segment_frames(model, warm, batch_size=spec["batch_size"]):
            pass
        t0 = time.perf_counter()
        for mask in segment_frames(model, scan.iter_frames(), batch_size=spec["batch_size"]):
            done += 1
            fg += float(mask.mean())
            if spec["max_seconds"] and time.perf_counter() - t0 > spec["max_seconds"]:
                if done % spec["batch_size"] == 0:
                    break
        seconds = time.perf_counter() - t0
    return {
        "preset": spec["preset"],
        "params_M": round(n_params / 1e6, 2),
        "input_size": spec["input_size"],
        "frame_shape": frame_shape,
        "frames": done,
        "frames_total": n_total,
        "complete": done == n_total,
        "seconds": round(seconds, 2),
        "fps": round(done / seconds, 2),
        "rss_after_load_mb": round(rss_start, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        # 1-min load average at the end: > cores means other jobs competed for the CPU.
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "mean_foreground": round(fg / max(done, 1), 4),
    }


def inference_part(
    setting: Setting,
    work: Path,
    report: dict[str, Any],
    save,
    threads: list[int | None] | None = None,
    presets: tuple[str, ...] = INFER_PRESETS,
) -> None:
    """Write the cine, then one subprocess per (threads, preset, input size) (fills ``report``)."""
    cine_path = work / "cine.tif"
    t0 = time.perf_counter()
    write_cine(cine_path, setting.cine_frames, setting.cine_side)
    report["cine"] = {
        "frames": setting.cine_frames,
        "side": setting.cine_side,
        "file_mb": round(cine_path.stat().st_size / 2**20, 1),
        "write_s": round(time.perf_counter() - t0, 1),
    }
    report["inference"] = []
    for n_threads in threads or [None]:
        for preset in presets:
            for size in sorted({setting.ft_size, 256}):
                # The first measurement always streams the whole cine: it is the memory check.
                first = preset == "tiny" and size == min(setting.ft_size, 256)
                cap = 0.0 if first else setting.infer_max_s
                rec = measure_inference(cine_path, preset, size, cap, threads=n_threads)
                print(
                    f"  {preset:<9} @{size:>3}, {rec['threads']} threads: {rec['fps']:6.1f} "
                    f"frames/s over {rec['frames']} frames, peak RSS {rec['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
                report["inference"].append(rec)
                save()


# ------------------------------------------------------------------------------------ output
def format_tables(report: dict[str, Any]) -> str:
    """Markdown tables of the label-efficiency summary and the inference measurements."""
    lines = []
    if report.get("table"):
        lines += [
            "| init | labels | train images | seeds | test Dice | test IoU |",
            "|---|---|---|---|---|---|",
        ]
        for r in report["table"]:
            lines.append(
                f"| {r['init']} | {100 * r['label_ratio']:.0f} % | {r['n_train']} | {r['seeds']} "
                f"| {r['dice_mean']:.3f} ± {r['dice_std']:.3f} "
                f"| {r['iou_mean']:.3f} ± {r['iou_std']:.3f} |"
            )
        lines.append("")
    if report.get("inference"):
        lines += [
            "| segmenter | params | input | threads | frames | frames/s | peak RSS (MiB) | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in report["inference"]:
            frames = f"{r['frames']}/{r['frames_total']}"
            lines.append(
                f"| {r['preset']} | {r['params_M']:.2f} M | {r['input_size']}² | {r['threads']} "
                f"| {frames} | {r['fps']:.1f} | {r['peak_rss_mb']:.0f} "
                f"| {r.get('load_avg_1min', float('nan')):.1f} |"
            )
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "shared 2-core CPU box; other jobs were running at the same time",
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="minutes-long setting")
    parser.add_argument(
        "--setting", choices=sorted(SETTINGS), default=None, help="overrides --quick"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("label", "inference", "proof"),
        default=["label", "inference"],
        help="which parts to run (proof: the multi-seed grid, only when named)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs here (else temp)")
    parser.add_argument(
        "--pretrained", type=Path, default=None, help="reuse this pretrain run folder"
    )
    parser.add_argument(
        "--ratios", type=float, nargs="+", default=None, help="label ratios (default 0.2 0.4 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--infer-threads",
        type=int,
        nargs="+",
        default=None,
        help="torch threads of the inference measurements, e.g. 2 1 (default: torch's)",
    )
    parser.add_argument(
        "--infer-presets",
        nargs="+",
        default=list(INFER_PRESETS),
        help=f"VMamba presets of the timed segmenters (default: {' '.join(INFER_PRESETS)})",
    )
    proof = parser.add_argument_group("proof (--parts proof, --summarise)")
    proof.add_argument(
        "--backbone",
        action="append",
        default=[],
        metavar="ARM=PATH",
        help="openus=RUN_OR_NAME (required), mae=RUN, jepa=RUN (optional arms, 20 %% only)",
    )
    proof.add_argument("--tasks", nargs="+", choices=list(TASK_METRICS), default=None)
    proof.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TASK/ARM/RATIO",
        help="run only matching cells, e.g. busi-seg/openus/0.2 hc18-seg/*/0.1",
    )
    proof.add_argument("--seeds", type=int, nargs="+", default=None, help="default: setting's")
    proof.add_argument(
        "--results-dir",
        type=Path,
        default=PROOF_RESULTS,
        help="cached runs: DIR/<setting>/<task>/<arm>-r<ratio>-s<seed>.json",
    )
    proof.add_argument(
        "--summary-out",
        type=Path,
        default=None,
        help="merged summary JSON (+ .md); default results/label_efficiency_<setting>.json",
    )
    proof.add_argument(
        "--lr",
        type=float,
        default=None,
        help="segmentation arms: override the recipe's learning rate (use another --results-dir)",
    )
    proof.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="segmentation arms: backbone lr = S x the recipe's lr (decoder keeps it); with "
        "S != 1 use another --results-dir (the recorded grid used 1)",
    )
    proof.add_argument(
        "--steps",
        type=int,
        default=0,
        metavar="N",
        help="segmentation arms: override the recipe's optimiser steps (use another "
        "--results-dir; the recorded grid used 300)",
    )
    proof.add_argument("--redo", action="store_true", help="re-run cached runs that are stale")
    proof.add_argument("--plan", action="store_true", help="print the plan, run nothing")
    proof.add_argument(
        "--summarise", action="store_true", help="only merge the cached runs into the summary"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(inference_worker(json.loads(args.worker))))
        return 0
    setting = SETTINGS[args.setting or ("quick" if args.quick else "full")]
    if (args.backbone_lr_scale != 1.0 or args.lr or args.steps) and setting.proof is not None:
        change: dict = {"backbone_lr_scale": args.backbone_lr_scale}
        if args.lr:
            change["lr"] = args.lr
        if args.steps:
            change["steps"] = args.steps
        tasks = {
            name: replace(r, **change) if r.steps else r  # segmentation recipes only
            for name, r in setting.proof.tasks.items()
        }
        setting = replace(setting, proof=replace(setting.proof, tasks=tasks))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.summarise:
        write_summary(args.results_dir, setting.name, args.summary_out)
        return 0
    if "proof" in args.parts:
        if not (DATA / "busi" / "manifest.csv").is_file():
            print(f"error: BUSI not found under {DATA}; the proof needs it", file=sys.stderr)
            return 2
        from usfm_core.errors import USFMError

        with tempfile.TemporaryDirectory(prefix="usfm-le-proof-") as tmp:
            try:
                proof_part(
                    setting,
                    args.backbone,
                    args.results_dir,
                    args.work_dir or Path(tmp),
                    tasks=args.tasks,
                    seeds=args.seeds,
                    only=args.only,
                    redo=args.redo,
                    plan_only=args.plan,
                    summary_out=args.summary_out,
                )
            except USFMError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        args.parts = [p for p in args.parts if p != "proof"]
        if not args.parts:
            return 0
    if "label" in args.parts and not (DATA / "busi" / "manifest.csv").is_file():
        print(f"error: BUSI not found under {DATA}; the label part needs it", file=sys.stderr)
        return 2

    if args.ratios:
        if not all(0 < r <= 1 for r in args.ratios):
            parser.error("--ratios must lie in (0, 1]")
        setting = replace(setting, ratios=sorted(args.ratios))
    report: dict[str, Any] = {"setting": asdict(setting), "meta": machine_info()}
    if args.out.is_file():  # keep the parts not re-run now from an earlier run of this setting
        old = json.loads(args.out.read_text(encoding="utf-8"))
        if old.get("setting", {}).get("name") == setting.name:
            report = {**old, **report}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        from usfm_core.utils import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="usfm-le-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "inference" in args.parts:
            inference_part(
                setting, work, report, save, args.infer_threads, tuple(args.infer_presets)
            )
        if "label" in args.parts:
            label_part(setting, work, report, save, args.pretrained)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print(format_tables(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
