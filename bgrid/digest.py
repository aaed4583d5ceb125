"""Content digests: the validated, hashable form of a REAPI ``Digest`` used everywhere
below the gRPC edge."""

import hashlib
import re
from typing import NamedTuple

from bgrid.errors import InvalidArgumentError

HASH_NAME = "sha256"
HASH_HEX_LENGTH = 64
_HEX_DIGITS = frozenset("0123456789abcdef")
_DECIMAL = re.compile(r"[0-9]{1,19}")


class Digest(NamedTuple):
    """A blob's SHA-256 hash (lowercase hex) and its size in bytes."""

    hash: str
    size_bytes: int

    @classmethod
    def from_proto(cls, proto, field="digest"):
        """Validate a ``build.bazel.remote.execution.v2.Digest`` and return its ``Digest``.

        Raises InvalidArgumentError naming ``field`` when the hash is not 64 lowercase hex
        digits or the size is negative.
        """
        return cls.parse(proto.hash, proto.size_bytes, field)

    @classmethod
    def parse(cls, hash_hex, size_bytes, field="digest"):
        """Validate a hash and size given separately, as in a resource name."""
        if len(hash_hex) != HASH_HEX_LENGTH or not _HEX_DIGITS.issuperset(hash_hex):
            raise InvalidArgumentError(
                f"{field}: invalid SHA-256 hash {hash_hex!r}: "
                f"expected {HASH_HEX_LENGTH} lowercase hex digits"
            )
        if isinstance(size_bytes, str):
            if not _DECIMAL.fullmatch(size_bytes):
                raise InvalidArgumentError(
                    f"{field}: invalid size {size_bytes!r}: expected a decimal number of bytes"
                )
            size_bytes = int(size_bytes)
        if size_bytes < 0:
            raise InvalidArgumentError(f"{field}: invalid size {size_bytes}: must not be negative")
        return cls(hash_hex, size_bytes)

    @classmethod
    def of(cls, data):
        """Return the digest of ``data`` (bytes or a buffer)."""
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @property
    def key(self):
        """The 32 raw hash bytes, as used for storage keys."""
        return bytes.fromhex(self.hash)

    def to_proto(self, proto_class):
        """Return this digest as an instance of the given REAPI ``Digest`` message class."""
        return proto_class(hash=self.hash, size_bytes=self.size_bytes)

    def __str__(self):
        return f"{self.hash}/{self.size_bytes}"


EMPTY_DIGEST = Digest.of(b"")


def new_hasher():
    """Return a fresh incremental hasher of the digest function this server uses."""
    return hashlib.sha256()
