"""Actions that end early: cancelled by a client, or stopped by their Action.timeout."""

import asyncio

import grpc
from google.rpc import code_pb2

from bgrid.client import CasClient
from tests.cli.support import describe, run_bgrid
from tests.faults import support
from tests.util import async_test

# Seconds the action would sleep if nothing stopped it. This is longer than any wait of the
# test, so a process still running when checked was not stopped.
SLEEP_SECONDS = 120

# Action.timeout of the timed-out action, in seconds.
ACTION_TIMEOUT_SECONDS = 1


class CancelTimeoutTest(support.FaultTestCase):
    async def start_action(self, channel, bot, timeout_seconds=None):
        """Submit a long action and wait until ``bot`` runs it.

        Returns ``(operation name, action digest, the action's processes)``.
        """
        cas = CasClient(channel)
        action_digest = await support.upload_action(
            cas,
            ["sh", "-c", f"sleep {SLEEP_SECONDS}; echo done > out"],
            output_paths=["out"],
            timeout_seconds=timeout_seconds,
        )
        name = await support.submit(channel, action_digest)
        processes = await support.wait_for(
            lambda: support.action_processes(bot, "sleep"),
            support.EVENT_TIMEOUT,
            f"{bot.name} to run the action",
        )
        self.addCleanup(support.kill_survivors, processes)
        return name, action_digest, processes

    def assert_group_gone(self, processes):
        for info in processes:
            self.assertEqual(
                support.group_members(info.process_group),
                [],
                f"processes of the action's process group {info.process_group} still run",
            )

    async def assert_bot_runs_next_action(self, channel):
        """Check that the bot still takes work: a short action succeeds."""
        cas = CasClient(channel)
        action_digest = await support.upload_action(cas, ["sh", "-c", "echo next"])
        name = await support.submit(channel, action_digest)
        operation = await support.wait_until_done(channel, name, support.EVENT_TIMEOUT)
        response = support.execute_response(operation)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        self.assertEqual(response.result.exit_code, 0)

    @async_test
    async def test_cancel_kills_action(self):
        """``bgrid operations cancel`` of a running action.

        Afterwards the operation is done with CANCELLED, the bot has killed every process
        of the action and runs the next action, and nothing is cached for the cancelled
        action.
        """
        bot = self.grid.start_bot("bot-a")
        channel = self.open_channel()
        name, action_digest, processes = await self.start_action(channel, bot)

        cancelled = await asyncio.to_thread(
            run_bgrid, "operations", "cancel", name, "--server", self.grid.address,
            cwd=self.base_dir,
        )
        self.assertEqual(cancelled.returncode, 0, describe(cancelled))
        self.assertIn(b"status CANCELLED", cancelled.stdout, describe(cancelled))

        operation = await support.get_operation(channel, name)
        self.assertTrue(operation.done)
        response = support.execute_response(operation)
        self.assertEqual(response.status.code, code_pb2.CANCELLED, response.status.message)

        await support.wait_for(
            lambda: not support.survivors(processes),
            support.EVENT_TIMEOUT,
            "the bot to kill the processes of the cancelled action",
        )
        self.assert_group_gone(processes)
        # The bot has one slot, so it takes the next action only once it has let go of
        # the cancelled lease. Any result it sent for that lease would be in by then.
        await self.assert_bot_runs_next_action(channel)
        self.assertEqual(
            await support.action_cache_code(channel, action_digest), grpc.StatusCode.NOT_FOUND
        )
        self.assert_running(bot)

    @async_test
    async def test_timeout_kills_process_group(self):
        """An Action with a timeout of 1 second whose command sleeps for 120 seconds.

        Afterwards the operation is done with DEADLINE_EXCEEDED long before the sleep would
        have ended, no process of the action's process group runs, nothing is cached for
        the action, and the bot runs the next action.
        """
        bot = self.grid.start_bot("bot-a")
        channel = self.open_channel()
        name, action_digest, processes = await self.start_action(
            channel, bot, timeout_seconds=ACTION_TIMEOUT_SECONDS
        )

        # EVENT_TIMEOUT is far below SLEEP_SECONDS.
        operation = await support.wait_until_done(channel, name, support.EVENT_TIMEOUT)

        response = support.execute_response(operation)
        self.assertEqual(
            response.status.code, code_pb2.DEADLINE_EXCEEDED, response.status.message
        )
        self.assertEqual(support.survivors(processes), [])
        self.assert_group_gone(processes)
        self.assertEqual(
            await support.action_cache_code(channel, action_digest), grpc.StatusCode.NOT_FOUND
        )
        await self.assert_bot_runs_next_action(channel)
        self.assert_running(bot)
