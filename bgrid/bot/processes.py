"""Records of the process groups of running actions, so that a restarted bot can kill the
groups that a bot killed with SIGKILL left behind.

Each running action has one file in the records directory, named after its process group
id, which is the process id of the command that the bot started. The file holds the boot id
of the machine and the start time of that process, in clock ticks since boot as
``/proc/PID/stat`` gives it. Together they tell the group apart from a later one that
reuses the id. Linux only: elsewhere nothing is recorded.
"""

import os
import signal
import sys

from twisted.logger import Logger

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

log = Logger()


def read_boot_id():
    """Return the boot id of the running kernel, or "" when it cannot be read."""
    try:
        with open(BOOT_ID_PATH) as source:
            return source.read().strip()
    except OSError:
        return ""


def _read_stat(pid):
    """Return ``(state, process_group_id, start_time)`` of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as source:
            data = source.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, field 2, is in parentheses and may contain spaces, so the fields
    # are counted from the last ")": there field 3 (state) has index 0.
    fields = data.rpartition(b")")[2].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def read_process_stat(pid):
    """Return ``(process_group_id, start_time)`` of a process, or None when it is gone.

    ``start_time`` is in clock ticks since boot. A zombie still has both.
    """
    stat = _read_stat(pid)
    return None if stat is None else stat[1:]


def find_group_members(process_group_id):
    """Return ``{pid: start_time}`` of the live processes in a process group.

    Zombies are left out: they have exited, and no signal reaches them.
    """
    members = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None and stat[0] != "Z" and stat[1] == process_group_id:
            members[int(entry)] = stat[2]
    return members


def is_recorded_group(process_group_id, start_time, members):
    """Return whether a live group with ``members`` is the recorded one.

    When the leader lives, its start time must match. A group whose leader is gone keeps
    its id, because Linux reuses no process id that a live group has, so it is the
    recorded group if its members started no earlier than the recorded leader.
    """
    # NOTE: a recorded group that died entirely, whose id was then reused by a new process
    # that made its own group and exited while leaving children, also passes this check.
    # That needs the process ids to wrap around between the two bots.
    if not members:
        return False
    if process_group_id in members:
        return members[process_group_id] == start_time
    return all(member_start >= start_time for member_start in members.values())


class ProcessGroupRecords:
    """The records directory of one work directory.

    ``add`` and ``remove`` are called around each action's run, ``kill_leftovers`` once
    at start, before the bot runs anything.
    """

    def __init__(self, directory):
        self.directory = directory
        self._boot_id = read_boot_id()
        self._enabled = sys.platform.startswith("linux")

    def add(self, process_group_id):
        """Record the group of a command just started, whose leader has that process id.

        Raises OSError when the record cannot be written.
        """
        if not self._enabled:
            return
        stat = read_process_stat(process_group_id)
        if stat is None:
            # The command exited and was reaped already, and the runner kills its group.
            return
        path = self._path(process_group_id)
        temporary = path + ".new"
        with open(temporary, "w") as record:
            record.write(f"{self._boot_id} {stat[1]}\n")
        os.replace(temporary, path)

    def remove(self, process_group_id):
        """Delete the record of a group that was killed after its command exited."""
        try:
            os.unlink(self._path(process_group_id))
        except FileNotFoundError:
            pass

    def kill_leftovers(self):
        """Kill with SIGKILL every recorded group that still runs, and delete all records.

        Returns the ids of the groups that were sent SIGKILL. Records from an earlier boot
        or that cannot be read are deleted without killing anything.
        """
        killed = []
        if not self._enabled:
            return killed
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            process_group_id, start_time = self._read(name, path)
            if process_group_id is not None:
                members = find_group_members(process_group_id)
                if is_recorded_group(process_group_id, start_time, members):
                    if self._kill(process_group_id, members):
                        killed.append(process_group_id)
            os.unlink(path)
        return killed

    def _path(self, process_group_id):
        return os.path.join(self.directory, str(process_group_id))

    def _read(self, name, path):
        """Return ``(process_group_id, start_time)`` of a record of this boot.

        Returns ``(None, None)`` for a record of an earlier boot or one that is unreadable.
        """
        try:
            with open(path) as record:
                boot_id, start_time = record.read().split()
            # A ".new" file is a record that its bot was writing when it died.
            process_group_id = int(name.removesuffix(".new"))
            start_time = int(start_time)
        except (OSError, ValueError) as error:
            log.warn(
                "Deleted the unreadable process group record {path}: {error}",
                path=path, error=error,
            )
            return None, None
        if boot_id != self._boot_id:
            return None, None
        return process_group_id, start_time

    def _kill(self, process_group_id, members):
        try:
            os.killpg(process_group_id, signal.SIGKILL)
        except ProcessLookupError:
            return False
        except PermissionError as error:
            log.error(
                "Failed to kill process group {process_group_id}, left running by an "
                "earlier bot in this work directory: {error}",
                process_group_id=process_group_id, error=error,
            )
            return False
        log.warn(
            "Killed process group {process_group_id} ({count} processes: {pids}), which an "
            "earlier bot in this work directory left running",
            process_group_id=process_group_id, count=len(members), pids=sorted(members),
        )
        return True
