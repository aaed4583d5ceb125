"""Tests of run_process: environment, working directory, output capture, timeouts and
cancellation, all with real processes."""

import asyncio
import os

from twisted.internet import task
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid.bot import runner
from bgrid.bot.runner import run_process
from bgrid.errors import InvalidArgumentError
from tests.client.fakes import FakeCas, open_test_channel, start_server, wait_until
from tests.util import async_test, make_temp_dir

SHELL_PATH = {"PATH": "/usr/bin:/bin"}

# Commands started at once beside gRPC calls. With the parent death signal set between
# fork and exec, several of 40 crashed (grpcio 1.85.3).
COMMANDS_BESIDE_GRPC = 40


def read_text(path):
    with open(path) as source:
        return source.read()


def process_is_gone(pid):
    """True when ``pid`` no longer runs; a zombie waiting for its reaper counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as source:
            state = source.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


class RunProcessTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = make_temp_dir(self)
        self.stdout = os.path.join(self.directory, "stdout")
        self.stderr = os.path.join(self.directory, "stderr")

    def run_shell(self, script, environment=SHELL_PATH, working_directory=None, **kwargs):
        return run_process(
            ["/bin/sh", "-c", script], environment, working_directory or self.directory,
            self.stdout, self.stderr, **kwargs,
        )


class RunProcessTests(RunProcessTestCase):
    @async_test
    async def test_stdout_stderr_exit_code(self):
        result = await self.run_shell("echo out; echo err >&2; exit 3")

        self.assertEqual(result.exit_code, 3)
        self.assertFalse(result.timed_out)
        self.assertEqual(read_text(self.stdout), "out\n")
        self.assertEqual(read_text(self.stderr), "err\n")

    @async_test
    async def test_environment_only_from_command(self):
        os.environ["BGRID_TEST_LEAK"] = "leaked"
        self.addCleanup(os.environ.pop, "BGRID_TEST_LEAK")

        await run_process(["/usr/bin/env"], {"ONLY": "this"}, self.directory, self.stdout, self.stderr)

        self.assertEqual(read_text(self.stdout), "ONLY=this\n")

    @async_test
    async def test_working_directory(self):
        inner = os.path.join(self.directory, "inner")
        os.mkdir(inner)

        await self.run_shell("pwd", working_directory=inner)

        self.assertEqual(read_text(self.stdout).strip(), os.path.realpath(inner))

    @async_test
    async def test_relative_program_resolved_from_working_directory(self):
        tools = os.path.join(self.directory, "tools")
        os.mkdir(tools)
        script = os.path.join(tools, "hello")
        with open(script, "w") as target:
            target.write("#!/bin/sh\necho hello from tools\n")
        os.chmod(script, 0o755)

        result = await run_process(["tools/hello"], {}, self.directory, self.stdout, self.stderr)

        self.assertEqual(result.exit_code, 0)
        self.assertEqual(read_text(self.stdout), "hello from tools\n")

    @async_test
    async def test_bare_name_searched_in_command_path(self):
        result = await run_process(["sh", "-c", "exit 0"], SHELL_PATH, self.directory,
                                   self.stdout, self.stderr)
        self.assertEqual(result.exit_code, 0)

    @async_test
    async def test_missing_program_rejected(self):
        with self.assertRaises(InvalidArgumentError) as caught:
            await run_process(["./no-such-program"], {}, self.directory, self.stdout, self.stderr)
        self.assertIn("failed to start './no-such-program'", caught.exception.message)

    @async_test
    async def test_program_without_execute_permission_rejected(self):
        script = os.path.join(self.directory, "not-executable")
        with open(script, "w") as target:
            target.write("#!/bin/sh\n")

        with self.assertRaises(InvalidArgumentError) as caught:
            await run_process(["./not-executable"], {}, self.directory, self.stdout, self.stderr)

        self.assertIn("Permission denied", caught.exception.message)

    @async_test
    async def test_nul_character_rejected(self):
        for arguments, environment in [
            (["/bin/echo", "a\0b"], {}),
            (["/bin/echo"], {"NAME": "a\0b"}),
            (["/bin/echo"], {"A=B": "c"}),
            (["/bin/echo"], {"": "c"}),
        ]:
            with self.assertRaises(InvalidArgumentError, msg=(arguments, environment)):
                await run_process(arguments, environment, self.directory, self.stdout, self.stderr)

    @async_test
    async def test_only_standard_descriptors_inherited(self):
        # The supervisor's lifeline and its own pipes must not reach the command.
        result = await self.run_shell("ls /proc/$$/fd; readlink /proc/$$/fd/0")

        self.assertEqual(result.exit_code, 0)
        self.assertEqual(read_text(self.stdout).split(), ["0", "1", "2", "/dev/null"])

    @async_test
    async def test_command_leads_no_group(self):
        # The supervisor leads the group, and the command is its child in that group.
        await self.run_shell("echo $$; cat /proc/$$/stat")

        pid, stat = read_text(self.stdout).split("\n", 1)
        # Fields after the command name: state, parent pid, process group, session.
        _, parent, group, session = stat.rpartition(")")[2].split()[:4]
        self.assertNotEqual(int(pid), int(group))
        self.assertEqual(int(parent), int(group))
        self.assertEqual(int(group), int(session))

    @async_test
    async def test_empty_arguments_rejected(self):
        with self.assertRaises(InvalidArgumentError):
            await run_process([], {}, self.directory, self.stdout, self.stderr)

    @async_test
    async def test_killed_by_signal_reports_128_plus_signal(self):
        result = await self.run_shell("kill -TERM $$")
        self.assertEqual(result.exit_code, 128 + 15)

    @async_test
    async def test_large_output_goes_to_file(self):
        # The 8 MiB go straight into the file, so the bot keeps none of it in memory.
        result = await self.run_shell("head -c 8388608 /dev/zero")
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(os.path.getsize(self.stdout), 8 * 1024 * 1024)


class GrpcNeighbourTests(RunProcessTestCase):
    @async_test
    async def test_many_commands_beside_grpc_calls(self):
        """Commands start while gRPC's threads serve calls in the same process.

        A child forked with Python code to run before exec could crash in gRPC's fork
        handlers (exit code 139, SIGSEGV). The runner starts its supervisors without any.
        """
        address = await start_server(self, cas=FakeCas())
        stub = remote_execution_pb2_grpc.CapabilitiesStub(open_test_channel(self, address))
        stop = asyncio.Event()

        async def call_repeatedly():
            while not stop.is_set():
                await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest())

        callers = [asyncio.ensure_future(call_repeatedly()) for _ in range(4)]
        try:
            results = await asyncio.gather(*[
                run_process(["/bin/sh", "-c", "exit 0"], SHELL_PATH, self.directory,
                            os.path.join(self.directory, f"stdout-{index}"),
                            os.path.join(self.directory, f"stderr-{index}"))
                for index in range(COMMANDS_BESIDE_GRPC)
            ])
        finally:
            stop.set()
            await asyncio.gather(*callers)

        self.assertEqual([result.exit_code for result in results], [0] * COMMANDS_BESIDE_GRPC)


class TimeoutTests(RunProcessTestCase):
    @async_test
    async def test_timeout_kills_process_group(self):
        clock = task.Clock()
        pid_file = os.path.join(self.directory, "grandchild.pid")
        script = f"echo partial; sleep 300 & echo $! > {pid_file}; wait"

        running = asyncio.ensure_future(self.run_shell(script, timeout=5, clock=clock))
        await wait_until(lambda: os.path.exists(pid_file) and read_text(pid_file).endswith("\n"))
        grandchild = int(read_text(pid_file))
        self.assertFalse(process_is_gone(grandchild))
        # The timeout starts once the supervisor reports that the command runs, which may
        # come after the command's first output.
        await wait_until(lambda: clock.getDelayedCalls())

        clock.advance(4.9)
        self.assertFalse(running.done())
        clock.advance(0.1)
        result = await running

        self.assertTrue(result.timed_out)
        self.assertEqual(result.exit_code, 128 + 9)
        self.assertEqual(result.duration, 5)
        self.assertEqual(read_text(self.stdout), "partial\n")
        await wait_until(lambda: process_is_gone(grandchild))

    @async_test
    async def test_real_short_timeout(self):
        result = await self.run_shell("sleep 30", timeout=1)
        self.assertTrue(result.timed_out)

    @async_test
    async def test_finished_command_cancels_timer(self):
        clock = task.Clock()
        result = await self.run_shell("exit 0", timeout=60, clock=clock)
        self.assertFalse(result.timed_out)
        self.assertEqual(clock.getDelayedCalls(), [])

    @async_test
    async def test_timeout_during_cleanup_ignored(self):
        """The timeout passes after the command's exit was reported, while the supervisor
        still cleans up: the command finished in time."""
        clock = task.Clock()
        read_report = runner._read_report

        async def read_report_then_time_out(process, expected):
            words = await read_report(process, expected)
            if words and words[0] == "exit":
                asyncio.get_running_loop().call_soon(clock.advance, 60)
            return words

        self.patch(runner, "_read_report", read_report_then_time_out)

        result = await self.run_shell("exit 3", timeout=5, clock=clock)

        self.assertFalse(result.timed_out)
        self.assertEqual(result.exit_code, 3)
        self.assertEqual(result.duration, 0)

    @async_test
    async def test_leftover_background_process_killed(self):
        pid_file = os.path.join(self.directory, "background.pid")
        # The shell exits at once and leaves a sleep behind in its process group.
        await self.run_shell(f"sleep 300 & echo $! > {pid_file}")
        background = int(read_text(pid_file))
        await wait_until(lambda: process_is_gone(background))


class CancellationTests(RunProcessTestCase):
    @async_test
    async def test_cancel_kills_process_group(self):
        pid_file = os.path.join(self.directory, "grandchild.pid")
        running = asyncio.ensure_future(
            self.run_shell(f"sleep 300 & echo $! > {pid_file}; wait")
        )
        await wait_until(lambda: os.path.exists(pid_file) and read_text(pid_file).endswith("\n"))
        grandchild = int(read_text(pid_file))

        running.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await running

        await wait_until(lambda: process_is_gone(grandchild))
