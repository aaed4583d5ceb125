"""A child process for the full-disk tests: writes blobs into a real ``LmdbBlobStore``
whose data file cannot grow past a file size limit (RLIMIT_FSIZE), as on a full disk.

Run as ``python -m tests.storage.disk_full_writer DATA_DIR LIMIT_BYTES``. The LMDB map
is far larger than the limit and the CAS has no quota, so only the full "disk" makes the
store evict. The child runs three phases and prints one JSON object on stdout:

- ``fill``: uploads BLOB_COUNT blobs of BLOB_BYTES, a few per ``put_many``, one clock
  second apart. ``fill_errors`` lists the error of each blob that failed.
- ``pinned``: pins every stored blob, then uploads pinned new blobs until one fails, and
  two more after it. ``pinned_errors`` lists ``[class name, message]`` of each failure.
- ``after``: reads every stored blob back, checks the layout, releases the pins and
  uploads the first rejected blob again.

``stored`` lists the digests (``[hash, size]``) present at the end, ``log`` the messages
the storage logged at level warn or above, and ``evictions`` its eviction messages.
"""

import json
import os
import resource
import signal
import sys

from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from bgrid.digest import Digest
from bgrid.storage.factory import build_storage

BLOB_BYTES = 64 * 1024
BLOB_COUNT = 160
BLOBS_PER_CALL = 4
MAX_PINNED_UPLOADS = 400
FAILURES_AFTER_FIRST = 2


def new_blob():
    data = os.urandom(BLOB_BYTES)
    return Digest.of(data), data


async def fill(store, clock):
    errors = []
    for _ in range(BLOB_COUNT // BLOBS_PER_CALL):
        blobs = [new_blob() for _ in range(BLOBS_PER_CALL)]
        for (digest, _), error in zip(blobs, await store.put_many(blobs)):
            if error is not None:
                errors.append(f"{digest}: {error!r}")
        clock.advance(1)
    return errors


async def present(store, digests):
    missing = set(await store.find_missing(digests))
    return [digest for digest in digests if digest not in missing]


async def upload_pinned_until_failures(store, tokens):
    """Return the first rejected ``(digest, data)`` and the failures."""
    failures = []
    rejected = None
    for _ in range(MAX_PINNED_UPLOADS):
        digest, data = new_blob()
        tokens.append(await store.pin([digest]))
        try:
            await store.put(digest, data)
        except Exception as error:
            failures.append([type(error).__name__, str(error)])
            if rejected is None:
                rejected = (digest, data)
            if len(failures) > FAILURES_AFTER_FIRST:
                break
    return rejected, failures


async def run(reactor, data_dir, limit_bytes):
    # The kernel sends SIGXFSZ to a process that writes past its limit, and the write
    # fails with EFBIG when the signal is ignored.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    logged = []

    def observe(event):
        if event.get("log_level", LogLevel.info) >= LogLevel.warn or "evicted" in event.get(
            "log_format", ""
        ):
            logged.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    clock = task.Clock()
    clock.advance(1_000_000)
    stack = build_storage(data_dir, map_size=1 << 30, clock=clock, reactor=reactor)
    await stack.start()
    store = stack.blob_store
    report = {}

    report["fill_errors"] = await fill(store, clock)

    digests = await stack.environment.read(_index_digests, store._dbs)
    tokens = [await store.pin(digests)]
    rejected, report["pinned_errors"] = await upload_pinned_until_failures(store, tokens)

    stored = await stack.environment.read(_index_digests, store._dbs)
    blobs = await store.get_many(stored)
    report["unreadable"] = [
        str(digest)
        for digest, data in zip(stored, blobs)
        if not isinstance(data, bytes) or Digest.of(data) != digest
    ]
    report["layout_problems"] = await store.check_consistency()
    report["rejected_missing"] = rejected is not None and bool(
        await store.find_missing([rejected[0]])
    )

    for token in tokens:
        store.unpin(token)
    report["retry_error"] = None
    if rejected is not None:
        try:
            await store.put(*rejected)
            report["retry_read_back"] = await store.get(rejected[0]) == rejected[1]
        except Exception as error:
            report["retry_error"] = repr(error)

    await stack.stop()
    stored = await _reopen_and_list(data_dir)
    report["stored"] = [[digest.hash, digest.size_bytes] for digest in stored]
    report["log"] = [message for level, message in logged if level != "info"]
    report["evictions"] = [message for level, message in logged if level == "info"]
    globalLogPublisher.removeObserver(observe)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


async def _reopen_and_list(data_dir):
    # The stop flushed the log of failures, so the log is complete. Reopening reads
    # the data only, so the file size limit does not matter.
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    stack = build_storage(data_dir, map_size=1 << 30)
    await stack.start()
    try:
        return await stack.environment.read(_index_digests, stack.blob_store._dbs)
    finally:
        await stack.stop()


def _index_digests(txn, dbs):
    from bgrid.storage import cas_layout

    with txn.cursor(db=dbs.index) as cursor:
        return [
            Digest(bytes(key).hex(), cas_layout.IndexRecord.unpack(data).size_bytes)
            for key, data in cursor
        ]


if __name__ == "__main__":
    task.react(
        lambda reactor: defer.Deferred.fromCoroutine(
            run(reactor, sys.argv[1], int(sys.argv[2]))
        )
    )
