"""Resolves the `model` of a request to an adapter the caller may use, and brings its weights to host RAM.

Tiers: object store -> local disk cache (content-addressed) -> host RAM (HostCache) -> device row
pools (the engine's AdapterManager). A cold adapter is fetched here, on the event loop, while the
engine keeps decoding other requests; the sequence enters the engine only once its weights are in RAM.
Manifests are cached briefly; while the store is unreachable, cached manifests and weights keep serving.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store import AdapterManifest, AdapterNotFound, CorruptObject, DiskCache, Registry, StoreUnavailable
from server.adapters.host_cache import HostCache
from server.adapters.stacking import Member, StackIndex, stacked_for_request
from server import errors
from server.auth import Principal
from server.families.base import AdapterWeights
from server.families.registry import family_named

log = logging.getLogger(__name__)

MAX_CACHED_USERS = 65_536  # per-user states kept in memory (a `user` field is free text)
# Adapters loaded through vLLM's /v1/load_lora_adapter (server.api.openai.lora_adapters) are public
# adapters of this tenant; a bare name that is not one of the caller's own resolves here, as in vLLM.
RUNTIME_TENANT = "runtime"

@dataclass(frozen=True, slots=True)
class ResolvedModel:
    key: str | None  # None = base model; else the engine's adapter key
    manifest: AdapterManifest | None = None  # None for the base model and static (--adapter) adapters


def device_key(m: AdapterManifest) -> str:
    return f"{m.tenant}/{m.name}@v{m.version}"


def keys_prefix(tenant: str, name: str) -> str:
    """What every engine and host key of tenant/name starts with: each version's device_key and, for a
    per-user family, each user-state copy (`...@vN#state=...`). Names cannot hold "@"."""
    return f"{tenant}/{name}@"


def _unavailable(what: str, e: Exception) -> errors.StoreUnavailable:
    """Tenants learn that the store is down, never where it is: the details go to the log."""
    log.warning("%s: %s", what, e)
    return errors.StoreUnavailable(f"{what}: retry later")


class AdapterService:
    def __init__(
        self,
        registry: Registry,
        disk_cache: DiskCache,
        host_cache: HostCache,
        parse: Callable[[dict[str, bytes], str, str | None], Any],
        dtype: torch.dtype,
        base_model: str,
        metrics=None,
        manifest_ttl_s: float = 2.0,
    ):
        self.registry, self.disk, self.host = registry, disk_cache, host_cache
        # parse(files, name, family) -> weights: the engine's, which knows the model (LLMEngine.parse_adapter)
        self.parse, self.dtype = parse, dtype
        self.base_model = base_model
        self.metrics = metrics
        self.manifest_ttl_s = manifest_ttl_s
        self._manifests: dict[tuple[str, str], tuple[float, AdapterManifest]] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        # (tenant, adapter, user) -> (fetched at, state); least recently used first, at most MAX_CACHED_USERS
        self._user_states: OrderedDict[tuple[str, str, str], tuple[float, dict | None]] = OrderedDict()
        self.stacks = StackIndex()  # multi-adapter requests: which stacked keys hold which adapter

    # -- names -----------------------------------------------------------------------------
    async def manifest(self, tenant: str, name: str, *, fresh: bool = False) -> AdapterManifest:
        """The latest version's manifest; a cached one while it is fresh, or while the store is down."""
        cached = self._manifests.get((tenant, name))
        if cached and not fresh and time.monotonic() - cached[0] < self.manifest_ttl_s:
            return cached[1]
        try:
            m = await self.registry.get(tenant, name)
        except AdapterNotFound:
            self._manifests.pop((tenant, name), None)
            raise
        except StoreUnavailable:
            if cached:
                return cached[1]
            raise
        self._manifests[(tenant, name)] = (time.monotonic(), m)
        return m

    def forget(self, tenant: str, name: str) -> None:
        self._manifests.pop((tenant, name), None)

    async def resolve(self, principal: Principal, model: str) -> AdapterManifest:
        """`tenant/name`, or a bare `name`: the caller's own tenant's, else a runtime-loaded adapter's (RUNTIME_TENANT).
        404 alike for missing and not allowed."""
        not_found = errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")
        tenant, sep, name = model.partition("/")
        if not sep:  # the caller's own adapter, else one loaded at run time (RUNTIME_TENANT)
            tenant, name = principal.tenant or RUNTIME_TENANT, model
        try:
            try:
                m = await self.manifest(tenant, name)
            except AdapterNotFound:
                if sep or tenant == RUNTIME_TENANT:
                    raise
                m = await self.manifest(RUNTIME_TENANT, name)
        except AdapterNotFound:
            raise not_found from None
        except StoreUnavailable as e:
            raise _unavailable(f"adapter `{model}` is not cached and the adapter store is unreachable", e) from None
        except ValueError:  # an invalid name can name nothing
            raise not_found from None
        if not principal.may_use(m.tenant, m.public):
            raise not_found
        if m.base_model != self.base_model:
            raise errors.InvalidRequest(f"adapter `{model}` was made for base model {m.base_model}, this server serves {self.base_model}", param="model")
        return m

    # -- weights ---------------------------------------------------------------------------
    async def for_request(self, m: AdapterManifest, user: str | None) -> tuple[str, AdapterWeights, str]:
        """(engine key, host weights, content identity) for a request: RecLoRA adapters are materialised
        per user. The identity names what the weights compute — the version's file contents and, per
        user, the state — so that KV blocks are shared only between requests that would compute the
        same keys and values (server.engine.prefix_cache); names and version numbers can be reused."""
        weights = await self.weights(m)
        if not family_named(m.family).per_user:
            return device_key(m), weights, m.sha256
        state = await self.user_state(m, user) if user else None
        # Keyed by the state, not the user: users with the same state (every unknown user: uniform
        # weights) share one copy, so inventing user names cannot flood the caches and evict others.
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
        key = f"{device_key(m)}#state={digest}"
        cached = self.host.get(key)
        if cached is None:
            try:
                cached = await asyncio.to_thread(weights.personalize, key, state, self.dtype)
            except errors.InvalidAdapter as e:  # the user's state does not fit this adapter (length, overflow)
                raise errors.InvalidRequest(e.message, param="user") from None
            self.host.put(key, cached)
        return key, cached, f"{m.sha256}#state={digest}"

    async def for_stack(self, members: list[Member], user: str | None, max_rank: int) -> tuple[str, AdapterWeights, str]:
        """(engine key, host weights, content identity) of several adapters merged into one rank-stacked LoRA
        for a request (server.adapters.stacking)."""
        return await stacked_for_request(self, members, user, max_rank)

    async def user_state(self, m: AdapterManifest, user: str) -> dict | None:
        """A user's stored state, cached like manifests (and served stale while the store is down)."""
        cache_key = (m.tenant, m.name, user)
        cached = self._user_states.get(cache_key)
        if cached:
            self._user_states.move_to_end(cache_key)
        if cached and time.monotonic() - cached[0] < self.manifest_ttl_s:
            return cached[1]
        try:
            record = await self.registry.get_user_state(m.tenant, m.name, user)
        except StoreUnavailable as e:
            if cached:
                return cached[1]
            raise _unavailable("the user's state is not cached and the adapter store is unreachable", e) from None
        state = None if record is None else {k: record[k] for k in ("weights", "vector") if k in record}
        self._user_states[cache_key] = (time.monotonic(), state)
        if len(self._user_states) > MAX_CACHED_USERS:
            self._user_states.popitem(last=False)
        return state

    async def check_user_state(self, m: AdapterManifest, state: dict) -> None:
        """A user's state must fit the adapter (a per-user family; the right length, a gate for vectors)."""
        if not family_named(m.family).per_user:
            raise errors.InvalidRequest(f"{m.tenant}/{m.name} is a {m.family} adapter: only adapters made per user have per-user state")
        bank = await self.weights(m)
        try:
            bank.user_weights(state)
        except errors.InvalidAdapter as e:
            raise errors.InvalidRequest(e.message) from None

    def forget_user(self, tenant: str, name: str, user: str) -> None:
        self._user_states.pop((tenant, name, user), None)

    async def weights(self, m: AdapterManifest):
        key = device_key(m)
        cached = self.host.get(key)
        if cached is not None:
            self._count("host", hit=True)
            return cached
        self._count("host", hit=False)
        future = self._inflight.get(key)
        if future is None:  # one fetch per adapter however many requests wait for it
            future = self._inflight[key] = asyncio.ensure_future(self._load(m, key))
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            return await asyncio.shield(future)
        except StoreUnavailable as e:
            raise _unavailable(f"adapter `{m.tenant}/{m.name}` is not cached and the adapter store is unreachable", e) from None
        except CorruptObject as e:
            log.error("adapter %s/%s: %s", m.tenant, m.name, e)
            raise errors.AdapterUnavailable(f"adapter `{m.tenant}/{m.name}` failed its integrity check in the store: retry later") from None
        except errors.InvalidAdapter as e:
            raise errors.InvalidAdapter(e.message, param="model") from None

    async def _load(self, m: AdapterManifest, key: str):
        t0 = time.perf_counter()
        on_disk = all(f["sha256"] in self.disk for f in m.files.values())
        self._count("disk", hit=on_disk)
        files = await self.registry.fetch_files(m, cache=self.disk)
        weights = await asyncio.to_thread(self.parse, files, key, m.family)
        self.host.put(key, weights)
        if self.metrics is not None:
            self.metrics.adapter_load_seconds.labels("disk" if on_disk else "store").observe(time.perf_counter() - t0)
        log.info("loaded adapter %s from %s in %.0f ms", key, "disk cache" if on_disk else "the store", 1000 * (time.perf_counter() - t0))
        return weights

    def _count(self, tier: str, hit: bool) -> None:
        if self.metrics is not None:
            (self.metrics.adapter_hits if hit else self.metrics.adapter_misses).labels(tier).inc()


def build_adapter_service(engine, store_url: str, s3_endpoint: str | None, cache_dir, disk_bytes: int, host_bytes: int, metrics=None) -> AdapterService:
    """The registry on `store_url` with its disk and host caches, for the engine's base model."""
    from pathlib import Path

    from adapters_store import open_store
    from server.models.embedded import hotswap_home

    registry = Registry(open_store(store_url, s3_endpoint=s3_endpoint))
    disk = DiskCache(Path(cache_dir) if cache_dir else hotswap_home() / "adapter-cache", disk_bytes)
    return AdapterService(registry, disk, HostCache(host_bytes), engine.parse_adapter, engine.model.dtype, engine.base_fingerprint, metrics)
