"""Tests of the supervisor (bgrid/bot/supervise.py) as the bot runs it, with real processes:
it kills its whole process group when its lifeline closes, when the bot writes to it and when
the command exits."""

import os
import signal
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from bgrid.bot.processes import find_group_members
from bgrid.bot.runner import SUPERVISOR_PATH
from tests.bot.test_runner import process_is_gone, read_text
from tests.client.fakes import wait_until
from tests.util import async_test, make_temp_dir

SHELL_ENVIRONMENT = {"PATH": "/usr/bin:/bin"}

# Seconds for the group to die once the supervisor has a reason to kill it. It takes
# milliseconds; a test waits this long only when it fails.
KILL_TIMEOUT = 10.0

if not sys.platform.startswith("linux"):
    skip = "the tests read process groups from /proc, which exists only on Linux"


def encode_command(arguments, environment):
    fields = [str(len(arguments))] + arguments + [f"{k}={v}" for k, v in environment.items()]
    return b"".join(field.encode() + b"\0" for field in fields)


# Starts the supervisor of a command that writes its pid and sleeps, and a second child
# that has a copy of the lifeline's write end, so that the lifeline stays open when this
# parent dies. Only the parent death signal then reaches the supervisor.
LEAKY_PARENT_SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    supervisor_path, directory = sys.argv[1:3]
    lifeline_read, lifeline_write = os.pipe()
    holder = subprocess.Popen(["sleep", "300"], pass_fds=(lifeline_write,),
                              start_new_session=True)
    with open(os.path.join(directory, "holder.pid"), "w") as record:
        record.write(f"{holder.pid}\\n")
    supervisor = subprocess.Popen(
        [sys.executable, "-I", "-S", supervisor_path, str(lifeline_read), "1", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=directory,
        start_new_session=True, pass_fds=(lifeline_read,),
    )
    script = f"echo $$ > {directory}/command.pid; exec sleep 300"
    fields = ["3", "/bin/sh", "-c", script, "PATH=/usr/bin:/bin"]
    supervisor.stdin.write(b"".join(field.encode() + b"\\0" for field in fields))
    supervisor.stdin.close()
    supervisor.wait()
""")


class SupervisorTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = make_temp_dir(self)

    def start_supervisor(self, script, shell="/bin/sh"):
        """Start the supervisor of ``shell -c script`` as the runner does.

        Returns the Popen and the write end of its lifeline. The command's group is killed
        at cleanup, whatever the test left.
        """
        lifeline_read, lifeline_write = os.pipe()
        stdout = open(os.path.join(self.directory, "stdout"), "wb")
        stderr = open(os.path.join(self.directory, "stderr"), "wb")
        passed = (lifeline_read, stdout.fileno(), stderr.fileno())
        with stdout, stderr:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", SUPERVISOR_PATH, *(str(fd) for fd in passed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.directory,
                start_new_session=True, pass_fds=passed,
            )
        os.close(lifeline_read)
        self.addCleanup(self.kill_group, process)
        process.stdin.write(encode_command([shell, "-c", script], SHELL_ENVIRONMENT))
        process.stdin.close()
        return process, lifeline_write

    def kill_group(self, process):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        process.stdout.close()

    async def start_sleepers(self):
        """Start a supervised shell that runs a sleep in the background and one in front.

        Returns the supervisor, its lifeline and the pids of its group once all of the
        supervisor, the shell and both sleeps run.
        """
        process, lifeline = self.start_supervisor("sleep 300 & sleep 300")
        self.assertEqual(process.stdout.readline().split()[0], b"started")
        await wait_until(lambda: len(self.live_members(process.pid)) == 4, timeout=KILL_TIMEOUT)
        return process, lifeline, self.live_members(process.pid)

    @staticmethod
    def live_members(process_group_id):
        return [pid for pid in find_group_members(process_group_id) if not process_is_gone(pid)]


class SupervisorTests(SupervisorTestCase):
    @async_test
    async def test_closed_lifeline_kills_group(self):
        process, lifeline, members = await self.start_sleepers()

        # What the kernel does when the bot dies, even by SIGKILL.
        os.close(lifeline)

        await wait_until(
            lambda: all(process_is_gone(pid) for pid in members), timeout=KILL_TIMEOUT
        )
        self.assertEqual(process.wait(), -signal.SIGKILL)

    @async_test
    async def test_stop_request_kills_group(self):
        process, lifeline, members = await self.start_sleepers()
        self.addCleanup(os.close, lifeline)

        # What the bot does when the action times out or is cancelled.
        os.write(lifeline, b"x")

        await wait_until(
            lambda: all(process_is_gone(pid) for pid in members), timeout=KILL_TIMEOUT
        )
        self.assertEqual(process.wait(), -signal.SIGKILL)

    @async_test
    async def test_sigterm_from_command_reports_exit(self):
        # The command sends SIGTERM to its whole group, supervisor included, ignores it
        # itself, and exits with its own status.
        process, lifeline = self.start_supervisor("trap '' TERM; kill 0; exit 5")
        self.addCleanup(os.close, lifeline)

        self.assertEqual(process.stdout.readline().split()[0], b"started")
        self.assertEqual(process.stdout.readline(), b"exit 5\n")
        self.assertEqual(process.wait(), -signal.SIGKILL)

    @async_test
    async def test_exit_reported_and_leftovers_killed(self):
        pid_file = os.path.join(self.directory, "background.pid")
        process, lifeline = self.start_supervisor(f"sleep 300 & echo $! > {pid_file}; exit 5")
        self.addCleanup(os.close, lifeline)

        self.assertEqual(process.stdout.readline().split()[0], b"started")
        self.assertEqual(process.stdout.readline(), b"exit 5\n")

        background = int(read_text(pid_file))
        await wait_until(lambda: process_is_gone(background), timeout=KILL_TIMEOUT)
        self.assertEqual(process.wait(), -signal.SIGKILL)

    def test_signal_reported_as_negative_exit(self):
        process, lifeline = self.start_supervisor("kill -USR1 $$")
        self.addCleanup(os.close, lifeline)

        process.stdout.readline()

        self.assertEqual(process.stdout.readline(), f"exit -{signal.SIGUSR1:d}\n".encode())

    def test_missing_program_reported(self):
        lifeline_read, lifeline_write = os.pipe()
        self.addCleanup(os.close, lifeline_write)
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", SUPERVISOR_PATH, str(lifeline_read), "1", "2"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.directory,
            start_new_session=True, pass_fds=(lifeline_read,),
        )
        os.close(lifeline_read)

        output, _ = process.communicate(encode_command(["no-such-program"], SHELL_ENVIRONMENT))

        self.assertEqual(output, b"failed 2 No such file or directory\n")
        self.assertEqual(process.returncode, 127)

    @async_test
    async def test_parent_death_signal_without_lifeline(self):
        parent = subprocess.Popen(
            [sys.executable, "-c", LEAKY_PARENT_SCRIPT, SUPERVISOR_PATH, self.directory],
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(parent.wait)
        self.addCleanup(parent.kill)
        holder_file = os.path.join(self.directory, "holder.pid")
        command_file = os.path.join(self.directory, "command.pid")
        await wait_until(
            lambda: all(os.path.exists(path) and read_text(path).endswith("\n")
                        for path in (holder_file, command_file)),
            timeout=30,
        )
        holder = int(read_text(holder_file))
        self.addCleanup(os.kill, holder, signal.SIGKILL)
        command = int(read_text(command_file))
        self.addCleanup(kill_if_running, command)

        parent.kill()
        parent.wait()

        await wait_until(lambda: process_is_gone(command), timeout=KILL_TIMEOUT)
        self.assertFalse(process_is_gone(holder), "the lifeline was not held open")


def kill_if_running(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
