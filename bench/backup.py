"""Benchmark: gravl-dr physical/logical backup and physical restore against the plain pipes.

    python bench/backup.py --scale 100            # pgbench scale 100 is about 1.6 GB
    python bench/backup.py --scale 20 --scale 100 # memory: peak RSS at two sizes
    python bench/backup.py --cluster --scale 20   # whole-cluster logical backup, 4 databases

Measures in the same run: `gravl-dr backup --kind physical` to a file repository (data path =
wall time minus the same command with --dry-run, which pays the fixed start-up cost), against
`pg_basebackup -D - -Ft -X fetch | zstd -3 -T2 > file`; the logical backup against
`pg_dump -Fc > file` and `pg_dump | gzip -6 > file`; the restore against `zstd -d | tar -x`.
With --cluster: the whole-cluster logical backup (globals + every database, `backup.jobs`
dumps at a time) of a cluster of four pgbench databases (the scale's one copied three times),
against `pg_dumpall | zstd -3 -T2 > file` and against `pg_dumpall --globals-only` followed by
`pg_dump -Fc` of each database in sequence.
Flow runs go to a local Prefect server started here (as with PREFECT_API_URL in production).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from benchlib import BIN, GRAVL_DR, Timed, cleanup, pgbench_cluster, ratio, start_prefect_server, timed


def bench_scale(scale: int, env: dict[str, str]) -> dict[str, float]:
    cluster = pgbench_cluster(scale)
    work = Path(tempfile.mkdtemp(prefix="gravl-bench-work-", dir="/tmp"))
    res: dict[str, float] = {"scale": scale}
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
        conn = f"-h {cluster.host} -p {cluster.port} -U postgres"
        size = timed(["psql", *conn.split(), "-d", "bench", "-Atc", "select pg_database_size('bench')"])
        res["db_mb"] = int(size.stdout.strip()) / 2**20

        def gravl(*args: str) -> Timed:
            t = timed([GRAVL_DR, "--config", str(cfg), *args], env=env)
            if t.returncode != 0:
                raise SystemExit(f"gravl-dr {' '.join(args)} failed: {t.stderr[-2000:]}")
            return t

        # physical
        dry = gravl("backup", "--kind", "physical", "--dry-run")
        pipe = timed(
            f"{BIN}/pg_basebackup {conn} -D - -Ft -X fetch -c fast | zstd -q -3 -T2 > {work}/pipe.tar.zst",
            shell=True,
            root_only=False,
        )
        phys = gravl("backup", "--kind", "physical", "--json")
        report = json.loads(phys.stdout[phys.stdout.index("{") :])
        res.update(
            {
                "fixed_cost_s": dry.seconds,
                "idle_rss_mb": dry.peak_rss_mb,
                "physical_wall_s": phys.seconds,
                "physical_data_path_s": phys.seconds - dry.seconds,
                "physical_stream_s": report["stream_seconds"],
                "physical_rss_mb": phys.peak_rss_mb,
                "physical_raw_mb": report["raw_bytes"] / 2**20,
                "physical_stored_mb": report["stored_bytes"] / 2**20,
                "pipe_basebackup_zstd_s": pipe.seconds,
                "pipe_stored_mb": (work / "pipe.tar.zst").stat().st_size / 2**20,
            }
        )
        # logical
        dryl = gravl("backup", "--kind", "logical", "--dry-run")
        fc = timed(f"{BIN}/pg_dump {conn} -d bench -Fc -f {work}/dump.pgc", shell=True, root_only=False)
        gz = timed(
            f"{BIN}/pg_dump {conn} -d bench | gzip -6 > {work}/dump.sql.gz", shell=True, root_only=False
        )
        logi = gravl("backup", "--kind", "logical", "--json")
        lrep = json.loads(logi.stdout[logi.stdout.index("{") :])
        res.update(
            {
                "logical_wall_s": logi.seconds,
                "logical_data_path_s": logi.seconds - dryl.seconds,
                "logical_stored_mb": lrep["stored_bytes"] / 2**20,
                "logical_rss_mb": logi.peak_rss_mb,
                "pg_dump_fc_s": fc.seconds,
                "pg_dump_fc_mb": (work / "dump.pgc").stat().st_size / 2**20,
                "pg_dump_gzip_s": gz.seconds,
                "pg_dump_gzip_mb": (work / "dump.sql.gz").stat().st_size / 2**20,
            }
        )
        # restore (physical): gravl-dr restore vs zstd -d | tar -x of the pipe's file, twice each,
        # alternating, best of two (page-cache and writeback noise otherwise decides the ratio)
        best: dict[str, float] = {}
        for _ in range(2):
            target = work / "restored"
            rest = gravl("restore", report["backup_id"], "--pgdata", str(target), "--json")
            rrep = json.loads(rest.stdout[rest.stdout.index("{") :])
            shutil.rmtree(target)
            (work / "untar").mkdir()
            untar = timed(
                f"zstd -q -d -c {work}/pipe.tar.zst | tar -x -C {work}/untar", shell=True, root_only=False
            )
            shutil.rmtree(work / "untar")
            for key, value in (
                ("restore_wall_s", rest.seconds),
                ("restore_flow_s", rrep["seconds"]),
                ("restore_data_s", rrep["data_seconds"]),
                ("pipe_zstd_untar_s", untar.seconds),
            ):
                best[key] = min(best.get(key, value), value)
            best["restore_rss_mb"] = max(best.get("restore_rss_mb", 0.0), rest.peak_rss_mb)
        res.update(best)
    finally:
        cluster.destroy()
        cleanup(cluster.pgdata.parent, work)
    return res


def bench_cluster(scale: int, env: dict[str, str], copies: int = 3) -> dict[str, float]:
    cluster = pgbench_cluster(scale)
    work = Path(tempfile.mkdtemp(prefix="gravl-bench-work-", dir="/tmp"))
    conn = f"-h {cluster.host} -p {cluster.port} -U postgres"
    res: dict[str, float] = {"scale": scale}
    try:
        dbs = ["bench"]
        for i in range(copies):
            name = f"bench{i + 2}"
            timed(["psql", *conn.split(), "-d", "postgres", "-qc", f"CREATE DATABASE {name} TEMPLATE bench"])
            dbs.append(name)
        size = timed(
            [
                "psql",
                *conn.split(),
                "-d",
                "postgres",
                "-Atc",
                "select sum(pg_database_size(oid)) from pg_database",
            ]
        )
        res["cluster_mb"] = int(size.stdout.strip()) / 2**20
        res["databases"] = len(dbs) + 1  # and postgres
        cfg = work / "gravl-dr.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "cluster": "bench",
                    "primary": {"dsn": cluster.dsn("postgres")},
                    "repository": {"url": f"file://{work / 'repo'}", "compression": "zstd"},
                }
            )
        )

        def gravl(*args: str) -> Timed:
            t = timed([GRAVL_DR, "--config", str(cfg), *args], env=env)
            if t.returncode != 0:
                raise SystemExit(f"gravl-dr {' '.join(args)} failed: {t.stderr[-2000:]}")
            return t

        dry = gravl("backup", "--kind", "logical", "--dry-run")
        dumpall = timed(
            f"{BIN}/pg_dumpall {conn} | zstd -q -3 -T2 > {work}/all.sql.zst", shell=True, root_only=False
        )
        seq_s = 0.0
        seq_mb = 0.0
        glob = timed(
            f"{BIN}/pg_dumpall {conn} --globals-only -f {work}/globals.sql", shell=True, root_only=False
        )
        seq_s += glob.seconds
        seq_mb += (work / "globals.sql").stat().st_size / 2**20
        for db in ["postgres", *dbs]:
            one = timed(f"{BIN}/pg_dump {conn} -d {db} -Fc -f {work}/{db}.pgc", shell=True, root_only=False)
            seq_s += one.seconds
            seq_mb += (work / f"{db}.pgc").stat().st_size / 2**20
        logi = gravl("backup", "--kind", "logical", "--json")
        rep = json.loads(logi.stdout[logi.stdout.index("{") :])
        res.update(
            {
                "fixed_cost_s": dry.seconds,
                "cluster_wall_s": logi.seconds,
                "cluster_data_path_s": logi.seconds - dry.seconds,
                "cluster_stream_s": rep["stream_seconds"],
                "cluster_stored_mb": rep["stored_bytes"] / 2**20,
                "cluster_rss_mb": logi.peak_rss_mb,
                "dumpall_zstd_s": dumpall.seconds,
                "dumpall_zstd_mb": (work / "all.sql.zst").stat().st_size / 2**20,
                "pg_dump_fc_seq_s": seq_s,
                "pg_dump_fc_seq_mb": seq_mb,
            }
        )
    finally:
        cluster.destroy()
        cleanup(cluster.pgdata.parent, work)
    return res


def print_cluster(r: dict[str, float]) -> None:
    print(
        f"\n== whole-cluster logical backup: {r['databases']:.0f} databases, pgbench scale {r['scale']:.0f} each "
        f"({r['cluster_mb']:.0f} MB) =="
    )
    print(f"fixed start-up cost (--dry-run):       {r['fixed_cost_s']:.2f} s")
    print(
        f"gravl-dr logical backup data path:     {r['cluster_data_path_s']:.2f} s (stream {r['cluster_stream_s']:.2f} s)"
        f" -> {r['cluster_stored_mb']:.0f} MB, peak RSS {r['cluster_rss_mb']:.0f} MB"
    )
    print(
        f"pg_dumpall | zstd -3 -T2:              {r['dumpall_zstd_s']:.2f} s -> {r['dumpall_zstd_mb']:.0f} MB"
    )
    print(
        f"globals + pg_dump -Fc each, in turn:   {r['pg_dump_fc_seq_s']:.2f} s -> {r['pg_dump_fc_seq_mb']:.0f} MB"
    )
    print(
        f"  ratio data path / pg_dumpall|zstd:   {ratio(r['cluster_data_path_s'], r['dumpall_zstd_s'])}"
        f"  size {ratio(r['cluster_stored_mb'], r['dumpall_zstd_mb'])}"
    )
    print(
        f"  ratio data path / pg_dump -Fc each:  {ratio(r['cluster_data_path_s'], r['pg_dump_fc_seq_s'])}"
        f"  size {ratio(r['cluster_stored_mb'], r['pg_dump_fc_seq_mb'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=int, action="append", help="pgbench scale (repeatable)")
    parser.add_argument("--ephemeral", action="store_true", help="no Prefect server: ephemeral mode")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="whole-cluster logical backup vs pg_dumpall | zstd and pg_dump -Fc per database",
    )
    args = parser.parse_args()
    scales = args.scale or [20]
    env = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server = None
    if not args.ephemeral:
        server, url, home = start_prefect_server()
        env["PREFECT_API_URL"] = url
    try:
        if args.cluster:
            cluster_results = [bench_cluster(s, env) for s in scales]
            for r in cluster_results:
                print_cluster(r)
            out = Path(__file__).parent / "results"
            out.mkdir(exist_ok=True)
            (out / "backup-cluster.json").write_text(json.dumps(cluster_results, indent=2))
            return
        results = [bench_scale(s, env) for s in scales]
    finally:
        if server is not None:
            server.terminate()
            server.wait()
            cleanup(home)
    for r in results:
        print(f"\n== pgbench scale {r['scale']} ({r['db_mb']:.0f} MB database) ==")
        print(
            f"fixed start-up cost (--dry-run):       {r['fixed_cost_s']:.2f} s, idle RSS {r['idle_rss_mb']:.0f} MB"
        )
        print(
            f"physical backup data path:             {r['physical_data_path_s']:.2f} s "
            f"(stream {r['physical_stream_s']:.2f} s, {r['physical_raw_mb'] / max(r['physical_stream_s'], 1e-9):.0f} MB/s) "
            f"-> {r['physical_stored_mb']:.0f} MB, peak RSS {r['physical_rss_mb']:.0f} MB"
        )
        print(
            f"pg_basebackup | zstd -3 -T2:           {r['pipe_basebackup_zstd_s']:.2f} s -> {r['pipe_stored_mb']:.0f} MB"
        )
        print(
            f"  ratio data path / pipe:              {ratio(r['physical_data_path_s'], r['pipe_basebackup_zstd_s'])}"
            "  (target <= 1.10x)"
        )
        print(
            f"logical backup data path:              {r['logical_data_path_s']:.2f} s -> {r['logical_stored_mb']:.0f} MB, "
            f"peak RSS {r['logical_rss_mb']:.0f} MB"
        )
        print(
            f"pg_dump -Fc:                           {r['pg_dump_fc_s']:.2f} s -> {r['pg_dump_fc_mb']:.0f} MB"
        )
        print(
            f"pg_dump | gzip -6:                     {r['pg_dump_gzip_s']:.2f} s -> {r['pg_dump_gzip_mb']:.0f} MB"
        )
        print(
            f"  ratio data path / pg_dump -Fc:       {ratio(r['logical_data_path_s'], r['pg_dump_fc_s'])}"
            f"  size {ratio(r['logical_stored_mb'], r['pg_dump_fc_mb'])}  (targets <= 1.00x, < 1.00x)"
        )
        print(
            f"physical restore data path:            {r['restore_data_s']:.2f} s (verify + extract; flow "
            f"{r['restore_flow_s']:.2f} s, wall {r['restore_wall_s']:.2f} s), peak RSS {r['restore_rss_mb']:.0f} MB"
        )
        print(f"zstd -d | tar -x:                      {r['pipe_zstd_untar_s']:.2f} s")
        print(
            f"  ratio restore data path / pipe:      {ratio(r['restore_data_s'], r['pipe_zstd_untar_s'])}  (target <= 1.10x)"
        )
        print(
            f"  memory above idle: backup {r['physical_rss_mb'] - r['idle_rss_mb']:+.0f} MB, "
            f"restore {r['restore_rss_mb'] - r['idle_rss_mb']:+.0f} MB  (target <= 100 MB)"
        )
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(
            f"\npeak RSS of physical backup, scale {a['scale']} vs {b['scale']}: "
            f"{a['physical_rss_mb']:.0f} MB vs {b['physical_rss_mb']:.0f} MB "
            f"({(b['physical_rss_mb'] / a['physical_rss_mb'] - 1) * 100:+.1f} %, target within 10 %)"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "backup.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main()
