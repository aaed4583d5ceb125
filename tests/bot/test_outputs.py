"""Tests of output paths: parsing, parent directory creation and collection after a run."""

import os

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bot.outputs import ANY, DIRECTORY, FILE, OutputSpec, collect_outputs
from bgrid.client import tree
from bgrid.digest import Digest
from bgrid.errors import FailedPreconditionError, InvalidArgumentError
from tests.util import make_temp_dir


def write_file(path, data=b"", executable=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as target:
        target.write(data)
    os.chmod(path, 0o755 if executable else 0o644)


def digest_of(proto):
    return Digest.from_proto(proto)


class OutputSpecTests(unittest.TestCase):
    def test_output_paths_supersede_old_fields(self):
        command = re_pb2.Command(
            output_paths=["a/b", "c"], output_files=["ignored"], output_directories=["ignored2"],
            working_directory="work",
        )
        spec = OutputSpec.from_command(command)
        self.assertEqual(spec.working_directory, ("work",))
        self.assertEqual([(o.path, o.parts, o.kind) for o in spec.outputs],
                         [("a/b", ("a", "b"), ANY), ("c", ("c",), ANY)])

    def test_old_fields(self):
        command = re_pb2.Command(output_files=["out/f"], output_directories=["out/d", ""])
        spec = OutputSpec.from_command(command)
        self.assertEqual([(o.path, o.kind) for o in spec.outputs],
                         [("out/f", FILE), ("out/d", DIRECTORY), ("", DIRECTORY)])

    def test_invalid_paths_rejected(self):
        commands = [
            re_pb2.Command(output_paths=["../escape"]),
            re_pb2.Command(output_paths=["/absolute"]),
            re_pb2.Command(output_files=["a/./b"]),
            re_pb2.Command(output_files=[""]),
            re_pb2.Command(output_directories=["trailing/"]),
            re_pb2.Command(working_directory="../up"),
        ]
        for command in commands:
            with self.assertRaises(InvalidArgumentError, msg=str(command)):
                OutputSpec.from_command(command)


class CreateDirectoriesTests(unittest.TestCase):
    def setUp(self):
        self.exec_root = os.path.join(make_temp_dir(self), "root")
        os.mkdir(self.exec_root)

    def test_parents_created_outputs_not(self):
        command = re_pb2.Command(
            working_directory="pkg",
            output_paths=["out/deep/file", "top"],
        )
        working_directory = OutputSpec.from_command(command).create_directories(self.exec_root)

        self.assertEqual(working_directory, os.path.join(os.path.realpath(self.exec_root), "pkg"))
        self.assertTrue(os.path.isdir(os.path.join(self.exec_root, "pkg", "out", "deep")))
        self.assertFalse(os.path.exists(os.path.join(self.exec_root, "pkg", "out", "deep", "file")))
        self.assertFalse(os.path.exists(os.path.join(self.exec_root, "pkg", "top")))

    def test_old_output_directories_get_parents_only(self):
        command = re_pb2.Command(output_files=["f/x"], output_directories=["d/e"])
        OutputSpec.from_command(command).create_directories(self.exec_root)

        self.assertTrue(os.path.isdir(os.path.join(self.exec_root, "f")))
        self.assertTrue(os.path.isdir(os.path.join(self.exec_root, "d")))
        self.assertFalse(os.path.exists(os.path.join(self.exec_root, "d", "e")))

    def test_symlink_inside_followed(self):
        os.mkdir(os.path.join(self.exec_root, "real"))
        os.symlink("real", os.path.join(self.exec_root, "alias"))
        command = re_pb2.Command(output_paths=["alias/sub/out"])

        OutputSpec.from_command(command).create_directories(self.exec_root)

        self.assertTrue(os.path.isdir(os.path.join(self.exec_root, "real", "sub")))

    def test_symlink_outside_rejected(self):
        outside = make_temp_dir(self)
        os.symlink(outside, os.path.join(self.exec_root, "escape"))
        command = re_pb2.Command(output_paths=["escape/sub/out"])

        with self.assertRaises(InvalidArgumentError) as caught:
            OutputSpec.from_command(command).create_directories(self.exec_root)

        self.assertIn("outside the exec root", caught.exception.message)
        self.assertEqual(os.listdir(outside), [])

    def test_file_in_the_way_rejected(self):
        write_file(os.path.join(self.exec_root, "blocker"), b"x")
        command = re_pb2.Command(output_paths=["blocker/out"])
        with self.assertRaises(InvalidArgumentError) as caught:
            OutputSpec.from_command(command).create_directories(self.exec_root)
        self.assertIn("'blocker'", caught.exception.message)


class CollectOutputsTests(unittest.TestCase):
    def setUp(self):
        self.exec_root = os.path.join(make_temp_dir(self), "root")
        os.mkdir(self.exec_root)

    def collect(self, **command_fields):
        spec = OutputSpec.from_command(re_pb2.Command(**command_fields))
        spec.create_directories(self.exec_root)
        return spec

    def test_files_with_executable_bit_and_empty_file(self):
        spec = self.collect(working_directory="w", output_paths=["bin/tool", "empty", "text"])
        write_file(os.path.join(self.exec_root, "w", "bin", "tool"), b"#!", executable=True)
        write_file(os.path.join(self.exec_root, "w", "empty"))
        write_file(os.path.join(self.exec_root, "w", "text"), b"hello")

        collected = collect_outputs(self.exec_root, spec)

        files = {entry.path: entry for entry in collected.result.output_files}
        self.assertEqual(sorted(files), ["bin/tool", "empty", "text"])
        self.assertTrue(files["bin/tool"].is_executable)
        self.assertFalse(files["text"].is_executable)
        self.assertEqual(digest_of(files["empty"].digest), Digest.of(b""))
        self.assertEqual(digest_of(files["text"].digest), Digest.of(b"hello"))
        self.assertEqual(
            collected.files[Digest.of(b"hello")],
            os.path.join(os.path.realpath(self.exec_root), "w", "text"),
        )
        self.assertEqual(collected.blobs, {})

    def test_missing_outputs_absent(self):
        spec = self.collect(output_paths=["never/made", "also-not"])
        collected = collect_outputs(self.exec_root, spec)
        self.assertEqual(collected.result, re_pb2.ActionResult())

    def test_directory_becomes_tree(self):
        spec = self.collect(output_paths=["out"])
        out = os.path.join(self.exec_root, "out")
        write_file(os.path.join(out, "a", "x"), b"x")
        write_file(os.path.join(out, "b", "x"), b"x")
        write_file(os.path.join(out, "c", "deeper", "run"), b"run", executable=True)
        os.mkdir(os.path.join(out, "empty-dir"))
        os.symlink("a/x", os.path.join(out, "link"))

        collected = collect_outputs(self.exec_root, spec)

        (directory,) = collected.result.output_directories
        self.assertEqual(directory.path, "out")
        self.assertTrue(directory.is_topologically_sorted)
        self.assertFalse(directory.HasField("root_directory_digest"))
        tree_data = collected.blobs[digest_of(directory.tree_digest)]
        root_digest, directories = tree.parse_tree(tree_data)
        layout = tree.layout_tree(root_digest, directories)
        self.assertEqual(sorted(layout.directories), ["a", "b", "c", "c/deeper", "empty-dir"])
        self.assertEqual(
            sorted((entry.path, entry.is_executable) for entry in layout.files),
            [("a/x", False), ("b/x", False), ("c/deeper/run", True)],
        )
        self.assertEqual(layout.symlinks, [tree.SymlinkEntry("link", "a/x")])
        # a/ and b/ are identical, so the Tree stores that Directory once.
        parsed = re_pb2.Tree.FromString(tree_data)
        self.assertEqual(len(parsed.children), 4)
        self.assertEqual(set(collected.files), {Digest.of(b"x"), Digest.of(b"run")})

    def test_directory_format_directory_only(self):
        spec = self.collect(
            output_paths=["out"], output_directory_format=re_pb2.Command.DIRECTORY_ONLY
        )
        write_file(os.path.join(self.exec_root, "out", "sub", "f"), b"f")

        collected = collect_outputs(self.exec_root, spec)

        (directory,) = collected.result.output_directories
        root_digest = digest_of(directory.root_directory_digest)
        self.assertIn(root_digest, collected.blobs)
        self.assertIn(digest_of(directory.tree_digest), collected.blobs)
        root = re_pb2.Directory.FromString(collected.blobs[root_digest])
        self.assertIn(digest_of(root.directories[0].digest), collected.blobs)

    def test_working_directory_as_output_directory(self):
        spec = self.collect(working_directory="w", output_directories=[""])
        write_file(os.path.join(self.exec_root, "w", "f"), b"f")

        collected = collect_outputs(self.exec_root, spec)

        (directory,) = collected.result.output_directories
        self.assertEqual(directory.path, "")

    def test_symlinks_with_output_paths(self):
        spec = self.collect(output_paths=["dir-link", "dangling", "file-link"])
        os.mkdir(os.path.join(self.exec_root, "dir"))
        write_file(os.path.join(self.exec_root, "file"), b"f")
        os.symlink("dir", os.path.join(self.exec_root, "dir-link"))
        os.symlink("nowhere", os.path.join(self.exec_root, "dangling"))
        os.symlink("file", os.path.join(self.exec_root, "file-link"))

        result = collect_outputs(self.exec_root, spec).result

        pairs = lambda entries: sorted((entry.path, entry.target) for entry in entries)  # noqa: E731
        self.assertEqual(
            pairs(result.output_symlinks),
            [("dangling", "nowhere"), ("dir-link", "dir"), ("file-link", "file")],
        )
        self.assertEqual(pairs(result.output_directory_symlinks), [("dir-link", "dir")])
        self.assertEqual(
            pairs(result.output_file_symlinks), [("dangling", "nowhere"), ("file-link", "file")]
        )
        self.assertEqual(len(result.output_files), 0)
        self.assertEqual(len(result.output_directories), 0)

    def test_symlinks_with_old_fields(self):
        spec = self.collect(output_files=["f-link"], output_directories=["d-link"])
        os.mkdir(os.path.join(self.exec_root, "dir"))
        write_file(os.path.join(self.exec_root, "file"), b"f")
        os.symlink("file", os.path.join(self.exec_root, "f-link"))
        os.symlink("dir", os.path.join(self.exec_root, "d-link"))

        result = collect_outputs(self.exec_root, spec).result

        self.assertEqual([entry.path for entry in result.output_file_symlinks], ["f-link"])
        self.assertEqual([entry.path for entry in result.output_directory_symlinks], ["d-link"])
        self.assertEqual(len(result.output_symlinks), 0)

    def test_old_fields_with_files_and_directories(self):
        spec = self.collect(output_files=["out/f"], output_directories=["out/d"])
        write_file(os.path.join(self.exec_root, "out", "f"), b"file")
        write_file(os.path.join(self.exec_root, "out", "d", "inner"), b"inner")

        result = collect_outputs(self.exec_root, spec).result

        self.assertEqual([entry.path for entry in result.output_files], ["out/f"])
        self.assertEqual([entry.path for entry in result.output_directories], ["out/d"])

    def test_wrong_type_for_old_fields(self):
        cases = [
            (dict(output_files=["x"]), "directory", "output file 'x' is a directory"),
            (dict(output_directories=["x"]), "file", "output directory 'x' is a regular file"),
            (dict(output_files=["x"]), "dir-link", "symlink to a directory"),
            (dict(output_directories=["x"]), "file-link", "symlink to a file"),
        ]
        for fields, kind, expected in cases:
            exec_root = os.path.join(make_temp_dir(self), "root")
            os.mkdir(exec_root)
            target = os.path.join(exec_root, "x")
            if kind == "directory":
                os.mkdir(target)
            elif kind == "file":
                write_file(target, b"x")
            elif kind == "dir-link":
                os.mkdir(os.path.join(exec_root, "d"))
                os.symlink("d", target)
            else:
                write_file(os.path.join(exec_root, "f"), b"f")
                os.symlink("f", target)
            spec = OutputSpec.from_command(re_pb2.Command(**fields))

            with self.assertRaises(FailedPreconditionError, msg=expected) as caught:
                collect_outputs(exec_root, spec)

            self.assertIn(expected, caught.exception.message)

    def test_parent_symlink_leaving_exec_root_rejected(self):
        outside = make_temp_dir(self)
        write_file(os.path.join(outside, "secret"), b"secret")
        spec = self.collect(output_paths=["link/secret"])
        os.rmdir(os.path.join(self.exec_root, "link"))
        os.symlink(outside, os.path.join(self.exec_root, "link"))

        with self.assertRaises(InvalidArgumentError) as caught:
            collect_outputs(self.exec_root, spec)

        self.assertIn("outside the exec root", caught.exception.message)

    def test_fifo_output_rejected(self):
        spec = self.collect(output_paths=["pipe"])
        os.mkfifo(os.path.join(self.exec_root, "pipe"))
        with self.assertRaises(InvalidArgumentError):
            collect_outputs(self.exec_root, spec)


class OutputSymlinkTargetTests(unittest.TestCase):
    """Output symlinks must stay inside the exec root: bgrid advertises
    symlink_absolute_path_strategy DISALLOWED."""

    def setUp(self):
        self.exec_root = os.path.join(make_temp_dir(self), "root")
        os.mkdir(self.exec_root)

    def prepare(self, **command_fields):
        spec = OutputSpec.from_command(re_pb2.Command(**command_fields))
        spec.create_directories(self.exec_root)
        return spec

    def link(self, path, target):
        full = os.path.join(self.exec_root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.symlink(target, full)

    def rejection(self, spec):
        """Collect the outputs expecting FailedPreconditionError; return its message."""
        with self.assertRaises(FailedPreconditionError) as caught:
            collect_outputs(self.exec_root, spec)
        return caught.exception.message

    def test_absolute_output_symlink_rejected(self):
        spec = self.prepare(output_paths=["out"])
        self.link("out", "/etc/hostname")

        message = self.rejection(spec)

        self.assertIn("output symlink 'out'", message)
        self.assertIn("absolute target '/etc/hostname'", message)
        self.assertIn("DISALLOWED", message)

    def test_escaping_relative_symlink_rejected(self):
        spec = self.prepare(working_directory="w", output_paths=["rel"])
        self.link("w/rel", "../../../../../../../etc/hostname")

        message = self.rejection(spec)

        self.assertIn("output symlink 'rel'", message)
        self.assertIn("'../../../../../../../etc/hostname'", message)
        self.assertIn("resolves outside the exec root", message)

    def test_one_level_above_exec_root_rejected(self):
        spec = self.prepare(working_directory="w", output_paths=["up"])
        self.link("w/up", "../..")

        self.assertIn("resolves outside the exec root", self.rejection(spec))

    def test_absolute_symlink_in_tree_rejected(self):
        spec = self.prepare(output_paths=["d"])
        write_file(os.path.join(self.exec_root, "d", "file"), b"f")
        self.link("d/etclink", "/etc")

        message = self.rejection(spec)

        self.assertIn("symlink 'd/etclink' in output directory 'd'", message)
        self.assertIn("absolute target '/etc'", message)

    def test_deep_escaping_symlink_rejected(self):
        spec = self.prepare(output_directories=["d"])
        self.link("d/sub/deeper/up", "../../../..")

        message = self.rejection(spec)

        self.assertIn("symlink 'd/sub/deeper/up' in output directory 'd'", message)
        self.assertIn("resolves outside the exec root", message)

    def test_working_directory_output_checked(self):
        spec = self.prepare(working_directory="w", output_directories=[""])
        self.link("w/sub/up", "../../..")

        message = self.rejection(spec)

        self.assertIn("symlink 'sub/up' in the working directory", message)

    def test_old_fields_rejected_before_type_checks(self):
        cases = [
            (dict(output_files=["f"]), "/etc/hostname"),
            (dict(output_directories=["d"]), "/etc"),
            (dict(output_files=["f"]), "../../../../../../../etc/hostname"),
            (dict(output_directories=["d"]), "../../../../../../../etc"),
        ]
        for fields, target in cases:
            with self.subTest(fields=fields, target=target):
                self.exec_root = os.path.join(make_temp_dir(self), "root")
                os.mkdir(self.exec_root)
                spec = self.prepare(**fields)
                (path,) = fields.get("output_files", []) + fields.get("output_directories", [])
                self.link(path, target)

                message = self.rejection(spec)

                self.assertIn(f"output symlink {path!r}", message)
                self.assertIn(repr(target), message)

    def test_escape_through_another_symlink_rejected(self):
        # "inner" stays inside, but ".." after it leaves the root, as the kernel resolves it.
        spec = self.prepare(output_paths=["w/via"])
        os.makedirs(os.path.join(self.exec_root, "d", "sub"))
        self.link("w/inner", "../d/sub")
        self.link("w/via", "inner/../../..")

        self.assertIn("resolves outside the exec root", self.rejection(spec))

    def test_escape_through_absolute_symlink_rejected(self):
        # The absolute link is not an output itself, yet the output resolves through it.
        spec = self.prepare(output_paths=["via"])
        self.link("etc", "/etc")
        self.link("via", "etc/hostname")

        message = self.rejection(spec)

        self.assertIn("output symlink 'via'", message)
        self.assertIn("resolves outside the exec root", message)

    def test_symlink_loop_rejected(self):
        spec = self.prepare(output_paths=["a"])
        self.link("a", "b")
        self.link("b", "a")

        self.assertIn("does not resolve within 40 symlinks", self.rejection(spec))

    def test_inside_symlinks_kept(self):
        spec = self.prepare(
            working_directory="w",
            output_paths=["to-input", "to-root", "dangling", "chain", "tree"],
        )
        write_file(os.path.join(self.exec_root, "input"), b"input")
        write_file(os.path.join(self.exec_root, "w", "tree", "sub", "file"), b"f")
        # Targets outside the working directory and the output Tree, but inside the exec root.
        self.link("w/to-input", "../input")
        self.link("w/to-root", "..")
        self.link("w/dangling", "not/made/yet")
        self.link("w/chain", "to-root/w/./to-input")
        self.link("w/tree/sub/up", "../../../input")
        self.link("w/tree/sub/sibling", "file")
        self.link("w/tree/dir-link", "sub")

        collected = collect_outputs(self.exec_root, spec)

        self.assertEqual(
            sorted((entry.path, entry.target) for entry in collected.result.output_symlinks),
            [("chain", "to-root/w/./to-input"), ("dangling", "not/made/yet"),
             ("to-input", "../input"), ("to-root", "..")],
        )
        (directory,) = collected.result.output_directories
        root_digest, directories = tree.parse_tree(collected.blobs[digest_of(directory.tree_digest)])
        symlinks = {}
        for message in directories.values():
            symlinks.update((node.name, node.target) for node in message.symlinks)
        self.assertEqual(
            symlinks, {"up": "../../../input", "sibling": "file", "dir-link": "sub"}
        )

    def test_inside_symlinks_kept_old_fields(self):
        spec = self.prepare(
            working_directory="w", output_files=["f-link"], output_directories=["d-link", "d"]
        )
        write_file(os.path.join(self.exec_root, "data", "file"), b"data")
        self.link("w/f-link", "../data/file")
        self.link("w/d-link", "../data")
        self.link("w/d/up", "../../data/file")

        result = collect_outputs(self.exec_root, spec).result

        self.assertEqual(
            [(entry.path, entry.target) for entry in result.output_file_symlinks],
            [("f-link", "../data/file")],
        )
        self.assertEqual(
            [(entry.path, entry.target) for entry in result.output_directory_symlinks],
            [("d-link", "../data")],
        )
        self.assertEqual([entry.path for entry in result.output_directories], ["d"])
