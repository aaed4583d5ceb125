"""The one bridge between Twisted Deferreds and asyncio futures.

bgrid runs Twisted's asyncio reactor, so the reactor thread and the event loop on which
grpc.aio serves are the same thread. Async servicers await Deferreds through
``as_future``; Twisted code that must wait on a coroutine wraps it with ``as_deferred``.
"""

import asyncio

from twisted.internet import defer


def as_future(deferred):
    """Return an asyncio future that resolves as ``deferred`` fires.

    Call it on the event loop's thread. Cancelling the future cancels the Deferred.
    """
    if not isinstance(deferred, defer.Deferred):
        deferred = defer.succeed(deferred)
    return deferred.asFuture(asyncio.get_running_loop())


def as_deferred(awaitable):
    """Return a Deferred that fires with the result of a coroutine or future.

    The coroutine is scheduled on the running event loop; cancelling the Deferred cancels it.
    """
    return defer.Deferred.fromFuture(asyncio.ensure_future(awaitable))
