"""Issue 9 items 1 and 9: retention counts only backups it verified, reports broken ones loudly;
one unreadable manifest never breaks list, restore latest, expire or wal-check."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
from conftest import pushgateway_metrics

from gravl_testlib import run_cli, take_backup, write_config
from tasks import backup as bsteps
from tasks.config import RetentionConfig, load_config
from tasks.errors import NotFound
from tasks.models import Manifest, StoredObject, new_backup_id
from tasks.repository import FileRepository, open_repository
from tasks.retention import decide_backups, plan_retention, read_state, verify_backups

NOW = datetime(2026, 11, 24, 4, 30, tzinfo=UTC)
BODY = b"x" * 10


def _manifest(stop: datetime, start_seg: int, kind: Literal["physical", "logical"] = "physical") -> Manifest:
    return Manifest(
        id=new_backup_id(kind, stop - timedelta(minutes=5)),
        kind=kind,
        cluster="gravl",
        pg_version=150018,
        system_identifier="7300000000000000001",
        timeline=1,
        start_wal=f"00000001{0:08X}{start_seg:08X}" if kind == "physical" else None,
        start_time=stop - timedelta(minutes=5),
        stop_time=stop,
        codec="zstd",
        objects=[
            StoredObject(
                key="base.tar.zst",
                size=len(BODY),
                sha256=hashlib.sha256(BODY).hexdigest(),
                raw_size=20,
                raw_sha256="1" * 64,
            )
        ],
    )


def _populate(repo: FileRepository, now: datetime) -> list[Manifest]:
    """Four physical backups, 40, 35, 3 and 1 days old, starting at WAL segments 2, 4, 8, 10,
    and WAL segments 1..11; every object holds what its manifest records."""
    ms = []
    for age, start in {40: 2, 35: 4, 3: 8, 1: 10}.items():
        m = _manifest(now - timedelta(days=age), start)
        repo.put_bytes(f"backups/{m.id}/base.tar.zst", BODY)
        repo.put_bytes(f"backups/{m.id}/manifest.json", m.to_json())
        ms.append(m)
    for n in range(1, 12):
        repo.put_bytes(f"wal/00000001/00000001{0:08X}{n:08X}.zst", b"w")
    return ms


def _obj(root: Path, m: Manifest) -> Path:
    return root / "backups" / m.id / "base.tar.zst"


# ---------------------------------------------------------------- item 1: pure rules


def test_a_broken_backup_never_counts_toward_min_full() -> None:
    ms = [_manifest(NOW - timedelta(days=d), 2) for d in (40, 35, 3, 1)]
    policy = RetentionConfig(full_days=30, min_full=2)
    broken = {ms[3].id: "object base.tar.zst is missing", ms[2].id: "object cut"}
    decisions = {d.backup_id: d for d in decide_backups(ms, policy, NOW, "gravl", broken)}
    # the two newest are broken: the two older good ones are the ones counted, and kept
    assert all(d.keep for d in decisions.values())
    assert "BROKEN" in decisions[ms[3].id].reason and "good" in decisions[ms[1].id].reason
    # once two newer good backups exist, an old broken one may go, never the newest good one
    newer = [_manifest(NOW - timedelta(hours=h), 2) for h in (2, 1)]
    decisions = {d.backup_id: d for d in decide_backups(ms + newer, policy, NOW, "gravl", broken)}
    assert decisions[newer[1].id].keep and decisions[newer[0].id].keep
    assert decisions[ms[3].id].keep  # within full_days: kept for inspection


# ---------------------------------------------------------------- item 1: against a repository


def test_expire_keeps_the_good_backups_when_the_newest_are_broken(
    prefect_harness: None,
    file_repo_dir: Path,
    file_repo_url: str,
    tmp_path: Path,
    pushgateway: str,
) -> None:
    import prefect.settings

    # GIVEN four backups; the newest has its object cut short, the second newest lost its object
    repo = FileRepository(file_repo_dir, file_repo_url)
    ms = _populate(repo, datetime.now(UTC))
    cut = _obj(file_repo_dir, ms[3])
    cut.write_bytes(cut.read_bytes()[:4])
    _obj(file_repo_dir, ms[2]).unlink()
    cfg = write_config(
        tmp_path / "gravl-dr.yaml",
        {
            "cluster": "gravl",
            "primary": {"dsn": "host=127.0.0.1 port=1 dbname=gravl"},
            "repository": {"url": file_repo_url},
            "retention": {"full_days": 30, "min_full": 2},
            "metrics": {"pushgateway": pushgateway},
        },
    )
    # WHEN expire runs
    proc = run_cli(
        "expire", "--json", config=cfg, env={"PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value())}
    )
    # THEN it fails loudly, naming both broken backups...
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["broken"]) == {ms[2].id, ms[3].id}
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gravl-dr: error:")]
    assert len(errors) == 1 and ms[2].id in errors[0] and ms[3].id in errors[0]
    # ...keeps the good older backups and the WAL they need
    assert out["expired"] == []
    assert [m.id for m in bsteps.list_backups(repo)] == [m.id for m in ms]
    assert out["wal_expired"] == 1  # segment 1 only: the oldest good backup starts at 2
    assert set(out["verified"]) == {ms[0].id, ms[1].id}
    # AND the Pushgateway holds the count of broken backups
    metrics = pushgateway_metrics(pushgateway)
    assert any(
        ln.startswith("gravl_expire_backups_broken{") and ln.endswith(" 2") for ln in metrics.splitlines()
    ), metrics


def test_expire_rereads_the_backups_it_counts_on(file_repo_dir: Path, file_repo_url: str) -> None:
    # GIVEN the newest backup's object has the right size but other bytes (only a full read sees it)
    repo = FileRepository(file_repo_dir, file_repo_url)
    now = datetime.now(UTC)
    ms = _populate(repo, now)
    _obj(file_repo_dir, ms[3]).write_bytes(b"y" * len(BODY))
    policy = RetentionConfig(full_days=30, min_full=2)
    # WHEN retention checks, then plans
    state = verify_backups(repo, read_state(repo), policy, "gravl")
    plan = plan_retention(state, policy, now, "gravl")
    # THEN the corrupt backup is broken and not counted: the 3- and 35-day ones are, the 40-day goes
    assert list(state.broken) == [ms[3].id] and "SHA-256 mismatch" in state.broken[ms[3].id]
    assert sorted(state.verified) == sorted([ms[2].id, ms[1].id])
    assert [b.backup_id for b in plan.expire] == [ms[0].id]
    # AND with verify: size, the cheap check alone cannot see it (documented trade-off)
    cheap = verify_backups(
        repo, read_state(repo), RetentionConfig(full_days=30, min_full=2, verify="size"), "gravl"
    )
    assert cheap.broken == {} and cheap.verified == []


def test_wal_check_is_not_ok_when_the_newest_backup_is_broken(
    file_repo_dir: Path, file_repo_url: str, tmp_path: Path
) -> None:
    from tasks.walcheck import check_wal

    repo = FileRepository(file_repo_dir, file_repo_url)
    ms = _populate(repo, datetime.now(UTC))
    cfg = load_config(
        str(
            write_config(
                tmp_path / "gravl-dr.yaml",
                {
                    "cluster": "gravl",
                    "primary": {"dsn": "host=127.0.0.1 port=1 dbname=gravl"},
                    "repository": {"url": file_repo_url, "compression": "zstd"},
                },
            )
        )
    )
    _obj(file_repo_dir, ms[3]).unlink()
    report = check_wal(cfg, repo, server=False)
    assert not report.ok
    assert any("BROKEN" in p and ms[3].id in p for p in report.problems), report.problems
    assert any(ms[2].id in p and "restorable" in p for p in report.problems), report.problems


# ---------------------------------------------------------------- item 9: unreadable manifests

BAD_MANIFESTS = {
    "not-json": b"{not json",
    "json-list": b"[1, 2, 3]",
    "wrong-schema": json.dumps({"version": 1, "id": "x", "objects": "none"}).encode(),
}


def _plant_invalid(repo: FileRepository, now: datetime) -> dict[str, str]:
    ids = {}
    for i, (name, body) in enumerate(BAD_MANIFESTS.items()):
        bid = new_backup_id("physical", now + timedelta(seconds=i + 1))
        repo.put_bytes(f"backups/{bid}/base.tar.zst", b"data")
        repo.put_bytes(f"backups/{bid}/manifest.json", body)
        ids[name] = bid
    return ids


def test_one_unreadable_manifest_breaks_nothing(
    make_config: Any, file_repo_url: str, file_repo_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a good backup, a broken one (object gone) and three newer unreadable manifests
    cfg_path = make_config(file_repo_url)
    cfg = load_config(str(cfg_path))
    repo = open_repository(cfg.repository)
    assert isinstance(repo, FileRepository)
    good = take_backup(cfg, repo, "logical")
    broken = take_backup(cfg, repo, "logical")
    (file_repo_dir / "backups" / broken.id / broken.objects[0].key).unlink()
    invalid = _plant_invalid(repo, datetime.now(UTC) + timedelta(minutes=1))
    # WHEN list runs THEN every backup is shown, with its status and the reason
    proc = run_cli("list", config=cfg_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines()[1:]}
    assert " OK " in rows[good.id]
    assert " BROKEN " in rows[broken.id] and "missing" in rows[broken.id]
    assert "not valid JSON" in rows[invalid["not-json"]]
    assert "JSON list" in rows[invalid["json-list"]]
    assert "malformed" in rows[invalid["wrong-schema"]]
    assert all(" INVALID " in rows[b] for b in invalid.values())
    doc = json.loads(run_cli("list", "--json", config=cfg_path).stdout)
    assert {d["id"]: d["status"] for d in doc}[broken.id] == "BROKEN"
    # AND restore latest picks the good backup, saying what it skipped
    with caplog.at_level(logging.WARNING, logger="tasks.backup"):
        assert bsteps.resolve_backup(repo, "latest", cluster="gravl").id == good.id
    skipped = caplog.text
    assert broken.id in skipped and all(b in skipped for b in invalid.values())
    # AND retention reads the repository, leaves the unreadable folders alone, reports them
    state = verify_backups(repo, read_state(repo), cfg.retention, "gravl")
    assert set(state.invalid) == set(invalid.values()) and list(state.broken) == [broken.id]
    plan = plan_retention(state, cfg.retention, datetime.now(UTC) + timedelta(days=400), "gravl")
    assert not any(k.split("/")[1] in invalid.values() for k in plan.orphan_keys)
    assert plan.expire == [] or good.id not in [b.backup_id for b in plan.expire]


def test_restore_latest_with_nothing_restorable_names_what_it_skipped(
    file_repo_dir: Path, file_repo_url: str
) -> None:
    repo = FileRepository(file_repo_dir, file_repo_url)
    invalid = _plant_invalid(repo, datetime.now(UTC))
    with pytest.raises(NotFound, match="skipped") as err:
        bsteps.resolve_backup(repo, "latest")
    assert all(b in str(err.value) for b in invalid.values())
