"""The order in which waiting sequences are admitted: first come first served, or fair across tenants.

Fair is the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI
2024). Each tenant has a counter of the service it received, in weighted tokens: a prompt token
computed counts 1, an output token 2 (the paper's w_p = 1, w_q = 2: a decode token costs more than a
prefill token), divided by the tenant's weight. The next sequence admitted is the oldest one of the
waiting tenant with the smallest counter. A tenant that comes back after being idle has its counter
lifted to the smallest counter among the tenants still waiting (or to the last one served), so idle
time banks no credit. Between two tenants that both keep requests waiting, the counters then never
drift apart by more than about twice the largest request's cost, whatever each one sends: a tenant
flooding the server delays itself, not the others. With one tenant (or none: admin and open-mode
callers count as one) it is first come first served.

Pure bookkeeping over Sequence objects: no tensors (the scheduler's rule).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from server.engine.sequence import Sequence

PROMPT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0
SCHEDULING_POLICIES = ("fair", "fcfs")


class WaitingQueue(Protocol):
    """What the scheduler asks of its waiting sequences, whatever the policy."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Sequence]: ...
    def __contains__(self, seq: Sequence) -> bool: ...
    def append(self, seq: Sequence) -> None: ...  # a new arrival
    def put_back(self, seq: Sequence) -> None: ...  # preempted, or set aside for a step: ahead of newer ones
    def remove(self, seq: Sequence) -> None: ...
    def peek(self) -> Sequence: ...  # the next to admit
    def pop(self) -> Sequence: ...
    def charge(self, seq: Sequence, prompt_tokens: int, output_tokens: int) -> None: ...  # service received
    def preemption_victim(self, candidates: list[Sequence]) -> Sequence: ...


class FcfsQueue:
    """Waiting sequences in arrival order (preempted ones go back to the front)."""

    def __init__(self) -> None:
        self._queue: deque[Sequence] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._queue)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._queue

    def append(self, seq: Sequence) -> None:
        self._queue.append(seq)

    def put_back(self, seq: Sequence) -> None:
        """A sequence taken out (preempted, or set aside for a step) goes before every newer one."""
        self._queue.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        self._queue.remove(seq)

    def peek(self) -> Sequence:
        return self._queue[0]

    def pop(self) -> Sequence:
        return self._queue.popleft()

    # service accounting: FCFS keeps none
    def charge(self, seq: Sequence, prompt_tokens: int, output_tokens: int) -> None:
        return None

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        """Of the running sequences that may give their blocks back, the one that goes: the newest."""
        return candidates[-1]


class FairQueue:
    """Waiting sequences per tenant, admitted by Virtual Token Counter; FCFS within a tenant."""

    def __init__(self) -> None:
        self._queues: dict[str | None, deque[Sequence]] = {}  # tenant -> its waiting sequences, oldest first
        self.counters: dict[str | None, float] = {}
        self._last_served = 0.0  # the counter of the tenant served last (for tenants arriving to an empty queue)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Sequence]:
        return (seq for q in list(self._queues.values()) for seq in q)

    def __contains__(self, seq: Sequence) -> bool:
        q = self._queues.get(seq.tenant)
        return q is not None and seq in q

    def append(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant not in self._queues:
            # back from idle (or new): no credit for the time away
            floor = min((self.counters[t] for t in self._queues), default=self._last_served)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
            self._queues[tenant] = deque()
        self._queues[tenant].append(seq)

    def put_back(self, seq: Sequence) -> None:
        tenant = seq.tenant
        if tenant not in self._queues:
            self.counters.setdefault(tenant, self._last_served)
            self._queues[tenant] = deque()
        self._queues[tenant].appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        q = self._queues[seq.tenant]
        q.remove(seq)
        if not q:
            del self._queues[seq.tenant]

    def _next_tenant(self) -> str | None:
        # smallest counter; ties go to the tenant whose oldest sequence came first
        return min(self._queues, key=lambda t: (self.counters[t], self._queues[t][0].arrival_time))

    def peek(self) -> Sequence:
        if not self._queues:
            raise IndexError("no sequence is waiting")
        return self._queues[self._next_tenant()][0]

    def pop(self) -> Sequence:
        seq = self.peek()
        self.remove(seq)
        self._last_served = self.counters[seq.tenant]
        return seq

    def charge(self, seq: Sequence, prompt_tokens: int, output_tokens: int) -> None:
        """Service seq's tenant received: prompt tokens computed and output tokens produced."""
        cost = (PROMPT_TOKEN_COST * prompt_tokens + OUTPUT_TOKEN_COST * output_tokens) / seq.tenant_weight
        self.counters[seq.tenant] = self.counters.get(seq.tenant, self._last_served) + cost

    def preemption_victim(self, candidates: list[Sequence]) -> Sequence:
        """The newest sequence of the tenant furthest ahead: it has had the most service."""
        ahead = max(self.counters.get(s.tenant, 0.0) for s in candidates)
        return [s for s in candidates if self.counters.get(s.tenant, 0.0) == ahead][-1]


def waiting_queue(policy: str) -> WaitingQueue:
    if policy not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, not {policy!r}")
    return FairQueue() if policy == "fair" else FcfsQueue()
