"""Unit tier: what a restore request must make sense of before it touches anything
(tasks/restore.py: check_restore_request, check_archive_reaches)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_replay import backup

from tasks.errors import ConfigError, PreconditionFailed
from tasks.recovery import RecoveryTarget
from tasks.replay import archive_view
from tasks.restore import check_archive_reaches, check_restore_request

pytestmark = pytest.mark.unit

END = RecoveryTarget()
DSN = "host=127.0.0.1 dbname=shop"


@pytest.mark.parametrize(
    ("pgdata", "dsn", "target", "error"),
    [
        ("/srv/pg", None, END, None),
        (None, DSN, END, None),
        ("/srv/pg", None, RecoveryTarget.from_options(lsn="0/3000060"), None),
        (None, None, END, "exactly one of --pgdata"),
        ("/srv/pg", DSN, END, "exactly one of --pgdata"),
        (None, f"{DSN} password=secret", END, "carries a password"),
        (None, DSN, RecoveryTarget.from_options(lsn="0/3000060"), "needs a physical restore"),
    ],
)
def test_restore_request(
    pgdata: str | None, dsn: str | None, target: RecoveryTarget, error: str | None
) -> None:
    if error is None:
        check_restore_request(pgdata, dsn, target)
        return
    with pytest.raises((PreconditionFailed, ConfigError), match=error) as info:
        check_restore_request(pgdata, dsn, target)
    assert "secret" not in str(info.value)


def test_a_target_needs_wal_after_the_backup_and_within_the_archive() -> None:
    manifest = backup()  # stops in segment 5
    empty = archive_view(["000000010000000000000004"], manifest)  # nothing past the backup
    more = archive_view(["000000010000000000000005", "000000010000000000000007"], manifest)
    check_archive_reaches(empty, manifest, END)  # to the end: the backup's own end will do
    with pytest.raises(PreconditionFailed, match="holds nothing after backup"):
        check_archive_reaches(empty, manifest, RecoveryTarget.from_options(lsn="0/5000100"))
    check_archive_reaches(more, manifest, RecoveryTarget.from_options(lsn="0/7FFFFFF"))
    with pytest.raises(PreconditionFailed, match="past the end of the archive"):
        check_archive_reaches(more, manifest, RecoveryTarget.from_options(lsn="0/8000001"))


def test_the_flush_behind_thread_runs_only_while_the_restore_writes_and_never_fails_it(
    tmp_path: Path,
) -> None:
    """flushing_behind (tasks/restore.py): a thread flushes the target's filesystem while the
    body writes, ends with the body, and a target that vanishes under it (the clean-up of a
    failed restore) is not an error of its own: the final sync decides."""
    import threading

    from tasks.restore import flushing_behind

    target = tmp_path / "pgdata"
    target.mkdir()

    def flushers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "gravl-flush-behind"]

    with flushing_behind(lambda: [target, tmp_path / "not-there"], pause=0.01):
        assert len(flushers()) == 1
        (target / "f").write_bytes(b"x" * 65536)
        target.joinpath("f").unlink()
        target.rmdir()  # gone while the thread still flushes
        threading.Event().wait(0.05)
    assert flushers() == []
