"""Pure logic of whole-cluster backups: database selection, tablespace maps, globals rewriting,
the restore report's notes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.errors import ConfigError, PreconditionFailed
from tasks.inventory import guarded_dsn, select_databases
from tasks.models import DatabaseEntry, Manifest, NotCarriedOver, TablespaceEntry
from tasks.restore import _map_globals_line, parse_tablespace_map, restore_notes, tablespace_targets

pytestmark = pytest.mark.unit


def _db(name: str, allow: bool = True, template: bool = False) -> DatabaseEntry:
    return DatabaseEntry(
        name=name,
        oid="1",
        owner="o",
        encoding="UTF8",
        collate="C",
        ctype="C",
        allow_connections=allow,
        is_template=template,
    )


def test_all_databases_keeps_the_unconnectable_one_marked_skipped() -> None:
    chosen = select_databases(
        [_db("app"), _db("frozen", allow=False), _db("template1", template=True)], "all"
    )
    assert [d.name for d in chosen] == ["app", "frozen", "template1"]
    assert chosen[1].skipped and "datallowconn" in chosen[1].skipped
    assert chosen[0].skipped is None


def test_named_databases_must_exist() -> None:
    with pytest.raises(PreconditionFailed, match="nope"):
        select_databases([_db("app")], ["app", "nope"])
    assert [d.name for d in select_databases([_db("app"), _db("b")], ["b"])] == ["b"]


def test_config_rejects_an_empty_database_list() -> None:
    from tasks.config import parse_config

    base = {"primary": {"dsn": "host=x"}, "repository": {"url": "file:///tmp/x"}}
    with pytest.raises(ConfigError, match="backup.databases"):
        parse_config({**base, "backup": {"databases": []}})
    assert parse_config({**base, "backup": {"databases": ["a"]}}).backup.databases == ["a"]


@pytest.mark.parametrize(
    "item, message",
    [
        ("/a", "OLD=NEW"),
        ("a=/b", "absolute"),
        ("/a=", "OLD=NEW"),
        ("=/b", "OLD=NEW"),
    ],
)
def test_tablespace_map_needs_two_absolute_paths(item: str, message: str) -> None:
    with pytest.raises(PreconditionFailed, match=message):
        parse_tablespace_map([item])


def test_tablespace_map_must_name_a_tablespace_of_the_backup(tmp_path: Path) -> None:
    manifest = _manifest(tablespaces=[TablespaceEntry(oid="16384", name="ts", location=str(tmp_path / "ts"))])
    with pytest.raises(PreconditionFailed, match="no tablespace at /elsewhere"):
        tablespace_targets(manifest, {"/elsewhere": str(tmp_path / "new")})
    assert tablespace_targets(manifest, {str(tmp_path / "ts"): str(tmp_path / "new")}) == {
        "16384": tmp_path / "new"
    }


def test_globals_relocate_tablespaces_and_skip_existing_roles() -> None:
    line = "CREATE TABLESPACE app_space OWNER app_owner LOCATION '/old/it''s';\n"
    assert (
        _map_globals_line(line, {"/old/it's": "/new/x'y"})
        == "CREATE TABLESPACE app_space OWNER app_owner LOCATION '/new/x''y';\n"
    )
    assert _map_globals_line("CREATE ROLE postgres;\n", {}, frozenset({"postgres"})) == ""
    assert _map_globals_line('CREATE ROLE "Reporting Team";\n', {}, frozenset({"Reporting Team"})) == ""
    assert _map_globals_line("CREATE ROLE app;\n", {}, frozenset({"postgres"})) == "CREATE ROLE app;\n"
    assert (
        _map_globals_line("ALTER ROLE postgres WITH SUPERUSER;\n", {}, frozenset({"postgres"}))
        == "ALTER ROLE postgres WITH SUPERUSER;\n"
    )


def test_restore_notes_say_what_is_not_carried_over() -> None:
    nco = NotCarriedOver(
        unlogged_tables={"shop": ["public.cache"]},
        replication_slots=["s1 (physical)"],
        prepared_transactions=["g1 (database shop, owner o, prepared x)"],
    )
    physical = restore_notes(_manifest(kind="physical", not_carried_over=nco))
    assert any("EMPTY" in n and "public.cache" in n for n in physical)
    assert any("HOLD THEIR LOCKS" in n and "g1" in n for n in physical)
    assert any("replication slots" in n for n in physical)
    logical = restore_notes(
        _manifest(
            kind="logical",
            not_carried_over=nco,
            databases=[_db("frozen", allow=False).model_copy(update={"skipped": "why"})],
        )
    )
    assert not any("EMPTY" in n for n in logical)
    assert any("not carried over" in n and "g1" in n for n in logical)
    assert any("frozen is NOT in this backup: why" in n for n in logical)


def test_guarded_dsn_keeps_user_options_and_adds_timeouts() -> None:
    dsn = guarded_dsn("host=h dbname=d options='-c search_path=x'", 2.5, 60, check_client=True)
    assert "lock_timeout=2500" in dsn and "statement_timeout=60000" in dsn
    assert "search_path=x" in dsn and "client_connection_check_interval" in dsn


def _manifest(**kw: object) -> Manifest:
    now = datetime.now(UTC)
    data: dict[str, object] = dict(
        id="20260101T000000Z-physical",
        kind="physical",
        cluster="c",
        pg_version=150000,
        system_identifier="1",
        timeline=1,
        start_time=now,
        stop_time=now,
        codec="zstd",
        objects=[],
    )
    data.update(kw)
    return Manifest.model_validate(data)
