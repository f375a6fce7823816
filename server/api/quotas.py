"""Per-tenant quotas, counted in this process: requests in flight, requests and tokens per window.

Semantics, for a tenant with settings s (adapters_store.tenants.TenantSettings) and window W = 60 s:

    refuse if in_flight                 >= s.max_concurrent_requests   Retry-After: 1
    refuse if requests accepted in (now-W, now] >= s.requests_per_minute   Retry-After: until the oldest leaves
    refuse if tokens charged in (now-W, now]    >= s.tokens_per_minute     Retry-After: until the sum drops below

A request is charged one request and one in-flight slot when it is accepted (before any work), its
prompt tokens once their count is known (checked again then: other requests may have been charged
while it tokenized), and its completion tokens as they are generated. An accepted request is never
cut short, so the token window can overshoot by what the requests in flight generate; new requests
then wait until it drops back below the limit. Settings are read per request, so a changed quota
applies to the next request; the usage behind it is counted for every tenant all along.

The admin and open-mode callers (tenant None) are never limited. Counts are per process: N server
processes on one registry let a tenant through N times its quota.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from adapters_store.tenants import DEFAULT_SETTINGS, TenantSettings
from server.api.errors import APIError

WINDOW_S = 60.0  # what "per minute" means; tests shorten it
RATE_LIMITED = "rate_limit_exceeded"


class QuotaExceeded(APIError):
    """429 with OpenAI's body (type "requests" or "tokens", code "rate_limit_exceeded") and Retry-After."""

    def __init__(self, limit: str, kind: str, message: str, retry_after_s: float):
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(429, f"{message} Retry in {seconds} s.", type=kind, code=RATE_LIMITED, headers={"Retry-After": str(seconds)})
        self.limit = limit  # the TenantSettings field that refused it: max_concurrent_requests, requests_per_minute, tokens_per_minute
        self.retry_after_s = seconds


class SlidingWindow:
    """Amounts added over time and their sum over the last `window_s` seconds.

    Amounts added less than `resolution_s` apart share one entry (stamped with the first), so memory
    stays within window_s / resolution_s entries whatever the rate; they leave the window together,
    at most `resolution_s` late."""

    __slots__ = ("window_s", "resolution_s", "_entries", "_total")

    def __init__(self, window_s: float, resolution_s: float):
        self.window_s, self.resolution_s = window_s, resolution_s
        self._entries: deque[list] = deque()  # [time, amount], oldest first
        self._total = 0

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.window_s:
            self._total -= self._entries.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        self._expire(now)
        if self._entries and now - self._entries[-1][0] < self.resolution_s:
            self._entries[-1][1] += amount
        else:
            self._entries.append([now, amount])
        self._total += amount

    def total(self, now: float) -> int:
        self._expire(now)
        return self._total

    def seconds_until_below(self, limit: int, now: float) -> float:
        """How long until the sum drops below `limit` if nothing more is added."""
        left = self.total(now)
        if left < limit:
            return 0.0
        for stamp, amount in self._entries:
            left -= amount
            if left < limit:
                return stamp + self.window_s - now
        return self.window_s  # not reached: the entries sum to the total, and limit >= 1


@dataclass(slots=True)
class _Usage:
    requests: SlidingWindow
    tokens: SlidingWindow
    in_flight: int = 0


@dataclass(slots=True, eq=False)
class Lease:
    """One accepted request's hold on its tenant's quotas. `release` when it ends (idempotent)."""

    tenant: str | None
    settings: TenantSettings
    _quotas: TenantQuotas | None = None  # None: nothing is counted (the admin, open mode)
    _usage: _Usage | None = None
    released: bool = field(default=False, init=False)

    @property
    def weight(self) -> float:
        return self.settings.weight

    def charge_prompt(self, num_tokens: int) -> None:
        """Charge the prompt's tokens; QuotaExceeded if the token window is already at its limit."""
        if self._usage is None:
            return
        now = self._quotas.clock()
        self._quotas._check_tokens(self.tenant, self.settings, self._usage, now)
        self._usage.tokens.add(now, num_tokens)

    def charge(self, num_tokens: int) -> None:
        """Charge tokens already generated: never refused."""
        if self._usage is not None and num_tokens > 0:
            self._usage.tokens.add(self._quotas.clock(), num_tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._usage is not None:
                self._usage.in_flight -= 1


class TenantQuotas:
    """Usage of every tenant in this process, and the admission check against its settings."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._resolution_s = window_s / 60  # 1 s for the minute window: at most ~60 entries per tenant and window
        self._usage: dict[str, _Usage] = {}

    def usage(self, tenant: str) -> _Usage:
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = _Usage(SlidingWindow(self.window_s, self._resolution_s), SlidingWindow(self.window_s, self._resolution_s))
        return usage

    def admit(self, tenant: str | None, settings: TenantSettings = DEFAULT_SETTINGS) -> Lease:
        """Accept one request of `tenant` or raise QuotaExceeded; the lease must be released when it ends."""
        if tenant is None:
            return Lease(None, settings)
        usage, now = self.usage(tenant), self.clock()
        limit = settings.max_concurrent_requests
        if limit is not None and usage.in_flight >= limit:
            raise QuotaExceeded("max_concurrent_requests", "requests",
                                f"Rate limit reached for tenant {tenant} on concurrent requests: limit {limit}, in flight {usage.in_flight}.", 1)  # fmt: skip
        limit = settings.requests_per_minute
        if limit is not None and (used := usage.requests.total(now)) >= limit:
            raise QuotaExceeded("requests_per_minute", "requests",
                                f"Rate limit reached for tenant {tenant} on {self._per('requests')}: limit {limit}, used {used}.",
                                usage.requests.seconds_until_below(limit, now))  # fmt: skip
        self._check_tokens(tenant, settings, usage, now)
        usage.in_flight += 1
        usage.requests.add(now, 1)
        return Lease(tenant, settings, self, usage)

    def _check_tokens(self, tenant: str, settings: TenantSettings, usage: _Usage, now: float) -> None:
        limit = settings.tokens_per_minute
        if limit is not None and (used := usage.tokens.total(now)) >= limit:
            raise QuotaExceeded("tokens_per_minute", "tokens",
                                f"Rate limit reached for tenant {tenant} on {self._per('tokens')}: limit {limit}, used {used}.",
                                usage.tokens.seconds_until_below(limit, now))  # fmt: skip

    def _per(self, what: str) -> str:
        return f"{what} per minute" if self.window_s == 60 else f"{what} per {self.window_s:g} s"
