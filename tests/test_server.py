"""Tests of the daemon's start-up: data directory locking, start failures and local bots."""

import os
import socket
import subprocess

from twisted.trial import unittest

from bgrid.server import StartupError, local_address, lock_data_dir
from tests.e2e.harness import REPOSITORY_ROOT, Grid, daemon_command, find_free_port, read_text
from tests.util import make_temp_dir

# Seconds a daemon that cannot start may take to exit.
FAILED_START_TIMEOUT = 30


class LocalAddressTests(unittest.TestCase):
    def test_addresses(self):
        cases = [
            ("127.0.0.1:50051", 50051, "127.0.0.1:50051"),
            ("0.0.0.0:0", 41000, "127.0.0.1:41000"),
            ("[::]:50051", 50051, "[::1]:50051"),
            ("[::1]:50051", 50051, "[::1]:50051"),
            ("10.1.2.3:9000", 9000, "10.1.2.3:9000"),
            ("unix:/run/bgrid.sock", 0, "unix:/run/bgrid.sock"),
        ]
        for listen, port, expected in cases:
            with self.subTest(listen=listen):
                self.assertEqual(local_address(listen, port), expected)


class DataDirLockTests(unittest.TestCase):
    def test_second_lock_refused_with_pid(self):
        data_dir = make_temp_dir(self)
        first = lock_data_dir(data_dir)
        self.addCleanup(first.close)

        with self.assertRaises(StartupError) as caught:
            lock_data_dir(data_dir)

        self.assertIn(f"pid {os.getpid()}", str(caught.exception))
        self.assertIn(data_dir, str(caught.exception))

    def test_lock_released_on_close(self):
        data_dir = make_temp_dir(self)
        lock_data_dir(data_dir).close()

        lock_data_dir(data_dir).close()


class FailedStartTests(unittest.TestCase):
    """A daemon that cannot start exits with status 1, so systemd restarts or reports it."""

    def run_daemon(self, port, data_dir):
        base_dir = make_temp_dir(self)
        log_path = os.path.join(base_dir, "daemon.log")
        env = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
        completed = subprocess.run(
            daemon_command(port, data_dir, log_path),
            cwd=base_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=FAILED_START_TIMEOUT,
        )
        return completed.returncode, read_text(log_path)

    def test_port_taken(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        status, log = self.run_daemon(port, make_temp_dir(self))

        self.assertEqual(status, 1)
        self.assertIn("bgrid failed to start", log)

    def test_data_dir_in_use(self):
        grid = Grid(make_temp_dir(self), bot_count=0)
        self.addCleanup(grid.stop)
        grid.start()
        data_dir = os.path.join(grid.base_dir, "data")

        status, log = self.run_daemon(find_free_port(), data_dir)

        self.assertEqual(status, 1)
        self.assertIn(f"is in use by another bgrid daemon (pid {grid.daemon.pid})", log)
        self.assertTrue(grid.daemon.is_running())
