"""A real grpc.aio server with the CAS, ByteStream, ActionCache and Capabilities
servicers over LMDB storage in a temporary directory, for the servicer tests.

``ExecutionServicerTestCase`` adds the Execution, Operations and Bots servicers over a real
scheduler, and ``RemoteBot`` drives the Bots service through its gRPC stub.
"""

import asyncio
import os

import grpc
from google.longrunning import operations_grpc_pb2
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.google.bytestream import bytestream_pb2_grpc
from bgrid._protos.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from bgrid.bridge import as_deferred, as_future
from bgrid.digest import EMPTY_DIGEST, Digest
from bgrid.execution import ExecutionController
from bgrid.scheduler import Scheduler
from bgrid.servicers.action_cache import ActionCacheServicer
from bgrid.servicers.base import InstanceNames
from bgrid.servicers.bots import DEADLINE_MARGIN, BotsServicer
from bgrid.servicers.bytestream import ByteStreamServicer
from bgrid.servicers.capabilities import CapabilitiesServicer
from bgrid.servicers.cas import ContentAddressableStorageServicer
from bgrid.servicers.execution import ExecutionServicer
from bgrid.servicers.operations import OperationsServicer
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
        self.add_servicers(self.server, instance_names)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.addCleanup(lambda: as_deferred(self.server.stop(None)))

        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.addCleanup(lambda: as_deferred(self.channel.close()))
        self.cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bytestream_pb2_grpc.ByteStreamStub(self.channel)
        self.action_cache_stub = remote_execution_pb2_grpc.ActionCacheStub(self.channel)
        self.capabilities = remote_execution_pb2_grpc.CapabilitiesStub(self.channel)

    def add_servicers(self, server, instance_names):
        """Add more servicers to ``server`` before it starts; subclasses override this."""

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


# A gRPC timeout for UpdateBotSession within the server's DEADLINE_MARGIN, so that the
# server returns at once instead of holding a long poll open.
IMMEDIATE_UPDATE_TIMEOUT = DEADLINE_MARGIN * 0.9

# A gRPC timeout, in seconds of real time, for calls that wait for news from the server.
# They return long before it unless the news never comes.
WAIT_TIMEOUT = 10.0


def make_directory(files=(), directories=()):
    """Return ``(data, digest)`` of a Directory with ``(name, digest)`` files and subdirectories."""
    directory = re_pb2.Directory()
    for name, digest in sorted(files):
        directory.files.add(name=name, digest=digest_proto(digest))
    for name, digest in sorted(directories):
        directory.directories.add(name=name, digest=digest_proto(digest))
    data = directory.SerializeToString()
    return data, Digest.of(data)


def operation_response(operation):
    """Return the ExecuteResponse packed in a done Operation message."""
    response = re_pb2.ExecuteResponse()
    if not operation.response.Unpack(response):
        raise AssertionError(f"operation {operation.name} has no ExecuteResponse: {operation}")
    return response


def operation_stage(operation):
    """Return the ExecutionStage of an Operation message from its metadata."""
    metadata = re_pb2.ExecuteOperationMetadata()
    if not operation.metadata.Unpack(metadata):
        raise AssertionError(f"operation {operation.name} has no ExecuteOperationMetadata")
    return metadata.stage


def precondition_violations(error):
    """Return the ``(type, subject)`` pairs of the PreconditionFailure in a gRPC error.

    The rich status is decoded from ``grpc-status-details-bin`` by grpcio-status, which
    also checks that its code and message match those of the call.
    """
    status = rpc_status.from_call(error)
    if status is None:
        raise AssertionError(f"the error carries no rich status: {error.details()}")
    violations = []
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            violations.extend((violation.type, violation.subject) for violation in failure.violations)
    return violations


def blob_subject(digest):
    """Return the PreconditionFailure subject REAPI gives a missing blob."""
    return f"blobs/{digest.hash}/{digest.size_bytes}"


class ExecutionServicerTestCase(ServicerTestCase):
    """Adds the Execution, Operations and Bots servicers over a real ``Scheduler`` and
    ``ExecutionController`` to the server of ``ServicerTestCase``.

    The scheduler runs on ``clock``, so its long polls, keepalives and retention time out
    only when a test advances it. Extra attributes: ``scheduler``, ``controller`` and the
    stubs ``execution``, ``operations`` and ``bots``.
    """

    async def _start(self):
        await super()._start()
        self.execution = remote_execution_pb2_grpc.ExecutionStub(self.channel)
        self.operations = operations_grpc_pb2.OperationsStub(self.channel)
        self.bots = bots_pb2_grpc.BotsStub(self.channel)

    def add_servicers(self, server, instance_names):
        self.scheduler = Scheduler(
            self.clock, result_handler=lambda *args: self.controller.handle_result(*args)
        )
        self.addCleanup(self.scheduler.stop)
        self.controller = ExecutionController(self.store, self.action_cache, self.scheduler)
        remote_execution_pb2_grpc.add_ExecutionServicer_to_server(
            ExecutionServicer(
                instance_names, self.controller, self.scheduler, MAX_INLINE_TOTAL_BYTES
            ),
            server,
        )
        operations_grpc_pb2.add_OperationsServicer_to_server(
            OperationsServicer(instance_names, self.scheduler), server
        )
        bots_pb2_grpc.add_BotsServicer_to_server(
            BotsServicer(instance_names, self.scheduler, self.clock), server
        )

    async def store_action(
        self,
        label="action",
        input_root_digest=EMPTY_DIGEST,
        platform=(),
        do_not_cache=False,
        store_command=True,
        store_action=True,
    ):
        """Build an Action whose Command differs for each ``label`` and return its digest.

        The Action and Command are stored in the CAS unless ``store_action`` or
        ``store_command`` is False. ``platform`` lists the Action's ``(name, value)``
        platform properties.
        """
        command = re_pb2.Command(arguments=["echo", label])
        command_blob = command.SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_proto(Digest.of(command_blob)),
            input_root_digest=digest_proto(input_root_digest),
            do_not_cache=do_not_cache,
        )
        for name, value in platform:
            action.platform.properties.add(name=name, value=value)
        action_blob = action.SerializeToString()
        blobs = []
        if store_command:
            blobs.append((command_blob, Digest.of(command_blob)))
        if store_action:
            blobs.append((action_blob, Digest.of(action_blob)))
        await self.put_blobs(*blobs)
        return Digest.of(action_blob)

    def execute(self, action_digest, instance_name="main", **fields):
        """Start an Execute call and return it; ``fields`` go into the ExecuteRequest."""
        return self.execution.Execute(
            re_pb2.ExecuteRequest(
                instance_name=instance_name, action_digest=digest_proto(action_digest), **fields
            ),
            timeout=WAIT_TIMEOUT,
        )

    def wait_execution(self, name):
        return self.execution.WaitExecution(
            re_pb2.WaitExecutionRequest(name=name), timeout=WAIT_TIMEOUT
        )

    async def next_operation(self, call):
        """Return the next Operation of a streaming call, failing the test at its end."""
        operation = await call.read()
        if operation is grpc.aio.EOF:
            self.fail("the operation stream ended early")
        return operation

    async def assert_stream_ended(self, call):
        self.assertIs(await call.read(), grpc.aio.EOF)
        self.assertEqual(await call.code(), grpc.StatusCode.OK)

    async def make_result(self, exit_code=0, stdout=b"hello\n", stderr=b"", output_files=()):
        """Store outputs in the CAS, as a bot uploads them, and return their ActionResult.

        ``output_files`` lists ``(path, data)`` pairs.
        """
        result = re_pb2.ActionResult(exit_code=exit_code)
        blobs = []
        if stdout:
            blobs.append((stdout, Digest.of(stdout)))
            result.stdout_digest.CopyFrom(digest_proto(Digest.of(stdout)))
        if stderr:
            blobs.append((stderr, Digest.of(stderr)))
            result.stderr_digest.CopyFrom(digest_proto(Digest.of(stderr)))
        for path, data in output_files:
            blobs.append((data, Digest.of(data)))
            result.output_files.add(path=path, digest=digest_proto(Digest.of(data)))
        await self.put_blobs(*blobs)
        return result

    async def run_on_bot(self, result, bot_id="bot-1", instance_name="main"):
        """Let a new bot take the queued job, run it and report ``result``; return the bot."""
        bot = RemoteBot(self.bots, bot_id, parent=instance_name)
        await bot.create()
        self.assertIsNotNone(bot.lease, f"bot {bot_id} got no lease")
        await bot.accept()
        await bot.complete(result)
        return bot

    async def execute_to_completion(self, action_digest, result, **fields):
        """Execute an action on a bot that reports ``result``; return the done operation."""
        call = self.execute(action_digest, **fields)
        await self.next_operation(call)
        await self.run_on_bot(result)
        operation = await self.read_until_done(call)
        await self.assert_stream_ended(call)
        return operation

    async def read_until_done(self, call):
        """Read a streaming call until its done Operation and return that."""
        while True:
            operation = await self.next_operation(call)
            if operation.done:
                return operation

    async def assert_no_work_for_bots(self, bot_id="idle-bot"):
        """Check that a new bot session gets no lease."""
        bot = RemoteBot(self.bots, bot_id)
        await bot.create()
        self.assertIsNone(bot.lease)

    async def wait_for_idle_bots(self, count):
        """Wait in real time until ``count`` bots wait in a long poll for work."""
        for _ in range(int(WAIT_TIMEOUT / 0.01)):
            if self.scheduler.stats()["idle_bots"] >= count:
                return
            await asyncio.sleep(0.01)
        self.fail(f"{count} bots did not start waiting for work")


class RemoteBot:
    """A bot that drives the Bots service through its gRPC stub, one call at a time.

    ``session`` is the last BotSession the server returned, and the bot reports the leases
    in it back with each update, as a real bot does.
    """

    def __init__(self, stub, bot_id, properties=(), parent="main"):
        self.stub = stub
        self.bot_id = bot_id
        self.properties = properties
        self.parent = parent
        self.session = None

    @property
    def lease(self):
        """The lease of the last response, or None."""
        return self.session.leases[0] if self.session.leases else None

    async def create(self):
        """Open the bot's session and return it; it carries a lease if a job was queued."""
        worker = worker_pb2.Worker(
            properties=[worker_pb2.Worker.Property(key=k, value=v) for k, v in self.properties]
        )
        self.session = await self.stub.CreateBotSession(
            bots_pb2.CreateBotSessionRequest(
                parent=self.parent,
                bot_session=bots_pb2.BotSession(bot_id=self.bot_id, status=bots_pb2.OK, worker=worker),
            ),
            timeout=WAIT_TIMEOUT,
        )
        return self.session

    async def update(self, leases=None, wait=False):
        """Send UpdateBotSession with ``leases`` (default: those of the last response).

        With ``wait=False`` the call's deadline is within the server's margin, so the server
        returns at once. With ``wait=True`` it is a long poll that returns on news.
        """
        if leases is None:
            leases = []
            for lease in self.session.leases:
                reported = bots_pb2.Lease()
                reported.CopyFrom(lease)
                reported.ClearField("payload")
                leases.append(reported)
        request = bots_pb2.UpdateBotSessionRequest(
            name=self.session.name,
            bot_session=bots_pb2.BotSession(
                name=self.session.name, bot_id=self.bot_id, status=bots_pb2.OK, leases=leases
            ),
        )
        timeout = WAIT_TIMEOUT if wait else IMMEDIATE_UPDATE_TIMEOUT
        self.session = await self.stub.UpdateBotSession(request, timeout=timeout)
        return self.session

    async def accept(self):
        """Report the current lease ACTIVE and return the session the server sends back."""
        return await self.update([bots_pb2.Lease(id=self.lease.id, state=bots_pb2.ACTIVE)])

    async def complete(self, result, code=code_pb2.OK):
        """Report the current lease COMPLETED with the ActionResult ``result``."""
        packed = any_pb2.Any()
        packed.Pack(result)
        lease = bots_pb2.Lease(
            id=self.lease.id,
            state=bots_pb2.COMPLETED,
            status=status_pb2.Status(code=code),
            result=packed,
        )
        return await self.update([lease])

    def leased_action(self):
        """Return the Action packed in the current lease's payload."""
        action = re_pb2.Action()
        if not self.lease.payload.Unpack(action):
            raise AssertionError(f"lease {self.lease.id} carries no Action: {self.lease.payload}")
        return action
