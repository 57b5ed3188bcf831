"""Helpers shared by the drill tests: leftovers, corruption, repository surgery."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from tasks.drill import DIR_PREFIX, DrillReport
from tasks.pgcluster import LocalCluster
from tasks.postgres import connection

REPO_ROOT = Path(__file__).resolve().parent.parent


def leftovers(drill_id: str) -> dict[str, list[str]]:
    """Directories and processes a drill left behind (both lists must be empty)."""
    dirs = [str(p) for p in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}{drill_id}-*")]
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{DIR_PREFIX}{drill_id}-" in text:
            procs.append(f"{cmdline.parent.name}: {text.strip()}")
    return {"dirs": dirs, "processes": procs}


def assert_no_leftovers(report: DrillReport) -> None:
    left = leftovers(report.drill_id)
    assert left == {"dirs": [], "processes": []}, left


def check(report: DrillReport, name: str) -> Any:
    found = [c for c in report.checks if c.name == name]
    assert found, f"no check {name!r} in {[c.name for c in report.checks]}"
    return found[0]


def failed_names(report: DrillReport) -> list[str]:
    return [c.name for c in report.checks if c.status == "failed"]


def corrupt_index(cluster: LocalCluster, dbname: str, index: str, block: int = 1) -> None:
    """Overwrite one block of an index with garbage while the server is stopped."""
    with connection(cluster.dsn(dbname)) as conn:
        row = conn.execute("SELECT pg_relation_filepath(%s::regclass)", (index,)).fetchone()
    assert row is not None
    path = cluster.pgdata / row[0]
    cluster.stop()
    with open(path, "r+b") as fh:
        fh.seek(block * 8192)
        fh.write(b"\x7f" * 8192)
    cluster.start()


def copy_backup_with_counts(
    repo_dir: Path, backup_id: str, new_id: str, counts: dict[str, dict[str, int]]
) -> None:
    """A copy of a backup whose manifest records other row counts (its objects are identical)."""
    src = repo_dir / "backups" / backup_id
    dst = repo_dir / "backups" / new_id
    dst.mkdir(parents=True)
    for obj in src.iterdir():
        if obj.name != "manifest.json":
            (dst / obj.name).write_bytes(obj.read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["id"] = new_id
    manifest["row_counts"] = counts
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


def switch_and_wait(cluster: LocalCluster, timeout: float = 30) -> str:
    """Switch to a new WAL segment and wait until the old one is archived; its name."""
    with connection(cluster.dsn()) as conn:
        name = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]  # type: ignore[index]
            if last is not None and last[:24] >= name:
                return str(name)
            time.sleep(0.1)
    raise AssertionError(f"{name} not archived after {timeout}s: {cluster.log_tail()}")


def archive_backup_then_writes(source: LocalCluster, config: Path) -> tuple[Any, dict[str, str]]:
    """A source archiving into the config's repository (started with what its archive_command
    needs, as an operator's service definition would), a physical backup of it, then 50 rows
    written and archived after the backup: the backup's report and the repository's environment."""
    from flows.backup import backup_flow
    from tasks.config import load_config
    from tasks.recovery import gravl_dr_executable, repository_env
    from tasks.sample import create_database, load_sample

    source.initdb(
        extra_conf={
            "archive_mode": "on",
            "archive_command": f"'{gravl_dr_executable()} --config {config} wal-push %p'",
        }
    )
    env = repository_env(load_config(str(config)))
    source.start(env=env)
    create_database(source.dsn("postgres"), "gravl")
    load_sample(source.dsn(), users=20, logs=200, custom=5)
    backup = backup_flow(config_path=str(config), kind="physical")
    with connection(source.dsn()) as conn:
        conn.execute(
            "INSERT INTO workout_logs (user_id, workout_id, completed_at, sets, reps) "
            "SELECT 1 + g % 20, 1 + g % 30, now(), 3, 10 FROM generate_series(1, 50) g"
        )
    switch_and_wait(source)
    return backup, env
