"""Pure logic: the manifest and backup ids (LSN and WAL-name arithmetic: tasks.walnames)."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import walnames
from tasks.errors import ChecksumMismatch, ConfigError

MANIFEST_VERSION = 1
# <UTC second>-<kind>-<random suffix>: two backups started in the same second get different ids
# (ids written before the suffix existed, without it, are still read).
BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-(physical|logical)(-[0-9a-f]{6,16})?$")

# LSN and WAL-name arithmetic live in tasks.walnames; these names stay importable from here.
LSN_RE = walnames.LSN_RE
WAL_SEGMENT_RE = walnames.WAL_SEGMENT_RE
parse_lsn = walnames.parse_lsn
format_lsn = walnames.format_lsn
segments_per_id = walnames.segments_per_id
wal_file_name = walnames.wal_file_name
wal_segno = walnames.wal_segno
wal_name_from_segno = walnames.segment_name


class StoredObject(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(description="key relative to the backup's folder")
    size: int
    sha256: str
    raw_size: int
    raw_sha256: str


class TablespaceEntry(BaseModel):
    """A user tablespace: in a physical backup its own archive object; in a logical one part of
    the globals (restore creates it at ``location``, or where --tablespace-map says)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    oid: str
    name: str
    location: str
    object: str | None = Field(default=None, description="key of its archive (physical backups)")


class DatabaseSetting(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str | None = Field(
        default=None, description="ALTER ROLE ... IN DATABASE when set, else ALTER DATABASE"
    )
    name: str
    value: str


class DatabaseEntry(BaseModel):
    """A database of the source cluster and its database-level properties (pg_database)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    oid: str
    owner: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str = "libc"
    icu_locale: str | None = None
    tablespace: str = "pg_default"
    connection_limit: int = -1
    is_template: bool = False
    allow_connections: bool = True
    acl: str | None = None
    comment: str | None = None
    settings: list[DatabaseSetting] = []
    object: str | None = Field(
        default=None, description="key of its pg_dump -Fc archive; None when not dumped"
    )
    skipped: str | None = Field(default=None, description="why it was not dumped")


class NotCarriedOver(BaseModel):
    """What the source held at backup time that PostgreSQL does not bring back (or brings back
    with a catch): the restore report says so."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unlogged_tables: dict[str, list[str]] = Field(default_factory=dict, description="database -> tables")
    replication_slots: list[str] = []
    prepared_transactions: list[str] = Field(default_factory=list, description="gid (database, owner)")
    config_outside_pgdata: list[str] = Field(default_factory=list, description="config files not in PGDATA")
    backup_notes: list[str] = Field(
        default_factory=list, description="anything else the backup could not hold"
    )


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
    encryption: Literal["none", "aes-256-gcm", "tink-aes256-gcm-hkdf-1mib"] = "none"
    key_fingerprint: str | None = None
    objects: list[StoredObject]
    row_counts: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="database -> schema.table -> rows at backup time"
    )
    row_counts_exact: bool = False
    row_counts_lsn: str | None = Field(
        default=None, description="WAL position at which the row counts (and newest timestamps) hold exactly"
    )
    row_counts_snapshots: dict[str, str] = Field(
        default_factory=dict, description="database -> pg_current_snapshot() its counts were read in"
    )
    newest_timestamps: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="database -> schema.table -> newest timestamp, epoch seconds (numeric)",
    )
    unlogged_tables: dict[str, list[str]] = Field(
        default_factory=dict, description="database -> unlogged tables"
    )
    not_counted: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="database -> schema.table (or '*': the whole database) -> why not"
    )
    cluster_databases: list[str] = Field(default_factory=list, description="every database of the cluster")
    data_checksums: bool = False
    tool_version: str = "0.1.0"
    tablespaces: list[TablespaceEntry] = []
    databases: list[DatabaseEntry] = Field(
        default_factory=list, description="logical: every database of the source, dumped or not (and why)"
    )
    globals_object: str | None = Field(default=None, description="logical: roles and tablespaces (SQL)")
    not_carried_over: NotCarriedOver = NotCarriedOver()

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
    if not isinstance(doc, dict):
        raise ChecksumMismatch(f"{where}: manifest is a JSON {type(doc).__name__}, not an object")
    if doc.get("version") != MANIFEST_VERSION:
        raise ChecksumMismatch(f"{where}: unsupported manifest version {doc.get('version')!r}")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise ChecksumMismatch(f"{where}: manifest is malformed ({exc.error_count()} errors)") from None


def new_backup_id(kind: str, now: datetime | None = None) -> str:
    """``20261124T020000Z-physical-3f9a1c7d``: time, kind and 32 random bits, so that two runs
    started in the same second never share an id (nor the objects and uploads under it)."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{kind}-{secrets.token_hex(4)}"


def backup_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def check_backup_ref(ref: str) -> str:
    if ref != "latest" and not BACKUP_ID_RE.match(ref):
        raise ConfigError(f"invalid backup id {ref!r} (expected e.g. 20261124T020000Z-physical or 'latest')")
    return ref
