"""Benchmark: WAL replay after a plain `pg_ctl start` of a restored directory, gravl-dr against
pgBackRest (and an older gravl-dr, to compare code versions in the same run).

    python bench/replay.py --s3 --rounds 8
    python bench/replay.py --s3 --rounds 8 --old-venv /path/to/older/checkout/.venv

One source cluster (pgbench, data checksums) archives every WAL file into both repositories, as
in bench/recovery.py (same repositories, same S3 set-up: moto behind the TLS proxy). One backup
each, then --wal-seconds of pgbench; each tool restores its backup once (without --start) into
a reference directory. Each round copies every reference directory and starts the copy with
`pg_ctl start` until it is promoted, the tools in a rotating order: only WAL replay through
each tool's restore_command is timed, and every round replays the same WAL from the same
backup. With --old-venv, an older gravl-dr (the venv of another checkout, installed with
`make venv`) restores a third reference directory with its own restore_command.

From each server's log (PostgreSQL's millisecond timestamps): "first call" is from "starting
PostgreSQL" to "starting archive recovery" (the postmaster's start and PostgreSQL's first
restore_command call, a probe for the next timeline's history file); "segments" from there to
"redo done" (every segment's restore_command call and its redo); "end" from "redo done" to
"archive recovery complete" (the segment after the end, the history probes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import BIN, GRAVL_DR, cleanup, start_prefect_server, timed
from recovery import (
    PG,
    archive_all_and_stop,
    as_pg,
    must,
    prepare_restored,
    side_by_side,
    sql,
    start_and_wait,
    start_source,
)

from tasks.pgcluster import chown_tree, free_port

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")


def log_times(log: Path) -> dict[str, float]:
    """Seconds of each phase, from the server's log (see the module docstring)."""
    marks: dict[str, float] = {}
    segments = 0
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        for key, text in (
            ("start", "starting PostgreSQL"),
            ("recovery", "starting archive recovery"),
            ("redo_done", "redo done at"),
            ("complete", "archive recovery complete"),
        ):
            if text in line and key not in marks:
                marks[key] = t
        if 'restored log file "0' in line and "redo_done" not in marks:
            segments += 1
    out = {"segments": float(segments)}
    if {"start", "recovery", "redo_done", "complete"} <= set(marks):
        out["first_call_s"] = marks["recovery"] - marks["start"]
        out["segments_s"] = marks["redo_done"] - marks["recovery"]
        out["end_s"] = marks["complete"] - marks["redo_done"]
    return out


def copy_dir(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (default 10)")
    parser.add_argument("--rounds", type=int, default=8, help="replay rounds per tool (default 8)")
    parser.add_argument(
        "--wal-seconds", type=int, default=10, help="pgbench -T after the backup (default 10)"
    )
    parser.add_argument("--s3", action="store_true", help="both repositories in S3 (moto over HTTPS)")
    parser.add_argument("--old-venv", type=Path, help="also replay with the gravl-dr of this venv")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the last round's server and prefetcher logs here"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    w = side_by_side("gravl-bench-replay-", args.s3, cores)
    base, sock, cfg, port, pgbr, source = w.base, w.sock, w.cfg, w.port, w.pgbr, w.source
    server, url, home = start_prefect_server()
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_API_URL": url}
    tools = {"gravl": GRAVL_DR, "pgbr": ""}
    if args.old_venv is not None:
        tools["gravl-old"] = str(args.old_venv.absolute() / "bin" / "gravl-dr")
    res: dict[str, Any] = {"rounds": args.rounds, "load_at_start": os.getloadavg()[0], "s3": args.s3}
    samples: dict[str, dict[str, list[float]]] = {t: {} for t in tools}
    try:
        start_source(w)
        conn = w.conn
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        subprocess.run(
            [f"{BIN}/pgbench", "-i", "-q", "-s", str(args.scale), *conn, "bench"],
            check=True,
            capture_output=True,
        )
        sql(port, "CHECKPOINT")
        must(
            timed([GRAVL_DR, "--config", str(cfg), "backup", "--kind", "physical"], env=env, root_only=False),
            "backup",
        )
        must(timed(as_pg(*pgbr, "--type=full", "backup"), root_only=False), "pgbackrest backup")
        print(f"pgbench -T {args.wal_seconds} ...", flush=True)
        subprocess.run(
            [f"{BIN}/pgbench", "-c", "4", "-j", "2", "-T", str(args.wal_seconds), *conn, "bench"],
            check=True,
            capture_output=True,
        )
        archive_all_and_stop(w)
        # ---- one restore per tool (not timed): the reference directories
        refs: dict[str, Path] = {}
        for tool, program in tools.items():
            # restored where each round runs it (pgBackRest's restore_command names that path),
            # then kept aside as the reference
            run = base / f"run-{tool}"
            run.mkdir(mode=0o700)
            chown_tree(run, PG)
            if tool == "pgbr":
                must(
                    timed(as_pg(*pgbr, f"--pg1-path={run}", "restore"), root_only=False), "pgbackrest restore"
                )
            else:
                cmd = [program, "--config", str(cfg), "restore", "latest", "--pgdata", str(run)]
                must(timed(cmd, env=env, root_only=False), f"{tool} restore")
            refs[tool] = base / f"ref-{tool}"
            run.rename(refs[tool])
        # ---- replay rounds, rotating the order
        names = list(tools)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for tool in order:
                target = base / f"run-{tool}"
                copy_dir(refs[tool], target)
                rport = free_port()
                prepare_restored(target, rport, sock)
                t0 = time.monotonic()
                start_and_wait(target, rport)
                seconds = time.monotonic() - t0
                subprocess.run(
                    as_pg(f"{BIN}/pg_ctl", "-D", str(target), "-m", "immediate", "-s", "stop"),
                    capture_output=True,
                )
                log = target.parent / f"{target.name}.log"
                phases = {"replay_s": seconds, **log_times(log)}
                for key, value in phases.items():
                    samples[tool].setdefault(key, []).append(value)
                if args.keep_logs is not None and r == args.rounds - 1:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(log, args.keep_logs / f"{tool}.log")
                    spool_log = target / "pg_wal" / "gravl-dr" / "prefetcher.log"
                    if spool_log.exists():
                        shutil.copy(spool_log, args.keep_logs / f"{tool}-prefetcher.log")
                log.unlink(missing_ok=True)
                # a prefetcher lingers a few seconds after promotion: let it go before the copy
                time.sleep(0.5)
                shutil.rmtree(target, ignore_errors=True)
            print(
                f"round {r + 1}: "
                + json.dumps({t: {k: round(v[-1], 3) for k, v in s.items()} for t, s in samples.items()}),
                flush=True,
            )
    finally:
        source.destroy()
        for stop_service in w.services:
            stop_service()
        server.terminate()
        server.wait()
        cleanup(home, base)
    res["load_at_end"] = os.getloadavg()[0]
    res["samples"] = samples
    med = {t: {k: statistics.median(v) for k, v in s.items()} for t, s in samples.items()}
    res["median"] = med
    print(
        f"\n## replay after `pg_ctl start`, {'S3 (moto over HTTPS)' if args.s3 else 'directory'} repositories, "
        f"{args.rounds} rounds, load {res['load_at_start']:.1f} -> {res['load_at_end']:.1f}\n"
    )
    print(
        "| tool (median) | replay | first call | segments (count) | per segment | end | ratio to pgBackRest |"
    )
    print("|---|---|---|---|---|---|---|")
    for tool in names:
        m = med[tool]
        per = m.get("segments_s", float("nan")) / max(m.get("segments", 1.0), 1.0) * 1000
        print(
            f"| {tool} | {m['replay_s']:.2f} s | {m.get('first_call_s', float('nan')):.3f} s | "
            f"{m.get('segments_s', float('nan')):.2f} s ({m.get('segments', 0):.0f}) | {per:.0f} ms | "
            f"{m.get('end_s', float('nan')):.3f} s | {m['replay_s'] / med['pgbr']['replay_s']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
