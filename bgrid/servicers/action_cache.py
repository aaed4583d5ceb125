"""The REAPI ActionCache service: lookups of cached action results, with small outputs
inlined on request, and uploads of results that clients computed themselves."""

from google.protobuf.message import DecodeError

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid.bridge import as_awaitable
from bgrid.digest import Digest
from bgrid.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    DigestMismatchError,
    InvalidArgumentError,
    MissingBlobsError,
)
from bgrid.servicers.base import check_digest_function, unary_handler
from bgrid.servicers.inlining import DEFAULT_MAX_INLINE_TOTAL_BYTES, inline_outputs

_MISSING_BLOBS_ADVICE = (
    "blobs (upload the Action, its Command and every output to the CAS before "
    "UpdateActionResult)"
)


class ActionCacheServicer(remote_execution_pb2_grpc.ActionCacheServicer):
    """Serves ``action_cache`` (an ``IActionCache``) and inlines outputs from
    ``blob_store`` (the CAS, an ``IBlobStore``).

    Inlined data is never stored: UpdateActionResult moves ``stdout_raw``,
    ``stderr_raw`` and ``OutputFile.contents`` into the CAS, and GetActionResult fills
    them only as requested, within ``max_inline_total_bytes``.
    """

    def __init__(
        self,
        instance_names,
        action_cache,
        blob_store,
        max_inline_total_bytes=DEFAULT_MAX_INLINE_TOTAL_BYTES,
    ):
        self._instance_names = instance_names
        self._action_cache = action_cache
        self._store = blob_store
        self._max_inline_total_bytes = max_inline_total_bytes

    @unary_handler
    async def GetActionResult(self, request, context):
        instance_name = self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, field="action_digest")

        stored = await as_awaitable(self._action_cache.get(instance_name, action_digest))
        result = re_pb2.ActionResult()
        result.CopyFrom(stored)
        await inline_outputs(
            self._store,
            result,
            request.inline_stdout,
            request.inline_stderr,
            request.inline_output_files,
            self._max_inline_total_bytes,
        )
        return result

    @unary_handler
    async def UpdateActionResult(self, request, context):
        instance_name = self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, field="action_digest")
        if not request.HasField("action_result"):
            raise InvalidArgumentError("action_result: missing; send the ActionResult to store")

        # The request message belongs to this call, so its inline data is cleared in place
        # and no copy is made.
        result = request.action_result
        referenced, inline_blobs = _collect_result_blobs(result)
        if inline_blobs:
            await self._store_inline_blobs(inline_blobs)
        await self._check_blobs_stored(action_digest, referenced)

        await as_awaitable(self._action_cache.put(instance_name, action_digest, result))
        return result

    async def _store_inline_blobs(self, inline_blobs):
        outcomes = await as_awaitable(self._store.put_many(inline_blobs))
        for outcome in outcomes:
            if outcome is not None:
                raise outcome

    async def _check_blobs_stored(self, action_digest, referenced):
        """Raise MissingBlobsError unless the Action, its Command and ``referenced`` are in
        the CAS, as REAPI requires before a result is stored."""
        try:
            action_blob = await as_awaitable(self._store.get(action_digest))
        except (BlobNotFoundError, CorruptBlobError):
            # The store drops a corrupt blob, so the client has to upload it again.
            raise MissingBlobsError([action_digest], what=_MISSING_BLOBS_ADVICE) from None
        try:
            action = re_pb2.Action.FromString(action_blob)
        except DecodeError as error:
            raise InvalidArgumentError(
                f"action_digest: blob {action_digest} is not a valid Action message: {error}"
            ) from None
        command_digest = Digest.from_proto(
            action.command_digest, field=f"command_digest of Action {action_digest}"
        )

        missing = await as_awaitable(self._store.find_missing([command_digest, *referenced]))
        if missing:
            raise MissingBlobsError(missing, what=_MISSING_BLOBS_ADVICE)


def _collect_result_blobs(result):
    """Validate every digest in ``result`` and move its inline data out.

    Returns ``(referenced, inline_blobs)``: the digests the result refers to, and the
    ``(digest, data)`` pairs of inline data, which are cleared from ``result``. Inline
    data without a digest gets one. Raises InvalidArgumentError naming the field of a
    malformed digest, and DigestMismatchError when inline data does not match its digest.
    """
    referenced = []
    inline_blobs = []

    for index, output_file in enumerate(result.output_files):
        field = f"action_result.output_files[{index}]"
        if not output_file.HasField("digest"):
            raise InvalidArgumentError(f"{field}.digest: missing for output file {output_file.path!r}")
        digest = Digest.from_proto(output_file.digest, field=f"{field}.digest")
        referenced.append(digest)
        if output_file.contents:
            _check_inline_data(output_file.contents, digest, f"{field}.contents")
            inline_blobs.append((digest, output_file.contents))
            output_file.ClearField("contents")

    for index, directory in enumerate(result.output_directories):
        field = f"action_result.output_directories[{index}]"
        if not directory.HasField("tree_digest") and not directory.HasField("root_directory_digest"):
            raise InvalidArgumentError(
                f"{field}: output directory {directory.path!r} has neither tree_digest nor "
                f"root_directory_digest"
            )
        if directory.HasField("tree_digest"):
            referenced.append(Digest.from_proto(directory.tree_digest, field=f"{field}.tree_digest"))
        if directory.HasField("root_directory_digest"):
            referenced.append(
                Digest.from_proto(
                    directory.root_directory_digest, field=f"{field}.root_directory_digest"
                )
            )

    for stream in ("stdout", "stderr"):
        digest_field = f"{stream}_digest"
        raw_field = f"{stream}_raw"
        digest = None
        if result.HasField(digest_field):
            digest = Digest.from_proto(
                getattr(result, digest_field), field=f"action_result.{digest_field}"
            )
            referenced.append(digest)
        raw = getattr(result, raw_field)
        if raw:
            if digest is None:
                digest = Digest.of(raw)
                getattr(result, digest_field).CopyFrom(digest.to_proto(re_pb2.Digest))
            else:
                _check_inline_data(raw, digest, f"action_result.{raw_field}")
            inline_blobs.append((digest, raw))
            result.ClearField(raw_field)

    return referenced, inline_blobs


def _check_inline_data(data, digest, field):
    actual = Digest.of(data)
    if actual != digest:
        raise DigestMismatchError(
            f"{field}: inline data has digest {actual}, but the result gives {digest}"
        )
