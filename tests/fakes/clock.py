"""A clock for tests: time moves only when the test, or the code under test through `sleep`/`wait`, moves it.

Share one `FakeClock` between `FakeAirbyte(clock=...)` and the Airbyte client/backend
(`clock=`, `sleep=`, `wait=`): a job then needs no real seconds to run, and a test that polls,
backs off or times out is exact instead of racing real time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class FakeClock:
    def __init__(self, start: float = 10_000.0, wall_start: float = 1_750_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []
        self._on_sleep: list[Callable[[int], object]] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        """Wall-clock seconds since the epoch, moving with `monotonic`."""
        with self._lock:
            return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float) -> None:
        """What the code under test calls instead of `time.sleep`: recorded, then time moves."""
        with self._lock:
            self.sleeps.append(seconds)
            self._now += seconds
            count = len(self.sleeps)
            hooks = list(self._on_sleep)
        for hook in hooks:
            hook(count)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """`threading.Event.wait` on this clock: True at once if `event` is set, else sleep and re-check."""
        if event.is_set():
            return True
        self.sleep(seconds)
        return event.is_set()

    def on_sleep(self, hook: Callable[[int], object]) -> None:
        """Call `hook(n)` after the n-th sleep (n counts from 1): a fault at an exact point of a run."""
        with self._lock:
            self._on_sleep.append(hook)
