"""Event-driven subscriptions to operation changes, for Execute and WaitExecution streams."""

from twisted.internet import defer


class OperationWatch:
    """A subscription to one operation, returned by ``Scheduler.watch_operation``.

    Call ``next`` in a loop: the first call fires at once with the current Operation
    message, and each later call fires when the stage changes or the operation completes.
    Changes that happen between two calls, or while the state to be sent is committed, are
    merged. So the watcher always gets the latest state, but it may skip a stage that it
    was too slow to see or that lasted less than a commit. A message is delivered only
    once the state it shows is durable. Once the done operation was sent, ``next`` fires with
    None.
    The messages are shared between watchers and must not be modified.
    """

    def __init__(self, registry, operation):
        self.operation_name = operation.name
        self._registry = registry
        self._latest = operation.to_message()
        self._latest_key = (operation.stage, operation.done)
        self._sent_key = None
        self._pending = None
        self._closed = False
        self._error = None

    def next(self):
        """Return a Deferred firing with the next Operation message, or None at the end.

        Raises RuntimeError when the Deferred of the previous call has not fired yet.
        Cancelling the returned Deferred is allowed and leaves the watch usable.
        """
        if self._pending is not None:
            raise RuntimeError(
                f"watch of operation {self.operation_name}: next() called while the "
                "previous call is still waiting"
            )
        if self._error is not None:
            return defer.fail(self._error)
        if self._closed or self._sent_done():
            return defer.succeed(None)
        if self._latest_key != self._sent_key:
            return self._when_durable(self._take_latest())
        self._pending = defer.Deferred(canceller=self._forget_pending)
        return self._pending.addCallback(self._when_durable)

    def close(self):
        """Stop watching, for a client that went away. Safe to call more than once."""
        self._closed = True
        self._registry.discard(self)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.callback(None)

    def _sent_done(self):
        return self._sent_key is not None and self._sent_key[1]

    def _when_durable(self, message):
        if message is None:
            return None
        return self._registry.durable().addCallback(self._send_latest_durable, message)

    def _send_latest_durable(self, _, message):
        """Return ``message``, whose state is durable now, or a newer one once it is.

        A state published while the previous one was being committed replaces it, so a
        stage that lasted less than a commit is not sent.
        """
        if self._latest_key == self._sent_key or self._closed:
            return message
        newer = self._take_latest()
        return self._registry.durable().addCallback(self._send_latest_durable, newer)

    def _take_latest(self):
        self._sent_key = self._latest_key
        return self._latest

    def _forget_pending(self, deferred):
        if self._pending is deferred:
            self._pending = None

    def _update(self, message, key):
        """Store the operation's new state and fire a waiting ``next`` call."""
        self._latest = message
        self._latest_key = key
        pending = self._pending
        if pending is not None and key != self._sent_key:
            self._pending = None
            pending.callback(self._take_latest())

    def _fail(self, error):
        """End the watch with ``error``, as when the scheduler stops."""
        self._error = error
        self._registry.discard(self)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.errback(error)


class WatchRegistry:
    """The open watches of each operation, which the scheduler notifies of changes.

    ``durable()`` returns a Deferred that fires once every state change made so far is
    durable, and each message waits for one requested after the message was built.
    """

    def __init__(self, durable=None):
        self._watches = {}
        # Operation name -> Deferreds of when_done calls.
        self._done_waiters = {}
        self.durable = durable if durable is not None else (lambda: defer.succeed(None))

    def add(self, operation):
        """Return a new watch of an operation record.

        A watch of a done operation is not registered, because it will not change again.
        """
        watch = OperationWatch(self, operation)
        if not operation.done:
            self._watches.setdefault(operation.name, set()).add(watch)
        return watch

    def when_done(self, operation):
        """Return a Deferred firing with None once the operation record is done.

        It does not wait until the completion is durable. It fires at once for a done
        operation, and with None as well when ``fail_all`` ends the watches.
        """
        if operation.done:
            return defer.succeed(None)
        name = operation.name

        def forget(deferred):
            waiters = self._done_waiters.get(name, [])
            if deferred in waiters:
                waiters.remove(deferred)
                if not waiters:
                    del self._done_waiters[name]

        waiter = defer.Deferred(canceller=forget)
        self._done_waiters.setdefault(name, []).append(waiter)
        return waiter

    def discard(self, watch):
        watches = self._watches.get(watch.operation_name)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.operation_name]

    def publish(self, operation):
        """Send the new state of an operation record to its watches.

        A done operation ends the registration, and each watch keeps its message until sent.
        """
        if operation.done:
            watches = self._watches.pop(operation.name, set())
            for waiter in self._done_waiters.pop(operation.name, ()):
                waiter.callback(None)
        else:
            watches = set(self._watches.get(operation.name, ()))
        if not watches:
            return
        message = operation.to_message()
        key = (operation.stage, operation.done)
        for watch in watches:
            watch._update(message, key)

    def fail_all(self, error):
        """End every open watch with ``error``, and fire every ``when_done`` Deferred."""
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch._fail(error)
        self._watches.clear()
        done_waiters, self._done_waiters = self._done_waiters, {}
        for waiters in done_waiters.values():
            for waiter in waiters:
                waiter.callback(None)
