"""Action timeouts under the server's maximum, and the timers that end leases that overrun.

An action runs for at most the server's maximum action timeout: an Action with a longer
timeout is rejected, as REAPI requires, and one without a timeout is leased with the
maximum. A lease that stays ACTIVE for
its timeout plus a grace period, which covers fetching inputs and uploading outputs, is
taken back from its bot, and its job fails with DEADLINE_EXCEEDED.
"""

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.errors import InvalidArgumentError


def check_action_timeout(action, maximum):
    """Raise InvalidArgumentError when ``action.timeout`` is negative or above ``maximum``."""
    if not action.HasField("timeout"):
        return
    seconds = action.timeout.ToNanoseconds() / 1e9
    if seconds < 0:
        raise InvalidArgumentError(
            f"invalid Action.timeout {seconds:g} s: it must not be negative"
        )
    if seconds > maximum:
        raise InvalidArgumentError(
            f"invalid Action.timeout {seconds:g} s: this server runs actions for at most "
            f"{maximum:g} s (--max-action-timeout)"
        )


def action_timeout(action, maximum):
    """Return the seconds that ``action`` may run for: its timeout, at most ``maximum``.

    A missing or zero timeout means ``maximum``.
    """
    if action.HasField("timeout"):
        seconds = action.timeout.ToNanoseconds() / 1e9
        if seconds > 0:
            return min(seconds, maximum)
    return maximum


def with_timeout(action, seconds):
    """Return a copy of an ``re_pb2.Action`` whose ``timeout`` is ``seconds``."""
    copy = re_pb2.Action()
    copy.CopyFrom(action)
    copy.timeout.FromNanoseconds(round(seconds * 1e9))
    return copy


class LeaseTimers:
    """One ``callLater`` per ACTIVE lease that calls ``expire(lease_id)`` when it is due.

    ``clock`` is an ``IReactorTime``.
    """

    def __init__(self, clock, expire):
        self._clock = clock
        self._expire = expire
        self._timers = {}

    def __len__(self):
        return len(self._timers)

    def start(self, lease_id, delay):
        """Call ``expire(lease_id)`` after ``delay`` seconds, replacing an earlier timer."""
        self.stop(lease_id)
        self._timers[lease_id] = self._clock.callLater(max(delay, 0), self._fire, lease_id)

    def stop(self, lease_id):
        """Cancel the lease's timer, if it has one."""
        timer = self._timers.pop(lease_id, None)
        if timer is not None and timer.active():
            timer.cancel()

    def stop_all(self):
        for lease_id in list(self._timers):
            self.stop(lease_id)

    def _fire(self, lease_id):
        del self._timers[lease_id]
        self._expire(lease_id)
