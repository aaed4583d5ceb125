"""A bot that dies or hangs in the middle of an action, and a second bot that takes over.

The daemon closes a bot session that has not called UpdateBotSession for --bot-keepalive
seconds and requeues its job. These tests set it to KEEPALIVE_SECONDS, and cap an idle
bot's long poll at LONG_POLL_SECONDS so that the server soon ends a hung bot's open call.
"""

import os
import signal

from google.rpc import code_pb2

from bgrid.client import CasClient
from bgrid.digest import Digest
from tests.faults import support
from tests.util import async_test

KEEPALIVE_SECONDS = 3
LONG_POLL_SECONDS = 2

# Seconds the action sleeps. A copy of the action left running by a lost bot would still
# run when the second bot starts it, about KEEPALIVE_SECONDS after the loss.
ACTION_SECONDS = 6

ACTION_ARGUMENTS = ["sh", "-c", f"sleep {ACTION_SECONDS}; echo done > out"]


class BotLossTest(support.FaultTestCase):
    daemon_options = [
        "--bot-keepalive",
        str(KEEPALIVE_SECONDS),
        "--max-long-poll",
        str(LONG_POLL_SECONDS),
    ]

    async def start_action_on_first_bot(self, channel):
        """Start bot-a, submit the action and wait until bot-a runs it.

        Returns ``(bot-a, operation name, action digest, bot-a's action processes)``. Bot-b
        starts only afterwards, so the job cannot go to it first.
        """
        first_bot = self.grid.start_bot("bot-a")
        cas = CasClient(channel)
        action_digest = await support.upload_action(cas, ACTION_ARGUMENTS, output_paths=["out"])
        name = await support.submit(channel, action_digest)
        first_processes = await support.wait_for(
            lambda: support.action_processes(first_bot, "sleep"),
            support.EVENT_TIMEOUT,
            "bot-a to run the action",
        )
        self.addCleanup(support.kill_survivors, first_processes)
        return first_bot, name, action_digest, first_processes

    async def assert_result_from(self, channel, operation, worker):
        """Check that ``operation`` succeeded on ``worker`` and produced the expected output."""
        response = support.execute_response(operation)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        result = response.result
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(result.execution_metadata.worker, worker)
        self.assertEqual([output.path for output in result.output_files], ["out"])
        output_digest = Digest.from_proto(result.output_files[0].digest)
        self.assertEqual(await CasClient(channel).read_blob(output_digest), b"done\n")

    def requeue_count(self):
        return self.grid.daemon_log().count("Requeued job")

    @async_test
    async def test_killed_bot_job_moves(self):
        """SIGKILL of a bot while its action runs.

        Afterwards the job has moved to the second bot once, and the operation ends OK with
        that bot's complete result. No process of the killed bot's action is left when the
        second bot starts the action, so the action never runs twice at once.
        """
        channel = self.open_channel()
        first_bot, name, _, first_processes = await self.start_action_on_first_bot(channel)
        second_bot = self.grid.start_bot("bot-b")

        self.grid.kill(first_bot)

        # The session of bot-a expires after the keepalive, and bot-b gets the job.
        await support.wait_for(
            lambda: support.action_processes(second_bot, "sleep"),
            KEEPALIVE_SECONDS + support.EVENT_TIMEOUT,
            "bot-b to run the action after bot-a was killed",
        )
        self.assertEqual(
            support.survivors(first_processes),
            [],
            "processes of the killed bot's action still run while bot-b runs the action",
        )

        operation = await support.wait_until_done(
            channel, name, ACTION_SECONDS + support.EVENT_TIMEOUT
        )
        await self.assert_result_from(channel, operation, "bot-b")
        self.assertEqual(self.requeue_count(), 1, self.grid.daemon_log())
        self.assertEqual(support.survivors(first_processes), [])
        self.assert_running(second_bot)

    @async_test
    async def test_stopped_bot_late_report_rejected(self):
        """SIGSTOP of a bot while its action runs: its connection stays open, but it never
        calls again, while its action runs on to the end.

        Afterwards its session has expired and the job has moved to the second bot once.
        The first call of the first bot after SIGCONT, made before the second bot finishes,
        is rejected with NOT_FOUND because its session is gone, so no result of the first
        bot reaches the job. That call reports the lease ACTIVE or COMPLETED, depending on
        whether the bot has noticed the end of its action by then. The operation's result
        and the cached result are the second bot's.
        """
        channel = self.open_channel()
        first_bot, name, action_digest, first_processes = await self.start_action_on_first_bot(
            channel
        )
        second_bot = self.grid.start_bot("bot-b")

        os.kill(first_bot.pid, signal.SIGSTOP)
        # Runs before the grid stops, since cleanups run last in, first out.
        self.addCleanup(self.continue_process, first_bot)

        await support.wait_for(
            lambda: support.action_processes(second_bot, "sleep"),
            LONG_POLL_SECONDS + KEEPALIVE_SECONDS + support.EVENT_TIMEOUT,
            "bot-b to run the action after bot-a stopped calling",
        )
        # The action of bot-a runs in its own session, so SIGSTOP did not reach it, and
        # bot-a has a result to report once it continues.
        await support.wait_for(
            lambda: not support.survivors(first_processes),
            ACTION_SECONDS + support.EVENT_TIMEOUT,
            "the action of the stopped bot-a to finish",
        )
        os.kill(first_bot.pid, signal.SIGCONT)

        await support.wait_for(
            lambda: "was not found on the server" in first_bot.log_text(),
            support.EVENT_TIMEOUT,
            "bot-a to report its lease to its expired session",
        )
        self.assertFalse(
            support.action_processes(second_bot, "sleep") == [],
            "bot-b finished before bot-a reported, so the late report was not the first",
        )
        self.assertNotIn("Bot bot-a.0 completed job", self.grid.daemon_log())

        operation = await support.wait_until_done(
            channel, name, ACTION_SECONDS + support.EVENT_TIMEOUT
        )
        self.assertTrue(
            support.action_processes(second_bot, "sleep") == [],
            "bot-b still runs the action after its operation is done",
        )
        await self.assert_result_from(channel, operation, "bot-b")
        self.assertNotIn("Bot bot-a.0 completed job", self.grid.daemon_log())
        self.assertEqual(self.requeue_count(), 1, self.grid.daemon_log())

        cached = await support.get_action_result(channel, action_digest)
        self.assertEqual(cached.execution_metadata.worker, "bot-b")
        self.assert_running(first_bot, second_bot)

    def continue_process(self, process):
        if process.is_running():
            os.kill(process.pid, signal.SIGCONT)
