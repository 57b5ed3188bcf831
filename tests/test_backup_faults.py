"""Failures leave nothing that looks valid: corruption, killed streams, S3 errors, locks."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from s3fault import S3FaultProxy

from gravl_testlib import assert_one_line_error, run_cli, take_backup
from tasks import backup as steps
from tasks.config import load_config
from tasks.errors import ChecksumMismatch, CommandFailed, Locked, StorageUnavailable
from tasks.pgcluster import LocalCluster
from tasks.repository import FileRepository, PutResult, S3Repository, open_repository
from tasks.restore import restore_physical


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_object_fails_verify_and_restore_writes_nothing(
    make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path, pg_dir: Path
) -> None:
    # GIVEN a good physical backup whose stored object then has one byte flipped
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = take_backup(cfg, repo)
    stored = file_repo_dir / "backups" / manifest.id / manifest.objects[0].key
    _flip_byte(stored, stored.stat().st_size // 2)
    # WHEN verify runs THEN it fails naming the object
    proc = run_cli("verify", "latest", config=cfg_path)
    assert_one_line_error(proc, manifest.objects[0].key, manifest.id)
    # AND restore fails naming it, leaving the target absent
    target = pg_dir / "restored"
    with pytest.raises(ChecksumMismatch, match=manifest.objects[0].key):
        restore_physical(cfg, repo, manifest, target)
    assert not target.exists()
    proc = run_cli("restore", manifest.id, "--pgdata", str(target), config=cfg_path)
    assert_one_line_error(proc, manifest.objects[0].key)
    assert not target.exists()


def test_verify_good_backup_succeeds_from_cli(make_config: Callable[..., Path], file_repo_url: str) -> None:
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    manifest = take_backup(cfg, open_repository(cfg.repository), "logical")
    proc = run_cli("verify", manifest.id, config=cfg_path)
    assert proc.returncode == 0, proc.stderr
    assert f"backup {manifest.id} OK" in proc.stdout


class SlowFileRepository(FileRepository):
    """Fault injection at the adapter boundary: a slow disk, so the stream is still running."""

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        def slow() -> Iterator[bytes]:
            for chunk in chunks:
                time.sleep(0.15)
                yield chunk

        return super().put_stream(key, slow())


def _terminate_walsender(dsn: str, timeout: float = 20) -> int:
    """pg_terminate_backend() the WAL sender streaming gravl-dr's base backup (the server side
    of the stream dies; kill -9 of a backend would crash-restart the shared test cluster)."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender' "
                "AND application_name = 'gravl-dr' AND wait_event IS DISTINCT FROM 'WalSenderMain'"
            ).fetchone()
            if row and conn.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE active_pid = %s", row
            ).fetchone() == (1,):
                conn.execute("SELECT pg_terminate_backend(%s)", row)
                return int(row[0])
            time.sleep(0.01)
    raise AssertionError("no gravl-dr base backup appeared")


def test_killed_base_backup_leaves_no_backup_and_next_succeeds(
    make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path, pg_primary: LocalCluster
) -> None:
    # GIVEN a backup streaming into a slow repository (compression off: many chunks)
    cfg = load_config(str(make_config(file_repo_url, repository={"compression": "none"})))
    repo = SlowFileRepository(file_repo_dir, file_repo_url)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            take_backup(cfg, repo)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    # WHEN the server process streaming it is terminated mid-stream
    _terminate_walsender(pg_primary.dsn("postgres"))
    thread.join(60)
    # THEN the backup failed naming BASE_BACKUP, nothing is listed, no partial file or empty
    # folder remains, and the temporary replication slot went with the connection
    assert len(errors) == 1 and isinstance(errors[0], CommandFailed), errors
    assert "BASE_BACKUP" in str(errors[0])
    assert steps.list_backups(repo) == []
    assert [p for p in file_repo_dir.rglob("*") if p.name != "locks"] == []
    import psycopg

    with psycopg.connect(pg_primary.dsn("postgres")) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'gravl_dr_%'"
        ).fetchone() == (0,)
    # AND the next backup succeeds
    manifest = take_backup(cfg, open_repository(cfg.repository))
    assert [m.id for m in steps.list_backups(repo)] == [manifest.id]


def test_s3_error_mid_upload_aborts_multipart_and_next_succeeds(
    make_config: Callable[..., Path], s3_repo_url: str, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN an S3 repository with 5 MiB parts and no compression (several parts), behind the
    # fault proxy, which answers every upload of part 3 with a 500 (the SDK's retries too)
    cfg = load_config(
        str(make_config(s3_repo_url, moto=s3_fault_proxy.url, repository={"compression": "none"}))
    )
    repo = open_repository(cfg.repository)
    assert isinstance(repo, S3Repository)
    rule = s3_fault_proxy.add(
        "PUT",
        r"base\.tar",
        query="partNumber=3",
        action="error",
        status=500,
        code="InternalError",
        times=None,
    )
    # WHEN the third part fails
    with pytest.raises(StorageUnavailable):
        take_backup(cfg, repo)
    # THEN no backup is listed, no object and no multipart upload is left behind
    assert rule.shots >= 1
    assert steps.list_backups(repo) == []
    assert [k for k in repo.list_keys("backups")] == []
    assert repo.list_incomplete() == []
    s3_fault_proxy.clear()
    # AND the next backup succeeds
    manifest = take_backup(cfg, repo)
    assert [m.id for m in steps.list_backups(repo)] == [manifest.id]


def test_second_backup_is_refused_while_lock_is_held(
    make_config: Callable[..., Path], file_repo_url: str
) -> None:
    cfg = load_config(str(make_config(file_repo_url)))
    repo = open_repository(cfg.repository)
    steps.acquire_lock(repo, "20260101T000000Z-physical")
    try:
        with pytest.raises(Locked, match="another backup"):
            steps.preflight(cfg, repo, "physical")
    finally:
        steps.release_lock(repo, "20260101T000000Z-physical")
    assert steps.preflight(cfg, repo, "physical").kind == "physical"


def test_stale_lock_of_dead_process_is_taken_over(
    make_config: Callable[..., Path], file_repo_url: str
) -> None:
    import json
    import socket

    cfg = load_config(str(make_config(file_repo_url)))
    repo = open_repository(cfg.repository)
    repo.put_bytes(
        steps.LOCK_KEY,
        json.dumps(
            {
                "backup_id": "20260101T000000Z-physical",
                "host": socket.gethostname(),
                "pid": 2**22 + 12345,
                "epoch": time.time(),
            }
        ).encode(),
    )
    steps.acquire_lock(repo, "20260102T000000Z-physical")
    lock = steps.read_lock(repo)
    assert lock is not None and lock["backup_id"] == "20260102T000000Z-physical"


SLOW_RESTORE = """
import sys, time
from pathlib import Path
from tasks.config import load_config
from tasks.repository import FileRepository
from tasks.restore import restore_physical
from tasks.backup import resolve_backup

class SlowRepository(FileRepository):  # a slow disk: the restore is still streaming when killed
    def iter_object(self, key, chunk_size=1 << 16):
        for chunk in super().iter_object(key, 1 << 16):
            time.sleep(0.02)
            yield chunk

cfg = load_config(sys.argv[1])
repo = SlowRepository(Path(sys.argv[2]), "file://" + sys.argv[2])
restore_physical(cfg, repo, resolve_backup(repo, "latest", cluster=cfg.cluster), Path(sys.argv[3]))
"""


def test_a_restore_killed_mid_stream_leaves_no_startable_data_directory(
    make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path, pg_dir: Path
) -> None:
    import subprocess
    import sys

    # GIVEN a good physical backup, restored from a slow repository (one pass: verify while extracting)
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    take_backup(cfg, open_repository(cfg.repository))
    target = pg_dir / "restored"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RESTORE, str(cfg_path), str(file_repo_dir), str(target)],
        stderr=subprocess.PIPE,
    )
    # WHEN the restore is killed with -9 once files are being extracted, pg_control among them
    deadline = time.monotonic() + 120
    while not (target / "global" / "pg_control.gravl-unverified").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # THEN the half-extracted directory has no pg_control: no server can start on unverified data
    assert (target / "PG_VERSION").exists()
    assert not (target / "global" / "pg_control").exists()
    from tasks.pgcluster import LocalCluster

    with pytest.raises(CommandFailed):
        LocalCluster(target, 1).start(timeout=10)


def test_a_physical_restore_reads_each_stored_byte_once(
    make_config: Callable[..., Path], file_repo_url: str, file_repo_dir: Path, pg_dir: Path
) -> None:
    # GIVEN a good physical backup, and the repository seen through a byte counter (from S3,
    # every byte read is a byte downloaded)
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    manifest = take_backup(cfg, open_repository(cfg.repository))
    read: dict[str, int] = {}

    class CountingRepository(FileRepository):
        def iter_object(self, key: str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
            for chunk in super().iter_object(key, chunk_size):
                read[key] = read.get(key, 0) + len(chunk)
                yield chunk

    repo = CountingRepository(file_repo_dir, file_repo_url)
    # WHEN it is restored
    restore_physical(cfg, repo, manifest, pg_dir / "restored")
    # THEN each object was read exactly once, and the directory is complete and valid
    for obj in manifest.objects:
        assert read.get(f"backups/{manifest.id}/{obj.key}") == obj.size, (obj.key, read)
    assert (pg_dir / "restored" / "global" / "pg_control").exists()
    assert not (pg_dir / "restored" / "global" / "pg_control.gravl-unverified").exists()


SYNC_RESTORE = """
import sys
from pathlib import Path
from tasks.backup import resolve_backup
from tasks.config import load_config
from tasks.repository import open_repository
from tasks.restore import restore_physical

cfg = load_config(sys.argv[1])
repo = open_repository(cfg.repository)
restore_physical(cfg, repo, resolve_backup(repo, "latest", cluster=cfg.cluster), Path(sys.argv[2]))
"""


def test_a_physical_restore_is_on_disk_before_pg_control_makes_it_startable(
    make_config: Callable[..., Path], file_repo_url: str, pg_dir: Path
) -> None:
    import subprocess
    import sys

    # GIVEN a good physical backup
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    take_backup(cfg, open_repository(cfg.repository))
    target = pg_dir / "restored"
    trace = pg_dir / "strace.txt"
    # WHEN it is restored, its system calls traced (a power loss cannot be injected; the order
    # of the calls that make it safe can be observed)
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=syncfs,sync,rename,renameat,renameat2",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            SYNC_RESTORE,
            str(cfg_path),
            str(target),
        ],
        check=True,
        capture_output=True,
    )
    # THEN the filesystem was flushed (syncfs) before pg_control was renamed into place
    calls = [line for line in trace.read_text().splitlines() if "syncfs(" in line or "pg_control" in line]
    synced = next(i for i, line in enumerate(calls) if "syncfs(" in line and "= 0" in line)
    renamed = next(
        i for i, line in enumerate(calls) if "gravl-unverified" in line and "global/pg_control" in line
    )
    assert synced < renamed, calls
    assert (target / "global" / "pg_control").exists()
