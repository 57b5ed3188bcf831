"""Pure logic: which backups and WAL files retention keeps, plus the two thin steps that read the
repository's state and apply a plan, through the Repository interface only.

Rules (DESIGN.md): keep at least ``retention.min_full`` complete backups (of each kind) and every
backup that ended within ``retention.full_days``; keep every WAL file a kept physical backup
needs to recover to its end point and on to the newest WAL — from the oldest kept physical
backup's start segment onward, on its timeline and every later one; ``.history`` files always.
When no backup would be kept, nothing at all is deleted.

A backup exists while its manifest exists, so an expired backup loses its manifest FIRST and its
data objects after: a crash in between leaves unlisted objects (collected as orphans by the next
run), never a listed backup with objects missing.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.config import RetentionConfig
from tasks.errors import NotFound, one_line
from tasks.models import BACKUP_ID_RE, Manifest, backup_time
from tasks.repository import Incomplete, Repository

log = logging.getLogger(__name__)

BACKUPS_PREFIX = "backups"
WAL_PREFIX = "wal"
MANIFEST_NAME = "manifest.json"
# An unlisted backup folder younger than this may be a backup still being written.
ORPHAN_GRACE = timedelta(days=1)

# wal/<timeline>/<file>: a segment, <segment>.partial, <segment>.<offset>.backup, <tli>.history,
# each optionally followed by codec/encryption suffixes (.zst, .lz4, .gz, .enc, ...).
_SEGMENT_RE = re.compile(r"^(?P<tli>[0-9A-F]{8})(?P<pos>[0-9A-F]{16})(?P<rest>(\..*)?)$")
_HISTORY_RE = re.compile(r"^(?P<tli>[0-9A-F]{8})\.history(\..*)?$")
_BACKUP_LABEL_RE = re.compile(r"^\.[0-9A-F]{8}\.backup(\..*)?$")
_PARTIAL_RE = re.compile(r"^\.partial(\..*)?$")

WalKind = Literal["segment", "partial", "backup", "history", "other"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WalFile(_Frozen):
    """A key under ``wal/``, classified from its file name (PostgreSQL's XLogFileName)."""

    key: str
    kind: WalKind
    timeline: int | None = None
    position: str | None = None  # the 16 hex digits after the timeline: log id + segment

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


def parse_wal_key(key: str) -> WalFile:
    """Classify a repository key under ``wal/``; anything unrecognised is ``other`` (kept)."""
    name = key.rsplit("/", 1)[-1]
    if m := _HISTORY_RE.match(name):
        return WalFile(key=key, kind="history", timeline=int(m["tli"], 16))
    if m := _SEGMENT_RE.match(name):
        rest = m["rest"]
        kind: WalKind
        if _BACKUP_LABEL_RE.match(rest):
            kind = "backup"
        elif _PARTIAL_RE.match(rest):
            kind = "partial"
        elif rest == "" or not rest[1:2].isdigit():
            # bare segment, or a segment with codec/encryption suffixes only (.zst, .gz.enc)
            kind = "segment"
        else:
            return WalFile(key=key, kind="other")
        return WalFile(key=key, kind=kind, timeline=int(m["tli"], 16), position=m["pos"])
    return WalFile(key=key, kind="other")


class WalNeed(_Frozen):
    """WAL a kept physical backup needs: from ``start_wal`` on its timeline, and later timelines."""

    backup_id: str
    timeline: int
    position: str

    def covers(self, wal: WalFile) -> bool:
        if wal.timeline is None or wal.position is None:
            return True
        if wal.timeline != self.timeline:
            return wal.timeline > self.timeline
        # Same timeline: the 16 hex digits compare like the segment numbers they encode.
        return wal.position >= self.position


class BackupDecision(_Frozen):
    backup_id: str
    kind: str
    cluster: str
    stop_time: datetime
    keep: bool
    reason: str


class ExpiredBackup(_Frozen):
    backup_id: str
    manifest_key: str
    object_keys: list[str]  # every other key under the backup's folder


class RetentionPlan(_Frozen):
    decisions: list[BackupDecision]
    expire: list[ExpiredBackup]
    orphan_keys: list[str]
    expire_wal: list[str]
    kept_wal: int
    wal_needs: list[WalNeed]
    notes: list[str]

    @property
    def kept(self) -> list[str]:
        return [d.backup_id for d in self.decisions if d.keep]

    @property
    def deletes_anything(self) -> bool:
        return bool(self.expire or self.orphan_keys or self.expire_wal)


class RepositoryState(_Frozen):
    """What retention reads from the repository before deciding anything. ``invalid`` maps the
    id of a folder whose manifest cannot be read to why; ``broken`` maps a backup whose objects
    failed a check to what is wrong; ``verified`` lists those whose content was re-read."""

    manifests: list[Manifest]
    backup_keys: list[str]
    wal_keys: list[str]
    locked_backup_id: str | None = None
    invalid: dict[str, str] = {}
    broken: dict[str, str] = {}
    verified: list[str] = []


def _backup_id_of(key: str) -> str | None:
    parts = key.split("/")
    if len(parts) >= 3 and parts[0] == BACKUPS_PREFIX:
        return parts[1]
    return None


def decide_backups(
    manifests: Sequence[Manifest],
    policy: RetentionConfig,
    now: datetime,
    cluster: str,
    broken: Mapping[str, str] | None = None,
) -> list[BackupDecision]:
    """Keep the newest ``min_full`` good backups of each kind and all that ended within
    ``full_days``. A broken backup never counts toward ``min_full``: it is kept (for inspection)
    until ``min_full`` newer good backups of its kind exist and it is older than ``full_days``.

    Backups of other clusters sharing the repository are never expired here.
    """
    broken = broken or {}
    cutoff = now - timedelta(days=policy.full_days)
    decisions: list[BackupDecision] = []
    newest_first = sorted(manifests, key=lambda m: (m.stop_time, m.id), reverse=True)
    rank: dict[str, int] = {}
    for m in newest_first:
        if m.cluster != cluster:
            decisions.append(
                BackupDecision(
                    backup_id=m.id,
                    kind=m.kind,
                    cluster=m.cluster,
                    stop_time=m.stop_time,
                    keep=True,
                    reason=f"belongs to cluster {m.cluster}, not {cluster}",
                )
            )
            continue
        n = rank.get(m.kind, 0)
        if m.id in broken:
            if n < policy.min_full or m.stop_time >= cutoff:
                keep, reason = (
                    True,
                    (f"BROKEN ({broken[m.id]}): not counted toward min_full, kept for inspection"),
                )
            else:
                keep, reason = (
                    False,
                    (
                        f"BROKEN ({broken[m.id]}), ended {(now - m.stop_time).days} "
                        f"days ago, and {n} newer good {m.kind} backups are kept"
                    ),
                )
            decisions.append(
                BackupDecision(
                    backup_id=m.id,
                    kind=m.kind,
                    cluster=m.cluster,
                    stop_time=m.stop_time,
                    keep=keep,
                    reason=reason,
                )
            )
            continue
        rank[m.kind] = n + 1
        if n < policy.min_full:
            keep, reason = True, f"one of the newest {policy.min_full} good {m.kind} backups"
        elif m.stop_time >= cutoff:
            keep, reason = True, f"ended within {policy.full_days} days"
        else:
            keep, reason = (
                False,
                (
                    f"ended {(now - m.stop_time).days} days ago, older than {policy.full_days} days, "
                    f"and {n} newer {m.kind} backups are kept"
                ),
            )
        decisions.append(
            BackupDecision(
                backup_id=m.id,
                kind=m.kind,
                cluster=m.cluster,
                stop_time=m.stop_time,
                keep=keep,
                reason=reason,
            )
        )
    return sorted(decisions, key=lambda d: (d.stop_time, d.backup_id))


def plan_retention(
    state: RepositoryState,
    policy: RetentionConfig,
    now: datetime,
    cluster: str,
    orphan_grace: timedelta = ORPHAN_GRACE,
) -> RetentionPlan:
    """Decide what to delete. Pure: the same state, policy and time give the same plan."""
    notes: list[str] = []
    decisions = decide_backups(state.manifests, policy, now, cluster, state.broken)
    kept_ids = {d.backup_id for d in decisions if d.keep}
    by_id = {m.id: m for m in state.manifests}
    notes += [f"BROKEN backup {b}: {why}" for b, why in sorted(state.broken.items())]
    notes += [f"INVALID backup {b}: {why} (left alone)" for b, why in sorted(state.invalid.items())]
    keys_by_backup = keys_by_backup_id(state.backup_keys)

    if not kept_ids - set(state.broken):
        notes.append("no complete backup that verifies in the repository: nothing is deleted")
        return RetentionPlan(
            decisions=decisions,
            expire=[],
            orphan_keys=[],
            expire_wal=[],
            kept_wal=len(state.wal_keys),
            wal_needs=[],
            notes=notes,
        )

    expire = expired_backups(decisions, keys_by_backup)
    orphan_keys, orphan_notes = orphan_folders(keys_by_backup, state, now, orphan_grace)
    notes += orphan_notes
    wal = [parse_wal_key(k) for k in state.wal_keys]
    needs, untouched = wal_needs([by_id[b] for b in kept_ids if by_id[b].kind == "physical"])
    if untouched:
        notes.append(untouched)
    expire_wal = expired_wal(wal, needs)
    others = [w.key for w in wal if w.kind == "other"]
    if others:
        notes.append(f"left alone: {len(others)} unrecognised key(s) under wal/, e.g. {others[0]}")
    needs.sort(key=lambda n: (n.timeline, n.position))
    return RetentionPlan(
        decisions=decisions,
        expire=expire,
        orphan_keys=orphan_keys,
        expire_wal=expire_wal,
        kept_wal=len(wal) - len(expire_wal),
        wal_needs=needs,
        notes=notes,
    )


def keys_by_backup_id(backup_keys: Iterable[str]) -> dict[str, list[str]]:
    """The keys under ``backups/`` grouped by the backup folder they are in."""
    grouped: dict[str, list[str]] = {}
    for key in backup_keys:
        bid = _backup_id_of(key)
        if bid is not None:
            grouped.setdefault(bid, []).append(key)
    return grouped


def expired_backups(
    decisions: Iterable[BackupDecision], keys_by_backup: Mapping[str, list[str]]
) -> list[ExpiredBackup]:
    """Each backup not kept: its manifest key (deleted first) and every other key of its folder."""
    expire = []
    for d in decisions:
        if d.keep:
            continue
        manifest_key = f"{BACKUPS_PREFIX}/{d.backup_id}/{MANIFEST_NAME}"
        others = sorted(k for k in keys_by_backup.get(d.backup_id, []) if k != manifest_key)
        expire.append(ExpiredBackup(backup_id=d.backup_id, manifest_key=manifest_key, object_keys=others))
    return expire


def orphan_folders(
    keys_by_backup: Mapping[str, list[str]], state: RepositoryState, now: datetime, grace: timedelta
) -> tuple[list[str], list[str]]:
    """Folders without a manifest: a failed attempt, or an expiry interrupted after the manifest
    went. Their keys to delete, and a note for each one left alone: young ones (a backup may be
    writing them), the one holding the lock, and folders not named like a backup."""
    listed = {m.id for m in state.manifests}
    keys: list[str] = []
    notes: list[str] = []
    for bid, folder in sorted(keys_by_backup.items()):
        if bid in listed or bid in state.invalid:
            continue
        why = _why_folder_stays(bid, state.locked_backup_id, now, grace)
        if why is None:
            keys.extend(sorted(folder))
        else:
            notes.append(why)
    return keys, notes


def _why_folder_stays(bid: str, locked_backup_id: str | None, now: datetime, grace: timedelta) -> str | None:
    if not BACKUP_ID_RE.match(bid):
        return f"left alone: backups/{bid}/ is not named like a backup"
    if bid == locked_backup_id:
        return f"left alone: backup {bid} holds the backup lock (still running?)"
    if now - backup_time(bid) < grace:
        return f"left alone: backups/{bid}/ has no manifest yet but is recent"
    return None


def wal_needs(kept_physical: Sequence[Manifest]) -> tuple[list[WalNeed], str | None]:
    """The WAL each kept physical backup needs; or none, and why all WAL is left untouched."""
    if not kept_physical:
        return [], "no physical backup is kept: WAL is left untouched"
    unknown_start = [m.id for m in kept_physical if not m.start_wal]
    if unknown_start:
        return [], f"kept backup {unknown_start[0]} does not record its start WAL: WAL is left untouched"
    needs: list[WalNeed] = []
    for m in kept_physical:
        start = parse_wal_key(m.start_wal or "")
        if start.timeline is None or start.position is None or start.kind != "segment":
            return (
                [],
                f"kept backup {m.id} has an unreadable start WAL {m.start_wal!r}: WAL is left untouched",
            )
        needs.append(WalNeed(backup_id=m.id, timeline=start.timeline, position=start.position))
    return needs, None


def expired_wal(wal: Iterable[WalFile], needs: Sequence[WalNeed]) -> list[str]:
    """Segments, partials and backup labels no kept backup needs (none without needs), oldest first,
    so an interrupted run never leaves a hole inside the kept range; history files always stay."""
    if not needs:
        return []
    keys = [w.key for w in wal if w.kind not in ("history", "other") and not any(n.covers(w) for n in needs)]
    keys.sort(key=lambda k: (parse_wal_key(k).timeline or 0, parse_wal_key(k).name))
    return keys


# ---------------------------------------------------------------- the repository side


def read_state(repo: Repository) -> RepositoryState:
    """List backups and WAL and read every manifest; an unreadable one is recorded as INVALID
    (its folder is left alone) and the others are still read."""
    from tasks.backup import lock_is_stale, read_catalog, read_lock

    backup_keys = repo.list_keys(BACKUPS_PREFIX)
    catalog = read_catalog(repo)
    manifests = [e.manifest for e in catalog if e.manifest is not None]
    invalid = {e.backup_id: e.reason for e in catalog if e.manifest is None}
    lock = read_lock(repo)
    # A lock protects the folder of a running backup; a stale one (its holder is gone) does not.
    live = lock is not None and not lock_is_stale(lock, repo)
    locked = str(lock["backup_id"]) if lock and live and lock.get("backup_id") else None
    return RepositoryState(
        manifests=manifests,
        backup_keys=backup_keys,
        wal_keys=repo.list_keys(WAL_PREFIX),
        locked_backup_id=locked,
        invalid=invalid,
    )


def relied_on(
    state: RepositoryState, policy: RetentionConfig, cluster: str, broken: Mapping[str, str]
) -> list[Manifest]:
    """The backups retention counts toward ``min_full``: the newest good ones of each kind."""
    newest_first = sorted(state.manifests, key=lambda m: (m.stop_time, m.id), reverse=True)
    rank: dict[str, int] = {}
    out = []
    for m in newest_first:
        if m.cluster != cluster or m.id in broken:
            continue
        rank[m.kind] = rank.get(m.kind, 0) + 1
        if rank[m.kind] <= policy.min_full:
            out.append(m)
    return out


def verify_backups(
    repo: Repository, state: RepositoryState, policy: RetentionConfig, cluster: str
) -> RepositoryState:
    """Check before trusting: every backup of the cluster gets the cheap check (each object
    present with its recorded size); with ``retention.verify: content`` the backups counted
    toward ``min_full`` are also re-read in full (size and SHA-256 of the stored bytes), and a
    failing one is replaced by the next older one, which is checked in turn. Repository errors
    that may pass (timeouts, 5xx) propagate: retention then deletes nothing."""
    from tasks.backup import check_objects, verify_objects
    from tasks.errors import ChecksumMismatch

    broken: dict[str, str] = {}
    for m in state.manifests:
        problem = check_objects(repo, m) if m.cluster == cluster else None
        if problem is not None:
            broken[m.id] = problem
    verified: list[str] = []
    if policy.verify == "content":
        while True:
            todo = [m for m in relied_on(state, policy, cluster, broken) if m.id not in verified]
            if not todo:
                break
            for m in todo:
                try:
                    verify_objects(repo, m)
                    verified.append(m.id)
                except (ChecksumMismatch, NotFound) as exc:
                    broken[m.id] = one_line(exc)
    return state.model_copy(update={"broken": broken, "verified": verified})


def find_leftovers(repo: Repository, grace: timedelta, locked_backup_id: str | None) -> list[Incomplete]:
    """Open multipart uploads and temporary files at least ``grace`` old, except those of the
    backup holding a live lock."""
    items = repo.find_incomplete(grace.total_seconds())
    if locked_backup_id:
        mine = f"{BACKUPS_PREFIX}/{locked_backup_id}/"
        items = [i for i in items if not i.key.startswith(mine)]
    # A backup's id says when it started: an upload of a backup younger than the grace period is
    # left alone whatever the store reports as its start (some S3-compatible stores get it wrong).
    now = datetime.now(UTC)
    out = []
    for item in items:
        bid = _backup_id_of(item.key)
        if bid is not None and BACKUP_ID_RE.match(bid) and now - backup_time(bid) < grace:
            continue
        out.append(item)
    return out


def sweep_leftovers(repo: Repository, items: Sequence[Incomplete]) -> int:
    """Abort / remove them; returns the bytes freed."""
    freed = 0
    for item in items:
        repo.remove_incomplete(item)
        freed += item.size
    return freed


def expired_step_results(
    written: Mapping[str, datetime | None], now: datetime, max_age: timedelta
) -> tuple[list[str], list[str]]:
    """The node-step outcomes to delete (recorded more than ``max_age`` ago), and notes on the ones
    left alone because when they were written is unknown (unreadable: never guessed old)."""
    old = sorted(k for k, at in written.items() if at is not None and now - at > max_age)
    unknown = sorted(k for k, at in written.items() if at is None)
    notes = [f"left alone {k}: not a readable node-step outcome (its age is unknown)" for k in unknown]
    return old, notes


def read_step_result_times(repo: Repository) -> dict[str, datetime | None]:
    """When each ``node-steps/*.json`` outcome was recorded (its ``at``), None when unreadable."""
    from pydantic import ValidationError

    from tasks.node_steps import RESULT_PREFIX, NodeStepResult

    out: dict[str, datetime | None] = {}
    for key in repo.list_keys(RESULT_PREFIX.rstrip("/")):
        if not key.endswith(".json"):
            continue
        try:
            out[key] = NodeStepResult.model_validate_json(repo.get_bytes(key)).at
        except NotFound:
            continue  # deleted meanwhile
        except (ValueError, ValidationError):
            out[key] = None
    return out


def _delete_all(repo: Repository, keys: Iterable[str], workers: int = 8) -> int:
    keys = list(keys)
    if not keys:
        return 0

    def one(key: str) -> None:
        with contextlib.suppress(NotFound):
            repo.delete(key)

    with ThreadPoolExecutor(min(workers, len(keys)), thread_name_prefix="expire") as pool:
        list(pool.map(one, keys))
    return len(keys)


def expire_backup(repo: Repository, backup: ExpiredBackup) -> int:
    """Manifest first (the backup stops existing), then its data objects."""
    repo.delete(backup.manifest_key)
    return 1 + _delete_all(repo, backup.object_keys)


def delete_keys(
    repo: Repository, keys: Sequence[str], progress: Callable[[int], None] | None = None, batch: int = 500
) -> int:
    """Delete keys in order, in concurrent batches; returns how many were deleted."""
    done = 0
    for i in range(0, len(keys), batch):
        done += _delete_all(repo, keys[i : i + batch])
        if progress is not None:
            progress(done)
    return done
