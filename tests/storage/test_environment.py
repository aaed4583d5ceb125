"""Tests of ``LmdbEnvironment``: its lifecycle, group commits and error translation."""

import os
import threading
import time

import lmdb
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial import unittest

from bgrid.errors import ResourceExhaustedError, UnavailableError
from bgrid.storage import space
from bgrid.storage.environment import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPERATIONS,
    LmdbEnvironment,
)
from tests.util import make_temp_dir

DATABASE = b"test"


class _CommitFailingTransaction:
    """A top-level write transaction whose commit fails with ``error``."""

    def __init__(self, txn, error):
        self._txn = txn
        self._error = error

    def __enter__(self):
        return self._txn.__enter__()

    def __exit__(self, *exc_info):
        self._txn.abort()
        raise self._error


class _FirstGroupCommitFails:
    """An ``lmdb.Environment`` stand-in whose first top-level write transaction fails to
    commit with ``error``, for the retry paths that a real map rarely reaches."""

    def __init__(self, env, error):
        self._env = env
        self._error = error
        self.failed_commits = 0

    def begin(self, write=False, parent=None, **kwargs):
        txn = self._env.begin(write=write, parent=parent, **kwargs)
        if write and parent is None and self.failed_commits == 0:
            self.failed_commits += 1
            return _CommitFailingTransaction(txn, self._error)
        return txn

    def __getattr__(self, name):
        return getattr(self._env, name)


def _get(txn, db, key):
    value = txn.get(key, db=db)
    return bytes(value) if value is not None else None


class LmdbEnvironmentTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(make_temp_dir(self), "lmdb")
        self.environment = LmdbEnvironment(self.path, [DATABASE], map_size=64 << 20)

    def start(self):
        self.environment.start()
        self.addCleanup(self.environment.stop)
        self.db = self.environment.database(DATABASE)

    def put_operation(self, key, value):
        def put(txn):
            txn.put(key, value, db=self.db)
            return key

        return put

    async def get(self, key):
        return await self.environment.read(_get, self.db, key)

    def test_nothing_opened_before_start(self):
        self.assertFalse(os.path.exists(self.path))

        self.start()

        self.assertTrue(os.path.exists(os.path.join(self.path, "data.mdb")))

    def test_second_start_rejected(self):
        self.start()

        with self.assertRaises(RuntimeError):
            self.environment.start()

    async def test_write_then_read(self):
        self.start()

        self.assertEqual(await self.environment.write(self.put_operation(b"k", b"v")), b"k")

        self.assertEqual(await self.get(b"k"), b"v")
        self.assertIsNone(await self.get(b"absent"))

    async def test_results_fire_on_reactor_thread(self):
        self.start()
        threads = []

        def remember_thread(result):
            threads.append(threading.current_thread())
            return result

        await self.environment.write(lambda txn: threading.current_thread()).addCallback(
            remember_thread
        )
        await self.environment.read(lambda txn: None).addCallback(remember_thread)

        self.assertEqual(threads, [threading.main_thread()] * 2)

    async def test_read_inline_runs_on_calling_thread(self):
        self.start()
        await self.environment.write(self.put_operation(b"k", b"v"))

        reading = self.environment.read_inline(
            lambda txn: (threading.current_thread(), _get(txn, self.db, b"k"))
        )

        # The Deferred has fired before read_inline returns.
        self.assertEqual(self.successResultOf(reading), (threading.main_thread(), b"v"))

    def test_read_inline_failure_fails_deferred(self):
        self.start()

        def fail(txn):
            raise ValueError("read failed")

        failure = self.failureResultOf(self.environment.read_inline(fail), ValueError)

        self.assertEqual(str(failure.value), "read failed")

    async def test_read_inline_after_stop_rejected(self):
        self.start()
        await self.environment.stop()

        self.failureResultOf(self.environment.read_inline(lambda txn: None), UnavailableError)

    async def test_failing_operation_rolls_back_alone(self):
        self.start()

        def put_then_fail(txn):
            txn.put(b"b", b"2", db=self.db)
            raise KeyError("operation failed on purpose")

        results = self.environment.write_many(
            [self.put_operation(b"a", b"1"), put_then_fail, self.put_operation(b"c", b"3")]
        )

        self.assertEqual(await results[0], b"a")
        with self.assertRaises(KeyError):
            await results[1]
        self.assertEqual(await results[2], b"c")
        self.assertEqual(await self.get(b"a"), b"1")
        self.assertIsNone(await self.get(b"b"))
        self.assertEqual(await self.get(b"c"), b"3")

    async def test_queued_operations_share_a_transaction(self):
        self.start()

        def put_operation_returning_transaction_id(number):
            def put(txn):
                txn.put(b"%d" % number, b"v", db=self.db)
                return txn.id()

            return put

        count = MAX_BATCH_OPERATIONS // 2
        first = await defer.gatherResults(
            self.environment.write_many(
                [put_operation_returning_transaction_id(n) for n in range(count)]
            )
        )
        second = await self.environment.write(put_operation_returning_transaction_id(count))

        self.assertEqual(len(set(first)), 1)
        self.assertNotEqual(second, first[0])

    async def test_write_batch_reports_each_outcome(self):
        self.start()

        def put_then_fail(txn):
            txn.put(b"b", b"2", db=self.db)
            raise KeyError("operation failed on purpose")

        outcomes = await self.environment.write_batch(
            [self.put_operation(b"a", b"1"), put_then_fail, self.put_operation(b"c", b"3")]
        )

        self.assertEqual(outcomes[0], b"a")
        self.assertIsInstance(outcomes[1], Failure)
        self.assertTrue(outcomes[1].check(KeyError))
        self.assertEqual(outcomes[2], b"c")
        self.assertEqual(await self.get(b"a"), b"1")
        self.assertIsNone(await self.get(b"b"))
        self.assertEqual(await self.get(b"c"), b"3")

    async def test_prepare_write_off_reactor(self):
        self.start()
        prepare_threads = []

        def prepare(key, value):
            prepare_threads.append(threading.current_thread())
            return [self.put_operation(key, value)], "context"

        result = await self.environment.prepare_write(1, prepare, b"k", b"v")

        self.assertEqual(result, ("context", [b"k"]))
        self.assertNotEqual(prepare_threads, [threading.main_thread()])
        self.assertEqual(await self.get(b"k"), b"v")

    async def test_prepare_write_failure(self):
        self.start()

        def prepare():
            raise ValueError("preparation failed on purpose")

        with self.assertRaises(ValueError):
            await self.environment.prepare_write(0, prepare)

    async def test_prepare_write_outliving_stop(self):
        self.start()
        release = threading.Event()

        def prepare():
            release.wait(10)
            return [self.put_operation(b"late", b"v")], None

        writing = self.environment.prepare_write(1, prepare)
        # stop() waits for the reader threads, so the preparation ends from another thread.
        threading.Timer(0.2, release.set).start()
        await self.environment.stop()

        with self.assertRaises(UnavailableError):
            await writing

    async def test_group_bytes_limited(self):
        # In a map this large, MAX_BATCH_BYTES is the smaller limit.
        self.environment = LmdbEnvironment(
            self.path, [DATABASE], map_size=64 << 20, max_map_size=1 << 30
        )

        await self.assert_groups_split_at(MAX_BATCH_BYTES)

    async def test_small_map_limits_group_bytes(self):
        # A group must leave room above the high-water mark for the eviction after it.
        self.environment = LmdbEnvironment(
            self.path, [DATABASE], map_size=12 << 20, max_map_size=12 << 20
        )
        limit = space.MapMarks.for_map(12 << 20, 4096).max_batch_bytes
        self.assertLess(limit, MAX_BATCH_BYTES)

        await self.assert_groups_split_at(limit)

    async def assert_groups_split_at(self, limit):
        """Check that writes queued together commit in groups of at most ``limit`` bytes."""
        self.start()
        entered = threading.Event()
        release = threading.Event()

        def block_writer(txn):
            entered.set()
            release.wait(10)

        def put_returning_transaction_id(key):
            def put(txn):
                txn.put(key, b"v", db=self.db)
                return txn.id()

            return put

        blocking = self.environment.write(block_writer)
        self.assertTrue(entered.wait(10))
        # Queued while the writer is busy, so only the byte limit splits them.
        half = limit // 2
        writes = [
            self.environment.write(put_returning_transaction_id(b"big-%d" % number), half + 1)
            for number in range(3)
        ] + [self.environment.write(put_returning_transaction_id(b"small"), 1)]
        release.set()
        await blocking
        transaction_ids = await defer.gatherResults(writes)

        self.assertEqual(len(set(transaction_ids[:3])), 3)
        self.assertEqual(transaction_ids[3], transaction_ids[2])

    async def test_failed_group_commit_retries_each_write(self):
        self.start()
        failing_env = _FirstGroupCommitFails(
            self.environment._env, lmdb.TxnFullError("simulated failure of a group commit")
        )
        self.environment._env = failing_env

        results = await defer.gatherResults(
            self.environment.write_many(
                [self.put_operation(b"a", b"1"), self.put_operation(b"b", b"2")]
            )
        )

        self.assertEqual(failing_env.failed_commits, 1)
        self.assertEqual(results, [b"a", b"b"])
        self.assertEqual(await self.get(b"a"), b"1")
        self.assertEqual(await self.get(b"b"), b"2")

    async def test_map_full_becomes_resource_exhausted(self):
        self.environment = LmdbEnvironment(self.path, [DATABASE], map_size=256 * 1024)
        self.start()

        with self.assertRaises(ResourceExhaustedError) as caught:
            await self.environment.write(self.put_operation(b"big", b"x" * (1 << 20)))

        self.assertIn("262144 bytes", caught.exception.message)
        self.assertIn("--map-size", caught.exception.message)
        await self.environment.write(self.put_operation(b"small", b"y"))
        self.assertEqual(await self.get(b"small"), b"y")

    async def test_stop_applies_queued_writes(self):
        self.start()
        writes = [self.environment.write(self.put_operation(b"%d" % i, b"v")) for i in range(50)]

        await self.environment.stop()

        results = await defer.gatherResults(writes)
        self.assertEqual(len(results), 50)
        reopened = LmdbEnvironment(self.path, [DATABASE])
        reopened.start()
        self.addCleanup(reopened.stop)
        db = reopened.database(DATABASE)
        self.assertEqual(await reopened.read(lambda txn: txn.stat(db)["entries"]), 50)

    async def test_requests_after_stop_rejected(self):
        self.start()
        await self.environment.stop()

        with self.assertRaises(UnavailableError):
            await self.environment.write(lambda txn: None)
        with self.assertRaises(UnavailableError):
            await self.environment.read(lambda txn: None)

    async def test_lmdb_errors_pass_through(self):
        self.start()

        def put_empty_key(txn):
            txn.put(b"", b"value", db=self.db)

        with self.assertRaises(lmdb.Error):
            await self.environment.write(put_empty_key)


def _wait_until(condition, timeout=10.0):
    """Poll ``condition`` from the test thread until it holds; fail after ``timeout``
    seconds. Used only to observe the writer thread, which the clock cannot drive."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} seconds")
        time.sleep(0.005)


class LmdbEnvironmentMapFullTests(unittest.TestCase):
    """A full map: growth up to the maximum, the gate that keeps transactions out of a
    resize, and the reclaimer that frees space at the maximum."""

    def setUp(self):
        self.path = os.path.join(make_temp_dir(self), "lmdb")

    def start(self, map_size, max_map_size=None):
        self.environment = LmdbEnvironment(
            self.path, [DATABASE], map_size=map_size, max_map_size=max_map_size
        )
        self.environment.start()
        self.addCleanup(self.environment.stop)
        self.db = self.environment.database(DATABASE)

    def put_operation(self, key, value):
        def put(txn):
            txn.put(key, value, db=self.db)
            return key

        return put

    async def get(self, key):
        return await self.environment.read(_get, self.db, key)

    async def test_full_map_grows(self):
        self.start(256 * 1024, max_map_size=64 << 20)
        value = os.urandom(4 << 20)

        await self.environment.write(self.put_operation(b"big", value))

        self.assertEqual(await self.get(b"big"), value)
        self.assertGreater(self.environment.map_size, 4 << 20)
        self.assertLessEqual(self.environment.map_size, 64 << 20)

    async def test_growth_stops_at_maximum(self):
        self.start(256 * 1024, max_map_size=2 << 20)

        with self.assertRaises(ResourceExhaustedError) as caught:
            await self.environment.write(self.put_operation(b"big", b"x" * (4 << 20)))

        self.assertEqual(self.environment.map_size, 2 << 20)
        self.assertIn(f"{2 << 20} bytes", caught.exception.message)
        await self.environment.write(self.put_operation(b"small", b"y"))
        self.assertEqual(await self.get(b"small"), b"y")

    async def test_growth_waits_for_active_reads(self):
        self.start(256 * 1024, max_map_size=64 << 20)
        entered = threading.Event()
        release = threading.Event()

        def blocking_read(txn):
            entered.set()
            release.wait(10)
            return txn.get(b"absent", db=self.db)

        reading = self.environment.read(blocking_read)
        self.assertTrue(entered.wait(10))
        writing = self.environment.write(self.put_operation(b"big", b"z" * (2 << 20)))

        _wait_until(lambda: self.environment._gate._resizing)
        self.assertEqual(self.environment.map_size, 256 * 1024)
        self.assertFalse(writing.called)
        release.set()

        self.assertIsNone(await reading)
        self.assertEqual(await writing, b"big")
        self.assertGreater(self.environment.map_size, 2 << 20)

    async def test_reads_during_growth_see_committed_data(self):
        self.start(256 * 1024, max_map_size=256 << 20)
        values = {b"%03d" % number: os.urandom(200_000) for number in range(60)}

        writes = []
        reads = []
        for key, value in values.items():
            writes.append(self.environment.write(self.put_operation(key, value)))
            reads.append(self.environment.read(_get, self.db, key))
        await defer.gatherResults(writes)
        read_values = await defer.gatherResults(reads)

        for key, read_value in zip(values, read_values):
            self.assertIn(read_value, (None, values[key]), f"key {key!r}")
        for key, value in values.items():
            self.assertEqual(await self.get(key), value, f"key {key!r}")
        self.assertGreater(self.environment.map_size, 256 * 1024)

    async def test_group_commit_on_full_map_retried_after_growth(self):
        self.start(256 * 1024, max_map_size=64 << 20)
        failing_env = _FirstGroupCommitFails(
            self.environment._env, lmdb.MapFullError("simulated full map at commit")
        )
        self.environment._env = failing_env

        results = await defer.gatherResults(
            self.environment.write_many(
                [self.put_operation(b"a", b"1"), self.put_operation(b"b", b"2")]
            )
        )

        self.assertEqual(failing_env.failed_commits, 1)
        self.assertEqual(results, [b"a", b"b"])
        self.assertEqual(self.environment.map_size, 512 * 1024)
        self.assertEqual(await self.get(b"b"), b"2")

    def deleting_reclaimer(self, calls, committed, before_full_map):
        """Return a reclaimer that deletes keys from the start of the test database and
        records each call in ``calls`` as ``(thread, target_bytes, is_enough)`` and each
        commit in ``committed``. Unless ``before_full_map``, it frees nothing when
        called with an ``is_enough`` check, so writes run into the full map."""

        def reclaim(txn, target_bytes, reason, is_enough):
            calls.append((threading.current_thread(), target_bytes, is_enough))
            if is_enough is not None and not before_full_map:
                return 0, None
            freed = 0
            with txn.cursor(db=self.db) as cursor:
                keys = [bytes(key) for key in cursor.iternext(values=False)]
            for key in keys:
                freed += len(txn.get(key, db=self.db))
                txn.delete(key, db=self.db)
                if freed >= target_bytes or (is_enough is not None and is_enough()):
                    break
            return freed, lambda: committed.append(threading.current_thread())

        return reclaim

    async def test_reclaimer_frees_space_at_maximum(self):
        self.start(2 << 20)
        calls = []
        committed = []
        self.environment.set_space_reclaimer(
            self.deleting_reclaimer(calls, committed, before_full_map=False)
        )

        for number in range(12):
            await self.environment.write(self.put_operation(b"%02d" % number, b"v" * 400_000))
        # The writer thread evicts after delivering a write's result, so this write's
        # result arrives after the last eviction's commit callback.
        await self.environment.write(lambda txn: None)

        full_map_calls = [call for call in calls if call[2] is None]
        self.assertGreater(len(full_map_calls), 0)
        self.assertNotEqual(full_map_calls[0][0], threading.main_thread())
        self.assertEqual(committed, [threading.main_thread()] * len(full_map_calls))
        self.assertEqual(await self.get(b"11"), b"v" * 400_000)
        self.assertIsNone(await self.get(b"00"))

    async def test_high_water_evicts_before_map_fills(self):
        self.start(2 << 20)
        calls = []
        committed = []
        self.environment.set_space_reclaimer(
            self.deleting_reclaimer(calls, committed, before_full_map=True)
        )

        for number in range(12):
            await self.environment.write(self.put_operation(b"%02d" % number, b"v" * 400_000))
        await self.environment.write(lambda txn: None)

        self.assertGreater(len(calls), 0)
        self.assertEqual([call for call in calls if call[2] is None], [], "the map filled")
        self.assertEqual(committed, [threading.main_thread()] * len(calls))
        self.assertEqual(await self.get(b"11"), b"v" * 400_000)
        self.assertIsNone(await self.get(b"00"))
        marks = self.environment._marks
        usage = await self.environment.read(self.environment._count_pages)
        self.assertLessEqual(usage.needed_pages, marks.high_pages)

    async def test_no_eviction_below_high_water(self):
        self.start(64 << 20)
        calls = []
        self.environment.set_space_reclaimer(
            self.deleting_reclaimer(calls, [], before_full_map=True)
        )

        for number in range(20):
            await self.environment.write(self.put_operation(b"%02d" % number, b"v" * 100_000))
        await self.environment.write(lambda txn: None)

        self.assertEqual(calls, [])
        self.assertEqual(await self.get(b"00"), b"v" * 100_000)

    async def test_reclaimer_freeing_nothing(self):
        self.start(1 << 20)
        calls = []

        def reclaim(txn, target_bytes, reason, is_enough):
            calls.append(target_bytes)
            return 0, None

        self.environment.set_space_reclaimer(reclaim)

        with self.assertRaises(ResourceExhaustedError):
            await self.environment.write(self.put_operation(b"big", b"x" * (2 << 20)))

        self.assertEqual(calls, [(1 << 20) // 16])
