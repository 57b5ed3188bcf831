"""Adapter: the Gravl sample schema and data, for the demo, drills and tests.

A small but realistic slice of the Gravl fitness app: users, workouts, logs, swaps, recovery,
custom workouts; with foreign keys, checks and indexes, and deterministic data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.errors import PermanentError
from tasks.pgcluster import chown_tree
from tasks.polling import poll_until
from tasks.postgres import connection

SCHEMA = """
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    display_name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    experience_level text NOT NULL CHECK (experience_level IN ('beginner','intermediate','advanced'))
);
CREATE TABLE workouts (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    muscle_group text NOT NULL,
    difficulty smallint NOT NULL CHECK (difficulty BETWEEN 1 AND 5),
    duration_minutes integer NOT NULL CHECK (duration_minutes > 0)
);
CREATE TABLE workout_logs (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id),
    workout_id bigint NOT NULL REFERENCES workouts(id),
    completed_at timestamptz NOT NULL,
    sets integer NOT NULL CHECK (sets >= 0),
    reps integer NOT NULL CHECK (reps >= 0),
    weight_kg numeric(6,2),
    notes text
);
CREATE INDEX workout_logs_user_completed ON workout_logs (user_id, completed_at);
CREATE TABLE workout_swaps (
    id bigserial PRIMARY KEY,
    workout_log_id bigint NOT NULL REFERENCES workout_logs(id),
    from_workout_id bigint NOT NULL REFERENCES workouts(id),
    to_workout_id bigint NOT NULL REFERENCES workouts(id),
    reason text,
    swapped_at timestamptz NOT NULL
);
CREATE INDEX workout_swaps_log ON workout_swaps (workout_log_id);
CREATE TABLE muscle_group_recovery (
    user_id bigint NOT NULL REFERENCES users(id),
    muscle_group text NOT NULL,
    recovery_score smallint NOT NULL CHECK (recovery_score BETWEEN 0 AND 100),
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, muscle_group)
);
CREATE TABLE custom_workouts (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id),
    name text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX custom_workouts_user ON custom_workouts (user_id);
CREATE TABLE custom_workout_exercises (
    id bigserial PRIMARY KEY,
    custom_workout_id bigint NOT NULL REFERENCES custom_workouts(id) ON DELETE CASCADE,
    workout_id bigint NOT NULL REFERENCES workouts(id),
    position smallint NOT NULL,
    target_sets integer NOT NULL,
    target_reps integer NOT NULL,
    UNIQUE (custom_workout_id, position)
);
"""

DATA = """
SELECT setseed(0.42);
INSERT INTO users (email, display_name, created_at, experience_level)
SELECT 'user' || g || '@gravl.example', 'User ' || g, now() - (g || ' hours')::interval,
       (ARRAY['beginner','intermediate','advanced'])[1 + g % 3]
FROM generate_series(1, %(users)s) g;
INSERT INTO workouts (name, muscle_group, difficulty, duration_minutes)
SELECT 'Workout ' || g, (ARRAY['chest','back','legs','shoulders','arms','core'])[1 + g % 6],
       1 + g % 5, 10 + (g * 7) % 80
FROM generate_series(1, 60) g;
INSERT INTO workout_logs (user_id, workout_id, completed_at, sets, reps, weight_kg, notes)
SELECT 1 + (g * 7919) % %(users)s, 1 + (g * 31) % 60, now() - ((g % 2000) || ' minutes')::interval,
       1 + g % 6, 5 + g % 15, round((20 + (g % 120))::numeric, 2),
       CASE WHEN g % 5 = 0 THEN 'felt strong' END
FROM generate_series(1, %(logs)s) g;
INSERT INTO workout_swaps (workout_log_id, from_workout_id, to_workout_id, reason, swapped_at)
SELECT l.id, l.workout_id, 1 + (l.workout_id % 60), 'equipment busy', l.completed_at
FROM workout_logs l WHERE l.id % 13 = 0;
INSERT INTO muscle_group_recovery (user_id, muscle_group, recovery_score, updated_at)
SELECT u.id, m, (u.id * 17 + length(m) * 7) % 101, now() - interval '1 hour'
FROM users u CROSS JOIN unnest(ARRAY['chest','back','legs','shoulders','arms','core']) m;
INSERT INTO custom_workouts (user_id, name, created_at)
SELECT 1 + (g * 13) % %(users)s, 'My plan ' || g, now() - (g || ' days')::interval
FROM generate_series(1, %(custom)s) g;
INSERT INTO custom_workout_exercises (custom_workout_id, workout_id, position, target_sets, target_reps)
SELECT c.id, 1 + (c.id * p) % 60, p, 3, 10 FROM custom_workouts c CROSS JOIN generate_series(1, 4) p;
ANALYZE;
"""

TABLES = [
    "users",
    "workouts",
    "workout_logs",
    "workout_swaps",
    "muscle_group_recovery",
    "custom_workouts",
    "custom_workout_exercises",
]


def load_sample(dsn: str, *, users: int = 200, logs: int = 5000, custom: int = 50) -> dict[str, Any]:
    """Create the Gravl schema in ``dsn``'s database and fill it deterministically."""
    with connection(dsn) as conn, conn.transaction():
        conn.execute(SCHEMA)
        sql = (
            DATA.replace("%(users)s", str(int(users)))
            .replace("%(logs)s", str(int(logs)))
            .replace("%(custom)s", str(int(custom)))
        )
        for statement in (s.strip() for s in sql.split(";")):
            if statement:
                conn.execute(statement)
    return {"users": users, "logs": logs, "custom": custom}


def create_database(dsn: str, name: str) -> None:
    from psycopg import sql

    with connection(dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def write_and_archive(dsn: str, rows: int, timeout: float = 60) -> str:
    """Log ``rows`` new workouts, switch WAL and wait until the server has archived the segment
    holding them (the demo's writes after its base backup: only WAL replay can bring them back).
    Returns that segment's name; PermanentError when it is not archived within ``timeout``."""
    with connection(dsn) as conn:
        conn.execute(
            "INSERT INTO workout_logs (user_id, workout_id, completed_at, sets, reps, weight_kg, notes) "
            "SELECT 1 + g %% 50, 1 + g %% 60, now(), 3, 10, 42.5, 'after the backup' "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        wal = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
        name = str(wal[0]) if wal else ""

        def archived() -> bool:
            row = conn.execute("SELECT last_archived_wal, failed_count FROM pg_stat_archiver").fetchone()
            return bool(row and row[0] and row[0] >= name)

        if not poll_until(archived, timeout=timeout, interval=0.2):
            raise PermanentError(f"WAL segment {name} was not archived within {timeout:.0f} s")
    return name


def demo_config(base: Path, port: int, suites_dir: Path) -> Path:
    """Write the demo's gravl-dr config under ``base``: cluster ``gravl-demo`` on 127.0.0.1:``port``,
    a file repository next to it that the server (as postgres) archives its WAL into."""
    import yaml

    path = base / "gravl-dr.yaml"
    repo = base / "repository"
    repo.mkdir()
    chown_tree(repo, "postgres")  # the server's archive_command writes WAL here
    path.write_text(
        yaml.safe_dump(
            {
                "cluster": "gravl-demo",
                "primary": {"dsn": f"host=127.0.0.1 port={port} user=postgres dbname=gravl"},
                "repository": {"url": f"file://{repo}", "compression": "zstd"},
                "drill": {"suites_dir": str(suites_dir)},
            },
            sort_keys=False,
        )
    )
    chown_tree(path, "postgres")
    return path
