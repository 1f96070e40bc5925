"""Output-safety rules, written once and used by every writer of the toolkit.

1. **Never write over an input**: :func:`check_outputs` compares every planned output with every
   input by resolved path and ``os.path.samefile`` (hard links, symlinks, ``..``), and refuses an
   output folder that is an input or lies inside an input's managed tree.
2. **Unique output names from the relative input path**: :func:`output_stems` maps ``a/scan.png``
   and ``b/scan.png`` to ``a/scan`` and ``b/scan``; ``a.png`` + ``a.dcm`` to ``a_png`` + ``a_dcm``;
   any names still equal *ignoring case* (``b.png`` + ``b.PNG``, ``a.png`` + ``a.jpg`` +
   ``a_png.jpg``) get a deterministic ``~2``, ``~3`` … suffix in sorted order of their inputs, so no
   two inputs ever share an output, even on case-insensitive file systems.
3. **No path tricks in names**: :func:`check_name` refuses empty names, ``.``, ``..``, path
   separators, absolute paths, control characters and hidden (leading ``.``) names.
4. **Never delete what the toolkit did not create**: temporaries are named
   ``.usfm-tmp-<pid>-<random>-<name>`` (:data:`TMP_PREFIX`); :func:`clean_stale_temporaries`
   removes only such entries whose writing process is gone, and only in folders the caller writes.
5. **Atomic writes with the user's permissions**: :func:`atomic_path` writes a temporary beside the
   target and renames it on success; the final file gets ``0o666 & ~umask`` (``mkstemp`` alone
   would leave ``0600``).

This module imports only the standard library and :mod:`usfm_core.errors`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from usfm_core.errors import USFMError

#: Every temporary file or folder the toolkit creates starts with this (then ``<pid>-``).
TMP_PREFIX = ".usfm-tmp-"
#: Folder (beside simulated scans) holding the simulator's ground truth; never read as scans.
GROUND_TRUTH_DIR = "ground_truth"
_TMP_PID = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UMASK_LOCK = threading.Lock()
# Folders this process already swept for stale temporaries (atomic_path sweeps each once).
_SWEPT: set[Path] = set()


# --- names -------------------------------------------------------------------------------------


def check_name(name: str, *, what: str = "name") -> str:
    """Return ``name`` if it is one plain file/folder name, else raise :class:`USFMError`.

    Refused: empty or blank, ``.``, ``..``, anything with ``/`` or ``\\`` (or the OS separators),
    absolute paths, control characters, a leading ``.`` (hidden, and reserved for temporaries)
    and leading/trailing spaces.
    """
    hint = "use a plain name such as 'my-model' (letters, digits, '-', '_'; no folders)"
    if not isinstance(name, str) or not name.strip():
        raise USFMError(f"{what} is empty", hint=hint)
    seps = {"/", "\\", os.sep, os.altsep} - {None}
    problem = None
    if name in (".", ".."):
        problem = f"{what} {name!r} refers to a folder, not a name"
    elif any(sep in name for sep in seps) or os.path.isabs(name):
        problem = f"{what} {name!r} contains a path separator"
    elif _CONTROL.search(name):
        problem = f"{what} {name!r} contains control characters"
    elif name.startswith("."):
        problem = f"{what} {name!r} starts with '.' (hidden names are reserved)"
    elif name != name.strip():
        problem = f"{what} {name!r} starts or ends with spaces"
    if problem:
        raise USFMError(problem, hint=hint)
    return name


def strip_suffix(rel: Path) -> tuple[str, str]:
    """``sub/scan.nii.gz`` → (``"sub/scan"``, ``"nii.gz"``); the suffix is lower-cased."""
    name = rel.name
    lower = name.lower()
    suffix = "nii.gz" if lower.endswith(".nii.gz") else rel.suffix.lstrip(".").lower()
    base = name[: len(name) - len(suffix) - 1] if suffix else name
    parent = rel.parent.as_posix()
    return (base if parent == "." else f"{parent}/{base}"), suffix


def output_stems(rel_paths: Sequence[Path]) -> dict[Path, str]:
    """Map each relative input path to a unique output stem (posix, may hold sub-folders).

    ``sub/scan.dcm`` → ``sub/scan``; inputs whose plain stems are equal ignoring case keep their
    suffix (``a.png`` + ``a.dcm`` → ``a_png``, ``a_dcm``); stems that still clash ignoring case
    (``b.png`` + ``b.PNG``, or ``a_png.jpg`` against ``a.png``'s ``a_png``) get ``~2``, ``~3`` …
    in sorted order of the inputs' paths. Deterministic: the same set of inputs always gives the
    same stems. Raises :class:`USFMError` for absolute paths or ``..`` parts.
    """
    rels = sorted({Path(r) for r in rel_paths}, key=lambda p: p.as_posix())
    for rel in rels:
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise USFMError(
                f"output names must come from relative paths inside the input, got {rel}",
                hint="pass inputs below one folder",
            )
    plain = {rel: strip_suffix(rel) for rel in rels}
    counts: dict[str, int] = {}
    for stem, _ in plain.values():
        counts[stem.casefold()] = counts.get(stem.casefold(), 0) + 1
    stems = {
        rel: stem
        if counts[stem.casefold()] == 1 or not suffix
        else f"{stem}_{suffix.replace('.', '_')}"
        for rel, (stem, suffix) in plain.items()
    }
    taken: set[str] = set()
    out: dict[Path, str] = {}
    # First come the inputs whose stem is unique; clashing ones are numbered in path order.
    groups: dict[str, list[Path]] = {}
    for rel in rels:
        groups.setdefault(stems[rel].casefold(), []).append(rel)
    for key, members in groups.items():
        if len(members) == 1:
            out[members[0]] = stems[members[0]]
            taken.add(key)
    for members in groups.values():
        if len(members) == 1:
            continue
        for rel in members:
            stem, n = stems[rel], 1
            candidate = stem
            while candidate.casefold() in taken:
                n += 1
                candidate = f"{stem}~{n}"
            out[rel] = candidate
            taken.add(candidate.casefold())
    return {Path(r): out[Path(r)] for r in rel_paths}


def relative_keys(paths: Sequence[Path]) -> list[Path]:
    """Relative names for a list of inputs given anywhere: the file names when those are unique
    ignoring case, else the paths relative to the inputs' deepest common folder."""
    names = [Path(p.name) for p in paths]
    if len({n.as_posix().casefold() for n in names}) == len(names):
        return names
    resolved = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    return [p.relative_to(common) for p in resolved]


# --- inputs vs outputs -------------------------------------------------------------------------


def _same(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file or folder (links, case, ``..`` included)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    """True when ``child`` lies inside (or is) ``folder``, after resolving links."""
    try:
        child_r, folder_r = child.resolve(), folder.resolve()
    except OSError:
        return False
    return child_r == folder_r or folder_r in child_r.parents


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Raise :class:`USFMError` if an output would replace an input or land in an input folder.

    ``inputs`` may be files or folders (a folder of images is read as one scan: writing a new
    file directly inside it would change what it holds). Call before writing anything.
    """
    inputs = [Path(p) for p in inputs]
    files = _identities(inputs)  # O(outputs + inputs): thousands of inputs stay fast
    folders = _identities([p for p in inputs if p.is_dir()])
    for out in outputs:
        out = Path(out)
        src = _find_same(out, files)
        if src is not None:
            raise USFMError(
                f"the output {out} would overwrite the input {src}",
                hint="write to another --out folder, or rename the input",
            )
        folder = _find_same(out.parent, folders)
        if folder is not None:
            raise USFMError(
                f"the output {out} would be written into the input folder {folder}",
                hint="write to another --out folder",
            )


def _identities(paths: list[Path]) -> dict[object, Path]:
    """Each path under its resolved name and, when it exists, its ``(device, inode)``: the two
    ways :func:`_same` recognises a file (links, case, ``..`` included)."""
    out: dict[object, Path] = {}
    for p in paths:
        try:
            out.setdefault(p.resolve(), p)
            st = p.stat()
            out.setdefault((st.st_dev, st.st_ino), p)
        except OSError:
            pass
    return out


def _find_same(path: Path, identities: dict[object, Path]) -> Path | None:
    """The path of ``identities`` that names the same file as ``path``, else None."""
    try:
        hit = identities.get(path.resolve())
        if hit is None and path.exists():
            st = path.stat()
            hit = identities.get((st.st_dev, st.st_ino))
    except OSError:
        return None
    return hit


def check_out_dir(out_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder that is an input (file or folder) or an existing non-folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise USFMError(
            "the output path exists and is not a folder", path=out_dir, hint="choose a folder"
        )
    for src in inputs:
        if _same(out_dir, Path(src)):
            raise USFMError(
                "the output folder is one of the inputs",
                path=out_dir,
                hint="choose a new or separate output folder",
            )


# --- temporaries and atomic writes -------------------------------------------------------------


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def tmp_name(name: str) -> str:
    """A temporary's name for the final file name ``name``: marker prefix, pid, random, name."""
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"


def is_toolkit_temporary(path: Path) -> bool:
    """True for names the toolkit gives its temporaries (``.usfm-tmp-<pid>-…``)."""
    return _TMP_PID.match(Path(path).name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    # A zombie (killed, not yet reaped) writes nothing any more.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def clean_stale_temporaries(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Remove the toolkit's temporaries left in ``folder`` by runs that are no longer alive.

    Only entries named ``.usfm-tmp-<pid>-…`` whose process ``pid`` is gone are removed (files,
    or folders such as a half-copied model); nothing else is ever touched. Returns what was
    removed. Call it only on folders the caller writes into.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    entries = folder.rglob(f"{TMP_PREFIX}*") if recursive else folder.glob(f"{TMP_PREFIX}*")
    for entry in list(entries):
        match = _TMP_PID.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:
            continue
    return removed


def _sweep_once(folder: Path) -> None:
    """:func:`clean_stale_temporaries` of ``folder`` the first time this process writes there."""
    key = Path(os.path.abspath(folder))
    with _UMASK_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    try:
        clean_stale_temporaries(key)
    except OSError:  # a sweep must never stop a write
        pass


def apply_umask(path: Path, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0o666 (0o777) minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _suffix_of(name: str) -> str:
    """``scan.nii.gz`` → ``.nii.gz``, ``x.png`` → ``.png`` (writers pick formats by suffix)."""
    if name.lower().endswith(".nii.gz"):
        return name[-7:]
    return Path(name).suffix


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically.

    The temporary is ``.usfm-tmp-<pid>-<random>-<stem>.tmp<suffix>`` (it keeps the real suffix,
    which OpenCV, tifffile and nibabel use to pick the format). A crash or exception inside the
    block leaves ``path`` untouched and removes the temporary; a killed process's temporary is
    removed by :func:`clean_stale_temporaries` the next time any run writes into that folder
    (each folder is swept once per process). The final file's mode follows
    the umask, or is ``mode`` when given (e.g. ``0o600`` for a private file: set before the
    rename, so the file is never visible with wider permissions). ``path`` must not be an
    existing folder.
    """
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise USFMError("cannot write a file over a folder", path=path, hint="choose a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    stem = path.name[: len(path.name) - len(_suffix_of(path.name))]
    fd, tmp = tempfile.mkstemp(
        prefix=f"{TMP_PREFIX}{os.getpid()}-",
        suffix=f"-{stem}.tmp{_suffix_of(path.name)}",
        dir=path.parent,
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if fsync:
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
        if mode is None:
            apply_umask(tmp_path)
        else:
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + rename), mode from the umask."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(src_tmp: Path, dest: Path) -> None:
    """Move the finished folder ``src_tmp`` onto ``dest``, replacing an existing ``dest``.

    The old ``dest`` is first renamed to a toolkit temporary beside it, then ``src_tmp`` is
    renamed to ``dest``, then the old copy is deleted: at no moment is ``dest`` half-written,
    and only that one folder is ever deleted. The caller checks that ``dest`` may be replaced.
    """
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(tmp_name(f"old-{dest.name}"))
        os.replace(dest, old)
    try:
        os.replace(src_tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from ``path``'s suffix, default PNG)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    return path
