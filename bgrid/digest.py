"""Content digests: the validated, hashable form of a REAPI ``Digest`` used everywhere
below the gRPC edge."""

import functools
import hashlib
import operator
import re
from typing import NamedTuple

from bgrid.errors import InvalidArgumentError

HASH_NAME = "sha256"
HASH_HEX_LENGTH = 64
# The largest size a Digest message can carry (its size_bytes is an int64).
MAX_SIZE_BYTES = 2**63 - 1
_HASH_HEX = re.compile(r"[0-9a-f]{64}")
_HEX_DIGIT_BYTES = b"0123456789abcdef"
# A size in a resource name: canonical decimal, so one blob has one resource name.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


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
        if not _HASH_HEX.fullmatch(hash_hex):
            raise InvalidArgumentError(
                f"{field}: invalid SHA-256 hash {hash_hex!r}: "
                f"expected {HASH_HEX_LENGTH} lowercase hex digits"
            )
        if isinstance(size_bytes, str):
            if not _DECIMAL.fullmatch(size_bytes):
                raise InvalidArgumentError(
                    f"{field}: invalid size {size_bytes!r}: expected a decimal number of bytes "
                    f"without leading zeros"
                )
            size_bytes = int(size_bytes)
        if size_bytes < 0:
            raise InvalidArgumentError(f"{field}: invalid size {size_bytes}: must not be negative")
        if size_bytes > MAX_SIZE_BYTES:
            raise InvalidArgumentError(
                f"{field}: invalid size {size_bytes}: above the int64 maximum {MAX_SIZE_BYTES}"
            )
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

_get_hash = operator.attrgetter("hash")
_get_size_bytes = operator.attrgetter("size_bytes")
# Builds a Digest from a (hash, size_bytes) pair in C, without the validation of parse.
_digest_from_pair = functools.partial(tuple.__new__, Digest)


def digests_from_protos(protos, field="digests"):
    """Validate a list of ``build.bazel.remote.execution.v2.Digest`` messages and return
    their ``Digest`` values, in order.

    Does what ``Digest.from_proto`` does for each message, with the checks made on all
    messages at once so that the cost per digest stays in C. Raises
    InvalidArgumentError naming ``{field}[{index}]`` of the first invalid digest.
    """
    hashes = list(map(_get_hash, protos))
    sizes = list(map(_get_size_bytes, protos))
    if hashes and not _all_valid(hashes, sizes):
        for index, (hash_hex, size_bytes) in enumerate(zip(hashes, sizes)):
            Digest.parse(hash_hex, size_bytes, field=f"{field}[{index}]")
    return list(map(_digest_from_pair, zip(hashes, sizes)))


def _all_valid(hashes, sizes):
    """Return whether every hash is 64 lowercase hex digits and every size is at least 0."""
    if set(map(len, hashes)) != {HASH_HEX_LENGTH} or min(sizes) < 0:
        return False
    joined = "".join(hashes)
    return joined.isascii() and not joined.encode("ascii").translate(None, _HEX_DIGIT_BYTES)


def keys_of(digests):
    """Return the 32 raw hash bytes of each digest, as ``Digest.key`` does, in order."""
    return list(map(bytes.fromhex, map(_get_hash, digests)))


def hash_hex(data):
    """Return the SHA-256 of ``data`` (bytes or a buffer) as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def hash_key(data):
    """Return the SHA-256 of ``data`` (bytes or a buffer) as 32 raw bytes, the form of
    ``Digest.key``."""
    return hashlib.sha256(data).digest()


def new_hasher():
    """Return a fresh incremental hasher of the digest function this server uses."""
    return hashlib.sha256()
