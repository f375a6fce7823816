"""Local content-addressed disk cache for adapter files, between the object store and host RAM.

Entries are named by their sha256, so they never go stale, and are verified on every read: a file
damaged on disk (crash, bit rot, manual edit) is dropped and refetched instead of loaded. Writes
are temp file + rename, so readers (also other processes sharing the directory) never see a
partial file. Eviction is least-recently-used; "used" is the file's mtime, which `get` bumps,
because atime is unreliable on relatime/noatime mounts.

Synchronous on purpose (plain file I/O); async callers wrap calls in `asyncio.to_thread`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("hotswap.adapters_store")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"


class DiskCache:
    def __init__(self, root: str | Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, least recently used first
        self.bytes_used = 0
        self._scan()

    def _path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def _scan(self) -> None:
        """Index what an earlier run left, oldest use first; remove temp files of interrupted writes."""
        found: list[tuple[float, str, int]] = []
        for path in self.root.glob("*/*"):
            try:
                if path.name.startswith(_TMP_PREFIX):
                    path.unlink()
                elif _SHA256.match(path.name) and path.parent.name == path.name[:2]:
                    st = path.stat()
                    found.append((st.st_mtime, path.name, st.st_size))
            except OSError:
                continue
        for _, digest, size in sorted(found):
            self._entries[digest] = size
            self.bytes_used += size
        self._evict()

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._entries

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes, or None when absent or corrupt (a corrupt entry is deleted)."""
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            self._forget(sha256)
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("disk cache entry %s is corrupt; dropping it", path)
            self._remove(sha256)
            return None
        try:
            os.utime(path)  # mark as recently used for LRU, across restarts too
        except OSError:
            pass
        with self._lock:
            if sha256 not in self._entries:  # written by another process sharing the directory
                self._entries[sha256] = len(data)
                self.bytes_used += len(data)
            self._entries.move_to_end(sha256)
        return data

    def put(self, sha256: str, data: bytes) -> bool:
        """Cache `data` under its sha256; False if it is larger than the whole cache."""
        path = self._path(sha256)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"refusing to cache bytes under {sha256}: their sha256 differs")
        if len(data) > self.max_bytes:
            return False
        with self._lock:
            if sha256 in self._entries and path.exists():
                self._entries.move_to_end(sha256)
                return True
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{_TMP_PREFIX}{sha256[:16]}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not write disk cache entry %s: %s", path, exc)
            return False
        with self._lock:
            if sha256 not in self._entries:
                self.bytes_used += len(data)
            self._entries[sha256] = len(data)
            self._entries.move_to_end(sha256)
            self._evict()
        return True

    def _evict(self) -> None:
        """Delete least recently used entries until within max_bytes (caller holds the lock or is __init__)."""
        while self.bytes_used > self.max_bytes and self._entries:
            digest, size = self._entries.popitem(last=False)
            self.bytes_used -= size
            try:
                self._path(digest).unlink()
            except FileNotFoundError:
                pass

    def _forget(self, sha256: str) -> None:
        with self._lock:
            size = self._entries.pop(sha256, None)
            if size is not None:
                self.bytes_used -= size

    def _remove(self, sha256: str) -> None:
        self._forget(sha256)
        try:
            self._path(sha256).unlink()
        except FileNotFoundError:
            pass
