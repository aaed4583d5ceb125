"""Tests of ``as_future`` and ``as_awaitable`` on Twisted's asyncio reactor."""

import asyncio
import gc

from twisted.internet import defer
from twisted.trial import unittest

from bgrid.bridge import as_awaitable, as_future
from tests.util import async_test


class AsFutureTests(unittest.TestCase):
    @async_test
    async def test_fired_deferred_gives_done_future(self):
        future = as_future(defer.succeed("result"))

        self.assertTrue(future.done())
        self.assertEqual(await future, "result")

    @async_test
    async def test_failed_deferred_gives_failed_future(self):
        future = as_future(defer.fail(ValueError("bad value")))

        self.assertTrue(future.done())
        with self.assertRaises(ValueError):
            await future

    @async_test
    async def test_plain_value_gives_done_future(self):
        future = as_future(7)

        self.assertEqual(await future, 7)

    @async_test
    async def test_pending_deferred_resolves_later(self):
        deferred = defer.Deferred()
        future = as_future(deferred)
        self.assertFalse(future.done())

        asyncio.get_running_loop().call_soon(deferred.callback, "later")

        self.assertEqual(await future, "later")

    @async_test
    async def test_cancelled_future_cancels_deferred(self):
        cancelled = []
        deferred = defer.Deferred(canceller=cancelled.append)
        future = as_future(deferred)
        # Done callbacks run in the order they were added, so this one runs after the
        # callback of as_future that cancels the Deferred.
        callbacks_ran = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: callbacks_ran.set_result(None))

        future.cancel()
        await callbacks_ran

        self.assertTrue(future.cancelled())
        self.assertEqual(cancelled, [deferred])
        # The CancelledError of the Deferred is consumed, not set on the cancelled future.
        self.assertIsNone(self.successResultOf(deferred))


class AsAwaitableTests(unittest.TestCase):
    @async_test
    async def test_fired_deferred_returned_itself(self):
        deferred = defer.succeed("result")

        awaitable = as_awaitable(deferred)

        self.assertIs(awaitable, deferred)
        self.assertEqual(await awaitable, "result")

    @async_test
    async def test_failed_deferred_raises_when_awaited(self):
        deferred = defer.fail(ValueError("bad value"))

        with self.assertRaises(ValueError):
            await as_awaitable(deferred)

        # Awaiting handled the failure, so garbage collection logs no unhandled error.
        del deferred
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    @async_test
    async def test_pending_deferred_gives_future(self):
        deferred = defer.Deferred()

        awaitable = as_awaitable(deferred)
        asyncio.get_running_loop().call_soon(deferred.callback, "later")

        self.assertIsInstance(awaitable, asyncio.Future)
        self.assertEqual(await awaitable, "later")

    @async_test
    async def test_paused_deferred_gives_future(self):
        inner = defer.Deferred()
        outer = defer.succeed(None)
        outer.addCallback(lambda _: inner)

        awaitable = as_awaitable(outer)
        asyncio.get_running_loop().call_soon(inner.callback, "chained")

        self.assertIsInstance(awaitable, asyncio.Future)
        self.assertEqual(await awaitable, "chained")

    @async_test
    async def test_plain_value_gives_future(self):
        self.assertEqual(await as_awaitable(7), 7)
