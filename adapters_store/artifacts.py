"""Artifacts: versioned files that are not adapters (e.g. fitted adapter generators), stored like adapters.

Store layout, beside the adapters (bytes and JSON only: never torch):

    artifacts/<kind>/<tenant>/<name>/v<version:06d>.json   one immutable manifest per version
    blobs/sha256/<hex>                                     the files, content-addressed (shared with adapters)

`kind` names what the artifact is for ("generators"); `format` says how its files are laid out
("sglora-cvae/1"), for whoever reads them; `metadata` is free JSON about it (at most 256 KiB).
Publishing writes the blobs first and the manifest last, create-if-absent, exactly as adapters are
published, so a manifest is only visible once its bytes are stored and two publishes cannot claim the
same version; fetching verifies every file's sha256 and size; `collect_garbage` keeps the blobs that
artifacts reference.
"""
from __future__ import annotations

import builtins
import json
import logging
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .errors import ArtifactExists, ArtifactNotFound, CorruptObject, ManifestError, ObjectNotFound
from .manifest import SHA256_RE, files_digest, sha256_hex, utc_now_iso, validate_file_name, validate_name

if TYPE_CHECKING:
    from .disk_cache import DiskCache
    from .registry import Registry

log = logging.getLogger("hotswap.adapters_store")

ARTIFACTS_DIR = "artifacts"
MAX_VERSION = 999_999
MAX_METADATA_BYTES = 256 * 1024
_FORMAT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,63}$")
_KEY = re.compile(r"^artifacts/([a-z0-9][a-z0-9._-]{0,63})/([a-z0-9][a-z0-9._-]{0,63})/([a-z0-9][a-z0-9._-]{0,63})/v(\d{6})\.json$")
_PUBLISH_ATTEMPTS = 20


def artifact_key(kind: str, tenant: str, name: str, version: int) -> str:
    return f"{ARTIFACTS_DIR}/{kind}/{tenant}/{name}/v{version:06d}.json"


def parse_artifact_key(key: str) -> tuple[str, str, str, int] | None:
    m = _KEY.match(key)
    return (m.group(1), m.group(2), m.group(3), int(m.group(4))) if m else None


@dataclass(frozen=True)
class ArtifactManifest:
    """One artifact version. `sha256` identifies the file contents (as for adapters), not the metadata."""

    kind: str
    tenant: str
    name: str
    version: int
    format: str
    bytes: int
    sha256: str
    files: dict[str, dict[str, Any]]
    created_at: str
    metadata: dict[str, Any]

    @property
    def ref(self) -> str:
        """For messages and logs: generators:acme/cvae@v2."""
        return f"{self.kind}:{self.tenant}/{self.name}@v{self.version}"

    @classmethod
    def build(cls, *, kind: str, tenant: str, name: str, version: int, files: dict[str, builtins.bytes], format: str,
              metadata: dict[str, Any] | None = None) -> "ArtifactManifest":  # fmt: skip
        entries = {f: {"sha256": sha256_hex(data), "bytes": len(data)} for f, data in files.items()}
        manifest = cls(
            kind=kind, tenant=tenant, name=name, version=version, format=format,
            bytes=sum(e["bytes"] for e in entries.values()), sha256=files_digest(entries), files=entries,
            created_at=utc_now_iso(), metadata=dict(metadata or {}),
        )  # fmt: skip
        manifest.validate()
        return manifest

    def with_version(self, version: int) -> "ArtifactManifest":
        return ArtifactManifest(**{**asdict(self), "version": version, "created_at": utc_now_iso()})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str | builtins.bytes) -> "ArtifactManifest":
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError(f"artifact manifest is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ManifestError("artifact manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted(known - set(raw))
        if unknown or missing:
            raise ManifestError(f"artifact manifest fields do not match the schema: unknown {unknown}, missing {missing}")
        manifest = cls(**raw)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        validate_name(self.kind, "artifact kind")
        validate_name(self.tenant, "tenant name")
        validate_name(self.name, "artifact name")
        _check(isinstance(self.version, int) and not isinstance(self.version, bool) and 1 <= self.version <= MAX_VERSION, "version must be an integer in 1..999999")
        _check(isinstance(self.format, str) and bool(_FORMAT_RE.match(self.format)), "format must be 1-64 characters of letters, digits, '._/+-'")
        _check(isinstance(self.created_at, str), "created_at must be a string")
        try:
            datetime.fromisoformat(self.created_at)
        except ValueError:
            raise ManifestError(f"created_at {self.created_at!r} is not an ISO 8601 timestamp") from None
        _check(isinstance(self.metadata, dict), "metadata must be an object")
        try:
            size = len(json.dumps(self.metadata))
        except (TypeError, ValueError, RecursionError):
            raise ManifestError("artifact metadata must be plain JSON") from None
        _check(size <= MAX_METADATA_BYTES, f"metadata is {size} bytes of JSON, above {MAX_METADATA_BYTES}")
        _check(isinstance(self.files, dict) and bool(self.files), "files must be a non-empty object")
        for fname, entry in self.files.items():
            validate_file_name(fname)
            _check(
                isinstance(entry, dict) and set(entry) == {"sha256", "bytes"} and isinstance(entry["sha256"], str)
                and bool(SHA256_RE.match(entry["sha256"])) and isinstance(entry["bytes"], int)
                and not isinstance(entry["bytes"], bool) and entry["bytes"] >= 0,
                f"file entry {fname!r} must be {{'sha256': <64 hex>, 'bytes': <int>}}",
            )  # fmt: skip
        _check(isinstance(self.bytes, int) and self.bytes == sum(e["bytes"] for e in self.files.values()), "bytes does not equal the sum of the file sizes")
        _check(self.sha256 == files_digest(self.files), "sha256 does not match the file list")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ManifestError(f"invalid artifact manifest: {message}")


class Artifacts:
    """`registry.artifacts`: publish, read, list and delete artifacts of the registry's store."""

    def __init__(self, registry: "Registry") -> None:
        self._registry = registry
        self.store = registry.store

    async def publish(
        self, kind: str, tenant: str, name: str, files: dict[str, builtins.bytes], *, format: str,
        metadata: dict[str, Any] | None = None, new_version: bool = False,
    ) -> ArtifactManifest:  # fmt: skip
        """Store `files` as artifact kind:tenant/name; with new_version=True add a version to an existing name."""
        validate_name(kind, "artifact kind")
        validate_name(tenant, "tenant name")
        validate_name(name, "artifact name")
        if not files:
            raise ManifestError("an artifact needs at least one file")
        for fname in files:
            validate_file_name(fname)
        await self._registry.tenants.require(tenant)
        existing = await self.versions(kind, tenant, name)
        if existing and not new_version:
            raise _exists(kind, tenant, name, existing[-1])
        manifest = ArtifactManifest.build(kind=kind, tenant=tenant, name=name, version=(existing[-1] + 1 if existing else 1),
                                          files=files, format=format, metadata=metadata)  # fmt: skip
        await self._registry._gather(self._registry._ensure_blob(manifest.files[f]["sha256"], data) for f, data in files.items())
        for _ in range(_PUBLISH_ATTEMPTS):
            if await self.store.put_if_absent(artifact_key(kind, tenant, name, manifest.version), manifest.to_json().encode()):
                log.info("published %s (%d files, %d bytes)", manifest.ref, len(files), manifest.bytes)
                return manifest
            if not new_version:
                raise _exists(kind, tenant, name, manifest.version)
            latest = max([manifest.version, *await self.versions(kind, tenant, name)])
            if latest + 1 > MAX_VERSION:
                raise ManifestError(f"artifact {kind}:{tenant}/{name} reached the maximum version {MAX_VERSION}")
            manifest = manifest.with_version(latest + 1)
        raise ArtifactExists(f"could not claim a new version of {kind}:{tenant}/{name}: too many concurrent publishes, retry")

    async def versions(self, kind: str, tenant: str, name: str) -> builtins.list[int]:
        validate_name(kind, "artifact kind")
        validate_name(tenant, "tenant name")
        validate_name(name, "artifact name")
        found = []
        for key in await self.store.list(f"{ARTIFACTS_DIR}/{kind}/{tenant}/{name}"):
            parsed = parse_artifact_key(key)
            if parsed and parsed[:3] == (kind, tenant, name):
                found.append(parsed[3])
        return sorted(found)

    async def get(self, kind: str, tenant: str, name: str, version: int | None = None) -> ArtifactManifest:
        """The manifest of kind:tenant/name at `version` (latest when None); ArtifactNotFound if none."""
        if version is None:
            versions = await self.versions(kind, tenant, name)
            if not versions:
                raise ArtifactNotFound(f"{_singular(kind)} {tenant}/{name} not found")
            version = versions[-1]
        else:
            validate_name(kind, "artifact kind")
            validate_name(tenant, "tenant name")
            validate_name(name, "artifact name")
            if not (isinstance(version, int) and 1 <= version <= MAX_VERSION):
                raise ArtifactNotFound(f"{_singular(kind)} {tenant}/{name} has no version {version}")
        try:
            return await self._read(artifact_key(kind, tenant, name, version))
        except ObjectNotFound:
            raise ArtifactNotFound(f"{_singular(kind)} {tenant}/{name} has no version {version}") from None

    async def list(self, kind: str, tenant: str | None = None) -> builtins.list[ArtifactManifest]:
        """The latest version of every artifact of a kind (of one tenant, or of all), sorted by tenant and name."""
        validate_name(kind, "artifact kind")
        prefix = f"{ARTIFACTS_DIR}/{kind}" + (f"/{validate_name(tenant, 'tenant name')}" if tenant is not None else "")
        latest: dict[tuple[str, str], int] = {}
        for parsed in filter(None, map(parse_artifact_key, await self.store.list(prefix))):
            _, t, n, v = parsed
            latest[(t, n)] = max(v, latest.get((t, n), 0))

        async def read(t: str, n: str, v: int) -> ArtifactManifest | None:
            try:
                return await self._read(artifact_key(kind, t, n, v))
            except ObjectNotFound:
                return None
            except CorruptObject as exc:  # one broken manifest must not hide the others
                log.error("skipping artifact %s:%s/%s in listing: %s", kind, t, n, exc)
                return None

        found = await self._registry._gather(read(t, n, v) for (t, n), v in sorted(latest.items()))
        return [m for m in found if m is not None]

    async def delete(self, kind: str, tenant: str, name: str) -> int:
        """Remove every version (oldest first); returns how many. Blobs go with `collect_garbage`."""
        versions = await self.versions(kind, tenant, name)
        if not versions:
            raise ArtifactNotFound(f"{_singular(kind)} {tenant}/{name} not found")
        for version in versions:
            await self.store.delete(artifact_key(kind, tenant, name, version))
        log.info("deleted artifact %s:%s/%s (%d versions)", kind, tenant, name, len(versions))
        return len(versions)

    async def fetch_files(self, manifest: ArtifactManifest, cache: "DiskCache | None" = None) -> dict[str, builtins.bytes]:
        """The artifact's files, each verified against its sha256 and size (CorruptObject otherwise)."""
        return await self._registry.fetch_files(manifest, cache=cache)  # same verification as adapters

    async def referenced_blobs(self) -> set[str]:
        """Every blob hash some artifact manifest references (for garbage collection). Raises if a
        manifest cannot be read, so that GC never deletes what an unreadable manifest may reference."""
        keys = [k for k in await self.store.list(ARTIFACTS_DIR) if parse_artifact_key(k)]

        async def referenced(key: str) -> builtins.list[str]:
            try:
                manifest = await self._read(key)
            except ObjectNotFound:
                return []
            return [entry["sha256"] for entry in manifest.files.values()]

        return {digest for hashes in await self._registry._gather(referenced(k) for k in keys) for digest in hashes}

    async def _read(self, key: str) -> ArtifactManifest:
        raw = await self.store.get(key)
        try:
            manifest = ArtifactManifest.from_json(raw)
        except (ManifestError, ValueError, TypeError) as exc:
            raise CorruptObject(f"artifact manifest {key} in {self.store.description} is unreadable: {exc}") from None
        if artifact_key(manifest.kind, manifest.tenant, manifest.name, manifest.version) != key:
            raise CorruptObject(f"artifact manifest {key} describes {manifest.ref}, not its own location")
        return manifest


def _singular(kind: str) -> str:
    return kind[:-1] if kind.endswith("s") else kind


def _exists(kind: str, tenant: str, name: str, version: int) -> ArtifactExists:
    return ArtifactExists(
        f"{_singular(kind)} {tenant}/{name} already exists (v{version}); publish with new_version=True to add a version, or delete it first"
    )
