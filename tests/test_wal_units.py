"""Pure logic of WAL archiving and PITR: names, keys, headers, gaps, targets, settings, log parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest

from tasks.errors import ChecksumMismatch, ConfigError, PreconditionFailed
from tasks.models import Manifest
from tasks.recovery import (
    RecoveryOutcome,
    RecoveryTarget,
    check_outcome,
    check_target_for_backup,
    choose_backup,
    parse_pg_timestamp,
    read_recovery_log,
    recovery_settings,
    write_recovery_settings,
)
from tasks.walarchive import key_variants, name_of_key, object_key
from tasks.walcheck import Switch, find_gaps, parse_history
from tasks.walformat import WalSettings, build_header, decode_object, split_header
from tasks.walnames import parse_wal_name, segment_name


@pytest.mark.parametrize(
    ("name", "kind", "tli", "segno"),
    [
        ("000000010000000000000001", "segment", 1, 1),
        ("0000000200000001000000FF", "segment", 2, 511),
        ("00000003.history", "history", 3, None),
        ("000000010000000000000002.00000028.backup", "backup", 1, 2),
        ("000000010000000000000005.partial", "partial", 1, 5),
    ],
)
def test_wal_names_are_classified(name: str, kind: str, tli: int, segno: int | None) -> None:
    wal = parse_wal_name(name)
    assert (wal.kind, wal.timeline, wal.segno) == (kind, tli, segno)
    assert wal.folder == f"wal/{tli:08X}"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "RECOVERYXLOG",
        "00000001000000000000000",
        "000000010000000000000001.zst",
        "00000000.history",
        "../000000010000000000000001",
        "0000000g0000000000000001",
    ],
)
def test_bad_wal_names_are_rejected_before_any_io(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_wal_name(bad)


def test_keys_follow_the_repository_layout() -> None:
    assert (
        object_key("000000010000000000000001", "zstd", False) == "wal/00000001/000000010000000000000001.zst"
    )
    assert object_key("00000002.history", "none", True) == "wal/00000002/00000002.history.enc"
    variants = key_variants("000000010000000000000001", "lz4", False)
    assert variants[0].endswith(".lz4") and len(variants) == len(set(variants)) == 8
    assert name_of_key("wal/00000001/000000010000000000000001.zst.enc") == "000000010000000000000001"
    assert (
        name_of_key("wal/00000001/000000010000000000000001.00000028.backup.gz")
        == "000000010000000000000001.00000028.backup"
    )
    assert name_of_key("wal/00000001/.gravl-tmp-x") is None
    assert segment_name(1, 256) == "000000010000000100000000"


def test_header_round_trip_and_corruption_is_detected() -> None:
    import zstandard

    raw = b"wal bytes " * 1000
    settings = WalSettings(codec="zstd")
    from hashlib import sha256

    obj = build_header(
        "000000010000000000000001", settings, sha256(raw).hexdigest(), len(raw)
    ) + zstandard.ZstdCompressor().compress(raw)
    header, payload = decode_object([obj[:5], obj[5:50], obj[50:]], settings, "t")
    assert header.raw_size == len(raw) and b"".join(payload) == raw
    bad = bytearray(obj)
    bad[-3] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        b"".join(decode_object([bytes(bad)], settings, "t")[1])
    with pytest.raises(ChecksumMismatch, match="no header"):
        split_header([b"\x28\xb5\x2f\xfd" + obj[8:]], "t")
    with pytest.raises(ChecksumMismatch, match="truncated"):
        split_header([obj[:20]], "t")


# ---------------------------------------------------------------- continuity


def seg(tli: int, n: int) -> str:
    return segment_name(tli, n)


@pytest.mark.parametrize(
    ("names", "start", "switches", "gaps"),
    [
        # continuous from the backup's start
        ([seg(1, n) for n in range(2, 8)], seg(1, 2), {}, []),
        # one missing in the middle, named
        ([seg(1, n) for n in (2, 3, 5, 6)], seg(1, 2), {}, [(1, seg(1, 4), seg(1, 4), 1)]),
        # missing the start itself
        ([seg(1, n) for n in (4, 5)], seg(1, 2), {}, [(1, seg(1, 2), seg(1, 3), 2)]),
        # older than the oldest backup: not needed
        ([seg(1, n) for n in (1, 5, 6)], seg(1, 5), {}, []),
        # a promotion at 0/7000100: timeline 1 needed up to 6, timeline 2 from 7
        (
            [*(seg(1, n) for n in range(2, 7)), seg(2, 7), seg(2, 8)],
            seg(1, 2),
            {2: Switch(2, 1, 0x7000100)},
            [],
        ),
        # timeline 1 stops short of the switch point
        (
            [*(seg(1, n) for n in range(2, 5)), seg(2, 7)],
            seg(1, 2),
            {2: Switch(2, 1, 0x7000100)},
            [(1, seg(1, 5), seg(1, 6), 2)],
        ),
        # no backup: internal gaps only
        ([seg(1, n) for n in (10, 11, 13)], None, {}, [(1, seg(1, 12), seg(1, 12), 1)]),
    ],
)
def test_find_gaps(
    names: list[str], start: str | None, switches: dict[int, Switch], gaps: list[tuple[int, str, str, int]]
) -> None:
    found, _spans, problems = find_gaps(
        names + ["00000002.history"] * bool(switches), start_wal=start, switches=switches
    )
    assert [(g.timeline, g.first, g.last, g.count) for g in found] == gaps
    assert problems == []


def test_a_timeline_without_its_history_file_is_a_problem() -> None:
    _gaps, _spans, problems = find_gaps([seg(1, 2), seg(2, 3)], start_wal=seg(1, 2), switches={})
    assert problems == ["timeline 2: history file 00000002.history is not archived"]


def test_parse_history() -> None:
    text = "1\t0/3000108\tno recovery target specified\n\n2\t0/5000000\tbefore transaction 745 at x\n"
    assert parse_history(text) == [(1, 0x3000108), (2, 0x5000000)]


# ---------------------------------------------------------------- targets and settings


def test_recovery_target_from_options() -> None:
    assert RecoveryTarget.from_options() == RecoveryTarget(kind="end")
    t = RecoveryTarget.from_options(time="2026-11-24T10:00:00")
    assert t.time == datetime(2026, 11, 24, 10, tzinfo=UTC)
    assert RecoveryTarget.from_options(time="2026-11-24T12:00:00+02:00").time == t.time
    assert RecoveryTarget.from_options(lsn="0/3000028").lsn == 0x3000028
    with pytest.raises(ConfigError, match="at most one"):
        RecoveryTarget.from_options(time="2026-11-24T10:00:00Z", xid="5")
    for bad in ({"time": "tomorrow"}, {"lsn": "3000028"}, {"xid": "x1"}, {"name": "n" * 64}):
        with pytest.raises(ConfigError):
            RecoveryTarget.from_options(**bad)
    with pytest.raises(ValueError):
        RecoveryTarget(kind="end", value="x")


def test_recovery_settings_for_each_kind() -> None:
    cfg = "/etc/gravl dr/it's.yaml"
    s = recovery_settings(RecoveryTarget(kind="time", value="2026-11-24T10:00:00Z"), cfg)
    assert s["recovery_target_time"] == "'2026-11-24 10:00:00.000000+00'"
    assert s["recovery_target_timeline"] == "'latest'" and s["recovery_target_action"] == "'promote'"
    # the config path is quoted for the shell, then for postgresql.conf
    assert "--config ''/etc/gravl dr/it''\"''\"''s.yaml'' wal-fetch %f %p'" in s["restore_command"]
    assert s["archive_mode"] == "off"
    assert (
        recovery_settings(RecoveryTarget(kind="name", value="before 'x'"), cfg)["recovery_target_name"]
        == "'before ''x'''"
    )
    assert "recovery_target_xid" in recovery_settings(RecoveryTarget(kind="xid", value="745"), cfg)
    assert recovery_settings(RecoveryTarget(kind="immediate"), cfg)["recovery_target"] == "'immediate'"
    end = recovery_settings(RecoveryTarget(), cfg, keep_archiving=True)
    assert (
        not any(
            k.startswith("recovery_target_")
            and k not in ("recovery_target_timeline", "recovery_target_action")
            for k in end
        )
        and "archive_mode" not in end
    )


def test_write_recovery_settings_is_rerunnable(tmp_path: Path) -> None:
    (tmp_path / "PG_VERSION").write_text("15\n")
    (tmp_path / "postgresql.auto.conf").write_text("# Do not edit\nwork_mem = '8MB'\n")
    (tmp_path / "standby.signal").write_text("")
    import os

    user = __import__("pwd").getpwuid(os.geteuid()).pw_name
    for value in ("rp-1", "rp-2"):
        write_recovery_settings(
            tmp_path, config_path="/c.yaml", os_user=user, target=RecoveryTarget(kind="name", value=value)
        )
    text = (tmp_path / "postgresql.auto.conf").read_text()
    assert text.count("restore_command") == 1 and "'rp-2'" in text and "rp-1" not in text
    assert "work_mem = '8MB'" in text
    assert (tmp_path / "recovery.signal").exists() and not (tmp_path / "standby.signal").exists()
    with pytest.raises(PreconditionFailed):
        write_recovery_settings(tmp_path / "nope", config_path="/c", os_user=user, target=RecoveryTarget())


LOG = """\
2026-11-24 14:44:50.100 UTC [1] LOG:  starting point-in-time recovery to 2026-11-24 14:44:44.9+00
2026-11-24 14:44:50.300 UTC [1] LOG:  restored log file "000000010000000000000003" from archive
2026-11-24 14:44:50.400 UTC [1] LOG:  recovery stopping before commit of transaction 745, time 2026-11-24 14:44:45.2+00
2026-11-24 14:44:50.400 UTC [1] LOG:  redo done at 0/30008B8 system usage: CPU: user: 0.00 s
2026-11-24 14:44:50.400 UTC [1] LOG:  last completed transaction was at log time 2026-11-24 14:44:44.915043+00
2026-11-24 14:44:50.500 UTC [1] LOG:  selected new timeline ID: 2
"""


def test_read_recovery_log() -> None:
    rec = read_recovery_log(LOG)
    assert (
        rec.stop_message
        == "recovery stopping before commit of transaction 745, time 2026-11-24 14:44:45.2+00"
    )
    assert rec.redo_done_lsn == "0/30008B8" and rec.new_timeline == 2
    assert rec.last_xact_time == datetime(2026, 11, 24, 14, 44, 44, 915043, tzinfo=UTC)
    assert (
        read_recovery_log("x FATAL:  recovery ended before configured recovery target was reached").fatal
        == "recovery ended before configured recovery target was reached"
    )
    assert parse_pg_timestamp("2026-11-24 10:00:00+05:30") == datetime(2026, 11, 24, 4, 30, tzinfo=UTC)


def manifest(
    i: int, stop: datetime, stop_lsn: str, kind: Literal["physical", "logical"] = "physical"
) -> Manifest:
    return Manifest(
        id=f"2026112{i}T000000Z-{kind}",
        kind=kind,
        cluster="gravl",
        pg_version=150000,
        system_identifier="1",
        timeline=1,
        start_lsn=stop_lsn,
        stop_lsn=stop_lsn,
        start_time=stop - timedelta(minutes=5),
        stop_time=stop,
        codec="zstd",
        objects=[],
    )


def test_choose_backup_picks_the_newest_that_ended_before_the_target() -> None:
    t0 = datetime(2026, 11, 20, tzinfo=UTC)
    ms = [
        manifest(1, t0, "0/3000000"),
        manifest(2, t0 + timedelta(days=1), "0/9000000"),
        manifest(3, t0 + timedelta(days=2), "0/F000000", kind="logical"),
    ]
    now = t0 + timedelta(days=5)
    assert (
        choose_backup(ms, RecoveryTarget(kind="time", value=(t0 + timedelta(hours=30)).isoformat()), now)
        is ms[1]
    )
    assert (
        choose_backup(ms, RecoveryTarget(kind="time", value=(t0 + timedelta(hours=3)).isoformat()), now)
        is ms[0]
    )
    assert choose_backup(ms, RecoveryTarget(kind="lsn", value="0/8000000"), now) is ms[0]
    assert choose_backup(ms, RecoveryTarget(), now) is ms[1]
    with pytest.raises(PreconditionFailed, match="no backup ended before"):
        choose_backup(ms, RecoveryTarget(kind="time", value=(t0 - timedelta(hours=1)).isoformat()), now)
    with pytest.raises(PreconditionFailed, match="in the future"):
        choose_backup(ms, RecoveryTarget(kind="time", value=(now + timedelta(hours=1)).isoformat()), now)
    with pytest.raises(PreconditionFailed, match="before the end of backup"):
        check_target_for_backup(ms[1], RecoveryTarget(kind="lsn", value="0/8000000"))


def test_check_outcome_fails_when_recovery_stopped_short() -> None:
    ok = RecoveryOutcome(
        promoted=True,
        timeline=2,
        reached_lsn="0/5000000",
        last_xact_time=None,
        stop_message=None,
        target_reached=True,
    )
    check_outcome(RecoveryTarget(), ok, archive_end_lsn=0x4000000, backup_stop_lsn="0/2000100")
    with pytest.raises(PreconditionFailed, match="stopped short"):
        check_outcome(RecoveryTarget(), ok, archive_end_lsn=0x6000000, backup_stop_lsn="0/2000100")
    with pytest.raises(PreconditionFailed, match="without reaching"):
        check_outcome(RecoveryTarget(kind="name", value="x"), ok, archive_end_lsn=None, backup_stop_lsn=None)
    late = ok.model_copy(
        update={
            "stop_message": "recovery stopping before commit",
            "last_xact_time": datetime(2026, 11, 24, 11, tzinfo=UTC),
        }
    )
    with pytest.raises(PreconditionFailed, match="after the target"):
        check_outcome(
            RecoveryTarget(kind="time", value="2026-11-24T10:00:00Z"),
            late,
            archive_end_lsn=None,
            backup_stop_lsn=None,
        )
    with pytest.raises(PreconditionFailed, match="not promoted"):
        check_outcome(
            RecoveryTarget(),
            ok.model_copy(update={"promoted": False}),
            archive_end_lsn=None,
            backup_stop_lsn=None,
        )
