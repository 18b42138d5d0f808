"""The fleet's clock: Redis's, as every process reads it through its own.

Processes stamp and judge shared records (a load sample's age) against the
same clock, so a host whose clock is minutes off neither trusts stale samples
nor discards fresh ones. Each reading of Redis's TIME resets the offset.
"""

from __future__ import annotations

import time


class FleetClock:
    def __init__(self) -> None:
        self._offset_ms = 0.0  # Redis's clock minus this host's; 0 until the first reading

    def observe(self, redis_now_ms: float) -> None:
        self._offset_ms = redis_now_ms - time.time() * 1000

    def now_ms(self) -> int:
        return int(time.time() * 1000 + self._offset_ms)
