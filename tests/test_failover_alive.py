"""A primary that answers is alive (issue 9.2) and an unfenced failover is never a plain success (9.12).

Real PostgreSQL 15 pairs: the primary's pg_hba rejects gravl-dr, or every connection slot is taken,
or it is killed and its data directory is not on this host (so it cannot be fenced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest_failover import Pair, in_recovery, sql, wait_until

from gravl_testlib import run_cli, write_config
from tasks.errors import PreconditionFailed
from tasks.failover import server_answered


@pytest.mark.parametrize(
    ("message", "alive"),
    [
        (
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  pg_hba.conf rejects connection for '
            'host "127.0.0.1", user "postgres", database "gravl", no encryption',
            True,
        ),
        (
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for '
            'user "gravl"',
            True,
        ),
        (
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many clients already',
            True,
        ),
        (
            'connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database system is starting up',
            True,
        ),
        (
            'connection to server at "127.0.0.1", port 5432 failed: Connection refused | Is the server running on '
            "that host and accepting TCP/IP connections?",
            False,
        ),
        ('connection to server at "10.0.0.9", port 5432 failed: timeout expired', False),
        ('could not translate host name "db.example" to address: Name or service not known', False),
        (
            'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or directory',
            False,
        ),
        ("server closed the connection unexpectedly", False),
    ],
)
def test_a_server_that_answers_is_alive_and_only_silence_is_down(message: str, alive: bool) -> None:
    assert server_answered(message) is alive


def _reject_gravl_dr(pair: Pair) -> None:
    """pg_hba: every ordinary login is rejected (replication still allowed), reloaded."""
    hba = pair.home.pgdata / "pg_hba.conf"
    hba.write_text("host all all 0.0.0.0/0 reject\nlocal all all reject\n" + hba.read_text())
    sql(pair.home.dsn(), "SELECT pg_reload_conf()")
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        psycopg.connect(pair.home.dsn(), connect_timeout=3).close()


def test_failover_refuses_when_the_primary_rejects_our_login(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a primary that is up, taking writes from its apps, whose pg_hba rejects gravl-dr
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url)
    _reject_gravl_dr(pair)

    # WHEN failover runs with --yes
    with pytest.raises(PreconditionFailed, match=r"alive .*pg_hba.conf rejects"):
        failover_flow(config_path=cfg, approved_by="test", auto_approve=True)

    # THEN nothing was promoted, nothing was fenced: one primary
    assert in_recovery(pair.standby.dsn())
    assert pair.home.is_running() and not (pair.home.pgdata / "standby.signal").exists()


def test_forced_failover_of_a_refusing_primary_fences_it_first(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN the same refusing primary, its data directory on this host
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url)
    _reject_gravl_dr(pair)

    # WHEN the operator forces it
    report = failover_flow(config_path=cfg, approved_by="test", auto_approve=True, force=True)

    # THEN the old primary was stopped (fenced) before the promotion: never two primaries
    assert report.status == "complete" and report.fenced is True, report
    assert report.plan[0].startswith("approve") and report.plan[1].startswith("fence-old-primary")
    wait_until(lambda: not pair.home.is_running(), 10, "old primary stopped")
    assert (pair.home.pgdata / "standby.signal").exists()
    assert not in_recovery(pair.standby.dsn())


def test_failover_refuses_when_every_connection_slot_of_the_primary_is_taken(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a primary restarted with max_connections = 5 and five sessions holding every slot
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url)
    pair.home.append_conf({"max_connections": "5"})
    pair.home.stop()
    pair.home.start()
    held = []
    try:
        for _ in range(5):
            held.append(psycopg.connect(pair.home.dsn(), connect_timeout=3, autocommit=True))
    except psycopg.OperationalError:
        pass
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(pair.home.dsn(), connect_timeout=3).close()

        # WHEN failover runs
        with pytest.raises(PreconditionFailed, match=r"alive .*too many clients"):
            failover_flow(config_path=cfg, approved_by="test", auto_approve=True)

        # THEN the replica stays a replica; the sessions on the primary still write
        assert in_recovery(pair.standby.dsn())
        held[0].execute("INSERT INTO items (tag, n) VALUES ('still-primary', 1)")
    finally:
        for conn in held:
            conn.close()


def test_failover_that_cannot_fence_says_so_in_state_report_and_exit_code(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
    pushgateway: str,
) -> None:
    from conftest import pushgateway_metrics

    from flows.failover import UNFENCED, failover_flow

    # GIVEN a dead primary whose data directory is on another host (no pgdata in this config)
    pair: Pair = pg_pair()
    pair.insert(pair.home.dsn(), 10, "before")
    pair.wait_replayed(pair.home, pair.standby)
    pair.kill_home()
    data = pair.config(file_repo_url, metrics={"pushgateway": pushgateway})
    data["primary"].pop("pgdata")
    cfg = str(write_config(tmp_path / "gravl-dr.yaml", data))

    # WHEN the flow runs
    state = failover_flow(config_path=cfg, approved_by="test", auto_approve=True, return_state=True)

    # THEN the run ends in a state of its own, the report leads with the warning, a metric says it
    report = state.result()
    assert state.is_completed() and state.name == "CompletedUnfenced", state
    assert report.status == UNFENCED and report.fenced is False
    assert any("NOT fenced" in w for w in report.warnings)
    assert "gravl_failover_old_primary_unfenced" in pushgateway_metrics(pushgateway)
    assert not in_recovery(pair.standby.dsn())


def test_cli_failover_that_cannot_fence_exits_3_with_a_warning(
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    # GIVEN the same: a dead primary not fenceable from here
    pair: Pair = pg_pair()
    pair.kill_home()
    data = pair.config(file_repo_url)
    data["primary"].pop("pgdata")
    cfg = write_config(tmp_path / "gravl-dr.yaml", data)

    # WHEN the CLI fails over
    proc = run_cli("failover", "--yes", config=cfg, timeout=300)

    # THEN exit 3 and a WARNING on the terminal, never a plain "failover complete"
    assert proc.returncode == 3, proc.stdout + proc.stderr[-2000:]
    assert "WITH A WARNING" in proc.stdout
    assert "gravl-dr: WARNING: home is NOT fenced" in proc.stderr
