"""Supervisor of one action's command: no process of the action outlives the action.

The bot (``bgrid.bot.runner``) starts this file for each action as
``python -I -S supervise.py LIFELINE_FD STDOUT_FD STDERR_FD`` in a new session, so the
supervisor leads a process group of its own, and the command it starts joins that group.
It imports nothing from bgrid and no module that it does not need, so that it starts fast.

The supervisor makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``, Linux 3.4 and
later). Linux then reparents every orphaned process of the action to the supervisor
instead of to init, also one that left the group with ``setsid`` or ``setpgid``, as
``set -m`` in a shell does for background jobs. So the action's processes are exactly
the supervisor's descendants, and the supervisor reaps each one that exits.

The bot has the only write end of the lifeline pipe, whose read end is LIFELINE_FD. The
action ends, and the supervisor kills all of its processes, when:

* the lifeline reaches end of file, because the bot died or closed it;
* the bot writes a byte to the lifeline, which it does when the action times out or is
  cancelled. The supervisor also makes Linux send it SIGUSR1 when its parent thread
  dies (``PR_SET_PDEATHSIG``), in case the lifeline is held open by mistake;
* the command exits. This kills what the command left running. The supervisor lives
  until that moment, so a bot that dies at any time before still makes it kill them.

To kill them, the supervisor sends SIGKILL to each descendant that it finds in /proc by
following the parent pids, and reaps the children that exit. It repeats this until it has
no child left, because a process may fork before its SIGKILL arrives, and only the next
round finds the new child. Last, it kills its whole process group with SIGKILL, itself
included.

Protocol. Standard input carries the command, read to end of file: the number of
arguments, the arguments, then the environment as ``NAME=VALUE`` entries, each field
followed by a NUL byte. The command gets exactly that environment, the supervisor's
working directory, /dev/null as standard input, and STDOUT_FD and STDERR_FD as standard
output and error. A bare program name is searched in the PATH of that environment, and a
name with a slash is relative to the working directory. The supervisor writes one line
per event to its standard output:

* ``started PID`` once the command runs;
* ``failed ERRNO MESSAGE`` when it could not be started (the supervisor then exits with
  status 127 and kills nothing);
* ``exit CODE`` when it exited, where CODE is its exit status, or minus the number of the
  signal that killed it.

Messages about the supervisor's own failures go to its standard error, the bot's log.

NOTE: the command runs as the same user as the supervisor, so it can kill the supervisor
with SIGKILL, or stop it with SIGSTOP, before the action ends. Then its processes that
left the process group are reparented to init once their parents die, and outlive the
action, because the bot can kill only the group. The same happens where
``PR_SET_CHILD_SUBREAPER`` or /proc is missing, which the supervisor logs. Only a cgroup,
a PID namespace or another user id for the command would hold such processes.
"""

import errno
import os
import select
import sys
import time

# The C module behind ``signal``: the same functions and constants, as plain ints. The
# ``signal`` module wraps them in enums, and importing ``enum`` would add about 9 ms to
# each start (CPython 3.11, ``python -X importtime``).
import _signal as signal

# prctl(2) options: the signal a process gets when its parent thread exits, and the
# child subreaper flag.
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Exit status when the command could not be started, as shells use for "not found".
START_FAILED_STATUS = 127

# Seconds that the supervisor keeps killing and reaping the action's processes before it
# gives up. A process dies within milliseconds of SIGKILL unless it waits in the kernel,
# for example on a hung NFS mount, or belongs to another user.
KILL_TIMEOUT = 5.0

# Seconds between rounds of killing when no SIGCHLD arrives first.
KILL_ROUND_INTERVAL = 0.05

# The read end of the pipe that Python writes to on each signal (``signal.set_wakeup_fd``),
# set by ``main`` before any child exists.
wakeup_fd = None


def log_error(message):
    """Write one line about a failure of the supervisor to its standard error."""
    print(f"bgrid supervisor {os.getpid()}: {message}", file=sys.stderr, flush=True)


def call_prctl(option, value):
    """Call prctl(2) with one argument; return None, or the error message when it fails.

    On systems other than Linux, returns a message without calling anything.
    """
    if not sys.platform.startswith("linux"):
        return f"prctl(2) exists only on Linux, not on {sys.platform}"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def set_parent_death_signal(signal_number):
    """Ask Linux to send ``signal_number`` when the parent thread exits; elsewhere do nothing.

    This is safe here, unlike between fork and exec in the bot, because the supervisor has
    a single thread.
    """
    if not sys.platform.startswith("linux"):
        return
    error = call_prctl(PR_SET_PDEATHSIG, signal_number)
    if error is not None:
        # The lifeline still works, so a failure here is reported and not fatal.
        log_error(f"prctl(PR_SET_PDEATHSIG) failed: {error}")


def become_subreaper():
    """Make orphaned descendants children of the supervisor; log when the kernel cannot."""
    error = call_prctl(PR_SET_CHILD_SUBREAPER, 1)
    if error is not None:
        log_error(
            f"prctl(PR_SET_CHILD_SUBREAPER) failed: {error}, so processes of the action "
            f"that leave its process group and lose their parent will outlive the action"
        )


def read_process_table():
    """Return ``{pid: (parent pid, state)}`` of every process in /proc.

    Raises OSError when /proc cannot be listed.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as source:
                data = source.read()
        except OSError:
            continue  # the process exited after the listing
        # The command name, field 2, is in parentheses and may contain spaces, so the
        # fields are counted from the last ")": there field 3 (state) has index 0.
        fields = data.rpartition(b")")[2].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def find_descendants(ancestor):
    """Return the pids of the processes whose chain of parents leads to ``ancestor``.

    Zombies are left out: they have exited, and their parents reap them. Raises OSError
    when /proc cannot be listed.
    """
    table = read_process_table()
    is_descendant = {ancestor: True}
    descendants = []
    for pid in table:
        chain = []
        current = pid
        while current not in is_descendant:
            entry = table.get(current)
            if entry is None or current in chain:
                # The chain ends outside the table: at pid 0 above init, or at a parent
                # that exited during the listing, whose orphans are found on the next
                # round. A loop is possible only when a pid was reused during the listing.
                is_descendant[current] = False
                break
            chain.append(current)
            current = entry[0]
        found = is_descendant[current]
        for member in chain:
            is_descendant[member] = found
        if found and pid != ancestor and table[pid][1] != b"Z":
            descendants.append(pid)
    return descendants


def reap_children():
    """Reap every child that has exited, without blocking.

    Returns ``({pid: wait status}, remaining)``, where ``remaining`` is False when the
    supervisor has no child left, running or exited.
    """
    reaped = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped, False
        if pid == 0:
            return reaped, True
        reaped[pid] = status


def wait_for_signal(timeout):
    """Wait until a signal arrives (SIGCHLD, in practice) or ``timeout`` seconds pass."""
    readable, _, _ = select.select([wakeup_fd], [], [], timeout)
    if readable:
        os.read(wakeup_fd, 4096)


def kill_descendants():
    """Kill every descendant of the supervisor with SIGKILL and reap those that exit.

    Returns once the supervisor has no child left. When it is a child subreaper, it then
    has no descendant either. Gives up with a log line when KILL_TIMEOUT passes, when
    /proc cannot be read, or when every process left belongs to another user.
    """
    supervisor_pid = os.getpid()
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        _, remaining = reap_children()
        if not remaining:
            return
        try:
            descendants = find_descendants(supervisor_pid)
        except OSError as error:
            log_error(f"failed to list processes in /proc: {error}, so only the process "
                      f"group is killed, and processes that left it will outlive the action")
            return
        killed = 0
        denied = []
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
            except PermissionError:
                denied.append(pid)
        if denied and not killed:
            listed = " ".join(str(pid) for pid in denied)
            log_error(f"failed to kill the processes of the action that are left, pids "
                      f"{listed}: permission denied")
            return
        if time.monotonic() >= deadline:
            listed = " ".join(str(pid) for pid in descendants[:20])
            log_error(f"{len(descendants)} processes of the action still run "
                      f"{KILL_TIMEOUT:g} s after SIGKILL, giving up on them: pids {listed}")
            return
        wait_for_signal(KILL_ROUND_INTERVAL)


def end_action():
    """Kill every process of the action, then the supervisor's process group with itself.

    Does not return: SIGKILL ends the supervisor.
    """
    # A parent death signal that arrives now would only start this again.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    kill_descendants()
    # This also kills members of the group that are no descendants any more, which exist
    # only when the supervisor could not become a subreaper.
    os.killpg(0, signal.SIGKILL)


def on_terminate(signal_number, frame):
    end_action()


def read_command(stream_fd):
    """Read the command from ``stream_fd`` to end of file; return (arguments, environment).

    Raises ValueError when the data is truncated or malformed.
    """
    chunks = []
    while True:
        chunk = os.read(stream_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    fields = b"".join(chunks).split(b"\0")
    if len(fields) < 2 or fields[-1] != b"":
        raise ValueError("the command on standard input is truncated")
    fields.pop()
    count = int(fields[0])
    arguments = fields[1:1 + count]
    if count < 1 or len(arguments) != count:
        raise ValueError(f"expected {count} arguments, got {len(arguments)}")
    environment = {}
    for entry in fields[1 + count:]:
        name, separator, value = entry.partition(b"=")
        if not separator:
            raise ValueError(f"environment entry {entry!r} has no '='")
        environment[name] = value
    return arguments, environment


def program_candidates(program, environment):
    """Return the paths to try for ``program``, in the order that ``subprocess`` tries them."""
    if b"/" in program:
        return [program]
    path = environment.get(b"PATH", os.defpath.encode())
    return [os.path.join(directory or b".", program) for directory in path.split(b":")]


def start_command(arguments, environment, stdout_fd, stderr_fd):
    """Start the command in the supervisor's process group; return its pid.

    Raises OSError with the first error that is not "no such file" when no candidate path
    starts, as ``subprocess`` does.
    """
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
        (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
    ]
    # Python ignores SIGPIPE and SIGXFSZ at start, and ignored signals stay ignored across
    # exec; the command gets their default actions, as with subprocess.
    default_signals = [signal.SIGPIPE, signal.SIGXFSZ]
    first_error = None
    last_error = None
    for path in program_candidates(arguments[0], environment):
        try:
            return os.posix_spawn(
                path, arguments, environment, file_actions=file_actions,
                setsigdef=default_signals,
            )
        except OSError as error:
            last_error = error
            if first_error is None and error.errno not in (errno.ENOENT, errno.ENOTDIR):
                first_error = error
    raise first_error or last_error


def report(line):
    """Write one protocol line to standard output; a closed pipe (the bot died) is ignored."""
    try:
        os.write(1, line.encode() + b"\n")
    except BrokenPipeError:
        pass


def wait_for_command(pid, lifeline_fd):
    """Wait until the command exits and return its exit code, as ``Popen.returncode`` has it.

    Reaps the orphans reparented to the supervisor that exit meanwhile. Ends the action
    when the bot writes to the lifeline or the lifeline reaches end of file.
    """
    while True:
        readable, _, _ = select.select([lifeline_fd, wakeup_fd], [], [])
        if lifeline_fd in readable:
            # A byte is the bot's request to stop, and end of file its death.
            os.read(lifeline_fd, 4096)
            end_action()
        if wakeup_fd in readable:
            # Drained only: SIGCHLD is the signal that matters here.
            os.read(wakeup_fd, 4096)
            reaped, _ = reap_children()
            if pid in reaped:
                return os.waitstatus_to_exitcode(reaped[pid])


def main(argv):
    global wakeup_fd
    lifeline_fd, stdout_fd, stderr_fd = (int(value) for value in argv[1:4])

    # Each signal wakes the select calls through this pipe, so a command that exits at
    # once is not missed. It is set up before any child exists.
    wakeup_fd, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    # The pipe is drained on every wake-up, so a full pipe only means a wake-up is pending.
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signal_number, frame: None)

    # The command shares the supervisor's process group, so its SIGTERM to the group, as
    # in the shell idiom ``trap 'kill 0' EXIT``, reaches the supervisor too. The bot stops
    # the supervisor through the lifeline instead, so SIGTERM is ignored here. A handler,
    # unlike SIG_IGN, is not inherited by the command.
    signal.signal(signal.SIGTERM, lambda signal_number, frame: None)
    signal.signal(signal.SIGUSR1, on_terminate)
    set_parent_death_signal(signal.SIGUSR1)
    become_subreaper()
    # The command must not inherit these: a copy of the lifeline in the command would
    # keep it open after the bot died.
    for fd in (lifeline_fd, stdout_fd, stderr_fd):
        os.set_inheritable(fd, False)

    arguments, environment = read_command(0)

    try:
        pid = start_command(arguments, environment, stdout_fd, stderr_fd)
    except OSError as error:
        report(f"failed {error.errno} {error.strerror}")
        return START_FAILED_STATUS
    report(f"started {pid}")

    exit_code = wait_for_command(pid, lifeline_fd)
    report(f"exit {exit_code}")
    end_action()
    return 0  # not reached: SIGKILL ended the supervisor


if __name__ == "__main__":
    sys.exit(main(sys.argv))
