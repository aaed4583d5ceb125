"""The content-addressable store of a bgrid server, kept in LMDB as chunked blobs."""

from typing import NamedTuple

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from bgrid.digest import EMPTY_DIGEST, new_hasher
from bgrid.errors import (
    BgridError,
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidArgumentError,
    OutOfRangeError,
)
from bgrid.interfaces import IBlobStore
from bgrid.storage import cas_layout
from bgrid.storage.cas_layout import CasDatabases, IndexRecord
from bgrid.storage.lmdb_cas_streams import LmdbBlobReader, LmdbBlobWriter

# Data up to this size is hashed on the reactor thread. Larger data is hashed on a pool
# thread, where hashlib releases the GIL.
INLINE_HASH_LIMIT = 4 * 1024

DEFAULT_ACCESS_FLUSH_INTERVAL = 60.0


class _Corrupt(NamedTuple):
    """The outcome of reading a blob whose stored data fails its integrity check."""

    blob_id: int


def _hash_all(datas):
    """Return the SHA-256 hex digest of each bytes-like object, or None where it is None."""
    digests = []
    for data in datas:
        if data is None:
            digests.append(None)
            continue
        hasher = new_hasher()
        hasher.update(data)
        digests.append(hasher.hexdigest())
    return digests


def _find_present(txn, dbs, digests):
    """Return the set of ``digests`` whose blobs are in the index with the same size."""
    present = set()
    for digest in digests:
        record = cas_layout.read_record(txn, dbs, digest.key)
        if record is not None and record.size_bytes == digest.size_bytes:
            present.add(digest)
    return present


def _read_verified(txn, dbs, digests):
    """Read and verify whole blobs inside one read transaction.

    Returns a dict from each digest to its ``bytes``, to None when it is absent, or to a
    ``_Corrupt`` when its chunks are damaged or do not hash to the digest.
    """
    found = {}
    for digest in digests:
        record = cas_layout.read_record(txn, dbs, digest.key)
        if record is None or record.size_bytes != digest.size_bytes:
            found[digest] = None
            continue

        data = cas_layout.read_range(txn, dbs, record.blob_id, 0, record.size_bytes)
        if data is None or _hash_all([data])[0] != digest.hash:
            found[digest] = _Corrupt(record.blob_id)
        else:
            found[digest] = data
    return found


def _read_record(txn, dbs, key):
    return cas_layout.read_record(txn, dbs, key)


@implementer(IBlobStore)
class LmdbBlobStore:
    """A content-addressable store of blobs in an ``LmdbEnvironment``.

    Blobs are split into chunks of ``cas_layout.CHUNK_SIZE`` bytes and become visible
    when their index record is written (see ``cas_layout``). Every read of a whole blob
    checks its SHA-256, and a blob that fails is deleted and reported as
    ``CorruptBlobError``. Access times of found and read blobs are kept in memory and
    written in one transaction every ``access_flush_interval`` seconds and at stop.
    ``stored_bytes`` is the total size of the stored blobs, kept in the database in the
    same transactions that add or delete blobs.
    """

    log = Logger()

    DATABASE_NAMES = cas_layout.DATABASE_NAMES

    def __init__(self, environment, clock, access_flush_interval=DEFAULT_ACCESS_FLUSH_INTERVAL):
        """Describe the store. ``start`` opens it.

        ``environment`` is an ``LmdbEnvironment`` opened with ``DATABASE_NAMES``,
        ``clock`` an ``IReactorTime`` that gives access times and drives the flush, and
        ``access_flush_interval`` is in seconds.
        """
        self.stored_bytes = 0
        self._environment = environment
        self._clock = clock
        self._access_flush_interval = access_flush_interval
        self._dbs = None
        self._accessed = {}
        self._flush_loop = None

    def start(self):
        """Delete the uploads that a crash left unfinished and start the access-time flush.

        Call it after the environment has started. Returns a Deferred firing with None
        once the cleanup is committed. Requests may be made before that: the cleanup is
        the first queued write and unfinished uploads are never visible.
        """
        self._dbs = CasDatabases.of(self._environment)

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
        uploads, chunks = cas_layout.delete_pending_uploads(txn, self._dbs)
        return uploads, chunks, cas_layout.read_stored_bytes(txn, self._dbs)

    def _recovered(self, outcome):
        uploads, chunks, stored_bytes = outcome
        if uploads:
            self.log.info(
                "deleted {uploads} unfinished uploads ({chunks} chunks) left by an earlier run",
                uploads=uploads,
                chunks=chunks,
            )
        self.stored_bytes = stored_bytes
        self.log.info("CAS started with {stored_bytes} bytes of blobs", stored_bytes=stored_bytes)

    # Queries.

    def find_missing(self, digests):
        unique = list(dict.fromkeys(digests))
        lookups = [digest for digest in unique if digest != EMPTY_DIGEST]
        if not lookups:
            return defer.succeed([])

        def report(present):
            self._record_access(digest.key for digest in present)
            return [digest for digest in lookups if digest not in present]

        return self._environment.read(_find_present, self._dbs, lookups).addCallback(report)

    def get(self, digest):
        def unwrap(results):
            if isinstance(results[0], Exception):
                raise results[0]
            return results[0]

        return self.get_many([digest]).addCallback(unwrap)

    def get_many(self, digests):
        digests = list(digests)
        lookups = list(dict.fromkeys(digest for digest in digests if digest != EMPTY_DIGEST))
        if not lookups:
            return defer.succeed([b"" for _ in digests])

        reading = self._environment.read(_read_verified, self._dbs, lookups)
        return reading.addCallback(self._blobs_read, digests)

    def _blobs_read(self, found, digests):
        self._record_access(digest.key for digest, data in found.items() if isinstance(data, bytes))
        drops = [
            self._drop_corrupt_blob(digest, data.blob_id)
            for digest, data in found.items()
            if isinstance(data, _Corrupt)
        ]

        def assemble(_):
            results = []
            for digest in digests:
                data = b"" if digest == EMPTY_DIGEST else found[digest]
                if data is None:
                    results.append(BlobNotFoundError(digest))
                elif isinstance(data, _Corrupt):
                    results.append(CorruptBlobError(digest))
                else:
                    results.append(data)
            return results

        return defer.gatherResults(drops).addCallback(assemble)

    # Uploads.

    def put(self, digest, data):
        def unwrap(results):
            if results[0] is not None:
                raise results[0]

        return self.put_many([(digest, data)]).addCallback(unwrap)

    def put_many(self, blobs):
        """Store ``(digest, data)`` pairs as ``IBlobStore.put_many`` describes.

        The data must not change until the returned Deferred fires. All valid blobs are
        written in one group transaction.
        """
        blobs = list(blobs)
        to_hash = [data if len(data) == digest.size_bytes else None for digest, data in blobs]
        if sum(len(data) for data in to_hash if data is not None) <= INLINE_HASH_LIMIT:
            hashing = defer.succeed(_hash_all(to_hash))
        else:
            hashing = self._environment.run_in_pool(_hash_all, to_hash)
        return hashing.addCallback(self._store_hashed, blobs)

    def _store_hashed(self, actual_hashes, blobs):
        results = [None] * len(blobs)
        now = int(self._clock.seconds())
        operations = []
        positions = []
        for position, ((digest, data), actual_hash) in enumerate(zip(blobs, actual_hashes)):
            if len(data) != digest.size_bytes:
                results[position] = DigestMismatchError(
                    f"blob {digest}: the data has {len(data)} bytes, "
                    f"expected {digest.size_bytes}"
                )
            elif actual_hash != digest.hash:
                results[position] = DigestMismatchError(
                    f"blob {digest}: the data has SHA-256 {actual_hash}"
                )
            elif digest != EMPTY_DIGEST:
                operations.append(self._insert_operation(digest, data, now))
                positions.append(position)

        def settle(outcome, position):
            results[position] = outcome

        writes = self._environment.write_many(operations)
        for position, writing in zip(positions, writes):
            digest = blobs[position][0]
            writing.addCallbacks(
                self._blob_inserted,
                self._blob_failed,
                callbackArgs=(digest,),
                errbackArgs=(digest,),
            )
            writing.addCallback(settle, position)
        return defer.gatherResults(writes).addCallback(lambda _: results)

    def _insert_operation(self, digest, data, now):
        dbs = self._dbs
        key = digest.key

        def insert_blob(txn):
            if cas_layout.read_record(txn, dbs, key) is not None:
                return None
            blob_id = cas_layout.allocate_blob_id(txn, dbs)
            cas_layout.put_chunks(txn, dbs, blob_id, data)
            return cas_layout.insert_blob(txn, dbs, key, IndexRecord(len(data), blob_id, now))

        return insert_blob

    def _blob_inserted(self, stored_bytes, digest):
        if stored_bytes is None:
            self._record_access([digest.key])
        else:
            self._set_stored_bytes(stored_bytes)
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
            opening = defer.succeed(None)
        else:
            opening = self._environment.read(_read_record, self._dbs, digest.key)
        return opening.addCallback(self._reader_opened, digest, offset, limit)

    def _reader_opened(self, record, digest, offset, limit):
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
        return LmdbBlobReader(self, digest, record, offset, end)

    def open_writer(self, digest):
        # NOTE: a writer that is neither committed nor aborted keeps its chunks until the
        # next start, so callers must abort every writer they do not commit.
        return LmdbBlobWriter(self, digest)

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
        now = int(self._clock.seconds())
        for key in keys:
            self._accessed[key] = now

    # Access times.

    def flush_access_times(self):
        """Write the access times recorded in memory since the last flush.

        Returns a Deferred firing with the number of index records changed.
        """
        if not self._accessed:
            return defer.succeed(0)

        accessed, self._accessed = self._accessed, {}
        dbs = self._dbs

        def write_access_times(txn):
            return cas_layout.update_access_times(txn, dbs, accessed)

        return self._environment.write(write_access_times)

    def _flush_access_times_logging_errors(self):
        # Access times only guide eviction, so a failed flush is logged and dropped rather
        # than stopping the loop.
        count = len(self._accessed)
        flushing = self.flush_access_times()
        flushing.addErrback(
            lambda failure: self.log.failure(
                "failed to write {count} blob access times", failure, count=count
            )
        )
        return flushing
