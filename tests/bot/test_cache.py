"""Tests of the bot's blob cache against an in-memory CAS on loopback."""

import asyncio
import os

from twisted.trial import unittest

from bgrid.bot.cache import BlobCache
from bgrid.client.cas import CasClient
from bgrid.digest import Digest
from bgrid.errors import MissingBlobsError
from tests.client.fakes import FakeCas, open_test_channel, start_server
from tests.util import async_test, make_temp_dir


def data_of(letter, size=100):
    return letter.encode() * size


class BlobCacheTests(unittest.TestCase):
    async def make_cache(self, max_bytes=10_000, root=None):
        self.server = FakeCas()
        address = await start_server(self, cas=self.server)
        cas = CasClient(open_test_channel(self, address))
        self.root = root or os.path.join(make_temp_dir(self), "cache")
        cache = BlobCache(self.root, max_bytes, cas)
        cache.load()
        return cache

    def download_calls(self):
        return [call for call in self.server.calls if call in ("BatchReadBlobs", "Read")]

    @async_test
    async def test_fetch_downloads_once(self):
        cache = await self.make_cache()
        digest = self.server.put(b"content")

        await cache.fetch([digest])
        await cache.fetch([digest])

        self.assertEqual(cache.read(digest), b"content")
        self.assertEqual(self.download_calls(), ["BatchReadBlobs"])
        self.assertEqual(cache.total_bytes, len(b"content"))

    @async_test
    async def test_empty_blob_never_requested(self):
        cache = await self.make_cache()
        await cache.fetch([Digest.of(b"")])
        self.assertEqual(cache.read(Digest.of(b"")), b"")
        self.assertEqual(self.download_calls(), [])

    @async_test
    async def test_missing_blob_reported_others_cached(self):
        cache = await self.make_cache()
        present = self.server.put(b"present")
        absent = Digest.of(b"absent")

        with self.assertRaises(MissingBlobsError) as caught:
            await cache.fetch([present, absent])

        self.assertEqual(caught.exception.digests, [absent])
        self.assertIn(present, cache)
        self.assertNotIn(absent, cache)

    @async_test
    async def test_least_recently_used_evicted(self):
        cache = await self.make_cache(max_bytes=250)
        a, b, c = (self.server.put(data_of(letter)) for letter in "abc")

        await cache.fetch([a])
        await cache.fetch([b])
        await cache.fetch([a])  # a is now more recent than b
        await cache.fetch([c])

        self.assertIn(a, cache)
        self.assertNotIn(b, cache)
        self.assertIn(c, cache)
        self.assertFalse(os.path.exists(cache.path(b)))
        self.assertEqual(cache.total_bytes, 200)

    @async_test
    async def test_pinned_blobs_not_evicted(self):
        cache = await self.make_cache(max_bytes=150)
        a, b, c = (self.server.put(data_of(letter)) for letter in "abc")

        with cache.pinned() as pins:
            pins.pin([a, b])
            await cache.fetch([a])
            await cache.fetch([b])
            # Over the limit, but both are in use.
            self.assertIn(a, cache)
            self.assertIn(b, cache)
            self.assertEqual(cache.total_bytes, 200)

        await cache.fetch([c])
        self.assertNotIn(a, cache)
        self.assertNotIn(b, cache)
        self.assertIn(c, cache)
        self.assertEqual(cache.total_bytes, 100)

    @async_test
    async def test_concurrent_fetches_share_download(self):
        cache = await self.make_cache()
        digest = self.server.put(b"shared" * 1000)

        await asyncio.gather(cache.fetch([digest]), cache.fetch([digest]), cache.fetch([digest]))

        self.assertEqual(self.download_calls(), ["BatchReadBlobs"])
        self.assertEqual(cache.read(digest), b"shared" * 1000)

    @async_test
    async def test_load_indexes_blobs_and_removes_strays(self):
        cache = await self.make_cache()
        kept = self.server.put(b"kept")
        await cache.fetch([kept])
        shard = os.path.dirname(cache.path(kept))
        stray = os.path.join(shard, "partial.tmp-123")
        with open(stray, "wb") as target:
            target.write(b"half")
        truncated = Digest.of(b"truncated content")
        os.makedirs(os.path.dirname(cache.path(truncated)), exist_ok=True)
        with open(cache.path(truncated), "wb") as target:
            target.write(b"trunc")

        reloaded = BlobCache(self.root, 10_000, None)
        reloaded.load()

        self.assertIn(kept, reloaded)
        self.assertNotIn(truncated, reloaded)
        self.assertEqual(reloaded.total_bytes, len(b"kept"))
        self.assertEqual(sorted(os.listdir(shard)), [os.path.basename(cache.path(kept))])

    @async_test
    async def test_file_removed_from_disk_downloaded_again(self):
        cache = await self.make_cache()
        digest = self.server.put(b"fragile")
        await cache.fetch([digest])
        os.unlink(cache.path(digest))

        await cache.fetch([digest])

        self.assertEqual(cache.read(digest), b"fragile")
        self.assertEqual(self.download_calls(), ["BatchReadBlobs", "BatchReadBlobs"])
