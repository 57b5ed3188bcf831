"""Benchmark: recovery side by side, gravl-dr against pgBackRest, on the same data in the same run.

    python bench/recovery.py                           # pgbench scale 30, 3 rounds, 20 s of WAL
    python bench/recovery.py --scale 100 --rounds 5 --wal-seconds 30
    python bench/recovery.py --s3                      # both repositories in S3 (moto over HTTPS)

Run it as root with a venv the postgres OS user can execute (a venv made from /usr/bin/python3,
not one under /root): PostgreSQL runs both tools' WAL hooks as postgres.

One source cluster (pgbench, data checksums) archives every WAL file into BOTH repositories:
`archive_command = 'gravl-dr wal-push %p && pgbackrest archive-push %p'`. Both repositories are
local directories, both compress with zstd level 3, pgBackRest uses process-max = the number of
cores (archive-get synchronous, pgBackRest's default); gravl-dr's flow commands run against a
local Prefect server (as with PREFECT_API_URL in production). Steps, each timed as the whole
command an operator runs, rounds alternating which tool goes first so machine noise hits both:

- backup: `gravl-dr backup --kind physical` vs `pgbackrest backup --type=full --start-fast`
  (and `gravl-dr backup --dry-run`, the fixed cost of a flow command);
- then pgbench writes for --wal-seconds and every segment is archived by both; the source stops;
- restore: `gravl-dr restore latest --pgdata D` vs `pgbackrest restore` (recovery to the end of
  the archive is configured by both; nothing is started);
- replay: start each restored directory with `pg_ctl start` and wait until it is promoted
  (pg_is_in_recovery() false) — the same clock for both, so this is WAL replay through each
  tool's restore_command;
- restore + replay: `gravl-dr restore latest --pgdata D --start` (waits for the promotion) vs
  `pgbackrest restore` + `pg_ctl start` + waiting for the promotion;
- a tiny backup (an empty cluster) restored with `gravl-dr restore ID`: the fixed cost of restore.

gravl-dr's restore commands print their report (`--json`): its `data_seconds` (the restore's own
work) and `seconds` (restore + start + recovery, inside the flow run) give the same steps with
the fixed cost of a flow command (imports, flow-run bookkeeping) taken out, so improvements to
the data path and to the fixed cost show separately.

`--s3`: both repositories live in one S3 bucket of a moto server, reached over HTTPS through a
TLS-terminating proxy on loopback (bench/tlsproxy.py; pgBackRest's S3 client speaks HTTPS only)
with a self-signed certificate both tools trust (gravl-dr through AWS_CA_BUNDLE, pgBackRest
through repo1-s3-ca-file); every byte goes through the same proxy for both.

Peak RSS is the sum of the RSS of the command's process tree (sampled every 20 ms); the restore
commands' idle RSS is what `--dry-run` costs. With `--warm`, the tree includes what the warm
process forked to run the command (the thin client alone is about 17 MB); a forked child's RSS
counts the pages it shares with the warm process, as an in-process command's counts its imports. Medians over rounds; ratio = gravl-dr / pgBackRest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from benchlib import BIN, GRAVL_DR, Timed, cleanup, start_prefect_server, timed
from tlsproxy import TLSProxy, make_certificate, start_moto

from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection

PG = "postgres"


def as_pg(*argv: str) -> list[str]:
    return ["runuser", "-u", PG, "--", *argv]


def sql(port: int, query: str, db: str = "postgres") -> Any:
    with connection(f"host=127.0.0.1 port={port} user=postgres dbname={db}") as conn:
        cur = conn.execute(query)
        row = cur.fetchone() if cur.description else None
    return row[0] if row and len(row) == 1 else row


def must(t: Timed, what: str) -> Timed:
    if t.returncode != 0:
        raise SystemExit(f"{what} failed ({t.returncode}): {t.stderr[-1500:]}")
    return t


def wait_promoted(port: int, timeout: float = 1800) -> None:
    """Until the server accepts connections and says it is no longer in recovery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sql(port, "SELECT pg_is_in_recovery()") is False:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise SystemExit(f"server on port {port} not promoted after {timeout:.0f}s")


def prepare_restored(pgdata: Path, port: int, sock: Path) -> None:
    """Own port and socket, no archiving: a restored copy must not push into the repositories."""
    with open(pgdata / "postgresql.auto.conf", "a") as fh:
        fh.write(f"\nport = {port}\nunix_socket_directories = '{sock}'\narchive_mode = off\n")
    chown_tree(pgdata, PG)


def start_and_wait(pgdata: Path, port: int) -> None:
    log = pgdata.parent / f"{pgdata.name}.log"
    subprocess.run(as_pg(f"{BIN}/pg_ctl", "-D", str(pgdata), "-l", str(log), "-s", "start"), check=True)
    wait_promoted(port)


KEEP_LOGS: Path | None = None


def stop(pgdata: Path) -> None:
    subprocess.run(
        as_pg(f"{BIN}/pg_ctl", "-D", str(pgdata), "-m", "immediate", "-s", "stop"), capture_output=True
    )
    if KEEP_LOGS is not None:  # the server's log (and gravl-dr's prefetcher log) of the last round
        KEEP_LOGS.mkdir(parents=True, exist_ok=True)
        for src in (pgdata.parent / f"{pgdata.name}.log", pgdata / "pg_wal" / "gravl-dr" / "prefetcher.log"):
            if src.exists():
                shutil.copy(src, KEEP_LOGS / f"{pgdata.name}-{src.name}")
    shutil.rmtree(pgdata, ignore_errors=True)
    (pgdata.parent / f"{pgdata.name}.log").unlink(missing_ok=True)  # each round counts its own


def empty_dir(path: Path) -> None:
    # a previous round's WAL prefetcher may still have been writing while its directory went
    for _ in range(50):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            break
        time.sleep(0.1)
    path.mkdir(mode=0o700)
    chown_tree(path, PG)


def replayed_segments(pgdata: Path) -> int:
    log = pgdata.parent / f"{pgdata.name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count('restored log file "0')


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_of(t: Timed) -> dict[str, Any]:
    """The report a `gravl-dr ... --json` command printed."""
    return dict(json.loads(t.stdout[t.stdout.index("{") :]))


def s3_repositories(base: Path) -> tuple[dict[str, Any], str, list[Callable[[], object]]]:
    """moto behind a TLS proxy: gravl-dr's repository settings, pgBackRest's [global] lines,
    and what to stop at the end. The SDK's variables go into this process's environment, which
    every server and command of the run inherits (archive_command and restore_command too)."""
    import boto3

    cert, key = make_certificate(base)
    chown_tree(base, PG)
    moto_port = free_port()
    moto = start_moto(moto_port)
    proxy = TLSProxy(moto_port, cert, key)
    endpoint = f"https://127.0.0.1:{proxy.port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_CA_BUNDLE=str(cert))
    boto3.client("s3", endpoint_url=endpoint, region_name="eu-north-1").create_bucket(
        Bucket="bench", CreateBucketConfiguration={"LocationConstraint": "eu-north-1"}
    )
    gravl_repo = {"url": "s3://bench/gravl", "endpoint_url": endpoint, "region": "eu-north-1"}
    pgbr_repo = (
        "repo1-type=s3\nrepo1-path=/pgbackrest\nrepo1-s3-bucket=bench\nrepo1-s3-endpoint=127.0.0.1\n"
        f"repo1-s3-port={proxy.port}\nrepo1-s3-region=eu-north-1\nrepo1-s3-key=bench\n"
        f"repo1-s3-key-secret=bench\nrepo1-s3-uri-style=path\nrepo1-s3-ca-file={cert}\n"
    )
    return gravl_repo, pgbr_repo, [proxy.close, moto.terminate]


@dataclass
class SideBySide:
    """One source cluster archiving every WAL file into both tools' repositories."""

    base: Path
    sock: Path
    cfg: Path
    port: int
    pgbr: list[str]
    source: LocalCluster
    services: list[Callable[[], object]]  # what to stop at the end (moto, the TLS proxy)

    @property
    def conn(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]


def side_by_side(prefix: str, s3: bool, cores: int) -> SideBySide:
    """The workspace of a side-by-side run: both repositories (directories, or one S3 bucket of
    a moto server behind a TLS proxy), gravl-dr's config, pgBackRest's (zstd level 3,
    process-max = cores, synchronous archive-get); nothing started yet."""
    base = make_private_dir(prefix, PG)
    sock = base / "sock"
    sock.mkdir()
    for d in ("gravl-repo", "pgbr-repo", "pgbr-log", "pgbr-lock", "pgbr-spool"):
        (base / d).mkdir()
    chown_tree(base, PG)
    cfg = base / "gravl-dr.yaml"
    port = free_port()
    gravl_repo: dict[str, Any] = {"url": f"file://{base / 'gravl-repo'}"}
    pgbr_repo = f"repo1-path={base / 'pgbr-repo'}\n"
    services: list[Callable[[], object]] = []
    if s3:
        gravl_repo, pgbr_repo, services = s3_repositories(base)
    cfg.write_text(
        yaml.safe_dump(
            {
                "cluster": "bench",
                "primary": {"dsn": f"host=127.0.0.1 port={port} user=postgres dbname=postgres"},
                "repository": {**gravl_repo, "compression": "zstd"},
            }
        )
    )
    conf = base / "pgbackrest.conf"
    conf.write_text(
        f"[global]\n{pgbr_repo}"
        f"log-path={base / 'pgbr-log'}\nlock-path={base / 'pgbr-lock'}\n"
        f"spool-path={base / 'pgbr-spool'}\ncompress-type=zst\ncompress-level=3\nlog-level-console=warn\n"
        f"log-level-file=off\nprocess-max={cores}\nstart-fast=y\n\n"
        f"[bench]\npg1-path={base / 'data'}\npg1-port={port}\npg1-socket-path={sock}\n"
    )
    chown_tree(base, PG)
    pgbr = ["pgbackrest", f"--config={conf}", "--stanza=bench"]
    return SideBySide(
        base, sock, cfg, port, pgbr, LocalCluster(base / "data", port, dbname="bench"), services
    )


def start_source(w: SideBySide) -> None:
    """Create and start the source cluster (data checksums; archive_command pushes each WAL file
    with gravl-dr, then with pgBackRest), the pgBackRest stanza and the `bench` database."""
    w.source.initdb(
        checksums=True,
        extra_conf={
            "max_wal_size": "'4GB'",
            "checkpoint_timeout": "'30min'",
            "archive_mode": "on",
            "archive_command": f"'{GRAVL_DR} --config {w.cfg} wal-push %p && {' '.join(w.pgbr)} archive-push %p'",
            "unix_socket_directories": f"'{w.sock}'",
        },
    )
    chown_tree(w.base, PG)
    subprocess.run(
        as_pg(f"{BIN}/pg_ctl", "-D", str(w.source.pgdata), "-l", str(w.source.logfile), "-w", "-s", "start"),
        check=True,
    )
    must(timed(as_pg(*w.pgbr, "stanza-create"), root_only=False), "pgbackrest stanza-create")
    subprocess.run([f"{BIN}/createdb", *w.conn, "bench"], check=True)


def archive_all_and_stop(w: SideBySide) -> None:
    """Switch to a new WAL file, wait until both tools archived every one, stop the source."""
    sql(w.port, "SELECT pg_switch_wal()")
    status = w.source.pgdata / "pg_wal" / "archive_status"
    deadline = time.monotonic() + 600
    while any(n.endswith(".ready") for n in os.listdir(status)):
        if time.monotonic() > deadline:
            raise SystemExit("archiving did not drain")
        time.sleep(0.2)
    subprocess.run(
        as_pg(f"{BIN}/pg_ctl", "-D", str(w.source.pgdata), "-m", "fast", "-w", "-s", "stop"), check=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, default=30, help="pgbench scale (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per step (default 3)")
    parser.add_argument(
        "--wal-seconds", type=int, default=20, help="pgbench -T after the backup (default 20)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep-logs", type=Path, help="copy the restored servers' logs here")
    parser.add_argument("--s3", action="store_true", help="both repositories in S3 (moto over HTTPS)")
    parser.add_argument(
        "--warm", action="store_true", help="gravl-dr's flow commands through a running `gravl-dr warm`"
    )
    args = parser.parse_args()
    global KEEP_LOGS
    KEEP_LOGS = args.keep_logs
    if subprocess.run(as_pg(GRAVL_DR, "--help"), capture_output=True).returncode:
        raise SystemExit(f"the postgres user cannot run {GRAVL_DR}: use a venv made from /usr/bin/python3")
    cores = os.cpu_count() or 2
    w = side_by_side("gravl-bench-recovery-", args.s3, cores)
    base, sock, cfg, port, pgbr, source = w.base, w.sock, w.cfg, w.port, w.pgbr, w.source
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server, url, home = start_prefect_server()
    env["PREFECT_API_URL"] = url
    warm: subprocess.Popen[bytes] | None = None
    if args.warm:  # the fixed cost of a flow command through the warm process (flows/cli/warm.py)
        from flows.cli.warm import wait_for_socket

        warm_dir = make_private_dir("gravl-bench-warm-", "root")  # the socket's folder: ours alone
        env["GRAVL_DR_WARM_SOCKET"] = str(warm_dir / "warm.sock")
        warm = subprocess.Popen(
            [GRAVL_DR, "warm"],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_for_socket(warm_dir / "warm.sock", 120):
            raise SystemExit("gravl-dr warm did not start")
    res: dict[str, Any] = {
        "scale": args.scale,
        "rounds": args.rounds,
        "cores": cores,
        "wal_seconds": args.wal_seconds,
        "load_at_start": os.getloadavg()[0],
        "repository": "s3 (moto over HTTPS)" if args.s3 else "file",
        "warm": args.warm,
    }
    samples: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    def gravl(*argv: str) -> Timed:
        # in --warm mode the command runs in a child of the warm process: its memory counts
        return must(
            timed(
                [GRAVL_DR, "--config", str(cfg), *argv],
                env=env,
                root_only=False,
                warm_pid=warm.pid if warm is not None else None,
            ),
            f"gravl-dr {' '.join(argv)}",
        )

    try:
        start_source(w)
        conn = w.conn
        # a tiny backup first: what a flow command costs with (almost) no data
        tiny_run = gravl("backup", "--kind", "physical", "--json")
        tiny = json.loads(tiny_run.stdout[tiny_run.stdout.index("{") :])
        print(f"pgbench -i -s {args.scale} ...", flush=True)
        subprocess.run(
            [f"{BIN}/pgbench", "-i", "-q", "-s", str(args.scale), *conn, "bench"],
            check=True,
            capture_output=True,
        )
        sql(port, "CHECKPOINT")
        res["db_mb"] = round(sql(port, "SELECT pg_database_size('bench')") / 2**20)
        # ---- backup rounds
        for r in range(args.rounds):
            order = ["gravl", "pgbr"] if r % 2 == 0 else ["pgbr", "gravl"]
            for tool in order:
                if tool == "gravl":
                    t = gravl("backup", "--kind", "physical", "--json")
                    note("backup_gravl_s", t.seconds)
                    note("backup_gravl_rss_mb", t.peak_rss_mb)
                    dry = gravl("backup", "--dry-run")
                    note("fixed_backup_dry_run_s", dry.seconds)
                    note("idle_rss_mb", dry.peak_rss_mb)
                else:
                    t = must(
                        timed(as_pg(*pgbr, "--type=full", "backup"), root_only=False), "pgbackrest backup"
                    )
                    note("backup_pgbr_s", t.seconds)
                    note("backup_pgbr_rss_mb", t.peak_rss_mb)
            print(
                f"backup round {r + 1}: {json.dumps({k: round(v[-1], 2) for k, v in samples.items()})}",
                flush=True,
            )
        # ---- WAL after the last backups, archived by both
        start_lsn = sql(port, "SELECT pg_current_wal_lsn()::text")
        print(f"pgbench -T {args.wal_seconds} ...", flush=True)
        subprocess.run(
            [f"{BIN}/pgbench", "-c", "4", "-j", "2", "-T", str(args.wal_seconds), *conn, "bench"],
            check=True,
            capture_output=True,
        )
        res["wal_after_backup_mb"] = round(
            sql(port, f"SELECT pg_current_wal_lsn() - '{start_lsn}'::pg_lsn") / 2**20
        )
        archive_all_and_stop(w)
        # ---- restore, replay, restore + replay
        for r in range(args.rounds):
            order = ["gravl", "pgbr"] if r % 2 == 0 else ["pgbr", "gravl"]
            for tool in order:
                target = base / f"restore-{tool}"
                empty_dir(target)
                if tool == "gravl":
                    t = gravl("restore", "latest", "--pgdata", str(target), "--json")
                    note("restore_gravl_work_s", report_of(t)["data_seconds"])
                else:
                    t = must(
                        timed(as_pg(*pgbr, f"--pg1-path={target}", "restore"), root_only=False),
                        "pgbackrest restore",
                    )
                note(f"restore_{tool}_s", t.seconds)
                note(f"restore_{tool}_rss_mb", t.peak_rss_mb)
                rport = free_port()
                prepare_restored(target, rport, sock)
                t0 = time.monotonic()
                start_and_wait(target, rport)
                note(f"replay_{tool}_s", time.monotonic() - t0)
                note(f"replay_{tool}_segments", replayed_segments(target))
                stop(target)
            for tool in order:
                target = base / f"full-{tool}"
                empty_dir(target)
                t0 = time.monotonic()
                if tool == "gravl":
                    t = gravl("restore", "latest", "--pgdata", str(target), "--start", "--json")
                    rep = report_of(t)
                    note("restore_replay_gravl_recovery_s", rep.get("recovery_seconds") or 0.0)
                    note("restore_replay_gravl_work_s", rep["seconds"])
                else:
                    must(
                        timed(as_pg(*pgbr, f"--pg1-path={target}", "restore"), root_only=False),
                        "pgbackrest restore",
                    )
                    rport = free_port()
                    prepare_restored(target, rport, sock)
                    start_and_wait(target, rport)
                note(f"restore_replay_{tool}_s", time.monotonic() - t0)
                stop(target)
            tiny_target = base / "tiny"
            empty_dir(tiny_target)
            t = gravl("restore", tiny["backup_id"], "--pgdata", str(tiny_target))
            note("fixed_restore_tiny_s", t.seconds)
            shutil.rmtree(tiny_target, ignore_errors=True)
            print(
                f"restore round {r + 1}: {json.dumps({k: round(v[-1], 2) for k, v in samples.items()})}",
                flush=True,
            )
    finally:
        source.destroy()
        for stop_service in w.services:
            stop_service()
        if warm is not None:
            if warm.poll() is not None:
                print("WARNING: gravl-dr warm exited during the run: later samples were cold", flush=True)
            warm.terminate()
            warm.wait()
            cleanup(warm_dir)
        server.terminate()
        server.wait()
        cleanup(home, base)
    res["load_at_end"] = os.getloadavg()[0]
    res["samples"] = samples
    med = {k: round(median(v), 3) for k, v in samples.items()}
    res["median"] = med
    rows = [
        ("physical backup, whole command", "backup"),
        ("restore, whole command", "restore"),
        ("replay to the end, until promoted (pg_ctl start)", "replay"),
        ("restore + replay, until promoted", "restore_replay"),
    ]
    print(
        f"\n## {res['repository']} repositories{', gravl-dr warm' if args.warm else ''}, pgbench scale {args.scale} ({res['db_mb']} MB), {res['wal_after_backup_mb']} MB of WAL after "
        f"the backup, {args.rounds} rounds, {cores} cores, load {res['load_at_start']:.1f} -> "
        f"{res['load_at_end']:.1f}\n"
    )
    print("| step (median) | pgBackRest | gravl-dr | ratio | peak RSS pgBackRest | peak RSS gravl-dr |")
    print("|---|---|---|---|---|---|")
    for label, key in rows:
        g, p = med[f"{key}_gravl_s"], med[f"{key}_pgbr_s"]
        gr, pr = med.get(f"{key}_gravl_rss_mb"), med.get(f"{key}_pgbr_rss_mb")
        print(
            f"| {label} | {p:.2f} s | {g:.2f} s | {g / p:.2f}x | "
            f"{f'{pr:.0f} MB' if pr else '-'} | {f'{gr:.0f} MB' if gr else '-'} |"
        )
    for label, key in (
        ("restore, the flow's own work (fixed cost apart)", "restore"),
        ("restore + replay, the flow's own work (fixed cost apart)", "restore_replay"),
    ):
        g, p = med[f"{key}_gravl_work_s"], med[f"{key}_pgbr_s"]
        print(f"| {label} | {p:.2f} s | {g:.2f} s | {g / p:.2f}x | | |")
    gs, ps = med.get("replay_gravl_segments") or 0, med.get("replay_pgbr_segments") or 0
    if gs and ps:  # each tool replays from its own (latest) backup: the counts may differ by one or two
        print(
            f"\nsegments replayed: pgBackRest {ps:.0f}, gravl-dr {gs:.0f}; per segment: pgBackRest "
            f"{med['replay_pgbr_s'] / ps * 1000:.0f} ms, gravl-dr {med['replay_gravl_s'] / gs * 1000:.0f} ms "
            f"({ps / med['replay_pgbr_s']:.2f} vs {gs / med['replay_gravl_s']:.2f} segments/s)"
        )
    print(
        f"fixed cost: backup --dry-run {med['fixed_backup_dry_run_s']:.2f} s (idle RSS "
        f"{med['idle_rss_mb']:.0f} MB); restore of a tiny backup {med['fixed_restore_tiny_s']:.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
