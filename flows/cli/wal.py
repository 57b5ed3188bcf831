"""Entry point: CLI commands for WAL — wal-push, wal-fetch (PostgreSQL's hooks) and wal-check.

None of them imports Prefect. PostgreSQL runs ``wal-push`` once per file, so a file that a
look-ahead push already stored is answered by ``fast_path`` before the parser, the config
model (pydantic) or any repository client is loaded. ``wal-fetch`` maps every outcome to
PostgreSQL's contract itself: 0 fetched, 1 not in the archive, 255 (> 125: recovery stops)
for anything else — a corrupt object or an unreachable repository must never look like the
end of the archive, or PostgreSQL would promote at an earlier point and lose data silently.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.cli.runner import run_flow

log = logging.getLogger("gravl_dr.wal")

FETCH_FATAL = 255  # > 125: PostgreSQL aborts recovery (xlogarchive.c, wait_result_is_any_signal)
FETCH_MISSING = 1
DEFAULT_PARALLEL = 4
DEFAULT_PREFETCH = 8
# seconds without a .ready file before the background pusher exits
PUSHER_IDLE_EXIT = float(os.environ.get("GRAVL_DR_PUSHER_IDLE", "10"))
PUSHER_WAIT = 120.0
# seconds without a request or a prefetched file taken before the background prefetcher exits
PREFETCHER_IDLE_EXIT = float(
    os.environ.get("GRAVL_DR_PREFETCHER_IDLE", "30")
)  # how long wal-push waits for the pusher before pushing the file itself


def register(sub: Any) -> None:
    p = sub.add_parser("wal-push", help="archive one WAL file (archive_command = 'gravl-dr wal-push %%p')")
    p.add_argument("path", help="the file, as PostgreSQL passes it (%%p)")
    p.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help="push up to N .ready files at once (default %(default)s)",
    )
    p.add_argument(
        "--sync",
        action="store_true",
        help="no background pusher: push this file (and N-1 .ready ones) in this process",
    )
    p.set_defaults(func=cmd_wal_push)

    p = sub.add_parser("wal-push-daemon", help="(internal) the background pusher that wal-push starts")
    p.add_argument("pg_wal")
    p.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL)
    p.add_argument("--idle", type=float, default=PUSHER_IDLE_EXIT)
    p.set_defaults(func=cmd_wal_push_daemon)

    p = sub.add_parser(
        "wal-fetch", help="fetch one archived WAL file (restore_command = 'gravl-dr wal-fetch %%f %%p')"
    )
    p.add_argument("name", help="the file name (%%f)")
    p.add_argument("dest", help="where to write it (%%p)")
    p.add_argument(
        "--prefetch",
        type=int,
        default=DEFAULT_PREFETCH,
        help="fetch the next N segments in parallel (default %(default)s; 0 = off)",
    )
    p.set_defaults(func=cmd_wal_fetch_args)

    p = sub.add_parser("wal-fetch-daemon", help="(internal) the background prefetcher that wal-fetch starts")
    p.add_argument("pg_wal")
    p.add_argument("--depth", type=int, default=DEFAULT_PREFETCH)
    p.add_argument("--idle", type=float, default=PREFETCHER_IDLE_EXIT)
    p.add_argument(
        "--await-recovery",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="started before the restore wrote recovery.signal: wait for it (at most SECONDS)",
    )
    p.add_argument(
        "--restore-pid", type=int, default=None, help="with --await-recovery: stop waiting when it exits"
    )
    p.set_defaults(func=cmd_wal_fetch_daemon)

    p = sub.add_parser(
        "wal-check", help="check the WAL archive's continuity, the archiver's health and lag (a flow run)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-server", action="store_true", help="check the repository only")
    p.set_defaults(func=cmd_wal_check)


def _config_file(explicit: str | None) -> str:
    # the same rule as tasks.config.config_path, without importing pydantic
    return explicit or os.environ.get("GRAVL_DR_CONFIG") or "gravl-dr.yaml"


# ---------------------------------------------------------------- fast path


def _split(argv: Sequence[str]) -> tuple[str | None, bool, list[str]] | None:
    """(--config, --verbose, the rest) when argv is simple enough to take without argparse."""
    config: str | None = None
    verbose = False
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            config, i = args[i + 1], i + 2
        elif a.startswith("--config="):
            config, i = a.split("=", 1)[1], i + 1
        elif a in ("-v", "--verbose"):
            verbose, i = True, i + 1
        elif a.startswith("-"):
            return None
        else:
            break
    return config, verbose, args[i:]


def _int_option(rest: list[str], flag: str, default: int) -> int | None:
    """The value of ``flag N`` / ``flag=N`` in rest (removed from it); None when malformed."""
    value = default
    for i, a in enumerate(list(rest)):
        if a == flag and i + 1 < len(rest):
            raw = rest[i + 1]
            del rest[i : i + 2]
        elif a.startswith(flag + "="):
            raw = a.split("=", 1)[1]
            del rest[i]
        else:
            continue
        if not raw.isdigit():
            return None
        return int(raw)
    return value


def fast_path(argv: Sequence[str]) -> int | None:
    """Answer wal-push for an already-archived file, and all of wal-fetch, without the parser.
    None means: let the regular parser handle it."""
    split = _split(argv)
    if split is None:
        return None
    config, verbose, rest = split
    if not rest or rest[0] not in ("wal-push", "wal-fetch") or "-h" in rest or "--help" in rest:
        return None
    if rest[0] == "wal-push":
        rest = rest[1:]
        parallel = _int_option(rest, "--parallel", DEFAULT_PARALLEL)
        synchronous = "--sync" in rest
        rest = [r for r in rest if r != "--sync"]
        if parallel is None or len(rest) != 1:
            return None  # the parser explains the usage
        from tasks.walspool import already_archived, config_stamp

        path = Path(rest[0])
        if path.name and already_archived(path.absolute(), config_stamp(_config_file(config))):
            return 0
        _log_setup(verbose)
        from tasks.errors import DRError, one_line

        try:
            return wal_push(config, rest[0], parallel, synchronous=synchronous)
        except DRError as exc:
            sys.stderr.write(f"gravl-dr: error: {one_line(exc)}\n")
            return exc.exit_code
    rest = rest[1:]
    prefetch = _int_option(rest, "--prefetch", DEFAULT_PREFETCH)
    if prefetch is None or len(rest) != 2:
        sys.stderr.write("gravl-dr: error: usage: wal-fetch NAME DEST [--prefetch N]\n")
        return FETCH_FATAL
    from tasks import walserve  # a prefetched, checked segment: a hard link, nothing else loaded

    if walserve.serve(
        rest[0], rest[1], walserve.config_stamp(_config_file(config)), wait=walserve.WAIT_SECONDS
    ):
        return 0
    _log_setup(verbose)
    return wal_fetch(config, rest[0], rest[1], prefetch)


def _log_setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="gravl-dr: %(message)s")


# ---------------------------------------------------------------- wal-push


def open_wal_repository(
    config: str | None, pg_wal: Path, stamp: str, *, cache: bool = True
) -> tuple[Any, Any]:
    """(repository, WalSettings): from the settings cache when this config version was seen
    before, else from the config (and then cached, unless ``cache`` is False: a prefetcher
    started before the restore's data step writes nothing in the data directory)."""
    from tasks.walformat import WalSettings
    from tasks.walspool import load_settings_cache, save_settings_cache

    cached = load_settings_cache(pg_wal, stamp)
    if cached is not None:
        return cached
    from tasks.config import load_config
    from tasks.repository import open_repository

    cfg = load_config(config)
    repo = open_repository(cfg.repository)
    settings = WalSettings.from_config(cfg.repository)
    if cache:
        save_settings_cache(pg_wal, stamp, cfg.repository)
    return repo, settings


def cmd_wal_push(args: argparse.Namespace) -> int:
    return wal_push(args.config, args.path, args.parallel, synchronous=args.sync)


def daemon_main(argv: Sequence[str]) -> int:
    """The entry of ``wal-push-daemon`` and ``wal-fetch-daemon``: this module's parser only;
    every error is one line and a non-zero exit, as with the CLI's."""
    from tasks.errors import DRError, one_line

    parser = argparse.ArgumentParser(prog="gravl-dr")
    parser.add_argument("--config")
    parser.add_argument("-v", "--verbose", action="store_true")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    if args.command not in ("wal-push-daemon", "wal-fetch-daemon"):
        parser.error(f"{args.command} is not run this way")
    _log_setup(args.verbose)
    try:
        return int(args.func(args) or 0)
    except DRError as exc:
        sys.stderr.write(f"gravl-dr: error: {one_line(exc)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        sys.stderr.write(f"gravl-dr: error: unexpected {type(exc).__name__}: {one_line(exc)}\n")
        return 1


def _daemon_command(config: str | None, *args: str) -> list[str]:
    """The command line of a background pusher or prefetcher (tasks.walserve.daemon_argv)."""
    from tasks.walserve import daemon_argv

    return daemon_argv(sys.executable, str(Path(_config_file(config)).absolute()), *args)


def wal_push(config: str | None, path_arg: str, parallel: int, *, synchronous: bool = False) -> int:
    """archive_command: exit 0 only once the file is durably in the repository."""
    from tasks.errors import ConfigError, PermanentError
    from tasks.walnames import parse_wal_name
    from tasks.walspool import config_stamp
    from tasks.walworkers import Handover, hand_to_pusher, push_with_lookahead

    path = Path(path_arg)
    parse_wal_name(path.name)  # validate before anything else
    if parallel < 1 or parallel > 32:
        raise ConfigError("--parallel must be between 1 and 32")
    if not path.is_file():
        from tasks.errors import PreconditionFailed

        raise PreconditionFailed(f"WAL file {path} does not exist")
    stamp = config_stamp(_config_file(config))
    pg_wal = path.absolute().parent
    if not synchronous:
        daemon = _daemon_command(config, "wal-push-daemon", str(pg_wal), "--parallel", str(parallel))
        outcome = hand_to_pusher(path, stamp, daemon, timeout=PUSHER_WAIT)
        if outcome.status is Handover.ARCHIVED:
            return 0
        if outcome.status is Handover.FAILED:
            raise PermanentError(outcome.error or "push failed")
        if outcome.status is Handover.NO_ANSWER:
            log.warning("background pusher gone or slow: pushing %s here", path.name)
    repo, settings = open_wal_repository(config, pg_wal, stamp)
    res = push_with_lookahead(repo, path, settings, parallel=parallel, stamp=stamp)
    log.info(
        "%s: %s as %s (%d -> %d bytes, %.0f ms); %d more pushed ahead",
        res.own.name,
        res.own.outcome,
        res.own.key,
        res.own.raw_size,
        res.own.stored_size,
        res.own.seconds * 1000,
        len(res.ahead),
    )
    return 0


def cmd_wal_push_daemon(args: argparse.Namespace) -> int:
    from tasks.walspool import config_stamp
    from tasks.walworkers import run_pusher

    pg_wal = Path(args.pg_wal).absolute()
    stamp = config_stamp(_config_file(args.config))
    repo, settings = open_wal_repository(args.config, pg_wal, stamp)
    pushed = run_pusher(
        repo, settings, pg_wal, stamp, parallel=max(1, min(32, args.parallel)), idle_exit=args.idle
    )
    log.info("background pusher of %s exits after pushing %d file(s)", pg_wal, pushed)
    return 0


# ---------------------------------------------------------------- wal-fetch


def cmd_wal_fetch_args(args: argparse.Namespace) -> int:
    return wal_fetch(args.config, args.name, args.dest, args.prefetch)


def wal_fetch(config: str | None, name: str, dest: str, prefetch: int) -> int:
    """PostgreSQL's restore_command contract as exit codes (see the module docstring). A segment
    the prefetcher holds is served from there; otherwise it is fetched here, and the background
    prefetcher is told (or started) to fetch the next ones while recovery replays this one."""
    from tasks.errors import one_line
    from tasks.walspool import config_stamp, note_wanted, prefetch_primed, take_prefetched

    stamp = config_stamp(_config_file(config))
    try:
        # (imported here: even a module that fails to import must stop recovery, not end it)
        from tasks.walarchive import WalMissing, fetch_file, repository_reachable
        from tasks.walnames import parse_wal_name

        wal = parse_wal_name(name)
        target = Path(dest).absolute()
        repo, settings = open_wal_repository(config, target.parent, stamp)
        if wal.kind == "segment":
            if take_prefetched(name, target, stamp, settings.key):
                return 0
            if prefetch > 0:
                note_wanted(target, name)
        if prefetch > 0 and (wal.kind == "segment" or prefetch_primed(target)):
            # (restore primes it with the backup's first segment: the prefetcher can start
            # while recovery still probes for history files)
            _ensure_prefetcher(config, target.parent, prefetch)
        t0 = time.monotonic()
        try:
            size = fetch_file(repo, name, Path(dest), settings)
        except WalMissing:
            repository_reachable(repo)  # a vanished repository is not "the end of the archive"
            log.info("%s is not in the archive", name)
            return FETCH_MISSING
        log.info("%s fetched (%d bytes, %.0f ms)", name, size, (time.monotonic() - t0) * 1000)
        return 0
    except KeyboardInterrupt:
        return FETCH_FATAL
    except Exception as exc:  # noqa: BLE001 - every other outcome must stop recovery
        sys.stderr.write(
            f"gravl-dr: error: wal-fetch {name}: {one_line(exc)} (exit {FETCH_FATAL}: recovery stops "
            "rather than end early)\n"
        )
        return FETCH_FATAL


def _ensure_prefetcher(config: str | None, pg_wal: Path, depth: int) -> None:
    """Start the background prefetcher of pg_wal unless one runs (detached, logging to the spool)."""
    from tasks.walworkers import ensure_prefetcher

    ensure_prefetcher(pg_wal, _daemon_command(config, "wal-fetch-daemon", str(pg_wal), "--depth", str(depth)))


def _log_to(path: Path) -> None:
    """From now on, this process's output goes to ``path`` (appended)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)


def cmd_wal_fetch_daemon(args: argparse.Namespace) -> int:
    from tasks.walspool import PREFETCHER_LOG, config_stamp, spool_root
    from tasks.walworkers import await_recovery, run_prefetcher

    pg_wal = Path(args.pg_wal).absolute()
    stamp = config_stamp(_config_file(args.config))
    repo, settings = open_wal_repository(args.config, pg_wal, stamp, cache=args.await_recovery <= 0)
    if args.await_recovery > 0:
        # the S3 client (boto3's import and set-up) is made on first use: before the wait
        getattr(repo, "client", None)
        log.info("WAL prefetcher of %s has its repository open: waits for the recovery settings", pg_wal)
        if not await_recovery(pg_wal, args.await_recovery, watch=args.restore_pid):
            log.info("WAL prefetcher of %s exits: the restore did not start recovery", pg_wal)
            return 0
        _log_to(spool_root(pg_wal) / PREFETCHER_LOG)
    started = "after" if (pg_wal.parent / "postmaster.pid").exists() else "before"
    log.info("WAL prefetcher of %s has its repository open %s its server started", pg_wal, started)
    depth = max(1, min(64, args.depth))
    got = run_prefetcher(
        repo,
        settings,
        pg_wal,
        stamp,
        depth=depth,
        parallel=max(1, min(depth, os.cpu_count() or 2)),
        idle_exit=args.idle,
    )
    log.info("WAL prefetcher of %s exits after prefetching %d segment(s)", pg_wal, got)
    return 0


# ---------------------------------------------------------------- wal-check


def cmd_wal_check(args: argparse.Namespace) -> int:
    """Run the wal-check flow (its artifact and metrics, as the deployment does) and print its report."""
    from tasks.config import load_config
    from tasks.repository import open_repository
    from tasks.walcheck import WalCheckFailed

    cfg = load_config(args.config)
    open_repository(cfg.repository).check()  # fail fast, before Prefect starts
    from flows.wal import wal_check_flow

    try:
        report = run_flow(wal_check_flow, config_path=args.config, check_server=not args.no_server)
    except WalCheckFailed as exc:
        report = exc.report
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(report.text())
    if not report.ok:
        raise WalCheckFailed(report)
    return 0
