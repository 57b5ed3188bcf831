"""Orchestration helper: watch a node step's work pool while waiting for it, and give its run up when the pool's workers are gone.

The decision is tasks.node_liveness's; this module only reads the pool's workers through the
Prefect client and, on giving up, leaves the run in a state that says so (Crashed, with the
reason), so a worker that comes back later never starts or finishes it as if nothing happened.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from tasks.node_liveness import PoolWatch, WorkerBeat

READ_EVERY = 2.0  # seconds between two reads of the pool's workers


class PoolWatcher:
    """``check()`` is None while the pool may still have a live worker, else the one-line reason."""

    def __init__(self, client: Any, pool: str, silence_seconds: float) -> None:
        self.client, self.pool = client, pool
        self.watch = PoolWatch(pool, silence_seconds, time.monotonic())
        self._read_at = -READ_EVERY

    def check(self) -> str | None:
        now = time.monotonic()
        if now - self._read_at >= READ_EVERY:
            self._read_at = now
            with contextlib.suppress(Exception):  # a blip of the API: judge by what we saw last
                workers = self.client.read_workers_for_work_pool(self.pool)
                self.watch.see(
                    [
                        WorkerBeat(
                            name=w.name,
                            online=str(getattr(w.status, "value", w.status)).upper() == "ONLINE",
                            last_heartbeat=w.last_heartbeat_time,
                        )
                        for w in workers
                    ],
                    now,
                )
        return self.watch.lost(now)


def give_up_run(client: Any, run_id: Any, reason: str) -> None:
    """Mark the run Crashed with ``reason`` (forced: its worker can no longer report anything)."""
    from prefect.states import Crashed

    with contextlib.suppress(Exception):  # the report says why anyway
        client.set_flow_run_state(run_id, Crashed(message=f"gravl-dr gave up on it: {reason}"), force=True)
