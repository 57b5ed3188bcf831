"""Unit tier: pure decisions and parsers that had no test of their own — backup lock staleness,
the wal-push/wal-fetch fast-path argument split, the look-ahead spool marks, pg_controldata and
pg_waldump output, the backup report and the markdown tables of the failover/failback reports, poll_until and the Prefect defaults."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from flows.backup import BackupReport
from flows.backup import _markdown as backup_markdown
from flows.cli.wal import _int_option, _split
from flows.prefect_env import PREFECT_DEFAULTS, apply_prefect_defaults
from tasks.backup import STALE_LOCK_SECONDS, lock_is_stale
from tasks.polling import poll_until
from tasks.topology import parse_controldata, waldump_end
from tasks.walarchive import PushResult
from tasks.walspool import already_archived, mark_archived, prune_spool, ready_files, spool_root

pytestmark = pytest.mark.unit

SEGMENT = "000000010000000000000003"


# ---------------------------------------------------------------- backup lock


def _never_a_pid() -> int:
    # pids are below kernel.pid_max: this one names no process, ever
    return int(Path("/proc/sys/kernel/pid_max").read_text())


@pytest.mark.parametrize(
    ("lock", "stale"),
    [
        ({"corrupt": True}, True),
        ({"host": "elsewhere", "pid": 1, "epoch": time.time() - STALE_LOCK_SECONDS - 60}, True),
        ({"host": "elsewhere", "pid": 1, "epoch": time.time() - 60}, False),
        ({"host": "elsewhere", "pid": 1}, True),  # no epoch: as old as 1970
    ],
)
def test_lock_staleness_by_age(lock: dict[str, Any], stale: bool) -> None:
    assert lock_is_stale(lock) is stale


def test_a_lock_of_this_host_is_stale_once_its_process_is_gone() -> None:
    here = socket.gethostname()
    assert not lock_is_stale({"host": here, "pid": os.getpid(), "epoch": time.time()})
    assert lock_is_stale({"host": here, "pid": _never_a_pid(), "epoch": time.time()})


def test_a_fresh_lock_of_another_host_is_respected_whatever_its_pid() -> None:
    # the pid means nothing here: another host's process cannot be probed
    assert not lock_is_stale(
        {"host": "elsewhere-" + socket.gethostname(), "pid": _never_a_pid(), "epoch": time.time()}
    )


# ---------------------------------------------------------------- CLI fast path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["wal-push", "pg_wal/X"], (None, False, ["wal-push", "pg_wal/X"])),
        (["--config", "c.yaml", "-v", "wal-fetch", "A", "B"], ("c.yaml", True, ["wal-fetch", "A", "B"])),
        (["--config=c.yaml", "--verbose", "wal-push", "X"], ("c.yaml", True, ["wal-push", "X"])),
        (
            ["wal-push", "--sync", "X"],
            (None, False, ["wal-push", "--sync", "X"]),
        ),  # options after the command stay
        (["--help"], None),  # any other global option: the parser answers
        (["-x", "wal-push", "X"], None),
        (["--config"], None),  # --config without a value is not simple
    ],
)
def test_fast_path_split(argv: list[str], expected: tuple[str | None, bool, list[str]] | None) -> None:
    assert _split(argv) == expected


@pytest.mark.parametrize(
    ("rest", "value", "left"),
    [
        (["A", "B"], 4, ["A", "B"]),
        (["A", "--prefetch", "8", "B"], 8, ["A", "B"]),
        (["A", "B", "--prefetch=0"], 0, ["A", "B"]),
        (["A", "--prefetch", "x", "B"], None, ["A", "B"]),
        (["A", "--prefetch=-1"], None, ["A"]),
        (["A", "--prefetch"], 4, ["A", "--prefetch"]),  # a dangling flag is left for the usage check
    ],
)
def test_fast_path_int_option(rest: list[str], value: int | None, left: list[str]) -> None:
    assert _int_option(rest, "--prefetch", 4) == value
    assert rest == left


# ---------------------------------------------------------------- spool marks


def _pg_wal(tmp_path: Path) -> Path:
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "archive_status").mkdir(parents=True)
    return pg_wal


def _pushed(name: str) -> PushResult:
    return PushResult(
        name=name, key=f"wal/00000001/{name}.zst", outcome="stored", raw_size=3, stored_size=3, seconds=0.0
    )


def test_a_mark_vouches_only_for_the_same_file_under_the_same_config(tmp_path: Path) -> None:
    # GIVEN a segment marked archived under config stamp "a"
    pg_wal = _pg_wal(tmp_path)
    seg = pg_wal / SEGMENT
    seg.write_bytes(b"one")
    assert not already_archived(seg, "a")
    mark_archived(seg, _pushed(SEGMENT), "a")
    # THEN it is trusted under that config only
    assert already_archived(seg, "a")
    assert not already_archived(seg, "b")
    # WHEN PostgreSQL recycles the name for different content (new inode)
    seg.unlink()
    seg.write_bytes(b"two, longer")
    # THEN the mark no longer vouches for it
    assert not already_archived(seg, "a")


def test_a_torn_mark_reads_as_absent(tmp_path: Path) -> None:
    pg_wal = _pg_wal(tmp_path)
    seg = pg_wal / SEGMENT
    seg.write_bytes(b"one")
    mark_archived(seg, _pushed(SEGMENT), "a")
    (spool_root(pg_wal) / "archived" / f"{SEGMENT}.ok").write_bytes(b'{"config": "a", "ino"')
    assert not already_archived(seg, "a")


def test_prune_forgets_marks_of_removed_files_and_old_temporaries(tmp_path: Path) -> None:
    pg_wal = _pg_wal(tmp_path)
    kept, gone = pg_wal / SEGMENT, pg_wal / "000000010000000000000004"
    for f in (kept, gone):
        f.write_bytes(b"x")
        mark_archived(f, _pushed(f.name), "a")
    gone.unlink()
    folder = spool_root(pg_wal) / "archived"
    old_tmp, new_tmp = folder / ".x.1.tmp", folder / ".x.2.tmp"
    old_tmp.write_bytes(b"")
    new_tmp.write_bytes(b"")
    os.utime(old_tmp, (time.time() - 7200, time.time() - 7200))
    assert prune_spool(pg_wal) == 1
    assert sorted(p.name for p in folder.iterdir()) == [".x.2.tmp", f"{SEGMENT}.ok"]
    assert prune_spool(tmp_path / "no-such-pg_wal") == 0


def test_ready_files_come_in_the_archivers_order(tmp_path: Path) -> None:
    # pgarch.c: timeline history files first, then the oldest segment; anything else is ignored
    pg_wal = _pg_wal(tmp_path)
    for name in (
        "000000020000000000000005",
        "000000010000000000000004.partial",
        "00000002.history",
        "000000010000000000000003",
        "RECOVERYXLOG",
        "000000010000000000000002.00000028.backup",
    ):
        (pg_wal / "archive_status" / f"{name}.ready").write_bytes(b"")
    (pg_wal / "archive_status" / "000000010000000000000001.done").write_bytes(b"")
    assert ready_files(pg_wal) == [
        "00000002.history",
        "000000010000000000000002.00000028.backup",
        "000000010000000000000003",
        "000000010000000000000004.partial",
        "000000020000000000000005",
    ]
    assert ready_files(tmp_path / "nowhere") == []


# ---------------------------------------------------------------- pg_controldata / pg_waldump

CONTROLDATA = """\
pg_control version number:            1300
Catalog version number:               202209061
Database system identifier:           7311234567890123456
Database cluster state:               shut down in recovery
pg_control last modified:             Sun 29 Nov 2026 03:00:01 AM UTC
Latest checkpoint location:           0/5000060
Latest checkpoint's TimeLineID:       2
Minimum recovery ending location:     0/5000110
wal_log_hints setting:                off
Bytes per WAL segment:                16777216
"""


def test_controldata_keys_and_values_keep_colons_inside_values() -> None:
    ctl = parse_controldata(CONTROLDATA)
    assert ctl["Database cluster state"] == "shut down in recovery"
    assert ctl["pg_control last modified"] == "Sun 29 Nov 2026 03:00:01 AM UTC"
    assert ctl["Latest checkpoint's TimeLineID"] == "2"
    assert ctl["Bytes per WAL segment"] == "16777216"
    assert parse_controldata("") == {}


WALDUMP = """\
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/05000028, prev 0/04000110, desc: RUNNING_XACTS
rmgr: Heap        len (rec/tot):     54/   254, tx:        735, lsn: 0/05000060, prev 0/05000028, desc: INSERT off 2
rmgr: XLOG        len (rec/tot):    114/   114, tx:          0, lsn: 0/050001F0, prev 0/05000060, desc: CHECKPOINT_SHUTDOWN
pg_waldump: error: error in WAL record at 0/50001F0: invalid record length at 0/5000268
"""


def test_waldump_end_is_the_last_record_start_plus_its_total_length() -> None:
    assert waldump_end(WALDUMP) == "0/5000262"  # 0x50001F0 + 114
    assert waldump_end("pg_waldump: error: could not find a valid record after 0/5000000\n") is None
    # a record that crosses into the next 4 GB keeps the carry
    line = "rmgr: XLOG len (rec/tot):     30/    30, tx:          0, lsn: 0/FFFFFFF0, prev 0/0, desc: X"
    assert waldump_end(line) == "1/E"


# ---------------------------------------------------------------- poll_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_poll_until_returns_the_first_true_answer() -> None:
    fake, answers = FakeClock(), iter([None, 0, "", "lsn 0/10", "later"])
    assert (
        poll_until(lambda: next(answers), timeout=10, interval=1, clock=fake.clock, sleep=fake.sleep)
        == "lsn 0/10"
    )
    assert fake.sleeps == [1, 1, 1]


def test_poll_until_gives_up_at_the_deadline_after_a_last_check_and_never_sleeps_past_it() -> None:
    fake, calls = FakeClock(), []

    def never() -> bool:
        calls.append(fake.now)
        return False

    assert poll_until(never, timeout=2.5, interval=1, clock=fake.clock, sleep=fake.sleep) is None
    assert calls == [100.0, 101.0, 102.0, 102.5]  # the last check is at the deadline itself
    assert fake.sleeps == [1, 1, 0.5]


def test_poll_until_checks_once_even_with_no_time_left() -> None:
    fake = FakeClock()
    assert poll_until(lambda: True, timeout=0, interval=1, clock=fake.clock, sleep=fake.sleep) is True
    assert poll_until(lambda: None, timeout=0, interval=1, clock=fake.clock, sleep=fake.sleep) is None
    assert fake.sleeps == []


# ---------------------------------------------------------------- Prefect environment defaults


def test_prefect_defaults_fill_gaps_and_never_override_the_operator() -> None:
    env = {"DO_NOT_TRACK": "0", "PATH": "/usr/bin"}
    apply_prefect_defaults(env)
    assert env["DO_NOT_TRACK"] == "0" and env["PATH"] == "/usr/bin"
    assert {k: env[k] for k in PREFECT_DEFAULTS if k != "DO_NOT_TRACK"} == {
        k: v for k, v in PREFECT_DEFAULTS.items() if k != "DO_NOT_TRACK"
    }
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tasks,flows"  # our loggers reach the Prefect UI


# ---------------------------------------------------------------- the backup report


def test_backup_report_states_sizes_ratio_and_throughput() -> None:
    report = BackupReport(
        backup_id="20261129T020000Z-physical",
        kind="physical",
        dry_run=False,
        raw_bytes=400 * 2**20,
        stored_bytes=100 * 2**20,
        stream_seconds=4.0,
        verify_seconds=1.5,
        total_seconds=6.0,
        start_lsn="0/2000028",
        stop_lsn="0/2000100",
        messages=["data checksums on"],
    )
    text = backup_markdown(report, "s3://bucket/gravl")
    assert text.startswith("# Backup 20261129T020000Z-physical: complete\n")
    assert "| stored size | 100.0 MiB (ratio 4.00) |" in text and "| stream | 4.0 s (100 MiB/s) |" in text
    assert "| WAL | 0/2000028 .. 0/2000100 |" in text and "- data checksums on" in text
    assert "What failed" not in text


def test_backup_report_of_a_failure_or_a_dry_run_never_divides_by_zero() -> None:
    empty = BackupReport(backup_id="20261129T020000Z-logical", kind="logical", dry_run=True)
    assert ": dry run: nothing written" in backup_markdown(empty, "file:///r").splitlines()[0]
    failed = backup_markdown(empty, "file:///r", error="pg_dump: connection refused")
    assert "FAILED" in failed.splitlines()[0] and "(ratio 0.00)" in failed and "| WAL | - .. - |" in failed
    assert (
        "## What failed\n`pg_dump: connection refused`" in failed
        and "Nothing of this attempt is listed" in failed
    )
