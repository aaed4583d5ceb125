"""An action cache decorator that hides results whose outputs are no longer in the CAS."""

from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import BgridError, InvalidArgumentError, NotFoundError
from bgrid.interfaces import IActionCache


class IncompleteResultError(Exception):
    """A Tree or Directory that a result refers to is absent, damaged or unparsable."""

    def __init__(self, digest, reason):
        super().__init__(f"{digest}: {reason}")
        self.digest = digest
        self.reason = reason


def _digest_of(proto, field):
    try:
        return Digest.from_proto(proto, field)
    except InvalidArgumentError as error:
        raise IncompleteResultError(f"{proto.hash}/{proto.size_bytes}", error.message) from error


def _parse_blob(message_class, digest, data):
    if isinstance(data, BgridError):
        raise IncompleteResultError(digest, data.message)
    try:
        return message_class.FromString(data)
    except DecodeError as error:
        raise IncompleteResultError(digest, f"not a valid {message_class.__name__}: {error}") from error


@implementer(IActionCache)
class CompletenessCheckingActionCache:
    """An ``IActionCache`` that reports a result as not found unless every blob it refers
    to is in the CAS.

    The checked blobs are the output files, the stdout and stderr digests, every output
    directory's Tree blob and every file in that Tree, and, for outputs given as a root
    ``Directory`` digest, every ``Directory`` below it and their files. Trees and
    directories are read through the blob store, and the final ``find_missing`` marks
    every found blob as accessed.
    """

    log = Logger()

    def __init__(self, action_cache, blob_store):
        self._action_cache = action_cache
        self._blob_store = blob_store

    def get(self, instance_name, action_digest):
        return defer.Deferred.fromCoroutine(self._get(instance_name, action_digest))

    async def _get(self, instance_name, action_digest):
        result = await self._action_cache.get(instance_name, action_digest)
        try:
            missing = await find_missing_outputs(self._blob_store, result)
        except IncompleteResultError as incomplete:
            missing, reason = incomplete.digest, incomplete.reason
        else:
            if not missing:
                return result
            reason = "it is not in the CAS"
            missing = missing[0]

        self.log.info(
            "action result for {action_digest} in instance {instance_name!r} refers to blob "
            "{missing_digest} that cannot be served ({reason}), so the result is reported "
            "as not found",
            action_digest=str(action_digest),
            instance_name=instance_name,
            missing_digest=str(missing),
            reason=reason,
        )
        raise NotFoundError(
            f"action result for {action_digest} refers to blob {missing} that cannot be "
            f"served ({reason})"
        )

    def put(self, instance_name, action_digest, action_result):
        return self._action_cache.put(instance_name, action_digest, action_result)


async def find_missing_outputs(blob_store, result):
    """Return the digests that the ActionResult ``result`` refers to and the CAS lacks.

    The order is that of first reference.

    Raises ``IncompleteResultError`` when a Tree or Directory cannot be read or parsed, or a
    stored digest is invalid.
    """
    referenced = [
        _digest_of(output.digest, "output_files.digest") for output in result.output_files
    ]
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            referenced.append(_digest_of(getattr(result, field), field))

    tree_digests = []
    root_directory_digests = []
    for output in result.output_directories:
        if output.HasField("tree_digest"):
            tree_digests.append(_digest_of(output.tree_digest, "tree_digest"))
        if output.HasField("root_directory_digest"):
            root_directory_digests.append(
                _digest_of(output.root_directory_digest, "root_directory_digest")
            )

    referenced.extend(await _files_in_trees(blob_store, tree_digests))
    referenced.extend(await _files_below_directories(blob_store, root_directory_digests))
    return await blob_store.find_missing(referenced)


async def _files_in_trees(blob_store, tree_digests):
    if not tree_digests:
        return []

    files = []
    blobs = await blob_store.get_many(tree_digests)
    for tree_digest, data in zip(tree_digests, blobs):
        tree = _parse_blob(re_pb2.Tree, tree_digest, data)
        for directory in [tree.root, *tree.children]:
            for node in directory.files:
                files.append(_digest_of(node.digest, "Tree file digest"))
    return files


async def _files_below_directories(blob_store, root_digests):
    """Return the file digests of every Directory below ``root_digests``, reading one
    level of the hierarchy per ``get_many``."""
    files = []
    level = list(dict.fromkeys(root_digests))
    seen = set(level)
    while level:
        blobs = await blob_store.get_many(level)
        next_level = []
        for directory_digest, data in zip(level, blobs):
            directory = _parse_blob(re_pb2.Directory, directory_digest, data)
            for node in directory.files:
                files.append(_digest_of(node.digest, "Directory file digest"))
            for node in directory.directories:
                child = _digest_of(node.digest, "Directory subdirectory digest")
                if child not in seen:
                    seen.add(child)
                    next_level.append(child)
        level = next_level
    return files
