"""Tests of the action caches: the contract for the LMDB cache alone and behind the
completeness check, and the limits of LMDB keys."""

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.errors import InvalidArgumentError
from bgrid.storage.lmdb_action_cache import LmdbActionCache
from tests.storage.contracts import ActionCacheContract
from tests.storage.support import random_blob, start_storage


class LmdbActionCacheContractTests(ActionCacheContract, unittest.TestCase):
    async def make_action_cache(self):
        stack = await start_storage(self)
        cache = LmdbActionCache(stack.environment)
        cache.start()
        return cache


class CompletenessCheckingActionCacheContractTests(ActionCacheContract, unittest.TestCase):
    async def make_action_cache(self):
        stack = await start_storage(self)
        return stack.action_cache


class LmdbActionCacheKeyTests(unittest.TestCase):
    async def setUp(self):
        stack = await start_storage(self)
        self.cache = stack.action_cache
        self.result = re_pb2.ActionResult(exit_code=0)
        _, self.action = random_blob(140)

    async def test_longest_instance_name_accepted(self):
        name = "é" * 235

        await self.cache.put(name, self.action, self.result)

        self.assertEqual(await self.cache.get(name, self.action), self.result)

    async def test_overlong_instance_name_rejected(self):
        name = "é" * 235 + "x"

        with self.assertRaises(InvalidArgumentError) as caught:
            await self.cache.put(name, self.action, self.result)
        self.assertIn("470 bytes", caught.exception.message)

        with self.assertRaises(InvalidArgumentError):
            await self.cache.get(name, self.action)

    async def test_instance_name_with_nul_rejected(self):
        with self.assertRaises(InvalidArgumentError):
            await self.cache.put("a\x00b", self.action, self.result)
