"""Adapter (with a pure core): is the WAL archive usable, and is the archiver keeping up?

``find_gaps`` is pure: from the archived names, the oldest kept backup's start WAL and the
timeline switch points (from ``.history`` files) it names every missing segment range.
``read_archiver`` reads ``pg_stat_archiver`` and the WAL position; ``check_wal`` puts both
together, and also re-reads the file PostgreSQL last reported archived: it must really be in
the repository and intact (an archive_command that exits 0 without storing anything is the
silent failure this catches).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from tasks.errors import DRError, NotFound, PermanentError, one_line
from tasks.walarchive import duplicate_variants, find_object, list_archive
from tasks.walformat import WalSettings, decode_object
from tasks.walnames import LSN_RE, SEGMENT_SIZE, WalName, parse_lsn, parse_wal_name, segment_name

if TYPE_CHECKING:
    from tasks.config import Config
    from tasks.repository import Repository

log = logging.getLogger(__name__)


class Gap(BaseModel):
    timeline: int
    first: str
    last: str
    count: int

    def describe(self) -> str:
        if self.count == 1:
            return f"timeline {self.timeline}: {self.first} missing"
        return f"timeline {self.timeline}: {self.first}..{self.last} missing ({self.count} segments)"


class TimelineSpan(BaseModel):
    timeline: int
    first: str | None
    last: str | None
    segments: int
    required_from: str | None = None


@dataclass(frozen=True)
class Switch:
    """Timeline ``child`` branched off ``parent`` at ``lsn`` (the last line of child.history)."""

    child: int
    parent: int
    lsn: int


def parse_history(text: str) -> list[tuple[int, int]]:
    """(parent timeline, switch LSN) lines of a timeline history file (timeline.c format)."""
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and LSN_RE.match(parts[1]):
            out.append((int(parts[0]), parse_lsn(parts[1])))
    return out


def _ranges(tli: int, missing: list[int], seg_size: int) -> list[Gap]:
    gaps: list[Gap] = []
    start = prev = None
    for s in missing:
        if start is None:
            start = prev = s
            continue
        assert prev is not None
        if s == prev + 1:
            prev = s
            continue
        gaps.append(
            Gap(
                timeline=tli,
                first=segment_name(tli, start, seg_size),
                last=segment_name(tli, prev, seg_size),
                count=prev - start + 1,
            )
        )
        start = prev = s
    if start is not None and prev is not None:
        gaps.append(
            Gap(
                timeline=tli,
                first=segment_name(tli, start, seg_size),
                last=segment_name(tli, prev, seg_size),
                count=prev - start + 1,
            )
        )
    return gaps


def _first_needed(
    tli: int, have: set[int], start: WalName | None, switches: dict[int, Switch], seg_size: int
) -> int | None:
    """The first segment recovery needs on timeline ``tli``: the oldest kept backup's start on
    its own timeline, else the switch point (not before the backup's start); None when neither
    says (a timeline whose history file is not archived)."""
    if start is not None and tli == start.timeline:
        assert start.segno is not None
        return start.segno
    if tli not in switches:
        return None
    first = switches[tli].lsn // seg_size
    if start is not None and start.segno is not None:
        first = max(first, start.segno)
    return first


def find_gaps(
    names: Iterable[str],
    *,
    start_wal: str | None,
    switches: dict[int, Switch],
    seg_size: int = SEGMENT_SIZE,
) -> tuple[list[Gap], list[TimelineSpan], list[str]]:
    """Missing segments on every timeline, from where recovery needs them to the newest archived.

    Timeline T is needed from the oldest kept backup's start (when T is its timeline) or from
    the segment where T branched off its parent; up to its newest archived segment, and on a
    parent at least up to the segment before a child's switch point (the child's first segment
    holds the rest). Returns (gaps, per-timeline spans, problems such as a missing history file).
    """
    present: dict[int, set[int]] = {}
    for name in names:
        wal = parse_wal_name(name, seg_size)
        if wal.kind == "segment" and wal.segno is not None:
            present.setdefault(wal.timeline, set()).add(wal.segno)
    start = parse_wal_name(start_wal, seg_size) if start_wal else None
    timelines = sorted(set(present) | set(switches))
    problems: list[str] = []
    gaps: list[Gap] = []
    spans: list[TimelineSpan] = []
    for tli in timelines:
        if start is not None and tli < start.timeline:
            continue  # older than the oldest kept backup: not needed
        have = present.get(tli, set())
        first_needed = _first_needed(tli, have, start, switches, seg_size)
        if first_needed is None and tli > 1 and have:
            problems.append(f"timeline {tli}: history file {tli:08X}.history is not archived")
        if first_needed is None:
            first_needed = min(have) if have else None
        children_need = [s.lsn // seg_size - 1 for s in switches.values() if s.parent == tli]
        last_needed = max([*have, *children_need]) if (have or children_need) else None
        if first_needed is None or last_needed is None:
            spans.append(TimelineSpan(timeline=tli, first=None, last=None, segments=0))
            continue
        missing = [s for s in range(first_needed, last_needed + 1) if s not in have]
        gaps.extend(_ranges(tli, missing, seg_size))
        kept = sorted(s for s in have if s >= first_needed)
        spans.append(
            TimelineSpan(
                timeline=tli,
                first=segment_name(tli, kept[0], seg_size) if kept else None,
                last=segment_name(tli, kept[-1], seg_size) if kept else None,
                segments=len(kept),
                required_from=segment_name(tli, first_needed, seg_size),
            )
        )
    if (
        start is not None
        and start.timeline not in present
        and not any(s.parent == start.timeline for s in switches.values())
    ):
        problems.append(f"no WAL archived since the oldest kept backup started ({start.name})")
    return gaps, spans, problems


# ---------------------------------------------------------------- the archiver


class ArchiverStatus(BaseModel):
    reachable: bool
    error: str | None = None
    archive_mode: str | None = None
    archive_timeout_s: int | None = None
    in_recovery: bool = False
    timeline: int | None = None
    archived_count: int = 0
    last_archived_wal: str | None = None
    last_archived_time: datetime | None = None
    failed_count: int = 0
    last_failed_wal: str | None = None
    last_failed_time: datetime | None = None
    current_lsn: str | None = None
    current_wal: str | None = None
    ready_count: int | None = None
    seg_size: int = SEGMENT_SIZE

    @property
    def failing(self) -> bool:
        """The most recent attempt failed (a failure followed by a success is history)."""
        if self.last_failed_time is None:
            return False
        return self.last_archived_time is None or self.last_failed_time > self.last_archived_time


def read_archiver(dsn: str) -> ArchiverStatus:
    from tasks.postgres import connection

    try:
        with connection(dsn, timeout=5) as conn:
            conn.execute("SET statement_timeout = '10s'")
            row = conn.execute(
                """
                SELECT current_setting('archive_mode'),
                       current_setting('archive_timeout'),
                       pg_is_in_recovery(),
                       a.archived_count, a.last_archived_wal, a.last_archived_time,
                       a.failed_count, a.last_failed_wal, a.last_failed_time,
                       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text
                            ELSE pg_current_wal_lsn()::text END,
                       CASE WHEN pg_is_in_recovery() THEN NULL
                            ELSE pg_walfile_name(pg_current_wal_lsn()) END,
                       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')
                FROM pg_stat_archiver a
                """
            ).fetchone()
            assert row is not None
            try:
                ready = conn.execute(
                    "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
                ).fetchone()
                ready_count = int(ready[0]) if ready else None
            except Exception:  # noqa: BLE001 - needs pg_monitor; optional
                ready_count = None
    except DRError as exc:
        return ArchiverStatus(reachable=False, error=one_line(exc))
    timeout = str(row[1])
    return ArchiverStatus(
        reachable=True,
        archive_mode=str(row[0]),
        archive_timeout_s=_seconds(timeout),
        in_recovery=bool(row[2]),
        archived_count=int(row[3] or 0),
        last_archived_wal=row[4],
        last_archived_time=row[5],
        failed_count=int(row[6] or 0),
        last_failed_wal=row[7],
        last_failed_time=row[8],
        current_lsn=row[9],
        current_wal=row[10],
        timeline=int(row[10][:8], 16) if row[10] else None,
        ready_count=ready_count,
        seg_size=int(row[11] or SEGMENT_SIZE),
    )


def _seconds(text: str) -> int | None:
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, "d": 86400}
    text = text.strip()
    for unit in ("ms", "min", "s", "h", "d"):
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(int(text[: -len(unit)]) * units[unit])
    return int(text) if text.isdigit() else None


# ---------------------------------------------------------------- the whole check


class WalCheckReport(BaseModel):
    cluster: str
    repository: str
    checked_at: datetime
    oldest_backup: str | None = None
    start_wal: str | None = None
    archived_files: int = 0
    newest_segment: str | None = None
    timelines: list[TimelineSpan] = Field(default_factory=list)
    gaps: list[Gap] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    archiver: ArchiverStatus | None = None
    last_archived_verified: bool | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.problems

    def summary(self) -> str:
        parts = [g.describe() for g in self.gaps[:3]]
        if len(self.gaps) > 3:
            parts.append(f"and {len(self.gaps) - 3} more gap(s)")
        parts += self.problems[:3]
        if not parts:
            return "WAL archive OK"
        return "WAL archive check failed: " + "; ".join(parts)

    def text(self) -> str:
        lines = [f"WAL archive of {self.cluster} in {self.repository}: {'OK' if self.ok else 'PROBLEMS'}"]
        lines.append(f"  oldest kept backup: {self.oldest_backup or '-'} (start WAL {self.start_wal or '-'})")
        lines.append(f"  archived files: {self.archived_files}, newest segment {self.newest_segment or '-'}")
        for span in self.timelines:
            lines.append(
                f"  timeline {span.timeline}: {span.segments} segment(s) "
                f"{span.first or '-'}..{span.last or '-'}"
            )
        for gap in self.gaps:
            lines.append(f"  GAP {gap.describe()}")
        a = self.archiver
        if a is not None:
            if not a.reachable:
                lines.append(f"  archiver: unknown ({a.error})")
            else:
                lines.append(
                    f"  archiver: mode {a.archive_mode}, archived {a.archived_count}, failed "
                    f"{a.failed_count}, last archived {a.last_archived_wal or '-'} at "
                    f"{a.last_archived_time.isoformat() if a.last_archived_time else '-'}"
                    + (
                        f", last failure {a.last_failed_wal} at {a.last_failed_time.isoformat()}"
                        if a.last_failed_time
                        else ""
                    )
                    + (f", {a.ready_count} waiting" if a.ready_count is not None else "")
                )
        if self.lag_bytes is not None:
            lines.append(f"  archive lag: {self.lag_bytes} bytes, {self.lag_seconds or 0:.0f} s")
        for problem in self.problems:
            lines.append(f"  PROBLEM {problem}")
        for warning in self.warnings:
            lines.append(f"  WARNING {warning}")
        return "\n".join(lines)


def _histories(
    repo: Repository, archive: dict[str, str], settings: WalSettings
) -> tuple[dict[int, Switch], list[str]]:
    switches: dict[int, Switch] = {}
    problems: list[str] = []
    for name, key in archive.items():
        if not name.endswith(".history"):
            continue
        tli = int(name[:8], 16)
        try:
            _h, raw = decode_object(repo.iter_object(key), settings, f"archived {name}")
            text = b"".join(raw).decode("utf-8", "replace")
        except DRError as exc:
            problems.append(f"{name} is unreadable: {one_line(exc)}")
            continue
        lines = parse_history(text)
        if lines:
            parent, lsn = lines[-1]
            switches[tli] = Switch(child=tli, parent=parent, lsn=lsn)
    return switches, problems


def verify_archived(repo: Repository, name: str, settings: WalSettings) -> None:
    """Re-read one archived file end to end (NotFound or ChecksumMismatch when it is not intact)."""
    key = find_object(repo, name, settings)
    if key is None:
        raise NotFound(f"{name} is not in the repository")
    _h, raw = decode_object(repo.iter_object(key), settings, f"archived {name}")
    for _chunk in raw:
        pass


def check_wal(
    cfg: Config, repo: Repository, *, server: bool = True, now: datetime | None = None
) -> WalCheckReport:
    """Continuity of the archive and, with ``server``, the archiver's health and lag."""
    from tasks.backup import list_backups

    t0 = time.monotonic()
    now = now or datetime.now(UTC)
    settings = WalSettings.from_config(cfg.repository)
    report = WalCheckReport(cluster=cfg.cluster, repository=repo.url, checked_at=now)
    backups = [m for m in list_backups(repo, cfg.cluster) if m.kind == "physical" and m.start_wal]
    report.problems += judge_backups(repo, cfg.cluster)
    keys = repo.list_keys("wal")
    archive = list_archive(repo, keys)
    report.archived_files = len(archive)
    for name, variants in sorted(duplicate_variants(keys).items()):
        report.problems.append(
            f"{name} is archived {len(variants)} times ({', '.join(k.rsplit('/', 1)[-1] for k in variants)}): "
            "wal-fetch may return either; keep the copy PostgreSQL wrote and remove the others by hand"
        )
    seg_size = backups[0].wal_segment_size if backups else SEGMENT_SIZE
    if backups:
        report.oldest_backup, report.start_wal = backups[0].id, backups[0].start_wal
    switches, problems = _histories(repo, archive, settings)
    report.problems += problems
    gaps, spans, problems = find_gaps(
        archive, start_wal=report.start_wal, switches=switches, seg_size=seg_size
    )
    report.gaps, report.timelines = gaps, spans
    report.problems += problems
    segs = [parse_wal_name(n, seg_size) for n in archive]
    full = [w for w in segs if w.kind == "segment" and w.segno is not None]
    newest = max(full, key=lambda w: (w.segno or 0, w.timeline)) if full else None
    report.newest_segment = newest.name if newest else None
    if server:
        status = read_archiver(cfg.primary.dsn)
        report.archiver = status
        judge_archiver(report, status, repo, settings, archive, now)
    report.seconds = time.monotonic() - t0
    return report


def judge_backups(repo: Repository, cluster: str) -> list[str]:
    """What restore would fall back from: the newest physical backups that cannot be restored
    (manifest unreadable, an object missing or cut), newest first, down to one that can."""
    from tasks.backup import check_objects, read_catalog

    problems: list[str] = []
    for e in reversed(read_catalog(repo, cluster)):
        if e.manifest is None:
            problems.append(f"backup {e.backup_id} is INVALID: {e.reason}")
            continue
        if e.manifest.kind != "physical":
            continue
        problem = check_objects(repo, e.manifest)
        if problem is None:
            if problems:
                problems.append(f"the newest restorable physical backup is {e.manifest.id}")
            return problems
        problems.append(
            f"the newest physical backup {e.manifest.id} is BROKEN: {problem}"
            if not any("BROKEN" in p for p in problems)
            else f"backup {e.manifest.id} is BROKEN: {problem}"
        )
    if problems:
        problems.append("no physical backup in the repository can be restored")
    return problems


def judge_archiver(
    report: WalCheckReport,
    a: ArchiverStatus,
    repo: Repository,
    settings: WalSettings,
    archive: dict[str, str],
    now: datetime,
) -> None:
    if not a.reachable:
        report.problems.append(f"archiver state unknown: {a.error}")
        return
    if a.in_recovery:
        # A standby's pg_stat_archiver says nothing about the primary's archiving ("0 archived"
        # on a stuck former primary is not an OK): say which node was asked.
        report.warnings.append(
            "the node checked is in recovery (a standby): its archiver counts are not the primary's "
            "and the archive lag is not measured — point the check at the primary (failover moved it?)"
        )
    if a.archive_mode == "off":
        report.problems.append("archive_mode is off on the server: nothing is being archived")
    if not a.archive_timeout_s:
        report.warnings.append(
            "archive_timeout is 0: after a burst the last writes wait in an unfinished segment until "
            "more WAL comes; set archive_timeout = 60s to bound the RPO to about a minute"
        )
    if a.failing:
        report.problems.append(
            f"archiving is failing: {a.failed_count} failure(s), the last for {a.last_failed_wal} "
            f"at {a.last_failed_time.isoformat() if a.last_failed_time else '?'}"
        )
    if a.last_archived_wal:
        _verify_last_archived(report, a.last_archived_wal, repo, settings)
    if a.current_lsn and a.timeline and not a.in_recovery:
        _measure_lag(report, a, archive, now)


def _verify_last_archived(report: WalCheckReport, name: str, repo: Repository, settings: WalSettings) -> None:
    """The file the server last reported archived must be in the repository, intact."""
    try:
        verify_archived(repo, name, settings)
        report.last_archived_verified = True
    except DRError as exc:
        report.last_archived_verified = False
        report.problems.append(
            f"the server reports {name} archived, but the repository copy is not usable: {one_line(exc)}"
        )


def _measure_lag(report: WalCheckReport, a: ArchiverStatus, archive: dict[str, str], now: datetime) -> None:
    """Lag: WAL written since the end of the newest segment of the server's timeline that is
    really in the repository (what a restore could reach), and for how long."""
    assert a.current_lsn is not None
    mine = [parse_wal_name(n, a.seg_size) for n in archive]
    segnos = [
        w.segno for w in mine if w.timeline == a.timeline and w.kind == "segment" and w.segno is not None
    ]
    current = parse_lsn(a.current_lsn)
    if segnos:
        end = (max(segnos) + 1) * a.seg_size
        report.lag_bytes = max(0, current - end)
    else:
        report.lag_bytes = current % a.seg_size if a.last_archived_wal else current
    if report.lag_bytes == 0:
        report.lag_seconds = 0.0
    elif a.last_archived_time is not None:
        report.lag_seconds = max(0.0, (now - a.last_archived_time).total_seconds())


# ---------------------------------------------------------------- lag between checks


class WalCheckFailed(PermanentError):
    """The check ran to the end and found problems; carries the report (the CLI prints it)."""

    def __init__(self, report: WalCheckReport) -> None:
        super().__init__(report.summary())
        self.report = report


class LagSample(BaseModel):
    """The archive lag as the server reports it (pg_stat_archiver), between two full checks."""

    at: datetime
    reachable: bool
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    last_archived_wal: str | None = None
    error: str | None = None


def server_lag(a: ArchiverStatus, now: datetime) -> LagSample:
    """WAL written past the end of the last segment the server archived, and for how long.

    Cheaper than the full check (no repository listing): the full check, every few minutes,
    proves the repository really holds what the server reports archived.
    """
    sample = LagSample(at=now, reachable=a.reachable, last_archived_wal=a.last_archived_wal, error=a.error)
    if not a.reachable or a.in_recovery or not a.current_lsn:
        return sample
    current = parse_lsn(a.current_lsn)
    last = None
    if a.last_archived_wal:
        try:
            last = parse_wal_name(a.last_archived_wal, a.seg_size)
        except DRError:
            last = None
    if last is not None and last.kind == "segment" and last.segno is not None and last.timeline == a.timeline:
        sample.lag_bytes = max(0, current - (last.segno + 1) * a.seg_size)
    elif a.last_archived_wal is None:
        sample.lag_bytes = current
    else:  # the last file was a .history/.backup/.partial: lag unknown until the next segment
        return sample
    if sample.lag_bytes == 0:
        sample.lag_seconds = 0.0
    elif a.last_archived_time is not None:
        sample.lag_seconds = max(0.0, (now - a.last_archived_time).total_seconds())
    return sample
