"""The Prometheus multiprocess directory: emptied before a run, its dead workers' gauges dropped.

prometheus_client's multiprocess mode keeps each process's values in files named by kind and
process id (``counter_<pid>.db``, ``histogram_<pid>.db``, ``gauge_<mode>_<pid>.db``) and adds
them all up at each scrape. Two chores it leaves to whoever runs the processes:

- A directory reused from an earlier run still holds that run's files, and the new run's
  counters would carry on from there: ``clear_directory`` removes them before workers start.
- A live gauge (``multiprocess_mode`` ``livesum``, ``liveall``, ``livemax``, ``livemin``,
  ``livemostrecent``: requests in flight, health, task and breaker states) must leave the sum
  when its process ends, which ``mark_process_dead(pid)`` does; a worker that is killed
  (SIGKILL, the OOM killer) never calls it, and its last value stays forever:
  ``remove_dead_live_gauges``, at each scrape, does it for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["clear_directory", "remove_dead_live_gauges"]

_logger = logging.getLogger("asgi_resilience.metrics")
# The files prometheus_client writes (values.MultiProcessValue): <kind>[_<mode>]_<pid>.db.
_OWN_FILE = re.compile(r"(?:counter|histogram|summary|gauge_[a-z]+)_\d+\.db")
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def clear_directory(directory: str | os.PathLike[str]) -> int:
    """Make ``directory`` (created if missing) hold none of prometheus_client's files, and make
    sure files can be created in it; the number of files removed.

    Only prometheus_client's own ``*.db`` files go (``counter_<pid>.db``,
    ``gauge_livesum_<pid>.db``...): anything else, an application's SQLite ``app.db`` in a
    directory given by mistake included, is left alone, and so is the directory.

    Raises:
        OSError: the directory cannot be created, emptied or written to.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    removed = 0
    for file in path.iterdir():
        if _OWN_FILE.fullmatch(file.name) and not file.is_dir():
            file.unlink(missing_ok=True)
            removed += 1
    with tempfile.TemporaryFile(dir=path):  # the workers will create theirs here
        pass
    return removed


def remove_dead_live_gauges(directory: str | os.PathLike[str]) -> list[int]:
    """Remove the live gauge files of processes that are no longer alive, as
    ``multiprocess.mark_process_dead(pid)`` would have; the pids whose files went.

    Called at each scrape, before the files are read, by whichever worker serves it: this
    works whatever supervises the workers (uvicorn, Hypercorn, Granian, gunicorn, a container
    runtime), none of which tells the application that a sibling died, and it runs exactly
    when the value is read. A scrape after the dead worker was reaped (uvicorn's supervisor
    does so within half a second, before it starts the replacement) no longer counts its
    requests in flight; a zombie (dead, not yet reaped) counts as dead too.

    Only live gauges go: a dead worker's counters and histograms must stay in the sum, or
    the service's totals would fall (a counter reset to Prometheus), and gauges of the other
    modes (``all``, ``max``, ``sum``...) include dead processes by definition.

    Pids can be reused: a file whose pid now belongs to another process stays until that one
    ends too (Linux hands out pids in turn, so a new worker rarely gets a dead one's). As in
    prometheus_client, the directory must belong to processes that share one pid namespace
    (one host or container), and file names must carry pids (its default identifier).
    Nothing happens on Windows, where signalling a process to probe it would end it.
    """
    if sys.platform == "win32":
        return []
    alive: dict[int, bool] = {}
    removed: set[int] = set()
    for file in Path(directory).glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(file.name)
        if match is None:
            continue
        pid = int(match[1])
        if pid not in alive:
            alive[pid] = _alive(pid)
        if not alive[pid]:
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape got it
                file.unlink()
            removed.add(pid)
    for pid in sorted(removed):
        _logger.info("Dropped the live gauges of process %d: it is no longer running", pid)
    return sorted(removed)


def _alive(pid: int) -> bool:
    """Is ``pid`` a running process? Zombies (ended, not reaped yet) are not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS), or gone this instant: the next scrape sees it
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
