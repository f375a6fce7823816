"""Adapter manifests: the immutable JSON record of one published adapter version.

A manifest lists every file of the adapter by content hash, so the bytes can be fetched from the
content-addressed blob area and verified end to end. Parsing is strict (unknown or missing fields
are errors) because a manifest that half-parses would load the wrong weights silently.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

from .errors import InvalidName, ManifestError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Adapter files keep their original names (adapter_config.json, adapter_model.safetensors...).
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def validate_name(name: object, what: str = "name") -> str:
    """Tenant and adapter names: lowercase, URL- and path-safe, at most 64 characters."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return name


def validate_file_name(name: object) -> str:
    if not isinstance(name, str) or not FILE_NAME_RE.match(name) or name in (".", ".."):
        raise InvalidName(f"invalid adapter file name {name!r}: use a plain file name (letters, digits, '.', '_', '-'), no directories")
    return name


def sha256_hex(data: builtins.bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    """Hash of the file list: sha256 over sorted "filename:filehash\\n" lines; identifies the content."""
    lines = "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files))
    return sha256_hex(lines.encode())


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AdapterManifest:
    """One adapter version. `sha256` identifies the file contents, not the metadata."""

    tenant: str
    name: str
    version: int
    base_model: str
    ranks: dict[str, int]
    target_modules: list[str]
    bytes: int
    sha256: str
    files: dict[str, dict[str, Any]]
    created_at: str
    family: str = "lora"
    description: str = ""
    public: bool = False
    provenance: dict[str, Any] | None = None

    @property
    def ref(self) -> str:
        """Human-readable reference, e.g. for logs: tenant/name@v3."""
        return f"{self.tenant}/{self.name}@v{self.version}"

    @classmethod
    def build(
        cls,
        *,
        tenant: str,
        name: str,
        version: int,
        files: dict[str, builtins.bytes],
        family: str,
        base_model: str,
        ranks: dict[str, int],
        target_modules: list[str],
        description: str = "",
        public: bool = False,
        provenance: dict[str, Any] | None = None,
    ) -> "AdapterManifest":
        """Manifest for file contents about to be published (hashes and sizes computed here)."""
        entries: dict[str, dict[str, Any]] = {f: {"sha256": sha256_hex(data), "bytes": len(data)} for f, data in files.items()}
        manifest = cls(
            tenant=tenant,
            name=name,
            version=version,
            family=family,
            base_model=base_model,
            ranks=dict(ranks),
            target_modules=list(target_modules),
            bytes=sum(e["bytes"] for e in entries.values()),
            sha256=files_digest(entries),
            files=entries,
            created_at=utc_now_iso(),
            description=description,
            public=public,
            provenance=dict(provenance) if provenance is not None else None,
        )
        manifest.validate()
        return manifest

    def with_version(self, version: int) -> "AdapterManifest":
        """Same content under another version number (publish retries after losing a race)."""
        return AdapterManifest(**{**self._as_dict(), "version": version, "created_at": utc_now_iso()})

    def _as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self._as_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str | builtins.bytes) -> "AdapterManifest":
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted(known - set(raw))
        if unknown or missing:
            raise ManifestError(f"manifest fields do not match the schema: unknown {unknown}, missing {missing}")
        manifest = cls(**raw)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Type and consistency checks; raises ManifestError (InvalidName for bad names)."""
        validate_name(self.tenant, "tenant name")
        validate_name(self.name, "adapter name")
        _check(isinstance(self.version, int) and not isinstance(self.version, bool) and 1 <= self.version <= 999_999, "version must be an integer in 1..999999")
        for attr in ("family", "base_model", "description", "created_at"):
            _check(isinstance(getattr(self, attr), str), f"{attr} must be a string")
        _check(bool(self.family), "family must not be empty")
        try:
            datetime.fromisoformat(self.created_at)
        except ValueError:
            raise ManifestError(f"created_at {self.created_at!r} is not an ISO 8601 timestamp") from None
        _check(isinstance(self.public, bool), "public must be true or false")
        _check(self.provenance is None or isinstance(self.provenance, dict), "provenance must be an object or null")
        _check(
            isinstance(self.ranks, dict)
            and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in self.ranks.items()),
            "ranks must map module names to positive integers",
        )
        _check(isinstance(self.target_modules, list) and all(isinstance(m, str) for m in self.target_modules), "target_modules must be a list of strings")
        _check(isinstance(self.files, dict) and bool(self.files), "files must be a non-empty object")
        for fname, entry in self.files.items():
            validate_file_name(fname)
            _check(
                isinstance(entry, dict)
                and set(entry) == {"sha256", "bytes"}
                and isinstance(entry["sha256"], str)
                and bool(SHA256_RE.match(entry["sha256"]))
                and isinstance(entry["bytes"], int)
                and entry["bytes"] >= 0,
                f"file entry {fname!r} must be {{'sha256': <64 hex>, 'bytes': <int>}}",
            )
        _check(self.bytes == sum(e["bytes"] for e in self.files.values()), "bytes does not equal the sum of the file sizes")
        _check(self.sha256 == files_digest(self.files), "sha256 does not match the file list")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ManifestError(f"invalid manifest: {message}")
