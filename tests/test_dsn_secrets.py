"""No secret in a flow parameter (issue 9 item 6): `restore --dsn "... password=..."` restores
into a password-protected role (scram-sha-256 in pg_hba) while the flow run that Prefect's API
records carries no password, in its parameters or its logs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.objects import FlowRun

from gravl_testlib import run_cli, take_backup
from tasks.config import load_config
from tasks.errors import ConfigError
from tasks.libpq import split_password
from tasks.pgcluster import LocalCluster
from tasks.postgres import connection
from tasks.repository import open_repository

PASSWORD = "Sw0rdf1sh-not-in-prefect"


@pytest.fixture
def scram_cluster(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """A cluster where every login but the test's own superuser needs a scram-sha-256 password."""
    cluster = cluster_factory("gravl-test-scram-")
    with connection(cluster.dsn("postgres")) as conn:
        conn.execute("SET password_encryption = 'scram-sha-256'")
        conn.execute(f"CREATE ROLE restorer LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        conn.execute("CREATE DATABASE target OWNER restorer")
    hba = cluster.pgdata / "pg_hba.conf"
    hba.write_text(f"host all {cluster.user} 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    with connection(cluster.dsn("postgres")) as conn:
        conn.execute("SELECT pg_reload_conf()")
    return cluster


def _runs_of_restore() -> list[FlowRun]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["restore"])),
                sort=FlowRunSort.START_TIME_DESC,
                limit=5,
            )
        )


def _logs_of(run_id: UUID) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(str(log.message) for log in logs)


def test_password_in_dsn_reaches_neither_prefect_nor_logs_and_the_restore_works(
    prefect_harness: None,
    make_config: Callable[..., Path],
    file_repo_url: str,
    scram_cluster: LocalCluster,
) -> None:
    import prefect.settings

    # GIVEN a logical backup, and an empty database whose role logs in with a password only
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    manifest = take_backup(cfg, open_repository(cfg.repository), kind="logical")
    dsn = f"host=127.0.0.1 port={scram_cluster.port} user=restorer dbname=target password={PASSWORD}"
    no_password = f"host=127.0.0.1 port={scram_cluster.port} user=restorer dbname=target"
    with pytest.raises(Exception, match="no password supplied|password authentication failed"):
        connection(no_password).__enter__()
    # WHEN the operator restores with the password in --dsn (the CLI, against Prefect's API)
    api = str(prefect.settings.PREFECT_API_URL.value())
    proc = run_cli(
        "restore",
        manifest.id,
        "--dsn",
        dsn,
        "--database",
        "gravl",
        config=cfg_path,
        env={"PREFECT_API_URL": api, "PGPASSWORD": ""},
    )
    # THEN the restore worked ...
    assert proc.returncode == 0, proc.stderr
    with connection(scram_cluster.dsn("target")) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
    assert tables is not None and tables[0] > 0
    # ... and the flow run Prefect recorded carries no password: not in its parameters, not in
    # its logs, not on the terminal
    [run, *_] = _runs_of_restore()
    params = json.dumps(run.parameters)
    assert f"port={scram_cluster.port}" in params  # it is this run
    assert PASSWORD not in params
    assert PASSWORD not in _logs_of(run.id)
    assert PASSWORD not in proc.stdout + proc.stderr


def test_flow_refuses_a_dsn_parameter_with_a_password_without_echoing_it(
    prefect_harness: None,
    make_config: Callable[..., Path],
    file_repo_url: str,
) -> None:
    # a run started from the UI or the API with a password in its dsn parameter
    from flows.restore import restore_flow

    cfg_path = make_config(file_repo_url)
    with pytest.raises(ConfigError) as err:
        restore_flow(config_path=str(cfg_path), dsn=f"host=127.0.0.1 port=1 password={PASSWORD}")
    assert "PGPASSWORD" in str(err.value) and PASSWORD not in str(err.value)


@pytest.mark.parametrize(
    ("dsn", "clean", "password"),
    [
        ("host=h port=5 user=u password=pw dbname=d", "user=u dbname=d host=h port=5", "pw"),
        ("postgresql://u:p%40ss@h:5433/db", "user=u dbname=db host=h port=5433", "p@ss"),
        ("host=h user=u", "host=h user=u", None),
        ("host=h password='with space'", "host=h", "with space"),
    ],
)
def test_split_password(dsn: str, clean: str, password: str | None) -> None:
    assert split_password(dsn) == (clean, password)


def test_split_password_refuses_bad_input_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as err:
        split_password("host=h password=secret-x sslpassword=other")
    assert "secret-x" not in str(err.value) and "other" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        split_password("host=h password='unterminated")
    assert "unterminated" not in str(err.value)
