"""Issue 12's acceptance test: three "hosts" on this machine, everything through a real Prefect server.

Two PostgreSQL nodes — `primary` (127.0.0.1) streaming to `standby-1` (127.0.0.2) — each with its
own process worker on its own work pool and its own gravl-dr config that knows only its own data
directory, and an orchestrating worker whose config has no pgdata for any node. The deployments
come from prefect.yaml (`prefect deploy --all`), as an operator deploys them.

The primary's postmaster is SIGKILLed; the failover deployment fences it through its own worker
and promotes standby-1; `gravl-dr guard` runs before the old primary restarts and keeps it a
read-only standby; the backup and WAL-check deployments follow the new primary; the failback is
interrupted by kill -9 of the node-step run's process at each node-local step and re-run until it
converges, with no acknowledged row lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest_failover import sql, wait_until
from test_prefect_e2e import _prefect, _stop, _wait_healthy

from gravl_testlib import GRAVL_DR, run_cli, write_config
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.topology import FENCE_MARKER, clone_standby, configure_standby

pytestmark = pytest.mark.slow

PREFECT = str(Path(sys.executable).parent / "prefect")
ORCHESTRATOR_POOL = "gravl-dr-pool"
NODE_POOLS = {"primary": "gravl-dr-node-primary", "standby-1": "gravl-dr-node-standby-1"}
PG = "postgres"


@dataclass
class Hosts:
    api: str
    home: Path
    base: Path
    repo_dir: Path
    primary: LocalCluster
    standby: LocalCluster
    configs: dict[str, Path]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return dict(os.environ, PREFECT_API_URL=self.api, PREFECT_HOME=str(self.home))

    def dsn(self, name: str) -> str:
        return (self.primary if name == "primary" else self.standby).dsn()


def _node(name: str, cluster: LocalCluster, *, pgdata: bool, pool: bool) -> dict[str, Any]:
    node: dict[str, Any] = {"name": name, "dsn": cluster.dsn()}
    if pgdata:
        node["pgdata"] = str(cluster.pgdata)
    if pool:
        node["work_pool"] = NODE_POOLS[name]
    return node


def _config(hosts_base: Path, repo: Path, primary: LocalCluster, standby: LocalCluster, who: str) -> Path:
    """`who`'s own config: its own pgdata only (the orchestrator: none, but every node's pool)."""
    data = {
        "cluster": "gravl",
        "primary": _node("primary", primary, pgdata=who == "primary", pool=who == "orchestrator"),
        "replicas": [_node("standby-1", standby, pgdata=who == "standby-1", pool=who == "orchestrator")],
        "repository": {"url": f"file://{repo}"},
        "node_steps": {"pickup_timeout_seconds": 90, "observe_timeout_seconds": 90, "timeout_seconds": 300},
    }
    return write_config(hosts_base / f"{who}.yaml", data)


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    base = make_private_dir("gravl-test-3hosts-", PG)
    repo = base / "repo"
    repo.mkdir()
    primary = LocalCluster(base / "primary", free_port("127.0.0.1"), host="127.0.0.1", dbname="gravl")
    standby = LocalCluster(base / "standby-1", free_port("127.0.0.2"), host="127.0.0.2", dbname="gravl")
    configs = {w: _config(base, repo, primary, standby, w) for w in ("primary", "standby-1", "orchestrator")}
    chown_tree(base, PG)
    home = Path(tempfile.mkdtemp(prefix="gravl-test-3hosts-prefect-", dir="/tmp"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
    )
    server_env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "wb") as out:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(home),
        )
    h = Hosts(api, home, base, repo, primary, standby, configs)
    try:
        # Each node archives through gravl-dr wal-push with its own config (its own host's file).
        primary.initdb(
            extra_conf={
                "wal_log_hints": "on",
                "archive_mode": "on",
                "archive_command": f"'{GRAVL_DR} --config {configs['primary']} wal-push --sync %p'",
            }
        )
        primary.start()
        sql(primary.dsn("postgres"), "CREATE DATABASE gravl")
        sql(primary.dsn(), "CREATE TABLE items (id bigserial PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
        from tasks.config import Node

        clone_standby(Node(name="primary", dsn=primary.dsn()), standby.pgdata, os_user=PG)
        standby.append_conf(
            {
                "listen_addresses": "'127.0.0.2'",
                "port": str(standby.port),
                "archive_command": f"'{GRAVL_DR} --config {configs['standby-1']} wal-push --sync %p'",
            }
        )
        configure_standby(standby.pgdata, Node(name="primary", dsn=primary.dsn()), "standby-1", os_user=PG)
        standby.start()
        wait_until(
            lambda: sql(standby.dsn(), "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
            30,
            "streaming",
        )
        _wait_healthy(api, server, home / "server.log")
        # GIVEN the pools and prefect.yaml's deployments, deployed from the checkout
        for pool in (ORCHESTRATOR_POOL, *NODE_POOLS.values()):
            made = _prefect(h.env(), "work-pool", "create", pool, "--type", "process")
            assert made.returncode == 0, made.stdout + made.stderr
        deploy = _prefect(h.env(), "deploy", "--all")
        assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
        # AND three workers, each with only its own host's config
        for who, pool in (("orchestrator", ORCHESTRATOR_POOL), *((n, p) for n, p in NODE_POOLS.items())):
            env = dict(
                h.env(), GRAVL_DR_CONFIG=str(configs[who]), PREFECT_WORKER_QUERY_SECONDS="1"
            )  # a node step waits for the worker's next poll: poll every second
            with open(home / f"worker-{who}.log", "wb") as out:
                h.workers[who] = subprocess.Popen(
                    [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--limit", "2"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                )
        yield h
    finally:
        for proc in h.workers.values():
            _stop(proc)
        _stop(server)
        for cluster in (primary, standby):
            cluster.destroy()
        subprocess.run(["rm", "-rf", str(home), str(base)], check=False)
        for aside in base.parent.glob(base.name + "*"):
            subprocess.run(["rm", "-rf", str(aside)], check=False)


# ---------------------------------------------------------------------------- helpers


def _client(api: str) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def _start(h: Hosts, name: str, parameters: dict[str, Any]) -> Any:
    with _client(h.api) as client:
        dep = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters).id


def _wait(h: Hosts, run_id: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    with _client(h.api) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.5)
    logs = "\n".join((h.home / f"worker-{w}.log").read_text()[-2000:] for w in h.workers)
    raise AssertionError(f"run {run_id} not finished after {timeout}s:\n{logs}")


def _logs(h: Hosts, run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client(h.api) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def _artifact(h: Hosts, key: str, run_id: Any) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with _client(h.api) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    mine = [a for a in found if a.flow_run_id == run_id]
    assert mine, f"no artifact {key} of run {run_id}"
    return str(mine[-1].data)


def _node_step_runs(h: Hosts, pool: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client(h.api) as client:
        return list(
            client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool])))
        )


def _run_process(run_id: Any) -> int | None:
    """The PID of the process a process worker started for flow run ``run_id``."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    return None


class Killer:
    """Watches the node-step runs; kill -9 the process of the first RUNNING one whose step is in ``steps``."""

    def __init__(self, h: Hosts, steps: set[str]) -> None:
        self.h, self.steps = h, steps
        self.killed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
        from prefect.client.schemas.objects import StateType

        with _client(self.h.api) as client:
            while not self.stop.is_set() and not self.killed:
                running = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                    )
                )
                for run in running:
                    step = run.parameters.get("step")
                    if step not in self.steps:
                        continue
                    pid = _run_process(run.id)
                    if pid:
                        os.kill(pid, signal.SIGKILL)
                        self.killed.append(step)
                        return
                time.sleep(0.1)

    def __enter__(self) -> Killer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class Writer:
    """A client writing one row per transaction to whichever node takes writes; keeps what was acknowledged."""

    def __init__(self, h: Hosts) -> None:
        self.h, self.n = h, 0
        self.acked: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        while not self.stop.is_set():
            self.n += 1
            for name in ("standby-1", "primary"):
                try:
                    sql(self.h.dsn(name), "INSERT INTO items (tag, n) VALUES ('during', %s)", (self.n,))
                except psycopg.Error:
                    continue
                self.acked.append(self.n)
                break
            time.sleep(0.05)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _in_recovery(dsn: str) -> bool:
    return bool(sql(dsn, "SELECT pg_is_in_recovery()")[0][0])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# The node-local steps a failback may run; each failback run is killed at the first one not killed yet.
KILL_AT = [
    "stop-for-rebuild",
    "save-local-settings",
    "keep-old-wal",
    "rewind",
    "reclone",
    "start-as-standby",
    "stop-cleanly",
    "restart-as-standby",
    "finish-rebuild",
]


def test_failover_guard_and_an_interrupted_failback_across_three_hosts(hosts: Hosts) -> None:
    h = hosts
    # GIVEN 1000 rows replicated, then 10 the standby never receives (its receiver is cut): the RPO
    sql(h.primary.dsn(), "INSERT INTO items (tag, n) SELECT 'before', g FROM generate_series(1, 1000) g")
    target = sql(h.primary.dsn(), "SELECT pg_current_wal_insert_lsn()")[0][0]
    wait_until(
        lambda: bool(
            sql(h.standby.dsn(), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),))[0][0]
        ),
        30,
        "replay",
    )
    sql(h.standby.dsn(), "ALTER SYSTEM SET primary_conninfo = ''")
    sql(h.standby.dsn(), "SELECT pg_reload_conf()")
    wait_until(
        lambda: sql(h.standby.dsn(), "SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)], 30, "no receiver"
    )
    sql(h.primary.dsn(), "INSERT INTO items (tag, n) SELECT 'unreplicated', g FROM generate_series(1, 10) g")

    # WHEN the primary's postmaster is SIGKILLed and the failover deployment runs on the orchestrator
    pid = h.primary.postmaster_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    failover = _wait(h, _start(h, "failover/failover-manual", {"auto_approve": True, "approved_by": "test"}))

    # THEN it fenced the old primary through the primary's own worker (stopped, marked) and promoted
    assert failover.state.name == "Completed", (failover.state, _logs(h, failover.id)[-4000:])
    report = _artifact(h, "failover-report-gravl", failover.id)
    assert "fence-old-primary (stop) primary [on work pool gravl-dr-node-primary]" in report, report
    assert (h.primary.pgdata / FENCE_MARKER).exists() and (h.primary.pgdata / "standby.signal").exists()
    steps = {r.parameters["step"] for r in _node_step_runs(h, NODE_POOLS["primary"])}
    assert {"observe", "fence"} <= steps, steps
    assert not _in_recovery(h.standby.dsn())

    # WHEN the old primary's host comes back: the guard runs first, then PostgreSQL
    guard = run_cli("guard", "--node", "primary", config=h.configs["primary"])
    assert guard.returncode == 0 and "standby" in guard.stdout, guard.stdout + guard.stderr
    wait_until(lambda: _gone(pid), 60, "the killed postmaster reaped")
    h.primary.start()
    # THEN it is a standby: a write is refused
    wait_until(lambda: _in_recovery(h.primary.dsn()), 30, "old primary up in recovery")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(h.primary.dsn(), "INSERT INTO items (tag, n) VALUES ('split-brain', 1)")

    with Writer(h) as writer:
        # WHEN the scheduled backup and WAL check run (unchanged deployments, unchanged configs)
        backup = _wait(h, _start(h, "backup/backup-nightly", {}))
        wal = _wait(h, _start(h, "wal-check/wal-check-10min", {"watch_minutes": 0}))
        # THEN they acted on the new primary, standby-1, not on the configured (demoted) one
        for run in (backup, wal):
            assert run.state.is_completed(), (run.name, _logs(h, run.id)[-3000:])
            assert "the primary is standby-1, not the configured primary" in _logs(h, run.id)
        from tasks.backup import manifest_key
        from tasks.models import parse_manifest
        from tasks.repository import FileRepository

        manifests = sorted((h.repo_dir / "backups").glob("*/manifest.json"))
        assert manifests
        backup_id = manifests[-1].parent.name
        repo = FileRepository(h.repo_dir, f"file://{h.repo_dir}")
        assert parse_manifest(repo.get_bytes(manifest_key(backup_id)), backup_id).timeline == 2

        # WHEN the failback runs, its node step killed (kill -9 of the run's process) at each step in turn
        params = {"auto_approve": True, "approved_by": "test", "backup": False}
        killed: list[str] = []
        outcomes: list[str] = []
        for _ in range(len(KILL_AT) + 2):
            with Killer(h, set(KILL_AT) - set(killed)) as killer:
                run = _wait(h, _start(h, "failback/failback-manual", params))
            killed += killer.killed
            outcomes.append(f"{killer.killed or '-'}: {run.state.name}")
            if run.state.is_completed():
                break
        time.sleep(1)  # a few writes on the new primary after the failback
    # THEN it converged: home is the primary, standby-1 streams from it, every acknowledged row is there
    assert run.state.is_completed(), (outcomes, killed, _logs(h, run.id)[-4000:])
    assert len(killed) >= 5, (outcomes, killed)
    assert not _in_recovery(h.primary.dsn())
    wait_until(
        lambda: sql(h.standby.dsn(), "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
        60,
        "standby-1 streaming from home",
    )
    assert sql(h.primary.dsn(), "SELECT count(*) FROM items WHERE tag = 'before'") == [(1000,)]
    have = {n for (n,) in sql(h.primary.dsn(), "SELECT n FROM items WHERE tag = 'during'")}
    assert writer.acked and set(writer.acked) <= have, sorted(set(writer.acked) - have)[:20]
    # AND the data only the old primary had is kept, with its path and RPO range in the report
    final = _artifact(h, "failback-report-gravl", run.id)
    assert "Failback complete" in final, final
    assert list(h.base.glob("primary.gravl-dr-old-*")), final
