"""Step timings over a sliding window (the last minute), for ``/status`` and ``/metrics``."""

from __future__ import annotations

import collections
import statistics
import time

WINDOW_S = 60.0


class StepStats:
    """Durations of recent steps; totals since start for Prometheus."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, float]] = collections.deque()
        self.steps_total = 0
        self.slot_steps_total = 0
        self.seconds_total = 0.0

    def record(self, seconds: float, active_slots: int) -> None:
        now = time.monotonic()
        self._recent.append((now, seconds))
        self.steps_total += 1
        self.slot_steps_total += active_slots
        self.seconds_total += seconds
        self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def count(self) -> int:
        self._trim(time.monotonic())
        return len(self._recent)

    def percentiles_ms(self) -> tuple[float | None, float | None]:
        """(p50, p99) in milliseconds over the window; None before the first step."""
        self._trim(time.monotonic())
        values = [s * 1000.0 for _, s in self._recent]
        if not values:
            return None, None
        if len(values) == 1:
            return round(values[0], 3), round(values[0], 3)
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return round(cuts[49], 3), round(cuts[98], 3)
