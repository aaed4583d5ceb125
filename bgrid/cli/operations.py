"""``bgrid operations list``, ``get`` and ``cancel``: the server's execute operations."""

import json
from dataclasses import asdict, dataclass
from typing import Optional

from google.longrunning import operations_grpc_pb2, operations_proto_pb2
from google.rpc import code_pb2, error_details_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.cli import options
from bgrid.cli.rpc import format_message, unary_call

# The ErrorInfo reason and domain with which the server's scheduler marks a queued job
# that no connected bot can run (see bgrid.scheduler.waiting).
NO_MATCHING_BOT = "NO_MATCHING_BOT"
ERROR_DOMAIN = "bgrid"


def add_parsers(subparsers):
    """Add ``operations`` and its ``list``, ``get`` and ``cancel`` subcommands."""
    operations_parser = subparsers.add_parser(
        "operations", help="list, inspect and cancel execute operations",
        description="List, inspect and cancel the server's execute operations. A finished "
                    "operation stays listed for the server's --operation-retention.",
    )
    commands = operations_parser.add_subparsers(
        dest="operations_command", metavar="COMMAND", required=True
    )

    list_parser = commands.add_parser(
        "list", help="list the operations of an instance",
        description="List the operations of an instance, oldest first: name, stage, "
                    "whether it is done, its status once done, and the action digest. A "
                    "queued operation that no connected bot can run gets a line "
                    "'waiting: no bot matches NAME=VALUE,...' below it, naming the "
                    "action's platform requirements.",
    )
    list_parser.add_argument("--json", action="store_true",
                             help="print a JSON array of objects instead of a table")
    options.add_server_options(list_parser)
    list_parser.set_defaults(handler=list_command)

    get = commands.add_parser(
        "get", help="print one operation",
        description="Print an Operation with its ExecuteOperationMetadata and, once it is "
                    "done, its ExecuteResponse, in protobuf text format or as JSON.",
    )
    get.add_argument("name", metavar="NAME", help="operation name, as 'bgrid operations list' prints it")
    get.add_argument("--json", action="store_true",
                     help="print JSON with the proto field names instead of text format")
    options.add_server_options(get)
    get.set_defaults(handler=get_command)

    cancel = commands.add_parser(
        "cancel", help="cancel an operation",
        description="Cancel an operation. The server completes it with status CANCELLED "
                    "and stops its action unless another operation waits for the same "
                    "action. Cancelling a done operation changes nothing. Prints the "
                    "operation's state afterwards.",
    )
    cancel.add_argument("name", metavar="NAME", help="operation name, as 'bgrid operations list' prints it")
    options.add_server_options(cancel)
    cancel.set_defaults(handler=cancel_command)


@dataclass
class OperationSummary:
    """The fields of an execute operation that ``bgrid operations list`` shows."""

    name: str
    stage: str
    done: bool
    action_digest: str
    # Set once the operation is done: the ExecuteResponse status code name and message.
    status: Optional[str] = None
    message: Optional[str] = None
    cached_result: Optional[bool] = None
    exit_code: Optional[int] = None
    # Why a queued operation waits, such as "no bot matches OSFamily=windows", or None.
    waiting: Optional[str] = None

    @classmethod
    def from_operation(cls, operation):
        metadata = re_pb2.ExecuteOperationMetadata()
        stage = "UNKNOWN"
        action_digest = ""
        waiting = None
        if operation.metadata.Unpack(metadata):
            stage = re_pb2.ExecutionStage.Value.Name(metadata.stage)
            action_digest = f"{metadata.action_digest.hash}/{metadata.action_digest.size_bytes}"
            waiting = waiting_note(metadata)
        summary = cls(operation.name, stage, operation.done, action_digest, waiting=waiting)

        result_kind = operation.WhichOneof("result")
        if result_kind == "error":
            summary.status = code_name(operation.error.code)
            summary.message = operation.error.message
        elif result_kind == "response":
            response = re_pb2.ExecuteResponse()
            if operation.response.Unpack(response):
                summary.status = code_name(response.status.code)
                summary.message = response.status.message
                summary.cached_result = response.cached_result
                if response.HasField("result"):
                    summary.exit_code = response.result.exit_code
        return summary


def waiting_note(metadata):
    """Return why an operation waits for a bot, from its ExecuteOperationMetadata, or None.

    The scheduler puts a ``NO_MATCHING_BOT`` ErrorInfo in
    ``partial_execution_metadata.auxiliary_metadata``. Its ``platform`` metadata lists the
    action's requirements and ``missing`` those that no connected bot offers.
    """
    for auxiliary in metadata.partial_execution_metadata.auxiliary_metadata:
        info = error_details_pb2.ErrorInfo()
        if not auxiliary.Unpack(info):
            continue
        if info.domain != ERROR_DOMAIN or info.reason != NO_MATCHING_BOT:
            continue
        platform = info.metadata.get("platform", "")
        if not platform:
            return "no bot is connected to this instance"
        note = f"no bot matches {platform}"
        missing = info.metadata.get("missing", "")
        if missing and missing != platform:
            note += f" (no bot offers {missing})"
        return note
    return None


def code_name(code):
    """Return the ``google.rpc.Code`` name of ``code``, or the number if it has none."""
    try:
        return code_pb2.Code.Name(code)
    except ValueError:
        return str(code)


def format_table(summaries):
    """Return the operations as a table with a header, one operation per line.

    An operation that waits for a bot is followed by an indented ``waiting:`` line.
    """
    header = ("NAME", "STAGE", "DONE", "STATUS", "ACTION DIGEST")
    rows = [header] + [
        (
            summary.name,
            summary.stage,
            "yes" if summary.done else "no",
            summary.status or "-",
            summary.action_digest,
        )
        for summary in summaries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    lines = []
    for row, summary in zip(rows, [None] + list(summaries)):
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells + [row[-1]]))
        if summary is not None and summary.waiting:
            lines.append(f"  waiting: {summary.waiting}")
    return "\n".join(lines)


async def list_command(args, channel):
    stub = operations_grpc_pb2.OperationsStub(channel)
    summaries = []
    page_token = ""
    while True:
        # ListOperationsRequest.name is the instance name whose operations are listed.
        request = operations_proto_pb2.ListOperationsRequest(name=args.instance, page_token=page_token)
        response = await unary_call("ListOperations", stub.ListOperations, request)
        summaries.extend(OperationSummary.from_operation(operation) for operation in response.operations)
        page_token = response.next_page_token
        if not page_token:
            break

    if args.json:
        print(json.dumps([asdict(summary) for summary in summaries], indent=2), flush=True)
    else:
        print(format_table(summaries), flush=True)
    return 0


async def get_command(args, channel):
    stub = operations_grpc_pb2.OperationsStub(channel)
    request = operations_proto_pb2.GetOperationRequest(name=args.name)
    operation = await unary_call("GetOperation", stub.GetOperation, request)
    print(format_message(operation, args.json), flush=True)
    return 0


async def cancel_command(args, channel):
    stub = operations_grpc_pb2.OperationsStub(channel)
    await unary_call(
        "CancelOperation", stub.CancelOperation,
        operations_proto_pb2.CancelOperationRequest(name=args.name),
    )
    operation = await unary_call(
        "GetOperation", stub.GetOperation, operations_proto_pb2.GetOperationRequest(name=args.name)
    )
    summary = OperationSummary.from_operation(operation)
    state = f"operation {summary.name}: {summary.stage}"
    if summary.status is not None:
        state += f", status {summary.status}"
        if summary.message:
            state += f": {summary.message}"
    print(state, flush=True)
    return 0
