"""Tests of the scheduler options of ``twistd bgrid``: the maximum action timeout and its
grace period."""

from twisted.python import usage
from twisted.trial import unittest

from bgrid.config import ServerConfig
from bgrid.tap import Options


def parse(*arguments):
    options = Options()
    options.parseOptions(list(arguments))
    return options.config


class ActionTimeoutOptionTests(unittest.TestCase):
    def test_defaults(self):
        config = parse()

        self.assertEqual(config.max_action_timeout, 3600.0)
        self.assertEqual(config.action_timeout_grace, 60.0)
        self.assertEqual(config.max_action_timeout, ServerConfig().max_action_timeout)

    def test_values(self):
        config = parse("--max-action-timeout", "900", "--action-timeout-grace", "0")

        self.assertEqual(config.max_action_timeout, 900.0)
        self.assertEqual(config.action_timeout_grace, 0.0)

    def test_invalid_values_reported_together(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--max-action-timeout", "0", "--action-timeout-grace", "soon")

        message = str(caught.exception)
        self.assertIn("--max-action-timeout", message)
        self.assertIn("at least 1.0", message)
        self.assertIn("--action-timeout-grace", message)
        self.assertIn("'soon'", message)

    def test_help_lists_options(self):
        help_text = str(Options())

        self.assertIn("--max-action-timeout=", help_text)
        self.assertIn("--action-timeout-grace=", help_text)
        self.assertIn("DEADLINE_EXCEEDED", help_text)
