"""Pure logic: the one home of report scaffolding — artifact keys and markdown tables.

Every flow ends with a keyed markdown artifact (STYLE.md, "Logging and reports"); the keys and
the tables of those reports are built here, so that a key is always in Prefect's alphabet and a
value holding a ``|`` or a newline never breaks a table's row.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

_NOT_IN_KEY = re.compile(r"[^a-z0-9]+")


def artifact_key(report: str, cluster: str) -> str:
    """``<report>-<cluster>`` as an artifact key: lowercase letters, digits and dashes only
    (Prefect's rule), anything else folded into one dash (``backup-report`` + ``db_1`` ->
    ``backup-report-db-1``)."""
    return _NOT_IN_KEY.sub("-", f"{report}-{cluster}".lower()).strip("-")


def report_key(flow: str, cluster: str) -> str:
    """The key of a flow's report artifact: ``<flow>-report-<cluster>``."""
    return artifact_key(f"{flow}-report", cluster)


def cell(value: object) -> str:
    """``value`` as the text of one table cell: a ``|`` is escaped (markdown shows it as is) and
    a newline becomes a space, so the row keeps its columns."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells: Iterable[str]) -> str:
    return "|" + "|".join(f" {c} " for c in cells) + "|"


def table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A markdown table: the header, the separator, one line per row, every cell escaped.

    ``align`` has one letter per column, ``l`` (the default) or ``r`` (numbers)."""
    seps = ["---:" if align[i : i + 1] == "r" else "---" for i in range(len(header))]
    head = "|" + " |" * len(header) if not any(header) else _row(header)
    lines = [head, "|" + "|".join(seps) + "|"]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"a row of {len(r)} cell(s) in a table of {len(header)} column(s)")
        lines.append(_row(cell(v) for v in r))
    return lines


def kv_table(rows: Iterable[tuple[str, object]]) -> list[str]:
    """The two-column "what | value" table that heads every report (an empty header row)."""
    return table(("", ""), rows)


def bullets(items: Iterable[object]) -> list[str]:
    """One markdown list item per entry."""
    return [f"- {item}" for item in items]


def section(title: str, body: Iterable[str]) -> list[str]:
    """A ``## title`` section after a blank line."""
    return ["", f"## {title}", *body]


def document(lines: Iterable[str]) -> str:
    """The report's text: its lines, ending with a newline."""
    return "\n".join(lines) + "\n"
