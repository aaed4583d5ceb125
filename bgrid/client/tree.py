"""Directory trees: name checks, Directory messages built from local files, and the layout
of a Directory tree on disk, checked so that no name or symlink leaves the destination.

Nothing here talks to a server; ``CasClient`` and the bot add the transfers.
"""

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from google.protobuf import message

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError, MissingBlobsError

# Linux follows at most 40 symlinks while resolving one path (MAXSYMLINKS).
MAX_SYMLINK_DEPTH = 40

# Bounds the work of laying out a tree in which shared subdirectories expand to many paths.
DEFAULT_MAX_ENTRIES = 1_000_000

HASH_CHUNK_BYTES = 1024 * 1024

# Record tags of a serialized Tree: field 1 (root) and field 2 (children), length-delimited.
_TREE_ROOT_TAG = (1 << 3) | 2
_TREE_CHILD_TAG = (2 << 3) | 2


def _name_problem(name):
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not allowed"
    if "/" in name:
        return "it contains '/'"
    if "\0" in name:
        return "it contains a NUL character"
    return None


def check_name(name, what="name"):
    """Check that ``name`` is one path segment: not empty, ``.`` or ``..``, without ``/``.

    Returns ``name``; raises InvalidArgumentError naming ``what`` otherwise.
    """
    problem = _name_problem(name)
    if problem is not None:
        raise InvalidArgumentError(f"invalid {what} {name!r}: {problem}")
    return name


def split_relative_path(path, what="path", allow_empty=False):
    """Split a ``/``-separated relative path into its segments, checking each one.

    A leading or trailing ``/``, an empty segment, ``.`` and ``..`` are rejected with
    InvalidArgumentError. The empty path is allowed only with ``allow_empty`` and yields ``()``.
    """
    if path == "":
        if allow_empty:
            return ()
        raise InvalidArgumentError(f"invalid {what} '': it must not be empty")
    if path.startswith("/"):
        raise InvalidArgumentError(f"invalid {what} {path!r}: it must be a relative path")
    parts = tuple(path.split("/"))
    for part in parts:
        problem = _name_problem(part)
        if problem is not None:
            raise InvalidArgumentError(
                f"invalid {what} {path!r}: segment {part!r} is invalid because {problem}"
            )
    return parts


def hash_file(path):
    """Return the ``Digest`` of a file's contents, read in chunks of 1 MiB."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while chunk := source.read(HASH_CHUNK_BYTES):
            hasher.update(chunk)
            size += len(chunk)
    return Digest(hasher.hexdigest(), size)


def serialize(message):
    """Return the deterministic wire form of a message, the form that its digest covers."""
    return message.SerializeToString(deterministic=True)


def _check_utf8(text, path, what):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"{path!r}: the {what} is not valid UTF-8, which REAPI requires"
        ) from None


# --- Local directory -> Directory messages -------------------------------------------------


@dataclass
class ScannedTree:
    """The Directory messages and file contents that describe one local directory tree."""

    root_digest: Digest
    root: re_pb2.Directory
    # Every Directory below the root, each once, parents before their children.
    children: list = field(default_factory=list)
    # Serialized Directory messages by digest, the root included.
    directory_blobs: dict = field(default_factory=dict)
    # One local path for each distinct file content, by digest.
    files: dict = field(default_factory=dict)

    def to_tree(self):
        """Return the ``Tree`` message of this directory."""
        return re_pb2.Tree(root=self.root, children=self.children)


class _Scanner:
    def __init__(self):
        self.directory_blobs = {}
        self.messages = {}
        self.subdirectories = {}
        self.files = {}

    def scan(self, path):
        directory = re_pb2.Directory()
        subdirectory_digests = []
        with os.scandir(path) as iterator:
            # str order is code point order, which is the UTF-8 byte order REAPI requires.
            entries = sorted(iterator, key=lambda entry: entry.name)
        for entry in entries:
            _check_utf8(entry.name, entry.path, "file name")
            if entry.is_symlink():
                target = os.readlink(entry.path)
                _check_utf8(target, entry.path, "symlink target")
                directory.symlinks.add(name=entry.name, target=target)
            elif entry.is_dir(follow_symlinks=False):
                digest = self.scan(entry.path)
                directory.directories.add(name=entry.name, digest=digest.to_proto(re_pb2.Digest))
                subdirectory_digests.append(digest)
            elif entry.is_file(follow_symlinks=False):
                mode = entry.stat(follow_symlinks=False).st_mode
                digest = hash_file(entry.path)
                directory.files.add(
                    name=entry.name,
                    digest=digest.to_proto(re_pb2.Digest),
                    is_executable=bool(mode & stat.S_IXUSR),
                )
                self.files.setdefault(digest, entry.path)
            else:
                raise InvalidArgumentError(
                    f"{entry.path!r}: unsupported file type; only regular files, "
                    f"directories and symlinks can be stored"
                )
        data = serialize(directory)
        digest = Digest.of(data)
        self.directory_blobs[digest] = data
        self.messages[digest] = directory
        self.subdirectories[digest] = subdirectory_digests
        return digest


def scan_directory(path):
    """Describe the local directory ``path`` as Directory messages.

    Files keep their owner-executable bit as ``is_executable``; symlinks become SymlinkNodes
    with their target unchanged and are never followed; children are sorted by name. Reads
    the whole tree and hashes every file, so call it off the reactor thread. Raises
    InvalidArgumentError for a socket, device or FIFO and for a name that is not UTF-8.
    """
    scanner = _Scanner()
    root_digest = scanner.scan(path)

    children = []
    seen = {root_digest}
    queue = list(scanner.subdirectories[root_digest])
    while queue:
        digest = queue.pop(0)
        if digest in seen:
            continue
        seen.add(digest)
        children.append(scanner.messages[digest])
        queue.extend(scanner.subdirectories[digest])

    return ScannedTree(
        root_digest=root_digest,
        root=scanner.messages[root_digest],
        children=children,
        directory_blobs=scanner.directory_blobs,
        files=scanner.files,
    )


# --- Directory messages -> layout on disk --------------------------------------------------


class FileEntry(NamedTuple):
    """A regular file to create, at a ``/``-separated path below the destination."""

    path: str
    digest: Digest
    is_executable: bool


class SymlinkEntry(NamedTuple):
    """A symlink to create, at a ``/``-separated path below the destination."""

    path: str
    target: str


@dataclass
class TreeLayout:
    """Everything that creating a Directory tree on disk makes, already checked."""

    # Directory paths below the root, parents before their children.
    directories: list = field(default_factory=list)
    files: list = field(default_factory=list)
    symlinks: list = field(default_factory=list)

    def file_digests(self):
        """Return the distinct digests of the files, in first-use order."""
        return list(dict.fromkeys(entry.digest for entry in self.files))


_DIRECTORY = "directory"
_FILE = "file"


def layout_tree(root_digest, directories, max_entries=DEFAULT_MAX_ENTRIES):
    """Check the Directory tree below ``root_digest`` and return its ``TreeLayout``.

    ``directories`` maps the digest of every Directory in the tree to its message. Raises
    MissingBlobsError when one of them is absent, and InvalidArgumentError for an invalid
    name or digest, a name used twice in one Directory, more than ``max_entries`` entries,
    or a symlink whose target is empty, absolute or resolves outside the root. Resolution
    follows the other symlinks of the tree the way the kernel would.
    """
    layout = TreeLayout()
    index = {}
    stack = [(root_digest, ())]
    missing = []
    while stack:
        digest, parts = stack.pop()
        directory = directories.get(digest)
        if directory is None:
            missing.append(digest)
            continue
        where = "/".join(parts) or "the root directory"
        seen_names = set()

        def claim(name, kind):
            check_name(name, f"{kind} name in {where}")
            if name in seen_names:
                raise InvalidArgumentError(f"invalid Directory {where}: name {name!r} is used twice")
            seen_names.add(name)
            if len(index) >= max_entries:
                raise InvalidArgumentError(f"the input tree has more than {max_entries} entries")
            return parts + (name,)

        for node in directory.files:
            path_parts = claim(node.name, "file")
            path = "/".join(path_parts)
            file_digest = Digest.from_proto(node.digest, field=f"digest of file {path!r}")
            index[path_parts] = _FILE
            layout.files.append(FileEntry(path, file_digest, node.is_executable))
        for node in directory.directories:
            path_parts = claim(node.name, "directory")
            path = "/".join(path_parts)
            child_digest = Digest.from_proto(node.digest, field=f"digest of directory {path!r}")
            index[path_parts] = _DIRECTORY
            layout.directories.append(path)
            stack.append((child_digest, path_parts))
        for node in directory.symlinks:
            path_parts = claim(node.name, "symlink")
            entry = SymlinkEntry("/".join(path_parts), node.target)
            index[path_parts] = entry
            layout.symlinks.append(entry)

    if missing:
        raise MissingBlobsError(list(dict.fromkeys(missing)), what="directories")
    # Directories are pushed as they are found, so a parent is always listed before its children.
    for entry in layout.symlinks:
        _check_symlink(index, entry)
    return layout


def _check_symlink(index, entry):
    if not entry.target:
        raise InvalidArgumentError(f"invalid symlink {entry.path!r}: its target is empty")
    if "\0" in entry.target:
        raise InvalidArgumentError(
            f"invalid symlink {entry.path!r}: its target contains a NUL character"
        )
    parent = entry.path.split("/")[:-1]
    _resolve_target(index, parent, entry.target, entry, depth=0)


def _resolve_target(index, parent, target, link, depth):
    """Resolve ``target`` from the directory ``parent`` like the kernel, within the tree only.

    Symlinks of the tree met on the way are followed. A segment that is not in the tree is
    taken literally, since the action may create it. Raises InvalidArgumentError when the
    resolution leaves the root.
    """
    if target.startswith("/"):
        raise InvalidArgumentError(
            f"invalid symlink {link.path!r}: target {link.target!r} is an absolute path, "
            f"which leaves the tree root"
        )
    current = list(parent)
    for segment in target.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not current:
                raise InvalidArgumentError(
                    f"invalid symlink {link.path!r}: target {link.target!r} leaves the tree root"
                )
            current.pop()
            continue
        current.append(segment)
        node = index.get(tuple(current))
        if isinstance(node, SymlinkEntry):
            if depth >= MAX_SYMLINK_DEPTH:
                raise InvalidArgumentError(
                    f"invalid symlink {link.path!r}: resolving {link.target!r} follows more than "
                    f"{MAX_SYMLINK_DEPTH} symlinks"
                )
            current = _resolve_target(index, current[:-1], node.target, link, depth + 1)
    return current


def _read_varint(data, offset):
    value = 0
    shift = 0
    while True:
        if offset >= len(data):
            raise InvalidArgumentError("invalid Tree message: truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise InvalidArgumentError("invalid Tree message: varint too long")


def parse_tree(data):
    """Parse a serialized Tree into its root digest and a map of digest to Directory.

    Each child's digest is taken over its bytes as stored in the Tree, so a Tree written by
    another serializer still resolves. Raises InvalidArgumentError for malformed data.
    """
    root_digest = None
    directories = {}
    offset = 0
    while offset < len(data):
        tag, offset = _read_varint(data, offset)
        if tag not in (_TREE_ROOT_TAG, _TREE_CHILD_TAG):
            raise InvalidArgumentError(f"invalid Tree message: unexpected field tag {tag}")
        length, offset = _read_varint(data, offset)
        record = bytes(data[offset:offset + length])
        if len(record) != length:
            raise InvalidArgumentError("invalid Tree message: truncated record")
        offset += length
        directory = parse_directory(record, "Tree record")
        digest = Digest.of(record)
        directories[digest] = directory
        if tag == _TREE_ROOT_TAG:
            if root_digest is not None:
                raise InvalidArgumentError("invalid Tree message: more than one root")
            root_digest = digest
    if root_digest is None:
        # A Tree of an empty directory may omit the root; its root is the empty Directory.
        root_digest = Digest.of(b"")
        directories[root_digest] = re_pb2.Directory()
    return root_digest, directories


def parse_directory(data, description):
    """Parse a serialized Directory; raise InvalidArgumentError with ``description`` if malformed."""
    directory = re_pb2.Directory()
    try:
        directory.ParseFromString(data)
    except message.DecodeError as error:
        raise InvalidArgumentError(
            f"{description} is not a valid Directory message: {error}"
        ) from None
    return directory


def check_empty_destination(path):
    """Create ``path`` if it does not exist; raise InvalidArgumentError if it is not empty.

    Creating a tree only into an empty directory means that no existing symlink can redirect
    a write outside it.
    """
    os.makedirs(path, exist_ok=True)
    if os.listdir(path):
        raise InvalidArgumentError(f"destination {path!r} is not empty")


def create_layout(destination, layout, place_file):
    """Create ``layout`` below the existing, empty directory ``destination``.

    Directories come first, then files through ``place_file(entry, absolute_path)``, which
    must create the file, and symlinks last. Each parent is a directory made here, so no
    write passes through a symlink. Files get mode 0755 if executable and 0644 otherwise.
    Blocking: run it off the reactor thread.
    """
    for path in layout.directories:
        os.mkdir(os.path.join(destination, path))
    for entry in layout.files:
        absolute_path = os.path.join(destination, entry.path)
        place_file(entry, absolute_path)
        os.chmod(absolute_path, 0o755 if entry.is_executable else 0o644)
    for entry in layout.symlinks:
        os.symlink(entry.target, os.path.join(destination, entry.path))
