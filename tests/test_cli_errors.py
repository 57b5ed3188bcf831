"""Bad input: one line naming what is wrong, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gravl_testlib import assert_one_line_error, run_cli, write_config
from tasks.pgcluster import LocalCluster, free_port


def test_unknown_config_key(tmp_path: Path, file_repo_url: str, pg_primary: LocalCluster) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {"primary": {"dsn": pg_primary.dsn()}, "repository": {"url": file_repo_url, "compresion": "zstd"}},
    )
    assert_one_line_error(run_cli("list", config=cfg), "unknown key", "repository.compresion")


def test_wrong_type_names_the_key(tmp_path: Path, file_repo_url: str, pg_primary: LocalCluster) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "primary": {"dsn": pg_primary.dsn()},
            "repository": {"url": file_repo_url},
            "retention": {"min_full": "many"},
        },
    )
    assert_one_line_error(run_cli("list", config=cfg), "retention.min_full")


@pytest.mark.integration  # starts a process
def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("list", config=tmp_path / "nope.yaml"), "config file not found")


def test_config_from_environment_variable(
    tmp_path: Path, file_repo_url: str, pg_primary: LocalCluster
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", {"primary": {"dsn": pg_primary.dsn()}, "repository": {"url": file_repo_url}}
    )
    proc = run_cli("list", env={"GRAVL_DR_CONFIG": str(cfg)})
    assert proc.returncode == 0, proc.stderr
    assert "no backups" in proc.stdout


@pytest.mark.integration  # starts a process
def test_unreachable_server(tmp_path: Path, file_repo_url: str) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "primary": {"dsn": f"host=127.0.0.1 port={free_port()} user=postgres dbname=gravl"},
            "repository": {"url": file_repo_url},
        },
    )
    proc = run_cli("backup", config=cfg)
    assert_one_line_error(proc, "cannot connect to host=127.0.0.1")


def test_missing_bucket(tmp_path: Path, moto_endpoint: str, pg_primary: LocalCluster) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "primary": {"dsn": pg_primary.dsn()},
            "repository": {
                "url": "s3://no-such-bucket-gravl/x",
                "endpoint_url": moto_endpoint,
                "region": "eu-north-1",
            },
        },
    )
    assert_one_line_error(run_cli("backup", config=cfg), "bucket no-such-bucket-gravl does not exist")
    assert_one_line_error(run_cli("list", config=cfg), "bucket no-such-bucket-gravl does not exist")


def test_non_empty_restore_target(
    tmp_path: Path, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    cfg = make_config(file_repo_url)
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("restore", "latest", "--pgdata", str(target), config=cfg), "not empty")
    assert (target / "keep.txt").read_text() == "precious"


def test_unknown_backup_id(make_config: Callable[..., Path], file_repo_url: str, tmp_path: Path) -> None:
    cfg = make_config(file_repo_url)
    assert_one_line_error(
        run_cli("verify", "20200101T000000Z-physical", config=cfg),
        "backup 20200101T000000Z-physical not found",
    )
    assert_one_line_error(
        run_cli("restore", "20200101T000000Z-physical", "--pgdata", str(tmp_path / "d"), config=cfg),
        "not found",
    )
    assert_one_line_error(run_cli("verify", "yesterday", config=cfg), "invalid backup id")


def test_no_backup_for_latest(make_config: Callable[..., Path], file_repo_url: str, tmp_path: Path) -> None:
    cfg = make_config(file_repo_url)
    assert_one_line_error(
        run_cli("restore", "latest", "--pgdata", str(tmp_path / "d"), config=cfg),
        "no complete physical backup",
    )


def test_bad_argument_is_one_line(make_config: Callable[..., Path], file_repo_url: str) -> None:
    cfg = make_config(file_repo_url)
    proc = run_cli("backup", "--kind", "incremental", config=cfg)
    assert_one_line_error(proc, "--kind")
    assert proc.returncode == 2


def test_list_does_not_import_prefect_or_boto3(make_config: Callable[..., Path], file_repo_url: str) -> None:
    cfg = make_config(file_repo_url)
    proc = run_cli("list", config=cfg, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if "import time" in ln}
    assert "prefect" not in imported and "boto3" not in imported


def test_a_flow_command_ending_without_teardown_keeps_its_run_logs_and_artifact(
    prefect_harness: None, make_config: Callable[..., Path], file_repo_url: str
) -> None:
    # GIVEN a Prefect API (the session harness) and a flow command run as a user would
    import prefect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    cfg = make_config(file_repo_url)
    api = str(prefect.settings.PREFECT_API_URL.value())
    # WHEN it ends (the CLI skips the interpreter's module teardown after the exit handlers)
    proc = run_cli("backup", "--dry-run", config=cfg, env={"PREFECT_API_URL": api})
    assert proc.returncode == 0, proc.stderr
    # THEN Prefect recorded the run as completed, with its last log line and its artifact
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    assert run.state is not None and run.state.is_completed(), run.state
    assert any("Finished in state Completed" in str(log.message) for log in logs)
    assert [a.key for a in artifacts] == ["backup-report-gravl"]


def test_the_temporary_api_server_of_a_command_prints_only_fatal_errors(
    tmp_path: Path, file_repo_url: str, pg_primary: LocalCluster
) -> None:
    import os
    import subprocess
    import time

    from gravl_testlib import GRAVL_DR, REPO_ROOT

    # GIVEN a flow command run without PREFECT_API_URL (Prefect starts a temporary API server
    # as its subprocess, writing to the command's stderr; stopping it at the end can cut off one
    # of its services mid-flush, which it logs as an ERROR with a traceback)
    cfg = write_config(
        tmp_path / "c.yaml", {"primary": {"dsn": pg_primary.dsn()}, "repository": {"url": file_repo_url}}
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_LOGGING_LEVEL")
    }
    env["GRAVL_DR_NO_WARM"] = "1"
    proc = subprocess.Popen(
        [GRAVL_DR, "--config", str(cfg), "backup", "--dry-run"],
        env=env,
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # WHEN its temporary server is up
    server_env: dict[str, str] = {}
    deadline = time.monotonic() + 120
    while not server_env and proc.poll() is None and time.monotonic() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
                stat = (cmdline.parent / "stat").read_text()
                if b"uvicorn" in argv and int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                    raw = (cmdline.parent / "environ").read_bytes().split(b"\0")
                    server_env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
            except (OSError, ValueError):
                continue
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    # THEN the command succeeded, and its server logs only fatal errors to the terminal
    assert proc.returncode == 0, err
    assert server_env, "no temporary API server seen"
    assert server_env.get("PREFECT_SERVER_LOGGING_LEVEL") == "CRITICAL", server_env.get(
        "PREFECT_SERVER_LOGGING_LEVEL"
    )
    assert "Traceback" not in err
