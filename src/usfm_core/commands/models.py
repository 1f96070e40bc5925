"""``usfm-core models``: list shipped and user models, or import a model folder."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` (list) and ``models import DIR`` to the CLI."""
    p = sub.add_parser(
        "models",
        help="list shipped and user models; import a model folder",
        description="List the models every tool can use by name, or import one.",
    )
    p.add_argument("action", nargs="?", choices=["list", "import"], default="list")
    p.add_argument("path", nargs="?", help="model folder to import (with `import`)")
    p.add_argument(
        "--name",
        help="plain name to import under, no '/' or '..' (default: the folder's name)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model folder of the same name (swapped in atomically; never a file, "
        "link or non-model folder)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List or import models; returns the exit code."""
    from usfm_core.errors import USFMError
    from usfm_core.models.zoo import import_model, list_models, user_model_dir

    if args.action == "import":
        if not args.path:
            raise USFMError(
                "`usfm-core models import` needs a model folder",
                hint="usfm-core models import RUN/model --name my-model",
            )
        dest = import_model(args.path, args.name, overwrite=args.overwrite)
        print(f"imported {args.path} → {dest}")
        return 0
    entries = list_models()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "kind": e.kind,
                        "source": e.source,
                        "path": str(e.path),
                        "sha256": e.sha256,
                        "description": e.info.get("description"),
                        "test_metrics": e.info.get("test_metrics"),
                    }
                    for e in entries
                ],
                indent=1,
            )
        )
        return 0
    print(f"user model directory: {user_model_dir()}  (set USFM_MODEL_DIR to change)")
    if not entries:
        print("no models yet: fine-tune one (usfm-core finetune) or import a folder")
    width = max([16, *(len(e.name) for e in entries)])  # "openus-small-fast" is 17
    for e in entries:
        print(f"  {e.name:<{width}} {e.kind:<15} {e.source:<8} {_headline(e.info):<22} {e.path}")
        if e.info.get("description"):
            print(f"  {'':<{width}} {e.info['description']}")
    return 0


def _headline(info: dict) -> str:
    """``test Dice 0.71`` / ``test macro-F1 0.66`` for a shipped model ('' for others)."""
    metrics = info.get("test_metrics") or {}
    for key, label in (("dice", "Dice"), ("macro_f1", "macro-F1")):
        if key in metrics:
            return f"test {label} {metrics[key]:.2f}"
    if "pretrain_step" in info:  # a shipped backbone: how far its pretraining got
        return f"pretrained {info['pretrain_step']}/{info.get('pretrain_total_steps', '?')}"
    return ""
