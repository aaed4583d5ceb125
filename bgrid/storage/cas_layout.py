"""The layout of the content-addressable store in LMDB, as functions that run inside a
transaction.

Four named databases hold the store:

- ``cas-index`` maps the 32 raw SHA-256 bytes of a blob to its packed ``IndexRecord``.
  A blob is visible exactly when its index record exists.
- ``cas-chunks`` maps a blob id (8 bytes, big-endian) followed by a chunk number (4 bytes,
  big-endian) to at most ``CHUNK_SIZE`` bytes of the blob. Big-endian keys keep the
  chunks of one blob adjacent and in order.
- ``cas-pending`` maps the blob id of each streamed upload in progress to its start time,
  so that chunks left behind by a crash can be found and deleted.
- ``cas-meta`` contains counters: the next blob id and the total size of stored blobs.

The index record of a blob is written in the same transaction as its last chunk or after
it, so a crash never exposes a partial blob.
"""

import struct
from typing import NamedTuple

CHUNK_SIZE = 1 << 20

INDEX_DATABASE = b"cas-index"
CHUNKS_DATABASE = b"cas-chunks"
PENDING_DATABASE = b"cas-pending"
META_DATABASE = b"cas-meta"
DATABASE_NAMES = (INDEX_DATABASE, CHUNKS_DATABASE, PENDING_DATABASE, META_DATABASE)

_NEXT_BLOB_ID_KEY = b"next-blob-id"
_STORED_BYTES_KEY = b"stored-bytes"
_UINT64 = struct.Struct(">Q")
_CHUNK_KEY = struct.Struct(">QI")
_BLOB_ID = struct.Struct(">Q")

# size_bytes, blob_id, accessed_at, flags. Readers use unpack_from, so later versions may
# append fields without breaking older records.
_RECORD = struct.Struct(">QQQI")


class IndexRecord(NamedTuple):
    """The index entry of a stored blob.

    ``accessed_at`` is in whole seconds since the epoch. ``flags`` is reserved and 0.
    """

    size_bytes: int
    blob_id: int
    accessed_at: int
    flags: int = 0

    def pack(self):
        return _RECORD.pack(self.size_bytes, self.blob_id, self.accessed_at, self.flags)

    @classmethod
    def unpack(cls, data):
        return cls(*_RECORD.unpack_from(data))


class CasDatabases(NamedTuple):
    """The handles of the four named databases of the store."""

    index: object
    chunks: object
    pending: object
    meta: object

    @classmethod
    def of(cls, environment):
        """Return the handles opened by a started ``LmdbEnvironment``."""
        return cls(*(environment.database(name) for name in DATABASE_NAMES))


def chunk_key(blob_id, number):
    """Return the ``cas-chunks`` key of chunk ``number`` of blob ``blob_id``."""
    return _CHUNK_KEY.pack(blob_id, number)


def read_record(txn, dbs, key):
    """Return the ``IndexRecord`` stored under the raw hash ``key``, or None."""
    data = txn.get(key, db=dbs.index)
    if data is None:
        return None
    return IndexRecord.unpack(data)


def allocate_blob_id(txn, dbs):
    """Return a blob id never handed out before in this database, starting at 1."""
    data = txn.get(_NEXT_BLOB_ID_KEY, db=dbs.meta)
    blob_id = _UINT64.unpack(data)[0] if data is not None else 1
    txn.put(_NEXT_BLOB_ID_KEY, _UINT64.pack(blob_id + 1), db=dbs.meta)
    return blob_id


def read_stored_bytes(txn, dbs):
    """Return the total size in bytes of the blobs in the index."""
    data = txn.get(_STORED_BYTES_KEY, db=dbs.meta)
    return _UINT64.unpack(data)[0] if data is not None else 0


def add_stored_bytes(txn, dbs, delta):
    """Add ``delta`` (negative to subtract) to the stored total and return the new total."""
    total = read_stored_bytes(txn, dbs) + delta
    if total < 0:
        raise ValueError(f"stored-bytes counter would become negative ({total})")
    txn.put(_STORED_BYTES_KEY, _UINT64.pack(total), db=dbs.meta)
    return total


def put_chunks(txn, dbs, blob_id, data, first_number=0):
    """Store ``data`` as consecutive chunks of ``blob_id`` numbered from ``first_number``.

    Returns the number of chunks written. ``data`` may be any bytes-like object. Only
    its last chunk may be shorter than ``CHUNK_SIZE``.
    """
    view = memoryview(data)
    number = first_number
    for start in range(0, len(view), CHUNK_SIZE):
        txn.put(chunk_key(blob_id, number), view[start : start + CHUNK_SIZE], db=dbs.chunks)
        number += 1
    return number - first_number


def read_range(txn, dbs, blob_id, offset, length):
    """Return ``length`` bytes of blob ``blob_id`` from ``offset`` as a new ``bytes``.

    Returns None when a chunk in the range is missing or shorter than the range needs,
    which means the blob was deleted or is damaged.
    """
    pieces = []
    position = offset
    end = offset + length
    while position < end:
        number, start = divmod(position, CHUNK_SIZE)
        chunk = txn.get(chunk_key(blob_id, number), db=dbs.chunks)
        if chunk is None:
            return None

        take = min(CHUNK_SIZE - start, end - position)
        piece = chunk[start : start + take]
        if len(piece) != take:
            return None
        pieces.append(piece)
        position += take

    return b"".join(pieces)


def delete_chunks(txn, dbs, blob_id):
    """Delete every chunk of ``blob_id`` and return how many there were."""
    prefix = _BLOB_ID.pack(blob_id)
    deleted = 0
    with txn.cursor(db=dbs.chunks) as cursor:
        found = cursor.set_range(prefix)
        while found and bytes(cursor.key()[: len(prefix)]) == prefix:
            found = cursor.delete()
            deleted += 1
    return deleted


def insert_blob(txn, dbs, key, record):
    """Write the index record of a blob whose chunks are stored, making it visible.

    Returns the new stored total in bytes.
    """
    txn.put(key, record.pack(), db=dbs.index)
    return add_stored_bytes(txn, dbs, record.size_bytes)


def delete_blob(txn, dbs, key, blob_id):
    """Delete the blob under ``key`` if its index record still names ``blob_id``.

    The id check keeps a blob that was deleted and uploaded again since the caller read
    its record. Returns the new stored total in bytes, or None when nothing was deleted.
    """
    record = read_record(txn, dbs, key)
    if record is None or record.blob_id != blob_id:
        return None
    txn.delete(key, db=dbs.index)
    delete_chunks(txn, dbs, blob_id)
    return add_stored_bytes(txn, dbs, -record.size_bytes)


def start_pending_upload(txn, dbs, blob_id, started_at):
    """Record that chunks of ``blob_id`` are being written, at ``started_at`` seconds."""
    txn.put(_BLOB_ID.pack(blob_id), _UINT64.pack(int(started_at)), db=dbs.pending)


def finish_pending_upload(txn, dbs, blob_id):
    """Remove the pending-upload entry of ``blob_id`` once its chunks belong to a blob or
    have been deleted."""
    txn.delete(_BLOB_ID.pack(blob_id), db=dbs.pending)


def delete_pending_uploads(txn, dbs):
    """Delete every pending upload with its chunks.

    Returns the number of uploads and of chunks deleted.
    """
    with txn.cursor(db=dbs.pending) as cursor:
        blob_ids = [_BLOB_ID.unpack(key)[0] for key in cursor.iternext(values=False)]

    chunks = 0
    for blob_id in blob_ids:
        chunks += delete_chunks(txn, dbs, blob_id)
        finish_pending_upload(txn, dbs, blob_id)
    return len(blob_ids), chunks


def update_access_times(txn, dbs, accessed):
    """Raise the ``accessed_at`` of blobs to the times in ``accessed`` (raw hash ->
    seconds).

    Blobs deleted since their access are skipped, and a time never moves backwards.
    Returns the number of records changed.
    """
    changed = 0
    for key, accessed_at in accessed.items():
        record = read_record(txn, dbs, key)
        if record is None or record.accessed_at >= accessed_at:
            continue
        txn.put(key, record._replace(accessed_at=accessed_at).pack(), db=dbs.index)
        changed += 1
    return changed
