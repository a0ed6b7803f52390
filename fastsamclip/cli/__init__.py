"""The ``fastsamclip`` command: ``info``, ``demo``, ``merge`` / ``distill`` / ``cache-teachers``,
``predict``, ``eval``, ``export``, ``serve``, ``bench``, ``miniature``.

Two places per command:

* its options, in :mod:`fastsamclip.cli.parsers` (``add_command(sub, "predict",
  "predict:cmd_predict", ...)`` and its ``add_argument`` calls): the whole parser imports no
  torch, open_clip or segment_anything, so ``--help`` answers at once;
* what it runs, ``cmd_<name>(args) -> int`` in its module (:mod:`fastsamclip.cli.predict`, ...),
  which imports what it needs at its top and is imported by :func:`main` only once the command
  line has parsed.

:func:`main` also sets up logging the same way for every command (:mod:`fastsamclip.logs`: one
format on stderr; ``-v`` shows the package's INFO, ``-vv`` DEBUG), and turns a missing optional
package into one line naming the extra that installs it.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, List, Optional

from fastsamclip import logs
from fastsamclip.cli.common import missing_extra
from fastsamclip.cli.parsers import build_parser

__all__ = ["build_parser", "load_command", "main"]


def load_command(run: str) -> Callable[..., int]:
    """The function named by a parser's ``run`` (``"predict:cmd_predict"``), its module imported
    now: the one place where the command line imports what a command runs."""
    module, _, function = run.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with logs.to_stderr(logs.verbosity_level(args.verbose)):
        try:
            return load_command(args.run)(args)
        except ImportError as e:  # an optional extra that is not installed: say which, in one line
            line = missing_extra(e, args.command)
            if line is None:
                raise
            print(line, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
