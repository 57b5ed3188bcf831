"""Pure logic: the manifest, backup ids and LSN / WAL-file-name arithmetic.

WAL file names follow PostgreSQL's XLogFileName (xlog_internal.h): 8 hex digits of timeline,
then the segment number split into "log" (segno / segments-per-4GB) and "seg" parts.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import ChecksumMismatch, ConfigError

MANIFEST_VERSION = 1
BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-(physical|logical)$")
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
WAL_SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")


class StoredObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(description="key relative to the backup's folder")
    size: int
    sha256: str
    raw_size: int
    raw_sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = MANIFEST_VERSION
    id: str
    kind: Literal["physical", "logical"]
    cluster: str
    pg_version: int
    pg_version_text: str = ""
    system_identifier: str
    timeline: int
    start_lsn: str | None = None
    stop_lsn: str | None = None
    start_wal: str | None = None
    stop_wal: str | None = None
    wal_segment_size: int = 16 * 1024 * 1024
    start_time: datetime
    stop_time: datetime
    database: str | None = None
    codec: str
    encryption: Literal["none", "aes-256-gcm"] = "none"
    key_fingerprint: str | None = None
    objects: list[StoredObject]
    row_counts: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="database -> schema.table -> rows at backup time"
    )
    row_counts_exact: bool = False
    row_counts_lsn: str | None = Field(
        default=None, description="WAL position at which the row counts (and newest timestamps) hold exactly")
    row_counts_snapshots: dict[str, str] = Field(
        default_factory=dict, description="database -> pg_current_snapshot() its counts were read in")
    newest_timestamps: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="database -> schema.table -> newest timestamp, epoch seconds (numeric)")
    unlogged_tables: dict[str, list[str]] = Field(default_factory=dict, description="database -> unlogged tables")
    not_counted: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="database -> schema.table (or '*': the whole database) -> why not")
    cluster_databases: list[str] = Field(default_factory=list, description="every database of the cluster")
    data_checksums: bool = False
    tool_version: str = "0.1.0"

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @property
    def stored_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def raw_bytes(self) -> int:
        return sum(o.raw_size for o in self.objects)


def parse_manifest(data: bytes, where: str) -> Manifest:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ChecksumMismatch(f"{where}: manifest is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != MANIFEST_VERSION:
        raise ChecksumMismatch(f"{where}: unsupported manifest version {doc.get('version')!r}")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise ChecksumMismatch(f"{where}: manifest is malformed ({exc.error_count()} errors)") from None


def new_backup_id(kind: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{kind}"


def backup_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def check_backup_ref(ref: str) -> str:
    if ref != "latest" and not BACKUP_ID_RE.match(ref):
        raise ConfigError(f"invalid backup id {ref!r} (expected e.g. 20261124T020000Z-physical or 'latest')")
    return ref


# ---------------------------------------------------------------- LSN and WAL names

def parse_lsn(text: str) -> int:
    if not LSN_RE.match(text.strip()):
        raise ConfigError(f"invalid LSN {text!r} (expected e.g. 0/3000028)")
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_id(seg_size: int) -> int:
    return 0x100000000 // seg_size


def wal_file_name(timeline: int, lsn: int, seg_size: int = 16 * 1024 * 1024) -> str:
    """XLogFileName for the segment containing ``lsn``."""
    segno = lsn // seg_size
    per = segments_per_id(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def wal_segno(name: str, seg_size: int = 16 * 1024 * 1024) -> tuple[int, int]:
    """(timeline, segment number) of a WAL segment file name."""
    if not WAL_SEGMENT_RE.match(name[:24]):
        raise ConfigError(f"not a WAL segment name: {name!r}")
    tli = int(name[:8], 16)
    log_id = int(name[8:16], 16)
    seg = int(name[16:24], 16)
    return tli, log_id * segments_per_id(seg_size) + seg


def wal_name_from_segno(timeline: int, segno: int, seg_size: int = 16 * 1024 * 1024) -> str:
    per = segments_per_id(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"
