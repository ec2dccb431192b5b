"""`steplab <verb>`: argument parsing and printing only; every verb is a thin call into the library.

Each submodule exposes ``register(subparsers)`` that adds its verbs and sets ``func`` on the parser;
``func(args) -> int`` returns the exit code.
"""
from __future__ import annotations

import argparse
import sys

from steplab.errors import StepLabError


def build_parser() -> argparse.ArgumentParser:
    from steplab.cli import core, edge, evaluate, extend, interop, law, rl, serve, sft

    parser = argparse.ArgumentParser(prog="steplab", description="steplab: predict before you train.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    sub.required = True
    for module in (core, evaluate, law, serve, interop, edge, extend, sft, rl):  # edge after interop: it adds `export gguf`
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StepLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
