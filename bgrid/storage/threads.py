"""The threads of ``LmdbEnvironment``: the gate that keeps transactions out of a map
resize, the reader pool, and the delivery of outcomes to the reactor thread."""

import contextlib
import queue
import threading

from twisted.python.failure import Failure


class TransactionGate:
    """A gate that lets any number of transactions run at once, or a map resize alone.

    LMDB allows ``mdb_env_set_mapsize`` only while no transaction of the process is
    active, and does not check it (lmdb.h of LMDB 0.9.x), so every transaction of the
    environment enters this gate and the resize waits for all of them to leave.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextlib.contextmanager
    def transaction(self):
        """Hold the gate open for one transaction, waiting while a resize runs."""
        with self._condition:
            while self._resizing:
                self._condition.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._condition:
                self._active -= 1
                if self._active == 0:
                    self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        """Close the gate to new transactions and wait until the active ones end."""
        with self._condition:
            self._resizing = True
            while self._active:
                self._condition.wait()
        try:
            yield
        finally:
            with self._condition:
                self._resizing = False
                self._condition.notify_all()


class OutcomeDelivery:
    """Fires Deferreds on the reactor thread with outcomes computed on storage threads.

    Each ``callFromThread`` wakes the reactor through a pipe, so outcomes posted while a
    delivery is already scheduled join it instead of scheduling another one.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._lock = threading.Lock()
        self._pending = []

    def post(self, deferred, outcome):
        """Fire ``deferred`` with ``outcome`` (a ``Failure`` errbacks) on the reactor
        thread. Callable from any thread."""
        with self._lock:
            self._pending.append((deferred, outcome))
            scheduled = len(self._pending) > 1
        if not scheduled:
            self._reactor.callFromThread(self._deliver)

    def post_many(self, deferreds, outcomes):
        """Post each outcome to the Deferred at the same position."""
        with self._lock:
            scheduled = bool(self._pending)
            self._pending.extend(zip(deferreds, outcomes))
        if not scheduled:
            self._reactor.callFromThread(self._deliver)

    def _deliver(self):
        with self._lock:
            pending, self._pending = self._pending, []
        for deferred, outcome in pending:
            if isinstance(outcome, Failure):
                deferred.errback(outcome)
            else:
                deferred.callback(outcome)


class ReaderPool:
    """A fixed set of threads that run read transactions and CPU work such as hashing.

    Lighter than ``twisted.python.threadpool.ThreadPool``: a job is one queue entry and
    its outcome goes through ``OutcomeDelivery``, with no context tracking.
    """

    def __init__(self, size, name):
        self._jobs = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(size)
        ]

    def start(self):
        for thread in self._threads:
            thread.start()

    def submit(self, function, *args):
        """Call ``function(*args)`` on a pool thread. It must not raise."""
        self._jobs.put((function, args))

    def stop(self):
        """Let the threads finish the jobs queued so far, then wait for them to end."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            function, args = job
            function(*args)
