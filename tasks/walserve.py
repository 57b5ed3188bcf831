"""Adapter: serving a prefetched WAL segment to restore_command, with the standard library's core only.

PostgreSQL's startup process runs restore_command once per 16 MB segment and waits for it, so
the fixed cost of each call is paid once per segment of replay. Restore writes
``restore_command = 'python -I -S …/walserve.py --config CFG wal-fetch %f %p'``: this script
imports nothing but ``os``, ``sys`` and ``struct`` (no site, no package finder) and answers in a
few milliseconds when the background prefetcher (``tasks.walworkers.run_prefetcher``) already fetched
and verified the segment, or waits while the prefetcher is still fetching it (it lists what it
fetches or holds in ``window``). The segment is handed over as a hard link; the prefetched name
stays (its mark renamed ``.served``) for PostgreSQL's second request for the last segment at the
end of recovery, and the prefetcher drops older served ones. Everything else — not prefetched, a history or partial file, any check
failing — is handed by ``exec`` to the full ``gravl-dr wal-fetch``, which owns the contract
(0 fetched, 1 not in the archive, > 125 for anything else).

"Not in the archive" ends recovery, so this script answers 1 only from a check of the
repository that *began after the request did*: it asks a live prefetcher (``ask``: a
``<name>.ask`` file holding the request's start on the system-wide monotonic clock), which looks
the name up (its repository client is warm: one or two requests, no interpreter start) and
writes a "not in the archive" mark stamped with when that look-up began (``known_missing``). A
mark from an earlier look-up (a segment past the end probed ahead, the same history file
probed at the start of recovery) is never an answer: the archive may have grown since. Asked
are the timeline history probes (PostgreSQL's ``NNNNNNNN.history`` calls at the start and the
end of recovery) and a segment the prefetcher already found missing (the end of the archive);
the prefetcher fetches an asked segment it finds. No live prefetcher, no answer within
ASK_WAIT seconds, a name it found, or a look-up that failed: the full command answers.

A prefetched segment is served only when all of these hold:

- its mark ``<name>.ok``, written by the prefetcher once the archived object's SHA-256 matched,
  names this configuration file's version (hence this repository), this boot (prefetched files
  are not fsynced: a crash may have torn one) and the file's inode, size and mtime (the very
  file that was verified, not one put there since);
- the segment's first page is a long page header (xlog_internal.h, XLogLongPageHeaderData) that
  says: this data directory's system identifier (the first field of global/pg_control), the
  address of this segment's first byte, a timeline not above the one in the name (a segment's
  first pages may predate the switch to its timeline, never follow it), and a segment size equal
  to the file's size.
"""

from __future__ import annotations

import os
import struct
import sys

MARK_SUFFIX = ".ok"
MISSING_SUFFIX = ".missing"
SERVED_SUFFIX = ".served"  # the mark of the last segment served, kept for a second request
ASK_SUFFIX = ".ask"  # "<name>.ask": recovery asked for name at (monotonic ns) the file's content
ASK_WAIT = 10.0  # at most, for the prefetcher's answer to an ask (then the full command)
WINDOW_FILE = "window"  # "<prefetcher pid> <name> <name>...": what it is fetching or holds
WAIT_SECONDS = 60.0  # at most, for a segment the prefetcher is fetching (then the full command)
PREFETCH = os.path.join("gravl-dr", "prefetch")  # under pg_wal, see tasks.walspool.spool_root
XLP_LONG_HEADER = 0x0002
# XLogLongPageHeaderData: magic, info, tli, pageaddr, rem_len, (pad), sysid, seg_size, blcksz
LONG_HEADER = struct.Struct("<HHIQI4xQII")
HEX = frozenset("0123456789ABCDEF")
# the background prefetcher's (and pusher's) entry: flows.cli.wal.daemon_main, without the CLI
DAEMON_MAIN = "import sys; from flows.cli.wal import daemon_main; sys.exit(daemon_main(sys.argv[1:]))"


def daemon_argv(python: str, config_file: str, *args: str) -> list[str]:
    """The command line of a background pusher or prefetcher: ``python -P -c DAEMON_MAIN
    --config CFG -v wal-fetch-daemon PG_WAL ...``. Not ``-m flows.cli``: that loads the CLI's
    parser and every command's module (the config model, the flows' modules), and PostgreSQL's
    first restore_command call after a plain ``pg_ctl start`` waits for this process. Its words
    still name the command and pg_wal (tasks.walspool.our_prefetcher checks them before
    stopping one)."""
    return [python, "-P", "-c", DAEMON_MAIN, "--config", config_file, "-v", *args]


def config_stamp(config_path: str) -> str:
    """Identifies a config file's version: prefetched state is only trusted under the same one."""
    p = os.path.abspath(config_path)
    try:
        st = os.stat(p)
    except OSError:
        return f"{p}:missing"
    return f"{p}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def prefetch_folder(dest: str) -> str:
    """Where segments are prefetched for a restore_command writing to ``dest`` (%p, in pg_wal)."""
    return os.path.join(os.path.dirname(os.path.abspath(dest)), PREFETCH)


def mark_text(stamp: str, st: os.stat_result, alg: str, digest: str) -> str:
    """The mark of a verified prefetched file; ``alg``/``digest`` are the archived header's."""
    return (
        f"stamp={stamp}\nboot={boot_id()}\nino={st.st_ino}\nsize={st.st_size}\n"
        f"mtime_ns={st.st_mtime_ns}\nalg={alg}\ndigest={digest}\n"
    )


def read_mark(path: str) -> dict[str, str] | None:
    try:
        with open(path) as fh:
            text = fh.read(4096)
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def segment_address(name: str, seg_size: int) -> tuple[int, int] | None:
    """(timeline, address of the first byte) of a segment name, or None if it is not one."""
    if len(name) != 24 or not HEX.issuperset(name) or seg_size <= 0:
        return None
    tli, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    per_log = 0x100000000 // seg_size
    if seg >= per_log:
        return None
    return tli, (log * per_log + seg) * seg_size


def system_identifier(pgdata: str) -> int | None:
    """ControlFileData.system_identifier, the first 8 bytes of global/pg_control."""
    try:
        with open(os.path.join(pgdata, "global", "pg_control"), "rb") as fh:
            raw = fh.read(8)
    except OSError:
        return None
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else None


def header_problem(head: bytes, name: str, size: int, sysid: int | None) -> str | None:
    """Why a segment's first page does not belong here (None when it does)."""
    if len(head) < LONG_HEADER.size:
        return "shorter than a page header"
    _magic, info, tli, pageaddr, _rem, file_sysid, seg_size, _blcksz = LONG_HEADER.unpack_from(head)
    if not info & XLP_LONG_HEADER:
        return "first page has no long header"
    if sysid is None:
        return "no pg_control to compare the system identifier with"
    if file_sysid != sysid:
        return f"system identifier {file_sysid}, this data directory's is {sysid}"
    if seg_size != size:
        return f"segment size {seg_size} in the header, {size} bytes on disk"
    where = segment_address(name, seg_size)
    if where is None:
        return "not a segment name"
    if pageaddr != where[1]:
        return f"page address {pageaddr:X}, the name says {where[1]:X}"
    if tli > where[0]:
        return f"timeline {tli} in the header, the name says {where[0]}"
    return None


def check_prefetched(name: str, dest: str, stamp: str) -> tuple[str, str, int] | str:
    """(path, its mark's path, its size) when the prefetched ``name`` may be served into
    ``dest``; otherwise why not."""
    folder = prefetch_folder(dest)
    path = os.path.join(folder, name)
    mark_path = path + MARK_SUFFIX
    mark = read_mark(mark_path)
    if mark is None:  # served once already: PostgreSQL may ask for the last segment again
        mark_path = path + SERVED_SUFFIX
        mark = read_mark(mark_path)
    if mark is None:
        return "not prefetched"
    if mark.get("stamp") != stamp:
        return "prefetched under another configuration"
    if mark.get("boot") != boot_id():
        return "prefetched before a reboot"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "not prefetched"
    try:
        st = os.fstat(fd)
        if (str(st.st_ino), str(st.st_size), str(st.st_mtime_ns)) != (
            mark.get("ino"),
            mark.get("size"),
            mark.get("mtime_ns"),
        ):
            return "not the file that was verified"
        head = os.read(fd, LONG_HEADER.size)
    finally:
        os.close(fd)
    pgdata = os.path.dirname(os.path.dirname(os.path.abspath(dest)))
    problem = header_problem(head, name, st.st_size, system_identifier(pgdata))
    if problem is not None:
        return problem
    return path, mark_path, st.st_size


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (one of another user's counts: EPERM)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def in_prefetch_window(name: str, folder: str) -> bool:
    """True while a live prefetcher is fetching ``name`` or holds it (its window)."""
    try:
        with open(os.path.join(folder, WINDOW_FILE)) as fh:
            pid, *held = fh.read(8192).split()
    except (OSError, ValueError):
        return False
    return name in held and pid.isdigit() and process_alive(int(pid))


def serve(name: str, dest: str, stamp: str, wait: float = 0.0) -> bool:
    """Move a prefetched, checked segment into ``dest``; False when it cannot be served. With
    ``wait``, first wait (up to that many seconds) while the prefetcher is still fetching it."""
    if len(name) != 24 or not HEX.issuperset(name):  # segments only, and never a path
        return False
    found = check_prefetched(name, dest, stamp)
    if found == "not prefetched" and wait > 0:
        import time

        folder = prefetch_folder(dest)
        deadline = time.monotonic() + wait
        while found == "not prefetched" and in_prefetch_window(name, folder) and time.monotonic() < deadline:
            time.sleep(0.002)
            found = check_prefetched(name, dest, stamp)
    if isinstance(found, str):
        return False
    path, mark, _size = found
    # a second name for the same file: PostgreSQL only reads what restore_command delivers
    # (and renames it into pg_wal); the prefetched name stays for a repeated request
    tmp = f"{dest}.gravl-{os.getpid()}"
    try:
        os.link(path, tmp)
        os.replace(tmp, dest)
    except OSError:
        try:  # noqa: SIM105 - contextlib would be one more import on every call
            os.unlink(tmp)
        except OSError:
            pass
        return False
    if mark.endswith(MARK_SUFFIX):
        try:  # noqa: SIM105
            os.replace(mark, path + SERVED_SUFFIX)
        except OSError:
            pass
    return True


def missing_text(stamp: str, checked_ns: int) -> str:
    """A "not in the archive" mark: ``checked_ns`` is when the look-up began (time.monotonic_ns)."""
    return f"stamp={stamp}\nboot={boot_id()}\nchecked={checked_ns}\n"


def _prefetcher_alive(folder: str) -> bool:
    try:
        with open(os.path.join(folder, WINDOW_FILE)) as fh:
            pid = fh.read(200).split()[0]
    except (OSError, IndexError):
        return False
    return pid.isdigit() and process_alive(int(pid))


def known_missing(name: str, dest: str, stamp: str, since_ns: int) -> bool:
    """True when a live prefetcher found ``name`` absent from this repository (after checking
    the repository is reachable) in a look-up that began at or after ``since_ns``
    (time.monotonic_ns, one clock for every process of this boot): recovery may be told "not in
    the archive" (exit 1) without starting the full command, as pgBackRest's asynchronous
    archive-get does from its spool."""
    folder = prefetch_folder(dest)
    mark = read_mark(os.path.join(folder, name + MISSING_SUFFIX))
    if mark is None or mark.get("stamp") != stamp or mark.get("boot") != boot_id():
        return False
    checked = mark.get("checked", "")
    if not checked.isdigit() or int(checked) < since_ns:
        return False
    return _prefetcher_alive(folder)


def _spawn_prefetcher(config: str, dest: str) -> bool:
    """Start the background prefetcher of ``dest``'s pg_wal, detached (double fork, own session,
    output appended to its log), when restore primed it (``want``) and the server is in
    recovery: PostgreSQL's first call, a history probe, then costs one interpreter start (the
    prefetcher's, which serves the rest of recovery) instead of two (the full command's and
    the prefetcher it starts). A second prefetcher started meanwhile exits at once (its lock)."""
    pg_wal = os.path.dirname(os.path.abspath(dest))
    pgdata = os.path.dirname(pg_wal)
    if not os.path.exists(os.path.join(prefetch_folder(dest), "want")) or not any(
        os.path.exists(os.path.join(pgdata, f)) for f in ("recovery.signal", "standby.signal")
    ):
        return False
    pid_path = os.path.join(pg_wal, "gravl-dr", "prefetcher.pid")
    running = _starting_pid(prefetch_folder(dest))
    if running > 0 and process_alive(running):
        return True  # one is running or starting (restore started it): wait for it
    argv = daemon_argv(sys.executable, os.path.abspath(config), "wal-fetch-daemon", pg_wal)
    try:
        log_fd = os.open(
            os.path.join(pg_wal, "gravl-dr", "prefetcher.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
    except OSError:
        return False
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - in the forked child
            try:
                grandchild = os.fork()
                if grandchild == 0:
                    os.setsid()
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.dup2(log_fd, 1)
                    os.dup2(log_fd, 2)
                    os.execv(sys.executable, argv)
                # its pid until it writes its own (the same): the next calls wait for it
                tmp = f"{pid_path}.{os.getpid()}.tmp"
                with open(tmp, "w") as fh:
                    fh.write(str(grandchild))
                os.replace(tmp, pid_path)
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    except OSError:
        return False
    finally:
        os.close(log_fd)
    return True


def _starting_pid(folder: str) -> int:
    """The pid in the prefetcher's pid file (0 when none or unreadable)."""
    try:
        with open(os.path.join(os.path.dirname(folder), "prefetcher.pid")) as fh:
            return int(fh.read(32).strip() or 0)
    except (OSError, ValueError):
        return 0


def _wait_alive(folder: str, wait: float) -> bool:
    """Wait until the prefetcher is up (its window names a live pid); False after ``wait``
    seconds, or at once when the process starting it is gone."""
    import time

    deadline = time.monotonic() + wait
    while not _prefetcher_alive(folder):
        pid = _starting_pid(folder)
        if time.monotonic() >= deadline or not (pid > 0 and process_alive(pid)):
            return _prefetcher_alive(folder)
        time.sleep(0.005)
    return True


def _can_ask(name: str, dest: str, config: str | None, wait: float) -> bool:
    """Whether ``name`` may be asked about, and a live prefetcher is there to answer: a history
    probe (which starts one, given ``config``, when none runs) or a segment the prefetcher
    already found missing (the end of the archive)."""
    folder = prefetch_folder(dest)
    if len(name) == 24:
        return _prefetcher_alive(folder) and os.path.exists(os.path.join(folder, name + MISSING_SUFFIX))
    if not (len(name) == 16 and name.endswith(".history") and HEX.issuperset(name[:8])):
        return False
    if _prefetcher_alive(folder):
        return True
    return config is not None and _spawn_prefetcher(config, dest) and _wait_alive(folder, wait)


def ask(
    name: str, dest: str, stamp: str, since_ns: int, wait: float = ASK_WAIT, config: str | None = None
) -> int | None:
    """Have the live prefetcher look ``name`` up now: 1 when it is not in the archive, 0 when
    the prefetcher fetched it (a segment) and it was served, None when there is no answer here
    (the full command then answers). See ``_can_ask`` for what is asked."""
    import time

    if not _can_ask(name, dest, config, wait):
        return None
    folder = prefetch_folder(dest)
    path = os.path.join(folder, name + ASK_SUFFIX)
    tmp = os.path.join(folder, f".{name}.ask.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(since_ns).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        return None
    answer = None
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            if known_missing(name, dest, stamp, since_ns):
                answer = 1
                break
            if len(name) == 24 and serve(name, dest, stamp):
                answer = 0
                break
            if not os.path.exists(path) or not _prefetcher_alive(folder):
                break  # found (a history file), the look-up failed, or the prefetcher went
            time.sleep(0.002)
    finally:
        try:  # noqa: SIM105
            os.unlink(path)
        except OSError:
            pass
    return answer


def parse_argv(argv: list[str]) -> tuple[str, str, str] | None:
    """(config, name, dest) of ``[--config CFG] [-v] wal-fetch NAME DEST [--prefetch N]``."""
    config: str | None = None
    i = 0
    while i < len(argv) and argv[i] != "wal-fetch":
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
        elif a in ("-v", "--verbose"):
            i += 1
        else:
            return None
    rest = argv[i + 1 :]
    if i >= len(argv) or len(rest) not in (2, 4):
        return None
    if len(rest) == 4 and (rest[2] != "--prefetch" or not rest[3].isdigit()):
        return None
    config = config or os.environ.get("GRAVL_DR_CONFIG") or "gravl-dr.yaml"
    return config, rest[0], rest[1]


def main(argv: list[str]) -> int:
    parsed = parse_argv(argv)
    if parsed is not None:
        config, name, dest = parsed
        import time

        since = time.monotonic_ns()  # a "not in the archive" must come from a later look-up
        stamp = config_stamp(config)
        if len(name) == 24 and serve(name, dest, stamp, wait=WAIT_SECONDS):
            return 0
        answer = ask(name, dest, stamp, since, config=config)
        if answer is not None:
            return answer
    # everything else: the full command, with the same arguments
    try:
        os.execv(sys.executable, [sys.executable, "-P", "-m", "flows.cli", *argv])
    except OSError as exc:
        sys.stderr.write(
            f"gravl-dr: error: wal-fetch: cannot run gravl-dr: {exc} (exit 255: recovery stops)\n"
        )
    return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
