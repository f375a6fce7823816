"""The adapter registry: tenants, versioned adapter manifests and content-addressed blobs.

Store layout (the store is the single source of truth; any process on the same store sees the
same registry, there is no local index):

    blobs/sha256/<hex>                              adapter file bytes, content-addressed
    adapters/<tenant>/<name>/v<version:06d>.json    one immutable manifest per version
    tenants/<tenant>.json                           tenant record with API key hashes
    artifacts/<kind>/<tenant>/<name>/v<N>.json      other versioned files, e.g. fitted generators (artifacts.py)

Publishing writes the blobs first and the manifest last with create-if-absent, so a manifest is
only visible once all its bytes are stored, and two concurrent publishes cannot both claim the
same version. Deleting an adapter removes its manifests; orphaned blobs are reclaimed by
`collect_garbage`.
"""
from __future__ import annotations

import asyncio
import builtins
import logging
import re
from collections.abc import Awaitable, Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from .artifacts import ArtifactManifest, Artifacts
from .errors import AdapterExists, AdapterNotFound, CorruptObject, ManifestError, ObjectNotFound
from .user_state import get_user_state, put_user_state
from .manifest import SHA256_RE, AdapterManifest, sha256_hex, validate_file_name, validate_name
from .stores import ObjectStore
from .tenants import TenantDirectory, TenantSettings

if TYPE_CHECKING:
    from .disk_cache import DiskCache

log = logging.getLogger("hotswap.adapters_store")

ADAPTERS_DIR = "adapters"
BLOBS_DIR = "blobs/sha256"
MAX_VERSION = 999_999
_MANIFEST_KEY = re.compile(r"^adapters/([a-z0-9][a-z0-9._-]{0,63})/([a-z0-9][a-z0-9._-]{0,63})/v(\d{6})\.json$")
_PUBLISH_ATTEMPTS = 20
T = TypeVar("T")


def manifest_key(tenant: str, name: str, version: int) -> str:
    return f"{ADAPTERS_DIR}/{tenant}/{name}/v{version:06d}.json"


def blob_key(sha256: str) -> str:
    return f"{BLOBS_DIR}/{sha256}"


def parse_manifest_key(key: str) -> tuple[str, str, int] | None:
    m = _MANIFEST_KEY.match(key)
    return (m.group(1), m.group(2), int(m.group(3))) if m else None


class Registry:
    """Async adapter registry over an `ObjectStore`.

    gc_grace_s: blobs younger than this are never garbage-collected. Publishing re-uploads an
    existing (deduplicated) blob once it is older than half of it, so GC stays safe alongside
    publishes that take less than gc_grace_s / 2.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        key_cache_ttl_s: float = 2.0,
        gc_grace_s: float = 3600.0,
        max_concurrency: int = 16,
    ) -> None:
        self.store = store
        self.tenants = TenantDirectory(store, key_cache_ttl_s=key_cache_ttl_s)
        self.gc_grace_s = gc_grace_s
        self._max_concurrency = max_concurrency
        self.artifacts = Artifacts(self)  # versioned non-adapter files (fitted generators), same blobs

    # -- tenants (delegated) -----------------------------------------------------------------
    async def create_tenant(self, name: str) -> dict[str, Any]:
        return await self.tenants.create(name)

    async def get_tenant(self, name: str) -> dict[str, Any]:
        return await self.tenants.get(name)

    async def list_tenants(self) -> list[str]:
        return await self.tenants.list()

    async def create_key(self, tenant: str) -> tuple[str, str]:
        return await self.tenants.create_key(tenant)

    async def delete_key(self, tenant: str, key_id: str) -> None:
        await self.tenants.delete_key(tenant, key_id)

    async def tenant_for_key(self, key: str) -> str | None:
        return await self.tenants.tenant_for_key(key)

    async def update_tenant_settings(self, tenant: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.tenants.update_settings(tenant, changes)

    async def tenant_settings(self, tenant: str) -> TenantSettings:
        """Cached (server.api.quotas reads it on every request): see TenantDirectory.settings."""
        return await self.tenants.settings(tenant)

    # -- adapters ----------------------------------------------------------------------------
    async def publish(
        self,
        tenant: str,
        name: str,
        files: dict[str, bytes],
        *,
        family: str = "lora",
        base_model: str,
        ranks: dict[str, int],
        target_modules: list[str],
        description: str = "",
        public: bool = False,
        provenance: dict[str, Any] | None = None,
        new_version: bool = False,
    ) -> AdapterManifest:
        """Store `files` as adapter tenant/name; with new_version=True add a version to an existing name."""
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        if not files:
            raise ManifestError("an adapter needs at least one file")
        for fname in files:
            validate_file_name(fname)
        await self.tenants.require(tenant)
        existing = await self.versions(tenant, name)
        if existing and not new_version:
            raise self._exists_error(tenant, name, existing[-1])
        manifest = AdapterManifest.build(
            tenant=tenant, name=name, version=(existing[-1] + 1 if existing else 1), files=files,
            family=family, base_model=base_model, ranks=ranks, target_modules=target_modules,
            description=description, public=public, provenance=provenance,
        )  # fmt: skip
        await self._gather(self._ensure_blob(manifest.files[f]["sha256"], data) for f, data in files.items())
        for _ in range(_PUBLISH_ATTEMPTS):
            key = manifest_key(tenant, name, manifest.version)
            if await self.store.put_if_absent(key, manifest.to_json().encode()):
                log.info("published %s (%d files, %d bytes)", manifest.ref, len(files), manifest.bytes)
                return manifest
            if not new_version:  # someone published the same name concurrently
                raise self._exists_error(tenant, name, manifest.version)
            latest = max([manifest.version, *await self.versions(tenant, name)])
            if latest + 1 > MAX_VERSION:
                raise ManifestError(f"adapter {tenant}/{name} reached the maximum version {MAX_VERSION}")
            manifest = manifest.with_version(latest + 1)
        raise AdapterExists(f"could not claim a new version of {tenant}/{name}: too many concurrent publishes, retry")

    async def versions(self, tenant: str, name: str) -> builtins.list[int]:
        """All stored version numbers of tenant/name, ascending (empty if none)."""
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
        found = []
        for key in await self.store.list(f"{ADAPTERS_DIR}/{tenant}/{name}"):
            parsed = parse_manifest_key(key)
            if parsed and parsed[:2] == (tenant, name):
                found.append(parsed[2])
        return sorted(found)

    async def get(self, tenant: str, name: str, version: int | None = None) -> AdapterManifest:
        """Manifest of tenant/name at `version` (latest when None)."""
        if version is None:
            versions = await self.versions(tenant, name)
            if not versions:
                raise AdapterNotFound(f"adapter {tenant}/{name} not found")
            version = versions[-1]
        else:
            validate_name(tenant, "tenant name")
            validate_name(name, "adapter name")
        try:
            return await self._read_manifest(manifest_key(tenant, name, version))
        except ObjectNotFound:
            raise AdapterNotFound(f"adapter {tenant}/{name} has no version {version}") from None

    async def list(self, tenant: str | None = None) -> list[AdapterManifest]:
        """Latest version of every adapter (of one tenant, or of all), sorted by tenant and name."""
        prefix = f"{ADAPTERS_DIR}/{validate_name(tenant, 'tenant name')}" if tenant is not None else ADAPTERS_DIR
        latest: dict[tuple[str, str], int] = {}
        for parsed in filter(None, map(parse_manifest_key, await self.store.list(prefix))):
            t, n, v = parsed
            latest[(t, n)] = max(v, latest.get((t, n), 0))

        async def read(t: str, n: str, v: int) -> AdapterManifest | None:
            try:
                return await self._read_manifest(manifest_key(t, n, v))
            except ObjectNotFound:  # deleted while we were listing
                return None
            except CorruptObject as exc:  # one broken manifest must not hide all the others
                log.error("skipping adapter %s/%s in listing: %s", t, n, exc)
                return None

        found = await self._gather(read(t, n, v) for (t, n), v in sorted(latest.items()))
        return [m for m in found if m is not None]

    async def delete_adapter(self, tenant: str, name: str) -> int:
        """Remove every version of tenant/name; returns how many versions were removed.

        Oldest first, so `get(latest)` keeps answering with the same version until the end.
        """
        versions = await self.versions(tenant, name)
        if not versions:
            raise AdapterNotFound(f"adapter {tenant}/{name} not found")
        for version in versions:
            await self.store.delete(manifest_key(tenant, name, version))
        log.info("deleted adapter %s/%s (%d versions)", tenant, name, len(versions))
        return len(versions)

    async def fetch_files(self, manifest: AdapterManifest | ArtifactManifest, cache: DiskCache | None = None) -> dict[str, bytes]:
        """The adapter's (or artifact's) files, each verified against the manifest's sha256 (CorruptObject otherwise).

        With a `cache`, verified files are served from / saved to that local disk cache.
        """

        async def fetch(fname: str, entry: dict[str, Any]) -> bytes:
            digest, size = entry["sha256"], entry["bytes"]
            if cache is not None:
                cached = await asyncio.to_thread(cache.get, digest)
                if cached is not None and len(cached) == size:
                    return cached
            try:
                data = await self.store.get(blob_key(digest))
            except ObjectNotFound:
                raise CorruptObject(
                    f"{manifest.ref}: file '{fname}' (blob {digest}) is missing from {self.store.description}; "
                    "re-publish it"
                ) from None
            actual = await asyncio.to_thread(sha256_hex, data)
            if actual != digest or len(data) != size:
                raise CorruptObject(
                    f"{manifest.ref}: file '{fname}' is corrupt in {self.store.description} (expected sha256 {digest}, "
                    f"{size} bytes; got {actual}, {len(data)} bytes); re-publish it"
                )
            if cache is not None:
                await asyncio.to_thread(cache.put, digest, data)
            return data

        names = list(manifest.files)
        contents = await self._gather(fetch(f, manifest.files[f]) for f in names)
        return dict(zip(names, contents))

    async def put_user_state(self, tenant: str, name: str, user: str, state: dict[str, Any]) -> dict[str, Any]:
        """Per-user state of a personalised adapter (see user_state.py)."""
        await self.get(tenant, name)  # the adapter must exist
        return await put_user_state(self.store, tenant, name, user, state)

    async def get_user_state(self, tenant: str, name: str, user: str) -> dict[str, Any] | None:
        return await get_user_state(self.store, tenant, name, user)

    async def collect_garbage(self, min_age_s: float | None = None) -> builtins.list[str]:
        """Delete blobs no manifest references and older than `min_age_s` (default gc_grace_s).

        Returns the deleted blob hashes. Safe next to running publishes only with the default grace
        (see the class docstring); a smaller `min_age_s` is for when no publish is in flight.
        Aborts without deleting anything if a manifest cannot be read.
        """
        min_age_s = self.gc_grace_s if min_age_s is None else min_age_s
        keys = [k for k in await self.store.list(ADAPTERS_DIR) if parse_manifest_key(k)]

        async def referenced(key: str) -> Iterable[str]:
            try:
                manifest = await self._read_manifest(key)
            except ObjectNotFound:
                return ()
            return (entry["sha256"] for entry in manifest.files.values())

        live = {digest for hashes in await self._gather(referenced(k) for k in keys) for digest in hashes}
        live |= await self.artifacts.referenced_blobs()
        now = datetime.now(timezone.utc)
        doomed = []
        for info in await self.store.list_info(BLOBS_DIR):
            digest = info.key.rsplit("/", 1)[-1]
            # Only well-formed blob names: never touch a backend's temp files or foreign objects.
            if SHA256_RE.match(digest) and digest not in live and (now - info.last_modified).total_seconds() >= min_age_s:
                doomed.append(digest)
        await self._gather(self.store.delete(blob_key(d)) for d in doomed)
        if doomed:
            log.info("garbage collection deleted %d unreferenced blobs", len(doomed))
        return sorted(doomed)

    # -- internals ---------------------------------------------------------------------------
    async def _read_manifest(self, key: str) -> AdapterManifest:
        raw = await self.store.get(key)
        try:
            manifest = AdapterManifest.from_json(raw)
        except (ManifestError, ValueError) as exc:
            raise CorruptObject(f"manifest {key} in {self.store.description} is unreadable: {exc}") from None
        if manifest_key(manifest.tenant, manifest.name, manifest.version) != key:
            raise CorruptObject(f"manifest {key} describes {manifest.ref}, not its own location")
        return manifest

    async def _ensure_blob(self, digest: str, data: bytes) -> None:
        """Upload a blob unless an intact, recent copy exists (refreshing old ones keeps GC safe)."""
        key = blob_key(digest)
        try:
            info = await self.store.head(key)
        except ObjectNotFound:
            info = None
        if info is not None and info.size == len(data):
            age = (datetime.now(timezone.utc) - info.last_modified).total_seconds()
            if age < self.gc_grace_s / 2:
                return
        await self.store.put(key, data)

    async def _gather(self, coros: Iterable[Awaitable[T]]) -> builtins.list[T]:
        """asyncio.gather with a concurrency limit (a store may have thousands of objects)."""
        limit = asyncio.Semaphore(self._max_concurrency)

        async def bounded(coro: Awaitable[T]) -> T:
            async with limit:
                return await coro

        return builtins.list(await asyncio.gather(*(bounded(c) for c in coros)))

    @staticmethod
    def _exists_error(tenant: str, name: str, version: int) -> AdapterExists:
        return AdapterExists(
            f"adapter {tenant}/{name} already exists (v{version}); publish with new_version=True to add a version, "
            "or delete it first"
        )
