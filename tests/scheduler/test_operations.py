"""Tests of the scheduler's execution and operations API, with bots driven through it."""

from google.rpc import code_pb2
from twisted.internet import defer
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from bgrid.scheduler import StoredResult
from tests.scheduler.helpers import (
    BotClient,
    RestartableScheduler,
    make_action,
    make_result,
    make_scheduler,
    operation_response,
    operation_stage,
    submit,
)

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED


class SubmitTests(unittest.TestCase):
    def test_operation_queued(self):
        scheduler, _ = make_scheduler(self)
        digest, action = make_action("a")

        name = scheduler.submit("main", digest, action)

        operation = scheduler.get_operation(name)
        self.assertTrue(name.startswith("main/operations/"))
        self.assertEqual(operation.name, name)
        self.assertFalse(operation.done)
        metadata = re_pb2.ExecuteOperationMetadata()
        self.assertTrue(operation.metadata.Unpack(metadata))
        self.assertEqual(metadata.stage, QUEUED)
        self.assertEqual(metadata.action_digest.hash, digest.hash)
        self.assertEqual(metadata.action_digest.size_bytes, digest.size_bytes)

    def test_empty_instance_name(self):
        scheduler, _ = make_scheduler(self)

        name = submit(scheduler, "a")

        self.assertTrue(name.startswith("operations/"))

    def test_unknown_operation_not_found(self):
        scheduler, _ = make_scheduler(self)

        error = self.assertRaises(NotFoundError, scheduler.get_operation, "operations/nope")

        self.assertIn("operations/nope", error.message)

    def test_invalid_platform_rejected(self):
        scheduler, _ = make_scheduler(self)
        digest, action = make_action("a")

        self.assertRaises(
            InvalidArgumentError, scheduler.submit, "", digest, action, platform=[("", "x")]
        )
        self.assertEqual(scheduler.stats()["jobs"], 0)

    def test_completed_operation_for_cache_hit(self):
        scheduler, _ = make_scheduler(self)
        digest, _ = make_action("a")
        response = re_pb2.ExecuteResponse(result=make_result(stdout=b"hit"), cached_result=True)

        name = scheduler.add_completed_operation("main", digest, response)

        operation = scheduler.get_operation(name)
        self.assertTrue(name.startswith("main/operations/"))
        self.assertTrue(operation.done)
        self.assertEqual(operation_stage(operation), COMPLETED)
        self.assertEqual(operation_response(operation), response)


class DeduplicationTests(unittest.TestCase):
    def test_identical_actions_share_job(self):
        scheduler, _ = make_scheduler(self)
        first = submit(scheduler, "a")
        second = submit(scheduler, "a")
        self.assertEqual(scheduler.stats()["jobs"], 1)
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.accept())
        self.successResultOf(bot.complete(make_result(stdout=b"shared")))

        self.assertNotEqual(first, second)
        first_response = operation_response(scheduler.get_operation(first))
        second_response = operation_response(scheduler.get_operation(second))
        self.assertEqual(first_response.result.stdout_raw, b"shared")
        self.assertEqual(first_response, second_response)
        self.assertIsNone(bot.lease)

    def test_do_not_cache_runs_separately(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a")
        submit(scheduler, "a", do_not_cache=True)
        digest, action = make_action("a", do_not_cache=True)
        scheduler.submit("", digest, action)
        submit(scheduler, "a")

        self.assertEqual(scheduler.stats()["jobs"], 3)
        self.assertEqual(scheduler.stats()["queued_jobs"], 3)

    def test_instances_do_not_share_jobs(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", instance_name="one")
        submit(scheduler, "a", instance_name="two")

        self.assertEqual(scheduler.stats()["jobs"], 2)

    def test_attached_operation_raises_priority(self):
        scheduler, _ = make_scheduler(self)
        submit(scheduler, "a", priority=5)
        submit(scheduler, "b", priority=0)
        urgent = submit(scheduler, "a", priority=-1)
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.accept())

        self.assertEqual(operation_stage(scheduler.get_operation(urgent)), EXECUTING)

    def test_finished_job_not_shared(self):
        scheduler, _ = make_scheduler(self)
        first = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result()))

        second = submit(scheduler, "a")

        self.assertTrue(scheduler.get_operation(first).done)
        self.assertFalse(scheduler.get_operation(second).done)


class WatchTests(unittest.TestCase):
    def test_stage_sequence_then_none(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)

        queued = self.successResultOf(watch.next())
        self.assertEqual(operation_stage(queued), QUEUED)
        waiting = watch.next()
        self.assertNoResult(waiting)

        bot = BotClient(scheduler, "bot-1")
        self.assertNoResult(waiting)
        self.successResultOf(bot.accept())
        executing = self.successResultOf(waiting)
        self.assertEqual(operation_stage(executing), EXECUTING)
        self.assertFalse(executing.done)

        waiting = watch.next()
        self.assertNoResult(waiting)
        self.successResultOf(bot.complete(make_result(exit_code=3)))
        completed = self.successResultOf(waiting)
        self.assertTrue(completed.done)
        self.assertEqual(operation_stage(completed), COMPLETED)
        self.assertEqual(operation_response(completed).result.exit_code, 3)

        self.assertIsNone(self.successResultOf(watch.next()))

    async def test_change_during_commit_replaces_stage(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)
        await restartable.settle(watch.next())
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle()
        waiting = watch.next()

        # EXECUTING waits for its commit, and the result arrives before it is written.
        bot.accept()
        self.assertNoResult(waiting)
        bot.complete(make_result(exit_code=3))

        completed = await restartable.settle(waiting)
        self.assertTrue(completed.done)
        self.assertEqual(operation_response(completed).result.exit_code, 3)
        self.assertIsNone(await watch.next())

    def test_changes_between_calls_merged(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)
        self.successResultOf(watch.next())
        bot = BotClient(scheduler, "bot-1")

        self.successResultOf(bot.accept())
        self.successResultOf(bot.complete(make_result()))

        self.assertTrue(self.successResultOf(watch.next()).done)
        self.assertIsNone(self.successResultOf(watch.next()))

    def test_watch_of_done_operation(self):
        scheduler, _ = make_scheduler(self)
        digest, _ = make_action("a")
        name = scheduler.add_completed_operation("", digest, re_pb2.ExecuteResponse())
        watch = scheduler.watch_operation(name)

        self.assertTrue(self.successResultOf(watch.next()).done)
        self.assertIsNone(self.successResultOf(watch.next()))

    def test_close_fires_pending_with_none(self):
        scheduler, _ = make_scheduler(self)
        watch = scheduler.watch_operation(submit(scheduler, "a"))
        self.successResultOf(watch.next())
        waiting = watch.next()

        watch.close()

        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.successResultOf(watch.next()))

    def test_cancelled_next_leaves_watch_usable(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)
        self.successResultOf(watch.next())
        waiting = watch.next()

        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        scheduler.cancel_operation(name)

        self.assertTrue(self.successResultOf(watch.next()).done)

    def test_second_next_while_waiting_raises(self):
        scheduler, _ = make_scheduler(self)
        watch = scheduler.watch_operation(submit(scheduler, "a"))
        self.successResultOf(watch.next())
        waiting = watch.next()

        self.assertRaises(RuntimeError, watch.next)
        watch.close()
        self.assertIsNone(self.successResultOf(waiting))

    def test_unknown_operation_not_found(self):
        scheduler, _ = make_scheduler(self)

        self.assertRaises(NotFoundError, scheduler.watch_operation, "operations/nope")


class ResultHandlerTests(unittest.TestCase):
    def test_completion_waits_for_handler(self):
        calls = []

        def handler(instance_name, action_digest, action, do_not_cache, response):
            deferred = defer.Deferred()
            calls.append((instance_name, action_digest, action, do_not_cache, response, deferred))
            return deferred

        scheduler, _ = make_scheduler(self, result_handler=handler)
        digest, action = make_action("a")
        name = scheduler.submit("main", digest, action)
        bot = BotClient(scheduler, "bot-1", parent="main")
        self.successResultOf(bot.accept())
        self.successResultOf(bot.complete(make_result(stdout=b"out")))

        self.assertEqual(len(calls), 1)
        instance_name, handled_digest, handled_action, do_not_cache, response, deferred = calls[0]
        self.assertEqual(instance_name, "main")
        self.assertEqual(handled_digest, digest)
        self.assertEqual(handled_action, action)
        self.assertFalse(do_not_cache)
        self.assertEqual(response.result.stdout_raw, b"out")
        self.assertEqual(response.status.code, code_pb2.OK)
        self.assertFalse(scheduler.get_operation(name).done)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)

        deferred.callback(None)

        self.assertEqual(operation_response(scheduler.get_operation(name)), response)

    def test_handler_replaces_response(self):
        def handler(instance_name, action_digest, action, do_not_cache, response):
            replaced = re_pb2.ExecuteResponse()
            replaced.CopyFrom(response)
            replaced.message = "stored in the action cache"
            return defer.succeed(replaced)

        scheduler, _ = make_scheduler(self, result_handler=handler)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result()))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.message, "stored in the action cache")

    def test_failing_handler_still_completes(self):
        def handler(instance_name, action_digest, action, do_not_cache, response):
            return defer.fail(RuntimeError("action cache unavailable"))

        scheduler, _ = make_scheduler(self, result_handler=handler)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result(stdout=b"kept")))

        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"kept")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_submission_during_handler_shares_result(self):
        pending = defer.Deferred()
        scheduler, _ = make_scheduler(
            self, result_handler=lambda *arguments: pending
        )
        first = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result(stdout=b"once")))

        second = submit(scheduler, "a")
        self.assertEqual(scheduler.stats()["jobs"], 1)
        self.assertIsNone(bot.lease)
        pending.callback(None)

        for name in (first, second):
            response = operation_response(scheduler.get_operation(name))
            self.assertEqual(response.result.stdout_raw, b"once")

    def test_cancel_during_handler_keeps_handler(self):
        pending = defer.Deferred()
        handled = []

        def handler(instance_name, action_digest, action, do_not_cache, response):
            handled.append(response)
            return pending

        scheduler, _ = make_scheduler(self, result_handler=handler)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result()))

        scheduler.cancel_operation(name)
        self.assertEqual(scheduler.stats()["jobs"], 1)
        pending.callback(None)

        self.assertEqual(len(handled), 1)
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.CANCELLED)
        self.assertEqual(scheduler.stats()["jobs"], 0)

    def test_stored_result_completes_at_once(self):
        written = defer.Deferred()

        def handler(instance_name, action_digest, action, do_not_cache, response):
            return defer.succeed(StoredResult(None, written))

        scheduler, _ = make_scheduler(self, result_handler=handler)
        name = submit(scheduler, "a")
        watch = scheduler.watch_operation(name)
        self.successResultOf(watch.next())
        bot = BotClient(scheduler, "bot-1")
        report = bot.complete(make_result(stdout=b"stored"))

        self.assertTrue(scheduler.get_operation(name).done)
        self.assertEqual(scheduler.stats()["jobs"], 0)
        done = watch.next()
        self.assertNoResult(done)
        self.assertNoResult(report)

        written.callback(None)

        response = operation_response(self.successResultOf(done))
        self.assertEqual(response.result.stdout_raw, b"stored")
        self.successResultOf(report)

    def test_failed_stored_result_write_still_completes(self):
        written = defer.Deferred()

        def handler(instance_name, action_digest, action, do_not_cache, response):
            return defer.succeed(StoredResult(None, written))

        scheduler, _ = make_scheduler(self, result_handler=handler)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        report = bot.complete(make_result(stdout=b"kept"))

        written.errback(RuntimeError("action cache unavailable"))

        self.successResultOf(report)
        done = self.successResultOf(scheduler.watch_operation(name).next())
        self.assertEqual(operation_response(done).result.stdout_raw, b"kept")

    def test_handler_gets_do_not_cache(self):
        flags = []

        def handler(instance_name, action_digest, action, do_not_cache, response):
            flags.append(do_not_cache)
            return None

        scheduler, _ = make_scheduler(self, result_handler=handler)
        submit(scheduler, "a", do_not_cache=True)
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result()))

        self.assertEqual(flags, [True])


class WhenDoneTests(unittest.TestCase):
    async def test_fires_before_completion_is_durable(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        done = scheduler.when_done(name)
        watch = scheduler.watch_operation(name)
        await restartable.settle(watch.next())
        waiting = watch.next()
        self.assertNoResult(done)

        scheduler.cancel_operation(name)

        self.assertIsNone(self.successResultOf(done))
        self.assertNoResult(waiting)
        await restartable.settle(waiting)

    def test_done_operation_fires_at_once(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        scheduler.cancel_operation(name)

        self.assertIsNone(self.successResultOf(scheduler.when_done(name)))

    def test_fires_when_scheduler_stops(self):
        scheduler, _ = make_scheduler(self)
        done = scheduler.when_done(submit(scheduler, "a"))

        scheduler.stop()

        self.assertIsNone(self.successResultOf(done))

    def test_unknown_operation_not_found(self):
        scheduler, _ = make_scheduler(self)

        self.assertRaises(NotFoundError, scheduler.when_done, "operations/nope")


class CancelTests(unittest.TestCase):
    def test_cancel_queued_job(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")

        scheduler.cancel_operation(name)

        operation = scheduler.get_operation(name)
        self.assertTrue(operation.done)
        self.assertEqual(operation_response(operation).status.code, code_pb2.CANCELLED)
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)
        bot = BotClient(scheduler, "bot-1")
        self.assertIsNone(bot.lease)

    def test_cancel_running_job_reaches_bot(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        lease_id = bot.lease.id
        poll = bot.update()
        self.assertNoResult(poll)

        scheduler.cancel_operation(name)

        session = self.successResultOf(poll)
        self.assertEqual(session.leases[0].id, lease_id)
        self.assertEqual(session.leases[0].state, bots_pb2.CANCELLED)
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.CANCELLED)

        # The bot stops the action and reports the lease back, so the session becomes idle.
        released = self.successResultOf(bot.update(leases=list(session.leases), deadline=0))
        self.assertEqual(list(released.leases), [])
        self.assertEqual(scheduler.stats()["leases"], 0)

    def test_cancel_one_of_two_shared_operations(self):
        scheduler, _ = make_scheduler(self)
        cancelled = submit(scheduler, "a")
        remaining = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.accept())
        poll = bot.update()

        scheduler.cancel_operation(cancelled)

        self.assertNoResult(poll)
        self.assertEqual(
            operation_response(scheduler.get_operation(cancelled)).status.code,
            code_pb2.CANCELLED,
        )
        self.assertEqual(operation_stage(scheduler.get_operation(remaining)), EXECUTING)

        poll.cancel()
        self.failureResultOf(poll, defer.CancelledError)
        self.successResultOf(bot.complete(make_result(stdout=b"done")))
        remaining_response = operation_response(scheduler.get_operation(remaining))
        self.assertEqual(remaining_response.result.stdout_raw, b"done")
        cancelled_response = operation_response(scheduler.get_operation(cancelled))
        self.assertEqual(cancelled_response.status.code, code_pb2.CANCELLED)

    def test_cancel_done_operation_keeps_result(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result(exit_code=1)))

        scheduler.cancel_operation(name)

        self.assertEqual(operation_response(scheduler.get_operation(name)).result.exit_code, 1)

    def test_cancelled_job_not_shared(self):
        scheduler, _ = make_scheduler(self)
        scheduler.cancel_operation(submit(scheduler, "a"))

        name = submit(scheduler, "a")

        self.assertFalse(scheduler.get_operation(name).done)
        self.assertEqual(scheduler.stats()["queued_jobs"], 1)

    def test_cancel_unknown_not_found(self):
        scheduler, _ = make_scheduler(self)

        self.assertRaises(NotFoundError, scheduler.cancel_operation, "operations/nope")


class DeleteTests(unittest.TestCase):
    def test_delete_done_operation(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")
        scheduler.cancel_operation(name)

        scheduler.delete_operation(name)

        self.assertRaises(NotFoundError, scheduler.get_operation, name)
        self.assertEqual(scheduler.stats()["jobs"], 0)

    def test_delete_running_operation_rejected(self):
        scheduler, _ = make_scheduler(self)
        name = submit(scheduler, "a")

        error = self.assertRaises(FailedPreconditionError, scheduler.delete_operation, name)

        self.assertIn(name, error.message)
        self.assertFalse(scheduler.get_operation(name).done)

    def test_delete_unknown_not_found(self):
        scheduler, _ = make_scheduler(self)

        self.assertRaises(NotFoundError, scheduler.delete_operation, "operations/nope")


class ListTests(unittest.TestCase):
    def test_pages_in_creation_order(self):
        scheduler, _ = make_scheduler(self)
        names = [submit(scheduler, str(i), instance_name="main") for i in range(7)]
        submit(scheduler, "other", instance_name="other")

        listed = []
        token = ""
        pages = 0
        while True:
            operations, token = scheduler.list_operations("main", page_size=3, page_token=token)
            listed.extend(operation.name for operation in operations)
            pages += 1
            if not token:
                break

        self.assertEqual(listed, names)
        self.assertEqual(pages, 3)

    def test_token_survives_deletion(self):
        scheduler, _ = make_scheduler(self)
        names = [submit(scheduler, str(i)) for i in range(4)]
        first_page, token = scheduler.list_operations("", page_size=2)
        scheduler.cancel_operation(names[1])
        scheduler.delete_operation(names[1])

        second_page, token = scheduler.list_operations("", page_size=2, page_token=token)

        self.assertEqual([operation.name for operation in first_page], names[:2])
        self.assertEqual([operation.name for operation in second_page], names[2:])
        self.assertEqual(token, "")

    def test_default_page_size(self):
        scheduler, _ = make_scheduler(self)
        for i in range(150):
            submit(scheduler, str(i))

        operations, token = scheduler.list_operations("")

        self.assertEqual(len(operations), 100)
        self.assertNotEqual(token, "")

    def test_invalid_token_rejected(self):
        scheduler, _ = make_scheduler(self)
        for token in ["garbage!", "bm90LWEtdG9rZW4=", "YmdyaWQtb3BlcmF0aW9ucy1hZnRlcjp4"]:
            with self.subTest(token=token):
                error = self.assertRaises(
                    InvalidArgumentError, scheduler.list_operations, "", 10, token
                )
                self.assertIn(repr(token), error.message)

    def test_negative_page_size_rejected(self):
        scheduler, _ = make_scheduler(self)

        self.assertRaises(InvalidArgumentError, scheduler.list_operations, "", -1)


class StopTests(unittest.TestCase):
    def test_stop_fails_watches_and_returns_polls(self):
        scheduler, clock = make_scheduler(self)
        watch = scheduler.watch_operation(submit(scheduler, "a", platform=[("gpu", "a100")]))
        self.successResultOf(watch.next())
        waiting = watch.next()
        bot = BotClient(scheduler, "bot-1")
        poll = bot.update()

        scheduler.stop()

        self.failureResultOf(waiting, UnavailableError)
        self.assertEqual(list(self.successResultOf(poll).leases), [])
        self.assertEqual(clock.getDelayedCalls(), [])


class RetentionTests(unittest.TestCase):
    def test_done_operation_forgotten_after_retention(self):
        scheduler, clock = make_scheduler(
            self, operation_retention=600, bot_keepalive_timeout=10_000
        )
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        clock.advance(1000)
        self.successResultOf(bot.complete(make_result()))

        clock.advance(599)
        self.assertTrue(scheduler.get_operation(name).done)
        self.assertEqual(scheduler.stats()["operations"], 1)

        clock.advance(1)
        self.assertRaises(NotFoundError, scheduler.get_operation, name)
        self.assertEqual(scheduler.stats()["operations"], 0)
        self.assertEqual(scheduler.list_operations(""), ([], ""))

    def test_running_operation_kept(self):
        scheduler, clock = make_scheduler(
            self, operation_retention=600, bot_keepalive_timeout=10_000
        )
        name = submit(scheduler, "a")

        clock.advance(5000)

        self.assertFalse(scheduler.get_operation(name).done)

    def test_done_job_forgotten_operations_kept(self):
        scheduler, clock = make_scheduler(self, operation_retention=600)
        first = submit(scheduler, "a")
        second = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        self.successResultOf(bot.complete(make_result(stdout=b"kept")))

        self.assertEqual(scheduler.stats()["jobs"], 0)
        scheduler.delete_operation(first)
        response = operation_response(scheduler.get_operation(second))
        self.assertEqual(response.result.stdout_raw, b"kept")

        clock.advance(600)
        self.assertRaises(NotFoundError, scheduler.get_operation, second)
        self.assertEqual(scheduler.stats()["operations"], 0)
