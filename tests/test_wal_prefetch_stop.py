"""The end of a WAL prefetcher: it exits when recovery ends, and the restore stops one that does not.

Real prefetcher processes (`gravl-dr wal-fetch-daemon`, as restore_command starts them) on a
pg_wal inside a data-directory-shaped folder with a file repository; recovery ending is the signal
file going away, as PostgreSQL does it at promotion.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fault import S3FaultProxy

from gravl_testlib import GRAVL_DR, write_config
from tasks import walspool
from tasks.config import load_config
from tasks.recovery import clear_prefetch
from tasks.repository import open_repository
from tasks.walarchive import push_file
from tasks.walformat import WalSettings

pytestmark = pytest.mark.integration  # starts processes


@pytest.fixture
def pgdata(tmp_path: Path, file_repo_dir: Path) -> Iterator[Path]:
    (file_repo_dir / "wal").mkdir()
    data = tmp_path / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {"url": f"file://{file_repo_dir}"},
        },
    )
    yield data


def start_prefetcher(pgdata: Path) -> subprocess.Popen[bytes]:
    """As restore_command starts it: detached, -v (its log tells what it does)."""
    proc = subprocess.Popen(
        [
            GRAVL_DR,
            "--config",
            str(pgdata.parent / "gravl-dr.yaml"),
            "-v",
            "wal-fetch-daemon",
            str(pgdata / "pg_wal"),
            "--idle",
            "600",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while walspool.prefetcher_pid(pgdata / "pg_wal") != proc.pid:
        assert proc.poll() is None, "the prefetcher exited at once"
        assert time.monotonic() < deadline, "the prefetcher did not start"
        time.sleep(0.05)
    return proc


def exits_within(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.mark.parametrize("signal_file", ["recovery.signal", "standby.signal"])
def test_a_prefetcher_exits_when_its_recovery_or_standby_signal_goes(pgdata: Path, signal_file: str) -> None:
    # GIVEN a prefetcher serving a server in archive recovery, or a standby (its idle exit far away)
    (pgdata / signal_file).touch()
    proc = start_prefetcher(pgdata)
    try:
        # WHEN the server promotes (PostgreSQL removes the signal file)
        (pgdata / signal_file).unlink()
        # THEN the prefetcher exits at once (a promoted standby's used to idle out)
        assert exits_within(proc, 10)
        assert walspool.prefetcher_pid(pgdata / "pg_wal") is None
    finally:
        proc.kill()
        proc.wait()


def test_the_restore_ends_the_prefetcher_at_once_after_the_promotion(
    pgdata: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a prefetcher that would linger (its data directory still says recovery)
    (pgdata / "recovery.signal").touch()
    proc = start_prefetcher(pgdata)
    try:
        # WHEN the restore clears the prefetch folder after the promotion
        with caplog.at_level(logging.WARNING, logger="tasks.recovery"):
            started = time.monotonic()
            stopped = clear_prefetch(pgdata, timeout=10)
            took = time.monotonic() - started
        # THEN the prefetcher exits on its own at once (the restore used to wait up to 10 s)
        assert exits_within(proc, 5)
        assert stopped is None and took < 3
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not (pgdata / "pg_wal" / "gravl-dr" / "prefetch").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_restore_stops_a_prefetcher_stuck_on_the_repository_and_says_so(
    tmp_path: Path, s3_fault_proxy: S3FaultProxy, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a prefetcher in recovery on an S3 repository whose answer to the next segment hangs
    data = tmp_path / "data"
    (data / "pg_wal" / "archive_status").mkdir(parents=True)
    (data / "recovery.signal").touch()
    config = write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {"url": f"s3://{s3_bucket}/gravl", "endpoint_url": s3_fault_proxy.url},
        },
    )
    cfg = load_config(str(config))
    staged = tmp_path / "000000010000000000000002"
    staged.write_bytes(b"w" * 16 * 1024 * 1024)
    push_file(open_repository(cfg.repository), staged, WalSettings(codec=cfg.repository.compression))
    hang = s3_fault_proxy.add("GET", "000000010000000000000002", action="delay", delay=60, times=None)
    walspool.note_wanted(data / "pg_wal" / "RECOVERYXLOG", "000000010000000000000001")
    proc = start_prefetcher(data)
    try:
        deadline = time.monotonic() + 30
        while not s3_fault_proxy.fired(hang):
            assert time.monotonic() < deadline, "the prefetcher never asked for the segment"
            time.sleep(0.05)
        # WHEN the restore clears the prefetch folder after the promotion
        with caplog.at_level(logging.WARNING, logger="tasks.recovery"):
            stopped = clear_prefetch(data, timeout=1.0)
        # THEN it stops that prefetcher (it used to give up silently and leave it running),
        # naming its pid and what it was doing, and removes the folder
        assert stopped == proc.pid
        assert exits_within(proc, 5)
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert f"pid {proc.pid}" in warning and "had not exited" in warning
        assert "000000010000000000000002" in warning  # what it was fetching
        assert not (data / "pg_wal" / "gravl-dr" / "prefetch").exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_pid_file_never_gets_another_process_killed(pgdata: Path) -> None:
    # GIVEN a pid file naming a live process that is not a prefetcher (a reused pid), no lock held
    other = subprocess.Popen(["sleep", "60"])
    try:
        spool = walspool.spool_root(pgdata / "pg_wal")
        spool.mkdir(parents=True, exist_ok=True)
        (spool / walspool.PREFETCHER_PID).write_text(str(other.pid))
        (spool / walspool.PREFETCHER_LOCK).touch()
        # WHEN the restore clears the prefetch folder
        stopped = clear_prefetch(pgdata, timeout=0.5)
        # THEN that process lives on
        assert stopped is None
        assert other.poll() is None
        os.kill(other.pid, 0)
    finally:
        other.kill()
        other.wait()
