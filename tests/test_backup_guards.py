"""A backup never loses its WAL, never hangs behind a lock, and a preflight catches what would
make it fail before the server is touched (issue 11)."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gravl_testlib import GRAVL_DR, REPO_ROOT, assert_one_line_error, run_cli, take_backup, write_config
from tasks.config import parse_config
from tasks.errors import PreconditionFailed
from tasks.pgcluster import LocalCluster, free_port
from tasks.postgres import database_digest
from tasks.proc import pg_bin
from tasks.repository import open_repository
from tasks.restore import restore_physical, set_port

GID = "forgotten-migration-42"


def _config(cluster: LocalCluster, repo_url: str, **backup: Any) -> dict[str, Any]:
    return {
        "cluster": "gravl",
        "primary": {"dsn": cluster.dsn("app")},
        "repository": {"url": repo_url},
        "backup": backup,
    }


@pytest.fixture
def locked_cluster(cluster_factory: Callable[..., LocalCluster]) -> Iterator[LocalCluster]:
    """A cluster where a forgotten prepared transaction holds ACCESS EXCLUSIVE on app.public.orders."""
    cluster = cluster_factory(extra_conf={"max_prepared_transactions": "5"})
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders SELECT generate_series(1, 100)"
        )
        conn.execute("CREATE TABLE free (id int); INSERT INTO free VALUES (1)")
    with psycopg.connect(cluster.dsn("app")) as conn:
        conn.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        conn.execute(f"PREPARE TRANSACTION '{GID}'")
    yield cluster
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
        conn.execute(f"ROLLBACK PREPARED '{GID}'")


def _gravl_sessions(cluster: LocalCluster) -> list[tuple[Any, ...]]:
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True, application_name="test-observer") as conn:
        return conn.execute(
            "SELECT pid, backend_type, wait_event_type, left(query, 60) FROM pg_stat_activity "
            "WHERE application_name = 'gravl-dr'"
        ).fetchall()


@pytest.mark.parametrize("kind", ["logical", "physical"])
def test_backup_behind_a_prepared_transaction_fails_in_time_naming_it(
    kind: str, locked_cluster: LocalCluster, file_repo_url: str, file_repo_dir: Path
) -> None:
    # GIVEN a 2 s lock timeout
    cfg = parse_config(_config(locked_cluster, file_repo_url, lock_timeout_seconds=2))
    repo = open_repository(cfg.repository)
    # WHEN a backup meets the lock
    t0 = time.monotonic()
    with pytest.raises(PreconditionFailed) as err:
        take_backup(cfg, repo, kind)
    # THEN it fails instead of waiting for ever (the bound is loose: the backup's own work before
    # the lock runs on a loaded 2-core machine), naming the prepared transaction
    assert time.monotonic() - t0 < 120
    assert GID in str(err.value) and "public.orders" in str(err.value) and "\n" not in str(err.value)
    # AND leaves nothing behind: no backup folder, no session, no process
    assert not (file_repo_dir / "backups").exists() or not any((file_repo_dir / "backups").iterdir())
    deadline = time.monotonic() + 10
    while _gravl_sessions(locked_cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gravl_sessions(locked_cluster) == []


def test_cli_backup_behind_a_lock_is_one_line(
    locked_cluster: LocalCluster, file_repo_url: str, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "gravl-dr.yaml", _config(locked_cluster, file_repo_url, lock_timeout_seconds=2)
    )
    proc = run_cli("backup", "--kind", "logical", config=cfg)
    assert_one_line_error(proc, GID, "public.orders")


def test_sigterm_stops_a_backup_waiting_on_a_lock_at_once(
    locked_cluster: LocalCluster, file_repo_url: str, file_repo_dir: Path, tmp_path: Path
) -> None:
    # GIVEN a logical backup waiting behind the lock (timeout far away)
    cfg = write_config(
        tmp_path / "gravl-dr.yaml", _config(locked_cluster, file_repo_url, lock_timeout_seconds=600)
    )
    proc = subprocess.Popen(
        [GRAVL_DR, "--config", str(cfg), "backup", "--kind", "logical"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
    )
    try:
        deadline = time.monotonic() + 120
        while not any(s[2] == "Lock" for s in _gravl_sessions(locked_cluster)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup never reached the lock"
            time.sleep(0.2)
        # WHEN it is sent SIGTERM
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # THEN it stops at once with one line, and no dump or session of it is left
    assert time.monotonic() - t0 < 15, "SIGTERM did not stop the backup at once"
    # (Prefect's ephemeral API server, stopped mid-request by the exit handlers, sometimes logs a
    # traceback of its own: not gravl-dr's output, so only gravl-dr's line is asserted here)
    assert proc.returncode == 143 and "gravl-dr: terminated (SIGTERM)" in err, err
    deadline = time.monotonic() + 10
    while _gravl_sessions(locked_cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gravl_sessions(locked_cluster) == []
    assert (
        subprocess.run(["pgrep", "-f", f"pg_dump.*{locked_cluster.port}"], capture_output=True).stdout == b""
    )
    assert not (file_repo_dir / "backups").exists() or not any((file_repo_dir / "backups").iterdir())


def _checkpoint_lsn(cluster: LocalCluster) -> str:
    with psycopg.connect(cluster.dsn("postgres")) as conn:
        row = conn.execute("SELECT checkpoint_lsn::text FROM pg_control_checkpoint()").fetchone()
    assert row is not None
    return str(row[0])


def test_dry_run_catches_wal_level_minimal_before_touching_the_server(
    cluster_factory: Callable[..., LocalCluster], file_repo_url: str, file_repo_dir: Path, tmp_path: Path
) -> None:
    cluster = cluster_factory(extra_conf={"wal_level": "minimal", "max_wal_senders": "0"})
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    cfg = write_config(tmp_path / "gravl-dr.yaml", _config(cluster, file_repo_url))
    before = _checkpoint_lsn(cluster)
    assert_one_line_error(run_cli("backup", "--dry-run", config=cfg), "wal_level")
    assert_one_line_error(run_cli("backup", config=cfg), "wal_level")
    assert _checkpoint_lsn(cluster) == before  # no checkpoint was forced
    assert not (file_repo_dir / "backups").exists()


def test_preflight_catches_a_role_without_replication(
    cluster_factory: Callable[..., LocalCluster], file_repo_url: str
) -> None:
    from tasks.backup import preflight

    cluster = cluster_factory()
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
        conn.execute("CREATE ROLE reader LOGIN IN ROLE pg_read_all_data, pg_read_all_settings, pg_monitor")
        conn.execute("GRANT EXECUTE ON FUNCTION pg_control_system() TO reader")
        conn.execute("GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO reader")
    data = _config(cluster, file_repo_url)
    data["primary"]["dsn"] = cluster.dsn("app").replace("user=postgres", "user=reader")
    cfg = parse_config(data)
    with pytest.raises(PreconditionFailed, match="REPLICATION"):
        preflight(cfg, open_repository(cfg.repository), "physical")


# ---------------------------------------------------------------- WAL recycled during the backup


class _Writer(threading.Thread):
    """Writes ~``megabytes`` of WAL with a CHECKPOINT every few MB, once the backup has started:
    with wal_keep_size = 0 and a small max_wal_size the server recycles the backup's first
    segments long before the backup ends."""

    def __init__(self, cluster: LocalCluster, started: Callable[[], bool], megabytes: int = 64) -> None:
        super().__init__(daemon=True)
        self.cluster, self.started, self.megabytes = cluster, started, megabytes
        self.error: BaseException | None = None
        self.checkpoints = 0

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 60
            while not self.started():
                if time.monotonic() > deadline:
                    raise AssertionError("backup never started")
                time.sleep(0.05)
            with psycopg.connect(self.cluster.dsn("app"), autocommit=True) as conn:
                for _ in range(self.megabytes // 8):
                    conn.execute(
                        "INSERT INTO churn SELECT g, repeat('x', 900) FROM generate_series(1, 8000) g"
                    )
                    conn.execute("CHECKPOINT")
                    self.checkpoints += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _backup_running(cluster: LocalCluster) -> Callable[[], bool]:
    def check() -> bool:
        with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"
            ).fetchone()
        return bool(row and row[0])

    return check


@pytest.fixture
def busy_cluster(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    cluster = cluster_factory(
        extra_conf={
            "max_wal_size": "'32MB'",
            "min_wal_size": "'32MB'",
            "wal_keep_size": "0",
            "checkpoint_timeout": "'30s'",
        }
    )
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    with psycopg.connect(cluster.dsn("app"), autocommit=True) as conn:
        conn.execute("CREATE TABLE churn (id int, pad text)")
        conn.execute(
            "CREATE TABLE steady AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g"
        )
    return cluster


def test_fetch_mode_loses_wal_under_the_same_pressure(busy_cluster: LocalCluster) -> None:
    """The control: what gravl-dr used to run (pg_basebackup -X fetch to stdout), at the same
    rate and with the same writes, fails — so the pressure in the next test is real."""
    writer = _Writer(busy_cluster, _backup_running(busy_cluster))
    writer.start()
    proc = subprocess.run(
        [
            pg_bin("pg_basebackup"),
            "-D",
            "-",
            "-Ft",
            "-X",
            "fetch",
            "-c",
            "fast",
            "-r",
            "4M",
            "-h",
            busy_cluster.host,
            "-p",
            str(busy_cluster.port),
            "-U",
            "postgres",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    writer.join(60)
    assert proc.returncode != 0 and "already been removed" in proc.stderr, proc.stderr


def test_physical_backup_keeps_its_wal_while_the_server_recycles(
    busy_cluster: LocalCluster, file_repo_url: str, pg_dir: Path
) -> None:
    # GIVEN a server recycling WAL fast (max_wal_size 32MB, wal_keep_size 0, checkpoints during
    # the backup) and a backup slowed to 4 MB/s (BASE_BACKUP MAX_RATE)
    cfg = parse_config(_config(busy_cluster, file_repo_url, max_rate_kb=4096))
    repo = open_repository(cfg.repository)
    writer = _Writer(busy_cluster, _backup_running(busy_cluster))
    writer.start()
    # WHEN a physical backup runs through it
    manifest = take_backup(cfg, repo, "physical")
    writer.join(60)
    assert writer.error is None and writer.checkpoints >= 4
    # THEN the WAL it needed was kept (the start segment is gone from the server now) ...
    with psycopg.connect(busy_cluster.dsn("postgres")) as conn:
        conn.execute("CHECKPOINT")
        names = {r[0] for r in conn.execute("SELECT name FROM pg_ls_waldir()")}
    assert manifest.start_wal not in names
    # ... and it restores: the server reaches consistency from the backup alone
    target = pg_dir / "restored"
    restore_physical(cfg, repo, manifest, target)
    port = free_port()
    set_port(target, port, "postgres")
    restored = LocalCluster(target, port, dbname="app")
    try:
        restored.start()
        assert (
            database_digest(restored.dsn("app"))["public.steady"]
            == database_digest(busy_cluster.dsn("app"))["public.steady"]
        )
    finally:
        restored.destroy()


# ---------------------------------------------------------------- configuration outside PGDATA


def test_restore_start_works_when_the_source_keeps_its_config_outside_pgdata(
    cluster_factory: Callable[..., LocalCluster], file_repo_url: str, pg_dir: Path
) -> None:
    from tasks.pgcluster import chown_tree
    from tasks.proc import run
    from tasks.restore import restore_notes

    # GIVEN a source laid out the Debian way: postgresql.conf, pg_hba.conf and pg_ident.conf in
    # a config directory, PGDATA holding data only
    made = cluster_factory()
    made.stop()
    conf_dir = made.pgdata.parent / "etc"
    conf_dir.mkdir()
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
        (made.pgdata / name).rename(conf_dir / name)
    with open(conf_dir / "postgresql.conf", "a") as fh:
        fh.write(
            f"data_directory = '{made.pgdata}'\nhba_file = '{conf_dir}/pg_hba.conf'\n"
            f"ident_file = '{conf_dir}/pg_ident.conf'\ninclude_dir = 'conf.d'\n"
        )
    (conf_dir / "conf.d").mkdir()
    chown_tree(conf_dir, "postgres")
    run(
        [pg_bin("pg_ctl"), "-D", str(conf_dir), "-l", str(made.logfile), "-w", "start"],
        timeout=60,
        os_user="postgres",
    )
    try:
        with psycopg.connect(made.dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        with psycopg.connect(made.dsn("app"), autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT generate_series(1, 500) AS id")
        cfg = parse_config(_config(made, file_repo_url))
        repo = open_repository(cfg.repository)
        # WHEN it is backed up and restored with the server started
        manifest = take_backup(cfg, repo, "physical")
    finally:
        run(
            [pg_bin("pg_ctl"), "-D", str(conf_dir), "-m", "fast", "-w", "stop"],
            timeout=60,
            os_user="postgres",
            check=False,
        )
    assert manifest.not_carried_over.config_outside_pgdata == [
        f"{conf_dir}/postgresql.conf",
        f"{conf_dir}/pg_hba.conf",
        f"{conf_dir}/pg_ident.conf",
    ]
    target = pg_dir / "restored"
    restore_physical(cfg, repo, manifest, target)
    # THEN the restored directory has its own configuration, not pointing at the source's paths
    conf = (target / "postgresql.conf").read_text()
    assert "\ndata_directory" not in conf and "\nhba_file" not in conf and "\ninclude_dir" not in conf
    assert (target / "pg_hba.conf").read_text() == (conf_dir / "pg_hba.conf").read_text()
    port = free_port()
    set_port(target, port, "postgres")
    restored = LocalCluster(target, port, dbname="app")
    try:
        restored.start()
        assert database_digest(restored.dsn("app"))["public.t"][0] == 500
    finally:
        restored.destroy()
    # AND the report says where the configuration came from
    assert any("outside PGDATA" in n for n in restore_notes(manifest))
