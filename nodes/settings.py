"""The pack's environment settings, read once, with one boolean parser.

| variable | default | meaning |
|---|---|---|
| SVDIFF_SVD_MEMORY_MB | auto | memory budget of the SVD cache's compact factors (unset: 0 with a disk cache, loads stream from disk; 4096 without) |
| SVDIFF_DISK_CACHE | on | keep decompositions on disk under ComfyUI's ``user/svdiff_cache`` |
| SVDIFF_DISK_CACHE_GB | auto | size cap of that disk cache (unset: chosen per checkpoint from the free space, logged) |
| SVDIFF_RESIDUAL_CACHE_MB | 2048 | budget of the low-VRAM per-forward residual cache |
| SVDIFF_LOWVRAM_MERGE | on | patch shifted low-VRAM weights once at load (off: ComfyUI's per-forward path) |

Booleans accept 1/0, true/false, yes/no, on/off (any case); an unreadable value keeps the
default and is logged.  ``current()`` reads the environment the first time and keeps the
result; ``reload()`` reads it again (tests that change a variable call it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger("svdiff")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(name: str, raw: Optional[str], default: bool) -> bool:
    """The one boolean parser for SVDIFF_* switches."""
    if raw is None or raw.strip() == "":
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    log.warning("svdiff: %s=%r is not a yes/no value; using %s", name, raw, "on" if default else "off")
    return default


def parse_float(name: str, raw: Optional[str], default: float) -> float:
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        log.warning("svdiff: %s=%r is not a number; using %s", name, raw, default)
        return default


def parse_optional_float(name: str, raw: Optional[str]) -> Optional[float]:
    """A number, or None when unset (or unreadable, which is logged)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError:
        log.warning("svdiff: %s=%r is not a number; choosing it automatically", name, raw)
        return None


@dataclass(frozen=True)
class PackSettings:
    svd_memory_mb: Optional[float] = None  # None: 0 with a disk cache, 4096 without (adapter.svd_cache)
    disk_cache: bool = True
    disk_cache_gb: Optional[float] = None  # None: chosen per checkpoint from the free space
    residual_cache_mb: float = 2048.0
    lowvram_merge: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "PackSettings":
        d = cls()
        return cls(
            svd_memory_mb=parse_optional_float("SVDIFF_SVD_MEMORY_MB", env.get("SVDIFF_SVD_MEMORY_MB")),
            disk_cache=parse_bool("SVDIFF_DISK_CACHE", env.get("SVDIFF_DISK_CACHE"), d.disk_cache),
            disk_cache_gb=parse_optional_float("SVDIFF_DISK_CACHE_GB", env.get("SVDIFF_DISK_CACHE_GB")),
            residual_cache_mb=parse_float("SVDIFF_RESIDUAL_CACHE_MB", env.get("SVDIFF_RESIDUAL_CACHE_MB"), d.residual_cache_mb),
            lowvram_merge=parse_bool("SVDIFF_LOWVRAM_MERGE", env.get("SVDIFF_LOWVRAM_MERGE"), d.lowvram_merge),
        )


_CURRENT: Optional[PackSettings] = None


def current() -> PackSettings:
    """The settings, read from the environment on first use."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = PackSettings.from_env(os.environ)
    return _CURRENT


def reload() -> PackSettings:
    """Read the environment again (for tests and tools that change it)."""
    global _CURRENT
    _CURRENT = None
    return current()
