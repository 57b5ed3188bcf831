"""Backups that hold the whole cluster (issue 11), on the production-shaped cluster: every
database, roles with their password hashes, tablespaces, database settings and ACLs."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from cluster_compare import database_state, globals_state
from prodshape import NO_CONNECT_DB, ProdCluster
from s3fault import S3FaultProxy

from flows.backup import backup_flow
from flows.restore import restore_flow
from gravl_testlib import assert_one_line_error, run_cli
from tasks.backup import resolve_backup
from tasks.config import load_config
from tasks.errors import ChecksumMismatch, StorageUnavailable
from tasks.pgcluster import LocalCluster, free_port, make_private_dir
from tasks.postgres import database_digest
from tasks.repository import open_repository
from tasks.restore import restore_cluster, restore_logical

pytestmark = pytest.mark.usefixtures("prefect_harness")

CONNECTABLE = ("postgres", "shop", "legacy", "reports", "archive")


@pytest.fixture(scope="module")
def logical_backup(
    prod_cluster: ProdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, str]]:
    """One whole-cluster logical backup of the production-shaped cluster, in a repository of its own."""
    repo = make_private_dir("gravl-test-i11-repo-", "postgres")
    cfg_path = prod_cluster.config(
        tmp_path_factory.mktemp("cfg") / "gravl-dr.yaml", repository={"url": f"file://{repo}"}
    )
    report = backup_flow(config_path=str(cfg_path), kind="logical")
    yield cfg_path, report.backup_id
    shutil.rmtree(repo, ignore_errors=True)


def test_logical_backup_records_every_database_and_reports_the_one_it_cannot_dump(
    logical_backup: tuple[Path, str], prod_cluster: ProdCluster
) -> None:
    cfg_path, backup_id = logical_backup
    cfg = load_config(str(cfg_path))
    manifest = resolve_backup(open_repository(cfg.repository), backup_id)
    by_name = {d.name: d for d in manifest.databases}
    # every database but template0 is in the manifest, with its properties
    assert set(by_name) == {*CONNECTABLE, NO_CONNECT_DB, "template1"}
    assert by_name["legacy"].encoding == "LATIN1" and by_name["legacy"].collate == "C"
    assert by_name["shop"].owner == "app_owner" and by_name["shop"].comment
    assert {(s.role, s.name, s.value) for s in by_name["shop"].settings} >= {
        (None, "search_path", '"Sales", public'),
        ("app_user", "statement_timeout", "30s"),
    }
    assert "app_user=" in (by_name["shop"].acl or "")
    # the database that refuses connections is reported, not silently skipped
    assert by_name[NO_CONNECT_DB].object is None and "datallowconn" in (by_name[NO_CONNECT_DB].skipped or "")
    # each dumped database is its own object, plus the globals
    keys = {o.key for o in manifest.objects}
    assert manifest.globals_object in keys
    assert all(by_name[d].object in keys for d in CONNECTABLE)
    # exact per-table row counts for each database, for the drill to compare
    assert manifest.row_counts_exact
    assert manifest.row_counts["legacy"] == {"public.Kunden": 60, "public.bestellungen": 120}
    assert manifest.row_counts["shop"]["public.attachments"] == 50
    assert manifest.tablespaces[0].name == "app_space"
    assert manifest.not_carried_over.unlogged_tables == {"shop": ["public.session_cache"]}
    assert manifest.row_counts["shop"]["public.session_cache"] == 100  # pg_dump keeps unlogged data


def test_whole_cluster_logical_restore_into_a_fresh_cluster_compares_equal(
    logical_backup: tuple[Path, str],
    prod_cluster: ProdCluster,
    cluster_factory: Callable[..., LocalCluster],
    pg_dir: Path,
) -> None:
    # GIVEN a whole-cluster logical backup and a fresh cluster on the same host
    cfg_path, backup_id = logical_backup
    target = cluster_factory()
    assert prod_cluster.tablespace_dir is not None
    new_space = pg_dir / "app_space"
    # WHEN the whole cluster is restored, with the tablespace relocated
    report = restore_flow(
        config_path=str(cfg_path),
        backup=backup_id,
        dsn=target.dsn("postgres"),
        jobs=2,
        tablespace_map=[f"{prod_cluster.tablespace_dir}={new_space}"],
    )
    # THEN roles (with password hashes), memberships, role and database settings, tablespaces,
    # database owners/encodings/locales/ACLs/comments match the source
    source_globals = globals_state(prod_cluster.dsn("postgres"))
    restored_globals = globals_state(target.dsn("postgres"))
    source_dbs = {d[0]: d for d in source_globals.pop("databases") if d[0] != NO_CONNECT_DB}
    restored_dbs = {d[0]: d for d in restored_globals.pop("databases")}
    assert restored_globals == source_globals
    for name, props in source_dbs.items():
        assert restored_dbs.get(name) == props
    # AND every table, sequence, large object, ACL and policy of every database
    for db in CONNECTABLE:
        assert database_state(target.dsn(db)) == database_state(prod_cluster.dsn(db)), db
    assert [r[0] for r in prod_cluster.sql("SELECT spcname FROM pg_tablespace", dbname="postgres")] and any(
        new_space.iterdir()
    )
    # AND the report names what is not there
    assert sorted(report.databases) == sorted([*CONNECTABLE, "template1"])
    assert any(NO_CONNECT_DB in n and "NOT in this backup" in n for n in report.not_carried_over)


def test_one_database_restores_into_an_existing_cluster_without_owners(
    logical_backup: tuple[Path, str], prod_cluster: ProdCluster, cluster_factory: Callable[..., LocalCluster]
) -> None:
    # GIVEN an existing cluster that has none of the source's roles, and an empty database
    cfg_path, backup_id = logical_backup
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, backup_id)
    target = cluster_factory()
    with psycopg.connect(target.dsn("postgres"), autocommit=True) as conn:  # same encoding as the source
        conn.execute(
            "CREATE DATABASE legacy_copy TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    # WHEN one database (the LATIN1 one) is restored with --no-owner
    restore_logical(cfg, repo, manifest, target.dsn("legacy_copy"), jobs=2, no_owner=True, database="legacy")
    # THEN its tables hold exactly the source's rows
    assert database_digest(target.dsn("legacy_copy")) == database_digest(prod_cluster.dsn("legacy"))


def test_physical_backup_with_a_tablespace_restores_relocated(
    prod_cluster: ProdCluster, tmp_path: Path, pg_dir: Path, file_repo_url: str
) -> None:
    # GIVEN the production-shaped cluster with its user tablespace
    assert prod_cluster.tablespace_dir is not None
    cfg_path = prod_cluster.config(tmp_path / "gravl-dr.yaml", repository={"url": file_repo_url})
    # WHEN a physical backup runs
    report = backup_flow(config_path=str(cfg_path), kind="physical")
    cfg = load_config(str(cfg_path))
    manifest = resolve_backup(open_repository(cfg.repository), report.backup_id)
    # THEN the tablespace is its own object in the manifest
    [space] = manifest.tablespaces
    assert space.name == "app_space" and space.location == str(prod_cluster.tablespace_dir)
    assert space.object in {o.key for o in manifest.objects} and space.object.startswith(f"{space.oid}.tar")
    # an unlogged table restores empty: that is what the drill is told to expect
    assert manifest.row_counts["shop"]["public.session_cache"] == 0
    assert manifest.row_counts["shop"]["public.attachments"] == 50
    # AND a restore with --tablespace-map puts it elsewhere and the server starts with all data
    new_space = pg_dir / "moved-space"
    restored = restore_flow(
        config_path=str(cfg_path),
        backup=report.backup_id,
        pgdata=str(pg_dir / "data"),
        start=True,
        port=free_port(),
        tablespace_map=[f"{prod_cluster.tablespace_dir}={new_space}"],
    )
    cluster = LocalCluster(pg_dir / "data", restored.port or 0)
    try:
        assert (pg_dir / "data" / "pg_tblspc" / space.oid).resolve() == new_space
        restored_attachments = database_digest(cluster.dsn("shop"))
        source = database_digest(prod_cluster.dsn("shop"))
        for table in ("public.attachments", "public.User", "Sales.Order Items"):
            assert restored_attachments[table] == source[table], table
        # unlogged tables come back empty, and the report says so
        assert restored_attachments["public.session_cache"][0] == 0
        assert any("unlogged" in n and "session_cache" in n for n in restored.not_carried_over)
    finally:
        cluster.destroy()
    # AND the source's own tablespace directory was never touched
    assert any(prod_cluster.tablespace_dir.iterdir())


def test_restore_refuses_a_tablespace_location_that_is_in_use(
    prod_cluster: ProdCluster, tmp_path: Path, pg_dir: Path, file_repo_url: str
) -> None:
    from tasks.errors import PreconditionFailed
    from tasks.restore import restore_physical

    cfg_path = prod_cluster.config(tmp_path / "gravl-dr.yaml", repository={"url": file_repo_url})
    report = backup_flow(config_path=str(cfg_path), kind="physical")
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, report.backup_id)
    # the source still lives in the recorded location: restoring there would mix with it
    with pytest.raises(PreconditionFailed, match="--tablespace-map"):
        restore_physical(cfg, repo, manifest, pg_dir / "data")
    assert not (pg_dir / "data").exists()


# ---------------------------------------------------------------- one pass, never half restored


def _s3_copy(cfg_path: Path, backup_id: str, bucket: str, moto: str, endpoint: str, out: Path) -> Path:
    """The same backup in a moto bucket (copied object by object), and a config reading it
    through ``endpoint`` (the fault proxy)."""
    import boto3
    import yaml

    src = Path(load_config(str(cfg_path)).repository.url.removeprefix("file://"))
    s3 = boto3.client("s3", endpoint_url=moto, region_name="eu-north-1")
    for path in (src / "backups" / backup_id).iterdir():
        s3.put_object(Bucket=bucket, Key=f"gravl/backups/{backup_id}/{path.name}", Body=path.read_bytes())
    doc = yaml.safe_load(cfg_path.read_text())
    doc["repository"] = {"url": f"s3://{bucket}/gravl", "endpoint_url": endpoint, "region": "eu-north-1"}
    out.write_text(yaml.safe_dump(doc))
    return out


def _nothing_restored(target: LocalCluster) -> None:
    """The target still looks like the fresh cluster it was: no database, role or table of the backup."""
    with psycopg.connect(target.dsn("postgres"), autocommit=True) as conn:
        dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        roles = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_'")}
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
    assert dbs == {"postgres", "template0", "template1"}, dbs
    assert roles == {"postgres"}, roles
    assert tables == (0,)


def test_whole_cluster_restore_from_s3_downloads_each_object_once(
    logical_backup: tuple[Path, str],
    prod_cluster: ProdCluster,
    cluster_factory: Callable[..., LocalCluster],
    pg_dir: Path,
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    s3_fault_proxy: S3FaultProxy,
) -> None:
    # GIVEN the whole-cluster backup in S3, read through a proxy that logs every request
    cfg_path, backup_id = logical_backup
    s3_cfg = _s3_copy(cfg_path, backup_id, s3_bucket, moto_endpoint, s3_fault_proxy.url, tmp_path / "s3.yaml")
    cfg = load_config(str(s3_cfg))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, backup_id)
    target = cluster_factory()
    assert prod_cluster.tablespace_dir is not None
    # WHEN the whole cluster is restored
    restore_cluster(
        cfg,
        repo,
        manifest,
        target.dsn("postgres"),
        jobs=2,
        tablespace_map={str(prod_cluster.tablespace_dir): str(pg_dir / "app_space")},
    )
    # THEN each stored object was downloaded exactly once (no verify pass before the restore)
    gets = [k for m, k, _q, _o in s3_fault_proxy.log if m == "GET" and not k.endswith("manifest.json")]
    for obj in manifest.objects:
        assert gets.count(f"gravl/backups/{backup_id}/{obj.key}") == 1, (obj.key, gets)
    # AND the data is the source's
    for db in ("shop", "legacy"):
        assert database_digest(target.dsn(db)) == database_digest(prod_cluster.dsn(db)), db


def test_a_corrupt_object_in_s3_fails_the_whole_cluster_restore_before_the_target_is_touched(
    logical_backup: tuple[Path, str],
    prod_cluster: ProdCluster,
    cluster_factory: Callable[..., LocalCluster],
    pg_dir: Path,
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    s3_fault_proxy: S3FaultProxy,
) -> None:
    # GIVEN the whole-cluster backup in S3, and one database's dump damaged on the way (the
    # proxy flips a byte of the reply; status and headers look fine)
    cfg_path, backup_id = logical_backup
    s3_cfg = _s3_copy(cfg_path, backup_id, s3_bucket, moto_endpoint, s3_fault_proxy.url, tmp_path / "s3.yaml")
    cfg = load_config(str(s3_cfg))
    repo = open_repository(cfg.repository)
    manifest = resolve_backup(repo, backup_id)
    shop = next(d.object for d in manifest.databases if d.name == "shop")
    assert shop is not None
    s3_fault_proxy.add("GET", re.escape(shop) + "$", action="corrupt", times=None)
    target = cluster_factory()
    assert prod_cluster.tablespace_dir is not None
    # WHEN the whole cluster is restored THEN it fails naming the object (the SDK's own
    # response checksum, or ours, whichever sees it first)
    with pytest.raises((ChecksumMismatch, StorageUnavailable), match=re.escape(shop)):
        restore_cluster(
            cfg,
            repo,
            manifest,
            target.dsn("postgres"),
            jobs=2,
            tablespace_map={str(prod_cluster.tablespace_dir): str(pg_dir / "app_space")},
        )
    # AND nothing of the backup reached the target: not the globals, not the other databases
    _nothing_restored(target)


def test_a_corrupt_object_fails_the_whole_cluster_restore_with_one_line_and_an_untouched_target(
    logical_backup: tuple[Path, str],
    prod_cluster: ProdCluster,
    cluster_factory: Callable[..., LocalCluster],
    pg_dir: Path,
    tmp_path: Path,
) -> None:
    # GIVEN a copy of the whole-cluster backup in a file repository, the last database's dump
    # with one byte flipped at rest
    cfg_path, backup_id = logical_backup
    src = Path(load_config(str(cfg_path)).repository.url.removeprefix("file://"))
    copy = tmp_path / "repo"
    shutil.copytree(src / "backups" / backup_id, copy / "backups" / backup_id)
    cfg_copy = prod_cluster.config(tmp_path / "copy.yaml", repository={"url": f"file://{copy}"})
    manifest = resolve_backup(open_repository(load_config(str(cfg_copy)).repository), backup_id)
    last = [d.object for d in manifest.databases if d.object][-1]
    assert last is not None
    stored = copy / "backups" / backup_id / last
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    target = cluster_factory()
    assert prod_cluster.tablespace_dir is not None
    # WHEN the operator restores the whole cluster
    proc = run_cli(
        "restore",
        backup_id,
        "--dsn",
        target.dsn("postgres"),
        "--tablespace-map",
        f"{prod_cluster.tablespace_dir}={pg_dir / 'app_space'}",
        config=cfg_copy,
    )
    # THEN one clear error line names the corrupt object, and the target is as it was
    assert_one_line_error(proc, last, "SHA-256")
    _nothing_restored(target)


SLOW_CLUSTER_RESTORE = """
import sys, time
from pathlib import Path
from tasks.backup import resolve_backup
from tasks.config import load_config
from tasks.repository import FileRepository
from tasks.restore import restore_cluster

class SlowRepository(FileRepository):  # a slow link: the restore is still staging when killed
    def iter_object(self, key, chunk_size=1 << 12):
        for chunk in super().iter_object(key, 1 << 12):
            time.sleep(0.01)
            yield chunk

cfg = load_config(sys.argv[1])
repo = SlowRepository(Path(sys.argv[2]), "file://" + sys.argv[2])
manifest = resolve_backup(repo, sys.argv[3])
restore_cluster(cfg, repo, manifest, sys.argv[4], jobs=1, tablespace_map={sys.argv[5]: sys.argv[6]})
"""


def test_a_whole_cluster_restore_killed_while_staging_leaves_the_target_untouched_and_its_staging_swept(
    logical_backup: tuple[Path, str],
    prod_cluster: ProdCluster,
    cluster_factory: Callable[..., LocalCluster],
    pg_dir: Path,
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from tasks.restore import sweep_stale_temporaries

    # GIVEN a whole-cluster restore from a slow repository into a fresh cluster
    cfg_path, backup_id = logical_backup
    repo_dir = load_config(str(cfg_path)).repository.url.removeprefix("file://")
    target = cluster_factory()
    assert prod_cluster.tablespace_dir is not None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_CLUSTER_RESTORE,
            str(cfg_path),
            repo_dir,
            backup_id,
            target.dsn("postgres"),
            str(prod_cluster.tablespace_dir),
            str(pg_dir / "app_space"),
        ],
        stderr=subprocess.PIPE,
    )
    # WHEN it is killed with -9 while it downloads into its staging directory
    tmp = Path(tempfile.gettempdir())
    deadline = time.monotonic() + 120
    while not (staged := [p for p in tmp.glob(f"gravl-restore-stage-{proc.pid}-*") if any(p.rglob("*.zst"))]):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # THEN nothing of the backup reached the target
    _nothing_restored(target)
    # AND the next restore's sweep removes the killed one's staging (and only that)
    assert staged[0].exists()
    removed = sweep_stale_temporaries(tmp)
    assert staged[0] in removed and not staged[0].exists()
    assert all(f"-{proc.pid}-" in p.name for p in removed if p.name.startswith("gravl-restore-stage-"))
