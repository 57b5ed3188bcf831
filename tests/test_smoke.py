"""Packaging and wiring: the modules are this repo's and the CLI starts."""

from __future__ import annotations

from pathlib import Path

import pytest

import flows
import tasks
from gravl_testlib import REPO_ROOT, run_cli


def test_packages_are_this_repos() -> None:
    # Prefect puts a flow file's folder first on sys.path: make sure nothing shadows ours.
    assert Path(tasks.__file__).resolve().parent == REPO_ROOT / "tasks"
    assert Path(flows.__file__).resolve().parent == REPO_ROOT / "flows"


@pytest.mark.integration  # starts a process
def test_cli_help_lists_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("backup", "list", "verify", "restore"):
        assert command in proc.stdout
