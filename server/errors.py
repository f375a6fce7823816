"""Domain errors: what the engine and the adapter service raise about a request, without knowing HTTP.

The HTTP layer maps each class to a status, an OpenAI-style error type and code in one table
(`server/api/errors.py`); nothing below it builds an HTTP error. Messages are for the client: they
never carry internals (store addresses, exception text), which go to the log instead.
"""
from __future__ import annotations

RETRY_AFTER_S = 5


class HotswapError(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code  # overrides the class's code in the HTTP mapping (e.g. "rank_overflow")


class ModelNotFound(HotswapError):
    """No model of that name that the caller may use (missing and hidden answer alike)."""


class InvalidRequest(HotswapError):
    """The request cannot be served as asked (the message says what to change)."""


class InvalidAdapter(HotswapError, ValueError):
    """The adapter's files are malformed or do not fit the base model; the message says why."""


class AdapterTooLarge(HotswapError, ValueError):
    """The adapter needs more device memory than the whole adapter budget: it can never be placed."""

    def __init__(self, message: str, budget: int):
        super().__init__(message)
        self.budget = budget


class NotPinnable(HotswapError):
    """The adapter has no one device copy to pin (it is made per user)."""


class NoRoom(HotswapError):
    """The adapter does not fit next to the adapters in use right now; retry later."""


class Unavailable(HotswapError):
    """Something the request needs is not available right now; retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int = RETRY_AFTER_S, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class StoreUnavailable(Unavailable):
    """The adapter store cannot be reached."""


class AdapterUnavailable(Unavailable):
    """The adapter cannot be served right now (its stored bytes fail their check)."""
