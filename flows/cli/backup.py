"""Entry point: CLI commands for backups — backup, list, verify, restore.

Flow modules (and Prefect with them) are imported inside the command that runs the flow: `list`
and `verify` must answer without loading Prefect."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config import load_config
from tasks.errors import PreconditionFailed
from tasks.models import check_backup_ref

if TYPE_CHECKING:
    from flows.restore import RestoreReport
    from tasks.recovery import RecoveryTarget
from flows.cli.runner import run_flow


def register(sub: Any) -> None:
    p = sub.add_parser("backup", help="take a backup (a flow run)")
    p.add_argument("--kind", choices=["physical", "logical"], default="physical")
    p.add_argument("--dry-run", action="store_true", help="check everything, write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", help="list complete backups")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", help="re-read every object of a backup and check its checksums")
    p.add_argument("backup", help="backup id or 'latest'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="restore a backup (a flow run)")
    p.add_argument("backup", help="backup id or 'latest'")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--pgdata", help="empty directory for a physical restore")
    target.add_argument("--dsn", help="empty database for a logical restore")
    target.add_argument(
        "--node",
        metavar="NAME",
        help="physical restore into this configured node's data directory (on its host, via its work_pool)",
    )
    p.add_argument(
        "--replace-existing",
        action="store_true",
        help="--node: stop its server (never a writable one) and keep its data directory aside",
    )
    p.add_argument("--start", action="store_true", help="start the restored server")
    p.add_argument("--port", type=int, help="port for the restored server (default: a free one)")
    p.add_argument("--jobs", type=int, default=2, help="pg_restore -j (logical)")
    point = p.add_mutually_exclusive_group()
    point.add_argument(
        "--target-time", metavar="TS", help="recover to this time (ISO 8601; UTC unless it has an offset)"
    )
    point.add_argument("--target-lsn", metavar="LSN", help="recover to this WAL location")
    point.add_argument("--target-name", metavar="NAME", help="recover to this named restore point")
    point.add_argument("--target-xid", metavar="XID", help="recover to this transaction id")
    p.add_argument(
        "--tablespace-map",
        action="append",
        metavar="OLD=NEW",
        default=[],
        help="restore the tablespace at OLD into NEW (repeatable; as pg_basebackup -T)",
    )
    p.add_argument(
        "--database",
        metavar="NAME",
        help="logical: restore only this database into the existing empty database of --dsn",
    )
    p.add_argument(
        "--no-owner",
        action="store_true",
        help="logical --database: objects belong to the connecting role, no GRANTs",
    )
    p.add_argument(
        "--keep-archiving",
        action="store_true",
        help="let the restored server archive its new timeline (default: archive_mode off)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)


def _repo(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tasks.repository import open_repository

    cfg = load_config(args.config)
    return cfg, open_repository(cfg.repository)


def cmd_backup(args: argparse.Namespace) -> int:
    cfg, repo = _repo(args)
    # Fail fast, before Prefect starts, on what can be checked cheaply.
    from tasks.postgres import server_info
    from tasks.streams import load_key

    load_key(cfg.repository.encryption_key_env)
    repo.check(write=repo.url.startswith("file://"))
    server_info(cfg.primary.dsn)
    from flows.backup import backup_flow

    report = run_flow(backup_flow, config_path=args.config, kind=args.kind, dry_run=args.dry_run)
    if args.json:
        print(report.model_dump_json(indent=2))
    elif args.dry_run:
        print(f"dry run OK: backup {report.backup_id} could be taken; nothing was written")
        for line in report.messages:
            print(f"  {line}")
    else:
        ratio = report.raw_bytes / report.stored_bytes if report.stored_bytes else 0
        print(
            f"backup {report.backup_id} complete: {report.raw_bytes} raw bytes, "
            f"{report.stored_bytes} stored (ratio {ratio:.2f}) in {report.total_seconds:.1f}s"
        )
        if report.databases:
            print(f"databases: {', '.join(report.databases)}")
        for line in report.warnings:
            print(f"warning: {line}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Every backup with a manifest; OK when its objects are all there with their recorded sizes,
    BROKEN when one is missing or cut, INVALID when the manifest cannot be read."""
    from tasks.backup import read_catalog

    cfg, repo = _repo(args)
    repo.check()
    entries = read_catalog(repo, cfg.cluster, check=True)
    if args.json:
        out: list[dict[str, Any]] = []
        for e in entries:
            doc: dict[str, Any] = (
                json.loads(e.manifest.model_dump_json()) if e.manifest else {"id": e.backup_id}
            )
            doc.update(status=e.status, reason=e.reason or None)
            out.append(doc)
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if not entries:
        print(f"no backups in {repo.url}")
        return 0
    print(f"{'ID':36} {'KIND':8} {'STATUS':8} {'RAW':>12} {'STORED':>12} {'STOP LSN':>14}  STOP TIME")
    for e in entries:
        m = e.manifest
        if m is None:
            print(f"{e.backup_id:36} {'-':8} {e.status:8} {e.reason}")
            continue
        line = (
            f"{m.id:36} {m.kind:8} {e.status:8} {m.raw_bytes:>12} {m.stored_bytes:>12} "
            f"{m.stop_lsn or '-':>14}  {m.stop_time.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z"
        )
        print(line + (f"  ({e.reason})" if e.reason else ""))
    bad = [e for e in entries if e.status in ("BROKEN", "INVALID")]
    if bad:
        print(
            f"warning: {len(bad)} backup(s) cannot be restored: "
            + ", ".join(f"{e.backup_id} {e.status}" for e in bad),
            file=sys.stderr,
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tasks.backup import key_for_manifest, resolve_backup, verify_objects

    check_backup_ref(args.backup)
    cfg, repo = _repo(args)
    manifest = resolve_backup(repo, args.backup, cluster=cfg.cluster)
    key = key_for_manifest(cfg, manifest)
    res = verify_objects(repo, manifest, deep=True, key=key)
    if args.json:
        print(
            json.dumps(
                {
                    "backup_id": res.backup_id,
                    "objects": res.objects,
                    "bytes": res.bytes_read,
                    "seconds": round(res.seconds, 3),
                    "ok": True,
                }
            )
        )
    else:
        print(
            f"backup {res.backup_id} OK: {res.objects} object(s), {res.bytes_read} bytes, "
            f"checksums match ({res.seconds:.1f}s)"
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Validate first (the reference, the target, the options, the backup to use), then run the
    restore flow. The backup is chosen by the flow's own step (tasks.recovery.select_backup_for_restore)."""
    from flows.restore import restore_flow
    from tasks.recovery import select_backup_for_restore

    check_backup_ref(args.backup)
    cfg, repo = _repo(args)
    kind = _check_restore_into(args)
    target = _recovery_point(args, kind)
    manifest = select_backup_for_restore(repo, args.backup, cfg.cluster, kind, target)
    report = run_flow(
        restore_flow,
        config_path=args.config,
        backup=manifest.id,
        pgdata=str(Path(args.pgdata).absolute()) if args.pgdata else None,
        dsn=args.dsn,
        node=args.node,
        replace_existing=args.replace_existing,
        start=args.start,
        port=args.port,
        jobs=args.jobs,
        target_time=args.target_time,
        target_lsn=args.target_lsn,
        target_name=args.target_name,
        target_xid=args.target_xid,
        keep_archiving=args.keep_archiving,
        tablespace_map=args.tablespace_map or None,
        database=args.database,
        no_owner=args.no_owner,
    )
    _print_restore(report, as_json=args.json)
    return 0


def _check_restore_into(args: argparse.Namespace) -> str:
    """'physical' (an empty --pgdata, or a --node the flow checks) or 'logical' (a reachable
    --dsn); the password leaves the DSN."""
    if args.replace_existing and not args.node:
        raise PreconditionFailed("--replace-existing goes with --node")
    if args.node:
        from tasks.node_steps import step_location
        from tasks.noderestore import check_node_reachable, find_node

        # an unknown node, or one whose files are out of reach, dies here, before Prefect starts
        node = find_node(load_config(args.config), args.node)
        check_node_reachable(node, step_location(node))
        return "physical"
    if args.pgdata:
        from tasks.restore import check_pgdata_target

        check_pgdata_target(Path(args.pgdata).absolute())
        return "physical"
    from tasks.libpq import split_password
    from tasks.postgres import server_info

    # the flow (its parameters live in Prefect's database) gets the DSN without the
    # password; pg_restore and psycopg in this process get it as PGPASSWORD
    args.dsn, password = split_password(args.dsn)
    if password is not None:
        os.environ["PGPASSWORD"] = password
    server_info(args.dsn)  # reachable?
    return "logical"


def _recovery_point(args: argparse.Namespace, kind: str) -> RecoveryTarget:
    """The --target-* option, and the options that only fit one kind of restore."""
    from tasks.recovery import RecoveryTarget
    from tasks.restore import parse_tablespace_map

    target = RecoveryTarget.from_options(
        time=args.target_time, lsn=args.target_lsn, name=args.target_name, xid=args.target_xid
    )
    if target.kind != "end" and kind != "physical":
        raise PreconditionFailed("--target-* needs a physical restore (--pgdata or --node)")
    if (args.database or args.no_owner) and kind != "logical":
        raise PreconditionFailed("--database and --no-owner need a logical restore (--dsn)")
    if args.no_owner and not args.database:
        raise PreconditionFailed("--no-owner goes with --database (a whole-cluster restore keeps owners)")
    parse_tablespace_map(args.tablespace_map)
    return target


def _print_restore(report: RestoreReport, *, as_json: bool) -> None:
    if as_json:
        print(report.model_dump_json(indent=2))
        return
    where = f", server running on port {report.port}" if report.started else ""
    print(f"restored {report.backup_id} into {report.target} in {report.seconds:.1f}s{where}")
    if report.node:
        print(f"node {report.node}: written on host {report.host} ({report.runs_on})")
        if report.kept_aside:
            print(f"its previous data directory is kept in {report.kept_aside}")
        if report.role_change:
            print(f"role history: {report.role_change}")
    if report.reached_lsn:
        print(
            f"recovered to {report.target_point}: reached {report.reached_lsn} on timeline "
            f"{report.timeline}, last transaction committed at {report.last_xact_time or '-'}"
            f" ({report.stop_message or 'end of WAL'})"
        )
    if report.databases:
        print(f"databases: {', '.join(report.databases)}")
    for note in report.not_carried_over:
        print(f"note: {note}")
