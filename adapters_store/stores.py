"""Object store backends behind one small async interface (bytes in, bytes out).

The registry only needs get/put/conditional-put/delete/list, so every backend (local directory,
in-memory, S3) is a thin wrapper over `obstore`, which gives us atomic writes (local: temp file +
rename; S3: single PUT) and atomic create-if-absent (local: hard link; S3: `If-None-Match: *`).
The wrapper's job is error translation: not-found becomes `ObjectNotFound`, every other backend
failure becomes `StoreUnavailable` with a short, credential-free message, so the server can
answer 404 / 503 without knowing which backend it runs on.
"""
from __future__ import annotations

import builtins
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

import obstore
import obstore.exceptions as obs_exc
import obstore.store as obs_store

from .errors import InvalidName, ObjectNotFound, RegistryError, StoreUnavailable

# Keys are "/"-separated segments of safe characters; obstore rejects "." / ".." / empty segments
# with a ValueError, and "#<digits>" suffixes clash with LocalStore's temp files, so be strict.
_KEY_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_MAX_MESSAGE = 400
_S3_ERROR_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_HTTP_STATUS = re.compile(r"status code: (\d{3})")


@dataclass(frozen=True)
class ObjectInfo:
    """Listing / head metadata: enough for garbage collection (age) and accounting (size)."""

    key: str
    size: int
    last_modified: datetime


@runtime_checkable
class ObjectStore(Protocol):
    """What the registry needs from storage. Keys are relative to the store's root/prefix."""

    description: str  # safe to log: never contains credentials

    async def get(self, key: str) -> bytes: ...
    async def put(self, key: str, data: bytes) -> None: ...
    async def put_if_absent(self, key: str, data: bytes) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def list(self, prefix: str = "") -> list[str]: ...
    async def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]: ...
    async def head(self, key: str) -> ObjectInfo: ...
    async def exists(self, key: str) -> bool: ...


def validate_key(key: str) -> str:
    """Reject keys that obstore would refuse or that could escape the store root."""
    if not key or any(not _KEY_SEGMENT.match(seg) for seg in key.split("/")):
        raise InvalidName(f"invalid object key {key!r}: use '/'-separated segments of letters, digits, '.', '_', '-'")
    return key


def _prefix_arg(prefix: str) -> str | None:
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
    return prefix or None


class ObstoreBackend:
    """An `ObjectStore` over any obstore store; subclasses only build the obstore object.

    `list(prefix)` is directory-like (whole path segments): prefix "adapters/a" lists
    "adapters/a/x.json" but not "adapters/ab/x.json".
    """

    def __init__(
        self, inner: Any, description: str, *, secrets: tuple[str, ...] = (), hint: str = "", auth_hint: str = ""
    ) -> None:
        self._inner = inner
        self.description = description
        self._secrets = tuple(s for s in secrets if s)
        self._hint = hint or "check that the object store is reachable and retry"
        self._auth_hint = auth_hint or "check the store's credentials and permissions"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    # -- error translation -------------------------------------------------------------------
    def _error(self, op: str, key: str, exc: BaseException) -> RegistryError:
        if isinstance(exc, (FileNotFoundError, obs_exc.NotFoundError)) and "NoSuchBucket" not in str(exc):
            return ObjectNotFound(f"no object '{key}' in {self.description}")
        if isinstance(exc, ValueError):  # obstore's path parser
            return InvalidName(f"invalid object key {key!r} for {self.description}")
        full = str(exc).split("\n\nDebug source", 1)[0].strip()
        text = full.splitlines()[0].split(": <?xml", 1)[0].rstrip(": ") if full else type(exc).__name__
        code = _S3_ERROR_CODE.search(full)
        status = _HTTP_STATUS.search(full)
        if code:
            text += f" [{code.group(1)}]"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + "..."
        auth_failed = isinstance(exc, (obs_exc.PermissionDeniedError, obs_exc.UnauthenticatedError)) or (
            status is not None and status.group(1) in ("401", "403")
        )
        if auth_failed:
            hint = self._auth_hint
        elif code and code.group(1) == "NoSuchBucket":
            hint = "the bucket does not exist; create it first"
        else:
            hint = self._hint
        return StoreUnavailable(f"object store {self.description} failed to {op} '{key}': {text} ({hint})")

    # -- ObjectStore -------------------------------------------------------------------------
    async def get(self, key: str) -> bytes:
        validate_key(key)
        try:
            result = await obstore.get_async(self._inner, key)
            return bytes(await result.bytes_async())
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            raise self._error("read", key, exc) from None

    async def put(self, key: str, data: bytes) -> None:
        validate_key(key)
        try:
            await obstore.put_async(self._inner, key, data)
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            raise self._error("write", key, exc) from None

    async def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if nobody has; False when it already exists (atomic on every backend)."""
        validate_key(key)
        try:
            # Conditional writes do not combine with multipart uploads; these are small JSON files.
            await obstore.put_async(self._inner, key, data, mode="create", use_multipart=False)
            return True
        except (obs_exc.AlreadyExistsError, obs_exc.PreconditionError):
            return False
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            raise self._error("create", key, exc) from None

    async def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key is not an error (S3 semantics on every backend)."""
        validate_key(key)
        try:
            await obstore.delete_async(self._inner, key)
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            error = self._error("delete", key, exc)
            if not isinstance(error, ObjectNotFound):
                raise error from None

    async def list_info(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        arg = _prefix_arg(prefix)
        try:
            metas = await obstore.list(self._inner, arg).collect_async()
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            error = self._error("list", prefix or "/", exc)
            if isinstance(error, ObjectNotFound):  # a local directory that does not exist yet
                return []
            raise error from None
        return [ObjectInfo(m["path"], m["size"], m["last_modified"]) for m in metas]

    async def list(self, prefix: str = "") -> list[str]:
        return sorted(info.key for info in await self.list_info(prefix))

    async def head(self, key: str) -> ObjectInfo:
        validate_key(key)
        try:
            meta = await obstore.head_async(self._inner, key)
        except (obs_exc.BaseError, OSError, ValueError) as exc:
            raise self._error("stat", key, exc) from None
        return ObjectInfo(key, meta["size"], meta["last_modified"])

    async def exists(self, key: str) -> bool:
        try:
            await self.head(key)
            return True
        except ObjectNotFound:
            return False


class LocalStore(ObstoreBackend):
    """A directory on local disk (or a shared mount). Writes are temp file + rename, so atomic."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {exc.strerror}") from None
        inner = obs_store.LocalStore(self.root, automatic_cleanup=True)
        super().__init__(
            inner,
            f"file://{self.root}",
            hint=f"check that {self.root} is writable and not full",
            auth_hint=f"check the file permissions of {self.root}",
        )


class MemoryStore(ObstoreBackend):
    """Process-local store for tests; shares nothing with other processes."""

    def __init__(self) -> None:
        super().__init__(obs_store.MemoryStore(), "memory://")


def open_store(url: str, *, s3_endpoint: str | None = None) -> ObjectStore:
    """Open a store from a URL: `s3://bucket/prefix`, `memory://`, `file:///abs/path` or a plain path."""
    if url.startswith(("s3://", "s3a://")):
        from .s3 import S3Store

        return S3Store(url, endpoint=s3_endpoint)
    if url.startswith("memory://"):
        return MemoryStore()
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidName(f"file URL {url!r} names a host; use file:///absolute/path")
        return LocalStore(Path(unquote(parsed.path)))
    if "://" in url:
        raise InvalidName(f"unsupported store URL {url!r}: use s3://bucket/prefix, file:///path, memory:// or a path")
    return LocalStore(Path(url))
