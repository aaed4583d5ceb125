"""The google.longrunning Operations service over the scheduler's execute operations."""

import asyncio

from google.longrunning import operations_grpc_pb2, operations_proto_pb2
from google.protobuf import empty_pb2

from bgrid.bridge import as_future
from bgrid.errors import InvalidArgumentError
from bgrid.servicers.base import unary_handler

# The longest a WaitOperation call waits when it names no timeout, in seconds.
DEFAULT_WAIT_TIMEOUT = 60.0

# Seconds kept free at the end of a WaitOperation call's deadline, so that the call returns
# the latest state before the client gives up on it.
DEADLINE_MARGIN = 1.0


class OperationsServicer(operations_grpc_pb2.OperationsServicer):
    """Serves GetOperation, ListOperations, CancelOperation, DeleteOperation and WaitOperation.

    ``ListOperationsRequest.name`` is the instance name whose operations are listed.
    """

    def __init__(self, instance_names, scheduler):
        self.instance_names = instance_names
        self.scheduler = scheduler

    @unary_handler
    async def GetOperation(self, request, context):
        operation = self.scheduler.get_operation(request.name)
        # Show only state that a crash cannot undo.
        await as_future(self.scheduler.durable())
        return operation

    @unary_handler
    async def ListOperations(self, request, context):
        instance_name = self.instance_names.check(request.name, field="name")
        if request.filter:
            raise InvalidArgumentError(
                f"filter: unsupported filter {request.filter!r}; leave it empty to list all"
            )
        if request.page_size < 0:
            raise InvalidArgumentError(f"page_size: invalid value {request.page_size}: must not be negative")
        operations, next_page_token = self.scheduler.list_operations(
            instance_name, request.page_size, request.page_token
        )
        await as_future(self.scheduler.durable())
        return operations_proto_pb2.ListOperationsResponse(
            operations=operations, next_page_token=next_page_token
        )

    @unary_handler
    async def CancelOperation(self, request, context):
        self.scheduler.cancel_operation(request.name)
        await as_future(self.scheduler.durable())
        return empty_pb2.Empty()

    @unary_handler
    async def DeleteOperation(self, request, context):
        self.scheduler.delete_operation(request.name)
        await as_future(self.scheduler.durable())
        return empty_pb2.Empty()

    @unary_handler
    async def WaitOperation(self, request, context):
        timeout = DEFAULT_WAIT_TIMEOUT
        if request.HasField("timeout"):
            timeout = request.timeout.ToTimedelta().total_seconds()
            if timeout < 0:
                raise InvalidArgumentError(f"timeout: invalid value {timeout} s: must not be negative")
        # google.longrunning: of the request's timeout and the call's deadline, the shorter
        # one applies.
        time_remaining = context.time_remaining()
        if time_remaining is not None:
            timeout = min(timeout, max(0.0, time_remaining - DEADLINE_MARGIN))

        watch = self.scheduler.watch_operation(request.name)
        try:
            operation = await as_future(watch.next())
            deadline = asyncio.get_running_loop().time() + timeout
            while operation is not None and not operation.done:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    update = await asyncio.wait_for(as_future(watch.next()), remaining)
                except asyncio.TimeoutError:
                    break
                if update is None:
                    break
                operation = update
            return operation
        finally:
            watch.close()
