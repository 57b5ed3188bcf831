"""Unit tier: the replay decisions the restore and drill flows take (tasks/replay.py) — does the
archive go on past the backup, did recovery replay past it, what point in time the data stands for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks.drill import CountPoint, count_modes_at_pause
from tasks.models import Manifest
from tasks.recovery import RecoveryOutcome, RecoveryTarget, explain_failed_start
from tasks.replay import (
    archive_view,
    counts_lsn_in_reach,
    describe_archive_view,
    may_pass_backup_by_target,
    names_past_backup,
    past_backup,
    recovered_to,
    segment_to_find,
)

pytestmark = pytest.mark.unit

STOP = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
MB = 1024 * 1024


def backup(
    stop_wal: str | None = "000000010000000000000005", timeline: int = 1, seg: int = 16 * MB
) -> Manifest:
    return Manifest(
        id="20261129T025500Z-physical",
        kind="physical",
        cluster="gravl",
        pg_version=150000,
        system_identifier="1",
        timeline=timeline,
        start_lsn="0/4000028",
        stop_lsn="0/5000100",
        start_wal="000000010000000000000004",
        stop_wal=stop_wal,
        wal_segment_size=seg,
        start_time=STOP - timedelta(minutes=5),
        stop_time=STOP,
        codec="zstd",
        objects=[],
    )


def outcome(reached: str | None, last_xact: datetime | None = None) -> RecoveryOutcome:
    return RecoveryOutcome(
        promoted=True, timeline=2, reached_lsn=reached, last_xact_time=last_xact, target_reached=True
    )


@pytest.mark.parametrize(
    ("names", "after", "newest"),
    [
        ([], False, {}),
        (["000000010000000000000004", "000000010000000000000005"], True, {1: "000000010000000000000005"}),
        (["000000010000000000000004"], False, {1: "000000010000000000000004"}),
        (["000000010000000000000004", "00000002.history"], True, {1: "000000010000000000000004"}),
        (["00000001.history", "000000010000000000000004"], False, {1: "000000010000000000000004"}),
        (
            ["000000010000000000000004", "000000020000000000000005", "000000020000000000000007"],
            True,
            {1: "000000010000000000000004", 2: "000000020000000000000007"},
        ),
        # partial and backup-history files never count as WAL after the backup
        (["000000010000000000000006.partial", "000000010000000000000005.00000028.backup"], False, {}),
    ],
)
def test_archive_view(names: list[str], after: bool, newest: dict[int, str]) -> None:
    view = archive_view(names, backup())
    assert view.has_wal_after_backup is after
    assert view.newest_segment_name == newest
    assert view.newest_segment_start == {
        t: int(n[8:16], 16) * 2**32 + int(n[16:], 16) * 16 * MB for t, n in newest.items()
    }


def test_archive_view_of_a_backup_without_stop_wal_counts_any_segment() -> None:
    assert archive_view(["000000010000000000000001"], backup(stop_wal=None)).has_wal_after_backup


def test_archive_view_ignores_older_timelines() -> None:
    view = archive_view(["000000010000000000000009"], backup(timeline=2))
    assert not view.has_wal_after_backup and view.newest_segment_name == {}


def test_names_past_backup_are_the_next_segment_and_the_next_timelines_history() -> None:
    assert names_past_backup(backup()) == ["000000010000000000000006", "00000002.history"]
    assert names_past_backup(backup("0000000300000000000000FF")) == [
        "000000030000000100000000",
        "00000004.history",
    ]
    assert names_past_backup(backup("000000010000000000000FFF", seg=1 * MB)) == [
        "000000010000000100000000",
        "00000002.history",
    ]
    assert names_past_backup(backup(stop_wal=None)) == []


@pytest.mark.parametrize(
    ("reached", "past"),
    [
        (None, False),
        ("0/5FFFFFF", False),  # still in the backup's last segment
        (
            "0/6000000",
            False,
        ),  # the switch point is the first byte of the new timeline: last byte replayed in 5
        ("0/6000001", True),
        ("1/0", True),
        ("not an lsn", False),
    ],
)
def test_past_backup(reached: str | None, past: bool) -> None:
    assert past_backup(backup(), reached) is past
    assert past_backup(backup(stop_wal=None), reached) is False


def test_recovered_to_is_the_target_time_else_the_last_commit_past_the_backup_else_its_end() -> None:
    later = STOP + timedelta(minutes=7)
    at = "2026-11-29 03:04:00+00"
    assert recovered_to(
        backup(), RecoveryTarget(kind="time", value=at), outcome("0/7000000", later), True
    ) == datetime(2026, 11, 29, 3, 4, tzinfo=UTC)
    assert recovered_to(backup(), RecoveryTarget(), outcome("0/7000000", later), True) == later
    assert recovered_to(backup(), RecoveryTarget(), outcome("0/7000000", later), False) == STOP
    # a last commit from before the backup's end does not move the point back
    assert (
        recovered_to(backup(), RecoveryTarget(), outcome("0/7000000", STOP - timedelta(hours=1)), True)
        == STOP
    )
    assert recovered_to(backup(), RecoveryTarget(), outcome("0/7000000", None), True) == STOP


def test_describe_archive_view_names_the_newest_segment_per_timeline_or_the_backups_end() -> None:
    # GIVEN a backup and two archives: one going on past it on two timelines, one that stops at it
    m = backup()
    going_on = archive_view(["000000010000000000000006", "000000020000000000000007"], m)
    stopped = archive_view(["000000010000000000000004"], m)
    # THEN the first names where each timeline ends, the second the backup's own end point
    assert describe_archive_view(going_on, m) == (
        "the WAL archive continues after the backup (newest segment "
        "timeline 1: 000000010000000000000006, timeline 2: 000000020000000000000007)"
    )
    assert describe_archive_view(stopped, m) == (
        "the WAL archive holds nothing after backup 20261129T025500Z-physical: recovery ends at the "
        "backup's end point (0/5000100)"
    )


def counted(lsn: str | None = "0/6000000") -> Manifest:
    return backup().model_copy(update={"row_counts": {"app": {"public.t": 3}}, "row_counts_lsn": lsn})


@pytest.mark.parametrize(
    ("manifest", "target", "wanted", "at_or_after"),
    [
        (counted(), RecoveryTarget(kind="end"), True, False),
        (counted(), RecoveryTarget(kind="lsn", value="0/6000000"), True, True),
        (counted(), RecoveryTarget(kind="lsn", value="0/5FFFFFF"), False, False),
        (counted(lsn="garbage"), RecoveryTarget(kind="lsn", value="0/6000000"), False, False),
        (counted(), RecoveryTarget(kind="immediate"), False, False),
        (counted(lsn=None), RecoveryTarget(kind="end"), False, False),
        (backup(), RecoveryTarget(kind="end"), False, False),
    ],
)
def test_counts_lsn_in_reach(
    manifest: Manifest, target: RecoveryTarget, wanted: bool, at_or_after: bool
) -> None:
    assert counts_lsn_in_reach(manifest, target) == (wanted, at_or_after)


def test_segment_to_find_is_none_inside_the_backups_own_wal_else_the_archived_segment() -> None:
    m = backup()  # the backup's last segment is ...05
    assert segment_to_find(m, "0/5000100") is None
    assert segment_to_find(m, "0/4000000") is None
    assert segment_to_find(m, "0/6000028") == "000000010000000000000006"
    assert segment_to_find(backup(stop_wal=None), "0/4000000") == "000000010000000000000004"


@pytest.mark.parametrize(
    ("manifest", "target", "known"),
    [
        (backup(), RecoveryTarget(kind="immediate"), False),
        (backup(), RecoveryTarget(kind="lsn", value="0/7000000"), True),
        (backup(stop_wal=None), RecoveryTarget(kind="end"), True),
        (backup(), RecoveryTarget(kind="end"), None),
    ],
)
def test_may_pass_backup_by_target_leaves_only_the_end_of_the_archive_to_the_archive(
    manifest: Manifest, target: RecoveryTarget, known: bool | None
) -> None:
    assert may_pass_backup_by_target(manifest, target) is known


def test_count_modes_at_pause_fall_back_to_the_tolerance_only_where_commits_were_in_flight() -> None:
    # GIVEN an exact comparison point and two databases, one whose snapshot missed a commit
    exact = CountPoint(where="lsn", mode="exact")
    # WHEN the modes are decided
    mode, where, per_db = count_modes_at_pause(exact, "0/6000000", {"app": [731, 732], "ops": [], "x": None})
    # THEN only that database falls back, naming how many and one of them
    assert (mode, where) == ("exact", "at 0/6000000")
    assert list(per_db) == ["app"] and per_db["app"][0] == "tolerance"
    assert "2 transaction(s)" in per_db["app"][1] and "xid 731" in per_db["app"][1]
    # AND a tolerance point at the consistent point never looks at the commits
    tol = CountPoint(where="consistent", mode="tolerance")
    assert count_modes_at_pause(tol, "0/5000100", {"app": [1]}) == (
        "tolerance",
        "at the backup's consistent point 0/5000100",
        {},
    )


def test_explain_failed_start_reads_the_servers_log_or_says_nothing(tmp_path: Path) -> None:
    # GIVEN no log at all, then a log whose recovery ran out of archived WAL before the target
    log = tmp_path / "postgresql.log"
    target = RecoveryTarget(kind="lsn", value="0/9000000")
    assert explain_failed_start(log, target) is None
    log.write_text(
        "2026-11-29 03:00:00 UTC [1] FATAL:  recovery ended before configured recovery target was reached\n"
    )
    # THEN the sentence names the target as past the archive and what to run
    why = explain_failed_start(log, target)
    assert why is not None and "past the end of the WAL archive" in why and "wal-check" in why
