"""Tests of name checks, directory scanning and tree layout in bgrid.client.tree."""

import os
import stat

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.client import tree
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError, MissingBlobsError
from tests.util import make_temp_dir


def write_file(path, data=b"", executable=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as target:
        target.write(data)
    os.chmod(path, 0o755 if executable else 0o644)


def file_node(name, data, executable=False):
    return re_pb2.FileNode(
        name=name, digest=Digest.of(data).to_proto(re_pb2.Digest), is_executable=executable
    )


def directory_node(name, directory):
    return re_pb2.DirectoryNode(
        name=name, digest=Digest.of(tree.serialize(directory)).to_proto(re_pb2.Digest)
    )


def index(*directories):
    return {Digest.of(tree.serialize(directory)): directory for directory in directories}


def length_delimited(field_number, payload):
    """Encode one length-delimited protobuf field by hand."""
    encoded = bytes([(field_number << 3) | 2])
    length = len(payload)
    while length >= 0x80:
        encoded += bytes([(length & 0x7F) | 0x80])
        length >>= 7
    return encoded + bytes([length]) + payload


def root_digest(directory):
    return Digest.of(tree.serialize(directory))


class CheckNameTests(unittest.TestCase):
    def test_valid_names(self):
        for name in ["a", "file.txt", ".hidden", "...", "a b", "ünïcode", "a\\b"]:
            self.assertEqual(tree.check_name(name), name)

    def test_invalid_names(self):
        for name, reason in [("", "empty"), (".", "'.'"), ("..", "'..'"), ("a/b", "'/'"),
                             ("a\0b", "NUL")]:
            with self.assertRaises(InvalidArgumentError, msg=name) as caught:
                tree.check_name(name, "file name")
            self.assertIn("invalid file name", caught.exception.message)
            self.assertIn(reason, caught.exception.message)


class SplitRelativePathTests(unittest.TestCase):
    def test_valid_paths(self):
        self.assertEqual(tree.split_relative_path("a"), ("a",))
        self.assertEqual(tree.split_relative_path("a/b/c"), ("a", "b", "c"))
        self.assertEqual(tree.split_relative_path("", allow_empty=True), ())

    def test_invalid_paths(self):
        for path in ["", "/a", "a/", "a//b", "a/./b", "a/../b", "..", "."]:
            with self.assertRaises(InvalidArgumentError, msg=path) as caught:
                tree.split_relative_path(path, "output path")
            self.assertIn("invalid output path", caught.exception.message)


class ScanDirectoryTests(unittest.TestCase):
    def setUp(self):
        self.root = make_temp_dir(self)

    def test_files_sorted_with_executable_bit(self):
        write_file(os.path.join(self.root, "b.txt"), b"bee")
        write_file(os.path.join(self.root, "a.sh"), b"#!/bin/sh\n", executable=True)
        write_file(os.path.join(self.root, "empty"))

        scanned = tree.scan_directory(self.root)

        names = [node.name for node in scanned.root.files]
        self.assertEqual(names, ["a.sh", "b.txt", "empty"])
        executable = {node.name: node.is_executable for node in scanned.root.files}
        self.assertEqual(executable, {"a.sh": True, "b.txt": False, "empty": False})
        empty_node = scanned.root.files[2]
        self.assertEqual(Digest.from_proto(empty_node.digest), Digest.of(b""))
        self.assertEqual(scanned.files[Digest.of(b"bee")], os.path.join(self.root, "b.txt"))

    def test_symlinks_kept_not_followed(self):
        write_file(os.path.join(self.root, "target"), b"data")
        os.symlink("target", os.path.join(self.root, "link"))
        os.symlink("/outside/anywhere", os.path.join(self.root, "absolute"))
        os.mkdir(os.path.join(self.root, "dir"))
        os.symlink("dir", os.path.join(self.root, "dir-link"))

        scanned = tree.scan_directory(self.root)

        symlinks = [(node.name, node.target) for node in scanned.root.symlinks]
        self.assertEqual(
            symlinks, [("absolute", "/outside/anywhere"), ("dir-link", "dir"), ("link", "target")]
        )
        self.assertEqual([node.name for node in scanned.root.directories], ["dir"])

    def test_nested_directories_deduplicated_parents_first(self):
        write_file(os.path.join(self.root, "one", "inner", "x"), b"x")
        write_file(os.path.join(self.root, "two", "inner", "x"), b"x")
        write_file(os.path.join(self.root, "top"), b"top")

        scanned = tree.scan_directory(self.root)

        # one/ and two/ are identical, so the Tree stores each Directory once.
        self.assertEqual(len(scanned.children), 2)
        one = scanned.children[0]
        self.assertEqual([node.name for node in one.directories], ["inner"])
        self.assertEqual([node.name for node in scanned.children[1].files], ["x"])
        self.assertEqual(root_digest(scanned.root), scanned.root_digest)
        self.assertEqual(len(scanned.directory_blobs), 3)
        for digest, data in scanned.directory_blobs.items():
            self.assertEqual(Digest.of(data), digest)
        self.assertEqual(len(scanned.files), 2)

    def test_empty_directory(self):
        scanned = tree.scan_directory(self.root)
        self.assertEqual(scanned.root, re_pb2.Directory())
        self.assertEqual(scanned.root_digest, Digest.of(b""))
        self.assertEqual(scanned.to_tree(), re_pb2.Tree(root=re_pb2.Directory()))

    def test_fifo_rejected(self):
        os.mkfifo(os.path.join(self.root, "pipe"))
        with self.assertRaises(InvalidArgumentError) as caught:
            tree.scan_directory(self.root)
        self.assertIn("unsupported file type", caught.exception.message)


class LayoutTreeTests(unittest.TestCase):
    def test_layout_lists_parents_first(self):
        leaf = re_pb2.Directory(files=[file_node("f", b"f", executable=True)])
        middle = re_pb2.Directory(directories=[directory_node("leaf", leaf)])
        root = re_pb2.Directory(
            files=[file_node("a", b"a")],
            directories=[directory_node("m", middle), directory_node("n", middle)],
            symlinks=[re_pb2.SymlinkNode(name="s", target="m/leaf/f")],
        )

        layout = tree.layout_tree(root_digest(root), index(root, middle, leaf))

        for path in layout.directories:
            parent = path.rpartition("/")[0]
            if parent:
                self.assertLess(layout.directories.index(parent), layout.directories.index(path))
        self.assertEqual(sorted(layout.directories), ["m", "m/leaf", "n", "n/leaf"])
        self.assertEqual(
            sorted(layout.files),
            [
                tree.FileEntry("a", Digest.of(b"a"), False),
                tree.FileEntry("m/leaf/f", Digest.of(b"f"), True),
                tree.FileEntry("n/leaf/f", Digest.of(b"f"), True),
            ],
        )
        self.assertEqual(layout.symlinks, [tree.SymlinkEntry("s", "m/leaf/f")])
        self.assertEqual(layout.file_digests(), [Digest.of(b"a"), Digest.of(b"f")])

    def assert_rejected(self, root, *others, expected):
        with self.assertRaises(InvalidArgumentError) as caught:
            tree.layout_tree(root_digest(root), index(root, *others))
        self.assertIn(expected, caught.exception.message)

    def test_invalid_names_rejected(self):
        for name in ["", ".", "..", "a/b", "../escape"]:
            self.assert_rejected(
                re_pb2.Directory(files=[file_node(name, b"x")]), expected="invalid file name"
            )
            empty = re_pb2.Directory()
            self.assert_rejected(
                re_pb2.Directory(directories=[directory_node(name, empty)]), empty,
                expected="invalid directory name",
            )
            self.assert_rejected(
                re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name=name, target="x")]),
                expected="invalid symlink name",
            )

    def test_name_used_twice_rejected(self):
        empty = re_pb2.Directory()
        root = re_pb2.Directory(
            files=[file_node("same", b"x")], directories=[directory_node("same", empty)]
        )
        self.assert_rejected(root, empty, expected="'same' is used twice")

    def test_invalid_digest_rejected(self):
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="f", digest=re_pb2.Digest(hash="zz", size_bytes=1))]
        )
        self.assert_rejected(root, expected="digest of file 'f'")

    def test_escaping_symlinks_rejected(self):
        sub = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="up", target="../..")])
        cases = [
            (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="l", target="/etc/passwd")]),
             [], "absolute path"),
            (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="l", target="..")]),
             [], "leaves the tree root"),
            (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="l", target="a/../../b")]),
             [], "leaves the tree root"),
            (re_pb2.Directory(directories=[directory_node("sub", sub)]), [sub],
             "leaves the tree root"),
            (re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="l", target="")]),
             [], "target is empty"),
        ]
        for root, others, expected in cases:
            self.assert_rejected(root, *others, expected=expected)

    def test_symlink_chain_escape_rejected(self):
        # Read literally, "x/up/../.." stays at the root, but x/up is itself a link to the
        # root, so the kernel resolves it to the root's parent.
        x = re_pb2.Directory(symlinks=[re_pb2.SymlinkNode(name="up", target="..")])
        root = re_pb2.Directory(
            directories=[directory_node("x", x)],
            symlinks=[re_pb2.SymlinkNode(name="esc", target="x/up/../..")],
        )
        self.assert_rejected(root, x, expected="leaves the tree root")

    def test_symlink_loop_rejected(self):
        root = re_pb2.Directory(
            symlinks=[re_pb2.SymlinkNode(name="a", target="b"), re_pb2.SymlinkNode(name="b", target="a")]
        )
        self.assert_rejected(root, expected="more than 40 symlinks")

    def test_symlinks_inside_accepted(self):
        sub = re_pb2.Directory(
            files=[file_node("f", b"f")],
            symlinks=[re_pb2.SymlinkNode(name="up", target="../top"),
                      re_pb2.SymlinkNode(name="self", target="./f")],
        )
        root = re_pb2.Directory(
            files=[file_node("top", b"t")],
            directories=[directory_node("sub", sub)],
            symlinks=[re_pb2.SymlinkNode(name="dangling", target="not/yet/there"),
                      re_pb2.SymlinkNode(name="via", target="sub/up")],
        )
        layout = tree.layout_tree(root_digest(root), index(root, sub))
        self.assertEqual(len(layout.symlinks), 4)

    def test_missing_directory_reported(self):
        absent = re_pb2.Directory(files=[file_node("f", b"f")])
        root = re_pb2.Directory(directories=[directory_node("a", absent), directory_node("b", absent)])
        with self.assertRaises(MissingBlobsError) as caught:
            tree.layout_tree(root_digest(root), index(root))
        self.assertEqual(caught.exception.digests, [root_digest(absent)])

    def test_entry_limit(self):
        leaf = re_pb2.Directory(files=[file_node("f", b"f")])
        root = re_pb2.Directory(
            directories=[directory_node(f"d{i}", leaf) for i in range(10)]
        )
        with self.assertRaises(InvalidArgumentError) as caught:
            tree.layout_tree(root_digest(root), index(root, leaf), max_entries=15)
        self.assertIn("more than 15 entries", caught.exception.message)


class ParseTreeTests(unittest.TestCase):
    def test_round_trip(self):
        leaf = re_pb2.Directory(files=[file_node("f", b"f")])
        root = re_pb2.Directory(directories=[directory_node("leaf", leaf)])
        data = tree.serialize(re_pb2.Tree(root=root, children=[leaf]))

        parsed_root, directories = tree.parse_tree(data)

        self.assertEqual(parsed_root, root_digest(root))
        self.assertEqual(directories, index(root, leaf))

    def test_child_digest_taken_over_stored_bytes(self):
        # Fields out of tag order: valid protobuf, but not what this library would write.
        leaf = re_pb2.Directory(
            files=[file_node("f", b"f")],
            directories=[re_pb2.DirectoryNode(name="d", digest=Digest.of(b"").to_proto(re_pb2.Digest))],
        )
        leaf_bytes = (
            length_delimited(2, leaf.directories[0].SerializeToString())
            + length_delimited(1, leaf.files[0].SerializeToString())
        )
        self.assertNotEqual(leaf_bytes, tree.serialize(leaf))
        root = re_pb2.Directory(
            directories=[
                re_pb2.DirectoryNode(name="leaf", digest=Digest.of(leaf_bytes).to_proto(re_pb2.Digest))
            ]
        )
        data = (
            length_delimited(1, tree.serialize(root))
            + length_delimited(2, leaf_bytes)
            + length_delimited(2, b"")
        )

        parsed_root, directories = tree.parse_tree(data)
        layout = tree.layout_tree(parsed_root, directories)

        self.assertEqual(sorted(layout.directories), ["leaf", "leaf/d"])
        self.assertEqual([entry.path for entry in layout.files], ["leaf/f"])

    def test_malformed_rejected(self):
        for data in [b"\x1a\x00", b"\x0a\x05ab", b"\x0a", b"\x0a\x00\x0a\x00"]:
            with self.assertRaises(InvalidArgumentError, msg=data):
                tree.parse_tree(data)


class CreateLayoutTests(unittest.TestCase):
    def test_creates_files_directories_symlinks(self):
        destination = make_temp_dir(self)
        layout = tree.TreeLayout(
            directories=["d", "d/e"],
            files=[tree.FileEntry("d/e/run", Digest.of(b"run"), True),
                   tree.FileEntry("plain", Digest.of(b"plain"), False)],
            symlinks=[tree.SymlinkEntry("link", "d/e/run")],
        )
        contents = {Digest.of(b"run"): b"run", Digest.of(b"plain"): b"plain"}

        def place_file(entry, path):
            with open(path, "wb") as target:
                target.write(contents[entry.digest])

        tree.create_layout(destination, layout, place_file)

        run_path = os.path.join(destination, "d", "e", "run")
        self.assertEqual(stat.S_IMODE(os.stat(run_path).st_mode), 0o755)
        plain_path = os.path.join(destination, "plain")
        self.assertEqual(stat.S_IMODE(os.stat(plain_path).st_mode), 0o644)
        self.assertEqual(os.readlink(os.path.join(destination, "link")), "d/e/run")
        with open(os.path.join(destination, "link"), "rb") as source:
            self.assertEqual(source.read(), b"run")

    def test_destination_must_be_empty(self):
        destination = make_temp_dir(self)
        tree.check_empty_destination(os.path.join(destination, "new"))
        self.assertTrue(os.path.isdir(os.path.join(destination, "new")))
        with self.assertRaises(InvalidArgumentError) as caught:
            tree.check_empty_destination(destination)
        self.assertIn("is not empty", caught.exception.message)
