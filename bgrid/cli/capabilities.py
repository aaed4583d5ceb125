"""``bgrid capabilities``: what the server supports."""

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid.cli import options
from bgrid.cli.rpc import format_message, unary_call


def add_parsers(subparsers):
    """Add the ``capabilities`` subcommand."""
    parser = subparsers.add_parser(
        "capabilities", help="print the server's capabilities",
        description="Print the ServerCapabilities of an instance: digest functions, batch "
                    "size limit in bytes, whether execution is enabled and the REAPI "
                    "versions served.",
    )
    parser.add_argument("--json", action="store_true",
                        help="print JSON with the proto field names instead of text format")
    options.add_server_options(parser)
    parser.set_defaults(handler=capabilities_command)


async def capabilities_command(args, channel):
    stub = remote_execution_pb2_grpc.CapabilitiesStub(channel)
    request = re_pb2.GetCapabilitiesRequest(instance_name=args.instance)
    capabilities = await unary_call("GetCapabilities", stub.GetCapabilities, request)
    print(format_message(capabilities, args.json), flush=True)
    return 0
