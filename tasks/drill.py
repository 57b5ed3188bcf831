"""Adapter: the restore drill's throwaway instance (provision, configure, start, probe, tear down),
with the drill's report model and its JSON/markdown rendering (pure).

An instance is one private temporary directory (``gravl-drill-<id>-*``) holding the data
directory, the server log and an owner file, and one server on a free loopback port. Teardown
stops the server, kills it if it lingers and removes the directory; a drill that was killed
outright is cleaned up by the next one on the same host (its owner process is gone).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.config import Config
from tasks.errors import NotFound, PermanentError, PreconditionFailed
from tasks.models import Manifest
from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir, pid_alive
from tasks.polling import poll_until
from tasks.postgres import connection, dsn_field
from tasks.reporting import cell, document, kv_table, table
from tasks.repository import Repository

log = logging.getLogger(__name__)

DIR_PREFIX = "gravl-drill-"
OWNER_FILE = "owner.json"
PROBE_TABLE = "gravl_dr_drill_probe"

CheckStatus = Literal["passed", "failed", "skipped"]


# ---------------------------------------------------------------- report model (pure)


class CheckResult(BaseModel):
    """One check of a drill, as an operator reads it: what, where, verdict, evidence."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="unique, e.g. 'row-count gravl.public.users'")
    kind: str = Field(description="restore, pg_verifybackup, recovery, amcheck, row-count, ...")
    category: Literal["restore", "integrity", "data", "usability"]
    status: CheckStatus
    summary: str = ""
    database: str | None = None
    samples: list[Any] = Field(default_factory=list, description="failing rows/values, at most 20")
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"


class DatabaseCoverage(BaseModel):
    """What the drill checked in one database, and what it did not and why."""

    model_config = ConfigDict(frozen=True)

    database: str
    checked: list[str] = Field(default_factory=list)
    not_checked: list[str] = Field(default_factory=list)


class DrillReport(BaseModel):
    """The drill's verdict and evidence; uploaded as drills/<drill-id>/report.json."""

    drill_id: str
    cluster: str
    backup_id: str | None = None
    backup_kind: str | None = None
    backup_stop_time: datetime | None = None
    selection: str | None = Field(default=None, description="which backup was drilled, and why")
    target: str = "-"
    started_at: datetime
    finished_at: datetime | None = None
    passed: bool = False
    restore_seconds: float = Field(default=0.0, description="fetch, verify and unpack")
    recovery_seconds: float = Field(default=0.0, description="start, WAL replay, promotion")
    rto_seconds: float | None = Field(
        default=None, description="restore + recovery: time to a usable database"
    )
    checks_seconds: float = 0.0
    total_seconds: float = 0.0
    recovered_to: datetime | None = Field(default=None, description="time of the newest data recovered")
    rpo_seconds: float | None = Field(default=None, description="data age: drill start minus recovered_to")
    recovered_lsn: str | None = None
    timeline: int | None = None
    checks: list[CheckResult] = Field(default_factory=list)
    databases: list[DatabaseCoverage] = Field(default_factory=list, description="per database: checked / not")
    error: str | None = None
    report_keys: list[str] = Field(default_factory=list)

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.failed]

    def verdict(self) -> str:
        if self.passed:
            n = sum(1 for c in self.checks if c.status == "passed")
            return f"drill {self.drill_id} PASSED: {n} checks passed"
        names = ", ".join(c.name for c in self.failed_checks) or (self.error or "unknown error")
        return f"drill {self.drill_id} FAILED: {names}"


class DrillFailed(PermanentError):
    """A drill ran to the end and at least one check failed; carries the report."""

    def __init__(self, report: DrillReport) -> None:
        super().__init__(report.verdict())
        self.report = report


def new_drill_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def drill_prefix(drill_id: str) -> str:
    return f"drills/{drill_id}"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def choose_latest_backup(
    backups: list[Manifest],
    kind: str,
    target_time: datetime | None,
) -> tuple[Manifest, str]:
    """The backup a drill of ``latest`` restores, and why, in words for the report.

    ``latest`` means the newest complete backup of ``kind`` (physical by default: a logical dump
    taken ad hoc must not silently turn the weekly drill into one without WAL replay or page
    checksums); with a target time, the newest physical backup that ended before it.
    ``backups`` is oldest first (tasks.backup.list_backups).
    """
    if target_time is not None:
        fits = [m for m in backups if m.kind == "physical" and m.stop_time <= target_time]
        if not fits:
            raise NotFound(f"no complete physical backup ending before {target_time.isoformat()}")
        return fits[-1], (
            f"the newest physical backup that ended before the target time {target_time.isoformat()}"
        )
    of_kind = [m for m in backups if m.kind == kind]
    if not of_kind:
        others = sorted({m.kind for m in backups})
        hint = f" (the repository holds {', '.join(others)} backups: set kind)" if others else ""
        raise NotFound(f"no complete {kind} backup to drill{hint}")
    chosen = of_kind[-1]
    why = f"the newest {kind} backup (latest, kind={kind})"
    newer = [m for m in backups if m.kind != kind and m.stop_time > chosen.stop_time]
    if newer:
        n = newer[-1]
        why += (
            f"; the newer {n.kind} backup {n.id} was not drilled: run the drill with "
            f"kind={n.kind} to drill it"
        )
    return chosen, why


def render_markdown(report: DrillReport) -> str:
    """The report an on-call operator reads in the Prefect UI or the repository."""
    status = "PASSED" if report.passed else "FAILED"
    recovered = report.recovered_to.isoformat() if report.recovered_to else "-"
    rows: list[tuple[str, object]] = [
        ("cluster", report.cluster),
        ("backup", f"{report.backup_id or '-'} ({report.backup_kind or '-'})"),
        *([("why this backup", report.selection)] if report.selection else []),
        ("target", report.target),
        ("restore (fetch, verify, unpack)", _fmt_seconds(report.restore_seconds)),
        ("recovery (start, replay, promote)", _fmt_seconds(report.recovery_seconds)),
        ("**RTO** (restore + recovery)", _fmt_seconds(report.rto_seconds)),
        ("recovered to", recovered + (f" (LSN {report.recovered_lsn})" if report.recovered_lsn else "")),
        ("**RPO** (data age at drill start)", _fmt_seconds(report.rpo_seconds)),
        ("checks", _fmt_seconds(report.checks_seconds)),
        ("total", _fmt_seconds(report.total_seconds)),
    ]
    mark = {"passed": "passed", "failed": "**FAILED**", "skipped": "skipped"}
    checks = [(c.name, mark[c.status], c.summary, f"{c.seconds:.2f} s") for c in report.checks]
    lines = [
        f"# Restore drill {report.drill_id}: {status}",
        "",
        *kv_table(rows),
        "",
        "## Checks",
        "",
        *table(("check", "result", "details", "time"), checks),
    ]
    if report.databases:
        coverage = [
            (cov.database, ", ".join(cov.checked) or "-", "; ".join(cov.not_checked) or "-")
            for cov in report.databases
        ]
        lines += ["", "## Databases", "", *table(("database", "checked", "not checked, and why"), coverage)]
    failed = report.failed_checks
    if failed:
        lines += ["", "## Failing samples", ""]
        for c in failed:
            lines.append(f"### {c.name}")
            lines.append(cell(c.summary))
            if c.samples:
                lines.append("```")
                lines += [json.dumps(s, default=str)[:400] for s in c.samples[:20]]
                lines.append("```")
            lines.append("")
    if report.error:
        lines += ["", "## Error", "", f"`{report.error}`"]
    if not report.passed:
        lines += [
            "",
            "## What to do next",
            "",
            "- The backup named above did not prove restorable as it is: treat it as suspect.",
            '- Read each failing check\'s samples; an amcheck failure that says "corrupt" or a '
            "pg_verifybackup failure means physical corruption (take a fresh backup and check the "
            'source with amcheck); "could not check" is a tool error to fix, not corruption; '
            "row-count and data-suite failures name the table whose data is wrong (or a stale suite).",
            "- Re-run the drill after fixing: `gravl-dr drill latest`.",
        ]
    if report.report_keys:
        lines += ["", "Stored as " + ", ".join(f"`{k}`" for k in report.report_keys)]
    return document(lines)


def set_aside_pause_log(logfile: Path) -> None:
    """Rename the log of the paused start (``<log>.paused``): the next start's log must not
    repeat this pause's "recovery stopping" line, which the recovery wait reads."""
    logfile.rename(logfile.with_name(logfile.name + ".paused"))


def report_keys(drill_id: str) -> list[str]:
    """Where a drill's report is stored in the repository: JSON, then markdown."""
    prefix = drill_prefix(drill_id)
    return [f"{prefix}/report.json", f"{prefix}/report.md"]


def store_report(repo: Repository, report: DrillReport) -> list[str]:
    """Store the report under its ``report_keys``, as JSON (for tools) and markdown (for people)."""
    json_key, md_key = report.report_keys
    repo.put_bytes(json_key, report.model_dump_json(indent=2).encode() + b"\n")
    repo.put_bytes(md_key, render_markdown(report).encode())
    return [json_key, md_key]


def data_age(started_at: datetime, recovered_to: datetime | None) -> float | None:
    if recovered_to is None:
        return None
    return max(0.0, (started_at - recovered_to).total_seconds())


# ---------------------------------------------------------------- the instance


class DrillInstance(BaseModel):
    """Where a drill's throwaway server lives; everything it owns is under ``workdir``."""

    model_config = ConfigDict(frozen=True)

    drill_id: str
    workdir: str
    port: int
    os_user: str
    bindir: str
    superuser: str

    @property
    def pgdata(self) -> Path:
        return Path(self.workdir) / "data"

    def cluster(self) -> LocalCluster:
        return LocalCluster(
            self.pgdata, self.port, os_user=self.os_user, bindir=self.bindir, user=self.superuser
        )

    def dsn(self, dbname: str = "postgres") -> str:
        """How the drill connects to its instance: as its superuser, in sessions that fire no
        user or event trigger and are not read-only by default (see DRILL_OPTIONS)."""
        return f"{self.cluster().dsn(dbname)} options='{DRILL_OPTIONS}'"


# Every session the drill opens on its instance: its own setup (CREATE EXTENSION amcheck, the
# usability probe) must not fire the source's event triggers or row triggers (a DDL-audit table
# would grow and fail its row count), and must work in a database whose default is
# default_transaction_read_only = on. Startup options outrank ALTER DATABASE/ROLE ... SET.
# session_replication_role needs a superuser: the drill is one on its throwaway instance.
DRILL_OPTIONS = "-c session_replication_role=replica -c default_transaction_read_only=off"
# The bootstrap superuser of a logical drill's fresh instance: a name no production role has, so
# restoring the source's roles never collides with it.
LOGICAL_SUPERUSER = "gravl_drill"


def work_base(cfg: Config) -> str:
    return cfg.drill.work_dir or tempfile.gettempdir()


def provision_instance(
    cfg: Config, drill_id: str, flow_run_id: str | None = None, kind: str = "physical"
) -> DrillInstance:
    """A private directory and a free loopback port for a throwaway server (nothing started yet)."""
    base = work_base(cfg)
    swept = sweep_abandoned(base, cfg.postgres.bindir)
    if swept:
        log.warning("removed %d abandoned drill instance(s) of killed drills", swept)
    workdir = make_private_dir(f"{DIR_PREFIX}{drill_id}-", cfg.postgres.os_user, base=base)
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "flow_run_id": flow_run_id,
        "drill_id": drill_id,
        "started": datetime.now(UTC).isoformat(),
    }
    (workdir / OWNER_FILE).write_text(json.dumps(owner))
    if kind == "logical":
        superuser = cfg.drill.superuser or LOGICAL_SUPERUSER
    else:  # a first guess at a role of the restored cluster; resolve_superuser() finds the real one
        superuser = cfg.drill.superuser or dsn_field(cfg.primary.dsn, "user") or "postgres"
    return DrillInstance(
        drill_id=drill_id,
        workdir=str(workdir),
        port=free_port(),
        os_user=cfg.postgres.os_user,
        bindir=cfg.postgres.bindir,
        superuser=superuser,
    )


def _read_owner(workdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((workdir / OWNER_FILE).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _destroy_dir(workdir: Path, bindir: str) -> None:
    """Stop a server running from workdir/data (if any) and remove the directory."""
    pgdata = workdir / "data"
    if (pgdata / "postmaster.pid").exists():
        cluster = LocalCluster(pgdata, 0, os_user=_owner_name(pgdata), bindir=bindir)
        cluster.destroy()
    shutil.rmtree(workdir, ignore_errors=True)


def _owner_name(path: Path) -> str:
    import pwd

    try:
        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (KeyError, OSError):
        return "postgres"


def sweep_abandoned(base: str, bindir: str = "auto") -> int:
    """Tear down drill instances on this host whose owning process is gone."""
    removed = 0
    host = socket.gethostname()
    for workdir in Path(base).glob(f"{DIR_PREFIX}*"):
        if not workdir.is_dir():
            continue
        owner = _read_owner(workdir)
        if owner is None:
            # no owner file: being created right now, or a crash before it was written
            with contextlib.suppress(OSError):
                if time.time() - workdir.stat().st_mtime < 3600:
                    continue
        elif owner.get("host") != host:
            continue
        elif (pid := int(owner.get("pid", 0))) <= 0 or pid_alive(pid):
            continue  # a live drill, or an owner file we cannot judge: keep it
        _destroy_dir(workdir, bindir)
        removed += 1
    return removed


def teardown_instance(instance: DrillInstance) -> dict[str, bool]:
    """Stop the server (fast, then immediate, then SIGKILL) and its WAL prefetcher, and remove
    the directory."""
    from tasks.recovery import clear_prefetch

    cluster = instance.cluster()
    pid = cluster.postmaster_pid()
    # the prefetcher serves a recovery that ends here (paused, never promoted): it is told to
    # exit, and waited for, before its folder goes (else it may outlive the drill for a moment)
    with contextlib.suppress(OSError):
        clear_prefetch(instance.pgdata, timeout=5)
    with contextlib.suppress(Exception):
        cluster.stop(mode="fast", timeout=30)
    cluster.destroy()  # immediate stop + SIGKILL of the postmaster if still there
    if pid is not None:
        poll_until(lambda: not pid_alive(pid), timeout=10, interval=0.05)
    shutil.rmtree(instance.workdir, ignore_errors=True)
    return {
        "server_gone": pid is None or not pid_alive(pid),
        "dir_gone": not Path(instance.workdir).exists(),
    }


def teardown_for_flow_run(base: str, flow_run_id: str, bindir: str = "auto") -> int:
    """Tear down every instance a given flow run owns (for cancellation and crash hooks)."""
    removed = 0
    for workdir in Path(base).glob(f"{DIR_PREFIX}*"):
        owner = _read_owner(workdir)
        if owner and owner.get("flow_run_id") == flow_run_id:
            _destroy_dir(workdir, bindir)
            removed += 1
    return removed


# ---------------------------------------------------------------- configuring the restored copy


def configure_instance(instance: DrillInstance) -> None:
    """Make a restored data directory safe to start here: own port, loopback only, no archiving,
    no streaming from production, trust authentication from loopback for the drill only.

    Written to postgresql.auto.conf (read after postgresql.conf, so it wins). A Debian-style data
    directory has no postgresql.conf or pg_hba.conf; the drill provides what it needs."""
    pgdata = instance.pgdata
    conf = pgdata / "postgresql.conf"
    if not conf.exists():
        conf.write_text("# gravl-dr drill: the source keeps its configuration outside the data directory\n")
    hba = Path(instance.workdir) / "drill_hba.conf"
    hba.write_text(
        "# gravl-dr drill: loopback only\nhost all all 127.0.0.1/32 trust\n"
        "host replication all 127.0.0.1/32 trust\n"
    )
    ident = Path(instance.workdir) / "drill_ident.conf"
    ident.write_text("# gravl-dr drill: no user name maps\n")
    settings = {
        "port": str(instance.port),
        "listen_addresses": "'127.0.0.1'",
        "unix_socket_directories": "''",
        "hba_file": f"'{hba}'",
        "ident_file": f"'{ident}'",
        "ssl": "off",
        "archive_mode": "off",
        "primary_conninfo": "''",
        "primary_slot_name": "''",
        "shared_buffers": "'128MB'",
        "logging_collector": "off",
        "log_destination": "'stderr'",
        "synchronous_standby_names": "''",
        "cluster_name": f"'gravl-drill-{instance.drill_id}'",
        # readable while recovery is paused (row counts at the backup's consistent point)
        "hot_standby": "on",
        # the source may require huge pages (ALTER SYSTEM); a drill host need not have them
        "huge_pages": "try",
    }
    settings.update(hot_standby_minimums(instance))
    auto = pgdata / "postgresql.auto.conf"
    text = auto.read_text() if auto.exists() else ""
    block = ["", "# gravl-dr drill instance (begin)"]
    block += [f"{k} = {v}" for k, v in settings.items()]
    block.append("# gravl-dr drill instance (end)")
    auto.write_text(text + "\n".join(block) + "\n")
    for path in (conf, hba, ident, auto):
        chown_tree(path, instance.os_user)


# A hot standby needs these at least as high as on the source (its pg_control records them);
# a source configured outside its data directory would otherwise leave the drill with defaults
# lower than production's, and recovery would pause instead of finishing.
_HOT_STANDBY_MINIMUMS = {
    "max_connections": "max_connections setting",
    "max_worker_processes": "max_worker_processes setting",
    "max_wal_senders": "max_wal_senders setting",
    "max_prepared_transactions": "max_prepared_xacts setting",
    "max_locks_per_transaction": "max_locks_per_xact setting",
}


def hot_standby_minimums(instance: DrillInstance) -> dict[str, str]:
    """The source's values of the settings a hot standby may not lower, from pg_control."""
    from tasks.topology import controldata

    control = controldata(instance.pgdata, os_user=instance.os_user, bindir=instance.bindir)
    return {
        name: control[key] for name, key in _HOT_STANDBY_MINIMUMS.items() if control.get(key, "").isdigit()
    }


def start_instance(instance: DrillInstance, timeout: float, env: Mapping[str, str] | None = None) -> None:
    """Start the server; pg_ctl -w returns once it accepts connections (or failed). ``env``:
    what its restore_command needs (tasks.recovery.repository_env)."""
    cluster = instance.cluster()
    cluster.start(timeout=int(timeout), env=env)


def resolve_superuser(instance: DrillInstance) -> DrillInstance:
    """The instance as its own superuser: the role the drill checks as must see every row (no
    row-level security), create extensions and allow connections. A restored cluster's roles are
    production's (the backup role may be a least-privilege one); its bootstrap superuser (OID 10,
    which cannot be dropped) is always a superuser. Loopback trust lets the drill log in as it."""
    candidates = [instance.superuser, "postgres"]
    last = "no role tried"
    for role in dict.fromkeys(candidates):
        probe = instance.model_copy(update={"superuser": role})
        try:
            with connection(probe.dsn(), timeout=5) as conn:
                row = conn.execute(
                    "SELECT rolname, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) "
                    "FROM pg_roles WHERE oid = 10"
                ).fetchone()
        except Exception as exc:  # noqa: BLE001 - try the next name
            last = str(exc)
            continue
        assert row is not None
        if row[1]:
            return probe
        return instance.model_copy(update={"superuser": str(row[0])})
    raise PreconditionFailed(f"cannot log in to the restored instance as a superuser ({last})")


def open_all_databases(instance: DrillInstance) -> dict[str, str]:
    """Allow connections to every database of the (promoted) throwaway instance, so that every
    one is checked; returns database -> note for those that did not allow them on the source."""
    from psycopg import sql

    notes: dict[str, str] = {}
    with connection(instance.dsn()) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE NOT datallowconn AND NOT datistemplate ORDER BY 1"
        ).fetchall()
        for (name,) in rows:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))
            notes[str(name)] = (
                "datallowconn = false on the source: connections allowed on the throwaway "
                "instance to check it"
            )
    return notes


def create_empty_instance(instance: DrillInstance) -> None:
    """initdb + start, for a logical drill (pg_restore needs a server to restore into)."""
    cluster = instance.cluster()
    cluster.initdb()
    cluster.start()


def list_restored_databases(instance: DrillInstance) -> list[str]:
    with connection(instance.dsn()) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1"
        ).fetchall()
    return [r[0] for r in rows]


def check_usability(instance: DrillInstance, database: str) -> CheckResult:
    """A write transaction on the promoted instance: create, insert, read back, drop, commit."""
    t0 = time.monotonic()
    name = f"usability {database}"
    try:
        with connection(instance.dsn(database), autocommit=False) as conn:
            conn.execute("SET LOCAL statement_timeout = '60s'")
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is None or row[0]:
                raise PreconditionFailed("the instance is still in recovery (read-only)")
            # in a schema of its own: the database's search_path may point anywhere
            conn.execute(f"CREATE SCHEMA {PROBE_TABLE}")
            table = f"{PROBE_TABLE}.{PROBE_TABLE}"
            conn.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, at timestamptz NOT NULL)")
            conn.execute(f"INSERT INTO {table} SELECT g, now() FROM generate_series(1, 100) g")
            count = conn.execute(f"SELECT count(*), txid_current() FROM {table}").fetchone()
            conn.execute(f"DROP SCHEMA {PROBE_TABLE} CASCADE")
            conn.commit()
        assert count is not None
        if count[0] != 100:
            raise PreconditionFailed(f"wrote 100 rows, read back {count[0]}")
        return CheckResult(
            name=name,
            kind="usability",
            category="usability",
            status="passed",
            database=database,
            seconds=time.monotonic() - t0,
            summary=f"write transaction {count[1]} committed (create, insert 100 rows, read back, drop)",
        )
    except Exception as exc:  # noqa: BLE001 - the verdict is the result
        from tasks.errors import one_line

        return CheckResult(
            name=name,
            kind="usability",
            category="usability",
            status="failed",
            database=database,
            seconds=time.monotonic() - t0,
            summary=f"write transaction failed: {one_line(exc)}",
        )


# ---------------------------------------------------------------- test hook

_BEFORE_CHECKS_HOOK_FOR_TESTS: Callable[[LocalCluster], None] | None = None


@contextlib.contextmanager
def before_checks_hook_for_tests(hook: Callable[[LocalCluster], None]) -> Iterator[None]:
    """Tests only: call ``hook(cluster)`` on the restored, promoted instance before its checks
    (e.g. to corrupt an index on purpose). Only code in the same process can set it; nothing in
    configuration, parameters or environment reaches it, so production drills never run one."""
    global _BEFORE_CHECKS_HOOK_FOR_TESTS
    previous = _BEFORE_CHECKS_HOOK_FOR_TESTS
    _BEFORE_CHECKS_HOOK_FOR_TESTS = hook
    try:
        yield
    finally:
        _BEFORE_CHECKS_HOOK_FOR_TESTS = previous


_BEFORE_START_HOOK_FOR_TESTS: Callable[[Path], None] | None = None


@contextlib.contextmanager
def before_start_hook_for_tests(hook: Callable[[Path], None]) -> Iterator[None]:
    """Tests only: call ``hook(pgdata)`` on a restored, verified data directory before the server
    first starts (e.g. to lose a table's file as a broken backup would). Same rules as
    ``before_checks_hook_for_tests``: nothing outside this process can set it."""
    global _BEFORE_START_HOOK_FOR_TESTS
    previous = _BEFORE_START_HOOK_FOR_TESTS
    _BEFORE_START_HOOK_FOR_TESTS = hook
    try:
        yield
    finally:
        _BEFORE_START_HOOK_FOR_TESTS = previous


def run_before_start_hook_for_tests(instance: DrillInstance) -> bool:
    hook = _BEFORE_START_HOOK_FOR_TESTS
    if hook is None:
        return False
    log.warning("running a test hook on drill instance %s before it starts", instance.drill_id)
    hook(instance.pgdata)
    return True


def run_before_checks_hook_for_tests(instance: DrillInstance) -> bool:
    hook = _BEFORE_CHECKS_HOOK_FOR_TESTS
    if hook is None:
        return False
    log.warning("running a test hook on drill instance %s before its checks", instance.drill_id)
    hook(instance.cluster())
    return True


# ---------------------------------------------------------------- where the recorded counts apply (pure)


class CountPoint(BaseModel):
    """Where the drill compares the manifest's row counts and newest timestamps, and how."""

    model_config = ConfigDict(frozen=True)

    where: Literal["lsn", "consistent", "promoted", "none"]
    mode: Literal["exact", "tolerance", "skip"]
    reason: str = ""

    def describe(self, lsn: str | None) -> str:
        if self.where == "lsn":
            return f"just before LSN {lsn}, where the backup read them"
        if self.where == "consistent":
            return "at the backup's consistent point"
        return "on the promoted copy"


def plan_count_point(
    *,
    kind: str,
    has_counts: bool,
    counts_lsn: str | None,
    target_kind: str,
    target_lsn_at_or_after: bool,
    lsn_reachable: bool,
    may_pass_backup: bool,
    past_backup_note: str = "",
) -> CountPoint:
    """Exact comparison needs the restored copy paused at the LSN the counts were read at: the
    backup recorded one, the drill replays to the end of the archive (or to an LSN at or after
    it), and the WAL up to it is in the archive. Otherwise the documented fallback: within
    drill.row_count_tolerance at the backup's consistent point (or on the promoted copy when no
    WAL goes past the backup), and the report says why it is not exact."""
    if not has_counts:
        return CountPoint(where="none", mode="skip", reason="the backup recorded no row counts")
    if kind == "logical":
        return CountPoint(where="promoted", mode="exact")
    if counts_lsn and (target_kind == "end" or (target_kind == "lsn" and target_lsn_at_or_after)):
        if lsn_reachable:
            return CountPoint(where="lsn", mode="exact")
        why = (
            f"the WAL up to the counts' LSN {counts_lsn} is not in the archive (archiving off or "
            "behind), so the copy cannot be paused where the counts were read"
        )
    elif counts_lsn:
        why = (
            f"the recovery target ({target_kind}) may lie before the counts' LSN {counts_lsn}: "
            "replaying to it could pass the target"
        )
    else:
        why = "the backup recorded its counts without an LSN (taken by an older gravl-dr)"
    if may_pass_backup:
        return CountPoint(
            where="consistent",
            mode="tolerance",
            reason=f"not exact: {why}; compared within drill.row_count_tolerance",
        )
    return CountPoint(
        where="promoted",
        mode="tolerance",
        reason=f"not exact: {why}; compared within drill.row_count_tolerance{past_backup_note}",
    )


CountMode = Literal["exact", "tolerance"]


def count_modes_at_pause(
    point: CountPoint, lsn: str, inflight: Mapping[str, list[int] | None]
) -> tuple[CountMode, str, dict[str, tuple[CountMode, str]]]:
    """How the counts are compared on the copy paused at ``lsn``: the mode and where for all
    databases, and the databases whose snapshot missed commits that are in the copy (``inflight``:
    per database, the transactions ``inflight_commits`` found; None or empty: exact there), which
    fall back to the tolerance and say why."""
    mode: CountMode = "exact" if point.mode == "exact" else "tolerance"
    where = f"at {lsn}" if point.where == "lsn" else f"at the backup's consistent point {lsn}"
    per_db: dict[str, tuple[CountMode, str]] = {}
    if mode == "exact":
        for db, xids in inflight.items():
            if xids:
                per_db[db] = (
                    "tolerance",
                    f"{where} (not exact: {len(xids)} transaction(s) the counts' "
                    f"snapshot did not see had committed there, e.g. xid {xids[0]}; "
                    "within drill.row_count_tolerance)",
                )
    return mode, where, per_db


def inflight_commits(instance: DrillInstance, snapshot: str) -> list[int] | None:
    """On the copy paused at the counts' LSN: transactions the counts' snapshot did not see that
    are committed here (their rows are in the copy, not in the counts). Empty: the counts are
    exact here. None: could not tell (the comparison then stays exact and says so)."""
    query = """
        SELECT x FROM generate_series(pg_snapshot_xmin(%(s)s::pg_snapshot)::text::bigint,
                                      pg_snapshot_xmax(pg_current_snapshot())::text::bigint - 1) AS x
        WHERE NOT pg_visible_in_snapshot(x::text::xid8, %(s)s::pg_snapshot)
          AND pg_xact_status(x::text::xid8) = 'committed'
        LIMIT 100
    """
    try:
        with connection(instance.dsn()) as conn:
            conn.execute("SET statement_timeout = '120s'")
            rows = conn.execute(query, {"s": snapshot}).fetchall()
    except Exception as exc:  # noqa: BLE001 - the answer is "unknown"
        log.warning("could not compare the counts' snapshot with the paused copy: %s", exc)
        return None
    return [int(r[0]) for r in rows]


# ---------------------------------------------------------------- per-database coverage (pure)


def coverage(
    checks: list[CheckResult], databases: list[str], notes: dict[str, list[str]]
) -> list[DatabaseCoverage]:
    """Group the checks by database: kinds checked (with failures counted) and the notes saying
    what was not checked and why. Every database named anywhere gets a row."""
    names = sorted(set(databases) | set(notes) | {c.database for c in checks if c.database})
    out = []
    for db in names:
        kinds: dict[str, list[CheckResult]] = {}
        for c in checks:
            if c.database == db:
                kinds.setdefault(c.kind, []).append(c)
        checked = []
        not_checked = list(notes.get(db, []))
        for kind, items in sorted(kinds.items()):
            ran = [c for c in items if c.status != "skipped"]
            failed = sum(1 for c in ran if c.failed)
            if ran:
                checked.append(f"{kind}: {len(ran)}" + (f" ({failed} FAILED)" if failed else ""))
            not_checked += [f"{c.name}: {c.summary}" for c in items if c.status == "skipped"]
        out.append(DatabaseCoverage(database=db, checked=checked, not_checked=not_checked))
    return out


def logical_scope_notes(
    database: str, cluster_databases: list[str], skipped: list[str]
) -> dict[str, list[str]]:
    """What a drill of a single-database dump does not restore or check, per database, and why."""
    notes: dict[str, list[str]] = {}
    others = [db for db in cluster_databases if db != database]
    for db in others:
        notes[db] = ["not in this backup (a single-database logical dump): not restored, not checked"]
    mine = notes.setdefault(database, [])
    mine.append(
        "roles, tablespaces, database settings (ALTER DATABASE/ROLE ... SET), database ACL and comment: "
        "not in a single-database dump, not restored (objects restored without owners and privileges)"
    )
    mine += [f"skipped, needs a role the dump does not hold: {item}" for item in skipped[:20]]
    if len(skipped) > 20:
        mine.append(f"... and {len(skipped) - 20} more statement(s) needing roles")
    return notes
