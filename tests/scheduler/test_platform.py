"""Tests of platform property normalization and matching."""

from twisted.trial import unittest

from bgrid.errors import InvalidArgumentError
from bgrid.scheduler.platform import normalize_properties, satisfies, worker_properties
from tests.scheduler.helpers import make_bot_session


class NormalizePropertiesTests(unittest.TestCase):
    def test_sorts_and_removes_duplicates(self):
        pairs = [("os", "linux"), ("arch", "x86_64"), ("os", "linux"), ("os", "debian")]

        normalized = normalize_properties(pairs)

        self.assertEqual(
            normalized, (("arch", "x86_64"), ("os", "debian"), ("os", "linux"))
        )

    def test_empty_name_rejected(self):
        error = self.assertRaises(InvalidArgumentError, normalize_properties, [("", "x")])

        self.assertIn("'x'", error.message)

    def test_non_string_value_rejected(self):
        error = self.assertRaises(
            InvalidArgumentError, normalize_properties, [("cores", 4)], "action.platform"
        )

        self.assertIn("action.platform", error.message)
        self.assertIn("('cores', 4)", error.message)


class WorkerPropertiesTests(unittest.TestCase):
    def test_includes_device_properties(self):
        session = make_bot_session(
            "bot", [("os", "linux")], device_properties=[("gpu", "a100"), ("os", "linux")]
        )

        properties = worker_properties(session.worker)

        self.assertEqual(properties, (("gpu", "a100"), ("os", "linux")))

    def test_keeps_repeated_names(self):
        session = make_bot_session("bot", [("isa", "sse4"), ("isa", "avx2")])

        properties = worker_properties(session.worker)

        self.assertEqual(properties, (("isa", "avx2"), ("isa", "sse4")))


class SatisfiesTests(unittest.TestCase):
    bot = frozenset({("os", "linux"), ("isa", "avx2"), ("isa", "sse4")})

    def test_cases(self):
        cases = [
            ((), True),
            ((("os", "linux"),), True),
            ((("isa", "avx2"), ("isa", "sse4")), True),
            ((("isa", "avx2"), ("isa", "avx512")), False),
            ((("os", "windows"),), False),
            ((("OS", "linux"),), False),
            ((("gpu", "a100"),), False),
        ]
        for requirements, expected in cases:
            with self.subTest(requirements=requirements):
                self.assertEqual(satisfies(self.bot, requirements), expected)
