"""Ship the OpenUS-pretrained backbone (``openus-small-fast``) from a pretraining run.

    python tools/ship_backbone.py RUN_DIR [--name openus-small-fast] [--install] [--out DIR]
    python tools/ship_backbone.py $HOME/usfm_runs/pretrain-small-fast-i12 --install

Re-runnable at any time, also while the run is still training:

1. **snapshot**: ``RUN_DIR/checkpoints/last``, ``log.csv`` and ``config.json`` are copied into a
   temporary folder and the copy is verified against the checkpoint's own sha256s
   (``checkpoint.json``); a copy taken while the trainer swapped checkpoints is retried. Log
   rows after the checkpoint's step are dropped. Nothing is ever written into RUN_DIR.
2. **build**: the teacher backbone (what fine-tuning uses) → ``model.safetensors`` +
   ``config.json`` (``save_model``, float16; the pretraining config in ``extra.pretrain``),
   the student backbone + reconstruction head (what Inspect / ``usfm-core demo`` need) →
   ``inspect.safetensors`` (float16, keys ``student.backbone.*`` / ``student.recon.*``); the
   float16 folder is loaded back and compared with the float32 checkpoint.
3. **install** (``--install``): the folder replaces ``src/usfm_core/assets/models/NAME``
   atomically, its ``index.json`` entry is refreshed (sha256s, step, diagnostics), and the
   model card ``docs/models/NAME.md`` and the curve plot ``docs/images/NAME_pretraining.png``
   are generated from the run. Without ``--install`` all of it goes to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NAME = "openus-small-fast"
INSPECT = "inspect.safetensors"
DIAG = (
    ("teacher_entropy_ratio_cls", "H/lnK cls"),
    ("teacher_entropy_ratio_patch", "H/lnK patch"),
    ("teacher_mi_cls", "MI cls"),
    ("teacher_mi_patch", "MI patch"),
    ("cls", "L cls"),
    ("patch", "L patch"),
    ("rec_global", "L rec global"),
    ("rec_local", "L rec local"),
)
WINDOW = 5  # log rows averaged per table point (5 rows = 50 steps at log_every 10)


# ------------------------------------------------------------------------------- snapshot
def snapshot(run: Path, dest: Path, tries: int = 20, wait_s: float = 3.0) -> int:
    """Copy ``run``'s last checkpoint, log and config into ``dest`` and verify the copy.

    Returns the checkpoint's step. ``dest/checkpoints/last`` is a verified copy; ``dest/
    log.csv`` holds only the rows up to that step. Raises the last CheckpointError after
    ``tries`` failed copies (the trainer rewrote ``last/`` during each one).
    """
    from usfm_core.errors import CheckpointError
    from usfm_core.pretrain.trainer import verify_checkpoint

    src = run / "checkpoints" / "last"
    if not (src / "checkpoint.json").is_file():
        raise CheckpointError(
            "no verified checkpoint (checkpoints/last/checkpoint.json)",
            path=run,
            hint="pass the --out folder of `usfm-core pretrain` / tools/pretrain_backbone.sh",
        )
    last_error: Exception | None = None
    for attempt in range(tries):
        ckpt = dest / "checkpoints" / "last"
        shutil.rmtree(dest / "checkpoints", ignore_errors=True)
        ckpt.parent.mkdir(parents=True)
        try:
            shutil.copytree(src, ckpt)
            verify_checkpoint(ckpt)
            step = int(json.loads((ckpt / "checkpoint.json").read_text())["step"])
            break
        except (OSError, CheckpointError, KeyError, ValueError) as exc:
            last_error = exc
            print(f"  snapshot {attempt + 1}: {exc}; retrying", file=sys.stderr)
            time.sleep(wait_s)
    else:
        assert last_error is not None
        raise last_error
    rows = [r for r in read_log(run / "log.csv") if int(float(r["step"])) <= step]
    if not rows:
        raise CheckpointError("log.csv has no rows up to the checkpoint", path=run / "log.csv")
    with open(dest / "log.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return step


def read_log(path: Path) -> list[dict[str, str]]:
    """The rows of a pretraining ``log.csv`` (a missing file is an empty log)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r.get("step")]


# ---------------------------------------------------------------------------------- build
def build_folder(model: torch.nn.Module, folder: Path, extra: dict[str, Any]) -> None:
    """Write the shipped folder: teacher backbone (float16) + student/recon tensors."""
    from safetensors.torch import save_file

    from usfm_core.models.serialization import save_model, store_weights_as
    from usfm_core.outputs import atomic_path
    from usfm_core.pretrain.inspect import INSPECT_FORMAT

    save_model(model.export_backbone(), folder, extra=extra)
    store_weights_as(folder, "float16")
    tensors = {
        f"{prefix}.{k}": v.detach().cpu().to(torch.float16).contiguous()
        if v.is_floating_point()
        else v.detach().cpu().contiguous()
        for prefix, module in (
            ("student.backbone", model.student.backbone),
            ("student.recon", model.student.recon),
        )
        for k, v in module.state_dict().items()
    }
    with atomic_path(folder / INSPECT) as tmp:
        save_file(
            tensors, str(tmp), metadata={"format": INSPECT_FORMAT, "step": str(extra["steps"])}
        )


@torch.no_grad()
def float16_check(model: torch.nn.Module, folder: Path) -> dict[str, float]:
    """Relative L2 difference, float32 checkpoint vs the shipped float16 folder, of the
    teacher's last-stage features and the student's reconstruction on one seeded input."""
    from usfm_core.finetune.models import load_backbone
    from usfm_core.pretrain.inspect import load_inspect_folder

    size = int(model.cfg.views.global_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.in_chans, size, size, generator=gen)
    grid = size // int(model.cell)
    mask = torch.rand(2, grid, grid, generator=gen) < 0.5

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    shipped_backbone = load_backbone(folder)
    shipped = load_inspect_folder(folder)
    ref_feat = model.teacher.backbone(x).features[-1]
    out = {"teacher_features": rel(shipped_backbone(x).features[-1], ref_feat)}
    ref_rec = model.student(x, mask)["rec_g"]
    out["student_reconstruction"] = rel(shipped.student(x, mask)["rec_g"], ref_rec)
    return out


# ------------------------------------------------------------------------ recipe and data
def script_config(total_steps: int) -> dict[str, Any]:
    """The config ``tools/pretrain_backbone.sh --steps total_steps`` runs (as a dict)."""
    from usfm_core.pretrain.config import load_config

    epochs = total_steps // 100
    sets = [
        f"epochs={epochs}",
        "steps_per_epoch=100",
        "save_every=50",
        "log_every=10",
        f"loss.warmup_teacher_temp_epochs={max(epochs // 10, 2)}",
        f"optim.warmup_epochs={max(epochs // 20, 1)}",
        "workers=1",
    ]
    return load_config("small-fast", sets).to_dict()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe(cfg: dict[str, Any], run: Path, name: str) -> str:
    """The commands that reproduce the run and this export: ``pretrain_backbone.sh`` with the
    ``--set`` options where the run's config differs from the script's."""
    total = int(cfg["epochs"]) * int(cfg["steps_per_epoch"])
    base, now = _flat(script_config(total)), _flat(cfg)
    ignored = {"device", "tensorboard"}
    sets = [
        f"--set {k}={json.dumps(now[k]) if isinstance(now[k], (list, bool)) else now[k]}"
        for k in sorted(now)
        if k not in ignored and base.get(k) != now[k]
    ]
    steps = "" if total == 6000 else f" --steps {total}"
    home = str(Path.home())
    run_text = str(run).replace(home, "$HOME", 1) if str(run).startswith(home) else str(run)
    pre = f"bash tools/pretrain_backbone.sh{steps}" + "".join(f" {s}" for s in sets)
    return f"{pre} && python tools/ship_backbone.py {run_text} --name {name} --install"


def data_counts(data: Path) -> dict[str, int]:
    """Images per sub-folder of the pretraining data folder (empty if it is not here)."""
    if not data.is_dir():
        return {}
    return {
        sub.name: sum(1 for f in sub.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for sub in sorted(data.iterdir())
        if sub.is_dir()
    }


def leaked_test_images(data: Path) -> int | None:
    """How many images of the pretraining folder are test images of the ``usfm-core finetune``
    split (seed 0) of BUSI / HC18 (``data/../busi``, ``data/../hc18``); None if unknown."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from shipped_models import SPLIT_SEED

        from usfm_core.finetune.data import LabelledSet, make_splits
    finally:
        sys.path.pop(0)
    leaked = 0
    for name in ("busi", "hc18"):
        labelled, linked = data.parent / name, data / name
        if not (labelled / "manifest.csv").is_file() or not linked.is_dir():
            return None
        ds = LabelledSet.from_folder(labelled, task="segmentation")
        splits = make_splits(ds.labels, ds.groups, seed=SPLIT_SEED)
        test = {Path(ds.items[i].image).name for i in splits["test"]}
        leaked += sum(1 for f in linked.iterdir() if f.name in test)
    return leaked


# ---------------------------------------------------------------------------- diagnostics
def _num(row: dict[str, str], key: str) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return math.nan


def diagnostic_points(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """Table rows: the first log row, then the mean of the ``WINDOW`` rows ending at about
    10 / 25 / 50 / 75 % of the steps done, and at the end."""
    steps = [int(float(r["step"])) for r in rows]
    last = steps[-1]
    points = [{"step": steps[0], **{k: _num(rows[0], k) for k, _ in DIAG}}]
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        end = max(i for i, s in enumerate(steps) if s <= max(steps[0], frac * last))
        window = rows[max(0, end - WINDOW + 1) : end + 1]
        point = {"step": steps[end]}
        for key, _ in DIAG:
            vals = [_num(r, key) for r in window if not math.isnan(_num(r, key))]
            point[key] = sum(vals) / len(vals) if vals else math.nan
        if point["step"] != points[-1]["step"]:
            points.append(point)
    return points


def plot_curves(rows: list[dict[str, str]], path: Path, title: str) -> Path:
    """Entropy ratio, mutual information and losses against the step (raw + running mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from usfm_core.outputs import save_figure

    steps = np.array([float(r["step"]) for r in rows])
    panels = [
        ("teacher entropy / ln K", DIAG[0:2]),
        ("teacher mutual information (nats)", DIAG[2:4]),
        ("losses", DIAG[4:8]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (label, keys) in zip(axes, panels):
        for key, name in keys:
            y = np.array([_num(r, key) for r in rows])
            (line,) = ax.plot(steps, y, alpha=0.25, lw=0.8)
            k = min(WINDOW, len(y))
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, color=line.get_color(), lw=1.6, label=name)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- card
def _fmt(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def _reflow(text: str, width: int = 96) -> str:
    """Re-wrap the plain paragraphs of a Markdown text (tables, lists, code, headings, images
    and comments are kept as they are)."""
    import textwrap

    blocks, out, in_code = text.split("\n\n"), [], False
    for block in blocks:
        fence = block.count("```") % 2 == 1
        keep = in_code or block.lstrip().startswith(("|", "#", "```", "!", "-", "<!--"))
        out.append(block if keep else textwrap.fill(" ".join(block.split()), width))
        in_code = in_code != fence
    return "\n\n".join(out)


ENTROPY_TARGET = 0.8  # docs/pretraining.md: teacher_entropy_ratio <= 0.8 at the end


def _reading(end: dict[str, float], ln_k: float) -> str:
    """One generated sentence per head: the end values against the documented target."""
    parts = []
    for head in ("cls", "patch"):
        ratio, mi = end[f"teacher_entropy_ratio_{head}"], end[f"teacher_mi_{head}"]
        verdict = "meets" if ratio <= ENTROPY_TARGET else "is above"
        parts.append(
            f"the {head} head's teacher entropy ratio {ratio:.2f} {verdict} the ≤ "
            f"{ENTROPY_TARGET} target of docs/pretraining.md, with {mi:.2f} of at most "
            f"{ln_k:.2f} nats of mutual information"
        )
    return f"At step {end['step']}: " + "; ".join(parts) + "."


def card_text(info: dict[str, Any]) -> str:
    """The model card, generated entirely from the run (``info`` from :func:`ship`)."""
    return _reflow(_card_text(info))


def _card_text(info: dict[str, Any]) -> str:
    step, total = info["step"], info["total_steps"]
    status = (
        f"**interim: step {step} of {total}** (the pretraining run was still going when this "
        "was exported; re-exported when it ends)"
        if step < total
        else f"complete: {step} of {total} steps"
    )
    cfg = info["pretrain"]
    bb = info["backbone_config"]
    counts = info["data_counts"]
    if counts:
        data_line = ", ".join(f"{n} {k}" for k, n in counts.items())
        data_line = f"{sum(counts.values())} images ({data_line})"
    else:
        data_line = "(data folder not available when exported)"
    leaked = info["leaked_test_images"]
    leak_line = (
        f"checked at export: {leaked} of the pretraining images are test images"
        if leaked is not None
        else "not re-checked at export (labelled folders not available)"
    )
    heads = cfg["heads"]
    rows = [
        "| step | " + " | ".join(n for _, n in DIAG) + " |",
        "|---" * (len(DIAG) + 1) + "|",
    ]
    for p in info["points"]:
        rows.append(f"| {p['step']} | " + " | ".join(_fmt(p[k]) for k, _ in DIAG) + " |")
    check = info["float16_check"]
    ln_k = math.log(heads["out_dim"])
    name, views = info["name"], cfg["views"]
    facts = [
        ("kind", '`backbone` (`usfm-core models`, `list_models(kind="backbone")`)'),
        (
            "architecture",
            f"VMamba `{cfg['backbone']['preset']}`: depths {'-'.join(map(str, bb['depths']))}, "
            f"widths {info['widths']}, {info['n_params'] / 1e6:.2f} M parameters, "
            f"{bb['in_chans']} input channel (grey), 32-px output stride",
        ),
        (
            "files",
            "`model.safetensors`: the **teacher** backbone (EMA of the student, the one "
            "DINO/iBOT fine-tune), float16; `inspect.safetensors`: the **student** backbone + "
            "its reconstruction head (for Inspect / `usfm-core demo`), float16; `config.json`: "
            f"architecture + the full pretraining config (`extra.pretrain`); "
            f"{info['size_mib']:.1f} MiB in all",
        ),
        (
            "float16 check",
            "relative L2 difference to the float32 checkpoint: teacher features "
            f"{check['teacher_features']:.1e}, student reconstruction "
            f"{check['student_reconstruction']:.1e}",
        ),
        (
            "input",
            f"grey frames; {views['global_size']}² global / {views['local_size']}² local views "
            f"in pretraining, normalised with mean {views['mean'][0]} / std {views['std'][0]}; "
            "any size divisible by 32 when fine-tuning",
        ),
        (
            "checksum",
            "sha256 of weights, config and inspect tensors in "
            "`src/usfm_core/assets/models/index.json`, verified on every load by name",
        ),
        (
            "use",
            f"`usfm-core finetune --task seg --data DIR --out RUN --backbone {name}`; "
            f'`load_backbone("{name}")`; napari **Fine-tune** (preselected) and **Inspect**; '
            "`usfm-core demo`",
        ),
    ]
    facts_table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in facts)])
    mask = cfg["masking"]
    return f"""# Model card: `{info["name"]}` (shipped backbone)

<!-- Generated by tools/ship_backbone.py from the pretraining run; do not edit by hand:
     re-run `python tools/ship_backbone.py RUN_DIR --install` instead. -->

**Research use only — not for clinical use.** A VMamba `{cfg["backbone"]["preset"]}` image
encoder pretrained without labels with OpenUS (self-adaptive masked iBOT self-distillation +
pixel reconstruction) on B-mode ultrasound. It segments or classifies nothing by itself: it is
the starting point for fine-tuning on a user's own labelled scans.

Status: {status}.

{facts_table}

## Pretraining data

BUSI + HC18 **train and validation** images only (the grouped split `usfm-core finetune` makes
with its default `split_seed` 0, linked by `tools/shipped_models.py prepare`; **test images are
never used**, {leak_line}) plus simulated B-mode frames from the product's simulator (sector and
linear, some with burned-in text): {data_line}. No labels are used.

## Recipe

```bash
{info["recipe"]}
```

OpenUS as configured by the `{cfg["backbone"]["preset"]}` preset and the script: batch
{cfg["batch_size"]}, {cfg["views"]["n_global"]} global + {cfg["views"]["n_local"]} local views,
{cfg["epochs"]} epochs × {cfg["steps_per_epoch"]} steps, AdamW lr {cfg["optim"]["lr"]} (reference
batch {cfg["optim"]["lr_reference_batch"]}), student temperature {cfg["loss"]["student_temp"]},
teacher temperature {cfg["loss"]["warmup_teacher_temp"]} → {cfg["loss"]["teacher_temp"]},
{cfg["loss"]["centering"]} centring, heads K = {heads["out_dim"]} with batch standardisation
= {heads["batch_norm"]}, self-adaptive masking ratio {mask["ratio"]} on {mask["cell"]}-px
cells (α {mask["alpha_start"]} → {mask["alpha_end"]}, r {mask["r_start"]} → {mask["r_end"]}),
EMA momentum {cfg["ema_momentum"]} →
{cfg["ema_momentum_end"]}. Exported from the checkpoint of step {step} (checkpoint sha256
`{info["checkpoint_sha256"][:16]}…`).

## Diagnostics (from the run's `log.csv`)

H/lnK: mean per-image teacher entropy / ln K (1 = uniform output, dead distillation ≈ 0.99);
MI: mutual information between image and teacher output in nats (0 = the same output for every
image; at most ln K = {ln_k:.2f}); L cls / L patch: the distillation cross-entropies (ln K =
{ln_k:.2f} for a uniform teacher); L rec: masked-pixel reconstruction MSE in normalised units.
First row: step {info["points"][0]["step"]} as logged; others: mean of the {WINDOW} log rows
ending at that step (log every {cfg["log_every"]} steps).

{chr(10).join(rows)}

{_reading(info["points"][-1], ln_k)}

![pretraining curves](../images/{info["name"]}_pretraining.png)

## Limits

- Pretrained on {sum(counts.values()) if counts else "about 1800"} images on a 2-core CPU:
  far less data and compute than the paper's OpenUS (308 k images from 42 public data sets).
- Downstream: [label efficiency](../benchmarks/label_efficiency.md) measures this export
  against the same network from a random start (3-5 seeds, choices on validation only): ahead
  on BUSI lesions and HC18 heads at every label ratio and seed; the shipped task models
  (`breast-lesion`, `fetal-head`, `breast-class`) are fine-tuned from it, see their cards.
- Grey B-mode only; Doppler colour is averaged away. Not validated for any clinical use.
"""


# ----------------------------------------------------------------------------------- ship
def ship(
    run: Path,
    name: str,
    *,
    install: bool,
    out: Path | None,
    data: Path,
) -> dict[str, Any]:
    """Snapshot ``run``, build the folder, and install it (or write it to ``out``)."""
    from usfm_core.models.zoo import BUILTIN_DIR, file_sha256
    from usfm_core.outputs import atomic_write_text, check_name, replace_folder, tmp_name
    from usfm_core.pretrain.inspect import load_run

    check_name(name, what="model name")
    dest_root = BUILTIN_DIR if install else (out or Path(f"ship-{name}"))
    docs = REPO / "docs" if install else dest_root
    dest_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ship-backbone-") as tmp_dir:
        snap = Path(tmp_dir)
        step = snapshot(run, snap)
        print(f"snapshot of {run}: step {step} (verified)")
        model = load_run(snap)
        cfg = json.loads((snap / "checkpoints" / "last" / "config.json").read_text())
        meta = json.loads((snap / "checkpoints" / "last" / "checkpoint.json").read_text())
        rows = read_log(snap / "log.csv")
        total = int(cfg["epochs"]) * int(cfg["steps_per_epoch"])
        # Short: it is shown under the model drop-downs of a narrow napari dock.
        description = (
            f"OpenUS-pretrained VMamba {cfg['backbone']['preset']}, "
            f"step {step} of {total}{' (interim)' if step < total else ''}"
        )
        extra = {
            "method": cfg["method"],
            "steps": step,
            "total_steps": total,
            "description": description,
            "inspect": INSPECT,
            "checkpoint_sha256": meta["sha256"]["model.safetensors"],
            "pretrain": cfg,
        }
        folder = dest_root / tmp_name(name)
        try:
            build_folder(model, folder, extra)
            check = float16_check(model, folder)
            print(f"float16 check (relative L2): {check}")
            if max(check.values()) > 0.02:
                raise SystemExit(f"float16 copy differs too much from the checkpoint: {check}")
            dest = dest_root / name
            replace_folder(folder, dest)
        finally:
            if folder.exists():
                shutil.rmtree(folder)
    files = ("config.json", "model.safetensors", INSPECT)
    size = sum((dest / f).stat().st_size for f in files) / 2**20
    n_params = sum(p.numel() for p in model.export_backbone().parameters())
    counts = data_counts(data)
    points = diagnostic_points(rows)
    end = points[-1]
    info: dict[str, Any] = {
        "name": name,
        "step": step,
        "total_steps": total,
        "pretrain": cfg,
        "backbone_config": json.loads((dest / "config.json").read_text())["config"],
        "n_params": n_params,
        "widths": "-".join(str(d) for d in model.export_backbone().config.stage_dims),
        "size_mib": size,
        "float16_check": check,
        "data_counts": counts,
        "leaked_test_images": leaked_test_images(data),
        "recipe": recipe(cfg, run, name),
        "points": points,
        "checkpoint_sha256": extra["checkpoint_sha256"],
    }
    plot = plot_curves(
        rows,
        (docs / "images" if install else docs) / f"{name}_pretraining.png",
        f"{name}: OpenUS pretraining, step {step} of {total}",
    )
    card = (docs / "models" if install else docs) / f"{name}.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(card, card_text(info))
    entry = {
        "sha256": file_sha256(dest / "model.safetensors"),
        "config_sha256": file_sha256(dest / "config.json"),
        "inspect_sha256": file_sha256(dest / INSPECT),
        "task": "backbone",
        "kind": "backbone",
        "description": description,
        "card": f"docs/models/{name}.md",
        "recipe": info["recipe"],
        "pretrain_step": step,
        "pretrain_total_steps": total,
        "interim": step < total,
        "diagnostics": {k: end[k] for k, _ in DIAG} | {"window_end_step": end["step"]},
        "float16_check": check,
        "size_mib": round(size, 2),
    }
    if install:
        index_path = BUILTIN_DIR / "index.json"
        index = json.loads(index_path.read_text())  # re-read: others may have changed it
        index[name] = entry
        atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    else:
        atomic_write_text(dest_root / "index_entry.json", json.dumps({name: entry}, indent=1))
    print(f"{'installed' if install else 'wrote'} {name} -> {dest} ({size:.1f} MiB)")
    print(f"card -> {card}; plot -> {plot}")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the pretraining run folder (never written to)")
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument(
        "--install",
        action="store_true",
        help="into src/usfm_core/assets/models/NAME + index.json + docs/models/NAME.md",
    )
    ap.add_argument("--out", type=Path, default=None, help="without --install (default ship-NAME)")
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("DATA", Path.home() / "usfm_runs" / "data")) / "pretrain",
        help="the run's pretraining data folder, for the card's image counts",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info = ship(args.run, args.name, install=args.install, out=args.out, data=args.data)
    if info["size_mib"] > 25:
        print(f"warning: {info['size_mib']:.1f} MiB is over the 25 MB budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
