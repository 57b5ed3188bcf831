"""Adapter (temporary): the names ``flows/cli_wal.py`` imports, until the CLI moves into its subpackage.

WAL archiving now lives in ``tasks.walformat`` (the object format), ``tasks.walarchive``
(repository I/O), ``tasks.walspool`` (local state) and ``tasks.walworkers`` (the look-ahead
push, the background pusher and prefetcher). This module goes away with the CLI's move.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks import walworkers
from tasks.walarchive import WalMissing, fetch_file, repository_reachable
from tasks.walformat import WalSettings
from tasks.walnames import parse_wal_name
from tasks.walspool import (
    PREFETCHER_LOG,
    PUSHER_LOG,
    already_archived,
    config_stamp,
    load_settings_cache,
    note_wanted,
    prefetch_primed,
    prefetcher_pid,
    pusher_pid,
    save_settings_cache,
    spool_root,
    spool_writable,
    take_prefetched,
)
from tasks.walworkers import push_with_lookahead, run_prefetcher, run_pusher

__all__ = [
    "PREFETCHER_LOG",
    "PUSHER_LOG",
    "WalMissing",
    "WalSettings",
    "already_archived",
    "config_stamp",
    "fetch_file",
    "load_settings_cache",
    "note_wanted",
    "parse_wal_name",
    "prefetch_primed",
    "prefetcher_pid",
    "push_with_lookahead",
    "pusher_pid",
    "repository_reachable",
    "run_prefetcher",
    "run_pusher",
    "save_settings_cache",
    "spool_root",
    "spool_writable",
    "take_prefetched",
    "wait_for_pusher",
]


def wait_for_pusher(path: Path, stamp: str, *, timeout: float, alive: Callable[[], bool]) -> str | None:
    """The CLI's old view of ``walworkers.wait_for_pusher``: "ok", the error, or None."""
    outcome = walworkers.wait_for_pusher(path, stamp, timeout=timeout, alive=alive)
    return "ok" if outcome.archived else outcome.error
