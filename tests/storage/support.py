"""Helpers that start real storage stacks in temporary directories for the storage tests."""

import os

from twisted.internet import task

from bgrid.digest import Digest
from bgrid.storage.factory import build_storage
from tests.util import make_temp_dir

MiB = 1 << 20


async def start_storage(test_case, data_dir=None, map_size=1 << 30, clock=None):
    """Build and start a storage stack, and stop it when ``test_case`` ends.

    Returns the started ``StorageStack``. ``clock`` defaults to a new ``task.Clock``,
    so access times move only when the test advances it.
    """
    if data_dir is None:
        data_dir = make_temp_dir(test_case)
    if clock is None:
        clock = task.Clock()
    stack = build_storage(data_dir, map_size=map_size, clock=clock)
    await stack.start()
    test_case.addCleanup(stack.stop)
    return stack


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
