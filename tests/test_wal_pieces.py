"""Unit tier: the pieces of WAL archiving on their own — the object format, the shared
future-collecting helper, the background pusher's typed answer and its marks."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from tasks.errors import ChecksumMismatch, PreconditionFailed, StorageUnavailable
from tasks.repository import FileRepository
from tasks.walarchive import find_object, push_file
from tasks.walformat import (
    HEADER_MAGIC,
    MAX_HEADER,
    WalSettings,
    build_header,
    decode_object,
    encode_object,
    raw_digest,
    split_header,
)
from tasks.walnames import segment_name
from tasks.walspool import (
    PUSHER_LOCK,
    PUSHER_PID,
    WANT_FILE,
    already_archived,
    mark_failed,
    prefetcher_pid,
    pusher_pid,
    spool_root,
    take_lock,
    write_pid,
)
from tasks.walworkers import (
    STOP_FILE,
    Handover,
    PrefetchState,
    collect_done,
    hand_to_pusher,
    run_prefetcher,
    run_pusher,
    wait_for_pusher,
)

T = TypeVar("T")
KEY = bytes(range(32))
RAW = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(4000)) + b"\0" * 50_000


def rechunk(data: bytes, sizes: tuple[int, ...]) -> list[bytes]:
    out, at = [], 0
    for n in sizes:
        out.append(data[at : at + n])
        at += n
    out.append(data[at:])
    return [c for c in out if c]


# ---------------------------------------------------------------- the object format


@pytest.mark.parametrize("codec", ["zstd", "lz4", "gzip", "none"])
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
@pytest.mark.parametrize("threads", [0, None])
def test_an_encoded_object_decodes_to_its_raw_bytes(
    codec: str, key: bytes | None, threads: int | None
) -> None:
    # GIVEN a file's raw bytes encoded under some settings
    settings = WalSettings(codec=codec, key=key)
    digest, size = raw_digest([RAW], key)
    obj = b"".join(
        encode_object(
            [RAW[:1000], RAW[1000:]], "000000010000000000000007", settings, digest, size, threads=threads
        )
    )
    # WHEN it is decoded from chunks that cut the header frame anywhere
    header, raw = decode_object(rechunk(obj, (3, 5, 1, 40)), settings, "t")
    # THEN the header says what was recorded, and the bytes come back verified
    assert obj.startswith(HEADER_MAGIC)
    assert (header.name, header.codec, header.raw_size, header.digest) == (
        "000000010000000000000007",
        codec,
        size,
        digest,
    )
    assert header.digest_alg == settings.digest_alg == ("hmac-sha256" if key else "sha256")
    assert (header.encryption != "none") == (key is not None)
    assert b"".join(raw) == RAW


def test_the_header_frame_splits_off_whatever_the_chunking() -> None:
    header_bytes = build_header("00000002.history", WalSettings(codec="gzip"), "ab" * 32, 42)
    for sizes in ((1,) * 20, (8,), (len(header_bytes),), (len(header_bytes) + 3,)):
        header, payload = split_header(rechunk(header_bytes + b"PAYLOAD", sizes), "t")
        assert (header.name, header.codec, header.raw_size) == ("00000002.history", "gzip", 42)
        assert b"".join(payload) == b"PAYLOAD"


def frame(document: bytes, length: int | None = None) -> bytes:
    n = len(document) if length is None else length
    return HEADER_MAGIC + n.to_bytes(4, "little") + document


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (b"", "truncated"),
        (HEADER_MAGIC[:3], "truncated"),
        (frame(b"", 0) + b"payload", "truncated"),
        (frame(b'{"format"', 100), "truncated"),
        (frame(b"x", MAX_HEADER + 1), "is corrupt"),
        (b"\x28\xb5\x2f\xfd" + b"\0" * 20, "no header"),
        (frame(b"not json"), "header is corrupt"),
        (frame(b'{"format": "gravl-wal/9"}'), "header is corrupt"),
        (frame(b'{"format": "gravl-wal/1", "name": "x"}'), "header is corrupt"),
        (
            frame(
                b'{"format":"gravl-wal/1","name":"x","codec":"brotli","encryption":"none",'
                b'"raw_size":1,"digest_alg":"sha256","digest":"00"}'
            ),
            "unknown codec",
        ),
    ],
)
def test_a_bad_header_is_a_checksum_mismatch_naming_what_is_wrong(obj: bytes, message: str) -> None:
    with pytest.raises(ChecksumMismatch, match=message):
        split_header([obj], "archived x")


def test_a_payload_that_does_not_match_its_header_fails_at_its_end() -> None:
    settings = WalSettings(codec="none")
    digest, size = raw_digest([RAW], None)
    good = b"".join(encode_object([RAW], "000000010000000000000001", settings, digest, size))
    for bad, message in (
        (good[:-1], "bytes where the header says"),
        (good + b"x", "longer than"),
        (good[:-1] + b"x", "checksum mismatch"),
    ):
        _header, raw = decode_object([bad], settings, "t")
        with pytest.raises(ChecksumMismatch, match=message):
            b"".join(raw)


def test_an_encrypted_object_needs_its_key() -> None:
    digest, size = raw_digest([RAW], KEY)
    obj = b"".join(encode_object([RAW], "000000010000000000000001", WalSettings(key=KEY), digest, size))
    with pytest.raises(PreconditionFailed, match="encrypted"):
        decode_object([obj], WalSettings(), "t")
    with pytest.raises(PreconditionFailed, match="another key"):
        decode_object([obj], WalSettings(key=bytes(32)), "t")


# ---------------------------------------------------------------- the shared collecting helper


def finished(value: object = None, error: BaseException | None = None) -> Future[object]:
    fut: Future[object] = Future()
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)
    return fut


def settled(value: T) -> Future[T]:
    """A future that already holds ``value``, typed as it."""
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut


def test_collect_done_hands_over_finished_work_in_order_and_keeps_the_rest() -> None:
    pending: Future[object] = Future()
    in_flight = {
        "a": finished(1),
        "b": pending,
        "c": finished(error=StorageUnavailable("down")),
        "d": finished(error=OSError("disk")),
        "e": finished(2),
    }
    results: list[tuple[str, object]] = []
    errors: list[tuple[str, str]] = []
    n = collect_done(
        in_flight, lambda name, r: results.append((name, r)), lambda name, e: errors.append((name, str(e)))
    )
    assert n == 4
    assert results == [("a", 1), ("e", 2)]
    assert errors == [("c", "down"), ("d", "disk")]
    assert list(in_flight) == ["b"]


def test_collect_done_sends_an_error_raised_while_handling_a_result_to_on_error() -> None:
    in_flight = {"a": finished(1), "b": finished(2)}
    errors: list[str] = []

    def on_result(name: str, _r: object) -> None:
        if name == "a":
            raise OSError("cannot write the mark")

    collect_done(in_flight, on_result, lambda name, e: errors.append(name))
    assert errors == ["a"] and not in_flight


def test_collect_done_lets_a_programming_error_through() -> None:
    in_flight = {"a": finished(error=ValueError("bug"))}
    with pytest.raises(ValueError, match="bug"):
        collect_done(in_flight, lambda *_: None, lambda *_: None)


# ---------------------------------------------------------------- the background pusher


def make_pg_wal(tmp_path: Path) -> Path:
    folder = tmp_path / "pg_wal"
    (folder / "archive_status").mkdir(parents=True)
    return folder


def ready(pg_wal: Path, name: str, data: bytes) -> Path:
    path = pg_wal / name
    path.write_bytes(data)
    (pg_wal / "archive_status" / f"{name}.ready").touch()
    return path


def test_the_pusher_marks_every_ready_file_it_pushed_history_files_included(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    # GIVEN a promoted server's pg_wal: the new timeline's history file and a segment are .ready
    repo = FileRepository(tmp_path / "repo", f"file://{tmp_path / 'repo'}")
    history = ready(pg_wal, "00000002.history", b"1\t0/3000000\tno recovery target specified\n")
    segment = ready(pg_wal, segment_name(2, 3), os.urandom(64 * 1024))
    # WHEN the background pusher runs until it is idle
    counted: list[int] = []
    pusher = threading.Thread(
        target=lambda: counted.append(
            run_pusher(repo, WalSettings(codec="lz4"), pg_wal, "stamp", parallel=2, idle_exit=0.2)
        ),
        daemon=True,
    )
    pusher.start()
    pusher.join(timeout=30)
    stuck = pusher.is_alive()
    if stuck:
        shutil.rmtree(pg_wal)  # its loop ends with pg_wal
    # THEN both are in the repository and both are marked, and the pusher goes idle: wal-push
    # waiting for the history file is answered at once (an unmarked one was pushed again and
    # again, and its wal-push waited for the pusher's full timeout)
    assert not stuck, "the pusher kept pushing a file it never marked"
    assert counted == [2]
    assert find_object(repo, history.name, WalSettings()) and find_object(repo, segment.name, WalSettings())
    assert already_archived(history, "stamp") and already_archived(segment, "stamp")


def test_the_pusher_marks_a_failed_push_and_the_waiter_gets_the_reason(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    # GIVEN a segment archived already with other content
    repo = FileRepository(tmp_path / "repo", f"file://{tmp_path / 'repo'}")
    path = ready(pg_wal, segment_name(1, 9), b"first content" * 100)
    push_file(repo, path, WalSettings())
    path.write_bytes(b"other content" * 100)
    # WHEN the pusher tries it
    run_pusher(repo, WalSettings(), pg_wal, "stamp", parallel=1, idle_exit=0.2)
    # THEN the waiting wal-push gets a typed failure with the reason, once
    outcome = wait_for_pusher(path, "stamp", timeout=5, alive=lambda: True)
    assert outcome.status is Handover.FAILED and not outcome.archived
    assert outcome.error and "different content" in outcome.error
    assert wait_for_pusher(path, "stamp", timeout=0.2, alive=lambda: True).status is Handover.NO_ANSWER


def test_the_waiter_answers_archived_as_soon_as_the_mark_appears(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    repo = FileRepository(tmp_path / "repo", f"file://{tmp_path / 'repo'}")
    path = ready(pg_wal, segment_name(1, 4), b"wal" * 1000)
    pusher = threading.Thread(
        target=run_pusher,
        args=(repo, WalSettings(), pg_wal, "stamp"),
        kwargs={"parallel": 1, "idle_exit": 0.2},
    )
    pusher.start()
    try:
        outcome = wait_for_pusher(path, "stamp", timeout=30, alive=pusher.is_alive)
    finally:
        pusher.join()
    assert outcome.status is Handover.ARCHIVED and outcome.archived and outcome.error is None


def test_the_waiter_stops_waiting_for_a_pusher_that_is_gone(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    path = ready(pg_wal, segment_name(1, 5), b"wal")
    assert wait_for_pusher(path, "stamp", timeout=30, alive=lambda: False).status is Handover.NO_ANSWER


def test_a_file_without_its_ready_mark_is_not_handed_to_the_pusher(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    # a file pushed by hand has no .ready: the pusher works from archive_status, so wal-push
    # pushes it itself (and starts no pusher)
    path = pg_wal / segment_name(1, 6)
    path.write_bytes(b"wal")
    outcome = hand_to_pusher(path, "stamp", ["false"], timeout=30)
    assert outcome.status is Handover.NOT_HANDED
    assert not (pg_wal / "gravl-dr" / "pusher.log").exists()


def test_a_failure_mark_names_the_file_it_was_for(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    path = ready(pg_wal, segment_name(1, 7), b"wal")
    mark_failed(path, "repository down")
    path.write_bytes(b"a new file under the same name")
    os.utime(path, ns=(1, 1))
    # the mark was for the file that was there before: it does not answer for this one
    assert wait_for_pusher(path, "stamp", timeout=0.2, alive=lambda: True).status is Handover.NO_ANSWER


# ---------------------------------------------------------------- one background process per pg_wal, the prefetcher's state


def test_only_one_process_holds_a_pg_wal_lock_and_a_dead_pid_is_no_pusher(tmp_path: Path) -> None:
    pg_wal = make_pg_wal(tmp_path)
    first = take_lock(pg_wal, PUSHER_LOCK)
    assert first is not None
    try:
        assert take_lock(pg_wal, PUSHER_LOCK) is None
    finally:
        os.close(first)
    again = take_lock(pg_wal, PUSHER_LOCK)
    assert again is not None
    os.close(again)
    write_pid(pg_wal, PUSHER_PID)
    assert pusher_pid(pg_wal) == os.getpid()
    (pg_wal / "gravl-dr" / PUSHER_PID).write_text("999999999")
    assert pusher_pid(pg_wal) is None


def prefetcher(folder: Path, depth: int = 4) -> PrefetchState:
    folder.mkdir(parents=True)
    return PrefetchState(
        repo=FileRepository(folder, f"file://{folder}"),
        settings=WalSettings(),
        pool=ThreadPoolExecutor(1),
        folder=folder,
        stamp="stamp",
        depth=depth,
    )


def test_the_prefetcher_restarts_only_when_recovery_asks_outside_its_range(tmp_path: Path) -> None:
    # GIVEN a prefetcher working ahead of segment 10 on timeline 1
    state = prefetcher(tmp_path / "pg_wal" / "gravl-dr" / "prefetch")
    (state.folder / WANT_FILE).write_text(segment_name(1, 10))
    state.follow_recovery(now=1.0)
    assert (state.timeline, state.next_segno, state.want) == (1, 11, segment_name(1, 10))
    # WHEN recovery asks for a segment inside the range being fetched: it keeps going
    state.next_segno = 14
    (state.folder / segment_name(1, 11)).write_bytes(b"passed")
    (state.folder / WANT_FILE).write_text(segment_name(1, 12))
    state.follow_recovery(now=2.0)
    assert (state.timeline, state.next_segno) == (1, 14)
    assert not (state.folder / segment_name(1, 11)).exists()  # recovery has passed it
    # WHEN recovery jumps (a new timeline): it starts again after the wanted segment
    (state.folder / WANT_FILE).write_text(segment_name(2, 40))
    state.follow_recovery(now=3.0)
    assert (state.timeline, state.next_segno, state.retry_at) == (2, 41, 0.0)
    state.pool.shutdown()


def test_a_segment_not_archived_yet_is_retried_from_there_a_second_later(tmp_path: Path) -> None:
    state = prefetcher(tmp_path / "pg_wal" / "gravl-dr" / "prefetch")
    state.timeline, state.next_segno, state.now = 1, 20, 5.0
    state.in_flight = {segment_name(1, 17): settled(False), segment_name(1, 18): settled(True)}
    collect_done(state.in_flight, state.fetched_one, state.failed_one)
    assert (state.next_segno, state.retry_at, state.fetched) == (17, 6.0, 1)
    assert state.ours == {segment_name(1, 18)}
    state.pool.shutdown()


@pytest.mark.parametrize("signal", [None, "recovery.signal", "standby.signal"])
def test_a_prefetcher_started_after_recovery_ended_exits_at_once(tmp_path: Path, signal: str | None) -> None:
    # GIVEN a data directory whose server promoted (no signal file) or is still recovering
    pg_wal = make_pg_wal(tmp_path / "data")
    if signal:
        (pg_wal.parent / signal).touch()
    repo = FileRepository(tmp_path / "repo", f"file://{tmp_path / 'repo'}")
    # WHEN a prefetcher starts (as restore_command's last calls start one)
    done = threading.Event()

    def prefetch() -> None:
        run_prefetcher(repo, WalSettings(), pg_wal, "stamp", depth=2, parallel=1, idle_exit=30)
        done.set()

    threading.Thread(target=prefetch, daemon=True).start()
    # (without recovery it returns before doing anything; in recovery its idle_exit is 30 s)
    finished_at_once = done.wait(timeout=10 if signal is None else 1)
    if not finished_at_once:
        (spool_root(pg_wal) / "prefetch" / STOP_FILE).touch()  # as the restore flow ends it
        assert done.wait(timeout=10), "a prefetcher told to stop did not exit"
    # THEN without recovery it exits at once and takes no lock (it used to idle out its 30 s,
    # and the restore waited for it); in recovery it keeps serving
    assert finished_at_once == (signal is None)
    if signal is None:
        assert prefetcher_pid(pg_wal) is None
