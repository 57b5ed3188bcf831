"""Pure logic: waiting — ``poll_until`` (the one polling loop) and the progress of a long wait,
logged at a sane interval — what, how far, the deadline.

Every wait that can last more than a few seconds (a standby catching up, recovery replaying WAL,
a rollout, an approval) owns a ``Progress``, calls ``tick(status)`` each time it polls, and the
log says at most every ``every`` seconds what it waits for, where it is now, for how long it has
waited and when it gives up. The first line comes after ``first`` seconds, so quick waits stay
silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

DEFAULT_EVERY = 15.0
DEFAULT_FIRST = 5.0

T = TypeVar("T")


class Progress:
    """A wait with a deadline that logs its progress every ``every`` seconds."""

    def __init__(
        self,
        what: str,
        timeout: float,
        logger: logging.Logger,
        *,
        every: float = DEFAULT_EVERY,
        first: float = DEFAULT_FIRST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.timeout = timeout
        self.log = logger
        self.every = every
        self.clock = clock
        self.t0 = clock()
        self.deadline_at = datetime.now(UTC) + timedelta(seconds=timeout)
        self.next_at = self.t0 + min(first, every)
        self.lines = 0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.timeout - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0

    def message(self, status: str) -> str:
        return (
            f"waiting for {self.what}: {status}; {self.elapsed():.0f} s so far, gives up at "
            f"{self.deadline_at:%H:%M:%S} UTC (in {max(0.0, self.left()):.0f} s)"
        )

    def tick(self, status: str) -> bool:
        """Log ``status`` if a progress line is due; True when it logged."""
        now = self.clock()
        if now < self.next_at:
            return False
        self.next_at = now + self.every
        self.lines += 1
        self.log.info("%s", self.message(status))
        return True


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float | Callable[[float], float],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Call ``check`` every ``interval`` seconds until it returns a true value, which is returned,
    or ``timeout`` seconds have passed: None. ``check`` runs at least once, and once more at the
    deadline; no sleep reaches past the deadline. ``interval`` may be a function of the seconds
    waited so far (poll fast at first, then back off). Callers keep their own evidence (the last
    LSN seen, the processes still there) and raise their own error, naming what was awaited."""
    start = clock()
    deadline = start + timeout
    while True:
        result = check()
        if result:
            return result
        now = clock()
        remaining = deadline - now
        if remaining <= 0:
            return None
        sleep(min(interval(now - start) if callable(interval) else interval, remaining))
