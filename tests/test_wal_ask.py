"""restore_command's cheap "not in the archive": the fast path asks the live prefetcher (S3).

A real prefetcher process (`gravl-dr wal-fetch-daemon`, as restore_command starts it) serves a
data-directory-shaped folder in recovery, against moto S3 over HTTP through the fault proxy;
restore_command is the real fast-path script (`python -I -S tasks/walserve.py ... wal-fetch`).
The contract under test: exit 1 ("not in the archive", which ends recovery) only from a look-up
of the repository that began after the request did; a file archived a moment ago is delivered,
never reported missing from an earlier look-up; any other trouble exits > 125.
A real server's recovery from S3 through this path is in test_restore_s3_replay below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fault import S3FaultProxy

from gravl_testlib import GRAVL_DR, write_config
from tasks import walserve, walspool
from tasks.config import load_config
from tasks.repository import open_repository
from tasks.walarchive import push_file
from tasks.walformat import WalSettings

pytestmark = pytest.mark.integration  # starts processes and servers

SEG = 16 * 1024 * 1024


def seg(segno: int) -> str:
    return f"00000001{segno // 256:08X}{segno % 256:08X}"


class Recovering:
    """A folder shaped like a data directory in archive recovery, with its prefetcher running."""

    def __init__(self, base: Path, endpoint: str, bucket: str, *, start: bool = True) -> None:
        self.data = base / "data"
        self.pg_wal = self.data / "pg_wal"
        (self.pg_wal / "archive_status").mkdir(parents=True)
        (self.data / "recovery.signal").touch()
        self.config = write_config(
            base / "gravl-dr.yaml",
            {
                "cluster": "gravl",
                "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
                "repository": {
                    "url": f"s3://{bucket}/gravl",
                    "endpoint_url": endpoint,
                    "region": "eu-north-1",
                },
            },
        )
        cfg = load_config(str(self.config))
        self.repo = open_repository(cfg.repository)
        self.settings = WalSettings(codec=cfg.repository.compression)
        self.staging = base / "staging"
        self.staging.mkdir()
        self.log = base / "prefetcher.log"
        # recovery is at segment 1: the prefetcher looks for segment 2 onwards
        walspool.note_wanted(self.pg_wal / "RECOVERYXLOG", seg(1))
        self.folder = walspool.spool_root(self.pg_wal) / "prefetch"
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [GRAVL_DR, "--config", str(self.config), "-v", "wal-fetch-daemon", str(self.pg_wal)],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 60
        while not (self.folder / walserve.WINDOW_FILE).exists():
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the prefetcher did not start"
            time.sleep(0.05)

    def archive(self, name: str, data: bytes) -> None:
        """Archive ``name`` directly (in-process, in milliseconds: no command start in between)."""
        path = self.staging / name
        path.write_bytes(data)
        push_file(self.repo, path, self.settings)

    def restore_command(self, name: str) -> tuple[int, bytes | None, str]:
        dest = self.pg_wal / "RECOVERYXLOG"
        dest.unlink(missing_ok=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-I",
                "-S",
                walserve.__file__,
                "--config",
                str(self.config),
                "wal-fetch",
                name,
                str(dest),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc.returncode, dest.read_bytes() if dest.exists() else None, proc.stderr

    def wait_for(self, path: Path, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert time.monotonic() < deadline, f"{path.name} never appeared: {self.log.read_text()[-2000:]}"
            time.sleep(0.01)

    def answered_by_prefetcher(self, name: str, log: Path | None = None) -> bool:
        return f"asked for {name}: not in the archive" in (log or self.log).read_text()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        pid = walspool.prefetcher_pid(self.pg_wal)  # one the fast path started
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def recovering(tmp_path: Path, s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> Iterator[Recovering]:
    rec = Recovering(tmp_path, s3_fault_proxy.url, s3_bucket)
    try:
        yield rec
    finally:
        rec.close()


def segment_bytes(name: str) -> bytes:
    block = (f"gravl wal {name} ".encode() * 300)[:4096]
    return block * (SEG // 4096)


def test_a_history_probe_is_answered_missing_by_the_prefetcher(recovering: Recovering) -> None:
    # GIVEN no history file for timeline 2 in the archive
    # WHEN recovery probes for it (as at its start and at its end)
    rc, got, err = recovering.restore_command("00000002.history")
    # THEN "not in the archive", from the prefetcher's look-up (no full command started)
    assert rc == 1, err
    assert got is None
    assert recovering.answered_by_prefetcher("00000002.history")


def test_a_history_file_archived_after_an_earlier_probe_is_delivered(recovering: Recovering) -> None:
    # GIVEN recovery's probe for timeline 2's history file was answered "not in the archive"
    assert recovering.restore_command("00000002.history")[0] == 1
    # WHEN the file is archived a moment later (a failover elsewhere) and recovery probes again
    history = b"1\t0/5000000\tno recovery target specified\n"
    recovering.archive("00000002.history", history)
    rc, got, err = recovering.restore_command("00000002.history")
    # THEN it is delivered: the earlier look-up's "missing" is not an answer to a later request
    # (the fast path used to answer 1 from any mark younger than 2 s: a recovery that misses the
    # new timeline)
    assert rc == 0, err
    assert got == history


def test_a_segment_archived_after_the_prefetcher_found_it_missing_is_delivered(
    recovering: Recovering,
) -> None:
    # GIVEN the prefetcher looked for segment 2 ahead of recovery and found it missing
    name = seg(2)
    recovering.wait_for(recovering.folder / f"{name}{walserve.MISSING_SUFFIX}")
    # WHEN it is archived and recovery asks for it at once
    data = segment_bytes(name)
    recovering.archive(name, data)
    rc, got, err = recovering.restore_command(name)
    # THEN it is delivered whole, never "not in the archive" (that would end recovery early)
    assert rc == 0, err
    assert got == data


def test_the_segment_after_the_end_of_the_archive_is_missing(recovering: Recovering) -> None:
    # GIVEN the archive ends before segment 2 (the prefetcher found it missing)
    name = seg(2)
    recovering.wait_for(recovering.folder / f"{name}{walserve.MISSING_SUFFIX}")
    # WHEN recovery asks for it
    rc, got, err = recovering.restore_command(name)
    # THEN "not in the archive", from a look-up begun after the request
    assert rc == 1, err
    assert got is None
    assert recovering.answered_by_prefetcher(name)


def test_a_failing_look_up_stops_recovery(recovering: Recovering, s3_fault_proxy: S3FaultProxy) -> None:
    # GIVEN the repository answers 500 to every request about the history file
    s3_fault_proxy.add(
        "*", r"00000002\.history", action="error", status=500, code="InternalError", times=None
    )
    s3_fault_proxy.add(
        "GET", "", query="list-type", action="error", status=500, code="InternalError", times=None
    )
    # WHEN recovery probes for it
    rc, got, err = recovering.restore_command("00000002.history")
    # THEN recovery stops (> 125), never "not in the archive"
    assert rc > 125, err
    assert got is None
    assert "gravl-dr: error" in err


def test_a_history_probe_with_no_prefetcher_running_starts_one_that_answers(
    tmp_path: Path, s3_fault_proxy: S3FaultProxy, s3_bucket: str
) -> None:
    # GIVEN a restored data directory in recovery, primed for prefetching, no prefetcher running
    # (the operator starts the server with pg_ctl after `gravl-dr restore`)
    rec = Recovering(tmp_path, s3_fault_proxy.url, s3_bucket, start=False)
    try:
        # WHEN PostgreSQL's first call probes for the next timeline's history file
        rc, got, err = rec.restore_command("00000002.history")
        # THEN the fast path started the prefetcher and the prefetcher's look-up answered
        # (one interpreter start, not the full command's and then the prefetcher's)
        assert rc == 1, err
        assert got is None
        pid = walspool.prefetcher_pid(rec.pg_wal)
        assert pid is not None
        spool_log = walspool.spool_root(rec.pg_wal) / walspool.PREFETCHER_LOG
        assert rec.answered_by_prefetcher("00000002.history", spool_log), spool_log.read_text()
        # AND a file archived meanwhile is still delivered
        history = b"1\t0/5000000\tno recovery target specified\n"
        rec.archive("00000002.history", history)
        rc, got, err = rec.restore_command("00000002.history")
        assert rc == 0, err
        assert got == history
    finally:
        rec.close()
