"""The backup flow's metrics reach a real Pushgateway, on success and on failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import pushgateway_metrics
from prometheus_client.parser import text_string_to_metric_families

from flows.backup import backup_flow
from tasks.errors import DRError
from tasks.pgcluster import free_port

pytestmark = pytest.mark.usefixtures("prefect_harness")

SUCCESS_METRICS = {
    "gravl_backup_last_success_timestamp_seconds",
    "gravl_backup_duration_seconds",
    "gravl_backup_raw_bytes",
    "gravl_backup_stored_bytes",
    "gravl_backup_stream_seconds",
}


def scrape(gateway: str, cluster: str) -> dict[tuple[str, str], float]:
    """{(metric, kind): value} for the job=backup group of one cluster on the Pushgateway."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(pushgateway_metrics(gateway)):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("job") == "backup" and labels.get("cluster") == cluster:
                found[(sample.name, labels.get("kind", ""))] = sample.value
    return found


def test_successful_backup_pushes_its_metrics(
    pushgateway: str, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a config with a Pushgateway
    cfg = make_config(file_repo_url, cluster="metrics-ok", metrics={"pushgateway": pushgateway})
    t0 = time.time()
    # WHEN a physical backup succeeds
    report = backup_flow(config_path=str(cfg), kind="physical")
    # THEN every success metric is there, grouped by job, cluster and kind, with the report's values
    got = scrape(pushgateway, "metrics-ok")
    assert {name for name, kind in got if kind == "physical"} >= SUCCESS_METRICS
    assert t0 <= got[("gravl_backup_last_success_timestamp_seconds", "physical")] <= time.time()
    assert got[("gravl_backup_raw_bytes", "physical")] == report.raw_bytes > 0
    assert got[("gravl_backup_stored_bytes", "physical")] == report.stored_bytes > 0
    assert (
        0
        < got[("gravl_backup_stream_seconds", "physical")]
        <= got[("gravl_backup_duration_seconds", "physical")]
    )
    assert ("gravl_backup_last_failure_timestamp_seconds", "physical") not in got


def test_failed_backup_pushes_a_failure_timestamp_and_keeps_the_last_success(
    pushgateway: str,
    make_config: Callable[..., Path],
    file_repo_url: str,
    s3_bucket: str,
    moto_endpoint: str,
) -> None:
    # GIVEN a successful logical backup of cluster "metrics-fail" ...
    good = make_config(
        file_repo_url, name="good.yaml", cluster="metrics-fail", metrics={"pushgateway": pushgateway}
    )
    backup_flow(config_path=str(good), kind="logical")
    success = scrape(pushgateway, "metrics-fail")[("gravl_backup_last_success_timestamp_seconds", "logical")]
    # ... then one whose repository is a bucket that does not exist. (A permanent error: an
    # unreachable server is transient and costs the preflight's 12 s of retry back-off, for the
    # same code path: the failure push in the flow's exception handler.)
    bad = make_config(
        f"s3://{s3_bucket}-missing/gravl",
        moto=moto_endpoint,
        name="bad.yaml",
        cluster="metrics-fail",
        metrics={"pushgateway": pushgateway},
    )
    t0 = time.time()
    # WHEN
    with pytest.raises(DRError, match="does not exist"):
        backup_flow(config_path=str(bad), kind="logical")
    # THEN the failure time is pushed next to the untouched last success
    got = scrape(pushgateway, "metrics-fail")
    assert t0 <= got[("gravl_backup_last_failure_timestamp_seconds", "logical")] <= time.time()
    assert got[("gravl_backup_last_success_timestamp_seconds", "logical")] == success


def test_backup_succeeds_when_the_pushgateway_is_down(
    make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a Pushgateway address where nothing listens
    cfg = make_config(
        file_repo_url, cluster="metrics-nogw", metrics={"pushgateway": f"http://127.0.0.1:{free_port()}"}
    )
    # WHEN / THEN metrics are best effort: the backup itself succeeds
    report = backup_flow(config_path=str(cfg), kind="logical")
    assert report.stored_bytes > 0
