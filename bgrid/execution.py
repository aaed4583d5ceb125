"""The path of an Execute request between the gRPC edge, the stores and the scheduler.

``ExecutionController`` answers an Execute from the action cache when it can, checks that the
action, its command and its whole input tree are in the CAS, hands the action to the
scheduler, and writes a finished job's result to the action cache when it may be cached.
"""

from collections import OrderedDict

from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from twisted.internet import defer
from twisted.logger import Logger

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import (
    BlobNotFoundError,
    InvalidArgumentError,
    MissingBlobsError,
    NotFoundError,
)


def parse_message(message_class, data, digest, what):
    """Parse ``data`` as ``message_class``; a parse failure is INVALID_ARGUMENT naming the blob."""
    message = message_class()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidArgumentError(f"{what} {digest} is not a valid {message_class.__name__}: {error}")
    return message


class CompleteDirectories:
    """A bounded record of directory digests whose whole subtree was found in the CAS.

    It spares repeated walks of shared input trees (toolchains, common headers).
    """

    def __init__(self, max_entries=100_000):
        self._max_entries = max_entries
        self._entries = OrderedDict()

    def __contains__(self, digest):
        if digest in self._entries:
            self._entries.move_to_end(digest)
            return True
        return False

    def add_all(self, digests):
        for digest in digests:
            self._entries[digest] = None
            self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self):
        self._entries.clear()


class ExecutionController:
    """Turns Execute requests into cache hits or scheduled jobs, and results into cache entries."""

    log = Logger()

    def __init__(self, blob_store, action_cache, scheduler):
        self.blob_store = blob_store
        self.action_cache = action_cache
        self.scheduler = scheduler
        self.complete_directories = CompleteDirectories()

    def execute(self, instance_name, action_digest, skip_cache_lookup=False, priority=0):
        """Start executing an action and return a Deferred firing with its operation name.

        Fails with ``MissingBlobsError`` when the action, its command or any input blob is
        absent from the CAS, and with ``InvalidArgumentError`` when one of them does not
        parse.
        """
        return defer.Deferred.fromCoroutine(
            self._execute(instance_name, action_digest, skip_cache_lookup, priority)
        )

    async def _execute(self, instance_name, action_digest, skip_cache_lookup, priority):
        if not skip_cache_lookup:
            cached = await self._lookup_cached_result(instance_name, action_digest)
            if cached is not None:
                response = re_pb2.ExecuteResponse(result=cached, cached_result=True)
                name = self.scheduler.add_completed_operation(instance_name, action_digest, response)
                self.log.debug(
                    "action {action_digest} served from the action cache as {operation}",
                    action_digest=str(action_digest),
                    operation=name,
                )
                return name

        action = await self._fetch_message(re_pb2.Action, action_digest, "action")
        command_digest = Digest.from_proto(action.command_digest, "action.command_digest")
        input_root_digest = Digest.from_proto(action.input_root_digest, "action.input_root_digest")
        command = await self._fetch_message(re_pb2.Command, command_digest, "command")
        await self.check_input_tree(input_root_digest)

        platform = action.platform.properties or command.platform.properties
        name = self.scheduler.submit(
            instance_name,
            action_digest,
            action,
            priority=priority,
            do_not_cache=action.do_not_cache,
            platform=[(prop.name, prop.value) for prop in platform],
        )
        self.log.info(
            "action {action_digest} queued as {operation}",
            action_digest=str(action_digest),
            operation=name,
        )
        return name

    async def _lookup_cached_result(self, instance_name, action_digest):
        try:
            return await self.action_cache.get(instance_name, action_digest)
        except NotFoundError:
            return None

    async def _fetch_message(self, message_class, digest, what):
        try:
            data = await self.blob_store.get(digest)
        except BlobNotFoundError:
            raise MissingBlobsError([digest], what=what)
        return parse_message(message_class, data, digest, what)

    async def check_input_tree(self, root_digest):
        """Check that every directory and file below ``root_digest`` is in the CAS.

        Walks the tree breadth first, one batch read per level. Raises
        ``MissingBlobsError`` listing every absent blob, or ``InvalidArgumentError`` when a
        directory does not parse.
        """
        if root_digest in self.complete_directories:
            return

        missing = []
        visited = []
        file_digests = set()
        level = [root_digest]
        seen = {root_digest}
        while level:
            blobs = await self.blob_store.get_many(level)
            next_level = []
            for digest, data in zip(level, blobs):
                if isinstance(data, Exception):
                    missing.append(digest)
                    continue
                visited.append(digest)
                directory = parse_message(re_pb2.Directory, data, digest, "input directory")
                for node in directory.files:
                    file_digests.add(Digest.from_proto(node.digest, f"input file {node.name!r}"))
                for node in directory.directories:
                    child = Digest.from_proto(node.digest, f"input directory {node.name!r}")
                    if child not in seen and child not in self.complete_directories:
                        seen.add(child)
                        next_level.append(child)
            level = next_level

        missing.extend(await self.blob_store.find_missing(sorted(file_digests)))
        if missing:
            raise MissingBlobsError(missing, what="input blobs")
        self.complete_directories.add_all(visited)

    def handle_result(self, instance_name, action_digest, action, do_not_cache, response):
        """Write a finished job's result to the action cache when it may be cached.

        Only a successful execution (status OK and exit code 0) of an action without
        ``do_not_cache`` is cached, and only when every blob it refers to is in the CAS.
        Returns a Deferred firing with None, since the response goes to clients unchanged.
        """
        return defer.Deferred.fromCoroutine(
            self._handle_result(instance_name, action_digest, action, do_not_cache, response)
        )

    async def _handle_result(self, instance_name, action_digest, action, do_not_cache, response):
        if do_not_cache or action.do_not_cache:
            return None
        if response.status.code != code_pb2.OK or response.result.exit_code != 0:
            return None

        missing = await self.blob_store.find_missing(list(referenced_blobs(response.result)))
        if missing:
            self.log.warn(
                "result of action {action_digest} not cached: {count} output blobs are "
                "missing from the CAS, first {first}",
                action_digest=str(action_digest),
                count=len(missing),
                first=str(missing[0]),
            )
            return None

        await self.action_cache.put(instance_name, action_digest, response.result)
        return None


def referenced_blobs(action_result):
    """Yield the digests an ActionResult refers to directly (not the contents of Trees)."""
    for output_file in action_result.output_files:
        yield Digest.from_proto(output_file.digest, f"output file {output_file.path!r}")
    for output_directory in action_result.output_directories:
        yield Digest.from_proto(
            output_directory.tree_digest, f"output directory {output_directory.path!r}"
        )
    if action_result.HasField("stdout_digest"):
        yield Digest.from_proto(action_result.stdout_digest, "stdout_digest")
    if action_result.HasField("stderr_digest"):
        yield Digest.from_proto(action_result.stderr_digest, "stderr_digest")
