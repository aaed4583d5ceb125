"""The closed-loop load runner, its measurements, and unique test data.

A case runs ``callers`` concurrent loops, each calling one operation after another, until
the duration has passed or the request limit is reached. Each operation returns its own
latency, so work that only prepares a request (hashing a new blob, uploading an action's
inputs) can stay out of it while still counting in the throughput.
"""

import asyncio
import dataclasses
import hashlib
import math
import os
import time

import grpc

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

# A case stops early after this many failed operations: the server is broken, and
# further calls would only repeat the error.
MAX_ERRORS = 100


class CheckError(Exception):
    """A response had the wrong shape: a missing entry, a wrong size or an error status."""


@dataclasses.dataclass
class Settings:
    """Knobs of one benchmark run.

    ``duration`` is the measured time of each case in seconds, ``max_requests`` an optional
    limit on the operations of each case, and ``warmup`` the seconds of unmeasured load
    before the measurement.
    """

    duration: float = 10.0
    max_requests: int | None = None
    warmup: float = 1.0
    smoke: bool = False
    instance_name: str = ""


@dataclasses.dataclass
class Operation:
    """The outcome of one successful operation: its latency in seconds and payload bytes."""

    latency: float
    payload_bytes: int = 0


class LoadStats:
    """Latencies, payload bytes and errors of the operations of one case."""

    def __init__(self):
        self.latencies = []
        self.payload_bytes = 0
        self.errors = 0
        self.first_error = None

    @property
    def ops(self):
        return len(self.latencies)

    def record(self, operation):
        self.latencies.append(operation.latency)
        self.payload_bytes += operation.payload_bytes

    def record_error(self, error):
        self.errors += 1
        if self.first_error is None:
            self.first_error = describe_error(error)


def describe_error(error):
    """Return a one-line description of a gRPC or check error."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"


def percentile_ms(latencies, fraction):
    """Return the nearest-rank percentile of ``latencies`` (seconds) in milliseconds, or None."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return round(ordered[rank - 1] * 1000.0, 3)


async def run_closed_loop(operation, callers, duration, max_requests=None):
    """Run ``callers`` loops of ``await operation(caller_index)`` and return (LoadStats, seconds).

    A loop starts no operation after ``duration`` seconds, but every loop starts at least
    one, so a short smoke run still calls the server. ``operation`` returns an Operation
    and raises grpc.aio.AioRpcError or CheckError on failure.
    """
    stats = LoadStats()
    started = 0
    start = time.monotonic()
    deadline = start + duration

    async def loop(caller_index):
        nonlocal started
        first = True
        while stats.errors < MAX_ERRORS:
            if max_requests is not None and started >= max_requests:
                return
            if not first and time.monotonic() >= deadline:
                return
            first = False
            started += 1
            try:
                stats.record(await operation(caller_index))
            except (grpc.aio.AioRpcError, CheckError) as error:
                stats.record_error(error)

    await asyncio.gather(*(loop(index) for index in range(callers)))
    return stats, time.monotonic() - start


def digest_of(data):
    """Return the SHA-256 REAPI Digest of ``data``."""
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class UniqueBlobs:
    """Blobs that no earlier run stored: random filler, then a random token and a counter.

    The filler of each size is drawn once per run and its SHA-256 state is kept, so a new
    blob costs one hash of its last 16 bytes and one copy, not fresh random bytes.
    """

    SUFFIX_BYTES = 16

    def __init__(self):
        self._token = os.urandom(8)
        self._counter = 0
        self._fillers = {}

    def _suffix(self):
        self._counter += 1
        return self._token + self._counter.to_bytes(8, "big")

    def _filler(self, size):
        """Return (filler bytes, SHA-256 object over them) for blobs of ``size`` bytes."""
        if size < self.SUFFIX_BYTES:
            raise ValueError(f"unique blobs need at least {self.SUFFIX_BYTES} bytes, got {size}")
        entry = self._fillers.get(size)
        if entry is None:
            filler = os.urandom(size - self.SUFFIX_BYTES)
            entry = self._fillers[size] = (filler, hashlib.sha256(filler))
        return entry

    def make(self, size):
        """Return (digest, data) of a new blob of ``size`` bytes."""
        digest, filler, suffix = self.make_parts(size)
        return digest, filler + suffix

    def make_parts(self, size):
        """Return (digest, filler, suffix) of a new blob ``filler + suffix`` of ``size`` bytes.

        Large blobs are sent chunk by chunk from the parts, without joining them.
        """
        filler, filler_hash = self._filler(size)
        suffix = self._suffix()
        hasher = filler_hash.copy()
        hasher.update(suffix)
        return re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=size), filler, suffix

    def make_text(self, label):
        """Return a short unique string, for command arguments and bot names."""
        return f"{label}-{self._token.hex()}-{self._suffix()[8:].hex()}"
