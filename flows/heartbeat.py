"""Orchestration support: the flow-run heartbeat of a CLI command, sent by gravl-dr instead of by
Prefect's engine, so that the run does not wait for Prefect's heartbeat thread at its end.

Prefect 3.9's engine sends ``prefect.flow-run.heartbeat`` events from a thread that sleeps in
one-second steps, and the sync engine joins that thread when the flow function returns: each
flow run lasts up to a second longer than its work. A CLI command runs its flow with Prefect's
heartbeat off and makes a :class:`FlowRunHeartbeat` current (:func:`cli_heartbeat`); every gravl-dr
flow has :func:`send_heartbeat` as its ``on_running`` hook (Prefect's public state-hook API), so
the command's run and the flows it runs inside it (failback's backup, drill-failover's failover
and failback, the demo's) each get their heartbeat: the same event, for the same resource (``prefect.flow-run.<id>``, its name and
Prefect's version) with the same related resources (the flow, the deployment, the run's tags),
at Prefect's configured frequency (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, at least 30 s), first
at once. A zombie-run automation (Prefect's "detect zombie flows" recipe: after a heartbeat,
expect another heartbeat or a terminal state event of the same ``prefect.flow-run.*`` resource)
treats it exactly as Prefect's own. The thread waits on an Event, so stopping it is immediate;
the command stops it as soon as the flow function returns, after the run's final state. Outside a
CLI command (a deployment run on a worker) no heartbeat is current, the hook does nothing and
Prefect's engine sends the heartbeat itself.

Prefect is imported only inside the functions: this module is imported by every flow command.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("gravl_dr.heartbeat")

EVENT = "prefect.flow-run.heartbeat"
MINIMUM_SECONDS = 30  # Prefect's own floor (flow_engine.MINIMUM_HEARTBEAT_INTERVAL)


def heartbeat_resource(flow_run: Any, flow_name: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The event's resource and related resources for a flow run, as Prefect's engine builds them."""
    import prefect

    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name or "",
        "prefect.version": prefect.__version__,
    }
    related: list[dict[str, str]] = []
    if flow_run.flow_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                "prefect.resource.role": "flow",
                "prefect.resource.name": flow_name,
            }
        )
    if flow_run.deployment_id:
        related.append(
            {
                "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                "prefect.resource.role": "deployment",
            }
        )
    related += [
        {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
        for tag in sorted(set(flow_run.tags or []))
    ]
    return resource, related


class FlowRunHeartbeat:
    """Heartbeat events for the flow run a CLI command starts: :meth:`hook` is the flow's
    ``on_running`` hook (it starts the thread once per run, also across retries), :meth:`stop`
    ends it at once."""

    def __init__(self, seconds: int) -> None:
        self.seconds = max(int(seconds), MINIMUM_SECONDS)
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}

    def hook(self, flow: Any, flow_run: Any, state: Any) -> None:
        key = str(flow_run.id)
        if key in self._threads or self._stop.is_set():
            return
        resource, related = heartbeat_resource(flow_run, getattr(flow, "name", "") or "")
        # The engine's context: its settings (the API URL) and its events worker, as Prefect's
        # heartbeat thread has them (a thread started without it would see the import-time
        # settings and could start an ephemeral server of its own).
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(self._loop, flow_run, resource, related),
            name=f"gravl-dr-heartbeat-{key}",
            daemon=True,
        )
        self._threads[key] = thread
        thread.start()

    def _loop(self, flow_run: Any, resource: dict[str, str], related: list[dict[str, str]]) -> None:
        from prefect.events import emit_event

        while not self._stop.is_set():
            state = getattr(flow_run, "state", None)  # the engine's own FlowRun: it sets its state
            if state is not None and state.is_final():
                return  # as Prefect's loop: never a heartbeat after the run's final state
            try:
                emit_event(event=EVENT, resource=resource, related=related)
            except Exception:  # as Prefect's loop: a lost beat never ends the command
                log.debug("could not emit a flow-run heartbeat", exc_info=True)
            if self._stop.wait(self.seconds):
                return

    def stop(self) -> None:
        """No heartbeat after this returns (the threads wait on the event: no one-second step)."""
        self._stop.set()
        for thread in self._threads.values():
            thread.join(timeout=5)


_current: FlowRunHeartbeat | None = None  # one command per process (the warm process forks one per command)


def send_heartbeat(flow: Any, flow_run: Any, state: Any) -> None:
    """The ``on_running`` hook of every gravl-dr flow: the run's heartbeat, when a CLI command
    made one current (else Prefect's engine sends it)."""
    if _current is not None:
        _current.hook(flow, flow_run, state)


@contextlib.contextmanager
def cli_heartbeat(seconds: int) -> Iterator[FlowRunHeartbeat]:
    """While the CLI runs its flow with Prefect's heartbeat off: every flow run started meanwhile
    sends its heartbeat from here; none after this ends."""
    global _current
    beat = FlowRunHeartbeat(seconds)
    previous, _current = _current, beat
    try:
        yield beat
    finally:
        _current = previous
        beat.stop()
