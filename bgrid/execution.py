"""The path of an Execute request between the gRPC edge, the stores and the scheduler.

``ExecutionController`` answers an Execute from the action cache when it can, checks that the
action, its command and its whole input tree are in the CAS, hands the action to the
scheduler, and writes a finished job's result to the action cache when it may be cached.
"""

from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from twisted.internet import defer
from twisted.logger import Logger

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import (
    BlobNotFoundError,
    CorruptBlobError,
    InvalidArgumentError,
    MissingBlobsError,
    NotFoundError,
)
from bgrid.scheduler import StoredResult
from bgrid.storage.completeness import IncompleteResultError, find_missing_outputs


def parse_message(message_class, data, digest, what):
    """Parse ``data`` as ``message_class``; a parse failure is INVALID_ARGUMENT naming the blob."""
    message = message_class()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise InvalidArgumentError(f"{what} {digest} is not a valid {message_class.__name__}: {error}")
    return message


def _parse_blob(message_class, digest, data, what):
    """Parse a ``get_many`` entry as ``message_class``.

    An absent or corrupt blob raises ``MissingBlobsError``, because the store drops a
    corrupt blob and the client has to upload it again. A blob that does not parse raises
    ``InvalidArgumentError``.
    """
    if isinstance(data, (BlobNotFoundError, CorruptBlobError)):
        raise MissingBlobsError([digest], what=what)
    if isinstance(data, Exception):
        raise data
    return parse_message(message_class, data, digest, what)


class ExecutionController:
    """Turns Execute requests into cache hits or scheduled jobs, and results into cache entries."""

    log = Logger()

    def __init__(self, blob_store, action_cache, scheduler):
        self.blob_store = blob_store
        self.action_cache = action_cache
        self.scheduler = scheduler

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
        # The Action is read while the action cache is consulted, so a miss costs no extra
        # round trip to the storage threads. A hit leaves the read unused.
        reading_action = self.blob_store.get_many([action_digest])
        if not skip_cache_lookup:
            try:
                cached = await self._lookup_cached_result(instance_name, action_digest)
            except BaseException:
                reading_action.addErrback(lambda _failure: None)
                raise
            if cached is not None:
                reading_action.addErrback(lambda _failure: None)
                response = re_pb2.ExecuteResponse(result=cached, cached_result=True)
                name = self.scheduler.add_completed_operation(instance_name, action_digest, response)
                self.log.debug(
                    "action {action_digest} served from the action cache as {operation}",
                    action_digest=str(action_digest),
                    operation=name,
                )
                return name

        [action_data] = await reading_action
        action = _parse_blob(re_pb2.Action, action_digest, action_data, "action")
        command_digest = Digest.from_proto(action.command_digest, "action.command_digest")
        input_root_digest = Digest.from_proto(action.input_root_digest, "action.input_root_digest")

        # The command and the input root are read together, and the command and every input
        # blob that is missing are reported together, so the client can upload them all in
        # one round.
        command_data, root_data = await self.blob_store.get_many([command_digest, input_root_digest])
        missing = []
        command = None
        try:
            command = _parse_blob(re_pb2.Command, command_digest, command_data, "command")
        except MissingBlobsError as error:
            missing.extend(error.digests)
        input_digests, missing_directories = await self.collect_input_tree(
            input_root_digest, root_data
        )
        if missing or missing_directories:
            missing.extend(missing_directories)
            missing.extend(await self.blob_store.find_missing(input_digests))
            raise MissingBlobsError(missing, what="command or input blobs")

        # Pin before the final check, so that nothing found present can be evicted before
        # a bot has fetched it.
        needed = [action_digest, command_digest, *input_digests]
        pin = await self.blob_store.pin(needed)
        missing = await self.blob_store.find_missing(needed)
        if missing:
            self.blob_store.unpin(pin)
            raise MissingBlobsError(missing, what="input blobs")

        platform = action.platform.properties or command.platform.properties
        name = self.scheduler.submit(
            instance_name,
            action_digest,
            action,
            priority=priority,
            do_not_cache=action.do_not_cache,
            platform=[(prop.name, prop.value) for prop in platform],
        )
        self._unpin_when_done(name, pin)
        return name

    def _unpin_when_done(self, operation_name, pin):
        """Release the input pins of an operation once it is done, however it ends.

        NOTE: pins live in memory, so after a restart the inputs of recovered jobs are not
        pinned; a bot that finds one evicted reports FAILED_PRECONDITION and the client
        uploads it again.
        """
        done = self.scheduler.when_done(operation_name)
        done.addBoth(lambda _: self.blob_store.unpin(pin))

    async def _lookup_cached_result(self, instance_name, action_digest):
        try:
            return await self.action_cache.get(instance_name, action_digest)
        except NotFoundError:
            return None

    async def collect_input_tree(self, root_digest, root_data=None):
        """Return the digests of every directory and file below ``root_digest``.

        Walks the tree breadth first, one batch read per level, and returns
        ``(digests, missing_directories)``: the digests of all directories read and all
        files they list, and the directories that could not be read. Whether the files are
        present is left to the caller. ``root_data`` is the root's ``get_many`` entry when
        the caller has read it already: its bytes or the exception. Raises
        ``InvalidArgumentError`` when a directory does not parse or lists an invalid
        digest.
        """
        digests = []
        missing = []
        file_digests = set()
        level = [root_digest]
        seen = {root_digest}
        while level:
            if root_data is not None:
                blobs, root_data = [root_data], None
            else:
                blobs = await self.blob_store.get_many(level)
            next_level = []
            for digest, data in zip(level, blobs):
                if isinstance(data, Exception):
                    missing.append(digest)
                    continue
                digests.append(digest)
                directory = parse_message(re_pb2.Directory, data, digest, "input directory")
                for node in directory.files:
                    file_digests.add(Digest.from_proto(node.digest, f"input file {node.name!r}"))
                for node in directory.directories:
                    child = Digest.from_proto(node.digest, f"input directory {node.name!r}")
                    if child not in seen:
                        seen.add(child)
                        next_level.append(child)
            level = next_level

        digests.extend(sorted(file_digests))
        return digests, missing

    def handle_result(self, instance_name, action_digest, action, do_not_cache, response):
        """Write a finished job's result to the action cache when it may be cached.

        Only a successful execution (status OK and exit code 0) of an action without
        ``do_not_cache`` is cached, and only when every blob it refers to, files inside
        output Trees included, is in the CAS.
        Returns a Deferred firing with None when the result is not cached, or with a
        ``StoredResult`` once the action cache write is queued. The response goes to
        clients unchanged, and a failed write is logged.
        """
        return defer.Deferred.fromCoroutine(
            self._handle_result(instance_name, action_digest, action, do_not_cache, response)
        )

    async def _handle_result(self, instance_name, action_digest, action, do_not_cache, response):
        if do_not_cache or action.do_not_cache:
            return None
        if response.status.code != code_pb2.OK or response.result.exit_code != 0:
            return None

        try:
            missing = await find_missing_outputs(self.blob_store, response.result)
        except IncompleteResultError as error:
            missing = [error.digest]
        if missing:
            self.log.warn(
                "result of action {action_digest} not cached: {count} output blobs cannot "
                "be served from the CAS, first {first}",
                action_digest=str(action_digest),
                count=len(missing),
                first=str(missing[0]),
            )
            return None

        writing = self.action_cache.put(instance_name, action_digest, response.result)
        writing.addErrback(self._log_cache_write_failure, action_digest)
        return StoredResult(None, writing)

    def _log_cache_write_failure(self, failure, action_digest):
        self.log.failure(
            "Failed to write the result of action {action_digest} to the action cache, so "
            "its operations complete with a result that is not cached",
            failure,
            action_digest=str(action_digest),
        )
