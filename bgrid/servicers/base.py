"""What every bgrid servicer shares: error mapping for handlers and instance name checks."""

import asyncio
import functools

import grpc
from twisted.logger import Logger

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.errors import BgridError, InvalidArgumentError, to_status

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_log = Logger(namespace="bgrid.servicers")


async def abort_with_error(context, error):
    """End the call with the status for ``error``, including its rich details.

    Raises the exception grpc.aio uses to end the call; it never returns.
    """
    status = to_status(error)
    trailing_metadata = ()
    if status.details:
        trailing_metadata = ((_STATUS_DETAILS_KEY, status.SerializeToString()),)
    code = _STATUS_CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    await context.abort(code, status.message, trailing_metadata)


# grpc.StatusCode members have (number, name) tuples as values.
_STATUS_CODES_BY_NUMBER = {member.value[0]: member for member in grpc.StatusCode}


def _log_error(method, error):
    if isinstance(error, BgridError):
        # Client mistakes and expected conditions (NOT_FOUND, FAILED_PRECONDITION) are
        # answered, not logged as server errors.
        _log.debug("{method}: {code}: {message}", method=method, code=error.code, message=error.message)
    else:
        _log.failure("{method} failed with an internal error", method=method)


def unary_handler(method):
    """Wrap an ``async def`` unary servicer method so errors become statuses."""

    @functools.wraps(method)
    async def handle(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:
            _log_error(method.__qualname__, error)
            await abort_with_error(context, error)

    return handle


def stream_handler(method):
    """Wrap an async generator servicer method (server streaming) so errors become statuses."""

    @functools.wraps(method)
    async def handle(self, request, context):
        try:
            async for response in method(self, request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as error:
            _log_error(method.__qualname__, error)
            await abort_with_error(context, error)

    return handle


def check_digest_function(value, field="digest_function"):
    """Reject any digest function but SHA-256; UNKNOWN (0) means the server's default."""
    if value in (re_pb2.DigestFunction.UNKNOWN, re_pb2.DigestFunction.SHA256):
        return
    known = dict(re_pb2.DigestFunction.Value.items())
    name = next((key for key, number in known.items() if number == value), str(value))
    raise InvalidArgumentError(f"{field}: unsupported digest function {name}; this server uses SHA256")


class InstanceNames:
    """The instance names a server is configured to serve."""

    def __init__(self, names):
        self.names = frozenset(names)

    def check(self, instance_name, field="instance_name"):
        """Return ``instance_name`` if served, else raise InvalidArgumentError naming it."""
        if instance_name not in self.names:
            served = ", ".join(repr(name) for name in sorted(self.names))
            raise InvalidArgumentError(
                f"{field}: unknown instance name {instance_name!r}; this server serves {served}"
            )
        return instance_name

    def split_resource_name(self, resource_name, marker_segments):
        """Split ``resource_name`` at the first segment in ``marker_segments``.

        Returns ``(instance_name, remaining_segments)``, where the instance name is
        everything before the marker (possibly several segments, possibly empty) and the
        remaining segments start with the marker. Raises InvalidArgumentError when no
        marker is present or the instance name is not served.
        """
        segments = resource_name.split("/")
        for index, segment in enumerate(segments):
            if segment in marker_segments:
                instance_name = "/".join(segments[:index])
                self.check(instance_name, field=f"resource name {resource_name!r}")
                return instance_name, segments[index:]
        expected = " or ".join(repr(marker) for marker in sorted(marker_segments))
        raise InvalidArgumentError(
            f"invalid resource name {resource_name!r}: expected a {expected} segment"
        )

