"""The action cache of a bgrid server, kept in one LMDB database."""

import struct

from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.errors import InvalidArgumentError, NotFoundError
from bgrid.interfaces import IActionCache

ACTION_CACHE_DATABASE = b"action-cache"

_SIZE = struct.Struct(">Q")

# The bytes of a key besides the instance name: a NUL separator, 32 hash bytes and an
# 8-byte size.
_KEY_OVERHEAD = 1 + 32 + _SIZE.size


def _read_value(txn, db, key):
    value = txn.get(key, db=db)
    return bytes(value) if value is not None else None


@implementer(IActionCache)
class LmdbActionCache:
    """Serialized ``ActionResult`` messages in an ``LmdbEnvironment``.

    The key of an entry is the UTF-8 instance name, a NUL byte, the 32 raw bytes of the
    action's SHA-256 and its size as 8 big-endian bytes, so each instance has its own
    entries. Instance names are limited by LMDB's maximum key size (511 bytes in default
    builds) less 41 bytes.
    """

    log = Logger()

    DATABASE_NAMES = (ACTION_CACHE_DATABASE,)

    def __init__(self, environment):
        """Describe the cache over ``environment``, an ``LmdbEnvironment`` opened with
        ``DATABASE_NAMES``. ``start`` opens it."""
        self._environment = environment
        self._db = None
        self._max_key_size = None

    def start(self):
        """Take the database handle from the started environment."""
        self._db = self._environment.database(ACTION_CACHE_DATABASE)
        self._max_key_size = self._environment.max_key_size

    def stop(self):
        """Do nothing, because the environment owns every resource the cache uses."""

    def get(self, instance_name, action_digest):
        try:
            key = self._key(instance_name, action_digest)
        except InvalidArgumentError as error:
            return defer.fail(error)
        # One key lookup runs on the reactor thread, because a reader thread would cost a
        # thread hop and a reactor wake-up per lookup. The value copied is one
        # ActionResult, which the server received in one gRPC message, so the maximum
        # message size bounds it.
        reading = self._environment.read_inline(_read_value, self._db, key)
        return reading.addCallback(self._parse, instance_name, action_digest)

    def _parse(self, value, instance_name, action_digest):
        if value is None:
            raise NotFoundError(
                f"no action result for {action_digest} in instance {instance_name!r}"
            )
        try:
            return re_pb2.ActionResult.FromString(value)
        except DecodeError as error:
            self.log.error(
                "stored action result for {action_digest} in instance {instance_name!r} "
                "does not parse ({error}), so it is reported as not found",
                action_digest=str(action_digest),
                instance_name=instance_name,
                error=error,
            )
            raise NotFoundError(
                f"no valid action result for {action_digest} in instance {instance_name!r}"
            ) from error

    def put(self, instance_name, action_digest, action_result):
        try:
            key = self._key(instance_name, action_digest)
        except InvalidArgumentError as error:
            return defer.fail(error)
        value = action_result.SerializeToString()
        db = self._db

        def store_result(txn):
            txn.put(key, value, db=db)

        return self._environment.write(store_result)

    def _key(self, instance_name, action_digest):
        """Return the LMDB key of an entry.

        Raises ``InvalidArgumentError`` when the instance name contains a NUL character
        or is too long for an LMDB key.
        """
        name = instance_name.encode("utf-8")
        if b"\x00" in name:
            raise InvalidArgumentError(f"instance name {instance_name!r} contains a NUL character")

        max_name_size = self._max_key_size - _KEY_OVERHEAD
        if len(name) > max_name_size:
            raise InvalidArgumentError(
                f"instance name {instance_name[:40]!r}... is {len(name)} bytes in UTF-8, "
                f"but the maximum is {max_name_size} bytes"
            )
        return name + b"\x00" + action_digest.key + _SIZE.pack(action_digest.size_bytes)
