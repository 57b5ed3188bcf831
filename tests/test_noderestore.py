"""A restore into a configured node's data directory: the plan's refusals (pure), the node-side
checks on a real server (a refusal touches nothing), and the CLI's one-line errors.

The restore through a node's own work pool, on a real Prefect server, is in tests/test_three_hosts.py.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gravl_testlib import assert_one_line_error, run_cli, write_config
from tasks.config import Config, Node
from tasks.errors import ConfigError, PreconditionFailed
from tasks.failover import NodeState
from tasks.noderestore import (
    NodeRestoreRequest,
    carry_node_settings,
    find_node,
    plan_node_restore,
    prepare_node_pgdata,
    restore_role_event,
)
from tasks.pgcluster import LocalCluster, free_port
from tasks.roles import RoleEvent

NODE = Node(name="standby-1", dsn="host=127.0.0.2 port=5432 user=postgres", work_pool="pool-s1")
POOL = "pool:pool-s1"


def _state(name: str, *, up: bool, recovery: bool | None = None, answered: bool = False) -> NodeState:
    return NodeState(
        name=name,
        configured_role="replica",
        address="127.0.0.2:5432",
        reachable=up,
        in_recovery=recovery,
        answered=answered,
        timeline=2,
    )


PRIMARY_UP = _state("primary", up=True, recovery=False)
PRIMARY_DOWN = _state("primary", up=False)


@pytest.mark.parametrize(
    ("states", "replace", "start", "refusal"),
    [
        # the node itself takes writes: never, whatever was asked
        ([PRIMARY_DOWN, _state("standby-1", up=True, recovery=False)], True, False, "accepts writes"),
        # a running standby: only when asked to replace it
        ([PRIMARY_UP, _state("standby-1", up=True, recovery=True)], False, False, "--replace-existing"),
        ([PRIMARY_UP, _state("standby-1", up=True, recovery=True)], True, False, None),
        # a server that answered but refused our login runs too
        ([PRIMARY_UP, _state("standby-1", up=False, answered=True)], False, False, "is running"),
        # a node that is down
        ([PRIMARY_UP, _state("standby-1", up=False)], False, False, None),
        # a started restore promotes: never next to another writable node
        ([PRIMARY_UP, _state("standby-1", up=False)], False, True, "second writable node"),
        ([PRIMARY_DOWN, _state("standby-1", up=False)], False, True, None),
    ],
)
def test_the_plan_refuses_what_would_wreck_the_node_or_the_cluster(
    states: list[NodeState], replace: bool, start: bool, refusal: str | None
) -> None:
    if refusal is None:
        plan_node_restore(NODE, POOL, states, replace_existing=replace, start=start)
        return
    with pytest.raises(PreconditionFailed, match=refusal) as exc:
        plan_node_restore(NODE, POOL, states, replace_existing=replace, start=start)
    assert "standby-1" in str(exc.value) or "primary" in str(exc.value)


def test_a_node_without_pgdata_here_and_without_a_work_pool_is_out_of_reach() -> None:
    node = Node(name="dr-site", dsn="host=10.0.0.9")
    with pytest.raises(
        PreconditionFailed, match=r"node dr-site has no pgdata in this config and no work_pool"
    ):
        plan_node_restore(node, None, [], replace_existing=True, start=False)


def test_an_unknown_node_names_the_nodes_there_are() -> None:
    cfg = Config.model_validate(
        {
            "cluster": "c",
            "primary": {"name": "primary", "dsn": "host=127.0.0.1"},
            "replicas": [{"name": "standby-1", "dsn": "host=127.0.0.2"}],
            "repository": {"url": "file:///nonexistent"},
        }
    )
    with pytest.raises(
        ConfigError, match=r"node 'standby-2' is not in the config \(its nodes: primary, standby-1\)"
    ):
        find_node(cfg, "standby-2")


def test_the_node_step_request_carries_no_unknown_field() -> None:
    # GIVEN what the restore flow sends to the node's worker: names and values only
    with pytest.raises(ValueError, match="extra"):
        NodeRestoreRequest.model_validate({"backup": "latest", "encryption_key": "s3cr3t"})
    assert NodeRestoreRequest(backup="latest").replace_existing is False


T0 = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def _event(event: str, primary: str, demoted: str) -> RoleEvent:
    return RoleEvent.model_validate({"at": T0, "event": event, "primary": primary, "demoted": [demoted]})


@pytest.mark.parametrize(
    ("history", "node", "demoted"),
    [
        ([], "primary", None),  # the configured primary restored in place: nobody else was primary
        ([], "standby-1", ["primary"]),
        ([_event("failover", "standby-1", "primary")], "standby-1", None),
        ([_event("failover", "standby-1", "primary")], "primary", ["standby-1"]),
        (
            [_event("failover", "standby-1", "primary"), _event("failback", "primary", "standby-1")],
            "standby-1",
            ["primary"],
        ),
    ],
)
def test_a_started_node_restore_demotes_the_primary_the_history_names(
    history: list[RoleEvent], node: str, demoted: list[str] | None
) -> None:
    event = restore_role_event(history, "primary", node, timeline=3, backup_id="b1", at=T0)
    if demoted is None:
        assert event is None
        return
    assert event is not None and event.event == "restore" and event.primary == node
    assert event.demoted == demoted and event.timeline == 3 and "b1" in event.note


# ------------------------------------------------------------------ node side, on a real server


def _cfg() -> Config:
    return Config.model_validate(
        {"cluster": "c", "primary": {"dsn": "host=127.0.0.1"}, "repository": {"url": "file:///nonexistent"}}
    )


def _listing(pgdata: Path) -> list[str]:
    return sorted(p.name for p in pgdata.iterdir())


def _aside(pgdata: Path) -> list[Path]:
    return sorted(pgdata.parent.glob(pgdata.name + ".gravl-dr-before-restore-*"))


def test_a_refusal_on_the_node_leaves_its_data_directory_untouched(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    # GIVEN a running primary, as the node's own host sees it
    c = cluster_factory("gravl-test-noderestore-")
    node = Node(name="n1", dsn=c.dsn(), pgdata=str(c.pgdata))
    pid, before = c.postmaster_pid(), _listing(c.pgdata)
    # WHEN a restore over it is asked for, even with --replace-existing
    with pytest.raises(PreconditionFailed, match=r"n1: the server running in .* accepts writes"):
        prepare_node_pgdata(_cfg(), node, replace_existing=True)
    # AND when its server does not answer at the node's dsn (whether it takes writes is unknown)
    deaf = node.model_copy(update={"dsn": f"host=127.0.0.1 port={free_port()} user=postgres"})
    with pytest.raises(PreconditionFailed, match="cannot be told"):
        prepare_node_pgdata(_cfg(), deaf, replace_existing=True)
    # THEN nothing moved: the same server runs on the same files
    assert c.postmaster_pid() == pid and c.is_running()
    assert _listing(c.pgdata) == before and not _aside(c.pgdata)

    # WHEN it is stopped, and restored over without --replace-existing
    c.stop()
    with pytest.raises(PreconditionFailed, match=r"n1: data directory .* is not empty"):
        prepare_node_pgdata(_cfg(), node, replace_existing=False)
    assert (c.pgdata / "PG_VERSION").is_file() and not _aside(c.pgdata)


def test_replace_existing_keeps_the_old_directory_aside_and_the_nodes_own_settings(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    # GIVEN a stopped node with its own port in postgresql.auto.conf
    c = cluster_factory("gravl-test-noderestore-")
    c.append_conf({"port": "6543"}, "postgresql.auto.conf")
    c.stop()
    node = Node(name="n1", dsn=c.dsn(), pgdata=str(c.pgdata))
    # WHEN the restore prepares it with --replace-existing
    prepared = prepare_node_pgdata(_cfg(), node, replace_existing=True)
    # THEN the old directory is kept, whole, next to the new (absent) one
    assert prepared.kept_aside and Path(prepared.kept_aside) == _aside(c.pgdata)[0]
    assert (Path(prepared.kept_aside) / "PG_VERSION").is_file() and not c.pgdata.exists()
    # AND once the backup's files are in, the node's own settings come back over the source's
    c.pgdata.mkdir(mode=0o700)
    (c.pgdata / "postgresql.auto.conf").write_text("port = 5432\n")
    carried = carry_node_settings(prepared, os_user="postgres")
    assert "postgresql.auto.conf" in carried and "pg_hba.conf" in carried
    assert "port = 6543" in (c.pgdata / "postgresql.auto.conf").read_text()

    # WHEN that restore was killed midway (no pg_control yet: the backup's files only) and re-run
    (c.pgdata / "postgresql.auto.conf").write_text("port = 5432\n")
    again = prepare_node_pgdata(_cfg(), node, replace_existing=True)
    # THEN the partial directory is kept aside too, and the node's settings still come from its own
    assert again.kept_aside and len(_aside(c.pgdata)) == 2
    assert again.settings_from == prepared.kept_aside
    c.pgdata.mkdir(mode=0o700)
    carry_node_settings(again, os_user="postgres")
    assert "port = 6543" in (c.pgdata / "postgresql.auto.conf").read_text()


# ------------------------------------------------------------------ CLI: one line, before Prefect


def _config(tmp_path: Path, **standby: Any) -> Path:
    return write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "c",
            "primary": {"name": "primary", "dsn": "host=127.0.0.1 port=1"},
            "replicas": [{"name": "standby-1", "dsn": "host=127.0.0.2 port=1", **standby}],
            "repository": {"url": f"file://{tmp_path}/repo"},
        },
    )


@pytest.mark.integration  # starts a process
def test_cli_restore_into_an_unknown_node_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("restore", "latest", "--node", "standby-9", config=_config(tmp_path))
    assert_one_line_error(proc, "node 'standby-9' is not in the config", "primary, standby-1")


@pytest.mark.integration  # starts a process
def test_cli_restore_into_a_node_out_of_reach_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("restore", "latest", "--node", "standby-1", config=_config(tmp_path))
    assert_one_line_error(proc, "node standby-1 has no pgdata in this config and no work_pool")


@pytest.mark.integration  # starts a process
def test_cli_replace_existing_goes_with_node(tmp_path: Path) -> None:
    proc = run_cli(
        "restore", "latest", "--pgdata", str(tmp_path / "d"), "--replace-existing", config=_config(tmp_path)
    )
    assert_one_line_error(proc, "--replace-existing goes with --node")


# ------------------------------------------------------------------ in-process: this config has the node's pgdata


def test_restore_into_a_node_whose_pgdata_is_here_runs_in_process(prefect_harness: None) -> None:
    from test_pitr import start_archiving_primary, stop_archiving, switch_and_wait
    from test_pitr import take_backup as pitr_backup

    from flows.restore import restore_flow

    arch = start_archiving_primary("gravl-test-noderestore-here-")
    try:
        # GIVEN 50 rows in a backup and 25 more in the archived WAL, and a config with the node's pgdata
        arch.sql("CREATE TABLE t (id int PRIMARY KEY)")
        arch.sql("INSERT INTO t SELECT generate_series(1, 50)")
        pitr_backup(arch)
        arch.sql("INSERT INTO t SELECT generate_series(51, 75)")
        switch_and_wait(arch)
        node = {"name": "primary", "dsn": arch.cluster.dsn("postgres"), "pgdata": str(arch.cluster.pgdata)}
        config = write_config(
            arch.base / "node.yaml",
            {"cluster": "gravl", "primary": node, "repository": {"url": f"file://{arch.repo_dir}"}},
        )
        pid = arch.cluster.postmaster_pid()
        # WHEN a restore into the node is asked for while it accepts writes
        with pytest.raises(PreconditionFailed, match="node primary accepts writes"):
            restore_flow(config_path=str(config), node="primary", replace_existing=True)
        # THEN it runs on, untouched
        assert arch.cluster.postmaster_pid() == pid and not _aside(arch.cluster.pgdata)

        # WHEN it is down and the restore runs with --replace-existing --start
        arch.cluster.stop()
        report = restore_flow(
            config_path=str(config), node="primary", replace_existing=True, start=True, recovery_timeout=120
        )
        # THEN it ran here, into the node's own directory, on the node's own port, with every row
        assert report.runs_on == "here" and report.node == "primary" and report.started
        assert report.port == arch.cluster.port and report.target == str(arch.cluster.pgdata)
        assert arch.sql("SELECT count(*) FROM t") == [(75,)]
        assert report.kept_aside and Path(report.kept_aside) == _aside(arch.cluster.pgdata)[0]
        # AND the configured primary restored in place is no role change
        assert report.role_change and report.role_change.startswith("unchanged"), report.role_change
        assert not list((arch.repo_dir / "roles").glob("*.json"))
    finally:
        stop_archiving(arch)
