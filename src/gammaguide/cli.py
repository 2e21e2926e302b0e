"""Command line: ``gammaguide inspect|train|ablate|report``.

Every error a user can cause ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import GammaGuideError


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show the role and decay decision of every normalization scale")
    p.add_argument("model")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args) -> int:
    raise GammaGuideError("inspect is not implemented yet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gammaguide", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    from .experiments import cli as experiments_cli  # argparse definitions only; heavy imports stay lazy

    experiments_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GammaGuideError as exc:
        print(f"gammaguide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gammaguide: interrupted", file=sys.stderr)
        return 130
