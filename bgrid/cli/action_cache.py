"""``bgrid action-cache get``: look up the cached result of an action."""

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid.cli import options
from bgrid.cli.rpc import format_message, unary_call


def add_parsers(subparsers):
    """Add ``action-cache`` and its ``get`` subcommand."""
    action_cache_parser = subparsers.add_parser(
        "action-cache", help="look up cached action results",
        description="Look up results in the action cache.",
    )
    commands = action_cache_parser.add_subparsers(
        dest="action_cache_command", metavar="COMMAND", required=True
    )

    get = commands.add_parser(
        "get", help="print the cached ActionResult of an action",
        description="Print the ActionResult cached for an action, in protobuf text format "
                    "or as JSON. Exits with status 1 and a NOT_FOUND error when the action "
                    "has no cached result.",
    )
    get.add_argument("action_digest", type=options.digest, metavar="ACTION_DIGEST",
                     help="digest of the Action message as HASH/SIZE, size in bytes")
    get.add_argument("--inline-stdout", action="store_true",
                     help="ask the server to include the action's stdout in stdout_raw")
    get.add_argument("--inline-stderr", action="store_true",
                     help="ask the server to include the action's stderr in stderr_raw")
    get.add_argument("--json", action="store_true",
                     help="print JSON with the proto field names instead of text format")
    options.add_server_options(get)
    get.set_defaults(handler=get_command)


async def get_command(args, channel):
    stub = remote_execution_pb2_grpc.ActionCacheStub(channel)
    request = re_pb2.GetActionResultRequest(
        instance_name=args.instance,
        action_digest=args.action_digest.to_proto(re_pb2.Digest),
        inline_stdout=args.inline_stdout,
        inline_stderr=args.inline_stderr,
    )
    result = await unary_call(
        "GetActionResult", stub.GetActionResult, request, f"action {args.action_digest}"
    )
    print(format_message(result, args.json), flush=True)
    return 0
