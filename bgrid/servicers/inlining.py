"""Inlining of stdout, stderr and output files into ActionResults that the server returns.

GetActionResult and Execute both take ``inline_stdout``, ``inline_stderr`` and
``inline_output_files`` hints, and both serve results through ``inline_outputs``.
"""

from twisted.logger import Logger

from bgrid.bridge import as_future
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError

# Total bytes of stdout, stderr and output files inlined into one ActionResult. Blobs
# that do not fit are left for the client to download.
DEFAULT_MAX_INLINE_TOTAL_BYTES = 1024 * 1024

_log = Logger(namespace="bgrid.servicers.inlining")


async def inline_outputs(
    blob_store,
    result,
    inline_stdout=False,
    inline_stderr=False,
    inline_output_files=(),
    max_total_bytes=DEFAULT_MAX_INLINE_TOTAL_BYTES,
):
    """Fill the inline fields of the ActionResult ``result`` that the hints request.

    ``result`` is changed in place, so pass a copy of a shared message. Inline data already
    in ``result`` is dropped first where a digest lets the client download it, because
    REAPI says a server should not inline data that the client did not request. Blobs are read from
    ``blob_store`` (an ``IBlobStore``) in request order (stdout, stderr, then output files)
    until their total size would exceed ``max_total_bytes``. A blob that does not fit, is
    empty, has an invalid digest or cannot be read is left out, and the client downloads
    it by digest.
    """
    if result.HasField("stdout_digest"):
        result.ClearField("stdout_raw")
    if result.HasField("stderr_digest"):
        result.ClearField("stderr_raw")
    for output_file in result.output_files:
        output_file.ClearField("contents")

    requested = []
    if inline_stdout and result.HasField("stdout_digest"):
        requested.append((result.stdout_digest, _setter(result, "stdout_raw")))
    if inline_stderr and result.HasField("stderr_digest"):
        requested.append((result.stderr_digest, _setter(result, "stderr_raw")))
    inline_paths = set(inline_output_files)
    for output_file in result.output_files:
        if output_file.path in inline_paths:
            requested.append((output_file.digest, _setter(output_file, "contents")))

    digests = []
    setters = []
    budget = max_total_bytes
    for proto, setter in requested:
        try:
            digest = Digest.from_proto(proto)
        except InvalidArgumentError as error:
            # UpdateActionResult validates digests, but bots report results too. An output
            # with an invalid digest is not inlined.
            _log.warn("not inlining an output of an action result: {error}", error=error.message)
            continue
        if digest.size_bytes == 0 or digest.size_bytes > budget:
            continue
        budget -= digest.size_bytes
        digests.append(digest)
        setters.append(setter)
    if not digests:
        return

    blobs = await as_future(blob_store.get_many(digests))
    for digest, setter, blob in zip(digests, setters, blobs):
        if isinstance(blob, BaseException):
            # The client can still download the blob by digest, or learn it is gone.
            _log.warn(
                "not inlining blob {digest} into an action result: {error}",
                digest=str(digest),
                error=blob,
            )
            continue
        setter(blob)


def _setter(message, field):
    def set_field(value):
        setattr(message, field, value)

    return set_field
