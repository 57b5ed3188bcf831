"""Pure logic with a small repository adapter: the cluster's role history, and who the primary is now.

The repository holds one object per role change, ``roles/<UTC stamp>-<event>-<node>.json``,
written once and never overwritten (a retried write of the same event is a success). A flow
that changes roles appends an event; every flow that needs the primary asks the nodes
themselves (``choose_primary``) and uses the history only to break a tie when nobody answers;
``gravl-dr guard`` reads it on a node's host before PostgreSQL starts there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.errors import AlreadyExists, PermanentError
from tasks.failover import NodeState
from tasks.repository import Repository

log = logging.getLogger(__name__)

ROLE_PREFIX = "roles/"


class SplitBrain(PermanentError):
    """More than one node accepts writes: no flow may act as if either were the only primary."""


class RoleEvent(BaseModel):
    """One change of primary: who took over, who was demoted, on which timeline, from which LSN."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    event: Literal[
        "failover", "failback", "restore"
    ]  # restore: a node restored and promoted (--node --start)
    primary: str
    demoted: list[str]
    timeline: int | None = None
    lsn: str | None = None  # where the new primary's timeline begins
    system_identifier: str | None = None
    note: str = ""

    def key(self) -> str:
        return f"{ROLE_PREFIX}{self.at:%Y%m%dT%H%M%S%fZ}-{self.event}-{self.primary}.json"


def record_role_change(repo: Repository, event: RoleEvent) -> str:
    """Append ``event`` to the history (put-if-absent; an identical object already there is a success)."""
    data = (event.model_dump_json(indent=2) + "\n").encode()
    key = event.key()
    try:
        repo.put_bytes(key, data)
    except AlreadyExists:
        if repo.get_bytes(key) != data:
            raise
    return key


def role_history(repo: Repository) -> list[RoleEvent]:
    """Every recorded role change, oldest first; an unreadable object is logged and skipped."""
    events = []
    for key in sorted(repo.list_keys(ROLE_PREFIX)):
        if not key.endswith(".json"):
            continue
        try:
            events.append(RoleEvent.model_validate(json.loads(repo.get_bytes(key))))
        except (ValueError, ValidationError) as exc:
            log.warning("role history: %s is unreadable, skipped: %s", key, str(exc).splitlines()[0])
    return sorted(events, key=lambda e: e.at)


def primary_by_history(history: Sequence[RoleEvent], configured: str) -> str:
    """Who the history says is the primary: the last event's, else the configured primary."""
    return history[-1].primary if history else configured


def demotion_of(history: Sequence[RoleEvent], node: str) -> RoleEvent | None:
    """The event that demoted ``node``, when it has not been made primary again since."""
    for event in reversed(history):
        if event.primary == node:
            return None
        if node in event.demoted:
            return event
    return None


class PrimaryChoice(BaseModel):
    """The node flows should treat as the primary now, and why."""

    model_config = ConfigDict(frozen=True)

    primary: str
    configured: str
    reason: str
    in_recovery: bool | None = None  # the chosen node is a standby (nobody accepts writes)
    evidence: list[str] = []

    @property
    def moved(self) -> bool:
        return self.primary != self.configured


def now() -> datetime:
    return datetime.now(UTC)


def choose_primary(
    states: Sequence[NodeState], configured: str, history: Sequence[RoleEvent] = ()
) -> PrimaryChoice:
    """The one node that accepts writes; raise SplitBrain when several do.

    When none does (the primary is down), the history's primary is named, else the configured
    one: a flow pointed at it then fails loudly instead of backing up a standby as if it were the
    primary.
    """
    evidence = [s.evidence() for s in states]
    writable = [s for s in states if s.reachable and s.in_recovery is False]
    if len(writable) > 1:
        raise SplitBrain(
            "SPLIT BRAIN: " + ", ".join(s.name for s in writable) + " all run as primaries "
            "(not in recovery); no backup or check runs until one is fenced | " + " | ".join(evidence)
        )
    if writable:
        chosen = writable[0]
        why = "the only node not in recovery" + (f" (timeline {chosen.timeline})" if chosen.timeline else "")
        if chosen.name != configured:
            why += f"; the configured primary {configured} is not"
        return PrimaryChoice(
            primary=chosen.name, configured=configured, reason=why, in_recovery=False, evidence=evidence
        )
    name = primary_by_history(history, configured)
    state = next((s for s in states if s.name == name), None)
    return PrimaryChoice(
        primary=name,
        configured=configured,
        reason="no node accepts writes; "
        + ("the role history names it" if history else "the configured primary"),
        in_recovery=state.in_recovery if state else None,
        evidence=evidence,
    )
