"""Adapter uploads: the two PEFT files, or one archive (.tar.gz / .zip) of a PEFT directory, within a size limit."""
from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile

from server.api.errors import APIError, too_large
from server.engine.client import ADAPTER_FILES

WANTED = ADAPTER_FILES
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# An adapter directory holds a handful of files; the cap bounds the work and memory of listing one
# (a 2 MB tar.gz can hold 300,000 empty entries).
MAX_ARCHIVE_ENTRIES = 256


def _too_many_entries() -> APIError:
    return APIError(400, f"the archive holds more than {MAX_ARCHIVE_ENTRIES} entries: upload one adapter directory", param="archive",
                    code="unsafe_archive")  # fmt: skip


def _zip_is_small(data: bytes) -> bool:
    """zipfile reads the whole central directory on opening, so its declared size and entry count are
    checked first, from the end-of-central-directory record (a zip64 archive declares 0xFFFF entries)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))  # the record is 22 bytes + a comment
    if end < 0 or len(data) < end + 22:
        raise zipfile.BadZipFile("no end of central directory record")
    entries = int.from_bytes(data[end + 10 : end + 12], "little")
    directory_bytes = int.from_bytes(data[end + 12 : end + 16], "little")
    return entries <= MAX_ARCHIVE_ENTRIES and directory_bytes <= MAX_ARCHIVE_ENTRIES * 1024


def _safe_member(name: str) -> str:
    """The entry's path inside the archive, refusing any that would land outside the adapter directory."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or ":" in norm.split("/")[0]:
        raise APIError(400, f"archive entry {name!r} escapes the adapter directory", param="archive", code="unsafe_archive")
    return norm


def _pick(entries: dict[str, bytes]) -> dict[str, bytes]:
    """The PEFT files, at the archive root or inside one top-level directory."""
    by_base: dict[str, list[str]] = {}
    for path in entries:
        by_base.setdefault(posixpath.basename(path), []).append(path)
    out = {}
    for wanted in WANTED:
        paths = by_base.get(wanted, [])
        if len(paths) > 1:
            raise APIError(400, f"the archive holds {len(paths)} copies of {wanted}: upload one adapter per archive", param="archive")
        if paths:
            if paths[0].count("/") > 1:
                raise APIError(400, f"{wanted} must be at the archive root or in one top-level directory", param="archive")
            out[wanted] = entries[paths[0]]
    return out


def extract_archive(data: bytes, filename: str, limit: int) -> dict[str, bytes]:
    entries: dict[str, bytes] = {}
    total = 0
    try:
        if filename.endswith(".zip") or zipfile.is_zipfile(io.BytesIO(data)):
            if not _zip_is_small(data):
                raise _too_many_entries()
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    path = _safe_member(info.filename)
                    if info.is_dir():
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise APIError(400, f"archive entry {info.filename!r} is a symbolic link", param="archive", code="unsafe_archive")
                    total += info.file_size
                    if total > limit:
                        raise too_large(limit, upload=True)
                    if posixpath.basename(path) in WANTED:
                        entries[path] = zf.read(info)
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
                for count, member in enumerate(tf, 1):
                    if count > MAX_ARCHIVE_ENTRIES:
                        raise _too_many_entries()
                    path = _safe_member(member.name)
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise APIError(400, f"archive entry {member.name!r} is not a regular file", param="archive", code="unsafe_archive")
                    total += member.size
                    if total > limit:
                        raise too_large(limit, upload=True)
                    if posixpath.basename(path) in WANTED:
                        entries[path] = tf.extractfile(member).read()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise APIError(400, f"the archive is not a readable .tar.gz or .zip ({e})", param="archive") from None
    return _pick(entries)
