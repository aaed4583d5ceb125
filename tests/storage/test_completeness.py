"""Tests of ``CompletenessCheckingActionCache`` over a real LMDB blob store."""

from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import NotFoundError
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
