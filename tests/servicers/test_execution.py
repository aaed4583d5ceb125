"""Tests of the Execution service through a real gRPC server, scheduler and bots."""

import grpc
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.bridge import as_deferred, as_future
from bgrid.digest import Digest
from bgrid.errors import NotFoundError
from bgrid.servicers.execution import stream_operation
from tests.servicers.support import (
    MAX_INLINE_TOTAL_BYTES,
    ExecutionServicerTestCase,
    RemoteBot,
    blob_subject,
    digest_proto,
    make_blob,
    make_directory,
    operation_response,
    operation_stage,
    precondition_violations,
)
from tests.util import async_test

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED


class ExecuteTests(ExecutionServicerTestCase):
    @async_test
    async def test_stages_and_result(self):
        action_digest = await self.store_action()
        result = await self.make_result(stdout=b"built\n")
        call = self.execute(action_digest)

        queued = await self.next_operation(call)
        self.assertEqual(operation_stage(queued), QUEUED)
        self.assertFalse(queued.done)
        self.assertTrue(queued.name.startswith("main/operations/"), queued.name)

        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        leased = bot.leased_action()
        # The lease adds the server's maximum timeout to an action without one.
        self.assertEqual(leased.timeout.seconds, 3600)
        leased.ClearField("timeout")
        self.assertEqual(Digest.of(leased.SerializeToString()), action_digest)
        await bot.accept()
        executing = await self.next_operation(call)
        self.assertEqual(operation_stage(executing), EXECUTING)
        self.assertFalse(executing.done)

        await bot.complete(result)
        done = await self.next_operation(call)
        self.assertEqual(operation_stage(done), COMPLETED)
        self.assertTrue(done.done)
        self.assertEqual(done.name, queued.name)
        self.assertFalse(done.HasField("error"))
        response = operation_response(done)
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertFalse(response.cached_result)
        self.assertEqual(response.result.stdout_digest, result.stdout_digest)
        self.assertEqual(response.result.execution_metadata.worker, "bot-1")
        await self.assert_stream_ended(call)

    @async_test
    async def test_second_execute_is_cache_hit(self):
        action_digest = await self.store_action()
        result = await self.make_result(stdout=b"cached\n")
        first = await self.execute_to_completion(action_digest, result)
        self.assertFalse(operation_response(first).cached_result)

        call = self.execute(action_digest)
        operation = await self.next_operation(call)
        await self.assert_stream_ended(call)

        self.assertTrue(operation.done)
        self.assertEqual(operation_stage(operation), COMPLETED)
        self.assertNotEqual(operation.name, first.name)
        response = operation_response(operation)
        self.assertTrue(response.cached_result)
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertEqual(response.result.stdout_digest, result.stdout_digest)
        await self.assert_no_work_for_bots()
        self.assertEqual(self.scheduler.stats()["queued_jobs"], 0)
        self.assertEqual(self.scheduler.stats()["leases"], 0)

    @async_test
    async def test_skip_cache_lookup_executes(self):
        action_digest = await self.store_action()
        await self.execute_to_completion(action_digest, await self.make_result())

        call = self.execute(action_digest, skip_cache_lookup=True)
        operation = await self.next_operation(call)
        self.assertEqual(operation_stage(operation), QUEUED)

        new_result = await self.make_result(stdout=b"fresh\n")
        await self.run_on_bot(new_result, bot_id="bot-2")
        done = await self.read_until_done(call)
        self.assertFalse(operation_response(done).cached_result)
        self.assertEqual(operation_response(done).result.stdout_digest, new_result.stdout_digest)

    @async_test
    async def test_nonzero_exit_code_not_cached(self):
        action_digest = await self.store_action()
        done = await self.execute_to_completion(
            action_digest, await self.make_result(exit_code=1)
        )
        self.assertEqual(operation_response(done).result.exit_code, 1)

        call = self.execute(action_digest)
        operation = await self.next_operation(call)
        self.assertEqual(operation_stage(operation), QUEUED)
        with self.assertRaises(NotFoundError):
            await as_future(self.action_cache.get("main", action_digest))

    @async_test
    async def test_do_not_cache_action_not_cached(self):
        action_digest = await self.store_action(do_not_cache=True)
        await self.execute_to_completion(action_digest, await self.make_result())

        call = self.execute(action_digest)
        operation = await self.next_operation(call)
        self.assertEqual(operation_stage(operation), QUEUED)
        with self.assertRaises(NotFoundError):
            await as_future(self.action_cache.get("main", action_digest))

    @async_test
    async def test_identical_actions_share_job(self):
        action_digest = await self.store_action()
        result = await self.make_result(stdout=b"shared\n")
        first = self.execute(action_digest)
        second = self.execute(action_digest)
        first_queued = await self.next_operation(first)
        second_queued = await self.next_operation(second)
        self.assertNotEqual(first_queued.name, second_queued.name)
        self.assertEqual(self.scheduler.stats()["jobs"], 1)

        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        self.assertIsNotNone(bot.lease)
        await self.assert_no_work_for_bots("bot-2")
        await bot.accept()
        await bot.complete(result)

        for call in (first, second):
            done = await self.read_until_done(call)
            self.assertEqual(operation_response(done).result.stdout_digest, result.stdout_digest)
            await self.assert_stream_ended(call)

    @async_test
    async def test_multi_segment_instance_name(self):
        instance_name = "projects/p/instances/main"
        action_digest = await self.store_action()
        result = await self.make_result()
        call = self.execute(action_digest, instance_name=instance_name)
        queued = await self.next_operation(call)
        self.assertTrue(queued.name.startswith(f"{instance_name}/operations/"), queued.name)

        await self.run_on_bot(result, instance_name=instance_name)
        done = await self.read_until_done(call)
        self.assertEqual(operation_response(done).result.stdout_digest, result.stdout_digest)

        cached = await as_future(self.action_cache.get(instance_name, action_digest))
        self.assertEqual(cached.stdout_digest, result.stdout_digest)
        with self.assertRaises(NotFoundError):
            await as_future(self.action_cache.get("main", action_digest))

    @async_test
    async def test_client_cancel_keeps_job(self):
        action_digest = await self.store_action()
        result = await self.make_result(stdout=b"finished alone\n")
        call = self.execute(action_digest)
        queued = await self.next_operation(call)
        call.cancel()
        self.assertEqual(await call.code(), grpc.StatusCode.CANCELLED)

        await self.run_on_bot(result)

        wait = self.wait_execution(queued.name)
        done = await self.read_until_done(wait)
        await self.assert_stream_ended(wait)
        self.assertEqual(operation_response(done).status.code, code_pb2.OK)
        self.assertEqual(operation_response(done).result.stdout_digest, result.stdout_digest)


class ExecuteErrorTests(ExecutionServicerTestCase):
    async def assert_missing(self, call, *digests):
        error = await self.assert_rpc_error(call.read(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertCountEqual(
            precondition_violations(error),
            [("MISSING", blob_subject(digest)) for digest in digests],
        )
        return error

    @async_test
    async def test_missing_action(self):
        action_digest = await self.store_action(store_action=False)
        await self.assert_missing(self.execute(action_digest), action_digest)

    @async_test
    async def test_missing_command(self):
        action_digest = await self.store_action(store_command=False)
        command_digest = Digest.of(re_pb2.Command(arguments=["echo", "action"]).SerializeToString())
        await self.assert_missing(self.execute(action_digest), command_digest)

    @async_test
    async def test_missing_input_file(self):
        present = make_blob(10)
        missing = make_blob(20)
        root = make_directory(files=[("present", present[1]), ("missing", missing[1])])
        await self.put_blobs(present, root)
        action_digest = await self.store_action(input_root_digest=root[1])
        await self.assert_missing(self.execute(action_digest), missing[1])
        self.assertEqual(self.scheduler.stats()["jobs"], 0)

    @async_test
    async def test_missing_input_subdirectory(self):
        subdirectory = make_directory(files=[("file", make_blob(10)[1])])
        root = make_directory(directories=[("sub", subdirectory[1])])
        await self.put_blobs(root)
        action_digest = await self.store_action(input_root_digest=root[1])
        await self.assert_missing(self.execute(action_digest), subdirectory[1])

    @async_test
    async def test_missing_input_root(self):
        root = make_directory(files=[("file", make_blob(10)[1])])
        action_digest = await self.store_action(input_root_digest=root[1])
        await self.assert_missing(self.execute(action_digest), root[1])

    @async_test
    async def test_unknown_instance(self):
        action_digest = await self.store_action()
        await self.assert_rpc_error(
            self.execute(action_digest, instance_name="nowhere").read(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'nowhere'",
        )

    @async_test
    async def test_malformed_digest(self):
        call = self.execution.Execute(
            re_pb2.ExecuteRequest(
                instance_name="main", action_digest=re_pb2.Digest(hash="not-hex", size_bytes=3)
            )
        )
        await self.assert_rpc_error(
            call.read(), grpc.StatusCode.INVALID_ARGUMENT, "action_digest", "'not-hex'"
        )

    @async_test
    async def test_negative_digest_size(self):
        action_digest = await self.store_action()
        call = self.execution.Execute(
            re_pb2.ExecuteRequest(
                instance_name="main",
                action_digest=re_pb2.Digest(hash=action_digest.hash, size_bytes=-1),
            )
        )
        await self.assert_rpc_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "-1")

    @async_test
    async def test_unsupported_digest_function(self):
        action_digest = await self.store_action()
        call = self.execute(action_digest, digest_function=re_pb2.DigestFunction.MD5)
        await self.assert_rpc_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "MD5")

    @async_test
    async def test_unparsable_action(self):
        # A length-delimited field 1 that claims 5 bytes but has 2.
        data = b"\x0a\x05ab"
        await self.put_blobs((data, Digest.of(data)))
        await self.assert_rpc_error(
            self.execute(Digest.of(data)).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(Digest.of(data)),
        )

    @async_test
    async def test_invalid_platform_property(self):
        action_digest = await self.store_action(platform=[("", "linux")])
        await self.assert_rpc_error(
            self.execute(action_digest).read(), grpc.StatusCode.INVALID_ARGUMENT, "'linux'"
        )
        self.assertEqual(self.scheduler.stats()["jobs"], 0)

    @async_test
    async def test_action_without_command_digest(self):
        action = re_pb2.Action(input_root_digest=digest_proto(Digest.of(b"")))
        data = action.SerializeToString()
        await self.put_blobs((data, Digest.of(data)))
        await self.assert_rpc_error(
            self.execute(Digest.of(data)).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "command_digest",
        )

    @async_test
    async def test_unparsable_input_directory(self):
        data = b"\x0a\x05ab"
        await self.put_blobs((data, Digest.of(data)))
        action_digest = await self.store_action(input_root_digest=Digest.of(data))
        await self.assert_rpc_error(
            self.execute(action_digest).read(),
            grpc.StatusCode.INVALID_ARGUMENT,
            str(Digest.of(data)),
        )


class InlineOutputTests(ExecutionServicerTestCase):
    async def execute_with_outputs(self, **inline):
        """Execute an action whose result has stdout, stderr and two output files."""
        action_digest = await self.store_action()
        result = await self.make_result(
            stdout=b"out\n",
            stderr=b"err\n",
            output_files=[("a.txt", b"file a"), ("b.txt", b"file b")],
        )
        done = await self.execute_to_completion(action_digest, result, **inline)
        return action_digest, done

    @async_test
    async def test_inline_stdout(self):
        _, done = await self.execute_with_outputs(inline_stdout=True)
        result = operation_response(done).result
        self.assertEqual(result.stdout_raw, b"out\n")
        self.assertEqual(result.stderr_raw, b"")
        self.assertEqual([f.contents for f in result.output_files], [b"", b""])

    @async_test
    async def test_inline_stderr_and_output_file(self):
        _, done = await self.execute_with_outputs(inline_stderr=True, inline_output_files=["b.txt"])
        result = operation_response(done).result
        self.assertEqual(result.stdout_raw, b"")
        self.assertEqual(result.stderr_raw, b"err\n")
        contents = {f.path: f.contents for f in result.output_files}
        self.assertEqual(contents, {"a.txt": b"", "b.txt": b"file b"})

    @async_test
    async def test_nothing_inlined_unless_requested(self):
        _, done = await self.execute_with_outputs()
        result = operation_response(done).result
        self.assertEqual(result.stdout_raw, b"")
        self.assertEqual(result.stderr_raw, b"")

    @async_test
    async def test_inline_on_cache_hit(self):
        action_digest, _ = await self.execute_with_outputs()
        call = self.execute(action_digest, inline_stdout=True, inline_output_files=["a.txt"])
        operation = await self.next_operation(call)
        response = operation_response(operation)
        self.assertTrue(response.cached_result)
        self.assertEqual(response.result.stdout_raw, b"out\n")
        contents = {f.path: f.contents for f in response.result.output_files}
        self.assertEqual(contents, {"a.txt": b"file a", "b.txt": b""})

    @async_test
    async def test_wait_execution_does_not_inline(self):
        _, done = await self.execute_with_outputs(inline_stdout=True)
        call = self.wait_execution(done.name)
        operation = await self.next_operation(call)
        self.assertTrue(operation.done)
        self.assertEqual(operation_response(operation).result.stdout_raw, b"")
        self.assertEqual(
            operation_response(operation).result.stdout_digest,
            operation_response(done).result.stdout_digest,
        )

    @async_test
    async def test_stdout_over_budget_not_inlined(self):
        action_digest = await self.store_action()
        stdout = b"x" * (MAX_INLINE_TOTAL_BYTES + 1)
        result = await self.make_result(stdout=stdout)
        done = await self.execute_to_completion(action_digest, result, inline_stdout=True)
        result = operation_response(done).result
        self.assertEqual(result.stdout_raw, b"")
        self.assertEqual(result.stdout_digest, digest_proto(Digest.of(stdout)))


class WaitExecutionTests(ExecutionServicerTestCase):
    @async_test
    async def test_unknown_operation(self):
        await self.assert_rpc_error(
            self.wait_execution("main/operations/unknown").read(),
            grpc.StatusCode.NOT_FOUND,
            "main/operations/unknown",
        )

    @async_test
    async def test_running_operation_ends_with_result(self):
        action_digest = await self.store_action()
        result = await self.make_result(stdout=b"waited for\n")
        execute = self.execute(action_digest)
        queued = await self.next_operation(execute)

        wait = self.wait_execution(queued.name)
        current = await self.next_operation(wait)
        self.assertEqual(current.name, queued.name)
        self.assertEqual(operation_stage(current), QUEUED)
        self.assertFalse(current.done)

        await self.run_on_bot(result)
        done = await self.read_until_done(wait)
        await self.assert_stream_ended(wait)
        self.assertEqual(operation_stage(done), COMPLETED)
        self.assertEqual(operation_response(done).result.stdout_digest, result.stdout_digest)


class StreamOperationTests(ExecutionServicerTestCase):
    @async_test
    async def test_keepalive_resends_operation(self):
        action_digest = await self.store_action()
        name = await as_future(self.controller.execute("main", action_digest))
        stream = stream_operation(self.scheduler, name, keepalive_interval=0.01)
        self.addCleanup(lambda: as_deferred(stream.aclose()))

        first = await stream.__anext__()
        repeated = await stream.__anext__()
        self.assertEqual(repeated, first)

        await self.run_on_bot(await self.make_result())
        operation = repeated
        while not operation.done:
            operation = await stream.__anext__()
        with self.assertRaises(StopAsyncIteration):
            await stream.__anext__()
