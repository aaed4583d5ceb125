"""Tests of the server's maximum action timeout and of the timeout of ACTIVE leases."""

from google.protobuf import duration_pb2
from google.rpc import code_pb2
from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.errors import InvalidArgumentError
from bgrid.scheduler import Scheduler
from tests.scheduler.helpers import (
    BotClient,
    RestartableScheduler,
    as_leased,
    capture_logs,
    make_action,
    make_result,
    make_scheduler,
    operation_response,
    operation_stage,
    submit,
)

EXECUTING = re_pb2.ExecutionStage.EXECUTING


def submit_with_timeout(scheduler, label, seconds):
    """Submit the action of ``label`` with ``Action.timeout`` set; return the operation name."""
    digest, action = make_action(label)
    action.timeout.CopyFrom(duration_pb2.Duration(seconds=seconds))
    return scheduler.submit("", digest, action)


def leased_timeout(bot):
    """Return the timeout in seconds of the Action in the bot's lease."""
    return bot.leased_action().timeout.ToNanoseconds() / 1e9


class OptionTests(unittest.TestCase):
    def test_invalid_values_rejected(self):
        cases = [
            ({"max_action_timeout": 0}, "max_action_timeout"),
            ({"max_action_timeout": -5}, "max_action_timeout"),
            ({"action_timeout_grace": -1}, "action_timeout_grace"),
        ]
        for options, expected in cases:
            with self.subTest(options=options):
                error = self.assertRaises(ValueError, Scheduler, task.Clock(), **options)
                self.assertIn(expected, str(error))


class LeasedTimeoutTests(unittest.TestCase):
    def test_timeouts_in_lease_payload(self):
        cases = [
            ("no timeout", None, 600.0),
            ("zero", 0, 600.0),
            ("shorter", 30, 30.0),
            ("equal", 600, 600.0),
        ]
        for label, requested, expected in cases:
            with self.subTest(label):
                scheduler, _ = make_scheduler(self, max_action_timeout=600)
                if requested is None:
                    submit(scheduler, label)
                else:
                    submit_with_timeout(scheduler, label, requested)

                bot = BotClient(scheduler, "bot-1")

                self.assertEqual(leased_timeout(bot), expected)

    def test_lease_keeps_other_fields(self):
        scheduler, _ = make_scheduler(self, max_action_timeout=600)
        digest, action = make_action("a", platform=[("os", "linux")])
        scheduler.submit("", digest, action)

        bot = BotClient(scheduler, "bot-1", [("os", "linux")])

        self.assertEqual(bot.leased_action(), as_leased(action, 600))

    def test_timeout_above_maximum_rejected(self):
        scheduler, _ = make_scheduler(self, max_action_timeout=600)

        error = self.assertRaises(InvalidArgumentError, submit_with_timeout, scheduler, "a", 7200)

        self.assertIn("Action.timeout 7200 s", error.message)
        self.assertIn("at most 600 s", error.message)
        self.assertEqual(scheduler.stats()["jobs"], 0)

    def test_negative_timeout_rejected(self):
        scheduler, _ = make_scheduler(self)

        error = self.assertRaises(InvalidArgumentError, submit_with_timeout, scheduler, "a", -1)

        self.assertIn("Action.timeout -1 s", error.message)
        self.assertEqual(scheduler.stats()["jobs"], 0)


class LeaseTimeoutTests(unittest.TestCase):
    def make_running_job(self, timeout=None, **options):
        """Submit an action and start it on a bot that then goes quiet in a long poll.

        Returns the scheduler, its clock, the operation name and the bot.
        """
        options = {"max_action_timeout": 600, "action_timeout_grace": 60,
                   "bot_keepalive_timeout": 10**6, "max_long_poll": 10**6,
                   "operation_retention": 10**6, **options}
        scheduler, clock = make_scheduler(self, **options)
        if timeout is None:
            name = submit(scheduler, "a")
        else:
            name = submit_with_timeout(scheduler, "a", timeout)
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        return scheduler, clock, name, bot

    def test_silent_lease_fails_after_grace(self):
        scheduler, clock, name, bot = self.make_running_job()
        lease_id = bot.lease.id
        poll = bot.update()

        clock.advance(659)
        self.assertNoResult(poll)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)
        clock.advance(1)

        operation = scheduler.get_operation(name)
        self.assertTrue(operation.done)
        status = operation_response(operation).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)
        self.assertIn("600 s", status.message)
        self.assertIn(lease_id, status.message)
        session = self.successResultOf(poll)
        self.assertEqual([(lease.id, lease.state) for lease in session.leases],
                         [(lease_id, bots_pb2.CANCELLED)])
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)

    def test_timeout_of_action_used(self):
        scheduler, clock, name, _ = self.make_running_job(timeout=10)

        clock.advance(69)
        self.assertFalse(scheduler.get_operation(name).done)
        clock.advance(1)

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)

    def test_late_result_ignored(self):
        scheduler, clock, name, bot = self.make_running_job()
        lease_id = bot.lease.id
        clock.advance(660)

        session = self.successResultOf(
            bot.complete(make_result(stdout=b"late"), lease_id=lease_id)
        )

        self.assertEqual(list(session.leases), [])
        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)
        self.assertEqual(scheduler.stats()["leases"], 0)

    def test_result_in_time_stops_timer(self):
        scheduler, clock, name, bot = self.make_running_job()
        clock.advance(600)

        self.successResultOf(bot.complete(make_result(stdout=b"in time")))
        clock.advance(3600)

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertEqual(response.result.stdout_raw, b"in time")

    def test_requeued_job_gets_new_timer(self):
        scheduler, clock, name, _ = self.make_running_job(bot_keepalive_timeout=100)
        clock.advance(100)
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        other = BotClient(scheduler, "other")
        self.successResultOf(other.accept())
        poll = other.update()

        # The first lease started at 0, and its deadline of 660 must not end this one.
        clock.advance(600)
        self.assertFalse(scheduler.get_operation(name).done)
        clock.advance(59)
        self.assertNoResult(poll)
        clock.advance(1)

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)
        self.successResultOf(poll)

    def test_cancelled_operation_stops_timer(self):
        scheduler, clock, name, bot = self.make_running_job()
        scheduler.cancel_operation(name)
        self.successResultOf(bot.update(leases=[]))

        clock.advance(3600)

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.CANCELLED)

    def test_other_operations_of_job_complete(self):
        scheduler, clock, first, _ = self.make_running_job()
        second = submit(scheduler, "a")

        clock.advance(660)

        for name in (first, second):
            status = operation_response(scheduler.get_operation(name)).status
            self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)


class LeaseTimeoutRecoveryTests(unittest.TestCase):
    async def start_running_job(self):
        """Start a scheduler over LMDB and a job on a bot; return them and the operation name."""
        restartable = RestartableScheduler(
            self, max_action_timeout=600, action_timeout_grace=60, bot_keepalive_timeout=100,
            max_long_poll=10**6,
        )
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())
        return restartable, name, bot

    async def test_timer_counts_from_stored_start(self):
        restartable, name, bot = await self.start_running_job()
        restartable.clock.advance(90)
        await restartable.settle(bot.update(wait=False))
        restartable.clock.advance(90)

        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        poll = bot.update()
        restartable.clock.advance(479)
        self.assertFalse(scheduler.get_operation(name).done)
        restartable.clock.advance(1)

        self.assertEqual(restartable.clock.seconds(), 660)
        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)
        session = await restartable.settle(poll)
        self.assertEqual(session.leases[0].state, bots_pb2.CANCELLED)

    async def test_overdue_lease_waits_for_keepalive(self):
        restartable, name, bot = await self.start_running_job()

        scheduler = await restartable.restart(downtime=5000)
        bot.scheduler = scheduler
        restartable.clock.advance(99)
        self.assertFalse(scheduler.get_operation(name).done)

        # The bot reports its result within the keepalive period after the restart.
        await restartable.settle(bot.complete(make_result(stdout=b"finished while down")))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertEqual(response.result.stdout_raw, b"finished while down")

    async def test_silent_bot_fails_job_after_restart(self):
        restartable, name, bot = await self.start_running_job()

        scheduler = await restartable.restart(downtime=5000)
        bot.scheduler = scheduler
        poll = bot.update()
        restartable.clock.advance(100)

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.DEADLINE_EXCEEDED)
        session = await restartable.settle(poll)
        self.assertEqual(session.leases[0].state, bots_pb2.CANCELLED)
