"""Argument parsing shared by the ``bgrid`` subcommands: the parser class, value types and
the options of every command that talks to a server."""

import argparse
import decimal
import os
import sys

from google.protobuf import duration_pb2

from bgrid.client.channel import parse_address
from bgrid.client.tree import split_relative_path
from bgrid.digest import Digest
from bgrid.errors import InvalidArgumentError

# The daemon's default listen address (see ``ServerConfig.listen``).
DEFAULT_SERVER = "127.0.0.1:50051"

SERVER_HELP = (
    "address of the bgrid server: HOST:PORT, grpc://HOST:PORT, grpcs://HOST:PORT (TLS "
    "with the system's root certificates) or unix:PATH (default: %(default)s)"
)


# Ranges of the protobuf fields that numeric options fill.
INT32_MIN = -2**31
INT32_MAX = 2**31 - 1
# google.protobuf.Duration covers about +-10,000 years: seconds up to 315,576,000,000.
MAX_DURATION_SECONDS = 315_576_000_000
NANOSECONDS_PER_SECOND = 10**9


class UsageError(Exception):
    """An argument is invalid in a way that only shows after parsing, such as a path that
    does not exist. The command exits with status 2, as for a parse error."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser that reports an invalid command line in one line.

    ``argparse`` prints the whole usage before the error; a long usage such as that of
    ``bgrid execute`` would bury the one line that matters.
    """

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_server_options(parser, group_title=None):
    """Add ``--server`` and ``--instance`` to the parser of a client subcommand.

    With ``group_title`` they are listed under that heading in the help. The parser is also
    stored as ``usage_parser``, which reports the command's UsageErrors.
    """
    parser.set_defaults(usage_parser=parser)
    container = parser.add_argument_group(group_title) if group_title else parser
    container.add_argument(
        "--server", default=DEFAULT_SERVER, type=server_address, metavar="HOST:PORT",
        help=SERVER_HELP,
    )
    container.add_argument(
        "--instance", default="", metavar="NAME",
        help="REAPI instance name (default: the empty name)",
    )


def server_address(text):
    """Check a server address in any form that ``parse_address`` accepts and return it."""
    try:
        parse_address(text)
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return text


def digest(text):
    """Parse a digest written as ``HASH/SIZE``, the form that ``bgrid`` prints."""
    hash_hex, separator, size = text.partition("/")
    if not separator:
        raise argparse.ArgumentTypeError(
            f"invalid digest {text!r}: expected HASH/SIZE, a SHA-256 hash in lowercase hex "
            f"and a size in bytes, as 'bgrid cas upload' prints them"
        )
    try:
        parsed = Digest.parse(hash_hex, size, field=f"digest {text!r}")
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return parsed


def name_value(text):
    """Parse ``NAME=VALUE`` into a ``(name, value)`` pair; the value may be empty."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected NAME=VALUE")
    return name, value


def positive_duration(text):
    """Parse a number of seconds into a ``google.protobuf.Duration``, rounded to whole ns.

    The value must be finite, round to at least 1 ns and be at most MAX_DURATION_SECONDS.
    It is parsed as a decimal, so that no float rounding changes it.
    """
    try:
        seconds = decimal.Decimal(text)
    except decimal.InvalidOperation:
        seconds = None
    if seconds is None or not seconds.is_finite() or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected a number of seconds greater than 0"
        )
    if seconds > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: the maximum is {MAX_DURATION_SECONDS} seconds, "
            f"the range of a protobuf Duration"
        )
    scaled = seconds * NANOSECONDS_PER_SECOND
    nanoseconds = int(scaled.to_integral_value(decimal.ROUND_HALF_EVEN))
    if nanoseconds < 1:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: it rounds to 0 nanoseconds; the minimum is "
            f"0.000000001 seconds (1 ns)"
        )
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(nanoseconds)
    return duration


def int32(text):
    """Parse a whole number that fits a protobuf int32 field."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not INT32_MIN <= value <= INT32_MAX:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a whole number from {INT32_MIN} to {INT32_MAX}"
        )
    return value


def relative_path(text):
    """Check a ``/``-separated path relative to the input root or working directory."""
    try:
        split_relative_path(text, "path")
    except InvalidArgumentError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return text


def existing_path(text):
    """Check that a local file or directory exists and return its path."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text


def existing_directory(text):
    """Check that a local directory exists and return its path."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def check_empty_or_absent(path, label):
    """Raise UsageError unless ``path`` does not exist or is an empty directory.

    ``label`` names the argument in the message, as in "destination".
    """
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise UsageError(f"{label} {path!r} exists and is not a directory")
    if os.listdir(path):
        raise UsageError(f"{label} {path!r} is not empty; give a new or empty directory")


def print_status(message):
    """Print a progress or result line of ``bgrid`` itself to stderr.

    Standard output is kept for the data a command returns, such as an action's stdout.
    """
    print(f"bgrid: {message}", file=sys.stderr, flush=True)
