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

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest_failover import sql, wait_until
from test_prefect_e2e import _prefect
from threehosts import (
    NODE_POOLS,
    Hosts,
    artifact,
    client,
    node_step_runs,
    run_logs,
    run_process,
    start_run,
    three_hosts,
    wait_run,
)

from gravl_testlib import assert_one_line_error, run_cli
from tasks.topology import FENCE_MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with three_hosts() as h:
        yield h


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

        with client(self.h.api) as api:
            while not self.stop.is_set() and not self.killed:
                running = api.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                    )
                )
                for run in running:
                    step = run.parameters.get("step")
                    if step not in self.steps:
                        continue
                    pid = run_process(run.id)
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


# The node-local steps of a failback that change a node's state; each failback run is killed at the
# first one not killed yet. (Every step, the bookkeeping ones included, is killed in-process by
# tests/test_failback_faults.py; here the point is the kill of a node step's run on its own worker.)
KILL_AT = ["stop-for-rebuild", "rewind", "start-as-standby", "stop-cleanly", "restart-as-standby"]


@pytest.mark.timeout(1200)
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
    failover = wait_run(
        h, start_run(h, "failover/failover-manual", {"auto_approve": True, "approved_by": "test"})
    )

    # THEN it fenced the old primary through the primary's own worker (stopped, marked) and promoted
    assert failover.state.name == "Completed", (failover.state, run_logs(h, failover.id)[-4000:])
    report = artifact(h, "failover-report-gravl", failover.id)
    assert "fence-old-primary (stop) primary [on work pool gravl-dr-node-primary]" in report, report
    assert (h.primary.pgdata / FENCE_MARKER).exists() and (h.primary.pgdata / "standby.signal").exists()
    # in one node-step run: the worker that observed it also fenced it, as the plan says
    steps = [
        (r.parameters["step"], bool(r.parameters.get("fence_ahead")))
        for r in node_step_runs(h, NODE_POOLS["primary"])
    ]
    assert ("observe", True) in steps and not any(step == "fence" for step, _ in steps), steps
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
        backup = wait_run(h, start_run(h, "backup/backup-nightly", {}))
        wal = wait_run(h, start_run(h, "wal-check/wal-check-10min", {"watch_minutes": 0}))
        # THEN they acted on the new primary, standby-1, not on the configured (demoted) one
        for run in (backup, wal):
            assert run.state.is_completed(), (run.name, run_logs(h, run.id)[-3000:])

            def followed(run_id: Any = run.id) -> bool:
                return "the primary is standby-1, not the configured primary" in run_logs(h, run_id)

            # (a run's logs reach the API in batches: they may trail its final state)
            wait_until(followed, 30, f"{run.name}'s log naming the primary it followed")
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
                run = wait_run(h, start_run(h, "failback/failback-manual", params))
            killed += killer.killed
            outcomes.append(f"{killer.killed or '-'}: {run.state.name}")
            if run.state.is_completed():
                break
        time.sleep(1)  # a few writes on the new primary after the failback
    # THEN it converged: home is the primary, standby-1 streams from it, every acknowledged row is there
    assert run.state.is_completed(), (outcomes, killed, run_logs(h, run.id)[-4000:])
    assert len(killed) >= 4, (outcomes, killed)
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
    final = artifact(h, "failback-report-gravl", run.id)
    assert "Failback complete" in final, final
    assert list(h.base.glob("primary.gravl-dr-old-*")), final


def _latest_artifact(h: Hosts, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with client(h.api) as api:
        found = api.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    assert found, f"no artifact {key}"
    return str(found[0].data)


def _restore_steps(h: Hosts, pool: str) -> list[Any]:
    return [r for r in node_step_runs(h, pool) if r.parameters.get("step") == "restore"]


@pytest.mark.timeout(600)
def test_restore_into_a_node_runs_on_its_own_host_through_its_work_pool(hosts: Hosts) -> None:
    """`gravl-dr restore --node` from the orchestrator's config (no pgdata for any node): refused
    over a writable primary and over a running standby without --replace-existing, refused when no
    worker picks it up (nothing touched each time), then restored on standby-1's own worker."""
    h = hosts
    orchestrator = h.configs["orchestrator"]
    # GIVEN 500 rows in a backup taken by the backup deployment, and 100 more only in the archived WAL
    sql(h.primary.dsn(), "CREATE TABLE restored (id int PRIMARY KEY)")
    sql(h.primary.dsn(), "INSERT INTO restored SELECT g FROM generate_series(1, 500) g")
    backup = wait_run(h, start_run(h, "backup/backup-nightly", {}))
    assert backup.state.is_completed(), run_logs(h, backup.id)[-3000:]
    sql(h.primary.dsn(), "INSERT INTO restored SELECT g FROM generate_series(501, 600) g")
    segment = sql(h.primary.dsn(), "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_until(
        lambda: (
            sql(h.primary.dsn(), "SELECT last_archived_wal >= %s FROM pg_stat_archiver", (segment,))
            == [(True,)]
        ),
        60,
        "the WAL after the backup archived",
    )
    primary_pid, standby_pid = h.primary.postmaster_pid(), h.standby.postmaster_pid()

    # WHEN a restore over the writable primary is asked for, even with --replace-existing
    over_primary = run_cli(
        "restore", "latest", "--node", "primary", "--replace-existing", config=orchestrator, env=h.env()
    )
    # THEN it is refused before any node step, and the primary runs on, writable, on the same files
    assert_one_line_error(over_primary, "node primary accepts writes")
    assert not _restore_steps(h, NODE_POOLS["primary"])
    assert h.primary.postmaster_pid() == primary_pid and not _in_recovery(h.primary.dsn())

    # WHEN a restore over the running standby is asked for without --replace-existing
    over_standby = run_cli("restore", "latest", "--node", "standby-1", config=orchestrator, env=h.env())
    # THEN it is refused too, and standby-1 still streams
    assert_one_line_error(over_standby, "PostgreSQL is running on node standby-1", "--replace-existing")
    assert h.standby.postmaster_pid() == standby_pid and _in_recovery(h.standby.dsn())

    # WHEN the primary's host is lost, and standby-1's worker takes no work (its pool paused)
    h.primary.stop()
    paused = _prefect(h.env(), "work-pool", "pause", NODE_POOLS["standby-1"])
    assert paused.returncode == 0, paused.stdout + paused.stderr
    quick = h.base / "orchestrator-quick.yaml"
    quick.write_text(
        orchestrator.read_text().replace("pickup_timeout_seconds: 90", "pickup_timeout_seconds: 3")
    )
    try:
        unpicked = run_cli(
            "restore",
            "latest",
            "--node",
            "standby-1",
            "--replace-existing",
            "--start",
            config=quick,
            env=h.env(),
        )
    finally:
        resumed = _prefect(h.env(), "work-pool", "resume", NODE_POOLS["standby-1"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # THEN the error names the node and its pool, the unpicked run is gone, standby-1 is untouched
    assert_one_line_error(
        unpicked, "standby-1: no worker of work pool gravl-dr-node-standby-1 picked up restore"
    )
    assert not _restore_steps(h, NODE_POOLS["standby-1"])
    assert h.standby.postmaster_pid() == standby_pid and _in_recovery(h.standby.dsn())

    # WHEN the restore into standby-1 is asked for with --replace-existing --start
    done = run_cli(
        "restore",
        "latest",
        "--node",
        "standby-1",
        "--replace-existing",
        "--start",
        config=orchestrator,
        env=h.env(),
    )
    # THEN it ran as a restore step on standby-1's own worker, which alone knows its data directory
    assert done.returncode == 0, done.stdout + done.stderr
    (step,) = _restore_steps(h, NODE_POOLS["standby-1"])
    assert step.state.is_completed(), step.state
    assert "node standby-1: written on host" in done.stdout, done.stdout
    # AND its server runs on the restored files, at standby-1's own address, promoted, with every row
    wait_until(lambda: not _in_recovery(h.standby.dsn()), 60, "the restored standby-1 promoted")
    assert sql(h.standby.dsn(), "SELECT count(*), max(id) FROM restored") == [(600, 600)]
    # AND its previous data directory is kept aside, and the report says where, from which backup
    (kept,) = h.base.glob("standby-1.gravl-dr-before-restore-*")
    assert (kept / "standby.signal").exists() and (kept / "PG_VERSION").exists()
    report = _latest_artifact(h, "restore-report-gravl")
    assert "complete" in report and "standby-1 (work pool gravl-dr-node-standby-1" in report, report
    assert str(kept) in report and "postgresql.conf" in report, report
    # AND the role history names standby-1 the primary: the old primary's host, back, stays read-only
    assert "role history: recorded" in done.stdout, done.stdout
    guard = run_cli("guard", "--node", "primary", config=h.configs["primary"])
    assert guard.returncode == 0 and "standby" in guard.stdout, guard.stdout + guard.stderr
    h.primary.start()
    wait_until(lambda: _in_recovery(h.primary.dsn()), 30, "the old primary up in recovery")
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        sql(h.primary.dsn(), "INSERT INTO restored VALUES (601)")
