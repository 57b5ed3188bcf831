"""Issue 9 items 8 and 11, and kill -9 at several points of a backup: leftovers of killed runs
(open multipart uploads, temporary files, folders without a manifest) are swept by expire after a
grace period and reported; ``gravl-dr unlock`` removes a stale lock, never a live one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from s3fault import S3FaultProxy

from gravl_testlib import GRAVL_DR, REPO_ROOT, assert_one_line_error, run_cli, take_backup
from tasks import backup as steps
from tasks.config import load_config
from tasks.repository import FileRepository, S3Repository, open_repository


def _lock(repo, backup_id: str, host: str, pid: int, age: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    repo.put_bytes(
        steps.LOCK_KEY,
        json.dumps(
            {
                "backup_id": backup_id,
                "host": host,
                "pid": pid,
                "started": "2026-11-29T01:00:00+00:00",
                "epoch": time.time() - age,
            }
        ).encode(),
    )


# ---------------------------------------------------------------- item 11: unlock


def test_unlock(make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path) -> None:
    cfg_path = make_config(file_repo_url)
    repo = FileRepository(file_repo_dir, file_repo_url)
    repo.check(write=True)
    # no lock: says so
    proc = run_cli("unlock", config=cfg_path)
    assert proc.returncode == 0 and "no backup lock" in proc.stdout, proc.stderr
    # a holder alive on this host: refused, even with --force
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _lock(repo, "20261129T010000Z-physical-aaaaaaaa", socket.gethostname(), sleeper.pid)
        for extra in ((), ("--force",)):
            proc = run_cli("unlock", *extra, config=cfg_path)
            assert_one_line_error(proc, "20261129T010000Z-physical-aaaaaaaa", "running on this host")
            assert steps.read_lock(repo) is not None
    finally:
        sleeper.kill()
        sleeper.wait()
    # once that process is gone the lock is stale: removed without --force, saying what it was
    proc = run_cli("unlock", config=cfg_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed the lock of backup 20261129T010000Z-physical-aaaaaaaa" in proc.stdout
    assert f"pid {sleeper.pid}" in proc.stdout and steps.read_lock(repo) is None
    # a recent lock from another host cannot be checked from here: --force is needed
    _lock(repo, "20261129T020000Z-physical-bbbbbbbb", "db-old-host", 4242)
    proc = run_cli("unlock", config=cfg_path)
    assert_one_line_error(proc, "db-old-host", "--force")
    lock = steps.read_lock(repo)
    assert lock is not None and lock["host"] == "db-old-host"
    proc = run_cli("unlock", "--force", config=cfg_path)
    assert proc.returncode == 0 and "host db-old-host" in proc.stdout, proc.stderr
    assert steps.read_lock(repo) is None


# ---------------------------------------------------------------- kill -9 and the sweep


def _start_backup(cfg_path: Path, api: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PREFECT_API_URL=api)
    return subprocess.Popen(
        [GRAVL_DR, "--config", str(cfg_path), "backup"],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def _kill9_when(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the backup ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pg_basebackup, like a host losing power
    proc.wait(30)


def _api() -> str:
    import prefect.settings

    return str(prefect.settings.PREFECT_API_URL.value())


def _expire(cfg_path: Path) -> dict:  # type: ignore[type-arg]
    proc = run_cli("expire", "--json", config=cfg_path, env={"PREFECT_API_URL": _api()})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_kill9_while_streaming_to_a_file_repository(
    prefect_harness: None,
    make_config: Callable[..., Path],
    file_repo_url: str,
    file_repo_dir: Path,
) -> None:
    # GIVEN a backup killed -9 while its object is still a temporary file
    cfg_path = make_config(file_repo_url, repository={"compression": "none"})
    proc = _start_backup(cfg_path, _api())
    _kill9_when(
        proc, lambda: any(p.name.startswith(".gravl-tmp-") for p in (file_repo_dir / "backups").rglob("*"))
    )
    repo = FileRepository(file_repo_dir, file_repo_url)
    tmp = [p for p in (file_repo_dir / "backups").rglob(".gravl-tmp-*")]
    assert tmp, "the temporary file should still be there"
    # THEN nothing is listed, and the lock names a process that is gone
    assert run_cli("list", config=cfg_path).stdout.startswith("no backups")
    lock = steps.read_lock(repo)
    assert lock is not None and steps.lock_is_stale(lock, repo)
    # AND expire within the grace period leaves the leftover alone...
    assert _expire(cfg_path)["leftovers"] == [] and all(p.exists() for p in tmp)
    # ...and after it (grace 0 here) removes it and says how much it freed
    grace0 = make_config(
        file_repo_url,
        name="grace0.yaml",
        repository={"compression": "none"},
        retention={"incomplete_grace_hours": 0},
    )
    size = sum(p.stat().st_size for p in tmp)
    out = _expire(grace0)
    assert len(out["leftovers"]) == len(tmp) and "temporary file" in out["leftovers"][0]
    assert out["leftover_bytes"] == size
    assert not any(p.exists() for p in tmp)
    # AND the next backup takes over the dead run's lock and succeeds
    cfg = load_config(str(cfg_path))
    manifest = take_backup(cfg, open_repository(cfg.repository))
    assert [m.id for m in steps.list_backups(repo)] == [manifest.id]


def test_kill9_during_a_multipart_upload_to_s3(
    prefect_harness: None,
    make_config: Callable[..., Path],
    s3_repo_url: str,
    s3_fault_proxy: S3FaultProxy,
) -> None:
    # GIVEN a backup to S3 whose parts go up slowly, killed -9 after its first part was stored
    cfg_path = make_config(s3_repo_url, moto=s3_fault_proxy.url, repository={"compression": "none"})
    s3_fault_proxy.add("PUT", r"base\.tar", query="partNumber", action="delay", delay=0.5, times=None)
    proc = _start_backup(cfg_path, _api())
    _kill9_when(
        proc,
        lambda: any(
            r[3].endswith("200") for r in s3_fault_proxy.requests("PUT", r"base\.tar") if "partNumber" in r[2]
        ),
    )
    s3_fault_proxy.clear()
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    assert isinstance(repo, S3Repository)
    assert len(repo.list_incomplete()) == 1
    assert steps.list_backups(repo) == []
    # WHEN expire runs within the grace period THEN the upload is left alone
    assert _expire(cfg_path)["leftovers"] == [] and len(repo.list_incomplete()) == 1
    # WHEN expire runs after it THEN the upload is aborted, and what it held is reported
    grace0 = make_config(
        s3_repo_url, moto=s3_fault_proxy.url, name="grace0.yaml", retention={"incomplete_grace_hours": 0}
    )
    out = _expire(grace0)
    assert len(out["leftovers"]) == 1 and "multipart upload" in out["leftovers"][0]
    assert out["leftover_bytes"] >= 5 * 2**20
    assert repo.list_incomplete() == []
    # AND the next backup succeeds (the dead run's lock is stale)
    manifest = take_backup(cfg, repo)
    assert [m.id for m in steps.list_backups(repo)] == [manifest.id]


def test_expire_never_sweeps_the_upload_of_a_running_backup(
    make_config: Callable[..., Path],
    s3_repo_url: str,
    s3_fault_proxy: S3FaultProxy,
) -> None:
    from datetime import timedelta

    from tasks.retention import find_leftovers, read_state

    cfg = load_config(str(make_config(s3_repo_url, moto=s3_fault_proxy.url)))
    repo = open_repository(cfg.repository)
    assert isinstance(repo, S3Repository)
    live = "20261129T030000Z-physical-cccccccc"
    _lock(repo, live, socket.gethostname(), os.getpid())  # this process: alive
    repo.client.create_multipart_upload(Bucket=repo.bucket, Key=f"gravl/backups/{live}/base.tar")
    dead = "20261129T020000Z-physical-dddddddd"
    repo.client.create_multipart_upload(Bucket=repo.bucket, Key=f"gravl/backups/{dead}/base.tar")
    state = read_state(repo)
    assert state.locked_backup_id == live
    found = find_leftovers(repo, timedelta(0), state.locked_backup_id)
    assert [i.key for i in found] == [f"backups/{dead}/base.tar"]


@pytest.mark.parametrize("point", ["manifest", "lock-release"])
def test_kill9_after_the_commit_point(
    prefect_harness: None,
    make_config: Callable[..., Path],
    s3_repo_url: str,
    s3_fault_proxy: S3FaultProxy,
    point: str,
) -> None:
    # GIVEN a backup killed -9 right after its manifest PUT reached S3 (the reply lost), or while
    # it releases its lock: the backup is complete, only the run did not finish
    cfg_path = make_config(s3_repo_url, moto=s3_fault_proxy.url)
    pattern = r"manifest\.json$" if point == "manifest" else r"locks/backup\.lock$"
    method = "PUT" if point == "manifest" else "DELETE"
    # the manifest PUT is applied and its reply lost; the lock DELETE never arrives
    s3_fault_proxy.add(method, pattern, action="lost_reply" if point == "manifest" else "drop", times=None)
    proc = _start_backup(cfg_path, _api())
    _kill9_when(proc, lambda: bool(s3_fault_proxy.requests(method, pattern)))
    s3_fault_proxy.clear()
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    # THEN a complete, verifiable backup is listed, and its leftover lock does not block the next run
    [done] = steps.list_backups(repo, check=True)
    steps.verify_objects(repo, done)
    lock = steps.read_lock(repo)
    assert lock is None or steps.lock_is_stale(lock, repo)
    nxt = take_backup(cfg, repo, "logical")
    assert [m.id for m in steps.list_backups(repo)] == [done.id, nxt.id]
