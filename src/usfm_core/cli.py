"""The ``usfm-core`` command line: one program, one sub-command per job.

Each sub-command lives in its own module under :mod:`usfm_core.commands` and exposes
``register(subparsers)`` (adds its parser, sets ``func``) — heavy imports (torch, cv2) happen
inside the command's function so ``usfm-core --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from usfm_core import __version__
from usfm_core.errors import USFMError

# Sub-command modules, in the order they appear in ``--help``. A module that is missing
# (work in progress) is skipped rather than breaking the whole CLI.
COMMAND_MODULES: tuple[str, ...] = (
    "usfm_core.commands.info",
    "usfm_core.commands.preprocess",
    "usfm_core.commands.deidentify",
    "usfm_core.commands.simulate",
    "usfm_core.commands.pretrain",
    "usfm_core.commands.finetune",
    "usfm_core.commands.evaluate",
    "usfm_core.commands.segment",
    "usfm_core.commands.suggest",
    "usfm_core.commands.models",
    "usfm_core.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="usfm-core",
        description="Ultrasound foundation models: read, preprocess, pretrain, fine-tune, "
        "evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"usfm-core {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch and the fused scan kernels (default: the free cores, i.e. "
        "cores minus the load average, at least 1; or $USFM_THREADS / $OMP_NUM_THREADS)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():
        # Sub-commands take their --help text from module docstrings: drop the reST markup.
        if command.description:
            command.description = plain_text(command.description)
    return parser


def plain_text(doc: str) -> str:
    """``doc`` without reST inline markup (````code````, ``:func:`x```) for terminal help."""
    import re

    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``usfm-core`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    from usfm_core.threads import apply_threads

    apply_threads(args.threads)  # --threads N, else the free cores (see usfm_core.threads)
    try:
        return int(args.func(args) or 0)
    except USFMError as exc:
        # User-fixable problems: a clear message, no traceback.
        print(f"usfm-core {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"usfm-core {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
