"""Domain exceptions and the one mapping from them to ``google.rpc.Status``.

Storage, scheduler and bot code raise these; only the gRPC edge and the places that fill an
``ExecuteResponse.status`` turn them into statuses, through ``to_status``.
"""

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


class BgridError(Exception):
    """Base of the errors that carry a gRPC status code and a client-facing message."""

    code = code_pb2.INTERNAL

    def __init__(self, message):
        super().__init__(message)
        self.message = message

    def details(self):
        """Return the rich error detail messages to attach to the status, if any."""
        return []


class InvalidArgumentError(BgridError):
    """The request is malformed: a bad digest, resource name, instance name or option."""

    code = code_pb2.INVALID_ARGUMENT


class DigestMismatchError(InvalidArgumentError):
    """Uploaded data does not hash to, or is not the size of, the digest it was sent under."""


class NotFoundError(BgridError):
    """A blob, action result, operation or bot session does not exist."""

    code = code_pb2.NOT_FOUND


class BlobNotFoundError(NotFoundError):
    """A blob is not in the content-addressable store."""

    def __init__(self, digest):
        super().__init__(f"blob {digest} not found")
        self.digest = digest


class MissingBlobsError(BgridError):
    """Blobs that an action needs are absent; clients upload them and retry.

    REAPI prescribes FAILED_PRECONDITION with one ``PreconditionFailure`` violation of type
    ``MISSING`` and subject ``blobs/{hash}/{size}`` for each absent blob.
    """

    code = code_pb2.FAILED_PRECONDITION

    def __init__(self, digests, what="blobs"):
        digests = list(digests)
        shown = ", ".join(str(d) for d in digests[:3])
        more = f" and {len(digests) - 3} more" if len(digests) > 3 else ""
        super().__init__(f"missing {what}: {shown}{more}")
        self.digests = digests

    def details(self):
        failure = error_details_pb2.PreconditionFailure()
        for digest in self.digests:
            failure.violations.add(
                type="MISSING",
                subject=f"blobs/{digest.hash}/{digest.size_bytes}",
                description="the blob is not in the content-addressable store",
            )
        return [failure]


class FailedPreconditionError(BgridError):
    """The system is not in a state in which the request can run."""

    code = code_pb2.FAILED_PRECONDITION


class OutOfRangeError(BgridError):
    """An offset or limit lies past the end of a blob."""

    code = code_pb2.OUT_OF_RANGE


class ResourceExhaustedError(BgridError):
    """A request, batch or blob is larger than a limit or than the store can hold."""

    code = code_pb2.RESOURCE_EXHAUSTED


class AlreadyExistsError(BgridError):
    """A resource that must be new exists already."""

    code = code_pb2.ALREADY_EXISTS


class CancelledError(BgridError):
    """An operation or lease was cancelled."""

    code = code_pb2.CANCELLED


class DeadlineExceededError(BgridError):
    """An action ran past its timeout."""

    code = code_pb2.DEADLINE_EXCEEDED


class UnavailableError(BgridError):
    """The server is stopping or a backend cannot be reached; the client may retry."""

    code = code_pb2.UNAVAILABLE


class CorruptBlobError(BgridError):
    """A stored blob no longer matches its digest; it has been dropped from the store."""

    code = code_pb2.DATA_LOSS

    def __init__(self, digest):
        super().__init__(f"stored blob {digest} failed its integrity check and was removed")
        self.digest = digest


def make_status(code, message, details=()):
    """Return a ``google.rpc.Status`` with ``details`` packed into ``Any`` messages."""
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def to_status(error):
    """Return the ``google.rpc.Status`` for an exception.

    A ``BgridError`` keeps its code, message and details; any other exception is INTERNAL
    with its text, because the client must still learn that the call failed.
    """
    if isinstance(error, BgridError):
        return make_status(error.code, error.message, error.details())
    return make_status(code_pb2.INTERNAL, f"internal error: {error!r}")
