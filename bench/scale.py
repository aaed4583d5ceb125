"""The scale benchmark of bgrid: FindMissingBlobs and Execute as the CAS and the queue grow.

``python -m bench.scale`` starts bgrid on one data directory and fills its CAS in steps
(by default to 10 thousand, 100 thousand, 1 million and 10 million blobs). Before each
step it stops the daemon and writes the new blobs straight into its LMDB environment with
``bgrid.storage.cas_layout``, because uploading millions of blobs over gRPC would take
far longer than the measurement. After each step it starts the daemon again and measures:

- ``fmb``: FindMissingBlobs of 1,000 digests from one caller, half of them drawn at random
  from every blob stored so far and half absent. ``us_per_digest`` is the call's median
  latency divided by 1,000, and ``server_cpu_us_per_digest`` the server's CPU time per
  digest.
- ``exec``: Execute of a new action from one client, with one idle no-op bot waiting, as
  in the ``exec`` scenario of ``python -m bench``.

Then, on the full CAS, it queues jobs that no bot can run, because their actions require a
platform property that no bot offers. It queues them in steps, by default to 10, 100,
1,000 and 10,000 queued jobs, and measures ``exec`` again after each step. Each such job
is submitted with Execute, whose stream is cancelled once the first Operation arrived, so
the job stays queued.

Each case prints one JSON line with the fields of ``python -m bench`` plus ``blobs``,
``queued_jobs`` and ``server_rss_anon_mib``, and each load step prints a line with case
``load`` and its seconds. The loaded blobs are the UTF-8 text ``bgrid-scale-blob N`` for N
from 0, so the tool derives any stored digest from its number without keeping a list.
They take 350 to 500 bytes of disk each (3.4 GB for 10 million, measured with LMDB 0.9.36
on ext4), and the free space is checked before each load.
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import shutil
import sys
import time

import grpc
import lmdb

from bench import execution
from bench.load import CheckError, Operation, Settings
from bench.procstat import ProcessTreeMonitor, memory_kib
from bench.scenarios import CALL_TIMEOUT_SECONDS, Bench, SetupError
from bench.servers import CHANNEL_OPTIONS, PRESETS, Server, ServerStartError, remove_tree
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc
from bgrid.storage import cas_layout

DEFAULT_BLOB_COUNTS = (10_000, 100_000, 1_000_000, 10_000_000)
DEFAULT_QUEUED_COUNTS = (10, 100, 1_000, 10_000)
SMOKE_BLOB_COUNTS = (1_000, 2_000)
SMOKE_QUEUED_COUNTS = (5, 10)

DEFAULT_DURATION_SECONDS = 5.0
DEFAULT_WARMUP_SECONDS = 1.0
SMOKE_DURATION_SECONDS = 0.2

FMB_DIGESTS_PER_REQUEST = 1000

# Blobs written per LMDB transaction while loading. A transaction copies every B-tree page
# it changes, so fewer and larger batches, each sorted by hash, copy the index leaves
# fewer times.
LOAD_BATCH_BLOBS = 1_000_000
# Disk space per loaded blob in bytes: measured at 350 to 500 for the index record, the
# LRU key and the chunk in LMDB's B-trees, with room to spare.
DISK_BYTES_PER_BLOB = 600
# Address space reserved for the map while loading. The file grows only as pages are
# written, so this costs no disk.
LOAD_MAP_SIZE = 1 << 40

# The platform property that the actions of queued jobs require and no bot offers.
UNMATCHED_PROPERTY = ("bench-scale-pool", "no-bot-offers-this")
# Concurrent Execute calls while queuing jobs.
QUEUE_CALLERS = 16


def scale_blob(number):
    """Return the loaded blob with number ``number``."""
    return b"bgrid-scale-blob %d" % number


def absent_blob(number):
    """Return a blob that the tool never stores, for the absent half of a FindMissingBlobs."""
    return b"bgrid-scale-absent %d" % number


def digest_proto(data):
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def progress(message):
    print(f"bench.scale: {message}", file=sys.stderr, flush=True)


# Loading


def lmdb_path(directory):
    """Return the LMDB directory of the bgrid preset started with ``{tmp}`` = ``directory``."""
    return os.path.join(directory, "data", "lmdb")


def check_free_space(path, blob_count):
    """Raise SetupError when the file system of ``path`` cannot take ``blob_count`` blobs."""
    needed = blob_count * DISK_BYTES_PER_BLOB
    free = shutil.disk_usage(path).free
    if free < needed:
        raise SetupError(
            f"loading {blob_count} blobs needs about {needed / 1e9:.1f} GB of disk, but "
            f"{path} has {free / 1e9:.1f} GB free. Give smaller --blobs counts or free space"
        )


def load_blobs(path, first, count):
    """Store the blobs numbered ``first`` to ``first + count - 1`` in the CAS at ``path``.

    ``path`` is the LMDB environment of a bgrid daemon that is stopped. Each transaction
    writes ``LOAD_BATCH_BLOBS`` blobs, sorted by hash so that their index records go into
    the B-tree in order, with the access time of now. Returns the seconds it took.
    """
    start = time.monotonic()
    accessed_at = int(time.time())
    environment = lmdb.open(
        path,
        map_size=LOAD_MAP_SIZE,
        max_dbs=len(cas_layout.DATABASE_NAMES),
        # The final sync below makes the whole load durable, so single commits need not.
        sync=False,
        metasync=False,
    )
    try:
        dbs = cas_layout.CasDatabases(
            *(environment.open_db(name) for name in cas_layout.DATABASE_NAMES)
        )
        sha256 = hashlib.sha256
        for batch_start in range(first, first + count, LOAD_BATCH_BLOBS):
            batch_end = min(first + count, batch_start + LOAD_BATCH_BLOBS)
            data = [scale_blob(number) for number in range(batch_start, batch_end)]
            blobs = sorted(zip([sha256(blob).digest() for blob in data], data))
            with environment.begin(write=True) as txn:
                inserted, _ = cas_layout.insert_new_blobs(txn, dbs, blobs, accessed_at)
            if not all(inserted):
                raise SetupError(
                    f"{inserted.count(False)} of the blobs {batch_start} to {batch_end - 1} "
                    f"were in the CAS at {path} already: load into a new data directory"
                )
        environment.sync(True)
    finally:
        environment.close()
    return time.monotonic() - start


# Cases


async def measure_fmb(bench, blob_count, extra):
    """FindMissingBlobs of 500 stored digests, drawn from all ``blob_count``, and 500 absent."""
    half = FMB_DIGESTS_PER_REQUEST // 2
    chooser = random.Random(blob_count)
    absent_numbers = iter(range(sys.maxsize))

    async def operation(caller):
        present = [digest_proto(scale_blob(chooser.randrange(blob_count))) for _ in range(half)]
        absent = [digest_proto(absent_blob(next(absent_numbers))) for _ in range(half)]
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=bench.instance_name, blob_digests=present + absent
        )
        start = time.perf_counter()
        response = await bench.cas.FindMissingBlobs(request, timeout=CALL_TIMEOUT_SECONDS)
        latency = time.perf_counter() - start
        missing = {digest.hash for digest in response.missing_blob_digests}
        if missing != {digest.hash for digest in absent}:
            raise CheckError(
                f"FindMissingBlobs reported {len(missing)} missing digests, expected the "
                f"{half} absent ones"
            )
        return Operation(latency)

    record = await bench.measure(
        "scale", f"fmb {FMB_DIGESTS_PER_REQUEST} digests", operation, 1, extra=extra
    )
    if record["p50_ms"] is not None:
        record["us_per_digest"] = round(record["p50_ms"] * 1000 / FMB_DIGESTS_PER_REQUEST, 3)
    if record["server_cpu_s_per_op"] is not None:
        record["server_cpu_us_per_digest"] = round(
            record["server_cpu_s_per_op"] * 1e6 / FMB_DIGESTS_PER_REQUEST, 3
        )
    return record


async def measure_exec(bench, extra):
    """Execute new actions from one client, with one idle no-op bot waiting."""
    stub = remote_execution_pb2_grpc.ExecutionStub(bench.channel)
    label = bench.blobs.make_text("bench-scale-bot")
    async with execution.running_bots(bench.server.address, bench.instance_name, 1, label) as bots:

        async def operation(caller):
            return await execution.execute_new_action(bench, stub)

        record = await bench.measure("scale", "exec 1 client", operation, 1, extra=extra)
    return execution.add_bot_figures(record, bots)


async def queue_unrunnable_jobs(bench, count):
    """Submit ``count`` new actions that no bot can run, and leave their jobs queued."""
    stub = remote_execution_pb2_grpc.ExecutionStub(bench.channel)
    numbers = iter(range(count))

    async def submit_all():
        for _ in numbers:
            action_digest = await bench.upload_new_action(platform=[UNMATCHED_PROPERTY])
            request = re_pb2.ExecuteRequest(
                instance_name=bench.instance_name, action_digest=action_digest
            )
            call = stub.Execute(request, timeout=execution.EXECUTE_TIMEOUT_SECONDS)
            try:
                first = await call.read()
            finally:
                call.cancel()
            if first is grpc.aio.EOF or first.done:
                raise SetupError(
                    "an action that no bot can run was not left queued: its Execute stream "
                    f"sent {'nothing' if first is grpc.aio.EOF else 'a done operation'}"
                )

    await asyncio.gather(*(submit_all() for _ in range(QUEUE_CALLERS)))


# The run


class ScaleRun:
    """One bgrid data directory that grows through the steps, and the daemon on it."""

    def __init__(self, settings, keep):
        self.settings = settings
        self.keep = keep
        self.server = Server(PRESETS["bgrid"], keep_directory=True)
        self.directory = None
        self.blob_count = 0
        self.queued_count = 0

    async def start(self):
        try:
            await self.server.start(self.directory)
        finally:
            # Also after a failed start, so that remove() finds the directory.
            self.directory = self.server.directory

    def stop(self):
        for problem in self.server.stop():
            progress(problem)

    def remove(self):
        if self.directory is None:
            return
        if self.keep:
            progress(f"kept the data directory {self.directory}")
        else:
            remove_tree(self.directory)

    def extra(self):
        return {"blobs": self.blob_count, "queued_jobs": self.queued_count}

    async def grow_cas(self, blob_count):
        """Stop the daemon, load blobs up to ``blob_count``, start it again; return the record."""
        added = blob_count - self.blob_count
        self.stop()
        path = lmdb_path(self.directory)
        check_free_space(path, added)
        progress(f"loading {added} blobs, up to {blob_count}")
        seconds = load_blobs(path, self.blob_count, added)
        self.blob_count = blob_count
        await self.start()
        return {
            "scenario": "scale",
            "case": "load",
            "server": self.server.spec.name,
            "loaded": added,
            "seconds": round(seconds, 3),
            "blobs_per_s": round(added / seconds, 1) if seconds > 0 else None,
            **self.extra(),
        }

    async def measure(self, cases):
        """Run ``cases`` (coroutine functions of a Bench) on the running daemon.

        Each record gets ``server_rss_anon_mib``, the daemon's anonymous resident memory
        after the case. Unlike ``server_peak_rss_mib``, it leaves out the pages of the LMDB
        file that the daemon has mapped, which grow with the CAS but belong to the page
        cache.
        """
        monitor = ProcessTreeMonitor(self.server.process.pid)
        monitor.sample()
        records = []
        async with grpc.aio.insecure_channel(self.server.address, options=CHANNEL_OPTIONS) as channel:
            bench = Bench(self.server, monitor, self.settings, channel)
            for case in cases:
                record = await case(bench)
                rss_anon_kib = memory_kib(self.server.process.pid, "RssAnon")
                record["server_rss_anon_mib"] = round(rss_anon_kib / 1024, 1)
                records.append(record)
        return records

    async def run(self, blob_counts, queued_counts):
        """Yield the records of every step, in order."""
        await self.start()
        for blob_count in blob_counts:
            yield await self.grow_cas(blob_count)
            for record in await self.measure([
                lambda bench: measure_fmb(bench, self.blob_count, self.extra()),
                lambda bench: measure_exec(bench, self.extra()),
            ]):
                yield record

        for queued_count in queued_counts:
            added = queued_count - self.queued_count
            progress(f"queuing {added} jobs that no bot can run, up to {queued_count}")

            async def queue_and_measure(bench):
                await queue_unrunnable_jobs(bench, added)
                self.queued_count = queued_count
                return await measure_exec(bench, self.extra())

            for record in await self.measure([queue_and_measure]):
                yield record


def parse_counts(text, option):
    try:
        counts = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option}: expected comma-separated integers, got {text!r}")
    if not counts or any(count < 1 for count in counts) or counts != sorted(set(counts)):
        raise argparse.ArgumentTypeError(
            f"{option}: expected increasing positive counts, got {text!r}"
        )
    return counts


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=(
            "Measure bgrid's FindMissingBlobs cost per digest and Execute latency as its CAS "
            "grows and as jobs that no bot can run fill its queue. Prints one JSON line per "
            "case."
        ),
        epilog=(
            "Example: python -m bench.scale --blobs 10000,1000000 --queued 10,1000. The "
            "blobs are written straight into the stopped daemon's LMDB environment, about "
            f"{DISK_BYTES_PER_BLOB} bytes of disk each."
        ),
    )
    parser.add_argument(
        "--blobs", type=lambda text: parse_counts(text, "--blobs"), metavar="COUNTS",
        help="comma-separated CAS sizes in blobs to measure at, increasing (default: "
             f"{','.join(map(str, DEFAULT_BLOB_COUNTS))})",
    )
    parser.add_argument(
        "--queued", type=lambda text: parse_counts(text, "--queued"), metavar="COUNTS",
        help="comma-separated numbers of queued jobs to measure at, increasing (default: "
             f"{','.join(map(str, DEFAULT_QUEUED_COUNTS))})",
    )
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help=f"measured seconds of each case (default: {DEFAULT_DURATION_SECONDS:g})",
    )
    parser.add_argument(
        "--warmup", type=float, default=None, metavar="SECONDS",
        help=f"unmeasured seconds of load before each case (default: {DEFAULT_WARMUP_SECONDS:g})",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"check that the tool works: blobs {','.join(map(str, SMOKE_BLOB_COUNTS))}, "
             f"queued {','.join(map(str, SMOKE_QUEUED_COUNTS))}, "
             f"{SMOKE_DURATION_SECONDS:g} s a case, no warmup",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the data directory and print where it is",
    )
    return parser


async def run(blob_counts, queued_counts, settings, keep):
    scale_run = ScaleRun(settings, keep)
    try:
        async for record in scale_run.run(blob_counts, queued_counts):
            print(json.dumps(record), flush=True)
    finally:
        scale_run.stop()
        scale_run.remove()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        blob_counts = args.blobs or list(SMOKE_BLOB_COUNTS)
        queued_counts = args.queued or list(SMOKE_QUEUED_COUNTS)
        duration, warmup = SMOKE_DURATION_SECONDS, 0.0
    else:
        blob_counts = args.blobs or list(DEFAULT_BLOB_COUNTS)
        queued_counts = args.queued or list(DEFAULT_QUEUED_COUNTS)
        duration = args.duration if args.duration is not None else DEFAULT_DURATION_SECONDS
        warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP_SECONDS
    settings = Settings(duration=duration, max_requests=None, warmup=warmup, smoke=args.smoke)
    try:
        asyncio.run(run(blob_counts, queued_counts, settings, args.keep))
    except (SetupError, ServerStartError) as error:
        progress(str(error))
        return 1
    except KeyboardInterrupt:
        progress("interrupted, after stopping bgrid")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
