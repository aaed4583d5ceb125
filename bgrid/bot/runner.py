"""Run an action's command in its own process group, with output to files and a timeout."""

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from twisted.logger import Logger

from bgrid.errors import InvalidArgumentError

log = Logger()

# prctl(2) option that sets the signal a process gets when its parent thread exits.
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


@dataclass
class ProcessResult:
    """The exit status, timeout flag and duration of a finished command."""

    # The exit status; a command killed by signal N reports 128 + N, as POSIX shells do.
    exit_code: int
    timed_out: bool
    # Seconds from start to exit, measured on the clock that enforces the timeout.
    duration: float


def parent_death_signal_available():
    """Return whether ``run_process`` can make commands die with the bot: Linux only."""
    return _prctl is not None


def _kill_with_parent(parent_pid):
    """Return a ``preexec_fn`` that makes the child get SIGKILL when the bot dies.

    The signal follows the death of the thread that forked the child. asyncio forks on the
    event loop thread, which lives as long as the bot.
    """
    kill = int(signal.SIGKILL)

    def set_parent_death_signal():
        # NOTE: this runs in the child between fork and exec, where Python's subprocess
        # documentation warns of deadlocks when the parent has other threads. It only
        # calls a C function looked up in advance. A failure is ignored, because the
        # records of process groups still let the next bot kill the action.
        _prctl(_PR_SET_PDEATHSIG, kill, 0, 0, 0)
        if os.getppid() != parent_pid:
            # The bot died before prctl took effect.
            os.kill(os.getpid(), kill)

    return set_parent_death_signal


def kill_process_group(process_group_id):
    """Send SIGKILL to every process of a group; a group that no longer exists is ignored."""
    try:
        os.killpg(process_group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def run_process(arguments, environment, working_directory, stdout_path, stderr_path,
                      timeout=None, clock=None, process_groups=None, parent_death_signal=False):
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

    ``process_groups``, a ``bgrid.bot.processes.ProcessGroupRecords`` or None, records
    the command's group while it runs, so that the next bot can kill what the command left
    running. With ``parent_death_signal`` the command gets SIGKILL when the bot dies
    (Linux only, see ``parent_death_signal_available``). Set it only in a process where
    gRPC's fork handlers are disabled (``GRPC_ENABLE_FORK_SUPPORT=false`` before gRPC is
    imported): with them, a child forked while gRPC threads are busy can crash before exec,
    and the command then exits with 139 (SIGSEGV).

    Raises InvalidArgumentError when the command cannot be started, for example because the
    program does not exist.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    if not arguments:
        raise InvalidArgumentError("invalid Command: arguments are empty")
    if parent_death_signal and not parent_death_signal_available():
        raise ValueError("parent_death_signal=True needs prctl(2), which exists only on Linux")

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
                preexec_fn=_kill_with_parent(os.getpid()) if parent_death_signal else None,
            )
        except OSError as error:
            raise InvalidArgumentError(
                f"failed to start {arguments[0]!r} in {working_directory!r}: {error.strerror}"
            ) from None

    if process_groups is not None:
        try:
            process_groups.add(process.pid)
        except OSError as error:
            log.error(
                "Failed to record process group {pid}, so a bot killed while it runs leaves "
                "its processes running: {error}",
                pid=process.pid, error=error,
            )

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
        if process_groups is not None:
            process_groups.remove(process.pid)

    duration = clock.seconds() - started
    exit_code = 128 - return_code if return_code < 0 else return_code
    return ProcessResult(exit_code=exit_code, timed_out=timed_out, duration=duration)
