"""Pure logic: what a restore or a drill can expect of WAL replay past its backup.

Decisions the restore and drill flows take from the backup's manifest, the archive's listing and
what the server reports — kept here, out of the flows, so they have unit tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel

from tasks.errors import DRError
from tasks.models import Manifest
from tasks.recovery import RecoveryOutcome, RecoveryTarget
from tasks.walnames import parse_lsn, parse_wal_name, segment_name, wal_segno


class ArchiveView(BaseModel):
    """What the WAL archive holds after a backup: does recovery need restore_command at all,
    and where does the archive end (the start of its newest segment, per timeline)."""

    has_wal_after_backup: bool
    newest_segment_start: dict[int, int]
    newest_segment_name: dict[int, str]


def archive_view(names: Iterable[str], manifest: Manifest) -> ArchiveView:
    """The view of an archive holding ``names`` (WAL file names) from ``manifest``'s backup on."""
    seg = manifest.wal_segment_size
    newest: dict[int, int] = {}
    after = False
    stop_wal = parse_wal_name(manifest.stop_wal, seg) if manifest.stop_wal else None
    for name in names:
        wal = parse_wal_name(name, seg)
        if wal.kind == "history" and wal.timeline > manifest.timeline:
            after = True
        if wal.kind != "segment" or wal.segno is None or wal.timeline < manifest.timeline:
            continue
        newest[wal.timeline] = max(newest.get(wal.timeline, 0), wal.segno)
        if (
            stop_wal is None
            or wal.timeline > manifest.timeline
            or (stop_wal.segno is not None and wal.segno >= stop_wal.segno)
        ):
            after = True
    return ArchiveView(
        has_wal_after_backup=after,
        newest_segment_start={t: s * seg for t, s in newest.items()},
        newest_segment_name={t: segment_name(t, s, seg) for t, s in newest.items()},
    )


def describe_archive_view(view: ArchiveView, manifest: Manifest) -> str:
    """The line a restore logs about the archive: where it ends, or that recovery stops at the
    backup's end point because nothing was archived after it."""
    if view.has_wal_after_backup:
        ends = ", ".join(f"timeline {t}: {n}" for t, n in sorted(view.newest_segment_name.items()))
        return f"the WAL archive continues after the backup (newest segment {ends})"
    return (
        f"the WAL archive holds nothing after backup {manifest.id}: recovery ends at the backup's "
        f"end point ({manifest.stop_lsn})"
    )


def names_past_backup(manifest: Manifest) -> list[str]:
    """WAL files whose presence in the archive means replay can go on past the backup's last
    segment: the next segment on its timeline, or the next timeline's history file."""
    if not manifest.stop_wal:
        return []
    tli, segno = wal_segno(manifest.stop_wal, manifest.wal_segment_size)
    return [segment_name(tli, segno + 1, manifest.wal_segment_size), f"{tli + 1:08X}.history"]


def counts_lsn_in_reach(manifest: Manifest, target: RecoveryTarget) -> tuple[bool, bool]:
    """(wanted, at_or_after) for the LSN the backup read its row counts at: is pausing there worth
    looking for its WAL (the drill replays to the end, or to an LSN at or after it), and is the
    target an LSN at or after it. An unparsable LSN is never at or after."""
    lsn = manifest.row_counts_lsn
    at_or_after = False
    if lsn and target.kind == "lsn" and target.value:
        try:
            at_or_after = parse_lsn(target.value) >= parse_lsn(lsn)
        except DRError:
            at_or_after = False
    wanted = bool(manifest.row_counts) and bool(lsn) and (target.kind == "end" or at_or_after)
    return wanted, at_or_after


def segment_to_find(manifest: Manifest, lsn: str) -> str | None:
    """The archived WAL segment recovery needs to reach ``lsn`` on the backup's timeline; None
    when the backup's own WAL holds it (nothing to look for). Raises DRError on a bad LSN."""
    seg = manifest.wal_segment_size
    segno = parse_lsn(lsn) // seg
    if manifest.stop_wal and segno <= wal_segno(manifest.stop_wal, seg)[1]:
        return None
    return segment_name(manifest.timeline, segno, seg)


def may_pass_backup_by_target(manifest: Manifest, target: RecoveryTarget) -> bool | None:
    """Can recovery go on past the backup's consistent point, as far as the target alone says?
    Never towards ``immediate``; always towards a target (it lies past the backup) or without a
    known last segment; None towards the end of the archive: it depends on whether the archive
    holds one of ``names_past_backup``."""
    if target.kind == "immediate":
        return False
    if target.kind != "end" or not manifest.stop_wal:
        return True
    return None


def past_backup(manifest: Manifest, reached_lsn: str | None) -> bool:
    """Did recovery replay WAL beyond the segments that came with the backup?"""
    if not reached_lsn or not manifest.stop_wal:
        return False
    try:
        # the switch point is the first byte of the new timeline: the last replayed byte is before it
        reached = max(parse_lsn(reached_lsn) - 1, 0) // manifest.wal_segment_size
    except DRError:
        return False
    return reached > wal_segno(manifest.stop_wal, manifest.wal_segment_size)[1]


def recovered_to(
    manifest: Manifest, target: RecoveryTarget, outcome: RecoveryOutcome, past: bool
) -> datetime:
    """The point in time the restored data stands for: the target time, else the last replayed
    commit when replay went past the backup, else the backup's end."""
    if target.kind == "time" and target.time is not None:
        return target.time
    if past and outcome.last_xact_time is not None:
        return max(manifest.stop_time, outcome.last_xact_time)
    return manifest.stop_time
