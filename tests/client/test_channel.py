"""Tests of server address parsing and channel opening."""

import grpc
from twisted.trial import unittest

from bgrid.client.channel import open_channel, parse_address
from bgrid.errors import InvalidArgumentError
from tests.util import async_test


class ParseAddressTests(unittest.TestCase):
    def test_accepted_forms(self):
        cases = [
            ("localhost:8980", "localhost:8980", False),
            ("127.0.0.1:1", "127.0.0.1:1", False),
            ("[::1]:8980", "[::1]:8980", False),
            ("grpc://example.test:443", "example.test:443", False),
            ("grpcs://example.test:443", "example.test:443", True),
            ("unix:/run/bgrid.sock", "unix:/run/bgrid.sock", False),
            ("unix:relative.sock", "unix:relative.sock", False),
        ]
        for address, target, tls in cases:
            parsed = parse_address(address)
            self.assertEqual(parsed.target, target, address)
            self.assertEqual(parsed.tls, tls, address)

    def test_rejected_forms(self):
        for address in ["", "localhost", ":8980", "localhost:", "localhost:port",
                        "http://localhost:80", "localhost:0", "localhost:70000", "unix:",
                        "::1:8980", "grpc://", "host name:80"]:
            with self.assertRaises(InvalidArgumentError, msg=address) as caught:
                parse_address(address)
            self.assertIn(repr(address), caught.exception.message)


class OpenChannelTests(unittest.TestCase):
    @async_test
    async def test_plaintext_channel(self):
        channel = open_channel("127.0.0.1:1")
        self.assertIsInstance(channel, grpc.aio.Channel)
        await channel.close()

    @async_test
    async def test_tls_channel_for_grpcs(self):
        channel = open_channel("grpcs://127.0.0.1:1")
        self.assertIsInstance(channel, grpc.aio.Channel)
        await channel.close()
