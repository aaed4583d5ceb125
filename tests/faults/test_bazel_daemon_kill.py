"""A remote-execution Bazel build of tests/e2e/workspace during which the daemon is killed
with SIGKILL and restarted on the same port and data directory."""

import asyncio
import collections
import os
import re

from google.rpc import code_pb2

from tests.e2e import harness
from tests.faults import support
from tests.util import async_test

# Jobs that bots completed, as the daemon logs them, before the test kills the daemon: the
# build has made progress and still has actions to run. The workspace has about 28.
COMPLETED_JOBS_BEFORE_KILL = 5

# Bazel retries failed calls up to 10 times with exponential backoff, which outlasts a
# restart of the daemon.
BAZEL_RETRY_FLAGS = ["--remote_retries=10", "--remote_timeout=60"]

# Status codes of calls that did not fail: NOT_FOUND is a cache miss of GetActionResult.
SUCCESS_CODES = {code_pb2.OK, code_pb2.NOT_FOUND}


class DaemonKillBazelTest(support.FaultTestCase):
    # Seconds trial gives the whole test: a local build, a remote build and a restart.
    timeout = 2 * harness.BAZEL_COMMAND_TIMEOUT

    def setUp(self):
        harness.skip_unless_available(needs_bots=True)
        super().setUp()
        self.bazel = harness.BazelWorkspace(self.base_dir)
        if not harness.KEEP_TEMP:
            self.addCleanup(self.bazel.remove)
        self.addCleanup(self.bazel.shutdown)

    async def run_bazel(self, command, *arguments):
        """Run a Bazel command in a thread; fail with its output and the grid logs unless it
        succeeds."""
        result = await asyncio.to_thread(self.bazel.run, command, *arguments)
        if result.returncode != 0:
            self.fail(
                f"{' '.join(result.argv)} exited with {result.returncode}\n"
                f"--- Bazel output (last 60 lines) ---\n{harness.tail(result.output)}\n"
                f"{self.grid.log_excerpt()}"
            )
        return result

    def completed_jobs(self):
        return self.grid.daemon_log().count(" completed job ")

    @async_test
    async def test_build_survives_daemon_kill(self):
        """SIGKILL of the daemon once bots have completed five jobs of a remote-execution
        build, and a restart on the same port and data directory.

        Afterwards the build has succeeded with every spawn run remotely, and every file
        under bazel-bin equals that of a local build, so no job was lost and no result is
        wrong. The bots are running. Bazel's gRPC log shows the failed calls that it
        retried, and the test prints them.
        """
        # The reference: a local build, without bgrid.
        await self.run_bazel("build", *harness.BAZEL_COMMON_FLAGS, "//...")
        bazel_bin = self.bazel.bazel_bin(*harness.BAZEL_COMMON_FLAGS)
        reference = harness.snapshot_outputs(bazel_bin)
        self.assertIn("gen/big.bin", reference)
        await self.run_bazel("clean")

        bots = [self.grid.start_bot(f"bot-{index}", concurrency=2) for index in range(2)]
        grpc_log_path = os.path.join(self.base_dir, "bazel-grpc.log")
        flags = [
            *harness.BAZEL_COMMON_FLAGS,
            *harness.remote_execution_flags(self.grid.address),
            *BAZEL_RETRY_FLAGS,
            f"--experimental_remote_grpc_log={grpc_log_path}",
        ]
        build = asyncio.ensure_future(self.run_bazel("build", *flags, "//..."))

        await support.wait_for(
            lambda: build.done() or self.completed_jobs() >= COMPLETED_JOBS_BEFORE_KILL,
            harness.BAZEL_COMMAND_TIMEOUT,
            f"bots to complete {COMPLETED_JOBS_BEFORE_KILL} jobs of the build",
        )
        self.assertFalse(build.done(), "the build ended before the daemon was killed")
        self.grid.kill(self.grid.daemon)
        await asyncio.to_thread(self.grid.start_daemon)
        result = await build

        summary = harness.parse_process_summary(result.output)
        spawns = harness.spawn_counts(summary)
        self.assertEqual(set(spawns), {"remote"}, f"expected only remote spawns, got {summary}")
        outputs = harness.snapshot_outputs(bazel_bin)
        self.assertEqual(sorted(outputs), sorted(reference), "the build produced other files")
        changed = {
            path: (reference[path], outputs[path])
            for path in reference
            if outputs[path] != reference[path]
        }
        self.assertEqual(changed, {}, "files that differ from the local build (local, remote)")
        self.assert_running(*bots)

        failed_calls = collections.Counter(
            (method, code_pb2.Code.Name(code))
            for method, code in support.read_bazel_grpc_log(grpc_log_path)
            if code not in SUCCESS_CODES
        )
        print(
            f"\n{spawns['remote']} remote spawns; Bazel retried "
            f"{sum(failed_calls.values())} failed calls:"
        )
        for (method, code), count in sorted(failed_calls.items()):
            print(f"  {method}: {count} x {code}")
        # An Execute whose operation ended with a retryable status, such as UNAVAILABLE,
        # is a successful call, so Bazel's retry of it shows only as a second job.
        queued = collections.Counter(
            re.findall(r"Queued job \S+ for action (\S+)", self.grid.daemon_log())
        )
        repeated = {action: count for action, count in queued.items() if count > 1}
        print(f"actions queued more than once: {len(repeated)} {sorted(repeated.values())}")
        self.assertGreater(
            sum(failed_calls.values()), 0, "no call of Bazel failed, so the kill missed the build"
        )
