"""Adapter uploads: the two PEFT files, or one archive (.tar.gz / .zip) of a PEFT directory, within a size limit."""
from __future__ import annotations

import io
import posixpath
import tarfile
import zipfile

from server.api.errors import APIError, too_large
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE

WANTED = (CONFIG_FILE, WEIGHTS_FILE)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


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
                for member in tf:
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
