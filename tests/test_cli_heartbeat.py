"""The flow-run heartbeat of a CLI command (flows/heartbeat.py): the command's flow run sends
Prefect's ``prefect.flow-run.heartbeat`` event for its own resource — what a zombie-run
automation keys on — while Prefect's engine runs it with its own heartbeat thread off (that
thread sleeps in one-second steps and the engine joins it at the end of every run);
``GRAVL_DR_FLOW_HEARTBEAT=off`` means no heartbeat at all."""

from __future__ import annotations

from typing import Any

from gravl_testlib import run_cli, settled_flow_run_events


def _api() -> str:
    import prefect

    return str(prefect.settings.PREFECT_API_URL.value())


def _last_run() -> tuple[Any, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return run, logs


def test_a_cli_flow_run_sends_its_heartbeat_without_prefects_heartbeat_thread(
    prefect_harness: None, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a config and the engine's debug logs shipped to the API
    cfg = make_config(file_repo_url)
    env = {"PREFECT_API_URL": _api(), "GRAVL_DR_NO_WARM": "1", "PREFECT_LOGGING_LEVEL": "DEBUG"}
    # WHEN a flow command runs
    proc = run_cli("backup", "--dry-run", config=cfg, env=env)
    # THEN its run completed, and the server holds a heartbeat event for that run, as Prefect
    # sends it: the run's resource id, name and Prefect version, the flow as related resource
    assert proc.returncode == 0, proc.stderr
    run, logs = _last_run()
    assert run.state is not None and run.state.is_completed(), run.state
    beats = [e for e in settled_flow_run_events(run.id) if e.event == "prefect.flow-run.heartbeat"]
    assert len(beats) == 1, beats  # one at the start; the next would come 180 s later
    import prefect

    assert dict(beats[0].resource) == {
        "prefect.resource.id": f"prefect.flow-run.{run.id}",
        "prefect.resource.name": run.name,
        "prefect.version": prefect.__version__,
    }
    related = {r.id: r.role for r in beats[0].related}
    assert related.get(f"prefect.flow.{run.flow_id}") == "flow", related
    # AND Prefect's engine ran it without its own heartbeat thread (the one it joins in
    # one-second steps): the engine logs starting that thread at debug level, and it did not
    messages = [str(log.message) for log in logs]
    assert any(m.startswith("Executing flow 'backup'") for m in messages), messages  # debug logs arrive
    assert not [m for m in messages if "heartbeat" in m.lower()], messages


def test_heartbeat_off_sends_no_heartbeat_and_still_records_the_run(
    prefect_harness: None, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN an operator who turned the CLI's flow-run heartbeat off
    cfg = make_config(file_repo_url)
    env = {"PREFECT_API_URL": _api(), "GRAVL_DR_NO_WARM": "1", "GRAVL_DR_FLOW_HEARTBEAT": "off"}
    # WHEN a flow command runs
    proc = run_cli("backup", "--dry-run", config=cfg, env=env)
    # THEN the run completed and no heartbeat event names it
    assert proc.returncode == 0, proc.stderr
    run, _ = _last_run()
    events = settled_flow_run_events(run.id)
    assert [e.event for e in events if e.event == "prefect.flow-run.heartbeat"] == []
    assert "prefect.flow-run.Running" in {e.event for e in events}


def test_the_heartbeat_event_names_the_same_resources_as_prefects_own() -> None:
    import uuid

    from prefect import flow
    from prefect.client.schemas.objects import FlowRun
    from prefect.flow_engine import FlowRunEngine

    from flows.heartbeat import heartbeat_resource

    # GIVEN a flow run of a deployment, with tags (the richest case Prefect's engine handles)
    @flow(name="backup")
    def backup() -> None: ...

    run = FlowRun(
        id=uuid.uuid4(),
        name="brave-otter",
        flow_id=uuid.uuid4(),
        deployment_id=uuid.uuid4(),
        tags=["gravl-dr", "nightly", "gravl-dr"],
    )
    # WHEN gravl-dr and Prefect's engine each build the heartbeat's resource and related resources
    ours = heartbeat_resource(run, "backup")
    resource, related = FlowRunEngine(flow=backup, flow_run=run)._build_heartbeat_event_template()
    # THEN they are the same (a zombie-run automation matches either alike)
    assert ours[0] == resource
    assert ours[1] == [dict(r) for r in related]


SUBFLOW_SCRIPT = """
import sys
from prefect import flow
from flows.backup import backup_flow
from flows.cli.runner import run_flow
from flows.heartbeat import send_heartbeat

@flow(name="outer-flow-check", on_running=[send_heartbeat])
def outer(config_path: str) -> None:
    backup_flow(config_path=config_path, kind="physical", dry_run=True)

run_flow(outer, config_path=sys.argv[1])
"""


def test_a_flow_run_inside_a_cli_commands_flow_sends_its_heartbeat_too(
    prefect_harness: None, make_config: Any, file_repo_url: str
) -> None:
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    from gravl_testlib import REPO_ROOT

    # GIVEN a flow that runs the backup flow inside it, as failback, drill-failover and the demo
    # do, run the way the CLI runs its flows (run_flow), with the engine's debug logs shipped
    cfg = make_config(file_repo_url)
    env = {**__import__("os").environ, "PREFECT_API_URL": _api(), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    # WHEN it runs
    proc = subprocess.run(
        [sys.executable, "-c", SUBFLOW_SCRIPT, str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(REPO_ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with get_client(sync_client=True) as client:
        [outer_run] = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["outer-flow-check"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        assert outer_run.state is not None and outer_run.state.is_completed(), outer_run.state
        [inner] = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[outer_run.id])
            )
        )
        runs = {"outer": outer_run, "inner backup": inner}
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[outer_run.id, inner.id]))
        )
    # THEN both runs (the outer one and the backup run inside it) sent their heartbeat event,
    # for their own resource
    for what, run in runs.items():
        beats = [e for e in settled_flow_run_events(run.id) if e.event == "prefect.flow-run.heartbeat"]
        assert len(beats) == 1, (what, beats)
        assert beats[0].resource.id == f"prefect.flow-run.{run.id}", what
    # AND Prefect's engine started its own heartbeat thread for neither (the one it joins in
    # one-second steps at the end of each run): it logs that at debug level
    messages = [str(log.message) for log in logs]
    assert any(m.startswith("Executing flow 'backup'") for m in messages), messages
    assert not [m for m in messages if "heartbeat" in m.lower()], messages


def test_every_gravl_dr_flow_sends_its_heartbeat_when_run_by_a_cli_command() -> None:
    import importlib
    import pkgutil

    from prefect import Flow

    import flows
    from flows.heartbeat import send_heartbeat

    # GIVEN every flow of the flows package (a command runs one, and some run others inside it)
    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Flow) and value.__module__ == module.__name__:
                found[value.name] = value
    # THEN each has the heartbeat hook: with Prefect's heartbeat off for the command, a flow
    # without it would run with no heartbeat at all
    assert {"backup", "restore", "failover", "failback", "drill", "drill-failover", "demo"} <= set(found)
    assert [name for name, f in found.items() if send_heartbeat not in f.on_running_hooks] == []
