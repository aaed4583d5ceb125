"""Tests of a full disk under a real ``LmdbBlobStore``.

A child process whose data file cannot grow past a file size limit writes blobs. The
tests check that the store evicts, rejects with RESOURCE_EXHAUSTED only what cannot fit,
and corrupts nothing.
"""

import json
import os
import sys

from twisted.internet import task, utils
from twisted.logger import Logger, formatEvent
from twisted.trial import unittest

from bgrid.storage import space
from tests.storage import disk_full_writer
from tests.util import make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Room in the data file for about a third of the blobs that the writer's fill phase
# uploads, so that phase must evict to finish.
LIMIT_BYTES = 4 << 20


class DiskFullTests(unittest.TestCase):
    timeout = 120

    async def run_writer(self, data_dir):
        """Run ``tests.storage.disk_full_writer`` on ``data_dir`` and return its report."""
        environment = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
        out, err, code = await utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "tests.storage.disk_full_writer", data_dir, str(LIMIT_BYTES)],
            env=environment,
            path=REPOSITORY_ROOT,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        return json.loads(out)

    async def test_full_disk_evicts_then_rejects_pinned_blobs(self):
        data_dir = os.path.join(make_temp_dir(self), "data")
        report = await self.run_writer(data_dir)
        fill_bytes = disk_full_writer.BLOB_COUNT * disk_full_writer.BLOB_BYTES
        self.assertGreater(fill_bytes, 2 * LIMIT_BYTES)

        # Every upload of the fill phase succeeded, because the store evicted
        # least-recently-used blobs when the data file could not grow.
        self.assertEqual(report["fill_errors"], [])
        evictions = [message for message in report["evictions"] if message.startswith("evicted")]
        self.assertTrue(evictions)
        self.assertIn("file size limit", evictions[0])

        # With every blob pinned, nothing can be evicted: uploads fail with
        # RESOURCE_EXHAUSTED naming the data directory, and the process lives on.
        errors = report["pinned_errors"]
        self.assertEqual(len(errors), disk_full_writer.FAILURES_AFTER_FIRST + 1)
        for name, message in errors:
            self.assertEqual(name, "ResourceExhaustedError")
            self.assertIn(data_dir, message)
        self.assertTrue(report["rejected_missing"])

        # Nothing stored is unreadable or wrong, the layout is consistent, and the
        # rejected blob fits once its pins are gone.
        self.assertEqual(report["unreadable"], [])
        self.assertEqual(report["layout_problems"], [])
        self.assertIsNone(report["retry_error"])
        self.assertTrue(report["retry_read_back"])
        self.assertTrue(report["stored"])

        # The failures were logged, each counted once.
        failed = [
            message for message in report["log"] if "failed with RESOURCE_EXHAUSTED" in message
        ]
        self.assertEqual(sum(int(message.split()[0]) for message in failed), len(errors))


class DiskFullLogTests(unittest.TestCase):
    """The log of writes that failed on a full disk: one message at once, then at most
    one per interval, counting the failures in between."""

    def setUp(self):
        self.clock = task.Clock()
        self.messages = []
        self.log = space.DiskFullLog(Logger(observer=self.record), self.clock)

    def record(self, event):
        self.messages.append(formatEvent(event))

    def test_first_failure_logged_at_once(self):
        self.log.failed(2, "mdb_txn_commit: Input/output error", "the disk is full")

        self.assertEqual(len(self.messages), 1)
        self.assertTrue(self.messages[0].startswith("2 LMDB writes failed"))
        self.assertIn("the disk is full", self.messages[0])

    def test_later_failures_summarized_after_interval(self):
        self.log.failed(1, "error", "the disk is full")
        self.clock.advance(1)
        self.log.failed(3, "error", "the disk is full")
        self.log.failed(4, "error", "the disk is full")

        self.assertEqual(len(self.messages), 1)
        self.clock.advance(space.DISK_FULL_LOG_INTERVAL - 1)
        self.assertEqual(len(self.messages), 2)
        self.assertTrue(self.messages[1].startswith("7 LMDB writes failed"))
        self.clock.advance(space.DISK_FULL_LOG_INTERVAL)
        self.assertEqual(len(self.messages), 2)

    def test_flush_writes_pending_count(self):
        self.log.failed(1, "error", "the disk is full")
        self.log.failed(5, "error", "the disk is full")

        self.log.flush()

        self.assertEqual(len(self.messages), 2)
        self.assertTrue(self.messages[1].startswith("5 LMDB writes failed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
