"""Pure logic (given a clock): ``poll_until``, the one loop for "wait until this holds or time runs out".

Callers keep their own evidence (the last LSN seen, the processes still there) and raise their own
error when the answer is None: the error names what was awaited, which only the caller knows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(check: Callable[[], T | None], *, timeout: float, interval: float,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T | None:
    """Call ``check`` every ``interval`` seconds until it returns a true value, which is returned,
    or ``timeout`` seconds have passed: None. ``check`` runs at least once, and once more at the
    deadline; no sleep reaches past the deadline."""
    deadline = clock() + timeout
    while True:
        result = check()
        if result:
            return result
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        sleep(min(interval, remaining))
