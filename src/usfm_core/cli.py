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
        help="CPU threads for torch (default: torch's choice, all cores). On a machine busy "
        "with other jobs, 1 can be many times faster than oversubscribed cores",
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
    return parser


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
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
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
