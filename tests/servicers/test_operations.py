"""Tests of the google.longrunning Operations service over real executions."""

import asyncio
import time

import grpc
from google.longrunning import operations_proto_pb2
from google.protobuf import duration_pb2
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.servicers.operations import DEADLINE_MARGIN
from tests.servicers.support import (
    WAIT_TIMEOUT,
    ExecutionServicerTestCase,
    RemoteBot,
    operation_response,
    operation_stage,
)
from tests.util import async_test

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING


class OperationsTestCase(ExecutionServicerTestCase):
    async def start_execution(self, label="action", instance_name="main"):
        """Execute a new action and return the Execute call and its first Operation."""
        action_digest = await self.store_action(label)
        call = self.execute(action_digest, instance_name=instance_name)
        return call, await self.next_operation(call)

    async def get_operation(self, name):
        return await self.operations.GetOperation(operations_proto_pb2.GetOperationRequest(name=name))

    async def list_operations(self, name="main", **fields):
        return await self.operations.ListOperations(
            operations_proto_pb2.ListOperationsRequest(name=name, **fields)
        )

    async def cancel_operation(self, name):
        await self.operations.CancelOperation(operations_proto_pb2.CancelOperationRequest(name=name))

    async def delete_operation(self, name):
        await self.operations.DeleteOperation(operations_proto_pb2.DeleteOperationRequest(name=name))

    def wait_operation(self, name, timeout=None, rpc_timeout=WAIT_TIMEOUT):
        """Return the WaitOperation call; ``timeout`` (seconds) goes into the request."""
        request = operations_proto_pb2.WaitOperationRequest(name=name)
        if timeout is not None:
            request.timeout.CopyFrom(duration_pb2.Duration(nanos=int(timeout * 1e9)))
        return self.operations.WaitOperation(request, timeout=rpc_timeout)


class GetOperationTests(OperationsTestCase):
    @async_test
    async def test_running_and_done(self):
        call, queued = await self.start_execution()
        operation = await self.get_operation(queued.name)
        self.assertEqual(operation.name, queued.name)
        self.assertFalse(operation.done)
        self.assertEqual(operation_stage(operation), QUEUED)

        result = await self.make_result(stdout=b"got\n")
        await self.run_on_bot(result)
        await self.read_until_done(call)
        operation = await self.get_operation(queued.name)
        self.assertTrue(operation.done)
        self.assertEqual(operation_response(operation).result.stdout_digest, result.stdout_digest)

    @async_test
    async def test_unknown_operation(self):
        await self.assert_rpc_error(
            self.get_operation("main/operations/unknown"),
            grpc.StatusCode.NOT_FOUND,
            "main/operations/unknown",
        )


class ListOperationsTests(OperationsTestCase):
    @async_test
    async def test_lists_only_the_instance(self):
        names = []
        for label in ("a", "b", "c"):
            _, operation = await self.start_execution(label)
            names.append(operation.name)
        _, other = await self.start_execution("d", instance_name="projects/p/instances/main")

        response = await self.list_operations("main")
        self.assertEqual([operation.name for operation in response.operations], names)
        self.assertEqual(response.next_page_token, "")
        response = await self.list_operations("projects/p/instances/main")
        self.assertEqual([operation.name for operation in response.operations], [other.name])
        response = await self.list_operations("")
        self.assertEqual(list(response.operations), [])

    @async_test
    async def test_paging(self):
        names = []
        for label in ("a", "b", "c"):
            _, operation = await self.start_execution(label)
            names.append(operation.name)

        first = await self.list_operations("main", page_size=2)
        self.assertEqual([operation.name for operation in first.operations], names[:2])
        self.assertNotEqual(first.next_page_token, "")
        second = await self.list_operations(
            "main", page_size=2, page_token=first.next_page_token
        )
        self.assertEqual([operation.name for operation in second.operations], names[2:])
        self.assertEqual(second.next_page_token, "")

    @async_test
    async def test_bad_page_token(self):
        await self.assert_rpc_error(
            self.list_operations("main", page_token="not-a-token"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'not-a-token'",
        )

    @async_test
    async def test_filter_rejected(self):
        await self.assert_rpc_error(
            self.list_operations("main", filter="done=true"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter",
            "'done=true'",
        )

    @async_test
    async def test_negative_page_size(self):
        await self.assert_rpc_error(
            self.list_operations("main", page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "-1"
        )

    @async_test
    async def test_unknown_instance(self):
        await self.assert_rpc_error(
            self.list_operations("nowhere"), grpc.StatusCode.INVALID_ARGUMENT, "'nowhere'"
        )


class CancelOperationTests(OperationsTestCase):
    def assert_cancelled(self, operation):
        self.assertTrue(operation.done)
        self.assertFalse(operation.HasField("error"))
        self.assertEqual(operation_response(operation).status.code, code_pb2.CANCELLED)

    @async_test
    async def test_cancel_queued(self):
        call, queued = await self.start_execution()
        await self.cancel_operation(queued.name)

        self.assert_cancelled(await self.read_until_done(call))
        await self.assert_stream_ended(call)
        self.assert_cancelled(await self.get_operation(queued.name))
        await self.assert_no_work_for_bots()

    @async_test
    async def test_cancel_running(self):
        call, queued = await self.start_execution()
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        await bot.accept()
        self.assertEqual(operation_stage(await self.next_operation(call)), EXECUTING)

        await self.cancel_operation(queued.name)
        self.assert_cancelled(await self.read_until_done(call))

        session = await bot.update()
        self.assertEqual([lease.state for lease in session.leases], [bots_pb2.CANCELLED])
        session = await bot.update()
        self.assertEqual(list(session.leases), [])

    @async_test
    async def test_cancel_wakes_bot_long_poll(self):
        call, queued = await self.start_execution()
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        await bot.accept()
        polling = asyncio.ensure_future(bot.update(wait=True))
        # NOTE: 0.1 s of real time for the long poll to reach the server is a guess. A poll
        # that arrives after the cancellation returns at once, and the test still passes.
        await asyncio.sleep(0.1)

        await self.cancel_operation(queued.name)
        session = await asyncio.wait_for(polling, WAIT_TIMEOUT)
        self.assertEqual([lease.state for lease in session.leases], [bots_pb2.CANCELLED])

    @async_test
    async def test_cancel_one_of_shared_job(self):
        action_digest = await self.store_action()
        first = self.execute(action_digest)
        second = self.execute(action_digest)
        first_queued = await self.next_operation(first)
        await self.next_operation(second)
        bot = RemoteBot(self.bots, "bot-1")
        await bot.create()
        await bot.accept()

        await self.cancel_operation(first_queued.name)
        self.assert_cancelled(await self.read_until_done(first))
        session = await bot.update()
        self.assertEqual([lease.state for lease in session.leases], [bots_pb2.ACTIVE])

        result = await self.make_result(stdout=b"still wanted\n")
        await bot.complete(result)
        done = await self.read_until_done(second)
        self.assertEqual(operation_response(done).status.code, code_pb2.OK)
        self.assertEqual(operation_response(done).result.stdout_digest, result.stdout_digest)

    @async_test
    async def test_cancel_unknown(self):
        await self.assert_rpc_error(
            self.cancel_operation("main/operations/unknown"), grpc.StatusCode.NOT_FOUND
        )


class DeleteOperationTests(OperationsTestCase):
    @async_test
    async def test_delete_done(self):
        action_digest = await self.store_action()
        done = await self.execute_to_completion(action_digest, await self.make_result())

        await self.delete_operation(done.name)
        await self.assert_rpc_error(self.get_operation(done.name), grpc.StatusCode.NOT_FOUND)
        await self.assert_rpc_error(
            self.wait_execution(done.name).read(), grpc.StatusCode.NOT_FOUND
        )
        response = await self.list_operations("main")
        self.assertEqual(list(response.operations), [])

    @async_test
    async def test_delete_running(self):
        _, queued = await self.start_execution()
        await self.assert_rpc_error(
            self.delete_operation(queued.name), grpc.StatusCode.FAILED_PRECONDITION, "cancel"
        )
        operation = await self.get_operation(queued.name)
        self.assertFalse(operation.done)

    @async_test
    async def test_delete_unknown(self):
        await self.assert_rpc_error(
            self.delete_operation("main/operations/unknown"), grpc.StatusCode.NOT_FOUND
        )


class WaitOperationTests(OperationsTestCase):
    @async_test
    async def test_timeout_returns_running_operation(self):
        _, queued = await self.start_execution()
        started = time.monotonic()
        operation = await self.wait_operation(queued.name, timeout=0.1)
        self.assertGreaterEqual(time.monotonic() - started, 0.1)
        self.assertEqual(operation.name, queued.name)
        self.assertFalse(operation.done)
        self.assertEqual(operation_stage(operation), QUEUED)

    @async_test
    async def test_returns_when_done(self):
        _, queued = await self.start_execution()
        waiting = asyncio.ensure_future(self.wait_operation(queued.name))
        result = await self.make_result(stdout=b"waited\n")
        await self.run_on_bot(result)

        operation = await asyncio.wait_for(waiting, WAIT_TIMEOUT)
        self.assertTrue(operation.done)
        self.assertEqual(operation_response(operation).result.stdout_digest, result.stdout_digest)

    @async_test
    async def test_done_operation_returns_at_once(self):
        action_digest = await self.store_action()
        done = await self.execute_to_completion(action_digest, await self.make_result())
        operation = await self.wait_operation(done.name, rpc_timeout=1.0)
        self.assertTrue(operation.done)
        self.assertEqual(operation.response, done.response)

    @async_test
    async def test_rpc_deadline_shorter_than_timeout(self):
        _, queued = await self.start_execution()
        # The server keeps DEADLINE_MARGIN of the call's deadline free, so this call
        # waits about 0.2 seconds and returns the operation before its deadline.
        operation = await self.wait_operation(queued.name, rpc_timeout=DEADLINE_MARGIN + 0.2)
        self.assertFalse(operation.done)
        self.assertEqual(operation.name, queued.name)

    @async_test
    async def test_negative_timeout(self):
        _, queued = await self.start_execution()
        request = operations_proto_pb2.WaitOperationRequest(
            name=queued.name, timeout=duration_pb2.Duration(seconds=-1)
        )
        await self.assert_rpc_error(
            self.operations.WaitOperation(request), grpc.StatusCode.INVALID_ARGUMENT, "timeout"
        )

    @async_test
    async def test_unknown_operation(self):
        await self.assert_rpc_error(
            self.wait_operation("main/operations/unknown"), grpc.StatusCode.NOT_FOUND
        )
