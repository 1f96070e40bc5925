"""Saving and loading models as a folder: ``model.safetensors`` + ``config.json``.

``config.json`` holds ``{"model_type", "config", "usfm_version", "extra"}``; weights are read
with safetensors only (never pickle), so a checkpoint from an untrusted source cannot run code.
Every failure a user can cause raises :class:`~usfm_core.errors.CheckpointError` naming the file
and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from usfm_core.errors import CheckpointError, ConfigError
from usfm_core.utils import atomic_path, resolve_device

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "build_model",
    "load_model",
    "model_types",
    "register_model",
    "save_model",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

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


def build_model(model_type: str, config_dict: dict) -> nn.Module:
    """A freshly initialised model of a registered type from its config dict."""
    if model_type not in _REGISTRY:
        raise ConfigError(f"unknown model_type {model_type!r}", hint=f"use one of {model_types()}")
    cls, config_cls = _REGISTRY[model_type]
    try:
        config = config_cls.from_dict(dict(config_dict))
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid {model_type} config: {exc}") from exc
    return cls(config)


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
        text = json.dumps(meta, indent=2)
    except TypeError as exc:
        raise ConfigError(f"extra must be JSON-serialisable: {exc}") from exc
    path_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(_plain_state_dict(model), str(tmp), metadata={"model_type": model_type})
    with atomic_path(path_dir / CONFIG_FILE) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return path_dir


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
    with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"model_type": meta["model_type"]})
    meta["storage_dtype"] = dtype
    with atomic_path(path_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path_dir


def _read_meta(path_dir: Path) -> dict[str, Any]:
    cfg_path = path_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(
            "missing config.json",
            path=cfg_path,
            hint="point to a folder written by save_model (it holds config.json and "
            "model.safetensors)",
        )
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"config.json is not valid JSON ({exc})",
            path=cfg_path,
            hint="the file is damaged; copy the checkpoint folder again",
        ) from exc
    if not isinstance(meta, dict) or "model_type" not in meta or "config" not in meta:
        raise CheckpointError(
            "config.json lacks 'model_type' / 'config'",
            path=cfg_path,
            hint="this is not a usfm-core checkpoint; write it with save_model",
        )
    return meta


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(
            "missing model.safetensors",
            path=path,
            hint="the checkpoint folder is incomplete; copy it again or re-save the model",
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot read the weights ({exc})",
            path=path,
            hint="the file is corrupt or truncated; copy the checkpoint folder again",
        ) from exc


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise a :class:`CheckpointError` listing a few missing / unexpected / mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
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
    try:
        model = build_model(model_type, meta["config"])
    except ConfigError as exc:
        raise CheckpointError(
            f"invalid model config: {exc}", path=cfg_path, hint="re-save the model"
        ) from exc
    weights_path = path_dir / WEIGHTS_FILE
    state = _read_weights(weights_path)
    _check_keys(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device)).eval(), meta


def _register_builtin() -> None:
    from usfm_core.models.vit import ViT, ViTConfig
    from usfm_core.models.vmamba import VMamba, VMambaConfig

    register_model("vmamba", VMamba, VMambaConfig)
    register_model("vit", ViT, ViTConfig)


_register_builtin()
