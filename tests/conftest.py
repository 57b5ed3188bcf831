"""Session fixtures: real PostgreSQL 15 clusters, one moto server, a Pushgateway, Prefect harness."""

from __future__ import annotations

import os

from flows.prefect_env import apply_prefect_defaults

# Before anything imports Prefect (STACK.md): the CLI's defaults — no telemetry, patient ephemeral start-up.
apply_prefect_defaults()
# A warm process someone runs on this machine (`gravl-dr warm`) must not serve the suite's CLI
# runs; tests/test_warm.py turns it back on for its own.
os.environ["GRAVL_DR_NO_WARM"] = "1"
# moto and boto3: fake credentials, never a real account.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
os.environ["AWS_DEFAULT_REGION"] = "eu-north-1"

import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from gravl_testlib import wait_port  # noqa: E402
from tasks.pgcluster import LocalCluster, free_port, make_private_dir  # noqa: E402
from tasks.sample import create_database, load_sample  # noqa: E402

PG_USER = "postgres"

# Fixture plugins kept next to the features that use them.
pytest_plugins = ["conftest_failover", "s3fault", "conftest_prodshape"]


# Two tiers (STYLE.md): a test is `integration` when it asks for any fixture outside this set
# (every fixture that starts a server, a cluster, moto or Prefect is outside it), `unit` otherwise.
# A test that starts something by itself (a CLI subprocess, say) carries `@pytest.mark.integration`.
UNIT_FIXTURES = frozenset(
    {
        "tmp_path",
        "tmp_path_factory",
        "tmpdir",
        "tmpdir_factory",
        "monkeypatch",
        "capsys",
        "capfd",
        "capsysbinary",
        "capfdbinary",
        "caplog",
        "recwarn",
        "request",
        "pytestconfig",
        "cache",
        "record_property",
        "record_testsuite_property",
        "record_xml_attribute",
        "doctest_namespace",
        "file_repo_dir",
        "file_repo_url",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("integration"):
            continue
        callspec = getattr(item, "callspec", None)
        params = set(callspec.params) if callspec is not None else set()
        fixtures = set(getattr(item, "fixturenames", ())) - params
        tier = "integration" if fixtures - UNIT_FIXTURES else "unit"
        item.add_marker(getattr(pytest.mark, tier))


def _new_cluster(prefix: str, **initdb: Any) -> LocalCluster:
    base = make_private_dir(prefix, PG_USER)
    cluster = LocalCluster(base / "data", free_port())
    cluster.initdb(**initdb)
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def pg_primary() -> Iterator[LocalCluster]:
    """A PostgreSQL 15 cluster with the Gravl sample database `gravl` (treat as read-only)."""
    cluster = _new_cluster("gravl-test-primary-")
    cluster.dbname = "gravl"
    create_database(cluster.dsn("postgres"), "gravl")
    load_sample(cluster.dsn())
    yield cluster
    cluster.destroy()
    shutil.rmtree(cluster.pgdata.parent, ignore_errors=True)


@pytest.fixture
def cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    """Make throwaway clusters for one test; all are destroyed afterwards."""
    made: list[LocalCluster] = []

    def make(prefix: str = "gravl-test-", **initdb: Any) -> LocalCluster:
        cluster = _new_cluster(prefix, **initdb)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.destroy()
        shutil.rmtree(cluster.pgdata.parent, ignore_errors=True)


@pytest.fixture
def pg_dir() -> Iterator[Path]:
    """An empty directory the postgres user can write (pytest's tmp_path is root-only)."""
    path = make_private_dir("gravl-test-dir-", PG_USER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server over HTTP on 127.0.0.1 for S3 and Route 53."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    import boto3

    name = f"gravl-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="eu-north-1").create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-north-1"}
    )
    return name


@pytest.fixture
def file_repo_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gravl-test-repo-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def file_repo_url(file_repo_dir: Path) -> str:
    return f"file://{file_repo_dir}"


@pytest.fixture
def s3_repo_url(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/gravl"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test harness for the whole session (starting one costs 10-15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[str]:
    """A real Pushgateway (Debian's prometheus-pushgateway) on a loopback port."""
    binary = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port, "the Pushgateway")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def pushgateway_metrics(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.fixture
def make_config(tmp_path: Path, pg_primary: LocalCluster) -> Callable[..., Path]:
    """Write a config file for the session primary and a repository; keys can be overridden."""
    from gravl_testlib import write_config

    def make(
        repo_url: str, *, moto: str | None = None, name: str = "gravl-dr.yaml", **overrides: Any
    ) -> Path:
        repository: dict[str, Any] = {"url": repo_url}
        if repo_url.startswith("s3://"):
            repository.update({"endpoint_url": moto, "region": "eu-north-1", "part_size_mb": 5})
        repository.update(overrides.pop("repository", {}))
        data: dict[str, Any] = {
            "cluster": "gravl",
            "primary": {"dsn": pg_primary.dsn()},
            "repository": repository,
        }
        data.update(overrides)
        return write_config(tmp_path / name, data)

    return make
