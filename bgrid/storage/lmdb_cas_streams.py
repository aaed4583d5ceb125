"""The streamed reader and writer of ``LmdbBlobStore``, which move a blob through the store
one chunk-sized piece at a time."""

import collections

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from bgrid.digest import new_hasher
from bgrid.errors import (
    BlobNotFoundError,
    CancelledError,
    CorruptBlobError,
    DigestMismatchError,
    UnavailableError,
)
from bgrid.interfaces import IBlobReader, IBlobWriter
from bgrid.storage import cas_layout
from bgrid.storage.cas_layout import CHUNK_SIZE, IndexRecord

# The number of buffered bytes above which ``write`` returns a Deferred that fires only
# once the writer has hashed and stored enough chunks to come back under it.
MAX_BUFFERED_BYTES = CHUNK_SIZE

_READ_OK, _READ_CORRUPT, _READ_DELETED = "ok", "corrupt", "deleted"


class _Event:
    """A one-shot event that any number of callers can wait for."""

    def __init__(self):
        self.fired = False
        self._waiters = []

    def wait(self):
        if self.fired:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def fire(self):
        self.fired = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


def _read_piece(txn, dbs, key, blob_id, offset, length, hasher, digest, is_last):
    """Read one piece of a blob inside a read transaction, feeding ``hasher`` if given.

    Returns ``(status, data)``: ``_READ_OK`` with the bytes, ``_READ_DELETED`` when the
    blob was deleted since the reader opened, or ``_READ_CORRUPT`` when the index still
    names the blob but its chunks are damaged or, on the last piece, the hash differs.
    """
    data = cas_layout.read_range(txn, dbs, blob_id, offset, length)
    if data is None:
        record = cas_layout.read_record(txn, dbs, key)
        if record is not None and record.blob_id == blob_id:
            return _READ_CORRUPT, None
        return _READ_DELETED, None

    if hasher is not None:
        hasher.update(data)
        if is_last and hasher.hexdigest() != digest.hash:
            return _READ_CORRUPT, None
    return _READ_OK, data


@implementer(IBlobReader)
class LmdbBlobReader:
    """A reader over the byte range ``[offset, end)`` of a blob stored in an
    ``LmdbBlobStore``.

    Each ``read`` is one short read transaction, so no transaction stays open between
    calls. When the range is the whole blob, the reader hashes the data as it
    goes and fails the last read with ``CorruptBlobError`` (after dropping the blob) if
    the hash differs. Call ``read`` again only after the previous Deferred has fired.
    The blob stays pinned against eviction until the reader is closed, reaches the end
    of its range or fails.
    """

    def __init__(self, store, digest, record, offset, end, pin=None):
        self.digest = digest
        self.size = digest.size_bytes
        self._store = store
        self._pin = pin
        self._blob_id = record.blob_id if record is not None else None
        self._position = offset
        self._end = end
        self._hasher = new_hasher() if offset == 0 and end == self.size else None
        self._reading = False
        self._closed = False

    def read(self, max_bytes):
        """Return a Deferred firing with the next at most ``max_bytes`` bytes, or ``b""``
        at the end of the range."""
        if max_bytes <= 0:
            return defer.fail(ValueError(f"max_bytes must be positive, got {max_bytes}"))
        if self._closed:
            return defer.fail(ValueError(f"reader of {self.digest} is closed"))
        if self._reading:
            return defer.fail(ValueError(f"read of {self.digest} before the previous one ended"))
        if self._position == self._end:
            self._unpin()
            return defer.succeed(b"")

        length = min(max_bytes, self._end - self._position)
        is_last = self._position + length == self._end
        self._reading = True
        reading = self._store._environment.read(
            _read_piece,
            self._store._dbs,
            self.digest.key,
            self._blob_id,
            self._position,
            length,
            self._hasher,
            self.digest,
            is_last,
        )
        return reading.addBoth(self._piece_read)

    def _piece_read(self, outcome):
        self._reading = False
        if isinstance(outcome, Failure):
            self._unpin()
            return outcome

        status, data = outcome
        if status == _READ_DELETED:
            self._unpin()
            raise BlobNotFoundError(self.digest)
        if status == _READ_CORRUPT:
            self._closed = True
            self._unpin()
            dropping = self._store._drop_corrupt_blob(self.digest, self._blob_id)
            return dropping.addCallback(self._raise_corrupt)

        self._position += len(data)
        return data

    def _raise_corrupt(self, _):
        raise CorruptBlobError(self.digest)

    def close(self):
        """Release the reader and its pin. Later reads fail with ``ValueError``."""
        self._closed = True
        self._unpin()

    def _unpin(self):
        if self._pin is not None:
            self._store.unpin(self._pin)
            self._pin = None


_OPEN, _COMMITTING, _COMMITTED, _ABORTED, _FAILED = (
    "open",
    "committing",
    "committed",
    "aborted",
    "failed",
)


@implementer(IBlobWriter)
class LmdbBlobWriter:
    """A streamed upload into an ``LmdbBlobStore``.

    Full chunks are hashed in order, one at a time (on a pool thread when large), and
    each hashed chunk is queued for the writer thread at once, so hashing, receiving and
    committing overlap. The chunks are stored under a fresh blob id that the first
    chunk's transaction allocates and records as a pending upload, so a crash leaves
    nothing visible and the next start deletes the chunks. Later chunks wait for that
    transaction, because they need the id. At most about ``MAX_BUFFERED_BYTES`` are held
    in memory while callers wait for ``write``'s Deferreds. ``commit`` stores the last
    partial chunk, the index record and the end of the pending upload in one
    transaction, evicting other blobs first when the quota requires. A blob larger than
    the quota fails its first ``write`` or ``commit`` with ``ResourceExhaustedError``.
    """

    log = Logger()

    def __init__(self, store, digest):
        self.digest = digest
        self.committed_size = 0
        self._store = store
        self._state = _OPEN
        self._error = None
        self._partial = bytearray()
        # Full chunks waiting to be hashed, and hashed chunks waiting to be queued for
        # the writer thread.
        self._unhashed_chunks = collections.deque()
        self._hashed_chunks = collections.deque()
        self._buffered = 0
        self._hashing = False
        self._chunk_writes = 0
        self._blob_id = None
        self._chunks_queued = 0
        self._hasher = new_hasher()
        self._started_at = store._clock.seconds()
        self._room_waiters = []
        self._idle = _Event()
        self._idle.fire()
        self._discarded = None

        too_large = store._check_fits(digest)
        if too_large is not None:
            self._state = _FAILED
            self._error = too_large

    def write(self, data):
        """Append ``data`` and return a Deferred firing once the buffer has room again.

        Fails with ``DigestMismatchError`` (and discards the upload) when the data would
        exceed the digest's size. A ``bytes`` object may be kept as it is, and any
        other buffer is copied, so the caller may reuse it.
        """
        if self._state != _OPEN:
            return defer.fail(self._closed_error())

        size = self.committed_size + len(data)
        if size > self.digest.size_bytes:
            error = DigestMismatchError(
                f"upload of {self.digest} exceeds its size: {size} bytes received, "
                f"expected {self.digest.size_bytes}"
            )
            self._fail(error)
            return defer.fail(error)

        self.committed_size = size
        self._buffered += len(data)
        self._split_into_chunks(data)
        self._pump()

        if self._buffered <= MAX_BUFFERED_BYTES:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._room_waiters.append(waiter)
        return waiter

    def commit(self):
        """Check size and SHA-256 and make the blob visible.

        Returns a Deferred firing with None. Fails with ``DigestMismatchError`` when the
        size or hash differs and with ``ResourceExhaustedError`` when the store is full
        and eviction cannot make room. In both cases the written chunks are deleted.
        """
        if self._state != _OPEN:
            return defer.fail(self._closed_error())
        if self.committed_size != self.digest.size_bytes:
            error = DigestMismatchError(
                f"upload of {self.digest} ended after {self.committed_size} bytes, "
                f"expected {self.digest.size_bytes}"
            )
            self._fail(error)
            return defer.fail(error)

        self._state = _COMMITTING
        last_chunk = bytes(self._partial)
        self._partial = bytearray()

        committing = self._idle.wait()
        committing.addCallback(self._hash_last_chunk, last_chunk)
        committing.addCallback(self._store_index_record, last_chunk)
        return committing

    def abort(self):
        """Discard the upload and return a Deferred firing once its chunks are deleted.

        Has no effect once ``commit`` has been called, unless the commit failed.
        """
        if self._state in (_COMMITTING, _COMMITTED):
            return defer.succeed(None)
        if self._state == _OPEN:
            self._state = _ABORTED
            self._error = CancelledError(f"upload of {self.digest} was aborted")
            self._drop_buffers()
        return self._discard_when_idle()

    def _closed_error(self):
        if self._error is not None:
            return self._error
        return ValueError(f"upload of {self.digest} is already committed or committing")

    def _split_into_chunks(self, data):
        view = memoryview(data)
        if self._partial:
            room = CHUNK_SIZE - len(self._partial)
            self._partial += view[:room]
            view = view[room:]
            if len(self._partial) < CHUNK_SIZE:
                return
            self._unhashed_chunks.append(bytes(self._partial))
            self._partial = bytearray()

        if len(view) == CHUNK_SIZE and isinstance(data, bytes):
            # A request of exactly one chunk, as clients usually send, is kept uncopied.
            self._unhashed_chunks.append(data)
            return
        while len(view) >= CHUNK_SIZE:
            self._unhashed_chunks.append(bytes(view[:CHUNK_SIZE]))
            view = view[CHUNK_SIZE:]
        self._partial = bytearray(view)

    # The pump: hashes full chunks one at a time, in order, and queues each hashed chunk
    # for the writer thread.

    def _pump(self):
        if self._state not in (_OPEN, _COMMITTING):
            if not self._hashing and not self._chunk_writes:
                self._idle.fire()
            return

        if not self._hashing and self._unhashed_chunks:
            self._hashing = True
            chunk = self._unhashed_chunks.popleft()
            hashing = self._store._update_hasher(self._hasher, chunk)
            hashing.addCallbacks(self._chunk_hashed, self._hash_failed, callbackArgs=(chunk,))

        # The first chunk's transaction allocates the blob id that later chunks need.
        while self._hashed_chunks and (self._blob_id is not None or not self._chunk_writes):
            self._queue_chunk_write(self._hashed_chunks.popleft())
            if self._blob_id is None:
                break

        if self._hashing or self._chunk_writes or self._unhashed_chunks or self._hashed_chunks:
            if self._idle.fired:
                self._idle = _Event()
        else:
            self._idle.fire()

    def _chunk_hashed(self, _, chunk):
        self._hashing = False
        if self._state in (_OPEN, _COMMITTING):
            self._hashed_chunks.append(chunk)
        self._pump()

    def _queue_chunk_write(self, chunk):
        self._chunk_writes += 1
        operation = self._chunk_operation(chunk, self._chunks_queued)
        self._chunks_queued += 1
        writing = self._store._environment.write(operation, len(chunk))
        writing.addCallbacks(self._chunk_stored, self._write_failed, callbackArgs=(len(chunk),))

    def _chunk_operation(self, chunk, number):
        dbs = self._store._dbs
        blob_id = self._blob_id
        started_at = self._started_at

        def store_chunk(txn):
            chunk_blob_id = blob_id
            if chunk_blob_id is None:
                chunk_blob_id = cas_layout.allocate_blob_id(txn, dbs)
                cas_layout.start_pending_upload(txn, dbs, chunk_blob_id, started_at)
            txn.put(cas_layout.chunk_key(chunk_blob_id, number), chunk, db=dbs.chunks)
            return chunk_blob_id

        return store_chunk

    def _chunk_stored(self, blob_id, size):
        self._chunk_writes -= 1
        self._blob_id = blob_id
        self._buffered -= size

        if self._buffered <= MAX_BUFFERED_BYTES:
            waiters, self._room_waiters = self._room_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._pump()

    def _hash_failed(self, failure):
        self._hashing = False
        self._fail(failure.value)
        self._pump()

    def _write_failed(self, failure):
        self._chunk_writes -= 1
        self._fail(failure.value)
        self._pump()

    # Commit.

    def _hash_last_chunk(self, _, last_chunk):
        if self._state != _COMMITTING:
            raise self._error
        return self._store._update_hasher(self._hasher, last_chunk)

    def _store_index_record(self, _, last_chunk):
        if self._state != _COMMITTING:
            raise self._error

        actual = self._hasher.hexdigest()
        if actual != self.digest.hash:
            error = DigestMismatchError(
                f"uploaded data does not match digest {self.digest}: its SHA-256 is {actual}"
            )
            self._fail(error)
            raise error

        if self.digest.size_bytes == 0:
            self._state = _COMMITTED
            return None

        storing = self._store._environment.write(
            self._commit_operation(last_chunk), len(last_chunk)
        )
        return storing.addCallbacks(self._committed, self._commit_failed)

    def _commit_operation(self, last_chunk):
        store = self._store
        dbs = store._dbs
        digest = self.digest
        key = digest.key
        blob_id = self._blob_id
        number = self._chunks_queued
        record = IndexRecord(self.digest.size_bytes, 0, int(self._store._clock.seconds()))

        def commit_blob(txn):
            if cas_layout.read_record(txn, dbs, key) is not None:
                if blob_id is not None:
                    cas_layout.delete_chunks(txn, dbs, blob_id)
                    cas_layout.finish_pending_upload(txn, dbs, blob_id)
                return None

            chunk_blob_id = blob_id
            if chunk_blob_id is None:
                chunk_blob_id = cas_layout.allocate_blob_id(txn, dbs)
            if last_chunk:
                txn.put(cas_layout.chunk_key(chunk_blob_id, number), last_chunk, db=dbs.chunks)
            if blob_id is not None:
                cas_layout.finish_pending_upload(txn, dbs, blob_id)
            return store._insert_within_quota(
                txn, digest, record._replace(blob_id=chunk_blob_id)
            )

        return commit_blob

    def _committed(self, inserted):
        self._state = _COMMITTED
        self._store._blob_inserted(inserted, self.digest)

    def _commit_failed(self, failure):
        self._fail(failure.value)
        return failure

    # Failure and cleanup.

    def _fail(self, error):
        """End the upload with ``error``: later calls fail with it and the written
        chunks are deleted."""
        if self._state not in (_OPEN, _COMMITTING):
            return
        self._state = _FAILED
        self._error = error
        self._drop_buffers()
        self._discard_when_idle()

    def _drop_buffers(self):
        self._partial = bytearray()
        self._unhashed_chunks.clear()
        self._hashed_chunks.clear()
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            waiter.errback(self._error)

    def _discard_when_idle(self):
        if self._discarded is None:
            self._discarded = _Event()
            self._idle.wait().addCallback(lambda _: self._discard())
        return self._discarded.wait()

    def _discard(self):
        if self._blob_id is None:
            self._discarded.fire()
            return

        dbs = self._store._dbs
        blob_id = self._blob_id

        def delete_upload(txn):
            cas_layout.delete_chunks(txn, dbs, blob_id)
            cas_layout.finish_pending_upload(txn, dbs, blob_id)

        deleting = self._store._environment.write(delete_upload)
        deleting.addErrback(self._log_discard_failure, blob_id)
        deleting.addBoth(lambda _: self._discarded.fire())

    def _log_discard_failure(self, failure, blob_id):
        if failure.check(UnavailableError):
            self.log.info(
                "storage stopped before upload {blob_id} of {digest} was deleted, "
                "so the next start deletes it",
                blob_id=blob_id,
                digest=str(self.digest),
            )
            return
        self.log.failure(
            "failed to delete the chunks of upload {blob_id} of {digest}, "
            "so the next start deletes them",
            failure,
            blob_id=blob_id,
            digest=str(self.digest),
        )
