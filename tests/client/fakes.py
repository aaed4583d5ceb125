"""In-process gRPC servers on loopback for the client and bot tests.

``FakeCas`` is an in-memory CAS with ByteStream and Capabilities that records the requests it
receives. ``ScriptedBots`` is a Bots service whose every response the test sets by hand.
"""

import asyncio

import grpc
from google.rpc import code_pb2, status_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2_grpc
from bgrid.bridge import as_deferred
from bgrid.client.channel import open_channel
from bgrid.digest import Digest

READ_CHUNK_BYTES = 64 * 1024


class FakeCas(
    remote_execution_pb2_grpc.ContentAddressableStorageServicer,
    remote_execution_pb2_grpc.CapabilitiesServicer,
    bytestream_pb2_grpc.ByteStreamServicer,
):
    """CAS, ByteStream and Capabilities services over a dict of blobs.

    ``corrupt`` contains digests whose data is served with one byte changed, ``calls`` lists
    the method names in call order, and the other lists record request details for checks.
    """

    def __init__(self, max_batch_total_size_bytes=0, instance_name=""):
        self.instance_name = instance_name
        self.max_batch_total_size_bytes = max_batch_total_size_bytes
        self.blobs = {}
        self.corrupt = set()
        self.calls = []
        self.batch_update_request_sizes = []
        self.batch_read_request_sizes = []
        self.write_resource_names = []
        self.write_chunk_sizes = []
        self.read_resource_names = []

    def put(self, data):
        """Store ``data`` and return its digest."""
        digest = Digest.of(data)
        self.blobs[digest] = bytes(data)
        return digest

    def _check_instance(self, instance_name):
        assert instance_name == self.instance_name, (instance_name, self.instance_name)

    def _served(self, digest):
        data = self.blobs[digest]
        if digest in self.corrupt and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    # Capabilities

    async def GetCapabilities(self, request, context):
        self.calls.append("GetCapabilities")
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256],
                max_batch_total_size_bytes=self.max_batch_total_size_bytes,
            )
        )

    # ContentAddressableStorage

    async def FindMissingBlobs(self, request, context):
        self.calls.append("FindMissingBlobs")
        self._check_instance(request.instance_name)
        response = re_pb2.FindMissingBlobsResponse()
        for proto in request.blob_digests:
            if Digest.from_proto(proto) not in self.blobs:
                response.missing_blob_digests.append(proto)
        return response

    async def BatchUpdateBlobs(self, request, context):
        self.calls.append("BatchUpdateBlobs")
        self._check_instance(request.instance_name)
        self.batch_update_request_sizes.append(request.ByteSize())
        response = re_pb2.BatchUpdateBlobsResponse()
        for entry in request.requests:
            digest = Digest.from_proto(entry.digest)
            if Digest.of(entry.data) != digest:
                status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="digest mismatch")
            else:
                self.blobs[digest] = entry.data
                status = status_pb2.Status(code=code_pb2.OK)
            response.responses.add(digest=entry.digest, status=status)
        return response

    async def BatchReadBlobs(self, request, context):
        self.calls.append("BatchReadBlobs")
        self._check_instance(request.instance_name)
        self.batch_read_request_sizes.append(request.ByteSize())
        response = re_pb2.BatchReadBlobsResponse()
        for proto in request.digests:
            digest = Digest.from_proto(proto)
            if digest in self.blobs:
                response.responses.add(
                    digest=proto, data=self._served(digest), status=status_pb2.Status(code=code_pb2.OK)
                )
            else:
                response.responses.add(
                    digest=proto, status=status_pb2.Status(code=code_pb2.NOT_FOUND, message="absent")
                )
        return response

    async def GetTree(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetTree is not implemented")

    # ByteStream

    def _parse_read_name(self, name):
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        assert name.startswith(prefix + "blobs/"), name
        _, hash_hex, size = name[len(prefix):].split("/")
        return Digest.parse(hash_hex, size)

    async def Read(self, request, context):
        self.calls.append("Read")
        self.read_resource_names.append(request.resource_name)
        digest = self._parse_read_name(request.resource_name)
        if digest not in self.blobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"blob {digest} not found")
        data = self._served(digest)
        for offset in range(0, len(data), READ_CHUNK_BYTES):
            yield bytestream_pb2.ReadResponse(data=data[offset:offset + READ_CHUNK_BYTES])

    async def Write(self, request_iterator, context):
        self.calls.append("Write")
        chunks = []
        resource_name = None
        expected_offset = 0
        async for request in request_iterator:
            if resource_name is None:
                resource_name = request.resource_name
                self.write_resource_names.append(resource_name)
            assert request.write_offset == expected_offset, (request.write_offset, expected_offset)
            chunks.append(request.data)
            self.write_chunk_sizes.append(len(request.data))
            expected_offset += len(request.data)
            if request.finish_write:
                break
        hash_hex, size = resource_name.split("/")[-2:]
        digest = Digest.parse(hash_hex, size)
        data = b"".join(chunks)
        if Digest.of(data) != digest:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest mismatch")
        self.blobs[digest] = data
        return bytestream_pb2.WriteResponse(committed_size=len(data))

    async def QueryWriteStatus(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not implemented")


class ScriptedBots(bots_pb2_grpc.BotsServicer):
    """A Bots service that queues each call as ``(method, request, reply)`` for the test.

    The test responds with ``reply.set_result(BotSession)`` or with
    ``reply.set_result(grpc.StatusCode.X)`` to fail the call with that code. Calls that
    the client cancels are counted in ``cancelled_calls``.
    """

    def __init__(self):
        self.calls = asyncio.Queue()
        self.cancelled_calls = 0

    async def _handle(self, method, request, context):
        reply = asyncio.get_running_loop().create_future()
        await self.calls.put((method, request, reply))
        try:
            answer = await reply
        except asyncio.CancelledError:
            self.cancelled_calls += 1
            raise
        if isinstance(answer, grpc.StatusCode):
            await context.abort(answer, f"scripted {answer.name}")
        return answer

    async def CreateBotSession(self, request, context):
        return await self._handle("CreateBotSession", request, context)

    async def UpdateBotSession(self, request, context):
        return await self._handle("UpdateBotSession", request, context)

    async def next_call(self, timeout=10.0):
        """Return the next ``(method, request, reply)``; fail if none comes in ``timeout`` s."""
        return await asyncio.wait_for(self.calls.get(), timeout)


async def start_server(test_case, cas=None, bots=None):
    """Serve ``cas`` and ``bots`` on 127.0.0.1; return ``HOST:PORT``. Stopped at cleanup."""
    server = grpc.aio.server()
    if cas is not None:
        remote_execution_pb2_grpc.add_ContentAddressableStorageServicer_to_server(cas, server)
        remote_execution_pb2_grpc.add_CapabilitiesServicer_to_server(cas, server)
        bytestream_pb2_grpc.add_ByteStreamServicer_to_server(cas, server)
    if bots is not None:
        bots_pb2_grpc.add_BotsServicer_to_server(bots, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    test_case.addCleanup(lambda: as_deferred(server.stop(None)))
    return f"127.0.0.1:{port}"


def open_test_channel(test_case, address):
    """Open a channel to ``address`` that is closed at cleanup, before the server stops."""
    channel = open_channel(address)
    test_case.addCleanup(lambda: as_deferred(channel.close()))
    return channel


async def wait_until(predicate, timeout=10.0, interval=0.01):
    """Yield to the event loop until ``predicate()`` is true; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
