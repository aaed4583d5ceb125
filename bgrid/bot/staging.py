"""Input staging for one lease: Directory messages and files come through the blob cache,
and the input tree is copied into a fresh exec root."""

import os
import shutil

from bgrid.client import tree
from bgrid.digest import Digest


async def fetch_input_layout(cache, pins, root_digest, max_entries=tree.DEFAULT_MAX_ENTRIES):
    """Fetch the input tree below ``root_digest`` into ``cache`` and return its ``TreeLayout``.

    Directory messages are fetched level by level, the whole tree is checked with
    ``tree.layout_tree``, and only then are the files fetched. Every blob is pinned through
    ``pins`` (from ``BlobCache.pinned``) so that it stays cached until staged. Raises
    MissingBlobsError for blobs that the CAS lacks and InvalidArgumentError for an invalid
    tree.
    """
    directories = {}
    pending = [root_digest]
    while pending:
        pins.pin(pending)
        await cache.fetch(pending)
        next_level = []
        for digest in pending:
            directory = tree.parse_directory(cache.read(digest), f"input directory {digest}")
            directories[digest] = directory
            for node in directory.directories:
                child = Digest.from_proto(
                    node.digest, f"digest of directory {node.name!r} in input directory {digest}"
                )
                if child not in directories:
                    next_level.append(child)
        pending = list(dict.fromkeys(next_level))

    layout = tree.layout_tree(root_digest, directories, max_entries=max_entries)
    file_digests = layout.file_digests()
    pins.pin(file_digests)
    await cache.fetch(file_digests)
    return layout


def stage_layout(exec_root, layout, cache):
    """Create ``exec_root`` and copy the input tree ``layout`` into it from ``cache``.

    Files are copied, never linked, so an action that writes to its inputs cannot change
    the cache. ``exec_root`` must not exist yet. Blocking: run it off the reactor thread.
    """
    os.mkdir(exec_root)

    def place_file(entry, path):
        shutil.copyfile(cache.path(entry.digest), path)

    tree.create_layout(exec_root, layout, place_file)


def remove_tree(path):
    """Remove a directory tree, including directories that the action made read-only.

    Symlinks are removed, never followed. Blocking: run it off the reactor thread.
    """
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        os.unlink(path)
        return
    if os.path.isdir(path):
        os.chmod(path, 0o700)
        # os.walk lists a directory only after the loop body ran for its parent, so each
        # directory is writable and searchable by the time it is read.
        for current, directory_names, _ in os.walk(path):
            for name in directory_names:
                child = os.path.join(current, name)
                if not os.path.islink(child):
                    os.chmod(child, 0o700)
    shutil.rmtree(path)
