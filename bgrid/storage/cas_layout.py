"""The layout of the content-addressable store in LMDB, as functions that run inside a
transaction.

Five named databases hold the store:

- ``cas-index`` maps the 32 raw SHA-256 bytes of a blob to its packed ``IndexRecord``.
  A blob is visible exactly when its index record exists.
- ``cas-chunks`` maps a blob id (8 bytes, big-endian) followed by a chunk number (4 bytes,
  big-endian) to at most ``CHUNK_SIZE`` bytes of the blob. Big-endian keys keep the
  chunks of one blob adjacent and in order.
- ``cas-pending`` maps the blob id of each streamed upload in progress to its start time,
  so that chunks left behind by a crash can be found and deleted.
- ``cas-meta`` contains counters: the next blob id and the total size of stored blobs.
- ``cas-lru`` has one empty-valued key per index record: the record's ``accessed_at``
  (8 bytes, big-endian) followed by the raw hash, so a cursor walks blobs from the least
  recently used. Every function here that writes an index record or its access time
  keeps this key in step within the same transaction.

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
LRU_DATABASE = b"cas-lru"
DATABASE_NAMES = (
    INDEX_DATABASE,
    CHUNKS_DATABASE,
    PENDING_DATABASE,
    META_DATABASE,
    LRU_DATABASE,
)

_NEXT_BLOB_ID_KEY = b"next-blob-id"
_STORED_BYTES_KEY = b"stored-bytes"
_UINT64 = struct.Struct(">Q")
_CHUNK_KEY = struct.Struct(">QI")
_BLOB_ID = struct.Struct(">Q")

# size_bytes, blob_id, accessed_at, flags. Readers use unpack_from, so later versions may
# append fields without breaking older records.
_RECORD = struct.Struct(">QQQI")
# The size_bytes and blob_id at the start of a packed record.
_RECORD_HEAD = struct.Struct(">QQ")

# The number of blobs that ``evict_lru`` deletes between two calls of its ``is_enough``.
ENOUGH_CHECK_INTERVAL = 16


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
    """The handles of the five named databases of the store."""

    index: object
    chunks: object
    pending: object
    meta: object
    lru: object

    @classmethod
    def of(cls, environment):
        """Return the handles opened by a started ``LmdbEnvironment``."""
        return cls(*(environment.database(name) for name in DATABASE_NAMES))


class Eviction(NamedTuple):
    """The blobs and bytes that one ``evict_lru`` call deleted, and the stored total
    after it."""

    blobs: int
    freed_bytes: int
    stored_bytes: int


def lru_key(accessed_at, key):
    """Return the ``cas-lru`` key of the blob under raw hash ``key``."""
    return _UINT64.pack(accessed_at) + key


def chunk_key(blob_id, number):
    """Return the ``cas-chunks`` key of chunk ``number`` of blob ``blob_id``."""
    return _CHUNK_KEY.pack(blob_id, number)


def read_record(txn, dbs, key):
    """Return the ``IndexRecord`` stored under the raw hash ``key``, or None."""
    data = txn.get(key, db=dbs.index)
    if data is None:
        return None
    return IndexRecord.unpack(data)


def find_stored(txn, dbs, keys, sizes):
    """Return, for each raw hash in ``keys``, whether the index has it with the size at
    the same position of ``sizes``."""
    stored = []
    unpack_record = _RECORD.unpack_from
    with txn.cursor(db=dbs.index) as cursor:
        set_key = cursor.set_key
        value = cursor.value
        for key, size_bytes in zip(keys, sizes):
            stored.append(set_key(key) and unpack_record(value())[0] == size_bytes)
    return stored


def allocate_blob_id(txn, dbs):
    """Return a blob id never handed out before in this database, starting at 1."""
    data = txn.get(_NEXT_BLOB_ID_KEY, db=dbs.meta)
    blob_id = _UINT64.unpack(data)[0] if data is not None else 1
    txn.put(_NEXT_BLOB_ID_KEY, _UINT64.pack(blob_id + 1), db=dbs.meta)
    return blob_id


def allocate_blob_ids(txn, dbs, count):
    """Return the first of ``count`` consecutive blob ids never handed out before."""
    data = txn.get(_NEXT_BLOB_ID_KEY, db=dbs.meta)
    first = _UINT64.unpack(data)[0] if data is not None else 1
    txn.put(_NEXT_BLOB_ID_KEY, _UINT64.pack(first + count), db=dbs.meta)
    return first


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


def read_blob(txn, dbs, key, size_bytes):
    """Return ``(blob_id, data)`` of the whole blob under the raw hash ``key``, or None
    when the index has no record of it with ``size_bytes``.

    ``data`` is a new ``bytes``, or None when a chunk is missing or too short, as in
    ``read_range``. Does what ``read_record`` and ``read_range`` do together, with one
    get per database and one copy for a blob of a single chunk.
    """
    get = txn.get
    value = get(key, db=dbs.index)
    if value is None:
        return None
    stored_size, blob_id = _RECORD_HEAD.unpack_from(value)
    if stored_size != size_bytes:
        return None
    if size_bytes > CHUNK_SIZE:
        return blob_id, read_range(txn, dbs, blob_id, 0, size_bytes)
    if size_bytes == 0:
        return blob_id, b""

    chunk = get(_CHUNK_KEY.pack(blob_id, 0), db=dbs.chunks)
    if chunk is None or len(chunk) < size_bytes:
        return blob_id, None
    if len(chunk) > size_bytes:
        chunk = chunk[:size_bytes]
    return blob_id, bytes(chunk)


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
    txn.put(lru_key(record.accessed_at, key), b"", db=dbs.lru)
    return add_stored_bytes(txn, dbs, record.size_bytes)


def insert_new_blobs(txn, dbs, blobs, accessed_at, max_stored_bytes=None):
    """Store each ``(raw hash, data)`` of ``blobs`` whose hash is not in the index yet,
    with its chunks, index record and ``cas-lru`` key, and update the stored total once.

    Returns ``(inserted, stored_bytes)``: whether each blob was inserted (False for a
    blob stored already or earlier in ``blobs``) and the new stored total. Returns None
    and writes nothing when the new blobs would take the stored total above
    ``max_stored_bytes``.
    """
    index = dbs.index
    get = txn.get
    new_blobs = {}
    inserted = []
    for key, data in blobs:
        is_new = key not in new_blobs and get(key, db=index) is None
        if is_new:
            new_blobs[key] = data
        inserted.append(is_new)

    stored_bytes = read_stored_bytes(txn, dbs)
    if not new_blobs:
        return inserted, stored_bytes
    stored_bytes += sum(map(len, new_blobs.values()))
    if max_stored_bytes is not None and stored_bytes > max_stored_bytes:
        return None

    put = txn.put
    lru = dbs.lru
    lru_prefix = _UINT64.pack(accessed_at)
    first_blob_id = allocate_blob_ids(txn, dbs, len(new_blobs))
    for blob_id, (key, data) in enumerate(new_blobs.items(), first_blob_id):
        put_chunks(txn, dbs, blob_id, data)
        put(key, _RECORD.pack(len(data), blob_id, accessed_at, 0), db=index)
        put(lru_prefix + key, b"", db=lru)
    txn.put(_STORED_BYTES_KEY, _UINT64.pack(stored_bytes), db=dbs.meta)
    return inserted, stored_bytes


def delete_blob(txn, dbs, key, blob_id):
    """Delete the blob under ``key`` if its index record still names ``blob_id``.

    The id check keeps a blob that was deleted and uploaded again since the caller read
    its record. Returns the new stored total in bytes, or None when nothing was deleted.
    """
    record = read_record(txn, dbs, key)
    if record is None or record.blob_id != blob_id:
        return None
    txn.delete(key, db=dbs.index)
    txn.delete(lru_key(record.accessed_at, key), db=dbs.lru)
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
        txn.delete(lru_key(record.accessed_at, key), db=dbs.lru)
        txn.put(lru_key(accessed_at, key), b"", db=dbs.lru)
        changed += 1
    return changed


def evict_lru(txn, dbs, bytes_to_free, is_protected, is_enough=None):
    """Delete least-recently-used blobs until ``bytes_to_free`` bytes are freed, no blob
    is left to delete, or ``is_enough()`` returns true.

    Blobs whose raw hash makes ``is_protected`` return true are skipped. ``is_enough``,
    when given, is called after every ``ENOUGH_CHECK_INTERVAL`` deleted blobs, so the
    caller can stop on a measure other than blob bytes, such as pages. Each call walks
    ``cas-lru`` from its start, so its cost grows with the number of protected blobs
    older than the ones it deletes. Returns an ``Eviction``.
    """
    blobs = 0
    freed_bytes = 0
    unchecked = 0
    with txn.cursor(db=dbs.lru) as cursor:
        found = cursor.first()
        while found and freed_bytes < bytes_to_free:
            position = bytes(cursor.key())
            key = position[_UINT64.size :]
            record = read_record(txn, dbs, key)
            if record is not None and lru_key(record.accessed_at, key) == position:
                if is_protected(key):
                    found = cursor.next()
                    continue
                txn.delete(key, db=dbs.index)
                delete_chunks(txn, dbs, record.blob_id)
                blobs += 1
                freed_bytes += record.size_bytes
                unchecked += 1
            # The key is evicted or stale. Deleting it moves the cursor to the next key,
            # or leaves it unpositioned with an empty key after the last one.
            found = cursor.delete() and len(cursor.key()) > 0
            if is_enough is not None and unchecked >= ENOUGH_CHECK_INTERVAL:
                unchecked = 0
                if is_enough():
                    break

    return Eviction(blobs, freed_bytes, add_stored_bytes(txn, dbs, -freed_bytes))


def rebuild_lru(txn, dbs):
    """Replace every ``cas-lru`` key with one per index record.

    Needed once for a store written before ``cas-lru`` existed. Returns the number of
    keys written.
    """
    txn.drop(dbs.lru, delete=False)
    count = 0
    with txn.cursor(db=dbs.index) as cursor:
        for key, data in cursor:
            record = IndexRecord.unpack(data)
            txn.put(lru_key(record.accessed_at, bytes(key)), b"", db=dbs.lru)
            count += 1
    return count


def count_entries(txn, db):
    """Return the number of keys in the database ``db``."""
    return txn.stat(db)["entries"]


def check_layout(txn, dbs):
    """Check the invariants of the layout and return a description of each violation.

    The checks: the stored total equals the sum of index sizes. ``cas-lru`` has
    exactly one key per index record, with its access time. Each indexed blob has the
    chunks its size needs and no other. Every chunk belongs to an indexed blob or a
    pending upload. Reads every key of the store, so it is meant for tests and tools.
    """
    problems = []
    expected_chunks = {}
    expected_lru = set()
    total = 0
    with txn.cursor(db=dbs.index) as cursor:
        for key, data in cursor:
            record = IndexRecord.unpack(data)
            total += record.size_bytes
            expected_lru.add(lru_key(record.accessed_at, bytes(key)))
            expected_chunks[record.blob_id] = (bytes(key).hex(), record.size_bytes)

    stored = read_stored_bytes(txn, dbs)
    if stored != total:
        problems.append(f"stored-bytes is {stored}, but the index records add up to {total}")

    with txn.cursor(db=dbs.lru) as cursor:
        lru = {bytes(key) for key in cursor.iternext(values=False)}
    for position in sorted(lru - expected_lru):
        problems.append(f"cas-lru key {position.hex()} has no matching index record")
    for position in sorted(expected_lru - lru):
        problems.append(f"index record of {position[_UINT64.size :].hex()} has no cas-lru key")

    with txn.cursor(db=dbs.pending) as cursor:
        pending = {_BLOB_ID.unpack(key)[0] for key in cursor.iternext(values=False)}

    chunk_sizes = {}
    with txn.cursor(db=dbs.chunks) as cursor:
        for key, data in cursor:
            blob_id, number = _CHUNK_KEY.unpack(key)
            chunk_sizes.setdefault(blob_id, []).append((number, len(data)))

    for blob_id, chunks in sorted(chunk_sizes.items()):
        if blob_id not in expected_chunks and blob_id not in pending:
            problems.append(f"{len(chunks)} chunks of blob id {blob_id} belong to no blob")
    for blob_id, (hash_hex, size) in sorted(expected_chunks.items()):
        chunks = chunk_sizes.get(blob_id, [])
        numbers = [number for number, _ in chunks]
        chunk_count = (size + CHUNK_SIZE - 1) // CHUNK_SIZE
        stored_size = sum(length for _, length in chunks)
        if numbers != list(range(chunk_count)) or stored_size != size:
            problems.append(
                f"blob {hash_hex} of {size} bytes has chunks {chunks} (number, bytes)"
            )
    return problems
