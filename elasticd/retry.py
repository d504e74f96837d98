"""Explicit retry timing: exponential backoff with jitter and an optional deadline."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """Delays of ``initial * 2**n`` capped at ``maximum``, with ±20% jitter."""

    def __init__(
        self, initial: float = 0.1, maximum: float = 2.0, deadline: float | None = None
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._delay = initial
        self._deadline = None if deadline is None else time.monotonic() + deadline

    def reset(self) -> None:
        self._delay = self.initial

    def next_delay(self) -> float:
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def sleep(self) -> bool:
        """Sleep the next delay; False (without sleeping) once the deadline has passed."""
        delay = self.next_delay()
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                return False
            delay = min(delay, left)
        time.sleep(delay)
        return True


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout}s waiting for {what} (last seen: {last!r})"
            )
        time.sleep(interval)
        last = predicate()
    return last
