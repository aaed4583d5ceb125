"""Tests of CasClient against an in-memory CAS served over gRPC on loopback."""

import os
import stat

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.client import tree
from bgrid.client.cas import (
    CHUNK_BYTES,
    DEFAULT_BATCH_LIMIT_BYTES,
    BlobIntegrityError,
    CasClient,
)
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError, MissingBlobsError
from tests.client.fakes import FakeCas, open_test_channel, start_server
from tests.util import async_test, make_temp_dir

UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def blob(index, size):
    """Deterministic data of ``size`` bytes that differs for each ``index``."""
    pattern = f"blob {index};".encode()
    return (pattern * (size // len(pattern) + 1))[:size]


def write_file(path, data, executable=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as target:
        target.write(data)
    os.chmod(path, 0o755 if executable else 0o644)


def read_file(path):
    with open(path, "rb") as source:
        return source.read()


class CasClientTestCase(unittest.TestCase):
    max_batch_bytes = 0
    instance_name = ""

    async def make_client(self):
        self.server = FakeCas(self.max_batch_bytes, self.instance_name)
        address = await start_server(self, cas=self.server)
        return CasClient(open_test_channel(self, address), self.instance_name)


class FindMissingTests(CasClientTestCase):
    @async_test
    async def test_reports_absent_once(self):
        client = await self.make_client()
        present = self.server.put(b"present")
        absent = Digest.of(b"absent")

        missing = await client.find_missing([present, absent, absent, Digest.of(b"")])

        self.assertEqual(missing, [absent])

    @async_test
    async def test_empty_list_makes_no_call(self):
        client = await self.make_client()
        self.assertEqual(await client.find_missing([]), [])
        self.assertEqual(self.server.calls, [])


class UploadTests(CasClientTestCase):
    max_batch_bytes = 10_000

    @async_test
    async def test_batches_respect_server_limit(self):
        client = await self.make_client()
        blobs = {Digest.of(blob(i, 900)): blob(i, 900) for i in range(40)}

        await client.upload(blobs=blobs)

        self.assertEqual(self.server.blobs, blobs)
        sizes = self.server.batch_update_request_sizes
        self.assertGreater(len(sizes), 1)
        for size in sizes:
            self.assertLessEqual(size, self.max_batch_bytes)
        # Per-entry overhead counts: 40 blobs of 900 bytes would fit 11 to a batch by data
        # size alone, but only 10 with their digests and framing.
        self.assertEqual(len(sizes), 4)
        self.assertEqual(self.server.write_resource_names, [])

    @async_test
    async def test_large_blob_uses_bytestream_chunks(self):
        client = await self.make_client()
        data = blob(1, 2 * CHUNK_BYTES + 123)
        digest = Digest.of(data)

        await client.upload(blobs={digest: data})

        self.assertEqual(self.server.blobs[digest], data)
        self.assertEqual(len(self.server.write_resource_names), 1)
        self.assertRegex(
            self.server.write_resource_names[0],
            rf"^uploads/{UUID_PATTERN}/blobs/{digest.hash}/{digest.size_bytes}$",
        )
        self.assertEqual(self.server.write_chunk_sizes, [CHUNK_BYTES, CHUNK_BYTES, 123])

    @async_test
    async def test_files_small_and_large(self):
        client = await self.make_client()
        directory = make_temp_dir(self)
        small_path = os.path.join(directory, "small")
        large_path = os.path.join(directory, "large")
        write_file(small_path, b"small file")
        write_file(large_path, blob(2, CHUNK_BYTES + 1))

        await client.upload(
            files={Digest.of(b"small file"): small_path, Digest.of(blob(2, CHUNK_BYTES + 1)): large_path}
        )

        self.assertEqual(self.server.blobs[Digest.of(b"small file")], b"small file")
        self.assertEqual(self.server.blobs[Digest.of(blob(2, CHUNK_BYTES + 1))], blob(2, CHUNK_BYTES + 1))
        self.assertEqual(self.server.write_chunk_sizes, [CHUNK_BYTES, 1])

    @async_test
    async def test_upload_missing_skips_present(self):
        client = await self.make_client()
        present = self.server.put(b"already there")
        self.server.calls.clear()

        uploaded = await client.upload_missing(
            blobs={present: b"already there", Digest.of(b"new"): b"new", Digest.of(b""): b""}
        )

        self.assertEqual(uploaded, [Digest.of(b"new")])
        self.assertEqual(self.server.calls, ["GetCapabilities", "FindMissingBlobs", "BatchUpdateBlobs"])


class InstanceNameTests(CasClientTestCase):
    max_batch_bytes = 1000
    instance_name = "main/linux"

    @async_test
    async def test_resource_names_carry_instance(self):
        client = await self.make_client()
        data = blob(3, 5000)
        digest = Digest.of(data)

        await client.upload(blobs={digest: data})
        destination = os.path.join(make_temp_dir(self), "out")
        await client.download_files({digest: destination})

        self.assertRegex(
            self.server.write_resource_names[0],
            rf"^main/linux/uploads/{UUID_PATTERN}/blobs/{digest.hash}/5000$",
        )
        self.assertEqual(self.server.read_resource_names, [f"main/linux/blobs/{digest.hash}/5000"])
        self.assertEqual(read_file(destination), data)


class DownloadTests(CasClientTestCase):
    max_batch_bytes = 10_000

    @async_test
    async def test_read_blobs_small_and_large(self):
        client = await self.make_client()
        small = {self.server.put(blob(i, 500)): blob(i, 500) for i in range(30)}
        large_data = blob(99, 50_000)
        large = self.server.put(large_data)

        result = await client.read_blobs(list(small) + [large, Digest.of(b"")])

        self.assertEqual(result, {**small, large: large_data, Digest.of(b""): b""})
        for size in self.server.batch_read_request_sizes:
            self.assertLessEqual(size, self.max_batch_bytes)
        self.assertEqual(len(self.server.read_resource_names), 1)

    @async_test
    async def test_missing_blobs_listed(self):
        client = await self.make_client()
        present = self.server.put(b"here")
        absent_small = Digest.of(b"gone")
        absent_large = Digest.of(blob(5, 20_000))

        with self.assertRaises(MissingBlobsError) as caught:
            await client.read_blobs([present, absent_small, absent_large])

        self.assertEqual(set(caught.exception.digests), {absent_small, absent_large})

    @async_test
    async def test_corrupt_batch_data_rejected(self):
        client = await self.make_client()
        digest = self.server.put(b"precious")
        self.server.corrupt.add(digest)

        with self.assertRaises(BlobIntegrityError) as caught:
            await client.read_blob(digest)

        self.assertIn(str(digest), caught.exception.message)

    @async_test
    async def test_large_file_streams_to_disk(self):
        client = await self.make_client()
        data = blob(7, 3 * CHUNK_BYTES + 17)
        digest = self.server.put(data)
        directory = make_temp_dir(self)
        destination = os.path.join(directory, "big")

        await client.download_files({digest: destination})

        self.assertEqual(read_file(destination), data)
        self.assertEqual(os.listdir(directory), ["big"])

    @async_test
    async def test_corrupt_stream_leaves_no_file(self):
        client = await self.make_client()
        data = blob(8, 40_000)
        digest = self.server.put(data)
        self.server.corrupt.add(digest)
        directory = make_temp_dir(self)

        with self.assertRaises(BlobIntegrityError):
            await client.download_files({digest: os.path.join(directory, "big")})

        self.assertEqual(os.listdir(directory), [])

    @async_test
    async def test_missing_file_reported_others_written(self):
        client = await self.make_client()
        present = self.server.put(b"present")
        absent = Digest.of(b"absent")
        directory = make_temp_dir(self)

        with self.assertRaises(MissingBlobsError) as caught:
            await client.download_files(
                {present: os.path.join(directory, "p"), absent: os.path.join(directory, "a")}
            )

        self.assertEqual(caught.exception.digests, [absent])
        self.assertEqual(os.listdir(directory), ["p"])


class DefaultLimitTests(CasClientTestCase):
    @async_test
    async def test_zero_limit_means_default(self):
        client = await self.make_client()
        self.assertEqual(await client.batch_limit(), DEFAULT_BATCH_LIMIT_BYTES)


class DirectoryTransferTests(CasClientTestCase):
    max_batch_bytes = 64 * 1024

    def make_source_tree(self):
        source = make_temp_dir(self)
        write_file(os.path.join(source, "bin", "tool"), b"#!/bin/sh\necho hi\n", executable=True)
        write_file(os.path.join(source, "data", "big"), blob(4, 200_000))
        write_file(os.path.join(source, "data", "copy-of-big"), blob(4, 200_000))
        write_file(os.path.join(source, "empty"), b"")
        os.mkdir(os.path.join(source, "empty-dir"))
        os.symlink("bin/tool", os.path.join(source, "tool-link"))
        return source

    def assert_same_tree(self, expected, actual):
        expected_entries = sorted(os.listdir(expected))
        self.assertEqual(sorted(os.listdir(actual)), expected_entries)
        for name in expected_entries:
            expected_path = os.path.join(expected, name)
            actual_path = os.path.join(actual, name)
            if os.path.islink(expected_path):
                self.assertEqual(os.readlink(actual_path), os.readlink(expected_path))
            elif os.path.isdir(expected_path):
                self.assert_same_tree(expected_path, actual_path)
            else:
                self.assertEqual(read_file(actual_path), read_file(expected_path))
                expected_executable = bool(os.stat(expected_path).st_mode & stat.S_IXUSR)
                actual_executable = bool(os.stat(actual_path).st_mode & stat.S_IXUSR)
                self.assertEqual(actual_executable, expected_executable, name)

    @async_test
    async def test_upload_then_download_directory(self):
        client = await self.make_client()
        source = self.make_source_tree()

        root_digest = await client.upload_directory(source)
        destination = os.path.join(make_temp_dir(self), "copy")
        await client.download_directory(root_digest, destination)

        self.assert_same_tree(source, destination)
        self.assertEqual(root_digest, tree.scan_directory(source).root_digest)

    @async_test
    async def test_download_tree_message(self):
        client = await self.make_client()
        source = self.make_source_tree()
        scanned = tree.scan_directory(source)
        await client.upload(files=scanned.files)
        tree_data = tree.serialize(scanned.to_tree())
        tree_digest = self.server.put(tree_data)

        destination = os.path.join(make_temp_dir(self), "copy")
        await client.download_tree(tree_digest, destination)

        self.assert_same_tree(source, destination)

    @async_test
    async def test_invalid_tree_writes_nothing(self):
        client = await self.make_client()
        file_digest = self.server.put(b"payload")
        bad_roots = [
            re_pb2.Directory(files=[re_pb2.FileNode(name="../evil", digest=file_digest.to_proto(re_pb2.Digest))]),
            re_pb2.Directory(
                files=[re_pb2.FileNode(name="ok", digest=file_digest.to_proto(re_pb2.Digest))],
                symlinks=[re_pb2.SymlinkNode(name="out", target="../../etc")],
            ),
        ]
        parent = make_temp_dir(self)
        for index, root in enumerate(bad_roots):
            root_digest = self.server.put(tree.serialize(root))
            destination = os.path.join(parent, f"copy{index}")

            with self.assertRaises(InvalidArgumentError):
                await client.download_directory(root_digest, destination)

            self.assertFalse(os.path.exists(destination))
        self.assertEqual(os.listdir(parent), [])

    @async_test
    async def test_missing_directory_reported(self):
        client = await self.make_client()
        child = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=Digest.of(b"f").to_proto(re_pb2.Digest))])
        child_digest = Digest.of(tree.serialize(child))
        root = re_pb2.Directory(
            directories=[re_pb2.DirectoryNode(name="child", digest=child_digest.to_proto(re_pb2.Digest))]
        )
        root_digest = self.server.put(tree.serialize(root))

        with self.assertRaises(MissingBlobsError) as caught:
            await client.download_directory(root_digest, os.path.join(make_temp_dir(self), "copy"))

        self.assertEqual(caught.exception.digests, [child_digest])
