"""Shared helpers for the benchmarks: a pgbench cluster, timed commands with peak RSS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks run as plain scripts from a checkout

from tasks.pgcluster import LocalCluster, free_port, make_private_dir  # noqa: E402

GRAVL_DR = str(Path(sys.executable).parent / "gravl-dr")
BIN = "/usr/lib/postgresql/15/bin"


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def _tree_peak(
    pid: int, stop: threading.Event, out: list[float], root_only: bool, warm_pid: int | None = None
) -> None:
    """Poll the peak RSS (VmHWM) of a process, and of its descendants unless root_only. With
    ``warm_pid`` (a `gravl-dr warm` process), its descendants are counted too, not itself: the
    child it forked to run this command, and that child's own subprocesses."""
    peak = 0.0
    while not stop.is_set():
        pids = [pid] if root_only else _descendants(pid)
        if warm_pid is not None:
            pids += _descendants(warm_pid)[1:]
        total = 0.0
        for p in pids:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmHWM:" if root_only else "VmRSS:"):
                        total += int(line.split()[1]) / 1024
            except OSError:
                continue
        peak = max(peak, total)
        time.sleep(0.02)
    out.append(peak)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    return seen


def timed(
    argv: list[str] | str,
    *,
    shell: bool = False,
    env: dict[str, str] | None = None,
    root_only: bool = True,
    warm_pid: int | None = None,
) -> Timed:
    """Run a command; wall time and peak RSS (of the process itself, or its whole tree; with
    ``warm_pid``, plus what the warm process forked meanwhile: see ``_tree_peak``)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    os.sync()  # earlier steps' dirty pages must not be written back on this step's clock
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, shell=shell, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stop, peaks = threading.Event(), list[float]()
    watcher = threading.Thread(
        target=_tree_peak, args=(proc.pid, stop, peaks, root_only, warm_pid), daemon=True
    )
    watcher.start()
    out, err = proc.communicate()
    seconds = time.monotonic() - t0
    stop.set()
    watcher.join()
    return Timed(seconds, peaks[0] if peaks else 0.0, proc.returncode, out, err)


def pgbench_cluster(scale: int, base: Path | None = None) -> LocalCluster:
    base = base or make_private_dir("gravl-bench-", "postgres")
    cluster = LocalCluster(base / "data", free_port(), dbname="bench")
    cluster.initdb(extra_conf={"max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'"})
    cluster.start()
    subprocess.run(
        [f"{BIN}/createdb", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", "bench"],
        check=True,
    )
    print(f"pgbench -i -s {scale} ...", flush=True)
    subprocess.run(
        [
            f"{BIN}/pgbench",
            "-i",
            "-q",
            "-s",
            str(scale),
            "-h",
            cluster.host,
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "bench",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            "psql",
            "-h",
            cluster.host,
            "-p",
            str(cluster.port),
            "-U",
            "postgres",
            "-d",
            "bench",
            "-qc",
            "CHECKPOINT",
        ],
        check=True,
    )
    return cluster


def start_prefect_server() -> tuple[subprocess.Popen[bytes], str, Path]:
    """A local Prefect server, so flow runs pay ~3 s instead of the ephemeral start-up."""
    home = Path(make_private_dir("gravl-bench-prefect-", "root"))
    port = free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
    )
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    import urllib.request

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url, home
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("prefect server did not start")


def cleanup(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"
