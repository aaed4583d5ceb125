"""Parsing of the ByteStream resource names through which REAPI clients read and write
CAS blobs.

Reads name ``{instance_name}/blobs/{digest_function/}{hash}/{size}`` and writes name
``{instance_name}/uploads/{uuid}/blobs/{digest_function/}{hash}/{size}{/optional_metadata}``.
The instance name may span several segments or be empty (then the leading ``/`` is left
out), and REAPI forbids instance name segments equal to the keywords in
``RESERVED_SEGMENTS``, so the first keyword ends the instance name. The digest function
segment is present only for functions that the hash length cannot identify, and the
``compressed-blobs/{compressor}/...`` forms name compressed transfers.
"""

from typing import NamedTuple

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError

RESERVED_SEGMENTS = frozenset(
    {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"}
)

READ_FORM = "{instance_name}/blobs/{hash}/{size}"
WRITE_FORM = "{instance_name}/uploads/{uuid}/blobs/{hash}/{size}"

# Lowercase DigestFunction.Value names, as they appear in resource names.
_DIGEST_FUNCTION_SEGMENTS = frozenset(
    name.lower() for name in re_pb2.DigestFunction.Value.keys() if name != "UNKNOWN"
)
_SHA256_SEGMENT = "sha256"


class BlobResource(NamedTuple):
    """A parsed ByteStream read resource name."""

    instance_name: str
    digest: Digest


class UploadResource(NamedTuple):
    """A parsed ByteStream write resource name."""

    instance_name: str
    upload_id: str
    digest: Digest


def parse_read_resource_name(instance_names, resource_name):
    """Parse the resource name of a ByteStream ``Read`` into a ``BlobResource``.

    Raises InvalidArgumentError naming the resource name when it is malformed, names an
    unknown instance, a compressor or a digest function other than SHA-256.
    """
    instance_name, segments = _split_instance_name(instance_names, resource_name, READ_FORM)
    keyword = segments[0]
    if keyword == "compressed-blobs":
        raise _compressed_blobs_error(resource_name, READ_FORM)
    if keyword != "blobs":
        raise _form_error(resource_name, READ_FORM, f"found {keyword!r} where 'blobs' belongs")

    digest = _parse_digest_segments(resource_name, segments[1:], READ_FORM, allow_metadata=False)
    return BlobResource(instance_name, digest)


def parse_write_resource_name(instance_names, resource_name):
    """Parse the resource name of a ByteStream ``Write`` or ``QueryWriteStatus`` into an
    ``UploadResource``.

    Segments after ``{size}`` are optional metadata and are ignored. Raises
    InvalidArgumentError naming the resource name when it is malformed, names an unknown
    instance, a compressor or a digest function other than SHA-256.
    """
    instance_name, segments = _split_instance_name(instance_names, resource_name, WRITE_FORM)
    keyword = segments[0]
    if keyword != "uploads":
        raise _form_error(resource_name, WRITE_FORM, f"found {keyword!r} where 'uploads' belongs")
    if len(segments) < 2 or not segments[1] or segments[1] in RESERVED_SEGMENTS:
        raise _form_error(resource_name, WRITE_FORM, "the upload uuid after 'uploads' is missing")
    upload_id = segments[1]

    if len(segments) < 3:
        raise _form_error(resource_name, WRITE_FORM, "'blobs' after the upload uuid is missing")
    if segments[2] == "compressed-blobs":
        raise _compressed_blobs_error(resource_name, WRITE_FORM)
    if segments[2] != "blobs":
        raise _form_error(
            resource_name, WRITE_FORM, f"found {segments[2]!r} where 'blobs' belongs"
        )

    digest = _parse_digest_segments(resource_name, segments[3:], WRITE_FORM, allow_metadata=True)
    return UploadResource(instance_name, upload_id, digest)


def _split_instance_name(instance_names, resource_name, form):
    """Return the served instance name and the segments from the first keyword on."""
    segments = resource_name.split("/")
    for index, segment in enumerate(segments):
        if segment in RESERVED_SEGMENTS:
            instance_name = "/".join(segments[:index])
            instance_names.check(instance_name, field=f"resource name {resource_name!r}")
            return instance_name, segments[index:]
    raise _form_error(resource_name, form, "it contains no 'blobs' or 'uploads' segment")


def _parse_digest_segments(resource_name, segments, form, allow_metadata):
    """Parse ``[digest_function/]hash/size[/metadata...]`` into a ``Digest``."""
    if segments and segments[0] in _DIGEST_FUNCTION_SEGMENTS:
        # REAPI requires clients to omit a "sha256" segment, but accepting one is harmless.
        if segments[0] != _SHA256_SEGMENT:
            raise InvalidArgumentError(
                f"resource name {resource_name!r}: unsupported digest function "
                f"{segments[0]!r}; this server supports only SHA-256, named by leaving the "
                f"digest function segment out"
            )
        segments = segments[1:]

    if len(segments) < 2:
        raise _form_error(resource_name, form, "the hash or size segment is missing")
    if len(segments) > 2 and not allow_metadata:
        extra = "/".join(segments[2:])
        raise _form_error(resource_name, form, f"unexpected segments {extra!r} after the size")
    return Digest.parse(segments[0], segments[1], field=f"resource name {resource_name!r}")


def _form_error(resource_name, form, problem):
    return InvalidArgumentError(
        f"invalid resource name {resource_name!r}: {problem}; expected the form {form}"
    )


def _compressed_blobs_error(resource_name, form):
    return InvalidArgumentError(
        f"resource name {resource_name!r}: compressed-blobs transfers are not supported "
        f"because this server advertises no compressors; use the form {form}"
    )
