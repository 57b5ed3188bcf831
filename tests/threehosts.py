"""Test helper: three "hosts" on this machine — two PostgreSQL nodes, each with its own process
worker on its own work pool and its own gravl-dr config (only its own pgdata), and an
orchestrating worker whose config has no pgdata — on a real `prefect server`, with prefect.yaml's
deployments deployed from the checkout. Used by tests/test_three_hosts.py and bench/failover.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest_failover import sql, wait_until
from test_prefect_e2e import _prefect, _stop, _wait_healthy

from gravl_testlib import GRAVL_DR, write_config
from tasks.config import Node
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.topology import clone_standby, configure_standby

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


@contextlib.contextmanager
def three_hosts() -> Iterator[Hosts]:
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
                "archive_command": f"'{GRAVL_DR} --config {configs['primary']} wal-push %p'",
            }
        )
        primary.start()
        sql(primary.dsn("postgres"), "CREATE DATABASE gravl")
        sql(primary.dsn(), "CREATE TABLE items (id bigserial PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
        clone_standby(Node(name="primary", dsn=primary.dsn()), standby.pgdata, os_user=PG)
        standby.append_conf(
            {
                "listen_addresses": "'127.0.0.2'",
                "port": str(standby.port),
                "archive_command": f"'{GRAVL_DR} --config {configs['standby-1']} wal-push %p'",
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


def client(api: str) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api)


def start_run(h: Hosts, name: str, parameters: dict[str, Any]) -> Any:
    with client(h.api) as api:
        dep = api.read_deployment_by_name(name)
        return api.create_flow_run_from_deployment(dep.id, parameters=parameters).id


def wait_run(h: Hosts, run_id: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    with client(h.api) as api:
        while time.monotonic() < deadline:
            run = api.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(0.5)
    logs = "\n".join((h.home / f"worker-{w}.log").read_text()[-2000:] for w in h.workers)
    raise AssertionError(f"run {run_id} not finished after {timeout}s:\n{logs}")


def run_logs(h: Hosts, run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(h.api) as api:
        logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return "\n".join(log.message for log in logs)


def artifact(h: Hosts, key: str, run_id: Any) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with client(h.api) as api:
        found = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    mine = [a for a in found if a.flow_run_id == run_id]
    assert mine, f"no artifact {key} of run {run_id}"
    return str(mine[-1].data)


def node_step_runs(h: Hosts, pool: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with client(h.api) as api:
        return list(
            api.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool])))
        )


def run_process(run_id: Any) -> int | None:
    """The PID of the process a process worker started for flow run ``run_id``."""
    needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    return None
