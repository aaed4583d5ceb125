"""The REAPI ContentAddressableStorage service: existence checks, batched uploads and
downloads of small blobs, and paged listings of Directory trees."""

import base64
import binascii
import itertools
import operator
import struct

from google.protobuf.message import DecodeError

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid.bridge import as_future
from bgrid.digest import Digest, digests_from_protos
from bgrid.errors import (
    BgridError,
    BlobNotFoundError,
    DigestMismatchError,
    InvalidArgumentError,
    NotFoundError,
    to_status,
)
from bgrid.servicers.base import check_digest_function, stream_handler, unary_handler

# GetTree page size used when the request leaves page_size at 0, and the cap on larger
# requested sizes. A page also ends before its directories exceed
# max_batch_total_size_bytes, so a response fits the gRPC message limit unless one
# Directory alone is larger than that.
DEFAULT_MAX_TREE_PAGE_SIZE = 1000

# Directories fetched in one storage transaction while GetTree walks a tree.
_TREE_READ_BATCH = 256

_get_digest = operator.attrgetter("digest")
_get_data = operator.attrgetter("data")
_get_compressor = operator.attrgetter("compressor")


class ContentAddressableStorageServicer(remote_execution_pb2_grpc.ContentAddressableStorageServicer):
    """Serves the CAS of ``blob_store`` (an ``IBlobStore``) to every configured instance.

    All instances share one store. ``max_batch_total_size_bytes`` caps the blob bytes
    of one BatchUpdateBlobs or BatchReadBlobs call and of one GetTree response. SplitBlob
    and SpliceBlob are left unimplemented (the generated base class returns
    UNIMPLEMENTED), as the Capabilities service advertises.
    """

    def __init__(
        self,
        instance_names,
        blob_store,
        max_batch_total_size_bytes,
        max_tree_page_size=DEFAULT_MAX_TREE_PAGE_SIZE,
    ):
        if max_batch_total_size_bytes <= 0:
            raise ValueError(
                f"max_batch_total_size_bytes must be positive, got {max_batch_total_size_bytes}"
            )
        if max_tree_page_size <= 0:
            raise ValueError(f"max_tree_page_size must be positive, got {max_tree_page_size}")
        self._instance_names = instance_names
        self._store = blob_store
        self._max_batch_total_size_bytes = max_batch_total_size_bytes
        self._max_tree_page_size = max_tree_page_size

    @unary_handler
    async def FindMissingBlobs(self, request, context):
        self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        protos = list(request.blob_digests)
        digests = digests_from_protos(protos, field="blob_digests")

        missing = await as_future(self._store.find_missing(digests))
        response = re_pb2.FindMissingBlobsResponse()
        if missing:
            # The request's own Digest messages are copied into the response, which is
            # cheaper than building new ones.
            response.missing_blob_digests.extend(_first_occurrences(protos, digests, missing))
        return response

    @unary_handler
    async def BatchUpdateBlobs(self, request, context):
        self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        entries = list(request.requests)
        datas = list(map(_get_data, entries))
        total_size = sum(map(len, datas))
        self._check_batch_size("BatchUpdateBlobs", "upload", total_size)

        # Blobs that fail validation get their error status here; the others are stored
        # together and get the status that storing them returned.
        statuses = [None] * len(entries)
        blobs, positions = _validate_uploads(entries, datas, statuses)
        if blobs:
            outcomes = await as_future(self._store.put_many(blobs))
            for index, outcome in zip(positions, outcomes):
                if outcome is not None:
                    statuses[index] = to_status(outcome)

        response = re_pb2.BatchUpdateBlobsResponse()
        add_response = response.responses.add
        for entry, status in zip(entries, statuses):
            added = add_response()
            added.digest.CopyFrom(entry.digest)
            if status is None:
                added.status.SetInParent()
            else:
                added.status.CopyFrom(status)
        return response

    @unary_handler
    async def BatchReadBlobs(self, request, context):
        self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)

        # Any compressor the client accepts is ignored: IDENTITY is always acceptable.
        protos = list(request.digests)
        statuses = [None] * len(protos)
        try:
            digests = digests_from_protos(protos, field="digests")
            positions = range(len(protos))
        except InvalidArgumentError:
            digests, positions = _validate_read_digests(protos, statuses)
        total_size = sum(digest.size_bytes for digest in digests)
        self._check_batch_size("BatchReadBlobs", "read", total_size)

        blobs = [b""] * len(protos)
        if digests:
            outcomes = await as_future(self._store.get_many(digests))
            for index, outcome in zip(positions, outcomes):
                if isinstance(outcome, BaseException):
                    statuses[index] = to_status(outcome)
                else:
                    blobs[index] = outcome

        # The compressor field is left at its default, IDENTITY.
        response = re_pb2.BatchReadBlobsResponse()
        add_response = response.responses.add
        for proto, blob, status in zip(protos, blobs, statuses):
            added = add_response()
            added.digest.CopyFrom(proto)
            if status is None:
                added.data = blob
                added.status.SetInParent()
            else:
                added.status.CopyFrom(status)
        return response

    @stream_handler
    async def GetTree(self, request, context):
        self._instance_names.check(request.instance_name)
        check_digest_function(request.digest_function)
        root = Digest.from_proto(request.root_digest, field="root_digest")
        if request.page_size < 0:
            raise InvalidArgumentError(
                f"page_size: invalid page size {request.page_size}: must not be negative"
            )
        page_size = min(request.page_size or self._max_tree_page_size, self._max_tree_page_size)
        start = decode_page_token(request.page_token, root) if request.page_token else 0

        directories = aiter(_walk_tree(self._store, root))
        for _ in range(start):
            if await anext(directories, None) is None:
                raise _invalid_page_token(request.page_token, "it points past the end of the tree")

        position = start
        pending = await anext(directories, None)
        if pending is None and start > 0:
            raise _invalid_page_token(request.page_token, "it points past the end of the tree")
        while pending is not None:
            response = re_pb2.GetTreeResponse()
            page_bytes = 0
            while pending is not None and len(response.directories) < page_size:
                directory, size = pending
                if response.directories and page_bytes + size > self._max_batch_total_size_bytes:
                    break
                response.directories.append(directory)
                page_bytes += size
                position += 1
                pending = await anext(directories, None)
            if pending is not None:
                response.next_page_token = encode_page_token(root, position)
            yield response

    def _check_batch_size(self, method, verb, total_size):
        if total_size > self._max_batch_total_size_bytes:
            raise InvalidArgumentError(
                f"{method}: the requested blobs total {total_size} bytes, more than the "
                f"limit of {self._max_batch_total_size_bytes} bytes per batch "
                f"(max_batch_total_size_bytes); {verb} them in smaller batches, or large "
                f"blobs through ByteStream"
            )


def _first_occurrences(protos, digests, missing):
    """Return the messages of ``protos`` at the first position of each of ``missing``,
    in request order. ``digests`` are the parsed ``protos``."""
    missing_set = set(missing)
    is_missing = list(map(missing_set.__contains__, digests))
    if sum(is_missing) == len(missing):
        # Each missing digest occurs once in the request.
        return itertools.compress(protos, is_missing)

    first_positions = {}
    for position, digest in enumerate(digests):
        first_positions.setdefault(digest, position)
    return [protos[first_positions[digest]] for digest in missing]


def _validate_uploads(entries, datas, statuses):
    """Validate the BatchUpdateBlobs entries and return ``(blobs, positions)``: the
    ``(digest, data)`` pairs to store and their positions in the request.

    Sets the error status of each invalid entry in ``statuses``. All entries are checked
    at once first, and one by one only when some entry is invalid.
    """
    try:
        digests = digests_from_protos(list(map(_get_digest, entries)), field="requests")
    except InvalidArgumentError:
        digests = None
    if (
        digests is not None
        and not any(map(_get_compressor, entries))
        and list(map(len, datas)) == [digest.size_bytes for digest in digests]
    ):
        return list(zip(digests, datas)), range(len(entries))

    blobs = []
    positions = []
    for index, (entry, data) in enumerate(zip(entries, datas)):
        try:
            digest = _validate_upload(index, entry, data)
        except BgridError as error:
            statuses[index] = to_status(error)
            continue
        blobs.append((digest, data))
        positions.append(index)
    return blobs, positions


def _validate_upload(index, blob, data):
    """Return the digest of one BatchUpdateBlobs entry, or raise the error for its status."""
    digest = Digest.from_proto(blob.digest, field=f"requests[{index}].digest")
    if blob.compressor != re_pb2.Compressor.IDENTITY:
        names = {number: name for name, number in re_pb2.Compressor.Value.items()}
        name = names.get(blob.compressor, str(blob.compressor))
        raise InvalidArgumentError(
            f"requests[{index}].compressor: unsupported compressor {name}; this server "
            f"accepts only IDENTITY (uncompressed) data"
        )
    if len(data) != digest.size_bytes:
        raise DigestMismatchError(
            f"requests[{index}]: data is {len(data)} bytes but digest {digest} "
            f"gives {digest.size_bytes}"
        )
    return digest


def _validate_read_digests(protos, statuses):
    """Validate BatchReadBlobs digests one by one and return ``(digests, positions)`` of
    the valid ones, setting the error status of each invalid one in ``statuses``."""
    digests = []
    positions = []
    for index, proto in enumerate(protos):
        try:
            digests.append(Digest.from_proto(proto, field=f"digests[{index}]"))
        except InvalidArgumentError as error:
            statuses[index] = to_status(error)
            continue
        positions.append(index)
    return digests, positions


async def _walk_tree(store, root):
    """Yield ``(Directory, serialized size)`` for ``root`` and every directory below it.

    The order is breadth-first with children in the order of their parent's
    ``directories`` list, and a directory that occurs several times is yielded at its
    first occurrence only. The order depends only on the tree's content, so a position
    in it stays valid across calls. Raises NotFoundError when the root or a directory
    below it is missing and InvalidArgumentError when a blob is not a valid Directory.
    """
    seen = {root}
    level = [root]
    while level:
        next_level = []
        for start in range(0, len(level), _TREE_READ_BATCH):
            batch = level[start : start + _TREE_READ_BATCH]
            blobs = await as_future(store.get_many(batch))
            for digest, blob in zip(batch, blobs):
                directory = _parse_directory(root, digest, blob)
                for index, node in enumerate(directory.directories):
                    child = Digest.from_proto(
                        node.digest,
                        field=f"directory {digest} directories[{index}] ({node.name!r})",
                    )
                    if child not in seen:
                        seen.add(child)
                        next_level.append(child)
                yield directory, len(blob)
        level = next_level


def _parse_directory(root, digest, blob):
    if isinstance(blob, BlobNotFoundError):
        if digest == root:
            raise NotFoundError(f"root_digest: root directory {root} not found")
        raise NotFoundError(f"directory {digest} below root directory {root} not found")
    if isinstance(blob, BaseException):
        raise blob
    try:
        return re_pb2.Directory.FromString(blob)
    except DecodeError as error:
        raise InvalidArgumentError(
            f"blob {digest} in the tree of root directory {root} is not a valid Directory "
            f"message: {error}"
        ) from None


# A GetTree page token is the URL-safe base64 of: format version, the root digest's raw
# hash and size, and the position in the walk order of the first directory of the next page.
_PAGE_TOKEN = struct.Struct(">B32sQQ")
_PAGE_TOKEN_VERSION = 1


def encode_page_token(root, position):
    """Return the page token of the GetTree page that starts at ``position``."""
    raw = _PAGE_TOKEN.pack(_PAGE_TOKEN_VERSION, root.key, root.size_bytes, position)
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_page_token(token, root):
    """Return the walk position encoded in a page token that ``encode_page_token`` made.

    Raises InvalidArgumentError naming the token when it is malformed or was made for a
    tree with another root.
    """
    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise _invalid_page_token(token, "it is not base64") from None
    if len(raw) != _PAGE_TOKEN.size:
        raise _invalid_page_token(token, f"it decodes to {len(raw)} bytes, not {_PAGE_TOKEN.size}")

    version, root_hash, root_size, position = _PAGE_TOKEN.unpack(raw)
    if version != _PAGE_TOKEN_VERSION:
        raise _invalid_page_token(token, f"unknown token version {version}")
    if (root_hash, root_size) != (root.key, root.size_bytes):
        raise _invalid_page_token(token, f"it belongs to another root directory than {root}")
    if position == 0:
        raise _invalid_page_token(token, "it points to the start of the tree")
    return position


def _invalid_page_token(token, problem):
    token_excerpt = token if len(token) <= 100 else token[:100] + "..."
    return InvalidArgumentError(
        f"page_token: invalid page token {token_excerpt!r}: {problem}; pass a next_page_token "
        f"returned by GetTree for the same root_digest, or no token to start at the root"
    )
