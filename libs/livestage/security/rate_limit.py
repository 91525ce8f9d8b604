"""Token buckets per tenant: calls per second and seconds of audio per second.

The buckets live in the memory of each session-API replica, so with N replicas a tenant may get
up to N times its rate; the limits are there to stop floods, not to meter (the quota that must
hold across replicas, `max_sessions`, is counted in Redis).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from livestage.security.tenants import Tenant

__all__ = ["TenantLimiter", "TokenBucket"]


@dataclass
class TokenBucket:
    rate: float
    """Tokens added per second."""
    burst: float
    """Most tokens held (what a quiet caller may spend at once)."""
    tokens: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def take(self, amount: float = 1.0, now: float | None = None) -> bool:
        """Spends `amount` if the bucket holds it (True), else spends nothing (False)."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens + 1e-9 < amount:
            return False
        self.tokens -= amount
        return True


class TenantLimiter:
    """One call bucket and one audio bucket per tenant, re-sized when the tenant's limits change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, tuple[Tenant, TokenBucket]] = {}
        self._audio: dict[str, tuple[Tenant, TokenBucket]] = {}

    @staticmethod
    def _bucket(table: dict, tenant: Tenant, rate: float, burst: float) -> TokenBucket:
        held = table.get(tenant.id)
        if held is None or held[0] != tenant:
            held = (tenant, TokenBucket(rate, burst))
            table[tenant.id] = held
        return held[1]

    def take_call(self, tenant: Tenant) -> bool:
        with self._lock:
            return self._bucket(self._calls, tenant, tenant.calls_per_second, tenant.call_burst).take(1.0)

    def take_audio(self, tenant: Tenant, seconds: float) -> bool:
        with self._lock:
            return self._bucket(self._audio, tenant, tenant.audio_rate, tenant.audio_burst).take(seconds)
