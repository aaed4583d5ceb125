"""The bot's local blob cache: content-addressed files under the work directory, bounded
in bytes, evicting the least recently used blobs that no lease is using.
"""

import asyncio
import contextlib
import os
from collections import OrderedDict

from twisted.logger import Logger

from bgrid.digest import EMPTY_DIGEST, HASH_HEX_LENGTH, Digest
from bgrid.errors import InvalidArgumentError


class BlobCache:
    """Blobs stored as ``{root}/{hash[:2]}/{hash}-{size}``, each written whole by rename.

    The index lives in memory and is touched only on the event loop thread. The order of
    use survives a restart through the files' modification times, which ``fetch`` updates.
    A blob that a lease has pinned is never evicted, so the cache may exceed ``max_bytes``
    while pinned blobs alone are larger than that.
    """

    log = Logger()

    def __init__(self, root, max_bytes, cas):
        self.root = root
        self.max_bytes = max_bytes
        self._cas = cas
        self._entries = OrderedDict()  # Digest -> size in bytes, least recently used first
        self._total_bytes = 0
        self._pins = {}  # Digest -> number of holders
        self._downloads = {}  # Digest -> future of a download in progress

    @property
    def total_bytes(self):
        """The bytes held in cached blobs."""
        return self._total_bytes

    def __contains__(self, digest):
        return digest in self._entries

    def path(self, digest):
        """Return the path of the file that stores ``digest`` once it is cached."""
        return os.path.join(self.root, digest.hash[:2], f"{digest.hash}-{digest.size_bytes}")

    def load(self):
        """Index the blobs already on disk and remove unfinished downloads.

        Blocking: call it off the reactor thread, before any other method.
        """
        os.makedirs(self.root, exist_ok=True)
        found = []
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                digest = _parse_file_name(entry.name)
                if digest is None or not entry.is_file(follow_symlinks=False):
                    # Partial downloads and strays; nothing else writes here.
                    _remove(entry.path)
                    continue
                stat = entry.stat(follow_symlinks=False)
                if stat.st_size != digest.size_bytes:
                    _remove(entry.path)
                    continue
                found.append((stat.st_mtime_ns, digest))
        for _, digest in sorted(found):
            self._entries[digest] = digest.size_bytes
            self._total_bytes += digest.size_bytes
        self._evict()
        self.log.info(
            "blob cache {root} contains {count} blobs, {total_bytes} bytes",
            root=self.root,
            count=len(self._entries),
            total_bytes=self._total_bytes,
        )

    @contextlib.contextmanager
    def pinned(self):
        """Return a context whose ``pin(digests)`` keeps blobs from eviction until it exits."""
        holder = _Pins(self)
        try:
            yield holder
        finally:
            holder.release()

    def _pin(self, digest):
        self._pins[digest] = self._pins.get(digest, 0) + 1

    def _unpin(self, digest):
        count = self._pins[digest] - 1
        if count:
            self._pins[digest] = count
        else:
            del self._pins[digest]

    async def fetch(self, digests):
        """Make sure that every blob of ``digests`` is cached, downloading what is absent.

        Marks each as just used. Raises MissingBlobsError when the server lacks some; the
        others are still cached. Two leases that need the same absent blob share one
        download. Pin the digests first if they must stay until used.
        """
        digests = list(dict.fromkeys(digests))
        if EMPTY_DIGEST in digests and EMPTY_DIGEST not in self._entries:
            await asyncio.to_thread(_write_empty, self.path(EMPTY_DIGEST))
            self._add(EMPTY_DIGEST)

        while True:
            # Touching forgets files that were removed from disk, so they count as absent.
            self._touch([digest for digest in digests if digest in self._entries])
            absent = [digest for digest in digests if digest not in self._entries]
            if not absent:
                break
            own = [digest for digest in absent if digest not in self._downloads]
            if own:
                await self._download_shared(own)
            else:
                # Every absent blob is being downloaded for another lease. If that download
                # fails, the next round downloads what is still absent and raises its own error.
                await asyncio.wait({self._downloads[digest] for digest in absent})

        self._evict()

    async def _download_shared(self, digests):
        # The future only signals the end of the download; waiters check the index after it.
        done = asyncio.get_running_loop().create_future()
        for digest in digests:
            self._downloads[digest] = done
        try:
            await self._download(digests)
        finally:
            for digest in digests:
                del self._downloads[digest]
            done.set_result(None)

    async def _download(self, digests):
        shards = {os.path.dirname(self.path(digest)) for digest in digests}
        await asyncio.to_thread(lambda: [os.makedirs(shard, exist_ok=True) for shard in shards])
        try:
            await self._cas.download_files({digest: self.path(digest) for digest in digests})
        finally:
            # Blobs that arrived are indexed even when others were missing.
            present = await asyncio.to_thread(
                lambda: [digest for digest in digests if os.path.exists(self.path(digest))]
            )
            for digest in present:
                self._add(digest)

    def read(self, digest):
        """Return the bytes of a cached blob; meant for small blobs such as messages."""
        with open(self.path(digest), "rb") as source:
            return source.read()

    def _add(self, digest):
        if digest not in self._entries:
            self._entries[digest] = digest.size_bytes
            self._total_bytes += digest.size_bytes

    def _touch(self, digests):
        for digest in digests:
            self._entries.move_to_end(digest)
            try:
                os.utime(self.path(digest))
            except FileNotFoundError:
                # Removed behind the bot's back, so forget it and let fetch download it again.
                self.log.warn("cached blob {digest} disappeared from disk", digest=str(digest))
                self._forget(digest)

    def _forget(self, digest):
        size = self._entries.pop(digest, None)
        if size is not None:
            self._total_bytes -= size

    def _evict(self):
        if self._total_bytes <= self.max_bytes:
            return
        for digest in list(self._entries):
            if self._total_bytes <= self.max_bytes:
                break
            if digest in self._pins or digest in self._downloads:
                continue
            _remove(self.path(digest))
            self._forget(digest)


class _Pins:
    """The pins of one holder, released together."""

    def __init__(self, cache):
        self._cache = cache
        self._digests = []

    def pin(self, digests):
        for digest in digests:
            self._cache._pin(digest)
            self._digests.append(digest)

    def release(self):
        for digest in self._digests:
            self._cache._unpin(digest)
        self._digests = []


def _parse_file_name(name):
    hash_hex, separator, size = name.partition("-")
    if not separator or len(hash_hex) != HASH_HEX_LENGTH or not size.isdigit():
        return None
    try:
        return Digest.parse(hash_hex, size)
    except InvalidArgumentError:
        return None


def _write_empty(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb"):
        pass


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
