"""Tests that no process of an action outlives it, also one that leaves the action's process
group or session, with real processes: after a normal exit, a timeout, a cancellation and
the bot's death.

Each test starts sleeps with an argument that no other process has, such as
``sleep 600.123450001``, and finds them, and kills them at cleanup, by that argument.
"""

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap

from twisted.internet import task
from twisted.trial import unittest

from bgrid.bot.processes import read_process_stat
from bgrid.bot.runner import run_process
from bgrid.bridge import as_deferred
from tests.bot.test_runner import SHELL_PATH, process_is_gone
from tests.bot.test_supervise import KILL_TIMEOUT, SupervisorTestCase
from tests.client.fakes import wait_until
from tests.util import async_test, make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# bash, because dash turns ``set -m`` off without a terminal.
BASH = "/bin/bash"

# Seconds to wait for a command's sleep to start, or for an action to end. Both take
# milliseconds; a test waits this long only when it fails.
START_TIMEOUT = 30.0

# Scripts whose sleep leaves the action's process group. Each then waits for a line on the
# FIFO ``{fifo}``, so that the test decides when the command exits.
ESCAPE_SCRIPTS = {
    # Job control puts each background job in a process group of its own.
    "set -m": "set -m; sleep {argument} & echo started; read -r line < {fifo}",
    "setsid": "setsid sleep {argument} & read -r line < {fifo}",
    # The sleep's parent leads a new session and exits at once, so the sleep is orphaned
    # outside the group.
    "double fork": "( setsid sh -c 'sleep {argument} &' & ); read -r line < {fifo}",
}

# Starts sleeps in new sessions as fast as bash can, so that the supervisor kills
# processes that fork meanwhile. The count bounds the damage when the kill fails.
FORKING_SCRIPT = (
    "i=0; while [ $i -lt 2000 ]; do setsid sleep {argument} & i=$((i+1)); done; "
    "read -r line < {fifo}"
)

_argument_numbers = itertools.count(1)

if not sys.platform.startswith("linux"):
    skip = "the tests find processes in /proc, which exists only on Linux"


def unique_sleep_argument():
    """Return a number of seconds for sleep that no process outside this test uses."""
    return f"600.{os.getpid()}{next(_argument_numbers):04d}"


def read_arguments(pid):
    """Return the command line of a process as a list of bytes; [] when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as source:
            return source.read().split(b"\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


def find_processes_with(text):
    """Return the pids of the live processes with ``text`` in an argument.

    Zombies have no command line, so they are left out.
    """
    encoded = text.encode()
    return [
        int(entry) for entry in os.listdir("/proc")
        if entry.isdigit() and any(encoded in argument for argument in read_arguments(entry))
    ]


def find_sleeps(argument):
    """Return the pids of the processes that run ``sleep ARGUMENT``."""
    return [pid for pid in find_processes_with(argument)
            if read_arguments(pid) == [b"sleep", argument.encode()]]


def kill_processes_with(text):
    """Send SIGKILL, by pid, to every process with ``text`` in an argument."""
    for pid in find_processes_with(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def find_supervisor(pid):
    """Return the pid of the supervisor among the ancestors of ``pid``, or None."""
    current = pid
    while current > 1:
        if any(argument.endswith(b"supervise.py") for argument in read_arguments(current)):
            return current
        with open(f"/proc/{current}/stat", "rb") as source:
            current = int(source.read().rpartition(b")")[2].split()[1])
    return None


def read_state(pid):
    with open(f"/proc/{pid}/stat", "rb") as source:
        return source.read().rpartition(b")")[2].split()[0].decode()


class ContainmentTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = make_temp_dir(self)
        self.stdout = os.path.join(self.directory, "stdout")
        self.stderr = os.path.join(self.directory, "stderr")
        self.fifo_numbers = itertools.count(1)

    def prepare(self, template):
        """Fill in ``template`` with a new sleep argument and FIFO.

        Returns the script, the sleep argument and a function that makes the command
        exit. The processes with the argument are killed at cleanup.
        """
        argument = unique_sleep_argument()
        self.addCleanup(kill_processes_with, argument)
        fifo = os.path.join(self.directory, f"fifo-{next(self.fifo_numbers)}")
        os.mkfifo(fifo)
        # Opened for reading and writing, so that neither this open nor the shell's blocks,
        # and a line written before the shell reads stays in the FIFO.
        fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.addCleanup(os.close, fifo_fd)

        def release():
            os.write(fifo_fd, b"go\n")

        return template.format(argument=argument, fifo=fifo), argument, release

    def run_bash(self, script, **kwargs):
        """Start ``bash -c script`` with run_process; return its task.

        A task still running at cleanup is cancelled, which makes the supervisor kill the
        command, and awaited.
        """
        running = asyncio.ensure_future(run_process(
            [BASH, "-c", script], SHELL_PATH, self.directory, self.stdout, self.stderr,
            **kwargs,
        ))

        async def cancel():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

        self.addCleanup(lambda: as_deferred(cancel()))
        return running

    async def wait_for_escaped_sleep(self, argument):
        """Wait until the sleep runs outside its supervisor's process group; return its pid."""
        await wait_until(lambda: len(find_sleeps(argument)) == 1, timeout=START_TIMEOUT)
        pid = find_sleeps(argument)[0]
        supervisor = find_supervisor(pid)
        self.assertIsNotNone(supervisor, "the sleep does not descend from a supervisor")
        process_group_id, _ = read_process_stat(pid)
        self.assertNotEqual(process_group_id, supervisor, "the sleep did not leave the group")
        return pid

    def assert_none_left(self, argument, case):
        self.assertEqual(find_processes_with(argument), [], case)


class ActionEndTests(ContainmentTestCase):
    @async_test
    async def test_exit_kills_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, release = self.prepare(template)
            running = self.run_bash(script)
            sleep = await self.wait_for_escaped_sleep(argument)

            release()
            result = await asyncio.wait_for(running, START_TIMEOUT)

            self.assertEqual(result.exit_code, 0, case)
            self.assertFalse(result.timed_out, case)
            # The supervisor reaps every process of the action before it exits.
            self.assertTrue(process_is_gone(sleep), case)
            self.assert_none_left(argument, case)

    @async_test
    async def test_timeout_kills_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, _ = self.prepare(template)
            clock = task.Clock()
            running = self.run_bash(script, timeout=5, clock=clock)
            sleep = await self.wait_for_escaped_sleep(argument)
            await wait_until(lambda: clock.getDelayedCalls(), timeout=START_TIMEOUT)

            clock.advance(5)
            result = await asyncio.wait_for(running, START_TIMEOUT)

            self.assertTrue(result.timed_out, case)
            self.assertEqual(result.exit_code, 128 + signal.SIGKILL, case)
            self.assertTrue(process_is_gone(sleep), case)
            self.assert_none_left(argument, case)

    @async_test
    async def test_cancel_kills_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, _ = self.prepare(template)
            running = self.run_bash(script)
            sleep = await self.wait_for_escaped_sleep(argument)

            running.cancel()
            with self.assertRaises(asyncio.CancelledError):
                await asyncio.wait_for(running, START_TIMEOUT)

            self.assertTrue(process_is_gone(sleep), case)
            self.assert_none_left(argument, case)

    @async_test
    async def test_timeout_kills_processes_forking_meanwhile(self):
        script, argument, _ = self.prepare(FORKING_SCRIPT)
        clock = task.Clock()
        running = self.run_bash(script, timeout=5, clock=clock)
        await wait_until(lambda: find_sleeps(argument), timeout=START_TIMEOUT)
        await wait_until(lambda: clock.getDelayedCalls(), timeout=START_TIMEOUT)

        clock.advance(5)
        result = await asyncio.wait_for(running, START_TIMEOUT)

        self.assertTrue(result.timed_out)
        self.assert_none_left(argument, "forking loop")

    @async_test
    async def test_timeout_of_stopped_group(self):
        # The command stops its whole process group, supervisor included, once a sleep
        # that it started outside the group runs. The sleep keeps running.
        script, argument, _ = self.prepare(
            "setsid sleep {argument} & sleep=$!; "
            'until [ "$(head -c 5 /proc/$sleep/cmdline)" = sleep ]; do :; done; kill -STOP 0'
        )
        clock = task.Clock()
        running = self.run_bash(script, timeout=5, clock=clock)
        sleep = await self.wait_for_escaped_sleep(argument)
        supervisor = find_supervisor(sleep)
        await wait_until(lambda: read_state(supervisor) == "T", timeout=START_TIMEOUT)
        await wait_until(lambda: clock.getDelayedCalls(), timeout=START_TIMEOUT)

        clock.advance(5)
        result = await asyncio.wait_for(running, START_TIMEOUT)

        self.assertTrue(result.timed_out)
        self.assertTrue(process_is_gone(sleep))
        self.assert_none_left(argument, "stopped group")


class LifelineTests(ContainmentTestCase, SupervisorTestCase):
    @async_test
    async def test_closed_lifeline_kills_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, _ = self.prepare(template)
            process, lifeline = self.start_supervisor(script, shell=BASH)
            self.assertEqual(process.stdout.readline().split()[0], b"started", case)
            sleep = await self.wait_for_escaped_sleep(argument)

            # What the kernel does when the bot dies, even by SIGKILL.
            os.close(lifeline)

            await wait_until(lambda: process.poll() is not None, timeout=KILL_TIMEOUT)
            self.assertEqual(process.returncode, -signal.SIGKILL, case)
            self.assertTrue(process_is_gone(sleep), case)
            self.assert_none_left(argument, case)

    @async_test
    async def test_stop_request_kills_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, _ = self.prepare(template)
            process, lifeline = self.start_supervisor(script, shell=BASH)
            self.addCleanup(os.close, lifeline)
            self.assertEqual(process.stdout.readline().split()[0], b"started", case)
            sleep = await self.wait_for_escaped_sleep(argument)

            os.write(lifeline, b"x")

            await wait_until(lambda: process.poll() is not None, timeout=KILL_TIMEOUT)
            self.assertEqual(process.returncode, -signal.SIGKILL, case)
            self.assertTrue(process_is_gone(sleep), case)
            self.assert_none_left(argument, case)


# Runs run_process as a bot would, for one script given as an argument.
PARENT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from bgrid.bot.runner import run_process

    directory, script = sys.argv[1:3]
    asyncio.run(run_process(
        ["/bin/bash", "-c", script], {"PATH": "/usr/bin:/bin"}, directory,
        f"{directory}/stdout", f"{directory}/stderr",
    ))
""")


class BotDeathTests(ContainmentTestCase):
    @async_test
    async def test_sigkilled_bot_leaves_no_escaped_processes(self):
        for case, template in ESCAPE_SCRIPTS.items():
            script, argument, _ = self.prepare(template)
            parent = subprocess.Popen(
                [sys.executable, "-c", PARENT_SCRIPT, self.directory, script],
                env=dict(os.environ, PYTHONPATH=REPOSITORY_ROOT), stdin=subprocess.DEVNULL,
            )
            self.addCleanup(parent.wait)
            self.addCleanup(parent.kill)
            sleep = await self.wait_for_escaped_sleep(argument)
            supervisor = find_supervisor(sleep)

            parent.kill()
            parent.wait()

            # The supervisor, orphaned, is reaped by init or by a subreaper above the test.
            await wait_until(lambda: process_is_gone(supervisor), timeout=KILL_TIMEOUT)
            await wait_until(lambda: process_is_gone(sleep), timeout=KILL_TIMEOUT)
            await wait_until(lambda: not find_processes_with(argument), timeout=KILL_TIMEOUT)
