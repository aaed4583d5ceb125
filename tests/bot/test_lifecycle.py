"""How a real bot process ends: stopped by SIGTERM while it runs an action, and killed by
SIGKILL, against the real daemon on loopback."""

import asyncio
import os
import signal
import sys
import time

from google.longrunning import operations_grpc_pb2
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.rpc import code_pb2
from twisted.trial import unittest

from bgrid.bot.processes import find_group_members
from bgrid.digest import Digest
from tests.bot.test_integration import GridProcessTestCase, find_free_port
from tests.bot.test_runner import process_is_gone, read_text
from tests.client.fakes import wait_until
from tests.util import async_test, make_temp_dir

# Seconds for an action to start on a bot, and for a bot to exit after a signal. The stop
# itself takes a few seconds at most: a test only waits this long when it fails.
ACTION_START_TIMEOUT = 30.0
BOT_EXIT_TIMEOUT = 15.0

# Maximum seconds a bot may take to exit after SIGTERM while it runs an action.
MAX_STOP_SECONDS = 8.0

# Seconds two bots with the same name run against one daemon, and the most sessions they
# may open in that time. Without a pause after repeated NOT_FOUND responses, they open
# hundreds of sessions a second.
SAME_NAME_SECONDS = 8.0
MAX_SAME_NAME_SESSIONS = 30


class BotStopTests(GridProcessTestCase):
    # Without retries, a requeue that counted one would fail the action.
    daemon_options = ("--max-job-retries", "0")

    @async_test
    async def setUp(self):
        await self.start_daemon()

    @async_test
    async def test_sigterm_returns_running_lease(self):
        first_log = os.path.join(self.directory, "first-bot.log")
        first = await self.start_bot(
            "first", os.path.join(self.directory, "first-bot"), first_log, concurrency=1
        )
        marker = os.path.join(self.directory, "ran-once")
        pid_file = os.path.join(self.directory, "sleeper.pid")
        action_digest = await self.put_action([
            "/bin/sh", "-c",
            f"if [ -e {marker} ]; then echo second run; exit 0; fi; "
            f"touch {marker}; sleep 300 & echo $! > {pid_file}; wait",
        ])
        call = self.execute(action_digest)
        await wait_until(
            lambda: os.path.exists(pid_file) and read_text(pid_file).endswith("\n"),
            timeout=ACTION_START_TIMEOUT,
        )
        sleeper = int(read_text(pid_file))

        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(first.wait(), BOT_EXIT_TIMEOUT)

        self.assertEqual(exit_code, 0, read_text(first_log))
        self.assertLess(time.monotonic() - started, MAX_STOP_SECONDS)
        self.assertTrue(process_is_gone(sleeper), f"the action's sleep {sleeper} survived")
        first_output = read_text(first_log)
        self.assertIn("reported BOT_TERMINATING and lease", first_output)
        self.assertIn("as CANCELLED", first_output)
        self.assert_log_clean(first_log)
        await wait_until(lambda: "without counting a retry" in read_text(self.daemon_log))

        # The job waits in the queue until another bot runs it.
        second_log = os.path.join(self.directory, "second-bot.log")
        await self.start_bot(
            "second", os.path.join(self.directory, "second-bot"), second_log, concurrency=1
        )
        response = await self.final_response(call, second_log)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        self.assertEqual(response.result.execution_metadata.worker, "second")
        stdout = await self.cas.read_blob(Digest.from_proto(response.result.stdout_digest))
        self.assertEqual(stdout, b"second run\n")

    @async_test
    async def test_sigterm_of_idle_bot_closes_session(self):
        bot_log = os.path.join(self.directory, "bot.log")
        bot = await self.start_bot("idle", os.path.join(self.directory, "bot"), bot_log)
        await wait_until(
            lambda: read_text(bot_log).count("created session") == 2,
            timeout=ACTION_START_TIMEOUT,
        )

        bot.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(bot.wait(), BOT_EXIT_TIMEOUT)

        self.assertEqual(exit_code, 0, read_text(bot_log))
        self.assertEqual(
            read_text(bot_log).count("reported BOT_TERMINATING and no lease"), 2, read_text(bot_log)
        )
        await wait_until(
            lambda: read_text(self.daemon_log).count("bot idle.") >= 2
            and read_text(self.daemon_log).count("is terminating") == 2
        )


class SessionCreationTests(GridProcessTestCase):
    @async_test
    async def test_unknown_instance_stops_bot(self):
        await self.start_daemon()
        bot_log = os.path.join(self.directory, "bot.log")
        bot = await self.start_process(
            [sys.executable, "-m", "bgrid", "bot", "--server", self.address,
             "--work-dir", os.path.join(self.directory, "bot"), "--concurrency", "2",
             "--name", "lost", "--instance", "nope"],
            bot_log,
        )

        exit_code = await asyncio.wait_for(bot.wait(), BOT_EXIT_TIMEOUT)

        output = read_text(bot_log)
        self.assertNotEqual(exit_code, 0, output)
        self.assertIn("the server rejected the session of bot lost.", output)
        self.assertIn("INVALID_ARGUMENT", output)
        self.assertIn("unknown instance name 'nope'", output)
        self.assertNotIn("retrying", output)
        self.assertEqual(exit_code, 2, output)
        self.assertNotIn("Traceback", output)

    @async_test
    async def test_bot_started_before_daemon_connects(self):
        port = find_free_port()
        self.address = f"127.0.0.1:{port}"
        self.directory = make_temp_dir(self)
        bot_log = os.path.join(self.directory, "bot.log")
        bot = await self.start_bot("early", os.path.join(self.directory, "bot"), bot_log,
                                   concurrency=1)
        await wait_until(
            lambda: "call to the server failed: UNAVAILABLE" in read_text(bot_log),
            timeout=ACTION_START_TIMEOUT,
        )

        await self.start_daemon(port=port)

        await wait_until(lambda: "created session" in read_text(bot_log),
                         timeout=ACTION_START_TIMEOUT)
        self.assertIsNone(bot.returncode)
        action_digest = await self.put_action(["/bin/sh", "-c", "echo ran"])
        response = await self.final_response(self.execute(action_digest), bot_log)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        self.assertEqual(response.result.execution_metadata.worker, "early")


class SameNameTests(GridProcessTestCase):
    @async_test
    async def setUp(self):
        await self.start_daemon()

    @async_test
    async def test_bots_with_same_name_back_off(self):
        logs = [os.path.join(self.directory, f"bot-{index}.log") for index in range(2)]
        for index, log_path in enumerate(logs):
            await self.start_bot(
                "twin", os.path.join(self.directory, f"bot-{index}"), log_path, concurrency=1
            )

        await asyncio.sleep(SAME_NAME_SECONDS)

        sessions = read_text(self.daemon_log).count("Opened bot session")
        self.assertLessEqual(sessions, MAX_SAME_NAME_SESSIONS, read_text(self.daemon_log))
        hints = sum(read_text(log_path).count("Another bot may be using the same bot id")
                    for log_path in logs)
        self.assertGreater(hints, 0)
        for log_path in logs:
            self.assertNotIn("Traceback", read_text(log_path))


class OrphanedProcessTests(GridProcessTestCase):
    @async_test
    async def setUp(self):
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("the bot records process groups only on Linux")
        await self.start_daemon()

    @async_test
    async def test_sigkilled_bot_leaves_no_action_processes(self):
        work_dir = os.path.join(self.directory, "bot")
        records = os.path.join(work_dir, "processes")
        killed_log = os.path.join(self.directory, "killed-bot.log")
        killed = await self.start_bot("orphans", work_dir, killed_log, concurrency=1)
        action_digest = await self.put_action(["/bin/sh", "-c", "sleep 300 & sleep 300"])
        call = self.execute(action_digest)
        first = await call.read()

        # The bot records the group of the action's supervisor, which contains the
        # supervisor, the shell and both sleeps.
        await wait_until(lambda: recorded_groups(records), timeout=ACTION_START_TIMEOUT)
        (group,) = recorded_groups(records)
        await wait_until(lambda: len(find_group_members(group)) >= 3, timeout=ACTION_START_TIMEOUT)
        members = sorted(find_group_members(group))
        self.addCleanup(kill_group, group)

        killed.kill()
        await killed.wait()

        # The sleep in the background is no child of the bot, and still it dies with it.
        await wait_until(
            lambda: all(process_is_gone(pid) for pid in members), timeout=BOT_EXIT_TIMEOUT
        )

        # Cancelled, so that the next bot does not run the action again.
        operations = operations_grpc_pb2.OperationsStub(self.channel)
        await operations.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name))
        call.cancel()

        # The next bot on the work directory finds the record and nothing left to kill.
        restarted_log = os.path.join(self.directory, "restarted-bot.log")
        await self.start_bot("orphans", work_dir, restarted_log, concurrency=1)
        await wait_until(lambda: "created session" in read_text(restarted_log))
        self.assertNotIn("Killed process group", read_text(restarted_log))
        self.assertEqual(os.listdir(records), [])


def recorded_groups(records):
    """Return the process group ids recorded in a bot's records directory."""
    if not os.path.isdir(records):
        return []
    return [int(name) for name in os.listdir(records) if name.isdigit()]


def kill_group(process_group_id):
    """Kill what a failed test left running."""
    try:
        os.killpg(process_group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
