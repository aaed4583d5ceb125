"""The one place that builds bgrid's storage stack from plain arguments."""

from twisted.application import service
from twisted.logger import Logger

from bgrid.scheduler.store import LmdbSchedulerStore
from bgrid.storage.cas_eviction import DEFAULT_LOW_WATERMARK
from bgrid.storage.completeness import CompletenessCheckingActionCache
from bgrid.storage.environment import (
    DEFAULT_MAP_SIZE,
    DEFAULT_READER_THREADS,
    LmdbEnvironment,
)
from bgrid.storage.lmdb_action_cache import LmdbActionCache
from bgrid.storage.lmdb_cas import DEFAULT_ACCESS_FLUSH_INTERVAL, LmdbBlobStore

# The LMDB map starts at this size, or at map_size when smaller, and doubles when full up
# to map_size, so the address space reserved follows the data.
INITIAL_MAP_SIZE = 1 << 30


class StorageStack(service.Service):
    """The storage of one server: the LMDB environment, the blob store and the action
    cache, started and stopped together.

    ``blob_store`` provides ``IBlobStore`` and ``action_cache`` provides ``IActionCache``
    with the completeness check in front of the LMDB cache.
    """

    log = Logger()

    def __init__(self, environment, blob_store, lmdb_action_cache, action_cache):
        self.environment = environment
        self.blob_store = blob_store
        self.action_cache = action_cache
        self._lmdb_action_cache = lmdb_action_cache

    def start(self):
        """Open the environment and start the stores.

        Raises when the environment cannot be opened. Returns a Deferred firing with None
        once the blob store has deleted the uploads a crash left unfinished.
        """
        self.environment.start()
        self._lmdb_action_cache.start()
        return self.blob_store.start()

    def stop(self):
        """Write pending access times, then close the environment.

        Returns a Deferred firing with None once the environment is closed.
        """
        self._lmdb_action_cache.stop()
        stopping = self.blob_store.stop()
        stopping.addCallback(lambda _: self.environment.stop())
        return stopping

    def startService(self):
        super().startService()
        starting = self.start()
        starting.addErrback(
            lambda failure: self.log.failure("storage failed to start", failure)
        )

    def stopService(self):
        super().stopService()
        return self.stop()


def build_storage(
    data_dir,
    map_size=DEFAULT_MAP_SIZE,
    clock=None,
    reactor=None,
    reader_threads=DEFAULT_READER_THREADS,
    access_flush_interval=DEFAULT_ACCESS_FLUSH_INTERVAL,
    max_cas_size=None,
    cas_low_watermark=DEFAULT_LOW_WATERMARK,
):
    """Build the storage stack over the LMDB environment in ``data_dir``.

    ``map_size`` is the maximum size of the database in bytes. ``reactor`` delivers
    results from the storage threads (the global reactor by default) and ``clock``, an
    ``IReactorTime``, gives access times and drives their flush (``reactor`` by
    default). ``access_flush_interval`` is in seconds. ``max_cas_size`` is the CAS
    quota in bytes of stored blobs (None: no quota, only the map limits the store) and
    ``cas_low_watermark`` the fraction of it that eviction goes down to. Nothing is
    opened until ``start`` or ``startService``.
    """
    if clock is None:
        if reactor is None:
            from twisted.internet import reactor
        clock = reactor

    environment = LmdbEnvironment(
        data_dir,
        LmdbBlobStore.DATABASE_NAMES
        + LmdbActionCache.DATABASE_NAMES
        + LmdbSchedulerStore.DATABASE_NAMES,
        map_size=min(map_size, INITIAL_MAP_SIZE),
        max_map_size=map_size,
        reader_threads=reader_threads,
        reactor=reactor,
    )
    blob_store = LmdbBlobStore(
        environment, clock, access_flush_interval, max_cas_size, cas_low_watermark
    )
    lmdb_action_cache = LmdbActionCache(environment)
    action_cache = CompletenessCheckingActionCache(lmdb_action_cache, blob_store)
    return StorageStack(environment, blob_store, lmdb_action_cache, action_cache)
