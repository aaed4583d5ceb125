"""Server descriptions, the presets, and the processes the benchmark starts and stops.

A server is described by a command line template. The tool fills in these placeholders
before it runs one: ``{port}`` (a free TCP port on 127.0.0.1), ``{tmp}`` (a new temporary
directory for this start), ``{repo}`` (the repository root) and ``{python}`` (the
interpreter that runs the benchmark). Every process gets the repository root on
PYTHONPATH, so ``twistd`` finds the bgrid plugin and ``python -m bench...`` works.
"""

import asyncio
import dataclasses
import os
import re
import shlex
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

from bench.procstat import descendants
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds a server may take after its start to pass a health check or a capabilities probe.
START_TIMEOUT_SECONDS = 90.0
# Seconds a process gets to exit after SIGTERM before it is sent SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0
# Seconds a cleanup command may run.
CLEANUP_TIMEOUT_SECONDS = 60.0

# Largest gRPC message the benchmark's channels accept: a 4 MiB batch plus digests.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

# bgrid's bot runs the build scenario's actions on bgrid.
BGRID_BOT_COMMAND = (
    "{python} -m bgrid.bot.main --server 127.0.0.1:{port} --work-dir {tmp}/bot "
    "--concurrency 2 --name bench-bot"
)


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to start one server under test.

    ``command`` starts the server in the foreground. ``bot`` (optional) starts a bot that
    runs real actions, for the build scenario, and ``no_bot_reason`` gives the reason why
    a preset has none. ``cleanup`` (optional) runs after the server stopped, for example
    to drop its database.
    """

    name: str
    command: str
    bot: str = ""
    cleanup: str = ""
    no_bot_reason: str = ""


PRESETS = {
    "null": ServerSpec(
        name="null",
        command="{python} -m bench.null_server --listen 127.0.0.1:{port}",
        no_bot_reason="the null server gives bots no work, so it cannot run a build",
    ),
    "bgrid": ServerSpec(
        name="bgrid",
        command=(
            '{python} -c "from twisted.scripts.twistd import run; run()" --nodaemon '
            "--pidfile= --logfile={tmp}/twistd.log bgrid --listen 127.0.0.1:{port} "
            "--data-dir {tmp}/data"
        ),
        bot=BGRID_BOT_COMMAND,
    ),
    # bench/buildgrid/setup.sh installs BuildGrid. start.sh creates its PostgreSQL
    # database and runs `bgd server start` on a copy of bench/buildgrid/config.yml.
    "buildgrid": ServerSpec(
        name="buildgrid",
        command="bash {repo}/bench/buildgrid/start.sh {port} {tmp}",
        cleanup="bash {repo}/bench/buildgrid/start.sh --drop-database",
        no_bot_reason=(
            "no bot works with BuildGrid 0.4.4 here: it ships none (its worker, "
            "buildbox-worker, is a separate C++ program), and it fails bgrid's bot with "
            "INTERNAL because it parses BotSession.version, which the Remote Workers API "
            "defines as the bot's software version, as an integer"
        ),
    ),
}

PRESET_GROUPS = {"all": ["null", "bgrid", "buildgrid"]}

_SPEC_KEYS = ("name", "cmd", "bot", "cleanup")
_SPEC_FIELD_BOUNDARY = re.compile(r",(?=(?:%s)=)" % "|".join(_SPEC_KEYS))


def parse_server_spec(text):
    """Parse ``name=NAME,cmd=COMMAND[,bot=COMMAND][,cleanup=COMMAND]`` into a ServerSpec.

    A field ends only at a comma followed by another known key, so commands may contain
    commas. Raises ValueError naming the problem.
    """
    fields = {}
    for part in _SPEC_FIELD_BOUNDARY.split(text):
        key, separator, value = part.partition("=")
        if not separator or key not in _SPEC_KEYS:
            raise ValueError(
                f"invalid server field {part!r} in {text!r}: expected KEY=VALUE with KEY one "
                f"of {', '.join(_SPEC_KEYS)}"
            )
        if key in fields:
            raise ValueError(f"invalid server description {text!r}: {key} is given twice")
        fields[key] = value
    missing = [key for key in ("name", "cmd") if not fields.get(key)]
    if missing:
        raise ValueError(f"invalid server description {text!r}: missing {' and '.join(missing)}")
    return ServerSpec(
        name=fields["name"],
        command=fields["cmd"],
        bot=fields.get("bot", ""),
        cleanup=fields.get("cleanup", ""),
    )


def expand_presets(names):
    """Return the ServerSpecs of preset or group names such as ``all`` or ``null,bgrid``.

    Raises ValueError for an unknown name.
    """
    specs = []
    for name in names:
        for member in PRESET_GROUPS.get(name, [name]):
            if member not in PRESETS:
                known = ", ".join([*PRESETS, *PRESET_GROUPS])
                raise ValueError(f"unknown preset {member!r}: expected one of {known}")
            specs.append(PRESETS[member])
    return specs


class ServerStartError(Exception):
    """A server exited or did not become ready. The message includes its log."""


def find_free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    # NOTE: another process may take the port before the server binds it; the server
    # then exits and the start reports its log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_tail(path, lines=40):
    """Return the last ``lines`` lines of the file at ``path``, or "" if it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return "".join(stream.readlines()[-lines:])
    except FileNotFoundError:
        return ""


def remove_tree(path):
    """Remove ``path`` even where a build left read-only directories in it."""

    def make_writable_and_retry(function, failed_path, _error):
        os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, stat.S_IRWXU)
        function(failed_path)

    if os.path.exists(path):
        shutil.rmtree(path, onerror=make_writable_and_retry)


def child_environment():
    """Return the environment for servers and bots: ours, with the repository on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, env.get("PYTHONPATH")]))
    return env


class ManagedProcess:
    """A process started by the benchmark, writing its output to a log file."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_environment(),
                cwd=os.path.dirname(log_path),
                # Its own session, so a Ctrl-C meant for the benchmark does not reach it
                # before the benchmark stops it.
                start_new_session=True,
            )

    @property
    def pid(self):
        return self.popen.pid

    def is_running(self):
        return self.popen.poll() is None

    def stop(self):
        """Send SIGTERM to the process, then SIGKILL to whatever of its tree is left.

        Descendants are listed before the signal, because they are re-parented when the
        process ends. Only processes of that list are signalled, each by its pid.
        """
        tree = descendants(self.pid) if self.is_running() else []
        if self.is_running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        leftovers = [pid for pid in tree[1:] if _is_alive(pid)]
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.1)
            leftovers = [pid for pid in leftovers if _is_alive(pid)]
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.popen.returncode


def _is_alive(pid):
    """Return whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stream:
            text = stream.read().decode("ascii", "replace")
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


class Server:
    """One start of a ServerSpec: its temporary directory, port, process and bot."""

    def __init__(self, spec, keep_directory=False):
        self.spec = spec
        self.keep_directory = keep_directory
        self.directory = None
        self.port = None
        self.process = None
        self.bot = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def expand(self, template):
        """Return the argv of a command template with its placeholders filled in."""
        text = (
            template.replace("{port}", str(self.port))
            .replace("{tmp}", self.directory)
            .replace("{repo}", REPOSITORY_ROOT)
            .replace("{python}", shlex.quote(sys.executable))
        )
        return shlex.split(text)

    async def start(self, directory=None):
        """Start the server and wait until it is ready. Raises ServerStartError if it is not.

        ``directory`` is the ``{tmp}`` of the command, by default a new temporary directory.
        Pass the directory of an earlier start, kept with ``keep_directory``, to start
        again on the same data.
        """
        self.directory = directory or tempfile.mkdtemp(prefix=f"bgrid-bench-{self.spec.name}-")
        self.port = find_free_port()
        self.process = ManagedProcess(
            self.spec.name,
            self.expand(self.spec.command),
            os.path.join(self.directory, "server.out"),
        )
        await self.wait_until_ready()

    async def wait_until_ready(self, timeout=START_TIMEOUT_SECONDS):
        """Poll the gRPC health service, or GetCapabilities where it is missing, until one succeeds."""
        deadline = time.monotonic() + timeout
        last_result = "no probe was sent"
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            capabilities = remote_execution_pb2_grpc.CapabilitiesStub(channel)
            while time.monotonic() < deadline:
                if not self.process.is_running():
                    raise ServerStartError(
                        f"server {self.spec.name} exited with status {self.process.popen.returncode} "
                        f"before it answered on {self.address}. Command: "
                        f"{shlex.join(self.process.argv)}\nIts output ({self.process.log_path}):\n"
                        f"{self.log_tail()}"
                    )
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last_result = f"health status {response.status}"
                except grpc.aio.AioRpcError as error:
                    last_result = f"health check: {error.code().name}: {error.details()}"
                    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                        await capabilities.GetCapabilities(re_pb2.GetCapabilitiesRequest(), timeout=5.0)
                        return
                await asyncio.sleep(0.1)
        raise ServerStartError(
            f"server {self.spec.name} was not ready on {self.address} within {timeout:.0f} s "
            f"(last result: {last_result}). Its output:\n{self.log_tail()}"
        )

    def start_bot(self):
        """Start the spec's bot. Raises ValueError if the spec has none."""
        if not self.spec.bot:
            raise ValueError(f"server {self.spec.name} has no bot command")
        self.bot = ManagedProcess(
            f"{self.spec.name} bot", self.expand(self.spec.bot), os.path.join(self.directory, "bot.out")
        )

    def log_tail(self, lines=40):
        text = read_tail(self.process.log_path, lines) if self.process else ""
        twistd_log = os.path.join(self.directory or "", "twistd.log")
        if os.path.exists(twistd_log):
            text += f"\n--- twistd.log ---\n{read_tail(twistd_log, lines)}"
        return text

    def stop(self):
        """Stop the bot and the server by pid, run the cleanup command and remove the directory.

        Returns the problems found (cleanup failures) as a list of messages.
        """
        problems = []
        if self.bot is not None:
            self.bot.stop()
        if self.process is not None:
            self.process.stop()
        if self.spec.cleanup:
            argv = self.expand(self.spec.cleanup)
            try:
                completed = subprocess.run(
                    argv, env=child_environment(), capture_output=True, text=True,
                    timeout=CLEANUP_TIMEOUT_SECONDS,
                )
            except subprocess.TimeoutExpired:
                problems.append(f"cleanup command {shlex.join(argv)} timed out")
            else:
                if completed.returncode != 0:
                    problems.append(
                        f"cleanup command {shlex.join(argv)} failed with status "
                        f"{completed.returncode}: {completed.stderr.strip()}"
                    )
        if self.directory and not self.keep_directory:
            remove_tree(self.directory)
        return problems
