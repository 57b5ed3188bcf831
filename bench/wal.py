"""Benchmark: WAL archiving under pgbench, gravl-dr wal-push against pgBackRest archive-push.

    python bench/wal.py                      # pgbench -c 4 -j 2 -T 60 per mode
    python bench/wal.py --seconds 25         # a short run
    python bench/wal.py --modes gravl-file,pgbackrest-file

Run it with a Python the postgres OS user can execute (the archive_command runs as postgres):
a venv made from /usr/bin/python3, not one under /root.

For each mode, one fresh cluster (pgbench scale 10) archives through the tool while pgbench runs
for --seconds. Each archive_command call goes through a tiny shell wrapper that logs its start,
end and exit status, so per-call latency is measured the same way for every tool. Reported:
WAL generated, segments archived per second, the archive lag at the end (segments between
pg_stat_archiver.last_archived_wal and the segment being written, and .ready files waiting),
the median and 90th percentile per-call latency, and the time to drain what was left.

Modes: gravl-file (file repository), gravl-s3 (moto S3 over HTTP, in this process),
pgbackrest-file (archive-push, sync), pgbackrest-file-async (archive-async=y, process-max=2).
Both tools use zstd level 3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import BIN, GRAVL_DR, cleanup

from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.postgres import connection
from tasks.reporting import table

PG_USER = "postgres"
SEG = 16 * 1024 * 1024

WRAPPER = """#!/bin/sh
# logs: start_ns end_ns exit_status file
{env}
s=$(date +%s%N)
"$@"
rc=$?
e=$(date +%s%N)
echo "$s $e $rc $(basename "$(eval echo \\${$#})")" >> {log}
exit $rc
"""


def sql(cluster: LocalCluster, query: str) -> Any:
    with connection(cluster.dsn("postgres")) as conn:
        cur = conn.execute(query)
        row = cur.fetchone() if cur.description else None
    return row[0] if row and len(row) == 1 else row


def segno(name: str) -> int:
    return int(name[8:16], 16) * 256 + int(name[16:24], 16)


def ready_count(cluster: LocalCluster) -> int:
    return sum(1 for n in os.listdir(cluster.pgdata / "pg_wal" / "archive_status") if n.endswith(".ready"))


def wait_drained(cluster: LocalCluster, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready_count(cluster) == 0:
            return time.monotonic() - t0
        if sql(cluster, "SELECT failed_count FROM pg_stat_archiver"):
            raise SystemExit(f"archiving fails: {cluster.log_tail(6)}")
        time.sleep(0.2)
    return float("nan")


def setup_mode(mode: str, base: Path, cluster: LocalCluster, moto: str | None) -> str:
    """Repository/config for a mode; returns the archive command (without the wrapper)."""
    if mode.startswith("gravl"):
        repo: dict[str, Any] = {"url": f"file://{base / 'repo'}", "compression": "zstd"}
        if mode == "gravl-s3":
            import boto3

            bucket = f"bench-{int(time.time())}"
            boto3.client("s3", endpoint_url=moto, region_name="eu-north-1").create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-north-1"}
            )
            repo = {
                "url": f"s3://{bucket}/gravl",
                "endpoint_url": moto,
                "region": "eu-north-1",
                "compression": "zstd",
            }
        else:
            (base / "repo" / "backups").mkdir(parents=True)
        cfg = base / "gravl-dr.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {"cluster": "bench", "primary": {"dsn": cluster.dsn("postgres")}, "repository": repo}
            )
        )
        return f"{GRAVL_DR} --config {cfg} wal-push %p"
    conf = base / "pgbackrest.conf"
    asynchronous = mode.endswith("-async")
    conf.write_text(
        "[global]\n"
        f"repo1-path={base / 'pgbr-repo'}\nlog-path={base / 'pgbr-log'}\nlock-path={base / 'pgbr-lock'}\n"
        f"spool-path={base / 'pgbr-spool'}\ncompress-type=zst\ncompress-level=3\nlog-level-console=warn\n"
        f"archive-async={'y' if asynchronous else 'n'}\nprocess-max=2\n\n"
        f"[bench]\npg1-path={cluster.pgdata}\n"
    )
    return f"pgbackrest --config={conf} --stanza=bench archive-push %p"


def run_mode(mode: str, seconds: int, moto: str | None) -> dict[str, Any]:
    base = make_private_dir(f"gravl-bench-wal-{mode}-", PG_USER)
    cluster = LocalCluster(base / "data", free_port(), dbname="bench")
    res: dict[str, Any] = {"mode": mode, "seconds": seconds}
    try:
        cluster.initdb(extra_conf={"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'"})
        log = base / "calls.log"
        wrapper = base / "timed-archive.sh"
        command = setup_mode(mode, base, cluster, moto)
        # the server passes few variables to archive_command: moto's fake credentials go here
        env = "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing" if mode == "gravl-s3" else ""
        wrapper.write_text(WRAPPER.replace("{log}", str(log)).replace("{env}", env))
        wrapper.chmod(0o755)
        cluster.append_conf({"archive_mode": "on", "archive_command": f"'{wrapper} {command}'"})
        chown_tree(base, PG_USER)
        cluster.start()
        if mode.startswith("pgbackrest"):
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    PG_USER,
                    "--",
                    "pgbackrest",
                    f"--config={base / 'pgbackrest.conf'}",
                    "--stanza=bench",
                    "--no-online",
                    "stanza-create",
                ],
                check=True,
                capture_output=True,
            )
        conn = ["-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
        subprocess.run([f"{BIN}/createdb", *conn, "bench"], check=True)
        subprocess.run(
            [f"{BIN}/pgbench", "-i", "-q", "-s", "10", *conn, "bench"], check=True, capture_output=True
        )
        sql(cluster, "CHECKPOINT")
        sql(cluster, "SELECT pg_switch_wal()")
        wait_drained(cluster, 300)
        log.write_text("")
        chown_tree(log, PG_USER)
        start_lsn = sql(cluster, "SELECT pg_current_wal_lsn()::text")
        start_archived = sql(cluster, "SELECT archived_count FROM pg_stat_archiver")
        print(f"[{mode}] pgbench -c 4 -j 2 -T {seconds} ...", flush=True)
        bench = subprocess.run(
            [f"{BIN}/pgbench", "-c", "4", "-j", "2", "-T", str(seconds), *conn, "bench"],
            capture_output=True,
            text=True,
            check=True,
        )
        tps = next(
            (ln.split("=")[1].split()[0] for ln in bench.stdout.splitlines() if ln.startswith("tps =")), "?"
        )
        row = sql(
            cluster,
            "SELECT pg_current_wal_lsn() - %s::pg_lsn, pg_walfile_name(pg_current_wal_lsn()),"
            " a.last_archived_wal, a.archived_count, a.failed_count FROM pg_stat_archiver a".replace(
                "%s", f"'{start_lsn}'"
            ),
        )
        wal_bytes, current, last, archived, failed = row
        ready = ready_count(cluster)
        lag_segments = max(0, segno(current) - segno(last[:24]) - 1) if last else None
        drain = wait_drained(cluster, 600)
        calls = [ln.split() for ln in log.read_text().splitlines() if ln.strip()]
        lat = sorted((int(e) - int(s)) / 1e6 for s, e, rc, *_ in calls if rc == "0")
        res.update(
            {
                "pgbench_tps": float(tps) if tps != "?" else None,
                "wal_generated_mb": round(int(wal_bytes) / 2**20, 1),
                "wal_segments": round(int(wal_bytes) / SEG, 1),
                "archived_during_run": int(archived) - int(start_archived),
                "segments_per_s": round((int(archived) - int(start_archived)) / seconds, 2),
                "lag_segments_at_end": lag_segments,
                "ready_files_at_end": ready,
                "failed_count": int(failed),
                "drain_s": round(drain, 1),
                "calls": len(calls),
                "median_call_ms": round(statistics.median(lat), 1) if lat else None,
                "p90_call_ms": round(lat[int(len(lat) * 0.9) - 1], 1) if len(lat) >= 10 else None,
                "wall_per_segment_ms": round(sum(lat) / max(1, len(lat)), 1) if lat else None,
            }
        )
        if mode.startswith("gravl"):
            # the background pusher's own time per file (compress, store, mark), from its log
            plog = cluster.pgdata / "pg_wal" / "gravl-dr" / "pusher.log"
            push_ms = [
                float(ln.rsplit(" in ", 1)[1].split()[0])
                for ln in (plog.read_text().splitlines() if plog.exists() else [])
                if " stored: " in ln
            ]
            res["pusher_push_median_ms"] = round(statistics.median(push_ms), 1) if push_ms else None
        if mode.startswith("gravl") and mode != "gravl-s3":
            stored = sum(p.stat().st_size for p in (base / "repo" / "wal").rglob("*") if p.is_file())
            res["stored_mb"] = round(stored / 2**20, 1)
    finally:
        cluster.destroy()
        cleanup(base)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="pgbench -T (default 60)")
    parser.add_argument("--modes", default="gravl-file,gravl-s3,pgbackrest-file,pgbackrest-file-async")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    if subprocess.run(["runuser", "-u", PG_USER, "--", GRAVL_DR, "--help"], capture_output=True).returncode:
        raise SystemExit(f"the postgres user cannot run {GRAVL_DR}: use a venv made from /usr/bin/python3")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    moto = None
    server = None
    if "gravl-s3" in modes:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        moto = f"http://{host}:{port}"
    results = []
    try:
        for mode in modes:
            res = run_mode(mode, args.seconds, moto)
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        if server is not None:
            server.stop()
    keys = [
        "wal_generated_mb",
        "segments_per_s",
        "lag_segments_at_end",
        "ready_files_at_end",
        "median_call_ms",
        "p90_call_ms",
        "pusher_push_median_ms",
        "drain_s",
        "failed_count",
        "pgbench_tps",
    ]
    rows = [[r["mode"], *(r.get(k) for k in keys)] for r in results]
    print("\n" + "\n".join(table(("mode", *keys), rows)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
