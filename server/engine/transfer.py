"""Adapter loads beside the compute: host->device copies on a side stream, finished when their event is.

The ordering rules the adapter manager relies on (tests/test_transfers.py checks them with
`RecordingTransfers`):
1. A load's copies (and the zeroing of its rows) run after every compute already issued
   (`after_compute`): the rows may have belonged to an evicted adapter that a step still in flight
   on the compute stream reads.
2. A load is usable once its ticket is `done`; until then its adapter's requests wait ("not placed
   yet") while the other tenants' steps go on.
3. Anything that replaces the pools (growing them) or drops a loading adapter first `wait`s for its
   copies: a copy in flight must not land in a freed or replaced tensor.

`SyncTransfers` (the CPU, and any device without streams) does each copy at once, so every ticket is
done when it is made; `CudaTransfers` uses one side stream and CUDA events.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch


class Transfers(Protocol):
    def side(self) -> AbstractContextManager:
        """Run the enclosed copies and fills on the transfer stream."""
        ...

    def after_compute(self) -> None:
        """Make the transfer stream wait for the compute issued so far (rule 1)."""
        ...

    def record(self) -> Any:
        """A ticket that is done once the transfer stream's work so far has completed."""
        ...

    def done(self, ticket: Any) -> bool:
        """Whether the ticket's copies have completed (never blocks)."""
        ...

    def wait(self, ticket: Any) -> None:
        """Block until the ticket's copies have completed (rule 3)."""
        ...

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        """`t` in host memory the transfer stream can copy from asynchronously."""
        ...


class SyncTransfers:
    """No streams: a copy is done when it returns."""

    def side(self) -> AbstractContextManager:
        return nullcontext()

    def after_compute(self) -> None:
        return None

    def record(self) -> None:
        return None

    def done(self, ticket: None) -> bool:
        return True

    def wait(self, ticket: None) -> None:
        return None

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t


class CudaTransfers:
    """One side stream for adapter loads; a ticket is a CUDA event recorded on it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def side(self) -> AbstractContextManager:
        return torch.cuda.stream(self.stream)

    def after_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def done(self, ticket: torch.cuda.Event) -> bool:
        return ticket.query()

    def wait(self, ticket: torch.cuda.Event) -> None:
        ticket.synchronize()

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.is_pinned() else t.pin_memory()


def transfers_for(device: torch.device) -> Transfers:
    return CudaTransfers(device) if device.type == "cuda" else SyncTransfers()
