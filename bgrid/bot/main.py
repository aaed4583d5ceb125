"""The ``bgrid bot`` command: options, start-up checks and the reactor run.

The ``bgrid`` command line calls ``add_arguments`` on its ``bot`` subparser and ``run`` with
the parsed arguments. ``python -m bgrid.bot.main OPTIONS`` runs the bot without it.
"""

import argparse
import asyncio
import os
import re
import socket
import sys

# The bot forks each action's command with a preexec_fn that sets its parent death signal,
# and gRPC's fork handlers can crash such a child while gRPC threads are busy (with grpcio
# 1.85.3, several of 40 actions exited with SIGSEGV). gRPC reads this variable when it is
# imported, so this comes before any import of grpc. The ``bgrid`` command imports grpc
# before it hands ``bgrid bot`` to this module, so there the variable must be set earlier.
_GRPC_FORK_SUPPORT = "GRPC_ENABLE_FORK_SUPPORT"
if "grpc" not in sys.modules:
    os.environ[_GRPC_FORK_SUPPORT] = "false"
GRPC_FORK_HANDLERS_DISABLED = os.environ.get(_GRPC_FORK_SUPPORT, "").lower() in ("false", "0")

from bgrid.bot.bot import Bot, BotConfig, WorkDirectory, WorkDirectoryBusyError  # noqa: E402
from bgrid.bot.runner import parent_death_signal_available  # noqa: E402
from bgrid.client.channel import parse_address  # noqa: E402
from bgrid.errors import InvalidArgumentError  # noqa: E402

DEFAULT_CACHE_MAX_BYTES = 10 * 1024 ** 3
DEFAULT_WORK_DIRECTORY = "bgrid-bot-work"

_SIZE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


def _server_address(text):
    try:
        parse_address(text)
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return text


def _platform_property(text):
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(
            f"invalid property {text!r}: expected NAME=VALUE, for example OSFamily=linux"
        )
    return name, value


def _positive_integer(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a whole number >= 1")
    return value


def _size_in_bytes(text):
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a number of bytes, optionally followed by "
            f"K, M, G or T (powers of 1024), for example 20G"
        )
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def _bot_name(text):
    if not text or any(character.isspace() for character in text):
        raise argparse.ArgumentTypeError(
            f"invalid bot name {text!r}: it must not be empty or contain spaces"
        )
    return text


def add_arguments(parser):
    """Add the options of ``bgrid bot`` to an ``argparse`` parser."""
    parser.add_argument(
        "--server", required=True, type=_server_address, metavar="HOST:PORT",
        help="address of the bgrid server: HOST:PORT, grpc://HOST:PORT, grpcs://HOST:PORT "
             "(TLS with the system's root certificates) or unix:PATH",
    )
    parser.add_argument(
        "--instance", default="", metavar="NAME",
        help="REAPI instance name to take work from (default: the empty name)",
    )
    parser.add_argument(
        "--property", dest="properties", action="append", default=[], type=_platform_property,
        metavar="NAME=VALUE",
        help="platform property that this bot offers, such as OSFamily=linux; repeat the "
             "option for several properties",
    )
    parser.add_argument(
        "--work-dir", default=DEFAULT_WORK_DIRECTORY, metavar="DIR",
        help="directory for the blob cache and the actions' exec roots; one bot per "
             f"directory (default: ./{DEFAULT_WORK_DIRECTORY})",
    )
    parser.add_argument(
        "--concurrency", type=_positive_integer, default=os.cpu_count() or 1, metavar="N",
        help="number of actions run at the same time, one bot session each "
             "(default: the number of CPUs, %(default)s here)",
    )
    parser.add_argument(
        "--name", type=_bot_name, default=socket.gethostname(), metavar="NAME",
        help="bot name; session N uses the bot id NAME.N (default: the host name)",
    )
    parser.add_argument(
        "--cache-size", type=_size_in_bytes, default=DEFAULT_CACHE_MAX_BYTES, metavar="BYTES",
        help="maximum size of the local blob cache in bytes, optionally with a suffix K, M, "
             "G or T (powers of 1024); the least recently used blobs are removed beyond it "
             "(default: 10G)",
    )


def _install_asyncio_reactor():
    """Install Twisted's asyncio reactor, or return it if it is installed already."""
    from twisted.internet import asyncioreactor

    if "twisted.internet.reactor" not in sys.modules:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    if not isinstance(reactor, asyncioreactor.AsyncioSelectorReactor):
        raise RuntimeError(
            f"bgrid bot needs Twisted's asyncio reactor, but {type(reactor).__name__} is "
            f"installed already"
        )
    return reactor


def _begin_logging():
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _error(message):
    print(f"bgrid bot: error: {message}", file=sys.stderr)
    return 2


def run(args):
    """Run the bot until SIGINT or SIGTERM; return the process exit code.

    On a signal the bot stops taking leases, kills the process groups of running actions,
    and reports status BOT_TERMINATING to the server with the leases it returns, within a
    few seconds. Returns 2 after printing one message when the work directory cannot be
    used, 1 when the bot stops on an unexpected error, and 0 after a signal.
    """
    config = BotConfig(
        server=args.server,
        name=args.name,
        concurrency=args.concurrency,
        cache_max_bytes=args.cache_size,
        instance_name=args.instance,
        properties=list(args.properties),
        parent_death_signal=GRPC_FORK_HANDLERS_DISABLED and parent_death_signal_available(),
    )
    try:
        work_directory = WorkDirectory.open(args.work_dir)
    except WorkDirectoryBusyError as error:
        return _error(str(error))
    except OSError as error:
        return _error(f"cannot use work directory {args.work_dir!r}: {error.strerror}")

    try:
        reactor = _install_asyncio_reactor()
    except RuntimeError as error:
        work_directory.close()
        return _error(str(error))
    _begin_logging()

    from twisted.internet import defer
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import Logger

    log = Logger(namespace="bgrid.bot")
    if parent_death_signal_available() and not config.parent_death_signal:
        log.warn(
            "gRPC was imported with its fork handlers enabled, so actions keep running if "
            "the bot is killed, until the next bot in this work directory kills them. Set "
            "GRPC_ENABLE_FORK_SUPPORT=false or run python -m bgrid.bot.main"
        )
    bot = Bot(config, work_directory, reactor)
    exit_code = 0

    def start():
        def failed(failure):
            nonlocal exit_code
            if failure.check(asyncio.CancelledError, defer.CancelledError):
                return  # stopped by a signal through bot.stop
            exit_code = 1
            log.failure("bot {name} stopped on an error", failure, name=config.name)

        def stop_reactor(_):
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # already shutting down after a signal

        bot.start().addErrback(failed).addBoth(stop_reactor)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", bot.stop)
    try:
        reactor.run()
    finally:
        work_directory.close()
    return exit_code


def main(argv=None):
    """Parse ``argv`` (default: ``sys.argv[1:]``) as ``bgrid bot`` options and run the bot."""
    parser = argparse.ArgumentParser(
        prog="bgrid bot", description="Run a bgrid worker that executes REAPI actions."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
