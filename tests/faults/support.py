"""What the fault-injection tests share: a grid whose processes they can kill, stop and
restart, a view of processes in /proc, REAPI calls, and Bazel's gRPC log.

The daemon and the bots are those of the end-to-end harness: ``twistd bgrid`` and
``python -m bgrid bot`` under ``harness.ManagedProcess``. ``FaultGrid`` adds daemon
options, a restart on the same port and data directory, and bots started one at a time.
"""

import asyncio
import dataclasses
import inspect
import os
import re
import signal
import time
import uuid

import grpc
from google.longrunning import operations_grpc_pb2, operations_pb2
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_pb2_grpc,
)
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from bgrid.bridge import as_deferred
from bgrid.client import CasClient, open_channel
from bgrid.digest import EMPTY_DIGEST, Digest
from tests.cli.support import bgrid_environment
from tests.e2e import harness

# Seconds a test waits for something that normally happens within a second or two, such as
# a bot picking up a job. Only a failing test waits this long.
EVENT_TIMEOUT = 30.0

# Seconds between two checks of a condition that a test waits for.
POLL_INTERVAL = 0.05

# twistd ends itself with the signal that stopped it, and a process signalled before its
# reactor runs dies of the signal, so -SIGTERM is a clean exit, as 0 is.
CLEAN_EXIT_STATUSES = {0, -signal.SIGTERM}

# Deadline in seconds of one unary call from a test.
CALL_TIMEOUT = 10.0


async def wait_for(condition, timeout, description):
    """Call ``condition`` every POLL_INTERVAL seconds until it returns a true value; return it.

    ``condition`` may also be a coroutine function, whose result is awaited. Raises
    AssertionError naming ``description`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} seconds waiting for {description}")
        await asyncio.sleep(POLL_INTERVAL)


# --- The grid ----------------------------------------------------------------------------


class FaultGrid(harness.Grid):
    """A daemon with extra options, restartable on one port and data directory, and bots.

    All daemon runs append to one log file, ``daemon.log``. Processes that a test ends with
    ``kill`` are remembered, so that ``unclean_exits`` leaves them out.
    """

    def __init__(self, base_dir, daemon_options=()):
        super().__init__(base_dir, bot_count=0)
        self.daemon_options = list(daemon_options)
        self.data_dir = os.path.join(base_dir, "data")
        self.daemon_log_path = os.path.join(base_dir, "daemon.log")
        self.earlier_daemons = []
        self.killed = set()

    def start(self):
        self.start_daemon()

    def start_daemon(self):
        """Start the daemon, on the grid's port and data directory if it ran before.

        Blocks until the daemon reports SERVING; raises RuntimeError with the end of every
        log when it exits first or does not serve within ``harness.SERVER_START_TIMEOUT``.
        """
        if self.daemon is not None:
            if self.daemon.is_running():
                raise RuntimeError(f"the daemon (pid {self.daemon.pid}) is still running")
            self.earlier_daemons.append(self.daemon)
        if self.port is None:
            self.port = harness.find_free_port()
        os.makedirs(self.data_dir, exist_ok=True)
        run = len(self.earlier_daemons) + 1
        argv = harness.daemon_command(self.port, self.data_dir, self.daemon_log_path)
        self.daemon = harness.ManagedProcess(
            f"bgrid daemon (run {run})",
            argv + self.daemon_options,
            os.path.join(self.base_dir, f"daemon-{run}.stdout"),
            env=bgrid_environment(),
            cwd=self.base_dir,
        )
        try:
            harness.wait_for_health(self.address, self.daemon)
        except RuntimeError as error:
            raise RuntimeError(f"{error}\n{self.log_excerpt()}") from None

    def start_bot(self, name, concurrency=1, properties=()):
        """Start a bot process named ``name`` with its own work directory; return it.

        ``properties`` are the platform properties it offers, as ``NAME=VALUE`` strings.
        """
        work_dir = os.path.join(self.base_dir, name)
        os.makedirs(work_dir, exist_ok=True)
        argv = harness.bot_command(self.address, work_dir, concurrency, name)
        for prop in properties:
            argv += ["--property", prop]
        bot = harness.ManagedProcess(
            f"bgrid {name}",
            argv,
            os.path.join(self.base_dir, f"{name}.log"),
            env=bgrid_environment(),
            cwd=self.base_dir,
        )
        self.bots.append(bot)
        return bot

    def kill(self, process):
        """Send SIGKILL to ``process``, wait for it and return its exit status."""
        self.killed.add(process.name)
        process.popen.send_signal(signal.SIGKILL)
        return process.popen.wait()

    def unclean_exits(self, statuses):
        """Return ``{name: status}`` of the stopped processes whose exit was not clean."""
        return {
            name: status
            for name, status in statuses.items()
            if name not in self.killed and status not in CLEAN_EXIT_STATUSES
        }

    def daemon_log(self):
        return harness.read_text(self.daemon_log_path)

    def logs(self):
        logs = super().logs()
        for process in self.earlier_daemons:
            logs[f"{process.name} stdout"] = process.log_text()
        return logs


class FaultTestCase(unittest.TestCase):
    """A test with a daemon started from ``daemon_options`` and no bot yet.

    Afterwards every process still running gets SIGTERM, and the test fails if one of them
    exits uncleanly or any log shows a traceback or an error-level event. Processes the test
    killed on purpose are exempt from the exit check.
    """

    daemon_options = ()

    # Regular expressions of error-level log lines that the check after the test accepts.
    # Each stands for a known bug that another test reproduces on every run.
    tolerated_log_errors = ()

    def setUp(self):
        self.base_dir = harness.make_base_dir(self)
        self.grid = FaultGrid(os.path.join(self.base_dir, "grid"), self.daemon_options)
        os.makedirs(self.grid.base_dir)
        self.addCleanup(self.stop_grid_and_check_logs)
        self.grid.start_daemon()

    def stop_grid_and_check_logs(self):
        statuses = self.grid.stop()
        self.assertEqual(
            self.grid.unclean_exits(statuses),
            {},
            f"processes that did not exit cleanly on SIGTERM\n{self.grid.log_excerpt()}",
        )
        problems = self.untolerated_problems()
        if problems:
            details = "\n".join(f"--- {name} ---\n{excerpt}" for name, excerpt in problems.items())
            self.fail(f"bgrid logged a traceback or an error:\n{details}")

    def untolerated_problems(self):
        """Return ``grid.problems()`` without the error lines that ``tolerated_log_errors``
        match. A traceback is always kept."""
        problems = {}
        for name, excerpt in self.grid.problems().items():
            if harness.TRACEBACK_MARKER not in excerpt:
                lines = [
                    line
                    for line in excerpt.splitlines()
                    if not any(re.search(pattern, line) for pattern in self.tolerated_log_errors)
                ]
                excerpt = "\n".join(lines)
            if excerpt:
                problems[name] = excerpt
        return problems

    def open_channel(self):
        """Open a grpc.aio channel to the daemon, closed when the test ends.

        Call it on the running event loop, inside an ``async_test``. The channel reconnects
        by itself after the daemon restarts on the same port.
        """
        channel = open_channel(self.grid.address)
        self.addCleanup(lambda: as_deferred(channel.close()))
        return channel

    def assert_running(self, *processes):
        for process in processes:
            self.assertTrue(
                process.is_running(),
                f"{process.name} exited with status {process.popen.returncode}\n"
                f"{self.grid.log_excerpt()}",
            )


# --- Processes in /proc ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """One process as /proc/PID/stat shows it. ``start_time`` (clock ticks after boot)
    distinguishes it from a later process that reuses its pid."""

    pid: int
    parent_pid: int
    process_group: int
    session: int
    state: str
    start_time: int
    command: str


def read_process(pid):
    """Return the ProcessInfo of ``pid``, or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stream:
            stat = stream.read()
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            command = stream.read().replace(b"\0", b" ").decode("utf-8", errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name in parentheses may contain spaces and parentheses, so the fields
    # are counted from the last ")". See proc(5) for their order.
    fields = stat[stat.rindex(")") + 2 :].split()
    return ProcessInfo(
        pid=pid,
        parent_pid=int(fields[1]),
        process_group=int(fields[2]),
        session=int(fields[3]),
        state=fields[0],
        start_time=int(fields[19]),
        command=command,
    )


def list_processes():
    """Return ``{pid: ProcessInfo}`` of every process visible in /proc."""
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = read_process(int(entry))
            if info is not None:
                processes[info.pid] = info
    return processes


def descendants(pid):
    """Return the ProcessInfo of every living child, grandchild and so on of ``pid``."""
    children_by_parent = {}
    for info in list_processes().values():
        children_by_parent.setdefault(info.parent_pid, []).append(info)
    found = []
    pending = [pid]
    while pending:
        for child in children_by_parent.get(pending.pop(), []):
            if child.state != "Z":
                found.append(child)
                pending.append(child.pid)
    return found


def is_alive(info):
    """Return whether the process that ``info`` recorded still runs.

    A zombie counts as gone: it has exited, and only its parent has not reaped it yet.
    """
    current = read_process(info.pid)
    return current is not None and current.start_time == info.start_time and current.state != "Z"


def survivors(processes):
    """Return the processes of ``processes`` that still run."""
    return [info for info in processes if is_alive(info)]


def kill_survivors(processes):
    """Send SIGKILL to each of ``processes`` that still runs, so a failed test leaves none."""
    for info in survivors(processes):
        try:
            os.kill(info.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def group_members(process_group):
    """Return every living process whose process group is ``process_group``."""
    return [
        info
        for info in list_processes().values()
        if info.process_group == process_group and info.state != "Z"
    ]


def action_processes(bot, program):
    """Return the processes a bot runs for its actions once one of them runs ``program``.

    Returns an empty list while no descendant of the bot process has ``program`` as its
    first argument, so that ``wait_for`` can poll it.
    """
    found = descendants(bot.pid)
    if any(info.command.split(" ", 1)[0] == program for info in found):
        return found
    return []


# --- REAPI calls -------------------------------------------------------------------------


async def upload_action(cas, arguments, output_paths=(), timeout_seconds=None, platform=()):
    """Upload an Action running ``arguments`` on an empty input root; return its Digest.

    ``timeout_seconds`` sets ``Action.timeout``. ``platform`` contains the ``(name, value)``
    pairs that a bot must offer.
    """
    command = re_pb2.Command(arguments=list(arguments), output_paths=sorted(output_paths))
    for name, value in sorted(platform):
        command.platform.properties.add(name=name, value=value)
    command_data = command.SerializeToString()
    action = re_pb2.Action(
        command_digest=Digest.of(command_data).to_proto(re_pb2.Digest),
        # The empty Directory message serializes to the empty blob.
        input_root_digest=EMPTY_DIGEST.to_proto(re_pb2.Digest),
        platform=command.platform,
    )
    if timeout_seconds is not None:
        action.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout_seconds))
    action_data = action.SerializeToString()
    action_digest = Digest.of(action_data)
    await cas.upload_missing(
        blobs={Digest.of(command_data): command_data, action_digest: action_data}
    )
    return action_digest


async def submit(channel, action_digest):
    """Call Execute, read the first Operation and return its name.

    The client then drops the stream. The operation goes on without it.
    """
    execution = re_pb2_grpc.ExecutionStub(channel)
    call = execution.Execute(
        re_pb2.ExecuteRequest(action_digest=action_digest.to_proto(re_pb2.Digest)),
        timeout=CALL_TIMEOUT,
    )
    try:
        first = await call.read()
    finally:
        call.cancel()
    if first is grpc.aio.EOF:
        raise AssertionError(f"Execute of action {action_digest} ended without an Operation")
    return first.name


async def wait_until_done(channel, name, timeout):
    """Follow operation ``name`` with WaitExecution and return it once it is done.

    A stream that ends or fails with UNAVAILABLE, as while the daemon restarts, is opened
    again. Raises AssertionError when ``timeout`` seconds pass first.
    """
    execution = re_pb2_grpc.ExecutionStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"operation {name} was not done within {timeout} seconds")
        call = execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name), timeout=remaining)
        try:
            async for operation in call:
                if operation.done:
                    return operation
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            await asyncio.sleep(POLL_INTERVAL)


async def get_operation(channel, name):
    operations = operations_grpc_pb2.OperationsStub(channel)
    return await operations.GetOperation(
        operations_pb2.GetOperationRequest(name=name), timeout=CALL_TIMEOUT
    )


def execute_response(operation):
    """Return the ExecuteResponse of a done Operation; raise AssertionError without one."""
    response = re_pb2.ExecuteResponse()
    if operation.WhichOneof("result") != "response" or not operation.response.Unpack(response):
        raise AssertionError(f"operation {operation.name} has no ExecuteResponse: {operation}")
    return response


def stage_of(operation):
    """Return the ExecutionStage value of an Operation's ExecuteOperationMetadata."""
    metadata = re_pb2.ExecuteOperationMetadata()
    if not operation.metadata.Unpack(metadata):
        raise AssertionError(f"operation {operation.name} has no ExecuteOperationMetadata")
    return metadata.stage


async def get_action_result(channel, action_digest):
    """Return the cached ActionResult of ``action_digest``; raise AioRpcError without one."""
    action_cache = re_pb2_grpc.ActionCacheStub(channel)
    return await action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=action_digest.to_proto(re_pb2.Digest)),
        timeout=CALL_TIMEOUT,
    )


async def action_cache_code(channel, action_digest):
    """Return the status code of GetActionResult for ``action_digest``, such as NOT_FOUND."""
    try:
        await get_action_result(channel, action_digest)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


class StreamedUpload:
    """A ByteStream Write of one blob in ``chunk_bytes`` requests, which a test can watch
    and hold at a byte offset.

    ``sent_bytes`` counts the bytes handed to gRPC so far, and ``finish_sent`` turns true
    when the request with ``finish_write`` is handed over, which may be before the server
    receives it.
    """

    def __init__(self, channel, data, chunk_bytes=256 * 1024, hold_at=None):
        self.data = data
        self.digest = Digest.of(data)
        self.resource_name = CasClient(channel).upload_resource_name(self.digest)
        self.chunk_bytes = chunk_bytes
        self.sent_bytes = 0
        self.finish_sent = False
        # The stream stops before sending more than ``hold_at`` bytes until ``release()``.
        self.hold_at = hold_at
        self._released = asyncio.Event()
        self._abandoned = False
        self._bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)

    def release(self):
        """Let a held stream send the rest of the blob."""
        self._released.set()

    def abandon(self):
        """End the stream's requests without sending more, as after the call failed, so
        that gRPC's task that reads them ends too."""
        self._abandoned = True
        self._released.set()

    async def _requests(self):
        offset = 0
        while True:
            if self.hold_at is not None and offset >= self.hold_at:
                await self._released.wait()
            if self._abandoned:
                return
            end = min(offset + self.chunk_bytes, len(self.data))
            if self.hold_at is not None and offset < self.hold_at:
                end = min(end, self.hold_at)
            finish = end == len(self.data)
            self.finish_sent = finish
            self.sent_bytes = end
            yield bytestream_pb2.WriteRequest(
                resource_name=self.resource_name if offset == 0 else "",
                write_offset=offset,
                finish_write=finish,
                data=self.data[offset:end],
            )
            offset = end
            if finish:
                return

    async def run(self):
        """Send the blob and return the WriteResponse; raise AioRpcError when the call fails."""
        return await self._bytestream.Write(self._requests())


def write_blob_blocking(address, data, chunk_bytes=256 * 1024):
    """Write one blob through ByteStream with gRPC's blocking API and return the call's
    ``(grpc.StatusCode, details)``. Call it in a thread from async code.

    grpc.aio 1.85 may report INTERNAL "Internal error from Core" in place of the server's
    status when the server ends a Write while the client is still sending. The blocking
    API reports the server's status, so tests that check why an upload was rejected use it.
    """
    digest = Digest.of(data)
    resource_name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

    def requests():
        for offset in range(0, len(data), chunk_bytes):
            end = min(offset + chunk_bytes, len(data))
            yield bytestream_pb2.WriteRequest(
                resource_name=resource_name if offset == 0 else "",
                write_offset=offset,
                finish_write=end == len(data),
                data=data[offset:end],
            )

    with grpc.insecure_channel(address) as channel:
        bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        try:
            response = bytestream.Write(requests(), timeout=CALL_TIMEOUT * 6)
        except grpc.RpcError as error:
            return error.code(), error.details()
    if response.committed_size != len(data):
        raise AssertionError(
            f"Write of {digest} committed {response.committed_size} bytes, expected {len(data)}"
        )
    return grpc.StatusCode.OK, ""


async def committed_size(channel, upload):
    """Return the bytes of ``upload`` that the server reports committed (QueryWriteStatus),
    0 while the server has not seen its first request."""
    bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
    try:
        response = await bytestream.QueryWriteStatus(
            bytestream_pb2.QueryWriteStatusRequest(resource_name=upload.resource_name),
            timeout=CALL_TIMEOUT,
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    return response.committed_size


async def read_bytestream_code(channel, digest):
    """Return the status code of a ByteStream Read of ``digest``, reading it to the end."""
    bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
    call = bytestream.Read(
        bytestream_pb2.ReadRequest(resource_name=CasClient(channel).read_resource_name(digest)),
        timeout=CALL_TIMEOUT,
    )
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def health_status(channel):
    """Return the gRPC health status of the server as a ``HealthCheckResponse`` enum value."""
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    return response.status


# --- Bazel's gRPC log --------------------------------------------------------------------


def _build_log_entry_class():
    """Return a message class for the fields of Bazel's ``remote_logging.LogEntry`` that the
    tests read: ``status`` (2) and ``method_name`` (3).

    The field numbers are those of src/main/protobuf/remote_execution_log.proto in Bazel,
    unchanged from 4.2 on. Other fields are kept as unknown fields.
    """
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(status_pb2.DESCRIPTOR.serialized_pb)
    proto_file = descriptor_pb2.FileDescriptorProto(
        name="tests/faults/bazel_remote_execution_log.proto",
        package="tests.faults",
        syntax="proto3",
        dependency=[status_pb2.DESCRIPTOR.name],
    )
    entry = proto_file.message_type.add(name="LogEntry")
    entry.field.add(
        name="status",
        number=2,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        type_name=".google.rpc.Status",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    entry.field.add(
        name="method_name",
        number=3,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool.Add(proto_file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tests.faults.LogEntry"))


def _read_varint(data, position):
    value = 0
    shift = 0
    while True:
        if position >= len(data):
            raise ValueError("Bazel's gRPC log ends inside a length prefix")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def read_bazel_grpc_log(path):
    """Return ``[(method name, status code number)]`` for each call in a log that Bazel
    wrote with ``--experimental_remote_grpc_log``: LogEntry messages, each after its length
    as a varint."""
    log_entry_class = _build_log_entry_class()
    with open(path, "rb") as stream:
        data = stream.read()
    calls = []
    position = 0
    while position < len(data):
        length, position = _read_varint(data, position)
        entry = log_entry_class.FromString(data[position : position + length])
        position += length
        calls.append((entry.method_name, entry.status.code))
    return calls
