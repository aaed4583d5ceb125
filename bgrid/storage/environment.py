"""The one LMDB environment of a bgrid server, with its single writer thread and its reader
thread pool."""

import collections
import os
import struct
import threading

import lmdb
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from bgrid.errors import ResourceExhaustedError, UnavailableError
from bgrid.storage import space
from bgrid.storage.threads import OutcomeDelivery, ReaderPool, TransactionGate

DEFAULT_MAP_SIZE = 1 << 40
DEFAULT_READER_THREADS = 4

# The space, in bytes, that the first round of reclaiming requests when the map is full at
# its maximum size, unless a sixteenth of the map is less. Later rounds for the same
# writes request twice as much as the round before.
FIRST_RECLAIM_BYTES = 16 << 20

# A named database of the environment's own: a counter written after each reclaim.
# LMDB hands pages freed by transaction N to transaction N + 2 or later (checked against
# LMDB 0.9.x), so one more committed write is needed before a retry can use them.
ENVIRONMENT_DATABASE = b"bgrid-environment"
_RECLAIM_COUNT_KEY = b"reclaim-count"
_UINT64 = struct.Struct(">Q")

# Reader slots beyond one per pool thread and one for ``read_inline``, for tools such as
# mdb_stat and mdb_copy, which take a slot while they run against the live database.
RESERVED_READER_SLOTS = 8

# Upper bounds on the operations applied in one group transaction and on the data bytes
# they declare, so a burst of writes cannot grow one transaction's dirty pages, which
# LMDB keeps in memory until the commit, without limit.
MAX_BATCH_OPERATIONS = 256
MAX_BATCH_BYTES = 8 << 20

_CLOSED, _OPEN, _STOPPING = "closed", "open", "stopping"


class _QueuedWrite:
    """Write operations that must share a group transaction, with the Deferreds of their
    caller: one per operation, or with ``collected`` one for the list of all outcomes."""

    __slots__ = ("operations", "deferreds", "collected", "size")

    def __init__(self, operations, deferreds, collected=False, size=0):
        self.operations = operations
        self.deferreds = deferreds
        self.collected = collected
        self.size = size


class _OperationFailed(Exception):
    """An operation of a group applied without nested transactions raised, so the group
    transaction was aborted and the group must be applied again with nesting."""


def _is_map_full(outcome):
    return isinstance(outcome, Failure) and outcome.check(lmdb.MapFullError) is not None


class LmdbEnvironment:
    """An LMDB environment shared by every store of the server.

    The environment is opened by ``start`` and closed by ``stop``, never at construction,
    because twistd forks between building the service tree and starting it and an LMDB
    environment must not cross a fork.

    Durability: the environment is opened with ``sync=True, metasync=False``. A committed
    transaction survives the death of the process. A power failure or kernel crash may
    undo the last committed transaction but leaves the database consistent, as the
    py-lmdb 3.0 documentation of ``metasync`` states.

    Writes go through one writer thread that applies everything queued so far in one
    transaction (group commit), so concurrent writers share one fsync. A failing
    operation rolls back alone: the group first runs without nested transactions, and
    when an operation raises, the group transaction is aborted and the group runs again
    with each operation in a nested transaction. Reads run on a small thread pool, one
    read transaction per call. Every Deferred returned here fires on the reactor thread.

    Each group transaction counts the pages of all databases before it commits (see
    ``space``). When the used pages plus room for copy-on-write pass the high-water mark
    of ``max_map_size``, the reclaimer set with ``set_space_reclaimer`` (the CAS evicts
    least-recently-used blobs) frees pages down to the low mark in a transaction of its
    own, so the map keeps room for deletes and for records that cannot be evicted.

    A full map (``lmdb.MapFullError``) is the last resort, handled on the writer thread
    before the writes that hit it fail: the map doubles, up to ``max_map_size``, while a
    gate keeps every other transaction of the process out. At the maximum, the reclaimer
    frees space, and the writes run again. Only when neither helps do they fail with
    ``ResourceExhaustedError``. Every transaction on this environment must therefore go
    through ``read`` or ``write``, because a transaction opened on the
    ``lmdb.Environment`` directly would not hold the resize off.

    A write that fails because the disk is full (see ``space.disk_full_cause``) makes
    the reclaimer free space, and the failed writes run once more. Those that fail again
    fail with ``ResourceExhaustedError``, and these failures are logged at most once per
    ``space.DISK_FULL_LOG_INTERVAL`` seconds. LMDB aborts a transaction whose commit
    failed, so nothing of it becomes visible, and the environment stays usable.
    """

    log = Logger()

    def __init__(
        self,
        path,
        database_names,
        map_size=DEFAULT_MAP_SIZE,
        reader_threads=DEFAULT_READER_THREADS,
        reactor=None,
        max_map_size=None,
    ):
        """Describe the environment. Nothing is opened until ``start``.

        ``path`` is the data directory, created if missing. ``database_names`` are the
        byte names of the named databases to open. ``map_size`` is the size in bytes of
        the map at start, and ``max_map_size`` (``map_size`` by default) the size it may
        double up to when full. Both bound the data file, which is sparse, so a large
        map costs address space but no disk until used. ``reactor`` provides
        ``callFromThread`` (the global reactor by default).
        """
        if reader_threads < 1:
            raise ValueError(f"reader_threads must be at least 1, got {reader_threads}")
        if max_map_size is None:
            max_map_size = map_size
        if max_map_size < map_size:
            raise ValueError(
                f"max_map_size ({max_map_size} bytes) must be at least map_size "
                f"({map_size} bytes)"
            )
        self._database_names = tuple(database_names)
        if ENVIRONMENT_DATABASE in self._database_names:
            raise ValueError(f"database name {ENVIRONMENT_DATABASE!r} is reserved")
        self.path = path
        self.map_size = map_size
        self.max_map_size = max_map_size
        self.reader_threads = reader_threads
        self._reactor = reactor
        self._state = _CLOSED
        self._env = None
        self._databases = {}
        self._reader_pool = None
        self._delivery = None
        self._writer_thread = None
        self._queue = collections.deque()
        self._queue_condition = threading.Condition()
        self._writer_exited = False
        self._writer_stopped = None
        self._closed_waiters = []
        self._gate = TransactionGate()
        self._reclaimer = None
        self._environment_db = None
        # Written and read on the writer thread only.
        self._counted_databases = ()
        self._marks = None
        self._max_batch_bytes = MAX_BATCH_BYTES
        self._page_usage = None
        self._high_water_retry_pages = 0
        self._disk_full_log = None

    def start(self):
        """Open the environment and its databases and start the writer and reader threads.

        Raises ``lmdb.Error`` or ``OSError`` when the data directory cannot be opened.
        """
        if self._state != _CLOSED:
            raise RuntimeError(f"LMDB environment at {self.path} is already started")
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor

        os.makedirs(self.path, exist_ok=True)
        # Every commit waits for fdatasync. sync=False with env.sync() before
        # acknowledging was measured and saves nothing: committing 100 blobs of 4 KiB took
        # 3.3 ms with sync=True, and 0.44 ms plus 2.4 ms of env.sync() with sync=False
        # (py-lmdb 3.0, ext4 on a 2-core VM). Running env.sync() beside the next
        # transaction would overlap the two, but without sync LMDB writes a commit's meta
        # page before that commit's data pages are on disk, so a power failure could leave
        # a meta page pointing at pages never written, a corrupt database.
        self._env = lmdb.open(
            self.path,
            map_size=self.map_size,
            max_dbs=len(self._database_names) + 1,
            max_readers=self.reader_threads + 1 + RESERVED_READER_SLOTS,
            sync=True,
            metasync=False,
        )
        try:
            for name in self._database_names:
                self._databases[name] = self._env.open_db(name)
            self._environment_db = self._env.open_db(ENVIRONMENT_DATABASE)
            # The main database contains one record per named database.
            main_db = self._env.open_db(None)
        except lmdb.Error:
            self._env.close()
            self._env = None
            raise
        # LMDB raises the map to the size of the data already in the file.
        self.map_size = self._env.info()["map_size"]
        self._counted_databases = (
            *self._databases.values(),
            self._environment_db,
            main_db,
        )
        self._marks = space.MapMarks.for_map(self.max_map_size, self._env.stat()["psize"])
        self._max_batch_bytes = min(MAX_BATCH_BYTES, self._marks.max_batch_bytes)
        self._page_usage = None
        self._high_water_retry_pages = 0
        self._disk_full_log = space.DiskFullLog(self.log, self._reactor)

        self._delivery = OutcomeDelivery(self._reactor)
        self._reader_pool = ReaderPool(self.reader_threads, "bgrid-lmdb-reader")
        self._reader_pool.start()
        self._writer_exited = False

        self._writer_stopped = defer.Deferred()
        self._writer_thread = threading.Thread(
            target=self._run_writer, name="bgrid-lmdb-writer", daemon=True
        )
        self._state = _OPEN
        self._writer_thread.start()
        self.log.info(
            "opened LMDB environment at {path} with a map size of {map_size} bytes "
            "(maximum {max_map_size} bytes; blobs are evicted when used pages plus room "
            "for copy-on-write pass {high_bytes} bytes)",
            path=self.path,
            map_size=self.map_size,
            max_map_size=self.max_map_size,
            high_bytes=self._marks.high_pages * self._marks.page_size,
        )

    def stop(self):
        """Apply the writes queued so far, stop the threads and close the environment.

        Returns a Deferred firing with None once the environment is closed. Reads and
        writes requested after this call fail with ``UnavailableError``.
        """
        if self._state == _CLOSED:
            return defer.succeed(None)
        closed = defer.Deferred()
        self._closed_waiters.append(closed)
        if self._state == _STOPPING:
            return closed

        self._state = _STOPPING
        with self._queue_condition:
            self._queue_condition.notify()
        self._writer_stopped.addCallback(self._close)
        return closed

    def _close(self, _):
        self._writer_thread.join()
        self._reader_pool.stop()
        self._disk_full_log.flush()
        self._env.close()
        self._env = None
        self._databases = {}
        self._state = _CLOSED
        self.log.info("closed LMDB environment at {path}", path=self.path)

        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @property
    def max_key_size(self):
        """The maximum length of a key in bytes, fixed when LMDB was compiled."""
        self._check_open()
        return self._env.max_key_size()

    def database(self, name):
        """Return the handle of the named database ``name``, which must be in
        ``database_names``."""
        self._check_open()
        return self._databases[name]

    def set_space_reclaimer(self, reclaim):
        """Set the function that frees space when the map passes its high-water mark,
        is full at ``max_map_size``, or the disk is full.

        The writer thread calls ``reclaim(txn, target_bytes, reason, is_enough)`` in a
        write transaction of its own. It should delete about ``target_bytes`` of data, or
        all it can when that is less, and stop early once ``is_enough()`` returns true,
        calling it every few deletions. ``is_enough`` is None when only the bytes count.
        ``reason`` is why space is needed, for the reclaimer's log message. It returns
        ``(freed_bytes, on_commit)``: the bytes of data it deleted and a callable (or
        None) that runs on the reactor thread once the transaction is committed.
        Returning 0 bytes means nothing more can be freed.
        """
        self._reclaimer = reclaim

    def read(self, function, *args):
        """Call ``function(txn, *args)`` in a read transaction on a reader thread.

        Returns a Deferred firing with the function's result. The transaction has
        ``buffers=True``, so values are memoryviews that become invalid when the
        transaction ends: ``function`` must copy what it returns.
        """
        return self._submit(self._run_read, function, *args)

    def read_inline(self, function, *args):
        """Call ``function(txn, *args)`` in a read transaction on the calling thread, which
        must be the reactor thread, as ``read`` does on a reader thread.

        Returns a Deferred that has already fired with the function's result or failed
        with its exception. As in ``read``, values are memoryviews that ``function`` must
        copy before it returns.

        Meant for reads of bounded cost. py-lmdb releases the GIL around every get, so a
        loop of small gets on a reader thread hands the GIL back and forth with the
        reactor thread. Measured with py-lmdb 3.0 on a 2-core VM, 1,000 index lookups
        took 0.36 ms of CPU on one thread and 1.1 ms on each of 4 concurrent threads.
        """
        # NOTE: a page that is not in the page cache is read from disk while the reactor
        # waits, so callers bound the bytes and keys of an inline read.
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        try:
            with self._gate.transaction(), self._env.begin(buffers=True) as txn:
                return defer.succeed(function(txn, *args))
        except Exception:
            return defer.fail()

    def run_in_pool(self, function, *args):
        """Call ``function(*args)`` on a reader thread without a transaction.

        Meant for CPU work that releases the GIL, such as hashing large buffers. Returns
        a Deferred firing with the function's result.
        """
        return self._submit(function, *args)

    def prepare_write(self, size, prepare, *args):
        """Call ``prepare(*args)`` on a reader thread, then queue the write operations it
        returns, from that thread, so the reactor thread is not woken in between.

        ``prepare`` runs without a transaction (it is meant for hashing) and returns
        ``(operations, context)``. The operations are queued as ``write_batch`` queues
        them, with ``size`` as their data bytes. Returns a Deferred firing with
        ``(context, outcomes)``, where ``outcomes`` is the list that ``write_batch``
        would fire with, or failing with the exception of ``prepare``.
        """
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        done = defer.Deferred()
        self._reader_pool.submit(self._run_prepare_write, done, size, prepare, args)
        return done

    def write(self, operation, size=0):
        """Queue ``operation(txn)`` for the writer thread.

        Returns a Deferred firing with the operation's result once its group
        transaction is committed. An exception of ``operation`` rolls back its changes
        alone and fails only its Deferred. The operation may run more than once: again
        in a nested transaction when another operation of its group raised, alone when
        the group failed to commit, and again after a full map was grown or space
        reclaimed. It must therefore change nothing outside the transaction. A map that
        stays full fails the Deferred with ``ResourceExhaustedError``.

        ``size`` is the number of data bytes the operation writes (an estimate is
        enough): a group transaction takes no more queued writes once their sizes add up
        to MAX_BATCH_BYTES.
        """
        return self.write_many([operation], size)[0]

    def write_many(self, operations, size=0):
        """Queue several operations to be applied in the same group transaction, and
        return one Deferred per operation, in order.

        Each operation rolls back alone, as in ``write``, and ``size`` is the data bytes
        they write together. The operations share a transaction even when they are more
        than MAX_BATCH_OPERATIONS or MAX_BATCH_BYTES, unless the group fails to commit
        and each runs alone.
        """
        operations = list(operations)
        deferreds = [defer.Deferred() for _ in operations]
        if not operations:
            return deferreds
        if self._state != _OPEN:
            for deferred in deferreds:
                deferred.errback(self._unavailable())
            return deferreds
        self._enqueue(_QueuedWrite(operations, deferreds, size=size))
        return deferreds

    def write_batch(self, operations, size=0):
        """Queue operations as ``write_many`` does, and return one Deferred for all.

        The Deferred fires with a list of outcomes in the order of ``operations``: each
        operation's result, or a ``Failure`` where it failed. It fails itself only with
        ``UnavailableError`` when the environment is not open.
        """
        operations = list(operations)
        if not operations:
            return defer.succeed([])
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        done = defer.Deferred()
        self._enqueue(_QueuedWrite(operations, [done], collected=True, size=size))
        return done

    def _submit(self, function, *args):
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        done = defer.Deferred()
        self._reader_pool.submit(self._run_in_pool, done, function, args)
        return done

    def _enqueue(self, queued):
        """Queue a write from any thread. Fails its Deferreds when the writer has ended,
        which can happen to a ``prepare_write`` whose preparation outlived ``stop``."""
        with self._queue_condition:
            if not self._writer_exited:
                self._queue.append(queued)
                self._queue_condition.notify()
                return
        self._delivery.post_many(
            queued.deferreds, [Failure(self._unavailable()) for _ in queued.deferreds]
        )

    def _check_open(self):
        if self._state == _CLOSED:
            raise RuntimeError(f"LMDB environment at {self.path} is not started")

    def _unavailable(self):
        return UnavailableError(f"storage at {self.path} is not open: the server is stopping")

    def _run_read(self, function, *args):
        with self._gate.transaction(), self._env.begin(buffers=True) as txn:
            return function(txn, *args)

    def _run_in_pool(self, done, function, args):
        try:
            outcome = function(*args)
        except BaseException:
            outcome = Failure()
        self._delivery.post(done, outcome)

    def _run_prepare_write(self, done, size, prepare, args):
        try:
            operations, context = prepare(*args)
        except BaseException:
            self._delivery.post(done, Failure())
            return
        if not operations:
            self._delivery.post(done, (context, []))
            return

        writing = defer.Deferred()
        # The delivery fires ``writing`` on the reactor thread, so this callback runs there.
        writing.addCallback(lambda outcomes: (context, outcomes)).chainDeferred(done)
        self._enqueue(_QueuedWrite(list(operations), [writing], collected=True, size=size))

    # The writer thread.

    def _run_writer(self):
        try:
            while True:
                batch = self._take_batch()
                if not batch:
                    break
                self._apply_batch(batch)
        finally:
            self._reactor.callFromThread(self._writer_stopped.callback, None)

    def _take_batch(self):
        """Wait for queued writes and return the ``_QueuedWrite`` entries of the next
        group: whole entries, up to MAX_BATCH_OPERATIONS operations and MAX_BATCH_BYTES
        bytes, or fewer in a small map (``space.MapMarks.max_batch_bytes``), unless the
        first entry alone has more.

        Returns an empty list once the environment is stopping and the queue is empty,
        after which nothing more is queued.
        """
        batch = []
        operation_count = 0
        size = 0
        with self._queue_condition:
            while not self._queue and self._state == _OPEN:
                self._queue_condition.wait()
            while self._queue and (
                not batch
                or (
                    operation_count + len(self._queue[0].operations) <= MAX_BATCH_OPERATIONS
                    and size + self._queue[0].size <= self._max_batch_bytes
                )
            ):
                queued = self._queue.popleft()
                batch.append(queued)
                operation_count += len(queued.operations)
                size += queued.size
            if not batch:
                self._writer_exited = True
        return batch

    def _apply_batch(self, batch):
        operations = [operation for queued in batch for operation in queued.operations]
        outcomes = self._apply_with_fallback(operations)
        outcomes = self._retry_after_map_full(operations, outcomes)
        outcomes = self._retry_after_disk_full(
            operations, outcomes, sum(queued.size for queued in batch)
        )
        outcomes = [
            self._translate_failure(outcome) if isinstance(outcome, Failure) else outcome
            for outcome in outcomes
        ]

        deferreds = []
        delivered = []
        position = 0
        for queued in batch:
            count = len(queued.operations)
            if queued.collected:
                deferreds.append(queued.deferreds[0])
                delivered.append(outcomes[position : position + count])
            else:
                deferreds.extend(queued.deferreds)
                delivered.extend(outcomes[position : position + count])
            position += count
        self._delivery.post_many(deferreds, delivered)
        self._evict_above_high_water()

    def _apply_with_fallback(self, operations):
        """Apply ``operations`` in one group transaction, or each alone when the group
        fails to commit. Returns the outcome of each, untranslated."""
        try:
            return self._apply_group(operations)
        except Exception as error:
            # A full map or disk is handled for the whole group by _retry_after_map_full
            # or _retry_after_disk_full, because each write alone would fail too.
            if (
                len(operations) == 1
                or isinstance(error, lmdb.MapFullError)
                or space.disk_full_cause(error, self.path) is not None
            ):
                return [Failure(error) for _ in operations]
            self._reactor.callFromThread(
                self.log.warn,
                "group commit of {count} LMDB writes failed ({error}), "
                "so each write is retried in its own transaction",
                count=len(operations),
                error=error,
            )
            return [self._apply_alone(operation) for operation in operations]

    def _apply_alone(self, operation):
        try:
            return self._apply_group([operation])[0]
        except Exception as error:
            return Failure(error)

    def _apply_group(self, operations):
        """Apply ``operations`` in one write transaction and return the outcome of each:
        its result, or a Failure when it raised.

        The operations first run directly in the group transaction, because for each
        nested transaction LMDB allocates a dirty page list of 2 MiB (``mdb_txn_begin``
        in mdb.c of LMDB 0.9.x). When one raises, that transaction is aborted and the
        group runs again, each operation in a nested transaction. Raises (usually
        ``lmdb.Error``) when the group transaction itself cannot begin or commit.
        """
        try:
            return self._apply_unnested(operations)
        except _OperationFailed as failed:
            if len(operations) == 1:
                return [failed.args[0]]
        return self._apply_nested(operations)

    def _apply_unnested(self, operations):
        """Apply ``operations`` in one write transaction without nesting. Raises
        ``_OperationFailed`` with the Failure, after aborting, when one raises."""
        with self._gate.transaction(), self._env.begin(write=True) as txn:
            try:
                outcomes = [operation(txn) for operation in operations]
                failure = None
            except Exception:
                failure = Failure()
            if failure is not None:
                # Aborts the transaction on the way out of the with block.
                raise _OperationFailed(failure)
            usage = self._count_pages(txn)
        self._page_usage = usage
        return outcomes

    def _apply_nested(self, operations):
        outcomes = []
        with self._gate.transaction(), self._env.begin(write=True) as txn:
            for operation in operations:
                try:
                    with self._env.begin(write=True, parent=txn) as nested:
                        outcomes.append(operation(nested))
                except Exception:
                    outcomes.append(Failure())
            usage = self._count_pages(txn)
        self._page_usage = usage
        return outcomes

    def _count_pages(self, txn):
        return space.count_pages(txn, self._counted_databases)

    # Eviction before the map fills.

    def _evict_above_high_water(self):
        """Evict down to the low mark when the last commit left the map's needed pages
        above the high-water mark.

        Eviction may fail to go below the low mark, because the remaining blobs are
        pinned or open. It then runs again only once the needed pages have grown by the
        distance between the marks, so a map full of pinned blobs is not walked after
        every write.
        """
        marks = self._marks
        usage = self._page_usage
        if self._reclaimer is None or usage is None or usage.needed_pages <= marks.high_pages:
            return
        if usage.needed_pages < self._high_water_retry_pages:
            return

        reason = (
            f"the LMDB map at {self.path} needs {usage.needed_pages * marks.page_size} of "
            f"its maximum {self.max_map_size} bytes (used pages plus room for "
            f"copy-on-write), above its high-water mark of "
            f"{marks.high_pages * marks.page_size} bytes"
        )
        while usage.needed_pages > marks.low_pages:
            excess_bytes = (usage.needed_pages - marks.low_pages) * marks.page_size
            target_bytes = min(excess_bytes, space.MAX_EVICTION_BYTES)
            freed_bytes = self._reclaim_space(target_bytes, reason, marks.low_pages)
            usage = self._page_usage
            if freed_bytes == 0:
                break

        if usage.needed_pages <= marks.low_pages:
            self._high_water_retry_pages = 0
            return
        self._high_water_retry_pages = usage.needed_pages + marks.high_pages - marks.low_pages
        self._reactor.callFromThread(
            self.log.warn,
            "the LMDB map at {path} still needs {needed_bytes} bytes after evicting every "
            "blob that no queued or running action pins and no reader has open, above its "
            "low mark of {low_bytes} bytes; writes fail once the map is full at "
            "{max_map_size} bytes",
            path=self.path,
            needed_bytes=usage.needed_pages * marks.page_size,
            low_bytes=marks.low_pages * marks.page_size,
            max_map_size=self.max_map_size,
        )

    # A full map.

    def _retry_after_map_full(self, operations, outcomes):
        """Make room and apply again the operations that failed with a full map, until
        they succeed or no more room can be made. Returns the updated outcomes."""
        reclaim_bytes = min(FIRST_RECLAIM_BYTES, self.max_map_size // 16)
        while True:
            full = [index for index, outcome in enumerate(outcomes) if _is_map_full(outcome)]
            if not full:
                return outcomes

            grown = self.map_size < self.max_map_size and self._grow_map()
            if not grown:
                reason = (
                    f"the LMDB map at {self.path} is full at its maximum of "
                    f"{self.max_map_size} bytes"
                )
                if self._reclaim_space(reclaim_bytes, reason) == 0:
                    return outcomes
                reclaim_bytes *= 2

            retried = self._apply_with_fallback([operations[index] for index in full])
            for index, outcome in zip(full, retried):
                outcomes[index] = outcome

    def _grow_map(self):
        """Double the map, up to ``max_map_size``. Returns False when the resize fails,
        after which the map keeps its size for the rest of the run."""
        old_size = self.map_size
        new_size = min(self.max_map_size, old_size * 2)
        try:
            with self._gate.exclusive():
                self._env.set_mapsize(new_size)
        except lmdb.Error as error:
            self.max_map_size = old_size
            self._marks = space.MapMarks.for_map(old_size, self._marks.page_size)
            self._max_batch_bytes = min(MAX_BATCH_BYTES, self._marks.max_batch_bytes)
            self._reactor.callFromThread(
                self.log.error,
                "growing the LMDB map at {path} from {old_size} to {new_size} bytes "
                "failed ({error}), so it stays at {old_size} bytes until restart",
                path=self.path,
                old_size=old_size,
                new_size=new_size,
                error=error,
            )
            return False
        self.map_size = self._env.info()["map_size"]
        self._reactor.callFromThread(
            self.log.info,
            "LMDB map at {path} was full, so it grew from {old_size} to {new_size} bytes "
            "(maximum {max_map_size} bytes)",
            path=self.path,
            old_size=old_size,
            new_size=self.map_size,
            max_map_size=self.max_map_size,
        )
        return True

    def _reclaim_space(self, target_bytes, reason, down_to_pages=None):
        """Run the reclaimer for ``target_bytes`` because of ``reason``, stopping early
        once the needed pages are at most ``down_to_pages`` when that is given. Then
        commit one more write so that LMDB can reuse the freed pages. Returns the bytes
        of data freed, 0 when nothing could be."""
        if self._reclaimer is None:
            return 0
        try:
            with self._gate.transaction(), self._env.begin(write=True) as txn:
                is_enough = None
                if down_to_pages is not None:

                    def is_enough():
                        return self._count_pages(txn).needed_pages <= down_to_pages

                freed_bytes, on_commit = self._reclaimer(txn, target_bytes, reason, is_enough)
                usage = self._count_pages(txn)
        except Exception as error:
            self._reactor.callFromThread(
                self.log.error,
                "{reason} and freeing {target_bytes} bytes failed: {error}",
                reason=reason,
                target_bytes=target_bytes,
                error=error,
            )
            return 0
        self._page_usage = usage
        if not freed_bytes:
            return 0
        if on_commit is not None:
            self._reactor.callFromThread(on_commit)

        try:
            with self._gate.transaction(), self._env.begin(write=True) as txn:
                data = txn.get(_RECLAIM_COUNT_KEY, db=self._environment_db)
                count = _UINT64.unpack(data)[0] + 1 if data is not None else 1
                txn.put(_RECLAIM_COUNT_KEY, _UINT64.pack(count), db=self._environment_db)
        except lmdb.Error as error:
            self._reactor.callFromThread(
                self.log.warn,
                "writing the reclaim counter of the LMDB map at {path} failed ({error}), "
                "so the freed pages become reusable one write later",
                path=self.path,
                error=error,
            )
        return freed_bytes

    # A full disk.

    def _retry_after_disk_full(self, operations, outcomes, size):
        """Evict, then apply once more the operations that failed because the disk is
        full, and turn those that fail again into ``ResourceExhaustedError``.

        ``size`` is the data bytes that the operations declared: eviction frees at least
        that, and at least as much as the first round for a full map. Returns the
        updated outcomes.
        """
        full = self._find_disk_full(outcomes)
        if not full:
            return outcomes

        cause = next(iter(full.values()))[0]
        target_bytes = max(size, min(FIRST_RECLAIM_BYTES, self.max_map_size // 16))
        if self._reclaim_space(target_bytes, cause) > 0:
            retried = self._apply_with_fallback([operations[index] for index in full])
            for index, outcome in zip(full, retried):
                outcomes[index] = outcome
            full = self._find_disk_full(outcomes)
            if not full:
                return outcomes

        for index, (cause, error) in full.items():
            outcomes[index] = Failure(self._disk_full_error(cause, error))
        self._reactor.callFromThread(self._disk_full_log.failed, len(full), str(error), cause)
        return outcomes

    def _find_disk_full(self, outcomes):
        """Return ``{index: (cause, error)}`` for the outcomes that failed because the disk
        is full."""
        full = {}
        causes = {}
        for index, outcome in enumerate(outcomes):
            if not isinstance(outcome, Failure) or not outcome.check(lmdb.Error):
                continue
            error = outcome.value
            # A failed group commit gives every operation the same error object.
            if id(error) not in causes:
                causes[id(error)] = space.disk_full_cause(error, self.path)
            if causes[id(error)] is not None:
                full[index] = (causes[id(error)], error)
        return full

    def _disk_full_error(self, cause, error):
        evicted = "" if self._reclaimer is None else " even after evicting unpinned blobs"
        return ResourceExhaustedError(
            f"storage is full: {cause}, so writing to the LMDB environment failed{evicted} "
            f"({error}). Free space on that disk, or set the maximum map size (--map-size) "
            f"below its free space, so that blobs are evicted before the disk fills."
        )

    def _translate_failure(self, failure):
        if failure.check(lmdb.MapFullError):
            return Failure(
                ResourceExhaustedError(
                    f"storage is full: the LMDB map at {self.path} is at its maximum of "
                    f"{self.max_map_size} bytes and no more data can be evicted. Raise the "
                    f"maximum map size (--map-size) or lower the CAS quota (--max-cas-size)."
                )
            )
        return failure
