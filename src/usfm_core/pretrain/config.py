"""Pre-training configuration: nested dataclasses, presets, files and ``key=value`` overrides.

Paper (OpenUS, Tab. 7 and §3) values are the defaults. Where the authors' public code does
something else, the code's choice is a switch documented on the field (see docs/pretraining.md).
``batch_size`` is *per process*; the learning rate is scaled by the total batch over 256.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usfm_core.data.views import MultiCropConfig
from usfm_core.errors import ConfigError


@dataclass
class BackboneSection:
    """Which VMamba to build: a ``VMambaConfig`` preset plus field overrides."""

    preset: str = "vmamba-s"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class HeadsSection:
    """iBOT projection heads (MLP → bottleneck → L2-norm → weight-normed last layer)."""

    out_dim: int = 8192
    patch_out_dim: int = 8192
    hidden: int = 2048
    bottleneck: int = 256
    norm_last_layer: bool = True
    # False (default, as in the authors' code): the patch tokens get their own last layer.
    shared_head: bool = False
    # Per-batch standardisation after the MLP's first two linear layers (DINO's BN-in-head,
    # statistics of the current batch in student and teacher alike; see docs/pretraining.md).
    batch_norm: bool = False


@dataclass
class LossSection:
    """Temperatures, centring and the weights of the four loss terms."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    # 0.1 as in DINO, iBOT and the OpenUS authors' code. The paper's Tab. 7 lists 0.07, which
    # equals the final teacher temperature: no sharpening, and distillation never leaves ln K.
    student_temp: float = 0.1
    # Validation refuses a final teacher_temp above 0.7·student_temp (DINO's ratio 0.07/0.1)
    # unless this is true.
    force_temperatures: bool = False
    # Teacher centring: "ema" (DINO/iBOT: subtract an EMA of the batch-mean logits) or
    # "sinkhorn" (DINOv2: Sinkhorn–Knopp normalisation of the teacher's batch).
    centering: str = "ema"
    sinkhorn_iters: int = 3
    center_momentum: float = 0.9
    weight_cls: float = 1.0
    weight_patch: float = 1.0
    weight_rec_global: float = 1.0
    weight_rec_local: float = 1.0


@dataclass
class MaskingSection:
    """Mask generation for global views (and random block masks for local views)."""

    # "self_adaptive" (OpenUS) | "attention" | "block" | "random".
    generator: str = "self_adaptive"
    # Paper: 0.8 (Tab. 7/8). The authors' code: 0.6.
    ratio: float = 0.8
    alpha_start: float = 0.1
    alpha_end: float = 0.9
    r_start: float = 0.1
    r_end: float = 0.9
    # "paper": ALP = (1-α)·teacher + α·student (Eq. 7); "code": α·teacher + (1-α)·student.
    score_weighting: str = "paper"
    # "per_image": EMA of the student's loss map per catalog image (paper §3.3.2);
    # "positional": one batch-averaged map applied to the next batch (authors' code).
    loss_ema: str = "per_image"
    loss_ema_momentum: float = 0.7
    local_ratio: float = 0.3
    min_block_patches: int = 4
    block_aspect: float = 0.3
    # Side of a mask cell in input pixels (a divisor of the backbone's 32-px token stride and a
    # multiple of its 4-px patch embedding). Paper: 32 at 224² (7×7 cells); at CPU view sizes
    # 16 keeps the grid fine (8×8 cells on a 128² view).
    cell: int = 32


@dataclass
class OptimSection:
    """AdamW with cosine learning rate / weight decay schedules."""

    lr: float = 5e-4
    # The learning rate used is lr × total batch / lr_reference_batch (DINO/iBOT: 256).
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: int = 30
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1


@dataclass
class MAESection:
    """USF-MAE baseline (``method="mae"``, see ``pretrain/mae.py``)."""

    # USF-MAE §2.4: 25 % of the patches masked; He et al.'s MAE uses 0.75.
    ratio: float = 0.25
    # USF-MAE §2.3: 8 decoder layers of width 512 with 8 heads.
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 8
    # True: targets normalised per patch (MAE's option); the paper uses raw pixels.
    norm_pix_loss: bool = False


@dataclass
class JEPASection:
    """US-JEPA / SALT baseline (``method="jepa"``, see ``pretrain/jepa.py``; Tab. 5 defaults)."""

    # Folder of a saved backbone (save_model) used as the frozen teacher; "" = a randomly
    # initialised frozen teacher of the student's architecture.
    teacher_ckpt: str = ""
    pred_dim: int = 384
    pred_depth: int = 12
    pred_heads: int = 12
    n_targets: int = 4
    target_scale: tuple[float, float] = (0.075, 0.125)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    # I-JEPA samples square context blocks; Tab. 5 lists one aspect range (used for targets).
    context_aspect: tuple[float, float] = (1.0, 1.0)
    # τ: minimum valid patches per block ("Min. Patches Kept").
    min_keep: int = 10
    # USrc: restrict blocks and loss to patches touching the scan region.
    use_region: bool = True
    # Layer-normalise the teacher's patch features before the loss (as I-JEPA does).
    target_norm: bool = True
    smooth_l1_beta: float = 1.0


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs (see module docstring)."""

    method: str = "openus"
    backbone: BackboneSection = field(default_factory=BackboneSection)
    # Multi-crop views and augmentations (the data module's config; ``in_chans`` also sets
    # the backbone's input channels and the reconstruction target's).
    views: MultiCropConfig = field(default_factory=MultiCropConfig)
    heads: HeadsSection = field(default_factory=HeadsSection)
    loss: LossSection = field(default_factory=LossSection)
    masking: MaskingSection = field(default_factory=MaskingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    mae: MAESection = field(default_factory=MAESection)
    jepa: JEPASection = field(default_factory=JEPASection)
    ema_momentum: float = 0.996
    ema_momentum_end: float = 1.0
    epochs: int = 150
    # 0: one full pass over the (balanced) sampler per epoch; N > 0: cap each epoch at N steps.
    steps_per_epoch: int = 0
    batch_size: int = 32
    workers: int = 8
    seed: int = 0
    save_every: int = 1000
    log_every: int = 20
    # "auto": bf16 autocast on CUDA, off on CPU | "bf16" | "off".
    amp: str = "auto"
    device: str = "auto"
    tensorboard: bool = False

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), suitable for JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> PretrainConfig:
        """Build from a (possibly partial) nested dict; unknown keys raise :class:`ConfigError`."""
        cfg = cls()
        _merge_into(cfg, data, prefix="", source=source)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> PretrainConfig:
        """A deep copy with top-level fields replaced."""
        new = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(new, key, value)
        return new

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid key."""
        from usfm_core.pretrain.methods import available_methods

        _check(
            self.method in available_methods(),
            "method",
            self.method,
            f"one of {available_methods()}",
        )
        m = self.masking
        _check(
            m.generator in MASK_GENERATORS,
            "masking.generator",
            m.generator,
            f"one of {MASK_GENERATORS}",
        )
        _check(
            m.score_weighting in ("paper", "code"),
            "masking.score_weighting",
            m.score_weighting,
            "'paper' or 'code'",
        )
        _check(
            m.loss_ema in ("per_image", "positional"),
            "masking.loss_ema",
            m.loss_ema,
            "'per_image' or 'positional'",
        )
        for key in (
            "ratio",
            "alpha_start",
            "alpha_end",
            "r_start",
            "r_end",
            "local_ratio",
            "loss_ema_momentum",
        ):
            value = getattr(m, key)
            _check(0.0 <= value <= 1.0, f"masking.{key}", value, "a number in [0, 1]")
        _check(0 < m.block_aspect <= 1, "masking.block_aspect", m.block_aspect, "in (0, 1]")
        _check(m.min_block_patches >= 1, "masking.min_block_patches", m.min_block_patches, ">= 1")
        try:  # MultiCropConfig validates itself in __post_init__
            self.views = dataclasses.replace(self.views)
        except ConfigError as exc:
            raise ConfigError(f"invalid 'views' section: {exc}") from exc
        h = self.heads
        for key in ("out_dim", "patch_out_dim", "hidden", "bottleneck"):
            _check(getattr(h, key) >= 1, f"heads.{key}", getattr(h, key), ">= 1")
        lo = self.loss
        for key in ("warmup_teacher_temp", "teacher_temp", "student_temp"):
            _check(getattr(lo, key) > 0, f"loss.{key}", getattr(lo, key), "> 0")
        _check(
            lo.centering in ("ema", "sinkhorn"),
            "loss.centering",
            lo.centering,
            "'ema' or 'sinkhorn'",
        )
        _check(lo.sinkhorn_iters >= 1, "loss.sinkhorn_iters", lo.sinkhorn_iters, ">= 1")
        if self.method in ("openus", "ibot") and not lo.force_temperatures:
            _check_temperatures(lo.teacher_temp, lo.student_temp)
        _check(
            m.cell >= 4 and m.cell % 4 == 0 and 32 % m.cell == 0,
            "masking.cell",
            m.cell,
            "4, 8, 16 or 32 (a divisor of the 32-px token stride, multiple of the 4-px stem)",
        )
        _check(0 <= lo.center_momentum < 1, "loss.center_momentum", lo.center_momentum, "[0, 1)")
        o = self.optim
        _check(o.lr > 0, "optim.lr", o.lr, "> 0")
        _check(o.lr_reference_batch >= 1, "optim.lr_reference_batch", o.lr_reference_batch, ">= 1")
        _check(o.min_lr >= 0, "optim.min_lr", o.min_lr, ">= 0")
        _check(o.clip_grad >= 0, "optim.clip_grad", o.clip_grad, ">= 0 (0 disables)")
        _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, ">= 0")
        _check(0 <= self.ema_momentum <= 1, "ema_momentum", self.ema_momentum, "[0, 1]")
        _check(self.epochs >= 1, "epochs", self.epochs, ">= 1")
        _check(self.steps_per_epoch >= 0, "steps_per_epoch", self.steps_per_epoch, ">= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.workers >= 0, "workers", self.workers, ">= 0")
        _check(self.save_every >= 1, "save_every", self.save_every, ">= 1")
        _check(self.log_every >= 1, "log_every", self.log_every, ">= 1")
        _check(self.amp in ("auto", "bf16", "off"), "amp", self.amp, "'auto', 'bf16' or 'off'")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "device",
            self.device,
            "'auto', 'cpu' or 'cuda[:N]'",
        )


MASK_GENERATORS = ("self_adaptive", "attention", "block", "random")
#: Largest final teacher / student temperature ratio accepted without ``force_temperatures``.
MAX_TEMPERATURE_RATIO = 0.7


def _check_temperatures(teacher_temp: float, student_temp: float) -> None:
    """Refuse a final teacher temperature above 0.7 × the student's (no sharpening)."""
    limit = MAX_TEMPERATURE_RATIO * student_temp
    if teacher_temp > limit + 1e-9:
        raise ConfigError(
            f"loss.teacher_temp={teacher_temp:g} is above 0.7 × loss.student_temp="
            f"{student_temp:g}: the teacher would not sharpen the student's targets and "
            "self-distillation stays at ln K (issue #12)",
            hint=f"lower loss.teacher_temp to <= {limit:.3g}, raise loss.student_temp (0.1 as in "
            "DINO/iBOT), or set loss.force_temperatures=true to run it anyway",
        )


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value {value!r} for {key!r}", hint=f"{key} must be {expected}")


def _merge_into(obj: Any, data: dict[str, Any], *, prefix: str, source: str) -> None:
    """Recursively copy ``data`` into dataclass ``obj``, converting lists to tuples where needed."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix or 'config'} must be a mapping, got {type(data).__name__}", path=source
        )
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown config key {full!r}",
                path=source,
                hint=f"valid keys here: {sorted(fields)}",
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, prefix=f"{full}.", source=source)
        elif isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{full!r} must be a mapping", path=source)
            setattr(obj, key, dict(value))
        else:
            setattr(obj, key, _coerce(full, current, value, source))


def _coerce(key: str, current: Any, value: Any, source: str) -> Any:
    """Convert ``value`` to the type of the default ``current``; a mismatch is a ConfigError."""
    try:
        if isinstance(current, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(current, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            kind = type(current[0]) if current else float
            return tuple(kind(x) for x in items)
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"invalid value {value!r} for {key!r} (expected {type(current).__name__})",
            path=source,
        ) from exc
    return value


# ---------------------------------------------------------------------------------- presets
def _preset_tiny() -> dict[str, Any]:
    """CPU unit/integration tests: a few seconds per step at most."""
    return {
        "backbone": {"preset": "tiny"},
        "views": {"n_global": 2, "n_local": 2, "global_size": 64, "local_size": 32},
        "heads": {
            "out_dim": 256,
            "patch_out_dim": 256,
            "hidden": 64,
            "bottleneck": 32,
            "batch_norm": True,
        },
        # The CPU recipe (issue 12): head standardisation + a teacher at 0.04 throughout.
        "loss": {"warmup_teacher_temp_epochs": 1, "teacher_temp": 0.04},
        "optim": {"warmup_epochs": 0, "freeze_last_layer_epochs": 0},
        # Baselines (method=mae / jepa): small decoder / predictor, τ fitting a 64² view.
        # 32-px mask cells: a 2×2 grid on the 64² views (tests; the demo sets 16).
        "mae": {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2},
        "jepa": {"pred_dim": 32, "pred_depth": 1, "pred_heads": 2, "min_keep": 1},
        "epochs": 2,
        "batch_size": 4,
        "workers": 0,
        "save_every": 50,
        "log_every": 1,
    }


def _preset_small_cpu() -> dict[str, Any]:
    """A workstation CPU / small GPU in hours: VMamba ``small-cpu`` (3.6 M), 128² + 64² views."""
    return {
        "backbone": {"preset": "small-cpu"},
        "views": {"n_global": 2, "n_local": 4, "global_size": 128, "local_size": 64},
        "heads": {
            "out_dim": 4096,
            "patch_out_dim": 4096,
            "hidden": 1024,
            "bottleneck": 256,
            # Live distillation at batch 8-32 (docs/pretraining.md, "Distillation health").
            "batch_norm": True,
        },
        # τ_t 0.04 throughout (DINO code's default): with 0.07 the teacher entropy stays ≈ 0.9 ln K.
        "loss": {"warmup_teacher_temp_epochs": 10, "teacher_temp": 0.04},
        "masking": {"cell": 16},
        "optim": {"warmup_epochs": 5},
        "epochs": 50,
        "batch_size": 16,
        "workers": 2,
        "save_every": 500,
        "log_every": 10,
    }


def _preset_small_fast() -> dict[str, Any]:
    """The shipped models' backbone (VMamba ``small-fast``, ≈ 2.5 M) on 2 CPU cores in hours.

    Smaller iBOT heads than ``small-cpu`` (their last layers would otherwise outweigh the
    backbone); 20 short epochs of 100 steps so the schedules fit a ~1 h run.
    """
    return {
        "backbone": {"preset": "small-fast"},
        "views": {"n_global": 2, "n_local": 4, "global_size": 128, "local_size": 64},
        "heads": {
            "out_dim": 2048,
            "patch_out_dim": 2048,
            "hidden": 512,
            "bottleneck": 128,
            # Live distillation at batch 8-32 (docs/pretraining.md, "Distillation health").
            "batch_norm": True,
        },
        # τ_t 0.04 throughout (DINO code's default): with 0.07 the teacher entropy stays ≈ 0.9 ln K.
        "loss": {"warmup_teacher_temp_epochs": 2, "teacher_temp": 0.04},
        "masking": {"cell": 16},
        # lr is scaled by batch / 256: 3e-3 gives 1.9e-4 at batch 16. The paper's 5e-4 would
        # give 3e-5, too little for a 2000-step run to move the weights much.
        "optim": {"warmup_epochs": 1, "lr": 3e-3},
        "epochs": 20,
        "steps_per_epoch": 100,
        "batch_size": 16,
        "workers": 1,
        "save_every": 100,
        "log_every": 10,
    }


def _preset_openus_s() -> dict[str, Any]:
    """Paper setting (Tab. 7): VMamba-S, 2×224² + 8×96², total batch 128 (4 GPUs × 32)."""
    return {"backbone": {"preset": "vmamba-s"}, "batch_size": 32}


def method_defaults(method: str, epochs: int) -> dict[str, Any]:
    """The baselines' own views and optimiser (layered over a preset, under the user's keys).

    ``mae`` (USF-MAE §2.2/2.4): one view per image, random-resized crop, H/V flips (p 0.5),
    rotations 0–90°, no blur or intensity jitter; AdamW lr 1e-3 at batch 64 (scaled linearly),
    weight decay 0.01, warm-up over the first 10 % of the run, cosine decay, grad clip 1.0.
    ``jepa`` (US-JEPA App. C.1, Tab. 5): one view, crop scale 0.6–1, H/V flips, blur, speckle,
    contrast; AdamW base lr 5e-5 at batch 128 decaying to 5e-7, weight decay 0.04 → 0.4,
    warm-up 10 % of the run. OpenUS / iBOT: nothing (their values are the dataclass defaults
    and the presets).
    """
    warmup = max(1, round(0.1 * epochs))
    no_photometric = {"jitter_p": 0.0, "gamma_p": 0.0, "speckle_p": 0.0}
    if method == "mae":
        return {
            "views": {
                "n_global": 1,
                "n_local": 0,
                # USF-MAE: "scaling between 0.5x and 2.0x of the original resolution"; a crop
                # cannot zoom out, so the area scale 0.25–1 covers zoom 1x–2x (deviation).
                "global_scale": [0.25, 1.0],
                "hflip_p": 0.5,
                "vflip_p": 0.5,
                "rotate_p": 1.0,
                "rotate_degrees": [0.0, 90.0],
                "global_blur_p": [0.0],
                "local_blur_p": 0.0,
                **no_photometric,
            },
            "optim": {
                "lr": 1e-3,
                "lr_reference_batch": 64,
                "min_lr": 0.0,
                "weight_decay": 0.01,
                "weight_decay_end": 0.01,
                "warmup_epochs": warmup,
                "clip_grad": 1.0,
                "freeze_last_layer_epochs": 0,
            },
        }
    if method == "jepa":
        return {
            "views": {
                "n_global": 1,
                "n_local": 0,
                "global_scale": [0.6, 1.0],
                "hflip_p": 0.5,
                "vflip_p": 0.5,
                "rotate_p": 0.0,
                "global_blur_p": [0.5],
                "local_blur_p": 0.0,
                "brightness": 0.0,
                "contrast": 0.4,
                "jitter_p": 0.8,
                "gamma_p": 0.0,
                "speckle_p": 0.5,
            },
            "optim": {
                "lr": 5e-5,
                "lr_reference_batch": 128,
                "min_lr": 5e-7,
                "weight_decay": 0.04,
                "weight_decay_end": 0.4,
                "warmup_epochs": warmup,
                "freeze_last_layer_epochs": 0,
            },
        }
    return {}


PRESETS: dict[str, Any] = {
    "tiny": _preset_tiny,
    "small-cpu": _preset_small_cpu,
    "small-fast": _preset_small_fast,
    "openus-s": _preset_openus_s,
}


def preset(name: str) -> PretrainConfig:
    """The named preset (``tiny`` | ``small-cpu`` | ``small-fast`` | ``openus-s``)."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown pretraining preset {name!r}",
            hint=f"use one of {sorted(PRESETS)} or a .json/.yaml file",
        )
    return PretrainConfig.from_dict(PRESETS[name](), source=f"preset {name}")


def load_config(spec: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """A preset name or a JSON/YAML file (optionally ``{"preset": NAME, ...}``), then overrides.

    A file may start from a preset with a top-level ``preset`` key; its other keys override it.
    """
    spec_str = str(spec)
    base: dict[str, Any] = {}
    if spec_str in PRESETS:
        base = PRESETS[spec_str]()
        data: dict[str, Any] = {}
        source = f"preset {spec_str}"
    else:
        path = Path(spec_str)
        if not path.is_file():
            raise ConfigError(
                "config file not found",
                path=path,
                hint=f"give an existing .json/.yaml file or a preset {sorted(PRESETS)}",
            )
        data = _read_mapping(path)
        source = str(path)
        name = data.pop("preset", None)
        if name is not None:
            if name not in PRESETS:
                raise ConfigError(
                    f"unknown preset {name!r}", path=path, hint=f"use one of {sorted(PRESETS)}"
                )
            base = PRESETS[name]()
    parsed = [_parse_override(item) for item in overrides or []]
    # Layers, later wins: preset → the method's own views/optimiser → file → --set.
    method = next((v for k, v in reversed(parsed) if k == "method"), None)
    method = method or data.get("method") or base.get("method") or PretrainConfig.method
    epochs = next((v for k, v in reversed(parsed) if k == "epochs"), None)
    epochs = epochs or data.get("epochs") or base.get("epochs") or PretrainConfig.epochs
    try:
        layered = _deep_update(base, method_defaults(str(method), int(epochs)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value {epochs!r} for 'epochs'", path=source) from exc
    data = _deep_update(layered, data)
    for key, value in parsed:
        _set_nested(data, key, value)
    return PretrainConfig.from_dict(data, source=source)


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ImportError as exc:
        raise ConfigError(
            "YAML configs need PyYAML",
            path=path,
            hint="pip install pyyaml, or write the config as JSON",
        ) from exc
    except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError
        raise ConfigError(f"cannot parse config: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping at top level", path=path)
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` → ``("a.b", parsed)``; JSON values (numbers, lists, true) are parsed."""
    if "=" not in item:
        raise ConfigError(f"bad override {item!r}", hint="write --set key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out
