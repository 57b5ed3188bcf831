"""Failover against two real PostgreSQL 15 servers on 127.0.0.1 / 127.0.0.2 in streaming replication."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import pushgateway_metrics
from conftest_failover import Pair, in_recovery, route53_values, sql

from gravl_testlib import assert_one_line_error, run_cli
from tasks.errors import PreconditionFailed


def test_sigkill_primary_then_failover_promotes_replica_and_switches_route53(
    prefect_harness: None,
    pg_pair: Any,
    route53_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
    pushgateway: str,
) -> None:
    from flows.failover import failover_flow

    # GIVEN rows committed and replicated, then the primary killed with SIGKILL
    pair: Pair = pg_pair()
    pair.insert(pair.home.dsn(), 500, "before")
    pair.wait_replayed(pair.home, pair.standby)
    expected = pair.rows(pair.home.dsn())
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url, dns=route53_dns, metrics={"pushgateway": pushgateway})

    # WHEN the failover flow runs without asking
    report = failover_flow(config_path=cfg, approved_by="test", auto_approve=True)

    # THEN the replica is read-write with every row, the DNS record points at it, RPO is zero
    assert report.status == "complete" and report.new_primary == "standby-1"
    assert not in_recovery(pair.standby.dsn())
    sql(pair.standby.dsn(), "INSERT INTO items (tag, n) VALUES ('after', 1)")
    assert [r for r in pair.rows(pair.standby.dsn()) if r[0] == "before"] == expected  # 0 rows lost
    assert route53_values(route53_dns) == ["127.0.0.2"]
    assert report.rpo_bytes == 0, report
    assert report.rto_seconds is not None and 0 < report.rto_seconds < 15
    assert report.canary is not None and report.dns is not None and report.dns.changed
    assert "standby.signal" in (report.fence or "")
    assert (pair.home.pgdata / "standby.signal").exists()  # a restart of the old primary stays read-only
    assert [e.step for e in report.timeline][:2] == ["assess-primary", "check-replica-health"]
    metrics = pushgateway_metrics(pushgateway)
    assert "gravl_failover_rto_seconds" in metrics and "gravl_failover_rpo_bytes" in metrics


def test_failover_switches_bind_record_with_tsig(
    prefect_harness: None,
    pg_pair: Any,
    bind_server: Any,
    bind_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a dead primary and a BIND zone whose record points at it
    pair: Pair = pg_pair()
    pair.insert(pair.home.dsn(), 100, "before")
    pair.wait_replayed(pair.home, pair.standby)
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url, dns=bind_dns)
    assert bind_server.query() == ["127.0.0.1"]

    # WHEN
    report = failover_flow(config_path=cfg, approved_by="test", auto_approve=True)

    # THEN the record was moved with a signed RFC 2136 update, and the secret is nowhere in the report
    assert bind_server.query() == ["127.0.0.2"]
    assert report.dns is not None and "present 127.0.0.1" in report.dns.detail
    assert bind_server.secret not in report.model_dump_json()
    assert len(pair.rows(pair.standby.dsn())) == 100


def test_failover_refused_while_primary_accepts_writes(
    prefect_harness: None,
    pg_pair: Any,
    route53_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a healthy primary
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url, dns=route53_dns)

    # WHEN / THEN failover refuses and changes nothing
    with pytest.raises(PreconditionFailed, match="up and accepting writes"):
        failover_flow(config_path=cfg, approved_by="test", auto_approve=True)
    assert in_recovery(pair.standby.dsn())
    assert not in_recovery(pair.home.dsn())
    assert route53_values(route53_dns) == ["127.0.0.1"]
    assert not (pair.home.pgdata / "standby.signal").exists()


def test_failover_refused_when_replica_lags_beyond_limit(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a standby cut off from the primary (no WAL receiver), rows committed on the primary
    # only, then a dead primary: its pg_wal on disk goes further than the standby
    pair: Pair = pg_pair()
    pair.cut_off_standby()
    pair.insert(pair.home.dsn(), 20000, "not-replicated")
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)

    # WHEN / THEN a 64 KiB limit refuses the promotion, naming the lag
    with pytest.raises(PreconditionFailed, match=r"bytes behind .*max-lag-bytes 65536"):
        failover_flow(config_path=cfg, approved_by="test", auto_approve=True, max_lag_bytes=65536)
    assert in_recovery(pair.standby.dsn())
    assert not (pair.home.pgdata / "standby.signal").exists()  # refused before any side effect


def test_second_failover_run_is_idempotent(
    prefect_harness: None,
    pg_pair: Any,
    route53_dns: dict[str, Any],
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a completed failover
    pair: Pair = pg_pair()
    pair.insert(pair.home.dsn(), 50, "before")
    pair.wait_replayed(pair.home, pair.standby)
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url, dns=route53_dns)
    first = failover_flow(config_path=cfg, approved_by="test", auto_approve=True)
    timeline = sql(pair.standby.dsn(), "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0][0]
    sql(pair.standby.dsn(), "INSERT INTO items (tag, n) VALUES ('between', 1)")

    # WHEN it runs again
    second = failover_flow(config_path=cfg, approved_by="test", auto_approve=True)

    # THEN nothing is promoted or fenced twice, DNS is left alone, data is untouched
    assert first.status == second.status == "complete"
    assert second.already_promoted and second.new_primary == "standby-1"
    assert not any(p.startswith(("promote-replica", "fence-old-primary", "approve")) for p in second.plan)
    assert second.dns is not None and not second.dns.changed
    assert second.rpo_bytes == first.rpo_bytes == 0
    assert (
        sql(pair.standby.dsn(), "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0][0]
        == timeline
    )
    assert len(pair.rows(pair.standby.dsn())) == 51
    assert route53_values(route53_dns) == ["127.0.0.2"]


def test_failing_reconnect_hook_fails_flow_while_promotion_stands(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import ReconnectFailed, failover_flow

    # GIVEN a dead primary and a reconnect hook that fails
    pair: Pair = pg_pair()
    pair.kill_home()
    hooks = [
        {"command": ["sh", "-c", "echo 'api did not restart' >&2; exit 3"], "timeout": 10},
        {"command": ["true"]},
    ]
    cfg = pair.write_config(tmp_path, file_repo_url, reconnect=hooks)

    # WHEN / THEN the flow fails with a clear message...
    with pytest.raises(ReconnectFailed) as err:
        failover_flow(config_path=cfg, approved_by="test", auto_approve=True)
    message = str(err.value)
    assert "exited 3" in message and "api did not restart" in message
    assert "promotion of standby-1 stands" in message
    # ... and the promotion stands
    assert not in_recovery(pair.standby.dsn())
    sql(pair.standby.dsn(), "INSERT INTO items (tag, n) VALUES ('after', 1)")


def _resume_when_paused(run_input: dict[str, Any], found: list[str], timeout: float = 60) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import aresume_flow_run

    async def find_and_resume() -> None:
        deadline = time.monotonic() + timeout
        async with get_client() as client:
            while time.monotonic() < deadline:
                runs = await client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                    )
                )
                if runs:
                    found.append(str(runs[0].id))
                    await aresume_flow_run(runs[0].id, run_input=run_input)
                    return
                await asyncio.sleep(0.2)

    asyncio.run(find_and_resume())


@contextlib.contextmanager
def _operator_answers(run_input: dict[str, Any]) -> Iterator[list[str]]:
    """An operator who fills in the approval form once the run pauses; yields the paused run ids found."""
    found: list[str] = []
    resumer = threading.Thread(target=_resume_when_paused, args=(run_input, found))
    resumer.start()
    try:
        yield found
    finally:
        resumer.join(timeout=60)


def test_approval_gate_pauses_until_an_operator_approves(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    # GIVEN a dead primary and an operator who approves in the UI form
    pair: Pair = pg_pair()
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)
    # WHEN the flow runs without --yes
    with _operator_answers({"approve": True, "approver": "alice", "comment": "INC-42"}) as found:
        report = failover_flow(config_path=cfg, approval_timeout_seconds=60)

    # THEN it paused for input, then promoted, with the approver in the report
    assert found, "the flow never paused"
    assert report.status == "complete" and report.approver == "alice" and report.approval_note == "INC-42"
    assert not in_recovery(pair.standby.dsn())


def test_declined_approval_promotes_nothing(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow

    pair: Pair = pg_pair()
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)
    with (
        _operator_answers({"approve": False, "approver": "bob", "comment": "primary is coming back"}),
        pytest.raises(PreconditionFailed, match="bob declined"),
    ):
        failover_flow(config_path=cfg, approval_timeout_seconds=60)
    assert in_recovery(pair.standby.dsn())


def test_prefilled_approved_by_does_not_skip_the_gate_and_the_approval_is_a_visible_step(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.failover import failover_flow, failover_markdown

    # GIVEN a dead primary and a run started with approved_by filled in (no auto_approve)
    pair: Pair = pg_pair()
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)

    # WHEN it runs
    with _operator_answers({"approve": True, "approver": "carol", "comment": "INC-7"}) as found:
        state = failover_flow(
            config_path=cfg, approved_by="mallory", approval_timeout_seconds=60, return_state=True
        )

    # THEN it still paused for the form; the approve task recorded who and when
    report = state.result()
    assert found, "a pre-filled approved_by skipped the approval gate"
    assert report.approver == "carol" and report.approved_at is not None and not report.auto_approved
    assert "carol at " in failover_markdown(report)

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None

    async def task_names() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return [r.name for r in runs]

    assert any(name.startswith("approve-") for name in asyncio.run(task_names()))


def test_auto_approve_skips_the_form_and_says_so_in_the_report(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    from flows.failover import failover_flow, failover_markdown

    pair: Pair = pg_pair()
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)
    report = failover_flow(config_path=cfg, approved_by="dave", auto_approve=True)
    assert report.status == "complete" and report.auto_approved and report.approver == "dave"
    assert "**auto_approve**" in failover_markdown(report)


def test_cli_failover_without_terminal_or_yes_asks_for_approval(
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    # GIVEN no terminal, no --yes and no Prefect server to approve in
    pair: Pair = pg_pair()
    cfg = pair.write_config(tmp_path, file_repo_url)
    proc = run_cli("failover", config=cfg, env={"PREFECT_API_URL": ""})
    # THEN one line saying how to approve; nothing changed
    assert_one_line_error(proc, "approval needed", "--yes")
    assert in_recovery(pair.standby.dsn())


def test_cli_rejects_rfc2136_without_tsig_secret(pg_pair: Any, file_repo_url: str, tmp_path: Path) -> None:
    pair: Pair = pg_pair()
    dns = {
        "provider": "rfc2136",
        "server": "127.0.0.1",
        "zone": "gravl.internal.",
        "record": "db.gravl.internal.",
        "key_name": "k",
        "key_env": "GRAVL_DR_NO_SUCH_SECRET",
    }
    cfg = pair.write_config(tmp_path, file_repo_url, dns=dns)
    proc = run_cli("failover", "--yes", config=cfg)
    assert_one_line_error(proc, "GRAVL_DR_NO_SUCH_SECRET")


@pytest.mark.integration  # starts a process
def test_cli_help_lists_failover_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("failover", "failback", "drill-failover"):
        assert command in proc.stdout


def test_cli_on_a_terminal_shows_the_plan_and_a_no_changes_nothing(
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
) -> None:
    import shlex
    import subprocess

    from gravl_testlib import GRAVL_DR, REPO_ROOT

    # GIVEN a dead primary and an operator at a terminal (a pty from script(1)) who answers "no"
    pair: Pair = pg_pair()
    pair.kill_home()
    cfg = pair.write_config(tmp_path, file_repo_url)
    command = shlex.join([GRAVL_DR, "--config", cfg, "failover"])
    proc = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        input="no\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO_ROOT),
    )

    # THEN the plan was shown, the answer refused it, and nothing was promoted
    assert proc.returncode != 0
    assert "promote-replica standby-1" in proc.stdout and "Fail over? Type 'yes' to go on" in proc.stdout
    assert "not approved on the terminal: nothing changed" in proc.stdout
    assert in_recovery(pair.standby.dsn())
