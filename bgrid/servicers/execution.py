"""The REAPI Execution service: Execute and WaitExecution streams of Operation updates."""

import asyncio

from google.longrunning import operations_pb2
from twisted.logger import Logger

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_pb2_grpc,
)
from bgrid.bridge import as_future
from bgrid.digest import Digest
from bgrid.servicers.base import check_digest_function, stream_handler
from bgrid.servicers.inlining import DEFAULT_MAX_INLINE_TOTAL_BYTES, inline_outputs

# An Execute stream with no news re-sends the operation this often, in seconds, so clients
# and proxies that time out idle streams keep waiting for long actions.
KEEPALIVE_INTERVAL = 30.0


async def stream_operation(scheduler, name, keepalive_interval=KEEPALIVE_INTERVAL):
    """Yield the Operation messages of ``name`` as it changes, ending with the done one.

    Raises NotFoundError when the operation is unknown. The watch is released when the
    caller stops iterating, including when the client goes away.
    """
    watch = scheduler.watch_operation(name)
    try:
        operation = None
        while True:
            update = as_future(watch.next())
            while True:
                try:
                    operation = await asyncio.wait_for(asyncio.shield(update), keepalive_interval)
                    break
                except asyncio.TimeoutError:
                    if operation is not None:
                        yield operation
            if operation is None:
                return
            yield operation
            if operation.done:
                return
    finally:
        watch.close()


class ExecutionServicer(re_pb2_grpc.ExecutionServicer):
    """Serves Execute and WaitExecution for the configured instance names.

    Execute inlines the outputs that its request names into the done operation's result,
    reading them from ``controller.blob_store`` within ``max_inline_total_bytes``.
    WaitExecution has no inline hints and sends results as stored.
    """

    log = Logger()

    def __init__(
        self,
        instance_names,
        controller,
        scheduler,
        max_inline_total_bytes=DEFAULT_MAX_INLINE_TOTAL_BYTES,
    ):
        self.instance_names = instance_names
        self.controller = controller
        self.scheduler = scheduler
        self.max_inline_total_bytes = max_inline_total_bytes

    @stream_handler
    async def Execute(self, request, context):
        instance_name = self.instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, "action_digest")

        name = await as_future(
            self.controller.execute(
                instance_name,
                action_digest,
                skip_cache_lookup=request.skip_cache_lookup,
                priority=request.execution_policy.priority,
            )
        )
        async for operation in stream_operation(self.scheduler, name):
            if operation.done:
                operation = await self._inline_outputs(operation, request)
            yield operation

    @stream_handler
    async def WaitExecution(self, request, context):
        async for operation in stream_operation(self.scheduler, request.name):
            yield operation

    async def _inline_outputs(self, operation, request):
        """Return a copy of the done ``operation`` with the outputs ``request`` names inlined.

        The scheduler shares its Operation messages between watchers, so the original is
        left as it is.
        """
        response = re_pb2.ExecuteResponse()
        if not operation.response.Unpack(response) or not response.HasField("result"):
            return operation
        await inline_outputs(
            self.controller.blob_store,
            response.result,
            request.inline_stdout,
            request.inline_stderr,
            request.inline_output_files,
            self.max_inline_total_bytes,
        )
        inlined = operations_pb2.Operation()
        inlined.CopyFrom(operation)
        inlined.response.Pack(response)
        return inlined
