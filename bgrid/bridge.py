"""The one bridge between Twisted Deferreds and asyncio futures.

bgrid runs Twisted's asyncio reactor, so the reactor thread and the event loop on which
grpc.aio serves are the same thread. Async servicers await Deferreds through
``as_future``, or ``as_awaitable`` on paths where most Deferreds have already fired.
Twisted code that must wait on a coroutine wraps it with ``as_deferred``.
"""

import asyncio
import functools

from twisted.internet import defer


def as_future(deferred):
    """Return an asyncio future that resolves as ``deferred`` fires.

    Call it on the event loop's thread. Cancelling the future cancels the Deferred. A
    Deferred that has already fired gives a future that is already done, and no
    callback is scheduled on the loop for it.
    """
    future = asyncio.get_running_loop().create_future()
    if not isinstance(deferred, defer.Deferred):
        future.set_result(deferred)
        return future

    deferred.addCallbacks(
        _set_result, _set_exception, callbackArgs=(future,), errbackArgs=(future,)
    )
    if not future.done():
        future.add_done_callback(functools.partial(_cancel_if_cancelled, deferred))
    return future


def as_awaitable(deferred):
    """Return an awaitable for the result of ``deferred``, for a coroutine on the event loop.

    A Deferred that has fired is returned itself, because awaiting it returns its result
    or raises its exception without suspending, and no future is created. Any other
    Deferred goes through ``as_future``. Unlike ``as_future``, this does not consume the
    result of a fired Deferred until the caller awaits it, so await what it returns.
    """
    if isinstance(deferred, defer.Deferred) and deferred.called and not deferred.paused:
        return deferred
    return as_future(deferred)


def _set_result(result, future):
    if not future.cancelled():
        future.set_result(result)


def _set_exception(failure, future):
    if not future.cancelled():
        future.set_exception(failure.value)


def _cancel_if_cancelled(deferred, future):
    if future.cancelled():
        deferred.cancel()


def as_deferred(awaitable):
    """Return a Deferred that fires with the result of a coroutine or future.

    The coroutine is scheduled on the running event loop; cancelling the Deferred cancels it.
    """
    return defer.Deferred.fromFuture(asyncio.ensure_future(awaitable))
