"""Entry point: the ``gravl-dr`` command line, as its own package.

``entry`` is the console script (``gravl-dr = "flows.cli:main"``): the WAL hooks' fast path,
else ``app`` — the parser, the error contract and one module per feature (``backup``, ``wal``,
``failover``, …), each registering its commands; ``runner`` runs a flow in-process. Imports
go one way: entry → app → command modules → runner; nothing imports back.
"""

from __future__ import annotations

from flows.cli.entry import main

__all__ = ["main"]
