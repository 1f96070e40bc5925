"""``usfm-core demo``: the whole pipeline on a built-in sample, in a minute or two on a CPU.

simulate a calibrated DICOM cine → read it → preprocess to training frames → the
self-adaptive-masking maps (teacher attention, student loss, ALP, mask, reconstruction) of the
shipped OpenUS-pretrained backbone (``openus-small-fast``, with its reconstruction head) as a
figure. ``--tiny-pretrain`` instead pretrains a tiny OpenUS model from random weights for
``--steps`` steps on the preprocessed frames and shows its (untrained-looking) maps. The napari
version of the demo is ``python -m napari_usfm`` (the core never imports napari).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEFAULT_BACKBONE = "openus-small-fast"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the CLI."""
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on a built-in sample (napari: python -m napari_usfm)",
        description="Simulate a calibrated DICOM cine, read and preprocess it and save the "
        "self-adaptive masking maps of the shipped pretrained backbone as a figure "
        "(--tiny-pretrain: of a tiny OpenUS model pretrained here for a few steps instead).",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"pretrained backbone with a reconstruction head, or a pretraining run folder "
        f"(default: {DEFAULT_BACKBONE})",
    )
    p.add_argument(
        "--tiny-pretrain",
        action="store_true",
        help="pretrain a tiny OpenUS model from random weights for --steps steps and show its "
        "maps instead of the shipped backbone's",
    )
    p.add_argument("--steps", type=int, default=30, help="--tiny-pretrain steps (default: 30)")
    p.add_argument("--frames", type=int, default=48, help="frames of the simulated cine")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _step(msg: str) -> float:
    print(f"==> {msg}", flush=True)
    return time.perf_counter()


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    import numpy as np

    from usfm_core.io import load_scan
    from usfm_core.io.writers import write_dicom
    from usfm_core.preprocess.pipeline import preprocess_folder
    from usfm_core.pretrain.inspect import inspect_frame
    from usfm_core.sim import simulate_cine

    out = Path(args.out)
    t0 = _step(f"simulating a {args.frames}-frame sector cine with lesions and annotations")
    cine = simulate_cine(n_frames=args.frames, seed=args.seed, text=True, calipers=True)
    frames = cine.frames if cine.frames.ndim == 3 else cine.frames.mean(-1).astype(np.uint8)
    dcm = write_dicom(
        out / "scans" / "phantom" / "sim_cine.dcm", frames, spacing_mm=cine.spacing_mm, fps=cine.fps
    )
    scan = load_scan(dcm)
    print(
        f"    {dcm}: {scan.kind}, {scan.shape}, spacing {scan.spacing_mm} mm, "
        f"{scan.fps} fps ({time.perf_counter() - t0:.1f} s)"
    )

    t0 = _step("preprocessing (scan region, annotation removal, rescale, frame sampling)")
    manifest = preprocess_folder(
        out / "scans",
        out / "data" / "phantom",
        target_fps=max(1.0, float(cine.fps)),
        progress=False,
    )
    n_frames = sum(1 for _ in open(manifest, encoding="utf-8")) - 1
    print(f"    {n_frames} training frames → {manifest.parent} ({time.perf_counter() - t0:.1f} s)")

    if args.tiny_pretrain:
        source = _tiny_pretrain(args, out)
        what = f"a tiny OpenUS model after {args.steps} steps from random weights"
    else:
        source = args.backbone
        what = _describe(source)
    t0 = _step(f"self-adaptive masking maps of frame 0 ({what})")
    frame = scan.to_gray(0)
    res = inspect_frame(source, frame, alpha=0.5, r=0.5, size=224, seed=args.seed)
    fig_path = _figure(frame, res, out / "inspect.png", what)
    print(f"    figure → {fig_path} ({time.perf_counter() - t0:.1f} s)")
    if args.tiny_pretrain:
        print(f"done: open {fig_path}; log in {Path(source) / 'log.csv'}")
    else:
        print(f"done: open {fig_path}")
    return 0


def _describe(backbone: str) -> str:
    """A short phrase for a backbone name / folder: shipped name and its pretraining step."""
    from usfm_core.errors import CheckpointError
    from usfm_core.models.zoo import find_model

    try:
        entry = find_model(backbone)
    except CheckpointError:
        return str(backbone)
    extra = entry.config.get("extra", {}) or {}
    if "steps" in extra and "total_steps" in extra:
        return f"{entry.name}, pretrained {extra['steps']} of {extra['total_steps']} steps"
    return entry.name


def _tiny_pretrain(args: argparse.Namespace, out: Path) -> Path:
    """Pretrain a tiny OpenUS model on ``out/data`` for ``args.steps`` steps; its run folder."""
    from usfm_core.pretrain.config import load_config
    from usfm_core.pretrain.trainer import pretrain

    t0 = _step(f"pretraining a tiny OpenUS model for {args.steps} steps on the CPU")
    # Tiny backbone, but 128² global / 64² local views with 16-px mask cells (an 8×8 grid, as
    # the CPU presets use); inspection then runs at 224² (14×14 cells).
    cfg = load_config(
        "tiny",
        [
            f"seed={args.seed}",
            "device=cpu",
            "views.global_size=128",
            "views.local_size=64",
            "masking.cell=16",
            # One epoch of exactly --steps steps: with the data-derived epoch length the run
            # stopped early (24 of the 30 steps it announced).
            "epochs=1",
            f"steps_per_epoch={args.steps}",
        ],
    )
    run_dir = Path(pretrain(cfg, out / "data", out / "run", max_steps=args.steps))
    steps_run = _steps_logged(run_dir)
    if steps_run != args.steps:
        print(f"    note: {steps_run} of {args.steps} steps ran")
    print(f"    run → {run_dir} ({time.perf_counter() - t0:.1f} s)")
    return run_dir


def _steps_logged(run_dir: Path) -> int:
    """The last step number in ``run_dir/log.csv`` (0 when there is no log)."""
    import csv

    log = run_dir / "log.csv"
    if not log.exists():
        return 0
    with open(log, encoding="utf-8", newline="") as fh:
        steps = [int(float(row["step"])) for row in csv.DictReader(fh) if row.get("step")]
    return max(steps, default=0)


def _figure(frame, res, path: Path, what: str = "") -> Path:
    """Six panels: frame, teacher attention, student loss, ALP, mask, reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("frame", None, None),
        ("teacher attention", res.attention, "inferno"),
        ("student reconstruction loss", res.loss_map, "viridis"),
        (f"ALP (α={res.alpha:.1f})", res.alp, "magma"),
        (
            f"masked input ({res.ratio:.0%}, r={res.r:.1f}; {res.mask.shape[0]}×"
            f"{res.mask.shape[1]} cells of {res.cell} px)",
            res.masked_input,
            None,
        ),
        ("student reconstruction (masked cells)", res.reconstruction, None),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7))
    for ax, (title, img, cmap) in zip(axes.flat, panels):
        if cmap is None:  # a grey image on its own
            ax.imshow(frame if img is None else img, cmap="gray")
            if title.startswith("masked input") and res.grid_image is not None:
                # The mask grid's cell borders, drawn over the masked input.
                lines = np.ma.masked_where(~res.grid_image, res.grid_image.astype(float))
                ax.imshow(lines, cmap="cool", alpha=0.6, vmin=0.0, vmax=1.0)
        else:  # a heatmap over the frame
            ax.imshow(frame, cmap="gray")
            ax.imshow(img, cmap=cmap, alpha=0.55, vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(
        "OpenUS self-adaptive masking on a simulated B-mode frame" + (f"\n({what})" if what else "")
    )
    fig.tight_layout()
    from usfm_core.outputs import save_figure

    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return path
