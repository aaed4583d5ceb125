"""Tests of the records of running actions' process groups, with real processes."""

import os
import signal
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from bgrid.bot import processes
from bgrid.bot.processes import ProcessGroupRecords, find_group_members, read_process_stat
from bgrid.bot.runner import run_process
from tests.bot.test_runner import SHELL_PATH, process_is_gone, read_text
from tests.client.fakes import wait_until
from tests.scheduler.helpers import capture_logs
from tests.util import async_test, make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if not sys.platform.startswith("linux"):
    skip = "process group records exist only on Linux"


class ProcessGroupTestCase(unittest.TestCase):
    def setUp(self):
        self.directory = make_temp_dir(self)
        self.records = ProcessGroupRecords(os.path.join(self.directory, "processes"))
        os.mkdir(self.records.directory)

    def start_group(self, script="sleep 300 & sleep 300"):
        """Start ``sh -c script`` in a new session; return the Popen, reaped at cleanup."""
        process = subprocess.Popen(
            ["/bin/sh", "-c", script], start_new_session=True, env=SHELL_PATH,
            stdin=subprocess.DEVNULL,
        )

        def stop():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

        self.addCleanup(stop)
        return process

    async def wait_for_members(self, process_group_id, count):
        """Wait until the group has ``count`` live processes; return their pids."""
        def live_members():
            return [pid for pid in find_group_members(process_group_id) if not process_is_gone(pid)]

        await wait_until(lambda: len(live_members()) >= count)
        return live_members()

    def record_text(self, process_group_id):
        return read_text(os.path.join(self.records.directory, str(process_group_id)))


class RecordTests(ProcessGroupTestCase):
    def test_add_and_remove(self):
        process = self.start_group("sleep 300")

        self.records.add(process.pid)

        boot_id, start_time = self.record_text(process.pid).split()
        self.assertEqual(boot_id, processes.read_boot_id())
        self.assertEqual(int(start_time), read_process_stat(process.pid)[1])
        self.records.remove(process.pid)
        self.assertEqual(os.listdir(self.records.directory), [])

    def test_remove_without_record(self):
        self.records.remove(12345)

        self.assertEqual(os.listdir(self.records.directory), [])

    def test_read_process_stat(self):
        process = self.start_group("sleep 300")

        process_group_id, start_time = read_process_stat(process.pid)

        self.assertEqual(process_group_id, process.pid)
        self.assertGreater(start_time, 0)
        self.assertIsNone(read_process_stat(2**22 + 1))


class KillLeftoversTests(ProcessGroupTestCase):
    @async_test
    async def test_live_group_killed(self):
        process = self.start_group()
        self.records.add(process.pid)
        members = await self.wait_for_members(process.pid, 3)

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [process.pid])
        await wait_until(lambda: all(process_is_gone(pid) for pid in members))
        self.assertEqual(os.listdir(self.records.directory), [])

    @async_test
    async def test_group_without_leader_killed(self):
        process = self.start_group()
        self.records.add(process.pid)
        members = await self.wait_for_members(process.pid, 3)
        # The leader dies, as a supervisor killed alone would: its shell's children stay.
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        orphans = [pid for pid in members if pid != process.pid]
        self.assertFalse(any(process_is_gone(pid) for pid in orphans))

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [process.pid])
        await wait_until(lambda: all(process_is_gone(pid) for pid in orphans))

    @async_test
    async def test_leader_with_other_start_time_spared(self):
        process = self.start_group("sleep 300")
        _, start_time = read_process_stat(process.pid)
        self.write_record(process.pid, start_time + 1)

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        self.assertFalse(process_is_gone(process.pid))
        self.assertEqual(os.listdir(self.records.directory), [])

    @async_test
    async def test_members_older_than_record_spared(self):
        process = self.start_group()
        members = await self.wait_for_members(process.pid, 3)
        _, start_time = read_process_stat(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        # A record made after these processes started cannot be theirs.
        self.write_record(process.pid, start_time + 10**6)

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        orphans = [pid for pid in members if pid != process.pid]
        self.assertFalse(any(process_is_gone(pid) for pid in orphans))

    @async_test
    async def test_group_of_zombies_spared(self):
        # The test process does not reap the exited leader, which stays a zombie.
        process = self.start_group("exit 0")
        self.records.add(process.pid)
        await wait_until(lambda: process_is_gone(process.pid))
        events = capture_logs(self)

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        self.assertEqual([event for event in events if "Killed" in event.get("log_format", "")], [])
        self.assertEqual(os.listdir(self.records.directory), [])

    def test_record_of_other_boot_ignored(self):
        process = self.start_group("sleep 300")
        _, start_time = read_process_stat(process.pid)
        self.write_record(process.pid, start_time, boot_id="another-boot")

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        self.assertFalse(process_is_gone(process.pid))
        self.assertEqual(os.listdir(self.records.directory), [])

    def test_unreadable_record_deleted_and_logged(self):
        events = capture_logs(self)
        path = os.path.join(self.records.directory, "not-a-pid")
        with open(path, "w") as record:
            record.write("garbage")

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        self.assertEqual(os.listdir(self.records.directory), [])
        self.assertEqual(len([event for event in events if event.get("path") == path]), 1)

    def test_record_of_gone_group_deleted(self):
        process = self.start_group("exit 0")
        process.wait()
        self.write_record(process.pid, 1)

        killed = self.records.kill_leftovers()

        self.assertEqual(killed, [])
        self.assertEqual(os.listdir(self.records.directory), [])

    def write_record(self, process_group_id, start_time, boot_id=None):
        if boot_id is None:
            boot_id = processes.read_boot_id()
        path = os.path.join(self.records.directory, str(process_group_id))
        with open(path, "w") as record:
            record.write(f"{boot_id} {start_time}\n")


class RunProcessRecordTests(ProcessGroupTestCase):
    @async_test
    async def test_group_recorded_while_running(self):
        stdout = os.path.join(self.directory, "stdout")
        stderr = os.path.join(self.directory, "stderr")
        # The record is written when the supervisor starts, before the command runs. The
        # command waits up to 10 s for it all the same.
        records = self.records.directory
        script = (
            f'i=0; while [ -z "$(ls {records})" ] && [ $i -lt 1000 ]; do sleep 0.01; '
            f'i=$((i+1)); done; ls {records} > {self.directory}/seen'
        )

        await run_process(
            ["/bin/sh", "-c", script], SHELL_PATH, self.directory, stdout, stderr,
            process_groups=self.records,
        )

        seen = read_text(os.path.join(self.directory, "seen")).split()
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0].isdigit(), seen)
        self.assertEqual(os.listdir(self.records.directory), [])


# Runs run_process as a bot would, for a shell that starts two sleeps in the background,
# writes their pids and waits.
PARENT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from bgrid.bot.runner import run_process

    async def main(directory):
        script = (
            f"sleep 300 & echo $! > {directory}/sleeps.new; sleep 300 & echo $! >> "
            f"{directory}/sleeps.new; mv {directory}/sleeps.new {directory}/sleeps; wait"
        )
        await run_process(
            ["/bin/sh", "-c", script], {"PATH": "/usr/bin:/bin"}, directory,
            f"{directory}/stdout", f"{directory}/stderr",
        )

    asyncio.run(main(sys.argv[1]))
""")


class BotDeathTests(ProcessGroupTestCase):
    @async_test
    async def test_sigkilled_parent_leaves_no_processes(self):
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT_SCRIPT, self.directory],
            env=dict(os.environ, PYTHONPATH=REPOSITORY_ROOT), stdin=subprocess.DEVNULL,
        )
        self.addCleanup(parent.wait)
        self.addCleanup(parent.kill)
        pid_file = os.path.join(self.directory, "sleeps")
        await wait_until(lambda: os.path.exists(pid_file), timeout=30)
        sleeps = [int(line) for line in read_text(pid_file).split()]
        for pid in sleeps:
            self.addCleanup(self.kill_if_running, pid)
        self.assertEqual(len(sleeps), 2)
        self.assertFalse(any(process_is_gone(pid) for pid in sleeps))

        parent.kill()
        parent.wait()

        # Both sleeps run in the background of the shell, so only a kill of the whole
        # group ends them.
        await wait_until(lambda: all(process_is_gone(pid) for pid in sleeps), timeout=10)

    @staticmethod
    def kill_if_running(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
