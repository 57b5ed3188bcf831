"""prefect.yaml, validated offline with Prefect's own models and loader, then deployed for real
(`prefect deploy --all`) into the session's Prefect API; deployments/serve.py reads the same file."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.serve import PREFECT_YAML, build_deployments, read_specs, to_schedule
from gravl_testlib import REPO_ROOT

POOL = "gravl-dr-pool"

# The documented deployments (README "What it does"): name -> entrypoint, flow name, schedules.
# Names: deployment = <flow>-<schedule>; flow = CLI command = metrics job.
EXPECTED: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "backup-nightly": ("flows/backup.py:backup_flow", "backup", [("0 2 * * *", "UTC")]),
    "backup-weekly": ("flows/backup.py:backup_flow", "backup", [("0 1 * * 6", "UTC")]),
    "wal-check-10min": ("flows/wal.py:wal_check_flow", "wal-check", [("*/10 * * * *", "UTC")]),
    "drill-weekly": ("flows/drill.py:drill_flow", "drill", [("0 3 * * 0", "UTC"), ("0 5 * * 0", "UTC")]),
    "expire-daily": ("flows/retention.py:expire_flow", "expire", [("30 4 * * *", "UTC")]),
    "verify-manual": ("flows/verify.py:verify_flow", "verify", []),
    "unlock-manual": ("flows/unlock.py:unlock_flow", "unlock", []),
    "restore-manual": ("flows/restore.py:restore_flow", "restore", []),
    "failover-manual": ("flows/failover.py:failover_flow", "failover", []),
    "failback-manual": ("flows/failback.py:failback_flow", "failback", []),
    "drill-failover-manual": ("flows/drill_failover.py:drill_failover_flow", "drill-failover", []),
}
SCHEDULE_WORDS = {"nightly", "weekly", "daily", "10min", "manual"}
# Node-local steps: one node-step deployment per node, named after (and on) the node's work pool.
NODE_STEP_DEPLOYMENTS = ("gravl-dr-node-primary", "gravl-dr-node-standby-1")
for _pool in NODE_STEP_DEPLOYMENTS:
    EXPECTED[_pool] = ("flows/node_step.py:node_step_flow", "node-step", [])


def pool_of(name: str) -> str:
    return name if name in NODE_STEP_DEPLOYMENTS else POOL


def raw() -> dict[str, Any]:
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    assert isinstance(doc, dict)
    return doc


def deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in raw()["deployments"]}


def test_prefect_yaml_validates_with_prefects_own_model_and_has_no_unknown_keys() -> None:
    # Prefect's models ignore unknown keys, so a misspelt `schedule:` or `parameter:` would pass
    # silently: check the keys against the models' fields as well.
    from prefect.cli.deploy._models import (
        DeploymentConfig,
        PrefectYamlModel,
        RawScheduleConfig,
        WorkPoolConfig,
    )

    doc = raw()
    model = PrefectYamlModel.model_validate(doc)
    assert len(model.deployments) == len(doc["deployments"])
    top = set(PrefectYamlModel.model_fields) | {"prefect-version", "definitions"}
    assert set(doc) <= top, set(doc) - top
    for dep in doc["deployments"]:
        assert set(dep) <= set(DeploymentConfig.model_fields), (
            dep["name"],
            set(dep) - set(DeploymentConfig.model_fields),
        )
        assert set(dep["work_pool"]) <= set(WorkPoolConfig.model_fields), dep["name"]
        for sched in dep.get("schedules") or []:
            RawScheduleConfig.model_validate(sched)  # extra="forbid", exactly one of cron/interval/rrule


def test_the_documented_deployments_with_their_schedules() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    deps = deployments()
    assert set(deps) == set(EXPECTED)
    for name, (entrypoint, flow_name, schedules) in EXPECTED.items():
        dep = deps[name]
        assert dep["entrypoint"] == entrypoint, name
        # one vocabulary: <flow>-<schedule>; a node step's deployment is named after its node's pool
        if flow_name == "node-step":
            assert dep["work_pool"]["name"] == name and name.startswith("gravl-dr-node-"), name
        else:
            assert (
                name.startswith(f"{flow_name}-") and name.removeprefix(f"{flow_name}-") in SCHEDULE_WORDS
            ), name
        scheds = dep.get("schedules") or []
        assert [(s["cron"], s["timezone"]) for s in scheds] == schedules, name
        assert ("manual" in dep["tags"]) == (not schedules), name
        for cron, tz in schedules:
            CronSchedule(cron=cron, timezone=tz)  # Prefect's own cron/timezone validation
    assert deps["backup-nightly"]["parameters"]["kind"] == "physical"
    assert deps["backup-weekly"]["parameters"]["kind"] == "logical"
    # the drill's latest is the newest physical backup; the second weekly drill takes the logical one
    assert deps["drill-weekly"]["parameters"]["kind"] == "physical"
    assert deps["drill-weekly"]["schedules"][1]["parameters"] == {"kind": "logical"}
    # not 1440 runs a day: a check every 10 minutes that watches the lag in between
    assert deps["wal-check-10min"]["parameters"]["watch_minutes"] == 9


@pytest.mark.parametrize("cron", ["61 2 * * *", "0 2 * * mon-xyz", "every night"])
def test_a_bad_cron_would_be_caught(cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    with pytest.raises(ValueError):
        CronSchedule(cron=cron, timezone="UTC")


def test_every_deployment_runs_on_the_one_process_pool_with_no_path_of_the_image() -> None:
    # GIVEN the file as shipped: nothing in it is true only inside the container image
    text = PREFECT_YAML.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "/opt/" not in body and "/etc/" not in body, "a process worker on a plain host has no such path"
    # no pull step: `prefect deploy` records the directory it runs in (the checkout) instead
    assert raw()["pull"] is None
    for name, dep in deployments().items():
        pool = dep["work_pool"]
        assert pool["name"] == pool_of(name), name
        assert "GRAVL_DR_CONFIG" not in pool["job_variables"]["env"], name  # the worker's environment
        # config_path stays null so the flow reads $GRAVL_DR_CONFIG; nothing secret is a parameter
        assert dep.get("parameters", {}).get("config_path") is None, name
        for key in dep.get("parameters", {}):
            assert not any(word in key.lower() for word in ("password", "secret", "token", "key")), (
                name,
                key,
            )
        if name in NODE_STEP_DEPLOYMENTS:
            # one at a time through the failover/failback deployments; a killed run holds no slot
            assert "concurrency_limit" not in dep, name
        else:
            assert dep.get("concurrency_limit") == 1, f"{name}: overlapping runs must not pile up"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_entrypoint_loads_with_prefects_loader_and_takes_its_parameters(
    name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Fails with FileNotFoundError naming the module until that flow's module exists.
    from prefect.flows import Flow, load_flow_from_entrypoint

    monkeypatch.chdir(REPO_ROOT)  # prefect deploy resolves entry points from the project root
    dep = deployments()[name]
    flow: Flow[..., Any] = load_flow_from_entrypoint(dep["entrypoint"])
    assert flow.name == EXPECTED[name][1]
    accepted = set(flow.parameters.properties)
    assert "config_path" in accepted, name
    assert set(dep.get("parameters") or {}) <= accepted, (name, set(dep["parameters"]) - accepted)


def test_serve_builds_the_same_deployments_as_prefect_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    built = {d.name: d for d in build_deployments(read_specs())}
    deps = deployments()
    assert set(built) == set(deps)
    for name, dep in deps.items():
        d = built[name]
        assert d.entrypoint == dep["entrypoint"], name
        assert d.parameters == (dep.get("parameters") or {}), name
        assert [(s.schedule.cron, s.schedule.timezone, s.parameters) for s in d.schedules or []] == [  # type: ignore[union-attr]
            (s["cron"], s["timezone"], s.get("parameters") or {}) for s in dep.get("schedules") or []
        ], name
        assert d.concurrency_limit == dep.get("concurrency_limit"), name


def test_serve_schedule_kinds() -> None:
    from datetime import timedelta

    assert to_schedule({"interval": 60, "timezone": "UTC"}).interval == timedelta(seconds=60)
    assert to_schedule({"rrule": "FREQ=DAILY"}).rrule == "FREQ=DAILY"
    with pytest.raises(ValueError):
        to_schedule({"timezone": "UTC"})


@pytest.mark.integration  # starts a process
def test_serve_list_needs_no_prefect_server() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deployments" / "serve.py"), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "backup-nightly" in proc.stdout and "0 2 * * *" in proc.stdout
    assert "failover-manual" in proc.stdout and "manual" in proc.stdout


def _prefect(*args: str, api: str, home: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PREFECT_API_URL=api, PREFECT_HOME=home)
    return subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", *args],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_prefect_deploy_all_registers_every_deployment(prefect_harness: None) -> None:
    import prefect.settings
    from prefect.client.orchestration import get_client

    # GIVEN the session's Prefect API (STACK.md: deploy exits 1 on a bad cron or a missing pool)
    api = str(prefect.settings.PREFECT_API_URL.value())
    with tempfile.TemporaryDirectory(prefix="gravl-prefect-home-") as home:
        for name in (POOL, *NODE_STEP_DEPLOYMENTS):
            pool = _prefect(
                "work-pool", "create", name, "--type", "process", "--overwrite", api=api, home=home
            )
            assert pool.returncode == 0, pool.stdout + pool.stderr
        # WHEN
        proc = _prefect("deploy", "--all", api=api, home=home)
    # THEN every deployment is registered as written, working in the checkout it was deployed from
    created = []
    try:
        with get_client(sync_client=True) as client:
            for name, (_entry, flow_name, schedules) in EXPECTED.items():
                try:
                    dep = client.read_deployment_by_name(f"{flow_name}/{name}")
                except Exception:  # noqa: BLE001 - reported below with deploy's own output
                    continue
                created.append(dep.id)
                assert dep.work_pool_name == pool_of(name)
                assert dep.pull_steps == [
                    {
                        "prefect.deployments.steps.set_working_directory": {
                            "directory": str(REPO_ROOT.resolve())
                        }
                    }
                ], name
                got = [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules]  # type: ignore[union-attr]
                assert sorted(got) == sorted(schedules), name
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert len(created) == len(EXPECTED)
    finally:
        # Leave no scheduled deployments behind in the shared test API.
        with get_client(sync_client=True) as client:
            for dep_id in created:
                client.delete_deployment(dep_id)
