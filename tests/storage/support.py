"""Helpers that start real storage stacks in temporary directories for the storage tests."""

import os

from twisted.internet import task

from bgrid.digest import Digest
from bgrid.storage.cas_layout import IndexRecord
from bgrid.storage.environment import LmdbEnvironment
from bgrid.storage.factory import build_storage
from bgrid.storage.lmdb_cas import LmdbBlobStore
from tests.util import make_temp_dir

MiB = 1 << 20


async def start_storage(test_case, data_dir=None, map_size=1 << 30, clock=None, **options):
    """Build and start a storage stack, and stop it when ``test_case`` ends.

    Returns the started ``StorageStack``. ``clock`` defaults to a new ``task.Clock``,
    so access times move only when the test advances it. ``options`` go to
    ``build_storage``.
    """
    if data_dir is None:
        data_dir = make_temp_dir(test_case)
    if clock is None:
        clock = task.Clock()
    stack = build_storage(data_dir, map_size=map_size, clock=clock, **options)
    await stack.start()
    test_case.addCleanup(stack.stop)
    return stack


async def start_blob_store(test_case, map_size, max_map_size, clock=None, **options):
    """Start an ``LmdbEnvironment`` whose map starts at ``map_size`` bytes and may grow
    to ``max_map_size``, with an ``LmdbBlobStore`` in it, both stopped when
    ``test_case`` ends.

    ``build_storage`` never starts a map below 1 GiB, so tests of a growing map use
    this. ``options`` go to ``LmdbBlobStore``. Returns the started store.
    """
    if clock is None:
        clock = task.Clock()
    environment = LmdbEnvironment(
        make_temp_dir(test_case),
        LmdbBlobStore.DATABASE_NAMES,
        map_size=map_size,
        max_map_size=max_map_size,
    )
    store = LmdbBlobStore(environment, clock, **options)
    environment.start()
    test_case.addCleanup(environment.stop)
    await store.start()
    test_case.addCleanup(store.stop)
    return store


async def assert_consistent(test_case, store):
    """Fail ``test_case`` with every layout problem that ``store`` reports, and check
    that its ``stored_bytes`` matches the recomputed total."""
    test_case.assertEqual(await store.check_consistency(), [])
    total = await store._environment.read(_sum_index_sizes, store._dbs)
    test_case.assertEqual(store.stored_bytes, total)


def _sum_index_sizes(txn, dbs):
    total = 0
    with txn.cursor(db=dbs.index) as cursor:
        for _, data in cursor:
            total += IndexRecord.unpack(data).size_bytes
    return total


def random_blob(size):
    """Return random bytes of ``size`` and their digest."""
    data = os.urandom(size)
    return data, Digest.of(data)


async def read_all(reader, piece_size=MiB):
    """Read an ``IBlobReader`` to its end in pieces of at most ``piece_size`` bytes."""
    pieces = []
    while True:
        piece = await reader.read(piece_size)
        if not piece:
            return b"".join(pieces)
        pieces.append(piece)
