"""Unit tier: the report scaffolding every flow's artifact is built with (tasks/reporting.py)."""

from __future__ import annotations

import pytest

from tasks.reporting import artifact_key, bullets, cell, document, kv_table, report_key, section, table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("report", "cluster", "key"),
    [
        ("backup-report", "gravl", "backup-report-gravl"),
        ("backup-report", "db_1", "backup-report-db-1"),
        ("Drill-Report", "Prod.EU west", "drill-report-prod-eu-west"),
        ("expire-report", "a__b--c", "expire-report-a-b-c"),
        ("restore-report", "_x_", "restore-report-x"),
    ],
)
def test_artifact_key_is_lowercase_letters_digits_and_single_dashes(
    report: str, cluster: str, key: str
) -> None:
    assert artifact_key(report, cluster) == key


def test_report_key_is_flow_report_cluster() -> None:
    assert report_key("drill-failover", "gravl_2") == "drill-failover-report-gravl-2"


def test_a_cell_keeps_its_row_together() -> None:
    assert cell("a | b\nc") == "a \\| b c"
    assert cell(3) == "3"


def test_kv_table_has_an_empty_header_and_escapes_values() -> None:
    assert kv_table([("node", "db-1"), ("command", "a | b"), ("count", 0)]) == [
        "| | |",
        "|---|---|",
        "| node | db-1 |",
        "| command | a \\| b |",
        "| count | 0 |",
    ]


def test_table_aligns_numbers_right_and_rejects_a_short_row() -> None:
    assert table(("t+ (s)", "step"), [("1.00", "promote")], align="rl") == [
        "| t+ (s) | step |",
        "|---:|---|",
        "| 1.00 | promote |",
    ]
    with pytest.raises(ValueError, match="a row of 1 cell"):
        table(("a", "b"), [("only",)])


def test_every_row_of_a_table_has_as_many_pipes_as_the_header() -> None:
    lines = table(("a", "b", "c"), [("x|y", "\n", ""), ("1", "2", "3")])
    assert {line.replace("\\|", "").count("|") for line in lines} == {4}


def test_sections_bullets_and_document() -> None:
    lines = ["# Title", *section("Notes", bullets(["one", "two"]))]
    assert document(lines) == "# Title\n\n## Notes\n- one\n- two\n"
