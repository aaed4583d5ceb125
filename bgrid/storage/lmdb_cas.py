"""The content-addressable store of a bgrid server, kept in LMDB as chunked blobs."""

import functools
import itertools
import operator
from typing import NamedTuple

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bgrid.digest import EMPTY_DIGEST, hash_hex, hash_key, keys_of
from bgrid.errors import (
    BgridError,
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidArgumentError,
    OutOfRangeError,
    ResourceExhaustedError,
)
from bgrid.interfaces import IBlobStore
from bgrid.storage import cas_layout
from bgrid.storage.cas_eviction import DEFAULT_LOW_WATERMARK, LruEvictor
from bgrid.storage.cas_layout import CasDatabases, IndexRecord
from bgrid.storage.lmdb_cas_streams import LmdbBlobReader, LmdbBlobWriter

# Data up to this size is hashed on the reactor thread. Larger data is hashed on a pool
# thread, where hashlib releases the GIL.
INLINE_HASH_LIMIT = 4 * 1024

# Bounds on a read that runs on the reactor thread (``LmdbEnvironment.read_inline``):
# index lookups of one FindMissingBlobs, and the blobs of one read and the bytes they
# add up to. Larger reads go to a reader thread. At these bounds an inline read blocks
# the reactor for an estimated 1.5 ms (4,096 lookups) or 0.7 ms (1 MiB copied and
# hashed), from rates measured on a 2-core VM: 0.36 ms per 1,000 lookups and 0.57 ms
# per MiB of SHA-256.
INLINE_READ_MAX_KEYS = 4096
INLINE_READ_MAX_BYTES = 1 << 20

DEFAULT_ACCESS_FLUSH_INTERVAL = 60.0


class _Corrupt(NamedTuple):
    """The outcome of reading a blob whose stored data fails its integrity check."""

    blob_id: int


class _Recovery(NamedTuple):
    """The cleanup that ``LmdbBlobStore.start`` did in the database."""

    uploads: int
    chunks: int
    lru_keys_rebuilt: object
    eviction: object
    stored_bytes: int


def _do_nothing(txn):
    return None


_get_size_bytes = operator.attrgetter("size_bytes")


def _find_stored(txn, dbs, digests):
    """Return ``(stored, keys)``: whether each digest's blob is in the index with the
    same size, and the raw hash of each digest."""
    keys = keys_of(digests)
    return cas_layout.find_stored(txn, dbs, keys, map(_get_size_bytes, digests)), keys


def _read_verified(txn, dbs, digests):
    """Read and verify whole blobs inside one read transaction.

    Returns ``(blobs, keys)``, where ``blobs`` has for each digest its ``bytes``, None
    when it is absent, or a ``_Corrupt`` when its chunks are damaged or do not hash to
    the digest, and ``keys`` has the raw hash of each digest.
    """
    keys = keys_of(digests)
    blobs = []
    read_blob = cas_layout.read_blob
    for digest, key in zip(digests, keys):
        found = read_blob(txn, dbs, key, digest.size_bytes)
        if found is None:
            blobs.append(None)
            continue

        blob_id, data = found
        if data is None or hash_key(data) != key:
            blobs.append(_Corrupt(blob_id))
        else:
            blobs.append(data)
    return blobs, keys


def _read_record(txn, dbs, key):
    return cas_layout.read_record(txn, dbs, key)


@implementer(IBlobStore)
class LmdbBlobStore:
    """A content-addressable store of blobs in an ``LmdbEnvironment``.

    Blobs are split into chunks of ``cas_layout.CHUNK_SIZE`` bytes and become visible
    when their index record is written (see ``cas_layout``). Every read of a whole blob
    checks its SHA-256, and a blob that fails is deleted and reported as
    ``CorruptBlobError``. Access times of found and read blobs are kept in memory and
    written in one transaction every ``access_flush_interval`` seconds, at stop, and
    before each eviction. ``stored_bytes`` is the total size of the stored blobs, kept
    in the database in the same transactions that add or delete blobs.

    With a quota (``max_stored_bytes``), inserts evict least-recently-used blobs as
    ``cas_eviction`` describes, and a blob larger than the quota is rejected with
    ``ResourceExhaustedError`` before its data is hashed. The quota counts blob bytes
    only: chunks of uploads in progress, the index and LMDB's free pages take disk
    space beyond it. When the LMDB map nears its maximum size, is full, or the disk is
    full, the environment makes the store evict least-recently-used blobs whatever the
    quota.
    """

    log = Logger()

    DATABASE_NAMES = cas_layout.DATABASE_NAMES

    def __init__(
        self,
        environment,
        clock,
        access_flush_interval=DEFAULT_ACCESS_FLUSH_INTERVAL,
        max_stored_bytes=None,
        low_watermark=DEFAULT_LOW_WATERMARK,
    ):
        """Describe the store. ``start`` opens it.

        ``environment`` is an ``LmdbEnvironment`` opened with ``DATABASE_NAMES``,
        ``clock`` an ``IReactorTime`` that gives access times and drives the flush, and
        ``access_flush_interval`` is in seconds. ``max_stored_bytes`` is the quota in
        bytes (None: no quota) and ``low_watermark`` the fraction of it that eviction
        goes down to.
        """
        self.stored_bytes = 0
        self._environment = environment
        self._clock = clock
        self._access_flush_interval = access_flush_interval
        self._evictor = LruEvictor(max_stored_bytes, low_watermark)
        self._dbs = None
        self._flush_loop = None

    @property
    def max_stored_bytes(self):
        """The quota in bytes, or None when the store has none."""
        return self._evictor.max_stored_bytes

    @property
    def pinned_blobs(self):
        """The number of distinct blobs pinned now, by ``pin`` and by open readers."""
        return self._evictor.pinned_blobs

    def start(self):
        """Delete the uploads that a crash left unfinished and start the access-time flush.

        Call it after the environment has started. Returns a Deferred firing with None
        once the cleanup is committed. Requests may be made before that: the cleanup is
        the first queued write and unfinished uploads are never visible.
        """
        self._dbs = CasDatabases.of(self._environment)
        self._environment.set_space_reclaimer(self._reclaim_map_space)

        recovering = self._environment.write(self._recover)
        recovering.addCallback(self._recovered)

        self._flush_loop = task.LoopingCall(self._flush_access_times_logging_errors)
        self._flush_loop.clock = self._clock
        self._flush_loop.start(self._access_flush_interval, now=False)
        return recovering

    def stop(self):
        """Stop the periodic flush and write the access times still in memory.

        Returns a Deferred firing with None. Call it before stopping the environment.
        """
        if self._flush_loop is not None and self._flush_loop.running:
            self._flush_loop.stop()
        return self._flush_access_times_logging_errors().addCallback(lambda _: None)

    def _recover(self, txn):
        dbs = self._dbs
        uploads, chunks = cas_layout.delete_pending_uploads(txn, dbs)

        # A store written before cas-lru existed has index records without LRU keys.
        lru_keys_rebuilt = None
        index_count = cas_layout.count_entries(txn, dbs.index)
        if cas_layout.count_entries(txn, dbs.lru) != index_count:
            lru_keys_rebuilt = cas_layout.rebuild_lru(txn, dbs)

        eviction = self._evictor.enforce_quota(txn, dbs)
        return _Recovery(
            uploads, chunks, lru_keys_rebuilt, eviction, cas_layout.read_stored_bytes(txn, dbs)
        )

    def _recovered(self, recovery):
        if recovery.uploads:
            self.log.info(
                "deleted {uploads} unfinished uploads ({chunks} chunks) left by an earlier run",
                uploads=recovery.uploads,
                chunks=recovery.chunks,
            )
        if recovery.lru_keys_rebuilt is not None:
            self.log.info(
                "rebuilt the least-recently-used order (cas-lru) of {count} blobs from the "
                "index",
                count=recovery.lru_keys_rebuilt,
            )
        if recovery.eviction is not None:
            self._log_eviction(recovery.eviction, "the CAS was above its quota at start")
        self.stored_bytes = recovery.stored_bytes
        self.log.info(
            "CAS started with {stored_bytes} bytes of blobs (quota: {quota})",
            stored_bytes=recovery.stored_bytes,
            quota=(
                "none"
                if self.max_stored_bytes is None
                else f"{self.max_stored_bytes} bytes, evicting down to "
                f"{self._evictor.low_watermark_bytes} bytes"
            ),
        )

    # Queries.

    def find_missing(self, digests):
        unique = dict.fromkeys(digests)
        unique.pop(EMPTY_DIGEST, None)
        if not unique:
            return defer.succeed([])

        lookups = list(unique)
        if len(lookups) <= INLINE_READ_MAX_KEYS:
            reading = self._environment.read_inline(_find_stored, self._dbs, lookups)
        else:
            reading = self._environment.read(_find_stored, self._dbs, lookups)
        return reading.addCallback(self._stored_found, lookups)

    def _stored_found(self, found, lookups):
        stored, keys = found
        self._record_access(itertools.compress(keys, stored))
        return list(itertools.compress(lookups, map(operator.not_, stored)))

    def get(self, digest):
        def unwrap(results):
            if isinstance(results[0], Exception):
                raise results[0]
            return results[0]

        return self.get_many([digest]).addCallback(unwrap)

    def get_many(self, digests):
        digests = list(digests)
        unique = dict.fromkeys(digests)
        unique.pop(EMPTY_DIGEST, None)
        if not unique:
            return defer.succeed([b"" for _ in digests])

        lookups = list(unique)
        if (
            len(lookups) <= INLINE_READ_MAX_KEYS
            and sum(map(_get_size_bytes, lookups)) <= INLINE_READ_MAX_BYTES
        ):
            reading = self._environment.read_inline(_read_verified, self._dbs, lookups)
        else:
            reading = self._environment.read(_read_verified, self._dbs, lookups)
        return reading.addCallback(self._blobs_read, lookups, digests)

    def _blobs_read(self, read, lookups, digests):
        blobs, keys = read
        self._record_access(key for key, blob in zip(keys, blobs) if type(blob) is bytes)
        drops = [
            self._drop_corrupt_blob(digest, blob.blob_id)
            for digest, blob in zip(lookups, blobs)
            if type(blob) is _Corrupt
        ]
        if drops:
            return defer.gatherResults(drops).addCallback(
                lambda _: self._assemble_blobs(lookups, blobs, digests)
            )
        return self._assemble_blobs(lookups, blobs, digests)

    def _assemble_blobs(self, lookups, blobs, digests):
        """Return the ``get_many`` entry of each of ``digests`` from the outcome of
        reading the distinct non-empty ones, ``lookups``."""
        if len(lookups) == len(digests) and None not in blobs:
            if not any(type(blob) is _Corrupt for blob in blobs):
                # No duplicate, no empty digest and nothing failed: same order already.
                return blobs

        found = dict(zip(lookups, blobs))
        results = []
        for digest in digests:
            blob = b"" if digest == EMPTY_DIGEST else found[digest]
            if blob is None:
                results.append(BlobNotFoundError(digest))
            elif type(blob) is _Corrupt:
                results.append(CorruptBlobError(digest))
            else:
                results.append(blob)
        return results

    # Uploads.

    def put(self, digest, data):
        def unwrap(results):
            if results[0] is not None:
                raise results[0]

        return self.put_many([(digest, data)]).addCallback(unwrap)

    def put_many(self, blobs):
        """Store ``(digest, data)`` pairs as ``IBlobStore.put_many`` describes.

        The data must not change until the returned Deferred fires. Large data is hashed
        on a pool thread, which then queues the inserts itself, and all valid blobs are
        written in one group transaction.
        """
        blobs = list(blobs)
        results = [None] * len(blobs)
        to_store = []
        hashed_bytes = 0
        for position, (digest, data) in enumerate(blobs):
            too_large = self._check_fits(digest)
            if len(data) != digest.size_bytes:
                results[position] = DigestMismatchError(
                    f"blob {digest}: the data has {len(data)} bytes, "
                    f"expected {digest.size_bytes}"
                )
            elif too_large is not None:
                results[position] = too_large
            else:
                to_store.append((position, digest, data))
                hashed_bytes += len(data)
        if not to_store:
            return defer.succeed(results)

        now = int(self._clock.seconds())
        if hashed_bytes <= INLINE_HASH_LIMIT:
            operations, context = self._hash_and_build_insert(to_store, now)
            writing = self._environment.write_batch(operations, hashed_bytes)
            writing.addCallback(lambda outcomes: (context, outcomes))
        else:
            writing = self._environment.prepare_write(
                hashed_bytes, self._hash_and_build_insert, to_store, now
            )
        return writing.addCallback(self._inserts_done, blobs, results, now)

    def _hash_and_build_insert(self, to_store, now):
        """Hash each ``(position, digest, data)`` and return the operation that inserts
        the blobs that match, in a list, with ``(matching, mismatches)``.

        Runs on a pool thread for large data, so it reads only settings of the store
        that do not change after ``start``.
        """
        matching = []
        mismatches = []
        for position, digest, data in to_store:
            actual_hash = hash_hex(data)
            if actual_hash != digest.hash:
                mismatches.append((position, actual_hash))
            elif digest != EMPTY_DIGEST:
                matching.append((position, digest, data))
        if not matching:
            return [], (matching, mismatches)
        return [self._insert_all_operation(matching, now)], (matching, mismatches)

    def _insert_all_operation(self, matching, now):
        dbs = self._dbs
        max_stored_bytes = self._evictor.max_stored_bytes
        keys = keys_of(digest for _, digest, _ in matching)
        blobs = list(zip(keys, (data for _, _, data in matching)))

        def insert_blobs(txn):
            return cas_layout.insert_new_blobs(txn, dbs, blobs, now, max_stored_bytes)

        return insert_blobs

    def _inserts_done(self, prepared, blobs, results, now):
        (matching, mismatches), outcomes = prepared
        for position, actual_hash in mismatches:
            results[position] = DigestMismatchError(
                f"blob {blobs[position][0]}: the data has SHA-256 {actual_hash}"
            )
        if not matching:
            return results

        outcome = outcomes[0]
        if outcome is None:
            # The quota needs eviction, which each blob does alone in its own operation,
            # so that a blob that cannot get room fails alone.
            operations = [self._insert_operation(digest, data, now) for _, digest, data in matching]
            size = sum(len(data) for _, _, data in matching)
            inserting = self._environment.write_batch(operations, size)
            return inserting.addCallback(self._each_inserted, matching, results)
        if isinstance(outcome, Failure):
            for position, digest, _ in matching:
                results[position] = self._blob_failed(outcome, digest)
            return results

        inserted, stored_bytes = outcome
        self._set_stored_bytes(stored_bytes)
        # Blobs that were stored already count as accessed.
        self._record_access(
            digest.key
            for (_, digest, _), was_inserted in zip(matching, inserted)
            if not was_inserted
        )
        return results

    def _each_inserted(self, outcomes, matching, results):
        accessed = []
        for (position, digest, _), outcome in zip(matching, outcomes):
            if outcome is None:
                accessed.append(digest.key)
            elif isinstance(outcome, Failure):
                results[position] = self._blob_failed(outcome, digest)
            else:
                self._set_stored_bytes(outcome.stored_bytes)
                if outcome.eviction is not None:
                    self._log_eviction(outcome.eviction, f"blob {digest} needed room")
        if accessed:
            self._record_access(accessed)
        return results

    def _insert_operation(self, digest, data, now):
        dbs = self._dbs
        evictor = self._evictor

        def insert_blob(txn):
            if cas_layout.read_record(txn, dbs, digest.key) is not None:
                return None
            blob_id = cas_layout.allocate_blob_id(txn, dbs)
            cas_layout.put_chunks(txn, dbs, blob_id, data)
            return evictor.insert_within_quota(
                txn, dbs, digest, IndexRecord(len(data), blob_id, now)
            )

        return insert_blob

    def _blob_inserted(self, inserted, digest):
        """Take the outcome of an insert operation: an ``Inserted``, or None when the
        blob was stored already."""
        if inserted is None:
            self._record_access([digest.key])
            return None

        self._set_stored_bytes(inserted.stored_bytes)
        if inserted.eviction is not None:
            self._log_eviction(inserted.eviction, f"blob {digest} needed room")
        return None

    def _blob_failed(self, failure, digest):
        if not failure.check(BgridError):
            self.log.failure("storing blob {digest} failed", failure, digest=str(digest))
        return failure.value

    # Streams.

    def open_reader(self, digest, offset=0, limit=0):
        if offset < 0:
            return defer.fail(OutOfRangeError(f"read offset {offset} of blob {digest} is negative"))
        if limit < 0:
            return defer.fail(
                InvalidArgumentError(f"read limit {limit} of blob {digest} is negative")
            )

        if digest == EMPTY_DIGEST:
            return defer.succeed(None).addCallback(
                self._reader_opened, digest, offset, limit, None
            )

        # The pin is taken before the record is read, so an eviction that starts after
        # this call cannot delete the blob while the reader is open.
        pin = self._evictor.pin([digest.key])
        opening = self._environment.read(_read_record, self._dbs, digest.key)
        opening.addCallback(self._reader_opened, digest, offset, limit, pin)
        opening.addErrback(self._reader_failed, pin)
        return opening

    def _reader_opened(self, record, digest, offset, limit, pin):
        if digest != EMPTY_DIGEST:
            if record is None or record.size_bytes != digest.size_bytes:
                raise BlobNotFoundError(digest)
            self._record_access([digest.key])

        size = digest.size_bytes
        if offset > size:
            raise OutOfRangeError(
                f"read offset {offset} is past the end of blob {digest}, which has {size} bytes"
            )
        end = size if limit == 0 else min(size, offset + limit)
        return LmdbBlobReader(self, digest, record, offset, end, pin)

    def _reader_failed(self, failure, pin):
        self._evictor.unpin(pin)
        return failure

    def open_writer(self, digest):
        # NOTE: a writer that is neither committed nor aborted keeps its chunks until the
        # next start, so callers must abort every writer they do not commit.
        return LmdbBlobWriter(self, digest)

    # Pins.

    def pin(self, digests):
        """Protect the blobs of ``digests`` from eviction until ``unpin``.

        Returns a Deferred firing with a ``PinToken`` once every write queued before the
        call is committed, so no eviction that ran before the pin deletes a blob after
        the Deferred fires: a ``find_missing`` made then shows what stays stored. Pins
        are counted per blob and kept in memory, so a restart drops them. A digest not
        stored yet may be pinned, and its blob is protected once stored. The empty
        digest is ignored.
        """
        token = self._evictor.pin(digest.key for digest in digests if digest != EMPTY_DIGEST)
        barrier = self._environment.write(_do_nothing)

        def release(failure):
            self._evictor.unpin(token)
            return failure

        return barrier.addCallbacks(lambda _: token, release)

    def unpin(self, token):
        """Release the pins of ``token``, from ``pin``. A second call has no effect."""
        self._evictor.unpin(token)

    def check_consistency(self):
        """Check the layout invariants listed in ``cas_layout.check_layout``.

        Returns a Deferred firing with a list of problems, empty when the store is
        consistent. Reads the whole store in one transaction, so it is meant for tests
        and maintenance, not for a serving path.
        """
        return self._environment.read(cas_layout.check_layout, self._dbs)

    # Helpers shared with the reader and writer.

    def _update_hasher(self, hasher, data):
        """Feed ``data`` to ``hasher``, on a pool thread when it is large.

        Returns a Deferred firing with None.
        """
        if len(data) <= INLINE_HASH_LIMIT:
            hasher.update(data)
            return defer.succeed(None)
        return self._environment.run_in_pool(hasher.update, data)

    def _drop_corrupt_blob(self, digest, blob_id):
        """Delete a blob that failed its integrity check.

        Returns a Deferred firing with None once it is deleted. A failure to delete is
        logged, not raised.
        """
        self.log.error(
            "stored blob {digest} (blob id {blob_id}) failed its integrity check and is deleted",
            digest=str(digest),
            blob_id=blob_id,
        )
        dbs = self._dbs
        key = digest.key

        def delete_corrupt(txn):
            return cas_layout.delete_blob(txn, dbs, key, blob_id)

        deleting = self._environment.write(delete_corrupt)
        deleting.addCallback(self._set_stored_bytes)
        deleting.addErrback(
            lambda failure: self.log.failure(
                "failed to delete corrupt blob {digest}", failure, digest=str(digest)
            )
        )
        return deleting

    def _set_stored_bytes(self, stored_bytes):
        """Take the stored total returned by a write, where None means it did not change."""
        if stored_bytes is not None:
            self.stored_bytes = stored_bytes

    def _record_access(self, keys):
        self._evictor.record_access(keys, int(self._clock.seconds()))

    def _check_fits(self, digest):
        """Return the ``ResourceExhaustedError`` for a blob larger than the quota or the
        maximum map size, or None."""
        max_map_size = self._environment.max_map_size
        if digest.size_bytes > max_map_size:
            return ResourceExhaustedError(
                f"blob {digest} is {digest.size_bytes} bytes, larger than the maximum LMDB "
                f"map size of {max_map_size} bytes (--map-size), so it cannot be stored"
            )
        return self._evictor.check_fits(digest)

    def _insert_within_quota(self, txn, digest, record):
        """Insert an index record on the writer thread, evicting as the quota requires."""
        return self._evictor.insert_within_quota(txn, self._dbs, digest, record)

    # Eviction.

    def _reclaim_map_space(self, txn, target_bytes, reason, is_enough=None):
        """Free about ``target_bytes`` for the map or the disk because of ``reason``, as
        ``set_space_reclaimer`` of the environment requires. Runs on the writer thread."""
        eviction = self._evictor.reclaim(txn, self._dbs, target_bytes, is_enough)
        on_commit = functools.partial(self._map_space_reclaimed, eviction, reason)
        return eviction.freed_bytes, on_commit

    def _map_space_reclaimed(self, eviction, reason):
        self._set_stored_bytes(eviction.stored_bytes)
        self._log_eviction(eviction, reason)

    def _log_eviction(self, eviction, reason):
        self.log.info(
            "evicted {blobs} least-recently-used blobs ({freed_bytes} bytes) because "
            "{reason}; {stored_bytes} bytes of blobs remain",
            blobs=eviction.blobs,
            freed_bytes=eviction.freed_bytes,
            reason=reason,
            stored_bytes=eviction.stored_bytes,
        )

    # Access times.

    def flush_access_times(self):
        """Write the access times recorded in memory since the last flush.

        Returns a Deferred firing with the number of index records changed.
        """
        if not self._evictor.unflushed_access_count():
            return defer.succeed(0)

        accessed = self._evictor.take_access_times()
        dbs = self._dbs

        def write_access_times(txn):
            return cas_layout.update_access_times(txn, dbs, accessed)

        def forget(result):
            self._evictor.flushed(accessed)
            return result

        return self._environment.write(write_access_times).addBoth(forget)

    def _flush_access_times_logging_errors(self):
        # Access times only guide eviction, so a failed flush is logged and dropped rather
        # than stopping the loop.
        count = self._evictor.unflushed_access_count()
        flushing = self.flush_access_times()
        flushing.addErrback(
            lambda failure: self.log.failure(
                "failed to write {count} blob access times", failure, count=count
            )
        )
        return flushing
