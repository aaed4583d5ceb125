"""Tests of the bot session loop against a Bots service whose responses the tests script."""

import asyncio

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2
from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc, worker_pb2
from bgrid.bot.executor import LeaseOutcome
from bgrid.bot.retry import DEFAULT_SERVER_KEEPALIVE_SECONDS, RESULT_RETRY_MARGIN_SECONDS
from bgrid.bot.session import (
    NOT_FOUND_BEFORE_BACKOFF,
    PERMANENT_CREATE_CODES,
    Backoff,
    SessionLoop,
    SessionRejectedError,
)
from bgrid.bridge import as_deferred
from bgrid.errors import make_status
from tests.client.fakes import ScriptedBots, open_test_channel, start_server, wait_until
from tests.scheduler.helpers import capture_logs
from tests.util import async_test

WORKER = worker_pb2.Worker(properties=[worker_pb2.Worker.Property(key="OSFamily", value="linux")])


def payload_of(action):
    packed = any_pb2.Any()
    packed.Pack(action)
    return packed


class FakeExecutor:
    """Stands in for ActionExecutor.execute; each lease ends when the test resolves it."""

    def __init__(self):
        self.started = asyncio.Queue()
        self.outcomes = {}
        self.cancelled = []
        self.result_retry_seconds = {}

    async def execute(self, payload, lease_id, bot_id, result_retry_seconds):
        outcome = asyncio.get_running_loop().create_future()
        self.outcomes[lease_id] = outcome
        self.result_retry_seconds[lease_id] = result_retry_seconds
        await self.started.put((payload, lease_id, bot_id))
        try:
            return await outcome
        except asyncio.CancelledError:
            self.cancelled.append(lease_id)
            raise

    async def next_start(self):
        return await asyncio.wait_for(self.started.get(), 10)


class SessionLoopTestCase(unittest.TestCase):
    async def start_loop(self, address=None, poll_timeout=30.0, stop_report_timeout=5.0,
                         clock_start=0.0):
        self.bots = ScriptedBots()
        if address is None:
            address = await start_server(self, bots=self.bots)
        stub = bots_pb2_grpc.BotsStub(open_test_channel(self, address))
        self.clock = task.Clock()
        self.clock.advance(clock_start)
        self.executor = FakeExecutor()
        self.loop = SessionLoop(
            stub, "bot.0", "main", WORKER, "bgrid-bot/test", self.executor.execute, self.clock,
            backoff=Backoff(initial=1.0, maximum=4.0, random_fraction=lambda: 1.0),
            poll_timeout=poll_timeout, stop_report_timeout=stop_report_timeout,
            not_found_backoff=Backoff(initial=1.0, maximum=8.0, random_fraction=lambda: 1.0),
        )
        self.running = asyncio.ensure_future(self.loop.run())
        self.addCleanup(lambda: as_deferred(self.stop_loop()))

    async def stop_loop(self, answer=True):
        """Cancel the loop, as the bot's stop does, and wait until it ends.

        Returns the BOT_TERMINATING report among the calls that arrive meanwhile, or None.
        Unless ``answer`` is False, each call gets an empty BotSession, so that the loop
        need not wait for its deadline.
        """
        self.running.cancel()
        final_report = None
        while not self.running.done():
            next_call = asyncio.ensure_future(self.bots.calls.get())
            await asyncio.wait({self.running, next_call}, return_when=asyncio.FIRST_COMPLETED)
            if not next_call.done():
                next_call.cancel()
                break
            _, request, reply = next_call.result()
            if request.bot_session.status == bots_pb2.BOT_TERMINATING:
                final_report = request
            if answer and not reply.done():
                reply.set_result(bots_pb2.BotSession(name=request.bot_session.name))
        await asyncio.wait({self.running})
        return final_report

    async def expect(self, method):
        called, request, reply = await self.bots.next_call()
        self.assertEqual(called, method)
        return request, reply

    async def open_session(self, name="sessions/1"):
        """Respond to the CreateBotSession call and return the first UpdateBotSession call."""
        _, reply = await self.expect("CreateBotSession")
        reply.set_result(bots_pb2.BotSession(name=name, bot_id="bot.0"))
        return await self.expect("UpdateBotSession")

    def assign(self, reply, lease_id, payload, state=bots_pb2.PENDING, expire_time=None):
        session = bots_pb2.BotSession(
            name="sessions/1",
            leases=[bots_pb2.Lease(id=lease_id, state=state, payload=payload)],
        )
        if expire_time is not None:
            session.expire_time.CopyFrom(timestamp_pb2.Timestamp(seconds=expire_time))
        reply.set_result(session)

    async def advance_to_next_call(self):
        """Wait for the loop's retry delay, return its length and move the clock past it."""
        await wait_until(lambda: self.clock.getDelayedCalls())
        (call,) = self.clock.getDelayedCalls()
        delay = call.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay


class SessionCreationTests(SessionLoopTestCase):
    @async_test
    async def test_create_request_fields(self):
        await self.start_loop()

        request, reply = await self.expect("CreateBotSession")

        self.assertEqual(request.parent, "main")
        self.assertEqual(request.bot_session.bot_id, "bot.0")
        self.assertEqual(request.bot_session.status, bots_pb2.OK)
        self.assertEqual(request.bot_session.worker, WORKER)
        self.assertEqual(request.bot_session.version, "bgrid-bot/test")
        self.assertEqual(request.bot_session.name, "")

        reply.set_result(bots_pb2.BotSession(name="sessions/1", bot_id="bot.0"))
        update, _ = await self.expect("UpdateBotSession")
        self.assertEqual(update.name, "sessions/1")
        self.assertEqual(update.bot_session.name, "sessions/1")
        self.assertEqual(len(update.bot_session.leases), 0)

    @async_test
    async def test_idle_poll_repeats_without_delay(self):
        await self.start_loop()
        _, reply = await self.open_session()

        reply.set_result(bots_pb2.BotSession(name="sessions/1"))
        await self.expect("UpdateBotSession")

        self.assertEqual(self.clock.getDelayedCalls(), [])


class CreateErrorTests(SessionLoopTestCase):
    @async_test
    async def test_permanent_codes_end_loop(self):
        for code in sorted(PERMANENT_CREATE_CODES, key=lambda code: code.name):
            with self.subTest(code=code.name):
                await self.start_loop()
                _, reply = await self.expect("CreateBotSession")

                reply.set_result(code)

                with self.assertRaises(SessionRejectedError) as caught:
                    await self.running
                self.assertEqual(caught.exception.code, code)
                message = str(caught.exception)
                self.assertIn(f"bot bot.0 for instance 'main': {code.name}: scripted", message)
                self.assertIn("--instance", message)
                self.assertEqual(self.clock.getDelayedCalls(), [])
                self.assertTrue(self.bots.calls.empty())

    @async_test
    async def test_transient_codes_retried(self):
        codes = [
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNKNOWN,
        ]
        await self.start_loop()
        for code in codes:
            _, reply = await self.expect("CreateBotSession")
            reply.set_result(code)
            await self.advance_to_next_call()

        _, reply = await self.expect("CreateBotSession")
        reply.set_result(bots_pb2.BotSession(name="sessions/1"))
        await self.expect("UpdateBotSession")
        self.assertFalse(self.running.done())

    @async_test
    async def test_update_errors_never_end_loop(self):
        # INVALID_ARGUMENT ends the loop only when CreateBotSession returns it.
        await self.start_loop()
        _, reply = await self.open_session()

        reply.set_result(grpc.StatusCode.INVALID_ARGUMENT)

        await self.advance_to_next_call()
        await self.expect("UpdateBotSession")
        self.assertFalse(self.running.done())


class LeaseTests(SessionLoopTestCase):
    @async_test
    async def test_lease_accepted_run_and_reported(self):
        await self.start_loop()
        action = re_pb2.Action(do_not_cache=True)
        _, reply = await self.open_session()

        self.assign(reply, "lease-1", payload_of(action))

        payload, lease_id, bot_id = await self.executor.next_start()
        self.assertEqual((lease_id, bot_id), ("lease-1", "bot.0"))
        unpacked = re_pb2.Action()
        self.assertTrue(payload.Unpack(unpacked))
        self.assertEqual(unpacked, action)
        request, poll = await self.expect("UpdateBotSession")
        (lease,) = request.bot_session.leases
        self.assertEqual((lease.id, lease.state), ("lease-1", bots_pb2.ACTIVE))

        # The action finishes while the long poll is open: the poll is cancelled and the
        # result is reported at once.
        result = re_pb2.ActionResult(exit_code=3)
        self.executor.outcomes["lease-1"].set_result(LeaseOutcome(make_status(code_pb2.OK, ""), result))
        request, reply = await self.expect("UpdateBotSession")
        await wait_until(lambda: self.bots.cancelled_calls == 1)
        self.assertTrue(poll.cancelled())
        (lease,) = request.bot_session.leases
        self.assertEqual(lease.state, bots_pb2.COMPLETED)
        self.assertEqual(lease.status.code, code_pb2.OK)
        reported = re_pb2.ActionResult()
        self.assertTrue(lease.result.Unpack(reported))
        self.assertEqual(reported, result)

        # Once the report went through, the lease is gone from the bot's view.
        reply.set_result(bots_pb2.BotSession(name="sessions/1"))
        request, _ = await self.expect("UpdateBotSession")
        self.assertEqual(len(request.bot_session.leases), 0)

    @async_test
    async def test_failed_status_reported(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        await self.expect("UpdateBotSession")

        status = make_status(code_pb2.INVALID_ARGUMENT, "bad input tree")
        self.executor.outcomes["lease-1"].set_result(LeaseOutcome(status, None))
        request, _ = await self.expect("UpdateBotSession")

        (lease,) = request.bot_session.leases
        self.assertEqual(lease.state, bots_pb2.COMPLETED)
        self.assertEqual(lease.status, status)
        self.assertFalse(lease.HasField("result"))

    @async_test
    async def test_cancelled_lease_stops_action(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        _, poll = await self.expect("UpdateBotSession")

        self.assign(poll, "lease-1", any_pb2.Any(), state=bots_pb2.CANCELLED)

        request, _ = await self.expect("UpdateBotSession")
        self.assertEqual(self.executor.cancelled, ["lease-1"])
        self.assertEqual(len(request.bot_session.leases), 0)
        self.assertIsNone(self.loop.lease)

    @async_test
    async def test_second_lease_ignored_while_busy(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        _, poll = await self.expect("UpdateBotSession")

        poll.set_result(bots_pb2.BotSession(
            name="sessions/1",
            leases=[bots_pb2.Lease(id="lease-1", state=bots_pb2.ACTIVE),
                    bots_pb2.Lease(id="lease-2", state=bots_pb2.PENDING)],
        ))

        request, _ = await self.expect("UpdateBotSession")
        self.assertEqual([lease.id for lease in request.bot_session.leases], ["lease-1"])
        self.assertEqual(list(self.executor.outcomes), ["lease-1"])

    @async_test
    async def test_completion_retried_after_failure(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        await self.expect("UpdateBotSession")
        self.executor.outcomes["lease-1"].set_result(
            LeaseOutcome(make_status(code_pb2.OK, ""), re_pb2.ActionResult())
        )

        events = capture_logs(self)

        _, reply = await self.expect("UpdateBotSession")
        reply.set_result(grpc.StatusCode.UNAVAILABLE)
        await wait_until(lambda: self.clock.getDelayedCalls())
        self.clock.advance(1.0)

        request, reply = await self.expect("UpdateBotSession")
        (lease,) = request.bot_session.leases
        self.assertEqual(lease.state, bots_pb2.COMPLETED)
        retries = [event for event in events
                   if event.get("log_format", "").startswith("bot {bot_id}: reporting lease")]
        self.assertEqual(len(retries), 1)
        self.assertEqual(retries[0]["lease_id"], "lease-1")
        self.assertEqual(retries[0]["code"], "UNAVAILABLE")

        # Once a report goes through, the lease is gone from the bot's view.
        reply.set_result(bots_pb2.BotSession(name="sessions/1"))
        request, _ = await self.expect("UpdateBotSession")
        self.assertEqual(len(request.bot_session.leases), 0)


class ResultRetryTests(SessionLoopTestCase):
    @async_test
    async def test_finished_action_ends_retry_delay(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        _, poll = await self.expect("UpdateBotSession")
        poll.set_result(grpc.StatusCode.UNAVAILABLE)
        await wait_until(lambda: self.clock.getDelayedCalls())

        # The action ends during the delay, and its result goes out without waiting longer.
        self.executor.outcomes["lease-1"].set_result(
            LeaseOutcome(make_status(code_pb2.OK, ""), re_pb2.ActionResult())
        )

        request, _ = await self.expect("UpdateBotSession")
        (lease,) = request.bot_session.leases
        self.assertEqual(lease.state, bots_pb2.COMPLETED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def finish_lease(self, expire_time=None, clock_start=0.0):
        """Run lease-1 to completion; return the first report of its result, unanswered."""
        await self.start_loop(clock_start=clock_start)
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()), expire_time=expire_time)
        await self.executor.next_start()
        await self.expect("UpdateBotSession")
        self.executor.outcomes["lease-1"].set_result(
            LeaseOutcome(make_status(code_pb2.OK, ""), re_pb2.ActionResult())
        )
        return await self.expect("UpdateBotSession")

    @async_test
    async def test_keepalive_taken_from_expire_time(self):
        # The scripted server's clock and the test clock agree: both start at 0.
        await self.finish_lease(expire_time=10)

        self.assertEqual(
            self.executor.result_retry_seconds["lease-1"], 10 + RESULT_RETRY_MARGIN_SECONDS
        )

    @async_test
    async def test_implausible_expire_time_ignored(self):
        # An expire_time in the past of the bot's clock is no keepalive timeout.
        await self.finish_lease(expire_time=0, clock_start=1000.0)

        self.assertEqual(
            self.executor.result_retry_seconds["lease-1"],
            DEFAULT_SERVER_KEEPALIVE_SECONDS + RESULT_RETRY_MARGIN_SECONDS,
        )

    @async_test
    async def test_report_given_up_after_keepalive_and_margin(self):
        events = capture_logs(self)
        request, reply = await self.finish_lease(expire_time=10)
        limit = 10 + RESULT_RETRY_MARGIN_SECONDS
        first_failure = self.clock.seconds()

        # Every report of the result fails until the bot gives the result up.
        reports = 0
        while request.bot_session.leases:
            (lease,) = request.bot_session.leases
            self.assertEqual((lease.id, lease.state), ("lease-1", bots_pb2.COMPLETED))
            reports += 1
            reply.set_result(grpc.StatusCode.UNAVAILABLE)
            await self.advance_to_next_call()
            request, reply = await self.expect("UpdateBotSession")

        # Delays of 1, 2 and 4 s, then 4 s each: the last failure is the first at or past
        # the limit.
        self.assertGreaterEqual(self.clock.seconds() - first_failure, limit)
        self.assertLess(self.clock.seconds() - first_failure, limit + 2 * 4)
        self.assertIsNone(self.loop.lease)
        retried = [event for event in events
                   if event.get("log_format", "").startswith("bot {bot_id}: reporting lease")]
        self.assertEqual(len(retried), reports - 1)
        self.assertTrue(all(event["lease_id"] == "lease-1" for event in retried))
        given_up = [event for event in events if "gave up" in event.get("log_format", "")]
        self.assertEqual(len(given_up), 1)
        self.assertEqual(given_up[0]["lease_id"], "lease-1")
        self.assertEqual(given_up[0]["log_level"].name, "error")

    @async_test
    async def test_not_found_drops_result_at_once(self):
        request, reply = await self.finish_lease()

        reply.set_result(grpc.StatusCode.NOT_FOUND)

        request, _ = await self.expect("CreateBotSession")
        self.assertIsNone(self.loop.lease)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopTests(SessionLoopTestCase):
    async def start_running_lease(self):
        """Open a session whose lease ``lease-1`` runs; return the open long poll's reply."""
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        _, poll = await self.expect("UpdateBotSession")
        return poll

    @async_test
    async def test_running_lease_returned_as_unavailable(self):
        poll = await self.start_running_lease()

        report = await self.stop_loop()

        self.assertEqual(self.executor.cancelled, ["lease-1"])
        self.assertTrue(poll.cancelled(), "the open long poll was not cancelled")
        self.assertEqual(report.name, "sessions/1")
        self.assertEqual(report.bot_session.status, bots_pb2.BOT_TERMINATING)
        (lease,) = report.bot_session.leases
        self.assertEqual((lease.id, lease.state), ("lease-1", bots_pb2.CANCELLED))
        self.assertEqual(lease.status.code, code_pb2.UNAVAILABLE)
        self.assertIn("bot.0 is stopping", lease.status.message)
        self.assertIsNone(self.loop.session_name)
        self.assertIsNone(self.loop.lease)

    @async_test
    async def test_finished_lease_reported_completed(self):
        await self.start_running_lease()
        result = re_pb2.ActionResult(exit_code=0)
        self.executor.outcomes["lease-1"].set_result(
            LeaseOutcome(make_status(code_pb2.OK, ""), result)
        )
        # The result goes out in the next call, which the server leaves unanswered.
        await self.expect("UpdateBotSession")

        report = await self.stop_loop()

        (lease,) = report.bot_session.leases
        self.assertEqual((lease.id, lease.state), ("lease-1", bots_pb2.COMPLETED))
        self.assertEqual(lease.status.code, code_pb2.OK)
        reported = re_pb2.ActionResult()
        self.assertTrue(lease.result.Unpack(reported))
        self.assertEqual(reported, result)
        self.assertEqual(self.executor.cancelled, [])

    @async_test
    async def test_idle_session_reports_terminating(self):
        await self.start_loop()
        await self.open_session()

        report = await self.stop_loop()

        self.assertEqual(report.bot_session.status, bots_pb2.BOT_TERMINATING)
        self.assertEqual(len(report.bot_session.leases), 0)

    @async_test
    async def test_no_session_no_report(self):
        await self.start_loop()
        await self.expect("CreateBotSession")

        report = await self.stop_loop()

        self.assertIsNone(report)

    @async_test
    async def test_unanswered_report_ends_at_deadline(self):
        await self.start_loop(stop_report_timeout=0.2)
        await self.open_session()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        report = await self.stop_loop(answer=False)

        self.assertEqual(report.bot_session.status, bots_pb2.BOT_TERMINATING)
        failed = [event for event in events if event.get("code") == "DEADLINE_EXCEEDED"]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["session"], "sessions/1")


class RecoveryTests(SessionLoopTestCase):
    @async_test
    async def test_unknown_session_replaced(self):
        await self.start_loop()
        _, reply = await self.open_session()
        self.assign(reply, "lease-1", payload_of(re_pb2.Action()))
        await self.executor.next_start()
        _, poll = await self.expect("UpdateBotSession")

        poll.set_result(grpc.StatusCode.NOT_FOUND)

        request, reply = await self.expect("CreateBotSession")
        self.assertEqual(request.bot_session.bot_id, "bot.0")
        self.assertEqual(self.executor.cancelled, ["lease-1"])
        reply.set_result(bots_pb2.BotSession(name="sessions/2"))
        request, _ = await self.expect("UpdateBotSession")
        self.assertEqual(request.name, "sessions/2")
        self.assertEqual(len(request.bot_session.leases), 0)

    @async_test
    async def test_repeated_not_found_backs_off(self):
        events = capture_logs(self)
        await self.start_loop()
        _, reply = await self.expect("CreateBotSession")

        # Another bot with the same id replaces each session at once.
        delays = []
        for _ in range(NOT_FOUND_BEFORE_BACKOFF + 3):
            reply.set_result(bots_pb2.BotSession(name="sessions/1"))
            _, reply = await self.expect("UpdateBotSession")
            reply.set_result(grpc.StatusCode.NOT_FOUND)
            next_call = asyncio.ensure_future(self.bots.next_call())
            await wait_until(lambda: next_call.done() or self.clock.getDelayedCalls())
            if not next_call.done():
                delays.append(await self.advance_to_next_call())
            method, _, reply = await next_call
            self.assertEqual(method, "CreateBotSession")

        self.assertEqual(delays, [1.0, 2.0, 4.0])
        hints = [event for event in events if "same bot id" in event.get("log_format", "")]
        self.assertEqual(len(hints), 3)
        self.assertEqual(hints[0]["bot_id"], "bot.0")
        self.assertEqual(hints[0]["count"], NOT_FOUND_BEFORE_BACKOFF + 1)

        # A successful UpdateBotSession ends the series: the next NOT_FOUND is
        # followed by a new session at once.
        reply.set_result(bots_pb2.BotSession(name="sessions/2"))
        _, reply = await self.expect("UpdateBotSession")
        reply.set_result(bots_pb2.BotSession(name="sessions/2"))
        _, reply = await self.expect("UpdateBotSession")
        reply.set_result(grpc.StatusCode.NOT_FOUND)
        await self.expect("CreateBotSession")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @async_test
    async def test_backoff_doubles_up_to_cap(self):
        await self.start_loop()
        delays = []
        for _ in range(5):
            _, reply = await self.expect("CreateBotSession")
            reply.set_result(grpc.StatusCode.UNAVAILABLE)
            await wait_until(lambda: self.clock.getDelayedCalls())
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])

        self.assertEqual(delays, [1.0, 2.0, 4.0, 4.0, 4.0])

        # A success resets the delay.
        _, reply = await self.expect("CreateBotSession")
        reply.set_result(bots_pb2.BotSession(name="sessions/1"))
        _, reply = await self.expect("UpdateBotSession")
        reply.set_result(grpc.StatusCode.UNAVAILABLE)
        await wait_until(lambda: self.clock.getDelayedCalls())
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime() - self.clock.seconds(), 1.0)

    @async_test
    async def test_unreachable_server_retried(self):
        # Nothing listens on this address: find a free port, then close it.
        probe = grpc.aio.server()
        port = probe.add_insecure_port("127.0.0.1:0")
        await probe.start()
        await probe.stop(None)
        await self.start_loop(address=f"127.0.0.1:{port}")

        await wait_until(lambda: self.clock.getDelayedCalls())
        self.clock.advance(1.0)
        await wait_until(lambda: self.clock.getDelayedCalls()
                         and self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds() == 2.0)
        self.assertIsNone(self.loop.session_name)

    @async_test
    async def test_poll_deadline_is_not_a_failure(self):
        await self.start_loop(poll_timeout=0.2)
        await self.open_session()

        # The scripted server never responds, so the call times out and the loop polls again.
        await self.expect("UpdateBotSession")

        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.loop.session_name, "sessions/1")


class BackoffTests(unittest.TestCase):
    def test_jitter_between_half_and_full(self):
        low = Backoff(initial=2.0, maximum=8.0, random_fraction=lambda: 0.0)
        self.assertEqual([low.next_delay() for _ in range(4)], [1.0, 2.0, 4.0, 4.0])
        high = Backoff(initial=2.0, maximum=8.0, random_fraction=lambda: 1.0)
        self.assertEqual([high.next_delay() for _ in range(4)], [2.0, 4.0, 8.0, 8.0])
        high.reset()
        self.assertEqual(high.next_delay(), 2.0)
