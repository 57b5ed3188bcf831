"""The end of a WAL prefetcher: it exits when recovery ends, and the restore stops one that does not.

Real prefetcher processes (`gravl-dr wal-fetch-daemon`, as restore_command starts them) on a
pg_wal inside a data-directory-shaped folder with a file repository; recovery ending is the signal
file going away, as PostgreSQL does it at promotion.
"""

from __future__ import annotations

import contextlib
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
from tasks.recovery import (
    adopt_early_prefetcher,
    clear_prefetch,
    end_early_prefetcher,
    spawn_early_prefetcher,
)
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


def _exited(pid: int, seconds: float) -> bool:
    """Whether our child ``pid`` exits (and is reaped) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            return not Path(f"/proc/{pid}").exists()
        time.sleep(0.05)
    return False


def test_an_early_prefetcher_waits_for_the_recovery_settings_without_the_lock_then_serves(
    pgdata: Path,
) -> None:
    # GIVEN a prefetcher the restore starts before its data step (which then hides the
    # interpreter's and the repository client's start)
    pg_wal = pgdata / "pg_wal"
    config = str(pgdata.parent / "gravl-dr.yaml")
    pid = spawn_early_prefetcher(pgdata, config, "root", {})
    assert pid is not None
    try:
        time.sleep(3)
        # THEN while there is no recovery to serve it waits: no lock, no window, no pid file
        assert not _exited(pid, 0.1)
        assert not walspool.lock_held(pg_wal, walspool.PREFETCHER_LOCK)
        assert not (pg_wal / "gravl-dr" / "prefetch" / "window").exists()
        assert walspool.prefetcher_pid(pg_wal) is None
        # WHEN the restore writes recovery.signal, names it in the pid file and primes the prefetch
        (pgdata / "recovery.signal").touch()
        assert adopt_early_prefetcher(pgdata, pid, "root")
        assert walspool.prefetcher_pid(pg_wal) == pid  # restore_command waits for this one
        walspool.prime_prefetch(pgdata, "000000010000000000000002")
        # THEN it serves (it holds the lock and lists its window) before any server started
        deadline = time.monotonic() + 30
        while not (pg_wal / "gravl-dr" / "prefetch" / "window").exists():
            assert time.monotonic() < deadline, "the early prefetcher did not start serving"
            assert not _exited(pid, 0.05), (pg_wal / "gravl-dr" / "prefetcher.log").read_text()
        assert walspool.our_prefetcher(pg_wal) == pid
        log_text = (pg_wal / "gravl-dr" / "prefetcher.log").read_text()
        assert "has its repository open before its server started" in log_text, log_text
        # AND it still ends with the recovery (the restore tells it once the server promoted)
        assert clear_prefetch(pgdata, timeout=10) is None
        assert _exited(pid, 5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        _exited(pid, 5)


def test_an_early_prefetcher_never_outlives_a_restore_that_did_not_start_recovery(pgdata: Path) -> None:
    pg_wal = pgdata / "pg_wal"
    config = str(pgdata.parent / "gravl-dr.yaml")
    # GIVEN early prefetchers whose restore fails before it writes the recovery settings
    failed = spawn_early_prefetcher(pgdata, config, "root", {})
    cleared = spawn_early_prefetcher(pgdata, config, "root", {})
    assert failed is not None and cleared is not None
    try:
        # WHEN the restore fails: THEN it ends the one it started
        end_early_prefetcher(pgdata, failed)
        assert not Path(f"/proc/{failed}").exists()
        # WHEN the drill's teardown clears the prefetch folder of one the pid file names
        assert adopt_early_prefetcher(pgdata, cleared, "root")
        stopped = clear_prefetch(pgdata, timeout=10)
        # THEN it exits by itself (nothing had to be killed) and never took the lock
        assert stopped is None
        assert _exited(cleared, 5)
        assert not walspool.lock_held(pg_wal, walspool.PREFETCHER_LOCK)
    finally:
        for pid in (failed, cleared):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            _exited(pid, 5)
    # AND one whose restore process is killed exits by itself, without serving
    restore = subprocess.Popen(["sleep", "600"])
    daemon = subprocess.Popen(
        [GRAVL_DR, "--config", config, "-v", "wal-fetch-daemon", str(pg_wal)]
        + ["--await-recovery", "600", "--restore-pid", str(restore.pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        restore.kill()
        restore.wait()
        _out, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
        assert "did not start recovery" in err
        assert not (pg_wal / "gravl-dr" / "prefetch" / "window").exists()
    finally:
        daemon.kill()
        daemon.wait()
