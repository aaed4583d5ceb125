"""Capped exponential backoff, and the retries of a bot's calls that failed transiently."""

import random

import grpc
from google.rpc import code_pb2
from twisted.internet import task
from twisted.logger import Logger

from bgrid.bridge import as_future
from bgrid.errors import BgridError

log = Logger()

# The daemon's default --bot-keepalive, in seconds. A bot assumes it until the server's
# responses tell it otherwise (see SessionLoop).
DEFAULT_SERVER_KEEPALIVE_SECONDS = 60.0

# Seconds beyond the server's keepalive for which a bot keeps retrying to deliver a result:
# uploads of outputs, and the report of the completed lease. A daemon that restarts gives
# every recovered session a full keepalive period from its start, so this is the time that
# a restart may take.
RESULT_RETRY_MARGIN_SECONDS = 30.0

# Seconds for which a bot retries to deliver a result before it has learned the server's
# keepalive.
DEFAULT_RESULT_RETRY_SECONDS = DEFAULT_SERVER_KEEPALIVE_SECONDS + RESULT_RETRY_MARGIN_SECONDS

# Status codes of failures that may pass when the call is repeated: the server is down or
# restarting, a deadline passed, or a transaction was aborted.
TRANSIENT_CODES = frozenset({code_pb2.UNAVAILABLE, code_pb2.DEADLINE_EXCEEDED, code_pb2.ABORTED})


class Backoff:
    """Capped exponential delays, in seconds, with jitter so that bots do not retry in step.

    The n-th delay (from 0) is ``min(initial * 2**n, maximum)`` times a factor between 0.5
    and 1 taken from ``random_fraction()``.
    """

    def __init__(self, initial=0.5, maximum=30.0, random_fraction=random.random):
        self.initial = initial
        self.maximum = maximum
        self._random_fraction = random_fraction
        self._failures = 0

    def next_delay(self):
        """Return the delay before the next retry and count one more failure."""
        delay = min(self.initial * 2 ** self._failures, self.maximum)
        self._failures = min(self._failures + 1, 64)
        return delay * (0.5 + self._random_fraction() / 2)

    def reset(self):
        """Start again from ``initial`` after a success."""
        self._failures = 0


def status_code_of(error):
    """Return the ``google.rpc.Code`` number of a failed call's error, or None for others."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().value[0]
    if isinstance(error, BgridError):
        return error.code
    return None


def describe_error(error):
    """Return one line on a failed call's error, with its status code."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, BgridError):
        return error.message
    return repr(error)


async def sleep(clock, seconds):
    """Wait ``seconds`` on ``clock``, an ``IReactorTime``; cancellable."""
    await as_future(task.deferLater(clock, seconds, lambda: None))


async def retry_transient(operation, clock, give_up_after, description, lease_id, bot_id,
                          backoff=None):
    """Await ``operation()`` again and again until it returns, and return its result.

    Errors whose status code is in TRANSIENT_CODES are retried after delays from
    ``backoff`` (a ``Backoff``, 0.5 s doubling up to 30 s by default), each logged with
    ``description`` (such as "uploading the outputs"), the lease id and the bot id. Once
    ``give_up_after`` seconds on ``clock`` have passed since the first failure, the last
    error is logged and raised. Other errors are raised at once.
    """
    backoff = backoff or Backoff()
    first_failure = None
    attempt = 0
    while True:
        try:
            return await operation()
        except (BgridError, grpc.aio.AioRpcError) as error:
            if status_code_of(error) not in TRANSIENT_CODES:
                raise
            now = clock.seconds()
            if first_failure is None:
                first_failure = now
            remaining = first_failure + give_up_after - now
            attempt += 1
            if remaining <= 0:
                log.error(
                    "lease {lease_id} on bot {bot_id}: gave up {description} after {attempts} "
                    "attempts in {elapsed:.0f} s: {error}",
                    lease_id=lease_id, bot_id=bot_id, description=description, attempts=attempt,
                    elapsed=now - first_failure, error=describe_error(error),
                )
                raise
            delay = min(backoff.next_delay(), remaining)
            log.warn(
                "lease {lease_id} on bot {bot_id}: {description} failed: {error}; retry "
                "{attempt} in {delay:.1f} s, for up to {remaining:.0f} s more",
                lease_id=lease_id, bot_id=bot_id, description=description,
                error=describe_error(error),
                attempt=attempt, delay=delay, remaining=remaining,
            )
            await sleep(clock, delay)
