"""Bounds on model configs, checked before anything is allocated (one place for all of them).

A ``config.json`` comes from disk and may be hostile or damaged: widths of 10⁶, depths of 10⁵,
nested lists thousands deep, strings where numbers belong. Everything here is plain Python (no
torch), runs before a model is built, and raises :class:`~usfm_core.errors.ConfigError` naming
the offending field (``config.dims``); :func:`usfm_core.models.serialization.load_model` adds
the file's path.

* :func:`read_json_file` — size-capped, recursion-safe ``json.loads`` of a config file.
* :func:`check_json_tree` — depth / size / finiteness of any parsed JSON value.
* :func:`check_fields` — per-field types and ranges from a table (:data:`VMAMBA_FIELDS`,
  :data:`VIT_FIELDS`, :data:`TASK_FIELDS`).
* :func:`check_param_budget` — refuses configs whose parameter count (estimated from the
  config, without building the model) exceeds :func:`max_params` (``$USFM_MAX_MODEL_PARAMS``,
  default 2·10⁹ ≈ 8 GB of float32 weights).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usfm_core.errors import CheckpointError, ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_NODES",
    "TASK_FIELDS",
    "VIT_FIELDS",
    "VMAMBA_FIELDS",
    "check_fields",
    "check_json_tree",
    "check_param_budget",
    "max_params",
    "plain_message",
    "read_json_file",
]

MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is ~1 KB; 1 MiB leaves room for "extra"
MAX_JSON_DEPTH = 16  # containers inside containers
MAX_JSON_NODES = 20_000  # values in the whole tree
MAX_STRING = 4096  # characters in one string
DEFAULT_MAX_PARAMS = 2_000_000_000
ENV_MAX_PARAMS = "USFM_MAX_MODEL_PARAMS"


# ------------------------------------------------------------------------------ JSON files
def read_json_file(path: str | Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse a JSON file of at most ``max_bytes`` bytes, bounded in depth and size.

    Raises :class:`CheckpointError` naming ``path`` for a missing, oversized, non-UTF-8,
    invalid, too deeply nested or too large document (never ``RecursionError``).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read {path.name} ({exc.strerror})", path=path) from None
    if size > max_bytes:
        raise CheckpointError(
            f"{path.name} is {size} bytes, more than the {max_bytes} a config may have",
            path=path,
            hint="this is not a config written by usfm-core; check the file",
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise CheckpointError(
            f"{path.name} is nested too deeply to be a config",
            path=path,
            hint="the file is damaged or hostile; copy the model folder again",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, 5000-digit numbers
        raise CheckpointError(
            f"{path.name} is not valid JSON ({exc})",
            path=path,
            hint="the file is damaged; copy the checkpoint folder again",
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path.name} ({exc.strerror})", path=path) from None
    try:
        check_json_tree(data, path.name)
    except ConfigError as exc:
        raise CheckpointError(
            plain_message(exc), path=path, hint="the file is damaged or hostile; check it"
        ) from None
    return data


def check_json_tree(
    obj: Any,
    where: str = "config",
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_nodes: int = MAX_JSON_NODES,
) -> None:
    """Refuse JSON values nested deeper than ``max_depth``, with more than ``max_nodes``
    values, strings longer than :data:`MAX_STRING`, non-finite numbers or non-JSON types.

    Iterative (an explicit stack), so no depth of input can raise ``RecursionError``.
    """
    stack: list[tuple[Any, str, int]] = [(obj, where, 0)]
    nodes = 0
    while stack:
        value, name, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ConfigError(f"{where} holds more than {max_nodes} values")
        if isinstance(value, Mapping):
            items = [(f"{name}.{k}", v) for k, v in value.items()]
            if not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{name}: keys must be strings")
        elif isinstance(value, (list, tuple)):
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            _check_leaf(value, name)
            continue
        if depth >= max_depth:
            raise ConfigError(f"{name} is nested more than {max_depth} levels deep")
        if len(items) > max_nodes:
            raise ConfigError(f"{where} holds more than {max_nodes} values")
        stack.extend((v, n, depth + 1) for n, v in items)


def _check_leaf(value: Any, name: str) -> None:
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{name} is {value}; numbers must be finite")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ConfigError(f"{name} is a string of {len(value)} characters (max {MAX_STRING})")
        return
    raise ConfigError(f"{name} has type {type(value).__name__}, not a JSON value")


# ------------------------------------------------------------------------------ field tables
class _WrongType(ConfigError):
    """The value has the wrong type (as opposed to the right type out of range)."""


@dataclass(frozen=True)
class Int:
    """An integer (not a bool, not a float) in ``[lo, hi]``."""

    lo: int
    hi: int

    def check(self, value: Any, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _WrongType(f"{name} must be an integer, got {_show(value)}")
        if not self.lo <= value <= self.hi:
            raise ConfigError(f"{name} must be in [{self.lo}, {self.hi}], got {_show(value)}")


@dataclass(frozen=True)
class Float:
    """A finite number in ``[lo, hi]`` (``lo_open``: ``(lo, hi]``)."""

    lo: float
    hi: float
    lo_open: bool = False

    def check(self, value: Any, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _WrongType(f"{name} must be a number, got {_show(value)}")
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        if not (math.isfinite(value) and low_ok and value <= self.hi):
            left = "(" if self.lo_open else "["
            raise ConfigError(f"{name} must be in {left}{self.lo}, {self.hi}], got {_show(value)}")


@dataclass(frozen=True)
class Bool:
    """``true`` or ``false``."""

    def check(self, value: Any, name: str) -> None:
        if not isinstance(value, bool):
            raise _WrongType(f"{name} must be true or false, got {_show(value)}")


@dataclass(frozen=True)
class Str:
    """A short identifier-like string; ``choices`` restricts it further."""

    choices: tuple[str, ...] | None = None
    pattern: str = r"[A-Za-z0-9_.\-]{1,64}"

    def check(self, value: Any, name: str) -> None:
        if not isinstance(value, str):
            raise _WrongType(f"{name} must be a string, got {_show(value)}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{name} must be one of {list(self.choices)}, got {_show(value)}")
        if not re.fullmatch(self.pattern, value):
            raise ConfigError(f"{name} is not a valid name: {_show(value)}")


@dataclass(frozen=True)
class IntSeq:
    """A list of ``length`` integers (any length when ``None``, up to ``max_len``), each in
    ``[lo, hi]``."""

    length: int | None
    lo: int
    hi: int
    max_len: int = 64

    def check(self, value: Any, name: str) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise _WrongType(f"{name} must be a list of integers, got {_show(value)}")
        if self.length is not None and len(value) != self.length:
            raise ConfigError(f"{name} must hold {self.length} integers, got {len(value)}")
        if len(value) > self.max_len:
            raise ConfigError(f"{name} holds {len(value)} values (max {self.max_len})")
        for i, item in enumerate(value):
            Int(self.lo, self.hi).check(item, f"{name}[{i}]")


@dataclass(frozen=True)
class StrList:
    """A list of at most ``max_len`` strings of at most ``max_chars`` characters (labels)."""

    max_len: int = 4096
    max_chars: int = 256

    def check(self, value: Any, name: str) -> None:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{name} must be a list of strings, got {_show(value)}")
        if len(value) > self.max_len:
            raise ConfigError(f"{name} holds {len(value)} values (max {self.max_len})")
        for i, item in enumerate(value):
            if not isinstance(item, str) or len(item) > self.max_chars:
                raise ConfigError(f"{name}[{i}] must be a string of ≤ {self.max_chars} characters")


@dataclass(frozen=True)
class Dict:
    """A JSON object (checked further by its own table)."""

    def check(self, value: Any, name: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be an object, got {_show(value)}")


@dataclass(frozen=True)
class AnyOf:
    """Any of ``options``. The error reported is that of an option whose type matched (a
    range error), else all the expected types."""

    options: tuple[Any, ...]

    def check(self, value: Any, name: str) -> None:
        wrong_types: list[str] = []
        for option in self.options:
            try:
                option.check(value, name)
                return
            except _WrongType as exc:
                wrong_types.append(plain_message(exc).split(" must be ", 1)[-1].split(", got")[0])
            except ConfigError:
                raise
        raise _WrongType(f"{name} must be {' or '.join(wrong_types)}, got {_show(value)}")


@dataclass(frozen=True)
class Literal:
    """Exactly ``value``."""

    value: Any

    def check(self, value: Any, name: str) -> None:
        if value != self.value or type(value) is not type(self.value):
            raise _WrongType(f"{name} must be {self.value!r}, got {_show(value)}")


# Bounds are generous (10-40× the largest preset) and exist to stop absurd values before a
# model is built; the parameter budget below is the real cap on size.
VMAMBA_FIELDS: dict[str, Any] = {
    "in_chans": Int(1, 3),
    "depths": IntSeq(4, 1, 64),
    "dims": AnyOf((Int(2, 8192), IntSeq(4, 2, 16384))),
    "d_state": Int(1, 256),
    "ssm_ratio": Float(0.0, 16.0, lo_open=True),
    "dt_rank": AnyOf((Literal("auto"), Int(1, 4096))),
    "mlp_ratio": Float(0.0, 64.0),
    "drop_path_rate": Float(0.0, 1.0),
    "use_z_gate": Bool(),
    "conv_kernel": Int(1, 31),
    "patch_size": Int(1, 64),
    "norm_eps": Float(0.0, 1.0, lo_open=True),
    "scan_backend": Str(),
    "attention_stage": Int(-4, 3),
    "attention_block": Int(-64, 63),
}

VIT_FIELDS: dict[str, Any] = {
    "img_size": Int(1, 16384),
    "patch_size": Int(1, 256),
    "in_chans": Int(1, 3),
    "dim": Int(4, 16384),
    "depth": Int(1, 256),
    "heads": Int(1, 256),
    "mlp_ratio": Float(0.0, 64.0),
    "qkv_bias": Bool(),
    "drop_path_rate": Float(0.0, 1.0),
    "norm_eps": Float(0.0, 1.0, lo_open=True),
    "cls_token": Bool(),
}

TASK_FIELDS: dict[str, Any] = {
    "backbone_type": Str(),
    "backbone_config": Dict(),
    "n_classes": Int(1, 4096),
    "head": Str(("linear", "mlp", "unet", "unet-hr", "unet-hrc", "conv", "vss")),
    "classes": StrList(),
    "input_size": Int(32, 8192),
}


def check_fields(
    data: Any,
    table: Mapping[str, Any],
    what: str,
    *,
    required: Sequence[str] = (),
    from_json: bool = True,
) -> None:
    """Check a config dict against ``table`` (field → checker); ``what`` names it in errors.

    Unknown keys, missing ``required`` keys and every out-of-range / wrong-type value raise
    :class:`ConfigError` naming the field (``vmamba config.dims``). ``from_json``: the dict
    was read from a file, so its whole tree is bounded first (:func:`check_json_tree`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be an object, got {_show(data)}")
    if from_json:
        check_json_tree(data, what)
    unknown = sorted(str(k) for k in data if k not in table)
    if unknown:
        raise ConfigError(f"unknown {what} keys {unknown[:8]}", hint=f"known: {sorted(table)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{what} lacks {missing}")
    for key, value in data.items():
        table[key].check(value, f"{what}.{key}")


# ------------------------------------------------------------------------------ parameter budget
def max_params() -> int:
    """The largest parameter count a config may ask for: ``$USFM_MAX_MODEL_PARAMS`` or 2·10⁹."""
    raw = os.environ.get(ENV_MAX_PARAMS)
    if not raw:
        return DEFAULT_MAX_PARAMS
    try:
        value = int(float(raw))
    except ValueError:
        raise ConfigError(
            f"environment variable {ENV_MAX_PARAMS}={raw!r} is not a number",
            hint="set it to a parameter count such as 2e9, or unset it",
        ) from None
    if value < 1:
        raise ConfigError(f"{ENV_MAX_PARAMS} must be ≥ 1, got {raw!r}")
    return value


def check_param_budget(n_params: int, what: str) -> None:
    """Raise :class:`ConfigError` when ``n_params`` (estimated) exceeds :func:`max_params`."""
    cap = max_params()
    if n_params > cap:
        raise ConfigError(
            f"{what} would have ≈{n_params:.3g} parameters ({4 * n_params / 2**30:.1f} GiB "
            f"as float32), more than the cap of {cap:.3g}",
            hint=f"check the config's widths/depths; to allow it, raise ${ENV_MAX_PARAMS}",
        )


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return f"an integer of ≈{value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= 60 else text[:57] + "..."


def plain_message(exc: BaseException) -> str:
    """An error's message without the ``fix:`` line :class:`USFMError` appends."""
    return str(exc).split("\n  fix:", 1)[0]
