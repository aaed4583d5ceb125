"""Bazel 4.2 builds and tests the workspace in tests/e2e/workspace against a real bgrid.

Each test starts its own daemon, bots and Bazel server, so the tests are independent.
Trial has no per-class fixture, and a daemon starts in about a second, which is small
next to the Bazel server's own start.
"""

import signal
import subprocess

from twisted.trial import unittest

from tests.e2e import harness

# Text that the //gen:noisy genrule writes to stderr.
NOISY_STDERR_LINE = "bgrid-e2e: this line is written to stderr"

TEST_TARGETS = ["//gen:big_file_test", "//lib:fnv_test", "//lib:pattern_test"]

# Strategies under which Bazel 4.2 reports spawns that ran on this machine.
LOCAL_STRATEGIES = {"linux-sandbox", "processwrapper-sandbox", "local", "worker", "sandbox"}


class EndToEndTestCase(unittest.TestCase):
    """Start a grid and a Bazel workspace for each test, and stop both afterwards.

    The tests block while Bazel runs, so trial's per-test timeout never fires. Each Bazel
    command has its own timeout, ``harness.BAZEL_COMMAND_TIMEOUT``, instead.
    """

    # Bot processes connected to the daemon. Each runs up to two actions at once.
    bot_count = 2

    def setUp(self):
        harness.skip_unless_available(needs_bots=self.bot_count > 0)
        base_dir = harness.make_base_dir(self)

        self.grid = harness.Grid(f"{base_dir}/grid", bot_count=self.bot_count, bot_concurrency=2)
        self.addCleanup(self.stop_grid_and_check_logs)
        self.grid.start()

        self.bazel = harness.BazelWorkspace(base_dir)
        if not harness.KEEP_TEMP:
            self.addCleanup(self.bazel.remove)
        self.addCleanup(self.bazel.shutdown)

    def stop_grid_and_check_logs(self):
        statuses = self.grid.stop()
        # twistd ends itself with the signal that stopped it, and a process signalled before
        # its reactor runs dies of the signal, so -SIGTERM is a clean exit.
        clean_statuses = {0, -signal.SIGTERM}
        failed_exits = {name: status for name, status in statuses.items() if status not in clean_statuses}
        self.assertEqual(
            failed_exits, {}, f"processes that did not exit cleanly on SIGTERM\n{self.grid.log_excerpt()}"
        )
        problems = self.grid.problems()
        if problems:
            details = "\n".join(f"--- {name} ---\n{excerpt}" for name, excerpt in problems.items())
            self.fail(f"bgrid logged a traceback or an error:\n{details}")

    def run_bazel(self, command, *arguments):
        """Run a Bazel command that must succeed; on failure, report its output and the grid logs."""
        self.assert_grid_running(f"before bazel {command}")
        try:
            result = self.bazel.run(command, *arguments)
        except subprocess.TimeoutExpired as error:
            self.fail(f"{' '.join(error.cmd)} timed out after {error.timeout} seconds\n{self.grid.log_excerpt()}")
        self.assert_grid_running(f"after bazel {command}")
        if result.returncode != 0:
            self.fail(
                f"{' '.join(result.argv)} exited with {result.returncode}\n"
                f"--- Bazel output (last 60 lines) ---\n{harness.tail(result.output)}\n"
                f"{self.grid.log_excerpt()}"
            )
        # Bazel 4.2 reports a failed upload to the remote cache only as a warning
        # ("WARNING: Writing to Remote Cache: ..."), and the build still succeeds.
        remote_warnings = [
            line for line in result.output.splitlines() if line.startswith("WARNING:") and "remote" in line.lower()
        ]
        self.assertEqual(remote_warnings, [], f"Bazel warned about bgrid during {command}")
        return result

    def assert_grid_running(self, moment):
        exited = self.grid.exited_processes()
        if exited:
            self.fail(f"{moment}: {'; '.join(exited)}\n{self.grid.log_excerpt()}")

    def process_summary(self, result):
        try:
            return harness.parse_process_summary(result.output)
        except ValueError as error:
            self.fail(f"{error}; Bazel output:\n{harness.tail(result.output)}")

    def assert_tests_passed(self, result):
        for target in TEST_TARGETS:
            self.assertRegex(result.output, rf"(?m)^{target} +(\(cached\) )?PASSED")
        self.assertIn(f"Executed {len(TEST_TARGETS)} out of {len(TEST_TARGETS)} tests", result.output)

    def assert_all_cache_hits(self, summary, expected_spawns):
        """Check that every spawn of a build was served from bgrid's action cache."""
        self.assertEqual(
            harness.spawn_counts(summary),
            {"remote cache hit": expected_spawns},
            f"expected all {expected_spawns} spawns to be remote cache hits, got {summary}",
        )

    def assert_same_outputs(self, before, after):
        self.assertEqual(sorted(before), sorted(after), "the rebuild produced a different set of files")
        changed = {path: (before[path], after[path]) for path in before if before[path] != after[path]}
        self.assertEqual(changed, {}, "the rebuild changed these files (before, after)")

    def assert_expected_files(self, snapshot):
        """Check that the outputs that exercise special cases exist with the expected content."""
        for path in [
            "gen/big.bin",
            "gen/empty.txt",
            "gen/greeting.txt",
            "gen/numbers.txt",
            "gen/checksums.txt",
            "gen/noisy.txt",
            "tree/files/a.txt",
            "tree/files/run.sh",
            "tree/files/nested/b.txt",
            "tree/files/nested/empty.txt",
            "tree/files/nested/deeper/c.txt",
            "tree/manifest.txt",
            "tools/fnvsum",
            "tools/make_pattern",
        ]:
            self.assertIn(path, snapshot)
        empty_sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        self.assertTrue(snapshot["gen/empty.txt"].startswith(f"sha256 {empty_sha256}"))
        self.assertTrue(snapshot["tree/files/run.sh"].endswith(", executable"))
        self.assertTrue(snapshot["tools/fnvsum"].endswith(", executable"))


class RemoteCacheTest(EndToEndTestCase):
    """Bazel runs actions locally and stores their results in bgrid (``--remote_cache``)."""

    bot_count = 0

    def test_rebuild_after_clean_hits_cache(self):
        flags = [*harness.BAZEL_COMMON_FLAGS, *harness.remote_cache_flags(self.grid.address)]

        # Build with an empty cache: every spawn runs locally and is uploaded.
        first = self.run_bazel("build", *flags, "//...")
        first_spawns = harness.spawn_counts(self.process_summary(first))
        self.assertNotIn("remote cache hit", first_spawns)
        self.assertGreater(sum(first_spawns.values()), 0)
        self.assertIn(NOISY_STDERR_LINE, first.output)

        tested = self.run_bazel("test", *flags, "//...")
        self.assert_tests_passed(tested)

        bazel_bin = self.bazel.bazel_bin(*flags)
        before = harness.snapshot_outputs(bazel_bin)
        self.assert_expected_files(before)

        # After a clean, every spawn of the same build is a cache hit.
        self.run_bazel("clean")
        rebuilt = self.run_bazel("build", *flags, "//...")
        self.assert_all_cache_hits(self.process_summary(rebuilt), sum(first_spawns.values()))
        self.assertIn(NOISY_STDERR_LINE, rebuilt.output, "a cache hit must replay the action's stderr")
        self.assert_same_outputs(before, harness.snapshot_outputs(bazel_bin))


class RemoteExecutionTest(EndToEndTestCase):
    """Bazel sends every action to bgrid's bots (``--remote_executor``)."""

    def remote_flags(self):
        return [*harness.BAZEL_COMMON_FLAGS, *harness.remote_execution_flags(self.grid.address)]

    def test_build_runs_remotely_then_hits_cache(self):
        flags = self.remote_flags()

        # Build with an empty cache: the bots run every spawn.
        first = self.run_bazel("build", *flags, "//...")
        first_spawns = harness.spawn_counts(self.process_summary(first))
        self.assertEqual(set(first_spawns), {"remote"}, f"expected only remote spawns, got {first_spawns}")
        self.assertIn(NOISY_STDERR_LINE, first.output, "the bot must return the action's stderr")

        bazel_bin = self.bazel.bazel_bin(*flags)
        before = harness.snapshot_outputs(bazel_bin)
        self.assert_expected_files(before)

        # After a clean, every spawn is served from the action cache.
        self.run_bazel("clean")
        rebuilt = self.run_bazel("build", *flags, "//...")
        self.assert_all_cache_hits(self.process_summary(rebuilt), first_spawns["remote"])
        self.assert_same_outputs(before, harness.snapshot_outputs(bazel_bin))

    def test_tests_pass_remotely(self):
        flags = self.remote_flags()

        tested = self.run_bazel("test", *flags, "//...")

        self.assert_tests_passed(tested)
        spawns = harness.spawn_counts(self.process_summary(tested))
        self.assertEqual(set(spawns) & LOCAL_STRATEGIES, set(), f"some spawns ran locally: {spawns}")
        self.assertGreater(spawns.get("remote", 0), 0)
