"""Integration tests: the real daemon (``twistd bgrid``) and a real bot process on loopback,
driven through REAPI with bgrid.client.

They skip when ``bgrid/tap.py``, the daemon's entry point, does not exist.
"""

import asyncio
import importlib.util
import os
import signal
import socket
import sys

import grpc
from google.longrunning import operations_proto_pb2 as operations_pb2
from google.longrunning import operations_grpc_pb2
from google.protobuf import duration_pb2
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
    remote_execution_pb2_grpc,
)
from bgrid.bridge import as_deferred
from bgrid.client import tree
from bgrid.client.cas import CasClient
from bgrid.digest import Digest
from tests.bot.test_runner import process_is_gone, read_text
from tests.client.fakes import open_test_channel, wait_until
from tests.util import async_test, make_temp_dir

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Seconds for the daemon to pass a health check, and for one action to finish.
START_TIMEOUT = 30.0
EXECUTE_TIMEOUT = 60.0
# Seconds a process gets to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 15.0

SHELL_ENVIRONMENT = [re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")]


def find_free_port():
    # NOTE: another process may take the port before the daemon binds it; the start then
    # times out and the test fails with the daemon's log.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GridProcessTestCase(unittest.TestCase):
    """Runs the daemon with ``daemon_options``, and the bots that a test starts, as
    subprocesses in a temporary directory, stopped with SIGTERM at cleanup."""

    daemon_options = ()

    async def start_daemon(self, port=None):
        """Start the daemon on ``port`` (default: a free port) of 127.0.0.1."""
        if importlib.util.find_spec("bgrid.tap") is None:
            raise unittest.SkipTest("bgrid/tap.py, the daemon's entry point, does not exist yet")
        self.directory = make_temp_dir(self)
        port = port or find_free_port()
        self.address = f"127.0.0.1:{port}"

        self.daemon_log = os.path.join(self.directory, "daemon.log")
        await self.start_process(
            [sys.executable, "-c",
             "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
             "--nodaemon", "--pidfile=", f"--logfile={self.daemon_log}", "bgrid",
             "--listen", self.address, "--data-dir", os.path.join(self.directory, "data"),
             "--local-bots", "0", *self.daemon_options],
            self.daemon_log,
        )
        self.channel = open_test_channel(self, self.address)
        await self.wait_for_health()
        self.cas = CasClient(self.channel)
        self.execution = remote_execution_pb2_grpc.ExecutionStub(self.channel)

    async def start_bot(self, name, work_dir, log_path, concurrency=2):
        """Start ``bgrid bot`` with the property OSFamily=linux; return its process."""
        return await self.start_process(
            [sys.executable, "-m", "bgrid.bot.main", "--server", self.address,
             "--work-dir", work_dir, "--concurrency", str(concurrency),
             "--name", name, "--property", "OSFamily=linux"],
            log_path,
        )

    async def start_process(self, argv, log_path):
        environment = dict(os.environ, PYTHONPATH=REPOSITORY_ROOT)
        with open(log_path, "wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=asyncio.subprocess.STDOUT, env=environment, cwd=self.directory,
            )

        async def stop():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
                except asyncio.TimeoutError:
                    process.kill()
                    await process.wait()

        self.addCleanup(lambda: as_deferred(stop()))
        return process

    async def wait_for_health(self):
        stub = health_pb2_grpc.HealthStub(self.channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                self.fail(f"daemon not serving after {START_TIMEOUT} s; log:\n{read_text(self.daemon_log)}")
            await asyncio.sleep(0.1)

    async def put_action(self, arguments, inputs=None, timeout=None, do_not_cache=True,
                         **command_fields):
        """Upload an input tree of ``{path: bytes}``, a Command and an Action; return the Action digest."""
        source = make_temp_dir(self)
        for path, data in (inputs or {}).items():
            full = os.path.join(source, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as target:
                target.write(data)
        root_digest = await self.cas.upload_directory(source)
        command = re_pb2.Command(
            arguments=arguments, environment_variables=SHELL_ENVIRONMENT, **command_fields
        )
        command_data = tree.serialize(command)
        action = re_pb2.Action(
            command_digest=Digest.of(command_data).to_proto(re_pb2.Digest),
            input_root_digest=root_digest.to_proto(re_pb2.Digest),
            do_not_cache=do_not_cache,
        )
        if timeout is not None:
            action.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout))
        action_data = tree.serialize(action)
        await self.cas.upload_missing(
            blobs={Digest.of(command_data): command_data, Digest.of(action_data): action_data}
        )
        return Digest.of(action_data)

    def execute(self, action_digest):
        return self.execution.Execute(
            re_pb2.ExecuteRequest(action_digest=action_digest.to_proto(re_pb2.Digest)),
            timeout=EXECUTE_TIMEOUT,
        )

    def assert_log_clean(self, log_path):
        log = read_text(log_path)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("#critical]", log)
        self.assertNotIn("#error]", log)

    async def final_response(self, call, log_path):
        last = None
        async for operation in call:
            last = operation
        self.assertTrue(last.done, f"bot log:\n{read_text(log_path)}")
        self.assertEqual(last.WhichOneof("result"), "response", last)
        response = re_pb2.ExecuteResponse()
        self.assertTrue(last.response.Unpack(response))
        return response


class DaemonAndBotTests(GridProcessTestCase):
    @async_test
    async def setUp(self):
        await self.start_daemon()
        self.bot_log = os.path.join(self.directory, "bot.log")
        self.bot = await self.start_bot("itest", os.path.join(self.directory, "bot"), self.bot_log)

    def assert_bot_log_clean(self):
        self.assert_log_clean(self.bot_log)

    async def final_response(self, call):
        return await super().final_response(call, self.bot_log)

    @async_test
    async def test_action_runs_on_bot(self):
        action_digest = await self.put_action(
            ["/bin/sh", "-c",
             "cat ../in.txt > out/copy && mkdir -p out/dir/sub && echo nested > out/dir/sub/f "
             "&& ln -s copy out/link && echo ran; echo warn >&2"],
            inputs={"in.txt": b"input", "pkg/keep": b""},
            working_directory="pkg",
            output_paths=["out/copy", "out/dir", "out/link", "out/never"],
        )

        response = await self.final_response(self.execute(action_digest))

        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        result = response.result
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(result.execution_metadata.worker, "itest")
        self.assertEqual(await self.cas.read_blob(Digest.from_proto(result.stdout_digest)), b"ran\n")
        self.assertEqual(await self.cas.read_blob(Digest.from_proto(result.stderr_digest)), b"warn\n")
        (output_file,) = result.output_files
        self.assertEqual(output_file.path, "out/copy")
        self.assertEqual(await self.cas.read_blob(Digest.from_proto(output_file.digest)), b"input")
        self.assertEqual([(s.path, s.target) for s in result.output_symlinks], [("out/link", "copy")])
        (output_directory,) = result.output_directories
        destination = os.path.join(self.directory, "downloaded")
        await self.cas.download_tree(Digest.from_proto(output_directory.tree_digest), destination)
        self.assertEqual(read_text(os.path.join(destination, "sub", "f")), "nested\n")
        self.assert_bot_log_clean()

    @async_test
    async def test_timeout_reported(self):
        action_digest = await self.put_action(["/bin/sh", "-c", "echo started; sleep 60"], timeout=1)

        response = await self.final_response(self.execute(action_digest))

        self.assertEqual(response.status.code, code_pb2.DEADLINE_EXCEEDED, response.status.message)
        self.assertEqual(
            await self.cas.read_blob(Digest.from_proto(response.result.stdout_digest)), b"started\n"
        )

    @async_test
    async def test_invalid_input_tree_reported(self):
        payload = Digest.of(b"payload")
        await self.cas.upload(blobs={payload: b"payload"})
        root = re_pb2.Directory(
            files=[re_pb2.FileNode(name="ok", digest=payload.to_proto(re_pb2.Digest))],
            symlinks=[re_pb2.SymlinkNode(name="escape", target="../../../../../etc")],
        )
        root_data = tree.serialize(root)
        await self.cas.upload(blobs={Digest.of(root_data): root_data})
        action_digest = await self.put_action(["/bin/true"])
        action = re_pb2.Action.FromString(await self.cas.read_blob(action_digest))
        action.input_root_digest.CopyFrom(Digest.of(root_data).to_proto(re_pb2.Digest))
        action_data = tree.serialize(action)
        await self.cas.upload(blobs={Digest.of(action_data): action_data})

        response = await self.final_response(self.execute(Digest.of(action_data)))

        self.assertEqual(response.status.code, code_pb2.INVALID_ARGUMENT, response.status.message)
        self.assertIn("escape", response.status.message)

    async def cached_result(self, action_digest):
        """Return the action cache's result for ``action_digest``, or None for NOT_FOUND."""
        stub = remote_execution_pb2_grpc.ActionCacheStub(self.channel)
        try:
            return await stub.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=action_digest.to_proto(re_pb2.Digest)),
                timeout=EXECUTE_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            self.assertEqual(error.code(), grpc.StatusCode.NOT_FOUND, error.details())
            return None

    @async_test
    async def test_escaping_output_symlinks_not_cached(self):
        cases = [
            (["out"], "ln -s /etc/hostname out", "output symlink 'out'"),
            (["rel"], "ln -s ../../../../../../../etc/hostname rel", "output symlink 'rel'"),
            (["d"], "mkdir d && ln -s /etc d/etclink", "symlink 'd/etclink' in output directory"),
        ]
        for output_paths, script, expected in cases:
            with self.subTest(script=script):
                action_digest = await self.put_action(
                    ["/bin/sh", "-c", script], output_paths=output_paths, do_not_cache=False
                )

                response = await self.final_response(self.execute(action_digest))

                self.assertEqual(
                    response.status.code, code_pb2.FAILED_PRECONDITION, response.status.message
                )
                self.assertIn(expected, response.status.message)
                self.assertIsNone(await self.cached_result(action_digest))
        self.assert_bot_log_clean()

    @async_test
    async def test_inside_output_symlinks_cached(self):
        action_digest = await self.put_action(
            ["/bin/sh", "-c",
             "mkdir -p d/sub && ln -s ../../in.txt d/sub/up && ln -s d/sub/up link"],
            inputs={"in.txt": b"input"},
            output_paths=["d", "link"],
            do_not_cache=False,
        )

        response = await self.final_response(self.execute(action_digest))

        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        cached = await self.cached_result(action_digest)
        self.assertIsNotNone(cached)
        self.assertEqual([(s.path, s.target) for s in cached.output_symlinks], [("link", "d/sub/up")])
        self.assertEqual([d.path for d in cached.output_directories], ["d"])

    @async_test
    async def test_cancelled_operation_kills_action(self):
        pid_file = os.path.join(self.directory, "sleeper.pid")
        action_digest = await self.put_action(
            ["/bin/sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]
        )
        call = self.execute(action_digest)
        first = await call.read()
        await wait_until(
            lambda: os.path.exists(pid_file) and read_text(pid_file).endswith("\n"), timeout=30
        )
        sleeper = int(read_text(pid_file))

        operations = operations_grpc_pb2.OperationsStub(self.channel)
        await operations.CancelOperation(operations_pb2.CancelOperationRequest(name=first.name))

        await wait_until(lambda: process_is_gone(sleeper), timeout=30)
        call.cancel()
        await wait_until(lambda: "the server cancelled it" in read_text(self.bot_log))
        self.assert_bot_log_clean()
