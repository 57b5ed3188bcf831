"""The warm process (`gravl-dr warm`): a command handed to it behaves as the same command run
in-process — same flow run and artifact, same output and exit status, signals reach it — and a
request it must not serve (another environment, a stale socket) runs in-process instead."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flows.cli import warm
from gravl_testlib import (
    GRAVL_DR,
    REPO_ROOT,
    assert_one_line_error,
    run_cli,
    settled_flow_run_events,
    write_config,
)
from tasks.polling import poll_until


@dataclass
class Warm:
    proc: subprocess.Popen[bytes]
    socket: Path
    env: dict[str, str]  # what a client needs: the same PREFECT_* and the socket
    log: Path  # the warm process's stdout and stderr


@pytest.fixture(scope="module")
def warm_process(prefect_harness: None) -> Iterator[Warm]:
    import prefect

    api = str(prefect.settings.PREFECT_API_URL.value())
    home = Path(tempfile.mkdtemp(prefix="gravl-warm-"))  # mode 0700
    sock = home / "warm.sock"
    env = {"PREFECT_API_URL": api, "GRAVL_DR_WARM_SOCKET": str(sock), "GRAVL_DR_NO_WARM": ""}
    log = home / "warm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [GRAVL_DR, "warm"], env={**os.environ, **env}, stdout=out, stderr=out, cwd=str(REPO_ROOT)
        )
    try:
        assert warm.wait_for_socket(sock, 120), "gravl-dr warm did not listen"
        yield Warm(proc, sock, env, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_fingerprint_follows_the_import_time_environment_only() -> None:
    # GIVEN an operator's environment
    base = {
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "GRAVL_DR_CONFIG": "/etc/a.yaml",
        "PGPASSWORD": "x",
    }
    same = warm.fingerprint(base)
    # THEN what each command reads itself does not matter...
    assert (
        warm.fingerprint({**base, "GRAVL_DR_CONFIG": "/etc/b.yaml", "PGPASSWORD": "y", "AWS_PROFILE": "p"})
        == same
    )
    assert warm.fingerprint({**base, "DO_NOT_TRACK": "1"}) == same  # gravl-dr's own default, spelled out
    # ... and what Prefect reads when it is imported does
    assert warm.fingerprint({**base, "PREFECT_API_URL": "http://127.0.0.1:4201/api"}) != same
    assert warm.fingerprint({**base, "PREFECT_HOME": "/srv/other"}) != same
    assert warm.fingerprint({**base, "PREFECT_LOGGING_LEVEL": "DEBUG"}) != same
    # AND the default socket is per user and per environment
    path = warm.socket_path(base)
    assert path.parent == warm.socket_dir() and path.name == f"{same}.sock"
    assert str(os.geteuid()) in path.parent.name


def test_secrets_in_a_command_environment_never_reach_the_warm_process_log(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a command whose environment carries a password and a key
    cfg = make_config(file_repo_url)
    secret = "s3cret-" + os.urandom(8).hex()
    # WHEN it runs through the warm process (and fails, with an error)
    proc = run_cli(
        "verify", "latest", config=cfg, env={**warm_process.env, "PGPASSWORD": secret, "GRAVL_DR_KEY": secret}
    )
    # THEN neither its output nor the warm process's log holds them
    assert proc.returncode != 0
    assert secret not in proc.stdout + proc.stderr
    assert secret not in warm_process.log.read_text(errors="replace")


def _imported(stderr: str) -> set[str]:
    return {ln.split("|")[-1].strip() for ln in stderr.splitlines() if "import time:" in ln}


def _normalize(text: str) -> str:
    """What differs between two dry runs of the same command: the backup id, the free space."""
    text = re.sub(r"\d{8}T\d{6}Z-physical-[0-9a-f]+", "ID", text)
    return re.sub(r"\d+ MiB free", "N MiB free", text)


def _last_run() -> tuple[Any, list[Any], list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    return run, logs, artifacts


def _run_count() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


def _command_children(daemon: int) -> list[int]:
    """The commands the warm process runs: children of its per-connection sessions."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)] = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    sessions = {p for p, pp in parents.items() if pp == daemon}
    return [p for p, pp in parents.items() if pp in sessions]


def test_a_flow_command_through_the_warm_process_is_the_same_run_output_and_artifact(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a warm process and a config
    cfg = make_config(file_repo_url)
    # WHEN the same flow command runs through it and in-process
    served = run_cli(
        "backup", "--dry-run", config=cfg, env={**warm_process.env, "PYTHONPROFILEIMPORTTIME": "1"}
    )
    warm_run, warm_logs, warm_artifacts = _last_run()
    alone = run_cli("backup", "--dry-run", config=cfg, env={**warm_process.env, "GRAVL_DR_NO_WARM": "1"})
    cold_run, _, cold_artifacts = _last_run()
    # THEN the command ran in the warm process (this process never imported Prefect)...
    assert served.returncode == 0, served.stderr
    assert not {m for m in _imported(served.stderr) if m.split(".")[0] == "prefect"}
    # ... and Prefect recorded a completed run with its logs and its artifact, as in-process
    assert warm_run.id != cold_run.id and warm_run.flow_id == cold_run.flow_id
    assert warm_run.state is not None and warm_run.state.is_completed(), warm_run.state
    assert any("Finished in state Completed" in str(log.message) for log in warm_logs)
    assert [a.key for a in warm_artifacts] == [a.key for a in cold_artifacts] == ["backup-report-gravl"]
    # ... and its flow-run heartbeat (what a zombie-run automation keys on), as in-process
    for run in (warm_run, cold_run):
        beats = [e for e in settled_flow_run_events(run.id) if e.event == "prefect.flow-run.heartbeat"]
        assert [e.resource.id for e in beats] == [f"prefect.flow-run.{run.id}"], beats
    # AND it printed the same, with the same exit status
    assert alone.returncode == served.returncode == 0
    assert _normalize(served.stdout) == _normalize(alone.stdout)
    served_err = "\n".join(ln for ln in served.stderr.splitlines() if "import time:" not in ln)
    assert _normalize(served_err) == _normalize(alone.stderr)


def test_a_flow_command_without_the_heartbeat_still_records_its_run_and_artifact(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN an operator who turned Prefect's flow-run heartbeat off for CLI runs
    cfg = make_config(file_repo_url)
    # WHEN a flow command runs through the warm process
    proc = run_cli(
        "backup", "--dry-run", config=cfg, env={**warm_process.env, "GRAVL_DR_FLOW_HEARTBEAT": "off"}
    )
    # THEN the run, its logs and its artifact are recorded as with the heartbeat
    assert proc.returncode == 0, proc.stderr
    run, logs, artifacts = _last_run()
    assert run.state is not None and run.state.is_completed(), run.state
    assert any("Finished in state Completed" in str(log.message) for log in logs)
    assert [a.key for a in artifacts] == ["backup-report-gravl"]


def test_bad_input_through_the_warm_process_is_one_line_and_the_same_exit_status(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    cfg = make_config(file_repo_url)
    for argv, needle in (
        (("backup", "--kind", "incremental"), "--kind"),
        (("verify", "yesterday"), "invalid"),
    ):
        served = run_cli(*argv, config=cfg, env=warm_process.env)
        alone = run_cli(*argv, config=cfg, env={**warm_process.env, "GRAVL_DR_NO_WARM": "1"})
        assert_one_line_error(served, needle)
        assert (served.returncode, served.stdout, served.stderr) == (
            alone.returncode,
            alone.stdout,
            alone.stderr,
        )


def test_a_stale_socket_falls_back_to_running_in_process(make_config: Any, file_repo_url: str) -> None:
    # GIVEN a socket file nobody listens on any more (a warm process killed with -9)
    home = Path(tempfile.mkdtemp(prefix="gravl-warm-stale-"))
    stale = home / "warm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
    cfg = make_config(file_repo_url)
    # WHEN a command runs
    proc = run_cli(
        "list",
        config=cfg,
        env={"GRAVL_DR_WARM_SOCKET": str(stale), "GRAVL_DR_NO_WARM": "", "PYTHONPROFILEIMPORTTIME": "1"},
    )
    # THEN it ran in-process (its own imports) and answered
    assert proc.returncode == 0, proc.stderr
    assert "tasks.config" in _imported(proc.stderr)
    assert "no backups" in proc.stdout


def test_a_socket_in_a_directory_others_can_enter_is_not_used(
    warm_process: Warm, make_config: Any, file_repo_url: str, tmp_path: Path
) -> None:
    # GIVEN a link to the warm socket from a directory other users can write to
    shared = Path(tempfile.mkdtemp(prefix="gravl-warm-shared-"))
    shared.chmod(0o777)
    (shared / "warm.sock").symlink_to(warm_process.socket)
    cfg = make_config(file_repo_url)
    # WHEN a command is pointed at it
    proc = run_cli(
        "list",
        config=cfg,
        env={
            **warm_process.env,
            "GRAVL_DR_WARM_SOCKET": str(shared / "warm.sock"),
            "PYTHONPROFILEIMPORTTIME": "1",
        },
    )
    # THEN it is not trusted: the command runs in-process
    assert proc.returncode == 0, proc.stderr
    assert "tasks.config" in _imported(proc.stderr)
    # AND the warm process's own socket is owner-only
    assert warm_process.socket.stat().st_mode & 0o777 == 0o600
    assert warm_process.socket.parent.stat().st_mode & 0o777 == 0o700


def test_another_prefect_api_never_runs_in_a_warm_process_started_for_another(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a warm process started for the harness's API, and a client whose PREFECT_API_URL
    # names another server (here one that does not answer)
    cfg = make_config(file_repo_url)
    before = _run_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        elsewhere = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    # WHEN the client hands it a flow command over its socket
    proc = run_cli(
        "backup",
        "--dry-run",
        config=cfg,
        env={**warm_process.env, "PREFECT_API_URL": elsewhere, "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=300,
    )
    # THEN the warm process refused it: it ran in-process against the other API (and failed
    # there, with one line), and no flow run appeared on the warm process's server
    assert "prefect" in _imported(proc.stderr)
    assert proc.returncode != 0
    assert _run_count() == before


def test_each_command_uses_its_own_config_and_directory(
    warm_process: Warm, make_config: Any, file_repo_url: str, tmp_path: Path
) -> None:
    # GIVEN two configs for two clusters, one named by GRAVL_DR_CONFIG, one found in the cwd
    one = make_config(file_repo_url, name="one.yaml", cluster="first")
    here = tmp_path / "cwd"
    here.mkdir()
    write_config(here / "gravl-dr.yaml", {**_yaml(one), "cluster": "second"})
    # WHEN both run through the same warm process
    first = run_cli("backup", "--dry-run", env={**warm_process.env, "GRAVL_DR_CONFIG": str(one)})
    _, _, first_artifacts = _last_run()
    second = subprocess.run(
        [GRAVL_DR, "backup", "--dry-run"],
        env={**os.environ, **warm_process.env},
        cwd=here,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _, _, second_artifacts = _last_run()
    # THEN each used its own
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert [a.key for a in first_artifacts] == ["backup-report-first"]
    assert [a.key for a in second_artifacts] == ["backup-report-second"]


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def _prompting(
    env: dict[str, str], cfg: Path, ignored: tuple[signal.Signals, ...] = ()
) -> tuple[subprocess.Popen[str], int]:
    """`gravl-dr failback` on a terminal: it waits for the operator's 'yes' (indefinitely).
    ignored: signals it starts with ignored, as a shell starts it (`nohup`: SIGHUP; a script's
    background job, `make test &` in CI: SIGINT and SIGQUIT)."""
    leader, follower = os.openpty()
    argv = [GRAVL_DR, "--config", str(cfg), "failback"]
    if ignored:
        names = " ".join(sig.name.removeprefix("SIG") for sig in ignored)
        argv = ["sh", "-c", f'trap "" {names}; exec "$@"', "sh", *argv]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO_ROOT),
    )
    os.close(follower)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "Failback:" in line, line
    return proc, leader


def _interrupted_at_the_prompt(
    env: dict[str, str], cfg: Path, ignored: tuple[signal.Signals, ...] = (), first: int | None = None
) -> tuple[int, str]:
    """Ctrl-C (SIGINT to the command the operator started) at the prompt, after the signal
    `first` if given: the exit status and stderr."""
    proc, leader = _prompting(env, cfg, ignored)
    try:
        if first is not None:
            proc.send_signal(first)
            time.sleep(0.5)  # not a timing assertion: only so that it arrives before the Ctrl-C
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # leave no client behind
            proc.communicate()
            raise
    finally:
        os.close(leader)
    return proc.returncode, err


def _interrupted_warm_and_not(warm: Warm, cfg: Path, **how: Any) -> list[tuple[int, str]]:
    """The same interruption at the prompt through the warm process, then in-process."""
    envs = (warm.env, {**warm.env, "GRAVL_DR_NO_WARM": "1"})
    return [_interrupted_at_the_prompt(env, cfg, **how) for env in envs]


def test_ctrl_c_reaches_the_command_in_the_warm_process(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a command waiting for an answer on the terminal
    # WHEN the operator presses Ctrl-C, warm or not
    served, alone = _interrupted_warm_and_not(warm_process, make_config(file_repo_url))
    # THEN it is interrupted the same way, warm or not
    assert served == alone
    assert served[0] == 130 and "gravl-dr: interrupted" in served[1]


def test_ctrl_c_at_the_prompt_ends_a_command_started_with_sigint_ignored(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a command started with SIGINT and SIGQUIT ignored (a script's background job; the CI
    # runs that hung here: Python installs no SIGINT handler then, and the prompt waited forever)
    # WHEN the operator presses Ctrl-C at its prompt, warm or not
    served, alone = _interrupted_warm_and_not(
        warm_process, make_config(file_repo_url), ignored=(signal.SIGINT, signal.SIGQUIT)
    )
    # THEN the question still ends the command, warm or not
    assert served == alone
    assert served[0] == 130 and "gravl-dr: interrupted" in served[1]


def test_a_signal_the_client_ignores_is_ignored_by_the_command_in_the_warm_process(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a command started under nohup (SIGHUP ignored), waiting at its prompt
    # WHEN the terminal hangs up (SIGHUP), then the operator presses Ctrl-C, warm or not
    served, alone = _interrupted_warm_and_not(
        warm_process, make_config(file_repo_url), ignored=(signal.SIGHUP,), first=signal.SIGHUP
    )
    # THEN the hang-up did not end it (as in-process, where SIGHUP stays ignored): Ctrl-C did
    assert served == alone
    assert served[0] == 130 and "gravl-dr: interrupted" in served[1]


def test_kill_9_of_the_client_ends_the_command_it_started(
    warm_process: Warm, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a command running in the warm process, waiting on the terminal
    cfg = make_config(file_repo_url)
    proc, leader = _prompting(warm_process.env, cfg)
    children = _command_children(warm_process.proc.pid)
    assert children, "the command does not run in the warm process"
    # WHEN its client is killed with -9 (a closed SSH session, the OOM killer)
    proc.kill()
    proc.wait(timeout=30)
    # THEN the command gets SIGTERM and ends: nothing keeps running on its behalf
    gone = poll_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children) or None,
        timeout=30,
        interval=0.1,
    )
    os.close(leader)
    assert gone, f"the command {children} outlived its client"
    # AND the warm process still serves the next command
    assert run_cli("--help", env=warm_process.env).returncode == 0


def test_the_kubernetes_worker_runs_the_warm_process_beside_the_worker_and_restarts_it(
    tmp_path: Path,
) -> None:
    import yaml

    # GIVEN the shipped worker container's start script, run as the container would run it:
    # its environment, `gravl-dr` on PATH, and a stand-in `prefect` that just waits
    manifest = yaml.safe_load((REPO_ROOT / "infra/kubernetes/worker-deployment.yaml").read_text())
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    work = Path(tempfile.mkdtemp(prefix="gravl-k8s-work-"))
    sock = work / Path(env["GRAVL_DR_WARM_SOCKET"]).relative_to("/work")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "prefect").write_text("#!/bin/sh\nexec sleep 600\n")
    (fake / "prefect").chmod(0o755)
    path = f"{fake}:{Path(GRAVL_DR).parent}:{os.environ['PATH']}"
    run_env = {
        **os.environ,
        "GRAVL_DR_WARM_SOCKET": str(sock),
        "POD_NAME": "w-1",
        "PATH": path,
        "GRAVL_DR_NO_WARM": "",
    }
    pod = subprocess.Popen(
        [*container["command"], *container["args"]],
        env=run_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # THEN the warm process listens on the socket the container's commands look for, in a
        # directory only its user can enter, while the worker runs (as the container's main process)
        assert warm.wait_for_socket(sock, 120), "the warm process did not listen"
        assert warm.private_dir_ok(sock.parent)
        assert pod.poll() is None
        first = _listener(sock)
        assert first is not None
        # AND when it exits (as it does when gravl-dr's code changes), it comes back
        os.kill(first, signal.SIGKILL)
        assert poll_until(lambda: (p := _listener(sock)) and p != first, timeout=120, interval=0.2)
    finally:
        os.killpg(pod.pid, signal.SIGKILL)  # the container's process group: the worker and the loop
        pod.wait(timeout=30)
        for pid in _processes_with(f"GRAVL_DR_WARM_SOCKET={sock}"):  # the warm process left it (setsid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def _processes_with(env_entry: str) -> list[int]:
    """This user's processes whose environment holds env_entry (a unique path: ours alone)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                entries = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if env_entry.encode() in entries:
                found.append(int(name))
    return found


def _listener(sock: Path) -> int | None:
    """The pid of the process listening on a Unix socket (its peer credentials), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return int(pid)
    except OSError:
        return None


def _at_terminal(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run gravl-dr as typed at a terminal: stdin and stderr on a pseudo-terminal (stdout a pipe);
    its exit status and what it wrote to the terminal."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [GRAVL_DR, *argv], stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=str(REPO_ROOT)
    )
    os.close(slave)
    chunks = []
    while True:  # drain the terminal until every holder of its other side closed it (EIO)
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.stdout is not None
    proc.stdout.read()
    proc.wait(timeout=300)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace").replace("\r", "")


def _first_use_env(runtime: Path, **extra: str) -> dict[str, str]:
    import prefect

    env = {
        **os.environ,
        "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()),
        "GRAVL_DR_NO_WARM": "",
        "XDG_RUNTIME_DIR": str(runtime),  # this test's own socket directory
        **extra,
    }
    env.pop(warm.SOCKET_ENV, None)
    return env


def test_a_flow_command_at_a_terminal_starts_a_warm_process_that_serves_the_next_and_exits_when_idle(
    prefect_harness: None, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN an operator at a terminal, no warm process for this environment
    cfg = make_config(file_repo_url)
    runtime = Path(tempfile.mkdtemp(prefix="gravl-xdg-"))
    env = _first_use_env(runtime, GRAVL_DR_WARM_IDLE="5", PYTHONPROFILEIMPORTTIME="1", PGPASSWORD="s3cret-x")
    sock = warm.socket_path(env)
    argv = ["--config", str(cfg), "backup", "--dry-run"]
    try:
        # WHEN a flow command runs, then another
        first, first_err = _at_terminal(argv, env)
        assert first == 0, first_err
        assert warm.wait_for_socket(sock, 120), "no warm process was started"
        daemon = _listener(sock)
        assert daemon is not None
        second, second_err = _at_terminal(argv, env)
        # THEN the first ran in-process (it imported Prefect) and started the warm process...
        assert "prefect" in _imported(first_err)
        # ... which served the second (the client imported no Prefect) with its flow run
        assert second == 0, second_err
        assert not {m for m in _imported(second_err) if m.split(".")[0] == "prefect"}
        run, _, artifacts = _last_run()
        assert run.state is not None and run.state.is_completed(), run.state
        assert [a.key for a in artifacts] == ["backup-report-gravl"]
        # AND it is private (socket 0600 in a 0700 directory), detached, and holds no secret
        assert warm.private_dir_ok(sock.parent) and (sock.stat().st_mode & 0o777) == 0o600
        assert os.getsid(daemon) == daemon
        assert b"s3cret-x" not in Path(f"/proc/{daemon}/environ").read_bytes()
        # AND it exits after its idle time, taking its socket with it
        assert poll_until(lambda: not Path(f"/proc/{daemon}").exists(), timeout=60, interval=0.2)
        assert not sock.exists()
    finally:
        for pid in _processes_with(f"XDG_RUNTIME_DIR={runtime}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def test_a_command_without_a_terminal_never_starts_a_warm_process(
    prefect_harness: None, make_config: Any, file_repo_url: str
) -> None:
    # GIVEN a script (no terminal), warm processes allowed, none running
    cfg = make_config(file_repo_url)
    runtime = Path(tempfile.mkdtemp(prefix="gravl-xdg-"))
    env = _first_use_env(runtime)
    try:
        # WHEN it runs a flow command, and a command typed at a terminal opts out
        proc = subprocess.run(
            [GRAVL_DR, "--config", str(cfg), "backup", "--dry-run"],
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
        typed, err = _at_terminal(
            ["--config", str(cfg), "backup", "--dry-run"], {**env, "GRAVL_DR_NO_WARM": "1"}
        )
        # THEN both ran, and neither started a warm process
        assert proc.returncode == 0 and typed == 0, proc.stderr + err
        assert not warm.socket_path(env).parent.exists()
        assert _processes_with(f"XDG_RUNTIME_DIR={runtime}") == []
    finally:
        for pid in _processes_with(f"XDG_RUNTIME_DIR={runtime}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(runtime, ignore_errors=True)


def test_only_flow_commands_start_a_warm_process() -> None:
    import argparse

    from flows.cli.app import build_parser

    # GIVEN the parser's commands
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(sub.choices)
    # THEN every command that starts one exists, and none of the hooks, `list` or `guard` does
    assert commands >= warm.FLOW_COMMANDS
    assert not warm.FLOW_COMMANDS & {"wal-push", "wal-fetch", "list", "verify", "guard", "warm", "unlock"}
    # AND the command word is found after the global options
    assert warm.command_word(["--config", "backup", "-v", "restore", "latest"]) == "restore"
    assert warm.command_word(["-v"]) is None


def test_no_second_start_while_the_last_one_is_recent(tmp_path: Path) -> None:
    # GIVEN the log of a warm process started (or failed) a moment ago, and one of long ago
    sock = tmp_path / "abc.sock"
    log = sock.with_suffix(".log")
    log.write_text("gravl-dr: error: warm process failed\n")
    # WHEN a command would start one now
    # THEN it does not while the log is recent...
    assert warm._start_log(sock) is None
    # ... and does once it is old, noting the start in the log (owner-only)
    old = time.time() - warm.START_BACKOFF_SECONDS - 1
    os.utime(log, (old, old))
    fd = warm._start_log(sock)
    assert fd is not None
    os.close(fd)
    assert "starting a warm process on first use" in log.read_text().splitlines()[-1]
    fresh = tmp_path / "new.sock"
    fd = warm._start_log(fresh)
    assert fd is not None
    os.close(fd)
    assert (fresh.with_suffix(".log").stat().st_mode & 0o777) == 0o600
    # AND an unusable idle time falls back to the default
    assert (
        warm.idle_seconds({warm.IDLE_ENV: "x"})
        == warm.idle_seconds({warm.IDLE_ENV: "-3"})
        == warm.IDLE_SECONDS
    )
    assert warm.idle_seconds({warm.IDLE_ENV: "5"}) == 5.0
