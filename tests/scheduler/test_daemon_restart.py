"""A test of the real daemon: an acknowledged Execute survives ``kill -9`` and a restart.

The daemon runs as ``twistd -n --pidfile= bgrid`` in a subprocess on a free loopback port,
and the test talks to it through a grpc.aio client. No bot runs, so the job stays queued.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from google.longrunning import operations_grpc_pb2, operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc as re_pb2_grpc,
)
from bgrid.digest import Digest
from tests.util import async_test, make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds the daemon gets to report SERVING to a gRPC health check after it starts.
START_TIMEOUT = 30.0
# Seconds the daemon gets to exit after SIGTERM at the end of the test.
STOP_TIMEOUT = 15.0
# Seconds one gRPC call of the test may take.
CALL_TIMEOUT = 10.0


class DaemonExited(Exception):
    """The daemon exited before it served gRPC health checks."""


def find_free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path, lines=30):
    """Return the last ``lines`` lines of the file at ``path``, or "" if it is missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            return "\n".join(stream.read().splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class Daemon:
    """One bgrid daemon process at a time on ``data_dir``, logging into ``log_dir``."""

    def __init__(self, data_dir, log_dir):
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.process = None
        self.address = None
        self.runs = 0

    @property
    def log_path(self):
        return os.path.join(self.log_dir, f"daemon-{self.runs}.log")

    async def start(self):
        """Start the daemon on a new free port and wait until it reports SERVING.

        Raises DaemonExited with the end of its log when it exits first, and TimeoutError
        when it does not serve within START_TIMEOUT seconds.
        """
        self.runs += 1
        port = find_free_port()
        self.address = f"127.0.0.1:{port}"
        env = dict(os.environ)
        # twistd finds the bgrid plugin under twisted/plugins/ of the repository.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, env.get("PYTHONPATH")]))
        argv = [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path}",
            "bgrid",
            "--listen",
            self.address,
            "--data-dir",
            self.data_dir,
        ]
        with open(self.log_path + ".stdout", "wb") as output:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env=env, cwd=self.log_dir,
            )
        await self._wait_serving()

    async def _wait_serving(self):
        deadline = time.monotonic() + START_TIMEOUT
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise DaemonExited(
                        f"the daemon exited with status {self.process.returncode}. "
                        f"End of its log:\n{tail(self.log_path)}\n{tail(self.log_path + '.stdout')}"
                    )
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                except grpc.aio.AioRpcError:
                    response = None
                if response is not None and response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                await asyncio.sleep(0.1)
        raise TimeoutError(
            f"the daemon did not report SERVING on {self.address} within {START_TIMEOUT} "
            f"seconds. End of its log:\n{tail(self.log_path)}"
        )

    def kill(self):
        """Send SIGKILL and return the exit status."""
        self.process.send_signal(signal.SIGKILL)
        return self.process.wait()

    def stop(self):
        """Send SIGTERM, then SIGKILL if the daemon has not exited after STOP_TIMEOUT."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


async def upload_action(channel):
    """Upload an Action, its Command and an empty input root; return the Action's digest."""
    command = re_pb2.Command(arguments=["true"])
    command_data = command.SerializeToString()
    root_data = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(
        command_digest=Digest.of(command_data).to_proto(re_pb2.Digest),
        input_root_digest=Digest.of(root_data).to_proto(re_pb2.Digest),
    )
    action_data = action.SerializeToString()
    request = re_pb2.BatchUpdateBlobsRequest()
    for data in (command_data, root_data, action_data):
        request.requests.add(digest=Digest.of(data).to_proto(re_pb2.Digest), data=data)
    cas = re_pb2_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchUpdateBlobs(request, timeout=CALL_TIMEOUT)
    for blob in response.responses:
        if blob.status.code != 0:
            raise AssertionError(f"upload of {blob.digest.hash} failed: {blob.status.message}")
    return Digest.of(action_data).to_proto(re_pb2.Digest)


def stage_of(operation):
    metadata = re_pb2.ExecuteOperationMetadata()
    assert operation.metadata.Unpack(metadata)
    return metadata.stage


class DaemonRestartTests(unittest.TestCase):
    @async_test
    async def test_queued_execute_survives_sigkill(self):
        base_dir = make_temp_dir(self)
        daemon = Daemon(os.path.join(base_dir, "data"), base_dir)
        self.addCleanup(daemon.stop)
        try:
            await daemon.start()
        except DaemonExited as error:
            raise unittest.SkipTest(f"twistd bgrid cannot start here: {error}")

        async with grpc.aio.insecure_channel(daemon.address) as channel:
            action_digest = await upload_action(channel)
            execution = re_pb2_grpc.ExecutionStub(channel)
            call = execution.Execute(
                re_pb2.ExecuteRequest(action_digest=action_digest), timeout=CALL_TIMEOUT
            )
            first = await call.read()
            call.cancel()
        self.assertEqual(stage_of(first), re_pb2.ExecutionStage.QUEUED)

        # The first message is the acknowledgement, so the job must survive from here on.
        self.assertEqual(daemon.kill(), -signal.SIGKILL)
        await daemon.start()

        async with grpc.aio.insecure_channel(daemon.address) as channel:
            operations = operations_grpc_pb2.OperationsStub(channel)
            operation = await operations.GetOperation(
                operations_pb2.GetOperationRequest(name=first.name), timeout=CALL_TIMEOUT
            )
            self.assertFalse(operation.done)
            self.assertEqual(stage_of(operation), re_pb2.ExecutionStage.QUEUED)

            execution = re_pb2_grpc.ExecutionStub(channel)
            call = execution.WaitExecution(
                re_pb2.WaitExecutionRequest(name=first.name), timeout=CALL_TIMEOUT
            )
            waited = await call.read()
            call.cancel()
            self.assertEqual(waited.name, first.name)
            self.assertEqual(stage_of(waited), re_pb2.ExecutionStage.QUEUED)

            with self.assertRaises(grpc.aio.AioRpcError) as raised:
                await operations.GetOperation(
                    operations_pb2.GetOperationRequest(name="operations/unknown"),
                    timeout=CALL_TIMEOUT,
                )
            self.assertEqual(raised.exception.code(), grpc.StatusCode.NOT_FOUND)
