"""The ``twistd bgrid`` command: its options and the service tree it runs."""

import asyncio
import sys

from twisted.python import usage

from bgrid.config import (
    ServerConfig,
    parse_fraction,
    parse_listen_address,
    parse_seconds,
    parse_size,
)

DEFAULTS = ServerConfig()


def install_asyncio_reactor():
    """Install Twisted's asyncio reactor unless it is installed already.

    grpc.aio serves on the asyncio event loop, so bgrid needs the reactor that runs one.
    Raises UsageError when another reactor was chosen (for example with ``--reactor``).
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
        return

    from twisted.internet import reactor
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        raise usage.UsageError(
            f"bgrid needs Twisted's asyncio reactor, not {type(reactor).__name__}: "
            f"run `twistd --reactor=asyncio bgrid ...` or leave --reactor out"
        )


class Options(usage.Options):
    """Options of ``twistd bgrid``. Sizes take units (4MiB, 10GiB); durations are seconds."""

    synopsis = "[bgrid options]"

    optParameters = [
        ["data-dir", "d", DEFAULTS.data_dir,
         "Directory for the LMDB store and local bot work directories."],
        ["max-batch-size", None, "4032KiB",
         "Largest total of blob sizes in one BatchUpdateBlobs or BatchReadBlobs (bytes, "
         "or with a unit such as 4MiB). The default leaves room below the 4 MiB message "
         "limit of gRPC clients for the digests and statuses of a response."],
        ["map-size", None, "1TiB",
         "Largest size the LMDB database file may grow to (bytes or with a unit). The map "
         "starts at 1GiB, or this size if smaller, and doubles each time it fills."],
        ["max-cas-size", None, "10GiB",
         "CAS quota: the maximum total size of stored blobs before the least recently "
         "used are evicted (bytes, or with a unit such as 10GiB). The default of 10GiB is "
         "meant to fit the free disk of a typical developer machine or CI runner while "
         "holding the outputs of several builds (an estimate, not a measurement). Set it "
         "to what the disk of --data-dir can spare. Disk use exceeds it by the index, the "
         "action cache and uploads in progress, so keep --map-size well above it."],
        ["cas-low-watermark", None, str(DEFAULTS.cas_low_watermark),
         "Fraction of --max-cas-size that eviction goes down to once the quota is reached "
         "(greater than 0, at most 1). 0.9 evicts a tenth of the quota at a time, so "
         "eviction runs about once per that many bytes written."],
        ["local-bots", None, "0",
         "Number of actions run at once by a bot process the daemon starts beside itself "
         "(0: no local bot)."],
        ["bot-keepalive", None, str(DEFAULTS.bot_keepalive_timeout),
         "Seconds a bot session may go without calling UpdateBotSession before it is "
         "closed and its lease requeued."],
        ["max-long-poll", None, str(DEFAULTS.max_long_poll),
         "Longest time in seconds an idle bot's UpdateBotSession waits for work."],
        ["max-job-retries", None, str(DEFAULTS.max_job_retries),
         "Times a job is requeued after its bot went away before its operation fails."],
        ["operation-retention", None, str(DEFAULTS.operation_retention),
         "Seconds a finished operation stays available to GetOperation and WaitExecution."],
        ["max-action-timeout", None, str(DEFAULTS.max_action_timeout),
         "Maximum time in seconds an action may run on a bot. An action without a "
         "timeout runs with this timeout, and Execute rejects one that asks for a longer "
         "timeout with INVALID_ARGUMENT."],
        ["action-timeout-grace", None, str(DEFAULTS.action_timeout_grace),
         "Seconds past an action's timeout that the server waits for its bot to report, "
         "which covers fetching inputs and uploading outputs. Then it cancels the lease "
         "and fails the action with DEADLINE_EXCEEDED, without a retry."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["instance"] = []
        self["local-bot-property"] = []

    def opt_listen(self, address):
        """Address to serve gRPC on: HOST:PORT, [IPv6]:PORT or unix:PATH (repeatable; default 127.0.0.1:50051)."""
        self["listen"].append(address)

    opt_l = opt_listen

    def opt_instance(self, name):
        """Instance name to serve, such as projects/p/instances/main (repeatable; default: the empty name only)."""
        self["instance"].append(name)

    def opt_local_bot_property(self, prop):
        """Platform property NAME=VALUE of the local bot. Repeatable."""
        self["local-bot-property"].append(prop)

    def postOptions(self):
        install_asyncio_reactor()
        self.config = self._build_config()

    def _build_config(self):
        errors = []

        def convert(key, parser, minimum=None):
            try:
                value = parser(self[key])
            except ValueError as error:
                errors.append(f"--{key}: {error}")
                return None
            if minimum is not None and value < minimum:
                errors.append(f"--{key}: invalid value {self[key]!r}: must be at least {minimum}")
                return None
            return value

        def integer(text):
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"invalid number {text!r}: expected a whole number")

        config = ServerConfig(
            listen=self["listen"] or list(DEFAULTS.listen),
            data_dir=self["data-dir"],
            instance_names=self["instance"] or list(DEFAULTS.instance_names),
            max_batch_size=convert("max-batch-size", parse_size, minimum=1024),
            map_size=convert("map-size", parse_size, minimum=2**20),
            max_cas_size=convert("max-cas-size", parse_size, minimum=2**20),
            cas_low_watermark=convert("cas-low-watermark", parse_fraction),
            local_bots=convert("local-bots", integer, minimum=0),
            local_bot_properties=list(self["local-bot-property"]),
            bot_keepalive_timeout=convert("bot-keepalive", parse_seconds, minimum=1.0),
            max_long_poll=convert("max-long-poll", parse_seconds, minimum=0.1),
            max_job_retries=convert("max-job-retries", integer, minimum=0),
            operation_retention=convert("operation-retention", parse_seconds, minimum=1.0),
            max_action_timeout=convert("max-action-timeout", parse_seconds, minimum=1.0),
            action_timeout_grace=convert("action-timeout-grace", parse_seconds, minimum=0.0),
        )

        for name in config.instance_names:
            reserved = {"blobs", "uploads", "operations", "actions", "actionResults",
                        "capabilities", "compressed-blobs", "botSessions"}
            segments = name.split("/") if name else []
            if any(segment in reserved for segment in segments) or "" in segments:
                errors.append(
                    f"--instance: invalid instance name {name!r}: segments must be non-empty "
                    f"and none of {', '.join(sorted(reserved))}"
                )
        if (
            config.max_cas_size is not None
            and config.map_size is not None
            and config.max_cas_size > config.map_size
        ):
            errors.append(
                f"--max-cas-size: invalid value {self['max-cas-size']!r}: must not exceed "
                f"--map-size ({self['map-size']}), because the LMDB map holds the CAS"
            )
        if len(set(config.instance_names)) != len(config.instance_names):
            errors.append("--instance: an instance name is given more than once")
        for prop in config.local_bot_properties:
            if "=" not in prop or prop.startswith("="):
                errors.append(f"--local-bot-property: invalid property {prop!r}: expected NAME=VALUE")

        for address in config.listen:
            try:
                parse_listen_address(address)
            except ValueError as error:
                errors.append(f"--listen: {error}")

        if errors:
            raise usage.UsageError("\n".join(errors))
        return config


def makeService(options):
    """Return the bgrid service tree for parsed ``Options``."""
    from bgrid.server import BgridService

    return BgridService(options.config)
