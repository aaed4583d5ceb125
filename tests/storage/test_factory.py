"""Tests of ``build_storage`` and the ``StorageStack`` service it returns."""

import os

from twisted.internet import task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from bgrid.interfaces import IActionCache, IBlobStore
from bgrid.storage.completeness import CompletenessCheckingActionCache
from bgrid.storage.factory import build_storage
from tests.storage.support import random_blob
from tests.util import make_temp_dir


class BuildStorageTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = os.path.join(make_temp_dir(self), "data")
        self.stack = build_storage(self.data_dir, map_size=1 << 30, clock=task.Clock())

    def test_nothing_opened_when_built(self):
        self.assertFalse(os.path.exists(self.data_dir))

    def test_stack_provides_interfaces(self):
        self.assertTrue(verifyObject(IBlobStore, self.stack.blob_store))
        self.assertTrue(verifyObject(IActionCache, self.stack.action_cache))
        self.assertIsInstance(self.stack.action_cache, CompletenessCheckingActionCache)

    async def test_service_start_and_stop(self):
        data, digest = random_blob(100)

        self.stack.startService()
        self.assertTrue(self.stack.running)
        await self.stack.blob_store.put(digest, data)
        await self.stack.stopService()

        self.assertFalse(self.stack.running)
        restarted = build_storage(self.data_dir, map_size=1 << 30, clock=task.Clock())
        await restarted.start()
        self.addCleanup(restarted.stop)
        self.assertEqual(await restarted.blob_store.get(digest), data)
