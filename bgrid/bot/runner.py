"""Run an action's command under a supervisor process, with output to files and a timeout.

Each command runs under ``bgrid/bot/supervise.py``, a small process that leads the
command's process group and kills all of the action's processes, also those that left the
group, when the action ends or the bot dies (see that file for why and how). The
supervisor adds one Python start to each action: a median of 30 to 35 ms, and 18 ms at
best, more than starting the command directly, measured with CPython 3.11 on a 2-core VM
under a load average of 3.5.
"""

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from twisted.logger import Logger

from bgrid.errors import BgridError, InvalidArgumentError

log = Logger()

# The supervisor runs as a file, not as a module of bgrid, so that it imports nothing but
# the standard library: ``-I`` ignores PYTHON* variables and the user's site directory, and
# ``-S`` skips the site module.
SUPERVISOR_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervise.py")


@dataclass
class ProcessResult:
    """The exit status, timeout flag and duration of a finished command."""

    # The exit status; a command killed by signal N reports 128 + N, as POSIX shells do.
    exit_code: int
    timed_out: bool
    # Seconds from start to exit, measured on the clock that enforces the timeout.
    duration: float


# Seconds that a supervisor gets to kill the action's processes and exit after the request,
# before the bot kills its process group itself. The supervisor gives up after
# ``supervise.KILL_TIMEOUT`` (5 s) on its own, so this waits for a supervisor that hangs or
# was stopped again.
SUPERVISOR_STOP_TIMEOUT = 10.0


def kill_process_group(process_group_id):
    """Send SIGKILL to every process of a group; a group that no longer exists is ignored."""
    try:
        os.killpg(process_group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_supervisor(process, lifeline_write):
    """Ask a running supervisor, through its lifeline, to kill the action's processes and exit.

    SIGKILL to its group would kill the supervisor first, and the action's processes that
    left the group would survive. A signal would not do either, because the command can
    send the same one to its group. SIGCONT follows, because the command may have stopped
    its whole group, supervisor included, and a stopped process does not read its lifeline.
    """
    if process.returncode is not None:
        return
    try:
        os.write(lifeline_write, b"x")
        os.kill(process.pid, signal.SIGCONT)
    except (BrokenPipeError, ProcessLookupError):
        pass  # the supervisor has exited


def _encode_command(arguments, environment):
    """Return the command in the supervisor's input format; raise InvalidArgumentError.

    The format is the number of arguments, the arguments and ``NAME=VALUE`` entries, each
    followed by a NUL byte. exec(2) cannot pass a NUL byte, and an environment name cannot
    contain ``=``, so both are rejected here, as ``subprocess`` rejects them.
    """
    fields = [str(len(arguments)).encode()]
    for argument in arguments:
        if "\0" in argument:
            raise InvalidArgumentError(
                f"invalid Command: argument {argument!r} contains a NUL character"
            )
        fields.append(os.fsencode(argument))
    for name, value in environment.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise InvalidArgumentError(
                f"invalid Command: environment variable {name!r} has an empty name, or "
                f"'=' in its name, or a NUL character"
            )
        fields.append(os.fsencode(f"{name}={value}"))
    return b"".join(field + b"\0" for field in fields)


async def _send_command(process, command):
    """Write the command to the supervisor's standard input and close it.

    A supervisor that died before reading it is reported by the caller, through its
    missing ``started`` line.
    """
    try:
        process.stdin.write(command)
        await process.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        process.stdin.close()


async def _read_report(process, expected):
    """Read one line of the supervisor; return its words, or [] at end of file."""
    line = await process.stdout.readline()
    words = line.decode(errors="replace").strip().split(maxsplit=2)
    if words and words[0] not in expected:
        raise BgridError(f"the process supervisor sent an invalid line: {line!r}")
    return words


async def run_process(arguments, environment, working_directory, stdout_path, stderr_path,
                      timeout=None, clock=None, process_groups=None):
    """Run ``arguments`` and return a ``ProcessResult`` when it exits or times out.

    The command gets exactly ``environment`` (a ``{name: value}`` dict, nothing inherited),
    runs in ``working_directory`` in a process group of its own, reads /dev/null and writes
    stdout and stderr to the given files. ``arguments[0]`` is found as ``subprocess``
    finds it: a path with ``/`` is relative to ``working_directory``, a bare name is
    searched in the PATH of ``environment`` (``os.defpath`` without one).

    The group is led by a supervisor (``bgrid/bot/supervise.py``), which kills every
    process of the action with SIGKILL, also those that left the group, when the command
    exits, when the bot requests it through its lifeline pipe, and when the bot dies, even
    by SIGKILL.

    ``timeout`` is in seconds on ``clock`` (an ``IReactorTime``, the global reactor by
    default). When it passes, and when the coroutine is cancelled, the supervisor is asked
    to stop, and its group gets SIGKILL if it has not exited ``SUPERVISOR_STOP_TIMEOUT``
    seconds later. Cancelling waits for the supervisor to exit and re-raises
    CancelledError.

    ``process_groups``, a ``bgrid.bot.processes.ProcessGroupRecords`` or None, records
    the group while it runs, so that a later bot in the same work directory can kill what
    survived a failure of both the bot and the supervisor.

    Raises InvalidArgumentError when the command cannot be started, for example because the
    program does not exist, and BgridError when the supervisor fails.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    if not arguments:
        raise InvalidArgumentError("invalid Command: arguments are empty")
    command = _encode_command(arguments, environment)

    # Only the bot has the write end. Both ends are closed on exec in every other child,
    # and the read end is passed to the supervisor alone.
    lifeline_read, lifeline_write = os.pipe()
    try:
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            passed = (lifeline_read, stdout.fileno(), stderr.fileno())
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-S", SUPERVISOR_PATH, *(str(fd) for fd in passed),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    cwd=working_directory,
                    start_new_session=True,
                    pass_fds=passed,
                )
            except OSError as error:
                raise InvalidArgumentError(
                    f"failed to start {arguments[0]!r} in {working_directory!r}: "
                    f"{error.strerror}"
                ) from None
        os.close(lifeline_read)
        lifeline_read = None
        return await _supervise(process, lifeline_write, command, arguments,
                                working_directory, timeout, clock, process_groups)
    finally:
        if lifeline_read is not None:
            os.close(lifeline_read)
        # The supervisor has exited by now, or this makes it kill its group.
        os.close(lifeline_write)


async def _supervise(process, lifeline_write, command, arguments, working_directory, timeout,
                     clock, process_groups):
    """Run the command through a started supervisor; return its ``ProcessResult``."""
    if process_groups is not None:
        try:
            process_groups.add(process.pid)
        except OSError as error:
            log.error(
                "Failed to record process group {pid}, so the processes of its action may "
                "outlive a failure of the bot and of its supervisor: {error}",
                pid=process.pid, error=error,
            )

    timer = None
    stop_timer = None
    timed_out = False

    def on_stop_timeout():
        log.warn(
            "process supervisor {pid} did not exit within {stop_timeout} s of the request to "
            "stop. "
            "Killing its process group, so processes of the action that left the group "
            "may survive",
            pid=process.pid, stop_timeout=SUPERVISOR_STOP_TIMEOUT,
        )
        kill_process_group(process.pid)

    def stop():
        nonlocal stop_timer
        stop_supervisor(process, lifeline_write)
        if stop_timer is None:
            stop_timer = clock.callLater(SUPERVISOR_STOP_TIMEOUT, on_stop_timeout)

    def on_timeout():
        nonlocal timed_out
        timed_out = True
        log.info("command {program} timed out after {timeout} s, stopping its supervisor "
                 "{pid}", program=arguments[0], timeout=timeout, pid=process.pid)
        stop()

    try:
        await _send_command(process, command)
        start_report = await _read_report(process, ("started", "failed"))
        if not start_report or start_report[0] == "failed":
            return_code = await process.wait()
            if not start_report:
                raise BgridError(
                    f"the process supervisor exited with status {return_code} before it "
                    f"started {arguments[0]!r}; the bot's log shows why"
                )
            raise InvalidArgumentError(
                f"failed to start {arguments[0]!r} in {working_directory!r}: "
                f"{start_report[-1]}"
            )

        start_time = clock.seconds()
        if timeout:
            timer = clock.callLater(timeout, on_timeout)
        exit_report = await _read_report(process, ("exit",))
        # The command has ended, so a timeout while the supervisor cleans up is not its own.
        duration = clock.seconds() - start_time
        if exit_report and timer is not None and timer.active():
            timer.cancel()
        return_code = await process.wait()
    except asyncio.CancelledError:
        stop()
        await asyncio.shield(process.wait())
        raise
    finally:
        for pending in (timer, stop_timer):
            if pending is not None and pending.active():
                pending.cancel()
        # The supervisor killed its group before it exited, unless it died first.
        # NOTE: Linux does not reuse the id of the reaped supervisor while its group has
        # members. Once the group is empty, an unrelated new session leader could get the
        # same id before this line, which cyclic id allocation makes unlikely.
        kill_process_group(process.pid)
        if process_groups is not None:
            process_groups.remove(process.pid)

    if exit_report:
        # The supervisor kills itself after this line, so its own exit status is SIGKILL.
        return_code = int(exit_report[1])
    exit_code = 128 - return_code if return_code < 0 else return_code
    return ProcessResult(exit_code=exit_code, timed_out=timed_out, duration=duration)
