"""Pure logic: is a node's worker still there? The decision behind giving up on a node step early.

A node step runs as a flow run on the node's own work pool. If the worker (or its whole host) dies
after it picked the run up, Prefect leaves the run Running: nothing on the server ends it. What
Prefect does know is the worker's heartbeat (`PREFECT_WORKER_HEARTBEAT_SECONDS`, 30 s by default):
each worker of a pool reports `last_heartbeat_time`, and the server's Foreman service marks it
OFFLINE when it has been silent for 3 heartbeat intervals (and the pool NOT_READY when none is left).

While the orchestrator waits for a node step, ``PoolWatch`` is fed the pool's workers every few
seconds and says when to stop waiting:
- the pool has workers and none is ONLINE in the server's own view (clock-independent: the server
  compares its own timestamps), or
- no worker's heartbeat has moved for ``silence_seconds`` of the orchestrator's own monotonic
  clock since it started watching (catches a dead worker before the Foreman's next pass; a pool
  that never had a worker is lost after that long too).
Both read the pool, not the one worker that picked the run up (Prefect does not record which one):
with several workers in a node's pool, a dead one is not noticed while another still beats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class WorkerBeat:
    """One worker of a pool as the Prefect server reports it."""

    name: str
    online: bool  # the server's status: ONLINE / OFFLINE
    last_heartbeat: datetime | None


def newest_beat(workers: Sequence[WorkerBeat]) -> datetime | None:
    beats = [w.last_heartbeat for w in workers if w.last_heartbeat is not None]
    return max(beats) if beats else None


def describe_workers(pool: str, workers: Sequence[WorkerBeat]) -> str:
    """``work pool X: worker W last heartbeat T`` — the evidence line of a give-up."""
    if not workers:
        return f"work pool {pool} has no worker"
    newest = max(workers, key=lambda w: w.last_heartbeat.timestamp() if w.last_heartbeat else 0.0)
    when = newest.last_heartbeat.isoformat(timespec="seconds") if newest.last_heartbeat else "never"
    state = "ONLINE" if newest.online else "OFFLINE"
    others = f" (and {len(workers) - 1} other worker(s), none newer)" if len(workers) > 1 else ""
    return f"work pool {pool}: worker {newest.name!r} {state}, last heartbeat {when}{others}"


@dataclass
class PoolWatch:
    """Fed the pool's workers over time (``see``), says whether the pool is lost (``lost``)."""

    pool: str
    silence_seconds: float
    started: float  # the orchestrator's monotonic clock when the watch began
    _newest: datetime | None = None
    _moved_at: float = field(default=0.0)
    _workers: tuple[WorkerBeat, ...] = ()

    def __post_init__(self) -> None:
        self._moved_at = self.started

    def see(self, workers: Sequence[WorkerBeat], now: float) -> None:
        newest = newest_beat(workers)
        if newest is not None and (self._newest is None or newest > self._newest):
            if self._newest is not None:
                self._moved_at = now  # a heartbeat arrived while we watched
            self._newest = newest
        self._workers = tuple(workers)

    def lost(self, now: float) -> str | None:
        """None while a worker may be alive; else why the pool is considered lost (one line)."""
        if self._workers and not any(w.online for w in self._workers):
            return (
                f"no worker of work pool {self.pool} is online ({describe_workers(self.pool, self._workers)})"
            )
        silent = now - self._moved_at
        if silent > self.silence_seconds:
            return (
                f"no heartbeat from any worker of work pool {self.pool} for {silent:.0f}s "
                f"({describe_workers(self.pool, self._workers)})"
            )
        return None
