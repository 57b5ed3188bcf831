"""Benchmark: the fixed cost of a flow command — gravl-dr in-process, gravl-dr through the warm
process, and pgBackRest's equivalent — side by side in the same run.

    python bench/fixedcost.py                 # 7 rounds
    python bench/fixedcost.py --rounds 15 --json out.json

Run it as root (PostgreSQL and pgBackRest run as the postgres OS user). One tiny cluster (an
empty database), one tiny backup in each tool's file repository, a local Prefect server (as with
PREFECT_API_URL in production), and for each round, in an order that alternates so machine
noise hits every column:

- gravl-dr cold: `gravl-dr backup --dry-run` and `gravl-dr restore ID --pgdata D` of the tiny
  backup, each a fresh process that imports Prefect (GRAVL_DR_NO_WARM=1);
- gravl-dr warm: the same two commands with `gravl-dr warm` running: the command is a thin
  client and a child forked from the warm process runs it (same flow run, same artifact);
- gravl-dr warm, heartbeat off: the same with GRAVL_DR_FLOW_HEARTBEAT=off (no flow-run heartbeat
  at all). Before flows/heartbeat.py this column saved up to a second per run (Prefect's
  heartbeat thread, which each flow run joined at its end, sleeps in one-second steps); since,
  the CLI sends the heartbeat itself from a thread that stops at once, and it should match "warm";
- pgBackRest: `pgbackrest info` (what a dry run checks: the repository and the stanza) and
  `pgbackrest restore` of its tiny backup.

Every command's wall time is the whole command as an operator runs it; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any

import yaml
from benchlib import BIN, GRAVL_DR, Timed, cleanup, start_prefect_server, timed

from flows.cli.warm import wait_for_socket
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir

PG = "postgres"


def as_pg(*argv: str) -> list[str]:
    return ["runuser", "-u", PG, "--", *argv]


def must(t: Timed, what: str) -> Timed:
    if t.returncode != 0:
        raise SystemExit(f"{what} failed ({t.returncode}): {t.stderr[-1500:]}")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    base = make_private_dir("gravl-bench-fixed-", PG)
    for d in ("gravl-repo", "pgbr-repo", "pgbr-log", "pgbr-lock", "pgbr-spool", "sock"):
        (base / d).mkdir()
    warm_dir = Path(make_private_dir("gravl-bench-warm-", "root"))
    port = free_port()
    cfg = base / "gravl-dr.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "cluster": "bench",
                "primary": {"dsn": f"host=127.0.0.1 port={port} user=postgres dbname=postgres"},
                "repository": {"url": f"file://{base / 'gravl-repo'}", "compression": "zstd"},
            }
        )
    )
    conf = base / "pgbackrest.conf"
    conf.write_text(
        "[global]\n"
        f"repo1-path={base / 'pgbr-repo'}\nlog-path={base / 'pgbr-log'}\nlock-path={base / 'pgbr-lock'}\n"
        f"spool-path={base / 'pgbr-spool'}\ncompress-type=zst\ncompress-level=3\nlog-level-console=warn\n"
        f"log-level-file=off\nprocess-max={os.cpu_count() or 2}\nstart-fast=y\n\n"
        f"[bench]\npg1-path={base / 'data'}\npg1-port={port}\npg1-socket-path={base / 'sock'}\n"
    )
    chown_tree(base, PG)
    pgbr = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
    source = LocalCluster(base / "data", port, dbname="postgres")
    server, url, home = start_prefect_server()
    env = {
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "GRAVL_DR_WARM_SOCKET": str(warm_dir / "warm.sock"),
    }
    mode_env = {
        "cold": {**env, "GRAVL_DR_NO_WARM": "1"},
        "warm": env,
        "nohb": {**env, "GRAVL_DR_FLOW_HEARTBEAT": "off"},
    }
    daemon: subprocess.Popen[bytes] | None = None
    samples: dict[str, list[float]] = {}

    def note(key: str, t: Timed) -> None:
        samples.setdefault(key, []).append(t.seconds)
        samples.setdefault(f"{key}_rss_mb", []).append(t.peak_rss_mb)

    try:
        source.initdb(
            extra_conf={
                "archive_mode": "on",
                "archive_command": f"'{' '.join(pgbr)} archive-push %p'",
                "unix_socket_directories": f"'{base / 'sock'}'",
            }
        )
        chown_tree(base, PG)
        subprocess.run(
            as_pg(f"{BIN}/pg_ctl", "-D", str(source.pgdata), "-l", str(source.logfile), "-w", "-s", "start"),
            check=True,
        )
        subprocess.run(as_pg(*pgbr, "stanza-create"), check=True, capture_output=True)
        tiny = json.loads(
            must(
                timed([GRAVL_DR, "--config", str(cfg), "backup", "--json"], env=mode_env["cold"]), "backup"
            ).stdout
        )["backup_id"]
        must(timed(as_pg(*pgbr, "--type=full", "backup")), "pgbackrest backup")
        daemon = subprocess.Popen(
            [GRAVL_DR, "warm"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_for_socket(warm_dir / "warm.sock", 120):
            raise SystemExit("gravl-dr warm did not start")
        modes = ["cold", "warm", "nohb", "pgbr"]
        for r in range(args.rounds):
            for mode in modes[r % 4 :] + modes[: r % 4]:
                target = base / f"restore-{mode}"
                if mode == "pgbr":
                    note("pgbr_info", must(timed(as_pg(*pgbr, "info"), root_only=False), "pgbackrest info"))
                    target.mkdir(mode=0o700)
                    chown_tree(target, PG)
                    note(
                        "pgbr_restore",
                        must(
                            timed(as_pg(*pgbr, f"--pg1-path={target}", "restore"), root_only=False),
                            "pgbackrest restore",
                        ),
                    )
                else:
                    e = mode_env[mode]
                    gravl = [GRAVL_DR, "--config", str(cfg)]
                    # the command's whole tree; warm: the thin client and what the warm process forked
                    warm_pid = None if mode == "cold" else daemon.pid
                    note(
                        f"{mode}_dry_run",
                        must(
                            timed([*gravl, "backup", "--dry-run"], env=e, root_only=False, warm_pid=warm_pid),
                            "dry run",
                        ),
                    )
                    note(
                        f"{mode}_restore",
                        must(
                            timed(
                                [*gravl, "restore", tiny, "--pgdata", str(target)],
                                env=e,
                                root_only=False,
                                warm_pid=warm_pid,
                            ),
                            "restore",
                        ),
                    )
                shutil.rmtree(target, ignore_errors=True)
                if daemon.poll() is not None:  # it exits when the code changes: warm samples would be cold
                    raise SystemExit("gravl-dr warm exited during the run (code changed on disk?)")
            print(
                f"round {r + 1}: {json.dumps({k: round(v[-1], 3) for k, v in samples.items()})}", flush=True
            )
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(30)
        subprocess.run(
            as_pg(f"{BIN}/pg_ctl", "-D", str(source.pgdata), "-m", "immediate", "-s", "stop"),
            capture_output=True,
        )
        server.terminate()
        server.wait(30)
        cleanup(base, warm_dir, home)
    med = {k: statistics.median(v) for k, v in samples.items()}
    res: dict[str, Any] = {"rounds": args.rounds, "cores": os.cpu_count(), "load": os.getloadavg()[0], **med}
    print()
    print("| command | gravl-dr in-process | gravl-dr warm | warm, heartbeat off | pgBackRest |")
    print("|---|---|---|---|---|")
    for label, step, peer in (
        ("`backup --dry-run` (pgBackRest: `info`)", "dry_run", "pgbr_info"),
        ("restore of a tiny backup", "restore", "pgbr_restore"),
    ):
        print(
            f"| {label} | {med['cold_' + step]:.2f} s | {med['warm_' + step]:.2f} s "
            f"| {med['nohb_' + step]:.2f} s | {med[peer]:.2f} s |"
        )
    print("\npeak RSS of the command's process tree (warm: the thin client plus the forked child's tree):\n")
    print("| command | gravl-dr in-process | gravl-dr warm | warm, heartbeat off | pgBackRest |")
    print("|---|---|---|---|---|")
    for label, step, peer in (
        ("`backup --dry-run` (pgBackRest: `info`)", "dry_run", "pgbr_info"),
        ("restore of a tiny backup", "restore", "pgbr_restore"),
    ):
        print(
            f"| {label} | {med[f'cold_{step}_rss_mb']:.0f} MB | {med[f'warm_{step}_rss_mb']:.0f} MB "
            f"| {med[f'nohb_{step}_rss_mb']:.0f} MB | {med[f'{peer}_rss_mb']:.0f} MB |"
        )
    print(f"\nmedians of {args.rounds} rounds; load average {res['load']:.1f} on {res['cores']} cores")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
