"""The pre-training loop: data, model, AdamW, schedules, logging, atomic checkpoints, resume.

Launch on one device with :func:`pretrain` (or ``usfm-core pretrain``); launched by
``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) it joins the process group (NCCL on
CUDA, Gloo on CPU), wraps the student in DistributedDataParallel, gives each rank its share of
the balanced sampler, and only rank 0 logs and writes files.

Checkpoints live in ``out_dir/checkpoints/last/``: ``model.safetensors`` (student, teacher,
heads, centres, loss EMA), ``state.pt`` (optimiser, progress and RNG states: tensors and
primitives only, read back with ``torch.load(weights_only=True)``) and ``config.json``. The
folder is written beside and swapped in with ``os.replace``, so a crash never leaves a
half-written checkpoint. Resuming restores everything and continues exactly: masks and
drop-path are seeded per step, the data order and views are functions of (seed, epoch,
position), so a resumed run's losses equal the uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from usfm_core.errors import CheckpointError, USFMError
from usfm_core.optim import adamw
from usfm_core.pretrain.config import PretrainConfig
from usfm_core.pretrain.methods import get_method
from usfm_core.pretrain.schedules import cosine_schedule
from usfm_core.utils import atomic_write_text, resolve_device

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's env, join the process group if needed, pick this rank's device."""
    info = DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )
    device_str = resolve_device(device_pref)
    if device_str == "cuda" and info.distributed:
        device_str = f"cuda:{info.local_rank}"
    device = torch.device(device_str)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def _barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------- logging
class RunLogger:
    """``log.csv`` + ``log.jsonl`` (+ TensorBoard if asked and installed); no-op off rank 0."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.csv_path = out_dir / "log.csv"
        self.jsonl_path = out_dir / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to CSV/JSONL only")

    def _truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` by an interrupted run we resume from ``step``."""
        if not self.jsonl_path.exists():
            self.csv_path.unlink(missing_ok=True)
            return
        rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line]
        rows = [r for r in rows if r.get("step", 0) <= step]
        self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.csv_path.unlink(missing_ok=True)
        for row in rows:
            self._write_csv(row)

    def _write_csv(self, row: dict[str, Any]) -> None:
        new = not self.csv_path.exists()
        if new:
            self._fields = list(row)
        elif not hasattr(self, "_fields"):
            with open(self.csv_path, newline="") as fh:
                self._fields = next(csv.reader(fh))
        with open(self.csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv(row)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"pretrain/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors/primitives (loadable with weights_only=True)."""
    # The legacy global NumPy RNG is saved too, in case a transform or library uses it.
    np_state = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_META = "checkpoint.json"
CHECKPOINT_FORMAT = "usfm-pretrain-checkpoint/1"
_CHECKSUMMED = ("model.safetensors", "state.pt", "config.json")
# The only folders the toolkit creates beside last/: a save in progress (tmp) and the copy
# moved aside while last/ is swapped (old), each suffixed with the writing process's id.
_TEMP_NAME = re.compile(r"\.last\.(tmp|old)-(\d+)")


def save_checkpoint(
    ckpt_root: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
    config: PretrainConfig,
) -> Path:
    """Write ``ckpt_root/last/`` atomically (temp folder, then ``os.replace``).

    ``checkpoint.json`` is written last into the temp folder: the sha256 of every other file
    (weights, optimiser/RNG state, config), checked by :func:`find_checkpoint` and
    :func:`load_checkpoint`. Half-written folders of killed runs are removed first
    (:func:`clean_checkpoint_temps`).
    """
    from safetensors.torch import save_file

    from usfm_core.models.zoo import file_sha256

    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_checkpoint_temps(ckpt_root)
    tmp = ckpt_root / f".last.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone(): breaks shared storage (e.g. a shared head) that safetensors refuses.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(progress["step"])})
    torch.save(
        {"optimizer": optimizer.state_dict(), "progress": progress, "rng": _rng_state()},
        tmp / "state.pt",
    )
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": int(progress["step"]),
        "sha256": {name: file_sha256(tmp / name) for name in _CHECKSUMMED},
    }
    (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))
    last = ckpt_root / "last"
    if last.exists():
        # A directory cannot be replaced onto a non-empty one: move the old one aside first.
        old = ckpt_root / f".last.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
        os.replace(tmp, last)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, last)
    clean_checkpoint_temps(ckpt_root)  # an .old copy kept by a crash is obsolete now
    return last


def _pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists (POSIX); elsewhere, or for our own id, False."""
    if pid == os.getpid() or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_checkpoint_temps(ckpt_root: Path) -> list[Path]:
    """Remove half-written checkpoint folders left by killed runs; return what was removed.

    Only the toolkit's own folders are touched (``.last.tmp-PID`` / ``.last.old-PID``
    directories, not links) and only when process PID is gone: a ``.tmp`` is always
    incomplete; an ``.old`` copy only once a complete ``last/`` replaces it (until then it
    is the checkpoint :func:`find_checkpoint` resumes from).
    """
    if not ckpt_root.is_dir():
        return []
    last_ok = (ckpt_root / "last" / "state.pt").is_file()
    removed = []
    for path in sorted(ckpt_root.iterdir()):
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if _pid_alive(pid) or (kind == "old" and not last_ok):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed the half-written checkpoint folder %s", path)
    return removed


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint folder against the sha256s in its checkpoint.json.

    Raises :class:`CheckpointError` (``cannot read checkpoint: …``) naming the damaged file.
    A folder written before checksums existed (no checkpoint.json) passes with a warning.
    """
    from usfm_core.models.limits import read_json_file
    from usfm_core.models.zoo import file_sha256

    meta_path = path / CHECKPOINT_META
    if not meta_path.is_file():
        log.warning(
            "%s has no %s (older version): its files cannot be verified", path, CHECKPOINT_META
        )
        return
    hint = (
        "the checkpoint is damaged and no earlier one is kept: delete the checkpoints "
        "folder to start afresh, or restore it from a backup"
    )
    meta = read_json_file(meta_path)
    sums = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(sums.get(n), str) for n in _CHECKSUMMED):
        raise CheckpointError(
            f"cannot read checkpoint: {CHECKPOINT_META} lacks the sha256 of "
            f"{', '.join(_CHECKSUMMED)}",
            path=meta_path,
            hint=hint,
        )
    for name in _CHECKSUMMED:
        file = path / name
        if not file.is_file():
            raise CheckpointError(
                f"cannot read checkpoint: {name} is missing", path=file, hint=hint
            )
        actual = file_sha256(file)
        if actual != sums[name]:
            raise CheckpointError(
                f"cannot read checkpoint: {name} fails its checksum (sha256 {actual[:12]}… ≠ "
                f"{sums[name][:12]}… recorded in {CHECKPOINT_META})",
                path=file,
                hint=hint,
            )


def find_checkpoint(ckpt_root: Path) -> Path | None:
    """``last/`` or, after a crash between the two renames of a save, the old copy; None if
    there is none. The folder found is verified (:func:`verify_checkpoint`): a damaged one
    raises :class:`CheckpointError` rather than resuming from corrupt state."""
    last = ckpt_root / "last"
    found = None
    if (last / "state.pt").exists():
        found = last
    elif ckpt_root.is_dir():
        olds = [
            p
            for p in ckpt_root.iterdir()
            if p.name.startswith(".last.old-") and not p.is_symlink() and (p / "state.pt").is_file()
        ]
        found = max(olds, key=lambda p: p.stat().st_mtime, default=None)
    if found is not None:
        verify_checkpoint(found)
    return found


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore model, optimiser and RNG states from ``path``; return the progress dict.

    The files are checked against their sha256s first (:func:`verify_checkpoint`); state is
    read with ``torch.load(weights_only=True)`` (tensors and primitives, never pickled code).
    """
    from safetensors.torch import load_file

    verify_checkpoint(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint: {exc}",
            path=path,
            hint="delete the folder to start afresh, or restore a backup",
        ) from exc
    try:
        model.load_state_dict(tensors, strict=True)
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint does not match this model/config: {exc}",
            path=path,
            hint="resume with the run's own config.json",
        ) from exc
    _set_rng_state(state["rng"])
    return state["progress"]


# ---------------------------------------------------------------------------------- the run
def _step_seed(seed: int, step: int, rank: int) -> int:
    return zlib.crc32(f"torch:{seed}:{step}:{rank}".encode())


def _amp_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "bf16" or (cfg.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast (the scans inside the backbone stay float32), or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _format_plan(plan: dict[str, Any]) -> str:
    width = max(len(k) for k in plan)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in plan.items())


def pretrain(
    config: PretrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    dry_run: bool = False,
    max_steps: int | None = None,
) -> Path:
    """Pre-train ``config.method`` on the scans under ``data_dir``; return ``out_dir``.

    ``out_dir/backbone/`` receives the teacher backbone at the end (``save_model``);
    ``max_steps`` stops early without changing the schedules (they follow ``config.epochs``).
    """
    from usfm_core.data import DatasetCatalog, make_pretrain_loader

    config.validate()
    out_dir = Path(out_dir)
    info, device = setup_distributed(config.device)
    torch.manual_seed(config.seed)
    catalog = DatasetCatalog.from_folder(data_dir)
    probe = make_pretrain_loader(
        catalog, config.views, config.batch_size, 0, config.seed, info.rank, info.world_size, 0, 0
    )
    full_epoch = math.ceil(len(probe.sampler) / config.batch_size)
    spe = min(full_epoch, config.steps_per_epoch) if config.steps_per_epoch else full_epoch
    total_steps = spe * config.epochs
    stop = total_steps if max_steps is None else min(total_steps, max_steps)
    model = get_method(config.method)(
        config, total_steps=total_steps, steps_per_epoch=spe, n_items=len(catalog), rank=info.rank
    )
    model.to(device)
    if dry_run:
        _print_plan(config, catalog, model, spe, total_steps, stop, info, device)
        return out_dir

    total_batch = config.batch_size * info.world_size
    o = config.optim
    lr = cosine_schedule(
        o.lr * total_batch / o.lr_reference_batch,
        o.min_lr,
        total_steps,
        warmup_steps=o.warmup_epochs * spe,
    )
    wd = cosine_schedule(o.weight_decay, o.weight_decay_end, total_steps)
    optimizer = adamw(model.param_groups(o.weight_decay), lr=float(lr[0]), betas=o.betas)
    step = 0
    ckpt_root = out_dir / "checkpoints"
    if resume:
        found = find_checkpoint(ckpt_root)
        if found is None:
            raise CheckpointError(
                "nothing to resume: no checkpoint found",
                path=ckpt_root,
                hint="run without --resume to start a new run",
            )
        _warn_config_changes(found / "config.json", config)
        step = int(load_checkpoint(found, model, optimizer)["step"])
        log.info("resumed from %s at step %d", found, step)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(
            model.student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
        model.set_student_runner(ddp)
    logger = RunLogger(
        out_dir, enabled=info.is_main, tensorboard=config.tensorboard, resume_step=step
    )
    amp_dtype = _amp_dtype(config, device)
    params = [p for p in model.student.parameters() if p.requires_grad]
    progress_bar = _progress(info, stop, step)
    model.train()
    try:
        while step < stop:
            epoch, in_epoch = divmod(step, spe)
            loader = make_pretrain_loader(
                catalog,
                config.views,
                config.batch_size,
                config.workers,
                config.seed,
                info.rank,
                info.world_size,
                epoch,
                in_epoch * config.batch_size,
            )
            tic = time.perf_counter()
            for batch in loader:
                if in_epoch >= spe or step >= stop:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = float(lr[step])
                    if group.get("apply_wd", False):
                        group["weight_decay"] = float(wd[step])
                # Drop-path randomness is a function of the step (exact resume).
                torch.manual_seed(_step_seed(config.seed, step, info.rank))
                with _autocast(device, amp_dtype):
                    loss, logs = model.training_step(batch, step)
                if not math.isfinite(logs["loss"]):
                    raise USFMError(
                        f"loss became {logs['loss']} at step {step}",
                        hint="lower optim.lr, raise warm-up, or use amp=off",
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if o.clip_grad > 0:
                    logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, o.clip_grad))
                model.before_optimizer_step(step)
                optimizer.step()
                model.after_step(step)
                step += 1
                in_epoch += 1
                toc = time.perf_counter()
                logs["img_per_s"] = total_batch / max(toc - tic, 1e-9)
                tic = toc
                if step % config.log_every == 0 or step == stop:
                    logger.log(
                        {
                            "step": step,
                            "epoch": epoch,
                            "lr": float(lr[step - 1]),
                            "weight_decay": float(wd[step - 1]),
                            **logs,
                        }
                    )
                if progress_bar is not None:
                    progress_bar.update(1)
                    progress_bar.set_postfix(_postfix(logs), refresh=False)
                if step % config.save_every == 0 and step < stop:
                    _save(info, ckpt_root, model, optimizer, step, config)
        _save(info, ckpt_root, model, optimizer, step, config)
        if info.is_main:
            _export(model, config, out_dir, step)
        _barrier(info)
    finally:
        logger.close()
        if progress_bar is not None:
            progress_bar.close()
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return out_dir


def _warn_config_changes(saved_path: Path, config: PretrainConfig) -> None:
    """Warn when resuming with settings that differ from the checkpoint's (exactness lost)."""
    if not saved_path.exists():
        return
    saved, now = json.loads(saved_path.read_text()), config.to_dict()
    ignored = {"device", "workers", "log_every", "save_every", "tensorboard"}
    changed = sorted(k for k in now if k not in ignored and saved.get(k) != now[k])
    if changed:
        log.warning(
            "resuming with changed settings %s: the run will not match an uninterrupted one",
            changed,
        )


def _save(
    info: DistInfo, ckpt_root: Path, model, optimizer, step: int, config: PretrainConfig
) -> None:
    _barrier(info)
    if info.is_main:
        save_checkpoint(ckpt_root, model, optimizer, {"step": step}, config)
    _barrier(info)


def _export(model, config: PretrainConfig, out_dir: Path, step: int) -> None:
    """Save the teacher backbone for fine-tuning / the napari plugin."""
    from usfm_core.models.serialization import save_model

    save_model(
        model.export_backbone(),
        out_dir / "backbone",
        extra={"method": config.method, "steps": step, "pretrain": config.to_dict()},
    )


def _progress(info: DistInfo, total: int, initial: int):
    if not info.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)


def _postfix(logs: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "cls", "patch", "rec_global", "rec_local", "img_per_s")
    out = {k: f"{logs[k]:.3g}" for k in keys if k in logs}
    # Distillation health (issue #12): teacher entropy / ln K and MI in nats, cls | patch.
    if "teacher_entropy_ratio_cls" in logs:
        out["H/lnK"] = (
            f"{logs['teacher_entropy_ratio_cls']:.2f}|{logs['teacher_entropy_ratio_patch']:.2f}"
        )
        out["MI"] = f"{logs['teacher_mi_cls']:.2f}|{logs['teacher_mi_patch']:.2f}"
    return out


def _print_plan(
    config: PretrainConfig,
    catalog,
    model,
    spe: int,
    total: int,
    stop: int,
    info: DistInfo,
    device: torch.device,
) -> None:
    """What a run would do: data, steps, parameters and a rough memory estimate."""
    n_student = sum(p.numel() for p in model.student.parameters())
    n_teacher = sum(p.numel() for p in model.teacher.parameters())
    # Weights (student + teacher) + grads + 2 AdamW moments, float32.
    state_bytes = 4 * (n_student * 4 + n_teacher)
    v = config.views
    total_batch = config.batch_size * info.world_size
    pixels = config.batch_size * (v.n_global * v.global_size**2 + v.n_local * v.local_size**2)
    plan = {
        "method": config.method,
        "data sets": ", ".join(f"{k} ({len(i)})" for k, i in catalog.datasets.items()),
        "items": len(catalog),
        "world size": info.world_size,
        "device": str(device),
        "batch (per process / total)": f"{config.batch_size} / {total_batch}",
        "steps per epoch": spe,
        "epochs": config.epochs,
        "total steps (schedules)": total,
        "steps this run": stop,
        "student / teacher params": f"{n_student / 1e6:.2f} M / {n_teacher / 1e6:.2f} M",
        "weights+optimiser memory": f"{state_bytes / 2**20:.0f} MiB",
        "pixels per step": f"{pixels / 1e6:.2f} M (activations scale with this)",
        "masking": f"{config.masking.generator}, ratio {config.masking.ratio}, "
        f"{config.masking.cell}-px cells ({v.global_size // config.masking.cell}² per global view)",
    }
    if info.is_main:
        print("pretraining plan (dry run, nothing written):\n" + _format_plan(plan))
