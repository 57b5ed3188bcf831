"""Adapter: the drill's data checks with Great Expectations 1.x, and the suites they come from.

Two sources of expectations, both planned here as plain ``ExpectationSpec`` values (pure) and
then run against the restored instance with an ephemeral GX context (adapter):

- the **default suite**, generated from the restored catalog for every database: per-table row
  counts against the manifest (exact for a logical backup, within ``drill.row_count_tolerance``
  for a physical one), primary keys unique and not null, foreign keys without orphans, and
  freshness (the newest timestamp is no older than ``drill.freshness_max_seconds`` before the
  time the data was recovered to);
- **user suites**: YAML (or JSON) files in ``drill.suites_dir``::

      suite: gravl                 # name in the report (default: the file name)
      database: gravl              # optional: default every database holding all the tables
      tables:
        public.workout_logs:
          - type: expect_column_values_to_be_between   # any GX 1.x expectation, snake or Camel case
            name: completed-at-not-in-future          # optional label in the report
            column: completed_at
            max_value: $now                           # $now / $reference, optionally +/-N[smhd]
          - type: unexpected_rows                     # GX UnexpectedRowsExpectation
            query: SELECT * FROM {batch} WHERE sets > 100

``$reference`` is the time the data was recovered to (target time, last replayed commit, or the
backup's end); ``$now`` is the drill's start. GX is imported only when checks run or suites are
validated (it costs seconds).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict

from tasks.drill import CheckResult
from tasks.errors import ConfigError, one_line
from tasks.postgres import connection

log = logging.getLogger(__name__)

MAX_SAMPLES = 20
CountMode = Literal["exact", "tolerance", "skip"]
_TOKEN_RE = re.compile(r"^\$(now|reference)(?:\s*([+-])\s*(\d+)\s*([smhd]?))?$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


# ---------------------------------------------------------------- specs (pure)


class ExpectationSpec(BaseModel):
    """One expectation to run on one table of one database, and how to name it in the report."""

    model_config = ConfigDict(frozen=True)

    check: str
    kind: str
    database: str
    schema_name: str
    table: str
    gx_type: str
    kwargs: dict[str, Any]
    expect_text: str = ""


@dataclass(frozen=True)
class ForeignKey:
    name: str
    schema: str
    table: str
    columns: tuple[str, ...]
    ref_schema: str
    ref_table: str
    ref_columns: tuple[str, ...]


@dataclass
class Catalog:
    """What the default suite needs to know about one restored database."""

    tables: list[tuple[str, str]] = field(default_factory=list)
    primary_keys: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    time_columns: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def qident(name: str) -> str:
    """A quoted SQL identifier, safe inside a GX query template (braces doubled)."""
    return ('"' + name.replace('"', '""') + '"').replace("{", "{{").replace("}", "}}")


def sql_table(schema: str, table: str) -> str:
    """schema.table quoted for plain SQL (no template: braces kept)."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))


def qtable(schema: str, table: str) -> str:
    return f"{qident(schema)}.{qident(table)}"


def split_table(name: str) -> tuple[str, str]:
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


# GX's UnexpectedRowsExpectation runs its query twice (a COUNT(*) of it, then its rows): on a
# primary key of 10 million rows that is two full passes. The default suite uses a subclass that
# reads it once: the query returns a sample of rows, each carrying the total in a window column.
ONE_PASS = "ExpectNoUnexpectedRowsInOnePass"
_TOTAL = "gravl_unexpected_total"


def one_pass_query(query: str) -> str:
    """``query`` (rows that should not exist) as at most MAX_SAMPLES rows with their total."""
    return f"SELECT q.*, count(*) OVER () AS {_TOTAL} FROM ({query}) AS q LIMIT {MAX_SAMPLES}"


def row_count_bounds(expected: int, tolerance: float) -> tuple[int, int]:
    slack = int(expected * tolerance + 0.999999)
    return max(0, expected - slack), expected + slack


def missing_databases(expected: Iterable[str], present: Container[str]) -> list[CheckResult]:
    """A failed row-count check for each database the manifest records that is not restored."""
    return [
        CheckResult(
            name=f"row-count {db}",
            kind="row-count",
            category="data",
            status="failed",
            database=db,
            summary="database recorded in the manifest is missing",
        )
        for db in sorted(expected)
        if db not in present
    ]


def plan_row_counts(
    database: str,
    catalog: Catalog,
    expected_counts: dict[str, int],
    count_mode: Literal["exact", "tolerance"],
    tolerance: float,
    at: str = "",
) -> tuple[list[ExpectationSpec], list[CheckResult]]:
    """Row counts of one database against the manifest's (``at``: where they are compared, for
    the report); a table the manifest lists that is missing fails without a query."""
    specs: list[ExpectationSpec] = []
    decided: list[CheckResult] = []
    present = set(catalog.tables)
    where = f" {at}" if at else ""
    for qualified, expected in sorted(expected_counts.items()):
        schema, table = split_table(qualified)
        check = f"row-count {database}.{schema}.{table}"
        if (schema, table) not in present:
            decided.append(
                CheckResult(
                    name=check,
                    kind="row-count",
                    category="data",
                    status="failed",
                    database=database,
                    summary=f"table is missing from the restored database{where} (manifest: {expected} rows)",
                )
            )
            continue
        if count_mode == "exact":
            specs.append(
                ExpectationSpec(
                    check=check,
                    kind="row-count",
                    database=database,
                    schema_name=schema,
                    table=table,
                    gx_type="ExpectTableRowCountToEqual",
                    kwargs={"value": expected},
                    expect_text=f"manifest: exactly {expected}{where}",
                )
            )
        else:
            low, high = row_count_bounds(expected, tolerance)
            specs.append(
                ExpectationSpec(
                    check=check,
                    kind="row-count",
                    database=database,
                    schema_name=schema,
                    table=table,
                    gx_type="ExpectTableRowCountToBeBetween",
                    kwargs={"min_value": low, "max_value": high},
                    expect_text=f"manifest: {expected} ±{tolerance:.1%} ({low}..{high}){where}",
                )
            )
    return specs, decided


_NUMERIC_RE = re.compile(r"^-?(\d+(\.\d+)?|Infinity)$")


def epoch_text(value: str) -> str:
    """A recorded newest timestamp (epoch seconds) in ISO form, for the report."""
    from datetime import UTC

    try:
        return datetime.fromtimestamp(float(value), UTC).isoformat()
    except (ValueError, OverflowError):
        return value


def plan_recorded_facts(
    database: str,
    catalog: Catalog,
    *,
    counts: dict[str, int],
    newest: dict[str, str],
    skip_tables: Container[str] = (),
    count_mode: Literal["exact", "tolerance"],
    tolerance: float,
    max_age_seconds: int,
    at: str,
) -> tuple[list[ExpectationSpec], list[CheckResult]]:
    """Row counts and newest timestamps of one database against what the backup recorded.

    ``exact``: both must equal the source's (the copy is at the LSN they were read at);
    ``tolerance``: counts within ``tolerance`` and the newest timestamp no older than
    ``max_age_seconds`` before the source's (the copy is at another point than the counts).
    Tables in ``skip_tables`` (unlogged ones during recovery) are left to another check."""
    expected = {t: n for t, n in counts.items() if t not in skip_tables}
    specs, decided = plan_row_counts(database, catalog, expected, count_mode, tolerance, at=at)
    present = set(catalog.tables)
    for qualified, value in sorted(newest.items()):
        schema, table = split_table(qualified)
        cols = catalog.time_columns.get((schema, table), [])
        if qualified in skip_tables or (schema, table) not in present or not cols:
            continue  # a missing table already failed its row count
        if not _NUMERIC_RE.match(value):
            decided.append(
                CheckResult(
                    name=f"freshness {database}.{schema}.{table}",
                    kind="freshness",
                    category="data",
                    status="failed",
                    database=database,
                    summary=f"manifest holds an invalid newest timestamp {value!r}",
                )
            )
            continue
        greatest = ", ".join(f"extract(epoch FROM max(x.{qident(c)}))" for c in cols)
        if count_mode == "exact":
            cond = f"f.newest IS DISTINCT FROM '{value}'::numeric"
            text = f"newest timestamp {epoch_text(value)}, as on the source {at}"
        else:
            cond = f"f.newest IS NULL OR f.newest < '{value}'::numeric - {int(max_age_seconds)}"
            text = (
                f"newest timestamp no older than {max_age_seconds} s before the source's "
                f"{epoch_text(value)} {at}"
            )
        query = (
            f"SELECT f.newest, '{value}'::numeric AS source_newest FROM (SELECT greatest({greatest}) AS newest "
            f"FROM (SELECT * FROM {{batch}}) AS x) AS f WHERE {cond}"
        )
        specs.append(
            ExpectationSpec(
                check=f"freshness {database}.{schema}.{table}",
                kind="freshness",
                database=database,
                schema_name=schema,
                table=table,
                gx_type=ONE_PASS,
                kwargs={"unexpected_rows_query": one_pass_query(query), "result_format": "COMPLETE"},
                expect_text=text,
            )
        )
    return specs, decided


def plan_unlogged(
    database: str, catalog: Catalog, unlogged: list[str], counts: dict[str, int]
) -> list[ExpectationSpec]:
    """After a physical restore every unlogged table is empty: PostgreSQL resets them to their
    init fork at the end of recovery (they are not WAL-logged), by design."""
    present = set(catalog.tables)
    specs = []
    for qualified in sorted(unlogged):
        schema, table = split_table(qualified)
        if (schema, table) not in present:
            continue
        source = counts.get(qualified)
        specs.append(
            ExpectationSpec(
                check=f"row-count {database}.{schema}.{table}",
                kind="row-count",
                database=database,
                schema_name=schema,
                table=table,
                gx_type="ExpectTableRowCountToEqual",
                kwargs={"value": 0},
                expect_text=(
                    "0: an unlogged table is emptied by a physical restore, by design (PostgreSQL does "
                    "not WAL-log it)" + (f"; the source had {source} rows" if source else "")
                ),
            )
        )
    return specs


def plan_default(
    database: str,
    catalog: Catalog,
    *,
    expected_counts: dict[str, int] | None,
    count_mode: CountMode,
    tolerance: float,
    reference: datetime,
    max_age_seconds: int,
    freshness_columns: list[str] | None = None,
    skip_reason: str = "",
    freshness_note: str | None = None,
) -> tuple[list[ExpectationSpec], list[CheckResult]]:
    """The default suite for one database, generated from its catalog and the manifest's counts.

    Returns the expectations to run, plus checks already decided without running anything
    (a table the manifest lists that is missing, row counts that do not apply)."""
    specs: list[ExpectationSpec] = []
    decided: list[CheckResult] = []

    # Row counts against the manifest.
    if expected_counts:
        if count_mode == "skip":
            decided.append(
                CheckResult(
                    name=f"row-count {database}",
                    kind="row-count",
                    category="data",
                    status="skipped",
                    database=database,
                    summary=skip_reason or "row counts do not apply to this restore",
                )
            )
        else:
            count_specs, missing = plan_row_counts(database, catalog, expected_counts, count_mode, tolerance)
            specs += count_specs
            decided += missing

    # Primary keys: unique and not null, in one pass. GX's column-map expectations (unique,
    # not-null) each scan the table several times; a GROUP BY over the key reads it through the
    # primary key's own index, in order (amcheck has proven that index matches the heap).
    for (schema, table), cols in sorted(catalog.primary_keys.items()):
        keys = ", ".join(f"x.{qident(c)}" for c in cols)
        nulls = " OR ".join(f"x.{qident(c)} IS NULL" for c in cols)
        query = (
            f"SELECT {keys}, count(*) AS copies FROM (SELECT * FROM {{batch}}) AS x "
            f"GROUP BY {keys} HAVING count(*) > 1 OR {nulls}"
        )
        specs.append(
            ExpectationSpec(
                check=f"primary-key {database}.{schema}.{table}({','.join(cols)})",
                kind="primary-key",
                database=database,
                schema_name=schema,
                table=table,
                gx_type=ONE_PASS,
                kwargs={"unexpected_rows_query": one_pass_query(query), "result_format": "COMPLETE"},
                expect_text="no duplicate or null key",
            )
        )

    # Foreign keys: every non-null reference has its parent row (MATCH SIMPLE semantics).
    for fk in catalog.foreign_keys:
        not_null = " AND ".join(f"x.{qident(c)} IS NOT NULL" for c in fk.columns)
        join = " AND ".join(
            f"p.{qident(rc)} = x.{qident(c)}" for c, rc in zip(fk.columns, fk.ref_columns, strict=True)
        )
        fk_cols = ", ".join(f"x.{qident(c)}" for c in fk.columns)
        query = (
            f"SELECT {fk_cols} FROM (SELECT * FROM {{batch}}) AS x WHERE {not_null} AND NOT EXISTS "
            f"(SELECT 1 FROM {qtable(fk.ref_schema, fk.ref_table)} AS p WHERE {join})"
        )
        specs.append(
            ExpectationSpec(
                check=f"fk-orphans {database}.{fk.schema}.{fk.table}({','.join(fk.columns)})"
                f"->{fk.ref_schema}.{fk.ref_table}",
                kind="foreign-key",
                database=database,
                schema_name=fk.schema,
                table=fk.table,
                gx_type=ONE_PASS,
                kwargs={"unexpected_rows_query": one_pass_query(query), "result_format": "COMPLETE"},
                expect_text="no orphan rows",
            )
        )

    # Freshness: the newest timestamp among the chosen columns is recent enough. A backup that
    # recorded each table's newest timestamp is compared with those instead (freshness_note says
    # how or why not): a history-only database is as fresh as its source, whatever its age.
    chosen = _freshness_columns(catalog, freshness_columns)
    if freshness_note is not None:
        if freshness_note:
            decided.append(
                CheckResult(
                    name=f"freshness {database}",
                    kind="freshness",
                    category="data",
                    status="skipped",
                    database=database,
                    summary=freshness_note,
                )
            )
    elif chosen:
        threshold = reference - timedelta(seconds=max_age_seconds)
        anchor = next(iter(chosen))
        parts = []
        for (schema, table), cols in chosen.items():
            source = (
                "(SELECT * FROM {batch}) AS x"
                if (schema, table) == anchor
                else f"{qtable(schema, table)} AS x"
            )
            maxes = ", ".join(f"max(x.{qident(c)})::timestamptz" for c in cols)
            parts.append(f"(SELECT greatest({maxes}) FROM {source})")
        query = (
            f"SELECT newest, '{threshold.isoformat()}'::timestamptz AS oldest_allowed FROM "
            f"(SELECT greatest({', '.join(parts)}) AS newest) AS f "
            f"WHERE newest < '{threshold.isoformat()}'::timestamptz"
        )
        columns = [f"{s}.{t}.{c}" for (s, t), cols in chosen.items() for c in cols]
        specs.append(
            ExpectationSpec(
                check=f"freshness {database}",
                kind="freshness",
                database=database,
                schema_name=anchor[0],
                table=anchor[1],
                gx_type=ONE_PASS,
                kwargs={"unexpected_rows_query": one_pass_query(query), "result_format": "COMPLETE"},
                expect_text=(
                    f"newest of {len(columns)} timestamp column(s) no older than "
                    f"{max_age_seconds} s before {reference.isoformat()}"
                ),
            )
        )
    elif freshness_columns:
        decided.append(
            CheckResult(
                name=f"freshness {database}",
                kind="freshness",
                category="data",
                status="skipped",
                database=database,
                summary="none of drill.freshness_columns is in this database",
            )
        )
    return specs, decided


def _freshness_columns(catalog: Catalog, wanted: list[str] | None) -> dict[tuple[str, str], list[str]]:
    if wanted is None:
        return {k: v for k, v in sorted(catalog.time_columns.items()) if v}
    chosen: dict[tuple[str, str], list[str]] = {}
    for item in wanted:
        parts: list[str] = item.split(".")
        if len(parts) == 2:
            parts = ["public", *parts]
        if len(parts) != 3:
            raise ConfigError(f"drill.freshness_columns: {item!r} is not schema.table.column")
        key = (parts[0], parts[1])
        if parts[2] in catalog.time_columns.get(key, []):
            chosen.setdefault(key, []).append(parts[2])
    return chosen


# ---------------------------------------------------------------- user suites (pure + file I/O)


class SuiteFile(BaseModel):
    """A user suite: expectations per table, from one file of drill.suites_dir."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    database: str | None = None
    tables: dict[str, list[dict[str, Any]]]


def gx_class_name(kind: str) -> str:
    """'expect_column_values_to_be_between' or 'ExpectColumnValuesToBeBetween' -> the class name."""
    if kind in ("unexpected_rows", "unexpected_rows_expectation"):
        return "UnexpectedRowsExpectation"
    if "_" in kind or kind.islower():
        return "".join(part.capitalize() for part in kind.split("_"))
    return kind


def resolve_tokens(value: Any, now: datetime, reference: datetime) -> Any:
    """Replace '$now' / '$reference' (optionally +/-N[smhd]) by datetimes, recursively."""
    if isinstance(value, str):
        m = _TOKEN_RE.match(value.strip())
        if not m:
            return value
        base = now if m.group(1) == "now" else reference
        if m.group(2):
            delta = timedelta(seconds=int(m.group(3)) * _UNIT[m.group(4)])
            return base + delta if m.group(2) == "+" else base - delta
        return base
    if isinstance(value, list):
        return [resolve_tokens(v, now, reference) for v in value]
    if isinstance(value, dict):
        return {k: resolve_tokens(v, now, reference) for k, v in value.items()}
    return value


def _entry_kwargs(entry: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    kwargs = dict(entry)
    kind = kwargs.pop("type", None)
    label = kwargs.pop("name", None)
    if not isinstance(kind, str) or not kind:
        raise ValueError("each expectation needs a 'type'")
    cls = gx_class_name(kind)
    if cls == "UnexpectedRowsExpectation" and "query" in kwargs:
        kwargs["unexpected_rows_query"] = kwargs.pop("query")
    if cls == "UnexpectedRowsExpectation":
        kwargs.setdefault("result_format", "COMPLETE")
    return cls, (str(label) if label is not None else None), kwargs


def parse_suite(data: Any, path: str) -> SuiteFile:
    """Validate the shape of a suite file (types of expectations are checked by ``validate_suites``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a suite file is a mapping with 'tables'")
    unknown = set(data) - {"suite", "database", "tables", "description"}
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}'")
    tables = data.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{path}: 'tables' must map table names to lists of expectations")
    for table, entries in tables.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"{path}: tables.{table} must be a list of expectations (mappings)")
        for i, entry in enumerate(entries):
            if not isinstance(entry.get("type"), str):
                raise ConfigError(f"{path}: tables.{table}[{i}] needs a 'type'")
    name = str(data.get("suite") or Path(path).stem)
    database = data.get("database")
    return SuiteFile(
        name=name,
        path=path,
        database=str(database) if database else None,
        tables={str(k): list(v) for k, v in tables.items()},
    )


def load_suites(directory: Path | None) -> list[SuiteFile]:
    """Every *.yaml, *.yml and *.json suite in a directory, sorted by file name."""
    if directory is None:
        return []
    if not directory.is_dir():
        raise ConfigError(f"drill.suites_dir {directory} is not a directory")
    suites = []
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml", ".json")):
        try:
            data = (
                json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
            )
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(
                f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {one_line(exc)}"
            ) from None
        suites.append(parse_suite(data, str(path)))
    names = [s.name for s in suites]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"drill.suites_dir: suite name {sorted(dup)[0]!r} is used by more than one file")
    return suites


def validate_suites(suites: list[SuiteFile], now: datetime) -> None:
    """Build every user expectation once with GX so that a bad suite fails before any restore."""
    expectations = _gx_expectations_module()
    for suite in suites:
        for table, entries in suite.tables.items():
            for i, entry in enumerate(entries):
                where = f"{suite.path}: tables.{table}[{i}]"
                try:
                    cls_name, _label, kwargs = _entry_kwargs(entry)
                except ValueError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                cls = getattr(expectations, cls_name, None)
                if cls is None:
                    raise ConfigError(f"{where}: unknown expectation type {entry['type']!r}")
                try:
                    cls(**resolve_tokens(kwargs, now, now))
                except Exception as exc:  # noqa: BLE001 - GX raises pydantic and its own errors
                    raise ConfigError(f"{where}: invalid {entry['type']}: {one_line(exc)}") from None


def plan_suite(
    suite: SuiteFile, databases: dict[str, Catalog], *, now: datetime, reference: datetime
) -> tuple[list[ExpectationSpec], list[CheckResult]]:
    """A user suite's expectations on each database it applies to."""
    wanted = [split_table(t) for t in suite.tables]
    if suite.database is not None:
        targets = [suite.database]
        if suite.database not in databases:
            return [], [
                CheckResult(
                    name=f"suite {suite.name}",
                    kind="suite",
                    category="data",
                    status="failed",
                    summary=f"database {suite.database} is not in the restored instance",
                )
            ]
    else:
        targets = [db for db, cat in sorted(databases.items()) if all(t in set(cat.tables) for t in wanted)]
        if not targets:
            return [], [
                CheckResult(
                    name=f"suite {suite.name}",
                    kind="suite",
                    category="data",
                    status="skipped",
                    summary="no restored database has all of its tables: "
                    + ", ".join(f"{s}.{t}" for s, t in wanted),
                )
            ]
    specs: list[ExpectationSpec] = []
    decided: list[CheckResult] = []
    for db in targets:
        present = set(databases[db].tables)
        for table_name, entries in suite.tables.items():
            schema, table = split_table(table_name)
            if (schema, table) not in present:
                decided.append(
                    CheckResult(
                        name=f"suite {suite.name}: {db}.{schema}.{table}",
                        kind="suite",
                        category="data",
                        status="failed",
                        database=db,
                        summary="table is missing from the restored database",
                    )
                )
                continue
            for entry in entries:
                cls_name, label, kwargs = _entry_kwargs(entry)
                column = kwargs.get("column") or ",".join(kwargs.get("column_list", []) or [])
                what = label or f"{entry['type']}{'(' + column + ')' if column else ''}"
                specs.append(
                    ExpectationSpec(
                        check=f"suite {suite.name}: {db}.{schema}.{table} {what}",
                        kind=f"suite {suite.name}",
                        database=db,
                        schema_name=schema,
                        table=table,
                        gx_type=cls_name,
                        kwargs=resolve_tokens(kwargs, now, reference),
                        expect_text=str(entry["type"]),
                    )
                )
    return specs, decided


# ---------------------------------------------------------------- the catalog (PostgreSQL)


def read_catalog(dsn: str) -> Catalog:
    """Tables, primary keys, foreign keys and timestamp columns of a database's user schemas."""
    from tasks.postgres import user_tables

    cat = Catalog()
    with connection(dsn) as conn:
        cat.tables = user_tables(conn)
        user_schema = (
            "n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'"
        )
        for schema, table, cols in conn.execute(
            f"""
            SELECT n.nspname, c.relname,
                   array_agg(a.attname ORDER BY array_position(con.conkey, a.attnum))
            FROM pg_constraint con
            JOIN pg_class c ON c.oid = con.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY (con.conkey)
            WHERE con.contype = 'p' AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND {user_schema}
            GROUP BY n.nspname, c.relname, con.oid
            """
        ).fetchall():
            cat.primary_keys[(schema, table)] = list(cols)
        for row in conn.execute(
            f"""
            SELECT con.conname, n.nspname, c.relname,
                   (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(con.conkey) WITH ORDINALITY k(att, i)
                      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.att),
                   rn.nspname, rc.relname,
                   (SELECT array_agg(a.attname ORDER BY k.i) FROM unnest(con.confkey) WITH ORDINALITY k(att, i)
                      JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.att)
            FROM pg_constraint con
            JOIN pg_class c ON c.oid = con.conrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            JOIN pg_class rc ON rc.oid = con.confrelid
            JOIN pg_namespace rn ON rn.oid = rc.relnamespace
            WHERE con.contype = 'f' AND NOT c.relispartition AND con.conparentid = 0 AND {user_schema}
            ORDER BY n.nspname, c.relname, con.conname
            """
        ).fetchall():
            cat.foreign_keys.append(
                ForeignKey(
                    name=row[0],
                    schema=row[1],
                    table=row[2],
                    columns=tuple(row[3]),
                    ref_schema=row[4],
                    ref_table=row[5],
                    ref_columns=tuple(row[6]),
                )
            )
        for schema, table, column in conn.execute(
            f"""
            SELECT n.nspname, c.relname, a.attname
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND format_type(a.atttypid, NULL) IN ('timestamp with time zone', 'timestamp without time zone')
              AND {user_schema}
            ORDER BY 1, 2, a.attnum
            """
        ).fetchall():
            cat.time_columns.setdefault((schema, table), []).append(column)
    return cat


# ---------------------------------------------------------------- running with GX (adapter)


def load_gx() -> float:
    """Import Great Expectations now (it takes seconds); returns the seconds it took. Done before
    the restore so that neither the measured RTO nor the checks carry this fixed cost."""
    t0 = time.monotonic()
    import great_expectations.expectations  # noqa: F401

    return time.monotonic() - t0


@functools.cache
def one_pass_expectation() -> Any:
    """The single-pass UnexpectedRowsExpectation (defined once GX is imported; GX registers it)."""
    from great_expectations.expectations.core.unexpected_rows_expectation import UnexpectedRowsExpectation

    class ExpectNoUnexpectedRowsInOnePass(UnexpectedRowsExpectation):
        """No row from a query built by ``one_pass_query``; the query runs once."""

        metric_dependencies: ClassVar[tuple[str, ...]] = ("unexpected_rows_query.table",)

        def _validate(
            self,
            metrics: dict[str, Any],
            runtime_configuration: dict[str, Any] | None = None,
            execution_engine: Any = None,
        ) -> dict[str, Any]:
            rows = metrics["unexpected_rows_query.table"] or []
            total = int(rows[0][_TOTAL]) if rows else 0
            sample = [{k: v for k, v in row.items() if k != _TOTAL} for row in rows]
            return {
                "success": total == 0,
                "result": {"observed_value": total, "details": {"unexpected_rows": sample}},
            }

    return ExpectNoUnexpectedRowsInOnePass


def _gx_expectations_module() -> Any:
    import great_expectations.expectations as expectations

    return expectations


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _summary(spec: ExpectationSpec, success: bool, result: dict[str, Any]) -> str:
    observed = result.get("observed_value")
    if spec.gx_type in ("UnexpectedRowsExpectation", ONE_PASS):
        what = {"foreign-key": "orphan row(s)", "primary-key": "duplicate or null key(s)"}.get(
            spec.kind, "unexpected row(s)"
        )
        if spec.kind == "freshness":
            return f"{spec.expect_text}: " + ("yes" if success else "NO, data is older")
        return f"{observed if observed is not None else '?'} {what}"
    if "unexpected_count" in result:
        total = result.get("element_count")
        return f"{result['unexpected_count']} of {total} value(s) unexpected ({spec.expect_text})"
    if observed is not None:
        return f"observed {observed}" + (f" ({spec.expect_text})" if spec.expect_text else "")
    return spec.expect_text


def _samples(result: dict[str, Any]) -> list[Any]:
    rows = (result.get("details") or {}).get("unexpected_rows")
    if rows is None:
        rows = result.get("partial_unexpected_list") or []
    return list(_jsonable(rows))[:MAX_SAMPLES]


def _exception_message(info: Any) -> str | None:
    """GX reports errors per expectation: a flat dict, or a dict of metric -> dict."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception")
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


def run_expectations(specs: list[ExpectationSpec], dsn_for: Callable[[str], str]) -> list[CheckResult]:
    """Run specs with one ephemeral GX context: one validation per table, one result per spec."""
    if not specs:
        return []
    t_import = time.monotonic()
    import great_expectations as gx

    expectations = _gx_expectations_module()
    log.info("Great Expectations %s loaded in %.1fs", gx.__version__, time.monotonic() - t_import)
    with warnings.catch_warnings():
        # GX 1.x deprecates schema_name on table assets in favour of one schema per datasource;
        # a drill checks every schema of a database through one datasource.
        warnings.filterwarnings("ignore", message=".*schema_name.*", category=DeprecationWarning)
        return _run_with_gx(gx, expectations, specs, dsn_for)


TableKey = tuple[str, str, str, str]  # database, schema, table, result format


def group_by_table(specs: Iterable[ExpectationSpec]) -> dict[TableKey, list[ExpectationSpec]]:
    """One validation per table and result format: the run's format overrides the expectations'
    own, and only UnexpectedRows (whose rows GX caps) may use COMPLETE."""
    by_table: dict[TableKey, list[ExpectationSpec]] = {}
    for spec in specs:
        fmt = str(spec.kwargs.get("result_format", "SUMMARY"))
        by_table.setdefault((spec.database, spec.schema_name, spec.table, fmt), []).append(spec)
    return by_table


def _run_with_gx(
    gx: Any, expectations: Any, specs: list[ExpectationSpec], dsn_for: Callable[[str], str]
) -> list[CheckResult]:
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    sources: dict[str, Any] = {}
    results: list[CheckResult] = []
    for n, ((database, schema, table, fmt), table_specs) in enumerate(group_by_table(specs).items()):
        t0 = time.monotonic()
        try:
            if database not in sources:
                sources[database] = _add_postgres_source(context, f"db{len(sources)}", database, dsn_for)
            outcome = _validate_table(
                gx, expectations, context, sources[database], n, (schema, table, fmt), table_specs
            )
            seconds = (time.monotonic() - t0) / max(1, len(table_specs))
            results += results_of(outcome.results, table_specs, database, seconds)
        except Exception as exc:  # noqa: BLE001 - one table's failure must not hide the others
            log.warning("expectations on %s.%s.%s could not run: %s", database, schema, table, one_line(exc))
            seconds = time.monotonic() - t0
            summary = f"could not run: {one_line(exc)}"[:500]
            results += [_failed(spec, database, summary, seconds) for spec in table_specs]
    return results


def _add_postgres_source(context: Any, name: str, database: str, dsn_for: Callable[[str], str]) -> Any:
    from psycopg import conninfo
    from sqlalchemy.engine import URL

    parts = conninfo.conninfo_to_dict(dsn_for(database))
    url = URL.create(
        "postgresql+psycopg",
        username=str(parts.get("user") or "postgres"),
        host=str(parts.get("host") or "127.0.0.1"),
        port=int(parts.get("port") or 5432),
        database=database,
        query={"options": str(parts["options"])} if parts.get("options") else {},
    )
    return context.data_sources.add_postgres(
        name, connection_string=url.render_as_string(hide_password=False)
    )


def _validate_table(
    gx: Any,
    expectations: Any,
    context: Any,
    source: Any,
    n: int,
    where: tuple[str, str, str],
    table_specs: list[ExpectationSpec],
) -> Any:
    """Run one table's expectations as one GX validation; each carries its index in its meta."""
    schema, table, fmt = where
    # A query asset over the quoted name: GX's table assets fold unquoted schema names to
    # lower case and cannot quote names holding quotes ("Sales"."Order Items", "User").
    asset = source.add_query_asset(f"t{n}", query=f"SELECT * FROM {sql_table(schema, table)}")
    batch = asset.add_batch_definition_whole_table("whole")
    built = []
    for i, spec in enumerate(table_specs):
        cls = one_pass_expectation() if spec.gx_type == ONE_PASS else getattr(expectations, spec.gx_type)
        kwargs = {k: v for k, v in spec.kwargs.items() if k != "result_format"}
        built.append(cls(**kwargs, meta={"gravl_check": i}))
    suite = context.suites.add(gx.ExpectationSuite(name=f"s{n}", expectations=built))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"v{n}", data=batch, suite=suite)
    )
    run_format: dict[str, Any] = {
        "result_format": "COMPLETE" if fmt == "COMPLETE" else "SUMMARY",
        "partial_unexpected_count": MAX_SAMPLES,
    }
    return validation.run(result_format=run_format)


def results_of(
    gx_results: Iterable[Any], table_specs: Sequence[ExpectationSpec], database: str, seconds: float
) -> list[CheckResult]:
    """One CheckResult per spec from GX's per-expectation results (matched through the index in
    their meta); a spec GX returned nothing for fails, saying so."""
    results: list[CheckResult] = []
    seen = set()
    for res in gx_results:
        config = res.expectation_config
        index = int(((config.meta if config is not None else None) or {}).get("gravl_check", -1))
        if not 0 <= index < len(table_specs):
            continue
        seen.add(index)
        results.append(_check_result(table_specs[index], res, database, seconds))
    results += [
        _failed(spec, database, "Great Expectations returned no result")
        for i, spec in enumerate(table_specs)
        if i not in seen
    ]
    return results


def _failed(spec: ExpectationSpec, database: str, summary: str, seconds: float = 0.0) -> CheckResult:
    return CheckResult(
        name=spec.check,
        kind=spec.kind,
        category="data",
        status="failed",
        database=database,
        seconds=seconds,
        summary=summary,
    )


def _check_result(spec: ExpectationSpec, res: Any, database: str, seconds: float) -> CheckResult:
    result = dict(res.result or {})
    error = _exception_message(res.exception_info)
    if error is not None:
        return _failed(spec, database, f"could not evaluate: {error.strip().splitlines()[0][:300]}", seconds)
    return CheckResult(
        name=spec.check,
        kind=spec.kind,
        category="data",
        status="passed" if res.success else "failed",
        database=database,
        seconds=seconds,
        summary=_summary(spec, bool(res.success), result),
        samples=[] if res.success else _samples(result),
    )


def unique_names(specs: list[ExpectationSpec]) -> list[ExpectationSpec]:
    """Report names must be unique: number repeated ones."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        count = seen.get(spec.check, 0) + 1
        seen[spec.check] = count
        out.append(spec if count == 1 else spec.model_copy(update={"check": f"{spec.check} #{count}"}))
    return out
