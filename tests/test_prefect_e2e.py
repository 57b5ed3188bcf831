"""The Prefect path as an operator runs it: a real `prefect server start` on loopback, the work pool,
`prefect --no-prompt deploy --all` from this checkout, a process worker on this host started
outside the checkout with only GRAVL_DR_CONFIG in its environment, and deployments triggered
through the API. Then `deployments/serve.py` next to them, which must change none of them.

Costs about two minutes (a server, a worker, one subprocess per flow run, a restore drill).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import pushgateway_metrics
from test_pitr import Archiving, start_archiving_primary, stop_archiving, switch_and_wait

from gravl_testlib import REPO_ROOT, write_config
from tasks.pgcluster import chown_tree, free_port
from tasks.sample import create_database, load_sample

pytestmark = pytest.mark.slow

POOL = "gravl-dr-pool"
NODE_POOLS = ("gravl-dr-node-primary", "gravl-dr-node-standby-1")  # prefect.yaml's node-step pools
PREFECT = str(Path(sys.executable).parent / "prefect")
CLUSTER = "gravl"


@dataclass
class Stack:
    ui: str
    api: str
    home: Path
    worker_log: Path
    arch: Archiving
    pushgateway: str

    def env(self) -> dict[str, str]:
        return dict(os.environ, PREFECT_API_URL=self.api, PREFECT_HOME=str(self.home))


def _prefect(
    stack_env: dict[str, str], *args: str, cwd: Path = REPO_ROOT, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFECT, "--no-prompt", *args],
        env=stack_env,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_healthy(api: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout}s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(pushgateway: str) -> Iterator[Stack]:
    # A source archiving through gravl-dr wal-push, with the Gravl sample for the drill's suites.
    arch = start_archiving_primary("gravl-test-e2e-", archive_timeout="0")
    create_database(arch.cluster.dsn("postgres"), "gravl")
    load_sample(arch.cluster.dsn("gravl"), users=50, logs=500, custom=5)
    write_config(
        arch.config,
        {
            "cluster": CLUSTER,
            "primary": {"dsn": arch.cluster.dsn("postgres")},
            "repository": {"url": f"file://{arch.repo_dir}"},
            "metrics": {"pushgateway": pushgateway},
            "drill": {"suites_dir": str(REPO_ROOT / "expectations")},
        },
    )
    chown_tree(arch.base, "postgres")
    home = Path(tempfile.mkdtemp(prefix="gravl-test-e2e-prefect-", dir="/tmp"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="true",
        PREFECT_UI_API_URL=api,
        # no scheduled runs: the test starts every run itself
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    server_env.pop("PREFECT_API_URL", None)
    server_log = home / "server.log"
    worker_log = home / "worker.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(home),
        )
    worker: subprocess.Popen[bytes] | None = None
    try:
        _wait_healthy(api, server, server_log)
        st = Stack(
            ui=f"http://127.0.0.1:{port}",
            api=api,
            home=home,
            worker_log=worker_log,
            arch=arch,
            pushgateway=pushgateway,
        )
        # GIVEN the pool and the deployments, deployed from the checkout as its header says
        for name in (POOL, *NODE_POOLS):
            pool = _prefect(st.env(), "work-pool", "create", name, "--type", "process")
            assert pool.returncode == 0, pool.stdout + pool.stderr
        deploy = _prefect(st.env(), "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
        # AND a process worker started elsewhere, whose environment names the config
        worker_env = dict(st.env(), GRAVL_DR_CONFIG=str(arch.config))
        worker_env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)  # the deployments' job variables set it
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "3"],
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        yield st
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
        stop_archiving(arch)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def _client(api: str) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _run(st: Stack, name: str, parameters: dict[str, Any] | None = None) -> Any:
    with _client(st.api) as client:
        dep = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters or {})


def _wait(st: Stack, run_ids: list[Any], timeout: float = 420) -> dict[Any, Any]:
    deadline = time.monotonic() + timeout
    done: dict[Any, Any] = {}
    with _client(st.api) as client:
        while time.monotonic() < deadline and len(done) < len(run_ids):
            for rid in run_ids:
                if rid in done:
                    continue
                run = client.read_flow_run(rid)
                if run.state is not None and run.state.is_final():
                    done[rid] = run
            time.sleep(1)
    missing = [rid for rid in run_ids if rid not in done]
    assert not missing, (
        f"runs not finished after {timeout}s; worker log:\n{st.worker_log.read_text()[-6000:]}"
    )
    return done


def _artifact(st: Stack, key: str, run_id: Any) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client(st.api) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    mine = [a for a in found if a.flow_run_id == run_id]
    assert mine, f"no artifact {key} from run {run_id}; artifacts: {[(a.key, a.flow_run_id) for a in found]}"
    return str(mine[-1].data)


def _failed_logs(st: Stack, run: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(st.api) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return "\n".join(log.message for log in logs)[-6000:] + "\nworker:\n" + st.worker_log.read_text()[-4000:]


def test_deployed_flows_run_on_a_process_worker_and_report(stack: Stack) -> None:
    # WHEN the nightly backup is triggered through the API
    backup = _run(stack, "backup/backup-nightly")
    runs = _wait(stack, [backup.id])
    assert runs[backup.id].state.is_completed(), _failed_logs(stack, runs[backup.id])
    switch_and_wait(stack.arch)  # the backup's WAL is archived, as it would be by the next check
    # AND then the WAL check (watching the lag for a minute), the drill, verify and retention
    wal = _run(stack, "wal-check/wal-check-10min", {"watch_minutes": 1, "sample_every_seconds": 20})
    drill = _run(stack, "drill/drill-weekly")
    verify = _run(stack, "verify/verify-manual")
    expire = _run(stack, "expire/expire-daily")
    unlock = _run(stack, "unlock/unlock-manual")
    # AND a point-in-time restore into a directory, from the form's typed parameters
    target = stack.arch.base / "restored"
    restore = _run(
        stack, "restore/restore-manual", {"pgdata": str(target), "target_time": datetime.now(UTC).isoformat()}
    )
    runs = _wait(stack, [wal.id, drill.id, verify.id, expire.id, unlock.id, restore.id])
    # THEN each completed on the worker, from the checkout, with its report artifact
    for run in (wal, drill, verify, expire, unlock, restore):
        assert runs[run.id].state.is_completed(), _failed_logs(stack, runs[run.id])
    assert "backup" in _artifact(stack, f"backup-report-{CLUSTER}", backup.id).lower()
    assert "WAL archive of gravl: OK" in _artifact(stack, f"wal-check-report-{CLUSTER}", wal.id)
    drilled = _artifact(stack, f"drill-report-{CLUSTER}", drill.id)
    assert "PASSED" in drilled and "the newest physical backup" in drilled, drilled
    assert ": OK" in _artifact(stack, f"verify-report-{CLUSTER}", verify.id)
    assert "Retention" in _artifact(stack, f"expire-report-{CLUSTER}", expire.id)
    assert "nothing to do" in _artifact(stack, f"unlock-report-{CLUSTER}", unlock.id)
    restored = _artifact(stack, f"restore-report-{CLUSTER}", restore.id)
    assert "complete" in restored and "recovery target" in restored, restored
    assert (target / "recovery.signal").is_file() and (target / "PG_VERSION").is_file()
    # AND the watch measured the lag between checks, in the run's logs and at the Pushgateway
    logs = _failed_logs(stack, runs[wal.id])
    assert "lag sample 3/3" in logs, logs
    metrics = pushgateway_metrics(stack.pushgateway)
    assert 'gravl_wal_lag_sample_timestamp_seconds{cluster="gravl",instance="",job="wal-check"}' in metrics
    for job in ("backup", "wal-check", "drill", "expire"):
        assert f'job="{job}"' in metrics, job


def test_the_ui_shows_every_form_with_help_and_renders_the_backup_report(stack: Stack) -> None:
    # GIVEN the deployments and a backup run's report (the test above; a run of its own if alone)
    with _client(stack.api) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        have = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"backup-report-{CLUSTER}"]))
        )
    if not have:
        run = _run(stack, "backup/backup-nightly")
        assert _wait(stack, [run.id])[run.id].state.is_completed()
    # WHEN the documented browser check opens every run form and the report in headless chromium
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "ui_check.py"), "--ui", stack.ui],
        capture_output=True,
        text=True,
        timeout=900,
    )
    # THEN every parameter shows with its description, and the markdown report is rendered
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.count(": OK") >= 12, proc.stdout
    assert f"artifact backup-report-{CLUSTER}: OK" in proc.stdout


def _snapshot(st: Stack) -> dict[str, Any]:
    with _client(st.api) as client:
        deps = client.read_deployments()
        return {
            f"{d.name}": {
                "updated": d.updated,
                "pull_steps": d.pull_steps,
                "job_variables": d.job_variables,
                "paused": d.paused,
                "work_pool": d.work_pool_name,
                "entrypoint": d.entrypoint,
                "schedules": sorted((str(s.schedule), s.active) for s in d.schedules),
            }
            for d in deps
        }


def test_serve_next_to_the_deployments_changes_none_of_them(stack: Stack) -> None:
    # GIVEN the deployed deployments
    before = _snapshot(stack)
    assert len(before) >= 11
    assert all(v["work_pool"] == (name if name in NODE_POOLS else POOL) for name, v in before.items())
    # WHEN an operator starts serve.py against the same server
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "deployments" / "serve.py")],
        env=stack.env(),
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=180,
    )
    # THEN it refuses in one line naming what a worker already runs, and nothing changed
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "refusing to serve" in proc.stderr and "backup/backup-nightly" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(stack) == before


def test_every_deployed_form_describes_every_parameter(stack: Stack) -> None:
    # Item: forms with help. Read what the UI renders: each deployment's parameter_openapi_schema.
    with _client(stack.api) as client:
        deps = client.read_deployments()
    assert deps
    for d in deps:
        props = d.parameter_openapi_schema["properties"]
        for pname, prop in props.items():
            where = f"{d.name}.{pname}"
            assert prop.get("description"), f"{where}: no description"
            assert "anyOf" not in prop and prop.get("type") != "null", f"{where}: shown as a choice of types"
            assert pname not in {"yes"}, f"{where}: a CLI idiom in a form"
        assert "config_path" in props and props["config_path"]["type"] == "string", d.name
    schemas = {d.name: d.parameter_openapi_schema["properties"] for d in deps}
    assert schemas["backup-nightly"]["kind"]["enum"] == ["physical", "logical"]
    assert schemas["drill-weekly"]["target_time"]["format"] == "date-time"
    assert schemas["restore-manual"]["jobs"]["minimum"] == 1
    assert json.dumps(schemas)  # plain JSON, as the UI receives it


def test_a_node_worker_killed_mid_step_is_given_up_in_seconds_and_failover_goes_on(
    stack: Stack, pg_pair: Any, tmp_path: Path
) -> None:
    """The primary's whole host dies while its worker runs the failover's observe step (worker and
    step process SIGKILLed): the failover stops waiting once the pool's heartbeats stop, not after
    node_steps.timeout_seconds, marks the run Crashed, and treats the node as unreachable."""
    import signal
    import socket

    from conftest_failover import in_recovery
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch
    from threehosts import run_process

    from gravl_testlib import run_cli

    pool = NODE_POOLS[0]
    pair = pg_pair()
    # The primary's address answers TCP but never speaks (our own silent listener): each libpq
    # attempt, the orchestrator's and the node's, waits out its connect timeout, so the node
    # step is still running when its host dies.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    dsn = f"host=127.0.0.1 port={silent.getsockname()[1]} dbname=gravl user=postgres"
    repo = tmp_path / "repo"
    repo.mkdir()
    chown_tree(repo, "postgres")
    standby = {"name": "standby-1", "dsn": pair.standby.dsn()}
    common = {"cluster": CLUSTER, "repository": {"url": f"file://{repo}"}}
    node_cfg = write_config(
        tmp_path / "node.yaml",
        {
            **common,
            "primary": {"name": "home", "dsn": dsn, "pgdata": str(pair.home.pgdata)},
            "replicas": [standby],
        },
    )
    orchestrator_cfg = write_config(
        tmp_path / "orchestrator.yaml",
        {
            **common,
            "primary": {"name": "home", "dsn": dsn, "work_pool": pool},
            "replicas": [standby],
            "node_steps": {"observe_timeout_seconds": 120, "timeout_seconds": 900, "worker_lost_seconds": 5},
        },
    )
    worker_env = dict(
        stack.env(),
        GRAVL_DR_CONFIG=str(node_cfg),
        PREFECT_WORKER_HEARTBEAT_SECONDS="1",
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    worker_env.pop("PREFECT_LOGGING_EXTRA_LOGGERS", None)
    with open(tmp_path / "node-worker.log", "wb") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd="/",
        )
    killed: list[tuple[Any, int]] = []

    def kill_host_mid_step() -> None:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        with _client(stack.api) as api:
            deadline = time.monotonic() + 200
            while time.monotonic() < deadline and not killed:
                for run in api.read_flow_runs(
                    deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool]))
                ):
                    pid = run_process(run.id) if run.state and run.state.is_running() else None
                    if pid:
                        os.kill(worker.pid, signal.SIGKILL)
                        os.kill(pid, signal.SIGKILL)
                        killed.append((run.id, pid))
                        return
                time.sleep(0.2)

    import threading

    killer = threading.Thread(target=kill_host_mid_step, daemon=True)
    try:
        pair.kill_home()
        killer.start()
        t0 = time.monotonic()
        proc = run_cli("failover", "--yes", config=orchestrator_cfg, env=stack.env(), timeout=300)
        took = time.monotonic() - t0
        killer.join(5)
        out = proc.stdout + proc.stderr
        # THEN the step was killed mid-run, and the failover did not wait out timeout_seconds (900 s)
        assert killed, out[-3000:]
        with _client(stack.api) as api:
            run = api.read_flow_run(killed[0][0])
        assert run.state is not None and run.state.is_crashed(), run.state
        assert "gravl-dr gave up" in (run.state.message or ""), run.state.message
        assert f"work pool {pool}" in (run.state.message or "") and "last heartbeat" in (
            run.state.message or ""
        )
        # AND the node is treated as unreachable with no worker, as before: promoted, reported unfenced
        with _client(stack.api) as api:
            found = api.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query="did not report")))
            said = [log.message for log in found]
        assert any(pool in m and "last heartbeat" in m for m in said), said
        assert not in_recovery(pair.standby.dsn()), out[-3000:]
        assert "NOT fenced" in out and f"its work pool {pool}'s worker did not report" in out, out[-3000:]
        assert took < 300
    finally:
        silent.close()
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=10)
