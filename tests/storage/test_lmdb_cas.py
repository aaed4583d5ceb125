"""Tests of ``LmdbBlobStore``: the blob store contract, and the behaviour that depends on
its LMDB layout (crash recovery, corruption, a full map, access times)."""

from twisted.internet import defer, task
from twisted.trial import unittest

from bgrid.digest import Digest
from bgrid.errors import (
    BlobNotFoundError,
    CancelledError,
    CorruptBlobError,
    DigestMismatchError,
    ResourceExhaustedError,
)
from bgrid.storage import cas_layout
from bgrid.storage.cas_layout import CHUNK_SIZE, CasDatabases
from bgrid.storage.lmdb_cas import (
    DEFAULT_ACCESS_FLUSH_INTERVAL,
    INLINE_READ_MAX_BYTES,
    INLINE_READ_MAX_KEYS,
)
from tests.storage.contracts import BlobStoreContract
from tests.storage.support import (
    MiB,
    assert_consistent,
    random_blob,
    read_all,
    start_storage,
)
from tests.util import make_temp_dir


class LmdbBlobStoreContractTests(BlobStoreContract, unittest.TestCase):
    async def make_blob_store(self):
        stack = await start_storage(self)
        return stack.blob_store


def _read_index_record(txn, dbs, key):
    return cas_layout.read_record(txn, dbs, key)


def _count_entries(txn, db):
    return txn.stat(db)["entries"]


class LmdbBlobStoreTests(unittest.TestCase):
    async def setUp(self):
        self.data_dir = make_temp_dir(self)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.stack = await start_storage(self, self.data_dir, clock=self.clock)
        self.store = self.stack.blob_store
        self.environment = self.stack.environment
        self.dbs = CasDatabases.of(self.environment)

    async def read_record(self, digest):
        return await self.environment.read(_read_index_record, self.dbs, digest.key)

    async def test_stored_bytes_counts_blobs_once(self):
        first_data, first = random_blob(MiB + 1)
        second_data, second = random_blob(10)

        await self.store.put(first, first_data)
        await self.store.put(first, first_data)
        await self.store.put_many([(second, second_data), (first, first_data)])

        self.assertEqual(self.store.stored_bytes, MiB + 11)

    async def test_stored_bytes_survives_restart(self):
        data, digest = random_blob(3 * MiB)
        await self.store.put(digest, data)
        await self.stack.stop()

        reopened = await start_storage(self, self.data_dir, clock=self.clock)

        self.assertEqual(reopened.blob_store.stored_bytes, 3 * MiB)
        self.assertEqual(await reopened.blob_store.get(digest), data)

    async def test_blob_is_split_into_chunks(self):
        data, digest = random_blob(2 * CHUNK_SIZE + 1)

        await self.store.put(digest, data)

        chunks = await self.environment.read(_count_entries, self.dbs.chunks)
        self.assertEqual(chunks, 3)

    async def test_writer_applies_backpressure(self):
        data, digest = random_blob(5 * MiB)
        writer = self.store.open_writer(digest)

        writing = writer.write(data)

        self.assertFalse(writing.called, "a 5 MiB write must wait for the buffer to drain")
        await writing
        await writer.commit()
        self.assertEqual(await self.store.get(digest), data)

    async def test_pending_upload_deleted_on_restart(self):
        data, digest = random_blob(2 * MiB + 7)
        started_at = self.clock.seconds()

        def leave_pending_upload(txn):
            blob_id = cas_layout.allocate_blob_id(txn, self.dbs)
            cas_layout.start_pending_upload(txn, self.dbs, blob_id, started_at)
            cas_layout.put_chunks(txn, self.dbs, blob_id, data[: 2 * MiB])
            return blob_id

        await self.environment.write(leave_pending_upload)
        self.assertEqual(await self.environment.read(_count_entries, self.dbs.pending), 1)
        await self.stack.stop()

        reopened = await start_storage(self, self.data_dir, clock=self.clock)
        dbs = CasDatabases.of(reopened.environment)

        self.assertEqual(await reopened.environment.read(_count_entries, dbs.pending), 0)
        self.assertEqual(await reopened.environment.read(_count_entries, dbs.chunks), 0)
        self.assertEqual(await reopened.blob_store.find_missing([digest]), [digest])
        self.assertEqual(reopened.blob_store.stored_bytes, 0)

    async def test_unfinished_writer_deleted_on_restart(self):
        data, digest = random_blob(3 * MiB + 7)
        writer = self.store.open_writer(digest)
        await writer.write(data[: 3 * MiB])
        self.assertGreaterEqual(await self.environment.read(_count_entries, self.dbs.chunks), 1)
        self.assertEqual(await self.environment.read(_count_entries, self.dbs.pending), 1)
        await self.stack.stop()

        reopened = await start_storage(self, self.data_dir, clock=self.clock)
        dbs = CasDatabases.of(reopened.environment)

        self.assertEqual(await reopened.environment.read(_count_entries, dbs.pending), 0)
        self.assertEqual(await reopened.environment.read(_count_entries, dbs.chunks), 0)
        self.assertEqual(await reopened.blob_store.find_missing([digest]), [digest])

    async def test_put_many_stores_duplicates_once(self):
        data, digest = random_blob(5000)
        other_data, other = random_blob(7000)

        results = await self.store.put_many([(digest, data), (other, other_data), (digest, data)])

        self.assertEqual(results, [None, None, None])
        self.assertEqual(self.store.stored_bytes, 12000)
        self.assertEqual(await self.environment.read(_count_entries, self.dbs.index), 2)
        await assert_consistent(self, self.store)

    async def test_put_many_mixes_stored_new_and_mismatched(self):
        stored_data, stored = random_blob(3000)
        new_data, new = random_blob(3000)
        wrong_data = random_blob(3000)[0]
        await self.store.put(stored, stored_data)

        results = await self.store.put_many(
            [(stored, stored_data), (new, wrong_data), (new, new_data)]
        )

        self.assertIsNone(results[0])
        self.assertIsInstance(results[1], DigestMismatchError)
        self.assertIsNone(results[2])
        self.assertEqual(await self.store.get(new), new_data)
        self.assertEqual(self.store.stored_bytes, 6000)
        await assert_consistent(self, self.store)

    async def damage_chunk(self, digest, number, replacement):
        """Overwrite (or delete, when ``replacement`` is None) one stored chunk."""
        record = await self.read_record(digest)
        key = cas_layout.chunk_key(record.blob_id, number)

        def damage(txn):
            if replacement is None:
                txn.delete(key, db=self.dbs.chunks)
            else:
                txn.put(key, replacement, db=self.dbs.chunks)

        await self.environment.write(damage)

    async def test_get_detects_corruption(self):
        data, digest = random_blob(2 * MiB + 100)
        intact_data, intact = random_blob(100)
        await self.store.put_many([(digest, data), (intact, intact_data)])
        await self.damage_chunk(digest, 1, b"\x00" * CHUNK_SIZE)

        with self.assertRaises(CorruptBlobError):
            await self.store.get(digest)

        self.assertEqual(await self.store.find_missing([digest]), [digest])
        self.assertIsNone(await self.read_record(digest))
        self.assertEqual(await self.environment.read(_count_entries, self.dbs.chunks), 1)
        self.assertEqual(self.store.stored_bytes, 100)
        self.assertEqual(await self.store.get(intact), intact_data)

    async def test_get_many_detects_missing_chunk(self):
        data, digest = random_blob(2 * MiB + 100)
        await self.store.put(digest, data)
        await self.damage_chunk(digest, 2, None)

        results = await self.store.get_many([digest])

        self.assertIsInstance(results[0], CorruptBlobError)
        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_get_of_single_chunk_detects_damage(self):
        # A small blob of one chunk is read on the reactor thread through the
        # single-chunk path of cas_layout.read_blob.
        cases = [
            ("same length", b"\xff" * 1000),
            ("truncated", b"\xff" * 999),
            ("missing", None),
        ]
        for name, replacement in cases:
            data, digest = random_blob(1000)
            intact_data, intact = random_blob(2000)
            await self.store.put_many([(digest, data), (intact, intact_data)])
            await self.damage_chunk(digest, 0, replacement)

            results = await self.store.get_many([digest, intact])

            self.assertIsInstance(results[0], CorruptBlobError, name)
            self.assertEqual(results[1], intact_data, name)
            self.assertEqual(await self.store.find_missing([digest]), [digest], name)
            self.assertIsNone(await self.read_record(digest), name)
        await assert_consistent(self, self.store)

    async def test_get_many_inline_and_pooled_agree(self):
        small_data, small = random_blob(4096)
        large_data, large = random_blob(INLINE_READ_MAX_BYTES)
        other_size = Digest(small.hash, small.size_bytes + 1)
        await self.store.put_many([(small, small_data), (large, large_data)])

        inline = await self.store.get_many([small, other_size, small])
        pooled = await self.store.get_many([small, other_size, large])

        self.assertEqual(inline[0], small_data)
        self.assertIsInstance(inline[1], BlobNotFoundError)
        self.assertEqual(inline[2], small_data)
        self.assertEqual(pooled[0], small_data)
        self.assertIsInstance(pooled[1], BlobNotFoundError)
        self.assertEqual(pooled[2], large_data)

    async def test_find_missing_above_inline_limit(self):
        blobs = [random_blob(10) for _ in range(3)]
        await self.store.put_many([(digest, data) for data, digest in blobs])
        absent = [random_blob(10)[1] for _ in range(INLINE_READ_MAX_KEYS)]
        stored = [digest for _, digest in blobs]

        missing = await self.store.find_missing(stored + absent)

        self.assertEqual(missing, absent)

    async def test_full_read_detects_corruption(self):
        data, digest = random_blob(2 * MiB + 100)
        await self.store.put(digest, data)
        await self.damage_chunk(digest, 0, b"\xff" * CHUNK_SIZE)
        reader = await self.store.open_reader(digest)

        self.assertEqual(len(await reader.read(MiB)), MiB)
        self.assertEqual(len(await reader.read(MiB)), MiB)
        with self.assertRaises(CorruptBlobError):
            await reader.read(MiB)

        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_reader_of_deleted_blob(self):
        data, digest = random_blob(2 * MiB)
        await self.store.put(digest, data)
        reader = await self.store.open_reader(digest, offset=0, limit=MiB)
        self.assertEqual(await reader.read(1000), data[:1000])

        await self.damage_chunk(digest, 1, b"\xff" * CHUNK_SIZE)
        with self.assertRaises(CorruptBlobError):
            await self.store.get(digest)

        with self.assertRaises(BlobNotFoundError):
            await reader.read(1000)

    async def test_access_times_flushed_in_batches(self):
        data, digest = random_blob(100)
        await self.store.put(digest, data)
        self.assertEqual((await self.read_record(digest)).accessed_at, 1_000_000)
        write_count = 0
        write = self.environment.write

        def counting_write(operation):
            nonlocal write_count
            write_count += 1
            return write(operation)

        self.environment.write = counting_write
        self.addCleanup(delattr, self.environment, "write")

        self.clock.advance(30)
        await self.store.find_missing([digest])
        await self.store.get(digest)
        await read_all(await self.store.open_reader(digest))
        self.assertEqual(write_count, 0)
        self.assertEqual((await self.read_record(digest)).accessed_at, 1_000_000)

        self.clock.advance(DEFAULT_ACCESS_FLUSH_INTERVAL - 30)
        self.assertEqual(write_count, 1)
        await write(lambda txn: None)
        self.assertEqual((await self.read_record(digest)).accessed_at, 1_000_030)

    async def test_access_times_flushed_at_stop(self):
        data, digest = random_blob(100)
        await self.store.put(digest, data)
        self.clock.advance(5)
        await self.store.get(digest)
        await self.stack.stop()

        reopened = await start_storage(self, self.data_dir, clock=self.clock)
        dbs = CasDatabases.of(reopened.environment)

        record = await reopened.environment.read(_read_index_record, dbs, digest.key)
        self.assertEqual(record.accessed_at, 1_000_005)


class LmdbBlobStoreMapFullTests(unittest.TestCase):
    async def setUp(self):
        self.stack = await start_storage(self, map_size=512 * 1024)
        self.store = self.stack.blob_store

    async def test_blob_larger_than_map_rejected(self):
        data, digest = random_blob(MiB)

        with self.assertRaises(ResourceExhaustedError) as caught:
            await self.store.put(digest, data)

        self.assertIn(f"{MiB} bytes", caught.exception.message)
        self.assertIn("524288 bytes", caught.exception.message)
        self.assertIn("--map-size", caught.exception.message)
        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_store_usable_after_rejection(self):
        large_data, large = random_blob(MiB)
        small_data, small = random_blob(1000)
        results = await self.store.put_many([(large, large_data), (small, small_data)])
        self.assertIsInstance(results[0], ResourceExhaustedError)
        self.assertIsNone(results[1])

        later_data, later = random_blob(2000)
        await self.store.put(later, later_data)

        self.assertEqual(await self.store.get(small), small_data)
        self.assertEqual(await self.store.get(later), later_data)
        self.assertEqual(self.store.stored_bytes, 3000)

    async def test_streamed_write_beyond_map_size(self):
        data, digest = random_blob(2 * MiB)
        writer = self.store.open_writer(digest)

        with self.assertRaises(ResourceExhaustedError):
            await writer.write(data)
        with self.assertRaises(ResourceExhaustedError):
            await writer.commit()

        await writer.abort()
        self.assertEqual(await self.store.find_missing([digest]), [digest])
        small_data, small = random_blob(1000)
        await self.store.put(small, small_data)
        self.assertEqual(await self.store.get(small), small_data)


class LmdbBlobWriterStateTests(unittest.TestCase):
    async def setUp(self):
        self.stack = await start_storage(self)
        self.store = self.stack.blob_store

    async def test_write_after_commit_rejected(self):
        data, digest = random_blob(10)
        writer = self.store.open_writer(digest)
        await writer.write(data)
        await writer.commit()

        with self.assertRaises(ValueError):
            await writer.write(b"x")
        await writer.abort()
        self.assertEqual(await self.store.get(digest), data)

    async def test_overflow_discards_written_chunks(self):
        data, digest = random_blob(2 * MiB)
        writer = self.store.open_writer(digest)
        await writer.write(data)

        with self.assertRaises(DigestMismatchError):
            await writer.write(b"x")

        await writer.abort()
        dbs = CasDatabases.of(self.stack.environment)
        self.assertEqual(await self.stack.environment.read(_count_entries, dbs.chunks), 0)
        self.assertEqual(await self.stack.environment.read(_count_entries, dbs.pending), 0)

    async def test_abort_with_chunk_writes_in_flight(self):
        data, digest = random_blob(6 * MiB)
        writer = self.store.open_writer(digest)
        # Returns once chunks are stored, so the blob id of the upload is known.
        await writer.write(data[: 3 * MiB])

        writer.write(data[3 * MiB :]).addErrback(lambda failure: failure.trap(CancelledError))
        await writer.abort()

        environment = self.stack.environment
        dbs = CasDatabases.of(environment)
        self.assertEqual(await environment.read(_count_entries, dbs.chunks), 0)
        self.assertEqual(await environment.read(_count_entries, dbs.pending), 0)
        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_concurrent_writers_leave_one_copy(self):
        data, digest = random_blob(3 * MiB)
        writers = [self.store.open_writer(digest) for _ in range(3)]

        await defer.gatherResults([writer.write(data) for writer in writers])
        await defer.gatherResults([writer.commit() for writer in writers])

        dbs = CasDatabases.of(self.stack.environment)
        self.assertEqual(await self.stack.environment.read(_count_entries, dbs.chunks), 3)
        self.assertEqual(await self.stack.environment.read(_count_entries, dbs.pending), 0)
        self.assertEqual(self.store.stored_bytes, 3 * MiB)
