"""The one LMDB environment of a bgrid server, with its single writer thread and its reader
thread pool."""

import collections
import os
import threading

import lmdb
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from bgrid.errors import ResourceExhaustedError, UnavailableError

DEFAULT_MAP_SIZE = 1 << 40
DEFAULT_READER_THREADS = 4

# Reader slots beyond one per pool thread, for tools such as mdb_stat and mdb_copy, which
# take a slot while they run against the live database.
RESERVED_READER_SLOTS = 8

# Upper bound on the operations applied in one group transaction, so a burst of writes
# cannot grow one transaction's dirty page list without limit.
MAX_BATCH_OPERATIONS = 256

_CLOSED, _OPEN, _STOPPING = "closed", "open", "stopping"


class _QueuedWrite:
    """Write operations that must share a group transaction, with the Deferreds of their
    caller."""

    __slots__ = ("operations", "deferreds")

    def __init__(self, operations, deferreds):
        self.operations = operations
        self.deferreds = deferreds


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
    transaction (group commit), each operation in its own nested transaction so that a
    failing operation rolls back alone. Reads run on a small thread pool, one read
    transaction per call. Every Deferred returned here fires on the reactor thread.
    """

    log = Logger()

    def __init__(
        self,
        path,
        database_names,
        map_size=DEFAULT_MAP_SIZE,
        reader_threads=DEFAULT_READER_THREADS,
        reactor=None,
    ):
        """Describe the environment. Nothing is opened until ``start``.

        ``path`` is the data directory, created if missing. ``database_names`` are the
        byte names of the named databases to open. ``map_size`` is the maximum size of
        the data file in bytes, and a large map costs nothing until used because the
        file is sparse. ``reactor`` provides ``callFromThread`` (the global reactor by
        default).
        """
        if reader_threads < 1:
            raise ValueError(f"reader_threads must be at least 1, got {reader_threads}")
        self.path = path
        self.map_size = map_size
        self.reader_threads = reader_threads
        self._database_names = tuple(database_names)
        self._reactor = reactor
        self._state = _CLOSED
        self._env = None
        self._databases = {}
        self._reader_pool = None
        self._writer_thread = None
        self._queue = collections.deque()
        self._queue_condition = threading.Condition()
        self._writer_stopped = None
        self._closed_waiters = []

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
        self._env = lmdb.open(
            self.path,
            map_size=self.map_size,
            max_dbs=len(self._database_names),
            max_readers=self.reader_threads + RESERVED_READER_SLOTS,
            sync=True,
            metasync=False,
        )
        try:
            for name in self._database_names:
                self._databases[name] = self._env.open_db(name)
        except lmdb.Error:
            self._env.close()
            self._env = None
            raise

        self._reader_pool = ThreadPool(
            minthreads=1, maxthreads=self.reader_threads, name="bgrid-lmdb-reader"
        )
        self._reader_pool.start()

        self._writer_stopped = defer.Deferred()
        self._writer_thread = threading.Thread(
            target=self._run_writer, name="bgrid-lmdb-writer", daemon=True
        )
        self._state = _OPEN
        self._writer_thread.start()
        self.log.info(
            "opened LMDB environment at {path} with a map size of {map_size} bytes",
            path=self.path,
            map_size=self.map_size,
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

    def read(self, function, *args):
        """Call ``function(txn, *args)`` in a read transaction on a reader thread.

        Returns a Deferred firing with the function's result. The transaction has
        ``buffers=True``, so values are memoryviews that become invalid when the
        transaction ends: ``function`` must copy what it returns.
        """
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        return threads.deferToThreadPool(
            self._reactor, self._reader_pool, self._run_read, function, args
        )

    def run_in_pool(self, function, *args):
        """Call ``function(*args)`` on a reader thread without a transaction.

        Meant for CPU work that releases the GIL, such as hashing large buffers. Returns
        a Deferred firing with the function's result.
        """
        if self._state != _OPEN:
            return defer.fail(self._unavailable())
        return threads.deferToThreadPool(self._reactor, self._reader_pool, function, *args)

    def write(self, operation):
        """Queue ``operation(txn)`` for the writer thread.

        Returns a Deferred firing with the operation's result once its group
        transaction is committed. ``operation`` runs in a nested write transaction, so
        an exception rolls back its changes alone and fails only its Deferred. When the
        group fails to commit, each of its operations runs again alone in its own
        transaction, so an operation must change nothing outside the transaction.
        A full map fails the Deferred with ``ResourceExhaustedError``.
        """
        return self.write_many([operation])[0]

    def write_many(self, operations):
        """Queue several operations to be applied in the same group transaction, and
        return one Deferred per operation, in order.

        Each operation still runs in its own nested transaction, as in ``write``. The
        operations share a transaction even when they are more than
        MAX_BATCH_OPERATIONS, unless the group fails to commit and each runs alone.
        """
        operations = list(operations)
        deferreds = [defer.Deferred() for _ in operations]
        if not operations:
            return deferreds
        if self._state != _OPEN:
            for deferred in deferreds:
                deferred.errback(self._unavailable())
            return deferreds

        with self._queue_condition:
            self._queue.append(_QueuedWrite(operations, deferreds))
            self._queue_condition.notify()
        return deferreds

    def _check_open(self):
        if self._state == _CLOSED:
            raise RuntimeError(f"LMDB environment at {self.path} is not started")

    def _unavailable(self):
        return UnavailableError(f"storage at {self.path} is not open: the server is stopping")

    def _run_read(self, function, args):
        with self._env.begin(buffers=True) as txn:
            return function(txn, *args)

    # The writer thread.

    def _run_writer(self):
        try:
            while True:
                operations, deferreds = self._take_batch()
                if not operations:
                    break
                self._apply_batch(operations, deferreds)
        finally:
            self._reactor.callFromThread(self._writer_stopped.callback, None)

    def _take_batch(self):
        """Wait for queued writes and return the operations and Deferreds of the next
        group: whole queue entries, up to MAX_BATCH_OPERATIONS operations unless the
        first entry alone has more.

        Returns empty lists once the environment is stopping and the queue is empty.
        """
        operations = []
        deferreds = []
        with self._queue_condition:
            while not self._queue and self._state == _OPEN:
                self._queue_condition.wait()
            while self._queue and (
                not operations
                or len(operations) + len(self._queue[0].operations) <= MAX_BATCH_OPERATIONS
            ):
                queued = self._queue.popleft()
                operations.extend(queued.operations)
                deferreds.extend(queued.deferreds)
        return operations, deferreds

    def _apply_batch(self, operations, deferreds):
        try:
            outcomes = self._apply_group(operations)
        except Exception as error:
            if len(operations) == 1:
                outcomes = [Failure(self._translate_error(error))]
            else:
                self._reactor.callFromThread(
                    self.log.warn,
                    "group commit of {count} LMDB writes failed ({error}), "
                    "so each write is retried in its own transaction",
                    count=len(operations),
                    error=error,
                )
                outcomes = [self._apply_alone(operation) for operation in operations]

        for deferred, outcome in zip(deferreds, outcomes):
            if isinstance(outcome, Failure):
                self._reactor.callFromThread(deferred.errback, outcome)
            else:
                self._reactor.callFromThread(deferred.callback, outcome)

    def _apply_alone(self, operation):
        try:
            return self._apply_group([operation])[0]
        except Exception as error:
            return Failure(self._translate_error(error))

    def _apply_group(self, operations):
        """Apply ``operations`` in one write transaction and return the outcome of each:
        its result, or a Failure when it raised.

        Raises (usually ``lmdb.Error``) when the group transaction itself cannot begin or
        commit.
        """
        outcomes = []
        with self._env.begin(write=True) as txn:
            for operation in operations:
                try:
                    with self._env.begin(write=True, parent=txn) as nested:
                        outcomes.append(operation(nested))
                except lmdb.Error as error:
                    outcomes.append(Failure(self._translate_error(error)))
                except Exception:
                    outcomes.append(Failure())
        return outcomes

    def _translate_error(self, error):
        if isinstance(error, lmdb.MapFullError):
            return ResourceExhaustedError(
                f"storage is full: the LMDB map at {self.path} is limited to "
                f"{self.map_size} bytes. Raise map_size (the --max-cas-size option) "
                f"or free space."
            )
        return error
