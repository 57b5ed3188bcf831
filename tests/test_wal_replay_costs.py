"""What WAL replay from S3 costs per file, and how fast the prefetcher starts (issue 14).

A real prefetcher process against moto over HTTP through the fault proxy, which logs every
request; restore_command is the real fast-path script. Replay from S3 is bound by what each
file costs the store, the proxy and this process on a small machine, so each request counts:

- a prefetched segment costs one request, the GET of its key under the configured codec (there
  used to be a HEAD before it);
- a look-up that finds nothing (a history probe, the segment after the end of the archive)
  costs one listing, which also proves the bucket answers (there used to be a HEAD of the
  object, the listing, then a HEAD of the bucket);
- the prefetcher that PostgreSQL's first call starts loads the WAL commands' module only, not
  the CLI's parser with every command (the call waits for it).

The contract stays the same: a file archived under another codec is still found and delivered,
a listing that fails is never "not in the archive" (exit > 125), and what the prefetcher found
missing answers only a request made before its look-up began (tests/test_wal_ask.py).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from s3fault import S3FaultProxy
from test_wal_ask import Recovering, seg, segment_bytes

from tasks import walserve, walspool
from tasks.config import load_config
from tasks.walarchive import push_file
from tasks.walformat import WalSettings

pytestmark = pytest.mark.integration  # starts processes and servers


@pytest.fixture
def stopped(tmp_path: Path, s3_fault_proxy: S3FaultProxy, s3_bucket: str) -> Iterator[Recovering]:
    """A directory in recovery at segment 1, its prefetcher not started yet."""
    rec = Recovering(tmp_path, s3_fault_proxy.url, s3_bucket, start=False)
    # the proxy logs keys without their bucket: let a request of the previous test's killed
    # prefetcher, still in flight, land before this test's log starts
    time.sleep(0.3)
    s3_fault_proxy.log.clear()
    try:
        yield rec
    finally:
        rec.close()


def _about(proxy: S3FaultProxy, name: str) -> list[tuple[str, str]]:
    """(method, what) of every request that named ``name`` (in its key or its listing prefix)."""
    return [
        (method, "list" if "list-type" in query else key)
        for method, key, query, _outcome in list(proxy.log)
        if name in key or name in unquote(query)
    ]


def _bucket_heads(proxy: S3FaultProxy) -> int:
    return sum(1 for method, key, _q, _o in list(proxy.log) if method == "HEAD" and key == "")


def test_a_prefetched_segment_costs_one_get(stopped: Recovering, s3_fault_proxy: S3FaultProxy) -> None:
    # GIVEN segments 2 to 4 archived
    data = {seg(n): segment_bytes(seg(n)) for n in (2, 3, 4)}
    for name, raw in data.items():
        stopped.archive(name, raw)
    s3_fault_proxy.log.clear()
    # WHEN the prefetcher fetches them ahead of recovery
    stopped.start()
    for name in data:
        stopped.wait_for(stopped.folder / f"{name}{walserve.MARK_SUFFIX}")
    # THEN each cost one GET of its key, and no HEAD before it
    for name in data:
        assert _about(s3_fault_proxy, name) == [("GET", f"gravl/wal/00000001/{name}.zst")], s3_fault_proxy.log
    # AND recovery gets them whole
    for name, raw in data.items():
        rc, got, err = stopped.restore_command(name)
        assert rc == 0, err
        assert got == raw


def test_a_history_probe_costs_one_listing(stopped: Recovering, s3_fault_proxy: S3FaultProxy) -> None:
    # GIVEN a running prefetcher
    stopped.start()
    s3_fault_proxy.log.clear()
    # WHEN recovery probes for a history file that is not archived
    rc, got, err = stopped.restore_command("00000002.history")
    # THEN "not in the archive", from one listing (it proves the bucket answers: no HEAD of it)
    assert rc == 1, err
    assert got is None
    assert _about(s3_fault_proxy, "00000002.history") == [("GET", "list")], s3_fault_proxy.log
    assert _bucket_heads(s3_fault_proxy) == 0, s3_fault_proxy.log


def test_the_end_of_the_archive_costs_a_get_and_a_listing(
    stopped: Recovering, s3_fault_proxy: S3FaultProxy
) -> None:
    # WHEN the prefetcher looks ahead past the end of the archive (segment 2 is not archived)
    stopped.start()
    stopped.wait_for(stopped.folder / f"{seg(2)}{walserve.MISSING_SUFFIX}")
    # THEN it found that with the GET of the segment's key and one listing, no HEAD
    first = _about(s3_fault_proxy, seg(2))[:2]
    assert first == [("GET", f"gravl/wal/00000001/{seg(2)}.zst"), ("GET", "list")], _about(
        s3_fault_proxy, seg(2)
    )
    assert _bucket_heads(s3_fault_proxy) == 0, s3_fault_proxy.log
    # AND recovery's request for it is "not in the archive"
    rc, got, err = stopped.restore_command(seg(2))
    assert rc == 1, err
    assert got is None


def test_a_segment_archived_under_another_codec_is_delivered(
    stopped: Recovering, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN segment 2 archived with gzip (an earlier configuration), the config now says zstd
    name = seg(2)
    raw = segment_bytes(name)
    path = stopped.staging / name
    path.write_bytes(raw)
    push_file(stopped.repo, path, WalSettings(codec="gzip"))
    # WHEN the prefetcher fetches ahead and recovery asks for it
    stopped.start()
    stopped.wait_for(stopped.folder / f"{name}{walserve.MARK_SUFFIX}")
    rc, got, err = stopped.restore_command(name)
    # THEN the GET of the zstd key missed, the listing found the gzip one, and it is delivered
    assert rc == 0, err
    assert got == raw
    assert ("GET", f"gravl/wal/00000001/{name}.gz") in _about(s3_fault_proxy, name)


def test_a_listing_that_fails_after_a_missed_get_stops_recovery(
    stopped: Recovering, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN segment 2 is not archived and every listing fails
    s3_fault_proxy.add(
        "GET", "", query="list-type", action="error", status=500, code="InternalError", times=None
    )
    stopped.start()
    # WHEN recovery asks for segment 2
    rc, got, err = stopped.restore_command(seg(2))
    # THEN recovery stops (> 125): a GET that found nothing is not "not in the archive"
    assert rc > 125, err
    assert got is None
    assert not (stopped.folder / f"{seg(2)}{walserve.MISSING_SUFFIX}").exists()


def test_the_prefetcher_of_the_first_call_loads_only_the_wal_commands(
    stopped: Recovering, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a restored directory primed for prefetching as `gravl-dr restore` leaves it (the
    # first segment wanted, the repository's settings under this config version), no
    # prefetcher running (a plain `pg_ctl start`); the prefetcher's imports go to its log
    walspool.prime_prefetch(
        stopped.data, seg(2), str(stopped.config), load_config(str(stopped.config)).repository
    )
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    # WHEN PostgreSQL's first call probes for the next timeline's history file
    rc, _got, err = stopped.restore_command("00000002.history")
    # THEN the prefetcher it started answered
    assert rc == 1, err
    log = (walspool.spool_root(stopped.pg_wal) / walspool.PREFETCHER_LOG).read_text()
    assert "asked for 00000002.history: not in the archive" in log
    # AND it loaded the WAL commands' module, not the CLI's parser with every command, nor the
    # config model, nor Prefect (the call waited for all of it)
    assert re.search(r"\|\s+flows\.cli\.wal$", log, re.M), log[-3000:]
    for module in ("flows.cli.app", "flows.cli.backup", "tasks.config", "pydantic", "prefect"):
        assert not re.search(rf"\|\s+{re.escape(module)}(\.|$)", log, re.M), module


def test_settings_left_under_another_config_version_are_not_used(
    stopped: Recovering, s3_fault_proxy: S3FaultProxy
) -> None:
    # GIVEN the restore left the repository's settings, then the config file changed: the
    # bucket moved to another prefix (the old one holds history file 2, the new one does not)
    walspool.prime_prefetch(
        stopped.data, seg(2), str(stopped.config), load_config(str(stopped.config)).repository
    )
    stopped.archive("00000002.history", b"1\t0/5000000\tno recovery target specified\n")
    cfg = yaml.safe_load(stopped.config.read_text())
    url = cfg["repository"]["url"]
    cfg["repository"]["url"] = url[: url.rindex("/gravl")] + "/moved"
    stopped.config.write_text(yaml.safe_dump(cfg))
    s3_fault_proxy.log.clear()
    # WHEN PostgreSQL's first call probes for history file 2
    rc, got, err = stopped.restore_command("00000002.history")
    # THEN the answer comes from the config as it is now: not in the archive
    assert rc == 1, err
    assert got is None
    assert any("moved/wal/00000002" in unquote(r[2]) for r in s3_fault_proxy.log), s3_fault_proxy.log
    assert not any("gravl/wal/00000002" in unquote(r[2]) for r in s3_fault_proxy.log), s3_fault_proxy.log


@pytest.mark.usefixtures("prefect_harness")
def test_a_restored_directory_started_with_pg_ctl_replays_from_s3_with_a_lean_prefetcher(
    moto_endpoint: str, s3_bucket: str
) -> None:
    from drill_helpers import archive_backup_then_writes

    from flows.restore import restore_flow
    from gravl_testlib import write_config
    from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
    from tasks.postgres import connection

    base = make_private_dir("gravl-test-replay-costs-", "postgres")
    source = LocalCluster(base / "data", free_port(), dbname="gravl")
    config = write_config(
        base / "gravl-dr.yaml",
        {
            "cluster": "replay-costs",
            "primary": {"dsn": source.dsn()},
            "repository": {
                "url": f"s3://{s3_bucket}/gravl",
                "endpoint_url": moto_endpoint,
                "region": "eu-north-1",
            },
        },
    )
    chown_tree(base, "postgres")
    copy: LocalCluster | None = None
    try:
        # GIVEN a source archiving to S3, a backup, then writes archived after it
        backup, env = archive_backup_then_writes(source, config)
        # WHEN it is restored without --start, and the operator starts it with pg_ctl (the
        # prefetcher's imports go to its log)
        target = base / "restored"
        restore_flow(config_path=str(config), backup=backup.backup_id, pgdata=str(target))
        copy = LocalCluster(target, free_port(), dbname="gravl")
        copy.start(env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        deadline = time.monotonic() + 120
        while True:
            with connection(copy.dsn()) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row == (False,):
                break
            assert time.monotonic() < deadline, "not promoted"
            time.sleep(0.1)
        # THEN every row archived after the backup is there
        with connection(copy.dsn()) as conn, connection(source.dsn()) as src:
            query = "SELECT count(*) FROM workout_logs"
            assert conn.execute(query).fetchone() == src.execute(query).fetchone() == (250,)
        # AND PostgreSQL's first call was answered by a prefetcher that loaded neither the CLI's
        # parser nor the config model (the restore left the repository's settings)
        log = (target / "pg_wal" / "gravl-dr" / "prefetcher.log").read_text()
        assert "asked for 00000002.history: not in the archive" in log, log[-3000:]
        assert re.search(r"\|\s+flows\.cli\.wal$", log, re.M), log[-3000:]
        for module in ("flows.cli.app", "tasks.config", "pydantic"):
            assert not re.search(rf"\|\s+{re.escape(module)}(\.|$)", log, re.M), module
    finally:
        if copy is not None:
            copy.destroy()
        source.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_a_prefetcher_started_before_the_data_step_writes_nothing_while_it_waits(
    tmp_path: Path, s3_fault_proxy: S3FaultProxy, s3_bucket: str
) -> None:
    import os
    import subprocess

    from gravl_testlib import GRAVL_DR, write_config

    # GIVEN an empty target directory (the restore's data step has not run yet)
    data = tmp_path / "data"
    data.mkdir()
    config = write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 user=postgres"},
            "repository": {"url": f"s3://{s3_bucket}/gravl", "endpoint_url": s3_fault_proxy.url},
        },
    )
    out = tmp_path / "prefetcher.out"
    # WHEN `restore --start` starts the prefetcher early (tasks.recovery.spawn_early_prefetcher)
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [GRAVL_DR, "--config", str(config), "-v", "wal-fetch-daemon", str(data / "pg_wal")]
            + ["--await-recovery", "60", "--restore-pid", str(os.getpid())],
            stdout=fh,
            stderr=fh,
        )
    try:
        deadline = time.monotonic() + 60
        # THEN until it has its repository open and waits, and then, it writes nothing there (it
        # once cached the repository's settings in pg_wal: the restore found its target not empty)
        while "waits for the recovery settings" not in out.read_text():
            assert list(data.iterdir()) == []
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        assert list(data.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()
