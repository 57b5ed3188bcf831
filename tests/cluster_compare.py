"""Test support: what makes two clusters "the same" — roles, password hashes, memberships, role
settings, tablespaces, databases and their properties, every table's content, sequences, large
objects. Used to compare a restored cluster with its source. ACLs compare as sets (a restore
may list the same grants in another order)."""

from __future__ import annotations

from typing import Any

import psycopg

from tasks.postgres import database_digest


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return [tuple(r) for r in conn.execute(query).fetchall()]


def globals_state(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "roles": _rows(
            dsn,
            """
            SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication,
                   rolbypassrls, rolconnlimit, rolpassword, rolvaliduntil
            FROM pg_authid WHERE rolname !~ '^pg_' ORDER BY 1""",
        ),
        "memberships": _rows(
            dsn,
            """
            SELECT r.rolname, m.rolname, a.admin_option FROM pg_auth_members a
            JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member
            WHERE m.rolname !~ '^pg_' ORDER BY 1, 2""",
        ),
        "role_settings": _rows(
            dsn,
            """
            SELECT coalesce(r.rolname, '-'), coalesce(d.datname, '-'), s.setconfig::text
            FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
            LEFT JOIN pg_database d ON d.oid = s.setdatabase ORDER BY 1, 2""",
        ),
        "tablespaces": _rows(
            dsn,
            """
            SELECT spcname, pg_get_userbyid(spcowner), (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(spcacl) a)::text, spcoptions::text FROM pg_tablespace
            ORDER BY 1""",
        ),
        "databases": _rows(
            dsn,
            """
            SELECT d.datname, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate,
                   d.datctype, d.datlocprovider, d.datistemplate, d.datallowconn, d.datconnlimit,
                   (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(d.datacl) a)::text, t.spcname, shobj_description(d.oid, 'pg_database')
            FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace ORDER BY 1""",
        ),
    }


def database_state(dsn: str) -> dict[str, Any]:
    return {
        "tables": database_digest(dsn),
        "sequences": _rows(
            dsn,
            """
            SELECT schemaname, sequencename, last_value, start_value, increment_by, min_value, max_value, cycle
            FROM pg_sequences ORDER BY 1, 2""",
        ),
        "large_objects": _rows(
            dsn,
            """
            SELECT m.oid::bigint, pg_get_userbyid(m.lomowner), (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(m.lomacl) a)::text, md5(lo_get(m.oid))
            FROM pg_largeobject_metadata m ORDER BY 1""",
        ),
        "acls": _rows(
            dsn,
            """
            SELECT n.nspname, c.relname, c.relkind, (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(c.relacl) a)::text, c.relrowsecurity,
                   pg_get_userbyid(c.relowner), t.spcname
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace
            WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2""",
        ),
        "policies": _rows(
            dsn, "SELECT schemaname, tablename, policyname, qual FROM pg_policies ORDER BY 1, 2, 3"
        ),
        "event_triggers": _rows(dsn, "SELECT evtname, evtevent, evtenabled FROM pg_event_trigger ORDER BY 1"),
    }
