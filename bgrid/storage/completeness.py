"""An action cache decorator that hides results whose outputs are no longer in the CAS."""

import collections

from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import BgridError, InvalidArgumentError, NotFoundError
from bgrid.interfaces import IActionCache

# The default bound of ``TreeFileCache``. A cached Digest takes an estimated 200 bytes
# in CPython 3.11 (``sys.getsizeof`` of the tuple, its 64-character hash string and its
# slot in the cached tuple), so a full cache takes about 10 MB.
DEFAULT_TREE_CACHE_DIGESTS = 50_000


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
    ``Directory`` digest, every ``Directory`` below it and their files. Directories are
    read through the blob store on every lookup. A Tree is read once, and its file
    digests are kept in a ``TreeFileCache``. The final ``find_missing`` marks every
    found blob as accessed.
    """

    log = Logger()

    def __init__(self, action_cache, blob_store, tree_files=None):
        """Wrap ``action_cache``, checking results against ``blob_store``.

        ``tree_files`` is the ``TreeFileCache`` of file digests of Trees already read
        (a new one of ``DEFAULT_TREE_CACHE_DIGESTS`` digests by default).
        """
        self._action_cache = action_cache
        self._blob_store = blob_store
        self._tree_files = TreeFileCache() if tree_files is None else tree_files

    def get(self, instance_name, action_digest):
        # Deferred callbacks in place of a coroutine save creating and driving one
        # coroutine per lookup. The LMDB stores read small requests inline, so a result
        # without output directories is checked before this returns.
        getting = self._action_cache.get(instance_name, action_digest)
        return getting.addCallback(self._check_complete, instance_name, action_digest)

    def _check_complete(self, result, instance_name, action_digest):
        checking = find_missing_outputs_deferred(self._blob_store, result, self._tree_files)
        return checking.addCallbacks(
            self._served_if_complete,
            self._hide_incomplete,
            callbackArgs=(result, instance_name, action_digest),
            errbackArgs=(instance_name, action_digest),
        )

    def _served_if_complete(self, missing, result, instance_name, action_digest):
        if not missing:
            return result
        self._hide(instance_name, action_digest, missing[0], "it is not in the CAS")

    def _hide_incomplete(self, failure, instance_name, action_digest):
        failure.trap(IncompleteResultError)
        incomplete = failure.value
        self._hide(instance_name, action_digest, incomplete.digest, incomplete.reason)

    def _hide(self, instance_name, action_digest, missing, reason):
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


async def find_missing_outputs(blob_store, result, tree_files=None):
    """Return the digests that the ActionResult ``result`` refers to and the CAS lacks.

    The order is that of first reference. ``tree_files`` is an optional
    ``TreeFileCache``.

    Raises ``IncompleteResultError`` when a Tree or Directory cannot be read or parsed, or a
    stored digest is invalid.
    """
    return await find_missing_outputs_deferred(blob_store, result, tree_files)


def find_missing_outputs_deferred(blob_store, result, tree_files=None):
    """Do what ``find_missing_outputs`` does, returning a Deferred.

    A result without output directories needs one ``find_missing`` call and no coroutine,
    so the Deferred has fired when this returns if the blob store reads inline, as the
    LMDB blob store does for up to 4,096 digests.
    """
    try:
        referenced = _referenced_blobs(result)
    except IncompleteResultError:
        return defer.fail()
    if not result.output_directories:
        return blob_store.find_missing(referenced)
    return defer.Deferred.fromCoroutine(
        _find_missing_with_directories(blob_store, result, referenced, tree_files)
    )


def _referenced_blobs(result):
    """Return the digests of the output files and of stdout and stderr of ``result``."""
    referenced = [
        _digest_of(output.digest, "output_files.digest") for output in result.output_files
    ]
    for field in ("stdout_digest", "stderr_digest"):
        if result.HasField(field):
            referenced.append(_digest_of(getattr(result, field), field))
    return referenced


async def _find_missing_with_directories(blob_store, result, referenced, tree_files):
    tree_digests = []
    root_directory_digests = []
    for output in result.output_directories:
        if output.HasField("tree_digest"):
            tree_digests.append(_digest_of(output.tree_digest, "tree_digest"))
        if output.HasField("root_directory_digest"):
            root_directory_digests.append(
                _digest_of(output.root_directory_digest, "root_directory_digest")
            )

    referenced.extend(await _files_in_trees(blob_store, tree_digests, tree_files))
    referenced.extend(await _files_below_directories(blob_store, root_directory_digests))
    return await blob_store.find_missing(referenced)


async def _files_in_trees(blob_store, tree_digests, tree_files):
    """Return the file digests of the Trees ``tree_digests``, in order.

    A Tree whose files are in ``tree_files`` is not read again. Its own digest comes
    before its files instead, so the final ``find_missing`` checks that the Tree is
    still stored and marks it as accessed. That check finds the Tree in the index but,
    unlike a read, does not hash it again.
    """
    if not tree_digests:
        return []

    files_by_tree = {}
    if tree_files is not None:
        for tree_digest in tree_digests:
            cached = tree_files.get(tree_digest)
            if cached is not None:
                files_by_tree[tree_digest] = (tree_digest, *cached)

    to_read = list(dict.fromkeys(digest for digest in tree_digests if digest not in files_by_tree))
    if to_read:
        blobs = await blob_store.get_many(to_read)
        for tree_digest, data in zip(to_read, blobs):
            tree = _parse_blob(re_pb2.Tree, tree_digest, data)
            tree_file_digests = [
                _digest_of(node.digest, "Tree file digest")
                for directory in [tree.root, *tree.children]
                for node in directory.files
            ]
            if tree_files is not None:
                tree_files.add(tree_digest, tree_file_digests)
            files_by_tree[tree_digest] = tree_file_digests

    files = []
    for tree_digest in tree_digests:
        files.extend(files_by_tree[tree_digest])
    return files


class TreeFileCache:
    """The file digests of Trees already read, least recently used first.

    A Tree's digest fixes its content, so an entry never goes stale. The cache contains at
    most ``max_digests`` file digests, counting one more per Tree so that empty Trees
    count too. A Tree with more files than that is not cached.
    """

    def __init__(self, max_digests=None):
        self.max_digests = DEFAULT_TREE_CACHE_DIGESTS if max_digests is None else max_digests
        self._entries = collections.OrderedDict()
        self._digest_count = 0

    def __len__(self):
        return len(self._entries)

    def get(self, tree_digest):
        """Return the tuple of file digests of ``tree_digest``, or None if not cached."""
        files = self._entries.get(tree_digest)
        if files is not None:
            self._entries.move_to_end(tree_digest)
        return files

    def add(self, tree_digest, file_digests):
        """Cache the file digests of the Tree ``tree_digest``, evicting the least recently
        used Trees beyond ``max_digests``."""
        files = tuple(file_digests)
        cost = len(files) + 1
        if cost > self.max_digests or tree_digest in self._entries:
            return
        self._entries[tree_digest] = files
        self._digest_count += cost
        while self._digest_count > self.max_digests:
            _, evicted = self._entries.popitem(last=False)
            self._digest_count -= len(evicted) + 1


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
