"""The drill's pure parts (planning, suites, tokens, report) and the sweep of killed drills."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from drill_helpers import REPO_ROOT, leftovers

from tasks.config import parse_config
from tasks.drill import (
    OWNER_FILE,
    CheckResult,
    DrillReport,
    provision_instance,
    render_markdown,
    sweep_abandoned,
)
from tasks.errors import ConfigError
from tasks.expectations import (
    Catalog,
    ForeignKey,
    gx_class_name,
    load_suites,
    plan_default,
    plan_suite,
    resolve_tokens,
    row_count_bounds,
    validate_suites,
)
from tasks.pgcluster import make_private_dir

NOW = datetime(2026, 11, 24, 3, 0, tzinfo=UTC)
REF = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expected", "tolerance", "bounds"),
    [
        (1000, 0.01, (990, 1010)),
        (5, 0.01, (4, 6)),  # any tolerance allows at least one row either way
        (0, 0.01, (0, 0)),  # an empty table must stay empty
        (1000, 0.0, (1000, 1000)),
    ],
)
def test_row_count_bounds(expected: int, tolerance: float, bounds: tuple[int, int]) -> None:
    assert row_count_bounds(expected, tolerance) == bounds


@pytest.mark.parametrize(
    ("token", "value"),
    [
        ("$now", NOW),
        ("$reference", REF),
        ("$reference-1d", REF - timedelta(days=1)),
        ("$now+5m", NOW + timedelta(minutes=5)),
        ("$now - 30", NOW - timedelta(seconds=30)),
        ("now", "now"),
        (42, 42),
    ],
)
def test_tokens_resolve_to_datetimes(token: object, value: object) -> None:
    assert resolve_tokens(token, NOW, REF) == value


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("expect_column_values_to_be_between", "ExpectColumnValuesToBeBetween"),
        ("ExpectTableRowCountToEqual", "ExpectTableRowCountToEqual"),
        ("unexpected_rows", "UnexpectedRowsExpectation"),
    ],
)
def test_gx_class_names(kind: str, cls: str) -> None:
    assert gx_class_name(kind) == cls


def _catalog() -> Catalog:
    return Catalog(
        tables=[("public", "users"), ("public", "logs")],
        primary_keys={("public", "users"): ["id"], ("public", "logs"): ["user_id", "n"]},
        foreign_keys=[ForeignKey("logs_user_fk", "public", "logs", ("user_id",), "public", "users", ("id",))],
        time_columns={("public", "logs"): ["at"]},
    )


def test_default_plan_covers_counts_keys_references_and_freshness() -> None:
    specs, decided = plan_default(
        "app",
        _catalog(),
        expected_counts={"public.users": 10, "public.logs": 100, "public.gone": 5},
        count_mode="tolerance",
        tolerance=0.1,
        reference=REF,
        max_age_seconds=3600,
    )
    by_name = {s.check: s for s in specs}
    assert by_name["row-count app.public.logs"].kwargs == {"min_value": 90, "max_value": 110}
    pk = by_name["primary-key app.public.logs(user_id,n)"].kwargs["unexpected_rows_query"]
    assert 'GROUP BY x."user_id", x."n" HAVING count(*) > 1 OR x."user_id" IS NULL OR x."n" IS NULL' in pk
    assert "primary-key app.public.users(id)" in by_name
    fk = by_name["fk-orphans app.public.logs(user_id)->public.users"]
    assert (
        "{batch}" in fk.kwargs["unexpected_rows_query"]
        and 'p."id" = x."user_id"' in fk.kwargs["unexpected_rows_query"]
    )
    assert (REF - timedelta(hours=1)).isoformat() in by_name["freshness app"].kwargs["unexpected_rows_query"]
    # a table the manifest lists that is not restored fails without running anything
    assert [(c.name, c.status) for c in decided] == [("row-count app.public.gone", "failed")]


def test_row_counts_that_do_not_apply_are_reported_skipped_with_the_reason() -> None:
    specs, decided = plan_default(
        "app",
        _catalog(),
        expected_counts={"public.users": 10},
        count_mode="skip",
        tolerance=0.01,
        reference=REF,
        max_age_seconds=60,
        skip_reason="past the backup",
    )
    assert not [s for s in specs if s.kind == "row-count"]
    assert [(c.name, c.status, c.summary) for c in decided] == [
        ("row-count app", "skipped", "past the backup")
    ]


def test_identifiers_are_quoted_and_braces_escaped_in_generated_queries() -> None:
    cat = Catalog(tables=[("s", 'we"ird{x}')], time_columns={("s", 'we"ird{x}'): ["t"]})
    cat.tables.append(("s", "other"))
    cat.time_columns[("s", "other")] = ["t"]
    specs, _ = plan_default(
        "db", cat, expected_counts=None, count_mode="exact", tolerance=0, reference=REF, max_age_seconds=1
    )
    query = specs[-1].kwargs["unexpected_rows_query"]
    # "other" sorts first and is read through GX's {batch}; the odd name is quoted and its braces
    # doubled so that GX's str.format leaves them alone
    assert "FROM (SELECT * FROM {batch}) AS x" in query and 'FROM "s"."we""ird{{x}}" AS x' in query


@pytest.mark.integration  # loads Great Expectations' expectation classes: seconds of import
def test_shipped_gravl_suite_is_valid_and_applies_to_a_gravl_database() -> None:
    suites = load_suites(REPO_ROOT / "expectations")
    validate_suites(suites, NOW)
    gravl = next(s for s in suites if s.name == "gravl")
    tables = [
        ("public", t)
        for t in (
            "users",
            "workouts",
            "workout_logs",
            "workout_swaps",
            "muscle_group_recovery",
            "custom_workouts",
            "custom_workout_exercises",
        )
    ]
    specs, decided = plan_suite(
        gravl, {"gravl": Catalog(tables=tables), "postgres": Catalog()}, now=NOW, reference=REF
    )
    assert not decided and {s.database for s in specs} == {"gravl"}
    future = next(s for s in specs if s.check.endswith("completed_at never in the future"))
    assert future.kwargs["max_value"] == NOW + timedelta(minutes=5)


def test_a_suite_for_tables_no_database_has_is_skipped_not_failed() -> None:
    gravl = next(s for s in load_suites(REPO_ROOT / "expectations") if s.name == "gravl")
    specs, decided = plan_suite(gravl, {"postgres": Catalog()}, now=NOW, reference=REF)
    assert specs == [] and [c.status for c in decided] == ["skipped"]


@pytest.mark.integration  # loads Great Expectations' expectation classes: seconds of import
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "tables: {public.t: [{type: expect_column_values_to_be_frobbed, column: a}]}",
            "unknown expectation type",
        ),
        ("tables: {public.t: [{type: expect_column_values_to_be_between, min_value: 1}]}", "invalid"),
        ("tables: {public.t: [{column: a}]}", "needs a 'type'"),
        ("tablez: {}", "unknown key 'tablez'"),
        ("tables: [oops", "not valid YAML"),
    ],
)
def test_a_bad_suite_is_rejected_before_any_restore_naming_the_file(content: str, message: str) -> None:
    folder = make_private_dir("gravl-test-suites-", "root")
    try:
        (folder / "bad.yaml").write_text(content)
        with pytest.raises(ConfigError, match=message) as err:
            validate_suites(load_suites(folder), NOW)
        assert "bad.yaml" in str(err.value)
    finally:
        shutil.rmtree(folder)


def test_markdown_report_names_failing_checks_and_their_samples() -> None:
    report = DrillReport(
        drill_id="20261124T030000Z-abcd",
        cluster="gravl",
        backup_id="b",
        backup_kind="physical",
        started_at=NOW,
        rto_seconds=12.5,
        rpo_seconds=3600,
        checks=[
            CheckResult(
                name="amcheck gravl",
                kind="amcheck",
                category="integrity",
                status="failed",
                summary="1 of 3 btree indexes corrupt",
                samples=[{"index": "public.i", "error": "zero page"}],
            ),
            CheckResult(
                name="usability gravl", kind="usability", category="usability", status="passed", summary="ok"
            ),
        ],
    )
    text = render_markdown(report)
    assert "FAILED" in text and "| amcheck gravl | **FAILED** |" in text and "zero page" in text
    assert "12.5 s" in text and "1.0 h" in text and "What to do next" in text
    assert report.verdict() == "drill 20261124T030000Z-abcd FAILED: amcheck gravl"


@pytest.mark.integration  # starts a process
def test_an_instance_whose_drill_was_killed_is_swept_by_the_next_drill() -> None:
    # GIVEN a running drill instance whose owning process is gone (killed with SIGKILL)
    base = make_private_dir("gravl-test-drill-sweep-", "postgres")
    try:
        cfg = parse_config(
            {
                "primary": {"dsn": "host=127.0.0.1 user=postgres"},
                "repository": {"url": "file:///nonexistent"},
                "drill": {"work_dir": str(base)},
            }
        )
        instance = provision_instance(cfg, "20261124T030000Z-dead")
        cluster = instance.cluster()
        cluster.initdb()
        cluster.start()
        dead = subprocess.Popen(["true"])
        dead.wait()
        owner = json.loads((Path(instance.workdir) / OWNER_FILE).read_text())
        owner["pid"] = dead.pid
        (Path(instance.workdir) / OWNER_FILE).write_text(json.dumps(owner))
        assert leftovers(instance.drill_id)["processes"]
        # WHEN the next drill provisions its instance
        other = provision_instance(cfg, "20261124T030001Z-next")
        # THEN the abandoned server is stopped and its directory removed; the new one is untouched
        assert leftovers(instance.drill_id) == {"dirs": [], "processes": []}
        assert Path(other.workdir).is_dir()
        assert sweep_abandoned(str(base)) == 0  # the live owner's instance is kept
    finally:
        shutil.rmtree(base, ignore_errors=True)
