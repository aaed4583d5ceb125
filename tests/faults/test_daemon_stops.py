"""The daemon stopped in the middle of uploads: killed with SIGKILL, or stopped with SIGTERM
while an idle bot waits in a long poll and a job is queued."""

import asyncio
import random
import re
import signal
import subprocess
import time

import grpc
from google.rpc import code_pb2

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.client import CasClient
from bgrid.digest import Digest
from bgrid.server import SHUTDOWN_GRACE
from bgrid.storage.cas_layout import CHUNK_SIZE
from bgrid.storage.lmdb_cas_streams import MAX_BUFFERED_BYTES
from tests.faults import support
from tests.util import async_test

MIB = 2**20

# Uploads of the SIGKILL test: some finish before the kill, some wait in mid-stream, and
# some stream freely when the daemon dies.
FINISHED_UPLOADS = 4
HELD_UPLOADS = 8
STREAMING_UPLOADS = 4
BLOB_BYTES = 8 * MIB + 4321

# Bytes a held upload sends before it waits. The daemon's writer keeps at most
# MAX_BUFFERED_BYTES and one request in memory, so once the daemon has committed this many
# bytes, at least one chunk of the upload is in LMDB.
HELD_BYTES = MAX_BUFFERED_BYTES + 2 * CHUNK_SIZE

# Seconds the daemon may take beyond its shutdown grace period to exit after SIGTERM: it
# commits the scheduler journal, flushes access times and closes LMDB.
STOP_MARGIN_SECONDS = 5.0


class DaemonStopTest(support.FaultTestCase):
    async def wait_until_held(self, channel, upload):
        await support.wait_for(
            lambda: self.committed_all_sent(channel, upload),
            support.EVENT_TIMEOUT,
            f"the daemon to commit {upload.hold_at} bytes of {upload.resource_name}",
        )

    async def committed_all_sent(self, channel, upload):
        return await support.committed_size(channel, upload) == upload.hold_at

    @async_test
    async def test_sigkill_during_uploads(self):
        """SIGKILL of the daemon during concurrent ByteStream writes of 8 MiB blobs: four
        have finished, eight wait in mid-stream with 3 MiB committed on the daemon, and four
        stream freely.

        Afterwards, once the daemon has restarted on the same data and port, no partial
        blob is visible: FindMissingBlobs reports every blob whose last request was never
        sent missing, and a ByteStream Read of one is NOT_FOUND. Every finished blob is
        present, and every blob reported present reads back with its digest. The restart
        deleted the chunks of at least the eight held uploads.
        """
        channel = self.open_channel()
        generator = random.Random(8)
        count = FINISHED_UPLOADS + HELD_UPLOADS + STREAMING_UPLOADS
        blobs = [generator.randbytes(BLOB_BYTES) for _ in range(count)]
        finished_uploads = [
            support.StreamedUpload(channel, data) for data in blobs[:FINISHED_UPLOADS]
        ]
        held_uploads = [
            support.StreamedUpload(channel, data, hold_at=HELD_BYTES)
            for data in blobs[FINISHED_UPLOADS : FINISHED_UPLOADS + HELD_UPLOADS]
        ]
        streaming_uploads = [
            support.StreamedUpload(channel, data)
            for data in blobs[FINISHED_UPLOADS + HELD_UPLOADS :]
        ]

        # The uploads that finish and those held in mid-stream stream at the same time.
        writes = {
            upload: asyncio.ensure_future(upload.run())
            for upload in finished_uploads + held_uploads
        }
        for upload in held_uploads:
            self.addCleanup(upload.abandon)
        for upload in finished_uploads:
            response = await writes[upload]
            self.assertEqual(response.committed_size, BLOB_BYTES)
        for upload in held_uploads:
            await self.wait_until_held(channel, upload)

        # The free uploads start, and the daemon dies once each has sent its first MiB.
        writes.update(
            {upload: asyncio.ensure_future(upload.run()) for upload in streaming_uploads}
        )
        await support.wait_for(
            lambda: all(upload.sent_bytes >= MIB for upload in streaming_uploads),
            support.EVENT_TIMEOUT,
            "the free uploads to send their first MiB",
        )
        self.grid.kill(self.grid.daemon)

        outcomes = {}
        for upload in held_uploads + streaming_uploads:
            try:
                outcomes[upload] = await writes[upload]
            except grpc.aio.AioRpcError as error:
                outcomes[upload] = error
        for upload in held_uploads:
            self.assertIsInstance(outcomes[upload], grpc.aio.AioRpcError)
        interrupted = [
            upload for upload in held_uploads + streaming_uploads if not upload.finish_sent
        ]
        acknowledged = finished_uploads + [
            upload for upload in streaming_uploads if not isinstance(outcomes[upload], Exception)
        ]
        print(
            f"\nat the kill: {len(acknowledged)} uploads acknowledged, "
            f"{len(interrupted)} interrupted before their last request"
        )

        await asyncio.to_thread(self.grid.start_daemon)

        cas = CasClient(channel)
        uploads = finished_uploads + held_uploads + streaming_uploads
        missing = set(await cas.find_missing([upload.digest for upload in uploads]))
        for upload in interrupted:
            self.assertIn(upload.digest, missing, f"partial blob {upload.digest} is visible")
        self.assertEqual(
            await support.read_bytestream_code(channel, interrupted[0].digest),
            grpc.StatusCode.NOT_FOUND,
        )
        for upload in acknowledged:
            self.assertNotIn(upload.digest, missing, f"acknowledged blob {upload.digest} is lost")
        for upload in uploads:
            if upload.digest not in missing:
                self.assertEqual(await cas.read_blob(upload.digest), upload.data)

        deleted = re.search(r"deleted (\d+) unfinished uploads", self.grid.daemon_log())
        self.assertIsNotNone(deleted, "the restart reported no unfinished uploads")
        self.assertGreaterEqual(int(deleted.group(1)), HELD_UPLOADS)

    @async_test
    async def test_sigterm_during_long_poll_and_upload(self):
        """SIGTERM of the daemon while an idle bot waits in a long poll, a ByteStream write
        waits in mid-stream with 3 MiB committed, and a job is queued that no running bot
        can take.

        Afterwards the daemon has exited with a clean status within its shutdown grace
        period. Once it has restarted on the same data and port, the half-written blob is
        missing and cannot be read, and the operation is still queued. A bot that can take
        the job then runs it to success, and the idle bot is still running.
        """
        idle_bot = self.grid.start_bot("bot-idle")
        await support.wait_for(
            lambda: "created session" in idle_bot.log_text(),
            support.EVENT_TIMEOUT,
            "the idle bot to open its session",
        )
        channel = self.open_channel()
        cas = CasClient(channel)
        action_digest = await support.upload_action(
            cas,
            ["sh", "-c", "echo ran > out"],
            output_paths=["out"],
            platform=[("pool", "later")],
        )
        name = await support.submit(channel, action_digest)
        data = random.Random(9).randbytes(BLOB_BYTES)
        upload = support.StreamedUpload(channel, data, hold_at=HELD_BYTES)
        write = asyncio.ensure_future(upload.run())
        self.addCleanup(upload.abandon)
        await self.wait_until_held(channel, upload)

        daemon = self.grid.daemon
        started = time.monotonic()
        daemon.popen.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.to_thread(
                daemon.popen.wait, SHUTDOWN_GRACE + STOP_MARGIN_SECONDS
            )
        except subprocess.TimeoutExpired:
            self.fail(
                f"the daemon did not exit within {SHUTDOWN_GRACE + STOP_MARGIN_SECONDS} "
                f"seconds of SIGTERM\n{self.grid.log_excerpt()}"
            )
        elapsed = time.monotonic() - started
        print(f"\nthe daemon exited {elapsed:.1f} seconds after SIGTERM with status {status}")
        self.assertIn(status, support.CLEAN_EXIT_STATUSES)
        self.assertIn("bgrid stopped", self.grid.daemon_log())
        with self.assertRaises(grpc.aio.AioRpcError):
            await write

        await asyncio.to_thread(self.grid.start_daemon)

        self.assertEqual(await cas.find_missing([upload.digest]), [upload.digest])
        self.assertEqual(
            await support.read_bytestream_code(channel, upload.digest), grpc.StatusCode.NOT_FOUND
        )
        operation = await support.get_operation(channel, name)
        self.assertFalse(operation.done)
        self.assertEqual(support.stage_of(operation), re_pb2.ExecutionStage.QUEUED)

        self.grid.start_bot("bot-late", properties=["pool=later"])
        operation = await support.wait_until_done(channel, name, support.EVENT_TIMEOUT)
        response = support.execute_response(operation)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        self.assertEqual(response.result.exit_code, 0)
        self.assertEqual(response.result.execution_metadata.worker, "bot-late")
        self.assert_running(idle_bot)

    @async_test
    async def test_sigkill_while_bot_runs_action(self):
        """SIGKILL of the daemon while a bot runs an action, and a restart on the same data
        and port once the action's command has exited, so the bot uploads its outputs and
        reports its result while the daemon is down or starting.

        Afterwards the operation ends OK with the bot's result and output, although the
        client submitted the action only once: a restart of the daemon costs no job.
        """
        bot = self.grid.start_bot("bot-a")
        channel = self.open_channel()
        cas = CasClient(channel)
        action_digest = await support.upload_action(
            cas, ["sh", "-c", "sleep 2; echo done > out"], output_paths=["out"]
        )
        name = await support.submit(channel, action_digest)
        processes = await support.wait_for(
            lambda: support.action_processes(bot, "sleep"),
            support.EVENT_TIMEOUT,
            "the bot to run the action",
        )
        self.addCleanup(support.kill_survivors, processes)

        self.grid.kill(self.grid.daemon)
        await support.wait_for(
            lambda: not support.survivors(processes),
            support.EVENT_TIMEOUT,
            "the action's command to exit while the daemon is down",
        )
        await asyncio.to_thread(self.grid.start_daemon)

        operation = await support.wait_until_done(channel, name, support.EVENT_TIMEOUT)
        response = support.execute_response(operation)
        self.assertEqual(
            response.status.code,
            code_pb2.OK,
            f"{code_pb2.Code.Name(response.status.code)}: {response.status.message}",
        )
        self.assertEqual(response.result.exit_code, 0)
        self.assertEqual(response.result.execution_metadata.worker, "bot-a")
        self.assertEqual([output.path for output in response.result.output_files], ["out"])
        output_digest = Digest.from_proto(response.result.output_files[0].digest)
        self.assertEqual(await cas.read_blob(output_digest), b"done\n")
        self.assert_running(bot)


class LocalBotStopTest(support.FaultTestCase):
    # With no retries allowed, a lease lost by the local bot would fail its job.
    daemon_options = ["--local-bots", "1", "--max-job-retries", "0"]

    @async_test
    async def test_sigterm_gives_local_bot_leases_back(self):
        """SIGTERM of a daemon with a local bot while that bot runs an action.

        Afterwards the daemon has waited for its local bot to exit, the action's processes
        are gone, and the bot gave its lease back before the server stopped taking calls.
        So after a restart the job runs again without counting a retry, and its operation
        ends OK although the daemon allows no retries.
        """
        marker = f"{self.grid.base_dir}/first-run"
        channel = self.open_channel()
        cas = CasClient(channel)
        # The first run waits to be stopped, and the second one finishes at once.
        action_digest = await support.upload_action(
            cas,
            [
                "sh",
                "-c",
                f"if [ -e {marker} ]; then echo done > out; else touch {marker}; sleep 60; fi",
            ],
            output_paths=["out"],
        )
        name = await support.submit(channel, action_digest)
        processes = await support.wait_for(
            lambda: support.action_processes(self.grid.daemon, "sleep"),
            support.EVENT_TIMEOUT,
            "the local bot to run the action",
        )
        self.addCleanup(support.kill_survivors, processes)

        daemon = self.grid.daemon
        daemon.popen.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(daemon.popen.wait, SHUTDOWN_GRACE + STOP_MARGIN_SECONDS)
        self.assertIn(status, support.CLEAN_EXIT_STATUSES)
        self.assertEqual(support.survivors(processes), [])
        log = self.grid.daemon_log()
        self.assertIn("without counting a retry", log)
        self.assertIn("refuses new calls", log)
        self.assertLess(log.index("without counting a retry"), log.index("refuses new calls"))

        await asyncio.to_thread(self.grid.start_daemon)

        operation = await support.wait_until_done(channel, name, support.EVENT_TIMEOUT)
        response = support.execute_response(operation)
        self.assertEqual(response.status.code, code_pb2.OK, response.status.message)
        self.assertEqual(response.result.exit_code, 0)
        self.assertNotRegex(self.grid.daemon_log(), r"\(retry \d+ of")
