"""Saving and loading models as a folder: ``model.safetensors`` + ``config.json``.

``config.json`` holds ``{"model_type", "config", "usfm_version", "extra", "weights_sha256"}``
and is written last; weights are read with safetensors only (never pickle), so a checkpoint
from an untrusted source cannot run code. Loading order: ``config.json`` (size/depth bounded),
the config validated and its parameter count capped before anything is built
(:func:`validate_config`, bounds in :mod:`usfm_core.models.limits`), the weights' header
(names, shapes) checked against the model before any tensor is read, the sha256, then every
tensor checked for NaN/inf. Every failure a user can cause raises
:class:`~usfm_core.errors.CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.models.limits import (
    check_json_tree,
    check_param_budget,
    plain_message,
    read_json_file,
)
from usfm_core.utils import atomic_path, resolve_device

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "build_model",
    "estimate_params",
    "load_model",
    "model_types",
    "register_model",
    "save_model",
    "validate_config",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# config.json records the sha256 of model.safetensors (written last, checked on load).
WEIGHTS_SHA_KEY = "weights_sha256"

# model_type → (model class, config class with from_dict/to_dict)
_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {}


def register_model(name: str, cls: type[nn.Module], config_cls: type) -> None:
    """Make ``cls(config_cls.from_dict(d))`` loadable under ``model_type = name``.

    The model must keep its config in ``model.config`` (with ``to_dict()``).
    """
    existing = _REGISTRY.get(name)
    if existing is not None and existing != (cls, config_cls):
        raise ValueError(f"model type {name!r} is already registered to {existing[0].__name__}")
    _REGISTRY[name] = (cls, config_cls)


def model_types() -> list[str]:
    """Registered model type names."""
    return sorted(_REGISTRY)


def _type_of(model: nn.Module) -> str:
    for name, (cls, _) in _REGISTRY.items():
        if type(model) is cls:
            return name
    raise ValueError(
        f"{type(model).__name__} is not registered; call register_model(name, cls, config_cls)"
    )


def validate_config(model_type: str, config_dict: Any) -> Any:
    """Parse and bound a config dict *before* anything is allocated; returns the config object.

    The one gate every model built from a file goes through (:func:`build_model`): the JSON
    tree is bounded (:func:`~usfm_core.models.limits.check_json_tree`), the config class's
    ``from_dict`` checks each field's type and range, and the parameter count estimated from
    the config must stay under :func:`~usfm_core.models.limits.max_params`. Raises
    :class:`ConfigError` naming the field.
    """
    if model_type not in _REGISTRY:
        raise ConfigError(f"unknown model_type {model_type!r}", hint=f"use one of {model_types()}")
    _, config_cls = _REGISTRY[model_type]
    if not isinstance(config_dict, Mapping):
        raise ConfigError(f"config must be an object, got {type(config_dict).__name__}")
    check_json_tree(config_dict, "config")
    try:
        config = config_cls.from_dict(dict(config_dict))
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"invalid {model_type} config: {exc}") from None
    check_param_budget(estimate_params(model_type, config), f"this {model_type} config")
    return config


def estimate_params(model_type: str, config: Any) -> int:
    """Parameter count of a registered model type for ``config``, without allocating.

    Uses the config's own ``estimate_params()`` (all built-in types have one); otherwise the
    model is built on PyTorch's ``meta`` device (shapes only, no memory).
    """
    if hasattr(config, "estimate_params"):
        return int(config.estimate_params())
    cls, _ = _REGISTRY[model_type]
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def build_model(model_type: str, config_dict: dict) -> nn.Module:
    """A freshly initialised model of a registered type from its config dict (validated and
    bounded first by :func:`validate_config`)."""
    config = validate_config(model_type, config_dict)
    cls, _ = _REGISTRY[model_type]
    try:
        return cls(config)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cannot build a {model_type} from this config: {exc}") from None


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every tensor contiguous and owning its memory.

    safetensors refuses tensors that share storage (tied weights, views); cloning each entry
    stores shared weights twice, which is harmless on load.
    """
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, path_dir: str | Path, *, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``path_dir`` (created if needed).

    Both files are written atomically; the config goes last, so a folder with a config always
    has complete weights. ``extra`` (JSON-serialisable) is stored as is (epoch, metrics, …).
    Returns the folder.
    """
    from safetensors.torch import save_file

    import usfm_core

    path_dir = Path(path_dir)
    model_type = _type_of(model)
    meta = {
        "model_type": model_type,
        "config": model.config.to_dict(),
        "usfm_version": usfm_core.__version__,
        "extra": extra or {},
    }
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extra must be JSON-serialisable (finite numbers): {exc}") from exc
    path_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(_plain_state_dict(model), str(tmp), metadata={"model_type": model_type})
        meta[WEIGHTS_SHA_KEY] = _sha256(tmp)
    with atomic_path(path_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path_dir


def _sha256(path: Path) -> str:
    from usfm_core.models.zoo import file_sha256

    return file_sha256(path)


def store_weights_as(path_dir: str | Path, dtype: str = "float16") -> Path:
    """Rewrite a saved model's floating-point weights in ``dtype`` (``float16``/``bfloat16``/
    ``float32``) to halve the file of a shipped model; loading casts them back to the
    model's own dtype (float32 on CPU). ``config.json`` records it as ``storage_dtype``.

    Integer buffers are kept as they are. Both files are replaced atomically.
    """
    from safetensors.torch import save_file

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise ConfigError(f"storage dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    path_dir = Path(path_dir)
    meta = _read_meta(path_dir)
    state = _read_weights(path_dir / WEIGHTS_FILE)
    state = {
        k: v.to(dtypes[dtype]).contiguous() if v.is_floating_point() else v
        for k, v in state.items()
    }
    _check_finite(state, path_dir / WEIGHTS_FILE, f"after conversion to {dtype}")
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"model_type": meta["model_type"]})
        meta[WEIGHTS_SHA_KEY] = _sha256(tmp)
    meta["storage_dtype"] = dtype
    with atomic_path(path_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path_dir


def _read_meta(path_dir: Path) -> dict[str, Any]:
    """``config.json`` parsed with bounds (size, depth; see :func:`limits.read_json_file`)."""
    cfg_path = path_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            "missing config.json",
            path=cfg_path,
            hint="point to a folder written by save_model (it holds config.json and "
            "model.safetensors)",
        )
    meta = read_json_file(cfg_path)
    if not isinstance(meta, dict) or "model_type" not in meta or "config" not in meta:
        raise CheckpointError(
            "config.json lacks 'model_type' / 'config'",
            path=cfg_path,
            hint="this is not a usfm-core checkpoint; write it with save_model",
        )
    if not isinstance(meta["model_type"], str):
        raise CheckpointError(
            f"model_type must be a string, got {type(meta['model_type']).__name__}",
            path=cfg_path,
            hint="this is not a usfm-core checkpoint; write it with save_model",
        )
    return meta


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"cannot read the weights ({exc})",
        path=path,
        hint="the file is corrupt or truncated; copy the checkpoint folder again",
    )


def _weights_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from the safetensors header, without reading any tensor data."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(
            "missing model.safetensors",
            path=path,
            hint="the checkpoint folder is incomplete; copy it again or re-save the model",
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _weights_header(path)  # missing / unreadable file: a clear error before any allocation
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from exc


def _verify_checksum(meta: dict[str, Any], path: Path) -> None:
    """Compare the weights with the sha256 recorded by :func:`save_model` (if any)."""
    expected = meta.get(WEIGHTS_SHA_KEY)
    if expected is None:
        return  # written before checksums, or a shipped model (checked against index.json)
    actual = _sha256(path)
    if actual != expected:
        raise CheckpointError(
            f"checksum mismatch: sha256 {actual[:12]}… ≠ {expected[:12]}… recorded in "
            f"{CONFIG_FILE}",
            path=path,
            hint="the weights were damaged or replaced after saving; copy the model folder "
            "again or re-save the model",
        )


def _check_finite(state: dict[str, torch.Tensor], path: Path, when: str = "") -> None:
    """Raise :class:`CheckpointError` naming the first tensor holding NaN or ±inf."""
    for name, tensor in state.items():
        # A float64 sum of float32/16 values cannot overflow: it is finite iff all are.
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(
                f"tensor {name!r} holds {bad} NaN/inf value(s) of {tensor.numel()}"
                + (f" {when}" if when else ""),
                path=path,
                hint="the model diverged or the file is damaged; use an earlier checkpoint "
                "or retrain",
            )


def _check_keys(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Raise a :class:`CheckpointError` listing a few missing / unexpected / mis-shaped keys.

    ``shapes`` is the file's tensor name → shape (from its header, before loading)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [
        f"{k}: file {tuple(shapes[k])} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in shapes and tuple(shapes[k]) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(
            "weights do not match config.json: " + "; ".join(problems),
            path=path,
            hint="config.json and model.safetensors come from different models; "
            "save them together with save_model",
        )


def load_model(
    path_dir: str | Path, expected_type: str | None = None, device: str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a folder written by :func:`save_model`; returns ``(model in eval mode, meta)``.

    ``path_dir`` may also be the ``model.safetensors`` or ``config.json`` file inside it, or
    the name of a shipped / user model (``load_model("breast-lesion")``, sha256-checked).
    ``expected_type`` (e.g. ``"vmamba"``) guards against loading the wrong kind of model.
    ``device`` is ``"cpu"``, ``"cuda"``, ``"auto"``, … (see :func:`usfm_core.utils.resolve_device`).
    """
    from usfm_core.models.zoo import resolve_model_dir

    path_dir = resolve_model_dir(path_dir)  # a path, or a shipped / user model's name
    if path_dir.is_file() and path_dir.name in (WEIGHTS_FILE, CONFIG_FILE):
        path_dir = path_dir.parent
    if not path_dir.is_dir():
        raise CheckpointError(
            "checkpoint folder not found",
            path=path_dir,
            hint="check the path; a checkpoint is a folder with config.json + model.safetensors",
        )
    meta = _read_meta(path_dir)
    model_type = meta["model_type"]
    cfg_path = path_dir / CONFIG_FILE
    if model_type not in _REGISTRY:
        raise CheckpointError(
            f"unknown model_type {model_type!r}",
            path=cfg_path,
            hint=f"known types: {model_types()}; update usfm-core or check the folder",
        )
    if expected_type is not None and model_type != expected_type:
        raise CheckpointError(
            f"holds a {model_type!r} model, expected {expected_type!r}",
            path=cfg_path,
            hint=f"choose a {expected_type} checkpoint",
        )
    weights_path = path_dir / WEIGHTS_FILE
    shapes = _weights_header(weights_path)  # missing / unreadable: fail before building
    try:
        model = build_model(model_type, meta["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"invalid model config: {plain_message(exc)}",
            path=cfg_path,
            hint=exc.hint or "re-save the model with save_model",
        ) from None
    _check_keys(model, shapes, weights_path)  # before reading any tensor data
    _verify_checksum(meta, weights_path)
    state = _read_weights(weights_path)
    _check_finite(state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device)).eval(), meta


def _register_builtin() -> None:
    from usfm_core.models.vit import ViT, ViTConfig
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    register_model("vmamba", VMamba, VMambaConfig)
    register_model("vit", ViT, ViTConfig)


_register_builtin()
