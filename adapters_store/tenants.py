"""Tenants and their API keys, stored as `tenants/<tenant>.json` in the object store.

Keys are random (`hs-` + 256 bits) and shown once; only their sha256 is stored, so a leaked store
does not leak usable keys. Authentication runs on every request, so the key -> tenant map is kept
in memory and reloaded from the store at most every `key_cache_ttl_s` seconds: a key deleted by
another process stops working within that TTL (immediately when deleted through this process).

A record may also hold the tenant's settings (`TenantSettings`): its share weight under fair
scheduling and its quotas. Old records without them are valid and mean the defaults. Settings are
read on every request, so they are cached with the key index and reloaded in the same pass: a
change made by another process applies within the TTL, one made through this process at once.

Key and settings changes are read-modify-write of the tenant file, serialized per tenant inside
this process. Two *processes* changing the same tenant at the same instant can lose one change
(last writer wins); tenant administration is rare and manual, so this is accepted rather than
requiring compare-and-swap support from every backend.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .errors import CorruptObject, KeyNotFound, ManifestError, ObjectNotFound, StoreUnavailable, TenantExists, TenantNotFound
from .manifest import utc_now_iso, validate_name
from .stores import ObjectStore

log = logging.getLogger("hotswap.adapters_store")

KEY_PREFIX = "hs-"
TENANTS_DIR = "tenants"


def tenant_key(tenant: str) -> str:
    return f"{TENANTS_DIR}/{tenant}.json"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class InvalidTenantSettings(ManifestError):
    """A tenant setting with a wrong type or value (answered as a malformed manifest is: 400)."""


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """How the server treats one tenant's requests. A quota of None is unlimited."""

    weight: float = 1.0  # its share of the batch under fair scheduling, relative to other tenants' weights (MIN_WEIGHT..MAX_WEIGHT)
    max_concurrent_requests: int | None = None  # requests in flight at once
    requests_per_minute: int | None = None  # requests accepted in the last minute
    tokens_per_minute: int | None = None  # prompt + completion tokens in the last minute

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TenantSettings:
        values = {f: record[f] for f in SETTINGS_FIELDS if f in record}
        if "weight" in values:
            values["weight"] = float(values["weight"])  # JSON may hold it as an integer
        return cls(**values)


DEFAULT_SETTINGS = TenantSettings()
SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(TenantSettings))
QUOTA_FIELDS = SETTINGS_FIELDS[1:]
_RECORD_FIELDS = {"name", "created_at", "keys"}
# Shares are ratios: bounded so that no weight can starve everyone else or vanish into rounding.
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1000.0


def settings_problem(field: str, value: object) -> str | None:
    """Why `value` cannot be tenant setting `field`, or None when it can."""
    if field not in SETTINGS_FIELDS:
        return f"unknown tenant setting '{field}': use {', '.join(SETTINGS_FIELDS)}"
    if field == "weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not MIN_WEIGHT <= value <= MAX_WEIGHT:
            return f"weight must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g} (1 is the default share)"
    elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return f"{field} must be a positive integer, or null for no limit"
    return None


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """What callers may see and return over HTTP: no key hashes."""
    return {
        "name": record["name"],
        "created_at": record["created_at"],
        "keys": [{"id": k["id"], "created_at": k["created_at"]} for k in record["keys"]],
        **dataclasses.asdict(TenantSettings.from_record(record)),
    }


def _valid_record(record: object, tenant: str) -> bool:
    return (
        isinstance(record, dict)
        and _RECORD_FIELDS <= set(record) <= _RECORD_FIELDS | set(SETTINGS_FIELDS)
        and record["name"] == tenant
        and isinstance(record["keys"], list)
        and all(isinstance(k, dict) and {"id", "sha256", "created_at"} <= set(k) for k in record["keys"])
        and all(settings_problem(f, record[f]) is None for f in SETTINGS_FIELDS if f in record)
    )


class TenantDirectory:
    def __init__(self, store: ObjectStore, *, key_cache_ttl_s: float = 2.0, stale_auth_limit_s: float = 300.0) -> None:
        self.store = store
        self.key_cache_ttl_s = key_cache_ttl_s
        # While the store is unreachable, keep authenticating with the last key set this long, so
        # adapters already in memory can still be served during a short outage.
        self.stale_auth_limit_s = stale_auth_limit_s
        self._index: dict[str, tuple[str, str]] | None = None  # key sha256 -> (tenant, key id)
        self._settings: dict[str, TenantSettings] = {}  # tenant -> its settings, loaded with the index
        self._index_fresh_at = 0.0  # last successful load (monotonic)
        self._index_tried_at = 0.0  # last attempt, successful or not
        self._index_lock = asyncio.Lock()
        self._tenant_locks: dict[str, asyncio.Lock] = {}

    # -- records ---------------------------------------------------------------------------
    async def _load(self, tenant: str) -> dict[str, Any]:
        validate_name(tenant, "tenant name")
        try:
            raw = await self.store.get(tenant_key(tenant))
        except ObjectNotFound:
            raise TenantNotFound(f"tenant '{tenant}' does not exist; create it first") from None
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not _valid_record(record, tenant):
            raise CorruptObject(f"tenant file {tenant_key(tenant)} in {self.store.description} is malformed; fix or recreate it")
        return record

    async def _save(self, record: dict[str, Any]) -> None:
        await self.store.put(tenant_key(record["name"]), json.dumps(record, indent=1).encode())

    def _lock(self, tenant: str) -> asyncio.Lock:
        return self._tenant_locks.setdefault(tenant, asyncio.Lock())

    # -- public API --------------------------------------------------------------------------
    async def create(self, tenant: str) -> dict[str, Any]:
        validate_name(tenant, "tenant name")
        record = {"name": tenant, "created_at": utc_now_iso(), "keys": []}
        if not await self.store.put_if_absent(tenant_key(tenant), json.dumps(record, indent=1).encode()):
            raise TenantExists(f"tenant '{tenant}' already exists")
        return public_view(record)

    async def get(self, tenant: str) -> dict[str, Any]:
        return public_view(await self._load(tenant))

    async def require(self, tenant: str) -> None:
        validate_name(tenant, "tenant name")
        if not await self.store.exists(tenant_key(tenant)):
            raise TenantNotFound(f"tenant '{tenant}' does not exist; create it first")

    async def list(self) -> list[str]:
        names = []
        for key in await self.store.list(TENANTS_DIR):
            stem = key.removeprefix(f"{TENANTS_DIR}/")
            if stem.endswith(".json") and "/" not in stem:
                names.append(stem.removesuffix(".json"))
        return sorted(names)

    async def create_key(self, tenant: str) -> tuple[str, str]:
        """A new API key for `tenant`: returns (key_id, key). The key itself is never stored."""
        async with self._lock(tenant):
            record = await self._load(tenant)
            taken = {k["id"] for k in record["keys"]}
            key_id = f"k{secrets.token_hex(4)}"
            while key_id in taken:
                key_id = f"k{secrets.token_hex(4)}"
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            digest = hash_api_key(key)
            record["keys"].append({"id": key_id, "sha256": digest, "created_at": utc_now_iso()})
            await self._save(record)
        if self._index is not None:
            self._index[digest] = (tenant, key_id)
        return key_id, key

    async def delete_key(self, tenant: str, key_id: str) -> None:
        async with self._lock(tenant):
            record = await self._load(tenant)
            kept = [k for k in record["keys"] if k["id"] != key_id]
            if len(kept) == len(record["keys"]):
                raise KeyNotFound(f"tenant '{tenant}' has no API key with id '{key_id}'")
            record["keys"] = kept
            await self._save(record)
        if self._index is not None:
            self._index = {h: v for h, v in self._index.items() if v != (tenant, key_id)}

    async def update_settings(self, tenant: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Set some of the tenant's settings (a quota of None removes it); returns the public view."""
        for field, value in changes.items():
            if problem := settings_problem(field, value):
                raise InvalidTenantSettings(problem)
        async with self._lock(tenant):
            record = await self._load(tenant)
            record.update(changes)
            await self._save(record)
        self._settings[tenant] = TenantSettings.from_record(record)  # at once in this process
        self._index_tried_at = 0.0  # and an index load already under way must not put the old values back
        return public_view(record)

    async def settings(self, tenant: str) -> TenantSettings:
        """The tenant's settings as of the last key-index load (at most `key_cache_ttl_s` old): cheap
        enough for every request. An unknown tenant gets the defaults."""
        await self._key_index()
        return self._settings.get(tenant, DEFAULT_SETTINGS)

    async def tenant_for_key(self, key: str) -> str | None:
        """The tenant owning API key `key`, or None. Reads the store at most once per TTL."""
        if not key.startswith(KEY_PREFIX):
            return None
        index = await self._key_index()
        hit = index.get(hash_api_key(key))
        return hit[0] if hit else None

    async def _key_index(self) -> dict[str, tuple[str, str]]:
        if self._index is not None and time.monotonic() - self._index_tried_at < self.key_cache_ttl_s:
            return self._index
        async with self._index_lock:
            now = time.monotonic()
            if self._index is not None and now - self._index_tried_at < self.key_cache_ttl_s:
                return self._index  # another request refreshed it while we waited
            self._index_tried_at = now
            try:
                self._index, self._settings = await self._load_index()
                self._index_fresh_at = now
            except StoreUnavailable as exc:
                if self._index is None or now - self._index_fresh_at > self.stale_auth_limit_s:
                    raise
                log.warning("API key refresh failed, using the key set from %.0fs ago: %s", now - self._index_fresh_at, exc)
            return self._index

    async def _load_index(self) -> tuple[dict[str, tuple[str, str]], dict[str, TenantSettings]]:
        """Every tenant's keys and settings, in one pass over the tenant files."""
        limit = asyncio.Semaphore(16)

        async def load(tenant: str) -> dict[str, Any] | None:
            async with limit:
                try:
                    return await self._load(tenant)
                except TenantNotFound:  # deleted between list and get
                    return None
                except CorruptObject as exc:  # one broken file must not lock every tenant out
                    log.error("skipping tenant '%s' for authentication: %s", tenant, exc)
                    return None

        index: dict[str, tuple[str, str]] = {}
        settings: dict[str, TenantSettings] = {}
        for record in await asyncio.gather(*(load(t) for t in await self.list())):
            if record is not None:
                for k in record["keys"]:
                    index[k["sha256"]] = (record["name"], k["id"])
                settings[record["name"]] = TenantSettings.from_record(record)
        return index, settings
