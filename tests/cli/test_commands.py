"""The ``bgrid`` client commands against a real daemon and bot: CAS transfers, execution,
the action cache, operations and capabilities."""

import hashlib
import json
import os
import re
import stat
import subprocess

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from tests.bot.test_runner import process_is_gone, read_text
from tests.cli.support import (
    COMMAND_TIMEOUT,
    GridTestCase,
    bgrid_argv,
    bgrid_environment,
    wait_until,
)
from tests.e2e.harness import snapshot_outputs

# Seconds for a queued action to reach the bot, and for a cancelled one to stop.
ACTION_START_TIMEOUT = 30.0

ACTION_LINE = re.compile(r"^bgrid: action ([0-9a-f]{64}/[0-9]+)$", re.MULTILINE)
OPERATION_LINE = re.compile(r"^bgrid: operation (\S+)$", re.MULTILINE)


def write_file(path, data, executable=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as target:
        target.write(data)
    os.chmod(path, 0o755 if executable else 0o644)


def is_executable(path):
    return bool(os.stat(path).st_mode & stat.S_IXUSR)


def printed_digest(data):
    return f"{hashlib.sha256(data).hexdigest()}/{len(data)}"


def stop_process(process):
    """Kill a subprocess that a test started if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
        process.wait()


class CasCommandTests(GridTestCase):
    def test_file_round_trip(self):
        data = bytes(range(256)) * 1000
        source = self.path("blob.bin")
        write_file(source, data)

        upload = self.bgrid("cas", "upload", *self.server, source)

        self.assert_exit_status(upload, 0)
        self.assertEqual(upload.stdout.decode(), f"{printed_digest(data)} {source}\n")

        destination = self.path("downloaded.bin")
        download = self.bgrid("cas", "download", *self.server, printed_digest(data), destination)
        self.assert_exit_status(download, 0)
        with open(destination, "rb") as source_file:
            self.assertEqual(source_file.read(), data)

        to_stdout = self.bgrid("cas", "download", *self.server, printed_digest(data), "-")
        self.assert_exit_status(to_stdout, 0)
        self.assertEqual(to_stdout.stdout, data)

    def test_directory_round_trip(self):
        source = self.path("tree")
        write_file(os.path.join(source, "README"), b"top level\n")
        write_file(os.path.join(source, "bin", "tool"), b"#!/bin/sh\necho tool\n", executable=True)
        write_file(os.path.join(source, "lib", "deep", "data.bin"), os.urandom(70_000))
        write_file(os.path.join(source, "lib", "copy-of-readme"), b"top level\n")
        write_file(os.path.join(source, "empty"), b"")
        os.makedirs(os.path.join(source, "empty-dir"))
        os.symlink("bin/tool", os.path.join(source, "tool-link"))

        upload = self.bgrid("cas", "upload", *self.server, source)

        self.assert_exit_status(upload, 0)
        root_digest, printed_path = upload.stdout.decode().rstrip("\n").split(" ", 1)
        self.assertEqual(printed_path, source)

        destination = self.path("tree-copy")
        download = self.bgrid("cas", "download", *self.server, "--directory", root_digest, destination)

        self.assert_exit_status(download, 0)
        self.assertEqual(snapshot_outputs(destination), snapshot_outputs(source))
        self.assertTrue(is_executable(os.path.join(destination, "bin", "tool")))
        self.assertFalse(is_executable(os.path.join(destination, "README")))
        self.assertEqual(os.readlink(os.path.join(destination, "tool-link")), "bin/tool")
        self.assertEqual(os.listdir(os.path.join(destination, "empty-dir")), [])

    def test_upload_prints_each_path(self):
        first_data = b"first\n"
        first = self.path("first.txt")
        second = self.path("second-dir")
        write_file(first, first_data)
        os.mkdir(second)

        upload = self.bgrid("cas", "upload", *self.server, first, second)

        self.assert_exit_status(upload, 0)
        # The empty Directory message is the empty blob.
        expected = [f"{printed_digest(first_data)} {first}", f"{printed_digest(b'')} {second}"]
        self.assertEqual(upload.stdout.decode().splitlines(), expected)

    def test_download_missing_blob(self):
        absent = printed_digest(b"never uploaded")

        result = self.bgrid("cas", "download", *self.server, absent, self.path("out"))

        self.assert_command_error(result, "NOT_FOUND", absent)
        self.assertFalse(os.path.exists(self.path("out")))

    def test_download_invalid_directory(self):
        source = self.path("plain.txt")
        write_file(source, b"not a Directory message")
        digest = self.bgrid("cas", "upload", *self.server, source).stdout.decode().split(" ")[0]

        result = self.bgrid("cas", "download", *self.server, "--directory", digest, self.path("out"))

        self.assert_command_error(result, "is not a valid Directory message")


class ExecuteCommandTests(GridTestCase):
    def make_input_root(self):
        root = self.path("inputs")
        write_file(os.path.join(root, "src", "words.txt"), b"alpha\nbeta\n")
        write_file(os.path.join(root, "src", "shout.sh"), b"#!/bin/sh\ntr a-z A-Z\n", executable=True)
        return root

    def test_output_file_and_cache_hit(self):
        root = self.make_input_root()
        script = (
            "./shout.sh < words.txt > out/upper.txt && chmod +x out/upper.txt "
            "&& echo stdout-line && echo stderr-line >&2"
        )
        arguments = [
            "execute", *self.server, "--input-root", root, "--working-directory", "src",
            "--output", "out/upper.txt", "--env", "PATH=/usr/bin:/bin",
        ]

        first = self.bgrid(*arguments, "--download-outputs", self.path("first"), "--", "sh", "-c", script)

        self.assert_exit_status(first, 0)
        self.assertEqual(first.stdout, b"stdout-line\n")
        self.assertIn("stderr-line\n", first.stderr)
        self.assertRegex(first.stderr, OPERATION_LINE)
        self.assertIn("bgrid: stage EXECUTING\n", first.stderr)
        self.assertIn("bgrid: cached result: no, executed by bot-0\n", first.stderr)
        self.assertIn("bgrid: exit code 0\n", first.stderr)
        downloaded = os.path.join(self.path("first"), "out", "upper.txt")
        self.assertEqual(read_text(downloaded), "ALPHA\nBETA\n")
        self.assertTrue(is_executable(downloaded))

        second = self.bgrid(*arguments, "--", "sh", "-c", script)

        self.assert_exit_status(second, 0)
        self.assertEqual(second.stdout, b"stdout-line\n")
        self.assertIn("stderr-line\n", second.stderr)
        self.assertIn("bgrid: cached result: yes, served from the action cache\n", second.stderr)
        self.assertNotIn("bgrid: stage EXECUTING", second.stderr)
        self.assertEqual(ACTION_LINE.findall(first.stderr), ACTION_LINE.findall(second.stderr))
        self.assertNotEqual(OPERATION_LINE.findall(first.stderr), OPERATION_LINE.findall(second.stderr))
        # Without --download-outputs nothing is written to the current directory.
        self.assertEqual(os.listdir(self.work), [])

        third = self.bgrid(*arguments, "--skip-cache", "--", "sh", "-c", script)

        self.assert_exit_status(third, 0)
        self.assertIn("bgrid: cached result: no, executed by bot-0\n", third.stderr)

    def test_output_directory_and_symlink(self):
        script = (
            "mkdir -p tree/sub && echo nested > tree/sub/file && ln -s tree/sub/file link"
        )

        result = self.bgrid(
            "execute", *self.server, "--output", "tree", "--output", "link",
            "--download-outputs", self.path("outputs"), "--", "sh", "-c", script,
        )

        self.assert_exit_status(result, 0)
        self.assertIn("bgrid: output directory tree: Tree ", result.stderr)
        self.assertIn("bgrid: output symlink link -> tree/sub/file\n", result.stderr)
        self.assertEqual(read_text(self.path("outputs", "tree", "sub", "file")), "nested\n")
        self.assertEqual(os.readlink(self.path("outputs", "link")), "tree/sub/file")

    def test_escaping_output_symlinks_rejected(self):
        cases = [
            ("out", "ln -s /etc/hostname out", "output symlink 'out'", "'/etc/hostname'"),
            ("rel", "ln -s ../../../../../../../etc/hostname rel", "output symlink 'rel'",
             "resolves outside the exec root"),
            ("d", "mkdir d && ln -s /etc d/etclink",
             "symlink 'd/etclink' in output directory 'd'", "'/etc'"),
        ]
        for index, (output, script, *fragments) in enumerate(cases):
            with self.subTest(script=script):
                destination = self.path(f"outputs-{index}")

                result = self.bgrid(
                    "execute", *self.server, "--output", output, "--download-outputs",
                    destination, "--", "sh", "-c", script,
                )

                self.assert_command_error(result, "FAILED_PRECONDITION", *fragments)
                self.assertFalse(os.path.lexists(destination))
                (action_digest,) = ACTION_LINE.findall(result.stderr)
                cached = self.bgrid("action-cache", "get", *self.server, action_digest)
                self.assert_command_error(cached, "NOT_FOUND")

    def test_failing_command_exit_code(self):
        result = self.bgrid(
            "execute", *self.server, "--", "sh", "-c", "echo partial; echo broken >&2; exit 7"
        )

        self.assert_exit_status(result, 7)
        self.assertEqual(result.stdout, b"partial\n")
        self.assertIn("broken\n", result.stderr)
        self.assertIn("bgrid: exit code 7\n", result.stderr)
        self.assertNotIn("bgrid: error:", result.stderr)

    def test_missing_output(self):
        result = self.bgrid(
            "execute", *self.server, "--output", "made.txt", "--output", "never.txt",
            "--download-outputs", self.path("outputs"), "--", "sh", "-c", "echo made > made.txt",
        )

        self.assert_exit_status(result, 0)
        self.assertIn("bgrid: warning: output never.txt was not created by the command\n", result.stderr)
        self.assertNotIn("output made.txt was not created", result.stderr)
        self.assertEqual(os.listdir(self.path("outputs")), ["made.txt"])

    def test_timeout_fails_execution(self):
        result = self.bgrid(
            "execute", *self.server, "--timeout", "1", "--", "sh", "-c", "echo started; sleep 60"
        )

        self.assert_command_error(result, "DEADLINE_EXCEEDED", "failed")
        self.assertEqual(result.stdout, b"started\n")

    def test_missing_inputs_reported(self):
        absent_command = re_pb2.Digest(hash="ab" * 32, size_bytes=10)
        action = re_pb2.Action(command_digest=absent_command, input_root_digest=re_pb2.Digest(
            hash=hashlib.sha256(b"").hexdigest(), size_bytes=0))
        action_path = self.path("action.bin")
        write_file(action_path, action.SerializeToString(deterministic=True))
        upload = self.bgrid("cas", "upload", *self.server, action_path)
        action_digest = upload.stdout.decode().split(" ")[0]

        result = self.bgrid("execute", *self.server, "--action", action_digest)

        self.assert_command_error(result, "Execute failed", "FAILED_PRECONDITION", "ab" * 32 + "/10")

    def test_execute_existing_action(self):
        first = self.bgrid("execute", *self.server, "--", "sh", "-c", "echo again")
        self.assert_exit_status(first, 0)
        (action_digest,) = ACTION_LINE.findall(first.stderr)

        rerun = self.bgrid("execute", *self.server, "--action", action_digest, "--skip-cache")

        self.assert_exit_status(rerun, 0)
        self.assertEqual(rerun.stdout, b"again\n")
        self.assertIn("bgrid: cached result: no", rerun.stderr)


class ActionCacheCommandTests(GridTestCase):
    def test_get_cached_result(self):
        execute = self.bgrid(
            "execute", *self.server, "--output", "result.txt", "--",
            "sh", "-c", "echo cached > result.txt; echo printed",
        )
        self.assert_exit_status(execute, 0)
        (action_digest,) = ACTION_LINE.findall(execute.stderr)

        text = self.bgrid("action-cache", "get", *self.server, action_digest)

        self.assert_exit_status(text, 0)
        self.assertIn('path: "result.txt"', text.stdout.decode())
        self.assertIn('worker: "bot-0"', text.stdout.decode())

        as_json = self.bgrid("action-cache", "get", *self.server, "--json", "--inline-stdout", action_digest)

        self.assert_exit_status(as_json, 0)
        result = json.loads(as_json.stdout)
        self.assertEqual(result["exit_code"], 0)
        self.assertEqual([output["path"] for output in result["output_files"]], ["result.txt"])
        self.assertEqual(result["output_files"][0]["digest"]["size_bytes"], "7")
        # bytes fields are base64 in JSON: "cHJpbnRlZAo=" is "printed\n".
        self.assertEqual(result["stdout_raw"], "cHJpbnRlZAo=")

    def test_get_uncached_action(self):
        absent = printed_digest(b"no such action")

        result = self.bgrid("action-cache", "get", *self.server, absent)

        self.assert_command_error(result, "GetActionResult failed", "NOT_FOUND", absent)
        self.assertEqual(result.stdout, b"")

    def test_uncacheable_action_not_cached(self):
        execute = self.bgrid("execute", *self.server, "--do-not-cache", "--", "true")
        self.assert_exit_status(execute, 0)
        (action_digest,) = ACTION_LINE.findall(execute.stderr)

        result = self.bgrid("action-cache", "get", *self.server, action_digest)

        self.assert_command_error(result, "NOT_FOUND")


class OperationsCommandTests(GridTestCase):
    def list_operations(self):
        result = self.bgrid("operations", "list", *self.server, "--json")
        self.assert_exit_status(result, 0)
        return json.loads(result.stdout)

    def test_list_after_execute(self):
        execute = self.bgrid("execute", *self.server, "--", "true")
        self.assert_exit_status(execute, 0)
        (operation_name,) = OPERATION_LINE.findall(execute.stderr)
        (action_digest,) = ACTION_LINE.findall(execute.stderr)

        (listed,) = self.list_operations()

        self.assertEqual(listed["name"], operation_name)
        self.assertEqual(listed["stage"], "COMPLETED")
        self.assertIs(listed["done"], True)
        self.assertEqual(listed["action_digest"], action_digest)
        self.assertEqual(listed["status"], "OK")
        self.assertEqual(listed["exit_code"], 0)

        table = self.bgrid("operations", "list", *self.server)

        self.assert_exit_status(table, 0)
        header, row = table.stdout.decode().splitlines()
        self.assertEqual(header.split(), ["NAME", "STAGE", "DONE", "STATUS", "ACTION", "DIGEST"])
        self.assertEqual(row.split(), [operation_name, "COMPLETED", "yes", "OK", action_digest])

    def test_cancel_running_action(self):
        pid_file = self.path("sleeper.pid")
        execute = subprocess.Popen(
            bgrid_argv(
                "execute", *self.server, "--do-not-cache", "--",
                "sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait",
            ),
            cwd=self.work, env=bgrid_environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.addCleanup(stop_process, execute)

        def executing_operation():
            running = [op for op in self.list_operations() if op["stage"] == "EXECUTING"]
            return running[0]["name"] if running else None

        name = wait_until(executing_operation, ACTION_START_TIMEOUT, "no operation was EXECUTING")
        wait_until(lambda: read_text(pid_file).endswith("\n"), ACTION_START_TIMEOUT, "the action did not start sleep")
        sleeper = int(read_text(pid_file))

        cancel = self.bgrid("operations", "cancel", *self.server, name)

        self.assert_exit_status(cancel, 0)
        self.assertIn(f"operation {name}: COMPLETED, status CANCELLED", cancel.stdout.decode())
        _, stderr = execute.communicate(timeout=COMMAND_TIMEOUT)
        execute.stderr = stderr.decode()
        self.assert_command_error(execute, "CANCELLED", name)
        wait_until(lambda: process_is_gone(sleeper), ACTION_START_TIMEOUT, "the bot did not stop the action")

        (listed,) = self.list_operations()
        self.assertEqual((listed["name"], listed["done"], listed["status"]), (name, True, "CANCELLED"))

        get = self.bgrid("operations", "get", *self.server, "--json", name)
        self.assert_exit_status(get, 0)
        operation = json.loads(get.stdout)
        self.assertEqual(operation["name"], name)
        self.assertEqual(operation["metadata"]["stage"], "COMPLETED")
        self.assertEqual(operation["response"]["status"]["code"], 1)

    def test_list_shows_why_operation_waits(self):
        execute = subprocess.Popen(
            bgrid_argv(
                "execute", *self.server, "--do-not-cache", "--platform", "OSFamily=windows",
                "--", "true",
            ),
            cwd=self.work, env=bgrid_environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(stop_process, execute)

        (listed,) = wait_until(self.list_operations, ACTION_START_TIMEOUT, "no operation was listed")

        self.assertEqual(listed["stage"], "QUEUED")
        self.assertEqual(listed["waiting"], "no bot matches OSFamily=windows")
        table = self.bgrid("operations", "list", *self.server)
        self.assert_exit_status(table, 0)
        _, row, note = table.stdout.decode().splitlines()
        self.assertEqual(row.split()[:3], [listed["name"], "QUEUED", "no"])
        self.assertEqual(note, "  waiting: no bot matches OSFamily=windows")

        cancel = self.bgrid("operations", "cancel", *self.server, listed["name"])
        self.assert_exit_status(cancel, 0)
        (cancelled,) = self.list_operations()
        self.assertIsNone(cancelled["waiting"])

    def test_get_and_cancel_unknown_operation(self):
        for words in (["operations", "get"], ["operations", "cancel"]):
            with self.subTest(command=words):
                result = self.bgrid(*words, *self.server, "operations/no-such-operation")
                self.assert_command_error(result, "NOT_FOUND", "operations/no-such-operation")

    def test_get_text_format(self):
        execute = self.bgrid("execute", *self.server, "--", "true")
        (operation_name,) = OPERATION_LINE.findall(execute.stderr)

        result = self.bgrid("operations", "get", *self.server, operation_name)

        self.assert_exit_status(result, 0)
        text = result.stdout.decode()
        self.assertIn(f'name: "{operation_name}"', text)
        self.assertIn("[type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse]", text)
        self.assertIn("done: true", text)


class CapabilitiesCommandTests(GridTestCase):
    def test_text_and_json(self):
        text = self.bgrid("capabilities", *self.server)

        self.assert_exit_status(text, 0)
        self.assertIn("exec_enabled: true", text.stdout.decode())
        self.assertIn("digest_functions: SHA256", text.stdout.decode())

        as_json = self.bgrid("capabilities", *self.server, "--json")

        self.assert_exit_status(as_json, 0)
        capabilities = json.loads(as_json.stdout)
        self.assertIs(capabilities["execution_capabilities"]["exec_enabled"], True)
        # JSON writes int64 fields as strings.
        self.assertGreater(int(capabilities["cache_capabilities"]["max_batch_total_size_bytes"]), 0)
        self.assertEqual(capabilities["high_api_version"]["major"], 2)

    def test_unknown_instance(self):
        result = self.bgrid("capabilities", *self.server, "--instance", "no/such/instance")

        self.assert_command_error(result, "GetCapabilities failed", "INVALID_ARGUMENT", "no/such/instance")
