"""The server's settings, and the parsers for the sizes and durations users write in options."""

import dataclasses
import re

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text):
    """Parse a size in bytes such as ``4194304``, ``4MiB`` or ``1.5GB``; raise ValueError."""
    match = _SIZE_PATTERN.fullmatch(str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(
            f"invalid size {text!r}: expected a number of bytes, optionally with a unit "
            f"(KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_fraction(text):
    """Parse a fraction greater than 0 and at most 1, such as ``0.9``; raise ValueError."""
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(f"invalid fraction {text!r}: expected a number such as 0.9")
    if not 0 < fraction <= 1:
        raise ValueError(f"invalid fraction {text!r}: must be greater than 0 and at most 1")
    return fraction


def parse_listen_address(text):
    """Check a gRPC listen address: ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:PATH``.

    PORT is 0 (any free port) to 65535. Returns the address unchanged; raises ValueError.
    """
    expected = "expected HOST:PORT, [IPv6]:PORT or unix:PATH"
    if text.startswith("unix:"):
        if len(text) == len("unix:"):
            raise ValueError(f"invalid address {text!r}: the socket path is missing")
        return text
    host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise ValueError(f"invalid address {text!r}: {expected}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) == 2:
            raise ValueError(f"invalid address {text!r}: {expected}")
    elif ":" in host:
        raise ValueError(f"invalid address {text!r}: put an IPv6 address in brackets, as [::1]:PORT")
    if not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {text!r}: the port must be a number from 0 to 65535")
    return text


def parse_seconds(text):
    """Parse a non-negative duration in seconds such as ``30`` or ``0.5``; raise ValueError."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: expected a number of seconds")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"invalid duration {text!r}: must be a number of seconds of 0 or more")
    return seconds


@dataclasses.dataclass
class ServerConfig:
    """Everything ``bgrid.server.BgridService`` needs to build and run a grid node."""

    # gRPC listen addresses: "HOST:PORT", "[::1]:PORT" or "unix:PATH".
    listen: list = dataclasses.field(default_factory=lambda: ["127.0.0.1:50051"])
    # Directory holding the LMDB environment (CAS, action cache) and local bot work dirs.
    data_dir: str = "bgrid-data"
    instance_names: list = dataclasses.field(default_factory=lambda: [""])
    # Largest total of blob sizes, in bytes, in one BatchUpdateBlobs or BatchReadBlobs.
    # 64 KiB below 4 MiB, so that a response with one blob of this size fits the 4 MiB
    # that gRPC clients accept by default.
    max_batch_size: int = 4 * 2**20 - 64 * 2**10
    # LMDB map size in bytes: the most the database file may grow to. It is sparse.
    map_size: int = 2**40
    # CAS quota: the maximum bytes of stored blobs before least-recently-used ones are evicted.
    max_cas_size: int = 10 * 2**30
    # Fraction of max_cas_size that eviction goes down to once the quota is reached.
    cas_low_watermark: float = 0.9
    # Actions run at once by the one bot process the daemon starts beside itself; 0 starts none.
    local_bots: int = 0
    local_bot_properties: list = dataclasses.field(default_factory=list)
    # Seconds a bot session may go without calling UpdateBotSession before it is closed.
    bot_keepalive_timeout: float = 60.0
    # Longest time, in seconds, an idle bot's UpdateBotSession waits for work.
    max_long_poll: float = 20.0
    # Times a job is handed out again after its bot went away, before it fails.
    max_job_retries: int = 3
    # Seconds a finished operation stays queryable.
    operation_retention: float = 3600.0
    # Maximum time in seconds an action may run on a bot. Actions without a timeout, or
    # with a longer one, run with this one.
    max_action_timeout: float = 3600.0
    # Seconds past an action's timeout that the server waits for its bot's result before
    # it cancels the lease and fails the action with DEADLINE_EXCEEDED.
    action_timeout_grace: float = 60.0
