"""Tests of ``bgrid.digest``: validation of digests one at a time and in bulk."""

from twisted.trial import unittest

from bgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from bgrid.digest import Digest, digests_from_protos, hash_key, keys_of
from bgrid.errors import InvalidArgumentError

VALID_HASHES = ["0" * 64, "0123456789abcdef" * 4, "f" * 64]

INVALID_HASHES = {
    "uppercase": "A" * 64,
    "too short": "a" * 63,
    "too long": "a" * 65,
    "not hex": "g" * 64,
    "inner space": "a" * 31 + " " + "a" * 32,
    "trailing newline": "a" * 63 + "\n",
    "empty": "",
    "non-ASCII letters": "é" * 64,
    "non-ASCII digits": "a" * 62 + "\u0660\u0661",
    "NUL": "a" * 63 + "\x00",
}


def digest_proto(hash_hex, size_bytes=1):
    return re_pb2.Digest(hash=hash_hex, size_bytes=size_bytes)


class DigestsFromProtosTests(unittest.TestCase):
    def test_valid_digests_in_order(self):
        protos = [digest_proto(hash_hex, size) for size, hash_hex in enumerate(VALID_HASHES)]

        digests = digests_from_protos(protos)

        self.assertEqual(digests, [Digest(proto.hash, proto.size_bytes) for proto in protos])
        for digest in digests:
            self.assertIs(type(digest), Digest)

    def test_no_digests(self):
        self.assertEqual(digests_from_protos([]), [])

    def test_invalid_hash_named_by_index(self):
        for case, bad_hash in INVALID_HASHES.items():
            for position in (0, 2):
                protos = [digest_proto(hash_hex) for hash_hex in VALID_HASHES]
                protos.insert(position, digest_proto(bad_hash))

                with self.assertRaises(InvalidArgumentError, msg=case) as caught:
                    digests_from_protos(protos, field="blob_digests")

                self.assertIn(f"blob_digests[{position}]", caught.exception.message, case)
                self.assertIn(repr(bad_hash), caught.exception.message, case)

    def test_lengths_that_add_up(self):
        # Two wrong lengths whose total is that of two valid hashes.
        protos = [digest_proto("a" * 66), digest_proto("a" * 62)]

        with self.assertRaises(InvalidArgumentError) as caught:
            digests_from_protos(protos, field="digests")

        self.assertIn("digests[0]", caught.exception.message)

    def test_negative_size(self):
        protos = [digest_proto(VALID_HASHES[0]), digest_proto(VALID_HASHES[1], -5)]

        with self.assertRaises(InvalidArgumentError) as caught:
            digests_from_protos(protos, field="digests")

        self.assertIn("digests[1]", caught.exception.message)
        self.assertIn("-5", caught.exception.message)


class KeysOfTests(unittest.TestCase):
    def test_raw_hash_bytes(self):
        digests = [Digest(hash_hex, 1) for hash_hex in VALID_HASHES]

        self.assertEqual(keys_of(digests), [digest.key for digest in digests])


class HashKeyTests(unittest.TestCase):
    def test_matches_digest_key(self):
        for data in (b"", b"blob", bytearray(b"x" * 5000), memoryview(b"y" * 3000)):
            self.assertEqual(hash_key(data), Digest.of(data).key)
