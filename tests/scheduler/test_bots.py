"""Tests of the scheduler's Bots API: sessions, leases, long polls and keepalive."""

import random

from google.rpc import code_pb2, status_pb2
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError, NotFoundError
from tests.scheduler.helpers import (
    BotClient,
    as_leased,
    capture_logs,
    make_action,
    make_bot_session,
    make_result,
    make_scheduler,
    operation_response,
    operation_stage,
    submit,
)

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING


def logged_with(events, **fields):
    """Return the log events whose fields include all of ``fields``."""
    return [
        event for event in events
        if all(event.get(key) == value for key, value in fields.items())
    ]


class CreateBotSessionTests(unittest.TestCase):
    def test_session_fields(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=30)
        clock.advance(100)
        request = make_bot_session("bot-1", [("os", "linux")])

        session = scheduler.create_bot_session("main", request)

        self.assertTrue(session.name.startswith("main/botSessions/"))
        self.assertEqual(session.bot_id, "bot-1")
        self.assertEqual(session.worker, request.worker)
        self.assertEqual(session.expire_time.ToSeconds(), 130)
        self.assertEqual(list(session.leases), [])

    def test_empty_parent(self):
        scheduler, _ = make_scheduler(self)

        session = scheduler.create_bot_session("", make_bot_session("bot-1"))

        self.assertTrue(session.name.startswith("botSessions/"))

    def test_invalid_requests_rejected(self):
        scheduler, _ = make_scheduler(self)
        with_name = make_bot_session("bot-1")
        with_name.name = "botSessions/mine"
        with_lease = make_bot_session("bot-1")
        with_lease.leases.add(id="lease-7", state=bots_pb2.ACTIVE)
        bad_property = make_bot_session("bot-1", [("", "linux")])
        cases = [
            (make_bot_session(""), "bot_id"),
            (with_name, "botSessions/mine"),
            (with_lease, "lease-7"),
            (bad_property, "'linux'"),
        ]
        for request, expected in cases:
            with self.subTest(expected=expected):
                error = self.assertRaises(
                    InvalidArgumentError, scheduler.create_bot_session, "", request
                )
                self.assertIn(expected, error.message)
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)

    def test_queued_job_leased_at_creation(self):
        scheduler, _ = make_scheduler(self)
        digest, action = make_action("a")
        name = scheduler.submit("", digest, action)

        bot = BotClient(scheduler, "bot-1")

        self.assertEqual(bot.lease.state, bots_pb2.PENDING)
        self.assertEqual(bot.leased_action(), as_leased(action))
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)

    def test_same_bot_id_replaces_session(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        old = BotClient(scheduler, "bot-1")
        self.successResultOf(old.accept())
        old_lease_id = old.lease.id
        old_poll = old.update()

        new = BotClient(scheduler, "bot-1")

        self.failureResultOf(old_poll, NotFoundError)
        self.assertEqual(new.lease.state, bots_pb2.PENDING)
        self.assertNotEqual(new.lease.id, old_lease_id)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        self.assertEqual(scheduler.stats()["bot_sessions"], 1)
        self.failureResultOf(old.update(wait=False), NotFoundError)


class UpdateBotSessionTests(unittest.TestCase):
    def test_unknown_session_not_found(self):
        scheduler, _ = make_scheduler(self)
        request = make_bot_session("bot-1")

        failure = self.failureResultOf(
            scheduler.update_bot_session("botSessions/nope", request), NotFoundError
        )

        self.assertIn("botSessions/nope", failure.value.message)

    def test_other_bot_id_rejected(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1")
        request = make_bot_session("bot-2")

        failure = self.failureResultOf(
            scheduler.update_bot_session(bot.name, request), InvalidArgumentError
        )

        self.assertIn("bot-2", failure.value.message)

    def test_changed_worker_updates_properties(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", platform=[("gpu", "a100")])
        bot = BotClient(scheduler, "bot-1")
        self.assertIsNone(bot.lease)
        request = make_bot_session("bot-1", [("gpu", "a100")])

        session = self.successResultOf(scheduler.update_bot_session(bot.name, request))

        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.assertEqual(session.worker.properties[0].key, "gpu")

    def test_acknowledge_starts_execution(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        session = self.successResultOf(bot.accept())

        self.assertEqual(session.leases[0].state, bots_pb2.ACTIVE)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)

    def test_complete_reports_result(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())

        session = self.successResultOf(bot.complete(make_result(exit_code=0, stdout=b"hi")))

        self.assertEqual(list(session.leases), [])
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertEqual(response.result.stdout_raw, b"hi")
        self.assertEqual(response.result.execution_metadata.worker, "bot-1")
        self.assertFalse(response.cached_result)

    def test_complete_without_acknowledge(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.complete(make_result(exit_code=2)))

        self.assertEqual(operation_response(scheduler.get_operation(name)).result.exit_code, 2)

    def test_lease_status_becomes_response_status(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.complete(code=code_pb2.FAILED_PRECONDITION))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.FAILED_PRECONDITION)
        self.assertFalse(response.HasField("result"))

    def test_result_of_wrong_type_is_internal(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.complete(result=re_pb2.Digest(hash="x")))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.INTERNAL)
        self.assertIn("build.bazel.remote.execution.v2.Digest", response.status.message)

    def test_corrupt_result_is_internal(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        corrupt = bots_pb2.Lease(id=bot.lease.id, state=bots_pb2.COMPLETED)
        corrupt.result.type_url = "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult"
        corrupt.result.value = b"\xff\xff\xff"

        self.successResultOf(bot.update(leases=[corrupt], wait=False))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.INTERNAL)
        self.assertIn("not a valid ActionResult", response.status.message)

    def test_execution_metadata_filled(self):
        scheduler, clock = make_scheduler(self)
        clock.advance(50)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.complete(make_result()))

        metadata = operation_response(scheduler.get_operation(name)).result.execution_metadata
        self.assertEqual(metadata.worker, "bot-1")
        self.assertEqual(metadata.queued_timestamp.ToSeconds(), 50)

    def test_ok_without_result_is_internal(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.complete(result=None))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.INTERNAL)

    def test_next_job_leased_on_completion(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a")
        second = submit(scheduler, "b")
        bot = BotClient(scheduler, "bot-1")
        first_lease = bot.lease.id

        session = self.successResultOf(bot.complete(make_result(), wait=True))

        self.assertEqual(len(session.leases), 1)
        self.assertNotEqual(session.leases[0].id, first_lease)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.successResultOf(bot.complete(make_result()))
        self.assertTrue(scheduler.get_operation(second).done)


class LongPollTests(unittest.TestCase):
    def test_idle_bot_gets_lease_on_submit(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1")
        poll = bot.update()
        self.assertNoResult(poll)
        self.assertEqual(scheduler.stats()["idle_bots"], 1)

        digest, action = make_action("a")
        name = scheduler.submit("", digest, action)

        session = self.successResultOf(poll)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.assertEqual(bot.leased_action(), as_leased(action))
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        self.assertEqual(scheduler.stats()["idle_bots"], 0)
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)

    def test_returns_at_deadline_without_lease(self):
        scheduler, clock = make_scheduler(self, max_long_poll=20)
        bot = BotClient(scheduler, "bot-1")

        poll = bot.update(deadline=clock.seconds() + 5)
        clock.advance(4.9)
        self.assertNoResult(poll)
        clock.advance(0.1)

        session = self.successResultOf(poll)
        self.assertEqual(list(session.leases), [])
        self.assertEqual(scheduler.stats()["idle_bots"], 0)

    def test_wait_capped_by_max_long_poll(self):
        scheduler, clock = make_scheduler(self, max_long_poll=20)
        bot = BotClient(scheduler, "bot-1")

        for deadline in [None, clock.seconds() + 3600]:
            with self.subTest(deadline=deadline):
                poll = bot.update(deadline=deadline)
                clock.advance(19.9)
                self.assertNoResult(poll)
                clock.advance(0.1)
                self.successResultOf(poll)

    def test_longest_waiting_bot_gets_job(self):
        scheduler, _ = make_scheduler(self)
        bots = [BotClient(scheduler, f"bot-{i}") for i in range(3)]
        polls = [bot.update() for bot in bots]

        submit(scheduler, "a")

        self.assertEqual(len(self.successResultOf(polls[0]).leases), 1)
        self.assertNoResult(polls[1])
        self.assertNoResult(polls[2])
        submit(scheduler, "b")
        self.assertEqual(len(self.successResultOf(polls[1]).leases), 1)
        self.assertNoResult(polls[2])
        polls[2].cancel()
        self.failureResultOf(polls[2], defer.CancelledError)

    def test_new_update_ends_previous_poll(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1")
        first = bot.update()

        second = bot.update()

        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(scheduler.stats()["idle_bots"], 1)
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)

    def test_cancelled_poll_leaves_idle_bots(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1")
        poll = bot.update()

        poll.cancel()
        self.failureResultOf(poll, defer.CancelledError)
        submit(scheduler, "a")

        self.assertEqual(scheduler.stats()["idle_bots"], 0)
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)
        session = self.successResultOf(bot.update())
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)

    def test_missed_pending_lease_sent_again(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        lease_id = bot.lease.id

        session = self.successResultOf(bot.update(leases=[]))

        self.assertEqual(session.leases[0].id, lease_id)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)

    def test_terminating_bot_session_closed_at_once(self):
        scheduler, _ = make_scheduler(self)
        bot = BotClient(scheduler, "bot-1")
        request = bots_pb2.BotSession(
            name=bot.name, bot_id="bot-1", status=bots_pb2.BOT_TERMINATING
        )

        session = self.successResultOf(scheduler.update_bot_session(bot.name, request))
        submit(scheduler, "a")

        self.assertEqual(session.status, bots_pb2.BOT_TERMINATING)
        self.assertEqual(list(session.leases), [])
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)
        self.failureResultOf(bot.update(wait=False), NotFoundError)


class PriorityTests(unittest.TestCase):
    def test_priority_order_and_fifo_ties(self):
        scheduler, _ = make_scheduler(self)
        submitted = [
            ("normal-1", 0),
            ("low", 10),
            ("urgent", -10),
            ("normal-2", 0),
            ("normal-3", 0),
        ]
        names = {label: submit(scheduler, label, priority=priority) for label, priority in submitted}
        bot = BotClient(scheduler, "bot-1")

        order = []
        while bot.lease is not None:
            leased = bot.leased_action()
            label = next(
                label for label in names if as_leased(make_action(label)[1]) == leased
            )
            order.append(label)
            self.successResultOf(bot.complete(make_result()))

        self.assertEqual(order, ["urgent", "normal-1", "normal-2", "normal-3", "low"])


class PlatformMatchingTests(unittest.TestCase):
    def test_bot_lacking_property_never_leased(self):
        scheduler, clock = make_scheduler(self)
        digest, action = make_action("gpu")
        name = scheduler.submit("", digest, action, platform=[("gpu", "a100")])
        plain = BotClient(scheduler, "plain", [("os", "linux")])
        self.assertIsNone(plain.lease)

        poll = plain.update()
        clock.advance(20)
        self.assertEqual(list(self.successResultOf(poll).leases), [])

        gpu = BotClient(scheduler, "gpu", [("os", "linux")], device_properties=[("gpu", "a100")])
        self.assertEqual(gpu.leased_action(), as_leased(action))
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)

    def test_waiting_bot_lacking_property_skipped(self):
        scheduler, _ = make_scheduler(self)
        plain = BotClient(scheduler, "plain")
        gpu = BotClient(scheduler, "gpu", [("gpu", "a100")])
        plain_poll = plain.update()
        gpu_poll = gpu.update()

        submit(scheduler, "a", platform=[("gpu", "a100")])

        self.assertNoResult(plain_poll)
        self.assertEqual(len(self.successResultOf(gpu_poll).leases), 1)
        plain_poll.cancel()
        self.failureResultOf(plain_poll, defer.CancelledError)

    def test_multi_valued_requirement(self):
        scheduler, _ = make_scheduler(self)
        requirements = [("isa", "avx2"), ("isa", "sse4")]
        submit(scheduler, "a", platform=requirements)

        partial = BotClient(scheduler, "partial", [("isa", "avx2")])
        full = BotClient(scheduler, "full", [("isa", "sse4"), ("isa", "avx2"), ("os", "linux")])

        self.assertIsNone(partial.lease)
        self.assertIsNotNone(full.lease)

    def test_instance_name_must_match(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", instance_name="one")

        other = BotClient(scheduler, "other", parent="two")
        same = BotClient(scheduler, "same", parent="one")

        self.assertIsNone(other.lease)
        self.assertIsNotNone(same.lease)


class CancelledLeaseTests(unittest.TestCase):
    def test_result_of_cancelled_lease_ignored(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        scheduler.cancel_operation(name)

        session = self.successResultOf(bot.complete(make_result(stdout=b"late")))

        self.assertEqual(list(session.leases), [])
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.CANCELLED)
        self.assertEqual(scheduler.stats()["leases"], 0)

    def test_cancelled_lease_kept_until_released(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        scheduler.cancel_operation(name)
        active = bots_pb2.Lease(id=bot.lease.id, state=bots_pb2.ACTIVE)

        session = self.successResultOf(bot.update(leases=[active]))
        self.assertEqual(session.leases[0].state, bots_pb2.CANCELLED)

        # The cancellation was sent, so while the bot stops the action it long-polls.
        poll = bot.update(leases=[active])
        self.assertNoResult(poll)
        self.assertEqual(scheduler.stats()["idle_bots"], 0)
        poll.cancel()
        self.failureResultOf(poll, defer.CancelledError)

        session = self.successResultOf(bot.update(leases=[], wait=False))
        self.assertEqual(list(session.leases), [])


class LostLeaseTests(unittest.TestCase):
    def test_keepalive_expiry_requeues_to_other_bot(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60, max_long_poll=100)
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)
        self.successResultOf(watch.next())
        lost = BotClient(scheduler, "lost")
        self.successResultOf(lost.accept())
        self.assertEqual(operation_stage(self.successResultOf(watch.next())), EXECUTING)
        other = BotClient(scheduler, "other")
        other_poll = other.update()

        clock.advance(59)
        self.assertNoResult(other_poll)
        clock.advance(1)

        session = self.successResultOf(other_poll)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.assertEqual(operation_stage(self.successResultOf(watch.next())), QUEUED)
        self.failureResultOf(lost.update(wait=False), NotFoundError)
        self.successResultOf(other.complete(make_result(stdout=b"second try")))
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"second try")

    def test_keepalive_paused_during_poll(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=10, max_long_poll=20)
        bot = BotClient(scheduler, "bot-1")

        poll = bot.update()
        clock.advance(20)
        self.successResultOf(poll)
        clock.advance(9)
        self.successResultOf(bot.update(wait=False))
        clock.advance(10)

        self.failureResultOf(bot.update(wait=False), NotFoundError)
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)

    def test_requeued_job_keeps_place(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60)
        first_digest, first_action = make_action("first")
        scheduler.submit("", first_digest, first_action)
        lost = BotClient(scheduler, "lost")
        self.successResultOf(lost.accept())
        submit(scheduler, "second")

        clock.advance(60)
        other = BotClient(scheduler, "other")

        self.assertEqual(other.leased_action(), as_leased(first_action))

    def test_retries_exhausted_fails_job(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60, max_job_retries=2)
        name = submit(scheduler, "a")

        for attempt in range(3):
            bot = BotClient(scheduler, f"bot-{attempt}")
            self.assertIsNotNone(bot.lease)
            self.successResultOf(bot.accept())
            clock.advance(60)

        operation = scheduler.get_operation(name)
        self.assertTrue(operation.done)
        status = operation_response(operation).status
        self.assertEqual(status.code, code_pb2.UNAVAILABLE)
        self.assertIn("3 times", status.message)
        self.assertIn("went away", status.message)
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)
        self.assertIsNone(BotClient(scheduler, "late").lease)

    def test_omitted_active_lease_requeued(self):
        scheduler, _ = make_scheduler(self)
        events = capture_logs(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        lease_id = bot.lease.id

        session = self.successResultOf(bot.update(leases=[]))

        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.assertNotEqual(session.leases[0].id, lease_id)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        self.assertEqual(len(logged_with(events, lease_id=lease_id, retry=1)), 1)

    def test_bot_cancelled_lease_requeued(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        lease_id = bot.lease.id

        session = self.successResultOf(
            bot.update(leases=[bots_pb2.Lease(id=lease_id, state=bots_pb2.CANCELLED)])
        )

        self.assertNotEqual(session.leases[0].id, lease_id)
        self.assertEqual(scheduler.stats()["leases"], 1)


class TerminatingBotTests(unittest.TestCase):
    def terminate(self, bot, leases):
        """Send the bot's last UpdateBotSession, with BOT_TERMINATING; return the session."""
        request = bots_pb2.BotSession(
            name=bot.name, bot_id=bot.bot_id, status=bots_pb2.BOT_TERMINATING, leases=leases
        )
        return self.successResultOf(bot.scheduler.update_bot_session(bot.name, request))

    def returned_lease(self, lease_id):
        return bots_pb2.Lease(
            id=lease_id,
            state=bots_pb2.CANCELLED,
            status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message="bot stopping"),
        )

    def test_returned_lease_requeued_without_retry(self):
        scheduler, _ = make_scheduler(self, max_job_retries=0)
        events = capture_logs(self)
        name = submit(scheduler, "a")
        stopping = BotClient(scheduler, "stopping")
        self.successResultOf(stopping.accept())
        lease_id = stopping.lease.id

        session = self.terminate(stopping, [self.returned_lease(lease_id)])

        self.assertEqual(list(session.leases), [])
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        self.assertFalse(scheduler.get_operation(name).done)
        self.assertEqual(len(logged_with(events, lease_id=lease_id, retry=1)), 0)
        other = BotClient(scheduler, "other")
        self.assertIsNotNone(other.lease)
        self.successResultOf(other.complete(make_result(stdout=b"second bot")))
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"second bot")

    def test_returned_lease_goes_to_waiting_bot_at_once(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        stopping = BotClient(scheduler, "stopping")
        self.successResultOf(stopping.accept())
        waiting = BotClient(scheduler, "waiting")
        poll = waiting.update()

        self.terminate(stopping, [self.returned_lease(stopping.lease.id)])

        session = self.successResultOf(poll)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)
        self.successResultOf(waiting.accept())
        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)

    def test_cancelled_lease_of_running_bot_counts_retry(self):
        scheduler, _ = make_scheduler(self, max_job_retries=0)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())

        self.successResultOf(bot.update(leases=[self.returned_lease(bot.lease.id)], wait=False))

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.UNAVAILABLE)

    def test_completed_lease_reported_before_close(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        finished = bots_pb2.Lease(
            id=bot.lease.id, state=bots_pb2.COMPLETED, status=status_pb2.Status(code=code_pb2.OK)
        )
        finished.result.Pack(make_result(stdout=b"done before stopping"))

        session = self.terminate(bot, [finished])

        self.assertEqual(list(session.leases), [])
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"done before stopping")
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)

    def test_unreported_pending_lease_requeued_without_retry(self):
        scheduler, _ = make_scheduler(self, max_job_retries=0)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.assertEqual(bot.lease.state, bots_pb2.PENDING)

        self.terminate(bot, [])

        self.assertFalse(scheduler.get_operation(name).done)
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)
        self.assertEqual(scheduler.stats()["leases"], 0)

    def test_unreported_active_lease_counts_retry(self):
        scheduler, _ = make_scheduler(self, max_job_retries=0)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())

        self.terminate(bot, [])

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.UNAVAILABLE)
        self.assertEqual(scheduler.stats()["bot_sessions"], 0)

    def test_terminating_session_logged_as_info(self):
        scheduler, _ = make_scheduler(self)
        events = capture_logs(self)
        bot = BotClient(scheduler, "bot-1")

        self.terminate(bot, [])

        closed = logged_with(events, session_name=bot.name, bot_id="bot-1")
        closed = [event for event in closed if "terminating" in event.get("reason", "")]
        self.assertEqual(len(closed), 1)
        self.assertEqual(closed[0]["log_level"], LogLevel.info)


class IgnoredLeaseTests(unittest.TestCase):
    def test_unknown_lease_ignored_and_logged(self):
        scheduler, _ = make_scheduler(self)
        events = capture_logs(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())

        unknown = bots_pb2.Lease(id="no-such-lease", state=bots_pb2.COMPLETED)
        unknown.result.Pack(make_result())
        current = bots_pb2.Lease(id=bot.lease.id, state=bots_pb2.ACTIVE)
        poll = bot.update(leases=[unknown, current], deadline=-1)

        self.successResultOf(poll)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)
        matching = logged_with(events, lease_id="no-such-lease", bot_id="bot-1")
        self.assertEqual(len(matching), 1)
        self.assertEqual(matching[0]["session_name"], bot.name)

        # The same lease again is ignored without another log line.
        self.successResultOf(bot.update(leases=[unknown, current], deadline=-1))
        self.assertEqual(len(logged_with(events, lease_id="no-such-lease")), 1)

    def test_stale_lease_after_requeue_ignored(self):
        scheduler, clock = make_scheduler(self, bot_keepalive_timeout=60)
        name = submit(scheduler, "a")
        slow = BotClient(scheduler, "slow")
        self.successResultOf(slow.accept())
        stale_lease_id = slow.lease.id
        clock.advance(60)
        fresh = BotClient(scheduler, "fresh")
        self.successResultOf(fresh.accept())

        # The slow bot comes back under a new session and reports its old lease.
        slow = BotClient(scheduler, "slow")
        self.successResultOf(
            slow.complete(make_result(stdout=b"stale"), lease_id=stale_lease_id)
        )

        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)
        self.successResultOf(fresh.complete(make_result(stdout=b"fresh")))
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"fresh")

    def test_lease_of_other_session_ignored(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        owner = BotClient(scheduler, "owner")
        intruder = BotClient(scheduler, "intruder")

        self.successResultOf(intruder.complete(make_result(), lease_id=owner.lease.id))

        self.assertFalse(scheduler.get_operation(name).done)
        self.assertEqual(owner.lease.state, bots_pb2.PENDING)


class ManyJobsTests(unittest.TestCase):
    def test_ten_thousand_queued_jobs(self):
        # The full 10,000-job drain runs against JobQueue in test_queue. Here bots take the
        # first jobs through the Bots API, which logs several events per job.
        scheduler, _ = make_scheduler(self)
        generator = random.Random(11)
        platforms = {"linux": [("os", "linux")], "windows": [("os", "windows")], "any": []}
        expected = {kind: [] for kind in platforms}
        for index in range(10_000):
            kind = generator.choice(sorted(platforms))
            priority = generator.randrange(-2, 3)
            digest, action = make_action(str(index))
            scheduler.submit("", digest, action, priority=priority, platform=platforms[kind])
            expected[kind].append((priority, index, digest))
        self.assertEqual(scheduler.stats()["queued_jobs"], 10_000)

        windows = BotClient(scheduler, "windows", [("os", "windows")])
        windows_order = self._drain(windows, 300)
        linux = BotClient(scheduler, "linux", [("os", "linux")])
        linux_order = self._drain(linux, 300)

        windows_expected = sorted(expected["windows"] + expected["any"])[:301]
        self.assertEqual(windows_order, [digest for _, _, digest in windows_expected[:300]])
        # The windows bot also holds a lease on the 301st job.
        leased_to_windows = {digest for _, _, digest in windows_expected}
        linux_candidates = [
            entry for entry in expected["linux"] + expected["any"]
            if entry[2] not in leased_to_windows
        ]
        linux_expected = sorted(linux_candidates)[:300]
        self.assertEqual(linux_order, [digest for _, _, digest in linux_expected])
        # Each bot holds the lease of the job after the last one it completed.
        self.assertEqual(scheduler.stats()["queued_jobs"], 10_000 - 600 - 2)

    def _drain(self, bot, count):
        """Run ``count`` jobs on ``bot`` and return their action digests in order."""
        digests = []
        for _ in range(count):
            # The submitted actions have no timeout, and the lease adds the maximum.
            submitted = bot.leased_action()
            submitted.ClearField("timeout")
            digests.append(Digest.of(submitted.SerializeToString()))
            self.successResultOf(bot.complete(make_result()))
        return digests
