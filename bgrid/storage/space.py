"""Room in the LMDB map and on the disk: the page count that makes the CAS evict before the
map fills, and the write errors that mean the disk holding the data is full.

LMDB never overwrites a page that the last committed transaction uses. A write transaction
copies every branch and leaf page that it changes (copy-on-write). The pages that a commit
frees become reusable only after the next commit, because ``mdb_page_alloc`` in mdb.c of
LMDB 0.9.x takes free pages of transactions older than the oldest snapshot still in use.
A group of writes with random keys, such as a batch of blob index records or the
eviction of blobs that deletes them, can copy every branch and leaf page of a database.
So after a commit, the map needs room for two such copies: the pages the last commit
freed, not yet reusable, and the copies the next transaction makes. Eviction itself is
such a transaction, so this room must be there before the map is full, or deleting
fails with ``MDB_MAP_FULL`` too.
"""

import errno
import os
import resource
from typing import NamedTuple

import lmdb

# Room kept in the map beyond the copies that ``PageUsage.needed_pages`` counts: for the
# new pages of the next writes and for records that are never evicted (the action cache
# and the scheduler's records). It is the larger of RESERVE_FRACTION of the maximum map
# size and MIN_RESERVE_BYTES, but at most half of the map.
RESERVE_FRACTION = 0.10
MIN_RESERVE_BYTES = 4 << 20

# How far below the high-water mark an eviction goes, so that it runs once per this many
# bytes written rather than after every write. It is the larger of EVICTION_FRACTION of
# the maximum map size and MIN_EVICTION_BYTES, but at most an eighth of the map and at
# most MAX_EVICTION_BYTES, which bounds the pages that one eviction transaction deletes.
EVICTION_FRACTION = 0.05
MIN_EVICTION_BYTES = 1 << 20
MAX_EVICTION_BYTES = 64 << 20

# LMDB 0.9.x returns EIO when a write of its data file writes only part of the pages
# (``mdb_page_flush`` in mdb.c), which is what a disk that fills during the write causes.
# An EIO counts as a full disk when less than this many bytes can still be written.
MIN_FREE_DISK_BYTES = 1 << 20

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}

# The minimum time in seconds between two log messages about writes that failed on a full
# disk. Failures in between are counted and reported with the next message.
DISK_FULL_LOG_INTERVAL = 60.0


class PageUsage(NamedTuple):
    """The pages of all databases of an environment, counted in one transaction."""

    # Branch, leaf and overflow pages.
    used_pages: int
    # Branch and leaf pages, which a write transaction copies when it changes them.
    # Overflow pages hold large values and are freed, never copied.
    tree_pages: int

    @property
    def needed_pages(self):
        """The used pages plus room for two copies of every branch and leaf page."""
        return self.used_pages + 2 * self.tree_pages


def count_pages(txn, databases):
    """Return the ``PageUsage`` of ``databases`` (handles, including the main database)
    as of ``txn``. Costs one ``mdb_stat`` per database."""
    used_pages = 0
    tree_pages = 0
    for database in databases:
        stat = txn.stat(database)
        tree = stat["branch_pages"] + stat["leaf_pages"]
        tree_pages += tree
        used_pages += tree + stat["overflow_pages"]
    return PageUsage(used_pages, tree_pages)


class MapMarks(NamedTuple):
    """The marks, in pages, between which a map of a given maximum size is kept.

    When the ``needed_pages`` of a commit pass ``high_pages``, blobs are evicted until
    they are at most ``low_pages``.
    """

    page_size: int
    max_pages: int
    high_pages: int
    low_pages: int

    @classmethod
    def for_map(cls, max_map_size, page_size):
        """Return the marks of a map of ``max_map_size`` bytes with pages of ``page_size``
        bytes."""
        max_pages = max_map_size // page_size
        reserve = max(int(max_map_size * RESERVE_FRACTION), MIN_RESERVE_BYTES)
        reserve = min(reserve, max_map_size // 2)
        gap = max(int(max_map_size * EVICTION_FRACTION), MIN_EVICTION_BYTES)
        gap = min(gap, max_map_size // 8, MAX_EVICTION_BYTES)
        high_pages = max_pages - reserve // page_size
        low_pages = max(high_pages - gap // page_size, 0)
        return cls(page_size, max_pages, high_pages, low_pages)

    @property
    def max_batch_bytes(self):
        """The most data bytes that one group transaction may write: half the room above
        the high-water mark, so that a group committed just below the mark leaves room for
        the eviction that follows it."""
        return (self.max_pages - self.high_pages) * self.page_size // 2


def disk_full_cause(error, path):
    """Return why the LMDB write error ``error`` means that the disk holding the
    environment at ``path`` is full, or None when it means something else.

    ENOSPC and EDQUOT mean a full file system or quota, and EFBIG a data file at the
    maximum file size. EIO counts only when less than MIN_FREE_DISK_BYTES can still be
    written to the data file, because a failing device returns it too.
    """
    if not isinstance(error, lmdb.Error) or isinstance(error, lmdb.MapFullError):
        return None
    code = getattr(error, "code", None)
    if isinstance(error, lmdb.DiskError) or code in _DISK_FULL_ERRNOS:
        return f"the disk that holds {path} is full"
    if code == errno.EFBIG:
        return f"the LMDB data file in {path} has reached the maximum file size"
    if code != errno.EIO:
        return None

    free_bytes, file_room_bytes = writable_bytes(path)
    if free_bytes is not None and free_bytes < MIN_FREE_DISK_BYTES:
        return f"the disk that holds {path} is full ({free_bytes} bytes free)"
    if file_room_bytes is not None and file_room_bytes < MIN_FREE_DISK_BYTES:
        return (
            f"the LMDB data file in {path} has reached the file size limit (RLIMIT_FSIZE) "
            f"of this process"
        )
    return None


def writable_bytes(path):
    """Return ``(free_bytes, file_room_bytes)`` for the LMDB data file in ``path``: the
    free space of its file system for unprivileged users, and the bytes the file may
    still grow by under this process's file size limit (RLIMIT_FSIZE), None without a
    limit. Each is None when it cannot be read."""
    try:
        stat = os.statvfs(path)
        free_bytes = stat.f_bavail * stat.f_frsize
    except OSError:
        free_bytes = None

    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit == resource.RLIM_INFINITY:
        return free_bytes, None
    try:
        file_size = os.stat(os.path.join(path, "data.mdb")).st_size
    except OSError:
        return free_bytes, None
    return free_bytes, max(limit - file_size, 0)


class DiskFullLog:
    """The log of writes that failed because the disk is full, written on the reactor
    thread: the first failure at once, later ones at most once per
    DISK_FULL_LOG_INTERVAL seconds, with the number of failures since the last message.
    """

    def __init__(self, log, reactor):
        """``log`` is the ``twisted.logger.Logger`` to write to, and ``reactor`` provides
        ``seconds`` and ``callLater``."""
        self._log = log
        self._reactor = reactor
        self._logged_at = None
        self._unlogged_count = 0
        self._last_error = None
        self._last_cause = None
        self._summary_call = None

    def failed(self, count, error, cause):
        """Record that ``count`` writes failed with the LMDB error text ``error`` because
        of ``cause``."""
        now = self._reactor.seconds()
        self._unlogged_count += count
        self._last_error = error
        self._last_cause = cause
        if self._logged_at is None or now - self._logged_at >= DISK_FULL_LOG_INTERVAL:
            self._write()
        elif self._summary_call is None:
            delay = self._logged_at + DISK_FULL_LOG_INTERVAL - now
            self._summary_call = self._reactor.callLater(delay, self._write_summary)

    def flush(self):
        """Write the failures not logged yet, as when the environment stops."""
        if self._summary_call is not None and self._summary_call.active():
            self._summary_call.cancel()
        self._summary_call = None
        if self._unlogged_count:
            self._write()

    def _write_summary(self):
        self._summary_call = None
        self._write()

    def _write(self):
        self._log.error(
            "{count} LMDB writes failed with RESOURCE_EXHAUSTED because {cause} ({error}). "
            "Later failures are counted and logged at most every {interval} seconds.",
            count=self._unlogged_count,
            cause=self._last_cause,
            error=self._last_error,
            interval=int(DISK_FULL_LOG_INTERVAL),
        )
        self._logged_at = self._reactor.seconds()
        self._unlogged_count = 0
