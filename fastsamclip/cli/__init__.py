"""The ``fastsamclip`` command. Each command group lives in its own module and registers its
parser here: ``info``, ``demo``, ``merge`` / ``distill`` / ``cache-teachers``, ``predict``, ``eval``,
``export``, ``serve``, ``bench``, ``miniature``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from fastsamclip.cli import bench, demo, evaluate, export, info, miniature, predict, serve, train
from fastsamclip.cli.common import missing_extra

COMMANDS = (info, demo, train, predict, evaluate, export, serve, bench, miniature)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsamclip", description="SAM-CLIP: one ViT for masks and semantics")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ImportError as e:  # an optional extra that is not installed: say which, in one line
        line = missing_extra(e, args.command)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
