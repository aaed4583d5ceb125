"""Open grpc.aio channels from the server addresses that users type."""

import re
from typing import NamedTuple

import grpc

from bgrid.errors import InvalidArgumentError

# Large enough for any batch call that CasClient builds; batches are sized from the server's
# max_batch_total_size_bytes, capped to this value.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\[\]:/\s]+):(?P<port>[0-9]{1,5})")

_ADDRESS_FORMS = "HOST:PORT, grpc://HOST:PORT, grpcs://HOST:PORT or unix:PATH"


class ServerAddress(NamedTuple):
    """A parsed server address: the gRPC target string and whether it uses TLS."""

    target: str
    tls: bool


def parse_address(address):
    """Parse ``HOST:PORT``, ``grpc://HOST:PORT``, ``grpcs://HOST:PORT`` or ``unix:PATH``.

    IPv6 hosts are written in brackets, as in ``[::1]:8980``. Returns a ``ServerAddress``;
    raises InvalidArgumentError naming the accepted forms when ``address`` matches none.
    """
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if not path.strip("/"):
            raise InvalidArgumentError(
                f"invalid server address {address!r}: the socket path is empty; "
                f"expected {_ADDRESS_FORMS}"
            )
        return ServerAddress(address, tls=False)

    tls = False
    host_port = address
    if address.startswith("grpc://"):
        host_port = address[len("grpc://"):]
    elif address.startswith("grpcs://"):
        host_port = address[len("grpcs://"):]
        tls = True

    match = _HOST_PORT.fullmatch(host_port)
    if match is None:
        raise InvalidArgumentError(
            f"invalid server address {address!r}: expected {_ADDRESS_FORMS}"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise InvalidArgumentError(
            f"invalid server address {address!r}: port {port} is not in 1-65535"
        )
    return ServerAddress(f"{match['host']}:{port}", tls=tls)


def open_channel(address, credentials=None, options=()):
    """Open a grpc.aio channel to ``address`` (any form that ``parse_address`` accepts).

    Call it on the running event loop: grpc.aio binds the channel to that loop.

    TLS hook: pass ``credentials`` (``grpc.ssl_channel_credentials(...)``, possibly combined
    with call credentials) to open a secure channel to any address form. Without them a
    ``grpcs://`` address uses TLS with the system's root certificates, and every other form
    opens a plaintext channel.
    """
    parsed = parse_address(address)
    channel_options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        *options,
    ]
    if credentials is None and parsed.tls:
        credentials = grpc.ssl_channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(parsed.target, credentials, options=channel_options)
    return grpc.aio.insecure_channel(parsed.target, options=channel_options)
