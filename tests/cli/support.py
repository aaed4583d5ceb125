"""Running the ``bgrid`` command line as a subprocess, against a real daemon and bot.

The daemon and bot are those of the end-to-end harness: ``twistd bgrid`` on a free
loopback port, waited for with gRPC health checks, and ``python -m bgrid bot``.
"""

import os
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.e2e.harness import REPOSITORY_ROOT, TRACEBACK_MARKER, Grid
from tests.util import make_temp_dir

# Seconds one bgrid command may take before the test kills it and fails.
COMMAND_TIMEOUT = 60.0


def bgrid_environment():
    """Return the environment of bgrid subprocesses: this checkout first on PYTHONPATH."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [REPOSITORY_ROOT, environment.get("PYTHONPATH")])
    )
    return environment


def bgrid_argv(*arguments):
    """Return the argv that runs ``bgrid ARGUMENTS...`` with this interpreter."""
    return [sys.executable, "-m", "bgrid", *arguments]


def run_bgrid(*arguments, cwd, timeout=COMMAND_TIMEOUT):
    """Run ``bgrid ARGUMENTS...`` in ``cwd`` and return the ``CompletedProcess``.

    stdout is bytes, since it carries the remote command's output unchanged; stderr is text.
    """
    completed = subprocess.run(
        bgrid_argv(*arguments),
        cwd=cwd,
        env=bgrid_environment(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    completed.stderr = completed.stderr.decode("utf-8", errors="replace")
    return completed


def describe(result):
    """Return the argv, exit status and output of a run, for failure messages."""
    stdout = result.stdout.decode("utf-8", errors="replace") if isinstance(result.stdout, bytes) else result.stdout
    return (
        f"\nargv: {result.args}\nexit status: {result.returncode}\n"
        f"--- stdout ---\n{stdout}\n--- stderr ---\n{result.stderr}"
    )


class CliAssertions:
    """Checks of exit statuses and stderr shared by the CLI tests."""

    def assert_exit_status(self, result, status):
        self.assertEqual(result.returncode, status, describe(result))
        self.assertNotIn(TRACEBACK_MARKER, result.stderr, describe(result))

    def assert_usage_error(self, result, *fragments):
        """Check exit status 2 and a stderr of exactly one line containing ``fragments``."""
        self.assert_exit_status(result, 2)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, describe(result))
        self.assertRegex(lines[0], r"^bgrid( [a-z-]+)*: error: ", describe(result))
        for fragment in fragments:
            self.assertIn(fragment, lines[0], describe(result))

    def assert_command_error(self, result, *fragments):
        """Check exit status 1 and one ``bgrid: error:`` line, the last of stderr, containing
        ``fragments``. Progress lines of ``bgrid execute`` may precede it."""
        self.assert_exit_status(result, 1)
        lines = result.stderr.splitlines()
        error_lines = [line for line in lines if line.startswith("bgrid: error: ")]
        self.assertEqual(len(error_lines), 1, describe(result))
        self.assertEqual(lines[-1], error_lines[0], describe(result))
        for fragment in fragments:
            self.assertIn(fragment, error_lines[0], describe(result))


class GridTestCase(CliAssertions, unittest.TestCase):
    """A test with a bgrid daemon and one bot running one action at a time.

    ``self.work`` is an empty directory that bgrid commands run in, and ``self.server`` the
    options that point a command at the daemon.
    """

    def setUp(self):
        self.directory = make_temp_dir(self, prefix="bgrid-cli-")
        grid_directory = os.path.join(self.directory, "grid")
        os.mkdir(grid_directory)
        self.grid = Grid(grid_directory, bot_count=1, bot_concurrency=1)
        self.addCleanup(self.grid.stop)
        self.grid.start()
        # Cleanups run last in, first out, so this check runs while the grid still runs.
        self.addCleanup(self.check_grid)
        self.server = ["--server", self.grid.address]
        self.work = os.path.join(self.directory, "work")
        os.mkdir(self.work)

    def check_grid(self):
        """Fail if the daemon or the bot exited, or logged a traceback or an error."""
        self.assertEqual(self.grid.exited_processes(), [], self.grid.log_excerpt())
        self.assertEqual(self.grid.problems(), {})

    def bgrid(self, *arguments, timeout=COMMAND_TIMEOUT):
        """Run ``bgrid ARGUMENTS...`` in ``self.work``."""
        return run_bgrid(*arguments, cwd=self.work, timeout=timeout)

    def path(self, *parts):
        """Return a path below the test's temporary directory."""
        return os.path.join(self.directory, *parts)


def wait_until(condition, timeout, message):
    """Call ``condition`` every 0.1 seconds until it returns a true value, and return it.

    Raises AssertionError with ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout} seconds")
        time.sleep(0.1)
