"""Unary calls and call errors of the client commands, and the output of protobuf messages
as text or JSON."""

import grpc
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from bgrid.client.cas import UNARY_TIMEOUT_SECONDS, RemoteCallError

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def missing_blob_subjects(status):
    """Return the subjects (``blobs/HASH/SIZE``) of the MISSING violations in a
    ``google.rpc.Status``, as REAPI reports absent inputs with FAILED_PRECONDITION."""
    subjects = []
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Is(failure.DESCRIPTOR) and detail.Unpack(failure):
            subjects.extend(
                violation.subject for violation in failure.violations if violation.type == "MISSING"
            )
    return subjects


def describe_status(code_name, message, status=None):
    """Return ``CODE: message``, followed by the missing blobs of ``status`` that the
    message does not name already."""
    text = f"{code_name}: {message}"
    if status is not None:
        unnamed = [
            subject for subject in missing_blob_subjects(status)
            if subject.removeprefix("blobs/") not in message
        ]
        if unnamed:
            text += f"; missing: {', '.join(unnamed)}"
    return text


def _rich_status(error):
    """Return the ``google.rpc.Status`` that a server attached to a failed call, or None."""
    for key, value in error.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:
                # The call's code and message are still reported, without the details.
                return None
            return status
    return None


def remote_error(method, error, context=""):
    """Return the RemoteCallError for a ``grpc.aio.AioRpcError`` raised by ``method``.

    ``context`` (for example the operation name) is added to the message when given.
    """
    code = error.code()
    where = f" for {context}" if context else ""
    message = describe_status(code.name, error.details() or "", _rich_status(error))
    return RemoteCallError(f"{method} failed{where}: {message}", code.value[0])


async def unary_call(method, stub_method, request, context=""):
    """Call a unary method with bgrid's client deadline; raise RemoteCallError on failure."""
    try:
        return await stub_method(request, timeout=UNARY_TIMEOUT_SECONDS)
    except grpc.aio.AioRpcError as error:
        raise remote_error(method, error, context) from None


def format_message(message, as_json):
    """Return a message in protobuf text format, or as JSON with the proto field names.

    JSON prints fields at their default values too, so that ``exit_code: 0`` shows.
    ``Any`` fields are expanded for every message type that bgrid imports.
    """
    if as_json:
        return json_format.MessageToJson(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    return text_format.MessageToString(message).rstrip("\n")
