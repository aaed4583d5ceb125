"""Tests of the ByteStream service through a real gRPC server."""

import asyncio
import uuid

import grpc

from bgrid._protos.google.bytestream import bytestream_pb2
from bgrid.digest import EMPTY_DIGEST
from tests.servicers.support import (
    INSTANCE_NAMES,
    READ_CHUNK_SIZE_BYTES,
    RESUME_TIMEOUT_SECONDS,
    ServicerTestCase,
    make_blob,
)
from tests.util import async_test

# Polling bound for events that only the server detects, such as a cancelled stream.
POLL_INTERVAL_SECONDS = 0.01
POLL_ATTEMPTS = 500


def read_name(digest, instance_name="main"):
    prefix = f"{instance_name}/" if instance_name else ""
    return f"{prefix}blobs/{digest.hash}/{digest.size_bytes}"


def upload_name(digest, instance_name="main", upload_id=None):
    prefix = f"{instance_name}/" if instance_name else ""
    upload_id = upload_id or str(uuid.uuid4())
    return f"{prefix}uploads/{upload_id}/blobs/{digest.hash}/{digest.size_bytes}"


def write_requests(resource_name, data, chunk_size, start=0, finish=True, repeat_name=False):
    """Return WriteRequests sending ``data[start:]`` in chunks, naming the resource in the
    first request (and in every request when ``repeat_name``)."""
    requests = []
    offset = start
    while offset < len(data) or not requests:
        chunk = data[offset : offset + chunk_size]
        requests.append(
            bytestream_pb2.WriteRequest(
                resource_name=resource_name if repeat_name or not requests else "",
                write_offset=offset,
                data=chunk,
            )
        )
        offset += len(chunk)
    requests[-1].finish_write = finish
    return requests


async def request_stream(requests):
    for request in requests:
        yield request


class ReadTests(ServicerTestCase):
    @async_test
    async def test_reads_whole_blob_in_chunks(self):
        data, digest = make_blob(3 * READ_CHUNK_SIZE_BYTES + 100)
        await self.put_blobs((data, digest))

        for instance_name in INSTANCE_NAMES:
            responses = await self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(resource_name=read_name(digest, instance_name))
                )
            )

            self.assertEqual(b"".join(response.data for response in responses), data)
            self.assertEqual(len(responses), 4)
            for response in responses:
                self.assertLessEqual(len(response.data), READ_CHUNK_SIZE_BYTES)

    @async_test
    async def test_offset_and_limit(self):
        data, digest = make_blob(2 * READ_CHUNK_SIZE_BYTES)
        await self.put_blobs((data, digest))
        cases = [
            (0, 10),
            (5, 0),
            (READ_CHUNK_SIZE_BYTES - 3, READ_CHUNK_SIZE_BYTES + 7),
            (len(data) - 1, 0),
            (100, 10 * len(data)),
        ]

        for offset, limit in cases:
            responses = await self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(
                        resource_name=read_name(digest), read_offset=offset, read_limit=limit
                    )
                )
            )
            end = offset + limit if limit else len(data)
            self.assertEqual(b"".join(r.data for r in responses), data[offset:end], (offset, limit))

    @async_test
    async def test_offset_at_end_returns_no_data(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        responses = await self.read_stream(
            self.bytestream.Read(
                bytestream_pb2.ReadRequest(resource_name=read_name(digest), read_offset=100)
            )
        )

        self.assertEqual(b"".join(response.data for response in responses), b"")

    @async_test
    async def test_offset_past_end(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        await self.assert_rpc_error(
            self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(resource_name=read_name(digest), read_offset=101)
                )
            ),
            grpc.StatusCode.OUT_OF_RANGE,
            "101",
            "100 bytes",
        )

    @async_test
    async def test_negative_offset(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        await self.assert_rpc_error(
            self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(resource_name=read_name(digest), read_offset=-1)
                )
            ),
            grpc.StatusCode.OUT_OF_RANGE,
            "read_offset",
            "-1",
        )

    @async_test
    async def test_negative_limit(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        await self.assert_rpc_error(
            self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(resource_name=read_name(digest), read_limit=-7)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "read_limit",
            "-7",
        )

    @async_test
    async def test_missing_blob(self):
        digest = make_blob(100)[1]

        await self.assert_rpc_error(
            self.read_stream(
                self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=read_name(digest)))
            ),
            grpc.StatusCode.NOT_FOUND,
            digest.hash,
        )

    @async_test
    async def test_empty_blob_always_readable(self):
        responses = await self.read_stream(
            self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=read_name(EMPTY_DIGEST)))
        )

        self.assertEqual(b"".join(response.data for response in responses), b"")

    @async_test
    async def test_blob_of_one_chunk(self):
        data, digest = make_blob(READ_CHUNK_SIZE_BYTES)
        await self.put_blobs((data, digest))

        responses = await self.read_stream(
            self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=read_name(digest)))
        )

        self.assertEqual([response.data for response in responses], [data])

    @async_test
    async def test_cancelled_read_releases_blob(self):
        data, digest = make_blob(6 * READ_CHUNK_SIZE_BYTES)
        await self.put_blobs((data, digest))

        call = self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=read_name(digest)))
        first = await call.read()
        call.cancel()

        self.assertEqual(first.data, data[:READ_CHUNK_SIZE_BYTES])
        # The open reader pins the blob until the server handles the cancellation.
        for _ in range(POLL_ATTEMPTS):
            if self.store.pinned_blobs == 0:
                break
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
        else:
            self.fail("the reader of the cancelled Read still pins the blob")

    @async_test
    async def test_sha256_digest_function_segment(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        responses = await self.read_stream(
            self.bytestream.Read(
                bytestream_pb2.ReadRequest(
                    resource_name=f"main/blobs/sha256/{digest.hash}/{digest.size_bytes}"
                )
            )
        )

        self.assertEqual(b"".join(response.data for response in responses), data)

    @async_test
    async def test_malformed_resource_names(self):
        digest = make_blob(100)[1]
        names = {
            "missing size": (f"main/blobs/{digest.hash}", "missing"),
            "missing hash and size": ("main/blobs", "missing"),
            "non-numeric size": (f"main/blobs/{digest.hash}/12a", "'12a'"),
            "negative size": (f"main/blobs/{digest.hash}/-1", "'-1'"),
            "size with leading zero": (f"main/blobs/{digest.hash}/0100", "'0100'"),
            "size above int64": (f"main/blobs/{digest.hash}/9999999999999999999", "int64"),
            "bad hash": ("main/blobs/XYZ/100", "'XYZ'"),
            "extra segment": (f"main/blobs/{digest.hash}/100/extra", "'extra'"),
            "no blobs segment": (f"main/{digest.hash}/100", "no 'blobs'"),
            "upload name": (upload_name(digest), "'uploads'"),
            "compressed blobs": (f"main/compressed-blobs/zstd/{digest.hash}/100", "compressed-blobs"),
            "other digest function": (f"main/blobs/blake3/{digest.hash}/100", "'blake3'"),
            "empty": ("", "''"),
        }

        for case, (name, fragment) in names.items():
            error = await self.assert_rpc_error(
                self.read_stream(self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=name))),
                grpc.StatusCode.INVALID_ARGUMENT,
                repr(name),
                fragment,
            )
            self.assertTrue(error.details(), case)

    @async_test
    async def test_unknown_instance(self):
        digest = make_blob(100)[1]

        await self.assert_rpc_error(
            self.read_stream(
                self.bytestream.Read(
                    bytestream_pb2.ReadRequest(resource_name=read_name(digest, "projects/q"))
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown instance name 'projects/q'",
        )


class WriteTests(ServicerTestCase):
    async def write(self, requests):
        return await self.bytestream.Write(request_stream(requests))

    async def query(self, resource_name):
        return await self.bytestream.QueryWriteStatus(
            bytestream_pb2.QueryWriteStatusRequest(resource_name=resource_name)
        )

    async def read_blob(self, digest):
        responses = await self.read_stream(
            self.bytestream.Read(bytestream_pb2.ReadRequest(resource_name=read_name(digest)))
        )
        return b"".join(response.data for response in responses)

    @async_test
    async def test_writes_blob_in_chunks(self):
        for instance_name in INSTANCE_NAMES:
            data, digest = make_blob(300 * 1024)
            name = upload_name(digest, instance_name)

            response = await self.write(write_requests(name, data, 64 * 1024))

            self.assertEqual(response.committed_size, len(data))
            self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_repeated_resource_name_and_metadata(self):
        data, digest = make_blob(10000)
        name = upload_name(digest) + "/some/client/metadata"

        response = await self.write(write_requests(name, data, 3000, repeat_name=True))

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_empty_blob(self):
        response = await self.write(write_requests(upload_name(EMPTY_DIGEST), b"", 10))

        self.assertEqual(response.committed_size, 0)

    @async_test
    async def test_large_blob_with_backpressure(self):
        # Several storage chunks, sent faster than they are stored.
        data, digest = make_blob(9 * 1024 * 1024 + 17)

        response = await self.write(write_requests(upload_name(digest), data, 1024 * 1024))

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_existing_blob_answers_at_once(self):
        data, digest = make_blob(10000)
        await self.put_blobs((data, digest))

        # The client has sent only part of the data and not finished.
        call = self.bytestream.Write()
        await call.write(
            bytestream_pb2.WriteRequest(resource_name=upload_name(digest), data=data[:100])
        )
        response = await call

        self.assertEqual(response.committed_size, len(data))

    @async_test
    async def test_hash_mismatch(self):
        data = make_blob(5000)[0]
        wrong_digest = make_blob(5000)[1]
        name = upload_name(wrong_digest)

        await self.assert_rpc_error(
            self.write(write_requests(name, data, 1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            wrong_digest.hash,
        )

        self.assertFalse(await self.is_stored(wrong_digest))
        await self.assert_rpc_error(self.query(name), grpc.StatusCode.NOT_FOUND, repr(name))

    @async_test
    async def test_data_beyond_size(self):
        data, digest = make_blob(1000)
        name = upload_name(digest)

        await self.assert_rpc_error(
            self.write(write_requests(name, data + b"extra", 600)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "1005",
            "1000 bytes",
        )
        self.assertFalse(await self.is_stored(digest))

    @async_test
    async def test_finish_before_size(self):
        data, digest = make_blob(1000)

        await self.assert_rpc_error(
            self.write(write_requests(upload_name(digest), data[:999], 600)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "999",
            "1000 bytes",
        )
        self.assertFalse(await self.is_stored(digest))

    @async_test
    async def test_write_offset_out_of_order(self):
        data, digest = make_blob(3000)
        name = upload_name(digest)
        requests = write_requests(name, data, 1000)
        requests[1].write_offset = 1500

        await self.assert_rpc_error(
            self.write(requests),
            grpc.StatusCode.INVALID_ARGUMENT,
            "write_offset",
            "1500",
            "1000 bytes",
        )

        # The data before the bad request is kept, so the client can resume.
        status = await self.query(name)
        self.assertEqual(status.committed_size, 1000)
        self.assertFalse(status.complete)

    @async_test
    async def test_first_offset_must_be_zero(self):
        data, digest = make_blob(3000)
        name = upload_name(digest)

        await self.assert_rpc_error(
            self.write(write_requests(name, data, 1000, start=1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "1000",
            "0 bytes",
        )
        await self.assert_rpc_error(self.query(name), grpc.StatusCode.NOT_FOUND)

    @async_test
    async def test_resource_name_changes_mid_stream(self):
        data, digest = make_blob(3000)
        name = upload_name(digest)
        other = upload_name(digest)
        requests = write_requests(name, data, 1000)
        requests[2].resource_name = other

        await self.assert_rpc_error(
            self.write(requests), grpc.StatusCode.INVALID_ARGUMENT, repr(other), repr(name)
        )

    @async_test
    async def test_missing_resource_name(self):
        data, digest = make_blob(100)

        await self.assert_rpc_error(
            self.write(write_requests("", data, 1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "resource_name",
        )

    @async_test
    async def test_empty_stream(self):
        await self.assert_rpc_error(
            self.write([]), grpc.StatusCode.INVALID_ARGUMENT, "first request"
        )

    @async_test
    async def test_malformed_resource_names(self):
        data, digest = make_blob(100)
        upload_id = str(uuid.uuid4())
        names = {
            "missing uuid": (f"main/uploads/blobs/{digest.hash}/100", "uuid"),
            "uuid after blobs": (f"main/blobs/{upload_id}/{digest.hash}/100", "'uploads'"),
            "missing blobs": (f"main/uploads/{upload_id}/{digest.hash}/100", "'blobs'"),
            "non-numeric size": (f"main/uploads/{upload_id}/blobs/{digest.hash}/ten", "'ten'"),
            "missing size": (f"main/uploads/{upload_id}/blobs/{digest.hash}", "missing"),
            "bad hash": (f"main/uploads/{upload_id}/blobs/{digest.hash[:-1]}/100", digest.hash[:-1]),
            "compressed blobs": (
                f"main/uploads/{upload_id}/compressed-blobs/zstd/{digest.hash}/100",
                "compressed-blobs",
            ),
            "unknown instance": (f"other/uploads/{upload_id}/blobs/{digest.hash}/100", "'other'"),
        }

        for case, (name, fragment) in names.items():
            error = await self.assert_rpc_error(
                self.write(write_requests(name, data, 1000)),
                grpc.StatusCode.INVALID_ARGUMENT,
                repr(name),
                fragment,
            )
            self.assertTrue(error.details(), case)
            await self.assert_rpc_error(
                self.query(name), grpc.StatusCode.INVALID_ARGUMENT, repr(name), fragment
            )

    @async_test
    async def test_resume_after_half_close(self):
        data, digest = make_blob(5000)
        name = upload_name(digest, "projects/p/instances/main")

        # The client sends 2000 bytes and closes the stream without finish_write.
        response = await self.write(write_requests(name, data[:2000], 1000, finish=False))
        self.assertEqual(response.committed_size, 2000)

        status = await self.query(name)
        self.assertEqual((status.committed_size, status.complete), (2000, False))

        response = await self.write(write_requests(name, data, 1000, start=status.committed_size))
        self.assertEqual(response.committed_size, len(data))

        status = await self.query(name)
        self.assertEqual((status.committed_size, status.complete), (len(data), True))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_resume_after_cancel(self):
        data, digest = make_blob(5000)
        name = upload_name(digest)

        call = self.bytestream.Write()
        for request in write_requests(name, data[:3000], 1000, finish=False):
            await call.write(request)
        await self.poll_committed_size(name, 3000)
        call.cancel()

        # A resumed Write is ABORTED until the server has seen the cancellation.
        for _ in range(POLL_ATTEMPTS):
            try:
                response = await self.write(write_requests(name, data, 1000, start=3000))
                break
            except grpc.aio.AioRpcError as error:
                self.assertEqual(error.code(), grpc.StatusCode.ABORTED, error.details())
                await asyncio.sleep(POLL_INTERVAL_SECONDS)
        else:
            self.fail("the cancelled upload was never released for resumption")

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_restart_kept_upload_from_zero(self):
        data, digest = make_blob(5000)
        name = upload_name(digest)
        await self.write(write_requests(name, data[:2000], 1000, finish=False))

        response = await self.write(write_requests(name, data, 1000))

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_kept_upload_expires(self):
        data, digest = make_blob(5000)
        name = upload_name(digest)
        await self.write(write_requests(name, data[:2000], 1000, finish=False))

        self.clock.advance(RESUME_TIMEOUT_SECONDS - 1)
        status = await self.query(name)
        self.assertEqual(status.committed_size, 2000)

        self.clock.advance(2)
        await self.assert_rpc_error(self.query(name), grpc.StatusCode.NOT_FOUND, repr(name))
        await self.assert_rpc_error(
            self.write(write_requests(name, data, 1000, start=2000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "2000",
            "0 bytes",
        )

    @async_test
    async def test_resume_timer_restarts_on_resume(self):
        data, digest = make_blob(5000)
        name = upload_name(digest)
        await self.write(write_requests(name, data[:2000], 1000, finish=False))
        self.clock.advance(RESUME_TIMEOUT_SECONDS - 1)

        await self.write(write_requests(name, data[:4000], 1000, start=2000, finish=False))
        self.clock.advance(RESUME_TIMEOUT_SECONDS - 1)

        status = await self.query(name)
        self.assertEqual(status.committed_size, 4000)

    @async_test
    async def test_concurrent_writers_of_same_blob(self):
        data, digest = make_blob(200 * 1024)
        first = self.bytestream.Write()
        second = self.bytestream.Write()
        first_requests = write_requests(upload_name(digest), data, 32 * 1024)
        second_requests = write_requests(upload_name(digest), data, 32 * 1024)

        # The two uploads interleave request by request.
        for first_request, second_request in zip(first_requests, second_requests):
            await first.write(first_request)
            await second.write(second_request)
        await first.done_writing()
        await second.done_writing()

        self.assertEqual((await first).committed_size, len(data))
        self.assertEqual((await second).committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_concurrent_writes_of_same_resource_name(self):
        data, digest = make_blob(5000)
        name = upload_name(digest)
        first = self.bytestream.Write()
        await first.write(bytestream_pb2.WriteRequest(resource_name=name, data=data[:1000]))
        await self.poll_committed_size(name, 1000)

        await self.assert_rpc_error(
            self.write(write_requests(name, data, 1000)),
            grpc.StatusCode.ABORTED,
            repr(name),
        )

        for request in write_requests(name, data, 1000, start=1000):
            await first.write(request)
        await first.done_writing()
        self.assertEqual((await first).committed_size, len(data))

    @async_test
    async def test_single_request_write(self):
        data, digest = make_blob(READ_CHUNK_SIZE_BYTES + 10)
        name = upload_name(digest)

        response = await self.write(write_requests(name, data, len(data)))

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)
        status = await self.query(name)
        self.assertEqual((status.committed_size, status.complete), (len(data), True))

    @async_test
    async def test_single_request_write_of_stored_blob(self):
        data, digest = make_blob(5000)
        await self.put_blobs((data, digest))

        response = await self.write(write_requests(upload_name(digest), data, len(data)))

        self.assertEqual(response.committed_size, len(data))
        self.assertEqual(await self.read_blob(digest), data)

    @async_test
    async def test_single_request_hash_mismatch(self):
        data = make_blob(5000)[0]
        wrong_digest = make_blob(5000)[1]
        name = upload_name(wrong_digest)

        await self.assert_rpc_error(
            self.write(write_requests(name, data, len(data))),
            grpc.StatusCode.INVALID_ARGUMENT,
            wrong_digest.hash,
        )

        self.assertFalse(await self.is_stored(wrong_digest))
        await self.assert_rpc_error(self.query(name), grpc.StatusCode.NOT_FOUND, repr(name))

    @async_test
    async def test_query_unknown_upload(self):
        digest = make_blob(100)[1]
        name = upload_name(digest)

        await self.assert_rpc_error(self.query(name), grpc.StatusCode.NOT_FOUND, repr(name))

    @async_test
    async def test_query_stored_blob(self):
        data, digest = make_blob(100)
        await self.put_blobs((data, digest))

        status = await self.query(upload_name(digest))

        self.assertEqual((status.committed_size, status.complete), (100, True))

    async def poll_committed_size(self, resource_name, committed_size):
        """Wait until QueryWriteStatus reports ``committed_size`` for the upload."""
        for _ in range(POLL_ATTEMPTS):
            try:
                status = await self.query(resource_name)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                if status.committed_size == committed_size:
                    return
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
        self.fail(f"upload {resource_name} never reached {committed_size} bytes")
