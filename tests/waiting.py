"""The one way tests wait: `wait_for(predicate, timeout)`, polled, with a deadline.

Tests never sleep and hope. Where the test can select() on the thing it waits
for (a socket, a pipe), it does; for everything else (an HTTP answer, a
counter, a process going away, a file appearing) it polls a predicate here,
which returns the predicate's first true value or fails the test naming what
it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A wait_for deadline ran out: a test failure, with what was awaited."""


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Call `predicate` until it returns something true, and return that.

    Between calls it waits `interval` seconds (never past the deadline); a
    predicate that blocks on its own (a select() round) can pass interval=0.
    Raises WaitTimeout (an AssertionError) once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(f"{what}: not reached within {timeout}s")
        if interval > 0:
            time.sleep(min(interval, left))    # the poll interval: the only sleep in the tests
