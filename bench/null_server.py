"""A REAPI server that does no work: the floor of what Python gRPC costs on this machine.

It is a bare grpc.aio server, without Twisted, that returns the cheapest response a
client accepts to every call of the services the benchmark uses. No real server can be
faster on the same machine, so its figures bound what bgrid can reach.

What it skips, on purpose:

- storage: nothing is stored, hashed or looked up. FindMissingBlobs reports the second
  half of the requested digests as missing, because the benchmark sends the present
  half first, so the response is as large as a real server's. BatchUpdateBlobs and
  ByteStream Write accept every blob without checking its digest. BatchReadBlobs and
  ByteStream Read return zero bytes of the size named in the digest.
- the action cache: GetActionResult returns one fixed ActionResult for every digest,
  and UpdateActionResult returns the result it was sent.
- execution and scheduling: Execute and WaitExecution return one fixed, done Operation
  at once. CreateBotSession names the session and UpdateBotSession waits until the call's
  deadline (at most LONG_POLL_SECONDS) and returns the session unchanged: bots never get
  work.
- validation: instance names, digests and resource names are not checked, except that
  ByteStream Read rejects a resource name without a size.
- GetTree, the google.longrunning Operations service, compression and authentication:
  not served, so such calls fail with UNIMPLEMENTED.

Run it with ``python -m bench.null_server --listen 127.0.0.1:50061``. It serves the gRPC
health service and stops on SIGTERM or SIGINT.
"""

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from google.longrunning import operations_proto_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.build.bazel.semver import semver_pb2
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc

log = logging.getLogger("bench.null_server")

DEFAULT_LISTEN = "127.0.0.1:50061"

# Size of the chunks that ByteStream Read sends, as bgrid's ByteStream service does.
READ_CHUNK_BYTES = 1024 * 1024

# Largest total blob size of one BatchUpdateBlobs or BatchReadBlobs, as advertised.
MAX_BATCH_BYTES = 4 * 1024 * 1024

# Largest gRPC message in either direction: a full batch plus room for digests.
MAX_MESSAGE_BYTES = MAX_BATCH_BYTES + 4 * 1024 * 1024

# Maximum seconds an UpdateBotSession waits when the call has no deadline.
LONG_POLL_SECONDS = 20.0

# Seconds that UpdateBotSession returns before the caller's deadline, so the response
# arrives before the caller gives up.
DEADLINE_MARGIN_SECONDS = 0.5

ZERO_CHUNK = bytes(READ_CHUNK_BYTES)
OK_STATUS = status_pb2.Status(code=code_pb2.OK)


def build_capabilities():
    """Return the ServerCapabilities that GetCapabilities sends: SHA-256, cache and execution."""
    sha256 = re_pb2.DigestFunction.SHA256
    return re_pb2.ServerCapabilities(
        cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=[sha256],
            action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(update_enabled=True),
            max_batch_total_size_bytes=MAX_BATCH_BYTES,
            symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
        ),
        execution_capabilities=re_pb2.ExecutionCapabilities(
            digest_function=sha256,
            digest_functions=[sha256],
            exec_enabled=True,
        ),
        low_api_version=semver_pb2.SemVer(major=2, minor=0),
        high_api_version=semver_pb2.SemVer(major=2, minor=3),
    )


def build_done_operation():
    """Return the Operation that Execute sends: done, exit code 0, no outputs."""
    operation = operations_proto_pb2.Operation(name="operations/null", done=True)
    operation.metadata.Pack(re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.COMPLETED))
    operation.response.Pack(
        re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=0), status=OK_STATUS)
    )
    return operation


def blob_size_from_resource_name(resource_name):
    """Return the size in bytes from ``[INSTANCE/]blobs/HASH/SIZE[/...]``.

    Raises ValueError when no ``blobs`` segment is followed by a hash and a whole number.
    """
    segments = resource_name.split("/")
    for index, segment in enumerate(segments[:-2]):
        if segment == "blobs" and segments[index + 2].isdigit():
            return int(segments[index + 2])
    raise ValueError(f"invalid resource name {resource_name!r}: expected [INSTANCE/]blobs/HASH/SIZE")


class NullCapabilities(remote_execution_pb2_grpc.CapabilitiesServicer):
    def __init__(self):
        self._capabilities = build_capabilities()

    async def GetCapabilities(self, request, context):
        return self._capabilities


class NullContentAddressableStorage(remote_execution_pb2_grpc.ContentAddressableStorageServicer):
    async def FindMissingBlobs(self, request, context):
        # The benchmark sends the present half first, as the module docstring explains.
        half = len(request.blob_digests) // 2
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=request.blob_digests[half:])

    async def BatchUpdateBlobs(self, request, context):
        response = re_pb2.BatchUpdateBlobsResponse()
        for blob in request.requests:
            response.responses.add(digest=blob.digest, status=OK_STATUS)
        return response

    async def BatchReadBlobs(self, request, context):
        response = re_pb2.BatchReadBlobsResponse()
        for digest in request.digests:
            response.responses.add(digest=digest, data=bytes(digest.size_bytes), status=OK_STATUS)
        return response


class NullByteStream(bytestream_pb2_grpc.ByteStreamServicer):
    async def Read(self, request, context):
        try:
            size = blob_size_from_resource_name(request.resource_name)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        remaining = size - request.read_offset
        if request.read_limit:
            remaining = min(remaining, request.read_limit)
        while remaining > 0:
            if remaining >= READ_CHUNK_BYTES:
                yield bytestream_pb2.ReadResponse(data=ZERO_CHUNK)
            else:
                yield bytestream_pb2.ReadResponse(data=ZERO_CHUNK[:remaining])
            remaining -= READ_CHUNK_BYTES

    async def Write(self, request_iterator, context):
        committed_size = None
        async for request in request_iterator:
            if committed_size is None:
                committed_size = request.write_offset
            committed_size += len(request.data)
            if request.finish_write:
                break
        return bytestream_pb2.WriteResponse(committed_size=committed_size or 0)

    async def QueryWriteStatus(self, request, context):
        return bytestream_pb2.QueryWriteStatusResponse(committed_size=0, complete=False)


class NullActionCache(remote_execution_pb2_grpc.ActionCacheServicer):
    def __init__(self):
        self._result = re_pb2.ActionResult(exit_code=0)

    async def GetActionResult(self, request, context):
        return self._result

    async def UpdateActionResult(self, request, context):
        return request.action_result


class NullExecution(remote_execution_pb2_grpc.ExecutionServicer):
    def __init__(self):
        self._operation = build_done_operation()

    async def Execute(self, request, context):
        yield self._operation

    async def WaitExecution(self, request, context):
        yield self._operation


class NullBots(bots_pb2_grpc.BotsServicer):
    async def CreateBotSession(self, request, context):
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        session.name = f"{request.parent}/botSessions/{request.bot_session.bot_id}"
        return session

    async def UpdateBotSession(self, request, context):
        remaining = context.time_remaining()
        if remaining is None:
            wait = LONG_POLL_SECONDS
        else:
            wait = min(LONG_POLL_SECONDS, max(0.0, remaining - DEADLINE_MARGIN_SECONDS))
        await asyncio.sleep(wait)
        return request.bot_session


def add_services(server):
    """Register every null servicer and a SERVING health service on ``server``."""
    remote_execution_pb2_grpc.add_CapabilitiesServicer_to_server(NullCapabilities(), server)
    remote_execution_pb2_grpc.add_ContentAddressableStorageServicer_to_server(
        NullContentAddressableStorage(), server
    )
    remote_execution_pb2_grpc.add_ActionCacheServicer_to_server(NullActionCache(), server)
    remote_execution_pb2_grpc.add_ExecutionServicer_to_server(NullExecution(), server)
    bytestream_pb2_grpc.add_ByteStreamServicer_to_server(NullByteStream(), server)
    bots_pb2_grpc.add_BotsServicer_to_server(NullBots(), server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return health_servicer


async def serve(address):
    """Serve on ``address`` (HOST:PORT) until SIGTERM or SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    health_servicer = add_services(server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("null server listening on %s", address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await stop.wait()

    log.info("null server stopping")
    await server.stop(grace=1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.null_server",
        description="Serve REAPI, ByteStream and Bots calls with the cheapest valid responses.",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
        help=f"address to serve gRPC on (default: {DEFAULT_LISTEN})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(args.listen))
    except OSError as error:
        log.error("null server failed to start: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
