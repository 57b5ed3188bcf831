"""Unit tier: the metrics catalog (tasks/metrics.py) is the one list of ``gravl_*`` names — the
flows push only its names, every name in it is pushed by some flow, and the README's table is it."""

from __future__ import annotations

import re

import pytest

from gravl_testlib import REPO_ROOT
from tasks.metrics import CATALOG, catalog_table, check_push, outcome_metric, push_metrics

pytestmark = pytest.mark.unit

NAME = re.compile(r"^gravl_[a-z0-9]+(_[a-z0-9]+)*$")


def flow_sources() -> str:
    return "\n".join(p.read_text() for p in sorted((REPO_ROOT / "flows").rglob("*.py")))


def test_every_name_is_a_prometheus_name_with_a_help_text_and_a_job() -> None:
    for name, metric in CATALOG.items():
        assert NAME.match(name) and metric.name == name
        assert metric.help and metric.jobs and "cluster" in metric.labels, name


def test_every_catalog_metric_is_pushed_by_some_flow() -> None:
    source = flow_sources()
    literals = set(re.findall(r"""["'](gravl_[a-z0-9_]+)["']""", source))
    # failover and failback push their last-outcome timestamps through outcome_metric(job, outcome),
    # from the report of each run (flows/failover.py's _finish, which both flows end with)
    finish = (REPO_ROOT / "flows" / "failover.py").read_text()
    assert all(f'outcome_metric(job, "{what}")' in finish for what in ("success", "failure", "refusal"))
    assert '_finish(cfg, report, key, "failback"' in source
    outcomes = {
        outcome_metric(job, what)
        for job in ("failover", "failback")
        for what in ("success", "failure", "refusal")
    }
    never = sorted(set(CATALOG) - literals - outcomes)
    assert never == [], "in the catalog but pushed by no flow"


def test_every_metric_a_flow_names_is_in_the_catalog() -> None:
    named = set(re.findall(r"""["'](gravl_[a-z0-9_]+)["']""", flow_sources())) - {"gravl_dr"}
    assert sorted(named - set(CATALOG)) == []


def test_the_readme_metrics_table_is_the_catalog() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "\n".join(catalog_table()) + "\n" in readme, "README's metrics table differs from tasks/metrics.py"
    documented = set(re.findall(r"`(gravl_[a-z0-9_]+)`", readme))
    assert documented <= set(CATALOG), "the README names a metric outside the catalog"


def test_outcome_metric_names_the_catalog_entry_or_refuses() -> None:
    assert outcome_metric("failover", "refusal") == "gravl_failover_last_refusal_timestamp_seconds"
    with pytest.raises(ValueError, match="no metric"):
        outcome_metric("backup", "refusal")


@pytest.mark.parametrize(
    ("job", "grouping", "name", "message"),
    [
        ("backup", {"cluster": "c", "kind": "physical"}, "gravl_backup_raw_byte", "not in the catalog"),
        ("drill", {"cluster": "c", "kind": "physical"}, "gravl_backup_raw_bytes", "not by job drill"),
        ("backup", {"cluster": "c"}, "gravl_backup_raw_bytes", "grouped by cluster, kind"),
        ("wal-check", {"cluster": "c"}, "gravl_replication_lag_bytes", "grouped by cluster, replica"),
    ],
)
def test_a_push_outside_the_catalog_is_refused_before_any_gateway_is_asked(
    job: str, grouping: dict[str, str], name: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_push(job, grouping, [name])
    # no gateway configured: still refused, so every flow test checks its names
    with pytest.raises(ValueError, match=message):
        push_metrics(None, job, grouping, {name: 1.0})


def test_a_push_in_the_catalog_without_a_gateway_does_nothing() -> None:
    assert push_metrics(None, "wal-check", {"cluster": "c"}, {"gravl_split_brain": 0.0}) is False
    assert push_metrics(None, "backup", {"cluster": "c"}, {"gravl_split_brain": 1.0}) is False
