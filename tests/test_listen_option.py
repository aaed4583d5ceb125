"""Tests of ``twistd bgrid --listen``: which addresses it takes and how it rejects others."""

from twisted.python import usage
from twisted.trial import unittest

from bgrid.tap import Options


def parse(*arguments):
    options = Options()
    options.parseOptions(list(arguments))
    return options.config


class ListenOptionTests(unittest.TestCase):
    def test_valid_addresses(self):
        addresses = ["127.0.0.1:0", "127.0.0.1:65535", "[::1]:50051", "localhost:8980",
                     "unix:/run/bgrid.sock"]
        for address in addresses:
            self.assertEqual(parse("--listen", address).listen, [address])

    def test_invalid_addresses_named(self):
        cases = {
            "127.0.0.1:70000": "from 0 to 65535",
            "[::1]:131073": "from 0 to 65535",
            "127.0.0.1:-1": "from 0 to 65535",
            ":-1": "HOST:PORT",
            "127.0.0.1": "HOST:PORT",
            "::1:50051": "brackets",
            "[::1:50051": "HOST:PORT",
            "unix:": "socket path",
        }
        for address, reason in cases.items():
            with self.assertRaises(usage.UsageError, msg=address) as caught:
                parse("--listen", address)

            message = str(caught.exception)
            self.assertIn(f"--listen: invalid address {address!r}", message)
            self.assertIn(reason, message)
