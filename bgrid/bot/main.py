"""The ``bgrid bot`` command: options, start-up checks and the reactor run.

The ``bgrid`` command line calls ``add_arguments`` on its ``bot`` subparser and ``run`` with
the parsed arguments. ``python -m bgrid.bot.main OPTIONS`` runs the bot without it.
"""

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import sys

from bgrid.bot.bot import Bot, BotConfig, WorkDirectory, WorkDirectoryBusyError
from bgrid.bot.session import SessionRejectedError
from bgrid.client.channel import parse_address
from bgrid.config import parse_size
from bgrid.errors import InvalidArgumentError

DEFAULT_CACHE_MAX_BYTES = 10 * 2**30
DEFAULT_WORK_DIRECTORY = "bgrid-bot-work"


def default_bot_name(work_directory):
    """Return ``{host name}-{8 hex digits}``, the digits from the SHA-256 of the absolute
    ``work_directory``.

    Bots on one host with different work directories get different names, and a bot
    restarted on the same work directory gets its old name, so its new sessions replace
    the old ones at once.
    """
    path = os.path.abspath(work_directory)
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()
    return f"{socket.gethostname()}-{digest[:8]}"


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
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
        "--name", type=_bot_name, default=None, metavar="NAME",
        help="bot name, unique among the bots of the server; session N uses the bot id "
             "NAME.N (default: the host name, a hyphen and 8 hex digits of the SHA-256 of "
             "the absolute work directory, so that it stays the same for one work "
             "directory and differs between work directories)",
    )
    parser.add_argument(
        "--cache-size", type=_size_in_bytes, default=DEFAULT_CACHE_MAX_BYTES, metavar="SIZE",
        help="maximum size of the local blob cache: a number of bytes, optionally with a "
             "unit KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), "
             "as the daemon's sizes; the least recently used blobs are removed beyond it "
             "(default: 10GiB)",
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


def _handle_stop_signals(reactor, on_stop_signal):
    """Call ``on_stop_signal(name)`` in the reactor thread on each SIGINT and SIGTERM.

    As Twisted does, SIGINT is handled only when Python's default handler is in place.
    It is not when SIGINT was ignored at start, as in a background job of a shell
    without job control. Returns a function that puts the previous handlers back.
    """
    def handle(signal_number, frame):
        reactor.callFromThread(on_stop_signal, signal.Signals(signal_number).name)

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        handled.append(signal.SIGINT)
    previous = {signal_number: signal.signal(signal_number, handle) for signal_number in handled}

    def restore():
        for signal_number, handler in previous.items():
            signal.signal(signal_number, handler)

    return restore


def _error(message):
    print(f"bgrid bot: error: {message}", file=sys.stderr)
    return 2


def run(args):
    """Run the bot until SIGINT or SIGTERM; return the process exit code.

    On a signal the bot stops taking leases, kills the processes of running actions,
    and reports status BOT_TERMINATING to the server with the leases it returns, within a
    few seconds. Returns 2 after printing one message when the work directory cannot be
    used or the server rejects a session for good, 1 when the bot stops on an unexpected
    error, and 0 after a signal.
    """
    config = BotConfig(
        server=args.server,
        name=args.name or default_bot_name(args.work_dir),
        concurrency=args.concurrency,
        cache_max_bytes=args.cache_size,
        instance_name=args.instance,
        properties=list(args.properties),
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
    bot = Bot(config, work_directory, reactor)
    exit_code = 0
    stopping = False

    def on_stop_signal(signal_name):
        # Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so a bot
        # that a foreground daemon runs gets SIGINT, and then SIGTERM from that daemon.
        nonlocal stopping
        if stopping:
            log.info("received {signal_name} while bot {name} is stopping already, "
                     "ignoring it", signal_name=signal_name, name=config.name)
            return
        stopping = True
        log.info("received {signal_name}, stopping bot {name}",
                 signal_name=signal_name, name=config.name)
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # the bot stopped on its own, and the reactor with it

    def start():
        def failed(failure):
            nonlocal exit_code
            if failure.check(asyncio.CancelledError, defer.CancelledError):
                return  # stopped by a signal through bot.stop
            if failure.check(SessionRejectedError):
                # A configuration error, which the message explains without a traceback.
                exit_code = _error(str(failure.value))
                return
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
    restore_signal_handlers = _handle_stop_signals(reactor, on_stop_signal)
    try:
        # Twisted's own handlers call reactor.stop on every signal, and the second call
        # logs a ReactorNotRunning traceback.
        reactor.run(installSignalHandlers=False)
    finally:
        restore_signal_handlers()
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
