"""When the orchestrator stops waiting for a node step: tasks.node_liveness's decision, replayed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tasks.node_liveness import PoolWatch, WorkerBeat

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def beat(seconds: float, online: bool = True, name: str = "w1") -> WorkerBeat:
    return WorkerBeat(name=name, online=online, last_heartbeat=T0 + timedelta(seconds=seconds))


def test_a_beating_worker_keeps_the_wait_going_however_long_the_step_takes() -> None:
    watch = PoolWatch("node-a", silence_seconds=5, started=100.0)
    for t in range(0, 600, 2):  # a step that runs ten minutes, the worker beating every 2 s
        watch.see([beat(t)], now=100.0 + t)
        assert watch.lost(100.0 + t) is None


def test_heartbeats_that_stop_give_up_after_the_silence_with_the_last_heartbeat_named() -> None:
    watch = PoolWatch("node-a", silence_seconds=5, started=100.0)
    watch.see([beat(0)], now=100.0)
    watch.see([beat(2)], now=102.0)  # then the host dies: the server keeps reporting beat(2), ONLINE
    for now in (104.0, 106.0):
        watch.see([beat(2)], now=now)
        assert watch.lost(now) is None
    watch.see([beat(2)], now=108.0)
    why = watch.lost(108.0)
    assert why is not None
    assert "work pool node-a" in why and "'w1'" in why and "last heartbeat 2026-01-01T00:00:02+00:00" in why


def test_the_servers_offline_verdict_gives_up_at_once() -> None:
    watch = PoolWatch("node-a", silence_seconds=90, started=100.0)
    watch.see([beat(-300, online=False)], now=100.0)
    why = watch.lost(100.0)
    assert why is not None and "no worker of work pool node-a is online" in why and "OFFLINE" in why


def test_one_live_worker_among_dead_ones_keeps_the_pool_alive() -> None:
    watch = PoolWatch("node-a", silence_seconds=5, started=100.0)
    watch.see([beat(-300, online=False, name="old"), beat(0, name="new")], now=100.0)
    watch.see([beat(-300, online=False, name="old"), beat(3, name="new")], now=103.0)
    assert watch.lost(106.0) is None
    assert watch.lost(109.0) is not None  # "new" went silent too


def test_a_pool_that_never_had_a_worker_is_lost_only_after_the_silence() -> None:
    watch = PoolWatch("node-a", silence_seconds=5, started=100.0)
    watch.see([], now=100.0)
    assert watch.lost(104.0) is None
    why = watch.lost(106.0)
    assert why is not None and "work pool node-a has no worker" in why


def test_a_worker_that_never_beat_since_the_watch_began_counts_from_the_start() -> None:
    # The first heartbeat seen may be old: silence is measured from when the watch began.
    watch = PoolWatch("node-a", silence_seconds=5, started=100.0)
    watch.see([beat(-3)], now=100.0)
    assert watch.lost(104.0) is None
    assert watch.lost(105.5) is not None
