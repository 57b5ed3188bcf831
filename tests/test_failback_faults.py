"""Failback under faults: pg_rewind fails, or the failback itself is killed with SIGKILL at each step.

Real PostgreSQL 15 pairs (tests/conftest_failover.py). Nothing in the code under test is patched:
pg_rewind fails because a directory in the target is unreadable to it, and the failback process
group is killed when the disk or the servers show it reached a step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import pushgateway_metrics
from conftest_failover import Pair, in_recovery, sql, wait_until

from gravl_testlib import GRAVL_DR, REPO_ROOT, write_config


def _diverged_failover(pair: Pair, cfg: str) -> int:
    """Rows replicated, then the standby cut off, rows only on home, home killed, standby promoted.

    Returns the number of rows home committed that never reached the standby (lost to the failover).
    """
    from flows.failover import failover_flow

    pair.insert(pair.home.dsn(), 200, "replicated")
    pair.wait_replayed(pair.home, pair.standby)
    pair.cut_off_standby()
    pair.insert(pair.home.dsn(), 3000, "never-replicated")
    pair.kill_home()
    report = failover_flow(
        config_path=cfg, approved_by="test", auto_approve=True, force=True, max_lag_bytes=1 << 30
    )
    assert report.status == "complete", report.error
    return 3000


def test_failed_pg_rewind_keeps_the_old_data_and_reports_where_and_what(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
    pushgateway: str,
) -> None:
    from flows.failback import failback_flow, failback_markdown

    # GIVEN a failover that lost home's last 3000 rows, a home directory with a node-local port in
    # postgresql.auto.conf, and a directory in it that pg_rewind (running as postgres) cannot read
    pair: Pair = pg_pair(wal_log_hints=True)
    cfg = str(
        write_config(
            tmp_path / "gravl-dr.yaml", pair.config(file_repo_url, metrics={"pushgateway": pushgateway})
        )
    )
    auto = pair.home.pgdata / "postgresql.auto.conf"
    auto.write_text(
        auto.read_text() + f"port = '{pair.home.port}'\nlisten_addresses = '127.0.0.1'\nwork_mem = '7MB'\n"
    )
    lost = _diverged_failover(pair, cfg)
    pair.insert(pair.standby.dsn(), 50, "during-failover")
    expected = pair.rows(pair.standby.dsn())
    trap = pair.home.pgdata / "zz-unreadable"
    trap.mkdir(mode=0o000)

    # WHEN failing back
    report = failback_flow(config_path=cfg, approved_by="test", auto_approve=True, backup=False)

    # THEN pg_rewind failed, home was re-cloned, and it is the primary with every row of the new timeline
    assert report.status == "complete", report.error
    assert report.rewind_failed and "pg_rewind" in report.rewind_failed
    assert report.rebuild is not None and report.rebuild.method == "pg_basebackup re-clone"
    assert not in_recovery(pair.home.dsn()) and pair.rows(pair.home.dsn()) == expected
    # its own settings survived the re-clone (port, listen_addresses, what the operator set)
    assert sql(pair.home.dsn(), "SHOW work_mem") == [("7MB",)]
    assert sql(pair.home.dsn(), "SHOW listen_addresses") == [("127.0.0.1",)]
    # the un-replicated range is reported, and both the WAL and the old directory are kept
    assert report.rpo_bytes and report.rpo_bytes > lost * 20, report.rpo_bytes
    assert report.fork_lsn and report.end_lsn and report.diverged_timeline == 1
    kept_dirs = [Path(p) for p in report.old_data]
    assert all(p.is_dir() for p in kept_dirs) and len(kept_dirs) == 2, report.old_data
    old_dir = next(p for p in kept_dirs if (p / "PG_VERSION").is_file())
    wal_dir = next(p for p in kept_dirs if (p / "gravl-dr-old.json").is_file())
    assert json.loads((wal_dir / "gravl-dr-old.json").read_text())["fork_lsn"] == report.fork_lsn
    assert any((wal_dir / "pg_wal").iterdir())
    assert (old_dir / "zz-unreadable").is_dir()
    md = failback_markdown(report)
    assert str(old_dir) in md and report.fork_lsn in md and report.end_lsn in md and "pg_waldump" in md
    assert report.old_data_bytes and report.old_data_bytes > 1_000_000
    assert "gravl_failback_old_data_bytes" in pushgateway_metrics(pushgateway)
    # the never-replicated rows are really in the kept directory: start a copy of it, read them
    _assert_rows_recoverable(old_dir, lost)


def _assert_rows_recoverable(old_dir: Path, lost: int) -> None:
    """Start the kept directory (as the README says: spare port, no archiving) and count the rows."""
    from tasks.pgcluster import LocalCluster, free_port, make_private_dir

    base = make_private_dir("gravl-fb-kept-", "postgres")
    try:
        subprocess.run(["cp", "-a", str(old_dir), str(base / "data")], check=True)
        (base / "data" / "zz-unreadable").rmdir()
        for name in (
            "standby.signal",
            "recovery.signal",
            "postmaster.pid",
            "gravl-dr.rebuild",
            "gravl-dr.fenced",
        ):
            (base / "data" / name).unlink(missing_ok=True)
        copy = LocalCluster(base / "data", free_port("127.0.0.1"), host="127.0.0.1", dbname="gravl")
        copy.append_conf({"port": str(copy.port), "archive_mode": "off"}, file="postgresql.auto.conf")
        copy.start()
        try:
            rows = sql(copy.dsn(), "SELECT count(*) FROM items WHERE tag = 'never-replicated'")
            assert rows == [(lost,)]
        finally:
            copy.stop(mode="immediate")
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


# ----------------------------------------------------------------------------- kill -9 at each step


def _phase(pgdata: Path) -> str | None:
    try:
        return str(json.loads((pgdata / "gravl-dr.rebuild").read_text())["phase"])
    except (OSError, ValueError, KeyError):
        return None


def _pid_gone(pgdata: Path) -> bool:
    return not (pgdata / "postmaster.pid").exists()


def _runs(path: Path) -> bool:
    return (path / "postmaster.pid").exists()


def _primary(dsn: str) -> bool:
    try:
        return not in_recovery(dsn)
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _failback_until(cfg: str, env: dict[str, str], trigger: Callable[[], bool], timeout: float = 240) -> str:
    """Run `gravl-dr failback` and SIGKILL its whole process group as soon as ``trigger()`` holds."""
    proc = subprocess.Popen(
        [GRAVL_DR, "--config", cfg, "failback", "--yes", "--no-backup"],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                fired = trigger()
            except OSError:
                fired = False
            if fired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "timeout"
        out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        return f"exit {proc.returncode}: {out[-1500:]}"
    finally:
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.parametrize("path", ["rewind-interrupted", "rewound"])
def test_failback_killed_at_every_step_converges_with_zero_rows_lost(
    prefect_harness: None,
    pg_pair: Any,
    file_repo_url: str,
    tmp_path: Path,
    path: str,
) -> None:
    from prefect.settings import PREFECT_API_URL

    # GIVEN a failover (rows written on the new primary) and the failback CLI on the same Prefect API
    pair: Pair = pg_pair(wal_log_hints=True)
    cfg = str(write_config(tmp_path / "gravl-dr.yaml", pair.config(file_repo_url)))
    _diverged_failover(pair, cfg)
    pair.insert(pair.standby.dsn(), 100, "during-failover")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    home, sb = pair.home.pgdata, pair.standby.pgdata
    cloning = home.with_name(home.name + ".gravl-dr-cloning")
    steps: list[tuple[str, Callable[[], bool]]] = [
        ("rewinding", lambda: _phase(home) == "rewinding"),  # pg_rewind under way: never trusted again
        ("cloning", lambda: cloning.is_dir() and any(cloning.iterdir())),  # pg_basebackup under way
        ("rebuilt, not started", lambda: _phase(home) in ("cloned", "rewound") and not _runs(home)),
        ("started as standby", lambda: _runs(home)),
        ("current primary stopped for the switchover", lambda: _pid_gone(sb)),
        ("home promoted, former primary not rejoined", lambda: _primary(pair.home.dsn())),
    ]
    if path == "rewound":  # pg_rewind finishes; killed before the directory is started
        steps = [s for s in steps if s[0] not in ("rewinding", "cloning", "rebuilt, not started")]
        steps.insert(0, ("rewound, not started", lambda: _phase(home) == "rewound" and not _runs(home)))
    killed: list[str] = []
    written = 0

    # WHEN each run is killed -9 at the next step (and the apps keep writing to whichever node is primary)
    for name, trigger in steps:
        outcome = _failback_until(cfg, env, trigger)
        assert not outcome.startswith("exit") or outcome.startswith("exit 0"), (name, outcome)
        if outcome == "killed":
            killed.append(name)
        for dsn in (pair.standby.dsn(), pair.home.dsn()):
            if _primary(dsn):
                sql(
                    dsn,
                    "INSERT INTO items (tag, n) SELECT %s, g FROM generate_series(1, 10) g",
                    (f"after-kill-{len(killed)}",),
                )
                written += 10
        assert not (_primary(pair.home.dsn()) and _primary(pair.standby.dsn())), f"two primaries after {name}"

    # THEN re-running converges: home is the primary, nothing committed on the new timeline is lost
    final = _failback_until(cfg, env, lambda: False)
    assert final.startswith("exit 0"), final
    assert killed == [name for name, _ in steps]
    assert _primary(pair.home.dsn()) and not _primary(pair.standby.dsn())
    rows = pair.rows(pair.home.dsn())
    assert len([r for r in rows if r[0] == "replicated"]) == 200
    assert len([r for r in rows if r[0] == "during-failover"]) == 100
    assert len([r for r in rows if r[0].startswith("after-kill-")]) == written
    assert not (home / "gravl-dr.rebuild").exists()
    wait_until(
        lambda: sql(pair.standby.dsn(), "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
        30,
        "standby-1 streaming from home",
    )
    # the old data (with home's never-replicated rows) is still kept next to its pgdata
    assert list(home.parent.glob(home.name + ".gravl-dr-old-*"))
