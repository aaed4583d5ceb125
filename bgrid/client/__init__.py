"""The REAPI client library shared by the bot, the ``bgrid`` command line and the tests.

Everything here is asyncio code for grpc.aio. Under Twisted's asyncio reactor the coroutines
run on the reactor thread; Twisted callers wrap them with ``bgrid.bridge.as_deferred``.
"""

from bgrid.client.cas import BlobIntegrityError, CasClient, RemoteCallError
from bgrid.client.channel import open_channel, parse_address

__all__ = [
    "BlobIntegrityError",
    "CasClient",
    "RemoteCallError",
    "open_channel",
    "parse_address",
]
