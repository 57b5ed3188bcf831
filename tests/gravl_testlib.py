"""Shared helpers for the test suite (imported by conftest and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.polling import poll_until

REPO_ROOT = Path(__file__).resolve().parent.parent
GRAVL_DR = str(Path(sys.executable).parent / "gravl-dr")


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, what: str, timeout: float = 20) -> None:
    """Wait until something accepts TCP connections on host:port."""
    if not poll_until(lambda: listening(host, port), timeout=timeout, interval=0.05):
        raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(
    *args: str,
    config: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the installed gravl-dr command as a user would."""
    argv = [GRAVL_DR]
    if config is not None:
        argv += ["--config", str(config)]
    argv += list(args)
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=full_env, input=input, cwd=str(REPO_ROOT)
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """The CLI contract for bad input: non-zero exit, one error line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gravl-dr: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def take_backup(cfg: Any, repo: Any, kind: str = "physical") -> Any:
    """The backup flow's steps without Prefect: preflight, lock, stream, verify, publish."""
    from tasks import backup as steps

    pre = steps.preflight(cfg, repo, kind)
    steps.acquire_lock(repo, pre.backup_id)
    try:
        res = steps.stream_backup(cfg, repo, pre)
        manifest = steps.build_manifest(cfg, pre, res)
        steps.verify_objects(repo, manifest)
        steps.publish_manifest(repo, manifest)
        return manifest
    except BaseException:
        steps.discard_incomplete(repo, pre.backup_id)
        raise
    finally:
        steps.release_lock(repo, pre.backup_id)


def flow_run_events(run_id: Any) -> list[Any]:
    """Every event the server stored for this flow run (as its resource), newest first."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(
            filter=EventFilter(resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"])), limit=50
        )
    return list(page.events)


def settled_flow_run_events(run_id: Any) -> list[Any]:
    """The run's events once its terminal state event is stored (the server persists in batches;
    a heartbeat is sent before the run ends, so it is stored by then too)."""
    events: list[Any] = []

    def settled() -> bool:
        events[:] = flow_run_events(run_id)
        return any(e.event == "prefect.flow-run.Completed" for e in events)

    assert poll_until(settled, timeout=60, interval=0.25), f"no Completed event for run {run_id}: {events}"
    return events
