"""Tests of least-recently-used eviction in ``LmdbBlobStore``: the quota and its low
watermark, pins, readers, a full map at its maximum size, and a growing map."""

from twisted.internet import defer, task
from twisted.trial import unittest

from bgrid.digest import Digest
from bgrid.errors import BlobNotFoundError, ResourceExhaustedError
from bgrid.interfaces import IBlobStore
from bgrid.storage import cas_layout
from bgrid.storage.cas_layout import CasDatabases
from tests.storage.support import (
    MiB,
    assert_consistent,
    random_blob,
    read_all,
    start_blob_store,
    start_storage,
)
from tests.util import make_temp_dir

KiB = 1 << 10
QUOTA = 4 * MiB
BLOB_SIZE = 256 * KiB


def _clear_lru(txn, dbs):
    txn.drop(dbs.lru, delete=False)


class QuotaTests(unittest.TestCase):
    """A 4 MiB quota with a low watermark of 0.5, so each eviction frees 2 MiB."""

    async def setUp(self):
        self.data_dir = make_temp_dir(self)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.stack = await start_storage(
            self, self.data_dir, clock=self.clock, max_cas_size=QUOTA, cas_low_watermark=0.5
        )
        self.store = self.stack.blob_store

    async def put_blobs(self, count, size=BLOB_SIZE):
        """Store ``count`` random blobs one second apart and return their digests."""
        digests = []
        for _ in range(count):
            data, digest = random_blob(size)
            await self.store.put(digest, data)
            digests.append(digest)
            self.assertLessEqual(self.store.stored_bytes, QUOTA)
            self.clock.advance(1)
        return digests

    async def present(self, digests):
        missing = set(await self.store.find_missing(digests))
        return [digest for digest in digests if digest not in missing]

    async def test_uploads_beyond_quota_evict_oldest(self):
        digests = await self.put_blobs(40)

        present = await self.present(digests)
        self.assertEqual(present, digests[-len(present) :])
        self.assertLess(len(present), 16)
        self.assertGreaterEqual(len(present), 8)
        await assert_consistent(self, self.store)

    async def test_eviction_goes_down_to_low_watermark(self):
        await self.put_blobs(16)
        self.assertEqual(self.store.stored_bytes, QUOTA)

        await self.put_blobs(1)

        self.assertEqual(self.store.stored_bytes, QUOTA // 2)
        await assert_consistent(self, self.store)

    async def test_find_missing_counts_as_access(self):
        digests = await self.put_blobs(16)

        self.assertEqual(await self.store.find_missing([digests[0]]), [])
        await self.put_blobs(1)

        self.assertEqual(await self.present(digests[:2]), [digests[0]])
        await assert_consistent(self, self.store)

    async def test_get_counts_as_access(self):
        digests = await self.put_blobs(16)

        await self.store.get(digests[0])
        await self.put_blobs(1)

        self.assertEqual(await self.present(digests[:2]), [digests[0]])

    async def test_pinned_blobs_never_evicted(self):
        digests = await self.put_blobs(4)

        token = await self.store.pin(digests[:2])
        self.assertEqual(self.store.pinned_blobs, 2)
        await self.put_blobs(40)

        self.assertEqual(await self.present(digests), digests[:2])
        self.store.unpin(token)
        self.assertEqual(self.store.pinned_blobs, 0)
        await self.put_blobs(20)
        self.assertEqual(await self.present(digests), [])
        await assert_consistent(self, self.store)

    async def test_pins_are_counted(self):
        digests = await self.put_blobs(1)
        first = await self.store.pin(digests)
        second = await self.store.pin(digests)

        self.store.unpin(first)
        self.store.unpin(first)
        await self.put_blobs(40)
        self.assertEqual(await self.present(digests), digests)

        self.store.unpin(second)
        await self.put_blobs(20)
        self.assertEqual(await self.present(digests), [])

    async def test_pin_before_upload_protects_blob(self):
        data, digest = random_blob(BLOB_SIZE)
        token = await self.store.pin([digest])

        await self.store.put(digest, data)
        await self.put_blobs(40)

        self.assertEqual(await self.store.get(digest), data)
        self.store.unpin(token)

    async def test_pinned_blobs_filling_quota_reject_upload(self):
        pinned = await self.put_blobs(16)
        token = await self.store.pin(pinned)
        data, digest = random_blob(BLOB_SIZE)

        with self.assertRaises(ResourceExhaustedError) as caught:
            await self.store.put(digest, data)

        message = caught.exception.message
        self.assertIn(f"{BLOB_SIZE} bytes", message)
        self.assertIn(f"quota is {QUOTA} bytes", message)
        self.assertIn("--max-cas-size", message)
        self.assertEqual(self.store.stored_bytes, QUOTA)
        self.store.unpin(token)
        await self.store.put(digest, data)
        self.assertEqual(await self.store.get(digest), data)
        await assert_consistent(self, self.store)

    async def test_blob_larger_than_quota_rejected(self):
        data, digest = random_blob(QUOTA + 1)
        stored_before = await self.put_blobs(2)

        with self.assertRaises(ResourceExhaustedError) as caught:
            await self.store.put(digest, data)

        self.assertIn(f"{QUOTA + 1} bytes", caught.exception.message)
        self.assertIn(f"{QUOTA} bytes", caught.exception.message)
        self.assertEqual(await self.present(stored_before), stored_before)
        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_streamed_blob_larger_than_quota_rejected(self):
        data, digest = random_blob(QUOTA + 1)
        writer = self.store.open_writer(digest)

        with self.assertRaises(ResourceExhaustedError) as caught:
            await writer.write(data[:MiB])

        self.assertIn(f"{QUOTA + 1} bytes", caught.exception.message)
        with self.assertRaises(ResourceExhaustedError):
            await writer.commit()
        await writer.abort()
        await assert_consistent(self, self.store)

    async def test_streamed_commit_evicts(self):
        old = await self.put_blobs(16)
        data, digest = random_blob(MiB + 5)
        writer = self.store.open_writer(digest)

        await writer.write(data)
        await writer.commit()

        self.assertEqual(await self.store.get(digest), data)
        self.assertLessEqual(self.store.stored_bytes, QUOTA // 2)
        self.assertEqual(await self.present(old[:4]), [])
        await assert_consistent(self, self.store)

    async def test_open_reader_keeps_blob(self):
        data, digest = random_blob(2 * MiB + 3)
        await self.store.put(digest, data)
        self.clock.advance(1)
        reader = await self.store.open_reader(digest)
        self.assertEqual(len(await reader.read(MiB)), MiB)

        await self.put_blobs(20)

        self.assertEqual(await reader.read(MiB), data[MiB : 2 * MiB])
        self.assertEqual(await reader.read(MiB), data[2 * MiB :])
        reader.close()
        self.assertEqual(self.store.pinned_blobs, 0)
        await self.put_blobs(20)
        self.assertEqual(await self.store.find_missing([digest]), [digest])

    async def test_failed_open_reader_releases_pin(self):
        _, digest = random_blob(100)

        with self.assertRaises(BlobNotFoundError):
            await self.store.open_reader(digest)

        self.assertEqual(self.store.pinned_blobs, 0)

    async def test_batch_larger_than_quota_stays_within(self):
        blobs = [random_blob(300 * KiB) for _ in range(20)]

        results = await self.store.put_many([(digest, data) for data, digest in blobs])

        self.assertEqual(results, [None] * 20)
        self.assertLessEqual(self.store.stored_bytes, QUOTA)
        await assert_consistent(self, self.store)

    async def test_concurrent_uploads_and_reads(self):
        blobs = [random_blob(100 * KiB + number) for number in range(60)]
        by_digest = {digest: data for data, digest in blobs}

        async def upload(start):
            for data, digest in blobs[start::3]:
                if digest.size_bytes % 2:
                    await self.store.put(digest, data)
                else:
                    writer = self.store.open_writer(digest)
                    await writer.write(data)
                    await writer.commit()

        async def read(digests):
            for result, digest in zip(await self.store.get_many(digests), digests):
                if isinstance(result, bytes):
                    self.assertEqual(result, by_digest[digest])
                else:
                    self.assertIsInstance(result, BlobNotFoundError)

        uploads = [defer.Deferred.fromCoroutine(upload(start)) for start in range(3)]
        reads = [
            defer.Deferred.fromCoroutine(read([digest for _, digest in blobs[n : n + 10]]))
            for n in range(0, 60, 5)
        ]
        await defer.gatherResults(uploads + reads, consumeErrors=True)

        self.assertLessEqual(self.store.stored_bytes, QUOTA)
        for digest in await self.present(list(by_digest)):
            self.assertEqual(await self.store.get(digest), by_digest[digest])
        await assert_consistent(self, self.store)

    async def test_lowered_quota_evicts_at_start(self):
        await self.put_blobs(16)
        await self.stack.stop()

        reopened = await start_storage(
            self, self.data_dir, clock=self.clock, max_cas_size=2 * MiB, cas_low_watermark=0.5
        )

        self.assertEqual(reopened.blob_store.stored_bytes, MiB)
        await assert_consistent(self, reopened.blob_store)

    async def test_lru_rebuilt_at_start(self):
        digests = await self.put_blobs(8)
        dbs = CasDatabases.of(self.stack.environment)
        await self.stack.environment.write(lambda txn: _clear_lru(txn, dbs))
        self.assertNotEqual(await self.store.check_consistency(), [])
        await self.stack.stop()

        reopened = await start_storage(
            self, self.data_dir, clock=self.clock, max_cas_size=QUOTA, cas_low_watermark=0.5
        )
        self.store = reopened.blob_store

        await assert_consistent(self, self.store)
        await self.put_blobs(9)
        self.assertEqual(await self.present(digests), [])


class PinContractTests(unittest.TestCase):
    async def setUp(self):
        self.stack = await start_storage(self, max_cas_size=QUOTA)
        self.store = self.stack.blob_store

    async def test_pin_ignores_empty_digest(self):
        token = await self.store.pin([Digest.of(b"")])

        self.assertEqual(self.store.pinned_blobs, 0)
        self.store.unpin(token)

    async def test_pin_fails_when_stopping(self):
        _, digest = random_blob(10)
        await self.stack.stop()

        with self.assertRaises(Exception):
            await self.store.pin([digest])

        self.assertEqual(self.store.pinned_blobs, 0)

    def test_interface_declares_pinning(self):
        self.assertIn("pin", IBlobStore.names())
        self.assertIn("unpin", IBlobStore.names())


class FullMapTests(unittest.TestCase):
    """A map that cannot grow, smaller than what the uploads add up to."""

    async def setUp(self):
        self.clock = task.Clock()
        self.store = await start_blob_store(self, 4 * MiB, 4 * MiB, clock=self.clock)

    async def test_uploads_evict_when_map_is_full(self):
        digests = []
        for _ in range(40):
            data, digest = random_blob(BLOB_SIZE)
            await self.store.put(digest, data)
            digests.append(digest)
            self.clock.advance(1)

        missing = await self.store.find_missing(digests)
        self.assertIn(digests[0], missing)
        self.assertNotIn(digests[-1], missing)
        self.assertEqual(missing, digests[: len(missing)])
        self.assertLess(self.store.stored_bytes, 4 * MiB)
        await assert_consistent(self, self.store)

    async def test_streamed_uploads_evict_when_map_is_full(self):
        for _ in range(12):
            data, digest = random_blob(MiB + 100)
            writer = self.store.open_writer(digest)
            await writer.write(data)
            await writer.commit()
            self.clock.advance(1)

        self.assertEqual(await self.store.get(digest), data)
        await assert_consistent(self, self.store)

    async def test_pinned_blobs_filling_map_reject_upload(self):
        tokens = []
        stored = []
        with self.assertRaises(ResourceExhaustedError) as caught:
            for _ in range(40):
                data, digest = random_blob(BLOB_SIZE)
                tokens.append(await self.store.pin([digest]))
                await self.store.put(digest, data)
                stored.append(digest)

        self.assertIn("--map-size", caught.exception.message)
        self.assertGreater(len(stored), 4)
        self.assertEqual(await self.store.find_missing(stored), [])
        for token in tokens:
            self.store.unpin(token)
        await self.store.put(digest, data)
        self.assertEqual(await self.store.get(digest), data)
        await assert_consistent(self, self.store)


class GrowingMapTests(unittest.TestCase):
    """A map that starts at 256 KiB and may grow to 64 MiB, under a 4 MiB quota."""

    async def setUp(self):
        self.clock = task.Clock()
        self.store = await start_blob_store(
            self,
            256 * KiB,
            64 * MiB,
            clock=self.clock,
            max_stored_bytes=QUOTA,
            low_watermark=0.75,
        )
        self.environment = self.store._environment

    async def test_uploads_grow_map_and_evict(self):
        digests = []
        for _ in range(60):
            data, digest = random_blob(BLOB_SIZE)
            await self.store.put(digest, data)
            digests.append(digest)
            self.assertLessEqual(self.store.stored_bytes, QUOTA)
            self.clock.advance(1)

        self.assertGreater(self.environment.map_size, 256 * KiB)
        missing = await self.store.find_missing(digests)
        self.assertEqual(missing, digests[: len(missing)])
        self.assertGreater(len(missing), 40)
        await assert_consistent(self, self.store)

    async def test_index_records_survive_growth(self):
        blobs = [random_blob(50 * KiB + number) for number in range(40)]

        results = await defer.gatherResults(
            [self.store.put(digest, data) for data, digest in blobs]
        )

        self.assertEqual(results, [None] * 40)
        dbs = self.store._dbs
        for data, digest in blobs:
            record = await self.environment.read(cas_layout.read_record, dbs, digest.key)
            if record is not None:
                self.assertEqual(await self.store.get(digest), data)
        await assert_consistent(self, self.store)

    async def test_reader_survives_growth(self):
        data, digest = random_blob(3 * MiB)
        await self.store.put(digest, data)
        reader = await self.store.open_reader(digest)
        first = await reader.read(MiB)

        for _ in range(8):
            other_data, other = random_blob(BLOB_SIZE)
            await self.store.put(other, other_data)

        self.assertEqual(first + await read_all(reader), data)
        reader.close()
