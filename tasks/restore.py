"""Adapter: restore steps as plain functions — verify first, then write, never a half-restored target.

Physical: every object's stored SHA-256 is checked before a byte is extracted; extraction
re-checks stored and raw checksums as it streams into ``tar -x``; any failure empties the
target again. Recovery settings (recovery.signal, restore_command, recovery_target_*) are
written by ``write_recovery_settings`` for point-in-time recovery.
Logical: the dump is decoded into a temporary file (pg_restore -j needs a seekable file),
verified, then restored into an empty database.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tasks.backup import key_for_manifest, verify_objects
from tasks.config import Config
from tasks.errors import ChecksumMismatch, CommandFailed, DRError, PreconditionFailed, command_error
from tasks.libpq import client_env
from tasks.models import Manifest
from tasks.pgcluster import chown_tree
from tasks.postgres import is_empty_database, safe_dsn
from tasks.proc import child_env, pg_bin, run, tail
from tasks.repository import Repository
from tasks.streams import decode, sized, threaded, verified

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreResult:
    backup_id: str
    target: str
    raw_bytes: int
    seconds: float
    verify_seconds: float
    skipped: tuple[str, ...] = ()  # what a lenient restore could not restore (roles the dump lacks)


_PG_RESTORE_ERROR = re.compile(r"pg_restore: error: could not execute query: ERROR:\s+(.*?)\n"
                               r"(?:Command was: (.*?)(?:\n\n|\npg_restore|\Z))?", re.S)
_MISSING_ROLE = re.compile(r'role "[^"]+" does not exist')


def missing_role_errors(stderr: str) -> tuple[list[str], list[str]]:
    """pg_restore's failed statements split into those that only lack a role the dump does not
    carry (a single-database dump holds no roles) and every other error."""
    roles: list[str] = []
    other: list[str] = []
    for m in _PG_RESTORE_ERROR.finditer(stderr):
        message = m.group(1).strip().splitlines()[0]
        command = " ".join((m.group(2) or "").split())[:200]
        (roles if _MISSING_ROLE.search(message) else other).append(f"{message}: {command}" if command else message)
    return roles, other


def check_pgdata_target(pgdata: Path) -> None:
    """The target must be absent or an empty directory: restore never mixes with existing data."""
    if pgdata.exists():
        if not pgdata.is_dir():
            raise PreconditionFailed(f"restore target {pgdata} exists and is not a directory")
        if any(pgdata.iterdir()):
            raise PreconditionFailed(f"restore target {pgdata} is not empty")
    elif not pgdata.parent.is_dir():
        raise PreconditionFailed(f"parent directory of restore target {pgdata} does not exist")


def _object_stream(
    repo: Repository, manifest: Manifest, key: bytes | None, index: int = 0, *, raw_hash: bool = True
) -> Iterator[bytes]:
    """The decoded bytes of one object, verified as they stream: stored size and SHA-256, then
    the raw size, and the raw SHA-256 unless ``raw_hash`` is off (the stored SHA-256 already
    pins every byte the deterministic decoder sees; `gravl-dr verify` checks the raw hash)."""
    obj = manifest.objects[index]
    what = f"backup {manifest.id} object {obj.key}"
    stored = verified(
        repo.iter_object(f"backups/{manifest.id}/{obj.key}"), obj.sha256, obj.size, what
    )
    raw = decode(stored, manifest.codec, key, manifest.encryption != "none", what)
    if not raw_hash:
        return sized(raw, obj.raw_size, f"{what} (decoded)")
    return verified(raw, obj.raw_sha256, obj.raw_size, f"{what} (decoded)")


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                child.unlink()


def restore_physical(cfg: Config, repo: Repository, manifest: Manifest, pgdata: Path) -> RestoreResult:
    """Extract a physical backup into an empty ``pgdata`` owned by postgres.os_user."""
    if manifest.kind != "physical":
        raise PreconditionFailed(f"backup {manifest.id} is logical: restore it with --dsn")
    pgdata = pgdata.absolute()
    check_pgdata_target(pgdata)
    key = key_for_manifest(cfg, manifest)
    t0 = time.monotonic()
    verify_objects(repo, manifest)  # stored bytes intact before anything is written
    verify_seconds = time.monotonic() - t0
    created = not pgdata.exists()
    pgdata.mkdir(mode=0o700, exist_ok=True)
    pgdata.chmod(0o700)
    chown_tree(pgdata, cfg.postgres.os_user)
    # tar runs as ourselves (root can write where the server user may not traverse); the tree
    # is handed to postgres.os_user afterwards.
    tar = subprocess.Popen(
        ["tar", "-x", "-f", "-", "-C", str(pgdata), "--no-same-owner", "--no-same-permissions"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=child_env(),
    )
    raw_bytes = 0
    try:
        assert tar.stdin is not None
        try:
            # The stored SHA-256 of every object was verified above and is checked again as the
            # bytes stream; hashing 1+ GB of decoded data a second time would only slow the RTO.
            decoded = _object_stream(repo, manifest, key, raw_hash=False)
            for chunk in threaded(decoded, depth=4, name="restore"):
                tar.stdin.write(chunk)
                raw_bytes += len(chunk)
        except BrokenPipeError:
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                tar.stdin.close()
        code = tar.wait(timeout=600)
        err = tar.stderr.read() if tar.stderr else b""
        if code != 0:
            raise command_error(f"tar exited {code} extracting {manifest.id}: {tail(err)}")
    except BaseException:
        tar.kill()
        tar.wait()
        _empty_dir(pgdata)
        if created:
            shutil.rmtree(pgdata, ignore_errors=True)
        raise
    finally:
        if tar.stderr:
            tar.stderr.close()
    # pg_basebackup's tar leaves the server's own directories with its modes; the server
    # insists on 0700 for the data directory itself.
    pgdata.chmod(0o700)
    chown_tree(pgdata, cfg.postgres.os_user)
    return RestoreResult(manifest.id, str(pgdata), raw_bytes, time.monotonic() - t0, verify_seconds)


def set_port(pgdata: Path, port: int, os_user: str) -> None:
    """Give a restored cluster its own port (the source's is likely taken on this host)."""
    auto = pgdata / "postgresql.auto.conf"
    with open(auto, "a") as fh:
        fh.write(f"\n# gravl-dr restore\nport = {port}\n")
    chown_tree(auto, os_user)


def restore_logical(
    cfg: Config, repo: Repository, manifest: Manifest, dsn: str, jobs: int = 2,
    *, no_owner: bool = False, skip_missing_roles: bool = False,
) -> RestoreResult:
    """Decode and verify the dump into a temporary file, then pg_restore -j into an empty database."""
    if manifest.kind != "logical":
        raise PreconditionFailed(f"backup {manifest.id} is physical: restore it with --pgdata")
    if not is_empty_database(dsn):
        raise PreconditionFailed(f"target database {safe_dsn(dsn)} is not empty")
    key = key_for_manifest(cfg, manifest)
    t0 = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(prefix="gravl-restore-", suffix=".pgc")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in threaded(_object_stream(repo, manifest, key), depth=4, name="restore"):
                out.write(chunk)
        verify_seconds = time.monotonic() - t0
        if skip_missing_roles:
            # A drill restores into a fresh instance without the source's roles: statements that
            # need one (policies TO role, user mappings) fail; they are reported, not hidden.
            proc = run(
                [pg_bin("pg_restore", cfg.postgres.bindir), "-j", str(max(1, jobs)), "--no-password",
                 "--no-owner", "--no-privileges", "--no-tablespaces",
                 "-d", client_env(dsn).get("PGDATABASE", "postgres"), str(tmp)],
                timeout=24 * 3600, env=client_env(dsn), check=False,
            )
            roles, other = missing_role_errors(proc.stderr)
            if proc.returncode != 0 and (other or not roles):
                detail = other[0] if other else tail(proc.stderr)
                raise CommandFailed(f"pg_restore into {safe_dsn(dsn)} failed: {detail}")
            raw = sum(o.raw_size for o in manifest.objects)
            return RestoreResult(manifest.id, safe_dsn(dsn), raw, time.monotonic() - t0, verify_seconds,
                                 skipped=tuple(roles))
        try:
            run(
                [pg_bin("pg_restore", cfg.postgres.bindir), "-j", str(max(1, jobs)),
                 "--exit-on-error", "--no-password",
                 *(["--no-owner", "--no-privileges"] if no_owner else []),
                 "-d", client_env(dsn).get("PGDATABASE", "postgres"), str(tmp)],
                timeout=24 * 3600, env=client_env(dsn),
            )
        except CommandFailed as exc:
            raise type(exc)(f"pg_restore into {safe_dsn(dsn)} failed: {exc}") from None
    except DRError:
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    raw = sum(o.raw_size for o in manifest.objects)
    return RestoreResult(manifest.id, safe_dsn(dsn), raw, time.monotonic() - t0, verify_seconds)


__all__ = [
    "ChecksumMismatch", "RestoreResult", "check_pgdata_target", "restore_logical",
    "restore_physical", "set_port",
]
