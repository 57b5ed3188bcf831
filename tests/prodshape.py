"""Test support: a production-shaped PostgreSQL 15 cluster, built from SQL in a few seconds.

``build_prod_cluster()`` makes it; the session fixture ``prod_cluster`` (tests/conftest_prodshape.py)
builds it once per test session. Treat the source as read-only in tests (inject faults into
restored copies, or into a cluster of your own); ``writes()`` is the one sanctioned writer.

What it holds (assert on these; the names are stable API):

Roles (passwords set, stored as SCRAM-SHA-256 verifiers; pg_hba stays ``trust`` on loopback
unless ``password_auth=True``, which then requires scram-sha-256 for every role but postgres):
- ``postgres``: bootstrap superuser.
- ``app_owner`` (LOGIN): owns databases shop, legacy, reports, archive and their objects.
- ``app_user`` (LOGIN): reads/writes shop; ``ALTER ROLE app_user IN DATABASE shop SET
  statement_timeout = '30s'``; sees only its own rows of shop.public.secrets (RLS).
- ``app_reader`` (NOLOGIN) and ``analyst`` (LOGIN, member of app_reader, ``SET work_mem``).
- ``"Reporting Team"`` (NOLOGIN, a quoted role name), granted SELECT on reports.
- ``gravl_dr``: the least-privilege backup role, made by running infra/postgres/roles.sql as it
  is in the repository (so the fixture follows that file), plus a password; and
  infra/postgres/roles-per-database.sql in shop (SELECT on its large objects).
  ``PASSWORDS`` maps role -> password.

Databases (besides postgres; see ``DATABASES``):
- ``shop`` (UTF8, owner app_owner; ``ALTER DATABASE shop SET search_path = "Sales", public``;
  CONNECT/TEMPORARY granted to app_user, TEMPORARY revoked from PUBLIC; a COMMENT):
  extensions pg_trgm, citext, btree_gist; schemas public, "Sales", audit;
  - public."User": identity id (START 10 INCREMENT 10), citext email, "createdAt", "select"
    (reserved word) — 200 rows;
  - "Sales"."Order" (id from "Sales".order_no_seq START 1001 INCREMENT 7, FK "userId" ->
    "User") — 400 rows; "Sales"."Order Items" (PK "orderId","lineNo", FK -> "Order",
    trigram GIN index) — 1000 rows; "Sales".order_totals: materialized view with a unique index;
  - public."group" (columns "from", "table": reserved words) — 3 rows;
  - public.events: RANGE partitioned on "occurredAt" (events_2025, events_2026,
    events_default), PK (id, "occurredAt"), a partitioned index on kind — 300 rows;
  - public.accounts: LIST partitioned on region (accounts_eu, accounts_us, accounts_other
    DEFAULT), PK (region, id) — 90 rows;
  - public.vehicles (30 rows of its own) and public.cars INHERITS vehicles (20 rows): a count of
    vehicles sees 50;
  - public.secrets: RLS enabled, policy ``owner_only`` (owner_name = current_user), 500 rows
    none of which belong to gravl_dr or app_user (a non-BYPASSRLS reader sees 0);
    public.secret_notes (2000 rows) has an FK to it (an RLS-blind reader sees 2000 "orphans");
  - public.session_cache: UNLOGGED, 100 rows (empty after a physical restore, by design);
  - public.reservations: exclusion constraint with btree_gist — 20 rows;
  - public.countdown_seq: a descending sequence (INCREMENT -3);
  - public.ticks: the busy table ``writes()`` inserts into (plus "Sales"."Order"/"Order Items");
  - audit.ddl_log + event trigger ``audit_ddl`` (ddl_command_end, SECURITY DEFINER function):
    any DDL in shop adds rows; public."User" also has a row trigger writing audit.user_changes;
  - 5 large objects owned by app_owner;
  - with ``tablespace=True``: tablespace ``app_space`` (a directory under /tmp owned by postgres)
    holding public.attachments (50 rows) and its primary key index.
- ``legacy``: ENCODING LATIN1 (TEMPLATE template0, C collation): public."Kunden" with non-ASCII
  text and a column "geändertAm" — 60 rows; public.bestellungen FK -> "Kunden" — 120 rows.
- ``reports``: ``default_transaction_read_only = on``; public.daily_sales — 365 rows.
- ``frozen``: ``datallowconn = false``; public.snapshots — 40 rows (connect to count it only on
  a copy where you may allow connections).
- ``archive``: history only, newest timestamp 2019-12-31: public.orders_2019 — 250 rows,
  public.order_lines_2019 FK -> orders_2019 — 500 rows.

``EXPECTED_ROWS`` holds those counts as the source has them right after the build (before any
``writes()``), database -> "schema.table" -> rows, for top-level tables (partitions counted in
their parent, children of inheritance included in the parent's count).

Archiving: the cluster archives its WAL with ``gravl-dr wal-push`` into ``repo_dir`` (a file
repository the postgres user can write); ``config()`` writes configs for that repository as any
role, so backups, WAL and drills of this cluster all live in one repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from tasks.pgcluster import LocalCluster, chown_tree, free_port, make_private_dir
from tasks.proc import pg_bin

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAVL_DR = str(Path(sys.executable).parent / "gravl-dr")
PG_USER = "postgres"

PASSWORDS = {
    "app_owner": "owner-pw-not-secret",
    "app_user": "user-pw-not-secret",
    "analyst": "analyst-pw-not-secret",
    "gravl_dr": "gravl-dr-pw-not-secret",
}
DATABASES = ("shop", "legacy", "reports", "frozen", "archive")
READ_ONLY_DB = "reports"
NO_CONNECT_DB = "frozen"
LATIN1_DB = "legacy"
HISTORY_DB = "archive"
HISTORY_NEWEST = "2019-12-31 23:00:00+00"

EXPECTED_ROWS: dict[str, dict[str, int]] = {
    "shop": {
        "public.User": 200,
        "Sales.Order": 400,
        "Sales.Order Items": 1000,
        "public.group": 3,
        "public.events": 300,
        "public.accounts": 90,
        "public.vehicles": 50,
        "public.cars": 20,
        "public.secrets": 500,
        "public.secret_notes": 2000,
        "public.session_cache": 100,
        "public.reservations": 20,
        "public.ticks": 0,
        "audit.user_changes": 200,
        # audit.ddl_log: however many DDL commands the build ran (not a fixed number)
    },
    "legacy": {"public.Kunden": 60, "public.bestellungen": 120},
    "reports": {"public.daily_sales": 365},
    "frozen": {"public.snapshots": 40},
    "archive": {"public.orders_2019": 250, "public.order_lines_2019": 500},
}

_ROLES = f"""
CREATE ROLE app_owner LOGIN PASSWORD '{PASSWORDS["app_owner"]}';
CREATE ROLE app_user LOGIN PASSWORD '{PASSWORDS["app_user"]}';
CREATE ROLE app_reader NOLOGIN;
CREATE ROLE analyst LOGIN PASSWORD '{PASSWORDS["analyst"]}' IN ROLE app_reader;
CREATE ROLE "Reporting Team" NOLOGIN;
ALTER ROLE analyst SET work_mem = '8MB';
"""

_SHOP_SUPERUSER = """
CREATE EXTENSION pg_trgm;
CREATE EXTENSION citext;
CREATE EXTENSION btree_gist;
CREATE SCHEMA "Sales" AUTHORIZATION app_owner;
CREATE SCHEMA audit AUTHORIZATION app_owner;
CREATE TABLE audit.ddl_log (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
                            tag text NOT NULL, object text, "user" text NOT NULL DEFAULT current_user);
CREATE FUNCTION audit.log_ddl() RETURNS event_trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    INSERT INTO audit.ddl_log (tag, object) VALUES (r.command_tag, r.object_identity);
  END LOOP;
END $$;
CREATE EVENT TRIGGER audit_ddl ON ddl_command_end EXECUTE FUNCTION audit.log_ddl();
"""

_SHOP_OWNER = """
CREATE TABLE public."User" (
    id bigint GENERATED ALWAYS AS IDENTITY (START WITH 10 INCREMENT BY 10) PRIMARY KEY,
    email citext NOT NULL UNIQUE,
    "displayName" text,
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    "select" text
);
CREATE TABLE audit.user_changes (id bigserial PRIMARY KEY, "userId" bigint NOT NULL,
                                 op text NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION audit.track_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit.user_changes ("userId", op) VALUES (NEW.id, TG_OP);
  RETURN NEW;
END $$;
CREATE TRIGGER "User audit" AFTER INSERT OR UPDATE ON public."User"
    FOR EACH ROW EXECUTE FUNCTION audit.track_user();
CREATE SEQUENCE "Sales".order_no_seq START 1001 INCREMENT 7;
CREATE SEQUENCE public.countdown_seq START -5 INCREMENT -3 MINVALUE -1000000 MAXVALUE -1;
CREATE TABLE "Sales"."Order" (
    id bigint PRIMARY KEY DEFAULT nextval('"Sales".order_no_seq'),
    "userId" bigint NOT NULL REFERENCES public."User" (id),
    "createdAt" timestamptz NOT NULL DEFAULT now(),
    total numeric(12, 2) NOT NULL
);
ALTER SEQUENCE "Sales".order_no_seq OWNED BY "Sales"."Order".id;
CREATE TABLE "Sales"."Order Items" (
    "orderId" bigint NOT NULL REFERENCES "Sales"."Order" (id),
    "lineNo" integer NOT NULL,
    sku text NOT NULL,
    qty integer NOT NULL CHECK (qty > 0),
    PRIMARY KEY ("orderId", "lineNo")
);
CREATE INDEX "Order Items sku" ON "Sales"."Order Items" USING gin (sku gin_trgm_ops);
CREATE TABLE public."group" ("from" integer PRIMARY KEY, "table" text NOT NULL);
CREATE TABLE public.events (
    id bigint GENERATED BY DEFAULT AS IDENTITY,
    "occurredAt" timestamptz NOT NULL,
    kind text NOT NULL,
    "userId" bigint REFERENCES public."User" (id),
    payload jsonb,
    PRIMARY KEY (id, "occurredAt")
) PARTITION BY RANGE ("occurredAt");
CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE public.events_default PARTITION OF public.events DEFAULT;
CREATE INDEX events_kind ON public.events (kind);
CREATE TABLE public.accounts (region text NOT NULL, id integer NOT NULL, name text NOT NULL,
                              PRIMARY KEY (region, id)) PARTITION BY LIST (region);
CREATE TABLE public.accounts_eu PARTITION OF public.accounts FOR VALUES IN ('eu');
CREATE TABLE public.accounts_us PARTITION OF public.accounts FOR VALUES IN ('us');
CREATE TABLE public.accounts_other PARTITION OF public.accounts DEFAULT;
CREATE TABLE public.vehicles (id integer PRIMARY KEY, name text NOT NULL);
CREATE TABLE public.cars (doors integer NOT NULL) INHERITS (public.vehicles);
ALTER TABLE public.cars ADD PRIMARY KEY (id);
CREATE TABLE public.secrets (id integer PRIMARY KEY, owner_name text NOT NULL, payload text NOT NULL);
ALTER TABLE public.secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner_only ON public.secrets USING (owner_name = current_user);
CREATE POLICY app_user_reads ON public.secrets FOR SELECT TO app_user USING (owner_name = 'app_user');
CREATE TABLE public.secret_notes (id integer PRIMARY KEY, secret_id integer NOT NULL REFERENCES public.secrets (id),
                                  note text NOT NULL);
CREATE UNLOGGED TABLE public.session_cache (key text PRIMARY KEY, value text NOT NULL, "expiresAt" timestamptz NOT NULL);
CREATE TABLE public.reservations (id integer PRIMARY KEY, room integer NOT NULL, during tstzrange NOT NULL,
                                  EXCLUDE USING gist (room WITH =, during WITH &&));
CREATE TABLE public.ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), writer integer);

INSERT INTO public."User" (email, "displayName", "createdAt", "select")
SELECT 'User' || g || '@Example.com', 'User ' || g, now() - (g || ' minutes')::interval, 'opt' || g % 3
FROM generate_series(1, 200) g;
INSERT INTO "Sales"."Order" ("userId", "createdAt", total)
SELECT 10 * (1 + g % 200), now() - (g || ' seconds')::interval, (g % 97) + 0.99 FROM generate_series(1, 400) g;
INSERT INTO "Sales"."Order Items" ("orderId", "lineNo", sku, qty)
SELECT o.id, l, 'SKU-' || (o.id * l) % 1000, 1 + l FROM "Sales"."Order" o,
       generate_series(1, 3) l ORDER BY o.id, l LIMIT 1000;
INSERT INTO public."group" VALUES (1, 'select'), (2, 'from'), (3, 'where');
INSERT INTO public.events ("occurredAt", kind, "userId", payload)
SELECT timestamptz '2025-06-01' + (g || ' days')::interval, 'k' || g % 5, 10 * (1 + g % 200),
       jsonb_build_object('n', g)
FROM generate_series(1, 300) g;
INSERT INTO public.accounts SELECT (ARRAY['eu', 'us', 'apac'])[1 + g % 3], g, 'acct ' || g FROM generate_series(1, 90) g;
INSERT INTO public.vehicles SELECT g, 'vehicle ' || g FROM generate_series(1, 30) g;
INSERT INTO public.cars SELECT 100 + g, 'car ' || g, 2 + g % 3 FROM generate_series(1, 20) g;
INSERT INTO public.secrets SELECT g, (ARRAY['alice', 'bob', 'carol'])[1 + g % 3], md5(g::text) FROM generate_series(1, 500) g;
INSERT INTO public.secret_notes SELECT g, 1 + g % 500, 'note ' || g FROM generate_series(1, 2000) g;
INSERT INTO public.session_cache SELECT 'k' || g, 'v' || g, now() + interval '1 hour' FROM generate_series(1, 100) g;
INSERT INTO public.reservations
SELECT g, g % 4, tstzrange(timestamptz '2026-01-01' + (g || ' hours')::interval,
                           timestamptz '2026-01-01' + (g || ' hours')::interval + interval '30 minutes')
FROM generate_series(1, 20) g;
SELECT nextval('public.countdown_seq') FROM generate_series(1, 4);
CREATE MATERIALIZED VIEW "Sales".order_totals AS
    SELECT "userId", count(*) AS orders, sum(total) AS total FROM "Sales"."Order" GROUP BY "userId";
CREATE UNIQUE INDEX order_totals_user ON "Sales".order_totals ("userId");
SELECT lo_from_bytea(0, convert_to('large object ' || g, 'UTF8')) FROM generate_series(1, 5) g;
COMMENT ON TABLE "Sales"."Order Items" IS 'one row per order line';
GRANT USAGE ON SCHEMA "Sales", audit TO app_user, app_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public, "Sales" TO app_user;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public, "Sales" TO app_user;
GRANT INSERT ON audit.user_changes TO app_user;
GRANT USAGE ON SEQUENCE audit.user_changes_id_seq TO app_user;
GRANT SELECT ON ALL TABLES IN SCHEMA public, "Sales" TO app_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA "Sales" GRANT SELECT ON TABLES TO app_reader;
ALTER DEFAULT PRIVILEGES GRANT USAGE ON SEQUENCES TO app_user;
"""

_SHOP_TABLESPACE = """
CREATE TABLE public.attachments (id integer PRIMARY KEY USING INDEX TABLESPACE app_space,
                                 name text NOT NULL, body bytea NOT NULL) TABLESPACE app_space;
INSERT INTO public.attachments SELECT g, 'file' || g || '.bin', decode(md5(g::text), 'hex') FROM generate_series(1, 50) g;
"""

_SHOP_LAST = """
ALTER DATABASE shop SET search_path = "Sales", public;
ALTER ROLE app_user IN DATABASE shop SET statement_timeout = '30s';
GRANT CONNECT, TEMPORARY ON DATABASE shop TO app_user;
REVOKE TEMPORARY ON DATABASE shop FROM PUBLIC;
COMMENT ON DATABASE shop IS 'the shop''s main database';
"""

_LEGACY = """
CREATE TABLE public."Kunden" (id integer PRIMARY KEY, name text NOT NULL, "geändertAm" timestamp NOT NULL);
CREATE TABLE public.bestellungen (id integer PRIMARY KEY, kunde integer NOT NULL REFERENCES public."Kunden" (id),
                                  "größe" text NOT NULL, bestellt timestamptz NOT NULL);
INSERT INTO public."Kunden"
SELECT g, (ARRAY['Müller', 'Zoë', 'François', 'Øster'])[1 + g % 4] || ' ' || g, now()::timestamp - (g || ' hours')::interval
FROM generate_series(1, 60) g;
INSERT INTO public.bestellungen SELECT g, 1 + g % 60, 'Größe ' || g % 5, now() - (g || ' minutes')::interval
FROM generate_series(1, 120) g;
"""

_REPORTS = """
CREATE TABLE public.daily_sales (day date PRIMARY KEY, amount numeric NOT NULL, computed_at timestamptz NOT NULL);
INSERT INTO public.daily_sales SELECT d::date, extract(doy FROM d) * 10, now() - interval '1 hour'
FROM generate_series(date '2025-11-29', date '2026-11-28', interval '1 day') d;
GRANT SELECT ON public.daily_sales TO "Reporting Team";
"""

_FROZEN = """
CREATE TABLE public.snapshots (id integer PRIMARY KEY, taken timestamptz NOT NULL, note text);
INSERT INTO public.snapshots SELECT g, now() - (g || ' days')::interval, 'frozen ' || g FROM generate_series(1, 40) g;
"""

_ARCHIVE = f"""
CREATE TABLE public.orders_2019 (id integer PRIMARY KEY, placed timestamptz NOT NULL, total numeric NOT NULL);
CREATE TABLE public.order_lines_2019 (id integer PRIMARY KEY, order_id integer NOT NULL REFERENCES public.orders_2019 (id),
                                      shipped timestamp NOT NULL);
INSERT INTO public.orders_2019
SELECT g, timestamptz '{HISTORY_NEWEST}' - (g - 1) * interval '1 day', g FROM generate_series(1, 250) g;
INSERT INTO public.order_lines_2019 SELECT g, 1 + g % 250, timestamp '2019-06-01' + g * interval '1 hour'
FROM generate_series(1, 500) g;
"""

_WRITER_SCRIPT = """\\set uid random(1, 200)
BEGIN;
INSERT INTO public.ticks (writer) VALUES (:client_id);
INSERT INTO "Sales"."Order" ("userId", total) VALUES (10 * :uid, 1.00);
INSERT INTO "Sales"."Order Items" ("orderId", "lineNo", sku, qty)
    VALUES (currval('"Sales".order_no_seq'), 1, 'SKU-W', 1);
UPDATE public."group" SET "table" = "table" WHERE "from" = 1 + :client_id % 3;
END;
"""


@dataclass
class ProdCluster:
    """A built production-shaped cluster and where its pieces live (see the module docstring)."""

    cluster: LocalCluster
    base: Path
    repo_dir: Path
    conf_dir: Path
    tablespace_dir: Path | None
    password_auth: bool
    passwords: dict[str, str] = field(default_factory=lambda: dict(PASSWORDS))

    @property
    def repo_url(self) -> str:
        return f"file://{self.repo_dir}"

    def dsn(self, dbname: str = "shop", user: str = "postgres") -> str:
        """A libpq DSN (no password: use ``env()`` or a config's pgpass for password auth)."""
        return f"host={self.cluster.host} port={self.cluster.port} user={user} dbname={dbname}"

    def connect(self, dbname: str = "shop", user: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        password = self.passwords.get(user) if self.password_auth else None
        return psycopg.connect(
            self.dsn(dbname, user), password=password, autocommit=True, connect_timeout=10, **kwargs
        )

    def sql(
        self, query: str, params: Any = None, *, dbname: str = "shop", user: str = "postgres"
    ) -> list[Any]:
        with self.connect(dbname, user) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def config(
        self, path: Path | None = None, *, user: str = "postgres", dbname: str = "shop", **overrides: Any
    ) -> Path:
        """A gravl-dr config for this cluster and its repository, connecting as ``user``.

        With password auth the password goes into a pgpass file next to the config (PGPASSFILE
        is set by ``env()``), never into the config."""
        data: dict[str, Any] = {
            "cluster": "prodshape",
            "primary": {"dsn": self.dsn(dbname, user)},
            "repository": {"url": self.repo_url},
            "drill": {},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        target = path or self.conf_dir / f"gravl-dr-{user}.yaml"
        target.write_text(yaml.safe_dump(data, sort_keys=False))
        chown_tree(target, PG_USER)
        return target

    @property
    def pgpass(self) -> Path:
        return self.conf_dir / "pgpass"

    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster (PGPASSFILE when passwords are required)."""
        return {"PGPASSFILE": str(self.pgpass)} if self.password_auth else {}

    @contextmanager
    def writes(self, clients: int = 2, rate: int = 200, dbname: str = "shop") -> Iterator[WriteLoad]:
        """pgbench writing into shop (ticks, "Sales"."Order", "Order Items", a hot UPDATE) at
        about ``rate`` transactions/s until the block ends. Writes as app_user (RLS and grants
        of a real application role apply)."""
        load = WriteLoad(self, clients=clients, rate=rate, dbname=dbname)
        load.start()
        try:
            yield load
        finally:
            load.stop()

    def switch_and_wait(self, timeout: float = 30) -> str:
        """pg_switch_wal() and wait until that segment is archived; its name."""
        name = str(self.sql("SELECT pg_walfile_name(pg_switch_wal())", dbname="postgres")[0][0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.sql("SELECT last_archived_wal FROM pg_stat_archiver", dbname="postgres")[0][0]
            if last is not None and last[:24] >= name:
                return name
            time.sleep(0.1)
        raise AssertionError(f"{name} not archived after {timeout}s: {self.cluster.log_tail()}")

    def destroy(self) -> None:
        self.cluster.destroy()
        shutil.rmtree(self.base, ignore_errors=True)
        if self.tablespace_dir is not None:
            shutil.rmtree(self.tablespace_dir, ignore_errors=True)


@dataclass
class WriteLoad:
    """A running pgbench; ``transactions`` (committed, counted in public.ticks) is set by ``stop()``."""

    prod: ProdCluster
    clients: int
    rate: int
    dbname: str
    proc: subprocess.Popen[str] | None = None
    transactions: int = 0
    _script: Path | None = None
    _first_tick: int = 0

    def start(self) -> None:
        self._script = self.prod.conf_dir / f"writer-{time.monotonic_ns()}.sql"
        self._script.write_text(_WRITER_SCRIPT)
        c = self.prod.cluster
        argv = [
            pg_bin("pgbench", c.bindir),
            "-n",
            "-h",
            c.host,
            "-p",
            str(c.port),
            "-U",
            "app_user",
            "-c",
            str(self.clients),
            "-T",
            "3600",
            "-R",
            str(self.rate),
            "-f",
            str(self._script),
            self.dbname,
        ]
        env = {"PATH": "/usr/bin:/bin", **self.prod.env()}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        # wait for the first committed tick, so the load is really running when we return
        deadline = time.monotonic() + 20
        start = self._first_tick = self.prod.sql("SELECT coalesce(max(id), 0) FROM public.ticks")[0][0]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbench exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            if self.prod.sql("SELECT coalesce(max(id), 0) FROM public.ticks")[0][0] > start:
                return
            time.sleep(0.05)
        raise AssertionError("pgbench committed nothing in 20 s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        self.proc = None
        self.transactions = int(
            self.prod.sql("SELECT count(*) FROM public.ticks WHERE id > %s", (self._first_tick,))[0][0]
        )
        if self._script is not None:
            self._script.unlink(missing_ok=True)


def _run(conn: psycopg.Connection[Any], script: str) -> None:
    conn.execute(script)  # a fixed multi-statement script, no parameters


def build_prod_cluster(
    *, tablespace: bool = False, password_auth: bool = False, checksums: bool = True, archive: bool = True
) -> ProdCluster:
    """Build the production-shaped cluster described in this module's docstring (a few seconds)."""
    base = make_private_dir("gravl-test-prodshape-", PG_USER)
    repo_dir = base / "repo"
    conf_dir = base / "conf"
    repo_dir.mkdir()
    conf_dir.mkdir()
    ts_dir = make_private_dir("gravl-test-prodshape-ts-", PG_USER) if tablespace else None
    cluster = LocalCluster(base / "data", free_port(), dbname="shop")
    prod = ProdCluster(
        cluster=cluster,
        base=base,
        repo_dir=repo_dir,
        conf_dir=conf_dir,
        tablespace_dir=ts_dir,
        password_auth=False,
    )
    archive_conf = prod.config(conf_dir / "archive.yaml")
    chown_tree(base, PG_USER)
    extra = {"password_encryption": "'scram-sha-256'", "wal_keep_size": "'0'"}
    if archive:
        extra.update(
            {"archive_mode": "on", "archive_command": f"'{GRAVL_DR} --config {archive_conf} wal-push %p'"}
        )
    try:
        cluster.initdb(checksums=checksums, extra_conf=extra)
        cluster.start()
        with prod.connect("postgres") as conn:
            _run(conn, _ROLES)
            _run(conn, (REPO_ROOT / "infra" / "postgres" / "roles.sql").read_text())
            conn.execute(
                sql.SQL("ALTER ROLE gravl_dr PASSWORD {}").format(sql.Literal(PASSWORDS["gravl_dr"]))
            )
            for db in DATABASES:
                if db == LATIN1_DB:
                    conn.execute(
                        sql.SQL(
                            "CREATE DATABASE {} OWNER app_owner TEMPLATE template0 ENCODING 'LATIN1' "
                            "LC_COLLATE 'C' LC_CTYPE 'C'"
                        ).format(sql.Identifier(db))
                    )
                else:
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER app_owner").format(sql.Identifier(db)))
            if ts_dir is not None:
                conn.execute(
                    sql.SQL("CREATE TABLESPACE app_space OWNER app_owner LOCATION {}").format(
                        sql.Literal(str(ts_dir))
                    )
                )
        with prod.connect("shop") as conn:
            _run(conn, _SHOP_SUPERUSER)
            conn.execute("SET ROLE app_owner")
            _run(conn, _SHOP_OWNER)
            if ts_dir is not None:
                _run(conn, _SHOP_TABLESPACE)
            conn.execute("RESET ROLE")
            _run(conn, _SHOP_LAST)
        for db, script in (
            (LATIN1_DB, _LEGACY),
            (READ_ONLY_DB, _REPORTS),
            (NO_CONNECT_DB, _FROZEN),
            (HISTORY_DB, _ARCHIVE),
        ):
            with prod.connect(db) as conn:
                conn.execute("SET ROLE app_owner")
                _run(conn, script)
        with prod.connect("shop") as conn:  # the one database with large objects
            _run(conn, (REPO_ROOT / "infra" / "postgres" / "roles-per-database.sql").read_text())
        with prod.connect("postgres") as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(READ_ONLY_DB)
                )
            )
            conn.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(NO_CONNECT_DB))
            )
            conn.execute("CHECKPOINT")
        if password_auth:
            _require_passwords(prod)
        prod.pgpass.write_text(
            "".join(f"{cluster.host}:{cluster.port}:*:{role}:{pw}\n" for role, pw in PASSWORDS.items())
        )
        prod.pgpass.chmod(0o600)
        return prod
    except BaseException:
        prod.destroy()
        raise


def _require_passwords(prod: ProdCluster) -> None:
    """scram-sha-256 for every role but postgres (first match wins in pg_hba.conf)."""
    hba = prod.cluster.pgdata / "pg_hba.conf"
    lines = [
        "host all postgres 127.0.0.1/32 trust",
        "host replication postgres 127.0.0.1/32 trust",
        "host all all 127.0.0.1/32 scram-sha-256",
        "host replication all 127.0.0.1/32 scram-sha-256",
    ]
    hba.write_text("\n".join(lines) + "\n" + hba.read_text())
    chown_tree(hba, PG_USER)
    prod.sql("SELECT pg_reload_conf()", dbname="postgres")
    prod.password_auth = True
