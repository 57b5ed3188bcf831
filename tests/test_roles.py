"""Who the primary is: role history in the repository, flows that follow the primary, the split-brain
alarm, and `gravl-dr guard` keeping a demoted node read-only when it comes back."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pushgateway_metrics
from conftest_failover import Pair, sql, wait_until

from gravl_testlib import run_cli, write_config
from tasks.failover import NodeState
from tasks.roles import RoleEvent, SplitBrain, choose_primary, demotion_of

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def _state(name: str, **kw: Any) -> NodeState:
    base: dict[str, Any] = {
        "name": name,
        "configured_role": "primary" if name == "home" else "replica",
        "reachable": True,
        "in_recovery": True,
        "timeline": 1,
    }
    base.update(kw)
    return NodeState(**base)


def _event(minutes: int, event: str, primary: str, demoted: list[str]) -> RoleEvent:
    return RoleEvent(at=T0 + timedelta(minutes=minutes), event=event, primary=primary, demoted=demoted)  # type: ignore[arg-type]


def test_the_primary_is_the_node_out_of_recovery_not_the_configured_one() -> None:
    choice = choose_primary(
        [_state("home", reachable=False), _state("standby-1", in_recovery=False, timeline=2)], "home"
    )
    assert choice.primary == "standby-1" and choice.moved and "not in recovery" in choice.reason


def test_two_nodes_out_of_recovery_is_split_brain() -> None:
    with pytest.raises(SplitBrain, match="SPLIT BRAIN: home, standby-1"):
        choose_primary([_state("home", in_recovery=False), _state("standby-1", in_recovery=False)], "home")


def test_nobody_writable_falls_back_to_the_history_then_the_config() -> None:
    down = [_state("home", reachable=False), _state("standby-1", reachable=False)]
    assert choose_primary(down, "home").primary == "home"
    assert choose_primary(down, "home", [_event(0, "failover", "standby-1", ["home"])]).primary == "standby-1"


def test_demotion_lasts_until_the_node_is_primary_again() -> None:
    history = [_event(0, "failover", "standby-1", ["home"])]
    assert demotion_of(history, "home") == history[0]
    assert demotion_of(history, "standby-1") is None
    history.append(_event(5, "failback", "home", ["standby-1"]))
    assert demotion_of(history, "home") is None
    assert demotion_of(history, "standby-1") == history[1]


# ----------------------------------------------------------------------------- real clusters


def _unfenceable_failover(pair: Pair, tmp_path: Path, repo: str, **extra: Any) -> tuple[str, Path]:
    """Failover driven from an orchestrator whose config has no pgdata for home (another host).

    Returns the orchestrator's config and home's own node-local config (it knows its data directory).
    """
    from flows.failover import failover_flow

    data = pair.config(repo, **extra)
    data["primary"].pop("pgdata")
    orchestrator = str(write_config(tmp_path / "orchestrator.yaml", data))
    local = pair.config(repo, **extra)
    local["replicas"][0].pop("pgdata")
    home_cfg = write_config(tmp_path / "home.yaml", local)
    pair.insert(pair.home.dsn(), 100, "before")
    pair.wait_replayed(pair.home, pair.standby)
    pair.kill_home()
    state = failover_flow(config_path=orchestrator, approved_by="test", auto_approve=True, return_state=True)
    assert state.name == "CompletedUnfenced"
    return orchestrator, home_cfg


def test_guard_keeps_a_demoted_old_primary_read_only_when_it_restarts(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    file_repo_dir: Path,
    tmp_path: Path,
) -> None:
    # GIVEN a failover that could not fence home (its host was unreachable), recorded in the repository
    pair: Pair = pg_pair()
    _, home_cfg = _unfenceable_failover(pair, tmp_path, file_repo_url)
    assert list((file_repo_dir / "roles").glob("*-failover-standby-1.json"))
    assert not (pair.home.pgdata / "standby.signal").exists()

    # WHEN home's host comes back: systemd runs the guard (the refusing variant first), then PostgreSQL
    refused = run_cli("guard", "--node", "home", "--refuse", config=home_cfg)
    proc = run_cli("guard", "--node", "home", config=home_cfg)

    # THEN --refuse exits 4 naming the demotion; the default keeps home in standby mode: no write lands
    assert refused.returncode == 4 and "was demoted by the failover" in refused.stderr, refused.stderr
    assert proc.returncode == 0 and "starts as a standby of standby-1" in proc.stdout, proc.stderr
    assert (pair.home.pgdata / "standby.signal").exists()
    # The killed postmaster stays a zombie until init reaps it (~2 s here); PostgreSQL's lock-file
    # check (kill(pid, 0)) takes a zombie for a live postmaster, as it would on a host whose init is slow.
    old_pid = pair.home.postmaster_pid()
    assert old_pid
    wait_until(lambda: not _exists(old_pid), 60, "the killed postmaster reaped")
    pair.home.start()
    wait_until(
        lambda: bool(sql(pair.home.dsn(), "SELECT pg_is_in_recovery()")[0][0]), 30, "home up in recovery"
    )
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(pair.home.dsn(), "INSERT INTO items (tag, n) VALUES ('split-brain', 1)")
    # and a second guard run (the next restart) leaves it as it is
    again = run_cli("guard", "--node", "home", config=home_cfg)
    assert again.returncode == 0 and "standby.signal present" in again.stdout


def test_guard_lets_a_node_that_was_never_demoted_start(
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    pair: Pair = pg_pair()
    cfg = write_config(tmp_path / "home.yaml", pair.config(file_repo_url))
    proc = run_cli("guard", "--node", "home", config=cfg)
    assert proc.returncode == 0 and "may start as the primary" in proc.stdout, proc.stderr
    assert not (pair.home.pgdata / "standby.signal").exists()


def test_backup_after_failover_follows_the_new_primary(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.backup import backup_flow

    # GIVEN a failover: the configured primary is dead, standby-1 is the primary on timeline 2
    pair: Pair = pg_pair()
    orchestrator, _ = _unfenceable_failover(pair, tmp_path, file_repo_url)

    # WHEN the scheduled backup runs with the unchanged config
    report = backup_flow(config_path=orchestrator)

    # THEN it backed up standby-1 (timeline 2), not the dead configured primary
    from tasks.backup import manifest_key
    from tasks.config import load_config
    from tasks.models import parse_manifest
    from tasks.repository import open_repository

    repo = open_repository(load_config(orchestrator).repository)
    manifest = parse_manifest(repo.get_bytes(manifest_key(report.backup_id)), report.backup_id)
    assert manifest.timeline == 2, manifest


def test_split_brain_fails_backup_and_wal_check_with_an_alarm(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
    pushgateway: str,
) -> None:
    from prefect.client.orchestration import get_client

    from flows.backup import backup_flow
    from flows.wal import wal_check_flow

    # GIVEN both nodes out of recovery (the standby promoted behind gravl-dr's back)
    pair: Pair = pg_pair()
    cfg = str(
        write_config(
            tmp_path / "gravl-dr.yaml", pair.config(file_repo_url, metrics={"pushgateway": pushgateway})
        )
    )
    sql(pair.standby.dsn(), "SELECT pg_promote()")
    wait_until(lambda: not sql(pair.standby.dsn(), "SELECT pg_is_in_recovery()")[0][0], 30, "promoted")

    # WHEN / THEN the backup and the WAL check fail with the alarm, a report and a metric
    for flow_fn in (backup_flow, wal_check_flow):
        state = flow_fn(config_path=cfg, return_state=True)
        assert state.is_failed(), state
        with pytest.raises(SplitBrain, match="SPLIT BRAIN"):
            state.result()
    assert any(
        line.startswith("gravl_split_brain{") and line.endswith(" 1")
        for line in pushgateway_metrics(pushgateway).splitlines()
    )
    import asyncio

    async def artifact() -> str:
        async with get_client() as client:
            found = await client.read_latest_artifacts()
            return "\n".join(str(a.data) for a in found if a.key == "backup-report-gravl")

    assert "SPLIT BRAIN" in asyncio.run(artifact())


def test_wal_check_warns_when_the_node_it_asks_is_in_recovery(tmp_path: Path) -> None:
    from tasks.config import RepositoryConfig
    from tasks.repository import open_repository
    from tasks.walcheck import ArchiverStatus, WalCheckReport, judge_archiver
    from tasks.walformat import WalSettings

    # GIVEN the archiver status of a standby (a stuck former primary: nothing archived)
    repo_cfg = RepositoryConfig(url=f"file://{tmp_path}")
    status = ArchiverStatus(
        reachable=True,
        archive_mode="on",
        archive_timeout_s=60,
        in_recovery=True,
        timeline=1,
        current_lsn=None,
        archived_count=0,
    )
    report = WalCheckReport(cluster="gravl", repository=repo_cfg.url, checked_at=T0)

    # WHEN judged
    judge_archiver(report, status, open_repository(repo_cfg), WalSettings.from_config(repo_cfg), {}, T0)

    # THEN the report warns that it asked a standby
    assert any("in recovery" in w for w in report.warnings), report.warnings


def _exists(pid: int) -> bool:
    """True while the process exists at all, a zombie included (what kill(pid, 0) sees)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
