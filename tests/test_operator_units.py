"""Pure parts of the operator's view: which backup the drill takes and why, the archive lag between
checks, the progress lines of long waits, and the flows' forms (parameter schemas, no server)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest

from tasks.drill import DrillReport, choose_latest_backup, render_markdown
from tasks.errors import NotFound
from tasks.models import Manifest
from tasks.polling import Progress
from tasks.walcheck import ArchiverStatus, server_lag

T0 = datetime(2026, 11, 20, tzinfo=UTC)


def manifest(day: int, kind: Literal["physical", "logical"]) -> Manifest:
    stop = T0 + timedelta(days=day)
    return Manifest(
        id=f"202611{20 + day}T000000Z-{kind}",
        kind=kind,
        cluster="gravl",
        pg_version=150000,
        system_identifier="1",
        timeline=1,
        start_lsn="0/3000000",
        stop_lsn="0/3000100",
        start_time=stop - timedelta(minutes=5),
        stop_time=stop,
        codec="zstd",
        objects=[],
    )


# ---------------------------------------------------------------- the drill's latest


def test_latest_is_the_newest_physical_backup_even_after_an_ad_hoc_logical_one() -> None:
    # GIVEN a nightly physical backup and, later, an ad-hoc logical one
    backups = [manifest(0, "physical"), manifest(1, "physical"), manifest(2, "logical")]
    # WHEN the weekly drill picks latest
    chosen, why = choose_latest_backup(backups, "physical", None)
    # THEN it drills the newest physical backup and says why, naming the newer logical one
    assert chosen is backups[1]
    assert "newest physical backup" in why
    assert backups[2].id in why and "kind=logical" in why


def test_latest_logical_when_the_operator_schedules_it() -> None:
    backups = [manifest(0, "physical"), manifest(1, "logical")]
    chosen, why = choose_latest_backup(backups, "logical", None)
    assert chosen is backups[1] and why == "the newest logical backup (latest, kind=logical)"


def test_latest_with_a_target_time_is_the_newest_physical_that_ended_before_it() -> None:
    backups = [manifest(0, "physical"), manifest(1, "logical"), manifest(2, "physical")]
    chosen, why = choose_latest_backup(backups, "logical", T0 + timedelta(days=1, hours=1))
    assert chosen is backups[0] and "before the target time" in why
    with pytest.raises(NotFound, match="ending before"):
        choose_latest_backup(backups, "physical", T0 - timedelta(days=1))


def test_no_backup_of_the_kind_says_what_there_is() -> None:
    with pytest.raises(
        NotFound, match=r"no complete physical backup to drill \(the repository holds logical"
    ):
        choose_latest_backup([manifest(0, "logical")], "physical", None)


def test_the_drill_report_says_why_this_backup() -> None:
    report = DrillReport(
        drill_id="d1",
        cluster="gravl",
        started_at=T0,
        backup_id="b",
        backup_kind="physical",
        selection="the newest physical backup (latest, kind=physical)",
    )
    assert "| why this backup | the newest physical backup (latest, kind=physical) |" in render_markdown(
        report
    )


# ---------------------------------------------------------------- archive lag between checks


def status(**kw: Any) -> ArchiverStatus:
    base: dict[str, Any] = {
        "reachable": True,
        "current_lsn": "0/5000100",
        "timeline": 1,
        "last_archived_wal": "000000010000000000000004",
        "last_archived_time": T0,
        "seg_size": 16 * 1024 * 1024,
    }
    base.update(kw)
    return ArchiverStatus(**base)


@pytest.mark.parametrize(
    ("kw", "lag_bytes", "lag_seconds"),
    [
        ({}, 0x100, 60.0),  # 256 bytes into segment 5
        ({"current_lsn": "0/5000000"}, 0, 0.0),  # nothing unarchived
        ({"last_archived_wal": "000000010000000000000002"}, 0x2000100, 60.0),  # the archiver is behind
        ({"last_archived_wal": None, "last_archived_time": None}, 0x5000100, None),
        ({"last_archived_wal": "00000002.history"}, None, None),  # unknown until a segment
        ({"reachable": False, "error": "down"}, None, None),
        ({"in_recovery": True}, None, None),
    ],
)
def test_server_lag(kw: dict[str, Any], lag_bytes: int | None, lag_seconds: float | None) -> None:
    sample = server_lag(status(**kw), T0 + timedelta(seconds=60))
    assert (sample.lag_bytes, sample.lag_seconds) == (lag_bytes, lag_seconds)


# ---------------------------------------------------------------- progress of long waits


def test_progress_logs_what_how_far_and_the_deadline_at_a_sane_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN a 600 s wait polled every 0.5 s (a fake clock)
    now = [0.0]
    progress = Progress(
        "standby-1 to catch up with primary", 600, logging.getLogger("t"), clock=lambda: now[0]
    )
    caplog.set_level(logging.INFO, logger="t")
    logged = 0
    # WHEN it polls for two minutes
    while now[0] < 120:
        logged += progress.tick("primary at 0/5000000, standby-1 replayed 0/4000000")
        now[0] += 0.5
    # THEN a line after 5 s, then every 15 s: 8 lines, not 240
    assert logged == 8
    line = caplog.records[0].getMessage()
    assert line.startswith("waiting for standby-1 to catch up with primary: primary at 0/5000000")
    assert "5 s so far" in line and "gives up at" in line and "(in 595 s)" in line
    assert not progress.expired()
    now[0] = 600
    assert progress.expired()


# ---------------------------------------------------------------- the forms, from the flows themselves

FLOWS = [
    ("flows.backup", "backup_flow"),
    ("flows.wal", "wal_check_flow"),
    ("flows.drill", "drill_flow"),
    ("flows.retention", "expire_flow"),
    ("flows.restore", "restore_flow"),
    ("flows.verify", "verify_flow"),
    ("flows.failover", "failover_flow"),
    ("flows.failback", "failback_flow"),
    ("flows.drill_failover", "drill_failover_flow"),
    ("flows.demo", "demo_flow"),
    ("flows.unlock", "unlock_flow"),
    ("flows.node_step", "node_step_flow"),
]
# Flows the operator does not start: the failover and failback flows run them on a node's worker.
INTERNAL_FLOWS = {"node-step"}


def test_the_list_above_holds_every_flow_in_flows() -> None:
    import importlib

    from prefect.flows import Flow

    from gravl_testlib import REPO_ROOT

    found = set()
    for path in sorted((REPO_ROOT / "flows").glob("*.py")):
        module = importlib.import_module(f"flows.{path.stem}")
        found |= {
            (module.__name__, name)
            for name, obj in vars(module).items()
            if isinstance(obj, Flow) and obj.__module__ == module.__name__
        }
    assert found == set(FLOWS), found ^ set(FLOWS)


@pytest.mark.parametrize(("module", "name"), FLOWS)
def test_every_parameter_has_a_description_and_a_plain_type(module: str, name: str) -> None:
    import importlib

    flow = getattr(importlib.import_module(module), name)
    props = flow.parameters.model_dump()["properties"]
    for pname, prop in props.items():
        assert prop.get("description"), f"{name}.{pname}: no description in the form"
        assert "anyOf" not in prop, f"{name}.{pname}: the form would offer a choice of types (one is None)"
        assert prop.get("type") in {"string", "integer", "number", "boolean", "array"}, (pname, prop)
        assert pname != "yes", f"{name}: a CLI idiom in the form"
    if "config_path" in props:
        assert props["config_path"]["type"] == "string"
    for pname, prop in props.items():
        if prop["type"] == "integer" and pname not in {"max_lag_bytes"}:
            assert "minimum" in prop and "maximum" in prop, f"{name}.{pname}: unbounded"


def test_flow_names_are_the_cli_commands() -> None:
    import importlib

    from flows.cli.app import build_parser

    subparsers = build_parser()._subparsers
    assert subparsers is not None
    choices = subparsers._group_actions[0].choices
    assert choices is not None
    commands = set(choices)
    for module, name in FLOWS:
        flow = getattr(importlib.import_module(module), name)
        assert flow.name in commands or flow.name in INTERNAL_FLOWS, f"flow {flow.name} has no CLI command"


def test_every_artifact_key_is_flow_report_cluster() -> None:
    import importlib
    import re

    from gravl_testlib import REPO_ROOT

    flows = {getattr(importlib.import_module(m), n).name for m, n in FLOWS}
    keyed = 0
    for path in (REPO_ROOT / "flows").glob("*.py"):
        text = path.read_text()
        assert not re.search(r'f?"[a-z-]+-report-', text), f"{path.name}: build the key with report_key"
        for flow in re.findall(r'report_key\(\s*"([a-z-]+)"', text):
            keyed += 1
            assert flow in flows, f"{path.name}: artifact {flow}-report-… is not <flow>-report-<cluster>"
    assert keyed >= 6
