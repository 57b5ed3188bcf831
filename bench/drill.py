"""Benchmark: the restore RTO of a drill on a pgbench database, against a plain copy restore.

    python bench/drill.py                 # pgbench scale 10 (~160 MB)
    python bench/drill.py --scale 100     # ~1.6 GB: the issue's reference size (takes minutes)

Measures in the same run, from the same source (data checksums on):
- `gravl-dr drill <id>` of a physical backup in a file repository: restore (fetch, verify,
  unpack), recovery (start, WAL replay through restore_command, promotion) = the drill's RTO;
  then each check (pg_verifybackup, amcheck, GX suites, usability, pg_checksums); with the
  default drill.heapallindexed_max_mb, then again with heapallindexed on every index;
- after the backup, pgbench writes for a few seconds and the WAL is archived with wal-push:
  the drill replays it to the end of the archive, pausing first at the LSN the backup read its
  row counts at, to compare them exactly;
- the production-shaped cluster of the test suite (tests/prodshape.py), backed up as the
  least-privilege role while pgbench writes: the drill must pass with no false alarm;
- the plain baseline: `pg_basebackup -D - -Ft -X fetch | zstd -3 -T2 > file`, then
  `zstd -d | tar -x` into an empty directory and `pg_ctl start -w` until it accepts connections.
Flow runs go to a local Prefect server started here (as with PREFECT_API_URL in production).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from benchlib import BIN, GRAVL_DR, cleanup, ratio, start_prefect_server, timed

from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir

Report = dict[str, Any]  # one JSON record of bench/results/drill.json: numbers, text, lists


def source_cluster(scale: int) -> LocalCluster:
    """pgbench at a scale, with data checksums so that pg_checksums is part of the drill."""
    base = make_private_dir("gravl-bench-drill-src-", "postgres")
    cluster = LocalCluster(base / "data", free_port(), dbname="bench")
    # Archiving on from the start (a restart later would be needed); nothing is kept until the
    # repository exists: the WAL of pgbench -i is not part of the drill.
    cluster.initdb(
        checksums=True,
        extra_conf={
            "max_wal_size": "'4GB'",
            "checkpoint_timeout": "'30min'",
            "archive_mode": "on",
            "archive_command": "'/bin/true'",
        },
    )
    cluster.start()
    conn = ["-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
    subprocess.run([f"{BIN}/createdb", *conn, "bench"], check=True)
    print(f"pgbench -i -s {scale} ...", flush=True)
    subprocess.run(
        [f"{BIN}/pgbench", "-i", "-q", "-s", str(scale), *conn, "bench"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(["psql", *conn, "-d", "bench", "-qc", "CHECKPOINT"], check=True)
    return cluster


def plain_copy_restore(cluster: LocalCluster, work: Path) -> dict[str, float]:
    """pg_basebackup | zstd to a file, then zstd -d | tar -x and start: the baseline restore."""
    conn = f"-h {cluster.host} -p {cluster.port} -U postgres"
    archive = work / "plain.tar.zst"
    backup = timed(
        f"{BIN}/pg_basebackup {conn} -D - -Ft -X fetch -c fast | zstd -q -3 -T2 > {archive}",
        shell=True,
        root_only=False,
    )
    chown_tree(work, "postgres")
    target = work / "plain"
    target.mkdir(mode=0o700)
    chown_tree(target, "postgres")
    untar = timed(
        ["runuser", "-u", "postgres", "--", "sh", "-c", f"zstd -q -d -c {archive} | tar -x -C {target}"],
        root_only=False,
    )
    with open(target / "postgresql.auto.conf", "a") as fh:
        fh.write("archive_mode = off\n")  # the copy must not push into the drill's archive
    port = free_port()
    copy = LocalCluster(target, port)
    t0 = time.monotonic()
    copy.start(timeout=3600)
    copy.wait_ready(timeout=3600)
    started = time.monotonic() - t0
    copy.destroy()
    return {
        "plain_backup_s": backup.seconds,
        "plain_untar_s": untar.seconds,
        "plain_start_s": started,
        "plain_rto_s": untar.seconds + started,
    }


WRITE_SECONDS = 10


def wal_mb(repo: Path) -> float:
    """Archived WAL in the repository (stored, compressed), in MiB."""
    return sum(p.stat().st_size for p in (repo / "wal").rglob("*") if p.is_file()) / 2**20


def drill(gravl: Callable[..., str], backup_id: str, prefix: str) -> Report:
    """One `gravl-dr drill`: its phases, and the checks' time by kind (keys start with prefix)."""
    t0 = time.monotonic()
    out = gravl("drill", backup_id, "--json")
    wall = time.monotonic() - t0
    report = json.loads(out[out.index("{") :])
    by_kind: dict[str, float] = {}
    for check in report["checks"]:
        if check["category"] == "restore":
            continue
        kind = "great-expectations" if check["category"] == "data" else check["kind"]
        by_kind[kind] = by_kind.get(kind, 0.0) + check["seconds"]
    res: Report = {
        "check_summaries": {c["name"]: c["summary"] for c in report["checks"] if c["category"] != "data"},
        "check_seconds": {c["name"]: round(c["seconds"], 2) for c in report["checks"]},
        "drill_passed": report["passed"],
        "drill_wall_s": wall,
        "drill_total_s": report["total_seconds"],
        "drill_restore_s": report["restore_seconds"],
        "drill_recovery_s": report["recovery_seconds"],
        "drill_rto_s": report["rto_seconds"],
        "drill_checks_s": report["checks_seconds"],
        "checks_by_kind_s": by_kind,
        "checks": len(report["checks"]),
        "failed_checks": [c["name"] for c in report["checks"] if c["status"] == "failed"],
        "exact_counts": sum(
            1 for c in report["checks"] if c["kind"] == "row-count" and "exactly" in c["summary"]
        ),
        "databases": [d["database"] for d in report.get("databases", [])],
    }
    return {prefix + k: v for k, v in res.items()}


def bench_scale(scale: int, env: dict[str, str]) -> Report:
    cluster = source_cluster(scale)
    work = make_private_dir("gravl-bench-drill-work-", "postgres")
    res: Report = {"scale": scale}
    try:
        cfg = work / "gravl-dr.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "cluster": "bench",
                    "primary": {"dsn": cluster.dsn()},
                    "repository": {"url": f"file://{work / 'repo'}", "compression": "zstd"},
                }
            )
        )
        (work / "repo").mkdir()
        chown_tree(work, "postgres")
        size = timed(
            [
                "psql",
                "-h",
                cluster.host,
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "-d",
                "bench",
                "-Atc",
                "select pg_database_size('bench')",
            ]
        )
        res["db_mb"] = int(size.stdout.strip()) / 2**20

        def gravl(*args: str) -> str:
            t = timed([GRAVL_DR, "--config", str(cfg), *args], env=env)
            if t.returncode != 0:
                raise SystemExit(f"gravl-dr {' '.join(args)} failed: {t.stderr[-2000:]}")
            return t.stdout

        psql = ["psql", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", "-d", "bench", "-qAt"]
        command = f"{GRAVL_DR} --config {cfg} wal-push %p"
        subprocess.run(
            [*psql, "-c", f"ALTER SYSTEM SET archive_command = '{command}'", "-c", "SELECT pg_reload_conf()"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        out = gravl("backup", "--kind", "physical", "--json")
        backup_id = json.loads(out[out.index("{") :])["backup_id"]
        # Writes after the backup, archived: the drill replays them (the weekly drill of an
        # archiving cluster), after pausing at the LSN the backup read its row counts at.
        t = timed(
            [
                f"{BIN}/pgbench",
                "-h",
                cluster.host,
                "-p",
                str(cluster.port),
                "-U",
                "postgres",
                "-c",
                "2",
                "-j",
                "2",
                "-T",
                str(WRITE_SECONDS),
                "-n",
                "bench",
            ]
        )
        tps = re.search(r"tps = ([0-9.]+)", t.stdout)
        res["writes_after_backup"] = f"pgbench -c 2 -T {WRITE_SECONDS}: {tps.group(1) if tps else '?'} tps"
        segment = subprocess.run(
            [*psql, "-c", "SELECT pg_walfile_name(pg_switch_wal())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = subprocess.run(
                [*psql, "-c", "SELECT last_archived_wal FROM pg_stat_archiver"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            if done >= segment:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"WAL segment {segment} was not archived within 300 s")
        res["wal_replayed_mb"] = wal_mb(work / "repo")
        chown_tree(work / "repo", "postgres")
        res.update(drill(gravl, backup_id, ""))
        # The same drill with amcheck's heapallindexed pass on every index, whatever its table's size.
        config = yaml.safe_load(cfg.read_text())
        cfg.write_text(yaml.safe_dump({**config, "drill": {"heapallindexed_max_mb": None}}))
        res.update(drill(gravl, backup_id, "full_"))
        cfg.write_text(yaml.safe_dump(config))
        res.update(
            plain_copy_restore(cluster, Path(tempfile.mkdtemp(prefix="gravl-bench-plain-", dir="/tmp")))
        )
    finally:
        cluster.destroy()
        cleanup(cluster.pgdata.parent, work)
        for p in Path("/tmp").glob("gravl-bench-plain-*"):
            cleanup(p)
    return res


def bench_prodshape(env: dict[str, str]) -> Report:
    """The production-shaped cluster of the test suite (tests/prodshape.py: five databases, RLS,
    partitions, quoted names, event trigger, unlogged table, ...), backed up as the least-privilege
    role while pgbench writes, then drilled: a pass with zero false alarms, and what it costs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from prodshape import build_prod_cluster

    t0 = time.monotonic()
    prod = build_prod_cluster()
    res: Report = {"scale": "prodshape", "build_s": time.monotonic() - t0}
    try:
        cfg = prod.config(user="gravl_dr")
        res["db_mb"] = (
            sum(
                int(r[0])
                for r in prod.sql(
                    "SELECT pg_database_size(datname) FROM pg_database WHERE datallowconn", dbname="postgres"
                )
            )
            / 2**20
        )

        def gravl(*args: str) -> str:
            t = timed([GRAVL_DR, "--config", str(cfg), *args], env=env)
            if t.returncode not in (0, 1) or "{" not in t.stdout:
                raise SystemExit(f"gravl-dr {' '.join(args)} failed: {t.stderr[-2000:]}")
            return t.stdout

        with prod.writes(rate=200) as load:
            out = gravl("backup", "--kind", "physical", "--json")
        res["writes_after_backup"] = f"pgbench (app_user) {load.transactions} transactions during the backup"
        backup_id = json.loads(out[out.index("{") :])["backup_id"]
        prod.switch_and_wait()
        res["wal_replayed_mb"] = wal_mb(prod.repo_dir)
        res.update(drill(gravl, backup_id, ""))
        res["false_alarms"] = res.pop("failed_checks")
    finally:
        prod.destroy()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, action="append", help="pgbench scale (repeatable; default 10)")
    parser.add_argument("--no-prodshape", action="store_true", help="skip the production-shaped cluster")
    args = parser.parse_args()
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server, url, home = start_prefect_server()
    env["PREFECT_API_URL"] = url
    try:
        results = [bench_scale(s, env) for s in (args.scale or [10])]
        prodshape = None if args.no_prodshape else bench_prodshape(env)
    finally:
        server.terminate()
        server.wait()
        cleanup(home)
    for r in results:
        kinds: dict[str, float] = r["checks_by_kind_s"]
        print(
            f"\n== pgbench scale {r['scale']} ({r['db_mb']:.0f} MB database), drill "
            f"{'PASSED' if r['drill_passed'] else 'FAILED'} with {r['checks']} checks =="
        )
        print(
            f"archived after the backup: {r['writes_after_backup']} ({r['wal_replayed_mb']:.0f} MiB of "
            "compressed WAL), replayed by the drill"
        )
        print(f"drill restore (fetch, verify, unpack):  {r['drill_restore_s']:.2f} s")
        print(f"drill recovery (start, replay, promote): {r['drill_recovery_s']:.2f} s")
        print(f"drill RTO (restore + recovery):         {r['drill_rto_s']:.2f} s")
        print(
            f"plain copy restore (zstd -d | tar -x + start): {r['plain_rto_s']:.2f} s "
            f"(untar {r['plain_untar_s']:.2f} s, start {r['plain_start_s']:.2f} s)"
        )
        print(f"  ratio drill RTO / plain:              {ratio(r['drill_rto_s'], r['plain_rto_s'])}")
        print(
            f"drill checks:                           {r['drill_checks_s']:.2f} s "
            f"({', '.join(f'{k} {v:.2f} s' for k, v in sorted(kinds.items()))})"
        )
        print(
            f"  checks / restore:                     {ratio(r['drill_checks_s'], r['drill_restore_s'])}"
            "  (target < 1.00x)"
        )
        for name, summary in r["check_summaries"].items():
            print(f"  {name}: {summary}")
        print(
            f"drill total in the flow / CLI wall:     {r['drill_total_s']:.2f} s / {r['drill_wall_s']:.2f} s"
        )
        full: dict[str, float] = r["full_checks_by_kind_s"]
        print(
            f"same drill, heapallindexed on every index (drill.heapallindexed_max_mb: null): restore "
            f"{r['full_drill_restore_s']:.2f} s, checks {r['full_drill_checks_s']:.2f} s "
            f"({', '.join(f'{k} {v:.2f} s' for k, v in sorted(full.items()))}), checks / restore "
            f"{ratio(r['full_drill_checks_s'], r['full_drill_restore_s'])}"
        )
    if prodshape is not None:
        r = prodshape
        kinds = r["checks_by_kind_s"]
        print(
            f"\n== production-shaped cluster ({r['db_mb']:.0f} MB in {len(r['databases'])} databases, "
            f"built in {r['build_s']:.1f} s), backed up as gravl_dr during writes; drill "
            f"{'PASSED' if r['drill_passed'] else 'FAILED'} with {r['checks']} checks =="
        )
        print(f"{r['writes_after_backup']}; row counts compared exactly at their LSN: {r['exact_counts']}")
        print(f"false alarms (failed checks on a good backup): {r['false_alarms'] or 'none'}")
        print(
            f"drill restore {r['drill_restore_s']:.2f} s, recovery {r['drill_recovery_s']:.2f} s, RTO "
            f"{r['drill_rto_s']:.2f} s, checks {r['drill_checks_s']:.2f} s "
            f"({', '.join(f'{k} {v:.2f} s' for k, v in sorted(kinds.items()))}), checks / restore "
            f"{ratio(r['drill_checks_s'], r['drill_restore_s'])}"
        )
        results.append(prodshape)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "drill.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
