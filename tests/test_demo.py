"""`gravl-dr demo`: the whole procedure on embedded defaults, cleaning up after itself."""

from __future__ import annotations

import glob

import pytest

from flows.demo import demo_flow


@pytest.mark.usefixtures("prefect_harness")
def test_demo_backs_up_restores_compares_and_cleans_up() -> None:
    before = set(glob.glob("/tmp/gravl-dr-demo-*"))
    report = demo_flow(users=50, logs=500)
    assert report.ok and report.tables == 7
    # ids are <UTC second>-<kind>-<random suffix>
    assert "-physical-" in report.physical_backup and "-logical-" in report.logical_backup
    assert any("rows written after the backup" in line for line in report.lines)
    assert any(line.startswith("restore drill: drill ") and "PASSED" in line for line in report.lines)
    assert set(glob.glob("/tmp/gravl-dr-demo-*")) == before
