"""The ``tokenmill`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _features(args: argparse.Namespace) -> int:
    from .features import format_table
    from .registry import Registry

    matrix = Registry(on_plugin_error=args.plugin_errors).feature_matrix()
    print(json.dumps(matrix, indent=2, sort_keys=True) if args.json else format_table(matrix))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine with vLLM V1 semantics")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    features = sub.add_parser("features", help="what this installation supports (components and V1 features)")
    features.add_argument("--json", action="store_true", help="print stable JSON instead of a table")
    features.add_argument("--plugin-errors", choices=("raise", "warn"), default="raise",
                          help="a plugin that fails to load is an error (default) or a warning")
    features.set_defaults(func=_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # a clear one-line message, not a traceback, for users
        from .errors import TokenmillError

        if not isinstance(exc, TokenmillError):
            raise
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
