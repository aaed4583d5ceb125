"""CPU time and memory of a process and its descendants, read from Linux's /proc."""

import os

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _read_stat_fields(pid):
    """Return the fields of /proc/PID/stat after the command name, starting with the state.

    The command name is in brackets and may contain spaces, so the split starts after the
    last closing bracket. Raises OSError when the process is gone.
    """
    with open(f"/proc/{pid}/stat", "rb") as stream:
        text = stream.read().decode("ascii", "replace")
    return text[text.rindex(")") + 2:].split()


def descendants(root_pid):
    """Return the pids of ``root_pid`` and of all its living descendants, root first."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(_read_stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while the table was read
        children.setdefault(parent, []).append(int(entry))

    found = [root_pid]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def cpu_seconds(pids):
    """Return the CPU time in seconds (user plus system) that ``pids`` used so far.

    Each process counts its own time and that of its children that it has waited for, so
    the time of a child that ended does not disappear from the sum. Processes that are
    gone are skipped.
    """
    ticks = 0
    for pid in pids:
        try:
            fields = _read_stat_fields(pid)
        except OSError:
            continue
        # /proc/PID/stat fields 14 to 17: utime, stime, cutime, cstime (in clock ticks).
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS_PER_SECOND


def memory_kib(pid, field):
    """Return a ``/proc/PID/status`` field such as VmRSS or VmHWM in KiB, or 0 if absent."""
    prefix = field + ":"
    try:
        with open(f"/proc/{pid}/status", "rb") as stream:
            for line in stream:
                text = line.decode("ascii", "replace")
                if text.startswith(prefix):
                    return int(text.split()[1])
    except OSError:
        pass
    return 0


class ProcessTreeMonitor:
    """Tracks the CPU time and peak resident memory of a process tree.

    Call ``sample`` regularly: the peak is the largest total VmRSS of the tree seen at a
    sample, or the root's own VmHWM if that is larger, because the kernel records the
    root's peak between samples.
    """

    def __init__(self, root_pid):
        self.root_pid = root_pid
        self.peak_rss_kib = 0

    def pids(self):
        return descendants(self.root_pid)

    def sample(self):
        """Read the tree's memory now and raise the recorded peak if needed."""
        pids = self.pids()
        total = sum(memory_kib(pid, "VmRSS") for pid in pids)
        root_peak = memory_kib(self.root_pid, "VmHWM")
        self.peak_rss_kib = max(self.peak_rss_kib, total, root_peak)

    def cpu_seconds(self):
        return cpu_seconds(self.pids())
