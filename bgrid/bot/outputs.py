"""The outputs of a Command: which paths it requests, their parent directories, and what
the bot reports for each after the command ran.

Both REAPI forms are handled: ``output_paths`` (v2.1 and later), where each path may turn out
to be a file, a directory or a symlink, and the older ``output_files`` and
``output_directories``, which fix the type in advance.

Output symlinks must stay inside the exec root. bgrid advertises
``symlink_absolute_path_strategy`` DISALLOWED, and REAPI says that an action that then
creates an output symlink with an absolute target fails with FAILED_PRECONDITION. A relative
target that resolves outside the exec root fails the same way. A client may reject such a
symlink, as bgrid's own client does inside output directories, and a cached result that a
client cannot download is of no use.

NOTE: bgrid's client (``bgrid.client.tree.layout_tree``) also rejects a symlink in an output
directory whose target leaves that directory but stays inside the exec root. The bot accepts
such a symlink, so ``bgrid execute --download-outputs`` cannot download that result.
"""

import os
import stat
from dataclasses import dataclass, field

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.client.tree import (
    MAX_SYMLINK_DEPTH,
    hash_file,
    scan_directory,
    serialize,
    split_relative_path,
)
from bgrid.digest import Digest
from bgrid.errors import FailedPreconditionError, InvalidArgumentError

ANY = "path"
FILE = "file"
DIRECTORY = "directory"


@dataclass(frozen=True)
class RequestedOutput:
    """One requested output: its path relative to the working directory and expected type."""

    path: str
    parts: tuple
    kind: str  # ANY, FILE or DIRECTORY


@dataclass
class OutputSpec:
    """The working directory and requested outputs of a Command, with their paths checked."""

    working_directory: tuple
    outputs: list
    directory_format: int = re_pb2.Command.TREE_ONLY

    @classmethod
    def from_command(cls, command):
        """Build the spec of ``command``; raises InvalidArgumentError for an invalid path.

        When ``output_paths`` is set, ``output_files`` and ``output_directories`` are
        ignored, as REAPI v2.1 specifies.
        """
        working_directory = split_relative_path(
            command.working_directory, "working_directory", allow_empty=True
        )
        if command.output_paths:
            outputs = [
                RequestedOutput(path, split_relative_path(path, "output path", allow_empty=True), ANY)
                for path in command.output_paths
            ]
        else:
            outputs = [
                RequestedOutput(path, split_relative_path(path, "output file"), FILE)
                for path in command.output_files
            ]
            outputs += [
                RequestedOutput(
                    path, split_relative_path(path, "output directory", allow_empty=True), DIRECTORY
                )
                for path in command.output_directories
            ]
        return cls(working_directory, outputs, command.output_directory_format)

    def create_directories(self, exec_root):
        """Create the working directory and the parent directories of every output.

        The outputs themselves are not created. Returns the absolute working directory.
        Raises InvalidArgumentError when a path runs through a file or through a symlink that
        resolves outside ``exec_root``. Blocking: run it off the reactor thread.
        """
        root = os.path.realpath(exec_root)
        working_directory = _ensure_directory(root, self.working_directory)
        for output in self.outputs:
            _ensure_directory(root, self.working_directory + output.parts[:-1])
        return working_directory


def _inside(root, path):
    return path == root or path.startswith(root + os.sep)


def _ensure_directory(root, parts):
    current = root
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        shown_path = "/".join(parts[:index + 1])
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            os.mkdir(candidate)
            current = candidate
            continue
        if stat.S_ISDIR(mode):
            current = candidate
        elif stat.S_ISLNK(mode):
            resolved = os.path.realpath(candidate)
            if not _inside(root, resolved):
                raise InvalidArgumentError(
                    f"cannot create directory {shown_path!r}: it is a symlink that resolves outside "
                    f"the exec root"
                )
            if not os.path.isdir(resolved):
                raise InvalidArgumentError(
                    f"cannot create directory {shown_path!r}: it is a symlink to something that is "
                    f"not a directory"
                )
            current = resolved
        else:
            raise InvalidArgumentError(
                f"cannot create directory {shown_path!r}: the input tree has a file there"
            )
    return current


@dataclass
class CollectedOutputs:
    """The outputs found after a run, and the blobs that the ActionResult refers to."""

    result: re_pb2.ActionResult = field(default_factory=re_pb2.ActionResult)
    # Serialized Tree and Directory messages by digest.
    blobs: dict = field(default_factory=dict)
    # One local path for each distinct file content, by digest.
    files: dict = field(default_factory=dict)


def collect_outputs(exec_root, spec):
    """Find the requested outputs below the working directory and describe them.

    Files become OutputFiles with their owner-executable bit, directories become Trees
    (deduplicated, parents first) and symlinks are reported, not followed. With
    ``output_paths`` a symlink goes to ``output_symlinks`` and, for v2.0 clients, also to
    ``output_file_symlinks`` or ``output_directory_symlinks`` by its target's type. An
    output that does not exist is left out. Raises FailedPreconditionError when an output
    of ``output_files`` is a directory or one of ``output_directories`` is not, and when an
    output symlink, or a symlink inside an output directory, has an absolute target or one
    that resolves outside the exec root. Raises InvalidArgumentError when an output's parent
    resolves outside ``exec_root`` or an output is not a file, directory or symlink. Hashes
    every output: run it off the reactor thread.
    """
    root = os.path.realpath(exec_root)
    collected = CollectedOutputs()
    for output in spec.outputs:
        location = _locate(root, spec.working_directory + output.parts, output.path)
        try:
            mode = os.lstat(location).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISLNK(mode):
            _check_symlink(root, location, f"output symlink {output.path!r}")
            _collect_symlink(collected.result, output, location)
        elif stat.S_ISREG(mode):
            _collect_file(collected, output, location, mode)
        elif stat.S_ISDIR(mode):
            _check_symlinks_below(root, location, output.path)
            _collect_directory(collected, output, location, spec.directory_format)
        else:
            raise InvalidArgumentError(
                f"output {output.path!r} is not a regular file, directory or symlink"
            )
    return collected


def _locate(root, parts, shown_path):
    if not parts:
        return root
    parent = os.path.realpath(os.path.join(root, *parts[:-1]))
    if not _inside(root, parent):
        raise InvalidArgumentError(
            f"output {shown_path!r}: its parent directory resolves outside the exec root"
        )
    return os.path.join(parent, parts[-1])


class _LeavesExecRoot(Exception):
    """A symlink target resolves outside the exec root."""


class _TooManySymlinks(Exception):
    """Resolving a symlink target follows more than MAX_SYMLINK_DEPTH symlinks."""


def _check_symlink(root, location, description):
    """Raise FailedPreconditionError unless the symlink at ``location`` stays in ``root``.

    ``description`` names the symlink in the message, as in "output symlink 'out'".
    """
    target = os.readlink(location)
    if target.startswith("/"):
        raise FailedPreconditionError(
            f"{description} has the absolute target {target!r}, which this server does not "
            f"allow (symlink_absolute_path_strategy DISALLOWED); make the command create a "
            f"relative symlink that stays inside the exec root"
        )
    directory = os.path.relpath(os.path.dirname(location), root)
    parts = [] if directory == os.curdir else directory.split(os.sep)
    try:
        _TargetResolver(root).resolve(parts, target)
    except _LeavesExecRoot:
        raise FailedPreconditionError(
            f"{description} has the target {target!r}, which resolves outside the exec root"
        ) from None
    except _TooManySymlinks:
        raise FailedPreconditionError(
            f"{description} has the target {target!r}, which does not resolve within "
            f"{MAX_SYMLINK_DEPTH} symlinks"
        ) from None


class _TargetResolver:
    """Resolves symlink targets below ``root`` like the kernel, but never leaving ``root``.

    ``..`` above ``root`` and an absolute target met on the way raise _LeavesExecRoot.
    Symlinks on the way are followed on disk, at most MAX_SYMLINK_DEPTH in all, as Linux
    allows for one path, and then _TooManySymlinks is raised. A segment that does not exist
    is taken literally, as ``bgrid.client.tree`` does for the symlinks of a Tree.
    """

    def __init__(self, root):
        self._root = root
        self._followed = 0

    def resolve(self, parts, target):
        """Return the parts of ``target`` resolved from the directory ``parts``."""
        if target.startswith("/"):
            raise _LeavesExecRoot()
        current = list(parts)
        for segment in target.split("/"):
            if segment in ("", "."):
                continue
            if segment == "..":
                if not current:
                    raise _LeavesExecRoot()
                current.pop()
                continue
            current.append(segment)
            path = os.path.join(self._root, *current)
            try:
                is_symlink = stat.S_ISLNK(os.lstat(path).st_mode)
            except OSError:
                # A missing or unreadable path is no symlink, so its segment is kept as written.
                is_symlink = False
            if is_symlink:
                self._followed += 1
                if self._followed > MAX_SYMLINK_DEPTH:
                    raise _TooManySymlinks()
                current = self.resolve(current[:-1], os.readlink(path))
        return current


def _check_symlinks_below(root, directory, output_path):
    """Check every symlink below the output directory ``directory`` with _check_symlink."""
    pending = [directory]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    inner = os.path.relpath(entry.path, directory).replace(os.sep, "/")
                    if output_path:
                        description = (
                            f"symlink {output_path + '/' + inner!r} in output directory "
                            f"{output_path!r}"
                        )
                    else:
                        description = f"symlink {inner!r} in the working directory, an output"
                    _check_symlink(root, entry.path, description)
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)


def _collect_symlink(result, output, location):
    symlink = re_pb2.OutputSymlink(path=output.path, target=os.readlink(location))
    # os.path.isdir follows the link; a dangling link counts as a file symlink.
    points_to_directory = os.path.isdir(location)
    if output.kind == ANY:
        result.output_symlinks.append(symlink)
        if points_to_directory:
            result.output_directory_symlinks.append(symlink)
        else:
            result.output_file_symlinks.append(symlink)
    elif output.kind == FILE:
        if points_to_directory:
            raise FailedPreconditionError(
                f"output file {output.path!r} is a symlink to a directory"
            )
        result.output_file_symlinks.append(symlink)
    else:
        if os.path.exists(location) and not points_to_directory:
            raise FailedPreconditionError(
                f"output directory {output.path!r} is a symlink to a file"
            )
        result.output_directory_symlinks.append(symlink)


def _collect_file(collected, output, location, mode):
    if output.kind == DIRECTORY:
        raise FailedPreconditionError(f"output directory {output.path!r} is a regular file")
    digest = hash_file(location)
    collected.files.setdefault(digest, location)
    collected.result.output_files.add(
        path=output.path,
        digest=digest.to_proto(re_pb2.Digest),
        is_executable=bool(mode & stat.S_IXUSR),
    )


def _collect_directory(collected, output, location, directory_format):
    if output.kind == FILE:
        raise FailedPreconditionError(f"output file {output.path!r} is a directory")
    scanned = scan_directory(location)
    tree_data = serialize(scanned.to_tree())
    tree_digest = Digest.of(tree_data)
    collected.blobs[tree_digest] = tree_data
    for digest, path in scanned.files.items():
        collected.files.setdefault(digest, path)

    # The Tree is always stored: REAPI lets a worker store a superset of the requested
    # formats, and clients of TREE_ONLY (the default) need it.
    entry = collected.result.output_directories.add(
        path=output.path,
        tree_digest=tree_digest.to_proto(re_pb2.Digest),
        is_topologically_sorted=True,
    )
    if directory_format in (re_pb2.Command.DIRECTORY_ONLY, re_pb2.Command.TREE_AND_DIRECTORY):
        entry.root_directory_digest.CopyFrom(scanned.root_digest.to_proto(re_pb2.Digest))
        collected.blobs.update(scanned.directory_blobs)
