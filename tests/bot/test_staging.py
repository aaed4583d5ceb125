"""Tests of input staging: fetching an input tree through the blob cache and copying it
into an exec root, and the rejection of trees that would write outside it."""

import os
import stat

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bot.cache import BlobCache
from bgrid.bot.staging import fetch_input_layout, remove_tree, stage_layout
from bgrid.client import tree
from bgrid.client.cas import CasClient
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError, MissingBlobsError
from tests.client.fakes import FakeCas, open_test_channel, start_server
from tests.util import async_test, make_temp_dir


def snapshot(path):
    """Return every path below ``path`` with its type, without following symlinks."""
    entries = set()
    for current, directories, files in os.walk(path):
        for name in directories + files:
            full = os.path.join(current, name)
            entries.add((os.path.relpath(full, path), os.path.islink(full), os.path.isdir(full)))
    return entries


class StagingTests(unittest.TestCase):
    @async_test
    async def setUp(self):
        self.server = FakeCas()
        address = await start_server(self, cas=self.server)
        self.outside = make_temp_dir(self)
        self.work_dir = os.path.join(self.outside, "work")
        os.mkdir(self.work_dir)
        cas = CasClient(open_test_channel(self, address))
        self.cache = BlobCache(os.path.join(self.work_dir, "cache"), 10 ** 9, cas)
        self.cache.load()
        self.exec_root = os.path.join(self.work_dir, "build", "lease", "root")
        os.makedirs(os.path.dirname(self.exec_root))

    def put_directory(self, directory):
        return self.server.put(tree.serialize(directory))

    def file_node(self, name, data, executable=False):
        digest = self.server.put(data)
        return re_pb2.FileNode(name=name, digest=digest.to_proto(re_pb2.Digest), is_executable=executable)

    def directory_node(self, name, directory):
        return re_pb2.DirectoryNode(name=name, digest=self.put_directory(directory).to_proto(re_pb2.Digest))

    async def stage(self, root):
        root_digest = self.put_directory(root)
        with self.cache.pinned() as pins:
            layout = await fetch_input_layout(self.cache, pins, root_digest)
            stage_layout(self.exec_root, layout, self.cache)

    @async_test
    async def test_stages_files_directories_symlinks(self):
        sub = re_pb2.Directory(files=[self.file_node("tool", b"#!/bin/sh\n", executable=True)])
        root = re_pb2.Directory(
            files=[self.file_node("data.txt", b"data"), self.file_node("empty", b"")],
            directories=[self.directory_node("bin", sub), self.directory_node("copy", sub)],
            symlinks=[re_pb2.SymlinkNode(name="run", target="bin/tool")],
        )

        await self.stage(root)

        with open(os.path.join(self.exec_root, "data.txt"), "rb") as source:
            self.assertEqual(source.read(), b"data")
        self.assertEqual(os.path.getsize(os.path.join(self.exec_root, "empty")), 0)
        for directory in ("bin", "copy"):
            mode = os.stat(os.path.join(self.exec_root, directory, "tool")).st_mode
            self.assertTrue(mode & stat.S_IXUSR, directory)
        self.assertFalse(os.stat(os.path.join(self.exec_root, "data.txt")).st_mode & stat.S_IXUSR)
        self.assertEqual(os.readlink(os.path.join(self.exec_root, "run")), "bin/tool")

    @async_test
    async def test_staged_files_are_copies(self):
        node = self.file_node("data.txt", b"original")
        await self.stage(re_pb2.Directory(files=[node]))
        staged = os.path.join(self.exec_root, "data.txt")
        cached = self.cache.path(Digest.from_proto(node.digest))

        with open(staged, "wb") as target:
            target.write(b"changed by the action")

        self.assertNotEqual(os.stat(staged).st_ino, os.stat(cached).st_ino)
        with open(cached, "rb") as source:
            self.assertEqual(source.read(), b"original")

    @async_test
    async def test_repeated_inputs_not_downloaded_again(self):
        root = re_pb2.Directory(files=[self.file_node("a", b"a" * 10)])
        await self.stage(root)
        remove_tree(self.exec_root)
        self.server.calls.clear()

        await self.stage(root)

        self.assertEqual(self.server.calls, [])

    @async_test
    async def test_missing_input_blob_reported(self):
        absent = Digest.of(b"never uploaded")
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="f", digest=absent.to_proto(re_pb2.Digest))]
        )
        with self.assertRaises(MissingBlobsError) as caught:
            await self.stage(root)
        self.assertEqual(caught.exception.digests, [absent])
        self.assertFalse(os.path.exists(self.exec_root))

    @async_test
    async def test_rejected_trees_touch_nothing_outside(self):
        payload = self.file_node("x", b"payload")
        empty = re_pb2.Directory()
        escaping_sub = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="up", target="..")])
        bad_roots = {
            "file named ..": re_pb2.Directory(
                files=[re_pb2.FileNode(name="..", digest=payload.digest)]
            ),
            "file name with slash": re_pb2.Directory(
                files=[re_pb2.FileNode(name="../../../escaped", digest=payload.digest)]
            ),
            "empty directory name": re_pb2.Directory(directories=[self.directory_node("", empty)]),
            "directory named .": re_pb2.Directory(directories=[self.directory_node(".", empty)]),
            "absolute symlink": re_pb2.Directory(
                symlinks=[re_pb2.SymlinkNode(name="abs", target=self.outside)]
            ),
            "symlink above root": re_pb2.Directory(
                symlinks=[re_pb2.SymlinkNode(name="up", target="../../../..")]
            ),
            "symlink chain": re_pb2.Directory(
                directories=[self.directory_node("x", escaping_sub)],
                symlinks=[re_pb2.SymlinkNode(name="esc", target="x/up/../escaped")],
            ),
            "symlink and file with one name": re_pb2.Directory(
                files=[re_pb2.FileNode(name="same", digest=payload.digest)],
                symlinks=[re_pb2.SymlinkNode(name="same", target="elsewhere")],
            ),
        }
        before = snapshot(self.outside)

        for case, root in bad_roots.items():
            with self.assertRaises(InvalidArgumentError, msg=case):
                await self.stage(root)
            self.assertFalse(os.path.exists(self.exec_root), case)

        after = snapshot(self.outside)
        created = {entry for entry in after - before if not entry[0].startswith("work/cache")}
        self.assertEqual(created, set())


class RemoveTreeTests(unittest.TestCase):
    def test_removes_read_only_directories(self):
        root = os.path.join(make_temp_dir(self), "root")
        locked = os.path.join(root, "a", "locked")
        os.makedirs(locked)
        with open(os.path.join(locked, "f"), "w") as target:
            target.write("x")
        os.chmod(locked, 0o500)
        os.chmod(os.path.join(root, "a"), 0o000)

        remove_tree(root)

        self.assertFalse(os.path.exists(root))

    def test_symlink_target_left_alone(self):
        base = make_temp_dir(self)
        outside = os.path.join(base, "outside")
        os.mkdir(outside)
        os.chmod(outside, 0o555)
        root = os.path.join(base, "root")
        os.mkdir(root)
        os.symlink(outside, os.path.join(root, "link"))

        remove_tree(root)

        self.assertFalse(os.path.exists(root))
        self.assertTrue(os.path.isdir(outside))
        self.assertEqual(stat.S_IMODE(os.stat(outside).st_mode), 0o555)
