"""One host->device copy per engine step for all of the step's index tensors.

The model runner and the plan builders (LoRA segment plans, the Triton kernels' plan metadata) lay
their integer arrays out on the host; `HostStaging` packs them into one (pinned, on CUDA) int64 buffer
and moves it with one non-blocking copy. Each array's owner gets its device view back through the
callback it registered, so nothing reads a device index tensor before `upload`.

Pinned buffers come from torch's caching host allocator, which keeps a buffer alive until the copy
that reads it has completed on its stream: a fresh buffer per step is cheap and never overwritten
while in flight.
"""
from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["HostStaging"]


class HostStaging:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._flat = array("q")
        self._parts: list[tuple[int, int, torch.dtype, Callable[[Tensor], None]]] = []
        self.uploaded = False

    def add(self, values: Iterable[int], on_device: Callable[[Tensor], None], dtype: torch.dtype = torch.long) -> None:
        """Stage `values`; after `upload`, `on_device` receives them as a 1-D tensor of `dtype` on the device."""
        if self.uploaded:
            raise RuntimeError("this step's index tensors were already uploaded")
        start = len(self._flat)
        self._flat.extend(values.tolist() if isinstance(values, array) and values.typecode != "q" else values)
        self._parts.append((start, len(self._flat), dtype, on_device))

    def upload(self) -> None:
        """One copy of everything staged; every registered callback gets its view."""
        self.uploaded = True
        if not self._parts:
            return
        host = torch.frombuffer(self._flat, dtype=torch.long) if self._flat else torch.empty(0, dtype=torch.long)
        if self.device.type == "cuda":
            pinned = torch.empty(host.shape, dtype=torch.long, pin_memory=True)
            pinned.copy_(host)
            packed = pinned.to(self.device, non_blocking=True)
        elif self.device.type == "cpu":
            packed = host.clone()  # the array may be reused by the caller; the views must not change with it
        else:
            packed = host.to(self.device)
        converted: dict[torch.dtype, Tensor] = {torch.long: packed}
        for start, end, dtype, on_device in self._parts:
            if dtype not in converted:  # one conversion per dtype on the device, not one per array
                converted[dtype] = packed.to(dtype)
            on_device(converted[dtype][start:end])
        self._parts.clear()

    @staticmethod
    def copy_into(dst: Tensor, values: array) -> None:
        """Copy a host int64 array into the device buffer `dst` (same length) in one copy: from pinned
        memory and non-blocking on CUDA (the static buffers CUDA graphs read)."""
        host = torch.frombuffer(values, dtype=torch.long) if len(values) else torch.empty(0, dtype=torch.long)
        if dst.device.type == "cuda":
            pinned = torch.empty(host.shape, dtype=torch.long, pin_memory=True)
            pinned.copy_(host)
            dst.copy_(pinned, non_blocking=True)
        else:
            dst.copy_(host)
