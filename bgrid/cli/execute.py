"""``bgrid execute``: run one command remotely, the way Bazel runs an action.

It uploads the input root, the Command and the Action, calls Execute, follows the Operation
until it is done, prints the command's stdout and stderr, optionally downloads the outputs,
and exits with the command's exit code.
"""

import argparse
import asyncio
import os
import shutil
import sys

import grpc
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid.cli import options
from bgrid.cli.operations import code_name
from bgrid.cli.options import UsageError, print_status
from bgrid.cli.rpc import describe_status, remote_error
from bgrid.client import tree
from bgrid.client.cas import CasClient, RemoteCallError
from bgrid.digest import EMPTY_DIGEST, Digest
from bgrid.errors import InvalidArgumentError


EXECUTE_DESCRIPTION = """\
Run COMMAND remotely: upload the input root, the Command and the Action, execute
it, print its stdout and stderr, and exit with its exit code. bgrid's own
progress lines go to stderr and start with 'bgrid:'. When the execution fails
with a non-OK status (missing inputs, timeout, cancellation) the exit status is
1. Nothing is written locally unless --download-outputs is given."""

EXECUTE_EPILOG = """\
The command's environment contains only the variables set with --env. A bgrid
bot looks up a program name in that PATH, or in /bin and /usr/bin when PATH is
not set.

example:
  bgrid execute --input-root src --output out.txt --download-outputs results \\
      -- sh -c 'wc -l *.c > out.txt'"""


def add_parsers(subparsers):
    """Add the ``execute`` subcommand."""
    parser = subparsers.add_parser(
        "execute", help="run a command remotely",
        # The raw formatter keeps the example on one line, unbroken at its hyphens.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=EXECUTE_DESCRIPTION,
        epilog=EXECUTE_EPILOG,
    )
    parser.add_argument(
        "command", nargs="*", metavar="COMMAND",
        help="program and arguments; put -- before it when an argument starts with -",
    )
    _add_action_options(parser.add_argument_group("action and command"))
    _add_execution_options(parser.add_argument_group("execution"))
    options.add_server_options(parser, group_title="server")
    parser.set_defaults(handler=execute_command, check=check_execute_arguments)


def _add_action_options(group):
    group.add_argument(
        "--input-root", type=options.existing_directory, metavar="DIR",
        help="local directory uploaded as the action's input root (default: an empty "
             "input root)",
    )
    group.add_argument(
        "--working-directory", type=options.relative_path, metavar="PATH",
        help="directory below the input root that the command runs in (default: the input "
             "root)",
    )
    group.add_argument(
        "--output", dest="outputs", action="append", default=[], type=options.relative_path,
        metavar="PATH",
        help="file, directory or symlink that the command creates, relative to the working "
             "directory; repeat the option for several outputs",
    )
    group.add_argument(
        "--platform", dest="platform", action="append", default=[], type=options.name_value,
        metavar="NAME=VALUE",
        help="platform property that the bot must offer, such as OSFamily=linux; repeatable",
    )
    group.add_argument(
        "--env", dest="environment", action="append", default=[], type=options.name_value,
        metavar="NAME=VALUE", help="environment variable of the command; repeatable",
    )
    group.add_argument(
        "--timeout", type=options.positive_duration, metavar="SECONDS",
        help="seconds the command may run before it is killed and the execution fails with "
             "DEADLINE_EXCEEDED, rounded to whole nanoseconds, at least 0.000000001 "
             "(default: none, so the server's own limit applies)",
    )
    group.add_argument(
        "--do-not-cache", action="store_true",
        help="set Action.do_not_cache: the result is not cached and identical running "
             "actions are not merged",
    )
    group.add_argument(
        "--action", type=options.digest, metavar="DIGEST",
        help="execute an Action that is in the CAS already, given as HASH/SIZE (size in "
             "bytes), instead of COMMAND; the other options of this group do not apply",
    )


def _add_execution_options(group):
    group.add_argument(
        "--priority", type=options.int32, default=0, metavar="N",
        help="execution priority, a whole number from -2147483648 to 2147483647, where a "
             "smaller number runs sooner (default: 0)",
    )
    group.add_argument(
        "--skip-cache", action="store_true",
        help="run the action even if the action cache contains a result for it",
    )
    group.add_argument(
        "--download-outputs", metavar="DIR",
        help="download the outputs into DIR, at their paths relative to the working "
             "directory; DIR is created if needed and must be empty",
    )


# Options that build the Action and Command, by their attribute and option names.
_ACTION_BUILDING_OPTIONS = {
    "input_root": "--input-root",
    "working_directory": "--working-directory",
    "outputs": "--output",
    "platform": "--platform",
    "environment": "--env",
    "timeout": "--timeout",
    "do_not_cache": "--do-not-cache",
}


def check_execute_arguments(args):
    """Raise UsageError for arguments that REAPI or the local file system rule out."""
    if args.action is not None:
        if args.command:
            raise UsageError("give either COMMAND or --action, not both")
        for attribute, option in _ACTION_BUILDING_OPTIONS.items():
            if getattr(args, attribute):
                raise UsageError(f"{option} cannot be used with --action, which names a complete Action")
    elif not args.command:
        raise UsageError("the following arguments are required: COMMAND (or --action DIGEST)")
    names = [name for name, _ in args.environment]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"--env: environment variable {repeated[0]!r} is set more than once")
    repeated = sorted({path for path in args.outputs if args.outputs.count(path) > 1})
    if repeated:
        raise UsageError(f"--output: output path {repeated[0]!r} is given more than once")
    if args.download_outputs is not None:
        options.check_empty_or_absent(args.download_outputs, "--download-outputs directory")


def build_command(args):
    """Return the Command message, with its lists sorted as REAPI requires so that equal
    commands get equal digests."""
    command = re_pb2.Command(
        arguments=args.command,
        working_directory=args.working_directory or "",
        output_paths=sorted(args.outputs),
    )
    for name, value in sorted(args.environment):
        command.environment_variables.add(name=name, value=value)
    # Servers older than REAPI v2.2 read the platform only from the deprecated Command.platform.
    for name, value in sorted(args.platform):
        command.platform.properties.add(name=name, value=value)
    return command


def build_action(args, command_digest, input_root_digest, command):
    """Return the Action message for a Command and input root."""
    action = re_pb2.Action(
        command_digest=command_digest.to_proto(re_pb2.Digest),
        input_root_digest=input_root_digest.to_proto(re_pb2.Digest),
        do_not_cache=args.do_not_cache,
        platform=command.platform,
    )
    if args.timeout is not None:
        action.timeout.CopyFrom(args.timeout)
    return action


async def execute_command(args, channel):
    cas = CasClient(channel, args.instance)
    if args.action is not None:
        action_digest = args.action
    else:
        action_digest = await upload_action(cas, args)
    print_status(f"action {action_digest}")

    request = re_pb2.ExecuteRequest(
        instance_name=args.instance,
        action_digest=action_digest.to_proto(re_pb2.Digest),
        skip_cache_lookup=args.skip_cache,
        execution_policy=re_pb2.ExecutionPolicy(priority=args.priority),
    )
    operation = await follow_operation(remote_execution_pb2_grpc.ExecutionStub(channel), request)
    return await finish_execution(cas, args, operation)


async def upload_action(cas, args):
    """Upload the input root, Command and Action that ``args`` describe; return the Action
    digest. Only blobs that the server lacks are sent."""
    if args.input_root is not None:
        input_root_digest = await cas.upload_directory(args.input_root)
    else:
        # The empty Directory message serializes to the empty blob.
        input_root_digest = EMPTY_DIGEST

    command = build_command(args)
    command_data = tree.serialize(command)
    command_digest = Digest.of(command_data)
    action = build_action(args, command_digest, input_root_digest, command)
    action_data = tree.serialize(action)
    action_digest = Digest.of(action_data)
    await cas.upload_missing(blobs={command_digest: command_data, action_digest: action_data})
    return action_digest


async def finish_execution(cas, args, operation):
    """Print the result of a done Operation, download its outputs if requested, and
    return the exit status of ``bgrid execute``.

    Raises RemoteCallError when the execution ended with a non-OK status.
    """
    response = execute_response(operation)
    if response.message:
        print_status(f"server message: {response.message}")
    result = response.result
    await write_output_streams(cas, result)

    if response.status.code != code_pb2.OK:
        raise RemoteCallError(
            f"execution of operation {operation.name} failed: "
            + describe_status(code_name(response.status.code), response.status.message, response.status),
            response.status.code,
        )

    if response.cached_result:
        print_status("cached result: yes, served from the action cache")
    else:
        worker = result.execution_metadata.worker or "an unnamed worker"
        print_status(f"cached result: no, executed by {worker}")
    report_outputs(result, args.outputs)
    if args.download_outputs is not None:
        await download_outputs(cas, result, args.download_outputs)
        print_status(f"outputs downloaded into {args.download_outputs}")

    print_status(f"exit code {result.exit_code}")
    if 0 <= result.exit_code <= 255:
        return result.exit_code
    # A process exit status has 8 bits; report any other code as a failure.
    return 1


async def follow_operation(stub, request):
    """Call Execute, print each stage change to stderr and return the done Operation.

    REAPI lets the server end the stream before the operation is done; the operation is
    then followed with WaitExecution. Interrupting prints how to cancel the operation.
    """
    name = None
    stage = None
    method = "Execute"
    call = stub.Execute(request)
    try:
        while True:
            received = False
            try:
                async for operation in call:
                    received = True
                    if name is None:
                        name = operation.name
                        print_status(f"operation {name}")
                    metadata = re_pb2.ExecuteOperationMetadata()
                    if operation.metadata.Unpack(metadata) and metadata.stage != stage:
                        stage = metadata.stage
                        print_status(f"stage {re_pb2.ExecutionStage.Value.Name(stage)}")
                    if operation.done:
                        return operation
            except grpc.aio.AioRpcError as error:
                raise remote_error(method, error, f"operation {name}" if name else "") from None
            if name is None or not received:
                raise RemoteCallError(
                    f"{method} ended without a done operation"
                    + (f" for operation {name}" if name else "")
                )
            method = "WaitExecution"
            call = stub.WaitExecution(re_pb2.WaitExecutionRequest(name=name))
    except asyncio.CancelledError:
        if name is not None:
            print_status(
                f"operation {name} may still be running; stop it with "
                f"'bgrid operations cancel {name}'"
            )
        raise
    finally:
        call.cancel()


def execute_response(operation):
    """Return the ExecuteResponse of a done Operation.

    Raises RemoteCallError when the operation carries an error instead of a response.
    """
    kind = operation.WhichOneof("result")
    if kind == "error":
        raise RemoteCallError(
            f"operation {operation.name} failed: "
            + describe_status(code_name(operation.error.code), operation.error.message, operation.error),
            operation.error.code,
        )
    response = re_pb2.ExecuteResponse()
    if kind != "response" or not operation.response.Unpack(response):
        raise RemoteCallError(f"operation {operation.name} is done but has no ExecuteResponse")
    return response


async def write_output_streams(cas, result):
    """Write the command's stdout to standard output and its stderr to standard error."""
    for raw, digest_proto, stream in (
        (result.stdout_raw, result.stdout_digest, sys.stdout),
        (result.stderr_raw, result.stderr_digest, sys.stderr),
    ):
        data = raw
        if not data and digest_proto.size_bytes:
            data = await cas.read_blob(Digest.from_proto(digest_proto, "stdout or stderr digest"))
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()


def output_symlinks(result):
    """Return ``{path: target}`` of every output symlink, in the v2.1 and the older fields."""
    symlinks = {}
    for symlink in (*result.output_symlinks, *result.output_file_symlinks,
                    *result.output_directory_symlinks):
        symlinks.setdefault(symlink.path, symlink.target)
    return symlinks


def report_outputs(result, requested):
    """Print each output of ``result`` and warn about each requested one that is absent."""
    produced = set()
    for output in result.output_files:
        produced.add(output.path)
        executable = ", executable" if output.is_executable else ""
        print_status(
            f"output file {output.path}: {output.digest.hash}/{output.digest.size_bytes}{executable}"
        )
    for output in result.output_directories:
        produced.add(output.path)
        print_status(
            f"output directory {output.path}: Tree {output.tree_digest.hash}/"
            f"{output.tree_digest.size_bytes}"
        )
    for path, target in output_symlinks(result).items():
        produced.add(path)
        print_status(f"output symlink {path} -> {target}")
    for path in requested:
        if path not in produced:
            print_status(f"warning: output {path} was not created by the command")


def _local_path(directory, path):
    parts = tree.split_relative_path(path, "output path", allow_empty=True)
    return os.path.join(directory, *parts)


def _check_inside(directory, path):
    root = os.path.realpath(directory)
    resolved = os.path.realpath(path)
    if resolved != root and not resolved.startswith(root + os.sep):
        raise InvalidArgumentError(
            f"output {path!r} resolves outside the download directory {directory!r}"
        )


async def download_outputs(cas, result, directory):
    """Download the outputs of ``result`` into ``directory``, which is empty or absent.

    Directories come first, then files, then symlinks, so that no download is written
    through a symlink that an output created.
    """
    await asyncio.to_thread(os.makedirs, directory, exist_ok=True)

    for output in result.output_directories:
        destination = _local_path(directory, output.path)
        _check_inside(directory, os.path.dirname(destination))
        if output.tree_digest.hash:
            await cas.download_tree(Digest.from_proto(output.tree_digest, "tree_digest"), destination)
        else:
            # With output_directory_format DIRECTORY_ONLY a server sets only this digest.
            await cas.download_directory(
                Digest.from_proto(output.root_directory_digest, "root_directory_digest"), destination
            )

    first_paths = {}
    copies = []
    for output in result.output_files:
        destination = _local_path(directory, output.path)
        parent = os.path.dirname(destination)
        await asyncio.to_thread(os.makedirs, parent, exist_ok=True)
        _check_inside(directory, parent)
        digest = Digest.from_proto(output.digest, f"digest of output {output.path!r}")
        if digest in first_paths:
            copies.append((first_paths[digest], destination))
        else:
            first_paths[digest] = destination
    await cas.download_files(first_paths)
    for source, destination in copies:
        await asyncio.to_thread(shutil.copyfile, source, destination)
    for output in result.output_files:
        mode = 0o755 if output.is_executable else 0o644
        os.chmod(_local_path(directory, output.path), mode)

    for path, target in output_symlinks(result).items():
        destination = _local_path(directory, path)
        parent = os.path.dirname(destination)
        os.makedirs(parent, exist_ok=True)
        _check_inside(directory, parent)
        os.symlink(target, destination)
