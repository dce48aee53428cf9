"""Atomic, non-overwriting file writes and safe output names.

Every file the pack writes goes through :func:`atomic_write_via`: the content is written
to a temporary file in the destination folder, flushed and fsynced, then renamed into
place, so a crash mid-write leaves the previous state (no partial file under the final
name).  Without ``overwrite`` an existing file is never replaced (the final step is a
hard link, which fails if the name exists).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Callable

_BAD_CHARS = re.compile(r'[\x00-\x1f<>:"|?*\\]')


class UnsafePathError(ValueError):
    pass


def sanitize_prefix(prefix: str, what: str = "filename_prefix") -> str:
    """Validate a user-given file name prefix that may contain sub-folders.

    Refuses absolute paths, ``..`` components, drive letters, control characters and
    characters that common filesystems refuse; returns a normalised relative path.
    """
    if not isinstance(prefix, str) or not prefix.strip():
        raise UnsafePathError(f"{what} is empty")
    p = prefix.strip().replace("\\", "/")
    if p.startswith("/") or re.match(r"^[A-Za-z]:", p):
        raise UnsafePathError(f"{what} {prefix!r} is an absolute path; give a name relative to the output folder")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if not parts:
        raise UnsafePathError(f"{what} {prefix!r} names no file")
    for part in parts:
        if part == "..":
            raise UnsafePathError(f"{what} {prefix!r} contains '..'; it may not leave the output folder")
        if _BAD_CHARS.search(part):
            raise UnsafePathError(f"{what} {prefix!r} contains characters a filesystem refuses")
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:  # an unpaired surrogate (JSON "\ud800") has no file-name bytes
            raise UnsafePathError(f"{what} {prefix!r} contains characters a filesystem refuses (unpaired surrogate)") from None
        if size > 200:
            raise UnsafePathError(f"{what} {prefix!r} has a path component longer than 200 bytes")
    out = "/".join(parts)
    if len(out.encode("utf-8")) > 1024:
        raise UnsafePathError(f"{what} is longer than 1024 bytes")
    return out


def is_within(path: str, folder: str) -> bool:
    """True when ``path`` resolves to a location inside ``folder``."""
    real = os.path.realpath(path)
    base = os.path.realpath(folder)
    return os.path.commonpath([real, base]) == base


_TMP_PREFIX, _TMP_SUFFIX = ".tmp-", ".part"
STALE_PARTIAL_SECONDS = 3600


def _remove_stale_partials(folder: str) -> None:
    """Delete temporary files that a killed writer left behind more than an hour ago."""
    now = time.time()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for n in names:
        if n.startswith(_TMP_PREFIX) and n.endswith(_TMP_SUFFIX):
            p = os.path.join(folder, n)
            try:
                if now - os.lstat(p).st_mtime > STALE_PARTIAL_SECONDS:
                    os.remove(p)
            except OSError:
                pass


def atomic_write_via(path: str, writer: Callable[[str], None], overwrite: bool = False) -> str:
    """Write ``path`` atomically: ``writer(tmp_path)`` fills a temporary file beside it.

    Raises FileExistsError if ``path`` exists and ``overwrite`` is False (also when a
    concurrent writer created it meanwhile).  The temporary file is removed on failure.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; it is not overwritten")
    _remove_stale_partials(folder)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError if the name appeared meanwhile
            os.remove(tmp)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = False) -> str:
    def _w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_via(path, _w, overwrite=overwrite)
