"""Supervisor of one action's command: no process of the action outlives the bot.

The bot (``bgrid.bot.runner``) starts this file for each action as
``python -I -S supervise.py LIFELINE_FD STDOUT_FD STDERR_FD`` in a new session, so the
supervisor leads a process group of its own, and the command it starts joins that group.
It imports nothing from bgrid and no module that it does not need, so that it starts fast.

The bot has the only write end of the lifeline pipe, whose read end is LIFELINE_FD, and
never writes to it. The supervisor kills its whole process group with SIGKILL, itself
included, when:

* the lifeline reaches end of file, because the bot died or closed it;
* it gets SIGTERM. It also asks Linux for SIGTERM when its parent thread dies
  (``PR_SET_PDEATHSIG``), in case the lifeline is held open by mistake;
* the command exits. This kills what the command left running in the group. The
  supervisor lives until that moment, so a bot that dies at any time before still makes
  it kill the group.

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

NOTE: a process that leaves the group (with setsid or setpgid, as daemons do) is out of
reach of all of this; only a cgroup would hold it.
"""

import errno
import os
import select
import sys

# The C module behind ``signal``: the same functions and constants, as plain ints. The
# ``signal`` module wraps them in enums, and importing ``enum`` would add about 9 ms to
# each start (CPython 3.11, ``python -X importtime``).
import _signal as signal

# prctl(2) option that sets the signal a process gets when its parent thread exits.
PR_SET_PDEATHSIG = 1

# Exit status when the command could not be started, as shells use for "not found".
START_FAILED_STATUS = 127


def kill_own_group():
    """Send SIGKILL to every process of the supervisor's process group, itself included."""
    os.killpg(0, signal.SIGKILL)


def on_terminate(signal_number, frame):
    kill_own_group()


def set_parent_death_signal(signal_number):
    """Ask Linux to send ``signal_number`` when the parent thread exits; elsewhere do nothing.

    This is safe here, unlike between fork and exec in the bot, because the supervisor has
    a single thread.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0) != 0:
        # The lifeline still works, so a failure here is reported and not fatal.
        error = ctypes.get_errno()
        print(
            f"bgrid supervisor {os.getpid()}: prctl(PR_SET_PDEATHSIG) failed: "
            f"{os.strerror(error)}",
            file=sys.stderr,
        )


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


def wait_for_command(pid, lifeline_fd, wakeup_fd):
    """Wait until the command exits and return its exit code, as ``Popen.returncode`` has it.

    Kills the process group when the lifeline reaches end of file.
    """
    while True:
        readable, _, _ = select.select([lifeline_fd, wakeup_fd], [], [])
        if lifeline_fd in readable and not os.read(lifeline_fd, 4096):
            kill_own_group()
        if wakeup_fd in readable:
            # Drained only; SIGCHLD is the only signal that writes here.
            os.read(wakeup_fd, 4096)
            waited, status = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return os.waitstatus_to_exitcode(status)


def main(argv):
    signal.signal(signal.SIGTERM, on_terminate)
    set_parent_death_signal(signal.SIGTERM)
    lifeline_fd, stdout_fd, stderr_fd = (int(value) for value in argv[1:4])
    # The command must not inherit these: a copy of the lifeline in the command would
    # keep it open after the bot died.
    for fd in (lifeline_fd, stdout_fd, stderr_fd):
        os.set_inheritable(fd, False)

    arguments, environment = read_command(0)

    # SIGCHLD wakes the select below through this pipe, so a command that exits at once
    # is not missed. Both are set up before the command starts.
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signal_number, frame: None)

    try:
        pid = start_command(arguments, environment, stdout_fd, stderr_fd)
    except OSError as error:
        report(f"failed {error.errno} {error.strerror}")
        return START_FAILED_STATUS
    report(f"started {pid}")

    exit_code = wait_for_command(pid, lifeline_fd, wakeup_read)
    report(f"exit {exit_code}")
    kill_own_group()
    return 0  # not reached: SIGKILL ended the supervisor


if __name__ == "__main__":
    sys.exit(main(sys.argv))
