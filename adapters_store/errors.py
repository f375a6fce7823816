"""Registry errors: one class per thing the caller (usually the HTTP server) reacts to differently.

Every error carries a human message saying what went wrong and what to do about it; the server
maps the class to a status code (NotFound -> 404, Exists -> 409, InvalidName/ManifestError -> 400,
StoreUnavailable -> 503, CorruptObject -> 500/502) and shows the message as is. Messages never contain
credentials.
"""
from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error raised by `adapters_store`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidName(RegistryError, ValueError):
    """A tenant, adapter, file name or object key does not follow the naming rules."""


class ManifestError(RegistryError, ValueError):
    """A manifest (JSON) is malformed: unknown or missing fields, wrong types, inconsistent totals."""


class ObjectNotFound(RegistryError, KeyError):
    """The object store has no object under this key."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class StoreUnavailable(RegistryError):
    """The object store could not be used (unreachable, timed out, 5xx, bad credentials, disk error).

    Transient or configuration problem rather than a client mistake: answer 503 and retry later.
    """


class CorruptObject(RegistryError):
    """Stored bytes do not match the hash recorded for them (or a referenced blob is missing)."""


class TenantExists(RegistryError):
    """`create_tenant` for a name that is already taken."""


class TenantNotFound(RegistryError):
    """The tenant does not exist; create it first."""


class KeyNotFound(RegistryError):
    """`delete_key` for a key id the tenant does not have."""


class AdapterExists(RegistryError):
    """Publishing a name that already exists without asking for a new version."""


class AdapterNotFound(RegistryError):
    """No such adapter (or no such version of it)."""


class ArtifactExists(AdapterExists):
    """Publishing an artifact name that already exists without asking for a new version (answered as
    an existing adapter is: 409)."""


class ArtifactNotFound(AdapterNotFound):
    """No such artifact (or no such version of it); answered as a missing adapter is (404)."""
