"""A client of the content-addressable storage: FindMissingBlobs, batch and ByteStream
transfers, and whole directory trees, with every downloaded byte checked against its digest.
"""

import asyncio
import os
import shutil
import uuid

import grpc
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid.client import tree
from bgrid.client.channel import MAX_MESSAGE_BYTES
from bgrid.digest import EMPTY_DIGEST, Digest, new_hasher
from bgrid.errors import BgridError, MissingBlobsError

# ByteStream chunk size for uploads and the read buffer for local files.
CHUNK_BYTES = 1024 * 1024

# Batch limit used when the server sets no max_batch_total_size_bytes: gRPC's default
# maximum message size (4 MiB).
DEFAULT_BATCH_LIMIT_BYTES = 4 * 1024 * 1024

# Room for each BatchReadBlobsResponse entry's status and compressor fields, which the
# request does not show; an OK status takes 2 bytes.
_READ_RESPONSE_SLACK_BYTES = 16

# Transfers of one call (batches and ByteStream streams) that run at the same time.
PARALLEL_TRANSFERS = 4

# Deadline of unary calls, in seconds. ByteStream streams have none, since a large blob may
# take any time.
UNARY_TIMEOUT_SECONDS = 60.0


class RemoteCallError(BgridError):
    """A call to the server failed; ``code`` is the call's status code."""

    def __init__(self, message, code=code_pb2.INTERNAL):
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc_error(cls, method, error):
        """Wrap a ``grpc.aio.AioRpcError`` raised by ``method``."""
        status = error.code()
        return cls(f"{method} failed: {status.name}: {error.details()}", status.value[0])


class BlobIntegrityError(BgridError):
    """Downloaded data does not match the digest it was requested under."""

    code = code_pb2.DATA_LOSS

    def __init__(self, digest, problem):
        super().__init__(f"downloaded data of blob {digest} {problem}; it was discarded")
        self.digest = digest


def _varint_size(value):
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _field_size(payload_bytes):
    """Wire size of a length-delimited field whose tag fits in one byte."""
    return 1 + _varint_size(payload_bytes) + payload_bytes


def _entry_size(digest, extra_bytes=0):
    """Wire size of one batch entry: a digest, the data and ``extra_bytes`` of other fields."""
    digest_bytes = digest.to_proto(re_pb2.Digest).ByteSize()
    data_bytes = _field_size(digest.size_bytes) if digest.size_bytes else 0
    return _field_size(_field_size(digest_bytes) + data_bytes + extra_bytes)


def _pack(items, size_of, limit):
    """Split ``items`` greedily, in order, into lists whose sizes add up to at most ``limit``."""
    batches = []
    current = []
    current_size = 0
    for item in items:
        size = size_of(item)
        if current and current_size + size > limit:
            batches.append(current)
            current = []
            current_size = 0
        current.append(item)
        current_size += size
    if current:
        batches.append(current)
    return batches


async def _gather(coroutines, limit=PARALLEL_TRANSFERS):
    """Run coroutines with at most ``limit`` at a time; on the first failure cancel the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def guarded(coroutine):
        async with semaphore:
            return await coroutine

    tasks = [asyncio.ensure_future(guarded(coroutine)) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _read_file(path):
    with open(path, "rb") as source:
        return source.read()


def _write_file_atomically(path, data):
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as target:
        target.write(data)
    os.replace(temporary, path)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class CasClient:
    """Blob and tree transfers against one instance of a REAPI server.

    Create it and call its coroutines on the event loop that owns ``channel``. Failed calls
    raise ``RemoteCallError`` with the call's status code, absent blobs raise
    ``MissingBlobsError`` listing them all, and downloaded data that does not match its
    digest raises ``BlobIntegrityError``. The empty blob is never sent or requested.
    """

    def __init__(self, channel, instance_name=""):
        self.instance_name = instance_name
        self._cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
        self._capabilities_stub = remote_execution_pb2_grpc.CapabilitiesStub(channel)
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self._capabilities = None

    # --- capabilities and resource names ---------------------------------------------------

    async def get_capabilities(self):
        """Return the server's ``ServerCapabilities`` for this instance, fetched once."""
        if self._capabilities is None:
            request = re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name)
            try:
                self._capabilities = await self._capabilities_stub.GetCapabilities(
                    request, timeout=UNARY_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                raise RemoteCallError.from_rpc_error("GetCapabilities", error) from None
        return self._capabilities

    async def batch_limit(self):
        """Return the maximum wire size in bytes of one batch request or response.

        That is the server's ``max_batch_total_size_bytes``, or 4 MiB when the server sets
        none, and never more than the channel's message size limit.
        """
        capabilities = await self.get_capabilities()
        limit = capabilities.cache_capabilities.max_batch_total_size_bytes
        if limit <= 0:
            limit = DEFAULT_BATCH_LIMIT_BYTES
        return min(limit, MAX_MESSAGE_BYTES)

    def _prefix(self):
        return f"{self.instance_name}/" if self.instance_name else ""

    def upload_resource_name(self, digest, upload_id=None):
        """Return ``{instance}/uploads/{uuid}/blobs/{hash}/{size}`` for a ByteStream Write."""
        upload_id = upload_id or uuid.uuid4()
        return f"{self._prefix()}uploads/{upload_id}/blobs/{digest.hash}/{digest.size_bytes}"

    def read_resource_name(self, digest):
        """Return ``{instance}/blobs/{hash}/{size}`` for a ByteStream Read."""
        return f"{self._prefix()}blobs/{digest.hash}/{digest.size_bytes}"

    def _base_request_size(self):
        name_bytes = len(self.instance_name.encode("utf-8"))
        return _field_size(name_bytes) if name_bytes else 0

    # --- FindMissingBlobs ------------------------------------------------------------------

    async def find_missing(self, digests):
        """Return the digests of ``digests`` that the server does not store, each once.

        The empty blob is never reported missing. Large lists are split into several calls.
        """
        requested = [digest for digest in dict.fromkeys(digests) if digest.size_bytes]
        if not requested:
            return []
        limit = await self.batch_limit() - self._base_request_size()
        digest_size = lambda digest: _field_size(digest.to_proto(re_pb2.Digest).ByteSize())  # noqa: E731
        batches = _pack(requested, digest_size, limit)
        missing = []
        for batch in batches:
            request = re_pb2.FindMissingBlobsRequest(
                instance_name=self.instance_name,
                blob_digests=[digest.to_proto(re_pb2.Digest) for digest in batch],
            )
            try:
                response = await self._cas.FindMissingBlobs(request, timeout=UNARY_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as error:
                raise RemoteCallError.from_rpc_error("FindMissingBlobs", error) from None
            missing.extend(
                Digest.from_proto(proto, "missing_blob_digests")
                for proto in response.missing_blob_digests
            )
        return list(dict.fromkeys(missing))

    # --- uploads ---------------------------------------------------------------------------

    async def upload(self, blobs=None, files=None):
        """Upload blobs given as ``{Digest: bytes}`` and files given as ``{Digest: path}``.

        Blobs that fit go in BatchUpdateBlobs calls within ``batch_limit()``, counting each
        entry's digest and framing. Larger ones go through ByteStream Write in chunks of at
        most 1 MiB. Uploads everything given, present on the server or not; see
        ``upload_missing``. A file must not change until the call returns, or the server
        rejects it as not matching its digest.
        """
        sources = {}
        for digest, data in (blobs or {}).items():
            sources[digest] = data
        for digest, path in (files or {}).items():
            sources.setdefault(digest, path)
        sources.pop(EMPTY_DIGEST, None)
        if not sources:
            return

        limit = await self.batch_limit()
        base = self._base_request_size()
        small = [digest for digest in sources if base + _entry_size(digest) <= limit]
        large = [digest for digest in sources if base + _entry_size(digest) > limit]
        batches = _pack(small, _entry_size, limit - base)

        transfers = [self._update_batch(batch, sources) for batch in batches]
        transfers += [self._write(digest, sources[digest]) for digest in large]
        await _gather(transfers)

    async def upload_missing(self, blobs=None, files=None):
        """Upload only the given blobs and files that the server lacks; return their digests."""
        blobs = blobs or {}
        files = files or {}
        missing = await self.find_missing(list(blobs) + list(files))
        missing_set = set(missing)
        await self.upload(
            blobs={digest: data for digest, data in blobs.items() if digest in missing_set},
            files={digest: path for digest, path in files.items() if digest in missing_set},
        )
        return missing

    async def _update_batch(self, batch, sources):
        paths = [sources[digest] for digest in batch if isinstance(sources[digest], str)]
        contents = dict(zip(paths, await asyncio.to_thread(lambda: [_read_file(p) for p in paths])))
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance_name)
        for digest in batch:
            source = sources[digest]
            data = contents[source] if isinstance(source, str) else source
            request.requests.add(digest=digest.to_proto(re_pb2.Digest), data=data)
        try:
            response = await self._cas.BatchUpdateBlobs(request, timeout=UNARY_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise RemoteCallError.from_rpc_error("BatchUpdateBlobs", error) from None
        failures = [entry for entry in response.responses if entry.status.code != code_pb2.OK]
        if failures:
            first = failures[0]
            digest = Digest(first.digest.hash, first.digest.size_bytes)
            raise RemoteCallError(
                f"BatchUpdateBlobs failed for {len(failures)} of {len(batch)} blobs; "
                f"blob {digest}: {code_pb2.Code.Name(first.status.code)}: {first.status.message}",
                first.status.code,
            )

    async def _write(self, digest, source):
        resource_name = self.upload_resource_name(digest)

        async def requests():
            offset = 0
            if isinstance(source, str):
                with open(source, "rb") as reader:
                    while True:
                        chunk = await asyncio.to_thread(reader.read, CHUNK_BYTES)
                        finish = offset + len(chunk) >= digest.size_bytes or not chunk
                        yield bytestream_pb2.WriteRequest(
                            resource_name=resource_name if offset == 0 else "",
                            write_offset=offset,
                            finish_write=finish,
                            data=chunk,
                        )
                        offset += len(chunk)
                        if finish:
                            return
            else:
                view = memoryview(source)
                while True:
                    chunk = bytes(view[offset:offset + CHUNK_BYTES])
                    finish = offset + len(chunk) >= len(source)
                    yield bytestream_pb2.WriteRequest(
                        resource_name=resource_name if offset == 0 else "",
                        write_offset=offset,
                        finish_write=finish,
                        data=chunk,
                    )
                    offset += len(chunk)
                    if finish:
                        return

        try:
            response = await self._bytestream.Write(requests())
        except grpc.aio.AioRpcError as error:
            raise RemoteCallError.from_rpc_error(f"ByteStream Write of {digest}", error) from None
        # A server that already stores the blob may end the stream early, and it then reports
        # the full size as committed.
        if response.committed_size != digest.size_bytes:
            raise RemoteCallError(
                f"ByteStream Write of {digest} committed {response.committed_size} bytes, "
                f"expected {digest.size_bytes}"
            )

    # --- downloads -------------------------------------------------------------------------

    def _check_data(self, digest, data):
        actual = Digest.of(data)
        if actual != digest:
            raise BlobIntegrityError(digest, f"has digest {actual}")

    async def read_blobs(self, digests):
        """Download blobs into memory and return ``{Digest: bytes}``.

        Meant for small blobs such as Directory and Command messages; blobs too large for a
        batch are read through ByteStream, still into memory. Raises MissingBlobsError
        listing every absent blob.
        """
        requested = list(dict.fromkeys(digests))
        results = {digest: b"" for digest in requested if not digest.size_bytes}
        requested = [digest for digest in requested if digest.size_bytes]
        if not requested:
            return results

        limit = await self.batch_limit()
        base = self._base_request_size()
        response_size = lambda digest: _entry_size(digest, _READ_RESPONSE_SLACK_BYTES)  # noqa: E731
        small = [digest for digest in requested if base + response_size(digest) <= limit]
        large = [digest for digest in requested if base + response_size(digest) > limit]
        batches = _pack(small, response_size, limit - base)

        missing = []

        async def read_batch(batch):
            for digest, data in await self._read_batch(batch, missing):
                results[digest] = data

        async def read_one(digest):
            chunks = []

            async def append(chunk):
                chunks.append(chunk)

            if await self._read_stream(digest, append):
                data = b"".join(chunks)
                self._check_data(digest, data)
                results[digest] = data
            else:
                missing.append(digest)

        await _gather([read_batch(batch) for batch in batches] + [read_one(d) for d in large])
        if missing:
            raise MissingBlobsError(missing)
        return results

    async def read_blob(self, digest):
        """Download one blob into memory; see ``read_blobs``."""
        return (await self.read_blobs([digest]))[digest]

    async def _read_batch(self, batch, missing):
        """Return ``[(digest, data)]`` for a batch; append absent digests to ``missing``."""
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.instance_name,
            digests=[digest.to_proto(re_pb2.Digest) for digest in batch],
        )
        try:
            response = await self._cas.BatchReadBlobs(request, timeout=UNARY_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as error:
            raise RemoteCallError.from_rpc_error("BatchReadBlobs", error) from None

        requested = set(batch)
        found = []
        for entry in response.responses:
            digest = Digest(entry.digest.hash, entry.digest.size_bytes)
            if digest not in requested:
                raise RemoteCallError(f"BatchReadBlobs returned blob {digest}, which was not requested")
            if entry.status.code == code_pb2.NOT_FOUND:
                missing.append(digest)
            elif entry.status.code != code_pb2.OK:
                raise RemoteCallError(
                    f"BatchReadBlobs failed for blob {digest}: "
                    f"{code_pb2.Code.Name(entry.status.code)}: {entry.status.message}",
                    entry.status.code,
                )
            else:
                self._check_data(digest, entry.data)
                found.append((digest, entry.data))
        answered = {digest for digest, _ in found} | set(missing)
        unanswered = requested - answered
        if unanswered:
            raise RemoteCallError(
                f"BatchReadBlobs returned no entry for {len(unanswered)} requested blobs, "
                f"such as {next(iter(unanswered))}"
            )
        return found

    async def _read_stream(self, digest, write):
        """Stream a blob through ByteStream Read into the coroutine function ``write(chunk)``.

        Returns False when the blob is absent. Checks only the total size; callers hash.
        """
        request = bytestream_pb2.ReadRequest(resource_name=self.read_resource_name(digest))
        received = 0
        call = self._bytestream.Read(request)
        try:
            async for response in call:
                received += len(response.data)
                if received > digest.size_bytes:
                    raise BlobIntegrityError(digest, f"has more than {digest.size_bytes} bytes")
                await write(response.data)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise RemoteCallError.from_rpc_error(f"ByteStream Read of {digest}", error) from None
        finally:
            call.cancel()
        if received != digest.size_bytes:
            raise BlobIntegrityError(digest, f"has only {received} bytes")
        return True

    async def download_files(self, targets):
        """Download blobs into local files, given as ``{Digest: path}``.

        Each file appears whole under its path, by rename, after its digest was checked,
        and existing files are replaced. Large blobs stream to disk through ByteStream Read
        without being held in memory. Raises MissingBlobsError listing every absent blob;
        the files of the other blobs are still written.
        """
        targets = dict(targets)
        empty = [path for digest, path in targets.items() if not digest.size_bytes]
        await asyncio.to_thread(lambda: [_write_file_atomically(path, b"") for path in empty])
        requested = [digest for digest in targets if digest.size_bytes]
        if not requested:
            return

        limit = await self.batch_limit()
        base = self._base_request_size()
        response_size = lambda digest: _entry_size(digest, _READ_RESPONSE_SLACK_BYTES)  # noqa: E731
        small = [digest for digest in requested if base + response_size(digest) <= limit]
        large = [digest for digest in requested if base + response_size(digest) > limit]
        batches = _pack(small, response_size, limit - base)

        missing = []

        async def read_batch(batch):
            found = await self._read_batch(batch, missing)
            await asyncio.to_thread(
                lambda: [_write_file_atomically(targets[digest], data) for digest, data in found]
            )

        async def read_one(digest):
            if not await self._stream_to_file(digest, targets[digest]):
                missing.append(digest)

        await _gather([read_batch(batch) for batch in batches] + [read_one(d) for d in large])
        if missing:
            raise MissingBlobsError(missing)

    async def _stream_to_file(self, digest, path):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        hasher = new_hasher()
        try:
            with open(temporary, "wb") as target:

                async def write(chunk):
                    hasher.update(chunk)
                    await asyncio.to_thread(target.write, chunk)

                if not await self._read_stream(digest, write):
                    return False
            actual = Digest(hasher.hexdigest(), digest.size_bytes)
            if actual != digest:
                raise BlobIntegrityError(digest, f"has digest {actual}")
            os.replace(temporary, path)
        finally:
            _remove_quietly(temporary)
        return True

    # --- directory trees -------------------------------------------------------------------

    async def upload_directory(self, path):
        """Upload a local directory as Directory messages and files; return the root digest.

        Only what the server lacks is sent. See ``tree.scan_directory`` for how files,
        executable bits and symlinks are recorded.
        """
        scanned = await asyncio.to_thread(tree.scan_directory, path)
        await self.upload_missing(blobs=scanned.directory_blobs, files=scanned.files)
        return scanned.root_digest

    async def fetch_directories(self, root_digest):
        """Return ``{Digest: Directory}`` for the tree below ``root_digest``, level by level."""
        directories = {}
        pending = [root_digest]
        while pending:
            blobs = await self.read_blobs(pending)
            next_level = []
            for digest in pending:
                directory = tree.parse_directory(blobs[digest], f"directory {digest}")
                directories[digest] = directory
                for node in directory.directories:
                    child = Digest.from_proto(node.digest, f"directory {node.name!r} in {digest}")
                    if child not in directories:
                        next_level.append(child)
            pending = list(dict.fromkeys(next_level))
        return directories

    async def download_directory(self, root_digest, destination):
        """Download the Directory tree below ``root_digest`` into ``destination``.

        ``destination`` is created if needed and must be empty. The whole tree is checked
        (see ``tree.layout_tree``) before anything is written, so an invalid name or a
        symlink that leaves ``destination`` raises InvalidArgumentError and writes nothing.
        """
        directories = await self.fetch_directories(root_digest)
        await self._materialize(root_digest, directories, destination)

    async def download_tree(self, tree_digest, destination):
        """Download the ``Tree`` message ``tree_digest`` and its files into ``destination``.

        The same checks as for ``download_directory`` apply.
        """
        data = await self.read_blob(tree_digest)
        root_digest, directories = tree.parse_tree(data)
        await self._materialize(root_digest, directories, destination)

    async def _materialize(self, root_digest, directories, destination):
        layout = tree.layout_tree(root_digest, directories)
        await asyncio.to_thread(tree.check_empty_destination, destination)

        # Each distinct content is downloaded once into a staging directory on the same file
        # system, moved to its first path and copied to any other.
        staging = os.path.join(destination, f".bgrid-download-{uuid.uuid4().hex}")
        os.mkdir(staging)
        try:
            staged = {digest: os.path.join(staging, digest.hash) for digest in layout.file_digests()}
            await self.download_files(staged)
            placed = {}

            def place_file(entry, path):
                if entry.digest in placed:
                    shutil.copyfile(placed[entry.digest], path)
                else:
                    os.replace(staged[entry.digest], path)
                    placed[entry.digest] = path

            await asyncio.to_thread(tree.create_layout, destination, layout, place_file)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)
