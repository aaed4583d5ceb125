"""Tests of the daemon's start-up (data directory locking, start failures, local bots) and
of its gRPC message limits."""

import hashlib
import os
import socket
import subprocess

import grpc
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid.bridge import as_deferred
from bgrid.server import SMALLEST_FITTING_BLOB, StartupError, local_address, lock_data_dir
from tests.e2e.harness import REPOSITORY_ROOT, Grid, daemon_command, find_free_port, read_text
from tests.util import async_test, make_temp_dir

# Seconds a daemon that cannot start may take to exit.
FAILED_START_TIMEOUT = 30


class LocalAddressTests(unittest.TestCase):
    def test_addresses(self):
        cases = [
            ("127.0.0.1:50051", 50051, "127.0.0.1:50051"),
            ("0.0.0.0:0", 41000, "127.0.0.1:41000"),
            ("[::]:50051", 50051, "[::1]:50051"),
            ("[::1]:50051", 50051, "[::1]:50051"),
            ("10.1.2.3:9000", 9000, "10.1.2.3:9000"),
            ("unix:/run/bgrid.sock", 0, "unix:/run/bgrid.sock"),
        ]
        for listen, port, expected in cases:
            with self.subTest(listen=listen):
                self.assertEqual(local_address(listen, port), expected)


class DataDirLockTests(unittest.TestCase):
    def test_second_lock_refused_with_pid(self):
        data_dir = make_temp_dir(self)
        first = lock_data_dir(data_dir)
        self.addCleanup(first.close)

        with self.assertRaises(StartupError) as caught:
            lock_data_dir(data_dir)

        self.assertIn(f"pid {os.getpid()}", str(caught.exception))
        self.assertIn(data_dir, str(caught.exception))

    def test_lock_released_on_close(self):
        data_dir = make_temp_dir(self)
        lock_data_dir(data_dir).close()

        lock_data_dir(data_dir).close()


class FailedStartTests(unittest.TestCase):
    """A daemon that cannot start exits with status 1, so systemd restarts or reports it."""

    def run_daemon(self, port, data_dir):
        base_dir = make_temp_dir(self)
        log_path = os.path.join(base_dir, "daemon.log")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
        completed = subprocess.run(
            daemon_command(port, data_dir, log_path),
            cwd=base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=FAILED_START_TIMEOUT,
        )
        return completed.returncode, read_text(log_path)

    def test_port_taken(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        status, log = self.run_daemon(port, make_temp_dir(self))

        self.assertEqual(status, 1)
        self.assertIn("bgrid failed to start", log)

    def test_data_dir_in_use(self):
        grid = Grid(make_temp_dir(self), bot_count=0)
        self.addCleanup(grid.stop)
        grid.start()
        data_dir = os.path.join(grid.base_dir, "data")

        status, log = self.run_daemon(find_free_port(), data_dir)

        self.assertEqual(status, 1)
        self.assertIn(f"is in use by another bgrid daemon (pid {grid.daemon.pid})", log)
        self.assertTrue(grid.daemon.is_running())


def _digest_of(data):
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class BatchLimitTests(unittest.TestCase):
    """A batch of the advertised ``max_batch_total_size_bytes`` fits through the daemon's
    gRPC message limits, and a response of one blob that large fits a default client."""

    def setUp(self):
        self.grid = Grid(make_temp_dir(self), bot_count=0)
        self.addCleanup(self.grid.stop)
        self.grid.start()

    async def max_batch_bytes(self, channel):
        capabilities = remote_execution_pb2_grpc.CapabilitiesStub(channel)
        response = await capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest())
        return response.cache_capabilities.max_batch_total_size_bytes

    @async_test
    async def test_one_blob_of_batch_limit(self):
        # Default channel options: at most 4 MiB received.
        channel = grpc.aio.insecure_channel(self.grid.address)
        self.addCleanup(lambda: as_deferred(channel.close()))
        cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
        data = os.urandom(await self.max_batch_bytes(channel))
        digest = _digest_of(data)

        updated = await cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]
            )
        )
        read = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))

        self.assertEqual(updated.responses[0].status.code, 0)
        self.assertEqual(read.responses[0].status.code, 0)
        self.assertEqual(read.responses[0].data, data)

    @async_test
    async def test_full_batch_of_small_blobs(self):
        # The client accepts any response size, so only the daemon's limits count.
        channel = grpc.aio.insecure_channel(
            self.grid.address, options=[("grpc.max_receive_message_length", -1)]
        )
        self.addCleanup(lambda: as_deferred(channel.close()))
        cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
        limit = await self.max_batch_bytes(channel)
        blobs = [
            b"%d:" % number + bytes(SMALLEST_FITTING_BLOB - len(b"%d:" % number))
            for number in range(limit // SMALLEST_FITTING_BLOB)
        ]
        digests = [_digest_of(data) for data in blobs]
        self.assertEqual(sum(len(data) for data in blobs), limit)

        updated = await cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                requests=[
                    re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)
                    for digest, data in zip(digests, blobs)
                ]
            )
        )
        read = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))

        self.assertEqual({response.status.code for response in updated.responses}, {0})
        self.assertEqual({response.status.code for response in read.responses}, {0})
        self.assertEqual([response.data for response in read.responses], blobs)
