"""Tests of the ``bgrid bot`` options and of the bot process as a whole."""

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import signal
import socket
import sys

from twisted.trial import unittest

from bgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2
from bgrid.bot import main
from bgrid.bot.bot import WorkDirectory
from bgrid.bridge import as_deferred
from tests.client.fakes import ScriptedBots, start_server
from tests.util import async_test, make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the bot with Python's default SIGINT handler, as a process started from a terminal
# has it, even when the tests run with SIGINT ignored, as in a background job.
BOT_WITH_SIGINT_HANDLER = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('bgrid.bot.main', run_name='__main__')"
)


def parse(*argv):
    parser = argparse.ArgumentParser(prog="bgrid bot")
    main.add_arguments(parser)
    return parser.parse_args(argv)


def parse_error(*argv):
    """Parse ``argv`` expecting an error; return the exit code and what went to stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parse(*argv)
        except SystemExit as exit:
            return exit.code, stderr.getvalue()
    raise AssertionError(f"{argv} parsed without error")


class OptionTests(unittest.TestCase):
    def test_defaults(self):
        args = parse("--server", "localhost:8980")
        self.assertEqual(args.server, "localhost:8980")
        self.assertEqual(args.instance, "")
        self.assertEqual(args.properties, [])
        self.assertEqual(args.concurrency, os.cpu_count())
        self.assertEqual(args.cache_size, 10 * 1024 ** 3)
        self.assertIsNone(args.name)

    def test_all_options(self):
        args = parse(
            "--server", "unix:/run/bgrid.sock", "--instance", "main", "--property", "OSFamily=linux",
            "--property", "pool=", "--work-dir", "/w", "--concurrency", "3", "--name", "b1",
            "--cache-size", "512MiB",
        )
        self.assertEqual(args.properties, [("OSFamily", "linux"), ("pool", "")])
        self.assertEqual(args.concurrency, 3)
        self.assertEqual(args.cache_size, 512 * 1024 ** 2)
        self.assertEqual((args.work_dir, args.name, args.instance), ("/w", "b1", "main"))

    def test_size_units_as_daemon(self):
        cases = [
            ("1024", 1024),
            ("2KiB", 2048),
            ("3GiB", 3 * 1024 ** 3),
            ("1TiB", 1024 ** 4),
            ("10GB", 10 * 1000 ** 3),
            ("5MB", 5 * 1000 ** 2),
            ("1.5GiB", 3 * 1024 ** 3 // 2),
        ]
        for text, expected in cases:
            self.assertEqual(parse("--server", "h:1", "--cache-size", text).cache_size, expected)

    def test_invalid_options_exit_2_with_one_message(self):
        cases = [
            ((), "--server"),
            (("--server", "nohost"), "invalid server address 'nohost'"),
            (("--server", "h:1", "--property", "novalue"), "invalid property 'novalue'"),
            (("--server", "h:1", "--property", "=v"), "invalid property '=v'"),
            (("--server", "h:1", "--concurrency", "0"), "invalid count '0'"),
            (("--server", "h:1", "--concurrency", "many"), "invalid count 'many'"),
            (("--server", "h:1", "--cache-size", "10X"), "invalid size '10X'"),
            # The daemon's units: a bare G is not one of them.
            (("--server", "h:1", "--cache-size", "10G"), "invalid size '10G'"),
            (("--server", "h:1", "--name", "two words"), "invalid bot name 'two words'"),
        ]
        for argv, expected in cases:
            code, stderr = parse_error(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(expected, stderr)
            self.assertNotIn("Traceback", stderr)


class DefaultNameTests(unittest.TestCase):
    def test_host_name_and_work_directory_hash(self):
        work_dir = os.path.join(make_temp_dir(self), "work")
        expected_digits = hashlib.sha256(os.fsencode(work_dir)).hexdigest()[:8]

        self.assertEqual(
            main.default_bot_name(work_dir), f"{socket.gethostname()}-{expected_digits}"
        )

    def test_same_for_relative_and_absolute_path(self):
        directory = make_temp_dir(self)
        previous = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, previous)

        self.assertEqual(
            main.default_bot_name("work"), main.default_bot_name(os.path.join(directory, "work"))
        )

    def test_differs_between_work_directories(self):
        directory = make_temp_dir(self)

        first = main.default_bot_name(os.path.join(directory, "first"))
        second = main.default_bot_name(os.path.join(directory, "second"))

        self.assertNotEqual(first, second)

    def test_name_is_valid_bot_name(self):
        name = main.default_bot_name(make_temp_dir(self))

        self.assertEqual(parse("--server", "h:1", "--name", name).name, name)


class RunCheckTests(unittest.TestCase):
    def test_busy_work_directory_exits_2(self):
        work_dir = os.path.join(make_temp_dir(self), "work")
        holder = WorkDirectory.open(work_dir)
        self.addCleanup(holder.close)
        stderr = io.StringIO()

        with contextlib.redirect_stderr(stderr):
            code = main.run(parse("--server", "127.0.0.1:1", "--work-dir", work_dir))

        self.assertEqual(code, 2)
        self.assertIn("is in use by another bot", stderr.getvalue())

    def test_unusable_work_directory_exits_2(self):
        blocker = os.path.join(make_temp_dir(self), "file")
        with open(blocker, "w"):
            pass
        stderr = io.StringIO()

        with contextlib.redirect_stderr(stderr):
            code = main.run(parse("--server", "127.0.0.1:1", "--work-dir", os.path.join(blocker, "w")))

        self.assertEqual(code, 2)
        self.assertIn("cannot use work directory", stderr.getvalue())

    def test_work_directory_layout(self):
        work_dir = os.path.join(make_temp_dir(self), "work")
        os.makedirs(os.path.join(work_dir, "build", "stale-exec-root", "x"))

        directory = WorkDirectory.open(work_dir)
        self.addCleanup(directory.close)

        self.assertEqual(sorted(os.listdir(work_dir)), ["build", "cache", "lock", "processes"])
        self.assertEqual(os.listdir(directory.build), [])


class BotProcessTests(unittest.TestCase):
    async def start_bot(self, address, work_dir, *options, handle_sigint=False):
        """Start ``python -m bgrid.bot.main``; return the process, killed at cleanup.

        With ``handle_sigint``, the bot starts with Python's default SIGINT handler, even
        if this process ignores SIGINT.
        """
        stderr_path = os.path.join(make_temp_dir(self), "bot.log")
        start = ["-c", BOT_WITH_SIGINT_HANDLER] if handle_sigint else ["-m", "bgrid.bot.main"]
        with open(stderr_path, "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, *start, "--server", address,
                "--work-dir", work_dir, *options,
                stdin=asyncio.subprocess.DEVNULL, stderr=stderr,
                env=dict(os.environ, PYTHONPATH=REPOSITORY_ROOT),
            )

        async def kill_if_running():
            if process.returncode is None:
                process.kill()
                await process.wait()

        self.addCleanup(lambda: as_deferred(kill_if_running()))
        return process, stderr_path

    @async_test
    async def test_default_name_from_work_directory(self):
        bots = ScriptedBots()
        address = await start_server(self, bots=bots)
        work_dir = os.path.join(make_temp_dir(self), "work")

        await self.start_bot(address, work_dir, "--concurrency", "1")

        method, request, _ = await bots.next_call(timeout=30)
        self.assertEqual(method, "CreateBotSession")
        self.assertEqual(request.bot_session.bot_id, f"{main.default_bot_name(work_dir)}.0")

    @async_test
    async def test_sessions_per_slot_and_clean_stop(self):
        bots = ScriptedBots()
        address = await start_server(self, bots=bots)
        work_dir = os.path.join(make_temp_dir(self), "work")
        process, stderr_path = await self.start_bot(
            address, work_dir, "--concurrency", "2", "--name", "proc",
            "--property", "OSFamily=linux", "--instance", "",
        )

        bot_ids = set()
        for _ in range(2):
            method, request, reply = await bots.next_call(timeout=30)
            self.assertEqual(method, "CreateBotSession")
            bot_ids.add(request.bot_session.bot_id)
            self.assertEqual(
                [(p.key, p.value) for p in request.bot_session.worker.properties],
                [("OSFamily", "linux")],
            )
            reply.set_result(bots_pb2.BotSession(name=f"s/{request.bot_session.bot_id}"))
        self.assertEqual(bot_ids, {"proc.0", "proc.1"})
        for _ in range(2):
            method, _, _ = await bots.next_call()
            self.assertEqual(method, "UpdateBotSession")

        process.send_signal(signal.SIGTERM)

        # Each session cancels its long poll and reports BOT_TERMINATING once.
        terminating = set()
        for _ in range(2):
            method, request, reply = await bots.next_call(timeout=30)
            self.assertEqual(method, "UpdateBotSession")
            self.assertEqual(request.bot_session.status, bots_pb2.BOT_TERMINATING)
            terminating.add(request.bot_session.bot_id)
            reply.set_result(bots_pb2.BotSession(name=request.name))
        self.assertEqual(terminating, {"proc.0", "proc.1"})
        exit_code = await asyncio.wait_for(process.wait(), 30)

        with open(stderr_path) as log:
            output = log.read()
        self.assertEqual(exit_code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertIn("bot proc stopped", output)

    @async_test
    async def test_sigint_then_sigterm_stops_once(self):
        # Ctrl-C on a foreground daemon with --local-bots: the bot gets SIGINT from the
        # terminal, then SIGTERM from the daemon, while it is stopping.
        bots = ScriptedBots()
        address = await start_server(self, bots=bots)
        work_dir = os.path.join(make_temp_dir(self), "work")
        process, stderr_path = await self.start_bot(
            address, work_dir, "--concurrency", "1", "--name", "proc", handle_sigint=True,
        )
        method, request, reply = await bots.next_call(timeout=30)
        self.assertEqual(method, "CreateBotSession")
        reply.set_result(bots_pb2.BotSession(name=f"s/{request.bot_session.bot_id}"))
        method, _, _ = await bots.next_call(timeout=30)
        self.assertEqual(method, "UpdateBotSession")

        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGTERM)

        # The bot stops once: its session reports BOT_TERMINATING a single time.
        method, request, reply = await bots.next_call(timeout=30)
        self.assertEqual(method, "UpdateBotSession")
        self.assertEqual(request.bot_session.status, bots_pb2.BOT_TERMINATING)
        reply.set_result(bots_pb2.BotSession(name=request.name))
        exit_code = await asyncio.wait_for(process.wait(), 30)

        with open(stderr_path) as log:
            output = log.read()
        self.assertEqual(exit_code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("ReactorNotRunning", output)
        # The bot may handle the two signals in either order.
        stop_lines = [line for line in output.splitlines() if ", stopping bot proc" in line]
        ignored_lines = [line for line in output.splitlines()
                         if "while bot proc is stopping already, ignoring it" in line]
        self.assertEqual(len(stop_lines), 1, output)
        self.assertEqual(len(ignored_lines), 1, output)
        received = {line.split("received ")[1].split()[0].rstrip(",")
                    for line in stop_lines + ignored_lines}
        self.assertEqual(received, {"SIGINT", "SIGTERM"})
        self.assertIn("bot proc stopped", output)
