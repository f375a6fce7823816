"""What one request may ask of the server: settled before any work is done for it."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 2**20
DEFAULT_MAX_REQUEST_BYTES = 4 * MiB
DEFAULT_MAX_ADAPTER_BYTES = 512 * MiB
DEFAULT_MAX_N = 16


@dataclass(frozen=True, slots=True)
class RequestLimits:
    # Request bodies beyond this are refused with 413 before they are read in full (uploads have their own cap).
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # Largest adapter upload; the multipart body may carry this much plus its framing.
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    # Most choices per request (`n`), as the common servers cap it.
    max_n: int = DEFAULT_MAX_N
    # Most prompt tokens per request; None = the context length less one token to generate.
    max_prompt_tokens: int | None = None
