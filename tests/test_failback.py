"""Failback (controlled switchover home) against two real PostgreSQL 15 servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest_failover import Pair, in_recovery, route53_values, sql, wait_until

from gravl_testlib import run_cli
from tasks.topology import local_pgdata, stop_server


def _streams_from(standby_dsn: str, primary: Any) -> bool:
    rows = sql(standby_dsn, "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver")
    return rows == [("streaming", primary.host, primary.port)]


def _failed_over(pair: Pair, cfg: str) -> None:
    """Rows replicated, the home primary SIGKILLed, failover done."""
    from flows.failover import failover_flow

    pair.insert(pair.home.dsn(), 300, "before-failover")
    pair.wait_replayed(pair.home, pair.standby)
    pair.kill_home()
    assert failover_flow(config_path=cfg, approved_by="test", auto_approve=True).status == "complete"


def test_failback_after_writes_in_failover_window_rewinds_and_loses_nothing(
    prefect_harness: None,
    pg_pair: Any,
    route53_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failback import failback_flow

    # GIVEN a failover (home killed, standby-1 promoted) and rows written during the failover window
    pair: Pair = pg_pair(wal_log_hints=True)
    cfg = pair.write_config(tmp_path, file_repo_url, dns=route53_dns)
    _failed_over(pair, cfg)
    pair.insert(pair.standby.dsn(), 200, "during-failover")
    expected = [r for r in pair.rows(pair.standby.dsn())]
    assert len(expected) == 500

    # WHEN failing back
    report = failback_flow(config_path=cfg, approved_by="test", auto_approve=True, backup=True)

    # THEN home is the primary again, standby-1 streams from it, no row lost, DNS points back
    assert report.status == "complete", report.error
    assert not in_recovery(pair.home.dsn())
    assert in_recovery(pair.standby.dsn())
    assert pair.rows(pair.home.dsn()) == expected
    assert route53_values(route53_dns) == ["127.0.0.1"]
    assert report.rebuild is not None and report.rebuild.method.startswith("pg_rewind"), report.rebuild
    assert report.backup_id and "-physical-" in report.backup_id  # <UTC second>-<kind>-<suffix>
    so = report.switchover
    assert so is not None and so.final_checkpoint_lsn and so.replayed_lsn and so.unavailable_seconds < 15
    # the former primary rejoined and replays what home writes now
    sql(pair.home.dsn(), "INSERT INTO items (tag, n) VALUES ('after-failback', 1)")
    wait_until(lambda: _streams_from(pair.standby.dsn(), pair.home), 30, "standby-1 streaming from home")
    pair.wait_replayed(pair.home, pair.standby)
    assert len(pair.rows(pair.standby.dsn())) == 501
    assert not (pair.home.pgdata / "gravl-dr.fenced").exists()


def test_failback_without_wal_log_hints_reclones_and_moves_bind_record_back(
    prefect_harness: None,
    pg_pair: Any,
    bind_server: Any,
    bind_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failback import failback_flow

    # GIVEN a home cluster without wal_log_hints or checksums (pg_rewind impossible), failed over
    pair: Pair = pg_pair(wal_log_hints=False)
    cfg = pair.write_config(tmp_path, file_repo_url, dns=bind_dns)
    _failed_over(pair, cfg)
    assert bind_server.query() == ["127.0.0.2"]
    pair.insert(pair.standby.dsn(), 50, "during-failover")

    # WHEN
    report = failback_flow(config_path=cfg, approved_by="test", auto_approve=True, backup=False)

    # THEN it was re-cloned with pg_basebackup, keeping its own address, and the record is back
    assert report.rebuild is not None and report.rebuild.method == "pg_basebackup re-clone"
    assert any(p.startswith("reclone-old-primary") and "wal_log_hints" in p for p in report.plan), report.plan
    # the old data directory was moved aside and kept, not deleted
    assert len(report.old_data) == 1 and Path(report.old_data[0], "PG_VERSION").is_file(), report.old_data
    assert report.old_data_bytes and report.old_data_bytes > 1_000_000
    assert not in_recovery(pair.home.dsn())
    assert sql(pair.home.dsn(), "SHOW listen_addresses") == [("127.0.0.1",)]
    assert len(pair.rows(pair.home.dsn())) == 350
    assert bind_server.query() == ["127.0.0.1"]
    wait_until(lambda: _streams_from(pair.standby.dsn(), pair.home), 30, "standby-1 streaming from home")


def test_failback_resumes_after_a_crash_between_clean_shutdown_and_promotion(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failback import failback_flow
    from tasks.config import load_config
    from tasks.topology import rebuild_as_standby, wait_for_zero_lag

    # GIVEN an earlier failback that rebuilt home, then stopped standby-1 cleanly and died there
    pair: Pair = pg_pair(wal_log_hints=True)
    cfg = pair.write_config(tmp_path, file_repo_url)
    _failed_over(pair, cfg)
    pair.insert(pair.standby.dsn(), 25, "during-failover")
    conf = load_config(cfg)
    home, standby = conf.primary, conf.replicas[0]
    rebuild_as_standby(home, standby, os_user="postgres")
    wait_for_zero_lag(home, standby, timeout=30)
    pgdata = local_pgdata(standby)
    assert pgdata is not None
    stop_server(pgdata, os_user="postgres", mode="fast")
    assert in_recovery(pair.home.dsn())  # nobody accepts writes now

    # WHEN failback runs again
    report = failback_flow(config_path=cfg, approved_by="test", auto_approve=True, backup=False)

    # THEN it finishes the switchover: home primary with every row, standby-1 rejoined
    assert report.status == "complete"
    assert report.plan[0].startswith("approve") and "switchover" in report.plan[1]
    assert not in_recovery(pair.home.dsn())
    assert len(pair.rows(pair.home.dsn())) == 325
    wait_until(lambda: _streams_from(pair.standby.dsn(), pair.home), 30, "standby-1 streaming from home")


def test_failback_when_already_home_converges_without_a_switchover(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failback import failback_flow

    # GIVEN the topology as configured (home primary, standby-1 streaming from it)
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url)
    lsn_before = sql(pair.home.dsn(), "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")

    # WHEN failback runs
    report = failback_flow(config_path=cfg, approved_by="test", auto_approve=True)

    # THEN only the idempotent steps ran: no backup, no rebuild, no switchover
    assert report.status == "complete"
    assert [p.split()[0] for p in report.plan] == ["switch-dns", "reconnect-apps", "validate"]
    assert sql(pair.home.dsn(), "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == lsn_before
    assert in_recovery(pair.standby.dsn())


def test_cli_drill_failover_runs_failover_then_failback(
    pg_pair: Any,
    route53_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    # GIVEN a healthy pair (a drill starts from the normal topology)
    pair: Pair = pg_pair()
    pair.insert(pair.home.dsn(), 100, "before-drill")
    pair.wait_replayed(pair.home, pair.standby)
    cfg = pair.write_config(tmp_path, file_repo_url, dns=route53_dns)

    # WHEN the CLI runs the drill
    proc = run_cli("drill-failover", "--yes", "--json", config=cfg, timeout=300)

    # THEN both halves completed with zero data loss, and the topology is home again
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["failover"]["status"] == "complete" and report["failover"]["rpo_bytes"] == 0
    assert report["failback"]["status"] == "complete"
    assert report["failback"]["switchover"]["unavailable_seconds"] < 15
    assert not in_recovery(pair.home.dsn()) and in_recovery(pair.standby.dsn())
    assert len(pair.rows(pair.home.dsn())) == 100
    assert route53_values(route53_dns) == ["127.0.0.1"]
