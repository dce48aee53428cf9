"""This process's memory, as the reliability tests and the benchmarks read it (Linux)."""

from __future__ import annotations


def rss_mb(settle: bool = True) -> float:
    """Resident set size of this process in MB (``VmRSS``; 0.0 where /proc has none).

    ``settle``: collect garbage and return freed heap pages to the OS first (glibc's
    ``malloc_trim``), so that the reading shows live memory rather than the allocator's cache.
    """
    if settle:
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
