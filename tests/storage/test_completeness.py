"""Tests of ``CompletenessCheckingActionCache`` over a real LMDB blob store."""

from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import NotFoundError
from bgrid.storage.completeness import (
    CompletenessCheckingActionCache,
    TreeFileCache,
    find_missing_outputs,
)
from tests.storage.support import random_blob, start_storage

INSTANCE = "main"


def _proto(digest):
    return digest.to_proto(re_pb2.Digest)


class CompletenessCheckingActionCacheTests(unittest.TestCase):
    async def setUp(self):
        self.clock = task.Clock()
        self.stack = await start_storage(self, clock=self.clock)
        self.store = self.stack.blob_store
        self.cache = self.stack.action_cache
        _, self.action = random_blob(140)

    async def put_blob(self, data):
        digest = Digest.of(data)
        await self.store.put(digest, data)
        return digest

    def blob_only(self, data):
        """Return the digest of ``data`` without storing it."""
        return Digest.of(data)

    async def make_tree(self, top_file, nested_file, store_tree=True):
        """Return the digest of a Tree with ``top_file`` in its root and ``nested_file`` in
        a subdirectory, storing the Tree blob when ``store_tree`` is true."""
        child = re_pb2.Directory(
            files=[re_pb2.FileNode(name="nested.o", digest=_proto(nested_file))]
        )
        child_digest = Digest.of(child.SerializeToString())
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="top.o", digest=_proto(top_file))],
            directories=[re_pb2.DirectoryNode(name="sub", digest=_proto(child_digest))],
        )
        data = re_pb2.Tree(root=root, children=[child]).SerializeToString()
        if store_tree:
            return await self.put_blob(data)
        return self.blob_only(data)

    async def assert_hidden(self, result):
        await self.cache.put(INSTANCE, self.action, result)

        with self.assertRaises(NotFoundError):
            await self.cache.get(INSTANCE, self.action)

    async def assert_served(self, result):
        await self.cache.put(INSTANCE, self.action, result)

        self.assertEqual(await self.cache.get(INSTANCE, self.action), result)

    async def test_complete_result_served(self):
        output = await self.put_blob(b"binary")
        stdout = await self.put_blob(b"compiler output")
        tree = await self.make_tree(await self.put_blob(b"top"), await self.put_blob(b"nested"))
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="out/bin", digest=_proto(output))],
            output_directories=[re_pb2.OutputDirectory(path="out/lib", tree_digest=_proto(tree))],
            stdout_digest=_proto(stdout),
        )

        await self.assert_served(result)

    async def test_missing_output_file_hides_result(self):
        present = await self.put_blob(b"present")
        result = re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path="a", digest=_proto(present)),
                re_pb2.OutputFile(path="b", digest=_proto(self.blob_only(b"evicted"))),
            ]
        )

        await self.assert_hidden(result)

    async def test_missing_stderr_hides_result(self):
        result = re_pb2.ActionResult(stderr_digest=_proto(self.blob_only(b"warnings")))

        await self.assert_hidden(result)

    async def test_missing_file_in_tree_hides_result(self):
        tree = await self.make_tree(await self.put_blob(b"top"), self.blob_only(b"nested"))
        result = re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="out", tree_digest=_proto(tree))]
        )

        await self.assert_hidden(result)

    async def test_missing_tree_hides_result(self):
        tree = await self.make_tree(
            await self.put_blob(b"top"), await self.put_blob(b"nested"), store_tree=False
        )
        result = re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="out", tree_digest=_proto(tree))]
        )

        await self.assert_hidden(result)

    async def test_unparsable_tree_hides_result(self):
        not_a_tree = await self.put_blob(b"\xff\xff\xff not a protobuf")
        result = re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="out", tree_digest=_proto(not_a_tree))]
        )

        await self.assert_hidden(result)

    async def test_invalid_digest_hides_result(self):
        result = re_pb2.ActionResult(
            output_files=[
                re_pb2.OutputFile(path="a", digest=re_pb2.Digest(hash="nothex", size_bytes=3))
            ]
        )

        await self.assert_hidden(result)

    async def store_directories(self, nested_file, store_child=True):
        """Store a root Directory with a subdirectory holding ``nested_file`` and return
        the root's digest."""
        child = re_pb2.Directory(
            files=[re_pb2.FileNode(name="nested.o", digest=_proto(nested_file))]
        )
        child_data = child.SerializeToString()
        child_digest = await self.put_blob(child_data) if store_child else Digest.of(child_data)
        root = re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name="sub", digest=_proto(child_digest))]
        )
        return await self.put_blob(root.SerializeToString())

    async def test_root_directory_walk_served(self):
        root = await self.store_directories(await self.put_blob(b"nested"))
        result = re_pb2.ActionResult(
            output_directories=[
                re_pb2.OutputDirectory(path="out", root_directory_digest=_proto(root))
            ]
        )

        await self.assert_served(result)

    async def test_missing_file_below_root_directory_hides_result(self):
        root = await self.store_directories(self.blob_only(b"nested"))
        result = re_pb2.ActionResult(
            output_directories=[
                re_pb2.OutputDirectory(path="out", root_directory_digest=_proto(root))
            ]
        )

        await self.assert_hidden(result)

    async def test_missing_subdirectory_hides_result(self):
        root = await self.store_directories(await self.put_blob(b"nested"), store_child=False)
        result = re_pb2.ActionResult(
            output_directories=[
                re_pb2.OutputDirectory(path="out", root_directory_digest=_proto(root))
            ]
        )

        await self.assert_hidden(result)

    async def test_checked_blobs_count_as_accessed(self):
        output = await self.put_blob(b"binary")
        tree = await self.make_tree(await self.put_blob(b"top"), await self.put_blob(b"nested"))
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="bin", digest=_proto(output))],
            output_directories=[re_pb2.OutputDirectory(path="lib", tree_digest=_proto(tree))],
        )
        await self.cache.put(INSTANCE, self.action, result)
        self.clock.advance(3600)

        await self.cache.get(INSTANCE, self.action)

        self.assertEqual(await self.store.flush_access_times(), 4)

    async def test_lookup_without_directories_fires_at_once(self):
        output = await self.put_blob(b"binary")
        result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="bin", digest=_proto(output))])
        await self.cache.put(INSTANCE, self.action, result)

        getting = self.cache.get(INSTANCE, self.action)

        self.assertTrue(getting.called)
        self.assertEqual(await getting, result)


class TreeFileCacheLookupTests(unittest.TestCase):
    """Lookups through a ``CompletenessCheckingActionCache`` with a ``TreeFileCache``
    that the test can inspect and fill."""

    async def setUp(self):
        self.clock = task.Clock()
        self.stack = await start_storage(self, clock=self.clock)
        self.store = self.stack.blob_store
        self.tree_files = TreeFileCache(max_digests=100)
        self.cache = CompletenessCheckingActionCache(
            self.stack._lmdb_action_cache, self.store, self.tree_files
        )
        _, self.action = random_blob(140)

    async def put_blob(self, data):
        digest = Digest.of(data)
        await self.store.put(digest, data)
        return digest

    def tree_result(self, *tree_digests):
        return re_pb2.ActionResult(
            output_directories=[
                re_pb2.OutputDirectory(path=f"out/{index}", tree_digest=_proto(tree))
                for index, tree in enumerate(tree_digests)
            ]
        )

    async def store_tree(self, *files):
        root = re_pb2.Directory(
            files=[
                re_pb2.FileNode(name=f"file-{index}", digest=_proto(file))
                for index, file in enumerate(files)
            ]
        )
        return await self.put_blob(re_pb2.Tree(root=root).SerializeToString())

    async def test_first_lookup_caches_tree_files(self):
        file = await self.put_blob(b"file")
        tree = await self.store_tree(file)
        result = self.tree_result(tree)
        await self.cache.put(INSTANCE, self.action, result)

        self.assertEqual(await self.cache.get(INSTANCE, self.action), result)

        self.assertEqual(self.tree_files.get(tree), (file,))

    async def test_cached_tree_is_not_read_again(self):
        # The stored blob is no Tree, so the result is served only if the cached file
        # list is used in place of a read.
        file = await self.put_blob(b"file")
        not_a_tree = await self.put_blob(b"\xff\xff\xff not a protobuf")
        self.tree_files.add(not_a_tree, [file])
        result = self.tree_result(not_a_tree)
        await self.cache.put(INSTANCE, self.action, result)

        self.assertEqual(await self.cache.get(INSTANCE, self.action), result)

    async def test_cached_tree_missing_from_cas_hides_result(self):
        file = await self.put_blob(b"file")
        gone_tree = Digest.of(b"a Tree blob that is not in the CAS")
        self.tree_files.add(gone_tree, [file])
        await self.cache.put(INSTANCE, self.action, self.tree_result(gone_tree))

        with self.assertRaises(NotFoundError) as caught:
            await self.cache.get(INSTANCE, self.action)

        self.assertIn(str(gone_tree), caught.exception.message)

    async def test_cached_tree_file_missing_hides_result(self):
        file = await self.put_blob(b"file")
        tree = await self.store_tree(file)
        gone_file = Digest.of(b"evicted file")
        self.tree_files.add(tree, [file, gone_file])
        await self.cache.put(INSTANCE, self.action, self.tree_result(tree))

        with self.assertRaises(NotFoundError) as caught:
            await self.cache.get(INSTANCE, self.action)

        self.assertIn(str(gone_file), caught.exception.message)

    async def test_cached_tree_counts_as_accessed(self):
        file = await self.put_blob(b"file")
        tree = await self.store_tree(file)
        await self.cache.put(INSTANCE, self.action, self.tree_result(tree))
        await self.cache.get(INSTANCE, self.action)
        await self.store.flush_access_times()
        self.clock.advance(3600)

        await self.cache.get(INSTANCE, self.action)

        self.assertEqual(await self.store.flush_access_times(), 2)

    async def test_missing_order_with_cached_and_read_trees(self):
        missing_read = Digest.of(b"missing in the Tree that is read")
        missing_cached = Digest.of(b"missing in the cached Tree")
        read_tree = await self.store_tree(missing_read)
        cached_tree = await self.store_tree(await self.put_blob(b"other"))
        self.tree_files.add(cached_tree, [missing_cached])
        result = self.tree_result(read_tree, cached_tree)

        missing = await find_missing_outputs(self.store, result, self.tree_files)

        self.assertEqual(missing, [missing_read, missing_cached])


class TreeFileCacheTests(unittest.TestCase):
    def digests(self, label, count):
        return [Digest.of(f"{label}-{index}".encode()) for index in range(count)]

    def test_get_unknown_tree(self):
        self.assertIsNone(TreeFileCache().get(Digest.of(b"tree")))

    def test_empty_tree_cached(self):
        cache = TreeFileCache(max_digests=10)
        tree = Digest.of(b"empty tree")

        cache.add(tree, [])

        self.assertEqual(cache.get(tree), ())

    def test_least_recently_used_evicted(self):
        cache = TreeFileCache(max_digests=10)
        first, second, third = self.digests("tree", 3)
        cache.add(first, self.digests("first", 3))
        cache.add(second, self.digests("second", 3))
        cache.get(first)

        cache.add(third, self.digests("third", 3))

        self.assertIsNotNone(cache.get(first))
        self.assertIsNone(cache.get(second))
        self.assertIsNotNone(cache.get(third))
        self.assertEqual(len(cache), 2)

    def test_tree_over_bound_not_cached(self):
        cache = TreeFileCache(max_digests=10)
        tree = Digest.of(b"large tree")

        cache.add(tree, self.digests("file", 10))

        self.assertIsNone(cache.get(tree))
        self.assertEqual(len(cache), 0)


class EvictedOutputTests(unittest.TestCase):
    """The completeness check over a store whose 1 MiB quota forces eviction."""

    async def setUp(self):
        self.clock = task.Clock()
        self.stack = await start_storage(
            self, clock=self.clock, max_cas_size=1 << 20, cas_low_watermark=0.5
        )
        self.store = self.stack.blob_store
        self.cache = self.stack.action_cache
        _, self.action = random_blob(140)

    async def test_evicted_output_hides_result(self):
        output_data, output = random_blob(100_000)
        stdout_data, stdout = random_blob(1000)
        await self.store.put_many([(output, output_data), (stdout, stdout_data)])
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="out/bin", digest=_proto(output))],
            stdout_digest=_proto(stdout),
        )
        await self.cache.put(INSTANCE, self.action, result)
        self.assertEqual(await self.cache.get(INSTANCE, self.action), result)
        pinned = await self.store.pin([stdout])

        for _ in range(12):
            self.clock.advance(1)
            data, digest = random_blob(100_000)
            await self.store.put(digest, data)

        self.assertEqual(await self.store.find_missing([output, stdout]), [output])
        with self.assertRaises(NotFoundError) as caught:
            await self.cache.get(INSTANCE, self.action)
        self.assertIn(str(output), caught.exception.message)
        self.store.unpin(pinned)

    async def test_evicted_file_in_tree_hides_result(self):
        nested_data, nested = random_blob(100_000)
        await self.store.put(nested, nested_data)
        directory = re_pb2.Directory(
            files=[re_pb2.FileNode(name="nested.o", digest=_proto(nested))]
        )
        tree_data = re_pb2.Tree(root=directory).SerializeToString()
        tree = Digest.of(tree_data)
        self.clock.advance(1)
        await self.store.put(tree, tree_data)
        result = re_pb2.ActionResult(
            output_directories=[re_pb2.OutputDirectory(path="out", tree_digest=_proto(tree))]
        )
        await self.cache.put(INSTANCE, self.action, result)
        self.assertEqual(await self.cache.get(INSTANCE, self.action), result)
        pinned = await self.store.pin([tree])

        for _ in range(12):
            self.clock.advance(1)
            data, digest = random_blob(100_000)
            await self.store.put(digest, data)

        self.assertEqual(await self.store.find_missing([tree, nested]), [nested])
        with self.assertRaises(NotFoundError):
            await self.cache.get(INSTANCE, self.action)
        self.store.unpin(pinned)
