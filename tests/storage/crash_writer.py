"""A child process for the crash tests: writes blobs into a real ``LmdbBlobStore`` until it
is killed.

Run as ``python -m tests.storage.crash_writer DATA_DIR``. It opens the storage stack in
DATA_DIR with a 4 MiB quota, so eviction runs too, and prints one line per event on
stdout, flushed at once:

- ``streaming HASH SIZE`` once a streamed upload has stored chunks that it never
  commits, so a kill always finds an unfinished upload;
- ``stored HASH SIZE`` after each blob's write has been committed, from batch updates
  and from streamed uploads that do commit.
"""

import os
import sys

from twisted.internet import defer, task

from bgrid.digest import Digest
from bgrid.storage.factory import build_storage

MiB = 1 << 20
QUOTA = 4 * MiB


def report(event, digest):
    sys.stdout.write(f"{event} {digest.hash} {digest.size_bytes}\n")
    sys.stdout.flush()


async def write_forever(store):
    # An upload left open: 3 MiB written means at least one chunk is committed, because
    # the writer buffers at most 2 MiB. The blob stays below the quota.
    unfinished = os.urandom(3 * MiB + MiB // 2)
    writer = store.open_writer(Digest.of(unfinished))
    await writer.write(unfinished[: 3 * MiB])
    report("streaming", writer.digest)

    while True:
        blobs = [os.urandom(size) for size in (10_000, 200_000, 700_000, 1)]
        digests = [Digest.of(data) for data in blobs]
        results = await store.put_many(zip(digests, blobs))
        for digest, error in zip(digests, results):
            if error is None:
                report("stored", digest)

        data = os.urandom(MiB + 300_000)
        streamed = store.open_writer(Digest.of(data))
        for start in range(0, len(data), 256 * 1024):
            await streamed.write(data[start : start + 256 * 1024])
        await streamed.commit()
        report("stored", streamed.digest)


async def main(reactor, data_dir):
    stack = build_storage(data_dir, map_size=1 << 30, max_cas_size=QUOTA, cas_low_watermark=0.5)
    # Stopping closes the reader threads, which would keep the process alive after an
    # error or a SIGTERM.
    reactor.addSystemEventTrigger("before", "shutdown", stack.stop)
    await stack.start()
    await write_forever(stack.blob_store)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1])))
