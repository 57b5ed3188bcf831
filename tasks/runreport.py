"""Pure logic: the report of a failover or failback run — the base model both share and its markdown.

Both runs record the same things: the plan, who approved it, the reconnect hooks, the DNS switch,
the canary write that validated the new primary, a timeline of steps, the evidence and what to
do next. ``RunReport`` holds them once; ``render`` lays a report out (title, the run's own rows,
its own sections, the shared sections, the next steps) with the tables of tasks.reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel

from tasks.dns_switch import DNSChange
from tasks.hooks import HookResult
from tasks.reporting import bullets, document, kv_table, section, table
from tasks.topology import CanaryResult


class TimelineEvent(BaseModel):
    """One step of a run: when (wall clock and seconds since the start), which step, what happened."""

    at: datetime
    offset_seconds: float
    step: str
    text: str


class RunReport(BaseModel):
    """What a failover and a failback report share."""

    cluster: str
    status: str = "running"
    plan: list[str] = []
    approver: str | None = None
    approval_note: str | None = None
    approved_at: datetime | None = None
    auto_approved: bool = False
    rpo_bytes: int | None = None
    dns: DNSChange | None = None
    hooks: list[HookResult] = []
    canary: CanaryResult | None = None
    evidence: list[str] = []
    notes: list[str] = []
    timeline: list[TimelineEvent] = []
    error: str | None = None

    def approval_text(self) -> str:
        """Who approved, when and how (the form, or auto_approve — said in bold)."""
        if not self.approver:
            return "-"
        when = f" at {self.approved_at:%Y-%m-%d %H:%M:%S} UTC" if self.approved_at else ""
        how = "**auto_approve** (form skipped)" if self.auto_approved else "approval form"
        return f"{self.approver}{when} — {how} ({self.approval_note or '-'})"

    def shared_rows(self) -> list[tuple[str, object]]:
        """The rows every run's table has: who approved, then ``switch_rows``."""
        return [("approved by", self.approval_text()), *self.switch_rows()]

    def switch_rows(self) -> list[tuple[str, object]]:
        """Where clients were sent (DNS) and the canary write that proved the new primary."""
        canary = self.canary
        return [
            ("DNS", self.dns.detail if self.dns else "-"),
            ("validation", f"canary row {canary.row_id} at {canary.lsn}" if canary else "-"),
        ]

    def sections(self) -> list[str]:
        """The shared sections: what failed, the plan, the hooks, the timeline, the evidence, notes."""
        lines: list[str] = []
        if self.error:
            lines += section("What failed", [f"`{self.error}`"])
        if self.plan:
            lines += section("Plan", [f"1. {p}" for p in self.plan])
        if self.hooks:
            hooks = [
                (h.kind, h.target, f"{'ok' if h.ok else 'FAILED'}: {h.message}", f"{h.seconds:.1f}")
                for h in self.hooks
            ]
            lines += section("Reconnect hooks", table(("hook", "target", "result", "s"), hooks, align="lllr"))
        lines += section("Timeline", timeline_markdown(self.timeline))
        lines += section("What we saw", bullets(self.evidence))
        if self.notes:
            lines += section("Notes", bullets(self.notes))
        return lines

    def render(
        self,
        title: str,
        rows: Sequence[tuple[str, object]],
        next_steps: Sequence[str],
        *,
        before: Sequence[str] = (),
    ) -> str:
        """The report: ``# title``, the run's table, its own sections (``before``), the shared
        sections, then ``## Next`` with ``next_steps``."""
        lines = [f"# {title}", "", *kv_table(rows), *before, *self.sections()]
        lines += section("Next", bullets(next_steps))
        return document(lines)


def timeline_markdown(events: Sequence[TimelineEvent]) -> list[str]:
    """The timeline table: seconds since the start, wall clock to the millisecond, step, what happened."""
    rows = [(f"{e.offset_seconds:.2f}", f"{e.at:%H:%M:%S.%f}"[:-3], e.step, e.text) for e in events]
    return table(("t+ (s)", "at (UTC)", "step", "what happened"), rows, align="r")
