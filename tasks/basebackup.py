"""Adapter: a physical base backup over the replication protocol, every tablespace streamed.

`pg_basebackup -D - -Ft` refuses a cluster with a user tablespace ("can only write single
tablespace to stdout"), and `-X fetch` loses WAL that a busy server recycles before the backup
ends. So gravl-dr speaks the protocol itself, through libpq (psycopg's ``pq`` layer), on one
replication connection:

1. ``CREATE_REPLICATION_SLOT ... TEMPORARY PHYSICAL RESERVE_WAL`` — the slot holds every WAL
   segment from before the backup's start checkpoint until the connection closes, whatever
   ``max_wal_size`` and ``wal_keep_size`` say; the server drops it when the session ends, even
   if we are killed.
2. ``BASE_BACKUP (... WAL true, MANIFEST 'yes', TARGET 'client')`` — PostgreSQL 15's COPY
   sub-protocol (basebackup_copy.c): one CopyOut in which each CopyData starts with a type
   byte: 'n' starts an archive (name, tablespace path), 'd' carries its bytes, 'p' reports
   progress, 'm' starts the backup manifest. User tablespaces come first, the main data
   directory (``base.tar``, with the WAL the backup needs appended, and the ``pg_tblspc/<oid>``
   symlinks a restore re-points) last, then the backup manifest.

Each archive is handed out as an iterator of chunks while the COPY streams: one pass, memory
bounded by the chunk size. Reads wait on the socket with an inactivity timeout, never forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import conninfo, pq

from tasks.errors import CommandFailed, PreconditionFailed, TransientError, command_error
from tasks.postgres import safe_dsn

log = logging.getLogger(__name__)


MANIFEST_NAME = "backup_manifest"


@dataclass(frozen=True)
class ArchiveHeader:
    """One archive of the backup: ``base.tar``, ``<spcoid>.tar`` (with its tablespace path), or
    the server's ``backup_manifest`` (for pg_verifybackup), which comes last."""

    name: str
    tablespace_path: str | None


@dataclass(frozen=True)
class BackupEnd:
    start_lsn: str
    stop_lsn: str
    timeline: int
    tablespaces: tuple[tuple[str, str], ...]  # (spcoid, location) as the server listed them


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class BaseBackupStream:
    """One replication connection running CREATE_REPLICATION_SLOT (temporary) + BASE_BACKUP."""

    def __init__(
        self,
        dsn: str,
        *,
        label: str,
        slot: str,
        inactivity_timeout: float = 600,
        max_rate_kb: int | None = None,
    ) -> None:
        self.dsn = dsn
        self.label = label
        self.slot = slot
        self.timeout = inactivity_timeout
        self.max_rate_kb = max_rate_kb
        self.start_lsn = ""
        self.timeline = 0
        self.tablespaces: tuple[tuple[str, str], ...] = ()
        self._pg: pq.abc.PGconn | None = None
        self._pending: bytes | None = None  # an 'n' message read while finishing the previous archive
        self._copy_done = False
        self._in_archive = False

    # ------------------------------------------------------------ connection

    def connect(self) -> None:
        params = conninfo.conninfo_to_dict(self.dsn)
        params["replication"] = "true"
        params.setdefault("connect_timeout", "10")
        params.setdefault("application_name", "gravl-dr")
        pg = pq.PGconn.connect(conninfo.make_conninfo("", **params).encode())
        if pg.status != pq.ConnStatus.OK:
            reason = pg.error_message.decode("utf-8", "replace").strip().splitlines()
            pg.finish()
            raise TransientError(
                f"cannot open a replication connection to {safe_dsn(self.dsn)}: "
                f"{reason[-1] if reason else 'connection failed'}"
            )
        self._pg = pg

    def close(self) -> None:
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.finish()
            self._pg = None

    def __enter__(self) -> BaseBackupStream:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pg(self) -> pq.abc.PGconn:
        if self._pg is None:
            raise PreconditionFailed("replication connection is not open")
        return self._pg

    def _wait_readable(self) -> None:
        ready, _, _ = select.select([self.pg.socket], [], [], self.timeout)
        if not ready:
            raise TransientError(
                f"base backup from {safe_dsn(self.dsn)}: no data for {self.timeout:.0f}s; giving up"
            )
        try:
            self.pg.consume_input()
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from None

    def _lost(self, exc: Exception) -> CommandFailed:
        text = " ".join(str(exc).split()) or "connection lost"
        return command_error(f"BASE_BACKUP on {safe_dsn(self.dsn)} failed: {text}")

    def _result(self) -> pq.abc.PGresult | None:
        """The next result, waiting on the socket (never blocking inside libpq)."""
        while self.pg.is_busy():
            self._wait_readable()
        return self.pg.get_result()

    def _fail(self, res: pq.abc.PGresult | None, what: str) -> CommandFailed:
        msg = (
            (res.error_message if res is not None else self.pg.error_message)
            .decode("utf-8", "replace")
            .strip()
        )
        return command_error(
            f"{what} on {safe_dsn(self.dsn)} failed: {msg.splitlines()[0] if msg else 'no message'}"
        )

    @staticmethod
    def _rows(res: pq.abc.PGresult) -> list[list[str | None]]:
        return [
            [None if (v := res.get_value(r, c)) is None else bytes(v).decode() for c in range(res.nfields)]
            for r in range(res.ntuples)
        ]

    def _command(self, text: str) -> list[list[list[str | None]]]:
        """Run a replication command and collect its result sets until the COPY or the end."""
        self.pg.send_query(text.encode())
        sets: list[list[list[str | None]]] = []
        while True:
            res = self._result()
            if res is None:
                return sets
            if res.status == pq.ExecStatus.TUPLES_OK:
                sets.append(self._rows(res))
            elif res.status == pq.ExecStatus.COPY_OUT:
                return sets
            elif res.status != pq.ExecStatus.COMMAND_OK:
                err = self._fail(res, text.split(" (")[0])
                while self._result() is not None:
                    pass
                raise err

    # ------------------------------------------------------------ the backup

    def identify(self) -> str:
        """IDENTIFY_SYSTEM: proves the replication connection is allowed; returns the system id."""
        sets = self._command("IDENTIFY_SYSTEM")
        return str(sets[0][0][0]) if sets and sets[0] else ""

    def start(self) -> None:
        """Reserve WAL with a temporary slot, then start BASE_BACKUP up to its first archive."""
        self._command(f"CREATE_REPLICATION_SLOT {self.slot} TEMPORARY PHYSICAL RESERVE_WAL")
        log.info("reserved WAL with temporary replication slot %s", self.slot)
        options = [
            f"LABEL {_quote(self.label)}",
            "CHECKPOINT 'fast'",
            "WAL true",
            "WAIT true",
            "MANIFEST 'yes'",
            "MANIFEST_CHECKSUMS 'CRC32C'",
            "TARGET 'client'",
            "PROGRESS false",
        ]
        if self.max_rate_kb:
            options.append(f"MAX_RATE {int(self.max_rate_kb)}")
        sets = self._command(f"BASE_BACKUP ({', '.join(options)})")
        if len(sets) < 2:
            raise command_error(f"BASE_BACKUP on {safe_dsn(self.dsn)}: unexpected reply")
        self.start_lsn, self.timeline = str(sets[0][0][0]), int(sets[0][0][1] or 0)
        self.tablespaces = tuple((str(r[0]), str(r[1])) for r in sets[1] if r[0] is not None)

    def _copy_message(self) -> bytes | None:
        """The next CopyData message, or None at the end of the COPY."""
        if self._copy_done:
            return None
        while True:
            try:
                nbytes, data = self.pg.get_copy_data(1)
            except psycopg.OperationalError as exc:
                raise self._lost(exc) from None
            if nbytes > 0:
                return bytes(data)
            if nbytes == 0:
                self._wait_readable()
                continue
            if nbytes == -1:
                self._copy_done = True
                return None
            raise self._fail(None, "BASE_BACKUP")

    def next_archive(self) -> ArchiveHeader | None:
        """Advance to the next archive's header; None when every archive has been sent."""
        while True:
            msg = self._pending if self._pending is not None else self._copy_message()
            self._pending = None
            if msg is None:
                return None
            kind = msg[:1]
            if kind == b"n":
                name, path, *_ = msg[1:].split(b"\0")
                self._in_archive = True
                return ArchiveHeader(name.decode(), path.decode() or None)
            if kind == b"m":
                self._in_archive = True
                return ArchiveHeader(MANIFEST_NAME, None)
            # 'p' progress, or stray data of an archive the caller abandoned

    def chunks(self) -> Iterator[bytes]:
        """The bytes of the current archive (call after next_archive)."""
        if not self._in_archive:
            raise PreconditionFailed("no archive is open")
        try:
            while True:
                msg = self._copy_message()
                if msg is None:
                    return
                kind = msg[:1]
                if kind == b"d":
                    yield msg[1:]
                elif kind in (b"n", b"m"):
                    self._pending = msg
                    return
        finally:
            self._in_archive = False

    def finish(self) -> BackupEnd:
        """After the last archive: read the end position and the command's completion."""
        while self.next_archive() is not None:
            raise command_error("BASE_BACKUP: an archive was left unread")
        res = self._result()
        if res is None or res.status == pq.ExecStatus.FATAL_ERROR:
            raise self._fail(res, "BASE_BACKUP")
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise self._fail(res, "BASE_BACKUP")
        row = self._rows(res)[0]
        while (res := self._result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                raise self._fail(res, "BASE_BACKUP")
        return BackupEnd(self.start_lsn, str(row[0]), int(row[1] or self.timeline), self.tablespaces)


def slot_name(backup_id: str) -> str:
    """A replication slot name (lower case, digits, underscore; at most 63 bytes) unique per run."""
    stem = "".join(ch if ch.isalnum() else "_" for ch in backup_id.lower())
    return f"gravl_dr_{stem}_{os.getpid()}"[:63]
