"""Tests of the scheduler's durable state: crashes, restarts and recovery over real LMDB.

A crash drops the Scheduler object without stopping it and closes the LMDB environment,
and a restart opens a new environment and scheduler on the same directory. Time moves
only through each run's ``task.Clock``, and the journal's writes happen when a test
advances it by 0.
"""

import json

from google.rpc import code_pb2
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.errors import NotFoundError, ResourceExhaustedError
from bgrid.scheduler import Scheduler
from bgrid.scheduler.codec import RecordFormatError, decode_lease, encode_job, encode_lease
from bgrid.scheduler.job import COMPLETED, Job
from bgrid.scheduler.journal import FIRST_RETRY_DELAY, Journal
from bgrid.scheduler.lease import Lease
from bgrid.scheduler.store import (
    JOBS,
    META,
    META_NAME,
    OPERATIONS,
    ISchedulerStore,
    LmdbSchedulerStore,
)
from bgrid.storage.environment import LmdbEnvironment
from tests.scheduler.helpers import (
    TEST_MAP_SIZE,
    BotClient,
    RestartableScheduler,
    as_leased,
    capture_logs,
    make_action,
    make_result,
    operation_response,
    operation_stage,
    submit,
)
from tests.util import make_temp_dir

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING


class WrappedStore:
    """An ``LmdbSchedulerStore`` that counts its commits and fails them while ``failing``."""

    def __init__(self, store):
        self.store = store
        self.commit_sizes = []
        # The Deferred of each commit, which fires after the journal has seen its outcome.
        self.commits = []
        self.failing = False

    def load(self):
        return self.store.load()

    def commit(self, changes):
        if self.failing:
            return defer.fail(ResourceExhaustedError("storage is full (test)"))
        self.commit_sizes.append(len(changes))
        committing = self.store.commit(changes)
        self.commits.append(committing)
        return committing


async def start_wrapped_scheduler(test_case, **options):
    """Return a recovered Scheduler over a ``WrappedStore``, its clock and the store."""
    environment = LmdbEnvironment(
        make_temp_dir(test_case), LmdbSchedulerStore.DATABASE_NAMES, map_size=TEST_MAP_SIZE
    )
    environment.start()
    test_case.addCleanup(environment.stop)
    store = WrappedStore(LmdbSchedulerStore(environment))
    clock = task.Clock()
    scheduler = Scheduler(clock, store=store, **options)
    await scheduler.recover()
    test_case.addCleanup(scheduler.stop)
    return scheduler, clock, store


async def start_journal(test_case):
    """Return a Journal over a ``WrappedStore``, its clock and the store.

    Every record it writes is encoded as an empty JSON object.
    """
    environment = LmdbEnvironment(
        make_temp_dir(test_case), LmdbSchedulerStore.DATABASE_NAMES, map_size=TEST_MAP_SIZE
    )
    environment.start()
    test_case.addCleanup(environment.stop)
    store = WrappedStore(LmdbSchedulerStore(environment))
    clock = task.Clock()
    journal = Journal(store, clock, lambda kind, name: b"{}")
    test_case.addCleanup(journal.stop)
    return journal, clock, store


def label_of(action, labels):
    """Return the label among ``labels`` whose ``make_action`` Action is ``action``."""
    return next(label for label in labels if as_leased(make_action(label)[1]) == action)


class QueueRecoveryTests(unittest.TestCase):
    async def test_queued_jobs_keep_priority_order(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        submitted = [("normal-1", 0), ("low", 10), ("urgent", -10), ("normal-2", 0)]
        names = [submit(scheduler, label, priority=priority) for label, priority in submitted]
        await restartable.settle()

        scheduler = await restartable.restart()

        self.assertEqual(scheduler.stats()["queued_jobs"], 4)
        for name in names:
            self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        # Submitted after the restart with the same priority, so it runs after normal-2.
        submit(scheduler, "normal-3", priority=0)
        bot = BotClient(scheduler, "bot-1")
        labels = [label for label, _ in submitted] + ["normal-3"]
        order = []
        while bot.lease is not None:
            order.append(label_of(bot.leased_action(), labels))
            await restartable.settle(bot.complete(make_result()))
        self.assertEqual(order, ["urgent", "normal-1", "normal-2", "normal-3", "low"])

    async def test_operations_listed_in_old_order(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        names = [submit(scheduler, str(index), instance_name="main") for index in range(3)]
        await restartable.settle()

        scheduler = await restartable.restart()
        names.append(submit(scheduler, "after restart", instance_name="main"))

        operations, token = scheduler.list_operations("main")
        self.assertEqual([operation.name for operation in operations], names)
        self.assertEqual(token, "")

    async def test_dedup_after_recovery(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        first = submit(scheduler, "a")
        await restartable.settle()

        scheduler = await restartable.restart()
        second = submit(scheduler, "a")

        self.assertEqual(scheduler.stats()["jobs"], 1)
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.complete(make_result(stdout=b"shared")))
        for name in (first, second):
            response = operation_response(scheduler.get_operation(name))
            self.assertEqual(response.result.stdout_raw, b"shared")

    async def test_clean_stop_writes_pending_changes(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")

        await scheduler.stop()
        scheduler = await restartable.restart()

        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)


class LeaseRecoveryTests(unittest.TestCase):
    async def test_running_lease_survives(self):
        restartable = RestartableScheduler(self, bot_keepalive_timeout=60)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())
        lease_id = bot.lease.id

        scheduler = await restartable.restart()
        bot.scheduler = scheduler

        self.assertEqual(operation_stage(scheduler.get_operation(name)), EXECUTING)
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)
        restartable.clock.advance(59)
        session = await restartable.settle(bot.update(wait=False))
        self.assertEqual(session.leases[0].id, lease_id)
        self.assertEqual(session.leases[0].state, bots_pb2.ACTIVE)

        restartable.clock.advance(59)
        session = await restartable.settle(bot.complete(make_result(stdout=b"after restart")))

        self.assertEqual(list(session.leases), [])
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"after restart")
        self.assertEqual(response.result.execution_metadata.worker, "bot-1")

    async def test_pending_lease_sent_again_after_restart(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle()
        lease_id = bot.lease.id

        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        session = await restartable.settle(bot.update(leases=[]))

        self.assertEqual(session.leases[0].id, lease_id)
        self.assertEqual(session.leases[0].state, bots_pb2.PENDING)

    async def test_absent_bot_requeued_after_keepalive(self):
        restartable = RestartableScheduler(self, bot_keepalive_timeout=60)
        scheduler = await restartable.start()
        digest, action = make_action("a")
        name = scheduler.submit("", digest, action)
        lost = BotClient(scheduler, "lost")
        await restartable.settle(lost.accept())

        scheduler = await restartable.restart()
        lost.scheduler = scheduler
        restartable.clock.advance(59)
        self.assertEqual(scheduler.stats()["queued_jobs"], 0)
        restartable.clock.advance(1)

        self.assertEqual(scheduler.stats()["bot_sessions"], 0)
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        self.failureResultOf(lost.update(wait=False), NotFoundError)
        other = BotClient(scheduler, "other")
        self.assertEqual(other.leased_action(), as_leased(action))

    async def test_absent_bot_counts_retry(self):
        restartable = RestartableScheduler(self, bot_keepalive_timeout=60, max_job_retries=0)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())

        scheduler = await restartable.restart()
        restartable.clock.advance(60)

        status = operation_response(scheduler.get_operation(name)).status
        self.assertEqual(status.code, code_pb2.UNAVAILABLE)
        self.assertIn("1 times", status.message)

    async def test_cancelled_lease_reaches_bot_after_restart(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())
        scheduler.cancel_operation(name)
        await restartable.settle()

        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        active = bots_pb2.Lease(id=bot.lease.id, state=bots_pb2.ACTIVE)
        session = await restartable.settle(bot.update(leases=[active]))

        self.assertEqual(session.leases[0].state, bots_pb2.CANCELLED)
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.status.code, code_pb2.CANCELLED)


class OperationRecoveryTests(unittest.TestCase):
    async def test_done_operation_kept_until_retention(self):
        restartable = RestartableScheduler(
            self, operation_retention=600, bot_keepalive_timeout=10_000
        )
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.complete(make_result(exit_code=7)))
        restartable.clock.advance(500)

        scheduler = await restartable.restart()

        operation = scheduler.get_operation(name)
        self.assertTrue(operation.done)
        self.assertEqual(operation_response(operation).result.exit_code, 7)
        restartable.clock.advance(99)
        self.assertTrue(scheduler.get_operation(name).done)
        restartable.clock.advance(1)
        self.assertRaises(NotFoundError, scheduler.get_operation, name)

        await restartable.settle()
        scheduler = await restartable.restart()
        self.assertRaises(NotFoundError, scheduler.get_operation, name)
        records = await restartable.store.load()
        self.assertEqual(records.jobs, [])
        self.assertEqual(records.operations, [])
        self.assertEqual(records.leases, [])

    async def test_cache_hit_operation_survives(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        digest, _ = make_action("a")
        response = re_pb2.ExecuteResponse(result=make_result(stdout=b"hit"), cached_result=True)
        name = scheduler.add_completed_operation("", digest, response)
        await restartable.settle()

        scheduler = await restartable.restart()

        self.assertEqual(operation_response(scheduler.get_operation(name)), response)

    async def test_watch_after_recovery_ends_with_result(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())

        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        watch = scheduler.watch_operation(name)

        first = await restartable.settle(watch.next())
        self.assertEqual(operation_stage(first), EXECUTING)
        waiting = watch.next()
        self.assertNoResult(waiting)
        await restartable.settle(bot.complete(make_result(stdout=b"watched")))
        done = await waiting
        self.assertTrue(done.done)
        self.assertEqual(operation_response(done).result.stdout_raw, b"watched")
        self.assertIsNone(await watch.next())

    async def test_unknown_operation_not_found_after_recovery(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        submit(scheduler, "a")
        await restartable.settle()

        scheduler = await restartable.restart()

        self.assertRaises(NotFoundError, scheduler.get_operation, "operations/nope")
        self.assertRaises(NotFoundError, scheduler.watch_operation, "operations/nope")

    async def test_result_handler_runs_again_after_crash(self):
        first_handler_calls = []

        def unfinished_handler(instance_name, action_digest, action, do_not_cache, response):
            first_handler_calls.append(response)
            return defer.Deferred()

        second_handler_calls = []

        def handler(instance_name, action_digest, action, do_not_cache, response):
            second_handler_calls.append(response)
            return defer.succeed(None)

        restartable = RestartableScheduler(self)
        scheduler = await restartable.start(result_handler=unfinished_handler)
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.complete(make_result(stdout=b"reported")))
        self.assertEqual(len(first_handler_calls), 1)
        self.assertFalse(scheduler.get_operation(name).done)

        scheduler = await restartable.restart(result_handler=handler)

        self.assertEqual(len(second_handler_calls), 1)
        self.assertEqual(second_handler_calls[0].result.stdout_raw, b"reported")
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"reported")


class AcknowledgementTests(unittest.TestCase):
    """Nothing reaches a client or a bot before the state it shows is committed."""

    async def test_operation_sent_only_after_commit(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        lost_name = submit(scheduler, "lost")
        lost_first = scheduler.watch_operation(lost_name).next()
        self.assertNoResult(lost_first)

        # A crash before the journal's write loses the job, but the client never heard of it.
        scheduler = await restartable.restart()
        self.assertRaises(NotFoundError, scheduler.get_operation, lost_name)
        self.assertNoResult(lost_first)

        name = submit(scheduler, "kept")
        first = scheduler.watch_operation(name).next()
        restartable.clock.advance(0)
        # The write is on LMDB's writer thread, whose commit is reported in a later turn.
        self.assertNoResult(first)
        self.assertEqual((await first).name, name)

        scheduler = await restartable.restart()
        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)

    async def test_lease_sent_only_after_commit(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle()
        poll = bot.update()

        submit(scheduler, "lost")
        self.assertNoResult(poll)
        scheduler = await restartable.restart()
        self.assertNoResult(poll)
        self.assertEqual(scheduler.stats()["jobs"], 0)

        bot.scheduler = scheduler
        poll = bot.update()
        submit(scheduler, "kept")
        self.assertNoResult(poll)
        session = await restartable.settle(poll)
        lease_id = session.leases[0].id

        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        session = await restartable.settle(bot.update(leases=[]))
        self.assertEqual(session.leases[0].id, lease_id)

    async def test_result_sent_only_after_commit(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        bot = BotClient(scheduler, "bot-1")
        await restartable.settle(bot.accept())
        watch = scheduler.watch_operation(name)
        await restartable.settle(watch.next())
        waiting = watch.next()
        report = bot.complete(make_result(stdout=b"first report"))

        self.assertNoResult(report)
        self.assertNoResult(waiting)
        self.assertTrue(scheduler.get_operation(name).done)

        # The bot got no response, so it still holds its lease and reports it again.
        scheduler = await restartable.restart()
        bot.scheduler = scheduler
        self.assertFalse(scheduler.get_operation(name).done)
        await restartable.settle(bot.complete(make_result(stdout=b"second report")))
        response = operation_response(scheduler.get_operation(name))
        self.assertEqual(response.result.stdout_raw, b"second report")


class JournalTests(unittest.TestCase):
    async def test_changes_of_one_turn_share_one_commit(self):
        scheduler, clock, store = await start_wrapped_scheduler(self)

        for index in range(100):
            submit(scheduler, str(index))
        clock.advance(0)
        await scheduler.durable()

        # 100 jobs, 100 operations and the meta record.
        self.assertEqual(store.commit_sizes, [201])

    async def test_failed_commit_fails_waiters_and_retries(self):
        scheduler, clock, store = await start_wrapped_scheduler(self)
        store.failing = True
        name = submit(scheduler, "a")
        first = scheduler.watch_operation(name).next()

        clock.advance(0)

        self.failureResultOf(first, ResourceExhaustedError)
        self.assertEqual(len(self.flushLoggedErrors(ResourceExhaustedError)), 1)
        store.failing = False
        clock.advance(FIRST_RETRY_DELAY)
        await scheduler.durable()
        records = await store.load()
        self.assertEqual(len(records.jobs), 1)
        self.assertEqual(len(records.operations), 1)

    async def test_included_write_holds_waiters(self):
        journal, clock, store = await start_journal(self)
        written = defer.Deferred()
        journal.changed(JOBS, "a")
        journal.include(written)
        waiting = journal.durable()

        clock.advance(0)
        await store.commits[0]

        self.assertNoResult(waiting)
        written.callback(None)
        self.assertIsNone(self.successResultOf(waiting))

    async def test_failed_included_write_does_not_fail_waiters(self):
        journal, clock, store = await start_journal(self)
        written = defer.Deferred()
        written.addErrback(lambda failure: None)
        journal.changed(JOBS, "a")
        journal.include(written)
        waiting = journal.durable()
        clock.advance(0)
        await store.commits[0]

        written.errback(RuntimeError("action cache unavailable"))

        self.assertIsNone(self.successResultOf(waiting))

    async def test_waiters_fire_in_batch_order(self):
        journal, clock, store = await start_journal(self)
        written = defer.Deferred()
        journal.changed(JOBS, "a")
        journal.include(written)
        first = journal.durable()
        clock.advance(0)
        journal.changed(JOBS, "b")
        second = journal.durable()
        clock.advance(0)

        await store.commits[1]

        self.assertNoResult(first)
        self.assertNoResult(second)
        written.callback(None)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))

    async def test_store_provides_interface(self):
        restartable = RestartableScheduler(self)
        await restartable.start()

        self.assertTrue(verifyObject(ISchedulerStore, restartable.store))


class StoredRecordTests(unittest.TestCase):
    async def test_newer_format_rejected(self):
        restartable = RestartableScheduler(self)
        await restartable.start()
        newer = json.dumps({"format": 99, "next_sequence": 0}).encode()
        await restartable.store.commit([(META, META_NAME, newer)])

        await restartable.crash()
        with self.assertRaises(RecordFormatError) as raised:
            await restartable.start()

        self.assertIn("format 99", str(raised.exception))

    async def test_invalid_record_skipped_and_logged(self):
        restartable = RestartableScheduler(self)
        scheduler = await restartable.start()
        name = submit(scheduler, "a")
        await restartable.settle()
        await restartable.store.commit([(JOBS, "corrupt", b"{not json")])
        events = capture_logs(self)

        scheduler = await restartable.restart()

        self.assertEqual(operation_stage(scheduler.get_operation(name)), QUEUED)
        skipped = [event for event in events if event.get("kind") == "job"]
        self.assertEqual(len(skipped), 1)
        self.assertIn("not UTF-8 JSON", str(skipped[0]["error"]))

    async def test_operation_referring_to_done_job_rewritten(self):
        # Records as bgrid wrote them while it kept done jobs: the operation refers to the
        # response in its job's record.
        restartable = RestartableScheduler(self)
        await restartable.start()
        digest, action = make_action("a")
        job = Job(
            "job-1", "", digest, action, priority=0, do_not_cache=False, requirements=(),
            sequence=0, queued_time=0.0,
        )
        job.stage = COMPLETED
        job.response = re_pb2.ExecuteResponse(result=make_result(stdout=b"in the job"))
        operation = json.dumps({
            "name": "operations/op-1", "instance_name": "", "action_digest": str(digest),
            "sequence": 1, "job_id": "job-1", "response": None, "response_in_job": True,
            "completed_time": 0.0,
        }).encode()
        await restartable.store.commit([
            (JOBS, "job-1", encode_job(job)),
            (OPERATIONS, "operations/op-1", operation),
        ])

        scheduler = await restartable.restart()
        await restartable.settle()
        self.assertEqual(scheduler.stats()["jobs"], 0)
        scheduler = await restartable.restart()

        response = operation_response(scheduler.get_operation("operations/op-1"))
        self.assertEqual(response.result.stdout_raw, b"in the job")
        records = await restartable.store.load()
        self.assertEqual(records.jobs, [])

    def test_lease_start_time_round_trip(self):
        lease = Lease("lease-1", "job-1", "botSessions/1", bots_pb2.ACTIVE, started_time=12.5)

        decoded = decode_lease(encode_lease(lease))

        self.assertEqual(decoded.started_time, 12.5)
        self.assertEqual(decoded.state, bots_pb2.ACTIVE)

    def test_lease_without_start_time_decoded(self):
        stored = json.dumps({
            "lease_id": "lease-1", "job_id": "job-1", "session_name": "botSessions/1",
            "state": bots_pb2.ACTIVE,
        }).encode()

        decoded = decode_lease(stored)

        self.assertIsNone(decoded.started_time)
        self.assertEqual(decoded.job_id, "job-1")
