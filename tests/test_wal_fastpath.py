"""The restore_command fast path (tasks/walserve.py) against real PostgreSQL recovery.

A real primary archives through wal-push; each test restores its backup with `gravl-dr restore`
(which writes restore_command = `python -I -S walserve.py … wal-fetch %f %p`), may plant a
file in the prefetch folder first, starts the server and checks what recovery reached. A
planted file carries a mark that passes every mark check (this config, this boot, this very
file), so only the page-header check stands between it and PostgreSQL.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_pitr import (
    Archiving,
    archive_copy,
    private_restore_dir,
    start_archiving_primary,
    stop_archiving,
    switch_and_wait,
    take_backup,
)

from gravl_testlib import write_config
from tasks import walserve, walspool
from tasks.backup import resolve_backup
from tasks.config import load_config
from tasks.errors import DRError
from tasks.pgcluster import LocalCluster, chown_tree, free_port
from tasks.postgres import connection
from tasks.recovery import RecoveryTarget, write_recovery_settings
from tasks.repository import open_repository
from tasks.restore import restore_physical
from tasks.walarchive import find_object, push_file
from tasks.walformat import WalSettings, decode_object

PG_USER = "postgres"
ROWS_PER_SEGMENT = 3
SEGMENTS_AFTER_BACKUP = 6


@pytest.fixture(scope="module")
def archive() -> Iterator[Archiving]:
    arch = start_archiving_primary("gravl-test-fastpath-")
    try:
        arch.sql("CREATE TABLE t (seg int, n int)")
        arch.marks["backup"] = take_backup(arch)
        for seg in range(SEGMENTS_AFTER_BACKUP):
            arch.sql("INSERT INTO t SELECT %s, g FROM generate_series(1, %s) g", seg, ROWS_PER_SEGMENT)
            switch_and_wait(arch)
        yield arch
    finally:
        stop_archiving(arch)


@pytest.fixture
def restore_dir() -> Iterator[Path]:
    yield from private_restore_dir("gravl-test-fastpath-restore-")


def restore(arch: Archiving, pgdata: Path, config: Path | None = None) -> None:
    """The restore flow's steps as plain functions: extract the latest backup, write the
    recovery settings (restore_command is the fast path)."""
    config = config or arch.config
    cfg = load_config(str(config))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, "latest", cluster=cfg.cluster)
    restore_physical(cfg, repo, manifest, pgdata)
    write_recovery_settings(pgdata, config_path=str(config), target=RecoveryTarget(), os_user=PG_USER)
    auto = (pgdata / "postgresql.auto.conf").read_text()
    assert "walserve.py" in auto and " -I -S " in auto


def recover(pgdata: Path) -> tuple[LocalCluster, str]:
    """Start the restored server and wait until it promoted; (cluster, its log)."""
    cluster = LocalCluster(pgdata, free_port())
    with open(pgdata / "postgresql.auto.conf", "a") as fh:
        fh.write(f"\nport = {cluster.port}\n")
    cluster.start(timeout=120)
    deadline = time.monotonic() + 120
    while True:
        with connection(cluster.dsn("postgres")) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,):
                break
        assert time.monotonic() < deadline, cluster.log_tail(20)
        time.sleep(0.1)
    return cluster, cluster.logfile.read_text(errors="replace")


def rows(cluster: LocalCluster) -> int:
    with connection(cluster.dsn("postgres")) as conn:
        row = conn.execute("SELECT count(*) FROM t").fetchone()
    return int(row[0]) if row else -1


def archived_raw(arch: Archiving, name: str) -> bytes:
    repo = open_repository(arch.cfg.repository)
    key = find_object(repo, name, WalSettings())
    assert key is not None, name
    _header, raw = decode_object(repo.iter_object(key), WalSettings(), name)
    return b"".join(raw)


def plant(pgdata: Path, config: Path, name: str, data: bytes, stamp_of: Path | None = None) -> Path:
    """A prefetched file whose mark passes every mark check (config version, boot, the file)."""
    folder = pgdata / "pg_wal" / "gravl-dr" / "prefetch"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    mark = walserve.mark_text(walserve.config_stamp(str(stamp_of or config)), path.stat(), "sha256", "0" * 64)
    (folder / f"{name}{walserve.MARK_SUFFIX}").write_text(mark)
    chown_tree(pgdata / "pg_wal" / "gravl-dr", PG_USER)
    return path


def first_requested(arch: Archiving) -> str:
    start = arch.marks["backup"].start_wal
    assert start
    return str(start)


def test_recovery_through_the_fast_path_replays_every_segment(archive: Archiving, restore_dir: Path) -> None:
    # GIVEN a restored backup whose restore_command is the fast path
    restore(archive, restore_dir)
    # WHEN the server recovers to the end of the archive
    cluster, log = recover(restore_dir)
    # THEN every row is there, and the segments after the first came from the prefetcher
    assert rows(cluster) == ROWS_PER_SEGMENT * SEGMENTS_AFTER_BACKUP
    plog_path = restore_dir / "pg_wal" / "gravl-dr" / "prefetcher.log"
    deadline = time.monotonic() + 30  # the prefetcher exits a few seconds after recovery.signal went
    while walspool.prefetcher_pid(restore_dir / "pg_wal") is not None:
        assert time.monotonic() < deadline, plog_path.read_text()
        time.sleep(0.1)
    plog = plog_path.read_text()
    # (a second prefetcher started in a race exits at once, prefetching 0: the most is the one)
    prefetched = max(int(part.split()[0]) for part in plog.split("exits after prefetching ")[1:])
    assert prefetched >= SEGMENTS_AFTER_BACKUP - 2, plog
    assert "not served" not in log


@pytest.mark.parametrize("how", ["other-system", "later-timeline", "other-segment", "other-config"])
def test_a_foreign_or_stale_prefetched_segment_is_never_served(
    archive: Archiving, restore_dir: Path, how: str
) -> None:
    # GIVEN a restored backup and, in its prefetch folder under the name recovery asks for
    # first, a segment that does not belong there, marked as verified
    restore(archive, restore_dir)
    name = first_requested(archive)
    data = bytearray(archived_raw(archive, name))
    stamp_of = None
    if how == "other-system":  # xlp_sysid of another cluster
        sysid = struct.unpack_from("<Q", data, 24)[0]
        struct.pack_into("<Q", data, 24, sysid ^ 0x5A5A)
    elif how == "later-timeline":  # written on a timeline after the one in its name
        struct.pack_into("<I", data, 4, int(name[:8], 16) + 1)
    elif how == "other-segment":  # the next segment's content under this name
        following = f"{name[:16]}{int(name[16:], 16) + 1:08X}"
        data = bytearray(archived_raw(archive, following))
    else:  # prefetched under another configuration (another repository)
        other = write_config(
            restore_dir.parent / "other.yaml",
            {"cluster": "x", "primary": {"dsn": "host=h"}, "repository": {"url": "file:///x"}},
        )
        stamp_of = other
    planted = plant(restore_dir, archive.config, name, bytes(data), stamp_of=stamp_of)
    # WHEN the server recovers
    cluster, log = recover(restore_dir)
    # THEN the planted file was refused (and removed), the archive's copy replayed, every row is there
    assert rows(cluster) == ROWS_PER_SEGMENT * SEGMENTS_AFTER_BACKUP
    assert "different database system" not in log and "unexpected timeline" not in log
    assert f"prefetched {name} not served" in log, log[-3000:]
    assert not planted.exists()


def test_fast_path_imports_nothing_beyond_the_core_and_serves_a_real_segment(
    archive: Archiving, restore_dir: Path
) -> None:
    # GIVEN a restored data directory and a genuine archived segment, prefetched and marked
    restore(archive, restore_dir)
    name = first_requested(archive)
    plant(restore_dir, archive.config, name, archived_raw(archive, name))
    dest = restore_dir / "pg_wal" / "RECOVERYXLOG"
    # WHEN restore_command's program serves it
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-X",
            "importtime",
            walserve.__file__,
            "--config",
            str(archive.config),
            "wal-fetch",
            name,
            "pg_wal/RECOVERYXLOG",
        ],
        cwd=restore_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # THEN it is moved into place, with only the interpreter's core modules imported
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert dest.read_bytes() == archived_raw(archive, name)
    baseline = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", "-c", "import os, struct"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stderr
    allowed = {ln.split("|")[-1].strip() for ln in baseline.splitlines() if "import time:" in ln}
    modules = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if "import time:" in ln}
    assert modules - allowed <= {"__future__"}, modules - allowed


def test_an_archived_segment_of_another_cluster_stops_recovery(archive: Archiving, restore_dir: Path) -> None:
    # GIVEN a copy of the repository in which the first segment recovery needs was replaced by
    # a segment of another cluster (another system identifier), stored and checksummed as usual
    with archive_copy(archive, "gravl-test-fastpath-foreign-") as copy:
        name = first_requested(archive)
        data = bytearray(archived_raw(archive, name))
        struct.pack_into("<Q", data, 24, struct.unpack_from("<Q", data, 24)[0] ^ 0x5A5A)
        for obj in (copy.repo / "wal").rglob(f"{name}*"):
            obj.unlink()
        (copy.base / name).write_bytes(bytes(data))
        repo = open_repository(load_config(str(copy.config)).repository)
        push_file(repo, copy.base / name, WalSettings())
        chown_tree(copy.base, PG_USER)
        restore(archive, restore_dir, config=copy.config)
        # WHEN the server recovers
        cluster = LocalCluster(restore_dir, free_port())
        with open(restore_dir / "postgresql.auto.conf", "a") as fh:
            fh.write(f"\nport = {cluster.port}\n")
        with pytest.raises(DRError):  # pg_ctl reports the failed start
            cluster.start(timeout=60)
        # THEN wal-fetch exited 255 naming the reason, and recovery stopped instead of ending early
        log = cluster.logfile.read_text(errors="replace")
        assert "does not belong to this cluster" in log and "exit 255" in log, log[-3000:]
        assert "database system is ready to accept connections" not in log


def test_fast_path_never_answers_missing_itself(tmp_path: Path) -> None:
    # GIVEN no repository at all (the config file is missing)
    os.makedirs(tmp_path / "pg_wal")
    # WHEN the fast path is asked for a segment it does not hold
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            walserve.__file__,
            "--config",
            str(tmp_path / "none.yaml"),
            "wal-fetch",
            "000000010000000000000003",
            "pg_wal/RECOVERYXLOG",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # THEN the full command answers, and a missing config stops recovery (> 125), never 1
    assert proc.returncode > 125, proc.stderr
    assert "gravl-dr: error" in proc.stderr


@pytest.mark.parametrize("why", ["no-prefetcher", "earlier-look-up", "other-config"])
def test_a_missing_mark_answers_1_only_from_a_look_up_begun_after_the_request(
    tmp_path: Path, why: str
) -> None:
    # GIVEN a "not in the archive" mark for a segment from a look-up made before recovery asks,
    # and a config file that does not exist (so the full command, if it runs, stops recovery: > 125)
    config = tmp_path / "none.yaml"
    folder = tmp_path / "pg_wal" / "gravl-dr" / "prefetch"
    folder.mkdir(parents=True)
    name = "000000010000000000000007"
    mark = folder / f"{name}{walserve.MISSING_SUFFIX}"
    ask_file = folder / f"{name}{walserve.ASK_SUFFIX}"
    stamp_of = tmp_path / "other.yaml" if why == "other-config" else config
    if why == "other-config":
        stamp_of.write_text("x")
    mark.write_text(walserve.missing_text(walserve.config_stamp(str(stamp_of)), time.monotonic_ns()))
    # this test process plays the live prefetcher (or none: a dead pid)
    pid = os.getpid() if why != "no-prefetcher" else 999999
    (folder / walserve.WINDOW_FILE).write_text(f"{pid}\n")

    def restore_command() -> subprocess.Popen[str]:
        argv = ["--config", str(config), "wal-fetch", name, "pg_wal/RECOVERYXLOG"]
        return subprocess.Popen(
            [sys.executable, "-I", "-S", walserve.__file__, *argv],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def asked() -> int:
        deadline = time.monotonic() + 30
        while not ask_file.exists():
            assert time.monotonic() < deadline, "the fast path did not ask"
            time.sleep(0.002)
        return int(ask_file.read_text())

    # WHEN recovery asks for it
    proc = restore_command()
    if why == "earlier-look-up":
        # the fast path asks the prefetcher for a new look-up rather than trusting the mark; here
        # that look-up fails (the prefetcher drops the ask)
        asked()
        ask_file.unlink()
    elif why == "other-config":
        # a look-up begun after the request, but stamped for another config, is no answer: the
        # fast path keeps waiting until the (playing) prefetcher drops the ask
        since = asked()
        mark.write_text(walserve.missing_text(walserve.config_stamp(str(stamp_of)), since + 1))
        time.sleep(0.5)
        ask_file.unlink()
    # THEN the full command answers (never "missing" from a look-up older than the request)
    proc.communicate(timeout=60)
    assert proc.returncode > 125
    if why != "earlier-look-up":
        return
    # AND a look-up begun after the request answers 1 without the full command
    proc = restore_command()
    since = asked()
    mark.write_text(walserve.missing_text(walserve.config_stamp(str(config)), since + 1))
    proc.communicate(timeout=60)
    assert proc.returncode == 1
