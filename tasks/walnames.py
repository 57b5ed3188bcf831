"""Pure logic: WAL file names and LSN arithmetic — the one home for both.

An LSN is a 64-bit byte position in the WAL stream, written ``hi/lo`` in hex (``16/B374D848``).
WAL file names follow xlog_internal.h: XLogFileName is 8 hex digits of timeline, then the segment
number split into "log" (segno / segments per 4 GB) and "seg" parts; TLHistoryFileName is
``<tli>.history``; BackupHistoryFileName is ``<segment>.<offset>.backup``; a promoted timeline's
last segment is archived as ``<segment>.partial``.

No I/O and no third-party import: ``wal-push`` / ``wal-fetch`` import this once per segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tasks.errors import ConfigError

SEGMENT_SIZE = 16 * 1024 * 1024  # PostgreSQL's default --wal-segsize

LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
WAL_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
WAL_NAME_RE = re.compile(
    r"^(?P<tli>[0-9A-F]{8})(?:(?P<seg>[0-9A-F]{16})(?P<suffix>\.partial|\.[0-9A-F]{8}\.backup)?"
    r"|(?P<history>\.history))$"
)

WalKind = Literal["segment", "partial", "backup", "history"]


# ---------------------------------------------------------------- LSN


def lsn_to_int(lsn: str) -> int:
    """'16/B374D848' -> byte position, for LSNs a server reported; raises ValueError on anything else."""
    hi, sep, lo = lsn.strip().partition("/")
    if not sep or not hi or not lo:
        raise ValueError(f"not an LSN: {lsn!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_or_none(lsn: str | None) -> int | None:
    """The byte position of ``lsn``, or None when it is empty or not an LSN."""
    if not lsn:
        return None
    try:
        return lsn_to_int(lsn)
    except ValueError:
        return None


def parse_lsn(text: str) -> int:
    """An LSN an operator typed (``--target-lsn``) -> byte position; ConfigError names it otherwise."""
    if not LSN_RE.match(text.strip()):
        raise ConfigError(f"invalid LSN {text!r} (expected e.g. 0/3000028)")
    return lsn_to_int(text)


def format_lsn(value: int) -> str:
    """Byte position -> 'hi/lo', as PostgreSQL prints pg_lsn."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# ---------------------------------------------------------------- WAL file names


def segments_per_id(seg_size: int = SEGMENT_SIZE) -> int:
    """Segments per 4 GB "log id" (XLogSegmentsPerXLogId)."""
    return 0x100000000 // seg_size


def segment_name(timeline: int, segno: int, seg_size: int = SEGMENT_SIZE) -> str:
    """XLogFileName of segment number ``segno`` on ``timeline``."""
    per = segments_per_id(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def wal_file_name(timeline: int, lsn: int, seg_size: int = SEGMENT_SIZE) -> str:
    """XLogFileName for the segment containing ``lsn``."""
    return segment_name(timeline, lsn // seg_size, seg_size)


def wal_segno(name: str, seg_size: int = SEGMENT_SIZE) -> tuple[int, int]:
    """(timeline, segment number) of a name starting with a segment name (.partial, .backup too)."""
    if not WAL_SEGMENT_RE.match(name[:24]):
        raise ConfigError(f"not a WAL segment name: {name!r}")
    return int(name[:8], 16), int(name[8:16], 16) * segments_per_id(seg_size) + int(name[16:24], 16)


@dataclass(frozen=True)
class WalName:
    name: str
    kind: WalKind
    timeline: int
    segno: int | None  # for segment, partial and backup files

    @property
    def folder(self) -> str:
        return f"wal/{self.timeline:08X}"


def parse_wal_name(name: str, seg_size: int = SEGMENT_SIZE) -> WalName:
    """Validate a WAL file name before anything touches the repository."""
    m = WAL_NAME_RE.match(name)
    if not m:
        raise ConfigError(f"not a WAL file name: {name!r}")
    tli = int(m.group("tli"), 16)
    if tli == 0:
        raise ConfigError(f"not a WAL file name (timeline 0): {name!r}")
    if m.group("history"):
        return WalName(name, "history", tli, None)
    segno = wal_segno(name, seg_size)[1]
    suffix = m.group("suffix") or ""
    kind: WalKind = "partial" if suffix == ".partial" else ("backup" if suffix else "segment")
    return WalName(name, kind, tli, segno)
