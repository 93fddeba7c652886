"""Process facts for ``/health/status``, read from the operating system without dependencies.

Linux reads ``/proc/self`` (current RSS from ``statm``, the start time from ``stat``); macOS
asks ``proc_pid_rusage`` through ctypes for the current RSS; the peak RSS is ``getrusage``'s
everywhere it exists (kilobytes on Linux, bytes on macOS). Where a fact cannot be read it is
``None``, never an error; the uptime then counts from when this module was imported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from time import time
from typing import Any

__all__ = ["process_facts"]

_IMPORTED_AT = time()


def process_facts() -> dict[str, Any]:
    """``pid``, ``rss_bytes``, ``max_rss_bytes``, ``uptime_seconds``, ``python``."""
    started = _started_at()
    rss, peak = _rss_bytes(), _max_rss_bytes()
    if rss is not None and peak is not None:
        peak = max(peak, rss)  # read a moment apart: the peak is never below the current
    return {
        "pid": os.getpid(),
        "rss_bytes": rss,
        "max_rss_bytes": peak,
        "uptime_seconds": round(time() - started, 3),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def _rss_bytes() -> int | None:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/statm", "rb") as statm:
                resident_pages = int(statm.read().split()[1])
            return resident_pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    if sys.platform == "darwin":
        return _darwin_rss_bytes()
    return None


class _RusageInfoV0(ctypes.Structure):
    # <sys/resource.h>: struct rusage_info_v0
    _fields_ = [
        ("ri_uuid", ctypes.c_uint8 * 16),
        ("ri_user_time", ctypes.c_uint64),
        ("ri_system_time", ctypes.c_uint64),
        ("ri_pkg_idle_wkups", ctypes.c_uint64),
        ("ri_interrupt_wkups", ctypes.c_uint64),
        ("ri_pageins", ctypes.c_uint64),
        ("ri_wired_size", ctypes.c_uint64),
        ("ri_resident_size", ctypes.c_uint64),
        ("ri_phys_footprint", ctypes.c_uint64),
        ("ri_proc_start_abstime", ctypes.c_uint64),
        ("ri_proc_exit_abstime", ctypes.c_uint64),
    ]


def _darwin_rss_bytes() -> int | None:  # pragma: no cover - macOS only
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.dylib", use_errno=True)
        info = _RusageInfoV0()
        if libc.proc_pid_rusage(os.getpid(), 0, ctypes.byref(info)) != 0:  # RUSAGE_INFO_V0
            return None
        return int(info.ri_resident_size)
    except (OSError, AttributeError):
        return None


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _started_at() -> float:
    """When this process started (seconds since the epoch)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/stat", "rb") as stat:
                # The command name (field 2) may hold spaces: count from after its ")".
                fields = stat.read().rsplit(b")", 1)[1].split()
            ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
            with open("/proc/stat", "rb") as system:
                boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime"))
            return boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return _IMPORTED_AT
