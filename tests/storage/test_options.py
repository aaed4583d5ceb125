"""Tests of the storage options of ``twistd bgrid``: the CAS quota and its low watermark."""

from twisted.python import usage
from twisted.trial import unittest

from bgrid.config import ServerConfig, parse_fraction
from bgrid.tap import Options


def parse(*arguments):
    options = Options()
    options.parseOptions(list(arguments))
    return options.config


class CasQuotaOptionTests(unittest.TestCase):
    def test_defaults(self):
        config = parse()

        self.assertEqual(config.max_cas_size, 10 * 2**30)
        self.assertEqual(config.cas_low_watermark, 0.9)
        self.assertEqual(config.max_cas_size, ServerConfig().max_cas_size)

    def test_quota_with_unit(self):
        self.assertEqual(parse("--max-cas-size", "512MiB").max_cas_size, 512 * 2**20)
        self.assertEqual(parse("--max-cas-size", "2GB").max_cas_size, 2 * 10**9)

    def test_low_watermark(self):
        self.assertEqual(parse("--cas-low-watermark", "0.75").cas_low_watermark, 0.75)
        self.assertEqual(parse("--cas-low-watermark", "1").cas_low_watermark, 1.0)

    def test_invalid_values_reported_together(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--max-cas-size", "lots", "--cas-low-watermark", "0")

        message = str(caught.exception)
        self.assertIn("--max-cas-size", message)
        self.assertIn("'lots'", message)
        self.assertIn("--cas-low-watermark", message)

    def test_tiny_quota_rejected(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--max-cas-size", "1000")

        self.assertIn("--max-cas-size", str(caught.exception))

    def test_quota_above_map_size_rejected(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--max-cas-size", "2GiB", "--map-size", "1GiB")

        message = str(caught.exception)
        self.assertIn("--max-cas-size", message)
        self.assertIn("--map-size", message)


class ParseFractionTests(unittest.TestCase):
    def test_valid(self):
        self.assertEqual(parse_fraction("0.5"), 0.5)
        self.assertEqual(parse_fraction("1"), 1.0)

    def test_out_of_range(self):
        for text in ("0", "-0.1", "1.5", "nan", "half"):
            with self.assertRaises(ValueError, msg=text):
                parse_fraction(text)
