"""Unit tier: WAL file names and LSN arithmetic (tasks/walnames.py), table-driven against values
PostgreSQL itself prints (pg_walfile_name, pg_lsn)."""

from __future__ import annotations

import pytest

from tasks import failover, models, walcheck, walnames
from tasks.errors import ConfigError
from tasks.walnames import (
    format_lsn,
    lsn_or_none,
    lsn_to_int,
    parse_lsn,
    parse_wal_name,
    segment_name,
    segments_per_id,
    wal_file_name,
    wal_segno,
)

pytestmark = pytest.mark.unit

MB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/3000028", 0x3000028),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        ("1/0", 1 << 32),
    ],
)
def test_lsn_text_and_position_round_trip(text: str, value: int) -> None:
    assert lsn_to_int(text) == parse_lsn(text) == value
    assert format_lsn(value) == text


def test_lsn_parsing_is_forgiving_of_case_and_spaces_as_servers_print_them() -> None:
    assert parse_lsn(" 16/b374d848 ") == lsn_to_int("16/b374d848") == (0x16 << 32) | 0xB374D848


@pytest.mark.parametrize("bad", ["", "0", "/", "0/", "/0", "zz/1", "1/2/3", "123456789/0", "0x1/0"])
def test_an_operator_typed_lsn_that_is_not_one_is_a_config_error_naming_it(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid LSN"):
        parse_lsn(bad)


@pytest.mark.parametrize("bad", ["", "0", "/", "0/", "/0", "zz/1"])
def test_a_server_reported_lsn_that_is_not_one_is_a_value_error_or_none(bad: str) -> None:
    with pytest.raises(ValueError):
        lsn_to_int(bad)
    assert lsn_or_none(bad) is None


def test_lsn_or_none_passes_absent_values_through() -> None:
    assert lsn_or_none(None) is None
    assert lsn_or_none("0/10") == 16


@pytest.mark.parametrize(
    ("timeline", "lsn", "seg_size", "name"),
    [
        # SELECT pg_walfile_name('0/3000028') on timeline 1 with 16 MB segments
        (1, "0/3000028", 16 * MB, "000000010000000000000003"),
        (1, "0/FFFFFFFF", 16 * MB, "0000000100000000000000FF"),
        (1, "1/0", 16 * MB, "000000010000000100000000"),
        (2, "16/B374D848", 16 * MB, "0000000200000016000000B3"),
        (3, "0/3000028", 1 * MB, "000000030000000000000030"),
        (1, "5/40000000", 1024 * MB, "000000010000000500000001"),
    ],
)
def test_wal_file_name_of_an_lsn(timeline: int, lsn: str, seg_size: int, name: str) -> None:
    value = parse_lsn(lsn)
    assert wal_file_name(timeline, value, seg_size) == name
    tli, segno = wal_segno(name, seg_size)
    assert (tli, segno) == (timeline, value // seg_size)
    assert segment_name(tli, segno, seg_size) == name


@pytest.mark.parametrize(("seg_size", "per"), [(1 * MB, 4096), (16 * MB, 256), (1024 * MB, 4)])
def test_segments_per_log_id(seg_size: int, per: int) -> None:
    assert segments_per_id(seg_size) == per


def test_wal_segno_reads_the_segment_part_of_partial_and_backup_names() -> None:
    assert wal_segno("000000020000000100000003.partial") == (2, 256 + 3)
    assert wal_segno("000000010000000000000002.00000028.backup") == (1, 2)
    with pytest.raises(ConfigError):
        wal_segno("00000002.history")


@pytest.mark.parametrize(
    ("name", "seg_size", "segno"),
    [
        ("000000010000000000000010", 1 * MB, 16),
        ("000000010000000100000001", 1 * MB, 4097),
        ("000000010000000100000001", 64 * MB, 65),
    ],
)
def test_parse_wal_name_uses_the_segment_size(name: str, seg_size: int, segno: int) -> None:
    assert parse_wal_name(name, seg_size).segno == segno


def test_the_older_homes_are_the_same_functions() -> None:
    # one implementation: models, failover and walcheck only re-export tasks.walnames
    assert models.parse_lsn is walnames.parse_lsn and models.format_lsn is walnames.format_lsn
    assert models.wal_file_name is walnames.wal_file_name and models.wal_segno is walnames.wal_segno
    assert models.wal_name_from_segno is walnames.segment_name
    # not re-exported names: read from the modules' namespaces
    assert failover.lsn_to_int is walnames.lsn_to_int and vars(failover)["int_to_lsn"] is walnames.format_lsn
    assert vars(walcheck)["parse_lsn"] is walnames.parse_lsn
