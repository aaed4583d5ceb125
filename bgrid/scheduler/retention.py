"""Expiry of done operations after a fixed retention period, with a single timer."""

import collections

# Clock times are floats, so an entry counts as due this close to its expiry time.
_TOLERANCE_SECONDS = 1e-6


class RetentionQueue:
    """Names that expire a fixed ``period`` after they were added, oldest first.

    Because the period is the same for every name, names expire in the order they were
    added, so a FIFO and one ``callLater`` for its head replace a timer per name.
    A name added with an earlier time than the name before it (after the wall clock was
    set back) expires no earlier than that name. ``expire(name)`` is called for each name
    that comes due, including names that the caller removed early, which it must ignore.
    """

    def __init__(self, clock, period, expire):
        self._clock = clock
        self._period = period
        self._expire = expire
        self._entries = collections.deque()
        self._timer = None

    def __len__(self):
        return len(self._entries)

    def add(self, name, added_time):
        """Schedule ``name`` to expire ``period`` after ``added_time``, a clock time."""
        self._entries.append((added_time + self._period, name))
        if self._timer is None:
            self._schedule()

    def stop(self):
        """Cancel the timer but keep the entries."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self):
        delay = max(self._entries[0][0] - self._clock.seconds(), 0)
        self._timer = self._clock.callLater(delay, self._run)

    def _run(self):
        self._timer = None
        now = self._clock.seconds()
        while self._entries and self._entries[0][0] <= now + _TOLERANCE_SECONDS:
            _, name = self._entries.popleft()
            self._expire(name)
        if self._entries and self._timer is None:
            self._schedule()
