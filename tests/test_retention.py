"""Retention: table-driven tests of the selection logic, then expiry on a file and an S3 repository."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

from gravl_testlib import run_cli, write_config
from tasks.backup import list_backups
from tasks.config import RepositoryConfig, RetentionConfig
from tasks.models import Manifest, StoredObject, new_backup_id
from tasks.repository import FileRepository, Repository, open_repository
from tasks.retention import (
    RepositoryState,
    WalFile,
    expire_backup,
    parse_wal_key,
    plan_retention,
    read_state,
)

NOW = datetime(2026, 11, 24, 4, 30, tzinfo=UTC)
SEG = "000000010000000000000000"


def seg(tli: int, n: int, suffix: str = ".zst") -> str:
    return f"wal/{tli:08X}/{tli:08X}{n >> 8:08X}{n & 0xFF:08X}{suffix}"


def manifest(
    days_ago: float,
    kind: Literal["physical", "logical"] = "physical",
    start: int | None = 10,
    tli: int = 1,
    cluster: str = "gravl",
) -> Manifest:
    stop = NOW - timedelta(days=days_ago)
    bid = new_backup_id(kind, stop - timedelta(minutes=5))
    return Manifest(
        id=bid,
        kind=kind,
        cluster=cluster,
        pg_version=150018,
        system_identifier="7300000000000000001",
        timeline=tli,
        start_wal=(
            f"{tli:08X}{start >> 8:08X}{start & 0xFF:08X}"
            if start is not None and kind == "physical"
            else None
        ),
        start_time=stop - timedelta(minutes=5),
        stop_time=stop,
        codec="zstd",
        objects=[
            StoredObject(key="base.tar.zst", size=10, sha256="0" * 64, raw_size=20, raw_sha256="1" * 64)
        ],
    )


def keys_of(m: Manifest) -> list[str]:
    return [f"backups/{m.id}/manifest.json", f"backups/{m.id}/base.tar.zst"]


def state(
    manifests: list[Manifest],
    wal: Sequence[str] = (),
    extra_backup_keys: Sequence[str] = (),
    locked: str | None = None,
) -> RepositoryState:
    keys = [k for m in manifests for k in keys_of(m)] + list(extra_backup_keys)
    return RepositoryState(
        manifests=manifests, backup_keys=sorted(keys), wal_keys=list(wal), locked_backup_id=locked
    )


# ---------------------------------------------------------------- WAL names


@pytest.mark.parametrize(
    ("key", "kind", "tli", "pos"),
    [
        ("wal/00000001/000000010000000000000003", "segment", 1, "0000000000000003"),
        ("wal/00000001/000000010000000000000003.zst", "segment", 1, "0000000000000003"),
        ("wal/00000001/000000010000000000000003.lz4.enc", "segment", 1, "0000000000000003"),
        ("wal/00000002/0000000200000001000000FF.gz", "segment", 2, "00000001000000FF"),
        ("wal/00000001/000000010000000000000003.partial", "partial", 1, "0000000000000003"),
        ("wal/00000001/000000010000000000000003.partial.zst", "partial", 1, "0000000000000003"),
        ("wal/00000001/000000010000000000000002.00000028.backup", "backup", 1, "0000000000000002"),
        ("wal/00000001/000000010000000000000002.00000028.backup.zst", "backup", 1, "0000000000000002"),
        ("wal/00000002/00000002.history", "history", 2, None),
        ("wal/00000002/00000002.history.zst", "history", 2, None),
        ("wal/00000001/README", "other", None, None),
        ("wal/00000001/00000001000000000000000", "other", None, None),  # 23 digits
        ("wal/00000001/000000010000000000000003.7", "other", None, None),
    ],
)
def test_wal_keys_are_classified(key: str, kind: str, tli: int | None, pos: str | None) -> None:
    assert parse_wal_key(key) == WalFile(key=key, kind=kind, timeline=tli, position=pos)  # type: ignore[arg-type]


# ---------------------------------------------------------------- backups kept and expired

POLICY = RetentionConfig(full_days=30, min_full=2)


@pytest.mark.parametrize(
    ("case", "ages", "policy", "kept"),
    [
        ("newest min_full are kept however old", [100, 90, 80], POLICY, [90, 80]),
        ("all within full_days are kept", [40, 20, 10, 5, 1], POLICY, [20, 10, 5, 1]),
        ("older than full_days beyond min_full expire", [60, 45, 31, 29], POLICY, [31, 29]),
        ("a single backup is always kept", [400], POLICY, [400]),
        ("full_days 0 keeps exactly min_full", [3, 2, 1], RetentionConfig(full_days=0, min_full=1), [1]),
        ("min_full above the count keeps all", [90, 80], RetentionConfig(full_days=1, min_full=5), [90, 80]),
    ],
)
def test_backups_kept_by_age_and_count(
    case: str, ages: list[float], policy: RetentionConfig, kept: list[float]
) -> None:
    ms = [manifest(a) for a in ages]
    plan = plan_retention(state(ms), policy, NOW, "gravl")
    assert plan.kept == [m.id for m, a in zip(ms, ages, strict=True) if a in kept], case
    assert [b.backup_id for b in plan.expire] == [
        m.id for m, a in zip(ms, ages, strict=True) if a not in kept
    ], case


def test_min_full_counts_each_kind_separately() -> None:
    # GIVEN two old physical backups and three newer logical ones
    phys = [manifest(90), manifest(80)]
    logi = [manifest(70, "logical"), manifest(60, "logical"), manifest(50, "logical")]
    # WHEN
    plan = plan_retention(state(phys + logi), POLICY, NOW, "gravl")
    # THEN newer logical backups do not push the last physical ones out
    assert set(plan.kept) == {phys[0].id, phys[1].id, logi[1].id, logi[2].id}
    assert [b.backup_id for b in plan.expire] == [logi[0].id]


def test_backups_of_another_cluster_are_never_expired() -> None:
    other = manifest(300, cluster="billing")
    ours = [manifest(200), manifest(100), manifest(50)]
    plan = plan_retention(state([other, *ours]), POLICY, NOW, "gravl")
    assert other.id in plan.kept
    assert [b.backup_id for b in plan.expire] == [ours[0].id]


def test_expired_backup_lists_its_manifest_and_every_other_object() -> None:
    old, a, b = manifest(90), manifest(2), manifest(1)
    extra = [f"backups/{old.id}/tablespace_16384.tar.zst"]
    plan = plan_retention(state([old, a, b], extra_backup_keys=extra), POLICY, NOW, "gravl")
    (exp,) = plan.expire
    assert exp.manifest_key == f"backups/{old.id}/manifest.json"
    assert exp.object_keys == sorted([f"backups/{old.id}/base.tar.zst", *extra])


def test_nothing_is_deleted_when_no_backup_exists() -> None:
    orphan = f"backups/{new_backup_id('physical', NOW - timedelta(days=9))}/base.tar.zst"
    plan = plan_retention(
        state([], wal=[seg(1, 1), seg(1, 2)], extra_backup_keys=[orphan]), POLICY, NOW, "gravl"
    )
    assert not plan.deletes_anything
    assert plan.kept_wal == 2
    assert "nothing is deleted" in plan.notes[0]


# ---------------------------------------------------------------- WAL kept and expired


def test_wal_is_kept_from_the_oldest_kept_physical_backup_onward() -> None:
    # GIVEN backups starting at segments 5 (expired), 10 and 20 on timeline 1, a promotion to
    # timeline 2 at segment 25, and WAL 1..30
    old, kept1, kept2 = manifest(90, start=5), manifest(2, start=10), manifest(1, start=20)
    wal = [seg(1, n) for n in range(1, 26)] + [seg(1, 25, ".partial.zst")]
    wal += [seg(2, n) for n in range(25, 31)] + ["wal/00000002/00000002.history.zst"]
    wal += [
        "wal/00000001/000000010000000000000005.00000028.backup.zst",
        "wal/00000001/00000001000000000000000A.00000028.backup.zst",
    ]
    # WHEN
    plan = plan_retention(state([old, kept1, kept2], wal=wal), POLICY, NOW, "gravl")
    # THEN timeline 1 before segment 10 goes (the old backup's label too); the rest stays
    expected = [seg(1, n) for n in range(1, 5)]
    expected += ["wal/00000001/000000010000000000000005.00000028.backup.zst"]
    expected += [seg(1, n) for n in range(5, 10)]
    assert sorted(plan.expire_wal) == sorted(expected)
    assert plan.kept_wal == len(wal) - len(expected)
    assert plan.wal_needs[0].backup_id == kept1.id
    # and deletion goes oldest first
    names = [k.rsplit("/", 1)[-1] for k in plan.expire_wal]
    assert names == sorted(names)


def test_wal_of_older_timelines_goes_once_every_kept_backup_is_on_a_later_one() -> None:
    old = manifest(90, start=5, tli=1)
    kept = [manifest(2, start=40, tli=3), manifest(1, start=50, tli=3)]
    wal = [
        seg(1, 5),
        seg(1, 30),
        seg(2, 30),
        seg(2, 35),
        seg(3, 35),
        seg(3, 40),
        seg(3, 41),
        seg(4, 45),
        "wal/00000002/00000002.history",
        "wal/00000003/00000003.history",
    ]
    plan = plan_retention(state([old, *kept], wal=wal), POLICY, NOW, "gravl")
    assert sorted(plan.expire_wal) == sorted([seg(1, 5), seg(1, 30), seg(2, 30), seg(2, 35), seg(3, 35)])


@pytest.mark.parametrize(
    ("case", "kept_backups"),
    [
        ("only logical backups are kept", [manifest(2, "logical"), manifest(1, "logical")]),
        ("a kept backup does not record its start WAL", [manifest(2, start=None), manifest(1)]),
    ],
)
def test_wal_is_left_untouched_when_its_need_is_unknown(case: str, kept_backups: list[Manifest]) -> None:
    old = manifest(90, "logical")
    wal = [seg(1, n) for n in range(1, 20)]
    plan = plan_retention(state([old, *kept_backups], wal=wal), POLICY, NOW, "gravl")
    assert plan.expire_wal == [], case
    assert plan.kept_wal == len(wal)
    assert any("WAL is left untouched" in n for n in plan.notes), plan.notes


def test_unrecognised_wal_keys_are_kept_and_reported() -> None:
    wal = [seg(1, 1), "wal/00000001/notes.txt"]
    plan = plan_retention(state([manifest(2, start=5), manifest(1, start=6)], wal=wal), POLICY, NOW, "gravl")
    assert plan.expire_wal == [seg(1, 1)]
    assert any("unrecognised" in n for n in plan.notes)


# ---------------------------------------------------------------- unlisted (orphaned) folders


def test_orphaned_objects_are_collected_only_when_old_and_unlocked() -> None:
    kept = [manifest(2), manifest(1)]
    old_orphan = new_backup_id("physical", NOW - timedelta(days=3))
    locked_orphan = new_backup_id("physical", NOW - timedelta(days=2))
    young_orphan = new_backup_id("logical", NOW - timedelta(hours=2))
    extra = [
        f"backups/{old_orphan}/base.tar.zst",
        f"backups/{old_orphan}/part.tar.zst",
        f"backups/{locked_orphan}/base.tar.zst",
        f"backups/{young_orphan}/dump.pgc.zst",
        "backups/not-a-backup/file",
    ]
    plan = plan_retention(state(kept, extra_backup_keys=extra, locked=locked_orphan), POLICY, NOW, "gravl")
    assert plan.orphan_keys == [f"backups/{old_orphan}/base.tar.zst", f"backups/{old_orphan}/part.tar.zst"]
    assert len([n for n in plan.notes if n.startswith("left alone")]) == 3


# ---------------------------------------------------------------- against real repositories


def _populate(repo: Repository, now: datetime) -> dict[str, Any]:
    """Four physical backups (40, 35, 3, 1 days old) starting at segments 2, 4, 8, 10 on timeline
    1, a promotion to timeline 2 at segment 11, WAL 1..11 and 11..12, an old orphaned folder."""
    starts = {40: 2, 35: 4, 3: 8, 1: 10}
    ms = []
    for age, start in starts.items():
        stop = now - timedelta(days=age)
        m = manifest(0, start=start).model_copy(
            update={
                "id": new_backup_id("physical", stop - timedelta(minutes=5)),
                "start_time": stop - timedelta(minutes=5),
                "stop_time": stop,
                # what is really stored: expire re-reads the backups it counts on
                "objects": [
                    StoredObject(
                        key="base.tar.zst",
                        size=10,
                        sha256=hashlib.sha256(b"x" * 10).hexdigest(),
                        raw_size=20,
                        raw_sha256="1" * 64,
                    )
                ],
            }
        )
        repo.put_bytes(f"backups/{m.id}/base.tar.zst", b"x" * 10)
        repo.put_bytes(f"backups/{m.id}/manifest.json", m.to_json())
        ms.append(m)
    wal = [seg(1, n) for n in range(1, 12)] + [seg(2, 11), seg(2, 12), "wal/00000002/00000002.history"]
    for key in wal:
        repo.put_bytes(key, b"w")
    orphan = new_backup_id("physical", now - timedelta(days=20))
    repo.put_bytes(f"backups/{orphan}/base.tar.zst", b"half")
    return {"manifests": ms, "wal": wal, "orphan": orphan}


def _expected_after(pop: dict[str, Any]) -> list[str]:
    kept = pop["manifests"][2:]
    keys = [k for m in kept for k in keys_of(m)]
    keys += [seg(1, n) for n in range(8, 12)] + [seg(2, 11), seg(2, 12), "wal/00000002/00000002.history"]
    return sorted(keys)


@pytest.fixture(params=["file", "s3"])
def repo_url(request: pytest.FixtureRequest) -> str:
    name = "file_repo_url" if request.param == "file" else "s3_repo_url"
    return str(request.getfixturevalue(name))


def test_expire_flow_deletes_expired_backups_orphans_and_wal(
    prefect_harness: None,
    repo_url: str,
    moto_endpoint: str,
    make_config: Callable[..., Path],
) -> None:
    from flows.retention import expire_flow

    # GIVEN a repository with two backups beyond 30 days, two recent ones, WAL and an orphan
    cfg_path = make_config(repo_url, moto=moto_endpoint, retention={"full_days": 30, "min_full": 2})
    repo = open_repository(
        RepositoryConfig(
            url=repo_url,
            endpoint_url=moto_endpoint if repo_url.startswith("s3://") else None,
            region="eu-north-1",
        )
    )
    pop = _populate(repo, datetime.now(UTC))
    before = repo.list_keys("")

    # WHEN a dry run, then a real run
    dry = expire_flow(config_path=str(cfg_path), dry_run=True)
    assert repo.list_keys("") == before
    report = expire_flow(config_path=str(cfg_path), dry_run=False)

    # THEN exactly the two old backups, the orphan and the WAL before the oldest kept start go
    expired = [m.id for m in pop["manifests"][:2]]
    assert dry.expired == report.expired == expired
    assert report.orphan_objects == 1
    assert report.wal_expired == 7  # timeline 1, segments 1..7
    assert repo.list_keys("") == _expected_after(pop)
    assert [m.id for m in list_backups(repo)] == [m.id for m in pop["manifests"][2:]]

    # AND a second run finds nothing more to do
    again = expire_flow(config_path=str(cfg_path), dry_run=False)
    assert again.expired == [] and again.wal_expired == 0 and again.orphan_objects == 0
    assert repo.list_keys("") == _expected_after(pop)


class _CrashAfter:
    """A real repository that dies after N deletes, like a process killed mid-expiry."""

    def __init__(self, inner: Repository, deletes: int) -> None:
        self.inner = inner
        self.left = deletes
        self.deleted: list[str] = []
        self.url = inner.url

    def delete(self, key: str) -> None:
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        self.inner.delete(key)
        self.deleted.append(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_interrupted_expiry_never_leaves_a_listed_backup_with_missing_objects(file_repo_dir: Path) -> None:
    # GIVEN an expired backup, and a process that is killed after its first delete
    repo = FileRepository(file_repo_dir, f"file://{file_repo_dir}")
    pop = _populate(repo, datetime.now(UTC))
    plan = plan_retention(read_state(repo), POLICY, datetime.now(UTC), "gravl")
    crashing = _CrashAfter(repo, deletes=1)
    # WHEN
    with pytest.raises(KeyboardInterrupt):
        expire_backup(crashing, plan.expire[0])
    # THEN the manifest went first: the backup is no longer listed, its data is still there
    victim = pop["manifests"][0]
    assert crashing.deleted == [f"backups/{victim.id}/manifest.json"]
    assert victim.id not in [m.id for m in list_backups(repo)]
    assert repo.exists(f"backups/{victim.id}/base.tar.zst")
    # AND the next run collects the leftover as an orphan
    plan2 = plan_retention(read_state(repo), POLICY, datetime.now(UTC), "gravl")
    assert f"backups/{victim.id}/base.tar.zst" in plan2.orphan_keys


def test_cli_expire_dry_run_prints_the_plan_and_deletes_nothing(
    prefect_harness: None,
    file_repo_url: str,
    file_repo_dir: Path,
    tmp_path: Path,
) -> None:
    import prefect.settings

    # GIVEN (the CLI runs against the session's Prefect API: no ephemeral server start-up)
    repo = FileRepository(file_repo_dir, file_repo_url)
    pop = _populate(repo, datetime.now(UTC))
    before = repo.list_keys("")
    cfg = write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 dbname=gravl"},
            "repository": {"url": file_repo_url},
            "retention": {"full_days": 30, "min_full": 2},
        },
    )
    api = str(prefect.settings.PREFECT_API_URL.value())
    # WHEN
    proc = run_cli("expire", "--dry-run", "--json", config=cfg, env={"PREFECT_API_URL": api})
    # THEN
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dry_run"] is True
    assert out["expired"] == [m.id for m in pop["manifests"][:2]]
    assert out["wal_expired"] == 7
    assert repo.list_keys("") == before


@pytest.mark.integration  # starts a process
def test_cli_expire_on_a_missing_repository_is_a_one_line_error(tmp_path: Path) -> None:
    from gravl_testlib import assert_one_line_error

    cfg = write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "primary": {"dsn": "host=127.0.0.1 port=1"},
            "repository": {"url": f"file://{tmp_path}/does-not-exist"},
        },
    )
    proc = run_cli("expire", config=cfg)
    assert_one_line_error(proc, "does not exist")


# ---------------------------------------------------------------- node-step outcomes


def test_node_step_outcomes_expire_by_the_age_they_were_recorded_at() -> None:
    from tasks.retention import expired_step_results

    written = {
        "node-steps/a.json": NOW - timedelta(days=8),
        "node-steps/b.json": NOW - timedelta(days=6, hours=23),
        "node-steps/c.json": None,  # unreadable: its age is unknown
        "node-steps/d.json": NOW - timedelta(minutes=1),
    }
    old, notes = expired_step_results(written, NOW, timedelta(days=7))
    assert old == ["node-steps/a.json"]
    assert notes == ["left alone node-steps/c.json: not a readable node-step outcome (its age is unknown)"]


def test_a_node_step_outcome_age_below_one_day_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RetentionConfig(node_step_days=0.5)


def test_expire_deletes_old_node_step_outcomes_only(
    prefect_harness: None,
    repo_url: str,
    moto_endpoint: str,
    make_config: Callable[..., Path],
) -> None:
    from flows.retention import expire_flow
    from tasks.node_steps import NodeStepResult, write_step_result

    # GIVEN a repository with one backup, and outcomes recorded 10 days, 3 days and a minute ago,
    # plus one that is not an outcome at all
    cfg_path = make_config(repo_url, moto=moto_endpoint, retention={"node_step_days": 7})
    repo = open_repository(
        RepositoryConfig(
            url=repo_url,
            endpoint_url=moto_endpoint if repo_url.startswith("s3://") else None,
            region="eu-north-1",
        )
    )
    now = datetime.now(UTC)
    m = manifest(1)
    repo.put_bytes(f"backups/{m.id}/manifest.json", m.to_json())
    for run_id, age in (
        ("old", timedelta(days=10)),
        ("week", timedelta(days=3)),
        ("new", timedelta(minutes=1)),
    ):
        write_step_result(
            repo, run_id, NodeStepResult(step="fence", node="primary", ok=True, host="h", at=now - age)
        )
    repo.put_bytes("node-steps/garbage.json", b"{not json")
    before = repo.list_keys("node-steps")

    # WHEN a dry run, then a real one
    dry = expire_flow(config_path=str(cfg_path), dry_run=True)
    assert dry.node_step_results == 1 and repo.list_keys("node-steps") == before
    report = expire_flow(config_path=str(cfg_path), dry_run=False)

    # THEN only the 10-day-old outcome is gone; the unreadable one is named, not guessed old
    assert report.node_step_results == 1
    assert repo.list_keys("node-steps") == [
        "node-steps/garbage.json",
        "node-steps/new.json",
        "node-steps/week.json",
    ]
    assert any("node-steps/garbage.json" in n for n in report.notes), report.notes
    assert [b.id for b in list_backups(repo)] == [m.id]
