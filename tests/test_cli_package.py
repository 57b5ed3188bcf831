"""The CLI package's shape: static imports that go one way, and no second copy of a flow's decisions."""

from __future__ import annotations

import ast
from pathlib import Path

from gravl_testlib import REPO_ROOT

CLI = REPO_ROOT / "flows" / "cli"


def _imports(path: Path) -> set[str]:
    """Every module path imported anywhere in the file (top level or inside a function)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                # `from flows.cli import wal` imports the submodule; `from flows.cli import main`
                # takes a name from the package itself
                names.add(sub if (CLI / f"{alias.name}.py").exists() else node.module)
    return names


def _intra_package_graph() -> dict[str, set[str]]:
    modules = {f"flows.cli.{p.stem}": p for p in CLI.glob("*.py") if p.stem != "__init__"}
    modules["flows.cli"] = CLI / "__init__.py"
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_cli_imports_no_module_by_its_name_as_a_string() -> None:
    for path in CLI.glob("*.py"):
        assert "import_module" not in path.read_text(), path.name
        assert "__import__" not in path.read_text(), path.name


def test_imports_inside_the_cli_package_have_no_cycle() -> None:
    # GIVEN who imports whom inside flows/cli (also the imports inside functions)
    graph = _intra_package_graph()
    # THEN the command modules never import back into the entry point or the parser
    for module in ("flows.cli.backup", "flows.cli.wal", "flows.cli.failover", "flows.cli.runner"):
        assert not graph[module] & {"flows.cli", "flows.cli.app", "flows.cli.entry"}, module
    # AND the graph is acyclic (a depth-first search finds no back edge)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_cli_calls_the_flows_choice_of_backup_and_failover_observation() -> None:
    # the restore flow's backup selection and the failover flow's observation have one home
    # each (tasks.recovery.select_backup_for_restore, tasks.topology.observe_primary/observe_replicas):
    # the CLI's check before a restore and its failover preview call them, never a copy
    source = "\n".join(p.read_text() for p in CLI.glob("*.py"))
    for copied in ("choose_backup", "check_target_for_backup", "list_backups", "observe_node"):
        assert copied not in source, copied
    assert "select_backup_for_restore" in (CLI / "backup.py").read_text()
    assert "observe_primary" in (CLI / "failover.py").read_text()
    flows_source = (REPO_ROOT / "flows" / "restore.py").read_text()
    assert "select_backup_for_restore" in flows_source and "choose_backup" not in flows_source
