"""Least-recently-used eviction for ``LmdbBlobStore``: the quota, the pins and the access
times that decide which blobs the writer thread may delete.

The quota is a maximum of stored blob bytes (the ``stored-bytes`` counter of
``cas_layout``, which counts each blob's size once and no LMDB overhead). A blob insert
that would take the total above it first evicts least-recently-used blobs until the
total plus the new blob is at most the low watermark (quota times a fraction), in the
same transaction as the insert. A blob larger than the watermark evicts down to the
quota less its size instead. Eviction goes down to the watermark rather than to the
quota so that it runs about once per (1 - fraction) x quota bytes written, not on every
insert.

Eviction order is the last access time in whole seconds, oldest first, and the raw hash
among blobs of the same second. An access is a ``find_missing`` that finds the blob, a
whole-blob read, an opened reader, or an upload of a blob stored already.

Blobs never evicted: pinned blobs (inputs of queued and running actions), blobs open in
a reader, and chunks of uploads in progress, which have no index record. Access times
recorded since the last flush are written before each eviction, so a blob read a moment
ago is not evicted as if it were old.
"""

import threading
from typing import NamedTuple

from bgrid.errors import ResourceExhaustedError
from bgrid.storage import cas_layout

DEFAULT_LOW_WATERMARK = 0.9


class PinToken:
    """The pins taken by one ``pin`` call, released by ``unpin``."""

    __slots__ = ("keys", "released")

    def __init__(self, keys):
        self.keys = keys
        self.released = False

    def __repr__(self):
        state = "released" if self.released else "held"
        return f"<PinToken of {len(self.keys)} blobs, {state}>"


class Inserted(NamedTuple):
    """The outcome of inserting an index record: the new stored total in bytes, and the
    ``cas_layout.Eviction`` that made room for it or None."""

    stored_bytes: int
    eviction: object


class LruEvictor:
    """Decides, on the writer thread, which blobs to evict, from state that the reactor
    thread updates.

    Pins are counted per blob, so a blob pinned by two jobs stays pinned until both
    release it. Pins and unflushed access times live in memory only. A lock guards them
    because the writer thread reads them while the reactor thread changes them.
    """

    def __init__(self, max_stored_bytes=None, low_watermark=DEFAULT_LOW_WATERMARK):
        """``max_stored_bytes`` is the quota in bytes (None: no quota) and
        ``low_watermark`` the fraction of it that eviction goes down to."""
        if max_stored_bytes is not None and max_stored_bytes <= 0:
            raise ValueError(f"max_stored_bytes must be positive, got {max_stored_bytes}")
        if not 0 < low_watermark <= 1:
            raise ValueError(f"low_watermark must be in (0, 1], got {low_watermark}")
        self.max_stored_bytes = max_stored_bytes
        self.low_watermark = low_watermark
        self._lock = threading.Lock()
        self._pins = {}
        self._accessed = {}
        self._accessed_in_flush = []

    @property
    def low_watermark_bytes(self):
        """The stored total in bytes that eviction goes down to, or None without a quota."""
        if self.max_stored_bytes is None:
            return None
        return int(self.max_stored_bytes * self.low_watermark)

    @property
    def pinned_blobs(self):
        """The number of distinct blobs pinned now."""
        with self._lock:
            return len(self._pins)

    # Called on the reactor thread.

    def check_fits(self, digest):
        """Return a ``ResourceExhaustedError`` when a blob of ``digest`` is larger than
        the quota, else None."""
        if self.max_stored_bytes is None or digest.size_bytes <= self.max_stored_bytes:
            return None
        return ResourceExhaustedError(
            f"blob {digest} is {digest.size_bytes} bytes, larger than the CAS quota of "
            f"{self.max_stored_bytes} bytes (--max-cas-size), so it cannot be stored"
        )

    def pin(self, keys):
        """Pin the blobs under the raw hashes ``keys`` and return the ``PinToken``."""
        token = PinToken(tuple(dict.fromkeys(keys)))
        with self._lock:
            for key in token.keys:
                self._pins[key] = self._pins.get(key, 0) + 1
        return token

    def unpin(self, token):
        """Release the pins of ``token``. A second call has no effect."""
        if token.released:
            return
        token.released = True
        with self._lock:
            for key in token.keys:
                count = self._pins[key] - 1
                if count:
                    self._pins[key] = count
                else:
                    del self._pins[key]

    def record_access(self, keys, accessed_at):
        """Remember that the blobs under ``keys`` were used at ``accessed_at`` seconds."""
        accessed = dict.fromkeys(keys, accessed_at)
        with self._lock:
            self._accessed.update(accessed)

    def unflushed_access_count(self):
        """Return the number of blobs whose access time waits for the next flush."""
        with self._lock:
            return len(self._accessed)

    def take_access_times(self):
        """Return the access times recorded since the last call, for a flush.

        Eviction keeps reading them until ``flushed`` is called with the same dict.
        """
        with self._lock:
            accessed, self._accessed = self._accessed, {}
            self._accessed_in_flush.append(accessed)
        return accessed

    def flushed(self, accessed):
        """Forget the access times of a flush that ended, whether it succeeded or not."""
        with self._lock:
            self._accessed_in_flush = [
                pending for pending in self._accessed_in_flush if pending is not accessed
            ]

    # Called on the writer thread, inside a write transaction.

    def insert_within_quota(self, txn, dbs, digest, record):
        """Evict as the quota requires, then write the index record of a blob whose
        chunks are stored.

        Returns an ``Inserted``. Raises ``ResourceExhaustedError`` when the blobs that
        may be evicted cannot make room, and the caller's transaction must then be
        rolled back.
        """
        eviction = None
        if self.max_stored_bytes is not None:
            stored = cas_layout.read_stored_bytes(txn, dbs)
            if stored + record.size_bytes > self.max_stored_bytes:
                target = self._stored_bytes_target(record.size_bytes)
                eviction = self._evict(txn, dbs, stored - target)
                if eviction.stored_bytes + record.size_bytes > self.max_stored_bytes:
                    raise ResourceExhaustedError(
                        f"cannot store blob {digest} of {record.size_bytes} bytes: the CAS "
                        f"quota is {self.max_stored_bytes} bytes (--max-cas-size) and "
                        f"{eviction.stored_bytes} bytes are still stored after evicting "
                        f"every blob that no queued or running action pins and no reader "
                        f"has open. Retry once actions finish, or raise the quota."
                    )
        stored_bytes = cas_layout.insert_blob(txn, dbs, digest.key, record)
        return Inserted(stored_bytes, eviction)

    def enforce_quota(self, txn, dbs):
        """Evict down to the low watermark when the stored total is above the quota, as
        after a restart with a lower quota. Returns the ``Eviction`` or None."""
        if self.max_stored_bytes is None:
            return None
        stored = cas_layout.read_stored_bytes(txn, dbs)
        if stored <= self.max_stored_bytes:
            return None
        return self._evict(txn, dbs, stored - self.low_watermark_bytes)

    def reclaim(self, txn, dbs, target_bytes, is_enough=None):
        """Evict about ``target_bytes`` of least-recently-used blobs, whatever the quota,
        for a map or disk that is full or nearly full. Stops early once ``is_enough()``
        returns true, as ``cas_layout.evict_lru`` describes. Returns the ``Eviction``."""
        return self._evict(txn, dbs, target_bytes, is_enough)

    def _stored_bytes_target(self, size_bytes):
        """Return the stored total that eviction goes down to before inserting a blob of
        ``size_bytes``: the low watermark less the blob, or, for a blob larger than the
        watermark, the quota less the blob."""
        below_watermark = self.low_watermark_bytes - size_bytes
        if below_watermark >= 0:
            return below_watermark
        return self.max_stored_bytes - size_bytes

    def _evict(self, txn, dbs, bytes_to_free, is_enough=None):
        self._write_unflushed_access_times(txn, dbs)
        return cas_layout.evict_lru(txn, dbs, bytes_to_free, self._is_protected, is_enough)

    def _write_unflushed_access_times(self, txn, dbs):
        # NOTE: every eviction writes all access times since the last flush, because the
        # flush owns clearing them. With a low watermark near 1, eviction runs on almost
        # every insert and this costs one index read per recently accessed blob each time.
        with self._lock:
            accessed = {}
            for pending in self._accessed_in_flush:
                accessed.update(pending)
            accessed.update(self._accessed)
        if accessed:
            cas_layout.update_access_times(txn, dbs, accessed)

    def _is_protected(self, key):
        with self._lock:
            return key in self._pins
