"""A real grpc.aio server with the CAS, ByteStream, ActionCache and Capabilities
servicers over LMDB storage in a temporary directory, for the servicer tests."""

import os

import grpc
from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.google.bytestream import bytestream_pb2_grpc
from bgrid.bridge import as_deferred, as_future
from bgrid.digest import Digest
from bgrid.servicers.action_cache import ActionCacheServicer
from bgrid.servicers.base import InstanceNames
from bgrid.servicers.bytestream import ByteStreamServicer
from bgrid.servicers.capabilities import CapabilitiesServicer
from bgrid.servicers.cas import ContentAddressableStorageServicer
from bgrid.storage.factory import build_storage
from tests.util import make_temp_dir

MiB = 1024 * 1024

# Small limits, so that tests can exceed them with little data.
MAX_BATCH_TOTAL_SIZE_BYTES = 256 * 1024
MAX_TREE_PAGE_SIZE = 50
READ_CHUNK_SIZE_BYTES = 64 * 1024
RESUME_TIMEOUT_SECONDS = 30.0
MAX_INLINE_TOTAL_BYTES = 1000

INSTANCE_NAMES = ("", "main", "projects/p/instances/main")


def make_blob(size, seed=b""):
    """Return ``(data, digest)`` for ``size`` random bytes."""
    data = seed + os.urandom(max(0, size - len(seed)))
    return data, Digest.of(data)


def digest_proto(digest):
    return digest.to_proto(re_pb2.Digest)


class ServicerTestCase(unittest.TestCase):
    """Starts the storage, the servicers and a gRPC server on 127.0.0.1 for each test.

    Attributes for the tests: ``store``, ``action_cache``, the servicers, a ByteStream
    ``clock`` (``task.Clock``) and the stubs ``cas``, ``bytestream``, ``action_cache_stub``
    and ``capabilities``.
    """

    def setUp(self):
        return as_deferred(self._start())

    async def _start(self):
        self.storage = build_storage(make_temp_dir(self), map_size=1 << 30)
        await as_future(self.storage.start())
        self.addCleanup(self.storage.stop)
        self.store = self.storage.blob_store
        self.action_cache = self.storage.action_cache

        instance_names = InstanceNames(INSTANCE_NAMES)
        self.clock = task.Clock()
        self.cas_servicer = ContentAddressableStorageServicer(
            instance_names, self.store, MAX_BATCH_TOTAL_SIZE_BYTES, MAX_TREE_PAGE_SIZE
        )
        self.bytestream_servicer = ByteStreamServicer(
            instance_names,
            self.store,
            self.clock,
            read_chunk_size_bytes=READ_CHUNK_SIZE_BYTES,
            resume_timeout_seconds=RESUME_TIMEOUT_SECONDS,
        )
        self.addCleanup(self.bytestream_servicer.close)
        self.action_cache_servicer = ActionCacheServicer(
            instance_names, self.action_cache, self.store, MAX_INLINE_TOTAL_BYTES
        )
        self.capabilities_servicer = CapabilitiesServicer(instance_names, MAX_BATCH_TOTAL_SIZE_BYTES)

        # The message limits leave 4 MiB above the batch limit, as the server assembly does.
        options = [
            ("grpc.max_receive_message_length", MAX_BATCH_TOTAL_SIZE_BYTES + 4 * MiB),
            ("grpc.max_send_message_length", MAX_BATCH_TOTAL_SIZE_BYTES + 4 * MiB),
        ]
        self.server = grpc.aio.server(options=options)
        remote_execution_pb2_grpc.add_ContentAddressableStorageServicer_to_server(
            self.cas_servicer, self.server
        )
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(self.bytestream_servicer, self.server)
        remote_execution_pb2_grpc.add_ActionCacheServicer_to_server(
            self.action_cache_servicer, self.server
        )
        remote_execution_pb2_grpc.add_CapabilitiesServicer_to_server(
            self.capabilities_servicer, self.server
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.addCleanup(lambda: as_deferred(self.server.stop(None)))

        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.addCleanup(lambda: as_deferred(self.channel.close()))
        self.cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bytestream_pb2_grpc.ByteStreamStub(self.channel)
        self.action_cache_stub = remote_execution_pb2_grpc.ActionCacheStub(self.channel)
        self.capabilities = remote_execution_pb2_grpc.CapabilitiesStub(self.channel)

    async def put_blobs(self, *blobs):
        """Store ``(data, digest)`` pairs directly in the blob store."""
        outcomes = await as_future(self.store.put_many([(digest, data) for data, digest in blobs]))
        for outcome in outcomes:
            if outcome is not None:
                raise outcome

    async def is_stored(self, digest):
        return not await as_future(self.store.find_missing([digest]))

    async def assert_rpc_error(self, call, code, *fragments):
        """Await ``call`` (a coroutine or an awaitable call) and check its error status.

        Checks that it fails with ``code`` and that the details contain every fragment.
        Returns the ``grpc.aio.AioRpcError``.
        """
        try:
            await call
        except grpc.aio.AioRpcError as error:
            self.assertEqual(error.code(), code, error.details())
            for fragment in fragments:
                self.assertIn(fragment, error.details())
            return error
        self.fail(f"the call succeeded, expected {code}")

    async def read_stream(self, call):
        """Return the responses of a server-streaming call as a list."""
        return [response async for response in call]
