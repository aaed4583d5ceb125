"""The storage scenarios: FindMissingBlobs, batch CAS calls, ByteStream and the action cache.

Each scenario is a coroutine function taking a Bench and returning one JSON record per
case. Setup (uploading the blobs that a read needs) is not measured. The checks look at
the shape of each response (status codes, counts, sizes), not at blob contents, so that
the null server, which returns zeros, passes them.
"""

import time
import uuid

from bench.load import CheckError, Operation, UniqueBlobs, digest_of, percentile_ms, run_closed_loop
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid._protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc

FMB_DIGESTS_PER_REQUEST = 1000
FMB_CALLERS = 8
FMB_BLOB_BYTES = 4096

BATCH_BLOBS_PER_REQUEST = 100
BATCH_BLOB_BYTES = 4096
BATCH_CALLERS = 4
# Distinct blobs that batch-read cycles through.
BATCH_READ_SET_BLOBS = 1000

BYTESTREAM_CHUNK_BYTES = 1024 * 1024
LARGE_BLOB_BYTES = 64 * 1024 * 1024
SMALL_BLOB_BYTES = 1024 * 1024
SMALL_BLOB_CALLERS = 4
# Concurrent writers of 64 MiB blobs in the case that measures memory under large uploads.
LARGE_BLOB_WRITERS = 20
# Distinct 1 MiB blobs that bs-read cycles through.
SMALL_BLOB_READ_SET = 200

AC_CALLERS = 8

# Deadlines in seconds: of a unary call, and of a ByteStream call of up to 64 MiB. A call
# past its deadline fails with DEADLINE_EXCEEDED and counts as an error, so a stuck
# server cannot stall the benchmark.
CALL_TIMEOUT_SECONDS = 60.0
STREAM_TIMEOUT_SECONDS = 300.0

# Largest total blob size of one BatchUpdateBlobs that setup sends, below every server's limit.
SETUP_BATCH_BYTES = 2 * 1024 * 1024


class SetupError(Exception):
    """A scenario could not prepare its data. The message names the failed call."""


class Bench:
    """The context of a scenario: the server, its channel, the settings and the measurement.

    ``monitor`` is the server's ProcessTreeMonitor, sampled by the caller during the run.
    """

    def __init__(self, server, monitor, settings, channel):
        self.server = server
        self.monitor = monitor
        self.settings = settings
        self.channel = channel
        self.blobs = UniqueBlobs()
        self.cas = remote_execution_pb2_grpc.ContentAddressableStorageStub(channel)
        self.bytestream = bytestream_pb2_grpc.ByteStreamStub(channel)
        self.action_cache = remote_execution_pb2_grpc.ActionCacheStub(channel)

    @property
    def instance_name(self):
        return self.settings.instance_name

    def resource_prefix(self):
        return f"{self.instance_name}/" if self.instance_name else ""

    async def measure(self, scenario, case, operation, callers, transfers_data=False, extra=None):
        """Warm up, then run the case and return its JSON record.

        Server CPU time counts only the measured part, but peak memory counts from the
        server's start. ``transfers_data`` adds MB/s (10^6 bytes of blob data a second).
        """
        if self.settings.warmup > 0:
            await run_closed_loop(operation, callers, self.settings.warmup)

        server_cpu_before = self.monitor.cpu_seconds()
        client_cpu_before = time.process_time()
        stats, seconds = await run_closed_loop(
            operation, callers, self.settings.duration, self.settings.max_requests
        )
        server_cpu = self.monitor.cpu_seconds() - server_cpu_before
        client_cpu = time.process_time() - client_cpu_before
        self.monitor.sample()

        ops = stats.ops
        record = {
            "scenario": scenario,
            "case": case,
            "server": self.server.spec.name,
            "ops": ops,
            "errors": stats.errors,
            "seconds": round(seconds, 3),
            "ops_per_s": round(ops / seconds, 2) if seconds > 0 else None,
            "mb_per_s": round(stats.payload_bytes / seconds / 1e6, 2) if transfers_data and seconds > 0 else None,
            "p50_ms": percentile_ms(stats.latencies, 0.50),
            "p99_ms": percentile_ms(stats.latencies, 0.99),
            "server_cpu_s_per_op": round(server_cpu / ops, 6) if ops else None,
            "server_peak_rss_mib": round(self.monitor.peak_rss_kib / 1024, 1),
            "client_cpu_s_per_op": round(client_cpu / ops, 6) if ops else None,
            "concurrency": callers,
        }
        if extra:
            record.update(extra)
        if stats.first_error:
            record["first_error"] = stats.first_error
        return record

    # Setup helpers

    async def upload(self, blobs):
        """Store ``blobs``, a list of (digest, data), with BatchUpdateBlobs and return the digests."""
        batch, batch_bytes = [], 0
        for digest, blob in blobs:
            if batch and batch_bytes + len(blob) > SETUP_BATCH_BYTES:
                await self._upload_batch(batch)
                batch, batch_bytes = [], 0
            batch.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=blob))
            batch_bytes += len(blob)
        if batch:
            await self._upload_batch(batch)
        return [digest for digest, _ in blobs]

    async def _upload_batch(self, requests):
        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance_name, requests=requests),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        failed = [entry for entry in response.responses if entry.status.code != 0]
        if failed or len(response.responses) != len(requests):
            detail = failed[0].status.message if failed else f"{len(response.responses)} responses"
            raise SetupError(f"BatchUpdateBlobs of {len(requests)} setup blobs failed: {detail}")

    async def upload_new_action(self, platform=()):
        """Store a new Command, input root and Action in one BatchUpdateBlobs, and return the Action's digest.

        ``platform`` lists the ``(name, value)`` properties the Action requires of a bot.
        Raises CheckError if the server rejects a blob.
        """
        name = self.blobs.make_text("action")
        command = re_pb2.Command(arguments=["/bin/true", name], output_paths=["out.txt"])
        input_file = f"input for {name}\n".encode()
        input_root = re_pb2.Directory(files=[re_pb2.FileNode(name="input.txt", digest=digest_of(input_file))])
        command_bytes = command.SerializeToString()
        input_root_bytes = input_root.SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_of(command_bytes), input_root_digest=digest_of(input_root_bytes)
        )
        for property_name, value in platform:
            action.platform.properties.add(name=property_name, value=value)
        action_bytes = action.SerializeToString()

        blobs = [input_file, command_bytes, input_root_bytes, action_bytes]
        response = await self.cas.BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(blob), data=blob) for blob in blobs],
            ),
            timeout=CALL_TIMEOUT_SECONDS,
        )
        for entry in response.responses:
            if entry.status.code != 0:
                raise CheckError(
                    f"uploading an action's blobs failed: code {entry.status.code}: {entry.status.message}"
                )
        return digest_of(action_bytes)

    async def write_stream(self, digest, chunks):
        """Upload one blob with ByteStream Write from an iterable of chunks and return its size.

        Raises CheckError if the server commits another size.
        """
        resource_name = (
            f"{self.resource_prefix()}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
        )

        def requests():
            offset = 0
            for index, data in enumerate(chunks):
                request = bytestream_pb2.WriteRequest(write_offset=offset, data=data)
                if index == 0:
                    request.resource_name = resource_name
                offset += len(data)
                request.finish_write = offset == digest.size_bytes
                yield request

        response = await self.bytestream.Write(requests(), timeout=STREAM_TIMEOUT_SECONDS)
        if response.committed_size != digest.size_bytes:
            raise CheckError(
                f"ByteStream Write committed {response.committed_size} bytes of a "
                f"{digest.size_bytes}-byte blob"
            )
        return digest.size_bytes

    async def read_stream(self, digest):
        """Read one blob with ByteStream Read and return its size. Raises CheckError on a short read."""
        call = self.bytestream.Read(
            bytestream_pb2.ReadRequest(
                resource_name=f"{self.resource_prefix()}blobs/{digest.hash}/{digest.size_bytes}"
            ),
            timeout=STREAM_TIMEOUT_SECONDS,
        )
        received = 0
        async for response in call:
            received += len(response.data)
        if received != digest.size_bytes:
            raise CheckError(f"ByteStream Read returned {received} bytes of a {digest.size_bytes}-byte blob")
        return received


def blob_chunks(filler, suffix):
    """Yield the blob ``filler + suffix`` in chunks of BYTESTREAM_CHUNK_BYTES, copying each once."""
    filler_size = len(filler)
    size = filler_size + len(suffix)
    for start in range(0, size, BYTESTREAM_CHUNK_BYTES):
        end = min(start + BYTESTREAM_CHUNK_BYTES, size)
        chunk = filler[start:end]
        if end > filler_size:
            chunk += suffix[max(0, start - filler_size):end - filler_size]
        yield chunk


# Scenarios


async def find_missing_blobs(bench):
    """FindMissingBlobs of 1,000 digests, the first half stored, from 8 callers."""
    half = FMB_DIGESTS_PER_REQUEST // 2
    requests, absent_sets = [], []
    for _ in range(FMB_CALLERS):
        present = await bench.upload([bench.blobs.make(FMB_BLOB_BYTES) for _ in range(half)])
        # New digests that are never uploaded.
        absent = [bench.blobs.make(FMB_BLOB_BYTES)[0] for _ in range(half)]
        requests.append(
            re_pb2.FindMissingBlobsRequest(instance_name=bench.instance_name, blob_digests=present + absent)
        )
        absent_sets.append({digest.hash for digest in absent})

    async def operation(caller):
        start = time.perf_counter()
        response = await bench.cas.FindMissingBlobs(requests[caller], timeout=CALL_TIMEOUT_SECONDS)
        latency = time.perf_counter() - start
        missing = {digest.hash for digest in response.missing_blob_digests}
        if missing != absent_sets[caller]:
            raise CheckError(
                f"FindMissingBlobs reported {len(missing)} missing digests, expected the "
                f"{half} absent ones"
            )
        return Operation(latency)

    return [await bench.measure("fmb", f"{FMB_DIGESTS_PER_REQUEST} digests", operation, FMB_CALLERS)]


async def batch_update(bench):
    """BatchUpdateBlobs of 100 new 4 KiB blobs a request, from 4 callers."""

    async def operation(caller):
        entries = []
        for _ in range(BATCH_BLOBS_PER_REQUEST):
            digest, data = bench.blobs.make(BATCH_BLOB_BYTES)
            entries.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data))
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=bench.instance_name, requests=entries)

        start = time.perf_counter()
        response = await bench.cas.BatchUpdateBlobs(request, timeout=CALL_TIMEOUT_SECONDS)
        latency = time.perf_counter() - start
        check_batch_statuses("BatchUpdateBlobs", response.responses)
        return Operation(latency, BATCH_BLOBS_PER_REQUEST * BATCH_BLOB_BYTES)

    case = f"{BATCH_BLOBS_PER_REQUEST} x 4 KiB"
    return [await bench.measure("batch-update", case, operation, BATCH_CALLERS, transfers_data=True)]


async def batch_read(bench):
    """BatchReadBlobs of 100 stored 4 KiB blobs a request, from 4 callers."""
    digests = await bench.upload([bench.blobs.make(BATCH_BLOB_BYTES) for _ in range(BATCH_READ_SET_BLOBS)])
    requests = [
        re_pb2.BatchReadBlobsRequest(
            instance_name=bench.instance_name, digests=digests[start:start + BATCH_BLOBS_PER_REQUEST]
        )
        for start in range(0, len(digests), BATCH_BLOBS_PER_REQUEST)
    ]
    next_request = 0

    async def operation(caller):
        nonlocal next_request
        request = requests[next_request % len(requests)]
        next_request += 1

        start = time.perf_counter()
        response = await bench.cas.BatchReadBlobs(request, timeout=CALL_TIMEOUT_SECONDS)
        latency = time.perf_counter() - start
        check_batch_statuses("BatchReadBlobs", response.responses)
        for entry in response.responses:
            if len(entry.data) != entry.digest.size_bytes:
                raise CheckError(
                    f"BatchReadBlobs returned {len(entry.data)} bytes for a "
                    f"{entry.digest.size_bytes}-byte blob"
                )
        return Operation(latency, BATCH_BLOBS_PER_REQUEST * BATCH_BLOB_BYTES)

    case = f"{BATCH_BLOBS_PER_REQUEST} x 4 KiB"
    return [await bench.measure("batch-read", case, operation, BATCH_CALLERS, transfers_data=True)]


def check_batch_statuses(method, entries):
    if len(entries) != BATCH_BLOBS_PER_REQUEST:
        raise CheckError(f"{method} returned {len(entries)} entries for {BATCH_BLOBS_PER_REQUEST} blobs")
    for entry in entries:
        if entry.status.code != 0:
            raise CheckError(f"{method} failed for {entry.digest.hash}: code {entry.status.code}: {entry.status.message}")


async def bytestream_write(bench):
    """ByteStream Write of new 64 MiB blobs from one caller, of 1 MiB blobs from 4, then of
    64 MiB blobs from 20."""

    async def write_large(caller):
        digest, filler, suffix = bench.blobs.make_parts(LARGE_BLOB_BYTES)
        start = time.perf_counter()
        size = await bench.write_stream(digest, blob_chunks(filler, suffix))
        return Operation(time.perf_counter() - start, size)

    async def write_small(caller):
        digest, data = bench.blobs.make(SMALL_BLOB_BYTES)
        start = time.perf_counter()
        size = await bench.write_stream(digest, [data])
        return Operation(time.perf_counter() - start, size)

    return [
        await bench.measure("bs-write", "64 MiB x1", write_large, 1, transfers_data=True),
        await bench.measure(
            "bs-write", f"1 MiB x{SMALL_BLOB_CALLERS}", write_small, SMALL_BLOB_CALLERS, transfers_data=True
        ),
        # Last, so that its server_peak_rss_mib, which covers the whole scenario, is the
        # memory that many large uploads at once take.
        await bench.measure(
            "bs-write", f"64 MiB x{LARGE_BLOB_WRITERS}", write_large, LARGE_BLOB_WRITERS,
            transfers_data=True,
        ),
    ]


async def bytestream_read(bench):
    """ByteStream Read of one stored 64 MiB blob from one caller, then of 200 1 MiB blobs from 4."""
    large_digest, filler, suffix = bench.blobs.make_parts(LARGE_BLOB_BYTES)
    await bench.write_stream(large_digest, blob_chunks(filler, suffix))
    small_digests = []
    for _ in range(SMALL_BLOB_READ_SET):
        digest, data = bench.blobs.make(SMALL_BLOB_BYTES)
        await bench.write_stream(digest, [data])
        small_digests.append(digest)
    next_small = 0

    async def read_large(caller):
        start = time.perf_counter()
        size = await bench.read_stream(large_digest)
        return Operation(time.perf_counter() - start, size)

    async def read_small(caller):
        nonlocal next_small
        digest = small_digests[next_small % len(small_digests)]
        next_small += 1
        start = time.perf_counter()
        size = await bench.read_stream(digest)
        return Operation(time.perf_counter() - start, size)

    return [
        await bench.measure("bs-read", "64 MiB x1", read_large, 1, transfers_data=True),
        await bench.measure(
            "bs-read", f"1 MiB x{SMALL_BLOB_CALLERS}", read_small, SMALL_BLOB_CALLERS, transfers_data=True
        ),
    ]


async def action_cache(bench):
    """UpdateActionResult of new actions from 8 callers, then GetActionResult of them.

    Each update first stores its Action, Command and input root (not measured).
    """
    output_digests = await bench.upload([bench.blobs.make(256), bench.blobs.make(4096)])
    stdout_digest = (await bench.upload([bench.blobs.make(64)]))[0]
    template = re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(path="out/lib.o", digest=output_digests[0]),
            re_pb2.OutputFile(path="out/lib.a", digest=output_digests[1], is_executable=True),
        ],
        exit_code=0,
        stdout_digest=stdout_digest,
    )
    stored = []

    async def update(caller):
        # bgrid rejects a result whose Action or Command is not in the CAS, so store them
        # first, as Bazel does.
        action_digest = await bench.upload_new_action()
        request = re_pb2.UpdateActionResultRequest(
            instance_name=bench.instance_name, action_digest=action_digest, action_result=template
        )
        start = time.perf_counter()
        await bench.action_cache.UpdateActionResult(request, timeout=CALL_TIMEOUT_SECONDS)
        latency = time.perf_counter() - start
        stored.append(action_digest)
        return Operation(latency)

    next_get = 0

    async def get(caller):
        nonlocal next_get
        action_digest = stored[next_get % len(stored)]
        next_get += 1
        request = re_pb2.GetActionResultRequest(instance_name=bench.instance_name, action_digest=action_digest)
        start = time.perf_counter()
        # A miss is NOT_FOUND, which the runner counts as an error.
        await bench.action_cache.GetActionResult(request, timeout=CALL_TIMEOUT_SECONDS)
        return Operation(time.perf_counter() - start)

    records = [await bench.measure("ac", "update", update, AC_CALLERS)]
    if not stored:
        raise SetupError("no UpdateActionResult succeeded, so there is nothing to get")
    records.append(await bench.measure("ac", "get hit", get, AC_CALLERS))
    return records
