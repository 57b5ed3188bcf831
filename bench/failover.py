"""Benchmark: failover RTO/RPO after a SIGKILL and the failback switchover's write-unavailability window.

    .venv/bin/python bench/failover.py --runs 3 [--rows 20000] [--json bench/results/failover.json]

Each run builds a primary (127.0.0.1) streaming to a standby (127.0.0.2), both real PostgreSQL
servers with wal_log_hints=on, and a Route 53 zone on a local moto server. Then:

1. rows are written and replicated; the primary's postmaster gets SIGKILL;
2. the failover flow runs (`--yes`); RTO = the flow's own measure (flow start to the validated
   canary write, DNS included, TTL excluded) and, from outside, SIGKILL to the flow's return;
   RPO = WAL bytes and rows missing on the promoted node;
3. a writer inserts a row every 10 ms into whichever node takes writes while the failback flow
   runs (backup skipped); the write-unavailability window is the longest gap between two
   committed writes, measured by that client, next to the flow's own measure (clean shutdown
   to first write); rows lost = committed writes missing on the final primary.

Flow runs go to one Prefect test harness (a local server started once), like the tests.

    .venv/bin/python bench/failover.py --three-hosts --runs 2 [--rows 20000]

runs the same measures across three "hosts" (tests/threehosts.py): a real `prefect server`, the
failover and failback deployments on an orchestrating worker whose config has no pgdata, and the
node-local steps (fence, rebuild, clean stop, restart as a standby) as `node-step` runs on each
node's own worker. The old primary comes back through `gravl-dr guard` before each failback.
RTO is the flow's own measure and, from outside, SIGKILL to the run's Completed state (a flow
run's start on a worker included); the write-unavailability window is the client's longest gap
during the failback run, next to the flow's own measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks run as plain scripts from a checkout

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

import psycopg  # noqa: E402
import yaml  # noqa: E402

from tasks.config import Node  # noqa: E402
from tasks.pgcluster import LocalCluster, free_port, make_private_dir  # noqa: E402
from tasks.topology import clone_standby, configure_standby  # noqa: E402

PG_USER = "postgres"


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2, options="-c synchronous_commit=on") as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def make_pair() -> tuple[LocalCluster, LocalCluster, list[Path]]:
    base_h, base_s = (
        make_private_dir("gravl-bench-fo-home-", PG_USER),
        make_private_dir("gravl-bench-fo-sb-", PG_USER),
    )
    home = LocalCluster(base_h / "data", free_port("127.0.0.1"), host="127.0.0.1", dbname="gravl")
    home.initdb(extra_conf={"wal_log_hints": "on"})
    home.start()
    sql(home.dsn("postgres"), "CREATE DATABASE gravl")
    sql(home.dsn(), "CREATE TABLE items (id bigserial PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
    sb = LocalCluster(base_s / "data", free_port("127.0.0.2"), host="127.0.0.2", dbname="gravl")
    home_node = Node(name="home", dsn=home.dsn(), pgdata=str(home.pgdata))
    clone_standby(home_node, sb.pgdata, os_user=PG_USER)
    sb.append_conf({"listen_addresses": "'127.0.0.2'", "port": str(sb.port)})
    configure_standby(sb.pgdata, home_node, "standby-1", os_user=PG_USER)
    sb.start()
    return home, sb, [base_h, base_s]


def wait_replayed(primary: LocalCluster, standby: LocalCluster) -> None:
    target = sql(primary.dsn(), "SELECT pg_current_wal_insert_lsn()")[0][0]
    deadline = time.monotonic() + 60
    while not sql(standby.dsn(), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),))[0][0]:
        if time.monotonic() > deadline:
            raise RuntimeError("standby did not catch up")
        time.sleep(0.02)


class Writer(threading.Thread):
    """Inserts a row every 10 ms into whichever node accepts it; records commit times."""

    def __init__(self, dsns: list[str]) -> None:
        super().__init__(daemon=True)
        self.dsns = dsns
        self.stop = threading.Event()
        self.commits: list[tuple[float, int]] = []

    def run(self) -> None:
        seq = 0
        conn: psycopg.Connection[Any] | None = None
        while not self.stop.is_set():
            seq += 1
            for dsn in ([conn.info.dsn] if conn else []) + self.dsns:
                try:
                    if conn is None or conn.closed or conn.info.dsn != dsn:
                        if conn is not None:
                            conn.close()
                        conn = psycopg.connect(
                            dsn, autocommit=True, connect_timeout=1, options="-c synchronous_commit=on"
                        )
                    conn.execute("INSERT INTO items (tag, n) VALUES ('writer', %s)", (seq,))
                    self.commits.append((time.monotonic(), seq))
                    break
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conn = None
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def longest_gap(self, start: float, end: float) -> float:
        times = [t for t, _ in self.commits if start <= t <= end]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def one_run(moto: str, rows: int, workdir: Path) -> dict[str, float]:
    import boto3

    from flows.failback import failback_flow
    from flows.failover import failover_flow

    home, sb, bases = make_pair()
    try:
        r53 = boto3.client("route53", endpoint_url=moto, region_name="us-east-1")
        zone = r53.create_hosted_zone(Name="gravl.internal.", CallerReference=uuid.uuid4().hex)["HostedZone"][
            "Id"
        ]
        r53.change_resource_record_sets(
            HostedZoneId=zone,
            ChangeBatch={
                "Changes": [
                    {
                        "Action": "UPSERT",
                        "ResourceRecordSet": {
                            "Name": "db.gravl.internal.",
                            "Type": "A",
                            "TTL": 30,
                            "ResourceRecords": [{"Value": "127.0.0.1"}],
                        },
                    }
                ]
            },
        )
        cfg = workdir / f"gravl-dr-{uuid.uuid4().hex[:6]}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "cluster": "gravl",
                    "primary": {"name": "home", "dsn": home.dsn(), "pgdata": str(home.pgdata)},
                    "replicas": [{"name": "standby-1", "dsn": sb.dsn(), "pgdata": str(sb.pgdata)}],
                    "repository": {"url": f"file://{workdir}/repo"},
                    "dns": {
                        "provider": "route53",
                        "zone_id": zone,
                        "record": "db.gravl.internal.",
                        "ttl": 30,
                        "endpoint_url": moto,
                        "region": "us-east-1",
                    },
                }
            )
        )

        sql(
            home.dsn(), "INSERT INTO items (tag, n) SELECT 'before', g FROM generate_series(1, %s) g", (rows,)
        )
        wait_replayed(home, sb)
        pid = home.postmaster_pid()
        assert pid
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        fo = failover_flow(config_path=str(cfg), approved_by="bench", auto_approve=True)
        kill_to_return = time.monotonic() - t_kill
        lost_rows = rows - sql(sb.dsn(), "SELECT count(*) FROM items WHERE tag = 'before'")[0][0]

        sql(sb.dsn(), "INSERT INTO items (tag, n) SELECT 'during', g FROM generate_series(1, 1000) g")
        writer = Writer([sb.dsn(), home.dsn()])
        writer.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        fb = failback_flow(config_path=str(cfg), approved_by="bench", auto_approve=True, backup=False)
        t1 = time.monotonic()
        time.sleep(0.3)
        writer.stop.set()
        writer.join()
        committed = {seq for _, seq in writer.commits}
        on_home = {r[0] for r in sql(home.dsn(), "SELECT n FROM items WHERE tag = 'writer'")}
        assert fb.switchover is not None
        return {
            "rto_flow_s": fo.rto_seconds or -1.0,
            "kill_to_flow_return_s": kill_to_return,
            "rpo_bytes": float(fo.rpo_bytes if fo.rpo_bytes is not None else -1),
            "rows_lost_failover": float(lost_rows),
            "failback_total_s": t1 - t0,
            "switchover_unavailable_flow_s": fb.switchover.unavailable_seconds,
            "switchover_gap_client_s": writer.longest_gap(t0, t1 + 0.3),
            "writes_during_failback": float(len(committed)),
            "rows_lost_failback": float(len(committed - on_home)),
        }
    finally:
        for c in (home, sb):
            c.destroy()
        for b in bases:
            shutil.rmtree(b, ignore_errors=True)


def _table_value(markdown: str, label: str) -> float:
    """The number at the start of a report table row's value ("| RTO (...) | 2.40 s |")."""
    for line in markdown.splitlines():
        if line.startswith(f"| {label}"):
            cell = line.split("|")[2].strip()
            try:
                return float(cell.split()[0])
            except (ValueError, IndexError):
                return -1.0
    return -1.0


def three_host_run(h: Any, rows: int) -> dict[str, float]:
    """One failover and failback across the three hosts; the cluster ends as it began."""
    from threehosts import artifact, start_run, wait_run

    from gravl_testlib import run_cli

    params = {"auto_approve": True, "approved_by": "bench"}
    sql(
        h.primary.dsn(),
        "INSERT INTO items (tag, n) SELECT 'before', g FROM generate_series(1, %s) g",
        (rows,),
    )
    wait_replayed(h.primary, h.standby)
    expected = sql(h.primary.dsn(), "SELECT count(*) FROM items")[0][0]
    pid = h.primary.postmaster_pid()
    assert pid
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    fo = wait_run(h, start_run(h, "failover/failover-manual", params))
    kill_to_completed = time.monotonic() - t_kill
    assert fo.state.is_completed(), fo.state
    report = artifact(h, "failover-report-gravl", fo.id)
    lost_rows = expected - sql(h.standby.dsn(), "SELECT count(*) FROM items")[0][0]
    guard = run_cli("guard", "--node", "primary", config=h.configs["primary"])
    assert guard.returncode == 0, guard.stderr
    deadline = time.monotonic() + 60
    while _exists(pid) and time.monotonic() < deadline:  # PostgreSQL takes a zombie for a live postmaster
        time.sleep(0.1)
    h.primary.start()
    writer = Writer([h.standby.dsn(), h.primary.dsn()])
    writer.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    fb = wait_run(h, start_run(h, "failback/failback-manual", {**params, "backup": False}))
    t1 = time.monotonic()
    time.sleep(0.3)
    writer.stop.set()
    writer.join()
    assert fb.state.is_completed(), fb.state
    back = artifact(h, "failback-report-gravl", fb.id)
    committed = {seq for _, seq in writer.commits}
    on_home = {r[0] for r in sql(h.primary.dsn(), "SELECT n FROM items WHERE tag = 'writer'")}
    sql(h.primary.dsn(), "DELETE FROM items WHERE tag = 'writer'")
    return {
        "rto_flow_s": _table_value(report, "RTO"),
        "kill_to_run_completed_s": kill_to_completed,
        "rpo_bytes": _table_value(report, "RPO"),
        "rows_lost_failover": float(lost_rows),
        "failback_run_s": t1 - t0,
        "switchover_unavailable_flow_s": _table_value(back, "write unavailability"),
        "switchover_gap_client_s": writer.longest_gap(t0, t1 + 0.3),
        "writes_during_failback": float(len(committed)),
        "rows_lost_failback": float(len(committed - on_home)),
    }


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main_three_hosts(runs: int, rows: int) -> list[dict[str, float]]:
    sys.path.insert(0, str(REPO / "tests"))
    from threehosts import three_hosts

    results = []
    with three_hosts() as h:
        for i in range(runs):
            res = three_host_run(h, rows)
            results.append(res)
            print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--three-hosts",
        action="store_true",
        help="node steps on each node's own worker, flows through deployments (tests/threehosts.py)",
    )
    args = parser.parse_args()
    if args.three_hosts:
        hosts_results = main_three_hosts(args.runs, args.rows)
        _print_table(hosts_results)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"mode": "three-hosts", "runs": hosts_results}, indent=2) + "\n"
            )
        return 0

    from moto.server import ThreadedMotoServer
    from prefect.testing.utilities import prefect_test_harness

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    workdir = make_private_dir("gravl-bench-fo-work-", PG_USER)
    results: list[dict[str, float]] = []
    try:
        with prefect_test_harness(server_startup_timeout=90):
            for i in range(args.runs):
                res = one_run(f"http://{host}:{port}", args.rows, workdir)
                results.append(res)
                print(f"run {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    finally:
        moto.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results}, indent=2) + "\n")
    return 0


def _print_table(results: list[dict[str, float]]) -> None:
    print("\n| metric | median | min | max |\n|---|---:|---:|---:|")
    for k in list(results[0]):
        vals = [r[k] for r in results]
        print(f"| {k} | {statistics.median(vals):.3f} | {min(vals):.3f} | {max(vals):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
