"""PostgreSQL's archive_command / restore_command contract, through the real `gravl-dr` command.

WAL files here are made up (16 MB of known bytes in a pg_wal-like folder); the contract does not
depend on who wrote them. Real servers archiving through wal-push are in test_pitr.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gravl_testlib import GRAVL_DR, assert_one_line_error, run_cli, write_config
from tasks.walformat import HEADER_MAGIC, split_header

SEG = 16 * 1024 * 1024


def seg_name(tli: int, segno: int) -> str:
    return f"{tli:08X}{segno // 256:08X}{segno % 256:08X}"


def make_wal(pg_wal: Path, name: str, seed: int, size: int = SEG, ready: bool = True) -> Path:
    """A file of `size` bytes: mostly compressible, with some seed-dependent bytes."""
    block = (f"gravl wal {name} seed {seed} ".encode() * 200)[:4096]
    data = bytearray(block * (size // 4096) + block[: size % 4096])
    data[1000 : 1000 + 64] = os.urandom(64)
    path = pg_wal / name
    path.write_bytes(bytes(data))
    if ready:
        (pg_wal / "archive_status" / f"{name}.ready").touch()
    return path


@pytest.fixture
def pg_wal() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="gravl-test-pgwal-", dir="/tmp"))
    (base / "pg_wal" / "archive_status").mkdir(parents=True)
    yield base / "pg_wal"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def file_config(tmp_path: Path, file_repo_dir: Path) -> Path:
    (file_repo_dir / "backups").mkdir()
    return write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {"url": f"file://{file_repo_dir}"},
        },
    )


@pytest.fixture
def s3_config(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> Path:
    return write_config(
        tmp_path / "gravl-dr-s3.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {
                "url": f"s3://{s3_bucket}/gravl",
                "endpoint_url": moto_endpoint,
                "region": "eu-north-1",
            },
        },
    )


def push(
    config: Path, path: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("wal-push", str(path), *extra, config=config, env=env)


def fetch(
    config: Path, name: str, dest: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli("wal-fetch", name, str(dest), *extra, config=config, env=env)


def stored(repo: Path, name: str) -> Path:
    [path] = list(repo.glob(f"wal/*/{name}.*")) or list(repo.glob(f"wal/*/{name}"))
    return path


# ---------------------------------------------------------------- wal-push


def test_push_stores_a_compressed_checksummed_object(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    path = make_wal(pg_wal, seg_name(1, 1), seed=1, ready=False)
    proc = push(file_config, path)
    assert proc.returncode == 0, proc.stderr
    obj = file_repo_dir / "wal" / "00000001" / f"{seg_name(1, 1)}.zst"
    assert obj.is_file() and obj.stat().st_size < SEG // 10
    # the checksum travels in a header frame that `zstd -d` skips
    data = obj.read_bytes()
    assert data.startswith(HEADER_MAGIC)
    header, _ = split_header([data], "test")
    assert header.raw_size == SEG and len(header.digest) == 64
    out = subprocess.run(["zstd", "-dc", str(obj)], capture_output=True, check=True).stdout
    assert out == path.read_bytes()


def test_push_twice_with_identical_content_succeeds(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    path = make_wal(pg_wal, seg_name(1, 2), seed=2, ready=False)
    assert push(file_config, path).returncode == 0
    obj = stored(file_repo_dir, seg_name(1, 2))
    before = (obj.stat().st_mtime_ns, obj.read_bytes())
    proc = push(file_config, path)
    assert proc.returncode == 0, proc.stderr
    assert (obj.stat().st_mtime_ns, obj.read_bytes()) == before


def test_push_of_different_content_fails_and_keeps_the_stored_copy(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    # GIVEN a segment archived once
    path = make_wal(pg_wal, seg_name(1, 3), seed=3, ready=False)
    assert push(file_config, path).returncode == 0
    obj = stored(file_repo_dir, seg_name(1, 3))
    kept = obj.read_bytes()
    # WHEN a file with other bytes is pushed under the same name
    make_wal(pg_wal, seg_name(1, 3), seed=4, ready=False)
    proc = push(file_config, path)
    # THEN it fails with a clear line, and the stored copy is untouched
    assert_one_line_error(proc, seg_name(1, 3), "different content", "kept")
    assert obj.read_bytes() == kept


def test_push_handles_history_backup_and_partial_files(
    pg_wal: Path, file_config: Path, file_repo_dir: Path, tmp_path: Path
) -> None:
    files = {
        "00000002.history": b"1\t0/5000060\tno recovery target specified\n",
        f"{seg_name(1, 4)}.00000028.backup": b"START WAL LOCATION: 0/4000028 (file ...)\n",
        f"{seg_name(1, 5)}.partial": b"\x01" * 4096 + b"\x00" * (SEG - 4096),
    }
    for name, data in files.items():
        (pg_wal / name).write_bytes(data)
        proc = push(file_config, pg_wal / name)
        assert proc.returncode == 0, proc.stderr
    assert (file_repo_dir / "wal" / "00000002" / "00000002.history.zst").is_file()
    assert (file_repo_dir / "wal" / "00000001" / f"{seg_name(1, 5)}.partial.zst").is_file()
    for name, data in files.items():
        dest = tmp_path / "out"
        proc = fetch(file_config, name, dest)
        assert proc.returncode == 0, proc.stderr
        assert dest.read_bytes() == data


def test_push_rejects_a_name_that_is_not_wal(pg_wal: Path, file_config: Path) -> None:
    (pg_wal / "postgresql.conf").write_text("x")
    assert_one_line_error(push(file_config, pg_wal / "postgresql.conf"), "not a WAL file name")


def test_push_of_a_missing_file_fails(pg_wal: Path, file_config: Path) -> None:
    assert_one_line_error(push(file_config, pg_wal / seg_name(1, 9)), "does not exist")


def test_lookahead_pushes_ready_files_so_later_calls_return_at_once(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    # GIVEN five segments waiting as .ready
    paths = [make_wal(pg_wal, seg_name(1, 10 + i), seed=10 + i) for i in range(5)]
    # WHEN PostgreSQL asks for the first one, with a look-ahead of 4
    proc = push(file_config, paths[0], "--parallel", "4", "--sync")
    assert proc.returncode == 0, proc.stderr
    # THEN the next three are stored too, and marked for the next calls
    for path in paths[:4]:
        assert stored(file_repo_dir, path.name).is_file()
    assert not list(file_repo_dir.glob(f"wal/*/{paths[4].name}*"))
    marks = pg_wal / "gravl-dr" / "archived"
    assert sorted(p.name for p in marks.iterdir()) == [f"{p.name}.ok" for p in paths[1:4]]
    # AND a later call for one of them answers from the mark: no hashing, no repository
    # (hidden here to prove it)
    hidden = file_repo_dir.with_name(file_repo_dir.name + "-hidden")
    file_repo_dir.rename(hidden)
    try:
        proc = push(file_config, paths[1], "--parallel", "4")
        assert proc.returncode == 0, proc.stderr
    finally:
        hidden.rename(file_repo_dir)


def wait_marked(pg_wal: Path, names: list[str], timeout: float = 20) -> None:
    folder = pg_wal / "gravl-dr" / "archived"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((folder / f"{n}.ok").exists() for n in names):
            return
        time.sleep(0.05)
    raise AssertionError(f"not marked: {names}; log: {(pg_wal / 'gravl-dr' / 'pusher.log').read_text()}")


def test_background_pusher_archives_ready_files_and_exits_when_idle(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    # GIVEN six segments waiting as .ready
    paths = [make_wal(pg_wal, seg_name(1, 100 + i), seed=100 + i) for i in range(6)]
    # WHEN PostgreSQL asks for the first (async mode is the default)
    proc = push(file_config, paths[0], env={"GRAVL_DR_PUSHER_IDLE": "2"})
    # THEN it returns once that file is stored, and a detached pusher stores the others
    assert proc.returncode == 0, proc.stderr
    assert stored(file_repo_dir, paths[0].name).is_file()
    wait_marked(pg_wal, [p.name for p in paths])
    for path in paths:
        assert stored(file_repo_dir, path.name).is_file()
    # AND later calls answer from the marks, without the repository (hidden here to prove it)
    hidden = file_repo_dir.with_name(file_repo_dir.name + "-hidden")
    file_repo_dir.rename(hidden)
    try:
        for path in paths[1:]:
            assert push(file_config, path).returncode == 0
    finally:
        hidden.rename(file_repo_dir)
    # AND a conflict found by the pusher reaches PostgreSQL as a failure with the reason
    other = make_wal(pg_wal.parent, paths[5].name, seed=555, ready=False)
    os.replace(other, paths[5])  # another file under that name, atomically
    assert_one_line_error(push(file_config, paths[5]), "different content")
    # AND the pusher exits by itself once nothing is left to do
    from tasks.walspool import pusher_pid

    pid = pusher_pid(pg_wal)
    deadline = time.monotonic() + 30
    while pid is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        pid = pusher_pid(pg_wal)
    assert pid is None


def test_a_lookahead_mark_is_not_trusted_for_a_different_file(
    pg_wal: Path, file_config: Path, file_repo_dir: Path
) -> None:
    # GIVEN a look-ahead stored segment 21 and marked it
    paths = [make_wal(pg_wal, seg_name(1, 20 + i), seed=20 + i) for i in range(2)]
    assert push(file_config, paths[0], "--parallel", "2", "--sync").returncode == 0
    assert (pg_wal / "gravl-dr" / "archived" / f"{paths[1].name}.ok").is_file()
    # WHEN a different file now has that name (another inode, other bytes)
    paths[1].unlink()
    make_wal(pg_wal, paths[1].name, seed=99)
    # THEN the mark does not answer for it: the repository copy is compared and it is refused
    assert_one_line_error(push(file_config, paths[1]), "different content")


def test_marks_of_recycled_files_are_pruned(pg_wal: Path, file_config: Path) -> None:
    paths = [make_wal(pg_wal, seg_name(1, 30 + i), seed=30 + i) for i in range(3)]
    assert push(file_config, paths[0], "--parallel", "3", "--sync").returncode == 0
    # PostgreSQL recycles segment 31 after its .done; the next push prunes the stale mark
    paths[1].unlink()
    later = make_wal(pg_wal, seg_name(1, 39), seed=39, ready=False)
    assert push(file_config, later).returncode == 0
    marks = {p.name for p in (pg_wal / "gravl-dr" / "archived").iterdir()}
    assert f"{paths[1].name}.ok" not in marks


def test_wal_hooks_on_a_file_repository_import_neither_boto3_nor_prefect(
    pg_wal: Path, file_config: Path, tmp_path: Path
) -> None:
    path = make_wal(pg_wal, seg_name(1, 40), seed=40, ready=False)
    for argv in (["wal-push", str(path)], ["wal-fetch", path.name, str(tmp_path / "x")]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", GRAVL_DR, "--config", str(file_config), *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        modules = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if "import time:" in ln}
        assert not {m for m in modules if m.split(".")[0] in ("boto3", "botocore", "prefect")}


# ---------------------------------------------------------------- wal-fetch


def test_fetch_of_a_missing_file_exits_1(pg_wal: Path, file_config: Path, tmp_path: Path) -> None:
    proc = fetch(file_config, seg_name(1, 50), tmp_path / "dest")
    assert proc.returncode == 1, proc.stderr
    assert not (tmp_path / "dest").exists()
    assert fetch(file_config, "00000005.history", tmp_path / "dest").returncode == 1


def test_fetch_of_a_corrupt_object_exits_above_125_and_writes_nothing(
    pg_wal: Path, file_config: Path, file_repo_dir: Path, tmp_path: Path
) -> None:
    # GIVEN an archived segment with one byte flipped in the repository
    path = make_wal(pg_wal, seg_name(1, 51), seed=51, ready=False)
    assert push(file_config, path).returncode == 0
    obj = stored(file_repo_dir, path.name)
    data = bytearray(obj.read_bytes())
    data[-100] ^= 0x01
    obj.write_bytes(bytes(data))
    # WHEN PostgreSQL's restore_command fetches it
    proc = fetch(file_config, path.name, tmp_path / "dest", "--prefetch", "0")
    # THEN the exit status makes PostgreSQL stop recovery (> 125), with the reason, and no file
    assert proc.returncode > 125, proc.stderr
    assert "corrupt" in proc.stderr or "cannot decompress" in proc.stderr
    assert not (tmp_path / "dest").exists()
    assert not list(tmp_path.glob(".dest*"))


@pytest.mark.integration  # starts a process
def test_fetch_from_an_unreachable_repository_is_not_missing(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gone.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1"},
            "repository": {"url": "file:///nonexistent/gravl-repo"},
        },
    )
    proc = fetch(config, seg_name(1, 1), tmp_path / "dest")
    assert proc.returncode > 125, proc.stderr
    assert "not reachable" in proc.stderr
    config = write_config(
        tmp_path / "s3gone.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1"},
            "repository": {
                "url": "s3://bucket/x",
                "endpoint_url": "http://127.0.0.1:9",
                "region": "eu-north-1",
            },
        },
    )
    proc = fetch(config, seg_name(1, 1), tmp_path / "dest", env={"AWS_MAX_ATTEMPTS": "1"})
    assert proc.returncode > 125, proc.stderr
    # a missing config file must stop recovery too, not end it
    proc = fetch(tmp_path / "nope.yaml", seg_name(1, 1), tmp_path / "dest")
    assert proc.returncode > 125


def test_fetch_prefetches_the_next_segments(pg_wal: Path, file_config: Path, tmp_path: Path) -> None:
    # GIVEN four archived segments
    paths = [make_wal(pg_wal, seg_name(1, 60 + i), seed=60 + i, ready=False) for i in range(4)]
    for path in paths:
        assert push(file_config, path).returncode == 0
    restore_wal = tmp_path / "pg_wal"
    restore_wal.mkdir()
    (tmp_path / "recovery.signal").touch()  # a server in archive recovery (the prefetcher serves no other)
    # WHEN recovery asks for the first
    proc = fetch(file_config, paths[0].name, restore_wal / "RECOVERYXLOG", "--prefetch", "4")
    assert proc.returncode == 0, proc.stderr
    # THEN the background prefetcher fetches the next three, verified and marked, into the
    # prefetch folder; asking for one moves it into place
    folder = restore_wal / "gravl-dr" / "prefetch"
    wanted = sorted(p.name for p in paths[1:])
    deadline = time.monotonic() + 30
    while sorted(p.name for p in folder.iterdir() if p.name.endswith(".ok")) != [f"{n}.ok" for n in wanted]:
        assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
        time.sleep(0.1)
    assert sorted(p.name for p in folder.iterdir() if len(p.name) == 24 and "." not in p.name) == wanted
    proc = fetch(file_config, paths[1].name, restore_wal / "RECOVERYXLOG")
    assert proc.returncode == 0
    assert (restore_wal / "RECOVERYXLOG").read_bytes() == paths[1].read_bytes()
    assert not (folder / paths[1].name).exists()
    # a prefetched file changed after its verification is not served (its mark names the
    # verified file): the repository's copy is fetched instead
    (folder / paths[2].name).write_bytes(b"x" * SEG)
    proc = fetch(file_config, paths[2].name, restore_wal / "RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert (restore_wal / "RECOVERYXLOG").read_bytes() == paths[2].read_bytes()


def test_encrypted_round_trip_and_no_key_stops_recovery(
    pg_wal: Path, tmp_path: Path, file_repo_dir: Path
) -> None:
    (file_repo_dir / "backups").mkdir()
    config = write_config(
        tmp_path / "enc.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1"},
            "repository": {"url": f"file://{file_repo_dir}", "encryption_key_env": "GRAVL_DR_TEST_KEY"},
        },
    )
    env = {"GRAVL_DR_TEST_KEY": "11" * 32}
    path = make_wal(pg_wal, seg_name(1, 70), seed=70, ready=False)
    assert push(config, path, env=env).returncode == 0
    obj = file_repo_dir / "wal" / "00000001" / f"{path.name}.zst.enc"
    header, _ = split_header([obj.read_bytes()], "t")
    assert header.digest_alg == "hmac-sha256" and header.encryption == "tink-aes256-gcm-hkdf-1mib"
    proc = fetch(config, path.name, tmp_path / "dest", env=env)
    assert proc.returncode == 0 and (tmp_path / "dest").read_bytes() == path.read_bytes()
    proc = fetch(config, path.name, tmp_path / "dest2", env={"GRAVL_DR_TEST_KEY": "22" * 32})
    assert proc.returncode > 125 and "another key" in proc.stderr


# ---------------------------------------------------------------- S3 (moto over HTTP)


def test_s3_push_fetch_duplicate_and_conflict(pg_wal: Path, s3_config: Path, tmp_path: Path) -> None:
    paths = [make_wal(pg_wal, seg_name(1, 80 + i), seed=80 + i) for i in range(3)]
    proc = push(s3_config, paths[0], "--parallel", "3")
    assert proc.returncode == 0, proc.stderr
    assert push(s3_config, paths[0]).returncode == 0  # identical again: success
    restore_wal = tmp_path / "pg_wal"
    restore_wal.mkdir()
    (tmp_path / "recovery.signal").touch()  # a server in archive recovery (the prefetcher serves no other)
    proc = fetch(s3_config, paths[0].name, restore_wal / "RECOVERYXLOG")
    assert proc.returncode == 0, proc.stderr
    assert (restore_wal / "RECOVERYXLOG").read_bytes() == paths[0].read_bytes()
    mark = restore_wal / "gravl-dr" / "prefetch" / f"{paths[2].name}.ok"  # the background prefetcher's
    deadline = time.monotonic() + 30
    while not mark.is_file():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert fetch(s3_config, seg_name(1, 99), restore_wal / "X").returncode == 1
    make_wal(pg_wal, paths[2].name, seed=1234, ready=False)
    paths[2].touch()
    proc = push(s3_config, paths[2])
    assert_one_line_error(proc, "different content")


def test_check_json_of_status_marks_is_plain(pg_wal: Path, file_config: Path) -> None:
    # the marks are small JSON documents an operator can read
    paths = [make_wal(pg_wal, seg_name(1, 90 + i), seed=90 + i) for i in range(2)]
    assert push(file_config, paths[0], "--parallel", "2", "--sync").returncode == 0
    body = json.loads((pg_wal / "gravl-dr" / "archived" / f"{paths[1].name}.ok").read_text())
    assert body["name"] == paths[1].name and body["key"].startswith("wal/00000001/")
