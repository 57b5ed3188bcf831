"""Unit tier: the report scaffolding every flow's artifact is built with (tasks/reporting.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.drill import DrillReport, render_markdown, report_keys, store_report
from tasks.hooks import HookResult
from tasks.reporting import artifact_key, bullets, cell, document, kv_table, report_key, section, table
from tasks.repository import FileRepository
from tasks.runreport import RunReport, TimelineEvent, timeline_markdown

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


def test_a_drill_report_is_stored_as_json_and_markdown_under_its_keys(tmp_path: Path) -> None:
    # GIVEN a file repository and a drill report carrying its storage keys
    repo = FileRepository(tmp_path, tmp_path.as_uri())
    report = DrillReport(drill_id="20261129T030000Z-ab12", cluster="gravl", started_at=datetime.now(UTC))
    report.report_keys = report_keys(report.drill_id)
    # WHEN it is stored
    keys = store_report(repo, report)
    # THEN the JSON reads back as the same report and the markdown is the rendered one
    assert keys == ["drills/20261129T030000Z-ab12/report.json", "drills/20261129T030000Z-ab12/report.md"]
    assert DrillReport.model_validate_json(repo.get_bytes(keys[0])) == report
    assert repo.get_bytes(keys[1]).decode() == render_markdown(report)


# ---------------------------------------------------------------- the failover/failback base report


AT = datetime(2026, 11, 29, 3, 4, 5, 678901, tzinfo=UTC)


def test_timeline_rows_have_offset_clock_to_the_millisecond_and_keep_their_columns() -> None:
    lines = timeline_markdown([TimelineEvent(at=AT, offset_seconds=1.234, step="promote", text="a|b")])
    assert lines[:2] == ["| t+ (s) | at (UTC) | step | what happened |", "|---:|---|---|---|"]
    assert lines[2] == "| 1.23 | 03:04:05.678 | promote | a\\|b |"
    assert all(line.replace("\\|", "").count("|") == 5 for line in lines)


def test_a_run_report_lays_out_title_rows_own_sections_shared_sections_and_next_steps() -> None:
    # GIVEN a run that was approved automatically, ran a hook and failed
    r = RunReport(
        cluster="gravl",
        status="failed",
        plan=["fence db-1", "promote db-2"],
        approver="ops",
        approved_at=AT,
        auto_approved=True,
        approval_note="drill",
        hooks=[HookResult(kind="command", target="reload | app", ok=False, message="exit 1", seconds=0.25)],
        evidence=["db-2 in recovery"],
        timeline=[TimelineEvent(at=AT, offset_seconds=0.5, step="fence", text="stopped")],
        error="promote refused",
    )
    # WHEN it is rendered with its own rows, a section of its own and the next steps
    text = r.render(
        "Failover FAILED", [("status", r.status), *r.shared_rows()], ["Re-run."], before=["", "## Own"]
    )
    # THEN every part is there, in order
    order = [
        "# Failover FAILED",
        "| status | failed |",
        "## Own",
        "## What failed",
        "## Plan",
        "## Reconnect hooks",
    ]
    order += ["## Timeline", "## What we saw", "## Next\n- Re-run.\n"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)
    assert (
        "| approved by | ops at 2026-11-29 03:04:05 UTC — **auto_approve** (form skipped) (drill) |" in text
    )
    assert "| DNS | - |" in text and "| validation | - |" in text
    assert "| command | reload \\| app | FAILED: exit 1 | 0.2 |" in text and "|---|---|---|---:|" in text
    assert "1. fence db-1\n1. promote db-2" in text and "## Notes" not in text
    assert RunReport(cluster="gravl").approval_text() == "-"
