"""Run an action's command in its own process group, with output to files and a timeout."""

import asyncio
import os
import signal
import subprocess
from dataclasses import dataclass

from twisted.logger import Logger

from bgrid.errors import InvalidArgumentError

log = Logger()


@dataclass
class ProcessResult:
    """The exit status, timeout flag and duration of a finished command."""

    # The exit status; a command killed by signal N reports 128 + N, as POSIX shells do.
    exit_code: int
    timed_out: bool
    # Seconds from start to exit, measured on the clock that enforces the timeout.
    duration: float


def kill_process_group(process_group_id):
    """Send SIGKILL to every process of a group; a group that no longer exists is ignored."""
    try:
        os.killpg(process_group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run_process(arguments, environment, working_directory, stdout_path, stderr_path,
                      timeout=None, clock=None):
    """Run ``arguments`` and return a ``ProcessResult`` when it exits or times out.

    The command gets exactly ``environment`` (a ``{name: value}`` dict, nothing inherited),
    runs in ``working_directory`` in a new session, so in a process group of its own, reads
    /dev/null and writes stdout and stderr to the given files. ``arguments[0]`` is found as
    ``subprocess`` finds it: a path with ``/`` is relative to ``working_directory``, a bare
    name is searched in the PATH of ``environment`` (``os.defpath`` without one).

    ``timeout`` is in seconds on ``clock`` (an ``IReactorTime``, the global reactor by
    default); when it passes, the whole process group gets SIGKILL. When the command exits,
    the processes it left in its group are killed as well. Cancelling the coroutine kills the
    group, waits for the command to exit, and re-raises CancelledError.

    Raises InvalidArgumentError when the command cannot be started, for example because the
    program does not exist.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    if not arguments:
        raise InvalidArgumentError("invalid Command: arguments are empty")

    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        try:
            process = await asyncio.create_subprocess_exec(
                *arguments,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=working_directory,
                env=environment,
                start_new_session=True,
            )
        except OSError as error:
            raise InvalidArgumentError(
                f"failed to start {arguments[0]!r} in {working_directory!r}: {error.strerror}"
            ) from None

    started = clock.seconds()
    timed_out = False

    def on_timeout():
        nonlocal timed_out
        timed_out = True
        log.info("command {program} timed out after {timeout} s; killing process group {pid}",
                 program=arguments[0], timeout=timeout, pid=process.pid)
        kill_process_group(process.pid)

    timer = clock.callLater(timeout, on_timeout) if timeout else None
    try:
        return_code = await process.wait()
    except asyncio.CancelledError:
        kill_process_group(process.pid)
        await asyncio.shield(process.wait())
        raise
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        # NOTE: the leader is reaped by now. Linux does not reuse its id while the group
        # has members. Once the group is empty, an unrelated new session leader could get
        # the same id before this line, which cyclic id allocation makes unlikely.
        kill_process_group(process.pid)

    duration = clock.seconds() - started
    exit_code = 128 - return_code if return_code < 0 else return_code
    return ProcessResult(exit_code=exit_code, timed_out=timed_out, duration=duration)
