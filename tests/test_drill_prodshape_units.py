"""Pure parts of the drill's production-shape fixes: where counts are compared, amcheck error
classes, unlogged and recorded-fact planning, per-database coverage, pg_restore role errors."""

from __future__ import annotations

from typing import TypedDict

import pytest

from tasks.drill import (
    CheckResult,
    CountPoint,
    DrillReport,
    coverage,
    logical_scope_notes,
    plan_count_point,
    render_markdown,
)
from tasks.expectations import Catalog, plan_recorded_facts, plan_unlogged
from tasks.integrity import _INDEX_QUERY, is_corruption
from tasks.restore import missing_role_errors


class _PointArgs(TypedDict, total=False):
    kind: str
    counts_lsn: str | None
    target_kind: str
    target_lsn_at_or_after: bool
    lsn_reachable: bool
    may_pass_backup: bool


def _point(
    *,
    kind: str = "physical",
    counts_lsn: str | None = "0/7000100",
    target_kind: str = "end",
    target_lsn_at_or_after: bool = False,
    lsn_reachable: bool = True,
    may_pass_backup: bool = True,
) -> CountPoint:
    return plan_count_point(
        kind=kind,
        has_counts=True,
        counts_lsn=counts_lsn,
        target_kind=target_kind,
        target_lsn_at_or_after=target_lsn_at_or_after,
        lsn_reachable=lsn_reachable,
        may_pass_backup=may_pass_backup,
    )


def test_counts_are_exact_at_their_lsn_when_the_archive_reaches_it() -> None:
    p = _point()
    assert (p.where, p.mode, p.reason) == ("lsn", "exact", "")


@pytest.mark.parametrize(
    ("kw", "where", "needle"),
    [
        ({"lsn_reachable": False}, "consistent", "not in the archive"),
        ({"lsn_reachable": False, "may_pass_backup": False}, "promoted", "not in the archive"),
        ({"target_kind": "time"}, "consistent", "may lie before the counts' LSN"),
        ({"counts_lsn": None}, "consistent", "without an LSN"),
    ],
)
def test_counts_fall_back_to_the_documented_tolerance_and_say_why(
    kw: _PointArgs, where: str, needle: str
) -> None:
    p = _point(**kw)
    assert p.where == where and p.mode == "tolerance"
    assert needle in p.reason and "row_count_tolerance" in p.reason


def test_an_lsn_target_at_or_after_the_counts_pauses_there() -> None:
    assert _point(target_kind="lsn", target_lsn_at_or_after=True).where == "lsn"
    assert _point(target_kind="lsn").where == "consistent"


def test_logical_counts_are_exact_in_the_dump() -> None:
    p = _point(kind="logical")
    assert (p.where, p.mode) == ("promoted", "exact")


def test_amcheck_checks_leaf_indexes_only_and_tells_tool_errors_from_corruption() -> None:
    # a partitioned index (relkind 'I') is not a target amcheck accepts
    assert "c.relkind = 'i'" in _INDEX_QUERY
    assert is_corruption("XX002") and is_corruption("XX001") and is_corruption("58030")
    for tool_error in ("0A000", "42501", "57014", "55P03", None):  # unsupported, privilege, timeouts
        assert not is_corruption(tool_error)


def _catalog() -> Catalog:
    return Catalog(
        tables=[("public", "session_cache"), ("Sales", "Order Items"), ("public", "User")],
        time_columns={("public", "User"): ["createdAt"]},
    )


def test_unlogged_tables_are_expected_empty_after_a_physical_restore_with_the_reason() -> None:
    specs = plan_unlogged("shop", _catalog(), ["public.session_cache"], {"public.session_cache": 100})
    assert [(s.check, s.kwargs) for s in specs] == [("row-count shop.public.session_cache", {"value": 0})]
    assert "unlogged" in specs[0].expect_text and "100 rows" in specs[0].expect_text


def test_recorded_facts_exact_quote_names_and_compare_the_newest_timestamp() -> None:
    specs, decided = plan_recorded_facts(
        "shop",
        _catalog(),
        counts={"Sales.Order Items": 10, "public.User": 3, "public.session_cache": 5, "public.gone": 1},
        newest={"public.User": "1577833200.000000"},
        skip_tables={"public.session_cache"},
        count_mode="exact",
        tolerance=0.5,
        max_age_seconds=60,
        at="at 0/1",
    )
    names = {s.check: s for s in specs}
    assert names["row-count shop.Sales.Order Items"].kwargs == {"value": 10}
    assert "row-count shop.public.session_cache" not in names  # left to the unlogged check
    fresh = names["freshness shop.public.User"].kwargs["unexpected_rows_query"]
    assert 'max(x."createdAt")' in fresh and "IS DISTINCT FROM '1577833200.000000'::numeric" in fresh
    assert "2019-12-31T23:00:00" in names["freshness shop.public.User"].expect_text
    assert [d.name for d in decided] == ["row-count shop.public.gone"] and decided[0].failed


def test_recorded_facts_reject_a_manifest_value_that_is_not_a_number() -> None:
    _, decided = plan_recorded_facts(
        "shop",
        _catalog(),
        counts={},
        newest={"public.User": "1; DROP TABLE x"},
        count_mode="exact",
        tolerance=0,
        max_age_seconds=0,
        at="",
    )
    assert decided[0].failed and "invalid newest timestamp" in decided[0].summary


def test_coverage_says_per_database_what_was_checked_and_what_not() -> None:
    checks = [
        CheckResult(
            name="amcheck frozen", kind="amcheck", category="integrity", status="passed", database="frozen"
        ),
        CheckResult(
            name="row-count frozen",
            kind="row-count",
            category="data",
            status="skipped",
            database="frozen",
            summary="not recorded at backup: datallowconn = false",
        ),
        CheckResult(
            name="row-count shop.public.x",
            kind="row-count",
            category="data",
            status="failed",
            database="shop",
        ),
    ]
    cov = {
        c.database: c
        for c in coverage(checks, ["shop"], {"frozen": ["connections allowed"], "legacy": ["n/a"]})
    }
    assert cov["frozen"].checked == ["amcheck: 1"]
    assert cov["frozen"].not_checked == [
        "connections allowed",
        "row-count frozen: not recorded at backup: datallowconn = false",
    ]
    assert cov["shop"].checked == ["row-count: 1 (1 FAILED)"] and cov["legacy"].not_checked == ["n/a"]
    from datetime import UTC, datetime

    report = DrillReport(
        drill_id="d", cluster="c", started_at=datetime.now(UTC), checks=checks, databases=list(cov.values())
    )
    assert "## Databases" in render_markdown(report) and "| frozen | amcheck: 1 |" in render_markdown(report)


STDERR = """pg_restore: error: could not execute query: ERROR:  role "app_user" does not exist
Command was: CREATE POLICY app_user_reads ON public.secrets FOR SELECT TO app_user USING ((owner_name = 'app_user'::text));


pg_restore: error: could not execute query: ERROR:  relation "x" does not exist
Command was: ALTER TABLE x ADD CONSTRAINT y;

pg_restore: warning: errors ignored on restore: 2
"""


def test_pg_restore_errors_split_into_missing_roles_and_real_failures() -> None:
    roles, other = missing_role_errors(STDERR)
    assert roles == [
        'role "app_user" does not exist: CREATE POLICY app_user_reads ON public.secrets FOR SELECT '
        "TO app_user USING ((owner_name = 'app_user'::text));"
    ]
    assert other == ['relation "x" does not exist: ALTER TABLE x ADD CONSTRAINT y;']


def test_logical_scope_notes_name_every_database_left_out() -> None:
    notes = logical_scope_notes("shop", ["legacy", "shop", "frozen"], ["role x: CREATE POLICY p"])
    assert set(notes) == {"legacy", "frozen", "shop"}
    assert "not in this backup" in notes["legacy"][0]
    assert any("CREATE POLICY p" in n for n in notes["shop"])
