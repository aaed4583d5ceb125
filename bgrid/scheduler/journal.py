"""Group commit of the scheduler's changed records to an ``ISchedulerStore``.

The scheduler reports every record it creates, changes or deletes to its journal. The
journal collects the names of changed records and, one reactor turn later, encodes their
current state and commits all of them in one store transaction. Every committed state is
therefore the whole in-memory state at the end of some reactor turn. A record deleted from
memory is deleted from the store.

``durable()`` implements the acknowledgement rule: a message to a client or a bot that
shows the scheduler's state may be sent only after a ``durable()`` Deferred requested
after the message was built has fired. A batch may also wait for writes of other stores
(``include``), such as the action cache entry of a result that completes a job, and the
waiters of batches fire in the order the batches were written.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from bgrid.errors import UnavailableError

# Seconds before the first retry of a failed commit, doubled after each further failure
# up to the maximum, so a full disk does not fill the log.
FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 60.0


class _Batch:
    """The changes of one store transaction, the other writes it includes, and the
    Deferreds that wait for all of them."""

    def __init__(self, keys, waiters, included):
        self.keys = keys
        self.waiters = waiters
        self.included = included
        self.ready = False


def _fire(waiters, result):
    for waiter in waiters:
        # A waiter that its caller cancelled has fired already.
        if not waiter.called:
            if isinstance(result, Exception):
                waiter.errback(result)
            else:
                waiter.callback(result)


class Journal:
    """Changed records waiting to be committed, and the commits in progress.

    ``encode(kind, name)`` returns the encoded current state of a record, or None when it
    no longer exists, and runs on the reactor thread when a batch is written. ``clock``
    is an ``IReactorTime`` that schedules the writes.
    """

    log = Logger()

    def __init__(self, store, clock, encode):
        self._store = store
        self._clock = clock
        self._encode = encode
        # Insertion-ordered set of (kind, name) changed since the last batch was written.
        self._changed = {}
        # Deferreds waiting for the batch that will contain the changes in _changed.
        self._waiters = []
        # Deferreds of other writes that the next batch includes (see include).
        self._included = []
        self._in_flight = collections.deque()
        self._write_call = None
        self._retry_delay = FIRST_RETRY_DELAY
        self._failures = 0
        self._stopped = False

    def changed(self, kind, name):
        """Record that the record ``name`` of ``kind`` was created, changed or deleted."""
        self._changed[(kind, name)] = None
        self._schedule_write(0)

    def include(self, written):
        """Make the next batch wait for ``written``, the Deferred of another store's write.

        The waiters of the batch fire only once its own commit has succeeded and
        ``written`` has fired. A failure of ``written`` does not fail them, so its owner
        must handle and log it before calling this. Queue the write before reporting the
        changes that depend on it: the environment commits writes in the order they were
        queued, so those changes are then committed in the same transaction as the write
        or in a later one.
        """
        self._included.append(written)
        self._schedule_write(0)

    def durable(self):
        """Return a Deferred firing with None once every change reported so far is committed.

        It fails with the store's error when a commit that contains one of those changes
        fails. The changes are then written again later, and a new ``durable()`` waits for
        that. After ``stop`` it fails with UnavailableError while changes are unwritten.
        Cancelling the Deferred stops only this wait.
        """
        if (self._changed or self._included) and self._stopped:
            return defer.fail(UnavailableError(
                "the scheduler is stopping, so its latest changes are not stored. Retry "
                "once the server is back"
            ))
        if self._changed or self._included:
            waiter = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        if self._in_flight:
            waiter = defer.Deferred()
            self._in_flight[-1].waiters.append(waiter)
            return waiter
        return defer.succeed(None)

    def flush(self):
        """Write the changed records now instead of on the next reactor turn.

        Returns ``durable()``.
        """
        self._cancel_write_call()
        if self._changed or self._included:
            self._write_batch()
        return self.durable()

    def stop(self):
        """Write the changed records now and stop scheduling writes and retries.

        Returns a Deferred firing with None once they are committed, or once the commit
        failed, which is logged. Changes reported later stay in memory.
        """
        self._stopped = True
        flushed = self.flush()
        return flushed.addErrback(lambda _failure: None)

    def _schedule_write(self, delay):
        if self._write_call is not None or self._stopped:
            return
        self._write_call = self._clock.callLater(delay, self._write_scheduled)

    def _cancel_write_call(self):
        if self._write_call is not None and self._write_call.active():
            self._write_call.cancel()
        self._write_call = None

    def _write_scheduled(self):
        self._write_call = None
        if self._changed or self._included:
            self._write_batch()

    def _write_batch(self):
        keys = list(self._changed)
        self._changed = {}
        batch = _Batch(keys, self._waiters, self._included)
        self._waiters = []
        self._included = []
        self._in_flight.append(batch)
        # maybeDeferred turns an encoding error into a failed commit, handled like any other.
        committing = defer.maybeDeferred(self._commit, keys)
        committing.addCallbacks(
            self._committed, self._commit_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )

    def _commit(self, keys):
        changes = [(kind, name, self._encode(kind, name)) for kind, name in keys]
        return self._store.commit(changes)

    def _committed(self, _, batch):
        if self._failures:
            self.log.info(
                "Committed scheduler records again after {failures} failed commits",
                failures=self._failures,
            )
        self._failures = 0
        self._retry_delay = FIRST_RETRY_DELAY
        if not batch.included:
            self._release(batch)
            return
        included = defer.DeferredList(batch.included, consumeErrors=True)
        included.addCallback(lambda _: self._release(batch))

    def _release(self, batch):
        """Mark a batch as committed and fire the waiters of the leading committed batches.

        Waiters fire in batch order, because a later batch's waiters were promised the
        changes of the earlier ones too.
        """
        batch.ready = True
        while self._in_flight and self._in_flight[0].ready:
            _fire(self._in_flight.popleft().waiters, None)

    def _commit_failed(self, failure, batch):
        """Put the batch's records back among the changed ones and schedule a retry.

        The waiters of later batches fail too, because they were promised that this
        batch's changes were committed as well.
        """
        position = self._in_flight.index(batch)
        failed = [self._in_flight[index] for index in range(position, len(self._in_flight))]
        self._in_flight.remove(batch)
        for key in batch.keys:
            self._changed.setdefault(key, None)
        self._included.extend(batch.included)
        self._failures += 1
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_DELAY)
        self.log.failure(
            "Failed to commit {count} scheduler records (failure {failures} in a row), so "
            "the clients and bots waiting for them get an error. Retrying in {delay} seconds",
            failure,
            count=len(batch.keys),
            failures=self._failures,
            delay=delay,
        )
        for failed_batch in failed:
            waiters, failed_batch.waiters = failed_batch.waiters, []
            _fire(waiters, failure.value)
        self._cancel_write_call()
        self._schedule_write(delay)
        # The failed batch no longer holds back the waiters of committed later ones.
        if self._in_flight and self._in_flight[0].ready:
            self._release(self._in_flight[0])


class NullJournal:
    """The journal of a scheduler without a store: nothing is written, and a change is
    durable once the writes of other stores that it includes have fired."""

    def __init__(self):
        self._included = []

    def changed(self, kind, name):
        """Do nothing."""

    def include(self, written):
        """Make ``durable()`` wait for ``written``, as ``Journal.include`` does."""
        self._included.append(written)

    def durable(self):
        """Return a Deferred firing with None once every included write has fired."""
        self._included = [written for written in self._included if not written.called]
        if not self._included:
            return defer.succeed(None)
        included = defer.DeferredList(self._included, consumeErrors=True)
        return included.addCallback(lambda _: None)

    def flush(self):
        """Return ``durable()``."""
        return self.durable()

    def stop(self):
        """Return a Deferred that has fired with None."""
        return defer.succeed(None)
