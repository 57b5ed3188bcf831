"""Issue 9 items 4 and 7: unique backup ids, cleanup of only one's own attempt, idempotent commit
points (manifest, lock) under lost replies and failing lock deletes, through the S3 fault proxy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from s3fault import S3FaultProxy

from flows.backup import backup_flow
from gravl_testlib import take_backup
from tasks import backup as steps
from tasks.config import load_config
from tasks.errors import Locked
from tasks.models import BACKUP_ID_RE, backup_time, new_backup_id
from tasks.repository import S3Repository, open_repository


def test_backup_ids_are_unique_within_one_second() -> None:
    now = datetime(2026, 11, 24, 2, 0, 0, tzinfo=UTC)
    ids = {new_backup_id("physical", now) for _ in range(200)}
    assert len(ids) == 200
    for bid in ids:
        assert BACKUP_ID_RE.match(bid) and backup_time(bid) == now
    assert BACKUP_ID_RE.match("20261124T020000Z-physical")  # ids written before still read


def _s3(make_config, s3_repo_url, proxy: S3FaultProxy, **repo):  # type: ignore[no-untyped-def]
    path = make_config(s3_repo_url, moto=proxy.url, repository=repo)
    cfg = load_config(str(path))
    return path, cfg, open_repository(cfg.repository)


def test_refused_run_in_the_same_second_never_touches_the_winners_upload(
    make_config: Callable[..., Path], s3_repo_url: str, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN two runs whose preflights pass in the same second (before either holds the lock),
    # the first streaming slowly (every part delayed) into a multipart upload
    _p, cfg, repo = _s3(make_config, s3_repo_url, s3_fault_proxy, compression="none")
    now = datetime.now(UTC)
    pre_a = steps.preflight(cfg, repo, "physical", now=now)
    pre_b = steps.preflight(cfg, repo, "physical", now=now)
    s3_fault_proxy.add("PUT", r"base\.tar", query="partNumber", action="delay", delay=0.4, times=None)
    steps.acquire_lock(repo, pre_a.backup_id)
    result: dict[str, object] = {}

    def winner() -> None:
        try:
            res = steps.stream_backup(cfg, repo, pre_a)
            manifest = steps.build_manifest(cfg, pre_a, res)
            steps.verify_objects(repo, manifest)
            steps.publish_manifest(repo, manifest)
            result["manifest"] = manifest
        except BaseException as exc:  # noqa: BLE001
            result["error"] = exc
        finally:
            steps.release_lock(repo, pre_a.backup_id)

    thread = threading.Thread(target=winner)
    thread.start()
    deadline = time.monotonic() + 60
    while not s3_fault_proxy.requests("PUT", r"base\.tar") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert isinstance(repo, S3Repository) and repo.list_incomplete("backups"), "no upload open"
    # WHEN the second run is refused at the lock and cleans up its attempt
    with pytest.raises(Locked):
        steps.acquire_lock(repo, pre_b.backup_id)
    steps.discard_incomplete(repo, pre_b.backup_id)
    thread.join(120)
    # THEN the first run's upload survived and its backup is complete and listed
    assert "error" not in result, result.get("error")
    assert [m.id for m in steps.list_backups(repo)] == [pre_a.backup_id]
    assert pre_a.backup_id != pre_b.backup_id


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("fault", ["lost_reply", "after_error"])
def test_lost_reply_to_manifest_put_is_success(
    make_config: Callable[..., Path], s3_repo_url: str, s3_fault_proxy: S3FaultProxy, fault: str
) -> None:
    # GIVEN the proxy forwards the manifest PUT, then drops the reply or answers 500 instead (the
    # SDK retries, and the retry meets If-None-Match: the object is there)
    path, _cfg, repo = _s3(make_config, s3_repo_url, s3_fault_proxy)
    rule = s3_fault_proxy.add("PUT", r"manifest\.json$", action=fault, status=500, code="InternalError")
    # WHEN a backup runs THEN it completes, and is listed
    report = backup_flow(config_path=str(path), kind="logical")
    assert rule.shots == 1
    assert [m.id for m in steps.list_backups(repo)] == [report.backup_id]
    assert steps.read_lock(repo) is None


@pytest.mark.usefixtures("prefect_harness")
def test_lock_delete_failing_does_not_fail_a_complete_backup(
    make_config: Callable[..., Path], s3_repo_url: str, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN every DELETE of the lock answers 500 (the SDK's retries too)
    path, _cfg, repo = _s3(make_config, s3_repo_url, s3_fault_proxy)
    rule = s3_fault_proxy.add(
        "DELETE", r"locks/backup\.lock$", action="error", status=500, code="InternalError", times=None
    )
    # WHEN a backup runs THEN it completes although its lock stays behind
    first = backup_flow(config_path=str(path), kind="logical")
    assert rule.shots >= 1
    lock = steps.read_lock(repo)
    assert lock is not None and lock["backup_id"] == first.backup_id
    # AND the next backup (same host, same live process) takes over the lock of a complete backup
    s3_fault_proxy.clear()
    second = backup_flow(config_path=str(path), kind="logical")
    assert [m.id for m in steps.list_backups(repo)] == [first.backup_id, second.backup_id]
    assert steps.read_lock(repo) is None


def test_lost_reply_to_lock_put_is_our_own_lock(
    make_config: Callable[..., Path], s3_repo_url: str, s3_fault_proxy: S3FaultProxy
) -> None:
    _path, cfg, repo = _s3(make_config, s3_repo_url, s3_fault_proxy)
    s3_fault_proxy.add("PUT", r"locks/backup\.lock$", action="lost_reply")
    manifest = take_backup(cfg, repo, "logical")
    assert [m.id for m in steps.list_backups(repo)] == [manifest.id]
    assert steps.read_lock(repo) is None
