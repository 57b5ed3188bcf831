"""Entry point: ``gravl-dr`` — the thin first step of every command.

PostgreSQL's hooks (``wal-push``, ``wal-fetch``) are answered by their fast path before the
parser, the config model or any repository client loads (and never import Prefect, nor go to a
warm process). Any other command goes to the warm process of this environment when one answers
(:mod:`flows.cli.warm`), else runs in this process through :mod:`flows.cli.app`, imported only
then: the hooks and the warm client must not pay for every command's parser.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flows.cli import wal, warm

# Commands PostgreSQL runs once per WAL file may answer before the parser and the config model load.
FAST_PATHS = ("wal-push", "wal-fetch")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in FAST_PATHS for w in words):
        code = wal.fast_path(words)
        if code is not None:
            return int(code)
    elif "warm" not in words:
        code = warm.run_remote(words)
        if code is not None:
            return code
    from flows.cli import app  # the parser and every command: not for the hooks' fast path

    return app.main(argv)
