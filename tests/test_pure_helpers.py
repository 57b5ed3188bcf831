"""Pure pieces split out of longer functions (retention planning, cluster facts, rollout waits)
and poll_until's back-off: table-driven, no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from test_pure_logic import FakeClock

from tasks.counts import databases_to_count, snapshots_agree
from tasks.expectations import ExpectationSpec, group_by_table, results_of
from tasks.hooks import rollout_done
from tasks.models import Manifest
from tasks.polling import poll_until
from tasks.retention import (
    RepositoryState,
    expired_wal,
    keys_by_backup_id,
    orphan_folders,
    parse_wal_key,
    wal_needs,
)


def test_poll_until_backs_off_by_the_time_waited_and_still_stops_at_the_deadline() -> None:
    fake = FakeClock()
    waited: list[float] = []

    def backoff(elapsed: float) -> float:
        waited.append(elapsed)
        return 0.5 if elapsed < 2 else 2.0

    assert poll_until(lambda: None, timeout=5, interval=backoff, clock=fake.clock, sleep=fake.sleep) is None
    assert waited == [0, 0.5, 1.0, 1.5, 2.0, 4.0]
    assert fake.sleeps == [0.5, 0.5, 0.5, 0.5, 2.0, 1.0]  # the last sleep ends at the deadline


# ---------------------------------------------------------------- rollout status (tasks.hooks)


@pytest.mark.parametrize(
    ("status", "spec_replicas", "done"),
    [
        ({"observed_generation": 2, "updated_replicas": 2, "available_replicas": 2, "replicas": 2}, 2, True),
        ({"observed_generation": 1, "updated_replicas": 2, "available_replicas": 2, "replicas": 2}, 2, False),
        ({"observed_generation": 2, "updated_replicas": 1, "available_replicas": 2, "replicas": 2}, 2, False),
        ({"observed_generation": 2, "updated_replicas": 2, "available_replicas": 1, "replicas": 2}, 2, False),
        ({"observed_generation": 2, "updated_replicas": 2, "available_replicas": 2, "replicas": 3}, 2, False),
        (
            {"observed_generation": 2, "updated_replicas": 1, "available_replicas": 1, "replicas": 1},
            None,
            True,
        ),
        (
            {
                "observed_generation": None,
                "updated_replicas": None,
                "available_replicas": None,
                "replicas": None,
            },
            0,
            False,
        ),
    ],
)
def test_a_rollout_is_done_when_the_new_generation_is_seen_and_every_replica_is_updated_and_available(
    status: dict[str, int | None], spec_replicas: int | None, done: bool
) -> None:
    assert rollout_done(SimpleNamespace(**status), spec_replicas, generation=2) is done


# ---------------------------------------------------------------- retention pieces (tasks.retention)

T0 = datetime(2026, 11, 20, tzinfo=UTC)


def _manifest(bid: str, start_wal: str | None) -> Manifest:
    return Manifest(
        id=bid,
        kind="physical",
        cluster="gravl",
        pg_version=150018,
        system_identifier="7300000000000000001",
        timeline=1,
        start_wal=start_wal,
        start_time=T0,
        stop_time=T0,
        codec="zstd",
        objects=[],
    )


def test_orphan_folders_collects_old_unlisted_folders_and_says_why_it_leaves_the_others() -> None:
    keys = keys_by_backup_id(
        [
            "backups/20261101T000000Z-physical/base.tar.zst",
            "backups/20261101T000000Z-physical/globals.sql.zst",
            "backups/20261119T230000Z-physical/base.tar.zst",  # young: may still be written
            "backups/20261102T000000Z-physical/base.tar.zst",  # holds the lock
            "backups/20261103T000000Z-physical/manifest.json",  # listed
            "backups/20261104T000000Z-physical/base.tar.zst",  # invalid manifest: left to the operator
            "backups/not-a-backup/x",
            "backups/loose-file",
        ]
    )
    state = RepositoryState(
        manifests=[_manifest("20261103T000000Z-physical", "000000010000000000000003")],
        backup_keys=[],
        wal_keys=[],
        locked_backup_id="20261102T000000Z-physical",
        invalid={"20261104T000000Z-physical": "unreadable"},
    )
    orphans, notes = orphan_folders(keys, state, T0, timedelta(days=1))
    assert orphans == [
        "backups/20261101T000000Z-physical/base.tar.zst",
        "backups/20261101T000000Z-physical/globals.sql.zst",
    ]
    assert notes == [
        "left alone: backup 20261102T000000Z-physical holds the backup lock (still running?)",
        "left alone: backups/20261119T230000Z-physical/ has no manifest yet but is recent",
        "left alone: backups/not-a-backup/ is not named like a backup",
    ]


@pytest.mark.parametrize(
    ("starts", "why"),
    [
        ([], "no physical backup is kept"),
        (["000000010000000000000003", None], "does not record its start WAL"),
        (["000000010000000000000003", "00000001.history"], "has an unreadable start WAL"),
    ],
)
def test_wal_needs_leave_all_wal_untouched_when_a_start_is_unknown(
    starts: list[str | None], why: str
) -> None:
    kept = [_manifest(f"2026111{i}T000000Z-physical", s) for i, s in enumerate(starts)]
    needs, untouched = wal_needs(kept)
    assert needs == [] and untouched is not None and why in untouched
    assert expired_wal([parse_wal_key("wal/00000001/000000010000000000000001.zst")], needs) == []


def test_expired_wal_is_what_no_kept_backup_needs_oldest_first_and_history_stays() -> None:
    needs, untouched = wal_needs([_manifest("20261110T000000Z-physical", "000000020000000000000005")])
    assert untouched is None
    wal = [
        parse_wal_key(k)
        for k in (
            "wal/00000002/000000020000000000000004.zst",
            "wal/00000001/000000010000000000000009.zst",
            "wal/00000002/000000020000000000000005.zst",
            "wal/00000002/00000002.history.zst",
            "wal/00000001/000000010000000000000002.00000028.backup.zst",
            "wal/00000003/000000030000000000000001.zst",
            "wal/odd/thing",
        )
    ]
    assert expired_wal(wal, needs) == [
        "wal/00000001/000000010000000000000002.00000028.backup.zst",
        "wal/00000001/000000010000000000000009.zst",
        "wal/00000002/000000020000000000000004.zst",
    ]


# ---------------------------------------------------------------- cluster facts (tasks.counts)


def test_databases_to_count_skips_unwanted_ones_and_says_why_it_cannot_count_the_closed_ones() -> None:
    dbs = [("archive", False), ("reports", True), ("shop", True), ("postgres", True)]
    assert databases_to_count(dbs, None) == (
        ["reports", "shop", "postgres"],
        {
            "archive": "datallowconn = false: nobody may connect to it, so its rows could not be "
            "counted at backup time"
        },
    )
    assert databases_to_count(dbs, ["shop", "archive"])[0] == ["shop"]
    assert databases_to_count(dbs, ["shop"]) == (["shop"], {})


@pytest.mark.parametrize(
    ("snapshots", "before", "after", "agree"),
    [
        ({"a": "10:10:", "b": "10:10:"}, "0/100", "0/100", True),
        ({}, None, None, True),
        ({"a": "10:10:", "b": "10:11:"}, "0/100", "0/100", False),  # a commit between the snapshots
        ({"a": "10:10:", "b": "10:10:"}, "0/100", "0/180", False),  # WAL written meanwhile
    ],
)
def test_snapshots_agree_only_when_one_snapshot_and_no_wal_written_meanwhile(
    snapshots: dict[str, str], before: str | None, after: str | None, agree: bool
) -> None:
    assert snapshots_agree(snapshots, before, after) is agree


# ---------------------------------------------------------------- GX results (tasks.expectations)


def _spec(check: str, table: str = "orders", **kwargs: object) -> ExpectationSpec:
    return ExpectationSpec(
        check=check,
        kind="not-null",
        database="shop",
        schema_name="public",
        table=table,
        gx_type="ExpectColumnValuesToNotBeNull",
        kwargs={"column": "id", **kwargs},
    )


def _gx_result(index: int | None, success: bool, exception_info: object = None) -> SimpleNamespace:
    config = SimpleNamespace(meta={"gravl_check": index} if index is not None else None)
    return SimpleNamespace(
        expectation_config=config,
        success=success,
        result={"unexpected_count": 0 if success else 2, "partial_unexpected_list": [None, None]},
        exception_info=exception_info,
    )


def test_one_validation_per_table_and_result_format() -> None:
    a, b = _spec("a"), _spec("b")
    c, d = _spec("c", result_format="COMPLETE"), _spec("d", table="items")
    assert group_by_table([a, b, c, d]) == {
        ("shop", "public", "orders", "SUMMARY"): [a, b],
        ("shop", "public", "orders", "COMPLETE"): [c],
        ("shop", "public", "items", "SUMMARY"): [d],
    }


def test_results_are_matched_by_index_and_a_spec_without_a_result_fails() -> None:
    specs = [_spec("a"), _spec("b"), _spec("c"), _spec("d")]
    error = {"raised_exception": True, "exception_message": "column id does not exist\nat line 1"}
    gx_results = [
        _gx_result(1, False),
        _gx_result(0, True),
        _gx_result(2, False, error),
        _gx_result(None, True),  # not one of ours
        _gx_result(7, True),  # out of range
    ]
    results = results_of(gx_results, specs, "shop", 0.5)
    assert [(r.name, r.status) for r in results] == [
        ("b", "failed"),
        ("a", "passed"),
        ("c", "failed"),
        ("d", "failed"),
    ]
    assert results[0].samples == [None, None] and results[1].samples == []
    assert results[2].summary == "could not evaluate: column id does not exist"
    assert results[3].summary == "Great Expectations returned no result"
    assert all(r.database == "shop" and r.category == "data" for r in results)
