"""Restore drills of the production-shaped cluster (tests/prodshape.py): no false alarms on good
backups taken as a superuser and as the least-privilege role of infra/postgres/roles.sql while
pgbench writes, and a failed drill naming the object for each injected fault."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prodshape import ProdCluster

from flows.backup import backup_flow
from flows.drill import run_drill
from tasks.drill import DrillReport

pytestmark = pytest.mark.usefixtures("prefect_harness")


@dataclass
class Backups:
    prod: ProdCluster
    config_su: Path
    config_lp: Path
    physical_su: str
    physical_lp: str
    logical_su: str
    logical_lp: str


@pytest.fixture(scope="module")
def backups(prefect_harness: None, prod_cluster: ProdCluster) -> Iterator[Backups]:
    """Physical and logical backups of the production-shaped cluster, as postgres and as gravl_dr,
    each taken while pgbench writes."""
    prod = prod_cluster
    su = prod.config(user="postgres")
    lp = prod.config(user="gravl_dr")
    ids = {}
    for name, config, kind in (("physical_su", su, "physical"), ("physical_lp", lp, "physical"),
                               ("logical_su", su, "logical"), ("logical_lp", lp, "logical")):
        with prod.writes(rate=150):
            ids[name] = backup_flow(config_path=str(config), kind=kind).backup_id
    prod.switch_and_wait()
    yield Backups(prod, su, lp, **ids)


def _summary(report: DrillReport) -> str:
    return "\n".join(f"{c.name}: {c.summary}" for c in report.checks if c.failed) + (report.error or "")


@pytest.mark.parametrize("which", ["physical_su", "physical_lp", "logical_su", "logical_lp"])
def test_drill_of_the_production_shaped_cluster_passes(backups: Backups, which: str) -> None:
    config = backups.config_lp if which.endswith("_lp") else backups.config_su
    report = run_drill(str(config), backup=getattr(backups, which))
    assert report.passed, _summary(report)


def test_default_suite_quotes_every_identifier(prod_cluster: ProdCluster) -> None:
    # GIVEN mixed-case, spaced, reserved and non-ASCII names in a UTF8 and a LATIN1 database
    from datetime import UTC, datetime

    from tasks import expectations as gx

    specs = []
    for db in ("shop", "legacy"):
        catalog = gx.read_catalog(prod_cluster.dsn(db))
        db_specs, _ = gx.plan_default(db, catalog, expected_counts=None, count_mode="skip", tolerance=0,
                                      reference=datetime.now(UTC), max_age_seconds=10**9)
        specs += db_specs
    # WHEN the default suite runs on them
    results = gx.run_expectations(gx.unique_names(specs), lambda db: prod_cluster.dsn(db))
    # THEN every check ran and passed: no "relation public.user does not exist"
    names = {r.name for r in results}
    assert {"primary-key shop.public.User(id)", "primary-key legacy.public.Kunden(id)",
            "fk-orphans shop.Sales.Order Items(orderId)->Sales.Order"} <= names
    assert [(r.name, r.summary) for r in results if r.failed] == []
