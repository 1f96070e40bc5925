"""Sub-commands of ``usfm-core``: one module each, exposing ``register(subparsers)``."""
