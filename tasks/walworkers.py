"""Adapter: many WAL files at once — the look-ahead push, the background pusher and prefetcher, and handing a file to the pusher.

The background pusher is pgBackRest's archive-async: the first ``wal-push`` starts one detached
pusher per pg_wal; it keeps its interpreter, config and repository client warm, pushes every
.ready file (oldest first, several at once) and marks each one archived (.ok) or failed (.err).
``wal-push`` itself only waits for its file's mark (``hand_to_pusher``), so a call costs an
interpreter start, not a boto3 client and a compression. The .ok mark is written only once the
object is durable, so a crash of either process loses nothing: an unmarked file is pushed again
(identical content is a success).

The background prefetcher is pgBackRest's asynchronous archive-get: the first ``wal-fetch`` that
has to go to the repository starts one detached prefetcher per pg_wal. It keeps ``depth``
verified segments ahead of the one recovery last asked for in ``pg_wal/gravl-dr/prefetch/``, so
PostgreSQL's next calls are answered by ``tasks.walserve`` with a rename while the prefetcher
fetches, decompresses and verifies on the other cores, overlapping with replay. It learns where
recovery is from the ``want`` file (written by wal-fetch when it has to fetch a file itself) and
from the files the fast path takes away; it exits when recovery ends (recovery.signal, once
seen, is gone) or after ``idle_exit`` seconds without either.

Both loops collect their finished work with one helper, ``collect_done``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tasks import walserve
from tasks.errors import DRError
from tasks.walarchive import (
    PushResult,
    WalVanished,
    find_object,
    object_key,
    push_file,
    repository_reachable,
    write_verified,
)
from tasks.walnames import parse_wal_name, segment_name
from tasks.walspool import (
    PREFETCHER_LOCK,
    PREFETCHER_LOG,
    PREFETCHER_PID,
    PUSHER_LOCK,
    PUSHER_LOG,
    PUSHER_PID,
    WANT_FILE,
    already_archived,
    atomic_write,
    ensure_dir,
    failed_recently,
    mark_archived,
    mark_failed,
    prefetcher_pid,
    prune_spool,
    pusher_pid,
    ready_files,
    spool_root,
    spool_writable,
    take_failure,
    take_lock,
    write_pid,
)

if TYPE_CHECKING:
    from tasks.repository import Repository
    from tasks.walformat import WalSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


def collect_done(
    in_flight: dict[str, Future[T]],
    on_result: Callable[[str, T], None],
    on_error: Callable[[str, DRError | OSError], None],
) -> int:
    """Take every finished future out of ``in_flight`` (in submission order) and hand its result
    to ``on_result``; a DRError or OSError, from the work or from ``on_result``, goes to
    ``on_error`` instead. Returns how many finished; unfinished ones stay in flight."""
    done = [name for name, fut in in_flight.items() if fut.done()]
    for name in done:
        fut = in_flight.pop(name)
        try:
            on_result(name, fut.result())
        except (DRError, OSError) as exc:
            on_error(name, exc)
    return len(done)


# ---------------------------------------------------------------- the look-ahead push (in wal-push)


@dataclass(frozen=True)
class LookaheadResult:
    own: PushResult
    ahead: tuple[PushResult, ...]
    failed_ahead: tuple[str, ...]


def push_with_lookahead(
    repo: Repository, path: Path, settings: WalSettings, *, parallel: int, stamp: str
) -> LookaheadResult:
    """Push ``path`` and, in parallel, up to ``parallel - 1`` other files already ``.ready`` in
    archive_status, marking each one stored; the caller's exit status depends on ``path`` only."""
    path = path.absolute()
    pg_wal = path.parent
    others: list[str] = []
    if parallel > 1:
        for name in ready_files(pg_wal):
            if name == path.name or already_archived(pg_wal / name, stamp):
                continue
            others.append(name)
            if len(others) >= parallel - 1:
                break
    can_mark = spool_writable(pg_wal)
    with ThreadPoolExecutor(max(1, len(others) + 1), thread_name_prefix="wal-push") as pool:
        own_f = pool.submit(push_file, repo, path, settings)
        ahead_f: dict[str, Future[PushResult]] = {
            n: pool.submit(push_file, repo, pg_wal / n, settings) for n in others
        }
        ahead: list[PushResult] = []
        failed: list[str] = []
        for name, fut in ahead_f.items():
            try:
                res = fut.result()
                if can_mark:
                    mark_archived(pg_wal / name, res, stamp)
                ahead.append(res)
            except (DRError, OSError) as exc:
                # it will be pushed again when PostgreSQL asks for it
                failed.append(name)
                log.warning("look-ahead push of %s failed (it will be retried): %s", name, exc)
        own = own_f.result()
    with contextlib.suppress(OSError):
        prune_spool(pg_wal)
    return LookaheadResult(own, tuple(ahead), tuple(failed))


# ---------------------------------------------------------------- the background pusher


def run_pusher(
    repo: Repository,
    settings: WalSettings,
    pg_wal: Path,
    stamp: str,
    *,
    parallel: int,
    idle_exit: float = 10.0,
) -> int:
    """Push every .ready file until none has come for ``idle_exit`` seconds; returns the count."""
    lock = take_lock(pg_wal, PUSHER_LOCK)
    if lock is None:
        return 0  # another pusher serves this pg_wal
    write_pid(pg_wal, PUSHER_PID)
    pushed = 0
    in_flight: dict[str, Future[PushResult]] = {}

    def stored(name: str, res: PushResult) -> None:
        nonlocal pushed
        mark_archived(pg_wal / name, res, stamp)
        pushed += 1
        log.info(
            "%s %s: %d -> %d bytes in %.0f ms",
            name,
            res.outcome,
            res.raw_size,
            res.stored_size,
            res.seconds * 1000,
        )

    def failed(name: str, exc: DRError | OSError) -> None:
        log.warning("push of %s failed: %s", name, exc)
        mark_failed(pg_wal / name, str(exc))

    idle_since = time.monotonic()
    try:
        with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="wal-pusher") as pool:
            while pg_wal.is_dir():
                collect_done(in_flight, stored, failed)
                for name in _to_push(pg_wal, stamp, in_flight, parallel):
                    in_flight[name] = pool.submit(push_file, repo, pg_wal / name, settings)
                if in_flight:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > idle_exit:
                    break
                time.sleep(0.02)
                with contextlib.suppress(OSError):
                    if not in_flight:
                        prune_spool(pg_wal)
    finally:
        os.close(lock)
    return pushed


def _to_push(pg_wal: Path, stamp: str, in_flight: dict[str, Future[PushResult]], parallel: int) -> list[str]:
    """The .ready files to start pushing now, in the archiver's order, up to ``parallel`` in flight."""
    picked: list[str] = []
    for name in ready_files(pg_wal):
        if len(in_flight) + len(picked) >= parallel:
            break
        path = pg_wal / name
        if name in in_flight or already_archived(path, stamp) or failed_recently(path):
            continue
        picked.append(name)
    return picked


class Handover(enum.Enum):
    """What became of a file handed to the background pusher."""

    ARCHIVED = "archived"  # durably in the repository (stored, or the same content was there)
    FAILED = "failed"  # the pusher tried and failed: the error says why
    NO_ANSWER = "no answer"  # the pusher went away or was too slow: push the file here
    NOT_HANDED = "not handed"  # not .ready, spool not writable, or no pusher: push the file here


@dataclass(frozen=True)
class PusherOutcome:
    status: Handover
    error: str | None = None

    @property
    def archived(self) -> bool:
        return self.status is Handover.ARCHIVED


ARCHIVED = PusherOutcome(Handover.ARCHIVED)
NO_ANSWER = PusherOutcome(Handover.NO_ANSWER)
NOT_HANDED = PusherOutcome(Handover.NOT_HANDED)


def wait_for_pusher(path: Path, stamp: str, *, timeout: float, alive: Callable[[], bool]) -> PusherOutcome:
    """Wait until the pusher marked ``path`` archived or failed; NO_ANSWER when the pusher is
    gone or too slow (the caller then pushes the file itself)."""
    deadline = time.monotonic() + timeout
    checks = 0
    while time.monotonic() < deadline:
        if already_archived(path, stamp):
            return ARCHIVED
        failure = take_failure(path)
        if failure is not None:
            return PusherOutcome(Handover.FAILED, failure)
        checks += 1
        if checks % 10 == 0 and not alive():
            return ARCHIVED if already_archived(path, stamp) else NO_ANSWER
        time.sleep(0.01)
    return NO_ANSWER


def _spawn(pg_wal: Path, log_name: str, command: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a background process for pg_wal, detached in its own session, its output appended
    to the spool's ``log_name``. OSError when it cannot be started."""
    with open(spool_root(pg_wal) / log_name, "ab") as log_file:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )


def spawn_pusher(pg_wal: Path, command: Sequence[str]) -> subprocess.Popen[bytes] | None:
    """Start the background pusher for pg_wal (``command``: the daemon's command line); None
    when it cannot be started (wal-push then pushes the file itself)."""
    try:
        return _spawn(pg_wal, PUSHER_LOG, command)
    except OSError:
        return None


def ensure_prefetcher(pg_wal: Path, command: Sequence[str]) -> None:
    """Start the background prefetcher of pg_wal (``command``: the daemon's command line)
    unless one runs; wal-fetch works without it, only slower."""
    if prefetcher_pid(pg_wal) is not None or not spool_writable(pg_wal):
        return
    try:
        _spawn(pg_wal, PREFETCHER_LOG, command)
    except OSError as exc:
        log.warning("cannot start the WAL prefetcher: %s", exc)


def hand_to_pusher(path: Path, stamp: str, command: Sequence[str], *, timeout: float) -> PusherOutcome:
    """Have the background pusher of ``path``'s pg_wal archive it (starting the pusher with
    ``command`` unless one runs) and wait for its answer. NOT_HANDED when the file is not
    ``.ready`` (the pusher works from archive_status: a file pushed by hand has none), the spool
    is not writable or no pusher can start; NO_ANSWER when the pusher did not answer in time."""
    pg_wal = path.absolute().parent
    ready = (pg_wal / "archive_status" / f"{path.name}.ready").exists()
    if not ready or not spool_writable(pg_wal):
        return NOT_HANDED
    child = None if pusher_pid(pg_wal) is not None else spawn_pusher(pg_wal, command)
    if child is None and pusher_pid(pg_wal) is None:
        return NOT_HANDED

    def alive() -> bool:
        if child is not None and child.poll() is None:
            return True
        return pusher_pid(pg_wal) is not None

    return wait_for_pusher(path.absolute(), stamp, timeout=timeout, alive=alive)


# ---------------------------------------------------------------- the background prefetcher


def _prefetch_one(
    repo: Repository, name: str, settings: WalSettings, folder: Path, stamp: str, pgdata: Path
) -> bool:
    """Fetch, verify and mark one segment ahead; False when it is not (yet) archived (then a
    "missing" mark stamped with when this look-up began answers a request for it that came
    before that: see ``walserve.ask``)."""
    checked = time.monotonic_ns()
    try:
        # one request in the usual case: the GET of the configured codec's key, no look-up first
        _size, header = write_verified(
            repo, object_key(name, settings.codec, settings.encrypted), name, settings, folder / name, pgdata
        )
    except WalVanished:  # not under that key: one listing finds any other variant, or none
        key = find_object(repo, name, settings, probe_first=False)
        if key is None:
            _mark_missing(repo, name, folder, stamp, checked)
            return False
        _size, header = write_verified(repo, key, name, settings, folder / name, pgdata)
    with contextlib.suppress(FileNotFoundError):
        (folder / (name + walserve.MISSING_SUFFIX)).unlink()
    st = (folder / name).stat()
    atomic_write(
        folder / (name + walserve.MARK_SUFFIX),
        walserve.mark_text(stamp, st, header.digest_alg, header.digest).encode(),
        like=folder.parent.parent,
        durable=False,
    )
    return True


def _answer_ask(
    repo: Repository, name: str, settings: WalSettings, folder: Path, stamp: str, pgdata: Path
) -> bool:
    """Look up a name recovery asked the fast path for (``walserve.ask``): a segment is
    fetched like one ahead; a history file found is left to the full command (the ask file goes,
    so the fast path stops waiting), one not found is marked missing."""
    if len(name) == 24:
        found = _prefetch_one(repo, name, settings, folder, stamp, pgdata)
    else:
        checked = time.monotonic_ns()
        found = find_object(repo, name, settings, probe_first=False) is not None  # one listing
        if found:
            _unlink(folder, name + walserve.MISSING_SUFFIX, name + walserve.ASK_SUFFIX)
        else:
            _mark_missing(repo, name, folder, stamp, checked)
    log.info("asked for %s: %s", name, "found" if found else "not in the archive")
    return found


def _askable(name: str) -> bool:
    """A segment or timeline history name (an ask file's name is never a path)."""
    try:
        kind = parse_wal_name(name).kind
    except DRError:
        return False
    return kind in ("segment", "history")


def _prune_served(folder: Path, keep: str) -> None:
    """Drop segments the fast path served, except the newest (``keep``): PostgreSQL asks for the
    last segment again at the end of recovery."""
    for entry in os.listdir(folder):
        if entry.endswith(walserve.SERVED_SUFFIX) and entry[:24] < keep:
            _unlink(folder, entry, entry[:24])


def _mark_missing(repo: Repository, name: str, folder: Path, stamp: str, checked_ns: int) -> None:
    """Record that ``name`` was not in the archive in a look-up begun at ``checked_ns`` (by
    find_object), once the repository proved reachable (an unmounted repository is not the end
    of the archive; on a bucket, find_object's listing is the proof)."""
    repository_reachable(repo, listed=True)
    atomic_write(
        folder / (name + walserve.MISSING_SUFFIX),
        walserve.missing_text(stamp, checked_ns).encode(),
        like=folder.parent.parent,
        durable=False,
    )


def _unlink(folder: Path, *names: str) -> None:
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()


@dataclass
class PrefetchState:
    """The prefetcher's state between two turns of its loop (see ``run_prefetcher``)."""

    repo: Repository
    settings: WalSettings
    pool: ThreadPoolExecutor
    folder: Path
    stamp: str
    depth: int
    fetched: int = 0
    want: str | None = None  # the segment recovery last asked wal-fetch for
    timeline: int = 0
    next_segno: int = -1  # the next segment to start fetching
    window: str = ""  # what the fast path may wait for, as last published
    ours: set[str] = field(default_factory=set)  # prefetched, not yet taken by the fast path
    in_flight: dict[str, Future[bool]] = field(default_factory=dict)
    retry_at: float = 0.0
    active: float = field(default_factory=time.monotonic)
    now: float = 0.0  # when this turn started
    # asks run here, never queued behind the segments being fetched ahead (recovery waits on
    # them: the first, a history probe, comes while the first ``depth`` segments are fetched)
    ask_pool: ThreadPoolExecutor | None = None

    @property
    def pg_wal(self) -> Path:
        return self.folder.parent.parent

    def turn(self, now: float) -> None:
        self.now = now
        self.follow_recovery(now)
        collect_done(self.in_flight, self.fetched_one, self.failed_one)
        self.note_taken(now)
        self.answer_asks()
        if self.timeline and now >= self.retry_at:
            self.fill()
        self.publish_window()

    def answer_asks(self) -> None:
        """Look up every name the fast path asked about (``walserve.ask``) and has no answer
        from a look-up begun after it asked."""
        for entry in os.listdir(self.folder):
            if not entry.endswith(walserve.ASK_SUFFIX) or entry.startswith("."):
                continue
            name = entry[: -len(walserve.ASK_SUFFIX)]
            if name in self.in_flight or not _askable(name):
                continue
            try:
                since = int((self.folder / entry).read_text())
            except (OSError, ValueError):
                continue
            if not self.answered(name, since):
                self.in_flight[name] = (self.ask_pool or self.pool).submit(
                    _answer_ask, self.repo, name, self.settings, self.folder, self.stamp, self.pg_wal.parent
                )

    def answered(self, name: str, since: int) -> bool:
        """Whether the fast path has its answer: a "missing" mark of a look-up begun at or after
        ``since``, or the verified segment."""
        if (self.folder / (name + walserve.MARK_SUFFIX)).exists():
            return True
        mark = walserve.read_mark(str(self.folder / (name + walserve.MISSING_SUFFIX))) or {}
        checked = mark.get("checked", "")
        return checked.isdigit() and int(checked) >= since

    def follow_recovery(self, now: float) -> None:
        """Start again from the segment recovery asked for, when it moved out of our range."""
        try:
            wanted = (self.folder / WANT_FILE).read_text().strip()
        except OSError:
            wanted = None
        if not wanted or wanted == self.want:
            return
        self.want, self.active = wanted, now
        wal = parse_wal_name(wanted)
        if (
            wal.kind == "segment"
            and wal.segno is not None
            and (
                wal.timeline != self.timeline or not wal.segno < self.next_segno <= wal.segno + self.depth + 1
            )
        ):
            self.timeline, self.next_segno, self.retry_at = wal.timeline, wal.segno + 1, 0.0
        for entry in os.listdir(self.folder):  # what recovery has passed
            if len(entry) >= 24 and not entry.startswith(".") and entry[:24] < wanted:
                _unlink(self.folder, entry)

    def fetched_one(self, name: str, ok: bool) -> None:
        if name.endswith(".history"):
            return  # an ask: its "missing" mark is all the fast path needs
        if not ok:
            self.resume_from(name)
            return
        self.fetched += 1
        if self.want is not None and name <= self.want:  # recovery got it already
            _unlink(self.folder, name, name + walserve.MARK_SUFFIX)
        else:
            self.ours.add(name)

    def failed_one(self, name: str, exc: DRError | OSError) -> None:
        _unlink(self.folder, name + walserve.ASK_SUFFIX)  # a waiting fast path hands over at once
        if name.endswith(".history"):
            log.warning("look-up of %s failed: %s", name, exc)
            return
        log.warning("prefetch of %s failed: %s", name, exc)
        self.resume_from(name)

    def resume_from(self, name: str) -> None:
        """Not archived yet, or failed (wal-fetch reports it when recovery asks): resume from
        there a little later."""
        segno = parse_wal_name(name).segno
        if segno is not None and segno < self.next_segno:
            self.next_segno = segno
        self.retry_at = self.now + 1.0

    def note_taken(self, now: float) -> None:
        """Forget what the fast path took (its mark is gone; the file stays as the last served)."""
        taken = {n for n in self.ours if not (self.folder / (n + walserve.MARK_SUFFIX)).exists()}
        if taken:
            self.ours -= taken
            self.active = now
            _prune_served(self.folder, keep=max(taken))

    def fill(self) -> None:
        """Start fetching segments until ``depth`` are held or in flight."""
        while len(self.in_flight) + len(self.ours) < self.depth:
            name = segment_name(self.timeline, self.next_segno)
            self.next_segno += 1
            if name in self.in_flight or (self.folder / name).exists():
                continue
            self.in_flight[name] = self.pool.submit(
                _prefetch_one, self.repo, name, self.settings, self.folder, self.stamp, self.pg_wal.parent
            )

    def publish_window(self) -> None:
        """Tell the fast path what it may wait for (tasks.walserve reads ``window``)."""
        held = sorted({n for n in self.in_flight if len(n) == 24} | self.ours)
        current = " ".join([str(os.getpid()), *held])
        if current != self.window:
            self.window = current
            atomic_write(
                self.folder / walserve.WINDOW_FILE, current.encode(), like=self.pg_wal, durable=False
            )


STOP_FILE = "stop"  # in the prefetch folder: the restore flow's "recovery is over, exit now"
LINGER_AFTER_RECOVERY = 5.0


def _recovering(data_dir: Path) -> bool:
    """Whether the server of ``data_dir`` is (still) in archive recovery or a standby."""
    return (data_dir / "recovery.signal").exists() or (data_dir / "standby.signal").exists()


def await_recovery(pg_wal: Path, timeout: float, watch: int | None = None, poll: float = 0.01) -> bool:
    """For a prefetcher the restore started early (tasks.recovery.spawn_early_prefetcher):
    wait until recovery.signal (or standby.signal) and the primed ``want`` file exist. False
    (the prefetcher exits without serving) after ``timeout`` seconds, when told to stop
    (``STOP_FILE``), when ``pg_wal`` went after it was there, or when the restore's process
    ``watch`` is gone: a failed or killed restore leaves no prefetcher behind, and none that
    waits holds the lock."""
    # (os.path: the data directory is the restore's, unreadable to the server's user, until
    # the data step ends)
    data_dir = str(pg_wal.absolute().parent)
    folder = str(spool_root(pg_wal) / "prefetch")
    signals = [os.path.join(data_dir, name) for name in ("recovery.signal", "standby.signal")]
    deadline = time.monotonic() + timeout
    seen = False
    while time.monotonic() < deadline:
        here = os.path.isdir(pg_wal)
        if (
            os.path.exists(os.path.join(folder, STOP_FILE))
            or (seen and not here)
            or not _process_alive(watch)
        ):
            return False
        seen = seen or here
        if any(map(os.path.exists, signals)) and os.path.exists(os.path.join(folder, WANT_FILE)):
            return True
        time.sleep(poll)
    return False


def _process_alive(pid: int | None) -> bool:
    return pid is None or walserve.process_alive(pid)


def run_prefetcher(
    repo: Repository,
    settings: WalSettings,
    pg_wal: Path,
    stamp: str,
    *,
    depth: int,
    parallel: int,
    idle_exit: float = 30.0,
    linger: float = LINGER_AFTER_RECOVERY,
) -> int:
    """Keep ``depth`` segments prefetched ahead of recovery until it ends; returns the count.

    It ends ``linger`` seconds after the signal files went (PostgreSQL removes recovery.signal
    before its last restore_command call, the parent timeline's history file), at once when
    asked to (``STOP_FILE``: the restore flow, once the server promoted), or after ``idle_exit``
    seconds without work."""
    data_dir = pg_wal.absolute().parent
    if not _recovering(data_dir):
        # No recovery to serve: a prefetcher started by the very last restore_command calls
        # used to idle out for ``idle_exit`` seconds while the restore flow waited for it to go
        # (tasks.recovery.clear_prefetch).
        return 0
    lock = take_lock(pg_wal, PREFETCHER_LOCK)
    if lock is None:
        return 0  # another prefetcher serves this pg_wal
    write_pid(pg_wal, PREFETCHER_PID)
    folder = spool_root(pg_wal) / "prefetch"
    ensure_dir(folder, pg_wal)
    for entry in os.listdir(folder):  # what an earlier prefetcher left is not trusted
        if entry not in (WANT_FILE, walserve.WINDOW_FILE):
            _unlink(folder, entry)
    fetched = 0
    try:
        with (
            ThreadPoolExecutor(max(1, parallel), thread_name_prefix="wal-prefetch") as pool,
            ThreadPoolExecutor(2, thread_name_prefix="wal-ask") as ask_pool,
        ):
            state = PrefetchState(repo, settings, pool, folder.absolute(), stamp, depth, ask_pool=ask_pool)
            ended_at: float | None = None
            while pg_wal.is_dir() and not (folder / STOP_FILE).exists():
                now = time.monotonic()
                # recovery ended when recovery.signal or standby.signal went (checked on every
                # turn: one removed while this process was starting, or a promoted standby's)
                ended_at = None if _recovering(data_dir) else (ended_at or now)
                if ended_at is not None and now - ended_at > linger and not state.in_flight:
                    break
                state.turn(now)
                if not state.in_flight and now - state.active > idle_exit:
                    break
                time.sleep(0.005)
            fetched = state.fetched
    finally:
        _unlink(folder, walserve.WINDOW_FILE)
        os.close(lock)
    return fetched
