"""Tests of ActionExecutor: whole leases against an in-memory CAS, with real processes."""

import asyncio
import os

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2
from twisted.internet import reactor, task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bot.cache import BlobCache
from bgrid.bot.executor import ActionExecutor
from bgrid.client import tree
from bgrid.client.cas import CasClient
from bgrid.digest import Digest
from tests.bot.test_runner import process_is_gone, read_text
from tests.client.fakes import FakeCas, open_test_channel, start_server, wait_until
from tests.scheduler.helpers import capture_logs
from tests.util import async_test, make_temp_dir

SHELL_ENVIRONMENT = [re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")]


def pack(message):
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class FlakyCas(FakeCas):
    """A CAS whose BatchUpdateBlobs fails with ``failure_code`` ``failures`` times first."""

    def __init__(self, failures=0, failure_code=grpc.StatusCode.UNAVAILABLE):
        super().__init__()
        self.failures = failures
        self.failure_code = failure_code

    async def BatchUpdateBlobs(self, request, context):
        if self.failures > 0:
            self.failures -= 1
            self.calls.append("BatchUpdateBlobs")
            await context.abort(self.failure_code, "scripted failure")
        return await super().BatchUpdateBlobs(request, context)


class ExecutorTestCase(unittest.TestCase):
    async def start_executor(self, server, clock):
        self.server = server
        address = await start_server(self, cas=self.server)
        cas = CasClient(open_test_channel(self, address))
        self.outside = make_temp_dir(self)
        work_dir = os.path.join(self.outside, "work")
        self.build_root = os.path.join(work_dir, "build")
        os.makedirs(self.build_root)
        cache = BlobCache(os.path.join(work_dir, "cache"), 10 ** 9, cas)
        cache.load()
        self.executor = ActionExecutor(cas, cache, self.build_root, "bot-a", clock)

    def put_input_tree(self, files):
        """Store a tree of ``{path: (bytes, executable)}`` in the CAS; return its root digest."""
        source = make_temp_dir(self)
        for path, (data, executable) in files.items():
            full = os.path.join(source, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as target:
                target.write(data)
            os.chmod(full, 0o755 if executable else 0o644)
        scanned = tree.scan_directory(source)
        for data in scanned.directory_blobs.values():
            self.server.put(data)
        for path in scanned.files.values():
            with open(path, "rb") as source_file:
                self.server.put(source_file.read())
        return scanned.root_digest

    def make_action(self, script, inputs=None, timeout=None, arguments=None, **command_fields):
        command = re_pb2.Command(
            arguments=arguments or ["/bin/sh", "-c", script],
            environment_variables=command_fields.pop("environment_variables", SHELL_ENVIRONMENT),
            **command_fields,
        )
        command_digest = self.server.put(tree.serialize(command))
        root_digest = self.put_input_tree(inputs or {})
        action = re_pb2.Action(
            command_digest=command_digest.to_proto(re_pb2.Digest),
            input_root_digest=root_digest.to_proto(re_pb2.Digest),
        )
        if timeout is not None:
            action.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout))
        return action

    def blob(self, proto_digest):
        return self.server.blobs[Digest.from_proto(proto_digest)]


class ExecutorTests(ExecutorTestCase):
    @async_test
    async def setUp(self):
        await self.start_executor(FakeCas(), reactor)

    @async_test
    async def test_runs_action_and_uploads_outputs(self):
        action = self.make_action(
            "cat ../in/data > out/result && ./tool && echo to-stderr >&2",
            inputs={"in/data": (b"input bytes", False),
                    "pkg/tool": (b"#!/bin/sh\necho tool ran\n", True)},
            working_directory="pkg",
            output_paths=["out/result", "missing"],
        )

        outcome = await self.executor.execute(pack(action), "lease-1", "bot-a.0")

        self.assertEqual(outcome.status.code, code_pb2.OK, outcome.status.message)
        result = outcome.result
        self.assertEqual(result.exit_code, 0)
        (output,) = result.output_files
        self.assertEqual(output.path, "out/result")
        self.assertEqual(self.blob(output.digest), b"input bytes")
        self.assertEqual(self.blob(result.stdout_digest), b"tool ran\n")
        self.assertEqual(self.blob(result.stderr_digest), b"to-stderr\n")
        self.assertEqual(os.listdir(self.build_root), [])

    @async_test
    async def test_metadata_timestamps_in_order(self):
        action = self.make_action("exit 7")

        outcome = await self.executor.execute(pack(action), "lease-1", "bot-a.0")

        metadata = outcome.result.execution_metadata
        self.assertEqual(outcome.result.exit_code, 7)
        self.assertEqual(metadata.worker, "bot-a")
        stamps = [
            metadata.worker_start_timestamp,
            metadata.input_fetch_start_timestamp,
            metadata.input_fetch_completed_timestamp,
            metadata.execution_start_timestamp,
            metadata.execution_completed_timestamp,
            metadata.output_upload_start_timestamp,
            metadata.output_upload_completed_timestamp,
            metadata.worker_completed_timestamp,
        ]
        nanoseconds = [stamp.ToNanoseconds() for stamp in stamps]
        self.assertGreater(nanoseconds[0], 0)
        self.assertEqual(nanoseconds, sorted(nanoseconds))
        self.assertTrue(metadata.HasField("virtual_execution_duration"))

    @async_test
    async def test_action_given_by_digest(self):
        action = self.make_action("echo by digest")
        action_digest = self.server.put(tree.serialize(action))

        outcome = await self.executor.execute(pack(action_digest.to_proto(re_pb2.Digest)))

        self.assertEqual(outcome.status.code, code_pb2.OK)
        self.assertEqual(self.blob(outcome.result.stdout_digest), b"by digest\n")

    @async_test
    async def test_unsupported_payload(self):
        outcome = await self.executor.execute(pack(re_pb2.Command()))
        self.assertEqual(outcome.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("unsupported lease payload type", outcome.status.message)
        self.assertIsNone(outcome.result)

    @async_test
    async def test_environment_is_command_only(self):
        os.environ["BGRID_BOT_SECRET"] = "leaked"
        self.addCleanup(os.environ.pop, "BGRID_BOT_SECRET")
        action = self.make_action(
            None,
            arguments=["/usr/bin/env"],
            environment_variables=[re_pb2.Command.EnvironmentVariable(name="A", value="1")],
        )

        outcome = await self.executor.execute(pack(action))

        self.assertEqual(self.blob(outcome.result.stdout_digest), b"A=1\n")

    @async_test
    async def test_missing_input_blob_fails_precondition(self):
        action = self.make_action("true", inputs={"f": (b"will be lost", False)})
        lost = Digest.of(b"will be lost")
        del self.server.blobs[lost]

        outcome = await self.executor.execute(pack(action))

        self.assertEqual(outcome.status.code, code_pb2.FAILED_PRECONDITION)
        (detail,) = outcome.status.details
        failure = error_details_pb2.PreconditionFailure()
        self.assertTrue(detail.Unpack(failure))
        self.assertEqual(
            [(v.type, v.subject) for v in failure.violations],
            [("MISSING", f"blobs/{lost.hash}/{lost.size_bytes}")],
        )

    @async_test
    async def test_missing_command_fails_precondition(self):
        action = self.make_action("true")
        del self.server.blobs[Digest.from_proto(action.command_digest)]
        outcome = await self.executor.execute(pack(action))
        self.assertEqual(outcome.status.code, code_pb2.FAILED_PRECONDITION)

    @async_test
    async def test_invalid_input_tree_rejected(self):
        payload = self.server.put(b"payload")
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="ok", digest=payload.to_proto(re_pb2.Digest))],
            symlinks=[re_pb2.SymlinkNode(name="escape", target="../../../../etc")],
        )
        root_digest = self.server.put(tree.serialize(root))
        action = self.make_action("true")
        action.input_root_digest.CopyFrom(root_digest.to_proto(re_pb2.Digest))
        before = sorted(os.listdir(self.outside))

        outcome = await self.executor.execute(pack(action))

        self.assertEqual(outcome.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("escape", outcome.status.message)
        self.assertEqual(os.listdir(self.build_root), [])
        self.assertEqual(sorted(os.listdir(self.outside)), before)

    @async_test
    async def test_invalid_output_path_rejected(self):
        action = self.make_action("true", output_paths=["../outside"])
        outcome = await self.executor.execute(pack(action))
        self.assertEqual(outcome.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("invalid output path", outcome.status.message)

    @async_test
    async def test_absolute_output_symlink_fails_precondition(self):
        action = self.make_action(
            "echo kept > data && ln -s /etc/hostname out",
            output_paths=["data", "out"],
        )

        outcome = await self.executor.execute(pack(action), "lease-1", "bot-a.0")

        self.assertEqual(outcome.status.code, code_pb2.FAILED_PRECONDITION)
        self.assertIn("output symlink 'out'", outcome.status.message)
        self.assertIn("'/etc/hostname'", outcome.status.message)
        self.assertIsNone(outcome.result)
        # Nothing of the result was uploaded: neither the output file nor stdout.
        self.assertNotIn(Digest.of(b"kept\n"), self.server.blobs)
        for method in ("FindMissingBlobs", "BatchUpdateBlobs", "Write"):
            self.assertNotIn(method, self.server.calls)
        self.assertEqual(os.listdir(self.build_root), [])

    @async_test
    async def test_escaping_tree_symlink_fails_precondition(self):
        action = self.make_action(
            "mkdir d && ln -s ../../../../../../../etc d/etclink",
            output_paths=["d"],
        )

        outcome = await self.executor.execute(pack(action), "lease-1", "bot-a.0")

        self.assertEqual(outcome.status.code, code_pb2.FAILED_PRECONDITION)
        self.assertIn("symlink 'd/etclink' in output directory 'd'", outcome.status.message)
        self.assertIn("resolves outside the exec root", outcome.status.message)
        self.assertIsNone(outcome.result)

    @async_test
    async def test_missing_program_rejected(self):
        action = self.make_action("true")
        command = re_pb2.Command(arguments=["./not-there"])
        action.command_digest.CopyFrom(self.server.put(tree.serialize(command)).to_proto(re_pb2.Digest))
        outcome = await self.executor.execute(pack(action))
        self.assertEqual(outcome.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertIn("failed to start", outcome.status.message)

    @async_test
    async def test_timeout_reports_deadline_exceeded_with_output(self):
        action = self.make_action("echo partial; echo partial-err >&2; sleep 30", timeout=1)

        outcome = await self.executor.execute(pack(action))

        self.assertEqual(outcome.status.code, code_pb2.DEADLINE_EXCEEDED)
        self.assertIn("timed out after 1 s", outcome.status.message)
        self.assertEqual(self.blob(outcome.result.stdout_digest), b"partial\n")
        self.assertEqual(self.blob(outcome.result.stderr_digest), b"partial-err\n")
        self.assertEqual(os.listdir(self.build_root), [])

    @async_test
    async def test_cancellation_kills_action_and_cleans_up(self):
        pid_file = os.path.join(self.outside, "sleeper.pid")
        action = self.make_action(f"sleep 300 & echo $! > {pid_file}; wait")
        running = asyncio.ensure_future(self.executor.execute(pack(action), "lease-9", "bot-a.0"))
        await wait_until(lambda: os.path.exists(pid_file) and read_text(pid_file).endswith("\n"))
        sleeper = int(read_text(pid_file))

        running.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await running

        await wait_until(lambda: process_is_gone(sleeper))
        await wait_until(lambda: os.listdir(self.build_root) == [])


class UploadRetryTests(ExecutorTestCase):
    async def run_with_failing_uploads(self, failures, failure_code=grpc.StatusCode.UNAVAILABLE,
                                       result_retry_seconds=90.0):
        """Run an action whose output uploads fail ``failures`` times; return its outcome.

        Returns the outcome and the retry delays, in seconds on the test's clock.
        """
        clock = task.Clock()
        await self.start_executor(FlakyCas(failures, failure_code), clock)
        action = self.make_action("echo output > out", output_paths=["out"])
        running = asyncio.ensure_future(self.executor.execute(
            pack(action), "lease-1", "bot-a.0", result_retry_seconds=result_retry_seconds
        ))
        delays = []
        while not running.done():
            await wait_until(lambda: running.done() or clock.getDelayedCalls(), timeout=30)
            for call in clock.getDelayedCalls():
                delays.append(call.getTime() - clock.seconds())
                clock.advance(delays[-1])
        return await running, delays

    @async_test
    async def test_failed_uploads_retried(self):
        events = capture_logs(self)

        outcome, delays = await self.run_with_failing_uploads(3)

        self.assertEqual(outcome.status.code, code_pb2.OK, outcome.status.message)
        self.assertEqual(len(delays), 3)
        self.assertEqual(self.server.calls.count("BatchUpdateBlobs"), 4)
        (output,) = outcome.result.output_files
        self.assertEqual(self.blob(output.digest), b"output\n")
        retries = [
            event for event in events if event.get("description") == "uploading the outputs"
        ]
        self.assertEqual(len(retries), 3)
        self.assertEqual({event["lease_id"] for event in retries}, {"lease-1"})
        self.assertEqual({event["bot_id"] for event in retries}, {"bot-a.0"})

    @async_test
    async def test_uploads_given_up_after_retry_time(self):
        events = capture_logs(self)

        outcome, delays = await self.run_with_failing_uploads(1000, result_retry_seconds=10.0)

        self.assertEqual(outcome.status.code, code_pb2.UNAVAILABLE)
        self.assertIsNone(outcome.result)
        # The delays stop at the retry time, and the last one ends exactly there.
        self.assertAlmostEqual(sum(delays), 10.0)
        given_up = [event for event in events if "gave up" in event.get("log_format", "")]
        self.assertEqual(len(given_up), 1)
        self.assertEqual(given_up[0]["lease_id"], "lease-1")
        self.assertEqual(os.listdir(self.build_root), [])

    @async_test
    async def test_permanent_upload_error_not_retried(self):
        outcome, delays = await self.run_with_failing_uploads(
            1, failure_code=grpc.StatusCode.INVALID_ARGUMENT
        )

        self.assertEqual(outcome.status.code, code_pb2.INVALID_ARGUMENT)
        self.assertEqual(delays, [])
