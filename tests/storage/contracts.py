"""Contract tests that every ``IBlobStore`` and every ``IActionCache`` must pass.

A test case mixes in a contract and a ``trial`` ``TestCase`` and defines the async
factory the contract names.
"""

from twisted.internet import defer
from zope.interface.verify import verifyObject

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import EMPTY_DIGEST, Digest
from bgrid.errors import (
    BlobNotFoundError,
    CancelledError,
    DigestMismatchError,
    NotFoundError,
    OutOfRangeError,
)
from bgrid.interfaces import IActionCache, IBlobReader, IBlobStore, IBlobWriter
from tests.storage.support import MiB, random_blob, read_all


class BlobStoreContract:
    """Tests of the ``IBlobStore`` contract.

    Subclasses define ``async def make_blob_store(self)`` returning a started store that
    is stopped when the test ends.
    """

    async def setUp(self):
        self.store = await self.make_blob_store()

    async def assert_absent(self, digest):
        """Check that ``digest`` is missing by every way of looking it up."""
        self.assertEqual(await self.store.find_missing([digest]), [digest])
        with self.assertRaises(BlobNotFoundError):
            await self.store.get(digest)

    async def test_provides_interfaces(self):
        data, digest = random_blob(10)
        await self.store.put(digest, data)
        reader = await self.store.open_reader(digest)
        writer = self.store.open_writer(digest)

        self.assertTrue(verifyObject(IBlobStore, self.store))
        self.assertTrue(verifyObject(IBlobReader, reader))
        self.assertTrue(verifyObject(IBlobWriter, writer))
        await writer.abort()

    async def test_put_get_round_trip(self):
        data, digest = random_blob(100_000)

        await self.store.put(digest, data)

        self.assertEqual(await self.store.get(digest), data)
        self.assertEqual(await self.store.find_missing([digest]), [])

    async def test_put_existing_blob_succeeds(self):
        data, digest = random_blob(1000)

        await self.store.put(digest, data)
        await self.store.put(digest, data)

        self.assertEqual(await self.store.get(digest), data)

    async def test_put_wrong_hash_rejected(self):
        data, _ = random_blob(50_000)
        wrong = Digest.of(b"other data of some kind")._replace(size_bytes=len(data))

        with self.assertRaises(DigestMismatchError):
            await self.store.put(wrong, data)

        await self.assert_absent(wrong)
        await self.assert_absent(Digest.of(data))

    async def test_put_wrong_size_rejected(self):
        data, digest = random_blob(1000)
        wrong = digest._replace(size_bytes=999)

        with self.assertRaises(DigestMismatchError):
            await self.store.put(wrong, data)

        await self.assert_absent(wrong)
        await self.assert_absent(digest)

    async def test_empty_blob_always_present(self):
        self.assertEqual(await self.store.find_missing([EMPTY_DIGEST]), [])
        self.assertEqual(await self.store.get(EMPTY_DIGEST), b"")
        self.assertEqual(await self.store.get_many([EMPTY_DIGEST]), [b""])

        reader = await self.store.open_reader(EMPTY_DIGEST)
        self.assertEqual(reader.size, 0)
        self.assertEqual(await reader.read(100), b"")

        await self.store.put(EMPTY_DIGEST, b"")
        writer = self.store.open_writer(EMPTY_DIGEST)
        await writer.commit()
        self.assertEqual(await self.store.get(EMPTY_DIGEST), b"")

    async def test_find_missing_order_and_duplicates(self):
        present_data, present = random_blob(10)
        await self.store.put(present, present_data)
        missing = [random_blob(10 + i)[1] for i in range(3)]

        found = await self.store.find_missing(
            [missing[2], present, missing[0], missing[2], EMPTY_DIGEST, missing[1], missing[0]]
        )

        self.assertEqual(found, [missing[2], missing[0], missing[1]])

    async def test_find_missing_same_hash_other_size(self):
        data, digest = random_blob(10)
        await self.store.put(digest, data)
        other_size = digest._replace(size_bytes=11)

        self.assertEqual(await self.store.find_missing([other_size]), [other_size])

    async def test_get_missing_blob(self):
        _, digest = random_blob(10)

        with self.assertRaises(BlobNotFoundError) as caught:
            await self.store.get(digest)

        self.assertEqual(caught.exception.digest, digest)

    async def test_get_many_mixed(self):
        first_data, first = random_blob(100)
        second_data, second = random_blob(2 * MiB + 5)
        _, absent = random_blob(7)
        await self.store.put_many([(first, first_data), (second, second_data)])

        results = await self.store.get_many([second, absent, EMPTY_DIGEST, first, second])

        self.assertEqual(len(results), 5)
        self.assertEqual(results[0], second_data)
        self.assertIsInstance(results[1], BlobNotFoundError)
        self.assertEqual(results[1].digest, absent)
        self.assertEqual(results[2], b"")
        self.assertEqual(results[3], first_data)
        self.assertEqual(results[4], second_data)

    async def test_put_many_reports_each_blob(self):
        good_data, good = random_blob(300)
        bad_data, bad = random_blob(20_000)
        bad = bad._replace(hash=good.hash)
        large_data, large = random_blob(MiB + 1)

        results = await self.store.put_many(
            [(good, good_data), (bad, bad_data), (large, large_data)]
        )

        self.assertIsNone(results[0])
        self.assertIsInstance(results[1], DigestMismatchError)
        self.assertIsNone(results[2])
        self.assertEqual(await self.store.get(good), good_data)
        self.assertEqual(await self.store.get(large), large_data)

    async def test_streamed_write_and_ranged_reads(self):
        data, digest = random_blob(3 * MiB + MiB // 2)
        writer = self.store.open_writer(digest)

        for start in range(0, len(data), 300_000):
            await writer.write(data[start : start + 300_000])
        self.assertEqual(writer.committed_size, len(data))
        await self.assert_absent(digest)
        await writer.commit()

        whole = await self.store.open_reader(digest)
        self.assertEqual(whole.size, len(data))
        self.assertEqual(await read_all(whole, piece_size=700_000), data)

        ranges = [
            (0, 10),
            (MiB - 3, 6),
            (MiB, MiB),
            (2 * MiB + 17, 0),
            (len(data) - 5, 100),
            (123_456, 2 * MiB),
        ]
        for offset, limit in ranges:
            reader = await self.store.open_reader(digest, offset, limit)
            expected_end = len(data) if limit == 0 else min(len(data), offset + limit)
            self.assertEqual(
                await read_all(reader, piece_size=400_000),
                data[offset:expected_end],
                f"offset {offset}, limit {limit}",
            )

    async def test_read_at_end_is_empty(self):
        data, digest = random_blob(MiB + 10)
        await self.store.put(digest, data)

        reader = await self.store.open_reader(digest, offset=len(data))

        self.assertEqual(await reader.read(1000), b"")

    async def test_read_past_end_rejected(self):
        data, digest = random_blob(100)
        await self.store.put(digest, data)

        with self.assertRaises(OutOfRangeError):
            await self.store.open_reader(digest, offset=101)
        with self.assertRaises(OutOfRangeError):
            await self.store.open_reader(EMPTY_DIGEST, offset=1)

    async def test_open_reader_missing_blob(self):
        _, digest = random_blob(100)

        with self.assertRaises(BlobNotFoundError):
            await self.store.open_reader(digest)

    async def test_writer_abort_leaves_nothing(self):
        data, digest = random_blob(2 * MiB + 100)
        writer = self.store.open_writer(digest)
        await writer.write(data[: 2 * MiB])

        await writer.abort()
        await writer.abort()

        await self.assert_absent(digest)
        with self.assertRaises(CancelledError):
            await writer.write(data[2 * MiB :])
        with self.assertRaises(CancelledError):
            await writer.commit()

    async def test_writer_size_overflow_rejected(self):
        data, digest = random_blob(MiB + 100)
        writer = self.store.open_writer(digest)
        await writer.write(data)

        with self.assertRaises(DigestMismatchError):
            await writer.write(b"one byte too many"[:1])

        with self.assertRaises(DigestMismatchError):
            await writer.commit()
        await writer.abort()
        await self.assert_absent(digest)

    async def test_writer_short_upload_rejected(self):
        data, digest = random_blob(MiB + 100)
        writer = self.store.open_writer(digest)
        await writer.write(data[:-1])

        with self.assertRaises(DigestMismatchError):
            await writer.commit()

        await writer.abort()
        await self.assert_absent(digest)

    async def test_writer_hash_mismatch_rejected(self):
        data, digest = random_blob(2 * MiB + 100)
        wrong = digest._replace(hash=Digest.of(b"something else").hash)
        writer = self.store.open_writer(wrong)
        await writer.write(data)

        with self.assertRaises(DigestMismatchError):
            await writer.commit()

        await writer.abort()
        await self.assert_absent(wrong)
        await self.assert_absent(digest)

    async def test_concurrent_writers_of_same_blob(self):
        data, digest = random_blob(2 * MiB + MiB // 2)
        first = self.store.open_writer(digest)
        second = self.store.open_writer(digest)

        for start in range(0, len(data), 500_000):
            piece = data[start : start + 500_000]
            await defer.gatherResults([first.write(piece), second.write(piece)])
        await defer.gatherResults([first.commit(), second.commit()])

        self.assertEqual(await self.store.get(digest), data)

    async def test_writer_of_stored_blob_succeeds(self):
        data, digest = random_blob(MiB + 3)
        await self.store.put(digest, data)
        writer = self.store.open_writer(digest)

        await writer.write(data)
        await writer.commit()

        self.assertEqual(await self.store.get(digest), data)


class ActionCacheContract:
    """Tests of the ``IActionCache`` contract.

    Subclasses define ``async def make_action_cache(self)`` returning a started cache that
    is stopped when the test ends.
    """

    async def setUp(self):
        self.cache = await self.make_action_cache()

    def make_result(self, exit_code):
        return re_pb2.ActionResult(exit_code=exit_code, stdout_raw=b"built\n")

    async def test_provides_interface(self):
        self.assertTrue(verifyObject(IActionCache, self.cache))

    async def test_round_trip(self):
        _, action = random_blob(140)
        result = self.make_result(exit_code=3)

        await self.cache.put("main", action, result)

        self.assertEqual(await self.cache.get("main", action), result)

    async def test_missing_result(self):
        _, action = random_blob(140)

        with self.assertRaises(NotFoundError):
            await self.cache.get("main", action)

    async def test_overwrite_replaces_result(self):
        _, action = random_blob(140)

        await self.cache.put("", action, self.make_result(exit_code=1))
        await self.cache.put("", action, self.make_result(exit_code=0))

        self.assertEqual((await self.cache.get("", action)).exit_code, 0)

    async def test_instances_are_isolated(self):
        _, action = random_blob(140)
        await self.cache.put("team-a", action, self.make_result(exit_code=1))
        await self.cache.put("team-a/ci", action, self.make_result(exit_code=2))

        self.assertEqual((await self.cache.get("team-a", action)).exit_code, 1)
        self.assertEqual((await self.cache.get("team-a/ci", action)).exit_code, 2)
        with self.assertRaises(NotFoundError):
            await self.cache.get("", action)
        with self.assertRaises(NotFoundError):
            await self.cache.get("team-b", action)

    async def test_size_is_part_of_key(self):
        _, action = random_blob(140)
        await self.cache.put("main", action, self.make_result(exit_code=1))

        with self.assertRaises(NotFoundError):
            await self.cache.get("main", action._replace(size_bytes=141))
