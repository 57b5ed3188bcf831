"""Fixtures for failover/failback tests: a primary on 127.0.0.1 streaming to a standby on 127.0.0.2,
a Route 53 zone on the moto server, and a real BIND 9 accepting TSIG-signed dynamic updates."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gravl_testlib import wait_port, write_config
from tasks.config import Node
from tasks.pgcluster import LocalCluster, free_port, make_private_dir
from tasks.polling import poll_until
from tasks.topology import clone_standby, configure_standby

PG_USER = "postgres"
ZONE = "gravl.internal."
RECORD = "db.gravl.internal."
TSIG_ENV = "GRAVL_DR_TEST_TSIG_SECRET"
TSIG_KEY = "gravl-dr-test"


def sql(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    # The test clusters run with synchronous_commit=off; a test's own writes are durable on return.
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5, options="-c synchronous_commit=on") as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    def holds() -> bool:
        try:
            return check()
        except psycopg.Error:  # not up yet, or in recovery: ask again
            return False

    if not poll_until(holds, timeout=timeout, interval=0.05):
        raise AssertionError(f"timed out waiting for {what}")


def in_recovery(dsn: str) -> bool:
    return bool(sql(dsn, "SELECT pg_is_in_recovery()")[0][0])


@dataclass
class Pair:
    """Two real PostgreSQL 15 servers in streaming replication, on two loopback addresses."""

    home: LocalCluster
    standby: LocalCluster
    bases: list[Path] = field(default_factory=list)

    @property
    def home_node(self) -> Node:
        return Node(name="home", dsn=self.home.dsn(), pgdata=str(self.home.pgdata))

    @property
    def standby_node(self) -> Node:
        return Node(name="standby-1", dsn=self.standby.dsn(), pgdata=str(self.standby.pgdata))

    def config(self, repo_url: str, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "cluster": "gravl",
            "primary": self.home_node.model_dump(exclude_none=True),
            "replicas": [self.standby_node.model_dump(exclude_none=True)],
            "repository": {"url": repo_url},
        }
        data.update(extra)
        return data

    def write_config(self, tmp_path: Path, repo_url: str, **extra: Any) -> str:
        """The config file for this pair (``tmp_path/gravl-dr.yaml``), as a path string."""
        return str(write_config(tmp_path / "gravl-dr.yaml", self.config(repo_url, **extra)))

    def cut_off_standby(self) -> None:
        """Stop the standby's WAL receiver: what the primary commits from now on stays on the primary."""
        sql(self.standby.dsn(), "ALTER SYSTEM SET primary_conninfo = ''")
        sql(self.standby.dsn(), "SELECT pg_reload_conf()")
        wait_until(
            lambda: sql(self.standby.dsn(), "SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)],
            30,
            "WAL receiver stopped",
        )

    def insert(self, dsn: str, n: int, tag: str) -> None:
        sql(dsn, "INSERT INTO items (tag, n) SELECT %s, g FROM generate_series(1, %s) g", (tag, n))

    def rows(self, dsn: str) -> list[tuple[Any, ...]]:
        return sql(dsn, "SELECT tag, n FROM items ORDER BY tag, n")

    def wait_replayed(self, primary: LocalCluster, standby: LocalCluster, timeout: float = 30) -> None:
        target = sql(primary.dsn(), "SELECT pg_current_wal_insert_lsn()")[0][0]
        wait_until(
            lambda: bool(
                sql(standby.dsn(), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),))[0][0]
            ),
            timeout,
            "standby replay",
        )

    def kill_home(self) -> None:
        pid = self.home.postmaster_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10, "postmaster death")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture
def pg_pair() -> Iterator[Callable[..., Pair]]:
    """make(wal_log_hints=True): a fresh primary (127.0.0.1) + standby (127.0.0.2) with table items."""
    made: list[Pair] = []

    def make(wal_log_hints: bool = True) -> Pair:
        base_home = make_private_dir("gravl-fo-home-", PG_USER)
        home = LocalCluster(base_home / "data", free_port("127.0.0.1"), host="127.0.0.1", dbname="gravl")
        pair = Pair(home=home, standby=LocalCluster(Path("/nonexistent"), 0), bases=[base_home])
        made.append(pair)
        home.initdb(extra_conf={"wal_log_hints": "on" if wal_log_hints else "off"})
        home.start()
        sql(home.dsn("postgres"), "CREATE DATABASE gravl")
        sql(home.dsn(), "CREATE TABLE items (id bigserial PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
        base_sb = make_private_dir("gravl-fo-standby-", PG_USER)
        pair.bases.append(base_sb)
        standby = LocalCluster(base_sb / "data", free_port("127.0.0.2"), host="127.0.0.2", dbname="gravl")
        pair.standby = standby
        clone_standby(pair.home_node, standby.pgdata, os_user=PG_USER)
        # The clone carries the primary's postgresql.conf: give the standby its own address and port.
        standby.append_conf({"listen_addresses": "'127.0.0.2'", "port": str(standby.port)})
        configure_standby(standby.pgdata, pair.home_node, "standby-1", os_user=PG_USER)
        standby.start()
        wait_until(
            lambda: sql(standby.dsn(), "SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
            30,
            "streaming",
        )
        return pair

    yield make
    for pair in made:
        for cluster in (pair.home, pair.standby):
            if cluster.port:
                cluster.destroy()
        for base in pair.bases:
            shutil.rmtree(base, ignore_errors=True)
            for aside in base.parent.glob(base.name + "*"):
                shutil.rmtree(aside, ignore_errors=True)


@pytest.fixture
def route53_dns(moto_endpoint: str) -> dict[str, Any]:
    """A fresh Route 53 hosted zone on the moto server with db.gravl.internal. A 127.0.0.1."""
    import boto3

    client = boto3.client("route53", endpoint_url=moto_endpoint, region_name="us-east-1")
    zone_id = client.create_hosted_zone(Name=ZONE, CallerReference=uuid.uuid4().hex)["HostedZone"]["Id"]
    client.change_resource_record_sets(
        HostedZoneId=zone_id,
        ChangeBatch={
            "Changes": [
                {
                    "Action": "UPSERT",
                    "ResourceRecordSet": {
                        "Name": RECORD,
                        "Type": "A",
                        "TTL": 30,
                        "ResourceRecords": [{"Value": "127.0.0.1"}],
                    },
                }
            ]
        },
    )
    return {
        "provider": "route53",
        "zone_id": zone_id,
        "record": RECORD,
        "ttl": 30,
        "endpoint_url": moto_endpoint,
        "region": "us-east-1",
    }


def route53_values(dns: dict[str, Any]) -> list[str]:
    import boto3

    client = boto3.client("route53", endpoint_url=dns["endpoint_url"], region_name="us-east-1")
    sets = client.list_resource_record_sets(HostedZoneId=dns["zone_id"])["ResourceRecordSets"]
    return [
        r["Value"] for s in sets if s["Name"] == RECORD and s["Type"] == "A" for r in s["ResourceRecords"]
    ]


@dataclass
class BindServer:
    port: int
    directory: Path
    secret: str
    proc: subprocess.Popen[bytes]

    def query(self, name: str = RECORD) -> list[str]:
        import dns.message
        import dns.query

        resp = dns.query.tcp(dns.message.make_query(name, "A"), "127.0.0.1", port=self.port, timeout=3)
        return sorted(r.to_text() for rrset in resp.answer for r in rrset)

    def set_record(self, value: str) -> None:
        """Unconditional TSIG update (test set-up), independent of the code under test."""
        import dns.name
        import dns.query
        import dns.tsigkeyring
        import dns.update

        keyring = dns.tsigkeyring.from_text({TSIG_KEY: self.secret})
        upd = dns.update.UpdateMessage(
            ZONE, keyring=keyring, keyname=dns.name.from_text(TSIG_KEY), keyalgorithm="hmac-sha256."
        )
        upd.replace(RECORD, 30, "A", value)
        resp = dns.query.tcp(upd, "127.0.0.1", port=self.port, timeout=3)
        assert resp.rcode() == 0, resp


@pytest.fixture(scope="session")
def bind_server() -> Iterator[BindServer]:
    """BIND 9 (`named -g`) on a loopback port: zone gravl.internal., updates allowed with a TSIG key."""
    named = shutil.which("named") or "/usr/sbin/named"
    keygen = shutil.which("tsig-keygen") or "/usr/sbin/tsig-keygen"
    directory = Path(tempfile.mkdtemp(prefix="gravl-test-bind-", dir="/tmp"))
    keyconf = subprocess.run(
        [keygen, "-a", "hmac-sha256", TSIG_KEY], capture_output=True, text=True, check=True
    ).stdout
    secret = keyconf.split('secret "', 1)[1].split('"', 1)[0]
    (directory / "key.conf").write_text(keyconf)
    (directory / "db.zone").write_text(
        f"$TTL 30\n@ IN SOA ns.{ZONE} admin.{ZONE} 1 60 60 600 30\n@ IN NS ns.{ZONE}\n"
        "ns IN A 127.0.0.1\ndb IN A 127.0.0.1\n"
    )
    port = free_port()
    (directory / "named.conf").write_text(f"""
include "{directory}/key.conf";
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    session-keyfile "{directory}/session.key";
    managed-keys-directory "{directory}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
}};
controls {{ }};
zone "{ZONE.rstrip(".")}" {{
    type primary;
    file "{directory}/db.zone";
    update-policy {{ grant {TSIG_KEY} zonesub ANY; }};
}};
""")
    # When root, named keeps running as root without -u; the zone directory must be writable for
    # its journal either way.
    log = open(directory / "named.log", "wb")
    proc = subprocess.Popen(
        [named, "-g", "-c", str(directory / "named.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_port("127.0.0.1", port, "named")
        server = BindServer(port=port, directory=directory, secret=secret, proc=proc)
        # named listens before its zones are loaded (and answers SERVFAIL until then)
        if not poll_until(lambda: server.query() == ["127.0.0.1"], timeout=20, interval=0.05):
            raise RuntimeError(f"named did not load the zone: {(directory / 'named.log').read_text()[-500:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def bind_dns(bind_server: BindServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """DNS config for the BIND server, the record reset to 127.0.0.1 and the TSIG secret in the env."""
    bind_server.set_record("127.0.0.1")
    monkeypatch.setenv(TSIG_ENV, bind_server.secret)
    return {
        "provider": "rfc2136",
        "server": "127.0.0.1",
        "port": bind_server.port,
        "zone": ZONE,
        "record": RECORD,
        "ttl": 30,
        "key_name": TSIG_KEY,
        "key_env": TSIG_ENV,
        "key_algorithm": "hmac-sha256",
    }


def wrong_secret() -> str:
    return base64.b64encode(b"not-the-key-" * 3).decode()
