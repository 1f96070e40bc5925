"""Finding models on disk: shipped ones, the user's model directory, or any folder.

A *model folder* holds ``config.json`` + ``model.safetensors``. Its ``config.json`` says what it
is: a fine-tuned task model (``"format": "usfm-finetuned/1"``, with ``"task"``) or a pretrained
backbone (``"model_type"``, e.g. ``"vmamba"``, written by
:func:`usfm_core.models.serialization.save_model`). Nothing is ever downloaded: shipped models
live inside the package (``usfm_core/assets/models``) with sha256 sums in ``index.json``, and
user models in :func:`user_model_dir` (``$USFM_MODEL_DIR``, default ``~/.cache/usfm/models``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usfm_core.errors import CheckpointError

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# A pretrained backbone may carry what ``usfm_core.pretrain.inspect`` needs beside it: the
# student backbone and its reconstruction head (tensors only, never pickled).
INSPECT = "inspect.safetensors"
RUN_SUBFOLDERS = ("model", "backbone")

log = logging.getLogger(__name__)


@dataclass
class ModelEntry:
    """One model folder: ``name``, ``path``, ``kind`` (segmentation / classification /
    backbone), ``source`` (builtin / user / path) and its parsed ``config.json``."""

    name: str
    path: Path
    kind: str
    source: str
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    sha256: str | None = None
    # A shipped model's index.json record (description, test metrics, recipe); else empty.
    info: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def has_inspect(self) -> bool:
        """True if the folder carries the student + reconstruction head (:data:`INSPECT`)
        that the Inspect widget and ``usfm-core demo`` show self-adaptive masking with."""
        return (self.path / INSPECT).is_file()

    @property
    def description(self) -> str:
        """One line for lists and dropdowns."""
        extra = self.config.get("extra", {}) or {}
        what = self.info.get("description") or extra.get("description") or extra.get("method") or ""
        return f"{self.name} ({self.kind}, {self.source}){': ' + what if what else ''}"


def user_model_dir() -> Path:
    """The user's model directory: ``$USFM_MODEL_DIR`` or ``$XDG_CACHE_HOME/usfm/models``."""
    env = os.environ.get("USFM_MODEL_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "usfm" / "models"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_kind(config: dict[str, Any]) -> str:
    """``"segmentation" | "classification" | "backbone"`` from a parsed ``config.json``."""
    if "task" in config and str(config.get("format", "")).startswith("usfm-finetuned"):
        return str(config["task"])
    if "model_type" in config:
        return "backbone"
    raise ValueError("config.json is neither a fine-tuned model nor a backbone")


def read_entry(path: str | Path, *, name: str | None = None, source: str = "path") -> ModelEntry:
    """Describe the model folder ``path``; raises :class:`CheckpointError` if it is not one."""
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    name = name or path.name
    # Run folders: `usfm-core finetune` writes RUN/model/, `usfm-core pretrain` RUN/backbone/.
    for sub in RUN_SUBFOLDERS:
        if not (path / CONFIG).is_file() and (path / sub / CONFIG).is_file():
            path = path / sub
            break
    cfg_path = path / CONFIG
    if not cfg_path.is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(
            f"not a model folder (needs {CONFIG} and {WEIGHTS})",
            path=path,
            hint="pass a folder written by `usfm-core finetune` or `usfm-core pretrain`",
        )
    from usfm_core.models.limits import read_json_file

    config = read_json_file(cfg_path)  # size- and depth-bounded; CheckpointError names it
    try:
        if not isinstance(config, dict):
            raise ValueError("config.json is not a JSON object")
        kind = model_kind(config)
    except ValueError as exc:
        raise CheckpointError(f"unreadable {CONFIG}: {exc}", path=cfg_path) from None
    return ModelEntry(name, path, kind, source, config)


def _builtin_index() -> dict[str, dict[str, Any]]:
    index = BUILTIN_DIR / "index.json"
    if not index.is_file():
        return {}
    return json.loads(index.read_text(encoding="utf-8"))


def verify_builtin(entry: ModelEntry) -> None:
    """Check a shipped model's files against the sha256s in ``index.json``.

    ``sha256`` covers the weights; ``config_sha256`` (models shipped since the first real
    ones) covers ``config.json`` too, so a hand-edited architecture cannot load silently;
    ``inspect_sha256`` (a shipped backbone) covers its :data:`INSPECT` tensors.
    """
    info = _builtin_index().get(entry.name, {})
    if info.get("sha256") is None:
        raise CheckpointError("shipped model has no sha256 in index.json", path=entry.path)
    for fname, key in ((WEIGHTS, "sha256"), (CONFIG, "config_sha256"), (INSPECT, "inspect_sha256")):
        expected = info.get(key)
        if expected is None:
            continue
        if not (entry.path / fname).is_file():
            raise CheckpointError(
                f"{fname} is missing",
                path=entry.path / fname,
                hint="the installed package is damaged: reinstall napari-usfm",
            )
        actual = file_sha256(entry.path / fname)
        if actual != expected:
            raise CheckpointError(
                f"checksum mismatch: sha256 {actual[:12]}… ≠ expected {expected[:12]}…",
                path=entry.path / fname,
                hint="the installed package is damaged: reinstall napari-usfm",
            )


def is_explicit_path(name_or_path: str | Path) -> bool:
    """True if ``name_or_path`` can only mean a path: absolute, several parts, or a string
    with a separator or starting with ``.`` / ``~`` (``./sim-lesion``, ``runs/a/model``).

    A bare name (``"sim-lesion"``, ``Path("sim-lesion")``) may be a model name.
    """
    if isinstance(name_or_path, Path):
        return name_or_path.is_absolute() or len(name_or_path.parts) != 1
    text = str(name_or_path)
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return any(s in text for s in seps) or text.startswith((".", "~")) or not text


def _builtin_name_of(path: Path) -> str | None:
    """The shipped model a path points into (``…/assets/models/NAME[/…]``), else None."""
    try:
        rel = path.resolve().relative_to(BUILTIN_DIR.resolve())
    except (ValueError, OSError):
        return None
    return rel.parts[0] if rel.parts and rel.parts[0] in _builtin_index() else None


def _named_model(name: str) -> ModelEntry | None:
    """The shipped or user model called ``name`` (shipped first), or None."""
    for entry in list_models():
        if entry.name == name:
            return entry
    return None


def _checked(entry: ModelEntry, name: str) -> ModelEntry:
    """``entry`` after its checksum check (shipped), warning if a local folder of the same
    name is being ignored."""
    local = Path(name)
    try:
        shadowed = local.exists() and local.resolve() != entry.path.resolve()
    except OSError:
        shadowed = False
    if shadowed:
        log.warning(
            "%r is the name of a %s model, which is used; the folder %s here is ignored "
            "(pass ./%s or its full path to use the folder)",
            name,
            "shipped" if entry.source == "builtin" else entry.source,
            local,
            name,
        )
    if entry.source == "builtin":
        verify_builtin(entry)
    return entry


def _not_found(name: str) -> CheckpointError:
    known = ", ".join(e.name for e in list_models()) or "none yet"
    return CheckpointError(
        f"no model named {name!r} and no such folder",
        hint=f"known models: {known}; or import one with `usfm-core models import DIR`",
    )


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """The folder ``name_or_path`` means; every model loader goes through this.

    * A path given explicitly (:func:`is_explicit_path`: ``./sim-lesion``, ``runs/x/model``,
      an absolute path) is used (made absolute); inside the shipped models it is
      sha256-checked.
    * A bare name is a shipped model's (sha256-checked) or a user model's when one has that
      name: a folder of the same name in the working directory never replaces it (a warning
      says how to choose the folder).
    * Any other bare name is a folder in the working directory, if it exists; else
      :class:`CheckpointError` lists the known models.
    """
    if is_explicit_path(name_or_path):
        # Absolute, so that a later lookup cannot mistake "./sim-lesion" for the name.
        path = Path(name_or_path).expanduser().absolute()
        builtin = _builtin_name_of(path)
        if builtin is not None:
            verify_builtin(read_entry(BUILTIN_DIR / builtin, name=builtin, source="builtin"))
        return path
    name = str(name_or_path)
    entry = _named_model(name)
    if entry is not None:
        return _checked(entry, name).path
    if Path(name).exists():
        return Path(name).absolute()
    raise _not_found(name)


def list_models(*extra_dirs: str | Path, kind: str | None = None) -> list[ModelEntry]:
    """Shipped models, then models in the user directory and in ``extra_dirs`` (one level).

    Folders that are not model folders are skipped silently; ``kind`` filters the list.
    """
    entries: list[ModelEntry] = []
    for name, info in sorted(_builtin_index().items()):
        try:
            entry = read_entry(BUILTIN_DIR / name, name=name, source="builtin")
        except CheckpointError:
            continue
        entry.sha256 = info.get("sha256")
        entry.info = info
        entries.append(entry)
    for root, source in [(user_model_dir(), "user"), *((Path(d), "path") for d in extra_dirs)]:
        if not Path(root).is_dir():
            continue
        for sub in sorted(Path(root).iterdir()):
            if sub.name.startswith("."):  # hidden, e.g. an import's .usfm-tmp-… copy
                continue
            try:
                entries.append(read_entry(sub, source=source))
            except CheckpointError:
                continue
    return [e for e in entries if kind is None or e.kind == kind]


def find_model(name_or_path: str | Path) -> ModelEntry:
    """A model by shipped/user name or by folder path (the rules of
    :func:`resolve_model_dir`: a bare shipped name is never shadowed by a local folder);
    shipped weights are sha256-checked."""
    if is_explicit_path(name_or_path):
        entry = read_entry(Path(name_or_path).expanduser())
        builtin = _builtin_name_of(entry.path)
        if builtin is not None:
            entry = read_entry(BUILTIN_DIR / builtin, name=builtin, source="builtin")
            verify_builtin(entry)
        return entry
    name = str(name_or_path)
    entry = _named_model(name)
    if entry is not None:
        return _checked(entry, name)
    if Path(name).exists():
        return read_entry(Path(name))
    raise _not_found(name)


def import_model(src: str | Path, name: str | None = None, *, overwrite: bool = False) -> Path:
    """Copy a model folder into :func:`user_model_dir` as ``name`` so every tool finds it.

    ``name`` (default: the folder's name) must be one plain name (no ``/``, ``..``, ``.``,
    leading dot; :func:`usfm_core.outputs.check_name`), so nothing is written or deleted outside
    ``user_model_dir()/name``. The copy is made in a marked temporary folder beside it and then
    renamed into place; ``overwrite=True`` replaces only an existing *model folder* of that name
    (swapped out, then deleted), never a file, a link or another folder.
    """
    from usfm_core.outputs import check_name, clean_stale_temporaries, replace_folder, tmp_name

    entry = read_entry(src)
    if name is None:
        name = entry.name or Path(src).resolve().name
    check_name(name, what="model name")
    if name in _builtin_index():
        # A shipped name always resolves to the shipped model: the copy could never be reached.
        raise CheckpointError(
            f"'{name}' is the name of a shipped model",
            path=src,
            hint=f"import it under another name: --name my-{name}",
        )
    root = user_model_dir()
    dest = root / name
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise CheckpointError(
                "a model of that name exists",
                path=dest,
                hint="choose another --name or pass --overwrite",
            )
        if dest.is_symlink() or not dest.is_dir():
            raise CheckpointError(
                "exists and is not a model folder (a file or a link): not replaced",
                path=dest,
                hint="choose another --name, or move it away yourself",
            )
        try:
            read_entry(dest)
        except CheckpointError:
            raise CheckpointError(
                "exists and is not a model folder: not replaced by --overwrite",
                path=dest,
                hint="choose another --name, or move that folder away yourself",
            ) from None
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(root)
    tmp = root / tmp_name(name)
    tmp.mkdir()
    try:
        for fname in (CONFIG, WEIGHTS, INSPECT):  # INSPECT only when the model has one
            if fname == INSPECT and not (entry.path / fname).is_file():
                continue
            shutil.copyfile(entry.path / fname, tmp / fname)
        replace_folder(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest
