"""Adapter registry over object storage (local dir, memory, S3). Bytes and JSON only: never imports torch."""
from .artifacts import ArtifactManifest, Artifacts
from .disk_cache import DiskCache
from .errors import (
    AdapterExists,
    AdapterNotFound,
    ArtifactExists,
    ArtifactNotFound,
    CorruptObject,
    InvalidName,
    KeyNotFound,
    ManifestError,
    ObjectNotFound,
    RegistryError,
    StoreUnavailable,
    TenantExists,
    TenantNotFound,
)
from .manifest import AdapterManifest, validate_name
from .registry import Registry
from .s3 import S3Store
from .stores import LocalStore, MemoryStore, ObjectInfo, ObjectStore, open_store

__all__ = [
    "AdapterExists",
    "AdapterManifest",
    "AdapterNotFound",
    "ArtifactExists",
    "ArtifactManifest",
    "ArtifactNotFound",
    "Artifacts",
    "CorruptObject",
    "DiskCache",
    "InvalidName",
    "KeyNotFound",
    "LocalStore",
    "ManifestError",
    "MemoryStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "Registry",
    "RegistryError",
    "S3Store",
    "StoreUnavailable",
    "TenantExists",
    "TenantNotFound",
    "open_store",
    "validate_name",
]
