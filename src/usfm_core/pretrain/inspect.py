"""Look inside an OpenUS pretraining run: what the self-adaptive mask sees on one frame.

:func:`inspect_frame` rebuilds the run's teacher and student from its last checkpoint and, for
a single ``(H, W)`` frame, returns the maps the paper's Fig. 3 shows: the teacher's
scan-attention importance, the student's reconstruction-loss map, their ALP mix at a chosen α,
the resulting mask at a chosen ratio and easy→hard share r, and the student's reconstruction
of the masked frame. Used by the napari Inspect widget and by ``usfm-core demo``.

Besides a run folder, a *backbone* that carries the student's reconstruction head works too:
the shipped ``openus-small-fast`` (written by ``tools/ship_backbone.py``) holds the teacher
backbone in ``model.safetensors`` and the student backbone + reconstruction head in
``inspect.safetensors`` (keys ``student.backbone.*`` / ``student.recon.*``), with the
pretraining config (mask cell, ratio, normalisation) in ``config.json``'s ``extra.pretrain``.

The student loss map of a new frame has no per-image EMA yet, so it is measured directly: two
student passes with complementary checkerboard masks give every cell a masked-reconstruction
loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from usfm_core.errors import CheckpointError


@dataclass
class InspectResult:
    """Maps at the frame's own ``(H, W)`` (floats in [0, 1] unless stated).

    ``attention``: teacher importance; ``loss_map``: student reconstruction loss (normalised);
    ``alp``: (1-α)·attention + α·loss (paper Eq. 7); ``mask`` (h, w) bool on the run's mask
    grid (``masking.cell``-px cells of the model input) and ``mask_image`` (H, W) bool;
    ``grid_image`` (H, W) bool marks the cell borders; ``masked_input`` (the frame with masked
    cells blanked) and ``reconstruction`` (the student's output pasted into the masked cells),
    both in [0, 1]. ``cell`` is the cell side in model-input pixels.
    """

    attention: np.ndarray
    loss_map: np.ndarray
    alp: np.ndarray
    mask: np.ndarray
    mask_image: np.ndarray
    masked_input: np.ndarray
    reconstruction: np.ndarray
    alpha: float
    r: float
    ratio: float
    cell: int = 32
    grid_image: np.ndarray | None = None


def _checkpoint_dir(run: str | Path) -> Path:
    run = Path(run)
    for cand in (run / "checkpoints" / "last", run / "last", run):
        if (cand / "model.safetensors").is_file() and (cand / "config.json").is_file():
            return cand
    raise CheckpointError(
        "no pretraining checkpoint (checkpoints/last/model.safetensors + config.json)",
        path=run,
        hint="pass the --out folder of `usfm-core pretrain` (the exported backbone/ folder "
        "lacks the student's reconstruction head)",
    )


INSPECT_FORMAT = "usfm-inspect/1"
# The parts of an OpenUS module that inspection needs, as stored in inspect.safetensors.
INSPECT_PREFIXES = ("student.backbone.", "student.recon.")


def load_run(run: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the OpenUS module of a pretraining run from its last checkpoint (eval mode).

    ``run`` may also be a backbone folder or model name that carries ``inspect.safetensors``
    (e.g. the shipped ``"openus-small-fast"``, sha256-checked): its teacher, student backbone
    and reconstruction head are loaded; the projection heads (unused here) stay untrained.
    """
    from usfm_core.models.zoo import INSPECT, resolve_model_dir

    folder = resolve_model_dir(run)  # a path, or a shipped / user model's name
    if (folder / INSPECT).is_file():
        return load_inspect_folder(folder, device)
    return _load_checkpoint(folder, device)


def _build(cfg_dict: dict, path: Path, n_items: int = 1) -> torch.nn.Module:
    """An untrained module of the pretraining method in ``cfg_dict`` (config read from
    ``path``, named in errors)."""
    from usfm_core.errors import ConfigError
    from usfm_core.pretrain.config import PretrainConfig
    from usfm_core.pretrain.methods import get_method

    try:
        cfg = PretrainConfig.from_dict(cfg_dict)
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"invalid pretraining config: {exc}", path=path) from None
    return get_method(cfg.method)(cfg, total_steps=1, steps_per_epoch=1, n_items=n_items)


def load_inspect_folder(folder: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The OpenUS module of a backbone folder with ``inspect.safetensors`` (eval mode).

    ``model.safetensors`` is the teacher backbone (``save_model`` format, any float dtype);
    ``inspect.safetensors`` holds exactly the ``student.backbone.*`` and ``student.recon.*``
    tensors; ``config.json`` ``extra.pretrain`` is the run's pretraining config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from usfm_core.models.limits import read_json_file
    from usfm_core.models.serialization import load_model
    from usfm_core.models.zoo import INSPECT

    folder = Path(folder)
    meta = read_json_file(folder / "config.json")
    extra = meta.get("extra") if isinstance(meta, dict) else None
    pre = extra.get("pretrain") if isinstance(extra, dict) else None
    if not isinstance(pre, dict):
        raise CheckpointError(
            "config.json lacks extra.pretrain (the pretraining config inspection needs)",
            path=folder / "config.json",
            hint="export the backbone with tools/ship_backbone.py",
        )
    model = _build(pre, folder / "config.json")
    teacher, _ = load_model(folder, expected_type=meta.get("model_type"))
    try:
        tensors = load_file(str(folder / INSPECT))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {INSPECT}: {exc}", path=folder / INSPECT) from None
    stray = sorted(k for k in tensors if not k.startswith(INSPECT_PREFIXES))
    parts = {
        "teacher.backbone": (model.teacher.backbone, teacher.state_dict()),
        "student.backbone": (model.student.backbone, _sub(tensors, "student.backbone.")),
        "student.recon": (model.student.recon, _sub(tensors, "student.recon.")),
    }
    try:
        if stray:
            raise RuntimeError(f"unexpected tensors {stray[:3]}")
        for name, (module, state) in parts.items():
            if module is None:
                raise RuntimeError(f"the config builds no {name}")
            for key, value in state.items():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise RuntimeError(f"{name}.{key} holds NaN/inf")
            module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{INSPECT} does not match its config: {exc}",
            path=folder / INSPECT,
            hint="re-export the backbone with tools/ship_backbone.py",
        ) from None
    return model.to(device).eval()


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _load_checkpoint(run: Path, device: str) -> torch.nn.Module:
    """The OpenUS module of a pretraining run's last checkpoint (eval mode)."""
    from safetensors.torch import load_file

    from usfm_core.pretrain.config import PretrainConfig
    from usfm_core.pretrain.methods import get_method

    if not (run / "checkpoints").is_dir() and _is_saved_model(run):
        raise CheckpointError(
            "this model has no student reconstruction head (inspect.safetensors) to inspect",
            path=run,
            hint="inspect a pretraining run folder (`usfm-core pretrain --out`) or the "
            "shipped backbone openus-small-fast",
        )
    ckpt = _checkpoint_dir(run)
    cfg = PretrainConfig.from_dict(json.loads((ckpt / "config.json").read_text("utf-8")))
    tensors = load_file(str(ckpt / "model.safetensors"))
    n_items = int(tensors["loss_ema.maps"].shape[0]) if "loss_ema.maps" in tensors else 1
    model = get_method(cfg.method)(cfg, total_steps=1, steps_per_epoch=1, n_items=n_items)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not match its config: {exc}", path=ckpt) from None
    if getattr(model.student, "recon", None) is None:
        raise CheckpointError(
            f"a {cfg.method!r} run has no reconstruction head to inspect",
            path=ckpt,
            hint="inspect an OpenUS run (method openus)",
        )
    return model.to(device).eval()


def _is_saved_model(folder: Path) -> bool:
    """True if ``folder`` (or its backbone/ or model/ sub-folder) is a saved model."""
    from usfm_core.models.zoo import RUN_SUBFOLDERS

    for cand in (folder, *(folder / sub for sub in RUN_SUBFOLDERS)):
        if (cand / "config.json").is_file():
            try:
                meta = json.loads((cand / "config.json").read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and ("model_type" in meta or "format" in meta):
                return True
    return False


def _normalise01(x: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per image: (B, h, w) → (B, h, w)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


def _cell_loss(rec: torch.Tensor, target: torch.Tensor, stride: int) -> torch.Tensor:
    """Per-cell MSE: rec, target (B, C, S, S) → (B, S/stride, S/stride)."""
    err = (rec.float() - target.float()).pow(2).mean(1, keepdim=True)
    return torch.nn.functional.avg_pool2d(err, stride)[:, 0]


def _grid_lines(grid: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the borders between the cells of an (h, w) grid stretched over ``shape``."""
    lines = np.zeros(shape, bool)
    for i in range(1, grid[0]):
        lines[min(round(i * shape[0] / grid[0]), shape[0] - 1), :] = True
    for j in range(1, grid[1]):
        lines[:, min(round(j * shape[1] / grid[1]), shape[1] - 1)] = True
    return lines


def _up(cells: torch.Tensor, shape: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """(h, w) grid map → (H, W) numpy at the frame's size."""
    x = cells[None, None].float()
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(x, size=shape, mode=mode, **kw)[0, 0].numpy()


@torch.no_grad()
def inspect_frame(
    run: str | Path | torch.nn.Module,
    frame: np.ndarray,
    *,
    alpha: float = 0.5,
    r: float = 0.5,
    ratio: float | None = None,
    size: int = 224,
    device: str = "cpu",
    seed: int = 0,
) -> InspectResult:
    """Self-adaptive masking maps of one frame ``(H, W)`` (uint8 or float) for a run.

    ``run`` is a pretraining output folder or an already loaded module (:func:`load_run`).
    ``size`` (divisible by 32) is the square model input; ``ratio`` defaults to the run's.
    """
    import cv2

    model = load_run(run, device) if not isinstance(run, torch.nn.Module) else run
    if size % 32:
        raise ValueError(f"size must be divisible by 32, got {size}")
    cfg = model.cfg
    ratio = float(cfg.masking.ratio if ratio is None else ratio)
    img = np.asarray(frame, dtype=np.float32)
    if img.ndim == 3:
        img = img[..., :3].mean(-1)
    if img.ndim != 2:
        raise ValueError(f"frame must be (H, W) or (H, W, 3), got {np.shape(frame)}")
    scale = 255.0 if img.max() > 1.0 else 1.0
    small = cv2.resize(img / scale, (size, size), interpolation=cv2.INTER_AREA)
    mean, std = float(cfg.views.mean[0]), float(cfg.views.std[0])
    x = torch.from_numpy((small - mean) / std)[None, None].to(device)
    x = x.repeat(1, model.in_chans, 1, 1)

    from usfm_core.pretrain.openus import cells_from_tokens

    cell = int(getattr(model, "cell", model.stride))
    h, w = size // cell, size // cell
    t_out = model.teacher.backbone(x, return_attention=True)
    attention = _normalise01(cells_from_tokens(t_out.importance.float().cpu(), (h, w)))
    # Student reconstruction loss of every cell: two complementary checkerboard masks.
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((yy + xx) % 2 == 0)[None].to(device)
    loss = torch.zeros(1, h, w)
    for m in (checker, ~checker):
        out = model.student(x, m)
        per_cell = _cell_loss(out["rec_g"], x, cell).cpu()
        loss = torch.where(m.cpu(), per_cell, loss)
    loss_map = _normalise01(loss)
    if getattr(cfg.masking, "score_weighting", "paper") == "code":
        alp = alpha * attention + (1 - alpha) * loss_map
    else:
        alp = (1 - alpha) * attention + alpha * loss_map

    # Easy→hard mask: top floor(N·r) ALP cells, then random others up to ceil(N·ratio).
    n = h * w
    n_mask = min(n, math.ceil(n * ratio))
    k = min(math.floor(n * r), n_mask)
    keys = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    if k:
        keys[alp.flatten().topk(k).indices] = 2.0
    chosen = keys.topk(n_mask).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    mask = mask.view(h, w)

    # Student reconstruction of the frame under this mask, shown in [0, 1].
    out = model.student(x, mask[None].to(device))
    rec = (out["rec_g"][0, 0].float().cpu() * std + mean).clamp(0, 1)
    inp = torch.from_numpy(small)
    up = mask.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    masked_input = torch.where(up, torch.zeros_like(inp), inp)
    pasted = torch.where(up, rec, inp)
    shape = img.shape
    return InspectResult(
        attention=_up(attention[0], shape),
        loss_map=_up(loss_map[0], shape),
        alp=_up(alp[0], shape),
        mask=mask.numpy(),
        mask_image=_up(mask.float(), shape, mode="nearest") > 0.5,
        masked_input=cv2.resize(masked_input.numpy(), shape[::-1], interpolation=cv2.INTER_NEAREST),
        reconstruction=cv2.resize(pasted.numpy(), shape[::-1], interpolation=cv2.INTER_LINEAR),
        alpha=float(alpha),
        r=float(r),
        ratio=ratio,
        cell=cell,
        grid_image=_grid_lines((h, w), shape),
    )
