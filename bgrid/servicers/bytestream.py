"""The ByteStream service over the CAS: streamed reads of blobs and resumable streamed
uploads, named by REAPI resource names."""

import asyncio
import collections

from google.rpc import code_pb2
from twisted.logger import Logger

from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid.bridge import as_future
from bgrid.errors import (
    BgridError,
    DigestMismatchError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
)
from bgrid.resource_names import WRITE_FORM, parse_read_resource_name, parse_write_resource_name
from bgrid.servicers.base import stream_handler, unary_handler

# Maximum size of ReadResponse.data in bytes, a quarter of gRPC's default 4 MiB message
# limit.
DEFAULT_READ_CHUNK_SIZE_BYTES = 1024 * 1024

# Time in seconds for which an interrupted upload is kept for its client to resume.
DEFAULT_RESUME_TIMEOUT_SECONDS = 120.0

# Maximum number of interrupted uploads kept at once. Past it the oldest is discarded,
# because each kept LMDB writer buffers its last partial chunk (under 1 MiB) in memory.
DEFAULT_MAX_KEPT_UPLOADS = 100


class UploadInProgressError(BgridError):
    """Another Write stream is uploading the same resource name right now."""

    code = code_pb2.ABORTED


class _StreamOrderError(InvalidArgumentError):
    """An out-of-order WriteRequest. The data accepted before it stays valid, so the upload
    is kept for resuming."""


class _Upload:
    """One upload of a resource name: streaming now, or kept for a client to resume."""

    def __init__(self, resource_name, digest, writer):
        self.resource_name = resource_name
        self.digest = digest
        self.writer = writer
        self.streaming = False
        self.writer_failed = False
        self.expiry = None

    @property
    def committed_size(self):
        return self.writer.committed_size


class ByteStreamServicer(bytestream_pb2_grpc.ByteStreamServicer):
    """Serves ByteStream reads and writes of the CAS blobs in ``blob_store``.

    A stream can end without ``finish_write`` because the client half-closed it, was
    cancelled or sent a request out of order. The upload then keeps its writer for
    ``resume_timeout_seconds`` on ``clock`` (an ``IReactorTime``), and a Write with the
    same resource name can continue at the offset that QueryWriteStatus reports. Call
    ``close`` when the server stops, to discard the kept uploads.
    """

    log = Logger()

    def __init__(
        self,
        instance_names,
        blob_store,
        clock,
        read_chunk_size_bytes=DEFAULT_READ_CHUNK_SIZE_BYTES,
        resume_timeout_seconds=DEFAULT_RESUME_TIMEOUT_SECONDS,
        max_kept_uploads=DEFAULT_MAX_KEPT_UPLOADS,
    ):
        if read_chunk_size_bytes <= 0:
            raise ValueError(f"read_chunk_size_bytes must be positive, got {read_chunk_size_bytes}")
        self._instance_names = instance_names
        self._store = blob_store
        self._clock = clock
        self._read_chunk_size_bytes = read_chunk_size_bytes
        self._resume_timeout_seconds = resume_timeout_seconds
        self._max_kept_uploads = max_kept_uploads
        # Every upload by resource name, and the kept ones again, oldest first.
        self._uploads = {}
        self._kept_uploads = collections.OrderedDict()
        self._closed = False

    @stream_handler
    async def Read(self, request, context):
        digest = parse_read_resource_name(self._instance_names, request.resource_name).digest
        # google/bytestream/bytestream.proto prescribes OUT_OF_RANGE for a negative
        # read_offset, and an unspecified error for a negative read_limit.
        if request.read_offset < 0:
            raise OutOfRangeError(
                f"read_offset: invalid offset {request.read_offset}: must not be negative"
            )
        if request.read_limit < 0:
            raise InvalidArgumentError(
                f"read_limit: invalid limit {request.read_limit}: must not be negative "
                f"(0 reads to the end)"
            )
        if request.read_offset > digest.size_bytes:
            raise OutOfRangeError(
                f"read_offset: offset {request.read_offset} is past the end of blob "
                f"{digest}, which has {digest.size_bytes} bytes"
            )

        if (
            request.read_offset == 0
            and request.read_limit in (0, digest.size_bytes)
            and digest.size_bytes <= self._read_chunk_size_bytes
        ):
            # A blob that fits in one response is read and checked in one transaction,
            # without a reader.
            data = await as_future(self._store.get(digest))
            if data:
                yield bytestream_pb2.ReadResponse(data=data)
            return

        reader = await as_future(
            self._store.open_reader(digest, request.read_offset, request.read_limit)
        )
        reading = reader.read(self._read_chunk_size_bytes)
        try:
            while True:
                data = await as_future(reading)
                if not data:
                    break
                # The next piece is read while this one is sent.
                reading = reader.read(self._read_chunk_size_bytes)
                yield bytestream_pb2.ReadResponse(data=data)
        finally:
            reader.close()
            # A read still in flight when the client cancels has no caller left, so its
            # failure is consumed here rather than logged as an unhandled error.
            reading.addErrback(lambda _: None)

    @unary_handler
    async def Write(self, request_iterator, context):
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgumentError(
                "Write stream ended before its first request; send at least one WriteRequest "
                "with resource_name set"
            )
        if not first.resource_name:
            raise InvalidArgumentError(
                f"resource_name: missing on the first WriteRequest; expected the form {WRITE_FORM}"
            )
        digest = parse_write_resource_name(self._instance_names, first.resource_name).digest

        # Each read of a bytes field copies it out of the message, so data is read once.
        first_data = first.data
        if (
            first.finish_write
            and first.write_offset == 0
            and len(first_data) == digest.size_bytes
            and first.resource_name not in self._uploads
        ):
            # The whole blob came in one request: store it as BatchUpdateBlobs does,
            # which hashes and writes it in one hop and succeeds when it is stored
            # already.
            await as_future(self._store.put(digest, first_data))
            return bytestream_pb2.WriteResponse(committed_size=digest.size_bytes)

        if await self._is_stored(digest):
            self._discard_kept_upload(first.resource_name)
            return bytestream_pb2.WriteResponse(committed_size=digest.size_bytes)

        upload = self._start_streaming(first.resource_name, digest, first.write_offset)
        try:
            finished = await self._receive(upload, first, first_data, requests)
        except BaseException as error:
            if upload.writer_failed or isinstance(error, DigestMismatchError):
                self._discard(upload)
            else:
                self._keep_for_resume(upload)
            raise

        if finished:
            self._finish(upload)
            return bytestream_pb2.WriteResponse(committed_size=digest.size_bytes)
        # The client half-closed without finish_write. ByteStream then returns the bytes
        # received so far, and the client may resume from there.
        committed_size = upload.committed_size
        self._keep_for_resume(upload)
        return bytestream_pb2.WriteResponse(committed_size=committed_size)

    @unary_handler
    async def QueryWriteStatus(self, request, context):
        resource_name = request.resource_name
        digest = parse_write_resource_name(self._instance_names, resource_name).digest

        if await self._is_stored(digest):
            return bytestream_pb2.QueryWriteStatusResponse(
                committed_size=digest.size_bytes, complete=True
            )
        upload = self._uploads.get(resource_name)
        if upload is not None:
            return bytestream_pb2.QueryWriteStatusResponse(
                committed_size=upload.committed_size, complete=False
            )
        raise NotFoundError(
            f"resource_name: no upload of {resource_name!r} is in progress or kept for "
            f"resumption, and blob {digest} is not stored; start a Write at offset 0"
        )

    def close(self):
        """Discard every kept upload; uploads still streaming are discarded when they end."""
        self._closed = True
        for upload in list(self._kept_uploads.values()):
            self._discard(upload)

    async def _is_stored(self, digest):
        missing = await as_future(self._store.find_missing([digest]))
        return not missing

    def _start_streaming(self, resource_name, digest, first_offset):
        """Return the upload that a new Write stream continues or starts.

        A kept upload is resumed, unless the stream starts at offset 0, which restarts it.
        """
        upload = self._uploads.get(resource_name)
        if upload is not None and upload.streaming:
            raise UploadInProgressError(
                f"resource_name: another Write stream is uploading {resource_name!r}; "
                f"retry once it ends, or upload under a new uuid"
            )
        if upload is not None:
            self._unkeep(upload)
            if first_offset == 0 and upload.committed_size > 0:
                self._discard(upload)
                upload = None
        if upload is None:
            upload = _Upload(resource_name, digest, self._store.open_writer(digest))
            self._uploads[resource_name] = upload
        upload.streaming = True
        return upload

    async def _receive(self, upload, request, data, requests):
        """Feed the stream's requests to the upload's writer, starting with ``request``,
        whose ``data`` the caller has read already.

        Returns True once ``finish_write`` committed the blob, and False when the client
        half-closed the stream before that.
        """
        digest = upload.digest
        while request is not None:
            if request.resource_name and request.resource_name != upload.resource_name:
                raise _StreamOrderError(
                    f"resource_name: {request.resource_name!r} differs from "
                    f"{upload.resource_name!r} of the first request in this stream"
                )
            if request.write_offset != upload.committed_size:
                raise _StreamOrderError(
                    f"write_offset: offset {request.write_offset} does not match the "
                    f"{upload.committed_size} bytes committed for {upload.resource_name!r}; "
                    f"call QueryWriteStatus and continue from its committed_size"
                )

            end = request.write_offset + len(data)
            if end > digest.size_bytes:
                raise DigestMismatchError(
                    f"data: the upload of {upload.resource_name!r} reaches byte {end}, "
                    f"past the blob size of {digest.size_bytes} bytes"
                )
            if data:
                await self._call_writer(upload, upload.writer.write, data)

            if request.finish_write:
                if end != digest.size_bytes:
                    raise DigestMismatchError(
                        f"finish_write: the upload of {upload.resource_name!r} ended "
                        f"after {end} bytes, but the blob size is {digest.size_bytes} bytes"
                    )
                await self._call_writer(upload, upload.writer.commit)
                # NOTE: the response goes out without waiting for the client to half-close,
                # so a request sent after finish_write is dropped, not rejected.
                return True

            request = await anext(requests, None)
            if request is not None:
                data = request.data
        return False

    async def _call_writer(self, upload, method, *args):
        try:
            await as_future(method(*args))
        except asyncio.CancelledError:
            raise
        except BaseException:
            upload.writer_failed = True
            raise

    def _finish(self, upload):
        upload.streaming = False
        if self._uploads.get(upload.resource_name) is upload:
            del self._uploads[upload.resource_name]

    def _keep_for_resume(self, upload):
        upload.streaming = False
        if self._closed or upload.committed_size == 0:
            self._discard(upload)
            return

        upload.expiry = self._clock.callLater(
            self._resume_timeout_seconds, self._expire, upload
        )
        self._kept_uploads[upload.resource_name] = upload
        while len(self._kept_uploads) > self._max_kept_uploads:
            _, oldest = self._kept_uploads.popitem(last=False)
            self.log.info(
                "discarding kept upload {resource_name} at {committed_size} bytes: more "
                "than {max_kept_uploads} interrupted uploads are kept",
                resource_name=oldest.resource_name,
                committed_size=oldest.committed_size,
                max_kept_uploads=self._max_kept_uploads,
            )
            self._discard(oldest)

    def _unkeep(self, upload):
        if upload.expiry is not None and upload.expiry.active():
            upload.expiry.cancel()
        upload.expiry = None
        if self._kept_uploads.get(upload.resource_name) is upload:
            del self._kept_uploads[upload.resource_name]

    def _expire(self, upload):
        upload.expiry = None
        self.log.info(
            "discarding upload {resource_name} at {committed_size} bytes: not resumed "
            "within {timeout} seconds",
            resource_name=upload.resource_name,
            committed_size=upload.committed_size,
            timeout=self._resume_timeout_seconds,
        )
        self._discard(upload)

    def _discard_kept_upload(self, resource_name):
        upload = self._kept_uploads.get(resource_name)
        if upload is not None:
            self._discard(upload)

    def _discard(self, upload):
        """Forget the upload and abort its writer, deleting the data written so far."""
        self._unkeep(upload)
        self._finish(upload)
        aborting = upload.writer.abort()
        if aborting is not None:
            aborting.addErrback(self._log_abort_failure, upload.resource_name)

    def _log_abort_failure(self, failure, resource_name):
        self.log.failure(
            "failed to abort the writer of upload {resource_name}",
            failure,
            resource_name=resource_name,
        )
