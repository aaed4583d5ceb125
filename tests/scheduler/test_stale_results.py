"""Results that a bot reports for a lease it no longer holds, through the real Bots service.

The server ignores and logs a result for a lease that it cancelled, that expired or that
it gave to another bot. The operation keeps its state, and the result is not cached.
"""

import grpc
from google.longrunning import operations_proto_pb2
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from tests.scheduler.helpers import DEFAULT_MAX_ACTION_TIMEOUT, capture_logs
from tests.servicers.support import (
    ExecutionServicerTestCase,
    RemoteBot,
    digest_proto,
    operation_response,
    operation_stage,
)
from tests.util import async_test

EXECUTING = re_pb2.ExecutionStage.EXECUTING
QUEUED = re_pb2.ExecutionStage.QUEUED

# The Scheduler's defaults, which the servicer tests use.
BOT_KEEPALIVE_TIMEOUT = 60.0
ACTION_TIMEOUT_GRACE = 60.0


class StaleResultTestCase(ExecutionServicerTestCase):
    async def start_action(self, bot_id="bot-1"):
        """Execute an action and start it on a new bot; return the operation name, the
        action digest and the bot."""
        self.events = capture_logs(self)
        action_digest = await self.store_action()
        call = self.execute(action_digest)
        self.addCleanup(call.cancel)
        name = (await self.next_operation(call)).name
        bot = RemoteBot(self.bots, bot_id)
        await bot.create()
        await bot.accept()
        return name, action_digest, bot

    async def report_result(self, bot, lease_id, stdout):
        """Report ``lease_id`` COMPLETED with a cacheable result; return the session."""
        result = await self.make_result(stdout=stdout)
        lease = bots_pb2.Lease(id=lease_id, state=bots_pb2.COMPLETED)
        lease.result.Pack(result)
        return await bot.update([lease])

    async def get_operation(self, name):
        return await self.operations.GetOperation(
            operations_proto_pb2.GetOperationRequest(name=name)
        )

    async def assert_not_cached(self, action_digest):
        await self.assert_rpc_error(
            self.action_cache_stub.GetActionResult(re_pb2.GetActionResultRequest(
                instance_name="main", action_digest=digest_proto(action_digest)
            )),
            grpc.StatusCode.NOT_FOUND,
        )

    def logged(self, lease_id, text):
        """Return the log events about ``lease_id`` whose message contains ``text``."""
        return [
            event for event in self.events
            if event.get("lease_id") == lease_id and text in event.get("log_format", "")
        ]


class StaleResultTests(StaleResultTestCase):
    @async_test
    async def test_result_of_cancelled_lease_ignored(self):
        name, action_digest, bot = await self.start_action()
        lease_id = bot.lease.id
        await self.operations.CancelOperation(
            operations_proto_pb2.CancelOperationRequest(name=name)
        )

        session = await self.report_result(bot, lease_id, b"after cancel\n")

        self.assertEqual(list(session.leases), [])
        response = operation_response(await self.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.CANCELLED)
        self.assertFalse(response.HasField("result"))
        await self.assert_not_cached(action_digest)
        self.assertEqual(len(self.logged(lease_id, "any result it sent is ignored")), 1)

    @async_test
    async def test_result_of_timed_out_lease_ignored(self):
        name, action_digest, bot = await self.start_action()
        lease_id = bot.lease.id
        # The bot keeps its session alive without reporting a result.
        limit = DEFAULT_MAX_ACTION_TIMEOUT + ACTION_TIMEOUT_GRACE
        while self.clock.seconds() < limit:
            await bot.update()
            self.clock.advance(min(BOT_KEEPALIVE_TIMEOUT - 1, limit - self.clock.seconds()))
        response = operation_response(await self.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.DEADLINE_EXCEEDED)

        session = await self.report_result(bot, lease_id, b"too late\n")

        self.assertEqual(list(session.leases), [])
        response = operation_response(await self.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.DEADLINE_EXCEEDED)
        self.assertFalse(response.HasField("result"))
        await self.assert_not_cached(action_digest)
        self.assertEqual(len(self.logged(lease_id, "stayed ACTIVE")), 1)
        self.assertEqual(len(self.logged(lease_id, "any result it sent is ignored")), 1)

    @async_test
    async def test_result_after_session_expired_rejected(self):
        name, action_digest, bot = await self.start_action()
        lease_id = bot.lease.id
        self.clock.advance(BOT_KEEPALIVE_TIMEOUT)

        await self.assert_rpc_error(
            self.report_result(bot, lease_id, b"expired\n"),
            grpc.StatusCode.NOT_FOUND,
            "not found",
        )

        operation = await self.get_operation(name)
        self.assertFalse(operation.done)
        self.assertEqual(operation_stage(operation), QUEUED)
        await self.assert_not_cached(action_digest)

    @async_test
    async def test_result_of_reassigned_lease_ignored(self):
        name, action_digest, slow = await self.start_action("slow")
        stale_lease_id = slow.lease.id
        self.clock.advance(BOT_KEEPALIVE_TIMEOUT)
        fresh = RemoteBot(self.bots, "fresh")
        await fresh.create()
        self.assertNotEqual(fresh.lease.id, stale_lease_id)
        await fresh.accept()

        # The slow bot comes back under a new session and reports the lease it lost.
        slow = RemoteBot(self.bots, "slow")
        await slow.create()
        session = await self.report_result(slow, stale_lease_id, b"stale\n")

        self.assertEqual(list(session.leases), [])
        operation = await self.get_operation(name)
        self.assertFalse(operation.done)
        self.assertEqual(operation_stage(operation), EXECUTING)
        await self.assert_not_cached(action_digest)
        self.assertEqual(len(self.logged(stale_lease_id, "does not hold it")), 1)

        await fresh.complete(await self.make_result(stdout=b"fresh\n"))
        # The operation completes once the result is in the action cache.
        done = await self.read_until_done(self.wait_execution(name))
        response = operation_response(done)
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertEqual(response.result.execution_metadata.worker, "fresh")
