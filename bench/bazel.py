"""The build scenario: a clean remote-execution Bazel build, then a cached rebuild.

It builds ``//...`` of the end-to-end test workspace (tests/e2e/workspace) with Bazel
4.2.3, every action on the server under test (``--spawn_strategy=remote`` with no local
fallback), run by the server's bot. Then ``bazel clean`` drops the local outputs and the
same build runs again, so every action is an action cache hit. Each build's record gives
its wall time; its operations are the remote spawns that Bazel's process summary counts.
"""

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time

from bench.servers import REPOSITORY_ROOT, read_tail, remove_tree

WORKSPACE_SOURCE = os.path.join(REPOSITORY_ROOT, "tests", "e2e", "workspace")

# Seconds one Bazel command may run before it is killed and the build counts as failed.
BAZEL_COMMAND_TIMEOUT_SECONDS = 900.0

# Flags that keep Bazel 4.2.3 offline and its action keys stable between the two builds.
# A fixed PATH (strict action env) keeps the action keys equal across runs, and no
# convenience symlinks are made, because a stale bazel-<name> link breaks //... .
BAZEL_BUILD_FLAGS = [
    "--experimental_repository_disable_download",
    "--repository_cache=",
    "--nosandbox_debug",
    "--incompatible_strict_action_env",
    "--symlink_prefix=/",
    "--color=no",
    "--curses=no",
]

_SUMMARY = re.compile(r"^INFO: (\d+) process(?:es)?(?::(.*))?\.$", re.MULTILINE)


class ScenarioSkipped(Exception):
    """The scenario cannot run here. The message gives the reason."""


def count_remote_spawns(output):
    """Return the remote spawns (executions and cache hits) in Bazel's last process summary.

    Bazel 4.2 ends a build with a line such as ``INFO: 30 processes: 14 internal, 16 remote.``
    or ``... 16 remote cache hit, 14 internal.``. Returns 0 when there is no such line.
    """
    matches = list(_SUMMARY.finditer(output))
    if not matches:
        return 0
    spawns = 0
    for part in (matches[-1].group(2) or "").split(","):
        count, _, strategy = part.strip().partition(" ")
        if strategy.startswith("remote") and count.isdigit():
            spawns += int(count)
    return spawns


class BazelWorkspace:
    """A copy of the workspace with its own output base, in a short temporary path.

    The path stays short because Bazel's server socket lives under the output base.
    """

    def __init__(self):
        self.base = tempfile.mkdtemp(prefix="bgrid-bench-bazel-")
        self.workspace = os.path.join(self.base, "ws")
        self.output_base = os.path.join(self.base, "ob")
        shutil.copytree(WORKSPACE_SOURCE, self.workspace, symlinks=True)
        self.commands = 0

    async def run(self, command, *arguments):
        """Run ``bazel COMMAND ARGUMENTS`` and return (exit code, seconds, log path)."""
        self.commands += 1
        log_path = os.path.join(self.base, f"{self.commands:02d}-{command}.log")
        argv = [
            "bazel",
            "--nohome_rc",
            "--host_jvm_args=-Xmx2g",
            f"--output_base={self.output_base}",
            # Ends a Bazel server that a killed benchmark leaves behind.
            "--max_idle_secs=300",
            command,
            *arguments,
        ]
        start = time.monotonic()
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=self.workspace, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                returncode = await asyncio.wait_for(process.wait(), BAZEL_COMMAND_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
                returncode = None
            except BaseException:
                # Cancelled (Ctrl-C): a running build would make `bazel shutdown` wait for it.
                process.kill()
                await process.wait()
                raise
        return returncode, time.monotonic() - start, log_path

    async def shutdown(self):
        """Stop this output base's Bazel server, by pid if ``bazel shutdown`` fails."""
        pid_path = os.path.join(self.output_base, "server", "server.pid.txt")
        if not os.path.isdir(self.output_base):
            return
        await self.run("shutdown")
        try:
            with open(pid_path) as stream:
                pid = int(stream.read().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass  # no pid file, or the server is gone already

    def remove(self):
        remove_tree(self.base)


def check_preconditions(spec, settings):
    """Raise ScenarioSkipped unless the build can run: Bazel, the workspace and a bot for ``spec``."""
    if not os.path.isfile(os.path.join(WORKSPACE_SOURCE, "WORKSPACE")):
        raise ScenarioSkipped(f"the Bazel workspace {WORKSPACE_SOURCE} does not exist")
    if shutil.which("bazel") is None:
        raise ScenarioSkipped("bazel is not on PATH: install Debian's bazel-bootstrap (Bazel 4.2.3)")
    if not spec.bot:
        raise ScenarioSkipped(
            spec.no_bot_reason
            or f"server {spec.name} has no bot command (bot=...), so nothing runs its actions"
        )
    if settings.smoke:
        raise ScenarioSkipped("--smoke skips the Bazel build, which takes minutes")


async def build(bench):
    """Time a clean remote build of the workspace and the cached rebuild after ``bazel clean``."""
    check_preconditions(bench.server.spec, bench.settings)
    bench.server.start_bot()
    workspace = BazelWorkspace()
    flags = [
        *BAZEL_BUILD_FLAGS,
        f"--remote_executor=grpc://{bench.server.address}",
        "--spawn_strategy=remote",
        "--noremote_local_fallback",
    ]
    records = []
    try:
        # Start the Bazel server before the clock runs, so the builds do not pay for it.
        await workspace.run("version")
        records.append(await timed_build(bench, workspace, "clean", flags))
        returncode, _, log_path = await workspace.run("clean")
        if returncode != 0:
            raise RuntimeError(f"bazel clean failed with status {returncode}:\n{read_tail(log_path)}")
        records.append(await timed_build(bench, workspace, "cached after bazel clean", flags))
    finally:
        await workspace.shutdown()
        if bench.server.keep_directory:
            print(f"bench: kept the Bazel workspace and its logs in {workspace.base}", file=sys.stderr)
        else:
            workspace.remove()
    return records


async def timed_build(bench, workspace, case, flags):
    """Run one ``bazel build //...`` and return its JSON record."""
    server_cpu_before = bench.monitor.cpu_seconds()
    returncode, seconds, log_path = await workspace.run("build", *flags, "//...")
    server_cpu = bench.monitor.cpu_seconds() - server_cpu_before
    bench.monitor.sample()

    with open(log_path, encoding="utf-8", errors="replace") as stream:
        output = stream.read()
    spawns = count_remote_spawns(output)
    record = {
        "scenario": "build",
        "case": case,
        "server": bench.server.spec.name,
        "ops": spawns,
        "errors": 0 if returncode == 0 else 1,
        "seconds": round(seconds, 3),
        "ops_per_s": round(spawns / seconds, 2) if seconds > 0 else None,
        "mb_per_s": None,
        "p50_ms": None,
        "p99_ms": None,
        "server_cpu_s_per_op": round(server_cpu / spawns, 6) if spawns else None,
        "server_peak_rss_mib": round(bench.monitor.peak_rss_kib / 1024, 1),
        "client_cpu_s_per_op": None,
        "wall_s": round(seconds, 3),
        "server_cpu_s": round(server_cpu, 3),
    }
    if returncode != 0:
        record["first_error"] = (
            f"bazel build exited with status {returncode}. Run with --keep to keep {log_path}"
        )
        record["bazel_output_tail"] = read_tail(log_path, 15)
    return record
