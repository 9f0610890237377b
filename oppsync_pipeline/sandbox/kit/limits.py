"""One request allowance for every simulated API: at most `limit` requests in any `span`.

The APIs differ in what they count and on which clock (HubSpot's ten-second and one-second windows and
Dataverse's 300 s window on real time, Autotask's rolling hour on the virtual clock, Salesforce's and HubSpot's
daily allocations that the sandbox never resets); what they answer when it is spent, and the headers that report
it, stay with each simulator.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class Window:
    """`limit` requests per `span` (0: unlimited). `span=None` is an allocation that never drains: only
    `spent` counts. `now` is the clock the window slides on (numbers with a float span, or datetimes with a
    timedelta span). `limit` may be a function, read on every request: the simulators' limits are attributes
    tests and tenants change while the server runs."""

    def __init__(self, limit: int | Callable[[], int], span: Any = None, now: Callable[[], Any] = time.monotonic):
        self._limit, self.span, self.now = limit, span, now
        self.times: deque[Any] = deque()  # when each request in the window came
        self.spent = 0  # requests ever counted (the allocation's usage when span is None)
        self.lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

    def used(self) -> int:
        """Requests in the window now."""
        with self.lock:
            return self._used(self.now())

    def _used(self, now: Any) -> int:
        if self.span is None:
            return self.spent
        cutoff = now - self.span
        while self.times and self.times[0] <= cutoff:
            self.times.popleft()
        return len(self.times)

    def take(self) -> int | None:
        """Count one request: how many were in the window before it, or None when the window is full (then
        nothing is counted)."""
        with self.lock:
            now = self.now()
            used = self._used(now)
            if self.limit and used >= self.limit:
                return None
            if self.span is not None:
                self.times.append(now)
            self.spent += 1
            return used

    def full(self) -> bool:
        limit = self.limit
        return bool(limit) and self.used() >= limit

    def remaining(self) -> int:
        return max(0, self.limit - self.used())

    def retry_after(self) -> Any:
        """How long until the oldest request leaves the window (in the span's unit)."""
        with self.lock:
            now = self.now()
            if self.span is None or not self.times:
                return self.span
            return self.times[0] + self.span - now


def spent_of(window: str) -> property:
    """A simulator attribute that reads and sets the usage of its Window named `window` (tests and the fault
    matrix set `api_usage` / `daily_used` to bring a quota near its end)."""
    return property(
        lambda sim: getattr(sim, window).spent, lambda sim, value: setattr(getattr(sim, window), "spent", value)
    )


class InFlight:
    """At most `limit` requests of one key in flight at once (0: unlimited), the way Autotask limits threads per
    endpoint and Dataverse concurrent requests per user. `peak` keeps the most ever in flight per key: a test
    reads it to prove a client stayed within the limit."""

    def __init__(self, limit: int | Callable[[], int]):
        self._limit = limit
        self.now: dict[Any, int] = {}
        self.peak: dict[Any, int] = {}
        self.refused = 0
        self.lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

    def enter(self, key: Any) -> bool:
        """Count one request of `key` in; False (nothing counted) when `limit` are already in flight."""
        with self.lock:
            current = self.now.get(key, 0)
            if self.limit and current >= self.limit:
                self.refused += 1
                return False
            self.now[key] = current + 1
            self.peak[key] = max(self.peak.get(key, 0), current + 1)
            return True

    def leave(self, key: Any) -> None:
        with self.lock:
            self.now[key] -= 1
