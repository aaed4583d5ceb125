"""Processes for the end-to-end tests: a bgrid daemon, bot processes and Bazel runs.

Everything here blocks: the tests drive real subprocesses and wait for them, so no
Twisted code runs in the test process while Bazel works.
"""

import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.trial.unittest import SkipTest

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKSPACE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workspace")

# Seconds the daemon gets to report SERVING to a gRPC health check after it starts.
SERVER_START_TIMEOUT = 30.0
# Seconds a process gets to exit after SIGTERM before it is sent SIGKILL.
PROCESS_STOP_TIMEOUT = 15.0
# Seconds one Bazel command may take before the test kills its client and fails.
BAZEL_COMMAND_TIMEOUT = 300.0

TRACEBACK_MARKER = "Traceback (most recent call last)"
# Set BGRID_E2E_KEEP_TEMP=1 to keep each test's temporary directory, with the daemon,
# bot and Bazel logs and the output base, for inspection after the run.
KEEP_TEMP = bool(os.environ.get("BGRID_E2E_KEEP_TEMP"))
ERROR_EVENT_PATTERN = re.compile(r"#(error|critical)\]")


# --- Command lines -----------------------------------------------------------------------
# All option names of bgrid's daemon and bot, and all Bazel flags, are set here.


def daemon_command(port, data_dir, log_path):
    """Return the argv that runs the bgrid daemon in the foreground on 127.0.0.1:``port``.

    twistd has no ``python -m`` entry point, so its ``run()`` is called with this interpreter.
    """
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        f"--logfile={log_path}",
        "bgrid",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        data_dir,
        "--local-bots",
        "0",
    ]


def bot_command(server_address, work_dir, concurrency, name):
    """Return the argv of a bot process that takes work from the server at ``server_address``."""
    return [
        sys.executable,
        "-m",
        "bgrid",
        "bot",
        "--server",
        server_address,
        "--work-dir",
        work_dir,
        "--concurrency",
        str(concurrency),
        "--name",
        name,
    ]


def bazel_startup_options(output_base):
    """Return the options placed before the Bazel command.

    /etc/bazel/bazelrc stays in effect because Debian's bazel-bootstrap sets its install
    base there. ``--max_idle_secs`` ends a server that a crashed test leaves behind.
    """
    return [
        "--nohome_rc",
        "--host_jvm_args=-Xmx2g",
        f"--output_base={output_base}",
        "--max_idle_secs=300",
    ]


# Flags for every build and test. Downloads are disabled so a missing stand-in repository
# fails loudly instead of reaching the network. The fixed PATH of the strict action env
# keeps action keys equal between runs. Convenience symlinks are turned off because a
# stale bazel-<workspace> link from another output base is read as a package by //...
BAZEL_COMMON_FLAGS = [
    "--experimental_repository_disable_download",
    "--repository_cache=",
    "--nosandbox_debug",
    "--incompatible_strict_action_env",
    "--symlink_prefix=/",
    "--color=no",
    "--curses=no",
]


def remote_cache_flags(server_address):
    """Return the flags that run actions locally and share results through bgrid's cache."""
    return [
        f"--remote_cache=grpc://{server_address}",
        "--remote_upload_local_results",
    ]


def remote_execution_flags(server_address):
    """Return the flags that run every action on bgrid, with no local fallback."""
    return [
        f"--remote_executor=grpc://{server_address}",
        "--spawn_strategy=remote",
        "--noremote_local_fallback",
    ]


# --- Preconditions -----------------------------------------------------------------------


def skip_unless_available(needs_bots):
    """Raise SkipTest unless Bazel and the bgrid entry points that a test needs exist."""
    if shutil.which("bazel") is None:
        raise SkipTest(
            "bazel is not installed: install Debian's bazel-bootstrap package "
            "(Bazel 4.2.3) to run the end-to-end tests"
        )
    entry_points = [("bgrid.tap", "daemon")]
    if needs_bots:
        entry_points.append(("bgrid.bot.main", "bot"))
    for module, role in entry_points:
        if importlib.util.find_spec(module) is None:
            raise SkipTest(f"the bgrid {role} entry point {module} does not exist yet")


# --- Processes ---------------------------------------------------------------------------


def find_free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    # NOTE: another process may take the port before the daemon binds it. The daemon then
    # exits, and Grid.start raises with its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_text(path):
    """Return the text of ``path``, or an empty string if it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read()
    except FileNotFoundError:
        return ""


def tail(text, lines=60):
    """Return the last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A subprocess started by a test, with its output written to a log file."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
            )

    @property
    def pid(self):
        return self.popen.pid

    def is_running(self):
        return self.popen.poll() is None

    def stop(self, timeout=PROCESS_STOP_TIMEOUT):
        """Send SIGTERM, then SIGKILL if the process is still running after ``timeout`` seconds.

        Returns the exit status as ``Popen.returncode`` reports it.
        """
        if self.is_running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode

    def log_text(self):
        return read_text(self.log_path)


def wait_for_health(address, process, timeout=SERVER_START_TIMEOUT):
    """Poll the gRPC health service at ``address`` until it reports SERVING.

    Raises RuntimeError if ``process`` exits first or if ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    last_error = "no health check was sent"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not process.is_running():
                raise RuntimeError(
                    f"{process.name} exited with status {process.popen.returncode} before it "
                    f"served gRPC health checks on {address}"
                )
            try:
                response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.RpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
            else:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}"
            time.sleep(0.1)
    raise RuntimeError(
        f"{process.name} did not report SERVING on {address} within {timeout} seconds "
        f"(last result: {last_error})"
    )


class Grid:
    """A bgrid daemon on a free loopback port and bot processes connected to it."""

    def __init__(self, base_dir, bot_count=2, bot_concurrency=2):
        self.base_dir = base_dir
        self.bot_count = bot_count
        self.bot_concurrency = bot_concurrency
        self.port = None
        self.daemon = None
        self.bots = []

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def start(self):
        """Start the daemon, wait until it is healthy, then start the bots."""
        env = dict(os.environ)
        # twistd finds the bgrid plugin under twisted/plugins/ of the repository.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, env.get("PYTHONPATH")]))
        self.port = find_free_port()
        data_dir = os.path.join(self.base_dir, "data")
        os.makedirs(data_dir, exist_ok=True)
        self.daemon = ManagedProcess(
            "bgrid daemon",
            daemon_command(self.port, data_dir, os.path.join(self.base_dir, "daemon.log")),
            os.path.join(self.base_dir, "daemon.stdout"),
            env=env,
            cwd=self.base_dir,
        )
        try:
            wait_for_health(self.address, self.daemon)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{self.log_excerpt()}") from None
        for index in range(self.bot_count):
            name = f"bot-{index}"
            work_dir = os.path.join(self.base_dir, name)
            os.makedirs(work_dir)
            self.bots.append(
                ManagedProcess(
                    f"bgrid {name}",
                    bot_command(self.address, work_dir, self.bot_concurrency, name),
                    os.path.join(self.base_dir, f"bot-{index}.log"),
                    env=env,
                    cwd=self.base_dir,
                )
            )

    def exited_processes(self):
        """Return a description of every daemon or bot process that is no longer running."""
        processes = [self.daemon, *self.bots] if self.daemon is not None else list(self.bots)
        return [
            f"{process.name} (pid {process.pid}) exited with status {process.popen.returncode}"
            for process in processes
            if not process.is_running()
        ]

    def stop(self):
        """Stop the bots, then the daemon; return ``{name: exit status}`` of each process.

        A process that needed SIGKILL has the status ``-signal.SIGKILL``.
        """
        statuses = {}
        for process in [*self.bots, self.daemon]:
            if process is not None:
                statuses[process.name] = process.stop()
        return statuses

    def logs(self):
        """Return ``{name: text}`` for the daemon log, its stdout and every bot log."""
        logs = {}
        if self.daemon is not None:
            logs["daemon log"] = read_text(os.path.join(self.base_dir, "daemon.log"))
            logs["daemon stdout"] = self.daemon.log_text()
        for bot in self.bots:
            logs[bot.name] = bot.log_text()
        return logs

    def log_excerpt(self, lines=40):
        """Return the last lines of every log, for failure messages."""
        return "\n".join(
            f"--- {name} (last {lines} lines) ---\n{tail(text, lines)}" for name, text in self.logs().items()
        )

    def problems(self):
        """Return ``{name: excerpt}`` for every log with a Python traceback or an error-level event.

        twisted.logger's text format puts the level after the namespace, as in
        ``[bgrid.server#error]``.
        """
        found = {}
        for name, text in self.logs().items():
            position = text.find(TRACEBACK_MARKER)
            if position >= 0:
                found[name] = text[max(0, position - 500) : position + 3000]
                continue
            error_lines = [line for line in text.splitlines() if ERROR_EVENT_PATTERN.search(line)]
            if error_lines:
                found[name] = "\n".join(error_lines[:20])
        return found


# --- Bazel -------------------------------------------------------------------------------


@dataclasses.dataclass
class BazelResult:
    """The exit code and combined stdout and stderr of one Bazel command."""

    argv: list
    returncode: int
    output: str


_SUMMARY_PATTERN = re.compile(r"^INFO: (\d+) process(?:es)?(?::(.*))?\.$", re.MULTILINE)
_SUMMARY_PART_PATTERN = re.compile(r"(\d+) (.+)")


def parse_process_summary(output):
    """Return ``{strategy: count}`` from the last process summary line in Bazel's output.

    Bazel 4.2 prints a line such as ``INFO: 56 processes: 28 internal, 28 remote.``, and
    the returned dict stores its total under the key ``"total"``. Raises ValueError if
    there is no such line.
    """
    matches = list(_SUMMARY_PATTERN.finditer(output))
    if not matches:
        raise ValueError("Bazel's output contains no 'INFO: N processes: ...' summary line")
    last = matches[-1]
    counts = {"total": int(last.group(1))}
    for part in (last.group(2) or "").split(","):
        part = part.strip()
        if not part:
            continue
        match = _SUMMARY_PART_PATTERN.fullmatch(part)
        if match is None:
            raise ValueError(f"invalid part {part!r} in Bazel's process summary {last.group(0)!r}")
        counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(1))
    return counts


def spawn_counts(summary):
    """Return the summary without the total and the ``internal`` actions, which are no spawns."""
    return {strategy: count for strategy, count in summary.items() if strategy not in ("total", "internal")}


def make_writable_and_remove(path):
    """Remove a tree that Bazel left read-only."""
    if not os.path.exists(path):
        return
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                os.chmod(child, stat.S_IRWXU)
    os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


class BazelWorkspace:
    """A copy of the test workspace with its own Bazel output base and server."""

    def __init__(self, base_dir):
        self.workspace = os.path.join(base_dir, "workspace")
        self.output_base = os.path.join(base_dir, "output_base")
        self.log_dir = os.path.join(base_dir, "bazel-logs")
        shutil.copytree(WORKSPACE_SOURCE, self.workspace, symlinks=True)
        os.makedirs(self.log_dir)
        self.command_count = 0

    def run(self, command, *arguments):
        """Run ``bazel COMMAND ARGUMENTS...`` in the workspace and return a BazelResult.

        The output is also written to a numbered file in ``log_dir``.
        """
        argv = ["bazel", *bazel_startup_options(self.output_base), command, *arguments]
        self.command_count += 1
        log_path = os.path.join(self.log_dir, f"{self.command_count:02d}-{command}.log")
        with open(log_path, "wb") as log_file:
            completed = subprocess.run(
                argv,
                cwd=self.workspace,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                timeout=BAZEL_COMMAND_TIMEOUT,
            )
        return BazelResult(argv, completed.returncode, read_text(log_path))

    def bazel_bin(self, *flags):
        """Return the bazel-bin directory for the configuration that ``flags`` select."""
        result = self.run("info", *flags, "bazel-bin")
        if result.returncode != 0:
            raise RuntimeError(f"bazel info bazel-bin failed:\n{tail(result.output)}")
        return result.output.strip().splitlines()[-1]

    def shutdown(self):
        """Stop this workspace's Bazel server, and kill it by pid if ``bazel shutdown`` fails."""
        pid_text = read_text(os.path.join(self.output_base, "server", "server.pid.txt")).strip()
        if not pid_text.isdigit():
            return
        try:
            if self.run("shutdown").returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        # Kill the pid only while it is still a Bazel server of this output base, so a
        # reused pid is left alone.
        if self.output_base in read_text(f"/proc/{pid_text}/cmdline"):
            try:
                os.kill(int(pid_text), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self):
        make_writable_and_remove(self.output_base)


def snapshot_outputs(directory):
    """Return ``{relative path: description}`` for everything under ``directory``.

    A regular file is described by its SHA-256 and whether it is executable, a symlink by
    its target. Directories appear only through their contents.
    """
    snapshot = {}
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if os.path.islink(path):
                snapshot[relative] = f"symlink to {os.readlink(path)}"
            elif os.path.isfile(path):
                digest = hashlib.sha256()
                with open(path, "rb") as stream:
                    for block in iter(lambda: stream.read(1 << 20), b""):
                        digest.update(block)
                executable = "executable" if os.access(path, os.X_OK) else "not executable"
                snapshot[relative] = f"sha256 {digest.hexdigest()}, {executable}"
    return snapshot


def make_base_dir(test_case):
    """Create a short temporary directory for one test, removed when the test ends.

    The path stays short because Bazel's server socket lives under the output base. With
    KEEP_TEMP the directory stays, and its path is printed.
    """
    path = tempfile.mkdtemp(prefix="bgrid-e2e-")
    if KEEP_TEMP:
        print(f"keeping {path} for {test_case.id()}")
    else:
        test_case.addCleanup(make_writable_and_remove, path)
    return path
