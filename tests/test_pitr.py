"""Point-in-time recovery against a real PostgreSQL 15 whose archive_command is our own wal-push.

One module-scoped primary archives into a file repository; a known history of rows, a named
restore point and noted times/LSNs is written once; each test restores it to another point
and checks the rows are exactly those committed up to it, as the server itself reports.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gravl_testlib import GRAVL_DR, assert_one_line_error, run_cli, write_config
from tasks.backup import (
    build_manifest,
    preflight,
    publish_manifest,
    stream_backup,
    verify_objects,
)
from tasks.config import Config, load_config
from tasks.errors import DRError
from tasks.models import Manifest
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection
from tasks.repository import open_repository

PG_USER = "postgres"


@dataclass
class Archiving:
    """A primary archiving through `gravl-dr wal-push` into a file repository."""

    base: Path
    cluster: LocalCluster
    config: Path
    repo_dir: Path
    marks: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return load_config(str(self.config))

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with connection(self.cluster.dsn("postgres")) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []


def start_archiving_primary(
    prefix: str, *, archive_timeout: str = "0", extra: dict[str, str] | None = None
) -> Archiving:
    base = make_private_dir(prefix, PG_USER)
    repo_dir = base / "repo"
    repo_dir.mkdir()
    (repo_dir / "backups").mkdir()
    cluster = LocalCluster(base / "data", free_port())
    config = base / "gravl-dr.yaml"
    write_config(
        config,
        {
            "cluster": "gravl",
            "primary": {"dsn": cluster.dsn("postgres")},
            "repository": {"url": f"file://{repo_dir}"},
        },
    )
    chown_tree(base, PG_USER)
    conf = {
        "archive_mode": "on",
        "archive_command": f"'{GRAVL_DR} --config {config} wal-push %p'",
        "archive_timeout": f"'{archive_timeout}'",
        "wal_keep_size": "'0'",
        "max_wal_size": "'64MB'",
        "min_wal_size": "'32MB'",
    }
    conf.update(extra or {})
    cluster.initdb(extra_conf=conf)
    cluster.start()
    return Archiving(base, cluster, config, repo_dir)


def stop_archiving(arch: Archiving) -> None:
    arch.cluster.destroy()
    shutil.rmtree(arch.base, ignore_errors=True)


def take_backup(arch: Archiving) -> Manifest:
    """A physical backup through the plain task functions (the flow is tested elsewhere)."""
    cfg = arch.cfg
    repo = open_repository(cfg.repository)
    pre = preflight(cfg, repo, "physical")
    res = stream_backup(cfg, repo, pre)
    manifest = build_manifest(cfg, pre, res)
    verify_objects(repo, manifest)
    publish_manifest(repo, manifest)
    chown_tree(arch.repo_dir, PG_USER)
    time.sleep(1.05)  # backup ids have one-second resolution
    return manifest


def switch_and_wait(arch: Archiving, timeout: float = 30) -> str:
    """pg_switch_wal() and wait until the server reports that segment archived."""
    row = arch.sql("SELECT pg_walfile_name(pg_switch_wal())")
    name = row[0][0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = arch.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
        if last is not None and last[:24] >= name:
            return str(name)
        time.sleep(0.1)
    raise AssertionError(f"{name} not archived after {timeout}s: {arch.cluster.log_tail()}")


def insert(arch: Archiving, phase: str, n: int = 5) -> None:
    arch.sql("INSERT INTO events(phase, n) SELECT %s, g FROM generate_series(1, %s) g", phase, n)


@pytest.fixture(scope="module")
def history() -> Iterator[Archiving]:
    """a (before the backup) | backup | b | restore point 'rp-b' | c | T | d | LSN L | e | switch."""
    arch = start_archiving_primary("gravl-test-pitr-")
    try:
        arch.sql(
            "CREATE TABLE events(id serial PRIMARY KEY, phase text NOT NULL, n int,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        insert(arch, "a")
        arch.marks["backup"] = take_backup(arch)
        insert(arch, "b")
        arch.sql("SELECT pg_create_restore_point('rp-b')")
        insert(arch, "c")
        time.sleep(0.3)
        arch.marks["time"] = arch.sql("SELECT clock_timestamp()")[0][0]
        time.sleep(0.3)
        insert(arch, "d")
        arch.marks["lsn"] = arch.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0]
        insert(arch, "e")
        arch.marks["last_wal"] = switch_and_wait(arch)
        # a few more segments (no events) so the archive has a middle to cut a gap into
        arch.sql("CREATE TABLE filler(x int)")
        for _ in range(3):
            arch.sql("INSERT INTO filler VALUES (1)")
            switch_and_wait(arch)
        yield arch
    finally:
        stop_archiving(arch)


def private_restore_dir(prefix: str) -> Iterator[Path]:
    """A data directory to restore into, in a fresh private folder; its server and folder go afterwards."""
    base = make_private_dir(prefix, PG_USER)
    yield base / "data"
    LocalCluster(base / "data", 1).destroy()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def restore_dir() -> Iterator[Path]:
    yield from private_restore_dir("gravl-test-pitr-restore-")


@dataclass(frozen=True)
class ArchiveCopy:
    """A private copy of a history's repository, with a config that points at it."""

    config: Path
    repo: Path

    @property
    def base(self) -> Path:
        """The private folder holding the copy and its config (removed afterwards)."""
        return self.repo.parent

    def segments_after(self, wal: str | None) -> list[Path]:
        """The timeline-1 segment objects whose names come after ``wal``, in order."""
        return sorted(
            p
            for p in (self.repo / "wal" / "00000001").iterdir()
            if len(p.name) == 28 and p.name[:24] > (wal or "")
        )


@contextlib.contextmanager
def archive_copy(history: Archiving, prefix: str) -> Iterator[ArchiveCopy]:
    copy = make_private_dir(prefix, PG_USER)
    try:
        shutil.copytree(history.repo_dir, copy / "repo")
        config = write_config(
            copy / "gravl-dr.yaml",
            {
                "cluster": "gravl",
                "primary": {"dsn": history.cluster.dsn("postgres")},
                "repository": {"url": f"file://{copy / 'repo'}"},
            },
        )
        chown_tree(copy, PG_USER)  # the restored server's restore_command reads it as postgres
        yield ArchiveCopy(config, copy / "repo")
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def restore_to_archive_end(config: Path, restore_dir: Path) -> pytest.ExceptionInfo[DRError]:
    """The restore flow to the end of the archive, with the server started; it must fail."""
    from flows.restore import restore_flow

    with pytest.raises(DRError) as err:
        restore_flow(
            config_path=str(config),
            backup="latest",
            pgdata=str(restore_dir),
            start=True,
            recovery_timeout=60,
        )
    return err


def phases(dsn: str) -> dict[str, int]:
    with connection(dsn) as conn:
        rows = conn.execute("SELECT phase, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def restored_dsn(report: Any) -> str:
    return f"host=127.0.0.1 port={report.port} user=postgres dbname=postgres"


def run_restore(arch: Archiving, pgdata: Path, **target: Any) -> Any:
    from flows.restore import restore_flow

    return restore_flow(
        config_path=str(arch.config),
        backup="latest",
        pgdata=str(pgdata),
        start=True,
        recovery_timeout=120,
        **target,
    )


# ---------------------------------------------------------------- targets


def test_restore_to_time_has_exactly_rows_committed_before_it(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    # GIVEN rows a..e, with T noted between c and d
    target: datetime = history.marks["time"]
    # WHEN restoring the latest backup to T
    report = run_restore(history, restore_dir, target_time=target.isoformat())
    # THEN exactly a, b, c are there, and the server's own record proves where it stopped
    assert phases(restored_dsn(report)) == {"a": 5, "b": 5, "c": 5}
    assert report.stop_message and report.stop_message.startswith("recovery stopping before commit")
    assert report.last_xact_time is not None and datetime.fromisoformat(report.last_xact_time) <= target
    assert report.timeline == 2 and report.archive_used


def test_restore_to_named_restore_point(prefect_harness: None, history: Archiving, restore_dir: Path) -> None:
    report = run_restore(history, restore_dir, target_name="rp-b")
    assert phases(restored_dsn(report)) == {"a": 5, "b": 5}
    assert (
        report.stop_message
        == 'recovery stopping at restore point "rp-b", time ' + report.stop_message.split(", time ")[1]
    )


def test_restore_to_lsn_includes_the_transaction_before_it(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    report = run_restore(history, restore_dir, target_lsn=history.marks["lsn"])
    assert phases(restored_dsn(report)) == {"a": 5, "b": 5, "c": 5, "d": 5}
    assert "recovery stopping after WAL location" in (report.stop_message or "")


def test_restore_to_end_of_archive_has_every_row_before_the_last_switch(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    report = run_restore(history, restore_dir)
    assert phases(restored_dsn(report)) == {"a": 5, "b": 5, "c": 5, "d": 5, "e": 5}
    assert report.stop_message is None and report.reached_lsn is not None
    # the restored copy does not archive its new timeline into the source's archive
    assert not list(history.repo_dir.glob("wal/00000002/*"))


def test_restore_cli_to_time_reports_the_point_reached(history: Archiving, restore_dir: Path) -> None:
    # the whole command as an operator runs it (one Prefect ephemeral start, ~10 s)
    target: datetime = history.marks["time"]
    proc = run_cli(
        "restore",
        "latest",
        "--pgdata",
        str(restore_dir),
        "--target-time",
        target.isoformat(),
        "--start",
        config=history.config,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recovered to time" in proc.stdout and "recovery stopping before commit" in proc.stdout
    port = int(proc.stdout.split("server running on port ")[1].split()[0].rstrip(","))
    assert phases(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") == {"a": 5, "b": 5, "c": 5}


# ---------------------------------------------------------------- clear errors before any work


def test_target_options_are_mutually_exclusive(history: Archiving, restore_dir: Path) -> None:
    proc = run_cli(
        "restore",
        "latest",
        "--pgdata",
        str(restore_dir),
        "--target-time",
        "2026-01-01T00:00:00Z",
        "--target-lsn",
        "0/1",
        config=history.config,
    )
    assert_one_line_error(proc, "not allowed with argument")


def test_target_before_the_only_backup_is_a_clear_error(history: Archiving, restore_dir: Path) -> None:
    backup: Manifest = history.marks["backup"]
    before = backup.start_time.isoformat()
    proc = run_cli(
        "restore", "latest", "--pgdata", str(restore_dir), "--target-time", before, config=history.config
    )
    assert_one_line_error(proc, "no backup ended before the target time")
    proc = run_cli(
        "restore",
        backup.id,
        "--pgdata",
        str(restore_dir),
        "--target-lsn",
        backup.start_lsn or "0/0",
        config=history.config,
    )
    assert_one_line_error(proc, "before the end of backup")
    assert not restore_dir.exists() or not any(restore_dir.iterdir())


def test_target_lsn_past_the_archive_is_a_clear_error(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    with pytest.raises(DRError, match="past the end of the archive"):
        run_restore(history, restore_dir, target_lsn="FF/0")


def test_target_time_past_the_end_of_the_archive_fails_clearly(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    # GIVEN a time after every archived commit (nothing in the archive reaches it)
    target = history.sql("SELECT clock_timestamp()")[0][0]
    # WHEN restoring to it THEN the server's refusal is explained, not passed off as success
    with pytest.raises(DRError, match="past the end of the WAL archive"):
        run_restore(history, restore_dir, target_time=target.isoformat())


def test_invalid_target_values_are_rejected(history: Archiving, restore_dir: Path) -> None:
    proc = run_cli(
        "restore", "latest", "--pgdata", str(restore_dir), "--target-time", "yesterday", config=history.config
    )
    assert_one_line_error(proc, "invalid target time")
    proc = run_cli(
        "restore", "latest", "--pgdata", str(restore_dir), "--target-lsn", "12", config=history.config
    )
    assert_one_line_error(proc, "invalid LSN")


# ---------------------------------------------------------------- a corrupt archive stops recovery


def test_corrupt_segment_stops_recovery_instead_of_promoting_early(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    # GIVEN a copy of the archive where a segment recovery needs is corrupt
    with archive_copy(history, "gravl-test-pitr-corrupt-") as copy:
        backup: Manifest = history.marks["backup"]
        needed = copy.segments_after(backup.stop_wal)[0]
        data = bytearray(needed.read_bytes())
        data[len(data) // 2] ^= 0xFF
        needed.write_bytes(bytes(data))

        # WHEN restoring to the end of the archive
        err = restore_to_archive_end(copy.config, restore_dir)
        # THEN recovery stopped (wal-fetch exited > 125) and the server is not up promoted
        log = (restore_dir.parent / "data.log").read_text()
        assert "corrupt" in log or "cannot decompress" in log, log[-3000:]
        assert "exit 255" in log
        assert "database system is ready to accept connections" not in log
        assert "recovery stopped: fetching WAL failed" in str(err.value), str(err.value)


def test_missing_segment_leaves_no_promoted_server_running(
    prefect_harness: None, history: Archiving, restore_dir: Path
) -> None:
    # GIVEN a copy of the archive with a segment after the backup deleted (a gap: wal-fetch
    # truly answers "not archived", so PostgreSQL ends recovery there and promotes)
    with archive_copy(history, "gravl-test-pitr-gap-restore-") as copy:
        backup: Manifest = history.marks["backup"]
        copy.segments_after(backup.stop_wal)[1].unlink()

        # WHEN restoring to the end of the archive and starting the server
        err = restore_to_archive_end(copy.config, restore_dir)
        # THEN the failure says it stopped short, and the server is not left up and writable
        assert "stopped short" in str(err.value), str(err.value)
        assert not LocalCluster(restore_dir, 1).is_running()
        assert "restored server was stopped" in str(err.value), str(err.value)


# ---------------------------------------------------------------- wal-check


def test_wal_check_passes_on_a_healthy_archive(history: Archiving) -> None:
    proc = run_cli("wal-check", "--json", config=history.config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    doc = json.loads(proc.stdout)
    assert doc["gaps"] == [] and doc["problems"] == []
    assert doc["last_archived_verified"] is True
    assert doc["start_wal"] == history.marks["backup"].start_wal


def test_wal_check_names_a_gap_and_fails(history: Archiving) -> None:
    # GIVEN a copy of the archive with one segment after the backup's start deleted
    with archive_copy(history, "gravl-test-pitr-gap-") as copy:
        backup: Manifest = history.marks["backup"]
        segs = copy.segments_after(backup.start_wal)
        victim = segs[len(segs) // 2]
        victim.unlink()
        # WHEN checking the archive
        proc = run_cli("wal-check", "--no-server", config=copy.config)
        # THEN the gap is named, as one error line, with a non-zero exit
        assert_one_line_error(proc, victim.name[:24], "missing")
        assert f"GAP timeline 1: {victim.name[:24]} missing" in proc.stdout


def test_wal_check_catches_an_archived_file_missing_from_the_repository(history: Archiving) -> None:
    # GIVEN the server reports a file archived that the repository (a copy) does not have
    with archive_copy(history, "gravl-test-pitr-silent-") as copy:
        last = history.sql("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
        for p in (copy.repo / "wal").glob(f"*/{last}*"):
            p.unlink()
        proc = run_cli("wal-check", config=copy.config)
        assert_one_line_error(proc, last, "not usable")
