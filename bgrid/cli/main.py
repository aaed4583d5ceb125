"""The ``bgrid`` command: argument parsing, dispatch to the subcommands and exit statuses.

A command exits with status 0 when it succeeds and 2 when its command line is invalid. A
failed call, a failed execution or a local error prints one ``bgrid: error: ...`` line on
stderr and exits with 1, and an interrupt exits with 130. Otherwise ``bgrid execute`` exits
with the remote command's exit code.
"""

import asyncio
import os
import sys
from importlib import metadata

import grpc

from bgrid.cli import action_cache, capabilities, cas, execute, operations
from bgrid.cli.options import ArgumentParser, UsageError, print_status
from bgrid.cli.rpc import remote_error
from bgrid.client.channel import open_channel
from bgrid.errors import BgridError, MissingBlobsError


BOT_HELP = "run a worker that executes actions for a bgrid server"


def _version():
    try:
        return metadata.version("bgrid")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser():
    """Return the parser of the ``bgrid`` command line with every subcommand."""
    parser = ArgumentParser(
        prog="bgrid",
        description="bgrid, a remote execution service for Bazel and other REAPI clients: "
                    "run a bot, or use the CAS, the action cache and execution from the "
                    "command line. The daemon itself runs as 'twistd bgrid'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    # Listed for --help only: main() hands "bgrid bot ..." to build_bot_parser() before this
    # parser runs.
    subparsers.add_parser("bot", help=BOT_HELP)

    cas.add_parsers(subparsers)
    execute.add_parsers(subparsers)
    action_cache.add_parsers(subparsers)
    operations.add_parsers(subparsers)
    capabilities.add_parsers(subparsers)
    return parser


def build_bot_parser():
    """Return the parser of ``bgrid bot``.

    It is built only for that subcommand, so that the other commands start without
    importing the bot and Twisted.
    """
    from bgrid.bot import main as bot_main

    parser = ArgumentParser(
        prog="bgrid bot",
        description="Run a bgrid worker that executes REAPI actions. It stops on SIGINT or "
                    "SIGTERM.",
    )
    bot_main.add_arguments(parser)
    parser.set_defaults(run=bot_main.run)
    return parser


def main(argv=None):
    """Run ``bgrid`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bot"]:
        args = build_bot_parser().parse_args(argv[1:])
        return args.run(args)

    args = build_parser().parse_args(argv)

    check = getattr(args, "check", None)
    if check is not None:
        try:
            check(args)
        except UsageError as error:
            args.usage_parser.error(str(error))
    return run_client_command(args)


async def _call_handler(args):
    channel = open_channel(args.server)
    try:
        return await args.handler(args, channel)
    finally:
        await channel.close()


def run_client_command(args):
    """Run the handler of a client subcommand on a new event loop; return the exit status.

    Errors become one ``bgrid: error: ...`` line and status 1, never a traceback.
    """
    try:
        return asyncio.run(_call_handler(args))
    except KeyboardInterrupt:
        print_status("interrupted")
        return 130
    except MissingBlobsError as error:
        return _fail(f"NOT_FOUND: {error.message} (not in the server's CAS)")
    except BgridError as error:
        # RemoteCallError messages name the call and its status code already.
        return _fail(error.message)
    except grpc.aio.AioRpcError as error:
        return _fail(remote_error("call", error).message)
    except BrokenPipeError:
        # The reader of standard output went away, as in `bgrid cas download ... - | head`.
        # Point stdout at /dev/null so that the flush at exit raises no second error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as error:
        where = f" {error.filename!r}" if error.filename else ""
        return _fail(f"cannot use{where}: {error.strerror or error}")


def _fail(message):
    print(f"bgrid: error: {message}", file=sys.stderr, flush=True)
    return 1
