"""Tests that kill a process writing into a real ``LmdbBlobStore`` with SIGKILL and check
what a restart finds: no partial or wrong blob, and a consistent index and total."""

import os
import sys

import lmdb
from twisted.internet import defer, protocol
from twisted.trial import unittest

from bgrid.digest import Digest
from bgrid.storage import cas_layout
from tests.storage.crash_writer import QUOTA
from tests.storage.support import assert_consistent, start_storage
from tests.util import make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _CrashWriterOutput(protocol.ProcessProtocol):
    """Collects the events that ``tests.storage.crash_writer`` prints.

    ``ready`` fires once the child has an unfinished upload and has stored
    ``stored_needed`` blobs. ``ended`` fires when the process is gone.
    """

    def __init__(self, stored_needed):
        self.stored = []
        self.streaming = None
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self._stored_needed = stored_needed
        self._buffer = b""
        self._stderr = []

    def outReceived(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            event, hash_hex, size = line.decode("ascii").split()
            digest = Digest(hash_hex, int(size))
            if event == "streaming":
                self.streaming = digest
            else:
                self.stored.append(digest)
        if (
            not self.ready.called
            and self.streaming is not None
            and len(self.stored) >= self._stored_needed
        ):
            self.ready.callback(None)

    def errReceived(self, data):
        self._stderr.append(data)

    def processEnded(self, reason):
        if not self.ready.called:
            stderr = b"".join(self._stderr).decode("utf-8", "replace")
            self.ready.errback(
                RuntimeError(f"crash writer ended before it was ready: {reason.value}\n{stderr}")
            )
        self.ended.callback(None)


def _count_pending_uploads(data_dir):
    """Return the number of pending uploads in the store at ``data_dir``, read before any
    store opens it and deletes them."""
    env = lmdb.open(data_dir, max_dbs=16)
    try:
        pending = env.open_db(cas_layout.PENDING_DATABASE, create=False)
        with env.begin() as txn:
            return txn.stat(pending)["entries"]
    finally:
        env.close()


def _index_digests(txn, dbs):
    with txn.cursor(db=dbs.index) as cursor:
        return [
            Digest(bytes(key).hex(), cas_layout.IndexRecord.unpack(data).size_bytes)
            for key, data in cursor
        ]


class KillDuringWritesTests(unittest.TestCase):
    timeout = 120

    async def run_until_killed(self, data_dir, stored_needed):
        """Run the crash writer on ``data_dir`` and kill it with SIGKILL once it is ready.

        Returns its ``_CrashWriterOutput``.
        """
        from twisted.internet import reactor

        output = _CrashWriterOutput(stored_needed)
        environment = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
        transport = reactor.spawnProcess(
            output,
            sys.executable,
            [sys.executable, "-m", "tests.storage.crash_writer", data_dir],
            env=environment,
            path=REPOSITORY_ROOT,
        )

        def kill():
            if not output.ended.called:
                transport.signalProcess("KILL")
            return output.ended

        # Also on a timeout, which skips the rest of this method.
        self.addCleanup(kill)
        try:
            await output.ready
        finally:
            await kill()
        return output

    async def test_kill_leaves_no_partial_blob(self):
        data_dir = make_temp_dir(self)

        for stored_needed in (4, 9, 15):
            output = await self.run_until_killed(data_dir, stored_needed)
            self.assertGreaterEqual(_count_pending_uploads(data_dir), 1)

            stack = await start_storage(
                self, data_dir, max_cas_size=QUOTA, cas_low_watermark=0.5
            )
            store = stack.blob_store
            environment = stack.environment
            dbs = cas_layout.CasDatabases.of(environment)

            await assert_consistent(self, store)
            self.assertEqual(await environment.read(cas_layout.count_entries, dbs.pending), 0)
            self.assertLessEqual(store.stored_bytes, QUOTA)
            self.assertEqual(await store.find_missing([output.streaming]), [output.streaming])
            self.assertEqual(await store.find_missing([output.stored[-1]]), [])

            stored = await environment.read(_index_digests, dbs)
            for digest, data in zip(stored, await store.get_many(stored)):
                self.assertIsInstance(data, bytes, f"blob {digest}")
                self.assertEqual(Digest.of(data), digest)
            await stack.stop()
