"""Pure logic: failover and failback planning — observed node states in, an ordered plan of steps out.

Patroni-style plan-then-apply: the planner never touches a server. The flows observe every node,
ask for a plan, and apply it step by step; each step re-checks its own precondition when it acts,
so a run interrupted anywhere and started again observes the new state and plans only what is
left (an already promoted replica is not promoted twice, a fenced primary is not fenced again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.errors import PreconditionFailed
from tasks.walnames import format_lsn as int_to_lsn
from tasks.walnames import lsn_or_none
from tasks.walnames import lsn_to_int as lsn_to_int  # re-exported: its home was here

DEFAULT_MAX_LAG_BYTES = 16 * 1024 * 1024  # refuse to promote a replica further behind than this


class Refused(PreconditionFailed):
    """The planner will not go on: the state makes the operation unsafe or pointless."""


# What libpq says when nothing answered at all: no server process behind the address, or no
# reply within the timeout. Everything else a failed connection reports came from a running
# server (a FATAL from the postmaster or a backend: pg_hba reject, wrong password, too many
# clients, "the database system is starting up"), and a server that answers is alive.
_NO_ANSWER = (
    "connection refused",
    "timeout expired",
    "timed out",
    "no route to host",
    "network is unreachable",
    "could not translate host name",
    "name or service not known",
    "no such file or directory",
    "is the server running",
    "host is down",
    "connection reset by peer",
)


def server_answered(message: str) -> bool:
    """True when a failed connection's message proves a server answered (it is alive, not down).

    libpq prefixes the server's own error with its severity ("FATAL:  sorry, too many clients
    already"); a message without one is libpq's own (refused TCP, timeout, DNS failure).
    """
    text = message.lower()
    if any(marker in text for marker in _NO_ANSWER):
        return False
    # "server closed the connection unexpectedly" and the like, without a FATAL: it died under us.
    return "fatal:" in text


# ---------------------------------------------------------------------------------------------
# Observed state


class NodeState(BaseModel):
    """What one observation of a node found; everything optional that a dead node cannot say."""

    model_config = ConfigDict(frozen=True)

    name: str
    configured_role: Literal["primary", "replica"]
    address: str = ""  # host:port from the DSN, to compare with a standby's upstream
    reachable: bool = False
    error: str | None = None
    answered: bool = False  # unreachable for us, but a server answered (refused our login): ALIVE
    in_recovery: bool | None = None
    read_only: bool | None = None  # default_transaction_read_only (a soft fence)
    current_lsn: str | None = None  # pg_current_wal_insert_lsn() on a primary
    receive_lsn: str | None = None  # pg_last_wal_receive_lsn() on a standby
    replay_lsn: str | None = None  # pg_last_wal_replay_lsn() on a standby
    replay_lag_seconds: float | None = None
    replay_paused: bool = False
    wal_receiver: str | None = None  # pg_stat_wal_receiver.status, None when no receiver runs
    upstream: str | None = None  # sender_host:sender_port of the WAL receiver
    timeline: int | None = None
    system_identifier: str | None = None
    # Facts from a local data directory (when the config gives pgdata and it is on this host)
    local_pgdata: bool = False
    postmaster_running: bool | None = None
    fenced: bool = False  # our fence marker is in the data directory
    control_state: str | None = None  # pg_controldata "Database cluster state" when down
    checkpoint_lsn: str | None = None  # pg_controldata "Latest checkpoint location" when down
    last_local_lsn: str | None = None  # end of the WAL found in pg_wal when down
    rewind_capable: bool | None = None  # wal_log_hints=on or data checksums (pg_rewind's prerequisite)
    rebuild_phase: str | None = None  # tasks.topology's marker: rewinding, rewind-failed, rewound, cloned...
    kept_old_data: list[str] = []  # old data directories / WAL kept next to pgdata by earlier rebuilds
    history: list[tuple[int, str]] = []  # a primary's timeline history: (timeline, where it ended)
    # Where this node's local steps can run: "here", "pool:<work pool>" (its own worker), or None
    runs_on: str | None = None

    @property
    def steps_at(self) -> str | None:
        """Where node-local steps for this node run, or None when they cannot run anywhere."""
        return self.runs_on or ("here" if self.local_pgdata else None)

    @property
    def accepts_writes(self) -> bool:
        return self.reachable and self.in_recovery is False and not self.read_only

    def fork_lsn(self, timeline: int | None) -> str | None:
        """Where ``timeline`` ended in this node's history (its switch point), or None."""
        return next((lsn for tli, lsn in self.history if tli == timeline), None)

    @property
    def alive_but_refusing(self) -> bool:
        """A server answered and refused gravl-dr (pg_hba, password, too many clients, starting up)."""
        return not self.reachable and self.answered

    @property
    def is_standby(self) -> bool:
        return self.reachable and self.in_recovery is True

    @property
    def position(self) -> int | None:
        """How far this node's WAL goes: current LSN on a primary, else the furthest of received
        and replayed (a promotion replays everything received before it ends recovery)."""
        if self.in_recovery is False:
            return lsn_or_none(self.current_lsn)
        known = [p for p in (lsn_or_none(self.receive_lsn), lsn_or_none(self.replay_lsn)) if p is not None]
        return max(known) if known else None

    def evidence(self) -> str:
        """One line an operator can read: what we saw on this node."""
        if not self.reachable:
            extra = []
            if self.local_pgdata:
                extra.append("postmaster running" if self.postmaster_running else "postmaster not running")
                if self.control_state:
                    extra.append(f"control file: {self.control_state}")
                if self.last_local_lsn:
                    extra.append(f"WAL on disk ends at {self.last_local_lsn}")
                if self.fenced:
                    extra.append("fenced")
            tail = f" ({', '.join(extra)})" if extra else ""
            if self.answered:
                return f"{self.name}: ALIVE but refused gravl-dr — {self.error}{tail}"
            return f"{self.name}: unreachable — {self.error or 'no answer'}{tail}"
        if self.in_recovery:
            lag = (
                f", {self.replay_lag_seconds:.1f} s since last replayed commit"
                if self.replay_lag_seconds is not None
                else ""
            )
            paused = ", replay PAUSED" if self.replay_paused else ""
            return (
                f"{self.name}: standby, received {self.receive_lsn or '-'}, replayed "
                f"{self.replay_lsn or '-'}, WAL receiver {self.wal_receiver or 'not running'}"
                f"{lag}{paused}, timeline {self.timeline}"
            )
        mode = "read-only (fenced)" if self.read_only else "accepting writes"
        return f"{self.name}: primary {mode} at {self.current_lsn}, timeline {self.timeline}"


# ---------------------------------------------------------------------------------------------
# Plans

StepKind = Literal[
    "fence-old-primary",
    "approve",
    "promote-replica",
    "switch-dns",
    "reconnect-apps",
    "validate",
    "backup-current-primary",
    "rebuild-old-primary",
    "wait-for-zero-lag",
    "switchover",
    "rejoin-former-primary",
    "stop-old-primary",
    "save-local-settings",
    "keep-old-wal",
    "rewind-old-primary",
    "reclone-old-primary",
    "start-as-standby",
    "discard-old-data",
]

# Rebuild bookkeeping shared with tasks.topology (the marker in the data directory).
READY_PHASES = ("rewound", "cloned")
# pg_rewind may be given a cleanly stopped directory or a crashed primary (it runs crash recovery
# itself, on the target's own diverged timeline). A crashed standby may already hold another
# timeline's data: it is re-cloned, never recovered on its own.
REWIND_SAFE_STATES = ("shut down", "shut down in recovery", "in production")


FenceMethod = Literal["stop", "read-only", "none"]


class Step(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: StepKind
    node: str
    reason: str
    # Where it runs: "libpq" (the orchestrator, over SQL), "here" (the node's files on this host),
    # "pool:<work pool>" (a node-step run on the node's own worker).
    where: str = "libpq"
    method: FenceMethod | None = None  # fence-old-primary: stop the server, or make it read-only

    def describe(self) -> str:
        where = {"libpq": "", "here": " [on this host]"}.get(
            self.where, f" [on work pool {self.where.removeprefix('pool:')}]"
        )
        how = f" ({self.method})" if self.method else ""
        return f"{self.kind}{how} {self.node}{where}: {self.reason}"


class FailoverPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    old_primary: str
    target: str
    already_promoted: bool
    steps: list[Step]
    reference_lsn: str | None  # the old primary's last known WAL position (the RPO reference)
    target_lsn: str | None
    lag_bytes: int | None
    evidence: list[str]
    notes: list[str] = []

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]

    def step_lines(self) -> list[str]:
        """Each step as one line (the report's plan and the terminal preview)."""
        return [s.describe() for s in self.steps]

    def preview(self) -> list[str]:
        """What an operator reads before approving: the evidence, then the numbered plan."""
        return [
            "Observed:",
            *[f"  {e}" for e in self.evidence],
            "Plan:",
            *[f"  {n}. {line}" for n, line in enumerate(self.step_lines(), 1)],
            *[f"  note: {n}" for n in self.notes],
        ]


def _refuse(message: str, states: Sequence[NodeState]) -> Refused:
    return Refused(message + " | " + " | ".join(s.evidence() for s in states))


def plan_failover(  # noqa: C901 - one decision table, covered by the planner replay tests
    primary: NodeState,
    replicas: Sequence[NodeState],
    *,
    max_lag_bytes: int,
    force: bool = False,
    planned: bool = False,
) -> FailoverPlan:
    """Decide whether and how to fail over from ``primary`` to one of ``replicas``.

    Refuses (raises Refused) when the old primary accepts writes (unless forced, or ``planned``
    with a local data directory so it can be stopped cleanly), when no replica is healthy, when
    the best replica lags more than ``max_lag_bytes`` behind the furthest known WAL position
    (unless forced), and when more than one node already accepts writes.
    """
    everyone = [primary, *replicas]
    promoted = [r for r in replicas if r.accepts_writes]
    notes = _unsafe_primary_notes(primary, promoted, everyone, force=force, planned=planned)

    if promoted:
        target = promoted[0]
        already = True
        notes.append(f"{target.name} was already promoted: converging (no second promotion)")
    else:
        already = False
        healthy = [r for r in replicas if r.is_standby and _same_system(r, primary)]
        if not healthy:
            raise _refuse("no healthy replica to promote", everyone)
        if planned:
            streaming = [r for r in healthy if r.wal_receiver == "streaming"]
            if not streaming:
                raise _refuse("planned failover needs a replica that is streaming now", everyone)
            healthy = streaming
        order = {r.name: i for i, r in enumerate(replicas)}
        target = max(healthy, key=lambda r: (r.position or -1, -order[r.name]))

    # The RPO reference is what the old primary itself is known to have written: its insert
    # position when it answers, else the end of the WAL in its local pg_wal. The lag reference
    # also counts the other replicas (one may have received more than the target).
    primary_end = lsn_or_none(primary.current_lsn) if primary.in_recovery is False else None
    if primary_end is None:
        primary_end = lsn_or_none(primary.last_local_lsn)
    peers = [r.position for r in replicas if not r.accepts_writes and _same_system(r, primary)]
    known = [p for p in (primary_end, *peers) if p is not None]
    reference = max(known) if known else None
    lag = reference - target.position if reference is not None and target.position is not None else None
    if not already and not planned:
        if lag is None:
            notes.append("the replica's lag is unknown (no WAL position anywhere)")
        elif lag > max_lag_bytes and not force:
            raise _refuse(
                f"refusing to promote {target.name}: it is {lag} bytes behind the furthest known WAL "
                f"position {int_to_lsn(reference or 0)} (limit --max-lag-bytes {max_lag_bytes}); "
                "pass --force to accept the data loss",
                everyone,
            )
        elif lag > max_lag_bytes:
            notes.append(f"FORCED: promoting {target.name} {lag} bytes behind (limit {max_lag_bytes})")
    if target.replay_paused and not already:
        notes.append(f"replay on {target.name} was paused; promotion resumes and finishes it")

    steps: list[Step] = []
    alive = primary.accepts_writes or primary.alive_but_refusing
    if alive:
        # Stopping a live primary is disruptive: ask before it, not after.
        steps.append(
            Step(
                kind="approve",
                node=target.name,
                reason=f"fence {primary.name} (it accepts writes) and promote {target.name}",
            )
        )
    if alive or not primary.fenced or primary.postmaster_running:
        steps.append(_fence_step(primary))
    if not already:
        if not alive:
            steps.append(Step(kind="approve", node=target.name, reason=f"promote {target.name}"))
        steps.append(
            Step(
                kind="promote-replica",
                node=target.name,
                reason=f"most advanced healthy replica at {int_to_lsn(target.position or 0)}"
                + (f", {lag} bytes behind" if lag is not None else ""),
            )
        )
    steps += [
        Step(
            kind="switch-dns",
            node=target.name,
            reason=f"point the record at {target.name} if it still points at {primary.name}",
        ),
        Step(kind="reconnect-apps", node=target.name, reason="run the configured reconnect hooks"),
        Step(kind="validate", node=target.name, reason="canary write and read on the new primary"),
    ]
    return FailoverPlan(
        old_primary=primary.name,
        target=target.name,
        already_promoted=already,
        steps=steps,
        reference_lsn=int_to_lsn(primary_end) if primary_end is not None else None,
        target_lsn=int_to_lsn(target.position) if target.position is not None else None,
        lag_bytes=lag,
        evidence=[s.evidence() for s in everyone],
        notes=notes,
    )


def _unsafe_primary_notes(
    primary: NodeState, promoted: list[NodeState], everyone: list[NodeState], *, force: bool, planned: bool
) -> list[str]:
    """Refuse a failover that would leave two writable primaries; notes on what force/planned allow."""
    notes: list[str] = []
    if len(promoted) > 1:
        raise _refuse(
            f"split brain: several replicas accept writes ({', '.join(r.name for r in promoted)}); "
            "resolve by hand",
            everyone,
        )
    if primary.accepts_writes:
        if planned and not primary.steps_at:
            raise _refuse(
                f"planned failover needs {primary.name}'s pgdata on this host or its work pool "
                "to stop it cleanly",
                everyone,
            )
        if promoted and not force:
            raise _refuse(
                f"split brain: {primary.name} and {promoted[0].name} both accept writes; stop "
                f"{primary.name} or re-run with --force to fence it",
                everyone,
            )
        if not promoted and not (force or planned):
            raise _refuse(
                f"refusing to fail over: primary {primary.name} is up and accepting writes at "
                f"{primary.current_lsn}; stop it first or pass --force",
                everyone,
            )
        notes.append(
            f"{primary.name} was accepting writes: it is fenced before anything is promoted"
            + (" (planned: clean shutdown, no data loss)" if planned else " (forced)")
        )
    elif primary.alive_but_refusing:
        # Not down: it answered. Promoting now would leave two primaries that both take writes.
        if not force:
            raise _refuse(
                f"refusing to fail over: primary {primary.name} is alive — it answered but refused "
                f"gravl-dr's login ({primary.error}); fix the login (pg_hba, password, connection "
                "slots) or pass --force to fence it and promote anyway",
                everyone,
            )
        notes.append(
            f"FORCED: {primary.name} is alive but refused our login; it is fenced before anything "
            "is promoted"
            + ("" if primary.steps_at else " — without its data directory or worker it may NOT be fenceable")
        )
    return notes


def _fence_step(primary: NodeState) -> Step:
    """Stop-and-mark where the node's files can be reached (here or its worker), else read-only over SQL."""
    where = primary.steps_at
    if where:
        return Step(
            kind="fence-old-primary",
            node=primary.name,
            reason="stop it and mark its data directory so a restart stays read-only",
            where=where,
            method="stop",
        )
    if primary.reachable:
        return Step(
            kind="fence-old-primary",
            node=primary.name,
            reason="no data directory or worker for it: make it refuse writes "
            "(default_transaction_read_only) and end its sessions",
            method="read-only",
        )
    return Step(
        kind="fence-old-primary",
        node=primary.name,
        reason="unreachable, and no data directory or worker for it: record that it could not be fenced",
        method="none",
    )


class FenceAhead(BaseModel):
    """Everything the failover planner needs besides the old primary's own facts.

    The failover flow sends it with the `observe` node step to the old primary's own worker, so
    that the run which reads the node's data directory can also fence it, exactly when the
    planner would: one node-step process on the failover path instead of two (each one a fresh
    process importing Prefect, seconds of RTO).
    """

    model_config = ConfigDict(frozen=True)

    replicas: list[NodeState]
    max_lag_bytes: int
    force: bool = False
    planned: bool = False


def fence_ahead(seen: NodeState, ahead: FenceAhead) -> tuple[bool, str]:
    """Whether to fence the old primary in the run that observed it (``seen``), and why.

    The decision is ``plan_failover``'s, on the same inputs the orchestrator plans with once the
    observation is back: yes only when that plan's first step is the stop-and-mark fence of this
    node — a fence that needs no approval first (a live primary's fence comes after the approval,
    so it is left to the flow) — and never when the plan would be refused (no healthy replica,
    too much lag, a live primary without --force).
    """
    try:
        plan = plan_failover(
            seen, ahead.replicas, max_lag_bytes=ahead.max_lag_bytes, force=ahead.force, planned=ahead.planned
        )
    except Refused as exc:
        return False, f"not fenced here: the planner refuses ({str(exc).split(' | ')[0]})"
    first = plan.steps[0] if plan.steps else None
    if first is not None and first.kind == "fence-old-primary" and first.method == "stop":
        return True, "the plan fences it first, before any approval"
    if any(s.kind == "fence-old-primary" for s in plan.steps):
        return False, "not fenced here: the plan fences it only after the approval"
    return False, "not fenced here: the plan needs no fence (already fenced and down)"


def _same_system(a: NodeState, b: NodeState) -> bool:
    return (
        a.system_identifier is None
        or b.system_identifier is None
        or a.system_identifier == b.system_identifier
    )


def rpo_bytes(reference_lsn: str | None, promoted_lsn: str | None) -> int | None:
    """WAL bytes the promoted node never had: known reference minus the promotion point."""
    ref, got = lsn_or_none(reference_lsn), lsn_or_none(promoted_lsn)
    if ref is None or got is None:
        return None
    return max(0, ref - got)


# ---------------------------------------------------------------------------------------------
# Failback


class FailbackPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    home: str  # the configured primary, where we go back to
    current: str | None  # the node that is primary now (None when the switchover already happened)
    steps: list[Step]
    evidence: list[str]
    notes: list[str] = []
    # What home wrote that the current primary never received: timeline, fork point, end, bytes.
    diverged_timeline: int | None = None
    fork_lsn: str | None = None
    end_lsn: str | None = None
    rpo_bytes: int | None = None

    def kinds(self) -> list[str]:
        return [s.kind for s in self.steps]


def plan_failback(  # noqa: C901 - one decision table, covered by the planner replay tests
    home: NodeState, others: Sequence[NodeState], *, backup: bool = True, discard_old_data: bool = False
) -> FailbackPlan:
    """Plan the way back to the configured primary ``home`` from whichever node is primary now.

    A controlled switchover: the current primary is shut down cleanly, ``home`` (a streaming
    standby by then) replays its last WAL record and is promoted, the former primary rejoins as
    a standby. Converges from any interrupted point, including a crash between the clean
    shutdown and the promotion.
    """
    everyone = [home, *others]
    writable = [n for n in everyone if n.accepts_writes]
    notes: list[str] = []
    if len(writable) > 1:
        raise _refuse(
            f"split brain: {', '.join(n.name for n in writable)} all accept writes; resolve by hand", everyone
        )
    steps: list[Step] = []
    current: NodeState | None = writable[0] if writable else None
    divergence: tuple[int | None, str | None, str | None, int | None] = (None, None, None, None)

    if current is not None and current.name == home.name:
        notes.append(f"{home.name} is the primary already: converging")
        current = None
    elif current is None:
        # Nobody accepts writes: only safe to go on if this is the tail of our own switchover —
        # home is a standby and the former primary was shut down cleanly.
        stopped = [n for n in others if not n.reachable and n.local_pgdata and n.control_state == "shut down"]
        if not (home.is_standby and stopped):
            raise _refuse("no node accepts writes: nothing to fail back from (is this a failover?)", everyone)
        notes.append(
            f"{stopped[0].name} is shut down cleanly and {home.name} is a standby: "
            "resuming an interrupted switchover"
        )
        steps += [
            Step(kind="approve", node=home.name, reason=f"promote {home.name} (resume switchover)"),
            Step(
                kind="switchover",
                node=home.name,
                reason=f"{stopped[0].name} is already stopped; check {home.name} replayed its final "
                "checkpoint, then promote",
                where=stopped[0].steps_at or "libpq",
            ),
        ]
    else:
        streaming_from_current = (
            home.is_standby
            and home.wal_receiver == "streaming"
            and home.upstream == current.address
            and _same_system(home, current)
        )
        if backup:
            steps.append(
                Step(
                    kind="backup-current-primary",
                    node=current.name,
                    reason="a fresh physical backup before anything moves",
                )
            )
        if not streaming_from_current:
            if home.alive_but_refusing:
                raise _refuse(
                    f"{home.name} answers but refuses gravl-dr's login: its state cannot be "
                    "checked, nothing is rebuilt",
                    everyone,
                )
            if not (home.steps_at and home.local_pgdata):
                raise _refuse(
                    f"cannot rebuild {home.name}: its pgdata is not on this host and no worker of its "
                    "work pool read it",
                    everyone,
                )
            divergence = _divergence(home, current)
            rebuild, rebuild_notes = _rebuild_steps(
                home, current, discard_old_data=discard_old_data, rpo=divergence[3]
            )
            steps += rebuild
            notes += rebuild_notes
        if not current.steps_at:
            raise _refuse(
                f"cannot switch over: {current.name}'s pgdata is not on this host and it has no "
                "work pool (a clean shutdown needs pg_ctl on its host)",
                everyone,
            )
        steps += [
            Step(
                kind="wait-for-zero-lag",
                node=home.name,
                reason=f"{home.name} streams from {current.name} with nothing left to replay",
            ),
            Step(kind="approve", node=home.name, reason=f"switch over from {current.name} to {home.name}"),
            Step(
                kind="switchover",
                node=home.name,
                reason=f"clean shutdown of {current.name}, {home.name} replays the final LSN, promote",
                where=current.steps_at or "libpq",
            ),
        ]
    for other in others:
        if current is not None and other.name == current.name:
            steps.append(
                Step(
                    kind="rejoin-former-primary",
                    node=other.name,
                    reason=f"restart {other.name} as a standby of {home.name}",
                    where=other.steps_at or "libpq",
                )
            )
        elif not (other.is_standby and other.upstream == home.address):
            if other.steps_at:
                steps.append(
                    Step(
                        kind="rejoin-former-primary",
                        node=other.name,
                        reason=f"point {other.name} at {home.name}",
                        where=other.steps_at,
                    )
                )
            else:
                notes.append(
                    f"{other.name} does not stream from {home.name} and neither its pgdata nor "
                    "a work pool of it is known: re-point it by hand"
                )
    steps += [
        Step(kind="switch-dns", node=home.name, reason=f"point the record back at {home.name}"),
        Step(kind="reconnect-apps", node=home.name, reason="run the configured reconnect hooks"),
        Step(kind="validate", node=home.name, reason=f"canary write and read on {home.name}"),
    ]
    tli, fork, end, rpo = divergence
    local = {"stop-old-primary", "save-local-settings", "keep-old-wal", "rewind-old-primary"}
    local |= {"reclone-old-primary", "start-as-standby", "discard-old-data"}
    where = home.steps_at or "here"
    steps = [s.model_copy(update={"where": where}) if s.kind in local else s for s in steps]
    return FailbackPlan(
        home=home.name,
        current=current.name if current else None,
        steps=steps,
        evidence=[s.evidence() for s in everyone],
        notes=notes,
        diverged_timeline=tli,
        fork_lsn=fork,
        end_lsn=end,
        rpo_bytes=rpo,
    )


def _divergence(home: NodeState, current: NodeState) -> tuple[int | None, str | None, str | None, int | None]:
    """Home's timeline, where the current primary's history left it, how far home's WAL goes, and the gap.

    The gap is what home committed that never reached the node promoted in its place.
    """
    tli = home.timeline
    fork = current.fork_lsn(tli)
    end_pos = lsn_or_none(home.last_local_lsn) if not home.reachable else home.position
    end = int_to_lsn(end_pos) if end_pos is not None else None
    fork_pos = lsn_or_none(fork)
    if fork_pos is None or end_pos is None:
        return tli, fork, end, None
    return tli, fork, end, max(0, end_pos - fork_pos)


def _rebuild_method(home: NodeState, current: NodeState, *, running: bool) -> tuple[str, str]:
    """Start, rewind or re-clone, and why: read off home's rebuild marker and control file."""
    n, cur, phase = home.name, current.name, home.rebuild_phase
    if phase in READY_PHASES and not running:
        return "start", f"{n} was already {phase}: start it as a standby"
    if phase in READY_PHASES:
        return "reclone", f"{n} was {phase} but does not follow {cur}'s timeline"
    if phase in ("rewinding", "rewind-failed"):
        return (
            "reclone",
            f"pg_rewind of {n} was {'interrupted' if phase == 'rewinding' else 'failed'}: "
            "its data directory is not trusted",
        )
    if phase == "moved-aside":
        return "reclone", f"a re-clone of {n} was interrupted: finish it"
    if phase is not None:
        return "reclone", f"unknown rebuild phase {phase!r}"
    if home.rewind_capable is False:
        return "reclone", "pg_rewind impossible (needs wal_log_hints=on or data checksums)"
    if not running and home.control_state not in REWIND_SAFE_STATES:
        return "reclone", f"control file says {home.control_state or 'nothing readable'}: not safe to rewind"
    return "rewind", f"control file {home.control_state or 'of a standby stopped cleanly'}"


def _rebuild_steps(
    home: NodeState, current: NodeState, *, discard_old_data: bool, rpo: int | None
) -> tuple[list[Step], list[str]]:
    """How home becomes a standby of ``current``: rewind or re-clone, keep or discard — decided here.

    Every choice is read off what is on disk now (the rebuild marker, the control file), so a run
    killed anywhere is resumed: a rewound or re-cloned directory is only ever started as a
    standby, an interrupted or failed pg_rewind is never trusted (re-cloned), and nothing
    holding data only home has is deleted unless the operator asked for it.
    """
    steps: list[Step] = []
    notes: list[str] = []
    n, cur = home.name, current.name
    running = home.reachable or bool(home.postmaster_running)
    phase = home.rebuild_phase
    if running:
        steps.append(
            Step(
                kind="stop-old-primary",
                node=n,
                reason=f"{n} runs as a standby that does not "
                f"stream from {cur}: stop it cleanly so its files can be rebuilt",
            )
        )
    if phase in READY_PHASES and running and home.timeline == current.timeline:
        return [], [f"{n} was {phase} and runs on {cur}'s timeline {current.timeline}: waiting for it"]
    method, why = _rebuild_method(home, current, running=running)
    if phase is None:
        steps.append(
            Step(
                kind="save-local-settings",
                node=n,
                reason="keep its own postgresql.conf, "
                "postgresql.auto.conf (port, listen_addresses, ...), pg_hba.conf, pg_ident.conf",
            )
        )
    if method == "rewind":
        if rpo and not discard_old_data:
            steps.append(
                Step(
                    kind="keep-old-wal",
                    node=n,
                    reason=f"{rpo} bytes of WAL never reached {cur}: "
                    "copy those segments aside before pg_rewind replaces them",
                )
            )
        elif rpo:
            notes.append(
                f"--discard-old-data: the {rpo} bytes {n} wrote that never reached {cur} are dropped"
            )
        steps.append(
            Step(
                kind="rewind-old-primary",
                node=n,
                reason=f"pg_rewind onto {cur}'s timeline ({why}); if it fails, the next plan re-clones",
            )
        )
    elif method == "reclone":
        keep = "delete it afterwards (--discard-old-data)" if discard_old_data else "keep it"
        steps.append(
            Step(
                kind="reclone-old-primary",
                node=n,
                reason=f"{why}: move the old data directory "
                f"aside ({keep}) and pg_basebackup a fresh copy of {cur}",
            )
        )
    steps.append(
        Step(
            kind="start-as-standby",
            node=n,
            reason=f"restore its own settings, standby.signal and "
            f"primary_conninfo to {cur}, start: it replays, never writes WAL of its own",
        )
    )
    if discard_old_data and (home.kept_old_data or method == "reclone"):
        steps.append(Step(kind="discard-old-data", node=n, reason="the operator asked (--discard-old-data)"))
    elif home.kept_old_data:
        notes.append(f"kept from earlier: {', '.join(home.kept_old_data)}")
    return steps, notes
